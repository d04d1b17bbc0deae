"""Pharmacy messages in: what the gateway does with each SCRIPT transaction a pharmacy sends.

``POST /ncpdp`` (:mod:`iop_fhir.api.ncpdp`) and the ``iop-fhir ncpdp`` commands are thin over
this module; it knows nothing of Flask.

* :func:`receive` -- one message, start to end. Unreadable bytes are answered with an NCPDP
  ``Error`` (HTTP 400) and kept as ``rejected``. A readable message is recorded, applied and
  answered in **one unit of work**: the message, every resource it produced and the ``Status``
  reply commit together. A message that reads but cannot be applied (a fill for a prescription
  we never wrote) leaves nothing of its application behind; it and its ``Error`` 900 reply are
  kept (status ``error``). A failure of ours is answered ``Error`` 602 (retry later) and kept as
  ``failed``. The same MessageID from the same sender again, once answered, gets the same reply
  again and is never applied twice (receipts of one MessageID are serialised by a lock).
* :func:`replay` -- apply a stored inbound message again (a new unit of work; every write is an
  upsert by business identifier, so a replay changes only what changed since).
* :func:`apply_history_response` -- an RxHistoryResponse's dispenses and statements, one resource
  per fill (also used for the synchronous answer to our RxHistoryRequest).
* :func:`update_adherence` -- PDC Observations and overdue-MAT Flags for one patient, from every
  MedicationDispense stored for them (also run on a schedule: :mod:`iop_fhir.pharmacy.monitor`).

What each transaction does:

==========================  ======================================================================
RxFill                      our MedicationRequest by PrescriberOrderNumber (its first identifier
                            value, as the NewRx sent it; intent order) -> MedicationDispense, one
                            per fill; then :func:`update_adherence` for the patient
RxRenewalRequest,           a review Task for the prescriber (``script_mapping.review_task``), upsert
RxChangeRequest             by the message's key; the prescription must be ours
CancelRxResponse            our CancelRx (RelatesToMessageID) and this message: ``approved`` or
                            ``denied``; a denial stores a Task for the prescriber saying why
RxHistoryResponse           MedicationDispense / MedicationStatement per entry, for the patient of
                            our RxHistoryRequest (RelatesToMessageID), else the one Patient with the
                            message's name and birth date
Status, Verify, Error       our message (RelatesToMessageID) becomes ``accepted``, ``verified`` or
                            ``error: <code>`` (description in its detail); an acknowledgement of
                            nothing we sent is kept ``uncorrelated`` and answered Status
anything else               Error 900: a prescriber's gateway does not take NewRx, CancelRx, ...
==========================  ======================================================================

Resources are written with ``deliver_to=None``: the store's router queues them for every
destination in scope (the care team's EHR, the aftercare provider), as any other write. The PDC
Observations and MAT Flags of a discharged client go, besides, to the destinations serving the
client's aftercare provider, as the discharge package does (``sync.discharge.aftercare_destinations``):
after discharge that provider is who must act on a lapsed refill, whatever the routing scopes say.

**One fill, one resource.** An RxFill and an RxHistoryResponse entry of the same fill carry the
same fill key (``script_mapping``: pharmacy, prescription number, handed-over date) and are
stored as one MedicationDispense (:func:`store_fill`), so PDC counts the fill once; a history
entry never replaces the RxFill's link to our order (``script_mapping.merge_fill``).

**The adherence window.** PDC is computed over ``[first fill, today]``, the first fill being the
earliest day a stored dispense of the patient was handed over, and the window held to the last
:data:`PDC_WINDOW_DAYS` days. It ends today, not when the last supply runs out: days still to come
would count as uncovered for every prescription whose supply ends sooner
(``adherence_observations`` refuses such a window). Each recomputation on a later day is a new
Observation (the identifier names the window), a PDC-to-date series; fills arriving the same day
update that day's Observation. Overdue-MAT Flags are computed once the patient's latest
EpisodeOfCare has ended (``period.end``: the discharge date), with ``MAT_REFILL_GRACE_DAYS``.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from iop_fhir import terminology
from iop_fhir.api.operations import every
from iop_fhir.config import DEFAULTS, ConfigError
from iop_fhir.errors import IopFhirError, Issue, VersionConflict
from iop_fhir.formats import ncpdp
from iop_fhir.formats.ncpdp import messages as m
from iop_fhir.mappers.context import identifier_base
from iop_fhir.mappers.datatypes import as_dict, as_list, coding, concept, drop_empty, fhir_datetime, identifiers_in, nonblank, parse_date
from iop_fhir.mappers.ids import resource_id
from iop_fhir.mappers.medication_request import KIND as PRESCRIPTION_KIND
from iop_fhir.mappers.medication_request import ORDER_INTENTS
from iop_fhir.mappers.medication_review import REVIEW_CODE
from iop_fhir.mappers.report import MappingReport
from iop_fhir.pharmacy.adherence import adherence_observations, overdue_mat, pdc
from iop_fhir.pharmacy.script_mapping import (
    FILL_SYSTEM,
    MESSAGE_SYSTEM,
    history_resources,
    medication_dispense,
    merge_fill,
    pharmacy_reference,
    review_task,
)
from iop_fhir.store import Saved, Store, UnitOfWork, db
from iop_fhir.store.messages import COUNTERPARTY_MAX, MESSAGE_ID_MAX, STATUS_MAX, StoredMessage
from iop_fhir.store.search_index import escape_value, token_value
from iop_fhir.sync.destinations import Destination
from iop_fhir.sync.discharge import aftercare_destinations
from iop_fhir.terminology import SNOMED

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Ops = Store | UnitOfWork

PDC_WINDOW_DAYS = 180  # the longest adherence window: about six months of fills
UNREADABLE = "unreadable"  # the kind kept for a body that is not a readable SCRIPT message
# Inbound statuses that were answered for good: a resend of the same MessageID gets that answer.
ANSWERED = frozenset({"processed", "error", "uncorrelated", "approved", "denied"})
# Outbound statuses an acknowledgement arriving late must not undo (a Status after the Verify).
_SETTLED = {"accepted": frozenset({"verified", "approved", "denied"}), "verified": frozenset({"approved", "denied"})}
_ACKNOWLEDGED = {"Status": "accepted", "Verify": "verified"}


class PrescriptionUnknown(IopFhirError):
    """A pharmacy's message names a prescription the gateway did not write (or names none)."""

    status = 422
    issue_code = "not-found"


