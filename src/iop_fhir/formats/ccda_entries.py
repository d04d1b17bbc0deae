"""C-CDA entries -> FHIR R4 resources: one reader per template, chosen from a table.

:data:`TEMPLATES` maps a ``templateId/@root`` (the extension is only a version hint) to the
template's name and its reader; a row without a reader names a template we recognise but do not
map, and why. An entry whose templates are all unknown, or known and unmapped, is reported at its
XPath-like location, never dropped in silence; so is every ``entryRelationship``/``component``
a reader did not use (:func:`report_rest`).

Attribution. What an ``entryRelationship`` holds belongs to the statement that holds it: an
Indication becomes the reason of its Medication Activity, a Supply Order its prescription, a
Dispense a fill of that prescription, a Problem Observation the Condition its Concern Act
tracks (recorded by the act's author when it has none of its own). Authors conduct from an
enclosing entry to what it contains (a Supply Order without an author takes its activity's),
never from the document header: the header author wrote the document, not necessarily the order.
Entries about someone other than the patient (a ``subject``, e.g. family history) are skipped.

Field tables, after HL7 C-CDA on FHIR (``shared/reference/ccda.md`` §11):

Medication Activity 4.16 (and Planned Medication Activity 4.42)
    moodCode INT/RQO/... (or any mood inside a Discharge Medication) -> MedicationRequest,
    intent by :data:`MED_INTENT` (INT order, EVN plan; planned activities plan), category
    ``discharge`` inside a Discharge Medication act or section; moodCode EVN ->
    MedicationStatement. negationInd -> doNotPerform / status ``not-taken``. statusCode by
    :data:`MED_REQUEST_STATUS` / :data:`MED_STATEMENT_STATUS`. effectiveTime[1] ->
    timing.repeat.boundsPeriod or timing.event (a statement: effective[x]); PIVL_TS ->
    frequency/period/periodUnit ("n times a day" when institutionSpecified); EIVL_TS -> when +
    offset (minutes); repeatNumber -> timing.repeat.count; routeCode, approachSiteCode,
    doseQuantity (IVL_PQ: doseRange), rateQuantity, maxDoseQuantity -> Dosage; precondition ->
    asNeeded; Free Text Sig 4.147 -> dosage.text; Instruction 4.20 -> patientInstruction /
    additionalInstruction; Indication 4.19 -> reasonCode; Comment 4.64 -> note; author ->
    requester / informationSource, earliest author/time -> authoredOn / dateAsserted. The product
    code (RxNorm + translations) -> medicationCodeableConcept, or a Medication resource when a
    manufacturer, drug vehicle (ingredient, isActive false) or administrationUnitCode (form)
    comes with it. Supply Order 4.17 -> dispenseRequest (validityPeriod, quantity,
    numberOfRepeatsAllowed = repeatNumber - 1); under an EVN activity it is its own
    MedicationRequest (intent order) the statement is ``basedOn``. Dispense 4.18 ->
    MedicationDispense (status, whenHandedOver, quantity, performer, type FF/RF from
    repeatNumber, authorizingPrescription -> the request above).
Problem Concern Act 4.3 / Discharge 4.33 / Admission 4.34 Diagnosis -> one Condition per Problem
    Observation 4.4: value -> code, low/high -> onset/abatement, Problem Status 4.6 (else high,
    else the concern's statusCode) -> clinicalStatus, negationInd -> refuted, category by act.
Result Organizer 4.1 -> DiagnosticReport (LAB) + one Observation (laboratory) per Result
    Observation 4.2: value by xsi:type, interpretationCode, referenceRange (normal ranges only).
Vital Signs Organizer 4.26 -> a panel Observation with ``hasMember`` vital-sign Observations.
Assessment Scale Observation 4.69 -> Observation (survey): LOINC panel code, total as
    valueInteger, interpretation, items (Supporting Observations 4.86, nested scales) as
    ``hasMember`` Observations; an item's coded answer -> valueCodeableConcept with its INT score
    as the ``ordinalValue`` extension of the coding.
Plan of Treatment entries -> ServiceRequest (planned act/encounter/procedure/observation, intent
    by :data:`SERVICE_INTENT`), MedicationRequest (4.42), Goal (4.121), CarePlan activity detail
    (Instruction 4.20); :func:`care_plan` ties them into one CarePlan per section.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from lxml import etree

from iop_fhir.terminology import (
    CAREPLAN_CATEGORY,
    CONDITION_CATEGORY,
    CONDITION_CLINICAL,
    CONDITION_VERIFICATION,
    MEDREQ_CATEGORY,
    OBSERVATION_CATEGORY,
    V3_ACT_CODE,
)

from .ccda_types import (
    JSON,
    THO,
    Context,
    clean,
    data_absent,
    first_time,
    is_null,
    prune,
    statement,
    template_roots,
    xsi_type,
)
from .safe_xml import child_text, children, first_child, local_name

P = "2.16.840.1.113883.10.20.22.4."  # C-CDA entry template arc

# --- code tables ---------------------------------------------------------------------------

MED_INTENT = {"INT": "order", "RQO": "order", "EVN": "plan", "PRMS": "plan", "PRP": "proposal", "ARQ": "order"}
SERVICE_INTENT = {"INT": "plan", "RQO": "order", "PRMS": "plan", "PRP": "proposal", "ARQ": "proposal"}
MED_REQUEST_STATUS = {
    "active": "active", "suspended": "on-hold", "held": "on-hold", "aborted": "stopped", "completed": "completed",
    "nullified": "entered-in-error", "cancelled": "cancelled", "new": "draft",
}
MED_STATEMENT_STATUS = {
    "active": "active", "completed": "completed", "aborted": "stopped", "suspended": "on-hold", "held": "on-hold",
    "nullified": "entered-in-error", "new": "intended",
}
DISPENSE_STATUS = {
    "completed": "completed", "active": "in-progress", "aborted": "stopped", "cancelled": "cancelled",
    "suspended": "on-hold", "held": "on-hold", "nullified": "entered-in-error", "new": "preparation",
}
OBSERVATION_STATUS = {"completed": "final", "active": "preliminary", "aborted": "cancelled", "cancelled": "cancelled", "nullified": "entered-in-error"}
REPORT_STATUS = {
    "completed": "final", "active": "partial", "aborted": "cancelled", "cancelled": "cancelled",
    "nullified": "entered-in-error", "held": "registered", "suspended": "registered",
}
SERVICE_STATUS = {
    "active": "active", "completed": "completed", "aborted": "revoked", "cancelled": "revoked", "suspended": "on-hold",
    "held": "on-hold", "new": "draft", "nullified": "entered-in-error",
}
GOAL_STATUS = {
    "active": "active", "completed": "completed", "cancelled": "cancelled", "aborted": "cancelled",
    "suspended": "on-hold", "held": "on-hold", "new": "proposed", "nullified": "entered-in-error",
}
CONCERN_CLINICAL = {"active": "active", "suspended": "inactive", "aborted": "inactive", "completed": "resolved"}
# Problem Status observation values (SNOMED CT) -> Condition.clinicalStatus
PROBLEM_STATUS = {
    "55561003": "active", "73425007": "inactive", "413322009": "resolved",
    "246455001": "recurrence", "263855007": "relapse", "277022003": "remission",
}
ABSENT_REASON = {
    "UNK": "unknown", "ASKU": "asked-unknown", "NAV": "temp-unknown", "NASK": "not-asked", "MSK": "masked",
    "NA": "not-applicable", "NAN": "not-a-number",
}
# UCUM time units FHIR Timing accepts, and their length in hours.
TIME_UNITS = {"s": 1 / 3600, "min": 1 / 60, "h": 1, "d": 24, "wk": 168, "mo": None, "a": None}
OFFSET_MINUTES = {"s": Decimal(1) / 60, "min": Decimal(1), "h": Decimal(60), "d": Decimal(1440)}
WHEN = frozenset("HS WAKE C CM CD CV AC ACM ACD ACV PC PCM PCD PCV".split())
CODED = frozenset({"CD", "CE", "CV", "CO", "CS"})
ORDINAL = "http://hl7.org/fhir/StructureDefinition/ordinalValue"
DIAGNOSTIC_SERVICE = THO + "v2-0074"
US_CORE_CONDITION_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/condition-category"

OBSERVATION_CATEGORIES = {
    "laboratory": "Laboratory", "vital-signs": "Vital Signs", "survey": "Survey",
    "social-history": "Social History", "exam": "Exam",
}
CONDITION_CATEGORIES = {
    "problem-list-item": (CONDITION_CATEGORY, "Problem List Item"),
    "encounter-diagnosis": (CONDITION_CATEGORY, "Encounter Diagnosis"),
    "health-concern": (US_CORE_CONDITION_CATEGORY, "Health Concern"),
}
# CarePlan.activity.reference may name only these (R4).
PLAN_ACTIVITY_TYPES = frozenset(
    {"Appointment", "CommunicationRequest", "DeviceRequest", "MedicationRequest", "NutritionOrder", "Task", "ServiceRequest", "VisionPrescription", "RequestGroup"}
)


@dataclass
class Scope:
    """What an entry inherits from where it stands: its section, an enclosing act, authors."""

    section: str = ""  # kind of the enclosing section (ccda.SECTIONS)
    discharge: bool = False  # inside a Discharge Medication act or section
    diagnosis: str | None = None  # Condition category set by an enclosing act
    authors: tuple[etree._Element, ...] = ()  # enclosing entries, nearest last (attribution)
    details: list[JSON] | None = None  # CarePlan activity details (plan sections only)


Reader = Callable[..., list[JSON]]


@dataclass(frozen=True)
class Template:
    """One row of the template table: a name for messages, and the reader (None: not mapped)."""

    name: str
    reader: Reader | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    why: str = "outside what the gateway reads (medications, problems, results, assessments, vital signs, plans)"
    severity: str = "warning"


def read_entry(ctx: Context, el: etree._Element, scope: Scope) -> list[JSON]:
    """Map one clinical statement by its templates; report it when it cannot be mapped."""
    if _about_someone_else(el):
        ctx.issue(el, "entry about a related subject (not the patient), e.g. family history; not mapped")
        return []
    roots = template_roots(el)
    spec = next((TEMPLATES[r] for r in roots if r in TEMPLATES and TEMPLATES[r].reader), None)
    if spec is None:
        known = next((TEMPLATES[r] for r in roots if r in TEMPLATES), None)
        if known is not None:
            ctx.issue(el, f"{known.name} is not mapped: {known.why}", known.severity)
        elif roots:
            ctx.issue(el, f"{local_name(el)} with unknown templates ({', '.join(roots)}); not mapped")
        else:
            ctx.issue(el, f"{local_name(el)} without a templateId; not mapped (templates say what an entry means)")
        return []
    try:
        return spec.reader(ctx, el, scope, **spec.options)
    except (ArithmeticError, AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        # Never a crash on a foreign document: the entry is reported and the rest still read.
        ctx.issue(el, f"could not read this {spec.name}: {type(exc).__name__}: {exc}", "error", "exception")
        return []


def template_name(el: etree._Element) -> str:
    known = next((TEMPLATES[r].name for r in template_roots(el) if r in TEMPLATES), None)
    return known or f"{local_name(el)} ({', '.join(template_roots(el)) or 'no templateId'})"


def _about_someone_else(el: etree._Element) -> bool:
    subject = first_child(el, "subject")
    return subject is not None and first_child(subject, "relatedSubject") is not None


def related(el: etree._Element, *roots: str, codes: tuple[str, ...] = ()) -> Iterator[tuple[etree._Element, etree._Element]]:
    """(entryRelationship, statement) pairs whose statement has one of ``roots`` (or ``codes``)."""
    for rel in children(el, "entryRelationship", "component"):
        inner = statement(rel)
        if inner is None:
            continue
        code = first_child(inner, "code")
        if set(template_roots(inner)) & set(roots) or (codes and code is not None and code.get("code") in codes):
            yield rel, inner


def report_rest(ctx: Context, el: etree._Element, used: set[etree._Element], owner: str) -> None:
    """Report every entryRelationship/component of ``el`` that no reader used."""
    for rel in children(el, "entryRelationship", "component"):
        inner = statement(rel)
        if rel in used or inner is None:
            continue
        roots = template_roots(inner)
        known = next((TEMPLATES[r] for r in roots if r in TEMPLATES), None)
        kind = rel.get("typeCode") or "?"
        if known is not None and known.reader is None:
            ctx.issue(rel, f"{known.name} ({kind}) under this {owner} is not mapped: {known.why}", known.severity)
        else:
            ctx.issue(rel, f"{template_name(inner)} ({kind}) under this {owner} is not mapped here")


def _status(el: etree._Element) -> str:
    code = first_child(el, "statusCode")
    return (code.get("code") or "").strip().lower() if code is not None else ""


def _authors(ctx: Context, el: etree._Element, scope: Scope) -> list[tuple[str | None, JSON | None]]:
    """The element's own authors, else those of the nearest enclosing entry that has any."""
    own = ctx.authors(el)
    if own:
        return own
    for outer in reversed(scope.authors):
        found = ctx.authors(outer)
        if found:
            return found
    return []


