"""Program, pharmacies and outside providers <-> Organization / Practitioner.

The party strategies (names, addresses, contacts, NPIs) and the round-trip helpers the party
tests share live in tests/strategies.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import LOCAL_IDS, NPIS, PLACES, SETTINGS, TEXT, assert_lossless, reverse, with_parts

from iop_fhir import terminology
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers import organization
from iop_fhir.mappers.context import MappingContext
from iop_fhir.mappers.datatypes import choices
from iop_fhir.mappers.ids import default_system_base
from iop_fhir.record.model import Pharmacy, Program, Provider


@st.composite
def programs(draw: st.DrawFn) -> dict:
    program = draw(
        st.fixed_dictionaries(
            {"id": LOCAL_IDS, "name": TEXT, "level_of_care": st.sampled_from(sorted(choices(Program, "level_of_care"))),
             "focus": st.sampled_from(sorted(choices(Program, "focus")))},
            optional={
                "npi": NPIS,
                "identifiers": st.lists(st.fixed_dictionaries({"system": st.sampled_from(["urn:oid:2.16.840.1.113883.4.4", "http://example.org/licence"]), "value": TEXT}), max_size=3),
                **PLACES,
            },
        )
    )
    bases = ["https://ids.example.org/riverbend", "urn:oid:1.2.3.4.5", "https://ids.example.org/slash/", default_system_base(program["id"])]
    if draw(st.booleans()):
        program["identifier_system"] = draw(st.sampled_from(bases))
    return program


def parties(prefix: str, fields: dict, optional: dict) -> st.SearchStrategy[list[dict]]:
    item = st.fixed_dictionaries({"id": LOCAL_IDS.map(lambda s: f"{prefix}-{s}"), **fields}, optional={**optional, **PLACES})
    return st.lists(item, max_size=3, unique_by=lambda p: p["id"])


PHARMACIES = parties("ph", {"name": TEXT, "ncpdp_id": st.from_regex(r"[0-9]{7}", fullmatch=True)},
                     {"npi": NPIS, "kind": st.sampled_from(sorted(choices(Pharmacy, "kind")))})
PROVIDERS = parties("pr", {"name": TEXT, "kind": st.sampled_from(sorted(choices(Provider, "kind")))}, {"npi": NPIS})


# --- forward ---------------------------------------------------------------------------------


def test_example_program_organization(example_record):
    program = organization.to_fhir(MappingContext(example_record))[0]
    assert validate_resource(program) == []
    assert program["meta"]["profile"] == [terminology.us_core("us-core-organization")]
    assert program["identifier"] == [
        {"use": "usual", "system": "https://iop-fhir.org/fhir/sid/riverbend-iop/organization", "value": "riverbend-iop"},
        {"system": terminology.NPI, "value": "1234567893"},
        {"system": "urn:oid:2.16.840.1.113883.4.4", "value": "84-1234567"},
    ]
    assert program["active"] is True and program["name"] == "Riverbend Intensive Outpatient Program"
    codes = [(c["system"], c["code"]) for t in program["type"] for c in t["coding"]]
    assert (terminology.code_system("level-of-care"), "hybrid-IOP") in codes
    assert (terminology.code_system("program-focus"), "co-occurring") in codes
    assert program["address"][0]["use"] == "work" and program["address"][0]["line"] == ["400 River Road", "Suite 2"]
    assert {"system": "email", "value": "intake@riverbend.example", "use": "work"} in program["telecom"]
    assert "extension" not in program  # no identifier_system: nothing beyond the identifiers


def test_example_pharmacy_and_provider(example_record):
    resources = organization.to_fhir(MappingContext(example_record))
    pharmacy, provider = resources[1], resources[2]
    assert [validate_resource(r) for r in resources] == [[], [], []]
    assert pharmacy["identifier"][1] == {"system": terminology.NCPDP_PROVIDER, "value": "1234567"}
    assert pharmacy["identifier"][2] == {"system": terminology.NPI, "value": "1316945652"}
    assert {"system": terminology.code_system("pharmacy-kind"), "code": "retail", "display": "Retail pharmacy"} in pharmacy["type"][1]["coding"]
    assert provider["resourceType"] == "Organization" and provider["name"] == "Lakeside Community Behavioral Health"
    assert provider["id"] == MappingContext(example_record).provider("pr-1")["reference"].removeprefix("urn:uuid:")


def test_person_provider_is_a_us_core_practitioner(example_json):
    record = with_parts(example_json, providers=[{"id": "pr-9", "kind": "practitioner", "name": "Dr. Ana María Pérez-Ruiz, MD", "npi": "1932102084"}])
    practitioner = organization.to_fhir(MappingContext(record))[1]
    assert validate_resource(practitioner) == []
    assert practitioner["resourceType"] == "Practitioner"
    assert practitioner["meta"]["profile"] == [terminology.us_core("us-core-practitioner")]
    assert practitioner["name"] == [{"text": "Dr. Ana María Pérez-Ruiz, MD", "family": "Pérez-Ruiz"}]
    draft, report = reverse([practitioner], organization)
    assert draft["providers"] == [{"id": "pr-9", "kind": "practitioner", "name": "Dr. Ana María Pérez-Ruiz, MD", "npi": "1932102084"}]


@pytest.mark.parametrize(
    "system, extension",
    [
        (None, False),
        ("https://ids.example.org/riverbend", False),  # the base carries it
        ("https://ids.example.org/riverbend/", True),  # ids strip the "/"
        ("https://iop-fhir.org/fhir/sid/riverbend-iop", True),  # the default, spelled out
    ],
)
def test_identifier_system_round_trips(example_json, system, extension):
    program = {**example_json["program"], "identifier_system": system}
    record = with_parts(example_json, program=program)
    resources = organization.to_fhir(MappingContext(record))
    assert ("extension" in resources[0]) is extension
    draft, report = reverse(resources, organization)
    assert Program.model_validate(draft["program"]) == record.program
    assert report.issues == []


# --- round trips -----------------------------------------------------------------------------


def test_example_round_trip(example_record):
    assert_lossless(example_record, (organization,), program=Program, pharmacies=Pharmacy, providers=Provider)


@SETTINGS
@given(program=programs(), pharmacies=PHARMACIES, providers=PROVIDERS)
def test_any_parties_round_trip(example_json, program, pharmacies, providers):
    record = with_parts(example_json, program=program, pharmacies=pharmacies, providers=providers)
    assert_lossless(record, (organization,), program=Program, pharmacies=Pharmacy, providers=Provider)


# --- foreign FHIR ----------------------------------------------------------------------------

FOREIGN_PROGRAM = {
    "resourceType": "Organization",
    "id": "clinic",
    "name": "Hillside Recovery",
    "type": [{"coding": [{"system": terminology.code_system("level-of-care"), "code": "IOP"}]}],
}
FOREIGN_PATIENT = {"resourceType": "Patient", "id": "p1", "managingOrganization": {"reference": "Organization/clinic"}}


def test_foreign_program_is_the_managing_organization_and_needs_our_codes():
    draft, report = reverse([FOREIGN_PROGRAM, FOREIGN_PATIENT], organization)
    assert "program" not in draft
    errors = [i for i in report.errors if i.location == "Organization/clinic.type"]
    assert len(errors) == 1 and "program focus" in errors[0].message


def test_foreign_pharmacy_by_ncpdp_id_and_foreign_provider():
    pharmacy = {
        "resourceType": "Organization",
        "id": "rx1",
        "name": "Corner Drug",
        "identifier": [{"system": "http://example.org/ncpdp", "value": "7654321"}],
        "extension": [{"url": "http://example.org/loyalty", "valueString": "gold"}],
    }
    clinic = {"resourceType": "Organization", "id": "lab", "name": "Acme Labs", "address": [{"line": "5 Main", "city": "X", "state": "IL", "postalCode": "62701"}]}
    person = {"resourceType": "Practitioner", "id": "doc", "name": [{"given": ["Ann"], "family": "Lee", "prefix": ["Dr."]}]}
    draft, report = reverse([pharmacy, clinic, person], organization)
    assert draft["pharmacies"] == [{"id": "rx1", "name": "Corner Drug", "ncpdp_id": "7654321"}]
    assert draft["providers"] == [
        {"id": "lab", "kind": "organization", "name": "Acme Labs"},  # "line" as a string: no address
        {"id": "doc", "kind": "practitioner", "name": "Dr. Ann Lee"},
    ]
    messages = [(i.severity, i.location) for i in report.issues]
    assert ("information", "Organization/rx1.identifier") in messages  # NCPDP read from another system
    assert ("warning", "Organization/rx1.extension") in messages
    assert ("error", "Organization") in messages  # no program at all


def test_pharmacy_without_ncpdp_id_is_an_error():
    pharmacy = {"resourceType": "Organization", "id": "rx2", "name": "Mail Meds", "type": [{"coding": [{"system": terminology.code_system("pharmacy-kind"), "code": "mail-order"}]}]}
    draft, report = reverse([pharmacy], organization)
    assert draft["pharmacies"] == []
    assert any(i.location == "Organization/rx2.identifier" and "NCPDP" in i.message for i in report.errors)


@pytest.mark.parametrize(
    "garbage",
    [
        {"name": ["not", "a", "string"], "identifier": "abc", "telecom": 5, "address": "somewhere", "type": "pharmacy"},
        {"identifier": [None, 3, {"system": 4, "value": []}], "type": [{"coding": "x"}], "extension": "x", "id": 12},
        {"managingOrganization": [], "name": None, "address": [None, {"line": "Elm"}]},
    ],
)
def test_garbage_shapes_never_crash(garbage):
    resources = [{"resourceType": "Organization", **garbage}, {"resourceType": "Practitioner", **garbage}, {**FOREIGN_PATIENT, **garbage}]
    draft, report = reverse(resources, organization)
    assert report.errors  # unmappable parties are reported, not dropped silently
    assert isinstance(draft["providers"], list) and isinstance(draft["pharmacies"], list)
