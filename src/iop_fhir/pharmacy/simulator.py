"""A pharmacy for developers: ``iop-fhir pharmacy-sim`` answers NCPDP SCRIPT like a pharmacy does.

It takes what the gateway sends a pharmacy and answers as one would, so the whole loop --
prescribe, NewRx, RxFill, MedicationDispense, adherence -- runs on one machine:

* **NewRx** -> ``Status`` at once; after ``fill_delay`` seconds an **RxFill** goes to the
  gateway's ``/ncpdp``: ``Dispensed``, or ``PartiallyDispensed`` / ``NotDispensed`` by the
  configured shares (a seeded draw per prescription, so a seed replays the same fills). A
  partial fill hands over half the quantity (at least one unit) and days supply;
* **CancelRx** -> ``Status``; the prescription is cancelled (a fill not yet made is never
  made) and a **CancelRxResponse** ``Approved`` follows after ``fill_delay``; a CancelRx
  naming no prescription on file is ``Denied``, saying so;
* **RxHistoryRequest** -> **RxHistoryResponse** synchronously: every fill this pharmacy made
  for the patient (matched by last name, first name and date of birth; within the requested
  dates when given), each with its prescription number and fill number;
* a message that is not SCRIPT, or is hostile -> NCPDP ``Error`` 900 with HTTP 400; one that
  is SCRIPT but not for this pharmacy (another NCPDPID, a kind a pharmacy does not take) ->
  ``Error`` 900 with HTTP 200;
* the same MessageID again gets the same answer and changes nothing (pharmacies de-duplicate).

:class:`PharmacySimulator` is the pharmacy itself: plain state and message building, no
HTTP and no threads, its clock and random source injectable. :func:`make_app` wraps it in a
WSGI app (``POST /`` or ``/ncpdp``; ``GET`` says what it is; ``GET /healthz`` answers 200),
and :func:`serve` runs that app on werkzeug's threaded server with a sender thread that posts
the pharmacy's own messages to the gateway, retried with exponential backoff
(:data:`SEND_ATTEMPTS` attempts) while the gateway is down or answers 5xx/429 or a retryable
Error. State is in memory only.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from iop_fhir import __version__
from iop_fhir.errors import IopFhirError, Issue
from iop_fhir.formats import ncpdp
from iop_fhir.formats.ncpdp import messages as m

log = logging.getLogger("iop_fhir.pharmacy.simulator")

MEDIA_TYPE = "application/xml"
DEFAULT_NCPDP_ID = "3812746"  # Hawthorne Community Pharmacy of the synthetic cohort (generate, demo)
DEFAULT_FILL_DELAY = 2.0  # seconds
DEFAULT_PARTIAL = 0.1
DEFAULT_NOT_DISPENSED = 0.05
SEND_ATTEMPTS = 6  # posts of one message to the gateway before it is given up
SEND_BACKOFF = 0.5  # seconds before the first retry; doubled each time
SEND_TIMEOUT = (5.0, 15.0)  # connect, read seconds
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
SOFTWARE = m.SenderSoftware(developer="iop-fhir", product="pharmacy simulator", version=__version__)


@dataclass(frozen=True)
class Answer:
    """The synchronous answer to one message: HTTP status and the SCRIPT bytes."""

    status: int
    body: bytes
    kind: str


@dataclass
class Prescription:
    """A prescription on file: the NewRx, the pharmacy's number for it, and what became of it."""

    new_rx: m.Message
    rx_number: str
    cancelled: bool = False
    fill_status: str | None = None  # once the fill was decided
    fills: list[m.Medication] = field(default_factory=list)  # handed over, as history entries

    @property
    def patient(self) -> m.Patient | None:
        return self.new_rx.body.patient if isinstance(self.new_rx.body, m.NewRx) else None


