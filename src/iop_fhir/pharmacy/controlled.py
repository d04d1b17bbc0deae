"""Controlled-substance rules checked before a prescription is sent to a pharmacy.

:func:`check` takes a FHIR MedicationRequest and says why it may not be sent (an empty list:
it may). The rules are federal (state law can be stricter; it is not modelled here):

* **Schedule II: no refills** (21 CFR 1306.12(a)). ``numberOfRepeatsAllowed`` must be 0 or
  absent; the prescriber writes a new prescription for each fill.
* **Schedules III and IV: at most 5 refills, and nothing dispensed more than 6 months after
  the date written** (21 CFR 1306.22). The rule used for the 6 months: the whole authorised
  supply, ``days supply x (refills + 1)`` days from ``authoredOn``, must end on or before the
  same calendar day 6 months later (181-184 days, by ``record.validate.add_months``). With
  refills taken when the supply runs out, the last fill then starts well inside the 6 months;
  an order that could only be used up after them is refused rather than left to the pharmacy
  to cut short. The days supply is therefore required for these schedules.
* **Schedule V**: no federal refill cap (the 1306.22 limits stop at IV), nothing to check.
* **Schedule I**: no accepted medical use; never prescribable.
* **Methadone for opioid use disorder is never sent to a retail (or mail-order, specialty)
  pharmacy**: it is dispensed only by a certified opioid treatment program (42 CFR Part 8), so
  only a pharmacy of kind ``opioid-treatment-program`` may receive it. Methadone is "for OUD"
  when the request says medication-assisted treatment (our ``medication-assisted-treatment``
  extension), or names an opioid-use-disorder diagnosis (ICD-10-CM F11.*); with neither said,
  the drug table's MAT flag decides (true for every methadone product), so an unlabelled
  methadone order is treated as OUD treatment -- refusing wrongly is a phone call, sending
  wrongly is a federal violation. Methadone for pain with MAT explicitly false goes anywhere
  (as Schedule II, without refills).

Where the schedule comes from: the terminology medications table (``dea_schedule`` of the
RxNorm product) -- data, not names; for a product the table does not know, our ``dea-schedule``
extension on the request. Each refusal is an :class:`~iop_fhir.errors.Issue` with code
``business-rule`` naming the MedicationRequest element to change and the rule it breaks.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from iop_fhir import terminology
from iop_fhir.errors import Issue
from iop_fhir.mappers.datatypes import as_dict, as_list, code_in, codings_of, concept_text, own_extensions, parse_date, quantity_parts, whole_number
from iop_fhir.mappers.medication_request import DAYS_PER
from iop_fhir.record.validate import add_months
from iop_fhir.terminology import ICD10CM, RXNORM

__all__ = [
    "MAX_REFILLS",
    "OPIOID_TREATMENT_PROGRAM",
    "Resolve",
    "check",
    "days_supply",
    "dea_schedule",
    "medication_concept",
    "refills",
]

JSON = dict[str, Any]
# Looks a reference string ("Patient/123", "urn:uuid:...") up in the store or a bundle.
Resolve = Callable[[str], JSON | None]

OPIOID_TREATMENT_PROGRAM = "opioid-treatment-program"  # the contract's pharmacy kind for OTPs
MAX_REFILLS = 5  # Schedules III-IV (21 CFR 1306.22(a))
SIX_MONTH_SCHEDULES = frozenset({"III", "IV"})
SCHEDULES = frozenset({"I", "II", "III", "IV", "V"})
_OUD = re.compile(r"^F11(\.|$|[0-9])")  # ICD-10-CM F11.x: opioid related disorders

_REFILLS = "MedicationRequest.dispenseRequest.numberOfRepeatsAllowed"
_SUPPLY = "MedicationRequest.dispenseRequest.expectedSupplyDuration"
_PERFORMER = "MedicationRequest.dispenseRequest.performer"


def check(request: JSON, *, pharmacy_kind: str | None, resolve: Resolve | None = None) -> list[Issue]:
    """Why ``request`` may not be sent to a pharmacy of ``pharmacy_kind`` (empty: it may).

    :param pharmacy_kind: the receiving pharmacy's kind (``retail``, ``mail-order``,
        ``specialty``, ``opioid-treatment-program``); ``None`` when unknown, which only an
        opioid treatment program's methadone would need and so is refused for it.
    :param resolve: looks up the request's ``reasonReference`` Conditions and a
        ``medicationReference``; without it only ``reasonCode`` and the concept are read.
    """
    issues: list[Issue] = []
    schedule = dea_schedule(request, resolve)
    count = refills(request)
    if schedule == "I":
        issues.append(_refusal("MedicationRequest.medicationCodeableConcept", "a Schedule I substance has no accepted medical use and cannot be prescribed (21 CFR 1306.04)"))
    elif schedule == "II" and count > 0:
        issues.append(_refusal(_REFILLS, f"Schedule II allows no refills (21 CFR 1306.12(a)); {count} asked for: write a new prescription for each fill"))
    elif schedule in SIX_MONTH_SCHEDULES:
        issues.extend(_six_months(request, schedule, count))
    if _is_methadone(request, resolve) and _for_opioid_use_disorder(request, resolve) and pharmacy_kind != OPIOID_TREATMENT_PROGRAM:
        kind = f"a {pharmacy_kind} pharmacy" if pharmacy_kind else "a pharmacy of unknown kind"
        issues.append(
            _refusal(
                _PERFORMER,
                f"methadone for opioid use disorder is dispensed only by a certified opioid treatment program (42 CFR Part 8); it is never sent to {kind}",
            )
        )
    return issues


def _six_months(request: JSON, schedule: str, count: int) -> list[Issue]:
    """Schedules III-IV: at most 5 refills, the authorised supply used up within 6 months of writing."""
    issues = []
    if count > MAX_REFILLS:
        issues.append(_refusal(_REFILLS, f"Schedule {schedule} allows at most {MAX_REFILLS} refills (21 CFR 1306.22); {count} asked for"))
    written = parse_date(request.get("authoredOn"))
    days = days_supply(request)
    if written is None:
        issues.append(_refusal("MedicationRequest.authoredOn", f"Schedule {schedule}: the date written is needed to check the 6-month limit (21 CFR 1306.22)", code="required"))
    if days is None:
        issues.append(_refusal(_SUPPLY, f"Schedule {schedule}: a days supply is needed to check the 6-month limit (21 CFR 1306.22)", code="required"))
    if written is None or days is None:
        return issues
    supply_ends = written + dt.timedelta(days=days * (count + 1))
    limit = add_months(written, 6)
    if supply_ends > limit:
        issues.append(
            _refusal(
                _REFILLS,
                f"Schedule {schedule}: {days} days x {count + 1} fills from {written.isoformat()} last until {supply_ends.isoformat()}, "
                f"past 6 months after writing ({limit.isoformat()}; 21 CFR 1306.22): fewer refills or a shorter supply",
            )
        )
    return issues


def _refusal(location: str, message: str, code: str = "business-rule") -> Issue:
    return Issue(message, location=location, code=code)


# --- what the request says -------------------------------------------------------------------


def medication_concept(request: JSON, resolve: Resolve | None = None) -> JSON:
    """The product's CodeableConcept: ``medicationCodeableConcept``, or the ``code`` of the
    Medication a ``medicationReference`` points at (contained ``#id`` or resolved)."""
    if isinstance(request.get("medicationCodeableConcept"), dict):
        return request["medicationCodeableConcept"]
    reference = as_dict(request.get("medicationReference")).get("reference")
    medication = lookup(request, reference, resolve)
    return as_dict(as_dict(medication).get("code"))


def lookup(holder: JSON, reference: Any, resolve: Resolve | None) -> JSON | None:
    """The resource a reference string names: a contained one (``#id``) or through ``resolve``."""
    if not isinstance(reference, str) or not reference:
        return None
    if reference.startswith("#"):
        return next((c for c in as_list(holder.get("contained")) if isinstance(c, dict) and c.get("id") == reference[1:]), None)
    found = resolve(reference) if resolve is not None else None
    return found if isinstance(found, dict) else None


def dea_schedule(request: JSON, resolve: Resolve | None = None) -> str | None:
    """The product's DEA schedule (``II`` ... ``V``), None when not controlled or not known.

    The drug table decides for the products it knows; our ``dea-schedule`` extension for others.
    """
    rxnorm = code_in(medication_concept(request, resolve), RXNORM)
    known = terminology.medication(rxnorm) if rxnorm else None
    if known is not None:
        return known["dea_schedule"]
    schedule = as_dict(own_extensions(request).get("dea-schedule")).get("valueCode")
    return schedule if schedule in SCHEDULES else None


def refills(request: JSON) -> int:
    """``numberOfRepeatsAllowed``; absent means none (the pharmacy fills once)."""
    value = whole_number(as_dict(request.get("dispenseRequest")).get("numberOfRepeatsAllowed"))
    return value if value is not None and value >= 0 else 0


def days_supply(request: JSON) -> int | None:
    """``expectedSupplyDuration`` in whole days (days or weeks), None when absent or odd."""
    parts = quantity_parts(as_dict(as_dict(request.get("dispenseRequest")).get("expectedSupplyDuration")))
    if parts is None or not isinstance(parts[1], str) or parts[1].lower() not in DAYS_PER:
        return None
    days = parts[0] * DAYS_PER[parts[1].lower()]
    return int(days) if days == days.to_integral_value() and days > 0 else None


def _is_methadone(request: JSON, resolve: Resolve | None) -> bool:
    concept = medication_concept(request, resolve)
    rxnorm = code_in(concept, RXNORM)
    known = terminology.medication(rxnorm) if rxnorm else None
    if known is not None:
        return known["ingredient"] == "methadone"
    # A product the table does not know: its words are all there is. Erring towards "methadone"
    # only ever stops a send that a person then looks at.
    words = " ".join(filter(None, [concept_text(concept) or ""] + [c.get("display") or "" for c in codings_of(concept)]))
    return "methadone" in words.lower()


def _for_opioid_use_disorder(request: JSON, resolve: Resolve | None) -> bool:
    if any(_OUD.match(code) for code in _diagnosis_codes(request, resolve)):
        return True
    mat = as_dict(own_extensions(request).get("medication-assisted-treatment")).get("valueBoolean")
    if isinstance(mat, bool):
        return mat
    rxnorm = code_in(medication_concept(request, resolve), RXNORM)
    known = terminology.medication(rxnorm) if rxnorm else None
    return True if known is None else bool(known["mat"])


def _diagnosis_codes(request: JSON, resolve: Resolve | None) -> list[str]:
    """ICD-10-CM codes of the request's reasons: ``reasonCode`` and resolved ``reasonReference``."""
    codes = [code_in(c, ICD10CM) for c in as_list(request.get("reasonCode"))]
    for reference in as_list(request.get("reasonReference")):
        condition = lookup(request, as_dict(reference).get("reference"), resolve)
        codes.append(code_in(as_dict(condition).get("code"), ICD10CM))
    return [c for c in codes if c]
