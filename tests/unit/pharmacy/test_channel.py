"""The NCPDP channel through the worker: what each prescription change sends a pharmacy, what the
pharmacy's answers do to the delivery, and that a repeat sends nothing twice; and RxHistoryRequest,
answered by the simulator's core.

The pharmacy is ``responses`` answering SCRIPT (Status, Error, 503); the store runs on SQLite,
and on PostgreSQL when ``IOP_FHIR_TEST_POSTGRES_URL`` is set (the store tests' fixtures).
"""

from __future__ import annotations

import copy
import datetime as dt
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import responses

from iop_fhir.api.iop import save_records
from iop_fhir.errors import PermanentDeliveryError, TransientDeliveryError
from iop_fhir.formats import ncpdp
from iop_fhir.formats.ncpdp import messages as m
from iop_fhir.mappers.context import MappingContext
from iop_fhir.pharmacy.channel import NcpdpChannel
from iop_fhir.pharmacy import inbound
from iop_fhir.pharmacy.history import HistoryRefused, request_history
from iop_fhir.pharmacy.inbound import InboundOptions
from iop_fhir.pharmacy.script_mapping import FILL_SYSTEM
from iop_fhir.pharmacy.simulator import PharmacySimulator
from iop_fhir.record import validate_record
from iop_fhir.store import DeliveryState, Store
from iop_fhir.sync.destinations import Destination, Router
from iop_fhir.sync.worker import Worker
from iop_fhir.terminology import SYNC_SOURCE



JSON = dict[str, Any]
URL = "http://pharmacy.test/ncpdp"
MAIN_STREET = "1234567"  # the example record's pharmacy ph-1
PHARMACY = Destination(name="main-street", kind="ncpdp", base_url=URL, ncpdp_id=MAIN_STREET, max_attempts=3, backoff_base=1.0, backoff_max=5.0)


@dataclass
class Pharmacy:
    """What ``responses`` answers at :data:`URL`: each posted message is kept; ``answer`` decides."""

    received: list[m.Message] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    answer: Callable[[m.Message], tuple[int, dict[str, str], bytes]] | None = None

    def __call__(self, request: Any) -> tuple[int, dict[str, str], bytes]:
        assert request.headers["Content-Type"] == "application/xml"
        message = ncpdp.parse(request.body)
        self.received.append(message)
        self.bodies.append(request.body)
        if self.answer is not None:
            return self.answer(message)
        return 200, {"Content-Type": "application/xml"}, status_of(message)

    def kinds(self) -> list[str]:
        return [message.kind for message in self.received]

    def orders(self) -> list[str | None]:
        return [message.header.prescriber_order_number for message in self.received]


SENT = dt.datetime(2026, 1, 20, 9, 0, tzinfo=dt.timezone.utc)


def status_of(message: m.Message) -> bytes:
    return ncpdp.build(ncpdp.status_for(message.header, message_id=f"ack-{message.header.message_id}", sent=SENT))


def error_of(message: m.Message, code: str, description: str) -> bytes:
    header = m.reply_header(message.header, message_id=f"err-{message.header.message_id}", sent=SENT)
    return ncpdp.build(m.Message(header=header, body=m.Error(code=code, description=description)))


@pytest.fixture
def pharmacy() -> Iterator[Pharmacy]:
    fake = Pharmacy()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.POST, URL, callback=fake)
        yield fake


@pytest.fixture
def store(open_store: Callable[..., Store]) -> Store:
    return open_store(router=Router([PHARMACY, replace(PHARMACY, name="elm-street", ncpdp_id="2230418")]))


def order_number(record: JSON, prescription: str) -> str:
    """The PrescriberOrderNumber a prescription of ``record`` goes out with: its identifier value."""
    return MappingContext(validate_record(record)).ids.value("prescription", prescription)


def save(store: Store, record: JSON) -> None:
    save_records(store, [validate_record(record)])