class PharmacySimulator:
    """The pharmacy's decisions and messages, without HTTP (see the module doc).

    :param ncpdp_id: the NCPDPID it answers as; NewRx and CancelRx to another are refused.
    :param fill_delay: seconds between a NewRx (CancelRx) and its RxFill (CancelRxResponse).
    :param partial: share of fills that are PartiallyDispensed.
    :param not_dispensed: share of fills that are NotDispensed.
    :param seed: seeds the draws (None: a different sequence each run).
    :param clock: aware datetimes; the SentTime of messages and the fill date come from it.
    """

    def __init__(
        self,
        ncpdp_id: str = DEFAULT_NCPDP_ID,
        *,
        fill_delay: float = DEFAULT_FILL_DELAY,
        partial: float = DEFAULT_PARTIAL,
        not_dispensed: float = DEFAULT_NOT_DISPENSED,
        seed: int | None = None,
        clock: Callable[[], dt.datetime] | None = None,
        new_message_id: Callable[[], str] | None = None,
    ) -> None:
        problems = []
        if not ncpdp_id.strip():
            problems.append(Issue("must not be empty", location="ncpdp_id"))
        if fill_delay < 0:
            problems.append(Issue(f"{fill_delay} is negative", location="fill_delay"))
        for name, share in (("partial", partial), ("not_dispensed", not_dispensed)):
            if not 0 <= share <= 1:
                problems.append(Issue(f"{share} is not a share between 0 and 1", location=name))
        if partial + not_dispensed > 1:
            problems.append(Issue(f"partial + not_dispensed is {partial + not_dispensed}, more than 1", location="not_dispensed"))
        if problems:
            raise IopFhirError(f"pharmacy simulator: {problems[0]}", problems)
        self.ncpdp_id = ncpdp_id
        self.routing = m.RoutingId(value=ncpdp_id, qualifier=m.PHARMACY_QUALIFIER)
        self.fill_delay = dt.timedelta(seconds=fill_delay)
        self.partial = partial
        self.not_dispensed = not_dispensed
        self.random = random.Random(seed)
        self.clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self._new_id = new_message_id or (lambda: str(uuid.uuid4()))
        self.prescriptions: list[Prescription] = []
        self._answers: dict[str, Answer] = {}  # by the sender's MessageID
        self._scheduled: list[tuple[dt.datetime, int, Callable[[], m.Message | None]]] = []  # a heap
        self._sequence = 0
        self._order = itertools.count()  # ties in the schedule go in the order scheduled
        self._lock = threading.Lock()

    # -- in

    def receive(self, body: bytes) -> Answer:
        """Answer one message as a pharmacy would (never raises for what the sender got wrong)."""
        try:
            message = ncpdp.parse(body)
        except ncpdp.NcpdpRejected as exc:
            return self._answer(400, ncpdp.error_for(exc, message_id=self._new_id(), sent=self.clock(), sender=self.routing))
        with self._lock:
            again = self._answers.get(message.header.message_id)
            if again is not None:
                return again
            answer = self._handle(message)
            self._answers[message.header.message_id] = answer
            return answer

    def _handle(self, message: m.Message) -> Answer:
        addressee = message.header.to.value if message.header.to else None
        if isinstance(message.body, (m.NewRx, m.CancelRx)) and addressee not in (None, self.ncpdp_id):
            return self._refuse(message, f"addressed to NCPDPID {addressee}; this is pharmacy {self.ncpdp_id}", "/Message/Header/To")
        if isinstance(message.body, m.NewRx):
            return self._new_rx(message)
        if isinstance(message.body, m.CancelRx):
            return self._cancel_rx(message)
        if isinstance(message.body, m.RxHistoryRequest):
            return self._history(message)
        return self._refuse(message, f"a pharmacy does not take {message.kind}", "/Message/Body")

    def _new_rx(self, message: m.Message) -> Answer:
        self._sequence += 1
        prescription = Prescription(new_rx=message, rx_number=f"RX{self.ncpdp_id}-{self._sequence:05d}")
        self.prescriptions.append(prescription)
        self._schedule(lambda: self._fill(prescription))
        log.info("NewRx %s (order %s, %s): on file as %s", message.header.message_id, message.header.prescriber_order_number, _drug(message), prescription.rx_number)
        return self._status(message)

    def _cancel_rx(self, message: m.Message) -> Answer:
        prescription = self._find(message.header)
        if prescription is None:
            response = m.Response(outcome="Denied", denial_reason="No prescription on file matches this CancelRx")
        else:
            prescription.cancelled = True
            response = m.Response(outcome="Approved", note="Prescription cancelled" + ("; nothing was dispensed" if not prescription.fills else ""))
        request = message.header
        if prescription is not None:  # the answer echoes the pharmacy's own number
            request = replace(request, rx_reference_number=prescription.rx_number)

        def answer() -> m.Message:
            header = m.reply_header(request, message_id=self._new_id(), sent=self.clock(), sender=self.routing)
            return m.Message(header=replace(header, sender_software=SOFTWARE), body=m.CancelRxResponse(response=response))

        self._schedule(answer)
        log.info("CancelRx %s (order %s): %s", message.header.message_id, message.header.prescriber_order_number, response.outcome)
        return self._status(message)

    def _find(self, header: m.Header) -> Prescription | None:
        """The prescription a CancelRx names: by the NewRx it relates to, our number, or the order number."""
        for prescription in reversed(self.prescriptions):
            new = prescription.new_rx.header
            if header.relates_to_message_id and header.relates_to_message_id == new.message_id:
                return prescription
            if header.rx_reference_number and header.rx_reference_number == prescription.rx_number:
                return prescription
        order = header.prescriber_order_number
        return next((p for p in reversed(self.prescriptions) if order and p.new_rx.header.prescriber_order_number == order and not p.cancelled), None)

    def _history(self, message: m.Message) -> Answer:
        request = message.body
        assert isinstance(request, m.RxHistoryRequest)
        wanted = _person(request.patient)
        entries = [
            fill
            for prescription in self.prescriptions
            if wanted is not None and _person(prescription.patient) == wanted
            for fill in prescription.fills
            if _within(fill.last_fill_date, request.start_date, request.end_date)
        ]
        header = replace(m.reply_header(message.header, message_id=self._new_id(), sent=self.clock(), sender=self.routing), sender_software=SOFTWARE)
        body = m.RxHistoryResponse(patient=request.patient, prescriber=request.prescriber, dispensed=tuple(entries))
        log.info("RxHistoryRequest %s: %d fills", message.header.message_id, len(entries))
        return self._answer(200, m.Message(header=header, body=body))

    # -- out: the fill, when its time comes

    def _fill(self, prescription: Prescription) -> m.Message | None:
        """The RxFill of a prescription (None when it was cancelled before the fill)."""
        if prescription.cancelled:
            return None
        new = prescription.new_rx
        body = new.body
        assert isinstance(body, m.NewRx)
        draw = self.random.random()
        if draw < self.partial:
            status = "PartiallyDispensed"
        elif draw < self.partial + self.not_dispensed:
            status = "NotDispensed"
        else:
            status = "Dispensed"
        prescription.fill_status = status
        now = self.clock()
        prescribed = body.medication
        pharmacy = body.pharmacy if body.pharmacy is not None and body.pharmacy.ncpdp_id == self.ncpdp_id else m.Pharmacy(ncpdp_id=self.ncpdp_id)
        dispensed = None
        note = None
        if status == "NotDispensed":
            note = "Not dispensed: the product is out of stock"
        elif prescribed is not None:
            dispensed = _dispensed(prescribed, now.date(), partial=status == "PartiallyDispensed")
            if status == "PartiallyDispensed" and prescribed.quantity is not None and dispensed.quantity is not None:
                note = f"Partial fill: {ncpdp.format_decimal(dispensed.quantity.value)} of {ncpdp.format_decimal(prescribed.quantity.value)}; the rest is owed"
            prescription.fills.append(
                replace(
                    dispensed,
                    history_source=m.HistorySource(source_reference=prescription.rx_number, fill_number=len(prescription.fills) + 1),
                    pharmacy=pharmacy,
                    prescriber=body.prescriber,
                )
            )
        header = m.Header(
            message_id=self._new_id(),
            to=new.header.from_,
            from_=self.routing,
            sent_time=now,
            relates_to_message_id=new.header.message_id,
            sender_software=SOFTWARE,
            rx_reference_number=prescription.rx_number,
            prescriber_order_number=new.header.prescriber_order_number,
        )
        fill = m.RxFill(
            fill_status=m.FillStatus(status=status, note=note),
            patient=body.patient,
            pharmacy=pharmacy,
            prescriber=body.prescriber,
            prescribed=prescribed,
            dispensed=dispensed,
        )
        log.info("RxFill for %s (order %s): %s", prescription.rx_number, new.header.prescriber_order_number, status)
        return m.Message(header=header, body=fill)

    def due(self, now: dt.datetime | None = None) -> list[m.Message]:
        """The messages whose time has come, in order (taken: each is returned once)."""
        now = now or self.clock()
        out: list[m.Message] = []
        with self._lock:
            while self._scheduled and self._scheduled[0][0] <= now:
                _, _, make = heapq.heappop(self._scheduled)
                message = make()
                if message is not None:
                    out.append(message)
        return out

    def next_due(self) -> dt.datetime | None:
        """When the next message falls due (None: nothing scheduled)."""
        with self._lock:
            return self._scheduled[0][0] if self._scheduled else None

    def _schedule(self, make: Callable[[], m.Message | None]) -> None:
        heapq.heappush(self._scheduled, (self.clock() + self.fill_delay, next(self._order), make))

    # -- answers

    def _status(self, message: m.Message) -> Answer:
        return self._answer(200, ncpdp.status_for(message.header, message_id=self._new_id(), sent=self.clock(), sender=self.routing))

    def _refuse(self, message: m.Message, why: str, location: str) -> Answer:
        error = IopFhirError(why, [Issue(why, location=location)])
        return self._answer(200, ncpdp.error_for(error, message.header, message_id=self._new_id(), sent=self.clock(), sender=self.routing))

    @staticmethod
    def _answer(status: int, message: m.Message) -> Answer:
        return Answer(status, ncpdp.build(message), message.kind)


