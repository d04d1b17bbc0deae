"""The client <-> Patient."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import ADDRESSES, CONTACTS, HUMAN_NAMES, SETTINGS, TEXT, assert_lossless, reverse, with_parts

from iop_fhir import terminology
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers import patient
from iop_fhir.mappers.context import MappingContext
from iop_fhir.mappers.datatypes import choices
from iop_fhir.record.model import Client

CLIENTS = st.fixed_dictionaries(
    {
        "mrn": TEXT,
        "name": HUMAN_NAMES,
        # before the example's enrolment (2026-01-05) and its diagnoses' onsets
        "birth_date": st.dates(dt.date(1920, 1, 1), dt.date(2012, 12, 31)).map(dt.date.isoformat),
        "sex": st.sampled_from(sorted(choices(Client, "sex"))),
    },
    optional={"gender_identity": TEXT, "contact": CONTACTS, "address": ADDRESSES},
)


def test_example_patient(example_record):
    ctx = MappingContext(example_record)
    (resource,) = patient.to_fhir(ctx)
    assert validate_resource(resource) == []
    assert resource["meta"]["profile"] == [terminology.us_core("us-core-patient")]
    assert resource["id"] == ctx.patient["reference"].removeprefix("urn:uuid:")
    mrn = resource["identifier"][0]
    assert (mrn["system"], mrn["value"]) == ("https://iop-fhir.org/fhir/sid/riverbend-iop/mrn", "RB-100042")
    assert mrn["type"]["coding"] == [{"system": terminology.V2_IDENTIFIER_TYPE, "code": "MR", "display": "Medical record number"}]
    assert resource["name"] == [{"use": "official", "family": "Alvarez", "given": ["Maria", "Luisa"], "prefix": ["Ms."]}]
    assert (resource["gender"], resource["birthDate"]) == ("female", "1988-03-14")
    assert resource["extension"] == [
        {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-genderIdentity", "valueCodeableConcept": {"text": "Identifies as female"}}
    ]
    assert resource["address"][0]["use"] == "home" and resource["address"][0]["postalCode"] == "62704"
    assert {"system": "phone", "value": "217-555-0142", "use": "work"} in resource["telecom"]
    assert resource["managingOrganization"] == ctx.organization


def test_example_round_trip(example_record):
    assert_lossless(example_record, (patient,), client=Client)


@SETTINGS
@given(client=CLIENTS)
def test_any_client_round_trips(example_json, client):
    assert_lossless(with_parts(example_json, client=client), (patient,), client=Client)


# --- foreign FHIR ----------------------------------------------------------------------------

FOREIGN = {
    "resourceType": "Patient",
    "id": "ext-7",
    "identifier": [
        {"system": "http://hospital.example/ssn", "value": "999-00-1234"},
        {"system": "http://hospital.example/mrn-list", "value": "H-77", "type": {"coding": [{"system": terminology.V2_IDENTIFIER_TYPE, "code": "MR"}]}},
    ],
    "name": [{"use": "usual", "given": ["Bobby"], "family": "Tables"}, {"use": "official", "given": ["Robert"], "family": "Tables"}],
    "gender": "male",
    "birthDate": "1990-07-04",
    "extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": []}],
}


def test_foreign_patient_mr_typed_identifier_becomes_the_mrn():
    draft, report = reverse([FOREIGN], patient)
    assert draft["client"] == {"mrn": "H-77", "name": {"family": "Tables", "given": ["Robert"]}, "birth_date": "1990-07-04", "sex": "male"}
    by_location = {(i.severity, i.location): i.message for i in report.issues}
    assert "H-77" in by_location[("information", "Patient/ext-7.identifier")]
    assert "us-core-race" in by_location[("warning", "Patient/ext-7.extension")]


def test_foreign_patient_any_identifier_serves_with_a_warning():
    draft, report = reverse([{**FOREIGN, "identifier": [{"system": "http://x.example/id", "value": "42"}]}], patient)
    assert draft["client"]["mrn"] == "42"
    assert any(i.severity == "warning" and "http://x.example/id|42" in i.message for i in report.issues)


@pytest.mark.parametrize(
    "change, location",
    [
        ({"birthDate": None}, "Patient/ext-7.birthDate"),
        ({"birthDate": "1990-07"}, "Patient/ext-7.birthDate"),  # partial: the contract needs the day
        ({"name": "Bob"}, "Patient/ext-7.name"),
        ({"name": [{"text": "Bob Tables"}]}, "Patient/ext-7.name"),
        ({"gender": "M"}, "Patient/ext-7.gender"),
        ({"identifier": "H-77"}, "Patient/ext-7.identifier"),
    ],
)
def test_foreign_patient_missing_what_the_contract_requires(change, location):
    foreign = {k: v for k, v in {**FOREIGN, **change}.items() if v is not None}
    draft, report = reverse([foreign], patient)
    assert "client" not in draft
    assert [i.location for i in report.errors] == [location]


def test_unknown_modifier_extension_leaves_the_patient_out():
    draft, report = reverse([{**FOREIGN, "modifierExtension": [{"url": "http://x.example/deceased-alias", "valueBoolean": True}]}], patient)
    assert "client" not in draft and report.errors[0].location == "Patient/ext-7.modifierExtension"


def test_several_patients_are_an_error():
    draft, report = reverse([FOREIGN, {**FOREIGN, "id": "ext-8"}], patient)
    assert "client" not in draft
    assert len(report.errors) == 1 and "2 Patients" in report.errors[0].message


def test_no_patient_is_an_error():
    draft, report = reverse([], patient)
    assert "client" not in draft and report.errors[0].code == "required"


def test_optional_parts_the_contract_refuses_are_dropped_with_a_warning():
    foreign = {
        **FOREIGN,
        "telecom": [{"system": "phone", "value": "call me"}, "garbage"],
        "address": [{"line": ["1 Main St"], "city": "Springfield", "state": "Illinois", "postalCode": "62701"}],
        "extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-genderIdentity",
                       "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "446141000124107", "display": "Identifies as female gender"}]}}],
    }
    draft, report = reverse([foreign], patient)
    assert draft["client"]["gender_identity"] == "Identifies as female gender"
    assert "contact" not in draft["client"] and "address" not in draft["client"]
    assert sorted(i.message.split(" ")[0] for i in report.issues if i.severity == "warning") == ["address", "contact"]
