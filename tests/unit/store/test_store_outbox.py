"""The outbox: written atomically with each change, and the queue API the sync worker uses."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from iop_fhir.errors import NotFound
from iop_fhir.store import DeliveryState, Store
from iop_fhir.store import resources as store_resources
from iop_fhir.store.tables import outbox, resource_current, resource_version


def observation(patient: str, code: str = "x") -> dict:
    return {"resourceType": "Observation", "status": "final", "code": {"text": code}, "subject": {"reference": patient}}


def rows(store: Store, table) -> int:
    with store.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(table))


def test_rows_are_written_with_each_change(store: Store, make_patient) -> None:
    p = store.update("Patient", "p1", make_patient(), deliver_to=["ehr", "pharmacy", "ehr"])
    obs = store.create(observation("Patient/p1"), deliver_to=["ehr"])
    store.update("Observation", obs.id, observation("Patient/p1"), deliver_to=["ehr"])  # no-op: nothing
    store.delete("Observation", obs.id, deliver_to=["ehr"])
    store.create(observation("Patient/p1"), deliver_to=())
    got = [
        (d.destination, d.resource_type, d.version_id, d.action, d.patient_key, d.state) for d in store.outbox.list()
    ]
    assert got == [
        ("ehr", "Patient", 1, "upsert", "Patient/p1", DeliveryState.QUEUED),
        ("pharmacy", "Patient", 1, "upsert", "Patient/p1", DeliveryState.QUEUED),
        ("ehr", "Observation", 1, "upsert", "Patient/p1", DeliveryState.QUEUED),
        ("ehr", "Observation", 2, "delete", "Patient/p1", DeliveryState.QUEUED),
    ]
    first = store.outbox.list(limit=1)[0]
    assert first.data == p.data and store.outbox.list(state="queued", after_id=first.id)[-1].data is None


def test_the_router_decides_when_the_caller_does_not(open_store: Callable[..., Store], make_patient) -> None:
    seen = []

    def router(resource_type: str, resource: dict, patient_key: str | None) -> list[str]:
        seen.append((resource_type, resource.get("id")))
        return ["ehr"] if resource_type == "Patient" else []

    store = open_store(router=router)
    store.update("Patient", "p1", make_patient())
    store.create(observation("Patient/p1"))
    store.update("Patient", "p2", make_patient("2"), deliver_to=["other"])
    store.delete("Patient", "p1")
    assert [(d.destination, d.resource_id, d.action) for d in store.outbox.list()] == [
        ("ehr", "p1", "upsert"),
        ("other", "p2", "upsert"),
        ("ehr", "p1", "delete"),
    ]
    assert seen[0] == ("Patient", "p1") and seen[-1] == ("Patient", "p1")  # a delete sees the last content


def test_a_failure_mid_write_stores_neither_version_nor_delivery(
    store: Store, make_patient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.update("Patient", "p1", make_patient(), deliver_to=["ehr"])

    def broken(conn, destinations, **kwargs):
        conn.execute(
            outbox.insert().values(  # half a delivery row is written, then the failure
                created=kwargs["now"],
                destination="ehr",
                resource_type=kwargs["resource_type"],
                resource_id=kwargs["resource_id"],
                version_id=kwargs["version_id"],
                action=kwargs["action"],
                state="queued",
                attempts=0,
                next_attempt_at=kwargs["now"],
                updated_at=kwargs["now"],
            )
        )
        raise OSError("disk full")

    monkeypatch.setattr(store_resources, "enqueue", broken)
    with pytest.raises(OSError):
        store.update("Patient", "p1", make_patient(family="B"), deliver_to=["ehr"])
    with pytest.raises(OSError):
        store.create(observation("Patient/p1"), deliver_to=["ehr"])
    with pytest.raises(OSError), store.unit() as uow:
        uow.update("Patient", "p2", make_patient("2"), deliver_to=["ehr"])
    assert store.read("Patient", "p1").version == 1
    with pytest.raises(NotFound):
        store.read("Patient", "p2")
    assert (rows(store, resource_version), rows(store, resource_current), rows(store, outbox)) == (1, 1, 1)
    assert store.search("Patient", [("family", "B")]).entries == []


def test_claim_lease_and_complete(store: Store, clock) -> None:
    for i in range(3):
        store.create(observation(f"Patient/p{i}"), deliver_to=["ehr", "aftercare"])
    claimed = store.outbox.claim("w1", destination="ehr", limit=10, lease=timedelta(seconds=30))
    assert [d.patient_key for d in claimed] == ["Patient/p0", "Patient/p1", "Patient/p2"]
    assert all(d.state is DeliveryState.IN_FLIGHT and d.attempts == 1 and d.lease_owner == "w1" for d in claimed)
    assert claimed[0].lease_expires_at == clock.now + timedelta(seconds=30)  # the claim read the clock last
    assert store.outbox.claim("w2", destination="ehr") == []  # all leased
    ids = [d.id for d in claimed]
    assert store.outbox.heartbeat("w1", ids) == 3
    assert store.outbox.delivered("w2", ids) == 0  # not w2's lease
    assert store.outbox.delivered("w1", ids[:2]) == 2
    stats = store.outbox.stats()
    assert (stats["ehr"].delivered, stats["ehr"].in_flight, stats["aftercare"].queued) == (2, 1, 3)
    assert stats["ehr"].last_success is not None and stats["ehr"].oldest_pending is not None


def test_one_patient_in_order(store: Store) -> None:
    a1 = store.create(observation("Patient/a", "1"), deliver_to=["ehr"])
    b1 = store.create(observation("Patient/b", "1"), deliver_to=["ehr"])
    a2 = store.create(observation("Patient/a", "2"), deliver_to=["ehr"])
    a3 = store.create(observation("Patient/a", "3"), deliver_to=["ehr"])
    loose = store.create({"resourceType": "Basic", "code": {"text": "no patient"}}, deliver_to=["ehr"])

    first = store.outbox.claim("w1", limit=2)
    assert [d.resource_id for d in first] == [a1.id, b1.id]  # heads only when room is short
    # a's next deliveries wait behind its in-flight head; the patientless one is free
    second = store.outbox.claim("w2", limit=10)
    assert [d.resource_id for d in second] == [loose.id]
    store.outbox.delivered("w1", [first[0].id])
    third = store.outbox.claim("w2", limit=10)
    assert [d.resource_id for d in third] == [a2.id, a3.id]  # head and the one behind it, in order


def test_a_shared_party_held_or_failed_is_a_barrier(store: Store, clock) -> None:
    """What was written after a practitioner may refer to it: it must not reach the target first."""
    party = store.create({"resourceType": "Basic", "code": {"text": "a practitioner"}}, deliver_to=["ehr"])
    after = store.create(observation("Patient/a", "1"), deliver_to=["ehr"])
    other = store.create(observation("Patient/b", "1"), deliver_to=["other"])
    held = store.outbox.claim("w1", destination="ehr", limit=1)
    assert [d.resource_id for d in held] == [party.id]
    assert store.outbox.claim("w2", destination="ehr") == []  # the party is in flight elsewhere
    assert [d.resource_id for d in store.outbox.claim("w2", destination="other")] == [other.id]  # per destination
    store.outbox.retry("w1", [held[0].id], error="503", at=clock.now + timedelta(seconds=60))
    assert store.outbox.claim("w2", destination="ehr") == []  # it waits for its retry: still a barrier
    clock.advance(seconds=61)
    again = store.outbox.claim("w2", destination="ehr", limit=10)
    assert [d.resource_id for d in again] == [party.id]  # due again: it goes first, alone
    store.outbox.dead_letter("w2", [again[0].id], error="refused")
    assert [d.resource_id for d in store.outbox.claim("w3", destination="ehr")] == [after.id]  # a dead party no longer blocks


def test_retry_backoff_and_dead_letter(store: Store, clock) -> None:
    a1 = store.create(observation("Patient/a", "1"), deliver_to=["ehr"])
    a2 = store.create(observation("Patient/a", "2"), deliver_to=["ehr"])
    (head,) = store.outbox.claim("w", limit=1)
    assert head.resource_id == a1.id
    assert store.outbox.retry("w", [head.id], error="503 from target", at=clock.now + timedelta(minutes=1)) == 1
    assert store.outbox.claim("w") == []  # a1 not due yet, and a2 waits behind it
    clock.advance(minutes=2)
    again = store.outbox.claim("w")
    assert [(d.resource_id, d.attempts) for d in again] == [(a1.id, 2), (a2.id, 1)]
    assert store.outbox.dead_letter("w", [again[0].id], error="422: invalid") == 1
    store.outbox.retry("w", [again[1].id], error="timeout", at=clock.now)
    (after,) = store.outbox.claim("w")
    assert after.resource_id == a2.id  # a dead delivery does not block its patient
    assert store.outbox.stats()["ehr"].dead == 1 and store.outbox.stats()["ehr"].last_error == "timeout"


def test_expired_leases_are_reclaimed(store: Store, clock) -> None:
    store.create(observation("Patient/a"), deliver_to=["ehr"])
    store.create(observation("Patient/b"), deliver_to=["ehr"])
    first = store.outbox.claim("crashed", lease=timedelta(seconds=10))
    assert store.outbox.reclaim_expired() == 0
    clock.advance(seconds=11)
    assert store.outbox.reclaim_expired() == 2
    second = store.outbox.claim("w2", lease=timedelta(seconds=10))
    assert [d.id for d in second] == [d.id for d in first] and second[0].attempts == 2
    assert store.outbox.delivered("crashed", [d.id for d in first]) == 0  # its lease is gone
    clock.advance(seconds=11)
    assert store.outbox.reclaim_expired(max_attempts=2) == 2
    assert [d.state for d in store.outbox.list()] == [DeliveryState.DEAD, DeliveryState.DEAD]


def test_requeue_discard_and_purge(store: Store, clock) -> None:
    for p in "abc":
        store.create(observation(f"Patient/{p}"), deliver_to=["ehr"])
    claimed = store.outbox.claim("w")
    store.outbox.dead_letter("w", [d.id for d in claimed[:2]], error="bad")
    store.outbox.delivered("w", [claimed[2].id])
    assert store.outbox.requeue([claimed[0].id]) == 1
    assert store.outbox.discard(destination="ehr") == 1
    (requeued,) = store.outbox.claim("w")
    assert requeued.id == claimed[0].id and requeued.attempts == 1
    clock.advance(days=8)
    assert store.outbox.purge_delivered(before=clock.now - timedelta(days=7)) == 1
    assert [d.id for d in store.outbox.list()] == [claimed[0].id]


def test_parallel_workers_never_share_a_delivery(store: Store) -> None:
    for i in range(60):
        store.create(observation(f"Patient/p{i % 7}", str(i)), deliver_to=["ehr"])
    taken: dict[str, list[int]] = {}
    order: list[tuple[str | None, int]] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            batch = store.outbox.claim(name, limit=5)
            if not batch:
                if not store.outbox.list(state="queued"):
                    return
                continue
            with lock:
                taken.setdefault(name, []).extend(d.id for d in batch)
                order.extend((d.patient_key, d.id) for d in batch)
            store.outbox.delivered(name, [d.id for d in batch])

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for ids in taken.values() for i in ids]
    assert sorted(every) == sorted(set(every)) and len(every) == 60
    for patient in {p for p, _ in order}:
        ids = [i for p, i in order if p == patient]
        assert ids == sorted(ids), patient  # each patient's deliveries went out in order
