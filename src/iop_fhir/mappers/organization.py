"""The program, its pharmacies and outside providers <-> FHIR Organization (and Practitioner).

Three contract parts live here because they are all parties the other families point at:
the treating program (one Organization), the pharmacies (Organizations) and the outside
providers (an Organization, or a Practitioner when the provider is a person). All profiles
are US Core (``us-core-organization``, ``us-core-practitioner``); every Organization is
``active`` and named, as US Core requires.

Program (``kind`` organization, local id ``program.id``):

| contract field              | FHIR Organization                                                       |
|-----------------------------|-------------------------------------------------------------------------|
| program.id                  | identifier[0] (ours, program-wide) and ``id``                           |
| program.identifier_system   | the system base of every identifier we mint (``{base}/{kind}``); the    |
|                             | extension ``identifier-system`` (valueUri) only where the base cannot   |
|                             | say it (the default spelled out, or a trailing ``/``, which ids strip)  |
| program.npi                 | identifier (system us-npi)                                              |
| program.identifiers[]       | the identifiers after ours and the NPI, as given                        |
| program.level_of_care       | type[] coding ``CodeSystem/level-of-care``                              |
| program.focus               | type[] coding ``CodeSystem/program-focus``                              |
| program.name                | name                                                                    |
| program.address / contact   | address[0] (use work) / telecom                                         |
| derived (not read back)     | active true; type[] organization-type#prov                              |

Pharmacies (``kind`` pharmacy) and providers (``kind`` provider), local id ``id``:

| contract field                | FHIR                                                                  |
|-------------------------------|-----------------------------------------------------------------------|
| pharmacies[].id               | Organization.identifier[0] (ours) and ``id``                          |
| pharmacies[].ncpdp_id         | identifier (system terminology.NCPDP_PROVIDER)                        |
| pharmacies[].npi              | identifier (system us-npi)                                            |
| pharmacies[].kind             | type[] coding ``CodeSystem/pharmacy-kind`` (R4 organization-type has  |
|                               | no pharmacy code)                                                     |
| pharmacies[].name/address/contact | name / address[0] (use work) / telecom                            |
| providers[].id                | identifier[0] (ours) and ``id`` of the Organization or Practitioner   |
| providers[].kind              | the resource type: Organization or Practitioner                       |
| providers[].name              | Organization.name, or Practitioner.name[0].text exactly (family =     |
|                               | its last word, derived, because US Core requires a family name)       |
| providers[].npi               | identifier (system us-npi)                                            |
| providers[].address / contact | address[0] (use work) / telecom                                       |

Back from FHIR, an Organization is the program, a pharmacy or a provider by our identifier;
a foreign one is a pharmacy if it has an NCPDP id or a pharmacy-kind type, the program if a
Patient or EpisodeOfCare names it as managing organization, otherwise a provider. A foreign
Practitioner is an outside provider unless care_team.py takes it as staff.
"""

from __future__ import annotations

from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers import care_team
from iop_fhir.mappers.context import MappingContext, ResourceIndex, identifier_base, identifier_kind, local_id, reference_text
from iop_fhir.mappers.datatypes import (
    address,
    address_from_fhir,
    code_in_any,
    coding,
    concept,
    contact_from_fhir,
    drop_empty,
    extension,
    identifier_values,
    identifiers_in,
    names_in,
    nonblank,
    own_extensions,
    read_each,
    settle,
    strings,
    telecom,
    unknown_modifiers,
    where,
)
from iop_fhir.mappers.ids import default_system_base
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import Pharmacy, Program, Provider

JSON = dict[str, Any]

PROGRAM_KIND = "organization"
PHARMACY_KIND = "pharmacy"
PROVIDER_KIND = "provider"
OUR_KINDS = (PROGRAM_KIND, PHARMACY_KIND, PROVIDER_KIND)

LEVEL_OF_CARE = terminology.code_system("level-of-care")
PROGRAM_FOCUS = terminology.code_system("program-focus")
PHARMACY_TYPE = terminology.code_system("pharmacy-kind")
HEALTHCARE_PROVIDER = coding(terminology.ORGANIZATION_TYPE, "prov", "Healthcare Provider")

