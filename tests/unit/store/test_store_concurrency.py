"""Races: parallel conditional creates, duplicate identifiers, concurrent updates of one resource."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from iop_fhir.errors import PreconditionFailed, VersionConflict
from iop_fhir.store import Saved, Store, UnitOfWork
from iop_fhir.store.tables import identifier

MRN = "https://iop.example/mrn"
PARALLEL = 20


def in_parallel(fn: Callable[[int], object], n: int = PARALLEL) -> list[object]:
    """Run ``fn(0..n-1)`` on n threads at once; exceptions come back as values."""

    def call(i: int) -> object:
        try:
            return fn(i)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


def identifier_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(identifier))


def test_parallel_conditional_creates_make_one_resource(store: Store, make_patient) -> None:
    results = in_parallel(lambda i: store.create(make_patient("42"), if_none_exist=f"identifier={MRN}|42"))
    assert all(isinstance(r, Saved) for r in results), results
    assert len({r.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert store.count("Patient") == 1 and identifier_rows(store) == 1


def test_parallel_conditional_creates_with_differently_written_criteria(store: Store, make_patient) -> None:
    # Different criteria strings take different locks: the unique identifier constraint decides.
    forms = [f"identifier={MRN}|42", f"identifier={MRN}|42&gender:missing=true", f"identifier={MRN}|42,{MRN}|42"]
    results = in_parallel(lambda i: store.create(make_patient("42"), if_none_exist=forms[i % 3]))
    assert all(isinstance(r, Saved) for r in results), results
    assert len({r.id for r in results}) == 1 and sum(r.created for r in results) == 1
    assert store.count("Patient") == 1


def test_parallel_plain_creates_with_one_identifier(store: Store, make_patient) -> None:
    results = in_parallel(lambda i: store.create(make_patient("7")))
    created = [r for r in results if isinstance(r, Saved)]
    assert len(created) == 1
    assert all(isinstance(r, VersionConflict) for r in results if r not in created)
    assert store.count("Patient") == 1


def test_parallel_conditional_updates_make_one_resource(store: Store, make_patient) -> None:
    results = in_parallel(
        lambda i: store.conditional_update("Patient", f"identifier={MRN}|9", make_patient("9", family=f"F{i}"))
    )
    assert all(isinstance(r, Saved) for r in results), results
    assert len({r.id for r in results}) == 1 and sum(r.created for r in results) == 1
    assert sorted(r.version for r in results) == list(range(1, PARALLEL + 1))


def test_concurrent_updates_are_serialised(store: Store, make_patient) -> None:
    # create-on-update of one new id from many threads, then more updates: no version lost
    results = in_parallel(lambda i: store.update("Patient", "p1", make_patient(family=f"F{i}")))
    assert sorted(r.version for r in results) == list(range(1, PARALLEL + 1))
    assert sum(r.created for r in results) == 1
    history = store.history("Patient", "p1", count=100).entries
    assert [e.version for e in history] == list(range(PARALLEL, 0, -1))


def test_if_match_read_modify_write_counts_every_increment(store: Store) -> None:
    store.update("Basic", "counter", {"resourceType": "Basic", "code": {"text": "0"}})

    def increment(_: int) -> int:
        while True:
            current = store.read("Basic", "counter")
            value = int(current.resource["code"]["text"]) + 1
            try:
                store.update(
                    "Basic",
                    "counter",
                    {"resourceType": "Basic", "code": {"text": str(value)}},
                    if_match=current.version,
                )
                return value
            except PreconditionFailed:
                continue

    results = in_parallel(increment, 10)
    assert sorted(results) == list(range(1, 11))
    assert store.read("Basic", "counter").resource["code"]["text"] == "10"


def _create_in_child(url: str) -> tuple[str, bool]:
    store = Store.open(url)
    try:
        patient = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "proc"}]}
        saved = store.create(patient, if_none_exist=f"identifier={MRN}|proc")
        return saved.id, saved.created
    finally:
        store.close()


def test_parallel_conditional_creates_from_processes(store_url: str, store: Store) -> None:
    store.engine.dispose()  # no pooled connection crosses the fork
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_create_in_child, [store_url] * 8)
    assert len({id for id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert store.count("Patient") == 1


def test_parallel_opens_of_a_new_database_migrate_once(database_url: str) -> None:
    stores = in_parallel(lambda i: Store.open(database_url), 6)
    try:
        assert all(isinstance(s, Store) for s in stores), stores
        stores[0].create({"resourceType": "Basic", "code": {"text": "x"}})
        assert stores[-1].count("Basic") == 1
    finally:
        for s in stores:
            if isinstance(s, Store):
                s.close()


def test_transactions_survive_a_deadlock(store: Store, make_patient) -> None:
    if store.dialect == "sqlite":
        pytest.skip("SQLite runs one unit of work at a time: no deadlock to survive")
    store.update("Patient", "a", make_patient("a"))
    store.update("Patient", "b", make_patient("b"))
    both_hold_one, met = threading.Barrier(2), threading.Event()

    def cross(first: str, second: str) -> Callable[[UnitOfWork], None]:
        def body(uow: UnitOfWork) -> None:
            uow.update("Patient", first, make_patient(first, family=f"by-{first}"))
            if not met.is_set():  # the first attempts meet here, each holding one; a retry goes on
                with contextlib.suppress(threading.BrokenBarrierError):
                    both_hold_one.wait(timeout=5)
                met.set()
            uow.update("Patient", second, make_patient(second, family=f"by-{first}"))

        return body

    results = in_parallel(lambda i: store.transaction(cross(*("ab" if i == 0 else "ba"))), 2)
    assert results == [None, None]
    assert {store.read("Patient", p).version for p in "ab"} == {3}
