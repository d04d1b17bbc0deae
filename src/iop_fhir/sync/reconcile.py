"""Reconciling what an EHR holds with what the IOP holds.

Three parts, shared by the pull (:mod:`~iop_fhir.sync.pull`) and the intake medication
reconciliation view (``GET /iop/records/{id}/reconciliation``):

* **Echoes and conflicts.** A resource pulled from an EHR that carries one of *our* business
  identifiers (a system under ``{CANONICAL}/sid/`` or a program's ``identifier_system``) is
  the EHR's copy of something the gateway delivered, not a new fact. When its clinically
  meaningful content differs from our current version, the IOP's record is not overwritten:
  :func:`conflict_task` raises a ``Task`` (status ``requested``, intent ``proposal``, code
  ``sync#reconcile-conflict``) for a clinician to settle. Its identifier derives from the
  destination, the foreign id and the foreign version, so pulling the same change again never
  duplicates it.
* **What "clinically meaningful" is.** :data:`CLINICAL` names, per type, the elements whose
  change matters to care (status, medication, dosage, value, dates, ...). Identifiers,
  narrative, ``meta`` and references are left out on purpose: an EHR adds its own identifiers
  and narrative, and its references point at its own ids, so comparing them would flag every
  echo. Within the compared elements, codings compare without ``display`` (displays drift),
  numbers by value (``1.50`` = ``1.5``) and instants by the moment they name.
* **Outside medications.** Pulled MedicationRequest, MedicationStatement and
  MedicationDispense resources go through the reverse mappers' product and dosage readers
  (:func:`~iop_fhir.mappers.medication_request.medication_from_fhir`,
  :func:`~iop_fhir.mappers.medication_request.dosage_from_fhir`) as far as they go; what they
  cannot read is in the mapping report, never dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from decimal import Decimal
from typing import Any

import orjson

from iop_fhir import terminology
from iop_fhir.api.operations import every
from iop_fhir.errors import Issue
from iop_fhir.mappers import medication_request as medication_mapper
from iop_fhir.mappers.context import ResourceIndex, identifier_base, local_id
from iop_fhir.mappers.datatypes import (
    ItemReader,
    as_dict,
    as_list,
    code_in,
    coding,
    concept,
    identifiers_in,
    nonblank,
    parse_datetime,
)
from iop_fhir.mappers.episode import KIND as EPISODE_KIND
from iop_fhir.mappers.ids import resource_id
from iop_fhir.mappers.report import MappingReport
from iop_fhir.store import Saved, Store, UnitOfWork
from iop_fhir.store.search_index import token_value
from iop_fhir.terminology import CANONICAL, SYNC, SYNC_SOURCE

JSON = dict[str, Any]
Ops = Store | UnitOfWork

CONFLICT = "reconcile-conflict"
# Identifier system of conflict Tasks; values are "{destination}/{Type}/{foreign id}/{foreign version}".
CONFLICT_SYSTEM = f"{CANONICAL}/sid/sync/{CONFLICT}"
OUR_SYSTEMS = f"{CANONICAL}/sid/"
MEDICATION_TYPES = ("MedicationRequest", "MedicationStatement", "MedicationDispense")
# Task statuses that still ask for someone's attention.
OPEN_TASK = frozenset({"draft", "requested", "received", "accepted", "ready", "in-progress", "on-hold"})

# Per type, the elements whose change matters to care; "name[x]" is a choice element.
CLINICAL: dict[str, tuple[str, ...]] = {
    "MedicationRequest": (
        "status", "intent", "doNotPerform", "medication[x]", "dosageInstruction", "dispenseRequest", "substitution",
    ),
    "MedicationStatement": ("status", "medication[x]", "effective[x]", "dosage"),
    "MedicationDispense": ("status", "medication[x]", "quantity", "daysSupply", "whenHandedOver", "dosageInstruction"),
    "Observation": ("status", "code", "value[x]", "effective[x]", "component", "interpretation"),
    "Condition": ("clinicalStatus", "verificationStatus", "code", "severity", "onset[x]", "abatement[x]"),
    "AllergyIntolerance": ("clinicalStatus", "verificationStatus", "code", "criticality", "reaction"),
    "CarePlan": ("status", "intent", "period", "activity"),
}  # fmt: skip
# For any other type: everything but what every server rewrites or adds of its own.
NOT_CLINICAL = frozenset({"resourceType", "id", "meta", "text", "identifier", "extension", "contained"})
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T")


# --- whose is it --------------------------------------------------------------------------------


def program_bases(patients: Iterable[JSON]) -> frozenset[str]:
    """The identifier-system bases of the programs our patients belong to (from their MRN systems)."""
    bases = {identifier_base(p, "mrn") for p in patients}
    return frozenset(b for b in bases if b)


def is_ours(system: str, bases: Collection[str]) -> bool:
    """Whether an identifier system is one the gateway's programs mint."""
    return system.startswith(OUR_SYSTEMS) or any(system.startswith(base + "/") for base in bases)


