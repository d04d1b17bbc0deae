"""The treatment plan and the aftercare plan <-> FHIR CarePlan and Goal (US Core).

Two CarePlans per record at most, told apart by a second category from the project's
``care-plan-kind`` code system (``iop-treatment`` / ``aftercare``) beside US Core's required
``assess-plan``; each Goal of the treatment plan is its own Goal resource.

Treatment plan (``care_plan``, identifier kind ``care-plan``):

| contract field                 | FHIR                                                                    |
|--------------------------------|-------------------------------------------------------------------------|
| id                             | CarePlan.identifier[0] and ``id``                                       |
| status / created / period      | CarePlan.status / created / period                                      |
| addresses_ids                  | CarePlan.addresses (Conditions)                                         |
| summary                        | CarePlan.description (and the narrative)                                |
| author_id                      | CarePlan.author (Practitioner)                                          |
| relapse_prevention[]           | CarePlan.note[] marked by extension ``note-topic`` = relapse-prevention |
|                                | (free text kept as written, in order; a per-item activity would be noise)|
| goals[]                        | Goal resources, listed in CarePlan.goal in order                        |
| goals[].id                     | Goal.identifier[0] (kind ``goal``) and ``id``                           |
| goals[].description            | Goal.description.text                                                   |
| goals[].status / achievement   | Goal.lifecycleStatus / achievementStatus (goal-achievement)             |
| goals[].target                 | Goal.target[0]: measure = LOINC total score of the instrument (C-SSRS   |
|                                | screen has none: CodeSystem/instrument), detailQuantity = value with    |
|                                | comparator in UCUM ``{score}``, dueDate = due                           |
| goals[].addresses_ids          | Goal.addresses (Conditions)                                             |
| activities[]                   | CarePlan.activity[] in order                                            |
| activities[].id                | activity.id (the element id: activities have no identifier element)    |
| activities[].kind              | activity.detail.code: CodeSystem/care-plan-activity code, plus SNOMED   |
|                                | CT/CPT (sessions), SNOMED 720176005/720177001 (relapse prevention: the  |
|                                | alcohol programme when the only SUD diagnoses are F10), LOINC 69739-1   |
|                                | (drug screening)                                                        |
| activities[].description       | activity.detail.description                                             |
| activities[].status            | activity.detail.status                                                  |
| activities[].days_per_week     | detail.scheduledTiming.repeat frequency (per 1 ``wk``)                  |
| activities[].minutes_per_session | detail.scheduledTiming.repeat duration (``min``)                      |
| activities[].goal_ids          | activity.detail.goal (Goals)                                            |
| derived (not read back)        | narrative, intent ``plan``, subject, careTeam, Goal.startDate (the plan |
|                                | start: US Core wants a start or due date), Goal.subject,                |
|                                | activity.outcomeReference (the attended session Encounters of that kind)|

Aftercare plan (``discharge.aftercare``, identifier kind ``aftercare-plan``):

| contract field                 | FHIR                                                                    |
|--------------------------------|-------------------------------------------------------------------------|
| id                             | CarePlan.identifier[0] and ``id``                                       |
| next_level_of_care             | activity (follow-up, detail.kind Appointment) detail.code               |
|                                | CodeSystem/level-of-care                                                |
| first_follow_up                | that activity's detail.scheduledPeriod.start                            |
| receiving_provider_id          | that activity's detail.performer (provider Organization/Practitioner)   |
| pharmacy_id                    | activity (detail.kind MedicationRequest, code care-plan-activity        |
|                                | ``dispensing``) detail.performer (pharmacy Organization)                |
| instructions                   | CarePlan.description                                                    |
| medications[]                  | not here: medication_request.py carries them; this plan only points at  |
|                                | their MedicationRequests (activity.reference, derived)                  |
| derived (not read back)        | narrative, status ``active``, period.start = discharge date, subject,   |
|                                | ``replaces`` = the treatment plan                                       |

The aftercare plan ``replaces`` the treatment plan rather than being ``basedOn`` it: R4
defines ``replaces`` as the plan taking over from a completed one whose need goes on, which is
what a step-down is; ``basedOn`` means a plan that fulfils part of another.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers.context import (
    LOCAL_ID,
    MappingContext,
    ResourceIndex,
    identifier_kind,
    local_id,
    practitioner_id,
    reference_text,
    referenced_id,
)
from iop_fhir.mappers.datatypes import (
    as_dict,
    as_list,
    choices,
    code_in,
    code_in_any,
    codings_of,
    coding,
    concept,
    concept_text,
    drop_empty,
    extension,
    fhir_date,
    finite_number,
    narrative,
    nonempty,
    own_extensions,
    parse_date,
    read_each,
    settle,
    ucum_quantity,
    unknown_modifiers,
    where,
    whole_number,
    xhtml_text,
)
from iop_fhir.mappers.encounter import session_codings, session_kind
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import Activity, Aftercare, CarePlan, Discharge, Goal, GoalTarget

JSON = dict[str, Any]

KIND = "care-plan"
GOAL_KIND = "goal"
AFTERCARE_KIND = "aftercare-plan"
PROFILE = terminology.us_core("us-core-careplan")
GOAL_PROFILE = terminology.us_core("us-core-goal")
PLAN_KIND = terminology.code_system("care-plan-kind")
ACTIVITY = terminology.code_system("care-plan-activity")
# One code system for levels of care: the program's own (organization.py) and where a client
# goes next; its displays are terminology.level_of_care.
LEVEL_OF_CARE = terminology.code_system("level-of-care")
INSTRUMENT = terminology.code_system("instrument")
SCORE_UNIT = "{score}"

ASSESS_PLAN = concept(coding(terminology.CAREPLAN_CATEGORY, "assess-plan", "Assessment and Plan of Treatment"))
IOP_TREATMENT = concept(coding(PLAN_KIND, "iop-treatment", "IOP treatment plan"))
AFTERCARE = concept(coding(PLAN_KIND, "aftercare", "Aftercare plan"))
RELAPSE_NOTE = extension("note-topic", valueCode="relapse-prevention")
DISPENSING = coding(ACTIVITY, "dispensing", "Dispensing of discharge medications")

ACTIVITY_DISPLAY = {
    "group": "Group therapy",
    "individual": "Individual therapy",
    "family": "Family therapy",
    "psychoeducation": "Psychoeducation",
    "medication-management": "Medication management",
    "relapse-prevention": "Relapse prevention",
    "drug-screening": "Urine drug screening",
}
NEXT_LEVELS = choices(Aftercare, "next_level_of_care")
ACHIEVEMENT_DISPLAY = {
    "in-progress": "In Progress",
    "improving": "Improving",
    "worsening": "Worsening",
    "no-change": "No Change",
    "achieved": "Achieved",
    "not-achieved": "Not Achieved",
}
# Foreign codes the contract has no twin for, mapped to the nearest (reported as information).
GOAL_STATUS_NEAREST = {"planned": "proposed", "accepted": "active"}
ACHIEVEMENT_NEAREST = {"sustaining": "achieved", "no-progress": "no-change", "not-attainable": "not-achieved"}
GOAL_STATUSES = choices(Goal, "status")
PLAN_STATUSES = choices(CarePlan, "status")
ACTIVITY_STATUSES = choices(Activity, "status")
COMPARATORS = choices(GoalTarget, "comparator")
# SNOMED CT relapse prevention programme by the substance (displays: terminology.snomed_display).
RELAPSE_PREVENTION = {"alcohol": "720176005", "drug": "720177001"}


# --- forward --------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """The treatment plan, its Goals, then the aftercare plan (each if the record has it)."""
    out: list[JSON] = []
    plan = ctx.record.care_plan
    if plan:
        out.append(_treatment_plan(ctx, plan))
        out.extend(_goal(ctx, plan, goal) for goal in plan.goals)
    discharge = ctx.record.discharge
    if discharge and discharge.aftercare:
        out.append(_aftercare_plan(ctx, discharge, discharge.aftercare))
    return out


def plan_reference(ctx: MappingContext, plan_id: str) -> JSON:
    return ctx.ids.reference("CarePlan", KIND, plan_id)


def goal_reference(ctx: MappingContext, goal_id: str) -> JSON:
    return ctx.ids.reference("Goal", GOAL_KIND, goal_id)


def _treatment_plan(ctx: MappingContext, plan: CarePlan) -> JSON:
    resource: JSON = {
        "resourceType": "CarePlan",
        "id": ctx.ids.id("CarePlan", KIND, plan.id),
        "meta": {"profile": [PROFILE]},
        "text": narrative(_plan_narrative(plan)),
        "identifier": [ctx.ids.identifier(KIND, plan.id)],
        "status": plan.status,
        "intent": "plan",
        "category": [ASSESS_PLAN, IOP_TREATMENT],
        "description": plan.summary,
        "subject": ctx.patient,
        "period": drop_empty({"start": fhir_date(plan.period.start), "end": fhir_date(plan.period.end) if plan.period.end else None}),
        "created": fhir_date(plan.created),
        "author": ctx.practitioner(plan.author_id) if plan.author_id else None,
        "careTeam": [ctx.care_team] if ctx.record.care_team else [],
        "addresses": [ctx.condition(d) for d in plan.addresses_ids],
        "goal": [goal_reference(ctx, g.id) for g in plan.goals],
        "activity": [_activity(ctx, a) for a in plan.activities],
        # R4 has no element for relapse-prevention notes; a marked Annotation keeps them as written.
        "note": [{"extension": [RELAPSE_NOTE], "text": item} for item in plan.relapse_prevention],
    }
    return drop_empty(resource)


def _activity(ctx: MappingContext, activity: Activity) -> JSON:
    repeat: JSON = {}
    if activity.days_per_week:
        repeat.update(frequency=activity.days_per_week, period=1, periodUnit="wk")
    if activity.minutes_per_session:
        repeat.update(duration=activity.minutes_per_session, durationUnit="min")
    detail = {
        "kind": "ServiceRequest",
        "code": concept(*_activity_codings(ctx, activity.kind)),
        "goal": [goal_reference(ctx, g) for g in activity.goal_ids],
        "status": activity.status,
        "scheduledTiming": {"repeat": repeat} if repeat else None,
        "description": activity.description,
    }
    # Progress: the sessions of this kind the client attended (derived from sessions[]).
    outcomes = [
        ctx.session(s.id)
        for s in ctx.record.sessions
        if s.kind == activity.kind and s.attendance == "attended"
    ]
    return drop_empty({"id": activity.id, "outcomeReference": outcomes, "detail": drop_empty(detail)})


def _activity_codings(ctx: MappingContext, kind: str) -> list[JSON]:
    if kind == "relapse-prevention":
        code = RELAPSE_PREVENTION[_relapse_substance(ctx)]
        public = [coding(terminology.SNOMED, code, terminology.snomed_display(code))]
    elif kind == "drug-screening":
        panel = terminology.tables()["drug_screen_panels"]["screen"]
        public = [coding(terminology.LOINC, panel["code"], panel["display"])]
    else:
        public = session_codings(kind)
    return [*public, coding(ACTIVITY, kind, ACTIVITY_DISPLAY[kind])]


def _relapse_substance(ctx: MappingContext) -> str:
    """Alcohol when every substance-use diagnosis is an alcohol one (F10), else drugs."""
    codes = [d.code for d in ctx.record.diagnoses if terminology.is_substance_use_diagnosis(d.code)]
    return "alcohol" if codes and all(c.startswith("F10") for c in codes) else "drug"


def _goal(ctx: MappingContext, plan: CarePlan, goal: Goal) -> JSON:
    resource: JSON = {
        "resourceType": "Goal",
        "id": ctx.ids.id("Goal", GOAL_KIND, goal.id),
        "meta": {"profile": [GOAL_PROFILE]},
        "identifier": [ctx.ids.identifier(GOAL_KIND, goal.id)],
        "lifecycleStatus": goal.status,
        "achievementStatus": (
            concept(coding(terminology.GOAL_ACHIEVEMENT, goal.achievement, ACHIEVEMENT_DISPLAY[goal.achievement])) if goal.achievement else None
        ),
        "description": {"text": goal.description},
        "subject": ctx.patient,
        "startDate": fhir_date(plan.period.start),
        "target": [_target(goal.target)] if goal.target else [],
        "addresses": [ctx.condition(d) for d in goal.addresses_ids],
    }
    return drop_empty(resource)


def _target(target: GoalTarget) -> JSON:
    total = terminology.instrument(target.measure)["total"]
    if total:
        measure = coding(terminology.LOINC, total["code"], total["display"])
    else:
        measure = coding(INSTRUMENT, target.measure, f"{target.measure} score")
    quantity = {**ucum_quantity(target.value, SCORE_UNIT, "score"), "comparator": target.comparator}
    return drop_empty(
        {
            "measure": concept(measure),
            "detailQuantity": quantity,
            "dueDate": fhir_date(target.due) if target.due else None,
        }
    )


def _aftercare_plan(ctx: MappingContext, discharge: Discharge, aftercare: Aftercare) -> JSON:
    record = ctx.record
    level = aftercare.next_level_of_care
    follow_up = {
        "kind": "Appointment",
        "code": concept(coding(LEVEL_OF_CARE, level, terminology.level_of_care(level))),
        "status": "scheduled" if aftercare.first_follow_up else "not-started",
        "scheduledPeriod": {"start": fhir_date(aftercare.first_follow_up)} if aftercare.first_follow_up else None,
        "performer": [ctx.provider(aftercare.receiving_provider_id)] if aftercare.receiving_provider_id else [],
        "description": f"Follow-up: {terminology.level_of_care(level)}",
    }
    activities: list[JSON] = [{"id": "follow-up", "detail": drop_empty(follow_up)}]
    if aftercare.pharmacy_id:
        pharmacy = {
            "kind": "MedicationRequest",
            "code": concept(DISPENSING),
            "status": "scheduled",
            "performer": [ctx.pharmacy(aftercare.pharmacy_id)],
            "description": "Discharge prescriptions are filled by this pharmacy",
        }
        activities.append({"id": "pharmacy", "detail": pharmacy})
    activities.extend(
        {"reference": ctx.discharge_medication(m.prescription_id)}
        for m in aftercare.medications
    )
    resource: JSON = {
        "resourceType": "CarePlan",
        "id": ctx.ids.id("CarePlan", AFTERCARE_KIND, aftercare.id),
        "meta": {"profile": [PROFILE]},
        "text": narrative(_aftercare_narrative(ctx, discharge, aftercare)),
        "identifier": [ctx.ids.identifier(AFTERCARE_KIND, aftercare.id)],
        "replaces": [plan_reference(ctx, record.care_plan.id)] if record.care_plan else [],
        "status": "active",
        "intent": "plan",
        "category": [ASSESS_PLAN, AFTERCARE],
        "description": aftercare.instructions,
        "subject": ctx.patient,
        "period": {"start": fhir_date(discharge.date)},
        "activity": activities,
    }
    return drop_empty(resource)


# --- narrative (derived: what a person reads; never read back) ------------------------------


def _items(title: str, lines: list[str]) -> str:
    if not lines:
        return ""
    return f"<p><b>{title}</b></p><ul>" + "".join(f"<li>{xhtml_text(line)}</li>" for line in lines) + "</ul>"


def _plan_narrative(plan: CarePlan) -> str:
    period = f"{plan.period.start.isoformat()} to {plan.period.end.isoformat() if plan.period.end else 'ongoing'}"
    parts = [f"<p><b>IOP treatment plan</b> ({plan.status}), {period}</p>"]
    if plan.summary:
        parts.append(f"<p>{xhtml_text(plan.summary)}</p>")
    goals = []
    for g in plan.goals:
        line = f"{g.description} [{g.status}{', ' + g.achievement if g.achievement else ''}]"
        if g.target:
            due = f" by {g.target.due.isoformat()}" if g.target.due else ""
            line += f" target: {g.target.measure} {g.target.comparator} {g.target.value}{due}"
        goals.append(line)
    parts.append(_items("Goals", goals))
    activities = []
    for a in plan.activities:
        when = []
        if a.days_per_week:
            when.append(f"{a.days_per_week} day(s) a week")
        if a.minutes_per_session:
            when.append(f"{a.minutes_per_session} min")
        activities.append(f"{ACTIVITY_DISPLAY[a.kind]}: {a.description}" + (f" ({', '.join(when)})" if when else "") + f" [{a.status}]")
    parts.append(_items("Activities", activities))
    parts.append(_items("Relapse prevention", list(plan.relapse_prevention)))
    return "".join(parts)


def _aftercare_narrative(ctx: MappingContext, discharge: Discharge, aftercare: Aftercare) -> str:
    record = ctx.record
    lines = [f"Next level of care: {terminology.level_of_care(aftercare.next_level_of_care)}"]
    if aftercare.receiving_provider_id:
        provider = next(p for p in record.providers if p.id == aftercare.receiving_provider_id)
        lines.append(f"Receiving provider: {provider.name}")
    if aftercare.first_follow_up:
        lines.append(f"First follow-up: {aftercare.first_follow_up.isoformat()}")
    if aftercare.pharmacy_id:
        pharmacy = next(p for p in record.pharmacies if p.id == aftercare.pharmacy_id)
        lines.append(f"Pharmacy: {pharmacy.name}")
    if aftercare.instructions:
        lines.append(f"Instructions: {aftercare.instructions}")
    medications = []
    for m in aftercare.medications:
        prescription = ctx.prescriptions.get(m.prescription_id)
        name = prescription.medication.display if prescription else m.prescription_id
        medications.append(f"{name}: {m.disposition}" + (f" ({m.note})" if m.note else ""))
    head = f"<p><b>Aftercare plan</b> from discharge on {discharge.date.isoformat()}</p>"
    return head + _items("Plan", lines) + _items("Discharge medications", medications)


# --- back -----------------------------------------------------------------------------------


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Set ``draft["care_plan"]`` and merge ``draft["discharge"]["aftercare"]`` (medications aside)."""
    plans = index.of_type("CarePlan")
    kinds = [_plan_kind(resource) for resource in plans]
    treatment = [r for r, k in zip(plans, kinds) if k == "treatment"]
    aftercare = [r for r, k in zip(plans, kinds) if k == "aftercare"]
    # A foreign plan with no kind of ours is taken as the treatment plan if there is none.
    treatment = treatment or [r for r, k in zip(plans, kinds) if k is None]
    chosen = treatment[:1] + aftercare[:1]
    for resource in plans:
        if not any(resource is c for c in chosen):
            report.warning(where(resource), "a record holds one treatment plan and one aftercare plan; this CarePlan is not carried")
    goals_used: set[int] = set()
    for plan in read_each(treatment[:1], lambda r: _read_plan(index, r, goals_used, report), report):
        draft["care_plan"] = plan
    for values in read_each(aftercare[:1], lambda r: _read_aftercare(index, r, report), report):
        # medication_request.py adds aftercare.medications, episode.py the discharge itself: merge.
        draft.setdefault("discharge", {}).setdefault("aftercare", {}).update(values)
    for goal in index.of_type("Goal"):
        if id(goal) not in goals_used:
            report.warning(where(goal), "Goal not listed by the treatment plan; not carried")


