"""Measurements and medication findings <-> Observation: the family's entry point.

adherence, side_effects, assessments, drug_screens, vitals and drug_levels each become
Observations (assessments and drug screens live in observation_assessment.py and
observation_drug_screen.py; shared parts in observation_common.py). Every Observation:
status ``final``, ``subject`` = the patient, ``identifier[0]`` = our business identifier
(kind below, value ``{episode}/{item id}``), id derived from it.

Back, each Observation is dispatched by its *code* (not by our identifiers), so other
systems' Observations map where they mean the same thing; unknown codes are reported and
skipped. Observations with status entered-in-error or cancelled are skipped (warning).

=====================================  ===========================================================
contract field                          FHIR element
=====================================  ===========================================================
**adherence[]** (kind ``adherence``)    no US Core profile fits (us-core-simple-observation is 7.0
                                        only); meta.profile left off. category observation-category
                                        #therapy; code LOINC 71799-1
id                                      identifier[0] (id fallback for foreign)
date                                    effectiveDateTime (a date)
prescription_id                         focus[0] -> MedicationRequest (back: also basedOn)
status                                  valueCodeableConcept SNOMED 1156699004 taken / 702565001
                                        missed / 275928001 partial, text = status (back: 715036001
                                        "does not take" -> missed, valueBoolean true/false)
source                                  method = code_system("adherence-source")#source (back:
                                        absent -> self-report, warning: 71799-1 is a reported measure)
note                                    note[0].text (back: several notes joined by a blank line)
**side_effects[]** (``side-effect``)    no profile; category #therapy (R4 has no #symptom);
                                        code SNOMED 62014003 "Adverse reaction caused by drug"
id, date, prescription_id               identifier[0], effectiveDateTime, focus[0] (as adherence)
effect                                  valueCodeableConcept.text
snomed                                  valueCodeableConcept.coding SNOMED (when given)
severity                                component code_system("side-effect")#severity:
                                        valueCodeableConcept code_system("severity")#mild|moderate|
                                        severe plus the SNOMED severity qualifier (condition-severity)
action_taken                            component #action-taken: valueCodeableConcept
                                        code_system("side-effect-action") (back: absent -> "none", warning)
**assessments[]** (``assessment``)      profile us-core-observation-screening-assessment; category
                                        survey + us-core-category#cognitive-status (USCDI Mental/
                                        Cognitive Status; US Core has no mental-health category)
id, date                                identifier[0], effectiveDateTime
instrument                              code = LOINC panel (C-SSRS screen, which has none:
                                        code_system("instrument")#C-SSRS-screen); text = instrument
total                                   valueQuantity {total, UCUM {score}} (C-SSRS: the number of
                                        yes answers); also a derived component coded with the total's
                                        LOINC (not read back). Back: a lone total Observation (value
                                        Quantity, integer or string) is an assessment without items
items[]                                 component[] in item order: code = item LOINC (AUDIT-C, DAST-10:
                                        code_system("instrument-item")#<instrument>-<n>); value =
                                        valueCodeableConcept LOINC answer (PHQ/GAD LA6568-5..LA6571-9,
                                        C-SSRS LA32-8/LA33-6; score = answer position) or valueInteger
severity                                interpretation[0] code_system("severity-band")#band (+ v3
                                        POS/NEG for positive/negative); C-SSRS also component 93374-7
                                        "Suicide risk level". Back: absent -> computed (info)
performer_id                            performer[0] -> Practitioner
**drug_screens[]** (``drug-screen``)    panel Observation, profile us-core-observation-lab, category
                                        laboratory, code = drug_screen_panels[method], no value
id, collected                           identifier[0], effectiveDateTime (panel and members)
method                                  panel code (69739-1 screen, 87428-9 confirmatory)
specimen                                implied: every analyte code is a urine test; no Specimen
                                        resource is invented (R4 specimen is a Reference)
results[]                               hasMember[] -> one Observation per result, kind
                                        ``drug-screen-result``, local id ``{screen id}.{analyte}``
results[].analyte                       member code = the analyte's LOINC for the method
results[].result                        member valueCodeableConcept SNOMED 10828004 / 260385009 /
                                        419984006 (text = result); interpretation v3 POS/NEG/IND
results[].expected                      member extension drug-screen-expected (valueBoolean);
                                        unexpected also note[0] (derived). Back, absent: derived from
                                        the prescriptions active that day (warning): expected when a
                                        positive is explained by a prescribed ingredient or a negative
                                        by none; inconclusive is never expected
(back only)                             a screen is also read from a foreign panel whose members are
                                        analyte results, a DiagnosticReport.result group, or a lone
                                        analyte Observation (a screen of one result); members are
                                        never mapped twice
**vitals[]** (``vital``)                profile us-core-<kind> (us-core-body-weight, -heart-rate,
                                        -body-height, -bmi, -blood-pressure); category vital-signs
id, date, kind                          identifier[0], effectiveDateTime, code (tables()["vitals"])
value, unit                             valueQuantity UCUM (back: unit text synonyms such as "lbs"
                                        -> [lb_av] normalised, no value conversion; others skipped)
systolic, diastolic                     blood pressure: component 8480-6 / 8462-4, mm[Hg]; no value
                                        (back: the older panel code 55284-4 is read too)
**drug_levels[]** (``drug-level``)      profile us-core-observation-lab; category laboratory
id, date                                identifier[0], effectiveDateTime
analyte, trough                         code tables()["drug_levels"] (trough_code when trough)
value, unit                             valueQuantity UCUM (back: meq/L for lithium, mg/L for
                                        valproate are the same numbers and are normalised)
prescription_id                         focus[0] -> MedicationRequest (when given)
=====================================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from functools import cache
from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers import observation_assessment as assessment
from iop_fhir.mappers import observation_drug_screen as drug_screen
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.datatypes import (
    as_list,
    choices,
    code_in,
    code_keys,
    coding,
    concept,
    concept_text,
    fhir_datetime,
    note_texts,
    number,
    quantity_parts,
    shown_codes,
    table_coding,
    ucum_quantity,
)
from iop_fhir.mappers.observation_common import (
    JSON,
    ObservationReader,
    category,
    contract_amount,
    label,
    observation,
)
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import AdherenceEvent, DrugLevel, SideEffect, Vital
from iop_fhir.terminology import LOINC, SNOMED, code_system

THERAPY = [category("therapy", "Therapy")]
VITAL_SIGNS = [category("vital-signs", "Vital Signs")]
LABORATORY = [category("laboratory", "Laboratory")]
LAB_PROFILE = "us-core-observation-lab"

ADHERENCE_CODE = coding(LOINC, "71799-1", "Adherence to prescribed medication instructions [Reported]")
ADHERENCE_VALUES = {"taken": "1156699004", "missed": "702565001", "partial": "275928001"}
# Foreign codes with the same meaning in the record ("does not take" is a missed dose or more).
ADHERENCE_ALIASES = {"715036001": "missed"}
# Answers to "adherent to the instructions?" (71799-1's example answer list is True/False).
ADHERENCE_WORDS = {"taken": "taken", "missed": "missed", "partial": "partial", "yes": "taken", "true": "taken", "no": "missed", "false": "missed"}
ADHERENCE_SOURCE = code_system("adherence-source")

SIDE_EFFECT_CODE = "62014003"
SIDE_EFFECT_PARTS = code_system("side-effect")
SEVERITY = code_system("severity")
ACTION = code_system("side-effect-action")
# Severity -> the SNOMED CT severity qualifier sent beside our code (terminology.severity).
SEVERITY_SNOMED: dict[str, JSON] = terminology.tables()["severities"]

# Unit spellings other systems send for the units the contract allows (same unit, no conversion).
UNIT_SYNONYMS = {
    "lb": "[lb_av]", "lbs": "[lb_av]", "pound": "[lb_av]", "pounds": "[lb_av]",
    "kilogram": "kg", "kilograms": "kg", "kgs": "kg", "in": "[in_i]", "inch": "[in_i]", "inches": "[in_i]",
    "centimeter": "cm", "centimeters": "cm", "bpm": "/min", "beats/min": "/min", "{beats}/min": "/min",
    "mmhg": "mm[Hg]", "mm hg": "mm[Hg]", "kg/m^2": "kg/m2", "kg/m²": "kg/m2",
    # drug levels: lithium is monovalent (1 meq/L = 1 mmol/L); 1 mg/L = 1 ug/mL
    "meq/l": "mmol/L", "mmol/l": "mmol/L", "mg/l": "ug/mL", "ug/ml": "ug/mL", "mcg/ml": "ug/mL", "µg/ml": "ug/mL",
}


# --- forward --------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """All Observations of the record: adherence, side effects, assessments, screens, vitals, levels."""
    record = ctx.record
    out = [_adherence(ctx, a) for a in record.adherence]
    out += [_side_effect(ctx, s) for s in record.side_effects]
    out += [assessment.to_fhir(ctx, a) for a in record.assessments]
    for screen in record.drug_screens:
        out += drug_screen.to_fhir(ctx, screen)
    out += [_vital(ctx, v) for v in record.vitals]
    out += [_drug_level(ctx, d) for d in record.drug_levels]
    return out


def _adherence(ctx: MappingContext, a: AdherenceEvent) -> JSON:
    code = ADHERENCE_VALUES[a.status]
    return observation(
        ctx,
        "adherence",
        a.id,
        profile=None,
        categories=THERAPY,
        code=concept(ADHERENCE_CODE),
        effective=a.date,
        focus=[ctx.prescription(a.prescription_id)],
        valueCodeableConcept=concept(coding(SNOMED, code, terminology.snomed_display(code)), text=a.status),
        method=concept(coding(ADHERENCE_SOURCE, a.source, label(a.source))),
        note=[{"text": a.note}] if a.note else None,
    )


def _coded_part(part: str, system: str, value: str, *extra: JSON) -> JSON:
    return {
        "code": concept(coding(SIDE_EFFECT_PARTS, part, label(part))),
        "valueCodeableConcept": concept(coding(system, value, label(value)), *extra),
    }


def _side_effect(ctx: MappingContext, s: SideEffect) -> JSON:
    return observation(
        ctx,
        "side-effect",
        s.id,
        profile=None,
        categories=THERAPY,
        code=concept(coding(SNOMED, SIDE_EFFECT_CODE, terminology.snomed_display(SIDE_EFFECT_CODE))),
        effective=s.date,
        focus=[ctx.prescription(s.prescription_id)],
        valueCodeableConcept=concept(*([coding(SNOMED, s.snomed)] if s.snomed else []), text=s.effect),
        component=[
            _coded_part("severity", SEVERITY, s.severity, table_coding(terminology.severity(s.severity))),
            _coded_part("action-taken", ACTION, s.action_taken),
        ],
    )


def _vital(ctx: MappingContext, v: Vital) -> JSON:
    spec = terminology.tables()["vitals"][v.kind]
    elements: JSON = {}
    if v.kind == "blood-pressure":
        elements["component"] = [
            {"code": concept(coding(LOINC, spec[part]["code"], spec[part]["display"])), "valueQuantity": ucum_quantity(value, v.unit)}
            for part, value in (("systolic", v.systolic), ("diastolic", v.diastolic))
            if value is not None
        ]
    elif v.value is not None:
        elements["valueQuantity"] = ucum_quantity(v.value, v.unit)
    return observation(
        ctx,
        "vital",
        v.id,
        profile=spec["profile"],
        categories=VITAL_SIGNS,
        code=concept(coding(LOINC, spec["code"]["code"], spec["code"]["display"])),
        effective=v.date,
        **elements,
    )


def _drug_level(ctx: MappingContext, d: DrugLevel) -> JSON:
    spec = terminology.tables()["drug_levels"][d.analyte]
    code = spec["trough_code"] if d.trough and spec["trough_code"] else spec["code"]
    return observation(
        ctx,
        "drug-level",
        d.id,
        profile=LAB_PROFILE,
        categories=LABORATORY,
        code=concept(coding(LOINC, code["code"], code["display"])),
        effective=d.date,
        focus=[ctx.prescription(d.prescription_id)] if d.prescription_id else None,
        valueQuantity=ucum_quantity(d.value, d.unit),
    )


# --- back -----------------------------------------------------------------------------------

Reader = Callable[[ObservationReader, JSON, Any], JSON | None]


@cache
def _dispatch() -> dict[tuple[str, str], tuple[str, Any]]:
    """(system, code) -> (draft list, detail) for every code that starts a record item."""
    table: dict[tuple[str, str], tuple[str, Any]] = {
        (LOINC, ADHERENCE_CODE["code"]): ("adherence", None),
        (SNOMED, SIDE_EFFECT_CODE): ("side_effects", None),
    }
    for key, (role, instrument) in assessment.codes().items():
        table[key] = ("assessments", (role, instrument))
    for key, method in drug_screen.panel_codes().items():
        table[key] = ("drug_screens", method)
    for key in drug_screen.analyte_codes():
        table[key] = ("drug_screens", None)
    for kind, spec in terminology.tables()["vitals"].items():
        table[(LOINC, spec["code"]["code"])] = ("vitals", kind)
    # The older LOINC blood-pressure panel many systems still send; same components.
    table[(LOINC, "55284-4")] = ("vitals", "blood-pressure")
    for analyte, spec in terminology.tables()["drug_levels"].items():
        table[(LOINC, spec["code"]["code"])] = ("drug_levels", (analyte, False))
        if spec["trough_code"]:
            table[(LOINC, spec["trough_code"]["code"])] = ("drug_levels", (analyte, True))
    return table


@cache
def _part_codes() -> dict[tuple[str, str], str]:
    """Codes that are parts of a larger item: mapped only inside it, reported when alone."""
    out = {key: "an assessment item or risk level outside its panel" for key in assessment.part_codes()}
    bp = terminology.tables()["vitals"]["blood-pressure"]
    for part in ("systolic", "diastolic"):
        out[(LOINC, bp[part]["code"])] = f"a {part} pressure outside a blood-pressure panel (the record needs both)"
    return out


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Fill adherence, side_effects, assessments, drug_screens, vitals and drug_levels of ``draft``."""
    r = ObservationReader(index, draft, report)
    observations = [o for o in index.of_type("Observation") if isinstance(o, dict)]
    members, consumed = _claim_members(r, observations)
    reports = _screen_reports(r, index, consumed)
    for obs in observations:
        if id(obs) in consumed:
            continue
        target, item = _map_one(r, obs, members.get(id(obs)))
        if item is not None:
            draft.setdefault(target, []).append(item)
    for holder, results in reports:
        item = drug_screen.from_fhir(r, holder, results) if r.has_result(holder) else None
        if item is not None:
            draft.setdefault("drug_screens", []).append(item)


