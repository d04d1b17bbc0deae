"""patient/ scopes confined to the token's patient's compartment, interaction by interaction.

Two patients (p1, the token's; p2, someone else) with their records, a clinician and a
clinic; each rule is tried from a p1 app both ways: inside the compartment it works, outside
it is a 403 (or, for pages, left out) and nothing is stored.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from test_api_auth import SECRET, bearer, hs256
from test_api_fhir_support import FHIR_JSON, versions

from iop_fhir.api import STORE_KEY
from iop_fhir.api.auth import (
    COMPARTMENT_TYPES,
    DIRECTORY_TYPES,
    Client,
    Confinement,
    Need,
    classify,
    compartment_patients,
    confine,
)
from iop_fhir.store import Store
from iop_fhir.store.search_index import PARAMETERS, index_rows, patient_key

JSON = dict[str, Any]
SYS = "https://clinic.example/obs"
LOINC = "http://loinc.org"


def observation(id: str | None, patient: str | None, value: str = "1", *, focus: list[str] = ()) -> JSON:
    resource: JSON = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "44249-1"}]},
        "valueString": value,
    }
    if id is not None:
        resource["id"] = id
        resource["identifier"] = [{"system": SYS, "value": id}]
    if patient is not None:
        resource["subject"] = {"reference": f"Patient/{patient}"}
    if focus:
        resource["focus"] = [{"reference": r} for r in focus]
    return resource


def medication_request(id: str, patient: str) -> JSON:
    return {
        "resourceType": "MedicationRequest",
        "id": id,
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"text": "sertraline 50 mg tablet"},
        "subject": {"reference": f"Patient/{patient}"},
        "requester": {"reference": "Practitioner/dr1"},
    }


def provenance(id: str, *patients: str) -> JSON:
    return {
        "resourceType": "Provenance",
        "id": id,
        "target": [{"reference": f"Patient/{p}"} for p in patients],
        "recorded": "2026-01-15T10:00:00Z",
        "agent": [{"who": {"reference": "Organization/clinic"}}],
    }


SEED: list[JSON] = [
    {"resourceType": "Patient", "id": "p1", "name": [{"family": "Alvarez"}]},
    {"resourceType": "Patient", "id": "p2", "name": [{"family": "Alvarado"}]},
    {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Okafor"}]},
    {"resourceType": "Organization", "id": "clinic", "name": "Riverbend IOP"},
    medication_request("m1", "p1"),
    medication_request("m2", "p2"),
    observation("o1", "p1", focus=["MedicationRequest/m1", "MedicationRequest/m2"]),
    observation("o2", "p2", focus=["MedicationRequest/m1"]),
    observation("o-none", None),
    provenance("both", "p1", "p2"),
]


@pytest.fixture
def app(make_app) -> Flask:
    app = make_app(AUTH="on", JWT_SECRET=SECRET)
    store: Store = app.extensions[STORE_KEY]
    for resource in SEED:
        store.update(resource["resourceType"], resource["id"], resource)
    return app


@pytest.fixture
def api(app: Flask) -> FlaskClient:
    return app.test_client()


def as_p1(scope: str = "patient/*.cruds") -> dict[str, str]:
    return {**bearer(hs256(scope, patient="p1")), "Content-Type": FHIR_JSON}


SYSTEM = bearer(hs256("system/*.cruds"))


def refusal(response) -> str:
    assert response.status_code == 403, response.get_data(as_text=True)
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "forbidden"
    return body["issue"][0]["diagnostics"]


def ids(bundle: JSON, mode: str | None = None) -> set[str]:
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", ())
        if "resource" in e and e["resource"]["resourceType"] != "OperationOutcome" and mode in (None, e["search"]["mode"])
    }


def current_version(api: FlaskClient, reference: str) -> str:
    return api.get(f"/fhir/{reference}", headers=SYSTEM).get_json()["meta"]["versionId"]


# --- which resources a patient's compartment holds ------------------------------------------------


def test_compartment_of_each_kind_of_resource() -> None:
    assert compartment_patients("Patient", {"id": "p1"}) == {"p1"}
    assert compartment_patients("Observation", observation("o", "p1")) == {"p1"}
    assert compartment_patients("Observation", observation("o", None)) == frozenset()
    assert compartment_patients("Provenance", provenance("x", "p1", "p2")) == {"p1", "p2"}
    assert compartment_patients("EpisodeOfCare", {"patient": {"reference": "https://ehr.example/fhir/Patient/p3"}}) == {"p3"}
    # a subject that is not a Patient puts the resource in no patient's compartment
    assert compartment_patients("Observation", {"subject": {"reference": "Group/g1"}}) == frozenset()
    assert compartment_patients("Practitioner", {"id": "dr1"}) == frozenset()


_IDS = st.from_regex(r"[A-Za-z0-9\-.]{1,20}", fullmatch=True)


@given(st.lists(_IDS, max_size=4), st.lists(_IDS, max_size=3))
def test_compartment_follows_the_store_index(patients: list[str], groups: list[str]) -> None:
    """What ``patient=`` finds is the compartment, and the outbox's patient key is one of it."""
    targets = [f"Patient/{p}" for p in patients] + [f"Group/{g}" for g in groups]
    resource = {"resourceType": "Provenance", "id": "x", "target": [{"reference": t} for t in targets]}
    found = compartment_patients("Provenance", resource)
    assert found == set(patients)
    key = patient_key("Provenance", "x", index_rows("Provenance", "x", resource))
    assert (key is None) == (not patients)
    assert key is None or key.removeprefix("Patient/") in found


