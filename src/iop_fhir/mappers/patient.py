"""The client <-> FHIR Patient (US Core Patient).

One Patient per record; its business identifier is the MRN (kind ``mrn``, program-wide), so
every episode of the same client in the program upserts the same Patient.

| contract field          | FHIR Patient                                                           |
|-------------------------|------------------------------------------------------------------------|
| client.mrn              | identifier[0]: ours (system ``{base}/mrn``), type v2-0203#MR, and ``id`` |
| client.name             | name[0] (official): family, given, prefix[0], suffix[0]                |
| client.birth_date       | birthDate                                                              |
| client.sex              | gender (administrative sex, same codes)                                |
| client.gender_identity  | extension us-core-genderIdentity, valueCodeableConcept.text            |
| client.contact          | telecom (phone, email)                                                 |
| client.address          | address[0] (use home)                                                  |
| derived (not read back) | managingOrganization = the program                                     |

Back from FHIR, the MRN is our identifier; else an identifier typed v2-0203#MR; else the first
identifier with a value (the report says which). The contract requires a name with family and
given, a full birth date and the administrative sex: without them the client is left out
(errors). A bundle with several Patients is an error, since one record is one client.
"""

from __future__ import annotations

from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.datatypes import (
    address,
    address_from_fhir,
    as_dict,
    as_list,
    choices,
    code_in,
    coding,
    concept,
    concept_text,
    contact_from_fhir,
    drop_empty,
    fhir_date,
    human_name,
    name_from_fhir,
    nonblank,
    own_extensions,
    parse_date,
    read_each,
    settle,
    telecom,
    unknown_modifiers,
    where,
)
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import Client

JSON = dict[str, Any]

KIND = "mrn"
GENDER_IDENTITY = terminology.us_core("us-core-genderIdentity")
MEDICAL_RECORD_NUMBER = coding(terminology.V2_IDENTIFIER_TYPE, "MR", "Medical record number")
GENDERS = choices(Client, "sex")


# --- forward ---------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """The record's one Patient."""
    client = ctx.record.client
    mrn = {**ctx.ids.identifier(KIND, client.mrn, shared=True), "type": concept(MEDICAL_RECORD_NUMBER, text="Medical record number")}
    extensions = []
    if client.gender_identity:
        extensions.append({"url": GENDER_IDENTITY, "valueCodeableConcept": {"text": client.gender_identity}})
    return [
        drop_empty(
            {
                "resourceType": "Patient",
                "id": ctx.ids.id("Patient", KIND, client.mrn, shared=True),
                "meta": {"profile": [terminology.us_core("us-core-patient")]},
                "extension": extensions,
                "identifier": [mrn],
                "name": [human_name(client.name)],
                "telecom": telecom(client.contact),
                "gender": client.sex,
                "birthDate": fhir_date(client.birth_date),
                "address": [address(client.address)] if client.address else [],
                "managingOrganization": ctx.organization,
            }
        )
    ]


# --- back ------------------------------------------------------------------------------------


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Fill ``client`` from the bundle's one Patient."""
    patients = index.of_type("Patient")
    if not patients:
        report.error("Patient", "no Patient; the record needs its client", code="required")
        return
    if len(patients) > 1:
        report.error("Patient", f"{len(patients)} Patients; one record holds one client, so none is used", code="structure")
        return
    clients = read_each(patients, lambda p: _client(p, report), report)
    if clients:
        draft["client"] = clients[0]


def _client(resource: JSON, report: MappingReport) -> JSON | None:
    loc = where(resource)
    if unknown_modifiers(resource, report):
        return None
    mrn = _mrn(resource, loc, report)
    name = name_from_fhir(resource.get("name"))
    birth_date = parse_date(resource.get("birthDate"))
    gender = resource.get("gender")
    missing = []
    if mrn is None:
        missing.append(("identifier", "an identifier to serve as the MRN"))
    if name is None:
        missing.append(("name", "a name with family and given parts"))
    if birth_date is None:
        missing.append(("birthDate", "a full birth date (YYYY-MM-DD)"))
    if gender not in GENDERS:
        missing.append(("gender", "the administrative gender (male, female, other, unknown)"))
    for path, what in missing:
        report.error(f"{loc}.{path}", f"no {what}; the contract requires it, so the client is left out", code="required")
    if missing:
        return None
    # Reported for what they are: the record has no place for other extensions (race, ...).
    own_extensions(_without_gender_identity(resource), report, loc)
    item = {
        "mrn": mrn,
        "name": name,
        "birth_date": fhir_date(birth_date),
        "sex": gender,
        "gender_identity": _gender_identity(resource),
        "contact": contact_from_fhir(resource.get("telecom")),
        "address": address_from_fhir(resource.get("address")),
    }
    return settle(Client, drop_empty(item), report, loc)


def _mrn(resource: JSON, location: str, report: MappingReport) -> str | None:
    identifiers = [i for i in as_list(resource.get("identifier")) if isinstance(i, dict) and nonblank(i.get("value"))]
    for ident in identifiers:
        system = ident.get("system")
        if isinstance(system, str) and system.endswith(f"/{KIND}"):
            return ident["value"]
    for i, ident in enumerate(identifiers):
        if code_in(ident.get("type"), terminology.V2_IDENTIFIER_TYPE) == "MR":
            report.info(f"{location}.identifier", f"MRN taken from the MR-typed identifier {_label(ident)}")
            return ident["value"]
    if identifiers:
        report.warning(f"{location}.identifier", f"no MR-typed identifier; the first identifier {_label(identifiers[0])} serves as the MRN")
        return identifiers[0]["value"]
    return None


def _label(identifier: JSON) -> str:
    system = identifier.get("system")
    return f"{system}|{identifier['value']}" if isinstance(system, str) else repr(identifier["value"])


def _gender_identity(resource: JSON) -> str | None:
    for ext in as_list(resource.get("extension")):
        ext = as_dict(ext)
        if ext.get("url") == GENDER_IDENTITY:
            return concept_text(ext.get("valueCodeableConcept"), codes=True)
    return None


def _without_gender_identity(resource: JSON) -> JSON:
    return {"extension": [e for e in as_list(resource.get("extension")) if as_dict(e).get("url") != GENDER_IDENTITY]}
