"""Consents to disclose <-> FHIR Consent (R4; US Core has no Consent profile).

Each consent lets one recipient (an outside provider or a pharmacy) receive some categories
of the client's records for one purpose during a period; Part 2 consents are the written
consents 42 CFR Part 2 requires before substance-use records may be disclosed.

| contract field          | FHIR Consent                                                             |
|-------------------------|--------------------------------------------------------------------------|
| consents[].id           | identifier[0] (kind ``consent``, episode item) and ``id``                |
| consents[].recipient_id | provision.actor[0] (role v3-ParticipationType#IRCP).reference: the       |
|                         | provider's Organization/Practitioner or the pharmacy's Organization      |
| consents[].purpose      | provision.purpose[0] (v3-ActReason, same codes)                          |
| consents[].categories   | provision.code[] (``CodeSystem/data-category``, one per category)        |
| consents[].period       | provision.period                                                         |
| consents[].part2        | policy[0].uri = the eCFR text of 42 CFR Part 2, plus policyRule          |
|                         | v3-ActCode#42CFRPart2; otherwise policyRule consentpolicycodes#hipaa-auth |
| consents[].signed       | dateTime (a date)                                                        |
| consents[].revoked_on   | extension ``revoked-on`` (valueDate), and status inactive                |
| derived (not read back) | status active; scope patient-privacy; category LOINC 59284-0 and         |
|                         | v3-ActCode#IDSCL; patient; performer (the client signs); organization    |
|                         | (the program, custodian); provision.type permit; action disclose         |

Revocation: R4 Consent has no revocation date. ``provision.period`` is the period the
consent covers and stays as signed; status inactive says it no longer applies, and the
extension says since when (so a disclosure before that date can still be judged).

Back from foreign FHIR, anything that would make a consent allow more than its author meant
leaves it out with an error, never mapped loosely: nested provisions (exceptions), data
restrictions the record cannot hold (class, data, securityLabel, dataPeriod, other codes),
an inactive consent without a revocation date, a recipient that is not a provider or pharmacy
of the record. A provision that restricts no data covers everything (categories ``all``).
"""

from __future__ import annotations

from typing import Any

from iop_fhir import terminology
from iop_fhir.mappers.context import MappingContext, ResourceIndex, known_ids, local_id, reference_text
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
    unknown_modifiers,
    where,
)
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import Consent

JSON = dict[str, Any]

KIND = "consent"
REVOKED_ON = "revoked-on"
DATA_CATEGORY = terminology.code_system("data-category")
CONSENT_PROVISION_RESTRICTIONS = ("class", "data", "securityLabel", "dataPeriod")
# The regulation itself (eCFR, current text): what a Part 2 consent is given under.
PART2_URI = "https://www.ecfr.gov/current/title-42/chapter-I/subchapter-A/part-2"
PART2_RULE = coding(terminology.V3_ACT_CODE, "42CFRPart2", "42 CFR Part2")
HIPAA_RULE = coding(terminology.CONSENT_POLICY, "hipaa-auth", "HIPAA Authorization")
RECIPIENT_ROLE = coding(terminology.V3_PARTICIPATION_TYPE, "IRCP", "information recipient")

PURPOSE_DISPLAY = {
    "TREAT": "treatment",
    "ETREAT": "Emergency Treatment",
    "COC": "coordination of care",
    "HPAYMT": "healthcare payment",
    "HOPERAT": "healthcare operations",
    "PATRQT": "patient requested",
    "PUBHLTH": "public health",
    "HRESCH": "healthcare research",
}
CATEGORY_DISPLAY = {
    "demographics": "Demographics",
    "diagnoses": "Diagnoses",
    "medications": "Medications",
    "assessments": "Assessments and screening scores",
    "drug-screens": "Drug screen results",
    "vitals": "Vital signs",
    "sessions": "Treatment sessions",
    "care-plan": "Care plan",
    "discharge": "Discharge and aftercare",
    "all": "All of the client's records",
}


# --- forward ---------------------------------------------------------------------------------


def to_fhir(ctx: MappingContext) -> list[JSON]:
    """One Consent per consent, in record order."""
    pharmacies = {p.id for p in ctx.record.pharmacies}
    return [consent(ctx, c, ctx.pharmacy(c.recipient_id) if c.recipient_id in pharmacies else ctx.provider(c.recipient_id)) for c in ctx.record.consents]