def test_every_served_type_has_a_patient_scope_rule() -> None:
    """A type added to the store must be the Patient, in a compartment, or directory data."""
    for resource_type in PARAMETERS:
        assert resource_type == "Patient" or resource_type in COMPARTMENT_TYPES or resource_type in DIRECTORY_TYPES, resource_type


def test_confinement_rules_without_http() -> None:
    confined = Confinement("p1", frozenset({"Observation", "Practitioner"}))
    assert confined.admits("Observation", observation("o", "p1"), write=True)
    assert not confined.admits("Observation", observation("o", "p2"))
    assert confined.admits("Provenance", provenance("x", "p2"))  # not covered: other grants allow it
    assert confined.admits("Practitioner", {"id": "dr1"}) and not confined.admits("Practitioner", {"id": "dr1"}, write=True)
    assert confined.criteria("Observation", [("code", "x")]) == [("code", "x"), ("patient", "Patient/p1")]
    assert confined.criteria("Practitioner", [("name", "x")]) == [("name", "x")]
    assert confined.criteria("Provenance", []) == []
    assert confined.criteria("Patient", [], every_type=True) == [("_id", "p1")]
    includes_only = Confinement("p1", frozenset(), frozenset({"*"}))
    assert includes_only.criteria("Observation", []) == [] and includes_only.admits("Observation", observation("o", "p2"))
    assert not includes_only.admits("Observation", observation("o", "p2"), included=True)
    provenance_both = Confinement("p1", frozenset({"Provenance"}))
    assert provenance_both.admits("Provenance", provenance("x", "p1", "p2"))  # reading: p1 is among them
    assert not provenance_both.admits("Provenance", provenance("x", "p1", "p2"), write=True)  # writing: p1 alone


def test_the_hook_confines_only_what_patient_grants_alone_allow() -> None:
    needs = classify("GET", "/fhir/Observation", [("code", "x"), ("_include", "Observation:focus")], {}, dict)
    assert [(n.resource_type, n.confined) for n in needs] == [("Observation", True), ("*", True)]
    mixed = Client.from_claims({"scope": "system/Observation.rs patient/*.rs", "patient": "p1"})
    assert confine(mixed, needs) == {"": Confinement("p1", frozenset(), frozenset({"*"}))}  # the matches stay unpinned
    patient_only = Client.from_claims({"scope": "patient/*.rs", "patient": "Patient/p1"})
    assert confine(patient_only, needs) == {"": Confinement("p1", frozenset({"Observation"}), frozenset({"*"}))}
    pinned = classify("GET", "/fhir/Observation", [("patient", "p1")], {}, dict)
    assert confine(patient_only, pinned) == {}  # the URL's pin was checked by the hook
    system = Client.from_claims({"scope": "system/*.rs"})
    assert confine(system, needs) == {}
    assert confine(patient_only, [Need("Practitioner", "r", "read", confined=True)]) == {}  # directory data