def _inner(scope: Scope, el: etree._Element, **changes: Any) -> Scope:
    return replace(scope, authors=(*scope.authors, el), **changes)


def _comments(ctx: Context, el: etree._Element, used: set[etree._Element]) -> list[JSON]:
    notes = []
    for rel, act in related(el, P + "64", codes=("48767-8",)):
        used.add(rel)
        text = ctx.entry_text(act)
        if text:
            notes.append({"text": text})
    return notes


def _reasons(ctx: Context, el: etree._Element, used: set[etree._Element]) -> list[JSON]:
    out = []
    for rel, obs in related(el, P + "19"):
        used.add(rel)
        value = ctx.concept(first_child(obs, "value")) or (
            {"text": ctx.entry_text(obs)} if ctx.entry_text(obs) else None
        )
        if value is None:
            ctx.info(obs, "indication without a value; no reason to map")
        else:
            out.append(value)
    return out


def _when(ctx: Context, el: etree._Element | None, prefix: str) -> JSON:
    """``{prefix}DateTime`` or ``{prefix}Period`` from a TS/IVL_TS."""
    found = ctx.when(el)
    return {f"{prefix}{found[0]}": found[1]} if found else {}


def _category(code: str) -> JSON:
    return {"coding": [{"system": OBSERVATION_CATEGORY, "code": code, "display": OBSERVATION_CATEGORIES[code]}]}


def _absent(value: etree._Element) -> JSON:
    reason = ABSENT_REASON.get((value.get("nullFlavor") or "").upper(), "unknown")
    return {"coding": [{"system": THO + "data-absent-reason", "code": reason}]}


# --- medications ---------------------------------------------------------------------------