def _claim_members(r: ObservationReader, observations: list[JSON]) -> tuple[dict[int, list[JSON]], set[int]]:
    """Panels we map take their hasMember Observations, which then are not items of their own."""
    members: dict[int, list[JSON]] = {}
    consumed: set[int] = set()
    table = _dispatch()
    for obs in observations:
        if not as_list(obs.get("hasMember")):
            continue
        found = r.members(obs, "hasMember", report_missing=False)
        target = next((table[k][0] for k in code_keys(obs.get("code")) if k in table), None)
        if target in ("assessments", "drug_screens") or any(drug_screen.analyte_of(m) for m in found):
            members[id(obs)] = r.members(obs, "hasMember", report_missing=True)
            consumed.update(id(m) for m in found if m is not obs)
    return members, consumed


def _screen_reports(r: ObservationReader, index: ResourceIndex, consumed: set[int]) -> list[tuple[JSON, list[JSON]]]:
    """DiagnosticReports grouping analyte results that no panel holds: each is one screen."""
    out = []
    for report in index.of_type("DiagnosticReport"):
        if not isinstance(report, dict):
            continue
        results = [m for m in r.members(report, "result", report_missing=False) if id(m) not in consumed]
        if any(drug_screen.analyte_of(m) for m in results):
            consumed.update(id(m) for m in results)
            out.append((report, results))
    return out


