"""What the privacy tests share: FHIR resources of records, labelled as the store labels them,
and small hand-made resources."""

from __future__ import annotations

from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers.bundle import record_to_resources
from iop_fhir.mappers.context import ResourceIndex
from iop_fhir.privacy import label
from iop_fhir.record import IopRecord, validate_record

JSON = dict[str, Any]


def resources_of(record: dict | IopRecord) -> list[JSON]:
    """The record's resources in bundle order (what references resolves before what points at it)."""
    return record_to_resources(record if isinstance(record, IopRecord) else validate_record(record))


def stored(resources: list[JSON]) -> list[JSON]:
    """The resources labelled one after the other, each seeing its earlier ones as stored:
    what the store's write path does with a transaction Bundle."""
    index = ResourceIndex.build(resources)
    done: dict[int, JSON] = {}
    out = []
    for resource in resources:
        labelled = label(resource, lambda ref: done.get(id(index.resolve(ref))))
        done[id(resource)] = labelled
        out.append(labelled)
    return out


def of_type(resources: list[JSON], rtype: str) -> list[JSON]:
    return [r for r in resources if r["resourceType"] == rtype]


def security(resource: JSON) -> set[tuple[str, str]]:
    """(system, code) of its meta.security labels."""
    return {(c["system"], c["code"]) for c in resource.get("meta", {}).get("security", [])}


def act(code: str) -> tuple[str, str]:
    return terminology.V3_ACT_CODE, code


def conf(code: str) -> tuple[str, str]:
    return terminology.V3_CONFIDENTIALITY, code


def condition(icd10: str, rid: str = "c1", patient: str = "Patient/p1") -> JSON:
    return {
        "resourceType": "Condition",
        "id": rid,
        "code": {"coding": [{"system": terminology.ICD10CM, "code": icd10}]},
        "subject": {"reference": patient},
    }


def prescription(rxnorm: str, rid: str = "m1", patient: str = "Patient/p1", **extra: Any) -> JSON:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": terminology.RXNORM, "code": rxnorm}]},
        "subject": {"reference": patient},
        **extra,
    }


def observation(loinc: str, category: str, rid: str = "o1", patient: str = "Patient/p1", **extra: Any) -> JSON:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "category": [{"coding": [{"system": terminology.OBSERVATION_CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": terminology.LOINC, "code": loinc}]},
        "subject": {"reference": patient},
        **extra,
    }