class NotApplicable(IopFhirError):
    """A readable message the gateway cannot act on: a transaction it does not take, or one
    without what its reply needs."""

    status = 422
    issue_code = "not-supported"


class NotReplayable(IopFhirError):
    """A stored message that replay cannot apply: it went out, or it was never readable."""

    status = 409
    issue_code = "conflict"


# --- settings and results ------------------------------------------------------------------------


@dataclass(frozen=True)
class InboundOptions:
    """What processing takes from the settings and the destination file."""

    grace_days: int = DEFAULTS["MAT_REFILL_GRACE_DAYS"]
    # Every configured destination: those serving a discharged client's aftercare provider also
    # receive the client's adherence Observations and MAT Flags (module docstring).
    destinations: tuple[Destination, ...] = ()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], destinations: Iterable[Destination] = ()) -> InboundOptions:
        """:raises ConfigError: ``MAT_REFILL_GRACE_DAYS`` is not a whole number of days >= 0."""
        grace = settings.get("MAT_REFILL_GRACE_DAYS", DEFAULTS["MAT_REFILL_GRACE_DAYS"])
        if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
            raise ConfigError(f"MAT_REFILL_GRACE_DAYS must be a whole number of days >= 0, not {grace!r}")
        return cls(grace_days=grace, destinations=tuple(destinations))


@dataclass(frozen=True)
class Applied:
    """What applying one inbound message did: its status and detail, what it is about, and the
    resources it wrote (``Type/id``, only those that changed)."""

    status: str = "processed"
    detail: str | None = None
    prescription: str | None = None
    patient_key: str | None = None
    written: tuple[str, ...] = ()


@dataclass(frozen=True)
class Answer:
    """The synchronous answer to a pharmacy: HTTP status and the SCRIPT reply (Status or Error)."""

    http_status: int
    body: bytes
    message: int | None  # the id the received message is kept under (None: it could not be kept)
    duplicate: bool = False  # the same MessageID was answered before; nothing was applied again


@dataclass(frozen=True)
class Replayed:
    """The result of applying a stored message again."""

    id: int
    kind: str
    applied: Applied

    def as_json(self) -> JSON:
        a = self.applied
        return {
            "id": self.id,
            "kind": self.kind,
            "status": a.status,
            "detail": a.detail,
            "prescription": a.prescription,
            "patient": a.patient_key,
            "written": list(a.written),
        }


def new_message_id() -> str:
    """A fresh MessageID for a reply: 32 hex digits (SCRIPT allows 35 characters)."""
    return uuid.uuid4().hex


# --- receiving ----------------------------------------------------------------------------------


