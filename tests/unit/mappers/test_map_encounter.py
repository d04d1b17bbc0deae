"""encounter.py: sessions <-> Encounter."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from iop_fhir import terminology
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers import encounter
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.datatypes import fhir_datetime
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record import IopRecord, validate_record
from iop_fhir.record.model import Session

JSON = dict[str, Any]
EXAMPLE_JSON = json.loads((Path(__file__).parents[3] / "fixtures" / "iop" / "example-dual-diagnosis.json").read_text())
ATTENDANCE_URL = terminology.extension_url("session-attendance")


def forward(record: IopRecord) -> list[JSON]:
    resources = encounter.to_fhir(MappingContext(record))
    for resource in resources:
        assert validate_resource(resource) == []
        assert resource["meta"]["profile"] == [terminology.us_core("us-core-encounter")]
        # US Core mandatory elements
        assert resource["status"] and resource["class"] and resource["type"] and resource["subject"]
    return resources


def staff(record: IopRecord) -> list[JSON]:
    """The care team's Practitioners as the care_team module identifies them (what participants point at)."""
    ids = MappingContext(record).ids
    return [
        {"resourceType": "Practitioner", "id": ids.id("Practitioner", "staff", m.id, shared=True),
         "identifier": [ids.identifier("staff", m.id, shared=True)]}
        for m in record.care_team
    ]


def back(*resources: JSON) -> tuple[list[JSON], MappingReport]:
    draft: JSON = {}
    report = MappingReport()
    encounter.from_fhir(ResourceIndex.build(list(resources)), draft, report)
    return draft.get("sessions", []), report


def noisy(report: MappingReport) -> list[Any]:
    return [i for i in report.issues if i.severity != "information"]


# --- the example ----------------------------------------------------------------------------


def test_example_sessions(example_record: IopRecord) -> None:
    ctx = MappingContext(example_record)
    group, telehealth, no_show, medication, cancelled = forward(example_record)
    assert group["identifier"][0] == ctx.ids.identifier("session", "ses-1")
    assert group["status"] == "finished"
    assert group["extension"] == [{"url": ATTENDANCE_URL, "valueCode": "attended"}]
    assert group["class"] == {"system": terminology.V3_ACT_CODE, "code": "AMB", "display": "ambulatory"}
    assert [c["code"] for c in group["type"][0]["coding"]] == ["76168009", "90853"]
    assert group["period"] == {"start": "2026-01-05T09:00:00-06:00", "end": "2026-01-05T12:00:00-06:00"}
    assert group["length"] == {"value": 180, "unit": "minutes", "system": terminology.UCUM, "code": "min"}
    assert group["participant"] == [{
        "type": [{"coding": [{"system": terminology.V3_PARTICIPATION_TYPE, "code": "PPRF", "display": "primary performer"}]}],
        "individual": ctx.practitioner("st-ther-1"),
    }]
    assert group["subject"] == ctx.patient
    assert group["episodeOfCare"] == [ctx.episode]
    assert group["serviceProvider"] == ctx.organization
    assert telehealth["class"]["code"] == "VR"
    # a no-show: cancelled (R4 has no no-show status), the extension says which, no end, length 0
    assert no_show["status"] == "cancelled"
    assert no_show["extension"][0]["valueCode"] == "no-show"
    assert no_show["period"] == {"start": "2026-01-07T09:00:00-06:00"}
    assert no_show["length"]["value"] == 0
    assert [c["code"] for c in medication["type"][0]["coding"]] == ["302440009"]
    assert cancelled["extension"][0]["valueCode"] == "cancelled" and "participant" not in cancelled


def test_example_round_trip(example_record: IopRecord) -> None:
    sessions, report = back(*forward(example_record), *staff(example_record))
    assert report.issues == []
    assert [Session.model_validate(s) for s in sessions] == example_record.sessions
    assert [s["start"] for s in sessions] == [s["start"] for s in EXAMPLE_JSON["sessions"]]


# --- property: sessions of every kind, attendance and modality survive ----------------------

OFFSETS = st.sampled_from([0, -360, -300, 60, 330, -570]).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))


@st.composite
def sessions(draw: st.DrawFn) -> list[JSON]:
    ids = draw(st.lists(st.from_regex(r"[A-Za-z0-9\-.]{1,24}", fullmatch=True), max_size=8, unique=True))
    out = []
    for session_id in ids:
        day = draw(st.dates(dt.date(2026, 1, 5), dt.date(2026, 2, 27)))
        time = draw(st.times().map(lambda t: t.replace(microsecond=t.microsecond if draw(st.booleans()) else 0)))
        start = dt.datetime.combine(day, time, draw(OFFSETS))
        attendance = draw(st.sampled_from(["attended", "no-show", "cancelled"]))
        session = {
            "id": session_id,
            "start": start.isoformat(),
            "kind": draw(st.sampled_from(sorted(terminology.tables()["session_kinds"]))),
            "attendance": attendance,
            "minutes": draw(st.integers(0, 600)) if attendance == "attended" else draw(st.sampled_from([0, 0, 15])),
            "telehealth": draw(st.booleans()),
            "clinician_id": draw(st.none() | st.sampled_from(["st-psy-1", "st-ther-1", "st-cm-1"])),
        }
        out.append(session)
    return out


