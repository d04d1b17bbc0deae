"""MedicationRequest <-> ``prescriptions`` and the discharge medication list.

A record gives two kinds of MedicationRequest, told apart by the kind of their business
identifier (``identifier[0]``):

* ``prescription``: one medication order per ``prescriptions[]`` item, intent ``order``,
  profile US Core MedicationRequest;
* ``discharge-medication``: one per ``discharge.aftercare.medications[]`` entry, the
  medication reconciliation handed on at discharge: intent ``plan``, category ``discharge``,
  identifier value = the prescription id, ``priorPrescription`` -> that prescription.

Prescription field table (contract field -> FHIR element):

=====================================  ================================================================
``id``                                 ``identifier[0]`` (kind ``prescription``); ``id`` derives from it
``medication.rxnorm`` / ``.display``   ``medicationCodeableConcept.coding[RxNorm]`` code / display
``dose``                               ``dosageInstruction[0].doseAndRate[0].doseQuantity`` (UCUM code)
``route``                              ``dosageInstruction[0].route`` (SNOMED CT)
``timing.frequency/period/period_unit``  ``dosageInstruction[0].timing.repeat.frequency/period/periodUnit``
``timing.times_of_day``                ``dosageInstruction[0].timing.repeat.timeOfDay``
``as_needed``                          ``dosageInstruction[0].asNeededBoolean`` (or asNeededCodeableConcept)
``as_needed_reason``                   ``dosageInstruction[0].asNeededCodeableConcept.text``
``start`` / ``end``                    ``dosageInstruction[0].timing.repeat.boundsPeriod.start/end``
``instructions``                       ``dosageInstruction[0].text`` (the sig US Core must-supports;
                                       ``patientInstruction`` is not written)
``written``                            ``authoredOn``
``quantity``                           ``dispenseRequest.quantity``
``days_supply``                        ``dispenseRequest.expectedSupplyDuration`` (UCUM ``d``)
``refills``                            ``dispenseRequest.numberOfRepeatsAllowed``
``pharmacy_id``                        ``dispenseRequest.performer`` -> Organization (kind ``pharmacy``)
``substitution_allowed``               ``substitution.allowedBoolean``
``prescriber_id``                      ``requester`` -> Practitioner (kind ``staff``)
``indication_id``                      ``reasonReference[0]`` -> Condition (kind ``diagnosis``)
``status`` / ``status_reason``         ``status`` / ``statusReason.text``
``setting``                            ``category`` (medicationrequest-category, the US Core slice)
``course``                             ``courseOfTherapyType`` (medicationrequest-course-of-therapy)
``replaces_id``                        ``priorPrescription`` -> MedicationRequest (kind ``prescription``)
``dea_schedule``                       extension ``dea-schedule`` (valueCode II, III, IV, V)
``mat``                                extension ``medication-assisted-treatment`` (valueBoolean)
=====================================  ================================================================

Derived, not read back: intent ``order``, ``reportedBoolean`` false (we are the source),
``subject``, coding displays, the human unit text of quantities (``tablet``, ``film``).

Discharge medication (``discharge.aftercare.medications[]``):

==================  ===============================================================================
``prescription_id`` ``priorPrescription`` -> the prescription (and ``identifier[0].value``)
``disposition``     extension ``discharge-disposition`` (valueCode continue / changed / stopped);
                    ``status`` says ``stopped`` for stopped, ``active`` otherwise
``note``            ``note[0].text``
==================  ===============================================================================

Derived, not read back: medication, dosage, requester and reason copied from the prescription;
``authoredOn`` = the discharge date.

Why extensions: R4 MedicationRequest (and Medication) has no element for the DEA schedule of
the product, for whether an order is medication-assisted treatment of a substance-use
disorder, nor for a reconciliation outcome at discharge (``status`` cannot tell "changed"
from "continue"). Each is one project extension on the MedicationRequest.

Reverse, for MedicationRequests other systems wrote: an RxNorm code is required (in
``medicationCodeableConcept``, or a ``medicationReference`` to a contained or bundled
Medication). Contract-required values are filled only where FHIR or pharmacy practice
defines them (each reported): ``timing.frequency`` 1 when absent (FHIR: once per period),
``timing`` from a timing abbreviation (BID, ...), ``route`` from the product's dose form in
the drug table, ``start`` from the validity period or ``authoredOn`` (an order takes effect
when written), ``days_supply`` as quantity / daily dose, ``refills`` 0 when absent,
``substitution_allowed`` true when absent (R4: "if nothing is specified, substitution may be
done"), ``dea_schedule``/``mat`` from the drug table. Everything else that is required and
missing (prescriber, dose, quantity, date written, ...) is an error and the item is left out:
a prescription with a guessed dose or prescriber must not reach a pharmacy.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers.context import (
    MappingContext,
    ResourceIndex,
    identifier_kind,
    known_ids,
    local_id,
    practitioner_id,
    reference_text,
    referenced_id,
)
from iop_fhir.mappers.datatypes import (
    ItemReader,
    as_dict,
    as_list,
    code_in,
    codings_of,
    coding,
    concept,
    concept_text,
    drop_empty,
    extension,
    fhir_date,
    fhir_time,
    first_of_each,
    nonempty,
    note_texts,
    number,
    own_extensions,
    parse_date,
    parse_time,
    quantity_parts,
    read_each,
    table_coding,
    to_decimal,
    ucum_quantity,
    where,
)
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import DischargeMedication, Medication, Prescription, Quantity
from iop_fhir.record.validate import DOSE_UNITS, INACTIVE_PRESCRIPTION
from iop_fhir.terminology import (
    ICD10CM,
    MEDREQ_CATEGORY,
    MEDREQ_COURSE,
    RXNORM,
    SNOMED,
    V3_ROUTE,
    V3_SUBSTITUTION,
    V3_TIMING_ABBREVIATION,
)

JSON = dict[str, Any]

KIND = "prescription"
DISCHARGE_KIND = "discharge-medication"
PROFILE = terminology.us_core("us-core-medicationrequest")

# --- code tables ----------------------------------------------------------------------------

# Contract route -> its SNOMED CT coding (terminology: routes).
ROUTES: dict[str, JSON] = terminology.tables()["routes"]
# Foreign systems often code routes in HL7 v3 RouteOfAdministration (R4 value set, 2018-08-12).
ROUTES_V3 = {
    "PO": "oral", "SL": "sublingual", "BUC": "buccal", "IM": "intramuscular", "IMD": "intramuscular",
    "IMZ": "intramuscular", "SQ": "subcutaneous", "NASAL": "nasal", "NASALINSTIL": "nasal",
    "NASINHL": "nasal", "TRNSDERM": "transdermal", "TRNSDERMD": "transdermal",
}
ROUTES_SNOMED = {spec["code"]: route for route, spec in ROUTES.items()}

SETTINGS = {"community": "Community", "outpatient": "Outpatient", "discharge": "Discharge"}
COURSES = {"continuous": "Continuous long term therapy", "acute": "Short course (acute) therapy", "seasonal": "Seasonal"}
STATUSES = frozenset({"active", "on-hold", "cancelled", "completed", "stopped", "draft", "entered-in-error"})
ORDER_INTENTS = frozenset({"order", "original-order", "reflex-order", "filler-order", "instance-order"})
DEA_SCHEDULES = frozenset({"II", "III", "IV", "V"})
DISPOSITIONS = frozenset({"continue", "changed", "stopped"})
PERIOD_UNITS = frozenset({"h", "d", "wk", "mo"})
# Timing.repeat parts the contract's frequency-per-period cannot express.
NOT_CARRIED_REPEAT = (
    "when", "dayOfWeek", "count", "countMax", "duration", "durationMax", "frequencyMax", "periodMax", "offset",
    "boundsDuration", "boundsRange",
)

# R4 timing-abbreviation (v3-GTSAbbreviation): code -> (frequency, period, periodUnit).
TIMING_CODES: dict[str, tuple[int, int, str]] = {
    "QD": (1, 1, "d"), "AM": (1, 1, "d"), "PM": (1, 1, "d"), "BED": (1, 1, "d"), "BID": (2, 1, "d"),
    "TID": (3, 1, "d"), "QID": (4, 1, "d"), "QOD": (1, 2, "d"), "Q1H": (1, 1, "h"), "Q2H": (1, 2, "h"),
    "Q3H": (1, 3, "h"), "Q4H": (1, 4, "h"), "Q6H": (1, 6, "h"), "Q8H": (1, 8, "h"), "WK": (1, 1, "wk"),
    "MO": (1, 1, "mo"),
}

# Human text for UCUM count units (Quantity.unit); the UCUM code stays in Quantity.code.
UNIT_TEXT = {"{tbl}": "tablet", "{Capsule}": "capsule", "{spray}": "spray", "{Package}": "package", "{patch}": "patch"}
# Dose forms whose name says what a unit "1" counts ("... Sublingual Film" -> film).
DOSE_FORMS = frozenset({"film", "strip", "injection", "tablet", "capsule", "patch", "spray", "lozenge"})
# Unit words foreign systems write instead of the UCUM codes the contract takes (lower case).
UNIT_SYNONYMS = {
    **{unit.lower(): unit for unit in DOSE_UNITS},
    "tablet": "{tbl}", "tablets": "{tbl}", "tab": "{tbl}", "tabs": "{tbl}", "{tablet}": "{tbl}",
    "capsule": "{Capsule}", "capsules": "{Capsule}", "cap": "{Capsule}", "caps": "{Capsule}",
    "spray": "{spray}", "sprays": "{spray}", "patch": "{patch}", "patches": "{patch}",
    "film": "1", "films": "1", "each": "1", "{each}": "1", "ea": "1", "mcg": "ug",
}
DAYS_PER = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7}
# Doses per day for one dose every ``period`` of a unit; months have no fixed length in days.
PER_DAY = {"h": Decimal(24), "d": Decimal(1), "wk": Decimal(1) / Decimal(7)}


# --- forward: small pure helpers other families reuse ------------------------------------------


def medication_concept(medication: Medication) -> JSON:
    """The product as US Core wants it: an RxNorm coding with its display, the display as text."""
    return concept(coding(RXNORM, medication.rxnorm, medication.display), text=medication.display)


def route_coding(route: str) -> JSON:
    """SNOMED CT coding of a contract route (``oral`` -> 26643006 Oral route)."""
    return table_coding(terminology.route(route))


def unit_text(unit: str, medication: Medication | None = None) -> str | None:
    """Human text for a UCUM dose unit: ``{tbl}`` -> tablet; ``1`` -> the product's dose form (film).

    ``1`` only counts "one of them", so the product's name says what is counted; without a
    recognisable dose form there is no better text than the code itself (None).
    """
    if unit == "1" and medication is not None:
        words = re.findall(r"[a-z]+", medication.display.split("[")[0].lower())
        return next((w for w in reversed(words) if w in DOSE_FORMS), None)
    return UNIT_TEXT.get(unit)


def quantity(value: Quantity, medication: Medication | None = None) -> JSON:
    """A contract Quantity as a UCUM Quantity with human unit text."""
    return ucum_quantity(value.value, value.unit, unit_text(value.unit, medication))


def category(setting: str) -> JSON:
    """The US Core category slice (medicationrequest-category) for a contract setting."""
    return concept(coding(MEDREQ_CATEGORY, setting, SETTINGS[setting]))


def timing(p: Prescription) -> JSON:
    """How often and for how long: Timing.repeat with frequency/period and the therapy's bounds."""
    t = p.timing
    bounds = {"start": fhir_date(p.start), "end": fhir_date(p.end) if p.end else None}
    repeat = {
        "boundsPeriod": drop_empty(bounds),
        "frequency": t.frequency,
        "period": number(t.period),
        "periodUnit": t.period_unit,
        "timeOfDay": [fhir_time(x) for x in t.times_of_day],
    }
    return {"repeat": drop_empty(repeat)}


