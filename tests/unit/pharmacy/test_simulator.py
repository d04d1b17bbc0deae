"""The pharmacy simulator's core (answers, fills, cancellations, history), its sender's retries
against a gateway that fails, and its WSGI app -- no sockets: a fake clock, ``responses`` and
werkzeug's test client."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
import responses
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.test import Client

from iop_fhir.errors import IopFhirError
from iop_fhir.formats import ncpdp
from iop_fhir.formats.ncpdp import messages as m
from iop_fhir.mappers.bundle import record_to_resources
from iop_fhir.pharmacy import script_mapping
from iop_fhir.pharmacy.simulator import SEND_ATTEMPTS, PharmacySimulator, Sender, _dispensed, make_app
from iop_fhir.record import validate_record

JSON = dict[str, Any]
START = dt.datetime(2026, 1, 20, 15, 0, tzinfo=dt.timezone.utc)
MAIN_STREET = "1234567"  # the example record's pharmacy
GATEWAY = "http://gateway.test"


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class Orders:
    """NewRx, CancelRx and RxHistoryRequest messages for the example record's prescriptions."""

    def __init__(self, record: JSON) -> None:
        self.resources = record_to_resources(validate_record(record))
        self.by_reference = {f"urn:uuid:{r['id']}": r for r in self.resources}
        self.count = 0

    def _next_id(self) -> str:
        self.count += 1
        return f"gw-{self.count}"

    def order(self, value: str) -> JSON:
        return next(r for r in self.resources if r["resourceType"] == "MedicationRequest" and r["identifier"][0]["value"].endswith(f"/{value}"))

    def new_rx(self, value: str = "rx-2") -> m.Message:
        return script_mapping.new_rx(self.order(value), self.by_reference.get, message_id=self._next_id(), sent=START, to_ncpdp_id=MAIN_STREET)

    def cancel_rx(self, new_rx: m.Message, value: str = "rx-2") -> m.Message:
        order = {**self.order(value), "status": "stopped", "statusReason": {"text": "Side effects"}}
        return script_mapping.cancel_rx(
            order, self.by_reference.get, message_id=self._next_id(), sent=START, to_ncpdp_id=MAIN_STREET, relates_to=new_rx.header.message_id
        )

    def history_request(self, **dates: dt.date) -> m.Message:
        patient = next(r for r in self.resources if r["resourceType"] == "Patient")
        doctor = next(r for r in self.resources if r["resourceType"] == "Practitioner" and any("us-npi" in i["system"] for i in r.get("identifier", ())))
        to = m.RoutingId(value=MAIN_STREET, qualifier="P")
        return script_mapping.history_request(patient, doctor, message_id=self._next_id(), sent=START, to=to, **dates)


@pytest.fixture
def orders(example_json: JSON) -> Orders:
    return Orders(example_json)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def simulator(clock: Clock, **options: Any) -> PharmacySimulator:
    options.setdefault("fill_delay", 2.0)
    options.setdefault("partial", 0.0)
    options.setdefault("not_dispensed", 0.0)
    return PharmacySimulator(MAIN_STREET, seed=5, clock=clock, **options)


def send(sim: PharmacySimulator, message: m.Message) -> tuple[int, m.Message]:
    answer = sim.receive(ncpdp.build(message))
    return answer.status, ncpdp.parse(answer.body)


# --- NewRx and its fill ----------------------------------------------------------------------------


