"""care_plan.py: the treatment plan and its goals, and the aftercare plan <-> CarePlan + Goal."""

from __future__ import annotations

import copy
import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import texts
from lxml import etree

from iop_fhir import terminology
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers import care_plan
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.datatypes import XHTML_NS, xhtml_text
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record import IopRecord, validate_record
from iop_fhir.record.model import Aftercare, CarePlan

JSON = dict[str, Any]
EXAMPLE_JSON = json.loads((Path(__file__).parents[3] / "fixtures" / "iop" / "example-dual-diagnosis.json").read_text())
PLAN_KIND = terminology.code_system("care-plan-kind")


def forward(record: IopRecord) -> list[JSON]:
    resources = care_plan.to_fhir(MappingContext(record))
    for resource in resources:
        assert validate_resource(resource) == []
        if resource["resourceType"] == "CarePlan":
            assert resource["meta"]["profile"] == [terminology.us_core("us-core-careplan")]
            assert {"system": terminology.CAREPLAN_CATEGORY, "code": "assess-plan", "display": "Assessment and Plan of Treatment"} in [
                c for cat in resource["category"] for c in cat["coding"]
            ]
            narrative_text(resource)
        else:
            assert resource["meta"]["profile"] == [terminology.us_core("us-core-goal")]
            assert resource["startDate"] or resource["target"][0]["dueDate"]  # US Core: one of them
    return resources


def narrative_text(resource: JSON) -> str:
    """The narrative's text, after checking it is one well-formed XHTML div (as FHIR requires)."""
    assert resource["text"]["status"] == "generated"
    div = etree.fromstring(resource["text"]["div"].encode())
    assert div.tag == f"{{{XHTML_NS}}}div"
    assert {e.tag.split("}")[1] for e in div.iter()} <= {"div", "p", "b", "ul", "li"}
    return "".join(div.itertext())


def parties(record: IopRecord) -> list[JSON]:
    """What the plans point at, identified as the other modules identify them."""
    ids = MappingContext(record).ids

    def stub(rtype: str, kind: str, local: str, shared: bool) -> JSON:
        return {"resourceType": rtype, "id": ids.id(rtype, kind, local, shared=shared), "identifier": [ids.identifier(kind, local, shared=shared)]}

    return (
        [stub("Practitioner", "staff", m.id, True) for m in record.care_team]
        + [stub("Condition", "diagnosis", d.id, False) for d in record.diagnoses]
        + [stub("Organization" if p.kind == "organization" else "Practitioner", "provider", p.id, True) for p in record.providers]
        + [stub("Organization", "pharmacy", p.id, True) for p in record.pharmacies]
    )


def back(*resources: JSON, draft: JSON | None = None) -> tuple[JSON, MappingReport]:
    draft = {} if draft is None else draft
    report = MappingReport()
    care_plan.from_fhir(ResourceIndex.build(list(resources)), draft, report)
    return draft, report


def by_kind(resources: list[JSON], code: str) -> JSON:
    return next(r for r in resources if r["resourceType"] == "CarePlan" and {"system": PLAN_KIND, "code": code} in [
        {k: c[k] for k in ("system", "code")} for cat in r["category"] for c in cat["coding"]])


# --- the example ----------------------------------------------------------------------------


