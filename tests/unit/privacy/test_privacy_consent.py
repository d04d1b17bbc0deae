"""Consent terms from FHIR, and the decision rule by rule."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest
from privacy_helpers import condition, observation, of_type, prescription, resources_of

from iop_fhir import terminology
from iop_fhir.errors import RecordInvalid
from iop_fhir.mappers.datatypes import extension
from iop_fhir.privacy import ConsentTerms, Decision, Recipient, decide, label, read_terms, terms_from_fhir

AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
AFTERCARE = "Organization/after"
PATIENT = "Patient/p1"


def terms(**given: object) -> ConsentTerms:
    base: dict = {
        "id": "Consent/k1",
        "patient": PATIENT,
        "recipients": frozenset({AFTERCARE}),
        "purposes": frozenset({"TREAT"}),
        "categories": frozenset({"all"}),
        "period": (datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        "part2": True,
    }
    return ConsentTerms(**(base | given))


def to(purpose: str = "TREAT", reference: str = AFTERCARE, **given: object) -> Recipient:
    return Recipient(references=frozenset({reference}), purpose=purpose, **given)


SUD = label(condition("F11.20"))
MH = label(condition("F33.1"))
ORDINARY = label(observation("8867-4", "vital-signs"))


def verdict(resource: dict, recipient: Recipient, *consents: ConsentTerms, at: datetime = AT):
    return decide(resource, recipient, consents, at=at)


# --- reading consents ------------------------------------------------------------------------------


def test_our_consents_read_back_exactly(example_json):
    cn1, cn2 = (read_terms(c) for c in of_type(resources_of(example_json), "Consent"))
    assert cn1.part2 and cn1.status == "active" and cn1.revoked_at is None and not cn1.deny
    assert cn1.purposes == {"TREAT"}
    assert cn1.categories == {"medications", "diagnoses", "care-plan", "discharge"}
    assert cn1.period == (datetime(2026, 2, 20, tzinfo=UTC), datetime(2027, 2, 21, tzinfo=UTC))  # the end day counts whole
    assert len(cn1.recipients) == 1 and cn1.patient and cn1.id and cn1.id.startswith("Consent/")
    assert cn2.status == "inactive" and cn2.revoked_at == datetime(2026, 2, 1, tzinfo=UTC) and cn2.period[1] is None


def _foreign() -> dict:
    return {
        "resourceType": "Consent",
        "id": "f1",
        "status": "active",
        "scope": {"coding": [{"system": terminology.CONSENT_SCOPE, "code": "patient-privacy"}]},
        "patient": {"reference": "https://ehr.example/fhir/Patient/p1"},
        "dateTime": "2026-01-10T09:30:00-05:00",
        "policyRule": {"coding": [{"system": terminology.V3_ACT_CODE, "code": "42CFRPart2"}]},
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {"coding": [{"system": terminology.V3_PARTICIPATION_TYPE, "code": "PRCP"}]},
                    "reference": {"identifier": {"system": terminology.NPI, "value": "1234567893"}},
                }
            ],
            "purpose": [{"system": terminology.V3_ACT_REASON, "code": "COC"}],
        },
    }


def test_a_foreign_consent():
    found = read_terms(_foreign())
    assert found.patient == "Patient/p1" and found.part2
    assert found.recipient_identifiers == {(terminology.NPI, "1234567893")} and not found.recipients
    assert found.categories == {"all"}  # no data named: all of it
    assert found.period == (datetime(2026, 1, 10, 14, 30, tzinfo=UTC), None)  # signed then, no end
    npi = Recipient(identifiers=frozenset({(terminology.NPI, "1234567893")}), purpose="COC")
    assert verdict(SUD, npi, found).decision is Decision.PERMIT


@pytest.mark.parametrize(
    ("change", "location"),
    [
        (lambda c: c["provision"].update(provision=[{"type": "deny", "code": [{"text": "HIV"}]}]), "Consent.provision.provision"),
        (lambda c: c["provision"].update({"class": [{"code": "Observation"}]}), "Consent.provision"),
        (lambda c: c["provision"].update(securityLabel=[{"system": terminology.V3_ACT_CODE, "code": "SUD"}]), "Consent.provision"),
        (lambda c: c["provision"].update(actor=[]), "Consent.provision.actor"),
        (lambda c: c["provision"]["actor"][0].update(role={"coding": [{"system": terminology.V3_PARTICIPATION_TYPE, "code": "CST"}]}), "Consent.provision.actor"),
        (lambda c: c["provision"].update(purpose=[]), "Consent.provision.purpose"),
        (lambda c: c["provision"].update(code=[{"coding": [{"system": "http://loinc.org", "code": "11450-4"}]}]), "Consent.provision.code"),
        (lambda c: c["provision"].update(action=[{"coding": [{"system": terminology.CONSENT_ACTION, "code": "collect"}]}]), "Consent.provision.action"),
        (lambda c: c.update(scope={"coding": [{"system": terminology.CONSENT_SCOPE, "code": "treatment"}]}), "Consent.scope"),
        (lambda c: c.update(status="approved"), "Consent.status"),
        (lambda c: c["provision"].pop("type"), "Consent.provision.type"),
        (lambda c: c.pop("dateTime"), "Consent.provision.period.start"),
        (lambda c: c["provision"].update(period={"start": "2026-02-30"}), "Consent.provision.period.start"),
        (lambda c: c.update(modifierExtension=[{"url": "https://x.example/m", "valueBoolean": True}]), "Consent.modifierExtension"),
    ],
)
def test_a_permit_read_loosely_would_widen_so_it_is_refused(change, location):
    consent = _foreign()
    change(consent)
    with pytest.raises(RecordInvalid) as caught:
        read_terms(consent)
    assert location in {issue.location for issue in caught.value.issues}
    assert terms_from_fhir(consent) is None


def test_a_deny_may_be_read_wider():
    consent = _foreign()
    consent["provision"].update(type="deny", actor=[], purpose=[], securityLabel=[{"system": terminology.V3_ACT_CODE, "code": "PSY"}])
    consent["provision"]["code"] = [{"coding": [{"system": "http://loinc.org", "code": "11450-4"}]}]
    found = read_terms(consent)
    assert found.deny and found.categories == {"all"} and not found.recipients
    assert verdict(ORDINARY, to("HPAYMT"), found).decision is Decision.DENY  # refuses everyone, every purpose


def test_not_a_consent():
    with pytest.raises(RecordInvalid):
        read_terms({"resourceType": "Patient"})


# --- Part 2 data ------------------------------------------------------------------------------------


def test_part2_data_goes_only_under_a_matching_part2_consent():
    found = verdict(SUD, to(), terms())
    assert (found.decision, found.consent, found.part2, found.break_glass) == (Decision.PERMIT, "Consent/k1", True, False)
    assert verdict(SUD, to()).decision is Decision.DENY  # no consent at all: not even for treatment


@pytest.mark.parametrize(
    "mismatch",
    [
        {"recipients": frozenset({"Organization/other"})},
        {"purposes": frozenset({"HPAYMT"})},
        {"categories": frozenset({"medications", "drug-screens"})},
        {"part2": False},
        {"patient": "Patient/someone-else"},
        {"period": (AT + timedelta(seconds=1), None)},
        {"period": (None, AT)},
        {"status": "draft"},
        {"status": "rejected"},
        {"status": "inactive"},  # no longer in force, since an unknown moment
        {"revoked_at": AT},
        {"deny": True},
    ],
)
def test_part2_data_is_withheld_when_any_term_does_not_match(mismatch):
    assert verdict(SUD, to(), terms(**mismatch)).decision is Decision.DENY


def test_a_consent_for_treatment_covers_coordination_of_care_and_emergencies():
    assert verdict(SUD, to("COC"), terms()).decision is Decision.PERMIT
    found = verdict(SUD, to("ETREAT"), terms())
    assert found.decision is Decision.PERMIT and found.consent == "Consent/k1" and not found.break_glass
    assert verdict(SUD, to("TREAT"), terms(purposes=frozenset({"COC"}))).decision is Decision.DENY  # not the other way round


def test_a_category_covers_what_falls_under_it():
    assert verdict(SUD, to(), terms(categories=frozenset({"diagnoses"}))).decision is Decision.PERMIT
    assert verdict(label(prescription("1010604")), to(), terms(categories=frozenset({"diagnoses"}))).decision is Decision.DENY


def test_revocation_takes_effect_at_its_moment():
    revoked = terms(status="inactive", revoked_at=AT)
    assert verdict(SUD, to(), revoked, at=AT - timedelta(microseconds=1)).decision is Decision.PERMIT  # judged before it
    assert verdict(SUD, to(), revoked, at=AT).decision is Decision.DENY
    assert verdict(SUD, to(), revoked, at=AT + timedelta(days=30)).decision is Decision.DENY


def test_recipients_match_by_reference_form_or_identifier():
    bundle_form = terms(recipients=frozenset({"urn:uuid:after"}))
    assert verdict(SUD, to(reference="Organization/after"), bundle_form).decision is Decision.PERMIT
    absolute = to(reference="https://gw.example/fhir/Organization/after/_history/3")
    assert verdict(SUD, absolute, terms()).decision is Decision.PERMIT
    by_npi = terms(recipients=frozenset(), recipient_identifiers=frozenset({(terminology.NPI, "1234567893")}))
    assert verdict(SUD, Recipient(identifiers=frozenset({(terminology.NPI, "1234567893")})), by_npi).decision is Decision.PERMIT
    assert verdict(SUD, Recipient(identifiers=frozenset({(terminology.NPI, "1111111111")})), by_npi).decision is Decision.DENY


def test_break_the_glass():
    for emergency in (to("ETREAT"), to("TREAT", break_glass=True)):
        found = verdict(SUD, emergency)
        assert (found.decision, found.break_glass, found.part2, found.consent) == (Decision.PERMIT, True, True, None)


# --- other data -------------------------------------------------------------------------------------


def test_mental_health_data_needs_treatment_or_a_consent():
    assert verdict(MH, to("TREAT")).decision is Decision.PERMIT
    assert verdict(MH, to("COC")).decision is Decision.PERMIT
    assert verdict(MH, to("HPAYMT")).decision is Decision.DENY
    hipaa = terms(part2=False, purposes=frozenset({"HPAYMT"}))
    found = verdict(MH, to("HPAYMT"), hipaa)
    assert found.decision is Decision.PERMIT and found.consent == "Consent/k1"


def test_ordinary_data_goes_for_the_purposes_hipaa_allows():
    for purpose in ("TREAT", "COC", "HPAYMT", "HOPERAT", "PUBHLTH", "PATRQT"):
        assert verdict(ORDINARY, to(purpose)).decision is Decision.PERMIT, purpose
    assert verdict(ORDINARY, to("HRESCH")).decision is Decision.DENY
    assert verdict(ORDINARY, to("HRESCH"), terms(part2=False, purposes=frozenset({"HRESCH"}))).decision is Decision.PERMIT


def test_psychotherapy_notes_need_a_consent_even_for_treatment():
    notes = {**ORDINARY, "meta": {"security": [{"system": terminology.V3_ACT_CODE, "code": "PSYTHPN"}]}}
    assert verdict(notes, to("TREAT")).decision is Decision.DENY
    assert verdict(notes, to("TREAT"), terms(part2=False)).decision is Decision.PERMIT


def test_a_deny_consent_refuses_even_ordinary_data_but_not_an_emergency():
    refusal = terms(deny=True, part2=False)
    found = verdict(ORDINARY, to("TREAT"), refusal)
    assert found.decision is Decision.DENY and found.consent == "Consent/k1"
    assert verdict(ORDINARY, to("TREAT", reference="Organization/other"), refusal).decision is Decision.PERMIT
    assert verdict(ORDINARY, to("ETREAT"), refusal).decision is Decision.PERMIT
    assert verdict(SUD, to(), terms(), refusal).decision is Decision.DENY  # a refusal outweighs a permit


def test_directory_data_is_nobodys_record():
    assert verdict({"resourceType": "Practitioner", "id": "d"}, to("HRESCH")).decision is Decision.PERMIT


def test_a_moment_without_a_zone_is_refused():
    with pytest.raises(ValueError):
        decide(SUD, to(), [terms()], at=datetime(2026, 3, 1))


def test_a_resource_judged_on_what_it_is_about():
    review = {"resourceType": "Task", "id": "t", "for": {"reference": PATIENT}, "focus": {"reference": "MedicationRequest/m1"}}
    held = {"MedicationRequest/m1": label(prescription("1010604"))}
    assert decide(review, to(), [], at=AT, resolve=held.get).decision is Decision.DENY
    assert decide(review, to(), [], at=AT).decision is Decision.PERMIT  # nothing known about its focus


def test_the_mat_prescription_of_the_example_under_its_consents(example_json):
    resources = resources_of(example_json)
    cn1, cn2 = (read_terms(c) for c in of_type(resources, "Consent"))
    rx3 = next(r for r in resources if r.get("identifier", [{}])[0].get("value", "").endswith("/rx-3") and r["identifier"][0]["system"].endswith("/prescription"))
    provider = Recipient(references=cn1.recipients, purpose="TREAT")
    pharmacy = Recipient(references=cn2.recipients, purpose="TREAT")
    assert decide(rx3, provider, [cn1, cn2], at=AT).decision is Decision.PERMIT
    assert decide(rx3, provider, [cn1, cn2], at=datetime(2026, 2, 19, tzinfo=UTC)).decision is Decision.DENY  # before cn-1 began
    assert decide(rx3, pharmacy, [cn1, cn2], at=datetime(2026, 1, 31, 23, 59, tzinfo=UTC)).decision is Decision.PERMIT
    assert decide(rx3, pharmacy, [cn1, cn2], at=datetime(2026, 2, 1, tzinfo=UTC)).decision is Decision.DENY  # cn-2 revoked


def test_reading_a_revocation_in_a_datetime():
    consent = _foreign()
    consent["status"] = "inactive"
    consent["extension"] = [extension("revoked-on", valueDateTime="2026-02-01T08:00:00Z")]
    found = read_terms(copy.deepcopy(consent))
    assert found.revoked_at == datetime(2026, 2, 1, 8, tzinfo=UTC)


def test_a_revocation_without_its_moment_is_refused():
    consent = _foreign()
    consent["status"] = "inactive"
    consent["extension"] = [extension("revoked-on", valueString="yesterday")]
    with pytest.raises(RecordInvalid) as caught:
        read_terms(consent)
    assert caught.value.issues[0].location == "Consent.extension(revoked-on)"