def _medication(ctx: Context, el: etree._Element, holder: str) -> JSON | None:
    """``{"medicationCodeableConcept": ...}`` or ``{"medicationReference": ...}`` from the product
    (``consumable`` of an activity, ``product`` of a supply); None when it names nothing."""
    holder_el = first_child(el, holder)
    product = first_child(holder_el, "manufacturedProduct") if holder_el is not None else None
    material = first_child(product, "manufacturedMaterial") if product is not None else None
    concept = ctx.concept(first_child(material, "code")) if material is not None else None
    name = clean(child_text(material, "name")) if material is not None else None
    if concept is None and name:
        concept = {"text": name}
    if concept is None and holder == "consumable":
        text = ctx.entry_text(el)
        concept = {"text": text} if text else None
    if concept is None:
        return None
    if not any(c.get("system", "").endswith("/rxnorm") for c in concept.get("coding", [])):
        ctx.info(material if material is not None else el, "medication not coded in RxNorm", code="incomplete")
    form = ctx.concept(first_child(el, "administrationUnitCode"))
    maker = ctx.organization(first_child(product, "manufacturerOrganization")) if product is not None else None
    vehicles = []
    for participant in children(el, "participant"):
        role = first_child(participant, "participantRole")
        if participant.get("typeCode") == "CSM" and role is not None:
            item = ctx.concept(first_child(first_child(role, "playingEntity"), "code")) if first_child(role, "playingEntity") is not None else None
            if item is not None:
                vehicles.append({"itemCodeableConcept": item, "isActive": False})
        else:
            ctx.info(participant, f"participant (typeCode {participant.get('typeCode')}) of a medication is not mapped")
    if material is not None and first_child(material, "lotNumberText") is not None:
        ctx.info(first_child(material, "lotNumberText"), "lot number not mapped")
    if form is None and maker is None and not vehicles:
        return {"medicationCodeableConcept": concept}
    medication = {"resourceType": "Medication", "code": concept, "form": form, "manufacturer": maker, "ingredient": vehicles}
    return {"medicationReference": ctx.add_shared(medication, el)}


def _unidentified(ctx: Context, el: etree._Element, what: str) -> JSON:
    ctx.issue(el, f"the {what}'s medication is not identified (no product code, name or text); it says data-absent-reason", code="incomplete")
    return {"medicationCodeableConcept": data_absent("unknown")}


def _dosage(ctx: Context, el: etree._Element, used: set[etree._Element], *, request: bool) -> tuple[JSON, JSON]:
    """(Dosage, effective[x] of a statement) from a Medication Activity."""
    repeat: JSON = {}
    timing: JSON = {}
    effective: JSON = {}
    for index, time in enumerate(children(el, "effectiveTime")):
        kind = xsi_type(time)
        if kind == "PIVL_TS":
            _periodic(ctx, time, repeat)
        elif kind == "EIVL_TS":
            _event(ctx, time, repeat)
        elif kind in ("", "IVL_TS", "TS") and index == 0:
            found = ctx.when(time)
            if found and request:
                if found[0] == "DateTime":
                    timing["event"] = [found[1]]
                else:
                    repeat["boundsPeriod"] = found[1]
            elif found:
                effective = {f"effective{found[0]}": found[1]}
        else:
            ctx.issue(time, f"effectiveTime of type {kind or 'IVL_TS'} in this place is not mapped")
    count = first_child(el, "repeatNumber")
    if count is not None and not is_null(count):
        value = ctx.number(count)
        if isinstance(value, int) and value > 0:
            repeat["count"] = value
    if repeat:
        timing["repeat"] = repeat
    dose = first_child(el, "doseQuantity")
    dose_and_rate: JSON = {}
    if dose is not None and not is_null(dose):
        if first_child(dose, "low") is not None or first_child(dose, "high") is not None:
            dose_and_rate["doseRange"] = prune({"low": ctx.quantity(first_child(dose, "low")), "high": ctx.quantity(first_child(dose, "high"))})
        else:
            quantity = ctx.quantity(dose)
            unit_code = first_child(el, "administrationUnitCode")
            if quantity is not None and "unit" not in quantity and unit_code is not None and clean(unit_code.get("displayName")):
                quantity["unit"] = clean(unit_code.get("displayName"))
            dose_and_rate["doseQuantity"] = quantity
    rate = first_child(el, "rateQuantity")
    if rate is not None:
        dose_and_rate["rateQuantity"] = ctx.quantity(rate)
    max_dose = first_child(el, "maxDoseQuantity")
    sig = []
    for rel, free_text in related(el, P + "147", codes=("76662-6",)):
        used.add(rel)
        sig.append(ctx.entry_text(free_text))
    patient_text, extra = [], []
    for rel, act in related(el, P + "20"):
        used.add(rel)
        patient_text.append(ctx.entry_text(act))
        code = ctx.concept(first_child(act, "code"))
        if code is not None:
            extra.append(code)
    dosage = prune(
        {
            "text": "; ".join(s for s in sig if s),
            "patientInstruction": "; ".join(t for t in patient_text if t),
            "additionalInstruction": extra,
            "timing": timing,
            "site": ctx.concept(first_child(el, "approachSiteCode")),
            "route": ctx.concept(first_child(el, "routeCode")),
            "doseAndRate": [dose_and_rate],
            "maxDosePerPeriod": prune(
                {"numerator": ctx.quantity(first_child(max_dose, "numerator")), "denominator": ctx.quantity(first_child(max_dose, "denominator"))}
            )
            if max_dose is not None
            else None,
        }
    )
    preconditions = list(children(el, "precondition"))
    if preconditions:
        criterion = first_child(preconditions[0], "criterion")
        reason = ctx.concept(first_child(criterion, "value")) if criterion is not None else None
        dosage = {**dosage, **({"asNeededCodeableConcept": reason} if reason else {"asNeededBoolean": True})}
    return dosage, effective


def _periodic(ctx: Context, time: etree._Element, repeat: JSON) -> None:
    """PIVL_TS -> frequency/period/periodUnit (C-CDA on FHIR: "every 8 h" 1/8/h, "TID" 3/1/d)."""
    period = first_child(time, "period")
    if period is None or is_null(period):
        ctx.issue(time, "a periodic effectiveTime without a period is not mapped")
        return
    low_el, high_el = first_child(period, "low"), first_child(period, "high")
    low, high = (low_el, high_el) if (low_el is not None or high_el is not None) else (period, period)
    lo, hi = _span(ctx, low), _span(ctx, high if high is not None else low)
    if lo is None or hi is None or lo[1] != hi[1]:
        ctx.issue(period, "period not in a FHIR time unit (s, min, h, d, wk, mo, a) or unreadable; frequency not mapped", code="value")
        return
    unit = lo[1]
    if time.get("institutionSpecified") == "true":
        most, least = _per_day(lo), _per_day(hi)  # the shorter period gives the higher frequency
        if most is not None and least is not None:
            repeat.update({"frequency": least, "period": 1, "periodUnit": "d"})
            if most != least:
                repeat["frequencyMax"] = most
            _phase(ctx, time, repeat)
            return
    repeat.update({"frequency": 1, "period": lo[0], "periodUnit": unit})
    if hi[0] != lo[0]:
        repeat["periodMax"] = hi[0]
    _phase(ctx, time, repeat)


def _span(ctx: Context, el: etree._Element | None) -> tuple[int | float, str] | None:
    if el is None or is_null(el):
        return None
    value, unit = ctx.number(el), (el.get("unit") or "").strip()
    if value is None or value <= 0 or unit not in TIME_UNITS:
        return None
    return value, unit


