"""Adherence from pharmacy fills: proportion of days covered, refill gaps, overdue MAT refills.

Pure: FHIR MedicationDispense (and MedicationRequest) dicts in, numbers and FHIR resources out;
no I/O, no clock (the day of reckoning, ``as_of``, is a parameter). Where the dispenses come
from (an NCPDP RxFill, an RxHistoryResponse, another EHR) does not matter here.

**Proportion of days covered (PDC)**, the Pharmacy Quality Alliance (PQA) method as its measure
specifications and published test vectors state it:

* the measurement period starts at the *index date*, the first fill inside the requested window,
  and runs to the window's last day; PDC = days covered in that period / days in that period;
* a day is covered when supply from a dispense is on hand; days are counted once, never summed
  (so PDC is at most 1), and supply running past the end of the period is not counted;
* an early refill of the *same drug* does not double-count: its supply starts the day after the
  supply already on hand runs out (PQA vector: a 90-day fill on 09-25 while supply lasts to
  10-02 is taken from 10-03);
* fills of *different drugs* of one class overlap without shifting (PQA vector: two single
  agents of a class filled the same day each cover the same 90 days, once): a patient switching
  or combining drugs is covered, not stockpiling.

Applied here: per prescription (``authorizingPrescription``) every fill of the prescription is
the same drug; per drug class (the RxNorm code's ``class`` in the terminology medications table)
the drug is the table's ``ingredient``, so two buprenorphine products shift, sertraline and
bupropion do not. Only fills inside the window count; supply carried in from a fill before the
window does not (the index date is a fill in the window). PQA's population rules (two fills on
different days, 18 years and older, continuous enrolment) decide who enters a quality *measure*;
a clinical signal for one patient applies none of them, and ``Adherence.fills`` lets a caller do so.

What counts as a fill: status ``completed``, or ``in-progress`` with ``whenHandedOver`` (a
partial fill handed over while the rest is owed: NCPDP PartiallyDispensed), each with its own
``daysSupply``. Every other status (``declined``, ``cancelled``, ``stopped``, ``preparation``,
``on-hold``, ``entered-in-error``, ``unknown``) dispensed nothing and counts nothing. The fill
day is ``whenHandedOver`` (a completed dispense without it falls back to ``whenPrepared``,
noted), as the pharmacy wrote it (its local date). Dispenses given twice (same id, or same first
identifier) count once. One fill reported twice, by an RxFill and in a medication history, is
one stored dispense already (``script_mapping``'s fill key: pharmacy, prescription number,
handed-over date); fills are not matched by their content here, as two real fills of one drug
on one day (two pharmacies, say) must both count. What cannot be read is reported in
``PdcResult.issues``, never guessed.

**Refill gaps and late refills**: between one fill and the next, the days no supply was on hand
(after shifting, across the whole group); a refill is *late* when that gap is longer than
``late_after_days`` (7 unless told): the supply ran out more than N days before the refill.

**Overdue MAT refills** (:func:`overdue_mat`): after discharge nobody in the program sees the
client; a medication-assisted-treatment supply that ran out more than ``grace_days`` ago raises
a FHIR ``Flag`` for the care team and the aftercare provider (delivered through the outbox).

The FHIR shapes (codes, identifiers, extensions) are described in docs/adherence.md.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

from iop_fhir import terminology
from iop_fhir.errors import Issue, RecordInvalid
from iop_fhir.mappers.datatypes import (
    as_dict,
    as_list,
    code_in,
    coding,
    concept,
    concept_text,
    drop_empty,
    fhir_date,
    fhir_datetime,
    nonblank,
    own_extensions,
    parse_date,
    quantity_parts,
    ucum_quantity,
    where,
)
from iop_fhir.mappers.ids import resource_id
from iop_fhir.mappers.medication_request import ORDER_INTENTS
from iop_fhir.mappers.observation import ADHERENCE_SOURCE, THERAPY
from iop_fhir.mappers.observation_common import fresh, label
from iop_fhir.mappers.report import MappingReport
from iop_fhir.store.search_index import parse_reference
from iop_fhir.terminology import RXNORM, code_system

JSON = dict[str, Any]
DAY = dt.timedelta(days=1)

DEFAULT_LATE_AFTER_DAYS = 7

# Identifier kinds under the program's identifier base ({base}/{kind}), like the mappers' own.
PDC_KIND = "pdc"
MAT_FLAG_KIND = "mat-refill-overdue"

# No LOINC or SNOMED CT concept for a fill-based PDC was found (LOINC 71799-1 is the *reported*
# adherence the record's adherence items carry, and the reverse mapper reads that code as one):
# a project code, beside the adherence Observations' category and method code systems.
ADHERENCE_MEASURE = code_system("adherence-measure")
PDC_CODE = coding(ADHERENCE_MEASURE, "pdc", "Proportion of days covered")
# method: the record's adherence-source code system already has "pharmacy-fill".
PHARMACY_FILL = coding(ADHERENCE_SOURCE, "pharmacy-fill", label("pharmacy-fill"))
DRUG_CLASS = code_system("drug-class")
# Displays of the terminology table's drug classes (codes.json medications[].class).
DRUG_CLASS_DISPLAY = {
    "antidepressant": "Antidepressant",
    "mood-stabiliser": "Mood stabiliser",
    "antipsychotic": "Antipsychotic",
    "anxiolytic": "Anxiolytic",
    "moud": "Medication for opioid use disorder",
    "aud": "Medication for alcohol use disorder",
    "withdrawal": "Withdrawal management",
    "adjunct": "Adjunct",
}
ADHERENCE_ALERT = code_system("adherence-alert")
MAT_OVERDUE_CODE = coding(ADHERENCE_ALERT, "mat-refill-overdue", "Medication-assisted treatment refill overdue")
# R4 flag-category (http://hl7.org/fhir/R4/valueset-flag-category.html): "drug", flags related
# to the subject's medications.
FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"
# R4 core extensions: the dispenses a PDC was computed from (Observation.derivedFrom may not
# point at a MedicationDispense in R4), and the records behind a Flag.
SUPPORTING_INFO = "http://hl7.org/fhir/StructureDefinition/workflow-supportingInfo"
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"

# MedicationDispense.status values under which supply reached the patient.
HANDED_OVER = "completed"
PARTIAL = "in-progress"  # a partial fill handed over, the balance owed (NCPDP PartiallyDispensed)
DAYS_PER_UNIT = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7}
# Above this (close to three years) a days supply is a data error, not a supply to count.
MAX_DAYS_SUPPLY = 999
PERCENT = Decimal("0.1")


# --- what the computation sees -------------------------------------------------------------------


@dataclass(frozen=True)
class Fill:
    """One dispense that put supply in the patient's hands."""

    handed_over: dt.date
    days_supply: int
    dispense: str | None  # "MedicationDispense/{id}", None when the dispense has no id
    prescriptions: tuple[str, ...]  # "MedicationRequest/{id}" of authorizingPrescription
    rxnorm: str | None
    drug: str | None  # the terminology's ingredient: fills of one drug shift, others overlap
    drug_class: str | None

    def sort_key(self) -> tuple[Any, ...]:
        """A total order on content, so results never depend on the order dispenses came in."""
        return (
            self.handed_over,
            self.days_supply,
            self.dispense or "",
            self.prescriptions,
            self.rxnorm or "",
            self.drug or "",
            self.drug_class or "",
        )


