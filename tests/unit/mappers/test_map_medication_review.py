"""Task <-> medication reviews: forward, round trip (example and property), foreign Tasks."""

from __future__ import annotations

import copy
import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import texts

from iop_fhir import terminology
from iop_fhir.mappers import medication_request as mr
from iop_fhir.mappers import medication_review as mv
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import IopRecord, MedicationReview
from iop_fhir.record.validate import DOSE_UNITS

JSON = dict[str, Any]


def world(ctx: MappingContext) -> list[JSON]:
    """The prescriptions the reviews point at, and bare Practitioners for prescribers and reviewers.

    No pharmacies or diagnoses: prescriptions still map without them (their links are dropped
    with warnings, which ``back`` leaves out of the reviews' report).
    """
    ids = ctx.ids
    staff = [
        {
            "resourceType": "Practitioner",
            "id": ids.id("Practitioner", "staff", m.id, shared=True),
            "identifier": [ids.identifier("staff", m.id, shared=True)],
        }
        for m in ctx.record.care_team
    ]
    return staff + mr.to_fhir(ctx)


def back(resources: list[JSON]) -> tuple[JSON, MappingReport]:
    """Prescriptions first (as bundle.py orders the families), then the reviews."""
    index, draft, report = ResourceIndex.build(resources), {}, MappingReport()
    mr.from_fhir(index, draft, report)
    prescription_issues = len(report.issues)
    mv.from_fhir(index, draft, report)
    report.issues = report.issues[prescription_issues:]
    return draft, report


def found(report: MappingReport, severity: str, text: str) -> bool:
    return any(text in f"{i.location}: {i.message}" for i in report.issues if i.severity == severity)


@pytest.fixture
def ctx(example_record: IopRecord) -> MappingContext:
    return MappingContext(example_record)


@pytest.fixture
def tasks(ctx: MappingContext) -> list[JSON]:
    return mv.to_fhir(ctx)


def test_forward_validates(tasks: list[JSON]) -> None:
    assert len(tasks) == 3
    task_model = get_fhir_model_class("Task")
    for task in tasks:
        task_model.model_validate(task)
        assert "meta" not in task  # Task has no US Core profile
        assert task["status"] == "completed" and task["intent"] == "order"
        assert task["code"]["coding"] == [{"system": terminology.SNOMED, "code": "182836005", "display": "Review of medication (procedure)"}]
        assert task["executionPeriod"]["start"] == task["authoredOn"]
        assert task["owner"] == task["requester"]


def test_forward_increase(ctx: MappingContext, tasks: list[JSON]) -> None:
    task = tasks[1]
    assert task["id"] == ctx.ids.id("Task", "medication-review", "rv-2")
    assert task["identifier"] == [ctx.ids.identifier("medication-review", "rv-2")]
    assert task["focus"] == ctx.prescription("rx-1") and task["for"] == ctx.patient
    assert task["executionPeriod"] == {"start": "2026-01-19"}
    assert task["owner"] == ctx.practitioner("st-psy-1")
    assert task["reasonCode"] == {"text": "PHQ-9 still 15"}
    inputs = mv.INPUT
    assert task["input"] == [
        {"type": {"coding": [{"system": inputs, "code": "action", "display": "Review action"}]}, "valueCode": "increase"},
        {"type": {"coding": [{"system": inputs, "code": "new-dose", "display": "New dose"}]},
         "valueQuantity": {"value": 2, "unit": "tablet", "system": terminology.UCUM, "code": "{tbl}"}},
    ]
    assert task["output"] == [
        {"type": {"coding": [{"system": mv.OUTPUT, "code": "new-prescription", "display": "New prescription"}]},
         "valueReference": ctx.prescription("rx-2")}
    ]
    assert "output" not in tasks[0] and len(tasks[0]["input"]) == 1


def test_round_trip_example(ctx: MappingContext, tasks: list[JSON], example_record: IopRecord) -> None:
    draft, report = back(world(ctx) + tasks)
    assert report.issues == []
    assert [MedicationReview.model_validate(r) for r in draft["medication_reviews"]] == example_record.medication_reviews


