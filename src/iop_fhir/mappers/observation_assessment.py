"""Assessments (PHQ-9, PHQ-2, GAD-7, AUDIT-C, DAST-10, C-SSRS screen) <-> one Observation each.

The field table is in observation.py. One Observation per administration: code = the
instrument's LOINC panel, value = the total, one component per answered item, the severity
band in ``interpretation``. Back, it also reads the shapes other systems send: a US Core
panel whose items and total are separate Observations in ``hasMember``, or a lone total
Observation (band then computed by the contract's own rule).
"""

from __future__ import annotations

from functools import cache
from iop_fhir import terminology
from iop_fhir.mappers.context import MappingContext
from iop_fhir.mappers.datatypes import (
    as_dict,
    as_list,
    code_in,
    code_keys,
    coding,
    concept,
    fhir_datetime,
    shown_codes,
    table_coding,
    ucum_quantity,
    whole_number,
)
from iop_fhir.mappers.observation_common import (
    JSON,
    ObservationReader,
    category,
    label,
    observation,
)
from iop_fhir.record.model import Assessment, AssessmentItem
from iop_fhir.record.validate import scored_item_count, severity_band
from iop_fhir.terminology import LOINC, US_CORE_CATEGORY, code_system

KIND = "assessment"
PROFILE = "us-core-observation-screening-assessment"
INSTRUMENT_SYSTEM = code_system("instrument")
ITEM_SYSTEM = code_system("instrument-item")
BAND_SYSTEM = code_system("severity-band")
SCORE_UNIT = "{score}"

# US Core requires `survey` and wants one US Core category beside it; it has none for mental
# health. USCDI's "Mental/Cognitive Status" data element is carried by `cognitive-status`, the
# closest fit for all six behavioural-health screens (US Core's PHQ-9 example happens to use
# disability-status, which describes function, not symptoms). One category for all six lets a
# receiver fetch the program's screens with one search.
CATEGORIES = [
    category("survey", "Survey"),
    category("cognitive-status", "Cognitive Status", US_CORE_CATEGORY),
]

# The C-SSRS screener has no LOINC panel code (LOINC's 93245-9 is the full scale).
CSSRS = "C-SSRS-screen"
CSSRS_CODE = coding(INSTRUMENT_SYSTEM, CSSRS, "Columbia-Suicide Severity Rating Scale, screen version")

# Which LOINC answer list codes an instrument's scored items; the score is the answer's
# position in the list (0-3 for PHQ/GAD frequency, No=0/Yes=1 for C-SSRS). Other items
# (PHQ-9 item 10, AUDIT-C, DAST-10 with its reverse-scored item 3) carry valueInteger.
ANSWER_LIST = {"PHQ-9": "phq_answers", "PHQ-2": "phq_answers", "GAD-7": "phq_answers", CSSRS: "yes_no_answers"}

# v3 interpretation codes for bands that are plain screen results (extensible binding: use
# them where they fit).
V3_BANDS = {"positive": "POS", "negative": "NEG"}


@cache
def item_codings(instrument: str) -> tuple[JSON, ...]:
    """Coding of item n at position n-1: LOINC where the tables have it, else our instrument-item code."""
    spec = terminology.instrument(instrument)
    scored = spec["items"] or [None] * spec["item_count"]
    out = []
    for n, known in enumerate([*scored, *spec["extra_items"]], start=1):
        if known:
            out.append(coding(LOINC, known["code"], known["display"]))
        else:
            out.append(coding(ITEM_SYSTEM, f"{instrument}-{n}", f"{instrument} item {n}"))
    return tuple(out)


@cache
def item_numbers(instrument: str) -> dict[tuple[str, str], int]:
    return {(c["system"], c["code"]): n for n, c in enumerate(item_codings(instrument), start=1)}


def answers(instrument: str, number: int) -> list[JSON] | None:
    """The LOINC answer list of a scored item, or None where the score is sent as an integer."""
    name = ANSWER_LIST.get(instrument)
    if name is None or number > scored_item_count(instrument):
        return None
    return terminology.tables()[name]


def instrument_coding(instrument: str) -> JSON:
    panel = terminology.instrument(instrument)["panel"]
    return coding(LOINC, panel["code"], panel["display"]) if panel else CSSRS_CODE


def score_quantity(value: int) -> JSON:
    return ucum_quantity(value, SCORE_UNIT)