def receive(store: Store, body: bytes, options: InboundOptions) -> Answer:
    """Read, keep, apply and answer one SCRIPT message (the module docstring says how)."""
    try:
        message = ncpdp.parse(body)
        _check_header(message.header)
    except ncpdp.NcpdpRejected as exc:
        return refuse(store, body, exc)
    try:
        return store.transaction(lambda uow: _receive(store, uow, message, body, options))
    except IopFhirError as exc:
        if exc.status >= 500 or isinstance(exc, VersionConflict):  # ours, or a race lost: worth a retry
            return _failed(store, message, body, exc)
        # Readable but not applicable: its application rolled back; keep it with the Error that answers it.
        reply, detail = _error_reply(exc, message.header, store.clock()), exc.message
        return store.transaction(lambda uow: _keep(store, uow, message, body, Applied(status="error", detail=detail), reply))
    except Exception as exc:  # a bug, or the database away: the pharmacy retries later
        log.exception("applying %s %s failed", message.kind, message.header.message_id)
        return _failed(store, message, body, exc)


def refuse(store: Store, body: bytes, exc: IopFhirError) -> Answer:
    """Answer an unreadable (or unacceptable) body with an NCPDP Error and keep it as ``rejected``.

    The body is kept up to the size SCRIPT messages may have (:data:`ncpdp.MAX_MESSAGE_BYTES`),
    so a flood of junk cannot fill the database faster than the parser turns it away.
    """
    header = exc.header if isinstance(exc, ncpdp.NcpdpRejected) else None
    _error, reply = _error_reply(exc, header, store.clock())
    kept = body[: ncpdp.MAX_MESSAGE_BYTES]
    detail = exc.message if len(kept) == len(body) else f"{exc.message} (body of {len(body)} bytes kept to its first {len(kept)})"
    # What could be read of the header is kept for correlation, cut to the columns (it is junk anyway).
    message_id = relates_to = sender = None
    if header is not None:
        message_id, relates_to, sender = header.message_id, header.relates_to_message_id, _sender(header)
    try:
        record_id: int | None = store.messages.record(
            direction="in",
            kind=UNREADABLE,
            message_id=(message_id or "")[:MESSAGE_ID_MAX],
            relates_to=relates_to[:MESSAGE_ID_MAX] if relates_to else None,
            counterparty=sender[:COUNTERPARTY_MAX] if sender else None,
            body=kept,
            status="rejected",
            detail=detail,
        )
    except Exception:  # the database away: the sender still learns its message was refused
        log.exception("could not keep a rejected message")
        record_id = None
    return Answer(exc.status, reply, record_id)


def _check_header(header: m.Header) -> None:
    """What the message store keeps must fit its columns; SCRIPT's own limits are far below."""
    issues = []
    for name, value, limit in (
        ("MessageID", header.message_id, MESSAGE_ID_MAX),
        ("RelatesToMessageID", header.relates_to_message_id, MESSAGE_ID_MAX),
        ("From", _sender(header), COUNTERPARTY_MAX),
    ):
        if value is not None and len(value) > limit:
            issues.append(Issue(f"is {len(value)} characters; at most {limit} are accepted", location=f"/Message/Header/{name}", code="value"))
    if issues:
        raise ncpdp.NcpdpRejected(f"SCRIPT message rejected: {issues[0]}", issues, header=header)


def _sender(header: m.Header) -> str | None:
    return header.from_.value if header.from_ is not None else None


def _receive(store: Store, uow: UnitOfWork, message: m.Message, body: bytes, options: InboundOptions) -> Answer:
    header = message.header
    conn = uow.connection
    store.messages.lock(header.message_id, counterparty=_sender(header), conn=conn)
    earlier = _earlier_reply(store, uow, header)
    if earlier is not None:
        previous, reply = earlier
        return Answer(200, reply.body, previous.id, duplicate=True)
    missing = [name for name, party in (("From", header.from_), ("To", header.to)) if party is None]
    if missing:
        raise NotApplicable(
            "the reply cannot be addressed",
            [Issue("is required: the reply is addressed from To to From", location=f"/Message/Header/{name}", code="required") for name in missing],
        )
    now = store.clock()
    applied = apply(store, uow, message, options, now=now)
    status = ncpdp.status_for(header, message_id=new_message_id(), sent=now)
    return _keep(store, uow, message, body, applied, (status, ncpdp.build(status)))


def _earlier_reply(store: Store, uow: UnitOfWork, header: m.Header) -> tuple[StoredMessage, StoredMessage] | None:
    """The latest receipt of this MessageID from this sender and our reply to it, when answered."""
    sender = _sender(header)
    previous = store.messages.find(header.message_id, direction="in", counterparty=sender, conn=uow.connection)
    if previous is None or previous.status not in ANSWERED:
        return None
    replies = [
        r
        for r in store.messages.replies_to(header.message_id, conn=uow.connection)
        if r.direction == "out" and r.counterparty == sender and r.id > previous.id
    ]
    return (previous, replies[-1]) if replies else None