def _map_one(r: ObservationReader, obs: JSON, members: list[JSON] | None) -> tuple[str, JSON | None]:
    keys = code_keys(obs.get("code"))
    table = _dispatch()
    hit = next((k for k in keys if k in table), None)
    if hit is None:
        if members is not None:  # an unknown panel code whose members are drug tests
            r.report.info(r.where(obs, "code"), "panel code not known; read as a urine drug screen because its members are")
            return "drug_screens", drug_screen.from_fhir(r, obs, members) if r.has_result(obs) else None
        part = next((_part_codes()[k] for k in keys if k in _part_codes()), "no record item has this code")
        r.report.warning(r.where(obs, "code"), f"{part} (code {shown_codes(obs.get('code'))}); not mapped")
        return "", None
    target, detail = table[hit]
    if not r.has_result(obs):
        return target, None
    if target == "assessments":
        return target, assessment.from_fhir(r, obs, detail[1], members or [])
    if target == "drug_screens":
        # a panel code holds its members; an analyte code alone is a screen of one result
        return target, drug_screen.from_fhir(r, obs, (members or []) if detail else [obs])
    return target, READERS[target](r, obs, detail)


def _adherence_from(r: ObservationReader, obs: JSON, _detail: Any) -> JSON | None:
    item_id, day, prescription = r.item_id(obs, "adherence"), r.effective_date(obs), _prescription(r, obs)
    status = _adherence_status(r, obs)
    if None in (item_id, day, prescription, status):
        return None
    source = code_in(obs.get("method"), ADHERENCE_SOURCE)
    if source not in choices(AdherenceEvent, "source"):
        r.report.warning(
            r.where(obs, "method"), "no adherence source the record knows; self-report assumed (71799-1 is a reported measure)", code="incomplete"
        )
        source = "self-report"
    out: JSON = {"id": item_id, "date": day.isoformat(), "prescription_id": prescription, "status": status, "source": source}
    note = _notes(r, obs)
    if note:
        out["note"] = note
    return out


