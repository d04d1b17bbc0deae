"""The message store: every wire message in and out (NCPDP SCRIPT), kept as received or sent.

Why keep them: a pharmacy's acknowledgement, cancel response or fill names our message only by
its MessageID (``RelatesToMessageID``), so correlating needs what we sent; replaying needs what we
received, byte for byte; and staff asking "did the prescription reach the pharmacy?" need both.
The ``message`` table (migration 2) holds them; :class:`MessageStore` (``store.messages``) is the
only way in, as :class:`~iop_fhir.store.outbox.Outbox` is for the delivery queue.

Writes run in their own transaction, or in a caller's (``conn=``: a unit of work's
:attr:`~iop_fhir.store.resources.UnitOfWork.connection`), so a message is recorded together with
the resources it produced, or not at all.

Statuses are short words (at most :data:`STATUS_MAX` characters), by direction:

* in: ``processed`` (applied, answered Status), ``error`` (readable but not applicable, answered
  Error 900), ``failed`` (our own failure, answered Error 602: the sender retries), ``rejected``
  (unreadable, answered Error 400), ``uncorrelated`` (an acknowledgement of nothing we sent),
  ``approved`` / ``denied`` (a CancelRxResponse);
* out: ``sent``, then what the pharmacy answered: ``accepted`` (Status), ``verified`` (Verify),
  ``approved`` / ``denied`` (a CancelRx), ``error: <code>`` (Error; its description in ``detail``),
  or ``refused`` (never sent: a rule forbade it).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, insert, select, update

from iop_fhir.errors import NotFound
from iop_fhir.store import db
from iop_fhir.store.tables import message

# Column widths of the message table: longer values are a caller's bug, never cut silently
# (a cut MessageID would correlate with the wrong message).
STATUS_MAX = message.c.status.type.length
KIND_MAX = message.c.kind.type.length
MESSAGE_ID_MAX = message.c.message_id.type.length
COUNTERPARTY_MAX = message.c.counterparty.type.length
REFERENCE_MAX = message.c.prescription.type.length


@dataclass(frozen=True)
class StoredMessage:
    """One wire message as kept: ``body`` holds the exact bytes received or sent."""

    id: int
    created: datetime
    direction: str  # "in" | "out"
    protocol: str  # "ncpdp"
    kind: str  # NewRx, RxFill, Status, Error, ... ("unreadable" for a rejected body)
    message_id: str  # the header's MessageID
    relates_to: str | None  # its RelatesToMessageID
    counterparty: str | None  # the destination's name, or the sender's routing id (NCPDPID)
    prescription: str | None  # "MedicationRequest/{id}" when the message is about one
    patient_key: str | None  # "Patient/{id}"
    status: str
    detail: str | None
    body: bytes


_COLUMNS = (
    message.c.id,
    message.c.created,
    message.c.direction,
    message.c.protocol,
    message.c.kind,
    message.c.message_id,
    message.c.relates_to,
    message.c.counterparty,
    message.c.prescription,
    message.c.patient_key,
    message.c.status,
    message.c.detail,
    message.c.body,
)
_SELECT = select(*_COLUMNS)


def _stored(row: Row[Any]) -> StoredMessage:
    values = row._asdict()  # ``created`` comes back as an aware datetime (tables.Instant)
    values["body"] = bytes(values["body"])  # PostgreSQL hands out a memoryview
    return StoredMessage(**values)


def _check(name: str, value: str | None, limit: int, *, required: bool = False) -> None:
    if value is None:
        if required:
            raise ValueError(f"a stored message needs a {name}")
        return
    if len(value) > limit:
        raise ValueError(f"{name} is {len(value)} characters; the message store keeps at most {limit}")


class MessageStore:
    """The wire messages over the store's database (``store.messages``)."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime]) -> None:
        self._engine = engine
        self._clock = clock

    @contextmanager
    def _writing(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:  # the caller's transaction: commits (or not) with its other writes
            yield conn
            return
        with db.writing(self._engine) as own:
            yield own

    @contextmanager
    def _reading(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:  # sees the caller's uncommitted writes
            yield conn
            return
        with self._engine.connect() as own:
            yield own

    def record(
        self,
        *,
        direction: str,
        kind: str,
        message_id: str,
        body: bytes,
        status: str,
        protocol: str = "ncpdp",
        relates_to: str | None = None,
        counterparty: str | None = None,
        prescription: str | None = None,
        patient_key: str | None = None,
        detail: str | None = None,
        conn: Connection | None = None,
    ) -> int:
        """Keep one message; returns its id (ids increase in the order messages are recorded).

        :param conn: write in this transaction (a unit of work's connection) instead of its own.
        :raises ValueError: a direction other than in/out, or a value wider than its column.
        """
        if direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")
        _check("kind", kind, KIND_MAX, required=True)
        _check("message_id", message_id, MESSAGE_ID_MAX, required=True)
        _check("relates_to", relates_to, MESSAGE_ID_MAX)
        _check("status", status, STATUS_MAX, required=True)
        _check("counterparty", counterparty, COUNTERPARTY_MAX)
        _check("prescription", prescription, REFERENCE_MAX)
        _check("patient_key", patient_key, REFERENCE_MAX)
        row = {
            "created": self._clock(),
            "direction": direction,
            "protocol": protocol,
            "kind": kind,
            "message_id": message_id,
            "relates_to": relates_to,
            "counterparty": counterparty,
            "prescription": prescription,
            "patient_key": patient_key,
            "status": status,
            "detail": detail,
            "body": bytes(body),
        }
        with self._writing(conn) as c:
            return int(c.execute(insert(message).values(row).returning(message.c.id)).scalar_one())

    def get(self, id: int, *, conn: Connection | None = None) -> StoredMessage:
        """:raises NotFound: no message has this id."""
        with self._reading(conn) as c:
            row = c.execute(_SELECT.where(message.c.id == id)).first()
        if row is None:
            raise NotFound(f"no stored message has the id {id}")
        return _stored(row)

    def find(
        self,
        message_id: str,
        *,
        protocol: str = "ncpdp",
        direction: str | None = None,
        counterparty: str | None = None,
        conn: Connection | None = None,
    ) -> StoredMessage | None:
        """The latest message with this MessageID (a MessageID is unique only per sender, and a
        sender may send one again: the latest receipt is what counts), or None."""
        where = [message.c.protocol == protocol, message.c.message_id == message_id]
        if direction is not None:
            where.append(message.c.direction == direction)
        if counterparty is not None:
            where.append(message.c.counterparty == counterparty)
        with self._reading(conn) as c:
            row = c.execute(_SELECT.where(*where).order_by(message.c.id.desc()).limit(1)).first()
        return None if row is None else _stored(row)

    def replies_to(self, message_id: str, *, protocol: str = "ncpdp", conn: Connection | None = None) -> builtins.list[StoredMessage]:
        """Every message whose RelatesToMessageID is ``message_id``, in the order recorded."""
        where = (message.c.protocol == protocol, message.c.relates_to == message_id)
        with self._reading(conn) as c:
            rows = c.execute(_SELECT.where(*where).order_by(message.c.id)).all()
        return [_stored(row) for row in rows]

    def list(
        self,
        *,
        prescription: str | None = None,
        kind: str | None = None,
        direction: str | None = None,
        status: str | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> builtins.list[StoredMessage]:
        """Messages in id order, filtered; page with ``after_id`` (the last id seen)."""
        where = [message.c.id > after_id]
        for column, value in ((message.c.prescription, prescription), (message.c.kind, kind), (message.c.direction, direction), (message.c.status, status)):
            if value is not None:
                where.append(column == value)
        with self._reading(None) as c:
            rows = c.execute(_SELECT.where(*where).order_by(message.c.id).limit(limit)).all()
        return [_stored(row) for row in rows]

    def set_status(
        self,
        id: int,
        status: str,
        detail: str | None = None,
        *,
        prescription: str | None = None,
        patient_key: str | None = None,
        conn: Connection | None = None,
    ) -> None:
        """Set a message's status and detail (``detail=None`` clears it); ``prescription`` and
        ``patient_key`` are set when given (a replay that now finds the prescription), else kept.

        :raises NotFound: no message has this id.
        """
        _check("status", status, STATUS_MAX, required=True)
        _check("prescription", prescription, REFERENCE_MAX)
        _check("patient_key", patient_key, REFERENCE_MAX)
        values: dict[str, Any] = {"status": status, "detail": detail}
        if prescription is not None:
            values["prescription"] = prescription
        if patient_key is not None:
            values["patient_key"] = patient_key
        with self._writing(conn) as c:
            if c.execute(update(message).where(message.c.id == id).values(values)).rowcount == 0:
                raise NotFound(f"no stored message has the id {id}")

    def sent_for(self, prescription: str, kind: str = "NewRx") -> StoredMessage | None:
        """The last outbound message of ``kind`` about ``prescription``, whatever its status."""
        where = (message.c.prescription == prescription, message.c.kind == kind, message.c.direction == "out")
        with self._reading(None) as c:
            row = c.execute(_SELECT.where(*where).order_by(message.c.id.desc()).limit(1)).first()
        return None if row is None else _stored(row)

    def lock(self, message_id: str, *, counterparty: str | None, conn: Connection, protocol: str = "ncpdp") -> None:
        """Hold the receipt of ``counterparty``'s ``message_id`` until ``conn``'s transaction ends,
        so the same message sent twice at once is applied once: the second receipt waits, then
        finds the first (PostgreSQL: an advisory lock; SQLite's write lock serialises already)."""
        db.lock(conn, f"message:{protocol}:{counterparty or ''}:{message_id}")