def test_example_treatment_plan(example_record: IopRecord) -> None:
    ctx = MappingContext(example_record)
    resources = forward(example_record)
    assert [r["resourceType"] for r in resources] == ["CarePlan", "Goal", "Goal", "CarePlan"]
    plan = by_kind(resources, "iop-treatment")
    assert plan["identifier"][0] == ctx.ids.identifier("care-plan", "cp-1")
    assert (plan["status"], plan["intent"], plan["created"]) == ("completed", "plan", "2026-01-05")
    assert plan["period"] == {"start": "2026-01-05", "end": "2026-02-27"}
    assert plan["author"] == ctx.practitioner("st-psy-1")
    assert plan["addresses"] == [ctx.condition("dx-1"), ctx.condition("dx-2")]
    assert plan["goal"] == [{"reference": f"urn:uuid:{g['id']}"} for g in resources[1:3]]
    assert plan["description"] == example_record.care_plan.summary
    group, individual, screening = plan["activity"]
    assert group["id"] == "a-1"
    assert group["detail"]["kind"] == "ServiceRequest"
    assert group["detail"]["scheduledTiming"] == {"repeat": {"frequency": 4, "period": 1, "periodUnit": "wk", "duration": 180, "durationUnit": "min"}}
    assert [c["code"] for c in group["detail"]["code"]["coding"]] == ["76168009", "90853", "group"]
    assert group["detail"]["goal"] == plan["goal"]
    # progress: only the attended group session (ses-3 was a no-show)
    assert group["outcomeReference"] == [ctx.ids.reference("Encounter", "session", "ses-1")]
    assert individual["outcomeReference"] == [ctx.ids.reference("Encounter", "session", "ses-2")]
    assert "outcomeReference" not in screening
    assert screening["detail"]["code"]["coding"][0] == {"system": terminology.LOINC, "code": "69739-1", "display": "Drugs of abuse panel - Urine by Screen method"}
    assert screening["detail"]["scheduledTiming"] == {"repeat": {"frequency": 1, "period": 1, "periodUnit": "wk"}}
    assert [n["text"] for n in plan["note"]] == example_record.care_plan.relapse_prevention
    text = narrative_text(plan)
    assert "Reduce depressive symptoms" in text and "Call sponsor when cravings exceed 5/10" in text


def test_example_goals(example_record: IopRecord) -> None:
    ctx = MappingContext(example_record)
    _, phq, stable, _ = forward(example_record)
    assert phq["identifier"][0] == ctx.ids.identifier("goal", "g-1")
    assert (phq["lifecycleStatus"], phq["achievementStatus"]["coding"][0]["code"]) == ("completed", "achieved")
    assert phq["description"] == {"text": "Reduce depressive symptoms"}
    assert phq["subject"] == ctx.patient and phq["startDate"] == "2026-01-05"
    assert phq["target"] == [{
        "measure": {"coding": [{"system": terminology.LOINC, "code": "44261-6",
                                "display": "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]"}]},
        "detailQuantity": {"value": 10, "comparator": "<", "unit": "score", "system": terminology.UCUM, "code": "{score}"},
        "dueDate": "2026-02-27",
    }]
    assert phq["addresses"] == [ctx.condition("dx-1")]
    assert "target" not in stable


def test_example_aftercare_plan(example_record: IopRecord) -> None:
    ctx = MappingContext(example_record)
    resources = forward(example_record)
    treatment, aftercare = by_kind(resources, "iop-treatment"), by_kind(resources, "aftercare")
    assert aftercare["identifier"][0] == ctx.ids.identifier("aftercare-plan", "ac-1")
    assert aftercare["replaces"] == [{"reference": f"urn:uuid:{treatment['id']}"}]
    assert (aftercare["status"], aftercare["intent"]) == ("active", "plan")
    assert aftercare["period"] == {"start": "2026-02-27"}
    assert aftercare["description"] == "Weekly outpatient therapy; monthly buprenorphine visits."
    follow_up, pharmacy, *medications = aftercare["activity"]
    assert follow_up["detail"]["kind"] == "Appointment"
    assert follow_up["detail"]["code"]["coding"][0]["code"] == "OP"
    assert follow_up["detail"]["scheduledPeriod"] == {"start": "2026-03-04"}
    assert follow_up["detail"]["performer"] == [ctx.provider("pr-1")]
    assert pharmacy["detail"]["kind"] == "MedicationRequest"
    assert pharmacy["detail"]["performer"] == [ctx.pharmacy("ph-1")]
    assert medications == [
        {"reference": ctx.ids.reference("MedicationRequest", "discharge-medication", rx)} for rx in ("rx-2", "rx-3", "rx-4")
    ]
    text = narrative_text(aftercare)
    assert "Lakeside Community Behavioral Health" in text and "Main Street Pharmacy" in text