def dosage(p: Prescription) -> JSON:
    """The one Dosage of a prescription: sig text, timing, as-needed, route and dose."""
    out: JSON = {"text": p.instructions, "timing": timing(p)}
    if p.as_needed and p.as_needed_reason:
        out["asNeededCodeableConcept"] = concept(text=p.as_needed_reason)
    else:
        out["asNeededBoolean"] = p.as_needed
    out["route"] = concept(route_coding(p.route))
    out["doseAndRate"] = [{"doseQuantity": quantity(p.dose, p.medication)}]
    return drop_empty(out)


# --- forward ----------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """The prescriptions in record order, then the discharge medications in aftercare order."""
    out = [prescription_resource(ctx, p) for p in ctx.record.prescriptions]
    discharge = ctx.record.discharge
    if discharge is not None and discharge.aftercare is not None:
        out.extend(discharge_medication_resource(ctx, m, discharge.date) for m in discharge.aftercare.medications)
    return out


def _request(ctx: MappingContext, kind: str, local: str, p: Prescription) -> JSON:
    """What both kinds share: identity, profile, the product, the patient, prescriber and reason."""
    # Elements in the specification's order; each kind fills the ones left None here.
    return {
        "resourceType": "MedicationRequest",
        "id": ctx.ids.id("MedicationRequest", kind, local),
        "meta": {"profile": [PROFILE]},
        "extension": None,
        "identifier": [ctx.ids.identifier(kind, local)],
        "status": None,
        "statusReason": None,
        "intent": None,
        "category": None,
        "reportedBoolean": False,
        "medicationCodeableConcept": medication_concept(p.medication),
        "subject": ctx.patient,
        "authoredOn": None,
        "requester": ctx.practitioner(p.prescriber_id),
        "reasonReference": [ctx.condition(p.indication_id)] if p.indication_id else None,
        "courseOfTherapyType": None,
        "note": None,
        "dosageInstruction": [dosage(p)],
        "dispenseRequest": None,
        "substitution": None,
        "priorPrescription": None,
    }


