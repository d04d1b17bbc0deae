"""The care team <-> FHIR Practitioner, PractitionerRole and CareTeam (US Core profiles).

Each member is a Practitioner (who the person is: name, NPI, DEA number, contact) and a
PractitionerRole (what they do in the program: role, organization = the program); the episode
has one CareTeam listing every member. Members are program-wide parties (shared ids).

| contract field            | FHIR                                                                     |
|---------------------------|--------------------------------------------------------------------------|
| care_team[].id            | Practitioner.identifier[0] (kind ``staff``) and ``id``; the role's       |
|                           | identifier (kind ``staff-role``) and id use the same local id            |
| care_team[].name          | Practitioner.name[0] (official)                                          |
| care_team[].npi           | Practitioner.identifier (system us-npi)                                  |
| care_team[].dea_number    | Practitioner.identifier (system terminology.DEA)                         |
| care_team[].contact       | Practitioner.telecom                                                     |
| care_team[].role          | PractitionerRole.code[0]: coding ``CodeSystem/care-team-role`` (what     |
|                           | reads back) plus the NUCC taxonomy code for the role (derived;           |
|                           | terminology.care_team_role)                                              |
| derived (not read back)   | PractitionerRole.practitioner / organization / active / telecom (the     |
|                           | member's, else the program's, for US Core's contact-or-endpoint rule);   |
|                           | CareTeam (kind ``care-team``, local id = record id): status from the     |
|                           | enrolment, name, subject, period, participant[] {role (same codings),    |
|                           | member, onBehalfOf = program}, managingOrganization                      |

Back from FHIR, a Practitioner is a member when it carries our ``staff`` identifier, or when
a PractitionerRole, a CareTeam participant or a MedicationRequest.requester points at it
(other Practitioners are outside providers, organization.py). The role comes from our
care-team-role coding, else from a NUCC code in PractitionerRole.code or the CareTeam
participant role (terminology.nucc_roles). A member without a known role is an error and
is left out, never guessed: the role decides who may prescribe (and controlled substances),
so a guess could make an unlawful prescription look valid. Prescriptions or reviews naming such a
practitioner then fail the contract's reference check, which the report also says. No NPI,
or no family and given name, is an error too (the contract requires them).
"""

from __future__ import annotations

from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers.context import MappingContext, ResourceIndex, identifier_kind, local_id, reference_text
from iop_fhir.mappers.datatypes import (
    as_dict,
    as_list,
    code_in,
    coding,
    concept,
    contact_from_fhir,
    drop_empty,
    fhir_date,
    human_name,
    identifier_values,
    name_from_fhir,
    own_extensions,
    read_each,
    settle,
    table_coding,
    telecom,
    unknown_modifiers,
    where,
)
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import CareTeamMember

JSON = dict[str, Any]

STAFF_KIND = "staff"
ROLE_KIND = "staff-role"
TEAM_KIND = "care-team"
CARE_TEAM_ROLE = terminology.code_system("care-team-role")

# Contract role -> its display in our care-team-role code system. The NUCC taxonomy coding sent
# beside it, and the NUCC codes read back as each role, are terminology (care_team_role, nucc_roles).
ROLES: dict[str, str] = {
    "psychiatrist": "Psychiatrist",
    "nurse-practitioner": "Psychiatric nurse practitioner",
    "therapist": "Therapist",
    "case-manager": "Case manager",
    "nurse": "Nurse",
    "peer-specialist": "Peer specialist",
}
NUCC_ROLES: dict[str, str] = terminology.nucc_roles()
# CareTeam.status from the enrolment: the team exists while the episode does.
TEAM_STATUS = {
    "planned": "proposed",
    "waitlist": "proposed",
    "active": "active",
    "onhold": "suspended",
    "finished": "inactive",
    "cancelled": "inactive",
}


# --- forward ---------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """Practitioners, then PractitionerRoles, then the CareTeam (none without members)."""
    team = ctx.record.care_team
    if not team:
        return []
    return [practitioner(ctx, m) for m in team] + [practitioner_role(ctx, m) for m in team] + [care_team(ctx)]


def role_concept(role: str) -> JSON:
    display = ROLES[role]
    return concept(table_coding(terminology.care_team_role(role)), coding(CARE_TEAM_ROLE, role, display), text=display)


def practitioner(ctx: MappingContext, member: CareTeamMember) -> JSON:
    identifiers = [ctx.ids.identifier(STAFF_KIND, member.id, shared=True), {"system": terminology.NPI, "value": member.npi}]
    if member.dea_number:
        identifiers.append({"system": terminology.DEA, "value": member.dea_number})
    return drop_empty(
        {
            "resourceType": "Practitioner",
            "id": ctx.ids.id("Practitioner", STAFF_KIND, member.id, shared=True),
            "meta": {"profile": [terminology.us_core("us-core-practitioner")]},
            "identifier": identifiers,
            "active": True,
            "name": [human_name(member.name)],
            "telecom": telecom(member.contact),
        }
    )


def practitioner_role(ctx: MappingContext, member: CareTeamMember) -> JSON:
    return drop_empty(
        {
            "resourceType": "PractitionerRole",
            "id": ctx.ids.id("PractitionerRole", ROLE_KIND, member.id, shared=True),
            "meta": {"profile": [terminology.us_core("us-core-practitionerrole")]},
            "identifier": [ctx.ids.identifier(ROLE_KIND, member.id, shared=True)],
            "active": True,
            "practitioner": ctx.practitioner(member.id),
            "organization": ctx.organization,
            "code": [role_concept(member.role)],
            # US Core: a role has contact details or an endpoint; the program's phone serves
            # for members whose own contact the record does not hold.
            "telecom": telecom(member.contact) or telecom(ctx.record.program.contact),
        }
    )