def _plan_kind(resource: JSON) -> str | None:
    """treatment / aftercare by our identifier, else by our category; None for a foreign plan."""
    kind = identifier_kind(resource, (AFTERCARE_KIND, KIND))
    if kind:
        return "aftercare" if kind == AFTERCARE_KIND else "treatment"
    code = code_in_any(resource.get("category"), PLAN_KIND, among=("iop-treatment", "aftercare"))
    if code is None:
        return None
    return "treatment" if code == "iop-treatment" else "aftercare"


def _read_plan(index: ResourceIndex, resource: JSON, goals_used: set[int], report: MappingReport) -> JSON | None:
    here = where(resource)
    if unknown_modifiers(resource, report):
        return None
    plan_id = local_id(resource, KIND, report)
    status = resource.get("status")
    period = as_dict(resource.get("period"))
    start, created = parse_date(period.get("start")), parse_date(resource.get("created"))
    if start is None and created is not None:
        report.warning(f"{here}.period.start", "no period start; the created date stands in")
        start = created
    if created is None and start is not None:
        report.warning(f"{here}.created", "no created date; the period start stands in")
        created = start
    needs = (
        ("an identifier or usable id", plan_id),
        (f"a plan status (got {status!r})", status in PLAN_STATUSES),
        ("a start or created date", start),
    )
    missing = [what for what, ok in needs if not ok]
    if missing:
        report.error(here, "treatment plan cannot be built; it lacks " + ", ".join(missing), code="required")
        return None
    plan: JSON = {"id": plan_id, "status": status, "created": created.isoformat(), "period": {"start": start.isoformat()}}
    end = parse_date(period.get("end"))
    if end:
        plan["period"]["end"] = end.isoformat()
    goals, goal_by_resource = _read_goals(index, resource, goals_used, report)
    parts = {
        "addresses_ids": _conditions(index, resource, report),
        "goals": goals,
        "activities": _read_activities(index, resource, goal_by_resource, report),
        "relapse_prevention": _relapse_notes(resource, report),
        "summary": nonempty(resource.get("description")),
        "author_id": _author(index, resource, report),
    }
    plan.update(drop_empty(parts))
    own_extensions(resource, report, here)
    return settle(CarePlan, plan, report, here)