@dataclass(frozen=True)
class Supply:
    """The days one fill covers once early refills are shifted: ``start`` to ``end``, inclusive."""

    fill: Fill
    start: dt.date
    end: dt.date


@dataclass(frozen=True)
class RefillGap:
    """Days without supply before a refill: ``supply_ended`` is the last covered day."""

    supply_ended: dt.date
    refill: Fill
    days: int
    late: bool


@dataclass(frozen=True)
class Adherence:
    """PDC and refill gaps of one prescription or one drug class over the window."""

    scope: str  # "prescription" | "class"
    key: str  # "MedicationRequest/{id}" or the drug class code
    window: tuple[dt.date, dt.date]
    index_date: dt.date  # first fill in the window: the measurement period starts here
    days_in_period: int
    days_covered: int
    fills: tuple[Fill, ...]
    supply: tuple[Supply, ...]
    gaps: tuple[RefillGap, ...]

    @property
    def pdc(self) -> Fraction:
        """Days covered / days in the period, exact (0 to 1)."""
        return Fraction(self.days_covered, self.days_in_period)

    @property
    def percent(self) -> Decimal:
        """PDC as a percentage with one decimal (half up): what the Observation carries."""
        return (Decimal(self.days_covered * 100) / Decimal(self.days_in_period)).quantize(PERCENT, ROUND_HALF_UP)

    @property
    def late_refills(self) -> tuple[RefillGap, ...]:
        return tuple(g for g in self.gaps if g.late)

    @property
    def supply_ends(self) -> dt.date:
        """The last day with supply on hand (may lie after the window)."""
        return max(s.end for s in self.supply)

    @property
    def prescriptions(self) -> tuple[str, ...]:
        return tuple(sorted({p for f in self.fills for p in f.prescriptions}))

    @property
    def dispenses(self) -> tuple[str, ...]:
        return tuple(sorted({f.dispense for f in self.fills if f.dispense}))


