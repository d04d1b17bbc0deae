"""The enrolment and the discharge <-> FHIR EpisodeOfCare.

One EpisodeOfCare per record: the client's stay in the program, from enrolment to discharge.
R4 EpisodeOfCare has no element for the planned schedule, the planned end, a free-text
referral source or how the client left, so those travel in the project's extensions; every
other field sits in a core element. There is no US Core EpisodeOfCare profile.

| contract field                  | FHIR EpisodeOfCare                                                    |
|---------------------------------|-----------------------------------------------------------------------|
| id                              | identifier[0] (kind ``episode``, program-wide) and ``id``             |
| enrolment.status                | status (same codes)                                                   |
| enrolment.start / actual_end    | period.start / period.end                                             |
| enrolment.planned_end           | extension ``planned-end`` (valueDate)                                 |
| enrolment.schedule              | extension ``program-schedule``: ``daysPerWeek`` (valueInteger),       |
|                                 | ``hoursPerDay`` (valueQuantity, UCUM ``h``), ``weeks`` (valueInteger) |
| enrolment.modality              | type[] coding ``CodeSystem/modality``                                 |
| enrolment.referral_source       | extension ``referral-source`` (valueString)                           |
| discharge.date                  | period.end (the contract makes it equal to actual_end)                |
| discharge.disposition           | extension ``discharge-disposition`` (valueCodeableConcept); its       |
|                                 | presence is what says the client was discharged                       |
| discharge.summary               | extension ``discharge-summary`` (valueString)                         |
| derived (not read back)         | type[] HCPCS program service (S9480 / H0015 / H0035), diagnosis[]     |
|                                 | (Conditions, role AD rank 1 for the primary, CM for the others),      |
|                                 | patient, managingOrganization, careManager (the case manager), team   |

``discharge.aftercare`` is not here: care_plan.py and medication_request.py fill it, and every
module merges into ``draft["discharge"]`` instead of replacing it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers.context import MappingContext, ResourceIndex, identifier_kind, local_id
from iop_fhir.mappers.datatypes import (
    as_dict,
    as_list,
    choices,
    code_in,
    code_in_any,
    coding,
    concept,
    drop_empty,
    extension,
    fhir_date,
    number,
    own_extensions,
    parse_date,
    read_each,
    settle,
    table_coding,
    to_decimal,
    ucum_quantity,
    unknown_modifiers,
    where,
)
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import Discharge, Enrolment, IopRecord

JSON = dict[str, Any]

KIND = "episode"
MODALITY = terminology.code_system("modality")
DISCHARGE_DISPOSITION = terminology.code_system("discharge-disposition")

MODALITY_DISPLAY = {
    "in-person": "In person",
    "telehealth": "Telehealth",
    "hybrid": "Hybrid (in person and telehealth)",
}
DISPOSITION_DISPLAY = {
    "completed": "Completed the program",
    "stepped-down": "Stepped down to a lower level of care",
    "stepped-up-php": "Stepped up to partial hospitalization",
    "stepped-up-inpatient": "Stepped up to inpatient care",
    "left-against-advice": "Left against clinical advice",
    "administrative": "Administrative discharge",
}
ENROLMENT_STATUSES = choices(Enrolment, "status")  # the same codes as EpisodeOfCare.status
# diagnosis-role: the primary diagnosis is why the client was admitted; the others are comorbid.
ROLE_PRIMARY = ("AD", "Admission diagnosis")
ROLE_SECONDARY = ("CM", "Comorbidity diagnosis")
SCHEDULE_PARTS = ("daysPerWeek", "hoursPerDay", "weeks")


# --- forward --------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """The record's one EpisodeOfCare."""
    record = ctx.record
    enrolment = record.enrolment
    end = enrolment.actual_end
    resource: JSON = {
        "resourceType": "EpisodeOfCare",
        "id": ctx.ids.id("EpisodeOfCare", KIND, record.id, shared=True),
        "extension": _extensions(record),
        "identifier": [ctx.ids.identifier(KIND, record.id, shared=True)],
        "status": enrolment.status,
        "type": _types(record),
        "diagnosis": _diagnoses(ctx),
        "patient": ctx.patient,
        "managingOrganization": ctx.organization,
        "period": drop_empty({"start": fhir_date(enrolment.start), "end": fhir_date(end) if end else None}),
        "careManager": _case_manager(ctx),
        "team": [ctx.care_team] if record.care_team else [],
    }
    return [drop_empty(resource)]