def band_concept(band: str) -> JSON:
    codings = [coding(BAND_SYSTEM, band, label(band))]
    if band in V3_BANDS:
        codings.append(table_coding(terminology.interpretation(V3_BANDS[band])))
    return concept(*codings, text=label(band))


def _item_component(instrument: str, item: AssessmentItem) -> JSON:
    codings = item_codings(instrument)
    code = dict(codings[item.number - 1]) if item.number <= len(codings) else coding(ITEM_SYSTEM, f"{instrument}-{item.number}")
    listed = answers(instrument, item.number)
    if listed is not None and item.score < len(listed):
        answer = listed[item.score]
        value = concept(coding(LOINC, answer["code"], answer["display"]), text=answer["display"])
        return {"code": concept(code), "valueCodeableConcept": value}
    return {"code": concept(code), "valueInteger": item.score}


def to_fhir(ctx: MappingContext, a: Assessment) -> JSON:
    spec = terminology.instrument(a.instrument)
    components = [_item_component(a.instrument, item) for item in a.items]
    if spec["total"]:
        # Derived copy: lets a component-code search for the total code find the assessment.
        total = spec["total"]
        components.append({"code": concept(coding(LOINC, total["code"], total["display"])), "valueQuantity": score_quantity(a.total)})
    if spec.get("risk"):
        risk = spec["risk"]
        components.append({"code": concept(coding(LOINC, risk["code"], risk["display"])), "valueCodeableConcept": band_concept(a.severity)})
    return observation(
        ctx,
        KIND,
        a.id,
        profile=PROFILE,
        categories=CATEGORIES,
        code=concept(instrument_coding(a.instrument), text=a.instrument),
        effective=a.date,
        performer=[ctx.practitioner(a.performer_id)] if a.performer_id else None,
        valueQuantity=score_quantity(a.total),
        interpretation=[band_concept(a.severity)],
        component=components,
    )


# --- back -----------------------------------------------------------------------------------


def score(holder: JSON, listed: list[JSON] | None) -> int | None:
    """An integer score from whatever value[x] a component or Observation carries, else None."""
    value = holder.get("valueInteger")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    whole = whole_number(as_dict(holder.get("valueQuantity")).get("value"))
    if whole is not None:
        return whole
    text = holder.get("valueString")
    if isinstance(text, str) and text.strip().isdigit():
        return int(text.strip())
    if isinstance(holder.get("valueBoolean"), bool) and listed is not None and len(listed) == 2:
        return int(holder["valueBoolean"])  # a yes/no item sent as a boolean
    if listed is not None:
        loinc = code_in(holder.get("valueCodeableConcept"), LOINC)
        for position, answer in enumerate(listed):
            if answer["code"] == loinc:
                return position
    return None


class _Parts:
    """What the panel's components and members said: items by number, total, band."""

    def __init__(self) -> None:
        self.items: dict[int, int] = {}
        self.total: int | None = None
        self.band: str | None = None


def _read_part(r: ObservationReader, instrument: str, part: JSON, where: str, parts: _Parts) -> None:
    spec = terminology.instrument(instrument)
    keys = code_keys(part.get("code"))
    numbers = item_numbers(instrument)
    number = next((numbers[k] for k in keys if k in numbers), None)
    if number is not None:
        value = score(part, answers(instrument, number))
        if value is None:
            r.report.warning(where, f"{instrument} item {number}: no score could be read; item dropped", code="value")
        elif number in parts.items:
            r.report.warning(where, f"{instrument} item {number} given twice; the first answer is kept", code="value")
        else:
            parts.items[number] = value
        return
    codes = {code for system, code in keys if system == LOINC}
    if spec["total"] and spec["total"]["code"] in codes:
        parts.total = score(part, None) if parts.total is None else parts.total
        return
    if spec.get("risk") and spec["risk"]["code"] in codes:
        parts.band = code_in(part.get("valueCodeableConcept"), BAND_SYSTEM) or parts.band
        return
    r.report.warning(where, f"not a {instrument} item (code {shown_codes(part.get('code'))}); dropped")


