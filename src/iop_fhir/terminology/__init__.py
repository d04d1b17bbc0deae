"""Code systems, profiles and the curated code tables the contract and the mappers share.

The tables live in ``codes.json`` beside this module (data, not if-chains) and are read
once on first use. Facts in it come from ``shared/reference/codes.json``, except entries that
say their own ``verification`` and ``source`` (routes, NUCC roles, screen results, ...);
match on codes, never on displays, because RxNorm and LOINC displays drift between releases.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

# --- code system URIs (exact strings; see shared/reference/terminology.md) -----------------
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
HCPCS_ALT = "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
UCUM = "http://unitsofmeasure.org"
NDC = "http://hl7.org/fhir/sid/ndc"
NPI = "http://hl7.org/fhir/sid/us-npi"
DEA = "urn:oid:2.16.840.1.113883.4.814"  # DEA registration number (HL7 OID registry)
# THO NamingSystem for the 7-digit NCPDP Provider ID (no OID form is registered).
NCPDP_PROVIDER = "http://terminology.hl7.org/CodeSystem/NCPDPProviderIdentificationNumber"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
OBSERVATION_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
US_CORE_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-category"
CAREPLAN_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/careplan-category"
MEDREQ_CATEGORY = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
MEDREQ_COURSE = "http://terminology.hl7.org/CodeSystem/medicationrequest-course-of-therapy"
MEDDISPENSE_CATEGORY = "http://terminology.hl7.org/fhir/CodeSystem/medicationdispense-category"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
V3_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
V3_ROLE_CLASS = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
NUCC_TAXONOMY = "http://nucc.org/provider-taxonomy"
V3_PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
V2_IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
DIAGNOSIS_ROLE = "http://terminology.hl7.org/CodeSystem/diagnosis-role"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
# HL7 code systems the mappers write or read that the reference lists do not cover (canonical
# URLs as HL7 Terminology, FHIR R4 and US Core publish them).
GOAL_ACHIEVEMENT = "http://terminology.hl7.org/CodeSystem/goal-achievement"
ORGANIZATION_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
CONSENT_POLICY = "http://terminology.hl7.org/CodeSystem/consentpolicycodes"
V3_ROUTE = "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration"
V3_TIMING_ABBREVIATION = "http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation"
V3_SUBSTITUTION = "http://terminology.hl7.org/CodeSystem/v3-substanceAdminSubstitution"
US_CORE_PROVENANCE_PARTICIPANT = "http://hl7.org/fhir/us/core/CodeSystem/us-core-provenance-participant-type"
# Security labels (DS4P, shared/reference §7): REDACTED (v3-ObservationValue) marks content
# removed before a disclosure; 42CFRPart2 in the deprecated v3-ActUSPrivacyLaw is read, never written.
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
V3_ACT_US_PRIVACY_LAW = "http://terminology.hl7.org/CodeSystem/v3-ActUSPrivacyLaw"

# The project's own canonical base: extensions, code systems and default identifier systems
# for concepts no public code system has (review actions, attendance, data categories, ...).
CANONICAL = "https://iop-fhir.org/fhir"


def extension_url(name: str) -> str:
    """Canonical URL of one of the project's extensions."""
    return f"{CANONICAL}/StructureDefinition/{name}"


def code_system(name: str) -> str:
    """Canonical URL of one of the project's local code systems."""
    return f"{CANONICAL}/CodeSystem/{name}"


# Synchronisation with outside systems: ``SYNC_SOURCE`` tags a pulled resource with the name of
# the destination it came from (``meta.tag``; the code is the destination's name), ``SYNC`` codes
# the work items a pull raises (displays: ``sync_display``).
SYNC_SOURCE = code_system("source")
SYNC = code_system("sync")


US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"


def us_core(profile: str) -> str:
    """Canonical URL of a US Core profile, e.g. ``us_core("us-core-patient")``."""
    return US_CORE + profile


@cache
def tables() -> dict[str, Any]:
    """The curated code tables from ``codes.json`` (read once, then shared read-only)."""
    text = resources.files(__package__).joinpath("codes.json").read_text(encoding="utf-8")
    return json.loads(text)


def medication(rxcui: str) -> dict[str, Any] | None:
    """What the tables know of an RxNorm product: class, ingredient, DEA schedule, MAT use."""
    return tables()["medications"].get(rxcui)


def icd10_display(code: str) -> str | None:
    return tables()["icd10cm"].get(code)


def snomed_display(code: str) -> str:
    """Display of a SNOMED CT concept the mappers send (the ``snomed`` table)."""
    return tables()["snomed"][code]


def instrument(name: str) -> dict[str, Any]:
    return tables()["instruments"][name]


def route(name: str) -> dict[str, Any]:
    """The SNOMED CT coding (system, code, display) of a contract route: ``oral`` -> 26643006."""
    return tables()["routes"][name]


def care_team_role(role: str) -> dict[str, Any]:
    """The NUCC taxonomy coding sent for a contract care-team role (system, code, display)."""
    return tables()["care_team_roles"][role]


def nucc_roles() -> dict[str, str]:
    """NUCC taxonomy code -> contract care-team role: the codes sent, then their synonyms."""
    sent = {spec["code"]: role for role, spec in tables()["care_team_roles"].items()}
    return sent | {code: spec["role"] for code, spec in tables()["nucc_role_synonyms"].items()}


def screen_result(result: str) -> dict[str, Any]:
    """SNOMED CT qualifier value of a drug-screen result, with its v3 interpretation code."""
    return tables()["screen_results"][result]


def interpretation(code: str) -> dict[str, Any]:
    """A v3-ObservationInterpretation coding (system, code, display): ``POS``, ``NEG``, ``IND``."""
    return tables()["observation_interpretations"][code]


def severity(name: str) -> dict[str, Any]:
    """The SNOMED CT severity qualifier of ``mild``, ``moderate`` or ``severe``."""
    return tables()["severities"][name]


def sync_display(code: str) -> str:
    """Display of a code of the project's ``sync`` code system (``reconcile-conflict``, ...)."""
    return tables()["sync_codes"][code]


def data_operation(code: str) -> dict[str, Any]:
    """The v3-DataOperation coding (system, code, display) of ``CREATE`` or ``UPDATE`` (Provenance.activity)."""
    return tables()["data_operations"][code]


def security_label(code: str) -> dict[str, Any]:
    """The ``meta.security`` Coding of a label the gateway writes (``R``, ``SUD``, ``42CFRPart2``,
    ``NORDSCLCD``, ``REDACTED``, ...): system, code and display, from the ``security_labels`` table."""
    entry = tables()["security_labels"][code]
    return {"system": entry["system"], "code": code, "display": entry["display"]}


def level_of_care(code: str) -> str:
    """Display of a code of the project's level-of-care code system (programs and aftercare)."""
    return tables()["levels_of_care"][code]


def is_substance_use_diagnosis(icd10: str) -> bool:
    """F10–F19 are the mental and behavioural disorders due to psychoactive substance use."""
    return len(icd10) >= 3 and icd10[0] == "F" and icd10[1:3].isdigit() and 10 <= int(icd10[1:3]) <= 19