def program_service(record: IopRecord) -> JSON | None:
    """HCPCS per-diem code of the program: PHP, or IOP for mental health vs substance use; OP has none."""
    services = terminology.tables()["program_services"]
    level = record.program.level_of_care
    if level == "PHP":
        return services["PHP"]
    if level == "OP":
        return None
    return services["IOP-mental-health" if record.program.focus == "mental-health" else "IOP-substance-use"]


def _types(record: IopRecord) -> list[JSON]:
    service = program_service(record)
    modality = record.enrolment.modality
    types = [concept(table_coding(service))] if service else []
    types.append(concept(coding(MODALITY, modality, MODALITY_DISPLAY[modality])))
    return types


def _extensions(record: IopRecord) -> list[JSON]:
    enrolment, discharge = record.enrolment, record.discharge
    schedule = enrolment.schedule
    out = [
        # R4 has no element for the planned timetable of an episode.
        extension(
            "program-schedule",
            extension=[
                {"url": "daysPerWeek", "valueInteger": schedule.days_per_week},
                {"url": "hoursPerDay", "valueQuantity": ucum_quantity(schedule.hours_per_day, "h", "hours")},
                {"url": "weeks", "valueInteger": schedule.weeks},
            ],
        )
    ]
    if enrolment.planned_end:
        out.append(extension("planned-end", valueDate=fhir_date(enrolment.planned_end)))
    if enrolment.referral_source:
        # referralRequest wants a ServiceRequest; the contract has only the source's name.
        out.append(extension("referral-source", valueString=enrolment.referral_source))
    if discharge:
        display = DISPOSITION_DISPLAY[discharge.disposition]
        out.append(
            extension(
                "discharge-disposition",
                valueCodeableConcept=concept(coding(DISCHARGE_DISPOSITION, discharge.disposition, display)),
            )
        )
        if discharge.summary:
            out.append(extension("discharge-summary", valueString=discharge.summary))
    return out


def _diagnoses(ctx: MappingContext) -> list[JSON]:
    out = []
    for diagnosis in ctx.record.diagnoses:
        primary = diagnosis.rank == "primary"
        code, display = ROLE_PRIMARY if primary else ROLE_SECONDARY
        entry = {
            "condition": ctx.condition(diagnosis.id),
            "role": concept(coding(terminology.DIAGNOSIS_ROLE, code, display)),
        }
        if primary:
            entry["rank"] = 1
        out.append(entry)
    return out


def _case_manager(ctx: MappingContext) -> JSON | None:
    member = next((m for m in ctx.record.care_team if m.role == "case-manager"), None)
    return ctx.practitioner(member.id) if member else None


# --- back -----------------------------------------------------------------------------------


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Set ``draft["id"]``, ``draft["enrolment"]`` and the discharge's date/disposition/summary."""
    episodes = index.of_type("EpisodeOfCare")
    if not episodes:
        report.error("EpisodeOfCare", "no EpisodeOfCare: the record's id and enrolment cannot be built", code="required")
        return
    chosen = next((r for r in episodes if identifier_kind(r, (KIND,))), episodes[0])
    for other in episodes:
        if other is not chosen:
            report.warning(where(other), "a record holds one episode of care; this one is not carried")
    for found in read_each([chosen], lambda r: _read_episode(r, report), report):
        draft.update({k: v for k, v in found.items() if k != "discharge"})
        if "discharge" in found:
            # Other modules add discharge.aftercare (and its medications): merge, never replace.
            draft.setdefault("discharge", {}).update(found["discharge"])