def care_team(ctx: MappingContext) -> JSON:
    record = ctx.record
    enrolment = record.enrolment
    participants = [
        {"role": [role_concept(m.role)], "member": ctx.practitioner(m.id), "onBehalfOf": ctx.organization} for m in record.care_team
    ]
    period = {"start": fhir_date(enrolment.start)}
    if enrolment.actual_end:
        period["end"] = fhir_date(enrolment.actual_end)
    return {
        "resourceType": "CareTeam",
        "id": ctx.ids.id("CareTeam", TEAM_KIND, record.id, shared=True),
        "meta": {"profile": [terminology.us_core("us-core-careteam")]},
        "identifier": [ctx.ids.identifier(TEAM_KIND, record.id, shared=True)],
        "status": TEAM_STATUS[enrolment.status],
        "name": f"IOP care team for episode {record.id}",
        "subject": ctx.patient,
        "period": period,
        "participant": participants,
        "managingOrganization": [ctx.organization],
    }


# --- back ------------------------------------------------------------------------------------


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Fill ``care_team`` from the staff Practitioners and the roles found for them."""
    roles = _role_concepts(index)
    draft["care_team"] = read_each(staff_practitioners(index), lambda p: _member(p, roles.get(id(p), []), report), report)


def staff_practitioners(index: ResourceIndex) -> list[JSON]:
    """The Practitioners that are care-team members, in bundle order (see the module doc)."""
    pointed_at: set[int] = set()
    for role in index.of_type("PractitionerRole"):
        _add(pointed_at, _practitioner_of(index, role.get("practitioner"), role))
    for team in index.of_type("CareTeam"):
        for participant in as_list(team.get("participant")):
            _add(pointed_at, _practitioner_of(index, as_dict(participant).get("member"), team))
    for request in index.of_type("MedicationRequest"):
        _add(pointed_at, _practitioner_of(index, request.get("requester"), request))
    out = []
    for resource in index.of_type("Practitioner"):
        kind = identifier_kind(resource, (STAFF_KIND, "provider"))
        if kind == STAFF_KIND or (kind is None and id(resource) in pointed_at):
            out.append(resource)
    return out


def _add(found: set[int], resource: JSON | None) -> None:
    if resource is not None:
        found.add(id(resource))


def _practitioner_of(index: ResourceIndex, reference: Any, holder: JSON) -> JSON | None:
    """The Practitioner a reference names, directly or through a PractitionerRole."""
    target = index.resolve(reference_text(reference), holder)
    if target is not None and target.get("resourceType") == "PractitionerRole":
        target = index.resolve(reference_text(target.get("practitioner")), target)
    return target if target is not None and target.get("resourceType") == "Practitioner" else None


def _role_concepts(index: ResourceIndex) -> dict[int, list[JSON]]:
    """Role CodeableConcepts by Practitioner (object id): PractitionerRole.code, then CareTeam roles."""
    found: dict[int, list[JSON]] = {}
    for role in index.of_type("PractitionerRole"):
        target = _practitioner_of(index, role.get("practitioner"), role)
        if target is not None:
            found.setdefault(id(target), []).extend(as_dict(c) for c in as_list(role.get("code")))
    for team in index.of_type("CareTeam"):
        for participant in as_list(team.get("participant")):
            participant = as_dict(participant)
            target = _practitioner_of(index, participant.get("member"), team)
            if target is not None:
                found.setdefault(id(target), []).extend(as_dict(c) for c in as_list(participant.get("role")))
    return found


def _role(concepts: list[JSON], location: str, report: MappingReport) -> str | None:
    for c in concepts:
        role = code_in(c, CARE_TEAM_ROLE)
        if role in ROLES:
            return role
    for c in concepts:
        nucc = code_in(c, terminology.NUCC_TAXONOMY)
        if nucc in NUCC_ROLES:
            report.info(location, f"care-team role {NUCC_ROLES[nucc]!r} read from NUCC taxonomy code {nucc}")
            return NUCC_ROLES[nucc]
    return None


def _member(resource: JSON, concepts: list[JSON], report: MappingReport) -> JSON | None:
    loc = where(resource)
    if unknown_modifiers(resource, report):
        return None
    own_extensions(resource, report, loc)
    role = _role(concepts, loc, report)
    if role is None:
        report.error(
            loc,
            "care-team member without a role the contract knows (our care-team-role coding or a NUCC code for "
            f"{', '.join(ROLES)}); left out, so prescriptions or reviews naming it will not resolve",
            code="required",
        )
        return None
    name = name_from_fhir(resource.get("name"))
    if name is None:
        report.error(f"{loc}.name", "care-team member without a family and given name; the contract requires them", code="required")
        return None
    npis = identifier_values(resource, terminology.NPI)
    if not npis:
        report.error(f"{loc}.identifier", "care-team member without an NPI; the contract requires one", code="required")
        return None
    deas = identifier_values(resource, terminology.DEA)
    item = {
        "id": local_id(resource, STAFF_KIND, report, shared=True),
        "role": role,
        "name": name,
        "npi": npis[0],
        "dea_number": deas[0] if deas else None,
        "contact": contact_from_fhir(resource.get("telecom")),
    }
    return settle(CareTeamMember, drop_empty(item), report, loc)