def prescription_resource(ctx: MappingContext, p: Prescription) -> JSON:
    """One prescription as a US Core MedicationRequest (intent ``order``)."""
    # R4 has no element for a product's DEA schedule nor for "this treats a substance-use
    # disorder" (MAT), and pharmacies and Part 2 labelling need both: project extensions.
    extensions = [extension("dea-schedule", valueCode=p.dea_schedule)] if p.dea_schedule else []
    extensions.append(extension("medication-assisted-treatment", valueBoolean=p.mat))
    dispense = {
        "numberOfRepeatsAllowed": p.refills,
        "quantity": quantity(p.quantity, p.medication),
        "expectedSupplyDuration": ucum_quantity(p.days_supply, "d", "days"),
        "performer": ctx.pharmacy(p.pharmacy_id) if p.pharmacy_id else None,
    }
    resource = _request(ctx, KIND, p.id, p)
    resource.update(
        extension=extensions,
        status=p.status,
        statusReason=concept(text=p.status_reason),
        intent="order",
        category=[category(p.setting)],
        authoredOn=fhir_date(p.written),
        courseOfTherapyType=concept(coding(MEDREQ_COURSE, p.course, COURSES[p.course])),
        dispenseRequest=drop_empty(dispense),
        substitution={"allowedBoolean": p.substitution_allowed},
        priorPrescription=ctx.prescription(p.replaces_id) if p.replaces_id else None,
    )
    return drop_empty(resource)