def _per_day(span: tuple[int | float, str]) -> int | None:
    hours_per = TIME_UNITS[span[1]]
    if hours_per is None:
        return None
    times = Decimal(24) / (Decimal(str(span[0])) * Decimal(str(hours_per)))
    return int(times) if times >= 1 and times == times.to_integral_value() else None


def _phase(ctx: Context, time: etree._Element, repeat: JSON) -> None:
    phase = first_child(time, "phase")
    low = first_child(phase, "low") if phase is not None else None
    raw = (low.get("value") or "") if low is not None else ""
    hour, minute, second = raw[8:10], raw[10:12], raw[12:14] if raw[12:14].isdigit() else "00"
    if len(raw) >= 12 and raw[:12].isdigit() and int(hour) < 24 and int(minute) < 60 and int(second) < 60:
        repeat["timeOfDay"] = [f"{hour}:{minute}:{second}"]
    elif phase is not None:
        ctx.info(phase, "phase without a readable time of day not mapped")


def _event(ctx: Context, time: etree._Element, repeat: JSON) -> None:
    """EIVL_TS -> when (+ offset in minutes)."""
    event = first_child(time, "event")
    code = (event.get("code") or "").strip() if event is not None else ""
    if code not in WHEN:
        ctx.issue(time, f"event {code or '(none)'!r} is not a FHIR timing event; not mapped", code="value")
        return
    repeat.setdefault("when", []).append(code)
    offset = first_child(time, "offset")
    if offset is None or is_null(offset):
        return
    candidates = (first_child(offset, "low"), first_child(offset, "width"), offset)
    span = next((c for c in candidates if c is not None and c.get("value")), None)
    if span is not None:
        value, unit = ctx.number(span), (span.get("unit") or "").strip()
        if value is not None and unit in OFFSET_MINUTES and value >= 0:
            repeat["offset"] = int(Decimal(str(value)) * OFFSET_MINUTES[unit])
        else:
            ctx.issue(offset, "event offset not in s, min, h or d; not mapped", code="value")


def _dispense_request(ctx: Context, supply: etree._Element) -> JSON:
    request: JSON = {}
    found = ctx.when(first_child(supply, "effectiveTime"))
    if found:
        request["validityPeriod"] = found[1] if found[0] == "Period" else {"start": found[1]}
    fills = first_child(supply, "repeatNumber")
    if fills is not None and not is_null(fills):
        total = ctx.number(fills)
        if isinstance(total, int) and total >= 1:
            request["numberOfRepeatsAllowed"] = total - 1  # C-CDA counts the first fill too
        else:
            ctx.issue(fills, "repeatNumber (total fills) below 1 or not an integer; refills not mapped", code="value")
    request["quantity"] = ctx.quantity(first_child(supply, "quantity"))
    return prune(request)


def medication_activity(ctx: Context, el: etree._Element, scope: Scope, *, planned: bool = False) -> list[JSON]:
    mood = (el.get("moodCode") or "EVN").strip().upper()
    as_request = planned or scope.discharge or mood != "EVN"
    used: set[etree._Element] = set()
    what = "planned medication" if planned else "medication"
    medication = _medication(ctx, el, "consumable") or _unidentified(ctx, el, what)
    dosage, effective = _dosage(ctx, el, used, request=as_request)
    reasons, notes = _reasons(ctx, el, used), _comments(ctx, el, used)
    authors = _authors(ctx, el, scope)
    status = _status(el)
    negated = el.get("negationInd") == "true"
    inner = _inner(scope, el)
    made: list[JSON] = []
    supplies = list(related(el, P + "17"))
    dispenses = list(related(el, P + "18"))
    if as_request:
        if mood == "EVN" and scope.discharge:
            ctx.info(el, "EVN medication inside a Discharge Medication read as a discharge MedicationRequest (intent plan)")
        request: JSON = {
            "resourceType": "MedicationRequest",
            "id": ctx.mint("MedicationRequest", el),
            "identifier": ctx.identifiers(el),
            "status": MED_REQUEST_STATUS.get(status, "unknown"),
            "intent": "plan" if planned else MED_INTENT.get(mood, "order"),
            "category": [{"coding": [{"system": MEDREQ_CATEGORY, "code": "discharge", "display": "Discharge"}]}] if scope.discharge else None,
            "doNotPerform": True if negated else None,
            **medication,
            "subject": ctx.subject(),
            "encounter": ctx.encounter if scope.discharge else None,
            "authoredOn": first_time(authors),
            "requester": next((who for _, who in reversed(authors) if who), None),
            "reasonCode": reasons,
            "note": notes,
            "dosageInstruction": [dosage],
        }
        performer = first_child(el, "performer")
        if performer is not None:
            request["performer"] = ctx.party(first_child(performer, "assignedEntity"))
        for index, (rel, supply) in enumerate(supplies):
            used.add(rel)
            if index:
                ctx.issue(supply, "a second Supply Order under one Medication Activity is not mapped")
                continue
            # The activity's prescription: its dispense request, prescriber and label instructions.
            request["dispenseRequest"] = _dispense_request(ctx, supply)
            supply_authors = ctx.authors(supply)
            if supply_authors and not request.get("requester"):
                request["requester"] = next((who for _, who in reversed(supply_authors) if who), None)
                request["authoredOn"] = request.get("authoredOn") or first_time(supply_authors)
            labels = [ctx.entry_text(act) for _, act in related(supply, P + "20")]
            text = "; ".join(t for t in [dosage.get("patientInstruction"), *labels] if t)
            if text:
                request["dosageInstruction"] = [{**dosage, "patientInstruction": text}]
            dispenses.extend(related(supply, P + "18"))  # fills filed under the order are its fills
            report_rest(ctx, supply, {r for r, _ in related(supply, P + "20", P + "18")}, "Medication Supply Order")
        prescription = ctx.add(request, el)
        made.append(prescription)
    else:
        prescription = None
        for rel, supply in supplies:
            used.add(rel)
            refs = supply_order(ctx, supply, inner, fallback=medication)
            made.extend(refs)
            prescription = prescription or (refs[0] if refs else None)
        performer = first_child(el, "performer")
        if performer is not None:
            ctx.info(performer, "the performer of a medication history entry is not mapped (MedicationStatement has no performer)")
        statement_: JSON = {
            "resourceType": "MedicationStatement",
            "id": ctx.mint("MedicationStatement", el),
            "identifier": ctx.identifiers(el),
            "basedOn": [prescription] if prescription else None,
            "status": "not-taken" if negated else MED_STATEMENT_STATUS.get(status, "unknown"),
            **medication,
            "subject": ctx.subject(),
            **effective,
            "dateAsserted": first_time(authors),
            "informationSource": next((who for _, who in reversed(authors) if who), None) or _informant(ctx, el),
            "reasonCode": reasons,
            "note": notes,
            "dosage": [dosage],
        }
        stored_at = len(ctx.resources)
        made.insert(0, ctx.add(statement_, el))
    for rel, dispense in dispenses:
        used.add(rel)
        refs = medication_dispense(ctx, dispense, inner, prescription=prescription, fallback=medication)
        made.extend(refs)
        if not as_request and refs:
            ctx.resources[stored_at].setdefault("derivedFrom", []).append(refs[0])
    report_rest(ctx, el, used, "Medication Activity")
    return made


def _informant(ctx: Context, el: etree._Element) -> JSON | None:
    informant = first_child(el, "informant")
    if informant is None:
        return None
    entity = first_child(informant, "assignedEntity")
    if entity is not None:
        return ctx.party(entity)
    ctx.info(informant, "an informant who is not a clinician (patient, relative) is not mapped")
    return None