def _author(index: ResourceIndex, resource: JSON, report: MappingReport) -> str | None:
    if not resource.get("author"):
        return None
    author = practitioner_id(index, resource["author"], resource)
    if author is None:
        report.warning(where(resource, "author"), "the author is not one of the program's Practitioners in the bundle; not carried")
    return author


def _conditions(index: ResourceIndex, resource: JSON, report: MappingReport) -> list[str]:
    out: list[str] = []
    for i, ref in enumerate(as_list(resource.get("addresses"))):
        diagnosis = referenced_id(index, ref, resource, ("Condition",), "diagnosis")
        if diagnosis is None:
            report.warning(where(resource, f"addresses[{i}]"), "not a Condition in the bundle; the link is not carried")
        elif diagnosis not in out:
            out.append(diagnosis)
    return out


def _relapse_notes(resource: JSON, report: MappingReport) -> list[str]:
    out: list[str] = []
    for i, note in enumerate(as_list(resource.get("note"))):
        topic = as_dict(own_extensions(note).get("note-topic")).get("valueCode")
        text = as_dict(note).get("text")
        if topic == "relapse-prevention" and nonempty(text):
            out.append(text)
        else:
            report.warning(where(resource, f"note[{i}]"), "a note other than a relapse-prevention item has no place in the record")
    return out