# --- read, vread, history -----------------------------------------------------------------------


def test_read_inside_the_compartment_and_refused_outside(api) -> None:
    assert api.get("/fhir/Observation/o1", headers=as_p1("patient/Observation.r")).status_code == 200
    assert api.get("/fhir/Patient/p1", headers=as_p1("patient/Patient.r")).status_code == 200
    assert api.get("/fhir/Provenance/both", headers=as_p1()).status_code == 200  # it is also p1's
    message = refusal(api.get("/fhir/Observation/o2", headers=as_p1("patient/Observation.r")))
    assert message == (
        "read of Observation/o2: it is not in Patient/p1's compartment; patient/ scopes reach only Patient/p1's "
        "compartment (or use system/Observation.r or user/Observation.r)"
    )
    assert "p2" not in message  # whose it is stays untold
    refusal(api.get("/fhir/Observation/o-none", headers=as_p1()))
    assert "Patient/p2" in refusal(api.get("/fhir/Patient/p2", headers=as_p1()))  # the URL names p2: refused by the hook
    assert api.get("/fhir/Observation/unknown", headers=as_p1()).status_code == 404


def test_vread_and_history_show_only_versions_in_the_compartment(api) -> None:
    # o3 was filed under p2 by mistake, then moved to p1; o4 is p1's and was deleted
    for resource in (observation("o3", "p2", "a"), observation("o3", "p1", "b"), observation("o4", "p1")):
        assert api.put(f"/fhir/Observation/{resource['id']}", json=resource, headers=SYSTEM).status_code in (200, 201)
    assert api.delete("/fhir/Observation/o4", headers=SYSTEM).status_code == 204
    headers = as_p1("patient/Observation.r")
    assert api.get("/fhir/Observation/o3/_history/2", headers=headers).status_code == 200
    refusal(api.get("/fhir/Observation/o3/_history/1", headers=headers))
    history = api.get("/fhir/Observation/o3/_history", headers=headers).get_json()
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"2"'] and history["total"] == 1
    deleted = api.get("/fhir/Observation/o4/_history", headers=headers).get_json()
    assert [e["request"]["method"] for e in deleted["entry"]] == ["DELETE", "POST"]  # the deletion of p1's version shows
    assert "entry" not in api.get("/fhir/Observation/o2/_history", headers=headers).get_json()
    assert api.get("/fhir/Observation/o3/_history", headers=SYSTEM).get_json()["total"] == 2


def test_type_and_system_history_need_user_or_system_scopes(api) -> None:
    assert "cannot be confined" in refusal(api.get("/fhir/Observation/_history", headers=as_p1()))
    refusal(api.get("/fhir/_history", headers=as_p1()))


# --- search -------------------------------------------------------------------------------------


def test_unpinned_search_is_answered_with_the_patient_pinned(api) -> None:
    headers = as_p1("patient/Observation.rs")
    bundle = api.get("/fhir/Observation?code=44249-1", headers=headers).get_json()
    assert ids(bundle) == {"Observation/o1"} and bundle["total"] == 1
    assert bundle["link"][0]["url"] == "http://localhost/fhir/Observation?code=44249-1"  # the pin stays out of the links
    assert api.get("/fhir/Observation?_summary=count", headers=headers).get_json()["total"] == 1
    form = api.post("/fhir/Observation/_search", data={"status": "final"}, headers=bearer(hs256("patient/Observation.s", patient="p1")))
    assert ids(form.get_json()) == {"Observation/o1"}
    assert ids(api.get("/fhir/Patient?name=alva", headers=as_p1("patient/Patient.s")).get_json()) == {"Patient/p1"}
    assert ids(api.get("/fhir/Observation?patient=p1,p2", headers=headers).get_json()) == {"Observation/o1"}
    assert ids(api.get("/fhir/Observation?code=44249-1", headers=SYSTEM).get_json()) == {"Observation/o1", "Observation/o2", "Observation/o-none"}


def test_search_pinned_to_another_patient_is_refused(api) -> None:
    message = refusal(api.get("/fhir/Observation?patient=p2", headers=as_p1("patient/Observation.s")))
    assert message.endswith("the token's patient/ scopes cover only Patient/p1's compartment, not Patient/p2's")
    refusal(api.get("/fhir/Patient?_id=p2", headers=as_p1()))