def supply_order(ctx: Context, el: etree._Element, scope: Scope, *, fallback: JSON | None = None) -> list[JSON]:
    """Medication Supply Order (prescription) -> MedicationRequest, intent order."""
    used: set[etree._Element] = set()
    medication = _medication(ctx, el, "product") or fallback or _unidentified(ctx, el, "supply order")
    authors = _authors(ctx, el, scope)
    texts = []
    for rel, act in related(el, P + "20"):
        used.add(rel)
        texts.append(ctx.entry_text(act))
    request = {
        "resourceType": "MedicationRequest",
        "id": ctx.mint("MedicationRequest", el),
        "identifier": ctx.identifiers(el),
        "status": MED_REQUEST_STATUS.get(_status(el), "unknown"),
        "intent": "order",
        **medication,
        "subject": ctx.subject(),
        "authoredOn": first_time(authors),
        "requester": next((who for _, who in reversed(authors) if who), None),
        "note": _comments(ctx, el, used),
        "dosageInstruction": [{"patientInstruction": "; ".join(t for t in texts if t)}],
        "dispenseRequest": _dispense_request(ctx, el),
    }
    made = [ctx.add(request, el)]
    for rel, dispense in related(el, P + "18"):
        used.add(rel)
        made.extend(medication_dispense(ctx, dispense, _inner(scope, el), prescription=made[0], fallback=medication))
    report_rest(ctx, el, used, "Medication Supply Order")
    return made


def medication_dispense(
    ctx: Context, el: etree._Element, scope: Scope, *, prescription: JSON | None = None, fallback: JSON | None = None
) -> list[JSON]:
    """Medication Dispense (a fill) -> MedicationDispense."""
    used: set[etree._Element] = set()
    medication = _medication(ctx, el, "product") or fallback or _unidentified(ctx, el, "dispense")
    made: list[JSON] = []
    if prescription is None:
        for rel, order in related(el, P + "17"):
            used.add(rel)
            made.extend(supply_order(ctx, order, _inner(scope, el), fallback=medication))
            prescription = prescription or (made[0] if made else None)
    performers = []
    for performer in children(el, "performer"):
        entity = first_child(performer, "assignedEntity")
        if entity is None:
            continue
        for ref in (ctx.party(entity), ctx.organization(first_child(entity, "representedOrganization"))):
            if ref is not None and {"actor": ref} not in performers:
                performers.append({"actor": ref})  # the pharmacist and the pharmacy
    fill = first_child(el, "repeatNumber")
    number = ctx.number(fill) if fill is not None and not is_null(fill) else None
    kind = None
    if isinstance(number, int) and number >= 1:
        kind = {"coding": [{"system": V3_ACT_CODE, "code": "FF", "display": "First Fill"}]} if number == 1 else {
            "coding": [{"system": V3_ACT_CODE, "code": "RF", "display": "Refill"}],
            "text": f"fill {number}",
        }
    found = ctx.when(first_child(el, "effectiveTime"))
    dispense = {
        "resourceType": "MedicationDispense",
        "id": ctx.mint("MedicationDispense", el),
        "identifier": ctx.identifiers(el),
        "status": DISPENSE_STATUS.get(_status(el), "unknown"),
        **medication,
        "subject": ctx.subject(),
        "performer": performers,
        "authorizingPrescription": [prescription] if prescription else None,
        "type": kind,
        "quantity": ctx.quantity(first_child(el, "quantity")),
        "whenHandedOver": (found[1] if found[0] == "DateTime" else found[1].get("end") or found[1].get("start")) if found else None,
        "note": _comments(ctx, el, used),
    }
    made.insert(0, ctx.add(dispense, el))
    report_rest(ctx, el, used, "Medication Dispense")
    return made


def discharge_medication(ctx: Context, el: etree._Element, scope: Scope) -> list[JSON]:
    """Discharge Medication act: its Medication Activities become discharge MedicationRequests."""
    return _wrapped(ctx, el, _inner(scope, el, discharge=True), "Discharge Medication")


def admission_medication(ctx: Context, el: etree._Element, scope: Scope) -> list[JSON]:
    """Admission Medication act: the medications taken before admission, read as usual."""
    return _wrapped(ctx, el, _inner(scope, el), "Admission Medication")


def _wrapped(ctx: Context, el: etree._Element, scope: Scope, owner: str) -> list[JSON]:
    made: list[JSON] = []
    used: set[etree._Element] = set()
    for rel in children(el, "entryRelationship", "component"):
        inner = statement(rel)
        if inner is None:
            continue
        used.add(rel)
        made.extend(read_entry(ctx, inner, scope))
    if not used:
        ctx.issue(el, f"{owner} holds no statement; nothing to map", code="incomplete")
    return made


# --- problems ------------------------------------------------------------------------------


def problem_concern(ctx: Context, el: etree._Element, scope: Scope, *, category: str | None = None) -> list[JSON]:
    """Problem Concern Act (or a diagnosis act): one Condition per Problem Observation it holds."""
    inner = _inner(scope, el, diagnosis=category or scope.diagnosis)
    made: list[JSON] = []
    used: set[etree._Element] = set()
    for rel, obs in related(el, P + "4"):
        used.add(rel)
        made.extend(problem_observation(ctx, obs, inner, concern=el))
    if not used:
        ctx.issue(el, "concern act without a Problem Observation; nothing to map", code="incomplete")
    report_rest(ctx, el, used, "concern act")
    return made


def problem_observation(ctx: Context, el: etree._Element, scope: Scope, *, concern: etree._Element | None = None) -> list[JSON]:
    used: set[etree._Element] = set()
    value = first_child(el, "value")
    code = ctx.concept(value)
    if code is None:
        text = ctx.entry_text(el)
        if text is None:
            ctx.issue(el, "problem observation names no problem (value missing or nullFlavor, no text); not mapped", "error", "required")
            return []
        ctx.issue(el, "problem not coded; its narrative text stands in", code="incomplete")
        code = {"text": text}
    negated = el.get("negationInd") == "true"
    time = first_child(el, "effectiveTime")
    onset = ctx.datetime(first_child(time, "low")) if time is not None else None
    onset = onset or (ctx.datetime(time) if time is not None and time.get("value") else None)
    high = first_child(time, "high") if time is not None else None
    abatement = ctx.datetime(high)
    clinical = None
    for rel, status_obs in related(el, P + "6", codes=("33999-4",)):
        used.add(rel)
        value_el = first_child(status_obs, "value")
        clinical = PROBLEM_STATUS.get(value_el.get("code", "") if value_el is not None else "") or clinical
    if clinical is None and (abatement or (high is not None and high.get("nullFlavor") == "UNK")):
        clinical = "resolved"
    if clinical is None and concern is not None:
        clinical = CONCERN_CLINICAL.get(_status(concern))
    if onset and abatement and abatement[:10] < onset[:10]:
        ctx.issue(el, f"resolved ({abatement}) before its onset ({onset}); kept as sent", code="business-rule")
    age = None
    for rel, age_obs in related(el, P + "31", codes=("445518008",)):
        used.add(rel)
        age = ctx.quantity(first_child(age_obs, "value"))
    category_code = scope.diagnosis or {"health-concerns": "health-concern"}.get(scope.section, "problem-list-item")
    system, display = CONDITION_CATEGORIES[category_code]
    categories = [{"coding": [{"system": system, "code": category_code, "display": display}]}]
    kind = ctx.concept(first_child(el, "code"))
    if kind is not None:
        categories.append(kind)
    authors = _authors(ctx, el, scope)  # the concern act's when the observation has none
    condition = {
        "resourceType": "Condition",
        "id": ctx.mint("Condition", el),
        "identifier": ctx.identifiers(el),
        "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": clinical}]} if clinical and not negated else None,
        "verificationStatus": {"coding": [{"system": CONDITION_VERIFICATION, "code": "refuted"}]} if negated else None,
        "category": categories,
        "code": code,
        "subject": ctx.subject(),
        "encounter": ctx.encounter if category_code == "encounter-diagnosis" else None,
        "onsetDateTime": onset,
        "onsetAge": age if not onset else None,
        "abatementDateTime": abatement,
        "recordedDate": first_time(authors),
        "recorder": next((who for _, who in reversed(authors) if who), None),
        "note": _comments(ctx, el, used),
    }
    if abatement is None and high is not None and high.get("nullFlavor") == "UNK":
        condition["_abatementDateTime"] = {"extension": data_absent("unknown")["extension"]}
    made = [ctx.add(condition, el)]
    report_rest(ctx, el, used, "Problem Observation")
    return made


