"""The transactional outbox: deliveries written with each change, and the queue workers drain.

A write of a resource version inserts one ``outbox`` row per destination in the *same*
transaction (see :mod:`iop_fhir.store.resources`), so a change is never stored without its
delivery, nor delivered without being stored. :class:`Outbox` is the queue API the sync
worker uses; it never hands out a SQLAlchemy session.

Lifecycle of a delivery (``state``)::

    queued --claim--> in-flight --delivered--> delivered
                         |  \\--retry(at)--> failed --(due)--claim--> in-flight ...
                         |  \\--dead_letter--> dead --requeue--> queued   (or discard)
                         \\--lease expires--> failed (reclaim_expired) or dead (too many attempts)

Order: deliveries of one patient (``patient_key``) to one destination go out in the order
they were written. Only the oldest pending delivery of a patient (its *head*) can be
claimed, plus the deliveries right behind it in the same claim, so a batch carries a
patient's changes in order and no other worker can overtake it. A dead delivery no longer
blocks the ones behind it. Deliveries without a patient (shared parties: practitioners,
pharmacies, organisations) may be referred to by anything written after them, so while one
of them is held by a worker or waits for its retry, nothing written after it to that
destination is claimed (a *barrier*); a dead one no longer blocks.

Concurrency: claims use ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so any number of
workers on any number of machines share one queue; on SQLite the write lock serialises
claims (one worker is the intended setup). Leases expire: a worker that dies loses nothing;
:meth:`Outbox.reclaim_expired` makes its deliveries due again. ``attempts`` counts claims.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, Row, and_, delete, exists, func, or_, select, update

from iop_fhir.store import db
from iop_fhir.store.tables import outbox, resource_version, to_micros

DEFAULT_LEASE = timedelta(seconds=60)


class DeliveryState(StrEnum):
    QUEUED = "queued"
    IN_FLIGHT = "in-flight"
    DELIVERED = "delivered"
    FAILED = "failed"  # waiting for its retry at next_attempt_at
    DEAD = "dead"


PENDING = (DeliveryState.QUEUED, DeliveryState.IN_FLIGHT, DeliveryState.FAILED)
CLAIMABLE = (DeliveryState.QUEUED, DeliveryState.FAILED)


@dataclass(frozen=True)
class Delivery:
    """One resource version to deliver to one destination.

    ``data`` is the version's JSON exactly as stored (``None`` for ``action == "delete"``).
    """

    id: int
    destination: str
    resource_type: str
    resource_id: str
    version_id: int
    action: str  # "upsert" | "delete"
    patient_key: str | None
    state: DeliveryState
    attempts: int
    created: datetime
    next_attempt_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    data: bytes | None = field(default=None, repr=False)
    delivered_at: datetime | None = None  # when it was delivered (state delivered)


@dataclass
class DestinationStats:
    """The queue of one destination, for ``GET /admin/sync`` and ``iop-fhir sync status``."""

    destination: str
    queued: int = 0
    in_flight: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    oldest_pending: datetime | None = None  # created time of the oldest queued/in-flight/failed
    last_success: datetime | None = None
    last_error: str | None = None


_ENQUEUE = db.insert_all(outbox, skip=("id",))


def enqueue(
    conn: Connection,
    destinations: Sequence[str],
    *,
    resource_type: str,
    resource_id: str,
    version_id: int,
    action: str,
    patient_key: str | None,
    now: datetime,
) -> None:
    """Insert one queued delivery per destination, inside the caller's transaction."""
    at = to_micros(now)
    _ENQUEUE.executemany(
        conn,
        [
            {
                "created": at,
                "destination": destination,
                "resource_type": resource_type,
                "resource_id": resource_id,
                "version_id": version_id,
                "action": action,
                "patient_key": patient_key,
                "state": DeliveryState.QUEUED.value,
                "attempts": 0,
                "next_attempt_at": at,
                "lease_owner": None,
                "lease_expires_at": None,
                "last_error": None,
                "delivered_at": None,
                "updated_at": at,
            }
            for destination in destinations
        ],
    )


