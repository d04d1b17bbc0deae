"""Pharmacies over NCPDP SCRIPT: ``POST /ncpdp``, and the message store under ``/admin/ncpdp``.

* ``POST /ncpdp`` (``application/xml`` or ``text/xml``): one SCRIPT message from a pharmacy,
  answered synchronously in SCRIPT, not FHIR -- ``Status`` (HTTP 200) when applied, ``Error``
  (HTTP 200) when it reads but cannot be applied, ``Error`` with HTTP 400 (413, 415) when it
  cannot be read, ``Error`` 602 with HTTP 500 for our own failure. The work is
  :func:`iop_fhir.pharmacy.inbound.receive`; every message is kept in the message store.
* ``GET /admin/ncpdp/messages?prescription=&kind=&direction=&status=&after=&limit=``: the kept
  messages in id order, without bodies (JSON); ``next_after`` pages on.
* ``GET /admin/ncpdp/messages/{id}``: one message's body exactly as received or sent
  (``application/xml``; a rejected body, which may be anything, as an ``application/octet-stream``
  attachment), its direction and kind in ``X-Message-*`` headers.
* ``POST /admin/ncpdp/messages/{id}/replay``: apply a received message again (JSON result); an
  outbound one is a 409 (requeue its delivery instead).

Who may (``api.auth``): ``/ncpdp`` needs ``c`` on MedicationDispense (pharmacies are system
clients: ``system/MedicationDispense.c``); ``/admin/ncpdp`` the same full access as ``/admin/sync``.
Errors of the admin routes are OperationOutcomes, as everywhere but ``/ncpdp``.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import RequestEntityTooLarge

from iop_fhir.api import destinations, store
from iop_fhir.api.params import integer, invalid, json_response, limit, only
from iop_fhir.errors import UnsupportedFormat
from iop_fhir.formats.safe_xml import XmlTooLarge
from iop_fhir.pharmacy import inbound
from iop_fhir.store import instant
from iop_fhir.store.messages import StoredMessage

JSON = dict[str, Any]
XML_TYPES = ("application/xml", "text/xml")
XML_TYPE = "application/xml"
DIRECTIONS = ("in", "out")

bp = Blueprint("ncpdp", __name__)


@bp.record_once
def _check_settings(state: BlueprintSetupState) -> None:
    """A bad ``MAT_REFILL_GRACE_DAYS`` stops the gateway at start, not at a pharmacy's first fill."""
    inbound.InboundOptions.from_settings(state.app.config)


def message_row(message: StoredMessage) -> JSON:
    """A kept message as the admin API and ``iop-fhir ncpdp messages`` show it: no body, its size."""
    return {
        "id": message.id,
        "created": instant(message.created),
        "direction": message.direction,
        "kind": message.kind,
        "message_id": message.message_id,
        "relates_to": message.relates_to,
        "counterparty": message.counterparty,
        "prescription": message.prescription,
        "patient": message.patient_key,
        "status": message.status,
        "detail": message.detail,
        "bytes": len(message.body),
    }


def _options() -> inbound.InboundOptions:
    return inbound.InboundOptions.from_settings(current_app.config, destinations().values())


def _xml(answer: inbound.Answer) -> Response:
    return Response(answer.body, answer.http_status, content_type=XML_TYPE)


@bp.post("/ncpdp")
def receive() -> Response:
    st = store()
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        return _xml(inbound.refuse(st, b"", XmlTooLarge(f"the body is over the {limit}-byte limit")))
    kind = (request.mimetype or "").lower()
    if kind not in XML_TYPES:
        return _xml(inbound.refuse(st, body, UnsupportedFormat(f"Content-Type {kind or 'none'!r} is not accepted; SCRIPT messages are application/xml")))
    return _xml(inbound.receive(st, body, _options()))


@bp.get("/admin/ncpdp/messages")
def list_messages() -> Response:
    only(("prescription", "kind", "direction", "status", "after", "limit"))
    args = request.args
    direction = args.get("direction") or None
    if direction is not None and direction not in DIRECTIONS:
        raise invalid("direction", f"must be in or out, not {direction!r}")
    size = limit()
    found = store().messages.list(
        prescription=prescription_key(args.get("prescription")),
        kind=args.get("kind") or None,
        direction=direction,
        status=args.get("status") or None,
        after_id=integer("after", 0, minimum=0),
        limit=size,
    )
    return json_response({"messages": [message_row(m) for m in found], "next_after": found[-1].id if len(found) == size else None})


def prescription_key(value: str | None) -> str | None:
    """``MedicationRequest/{id}`` from that or a bare id (how messages name their prescription)."""
    if not value:
        return None
    return value if value.startswith("MedicationRequest/") else f"MedicationRequest/{value}"


@bp.get("/admin/ncpdp/messages/<int:id>")
def read_message(id: int) -> Response:
    message = store().messages.get(id)
    headers = {
        "X-Message-Direction": message.direction,
        "X-Message-Kind": message.kind,
        "X-Content-Type-Options": "nosniff",
    }
    if message.status == "rejected":  # not known to be XML at all: never rendered inline
        headers["Content-Disposition"] = f'attachment; filename="message-{id}.bin"'
        return Response(message.body, 200, headers=headers, content_type="application/octet-stream")
    return Response(message.body, 200, headers=headers, content_type=XML_TYPE)


@bp.post("/admin/ncpdp/messages/<int:id>/replay")
def replay(id: int) -> Response:
    return json_response(inbound.replay(store(), id, _options()).as_json())
