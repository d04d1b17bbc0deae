"""Consents <-> Consent (read back after organization.py has filled the recipients)."""

from __future__ import annotations

import copy
import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import LOCAL_IDS, SETTINGS, assert_lossless, reverse, with_parts

from iop_fhir import terminology
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers import consent, organization
from iop_fhir.mappers.context import MappingContext
from iop_fhir.mappers.datatypes import choices
from iop_fhir.record.model import Consent

DAYS = st.dates(dt.date(2025, 1, 1), dt.date(2028, 12, 31))
REVOKED_URL = terminology.extension_url("revoked-on")
DATA_CATEGORY = terminology.code_system("data-category")


@st.composite
def consents(draw: st.DrawFn) -> list[dict]:
    out = []
    for cid in draw(st.lists(LOCAL_IDS, max_size=4, unique=True)):
        start, signed = draw(DAYS), draw(DAYS)
        item = {
            "id": cid,
            "recipient_id": draw(st.sampled_from(["ph-1", "pr-1"])),
            "purpose": draw(st.sampled_from(sorted(choices(Consent, "purpose")))),
            "categories": draw(st.lists(st.sampled_from(sorted(choices(Consent, "categories"))), min_size=1, max_size=10, unique=True)),
            "period": {"start": start.isoformat()},
            "part2": draw(st.booleans()),
            "signed": signed.isoformat(),
        }
        if draw(st.booleans()):
            item["period"]["end"] = (start + dt.timedelta(days=draw(st.integers(0, 800)))).isoformat()
        if draw(st.booleans()):
            item["revoked_on"] = (signed + dt.timedelta(days=draw(st.integers(0, 400)))).isoformat()
        out.append(item)
    return out


def parties_and(example_json: dict, **parts: object):
    return with_parts(example_json, pharmacies=example_json["pharmacies"], providers=example_json["providers"], **parts)


def test_example_consents(example_record):
    ctx = MappingContext(example_record)
    part2, revoked = consent.to_fhir(ctx)
    assert validate_resource(part2) == [] and validate_resource(revoked) == []
    assert part2["status"] == "active" and "extension" not in part2
    assert part2["scope"]["coding"] == [{"system": terminology.CONSENT_SCOPE, "code": "patient-privacy", "display": "Privacy Consent"}]
    assert [c["coding"][0]["code"] for c in part2["category"]] == ["59284-0", "IDSCL"]
    assert part2["patient"] == ctx.patient and part2["organization"] == [ctx.organization]
    assert part2["dateTime"] == "2026-02-20"
    assert part2["policy"] == [{"uri": "https://www.ecfr.gov/current/title-42/chapter-I/subchapter-A/part-2"}]
    provision = part2["provision"]
    assert provision["type"] == "permit" and provision["period"] == {"start": "2026-02-20", "end": "2027-02-20"}
    assert provision["actor"] == [
        {"role": {"coding": [{"system": terminology.V3_PARTICIPATION_TYPE, "code": "IRCP", "display": "information recipient"}]}, "reference": ctx.provider("pr-1")}
    ]
    assert provision["action"][0]["coding"][0]["code"] == "disclose"
    assert provision["purpose"] == [{"system": terminology.V3_ACT_REASON, "code": "TREAT", "display": "treatment"}]
    assert [c["coding"][0] for c in provision["code"]][0] == {"system": DATA_CATEGORY, "code": "medications", "display": "Medications"}
    assert revoked["status"] == "inactive" and revoked["extension"] == [{"url": REVOKED_URL, "valueDate": "2026-02-01"}]
    assert revoked["provision"]["actor"][0]["reference"] == ctx.pharmacy("ph-1")


def test_not_part2_uses_the_hipaa_policy_rule(example_json):
    item = {**example_json["consents"][0], "part2": False}
    (resource,) = consent.to_fhir(MappingContext(parties_and(example_json, consents=[item])))
    assert "policy" not in resource
    assert resource["policyRule"]["coding"][0]["code"] == "hipaa-auth"


def test_example_round_trip(example_record):
    assert_lossless(example_record, (organization, consent), consents=Consent)


@SETTINGS
@given(items=consents())
def test_any_consents_round_trip(example_json, items):
    assert_lossless(parties_and(example_json, consents=items), (organization, consent), consents=Consent)


# --- foreign FHIR ----------------------------------------------------------------------------


