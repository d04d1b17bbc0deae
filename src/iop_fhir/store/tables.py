"""The store's tables, as SQLAlchemy Core metadata: one definition for SQLite and PostgreSQL.

Why Core and these shapes:

* ``resource_version`` keeps every version as the JSON bytes the API serves, so a read is one
  indexed lookup and no re-serialisation (decimals such as ``1.50`` stay as written).
  ``content_hash`` (SHA-256 of the canonical content without ``meta.versionId`` and
  ``meta.lastUpdated``) lets an update see "nothing changed" without parsing the stored JSON.
* ``resource_current`` points at the latest version of each resource: reads, searches and
  the per-resource write path start there.
* ``identifier`` makes business identifiers unique per (type, system, value) in the
  database, so parallel conditional creates can never make two resources.
* ``search_*`` rows index the *current* version of each live resource (replaced on every
  write, removed on delete); see :mod:`iop_fhir.store.search_index` for what goes in them.
* ``outbox`` holds the deliveries written in the same transaction as the change.

Times are stored as integer microseconds since 1970-01-01 UTC (``BigInteger``): exact,
ordered the same way on both databases, and free of SQLite's text-datetime and time-zone
pitfalls. :class:`Instant` converts them to and from aware UTC datetimes at the boundary.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def to_micros(moment: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // _MICRO


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


class Instant(TypeDecorator[datetime]):
    """An aware UTC datetime stored as integer microseconds since the epoch."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> int | None:
        return None if value is None else to_micros(value)

    def process_result_value(self, value: int | None, dialect: object) -> datetime | None:
        return None if value is None else from_micros(value)


# FHIR ids and resource type names are at most 64 characters.
TYPE = String(64)
ID = String(64)

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", Instant, nullable=False),
)

