"""The delivery worker against a fake channel: batching, backoff, Retry-After, poison isolation,
dead letters, lease expiry, drain and the long-running loop, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iop_fhir.config import ConfigError
from iop_fhir.errors import PermanentDeliveryError, TransientDeliveryError
from iop_fhir.store import Delivery, DeliveryState, Store
from iop_fhir.sync.destinations import Destination, Router
from iop_fhir.sync.worker import (
    PassResult,
    Worker,
    WorkerOptions,
    backoff_delay,
    check_transaction_response,
    default_lease,
)

MRN = "https://iop.example/mrn"
EHR = Destination(name="ehr", kind="fhir", base_url="http://ehr.invalid/fhir", batch_size=10, max_attempts=4, backoff_base=2.0, backoff_max=60.0)


class FakeChannel:
    """Records each batch it is handed; ``fail(batch)`` may raise to simulate the target."""

    def __init__(self, fail: Callable[[Sequence[Delivery]], None] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delivered: list[int] = []
        self.fail = fail
        self.closed = False

    def deliver(self, deliveries: Sequence[Delivery]) -> None:
        self.batches.append([d.id for d in deliveries])
        if self.fail is not None:
            self.fail(deliveries)
        self.delivered += [d.id for d in deliveries]

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def make_store(open_store: Callable[..., Store]) -> Callable[..., Store]:
    def build(*destinations: Destination) -> Store:
        return open_store(router=Router(destinations or (EHR,)))

    return build


def worker_for(store: Store, channel: FakeChannel, *destinations: Destination, **options) -> Worker:
    chosen = destinations or (EHR,)
    options.setdefault("random", random.Random(7))
    options.setdefault("name", "worker-1")
    return Worker(store, {d.name: d for d in chosen}, channels={"fhir": lambda d, s, gate: channel}, **options)


def patient(store: Store, mrn: str) -> str:
    saved = store.create({"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}], "name": [{"family": f"F{mrn}"}]})
    return saved.id


def observe(store: Store, patient_id: str, value: int) -> None:
    store.create(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "PHQ-9"},
            "subject": {"reference": f"Patient/{patient_id}"},
            "valueInteger": value,
        }
    )


def states(store: Store) -> dict[int, DeliveryState]:
    return {d.id: d.state for d in store.outbox.list(limit=1000)}


def transient(retry_after: float | None = None) -> Callable[[Sequence[Delivery]], None]:
    def fail(deliveries: Sequence[Delivery]) -> None:
        raise TransientDeliveryError("503 Service Unavailable", http_status=503, retry_after=retry_after)

    return fail


# --- delivering ----------------------------------------------------------------------------------


def test_a_pass_delivers_one_batch_per_destination_in_order(make_store, clock) -> None:
    store = make_store()
    for n in range(3):
        observe(store, patient(store, str(n)), n)
    channel = FakeChannel()
    result = worker_for(store, channel, replace(EHR, batch_size=4)).run_once()
    assert (result.claimed, result.delivered, result.requests) == (4, 4, 1)
    # deliveries 1-2, 3-4, 5-6 are three patients' Patient + Observation: heads first, then what follows them
    assert channel.batches == [[1, 2, 3, 5]]
    second = worker_for(store, channel, replace(EHR, batch_size=4)).run_once()
    assert second.delivered == 2 and channel.batches[1] == [4, 6]
    assert set(states(store).values()) == {DeliveryState.DELIVERED}
    assert worker_for(store, channel).run_once() == PassResult()  # nothing left: nothing claimed


def test_each_destination_gets_its_own_batches(make_store) -> None:
    other = replace(EHR, name="registry", resources=frozenset({"Patient"}))
    store = make_store(EHR, other)
    observe(store, patient(store, "1"), 5)
    ehr, registry = FakeChannel(), FakeChannel()
    worker = Worker(
        store, {"ehr": EHR, "registry": other}, name="w", channels={"fhir": lambda d, s, gate: ehr if d.name == "ehr" else registry}
    )
    assert worker.run_once().delivered == 3
    by_id = {d.id: d for d in store.outbox.list()}
    assert [by_id[i].destination for i in ehr.delivered] == ["ehr", "ehr"]
    assert [(by_id[i].destination, by_id[i].resource_type) for i in registry.delivered] == [("registry", "Patient")]
    worker.close()
    assert ehr.closed and registry.closed


def test_a_transient_failure_retries_after_full_jitter_backoff(make_store, clock) -> None:
    store = make_store()
    patient(store, "1")
    result = worker_for(store, FakeChannel(transient()), random=random.Random(3)).run_once()
    assert (result.retried, result.delivered, result.dead) == (1, 0, 0)
    (delivery,) = store.outbox.list()
    assert delivery.state == DeliveryState.FAILED and delivery.attempts == 1
    assert "503" in (delivery.last_error or "")
    expected = random.Random(3).uniform(0, EHR.backoff_base)  # first attempt: cap = base
    waited = (delivery.next_attempt_at - clock.now).total_seconds()
    assert expected - 0.01 <= waited <= expected + 0.001


def test_retry_after_is_a_lower_bound(make_store, clock) -> None:
    store = make_store()
    patient(store, "1")
    worker_for(store, FakeChannel(transient(retry_after=45.0))).run_once()
    (delivery,) = store.outbox.list()
    assert (delivery.next_attempt_at - clock.now).total_seconds() >= 44.99


@given(
    attempts=st.integers(1, 40),
    base=st.floats(0.01, 100),
    maximum=st.floats(0.01, 10_000),
    retry_after=st.none() | st.floats(0, 1000),
    seed=st.integers(0, 2**32),
)
def test_backoff_stays_within_its_cap_and_honours_retry_after(attempts, base, maximum, retry_after, seed) -> None:
    destination = replace(EHR, backoff_base=base, backoff_max=maximum)
    delay = backoff_delay(destination, attempts, random.Random(seed), retry_after)
    cap = min(maximum, base * 2 ** (attempts - 1))
    assert delay >= 0
    assert delay <= max(cap, retry_after or 0)
    if retry_after is not None:
        assert delay >= retry_after


def test_after_max_attempts_a_delivery_goes_dead_and_stops_blocking_its_patient(make_store, clock) -> None:
    store = make_store()
    pid = patient(store, "1")
    observe(store, pid, 3)
    poison_id = store.outbox.list()[0].id

    def fail(deliveries: Sequence[Delivery]) -> None:
        if any(d.id == poison_id for d in deliveries):
            raise TransientDeliveryError("timed out", retry_after=None)

    channel = FakeChannel(fail)
    worker = worker_for(store, channel, replace(EHR, batch_size=1), sleep=lambda s: clock.advance(seconds=s))
    result = worker.drain(max_wait=3600)
    assert result.dead == 1 and result.delivered == 1 and result.pending == 0
    assert channel.batches.count([poison_id]) == EHR.max_attempts  # tried exactly max_attempts times
    dead = store.outbox.list(state="dead")
    assert [d.id for d in dead] == [poison_id] and "timed out" in (dead[0].last_error or "")
    assert channel.delivered == [poison_id + 1]  # the patient's next change went once the head was dead


def test_a_poison_delivery_is_isolated_by_splitting_and_the_rest_go_through(make_store, caplog) -> None:
    store = make_store()
    for n in range(9):
        patient(store, str(n))
    poison_id = store.outbox.list()[5].id

    def refuse(deliveries: Sequence[Delivery]) -> None:
        if any(d.id == poison_id for d in deliveries):
            raise PermanentDeliveryError("422 Unprocessable Entity: Patient.birthDate invalid", http_status=422)

    channel = FakeChannel(refuse)
    with caplog.at_level(logging.INFO, logger="iop_fhir.sync"):
        result = worker_for(store, channel).run_once()
    assert (result.claimed, result.delivered, result.dead, result.retried) == (9, 8, 1, 0)
    assert result.requests <= 1 + 2 * 4  # one request, then two per halving level (9 -> 1 in 4 levels)
    assert sorted(channel.delivered) == sorted(set(states(store)) - {poison_id})
    dead = store.outbox.list(state="dead")
    assert [d.id for d in dead] == [poison_id] and "birthDate" in (dead[0].last_error or "") and "HTTP 422" in (dead[0].last_error or "")
    assert any("batch of 9: 8 delivered, 0 to retry, 1 dead" in r.getMessage() for r in caplog.records)


def test_a_transient_failure_while_splitting_holds_back_the_rest_in_patient_order(make_store) -> None:
    store = make_store()
    pid = patient(store, "1")  # delivery 1
    patient(store, "2")  # delivery 2: poison
    observe(store, pid, 1)  # delivery 3: same patient as 1
    observe(store, pid, 2)  # delivery 4
    calls = []

    def fail(deliveries: Sequence[Delivery]) -> None:
        ids = [d.id for d in deliveries]
        calls.append(ids)
        if 2 in ids and len(ids) > 1:
            raise PermanentDeliveryError("refused")
        if ids == [2]:
            raise TransientDeliveryError("the target went away")

    result = worker_for(store, FakeChannel(fail)).run_once()
    # [1,2,3,4] refused -> [1,2] refused -> [1] ok, [2] transient: 3 and 4 (patient of 1) must wait for 2's retry
    assert calls == [[1, 2, 3, 4], [1, 2], [1], [2]]
    assert states(store) == {1: DeliveryState.DELIVERED, 2: DeliveryState.FAILED, 3: DeliveryState.FAILED, 4: DeliveryState.FAILED}
    assert (result.delivered, result.retried, result.dead) == (1, 3, 0)
    held = {d.id: d for d in store.outbox.list(state="failed")}
    assert "held back" in (held[3].last_error or "")


def test_a_destination_backing_off_takes_nothing_new_until_its_retry_is_due(make_store, clock) -> None:
    store = make_store()
    patient(store, "1")
    channel = FakeChannel(transient(retry_after=30.0))
    worker = worker_for(store, channel)
    assert worker.run_once().retried == 1
    patient(store, "2")  # written after the failure; it might refer to what failed
    channel.fail = None
    assert worker.run_once() == PassResult()  # the destination backs off: nothing is claimed
    clock.advance(seconds=31)
    assert worker.run_once().delivered == 2
    assert channel.batches[-1] == [1, 2]  # the failed delivery first, then what came after it


def test_an_unexpected_channel_error_is_retried_not_fatal(make_store) -> None:
    store = make_store()
    patient(store, "1")

    def bug(deliveries: Sequence[Delivery]) -> None:
        raise KeyError("identifier")

    result = worker_for(store, FakeChannel(bug)).run_once()
    assert result.retried == 1
    assert "unexpected KeyError" in (store.outbox.list()[0].last_error or "")


# --- leases --------------------------------------------------------------------------------------


def test_a_killed_workers_deliveries_are_reclaimed_and_delivered_once_its_lease_expires(make_store, clock) -> None:
    store = make_store()
    patient(store, "1")
    patient(store, "2")
    lost = store.outbox.claim("crashed:1", destination="ehr", lease=timedelta(seconds=30))  # it died holding them
    assert len(lost) == 2
    channel = FakeChannel()
    worker = worker_for(store, channel)
    assert worker.run_once().claimed == 0  # still leased
    clock.advance(seconds=31)
    result = worker.run_once()
    assert (result.reclaimed, result.delivered) == (2, 2)
    assert channel.delivered == [d.id for d in lost]


def test_a_delivery_whose_lease_keeps_expiring_goes_dead(make_store, clock) -> None:
    store = make_store(replace(EHR, max_attempts=2))
    patient(store, "1")
    worker = worker_for(store, FakeChannel(), replace(EHR, max_attempts=2))
    for crash in range(2):  # two workers die holding it in turn
        assert len(store.outbox.claim(f"crashing:{crash}", destination="ehr", lease=timedelta(seconds=5))) == 1
        clock.advance(seconds=6)
        if crash == 0:
            assert worker.outbox.reclaim_expired(max_attempts=worker.reclaim_max_attempts) == 1
    assert worker.run_once().reclaimed == 1
    assert store.outbox.list()[0].state == DeliveryState.DEAD


def test_the_default_lease_outlasts_two_requests(make_store, caplog) -> None:
    destination = replace(EHR, connect_timeout=5, read_timeout=30)
    assert default_lease(destination) == timedelta(seconds=80)
    assert worker_for(make_store(), FakeChannel(), destination).lease_for(destination) == timedelta(seconds=80)
    with caplog.at_level(logging.WARNING, logger="iop_fhir.sync"):
        short = worker_for(make_store(), FakeChannel(), destination, lease=timedelta(seconds=3))  # WORKER_LEASE
    assert short.lease_for(destination) == timedelta(seconds=3)
    assert any("shorter than one request's timeouts" in r.getMessage() for r in caplog.records)


def test_a_lease_lost_during_a_split_is_not_delivered_twice(make_store, clock) -> None:
    store = make_store()
    for n in range(4):
        patient(store, str(n))
    thief = Worker(store, {"ehr": EHR}, name="worker-2", channels={"fhir": lambda d, s, gate: FakeChannel()})

    def slow_refusal(deliveries: Sequence[Delivery]) -> None:
        if len(deliveries) == 4:  # the request outlives the lease; another worker takes over
            clock.advance(seconds=default_lease(EHR).total_seconds() + 1)
            assert thief.run_once().delivered == 4
            raise PermanentDeliveryError("refused")

    channel = FakeChannel(slow_refusal)
    result = worker_for(store, channel).run_once()
    assert channel.batches == [[1, 2, 3, 4]]  # no half was sent: the leases were gone
    assert (result.delivered, result.dead, result.lost) == (0, 0, 4)
    assert set(states(store).values()) == {DeliveryState.DELIVERED}


# --- loops ---------------------------------------------------------------------------------------


def test_drain_sleeps_until_the_next_retry_and_stops_when_empty(make_store, clock) -> None:
    store = make_store()
    patient(store, "1")
    patient(store, "2")
    failures = iter([TransientDeliveryError("429", retry_after=20.0, http_status=429)])

    def flaky(deliveries: Sequence[Delivery]) -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds=seconds)

    channel = FakeChannel(flaky)
    result = worker_for(store, channel, sleep=sleep, poll=30.0).drain(max_wait=60)
    assert (result.delivered, result.retried, result.pending, result.dead) == (2, 2, 0, 0)
    assert len(slept) == 1 and 19.9 <= slept[0] <= 20.1  # straight to the Retry-After, no busy polling
    assert channel.batches == [[1, 2], [1, 2]]


def test_drain_leaves_what_is_not_due_within_max_wait(make_store, clock) -> None:
    store = make_store()
    patient(store, "1")
    worker = worker_for(store, FakeChannel(transient(retry_after=600.0)), sleep=lambda s: clock.advance(seconds=s))
    result = worker.drain(max_wait=10)
    assert (result.retried, result.pending, result.left) == (1, 1, {"ehr": 1})
    assert result.passes == 2  # the second pass found nothing due before the deadline


def test_run_delivers_until_stopped(make_store) -> None:
    store = make_store()
    patient(store, "1")
    stop = threading.Event()
    channel = FakeChannel()

    def deliver_then_stop(deliveries: Sequence[Delivery]) -> None:
        stop.set()  # as SIGTERM would, mid-batch: the batch in hand still finishes

    channel.fail = deliver_then_stop
    thread = threading.Thread(target=worker_for(store, channel, poll=0.01).run, args=(stop,))
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert store.outbox.list()[0].state == DeliveryState.DELIVERED


def test_disabled_and_unsupported_destinations_are_skipped(make_store, caplog) -> None:
    pharmacy = replace(EHR, name="pharmacy", kind="ncpdp", ncpdp_id="1234567")
    with caplog.at_level(logging.WARNING, logger="iop_fhir.sync"):
        worker = worker_for(make_store(), FakeChannel(), EHR, pharmacy, replace(EHR, name="old", enabled=False))
    assert list(worker.destinations) == ["ehr"]
    assert any("no channel delivers kind 'ncpdp'" in r.getMessage() for r in caplog.records)


# --- settings and responses ---------------------------------------------------------------------


def test_worker_settings_are_checked() -> None:
    options = WorkerOptions.from_settings({"WORKER_LEASE": 3, "WORKER_POLL": 0.5, "WORKER_NAME": "box:1"})
    assert options == WorkerOptions(timedelta(seconds=3), 0.5, "box:1")
    assert WorkerOptions.from_settings({}).lease is None
    for bad in ({"WORKER_LEASE": 0}, {"WORKER_POLL": "soon"}, {"WORKER_LEASE": True}, {"WORKER_NAME": ""}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            WorkerOptions.from_settings(bad)


def _response(*statuses: str) -> dict:
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": [{"response": {"status": s}} for s in statuses]}


def test_a_transaction_response_must_answer_every_entry_with_2xx() -> None:
    check_transaction_response(_response("200 OK", "201 Created"), 2)
    refused = _response("201 Created", "422 Unprocessable Entity")
    refused["entry"][1]["response"]["outcome"] = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "bad code"}]}
    with pytest.raises(PermanentDeliveryError, match=r"1 of 2 entries: entry\[1\] 422 Unprocessable Entity \(bad code\)"):
        check_transaction_response(refused, 2)
    with pytest.raises(PermanentDeliveryError, match="1 entries for 2 requests"):
        check_transaction_response(_response("200 OK"), 2)
    with pytest.raises(PermanentDeliveryError, match="'OperationOutcome'"):
        check_transaction_response({"resourceType": "OperationOutcome"}, 1)


def test_scheduled_pulls_run_on_their_interval(tmp_path, monkeypatch) -> None:
    """``run`` pulls from ``pull = true`` FHIR destinations, then again only after ``pull_interval``."""
    from iop_fhir.store import Store
    from iop_fhir.sync import worker as worker_module
    from iop_fhir.sync.destinations import load_destinations
    from iop_fhir.sync.pull import PullResult

    destinations = load_destinations(
        {
            "destination": [
                {"name": "ehr", "kind": "fhir", "base_url": "http://127.0.0.1:9/fhir", "pull": True, "pull_interval": 3600},
                {"name": "quiet", "kind": "fhir", "base_url": "http://127.0.0.1:9/fhir"},
            ]
        }
    )
    calls: list[str] = []

    def fake_pull(store, destination, client):
        calls.append(destination.name)
        return PullResult(destination.name)

    monkeypatch.setattr(worker_module, "pull", fake_pull)
    with Store.open(f"sqlite:///{tmp_path / 's.sqlite'}") as store, worker_module.Worker(store, destinations) as w:
        assert set(w.pull_due()) == {"ehr"}
        assert w.pull_due() == {}  # not due again within the interval
    assert calls == ["ehr"]
