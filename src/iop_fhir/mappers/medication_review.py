"""Task <-> ``medication_reviews``: a prescriber's review of one prescription and its outcome.

R4 has no resource for "this medication was reviewed, with this outcome"; a completed Task
coded SNOMED CT 182836005 |Review of medication| says who reviewed which prescription, when,
why, what they decided and which new prescription a dose change or switch produced. Task
has no US Core profile, so none is claimed.

Field table (contract field -> FHIR element):

========================  ====================================================================
``id``                    ``identifier[0]`` (kind ``medication-review``); ``id`` derives from it
``date``                  ``executionPeriod.start`` (``authoredOn`` carries the same date)
``prescription_id``       ``focus`` -> MedicationRequest (kind ``prescription``)
``action``                ``input[type = medication-review-input#action].valueCode``
``reason``                ``reasonCode.text``
``new_dose``              ``input[type = medication-review-input#new-dose].valueQuantity`` (UCUM)
``new_prescription_id``   ``output[type = medication-review-output#new-prescription].valueReference``
                          -> MedicationRequest (kind ``prescription``)
``reviewer_id``           ``owner`` -> Practitioner (kind ``staff``); ``requester`` is the same
========================  ====================================================================

Derived, not read back: ``status`` completed, ``intent`` order, ``code``, ``for`` (the patient),
``authoredOn``, ``requester``, the unit text of the new dose.

Reverse: Tasks that are not medication reviews (neither our identifier nor the SNOMED code)
are ignored (information). A review needs its date, its prescription (mapped by
medication_request, which runs first), its reviewer and an action from our input code
system; without one of them it is an error and left out. Reviews not completed have no
outcome to record and are left out with a warning.
"""

from __future__ import annotations

from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers.context import MappingContext, ResourceIndex, identifier_kind, known_ids, local_id, practitioner_id, referenced_id
from iop_fhir.mappers.datatypes import (
    ItemReader,
    as_dict,
    as_list,
    code_in,
    coding,
    concept,
    concept_text,
    drop_empty,
    fhir_date,
    first_of_each,
    parse_date,
    read_each,
)
from iop_fhir.mappers.medication_request import quantity, quantity_from_fhir
from iop_fhir.mappers.medication_request import KIND as PRESCRIPTION
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import MedicationReview
from iop_fhir.terminology import SNOMED

JSON = dict[str, Any]

KIND = "medication-review"
REVIEW_CODE = "182836005"
INPUT = terminology.code_system("medication-review-input")
OUTPUT = terminology.code_system("medication-review-output")
ACTIONS = frozenset({"start", "continue", "increase", "decrease", "switch", "hold", "stop"})
# Actions whose outcome is a new prescription (validate.py requires new_prescription_id).
CHANGES = frozenset({"increase", "decrease", "switch"})
PARTS = {
    (INPUT, "action"): "Review action",
    (INPUT, "new-dose"): "New dose",
    (OUTPUT, "new-prescription"): "New prescription",
}


def part_type(system: str, code: str) -> JSON:
    """The ``type`` of one Task.input/output part in the project's review code systems."""
    return concept(coding(system, code, PARTS[(system, code)]))


# --- forward ----------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """One completed Task per medication review, in record order."""
    return [review_resource(ctx, review) for review in ctx.record.medication_reviews]


def review_resource(ctx: MappingContext, review: MedicationReview) -> JSON:
    date = fhir_date(review.date)
    reviewer = ctx.practitioner(review.reviewer_id)
    inputs = [{"type": part_type(INPUT, "action"), "valueCode": review.action}]
    if review.new_dose is not None:
        # The unit text ("tablet", "film") comes from the product the dose is of.
        product = ctx.prescriptions.get(review.new_prescription_id or review.prescription_id)
        inputs.append({"type": part_type(INPUT, "new-dose"), "valueQuantity": quantity(review.new_dose, product and product.medication)})
    outputs = []
    if review.new_prescription_id is not None:
        outputs.append({"type": part_type(OUTPUT, "new-prescription"), "valueReference": ctx.prescription(review.new_prescription_id)})
    return drop_empty(
        {
            "resourceType": "Task",
            "id": ctx.ids.id("Task", KIND, review.id),
            "identifier": [ctx.ids.identifier(KIND, review.id)],
            "status": "completed",
            "intent": "order",
            "code": concept(coding(SNOMED, REVIEW_CODE, terminology.snomed_display(REVIEW_CODE))),
            "focus": ctx.prescription(review.prescription_id),
            "for": ctx.patient,
            "executionPeriod": {"start": date},
            "authoredOn": date,
            "requester": reviewer,
            "owner": reviewer,
            "reasonCode": concept(text=review.reason),
            "input": inputs,
            "output": outputs,
        }
    )


