"""Prescriptions to pharmacies: the worker's channel for ``kind = "ncpdp"`` destinations.

The router sends every MedicationRequest change to every pharmacy destination in scope; this
channel decides, per prescription, what the pharmacy must be told so that its copy matches
ours, and tells it in NCPDP SCRIPT 2017071 (``POST`` of ``application/xml`` to ``base_url``,
with the destination's auth and timeouts, answered synchronously by Status, Verify or Error).

**What is compared.** A delivery is a trigger: the channel reads the prescription's *current*
version from the store (a deleted one: its last live version), not the version the delivery
names. So a dead delivery requeued long after the prescription was stopped never re-sends the
old NewRx, and a batch holding several versions of one prescription is one decision. What the
pharmacy already holds is read from the message store (``store.messages``): the NewRx and
CancelRx sent *to this destination* and the answers recorded for them.

**The decision**, per prescription and pharmacy:

* not for any pharmacy: intent other than ``order``, category ``discharge`` (the
  reconciliation list handed to aftercare, not an order), or a resource pulled from another
  system (``meta.tag`` :data:`~iop_fhir.terminology.SYNC_SOURCE`: another prescriber's order);
* *addressed here* when ``dispenseRequest.performer`` is an Organization carrying this
  destination's ``ncpdp_id`` (identifier system NCPDP Provider ID). A prescription naming no
  pharmacy is sent to none: with several pharmacies configured it would be filled twice;
* addressed here, ``active``, no NewRx held -> **NewRx**. Already held and its medication
  (drug, codes, strength, quantity, days supply, refills, substitutions, Sig, date written,
  schedule) unchanged -> nothing: a repeated delivery changes nothing. Changed -> the
  delivery goes dead saying what changed: SCRIPT cannot amend a prescription, and our records
  express a change as a new prescription that replaces the old one (``priorPrescription``),
  which stops the old one -- so this only happens when another writer edits an order in place;
* a NewRx held, and the prescription ``stopped``, ``cancelled``, ``entered-in-error``,
  ``completed``, deleted, or now addressed to another pharmacy, with no CancelRx yet ->
  **CancelRx** (RelatesToMessageID the NewRx, the pharmacy's RxReferenceNumber when one of
  its messages told us, the status reason as Note). A dose change is therefore two
  deliveries: the new prescription's NewRx and the old one's CancelRx;
* ``on-hold``, ``draft``, ``unknown``: nothing (SCRIPT has no hold; the pharmacy keeps it).

"Held" means a NewRx to this destination that was accepted (Status), verified (Verify), or
sent without an answer yet (the worker may have died mid-request) -- and not followed by a
CancelRx. A refused, rejected or failed NewRx is not held.

**Refusals.** :func:`~iop_fhir.pharmacy.script_mapping.new_rx` refuses an order that breaks
a controlled-substance rule or lacks what NewRx needs; the attempt is recorded in the message
store (kind NewRx, status ``refused``, the reasons as detail, an empty body: nothing was
sent) and the delivery goes dead with every reason and FHIR path in its error, so
``iop-fhir sync status`` and ``/admin/sync/deliveries`` show why.

**Consent.** A NewRx or CancelRx discloses the prescription (Part 2 data when it is MAT), its
patient and the diagnoses it gives as reasons; before one is sent (or re-sent) they pass the
privacy gate for the pharmacy's recipient (its NCPDPID, the destination's ``recipient``; exit
``ncpdp:<destination>``), which audits the decision. A prescription or patient withheld
refuses the message: recorded as ``refused`` with the reason, the delivery dead with
``no Part 2 consent for pharmacy <NCPDPID>`` (or the consent's refusal); a diagnosis withheld
is left out of the message. A CancelRx is gated too: after a revocation the dead delivery says
why, and the pharmacy must be told some other way.

**Answers.** Each message is recorded (``sent``) before it is posted, then its synchronous
answer is recorded (inbound, ``received``) and the outbound status set: Status -> ``accepted``,
Verify -> ``verified`` (unless the inbound side recorded ``approved``/``denied`` meanwhile),
Error -> ``error: CODE`` with the description as detail, which is a
:class:`~iop_fhir.errors.TransientDeliveryError` for the retryable codes (600, 602) and a
:class:`~iop_fhir.errors.PermanentDeliveryError` otherwise. HTTP failures are classified as
for FHIR destinations (:class:`~iop_fhir.sync.fhir_client.DestinationHttp`: 5xx, 429, timeouts
transient with Retry-After; other 4xx permanent), except that a 400 carrying a SCRIPT Error
is read like any Error.

**Splits.** A permanent failure makes the worker split the batch and deliver the halves
again in the same pass; a prescription refused in one claim of its delivery (same delivery
id, attempt count and lease) is refused again without another request, so a pharmacy that
rejects a NewRx sees it once per attempt, not once per split. A requeue is a new claim: it
sends again.

**Decided reviews.** An RxRenewalRequest or RxChangeRequest from a pharmacy becomes a review
Task (:func:`~iop_fhir.pharmacy.script_mapping.review_task`; identifier ``{sender}/{MessageID}``
under ``MESSAGE_SYSTEM``), and Tasks are routed to pharmacy destinations too. A Task delivery
is a trigger as well: the Task's current version is read, and when it was made from a request
this pharmacy sent (its inbound message found in the message store by sender and MessageID)
and the prescriber has decided -- ``completed``: Approved; ``rejected`` or ``cancelled``:
Denied, the reason being the Task's statusReason, else the notes the prescriber added -- the
RxRenewalResponse or RxChangeResponse goes (RelatesToMessageID the request's), recorded and
answered like any message. An answer held (sent, accepted or verified) is never sent again; one
sent without an answer is re-sent byte for byte. Any other Task, and a review still open, sends
nothing. The response echoes the parties and drugs the pharmacy itself named, so it discloses
nothing new and is not gated.

**MessageIDs.** Every new message gets a fresh ``uuid4``. A message recorded as ``sent`` with
no answer (a crash or a timeout after the request left) is re-sent *byte for byte*, its
MessageID and SentTime unchanged, while the prescription still says the same: the pharmacy
de-duplicates by MessageID, so a repeat after a crash is harmless. A message answered with an
Error gets a fresh MessageID when tried again (a pharmacy may remember the failed one).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import requests

from iop_fhir.errors import Gone, IopFhirError, Issue, NotFound, PermanentDeliveryError, TransientDeliveryError
from iop_fhir.formats import ncpdp
from iop_fhir.formats.ncpdp import messages as m
from iop_fhir.mappers.datatypes import as_dict, as_list, code_in_any, concept_text, identifier_values, note_texts
from iop_fhir.pharmacy import script_mapping
from iop_fhir.pharmacy.controlled import lookup
from iop_fhir.privacy.audit import AuditLog
from iop_fhir.privacy.gate import PrivacyGate, name_of
from iop_fhir.privacy.labels import reference_key
from iop_fhir.privacy.recipients import recipient_for_destination
from iop_fhir.store import Delivery, Store
from iop_fhir.store.search_index import parse_reference
from iop_fhir.sync.destinations import Destination
from iop_fhir.sync.fhir_client import BODY_EXCERPT, DestinationHttp
from iop_fhir.sync.release import WHO, aligned, ensure_audited, without_references
from iop_fhir.terminology import MEDREQ_CATEGORY, NCPDP_PROVIDER, SYNC_SOURCE

if TYPE_CHECKING:
    from iop_fhir.store.messages import StoredMessage

log = logging.getLogger("iop_fhir.sync")

JSON = dict[str, Any]
MEDIA_TYPE = "application/xml"
# Outbound message statuses (the message store's ``status``), as this module writes them.
SENT = "sent"  # recorded before the request; still so when no answer came
ACCEPTED = "accepted"  # Status
VERIFIED = "verified"  # Verify
REFUSED = "refused"  # never sent: the order may not or cannot go as it is
SUPERSEDED = "superseded"  # an unanswered message replaced by a newer one
RECEIVED = "received"  # an inbound answer, recorded
# A NewRx the pharmacy holds (or may hold: sent, no answer yet).
HELD = frozenset({SENT, ACCEPTED, VERIFIED})
# A CancelRx that is done or may be: the inbound side sets approved/denied from CancelRxResponse.
CANCEL_DONE = frozenset({SENT, ACCEPTED, VERIFIED, "approved", "denied"})
WITHDRAWN = frozenset({"stopped", "cancelled", "entered-in-error", "completed"})
# The prescription fields that make the order; a difference in any means the pharmacy's copy is stale.
ORDER_FIELDS = (
    "description",
    "product_code",
    "drug_db_code",
    "strength",
    "dea_schedule",
    "quantity",
    "days_supply",
    "number_of_refills",
    "substitutions",
    "sig_text",
    "written_date",
)
# The requests a prescriber reviews, and the response that answers each.
REVIEW_RESPONSES = {"RxRenewalRequest": "RxRenewalResponse", "RxChangeRequest": "RxChangeResponse"}
# A review Task's status once the prescriber decided, as the response's outcome; other statuses wait.
REVIEW_DECISIONS = {"completed": "Approved", "rejected": "Denied", "cancelled": "Denied"}
HISTORY_LIMIT = 500  # messages about one prescription read back; a prescription has a handful
REFUSED_CLAIMS = 256  # refusals remembered while the worker splits a batch (oldest forgotten first)


# --- posting one message and reading its answer (shared with pharmacy.history) -------------------


def explain_script(response: requests.Response) -> str:
    """What a pharmacy said in a refused answer: its SCRIPT Error, else the start of the body."""
    try:
        said = ncpdp.parse(response.content)
    except IopFhirError:
        return response.text[:BODY_EXCERPT] or "(empty body)"
    if isinstance(said.body, m.Error):
        return describe_error(said.body)
    return f"a {said.kind} message"


def describe_error(error: m.Error) -> str:
    """``NCPDP Error 900 (DescriptionCode 008): description``."""
    code = f"NCPDP Error {error.code}" + (f" (DescriptionCode {error.description_code})" if error.description_code else "")
    return f"{code}: {error.description}" if error.description else code


@dataclass(frozen=True)
class Exchange:
    """One message posted and its synchronous answer, both recorded."""

    row: int  # the outbound message's id in the message store
    message_id: str
    reply: m.Message
    reply_row: int


class ScriptLink:
    """One pharmacy endpoint: posts SCRIPT messages, records them and their synchronous answers.

    Acknowledgements settle the outbound message here (Status, Verify, Error); any other
    answer (an RxHistoryResponse) is returned for the caller to apply.
    """

    def __init__(self, destination: Destination, store: Store, *, session: requests.Session | None = None) -> None:
        self.destination = destination
        self.store = store
        self.http = DestinationHttp(destination, session=session, explain=explain_script)

    def record(self, body: bytes, *, kind: str, message_id: str, prescription: str | None, patient_key: str | None, relates_to: str | None = None, detail: str | None = None) -> int:
        """Record an outbound message as ``sent`` before it leaves (a crash then leaves it re-sendable)."""
        return self.store.messages.record(
            direction="out",
            kind=kind,
            message_id=message_id,
            body=body,
            status=SENT,
            relates_to=relates_to,
            counterparty=self.destination.name,
            prescription=prescription,
            patient_key=patient_key,
            detail=detail,
        )

    def post(self, row: int, body: bytes, *, message_id: str, prescription: str | None, patient_key: str | None) -> Exchange:
        """POST a recorded message; record the answer and settle the message by it.

        :raises TransientDeliveryError: no answer, an HTTP status worth retrying, or a retryable Error.
        :raises PermanentDeliveryError: any other refusal, or an answer that is not SCRIPT.
        """
        response, label = self.http.send("POST", self.destination.base_url, media_type=MEDIA_TYPE, body=body, answered=(400,))
        try:
            reply = ncpdp.parse(response.content)
        except IopFhirError as exc:
            self.store.messages.set_status(row, SENT, f"answered {response.status_code} without a readable SCRIPT message")
            raise PermanentDeliveryError(
                f"{label} answered {response.status_code} with no readable SCRIPT message: {exc.message}", http_status=response.status_code
            ) from None
        header = reply.header
        if header.relates_to_message_id not in (None, message_id):
            log.warning("%s answered MessageID %s relating to %s, not to %s", label, header.message_id, header.relates_to_message_id, message_id)
        reply_row = self.store.messages.record(
            direction="in",
            kind=reply.kind,
            message_id=header.message_id,
            body=response.content,
            status=RECEIVED,
            relates_to=header.relates_to_message_id or message_id,
            counterparty=self.destination.name,
            prescription=prescription,
            patient_key=patient_key,
        )
        body_of = reply.body
        if isinstance(body_of, (m.Status, m.Verify)):
            # An answer the inbound side recorded meanwhile (a CancelRxResponse's approved or
            # denied) says more than this acknowledgement: it is kept.
            if self.store.messages.get(row).status == SENT:
                self.store.messages.set_status(row, ACCEPTED if isinstance(body_of, m.Status) else VERIFIED)
        elif isinstance(body_of, m.Error):
            said = describe_error(body_of)
            self.store.messages.set_status(row, f"error: {body_of.code}", said)
            error = TransientDeliveryError if body_of.code in m.RETRYABLE_ERRORS else PermanentDeliveryError
            raise error(f"{label} answered {said}", http_status=response.status_code)
        elif response.status_code == 400:
            raise PermanentDeliveryError(f"{label} answered 400 with a {reply.kind}", http_status=400)
        return Exchange(row, message_id, reply, reply_row)

    def close(self) -> None:
        self.http.close()


# --- the channel -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Order:
    """A prescription as it stands: its current (or, deleted, last live) version."""

    reference: str  # MedicationRequest/{id}
    version: int
    resource: JSON
    deleted: bool


@dataclass(frozen=True)
class _Held:
    """What this pharmacy was sent about one prescription (the message store, oldest first)."""

    new_rx: StoredMessage | None  # the NewRx it holds (or may), None when none
    cancel: StoredMessage | None  # the CancelRx sent after it, done or unanswered


class NcpdpChannel:
    """``kind = "ncpdp"``: NewRx and CancelRx, one prescription at a time (see the module doc)."""

    def __init__(
        self,
        destination: Destination,
        store: Store,
        gate: PrivacyGate | None = None,
        *,
        session: requests.Session | None = None,
        new_message_id: Callable[[], str] | None = None,
    ) -> None:
        if not destination.ncpdp_id:
            raise PermanentDeliveryError(f"{destination.name}: an ncpdp destination needs its ncpdp_id")
        self.destination = destination
        self.ncpdp_id = destination.ncpdp_id
        self.store = store
        # the worker's gate; without one the channel keeps its own (and closes its audit log)
        self._owns_gate = gate is None
        self._gate = gate or PrivacyGate(store, AuditLog(store))
        self._recipient = recipient_for_destination(destination)
        self.link = ScriptLink(destination, store, session=session)
        self._new_id = new_message_id or (lambda: str(uuid.uuid4()))
        # Permanent refusals by claim (delivery id, attempts, lease): when the worker splits a
        # refused batch, the same claim comes back in a smaller batch and must not be sent again.
        self._refused_claims: dict[tuple[int, int, datetime | None], PermanentDeliveryError] = {}

    def deliver(self, deliveries: Sequence[Delivery]) -> None:
        latest: dict[str, Delivery] = {}
        reviews: dict[str, Delivery] = {}
        for delivery in deliveries:
            if delivery.resource_type == "Task":  # one decision per Task, as per prescription
                reviews.pop(delivery.resource_id, None)
                reviews[delivery.resource_id] = delivery
                continue
            if delivery.resource_type != "MedicationRequest":
                log.debug("%s: %s/%s is not a prescription; nothing to send", self.destination.name, delivery.resource_type, delivery.resource_id)
                continue
            reference = f"MedicationRequest/{delivery.resource_id}"
            latest.pop(reference, None)  # one decision per prescription, in the order of its last delivery
            latest[reference] = delivery
        for reference, delivery in latest.items():
            order = self._order(reference, delivery)
            if order is not None:
                self._once_per_claim(delivery, functools.partial(self._reconcile, order, delivery.patient_key))
        for task_id, delivery in reviews.items():
            self._once_per_claim(delivery, functools.partial(self._answer_review, task_id))

    def _once_per_claim(self, delivery: Delivery, decide: Callable[[], None]) -> None:
        """Run one decision, unless it was refused in this very claim (the worker is splitting its
        batch): then that refusal again, without another request to the pharmacy."""
        claim = (delivery.id, delivery.attempts, delivery.lease_expires_at)
        refused = self._refused_claims.get(claim)
        if refused is not None:
            raise refused
        try:
            decide()
        except PermanentDeliveryError as exc:
            self._refused_claims[claim] = exc
            while len(self._refused_claims) > REFUSED_CLAIMS:
                del self._refused_claims[next(iter(self._refused_claims))]
            raise

    def close(self) -> None:
        self.link.close()
        if self._owns_gate:
            self._gate.audit.close()

    # -- what the prescription says

    def _order(self, reference: str, delivery: Delivery) -> _Order | None:
        resource_id = delivery.resource_id
        try:
            saved = self.store.read("MedicationRequest", resource_id)
            return _Order(reference, saved.version, saved.resource, deleted=False)
        except NotFound:
            return None
        except Gone:
            pass
        # Newest first: the deletion, then the version it deleted (a deletion always follows a live version).
        versions = self.store.history("MedicationRequest", resource_id, count=2).entries
        live = next((saved for saved in versions if not saved.deleted), None)
        return None if live is None else _Order(reference, live.version, live.resource, deleted=True)

    def _resolve(self, reference: str) -> JSON | None:
        """A stored resource by literal reference (``Type/id``), None when absent or deleted."""
        found = parse_reference(reference)
        if found is None or found[0] is None:
            return None
        try:
            return self.store.read(found[0], found[1]).resource
        except (NotFound, Gone):
            return None

    def _not_for_pharmacies(self, request: JSON) -> str | None:
        """Why no pharmacy is ever sent this MedicationRequest, or None."""
        if any(as_dict(tag).get("system") == SYNC_SOURCE for tag in as_list(as_dict(request.get("meta")).get("tag"))):
            return "it was pulled from another system (another prescriber's order)"
        if request.get("intent") != "order":
            return f"its intent is {request.get('intent')!r}, not order"
        if code_in_any(request.get("category"), MEDREQ_CATEGORY, among=("discharge",)):
            return "it is a discharge medication (the reconciliation list, not an order)"
        return None

    def _addressed_here(self, request: JSON) -> bool:
        performer = as_dict(as_dict(request.get("dispenseRequest")).get("performer")).get("reference")
        pharmacy = lookup(request, performer, self._resolve)
        return pharmacy is not None and pharmacy.get("resourceType") == "Organization" and self.ncpdp_id in identifier_values(pharmacy, NCPDP_PROVIDER)

    # -- what the pharmacy holds

    def _sent(self, reference: str, kinds: tuple[str, ...] = ("NewRx", "CancelRx")) -> list[StoredMessage]:
        """What was sent (or refused) to this destination about a prescription, oldest first."""
        found = self.store.messages.list(prescription=reference, direction="out", limit=HISTORY_LIMIT)
        return sorted((s for s in found if s.counterparty == self.destination.name and s.kind in kinds), key=lambda s: s.id)

    def _held(self, reference: str) -> _Held:
        new_rx = cancel = None
        for message in self._sent(reference):
            if message.kind == "NewRx":
                if message.status in HELD:
                    new_rx, cancel = message, None
            elif new_rx is not None and message.status in CANCEL_DONE:
                cancel = message
        return _Held(new_rx, cancel)

    # -- deciding

    def _reconcile(self, order: _Order, patient_key: str | None) -> None:
        request = order.resource
        name = self.destination.name
        why_not = self._not_for_pharmacies(request)
        if why_not is not None:
            log.debug("%s: nothing to send for %s: %s", name, order.reference, why_not)
            return
        held = self._held(order.reference)
        addressed = self._addressed_here(request)
        status = request.get("status")
        if addressed and not order.deleted and status == "active":
            self._ensure_sent(order, held, patient_key)
        elif held.new_rx is not None and held.cancel is not None and held.cancel.status != SENT:
            log.debug("%s: %s was cancelled at the pharmacy already", name, order.reference)
        elif held.new_rx is not None and (order.deleted or status in WITHDRAWN or not addressed):
            self._ensure_cancelled(order, held, addressed, patient_key)
        elif not addressed and held.new_rx is None:
            log.debug("%s: %s is not addressed to pharmacy %s; nothing to send", name, order.reference, self.ncpdp_id)
        else:
            log.debug("%s: nothing to send for %s (status %s)", name, order.reference, status)

    def _ensure_sent(self, order: _Order, held: _Held, patient_key: str | None) -> None:
        previous = held.new_rx if held.cancel is None else None
        if previous is not None and previous.status != SENT:  # the pharmacy holds it: compared, nothing sent
            changed = _changed_fields(_prescribed(previous.body), self._new_rx(order, patient_key, self._resolve).body.medication)
            if not changed:
                log.debug("%s: %s is at the pharmacy as sent (NewRx %s)", self.destination.name, order.reference, previous.message_id)
                return
            raise PermanentDeliveryError(
                f"{order.reference} version {order.version} changed {', '.join(changed)} after its NewRx {previous.message_id} "
                f"was {previous.status} by pharmacy {self.ncpdp_id}; SCRIPT cannot amend a prescription: stop it and "
                f"write a new one that replaces it (priorPrescription)"
            )
        released, resolve = self._released("NewRx", order, patient_key)
        message = self._new_rx(released, patient_key, resolve)
        if previous is not None:  # sent before, no answer yet
            if not _changed_fields(_prescribed(previous.body), message.body.medication):
                log.info("%s: re-sending NewRx %s of %s, unanswered so far", self.destination.name, previous.message_id, order.reference)
                self.link.post(previous.id, previous.body, message_id=previous.message_id, prescription=order.reference, patient_key=patient_key)
                return
            self.store.messages.set_status(previous.id, SUPERSEDED, f"replaced by a NewRx of version {order.version}")
        self._send(message, order.reference, patient_key, detail=f"version {order.version}")

    def _new_rx(self, order: _Order, patient_key: str | None, resolve: Callable[[str], JSON | None]) -> m.Message:
        try:
            return script_mapping.new_rx(order.resource, resolve, message_id=self._new_id(), sent=self.store.clock(), to_ncpdp_id=self.ncpdp_id)
        except m.NcpdpInvalid as exc:
            raise self._refused("NewRx", order, exc, patient_key) from None

    def _released(self, kind: str, order: _Order, patient_key: str | None) -> tuple[_Order, Callable[[str], JSON | None]]:
        """Pass what a message discloses through the gate: the prescription, its patient and the
        conditions it gives as reasons. Returns the order as released and a look-up answering
        with the released copies (the store for the rest: prescriber, pharmacy, medication).

        :raises PermanentDeliveryError: the prescription or the patient is withheld from this
            pharmacy (the refusal is recorded, and audited by the gate).
        """
        request = order.resource
        linked = [as_dict(request.get("subject")).get("reference")]
        linked += [as_dict(reason).get("reference") for reason in as_list(request.get("reasonReference"))]
        # literal references only: a contained resource is disclosed as part of the prescription
        found = {reference_key(ref): r for ref in linked if isinstance(ref, str) and not ref.startswith("#") and (r := self._resolve(ref)) is not None}
        resources = [request, *found.values()]
        disclosure = self._gate.release(resources, self._recipient, exit=f"ncpdp:{self.destination.name}", who=WHO)
        ensure_audited(self._gate)
        copies = aligned(resources, disclosure)
        for position, (resource, copy) in enumerate(zip(resources, copies, strict=True)):
            if copy is None and resource.get("resourceType") in ("MedicationRequest", "Patient"):
                verdict = disclosure.verdicts.get(name_of(resource, position))
                raise self._withheld(kind, order, resource, verdict.part2 if verdict else True, verdict.reason if verdict else "withheld", patient_key)
        gone = {reference_key(name_of(r, i)) for i, (r, c) in enumerate(zip(resources, copies, strict=True)) if c is None}
        shown = {reference_key(name_of(r, i)): c for i, (r, c) in enumerate(zip(resources, copies, strict=True)) if c is not None}
        released = dataclasses.replace(order, resource=without_references(shown.pop(reference_key(order.reference)), gone))

        def resolve(reference: str) -> JSON | None:
            key = reference_key(reference)
            return shown[key] if key in shown else None if key in gone else self._resolve(reference)

        return released, resolve

    def _ensure_cancelled(self, order: _Order, held: _Held, addressed: bool, patient_key: str | None) -> None:
        assert held.new_rx is not None
        order, resolve = self._released("CancelRx", order, patient_key)
        if held.cancel is not None:  # sent before without an answer: the same bytes again
            log.info("%s: re-sending CancelRx %s of %s, unanswered so far", self.destination.name, held.cancel.message_id, order.reference)
            self.link.post(held.cancel.id, held.cancel.body, message_id=held.cancel.message_id, prescription=order.reference, patient_key=patient_key)
            return
        request = _withdrawn(order, addressed)
        try:
            message = script_mapping.cancel_rx(
                request,
                resolve,
                message_id=self._new_id(),
                sent=self.store.clock(),
                to_ncpdp_id=self.ncpdp_id,
                relates_to=held.new_rx.message_id,
                rx_reference_number=self._rx_reference_number(order.reference),
            )
        except m.NcpdpInvalid as exc:
            raise self._refused("CancelRx", order, exc, patient_key) from None
        self._send(message, order.reference, patient_key, relates_to=held.new_rx.message_id, detail=f"version {order.version}")

    def _rx_reference_number(self, reference: str) -> str | None:
        """The pharmacy's own number for the prescription, from the newest of its messages that carried one."""
        for message in sorted(self.store.messages.list(prescription=reference, direction="in", limit=HISTORY_LIMIT), key=lambda s: -s.id):
            if message.counterparty not in (self.destination.name, self.ncpdp_id) or not message.body:
                continue
            try:
                number = ncpdp.parse(message.body).header.rx_reference_number
            except IopFhirError:
                continue
            if number:
                return number
        return None

    # -- answering the pharmacy's renewal and change requests

    def _answer_review(self, task_id: str) -> None:
        """Send the prescriber's decision on one review Task, once (module doc: Decided reviews)."""
        name = self.destination.name
        try:
            task = self.store.read("Task", task_id).resource
        except (NotFound, Gone):
            return
        request = self._review_request(task)
        if request is None:
            log.debug("%s: Task/%s answers no renewal or change request of pharmacy %s", name, task_id, self.ncpdp_id)
            return
        decision = REVIEW_DECISIONS.get(str(task.get("status")))
        if decision is None:
            log.debug("%s: Task/%s is %s; the prescriber has not decided yet", name, task_id, task.get("status"))
            return
        kind = REVIEW_RESPONSES[request.kind]
        answers = self._answers(request.message_id, kind)
        held = next((a for a in reversed(answers) if a.status in HELD), None)
        if held is not None:
            if held.status == SENT:  # sent before without an answer: the same bytes again
                log.info("%s: re-sending %s %s, unanswered so far", name, kind, held.message_id)
                self.link.post(held.id, held.body, message_id=held.message_id, prescription=request.prescription, patient_key=request.patient_key)
            return
        asked = ncpdp.parse(request.body)
        reason = self._denial_reason(task, asked) if decision == "Denied" else None
        build = script_mapping.renewal_response if kind == "RxRenewalResponse" else script_mapping.change_response
        try:
            message = build(asked, decision=decision, message_id=self._new_id(), sent=self.store.clock(), denial_reason=reason)
            self._send(message, request.prescription, request.patient_key, relates_to=request.message_id, detail=f"Task/{task_id} {task.get('status')}")
        except m.NcpdpInvalid as exc:
            reasons = "; ".join(str(issue) for issue in exc.issues) or exc.message
            self._record_refusal(kind, request.prescription, reasons, request.patient_key, relates_to=request.message_id)
            raise PermanentDeliveryError(f"{kind} to {request.kind} {request.message_id} (Task/{task_id}) refused: {reasons}", exc.issues) from None

    def _review_request(self, task: JSON) -> StoredMessage | None:
        """The RxRenewalRequest or RxChangeRequest of this pharmacy a review Task was made from,
        applied and kept in the message store; None for any other Task."""
        for key in identifier_values(task, script_mapping.MESSAGE_SYSTEM):
            sender, _, message_id = key.partition("/")
            if sender != self.ncpdp_id or not message_id:
                continue
            found = self.store.messages.find(message_id, direction="in", counterparty=sender)
            if found is not None and found.kind in REVIEW_RESPONSES and found.status == "processed":
                return found
        return None

    def _answers(self, request_id: str, kind: str) -> list[StoredMessage]:
        """Our responses of ``kind`` to the pharmacy's message ``request_id``, sent or refused, oldest first."""
        return [a for a in self.store.messages.replies_to(request_id) if a.direction == "out" and a.kind == kind and a.counterparty == self.destination.name]

    @staticmethod
    def _denial_reason(task: JSON, asked: m.Message) -> str | None:
        """Why the prescriber denied: the Task's statusReason, else the notes they added (those
        the review Task copied from the pharmacy's request are the pharmacy's, not a reason)."""
        stated = concept_text(task.get("statusReason"))
        if stated:
            return stated
        theirs = set(note_texts(script_mapping.review_task(asked, None, "").get("note")))
        added = [text for text in note_texts(task.get("note")) if text not in theirs]
        return "; ".join(added) or None

    # -- sending and refusing

    def _send(self, message: m.Message, prescription: str | None, patient_key: str | None, *, relates_to: str | None = None, detail: str | None = None) -> Exchange:
        body = ncpdp.build(message)
        message_id = message.header.message_id
        row = self.link.record(body, kind=message.kind, message_id=message_id, prescription=prescription, patient_key=patient_key, relates_to=relates_to, detail=detail)
        exchange = self.link.post(row, body, message_id=message_id, prescription=prescription, patient_key=patient_key)
        if not isinstance(exchange.reply.body, (m.Status, m.Verify)):
            self.store.messages.set_status(row, SENT, f"answered with a {exchange.reply.kind}")
            raise PermanentDeliveryError(f"{self.destination.name} answered the {message.kind} with a {exchange.reply.kind}, not Status, Verify or Error")
        log.info("%s: %s %s of %s %s", self.destination.name, message.kind, message_id, prescription, "verified" if isinstance(exchange.reply.body, m.Verify) else "accepted")
        return exchange

    def _refused(self, kind: str, order: _Order, exc: m.NcpdpInvalid, patient_key: str | None) -> PermanentDeliveryError:
        """Record a message that may not be sent (once per reason) and the error that kills the delivery."""
        reasons = "; ".join(str(issue) for issue in exc.issues) or exc.message
        self._record_refusal(kind, order.reference, reasons, patient_key)
        return PermanentDeliveryError(f"{kind} of {order.reference} version {order.version} refused: {reasons}", exc.issues)

    def _withheld(self, kind: str, order: _Order, resource: JSON, part2: bool, reason: str, patient_key: str | None) -> PermanentDeliveryError:
        """A message the patient's consents do not let go to this pharmacy: recorded as refused
        (once per reason) and the error that kills the delivery, visibly."""
        why = f"no Part 2 consent for pharmacy {self.ncpdp_id}" if part2 else f"not disclosed to pharmacy {self.ncpdp_id}: {reason}"
        self._record_refusal(kind, order.reference, why, patient_key)
        where = str(resource.get("resourceType"))
        return PermanentDeliveryError(f"{kind} of {order.reference} version {order.version} withheld: {why}", [Issue(why, location=where, code="suppressed")])

    def _record_refusal(self, kind: str, prescription: str | None, reasons: str, patient_key: str | None, *, relates_to: str | None = None) -> None:
        # a response is refused per request it answers; a NewRx or CancelRx per prescription
        attempts = self._answers(relates_to, kind) if relates_to else self._sent(prescription, (kind,)) if prescription else []
        last = attempts[-1] if attempts else None
        if last is None or last.status != REFUSED or last.detail != reasons:
            self.store.messages.record(
                direction="out",
                kind=kind,
                message_id=self._new_id(),
                body=b"",
                status=REFUSED,
                relates_to=relates_to,
                counterparty=self.destination.name,
                prescription=prescription,
                patient_key=patient_key,
                detail=reasons,
            )