@pytest.fixture
def ours(example_record) -> list[dict]:
    """The example's parties and its first consent, to be spoiled in foreign ways."""
    ctx = MappingContext(example_record)
    return organization.to_fhir(ctx) + [copy.deepcopy(consent.to_fhir(ctx)[0])]


def test_unknown_recipient_is_an_error(ours):
    ours[-1]["provision"]["actor"][0]["reference"] = {"reference": "https://other.example/fhir/Organization/elsewhere"}
    draft, report = reverse(ours, organization, consent)
    assert draft["consents"] == []
    assert [(i.location, i.code) for i in report.errors] == [("Consent/" + ours[-1]["id"] + ".provision.actor", "not-found")]


def test_recipient_in_the_bundle_but_not_a_party_is_an_error(ours):
    ours.append({"resourceType": "Patient", "id": "someone"})
    ours[-2]["provision"]["actor"][0]["reference"] = {"reference": "Patient/someone"}
    draft, report = reverse(ours, organization, consent)
    assert draft["consents"] == [] and "not among" in report.errors[0].message


def test_foreign_recipient_by_absolute_reference(ours):
    clinic = {"resourceType": "Organization", "id": "clinic9", "name": "Clinic Nine"}
    ours[-1]["provision"]["actor"][0]["reference"] = {"reference": "https://ehr.example/fhir/Organization/clinic9"}
    draft, report = reverse([*ours[:-1], clinic, ours[-1]], organization, consent)
    assert [c["recipient_id"] for c in draft["consents"]] == ["clinic9"]


@pytest.mark.parametrize(
    "spoil, fragment",
    [
        (lambda c: c["provision"].update(provision=[{"type": "deny", "code": [{"text": "HIV"}]}]), "nested provisions"),
        (lambda c: c["provision"].update(securityLabel=[{"code": "HIV"}]), "securityLabel"),
        (lambda c: c["provision"].update(code=[{"coding": [{"system": "http://loinc.org", "code": "11503-0"}]}]), "data codes"),
        (lambda c: c["provision"].update(type="deny"), "only permits"),
        (lambda c: c["provision"].update(modifierExtension=[{"url": "http://x.example/not", "valueBoolean": True}]), "modifier"),
        (lambda c: c.update(modifierExtension=[{"url": "http://x.example/not", "valueBoolean": True}]), "modifier"),
        (lambda c: c.update(status="inactive"), "revocation date"),
        (lambda c: c["provision"].update(purpose=[{"system": "http://x.example", "code": "TREAT"}]), "purpose"),
    ],
)
def test_what_would_widen_or_misread_a_consent_is_left_out(ours, spoil, fragment):
    spoil(ours[-1])
    draft, report = reverse(ours, organization, consent)
    assert draft["consents"] == []
    assert len(report.errors) == 1 and fragment in report.errors[0].message


def test_foreign_consent_without_data_codes_covers_all_and_dates_fill_in(ours):
    c = ours[-1]
    del c["provision"]["code"], c["provision"]["period"], c["policy"], c["policyRule"]
    c["provision"]["actor"][0]["role"] = {"text": "recipient"}
    draft, report = reverse(ours, organization, consent)
    (item,) = draft["consents"]
    assert (item["categories"], item["period"], item["part2"]) == (["all"], {"start": "2026-02-20"}, False)
    assert {i.severity for i in report.issues} == {"information"}


def test_proposed_consents_are_not_in_force(ours):
    ours[-1]["status"] = "proposed"
    draft, report = reverse(ours, organization, consent)
    assert draft["consents"] == [] and report.issues[-1].severity == "warning"


@pytest.mark.parametrize(
    "garbage",
    [
        {"provision": "permit", "status": "active"},
        {"provision": {"type": "permit", "actor": "everyone", "purpose": "TREAT"}, "status": "active"},
        {"provision": {"type": "permit", "actor": [{"reference": {"reference": 7}}], "code": "all"}, "status": "active", "policy": "part2"},
        {"status": ["active"], "extension": [{"url": REVOKED_URL, "valueDate": 5}]},
    ],
)
def test_garbage_shapes_never_crash(ours, garbage):
    ours[-1] = {"resourceType": "Consent", "id": "g", **garbage}
    draft, report = reverse(ours, organization, consent)
    assert draft["consents"] == [] and report.issues
