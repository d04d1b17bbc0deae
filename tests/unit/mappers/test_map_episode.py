"""episode.py: enrolment + discharge <-> EpisodeOfCare."""

from __future__ import annotations

import copy
import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from iop_fhir.errors import RecordInvalid
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import texts

from iop_fhir import terminology
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers import episode
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record import IopRecord, validate_record
from iop_fhir.record.model import Discharge, Enrolment

JSON = dict[str, Any]
EXAMPLE_JSON = json.loads((Path(__file__).parents[3] / "fixtures" / "iop" / "example-dual-diagnosis.json").read_text())
EXT = terminology.extension_url
DATED = ("medication_reviews", "adherence", "side_effects", "assessments", "drug_screens", "vitals", "drug_levels", "sessions")


def forward(record: IopRecord) -> JSON:
    resources = episode.to_fhir(MappingContext(record))
    assert len(resources) == 1
    assert validate_resource(resources[0]) == []
    return resources[0]


def back(*resources: JSON, draft: JSON | None = None) -> tuple[JSON, MappingReport]:
    draft = {} if draft is None else draft
    report = MappingReport()
    episode.from_fhir(ResourceIndex.build(list(resources)), draft, report)
    return draft, report


def ext(resource: JSON, name: str) -> JSON:
    return next(e for e in resource["extension"] if e["url"] == EXT(name))


# --- the example ----------------------------------------------------------------------------


def test_example_episode(example_record: IopRecord) -> None:
    ctx = MappingContext(example_record)
    resource = forward(example_record)
    assert resource["id"] == ctx.episode["reference"].removeprefix("urn:uuid:")
    assert resource["identifier"][0] == ctx.ids.identifier("episode", "ep-2026-0042", shared=True)
    assert resource["status"] == "finished"
    assert resource["period"] == {"start": "2026-01-05", "end": "2026-02-27"}
    assert resource["patient"] == ctx.patient
    assert resource["managingOrganization"] == ctx.organization
    # co-occurring hybrid IOP: the substance-use IOP per diem, plus the modality
    assert resource["type"][0]["coding"][0]["code"] == "H0015"
    assert resource["type"][1]["coding"][0] == {
        "system": terminology.code_system("modality"), "code": "hybrid", "display": "Hybrid (in person and telehealth)",
    }
    schedule = {e["url"]: e for e in ext(resource, "program-schedule")["extension"]}
    assert schedule["daysPerWeek"]["valueInteger"] == 4
    assert schedule["hoursPerDay"]["valueQuantity"]["value"] == 3
    assert schedule["hoursPerDay"]["valueQuantity"]["code"] == "h"
    assert schedule["weeks"]["valueInteger"] == 8
    assert ext(resource, "planned-end")["valueDate"] == "2026-02-27"
    assert ext(resource, "referral-source")["valueString"] == "Emergency department, Springfield General"
    assert ext(resource, "discharge-disposition")["valueCodeableConcept"]["coding"][0]["code"] == "stepped-down"
    assert ext(resource, "discharge-summary")["valueString"].startswith("Completed IOP")
    assert not any(e["url"] == EXT("discharge-date") for e in resource["extension"])  # period.end says it
    primary, secondary = resource["diagnosis"]
    assert primary == {
        "condition": ctx.condition("dx-1"),
        "role": {"coding": [{"system": terminology.DIAGNOSIS_ROLE, "code": "AD", "display": "Admission diagnosis"}]},
        "rank": 1,
    }
    assert secondary["role"]["coding"][0]["code"] == "CM" and "rank" not in secondary
    assert resource["careManager"] == ctx.practitioner("st-cm-1")
    assert resource["team"] == [ctx.ids.reference("CareTeam", "care-team", "ep-2026-0042", shared=True)]


def test_example_round_trip_merges_into_discharge(example_record: IopRecord) -> None:
    aftercare = {"id": "ac-1", "medications": [{"prescription_id": "rx-3", "disposition": "continue"}]}
    draft, report = back(forward(example_record), draft={"discharge": {"aftercare": copy.deepcopy(aftercare)}})
    assert report.issues == []
    assert draft["id"] == example_record.id
    assert Enrolment.model_validate(draft["enrolment"]) == example_record.enrolment
    assert draft["discharge"].pop("aftercare") == aftercare  # another module's part is left alone
    assert Discharge.model_validate(draft["discharge"]) == example_record.discharge.model_copy(update={"aftercare": None})


def test_program_service_follows_focus_and_level(example_json: JSON) -> None:
    def service(focus: str, level: str) -> list[str]:
        data = copy.deepcopy(example_json)
        data["program"].update(focus=focus, level_of_care=level)
        types = forward(validate_record(data))["type"]
        return [c["code"] for t in types for c in t["coding"] if c["system"] == terminology.HCPCS]

    assert service("mental-health", "IOP") == ["S9480"]
    assert service("substance-use", "virtual-IOP") == ["H0015"]
    assert service("mental-health", "PHP") == ["H0035"]
    assert service("co-occurring", "OP") == []