def test_a_new_rx_is_acknowledged_and_filled_after_the_delay(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock)
    new_rx = orders.new_rx()
    status, reply = send(sim, new_rx)
    assert status == 200 and reply.kind == "Status" and reply.body.code == "000"
    assert reply.header.relates_to_message_id == new_rx.header.message_id
    assert (reply.header.to, reply.header.from_) == (new_rx.header.from_, new_rx.header.to)
    clock.advance(1.9)
    assert sim.due() == []  # not yet
    clock.advance(0.1)
    [fill] = sim.due()
    assert fill.kind == "RxFill" and fill.body.fill_status.status == "Dispensed"
    header = fill.header
    assert header.prescriber_order_number == new_rx.header.prescriber_order_number
    assert header.relates_to_message_id == new_rx.header.message_id
    assert header.from_ == m.RoutingId(value=MAIN_STREET, qualifier="P") and header.to == new_rx.header.from_
    assert header.rx_reference_number == sim.prescriptions[0].rx_number
    prescribed = new_rx.body.medication
    assert fill.body.prescribed == prescribed
    dispensed = fill.body.dispensed
    assert (dispensed.quantity, dispensed.days_supply, dispensed.last_fill_date) == (prescribed.quantity, prescribed.days_supply, START.date())
    assert ncpdp.parse(ncpdp.build(fill)) == fill  # a well-formed RxFill
    assert sim.due() == []  # each message once


def test_shares_decide_partial_and_not_dispensed_fills(orders: Orders, clock: Clock) -> None:
    partial = simulator(clock, partial=1.0)
    send(partial, orders.new_rx())
    clock.advance(2)
    [fill] = partial.due()
    assert fill.body.fill_status.status == "PartiallyDispensed"
    assert fill.body.dispensed.quantity.value == 30 and fill.body.dispensed.days_supply == 15  # of 60 tablets, 30 days
    assert fill.body.fill_status.note == "Partial fill: 30 of 60; the rest is owed"
    none = simulator(clock, not_dispensed=1.0)
    send(none, orders.new_rx())
    clock.advance(2)
    [fill] = none.due()
    assert fill.body.fill_status.status == "NotDispensed" and fill.body.dispensed is None
    assert none.prescriptions[0].fills == []  # nothing handed over: nothing in its history


def test_a_seed_replays_the_same_fills(example_json: JSON) -> None:
    def statuses(seed: int) -> list[str]:
        clock = Clock()
        orders = Orders(example_json)
        sim = PharmacySimulator(MAIN_STREET, fill_delay=0, partial=0.3, not_dispensed=0.3, seed=seed, clock=clock)
        for _ in range(30):
            sim.receive(ncpdp.build(orders.new_rx()))
        return [fill.body.fill_status.status for fill in sim.due()]

    first = statuses(11)
    assert first == statuses(11)
    assert set(first) == {"Dispensed", "PartiallyDispensed", "NotDispensed"}


def test_the_same_message_id_is_answered_the_same_and_filled_once(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock)
    body = ncpdp.build(orders.new_rx())
    first, again = sim.receive(body), sim.receive(body)
    assert first == again and len(sim.prescriptions) == 1
    clock.advance(5)
    assert [message.kind for message in sim.due()] == ["RxFill"]


# --- CancelRx --------------------------------------------------------------------------------------


def test_a_cancel_before_the_fill_stops_it_and_is_approved(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock)
    new_rx = orders.new_rx()
    send(sim, new_rx)
    cancel = orders.cancel_rx(new_rx)
    status, reply = send(sim, cancel)
    assert status == 200 and reply.kind == "Status" and reply.header.relates_to_message_id == cancel.header.message_id
    clock.advance(2)
    [response] = sim.due()  # the fill is never made
    assert response.kind == "CancelRxResponse" and response.body.response.outcome == "Approved"
    assert response.header.relates_to_message_id == cancel.header.message_id
    assert response.header.rx_reference_number == sim.prescriptions[0].rx_number
    assert response.header.prescriber_order_number == new_rx.header.prescriber_order_number
    assert ncpdp.parse(ncpdp.build(response)) == response


def test_a_cancel_of_nothing_on_file_is_denied(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock)
    status, reply = send(sim, orders.cancel_rx(orders.new_rx()))  # its NewRx never came
    assert reply.kind == "Status"
    clock.advance(2)
    [response] = sim.due()
    assert response.body.response.outcome == "Denied"
    assert response.body.response.denial_reason == "No prescription on file matches this CancelRx"


# --- RxHistoryRequest ------------------------------------------------------------------------------