@dataclass(frozen=True)
class PdcResult:
    """Adherence per prescription and per drug class, and what could not be read."""

    window: tuple[dt.date, dt.date]
    by_prescription: Mapping[str, Adherence]
    by_class: Mapping[str, Adherence]
    issues: tuple[Issue, ...] = field(default=())


# --- reading dispenses ---------------------------------------------------------------------------


def _reference_id(reference: Any) -> str | None:
    """The id a literal Reference names: ``Type/id``, an absolute URL, or ``urn:uuid:id``."""
    text = nonblank(as_dict(reference).get("reference"))
    found = parse_reference(text) if text else None
    if found is None:
        return None
    return found[1].removeprefix("urn:uuid:")


def _rxnorm(resource: JSON) -> str | None:
    """The RxNorm code of a dispense or request: medicationCodeableConcept or a contained Medication."""
    code = code_in(resource.get("medicationCodeableConcept"), RXNORM)
    if code is None:
        ref = nonblank(as_dict(resource.get("medicationReference")).get("reference"))
        if ref and ref.startswith("#"):
            contained = (as_dict(c) for c in as_list(resource.get("contained")))
            medication = next((c for c in contained if c.get("resourceType") == "Medication" and c.get("id") == ref[1:]), {})
            code = code_in(medication.get("code"), RXNORM)
    return code


def _days_supply(dispense: JSON, report: MappingReport) -> int | None:
    parts = quantity_parts(as_dict(dispense.get("daysSupply")))
    if parts is None:
        report.warning(where(dispense, "daysSupply"), "no days supply: the days this fill covers are unknown; not counted")
        return None
    amount, unit = parts
    per = DAYS_PER_UNIT.get(unit.strip().lower())
    days = amount * per if per is not None and amount.is_finite() else None
    if days is None or days != days.to_integral_value() or not 1 <= days <= MAX_DAYS_SUPPLY:
        report.warning(
            where(dispense, "daysSupply"), f"days supply {amount} {unit} is not a whole number of days from 1 to {MAX_DAYS_SUPPLY}; not counted"
        )
        return None
    return int(days)


def _fill_day(dispense: JSON, status: str, report: MappingReport) -> dt.date | None:
    day = parse_date(dispense.get("whenHandedOver"))
    if day is not None:
        return day
    if status == HANDED_OVER:
        day = parse_date(dispense.get("whenPrepared"))
        if day is not None:
            report.info(where(dispense, "whenPrepared"), "no whenHandedOver: the day it was prepared is taken as the fill day")
            return day
    report.warning(where(dispense, "whenHandedOver"), "no full date it was handed over; not counted")
    return None


def _read_fill(dispense: Any, report: MappingReport) -> Fill | None:
    """A counted fill, or None (reported) for a dispense that put no known supply in hand."""
    if not isinstance(dispense, dict) or dispense.get("resourceType") != "MedicationDispense":
        report.error(where(as_dict(dispense)), "not a MedicationDispense; skipped", code="structure")
        return None
    status = dispense.get("status")
    if status not in (HANDED_OVER, PARTIAL):
        report.info(where(dispense, "status"), f"status {status!r}: nothing handed over; not counted")
        return None
    if status == PARTIAL and parse_date(dispense.get("whenHandedOver")) is None:
        report.info(where(dispense, "status"), "in progress and not handed over yet; not counted")
        return None
    day, days = _fill_day(dispense, status, report), _days_supply(dispense, report)
    if day is None or days is None:
        return None
    rxnorm = _rxnorm(dispense)
    known = terminology.medication(rxnorm) if rxnorm else None
    prescriptions = tuple(sorted({f"MedicationRequest/{i}" for r in as_list(dispense.get("authorizingPrescription")) if (i := _reference_id(r))}))
    if known is None:
        why = f"RxNorm {rxnorm} is not in the terminology's drug table" if rxnorm else "no RxNorm code"
        report.info(where(dispense, "medication[x]"), f"{why}: no drug class; counted for its prescription only")
    rid = nonblank(dispense.get("id"))
    return Fill(
        handed_over=day,
        days_supply=days,
        dispense=f"MedicationDispense/{rid}" if rid else None,
        prescriptions=prescriptions,
        rxnorm=rxnorm,
        drug=known["ingredient"] if known else None,
        drug_class=known["class"] if known else None,
    )