def _keep(store: Store, uow: UnitOfWork, message: m.Message, body: bytes, applied: Applied, reply: tuple[m.Message, bytes]) -> Answer:
    """Record the message as received and the reply (the message and its bytes) as sent, in the unit's transaction."""
    header, conn = message.header, uow.connection
    answer, answer_bytes = reply
    about = {"counterparty": _sender(header), "prescription": applied.prescription, "patient_key": applied.patient_key}
    received = store.messages.record(
        direction="in",
        kind=message.kind,
        message_id=header.message_id,
        relates_to=header.relates_to_message_id,
        body=body,
        status=applied.status,
        detail=applied.detail,
        conn=conn,
        **about,
    )
    store.messages.record(
        direction="out",
        kind=answer.kind,
        message_id=answer.header.message_id,
        relates_to=header.message_id,
        body=answer_bytes,
        status="sent",
        conn=conn,
        **about,
    )
    return Answer(200, answer_bytes, received)


def _error_reply(exc: BaseException, header: m.Header | None, now: dt.datetime) -> tuple[m.Message, bytes]:
    """The NCPDP Error answering ``exc`` (900 for what the sender caused, 602 for our failures),
    as a message and its bytes."""
    error = ncpdp.error_for(exc, header, message_id=new_message_id(), sent=now)
    try:
        return error, ncpdp.build(error)
    except ncpdp.NcpdpInvalid:
        # The description echoes the sender's text, which may hold what XML cannot carry: say less.
        rejected = isinstance(exc, IopFhirError) and exc.status < 500
        code = m.ERROR_REJECTED if rejected else m.ERROR_SYSTEM
        plain = m.Error(code=code, description="message rejected" if rejected else "receiver system error")
        head = m.Header(message_id=new_message_id(), sent_time=now, relates_to_message_id=header.message_id if header else None)
        error = m.Message(header=head, body=plain)
        return error, ncpdp.build(error)


def _failed(store: Store, message: m.Message, body: bytes, exc: BaseException) -> Answer:
    """Our own failure: Error 602 (retry later), kept as ``failed`` when the database lets us."""
    reply = _error_reply(exc, message.header, store.clock())
    detail = exc.message if isinstance(exc, IopFhirError) else f"internal error ({type(exc).__name__}); see the gateway log"
    try:
        kept = store.transaction(lambda uow: _keep(store, uow, message, body, Applied(status="failed", detail=detail), reply))
    except Exception:
        log.exception("could not keep the failed %s %s", message.kind, message.header.message_id)
        return Answer(500, reply[1], None)
    return Answer(500, reply[1], kept.message)


# --- applying --------------------------------------------------------------------------------------


def apply(store: Store, uow: UnitOfWork, message: m.Message, options: InboundOptions, *, now: dt.datetime) -> Applied:
    """Apply one parsed message inside ``uow`` (the table in the module docstring).

    :raises PrescriptionUnknown: it is about a prescription the gateway did not write.
    :raises NotApplicable: a transaction the gateway does not take, or one it cannot place.
    """
    handler = _HANDLERS.get(type(message.body))
    if handler is None:
        raise NotApplicable(
            f"{message.kind} is not taken from pharmacies",
            [Issue(f"{message.kind} is not a transaction a prescriber's gateway takes", location=f"/Message/Body/{message.kind}", code="not-supported")],
        )
    return handler(_Unit(store, uow, now, options), message)


@dataclass(frozen=True)
class _Unit:
    store: Store
    uow: UnitOfWork
    now: dt.datetime
    options: InboundOptions


def _order_number(resource: JSON) -> str | None:
    """What a NewRx sends as PrescriberOrderNumber: the first identifier value that is not blank."""
    return next((v for i in as_list(resource.get("identifier")) if (v := nonblank(as_dict(i).get("value")))), None)


def find_prescription(ops: Ops, order_number: str) -> Saved | None:
    """Our order a pharmacy names by its PrescriberOrderNumber, or None.

    A discharge-list entry carries the same identifier value under another system, but it is a
    plan, not an order: only orders (intent order, ...) whose first identifier is the number count.

    :raises PrescriptionUnknown: several orders carry the number (it cannot tell which).
    """
    found = [
        s
        for s in every(ops, "MedicationRequest", [("identifier", escape_value(order_number))])
        if s.resource.get("intent") in ORDER_INTENTS and _order_number(s.resource) == order_number
    ]
    if len(found) > 1:
        refs = ", ".join(s.reference for s in found)
        raise PrescriptionUnknown(
            f"the order number {order_number!r} names several prescriptions",
            [Issue(f"{order_number!r} names several prescriptions ({refs})", location="/Message/Header/PrescriberOrderNumber", code="multiple-matches")],
        )
    return found[0] if found else None


