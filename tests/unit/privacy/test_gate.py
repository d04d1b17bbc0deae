"""The privacy gate (consents from the store, the decision, its audit per patient) and who a REST
client is as a recipient. On SQLite, and on PostgreSQL when IOP_FHIR_TEST_POSTGRES_URL is set."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from privacy_helpers import act, condition, prescription, security
from test_audit import store  # noqa: F401 - the store fixture, on both backends

from iop_fhir import terminology
from iop_fhir.api.auth import DEVELOPMENT_CLIENT, Client
from iop_fhir.config import ConfigError
from iop_fhir.privacy import NOTICE, Recipient
from iop_fhir.privacy.audit import AUDIT_CODES, AuditLog
from iop_fhir.privacy.consent import Disclosure
from iop_fhir.privacy.gate import PrivacyGate, combine
from iop_fhir.privacy.recipients import load_clients, recipient_for_client
from iop_fhir.store import Store

AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
ORG_A = "Organization/org-a"
NPI_A = ("http://hl7.org/fhir/sid/us-npi", "1932102084")
BUPRENORPHINE = "1010604"  # buprenorphine / naloxone: medication-assisted treatment, Part 2
SERTRALINE = "312940"

JSON = dict[str, Any]


def consent(cid: str, *, patient: str = "Patient/p1", recipient: str = ORG_A, part2: bool = True, purpose: str = "TREAT", revoked: str | None = None) -> JSON:
    """A Consent the gate can read: permit disclosure of all data to ``recipient`` for ``purpose`` from 2026-01-01."""
    found: JSON = {
        "resourceType": "Consent",
        "id": cid,
        "status": "inactive" if revoked else "active",
        "scope": {"coding": [{"system": terminology.CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": terminology.LOINC, "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "dateTime": "2026-01-01",
        "provision": {
            "type": "permit",
            "period": {"start": "2026-01-01"},
            "actor": [{"role": {"coding": [{"system": terminology.V3_PARTICIPATION_TYPE, "code": "IRCP"}]}, "reference": {"reference": recipient}}],
            "action": [{"coding": [{"system": terminology.CONSENT_ACTION, "code": "disclose"}]}],
            "purpose": [{"system": terminology.V3_ACT_REASON, "code": purpose}],
        },
    }
    if part2:
        found["policyRule"] = {"coding": [{"system": terminology.V3_ACT_CODE, "code": "42CFRPart2"}]}
    if revoked:
        found["extension"] = [{"url": terminology.extension_url("revoked-on"), "valueDateTime": revoked}]
    return found


@pytest.fixture
def gate(store: Store) -> PrivacyGate:  # noqa: F811 - the imported fixture
    audit = AuditLog(store, flush_interval=30)
    yield PrivacyGate(store, audit, clock=lambda: AT)
    audit.close()


def stored(store: Store, *resources: JSON) -> list[JSON]:  # noqa: F811
    return [store.update(r["resourceType"], r["id"], r).resource for r in resources]


def events(gate: PrivacyGate) -> list[JSON]:
    gate.audit.flush()
    return [s.resource for s in gate.store.search("AuditEvent", sort="_id", count=100).entries]


def entities(found: JSON, role: str = "4") -> list[str]:
    return [e["what"]["reference"] for e in found.get("entity", ()) if e["role"]["code"] == role]


TO_A = Recipient(references=frozenset({ORG_A}))


# --- the decision, from the store ----------------------------------------------------------------------


def test_part2_data_is_withheld_without_a_consent_and_each_part_is_audited(gate, store):  # noqa: F811
    resources = stored(store, condition("F11.20", "c1"), condition("F33.1", "c2"), {"resourceType": "Practitioner", "id": "dr1"})
    released = gate.release(resources, TO_A, exit="rest", who="lakeside-ehr")
    assert [r["id"] for r in released.permitted] == ["c2", "dr1"]
    assert released.withheld_count == 1 and released.notice is None
    disclosed, withheld = sorted(events(gate), key=lambda e: e["outcome"])
    assert entities(disclosed) == ["Condition/c2/_history/1"]  # directory data is nobody's record
    assert entities(disclosed, "1") == ["Patient/p1"]
    assert entities(withheld) == ["Condition/c1/_history/1"] and withheld["outcome"] == "4"
    assert "42 CFR Part 2 data without a consent" in withheld["outcomeDesc"]
    assert [a["altId"] for a in disclosed["agent"] if a["requestor"]] == ["lakeside-ehr"]


def test_a_part2_consent_in_the_store_lets_it_out_labelled_with_the_notice(gate, store):  # noqa: F811
    stored(store, consent("k1"))
    resources = stored(store, prescription(BUPRENORPHINE, "m1"))
    released = gate.release(resources, TO_A, exit="sync:ehr", who="ehr")
    (out,) = released.permitted
    assert act("NORDSCLCD") in security(out) and released.notice == NOTICE
    (disclosed,) = events(gate)
    assert entities(disclosed, "13") == ["Consent/k1"] and disclosed["extension"][0]["valueString"] == "sync:ehr"


def test_a_consent_for_another_patient_or_recipient_permits_nothing(gate, store):  # noqa: F811
    stored(store, consent("k1", patient="Patient/p2"), consent("k2", recipient="Organization/org-b"), consent("k3", part2=False))
    resources = stored(store, prescription(BUPRENORPHINE, "m1"))
    assert gate.release(resources, TO_A, exit="rest", who="app").withheld_count == 1


def test_a_recipient_named_by_identifier_is_known_by_the_stored_organization(gate, store):  # noqa: F811
    identifier = {"system": NPI_A[0], "value": NPI_A[1]}
    stored(store, {"resourceType": "Organization", "id": "org-a", "identifier": [identifier]}, consent("k1"))
    resources = stored(store, prescription(BUPRENORPHINE, "m1"))
    by_npi = Recipient(identifiers=frozenset({NPI_A}))
    assert gate.known(by_npi).references == frozenset({ORG_A})
    assert gate.release(resources, by_npi, exit="rest", who="app").withheld_count == 0


def test_a_revoked_consent_stops_disclosure_from_its_moment(gate, store):  # noqa: F811
    revoked = AT + timedelta(hours=2)
    stored(store, consent("k1", revoked=revoked.isoformat().replace("+00:00", "Z")))
    resources = stored(store, prescription(BUPRENORPHINE, "m1"))
    assert gate.release(resources, TO_A, exit="rest", who="app", at=revoked - timedelta(seconds=1)).withheld_count == 0
    assert gate.release(resources, TO_A, exit="rest", who="app", at=revoked).withheld_count == 1
    assert gate.release(resources, TO_A, exit="rest", who="app", at=revoked + timedelta(days=1)).withheld_count == 1


def test_break_the_glass_lets_part2_out_and_is_audited_as_such(gate, store):  # noqa: F811
    resources = stored(store, prescription(BUPRENORPHINE, "m1"))
    released = gate.release(resources, Recipient(purpose="ETREAT"), exit="rest", who="er-app")
    assert act("NORDSCLCD") in security(released.permitted[0])
    assert (terminology.V3_ACT_REASON, "ETREAT") in security(released.permitted[0])
    (disclosed,) = events(gate)
    assert {"system": AUDIT_CODES, "code": "break-the-glass"}.items() <= disclosed["subtype"][-1].items()
    assert [c["coding"][0]["code"] for c in disclosed["purposeOfEvent"]] == ["ETREAT"]


def test_the_purpose_given_is_the_one_decided_and_audited(gate, store):  # noqa: F811
    resources = stored(store, prescription(SERTRALINE, "m1"))
    assert gate.release(resources, TO_A, exit="rest", who="app").withheld_count == 0
    research = gate.release(resources, TO_A, exit="rest", who="app", purpose="HRESCH")
    assert research.withheld_count == 1  # research needs a consent even for ordinary data
    assert sorted((e["outcome"], c["coding"][0]["code"]) for e in events(gate) for c in e["purposeOfEvent"]) == [("0", "TREAT"), ("4", "HRESCH")]


def test_one_event_per_patient(gate, store):  # noqa: F811
    resources = stored(store, condition("F33.1", "c1"), condition("F33.1", "c2", patient="Patient/p2"), condition("F41.1", "c3"))
    gate.release(resources, TO_A, exit="rest", who="app")
    found = {entities(e, "1")[0]: entities(e) for e in events(gate)}
    assert found == {"Patient/p1": ["Condition/c1/_history/1", "Condition/c3/_history/1"], "Patient/p2": ["Condition/c2/_history/1"]}


def test_an_exit_that_failed_records_only_what_was_withheld(gate, store):  # noqa: F811
    resources = stored(store, condition("F11.20", "c1"), condition("F33.1", "c2"))
    decided = gate.disclosure(resources, TO_A)
    gate.audit_disclosure(decided, resources, TO_A, exit="rest", who="app", delivered=False)
    assert [e["outcome"] for e in events(gate)] == ["4"]


def test_consents_are_read_per_patient_and_an_unreadable_one_permits_nothing(gate, store, caplog):  # noqa: F811
    nested = consent("k2")
    nested["provision"]["provision"] = [{"type": "deny"}]
    stored(store, consent("k1"), nested, consent("k3", patient="Patient/p2"))
    terms = gate.consents(["p1"])
    assert [t.id for t in terms] == ["Consent/k1"]
    assert "Consent/k2 permits nothing" in caplog.text and "Consent.provision.provision" in caplog.text
    assert {t.id for t in gate.consents(["Patient/p1", "Patient/p2"])} == {"Consent/k1", "Consent/k3"}
    assert gate.consents([]) == []


def test_combine_joins_the_pieces_of_one_response():
    first = Disclosure(({"resourceType": "Condition", "id": "c1"},), 1, 0, None, {})
    second = Disclosure(({"resourceType": "Condition", "id": "c2"},), 2, 1, NOTICE, {})
    joined = combine([first, second])
    assert [r["id"] for r in joined.permitted] == ["c1", "c2"]
    assert (joined.withheld_count, joined.redacted_count, joined.notice) == (3, 1, NOTICE)


# --- who a REST client is -----------------------------------------------------------------------------

CLIENTS = [
    {"client_id": "riverbend-ehr", "internal": True},
    {"client_id": "lakeside-ehr", "name": "Lakeside", "organization": [f"{NPI_A[0]}|{NPI_A[1]}", "Organization/org-a"], "practitioner": "Practitioner/dr1"},
    {"client_id": "billing", "organization": "Organization/payer", "purpose": "HPAYMT"},
]
SETTINGS = {"client": CLIENTS}


def client(client_id: str, **claims: Any) -> Client:
    return Client.from_claims({"client_id": client_id, "scope": "system/*.rs", **claims})


def test_the_program_itself_is_no_recipient():
    assert recipient_for_client(None, SETTINGS) is None
    assert recipient_for_client(DEVELOPMENT_CLIENT, SETTINGS) is None
    assert recipient_for_client(client("riverbend-ehr"), SETTINGS) is None


def test_a_mapped_client_is_its_organizations_and_practitioners():
    found = recipient_for_client(client("lakeside-ehr"), SETTINGS)
    assert found == Recipient(references=frozenset({ORG_A, "Practitioner/dr1"}), identifiers=frozenset({NPI_A}), purpose="TREAT")
    assert recipient_for_client(client("billing"), SETTINGS).purpose == "HPAYMT"


def test_an_unmapped_client_is_a_recipient_nobody_could_name():
    assert recipient_for_client(client("stranger"), SETTINGS) == Recipient()
    assert recipient_for_client(client("stranger"), {}) == Recipient()


def test_the_tokens_purpose_and_break_the_glass():
    assert recipient_for_client(client("billing", purpose_of_use="TREAT"), SETTINGS).purpose == "TREAT"
    several = client("lakeside-ehr", purposeOfUse=[{"system": terminology.V3_ACT_REASON, "code": "COC"}, {"code": "ETREAT"}])
    assert recipient_for_client(several, SETTINGS).emergency
    flagged = recipient_for_client(client("lakeside-ehr", break_glass=True), SETTINGS)
    assert flagged.break_glass and flagged.purpose == "TREAT" and flagged.emergency
    assert not recipient_for_client(client("lakeside-ehr", break_glass="no"), SETTINGS).break_glass


def test_client_tables_are_checked_and_every_mistake_located():
    assert set(load_clients(SETTINGS)) == {"riverbend-ehr", "lakeside-ehr", "billing"}
    wrong = [
        {"client_id": "a", "organisation": "Organization/x"},
        {"name": "no id"},
        {"client_id": "b", "organization": "Practitioner/p", "practitioner": ["|123"], "purpose": "treat"},
        {"client_id": "c", "internal": True, "organization": "Organization/x"},
        {"client_id": "d", "internal": "yes"},
        {"client_id": "e"},
        {"client_id": "e"},
        "not a table",
    ]
    with pytest.raises(ConfigError) as raised:
        load_clients({"client": wrong})
    where = [i.location for i in raised.value.issues]
    assert where == [
        "client[0] ('a').organisation",
        "client[1].client_id",
        "client[2] ('b').organization",
        "client[2] ('b').practitioner",
        "client[2] ('b').purpose",
        "client[3] ('c').internal",
        "client[4] ('d').internal",
        "client[6].client_id",
        "client[7]",
    ]
    with pytest.raises(ConfigError, match=r"array of tables"):
        load_clients({"client": "lakeside"})
