"""What a mapper sees: the record and its id factory going out, an index of resources coming back.

Going out, ``MappingContext`` makes the references every family points at (patient, staff,
conditions, prescriptions, sessions, ...). Coming back, ``ResourceIndex`` resolves references,
and the functions at the end read our business identifiers back into record-local ids
(``local_id``, ``identifier_kind``) and follow references to them (``referenced_id``,
``practitioner_id``), for every family alike.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from iop_fhir.mappers.datatypes import as_dict, as_list, identifiers_in, nonblank
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

    @property
    def care_team(self) -> JSON:
        """The record's CareTeam (care_team.py makes it; one per episode)."""
        return self.ids.reference("CareTeam", "care-team", self.record.id, shared=True)

    def condition(self, diagnosis_id: str) -> JSON:
        return self.ids.reference("Condition", "diagnosis", diagnosis_id)

    def prescription(self, prescription_id: str) -> JSON:
        return self.ids.reference("MedicationRequest", "prescription", prescription_id)

    def discharge_medication(self, prescription_id: str) -> JSON:
        """The discharge-list MedicationRequest of a prescription (medication_request.py)."""
        return self.ids.reference("MedicationRequest", "discharge-medication", prescription_id)

    def session(self, session_id: str) -> JSON:
        """The Encounter of one session (encounter.py)."""
        return self.ids.reference("Encounter", "session", session_id)

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


# --- reverse: identifiers and references of foreign resources ---------------------------------
# Foreign JSON may hold anything where an identifier or a reference should be: every helper
# below reads through ``identifiers_in`` / ``as_dict``, so odd shapes give None, never a crash.


def local_id(resource: JSON, kind: str, report: MappingReport | None = None, *, shared: bool = False) -> str | None:
    """The record-local id a resource stands for, read back from its business identifier.

    Ours look like ``{base}/{kind}|{episode}/{item}`` (or ``|{id}`` for shared parties). For a
    foreign resource without one, the resource id stands in (reported as information), so
    references inside the rebuilt record still resolve.
    """
    suffix = f"/{kind}"
    for ident in identifiers_in(resource.get("identifier")):
        system, value = ident.get("system"), ident.get("value")
        if isinstance(system, str) and system.endswith(suffix) and value:
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
    for ident in identifiers_in(resource.get("identifier")):
        system = ident.get("system")
        if isinstance(system, str) and system.endswith(suffix):
            return system[: -len(suffix)]
    return None


def identifier_kind(resource: JSON, kinds: tuple[str, ...]) -> str | None:
    """Which of ``kinds`` a resource's business identifier names (system ``{base}/{kind}``), if any."""
    for ident in identifiers_in(resource.get("identifier")):
        system = ident.get("system", "")
        for kind in kinds:
            if system.endswith(f"/{kind}") and ident.get("value"):
                return kind
    return None


def reference_text(value: Any) -> str | None:
    """The ``reference`` string of a Reference in untrusted JSON (for ``ResourceIndex.resolve``), else None."""
    return nonblank(as_dict(value).get("reference"))


def referenced_id(
    index: ResourceIndex, reference: Any, holder: JSON, types: tuple[str, ...], kind: str, *, shared: bool = False
) -> str | None:
    """The record-local id of the resource a Reference names, if it is in ``index`` and of ``types``.

    Literal references resolve through the index; a logical reference (``identifier`` only)
    matches a resource of ``types`` carrying the same identifier.
    """
    reference = as_dict(reference)
    target = index.resolve(reference_text(reference), holder)
    wanted = as_dict(reference.get("identifier"))
    if target is None and nonblank(wanted.get("value")):
        key = (wanted.get("system"), wanted["value"])
        target = next(
            (
                res
                for rtype in types
                for res in index.of_type(rtype)
                if any((as_dict(i).get("system"), as_dict(i).get("value")) == key for i in as_list(res.get("identifier")))
            ),
            None,
        )
    if not isinstance(target, dict) or target.get("resourceType") not in types:
        return None
    return local_id(target, kind, shared=shared)


def practitioner_id(index: ResourceIndex, reference: Any, holder: JSON) -> str | None:
    """The care-team member id a reference names: a Practitioner, or a PractitionerRole's practitioner."""
    found = referenced_id(index, reference, holder, ("Practitioner",), "staff", shared=True)
    if found is not None:
        return found
    role = index.resolve(reference_text(reference), holder)
    if not isinstance(role, dict) or role.get("resourceType") != "PractitionerRole":
        return None
    if identifier_kind(role, ("staff-role",)):
        return local_id(role, "staff-role", shared=True)
    return referenced_id(index, role.get("practitioner"), role, ("Practitioner",), "staff", shared=True)


# --- reverse: what families read earlier put in the draft -----------------------------------


def known_ids(draft: JSON, collection: str) -> set[str] | None:
    """Ids of a collection other families already put in the draft (None: not there to check)."""
    items = draft.get(collection)
    if not isinstance(items, list):
        return None
    return {item["id"] for item in items if isinstance(item, dict) and isinstance(item.get("id"), str)}
