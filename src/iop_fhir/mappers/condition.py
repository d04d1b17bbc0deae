"""Diagnoses <-> FHIR Condition (US Core Condition Problems and Health Concerns).

One Condition per diagnosis, on the client's problem list, coded in ICD-10-CM.

| contract field               | FHIR Condition                                                       |
|------------------------------|----------------------------------------------------------------------|
| diagnoses[].id               | identifier[0] (kind ``diagnosis``, episode item) and ``id``          |
| diagnoses[].code             | code.coding (ICD-10-CM, with its dot)                                |
| diagnoses[].display          | code.text (only when the record gives one); the coding's display is  |
|                              | the record's, else the table's (derived)                             |
| diagnoses[].rank             | extension ``diagnosis-rank`` (valueCode primary / secondary)         |
| diagnoses[].clinical_status  | clinicalStatus (condition-clinical, same codes)                      |
| diagnoses[].onset            | onsetDateTime (a date: ``YYYY-MM-DD`` is a valid dateTime)           |
| derived (not read back)      | verificationStatus confirmed; category problem-list-item; subject    |

Rank: R4 Condition has no rank; EpisodeOfCare.diagnosis.rank and Encounter.diagnosis.rank
do, but those are copies another family derives, so the lossless carrier is our extension on
the Condition itself. Back from foreign FHIR, a missing extension is filled from an
EpisodeOfCare or Encounter diagnosis rank (1 = primary); failing that the diagnosis is taken
as secondary and, if none is primary, the first one becomes primary (warnings say so).

Back from FHIR, only ICD-10-CM codes map (the contract holds nothing else): a Condition coded
in SNOMED CT only is an error and left out, its codes named in the report. Codes without
their dot (``F3310``) or in lower case are normalised (``F33.10``) with an information issue.
Refuted and entered-in-error Conditions are not diagnoses and are left out.
"""

from __future__ import annotations

import re
from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers.context import MappingContext, ResourceIndex, local_id, reference_text
from iop_fhir.mappers.datatypes import (
    as_dict,
    as_list,
    code_in,
    codings_of,
    coding,
    concept,
    drop_empty,
    extension,
    fhir_date,
    nonblank,
    own_extensions,
    parse_date,
    read_each,
    settle,
    shown_codes,
    unknown_modifiers,
    where,
)
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import Diagnosis

JSON = dict[str, Any]