# --- observations --------------------------------------------------------------------------


def _observation(ctx: Context, el: etree._Element, scope: Scope, category: str, used: set[etree._Element]) -> JSON | None:
    """The Observation a C-CDA observation maps to (not yet added); None when it has no code."""
    code = ctx.concept(first_child(el, "code"))
    if code is None:
        text = ctx.entry_text(el)
        if text is None:
            ctx.issue(el, "observation without a code or text; not mapped", "error", "required")
            return None
        code = {"text": text}
    if el.get("negationInd") == "true":
        ctx.issue(el, "a negated observation (negationInd) cannot be said in an R4 Observation; not mapped")
        return None
    authors = _authors(ctx, el, scope)
    resource: JSON = {
        "resourceType": "Observation",
        "id": ctx.mint("Observation", el),
        "identifier": ctx.identifiers(el),
        "status": OBSERVATION_STATUS.get(_status(el), "unknown"),
        "category": [_category(category)],
        "code": code,
        "subject": ctx.subject(),
        **_when(ctx, first_child(el, "effectiveTime"), "effective"),
        "performer": [who for _, who in authors if who],
    }
    _values(ctx, el, resource)
    resource.update(
        {
            "interpretation": [c for c in (ctx.concept(i) for i in children(el, "interpretationCode")) if c],
            "note": _comments(ctx, el, used),
            "bodySite": ctx.concept(first_child(el, "targetSiteCode")),
            "method": ctx.concept(first_child(el, "methodCode")),
            "referenceRange": _ranges(ctx, el),
        }
    )
    return resource


def _values(ctx: Context, el: etree._Element, resource: JSON) -> None:
    values = list(children(el, "value"))
    if not values:
        return
    coded = [v for v in values if xsi_type(v) in CODED and not is_null(v)]
    scores = [v for v in values if xsi_type(v) == "INT" and not is_null(v)]
    if len(values) == 2 and len(coded) == 1 and len(scores) == 1:
        # An answer sent twice, as a score and as a coded answer (assessment items).
        answer, score = ctx.concept(coded[0]), ctx.number(scores[0])
        if answer is not None and answer.get("coding") and score is not None:
            answer["coding"][0]["extension"] = [{"url": ORDINAL, "valueDecimal": score}]
        if answer is not None:
            resource["valueCodeableConcept"] = answer
            return
        values = scores
    first = values[0]
    # A coded value with a nullFlavor may still carry translations or original text.
    found = _value(ctx, first) if not is_null(first) or xsi_type(first) in CODED else None
    if found is not None:
        resource[found[0]] = found[1]
    elif is_null(first):
        resource["dataAbsentReason"] = _absent(first)
    for extra in values[1:]:
        ctx.issue(extra, "a second value of one observation is not mapped (FHIR holds one)")


def _value(ctx: Context, value: etree._Element) -> tuple[str, Any] | None:
    """value[x] from a C-CDA ``value`` by its xsi:type."""
    kind = xsi_type(value) or ("CD" if value.get("code") else "PQ" if value.get("value") else "ST")
    if kind == "PQ" or kind == "REAL":
        quantity = ctx.quantity(value)
        return ("valueQuantity", quantity) if quantity else None
    if kind == "INT":
        number = ctx.number(value)
        if isinstance(number, int):
            return "valueInteger", number
        if number is not None:
            ctx.issue(value, "INT value is not a whole number; kept as a quantity", code="value")
            return "valueQuantity", {"value": number}
        return None
    if kind in CODED:
        concept = ctx.concept(value)
        return ("valueCodeableConcept", concept) if concept else None
    if kind in ("ST", "ED"):
        text = clean("".join(value.itertext()))
        return ("valueString", text) if text else None
    if kind == "BL":
        flag = value.get("value")
        return ("valueBoolean", flag == "true") if flag in ("true", "false") else None
    if kind in ("TS", "IVL_TS"):
        found = ctx.when(value)
        return (f"value{found[0]}", found[1]) if found else None
    if kind in ("IVL_PQ", "IVL_INT"):
        low, high = ctx.quantity(first_child(value, "low")), ctx.quantity(first_child(value, "high"))
        return ("valueRange", prune({"low": low, "high": high})) if low or high else None
    if kind in ("RTO", "RTO_PQ_PQ", "RTO_INT_INT"):
        ratio = prune({"numerator": ctx.quantity(first_child(value, "numerator")), "denominator": ctx.quantity(first_child(value, "denominator"))})
        return ("valueRatio", ratio) if ratio else None
    ctx.issue(value, f"value of type {kind} is not mapped", code="not-supported")
    return None


def _ranges(ctx: Context, el: etree._Element) -> list[JSON]:
    """referenceRange: normal ranges only (FHIR's ranges are normal ranges; C-CDA on FHIR)."""
    out = []
    for reference in children(el, "referenceRange"):
        observed = first_child(reference, "observationRange")
        if observed is None:
            continue
        interpretation = first_child(observed, "interpretationCode")
        meaning = (interpretation.get("code") or "N") if interpretation is not None else "N"
        if meaning != "N":
            ctx.info(observed, f"a reference range for interpretation {meaning!r} is not mapped (FHIR ranges are normal ranges)")
            continue
        value = first_child(observed, "value")
        low = high = None
        text = ctx.entry_text(observed)
        if value is not None and not is_null(value):
            if xsi_type(value) in CODED:
                concept = ctx.concept(value)
                shown = concept.get("text") or next((c.get("display") for c in concept.get("coding", []) if c.get("display")), None) if concept else None
                text = text or shown
            else:
                low, high = ctx.quantity(first_child(value, "low")), ctx.quantity(first_child(value, "high"))
                if xsi_type(value) in ("ST", "ED"):
                    text = text or clean("".join(value.itertext()))
        found = prune({"low": low, "high": high, "text": text})
        if found:
            out.append(found)
    return out


def observation_entry(ctx: Context, el: etree._Element, scope: Scope, *, category: str) -> list[JSON]:
    """A stand-alone observation (result, vital sign, social history, mental status)."""
    used: set[etree._Element] = set()
    resource = _observation(ctx, el, scope, category, used)
    if resource is None:
        return []
    made = [ctx.add(resource, el)]
    report_rest(ctx, el, used, template_name(el))
    return made