def _prescription(unit: _Unit, message: m.Message) -> tuple[Saved, str]:
    """The prescription the message names and its patient reference.

    :raises PrescriptionUnknown: none named, not one of ours, or one without a patient.
    """
    where = "/Message/Header/PrescriberOrderNumber"
    number = message.header.prescriber_order_number
    if not number:
        raise PrescriptionUnknown("the message names no prescription", [Issue("is required: it names our prescription", location=where, code="required")])
    found = find_prescription(unit.uow, number)
    if found is None:
        raise PrescriptionUnknown(
            f"no prescription of ours has the order number {number!r}",
            [Issue(f"{number!r} is not the order number of a prescription this gateway wrote", location=where, code="not-found")],
        )
    patient = nonblank(as_dict(found.resource.get("subject")).get("reference"))
    if patient is None or not patient.startswith("Patient/"):
        raise PrescriptionUnknown(
            f"{found.reference} names no patient", [Issue(f"{found.reference} has no subject Patient to record it for", location=where, code="not-found")]
        )
    return found, patient


def _upsert(uow: UnitOfWork, resource: JSON, deliver_to: Iterable[str] | None = None) -> Saved:
    """Store by the first identifier (``PUT Type?identifier=system|value``): a resend updates,
    never duplicates; the router picks the destinations unless ``deliver_to`` names them."""
    ident = as_dict(as_list(resource.get("identifier"))[0])
    criteria = [("identifier", token_value(str(ident["system"]), str(ident["value"])))]
    return uow.conditional_update(resource["resourceType"], criteria, resource, deliver_to=deliver_to)


def store_fill(uow: UnitOfWork, resource: JSON) -> Saved:
    """Store what a pharmacy reported of one fill (an RxFill's dispense, a history entry) as the
    one resource of that fill: the one already kept under any of its fill identifiers (the fill
    key, then the fill number) merged with it (``script_mapping.merge_fill``), else a new one.

    Reports of one fill key are serialised (an advisory lock on PostgreSQL), so an RxFill and a
    history of the same fill arriving at once still make one resource.
    """
    rtype = resource["resourceType"]
    keys = [i["value"] for i in identifiers_in(resource.get("identifier")) if i.get("system") == FILL_SYSTEM and i.get("value")]
    db.lock(uow.connection, f"fill:{rtype}:{keys[0]}")
    kept = (s for key in keys for s in uow.search(rtype, [("identifier", token_value(FILL_SYSTEM, key))], count=1).entries)
    stored = next(kept, None)
    merged = merge_fill(stored.resource if stored is not None else None, resource)
    return uow.update(rtype, merged["id"], merged)


def _changed(saved: Iterable[Saved]) -> tuple[str, ...]:
    return tuple(s.reference for s in saved if s.changed)


def _rx_fill(unit: _Unit, message: m.Message) -> Applied:
    body = message.body
    assert isinstance(body, m.RxFill)
    request, patient = _prescription(unit, message)
    dispense = store_fill(unit.uow, medication_dispense(message, request.reference, patient))
    derived = update_adherence(unit.store, unit.uow, patient, now=unit.now, identifier_base=adherence_base(request.resource), options=unit.options)
    kinds = [s.resource_type for s in derived]
    detail = f"{body.fill_status.status}: {dispense.reference}; {kinds.count('Observation')} PDC Observations, {kinds.count('Flag')} MAT Flags"
    return Applied(detail=detail, prescription=request.reference, patient_key=patient, written=_changed([dispense, *derived]))


def adherence_base(request: JSON) -> str:
    """The identifier base the adherence resources of an order's patient are written under: the
    program's (the IOP record's order carries it), else, for an order that is not one of the
    record's, its identifier system's parent."""
    base = identifier_base(request, PRESCRIPTION_KIND)
    if base is not None:
        return base
    system = next((s for i in as_list(request.get("identifier")) if isinstance(s := as_dict(i).get("system"), str)), None)
    return system.rsplit("/", 1)[0] if system and "/" in system else f"{terminology.CANONICAL}/sid"


def _review(unit: _Unit, message: m.Message) -> Applied:
    request, patient = _prescription(unit, message)
    task = _upsert(unit.uow, review_task(message, request.reference, patient))
    return Applied(detail=f"review {task.reference}", prescription=request.reference, patient_key=patient, written=_changed([task]))


