"""IOP record endpoints: POST one or many (all or none), 422 with pointers, GET rebuilt equal,
PUT writing only what changed, the schema."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.api import STORE_KEY
from iop_fhir.formats import fhir_json
from iop_fhir.generate import generate_record
from iop_fhir.mappers.bundle import record_to_bundle
from iop_fhir.record import record_json_schema, validate_record
from iop_fhir.server import create_app
from iop_fhir.store import Store

EXAMPLE_ID = "ep-2026-0042"
# Ten generated records of three programs, on the small side to keep the suite quick.
COHORT = (2, 4, 7, 10, 12, 13, 14, 15, 16, 19)


def the_store(app: Flask) -> Store:
    return app.extensions[STORE_KEY]


def versions(app: Flask) -> int:
    return the_store(app).history(count=1, total=True).total or 0


def outcomes(response) -> dict[str, list[str]]:
    """References by outcome, over every record of a POST/PUT answer."""
    out: dict[str, list[str]] = {}
    for record in response.get_json()["records"]:
        for item in record["resources"]:
            out.setdefault(item["outcome"], []).append(item["reference"])
    return out


def expressions(response) -> list[str]:
    return [x for issue in response.get_json()["issue"] for x in issue.get("expression", [])]


# --- POST ----------------------------------------------------------------------------------------


def test_post_one_record(app, client, example_json, example_record):
    r = client.post("/iop/records", json=example_json)
    assert r.status_code == 201
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Location"] == f"/iop/records/{EXAMPLE_ID}"
    body = r.get_json()
    assert [rec["id"] for rec in body["records"]] == [EXAMPLE_ID]
    resources = body["records"][0]["resources"]
    tx = record_to_bundle(example_record)
    assert [item["reference"] for item in resources] == [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in tx["entry"]]
    assert {(item["version"], item["outcome"]) for item in resources} == {(1, "created")}
    assert versions(app) == len(tx["entry"]) + 1  # and the discharge package (sync/discharge.py)


def test_reposting_a_record_writes_nothing(app, client, example_json):
    client.post("/iop/records", json=example_json)
    written = versions(app)
    again = client.post("/iop/records", json=example_json)
    assert again.status_code == 200
    assert set(outcomes(again)) == {"unchanged"}
    assert versions(app) == written


def test_post_a_list_in_one_unit(app, client):
    records = [generate_record(i, 7) for i in (4, 12)]
    r = client.post("/iop/records", json=records)
    assert r.status_code == 201
    assert "Location" not in r.headers
    assert [rec["id"] for rec in r.get_json()["records"]] == ["ep-000004", "ep-000012"]
    assert the_store(app).count("EpisodeOfCare") == 2


def test_every_violation_is_reported_with_its_pointer(app, client, example_json):
    bad = copy.deepcopy(example_json)
    bad["prescriptions"][1]["prescriber_id"] = "nobody"
    bad["prescriptions"][2]["pharmacy_id"] = "nowhere"
    bad["adherence"][0]["prescription_id"] = "rx-99"
    r = client.post("/iop/records", json=bad)
    assert r.status_code == 422
    assert r.get_json()["resourceType"] == "OperationOutcome"
    assert sorted(expressions(r)) == ["/adherence/0/prescription_id", "/prescriptions/1/prescriber_id", "/prescriptions/2/pharmacy_id"]
    assert versions(app) == 0


def test_violations_in_a_list_carry_the_item_index_and_nothing_is_stored(app, client, example_json):
    shape = copy.deepcopy(example_json)
    shape["prescriptions"][0]["refills"] = -1
    shape["client"]["birth_date"] = "1988-02-30"
    records = [generate_record(4, 7), shape, generate_record(12, 7), "not a record"]
    r = client.post("/iop/records", json=records)
    assert r.status_code == 422
    assert expressions(r) == ["/1/client/birth_date", "/1/prescriptions/0/refills", "/3"]
    assert versions(app) == 0


def test_a_record_twice_in_one_list_is_refused(client, example_json):
    r = client.post("/iop/records", json=[example_json, example_json])
    assert r.status_code == 422 and expressions(r) == ["/1/id"]


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b"{", "application/json", 400),
        (b"[]", "application/json", 400),
        (b"<record/>", "application/xml", 415),
        (b"42", "application/json", 422),
    ],
)
def test_bodies_that_are_not_records(client, data, content_type, status):
    r = client.post("/iop/records", data=data, content_type=content_type)
    assert r.status_code == status
    assert r.get_json()["resourceType"] == "OperationOutcome"


def test_the_same_clinicians_and_pharmacy_in_two_programs(client, example_json, example_record):
    """One NPI / NCPDP ID recorded by two programs: each program keeps its own party resources
    (the business key is the program's identifier; NPIs stay searchable, not unique)."""
    other = copy.deepcopy(example_json)
    other["program"]["id"] = "another-iop"
    assert client.post("/iop/records", json=example_json).status_code == 201
    assert client.post("/iop/records", json=other).status_code == 201
    first = client.get(f"/iop/records/{EXAMPLE_ID}?system=https://iop-fhir.org/fhir/sid/riverbend-iop/episode")
    second = client.get(f"/iop/records/{EXAMPLE_ID}?system=https://iop-fhir.org/fhir/sid/another-iop/episode")
    assert validate_record(first.get_json()) == example_record
    assert validate_record(second.get_json()) == validate_record(other)
    npi = example_json["care_team"][0]["npi"]
    found = client.get(f"/fhir/Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|{npi}").get_json()
    assert found["total"] == 2


# --- GET -----------------------------------------------------------------------------------------


def test_get_rebuilds_the_example_equal(client, example_json, example_record):
    client.post("/iop/records", json=example_json)
    r = client.get(f"/iop/records/{EXAMPLE_ID}")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert "X-IOP-Mapping-Warnings" not in r.headers
    assert validate_record(r.get_json()) == example_record


@pytest.fixture(scope="module")
def cohort_client(tmp_path_factory) -> Iterator[FlaskClient]:
    """One app for the module's cohort tests: ten generated records posted in one request."""
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path_factory.mktemp('cohort') / 'gateway.sqlite'}", "AUTH": "off"})
    client = app.test_client()
    r = client.post("/iop/records", json=[generate_record(i, 7) for i in COHORT])
    assert r.status_code == 201, r.get_json()
    yield client
    the_store(app).close()


