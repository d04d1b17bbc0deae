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
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import IopRecord
from iop_fhir.record.validate import validate_record

JSON = dict[str, Any]

# Dependency order: a family only points at families before it (Provenance points at all).
FAMILIES: tuple[ModuleType, ...] = (
    organization,
    care_team,
    patient,
    episode,
    condition,
    medication_request,
    medication_review,
    encounter,
    observation,
    care_plan,
    consent,
    provenance,
)


def record_to_resources(record: IopRecord) -> list[JSON]:
    """Every FHIR resource a record maps to, in reference-resolving order (Provenance last)."""
    ctx = MappingContext(record)
    resources: list[JSON] = []
    for family in FAMILIES:
        if family is provenance:
            resources.extend(provenance.to_fhir(ctx, resources))
        else:
            resources.extend(family.to_fhir(ctx))
    return resources


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
    ctx = MappingContext(record)
    return ctx.ids.id("Bundle", "episode", record.id, shared=True)


def _entry(resource: JSON) -> JSON:
    identifier = resource["identifier"][0]
    return {
        "fullUrl": f"urn:uuid:{resource['id']}",
        "resource": resource,
        "request": {
            "method": "PUT",
            "url": f"{resource['resourceType']}?identifier={identifier['system']}|{identifier['value']}",
        },
    }


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


def _reverse(index: ResourceIndex) -> ReverseResult:
    report = MappingReport()
    draft: JSON = {"version": "iop-record/1"}
    for family in FAMILIES:
        family.from_fhir(index, draft, report)
    try:
        record = validate_record(draft)
    except RecordInvalid as exc:
        for issue in exc.issues:
            report.error(f"record{issue.location}", issue.message, code=issue.code)
        record = None
    return ReverseResult(record, draft, report)
