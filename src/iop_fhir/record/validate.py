"""Validation of IOP records: shape (pydantic) plus the rules that span fields and items.

``validate_record(data)`` returns an ``IopRecord`` or raises ``RecordInvalid`` whose issues
list *every* violation, each with the JSON pointer of the field (``/prescriptions/2/refills``).
Pure: no clock, no I/O, so the same record always gets the same verdict.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from iop_fhir import terminology
from iop_fhir.errors import IssueList, RecordInvalid
from iop_fhir.record.model import RECORD_VERSION, TEXT_PATTERN, Assessment, IopRecord

DOSE_UNITS = frozenset({"mg", "g", "ug", "mL", "{tbl}", "{Capsule}", "{spray}", "{Package}", "{patch}", "1"})
INACTIVE_PRESCRIPTION = frozenset({"stopped", "completed", "cancelled", "entered-in-error"})
DISPENSING_PHARMACIES_FOR_METHADONE_OUD = frozenset({"opioid-treatment-program"})


def pointer(loc: Iterable[Any]) -> str:
    """JSON pointer (RFC 6901) for a pydantic location tuple."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in loc]
    return "/" + "/".join(parts) if parts else ""


def validate_record(data: Any) -> IopRecord:
    """Parse and check one record; raise ``RecordInvalid`` listing every violation."""
    issues = IssueList()
    if not isinstance(data, dict):
        raise RecordInvalid("an IOP record must be a JSON object", _one("", "expected a JSON object"))
    version = data.get("version", RECORD_VERSION)
    if version != RECORD_VERSION:
        issues.add("/version", f"unsupported record version {version!r}; this gateway reads {RECORD_VERSION!r}", code="not-supported")
        raise RecordInvalid("unsupported record version", issues.issues)
    try:
        record = IopRecord.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            issues.add(pointer(err["loc"]), _pydantic_message(err), code="required" if err["type"] == "missing" else "value")
        raise RecordInvalid(f"IOP record invalid: {len(issues.issues)} problem(s)", issues.issues) from None
    check_rules(record, issues)
    if issues.errors:
        raise RecordInvalid(f"IOP record {record.id} invalid: {len(issues.errors)} problem(s)", issues.issues)
    return record


def _one(location: str, message: str) -> list:
    issues = IssueList()
    issues.add(location, message)
    return issues.issues


def _pydantic_message(err: dict[str, Any]) -> str:
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "extra_forbidden":
        return "unknown field (the contract does not define it)"
    if err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == TEXT_PATTERN:
        return "text needs a visible character and no control characters other than tab, CR and LF"
    return str(err["msg"])


# --- the cross-field rules -------------------------------------------------------------------


def check_rules(record: IopRecord, issues: IssueList) -> None:
    """Append every cross-field violation of ``record`` to ``issues``."""
    _unique_ids(record, issues)
    _references(record, issues)
    _dates(record, issues)
    _parties(record, issues)
    _prescriptions(record, issues)
    _reviews(record, issues)
    _assessments(record, issues)
    _measurements(record, issues)
    _discharge(record, issues)


def _unique_ids(record: IopRecord, issues: IssueList) -> None:
    collections = [
        "diagnoses", "care_team", "pharmacies", "providers", "prescriptions", "medication_reviews", "adherence",
        "side_effects", "assessments", "drug_screens", "vitals", "drug_levels", "sessions", "consents",
    ]
    for name in collections:
        _no_duplicates(getattr(record, name), f"/{name}", issues)
    if record.care_plan:
        _no_duplicates(record.care_plan.goals, "/care_plan/goals", issues)
        _no_duplicates(record.care_plan.activities, "/care_plan/activities", issues)
    both = {p.id for p in record.providers} & {p.id for p in record.pharmacies}
    for i, provider in enumerate(record.providers):
        if provider.id in both:
            issues.add(f"/providers/{i}/id", f"id {provider.id!r} is used by a pharmacy too; recipients would be ambiguous")


def _no_duplicates(items: list[Any], path: str, issues: IssueList) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item.id in seen:
            issues.add(f"{path}/{i}/id", f"duplicate id {item.id!r}")
        seen.add(item.id)