_COLUMNS = (
    outbox.c.id,
    outbox.c.destination,
    outbox.c.resource_type,
    outbox.c.resource_id,
    outbox.c.version_id,
    outbox.c.action,
    outbox.c.patient_key,
    outbox.c.state,
    outbox.c.attempts,
    outbox.c.created,
    outbox.c.next_attempt_at,
    outbox.c.lease_owner,
    outbox.c.lease_expires_at,
    outbox.c.last_error,
    resource_version.c.data,
    outbox.c.delivered_at,
)
_WITH_DATA = select(*_COLUMNS).join(
    resource_version,
    and_(
        resource_version.c.resource_type == outbox.c.resource_type,
        resource_version.c.id == outbox.c.resource_id,
        resource_version.c.version_id == outbox.c.version_id,
    ),
)


def _delivery(row: Row[Any]) -> Delivery:
    values = row._asdict()
    values["state"] = DeliveryState(values["state"])
    return Delivery(**values)


class Outbox:
    """The delivery queue over the store's database (``store.outbox``)."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime]) -> None:
        self._engine = engine
        self._clock = clock

    def _write(self) -> AbstractContextManager[Connection]:
        return db.writing(self._engine)

    def claim(
        self,
        owner: str,
        *,
        destination: str | None = None,
        limit: int = 50,
        lease: timedelta = DEFAULT_LEASE,
    ) -> list[Delivery]:
        """Lease up to ``limit`` due deliveries to ``owner``, oldest first, patients in order.

        :param owner: the worker's name (host and pid); only it can complete these leases.
        :param destination: only this destination's deliveries (a batch goes to one target).
        :param lease: how long the worker has before the deliveries become due again.
        """
        now = self._clock()
        o, earlier = outbox, outbox.alias("earlier")
        blocked = exists().where(
            earlier.c.destination == o.c.destination,
            earlier.c.patient_key == o.c.patient_key,
            earlier.c.id < o.c.id,
            earlier.c.state.in_(PENDING),
        )
        # A shared party (no patient: a practitioner, a pharmacy) that another worker holds or that
        # waits for its retry is a barrier: what was written after it may refer to it.
        barrier = (
            select(func.min(earlier.c.id))
            .where(
                earlier.c.destination == o.c.destination,
                earlier.c.patient_key.is_(None),
                earlier.c.state.in_((DeliveryState.IN_FLIGHT, DeliveryState.FAILED)),
            )
            .scalar_subquery()
        )
        scope = [o.c.destination == destination] if destination is not None else []
        with self._write() as conn:
            heads = conn.execute(
                select(o.c.id, o.c.destination, o.c.patient_key)
                .where(
                    o.c.state.in_(CLAIMABLE),
                    o.c.next_attempt_at <= now,
                    ~blocked,
                    or_(barrier.is_(None), o.c.id <= barrier),
                    *scope,
                )
                .order_by(o.c.id)
                .limit(limit)
                .with_for_update(of=o, skip_locked=True)
            ).all()
            ids = [row.id for row in heads]
            ids += self._followers(conn, heads, limit - len(ids), now, self._barriers(conn, heads))
            if not ids:
                return []
            conn.execute(
                update(o)
                .where(o.c.id.in_(ids), o.c.state.in_(CLAIMABLE))
                .values(
                    state=DeliveryState.IN_FLIGHT.value,
                    lease_owner=owner,
                    lease_expires_at=now + lease,
                    attempts=o.c.attempts + 1,
                    updated_at=now,
                )
            )
            rows = conn.execute(_WITH_DATA.where(o.c.id.in_(ids)).order_by(o.c.id)).all()
        return [_delivery(row) for row in rows]

    @staticmethod
    def _barriers(conn: Connection, heads: Sequence[Row[Any]]) -> dict[str, int]:
        """Per destination, the first shared-party delivery held elsewhere or waiting to retry."""
        o = outbox
        destinations = {h.destination for h in heads}
        if not destinations:
            return {}
        rows = conn.execute(
            select(o.c.destination, func.min(o.c.id))
            .where(
                o.c.destination.in_(destinations),
                o.c.patient_key.is_(None),
                o.c.state.in_((DeliveryState.IN_FLIGHT, DeliveryState.FAILED)),
            )
            .group_by(o.c.destination)
        ).all()
        return {destination: first for destination, first in rows}

    @staticmethod
    def _followers(
        conn: Connection, heads: Sequence[Row[Any]], room: int, now: datetime, barriers: dict[str, int]
    ) -> list[int]:
        """Due deliveries right behind each claimed head, in order, up to ``room`` of them,
        none past its destination's barrier."""
        head_of = {(h.destination, h.patient_key): h.id for h in heads if h.patient_key is not None}
        if room <= 0 or not head_of:
            return []
        o = outbox
        rows = conn.execute(
            select(o.c.id, o.c.destination, o.c.patient_key, o.c.state, o.c.next_attempt_at)
            .where(
                or_(*(and_(o.c.destination == d, o.c.patient_key == p) for d, p in head_of)),
                o.c.id > min(head_of.values()),
                o.c.state.in_(PENDING),
            )
            .order_by(o.c.id)
        ).all()
        taken: list[int] = []
        stopped: set[tuple[str, str]] = set()
        for row in rows:
            key = (row.destination, row.patient_key)
            if key in stopped or row.id <= head_of[key]:
                continue
            if row.id > barriers.get(row.destination, row.id):
                stopped.add(key)
                continue
            if row.state in CLAIMABLE and row.next_attempt_at <= now:
                taken.append(row.id)
                if len(taken) == room:
                    break
            else:  # in flight elsewhere or not yet due: nothing behind it may overtake it
                stopped.add(key)
        return taken

    def _finish(self, owner: str, ids: Iterable[int], **values: Any) -> int:
        ids = list(ids)
        if not ids:
            return 0
        o = outbox
        with self._write() as conn:
            result = conn.execute(
                update(o)
                .where(o.c.id.in_(ids), o.c.lease_owner == owner, o.c.state == DeliveryState.IN_FLIGHT.value)
                .values(updated_at=self._clock(), **values)
            )
            return result.rowcount

    def heartbeat(self, owner: str, ids: Iterable[int], *, lease: timedelta = DEFAULT_LEASE) -> int:
        """Extend ``owner``'s leases; returns how many it still holds."""
        return self._finish(owner, ids, lease_expires_at=self._clock() + lease)

    def delivered(self, owner: str, ids: Iterable[int], *, note: str | None = None) -> int:
        """Mark ``owner``'s deliveries done; returns how many it still held.

        :param note: kept in ``last_error`` of a delivery settled without sending all it held
            (``withheld: ...`` under the patient's consents); not an error of the destination.
        """
        return self._finish(
            owner,
            ids,
            state=DeliveryState.DELIVERED.value,
            delivered_at=self._clock(),
            lease_owner=None,
            lease_expires_at=None,
            last_error=note,
        )

    def retry(self, owner: str, ids: Iterable[int], *, error: str, at: datetime) -> int:
        """Give ``owner``'s deliveries back, due again at ``at`` (the worker's backoff)."""
        return self._finish(
            owner,
            ids,
            state=DeliveryState.FAILED.value,
            next_attempt_at=at,
            last_error=error,
            lease_owner=None,
            lease_expires_at=None,
        )

    def dead_letter(self, owner: str, ids: Iterable[int], *, error: str) -> int:
        """Park ``owner``'s deliveries as dead; they stop blocking their patient's queue."""
        return self._finish(
            owner, ids, state=DeliveryState.DEAD.value, last_error=error, lease_owner=None, lease_expires_at=None
        )

    def reclaim_expired(self, *, max_attempts: int | None = None) -> int:
        """Make deliveries whose lease ran out due again (dead after ``max_attempts`` claims).

        Run by every worker now and then; returns how many it reclaimed.
        """
        now = self._clock()
        o = outbox
        expired = and_(o.c.state == DeliveryState.IN_FLIGHT.value, o.c.lease_expires_at < now)
        released = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
        count = 0
        with self._write() as conn:
            if max_attempts is not None:
                count += conn.execute(
                    update(o)
                    .where(expired, o.c.attempts >= max_attempts)
                    .values(state=DeliveryState.DEAD.value, last_error="lease expired on the last attempt", **released)
                ).rowcount
            count += conn.execute(
                update(o)
                .where(expired)
                .values(state=DeliveryState.FAILED.value, next_attempt_at=now, last_error="lease expired", **released)
            ).rowcount
        return count

    def _dead(self, ids: Iterable[int] | None, destination: str | None) -> list[Any]:
        where = [outbox.c.state == DeliveryState.DEAD.value]
        if ids is not None:
            where.append(outbox.c.id.in_(list(ids)))
        if destination is not None:
            where.append(outbox.c.destination == destination)
        return where

    def requeue(self, ids: Iterable[int] | None = None, *, destination: str | None = None) -> int:
        """Put dead deliveries back in the queue with a fresh attempt count (all when no filter)."""
        now = self._clock()
        with self._write() as conn:
            return conn.execute(
                update(outbox)
                .where(*self._dead(ids, destination))
                .values(state=DeliveryState.QUEUED.value, attempts=0, next_attempt_at=now, updated_at=now)
            ).rowcount

    def discard(self, ids: Iterable[int] | None = None, *, destination: str | None = None) -> int:
        """Delete dead deliveries (all when no filter); the stored versions stay."""
        with self._write() as conn:
            return conn.execute(delete(outbox).where(*self._dead(ids, destination))).rowcount

    def purge_delivered(self, before: datetime) -> int:
        """Delete delivered rows older than ``before`` (the table would otherwise only grow)."""
        o = outbox
        with self._write() as conn:
            return conn.execute(
                delete(o).where(o.c.state == DeliveryState.DELIVERED.value, o.c.delivered_at < before)
            ).rowcount

    def next_due(self, destinations: Iterable[str] | None = None) -> datetime | None:
        """The earliest moment a waiting delivery may be claimed again: a failed one's retry time
        or an in-flight one's lease expiry (None when there is neither).

        Queued deliveries are due already; one a claim skips waits behind a failed or in-flight
        delivery of its patient, whose moment is included. ``worker --once`` sleeps until then.
        """
        o = outbox
        scope = [o.c.destination.in_(list(destinations))] if destinations is not None else []
        with self._engine.connect() as conn:
            retry_at, lease_end = conn.execute(
                select(
                    func.min(o.c.next_attempt_at).filter(o.c.state == DeliveryState.FAILED.value),
                    func.min(o.c.lease_expires_at).filter(o.c.state == DeliveryState.IN_FLIGHT.value),
                ).where(*scope)
            ).one()
        moments = [m for m in (retry_at, lease_end) if m is not None]
        return min(moments) if moments else None

    def next_retry(self, destination: str) -> datetime | None:
        """When the earliest failed delivery of ``destination`` is due again (None: none failed).

        The worker claims nothing new for a destination before then, so what a failed delivery
        writes reaches the target before anything written after it that may refer to it.
        """
        o = outbox
        with self._engine.connect() as conn:
            return conn.execute(
                select(func.min(o.c.next_attempt_at)).where(
                    o.c.state == DeliveryState.FAILED.value, o.c.destination == destination
                )
            ).scalar_one()

    def list(
        self,
        *,
        state: DeliveryState | str | None = None,
        destination: str | None = None,
        resource: tuple[str, str] | None = None,
        limit: int = 100,
        after_id: int = 0,
    ) -> list[Delivery]:
        """Deliveries in id order, filtered; page with ``after_id`` (the last id seen)."""
        o = outbox
        where = [o.c.id > after_id]
        if state is not None:
            where.append(o.c.state == DeliveryState(state).value)
        if destination is not None:
            where.append(o.c.destination == destination)
        if resource is not None:
            where += [o.c.resource_type == resource[0], o.c.resource_id == resource[1]]
        with self._engine.connect() as conn:
            rows = conn.execute(_WITH_DATA.where(*where).order_by(o.c.id).limit(limit)).all()
        return [_delivery(row) for row in rows]

    def stats(self) -> dict[str, DestinationStats]:
        """Counts by state and the health of each destination that has deliveries."""
        o = outbox
        out: dict[str, DestinationStats] = {}
        with self._engine.connect() as conn:
            for destination, state, count, oldest in conn.execute(
                select(o.c.destination, o.c.state, func.count(), func.min(o.c.created)).group_by(
                    o.c.destination, o.c.state
                )
            ):
                stats = out.setdefault(destination, DestinationStats(destination))
                setattr(stats, DeliveryState(state).name.lower(), count)
                if state in PENDING and (stats.oldest_pending is None or oldest < stats.oldest_pending):
                    stats.oldest_pending = oldest
            for destination, last in conn.execute(
                select(o.c.destination, func.max(o.c.delivered_at)).group_by(o.c.destination)
            ):
                out[destination].last_success = last
            failing = and_(o.c.last_error.is_not(None), o.c.state != DeliveryState.DELIVERED.value)  # not a note
            latest = (
                select(o.c.destination, func.max(o.c.updated_at).label("at"))
                .where(failing)
                .group_by(o.c.destination)
                .subquery()
            )
            for destination, error in conn.execute(
                select(o.c.destination, o.c.last_error)
                .join(latest, and_(latest.c.destination == o.c.destination, latest.c.at == o.c.updated_at))
                .where(failing)
            ):
                out[destination].last_error = error
        return out
