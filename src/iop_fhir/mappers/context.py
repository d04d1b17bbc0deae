"""What a mapper sees: the record and its id factory going out, an index of resources coming back."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from iop_fhir.mappers.ids import Ids
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import IopRecord

JSON = dict[str, Any]
LOCAL_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


class MappingContext:
    """Forward direction: one record, its identifier factory and the lookups mappers share."""

    def __init__(self, record: IopRecord) -> None:
        self.record = record
        self.ids = Ids(record.program.id, record.id, record.program.identifier_system)

    # References to the resources every family points at. Each call gives a fresh dict, so a
    # mapper that adds to one (a display, say) cannot change it in every other resource.
    @property
    def patient(self) -> JSON:
        return self.ids.reference("Patient", "mrn", self.record.client.mrn, shared=True)

    @property
    def episode(self) -> JSON:
        return self.ids.reference("EpisodeOfCare", "episode", self.record.id, shared=True)

    @property
    def organization(self) -> JSON:
        return self.ids.reference("Organization", "organization", self.record.program.id, shared=True)

    def practitioner(self, member_id: str) -> JSON:
        return self.ids.reference("Practitioner", "staff", member_id, shared=True)

    def practitioner_role(self, member_id: str) -> JSON:
        return self.ids.reference("PractitionerRole", "staff-role", member_id, shared=True)

    def pharmacy(self, pharmacy_id: str) -> JSON:
        return self.ids.reference("Organization", "pharmacy", pharmacy_id, shared=True)

    def provider(self, provider_id: str) -> JSON:
        kind = next(p.kind for p in self.record.providers if p.id == provider_id)
        resource_type = "Organization" if kind == "organization" else "Practitioner"
        return self.ids.reference(resource_type, "provider", provider_id, shared=True)

    def condition(self, diagnosis_id: str) -> JSON:
        return self.ids.reference("Condition", "diagnosis", diagnosis_id)

    def prescription(self, prescription_id: str) -> JSON:
        return self.ids.reference("MedicationRequest", "prescription", prescription_id)

    @cached_property
    def prescriptions(self) -> dict[str, Any]:
        return {p.id: p for p in self.record.prescriptions}

    @cached_property
    def part2(self) -> bool:
        """Whether the record comes from a program treating substance-use disorders."""
        return self.record.program.focus in ("substance-use", "co-occurring")


@dataclass
class ResourceIndex:
    """Reverse direction: resources by type and by every way a reference may name them.

    References may be ``urn:uuid:...`` (inside our transaction bundles), ``Type/id``
    (after a server stored them) or absolute URLs (from other servers).
    """

    resources: list[JSON]
    by_type: dict[str, list[JSON]] = field(default_factory=lambda: defaultdict(list))
    by_reference: dict[str, JSON] = field(default_factory=dict)

    @classmethod
    def build(cls, resources: Iterable[JSON], full_urls: Iterable[str | None] = ()) -> ResourceIndex:
        index = cls(resources=[])
        urls = list(full_urls)
        for i, resource in enumerate(resources):
            index.add(resource, urls[i] if i < len(urls) else None)
        return index

    @classmethod
    def from_bundle(cls, bundle: JSON) -> ResourceIndex:
        entries = [e for e in bundle.get("entry", []) if isinstance(e.get("resource"), dict)]
        return cls.build([e["resource"] for e in entries], [e.get("fullUrl") for e in entries])

    def add(self, resource: JSON, full_url: str | None = None) -> None:
        self.resources.append(resource)
        rtype = resource.get("resourceType", "")
        self.by_type[rtype if isinstance(rtype, str) else ""].append(resource)
        rid = resource.get("id")
        if isinstance(rid, str) and rid:
            self.by_reference[f"{rtype}/{rid}"] = resource
            self.by_reference[f"urn:uuid:{rid}"] = resource
        if full_url:
            self.by_reference[full_url] = resource
        contained_list = resource.get("contained")
        for contained in contained_list if isinstance(contained_list, list) else []:
            if isinstance(contained, dict) and isinstance(contained.get("id"), str):
                self.by_reference[f"#{contained['id']}@{id(resource)}"] = contained

    def of_type(self, resource_type: str) -> list[JSON]:
        return self.by_type.get(resource_type, [])

    def resolve(self, reference: JSON | str | None, holder: JSON | None = None) -> JSON | None:
        """The resource a reference names, if it is in the index (contained ones via ``holder``)."""
        ref = reference.get("reference") if isinstance(reference, dict) else reference
        if not isinstance(ref, str) or not ref:
            return None
        if ref.startswith("#") and holder is not None:
            return self.by_reference.get(f"{ref}@{id(holder)}")
        if ref in self.by_reference:
            return self.by_reference[ref]
        parts = ref.rstrip("/").split("/")
        if len(parts) >= 2:
            # absolute URL or versioned reference: match on the trailing Type/id
            if len(parts) >= 4 and parts[-2] == "_history":
                parts = parts[:-2]
            return self.by_reference.get(f"{parts[-2]}/{parts[-1]}")
        return None


def local_id(resource: JSON, kind: str, report: MappingReport | None = None, *, shared: bool = False) -> str | None:
    """The record-local id a resource stands for, read back from its business identifier.

    Ours look like ``{base}/{kind}|{episode}/{item}`` (or ``|{id}`` for shared parties). For a
    foreign resource without one, the resource id stands in (reported as information), so
    references inside the rebuilt record still resolve.
    """
    suffix = f"/{kind}"
    for ident in _identifiers(resource):
        system, value = ident.get("system"), ident.get("value")
        if isinstance(system, str) and isinstance(value, str) and system.endswith(suffix) and value:
            candidate = value if shared else value.split("/", 1)[-1]
            if LOCAL_ID.match(candidate):
                return candidate
    rid = resource.get("id")
    if isinstance(rid, str) and LOCAL_ID.match(rid):
        if report is not None:
            report.info(f"{resource.get('resourceType')}/{rid}.identifier", f"no {kind} identifier of an IOP program; the resource id stands in")
        return rid
    return None


def identifier_base(resource: JSON, kind: str) -> str | None:
    """The program's identifier system base, read from one of our identifiers."""
    suffix = f"/{kind}"
    for ident in _identifiers(resource):
        system = ident.get("system")
        if isinstance(system, str) and system.endswith(suffix):
            return system[: -len(suffix)]
    return None


def _identifiers(resource: JSON) -> list[JSON]:
    """A resource's identifiers, tolerating foreign shapes (not a list, not objects)."""
    found = resource.get("identifier") if isinstance(resource, dict) else None
    return [i for i in found if isinstance(i, dict)] if isinstance(found, list) else []