def consent(ctx: MappingContext, item: Consent, recipient: JSON) -> JSON:
    period = {"start": fhir_date(item.period.start)}
    if item.period.end:
        period["end"] = fhir_date(item.period.end)
    provision = {
        "type": "permit",
        "period": period,
        "actor": [{"role": concept(RECIPIENT_ROLE), "reference": recipient}],
        "action": [concept(coding(terminology.CONSENT_ACTION, "disclose", "Disclose"))],
        "purpose": [coding(terminology.V3_ACT_REASON, item.purpose, PURPOSE_DISPLAY[item.purpose])],
        "code": [concept(coding(DATA_CATEGORY, c, CATEGORY_DISPLAY[c])) for c in item.categories],
    }
    return drop_empty(
        {
            "resourceType": "Consent",
            "id": ctx.ids.id("Consent", KIND, item.id),
            # R4 has no revocation date: see the module doc.
            "extension": [extension(REVOKED_ON, valueDate=fhir_date(item.revoked_on))] if item.revoked_on else [],
            "identifier": [ctx.ids.identifier(KIND, item.id)],
            "status": "inactive" if item.revoked_on else "active",
            "scope": concept(coding(terminology.CONSENT_SCOPE, "patient-privacy", "Privacy Consent")),
            "category": [
                concept(coding(terminology.LOINC, "59284-0", "Patient Consent")),
                concept(coding(terminology.V3_ACT_CODE, "IDSCL", "information disclosure")),
            ],
            "patient": ctx.patient,
            "dateTime": fhir_date(item.signed),
            "performer": [ctx.patient],
            "organization": [ctx.organization],
            "policy": [{"uri": PART2_URI}] if item.part2 else [],
            "policyRule": concept(PART2_RULE if item.part2 else HIPAA_RULE),
            "provision": provision,
        }
    )