AMOUNT = st.decimals(min_value=0, max_value=9999, places=3, allow_nan=False, allow_infinity=False)


@st.composite
def reviews(draw: st.DrawFn, index: int) -> JSON:
    action = draw(st.sampled_from(sorted(mv.ACTIONS)))
    item = {
        "id": f"rv-g{index}",
        "date": draw(st.dates(min_value=dt.date(2026, 1, 5), max_value=dt.date(2026, 2, 27))).isoformat(),
        "prescription_id": draw(st.sampled_from(["rx-1", "rx-2", "rx-3", "rx-4"])),
        "action": action,
        "reviewer_id": draw(st.sampled_from(["st-psy-1", "st-ther-1", "st-cm-1"])),
    }
    if draw(st.booleans()):
        item["reason"] = draw(texts(100))
    if draw(st.booleans()):
        item["new_dose"] = {"value": draw(AMOUNT), "unit": draw(st.sampled_from(sorted(DOSE_UNITS)))}
    if action in mv.CHANGES or draw(st.booleans()):
        item["new_prescription_id"] = draw(st.sampled_from(["rx-2", "rx-3"]))
    return item


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip_property(example_json: JSON, data: st.DataObject) -> None:
    record_json = copy.deepcopy(example_json)
    record_json["medication_reviews"] = [data.draw(reviews(i)) for i in range(data.draw(st.integers(0, 5)))]
    record = IopRecord.model_validate(record_json)  # shape only: compared at the review level
    ctx = MappingContext(record)
    tasks = mv.to_fhir(ctx)
    for task in tasks:
        get_fhir_model_class("Task").model_validate(task)
    draft, report = back(world(ctx) + tasks)
    assert report.issues == []
    assert [MedicationReview.model_validate(r) for r in draft["medication_reviews"]] == record.medication_reviews


# --- foreign Tasks --------------------------------------------------------------------------


def foreign_review(ctx: MappingContext, **changes: Any) -> JSON:
    """A review another system wrote: absolute references, action as a CodeableConcept, no identifier."""
    rx1 = ctx.ids.id("MedicationRequest", "prescription", "rx-1")
    doctor = ctx.ids.id("Practitioner", "staff", "st-psy-1", shared=True)
    task = {
        "resourceType": "Task",
        "id": "tsk-5",
        "status": "completed",
        "intent": "order",
        "code": {"coding": [{"system": terminology.SNOMED, "code": "182836005"}]},
        "focus": {"reference": f"https://ehr.example.org/fhir/MedicationRequest/{rx1}"},
        "authoredOn": "2026-02-01T09:00:00Z",
        "requester": {"reference": f"Practitioner/{doctor}"},
        "reasonCode": {"coding": [{"system": "http://example.org/reasons", "code": "R1", "display": "Routine check"}]},
        "input": [{"type": {"coding": [{"system": mv.INPUT, "code": "action"}]},
                   "valueCodeableConcept": {"coding": [{"system": mv.INPUT, "code": "continue"}]}}],
    }
    task.update(changes)
    return {k: v for k, v in task.items() if v is not None}


def test_foreign_review_maps(ctx: MappingContext) -> None:
    draft, report = back(world(ctx) + [foreign_review(ctx)])
    assert draft["medication_reviews"] == [
        {"id": "tsk-5", "date": "2026-02-01", "prescription_id": "rx-1", "action": "continue", "reviewer_id": "st-psy-1", "reason": "Routine check"}
    ]
    assert report.errors == [] and found(report, "information", "Task/tsk-5.identifier")


def test_other_tasks_are_ignored(ctx: MappingContext) -> None:
    other = {"resourceType": "Task", "id": "fax", "status": "requested", "intent": "order", "code": {"text": "Send a fax"}}
    draft, report = back(world(ctx) + [other])
    assert draft["medication_reviews"] == [] and found(report, "information", "Task/fax.code")
    assert not report.errors and not [i for i in report.issues if i.severity == "warning"]


