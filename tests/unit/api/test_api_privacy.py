"""42 CFR Part 2 at the REST API: two HS256 clients mapped to two organisations, one named by the
record's Part 2 consent and one not, read the same things and get what their consents allow;
every access has its AuditEvent; the audit trail is read-only; break the glass; revocation.

The example record's consent ``cn-1`` names Lakeside Community Behavioral Health (NPI
1932102084) for treatment, Part 2, for medications, diagnoses, care plan and discharge from
2026-02-20; ``cn-2`` (the pharmacy) was revoked on 2026-02-01. The gate's clock is pinned to
2026-03-01.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iop_fhir import terminology
from iop_fhir.api.disclosure import GATE_KEY, NOTICE_HEADER, WITHHELD_HEADER
from iop_fhir.config import ConfigError
from iop_fhir.generate import generate_cohort
from iop_fhir.privacy import NOTICE
from iop_fhir.privacy.audit import AUDIT_CODES, LIFECYCLE, RESTFUL_INTERACTION, accounting
from iop_fhir.privacy.gate import NOTICE_EXTENSION
from iop_fhir.privacy.labels import data_categories
from iop_fhir.server import create_app

SECRET = "a-development-secret-of-32-bytes-or-more"
AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
NPI = "http://hl7.org/fhir/sid/us-npi"
LAKESIDE_NPI = "1932102084"  # named by the record's Part 2 consent cn-1
OTHER_NPI = "1619980209"  # named by no consent
CLIENTS = [
    {"client_id": "riverbend-ehr", "internal": True},
    {"client_id": "lakeside", "name": "Lakeside Community Behavioral Health", "organization": f"{NPI}|{LAKESIDE_NPI}"},
    {"client_id": "other-clinic", "organization": f"{NPI}|{OTHER_NPI}"},
]
PART2 = (terminology.V3_ACT_CODE, "42CFRPart2")
REFRAIN = (terminology.V3_ACT_CODE, "NORDSCLCD")
REDACTED = (terminology.V3_OBSERVATION_VALUE, "REDACTED")
BUPRENORPHINE = "1010604"

JSON = dict[str, Any]


def token(client_id: str, scope: str = "system/*.cruds", **claims: Any) -> dict[str, str]:
    now = int(time.time())
    payload = {"client_id": client_id, "sub": client_id, "scope": scope, "iat": now, "exp": now + 600, **claims}
    return {"Authorization": "Bearer " + jwt.encode(payload, SECRET, algorithm="HS256")}


INTERNAL, LAKESIDE, OTHER = token("riverbend-ehr"), token("lakeside"), token("other-clinic")


def gateway(path: Path, clients: list[JSON] = CLIENTS) -> Flask:
    app = create_app({"DATABASE_URL": f"sqlite:///{path}", "AUTH": "on", "JWT_SECRET": SECRET, "client": clients, "LOG_LEVEL": "WARNING"})
    app.testing = True
    app.extensions[GATE_KEY].clock = lambda: AT
    return app


@pytest.fixture
def app(tmp_path: Path, example_json: JSON) -> Flask:
    app = gateway(tmp_path / "privacy.sqlite")
    assert app.test_client().post("/iop/records", json=example_json, headers=INTERNAL).status_code == 201
    yield app
    app.extensions[GATE_KEY].audit.close()


@pytest.fixture
def api(app: Flask) -> FlaskClient:
    return app.test_client()


def security(resource: JSON) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in resource.get("meta", {}).get("security", [])}


def matches(bundle: JSON) -> list[JSON]:
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode", "match") == "match" and e["resource"]["resourceType"] != "OperationOutcome"]


def outcome(bundle: JSON) -> list[JSON]:
    return [i for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "outcome" for i in e["resource"]["issue"]]


def only(api: FlaskClient, path: str) -> JSON:
    response = api.get(path, headers=INTERNAL)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def mat_prescription(api: FlaskClient) -> JSON:
    (found,) = [r for r in matches(only(api, "/fhir/MedicationRequest?_count=100")) if r["medicationCodeableConcept"]["coding"][0]["code"] == BUPRENORPHINE and r["intent"] == "order" and r["status"] == "active"] or [None]
    assert found is not None
    return found


def patient_id(api: FlaskClient) -> str:
    (patient,) = matches(only(api, "/fhir/Patient"))
    return patient["id"]


def audit_events(app: Flask, query: str) -> list[JSON]:
    app.extensions[GATE_KEY].audit.flush()
    return matches(only(app.test_client(), f"/fhir/AuditEvent?_count=500&{query}"))


# --- the same reads, different answers ------------------------------------------------------------------


def test_a_search_shows_part2_data_only_to_the_client_a_consent_names(api):
    everything = matches(only(api, "/fhir/MedicationRequest?_count=100"))
    part2 = {r["id"] for r in everything if PART2 in security(r)}
    assert part2, "the example record prescribes buprenorphine"

    named = api.get("/fhir/MedicationRequest?_count=100", headers=LAKESIDE)
    shown = matches(named.get_json())
    assert {r["id"] for r in shown} == {r["id"] for r in everything}
    assert all(REFRAIN in security(r) for r in shown if r["id"] in part2)
    assert named.headers[NOTICE_HEADER] == NOTICE
    assert NOTICE in [i["diagnostics"] for i in outcome(named.get_json())]
    assert named.get_json()["meta"]["extension"] == [{"url": NOTICE_EXTENSION, "valueString": NOTICE}]
    assert {PART2, REFRAIN} <= security(named.get_json())  # the Bundle says what it carries

    unnamed = api.get("/fhir/MedicationRequest?_count=100", headers=OTHER)
    bundle = unnamed.get_json()
    assert {r["id"] for r in matches(bundle)} == {r["id"] for r in everything} - part2
    assert not any(PART2 in security(r) for r in matches(bundle))
    assert bundle["meta"]["security"] == [terminology.security_label("REDACTED")]
    assert bundle["total"] == len(matches(bundle))  # counts what is shown, never the withheld
    assert [i["code"] for i in outcome(bundle)] == ["suppressed"]
    assert "buprenorphine" not in json.dumps(outcome(bundle)).lower()
    assert unnamed.headers[WITHHELD_HEADER] == "consent-policy" and NOTICE_HEADER not in unnamed.headers


def test_the_program_itself_sees_everything_as_stored(api):
    response = api.get("/fhir/MedicationRequest?_count=100", headers=INTERNAL)
    assert WITHHELD_HEADER not in response.headers and NOTICE_HEADER not in response.headers
    assert "meta" not in response.get_json() and outcome(response.get_json()) == []


def test_a_read_by_id_is_the_labelled_copy_or_a_403_that_tells_nothing(api):
    mat = mat_prescription(api)
    path = f"/fhir/MedicationRequest/{mat['id']}"
    named = api.get(path, headers=LAKESIDE)
    assert named.status_code == 200 and REFRAIN in security(named.get_json())
    assert named.headers[NOTICE_HEADER] == NOTICE and named.headers["ETag"] == f'W/"{mat["meta"]["versionId"]}"'
    refused = api.get(path, headers=OTHER)
    assert refused.status_code == 403
    (issue,) = refused.get_json()["issue"]
    assert issue["code"] == "suppressed"
    for hint in ("part 2", "sud", "substance", "buprenorphine", "42 cfr", mat["id"]):
        assert hint not in issue["diagnostics"].lower()
    assert api.get(path, headers={**OTHER, "If-None-Match": "*"}).status_code == 403  # not a 304 that would tell it exists
    assert api.get(f"{path}/_history/1", headers=OTHER).status_code == 403
    assert api.get(f"{path}?_format=xml", headers=LAKESIDE).status_code == 200


def test_history_leaves_withheld_versions_out(api):
    mat = mat_prescription(api)
    own = api.get(f"/fhir/MedicationRequest/{mat['id']}/_history", headers=OTHER).get_json()
    assert "entry" not in own and own["meta"]["security"] == [terminology.security_label("REDACTED")]
    named = api.get(f"/fhir/MedicationRequest/{mat['id']}/_history", headers=LAKESIDE).get_json()
    assert [REFRAIN in security(e["resource"]) for e in named["entry"]] == [True]
    assert named["meta"]["extension"] == [{"url": NOTICE_EXTENSION, "valueString": NOTICE}]
    typed = api.get("/fhir/MedicationRequest/_history?_count=100", headers=OTHER).get_json()
    assert mat["id"] not in {e["resource"]["id"] for e in typed["entry"]}
    assert typed["total"] == len(typed["entry"])
    system = api.get("/fhir/_history?_count=100", headers=OTHER).get_json()
    assert not {e["resource"]["resourceType"] for e in system["entry"]} & {"AuditEvent"}
    assert not any(PART2 in security(e["resource"]) for e in system["entry"])


def test_a_resource_that_mentions_withheld_data_goes_out_redacted(api):
    pid = patient_id(api)
    stored = only(api, f"/fhir/Patient/{pid}")
    assert "managingOrganization" in stored  # the program, a Part 2 program: being its patient is Part 2 information
    redacted = api.get(f"/fhir/Patient/{pid}", headers=OTHER).get_json()
    assert "managingOrganization" not in redacted and REDACTED in security(redacted)
    # cn-1 covers medications, diagnoses, care plan and discharge, not demographics: Lakeside gets the cut copy too
    assert "managingOrganization" not in api.get(f"/fhir/Patient/{pid}", headers=LAKESIDE).get_json()
    emergency = api.get(f"/fhir/Patient/{pid}", headers=token("other-clinic", purpose_of_use="ETREAT")).get_json()
    assert emergency["managingOrganization"] == stored["managingOrganization"]


def test_a_count_counts_only_what_the_client_may_see(api):
    internal = only(api, "/fhir/MedicationRequest?_summary=count")["total"]
    other = api.get("/fhir/MedicationRequest?_summary=count", headers=OTHER).get_json()
    shown = api.get("/fhir/MedicationRequest?_count=100", headers=OTHER).get_json()
    assert other["total"] == len(matches(shown)) < internal
    paged = api.get("/fhir/MedicationRequest?_count=2&_total=accurate", headers=OTHER).get_json()
    assert paged["total"] == other["total"] and len(matches(paged)) == 2


def test_pages_are_filled_past_withheld_resources(api):
    """A page short of _count would tell how much was withheld on it: it is filled from the next results."""
    visible = [r["id"] for r in matches(api.get("/fhir/MedicationRequest?_count=100", headers=OTHER).get_json())]
    walked: list[str] = []
    url = "/fhir/MedicationRequest?_count=2"
    while url:
        bundle = api.get(url, headers=OTHER).get_json()
        page = [r["id"] for r in matches(bundle)]
        walked += page
        following = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        assert len(page) == 2 or not following
        url = following[0].replace("http://localhost", "") if following else ""
    assert walked == visible


def test_everything_and_medication_history_leave_withheld_data_out(api):
    pid = patient_id(api)
    for operation in ("$everything", "$medication-history"):
        full = only(api, f"/fhir/Patient/{pid}/{operation}")
        other = api.get(f"/fhir/Patient/{pid}/{operation}", headers=OTHER)
        bundle = other.get_json()
        shown = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] != "outcome"]
        assert not any(PART2 in security(r) for r in shown)
        assert len(shown) < len(full["entry"])
        assert other.headers[WITHHELD_HEADER] == "consent-policy" and bundle["meta"]["security"] == [terminology.security_label("REDACTED")]
        named = api.get(f"/fhir/Patient/{pid}/{operation}", headers=LAKESIDE)
        assert any(PART2 in security(e["resource"]) and REFRAIN in security(e["resource"]) for e in named.get_json()["entry"] if e["search"]["mode"] == "match")
        assert named.headers[NOTICE_HEADER] == NOTICE
    everything = api.get(f"/fhir/Patient/{pid}/$everything", headers=OTHER).get_json()
    assert everything["total"] == len([e for e in everything["entry"] if e["search"]["mode"] != "outcome"])


def test_the_iop_record_is_built_from_what_is_released(api):
    named = api.get("/iop/records/ep-2026-0042", headers=LAKESIDE)
    assert named.status_code == 200
    assert named.headers[WITHHELD_HEADER] == "consent-policy"  # cn-1 does not cover drug screens and sessions
    assert named.headers[NOTICE_HEADER] == NOTICE
    record = named.get_json()
    assert record["drug_screens"] == [] and any(p["medication"]["rxnorm"] == BUPRENORPHINE for p in record["prescriptions"])
    refused = api.get("/iop/records/ep-2026-0042", headers=OTHER)  # the episode of an SUD program is Part 2 data
    assert refused.status_code == 403 and refused.get_json()["issue"][0]["code"] == "suppressed"
    reconciliation = api.get("/iop/records/ep-2026-0042/reconciliation", headers=OTHER).get_json()
    assert BUPRENORPHINE not in json.dumps(reconciliation["prescriptions"])
    assert BUPRENORPHINE in json.dumps(api.get("/iop/records/ep-2026-0042/reconciliation", headers=INTERNAL).get_json())


def test_an_unmapped_client_gets_no_part2_data(api):
    stranger = token("stranger")
    assert api.get(f"/fhir/MedicationRequest/{mat_prescription(api)['id']}", headers=stranger).status_code == 403
    shown = matches(api.get("/fhir/Condition", headers=stranger).get_json())
    assert shown and not any(PART2 in security(r) for r in shown)


def test_a_transaction_shows_the_recipient_only_what_it_may_see(api):
    mat = mat_prescription(api)
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"MedicationRequest/{mat['id']}"}},
            {"request": {"method": "GET", "url": "MedicationRequest?_count=50"}},
        ],
    }
    answer = api.post("/fhir", json=bundle, headers=OTHER).get_json()
    read, search = answer["entry"]
    assert read["response"]["status"].startswith("403") and "resource" not in read
    assert mat["id"] not in json.dumps(search["resource"]["entry"])
    named = api.post("/fhir", json=bundle, headers=LAKESIDE).get_json()
    assert REFRAIN in security(named["entry"][0]["resource"])


# --- the audit trail ----------------------------------------------------------------------------------------


def test_every_access_has_its_audit_event(app, api):
    mat = mat_prescription(api)
    pid = patient_id(api)
    assert api.get("/fhir/Condition").status_code == 401
    assert api.get("/fhir/Condition", headers=token("narrow", "system/Patient.rs")).status_code == 403
    assert api.get(f"/fhir/MedicationRequest/{mat['id']}", headers=OTHER).status_code == 403
    assert api.get(f"/fhir/MedicationRequest/{mat['id']}", headers=LAKESIDE).status_code == 200
    assert api.get("/fhir/Condition?_count=50", headers=OTHER).status_code == 200
    assert api.get(f"/fhir/Patient/{pid}/$everything", headers=LAKESIDE).status_code == 200
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "note"}, "subject": {"reference": f"Patient/{pid}"}}
    created = api.post("/fhir/Observation", json=observation, headers=INTERNAL)
    assert created.status_code == 201
    # a write's AuditEvent is stored with it, in its own transaction: found before any flush
    written = created.headers["Location"].split("/fhir/", 1)[1]  # Observation/{id}/_history/1
    criteria = [("subtype", f"{RESTFUL_INTERACTION}|create"), ("entity", written.split("/_history")[0])]
    (write,) = [s.resource for s in app.extensions[GATE_KEY].store.search("AuditEvent", criteria).entries]
    assert [e["what"]["reference"] for e in write["entity"]] == [written, f"Patient/{pid}"]
    assert write["action"] == "C" and write["agent"][0]["altId"] == "riverbend-ehr" and len(write["agent"]) == 1
    loaded = audit_events(app, f"subtype={RESTFUL_INTERACTION}|create&altid=riverbend-ehr&entity=Patient/{pid}")
    (load,) = [e for e in loaded if e["entity"][0].get("description") == "/iop/records"]  # the record's, in its unit of work
    assert len([e for e in load["entity"] if "what" in e]) > 50  # every resource of the record, by version

    (unauthenticated,) = audit_events(app, "altid=unauthenticated")
    assert unauthenticated["outcome"] == "4" and "401" in unauthenticated["outcomeDesc"]
    (narrow,) = audit_events(app, "altid=narrow")
    assert narrow["outcome"] == "4" and "403" in narrow["outcomeDesc"]
    refused = audit_events(app, f"altid=other-clinic&subtype={RESTFUL_INTERACTION}|read")
    assert [(e["outcome"], e["entity"][0]["what"]["reference"]) for e in refused] == [("4", f"MedicationRequest/{mat['id']}")]
    withheld = audit_events(app, f"altid=other-clinic&subtype={LIFECYCLE}|disclose&outcome=4&patient=Patient/{pid}")
    assert f"MedicationRequest/{mat['id']}/_history/{mat['meta']['versionId']}" in [e["what"]["reference"] for x in withheld for e in x["entity"]]
    (search,) = audit_events(app, f"altid=other-clinic&subtype={RESTFUL_INTERACTION}|search-type")
    assert search["entity"][0]["description"] == "Condition?_count=50" and search["action"] == "E"
    assert {"Patient/" + pid} <= {e["what"]["reference"] for e in search["entity"] if "what" in e}
    disclosed = audit_events(app, f"altid=lakeside&subtype={LIFECYCLE}|disclose&outcome=0")
    mat_version = f"MedicationRequest/{mat['id']}/_history/{mat['meta']['versionId']}"
    under_consent = [x for x in disclosed if mat_version in [e.get("what", {}).get("reference") for e in x["entity"]]]
    assert under_consent and all([e["role"]["code"] for e in x["entity"]].count("13") == 1 for x in under_consent)
    lakeside_org = matches(only(api, f"/fhir/Organization?identifier={NPI}|{LAKESIDE_NPI}"))[0]["id"]
    assert audit_events(app, f"agent=Organization/{lakeside_org}&subtype={LIFECYCLE}|disclose&outcome=0") == disclosed
    assert {e["agent"][0]["altId"] for e in audit_events(app, f"agent=Organization/{lakeside_org}")} == {"lakeside"}
    operation = audit_events(app, f"altid=lakeside&subtype={RESTFUL_INTERACTION}|operation")
    assert [e["entity"][0]["what"]["reference"] for e in operation] == [f"Patient/{pid}"]
    by_date = audit_events(app, f"date=ge{AT.date().isoformat()}&type=http://terminology.hl7.org/CodeSystem/audit-event-type|rest")
    assert len(by_date) >= 8


def test_the_audit_trail_is_read_only(app, api):
    event = audit_events(app, "_count=1")[0]
    path = f"/fhir/AuditEvent/{event['id']}"
    for response in (
        api.post("/fhir/AuditEvent", json=event, headers=INTERNAL),
        api.put(path, json=event, headers=INTERNAL),
        api.patch(path, data="[]", content_type="application/json-patch+json", headers=INTERNAL),
        api.delete(path, headers=INTERNAL),
        api.delete("/fhir/AuditEvent?outcome=0", headers=INTERNAL),
    ):
        assert response.status_code == 405 and response.headers["Allow"] == "GET"
        assert response.get_json()["issue"][0]["code"] == "not-supported"
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "DELETE", "url": f"AuditEvent/{event['id']}"}}]}
    refused = api.post("/fhir", json=transaction, headers=INTERNAL)
    assert refused.status_code == 405 and refused.get_json()["issue"][0]["expression"] == ["Bundle.entry[0].request.url"]
    batch = api.post("/fhir", json={**transaction, "type": "batch"}, headers=INTERNAL).get_json()
    assert batch["entry"][0]["response"]["status"] == "405 Method Not Allowed"
    assert api.get(path, headers=INTERNAL).get_json()["id"] == event["id"]
    statement = api.get("/fhir/metadata").get_json()
    (audit,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "AuditEvent"]
    assert [i["code"] for i in audit["interaction"]] == ["read", "vread", "history-instance", "history-type", "search-type"]
    assert audit["conditionalCreate"] is False and audit["updateCreate"] is False
    # a recipient never reads the program's security records
    assert api.get("/fhir/AuditEvent", headers=LAKESIDE).status_code == 403
    assert api.get(path, headers=LAKESIDE).status_code == 403


def test_break_the_glass_lets_part2_out_and_is_audited(app, api):
    mat = mat_prescription(api)
    emergency = token("other-clinic", purpose_of_use="ETREAT")
    response = api.get(f"/fhir/MedicationRequest/{mat['id']}", headers=emergency)
    assert response.status_code == 200
    assert {REFRAIN, (terminology.V3_ACT_REASON, "ETREAT")} <= security(response.get_json())
    flagged = audit_events(app, f"subtype={AUDIT_CODES}|break-the-glass")
    assert {tuple(c["code"] for c in e["subtype"]) for e in flagged} == {("read", "break-the-glass"), ("disclose", "break-the-glass")}
    (told,) = [a for a in accounting(app.extensions[GATE_KEY].store, patient_id(api)) if a.client == "other-clinic"]
    assert told.break_glass and told.consents == () and told.purpose == "ETREAT"


def test_a_revoked_consent_stops_disclosure_from_its_moment(app, api):
    gate = app.extensions[GATE_KEY]
    pid = patient_id(api)
    organization = {"resourceType": "Organization", "identifier": [{"system": NPI, "value": OTHER_NPI}], "name": "Other Clinic"}
    org_id = api.post("/fhir/Organization", json=organization, headers=INTERNAL).get_json()["id"]
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": terminology.CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": terminology.LOINC, "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "dateTime": "2026-02-25",
        "policyRule": {"coding": [{"system": terminology.V3_ACT_CODE, "code": "42CFRPart2"}]},
        "provision": {
            "type": "permit",
            "actor": [{"role": {"coding": [{"system": terminology.V3_PARTICIPATION_TYPE, "code": "IRCP"}]}, "reference": {"reference": f"Organization/{org_id}"}}],
            "action": [{"coding": [{"system": terminology.CONSENT_ACTION, "code": "disclose"}]}],
            "purpose": [{"system": terminology.V3_ACT_REASON, "code": "TREAT"}],
        },
    }
    created = api.post("/fhir/Consent", json=consent, headers=INTERNAL)
    assert created.status_code == 201
    path = f"/fhir/MedicationRequest/{mat_prescription(api)['id']}"
    assert api.get(path, headers=OTHER).status_code == 200
    revoked_at = AT + timedelta(hours=1)
    revocation = {
        **created.get_json(),
        "status": "inactive",
        "extension": [{"url": terminology.extension_url("revoked-on"), "valueDateTime": revoked_at.isoformat().replace("+00:00", "Z")}],
    }
    assert api.put(f"/fhir/Consent/{revocation['id']}", json=revocation, headers=INTERNAL).status_code == 200
    gate.clock = lambda: revoked_at - timedelta(seconds=1)
    assert api.get(path, headers=OTHER).status_code == 200  # in force until its moment
    gate.clock = lambda: revoked_at
    assert api.get(path, headers=OTHER).status_code == 403
    gate.clock = lambda: revoked_at + timedelta(days=30)
    assert api.get(path, headers=OTHER).status_code == 403


# --- the property -------------------------------------------------------------------------------------------

PURPOSES = ("TREAT", "COC", "HPAYMT")
PATHS = ("/fhir/{t}?_count=200", "/fhir/{t}?_count=3", "/fhir/{t}?_include=*&_count=200")
TYPES = ("MedicationRequest", "Condition", "Observation", "Encounter", "CarePlan", "EpisodeOfCare", "Patient", "Consent", "Goal", "Task", "Provenance")


@st.composite
def scenarios(draw: st.DrawFn) -> JSON:
    seed = draw(st.integers(0, 10_000))  # the cohort: two generated records
    consents = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "record": st.integers(0, 1),
                    "recipient": st.sampled_from(["A", "B"]),
                    "part2": st.booleans(),
                    "purpose": st.sampled_from(PURPOSES),
                    "start": st.integers(-30, 10),  # days from AT
                    "revoked": st.one_of(st.none(), st.integers(-10, 10)),
                    "categories": st.one_of(st.none(), st.sets(st.sampled_from(["medications", "diagnoses", "drug-screens", "sessions", "care-plan"]), min_size=1, max_size=3)),
                }
            ),
            max_size=4,
        )
    )
    client = draw(st.sampled_from(["A", "B", "stranger"]))
    purpose = draw(st.sampled_from(PURPOSES))
    return {"seed": seed, "consents": consents, "client": client, "purpose": purpose}


def _fhir_consent(spec: JSON, patient: str, organization: str) -> JSON:
    start = (AT + timedelta(days=spec["start"])).date().isoformat()
    found: JSON = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": terminology.CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": terminology.LOINC, "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "dateTime": start,
        "provision": {
            "type": "permit",
            "period": {"start": start},
            "actor": [{"role": {"coding": [{"system": terminology.V3_PARTICIPATION_TYPE, "code": "IRCP"}]}, "reference": {"reference": organization}}],
            "action": [{"coding": [{"system": terminology.CONSENT_ACTION, "code": "disclose"}]}],
            "purpose": [{"system": terminology.V3_ACT_REASON, "code": spec["purpose"]}],
        },
    }
    if spec["categories"]:
        system = terminology.code_system("data-category")
        found["provision"]["code"] = [{"coding": [{"system": system, "code": c}]} for c in sorted(spec["categories"])]
    if spec["part2"]:
        found["policyRule"] = {"coding": [{"system": terminology.V3_ACT_CODE, "code": "42CFRPart2"}]}
    if spec["revoked"] is not None:
        found["status"] = "inactive"
        found["extension"] = [{"url": terminology.extension_url("revoked-on"), "valueDate": (AT + timedelta(days=spec["revoked"])).date().isoformat()}]
    return found


def _may_receive_part2(resource: JSON, scenario: JSON, patients: list[str], purpose: str) -> bool:
    """The oracle, written from the policy and the scenario alone: an active Part 2 consent, in
    force at AT, for this client's organisation and purpose, covering the data and its patient."""
    own = resource["id"] if resource["resourceType"] == "Patient" else None
    subject = (resource.get("subject") or resource.get("patient") or resource.get("for") or {}).get("reference", "")
    if resource["resourceType"] == "Provenance":  # whose: the patient among what it is about
        subject = next((t["reference"] for t in resource.get("target", ()) if t.get("reference", "").startswith("Patient/")), "")
    categories = data_categories(resource)
    for spec in scenario["consents"]:
        start = (AT + timedelta(days=spec["start"])).replace(hour=0)
        revoked = None if spec["revoked"] is None else (AT + timedelta(days=spec["revoked"])).replace(hour=0)
        patient = patients[spec["record"]]
        if not (spec["part2"] and spec["recipient"] == scenario["client"] and start <= AT and (revoked is None or AT < revoked)):
            continue
        if spec["purpose"] != purpose and not (spec["purpose"] == "TREAT" and purpose == "COC"):
            continue
        if spec["categories"] and not (spec["categories"] & categories):
            continue
        if patient in (subject, f"Patient/{own}"):
            return True
    return False


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_no_part2_resource_reaches_a_client_without_a_matching_consent(scenario: JSON) -> None:
    with tempfile.TemporaryDirectory() as folder:
        clients = [
            {"client_id": "riverbend-ehr", "internal": True},
            {"client_id": "A", "organization": "Organization/org-a"},
            {"client_id": "B", "organization": "Organization/org-b"},
        ]
        app = gateway(Path(folder) / "property.sqlite", clients)
        api = app.test_client()
        records = [{**record, "consents": []} for record in generate_cohort(2, scenario["seed"])]  # the scenario's consents only
        try:
            for record in records:
                assert api.post("/iop/records", json=record, headers=INTERNAL).status_code == 201
            for org in ("org-a", "org-b"):
                assert api.put(f"/fhir/Organization/{org}", json={"resourceType": "Organization", "id": org, "name": org}, headers=INTERNAL).status_code == 201
            by_record = {}
            for record in records:
                episode = only(api, f"/fhir/EpisodeOfCare?identifier={record['id']}")
                by_record[record["id"]] = matches(episode)[0]["patient"]["reference"]
            patients = [by_record[r["id"]] for r in records]
            for spec in scenario["consents"]:
                organization = "Organization/org-a" if spec["recipient"] == "A" else "Organization/org-b"
                assert api.post("/fhir/Consent", json=_fhir_consent(spec, patients[spec["record"]], organization), headers=INTERNAL).status_code == 201
            headers = token(scenario["client"], purpose_of_use=scenario["purpose"])
            answers: list[JSON] = []
            for rtype in TYPES:
                for template in PATHS:
                    response = api.get(template.format(t=rtype), headers=headers)
                    assert response.status_code == 200
                    answers += [e["resource"] for e in response.get_json().get("entry", []) if e["resource"]["resourceType"] != "OperationOutcome"]
            for patient in patients:
                for operation in ("$everything", "$medication-history"):
                    answers += matches(api.get(f"/fhir/{patient}/{operation}", headers=headers).get_json())
                    answers += [e["resource"] for e in api.get(f"/fhir/{patient}/{operation}", headers=headers).get_json().get("entry", []) if e["search"]["mode"] == "include"]
            for resource in matches(only(api, "/fhir/MedicationRequest?_count=200")):
                response = api.get(f"/fhir/MedicationRequest/{resource['id']}", headers=headers)
                assert response.status_code in (200, 403)
                if response.status_code == 200:
                    answers.append(response.get_json())
            stored = {(r["resourceType"], r["id"]): r for t in TYPES for r in matches(only(api, f"/fhir/{t}?_count=500"))}
            for resource in answers:
                original = stored.get((resource["resourceType"], resource["id"]), resource)
                if PART2 in security(original) or PART2 in security(resource):
                    assert _may_receive_part2(original, scenario, patients, scenario["purpose"]), (resource["resourceType"], resource["id"], scenario["consents"])
        finally:
            app.extensions[GATE_KEY].audit.close()
            app.extensions["iop_fhir.store"].close()


@pytest.mark.parametrize("value", [-1, True, "many", 2.5])
def test_a_bad_audit_backlog_setting_stops_the_gateway_at_start(make_app, value) -> None:
    with pytest.raises(ConfigError, match="AUDIT_INDEX_BACKLOG must be an integer of at least 0"):
        make_app(AUDIT_INDEX_BACKLOG=value)