def _ours(unit: _Unit, message: m.Message) -> StoredMessage | None:
    """Our message this one answers (RelatesToMessageID), or None."""
    relates = message.header.relates_to_message_id
    if not relates:
        return None
    return unit.store.messages.find(relates, direction="out", conn=unit.uow.connection)


def _cancel_response(unit: _Unit, message: m.Message) -> Applied:
    body = message.body
    assert isinstance(body, m.CancelRxResponse)
    response = body.response
    outcome = response.outcome.lower()  # approved | denied
    why = _denial_text(response) if response.outcome == "Denied" else response.note
    cancel = _ours(unit, message)
    if cancel is not None and cancel.kind != "CancelRx":
        cancel = None
    request: Saved | None = None
    if cancel is not None and cancel.prescription:
        _type, _, rid = cancel.prescription.partition("/")
        request = next(iter(unit.uow.read_many("MedicationRequest", [rid])), None)
    if request is None and message.header.prescriber_order_number:
        request = find_prescription(unit.uow, message.header.prescriber_order_number)
    patient = nonblank(as_dict(request.resource.get("subject")).get("reference")) if request is not None else None
    written: list[Saved] = []
    if cancel is not None:
        unit.store.messages.set_status(cancel.id, outcome, why, conn=unit.uow.connection)
    if response.outcome == "Denied" and request is not None and patient is not None:
        written.append(_upsert(unit.uow, cancel_denied_task(message, request.resource, request.reference, patient)))
    status = outcome if cancel is not None else "uncorrelated"
    detail = f"cancel {outcome}" + (f": {why}" if why else "") + ("" if cancel is not None else "; no CancelRx of ours has its RelatesToMessageID")
    prescription = request.reference if request is not None else cancel.prescription if cancel is not None else None
    return Applied(status=status, detail=detail, prescription=prescription, patient_key=patient, written=_changed(written))


def _denial_text(response: m.Response) -> str:
    parts = [response.denial_reason, response.note, *(f"reason code {c}" for c in response.reason_codes)]
    return "; ".join(p for p in parts if p) or "no reason given"


def cancel_denied_task(response: m.Message, request: JSON, request_ref: str, patient_ref: str) -> JSON:
    """A Task telling the prescriber that the pharmacy refused to cancel a prescription, and why.

    Shaped like the renewal and change review Tasks (``script_mapping.review_task``): SNOMED CT
    |Review of medication|, focus the prescription, ``for`` the patient, the pharmacy as requester,
    identifier the sender and MessageID (a redelivered response is the same Task). Urgent and an
    order: the stopped drug may still be handed out until someone calls the pharmacy. The owner
    is the prescription's requester.
    """
    header = response.header
    body = response.body
    assert isinstance(body, m.CancelRxResponse)
    sender = _sender(header) or "unknown-sender"
    key = f"{sender}/{header.message_id}"
    drug = as_dict(request.get("medicationCodeableConcept")).get("text") or "the prescription"
    why = _denial_text(body.response)
    pharmacy = pharmacy_reference(m.Pharmacy(ncpdp_id=sender)) if header.from_ and header.from_.qualifier == m.PHARMACY_QUALIFIER else None
    return drop_empty(
        {
            "resourceType": "Task",
            "id": resource_id("Task", MESSAGE_SYSTEM, key),
            "identifier": [{"system": MESSAGE_SYSTEM, "value": key}],
            "status": "requested",
            "businessStatus": {"text": "Cancellation denied by the pharmacy"},
            "intent": "order",
            "priority": "urgent",
            "code": concept(coding(SNOMED, REVIEW_CODE, terminology.snomed_display(REVIEW_CODE))),
            "description": f"The pharmacy denied the cancellation of {drug}: {why}. It may still be dispensed; contact the pharmacy.",
            "focus": {"reference": request_ref},
            "for": {"reference": patient_ref},
            "authoredOn": fhir_datetime(header.sent_time) if header.sent_time else None,
            "requester": pharmacy,
            "owner": as_dict(request.get("requester")) or None,
        }
    )


def _history(unit: _Unit, message: m.Message) -> Applied:
    patient = _history_patient(unit, message)
    saved = apply_history_response(unit.uow, message, patient)
    return Applied(detail=f"{len(saved)} history entries for {patient}", patient_key=patient, written=_changed(saved))


def apply_history_response(uow: UnitOfWork, message: m.Message, patient_ref: str) -> list[Saved]:
    """Store an RxHistoryResponse for ``patient_ref``: one MedicationDispense or MedicationStatement
    per entry (``script_mapping.history_resources``), stored by :func:`store_fill`, so the same fill
    from two sources, two responses or an RxFill is kept once and a corrected one updates it.

    :raises NcpdpInvalid: ``message`` is not an RxHistoryResponse.
    """
    return [store_fill(uow, resource) for resource in history_resources(message, patient_ref)]