def _adherence_status(r: ObservationReader, obs: JSON) -> str | None:
    by_code = {code: status for status, code in ADHERENCE_VALUES.items()} | ADHERENCE_ALIASES
    value = obs.get("valueCodeableConcept")
    code = code_in(value, SNOMED)
    if code in by_code:
        if code in ADHERENCE_ALIASES:
            r.report.info(r.where(obs, "valueCodeableConcept"), f"SNOMED {code} read as {by_code[code]!r}")
        return by_code[code]
    if isinstance(obs.get("valueBoolean"), bool):
        r.report.info(r.where(obs, "valueBoolean"), "adherent yes/no read as taken/missed")
        return "taken" if obs["valueBoolean"] else "missed"
    for word in (concept_text(value), obs.get("valueString")):
        found = ADHERENCE_WORDS.get(word.strip().lower()) if isinstance(word, str) else None
        if found:
            r.report.info(r.where(obs, "value[x]"), f"adherence {found!r} read from the words {word!r}")
            return found
    r.report.error(r.where(obs, "value[x]"), "no taken/missed/partial value could be read; left out", code="value")
    return None


def _prescription(r: ObservationReader, obs: JSON) -> str | None:
    found = r.prescription_id(obs)
    if found is None:
        where = r.where(obs, "focus")
        r.report.error(where, "no prescription (MedicationRequest in focus or basedOn) in the input; left out", code="required")
    return found