# --- goals back -----------------------------------------------------------------------------


@cache
def _instrument_by_total() -> dict[str, str]:
    return {spec["total"]["code"]: name for name, spec in terminology.tables()["instruments"].items() if spec["total"]}


def _read_goals(index: ResourceIndex, plan: JSON, goals_used: set[int], report: MappingReport) -> tuple[list[JSON], dict[int, str]]:
    """The plan's goals in order, and goal id by Goal resource (object identity, for activity links)."""
    goals: list[JSON] = []
    by_resource: dict[int, str] = {}
    for i, ref in enumerate(as_list(plan.get("goal"))):
        target = index.resolve(reference_text(ref), plan)
        if not isinstance(target, dict) or target.get("resourceType") != "Goal":
            report.warning(where(plan, f"goal[{i}]"), "not a Goal in the bundle; not carried")
            continue
        goals_used.add(id(target))
        goal = _read_goal(index, target, report)
        if goal is None:
            continue
        if goal["id"] in by_resource.values():
            report.warning(where(plan, f"goal[{i}]"), f"goal id {goal['id']!r} listed twice; the repeat is dropped")
            continue
        by_resource[id(target)] = goal["id"]
        goals.append(goal)
    return goals, by_resource


def _read_goal(index: ResourceIndex, resource: JSON, report: MappingReport) -> JSON | None:
    here = where(resource)
    if unknown_modifiers(resource, report):
        return None
    goal_id = local_id(resource, GOAL_KIND, report)
    description = concept_text(resource.get("description"))
    status = resource.get("lifecycleStatus")
    if status in GOAL_STATUS_NEAREST:
        report.info(f"{here}.lifecycleStatus", f"{status!r} recorded as {GOAL_STATUS_NEAREST[status]!r}")
        status = GOAL_STATUS_NEAREST[status]
    if not goal_id or not description or status not in GOAL_STATUSES:
        why = f"goal cannot be built: it needs an id, a description and a lifecycle status the record knows (got {status!r})"
        report.error(here, why, code="required")
        return None
    goal: JSON = {"id": goal_id, "description": description, "status": status}
    parts = {
        "achievement": _achievement(resource, report),
        "target": _read_target(resource, report),
        "addresses_ids": _conditions(index, resource, report),
    }
    goal.update(drop_empty(parts))
    own_extensions(resource, report, here)
    return settle(Goal, goal, report, here)