@settings(max_examples=100, deadline=None)
@given(sessions())
def test_round_trip_any_sessions(generated: list[JSON]) -> None:
    record = validate_record({**EXAMPLE_JSON, "sessions": generated})
    resources = forward(record)
    for session, resource in zip(record.sessions, resources):
        if session.attendance == "attended" and session.minutes:
            end = session.start + dt.timedelta(minutes=session.minutes)
            assert dt.datetime.fromisoformat(resource["period"]["end"]) == end
        else:
            assert "end" not in resource["period"]
    read, report = back(*resources, *staff(record))
    assert report.issues == []
    assert [Session.model_validate(s) for s in read] == record.sessions
    # offsets kept as written, not only the instant
    assert [s["start"] for s in read] == [fhir_datetime(s.start) for s in record.sessions]


# --- foreign Encounters ---------------------------------------------------------------------


def foreign(**changes: Any) -> JSON:
    resource = {
        "resourceType": "Encounter",
        "id": "enc-9",
        "identifier": [{"system": "http://other-ehr.example/visits", "value": "V9"}],
        "status": "finished",
        "class": {"system": terminology.V3_ACT_CODE, "code": "AMB"},
        "type": [{"coding": [{"system": terminology.CPT, "code": "90853"}], "text": "Group"}],
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-01-12T10:00:00-05:00", "end": "2026-01-12T11:30:00-05:00"},
    }
    resource.update(changes)
    return resource


def test_foreign_group_visit_by_cpt_and_period() -> None:
    practitioner = {"resourceType": "Practitioner", "id": "doc-1",
                    "identifier": [{"system": terminology.NPI, "value": "1245319599"}]}
    role = {"resourceType": "PractitionerRole", "id": "role-1", "practitioner": {"reference": "Practitioner/doc-1"}}
    resource = foreign(participant=[
        {"individual": {"reference": "RelatedPerson/x"}},
        {"type": [{"coding": [{"code": "PPRF"}]}], "individual": {"reference": "http://other-ehr.example/fhir/PractitionerRole/role-1"}},
    ])
    sessions, report = back(resource, practitioner, role)
    assert sessions == [{
        "id": "enc-9", "start": "2026-01-12T10:00:00-05:00", "kind": "group", "attendance": "attended",
        "minutes": 90, "clinician_id": "doc-1",
    }]
    assert noisy(report) == []


def test_foreign_statuses() -> None:
    in_progress, report = back(foreign(status="in-progress", length={"value": 1.5, "unit": "h"}))
    assert in_progress[0]["attendance"] == "attended" and in_progress[0]["minutes"] == 90
    assert [i.severity for i in noisy(report)] == ["warning"]
    planned, report = back(foreign(status="planned"))
    assert planned == [] and noisy(report)[0].location == "Encounter/enc-9.status"
    cancelled, _ = back(foreign(status="cancelled", period={"start": "2026-01-12"}))
    assert cancelled[0]["attendance"] == "cancelled" and cancelled[0]["minutes"] == 0
    assert cancelled[0]["start"] == "2026-01-12T00:00:00Z"


def test_foreign_other_kinds_are_skipped_with_a_warning() -> None:
    sessions, report = back(foreign(type=[{"coding": [{"system": terminology.SNOMED, "code": "185349003"}]}]))
    assert sessions == []
    assert report.issues[0].severity == "warning" and report.issues[0].location == "Encounter/enc-9.type"


def test_foreign_missing_and_odd_parts() -> None:
    no_start, report = back(foreign(period={"end": "2026-01-12T11:30:00-05:00"}))
    assert no_start == [] and report.errors
    too_long, report = back(foreign(length={"value": 900, "code": "min", "system": terminology.UCUM}))
    assert too_long == [] and report.errors
    unknown_clinician, report = back(foreign(participant=[{"individual": {"reference": "Practitioner/nowhere"}}]))
    assert "clinician_id" not in unknown_clinician[0]
    assert any(i.location == "Encounter/enc-9.participant" for i in noisy(report))
    odd = [
        foreign(type="group"), foreign(period="2026-01-12"), foreign(participant="x", length=[1]),
        foreign(type=[{"coding": [{"system": [], "code": {}}]}]), foreign(length={"value": float("inf"), "code": "min"}),
        foreign(identifier=[{"system": 1, "value": None}], id=None), foreign(extension="x", status=["finished"]),
        foreign(modifierExtension=[{"url": "http://x.example/m", "valueBoolean": True}]),
    ]
    for resource in odd:
        sessions, report = back(resource)  # never raises
        assert report.issues or sessions