def test_includes_outside_the_compartment_are_left_out(api) -> None:
    headers = as_p1("patient/*.rs")
    focus = api.get("/fhir/Observation?_include=Observation:focus", headers=headers).get_json()
    assert ids(focus, "match") == {"Observation/o1"}
    assert ids(focus, "include") == {"MedicationRequest/m1"}  # not p2's m2
    requesters = api.get("/fhir/MedicationRequest?_include=MedicationRequest:requester", headers=headers).get_json()
    assert ids(requesters, "include") == {"Practitioner/dr1"}  # directory data is open
    reverse = api.get("/fhir/MedicationRequest?_revinclude=Observation:focus", headers=headers).get_json()
    assert ids(reverse, "match") == {"MedicationRequest/m1"}
    assert ids(reverse, "include") == {"Observation/o1"}  # not p2's o2, which also points at m1
    provenances = api.get("/fhir/Patient?_revinclude=Provenance:target", headers=headers).get_json()
    assert ids(provenances) == {"Patient/p1", "Provenance/both"}
    unfiltered = api.get("/fhir/MedicationRequest?_revinclude=Observation:focus", headers=SYSTEM).get_json()
    assert ids(unfiltered, "include") == {"Observation/o1", "Observation/o2"}


# --- resources of no patient ----------------------------------------------------------------------


def test_directory_types_are_read_and_searched_never_written(api) -> None:
    assert api.get("/fhir/Practitioner/dr1", headers=as_p1("patient/Practitioner.r")).status_code == 200
    assert ids(api.get("/fhir/Organization?name=river", headers=as_p1("patient/*.rs")).get_json()) == {"Organization/clinic"}
    refusal(api.get("/fhir/Practitioner?name=oka", headers=as_p1("patient/Practitioner.r")))  # no s
    refusal(api.get("/fhir/Practitioner/dr1", headers=as_p1("patient/Observation.rs")))
    update = {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Changed"}]}
    message = refusal(api.put("/fhir/Practitioner/dr1", json=update, headers=as_p1()))
    assert message.endswith("patient/ scopes read Practitioner but never write it")
    refusal(api.post("/fhir/Organization", json={"resourceType": "Organization", "name": "x"}, headers=as_p1()))
    refusal(api.get("/fhir/Practitioner/_history", headers=as_p1()))


def test_no_patient_in_context_grants_nothing(api) -> None:
    headers = bearer(hs256("patient/*.cruds"))
    for path in ("/fhir/Patient/p1", "/fhir/Observation/o1", "/fhir/Observation?code=x", "/fhir/Practitioner/dr1"):
        assert refusal(api.get(path, headers=headers)).endswith("the token's patient/ scopes have no patient in context")
    refusal(api.post("/fhir/Observation", json=observation(None, "p1"), headers={**headers, "Content-Type": FHIR_JSON}))


def test_user_or_system_scopes_lift_the_confinement(api) -> None:
    headers = bearer(hs256("system/Observation.rs patient/*.cruds", patient="p1"))
    assert api.get("/fhir/Observation/o2", headers=headers).status_code == 200  # system/ reads any
    both = api.get("/fhir/Observation?code=44249-1&_include=Observation:focus", headers=headers).get_json()
    assert ids(both, "match") == {"Observation/o1", "Observation/o2", "Observation/o-none"}  # searched under system/
    assert ids(both, "include") == {"MedicationRequest/m1"}  # included under patient/*: p2's m2 left out
    refusal(api.delete("/fhir/Observation/o2", headers=headers))  # deleting relies on patient/*.cruds
    assert api.get("/fhir/Observation/o2", headers=SYSTEM).status_code == 200


# --- writes -------------------------------------------------------------------------------------


def test_create_only_in_the_compartment(app, api) -> None:
    headers = as_p1("patient/Observation.c")
    assert api.post("/fhir/Observation", json=observation(None, "p1"), headers=headers).status_code == 201
    before = versions(app)
    message = refusal(api.post("/fhir/Observation", json=observation(None, "p2"), headers=headers))
    assert "the resource names Patient/p2; patient/ scopes write only what belongs to Patient/p1 alone" in message
    body = api.post("/fhir/Observation", json=observation(None, "p2"), headers=headers).get_json()
    assert body["issue"][0]["expression"] == ["Observation.subject"]
    assert "names no patient" in refusal(api.post("/fhir/Observation", json=observation(None, None), headers=headers))
    refusal(api.post("/fhir/Provenance", json={k: v for k, v in provenance("x", "p1", "p2").items() if k != "id"}, headers=as_p1()))
    refusal(api.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "New"}]}, headers=as_p1()))
    assert versions(app) == before  # a refused write stores nothing