def _notes(r: ObservationReader, obs: JSON) -> str | None:
    texts = note_texts(obs.get("note"))
    if len(texts) > 1:
        r.report.info(r.where(obs, "note"), f"{len(texts)} notes joined into one")
    return "\n\n".join(texts) or None


def _side_effect_from(r: ObservationReader, obs: JSON, _detail: Any) -> JSON | None:
    item_id, day, prescription = r.item_id(obs, "side-effect"), r.effective_date(obs), _prescription(r, obs)
    value = obs.get("valueCodeableConcept")
    effect = concept_text(value) or (obs.get("valueString") if isinstance(obs.get("valueString"), str) else None)
    if not effect:
        r.report.error(r.where(obs, "value[x]"), "the side effect is not named; left out", code="required")
    parts = _side_effect_parts(r, obs)
    if None in (item_id, day, prescription, effect) or "severity" not in parts:
        return None
    if len(effect) > 500:
        r.report.warning(r.where(obs, "valueCodeableConcept.text"), "effect text cut to 500 characters", code="too-long")
        effect = effect[:500]
    out: JSON = {"id": item_id, "date": day.isoformat(), "prescription_id": prescription, "effect": effect}
    snomed = code_in(value, SNOMED)
    if snomed and snomed.isdigit() and 6 <= len(snomed) <= 18:
        out["snomed"] = snomed
    out["severity"] = parts["severity"]
    if "action-taken" not in parts:
        r.report.warning(r.where(obs, "component"), "the action taken is not stated; 'none' recorded", code="incomplete")
    out["action_taken"] = parts.get("action-taken", "none")
    return out


