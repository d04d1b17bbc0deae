"""``GET /iop/records/{id}/discharge`` and ``/reconciliation``: the discharge package's state per
destination, and the intake medication reconciliation after a pull."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.api import DESTINATIONS_KEY, STORE_KEY
from iop_fhir.store import Store
from iop_fhir.sync.pull import pull

JSON = dict[str, Any]
EXAMPLE_ID = "ep-2026-0042"
EHR_BASE = "http://ehr.example/fhir"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
MRN = "https://iop-fhir.org/fhir/sid/riverbend-iop/mrn|RB-100042"
SECRET = "a-development-secret-of-32-bytes-or-more"
DESTINATIONS = [
    {"name": "lakeside", "kind": "fhir", "base_url": "http://lakeside.example/fhir", "aftercare_providers": ["http://hl7.org/fhir/sid/us-npi|1932102084"]},
    {"name": "ehr", "kind": "fhir", "base_url": EHR_BASE, "resources": ["MedicationRequest"]},
]


@pytest.fixture
def app(make_app) -> Flask:
    return make_app(destination=DESTINATIONS)


def the_store(app: Flask) -> Store:
    return app.extensions[STORE_KEY]


def without_discharge(record: JSON) -> JSON:
    out = copy.deepcopy(record)
    del out["discharge"]
    out["enrolment"]["status"] = "active"
    out["enrolment"].pop("actual_end", None)
    return out


# --- discharge ---------------------------------------------------------------------------------


def test_the_discharge_package_is_pending_for_the_aftercare_destination(app: Flask, client: FlaskClient, example_json: JSON) -> None:
    assert client.post("/iop/records", json=example_json).status_code == 201
    r = client.get(f"/iop/records/{EXAMPLE_ID}/discharge")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    body = r.get_json()
    assert body["record"] == EXAMPLE_ID and body["state"] == "pending"
    assert body["package"]["reference"].startswith("Bundle/") and body["package"]["version"] == 1
    (lakeside,) = body["destinations"]  # the EHR does not serve the aftercare provider
    assert (lakeside["destination"], lakeside["state"], lakeside["delivery_state"], lakeside["attempts"]) == ("lakeside", "pending", "queued", 0)
    # posting the same record again queues nothing more
    assert client.post("/iop/records", json=example_json).status_code == 200
    again = client.get(f"/iop/records/{EXAMPLE_ID}/discharge").get_json()
    assert again["package"]["version"] == 1 and len(again["destinations"]) == 1
    bundle_id = body["package"]["reference"].split("/")[1]
    assert len(the_store(app).outbox.list(resource=("Bundle", bundle_id))) == 1


def test_delivered_reads_as_delivered(app: Flask, client: FlaskClient, example_json: JSON) -> None:
    client.post("/iop/records", json=example_json)
    outbox = the_store(app).outbox
    # lakeside takes every change of the record too (no filter), the package among them
    claimed = outbox.claim("worker-1", destination="lakeside", limit=500)
    assert "Bundle" in {d.resource_type for d in claimed}
    outbox.delivered("worker-1", [d.id for d in claimed])
    body = client.get(f"/iop/records/{EXAMPLE_ID}/discharge").get_json()
    assert body["state"] == "delivered" and body["destinations"][0]["delivered_at"].endswith("Z")


def test_no_discharge_is_404(client: FlaskClient, example_json: JSON) -> None:
    client.post("/iop/records", json=without_discharge(example_json))
    r = client.get(f"/iop/records/{EXAMPLE_ID}/discharge")
    assert r.status_code == 404 and r.get_json()["resourceType"] == "OperationOutcome"
    assert "has no discharge" in r.get_json()["issue"][0]["diagnostics"]
    assert client.get("/iop/records/no-such-record/discharge").status_code == 404


def test_no_serving_destination_is_no_destination(make_app, example_json: JSON) -> None:
    client = make_app(destination=DESTINATIONS[1:]).test_client()
    client.post("/iop/records", json=example_json)
    body = client.get(f"/iop/records/{EXAMPLE_ID}/discharge").get_json()
    assert (body["state"], body["destinations"]) == ("no-destination", [])


# --- reconciliation ------------------------------------------------------------------------------


class Ehr:
    """What the EHR returns per type for our patient (found by its MRN), as FhirClient.search yields."""

    def __init__(self, resources: list[JSON]) -> None:
        self.resources = resources

    def search(self, resource_type: str, params: list[tuple[str, str]]) -> Iterator[JSON]:
        if resource_type == "Patient":
            yield {"resourceType": "Patient", "id": "p-77"} if dict(params)["identifier"] == MRN else {}
            return
        yield from (copy.deepcopy(r) for r in self.resources if r["resourceType"] == resource_type)


def outside(resource_type: str, fid: str, updated: str, **elements: Any) -> JSON:
    return {"resourceType": resource_type, "id": fid, "meta": {"versionId": "1", "lastUpdated": updated}, "subject": {"reference": "Patient/p-77"}, **elements}


def lisinopril(**more: Any) -> JSON:
    return {"medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "314076", "display": "lisinopril 10 MG Oral Tablet"}]}, **more}


def test_the_reconciliation_shows_ours_beside_the_outside_medications(app: Flask, client: FlaskClient, example_json: JSON) -> None:
    client.post("/iop/records", json=example_json)
    store = the_store(app)
    (rx2,) = store.search("MedicationRequest", [("identifier", "https://iop-fhir.org/fhir/sid/riverbend-iop/prescription|ep-2026-0042/rx-2")]).entries
    echo = {k: v for k, v in rx2.resource.items() if k not in ("id", "meta", "subject", "requester")}
    ehr = Ehr(
        [
            outside("MedicationRequest", "mr-1", "2026-02-01T09:00:00Z", status="active", intent="order", authoredOn="2025-10-30", **lisinopril()),
            outside(
                "MedicationDispense", "md-1", "2026-02-02T09:00:00Z", status="completed", whenHandedOver="2026-02-02T09:30:00Z",
                authorizingPrescription=[{"reference": "MedicationRequest/mr-1"}], **lisinopril(),
            ),
            outside("MedicationStatement", "ms-1", "2026-02-01T10:00:00Z", status="active", medicationCodeableConcept={"text": "fish oil"}),
            outside(
                "MedicationDispense", "md-2", "2026-02-03T09:00:00Z", status="completed", whenHandedOver="2026-02-03T09:00:00Z",
                medicationCodeableConcept={"coding": [{"system": RXNORM, "code": "197591", "display": "diazepam 5 MG Oral Tablet"}]},
            ),
            outside("MedicationRequest", "ehr-rx-2", "2026-02-06T10:00:00Z", **(echo | {"status": "on-hold"})),
        ]
    )
    result = pull(store, app.extensions[DESTINATIONS_KEY]["ehr"], ehr)
    assert result.conflicts == 1 and result.stored == 4
    r = client.get(f"/iop/records/{EXAMPLE_ID}/reconciliation")
    assert r.status_code == 200
    body = r.get_json()
    assert body["record"] == EXAMPLE_ID and body["patient"] == rx2.resource["subject"]["reference"]
    ours = {p["id"]: p for p in body["prescriptions"]}
    assert sorted(ours) == ["rx-1", "rx-2", "rx-3", "rx-4"]
    assert ours["rx-2"]["medication"] == {"rxnorm": "312941", "display": "sertraline 50 MG Oral Tablet"}
    assert (ours["rx-2"]["status"], ours["rx-2"]["dose"]) == ("active", "Take 2 tablets by mouth every morning.")
    lines = {line["source_url"]: line for line in body["outside_medications"]}
    assert set(lines) == {f"{EHR_BASE}/MedicationRequest/mr-1", f"{EHR_BASE}/MedicationStatement/ms-1", f"{EHR_BASE}/MedicationDispense/md-2"}
    order = lines[f"{EHR_BASE}/MedicationRequest/mr-1"]
    assert order["source"] == "ehr" and order["medication"]["rxnorm"] == "314076" and order["status"] == "active"
    assert order["dates"] == {"authoredOn": "2025-10-30"} and order["last_fill"] == "2026-02-02T09:30:00Z"
    # no RxNorm: listed as the EHR named it, and said
    assert lines[f"{EHR_BASE}/MedicationStatement/ms-1"]["medication"] == {"text": "fish oil"}
    assert any("RxNorm" in issue["message"] and issue["location"].startswith("MedicationStatement/") for issue in body["issues"])
    # a fill no order stands behind is listed on its own
    assert lines[f"{EHR_BASE}/MedicationDispense/md-2"]["last_fill"] == "2026-02-03T09:00:00Z"
    (conflict,) = body["conflicts"]
    assert conflict["focus"] == rx2.reference and conflict["source"] == "ehr" and conflict["status"] == "requested"
    assert conflict["source_url"] == f"{EHR_BASE}/MedicationRequest/ehr-rx-2" and "status" in conflict["description"]


def test_the_reconciliation_of_an_unknown_record_is_404(client: FlaskClient) -> None:
    assert client.get("/iop/records/no-such-record/reconciliation").status_code == 404


def token(scope: str) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "app-1", "client_id": "app-1", "scope": scope, "iat": now, "exp": now + 300}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


def test_the_views_need_read_scopes_on_what_they_show(make_app, example_json: JSON) -> None:
    client = make_app(AUTH="on", JWT_SECRET=SECRET, destination=DESTINATIONS).test_client()
    assert client.post("/iop/records", json=example_json, headers=token("system/*.cruds")).status_code == 201
    records = " ".join(f"system/{t}.rs" for t in (
        "CarePlan", "CareTeam", "Condition", "Consent", "Encounter", "EpisodeOfCare", "Goal", "MedicationRequest",
        "Observation", "Organization", "Patient", "Practitioner", "PractitionerRole", "Provenance", "Task",
    ))  # fmt: skip
    r = client.get(f"/iop/records/{EXAMPLE_ID}/reconciliation", headers=token(records))
    assert r.status_code == 403 and "MedicationStatement" in r.headers["WWW-Authenticate"]
    outside = f"{records} system/MedicationStatement.r system/MedicationDispense.r"
    assert client.get(f"/iop/records/{EXAMPLE_ID}/reconciliation", headers=token(outside)).status_code == 200
    assert client.get(f"/iop/records/{EXAMPLE_ID}/discharge", headers=token(records)).status_code == 403
    assert client.get(f"/iop/records/{EXAMPLE_ID}/discharge", headers=token(f"{records} system/Bundle.r")).status_code == 200