def our_identifier(resource: JSON, bases: Collection[str]) -> tuple[str, str] | None:
    """The first business identifier of ours a resource carries (``(system, value)``), if any."""
    for ident in identifiers_in(resource.get("identifier")):
        system, value = ident.get("system"), nonblank(ident.get("value"))
        if isinstance(system, str) and value is not None and is_ours(system, bases):
            return system, value
    return None


def source_of(resource: JSON) -> str | None:
    """The destination a pulled resource came from (its ``meta.tag`` in the ``source`` system)."""
    for tag in as_list(as_dict(resource.get("meta")).get("tag")):
        if as_dict(tag).get("system") == SYNC_SOURCE and isinstance(tag.get("code"), str):
            return tag["code"]
    return None


def source_tag(destination: str) -> JSON:
    return coding(SYNC_SOURCE, destination)


# --- what changed -------------------------------------------------------------------------------


def clinical_differences(ours: JSON, theirs: JSON) -> list[str]:
    """The clinically meaningful elements (see :data:`CLINICAL`) whose content differs, in order."""
    resource_type = str(ours.get("resourceType", ""))
    names = CLINICAL.get(resource_type)
    if names is None:
        names = tuple(sorted((set(ours) | set(theirs)) - NOT_CLINICAL))
    return [name for name in names if _comparable(_element(ours, name)) != _comparable(_element(theirs, name))]


def _element(resource: JSON, name: str) -> Any:
    """An element's value; for a choice ``value[x]``, ``(valueQuantity, {...})`` so the type counts too."""
    if not name.endswith("[x]"):
        return resource.get(name)
    stem = name[:-3]
    for key, value in resource.items():
        if key.startswith(stem) and key[len(stem) : len(stem) + 1].isupper():
            return (key, value)
    return None


def _comparable(value: Any) -> Any:
    """A normal form for comparison: no displays or literal references, numbers and instants by value."""
    if isinstance(value, dict):
        out = {k: _comparable(v) for k, v in value.items() if k not in ("display", "reference")}
        return tuple(sorted((k, v) for k, v in out.items() if v not in (None, (), "")))
    if isinstance(value, list | tuple):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        return Decimal(str(value)).normalize()
    if isinstance(value, str) and _INSTANT.match(value):
        moment = parse_datetime(value)
        return moment.astimezone(UTC).isoformat() if moment is not None else value
    return value


def _digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(repr(_comparable(value)))).hexdigest()[:16]


def conflict_task(
    destination: str,
    source_url: str,
    theirs: JSON,
    ours: Saved,
    patient_reference: str,
    differences: Sequence[str],
) -> JSON:
    """The Task that flags an EHR's change to one of our resources instead of applying it.

    Deterministic: the same foreign version gives the same id, so a repeated pull finds it.
    """
    meta = as_dict(theirs.get("meta"))
    version, changed = nonblank(meta.get("versionId")), nonblank(meta.get("lastUpdated"))
    resource_type, foreign_id = str(theirs.get("resourceType")), str(theirs.get("id"))
    # Without a version or a time, the content itself tells one change from another.
    marker = version or changed or _digest([_element(theirs, n) for n in CLINICAL.get(resource_type, ())])
    value = f"{destination}/{resource_type}/{foreign_id}/{marker}"
    described = ", ".join(differences)
    inputs = [{"type": _sync_concept("source-url"), "valueUrl": source_url}]
    if version:
        inputs.append({"type": _sync_concept("source-version"), "valueString": version})
    if changed:
        inputs.append({"type": _sync_concept("source-last-updated"), "valueInstant": changed})
    task: JSON = {
        "resourceType": "Task",
        "id": resource_id("Task", CONFLICT_SYSTEM, value),
        "meta": {"tag": [source_tag(destination)]},
        "identifier": [{"system": CONFLICT_SYSTEM, "value": value}],
        "status": "requested",
        "intent": "proposal",
        "code": _sync_concept(CONFLICT),
        "description": (
            f"{destination} changed {ours.reference} ({source_url}): {described} differ from the program's "
            f"version {ours.version}. The change was not applied; compare and reconcile."
        ),
        "focus": {"reference": ours.reference},
        "for": {"reference": patient_reference},
        "input": inputs,
    }
    if changed:
        task["authoredOn"] = changed  # when the outside change was made, so the Task stays the same on every pull
    return task


