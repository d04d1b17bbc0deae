"""The care team <-> Practitioner, PractitionerRole and CareTeam."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import CONTACTS, DEAS, HUMAN_NAMES, LOCAL_IDS, NPIS, SETTINGS, assert_lossless, reverse, with_parts

from iop_fhir import terminology
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers import care_team, organization
from iop_fhir.mappers.context import MappingContext
from iop_fhir.mappers.datatypes import choices
from iop_fhir.record.model import CareTeamMember

CARE_TEAM_ROLE = terminology.code_system("care-team-role")
MEMBERS = st.lists(
    st.fixed_dictionaries(
        {"id": LOCAL_IDS, "role": st.sampled_from(sorted(choices(CareTeamMember, "role"))), "name": HUMAN_NAMES, "npi": NPIS},
        optional={"dea_number": DEAS, "contact": CONTACTS},
    ),
    max_size=5,
    unique_by=lambda m: m["id"],
)


def test_example_resources(example_record):
    ctx = MappingContext(example_record)
    resources = care_team.to_fhir(ctx)
    assert [r["resourceType"] for r in resources] == ["Practitioner"] * 3 + ["PractitionerRole"] * 3 + ["CareTeam"]
    for resource in resources:
        assert validate_resource(resource) == [], resource
    psychiatrist, role, team = resources[0], resources[3], resources[-1]
    assert psychiatrist["meta"]["profile"] == [terminology.us_core("us-core-practitioner")]
    assert psychiatrist["id"] == ctx.practitioner("st-psy-1")["reference"].removeprefix("urn:uuid:")
    assert psychiatrist["identifier"][1:] == [{"system": terminology.NPI, "value": "1245319599"}, {"system": terminology.DEA, "value": "BO1234563"}]
    assert psychiatrist["name"] == [{"use": "official", "family": "Okafor", "given": ["Daniel"], "prefix": ["Dr."]}]
    assert role["meta"]["profile"] == [terminology.us_core("us-core-practitionerrole")]
    assert role["practitioner"] == ctx.practitioner("st-psy-1") and role["organization"] == ctx.organization
    assert role["code"][0]["coding"] == [
        {"system": terminology.NUCC_TAXONOMY, "code": "2084P0800X", "display": "Psychiatry & Neurology, Psychiatry"},
        {"system": CARE_TEAM_ROLE, "code": "psychiatrist", "display": "Psychiatrist"},
    ]
    # the therapist has no contact of their own: the program's phone and email serve
    assert {t["value"] for t in resources[4]["telecom"]} == {"+1 217 555 0100", "intake@riverbend.example"}
    assert team["meta"]["profile"] == [terminology.us_core("us-core-careteam")]
    assert team["status"] == "inactive"  # the enrolment is finished
    assert team["name"] == "IOP care team for episode ep-2026-0042"
    assert team["subject"] == ctx.patient and team["managingOrganization"] == [ctx.organization]
    assert team["participant"][1] == {"role": resources[4]["code"], "member": ctx.practitioner("st-ther-1"), "onBehalfOf": ctx.organization}


def test_no_members_no_resources(example_json):
    assert care_team.to_fhir(MappingContext(with_parts(example_json))) == []


def test_example_round_trip(example_record):
    assert_lossless(example_record, (care_team,), care_team=CareTeamMember)


@SETTINGS
@given(members=MEMBERS, status=st.sampled_from(["active", "finished"]))
def test_any_care_team_round_trips(example_json, members, status):
    enrolment = {**example_json["enrolment"], "status": status}
    if status == "active":
        del enrolment["actual_end"]
    assert_lossless(with_parts(example_json, care_team=members, enrolment=enrolment), (care_team,), care_team=CareTeamMember)


# --- foreign FHIR ----------------------------------------------------------------------------

NUCC_NP = {"coding": [{"system": terminology.NUCC_TAXONOMY, "code": "363LP0808X"}]}


def practitioner(pid: str, **extra: object) -> dict:
    return {
        "resourceType": "Practitioner",
        "id": pid,
        "identifier": [{"system": terminology.NPI, "value": "1679576722"}],
        "name": [{"family": "Ruiz", "given": ["Eva"]}],
        **extra,
    }


def role(pid: str, code: dict) -> dict:
    return {"resourceType": "PractitionerRole", "id": f"role-{pid}", "practitioner": {"reference": f"Practitioner/{pid}"}, "code": [code]}


def test_foreign_role_from_nucc_code():
    draft, report = reverse([practitioner("np1"), role("np1", NUCC_NP)], care_team)
    assert draft["care_team"] == [{"id": "np1", "role": "nurse-practitioner", "name": {"family": "Ruiz", "given": ["Eva"]}, "npi": "1679576722"}]
    assert {i.severity for i in report.issues} == {"information"}


def test_foreign_role_from_a_care_team_participant_through_a_practitioner_role():
    team = {
        "resourceType": "CareTeam",
        "participant": [{"role": [{"coding": [{"system": terminology.NUCC_TAXONOMY, "code": "1041C0700X"}]}], "member": {"reference": "PractitionerRole/role-sw"}}],
    }
    bare_role = {"resourceType": "PractitionerRole", "id": "role-sw", "practitioner": {"reference": "http://ehr.example/fhir/Practitioner/sw"}}
    draft, report = reverse([practitioner("sw"), bare_role, team], care_team)
    assert [m["role"] for m in draft["care_team"]] == ["therapist"]


def test_foreign_prescriber_without_a_role_is_an_error_not_a_guess():
    request = {"resourceType": "MedicationRequest", "requester": {"reference": "Practitioner/doc"}}
    draft, report = reverse([practitioner("doc"), request], care_team)
    assert draft["care_team"] == []
    assert [i.location for i in report.errors] == ["Practitioner/doc"]
    assert "will not resolve" in report.errors[0].message


def test_foreign_practitioner_without_npi_is_an_error():
    draft, report = reverse([practitioner("np2", identifier=[{"system": "http://x.example/staff", "value": "7"}]), role("np2", NUCC_NP)], care_team)
    assert draft["care_team"] == []
    assert [(i.location, "NPI" in i.message) for i in report.errors] == [("Practitioner/np2.identifier", True)]


def test_foreign_practitioners_nobody_points_at_are_outside_providers():
    draft, report = reverse([practitioner("ref")], care_team, organization)
    assert draft["care_team"] == []
    assert draft["providers"] == [{"id": "ref", "kind": "practitioner", "name": "Eva Ruiz", "npi": "1679576722"}]


@pytest.mark.parametrize(
    "garbage",
    [
        {"name": "Bob", "identifier": {"system": terminology.NPI}, "telecom": "555"},
        {"name": [{"family": 7, "given": "Bob"}], "identifier": [None, {"system": terminology.NPI, "value": 1679576722}]},
        {"extension": [{"url": None}, "x"], "name": [None], "identifier": [{"system": terminology.NPI, "value": "1679576722"}, "x"]},
    ],
)
def test_garbage_shapes_never_crash(garbage):
    team = {"resourceType": "CareTeam", "participant": "everyone", "status": 3}
    odd_role = {"resourceType": "PractitionerRole", "practitioner": {"reference": 5}, "code": "psychiatrist"}
    draft, report = reverse([practitioner("g", **garbage), role("g", NUCC_NP), team, odd_role], care_team)
    assert draft["care_team"] == [] and report.errors