def _references(record: IopRecord, issues: IssueList) -> None:
    team = {m.id for m in record.care_team}
    pharmacies = {p.id for p in record.pharmacies}
    providers = {p.id for p in record.providers}
    diagnoses = {d.id for d in record.diagnoses}
    prescriptions = {p.id for p in record.prescriptions}

    def ref(value: str | None, known: set[str], path: str, what: str) -> None:
        if value is not None and value not in known:
            issues.add(path, f"{value!r} does not name any {what} in this record", code="value")

    for i, p in enumerate(record.prescriptions):
        base = f"/prescriptions/{i}"
        ref(p.prescriber_id, team, f"{base}/prescriber_id", "care_team member")
        ref(p.pharmacy_id, pharmacies, f"{base}/pharmacy_id", "pharmacy")
        ref(p.indication_id, diagnoses, f"{base}/indication_id", "diagnosis")
        ref(p.replaces_id, prescriptions, f"{base}/replaces_id", "prescription")
        if p.replaces_id == p.id:
            issues.add(f"{base}/replaces_id", "a prescription cannot replace itself")
    for i, r in enumerate(record.medication_reviews):
        base = f"/medication_reviews/{i}"
        ref(r.prescription_id, prescriptions, f"{base}/prescription_id", "prescription")
        ref(r.new_prescription_id, prescriptions, f"{base}/new_prescription_id", "prescription")
        ref(r.reviewer_id, team, f"{base}/reviewer_id", "care_team member")
    for name in ("adherence", "side_effects"):
        for i, item in enumerate(getattr(record, name)):
            ref(item.prescription_id, prescriptions, f"/{name}/{i}/prescription_id", "prescription")
    for i, level in enumerate(record.drug_levels):
        ref(level.prescription_id, prescriptions, f"/drug_levels/{i}/prescription_id", "prescription")
    for i, a in enumerate(record.assessments):
        ref(a.performer_id, team, f"/assessments/{i}/performer_id", "care_team member")
    for i, s in enumerate(record.sessions):
        ref(s.clinician_id, team, f"/sessions/{i}/clinician_id", "care_team member")
    if plan := record.care_plan:
        goals = {g.id for g in plan.goals}
        ref(plan.author_id, team, "/care_plan/author_id", "care_team member")
        for j, d in enumerate(plan.addresses_ids):
            ref(d, diagnoses, f"/care_plan/addresses_ids/{j}", "diagnosis")
        for i, g in enumerate(plan.goals):
            for j, d in enumerate(g.addresses_ids):
                ref(d, diagnoses, f"/care_plan/goals/{i}/addresses_ids/{j}", "diagnosis")
        for i, a in enumerate(plan.activities):
            for j, g in enumerate(a.goal_ids):
                ref(g, goals, f"/care_plan/activities/{i}/goal_ids/{j}", "goal of the care plan")
    if record.discharge and (after := record.discharge.aftercare):
        ref(after.receiving_provider_id, providers, "/discharge/aftercare/receiving_provider_id", "provider")
        ref(after.pharmacy_id, pharmacies, "/discharge/aftercare/pharmacy_id", "pharmacy")
        for i, m in enumerate(after.medications):
            ref(m.prescription_id, prescriptions, f"/discharge/aftercare/medications/{i}/prescription_id", "prescription")
    for i, c in enumerate(record.consents):
        ref(c.recipient_id, providers | pharmacies, f"/consents/{i}/recipient_id", "provider or pharmacy")


def _episode_window(record: IopRecord) -> tuple[dt.date, dt.date | None]:
    end = record.discharge.date if record.discharge else record.enrolment.actual_end
    return record.enrolment.start, end