resource_version = Table(
    "resource_version",
    metadata,
    Column("resource_type", TYPE, primary_key=True),
    Column("id", ID, primary_key=True),
    Column("version_id", Integer, primary_key=True, autoincrement=False),
    Column("last_updated", Instant, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("content_hash", LargeBinary(32)),  # NULL for a deleted version
    Column("data", LargeBinary),  # the JSON as served; NULL for a deleted version
    Index("ix_resource_version_updated", "last_updated"),
    Index("ix_resource_version_type_updated", "resource_type", "last_updated"),
)

resource_current = Table(
    "resource_current",
    metadata,
    Column("resource_type", TYPE, primary_key=True),
    Column("id", ID, primary_key=True),
    Column("version_id", Integer, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("last_updated", Instant, nullable=False),
    ForeignKeyConstraint(
        ["resource_type", "id", "version_id"],
        [resource_version.c.resource_type, resource_version.c.id, resource_version.c.version_id],
        name="fk_resource_current_version",
    ),
    # the default search order: live resources of a type by (lastUpdated, id)
    Index("ix_resource_current_order", "resource_type", "deleted", "last_updated", "id"),
)

identifier = Table(
    "identifier",
    metadata,
    Column("resource_type", TYPE, primary_key=True),
    Column("system", Text, primary_key=True),
    Column("value", Text, primary_key=True),
    Column("resource_id", ID, nullable=False),
    Index("ix_identifier_resource", "resource_type", "resource_id"),
)


def _index_table(name: str, *columns: Column, lookup: tuple[str, ...]) -> Table:
    """A search-index table: (resource_type, resource_id, param) plus the value columns."""
    return Table(
        name,
        metadata,
        Column("resource_type", TYPE, nullable=False),
        Column("resource_id", ID, nullable=False),
        Column("param", String(100), nullable=False),
        *columns,
        # finding resources by value
        Index(f"ix_{name}_lookup", "resource_type", "param", *lookup, "resource_id"),
        # a resource's rows: replacing them, and (covering) correlated filters and sorting
        Index(f"ix_{name}_resource", "resource_type", "resource_id", "param", *lookup),
    )


search_token = _index_table(
    "search_token",
    Column("system", Text),
    Column("code", Text, nullable=False),
    lookup=("code", "system"),
)
search_string = _index_table(
    "search_string",
    Column("value", Text, nullable=False),
    Column("value_norm", Text, nullable=False),  # case- and accent-folded, for starts-with
    lookup=("value_norm",),
)
search_date = _index_table(
    "search_date",
    Column("low", BigInteger, nullable=False),  # inclusive bounds, microseconds since the epoch
    Column("high", BigInteger, nullable=False),
    lookup=("low", "high"),
)
search_reference = _index_table(
    "search_reference",
    Column("ref_type", TYPE),
    Column("ref_id", Text, nullable=False),
    lookup=("ref_id", "ref_type"),
)
Index("ix_search_reference_target", search_reference.c.ref_type, search_reference.c.ref_id)
search_quantity = _index_table(
    "search_quantity",
    Column("value", Float, nullable=False),
    Column("system", Text),
    Column("code", Text),
    lookup=("value",),
)

SEARCH_TABLES: dict[str, Table] = {
    "token": search_token,
    "string": search_string,
    "date": search_date,
    "reference": search_reference,
    "quantity": search_quantity,
}

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("created", Instant, nullable=False),
    Column("destination", String(200), nullable=False),
    Column("resource_type", TYPE, nullable=False),
    Column("resource_id", ID, nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("action", String(16), nullable=False),  # upsert | delete
    Column("patient_key", String(200)),  # "Patient/{id}": deliveries of one patient go in order
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Instant, nullable=False),
    Column("lease_owner", String(200)),
    Column("lease_expires_at", Instant),
    Column("last_error", Text),
    Column("delivered_at", Instant),
    Column("updated_at", Instant, nullable=False),  # the last state change
    ForeignKeyConstraint(
        ["resource_type", "resource_id", "version_id"],
        [resource_version.c.resource_type, resource_version.c.id, resource_version.c.version_id],
        name="fk_outbox_version",
    ),
    Index("ix_outbox_due", "state", "next_attempt_at"),
    Index("ix_outbox_patient", "destination", "patient_key", "id"),
    Index("ix_outbox_resource", "resource_type", "resource_id"),
    sqlite_autoincrement=True,  # ids never reused: they are the delivery order
)

# --- added by migration 2 ------------------------------------------------------------------------

sync_cursor = Table(
    "sync_cursor",
    metadata,
    # where an incremental pull from one destination stopped, per resource type
    Column("destination", String(200), primary_key=True),
    Column("resource_type", TYPE, primary_key=True),
    # the source server's own ``_lastUpdated`` of the newest resource seen (its clock, not ours)
    Column("last_updated", String(40), nullable=False),
    Column("pulled_at", Instant, nullable=False),
)

message = Table(
    "message",
    metadata,
    # every wire message in and out (NCPDP SCRIPT), kept as sent or received, for correlation and replay
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("created", Instant, nullable=False),
    Column("direction", String(8), nullable=False),  # in | out
    Column("protocol", String(16), nullable=False),  # ncpdp
    Column("kind", String(40), nullable=False),  # NewRx, RxFill, Status, Error, ...
    Column("message_id", String(100), nullable=False),  # the header's MessageID
    Column("relates_to", String(100)),  # RelatesToMessageID
    Column("counterparty", String(200)),  # destination name or the sender's NCPDPID
    Column("prescription", String(200)),  # "MedicationRequest/{id}" when the message is about one
    Column("patient_key", String(200)),
    Column("status", String(40), nullable=False),  # received, sent, accepted, rejected, error, ...
    Column("detail", Text),
    Column("body", LargeBinary, nullable=False),
    Index("ix_message_message_id", "protocol", "message_id"),
    Index("ix_message_relates_to", "protocol", "relates_to"),
    Index("ix_message_prescription", "prescription", "id"),
    sqlite_autoincrement=True,
)

# --- added by migration 3 ------------------------------------------------------------------------

append_queue = Table(
    "append_queue",
    metadata,
    # Write-once resources (the audit trail) stored now and indexed later: each row is final
    # (id, lastUpdated, the JSON as it will be served); Store.index_appended moves rows into
    # resource_version / resource_current / search_* and deletes them, oldest first.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("resource_type", TYPE, nullable=False),
    Column("id", ID, nullable=False),
    Column("last_updated", Instant, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("content_hash", LargeBinary(32), nullable=False),  # resource_version.content_hash, taken exactly
    Index("ix_append_queue_type", "resource_type", "seq"),
    sqlite_autoincrement=True,
)
