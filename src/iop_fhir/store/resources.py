"""The versioned resource store: every version of every resource, search, and the outbox.

Callers see resources and :class:`Saved` results, never a database session::

    store = Store.open("sqlite:///var/iop-fhir.db")
    saved = store.create(patient, if_none_exist="identifier=https://x/mrn|123", deliver_to=["ehr"])
    store.read("Patient", saved.id).data          # the JSON bytes to serve, as stored
    with store.unit() as uow:                      # a FHIR transaction Bundle: all or nothing
        uow.update("Patient", "p1", patient)
        uow.create(observation)

Every write of a version, its search-index rows, its identifiers and its outbox rows happens
in one database transaction. A write whose content equals the current version (ignoring
``meta.versionId`` and ``meta.lastUpdated``) writes nothing, so IOP re-posts create no
versions and no deliveries.

Concurrency: writers of one resource are serialised (PostgreSQL: an advisory lock per
resource, per conditional criterion; SQLite: the database write lock). Business identifiers
are unique per (type, system, value) by a database constraint; a writer that loses a race
on it rolls back its attempt and re-reads, so parallel conditional creates give one resource.

JSON: resources are dicts as :func:`iop_fhir.formats.fhir_json.loads` gives them; parse with
``exact_decimals=True`` so ``1.50`` is stored as ``1.50``. The stored bytes are what
:func:`~iop_fhir.formats.fhir_json.dumps` writes for the resource plus ``id`` and ``meta``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import BigInteger, Connection, Engine, Select, and_, bindparam, delete, false, func, literal_column, select, type_coerce, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from iop_fhir.errors import Gone, Issue, NotFound, PreconditionFailed, RecordInvalid, VersionConflict
from iop_fhir.formats import fhir_json
from iop_fhir.store import db, search_index
from iop_fhir.store.migrations import migrate
from iop_fhir.store.messages import MessageStore
from iop_fhir.store.outbox import Outbox, enqueue
from iop_fhir.store.paging import Page, SortKey, fetch_page
from iop_fhir.store.search_index import InvalidSearch
from iop_fhir.store.tables import (
    SEARCH_TABLES,
    append_queue,
    from_micros,
    identifier,
    metadata,
    resource_current,
    resource_version,
    sync_cursor,
    to_micros,
)

JSON = dict[str, Any]
T = TypeVar("T")
Clock = Callable[[], datetime]
# Which destinations a change goes to when the caller does not say: (type, resource) -> names.
# which destinations a change goes to: (resource type, resource, its patient's "Patient/{id}" or None)
Router = Callable[[str, JSON, str | None], Iterable[str]]
# Sets a resource's security labels before it is stored (iop_fhir.privacy.label): gets the
# resource and a look-up of the current version a reference names, returns the labelled copy.
Labeller = Callable[[JSON, Callable[[str], JSON | None]], JSON]
SearchParams = str | Sequence[tuple[str, str]]

ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# The audit trail (an AuditEvent per access) is not the record's history: whole-system history
# leaves it out, or every poll of it would bring back the events of the polls before.
OUTSIDE_SYSTEM_HISTORY = frozenset({"AuditEvent"})
# The types Store.append may queue for indexing later: every read of them catches up first.
APPEND_ONLY_TYPES = frozenset({"AuditEvent"})
INDEX_CHUNK = 1000  # queued resources indexed per transaction
ATTEMPTS = 3  # a write that loses a race on a unique key is retried this often
DEFAULT_COUNT = 20


def new_id() -> str:
    """A server-assigned id for a write-once resource (the audit trail): a UUID version 7
    (RFC 9562), which begins with the creation time in milliseconds. Ids made one after
    another sort together, so each event's rows go at the end of the indexes keyed by id
    instead of at a random page of each: far fewer pages written per event. Care data keeps
    random ids (version 4): an id travels in references to parties who may not see the
    resource, and a Patient id must not tell when someone was admitted."""
    millis = time.time_ns() // 1_000_000
    random = int.from_bytes(os.urandom(10), "big")
    rand_a, rand_b = random >> 68, random & ((1 << 62) - 1)
    return str(uuid.UUID(int=(millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b))


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Saved:
    """One stored version of a resource, as a read or write returns it.

    :param data: the JSON bytes to serve, exactly as stored (``None`` for a deleted version).
    :param created: this write made the resource exist (new, or re-created after a delete).
    :param changed: this write stored a new version (``False`` for a no-op update, a
        conditional create that found its match, and reads).
    :param patients: the ids of the Patients its ``patient`` search parameter names, when
        the read that found it brought them from the search index (a search page: the audit
        trail's disclosed patients without a query of their own); ``None`` when not asked.
    """

    resource_type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool = False
    data: bytes | None = field(default=None, repr=False)
    created: bool = False
    changed: bool = False
    _resource: JSON | None = field(default=None, repr=False, compare=False)
    patients: frozenset[str] | None = field(default=None, repr=False, compare=False)

    @property
    def resource(self) -> JSON:
        """The resource as a dict (decimals as ``Decimal``), parsed from ``data`` on first use.

        :raises Gone: this is a deleted version.
        """
        if self._resource is None:
            if self.data is None:
                raise Gone(f"{self.reference} version {self.version} is a deletion")
            self._resource = _stored(self.data)
        return self._resource

    @property
    def view(self) -> JSON:
        """The resource parsed for looking at (references, codes, labels), not for serving:
        fractional numbers come as floats (``resource`` keeps them exact). Several times
        cheaper to parse, for the per-response bookkeeping (whose patients a page holds).

        :raises Gone: this is a deleted version.
        """
        if self._resource is not None:
            return self._resource
        if self.data is None:
            raise Gone(f"{self.reference} version {self.version} is a deletion")
        return _looked_at(self.data)

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"

    @property
    def location(self) -> str:
        """``Type/id/_history/version``, the Location of a write."""
        return f"{self.resource_type}/{self.id}/_history/{self.version}"

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


def _stored(data: bytes) -> JSON:
    """Parse the store's own JSON bytes. They passed every FHIR JSON check when written, so
    only the parse is left (decimals exact: ``1.50`` stays ``1.50`` when served again)."""
    resource: JSON = fhir_json.decode(data, True)
    return resource


def _looked_at(data: bytes) -> JSON:
    """The store's JSON parsed for looking at: orjson, or the exact parse for the numbers
    orjson refuses (beyond a double's range, e.g. ``1e400``, which FHIR decimals allow)."""
    try:
        found: JSON = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _stored(data)
    return found


def instant(moment: datetime) -> str:
    """A FHIR ``instant`` in UTC with microseconds: ``2026-01-15T10:00:00.000000Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- reads: one code path for Store and UnitOfWork ---------------------------------------------

rc, rv = resource_current, resource_version
_JOIN = and_(rv.c.resource_type == rc.c.resource_type, rv.c.id == rc.c.id, rv.c.version_id == rc.c.version_id)
_CURRENT = select(rc.c.id, rc.c.version_id, rc.c.deleted, rc.c.last_updated, rv.c.data).join(rv, _JOIN)
_VERSION = select(rv.c.id, rv.c.version_id, rv.c.deleted, rv.c.last_updated, rv.c.data)
# the hot path: one indexed query, raw driver values, no SQLAlchemy per-call work
_READ = db.Prepared(_CURRENT.where(rc.c.resource_type == bindparam("rt"), rc.c.id == bindparam("id")))
_VREAD = db.Prepared(
    _VERSION.where(rv.c.resource_type == bindparam("rt"), rv.c.id == bindparam("id"), rv.c.version_id == bindparam("v"))
)
_EXISTS = db.Prepared(select(rc.c.version_id).where(rc.c.resource_type == bindparam("rt"), rc.c.id == bindparam("id")))


# A search pages over the current-version rows alone and joins the documents of the page's
# rows only: sorting every match's JSON to keep twenty of them costs more than the search.
_PAGE_ROWS = select(rc.c.id, rc.c.version_id, rc.c.deleted, rc.c.last_updated, rc.c.resource_type)


def _with_data(page: Any) -> Any:
    return select(page.c.id, page.c.version_id, page.c.deleted, page.c.last_updated, rv.c.data).join(
        rv, and_(rv.c.resource_type == page.c.resource_type, rv.c.id == page.c.id, rv.c.version_id == page.c.version_id)
    )


def _with_patients(page: Any) -> Any:
    """:func:`_with_data`, and the ids the ``patient`` parameter's index rows name, read in
    the same statement as the versions they describe."""
    sr = SEARCH_TABLES["reference"]
    named = select(db.json_list(sr.c.ref_id)).where(*_patient_rows(page.c.resource_type, page.c.id)).scalar_subquery()
    return _with_data(page).add_columns(named)


def _patient_rows(resource_type: Any, id: Any) -> list[Any]:
    """The index rows of the ``patient`` parameter of the resource ``resource_type``/``id`` name."""
    sr = SEARCH_TABLES["reference"]
    return [sr.c.resource_type == resource_type, sr.c.resource_id == id, sr.c.param == "patient", sr.c.ref_type == "Patient"]


def _has_patient_param(resource_type: str) -> bool:
    """Whether the type's patients are in its ``patient`` index rows (a Patient is its own)."""
    return resource_type != "Patient" and "patient" in search_index.search_parameters(resource_type)


def _listed_saved(resource_type: str, row: tuple[Any, ...], patient_param: bool) -> Saved:
    """A Saved from a search row (:func:`_with_data` or :func:`_with_patients`), its patients set."""
    saved = _raw_saved(resource_type, row[:5])
    if resource_type == "Patient":
        saved.patients = frozenset([saved.id])
    else:
        saved.patients = frozenset(orjson.loads(row[5])) if patient_param and row[5] else frozenset()
    return saved


def _raw_saved(resource_type: str, row: tuple[Any, ...]) -> Saved:
    """A Saved from a raw (id, version_id, deleted, last_updated, data) row of _READ / _VREAD."""
    id, version, deleted, last_updated, data = row
    return Saved(resource_type, id, version, from_micros(last_updated), bool(deleted), data)


def _read(target: Engine | Connection, resource_type: str, id: str) -> Saved:
    row = _READ.first(target, {"rt": resource_type, "id": id})
    if row is None:
        raise NotFound(f"{resource_type}/{id} is not known")
    if row[2]:
        raise Gone(f"{resource_type}/{id} was deleted (version {row[1]})")
    return _raw_saved(resource_type, row)


def _vread(target: Engine | Connection, resource_type: str, id: str, version: int) -> Saved:
    row = _VREAD.first(target, {"rt": resource_type, "id": id, "v": version})
    if row is None:
        exists = _EXISTS.first(target, {"rt": resource_type, "id": id})
        what = f"version {version} of {resource_type}/{id}" if exists else f"{resource_type}/{id}"
        raise NotFound(f"{what} is not known")
    if row[2]:
        raise Gone(f"version {version} of {resource_type}/{id} is a deletion")
    return _raw_saved(resource_type, row)


def _read_many(target: Engine | Connection, resource_type: str, ids: Iterable[str]) -> list[Saved]:
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return []
    prepared = _PREPARED.get(
        ("many", resource_type, len(wanted)),
        lambda: _CURRENT.where(
            rc.c.resource_type == resource_type,
            rc.c.deleted == false(),
            rc.c.id.in_([bindparam(f"id{i}") for i in range(len(wanted))]),
        ),
    )
    rows = prepared.all(target, {f"id{i}": id for i, id in enumerate(wanted)})
    found = {row[0]: _raw_saved(resource_type, row) for row in rows}
    return [found[i] for i in wanted if i in found]


def _patient_ids(target: Engine | Connection, resource_type: str, versions: Mapping[str, int]) -> dict[str, set[str]]:
    wanted = list(versions)
    if resource_type == "Patient":
        return {id: {id} for id in wanted}
    if not wanted or not _has_patient_param(resource_type):
        return {id: set() for id in wanted}
    prepared = _PREPARED.get(("patients", resource_type, len(wanted)), lambda: _patient_ids_statement(resource_type, len(wanted)))
    found: dict[str, set[str]] = {}
    for id, version, patient in prepared.all(target, {f"id{i}": id for i, id in enumerate(wanted)}):
        if version == versions[id]:  # the index describes the version shown, not a later one
            found.setdefault(id, set()).update([patient] if patient else [])
    return found


def _patient_ids_statement(resource_type: str, ids: int) -> Select[Any]:
    sr = SEARCH_TABLES["reference"]
    return (
        select(rc.c.id, rc.c.version_id, sr.c.ref_id)
        .select_from(rc.outerjoin(sr, and_(*_patient_rows(rc.c.resource_type, rc.c.id))))
        .where(rc.c.resource_type == resource_type, rc.c.id.in_([bindparam(f"id{i}") for i in range(ids)]))
    )


# Compiled statements by the shape of the search (parameters, modifiers, value forms, sort):
# a repeated kind of search binds new values into SQL compiled once.
_PREPARED = db.PreparedCache()


def _criteria(params: SearchParams) -> list[tuple[str, str]]:
    """Search pairs from a query string (``identifier=a|b&status=active``) or from pairs."""
    if isinstance(params, str):
        query = params.split("?", 1)[1] if "?" in params else params
        return parse_qsl(query, keep_blank_values=True)
    return [(str(k), str(v)) for k, v in params]


class _Filter:
    """The WHERE of a search: parsed criteria, their shape, and the values to bind."""

    def __init__(self, resource_type: str, params: SearchParams) -> None:
        self.resource_type = resource_type
        self.criteria = [search_index.criterion(resource_type, k, v) for k, v in _criteria(params)]
        self.shape = (resource_type, tuple(c.shape for c in self.criteria))
        self.values = {f"c{i}_{j}": v for i, c in enumerate(self.criteria) for j, v in enumerate(c.values)}

    def clauses(self) -> list[Any]:
        # The most selective criterion drives: its index names the candidate ids, looked up
        # by primary key; the others are checked per candidate. Keep SQLite from scanning
        # the whole type in (type, deleted, lastUpdated) order instead.
        selective = [i for i, c in enumerate(self.criteria) if c.selective]
        driver = min(selective, key=lambda i: self.criteria[i].rank) if selective else None
        deleted = db.unindexed(rc.c.deleted) if selective else rc.c.deleted
        return [
            rc.c.resource_type == self.resource_type,
            deleted == false(),
            *(
                c.clause((bindparam(f"c{i}_{j}") for j in range(len(c.values))), drive=i == driver)
                for i, c in enumerate(self.criteria)
            ),
        ]

    def count(self, target: Engine | Connection) -> int:
        prepared = _PREPARED.get(
            ("count", self.shape), lambda: select(func.count()).select_from(rc).where(*self.clauses())
        )
        row = prepared.first(target, self.values)
        return int(row[0]) if row else 0

    def first_ids(self, target: Engine | Connection, limit: int) -> list[str]:
        prepared = _PREPARED.get(
            ("ids", self.shape, limit), lambda: select(rc.c.id).where(*self.clauses()).limit(limit)
        )
        return [row[0] for row in prepared.all(target, self.values)]


def _sort_names(resource_type: str, sort: str | Sequence[str] | None) -> list[str]:
    names = [s.strip() for s in (sort.split(",") if isinstance(sort, str) else sort or ()) if s.strip()]
    if not names:
        names = ["_lastUpdated"]
    for name in names:
        search_index.check_sort(resource_type, name.lstrip("-"))
    if names[-1].lstrip("-") != "_id":  # the unique tie-breaker
        names.append("_id")
    return names


def _search(
    target: Engine | Connection,
    resource_type: str,
    params: SearchParams,
    count: int,
    sort: str | Sequence[str] | None,
    cursor: str | None,
    total: bool,
) -> Page[Saved]:
    if count < 0:
        raise InvalidSearch("_count must not be negative", [Issue("must be 0 or more", location="_count")])
    where = _Filter(resource_type, params)
    names = _sort_names(resource_type, sort)
    patient_param = _has_patient_param(resource_type)

    def build() -> tuple[Any, list[SortKey]]:
        keys = [
            SortKey(search_index.sort_expression(resource_type, n.lstrip("-"), n.startswith("-")), n.startswith("-"))
            for n in names
        ]
        return _PAGE_ROWS.where(*where.clauses()), keys

    page = fetch_page(
        target,
        _PREPARED,
        shape=("search", where.shape, tuple(names)),
        build=build,
        values=where.values,
        ordering=f"search:{','.join(names)}",
        width=len(names),
        count=count,
        cursor=cursor,
        make=lambda row: _listed_saved(resource_type, row, patient_param),
        attach=_with_patients if patient_param else _with_data,
    )
    if total:
        page.total = where.count(target)
    return page


def _history(
    target: Engine | Connection,
    resource_type: str | None,
    id: str | None,
    since: datetime | None,
    count: int,
    cursor: str | None,
    total: bool,
) -> Page[Saved]:
    given = (resource_type is not None, id is not None, since is not None)
    values = {"h_rt": resource_type, "h_id": id, "h_since": None if since is None else to_micros(since)}

    def where() -> list[Any]:
        clauses = [
            clause
            for present, clause in zip(
                given,
                (
                    rv.c.resource_type == bindparam("h_rt"),
                    rv.c.id == bindparam("h_id"),
                    type_coerce(rv.c.last_updated, BigInteger) >= bindparam("h_since"),
                ),
                strict=True,
            )
            if present
        ]
        if resource_type is None:  # constants inlined: the prepared statements take no expanding IN
            clauses += [rv.c.resource_type != literal_column(f"'{t}'") for t in sorted(OUTSIDE_SYSTEM_HISTORY)]
        return clauses

    def build() -> tuple[Any, list[SortKey]]:
        keys = [
            SortKey(type_coerce(rv.c.last_updated, BigInteger), descending=True),
            SortKey(rv.c.resource_type, descending=True),
            SortKey(rv.c.id, descending=True),
            SortKey(rv.c.version_id, descending=True),
        ]
        return _VERSION.add_columns(rv.c.resource_type).where(*where()), keys

    page = fetch_page(
        target,
        _PREPARED,
        shape=("history", given),
        build=build,
        values=values,
        ordering="history",
        width=4,
        count=count,
        cursor=cursor,
        make=lambda row: _raw_saved(row[5], row[:5]),
    )
    never_existed = id is not None and not page.entries and cursor is None and since is None
    if never_existed and _EXISTS.first(target, {"rt": resource_type, "id": id}) is None:
        raise NotFound(f"{resource_type}/{id} is not known")
    if total:
        prepared = _PREPARED.get(("history-count", given), lambda: select(func.count()).select_from(rv).where(*where()))
        page.total = int(prepared.first(target, values)[0])
    return page


# --- writes ------------------------------------------------------------------------------------


def _decimal(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _content_hash(content: JSON) -> bytes:
    """SHA-256 of the content in canonical form (sorted keys), ``meta.versionId/lastUpdated`` aside."""
    meta = {k: v for k, v in (content.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    canonical = {k: v for k, v in content.items() if k != "meta"}
    if meta:
        canonical["meta"] = meta
    return hashlib.sha256(orjson.dumps(canonical, default=_decimal, option=orjson.OPT_SORT_KEYS)).digest()


def _check_resource(resource: Any, resource_type: str | None = None) -> str:
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise RecordInvalid("a resource is a JSON object with a resourceType", [Issue("required", "resourceType")])
    found = resource["resourceType"]
    if resource_type is not None and found != resource_type:
        message = f"resourceType {found} does not match {resource_type}"
        raise RecordInvalid(message, [Issue(message, location="resourceType", code="value")])
    return found


def _check_id(resource_type: str, resource: JSON, id: str) -> None:
    given = resource.get("id")
    if given is not None and given != id:
        message = f"the resource's id {given!r} is not {id!r}"
        raise RecordInvalid(message, [Issue(message, location=f"{resource_type}.id", code="value")])
    if not ID_PATTERN.fullmatch(id):
        message = f"{id!r} is not a FHIR id (1-64 of A-Z a-z 0-9 - .)"
        raise RecordInvalid(message, [Issue(message, location=f"{resource_type}.id", code="value")])


ident = identifier.c
# Every write statement is prepared once (see db.Prepared): a version written is a dozen
# statements, and SQLAlchemy's per-statement work would cost more than SQLite's.
_CURRENT_FOR_WRITE = db.Prepared(
    _CURRENT.add_columns(rv.c.content_hash).where(rc.c.resource_type == bindparam("rt"), rc.c.id == bindparam("id"))
)
_INSERT_VERSION = db.insert_all(rv)
_INSERT_CURRENT = db.insert_all(rc)
_UPDATE_CURRENT = db.Prepared(
    update(rc)
    .where(rc.c.resource_type == bindparam("rt"), rc.c.id == bindparam("id"))
    .values(version_id=bindparam("v"), deleted=bindparam("d"), last_updated=bindparam("at"))
)
_DROP_INDEX = [
    db.Prepared(delete(t).where(t.c.resource_type == bindparam("rt"), t.c.resource_id == bindparam("id")))
    for t in SEARCH_TABLES.values()
]
_INSERT_INDEX = {kind: db.insert_all(t) for kind, t in SEARCH_TABLES.items()}
_HELD = db.Prepared(
    select(ident.system, ident.value).where(
        ident.resource_type == bindparam("rt"), ident.resource_id == bindparam("id")
    )
)
_ONE_IDENTIFIER = (
    ident.resource_type == bindparam("rt"),
    ident.system == bindparam("system"),
    ident.value == bindparam("value"),
)
_HOLDER = db.Prepared(select(ident.resource_id).where(*_ONE_IDENTIFIER))
_RELEASE = db.Prepared(delete(identifier).where(*_ONE_IDENTIFIER))
_RELEASE_ALL = db.Prepared(
    delete(identifier).where(ident.resource_type == bindparam("rt"), ident.resource_id == bindparam("id"))
)
_INSERT_IDENTIFIER = db.insert_all(identifier)
_QUEUE = db.insert_all(append_queue, skip=("seq",))
_NEWEST_QUEUED = db.Prepared(select(func.max(append_queue.c.seq)).where(append_queue.c.resource_type == bindparam("rt")))
_BACKLOG = db.Prepared(select(func.min(append_queue.c.seq), func.max(append_queue.c.seq)))
# Pull cursors (sync_cursor): one row per (destination key, resource type).
_CURSOR_KEY = (sync_cursor.c.destination == bindparam("d"), sync_cursor.c.resource_type == bindparam("rt"))
_CURSOR = db.Prepared(select(sync_cursor.c.last_updated).where(*_CURSOR_KEY))
_INSERT_CURSOR = db.insert_all(sync_cursor)
_UPDATE_CURSOR = db.Prepared(
    update(sync_cursor).where(*_CURSOR_KEY).values(last_updated=bindparam("lu"), pulled_at=bindparam("at"))
)


def _newest_queued(target: Engine | Connection, resource_type: str) -> int | None:
    """The sequence number of the newest queued resource of the type (None: nothing waits, or
    not a type that waits): a catch-up indexes up to it, so it ends while events keep coming."""
    if resource_type not in APPEND_ONLY_TYPES:
        return None
    row = _NEWEST_QUEUED.first(target, {"rt": resource_type})
    return None if row is None or row[0] is None else int(row[0])


class _Appended(NamedTuple):
    """A write-once resource on its way into the tables (Store.append)."""

    resource_type: str
    id: str
    last_updated: int  # microseconds
    data: bytes
    content_hash: bytes  # of the exact content, taken on the way in
    body: JSON  # what the search index reads (fractional numbers may be floats)


class AppendQueueSpan(NamedTuple):
    """The sequence numbers of the oldest and the newest resource waiting in the append queue."""

    oldest: int
    newest: int

    @property
    def backlog(self) -> int:
        """About how many wait: rows indexed out of order (PostgreSQL's skipped rows) or numbers
        a rolled back append used up make it an over-estimate, never an under-estimate."""
        return self.newest - self.oldest + 1


class _Current(NamedTuple):
    """The current version of a resource as a write sees it (raw driver values)."""

    id: str
    version_id: int
    deleted: bool
    last_updated: int
    data: bytes | None
    content_hash: bytes | None

    def saved(self, resource_type: str) -> Saved:
        return _raw_saved(resource_type, self[:5])


class _Writer:
    """The write operations on one open transaction (a Store call or a unit of work)."""

    def __init__(self, store: Store, conn: Connection) -> None:
        self.store = store
        self.conn = conn

    # -- the operations

    def create(self, resource: JSON, id: str | None, if_none_exist: SearchParams | None, deliver_to: Any) -> Saved:
        resource_type = _check_resource(resource)
        if if_none_exist is not None:
            criteria = _criteria(if_none_exist)
            self._lock_criteria(resource_type, criteria)
            found = self._match(resource_type, criteria)
            if found is not None:
                return _read(self.conn, resource_type, found)
        if id is None:
            id = str(uuid.uuid4())
        else:
            _check_id(resource_type, {}, id)
            db.lock(self.conn, f"{resource_type}/{id}")
            if self._current(resource_type, id) is not None:
                raise VersionConflict(f"{resource_type}/{id} already exists")
        return self._write(resource_type, id, resource, None, deliver_to)

    def update(self, resource_type: str, id: str, resource: JSON, if_match: int | None, deliver_to: Any) -> Saved:
        _check_resource(resource, resource_type)
        _check_id(resource_type, resource, id)
        db.lock(self.conn, f"{resource_type}/{id}")
        current = self._current(resource_type, id)
        if if_match is not None and (current is None or current.version_id != if_match):
            have = "does not exist" if current is None else f"is at version {current.version_id}"
            raise PreconditionFailed(f"If-Match version {if_match}, but {resource_type}/{id} {have}")
        return self._write(resource_type, id, resource, current, deliver_to)

    def conditional_update(
        self, resource_type: str, criteria: SearchParams, resource: JSON, if_match: int | None, deliver_to: Any
    ) -> Saved:
        _check_resource(resource, resource_type)
        pairs = _criteria(criteria)
        self._lock_criteria(resource_type, pairs)
        found = self._match(resource_type, pairs)
        given = resource.get("id")
        if found is not None and given is not None and given != found:
            message = f"the resource's id {given!r} is not the matching {resource_type}/{found}"
            raise RecordInvalid(message, [Issue(message, location=f"{resource_type}.id", code="value")])
        return self.update(resource_type, found or given or str(uuid.uuid4()), resource, if_match, deliver_to)

    def delete(self, resource_type: str, id: str, deliver_to: Any) -> Saved:
        db.lock(self.conn, f"{resource_type}/{id}")
        current = self._current(resource_type, id)
        if current is None:
            raise NotFound(f"{resource_type}/{id} is not known")
        if current.deleted:
            return current.saved(resource_type)
        previous = fhir_json.loads(current.data or b"", exact_decimals=True)
        rows = search_index.index_rows(resource_type, id, previous)
        version, now = current.version_id + 1, self.store.clock()
        self._insert_version(resource_type, id, version, now, None, None)
        self._set_current(resource_type, id, version, now, deleted=True, exists=True)
        self._drop_index(resource_type, id)
        _RELEASE_ALL.execute(self.conn, {"rt": resource_type, "id": id})
        self._enqueue(deliver_to, resource_type, id, version, previous, rows, "delete", now)
        return Saved(resource_type, id, version, now, deleted=True, changed=True)

    # -- helpers

    def _current(self, resource_type: str, id: str) -> _Current | None:
        row = _CURRENT_FOR_WRITE.first(self.conn, {"rt": resource_type, "id": id})
        return None if row is None else _Current(*row)

    def _lock_criteria(self, resource_type: str, criteria: list[tuple[str, str]]) -> None:
        if not criteria:
            raise InvalidSearch("a conditional write needs search criteria", [Issue("no criteria", code="required")])
        db.lock(self.conn, f"match:{resource_type}?" + "&".join(f"{k}={v}" for k, v in sorted(criteria)))

    def _match(self, resource_type: str, criteria: list[tuple[str, str]]) -> str | None:
        """The id of the one live resource matching ``criteria``, or None.

        :raises PreconditionFailed: more than one matches (FHIR: 412).
        """
        ids = _Filter(resource_type, criteria).first_ids(self.conn, 2)
        if len(ids) > 1:
            raise PreconditionFailed(f"more than one {resource_type} matches {criteria}")
        return ids[0] if ids else None

    def _write(self, resource_type: str, id: str, resource: JSON, current: _Current | None, deliver_to: Any) -> Saved:
        if self.store.labeller is not None:  # before hashing and indexing: labels are content
            resource = self.store.labeller(resource, self._linked)
        content: JSON = {"resourceType": resource_type, "id": id}
        meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
        if meta:
            content["meta"] = meta
        content.update((k, v) for k, v in resource.items() if k not in ("resourceType", "id", "meta"))
        digest = _content_hash(content)
        live = current is not None and not current.deleted
        if live and current.content_hash == digest:
            return current.saved(resource_type)
        self._claim_identifiers(resource_type, id, content)
        version = current.version_id + 1 if current is not None else 1
        now = self.store.clock()
        body: JSON = {
            "resourceType": resource_type,
            "id": id,
            "meta": {**meta, "versionId": str(version), "lastUpdated": instant(now)},
        }
        body.update((k, v) for k, v in content.items() if k not in body)
        data = fhir_json.dumps(body)
        self._insert_version(resource_type, id, version, now, digest, data)
        self._set_current(resource_type, id, version, now, deleted=False, exists=current is not None)
        if live:
            self._drop_index(resource_type, id)
        rows = search_index.index_rows(resource_type, id, body)
        for kind, statement in _INSERT_INDEX.items():
            statement.executemany(self.conn, rows[kind])
        self._enqueue(deliver_to, resource_type, id, version, body, rows, "upsert", now)
        return Saved(resource_type, id, version, now, False, data, created=not live, changed=True, _resource=body)

    def append(self, resources: Sequence[JSON], index_later: bool) -> int:
        """Insert new, write-once resources in bulk (see :meth:`_Operations.append`)."""
        now = self.store.clock()
        at = to_micros(now)
        rows = []
        for resource in resources:
            resource_type = _check_resource(resource)
            if index_later and resource_type not in APPEND_ONLY_TYPES:
                raise ValueError(f"only {', '.join(sorted(APPEND_ONLY_TYPES))} can be indexed later, not {resource_type}")
            id = new_id()
            body: JSON = {"resourceType": resource_type, "id": id, "meta": {**(resource.get("meta") or {}), "versionId": "1", "lastUpdated": instant(now)}}
            body.update((k, v) for k, v in resource.items() if k not in body)
            rows.append(_Appended(resource_type, id, at, fhir_json.dumps(body), _content_hash(body), body))
        if index_later:
            _QUEUE.executemany(
                self.conn,
                [{"resource_type": r.resource_type, "id": r.id, "last_updated": r.last_updated, "data": r.data, "content_hash": r.content_hash} for r in rows],
            )
        else:
            self._insert_appended(rows)
        return len(rows)

    def index_queued(self, resource_type: str | None, limit: int, wait: bool, up_to: int | None = None) -> int:
        """Index up to ``limit`` queued resources, oldest first, and take them off the queue.
        ``wait=False`` skips rows another transaction is indexing (PostgreSQL); ``up_to``: only
        rows queued up to that sequence number."""
        q = append_queue.c
        query = select(q.seq, q.resource_type, q.id, q.last_updated, q.data, q.content_hash).order_by(q.seq).limit(limit)
        if resource_type is not None:
            query = query.where(q.resource_type == resource_type)
        if up_to is not None:
            query = query.where(q.seq <= up_to)
        found = self.conn.execute(query.with_for_update(skip_locked=not wait)).all()
        if not found:
            return 0
        # several times faster than the exact parse, and the index needs no exact decimals
        self._insert_appended(
            [_Appended(t, id, to_micros(at), bytes(data), bytes(digest), _looked_at(bytes(data))) for _, t, id, at, data, digest in found]
        )
        self.conn.execute(delete(append_queue).where(q.seq.in_([row[0] for row in found])))
        return len(found)

    def _insert_appended(self, rows: Sequence[_Appended]) -> None:
        """Versions, current pointers and search-index rows of new version-1 resources, in bulk."""
        if not rows:
            return
        versions, currents = [], []
        index: dict[str, list[dict[str, Any]]] = {kind: [] for kind in _INSERT_INDEX}
        for resource_type, id, at, data, digest, body in rows:
            versions.append(
                {"resource_type": resource_type, "id": id, "version_id": 1, "last_updated": at, "deleted": False,
                 "content_hash": digest, "data": data}
            )  # fmt: skip
            currents.append({"resource_type": resource_type, "id": id, "version_id": 1, "deleted": False, "last_updated": at})
            for kind, found in search_index.index_rows(resource_type, id, body).items():
                index[kind].extend(found)
        _INSERT_VERSION.executemany(self.conn, versions)
        _INSERT_CURRENT.executemany(self.conn, currents)
        for kind, statement in _INSERT_INDEX.items():
            if index[kind]:
                statement.executemany(self.conn, index[kind])

    def _linked(self, reference: str) -> JSON | None:
        """The current version of what a literal reference names (the labeller's look-up), or
        None. Parsed for looking at (its labels and codes), not the exact decimals: a transaction
        Bundle's entries look up their patient and encounter again and again."""
        found = search_index.parse_reference(reference)
        if found is None or found[0] is None or not ID_PATTERN.fullmatch(found[1]):
            return None
        row = _READ.first(self.conn, {"rt": found[0], "id": found[1]})
        return None if row is None or row[2] or row[4] is None else _looked_at(row[4])

    def _insert_version(
        self, resource_type: str, id: str, version: int, now: datetime, digest: bytes | None, data: bytes | None
    ) -> None:
        _INSERT_VERSION.execute(
            self.conn,
            {
                "resource_type": resource_type,
                "id": id,
                "version_id": version,
                "last_updated": to_micros(now),
                "deleted": data is None,
                "content_hash": digest,
                "data": data,
            },
        )

    def _set_current(
        self, resource_type: str, id: str, version: int, now: datetime, *, deleted: bool, exists: bool
    ) -> None:
        at = to_micros(now)
        if exists:
            _UPDATE_CURRENT.execute(self.conn, {"rt": resource_type, "id": id, "v": version, "d": deleted, "at": at})
        else:
            _INSERT_CURRENT.execute(
                self.conn,
                {
                    "resource_type": resource_type,
                    "id": id,
                    "version_id": version,
                    "deleted": deleted,
                    "last_updated": at,
                },
            )

    def _drop_index(self, resource_type: str, id: str) -> None:
        for statement in _DROP_INDEX:
            statement.execute(self.conn, {"rt": resource_type, "id": id})

    def _claim_identifiers(self, resource_type: str, id: str, content: JSON) -> None:
        """Make ``id`` the holder of exactly its current business identifiers.

        :raises VersionConflict: another resource of the type holds one of them.
        """
        wanted = search_index.identifiers(content)
        conn = self.conn
        held = {(system, value) for system, value in _HELD.all(conn, {"rt": resource_type, "id": id})}
        _RELEASE.executemany(conn, [{"rt": resource_type, "system": s, "value": v} for s, v in held.difference(wanted)])
        new = [pair for pair in wanted if pair not in held]
        for system, value in new:
            holder = _HOLDER.first(conn, {"rt": resource_type, "system": system, "value": value})
            if holder is not None:
                message = f"identifier {system}|{value} already belongs to {resource_type}/{holder[0]}"
                raise IdentifierHeld(
                    message, [Issue(message, location=f"{resource_type}.identifier", code="duplicate")]
                )
        # the database constraint decides a race the check above cannot see (IntegrityError)
        _INSERT_IDENTIFIER.executemany(
            conn, [{"resource_type": resource_type, "system": s, "value": v, "resource_id": id} for s, v in new]
        )

    def set_cursor(self, destination: str, resource_type: str, last_updated: str) -> None:
        db.lock(self.conn, f"cursor:{destination}/{resource_type}")
        at = to_micros(self.store.clock())
        if _CURSOR.first(self.conn, {"d": destination, "rt": resource_type}) is None:
            row = {"destination": destination, "resource_type": resource_type, "last_updated": last_updated, "pulled_at": at}
            _INSERT_CURSOR.execute(self.conn, row)
        else:
            _UPDATE_CURSOR.execute(self.conn, {"d": destination, "rt": resource_type, "lu": last_updated, "at": at})

    def _enqueue(
        self,
        deliver_to: Iterable[str] | None,
        resource_type: str,
        id: str,
        version: int,
        resource: JSON,
        rows: dict[str, list[dict[str, Any]]],
        action: str,
        now: datetime,
    ) -> None:
        patient_key = search_index.patient_key(resource_type, id, rows)
        if deliver_to is None:
            router = self.store.router
            deliver_to = router(resource_type, resource, patient_key) if router is not None else ()
        enqueue(
            self.conn,
            list(dict.fromkeys(deliver_to)),
            resource_type=resource_type,
            resource_id=id,
            version_id=version,
            action=action,
            patient_key=patient_key,
            now=now,
        )


# --- the public API ------------------------------------------------------------------------------


class _Operations(ABC):
    """Every store operation, once; :class:`Store` and :class:`UnitOfWork` say where it runs."""

    @abstractmethod
    def _writing(self, fn: Callable[[_Writer], T]) -> T:
        """Run one write (with its retries on a lost race) where this object writes."""

    @abstractmethod
    def _target(self) -> Engine | Connection:
        """Where a prepared single-statement read runs."""

    def _catch_up(self, resource_type: str) -> None:
        """Before a read of ``resource_type``: index what is queued of it (``append(index_later=True)``)."""

    # writes

    def create(
        self,
        resource: JSON,
        *,
        id: str | None = None,
        if_none_exist: SearchParams | None = None,
        deliver_to: Iterable[str] | None = None,
    ) -> Saved:
        """Store a new resource (version 1); the server assigns the id.

        :param id: the id to give it instead of a fresh UUID (a transaction Bundle resolving
            ``urn:uuid`` references up front); an existing id is a :class:`VersionConflict`.
        :param if_none_exist: conditional create (``identifier=system|value``): when exactly
            one live resource matches, nothing is written and it is returned with
            ``created=False``; more than one match is :class:`PreconditionFailed`.
        :param deliver_to: destination names to enqueue deliveries for; ``None`` asks the
            store's router, ``()`` delivers nowhere.
        :raises VersionConflict: a business identifier of the resource belongs to another one.
        """
        return self._writing(lambda w: w.create(resource, id, if_none_exist, deliver_to))

    def append(self, resources: Sequence[JSON], *, index_later: bool = False) -> int:
        """Store new resources that are written once and never changed (audit events), in bulk:
        fresh ids, version 1, searchable; no labelling, no business identifiers held, no
        deliveries. A few statements for the lot instead of several per resource, so an audit
        trail of every read costs the reads little. Returns how many were stored.

        :param index_later: store them durably now, final (id, ``meta``, bytes), as one row
            each in the append queue, and leave the search-index work for
            :meth:`Store.index_appended` (idle time); every read, search or history of their
            type catches up first, so nothing queued is ever missing from an answer. Only
            :data:`APPEND_ONLY_TYPES`.
        """
        return self._writing(lambda w: w.append(resources, index_later))

    def update(
        self,
        resource_type: str,
        id: str,
        resource: JSON,
        *,
        if_match: int | None = None,
        deliver_to: Iterable[str] | None = None,
    ) -> Saved:
        """Store a new version of ``resource_type/id``, creating it when it does not exist.

        Content equal to the current version (``meta.versionId`` and ``meta.lastUpdated``
        aside) writes nothing: the current version comes back with ``changed=False``.

        :param if_match: the version the client last saw (``If-Match``).
        :raises PreconditionFailed: ``if_match`` is not the current version.
        :raises RecordInvalid: resourceType or id disagree with the arguments.
        """
        return self._writing(lambda w: w.update(resource_type, id, resource, if_match, deliver_to))

    def conditional_update(
        self,
        resource_type: str,
        search_params: SearchParams,
        resource: JSON,
        *,
        if_match: int | None = None,
        deliver_to: Iterable[str] | None = None,
    ) -> Saved:
        """``PUT Type?criteria``: update the one match, or create when none matches.

        :raises PreconditionFailed: more than one resource matches.
        """
        return self._writing(
            lambda w: w.conditional_update(resource_type, search_params, resource, if_match, deliver_to)
        )

    def save(self, resource: JSON, *, deliver_to: Iterable[str] | None = None) -> Saved:
        """Update when the resource has an id (creating it under that id), else create."""
        if resource.get("id"):
            return self.update(_check_resource(resource), resource["id"], resource, deliver_to=deliver_to)
        return self.create(resource, deliver_to=deliver_to)

    def delete(self, resource_type: str, id: str, *, deliver_to: Iterable[str] | None = None) -> Saved:
        """Record a deletion as a new version; reads then raise :class:`Gone`.

        Deleting a deleted resource writes nothing. Its identifiers become free again.

        :raises NotFound: the resource never existed.
        """
        return self._writing(lambda w: w.delete(resource_type, id, deliver_to))

    # reads

    def read(self, resource_type: str, id: str) -> Saved:
        """The current version; ``.data`` holds the JSON bytes to serve.

        :raises NotFound: no such resource.  :raises Gone: it was deleted.
        """
        self._catch_up(resource_type)
        return _read(self._target(), resource_type, id)

    def vread(self, resource_type: str, id: str, version: int) -> Saved:
        """One version. :raises NotFound: no such version. :raises Gone: it is a deletion."""
        self._catch_up(resource_type)
        return _vread(self._target(), resource_type, id, version)

    def read_many(self, resource_type: str, ids: Iterable[str]) -> list[Saved]:
        """The current versions of the live resources among ``ids`` (for ``_include``), in order."""
        self._catch_up(resource_type)
        return _read_many(self._target(), resource_type, ids)

    def patient_ids(self, resource_type: str, versions: Mapping[str, int]) -> dict[str, set[str]]:
        """The patients whose compartment holds each resource (a Patient's own id; else what
        its ``patient`` search parameter names), from the search index in one query: for a page
        of results, instead of parsing each one. ``versions``: id -> the version shown; an id
        whose current version is another one (changed or deleted since) is left out, for the
        caller to read from the version itself."""
        return _patient_ids(self._target(), resource_type, versions)

    def history(
        self,
        resource_type: str | None = None,
        id: str | None = None,
        *,
        since: datetime | None = None,
        count: int = 50,
        cursor: str | None = None,
        total: bool = False,
    ) -> Page[Saved]:
        """Versions newest first: of one resource, of a type, or of everything (but the audit
        trail, :data:`OUTSIDE_SYSTEM_HISTORY`, which its type's history holds).

        Deleted versions are entries with ``deleted=True`` and no data.

        :param since: only versions stored at or after this instant (``_since``).
        :raises NotFound: instance history of a resource that never existed.
        """
        if resource_type is not None:
            self._catch_up(resource_type)
        return _history(self._target(), resource_type, id, since, count, cursor, total)

    def search(
        self,
        resource_type: str,
        params: SearchParams = (),
        *,
        count: int = DEFAULT_COUNT,
        sort: str | Sequence[str] | None = None,
        cursor: str | None = None,
        total: bool = False,
    ) -> Page[Saved]:
        """Live resources of a type matching every pair of ``params``.

        :param params: ``[("patient", "Patient/1"), ("date", "ge2026-01")]`` or the query
            string; result parameters (``_count``, ``_sort``, ``_include``...) are the caller's.
        :param count: page size (``_count``).
        :param sort: ``_sort`` as FHIR writes it (``-date,_lastUpdated``); default by
            ``_lastUpdated`` then id, so new resources land on the last page.
        :param cursor: ``next_cursor`` / ``prev_cursor`` of a previous page.
        :param total: also count all matches (``Bundle.total``).
        :raises InvalidSearch: unknown parameter or modifier, malformed value or cursor.
        """
        self._catch_up(resource_type)
        return _search(self._target(), resource_type, params, count, sort, cursor, total)

    def count(self, resource_type: str, params: SearchParams = ()) -> int:
        """How many live resources match (``_summary=count``)."""
        self._catch_up(resource_type)
        return _Filter(resource_type, params).count(self._target())

    def match_ids(self, resource_type: str, params: SearchParams, limit: int = 2) -> list[str]:
        """The ids of at most ``limit`` live resources matching ``params``, in no particular
        order: what a conditional write or reference needs to know (none, one, or several),
        without a page's sorting, versions and bodies.

        :raises InvalidSearch: unknown parameter or modifier, malformed value.
        """
        self._catch_up(resource_type)
        return _Filter(resource_type, params).first_ids(self._target(), limit)

    # pull cursors

    def pull_cursor(self, destination: str, resource_type: str) -> str | None:
        """Where an incremental pull stopped: the source's ``meta.lastUpdated`` text of the
        newest resource of the type seen (its clock, not ours), or None before the first pull."""
        row = _CURSOR.first(self._target(), {"d": destination, "rt": resource_type})
        return None if row is None else row[0]

    def set_pull_cursor(self, destination: str, resource_type: str, last_updated: str) -> None:
        """Move a pull cursor; in a unit of work it commits with the resources it covers."""
        self._writing(lambda w: w.set_cursor(destination, resource_type, last_updated))


class UnitOfWork(_Operations):
    """Store operations inside one database transaction (``with store.unit() as uow``).

    Everything commits together when the ``with`` block ends, or nothing when it raises.
    Each operation runs in a savepoint, so one that fails leaves no trace even when the
    caller catches its error; reads see the unit's own writes. A unit opened
    ``all_or_nothing`` on SQLite runs its operations without savepoints (see :meth:`Store.unit`).
    """

    def __init__(self, store: Store, conn: Connection, *, savepoints: bool = True) -> None:
        self._writer = _Writer(store, conn)
        self._conn = conn
        self._open = True
        self._savepoints = savepoints

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("this unit of work has ended")

    def _catch_up(self, resource_type: str) -> None:
        newest = _newest_queued(self._conn, resource_type)
        if newest is not None:
            while self._writing(lambda w: w.index_queued(resource_type, INDEX_CHUNK, wait=True, up_to=newest)):
                pass

    def _target(self) -> Connection:
        self._check_open()
        return self._conn

    @property
    def connection(self) -> Connection:
        """The unit's connection, for writes beside the resources that must commit with them
        (``store.messages.record(..., conn=uow.connection)``)."""
        return self._target()

    def _writing(self, fn: Callable[[_Writer], T]) -> T:
        self._check_open()
        if not self._savepoints:  # SQLite, lock held: no race to retry; the unit ends with the error
            try:
                return fn(self._writer)
            except IntegrityError as exc:
                raise VersionConflict("the write conflicts with what is stored (a uniqueness constraint)") from exc
        for attempt in range(ATTEMPTS):
            try:
                with self._conn.begin_nested():
                    return fn(self._writer)
            except IdentifierHeld:
                if attempt == ATTEMPTS - 1:
                    raise
            except IntegrityError as exc:
                if attempt == ATTEMPTS - 1:
                    raise _lost_race(exc) from exc
        raise AssertionError("unreachable")


class IdentifierHeld(VersionConflict):
    """Another resource holds a business identifier this write claims.

    Writes retry on it like on a lost unique-key race: a conditional create whose search
    ran before a concurrent winner committed finds that winner on the retry and returns it,
    instead of failing; a plain create still ends in this conflict.
    """


def _lost_race(exc: IntegrityError) -> VersionConflict:
    return VersionConflict("a concurrent write to the same resource or identifier won; try again")


class Store(_Operations):
    """The versioned FHIR resource store over SQLite or PostgreSQL (see the module doc).

    Thread-safe: share one Store per process. Open with :meth:`open`; close when done.
    """

    def __init__(
        self, engine: Engine, *, clock: Clock = utc_now, router: Router | None = None, labeller: Labeller | None = None
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.router = router
        self.labeller = labeller
        self.outbox = Outbox(engine, clock)
        self.messages = MessageStore(engine, lambda: self.clock())  # wire messages (NCPDP): store/messages.py

    @classmethod
    def open(
        cls, url: str, *, clock: Clock | None = None, router: Router | None = None, labeller: Labeller | None = None
    ) -> Store:
        """Connect to ``url`` and create or migrate the schema.

        :param url: ``sqlite:///path/to/file.db`` (directories are created) or
            ``postgresql+psycopg://user@host/db``.
        :param clock: the source of ``meta.lastUpdated`` (aware UTC datetimes); tests pin it.
        :param router: which destinations a change goes to when a write does not say.
        :param labeller: sets each written resource's security labels (``iop_fhir.privacy.label``).
        """
        engine = db.make_engine(url)
        try:
            migrate(engine, now=clock or utc_now)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, clock=clock or utc_now, router=router, labeller=labeller)

    def close(self) -> None:
        """Release every pooled connection (and SQLite's writer lock file)."""
        self.engine.dispose()
        db.release(self.engine)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def analyze(self) -> None:
        """Refresh the query planner's statistics (``ANALYZE``), e.g. after a bulk load.

        PostgreSQL plans from statistics: until autovacuum has analysed freshly loaded
        tables, a search can take a plan a thousand times slower than it should. SQLite's
        plans do not depend on them here, but they do no harm.
        """
        with db.writing(self.engine) as conn:
            if conn.dialect.name == "postgresql":
                for table in metadata.sorted_tables:
                    conn.exec_driver_sql(f"ANALYZE {conn.dialect.identifier_preparer.format_table(table)}")
            else:
                conn.exec_driver_sql("ANALYZE")

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @contextmanager
    def unit(self, *, all_or_nothing: bool = False) -> Iterator[UnitOfWork]:
        """A unit of work: its operations commit together at the end of the block, or not at all.

        :param all_or_nothing: the caller lets any failed operation end the unit (every
            write of the API, a FHIR transaction Bundle). On SQLite the unit holds the database's write lock from its
            first statement, so no concurrent writer can win a race its savepoints would
            retry: operations then run without one (a savepoint per entry was a quarter of a
            transaction's cost per entry). PostgreSQL keeps them for those retries.
        """
        with db.writing(self.engine) as conn:
            uow = UnitOfWork(self, conn, savepoints=not (all_or_nothing and self.dialect == "sqlite"))
            try:
                yield uow
            finally:
                uow._open = False

    def transaction(self, fn: Callable[[UnitOfWork], T]) -> T:
        """Run ``fn`` in a unit of work and return its result (committed unless it raises).

        Unlike ``with store.unit()``, a unit the database aborts for a deadlock (two units
        writing the same resources in opposite orders, PostgreSQL) is run again, so ``fn``
        must be safe to repeat: no side effects outside the unit.
        """
        for attempt in range(ATTEMPTS):
            try:
                with self.unit() as uow:
                    return fn(uow)
            except DBAPIError as exc:
                if attempt == ATTEMPTS - 1 or not db.is_retryable(exc):
                    raise
        raise AssertionError("unreachable")

    # the append queue (append(index_later=True))

    def index_appended(
        self, limit: int | None = None, *, resource_type: str | None = None, wait: bool = True, up_to: int | None = None
    ) -> int:
        """Index queued resources, oldest first, in transactions of :data:`INDEX_CHUNK`; returns
        how many. ``wait=False`` (background indexers) skips what another process is indexing
        at the moment instead of waiting for it (PostgreSQL; SQLite has one writer anyway);
        ``up_to``: only what was queued up to that sequence number (a catch-up must end even
        while events keep coming)."""
        done = 0
        while limit is None or done < limit:
            chunk = INDEX_CHUNK if limit is None else min(INDEX_CHUNK, limit - done)
            with db.writing(self.engine) as conn:
                indexed = _Writer(self, conn).index_queued(resource_type, chunk, wait, up_to)
            done += indexed
            if indexed < chunk:
                break
        return done

    def appended_backlog(self) -> int:
        """About how many resources wait in the append queue (:attr:`AppendQueueSpan.backlog`)."""
        span = self.appended_span()
        return 0 if span is None else span.backlog

    def appended_span(self) -> AppendQueueSpan | None:
        """What waits in the append queue (None: nothing). Its newest number moves whenever
        any process appends, so a background indexer sees whether the whole store, not just
        its own process, has been quiet."""
        row = _BACKLOG.first(self.engine, {})
        return None if row is None or row[0] is None else AppendQueueSpan(int(row[0]), int(row[1]))

    def _catch_up(self, resource_type: str) -> None:
        # A read of the audit trail is a write when events wait: called from a thread that is
        # inside store.unit() on SQLite it would wait for its own lock (read through the unit).
        newest = _newest_queued(self.engine, resource_type)
        if newest is not None:
            self.index_appended(resource_type=resource_type, up_to=newest)

    def _target(self) -> Engine:
        return self.engine

    def _writing(self, fn: Callable[[_Writer], T]) -> T:
        # One operation alone: no savepoint; a lost race rolls back the whole attempt and
        # the retry re-reads (and then finds the winner, or reports the conflict).
        for attempt in range(ATTEMPTS):
            try:
                with db.writing(self.engine) as conn:
                    return fn(_Writer(self, conn))
            except IdentifierHeld:
                if attempt == ATTEMPTS - 1:
                    raise
            except IntegrityError as exc:
                if attempt == ATTEMPTS - 1:
                    raise _lost_race(exc) from exc
        raise AssertionError("unreachable")