KIND = "diagnosis"
RANK = "diagnosis-rank"
PROFILE = terminology.us_core("us-core-condition-problems-health-concerns")
# The OID form of ICD-10-CM still appears in data converted from CDA.
ICD10CM_SYSTEMS = (terminology.ICD10CM, "urn:oid:2.16.840.1.113883.6.90")
ICD10CM_CODE = re.compile(r"^[A-TV-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
CLINICAL_DISPLAY = {
    "active": "Active",
    "recurrence": "Recurrence",
    "relapse": "Relapse",
    "inactive": "Inactive",
    "remission": "Remission",
    "resolved": "Resolved",
}
NOT_A_DIAGNOSIS = frozenset({"refuted", "entered-in-error"})


# --- forward ---------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """One Condition per diagnosis, in record order."""
    return [condition(ctx, d) for d in ctx.record.diagnoses]


def condition(ctx: MappingContext, diagnosis: Diagnosis) -> JSON:
    display = diagnosis.display or terminology.icd10_display(diagnosis.code)
    status = diagnosis.clinical_status
    return drop_empty(
        {
            "resourceType": "Condition",
            "id": ctx.ids.id("Condition", KIND, diagnosis.id),
            "meta": {"profile": [PROFILE]},
            "extension": [extension(RANK, valueCode=diagnosis.rank)],
            "identifier": [ctx.ids.identifier(KIND, diagnosis.id)],
            "clinicalStatus": concept(coding(terminology.CONDITION_CLINICAL, status, CLINICAL_DISPLAY[status])),
            "verificationStatus": concept(coding(terminology.CONDITION_VERIFICATION, "confirmed", "Confirmed")),
            "category": [concept(coding(terminology.CONDITION_CATEGORY, "problem-list-item", "Problem List Item"))],
            "code": concept(coding(terminology.ICD10CM, diagnosis.code, display), text=diagnosis.display),
            "subject": ctx.patient,
            "onsetDateTime": fhir_date(diagnosis.onset) if diagnosis.onset else None,
        }
    )


# --- back ------------------------------------------------------------------------------------


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Fill ``diagnoses`` from the Conditions coded in ICD-10-CM."""
    ranks = _listed_ranks(index)
    found = read_each(index.of_type("Condition"), lambda c: _diagnosis(c, ranks.get(id(c)), report), report)
    if found and not any(item.get("rank") == "primary" for item, _ in found):
        item, loc = next(((i, loc) for i, loc in found if "rank" not in i), found[0])
        item["rank"] = "primary"
        report.warning(f"{loc}.extension", "no diagnosis is ranked primary (the contract needs one); this one is taken as primary")
    for item, loc in found:
        if "rank" not in item:
            item["rank"] = "secondary"
            report.warning(f"{loc}.extension", "no rank given; taken as secondary")
    draft["diagnoses"] = [d for item, loc in found if (d := settle(Diagnosis, item, report, loc)) is not None]


def _listed_ranks(index: ResourceIndex) -> dict[int, str]:
    """Ranks other resources give Conditions (EpisodeOfCare / Encounter ``diagnosis.rank``)."""
    ranks: dict[int, str] = {}
    for rtype in ("EpisodeOfCare", "Encounter"):
        for holder in index.of_type(rtype):
            for entry in as_list(holder.get("diagnosis")):
                entry = as_dict(entry)
                target = index.resolve(reference_text(entry.get("condition")), holder)
                rank = entry.get("rank")
                if target is not None and isinstance(rank, int) and not isinstance(rank, bool):
                    # A primary anywhere wins over a secondary elsewhere.
                    ranks[id(target)] = "primary" if rank == 1 or ranks.get(id(target)) == "primary" else "secondary"
    return ranks


def _diagnosis(resource: JSON, listed_rank: str | None, report: MappingReport) -> tuple[JSON, str] | None:
    """The diagnosis (rank possibly still open) and its location, or None if it cannot be one."""
    loc = where(resource)
    if unknown_modifiers(resource, report):
        return None
    verification = code_in(resource.get("verificationStatus"), terminology.CONDITION_VERIFICATION)
    if verification in NOT_A_DIAGNOSIS:
        report.warning(f"{loc}.verificationStatus", f"a {verification} Condition is not a diagnosis; left out")
        return None
    if verification not in (None, "confirmed"):
        report.warning(f"{loc}.verificationStatus", f"verification status {verification!r} is not carried; mapped as a diagnosis")
    code_concept = as_dict(resource.get("code"))
    code = _icd10cm(code_concept, loc, report)
    if code is None:
        return None
    item: JSON = {
        "id": local_id(resource, KIND, report),
        "code": code,
        "display": _display(code_concept, code),
        "rank": _rank(resource, listed_rank, loc, report),
        "clinical_status": _clinical_status(resource, loc, report),
        "onset": _onset(resource, loc, report),
    }
    for absent in ("abatementDateTime", "abatementPeriod", "abatementAge", "abatementString", "abatementRange"):
        if absent in resource:
            report.warning(f"{loc}.{absent}", "abatement is not carried (the clinical status says whether it resolved)")
    return drop_empty(item), loc


def _icd10cm(code_concept: JSON, location: str, report: MappingReport) -> str | None:
    codings = codings_of(code_concept)
    for c in codings:
        raw = nonblank(c.get("code"))
        if c.get("system") in ICD10CM_SYSTEMS and raw:
            code = normalise_icd10cm(raw)
            if not ICD10CM_CODE.match(code):
                report.error(f"{location}.code", f"{raw!r} is not an ICD-10-CM code; left out")
                return None
            if code != raw or c.get("system") != terminology.ICD10CM:
                report.info(f"{location}.code", f"ICD-10-CM {c.get('system')}|{raw} read as {code}")
            return code
    found = shown_codes(code_concept)
    report.error(f"{location}.code", f"no ICD-10-CM code (codes found: {found}); the contract requires one, so it is left out", code="required")
    return None


def normalise_icd10cm(code: str) -> str:
    """``f3310`` -> ``F33.10``: upper case, the dot after the category (3 characters)."""
    code = code.strip().upper()
    return f"{code[:3]}.{code[3:]}" if len(code) > 3 and "." not in code else code


def _display(code_concept: JSON, code: str) -> str | None:
    """The record's display: the concept's text, else a coding display the table does not give."""
    text = nonblank(code_concept.get("text"))
    if text:
        return text
    table = terminology.icd10_display(code)
    for c in codings_of(code_concept):
        display = nonblank(c.get("display"))
        if c.get("system") in ICD10CM_SYSTEMS and display and display != table:
            return display
    return None


def _rank(resource: JSON, listed_rank: str | None, location: str, report: MappingReport) -> str | None:
    rank = own_extensions(resource, report, location).get(RANK, {}).get("valueCode")
    if rank in ("primary", "secondary"):
        return rank
    if listed_rank is not None:
        report.info(f"{location}.extension", f"rank {listed_rank!r} read from an EpisodeOfCare or Encounter diagnosis rank")
    return listed_rank


def _clinical_status(resource: JSON, location: str, report: MappingReport) -> str | None:
    status = code_in(resource.get("clinicalStatus"), terminology.CONDITION_CLINICAL)
    if status in CLINICAL_DISPLAY:
        return status
    if status is None and "clinicalStatus" not in resource:
        report.info(f"{location}.clinicalStatus", "no clinical status; the contract default (active) applies")
    else:
        report.warning(f"{location}.clinicalStatus", "clinical status not coded in condition-clinical; the contract default (active) applies")
    return None


def _onset(resource: JSON, location: str, report: MappingReport) -> str | None:
    if "onsetDateTime" in resource:
        raw = resource["onsetDateTime"]
        day = parse_date(raw)
        if day is None:
            report.warning(f"{location}.onsetDateTime", f"onset {raw!r} is not a full date; left out")
            return None
        if len(raw) > 10:
            report.info(f"{location}.onsetDateTime", "onset time of day dropped; the record holds the date")
        return fhir_date(day)
    if "onsetPeriod" in resource:
        day = parse_date(as_dict(resource["onsetPeriod"]).get("start"))
        if day is not None:
            report.info(f"{location}.onsetPeriod", "onset read from the start of onsetPeriod")
            return fhir_date(day)
    for key in ("onsetPeriod", "onsetAge", "onsetRange", "onsetString"):
        if key in resource:
            report.warning(f"{location}.{key}", "onset given in a form the record cannot hold (it holds a date); left out")
    return None