def test_example_round_trip_merges_aftercare(example_record: IopRecord) -> None:
    medications = [m.model_dump(mode="json", exclude_none=True) for m in example_record.discharge.aftercare.medications]
    seeded = {"discharge": {"date": "2026-02-27", "aftercare": {"medications": copy.deepcopy(medications)}}}
    draft, report = back(*forward(example_record), *parties(example_record), draft=seeded)
    assert report.issues == []
    assert CarePlan.model_validate(draft["care_plan"]) == example_record.care_plan
    assert draft["discharge"]["date"] == "2026-02-27"  # episode.py's part is left alone
    assert draft["discharge"]["aftercare"]["medications"] == medications  # and medication_request.py's
    assert Aftercare.model_validate(draft["discharge"]["aftercare"]) == example_record.discharge.aftercare


def test_relapse_prevention_code_follows_the_substance(example_json: JSON) -> None:
    def code(diagnoses: list[JSON]) -> str:
        data = copy.deepcopy(example_json)
        data["diagnoses"] = diagnoses
        for goal in data["care_plan"]["goals"]:
            goal["addresses_ids"] = []
        data["care_plan"]["addresses_ids"] = []
        for rx in data["prescriptions"]:
            rx.pop("indication_id", None)
        data["care_plan"]["activities"].append({"id": "a-9", "kind": "relapse-prevention", "description": "Relapse prevention group"})
        plan = forward(validate_record(data))[0]
        return plan["activity"][-1]["detail"]["code"]["coding"][0]["code"]

    alcohol = {"id": "d1", "code": "F10.20", "rank": "primary"}
    opioid = {"id": "d2", "code": "F11.20", "rank": "secondary"}
    depression = {"id": "d3", "code": "F33.1", "rank": "secondary"}
    assert code([alcohol, depression]) == "720176005"
    assert code([alcohol, opioid]) == "720177001"
    assert code([depression | {"rank": "primary"}]) == "720177001"


# --- property: random plans and aftercare survive the trip ----------------------------------

TEXT = texts(30) | st.sampled_from(
    ["<script>alert('x')</script>", "a < b & c > d", "&amp; &lt;", "]]>", "line\nbreak\ttab", " padded ", "Zoë — 日本語 🙂"]
)
IDS = st.lists(st.from_regex(r"[A-Za-z0-9\-.]{1,20}", fullmatch=True), max_size=5, unique=True)
DIAGNOSES = ["dx-1", "dx-2"]
STAFF = ["st-psy-1", "st-ther-1", "st-cm-1"]
KINDS = ["group", "individual", "family", "psychoeducation", "medication-management", "relapse-prevention", "drug-screening"]


def subset(items: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(items), unique=True) if items else st.just([])