def _dates(record: IopRecord, issues: IssueList) -> None:
    e = record.enrolment
    if record.client.birth_date >= e.start:
        issues.add("/client/birth_date", "birth date must be before the enrolment start")
    if e.planned_end and e.planned_end < e.start:
        issues.add("/enrolment/planned_end", "planned end is before the enrolment start")
    if e.actual_end and e.actual_end < e.start:
        issues.add("/enrolment/actual_end", "actual end is before the enrolment start")
    if e.status == "finished" and e.actual_end is None:
        issues.add("/enrolment/actual_end", "a finished enrolment needs its actual end date", code="required")
    if e.actual_end is not None and e.status not in ("finished", "cancelled"):
        issues.add("/enrolment/status", f"status {e.status!r} contradicts the actual end date; use finished or cancelled")
    if record.discharge:
        if record.discharge.date < e.start:
            issues.add("/discharge/date", "discharge is before the enrolment start")
        if e.actual_end is None:
            issues.add("/enrolment/actual_end", "a discharged client's enrolment needs its actual end (the discharge date)", code="required")
        elif record.discharge.date != e.actual_end:
            issues.add("/discharge/date", "discharge date differs from the enrolment's actual end")
        if e.status not in ("finished", "cancelled"):
            issues.add("/enrolment/status", "a discharged client's enrolment must be finished or cancelled")

    start, end = _episode_window(record)

    def within(day: dt.date, path: str) -> None:
        if day < start:
            issues.add(path, f"{day.isoformat()} is before the enrolment start {start.isoformat()}")
        elif end is not None and day > end:
            issues.add(path, f"{day.isoformat()} is after the episode ended on {end.isoformat()}")

    for i, r in enumerate(record.medication_reviews):
        within(r.date, f"/medication_reviews/{i}/date")
    for name in ("adherence", "side_effects"):
        for i, item in enumerate(getattr(record, name)):
            within(item.date, f"/{name}/{i}/date")
    for name in ("assessments", "vitals", "drug_levels"):
        for i, item in enumerate(getattr(record, name)):
            within(item.date.date(), f"/{name}/{i}/date")
    for i, s in enumerate(record.drug_screens):
        within(s.collected.date(), f"/drug_screens/{i}/collected")
    for i, s in enumerate(record.sessions):
        within(s.start.date(), f"/sessions/{i}/start")
    for i, d in enumerate(record.diagnoses):
        if d.onset and d.onset < record.client.birth_date:
            issues.add(f"/diagnoses/{i}/onset", "onset is before the client's birth")
    if plan := record.care_plan:
        if plan.period.end and plan.period.end < plan.period.start:
            issues.add("/care_plan/period/end", "plan ends before it starts")
        for i, g in enumerate(plan.goals):
            if g.target and not _in_range(g.target.value, terminology.instrument(g.target.measure)["range"]):
                low, high = terminology.instrument(g.target.measure)["range"]
                issues.add(f"/care_plan/goals/{i}/target/value", f"{g.target.measure} totals lie in {low}-{high}")
            if g.target and g.target.due and g.target.due < plan.period.start:
                issues.add(f"/care_plan/goals/{i}/target/due", "target is due before the plan starts")
    for i, c in enumerate(record.consents):
        base = f"/consents/{i}"
        if c.period.end and c.period.end < c.period.start:
            issues.add(f"{base}/period/end", "consent period ends before it starts")
        if len(set(c.categories)) != len(c.categories):
            issues.add(f"{base}/categories", "a category is listed twice")
        if c.revoked_on and c.revoked_on < c.signed:
            issues.add(f"{base}/revoked_on", "revoked before it was signed")


def ids_base(record: IopRecord) -> str:
    """The base of the identifier systems the program mints (see mappers/ids.py)."""
    return (record.program.identifier_system or f"{terminology.CANONICAL}/sid/{record.program.id}").rstrip("/")


def _in_range(value: int, bounds: list[int]) -> bool:
    return bounds[0] <= value <= bounds[1]


def _parties(record: IopRecord, issues: IssueList) -> None:
    for i, m in enumerate(record.care_team):
        if not npi_is_valid(m.npi):
            issues.add(f"/care_team/{i}/npi", f"NPI {m.npi} fails its Luhn check digit")
        if m.dea_number and not dea_is_valid(m.dea_number):
            issues.add(f"/care_team/{i}/dea_number", f"DEA number {m.dea_number} fails its check digit")
    for name in ("pharmacies", "providers"):
        for i, party in enumerate(getattr(record, name)):
            if party.npi and not npi_is_valid(party.npi):
                issues.add(f"/{name}/{i}/npi", f"NPI {party.npi} fails its Luhn check digit")
    for i, ident in enumerate(record.program.identifiers):
        if ident.system == terminology.NPI:
            issues.add(f"/program/identifiers/{i}/system", "the program's NPI goes in /program/npi")
        elif ident.system.startswith(ids_base(record)):
            issues.add(f"/program/identifiers/{i}/system", "this system is the program's own; the gateway mints those identifiers")
    if record.program.npi and not npi_is_valid(record.program.npi):
        issues.add("/program/npi", f"NPI {record.program.npi} fails its Luhn check digit")
    primaries = [i for i, d in enumerate(record.diagnoses) if d.rank == "primary"]
    if record.diagnoses and len(primaries) != 1:
        issues.add("/diagnoses", f"exactly one diagnosis must be primary; found {len(primaries)}")