# --- reverse ----------------------------------------------------------------------------------


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Fill ``medication_reviews`` from the Tasks that are medication reviews."""
    tasks = [task for task in index.of_type("Task") if isinstance(task, dict)]
    reviews = [task for task in tasks if is_review(task)]
    for task in tasks:
        if not is_review(task):
            ItemReader(task, report).info("code", "not a medication review; ignored")
    known = {name: known_ids(draft, name) for name in ("prescriptions", "care_team")}
    read = first_of_each(lambda task: _read_review(task, index, known, report), "id", {}, report)
    draft["medication_reviews"] = read_each(reviews, read, report)


def is_review(task: JSON) -> bool:
    """Ours (a medication-review identifier) or anyone's Task coded SNOMED CT 182836005."""
    return identifier_kind(task, (KIND,)) is not None or code_in(task.get("code"), SNOMED) == REVIEW_CODE


def _read_review(task: JSON, index: ResourceIndex, known: dict[str, set[str] | None], report: MappingReport) -> JSON | None:
    r = ItemReader(task, report)
    review_id = local_id(task, KIND, report)
    if review_id is None:
        r.error("identifier", "no medication-review identifier nor usable id; left out", code="required")
        return None
    if task.get("status") != "completed":
        r.leave_out("status", f"a {task.get('status')!r} review has no outcome yet; the record holds completed reviews only")
        return None
    item: JSON = {"id": review_id}
    period = as_dict(task.get("executionPeriod"))
    date = parse_date(period.get("start")) or parse_date(task.get("authoredOn")) or parse_date(period.get("end"))
    if date is None:
        r.error("executionPeriod", "no full date (executionPeriod or authoredOn)", code="required")
    else:
        item["date"] = date.isoformat()
    prescriptions = known["prescriptions"]
    prescription = referenced_id(index, task.get("focus"), task, ("MedicationRequest",), PRESCRIPTION)
    if prescription is None or (prescriptions is not None and prescription not in prescriptions):
        r.error("focus", "does not name a prescription of the record; a review is of one", code="required")
    else:
        item["prescription_id"] = prescription
    reviewer = practitioner_id(index, task.get("owner"), task) or practitioner_id(index, task.get("requester"), task)
    team = known["care_team"]
    if reviewer is None or (team is not None and reviewer not in team):
        r.error("owner", "neither owner nor requester is a care-team member; a review needs its reviewer", code="required")
    else:
        item["reviewer_id"] = reviewer
    reason = concept_text(task.get("reasonCode"), codes=True)
    if reason is not None:
        item["reason"] = reason
    elif "reasonReference" in task:
        r.warning("reasonReference", "the record keeps the reason as text; dropped")
    _parts(task, index, prescriptions, item, r)
    return r.checked(MedicationReview, item)


def _parts(task: JSON, index: ResourceIndex, prescriptions: set[str] | None, item: JSON, r: ItemReader) -> None:
    """Action and new dose from ``input``, the new prescription from ``output``."""
    for i, part in enumerate(as_list(task.get("input"))):
        part = as_dict(part)
        kind = code_in(part.get("type"), INPUT)
        if kind == "action" and "action" not in item:
            value = part.get("valueCode")
            if value is None:  # other writers: a CodeableConcept or a string
                coded = part.get("valueCodeableConcept")
                value = code_in(coded, INPUT) or concept_text(coded, codes=True)
                value = value if value is not None else part.get("valueString")
            if value in ACTIONS:
                item["action"] = value
            else:
                r.error(f"input[{i}]", f"action {value!r} is not one the record knows ({', '.join(sorted(ACTIONS))})")
        elif kind == "new-dose" and "new_dose" not in item:
            dose = quantity_from_fhir(part.get("valueQuantity"), r, f"input[{i}].valueQuantity", required=False)
            if dose is not None:
                item["new_dose"] = dose
        else:
            r.warning(f"input[{i}]", "an input the record has no place for; dropped")
    if "action" not in item and r.ok:
        r.error("input", f"no review action ({', '.join(sorted(ACTIONS))})", code="required")
    for i, part in enumerate(as_list(task.get("output"))):
        part = as_dict(part)
        if code_in(part.get("type"), OUTPUT) != "new-prescription" or "new_prescription_id" in item:
            r.warning(f"output[{i}]", "an output the record has no place for; dropped")
            continue
        new = referenced_id(index, part.get("valueReference"), task, ("MedicationRequest",), PRESCRIPTION)
        if new is not None and (prescriptions is None or new in prescriptions):
            item["new_prescription_id"] = new
        elif item.get("action") in CHANGES:
            r.error(f"output[{i}]", f"the new prescription of a {item['action']} is not among the record's prescriptions")
        else:
            r.warning(f"output[{i}]", "not a prescription of the record; dropped")
    if item.get("action") in CHANGES and "new_prescription_id" not in item and r.ok:
        r.error("output", f"a {item['action']} yields a new prescription, and none is named", code="required")
