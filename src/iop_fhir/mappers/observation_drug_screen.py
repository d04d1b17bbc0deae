"""Urine drug screens <-> a panel Observation with one member Observation per analyte.

The field table is in observation.py. Back, a screen is read from our panel (hasMember), from
a foreign panel or DiagnosticReport grouping analyte results, or from a lone analyte result
(a screen of one). Foreign results rarely say whether they were expected; the flag is then
derived from the prescriptions active on the collection day and reported as a warning.
"""

from __future__ import annotations

import datetime as dt
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
    concept_text,
    extension,
    fhir_datetime,
    own_extensions,
    parse_date,
    shown_codes,
    table_coding,
)
from iop_fhir.mappers.observation_common import (
    JSON,
    ObservationReader,
    category,
    observation,
)
from iop_fhir.record.model import DrugScreen, DrugScreenResult
from iop_fhir.terminology import LOINC, OBSERVATION_INTERPRETATION, SNOMED

KIND = "drug-screen"
RESULT_KIND = "drug-screen-result"
PROFILE = "us-core-observation-lab"
CATEGORIES = [category("laboratory", "Laboratory")]
EXPECTED_EXTENSION = "drug-screen-expected"
UNEXPECTED_NOTE = "Unexpected result given current prescriptions"

# Result -> its SNOMED CT qualifier value and v3 interpretation code (terminology.screen_result).
BY_SNOMED = {spec["code"]: result for result, spec in terminology.tables()["screen_results"].items()}
# v3 interpretation codes labs use for presence tests (DET/ND: detected, not detected).
BY_INTERPRETATION = {"POS": "positive", "DET": "positive", "NEG": "negative", "ND": "negative", "IND": "inconclusive"}
# Words foreign systems put in valueString or a coding's text/display.
BY_WORD = {
    "positive": "positive", "detected": "positive", "present": "positive", "pos": "positive",
    "negative": "negative", "not detected": "negative", "none detected": "negative", "absent": "negative", "neg": "negative",
    "inconclusive": "inconclusive", "indeterminate": "inconclusive", "equivocal": "inconclusive",
}
# Prescriptions that no longer (or never) put a drug in the client's urine.
NOT_TAKEN = frozenset({"entered-in-error", "cancelled", "draft"})


def result_id(screen: DrugScreen, result: DrugScreenResult) -> str:
    # "." keeps the id in the local-id alphabet; analytes are unique within a screen.
    return f"{screen.id}.{result.analyte}"


def _result(ctx: MappingContext, screen: DrugScreen, result: DrugScreenResult) -> JSON:
    value = terminology.screen_result(result.result)
    analyte = terminology.tables()["drug_screen_analytes"][result.analyte][screen.method]
    return observation(
        ctx,
        RESULT_KIND,
        result_id(screen, result),
        profile=PROFILE,
        categories=CATEGORIES,
        code=concept(coding(LOINC, analyte["code"], analyte["display"])),
        effective=screen.collected,
        # R4 has no element for "expected given the prescriptions": an extension.
        extension=[extension(EXPECTED_EXTENSION, valueBoolean=result.expected)],
        valueCodeableConcept=concept(table_coding(value), text=result.result),
        interpretation=[concept(table_coding(terminology.interpretation(value["interpretation"])))],
        note=None if result.expected else [{"text": UNEXPECTED_NOTE}],
    )


def to_fhir(ctx: MappingContext, screen: DrugScreen) -> list[JSON]:
    """The member results, then the panel (a Bundle entry only points at entries before it)."""
    members = [_result(ctx, screen, result) for result in screen.results]
    panel = terminology.tables()["drug_screen_panels"][screen.method]
    return [
        *members,
        observation(
            ctx,
            KIND,
            screen.id,
            profile=PROFILE,
            categories=CATEGORIES,
            code=concept(coding(LOINC, panel["code"], panel["display"])),
            effective=screen.collected,
            hasMember=[{"reference": f"urn:uuid:{m['id']}"} for m in members],
        ),
    ]


# --- back -----------------------------------------------------------------------------------


@cache
def panel_codes() -> dict[tuple[str, str], str]:
    return {(LOINC, p["code"]): method for method, p in terminology.tables()["drug_screen_panels"].items()}