def _checked_items(r: ObservationReader, instrument: str, parts: _Parts, where: str) -> list[JSON] | None:
    """The items the contract accepts (all scored items or none); None when the C-SSRS cannot be triaged."""
    spec = terminology.instrument(instrument)
    count = scored_item_count(instrument)
    low, high = spec["item_range"]
    bad = sorted(n for n, s in parts.items.items() if not low <= s <= high or n > count + len(spec["extra_items"]))
    if bad:
        r.report.warning(where, f"{instrument} items {bad} out of range ({low}-{high}); all items dropped", code="value")
        parts.items = {}
    scored = [n for n in parts.items if n <= count]
    if scored and len(scored) != count:
        r.report.warning(where, f"{instrument}: {len(scored)} of {count} scored items; the record keeps all or none, so they are dropped")
        parts.items = {n: s for n, s in parts.items.items() if n > count}
    if instrument == CSSRS and len([n for n in parts.items if n <= count]) != count:
        r.report.error(where, f"the C-SSRS screen needs all {count} answers to triage risk; left out", code="required")
        return None
    return [{"number": n, "score": s} for n, s in parts.items.items()]


def from_fhir(r: ObservationReader, obs: JSON, instrument: str, members: list[JSON]) -> JSON | None:
    """One assessment from a panel (or lone total) Observation and the member Observations it names."""
    where = r.where(obs)
    item_id = r.item_id(obs, KIND)
    date = r.effective_datetime(obs)
    if item_id is None or date is None:
        return None
    parts = _Parts()
    for i, component in enumerate(as_list(obs.get("component"))):
        if isinstance(component, dict):
            _read_part(r, instrument, component, f"{where}.component[{i}]", parts)
    for member in members:
        _read_part(r, instrument, member, r.where(member), parts)
    own_total = score(obs, None)
    total = own_total if own_total is not None else parts.total
    items = _checked_items(r, instrument, parts, where)
    if items is None:
        return None
    scored_sum = sum(i["score"] for i in items if i["number"] <= scored_item_count(instrument))
    has_scored = any(i["number"] <= scored_item_count(instrument) for i in items)
    if total is None and has_scored:
        r.report.info(f"{where}.value[x]", "no total given; the sum of the items is used")
        total = scored_sum
    elif has_scored and total != scored_sum:
        message = f"total {total} differs from the sum of the items ({scored_sum}); the sum is used"
        r.report.warning(f"{where}.value[x]", message, code="value")
        total = scored_sum
    low, high = terminology.instrument(instrument)["range"]
    if total is None or not low <= total <= high:
        r.report.error(f"{where}.value[x]", f"no {instrument} total in {low}-{high} could be read; left out", code="required")
        return None
    band = _band(r, obs, instrument, items, total, parts.band)
    if band is None:
        return None
    out: JSON = {"id": item_id, "instrument": instrument, "date": fhir_datetime(date), "items": items, "total": total, "severity": band}
    performer = r.clinician_id(obs)
    if performer is not None:
        out["performer_id"] = performer
    return out


def _band(r: ObservationReader, obs: JSON, instrument: str, items: list[JSON], total: int, risk_band: str | None) -> str | None:
    for concept_ in as_list(obs.get("interpretation")):
        band = code_in(concept_, BAND_SYSTEM)
        if band:
            return band
    if risk_band:
        return risk_band
    client = r.draft.get("client")
    sex = client.get("sex", "unknown") if isinstance(client, dict) else "unknown"  # AUDIT-C cut-offs differ by sex
    probe = Assessment.model_construct(
        instrument=instrument, total=total, items=[AssessmentItem.model_construct(**i) for i in items]
    )
    band = severity_band(probe, sex)
    if band is None:
        r.report.error(r.where(obs, "interpretation"), f"no {instrument} severity band for total {total}; left out")
        return None
    r.report.info(r.where(obs, "interpretation"), f"severity band {band!r} derived from the total by the instrument's scoring rules")
    return band


@cache
def codes() -> dict[tuple[str, str], tuple[str, str]]:
    """(system, code) -> (role, instrument) for the panel and total codes that start an assessment."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for name in terminology.tables()["instruments"]:
        spec = terminology.instrument(name)
        if spec["total"]:
            out[(LOINC, spec["total"]["code"])] = ("total", name)
        out[(instrument_coding(name)["system"], instrument_coding(name)["code"])] = ("panel", name)
    return out


@cache
def part_codes() -> frozenset[tuple[str, str]]:
    """Codes that only make sense inside an assessment (items, C-SSRS risk level)."""
    out = {key for name in terminology.tables()["instruments"] for key in item_numbers(name)}
    out |= {(LOINC, spec["risk"]["code"]) for spec in terminology.tables()["instruments"].values() if spec.get("risk")}
    return frozenset(out)