def _achievement(resource: JSON, report: MappingReport) -> str | None:
    for c in codings_of(resource.get("achievementStatus")):
        code = c.get("code")
        if code in ACHIEVEMENT_DISPLAY:
            return code
        if code in ACHIEVEMENT_NEAREST:
            report.info(where(resource, "achievementStatus"), f"{code!r} recorded as {ACHIEVEMENT_NEAREST[code]!r}")
            return ACHIEVEMENT_NEAREST[code]
    if resource.get("achievementStatus"):
        report.warning(where(resource, "achievementStatus"), "no goal-achievement code the record knows; not carried")
    return None


def _read_target(resource: JSON, report: MappingReport) -> JSON | None:
    targets = as_list(resource.get("target"))
    for i, target in enumerate(targets):
        target = as_dict(target)
        measure = _measure(target.get("measure"))
        quantity = as_dict(target.get("detailQuantity"))
        value, comparator = whole_number(quantity.get("value")), quantity.get("comparator")
        if measure is None or comparator not in COMPARATORS or value is None:
            continue
        if len(targets) > 1:
            report.warning(where(resource, "target"), f"{len(targets)} targets; the record holds one (target[{i}])")
        out: JSON = {"measure": measure, "comparator": comparator, "value": value}
        due = parse_date(target.get("dueDate"))
        if due:
            out["due"] = due.isoformat()
        return out
    if targets:
        report.warning(where(resource, "target"), "no target is an instrument score with a comparator (<, <=, >=, >); not carried")
    return None


