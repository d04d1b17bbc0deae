"""Batch and transaction Bundles at ``POST /fhir``: all or nothing, urn:uuid and conditional
resolution, processing order, per-entry statuses, batch independence, JSON and XML."""

from __future__ import annotations

import base64
import json
import re

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.api import STORE_KEY
from iop_fhir.api.bundles import reference_elements, references
from iop_fhir.formats import fhir_xml
from iop_fhir.mappers.bundle import record_to_bundle
from iop_fhir.store import Store

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"
SYS = "https://example.org/mrn"
PATIENT_URN = "urn:uuid:6f1c1f0e-8d2a-4d5b-9a51-3d9b0f6f7a01"
INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def the_store(app: Flask) -> Store:
    return app.extensions[STORE_KEY]


def post(client: FlaskClient, bundle: dict, **headers: str):
    return client.post("/fhir", data=json.dumps(bundle), headers={"Content-Type": FHIR_JSON, **headers})


def bundle(kind: str, *entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def patient(mrn: str = "1", **extra) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": SYS, "value": mrn}], "gender": "female", **extra}


def observation(subject: str, text: str = "mood") -> dict:
    return {"resourceType": "Observation", "status": "final", "code": {"text": text}, "subject": {"reference": subject}}


def entry(method: str, url: str, resource: dict | None = None, full_url: str | None = None, **request) -> dict:
    out: dict = {}
    if full_url:
        out["fullUrl"] = full_url
    if resource is not None:
        out["resource"] = resource
    out["request"] = {"method": method, "url": url, **request}
    return out


def statuses(response) -> list[str]:
    return [e["response"]["status"] for e in response.get_json()["entry"]]


def expressions(response) -> list[str]:
    return [x for issue in response.get_json()["issue"] for x in issue.get("expression", [])]


def versions(app: Flask) -> int:
    """How many versions the store holds, of everything."""
    return the_store(app).history(count=1, total=True).total or 0


# --- transactions ----------------------------------------------------------------------------


def test_transaction_resolves_urn_uuid_and_answers_per_entry(app, client):
    r = post(client, bundle("transaction", entry("POST", "Observation", observation(PATIENT_URN)), entry("POST", "Patient", patient(), PATIENT_URN)))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == f"{FHIR_JSON}; charset=utf-8"
    body = r.get_json()
    assert body["resourceType"] == "Bundle" and body["type"] == "transaction-response"
    obs_entry, patient_entry = body["entry"]  # request order
    for e in (obs_entry, patient_entry):
        assert e["response"]["status"] == "201 Created"
        assert re.fullmatch(r"(Observation|Patient)/[A-Za-z0-9\-.]+/_history/1", e["response"]["location"])
        assert e["response"]["etag"] == 'W/"1"'
        assert INSTANT.fullmatch(e["response"]["lastModified"])
        assert e["fullUrl"] == f"http://localhost/fhir/{e['resource']['resourceType']}/{e['resource']['id']}"
    patient_id = patient_entry["resource"]["id"]
    assert obs_entry["resource"]["subject"] == {"reference": f"Patient/{patient_id}"}
    stored = the_store(app).read("Observation", obs_entry["resource"]["id"]).resource
    assert stored["subject"] == {"reference": f"Patient/{patient_id}"}


def test_transaction_with_an_invalid_entry_stores_nothing(app, client):
    r = post(
        client,
        bundle(
            "transaction",
            entry("POST", "Patient", patient("1"), PATIENT_URN),
            entry("POST", "Patient", patient("2", gender="bogus", birthDate="1990-13-01")),
            entry("POST", "Observation", observation(PATIENT_URN)),
        ),
    )
    assert r.status_code == 422
    assert r.get_json()["resourceType"] == "OperationOutcome"
    assert sorted(expressions(r)) == ["Bundle.entry[1].resource.birthDate", "Bundle.entry[1].resource.gender"]
    assert versions(app) == 0


def test_transaction_failing_while_running_rolls_back_what_ran_before(app, client):
    existing = the_store(app).create(patient("9"), deliver_to=())
    r = post(
        client,
        bundle(
            "transaction",
            entry("POST", "Observation", observation(f"Patient/{existing.id}")),
            entry("PUT", f"Patient/{existing.id}", patient("9", gender="male", id=existing.id), ifMatch='W/"7"'),
        ),
    )
    assert r.status_code == 412
    assert expressions(r) == ["Bundle.entry[1].request.ifMatch"]
    assert "version 7" in r.get_json()["issue"][0]["diagnostics"]
    assert the_store(app).count("Observation") == 0  # the POST ran first and was rolled back
    assert the_store(app).read("Patient", existing.id).version == 1


def test_unknown_urn_reference_is_a_400_at_the_reference(app, client):
    r = post(client, bundle("transaction", entry("POST", "Observation", observation("urn:uuid:0000-unknown"))))
    assert r.status_code == 400
    assert expressions(r) == ["Bundle.entry[0].resource.subject.reference"]
    assert "urn:uuid:0000-unknown" in r.get_json()["issue"][0]["diagnostics"]
    assert versions(app) == 0


def test_urn_oid_full_urls_resolve_too(app, client):
    oid = "urn:oid:1.2.840.113619.6.1"
    r = post(client, bundle("transaction", entry("POST", "Patient", patient(), oid), entry("POST", "Observation", observation(oid))))
    assert r.status_code == 200
    patient_id = r.get_json()["entry"][0]["resource"]["id"]
    assert r.get_json()["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{patient_id}"


def test_entries_run_delete_post_put_get_and_answer_in_request_order(app, client):
    st = the_store(app)
    old = st.create(patient("old"), deliver_to=())
    kept = st.create(patient("kept"), deliver_to=())
    r = post(
        client,
        bundle(
            "transaction",
            entry("GET", f"Patient?identifier={SYS}|new"),  # runs last: sees the POST
            entry("PUT", f"Patient/{kept.id}", patient("kept", id=kept.id, gender="other")),
            entry("POST", "Patient", patient("new")),
            entry("DELETE", f"Patient/{old.id}"),
        ),
    )
    assert r.status_code == 200
    assert statuses(r) == ["200 OK", "200 OK", "201 Created", "204 No Content"]
    search = r.get_json()["entry"][0]["resource"]
    assert search["type"] == "searchset"
    assert [e["resource"]["identifier"][0]["value"] for e in search["entry"]] == ["new"]
    deleted = r.get_json()["entry"][3]["response"]
    assert deleted == {"status": "204 No Content", "etag": 'W/"2"', "lastModified": deleted["lastModified"]}
    assert r.get_json()["entry"][1]["response"]["etag"] == 'W/"2"'
    assert st.count("Patient") == 2


def test_conditional_put_updates_the_match_and_references_follow(app, client):
    existing = the_store(app).create(patient("42"), deliver_to=())
    tx = bundle(
        "transaction",
        entry("PUT", f"Patient?identifier={SYS}|42", patient("42", id=PATIENT_URN[9:], gender="male"), PATIENT_URN),
        entry("POST", "Observation", observation(PATIENT_URN)),
    )
    r = post(client, tx)
    assert r.status_code == 200, r.get_json()
    assert statuses(r) == ["200 OK", "201 Created"]
    assert r.get_json()["entry"][0]["response"]["location"] == f"Patient/{existing.id}/_history/2"
    assert r.get_json()["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{existing.id}"
    assert the_store(app).count("Patient") == 1


def test_conditional_put_without_a_match_creates_under_the_resources_own_id(app, client):
    own_id = PATIENT_URN[9:]
    r = post(client, bundle("transaction", entry("PUT", f"Patient?identifier={SYS}|43", patient("43", id=own_id), PATIENT_URN)))
    assert statuses(r) == ["201 Created"]
    assert r.get_json()["entry"][0]["response"]["location"] == f"Patient/{own_id}/_history/1"


def test_conditional_put_with_a_contradicting_id_is_a_400(app, client):
    existing = the_store(app).create(patient("44"), deliver_to=())
    r = post(client, bundle("transaction", entry("PUT", f"Patient?identifier={SYS}|44", patient("44", id="someone-else"))))
    assert r.status_code == 400
    assert expressions(r) == ["Bundle.entry[0].resource.id"]
    assert existing.id in r.get_json()["issue"][0]["diagnostics"]


def test_conditional_write_matching_several_is_a_412(app, client):
    st = the_store(app)
    st.create(patient("a", name=[{"family": "Smith"}]), deliver_to=())
    st.create(patient("b", name=[{"family": "Smith"}]), deliver_to=())
    r = post(client, bundle("transaction", entry("PUT", "Patient?family=Smith", patient("c"))))
    assert r.status_code == 412
    assert r.get_json()["issue"][0]["code"] == "multiple-matches"
    assert expressions(r) == ["Bundle.entry[0].request.url"]


def test_if_none_exist_finds_the_match_and_references_point_at_it(app, client):
    existing = the_store(app).create(patient("7"), deliver_to=())
    tx = bundle(
        "transaction",
        entry("POST", "Patient", patient("7"), PATIENT_URN, ifNoneExist=f"identifier={SYS}|7"),
        entry("POST", "Observation", observation(PATIENT_URN)),
    )
    r = post(client, tx)
    assert statuses(r) == ["200 OK", "201 Created"]
    assert r.get_json()["entry"][0]["response"]["location"] == f"Patient/{existing.id}/_history/1"
    assert r.get_json()["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{existing.id}"
    assert the_store(app).count("Patient") == 1


def test_conditional_delete_and_conditional_reference(app, client):
    st = the_store(app)
    doomed = st.create(patient("d"), deliver_to=())
    target = st.create(patient("t"), deliver_to=())
    tx = bundle(
        "transaction",
        entry("DELETE", f"Patient?identifier={SYS}|d"),
        entry("DELETE", f"Patient?identifier={SYS}|nobody"),
        entry("POST", "Observation", observation(f"Patient?identifier={SYS}|t")),
    )
    r = post(client, tx)
    assert statuses(r) == ["204 No Content", "204 No Content", "201 Created"]
    assert r.get_json()["entry"][2]["resource"]["subject"]["reference"] == f"Patient/{target.id}"
    assert st.count("Patient") == 1 and st.history("Patient", doomed.id).entries[0].deleted


def test_conditional_reference_matching_nothing_fails(app, client):
    r = post(client, bundle("transaction", entry("POST", "Observation", observation(f"Patient?identifier={SYS}|none"))))
    assert r.status_code == 400
    assert expressions(r) == ["Bundle.entry[0].resource.subject.reference"]


def test_a_failing_reference_deep_in_a_resource_is_located_after_the_ones_rewritten(app, client):
    target = the_store(app).create(patient("t"), deliver_to=())
    performers = [{"reference": f"Patient?identifier={SYS}|t"}, {"reference": PATIENT_URN}, {"reference": f"Patient?identifier={SYS}|none"}]
    tx = bundle("transaction", entry("POST", "Patient", patient(), PATIENT_URN), entry("POST", "Observation", {**observation(PATIENT_URN), "performer": performers}))
    r = post(client, tx)
    assert r.status_code == 400
    assert expressions(r) == ["Bundle.entry[1].resource.performer[2].reference"]
    performers.pop()
    r = post(client, tx)
    assert r.status_code == 200
    written = r.get_json()["entry"][1]["resource"]
    assert [p["reference"] for p in written["performer"]] == [f"Patient/{target.id}", written["subject"]["reference"]]


@pytest.mark.parametrize(
    "value",
    [
        {"resourceType": "DetectedIssue", "reference": "urn:uuid:1", "implicated": [{"reference": "Patient/1"}]},
        {"a": [[{"reference": "x"}, {"reference": 5}], {"b": {"reference": "y", "c": [{"reference": "z"}]}}]},
        [{"reference": "x"}, "text", None, [{"reference": "y"}]],
        {"reference": None, "display": "no reference"},
        "not a container",
    ],
)
def test_reference_elements_are_the_references_without_paths(value):
    assert [id(ref) for ref in reference_elements(value)] == [id(ref) for ref, _ in references(value)]


def test_unknown_urns_are_each_located(app, client):
    unknown = [{"reference": "urn:uuid:0000-a"}, {"reference": PATIENT_URN}, {"reference": "urn:oid:1.2.3"}]
    tx = bundle("transaction", entry("POST", "Patient", patient(), PATIENT_URN), entry("POST", "Observation", {**observation(PATIENT_URN), "performer": unknown}))
    r = post(client, tx)
    assert r.status_code == 400
    assert expressions(r) == ["Bundle.entry[1].resource.performer[0].reference", "Bundle.entry[1].resource.performer[2].reference"]


def test_two_entries_changing_one_resource_is_a_400(app, client):
    r = post(client, bundle("transaction", entry("PUT", "Patient/p1", patient("1", id="p1")), entry("DELETE", "Patient/p1")))
    assert r.status_code == 400
    assert r.get_json()["issue"][0]["code"] == "duplicate"
    assert versions(app) == 0


def test_duplicate_full_urls_are_a_400(client):
    r = post(client, bundle("transaction", entry("POST", "Patient", patient("1"), PATIENT_URN), entry("POST", "Patient", patient("2"), PATIENT_URN)))
    assert r.status_code == 400
    assert expressions(r) == ["Bundle.entry[1].fullUrl"]


def test_patch_entry_applies_a_json_patch(app, client):
    existing = the_store(app).create(patient("p"), deliver_to=())
    ops = [{"op": "replace", "path": "/gender", "value": "male"}]
    binary = {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": base64.b64encode(json.dumps(ops).encode()).decode()}
    r = post(client, bundle("transaction", entry("PATCH", f"Patient/{existing.id}", binary, ifMatch='W/"1"')))
    assert r.status_code == 200
    assert statuses(r) == ["200 OK"]
    assert r.get_json()["entry"][0]["resource"]["gender"] == "male"
    assert the_store(app).read("Patient", existing.id).version == 2


def test_patch_giving_an_invalid_resource_is_a_422(app, client):
    existing = the_store(app).create(patient("p"), deliver_to=())
    ops = [{"op": "replace", "path": "/gender", "value": "nope"}]
    binary = {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": base64.b64encode(json.dumps(ops).encode()).decode()}
    r = post(client, bundle("transaction", entry("PATCH", f"Patient/{existing.id}", binary)))
    assert r.status_code == 422
    assert expressions(r) == ["Bundle.entry[0].resource.gender"]


def test_prefer_minimal_and_operation_outcome(client):
    r = post(client, bundle("transaction", entry("POST", "Patient", patient("m"))), Prefer="return=minimal")
    only = r.get_json()["entry"][0]
    assert set(only) == {"response"} and only["response"]["status"] == "201 Created"
    r = post(client, bundle("transaction", entry("POST", "Patient", patient("o"))), Prefer="return=OperationOutcome")
    outcome = r.get_json()["entry"][0]["response"]["outcome"]
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "information"


def test_reposting_a_record_bundle_writes_nothing_new(app, client, example_record):
    tx = record_to_bundle(example_record)
    first = post(client, tx)
    assert first.status_code == 200
    assert set(statuses(first)) == {"201 Created"}
    written = versions(app)
    assert written == len(tx["entry"])
    again = post(client, record_to_bundle(example_record))
    assert set(statuses(again)) == {"200 OK"}
    assert {e["response"]["etag"] for e in again.get_json()["entry"]} == {'W/"1"'}
    assert versions(app) == written


def test_xml_transaction(app, client):
    tx = bundle("transaction", entry("POST", "Patient", patient(), PATIENT_URN), entry("POST", "Observation", observation(PATIENT_URN)))
    r = client.post("/fhir", data=fhir_xml.to_xml(tx), headers={"Content-Type": FHIR_XML, "Accept": FHIR_XML})
    assert r.status_code == 200
    assert r.headers["Content-Type"] == f"{FHIR_XML}; charset=utf-8"
    answer = fhir_xml.from_xml(r.data)
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created", "201 Created"]
    assert answer["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{answer['entry'][0]['resource']['id']}"


def test_xml_transaction_failure_is_an_xml_operation_outcome(app, client):
    tx = bundle("transaction", entry("POST", "Patient", patient(gender="bogus")))
    r = client.post("/fhir?_format=xml", data=fhir_xml.to_xml(tx), headers={"Content-Type": FHIR_XML})
    assert r.status_code == 422
    outcome = fhir_xml.from_xml(r.data)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[0].resource.gender"]
    assert versions(app) == 0


# --- batches ---------------------------------------------------------------------------------


def test_batch_entries_are_independent(app, client):
    r = post(
        client,
        bundle(
            "batch",
            entry("POST", "Patient", patient("ok")),
            entry("POST", "Patient", patient("bad", gender="bogus")),
            entry("GET", "Patient/missing"),
            entry("DELETE", "Patient/missing"),
            entry("POST", "Observation", observation(PATIENT_URN)),
            entry("FOO", "Patient"),
        ),
    )
    assert r.status_code == 200
    body = r.get_json()
    assert body["type"] == "batch-response"
    assert statuses(r) == ["201 Created", "422 Unprocessable Entity", "404 Not Found", "204 No Content", "400 Bad Request", "400 Bad Request"]
    outcomes = [e["response"].get("outcome") for e in body["entry"]]
    assert outcomes[0] is None and outcomes[3] is None
    assert outcomes[1]["issue"][0]["expression"] == ["Bundle.entry[1].resource.gender"]
    assert outcomes[2]["issue"][0]["expression"] == ["Bundle.entry[2].request.url"]
    assert outcomes[4]["issue"][0]["expression"] == ["Bundle.entry[4].resource.subject.reference"]
    assert outcomes[5]["issue"][0]["expression"] == ["Bundle.entry[5].request.method"]
    assert the_store(app).count("Patient") == 1


def test_batch_reads_and_searches(app, client):
    st = the_store(app)
    first = st.create(patient("r1"), deliver_to=())
    st.update("Patient", first.id, patient("r1", id=first.id, gender="male"), deliver_to=())
    for mrn in ("r2", "r3"):
        st.create(patient(mrn), deliver_to=())
    r = post(
        client,
        bundle(
            "batch",
            entry("GET", f"Patient/{first.id}"),
            entry("GET", f"Patient/{first.id}/_history/1"),
            entry("GET", "Patient?_count=2"),
            entry("HEAD", f"Patient/{first.id}"),
            entry("GET", "Patient?_count=abc"),
        ),
    )
    read, vread, search, head, bad = r.get_json()["entry"]
    assert read["resource"]["gender"] == "male" and read["response"]["etag"] == 'W/"2"'
    assert vread["resource"]["gender"] == "female" and vread["response"]["location"] == f"Patient/{first.id}/_history/1"
    page = search["resource"]
    assert page["type"] == "searchset" and len(page["entry"]) == 2
    assert [link["relation"] for link in page["link"]] == ["self", "next"]
    assert "_cursor=" in page["link"][1]["url"]
    assert "resource" not in head and head["response"]["status"] == "200 OK"
    assert bad["response"]["status"] == "400 Bad Request"
    assert bad["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[4].request.url"]


# --- what cannot be processed ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ({"resourceType": "Bundle", "type": "collection"}, "Bundle.type"),
        ({"resourceType": "Bundle", "type": "searchset"}, "Bundle.type"),
        ({"resourceType": "Patient", "gender": "male"}, "resourceType"),
    ],
)
def test_only_batch_and_transaction_are_processed(client, document, where):
    r = post(client, document)
    assert r.status_code == 400
    assert expressions(r) == [where]


@pytest.mark.parametrize(
    ("bad_entry", "where"),
    [
        ({"resource": {"resourceType": "Patient"}}, "Bundle.entry[0].request"),
        (entry("POST", "Patient/123", patient()), "Bundle.entry[0].request.url"),
        (entry("PUT", "Patient", patient()), "Bundle.entry[0].request.url"),
        (entry("POST", "NoSuchType", patient()), "Bundle.entry[0].request.url"),
        (entry("POST", "Observation", patient()), "Bundle.entry[0].resource.resourceType"),
        (entry("POST", "Patient"), "Bundle.entry[0].resource"),
        (entry("PUT", "Patient/p1", patient(), ifMatch="seven"), "Bundle.entry[0].request.ifMatch"),
        (entry("POST", "https://elsewhere.example/fhir/Patient", patient()), "Bundle.entry[0].request.url"),
    ],
)
def test_malformed_entries_are_a_400_at_the_entry(app, client, bad_entry, where):
    r = post(client, bundle("transaction", bad_entry))
    assert r.status_code == 400
    assert where in expressions(r)
    assert versions(app) == 0


def test_absolute_urls_under_this_server_are_accepted(client):
    r = post(client, bundle("transaction", entry("POST", "http://localhost/fhir/Patient", patient())))
    assert statuses(r) == ["201 Created"]


def test_empty_transaction_answers_an_empty_response(client):
    r = post(client, {"resourceType": "Bundle", "type": "transaction"})
    assert r.status_code == 200
    assert r.get_json()["type"] == "transaction-response" and "entry" not in r.get_json()


def test_base_with_trailing_slash(client):
    r = client.post("/fhir/", data=json.dumps(bundle("batch", entry("POST", "Patient", patient()))), headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 200 and statuses(r) == ["201 Created"]
