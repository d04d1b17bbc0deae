"""A whole record <-> one FHIR transaction Bundle; composes the per-family mappers.

Forward: each family module's ``to_fhir(ctx)`` gives its resources; they are put in an
order that resolves references (parties and the patient before what points at them), and
each entry is a conditional update on its business identifier, so a resend upserts.
References between entries are ``urn:uuid:`` ids that equal the entries' ``fullUrl``; the
receiving server rewrites them to whatever ids it assigns.

Back: ``bundle_to_record`` indexes the resources and lets each family's
``from_fhir(index, draft, report)`` fill its part of a JSON-shaped draft record, then
validates the draft against the contract. Whatever could not be mapped is in the report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from iop_fhir.errors import RecordInvalid
from iop_fhir.mappers import (
    care_plan,
    care_team,
    condition,
    consent,
    encounter,
    episode,
    medication_request,
    medication_review,
    observation,
    organization,
    patient,
    provenance,
)
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.ids import Ids
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import IopRecord
from iop_fhir.record.validate import validate_record

JSON = dict[str, Any]

# The order families are mapped in (and read back in: parties and the patient first, so the
# reverse of later families can resolve references to them). The bundle's entry order is
# then made reference-resolving by ``_dependency_order``.
FAMILIES: tuple[ModuleType, ...] = (
    organization,
    patient,
    care_team,
    condition,
    episode,
    medication_request,
    medication_review,
    encounter,
    observation,
    care_plan,
    consent,
    provenance,
)


def record_to_resources(record: IopRecord) -> list[JSON]:
    """Every FHIR resource a record maps to, each after the resources it references."""
    ctx = MappingContext(record)
    resources: list[JSON] = []
    for family in FAMILIES:
        if family is provenance:
            resources.extend(provenance.to_fhir(ctx, resources))
        else:
            resources.extend(family.to_fhir(ctx))
    return _dependency_order(resources)


def _references(value: Any, found: list[str]) -> list[str]:
    """Every ``urn:uuid:`` reference inside a resource (the entries it depends on)."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref.startswith("urn:uuid:"):
            found.append(ref[9:])
        for item in value.values():
            if isinstance(item, (dict, list)):
                _references(item, found)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)):
                _references(item, found)
    return found


def _dependency_order(resources: list[JSON]) -> list[JSON]:
    """A stable topological order: each resource after those it references.

    Record order can put a replacement prescription before the one it replaces, so family
    order alone does not resolve every reference. Ties keep mapping order, so the output
    stays deterministic; a reference cycle (none exists by design) keeps the cycle's order.
    """
    by_id = {r["id"]: i for i, r in enumerate(resources)}
    placed: list[bool] = [False] * len(resources)
    ordered: list[JSON] = []

    def place(i: int, visiting: set[int]) -> None:
        if placed[i] or i in visiting:
            return
        visiting.add(i)
        for target in _references(resources[i], []):
            j = by_id.get(target)
            if j is not None and j != i:
                place(j, visiting)
        visiting.discard(i)
        placed[i] = True
        ordered.append(resources[i])

    for i in range(len(resources)):
        place(i, set())
    return ordered


def record_to_bundle(record: IopRecord) -> JSON:
    """One transaction Bundle whose entries upsert by business identifier."""
    entries = [_entry(resource) for resource in record_to_resources(record)]
    return {
        "resourceType": "Bundle",
        "id": record_bundle_id(record),
        "type": "transaction",
        "entry": entries,
    }


def record_bundle_id(record: IopRecord) -> str:
    """The Bundle's id: a name-based UUID of the episode, like every resource id."""
    return Ids(record.program.id, record.id, record.program.identifier_system).id("Bundle", "episode", record.id, shared=True)


def _entry(resource: JSON) -> JSON:
    rtype = resource["resourceType"]
    if "identifier" in resource:
        identifier = resource["identifier"][0]
        url = f"{rtype}?identifier={identifier['system']}|{identifier['value']}"
    else:
        # R4 Provenance has no identifier element: its deterministic id makes the write idempotent.
        url = f"{rtype}/{resource['id']}"
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource, "request": {"method": "PUT", "url": url}}


@dataclass
class ReverseResult:
    """What came back from FHIR: the record if it satisfies the contract, the draft always."""

    record: IopRecord | None
    draft: JSON
    report: MappingReport


def resources_to_record(resources: Iterable[JSON]) -> ReverseResult:
    return _reverse(ResourceIndex.build(resources))


def bundle_to_record(bundle: JSON) -> ReverseResult:
    """A Bundle (any type) back to an IOP record, with a report of what did not map."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        report = MappingReport()
        report.error("Bundle", "expected a FHIR Bundle", code="structure")
        return ReverseResult(None, {}, report)
    return _reverse(ResourceIndex.from_bundle(bundle))


# Resource types some family's from_fhir reads. Anything else has no place in the record and
# is reported, never silently dropped (a MedicationStatement from an EHR, say).
READ_TYPES = frozenset({
    "Organization", "Practitioner", "PractitionerRole", "CareTeam", "Patient", "EpisodeOfCare",
    "Condition", "MedicationRequest", "Medication", "Task", "Encounter", "Observation",
    "DiagnosticReport", "CarePlan", "Goal", "Consent", "Provenance",
})


def _reverse(index: ResourceIndex) -> ReverseResult:
    report = MappingReport()
    draft: JSON = {"version": "iop-record/1"}
    for family in FAMILIES:
        family.from_fhir(index, draft, report)
    for resource_type, resources in index.by_type.items():
        if resource_type not in READ_TYPES:
            for resource in resources:
                report.warning(
                    f"{resource_type}/{resource.get('id', '?')}",
                    f"the IOP record has no place for a {resource_type or 'resource without a type'}; not mapped",
                )
    try:
        record = validate_record(draft)
    except RecordInvalid as exc:
        for issue in exc.issues:
            report.error(f"record{issue.location}", issue.message, code=issue.code)
        record = None
    return ReverseResult(record, draft, report)