def _sync_concept(code: str) -> JSON:
    return concept(coding(SYNC, code, terminology.sync_display(code)))


# --- outside medications --------------------------------------------------------------------------


def outside_medication(resource: JSON, report: MappingReport) -> JSON:
    """One pulled medication resource as a line of the reconciliation: what the reverse
    mappers can read of it; what they cannot is in ``report``."""
    r = ItemReader(resource, report)
    resource_type = resource.get("resourceType")
    medication = medication_mapper.medication_from_fhir(resource, ResourceIndex.build([resource]), r)
    if medication is None:
        # Still worth listing: the product as the EHR named it.
        text = _product_text(resource)
        medication = {"text": text} if text else None
    dosage_element = "dosage" if resource_type == "MedicationStatement" else "dosageInstruction"
    dosages = as_list(resource.get(dosage_element))
    dosage: JSON = {}
    if dosages:
        rxnorm = medication if medication and "rxnorm" in medication else None
        dosage = medication_mapper.dosage_from_fhir(as_dict(dosages[0]), rxnorm, r, f"{dosage_element}[0]")
    return {
        "source": source_of(resource),
        "reference": f"{resource_type}/{resource.get('id')}",
        "source_url": as_dict(resource.get("meta")).get("source"),
        "resource_type": resource_type,
        "medication": medication,
        "status": resource.get("status"),
        "dose": dose_text(dosage),
        "dates": _dates(resource),
        "last_fill": _fill_date(resource) if resource_type == "MedicationDispense" else None,
    }


def _product_text(resource: JSON) -> str | None:
    value = as_dict(resource.get("medicationCodeableConcept"))
    if value.get("text"):
        return str(value["text"])
    displays = [c.get("display") for c in as_list(value.get("coding")) if isinstance(c, dict) and c.get("display")]
    if displays:
        return str(displays[0])
    return nonblank(as_dict(resource.get("medicationReference")).get("display"))


def dose_text(dosage: JSON) -> str | None:
    """A short dose line from mapped dosage fields: the sig when given, else dose and frequency."""
    if dosage.get("instructions"):
        return str(dosage["instructions"])
    parts = []
    if dosage.get("dose"):
        unit = dosage["dose"]["unit"]
        parts.append(f"{dosage['dose']['value']} {medication_mapper.unit_text(unit) or unit}")
    timing = dosage.get("timing")
    if timing:
        parts.append(f"{timing['frequency']} per {timing['period']} {timing['period_unit']}")
    if dosage.get("as_needed"):
        parts.append("as needed" + (f" for {dosage['as_needed_reason']}" if dosage.get("as_needed_reason") else ""))
    return ", ".join(parts) or None


_DATE_ELEMENTS = {
    "MedicationRequest": ("authoredOn",),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod", "dateAsserted"),
    "MedicationDispense": ("whenPrepared", "whenHandedOver"),
}


def _dates(resource: JSON) -> JSON:
    out: JSON = {}
    for name in _DATE_ELEMENTS.get(str(resource.get("resourceType")), ()):
        value = resource.get(name)
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items() if k in ("start", "end")})
        elif value is not None:
            out[name] = value
    return out


def _fill_date(dispense: JSON) -> str | None:
    value = dispense.get("whenHandedOver") or dispense.get("whenPrepared")
    return value if isinstance(value, str) else None


# --- the reconciliation view --------------------------------------------------------------------


def issue_json(issue: Issue) -> JSON:
    """An issue as the sync's JSON answers (pull results, reconciliation views) show it."""
    return {"severity": issue.severity, "code": issue.code, "location": issue.location, "message": issue.message}


@dataclass
class Reconciliation:
    """The intake medication reconciliation of one record, as ``/reconciliation`` answers it."""

    record: str
    patient: str
    prescriptions: list[JSON] = field(default_factory=list)
    outside_medications: list[JSON] = field(default_factory=list)
    conflicts: list[JSON] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    def as_json(self) -> JSON:
        return {
            "record": self.record,
            "patient": self.patient,
            "prescriptions": self.prescriptions,
            "outside_medications": self.outside_medications,
            "conflicts": self.conflicts,
            "issues": [issue_json(i) for i in self.issues],
        }