def _read_episode(resource: JSON, report: MappingReport) -> JSON:
    """What the episode gives the record: ``id``, ``enrolment``, ``discharge`` (each if it can)."""
    here = where(resource)
    if unknown_modifiers(resource, report):
        return {}
    out: JSON = {}
    episode_id = local_id(resource, KIND, report, shared=True)
    if episode_id:
        out["id"] = episode_id
    else:
        report.error(f"{here}.identifier", "no episode identifier or usable id: the record id cannot be set", code="required")
    extensions = own_extensions(resource, report, here)
    period = as_dict(resource.get("period"))
    actual_end = parse_date(period.get("end"))
    enrolment = _enrolment(resource, extensions, period, actual_end, report)
    if enrolment is not None:
        out["enrolment"] = enrolment
    discharge = _discharge(resource, extensions, actual_end, report)
    if discharge is not None:
        out["discharge"] = discharge
    if resource.get("referralRequest"):
        report.warning(f"{here}.referralRequest", "a referral request has no place in the record; only referral-source text has")
    return out


def _enrolment(resource: JSON, extensions: dict[str, JSON], period: JSON, actual_end: Any, report: MappingReport) -> JSON | None:
    missing: list[str] = []
    status = resource.get("status")
    if status not in ENROLMENT_STATUSES:
        missing.append(f"status {status!r} has no enrolment status" if status else "status")
    start = parse_date(period.get("start"))
    if start is None:
        missing.append("period.start")
    schedule = _schedule(extensions.get("program-schedule"))
    if schedule is None:
        missing.append("the program schedule (extension program-schedule)")
    modality = code_in_any(resource.get("type"), MODALITY, among=MODALITY_DISPLAY)
    if modality is None:
        missing.append("the modality (type coding of CodeSystem/modality)")
    if missing:
        report.error(where(resource), "enrolment cannot be built; missing: " + "; ".join(missing), code="required")
        return None
    enrolment: JSON = {"status": status, "start": start.isoformat(), "schedule": schedule, "modality": modality}
    planned_end = parse_date(as_dict(extensions.get("planned-end")).get("valueDate"))
    if actual_end and status not in ("finished", "cancelled"):
        # Other systems put the expected end of an open episode in period.end.
        if planned_end is None:
            report.info(where(resource, "period.end"), f"the end of a {status} episode is taken as its planned end")
            planned_end = actual_end
        else:
            report.warning(where(resource, "period.end"), f"a {status} episode has no actual end; period.end not carried")
        actual_end = None
    if planned_end:
        enrolment["planned_end"] = planned_end.isoformat()
    if actual_end:
        enrolment["actual_end"] = actual_end.isoformat()
    referral = as_dict(extensions.get("referral-source")).get("valueString")
    if isinstance(referral, str) and referral:
        enrolment["referral_source"] = referral
    return settle(Enrolment, enrolment, report, where(resource))


def _schedule(ext: JSON | None) -> JSON | None:
    parts = {as_dict(e).get("url"): as_dict(e) for e in as_list(as_dict(ext).get("extension"))}
    if not all(name in parts for name in SCHEDULE_PARTS):
        return None
    days, weeks = parts["daysPerWeek"].get("valueInteger"), parts["weeks"].get("valueInteger")
    hours_part = parts["hoursPerDay"]
    quantity = as_dict(hours_part.get("valueQuantity"))
    hours: Decimal | None = None
    if quantity.get("code", "h") == "h":
        hours = to_decimal(quantity.get("value"))
    if hours is None:
        hours = to_decimal(hours_part.get("valueDecimal"))
    if not (isinstance(days, int) and isinstance(weeks, int)) or hours is None:
        return None
    return {"days_per_week": days, "hours_per_day": number(hours), "weeks": weeks}


def _discharge(resource: JSON, extensions: dict[str, JSON], actual_end: Any, report: MappingReport) -> JSON | None:
    disposition_ext = extensions.get("discharge-disposition")
    if disposition_ext is None:
        return None
    disposition = code_in(disposition_ext.get("valueCodeableConcept"), DISCHARGE_DISPOSITION, among=DISPOSITION_DISPLAY)
    date = actual_end
    if disposition is None or date is None:
        lacking = "a known disposition code" if disposition is None else "a date (period.end)"
        report.error(where(resource, "extension"), f"discharge cannot be built: it lacks {lacking}", code="required")
        return None
    out: JSON = {"date": date.isoformat(), "disposition": disposition}
    summary = as_dict(extensions.get("discharge-summary")).get("valueString")
    if isinstance(summary, str) and summary:
        out["summary"] = summary
    return settle(Discharge, out, report, where(resource, "extension"))