def _side_effect_parts(r: ObservationReader, obs: JSON) -> dict[str, str]:
    """severity and action-taken from our components (severity also as a SNOMED severity qualifier)."""
    by_snomed = {spec["code"]: name for name, spec in SEVERITY_SNOMED.items()}
    allowed = {"severity": choices(SideEffect, "severity"), "action-taken": choices(SideEffect, "action_taken")}
    out: dict[str, str] = {}
    for component in as_list(obs.get("component")):
        if not isinstance(component, dict):
            continue
        part = code_in(component.get("code"), SIDE_EFFECT_PARTS)
        value = component.get("valueCodeableConcept")
        found = code_in(value, SEVERITY if part == "severity" else ACTION) or by_snomed.get(code_in(value, SNOMED) or "")
        if part in allowed and found in allowed[part]:
            out.setdefault(part, found)
    if "severity" not in out:
        r.report.error(r.where(obs, "component"), "no mild/moderate/severe severity; left out", code="required")
    return out


def _unit(r: ObservationReader, where: str, unit: str, allowed: list[str]) -> str | None:
    if unit in allowed:
        return unit
    same = UNIT_SYNONYMS.get(unit.strip().lower())
    if same in allowed:
        r.report.info(where, f"unit {unit!r} read as UCUM {same!r}")
        return same
    r.report.warning(where, f"unit {unit!r} is not one the record allows ({', '.join(allowed)}); left out", code="value")
    return None


def _amount(r: ObservationReader, holder: JSON, where: str, allowed: list[str]) -> tuple[Decimal, str] | None:
    parts = quantity_parts(holder.get("valueQuantity")) if isinstance(holder.get("valueQuantity"), dict) else None
    if parts is None:
        r.report.error(where, "no valueQuantity with a value and unit; left out", code="required")
        return None
    if not isinstance(parts[1], str):
        r.report.error(f"{where}.unit", "the unit is not a string; left out", code="value")
        return None
    unit = _unit(r, f"{where}.unit", parts[1], allowed)
    amount = contract_amount(parts[0], f"{where}.value", r.report)
    return (amount, unit) if amount is not None and unit is not None else None


def _vital_from(r: ObservationReader, obs: JSON, kind: str) -> JSON | None:
    item_id, date = r.item_id(obs, "vital"), r.effective_datetime(obs)
    spec = terminology.tables()["vitals"][kind]
    out: JSON = {"kind": kind}
    if kind != "blood-pressure":
        found = _amount(r, obs, r.where(obs, "valueQuantity"), spec["units"])
        if found is None:
            return None
        out["value"], out["unit"] = number(found[0]), found[1]
    for part in ("systolic", "diastolic") if kind == "blood-pressure" else ():
        key = (LOINC, spec[part]["code"])
        component = next((c for c in as_list(obs.get("component")) if isinstance(c, dict) and key in code_keys(c.get("code"))), None)
        if component is None:
            r.report.error(r.where(obs, "component"), f"no {part} component; left out", code="required")
            return None
        found = _amount(r, component, r.where(obs, f"component({part})"), spec["units"])
        if found is None:
            return None
        out[part], out["unit"] = number(found[0]), found[1]
    if item_id is None or date is None:
        return None
    return {"id": item_id, "date": fhir_datetime(date), **out}


def _drug_level_from(r: ObservationReader, obs: JSON, detail: tuple[str, bool]) -> JSON | None:
    analyte, trough = detail
    item_id, date = r.item_id(obs, "drug-level"), r.effective_datetime(obs)
    found = _amount(r, obs, r.where(obs, "valueQuantity"), [terminology.tables()["drug_levels"][analyte]["unit"]])
    if item_id is None or date is None or found is None:
        return None
    value, unit = found
    out: JSON = {"id": item_id, "date": fhir_datetime(date), "analyte": analyte, "value": number(value), "unit": unit, "trough": trough}
    prescription = r.prescription_id(obs)
    if prescription is not None:
        out["prescription_id"] = prescription
    return out


READERS: dict[str, Reader] = {
    "adherence": _adherence_from,
    "side_effects": _side_effect_from,
    "vitals": _vital_from,
    "drug_levels": _drug_level_from,
}