@st.composite
def plans(draw: st.DrawFn) -> JSON:
    start = draw(st.dates(dt.date(2025, 6, 1), dt.date(2026, 6, 1)))
    later = st.integers(0, 200).map(lambda n: (start + dt.timedelta(days=n)).isoformat())
    goals = []
    for goal_id in draw(IDS):
        goal = {
            "id": goal_id,
            "description": draw(TEXT),
            "status": draw(st.sampled_from(["proposed", "active", "on-hold", "completed", "cancelled"])),
            "achievement": draw(st.none() | st.sampled_from(sorted(care_plan.ACHIEVEMENT_DISPLAY))),
            "addresses_ids": draw(subset(DIAGNOSES)),
        }
        if draw(st.booleans()):
            measure = draw(st.sampled_from(sorted(terminology.tables()["instruments"])))
            low, high = terminology.instrument(measure)["range"]
            goal["target"] = {
                "measure": measure,
                "comparator": draw(st.sampled_from(["<", "<=", ">=", ">"])),
                "value": draw(st.integers(low, high)),
                "due": draw(st.none() | later),
            }
        goals.append(goal)
    goal_ids = [g["id"] for g in goals]
    activities = [
        {
            "id": activity_id,
            "kind": draw(st.sampled_from(KINDS)),
            "description": draw(TEXT),
            "days_per_week": draw(st.none() | st.integers(1, 7)),
            "minutes_per_session": draw(st.none() | st.integers(1, 600)),
            "status": draw(st.sampled_from(sorted(care_plan.ACTIVITY_STATUSES))),
            "goal_ids": draw(subset(goal_ids)),
        }
        for activity_id in draw(IDS)
    ]
    return {
        "id": draw(st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True)),
        "status": draw(st.sampled_from(["draft", "active", "on-hold", "revoked", "completed"])),
        "created": draw(st.dates(dt.date(2025, 1, 1), start)).isoformat(),
        "period": {"start": start.isoformat(), "end": draw(st.none() | later)},
        "addresses_ids": draw(subset(DIAGNOSES)),
        "goals": goals,
        "activities": activities,
        "relapse_prevention": draw(st.lists(TEXT, max_size=4)),
        "summary": draw(st.none() | TEXT),
        "author_id": draw(st.none() | st.sampled_from(STAFF)),
    }


@st.composite
def aftercares(draw: st.DrawFn) -> JSON | None:
    if not draw(st.booleans()):
        return None
    follow_up = st.integers(0, 30).map(lambda n: (dt.date(2026, 2, 27) + dt.timedelta(days=n)).isoformat())
    return {
        "id": draw(st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True)),
        "next_level_of_care": draw(st.sampled_from(sorted(care_plan.NEXT_LEVELS))),
        "receiving_provider_id": draw(st.none() | st.just("pr-1")),
        "first_follow_up": draw(st.none() | follow_up),
        "pharmacy_id": draw(st.none() | st.just("ph-1")),
        "medications": EXAMPLE_JSON["discharge"]["aftercare"]["medications"] if draw(st.booleans()) else [],
        "instructions": draw(st.none() | TEXT),
    }


@settings(max_examples=120, deadline=None)
@given(st.none() | plans(), aftercares())
def test_round_trip_any_plan(plan: JSON | None, aftercare: JSON | None) -> None:
    data = copy.deepcopy(EXAMPLE_JSON)
    data["care_plan"] = plan
    data["discharge"]["aftercare"] = aftercare
    record = validate_record(data)
    resources = forward(record)
    if plan:
        shown = narrative_text(resources[0])
        for item in record.care_plan.relapse_prevention:
            assert html.unescape(xhtml_text(item)) in shown  # escaped on the way in, the same text out
    medications = [m.model_dump(mode="json", exclude_none=True) for m in (record.discharge.aftercare.medications if aftercare else [])]
    seeded = {"discharge": {"aftercare": {"medications": medications}}} if medications else {}
    draft, report = back(*resources, *parties(record), draft=seeded)
    assert report.issues == []
    if plan:
        assert CarePlan.model_validate(draft["care_plan"]) == record.care_plan
    else:
        assert "care_plan" not in draft
    if aftercare:
        assert Aftercare.model_validate(draft["discharge"]["aftercare"]) == record.discharge.aftercare
    else:
        assert "aftercare" not in draft.get("discharge", {})


# --- foreign CarePlan / Goal ----------------------------------------------------------------