def test_no_care_team_no_case_manager_no_team(example_json: JSON) -> None:
    data = copy.deepcopy(example_json)
    data["care_team"] = [m for m in data["care_team"] if m["role"] != "case-manager"]
    resource = forward(validate_record(data))
    assert "careManager" not in resource and resource["team"]
    data = {**_undated(example_json), "care_team": [], "care_plan": None}
    data["prescriptions"] = []
    data["discharge"]["aftercare"] = None
    resource = forward(validate_record(data))
    assert "team" not in resource and "careManager" not in resource


def _undated(example_json: JSON) -> JSON:
    data = copy.deepcopy(example_json)
    for name in DATED:
        data[name] = []
    return data


def test_discharge_needs_the_actual_end(example_json: JSON) -> None:
    # The contract ties the discharge to the enrolment's actual end, so period.end carries both.
    data = _undated(example_json)
    data["enrolment"].update(status="cancelled", actual_end=None)
    data["discharge"] = {"date": "2026-01-20", "disposition": "administrative"}
    with pytest.raises(RecordInvalid):
        validate_record(data)


# --- property: every enrolment/discharge shape survives the trip ---------------------------

DATES = st.dates(dt.date(2025, 1, 1), dt.date(2026, 12, 31))
TEXT = texts(30) | st.sampled_from(
    ["<b>&amp;</b>", "a < b & c > d", "line\nbreak\ttab", " padded ", "Zoë — 日本語 🙂"]
)


@st.composite
def enrolments(draw: st.DrawFn) -> JSON:
    start = draw(DATES)
    status = draw(st.sampled_from(["planned", "waitlist", "active", "onhold", "finished", "cancelled"]))
    later = st.integers(0, 120).map(lambda n: start + dt.timedelta(days=n))
    actual_end = None
    if status == "finished" or (status == "cancelled" and draw(st.booleans())):
        actual_end = draw(later)
    enrolment = {
        "status": status,
        "start": start.isoformat(),
        "schedule": {
            "days_per_week": draw(st.integers(1, 7)),
            "hours_per_day": draw(st.decimals(Decimal("0.0001"), Decimal("12"), places=4)),
            "weeks": draw(st.integers(1, 52)),
        },
        "modality": draw(st.sampled_from(["in-person", "telehealth", "hybrid"])),
        "planned_end": draw(st.none() | later.map(dt.date.isoformat)),
        "actual_end": actual_end.isoformat() if actual_end else None,
        "referral_source": draw(st.none() | TEXT.filter(lambda t: len(t) <= 500)),
    }
    discharge = None
    if actual_end is not None and draw(st.booleans()):
        discharge = {
            "date": actual_end.isoformat(),
            "disposition": draw(st.sampled_from(sorted(episode.DISPOSITION_DISPLAY))),
            "summary": draw(st.none() | TEXT),
        }
    program = {
        "focus": draw(st.sampled_from(["mental-health", "substance-use", "co-occurring"])),
        "level_of_care": draw(st.sampled_from(["IOP", "virtual-IOP", "hybrid-IOP", "PHP", "OP"])),
    }
    return {"enrolment": enrolment, "discharge": discharge, "program": program}


@settings(max_examples=150, deadline=None)
@given(enrolments())
def test_round_trip_any_enrolment(part: JSON) -> None:
    data = _undated(EXAMPLE_JSON)
    data["program"].update(part["program"])
    data.update(enrolment=part["enrolment"], discharge=part["discharge"], care_plan=None)
    data["enrolment"]["schedule"]["hours_per_day"] = float(data["enrolment"]["schedule"]["hours_per_day"])
    record = validate_record(json.loads(json.dumps(data)))
    draft, report = back(forward(record))
    assert [i for i in report.issues if i.severity != "information"] == []
    assert draft["id"] == record.id
    assert Enrolment.model_validate(draft["enrolment"]) == record.enrolment
    if record.discharge is None:
        assert "discharge" not in draft
    else:
        assert Discharge.model_validate(draft["discharge"]) == record.discharge


# --- foreign EpisodeOfCare ------------------------------------------------------------------


def foreign_episode(**changes: Any) -> JSON:
    resource = {
        "resourceType": "EpisodeOfCare",
        "id": "eoc-77",
        "identifier": [{"system": "http://other-ehr.example/episodes", "value": "E77"}],
        "status": "active",
        "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "394587001", "display": "Psychiatry"}]}],
        "patient": {"reference": "Patient/p1"},
        "period": {"start": "2026-03-01T08:00:00Z"},
        "extension": [{"url": "http://other-ehr.example/fhir/StructureDefinition/ward", "valueString": "B"}],
    }
    resource.update(changes)
    return resource


