"""What every Observation of the family shares, both directions (the field table is in observation.py).

Forward: one skeleton (id, business identifier, status, category, code, subject, effective)
so each kind only adds its value parts. Back: ``ObservationReader`` reads the parts every
kind needs from possibly foreign Observations (status, effective time, the referenced
prescription or clinician, the record-local id) and reports what it cannot use; codes and
texts are read with the helpers every family uses (datatypes.py).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from iop_fhir.mappers.context import LOCAL_ID, MappingContext, ResourceIndex, local_id, reference_text
from iop_fhir.mappers.datatypes import (
    as_list,
    concept,
    coding,
    drop_empty,
    fhir_date,
    fhir_datetime,
    parse_date,
    parse_datetime,
    to_decimal,
    where,
)
from iop_fhir.mappers.report import MappingReport
from iop_fhir.terminology import OBSERVATION_CATEGORY, us_core

JSON = dict[str, Any]

# Contract amounts: at most 12 digits, 4 of them after the point (model.Amount).
AMOUNT_PLACES = Decimal("0.0001")
AMOUNT_LIMIT = Decimal("1e8")

# Statuses whose Observation carries no result to import (the rest are mapped; non-final noted).
NO_RESULT = frozenset({"entered-in-error", "cancelled"})
FINAL = frozenset({"final", "amended", "corrected"})


def category(code: str, display: str, system: str = OBSERVATION_CATEGORY) -> JSON:
    return concept(coding(system, code, display))


def label(code: str) -> str:
    """Human display for one of our own kebab-case codes: ``dose-reduced`` -> ``Dose reduced``."""
    return code.replace("-", " ").capitalize()


def fresh(value: Any) -> Any:
    """A copy of a JSON value (cheaper than copy.deepcopy for these small shapes)."""
    if isinstance(value, dict):
        return {k: fresh(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fresh(v) for v in value]
    return value


def observation(
    ctx: MappingContext,
    kind: str,
    item_id: str,
    *,
    profile: str | None,
    categories: list[JSON],
    code: JSON,
    effective: dt.date | dt.datetime,
    **elements: Any,
) -> JSON:
    """The Observation skeleton every kind fills: ``elements`` are the kind's own FHIR elements."""
    when = fhir_datetime(effective) if isinstance(effective, dt.datetime) else fhir_date(effective)
    resource: JSON = {
        "resourceType": "Observation",
        "id": ctx.ids.id("Observation", kind, item_id),
        "meta": {"profile": [us_core(profile)]} if profile else None,
        "extension": elements.pop("extension", None),
        "identifier": [ctx.ids.identifier(kind, item_id)],
        "status": "final",
        # copies: module-level constants must not be shared between resources a caller may edit
        "category": fresh(categories),
        "code": fresh(code),
        "subject": dict(ctx.patient),
        "focus": elements.pop("focus", None),
        "effectiveDateTime": when,
    }
    resource.update(elements)
    return drop_empty(resource)


def contract_amount(value: Any, where: str, report: MappingReport) -> Decimal | None:
    """A FHIR decimal as a contract amount (>= 0, 4 decimal places), reporting what does not fit."""
    amount = to_decimal(value)
    if amount is None or not amount.is_finite():
        report.error(where, f"value {value} is not a number")
        return None
    if amount < 0 or amount >= AMOUNT_LIMIT:
        report.error(where, f"value {amount} is outside what the record holds (0 to 99999999.9999)")
        return None
    rounded = amount.quantize(AMOUNT_PLACES)
    if rounded != amount:
        report.info(where, f"value {amount} rounded to {rounded} (the record keeps 4 decimal places)")
        return rounded
    return amount