def _canonical(resource: Any) -> str:
    return json.dumps(resource, sort_keys=True, default=str)


def read_fills(dispenses: Iterable[Any], report: MappingReport) -> list[Fill]:
    """The fills among ``dispenses``, each dispense once, in a fixed order; problems go to ``report``.

    Dispenses are read in a canonical order (their JSON, keys sorted), so which of two copies is
    kept, and the order of the issues, never depend on the order they were given in.
    """
    seen: set[tuple[str, str]] = set()
    fills = []
    for dispense in sorted(dispenses, key=_canonical):
        keys = _identity(dispense)
        if keys & seen:
            report.info(where(as_dict(dispense)), "the same dispense was given twice; counted once")
            continue
        seen |= keys
        fill = _read_fill(dispense, report)
        if fill is not None:
            fills.append(fill)
    return sorted(fills, key=Fill.sort_key)


def _identity(dispense: Any) -> set[tuple[str, str]]:
    """What makes two dispenses the same: the resource id, and the first identifier with a system
    (the key the store holds unique, and the pharmacy + fill number the NCPDP mapping writes)."""
    dispense = as_dict(dispense)
    out = set()
    rid = nonblank(dispense.get("id"))
    if rid:
        out.add((f"{dispense.get('resourceType')}/", rid))
    for ident in as_list(dispense.get("identifier")):
        system, value = as_dict(ident).get("system"), as_dict(ident).get("value")
        if isinstance(system, str) and isinstance(value, str) and value:
            out.add((system, value))
            break
    return out


# --- supply, coverage and gaps -------------------------------------------------------------------


def _later(day: dt.date, days: int) -> dt.date:
    """``day`` + ``days``, held at the last representable day (a fill dated 9999 must not crash)."""
    try:
        return day + days * DAY
    except OverflowError:
        return dt.date.max


def supply_of(fills: Sequence[Fill], drug_of: Callable[[Fill], Hashable]) -> tuple[Supply, ...]:
    """The days each fill covers, fills in order: a fill of a drug still on hand starts the day
    after that drug's supply runs out; fills of different drugs (``drug_of``) do not shift."""
    on_hand_until: dict[Hashable, dt.date] = {}  # per drug: the first day without supply
    out = []
    for fill in fills:
        drug = drug_of(fill)
        start = max(fill.handed_over, on_hand_until.get(drug, fill.handed_over))
        end = _later(start, fill.days_supply - 1)
        on_hand_until[drug] = _later(end, 1)
        out.append(Supply(fill, start, end))
    return tuple(out)


def days_covered(supply: Iterable[Supply], first: dt.date, last: dt.date) -> int:
    """Days from ``first`` to ``last`` (inclusive) on which some supply was on hand, each once."""
    spans = sorted((max(s.start, first), min(s.end, last)) for s in supply if s.end >= first and s.start <= last)
    covered, reached = 0, None  # ``reached``: the last day already counted
    for start, end in spans:
        if reached is None or end > reached:
            begin = start if reached is None or start > reached else reached + DAY
            covered += (end - begin).days + 1
            reached = end
    return covered


def refill_gaps(supply: Sequence[Supply], late_after_days: int) -> tuple[RefillGap, ...]:
    """Before each refill, the days no earlier fill covered; late when more than ``late_after_days``.

    ``supply`` is in fill order; a fill's supply never starts before its fill day, so the days
    between the furthest supply end so far and the next fill day are all uncovered.
    """
    gaps = []
    reached: dt.date | None = None
    for s in supply:
        if reached is not None and (s.fill.handed_over - reached).days > 1:
            days = (s.fill.handed_over - reached).days - 1
            gaps.append(RefillGap(reached, s.fill, days, days > late_after_days))
        reached = s.end if reached is None else max(reached, s.end)
    return tuple(gaps)