def test_foreign_episode_without_schedule_or_modality_reports_and_leaves_enrolment_out() -> None:
    draft, report = back(foreign_episode())
    assert draft == {"id": "eoc-77"}  # the resource id stands in for the episode id
    errors = [i for i in report.issues if i.severity == "error"]
    assert len(errors) == 1 and "program schedule" in errors[0].message and "modality" in errors[0].message
    assert any(i.severity == "warning" and "ward" in i.message for i in report.issues)  # unknown extension
    assert any(i.severity == "information" and "stands in" in i.message for i in report.issues)


def test_foreign_episode_with_our_extensions_maps() -> None:
    resource = foreign_episode(
        status="finished",
        period={"start": "2026-03-01", "end": "2026-04-10"},
        referralRequest=[{"reference": "ServiceRequest/r1"}],
    )
    resource["type"].append({"coding": [{"system": terminology.code_system("modality"), "code": "telehealth"}]})
    resource["extension"] += [
        {"url": EXT("program-schedule"), "extension": [
            {"url": "daysPerWeek", "valueInteger": 3},
            {"url": "hoursPerDay", "valueDecimal": 2.5},
            {"url": "weeks", "valueInteger": 6},
        ]},
        {"url": EXT("discharge-disposition"), "valueCodeableConcept": {"coding": [
            {"system": terminology.code_system("discharge-disposition"), "code": "completed"}]}},
    ]
    draft, report = back(resource)
    assert draft["enrolment"] == {
        "status": "finished", "start": "2026-03-01", "actual_end": "2026-04-10", "modality": "telehealth",
        "schedule": {"days_per_week": 3, "hours_per_day": 2.5, "weeks": 6},
    }
    # the disposition alone is enough to know the client was discharged
    assert draft["discharge"] == {"date": "2026-04-10", "disposition": "completed"}
    assert any("referral request" in i.message for i in report.issues if i.severity == "warning")


def test_foreign_open_episode_end_is_its_planned_end() -> None:
    resource = foreign_episode(period={"start": "2026-03-01", "end": "2026-04-30"})
    resource["type"].append({"coding": [{"system": terminology.code_system("modality"), "code": "in-person"}]})
    resource["extension"] = [{"url": EXT("program-schedule"), "extension": [
        {"url": "daysPerWeek", "valueInteger": 5},
        {"url": "hoursPerDay", "valueQuantity": {"value": 3, "system": terminology.UCUM, "code": "h"}},
        {"url": "weeks", "valueInteger": 8},
    ]}]
    draft, report = back(resource)
    assert draft["enrolment"]["planned_end"] == "2026-04-30" and "actual_end" not in draft["enrolment"]
    assert any(i.location == "EpisodeOfCare/eoc-77.period.end" for i in report.issues)


def test_foreign_discharge_without_a_date_or_known_disposition() -> None:
    disposition = {"url": EXT("discharge-disposition"), "valueCodeableConcept": {"coding": [
        {"system": "http://other.example/dispo", "code": "home"}]}}
    draft, report = back(foreign_episode(extension=[disposition]))
    assert "discharge" not in draft
    assert any(i.severity == "error" and "discharge cannot be built" in i.message for i in report.issues)


def test_odd_shapes_never_crash() -> None:
    odd = [
        foreign_episode(period="2026", type="x", extension="nope", identifier={"value": 3}),
        foreign_episode(id=None, identifier=[{"system": 5, "value": ["x"]}], period={"start": 20260101}),
        foreign_episode(extension=[None, 7, {"url": EXT("program-schedule"), "extension": [1, {"url": "weeks"}]}]),
        foreign_episode(type=[{"coding": "hybrid"}, {"coding": [None, {"system": terminology.code_system("modality"), "code": 1}]}]),
        foreign_episode(status="entered-in-error"),
    ]
    for resource in odd:
        draft, report = back(resource)
        assert "enrolment" not in draft
        assert report.errors


def test_modifier_extension_refuses_the_episode() -> None:
    draft, report = back(foreign_episode(modifierExtension=[{"url": "http://x.example/m", "valueBoolean": True}]))
    assert draft == {}
    assert report.errors[0].code == "not-supported"


def test_no_episode_and_several_episodes(example_record: IopRecord) -> None:
    draft, report = back()
    assert draft == {} and report.errors
    ours = forward(example_record)
    draft, report = back(foreign_episode(), ours)
    assert draft["id"] == example_record.id  # ours is preferred over the foreign one
    assert any(i.severity == "warning" and i.location == "EpisodeOfCare/eoc-77" for i in report.issues)
