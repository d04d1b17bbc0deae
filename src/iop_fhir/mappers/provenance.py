"""Where a record's resources come from -> one FHIR Provenance (US Core Provenance).

The Provenance is derived, not part of the contract: it says the program authored every
resource of the record (and its gateway sent them), as of the record's latest event. Nothing
reads back from it.

| FHIR Provenance         | from                                                                  |
|-------------------------|-----------------------------------------------------------------------|
| id                      | kind ``provenance``, local id = the record id (program-wide)          |
| target[]                | every resource mapped before it (``urn:uuid:`` references)            |
| recorded                | ``as_of(record)``: the latest date or instant of something that       |
|                         | happened in the record (dates count as midnight UTC)                  |
| agent[0]                | type provenance-participant-type#author, who = the program            |
| agent[1]                | type us-core-provenance-participant-type#transmitter, who = program   |

``recorded`` comes from the record, not the clock, so a resend gives the same resource.
Dates that look ahead (planned ends, period bounds, due dates, follow-up dates) are not
events and do not count: a consent valid until next year must not date the Provenance in
the future. US Core requires ``onBehalfOf`` only when the agent is a Practitioner or Device;
ours is the program Organization itself.

R4 Provenance has no ``identifier``: bundle entries for it cannot be conditional updates on
a business identifier (a PUT to ``Provenance/{id}`` fits, the id being deterministic).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from functools import cache
from typing import Any, get_args

from pydantic import AwareDatetime, BaseModel

from iop_fhir import terminology
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.datatypes import coding, concept, fhir_datetime
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import IopRecord, Period

JSON = dict[str, Any]

KIND = "provenance"
# Contract fields that name a day still to come, not one something happened on.
LOOKING_AHEAD = frozenset({"planned_end", "end", "due", "first_follow_up"})


def to_fhir(ctx: MappingContext, resources: list[JSON]) -> list[JSON]:
    """One Provenance targeting ``resources`` (none if there is nothing to target)."""
    if not resources:
        return []
    record = ctx.record
    return [
        {
            "resourceType": "Provenance",
            "id": ctx.ids.id("Provenance", KIND, record.id, shared=True),
            "meta": {"profile": [terminology.us_core("us-core-provenance")]},
            "target": [{"reference": f"urn:uuid:{r['id']}"} for r in resources],
            "recorded": fhir_datetime(as_of(record)),
            "agent": [
                {"type": concept(coding(terminology.PROVENANCE_PARTICIPANT, "author", "Author")), "who": ctx.organization},
                {"type": concept(coding(terminology.US_CORE_PROVENANCE_PARTICIPANT, "transmitter", "Transmitter")), "who": ctx.organization},
            ],
        }
    ]


def from_fhir(index: ResourceIndex, draft: JSON, report: MappingReport) -> None:
    """Nothing: Provenance is derived from the record, which holds no trace of it."""


def as_of(record: IopRecord) -> dt.datetime:
    """The latest instant (UTC) of an event in the record; dates count as midnight UTC."""
    return max(_instants(record))


def _instants(value: Any) -> Iterator[dt.datetime]:
    if isinstance(value, dt.datetime):
        yield value.astimezone(dt.timezone.utc)
    elif isinstance(value, dt.date):
        yield dt.datetime.combine(value, dt.time(0, 0), dt.timezone.utc)
    elif isinstance(value, list):
        for item in value:
            yield from _instants(item)
    elif isinstance(value, BaseModel):
        for name in _dated_fields(type(value)):
            yield from _instants(getattr(value, name))


@cache
def _dated_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields of a contract model that can hold an event's date (looked up once per class)."""
    return tuple(name for name, f in model.model_fields.items() if name not in LOOKING_AHEAD and _may_hold_dates(f.annotation))


def _may_hold_dates(annotation: Any) -> bool:
    if annotation in (dt.date, dt.datetime, AwareDatetime):
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        # a period's bounds are a span, not events
        return annotation is not Period and bool(_dated_fields(annotation))
    return any(_may_hold_dates(arg) for arg in get_args(annotation))
