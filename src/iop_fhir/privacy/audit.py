"""The audit trail: an AuditEvent for every access, write, disclosure and refusal (issue 6 §4).

:func:`audit_event` builds one FHIR R4 AuditEvent; :class:`AuditLog` stores them as resources
(searchable at ``/fhir/AuditEvent``, never editable through the API, never routed to a
destination):

* with a unit of work, in the caller's transaction, so a write and its audit commit together
  or not at all (queued for indexing like the buffered ones, below);
* otherwise buffered, and written in one transaction by a background thread every
  ``flush_interval`` seconds or as soon as ``max_buffer`` events wait, so a read pays for an
  append to a list, not for a database write. The buffer is flushed at exit (``atexit``, and
  by the server's worker-exit hook, see ``serve.py``): what a process killed outright
  (SIGKILL, power loss) held is lost, at most ``flush_interval`` seconds of reads.

  Buffered events are written to the store's append queue (``Store.append(...,
  index_later=True)``: one row each, final), and indexed for search when the gateway is
  nearly idle (a flush interval in which this process recorded no event, read or write, and
  all processes together queued at most ``QUIET_EVENTS``) or, under sustained load, as soon
  as more than ``index_backlog`` events wait. Indexing an event costs several times what storing it does;
  leaving it for idle time keeps it off the requests' path. Nothing is ever missing from an
  answer: every read, search or history of AuditEvents indexes what is queued first (so the
  first query after a long burst waits for that work).

The codes, as R4 defines them (and IHE BALP uses them):

===================  =====================================================================
``type``             ``audit-event-type#rest`` for a RESTful interaction; DICOM ``110106``
                     *Export* for a disclosure (data leaving the gateway for a recipient)
``subtype``          the ``restful-interaction`` code (``read``, ``search-type``, ``create``,
                     ...), or ISO 21089 lifecycle ``disclose``; ``break-the-glass`` (our code
                     system ``audit``) marks what only an emergency let out
``action``           C R U D E (a search and an operation are E, Execute)
``outcome``          0 success, 4 minor failure (a 4xx, a refusal, data withheld),
                     8 serious failure (a 5xx)
``agent``            the requesting client (``altId`` its client id, DICOM 110153 *Source
                     Role ID*, ``requestor``), and the recipient of a disclosure
                     (v3-ParticipationType ``IRCP``, ``who`` its reference or identifier)
``entity``           each resource (object-role 4 *Domain Resource*, ``what`` its versioned
                     reference), the patient (object-role 1 *Patient*), a query (object-role
                     24, the query base64 in ``query`` and as text in ``description``), and
                     the consents relied on (object-role 13 *Security Resource*)
``purposeOfEvent``   the purpose of use (v3-ActReason); ``ETREAT`` is added for break-the-glass
===================  =====================================================================

The exit (``rest``, ``sync:<destination>``, ...) is the extension :data:`EXIT_EXTENSION`.

:func:`accounting` reads a patient's accounting of disclosures back from the stored events
(``iop-fhir disclosures``): every disclosure event (``disclose``, outcome 0) naming the patient.
"""

from __future__ import annotations

import atexit
import base64
import functools
import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from iop_fhir import terminology
from iop_fhir.errors import IopFhirError, Issue
from iop_fhir.privacy.consent import Recipient
from iop_fhir.privacy.labels import reference_key
from iop_fhir.store import Store, UnitOfWork, instant
from iop_fhir.store.search_index import parse_reference

log = logging.getLogger(__name__)

JSON = dict[str, Any]

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
LIFECYCLE = "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
AUDIT_CODES = terminology.code_system("audit")  # our own: break-the-glass
EXIT_EXTENSION = terminology.extension_url("disclosure-exit")
CLIENT_ID_SYSTEM = f"{terminology.CANONICAL}/sid/oauth-client"  # agent.who.identifier of a client

RESTFUL = frozenset(
    {
        "read", "vread", "update", "patch", "delete", "history", "history-instance", "history-type", "history-system",
        "create", "search", "search-type", "search-system", "capabilities", "transaction", "batch", "operation",
    }
)  # fmt: skip
DISCLOSE = "disclose"
BREAK_THE_GLASS = "break-the-glass"
ACTIONS = frozenset("CRUDE")
OUTCOMES = {"0": "success", "4": "minor failure", "8": "serious failure", "12": "major failure"}
# AuditEvents are the program's security records: read and searched, never written through the API.
READ_ONLY_TYPES = frozenset({"AuditEvent"})