def test_history_lists_the_fills_made_for_the_patient(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock)
    for value in ("rx-2", "rx-3"):
        send(sim, orders.new_rx(value))
    clock.advance(2)
    assert len(sim.due()) == 2
    request = orders.history_request()
    status, reply = send(sim, request)
    assert status == 200 and reply.kind == "RxHistoryResponse"
    assert reply.header.relates_to_message_id == request.header.message_id
    entries = reply.body.dispensed
    assert [e.history_source.source_reference for e in entries] == [p.rx_number for p in sim.prescriptions]
    assert {e.history_source.fill_number for e in entries} == {1}
    assert all(e.last_fill_date == START.date() and e.pharmacy.ncpdp_id == MAIN_STREET for e in entries)
    assert {e.description for e in entries} == {p.new_rx.body.medication.description for p in sim.prescriptions}
    # dates outside the fills: nothing
    _, none = send(sim, orders.history_request(start=dt.date(2025, 1, 1), end=dt.date(2025, 12, 31)))
    assert none.body.dispensed == ()


def test_history_of_another_patient_is_empty(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock)
    send(sim, orders.new_rx())
    clock.advance(2)
    sim.due()
    request = orders.history_request()
    other = m.Message(header=request.header, body=m.RxHistoryRequest(patient=m.Patient(name=m.Name(last="Nobody", first="Else"), gender="U", birth_date=dt.date(1990, 1, 1)), prescriber=request.body.prescriber))
    _, reply = send(sim, other)
    assert reply.body.dispensed == ()


# --- what a pharmacy refuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not xml at all",
        b"<Message><Header/></Message>",
        b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><Message>&b;</Message>',
    ],
)
def test_unreadable_messages_get_an_error_with_400(body: bytes, clock: Clock) -> None:
    answer = simulator(clock).receive(body)
    reply = ncpdp.parse(answer.body)
    assert answer.status == 400 and reply.kind == "Error" and reply.body.code == "900"


def test_another_pharmacys_messages_and_foreign_kinds_are_refused(orders: Orders, clock: Clock) -> None:
    sim = PharmacySimulator("7654321", clock=clock)
    status, reply = send(sim, orders.new_rx())
    assert status == 200 and reply.kind == "Error" and reply.body.code == "900"
    assert f"addressed to NCPDPID {MAIN_STREET}; this is pharmacy 7654321" in reply.body.description
    ack = ncpdp.status_for(orders.new_rx().header, message_id="stray", sent=START)
    status, reply = send(sim, ack)
    assert reply.kind == "Error" and "a pharmacy does not take Status" in reply.body.description
    assert sim.prescriptions == []


@pytest.mark.parametrize(
    ("options", "location"),
    [({"partial": 0.7, "not_dispensed": 0.4}, "not_dispensed"), ({"partial": -0.1}, "partial"), ({"fill_delay": -1}, "fill_delay")],
)
def test_impossible_settings_are_refused(options: dict[str, float], location: str) -> None:
    with pytest.raises(IopFhirError) as info:
        PharmacySimulator(MAIN_STREET, **options)
    assert info.value.issues[0].location == location


@given(quantity=st.decimals(min_value=Decimal("0.5"), max_value=Decimal(1000), places=1), days=st.integers(min_value=1, max_value=365))
def test_a_partial_fill_hands_over_part_of_the_order(quantity: Decimal, days: int) -> None:
    prescribed = m.Medication(description="x", quantity=m.Quantity(value=quantity, unit_code="C48542"), days_supply=days)
    partial = _dispensed(prescribed, START.date(), partial=True)
    assert Decimal(0) < partial.quantity.value <= quantity
    assert 1 <= partial.days_supply <= days
    assert partial.last_fill_date == START.date()
    assert _dispensed(prescribed, START.date(), partial=False).quantity == prescribed.quantity