def _measure(value: Any) -> str | None:
    instruments = terminology.tables()["instruments"]
    for c in codings_of(value):
        if c.get("system") == terminology.LOINC and c.get("code") in _instrument_by_total():
            return _instrument_by_total()[c["code"]]
        if c.get("system") == INSTRUMENT and c.get("code") in instruments:
            return c["code"]
    return None


# --- activities back ------------------------------------------------------------------------


def _read_activities(index: ResourceIndex, plan: JSON, goal_by_resource: dict[int, str], report: MappingReport) -> list[JSON]:
    out: list[JSON] = []
    for i, activity in enumerate(as_list(plan.get("activity"))):
        read = _read_activity(index, plan, as_dict(activity), i, goal_by_resource, report)
        if read is None:
            continue
        if any(a["id"] == read["id"] for a in out):
            report.warning(where(plan, f"activity[{i}]"), f"activity id {read['id']!r} used twice; the repeat is dropped")
            continue
        out.append(read)
    return out


def _read_activity(
    index: ResourceIndex, plan: JSON, activity: JSON, i: int, goal_by_resource: dict[int, str], report: MappingReport
) -> JSON | None:
    here = where(plan, f"activity[{i}]")
    detail = as_dict(activity.get("detail"))
    if not detail:
        report.warning(here, "an activity without detail (a reference to a request) has no place in the treatment plan")
        return None
    kind = _activity_kind(detail.get("code"))
    if kind is None:
        report.warning(f"{here}.detail.code", "no code of an IOP activity kind; activity not carried")
        return None
    description = nonempty(detail.get("description"))
    if not description:
        description = concept_text(detail.get("code"))
        if description is None:
            report.error(f"{here}.detail.description", "no description: activity skipped", code="required")
            return None
        report.info(f"{here}.detail.description", "no description; the code's text stands in")
    activity_id = activity.get("id")
    if not (isinstance(activity_id, str) and LOCAL_ID.match(activity_id)):
        activity_id = f"activity-{i + 1}"
        report.info(f"{here}.id", f"no usable element id; {activity_id!r} stands in")
    status = detail.get("status")
    if status not in ACTIVITY_STATUSES:
        report.warning(f"{here}.detail.status", f"status {status!r} is not one the record knows; 'scheduled' recorded")
        status = "scheduled"
    out: JSON = {"id": activity_id, "kind": kind, "description": description, "status": status}
    out.update(_schedule(detail, here, report))
    goal_ids: list[str] = []
    for j, ref in enumerate(as_list(detail.get("goal"))):
        target = index.resolve(reference_text(ref), plan)
        goal_id = goal_by_resource.get(id(target)) if target is not None else None
        if goal_id is None:
            report.warning(f"{here}.detail.goal[{j}]", "not a goal of this plan; the link is not carried")
        elif goal_id not in goal_ids:
            goal_ids.append(goal_id)
    if goal_ids:
        out["goal_ids"] = goal_ids
    return out