FOCUS_DISPLAY = {
    "mental-health": "Mental health",
    "substance-use": "Substance use disorders",
    "co-occurring": "Co-occurring mental health and substance use disorders",
}
PHARMACY_DISPLAY = {
    "retail": "Retail pharmacy",
    "mail-order": "Mail-order pharmacy",
    "specialty": "Specialty pharmacy",
    "opioid-treatment-program": "Opioid treatment program",
}


# --- forward ---------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """The program Organization, then the pharmacies, then the providers, in record order."""
    record = ctx.record
    return (
        [program_organization(ctx)]
        + [pharmacy_organization(ctx, p) for p in record.pharmacies]
        + [provider_resource(ctx, p) for p in record.providers]
    )


def npi_identifier(npi: str | None) -> JSON | None:
    return {"system": terminology.NPI, "value": npi} if npi else None


def program_organization(ctx: MappingContext) -> JSON:
    program = ctx.record.program
    identifiers = [ctx.ids.identifier(PROGRAM_KIND, program.id, shared=True), npi_identifier(program.npi)]
    identifiers += [{"system": i.system, "value": i.value} for i in program.identifiers]
    extensions = []
    if program.identifier_system is not None and (
        program.identifier_system != ctx.ids.base or program.identifier_system == default_system_base(program.id)
    ):
        # Ids strip a trailing "/" and treat the default as no setting; only then does the
        # system base of our identifiers fail to say the field exactly.
        extensions.append(extension("identifier-system", valueUri=program.identifier_system))
    level, focus = program.level_of_care, program.focus
    return drop_empty(
        {
            "resourceType": "Organization",
            "id": ctx.ids.id("Organization", PROGRAM_KIND, program.id, shared=True),
            "meta": {"profile": [terminology.us_core("us-core-organization")]},
            "extension": extensions,
            "identifier": [i for i in identifiers if i],
            "active": True,
            "type": [
                concept(HEALTHCARE_PROVIDER),
                concept(coding(LEVEL_OF_CARE, level, terminology.level_of_care(level))),
                concept(coding(PROGRAM_FOCUS, focus, FOCUS_DISPLAY[focus])),
            ],
            "name": program.name,
            "telecom": telecom(program.contact),
            "address": [address(program.address, use="work")] if program.address else [],
        }
    )


def pharmacy_organization(ctx: MappingContext, pharmacy: Pharmacy) -> JSON:
    identifiers = [
        ctx.ids.identifier(PHARMACY_KIND, pharmacy.id, shared=True),
        {"system": terminology.NCPDP_PROVIDER, "value": pharmacy.ncpdp_id},
        npi_identifier(pharmacy.npi),
    ]
    return drop_empty(
        {
            "resourceType": "Organization",
            "id": ctx.ids.id("Organization", PHARMACY_KIND, pharmacy.id, shared=True),
            "meta": {"profile": [terminology.us_core("us-core-organization")]},
            "identifier": [i for i in identifiers if i],
            "active": True,
            "type": [concept(HEALTHCARE_PROVIDER), concept(coding(PHARMACY_TYPE, pharmacy.kind, PHARMACY_DISPLAY[pharmacy.kind]))],
            "name": pharmacy.name,
            "telecom": telecom(pharmacy.contact),
            "address": [address(pharmacy.address, use="work")] if pharmacy.address else [],
        }
    )


def provider_resource(ctx: MappingContext, provider: Provider) -> JSON:
    """An outside provider: an Organization, or a US Core Practitioner for a person."""
    resource_type = "Organization" if provider.kind == "organization" else "Practitioner"
    out: JSON = {
        "resourceType": resource_type,
        "id": ctx.ids.id(resource_type, PROVIDER_KIND, provider.id, shared=True),
        "meta": {"profile": [terminology.us_core(f"us-core-{resource_type.lower()}")]},
        "identifier": [i for i in (ctx.ids.identifier(PROVIDER_KIND, provider.id, shared=True), npi_identifier(provider.npi)) if i],
    }
    if resource_type == "Organization":
        out.update(active=True, type=[concept(HEALTHCARE_PROVIDER)], name=provider.name)
    else:
        # The contract holds one text name; it goes whole into name.text (what reads back).
        out["name"] = [{"text": provider.name, "family": family_of(provider.name)}]
    out["telecom"] = telecom(provider.contact)
    out["address"] = [address(provider.address, use="work")] if provider.address else []
    return drop_empty(out)