class ReadOnlyResource(IopFhirError):
    """A write to a type the API only reads (AuditEvent): 405, naming what is allowed."""

    status = 405
    issue_code = "not-supported"

    def __init__(self, resource_type: str, location: str = "") -> None:
        message = f"{resource_type} resources are the audit trail: they can be read and searched, never created, changed or deleted"
        super().__init__(message, [Issue(message, location=location, code="not-supported")])
        self.headers = {"Allow": "GET"}


def refuse_write(resource_type: str, location: str = "") -> None:
    """Raise :class:`ReadOnlyResource` for a write to a read-only type."""
    if resource_type in READ_ONLY_TYPES:
        raise ReadOnlyResource(resource_type, location)


# --- one AuditEvent --------------------------------------------------------------------------------


def _coding(system: str, code: str, display: str | None = None) -> JSON:
    return {"system": system, "code": code, **({"display": display} if display else {})}


def _purpose(code: str) -> JSON:
    return {"coding": [_coding(terminology.V3_ACT_REASON, code)]}


def _who(recipient: Recipient) -> JSON:
    """The recipient as a Reference: its first reference and identifier (both when it has them)."""
    who: JSON = {}
    if recipient.references:
        who["reference"] = sorted(recipient.references)[0]
    if recipient.identifiers:
        system, value = sorted(recipient.identifiers)[0]
        who["identifier"] = {"system": system, "value": value}
    return who


def recipient_name(recipient: Recipient) -> str:
    """How the accounting of disclosures names a recipient: its references and identifiers."""
    names = sorted(recipient.references) + [f"{s}|{v}" for s, v in sorted(recipient.identifiers)]
    return ", ".join(names) or "unidentified recipient"


def _entity(text: str, consents: frozenset[str]) -> JSON:
    """An entity from a reference (``Type/id``, ``Type/id/_history/v``) or a query (anything else)."""
    found = parse_reference(text) if "?" not in text else None
    if found is None or found[0] is None:
        return {
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "24", "Query"),
            "description": text,
            "query": base64.b64encode(text.encode("utf-8")).decode("ascii"),
        }
    if found[0] == "Patient":
        return {"what": {"reference": text}, "type": _coding(ENTITY_TYPE, "1", "Person"), "role": _coding(OBJECT_ROLE, "1", "Patient")}
    if reference_key(text) in consents:
        return {"what": {"reference": text}, "type": _coding(ENTITY_TYPE, "2", "System Object"), "role": _coding(OBJECT_ROLE, "13", "Security Resource")}
    return {"what": {"reference": text}, "type": _coding(ENTITY_TYPE, "2", "System Object"), "role": _coding(OBJECT_ROLE, "4", "Domain Resource")}


