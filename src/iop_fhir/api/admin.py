"""Operating the sync queue over HTTP, under ``/admin`` (plain JSON, not FHIR).

* ``GET /admin/sync``: per destination, the outbox counts by state, the age of the oldest
  pending delivery, the last success and the last error. Every configured destination is
  listed (zeros when nothing went there yet), then any destination that still has deliveries
  but is no longer configured (``"configured": false``), so nothing in the queue is invisible.
* ``GET /admin/sync/deliveries?state=dead&destination=ehr&after=ID&limit=N``: deliveries in id
  order without resource bodies; ``next_after`` pages on.
* ``POST /admin/sync/requeue`` and ``POST /admin/sync/discard`` with ``{"ids": [...]}``,
  ``{"destination": "ehr"}``, both, or ``{}`` (every dead delivery): only dead deliveries are
  touched. Answers ``{"requeued": n}`` / ``{"discarded": n}``.

Who may: ``api.auth`` classifies ``/admin`` as full access to every type (``system/*.cruds``,
or ``system/*.*``), since requeueing re-sends any patient's records; with AUTH off it is open.
The shared rules, :func:`status_rows` and :func:`selection`, serve ``iop-fhir sync`` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, request

from iop_fhir.api import destinations, store
from iop_fhir.api.iop import read_json
from iop_fhir.api.params import integer, invalid, json_response, limit, only
from iop_fhir.store import Delivery, DeliveryState, DestinationStats, instant
from iop_fhir.sync.destinations import Destination

JSON = dict[str, Any]

bp = Blueprint("admin", __name__, url_prefix="/admin")


# --- the rules, shared with the CLI --------------------------------------------------------------


def status_rows(configured: Mapping[str, Destination], stats: Mapping[str, DestinationStats], now: datetime) -> list[JSON]:
    """One row per destination: the configured ones in their order, then unconfigured ones with deliveries."""
    rows = []
    for name, destination in configured.items():
        rows.append(_row(name, destination, stats.get(name) or DestinationStats(name), now))
    for name in sorted(set(stats) - set(configured)):
        rows.append(_row(name, None, stats[name], now))
    return rows


def _row(name: str, destination: Destination | None, stats: DestinationStats, now: datetime) -> JSON:
    oldest = stats.oldest_pending
    return {
        "name": name,
        "configured": destination is not None,
        "enabled": destination.enabled if destination is not None else False,
        "kind": destination.kind if destination is not None else None,
        "base_url": destination.base_url if destination is not None else None,
        "queued": stats.queued,
        "in_flight": stats.in_flight,
        "delivered": stats.delivered,
        "failed": stats.failed,
        "dead": stats.dead,
        "oldest_pending_age_seconds": round(max((now - oldest).total_seconds(), 0.0), 3) if oldest is not None else None,
        "last_success": instant(stats.last_success) if stats.last_success is not None else None,
        "last_error": stats.last_error,
    }


def delivery_row(delivery: Delivery) -> JSON:
    """A delivery as the admin API and ``sync`` CLI show it: no resource body."""
    return {
        "id": delivery.id,
        "destination": delivery.destination,
        "resource": f"{delivery.resource_type}/{delivery.resource_id}",
        "version": delivery.version_id,
        "action": delivery.action,
        "state": delivery.state.value,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "created": instant(delivery.created),
        "next_attempt_at": instant(delivery.next_attempt_at),
    }


def selection(body: Any, known: Mapping[str, Destination], with_deliveries: Mapping[str, Any]) -> tuple[list[int] | None, str | None]:
    """The dead deliveries a requeue or discard body picks: ``(ids or None, destination or None)``.

    A destination must be configured or still have deliveries: a typo must not quietly match nothing.

    :raises InvalidAdminRequest: naming the field (``ids``, ``ids[2]``, ``destination``, or a stray key).
    """
    if not isinstance(body, Mapping):
        raise invalid("/", "the body must be a JSON object: {}, {\"ids\": [...]} or {\"destination\": \"name\"}")
    for key in body:
        if key not in ("ids", "destination"):
            raise invalid(str(key), "is not a field here (ids, destination)")
    ids = body.get("ids")
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise invalid("ids", "must be a non-empty array of delivery ids")
        for index, value in enumerate(ids):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise invalid(f"ids[{index}]", f"must be a positive integer, not {value!r}")
    destination = body.get("destination")
    if destination is not None:
        if not isinstance(destination, str) or not destination:
            raise invalid("destination", f"must be a destination name, not {destination!r}")
        if destination not in known and destination not in with_deliveries:
            raise invalid("destination", f"{destination!r} is not a configured destination and has no deliveries")
    return ids, destination


# --- the endpoints -------------------------------------------------------------------------------


@bp.get("/sync")
def sync_status() -> Response:
    st = store()
    return json_response({"destinations": status_rows(destinations(), st.outbox.stats(), st.clock())})


@bp.get("/sync/deliveries")
def list_deliveries() -> Response:
    only(("state", "destination", "after", "limit"))
    args = request.args
    state = args.get("state")
    if state is not None and state not in {s.value for s in DeliveryState}:
        raise invalid("state", f"must be one of {', '.join(s.value for s in DeliveryState)}, not {state!r}")
    after = integer("after", 0, minimum=0)
    size = limit()
    found = store().outbox.list(state=state, destination=args.get("destination") or None, after_id=after, limit=size)
    return json_response({"deliveries": [delivery_row(d) for d in found], "next_after": found[-1].id if len(found) == size else None})


def _selected() -> tuple[list[int] | None, str | None]:
    # An explicit {} selects every dead delivery; an empty body is refused, not taken for "all".
    return selection(read_json(), destinations(), store().outbox.stats())


@bp.post("/sync/requeue")
def requeue() -> Response:
    ids, destination = _selected()
    return json_response({"requeued": store().outbox.requeue(ids, destination=destination)})


@bp.post("/sync/discard")
def discard() -> Response:
    ids, destination = _selected()
    return json_response({"discarded": store().outbox.discard(ids, destination=destination)})