def add_months(day: dt.date, months: int) -> dt.date:
    """Calendar months later, clamped to the month's last day (Jan 31 + 1 month = Feb 28/29)."""
    month_index = day.month - 1 + months
    year, month = day.year + month_index // 12, month_index % 12 + 1
    for d in (day.day, 30, 29, 28):
        try:
            return dt.date(year, month, d)
        except ValueError:
            continue
    raise AssertionError("unreachable")


def _prescriptions(record: IopRecord, issues: IssueList) -> None:
    team = {m.id: m for m in record.care_team}
    pharmacies = {p.id: p for p in record.pharmacies}
    replaced = {p.replaces_id for p in record.prescriptions if p.replaces_id}
    for i, p in enumerate(record.prescriptions):
        base = f"/prescriptions/{i}"
        if p.start < p.written:
            issues.add(f"{base}/start", "therapy starts before the prescription was written")
        if p.end and p.end < p.start:
            issues.add(f"{base}/end", "therapy ends before it starts")
        for field, quantity in (("dose", p.dose), ("quantity", p.quantity)):
            if quantity.unit not in DOSE_UNITS:
                issues.add(f"{base}/{field}/unit", f"unit {quantity.unit!r} is not one of {sorted(DOSE_UNITS)} (UCUM)")
        if p.as_needed_reason and not p.as_needed:
            issues.add(f"{base}/as_needed_reason", "a reason for as-needed use given, but as_needed is false")
        known = terminology.medication(p.medication.rxnorm)
        if known and known["dea_schedule"] != p.dea_schedule:
            issues.add(
                f"{base}/dea_schedule",
                f"RxNorm {p.medication.rxnorm} ({known['display']}) is Schedule {known['dea_schedule'] or 'none'}, "
                f"not {p.dea_schedule or 'none'}",
            )
        if known and known["mat"] and not p.mat:
            issues.add(f"{base}/mat", f"{known['display']} is medication-assisted treatment; set mat to true")
        schedule = p.dea_schedule
        if schedule == "II" and p.refills != 0:
            issues.add(f"{base}/refills", "Schedule II prescriptions may not be refilled (21 CFR 1306.12)")
        if schedule in ("III", "IV"):
            if p.refills > 5:
                issues.add(f"{base}/refills", f"Schedule {schedule}: at most 5 refills (21 CFR 1306.22); got {p.refills}")
            if p.end and p.end > add_months(p.written, 6):
                issues.add(f"{base}/end", f"Schedule {schedule}: no fill more than 6 months after it was written (21 CFR 1306.22)")
        prescriber = team.get(p.prescriber_id)
        if schedule and prescriber is not None:
            if prescriber.role not in ("psychiatrist", "nurse-practitioner"):
                issues.add(f"{base}/prescriber_id", f"a {prescriber.role} cannot prescribe a controlled substance")
            elif not prescriber.dea_number:
                issues.add(f"{base}/prescriber_id", "the prescriber of a controlled substance needs a DEA number")
        elif prescriber is not None and prescriber.role not in ("psychiatrist", "nurse-practitioner"):
            issues.add(f"{base}/prescriber_id", f"a {prescriber.role} cannot prescribe")
        if known and known["ingredient"] == "methadone" and p.mat and p.pharmacy_id in pharmacies:
            if pharmacies[p.pharmacy_id].kind not in DISPENSING_PHARMACIES_FOR_METHADONE_OUD:
                issues.add(f"{base}/pharmacy_id", "methadone for opioid use disorder is dispensed only by an opioid treatment program (42 CFR Part 8)")
        if p.id in replaced and p.status not in INACTIVE_PRESCRIPTION and p.status != "on-hold":
            issues.add(f"{base}/status", "a replaced prescription cannot still be active; stop or complete it")