class ObservationReader:
    """Reads the parts all Observation kinds share, reporting against one resource's location."""

    def __init__(self, index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
        self.index = index
        self.draft = draft
        self.report = report
        self._full_urls: dict[int, str] | None = None

    # Report locations as every family writes them.
    where = staticmethod(where)

    def has_result(self, resource: JSON) -> bool:
        """False for Observations that hold no result (entered in error, cancelled): reported, skipped."""
        status = resource.get("status") if isinstance(resource.get("status"), str) else None
        if status in NO_RESULT:
            self.report.warning(self.where(resource, "status"), f"status {status!r}: no result to import; left out")
            return False
        if status is None:
            self.report.info(self.where(resource, "status"), "no status; imported as a final result")
        elif status not in FINAL:
            self.report.info(self.where(resource, "status"), f"status {status!r} is not final; imported as reported")
        return True

    def item_id(self, resource: JSON, kind: str) -> str | None:
        """The record-local id: our business identifier, else the resource id, else its urn:uuid fullUrl."""
        found = local_id(resource, kind, self.report)
        if found is not None:
            return found
        if self._full_urls is None:
            self._full_urls = {
                id(res): url[len("urn:uuid:") :] for url, res in self.index.by_reference.items() if url.startswith("urn:uuid:")
            }
        uuid_tail = self._full_urls.get(id(resource))
        if uuid_tail and LOCAL_ID.match(uuid_tail):
            self.report.info(self.where(resource, "id"), f"no {kind} identifier or id; the entry's fullUrl uuid stands in")
            return uuid_tail
        self.report.error(self.where(resource, "id"), f"no {kind} identifier, id or fullUrl to name the item by; left out", code="required")
        return None

    def _effective(self, resource: JSON) -> tuple[str | None, str]:
        for key in ("effectiveDateTime", "effectiveInstant"):
            if isinstance(resource.get(key), str):
                return resource[key], key
        period = resource.get("effectivePeriod")
        if isinstance(period, dict) and isinstance(period.get("start"), str):
            self.report.info(self.where(resource, "effectivePeriod"), "a period: its start is taken as the time")
            return period["start"], "effectivePeriod.start"
        return None, "effective[x]"

    def effective_datetime(self, resource: JSON) -> dt.datetime | None:
        """effective[x] as an aware datetime; a bare date is midnight UTC, a missing offset UTC (both reported)."""
        text, element = self._effective(resource)
        where = self.where(resource, element)
        if text is None:
            self.report.error(where, "no effective time; left out", code="required")
            return None
        value = parse_datetime(text)
        if value is not None:
            if len(text) == 10:
                self.report.info(where, "a date without time: midnight UTC assumed")
            return value
        try:
            naive = dt.datetime.fromisoformat(text)
        except ValueError:
            self.report.error(where, f"{text!r} is not a full date or date-time; left out")
            return None
        self.report.warning(where, "a time without UTC offset: UTC assumed", code="value")
        return naive.replace(tzinfo=dt.timezone.utc)

    def effective_date(self, resource: JSON) -> dt.date | None:
        text, element = self._effective(resource)
        value = parse_date(text)
        if value is None:
            self.report.error(self.where(resource, element), "no full effective date; left out", code="required")
        return value

    def resolve(self, reference: Any, holder: JSON) -> JSON | None:
        """The resource a Reference names, if present; malformed references resolve to nothing."""
        return self.index.resolve(reference_text(reference), holder)

    def target_id(self, reference: Any, holder: JSON, where: str, kinds: dict[str, str], *, shared: bool) -> str | None:
        """Local id of the resource a reference names, when it is one of ``kinds`` (type -> identifier kind)."""
        target = self.resolve(reference, holder)
        if target is None:
            self.report.warning(where, "the referenced resource is not in the input; reference dropped")
            return None
        kind = kinds.get(target.get("resourceType", ""))
        if kind is None:
            self.report.warning(where, f"a {target.get('resourceType')} cannot stand here; reference dropped")
            return None
        return local_id(target, kind, self.report, shared=shared)

    def members(self, holder: JSON, element: str, *, report_missing: bool) -> list[JSON]:
        """The Observations a panel's hasMember (or a report's result) names, in order."""
        out = []
        for i, ref in enumerate(as_list(holder.get(element))):
            target = self.resolve(ref, holder)
            if target is not None and target.get("resourceType") == "Observation":
                out.append(target)
            elif report_missing:
                self.report.warning(self.where(holder, f"{element}[{i}]"), "member Observation not in the input; skipped")
        return out

    def prescription_id(self, resource: JSON) -> str | None:
        """The prescription an Observation is about: focus (ours), else basedOn (what some systems use)."""
        for element in ("focus", "basedOn"):
            for i, ref in enumerate(as_list(resource.get(element))):
                target = self.resolve(ref, resource)
                if target is not None and target.get("resourceType") == "MedicationRequest":
                    if element == "basedOn":
                        self.report.info(self.where(resource, f"basedOn[{i}]"), "prescription taken from basedOn")
                    return local_id(target, "prescription", self.report)
        return None

    def clinician_id(self, resource: JSON) -> str | None:
        """The first performer that is one of the program's clinicians (Practitioner or PractitionerRole)."""
        found: str | None = None
        for i, ref in enumerate(as_list(resource.get("performer"))):
            where = self.where(resource, f"performer[{i}]")
            if found is not None:
                self.report.warning(where, "the record names one performer; further performers dropped")
                continue
            found = self.target_id(ref, resource, where, {"Practitioner": "staff", "PractitionerRole": "staff-role"}, shared=True)
        return found