def discharge_medication_resource(ctx: MappingContext, entry: DischargeMedication, discharged: dt.date) -> JSON:
    """One discharge reconciliation entry: the prescription's regimen as a plan, with its disposition."""
    p = ctx.prescriptions[entry.prescription_id]
    resource = _request(ctx, DISCHARGE_KIND, entry.prescription_id, p)
    resource.update(
        # R4 status cannot tell "changed" from "continue": the disposition is an extension.
        extension=[extension("discharge-disposition", valueCode=entry.disposition)],
        status="stopped" if entry.disposition == "stopped" else "active",
        intent="plan",
        category=[category("discharge")],
        authoredOn=fhir_date(discharged),
        note=[{"text": entry.note}] if entry.note else None,
        priorPrescription=ctx.prescription(entry.prescription_id),
    )
    return drop_empty(resource)


# --- reverse: shared readers --------------------------------------------------------------------


def quantity_from_fhir(value: Any, r: ItemReader, path: str, *, required: bool = True) -> JSON | None:
    """A dose-like Quantity as contract JSON ``{"value", "unit"}`` with a unit the contract takes.

    Unit words foreign systems use (``tablet``, ``MG``) are read as their UCUM codes (reported).
    A problem is an error when the quantity is ``required``, else a warning (then it is dropped).
    """
    problem = r.error if required else r.warning
    parts = quantity_parts(as_dict(value))
    if parts is None or not isinstance(parts[1], str):
        problem(path, "no quantity with a value and a unit" + ("; left out" if required else "; dropped"))
        return None
    amount, unit = parts
    ucum = unit if unit in DOSE_UNITS else UNIT_SYNONYMS.get(unit.lower())
    if ucum is None:
        problem(path, f"unit {unit!r} is not one the record takes ({', '.join(sorted(DOSE_UNITS))})")
        return None
    if not amount.is_finite() or amount < 0:
        problem(path, f"value {amount} is not a usable amount")
        return None
    if ucum != unit:
        r.info(path, f"unit {unit!r} read as UCUM {ucum!r}")
    return {"value": number(amount), "unit": ucum}


def route_from_fhir(value: Any) -> str | None:
    """A contract route from a CodeableConcept in SNOMED CT, HL7 v3 RouteOfAdministration or words."""
    value = as_dict(value)
    route = ROUTES_SNOMED.get(code_in(value, SNOMED) or "") or ROUTES_V3.get(code_in(value, V3_ROUTE) or "")
    if route is None:
        words = (concept_text(value, codes=True) or "").lower()
        route = next((name for name in ROUTES if name in words), None)
    return route


def medication_from_fhir(resource: JSON, index: ResourceIndex, r: ItemReader) -> JSON | None:
    """The product (RxNorm code and display) of a MedicationRequest-like resource, or None (reported)."""
    path = "medicationCodeableConcept"
    value = as_dict(resource.get(path))
    if not value and "medicationReference" in resource:
        path = "medicationReference"
        target = index.resolve(reference_text(resource.get(path)), resource)
        if not isinstance(target, dict) or target.get("resourceType") != "Medication":
            r.error(path, "does not name a Medication in the input; the product is unknown")
            return None
        value = as_dict(target.get("code"))
    rxnorm = [c for c in codings_of(value) if c.get("system") == RXNORM]
    usable = [c for c in rxnorm if isinstance(c.get("code"), str) and re.fullmatch(r"[0-9]{1,8}", c["code"])]
    if not usable:
        r.error(path, "no RxNorm code; the record names products by RxNorm only")
        return None
    chosen = usable[0]
    known = terminology.medication(chosen["code"])
    display = nonempty(chosen.get("display")) or nonempty(value.get("text")) or (known or {}).get("display")
    if display is None:
        r.error(path, f"RxNorm {chosen['code']} has no display and the gateway does not know it")
        return None
    if len(usable) > 1:
        r.info(path, f"{len(usable)} RxNorm codings; the first ({chosen['code']}) is kept")
    return {"rxnorm": chosen["code"], "display": display}