def _reviews(record: IopRecord, issues: IssueList) -> None:
    rx = {p.id: p for p in record.prescriptions}
    for i, r in enumerate(record.medication_reviews):
        base = f"/medication_reviews/{i}"
        old = rx.get(r.prescription_id)
        new = rx.get(r.new_prescription_id) if r.new_prescription_id else None
        if r.action in ("increase", "decrease", "switch"):
            if r.new_prescription_id is None:
                issues.add(f"{base}/new_prescription_id", f"a {r.action} yields a new prescription; name it", code="required")
            elif new is not None and new.replaces_id != r.prescription_id:
                issues.add(f"{base}/new_prescription_id", f"prescription {new.id!r} does not replace {r.prescription_id!r}")
            if old is not None and new is not None:
                same_drug = old.medication.rxnorm == new.medication.rxnorm
                if r.action == "switch" and same_drug:
                    issues.add(f"{base}/action", "a switch changes the medication; the new prescription has the same one")
                if r.action in ("increase", "decrease") and same_drug and old.dose.unit == new.dose.unit:
                    bigger = new.dose.value > old.dose.value
                    if (r.action == "increase") != bigger or new.dose.value == old.dose.value:
                        issues.add(f"{base}/action", f"{r.action} but the dose went {old.dose.value} -> {new.dose.value} {new.dose.unit}")
            if new is not None and r.new_dose is not None and (r.new_dose.value, r.new_dose.unit) != (new.dose.value, new.dose.unit):
                issues.add(f"{base}/new_dose", "differs from the dose of the new prescription")
        elif r.new_prescription_id is not None:
            issues.add(f"{base}/new_prescription_id", f"a {r.action} review produces no new prescription")
        if r.action == "stop" and old is not None and old.status not in INACTIVE_PRESCRIPTION:
            issues.add(f"{base}/action", f"stopped, but prescription {old.id!r} is still {old.status}")
        if old is not None and r.date < old.written:
            issues.add(f"{base}/date", "review is dated before the prescription was written")


def severity_band(assessment: Assessment, sex: str) -> str | None:
    """The instrument's severity band for a total (C-SSRS: the screener's risk triage)."""
    spec = terminology.instrument(assessment.instrument)
    bands = spec["bands"]
    if bands == "audit-c":
        threshold = 4 if sex == "male" else 3
        return "positive" if assessment.total >= threshold else "negative"
    if bands == "c-ssrs":
        yes = {item.number for item in assessment.items if item.score == 1}
        if yes & {4, 5, 7}:
            return "high"
        if yes & {3, 6}:
            return "moderate"
        if yes & {1, 2}:
            return "low"
        return "none"
    for low, high, name in bands:
        if low <= assessment.total <= high:
            return name
    return None


def scored_item_count(instrument: str) -> int:
    spec = terminology.instrument(instrument)
    return len(spec["items"]) if spec["items"] is not None else spec["item_count"]


def _assessments(record: IopRecord, issues: IssueList) -> None:
    for i, a in enumerate(record.assessments):
        base = f"/assessments/{i}"
        spec = terminology.instrument(a.instrument)
        count = scored_item_count(a.instrument)
        extra = len(spec["extra_items"])
        lo, hi = spec["range"]
        item_lo, item_hi = spec["item_range"]
        seen: set[int] = set()
        for j, item in enumerate(a.items):
            if item.number > count + extra:
                issues.add(f"{base}/items/{j}/number", f"{a.instrument} has {count + extra} items")
            if item.number in seen:
                issues.add(f"{base}/items/{j}/number", f"item {item.number} answered twice")
            seen.add(item.number)
            if not item_lo <= item.score <= item_hi:
                issues.add(f"{base}/items/{j}/score", f"{a.instrument} items score {item_lo}-{item_hi}; got {item.score}")
        if not lo <= a.total <= hi:
            issues.add(f"{base}/total", f"{a.instrument} totals lie in {lo}-{hi}; got {a.total}")
        scored = [item for item in a.items if item.number <= count]
        if a.instrument == "C-SSRS-screen" and len(scored) != count:
            issues.add(f"{base}/items", f"C-SSRS screen needs all {count} answers to triage risk", code="required")
        if scored and len(scored) != count:
            issues.add(f"{base}/items", f"{a.instrument}: give all {count} scored items or none; got {len(scored)}")
        elif scored and sum(item.score for item in scored) != a.total:
            issues.add(f"{base}/total", f"total {a.total} differs from the sum of its items ({sum(i.score for i in scored)})")
        band = severity_band(a, record.client.sex)
        if band is not None and band != a.severity:
            issues.add(f"{base}/severity", f"{a.instrument} total {a.total} is {band!r}, not {a.severity!r}")