def test_conditional_create_matches_only_in_the_compartment(api) -> None:
    headers = {**as_p1("patient/Observation.cs"), "If-None-Exist": f"identifier={SYS}|o1"}
    found = api.post("/fhir/Observation", json=observation(None, "p1"), headers=headers)
    assert found.status_code == 200 and found.get_json()["id"] == "o1"
    other = {**headers, "If-None-Exist": f"identifier={SYS}|o2"}  # p2's: not matched, so a new one is created
    assert api.post("/fhir/Observation", json=observation(None, "p1"), headers=other).status_code == 201


def test_update_only_what_is_and_stays_in_the_compartment(app, api) -> None:
    headers = as_p1("patient/Observation.u")
    assert api.put("/fhir/Observation/o1", json=observation("o1", "p1", "2"), headers=headers).status_code == 200
    before = versions(app)
    assert "the resource names Patient/p2" in refusal(api.put("/fhir/Observation/o1", json=observation("o1", "p2"), headers=headers))
    message = refusal(api.put("/fhir/Observation/o2", json=observation("o2", "p1"), headers=headers))
    assert "it is not in Patient/p1's compartment" in message and "p2" not in message
    stale = {**headers, "If-Match": 'W/"9"'}
    refusal(api.put("/fhir/Observation/o2", json=observation("o2", "p1"), headers=stale))  # 403, not a 412 telling o2's version
    assert versions(app) == before
    assert current_version(api, "Observation/o2") == "1"
    assert api.put("/fhir/Observation/o9", json=observation("o9", "p1"), headers=headers).status_code == 201  # create-on-update
    assert api.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1", "gender": "female"}, headers=as_p1()).status_code == 200
    refusal(api.put("/fhir/Patient/p2", json={"resourceType": "Patient", "id": "p2"}, headers=as_p1()))


def test_conditional_update_matches_only_in_the_compartment(app, api) -> None:
    headers = as_p1("patient/Observation.cu")
    mine = api.put(f"/fhir/Observation?identifier={SYS}|o1", json=observation("o1", "p1", "3"), headers=headers)
    assert mine.status_code == 200 and mine.get_json()["meta"]["versionId"] == "2"
    theirs = observation(None, "p1", "4")
    response = api.put(f"/fhir/Observation?identifier={SYS}|o2", json={**theirs, "identifier": [{"system": SYS, "value": "o2"}]}, headers=headers)
    assert response.status_code == 409  # p2's o2 is not matched; its identifier stays its own
    assert current_version(api, "Observation/o2") == "1"


def _patch(api: FlaskClient, reference: str, operations: list[JSON], headers: dict[str, str]):
    return api.patch(f"/fhir/{reference}", data=json.dumps(operations), headers={**headers, "Content-Type": "application/json-patch+json"})


def test_patch_only_what_is_and_stays_in_the_compartment(api) -> None:
    headers = as_p1("patient/Observation.u")
    assert _patch(api, "Observation/o1", [{"op": "replace", "path": "/valueString", "value": "5"}], headers).status_code == 200
    moved = _patch(api, "Observation/o1", [{"op": "replace", "path": "/subject/reference", "value": "Patient/p2"}], headers)
    assert "the resource names Patient/p2" in refusal(moved)
    probe = [{"op": "test", "path": "/valueString", "value": "guess"}]  # a failed test would tell o2's value
    refusal(_patch(api, "Observation/o2", probe, headers))
    assert current_version(api, "Observation/o1") == "2" and current_version(api, "Observation/o2") == "1"


