"""Sessions <-> FHIR Encounter (US Core Encounter).

One Encounter per session, attended or not: a missed session is part of the clinical picture
(attendance is what an IOP is judged on). R4 ``Encounter.status`` has no "no-show" (only the
Appointment resource has ``noshow``), so a no-show and a cancellation are both ``cancelled``
and the project's ``session-attendance`` extension tells them apart.

| contract field        | FHIR Encounter                                                             |
|-----------------------|----------------------------------------------------------------------------|
| sessions[].id         | identifier[0] (kind ``session``) and ``id``                                |
| start                 | period.start                                                               |
| kind                  | type (SNOMED CT + CPT codings from the ``session_kinds`` table)            |
| attendance            | extension ``session-attendance`` (valueCode); status finished / cancelled  |
| minutes               | length (Duration, UCUM ``min``; 0 allowed)                                 |
| telehealth            | class v3-ActCode ``VR`` (virtual), else ``AMB`` (ambulatory)               |
| clinician_id          | participant[0].individual (Practitioner), type PPRF                        |
| derived (not read)    | period.end (start + minutes, attended only), subject, episodeOfCare,       |
|                       | serviceProvider                                                            |

Back, foreign Encounters become sessions when their type carries a code of the table (an
Encounter of another kind is reported and skipped); attendance falls back to the status and
minutes to the period.
"""

from __future__ import annotations

import datetime as dt
from functools import cache
from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers.context import MappingContext, ResourceIndex, local_id, practitioner_id
from iop_fhir.mappers.datatypes import (
    as_dict,
    as_list,
    choices,
    code_keys,
    codings_of,
    coding,
    concept,
    drop_empty,
    extension,
    fhir_datetime,
    finite_number,
    own_extensions,
    parse_datetime,
    read_each,
    settle,
    table_coding,
    ucum_quantity,
    unknown_modifiers,
    where,
)
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import Session

JSON = dict[str, Any]

KIND = "session"
PROFILE = terminology.us_core("us-core-encounter")
AMBULATORY = coding(terminology.V3_ACT_CODE, "AMB", "ambulatory")
VIRTUAL = coding(terminology.V3_ACT_CODE, "VR", "virtual")
PRIMARY_PERFORMER = concept(coding(terminology.V3_PARTICIPATION_TYPE, "PPRF", "primary performer"))
ATTENDANCE = choices(Session, "attendance")
MAX_MINUTES = 600
# Durations a foreign system may use, in minutes per unit.
MINUTES_PER = {"min": 1, "minutes": 1, "h": 60, "hours": 60}


def session_codings(kind: str) -> list[JSON]:
    """SNOMED CT (and CPT where listed) codings of a session kind: fresh dicts, the table stays untouched."""
    return [table_coding(c) for c in terminology.tables()["session_kinds"][kind]]


# --- forward --------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """One Encounter per session, in record order."""
    return [_encounter(ctx, s) for s in ctx.record.sessions]


def _encounter(ctx: MappingContext, session: Session) -> JSON:
    attended = session.attendance == "attended"
    period: JSON = {"start": fhir_datetime(session.start)}
    if attended and session.minutes > 0:
        period["end"] = fhir_datetime(session.start + dt.timedelta(minutes=session.minutes))
    participant = None
    if session.clinician_id:
        participant = [{"type": [PRIMARY_PERFORMER], "individual": ctx.practitioner(session.clinician_id)}]
    resource: JSON = {
        "resourceType": "Encounter",
        "id": ctx.ids.id("Encounter", KIND, session.id),
        "meta": {"profile": [PROFILE]},
        # R4 Encounter.status cannot say "no-show"; the extension keeps the attendance exact.
        "extension": [extension("session-attendance", valueCode=session.attendance)],
        "identifier": [ctx.ids.identifier(KIND, session.id)],
        "status": "finished" if attended else "cancelled",
        "class": VIRTUAL if session.telehealth else AMBULATORY,
        "type": [concept(*session_codings(session.kind))],
        "subject": ctx.patient,
        "episodeOfCare": [ctx.episode],
        "participant": participant,
        "period": period,
        "length": ucum_quantity(session.minutes, "min", "minutes"),
        "serviceProvider": ctx.organization,
    }
    return drop_empty(resource)


# --- back -----------------------------------------------------------------------------------