def stop(record: JSON, prescription: str, reason: str) -> JSON:
    """``record`` with ``prescription`` stopped on 2026-01-20 (and listed as stopped at discharge)."""
    out = copy.deepcopy(record)
    for item in out["prescriptions"]:
        if item["id"] == prescription:
            item.update(status="stopped", status_reason=reason, end="2026-01-20")
    for item in out["discharge"]["aftercare"]["medications"]:
        if item["prescription_id"] == prescription:
            item["disposition"] = "stopped"
    return out


def worker(store: Store, clock: Any, *destinations: Destination) -> Worker:
    chosen = destinations or (PHARMACY,)
    return Worker(store, {d.name: d for d in chosen}, name="w", random=random.Random(3), sleep=lambda s: clock.advance(seconds=s))


def deliveries(store: Store, destination: str = PHARMACY.name) -> list[Any]:
    return store.outbox.list(destination=destination, limit=1000)


def outbound(store: Store, prescription: str | None = None) -> list[Any]:
    return [s for s in store.messages.list(direction="out", limit=1000) if prescription is None or s.prescription == prescription]


def prescription_ref(store: Store, record: JSON, prescription: str) -> str:
    value = order_number(record, prescription)
    found = [s for s in store.search("MedicationRequest", [("identifier", value)]).entries]
    return found[0].reference


# --- NewRx -----------------------------------------------------------------------------------------