def _history_patient(unit: _Unit, message: m.Message) -> str:
    """The patient of our RxHistoryRequest this answers, else the one Patient with the message's
    family name, given name and birth date (and gender when both say)."""
    ours = _ours(unit, message)
    if ours is not None and ours.kind == "RxHistoryRequest" and ours.patient_key:
        return ours.patient_key
    body = message.body
    assert isinstance(body, m.RxHistoryResponse)
    who = body.patient
    name = who.name if who is not None else None
    where = "/Message/Body/RxHistoryResponse/Patient"
    if who is None or name is None or not name.last or not name.first or who.birth_date is None:
        raise NotApplicable(
            "the history names no patient we can find",
            [Issue("answers no RxHistoryRequest of ours, and names no family name, given name and birth date to find the patient by", location=where, code="required")],
        )
    criteria = [("family", escape_value(name.last)), ("given", escape_value(name.first)), ("birthdate", who.birth_date.isoformat())]
    gender = m.GENDER_TO_FHIR.get(who.gender or "")
    found = [s for s in every(unit.uow, "Patient", criteria) if _same_person(s.resource, name, gender)]
    if len(found) != 1:
        what = "no patient" if not found else f"{len(found)} patients"
        raise NotApplicable(
            f"the history's patient is ambiguous: {what} match",
            [Issue(f"{what} of this gateway have this name and birth date", location=where, code="not-found" if not found else "multiple-matches")],
        )
    return found[0].reference


def _same_person(patient: JSON, name: m.Name, gender: str | None) -> bool:
    """Exactly the name (the search matched prefixes), and the gender unless either is unknown."""
    family, first = (name.last or "").casefold(), (name.first or "").casefold()
    named = any(
        str(as_dict(n).get("family", "")).casefold() == family and first in (str(g).casefold() for g in as_list(as_dict(n).get("given")))
        for n in as_list(patient.get("name"))
    )
    stated = patient.get("gender")
    return named and (gender in (None, "unknown") or stated in (None, "unknown", gender))


def _acknowledgement(unit: _Unit, message: m.Message) -> Applied:
    body = message.body
    ours = _ours(unit, message)
    if ours is None:
        detail = f"RelatesToMessageID {message.header.relates_to_message_id!r} names no message we sent"
        return Applied(status="uncorrelated", detail=detail)
    if isinstance(body, m.Error):
        status = f"error: {body.code}"[:STATUS_MAX]
        detail = "; ".join(p for p in (body.description_code and f"description code {body.description_code}", body.description) if p) or None
    else:
        status = _ACKNOWLEDGED[message.kind]
        detail = body.description if isinstance(body, (m.Status, m.Verify)) else None
    if ours.status not in _SETTLED.get(status, frozenset()):
        unit.store.messages.set_status(ours.id, status, detail, conn=unit.uow.connection)
    return Applied(detail=f"{ours.kind} {ours.message_id} {status}", prescription=ours.prescription, patient_key=ours.patient_key)


_HANDLERS: dict[type, Callable[[_Unit, m.Message], Applied]] = {
    m.RxFill: _rx_fill,
    m.RxRenewalRequest: _review,
    m.RxChangeRequest: _review,
    m.CancelRxResponse: _cancel_response,
    m.RxHistoryResponse: _history,
    m.Status: _acknowledgement,
    m.Verify: _acknowledgement,
    m.Error: _acknowledgement,
}


# --- adherence from the stored fills --------------------------------------------------------------


def pdc_window(dispenses: Iterable[JSON], today: dt.date, *, days: int = PDC_WINDOW_DAYS) -> tuple[dt.date, dt.date] | None:
    """``(first fill, today)``, no longer than ``days``; None before any fill (module docstring)."""
    handed = [d for x in dispenses if (d := parse_date(x.get("whenHandedOver") or x.get("whenPrepared"))) is not None and d <= today]
    if not handed:
        return None
    return max(min(handed), today - dt.timedelta(days=days - 1)), today


def discharge_date(ops: Ops, patient_ref: str) -> dt.date | None:
    """When the patient left the program: the end of their latest EpisodeOfCare, None while it
    runs (a client enrolled again is back in the program's care)."""
    episodes = [s.resource for s in every(ops, "EpisodeOfCare", [("patient", patient_ref)])]
    dated = [(start, e) for e in episodes if e.get("status") != "entered-in-error" and (start := parse_date(as_dict(e.get("period")).get("start")))]
    if not dated:
        return None
    latest = max(dated, key=lambda pair: pair[0])[1]
    return parse_date(as_dict(latest.get("period")).get("end"))