def _drug(message: m.Message) -> str:
    medication = getattr(message.body, "medication", None)
    return medication.description if medication is not None else "no medication"


def _person(patient: m.Patient | None) -> tuple[str, str, dt.date] | None:
    """Who a patient block names, for matching: last and first name (case-folded), birth date."""
    if patient is None or patient.name is None or patient.birth_date is None:
        return None
    return ((patient.name.last or "").casefold(), (patient.name.first or "").casefold(), patient.birth_date)


def _within(day: dt.date | None, start: dt.date | None, end: dt.date | None) -> bool:
    return day is not None and (start is None or day >= start) and (end is None or day <= end)


def _dispensed(prescribed: m.Medication, day: dt.date, *, partial: bool) -> m.Medication:
    """What was handed over: the prescribed product, all of it, or (partial) half of it and
    of its days supply (at least one day)."""
    quantity = prescribed.quantity
    days = prescribed.days_supply
    if partial and quantity is not None:
        # Half, in whole units when there are two or more; less than one unit is halved as is.
        whole = quantity.value >= 2
        half = (quantity.value / 2).to_integral_value(ROUND_FLOOR) if whole else quantity.value / 2
        share = half / quantity.value
        quantity = replace(quantity, value=half)
        if days is not None:
            days = max(int((Decimal(days) * share).to_integral_value(ROUND_FLOOR)), 1)
    return replace(
        prescribed,
        quantity=quantity,
        days_supply=days,
        last_fill_date=day,
        note=None,
        pharmacy_requested_refills=None,
        history_source=None,
        pharmacy=None,
        prescriber=None,
    )