@pytest.mark.parametrize(
    ("changes", "severity", "where"),
    [
        ({"input": None}, "error", "tsk-5.input"),
        ({"input": [{"type": {"text": "outcome"}, "valueString": "fine"}]}, "error", "tsk-5.input"),
        ({"input": [{"type": {"coding": [{"system": mv.INPUT, "code": "action"}]}, "valueCode": "titrate"}]}, "error", "tsk-5.input[0]"),
        ({"focus": {"reference": "MedicationRequest/unknown"}}, "error", "tsk-5.focus"),
        ({"focus": None}, "error", "tsk-5.focus"),
        ({"requester": {"reference": "Organization/o"}}, "error", "tsk-5.owner"),
        ({"authoredOn": None}, "error", "tsk-5.executionPeriod"),
        ({"status": "in-progress"}, "warning", "tsk-5.status"),
        ({"input": [{"type": {"coding": [{"system": mv.INPUT, "code": "action"}]}, "valueCode": "switch"}]}, "error", "tsk-5.output"),
    ],
)
def test_foreign_review_left_out(ctx: MappingContext, changes: JSON, severity: str, where: str) -> None:
    draft, report = back(world(ctx) + [foreign_review(ctx, **changes)])
    assert draft["medication_reviews"] == []
    assert found(report, severity, where), report.issues


def test_foreign_review_optional_parts_dropped(ctx: MappingContext) -> None:
    task = foreign_review(ctx, input=[
        {"type": {"coding": [{"system": mv.INPUT, "code": "action"}]}, "valueString": "hold"},
        {"type": {"coding": [{"system": mv.INPUT, "code": "new-dose"}]}, "valueQuantity": {"value": 1, "unit": "puff"}},
        {"type": {"text": "notes"}, "valueString": "x"},
    ], output=[{"type": {"text": "letter"}, "valueReference": {"reference": "DocumentReference/d"}}], reasonCode=None,
        reasonReference=[{"reference": "Condition/c"}])
    draft, report = back(world(ctx) + [task])
    (review,) = draft["medication_reviews"]
    assert review["action"] == "hold" and "new_dose" not in review and "reason" not in review
    for where in ("input[1].valueQuantity", "input[2]", "output[0]", "reasonReference"):
        assert found(report, "warning", where), where


def test_review_of_unmapped_prescription_is_left_out(ctx: MappingContext, tasks: list[JSON]) -> None:
    resources = [r for r in world(ctx) if not r["identifier"][0]["value"].endswith("/rx-4")]
    draft, report = back(resources + tasks)
    assert [r["id"] for r in draft["medication_reviews"]] == ["rv-1", "rv-2"]
    assert found(report, "error", "focus")


def test_duplicate_reviews(ctx: MappingContext, tasks: list[JSON]) -> None:
    draft, report = back(world(ctx) + tasks + [{**tasks[0], "id": "copy"}])
    assert [r["id"] for r in draft["medication_reviews"]] == ["rv-1", "rv-2", "rv-3"]
    assert found(report, "warning", "Task/copy.identifier")


@pytest.mark.parametrize("junk", [None, 3, "x", [], {}, [None, 1], {"reference": 5}])
@pytest.mark.parametrize(
    "element", ["identifier", "code", "focus", "owner", "requester", "executionPeriod", "input", "output", "reasonCode", "status"]
)
def test_garbage_never_crashes(ctx: MappingContext, tasks: list[JSON], element: str, junk: Any) -> None:
    task = copy.deepcopy(tasks[1])
    task[element] = junk
    draft, report = back(world(ctx) + [task])
    assert isinstance(draft["medication_reviews"], list)
    if not draft["medication_reviews"]:
        assert report.issues


def test_new_dose_unit_text_follows_the_product(example_json: JSON) -> None:
    data = copy.deepcopy(example_json)
    data["medication_reviews"].append(
        {"id": "rv-9", "date": "2026-02-01", "prescription_id": "rx-3", "action": "continue",
         "new_dose": {"value": Decimal("1.5"), "unit": "1"}, "reviewer_id": "st-psy-1"}
    )
    task = mv.to_fhir(MappingContext(IopRecord.model_validate(data)))[-1]
    assert task["input"][1]["valueQuantity"] == {"value": 1.5, "unit": "film", "system": terminology.UCUM, "code": "1"}
