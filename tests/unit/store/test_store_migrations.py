"""Schema creation and migration on open; engine settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import inspect, select, text

from iop_fhir.store import Store
from iop_fhir.store.db import make_engine
from iop_fhir.store.migrations import MIGRATIONS, Migration, SchemaTooNew, current_version, migrate
from iop_fhir.store.tables import metadata, schema_version


HEAD = MIGRATIONS[-1].version


def versions(store: Store) -> list[int]:
    with store.engine.connect() as conn:
        return list(conn.scalars(select(schema_version.c.version).order_by(schema_version.c.version)))


def test_a_new_database_gets_every_table_and_the_head_version(store: Store) -> None:
    assert versions(store) == [m.version for m in MIGRATIONS]
    assert set(metadata.tables) <= set(inspect(store.engine).get_table_names())


def test_opening_again_changes_nothing(open_store: Callable[..., Store], make_patient) -> None:
    first = open_store()
    first.create(make_patient())
    second = open_store()
    assert versions(second) == versions(first) and second.count("Patient") == 1


@pytest.fixture
def fresh(database_url: str) -> Iterator[Store]:
    """A store of its own: these tests change the schema."""
    store = Store.open(database_url)
    yield store
    store.close()


def test_pending_migrations_run_once_in_order(fresh: Store) -> None:
    store = fresh
    applied = []

    def add_column(conn) -> None:
        applied.append(2)
        conn.execute(text("ALTER TABLE outbox ADD COLUMN note TEXT"))

    def add_index(conn) -> None:
        applied.append(3)
        conn.execute(text("CREATE INDEX ix_outbox_note ON outbox (note)"))

    later = (*MIGRATIONS, Migration(HEAD + 1, "outbox note", add_column), Migration(HEAD + 2, "index it", add_index))
    assert migrate(store.engine, later) == HEAD + 2
    assert migrate(store.engine, later) == HEAD + 2
    assert applied == [2, 3] and current_version(store.engine) == HEAD + 2
    assert "note" in {c["name"] for c in inspect(store.engine).get_columns("outbox")}
    with pytest.raises(SchemaTooNew):
        migrate(store.engine)


def test_a_failing_migration_leaves_the_schema_as_it_was(fresh: Store) -> None:
    store = fresh

    def half(conn) -> None:
        conn.execute(text("ALTER TABLE outbox ADD COLUMN note TEXT"))
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        migrate(store.engine, (*MIGRATIONS, Migration(HEAD + 1, "broken", half)))
    assert current_version(store.engine) == HEAD
    assert "note" not in {c["name"] for c in inspect(store.engine).get_columns("outbox")}


def test_a_baseline_database_is_brought_to_the_head(tmp_path) -> None:
    """A database made by release 1 (baseline only) gains the later tables on open."""
    from sqlalchemy import delete

    url = f"sqlite:///{tmp_path}/old.db"
    store = Store.open(url)
    with store.engine.begin() as conn:
        for step in MIGRATIONS[1:]:
            conn.execute(delete(schema_version).where(schema_version.c.version == step.version))
        conn.execute(text("DROP TABLE sync_cursor"))
        conn.execute(text("DROP TABLE message"))
    assert current_version(store.engine) == 1
    store.close()
    store = Store.open(url)
    try:
        assert current_version(store.engine) == HEAD
        assert {"sync_cursor", "message"} <= set(inspect(store.engine).get_table_names())
    finally:
        store.close()


def test_sqlite_settings(tmp_path) -> None:
    store = Store.open(f"sqlite:///{tmp_path}/deep/dir/store.db")  # directories are made
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        assert store.dialect == "sqlite"
    finally:
        store.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "mysql://x/y"])
def test_urls_the_store_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        make_engine(url)


def test_analyze_after_a_load(store: Store, make_patient) -> None:
    for i in range(5):
        store.create(make_patient(str(i)))
    store.analyze()
    assert store.count("Patient", [("family", "riv")]) == 5