def _adherence(
    scope: str, key: str, fills: list[Fill], window: tuple[dt.date, dt.date], drug_of: Callable[[Fill], Hashable], late_after_days: int
) -> Adherence:
    index = fills[0].handed_over
    supply = supply_of(fills, drug_of)
    return Adherence(
        scope=scope,
        key=key,
        window=window,
        index_date=index,
        days_in_period=(window[1] - index).days + 1,
        days_covered=days_covered(supply, index, window[1]),
        fills=tuple(fills),
        supply=supply,
        gaps=refill_gaps(supply, late_after_days),
    )


def _same_drug(_fill: Fill) -> Hashable:
    """Per prescription every fill is one drug (a brand/generic swap included): all shift."""
    return ""


def _ingredient(fill: Fill) -> Hashable:
    return fill.drug


def _check_window(window: Any) -> tuple[dt.date, dt.date]:
    ok = (
        isinstance(window, tuple)
        and len(window) == 2
        and all(isinstance(d, dt.date) and not isinstance(d, dt.datetime) for d in window)
        and window[0] <= window[1]
    )
    if not ok:
        raise RecordInvalid(
            "window must be (first day, last day) as dates, first <= last",
            [Issue(f"window {window!r} must be two dates, the first not after the last", location="window", code="value")],
        )
    return window