def family_of(name: str) -> str:
    """A family name guessed from a full name: the last word before any ", credentials"."""
    words = name.split(",", 1)[0].split() or name.split()
    return words[-1] if words else name


# --- back ------------------------------------------------------------------------------------


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Fill ``program``, ``pharmacies`` and ``providers`` from Organizations and Practitioners."""
    staff = {id(p) for p in care_team.staff_practitioners(index)}
    managing = _managing_organizations(index)
    programs: list[JSON] = []
    pharmacies: list[JSON] = []
    providers: list[JSON] = []
    parties = [r for r in index.resources if r.get("resourceType") in ("Organization", "Practitioner") and id(r) not in staff]

    def read(resource: JSON) -> None:
        if unknown_modifiers(resource, report):
            return
        kind = party_kind(resource, managing)
        if kind == PROGRAM_KIND:
            programs.append(resource)
        elif kind == PHARMACY_KIND:
            if (pharmacy := _pharmacy(resource, report)) is not None:
                pharmacies.append(pharmacy)
        elif (provider := _provider(resource, report)) is not None:
            providers.append(provider)

    read_each(parties, read, report)
    if programs:
        ours = [p for p in programs if identifier_kind(p, OUR_KINDS) == PROGRAM_KIND] or programs
        for extra in ours[1:]:
            report.error(where(extra), "a second program Organization; one record has one program (the first is used)")
        program = read_each(ours[:1], lambda r: _program(r, report), report)
        if program:
            draft["program"] = program[0]
    else:
        report.error("Organization", "no Organization for the treating program (our identifier, or managingOrganization of the Patient or EpisodeOfCare)", code="required")
    draft["pharmacies"] = pharmacies
    draft["providers"] = providers


def party_kind(resource: JSON, managing: set[int]) -> str:
    """program, pharmacy or provider for an Organization or a non-staff Practitioner."""
    kind = identifier_kind(resource, OUR_KINDS)
    if kind is not None:
        return kind
    if resource.get("resourceType") == "Practitioner":
        return PROVIDER_KIND
    if _ncpdp_ids(resource) or code_in_any(resource.get("type"), PHARMACY_TYPE):
        return PHARMACY_KIND
    return PROGRAM_KIND if id(resource) in managing else PROVIDER_KIND


def _managing_organizations(index: ResourceIndex) -> set[int]:
    """Organizations a Patient or an EpisodeOfCare names as managing organization (by object id)."""
    found = set()
    for rtype in ("Patient", "EpisodeOfCare"):
        for holder in index.of_type(rtype):
            target = index.resolve(reference_text(holder.get("managingOrganization")), holder)
            if target is not None:
                found.add(id(target))
    return found


def _ncpdp_ids(resource: JSON) -> list[str]:
    """NCPDP Provider IDs: our system, or another system naming NCPDP (reported by the caller)."""
    ours = identifier_values(resource, terminology.NCPDP_PROVIDER)
    if ours:
        return ours
    return [
        i["value"]
        for i in identifiers_in(resource.get("identifier"))
        if "ncpdp" in i.get("system", "").lower() and isinstance(i.get("value"), str) and i["value"].isdigit()
    ]


def _contact_parts(resource: JSON) -> JSON:
    """address and contact of a party resource as contract data (absent parts are None)."""
    return {"address": address_from_fhir(resource.get("address")), "contact": contact_from_fhir(resource.get("telecom"))}


def _program(resource: JSON, report: MappingReport) -> JSON | None:
    loc = where(resource)
    program_id = local_id(resource, PROGRAM_KIND, report, shared=True)
    npis = identifier_values(resource, terminology.NPI)
    others = [
        {"system": i["system"], "value": i["value"]}
        for i in identifiers_in(resource.get("identifier"))
        if i.get("system") and i.get("value") and i["system"] != terminology.NPI and identifier_kind({"identifier": [i]}, OUR_KINDS) is None
    ]
    others += [{"system": terminology.NPI, "value": v} for v in npis[1:]]
    own = own_extensions(resource, report, loc)
    item = {
        "id": program_id,
        "name": nonblank(resource.get("name")),
        "level_of_care": code_in_any(resource.get("type"), LEVEL_OF_CARE),
        "focus": code_in_any(resource.get("type"), PROGRAM_FOCUS),
        "npi": npis[0] if npis else None,
        "identifiers": others,
        "identifier_system": _identifier_system(resource, own, program_id),
        **_contact_parts(resource),
    }
    if item["level_of_care"] is None:
        report.error(f"{loc}.type", f"no level of care coded in {LEVEL_OF_CARE}; the contract requires one", code="required")
    if item["focus"] is None:
        report.error(f"{loc}.type", f"no program focus coded in {PROGRAM_FOCUS}; the contract requires one", code="required")
    return settle(Program, drop_empty(item), report, loc)


def _identifier_system(resource: JSON, own: dict[str, JSON], program_id: str | None) -> str | None:
    exact = own.get("identifier-system", {}).get("valueUri")
    if isinstance(exact, str):
        return exact
    base = identifier_base(resource, PROGRAM_KIND)
    if base is None or program_id is None or base == default_system_base(program_id):
        return None
    return base


def _pharmacy(resource: JSON, report: MappingReport) -> JSON | None:
    loc = where(resource)
    ncpdp = _ncpdp_ids(resource)
    if ncpdp and not identifier_values(resource, terminology.NCPDP_PROVIDER):
        report.info(f"{loc}.identifier", f"NCPDP Provider ID {ncpdp[0]} read from a system other than {terminology.NCPDP_PROVIDER}")
    if not ncpdp:
        report.error(f"{loc}.identifier", "pharmacy without an NCPDP Provider ID; the contract requires one", code="required")
        return None
    own_extensions(resource, report, loc)
    kind = code_in_any(resource.get("type"), PHARMACY_TYPE)
    if kind is None:
        report.info(f"{loc}.type", "no pharmacy kind coded; the contract default (retail) applies")
    npis = identifier_values(resource, terminology.NPI)
    item = {
        "id": local_id(resource, PHARMACY_KIND, report, shared=True),
        "name": nonblank(resource.get("name")),
        "ncpdp_id": ncpdp[0],
        "npi": npis[0] if npis else None,
        "kind": kind,
        **_contact_parts(resource),
    }
    return settle(Pharmacy, drop_empty(item), report, loc)


def _provider(resource: JSON, report: MappingReport) -> JSON | None:
    loc = where(resource)
    own_extensions(resource, report, loc)
    is_person = resource.get("resourceType") == "Practitioner"
    npis = identifier_values(resource, terminology.NPI)
    item = {
        "id": local_id(resource, PROVIDER_KIND, report, shared=True),
        "kind": "practitioner" if is_person else "organization",
        "name": _person_name(resource) if is_person else nonblank(resource.get("name")),
        "npi": npis[0] if npis else None,
        **_contact_parts(resource),
    }
    if item["name"] is None:
        report.error(f"{loc}.name", "provider without a name; the contract requires one", code="required")
        return None
    return settle(Provider, drop_empty(item), report, loc)


def _person_name(resource: JSON) -> str | None:
    """A Practitioner's name as one text: name.text as written, else its parts joined."""
    names = names_in(resource.get("name"))
    if not names:
        return None
    chosen = next((n for n in names if n.get("use") == "official"), names[0])
    text = nonblank(chosen.get("text"))
    if text:
        return text
    parts = [*strings(chosen.get("prefix")), *strings(chosen.get("given")), nonblank(chosen.get("family")), *strings(chosen.get("suffix"))]
    return " ".join(p for p in parts if p) or None