def result_organizer(ctx: Context, el: etree._Element, scope: Scope) -> list[JSON]:
    """Result Organizer -> DiagnosticReport (LAB) over one laboratory Observation per result."""
    inner = _inner(scope, el)
    results: list[JSON] = []
    used: set[etree._Element] = set()
    for component in children(el, "component"):
        obs = statement(component)
        if obs is None:
            continue
        if local_name(obs) != "observation":
            ctx.issue(component, f"{template_name(obs)} in a result panel is not mapped")
            used.add(component)
            continue
        used.add(component)
        results.extend(observation_entry(ctx, obs, inner, category="laboratory"))
    code = ctx.concept(first_child(el, "code"))
    if code is None:
        ctx.issue(el, "result panel without a code: its results are kept, the report is not made", code="incomplete")
        return results
    ctx.info(el, "category laboratory assumed for this result panel (no LOINC class lookup)")
    if first_child(el, "specimen") is not None:
        ctx.info(first_child(el, "specimen"), "specimen not mapped")
    authors = _authors(ctx, el, scope)
    report = {
        "resourceType": "DiagnosticReport",
        "id": ctx.mint("DiagnosticReport", el),
        "identifier": ctx.identifiers(el),
        "status": REPORT_STATUS.get(_status(el), "unknown"),
        "category": [{"coding": [{"system": DIAGNOSTIC_SERVICE, "code": "LAB", "display": "Laboratory"}]}],
        "code": code,
        "subject": ctx.subject(),
        **_when(ctx, first_child(el, "effectiveTime"), "effective"),
        "performer": [who for _, who in authors if who],
        "result": results,
    }
    if "effectiveDateTime" not in report and "effectivePeriod" not in report:
        # C-CDA on FHIR: without its own time the panel spans its results' times.
        ids = {ref["reference"] for ref in results}
        times = sorted(r["effectiveDateTime"] for r in ctx.resources if f"Observation/{r['id']}" in ids and "effectiveDateTime" in r)
        if times and times[0] == times[-1]:
            report["effectiveDateTime"] = times[0]
        elif times:
            report["effectivePeriod"] = {"start": times[0], "end": times[-1]}
    return [ctx.add(report, el), *results]


def panel_organizer(ctx: Context, el: etree._Element, scope: Scope, *, category: str) -> list[JSON]:
    """An organizer of observations (vital signs, mental status) -> a panel Observation with
    ``hasMember`` pointing at one Observation per component."""
    inner = _inner(scope, el)
    members: list[JSON] = []
    made: list[JSON] = []
    for component in children(el, "component"):
        obs = statement(component)
        if obs is None:
            continue
        refs = read_entry(ctx, obs, inner) if template_roots(obs) else observation_entry(ctx, obs, inner, category=category)
        made.extend(refs)
        members.extend(r for r in refs if r["reference"].startswith("Observation/"))
    used: set[etree._Element] = set(children(el, "component"))
    panel = _observation(ctx, el, scope, category, used)
    if panel is None:
        return made
    panel["hasMember"] = members
    return [ctx.add(panel, el), *made]


def assessment_scale(ctx: Context, el: etree._Element, scope: Scope) -> list[JSON]:
    """Assessment Scale Observation -> survey Observation, items as ``hasMember``."""
    inner = _inner(scope, el)
    used: set[etree._Element] = set()
    members: list[JSON] = []
    made: list[JSON] = []
    for rel, item in related(el, P + "86", P + "69"):
        used.add(rel)
        reader = assessment_scale if P + "69" in template_roots(item) else _assessment_item
        refs = reader(ctx, item, inner)
        if refs:
            members.append(refs[0])
            made.extend(refs)
    panel = _observation(ctx, el, scope, "survey", used)
    if panel is None:
        return made
    panel["hasMember"] = members
    own = ctx.add(panel, el)
    report_rest(ctx, el, used, "Assessment Scale Observation")
    return [own, *made]


def _assessment_item(ctx: Context, el: etree._Element, scope: Scope) -> list[JSON]:
    return observation_entry(ctx, el, scope, category="survey")


# --- plans ---------------------------------------------------------------------------------


def planned_service(ctx: Context, el: etree._Element, scope: Scope, *, what: str) -> list[JSON]:
    """A planned act, encounter, procedure or observation -> ServiceRequest."""
    used: set[etree._Element] = set()
    code = ctx.concept(first_child(el, "code"))
    text = ctx.entry_text(el)
    if code is None and text:
        code = {"text": text}
    if code is None:
        ctx.issue(el, f"{what} names nothing (no code, no text); not mapped", code="incomplete")
        return []
    mood = (el.get("moodCode") or "INT").strip().upper()
    authors = _authors(ctx, el, scope)
    performers = [ctx.party(first_child(p, "assignedEntity")) for p in children(el, "performer")]
    request = {
        "resourceType": "ServiceRequest",
        "id": ctx.mint("ServiceRequest", el),
        "identifier": ctx.identifiers(el),
        "status": SERVICE_STATUS.get(_status(el), "unknown"),
        "intent": SERVICE_INTENT.get(mood, "plan"),
        "code": code,
        "subject": ctx.subject(),
        **_when(ctx, first_child(el, "effectiveTime"), "occurrence"),
        "authoredOn": first_time(authors),
        "requester": next((who for _, who in reversed(authors) if who), None),
        "performer": [p for p in performers if p],
        "reasonCode": _reasons(ctx, el, used),
        "note": _comments(ctx, el, used),
        "bodySite": [c for c in (ctx.concept(s) for s in children(el, "targetSiteCode")) if c],
    }
    if mood not in SERVICE_INTENT:
        ctx.info(el, f"moodCode {mood!r} read as intent plan")
    made = [ctx.add(request, el)]
    report_rest(ctx, el, used, what)
    return made


def goal(ctx: Context, el: etree._Element, scope: Scope) -> list[JSON]:
    """Goal Observation -> Goal (description from code, else value, else text)."""
    used: set[etree._Element] = set()
    code = ctx.concept(first_child(el, "code"))
    value_el = first_child(el, "value")
    value = _value(ctx, value_el) if value_el is not None and not is_null(value_el) else None
    description = code or (value[1] if value and value[0] == "valueCodeableConcept" else None)
    text = ctx.entry_text(el)
    if description is None and text:
        description = {"text": text}
    if description is None:
        ctx.issue(el, "goal says nothing (no code, value or text); not mapped", code="incomplete")
        return []
    status = _status(el)
    if status not in GOAL_STATUS:
        ctx.info(el, f"goal status {status or '(none)'!r} read as active")
    target = None
    if code is not None and value and value[0] in ("valueQuantity", "valueRange", "valueCodeableConcept", "valueString", "valueInteger", "valueRatio", "valueBoolean"):
        target = [{"measure": code, "detail" + value[0][5:]: value[1]}]
    authors = _authors(ctx, el, scope)
    found = ctx.when(first_child(el, "effectiveTime"))
    start = (found[1] if found[0] == "DateTime" else found[1].get("start")) if found else None
    resource = {
        "resourceType": "Goal",
        "id": ctx.mint("Goal", el),
        "identifier": ctx.identifiers(el),
        "lifecycleStatus": GOAL_STATUS.get(status, "active"),
        "description": description,
        "subject": ctx.subject(),
        "startDate": start[:10] if start else None,
        "target": target,
        "expressedBy": next((who for _, who in reversed(authors) if who), None),
        "note": _comments(ctx, el, used),
    }
    made = [ctx.add(resource, el)]
    report_rest(ctx, el, used, "Goal Observation")
    return made