def audit_event(
    *,
    action: str,
    subtype: str,
    outcome: str,
    who: str,
    recipient: Recipient | None,
    entities: Sequence[str],
    patient: str | None,
    purpose: str | None,
    exit: str,
    consents: Iterable[str] = (),
    break_glass: bool = False,
    detail: str | None = None,
    recorded: datetime,
) -> JSON:
    """One R4 AuditEvent (see the module doc for the codes).

    :param action: C, R, U, D or E.
    :param subtype: a ``restful-interaction`` code, or ``disclose`` for a disclosure.
    :param outcome: ``0``, ``4``, ``8`` or ``12``.
    :param who: the requesting client's id (or the destination, for a delivery).
    :param recipient: to whom the data went; None when it stayed with the program.
    :param entities: what was touched: references (``Type/id``, versioned or not) or a query.
    :param patient: ``Patient/{id}`` the event is about (added as the patient entity).
    :param exit: where the data left (``rest``, ``everything``, ``sync:ehr``, ...).
    :param consents: the consents a disclosure relied on (``Consent/{id}``).
    :param break_glass: only a medical emergency let the data out.
    :param detail: ``outcomeDesc``: why it failed, what was withheld.
    :raises ValueError: an action, subtype or outcome R4 does not have.
    """
    if action not in ACTIONS or len(action) != 1:
        raise ValueError(f"AuditEvent.action {action!r} is not one of C R U D E")
    if outcome not in OUTCOMES:
        raise ValueError(f"AuditEvent.outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
    if subtype in RESTFUL:
        kind, subtypes = _coding(AUDIT_EVENT_TYPE, "rest", "RESTful Operation"), [_coding(RESTFUL_INTERACTION, subtype, subtype)]
    elif subtype == DISCLOSE:
        kind, subtypes = _coding(DICOM, "110106", "Export"), [_coding(LIFECYCLE, DISCLOSE, "Disclose")]
    else:
        raise ValueError(f"AuditEvent subtype {subtype!r} is neither a restful-interaction code nor {DISCLOSE!r}")
    if break_glass:
        subtypes.append(_coding(AUDIT_CODES, BREAK_THE_GLASS, "Emergency access without consent (break the glass)"))
    purposes = [purpose] if purpose else []
    if break_glass and "ETREAT" not in purposes:
        purposes.append("ETREAT")
    requester: JSON = {
        "type": {"coding": [_coding(DICOM, "110153", "Source Role ID")]},
        "who": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": who}, "display": who},
        "altId": who,
        "name": who,
        "requestor": True,
    }
    if purposes:
        requester["purposeOfUse"] = [_purpose(p) for p in purposes]
    agents = [requester]
    if recipient is not None:
        receiving: JSON = {
            "type": {"coding": [_coding(terminology.V3_PARTICIPATION_TYPE, "IRCP", "information recipient")]},
            "name": recipient_name(recipient),
            "requestor": False,
        }
        if who_ref := _who(recipient):
            receiving["who"] = who_ref
        agents.append(receiving)
    used = frozenset(reference_key(c) for c in consents)
    texts = list(dict.fromkeys(entities))
    if patient and not any(reference_key(t) == reference_key(patient) for t in texts if "?" not in t):
        texts.insert(0, patient)
    texts += [c for c in sorted(used) if c not in {reference_key(t) for t in texts if "?" not in t}]
    event: JSON = {
        "resourceType": "AuditEvent",
        "extension": [{"url": EXIT_EXTENSION, "valueString": exit}],
        "type": kind,
        "subtype": subtypes,
        "action": action,
        "recorded": instant(recorded),
        "outcome": outcome,
    }
    if detail:
        event["outcomeDesc"] = detail
    if purposes:
        event["purposeOfEvent"] = [_purpose(p) for p in purposes]
    event["agent"] = agents
    event["source"] = {
        "site": "iop-fhir",
        "observer": {"display": "iop-fhir gateway"},
        "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
    }
    if texts:
        event["entity"] = [_entity(t, used) for t in texts]
    return event


# --- storing them ----------------------------------------------------------------------------------

INDEX_CHUNK = 200  # queued events indexed per idle tick: a short hold of the write lock (~20 ms)
QUIET_EVENTS = INDEX_CHUNK // 10  # events all processes may queue in a tick that still counts as quiet
HARD_LIMIT_FACTOR = 4  # buffered events beyond max_buffer x this: the recording thread writes them itself
KEEP_ON_FAILURE_FACTOR = 20  # events kept for a retry while the database fails, beyond which the oldest go


class AuditLog:
    """Stores AuditEvents: in the caller's unit of work, or buffered (see the module doc).

    Thread-safe; one per process and store. The background thread starts with the first
    buffered event (and again in a forked worker, which inherits no thread and none of the
    parent's buffer), and holds the log only weakly, so a log nobody uses any more goes away.
    """

    def __init__(self, store: Store, *, flush_interval: float = 0.1, max_buffer: int = 500, index_backlog: int = 50_000) -> None:
        if flush_interval <= 0 or max_buffer < 1 or index_backlog < 0:
            raise ValueError("flush_interval must be positive, max_buffer at least 1 and index_backlog not negative")
        self.store = store
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self.index_backlog = index_backlog
        self._pending: list[JSON] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self.lost = 0  # events dropped after the database failed for too long
        self._recorded = 0  # events recorded since the flusher last looked (busy or idle)
        self._newest_seen: int | None = None  # the append queue's newest number at the last index()
        ref = weakref.ref(self)
        atexit.register(_close_at_exit, ref)
        os.register_at_fork(after_in_child=functools.partial(_after_fork, ref))

    @classmethod
    def from_settings(cls, store: Store, settings: Mapping[str, Any]) -> AuditLog:
        """The audit log the settings describe (``AUDIT_FLUSH_INTERVAL``, ``AUDIT_MAX_BUFFER``,
        ``AUDIT_INDEX_BACKLOG``): the gateway's and the delivery worker's alike."""
        return cls(
            store,
            flush_interval=settings["AUDIT_FLUSH_INTERVAL"],
            max_buffer=settings["AUDIT_MAX_BUFFER"],
            index_backlog=settings["AUDIT_INDEX_BACKLOG"],
        )

    @property
    def pending(self) -> int:
        """Events buffered and not yet written."""
        with self._lock:
            return len(self._pending)

    def record(self, event: JSON, *, uow: UnitOfWork | None = None) -> None:
        """Store ``event``: with ``uow`` now, in the caller's transaction; else buffered."""
        self._recorded += 1  # approximate (unlocked) is enough: it only tells busy from idle
        if uow is not None:
            uow.append([event], index_later=True)
            self._start()
            return
        with self._lock:
            self._pending.append(event)
            waiting = len(self._pending)
        if waiting >= self.max_buffer * HARD_LIMIT_FACTOR:
            self.flush()  # the flusher falls behind (a slow database): the recorder waits, memory stays bounded
            return
        self._start()
        if waiting >= self.max_buffer:
            self._wake.set()

    def flush(self) -> int:
        """Write every buffered event in one transaction; returns how many. A database failure
        keeps them for the next attempt (the oldest beyond a limit are dropped, counted in
        ``lost`` and logged)."""
        with self._flushing:
            with self._lock:
                events, self._pending = self._pending, []
            if not events:
                return 0
            try:
                return self.store.append(events, index_later=True)
            except Exception:
                log.exception("cannot write %d audit events; keeping them for the next attempt", len(events))
                with self._lock:
                    self._pending[:0] = events
                    excess = len(self._pending) - self.max_buffer * KEEP_ON_FAILURE_FACTOR
                    if excess > 0:
                        del self._pending[:excess]
                        self.lost += excess
                        log.error("dropped the %d oldest audit events: the database has refused them too long", excess)
                return 0

    def took_events(self) -> bool:
        """Whether any event was recorded since the last call (the flusher's busy/idle test:
        a process serving only writes buffers nothing, yet it is not idle)."""
        recorded, self._recorded = self._recorded, 0
        return recorded > 0

    def index(self, *, idle: bool) -> int:
        """Index queued events: a chunk when the store is quiet, else only when more than
        ``index_backlog`` wait (then towards that bound). At most one chunk per call, so the
        write lock is held briefly and the requests' writes go on between chunks. Returns how
        many were indexed.

        Quiet means this process is ``idle`` (it recorded nothing since the last call) and all
        processes together queued at most :data:`QUIET_EVENTS` events since the last call (the
        newest queued number moved that little; 200 a second at the default interval): a
        worker that is idle only because its siblings got the connections of a busy gateway
        must not spend the cores they are serving on, yet a trickle of requests does not stop
        indexing.
        """
        span = self.store.appended_span()
        if span is None:  # nothing waits
            self._newest_seen = None
            return 0
        seen, self._newest_seen = self._newest_seen, span.newest
        quiet = idle and seen is not None and span.newest - seen <= QUIET_EVENTS
        backlog = span.backlog
        wanted = min(backlog if quiet else backlog - self.index_backlog, INDEX_CHUNK)
        return self.store.index_appended(wanted, wait=False) if wanted > 0 else 0

    def close(self) -> None:
        """Stop the background thread and write what is buffered."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(max(1.0, 10 * self.flush_interval))
        self._thread = None
        self.flush()
        if self.pending:
            log.error("%d audit events could not be written before exit", self.pending)

    def _start(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if (self._thread is not None and self._thread.is_alive()) or self._stop.is_set():
                return
            self._pid = os.getpid()
            thread = threading.Thread(
                target=_run, args=(weakref.ref(self), self._stop, self._wake, self.flush_interval), name="iop-fhir-audit", daemon=True
            )
            self._thread = thread
            thread.start()

    def _reset_after_fork(self) -> None:
        """In a forked child: no thread, fresh locks, and none of the parent's buffer (the parent writes it)."""
        self._pending = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        self._pid = os.getpid()
        self._recorded = 0
        self._newest_seen = None


def _run(ref: weakref.ref[AuditLog], stop: threading.Event, wake: threading.Event, interval: float) -> None:
    """The flusher: every ``interval`` seconds, or when woken, write what is buffered, then
    index queued events (a chunk when no event was recorded since the last tick: idle)."""
    while not stop.is_set():
        wake.wait(interval)
        wake.clear()
        audit = ref()
        if audit is None:
            return
        try:
            audit.flush()
            if not stop.is_set() and not audit.pending:  # events left pending: the database refused them
                audit.index(idle=not audit.took_events())
        except Exception:  # flush logs database failures itself; anything else must not kill the thread
            log.exception("the audit flusher failed")
        del audit


def _close_at_exit(ref: weakref.ref[AuditLog]) -> None:
    audit = ref()
    if audit is not None:
        audit.close()


def _after_fork(ref: weakref.ref[AuditLog]) -> None:
    audit = ref()
    if audit is not None:
        audit._reset_after_fork()


# --- the accounting of disclosures -----------------------------------------------------------------


@dataclass(frozen=True)
class Accounted:
    """One disclosure in a patient's accounting: when, to whom, through which exit, what, under
    which consent (or by breaking the glass)."""

    recorded: str
    recipient: str
    client: str
    exit: str
    purpose: str | None
    resources: tuple[str, ...]
    consents: tuple[str, ...]
    break_glass: bool
    event: str  # AuditEvent/{id}

    def counts(self) -> dict[str, int]:
        """Resources disclosed, by type."""
        return dict(sorted(Counter(r.split("/", 1)[0] for r in self.resources).items()))

    def as_json(self) -> JSON:
        return {
            "date": self.recorded,
            "recipient": self.recipient,
            "client": self.client,
            "exit": self.exit,
            "purpose": self.purpose,
            "counts": self.counts(),
            "resources": list(self.resources),
            "consents": list(self.consents),
            "break_glass": self.break_glass,
            "audit_event": self.event,
        }


def _accounted(event: JSON) -> Accounted:
    agents = [a for a in event.get("agent") or () if isinstance(a, dict)]
    requester = next((a for a in agents if a.get("requestor")), {})
    receiving = next((a for a in agents if not a.get("requestor")), {})
    roles: dict[str, list[str]] = {}
    for entity in event.get("entity") or ():
        role = (entity.get("role") or {}).get("code")
        reference = (entity.get("what") or {}).get("reference")
        if isinstance(reference, str):
            roles.setdefault(str(role), []).append(reference)
    exits = [e.get("valueString") for e in event.get("extension") or () if e.get("url") == EXIT_EXTENSION]
    purposes = [c.get("code") for cc in event.get("purposeOfEvent") or () for c in cc.get("coding") or ()]
    return Accounted(
        recorded=str(event.get("recorded")),
        recipient=str(receiving.get("name") or "the program itself"),
        client=str(requester.get("altId") or requester.get("name") or ""),
        exit=str(exits[0]) if exits else "",
        purpose=purposes[0] if purposes else None,
        resources=tuple(roles.get("4", ())),
        consents=tuple(roles.get("13", ())),
        break_glass=any(c.get("system") == AUDIT_CODES and c.get("code") == BREAK_THE_GLASS for c in event.get("subtype") or ()),
        event=f"AuditEvent/{event.get('id')}",
    )


def accounting(store: Store, patient: str, *, since: str | None = None) -> list[Accounted]:
    """The accounting of disclosures of one patient (42 CFR 2.24, HIPAA 164.528), oldest first.

    :param patient: ``Patient/{id}`` or the id.
    :param since: a FHIR date or dateTime: only disclosures from then on.
    """
    from iop_fhir.api.operations import every  # the api package imports this module

    reference = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    criteria = [("patient", reference), ("subtype", f"{LIFECYCLE}|{DISCLOSE}"), ("outcome", "0")]
    if since:
        criteria.append(("date", f"ge{since}"))
    found = [_accounted(saved.resource) for saved in every(store, "AuditEvent", criteria)]
    return sorted(found, key=lambda a: (a.recorded, a.event))