# --- reverse: prescriptions ---------------------------------------------------------------------


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Fill ``prescriptions`` and, when there are discharge entries, ``discharge.aftercare.medications``."""
    requests = [res for res in index.of_type("MedicationRequest") if isinstance(res, dict)]
    discharge = [res for res in requests if _is_discharge_medication(res)]
    orders = [res for res in requests if not _is_discharge_medication(res)]
    known = {name: known_ids(draft, name) for name in ("care_team", "pharmacies", "diagnoses")}
    sources: dict[str, JSON] = {}
    read = first_of_each(lambda res: _read_prescription(res, index, known, report), "id", sources, report)
    prescriptions = read_each(orders, read, report)
    for p in prescriptions:
        prior = p.get("replaces_id")
        if prior is not None and (prior not in sources or prior == p["id"]):
            report.warning(where(sources[p["id"]], "priorPrescription"), f"prescription {prior!r} was not mapped; link dropped")
            del p["replaces_id"]
    draft["prescriptions"] = prescriptions
    mapped = set(sources)
    read = first_of_each(lambda res: _read_discharge_medication(res, index, mapped, report), "prescription_id", {}, report)
    entries = read_each(discharge, read, report)
    if entries:
        # care_plan owns the rest of discharge/aftercare: set only this list.
        draft.setdefault("discharge", {}).setdefault("aftercare", {})["medications"] = entries


def _is_discharge_medication(resource: JSON) -> bool:
    return identifier_kind(resource, (DISCHARGE_KIND,)) is not None


def _read_prescription(resource: JSON, index: ResourceIndex, known: dict[str, set[str] | None], report: MappingReport) -> JSON | None:
    r = ItemReader(resource, report)
    pid = local_id(resource, KIND, report)
    if pid is None:
        r.error("identifier", "no prescription identifier nor usable id; left out", code="required")
        return None
    if resource.get("doNotPerform") is True:
        r.leave_out("doNotPerform", "a do-not-perform request is not a prescription; left out")
        return None
    if as_list(resource.get("modifierExtension")):
        r.leave_out("modifierExtension", "modifier extensions the record cannot carry may change the meaning; left out")
        return None
    item: JSON = {"id": pid}
    status = resource.get("status")
    if status in STATUSES:
        item["status"] = status
    else:
        r.error("status", f"status {status!r} has no counterpart in the record")
    if resource.get("intent") not in ORDER_INTENTS:
        r.warning("intent", f"intent {resource.get('intent')!r} is not an order; mapped as a prescription")
    medication = medication_from_fhir(resource, index, r)
    if medication is not None:
        item["medication"] = medication
    written = parse_date(resource.get("authoredOn"))
    if written is None:
        r.error("authoredOn", "no full date written (authoredOn)", code="required")
    else:
        item["written"] = written.isoformat()
    _prescriber(resource, index, known["care_team"], item, r)
    dosages = as_list(resource.get("dosageInstruction"))
    if len(dosages) > 1:
        r.warning("dosageInstruction", f"only the first dosage is carried; {len(dosages) - 1} more (tapers, split doses) dropped")
    item.update(dosage_from_fhir(as_dict(dosages[0]) if dosages else {}, medication, r))
    _start(resource, written, item, r)
    _dispense(resource, index, known["pharmacies"], item, r)
    _classification(resource, medication, item, r)
    _links(resource, index, known["diagnoses"], item, r)
    for element in ("note", "priority", "performer", "performerType", "basedOn", "groupIdentifier"):
        if element in resource:
            r.warning(element, "the record has no place for this; dropped")
    return r.checked(Prescription, item)


def _prescriber(resource: JSON, index: ResourceIndex, team: set[str] | None, item: JSON, r: ItemReader) -> None:
    # The contract needs a prescriber from the care team (controlled-substance rules hang on
    # them); an outside prescriber we cannot name is an error, not a guess.
    prescriber = practitioner_id(index, resource.get("requester"), resource)
    if prescriber is None:
        r.error("requester", "no requester naming a Practitioner in the input; a prescription needs its prescriber", code="required")
    elif team is not None and prescriber not in team:
        r.error("requester", f"prescriber {prescriber!r} is not a care-team member of the record")
    else:
        item["prescriber_id"] = prescriber


def dosage_from_fhir(value: JSON, medication: JSON | None, r: ItemReader, path: str = "dosageInstruction[0]") -> JSON:
    """Contract dosage fields (instructions, dose, route, as_needed, timing, start/end) of one Dosage."""
    out: JSON = {}
    text, patient = nonempty(value.get("text")), nonempty(value.get("patientInstruction"))
    if text or patient:
        out["instructions"] = text or patient
        if text and patient and text != patient:
            r.warning(f"{path}.patientInstruction", "differs from the dosage text, which alone is carried")
    rates = as_list(value.get("doseAndRate"))
    first = as_dict(rates[0]) if rates else {}
    if len(rates) > 1:
        r.warning(f"{path}.doseAndRate", "only the first dose is carried")
    dose_value = first.get("doseQuantity")
    if dose_value is None and "doseRange" in first:
        dose_range = as_dict(first["doseRange"])
        low, high = quantity_parts(as_dict(dose_range.get("low"))), quantity_parts(as_dict(dose_range.get("high")))
        if low is not None and low == high:
            dose_value = dose_range["low"]
            r.info(f"{path}.doseAndRate[0].doseRange", "a range with equal ends read as one dose")
        else:
            r.error(f"{path}.doseAndRate[0].doseRange", "a dose range cannot be carried; the record needs one dose")
    if dose_value is not None or "doseRange" not in first:
        dose = quantity_from_fhir(dose_value, r, f"{path}.doseAndRate[0].doseQuantity")
        if dose is not None:
            out["dose"] = dose
    for rate in ("rateQuantity", "rateRange", "rateRatio"):
        if rate in first:
            r.warning(f"{path}.doseAndRate[0].{rate}", "a rate cannot be carried; dropped")
    route = _route(value, medication, r, path)
    if route is not None:
        out["route"] = route
    if value.get("asNeededBoolean") is True:
        out["as_needed"] = True
    elif isinstance(value.get("asNeededCodeableConcept"), dict):
        out["as_needed"] = True
        reason = concept_text(value["asNeededCodeableConcept"], codes=True)
        if reason is not None:
            out["as_needed_reason"] = reason
    for element in ("site", "method", "additionalInstruction", "maxDosePerPeriod", "maxDosePerAdministration", "maxDosePerLifetime"):
        if element in value:
            r.warning(f"{path}.{element}", "the record has no place for this; dropped")
    out.update(timing_from_fhir(as_dict(value.get("timing")), r, f"{path}.timing"))
    return out


def _route(value: JSON, medication: JSON | None, r: ItemReader, path: str) -> str | None:
    route = route_from_fhir(value.get("route"))
    if route is not None:
        return route
    # A product's dose form fixes its route ("... Oral Tablet"): the drug table may know it.
    known = terminology.medication(medication["rxnorm"]) if medication else None
    if known is None:
        r.error(f"{path}.route", "no route the record knows, and the product does not tell it", code="required")
        return None
    (r.warning if "route" in value else r.info)(f"{path}.route", f"route {known['route']!r} taken from the product's dose form")
    return known["route"]


def timing_from_fhir(value: JSON, r: ItemReader, path: str) -> JSON:
    """``timing`` (frequency per period, times of day) and ``start``/``end`` from a Timing."""
    repeat = as_dict(value.get("repeat"))
    frequency, period, unit = repeat.get("frequency"), repeat.get("period"), repeat.get("periodUnit")
    abbreviation = code_in(value.get("code"), V3_TIMING_ABBREVIATION)
    if period is None and abbreviation in TIMING_CODES:
        frequency, period, unit = TIMING_CODES[abbreviation]
        r.info(f"{path}.code", f"timing {abbreviation} read as {frequency} per {period} {unit}")
    if frequency is None and period is not None:
        frequency = 1  # R4 Timing.repeat.frequency: absent means once per period
        r.info(f"{path}.repeat.frequency", "absent: once per period")
    amount, times = to_decimal(period), to_decimal(frequency)
    if unit == "a" and amount is not None:
        amount, unit = amount * 12, "mo"  # a year is exactly 12 months
    out: JSON = {}
    usable = [n is not None and n.is_finite() and n > 0 for n in (amount, times)]
    if not all(usable) or times != times.to_integral_value() or unit not in PERIOD_UNITS:
        r.error(f"{path}.repeat", "no frequency per period in hours, days, weeks or months", code="required")
    else:
        clock = [parse_time(t) for t in as_list(repeat.get("timeOfDay"))]
        if None in clock:
            r.warning(f"{path}.repeat.timeOfDay", "times that are not hh:mm:ss dropped")
        kept = [t.isoformat() for t in clock if t is not None]
        out["timing"] = {"frequency": int(times), "period": number(amount), "period_unit": unit, "times_of_day": kept}
    for element in NOT_CARRIED_REPEAT:
        if element in repeat:
            r.warning(f"{path}.repeat.{element}", "the record has no place for this; dropped")
    bounds = as_dict(repeat.get("boundsPeriod"))
    for key in ("start", "end"):
        day = parse_date(bounds.get(key))
        if day is not None:
            out[key] = day.isoformat()
        elif key in bounds:
            r.warning(f"{path}.repeat.boundsPeriod.{key}", f"{bounds[key]!r} is not a full date; dropped")
    return out


def _start(resource: JSON, written: dt.date | None, item: JSON, r: ItemReader) -> None:
    if "start" in item or written is None:
        return
    # An order takes effect when written unless it says otherwise (validity or bounds).
    validity = parse_date(as_dict(as_dict(resource.get("dispenseRequest")).get("validityPeriod")).get("start"))
    start = validity if validity is not None and validity >= written else written
    item["start"] = start.isoformat()
    r.warning("dosageInstruction[0].timing.repeat.boundsPeriod.start", f"no therapy start; {start.isoformat()} assumed (valid/written)")


def _dispense(resource: JSON, index: ResourceIndex, pharmacies: set[str] | None, item: JSON, r: ItemReader) -> None:
    dispense = as_dict(resource.get("dispenseRequest"))
    amount = quantity_from_fhir(dispense.get("quantity"), r, "dispenseRequest.quantity")
    if amount is not None:
        item["quantity"] = amount
    days = _days_supply(dispense.get("expectedSupplyDuration"))
    if days is None and amount is not None and "dose" in item and "timing" in item:
        days = days_supply_for(amount, item["dose"], item["timing"])
        if days is not None:
            r.warning("dispenseRequest.expectedSupplyDuration", f"absent or not in days; {days} days worked out as quantity / daily dose")
    if days is None:
        r.error("dispenseRequest.expectedSupplyDuration", "no days supply (1-365 days) and none to work out", code="required")
    else:
        item["days_supply"] = days
    refills = dispense.get("numberOfRepeatsAllowed")
    if refills is None:
        item["refills"] = 0  # no repeats stated: the pharmacy fills once
        r.info("dispenseRequest.numberOfRepeatsAllowed", "absent: no refills")
    elif isinstance(refills, int) and not isinstance(refills, bool):
        item["refills"] = refills
    else:
        r.error("dispenseRequest.numberOfRepeatsAllowed", f"{refills!r} is not a number of refills")
    if "performer" in dispense:
        pharmacy = referenced_id(index, dispense["performer"], resource, ("Organization",), "pharmacy", shared=True)
        if pharmacy is None or (pharmacies is not None and pharmacy not in pharmacies):
            r.warning("dispenseRequest.performer", "not a pharmacy of the record; dropped")
        else:
            item["pharmacy_id"] = pharmacy
    for element in ("validityPeriod", "initialFill", "dispenseInterval"):
        if element in dispense:
            r.warning(f"dispenseRequest.{element}", "the record has no place for this; dropped")
    substitution = as_dict(resource.get("substitution"))
    if isinstance(substitution.get("allowedBoolean"), bool):
        item["substitution_allowed"] = substitution["allowedBoolean"]
    elif "allowedCodeableConcept" in substitution:
        # v3 substanceAdminSubstitution: N = none allowed; every other code allows some.
        item["substitution_allowed"] = code_in(substitution["allowedCodeableConcept"], V3_SUBSTITUTION) != "N"


def _days_supply(value: Any) -> int | None:
    parts = quantity_parts(as_dict(value))
    if parts is None or not isinstance(parts[1], str) or parts[1].lower() not in DAYS_PER:
        return None
    days = parts[0] * DAYS_PER[parts[1].lower()]
    return int(days) if days == days.to_integral_value() and 1 <= days <= 365 else None


def days_supply_for(amount: JSON, dose: JSON, timing: JSON) -> int | None:
    """Whole days one fill lasts at the prescribed rate (quantity / daily dose), if units allow.

    The pharmacy's own rule for days supply; None when quantity and dose are in different
    units, the period is in months (no fixed length) or the result is outside 1-365.
    """
    per_day = PER_DAY.get(timing["period_unit"])
    dose_value, quantity_value = to_decimal(dose["value"]), to_decimal(amount["value"])
    if per_day is None or amount["unit"] != dose["unit"] or not dose_value or quantity_value is None:
        return None
    daily = dose_value * timing["frequency"] * per_day / to_decimal(timing["period"])
    days = int(quantity_value / daily)
    return days if 1 <= days <= 365 else None


def _classification(resource: JSON, medication: JSON | None, item: JSON, r: ItemReader) -> None:
    """Setting, course, status reason, DEA schedule and MAT flag."""
    for i, cat in enumerate(as_list(resource.get("category"))):
        code = code_in(cat, MEDREQ_CATEGORY)
        if code in SETTINGS:
            item["setting"] = code
            break
        if code is not None:
            r.warning(f"category[{i}]", f"category {code!r} is not an IOP setting; the record's default applies")
    course = resource.get("courseOfTherapyType")
    if course is not None:
        code = code_in(course, MEDREQ_COURSE)
        if code in COURSES:
            item["course"] = code
        else:
            r.warning("courseOfTherapyType", "not a medicationrequest-course-of-therapy code; the record's default applies")
    reason = concept_text(resource.get("statusReason"), codes=True)
    if reason is not None:
        item["status_reason"] = reason
    ours = own_extensions(resource, r.report, r.at())
    schedule = as_dict(ours.get("dea-schedule")).get("valueCode")
    mat = as_dict(ours.get("medication-assisted-treatment")).get("valueBoolean")
    # We always write the MAT flag and write a schedule only for controlled products, so a
    # MAT flag without a schedule means "not controlled"; without either, the drug table decides.
    ours_complete = isinstance(mat, bool) and (schedule is None or schedule in DEA_SCHEDULES)
    if not ours_complete:
        known = terminology.medication(medication["rxnorm"]) if medication else None
        if schedule is not None and schedule not in DEA_SCHEDULES:
            r.warning("extension", f"DEA schedule {schedule!r} is not II, III, IV or V; dropped")
            schedule = None
        if known is None:
            if medication is not None:
                unknown = f"RxNorm {medication['rxnorm']} is not in the drug table"
                r.warning("medicationCodeableConcept", f"{unknown}: DEA schedule and MAT use unknown, taken as none")
        else:
            schedule = schedule or known["dea_schedule"]
            mat = mat if isinstance(mat, bool) else known["mat"]
            r.info("medicationCodeableConcept", f"DEA schedule ({schedule or 'none'}) and MAT use ({mat}) from the drug table")
    if schedule:
        item["dea_schedule"] = schedule
    item["mat"] = bool(mat)


def _links(resource: JSON, index: ResourceIndex, diagnoses: set[str] | None, item: JSON, r: ItemReader) -> None:
    """Indication (a diagnosis) and the prescription this one replaces."""
    reasons = as_list(resource.get("reasonReference"))
    indication = referenced_id(index, reasons[0], resource, ("Condition",), "diagnosis") if reasons else None
    if indication is None:
        indication = _condition_with_code(index, resource.get("reasonCode"))
        if indication is not None:
            r.info("reasonCode", f"indication {indication!r}: the Condition with the same ICD-10-CM code")
    if indication is not None and (diagnoses is None or indication in diagnoses):
        item["indication_id"] = indication
    elif reasons or resource.get("reasonCode"):
        r.warning("reasonReference", "the reason is not one of the record's diagnoses; dropped")
    if len(reasons) > 1:
        r.warning("reasonReference", "the record keeps one indication; further reasons dropped")
    if "priorPrescription" in resource:
        prior = referenced_id(index, resource["priorPrescription"], resource, ("MedicationRequest",), KIND)
        if prior is None:
            r.warning("priorPrescription", "not a prescription in the input; dropped")
        else:
            item["replaces_id"] = prior


def _condition_with_code(index: ResourceIndex, reason_codes: Any) -> str | None:
    codes = {code_in(c, ICD10CM) for c in as_list(reason_codes)} - {None}
    for condition in index.of_type("Condition"):
        if isinstance(condition, dict) and code_in(condition.get("code"), ICD10CM) in codes:
            return local_id(condition, "diagnosis")
    return None


# --- reverse: discharge medications -------------------------------------------------------------


def _read_discharge_medication(resource: JSON, index: ResourceIndex, mapped: set[str], report: MappingReport) -> JSON | None:
    r = ItemReader(resource, report)
    prescription = referenced_id(index, resource.get("priorPrescription"), resource, ("MedicationRequest",), KIND)
    if prescription is None:
        # Our identifier's value is the prescription id itself.
        prescription = local_id(resource, DISCHARGE_KIND)
        r.info("priorPrescription", "not in the input; the discharge-medication identifier names the prescription")
    if prescription not in mapped:
        r.error("priorPrescription", f"prescription {prescription!r} is not among the mapped prescriptions; entry left out")
        return None
    item: JSON = {"prescription_id": prescription}
    disposition = as_dict(own_extensions(resource).get("discharge-disposition")).get("valueCode")
    if disposition not in DISPOSITIONS:
        status = resource.get("status")
        disposition = "stopped" if status in INACTIVE_PRESCRIPTION else "continue" if status == "active" else None
        if disposition is None:
            r.error("extension", "no discharge disposition, and the status does not tell it", code="required")
            return None
        r.warning("extension", f"no discharge disposition; {disposition!r} read from status {status!r}")
    item["disposition"] = disposition
    notes = note_texts(resource.get("note"))
    if notes:
        item["note"] = notes[0]
    if len(notes) > 1:
        r.warning("note", "the record keeps one note per discharge medication; further notes dropped")
    return r.checked(DischargeMedication, item)