# --- HTTP ------------------------------------------------------------------------------------------


def make_app(simulator: PharmacySimulator, *, on_message: Callable[[], None] | None = None) -> Callable[..., Any]:
    """The simulator as a WSGI app: ``POST /`` or ``/ncpdp`` with SCRIPT XML; ``GET`` describes it;
    ``GET /healthz`` answers 200 while it runs.

    ``on_message`` is called after each message (the sender thread wakes to look for new work).
    """

    @Request.application
    def app(request: Request) -> Response:
        if request.path == "/healthz":  # as the gateway's: scripts wait for it
            return Response("ok\n", content_type="text/plain")
        if request.path.rstrip("/") not in ("", "/ncpdp"):
            return Response("not found: POST NCPDP SCRIPT to / or /ncpdp\n", status=404, content_type="text/plain")
        if request.method == "GET":
            text = f"iop-fhir pharmacy simulator, NCPDPID {simulator.ncpdp_id}: POST NCPDP SCRIPT 2017071 here\n"
            return Response(text, content_type="text/plain")
        if request.method != "POST":
            return Response("method not allowed\n", status=405, headers={"Allow": "GET, POST"}, content_type="text/plain")
        # One byte past the parser's limit is enough for it to refuse the message as too large.
        body = request.stream.read(ncpdp.MAX_MESSAGE_BYTES + 1)
        answer = simulator.receive(body)
        if on_message is not None:
            on_message()
        return Response(answer.body, status=answer.status, content_type=MEDIA_TYPE)

    return app


@dataclass
class _Outgoing:
    message: m.Message
    body: bytes
    attempts: int = 0
    next_at: float = 0.0  # time.monotonic()