# --- back ------------------------------------------------------------------------------------


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Fill ``consents``; run after organization.py, whose parties are the recipients."""
    known = set().union(*(known_ids(draft, name) or set() for name in ("pharmacies", "providers")))
    draft["consents"] = read_each(index.of_type("Consent"), lambda c: _consent(c, index, known, report), report)


def _consent(resource: JSON, index: ResourceIndex, known: set[str], report: MappingReport) -> JSON | None:
    loc = where(resource)
    if unknown_modifiers(resource, report):
        return None
    revoked = parse_date(own_extensions(resource, report, loc).get(REVOKED_ON, {}).get("valueDate"))
    status = resource.get("status")
    if status not in ("active", "inactive"):
        report.warning(f"{loc}.status", f"a {status!r} consent is not in force; left out")
        return None
    if status == "inactive" and revoked is None:
        report.error(f"{loc}.status", f"inactive consent without a revocation date (extension {REVOKED_ON}); left out rather than taken as in force")
        return None
    provision = as_dict(resource.get("provision"))
    if not _permits_only_what_record_holds(provision, loc, report):
        return None
    recipient = _recipient(resource, provision, index, known, loc, report)
    purpose = _purpose(provision, loc, report)
    categories = _categories(provision, loc, report)
    if recipient is None or purpose is None or categories is None:
        return None
    signed = parse_date(resource.get("dateTime"))
    period = as_dict(provision.get("period"))
    start, end = parse_date(period.get("start")), parse_date(period.get("end"))
    if start is None and signed is not None:
        report.info(f"{loc}.provision.period", "no period start; the consent applies from its signing date")
        start = signed
    if signed is None and start is not None:
        report.info(f"{loc}.dateTime", "no signing date; the start of the period stands in")
        signed = start
    if signed is None:
        report.error(f"{loc}.dateTime", "consent without a signing date or period; the contract requires them", code="required")
        return None
    item = {
        "id": local_id(resource, KIND, report),
        "recipient_id": recipient,
        "purpose": purpose,
        "categories": categories,
        "period": {"start": fhir_date(start), "end": fhir_date(end) if end else None},
        "part2": is_part2_consent(resource),
        "signed": fhir_date(signed),
        "revoked_on": fhir_date(revoked) if revoked else None,
    }
    item["period"] = drop_empty(item["period"])
    return settle(Consent, drop_empty(item), report, loc)


def _permits_only_what_record_holds(provision: JSON, location: str, report: MappingReport) -> bool:
    """False (reported) when carrying this provision over would let more through than it does."""
    where_ = f"{location}.provision"
    if provision.get("modifierExtension"):
        report.error(f"{where_}.modifierExtension", "modifier extensions the gateway does not know: left out", code="not-supported")
        return False
    if provision.get("type") != "permit":
        report.error(f"{where_}.type", f"provision type {provision.get('type')!r}: only permits map to a consent of the record; left out")
        return False
    if provision.get("provision"):
        report.error(f"{where_}.provision", "nested provisions (exceptions) cannot be carried; left out, since dropping them would widen the consent")
        return False
    narrowing = [key for key in CONSENT_PROVISION_RESTRICTIONS if provision.get(key)]
    if narrowing:
        report.error(f"{where_}", f"{', '.join(narrowing)} restrict the data in ways the record cannot hold; left out, since dropping them would widen the consent")
        return False
    return True


def _recipient(resource: JSON, provision: JSON, index: ResourceIndex, known: set[str], location: str, report: MappingReport) -> str | None:
    actors = [as_dict(a) for a in as_list(provision.get("actor"))]
    recipients = [a for a in actors if code_in(a.get("role"), terminology.V3_PARTICIPATION_TYPE) == "IRCP"]
    if not recipients and len(actors) == 1:
        report.info(f"{location}.provision.actor", "the only actor is taken as the recipient (its role is not IRCP)")
        recipients = actors
    if not recipients:
        report.error(f"{location}.provision.actor", "no recipient (actor with role IRCP); the contract requires one", code="required")
        return None
    if len(recipients) > 1:
        report.warning(f"{location}.provision.actor", "several recipients; the record holds one per consent, so only the first is kept")
    ref = reference_text(recipients[0].get("reference"))
    target = index.resolve(ref, resource)
    if target is None:
        report.error(f"{location}.provision.actor", f"recipient {ref!r} is not in the bundle; left out", code="not-found")
        return None
    for kind in ("pharmacy", "provider"):
        candidate = local_id(target, kind, shared=True)
        if candidate in known:
            return candidate
    report.error(f"{location}.provision.actor", f"recipient {ref!r} is not among the record's providers or pharmacies; left out", code="not-found")
    return None


def _purpose(provision: JSON, location: str, report: MappingReport) -> str | None:
    codes = [c["code"] for c in as_list(provision.get("purpose")) if isinstance(c, dict) and c.get("system") == terminology.V3_ACT_REASON and c.get("code") in PURPOSE_DISPLAY]
    if not codes:
        report.error(f"{location}.provision.purpose", f"no purpose of use the record knows ({', '.join(PURPOSE_DISPLAY)}); left out", code="required")
        return None
    if len(codes) > 1:
        report.warning(f"{location}.provision.purpose", f"several purposes; the record holds one, so only {codes[0]} is kept")
    return codes[0]


def _categories(provision: JSON, location: str, report: MappingReport) -> list[str] | None:
    concepts = [as_dict(c) for c in as_list(provision.get("code"))]
    if not concepts:
        report.info(f"{location}.provision.code", "the provision restricts no data, so it covers all of it")
        return ["all"]
    categories = [code_in(c, DATA_CATEGORY) for c in concepts]
    if None in categories or any(c not in CATEGORY_DISPLAY for c in categories):
        report.error(f"{location}.provision.code", f"data codes outside {DATA_CATEGORY}; left out, since dropping them would widen the consent")
        return None
    return categories


def is_part2_consent(resource: JSON) -> bool:
    """Whether a FHIR Consent is a 42 CFR Part 2 consent (by its policy URI or policy rule); the
    reverse mapper and the privacy decision read it the same way."""
    uris = [nonblank(as_dict(p).get("uri")) or "" for p in as_list(resource.get("policy"))]
    if any("ecfr.gov" in u and "title-42" in u and "part-2" in u for u in uris):
        return True
    # 42CFRPart2 in v3-ActCode, or in the deprecated v3-ActUSPrivacyLaw older systems still send.
    return any(c.get("code") == "42CFRPart2" for c in codings_of(resource.get("policyRule")))