def _activity_kind(code: Any) -> str | None:
    kind = code_in(code, ACTIVITY, among=ACTIVITY_DISPLAY) or session_kind(code)
    if kind:
        return kind
    relapse = set(RELAPSE_PREVENTION.values())
    panels = {p["code"] for p in terminology.tables()["drug_screen_panels"].values()}
    for c in codings_of(code):
        if c.get("system") == terminology.SNOMED and c.get("code") in relapse:
            return "relapse-prevention"
        if c.get("system") == terminology.LOINC and c.get("code") in panels:
            return "drug-screening"
    return None


def _schedule(detail: JSON, here: str, report: MappingReport) -> JSON:
    """days_per_week and minutes_per_session from scheduledTiming.repeat, where it says them."""
    repeat = as_dict(as_dict(detail.get("scheduledTiming")).get("repeat"))
    out: JSON = {}
    frequency, period, unit = whole_number(repeat.get("frequency")), repeat.get("period", 1), repeat.get("periodUnit")
    if "frequency" in repeat or unit is not None:
        days = None
        if unit == "wk" and period == 1:
            days = frequency
        elif (unit, period, frequency) == ("d", 1, 1):
            days = 7  # daily
        if days is not None and 1 <= days <= 7:
            out["days_per_week"] = days
        else:
            report.warning(f"{here}.detail.scheduledTiming", "the repeat is not a number of days a week; not carried")
    if "duration" in repeat:
        duration = repeat.get("duration")
        per_unit = {"min": 1, "h": 60}.get(repeat.get("durationUnit"))
        minutes = None
        if per_unit and finite_number(duration) is not None:
            minutes = whole_number(duration * per_unit)
        if minutes is not None and 1 <= minutes <= 600:
            out["minutes_per_session"] = minutes
        else:
            report.warning(f"{here}.detail.scheduledTiming", "the duration is not 1-600 whole minutes; not carried")
    return out