class Sender:
    """Posts the pharmacy's own messages (RxFill, CancelRxResponse) to ``{gateway}/ncpdp``.

    A message is retried with exponential backoff (``SEND_BACKOFF`` doubled per attempt) when
    the gateway does not answer, answers 5xx/429, or answers a retryable SCRIPT Error; after
    :data:`SEND_ATTEMPTS` attempts, or on any other refusal, it is given up (logged).
    """

    def __init__(
        self,
        simulator: PharmacySimulator,
        gateway: str | None,
        *,
        token: str | None = None,
        session: requests.Session | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.simulator = simulator
        self.url = f"{gateway.rstrip('/')}/ncpdp" if gateway else None
        self.token = token
        self.session = session or requests.Session()
        self.monotonic = monotonic or time.monotonic
        self.pending: list[_Outgoing] = []
        self.sent: list[tuple[m.Message, str]] = []  # each message and how it ended: the gateway's answer kind, or "given up"
        self.wake = threading.Event()

    def step(self) -> float | None:
        """Take what fell due and post what is ready; seconds until the next thing to do (None: nothing)."""
        for message in self.simulator.due():
            self.pending.append(_Outgoing(message, ncpdp.build(message)))
        now = self.monotonic()
        for item in [p for p in self.pending if p.next_at <= now]:
            self._post(item)
        waits = [max(p.next_at - self.monotonic(), 0.0) for p in self.pending]
        upcoming = self.simulator.next_due()
        if upcoming is not None:
            waits.append(max((upcoming - self.simulator.clock()).total_seconds(), 0.0))
        return min(waits) if waits else None

    def _post(self, item: _Outgoing) -> None:
        kind = item.message.kind
        if self.url is None:
            log.info("%s %s not sent: no --gateway", kind, item.message.header.message_id)
            self._done(item, "not sent")
            return
        item.attempts += 1
        headers = {"Content-Type": MEDIA_TYPE, "Accept": MEDIA_TYPE, "User-Agent": f"iop-fhir-pharmacy-sim/{__version__}"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self.session.post(self.url, data=item.body, headers=headers, timeout=SEND_TIMEOUT)
        except requests.RequestException as exc:
            self._retry(item, f"no answer ({type(exc).__name__})")
            return
        if response.status_code in RETRY_STATUSES:
            self._retry(item, f"HTTP {response.status_code}")
            return
        try:
            reply = ncpdp.parse(response.content)
        except IopFhirError:
            log.warning("%s %s: the gateway answered HTTP %s without SCRIPT; given up", kind, item.message.header.message_id, response.status_code)
            self._done(item, "given up")
            return
        if isinstance(reply.body, m.Error):
            if reply.body.code in m.RETRYABLE_ERRORS:
                self._retry(item, f"Error {reply.body.code}")
                return
            log.warning("%s %s refused by the gateway: Error %s %s", kind, item.message.header.message_id, reply.body.code, reply.body.description or "")
        else:
            log.info("%s %s -> gateway: %s", kind, item.message.header.message_id, reply.kind)
        self._done(item, reply.kind)

    def _retry(self, item: _Outgoing, why: str) -> None:
        if item.attempts >= SEND_ATTEMPTS:
            log.warning("%s %s: %s after %d attempts; given up", item.message.kind, item.message.header.message_id, why, item.attempts)
            self._done(item, "given up")
            return
        delay = SEND_BACKOFF * 2 ** (item.attempts - 1)
        item.next_at = self.monotonic() + delay
        log.info("%s %s: %s; retry in %.1f s", item.message.kind, item.message.header.message_id, why, delay)

    def _done(self, item: _Outgoing, outcome: str) -> None:
        self.pending.remove(item)
        self.sent.append((item.message, outcome))

    def run(self, stop: threading.Event) -> None:
        """Post until ``stop`` is set, sleeping until the next message falls due or a new one arrives."""
        while not stop.is_set():
            wait = self.step()
            self.wake.wait(timeout=1.0 if wait is None else min(wait, 1.0))
            self.wake.clear()


def serve(
    simulator: PharmacySimulator,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    gateway: str | None = None,
    token: str | None = None,
    stop: threading.Event,
    started: Callable[[str], None] | None = None,
) -> None:
    """Serve ``simulator`` on ``host:port`` (0: any free port) until ``stop`` is set.

    ``started`` gets the URL once the socket listens. The HTTP server and the sender run in
    threads; both are stopped and joined before this returns.
    """
    sender = Sender(simulator, gateway, token=token)
    server = make_server(host, port, make_app(simulator, on_message=sender.wake.set), threaded=True)
    url = f"http://{host}:{server.server_port}/ncpdp"
    threads = [
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="pharmacy-sim-http", daemon=True),
        threading.Thread(target=sender.run, args=(stop,), name="pharmacy-sim-sender", daemon=True),
    ]
    for thread in threads:
        thread.start()
    if started is not None:
        started(url)
    try:
        stop.wait()
    finally:
        stop.set()
        sender.wake.set()
        server.shutdown()
        server.server_close()
        for thread in threads:
            thread.join(timeout=5)
        sender.session.close()


__all__ = ["Answer", "PharmacySimulator", "Prescription", "Sender", "make_app", "serve"]