def update_adherence(
    store: Store,
    uow: UnitOfWork,
    patient_ref: str,
    *,
    now: dt.datetime,
    identifier_base: str,
    options: InboundOptions,
    with_pdc: bool = True,
) -> list[Saved]:
    """Recompute one patient's adherence from every MedicationDispense stored for them: PDC
    Observations over :func:`pdc_window` (unless ``with_pdc`` is False), and after discharge the
    overdue-MAT Flags (``options.grace_days``); each upserted by its identifier (under
    ``identifier_base``, the program's). Each goes where the store's router sends it and, once
    the client is discharged, to the destinations serving their aftercare provider among
    ``options.destinations``. Returns what was stored."""
    dispenses = [s.resource for s in every(uow, "MedicationDispense", [("patient", patient_ref)])]
    today = now.astimezone(dt.UTC).date()
    discharged = discharge_date(uow, patient_ref)
    aftercare = aftercare_destinations(uow, patient_ref, options.destinations) if discharged is not None else []

    def save(resource: JSON) -> Saved:
        return _upsert(uow, resource, deliver_to=_with_aftercare(store, resource, patient_ref, aftercare))

    stored: list[Saved] = []
    window = pdc_window(dispenses, today) if with_pdc else None
    if window is not None:
        result = pdc(dispenses, window=window)
        for issue in result.issues:
            log.debug("PDC for %s: %s", patient_ref, issue)
        observations = adherence_observations(result, patient_ref, as_of=now.astimezone(dt.UTC), identifier_base=identifier_base)
        stored += [save(o) for o in observations]
    if discharged is not None:
        requests = [s.resource for s in every(uow, "MedicationRequest", [("patient", patient_ref)])]
        flags = overdue_mat(
            requests, dispenses, as_of=today, discharge_date=discharged, grace_days=options.grace_days, identifier_base=identifier_base, report=MappingReport()
        )
        stored += [save(f) for f in flags]
    return stored


def _with_aftercare(store: Store, resource: JSON, patient_ref: str, aftercare: list[str]) -> list[str] | None:
    """The router's destinations for ``resource`` and the ``aftercare`` ones; None (the store asks
    the router itself) when there is no aftercare destination to add."""
    if not aftercare:
        return None
    routed = store.router(resource["resourceType"], resource, patient_ref) if store.router is not None else ()
    return list(dict.fromkeys([*routed, *aftercare]))


# --- replay ----------------------------------------------------------------------------------------


def replay(store: Store, id: int, options: InboundOptions) -> Replayed:
    """Apply stored inbound message ``id`` again, in a new unit of work, and set its status.

    :raises NotFound: no message has this id.
    :raises NotReplayable: it went out (requeue its delivery instead), or it never was readable.
    :raises IopFhirError: it still cannot be applied (e.g. its prescription is still unknown);
        then nothing changes, its status included.
    """
    stored = store.messages.get(id)
    if stored.direction != "in":
        raise NotReplayable(
            f"message {id} went out; replay outbound through `iop-fhir sync requeue`",
            [Issue(f"{stored.kind} {stored.message_id} was sent by the gateway: requeue its delivery (iop-fhir sync requeue) to send it again", location="id", code="conflict")],
        )
    try:
        message = ncpdp.parse(stored.body)
    except ncpdp.NcpdpRejected as exc:
        raise NotReplayable(f"message {id} is not a readable SCRIPT message: {exc.message}", [Issue(f"unreadable: {exc.message}", location="id", code="conflict")]) from None

    def run(uow: UnitOfWork) -> Applied:
        applied = apply(store, uow, message, options, now=store.clock())
        store.messages.set_status(
            id, applied.status, f"replayed: {applied.detail}" if applied.detail else "replayed", prescription=applied.prescription, patient_key=applied.patient_key, conn=uow.connection
        )
        return applied

    return Replayed(id, stored.kind, store.transaction(run))


__all__ = [
    "ANSWERED",
    "PDC_WINDOW_DAYS",
    "Answer",
    "Applied",
    "InboundOptions",
    "NotApplicable",
    "NotReplayable",
    "PrescriptionUnknown",
    "Replayed",
    "adherence_base",
    "apply",
    "apply_history_response",
    "cancel_denied_task",
    "discharge_date",
    "find_prescription",
    "new_message_id",
    "pdc_window",
    "receive",
    "refuse",
    "replay",
    "store_fill",
    "update_adherence",
]