# --- aftercare back -------------------------------------------------------------------------


def _read_aftercare(index: ResourceIndex, resource: JSON, report: MappingReport) -> JSON | None:
    here = where(resource)
    if unknown_modifiers(resource, report):
        return None
    plan_id = local_id(resource, AFTERCARE_KIND, report)
    out: JSON = {}
    for i, activity in enumerate(as_list(resource.get("activity"))):
        activity = as_dict(activity)
        detail = as_dict(activity.get("detail"))
        level = code_in(detail.get("code"), LEVEL_OF_CARE, among=NEXT_LEVELS)
        if level and "next_level_of_care" not in out:
            out.update(_follow_up(index, resource, detail, level, f"{here}.activity[{i}]", report))
        elif code_in(detail.get("code"), ACTIVITY, among=(DISPENSING["code"],)):
            performers = as_list(detail.get("performer"))
            pharmacy = referenced_id(index, performers[0], resource, ("Organization",), "pharmacy", shared=True) if performers else None
            if pharmacy:
                out["pharmacy_id"] = pharmacy
            else:
                report.warning(f"{here}.activity[{i}]", "the dispensing pharmacy is not an Organization in the bundle; not carried")
        elif detail or not activity.get("reference"):
            # Bare references are the discharge MedicationRequests: medication_request.py reads those.
            report.warning(f"{here}.activity[{i}]", "activity is neither the follow-up nor the pharmacy; not carried")
    if plan_id is None or "next_level_of_care" not in out:
        lacking = "an identifier or usable id" if plan_id is None else "a follow-up activity coded with a level of care"
        report.error(here, f"aftercare plan cannot be built: it lacks {lacking}", code="required")
        return None
    out["id"] = plan_id
    instructions = nonempty(resource.get("description"))
    if instructions:
        out["instructions"] = instructions
    own_extensions(resource, report, here)
    return settle(Aftercare, out, report, here)


def _follow_up(index: ResourceIndex, plan: JSON, detail: JSON, level: str, here: str, report: MappingReport) -> JSON:
    out: JSON = {"next_level_of_care": level}
    first = parse_date(as_dict(detail.get("scheduledPeriod")).get("start"))
    if first:
        out["first_follow_up"] = first.isoformat()
    performers = as_list(detail.get("performer"))
    if performers:
        provider = referenced_id(index, performers[0], plan, ("Organization", "Practitioner"), "provider", shared=True)
        if provider:
            out["receiving_provider_id"] = provider
        else:
            report.warning(f"{here}.detail.performer", "the receiving provider is not in the bundle; not carried")
    return out