def reconciliation(ops: Ops, episode: JSON) -> Reconciliation:
    """The IOP's own prescriptions of an episode beside the outside medications pulled for its
    patient (with their last fill), and the open conflicts."""
    base = identifier_base(episode, EPISODE_KIND) or ""
    record_id = local_id(episode, EPISODE_KIND, shared=True) or ""
    patient = str(as_dict(episode.get("patient")).get("reference", ""))
    view = Reconciliation(record_id, patient)
    for saved in every(ops, "MedicationRequest", [("patient", patient), ("identifier", f"{base}/{medication_mapper.KIND}|")]):
        if local_id(saved.resource, medication_mapper.KIND) and _of_episode(saved.resource, base, record_id):
            view.prescriptions.append(_own_prescription(saved.resource))
    report = MappingReport()
    pulled = {t: every(ops, t, [("patient", patient), ("_tag", f"{SYNC_SOURCE}|")]) for t in MEDICATION_TYPES}
    dispenses = [s.resource for s in pulled["MedicationDispense"]]
    matched: set[int] = set()
    for resource_type in ("MedicationRequest", "MedicationStatement"):
        for saved in pulled[resource_type]:
            line = outside_medication(saved.resource, report)
            fills = [i for i, d in enumerate(dispenses) if _fills(d, saved)]
            matched.update(fills)
            line["last_fill"] = max((f for i in fills if (f := _fill_date(dispenses[i]))), default=None)
            view.outside_medications.append(line)
    # A fill with no order or statement behind it (a pharmacy claim, say) is still a medication taken.
    view.outside_medications += [outside_medication(d, report) for i, d in enumerate(dispenses) if i not in matched]
    view.issues = [i for i in report.issues if i.severity != "information"]
    code = token_value(SYNC, CONFLICT)
    for saved in every(ops, "Task", [("patient", patient), ("code", code)]):
        task = saved.resource
        if task.get("status") in OPEN_TASK:
            url = next((i.get("valueUrl") for i in as_list(task.get("input")) if "valueUrl" in as_dict(i)), None)
            view.conflicts.append(
                {
                    "task": saved.reference,
                    "status": task.get("status"),
                    "focus": as_dict(task.get("focus")).get("reference"),
                    "source": source_of(task),
                    "source_url": url,
                    "description": task.get("description"),
                    "authored": task.get("authoredOn"),
                }
            )
    return view


def _of_episode(resource: JSON, base: str, record_id: str) -> bool:
    return any(
        isinstance(i.get("system"), str) and i["system"].startswith(base + "/") and str(i.get("value", "")).startswith(record_id + "/")
        for i in identifiers_in(resource.get("identifier"))
    )


def _own_prescription(resource: JSON) -> JSON:
    product = as_dict(resource.get("medicationCodeableConcept"))
    rxnorm = next((c for c in as_list(product.get("coding")) if as_dict(c).get("system") == terminology.RXNORM), {})
    # Our own prescriptions always read back; the report only matters for foreign data.
    dosages = as_list(resource.get("dosageInstruction"))
    dosage = medication_mapper.dosage_from_fhir(as_dict(dosages[0]), None, ItemReader(resource, MappingReport())) if dosages else {}
    return {
        "id": local_id(resource, medication_mapper.KIND),
        "reference": f"MedicationRequest/{resource.get('id')}",
        "medication": {"rxnorm": rxnorm.get("code"), "display": rxnorm.get("display") or product.get("text")},
        "status": resource.get("status"),
        "dose": dose_text(dosage),
        "written": resource.get("authoredOn"),
        "setting": code_in(as_list(resource.get("category"))[0] if resource.get("category") else None, terminology.MEDREQ_CATEGORY),
    }


def _fills(dispense: JSON, order: Saved) -> bool:
    """Whether a dispense fills an order or statement: it names it, or dispenses the same RxNorm product."""
    for ref in as_list(dispense.get("authorizingPrescription")):
        if as_dict(ref).get("reference") == order.reference:
            return True
    mine, theirs = _rxnorm(dispense), _rxnorm(order.resource)
    return mine is not None and mine == theirs


def _rxnorm(resource: JSON) -> str | None:
    return code_in(resource.get("medicationCodeableConcept"), terminology.RXNORM)

