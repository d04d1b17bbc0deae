"""Bulk inserts on a DBAPI cursor (``db.Prepared.executemany``): on SQLite several rows go in
one multi-row INSERT (fewer statements, fewer GIL hand-overs); every row lands once, in order,
on SQLite and PostgreSQL alike, and a violated constraint rolls the whole batch back."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from iop_fhir.store import db

metadata = MetaData()
rows_table = Table("multirow_probe", metadata, Column("n", Integer, primary_key=True, autoincrement=False), Column("label", Text), Column("seven", Integer))
INSERT = db.insert_all(rows_table)


@pytest.fixture
def engine(store):
    metadata.create_all(store.engine)
    yield store.engine
    metadata.drop_all(store.engine)


def stored(engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(rows_table).order_by(rows_table.c.n))]


@pytest.mark.parametrize("count", [1, 2, 15, 16, 17, 63, 64, 65, 200])
def test_every_row_lands_once(engine, count):
    rows = [{"n": n, "label": f"row {n}", "seven": None if n % 3 else 7} for n in range(count)]
    with engine.begin() as conn:
        INSERT.executemany(conn, rows)
    assert stored(engine) == [(r["n"], r["label"], r["seven"]) for r in rows]


def test_sqlite_sends_few_statements(engine):
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL keeps the driver's executemany")
    sent: list[str] = []
    with engine.begin() as conn:
        conn.connection.driver_connection.set_trace_callback(sent.append)
        INSERT.executemany(conn, [{"n": n, "label": "x", "seven": 1} for n in range(100)])  # 64 + 2 x 16 + 4 x 1
        conn.connection.driver_connection.set_trace_callback(None)
    assert len([s for s in sent if s.lstrip().upper().startswith("INSERT")]) == 7
    assert len(stored(engine)) == 100


def test_a_violated_constraint_is_raised_and_the_transaction_keeps_nothing(engine):
    with pytest.raises(IntegrityError):
        with engine.begin() as conn:
            INSERT.executemany(conn, [{"n": n % 70, "label": "x", "seven": 1} for n in range(80)])  # 0..9 twice
    assert stored(engine) == []


def test_other_statements_keep_running_once_per_row(engine):
    with engine.begin() as conn:
        INSERT.executemany(conn, [{"n": n, "label": "old", "seven": 1} for n in range(5)])
    relabel = db.Prepared(update(rows_table).where(rows_table.c.n == bindparam("key")).values(label=bindparam("new")))
    with engine.begin() as conn:
        relabel.executemany(conn, [{"key": n, "new": f"new {n}"} for n in range(0, 5, 2)])
    assert [r[1] for r in stored(engine)] == ["new 0", "old", "new 2", "old", "new 4"]


def test_only_plain_inserts_are_sent_as_multi_row_statements(engine):
    """An upsert's tail (``ON CONFLICT ... DO UPDATE SET x = coalesce(...)``) must not be
    repeated per row: only :func:`db.insert_all` statements are rewritten."""
    if engine.dialect.name != "sqlite":
        pytest.skip("the rewrite is SQLite's")
    from sqlalchemy import func
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    upsert = sqlite_insert(rows_table).values(n=bindparam("n"), label=bindparam("label"), seven=bindparam("seven"))
    upsert = upsert.on_conflict_do_update(index_elements=[rows_table.c.n], set_={"seven": func.coalesce(upsert.excluded.seven, 0)})
    with engine.begin() as conn:
        db.Prepared(upsert).executemany(conn, [{"n": n % 20, "label": "x", "seven": n} for n in range(40)])
    assert [r[2] for r in stored(engine)] == list(range(20, 40))