@cache
def _kind_by_code() -> dict[tuple[str, str], str]:
    """(system, code) -> session kind, from the session_kinds table."""
    return {
        (c["system"], c["code"]): kind
        for kind, codings in terminology.tables()["session_kinds"].items()
        for c in codings
    }


def session_kind(value: Any) -> str | None:
    """The session kind a CodeableConcept names by any code of the session_kinds table."""
    table = _kind_by_code()
    return next((table[key] for key in code_keys(value) if key in table), None)


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Append a session to ``draft["sessions"]`` for each Encounter that is one."""
    sessions = read_each(index.of_type("Encounter"), lambda r: _session(index, r, report), report)
    if sessions:
        draft.setdefault("sessions", []).extend(sessions)


def _session(index: ResourceIndex, resource: JSON, report: MappingReport) -> JSON | None:
    here = where(resource)
    if unknown_modifiers(resource, report):
        return None
    kind = next((k for k in map(session_kind, as_list(resource.get("type"))) if k), None)
    if kind is None:
        report.warning(f"{here}.type", "no session kind (SNOMED CT/CPT code of an IOP session) in the type; not a session")
        return None
    period = as_dict(resource.get("period"))
    start = parse_datetime(period.get("start"))
    if start is None:
        report.error(f"{here}.period.start", "no start date and time with an offset: session skipped", code="required")
        return None
    extensions = own_extensions(resource, report, here)
    attendance = _attendance(resource, extensions, here, report)
    if attendance is None:
        return None
    minutes = _minutes(resource, start, attendance, here, report)
    if minutes is None:
        return None
    session_id = local_id(resource, KIND, report)
    if session_id is None:
        report.error(f"{here}.identifier", "no session identifier or usable id: session skipped", code="required")
        return None
    session: JSON = {"id": session_id, "start": fhir_datetime(start), "kind": kind, "attendance": attendance, "minutes": minutes}
    if as_dict(resource.get("class")).get("code") == "VR":
        session["telehealth"] = True
    clinician = _clinician(index, resource, here, report)
    if clinician:
        session["clinician_id"] = clinician
    return settle(Session, session, report, here)


def _attendance(resource: JSON, extensions: dict[str, JSON], here: str, report: MappingReport) -> str | None:
    status = resource.get("status")
    coded = as_dict(extensions.get("session-attendance")).get("valueCode")
    if coded in ATTENDANCE:
        return coded
    if status == "finished":
        return "attended"
    if status == "cancelled":
        return "cancelled"
    if status in ("arrived", "triaged", "in-progress", "onleave"):
        report.warning(f"{here}.status", f"status {status!r}: the session is taken as attended, though it had not finished")
        return "attended"
    report.warning(f"{here}.status", f"status {status!r} says nothing of attendance; not a session the record can hold")
    return None


def _minutes(resource: JSON, start: dt.datetime, attendance: str, here: str, report: MappingReport) -> int | None:
    length = as_dict(resource.get("length"))
    per_unit = MINUTES_PER.get(length.get("code") or length.get("unit"))
    value = length.get("value")
    minutes: Any = None
    if per_unit and finite_number(value) is not None:
        minutes = value * per_unit
    else:
        end = parse_datetime(as_dict(resource.get("period")).get("end"))
        if end is not None:
            minutes = (end - start).total_seconds() / 60
    if minutes is None:
        if attendance == "attended":
            report.warning(f"{here}.length", "attended, but neither length nor period.end gives the minutes; 0 recorded")
        return 0
    if minutes != int(minutes):
        report.info(f"{here}.length", f"{minutes} minutes rounded to whole minutes")
    minutes = round(minutes)
    if not 0 <= minutes <= MAX_MINUTES:
        report.error(f"{here}.length", f"{minutes} minutes is outside 0-{MAX_MINUTES}: session skipped")
        return None
    return minutes


def _clinician(index: ResourceIndex, resource: JSON, here: str, report: MappingReport) -> str | None:
    participants = [as_dict(p) for p in as_list(resource.get("participant"))]
    # The primary performer first, then anyone else who is one of the program's staff.
    participants.sort(key=lambda p: not any(_is_primary(t) for t in as_list(p.get("type"))))
    for participant in participants:
        member = practitioner_id(index, participant.get("individual"), resource)
        if member:
            return member
    if participants:
        report.warning(f"{here}.participant", "no participant is a Practitioner in the bundle; the clinician is not carried")
    return None


def _is_primary(value: Any) -> bool:
    return any(c.get("code") == "PPRF" for c in codings_of(value))
