"""The append queue: write-once resources (the audit trail) stored now, indexed later, and
never missing from an answer; server-assigned ids that sort by time; the SQLite writer queue."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import threading
import time
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import func, insert, select

from iop_fhir.errors import VersionConflict
from iop_fhir.store import Store, db, new_id
from iop_fhir.store.tables import append_queue, identifier, search_reference


def event(n: int, patient: str = "Patient/p1") -> dict:
    return {
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "recorded": f"2026-01-15T09:00:{n:02d}Z",
        "agent": [{"requestor": True, "altId": f"client-{n}"}],
        "source": {"observer": {"display": "gw"}},
        "entity": [{"what": {"reference": patient}}, {"what": {"reference": f"Observation/o{n}/_history/1"}}],
    }


def queued(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(append_queue)))


def indexed_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(search_reference).where(search_reference.c.resource_type == "AuditEvent")))


def test_queued_resources_wait_unindexed_until_a_read_of_their_type_catches_up(store: Store) -> None:
    assert store.append([event(n) for n in range(3)], index_later=True) == 3
    assert queued(store) == 3 and store.appended_backlog() == 3
    assert indexed_rows(store) == 0  # no search-index work on the way in
    found = store.search("AuditEvent", [("entity", "Patient/p1")], count=10).entries
    assert sorted(s.resource["agent"][0]["altId"] for s in found) == ["client-0", "client-1", "client-2"]
    assert queued(store) == 0 and store.appended_backlog() == 0 and indexed_rows(store) == 9  # entity x2, patient


@pytest.mark.parametrize(
    "ask",
    [
        lambda store, id: store.read("AuditEvent", id).id,
        lambda store, id: store.vread("AuditEvent", id, 1).id,
        lambda store, id: [s.id for s in store.read_many("AuditEvent", [id])][0],
        lambda store, id: store.history("AuditEvent", id).entries[0].id,
        lambda store, id: store.history("AuditEvent").entries[0].id,
        lambda store, id: [s.id for s in store.search("AuditEvent", [("_id", id)]).entries][0],
        lambda store, id: store.count("AuditEvent", [("_id", id)]) and id,
    ],
    ids=["read", "vread", "read_many", "history-instance", "history-type", "search", "count"],
)
def test_every_kind_of_read_sees_what_is_queued(store: Store, ask) -> None:
    store.append([event(1)], index_later=True)
    with store.engine.connect() as conn:
        (id,) = conn.execute(select(append_queue.c.id)).scalars().all()
    assert ask(store, id) == id
    assert queued(store) == 0


def test_a_queued_resource_is_final_the_same_id_meta_and_bytes_once_indexed(store: Store, clock) -> None:
    store.append([event(1)], index_later=True)
    with store.engine.connect() as conn:
        (row,) = conn.execute(select(append_queue.c.id, append_queue.c.data)).all()
    saved = store.read("AuditEvent", row.id)
    assert saved.data == bytes(row.data)
    assert saved.resource["meta"] == {"versionId": "1", "lastUpdated": saved.resource["meta"]["lastUpdated"]}
    assert saved.last_updated == clock.now


def test_index_appended_works_oldest_first_in_bounded_steps(store: Store) -> None:
    store.append([event(n) for n in range(5)], index_later=True)
    assert store.index_appended(2) == 2
    assert queued(store) == 3
    with store.engine.connect() as conn:
        left = conn.execute(select(append_queue.c.data).order_by(append_queue.c.seq)).scalars().all()
    assert [b'"client-2"' in bytes(d) for d in left] == [True, False, False]  # the two oldest went first
    assert store.index_appended() == 3 and store.index_appended() == 0


def test_only_the_append_only_types_may_wait(store: Store) -> None:
    with pytest.raises(ValueError, match="only AuditEvent can be indexed later"):
        store.append([{"resourceType": "Observation", "status": "final"}], index_later=True)
    assert queued(store) == 0


def test_in_a_unit_of_work_the_queued_row_commits_or_rolls_back_with_the_unit(store: Store, make_patient) -> None:
    with pytest.raises(RuntimeError):
        with store.unit() as uow:
            uow.create(make_patient())
            uow.append([event(1)], index_later=True)
            raise RuntimeError("the write failed")
    assert queued(store) == 0 and store.count("Patient") == 0
    with store.unit() as uow:
        uow.append([event(2)], index_later=True)
        assert uow.count("AuditEvent") == 1  # the unit sees its own queued event
    assert store.count("AuditEvent") == 1 and queued(store) == 0


def test_appended_ids_are_uuid7_and_sort_by_time_care_data_keeps_random_ids(store: Store, make_patient) -> None:
    first = new_id()
    time.sleep(0.002)
    second = new_id()
    parsed = uuid.UUID(first)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert first < second  # the millisecond prefix orders them
    assert abs(int(first.replace("-", "")[:12], 16) / 1000 - time.time()) < 60
    assert len({new_id() for _ in range(10_000)}) == 10_000
    store.append([event(1)])
    assert uuid.UUID(store.search("AuditEvent").entries[0].id).version == 7
    # a Patient id must not tell when someone was admitted
    assert uuid.UUID(store.create(make_patient()).id).version == 4


def test_a_number_beyond_a_double_is_still_read_and_indexed(store: Store) -> None:
    huge = Decimal("1e400")  # a FHIR decimal; orjson refuses it
    saved = store.create({"resourceType": "Observation", "status": "final", "valueQuantity": {"value": huge}, "subject": {"reference": "Patient/p1"}})
    assert store.read("Observation", saved.id).view["subject"] == {"reference": "Patient/p1"}
    store.append([{**event(1), "extension": [{"url": "http://x/n", "valueDecimal": huge}]}], index_later=True)
    assert store.count("AuditEvent", [("entity", "Patient/p1")]) == 1


def test_a_catch_up_ends_at_what_was_queued_when_it_began(store: Store, monkeypatch) -> None:
    store.append([event(1)], index_later=True)
    calls = []
    real = store.index_appended

    def index_and_queue_more(*args, **kwargs):
        calls.append(kwargs.get("up_to"))
        store.append([event(2)], index_later=True)  # events keep coming while it runs
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "index_appended", index_and_queue_more)
    assert store.count("AuditEvent") == 1  # the one queued before the read; not the late one
    assert calls and calls[0] is not None and queued(store) == 1


# --- the SQLite writer queue ------------------------------------------------------------------


def _hold_write_lock(url: str, ready, release) -> None:
    store = Store.open(url)
    with db.writing(store.engine):
        ready.set()
        release.wait(10)
    store.close()


def _enter_writer_queue(store: Store, entered) -> None:
    with db._write_lock(store.engine):
        entered.set()


def test_a_writer_of_another_process_waits_for_the_lock_and_is_not_refused(tmp_path, make_patient) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    store = Store.open(url)
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_write_lock, args=(url, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        probe = os.open(str(tmp_path / "w.db.lock"), os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # the holder's lock is the lock file's, not only SQLite's
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
        threading.Timer(0.3, release.set).start()
        started = time.perf_counter()
        saved = store.create(make_patient())  # queues on the lock file until the holder commits
        assert saved.created and time.perf_counter() - started >= 0.25
    finally:
        release.set()
        holder.join(10)
    assert holder.exitcode == 0 and (tmp_path / "w.db.lock").exists()
    store.close()


def test_a_process_forked_while_the_lock_is_held_queues_behind_its_parent(tmp_path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'w.db'}")
    context = multiprocessing.get_context("fork")
    entered = context.Event()
    with db.writing(store.engine):
        # the child inherits the engine, the held thread lock and the open lock file: none may
        # let it in while the parent writes (flock belongs to the open file, not the process)
        child = context.Process(target=_enter_writer_queue, args=(store, entered))
        child.start()
        assert not entered.wait(0.5)
    assert entered.wait(10)
    child.join(10)
    assert child.exitcode == 0
    store.close()


# --- units that fail as a whole, and a page's patients ------------------------------------------


def test_an_all_or_nothing_unit_rolls_back_whole_when_an_operation_fails(store: Store, make_patient) -> None:
    store.create(make_patient("held"), id="p-held")
    with pytest.raises(Exception, match="identifier"):
        with store.unit(all_or_nothing=True) as uow:
            uow.create(make_patient("new"), id="p-new")
            uow.create(make_patient("held"), id="p-clash")  # the identifier belongs to p-held
    assert store.count("Patient") == 1  # p-new went with the unit
    with store.unit(all_or_nothing=True) as uow:
        uow.create(make_patient("new"), id="p-new")
        uow.update("Patient", "p-new", make_patient("new", active=False))
    assert store.read("Patient", "p-new").version == 2


def test_an_all_or_nothing_unit_answers_a_violated_constraint_as_a_conflict(store: Store) -> None:
    def claim(holder: str):
        return insert(identifier).values(resource_type="Patient", system="urn:s", value="v", resource_id=holder)

    # SQLite (no savepoints, the write lock held): a conflict with what is stored; PostgreSQL
    # keeps its savepoints and retries, then calls it a lost race
    with pytest.raises(VersionConflict, match="uniqueness constraint" if store.dialect == "sqlite" else "concurrent write"):
        with store.unit(all_or_nothing=True) as uow:
            uow._writing(lambda w: w.conn.execute(claim("p1")))
            uow._writing(lambda w: w.conn.execute(claim("p2")))  # the same identifier again
    assert store.count("Patient") == 0


def test_patient_ids_reads_the_compartment_of_the_versions_shown_from_the_index(store: Store, make_patient) -> None:
    store.create(make_patient("1"), id="p1")
    store.create(make_patient("2"), id="p2")
    obs = [store.create({"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{p}"}}) for p in ("p1", "p2")]
    unattached = store.create({"resourceType": "Observation", "status": "final"})
    shown = {o.id: 1 for o in [*obs, unattached]}
    assert store.patient_ids("Observation", shown) == {obs[0].id: {"p1"}, obs[1].id: {"p2"}, unattached.id: set()}
    # moved to another patient after the page was read: not answered from the index
    store.update("Observation", obs[0].id, {"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/p2"}})
    store.delete("Observation", obs[1].id)
    assert store.patient_ids("Observation", shown) == {unattached.id: set()}
    assert store.patient_ids("Patient", {"p1": 1, "p2": 1}) == {"p1": {"p1"}, "p2": {"p2"}}
    assert store.patient_ids("Organization", {"o1": 1}) == {"o1": set()} and store.patient_ids("Observation", {}) == {}


def test_a_search_page_brings_the_patients_of_its_entries_from_the_index(store: Store, make_patient) -> None:
    store.create(make_patient("1"), id="p1")
    store.create(make_patient("2"), id="p2")
    for p in ("p1", "p2"):
        store.create({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "urn:t", "code": "x"}]}, "subject": {"reference": f"Patient/{p}"}})
    store.create({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "urn:t", "code": "x"}]}, "subject": {"reference": "Group/g1"}})
    # an id with a space is not a FHIR id, yet nothing stops a reference from naming one
    store.create({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "urn:t", "code": "x"}]}, "subject": {"reference": "Patient/a b"}})
    page = store.search("Observation", [("code", "urn:t|x")], count=10).entries
    assert sorted(sorted(e.patients) for e in page) == [[], ["a b"], ["p1"], ["p2"]]
    assert {e.id: set(e.patients) for e in page} == store.patient_ids("Observation", {e.id: e.version for e in page})
    assert {e.id: e.patients for e in store.search("Patient", count=10).entries} == {"p1": {"p1"}, "p2": {"p2"}}
    store.create({"resourceType": "Organization", "name": "clinic"})
    assert [e.patients for e in store.search("Organization", count=10).entries] == [frozenset()]
    assert store.read("Observation", page[0].id).patients is None  # a read does not ask for them


def test_closing_the_store_closes_its_lock_file(tmp_path, make_patient) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    store.create(make_patient())
    queue = db._WRITE_LOCKS[store.engine]
    assert queue._fd is not None
    store.close()
    assert queue._fd is None and store.engine not in db._WRITE_LOCKS


# --- WAL checkpoints off the writers' path --------------------------------------------------------


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_writes_reach_the_database_file_through_the_background_checkpoint(tmp_path, make_patient) -> None:
    path = tmp_path / "k.db"
    store = Store.open(f"sqlite:///{path}")
    with store.engine.connect() as conn:  # SQLite's own checkpoint only as a backstop
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == db.WAL_BACKSTOP_PAGES
    before = path.stat().st_size
    for n in range(200):
        store.create(make_patient(str(n)))
    # the pages are copied from the WAL into the file by the process's checkpoint thread,
    # within about CHECKPOINT_INTERVAL_S, while the store stays open
    assert _wait_for(lambda: path.stat().st_size > before + 100_000)
    checkpointer = db._WAL_CHECKPOINTERS[store.engine]
    thread = checkpointer._thread
    assert thread is not None and thread.is_alive()
    store.close()
    assert not thread.is_alive() and store.engine not in db._WAL_CHECKPOINTERS


def test_the_checkpoint_thread_ends_when_the_process_stops_writing(tmp_path, make_patient, monkeypatch) -> None:
    monkeypatch.setattr(db, "CHECKPOINT_IDLE_S", 0.3)
    store = Store.open(f"sqlite:///{tmp_path / 'idle.db'}")
    store.create(make_patient("1"))
    checkpointer = db._WAL_CHECKPOINTERS[store.engine]
    first = checkpointer._thread
    assert first is not None
    assert _wait_for(lambda: not first.is_alive(), 5) and checkpointer._thread is None
    store.create(make_patient("2"))  # writing again starts another
    assert checkpointer._thread is not None and checkpointer._thread is not first
    store.close()


def test_a_store_written_again_after_close_checkpoints_again(tmp_path, make_patient) -> None:
    path = tmp_path / "again.db"
    store = Store.open(f"sqlite:///{path}")
    store.create(make_patient("1"))
    store.close()
    store = Store.open(f"sqlite:///{path}")
    before = path.stat().st_size
    for n in range(200):
        store.create(make_patient(f"again-{n}"))
    assert _wait_for(lambda: path.stat().st_size > before + 100_000)
    store.close()


def _write_in_child(store: Store, done) -> None:
    # through the engine inherited from the parent: its checkpointer was reset by the fork
    path = str(store.engine.url.database)
    before = os.path.getsize(path)
    for n in range(200):
        store.create({"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": f"child-{n}"}]})
    thread = db._WAL_CHECKPOINTERS[store.engine]._thread
    if thread is not None and thread.is_alive() and _wait_for(lambda: os.path.getsize(path) > before + 100_000):
        done.set()
    store.close()


def test_a_forked_process_checkpoints_its_own_writes(tmp_path, make_patient) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'f.db'}")
    store.create(make_patient("parent"))  # the parent's checkpoint thread runs: the child has none of it
    parent_thread = db._WAL_CHECKPOINTERS[store.engine]._thread
    assert parent_thread is not None
    store.engine.dispose()  # no pooled connection crosses the fork
    context = multiprocessing.get_context("fork")
    done = context.Event()
    child = context.Process(target=_write_in_child, args=(store, done))
    child.start()
    child.join(30)
    assert child.exitcode == 0 and done.is_set()
    store.close()


def test_the_wal_stays_bounded_while_writes_keep_coming(tmp_path, make_patient, monkeypatch) -> None:
    # a checkpoint beside the writers never ends level with them, so only the backstop lets
    # SQLite rewind the WAL; a small one here keeps the test short
    monkeypatch.setattr(db, "WAL_BACKSTOP_PAGES", 100)
    path = tmp_path / "busy.db"
    store = Store.open(f"sqlite:///{path}")
    wal = tmp_path / "busy.db-wal"
    largest = 0
    for n in range(600):
        store.create(make_patient(str(n)))
        largest = max(largest, wal.stat().st_size)
    assert largest < 4_000_000  # without the backstop: ~25 MB after these writes
    store.close()


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_a_sqlite_uri_database_keeps_sqlites_own_checkpoints(tmp_path, make_patient, monkeypatch, caplog, where) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may appear beside it: no "file:" folder, no "file:u.db.lock"
    name = str(tmp_path / "u.db") if where == "absolute" else "u.db"
    store = Store.open(f"sqlite:///file:{name}?uri=true")
    store.create(make_patient())
    assert db._checkpointer(store.engine) is None and store.engine not in db._WAL_CHECKPOINTERS
    assert store.engine not in db._WRITE_LOCKS  # its writers wait in SQLite's busy handler
    with store.engine.connect() as conn:  # SQLite's default, not the backstop meant for the thread
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    store.close()
    assert {p.name for p in tmp_path.iterdir()} <= {"u.db", "u.db-wal", "u.db-shm"}
    assert "cannot open" not in caplog.text


def test_a_checkpoint_never_creates_a_database_removed_meanwhile(tmp_path, make_patient) -> None:
    path = tmp_path / "gone.db"
    store = Store.open(f"sqlite:///{path}")
    store.create(make_patient())
    store.engine.dispose()
    checkpointer = db._WAL_CHECKPOINTERS[store.engine]
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"gone.db{suffix}").unlink(missing_ok=True)
    checkpointer._checkpoint()  # logs a warning, creates nothing
    assert not path.exists()
    store.close()
