"""Operations: Patient $everything, Patient $medication-history, $validate, and their registry."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.api import STORE_KEY
from iop_fhir.api.bundles import references
from iop_fhir.api.operations import COMPARTMENT_TYPES, MEDICATION_HISTORY_URL, event_time
from iop_fhir.formats import fhir_json, fhir_validate, fhir_xml
from iop_fhir.generate import generate_record
from iop_fhir.mappers.bundle import record_to_bundle
from iop_fhir.record import IopRecord, validate_record
from iop_fhir.store import Saved, Store

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"
ADHERENCE = "71799-1"


def the_store(app: Flask) -> Store:
    return app.extensions[STORE_KEY]


def load(client: FlaskClient, record: IopRecord) -> dict[str, str]:
    """Store a record's Bundle through ``POST /fhir``; its resources' ids by fullUrl."""
    tx = record_to_bundle(record)
    r = client.post("/fhir", data=fhir_json.dumps(tx), headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"})
    assert r.status_code == 200, r.get_json()
    return {e["fullUrl"]: e["resource"]["id"] for e in tx["entry"]}


def patient_id(record: IopRecord) -> str:
    return next(e["resource"]["id"] for e in record_to_bundle(record)["entry"] if e["resource"]["resourceType"] == "Patient")


@pytest.fixture
def example_loaded(app, client, example_record) -> str:
    load(client, example_record)
    return patient_id(example_record)


# --- the registry ------------------------------------------------------------------------------


def test_operations_are_registered_for_the_capability_statement(app):
    ops = {op["name"]: op for op in app.extensions["iop_fhir.operations"]}
    assert ops["everything"] == {"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything", "types": ["Patient"], "level": "instance"}
    assert ops["medication-history"]["definition"] == MEDICATION_HISTORY_URL == "https://iop-fhir.org/fhir/OperationDefinition/Patient-medication-history"
    assert ops["validate"]["definition"] == "http://hl7.org/fhir/OperationDefinition/Resource-validate"
    assert ops["validate"]["types"] == ["*"]
    capability = app.test_client().get("/fhir/metadata").get_json()
    patient = next(r for r in capability["rest"][0]["resource"] if r["type"] == "Patient")
    assert {op["name"] for op in patient["operation"]} == {"everything", "medication-history", "validate"}


def test_medication_history_operation_definition_is_served(client):
    r = client.get("/fhir/OperationDefinition/Patient-medication-history")
    assert r.status_code == 200
    definition = r.get_json()
    assert definition["url"] == MEDICATION_HISTORY_URL and definition["code"] == "medication-history"
    assert fhir_validate.validate_resource(definition) == []


# --- $everything -------------------------------------------------------------------------------


def test_everything_is_the_patient_its_compartment_and_the_parties(app, client, example_record):
    load(client, example_record)
    load(client, validate_record(generate_record(12, 7)))  # another patient, who must not leak in
    pid = patient_id(example_record)
    r = client.get(f"/fhir/Patient/{pid}/$everything")
    assert r.status_code == 200
    body = r.get_json()
    assert body["type"] == "searchset"
    entries = body["entry"]
    assert body["total"] == len(entries) == len(record_to_bundle(example_record)["entry"])
    assert entries[0]["resource"]["resourceType"] == "Patient" and entries[0]["resource"]["id"] == pid
    modes = {}
    for e in entries:
        modes.setdefault(e["search"]["mode"], set()).add(e["resource"]["resourceType"])
        assert e["fullUrl"] == f"http://localhost/fhir/{e['resource']['resourceType']}/{e['resource']['id']}"
    assert modes["include"] == {"Practitioner", "PractitionerRole", "Organization"}
    assert {"Patient", "MedicationRequest", "Observation", "Task", "CarePlan", "EpisodeOfCare", "Provenance"} <= modes["match"]
    for e in entries:
        if e["search"]["mode"] == "match" and e["resource"]["resourceType"] not in ("Patient", "Provenance"):
            assert f"Patient/{pid}" in [ref["reference"] for ref, _ in references(e["resource"])], e["resource"]["resourceType"]
    order = [e["resource"]["resourceType"] for e in entries if e["search"]["mode"] == "match"][1:]
    ranks = [COMPARTMENT_TYPES.index(t) if t in COMPARTMENT_TYPES else len(COMPARTMENT_TYPES) for t in order]
    assert ranks == sorted(ranks)


def test_everything_pages_with_count(client, example_loaded):
    url = f"/fhir/Patient/{example_loaded}/$everything?_count=20"
    seen: list[str] = []
    totals = set()
    while url:
        body = client.get(url).get_json()
        totals.add(body["total"])
        seen += [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in body.get("entry", [])]
        links = {link["relation"]: link["url"] for link in body["link"]}
        assert "_count=20" in links["self"]
        nxt = links.get("next")
        url = f"{urlsplit(nxt).path}?{urlsplit(nxt).query}" if nxt else None
    assert totals == {54} and len(seen) == 54 == len(set(seen))


def test_everything_filters_by_type_and_care_dates(client, example_loaded):
    r = client.get(f"/fhir/Patient/{example_loaded}/$everything?_type=MedicationRequest,Practitioner&start=2026-01-19")
    found = [(e["resource"]["resourceType"], e["resource"].get("authoredOn")) for e in r.get_json()["entry"]]
    assert {t for t, _ in found} == {"MedicationRequest", "Practitioner"}
    assert sorted(d for t, d in found if t == "MedicationRequest") == ["2026-01-19", "2026-02-27", "2026-02-27", "2026-02-27"]


def test_everything_reaches_tasks_whatever_the_type_filter(client, example_loaded):
    r = client.get(f"/fhir/Patient/{example_loaded}/$everything?_type=Task")
    tasks = r.get_json()["entry"]
    assert len(tasks) == 3 and {e["resource"]["resourceType"] for e in tasks} == {"Task"}
    assert all(e["resource"]["for"]["reference"] == f"Patient/{example_loaded}" for e in tasks)


def test_everything_by_post_with_parameters(client, example_loaded):
    params = {"resourceType": "Parameters", "parameter": [{"name": "_type", "valueString": "Condition"}]}
    r = client.post(f"/fhir/Patient/{example_loaded}/$everything", data=json.dumps(params), headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 200
    assert [e["resource"]["resourceType"] for e in r.get_json()["entry"]] == ["Condition", "Condition"]


def test_everything_rejects_bad_parameters(client, example_loaded):
    r = client.get(f"/fhir/Patient/{example_loaded}/$everything?_count=abc")
    assert r.status_code == 400 and r.get_json()["issue"][0]["expression"] == ["_count"]
    r = client.get(f"/fhir/Patient/{example_loaded}/$everything?start=soon")
    assert r.status_code == 400 and r.get_json()["issue"][0]["expression"] == ["start"]
    lenient = client.get(f"/fhir/Patient/{example_loaded}/$everything?colour=red")
    assert lenient.status_code == 200
    strict = client.get(f"/fhir/Patient/{example_loaded}/$everything?colour=red", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400 and strict.get_json()["issue"][0]["expression"] == ["colour"]


def test_everything_of_unknown_or_deleted_patient(app, client):
    assert client.get("/fhir/Patient/nobody/$everything").status_code == 404
    saved = the_store(app).create({"resourceType": "Patient", "gender": "male"}, deliver_to=())
    the_store(app).delete("Patient", saved.id, deliver_to=())
    r = client.get(f"/fhir/Patient/{saved.id}/$everything")
    assert r.status_code == 410 and r.get_json()["resourceType"] == "OperationOutcome"


# --- $medication-history ---------------------------------------------------------------------


def _history(client: FlaskClient, pid: str, **headers: str) -> dict:
    r = client.get(f"/fhir/Patient/{pid}/$medication-history", headers=headers)
    assert r.status_code == 200, r.data
    return r.get_json()


def test_medication_history_of_the_example(app, client, example_record):
    ids = load(client, example_record)
    pid = patient_id(example_record)
    st = the_store(app)
    pharmacy = next(v for k, v in ids.items() if st.read_many("Organization", [v]) and "Pharmacy" in st.read("Organization", v).resource["name"])
    prescription = next(e for e in record_to_bundle(example_record)["entry"] if e["resource"]["resourceType"] == "MedicationRequest")["resource"]["id"]
    st.create(
        {
            "resourceType": "MedicationDispense",
            "status": "completed",
            "medicationCodeableConcept": {"text": "sertraline 50 MG Oral Tablet"},
            "subject": {"reference": f"Patient/{pid}"},
            "performer": [{"actor": {"reference": f"Organization/{pharmacy}"}}],
            "authorizingPrescription": [{"reference": f"MedicationRequest/{prescription}"}],
            "whenHandedOver": "2026-01-06T15:30:00Z",
        },
        deliver_to=(),
    )
    st.create(
        {"resourceType": "MedicationStatement", "status": "active", "medicationCodeableConcept": {"text": "ibuprofen"}, "subject": {"reference": f"Patient/{pid}"}, "dateAsserted": "2026-03-01"},
        deliver_to=(),
    )
    body = _history(client, pid)
    assert body["type"] == "searchset"
    matches = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "match"]
    includes = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "include"]
    kinds = [r["resourceType"] for r in matches]
    assert body["total"] == len(matches) == 7 + 3 + 1 + 1
    assert kinds.count("MedicationRequest") == 7 and kinds.count("MedicationDispense") == 1 and kinds.count("MedicationStatement") == 1
    assert all(r["code"]["coding"][0]["code"] == ADHERENCE for r in matches if r["resourceType"] == "Observation")
    when = [r.get("authoredOn") or r.get("whenHandedOver") or r.get("dateAsserted") or r.get("effectiveDateTime") for r in matches]
    assert when[0] == "2026-03-01"  # the statement, newest
    assert [w[:10] for w in when] == sorted((w[:10] for w in when), reverse=True)
    assert when.index("2026-01-06T15:30:00Z") == len(when) - 3  # after 2026-01-12, before the two of 2026-01-05
    assert [(r["resourceType"], r["id"]) for r in includes] == [
        ("Patient", pid),
        ("Organization", pharmacy),
        ("Practitioner", next(r["id"] for r in includes if r["resourceType"] == "Practitioner")),
    ]
    prescriber = includes[2]
    assert prescriber["name"][0]["family"] == "Okafor"


def test_medication_history_of_generated_records(app, client):
    for index in (4, 13, 16):
        record = validate_record(generate_record(index, 7))
        load(client, record)
        body = _history(client, patient_id(record))
        matches = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "match"]
        expected = len(record.prescriptions) + (len(record.discharge.aftercare.medications) if record.discharge and record.discharge.aftercare else 0)
        assert sum(r["resourceType"] == "MedicationRequest" for r in matches) == expected
        assert sum(r["resourceType"] == "Observation" for r in matches) == len(record.adherence)
        dates = [r.get("authoredOn") or r.get("effectiveDateTime") or r["effectivePeriod"]["start"] for r in matches]
        assert [d[:10] for d in dates] == sorted((d[:10] for d in dates), reverse=True)
        included = {e["resource"]["resourceType"] for e in body["entry"] if e["search"]["mode"] == "include"}
        assert "Patient" in included and ("Practitioner" in included or not record.prescriptions)


def test_medication_history_in_xml(client, example_loaded):
    r = client.get(f"/fhir/Patient/{example_loaded}/$medication-history", headers={"Accept": FHIR_XML})
    assert r.status_code == 200 and r.headers["Content-Type"] == f"{FHIR_XML}; charset=utf-8"
    assert fhir_xml.from_xml(r.data)["total"] == 10


def test_medication_history_of_unknown_patient_is_404(client):
    r = client.get("/fhir/Patient/nobody/$medication-history")
    assert r.status_code == 404 and r.get_json()["resourceType"] == "OperationOutcome"


def test_event_time_falls_back_to_last_updated():
    moment = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    undated = Saved("MedicationStatement", "s1", 1, moment, data=b'{"resourceType":"MedicationStatement","status":"active"}')
    dated = Saved("MedicationStatement", "s2", 1, moment, data=b'{"resourceType":"MedicationStatement","effectivePeriod":{"start":"2026-05-02"}}')
    assert event_time(undated) == int(moment.timestamp() * 1_000_000)
    assert event_time(dated) == int(datetime(2026, 5, 2, tzinfo=UTC).timestamp() * 1_000_000)


# --- $validate ---------------------------------------------------------------------------------


def validate(client: FlaskClient, url: str, body, **headers: str):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(url, data=data, headers={"Content-Type": FHIR_JSON, **headers})


def test_validate_a_valid_resource(app, client):
    r = validate(client, "/fhir/Patient/$validate", {"resourceType": "Patient", "gender": "male"})
    assert r.status_code == 200
    issue = r.get_json()["issue"]
    assert [(i["severity"], i["code"]) for i in issue] == [("information", "informational")]
    assert the_store(app).count("Patient") == 0


def test_validate_reports_every_problem(client):
    r = validate(client, "/fhir/MedicationRequest/$validate", {"resourceType": "MedicationRequest", "status": "paused", "intent": "order", "subject": {"reference": "Patient/1"}})
    assert r.status_code == 200
    found = [(i["severity"], i["expression"]) for i in r.get_json()["issue"]]
    assert found == [("error", ["MedicationRequest"]), ("error", ["MedicationRequest.status"])]  # no medication[x]; bad status


def test_validate_with_parameters_and_modes(client):
    params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Patient"}}, {"name": "mode", "valueCode": "update"}]}
    r = validate(client, "/fhir/Patient/$validate", params)
    assert r.status_code == 200
    assert [i["expression"] for i in r.get_json()["issue"]] == [["Patient.id"]]
    params["parameter"][0]["resource"]["id"] = "other"
    r = validate(client, "/fhir/Patient/p1/$validate", params)
    assert [i["expression"] for i in r.get_json()["issue"]] == [["Patient.id"]]
    params["parameter"].append({"name": "profile", "valueUri": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"})
    params["parameter"][0]["resource"]["id"] = "p1"
    r = validate(client, "/fhir/Patient/p1/$validate", params)
    assert [i["severity"] for i in r.get_json()["issue"]] == ["warning", "information"]


def test_validate_delete_mode(app, client):
    r = validate(client, "/fhir/Patient/p1/$validate?mode=delete", b"")
    assert r.status_code == 200 and r.get_json()["issue"][0]["code"] == "not-found"
    saved = the_store(app).create({"resourceType": "Patient"}, deliver_to=())
    r = validate(client, f"/fhir/Patient/{saved.id}/$validate?mode=delete", b"")
    assert r.get_json()["issue"][0]["severity"] == "information"
    assert validate(client, "/fhir/Patient/$validate?mode=delete", b"").status_code == 400


def test_validate_wrong_type_xml_and_fhir_json_rules(client):
    r = validate(client, "/fhir/Patient/$validate", {"resourceType": "Observation"})
    assert r.status_code == 200 and r.get_json()["issue"][0]["expression"] == ["resourceType"]
    xml = fhir_xml.to_xml({"resourceType": "Patient", "gender": "male"})
    r = client.post("/fhir/Patient/$validate", data=xml, headers={"Content-Type": FHIR_XML, "Accept": FHIR_XML})
    assert r.status_code == 200 and fhir_xml.from_xml(r.data)["issue"][0]["severity"] == "information"
    r = validate(client, "/fhir/Patient/$validate", '{"resourceType": "Patient", "identifier": []}')
    assert r.status_code == 200 and r.get_json()["issue"][0]["severity"] == "error"


def test_validate_refuses_what_is_not_a_request_for_it(client):
    assert validate(client, "/fhir/Nonsense/$validate", {"resourceType": "Patient"}).status_code == 404
    assert validate(client, "/fhir/Patient/$validate", b"{not json").status_code == 400
    assert validate(client, "/fhir/Patient/$validate", b"").status_code == 400
    r = validate(client, "/fhir/Patient/$validate?mode=replace", {"resourceType": "Patient"})
    assert r.status_code == 400 and r.get_json()["issue"][0]["expression"] == ["mode"]