def _check_days(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecordInvalid(f"{name} must be a whole number of days >= 0", [Issue(f"{name} {value!r} is not a whole number of days >= 0", location=name, code="value")])
    return value


def pdc(dispenses: Iterable[Any], *, window: tuple[dt.date, dt.date], late_after_days: int = DEFAULT_LATE_AFTER_DAYS) -> PdcResult:
    """Proportion of days covered, refill gaps and late refills over ``window`` (first and last
    day, inclusive), per prescription and per drug class (method: the module docstring).

    A prescription or class without a fill in the window has no entry. Dispenses that cannot be
    counted are reported in ``issues`` with their location, and left out.

    :raises RecordInvalid: for a malformed ``window`` or ``late_after_days``.
    """
    window = _check_window(window)
    late_after_days = _check_days(late_after_days, "late_after_days")
    report = MappingReport()
    fills = [f for f in read_fills(dispenses, report) if window[0] <= f.handed_over <= window[1]]
    per_prescription: dict[str, list[Fill]] = {}
    per_class: dict[str, list[Fill]] = {}
    for fill in fills:
        if not fill.prescriptions and not fill.drug_class:
            report.info(fill.dispense or "MedicationDispense", "no authorizingPrescription and no drug class: counted in no group")
        for prescription in fill.prescriptions:
            per_prescription.setdefault(prescription, []).append(fill)
        if fill.drug_class:
            per_class.setdefault(fill.drug_class, []).append(fill)
    return PdcResult(
        window=window,
        by_prescription={k: _adherence("prescription", k, v, window, _same_drug, late_after_days) for k, v in sorted(per_prescription.items())},
        by_class={k: _adherence("class", k, v, window, _ingredient, late_after_days) for k, v in sorted(per_class.items())},
        issues=tuple(report.issues),
    )


# --- PDC as Observations -------------------------------------------------------------------------


def _identifier(identifier_base: str, kind: str, value: str) -> tuple[JSON, str]:
    """Our business identifier under the program's base and the resource id derived from it
    (mappers/ids.py: the same name-based UUID scheme, so a recomputation updates the resource)."""
    system = f"{identifier_base.rstrip('/')}/{kind}"
    return {"use": "usual", "system": system, "value": value}, system


def _patient_id(patient_ref: Any) -> str:
    """The id in a Patient reference (``Patient/{id}``, a URL to one, or ``urn:uuid:{id}``)."""
    found = parse_reference(patient_ref) if isinstance(patient_ref, str) else None
    if found is None or found[0] not in ("Patient", None) or (found[0] is None and not patient_ref.startswith("urn:uuid:")):
        raise RecordInvalid("the patient reference must name a Patient", [Issue(f"{patient_ref!r} is not a Patient reference", location="patient_ref", code="value")])
    return found[1].removeprefix("urn:uuid:")


def _component(code: str, display: str, **value: Any) -> JSON:
    return {"code": concept(coding(ADHERENCE_MEASURE, code, display)), **value}


def _days(value: int) -> JSON:
    return ucum_quantity(value, "d", "days")


def _observation(a: Adherence, patient_ref: str, patient_id: str, issued: str | None, identifier_base: str) -> JSON:
    start, end = (fhir_date(d) for d in a.window)
    if a.scope == "prescription":
        value = f"{a.key.removeprefix('MedicationRequest/')}/{start}/{end}"
        known = next((m for f in a.fills if f.rxnorm and (m := terminology.medication(f.rxnorm))), None)
        what = f"Proportion of days covered by pharmacy fills: {known['display']}" if known else "Proportion of days covered by pharmacy fills"
    else:
        value = f"{patient_id}/{a.key}/{start}/{end}"
        what = f"Proportion of days covered by pharmacy fills: {DRUG_CLASS_DISPLAY.get(a.key, label(a.key)).lower()}"
    identifier, system = _identifier(identifier_base, PDC_KIND, value)
    components = [
        _component("index-date", "Index date (first fill in the window)", valueDateTime=fhir_date(a.index_date)),
        _component("days-covered", "Days covered", valueQuantity=_days(a.days_covered)),
        _component("days-in-period", "Days in the measurement period", valueQuantity=_days(a.days_in_period)),
        _component("refill-gaps", "Refill gaps", valueInteger=len(a.gaps)),
        _component("late-refills", "Late refills", valueInteger=len(a.late_refills)),
        _component("supply-ends", "Last day with supply on hand", valueDateTime=fhir_date(a.supply_ends)),
    ]
    if a.scope == "class":
        display = DRUG_CLASS_DISPLAY.get(a.key, label(a.key))
        components.append(_component("drug-class", "Drug class", valueCodeableConcept=concept(coding(DRUG_CLASS, a.key, display))))
    resource = {
        "resourceType": "Observation",
        "id": resource_id("Observation", system, value),
        "extension": [{"url": SUPPORTING_INFO, "valueReference": {"reference": d}} for d in a.dispenses],
        "identifier": [identifier],
        "status": "final",
        "category": fresh(THERAPY),
        "code": concept(dict(PDC_CODE), text=what),
        "subject": {"reference": patient_ref},
        "focus": [{"reference": p} for p in a.prescriptions],
        "effectivePeriod": {"start": start, "end": end},
        "issued": issued,
        "valueQuantity": ucum_quantity(a.percent, "%"),
        "method": concept(dict(PHARMACY_FILL)),
        "component": components,
    }
    return drop_empty(resource)


def adherence_observations(result: PdcResult, patient_ref: str, *, as_of: dt.date | dt.datetime, identifier_base: str) -> list[JSON]:
    """One Observation per prescription, then one per drug class, of ``result`` (see docs/adherence.md).

    Identifiers (and so ids) derive from the prescription or patient + class and the window: the
    same window computed again (new fills arrived) updates the Observation, never duplicates it.
    ``as_of`` (an aware datetime) is written as ``issued``; a plain date writes none, as FHIR's
    instant needs a time.

    :raises RecordInvalid: when the window ends after ``as_of`` (future days would count as
        uncovered), when ``as_of`` is a naive datetime, or ``patient_ref`` names no Patient.
    """
    patient_id = _patient_id(patient_ref)
    issued = None
    if isinstance(as_of, dt.datetime):
        if as_of.tzinfo is None:
            raise RecordInvalid("as_of must carry its UTC offset", [Issue("as_of is a datetime without UTC offset", location="as_of", code="value")])
        issued = fhir_datetime(as_of)
    day = as_of.date() if isinstance(as_of, dt.datetime) else as_of
    if result.window[1] > day:
        raise RecordInvalid(
            "the window ends after as_of",
            [Issue(f"window ends {result.window[1]} after as_of {day}: days still to come would count as uncovered", location="window", code="value")],
        )
    groups = [*result.by_prescription.values(), *result.by_class.values()]
    return [_observation(a, patient_ref, patient_id, issued, identifier_base) for a in groups]


# --- overdue medication-assisted treatment -------------------------------------------------------


@dataclass(frozen=True)
class _MatDrug:
    """One MAT drug the client is to keep taking after discharge, and its active orders."""

    key: str  # the ingredient, else "rxnorm-{code}", else the medication text
    name: str  # what a clinician reads in the Flag
    orders: tuple[str, ...]  # "MedicationRequest/{id}"
    written: dt.date | None  # the first active order's authoredOn


@dataclass(frozen=True)
class Lapse:
    """A time without MAT supply: from ``runs_out`` (first day without) to ``refilled`` (None: still open).

    ``supply_ended`` is the last day with supply, None when nothing was dispensed since the order
    was written (then ``runs_out`` is the day it was written).
    """

    runs_out: dt.date
    supply_ended: dt.date | None
    refilled: dt.date | None


def _drug_key(resource: JSON) -> tuple[str | None, str | None]:
    """(key, name) of a request's drug: the terminology ingredient, else its RxNorm code or text."""
    rxnorm = _rxnorm(resource)
    known = terminology.medication(rxnorm) if rxnorm else None
    if known:
        return known["ingredient"], known["ingredient"]
    text = concept_text(resource.get("medicationCodeableConcept"))
    if rxnorm:
        return f"rxnorm-{rxnorm}", text or f"RxNorm {rxnorm}"
    return (text.lower(), text) if text else (None, None)


def is_mat(request: JSON) -> bool:
    """MAT by our extension, or by the drug (the terminology's ``mat``: buprenorphine, methadone,
    naltrexone, acamprosate, disulfiram); the record's validation keeps the two in step."""
    flag = as_dict(own_extensions(request).get("medication-assisted-treatment")).get("valueBoolean")
    rxnorm = _rxnorm(request)
    known = terminology.medication(rxnorm) if rxnorm else None
    return flag is True or bool(known and known["mat"])


def _stopped_at_discharge(requests: list[JSON]) -> set[str]:
    """Prescriptions the discharge list stops: a plan (discharge-medication) entry with status
    stopped whose priorPrescription is the prescription (mappers/medication_request.py)."""
    out = set()
    for r in requests:
        if r.get("intent") == "plan" and r.get("status") == "stopped":
            prior = _reference_id(r.get("priorPrescription"))
            if prior:
                out.add(f"MedicationRequest/{prior}")
    return out


def _patient_of(requests: list[JSON]) -> str:
    """The one patient the requests are for (references in any form naming the same id agree)."""
    refs = sorted({ref for r in requests if (ref := nonblank(as_dict(r.get("subject")).get("reference")))})
    if len({_patient_id(ref) for ref in refs}) != 1:
        why = "no request names its patient (subject)" if not refs else f"requests of several patients: {', '.join(refs)}"
        raise RecordInvalid(f"overdue_mat takes the requests of one patient: {why}", [Issue(why, location="MedicationRequest.subject", code="value")])
    return refs[0]


def _mat_drugs(requests: list[JSON], report: MappingReport) -> tuple[list[_MatDrug], dict[str, str]]:
    """The MAT drugs with an active order not stopped at discharge, and prescription -> drug key
    for every MAT request (any status), so fills of a replaced order still count for its drug."""
    stopped = _stopped_at_discharge(requests)
    by_drug: dict[str, list[JSON]] = {}
    names: dict[str, str] = {}
    drug_of_request: dict[str, str] = {}
    for r in requests:
        rid = nonblank(r.get("id"))
        if not rid or r.get("intent") not in ORDER_INTENTS or not is_mat(r):
            continue
        key, name = _drug_key(r)
        if key is None or name is None:
            report.warning(where(r, "medication[x]"), "MAT order without RxNorm code or text: its drug is unknown; not followed")
            continue
        ref = f"MedicationRequest/{rid}"
        drug_of_request[ref] = key
        if r.get("status") == "active" and ref not in stopped:
            by_drug.setdefault(key, []).append(r)
            names.setdefault(key, name)
    drugs = []
    for key, orders in sorted(by_drug.items()):
        written = sorted(d for r in orders if (d := parse_date(r.get("authoredOn"))) is not None)
        refs = tuple(sorted(f"MedicationRequest/{r['id']}" for r in orders))
        drugs.append(_MatDrug(key, names[key], refs, written[0] if written else None))
    return drugs, drug_of_request


def lapses(supply: Sequence[Supply], written: dt.date | None, as_of: dt.date) -> list[Lapse]:
    """The times without supply, in order, up to ``as_of``: before the first fill (when the order
    was written earlier), between fills, and after the last one (open)."""
    out = []
    reached: dt.date | None = None
    if written is not None and (not supply or supply[0].fill.handed_over > written):
        first = supply[0].fill.handed_over if supply else None
        out.append(Lapse(written, None, first))
    for s in supply:
        if reached is not None and (s.fill.handed_over - reached).days > 1:
            out.append(Lapse(reached + DAY, reached, s.fill.handed_over))
        reached = s.end if reached is None else max(reached, s.end)
    if reached is not None and reached < as_of:
        out.append(Lapse(reached + DAY, reached, None))
    return out


def _flag(drug: _MatDrug, lapse: Lapse, overdue_from: dt.date, patient_ref: str, fills: list[Fill], identifier_base: str) -> JSON:
    patient_id = _patient_id(patient_ref)
    value = f"{patient_id}/{drug.key}"
    identifier, system = _identifier(identifier_base, MAT_FLAG_KIND, value)
    if lapse.supply_ended is not None:
        text = f"MAT refill overdue: {drug.name}, last supply ended {fhir_date(lapse.supply_ended)}"
    else:
        text = f"MAT refill overdue: {drug.name}, nothing dispensed since it was written on {fhir_date(lapse.runs_out)}"
    last_fill = next((f.dispense for f in reversed(fills) if f.dispense and f.handed_over < lapse.runs_out), None)
    details = [*drug.orders, *([last_fill] if last_fill else [])]
    resource = {
        "resourceType": "Flag",
        "id": resource_id("Flag", system, value),
        "extension": [{"url": FLAG_DETAIL, "valueReference": {"reference": d}} for d in details],
        "identifier": [identifier],
        "status": "active" if lapse.refilled is None else "inactive",
        "category": [concept(coding(FLAG_CATEGORY, "drug", "Drug"))],
        "code": concept(dict(MAT_OVERDUE_CODE), text=text),
        "subject": {"reference": patient_ref},
        "period": drop_empty({"start": fhir_date(overdue_from), "end": fhir_date(lapse.refilled) if lapse.refilled else None}),
    }
    return drop_empty(resource)


def overdue_mat(
    requests: Iterable[Any],
    dispenses: Iterable[Any],
    *,
    as_of: dt.date | dt.datetime,
    discharge_date: dt.date,
    grace_days: int,
    identifier_base: str,
    report: MappingReport | None = None,
) -> list[JSON]:
    """Flags for medication-assisted treatment whose supply ran out more than ``grace_days``
    before ``as_of``, on or after ``discharge_date`` (one patient's requests and dispenses).

    Followed: each MAT drug (by our ``medication-assisted-treatment`` extension or the
    terminology's ``mat``) with an *active* order (intent order) the discharge list did not stop.
    Its supply is every fill of that drug up to ``as_of`` (by RxNorm ingredient, or through the
    order a dispense authorizes, a replaced order's included), shifted like PDC. A lapse starts
    the day supply runs out (or the day the order was written, if nothing was dispensed since);
    it is overdue from ``grace_days`` + 1 days later.

    One Flag per patient and drug (identifier ``{patient id}/{drug}``), for the latest lapse
    overdue after discharge: ``active`` while it lasts, ``inactive`` (period end = the refill)
    once refilled, so computing again updates the Flag the care team holds instead of adding
    one. Before ``discharge_date`` the program sees the client itself: no Flags.

    Dispenses and orders that cannot be read are reported to ``report`` when one is given
    (the same findings as :func:`pdc` for the dispenses).

    :raises RecordInvalid: when the requests name no patient or several, or for a negative
        ``grace_days``.
    """
    grace_days = _check_days(grace_days, "grace_days")
    as_of = as_of.date() if isinstance(as_of, dt.datetime) else as_of
    requests = [r for r in requests if isinstance(r, dict) and r.get("resourceType") == "MedicationRequest"]
    if as_of < discharge_date or not requests:
        return []
    patient_ref = _patient_of(requests)
    report = report if report is not None else MappingReport()
    drugs, drug_of_request = _mat_drugs(requests, report)
    fills = [f for f in read_fills(dispenses, report) if f.handed_over <= as_of]
    out = []
    for drug in drugs:
        mine = [f for f in fills if f.drug == drug.key or any(drug_of_request.get(p) == drug.key for p in f.prescriptions)]
        overdue = [
            (lapse, start)
            for lapse in lapses(supply_of(mine, _same_drug), drug.written, as_of)
            if (start := _later(lapse.runs_out, grace_days + 1)) <= as_of
            and (lapse.refilled is None or lapse.refilled > max(start, discharge_date))
        ]
        if overdue:
            lapse, start = overdue[-1]
            out.append(_flag(drug, lapse, start, patient_ref, mine, identifier_base))
    return out


__all__ = [
    "DEFAULT_LATE_AFTER_DAYS",
    "Adherence",
    "Fill",
    "Lapse",
    "PdcResult",
    "RefillGap",
    "Supply",
    "adherence_observations",
    "days_covered",
    "is_mat",
    "lapses",
    "overdue_mat",
    "pdc",
    "read_fills",
    "refill_gaps",
    "supply_of",
]