def test_active_orders_to_this_pharmacy_go_as_new_rx_and_are_accepted(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    result = worker(store, clock).drain(max_wait=0)
    assert result.dead == 0 and result.pending == 0
    # rx-2 and rx-3 are active and go to ph-1; rx-1 (stopped, never sent), rx-4 (no pharmacy) and
    # the discharge medication list (intent plan) send nothing.
    assert pharmacy.kinds() == ["NewRx", "NewRx"]
    assert sorted(pharmacy.orders()) == sorted(order_number(example_json, p) for p in ("rx-2", "rx-3"))
    first = pharmacy.received[0]
    assert first.header.to == m.RoutingId(value=MAIN_STREET, qualifier="P")
    assert first.body.pharmacy.ncpdp_id == MAIN_STREET
    sent = outbound(store)
    assert [(s.kind, s.status, s.counterparty) for s in sent] == [("NewRx", "accepted", "main-street")] * 2
    assert [s.body for s in sent] == pharmacy.bodies  # kept exactly as sent
    replies = store.messages.list(direction="in", limit=10)
    assert [(r.kind, r.relates_to, r.status) for r in replies] == [("Status", s.message_id, "received") for s in sent]
    assert {s.prescription for s in sent} == {prescription_ref(store, example_json, p) for p in ("rx-2", "rx-3")}


def test_a_repeated_delivery_sends_nothing_again(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    assert len(pharmacy.received) == 2
    channel = NcpdpChannel(PHARMACY, store)
    channel.deliver(deliveries(store))  # every delivery again, as after a worker's crash
    assert len(pharmacy.received) == 2
    # a new version that changes nothing the pharmacy holds (a note) sends nothing either
    changed = copy.deepcopy(example_json)
    changed["prescriptions"][1]["status_reason"] = None
    save(store, changed)
    assert worker(store, clock).drain(max_wait=0).dead == 0
    assert len(pharmacy.received) == 2


def test_another_pharmacys_orders_send_nothing(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    elm = replace(PHARMACY, name="elm-street", ncpdp_id="2230418")
    result = worker(store, clock, elm).drain(max_wait=0)
    assert result.delivered == len(deliveries(store, "elm-street")) > 0 and result.dead == 0
    assert pharmacy.received == [] and outbound(store) == []


def test_a_pulled_order_is_never_sent(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    reference = prescription_ref(store, example_json, "rx-2")
    foreign = copy.deepcopy(store.read(*reference.split("/")).resource)
    foreign["identifier"] = [{"system": "https://ehr.example/orders", "value": "o-77"}]
    foreign["meta"] = {"tag": [{"system": SYNC_SOURCE, "code": "ehr"}]}
    del foreign["id"]
    store.create(foreign)
    assert worker(store, clock).drain(max_wait=0).dead == 0
    assert len(pharmacy.received) == 2


# --- answers --------------------------------------------------------------------------------------


def test_a_retryable_error_retries_with_a_fresh_message_id(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    answers = iter([602, None, None])

    def answer(message: m.Message) -> tuple[int, dict[str, str], bytes]:
        code = next(answers)
        body = error_of(message, "602", "Pharmacy system busy") if code else status_of(message)
        return 200, {"Content-Type": "application/xml"}, body

    pharmacy.answer = answer
    save(store, example_json)
    run = worker(store, clock)
    first = run.run_once()
    assert first.retried == len(deliveries(store)) and first.delivered == 0  # the whole batch waits
    failed = [d for d in deliveries(store) if d.state == DeliveryState.FAILED]
    assert failed and "NCPDP Error 602: Pharmacy system busy" in failed[0].last_error
    assert [(s.status, s.detail) for s in outbound(store)] == [("error: 602", "NCPDP Error 602: Pharmacy system busy")]
    assert run.drain(max_wait=60).delivered == len(deliveries(store))
    ids = [message.header.message_id for message in pharmacy.received]
    assert len(ids) == 3 and len(set(ids)) == 3  # the failed NewRx went again under a new MessageID
    assert pharmacy.orders()[0] == pharmacy.orders()[1]


def test_a_rejection_kills_the_delivery_with_the_pharmacys_reason(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    def answer(message: m.Message) -> tuple[int, dict[str, str], bytes]:
        if message.body.medication.dea_schedule:  # rx-3, buprenorphine
            return 400, {"Content-Type": "application/xml"}, error_of(message, "900", "Prescriber DEA number not on file")
        return 200, {"Content-Type": "application/xml"}, status_of(message)

    pharmacy.answer = answer
    save(store, example_json)
    run = worker(store, clock)
    result = run.drain(max_wait=0)
    assert result.dead == 1
    dead = [d for d in deliveries(store) if d.state == DeliveryState.DEAD]
    assert "NCPDP Error 900: Prescriber DEA number not on file" in dead[0].last_error
    statuses = sorted(s.status for s in outbound(store))
    assert statuses == ["accepted", "error: 900"]  # sent once, though the worker split the batch around it
    # requeued (the DEA number is on file now, say), it is sent again, by the same worker too
    store.outbox.requeue([d.id for d in dead])
    assert run.drain(max_wait=0).dead == 1
    assert sorted(s.status for s in outbound(store)) == ["accepted", "error: 900", "error: 900"]


def test_503_with_retry_after_re_sends_the_same_bytes(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    answers = iter([(503, {"Retry-After": "7"}), (503, {"Retry-After": "7"})])

    def answer(message: m.Message) -> tuple[int, dict[str, str], bytes]:
        status, headers = next(answers, (200, {}))
        if status == 503:
            return status, headers, b"down for maintenance"
        return 200, {"Content-Type": "application/xml"}, status_of(message)

    pharmacy.answer = answer
    save(store, example_json)
    run = worker(store, clock)
    before = clock.now
    first = run.run_once()
    assert first.retried == len(deliveries(store))
    failed = [d for d in deliveries(store) if d.state == DeliveryState.FAILED]
    assert all(d.next_attempt_at - before >= dt.timedelta(seconds=7) for d in failed)
    assert "503" in failed[0].last_error and "down for maintenance" in failed[0].last_error
    assert [s.status for s in outbound(store)] == ["sent"]  # no answer: it may be at the pharmacy
    clock.advance(seconds=8)
    run.run_once()  # the 503 again
    clock.advance(seconds=8)
    assert run.drain(max_wait=60).delivered == len(deliveries(store))
    kinds = [(message.header.message_id, body) for message, body in zip(pharmacy.received, pharmacy.bodies, strict=True)]
    assert kinds[0] == kinds[1] == kinds[2]  # byte for byte, MessageID and SentTime included
    assert [s.status for s in outbound(store)] == ["accepted", "accepted"]


def test_an_answer_that_is_not_script_is_permanent(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    pharmacy.answer = lambda message: (200, {"Content-Type": "text/html"}, b"<html><body>It works!</body></html>")
    save(store, example_json)
    channel = NcpdpChannel(PHARMACY, store)
    with pytest.raises(PermanentDeliveryError, match="no readable SCRIPT message"):
        channel.deliver(deliveries(store))


def test_no_answer_is_transient(store: Store, example_json: JSON) -> None:
    save(store, example_json)
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, URL, body=responses.ConnectionError("refused"))
        with pytest.raises(TransientDeliveryError, match="no answer"):
            NcpdpChannel(PHARMACY, store).deliver(deliveries(store))
    assert [s.status for s in outbound(store)] == ["sent"]


# --- refusals -------------------------------------------------------------------------------------


def test_a_controlled_substance_refusal_goes_dead_with_its_reasons(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    record = example_json
    save(store, record)
    # An order written through the FHIR API, where no IOP record rule stood in the way:
    # buprenorphine, Schedule III, with more than 5 refills.
    reference = prescription_ref(store, record, "rx-3")
    order = copy.deepcopy(store.read(*reference.split("/")).resource)
    order["dispenseRequest"].update(numberOfRepeatsAllowed=6, expectedSupplyDuration={"value": 7, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"})
    store.update(*reference.split("/"), order)
    run = worker(store, clock)
    # both versions' deliveries go dead: each stands for the order as it now is
    assert run.drain(max_wait=0).dead == 2
    assert pharmacy.orders() == [order_number(record, "rx-2")]  # the lawful order still went
    dead = [d for d in deliveries(store) if d.state == DeliveryState.DEAD]
    assert {f"{d.resource_type}/{d.resource_id}" for d in dead} == {reference}
    for delivery in dead:
        assert f"NewRx of {reference} version 2 refused" in delivery.last_error
        assert "MedicationRequest.dispenseRequest.numberOfRepeatsAllowed" in delivery.last_error and "at most 5 refills" in delivery.last_error
    refused = outbound(store, reference)
    assert [(s.kind, s.status, s.body) for s in refused] == [("NewRx", "refused", b"")]  # recorded once
    assert "21 CFR 1306.22" in refused[0].detail
    # requeued as it is, it is refused again, and the refusal is not recorded twice
    store.outbox.requeue([d.id for d in dead])
    assert run.drain(max_wait=0).dead == 2
    assert len(outbound(store, reference)) == 1
    assert pharmacy.orders() == [order_number(record, "rx-2")]


def test_a_change_to_an_order_the_pharmacy_holds_is_refused_not_amended(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    changed = copy.deepcopy(example_json)
    changed["prescriptions"][1]["quantity"]["value"] = 90
    changed["prescriptions"][1]["days_supply"] = 45
    save(store, changed)
    assert worker(store, clock).drain(max_wait=0).dead == 1
    dead = next(d for d in deliveries(store) if d.state == DeliveryState.DEAD)
    assert "changed quantity, days_supply after its NewRx" in dead.last_error and "priorPrescription" in dead.last_error
    assert len(pharmacy.received) == 2


# --- CancelRx -------------------------------------------------------------------------------------


def test_a_stopped_order_is_cancelled_once(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    new_rx = {message.header.prescriber_order_number: message for message in pharmacy.received}
    save(store, stop(example_json, "rx-3", "Transferred to an opioid treatment program"))
    assert worker(store, clock).drain(max_wait=0).dead == 0
    cancel = pharmacy.received[-1]
    number = order_number(example_json, "rx-3")
    assert cancel.kind == "CancelRx" and cancel.header.prescriber_order_number == number
    assert cancel.header.relates_to_message_id == new_rx[number].header.message_id
    assert cancel.body.medication.note == "Transferred to an opioid treatment program"
    reference = prescription_ref(store, example_json, "rx-3")
    assert [(s.kind, s.status) for s in outbound(store, reference)] == [("NewRx", "accepted"), ("CancelRx", "accepted")]
    NcpdpChannel(PHARMACY, store).deliver(deliveries(store))  # everything again: nothing new
    assert pharmacy.kinds() == ["NewRx", "NewRx", "CancelRx"]


def test_a_dose_change_sends_the_new_order_and_cancels_the_old(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    record = copy.deepcopy(example_json)
    old = record["prescriptions"][1]
    old.update(status="stopped", status_reason="Dose increased; replaced by rx-5", end="2026-02-02")
    record["prescriptions"].append(
        {**copy.deepcopy(old), "id": "rx-5", "status": "active", "status_reason": None, "end": None, "replaces_id": "rx-2",
         "written": "2026-02-02", "start": "2026-02-02", "dose": {"value": 3, "unit": "{tbl}"}, "quantity": {"value": 90, "unit": "{tbl}"},
         "instructions": "Take 3 tablets by mouth every morning."}
    )  # fmt: skip
    for medication in (record.get("discharge") or {}).get("aftercare", {}).get("medications", []):
        if medication["prescription_id"] == "rx-2":
            medication["prescription_id"] = "rx-5"
    save(store, record)
    assert worker(store, clock).drain(max_wait=0).dead == 0
    later = pharmacy.received[2:]
    assert sorted((message.kind, message.header.prescriber_order_number) for message in later) == sorted(
        [("NewRx", order_number(record, "rx-5")), ("CancelRx", order_number(record, "rx-2"))]
    )
    new_rx = next(message for message in later if message.kind == "NewRx")
    assert new_rx.body.medication.sig_text == "Take 3 tablets by mouth every morning."


def test_an_order_moved_to_another_pharmacy_is_cancelled_at_the_first(store: Store, clock: Any, example_json: JSON) -> None:
    elm = replace(PHARMACY, name="elm-street", ncpdp_id="2230418", base_url="http://elm.test/ncpdp")
    save(store, example_json)
    main, other = Pharmacy(), Pharmacy()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.POST, URL, callback=main)
        mock.add_callback(responses.POST, elm.base_url, callback=other)
        worker(store, clock, PHARMACY, elm).drain(max_wait=0)
        moved = copy.deepcopy(example_json)
        moved["pharmacies"].append({**copy.deepcopy(moved["pharmacies"][0]), "id": "ph-2", "name": "Elm Street Pharmacy", "ncpdp_id": "2230418", "npi": "1245319599"})
        moved["prescriptions"][1]["pharmacy_id"] = "ph-2"
        save(store, moved)
        assert worker(store, clock, PHARMACY, elm).drain(max_wait=0).dead == 0
    number = order_number(example_json, "rx-2")
    assert main.kinds() == ["NewRx", "NewRx", "CancelRx"] and main.received[-1].header.prescriber_order_number == number
    assert main.received[-1].body.medication.note == "Prescription moved to another pharmacy."
    assert [(x.kind, x.header.prescriber_order_number) for x in other.received] == [("NewRx", number)]


def test_a_deleted_order_is_cancelled(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    reference = prescription_ref(store, example_json, "rx-3")
    store.delete(*reference.split("/"))
    assert worker(store, clock).drain(max_wait=0).dead == 0
    assert pharmacy.kinds()[-1] == "CancelRx"
    assert pharmacy.received[-1].body.medication.note == "Prescription withdrawn at the prescriber's system."


def test_a_verify_answer_marks_the_new_rx_verified(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    def verify(message: m.Message) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/xml"}, ncpdp.build(m.verify_for(message.header, message_id=f"v-{message.header.message_id}", sent=SENT))

    pharmacy.answer = verify
    save(store, example_json)
    assert worker(store, clock).drain(max_wait=0).delivered == len(deliveries(store))
    assert {s.status for s in outbound(store)} == {"verified"}


# --- RxHistoryRequest ------------------------------------------------------------------------------


@pytest.fixture
def simulated(store: Store) -> Iterator[PharmacySimulator]:
    """The simulator's core answering at :data:`URL`, filling at once."""
    sim = PharmacySimulator(MAIN_STREET, fill_delay=0, partial=0, not_dispensed=0, seed=1)

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        reply = sim.receive(request.body)
        return reply.status, {"Content-Type": "application/xml"}, reply.body

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.POST, URL, callback=answer)
        yield sim


def patient_id(store: Store, record: JSON) -> str:
    reference = prescription_ref(store, record, "rx-2")
    return store.read(*reference.split("/")).resource["subject"]["reference"].removeprefix("Patient/")


def test_a_history_is_stored_once_however_often_asked(store: Store, clock: Any, simulated: PharmacySimulator, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    assert len(simulated.due()) == 2  # both NewRx filled
    pid = patient_id(store, example_json)
    first = request_history(store, PHARMACY, pid)
    assert (first.answer, first.entries, first.created) == ("RxHistoryResponse", 2, 2)
    kinds = {saved.resource_type for saved in first.saved}
    assert kinds == {"MedicationDispense"}
    dispense = first.saved[0].resource
    assert dispense["subject"] == {"reference": f"Patient/{pid}"} and dispense["identifier"][0]["system"] == FILL_SYSTEM
    again = request_history(store, PHARMACY, pid)
    assert (again.created, again.updated, again.unchanged) == (0, 0, 2)
    kept = [(s.direction, s.kind, s.status, s.patient_key) for s in store.messages.list(kind="RxHistoryRequest") + store.messages.list(kind="RxHistoryResponse")]
    assert sorted(kept) == sorted([("out", "RxHistoryRequest", "answered", f"Patient/{pid}")] * 2 + [("in", "RxHistoryResponse", "processed", f"Patient/{pid}")] * 2)


def test_a_history_answered_later_or_refused(store: Store, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    pid = patient_id(store, example_json)
    later = request_history(store, PHARMACY, pid)  # the fake pharmacy answers Status
    assert (later.answer, later.saved) == ("Status", ())
    assert [s.status for s in store.messages.list(kind="RxHistoryRequest")] == ["accepted"]
    for code, error in (("900", PermanentDeliveryError), ("602", TransientDeliveryError)):
        pharmacy.answer = lambda message, code=code: (200, {"Content-Type": "application/xml"}, error_of(message, code, "No such patient"))
        with pytest.raises(error, match=f"NCPDP Error {code}: No such patient"):
            request_history(store, PHARMACY, pid)
    with pytest.raises(HistoryRefused, match="not a pharmacy"):
        request_history(store, replace(PHARMACY, kind="fhir"), pid)
    lonely = store.create({"resourceType": "Patient", "name": [{"family": "Doe", "given": ["Jo"]}], "gender": "female", "birthDate": "1990-01-01"})
    with pytest.raises(HistoryRefused) as refused:
        request_history(store, PHARMACY, lonely.id)
    assert refused.value.issues[0].location == "prescriber"


# --- answers to the pharmacy's renewal and change requests ----------------------------------------------


def ask(store: Store, pharmacy: Pharmacy, record: JSON, message_id: str, body: Callable[[m.NewRx], Any]) -> JSON:
    """The pharmacy sends ``body`` (made from the NewRx of rx-2 it holds) about rx-2; the review Task it becomes."""
    number = order_number(record, "rx-2")
    held = next(x for x in pharmacy.received if x.kind == "NewRx" and x.header.prescriber_order_number == number)
    header = m.Header(
        message_id=message_id,
        to=held.header.from_,
        from_=m.RoutingId(value=MAIN_STREET, qualifier="P"),
        sent_time=SENT,
        rx_reference_number="RX-7731",
        prescriber_order_number=number,
    )
    answer = inbound.receive(store, ncpdp.build(m.Message(header=header, body=body(held.body))), InboundOptions())
    assert answer.http_status == 200
    (task,) = [s.resource for s in store.search("Task", [("identifier", f"{MAIN_STREET}/{message_id}")]).entries]
    return task


def decide(store: Store, task: JSON, status: str, **more: Any) -> None:
    store.update("Task", task["id"], {**task, "status": status, **more})


def parties(new_rx: m.NewRx) -> dict[str, Any]:
    return {"patient": new_rx.patient, "pharmacy": new_rx.pharmacy, "prescriber": new_rx.prescriber}


def test_an_approved_renewal_is_answered_once(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    task = ask(store, pharmacy, example_json, "renew-1", lambda held: m.RxRenewalRequest(**parties(held), dispensed=held.medication))
    assert worker(store, clock).drain(max_wait=0).dead == 0
    assert pharmacy.kinds() == ["NewRx", "NewRx"]  # still under review: nothing to say
    decide(store, task, "completed")
    assert worker(store, clock).drain(max_wait=0).dead == 0
    answer = pharmacy.received[-1]
    assert answer.kind == "RxRenewalResponse" and answer.body.response.outcome == "Approved"
    assert answer.header.relates_to_message_id == "renew-1" and answer.header.to == m.RoutingId(value=MAIN_STREET, qualifier="P")
    assert answer.header.rx_reference_number == "RX-7731" and answer.body.prescribed.written_date == clock.now.date()
    reference = prescription_ref(store, example_json, "rx-2")
    (kept,) = [s for s in outbound(store) if s.kind == "RxRenewalResponse"]
    assert (kept.status, kept.relates_to, kept.prescription, kept.counterparty) == ("accepted", "renew-1", reference, "main-street")
    # every delivery again, and the Task touched again: the pharmacy is not told twice
    NcpdpChannel(PHARMACY, store).deliver(deliveries(store))
    decide(store, task, "completed", note=[{"text": "Renewed for 3 more months."}])
    assert worker(store, clock).drain(max_wait=0).dead == 0
    assert pharmacy.kinds() == ["NewRx", "NewRx", "RxRenewalResponse"]


def test_a_rejected_change_is_denied_with_the_reason(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    generic = lambda held: m.RxChangeRequest(**parties(held), request_code="G", prescribed=held.medication, requested=(replace(held.medication, description="sertraline 50 MG Oral Capsule"),))  # noqa: E731
    task = ask(store, pharmacy, example_json, "change-1", generic)
    decide(store, task, "rejected", statusReason={"text": "Tablet needed: the dose is split"})
    assert worker(store, clock).drain(max_wait=0).dead == 0
    answer = pharmacy.received[-1]
    assert answer.kind == "RxChangeResponse" and answer.header.relates_to_message_id == "change-1"
    assert (answer.body.response.outcome, answer.body.response.denial_reason) == ("Denied", "Tablet needed: the dose is split")
    assert [(s.kind, s.status) for s in outbound(store) if s.relates_to == "change-1" and s.counterparty == "main-street"] == [("RxChangeResponse", "accepted")]


def test_a_cancelled_review_without_a_reason_names_the_prescribers_note(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    noted = lambda held: m.RxRenewalRequest(**parties(held), dispensed=replace(held.medication, note="Patient asks for 90 days"))  # noqa: E731
    task = ask(store, pharmacy, example_json, "renew-2", noted)
    decide(store, task, "cancelled", note=[*task["note"], {"text": "Discharged from the program; see the aftercare prescriber."}])
    assert worker(store, clock).drain(max_wait=0).dead == 0
    answer = pharmacy.received[-1]
    assert (answer.kind, answer.body.response.outcome) == ("RxRenewalResponse", "Denied")
    assert answer.body.response.denial_reason == "Discharged from the program; see the aftercare prescriber."


def test_tasks_that_answer_no_request_of_this_pharmacy_send_nothing(store: Store, clock: Any, pharmacy: Pharmacy, example_json: JSON) -> None:
    save(store, example_json)
    worker(store, clock).drain(max_wait=0)
    patient = store.read(*prescription_ref(store, example_json, "rx-2").split("/")).resource["subject"]
    store.create({"resourceType": "Task", "status": "completed", "intent": "order", "for": patient, "description": "Call the client"})
    task = ask(store, pharmacy, example_json, "renew-3", lambda held: m.RxRenewalRequest(**parties(held), dispensed=held.medication))
    decide(store, task, "completed")
    elm = replace(PHARMACY, name="elm-street", ncpdp_id="2230418")
    result = worker(store, clock, elm).drain(max_wait=0)  # the request came from main-street, not elm-street
    assert result.dead == 0 and result.delivered == len(deliveries(store, "elm-street")) > 0
    assert pharmacy.kinds() == ["NewRx", "NewRx"]
    assert worker(store, clock).drain(max_wait=0).dead == 0  # main-street: the ad-hoc Task sends nothing, the review its answer
    assert pharmacy.kinds() == ["NewRx", "NewRx", "RxRenewalResponse"]