def _prescribed(body: bytes) -> m.Medication | None:
    """The MedicationPrescribed of a stored NewRx (None when it cannot be read back)."""
    try:
        message = ncpdp.parse(body)
    except IopFhirError:
        return None
    return message.body.medication if isinstance(message.body, m.NewRx) else None


def _changed_fields(before: m.Medication | None, after: m.Medication | None) -> list[str]:
    """The order fields (:data:`ORDER_FIELDS`) that differ; all of them when one side is unknown."""
    if before is None or after is None:
        return list(ORDER_FIELDS) if before is not after else []
    return [name for name in ORDER_FIELDS if getattr(before, name) != getattr(after, name)]


def _withdrawn(order: _Order, addressed: bool) -> JSON:
    """The prescription as this pharmacy must now see it: withdrawn.

    A stopped, cancelled or entered-in-error order is that already. A completed one, a deleted
    one, or one moved to another pharmacy is, for this pharmacy, cancelled; the CancelRx says
    why in its Note (the status reason when the order has one).
    """
    request = order.resource
    if not order.deleted and addressed and request.get("status") in script_mapping.CANCELLABLE:
        return request
    if order.deleted:
        why = "Prescription withdrawn at the prescriber's system."
    elif not addressed:
        why = "Prescription moved to another pharmacy."
    else:
        why = "Prescription completed."
    reason = request.get("statusReason") if addressed and not order.deleted and request.get("statusReason") else {"text": why}
    withdrawn = {**request, "status": "cancelled", "statusReason": reason}
    if not addressed:  # the performer is the new pharmacy now; the CancelRx names this one by NCPDPID
        withdrawn["dispenseRequest"] = {k: v for k, v in as_dict(request.get("dispenseRequest")).items() if k != "performer"}
    return withdrawn


__all__ = ["Exchange", "NcpdpChannel", "ScriptLink", "describe_error", "explain_script"]
