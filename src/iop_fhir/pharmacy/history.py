"""RxHistoryRequest: a patient's medication history from a pharmacy or a history network.

What an intake medication reconciliation (or an aftercare provider) needs: every fill the
source knows of, whoever prescribed it. :func:`request_history` asks one ``kind = "ncpdp"``
destination (``iop-fhir ncpdp history --patient ID --destination NAME``):

1. the RxHistoryRequest is built from the stored Patient and a prescriber
   (:func:`~iop_fhir.pharmacy.script_mapping.history_request`), addressed to the destination's
   ``ncpdp_id``, recorded in the message store (``sent``, the patient as its ``patient_key``)
   and posted over the destination's HTTP (its auth and timeouts, failures classified as for
   every delivery: :class:`~iop_fhir.pharmacy.channel.ScriptLink`);
2. a synchronous **RxHistoryResponse** is recorded, then stored in one unit of work with the
   message statuses: one MedicationDispense per fill (MedicationStatement for a prescription
   never filled), upserted by fill key, so asking twice stores nothing new
   (:func:`~iop_fhir.pharmacy.inbound.apply_history_response`); the request becomes
   ``answered``, the response ``processed``;
3. a **Status** or **Verify** means the source answers later: its RxHistoryResponse arrives
   at ``POST /ncpdp`` and is matched to this request by RelatesToMessageID;
4. an **Error** (or an HTTP failure) raises a :class:`~iop_fhir.errors.DeliveryError`:
   transient for the retryable codes (600, 602), 5xx, 429 and no answer; permanent otherwise.

The prescriber on whose behalf the history is asked: the Practitioner named, else the
requester of the patient's most recent prescription, else a member of the patient's care team
-- the first with an NPI, which the request must carry.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import requests

from iop_fhir.errors import Gone, IopFhirError, Issue, NotFound
from iop_fhir.formats import ncpdp
from iop_fhir.formats.ncpdp import messages as m
from iop_fhir.mappers.datatypes import as_dict, as_list, identifier_values
from iop_fhir.pharmacy import script_mapping
from iop_fhir.pharmacy.channel import RECEIVED, ScriptLink
from iop_fhir.pharmacy.inbound import apply_history_response
from iop_fhir.store import Saved, Store, UnitOfWork
from iop_fhir.store.search_index import parse_reference
from iop_fhir.sync.destinations import Destination
from iop_fhir.terminology import NPI

JSON = dict[str, Any]
ANSWERED = "answered"  # our request, answered synchronously with the history
PROCESSED = "processed"  # the history, stored
RECENT_PRESCRIPTIONS = 20  # prescriptions looked at for a prescriber


@dataclass(frozen=True)
class HistoryResult:
    """What one RxHistoryRequest brought back."""

    request_id: str  # our MessageID
    answer: str  # RxHistoryResponse, or Status / Verify when the history comes later
    entries: int  # MedicationDispensed entries in the response
    saved: tuple[Saved, ...]  # the resources stored, one per distinct fill

    @property
    def created(self) -> int:
        return sum(1 for s in self.saved if s.created)

    @property
    def updated(self) -> int:
        return sum(1 for s in self.saved if s.changed and not s.created)

    @property
    def unchanged(self) -> int:
        return sum(1 for s in self.saved if not s.changed)


class HistoryRefused(IopFhirError):
    """The request cannot be made: the destination is not a pharmacy, or no prescriber is known."""

    status = 422
    issue_code = "processing"


def request_history(
    store: Store,
    destination: Destination,
    patient_id: str,
    *,
    prescriber_id: str | None = None,
    start: dt.date | None = None,
    end: dt.date | None = None,
    session: requests.Session | None = None,
) -> HistoryResult:
    """Ask ``destination`` for the medication history of ``Patient/{patient_id}`` and store it.

    :param prescriber_id: the Practitioner asking (default: see the module doc).
    :param start, end: the dates the history should cover (both or neither).
    :raises NotFound: no such patient or practitioner.
    :raises HistoryRefused: the destination is not ``kind = "ncpdp"``, or no prescriber is known.
    :raises NcpdpInvalid: the patient or prescriber lacks what the request needs (each named).
    :raises TransientDeliveryError | PermanentDeliveryError: the source did not answer, or refused.
    """
    if destination.kind != "ncpdp" or not destination.ncpdp_id:
        raise HistoryRefused(
            f"destination {destination.name!r} is not a pharmacy",
            [Issue(f"is kind {destination.kind!r}; an RxHistoryRequest goes to a kind = \"ncpdp\" destination", location="destination", code="value")],
        )
    patient = store.read("Patient", patient_id)
    prescriber = _prescriber(store, patient.reference, prescriber_id)
    message = script_mapping.history_request(
        patient.resource,
        prescriber,
        message_id=str(uuid.uuid4()),
        sent=store.clock(),
        to=m.RoutingId(value=destination.ncpdp_id, qualifier=m.PHARMACY_QUALIFIER),
        start=start,
        end=end,
    )
    body = ncpdp.build(message)
    message_id = message.header.message_id
    link = ScriptLink(destination, store, session=session)
    try:
        row = link.record(body, kind=message.kind, message_id=message_id, prescription=None, patient_key=patient.reference)
        exchange = link.post(row, body, message_id=message_id, prescription=None, patient_key=patient.reference)
    finally:
        link.close()
    reply = exchange.reply
    if not isinstance(reply.body, m.RxHistoryResponse):  # Status / Verify: the history comes later
        return HistoryResult(message_id, reply.kind, 0, ())
    entries = len(reply.body.dispensed)

    def store_history(uow: UnitOfWork) -> list[Saved]:
        saved = apply_history_response(uow, reply, patient.reference)
        store.messages.set_status(exchange.reply_row, PROCESSED, f"{len(saved)} resources from {entries} entries", conn=uow.connection)
        store.messages.set_status(row, ANSWERED, conn=uow.connection)
        return saved

    try:
        saved = store.transaction(store_history)
    except IopFhirError as exc:
        store.messages.set_status(exchange.reply_row, RECEIVED, f"not stored: {exc.message}")
        raise
    return HistoryResult(message_id, reply.kind, entries, tuple(saved))


def _prescriber(store: Store, patient_ref: str, prescriber_id: str | None) -> JSON:
    """The Practitioner the request is made for (see the module doc)."""
    if prescriber_id is not None:
        return store.read("Practitioner", prescriber_id).resource
    recent = store.search("MedicationRequest", [("patient", patient_ref)], sort="-authoredon", count=RECENT_PRESCRIPTIONS).entries
    for request in recent:
        person = _practitioner(store, as_dict(request.resource.get("requester")).get("reference"))
        if person is not None:
            return person
    for team in store.search("CareTeam", [("patient", patient_ref)], count=RECENT_PRESCRIPTIONS).entries:
        for participant in as_list(team.resource.get("participant")):
            person = _practitioner(store, as_dict(as_dict(participant).get("member")).get("reference"))
            if person is not None:
                return person
    raise HistoryRefused(
        f"no prescriber is known for {patient_ref}",
        [Issue("no prescription or care team names a practitioner with an NPI; name one (--prescriber)", location="prescriber", code="required")],
    )


def _practitioner(store: Store, reference: object) -> JSON | None:
    """The Practitioner (with an NPI) a reference names, directly or through a PractitionerRole."""
    for _ in range(2):  # a PractitionerRole leads to its practitioner: one step
        found = parse_reference(reference) if isinstance(reference, str) else None
        if found is None or found[0] not in ("Practitioner", "PractitionerRole"):
            return None
        try:
            resource = store.read(found[0], found[1]).resource
        except (NotFound, Gone):
            return None
        if found[0] == "Practitioner":
            return resource if identifier_values(resource, NPI) else None
        reference = as_dict(resource.get("practitioner")).get("reference")
    return None


__all__ = ["HistoryRefused", "HistoryResult", "request_history"]
