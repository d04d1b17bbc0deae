"""The delivery worker: drains the outbox to the destinations, at least once, in order per patient.

One *pass* (:meth:`Worker.run_once`) first makes deliveries whose lease ran out due again
(:meth:`~iop_fhir.store.outbox.Outbox.reclaim_expired`), then, for each enabled destination,
claims one batch (``batch_size`` deliveries, a patient's changes in order, see
:meth:`~iop_fhir.store.outbox.Outbox.claim`) and hands it to the destination's *channel*:

* success: the batch is ``delivered``;
* :class:`~iop_fhir.errors.TransientDeliveryError` (5xx, 429, timeouts, refused connections):
  the batch is given back for a retry after a full-jitter exponential backoff,
  ``uniform(0, min(backoff_max, backoff_base * 2**(attempts - 1)))`` seconds, never sooner than
  the target's ``Retry-After``; a delivery that has had ``max_attempts`` attempts goes dead;
* :class:`~iop_fhir.errors.PermanentDeliveryError` (the target refuses the content): a batch of
  several deliveries is split in halves, each delivered on its own in the same pass
  (recursively), so one poison delivery ends dead with its error while the rest go through.
  Halves go in order, and a transient failure while splitting gives everything not yet settled
  back for a retry, so a patient's later change never overtakes an earlier one.

While a destination has a failed delivery waiting for its retry, the worker claims nothing new
for it: the target is failing anyway (or asked to slow down), and what was written later may
refer to what failed, a reference the target could only resolve once that has arrived.

Nothing is lost when a worker dies at any instant: its leases expire and the deliveries run
again; the channel writes conditionally (by business identifier), so a repeat changes nothing.
The lease of a batch outlasts the destination's timeouts (``2 x (connect + read) + 10`` s), unless
the ``WORKER_LEASE`` setting says otherwise; it is extended before each further request of a split.

Lease expiries count as attempts too (``attempts`` counts claims): ``reclaim_expired`` runs with
the smallest ``max_attempts`` among the worker's destinations, so a delivery that keeps killing
workers goes dead instead of killing them forever. Outcomes are logged at INFO on
``iop_fhir.sync``, one line per batch.

The long-running loop (:meth:`Worker.run`) also pulls, on their ``pull_interval``, from the FHIR
destinations declared with ``pull = true`` (:func:`~iop_fhir.sync.pull.pull`); a failed pull is
logged and tried again at the next interval. And, every ``MAT_CHECK_INTERVAL`` seconds, it runs
the check for overdue MAT refills of discharged clients it is given
(:func:`~iop_fhir.pharmacy.monitor.check_adherence`): a client who stops filling sends nothing
that would raise the Flag otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import random as random_module
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Protocol

from iop_fhir.config import ConfigError
from iop_fhir.errors import IopFhirError, PermanentDeliveryError, TransientDeliveryError
from iop_fhir.pharmacy.channel import NcpdpChannel
from iop_fhir.privacy.audit import AuditLog
from iop_fhir.privacy.gate import PrivacyGate
from iop_fhir.privacy.recipients import recipient_for_destination
from iop_fhir.store import Delivery, Store
from iop_fhir.sync.destinations import Destination
from iop_fhir.sync.fhir_client import FhirClient
from iop_fhir.sync.outgoing import delivery_bundle, store_identify
from iop_fhir.sync.release import ensure_audited, release_batch
from iop_fhir.sync.pull import PullResult, pull

log = logging.getLogger("iop_fhir.sync")

JSON = dict[str, Any]
LEASE_MARGIN = 10.0  # seconds a lease adds to two full requests' timeouts
DEFAULT_POLL = 1.0  # seconds an idle worker sleeps between passes
DEFAULT_MAX_WAIT = 60.0  # seconds ``drain`` waits for retries that are not due yet
DEFAULT_MAT_CHECK_INTERVAL = 3600.0  # seconds between scheduled MAT refill checks (config.DEFAULTS)
MIN_SLEEP = 0.05  # seconds; ``drain`` never spins on a moment that has just passed
ERROR_LENGTH = 2000  # characters of an error kept on the delivery


class Channel(Protocol):
    """How deliveries reach one kind of destination (``kind = "fhir"``, ``"ncpdp"``, ...)."""

    def deliver(self, deliveries: Sequence[Delivery]) -> Mapping[int, str] | None:
        """Deliver all of them, or raise.

        :returns: notes by delivery id on deliveries settled without sending all they hold
            (withheld or redacted under the patient's consents); they are recorded on the
            delivered rows (``last_error``).
        :raises TransientDeliveryError: may pass if tried again later.
        :raises PermanentDeliveryError: this content will never be accepted as it is.
        """

    def close(self) -> None:
        """Release connections."""


# A channel gets the worker's privacy gate: what it sends passes the gate first.
ChannelFactory = Callable[[Destination, Store, PrivacyGate], Channel]


class FhirChannel:
    """``kind = "fhir"``: one transaction Bundle of conditional updates per batch.

    A FHIR server answers a transaction all or nothing, so a refused entry normally fails the
    whole request (4xx: permanent). A server that answers ``200`` with a non-2xx entry status
    has not stored that entry either; that is treated as permanent too, so the worker's split
    isolates the entry.

    Every batch passes the privacy gate first (:func:`~iop_fhir.sync.release.release_batch`):
    what the destination's recipient may not receive is left out (its delivery noted as
    withheld), the rest goes as released, and the audit is written before the request leaves.

    :param gate: the worker's; without one the channel keeps its own (and closes its audit log).
    """

    def __init__(self, destination: Destination, store: Store, gate: PrivacyGate | None = None) -> None:
        self.destination = destination
        self._owns_gate = gate is None
        self._gate = gate or PrivacyGate(store, AuditLog(store))
        self._recipient = recipient_for_destination(destination)
        self._client = FhirClient(destination)
        self._identify = store_identify(store)
        # References to types the destination does not receive go as logical identifiers.
        self._receives = destination.resources.__contains__ if destination.resources is not None else None

    def deliver(self, deliveries: Sequence[Delivery]) -> dict[int, str]:
        released = release_batch(self._gate, self.destination, deliveries, recipient=self._recipient)
        bundle = delivery_bundle(released.deliveries, self._identify, receives=self._receives)
        ensure_audited(self._gate)
        requests = len(bundle.get("entry") or ())
        if requests == 0:
            return released.notes
        meta = released.bundle_meta()
        if meta is not None:
            bundle["meta"] = meta
        check_transaction_response(self._client.transaction(bundle), requests)
        return released.notes

    def close(self) -> None:
        self._client.close()
        if self._owns_gate:
            self._gate.audit.close()


def check_transaction_response(response: Any, requests: int) -> None:
    """Raise :class:`PermanentDeliveryError` unless ``response`` is a transaction-response whose
    ``requests`` entries all have a 2xx status (the message names the first entries that do not)."""
    if not isinstance(response, Mapping) or response.get("resourceType") != "Bundle" or response.get("type") != "transaction-response":
        what = response.get("resourceType") if isinstance(response, Mapping) else type(response).__name__
        raise PermanentDeliveryError(f"the target answered the transaction with {what!r}, not a transaction-response Bundle")
    entries = response.get("entry") or []
    if len(entries) != requests:
        raise PermanentDeliveryError(f"the transaction-response has {len(entries)} entries for {requests} requests")
    refused = []
    for index, entry in enumerate(entries):
        answer = _answer(entry)
        status = str(answer.get("status") or "").strip()
        if not status.startswith("2"):
            refused.append(f"entry[{index}] {status or 'without a status'}{_outcome_text(answer)}")
    if refused:
        shown = "; ".join(refused[:3]) + (f"; and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise PermanentDeliveryError(f"the target refused {len(refused)} of {requests} entries: {shown}")


def _answer(entry: Any) -> Mapping[str, Any]:
    """``entry.response`` of a transaction-response entry ({} when it is missing or malformed)."""
    answer = entry.get("response") if isinstance(entry, Mapping) else None
    return answer if isinstance(answer, Mapping) else {}


def _outcome_text(answer: Mapping[str, Any]) -> str:
    outcome = answer.get("outcome")
    issues = outcome.get("issue") if isinstance(outcome, Mapping) else None
    texts = [str(i.get("diagnostics")) for i in issues or () if isinstance(i, Mapping) and i.get("diagnostics")]
    return f" ({'; '.join(texts)})" if texts else ""


CHANNELS: dict[str, ChannelFactory] = {"fhir": FhirChannel, "ncpdp": NcpdpChannel}


@dataclass
class PassResult:
    """What one pass did (summed over its destinations)."""

    reclaimed: int = 0  # deliveries whose lease had expired, made due again (or dead)
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    requests: int = 0  # channel calls, splits included
    lost: int = 0  # deliveries whose lease ran out before their outcome was recorded

    def add(self, other: PassResult) -> None:
        for counter in fields(PassResult):
            setattr(self, counter.name, getattr(self, counter.name) + getattr(other, counter.name))


@dataclass
class DrainResult(PassResult):
    """What :meth:`Worker.drain` did, and what it left: ``pending`` deliveries still queued,
    in flight or waiting for a retry after ``max_wait`` (0 when the queue drained)."""

    passes: int = 0
    pending: int = 0
    seconds: float = 0.0
    left: dict[str, int] = field(default_factory=dict)  # pending by destination


@dataclass(frozen=True)
class WorkerOptions:
    """The worker's settings (``WORKER_LEASE``, ``WORKER_POLL``, ``WORKER_NAME``,
    ``MAT_CHECK_INTERVAL``), checked."""

    lease: timedelta | None
    poll: float
    name: str | None
    mat_check_interval: float = DEFAULT_MAT_CHECK_INTERVAL

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> WorkerOptions:
        """:raises ConfigError: naming the setting that is not usable."""
        lease = settings.get("WORKER_LEASE")
        name = settings.get("WORKER_NAME")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigError(f"WORKER_NAME must be a non-empty string, not {name!r}")
        return cls(
            timedelta(seconds=_seconds("WORKER_LEASE", lease)) if lease is not None else None,
            _seconds("WORKER_POLL", settings.get("WORKER_POLL", DEFAULT_POLL)),
            name,
            _seconds("MAT_CHECK_INTERVAL", settings.get("MAT_CHECK_INTERVAL", DEFAULT_MAT_CHECK_INTERVAL)),
        )


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{key} must be a positive number of seconds, not {value!r}")
    return float(value)


def default_name() -> str:
    """``host:pid``: unique among the workers sharing a queue, and says where to look."""
    return f"{socket.gethostname()}:{os.getpid()}"


def default_lease(destination: Destination) -> timedelta:
    """Long enough for two full requests (a split's second half) before anyone else may retry."""
    return timedelta(seconds=2 * (destination.connect_timeout + destination.read_timeout) + LEASE_MARGIN)


def backoff_delay(destination: Destination, attempts: int, rng: random_module.Random, retry_after: float | None = None) -> float:
    """Seconds before the next attempt: full-jitter exponential backoff, at least ``retry_after``.

    Full jitter (a uniform draw up to the exponential cap) spreads the retries of many workers
    that failed together, so a recovering target is not hit by all of them at once.
    """
    cap = min(destination.backoff_max, destination.backoff_base * 2 ** max(attempts - 1, 0))
    delay = rng.uniform(0, cap)
    return max(delay, retry_after) if retry_after is not None and retry_after > 0 else delay


def _error_text(exc: BaseException) -> str:
    status = getattr(exc, "http_status", None)
    text = f"{type(exc).__name__}: {exc}" + (f" (HTTP {status})" if status else "")
    return text[:ERROR_LENGTH]


class Worker:
    """Delivers the outbox to ``destinations`` (by name); see the module doc for the rules.

    :param name: the lease owner (default ``host:pid``); unique per running worker.
    :param lease: one lease for every destination; default :func:`default_lease` per destination.
    :param channels: how each destination kind is reached (``kind -> factory``).
    :param clock: aware UTC datetimes; default the store's clock, which the outbox also reads.
    :param sleep: how :meth:`drain` waits (tests pass a fake that advances their clock).
    :param random: the jitter's source (seed it for reproducible backoffs).
    :param poll: seconds :meth:`run` sleeps when a pass found nothing to do.
    :param mat_check: what :meth:`run` calls every ``mat_check_interval`` seconds (by ``clock``):
        the scheduled overdue-MAT check (:func:`~iop_fhir.pharmacy.monitor.check_adherence`).
    :param audit: the audit log of what leaves (``AuditLog.from_settings``); default settings
        when None.
    """

    def __init__(
        self,
        store: Store,
        destinations: Mapping[str, Destination],
        *,
        name: str | None = None,
        lease: timedelta | None = None,
        channels: Mapping[str, ChannelFactory] = CHANNELS,
        clock: Callable[[], datetime] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        random: random_module.Random | None = None,
        poll: float = DEFAULT_POLL,
        mat_check: Callable[[], object] | None = None,
        mat_check_interval: float = DEFAULT_MAT_CHECK_INTERVAL,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        self.outbox = store.outbox
        self.name = name or default_name()
        self.lease = lease
        self.channels = channels
        self.clock = clock or store.clock
        self.sleep = sleep
        self.random = random or random_module.Random()
        self.poll = poll
        self.destinations: dict[str, Destination] = {}
        for destination in destinations.values():
            if not destination.enabled:
                log.info("destination %s is disabled: not delivering to it", destination.name)
            elif destination.kind not in channels:
                log.warning("destination %s: no channel delivers kind %r yet; its deliveries wait", destination.name, destination.kind)
            else:
                self.destinations[destination.name] = destination
                if lease is not None and lease.total_seconds() < destination.connect_timeout + destination.read_timeout:
                    log.warning(
                        "destination %s: the lease (%.0f s) is shorter than one request's timeouts (%.0f s); "
                        "a slow request may be repeated by another worker",
                        destination.name, lease.total_seconds(), destination.connect_timeout + destination.read_timeout,
                    )  # fmt: skip
        attempts = [d.max_attempts for d in self.destinations.values()]
        self.reclaim_max_attempts = min(attempts) if attempts else None
        self._open: dict[str, Channel] = {}
        # One gate and audit log for every channel: what leaves is decided and audited (issue 6 §3).
        self.audit = audit or AuditLog(store)
        self.gate = PrivacyGate(store, self.audit, clock=self.clock)
        self._pulled: dict[str, float] = {}  # destination -> time.monotonic() of its last scheduled pull
        self.mat_check = mat_check
        self.mat_check_interval = mat_check_interval
        self._mat_checked: datetime | None = None  # when the scheduled MAT check last ran

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every channel opened so far, then write what the audit log holds."""
        while self._open:
            _, channel = self._open.popitem()
            try:
                channel.close()
            except Exception:  # closing must not hide the outcome being reported
                log.exception("closing a channel failed")
        self.audit.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _channel(self, destination: Destination) -> Channel:
        channel = self._open.get(destination.name)
        if channel is None:
            channel = self._open[destination.name] = self.channels[destination.kind](destination, self.store, self.gate)
        return channel

    def lease_for(self, destination: Destination) -> timedelta:
        return self.lease if self.lease is not None else default_lease(destination)

    # --- one pass -------------------------------------------------------------------------------

    def run_once(self, stop: threading.Event | None = None) -> PassResult:
        """Reclaim expired leases, then claim and deliver one batch per destination."""
        result = PassResult(reclaimed=self.outbox.reclaim_expired(max_attempts=self.reclaim_max_attempts))
        if result.reclaimed:
            log.info("reclaimed %d deliveries whose lease had expired", result.reclaimed)
        for destination in self.destinations.values():
            if stop is not None and stop.is_set():
                break
            result.add(self.deliver_batch(destination))
        return result

    def deliver_batch(self, destination: Destination) -> PassResult:
        """Claim one batch for ``destination`` and settle every delivery in it.

        Nothing is claimed while the destination backs off (a failed delivery waits for its
        retry): the target is failing anyway, and what was written later may refer to what failed.
        """
        retry_at = self.outbox.next_retry(destination.name)
        if retry_at is not None and retry_at > self.clock():
            return PassResult()
        lease = self.lease_for(destination)
        batch = self.outbox.claim(self.name, destination=destination.name, limit=destination.batch_size, lease=lease)
        result = PassResult(claimed=len(batch))
        if not batch:
            return result
        started = time.monotonic()
        try:
            channel = self._channel(destination)
        except Exception as exc:  # a channel that cannot even start (bad key file, ...): try later
            log.exception("destination %s: cannot open its channel", destination.name)
            self._transient(destination, batch, TransientDeliveryError(f"cannot open the channel: {exc}"), result)
            return result
        self._deliver(destination, channel, batch, lease, result, first=True)
        log.info(
            "destination %s: batch of %d: %d delivered, %d to retry, %d dead, %d lost leases (%d requests, %.2f s)",
            destination.name, len(batch), result.delivered, result.retried, result.dead, result.lost,
            result.requests, time.monotonic() - started,
        )  # fmt: skip
        return result

    def _deliver(
        self, destination: Destination, channel: Channel, batch: list[Delivery], lease: timedelta, result: PassResult, *, first: bool
    ) -> bool:
        """Deliver ``batch`` (splitting on a permanent refusal); False when a transient failure
        gave it back, so the caller gives back the rest of its batch too (patient order)."""
        if not first:
            held = self.outbox.heartbeat(self.name, [d.id for d in batch], lease=lease)
            if held < len(batch):  # the lease ran out: another worker may have some; give back the rest
                self._transient(destination, batch, TransientDeliveryError("the lease ran out during the batch"), result, spend=False)
                return False
        result.requests += 1
        try:
            notes = channel.deliver(batch) or {}
        except TransientDeliveryError as exc:
            self._transient(destination, batch, exc, result)
            return False
        except PermanentDeliveryError as exc:
            if len(batch) == 1:
                result.dead += self._settled(self.outbox.dead_letter(self.name, [batch[0].id], error=_error_text(exc)), 1, result)
                log.warning("destination %s: delivery %d (%s) is dead: %s", destination.name, batch[0].id, _label(batch[0]), exc)
                return True
            middle = len(batch) // 2
            for index, half in enumerate((batch[:middle], batch[middle:])):
                if not self._deliver(destination, channel, half, lease, result, first=False):
                    if index == 0:  # the second half waits with the first: it may hold the same patients
                        held_back = TransientDeliveryError("held back behind an earlier part of its batch")
                        self._transient(destination, batch[middle:], held_back, result, spend=False)
                    return False
            return True
        except Exception as exc:  # a bug in a channel must not kill the worker: retry, dead in the end
            log.exception("destination %s: the channel failed unexpectedly", destination.name)
            self._transient(destination, batch, TransientDeliveryError(f"unexpected {type(exc).__name__}: {exc}"), result)
            return False
        result.delivered += self._settled(self._delivered(batch, notes), len(batch), result)
        return True

    def _delivered(self, batch: Sequence[Delivery], notes: Mapping[int, str]) -> int:
        """Mark the batch delivered, each with the channel's note on it (what was withheld)."""
        by_note: dict[str | None, list[int]] = {}
        for delivery in batch:
            by_note.setdefault(notes.get(delivery.id), []).append(delivery.id)
        return sum(self.outbox.delivered(self.name, ids, note=note) for note, ids in by_note.items())

    def _transient(
        self, destination: Destination, batch: Sequence[Delivery], exc: TransientDeliveryError, result: PassResult, *, spend: bool = True
    ) -> None:
        """Retry later with backoff; deliveries out of attempts go dead instead (unless ``spend`` is
        False: they were held back unsent, so this claim's attempt does not count against them)."""
        error = _error_text(exc)
        spent = [d.id for d in batch if spend and d.attempts >= destination.max_attempts]
        again = [d for d in batch if d.id not in spent]
        if spent:
            result.dead += self._settled(self.outbox.dead_letter(self.name, spent, error=error), len(spent), result)
            log.warning("destination %s: %d deliveries dead after %d attempts: %s", destination.name, len(spent), destination.max_attempts, exc)
        if again:
            attempts = max(d.attempts for d in again)
            delay = backoff_delay(destination, attempts, self.random, exc.retry_after)
            at = self.clock() + timedelta(seconds=delay)
            result.retried += self._settled(self.outbox.retry(self.name, [d.id for d in again], error=error, at=at), len(again), result)
            log.info("destination %s: %d deliveries retry in %.1f s: %s", destination.name, len(again), delay, exc)

    @staticmethod
    def _settled(count: int, expected: int, result: PassResult) -> int:
        """Count what was recorded; the rest had lost their lease (another worker redelivers)."""
        result.lost += expected - count
        return count

    # --- loops ------------------------------------------------------------------------------------

    def drain(self, *, max_wait: float = DEFAULT_MAX_WAIT) -> DrainResult:
        """Pass after pass until nothing is left to deliver (``iop-fhir worker --once``).

        When a pass finds nothing due, it sleeps until the next retry or lease expiry; it stops
        when the queue is empty or when what is left is not due within ``max_wait`` seconds of
        the start (those stay queued, counted in ``pending``).
        """
        started = time.monotonic()
        deadline = self.clock() + timedelta(seconds=max_wait)
        names = list(self.destinations)
        total = DrainResult()
        while names:
            result = self.run_once()
            total.add(result)
            total.passes += 1
            if result.claimed:
                continue
            due = self.outbox.next_due(names)
            if due is None:
                if not self._pending(names):
                    break
                due = self.clock()  # queued but not claimed (another worker's turn): look again soon
            if due > deadline:
                break
            self.sleep(min(max((due - self.clock()).total_seconds(), MIN_SLEEP), self.poll))
        total.left = self._pending(names)
        total.pending = sum(total.left.values())
        total.seconds = time.monotonic() - started
        return total

    def pull_due(self) -> dict[str, PullResult]:
        """Pull from each FHIR destination with ``pull = true`` whose ``pull_interval`` has passed
        since its last pull (the first pull runs at once). A failed pull is logged and tried
        again at the next interval; it never stops deliveries."""
        done: dict[str, PullResult] = {}
        now = time.monotonic()
        for destination in self.destinations.values():
            if not destination.pull or destination.kind != "fhir":
                continue
            last = self._pulled.get(destination.name)
            if last is not None and now - last < destination.pull_interval:
                continue
            self._pulled[destination.name] = now
            try:
                with FhirClient(destination) as client:
                    done[destination.name] = result = pull(self.store, destination, client)
            except IopFhirError as exc:
                log.warning("destination %s: pull failed: %s", destination.name, exc.message)
                continue
            log.info(
                "destination %s: pulled %d resources for %d patients: %d stored, %d new conflicts, %d reported",
                destination.name, result.fetched, result.patients, result.stored, result.conflicts, len(result.reported),
            )  # fmt: skip
        return done

    def mat_check_due(self) -> bool:
        """Run the MAT check when ``mat_check_interval`` has passed since it last ran (the first
        at once); False when it was not due. A failed check is logged and runs again at the next
        interval; it never stops deliveries."""
        now = self.clock()
        if self.mat_check is None or (self._mat_checked is not None and (now - self._mat_checked).total_seconds() < self.mat_check_interval):
            return False
        self._mat_checked = now
        try:
            self.mat_check()
        except Exception:
            log.exception("the scheduled MAT refill check failed; next in %.0f s", self.mat_check_interval)
        return True

    def _pending(self, names: Iterable[str]) -> dict[str, int]:
        stats = self.outbox.stats()
        pending = {}
        for name in names:
            s = stats.get(name)
            if s is not None and s.queued + s.in_flight + s.failed:
                pending[name] = s.queued + s.in_flight + s.failed
        return pending

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set (SIGTERM/SIGINT in the CLI); the batch in hand is finished.

        A pass that fails outside delivery (the database away) is logged and tried again after
        ``poll`` seconds: the worker outlives a database restart.
        """
        log.info("worker %s delivering to %s", self.name, ", ".join(self.destinations) or "no destination")
        while not stop.is_set():
            try:
                result = self.run_once(stop)
                self.pull_due()
                self.mat_check_due()
            except Exception:
                log.exception("worker pass failed; trying again in %.1f s", self.poll)
                stop.wait(self.poll)
                continue
            if not result.claimed:
                stop.wait(self.poll)
        log.info("worker %s stopped", self.name)


def _label(delivery: Delivery) -> str:
    return f"{delivery.resource_type}/{delivery.resource_id} v{delivery.version_id}"


__all__ = [
    "CHANNELS",
    "Channel",
    "DrainResult",
    "FhirChannel",
    "PassResult",
    "Worker",
    "WorkerOptions",
    "backoff_delay",
    "check_transaction_response",
    "default_lease",
]