def foreign_goal(goal_id: str, **changes: Any) -> JSON:
    goal = {
        "resourceType": "Goal",
        "id": goal_id,
        "lifecycleStatus": "accepted",
        "achievementStatus": {"coding": [{"system": terminology.GOAL_ACHIEVEMENT, "code": "sustaining"}]},
        "description": {"coding": [{"system": terminology.SNOMED, "code": "1", "display": "Abstinence from alcohol"}]},
        "subject": {"reference": "Patient/p1"},
        "target": [
            {"measure": {"coding": [{"system": terminology.LOINC, "code": "8302-2"}]}, "detailQuantity": {"value": 170}},
            {"measure": {"coding": [{"system": terminology.LOINC, "code": "70274-6"}]},
             "detailQuantity": {"value": 5.0, "comparator": "<="}, "dueDate": "2026-05-01"},
        ],
    }
    goal.update(changes)
    return goal


def foreign_plan(**changes: Any) -> JSON:
    plan = {
        "resourceType": "CarePlan",
        "id": "plan-1",
        "status": "active",
        "intent": "plan",
        "subject": {"reference": "Patient/p1"},
        "created": "2026-03-01T10:00:00Z",
        "addresses": [{"reference": "Condition/c1"}, {"reference": "Condition/elsewhere"}],
        "goal": [{"reference": "Goal/goal-a"}, {"reference": "#contained-goal"}],
        "contained": [foreign_goal("contained-goal", lifecycleStatus="rejected")],
        "author": {"reference": "Organization/org-1"},
        "note": [{"text": "Patient prefers mornings"}],
        "activity": [
            {"reference": {"reference": "ServiceRequest/sr-1"}},
            {"id": "act 1", "detail": {
                "status": "in-progress",
                "code": {"coding": [{"system": terminology.CPT, "code": "90847"}], "text": "Family therapy"},
                "scheduledTiming": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d", "duration": 1, "durationUnit": "h"}},
                "goal": [{"reference": "Goal/goal-a"}, {"reference": "Goal/not-in-plan"}],
            }},
            {"detail": {"status": "unknown", "description": "Walk daily",
                        "code": {"coding": [{"system": terminology.SNOMED, "code": "229065009"}]}}},
            {"id": "uds", "detail": {"status": "scheduled", "description": "Urine drug screen",
                                     "code": {"coding": [{"system": terminology.LOINC, "code": "87428-9"}]},
                                     "scheduledTiming": {"repeat": {"frequency": 2, "period": 1, "periodUnit": "mo"}}}},
        ],
    }
    plan.update(changes)
    return plan


def test_foreign_plan_maps_what_it_can_and_reports_the_rest() -> None:
    condition = {"resourceType": "Condition", "id": "c1"}
    draft, report = back(foreign_plan(), foreign_goal("goal-a"), foreign_goal("goal-loose"), condition)
    assert draft["care_plan"] == {
        "id": "plan-1",
        "status": "active",
        "created": "2026-03-01",
        "period": {"start": "2026-03-01"},
        "addresses_ids": ["c1"],
        "goals": [{
            "id": "goal-a", "description": "Abstinence from alcohol", "status": "active", "achievement": "achieved",
            "target": {"measure": "GAD-7", "comparator": "<=", "value": 5, "due": "2026-05-01"},
        }],
        "activities": [
            {"id": "activity-2", "kind": "family", "description": "Family therapy", "status": "in-progress",
             "days_per_week": 7, "minutes_per_session": 60, "goal_ids": ["goal-a"]},
            {"id": "uds", "kind": "drug-screening", "description": "Urine drug screen", "status": "scheduled"},
        ],
    }
    where = {i.location: i.severity for i in report.issues}
    assert where["CarePlan/plan-1.period.start"] == "warning"  # created stands in
    assert where["CarePlan/plan-1.addresses[1]"] == "warning"
    assert where["CarePlan/plan-1.author"] == "warning"
    assert where["CarePlan/plan-1.note[0]"] == "warning"
    assert where["CarePlan/plan-1.activity[0]"] == "warning"  # a bare request reference
    assert where["CarePlan/plan-1.activity[1].detail.goal[1]"] == "warning"
    assert where["CarePlan/plan-1.activity[2].detail.code"] == "warning"  # no IOP activity kind
    assert where["CarePlan/plan-1.activity[3].detail.scheduledTiming"] == "warning"  # 2 a month
    assert where["Goal/contained-goal"] == "error"  # rejected: no contract status
    assert where["Goal/goal-a.target"] == "warning"  # two targets, one carried
    assert where["Goal/goal-loose"] == "warning"  # not in any plan
    assert where["Goal/goal-a.lifecycleStatus"] == "information"
    assert "discharge" not in draft