@cache
def analyte_codes() -> dict[tuple[str, str], tuple[str, str]]:
    """(system, code) -> (analyte, method) for every analyte code in the tables."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for analyte, spec in terminology.tables()["drug_screen_analytes"].items():
        for method in ("screen", "confirmatory"):
            out[(LOINC, spec[method]["code"])] = (analyte, method)
    return out


def analyte_of(resource: JSON) -> tuple[str, str] | None:
    table = analyte_codes()
    return next((table[k] for k in code_keys(resource.get("code")) if k in table), None)


def _read_result(r: ObservationReader, obs: JSON) -> str | None:
    value = obs.get("valueCodeableConcept")
    found = BY_SNOMED.get(code_in(value, SNOMED) or "")
    if found:
        return found
    for i, interpretation in enumerate(as_list(obs.get("interpretation"))):
        found = BY_INTERPRETATION.get(code_in(interpretation, OBSERVATION_INTERPRETATION) or "")
        if found:
            r.report.info(r.where(obs, f"interpretation[{i}]"), f"result {found!r} read from the interpretation")
            return found
    words = [obs.get("valueString"), concept_text(value)]
    for word in words:
        if isinstance(word, str) and word.strip().lower() in BY_WORD:
            r.report.info(r.where(obs, "value[x]"), f"result {word!r} read as {BY_WORD[word.strip().lower()]!r}")
            return BY_WORD[word.strip().lower()]
    r.report.error(r.where(obs, "value[x]"), "no positive/negative/inconclusive result could be read; result left out", code="value")
    return None


def _active_ingredients(draft: JSON, day: dt.date) -> set[str]:
    out: set[str] = set()
    for p in as_list(draft.get("prescriptions")):
        if not isinstance(p, dict) or str(p.get("status")) in NOT_TAKEN:
            continue
        medication = p.get("medication")
        rxnorm = medication.get("rxnorm") if isinstance(medication, dict) else None
        known = terminology.medication(rxnorm) if isinstance(rxnorm, str) else None
        start, end = parse_date(p.get("start")), parse_date(p.get("end"))
        if known and start is not None and start <= day and (end is None or day <= end):
            out.add(known["ingredient"])
    return out


def _expected(r: ObservationReader, obs: JSON, analyte: str, result: str, day: dt.date) -> bool:
    said = as_dict(own_extensions(obs).get(EXPECTED_EXTENSION)).get("valueBoolean")
    if isinstance(said, bool):
        return said
    # Not said: expected when presence matches what the prescriptions active that day explain;
    # an inconclusive result is never expected (it needs a repeat or confirmation).
    prescribed = bool(set(terminology.tables()["drug_screen_analytes"][analyte]["ingredients"]) & _active_ingredients(r.draft, day))
    expected = result != "inconclusive" and (result == "positive") == prescribed
    r.report.warning(
        r.where(obs, "extension"),
        f"whether {analyte} {result} was expected is not stated; derived from the prescriptions active on {day}: {expected}",
        code="incomplete",
    )
    return expected


def from_fhir(r: ObservationReader, holder: JSON, members: list[JSON]) -> JSON | None:
    """One screen from its holder (our panel, a foreign panel or DiagnosticReport, or a lone result)."""
    where = r.where(holder)
    screen_id = r.item_id(holder, KIND)
    dated = holder if any(k in holder for k in ("effectiveDateTime", "effectiveInstant", "effectivePeriod")) or not members else members[0]
    collected = r.effective_datetime(dated)
    if screen_id is None or collected is None:
        return None
    method = next((panel_codes()[k] for k in code_keys(holder.get("code")) if k in panel_codes()), None)
    results: list[JSON] = []
    for member in members:
        found = analyte_of(member)
        if found is None:
            shown = shown_codes(member.get("code"))
            r.report.warning(r.where(member, "code"), f"not a urine drug screen analyte the record knows (code {shown}); dropped")
            continue
        if not r.has_result(member):
            continue
        analyte, member_method = found
        method = method or member_method
        if member_method != method:
            message = f"a {member_method} result in a {method} screen; recorded under the screen's method"
            r.report.warning(r.where(member, "code"), message, code="value")
        if any(x["analyte"] == analyte for x in results):
            r.report.warning(r.where(member, "code"), f"{analyte} reported twice in one screen; the first result is kept", code="value")
            continue
        result = _read_result(r, member)
        if result is not None:
            expected = _expected(r, member, analyte, result, collected.date())
            results.append({"analyte": analyte, "result": result, "expected": expected})
    if not results:
        r.report.error(where, "no analyte result could be read; screen left out", code="required")
        return None
    return {"id": screen_id, "collected": fhir_datetime(collected), "specimen": "urine", "method": method, "results": results}