def test_delete_only_in_the_compartment(api) -> None:
    headers = as_p1("patient/Observation.d")
    assert api.delete("/fhir/Observation/o1", headers=headers).status_code == 204
    refusal(api.delete("/fhir/Observation/o2", headers=headers))
    refusal(api.delete("/fhir/Observation/o2", headers={**headers, "If-Match": 'W/"7"'}))
    refusal(api.delete("/fhir/Provenance/both", headers=as_p1()))  # p1's, but not p1's alone
    assert api.get("/fhir/Observation/o2", headers=SYSTEM).status_code == 200
    assert api.delete("/fhir/Observation/never-was", headers=headers).status_code == 204
    # conditional delete: p2's o2 does not match, so nothing is deleted
    assert api.delete(f"/fhir/Observation?identifier={SYS}|o2", headers=as_p1("patient/Observation.ds")).status_code == 204
    assert api.get("/fhir/Observation/o2", headers=SYSTEM).status_code == 200


# --- transactions and batches -----------------------------------------------------------------------


def _bundle(kind: str, *entries: JSON) -> str:
    return json.dumps({"resourceType": "Bundle", "type": kind, "entry": list(entries)})


def test_transaction_is_refused_at_the_entry_outside_the_compartment(app, api) -> None:
    before = versions(app)
    body = _bundle(
        "transaction",
        {"resource": observation("o1", "p1", "6"), "request": {"method": "PUT", "url": "Observation/o1"}},
        {"resource": observation(None, "p2"), "request": {"method": "POST", "url": "Observation"}},
    )
    response = api.post("/fhir", data=body, headers=as_p1())
    refusal(response)
    assert response.get_json()["issue"][0]["expression"] == ["Bundle.entry[1].resource.subject"]
    assert versions(app) == before and current_version(api, "Observation/o1") == "1"
    allowed = _bundle("transaction", {"resource": observation("o1", "p1", "6"), "request": {"method": "PUT", "url": "Observation/o1"}})
    assert api.post("/fhir", data=allowed, headers=as_p1()).status_code == 200


def test_batch_entries_are_confined_one_by_one(api) -> None:
    binary = base64.b64encode(json.dumps([{"op": "test", "path": "/valueString", "value": "1"}]).encode()).decode()
    body = _bundle(
        "batch",
        {"request": {"method": "GET", "url": "Observation/o1"}},
        {"request": {"method": "GET", "url": "Observation/o2"}},
        {"request": {"method": "GET", "url": "Observation?code=44249-1"}},
        {"request": {"method": "DELETE", "url": "Observation/o2"}},
        {"request": {"method": "GET", "url": "Observation/o2/_history/1"}},
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": binary}, "request": {"method": "PATCH", "url": "Observation/o2"}},
        {"request": {"method": "GET", "url": "Practitioner/dr1"}},
    )
    response = api.post("/fhir", data=body, headers=as_p1())
    assert response.status_code == 200, response.get_json()
    entries = response.get_json()["entry"]
    assert [e["response"]["status"][:3] for e in entries] == ["200", "403", "200", "403", "403", "403", "200"]
    assert ids(entries[2]["resource"]) == {"Observation/o1"}
    assert entries[1]["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[1].request.url"]
    assert api.get("/fhir/Observation/o2", headers=SYSTEM).status_code == 200


def test_conditional_reference_in_a_transaction_finds_only_the_patient(api) -> None:
    by_name = observation(None, None)
    by_name["subject"] = {"reference": "Patient?name=alvarado"}  # p2's name
    body = _bundle("transaction", {"resource": by_name, "request": {"method": "POST", "url": "Observation"}})
    response = api.post("/fhir", data=body, headers=as_p1())
    assert response.status_code == 400  # not found in p1's compartment, rather than a 403 telling p2 exists
    by_name["subject"] = {"reference": "Patient?name=alvarez"}
    body = _bundle("transaction", {"resource": by_name, "request": {"method": "POST", "url": "Observation"}})
    assert api.post("/fhir", data=body, headers=as_p1()).status_code == 200


def test_operations_and_iop_records(api) -> None:
    assert api.get("/fhir/Patient/p1/$everything", headers=as_p1()).status_code == 200
    refusal(api.get("/fhir/Patient/p2/$everything", headers=as_p1()))
    refusal(api.get("/iop/records/ep-1", headers=as_p1()))
    assert api.post("/fhir/Observation/$validate", json=observation(None, "p2"), headers=as_p1()).status_code == 200