# --- the sender ------------------------------------------------------------------------------------


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gateway_answer(status_code: int = 200, *, error: str | None = None) -> Any:
    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        message = ncpdp.parse(request.body)
        if error is not None:
            header = m.reply_header(message.header, message_id="g-err", sent=START)
            body = ncpdp.build(m.Message(header=header, body=m.Error(code=error, description="busy")))
        else:
            body = ncpdp.build(ncpdp.status_for(message.header, message_id="g-ack", sent=START))
        return status_code, {"Content-Type": "application/xml"}, body

    return answer


def test_the_sender_retries_a_failing_gateway_with_backoff(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock, fill_delay=0)
    ticks = Monotonic()
    sender = Sender(sim, GATEWAY, token="t0ken", monotonic=ticks)
    send(sim, orders.new_rx())
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, f"{GATEWAY}/ncpdp", body=responses.ConnectionError("refused"))
        mock.add(responses.POST, f"{GATEWAY}/ncpdp", status=503)
        mock.add_callback(responses.POST, f"{GATEWAY}/ncpdp", callback=gateway_answer(error="602"))
        mock.add_callback(responses.POST, f"{GATEWAY}/ncpdp", callback=gateway_answer())
        waits = []
        while sender.pending or not sender.sent:
            wait = sender.step()
            waits.append(wait)
            ticks.now += wait or 0
        assert len(mock.calls) == 4
        assert all(call.request.headers["Authorization"] == "Bearer t0ken" for call in mock.calls)
        assert {ncpdp.parse(call.request.body).header.message_id for call in mock.calls} == {sender.sent[0][0].header.message_id}
    assert waits[:3] == [0.5, 1.0, 2.0]  # doubling
    assert [(message.kind, outcome) for message, outcome in sender.sent] == [("RxFill", "Status")]


def test_the_sender_gives_up_after_its_attempts(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock, fill_delay=0)
    ticks = Monotonic()
    sender = Sender(sim, GATEWAY, monotonic=ticks)
    send(sim, orders.new_rx())
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, f"{GATEWAY}/ncpdp", status=502)
        while sender.pending or not sender.sent:
            ticks.now += sender.step() or 0
        assert len(mock.calls) == SEND_ATTEMPTS
    assert sender.sent[0][1] == "given up"


def test_a_refusal_by_the_gateway_is_not_retried(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock, fill_delay=0)
    sender = Sender(sim, GATEWAY, monotonic=Monotonic())
    send(sim, orders.new_rx())
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, f"{GATEWAY}/ncpdp", callback=gateway_answer(error="900"))
        assert sender.step() is None
        assert len(mock.calls) == 1
    assert sender.sent[0][1] == "Error"


def test_without_a_gateway_nothing_is_posted(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock, fill_delay=0)
    sender = Sender(sim, None)
    send(sim, orders.new_rx())
    with responses.RequestsMock():  # any request would fail the test
        assert sender.step() is None
    assert sender.sent[0][1] == "not sent"
    assert len(sim.prescriptions[0].fills) == 1  # the fill is still on file for RxHistory


# --- the WSGI app ----------------------------------------------------------------------------------


def test_the_app_takes_script_at_root_and_ncpdp(orders: Orders, clock: Clock) -> None:
    sim = simulator(clock)
    woken = []
    client = Client(make_app(sim, on_message=lambda: woken.append(1)))
    for path in ("/", "/ncpdp"):
        response = client.post(path, data=ncpdp.build(orders.new_rx()), content_type="application/xml")
        assert response.status_code == 200 and response.content_type == "application/xml"
        assert ncpdp.parse(response.get_data()).kind == "Status"
    assert len(sim.prescriptions) == 2 and len(woken) == 2
    bad = client.post("/ncpdp", data=b"<oops", content_type="application/xml")
    assert bad.status_code == 400 and ncpdp.parse(bad.get_data()).kind == "Error"
    assert f"NCPDPID {MAIN_STREET}" in client.get("/ncpdp").get_data(as_text=True)
    assert client.get("/healthz").status_code == 200
    assert client.post("/elsewhere", data=b"").status_code == 404
    assert client.put("/ncpdp", data=b"").status_code == 405