def _measurements(record: IopRecord, issues: IssueList) -> None:
    vitals = terminology.tables()["vitals"]
    for i, v in enumerate(record.vitals):
        base = f"/vitals/{i}"
        allowed = vitals[v.kind]["units"]
        if v.unit not in allowed:
            issues.add(f"{base}/unit", f"{v.kind} is measured in {allowed}; got {v.unit!r}")
        if v.kind == "blood-pressure":
            for part in ("systolic", "diastolic"):
                if getattr(v, part) is None:
                    issues.add(f"{base}/{part}", "blood pressure needs systolic and diastolic", code="required")
            if v.value is not None:
                issues.add(f"{base}/value", "blood pressure uses systolic/diastolic, not value")
        else:
            if v.value is None:
                issues.add(f"{base}/value", f"{v.kind} needs a value", code="required")
            for part in ("systolic", "diastolic"):
                if getattr(v, part) is not None:
                    issues.add(f"{base}/{part}", f"only blood pressure has {part}")
    levels = terminology.tables()["drug_levels"]
    for i, level in enumerate(record.drug_levels):
        if level.unit != levels[level.analyte]["unit"]:
            issues.add(f"/drug_levels/{i}/unit", f"{level.analyte} is reported in {levels[level.analyte]['unit']}")
        if level.trough and levels[level.analyte]["trough_code"] is None:
            issues.add(f"/drug_levels/{i}/trough", f"no trough code is known for {level.analyte}")
    for i, s in enumerate(record.drug_screens):
        seen: set[str] = set()
        for j, r in enumerate(s.results):
            if r.analyte in seen:
                issues.add(f"/drug_screens/{i}/results/{j}/analyte", f"{r.analyte} reported twice")
            seen.add(r.analyte)


def _discharge(record: IopRecord, issues: IssueList) -> None:
    if not record.discharge or not record.discharge.aftercare:
        return
    after = record.discharge.aftercare
    rx = {p.id: p for p in record.prescriptions}
    if after.first_follow_up and after.first_follow_up < record.discharge.date:
        issues.add("/discharge/aftercare/first_follow_up", "follow-up is before the discharge")
    seen: set[str] = set()
    for i, m in enumerate(after.medications):
        path = f"/discharge/aftercare/medications/{i}"
        if m.prescription_id in seen:
            issues.add(f"{path}/prescription_id", "listed twice")
        seen.add(m.prescription_id)
        p = rx.get(m.prescription_id)
        if p is None:
            continue
        if m.disposition == "stopped" and p.status not in INACTIVE_PRESCRIPTION:
            issues.add(f"{path}/disposition", f"stopped, but prescription {p.id!r} is {p.status}")
        if m.disposition in ("continue", "changed") and p.status != "active":
            issues.add(f"{path}/disposition", f"{m.disposition}, but prescription {p.id!r} is {p.status}")
        if m.disposition == "changed" and p.replaces_id is None:
            issues.add(f"{path}/disposition", "changed, but the prescription replaces none; list the new regimen")


def npi_is_valid(npi: str) -> bool:
    """Luhn check over the NPI with the card-issuer prefix 80840 (CMS NPI check-digit rule)."""
    if len(npi) != 10 or not npi.isdigit():
        return False
    digits = [int(c) for c in "80840" + npi[:9]]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return (10 - total % 10) % 10 == int(npi[9])


def dea_is_valid(number: str) -> bool:
    """DEA check digit: (d1+d3+d5) + 2*(d2+d4+d6), last digit equals d7."""
    if len(number) != 9 or not number[2:].isdigit():
        return False
    d = [int(c) for c in number[2:]]
    return (d[0] + d[2] + d[4] + 2 * (d[1] + d[3] + d[5])) % 10 == d[6]