def test_foreign_plan_without_status_or_dates_is_left_out() -> None:
    draft, report = back(foreign_plan(status="unknown", created=None, goal=[]))
    assert "care_plan" not in draft
    assert report.errors[0].location == "CarePlan/plan-1"
    assert "plan status" in report.errors[0].message and "start or created" in report.errors[0].message


def test_foreign_aftercare_plan(example_record: IopRecord) -> None:
    ours = forward(example_record)
    aftercare = copy.deepcopy(by_kind(ours, "aftercare"))
    aftercare["activity"].append({"detail": {"status": "scheduled", "description": "Yoga"}})
    del aftercare["activity"][0]["detail"]["performer"]
    draft, report = back(aftercare, *parties(example_record), draft={"discharge": {"date": "2026-02-27"}})
    assert draft["discharge"]["aftercare"] == {
        "id": "ac-1", "next_level_of_care": "OP", "first_follow_up": "2026-03-04", "pharmacy_id": "ph-1",
        "instructions": "Weekly outpatient therapy; monthly buprenorphine visits.",
    }
    assert [i.location for i in report.issues] == [f"CarePlan/{aftercare['id']}.activity[5]"]
    aftercare["activity"] = aftercare["activity"][1:]  # no follow-up: no level of care
    draft, report = back(aftercare, *parties(example_record))
    assert "discharge" not in draft
    assert report.errors and "level of care" in report.errors[0].message


def test_only_one_plan_of_each_kind(example_record: IopRecord) -> None:
    ours = forward(example_record)
    draft, report = back(foreign_plan(goal=[], activity=[]), *ours, *parties(example_record))
    assert draft["care_plan"]["id"] == "cp-1"  # ours wins over a foreign one
    assert [i.location for i in report.issues if i.severity == "warning"][0] == "CarePlan/plan-1"


def test_odd_shapes_never_crash() -> None:
    odd = [
        foreign_plan(goal="x", activity={"detail": 1}, note=[None, 3], addresses=5, period=[1]),
        foreign_plan(activity=[{"detail": {"code": "x", "scheduledTiming": {"repeat": {"duration": "long", "durationUnit": "min"}}}}]),
        foreign_plan(activity=[{"id": 3, "detail": {"code": {"coding": [{"system": care_plan.ACTIVITY, "code": "group"}]},
                                                     "description": 5, "goal": "g", "status": []}}]),
        foreign_plan(category=[{"coding": [{"system": PLAN_KIND, "code": "aftercare"}]}], activity=[7, None], identifier="x"),
        foreign_plan(identifier=[{"system": 1, "value": 2}], id=None, created="yesterday"),
        foreign_plan(modifierExtension=[{"url": "http://x.example/m", "valueBoolean": True}]),
        foreign_plan(activity=[{"detail": {"code": {"coding": [{"system": terminology.LOINC, "code": "69739-1"}]},
                                           "description": "x", "scheduledTiming": {"repeat": {"frequency": float("inf"), "periodUnit": "wk",
                                                                                             "duration": float("nan"), "durationUnit": "h"}}}}]),
    ]
    goals = [foreign_goal("goal-a", target="x", description=None), foreign_goal("goal-b", target=[{"detailQuantity": {"value": float("inf"), "comparator": "<"}}])]
    for resource in odd:
        draft, report = back(resource, *goals)  # never raises
        assert report.issues