@pytest.mark.parametrize("index", COHORT)
def test_get_rebuilds_generated_records_equal(cohort_client, index):
    original = validate_record(generate_record(index, 7))
    r = cohort_client.get(f"/iop/records/{original.id}")
    assert r.status_code == 200, r.get_json()
    assert validate_record(r.get_json()) == original


def test_get_without_the_provenance_gathers_by_scope(client, example_record):
    tx = record_to_bundle(example_record)
    tx["entry"] = [e for e in tx["entry"] if e["resource"]["resourceType"] != "Provenance"]
    r = client.post("/fhir", data=fhir_json.dumps(tx), headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal"})
    assert r.status_code == 200
    r = client.get(f"/iop/records/{EXAMPLE_ID}")
    assert r.status_code == 200
    assert validate_record(r.get_json()) == example_record


def test_get_unknown_record_is_404(client):
    assert client.get("/iop/records/ep-nobody").status_code == 404
    assert client.get("/iop/records/not%20an%20id").status_code == 404


def test_one_id_in_two_programs_is_a_409_until_a_system_is_named(client):
    first, second = generate_record(4, 7), generate_record(12, 7)
    assert first["program"]["id"] != second["program"]["id"]
    first["id"] = second["id"] = "ep-shared"
    assert client.post("/iop/records", json=[first, second]).status_code == 201
    r = client.get("/iop/records/ep-shared")
    assert r.status_code == 409
    systems = [f"https://iop-fhir.org/fhir/sid/{rec['program']['id']}/episode" for rec in (first, second)]
    assert sorted(i["diagnostics"].split(" in ")[1].split(";")[0] for i in r.get_json()["issue"]) == sorted(systems)
    for record, system in zip((first, second), systems, strict=True):
        chosen = client.get("/iop/records/ep-shared", query_string={"system": system.removesuffix("/episode")})
        assert chosen.status_code == 200
        assert validate_record(chosen.get_json()) == validate_record(record)


def test_stored_data_that_no_longer_makes_a_record_is_a_409(app, client, example_json, example_record):
    client.post("/iop/records", json=example_json)
    rx1 = next(e["resource"]["id"] for e in record_to_bundle(example_record)["entry"] if e["request"]["url"].endswith("prescription|ep-2026-0042/rx-1"))
    the_store(app).delete("MedicationRequest", rx1, deliver_to=())  # reviews and rx-2 still point at it
    r = client.get(f"/iop/records/{EXAMPLE_ID}")
    assert r.status_code == 409
    issues = r.get_json()["issue"]
    assert issues[0]["code"] == "conflict"
    assert len(issues) > 1 and all(i["severity"] in ("error", "warning") for i in issues)


# --- PUT -----------------------------------------------------------------------------------------


def test_put_the_same_record_writes_nothing(app, client, example_json):
    assert client.put(f"/iop/records/{EXAMPLE_ID}", json=example_json).status_code == 201
    written = versions(app)
    r = client.put(f"/iop/records/{EXAMPLE_ID}", json=example_json)
    assert r.status_code == 200
    assert set(outcomes(r)) == {"unchanged"}
    assert versions(app) == written


def test_put_a_change_writes_only_what_changed(app, client, example_json, example_record):
    client.put(f"/iop/records/{EXAMPLE_ID}", json=example_json)
    written = versions(app)
    changed = copy.deepcopy(example_json)
    changed["prescriptions"][0]["instructions"] = "Take 1 tablet by mouth every morning with food."
    r = client.put(f"/iop/records/{EXAMPLE_ID}", json=changed)
    assert r.status_code == 200
    rx1 = next(e["resource"]["id"] for e in record_to_bundle(example_record)["entry"] if e["request"]["url"].endswith("prescription|ep-2026-0042/rx-1"))
    result = outcomes(r)
    assert result["updated"] == [f"MedicationRequest/{rx1}"]  # the Provenance stays: no later event, no new resource
    assert set(result) == {"updated", "unchanged"}
    assert versions(app) == written + 2  # rx-1, and the discharge package that carries it
    assert the_store(app).read("MedicationRequest", rx1).version == 2
    assert validate_record(client.get(f"/iop/records/{EXAMPLE_ID}").get_json()) == validate_record(changed)


def test_put_without_an_item_deletes_its_resource(app, client, example_json, example_record):
    client.put(f"/iop/records/{EXAMPLE_ID}", json=example_json)
    shorter = copy.deepcopy(example_json)
    assert shorter["vitals"][0]["id"] == "vt-1"
    del shorter["vitals"][0]
    r = client.put(f"/iop/records/{EXAMPLE_ID}", json=shorter)
    vt1 = next(e["resource"]["id"] for e in record_to_bundle(example_record)["entry"] if e["request"]["url"].endswith("vital|ep-2026-0042/vt-1"))
    result = outcomes(r)
    assert result["deleted"] == [f"Observation/{vt1}"]
    assert [ref.split("/")[0] for ref in result["updated"]] == ["Provenance"]  # its targets changed
    assert validate_record(client.get(f"/iop/records/{EXAMPLE_ID}").get_json()) == validate_record(shorter)


def test_put_with_another_id_is_a_400(client, example_json):
    r = client.put("/iop/records/ep-other", json=example_json)
    assert r.status_code == 400 and expressions(r) == ["/id"]
    r = client.put(f"/iop/records/{EXAMPLE_ID}", json=[example_json])
    assert r.status_code == 400


# --- schema --------------------------------------------------------------------------------------


def test_schema(client):
    r = client.get("/iop/schema")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/schema+json"
    assert json.loads(r.data) == record_json_schema()
