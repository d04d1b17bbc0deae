"""Schema creation and migration: an ordered list of steps and a ``schema_version`` table.

Why not Alembic: one short list covers a schema this size, runs inside the store's own
transaction and lock, and needs no second configuration. How it works:

* A new database gets the current tables from :data:`~iop_fhir.store.tables.metadata`, and
  every migration is recorded as applied (the metadata *is* the result of all of them).
* An existing database gets the steps after its highest recorded version, in order, each
  recorded in the same transaction, so a failed step leaves the schema as it was (both
  databases have transactional DDL).
* Two processes starting at once: the whole check-and-migrate runs in one write transaction
  under a lock (PostgreSQL: an advisory lock; SQLite: ``BEGIN IMMEDIATE``), so the second
  waits and then finds nothing to do.

Adding a change: edit ``tables.py`` to the new shape *and* append a :class:`Migration` whose
``apply`` brings an existing database to that shape (``ALTER TABLE ...``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, Table, func, insert, inspect, select

from iop_fhir.store import db
from iop_fhir.store.tables import append_queue, message, metadata, schema_version, sync_cursor


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    # None for the baseline, which only a new database gets (from the metadata)
    apply: Callable[[Connection], None] | None = None


def _create(*tables: Table) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        for table in tables:
            table.create(conn, checkfirst=True)

    return apply


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "baseline: resources, versions, identifiers, search index, outbox"),
    Migration(2, "sync cursors and the wire-message store", _create(sync_cursor, message)),
    Migration(3, "the append queue: write-once resources stored now, indexed later", _create(append_queue)),
)


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer release than this one."""


def migrate(
    engine: Engine,
    migrations: Sequence[Migration] = MIGRATIONS,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> int:
    """Create or migrate the schema; returns the version the database is at afterwards.

    Idempotent and safe to call from several processes at once.

    :raises SchemaTooNew: the database records a version this code does not know.
    """
    head = migrations[-1].version
    with db.writing(engine) as conn:
        db.lock(conn, "iop_fhir.store.migrate")
        if not inspect(conn).has_table(schema_version.name):
            metadata.create_all(conn)
            _stamp(conn, migrations, now())
            return head
        current = conn.scalar(select(func.max(schema_version.c.version))) or 0
        if current > head:
            raise SchemaTooNew(f"database schema version {current} is newer than this release ({head})")
        pending = [m for m in migrations if m.version > current]
        for migration in pending:
            if migration.apply is not None:
                migration.apply(conn)
        _stamp(conn, pending, now())
        return head


def _stamp(conn: Connection, migrations: Sequence[Migration], at: datetime) -> None:
    if migrations:
        conn.execute(
            insert(schema_version),
            [{"version": m.version, "description": m.description, "applied_at": at} for m in migrations],
        )


def current_version(engine: Engine) -> int:
    """The highest applied migration (0 for a database without the store's tables)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(schema_version.name):
            return 0
        return conn.scalar(select(func.max(schema_version.c.version))) or 0