def instruction(ctx: Context, el: etree._Element, scope: Scope) -> list[JSON]:
    """Instruction -> an activity detail of the section's CarePlan (plan sections only)."""
    text = ctx.entry_text(el)
    code = ctx.concept(first_child(el, "code"))
    if scope.details is None:
        ctx.issue(el, "an Instruction outside a plan section has no FHIR home here; not mapped")
        return []
    if text is None and code is None:
        ctx.issue(el, "Instruction says nothing (no code or text); not mapped", code="incomplete")
        return []
    scope.details.append(prune({"kind": "CommunicationRequest", "code": code, "status": "unknown", "description": text}))
    return []


def care_plan(ctx: Context, section: etree._Element, activities: list[JSON], details: list[JSON], goals: list[JSON], title: str | None) -> list[JSON]:
    """One CarePlan for a Plan of Treatment section: its requests, instructions and goals, with
    the section narrative as the plan's text."""
    lines = narrative_lines(first_child(section, "text"))
    if not activities and not details and not goals and not lines:
        return []
    if lines:
        text = {"status": "additional", "div": _div(lines)}
    else:
        text = {"status": "generated", "div": _div([f"{title or 'Plan of treatment'}: {len(activities) + len(details)} planned activities, {len(goals)} goals"])}
    plan = {
        "resourceType": "CarePlan",
        "id": ctx.mint("CarePlan", section, []),
        "text": text,
        "status": "active",
        "intent": "plan",
        "category": [{"coding": [{"system": CAREPLAN_CATEGORY, "code": "assess-plan", "display": "Assessment and Plan of Treatment"}]}],
        "title": title,
        "subject": ctx.subject(),
        "encounter": ctx.encounter,
        "goal": goals,
        "activity": [{"reference": ref} for ref in activities] + [{"detail": d} for d in details],
    }
    return [ctx.add(plan, section)]


def narrative_lines(el: etree._Element | None) -> list[str]:
    """The narrative as lines of plain text: a table row, paragraph, list item or caption each."""
    if el is None:
        return []
    lines = []
    for node in el.iter():
        if not isinstance(node.tag, str) or local_name(node) not in _BLOCKS or _inside_block(node, el):
            continue
        if local_name(node) == "tr":
            cells = [clean("".join(c.itertext())) for c in children(node, "td", "th")]
            line = " | ".join(c for c in cells if c)
        else:
            line = clean("".join(node.itertext()))
        if line:
            lines.append(line)
    if not lines:
        whole = clean("".join(el.itertext()))
        lines = [whole] if whole else []
    return lines


_BLOCKS = frozenset({"tr", "paragraph", "item", "caption"})


def _inside_block(node: etree._Element, top: etree._Element) -> bool:
    for ancestor in node.iterancestors():
        if ancestor is top:
            return False
        if local_name(ancestor) in _BLOCKS:
            return True
    return False


def _div(lines: list[str]) -> str:
    body = "".join(f"<p>{html.escape(line, quote=False)}</p>" for line in lines)
    return f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'


# --- the template table --------------------------------------------------------------------


def _t(name: str, reader: Reader | None = None, **options: Any) -> Template:
    return Template(name, reader, MappingProxyType(options))


def _no(name: str, why: str | None = None, severity: str = "warning") -> Template:
    return Template(name, None, why=why or Template.why, severity=severity)


_NOT_CLINICAL = "metadata the gateway does not keep"

TEMPLATES: dict[str, Template] = {
    # mapped
    P + "16": _t("Medication Activity", medication_activity),
    P + "42": _t("Planned Medication Activity", medication_activity, planned=True),
    P + "17": _t("Medication Supply Order", supply_order),
    P + "18": _t("Medication Dispense", medication_dispense),
    P + "35": _t("Discharge Medication", discharge_medication),
    P + "36": _t("Admission Medication", admission_medication),
    P + "3": _t("Problem Concern Act", problem_concern),
    P + "132": _t("Health Concern Act", problem_concern, category="health-concern"),
    P + "33": _t("Hospital Discharge Diagnosis", problem_concern, category="encounter-diagnosis"),
    P + "34": _t("Hospital Admission Diagnosis", problem_concern, category="encounter-diagnosis"),
    P + "80": _t("Encounter Diagnosis", problem_concern, category="encounter-diagnosis"),
    P + "4": _t("Problem Observation", problem_observation),
    P + "1": _t("Result Organizer", result_organizer),
    P + "2": _t("Result Observation", observation_entry, category="laboratory"),
    P + "26": _t("Vital Signs Organizer", panel_organizer, category="vital-signs"),
    P + "27": _t("Vital Sign Observation", observation_entry, category="vital-signs"),
    P + "69": _t("Assessment Scale Observation", assessment_scale),
    P + "86": _t("Assessment Scale Supporting Observation", _assessment_item),
    P + "75": _t("Mental Status Organizer", panel_organizer, category="exam"),
    P + "74": _t("Mental Status Observation", observation_entry, category="exam"),
    P + "78": _t("Smoking Status Observation", observation_entry, category="social-history"),
    P + "38": _t("Social History Observation", observation_entry, category="social-history"),
    P + "39": _t("Planned Act", planned_service, what="Planned Act"),
    P + "40": _t("Planned Encounter", planned_service, what="Planned Encounter"),
    P + "41": _t("Planned Procedure", planned_service, what="Planned Procedure"),
    P + "44": _t("Planned Observation", planned_service, what="Planned Observation"),
    P + "121": _t("Goal Observation", goal),
    P + "20": _t("Instruction", instruction),
    # recognised, not mapped
    P + "30": _no("Allergy Concern Act", "allergies are not read from C-CDA yet (review them in the document)"),
    P + "7": _no("Allergy Intolerance Observation", "allergies are not read from C-CDA yet (review them in the document)"),
    P + "52": _no("Immunization Activity"),
    P + "49": _no("Encounter Activity"),
    P + "14": _no("Procedure Activity Procedure"),
    P + "13": _no("Procedure Activity Observation"),
    P + "12": _no("Procedure Activity Act"),
    P + "45": _no("Family History Organizer"),
    P + "46": _no("Family History Observation"),
    P + "66": _no("Functional Status Organizer"),
    P + "67": _no("Functional Status Observation"),
    P + "108": _no("Advance Directive Organizer"),
    P + "48": _no("Advance Directive Observation"),
    P + "135": _no("Medical Equipment Organizer"),
    P + "50": _no("Non-Medicinal Supply Activity"),
    P + "60": _no("Coverage Activity", "insurance is " + _NOT_CLINICAL),
    P + "61": _no("Policy Activity", "insurance is " + _NOT_CLINICAL),
    P + "85": _no("Tobacco Use"),
    P + "141": _no("Handoff Communication Participants", "who takes over care is not read from C-CDA yet"),
    P + "143": _no("Priority Preference", _NOT_CLINICAL, "information"),
    P + "129": _no("Planned Coverage", "insurance is " + _NOT_CLINICAL, "information"),
    P + "43": _no("Planned Supply"),
    P + "120": _no("Planned Immunization Activity"),
    P + "9": _no("Reaction Observation"),
    P + "8": _no("Severity Observation"),
    P + "118": _no("Substance Administered Act"),
    P + "123": _no("Drug Monitoring Act"),
    P + "128": _no("Self-Care Activities"),
    P + "64": _no("Comment Activity", "a comment here has no FHIR home", "information"),
    P + "19": _no("Indication", "an indication outside a medication or plan has no FHIR home"),
    P + "6": _no("Problem Status", "a status outside its Problem Observation has no FHIR home"),
    P + "31": _no("Age Observation", "an age outside its Problem Observation has no FHIR home"),
    P + "147": _no("Medication Free Text Sig", "a sig outside its Medication Activity has no FHIR home"),
}
