"""Engines and the few places where SQLite and PostgreSQL need different SQL.

Everything else in the store is one code path; the differences live here:

* **SQLite** (embedded default): WAL journal (readers never block the writer), foreign keys
  on, a busy timeout, and write transactions that start with ``BEGIN IMMEDIATE``, so a
  transaction that reads and then writes takes the database's single write lock up front and
  cannot fail half-way with "database is locked". That lock is also what serialises
  concurrent writers (:class:`_WriterQueue`), so :func:`lock` has nothing to do on SQLite.
  WAL checkpoints run in a background thread (:class:`_Checkpointer`), not in a writer's commit.
* **PostgreSQL** (scale-out): a connection pool, and transaction-scoped advisory locks that
  serialise writers of one resource (or one conditional-write criterion) across processes
  and machines, including resources that do not exist yet, which ``SELECT ... FOR UPDATE``
  cannot lock.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import Connection, Engine, Executable, Table, Text, bindparam, create_engine, event, func, insert, select
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.visitors import InternalTraversal

try:
    import fcntl
except ImportError:  # Windows: writers of other processes wait in SQLite's busy handler
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# How a transaction starts on SQLite: "IMMEDIATE" for writes, else "DEFERRED".
BEGIN_OPTION = "iop_fhir_begin"
WRITE = {BEGIN_OPTION: "IMMEDIATE"}

SQLITE_BUSY_TIMEOUT_S = 30
CHECKPOINT_INTERVAL_S = 0.2  # the longest a process's committed writes wait in the WAL for a checkpoint
CHECKPOINT_IDLE_S = 2.0  # a checkpoint thread with no write to check in for this long ends
# SQLite's own checkpoint stays as a backstop, past this many WAL pages (40 MB): see _Checkpointer
WAL_BACKSTOP_PAGES = 10_000


def make_engine(url: str) -> Engine:
    """An engine for ``url``: ``sqlite:///path/file.db`` or ``postgresql+psycopg://...``.

    :raises ValueError: another database, or an in-memory SQLite database (each pooled
        connection would see its own empty database).
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file::memory:"):
            raise ValueError("the store needs a SQLite file (sqlite:///path/to/file.db), not an in-memory database")
        uri = bool(parsed.query.get("uri"))  # sqlite:///file:path?uri=true: SQLite parses it
        if not uri:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
            pool_size=8,
            max_overflow=24,
            pool_timeout=60,
        )
        if uri:  # SQLite resolves the file: no writer queue, SQLite's own checkpoints
            event.listen(engine, "connect", _sqlite_connect_uri)
        else:  # a plain path, made absolute as SQLAlchemy does
            _SQLITE_FILES[engine] = os.path.abspath(database)
            event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        return create_engine(parsed, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_timeout=60)
    raise ValueError(f"unsupported database {backend!r}: use sqlite:///file.db or postgresql+psycopg://...")


def _sqlite_connect(dbapi_connection: Any, _record: Any, *, background_checkpoints: bool = True) -> None:
    # Take BEGIN away from the sqlite3 module (it would not emit one before SELECT or DDL);
    # _sqlite_begin emits our own.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across application crashes in WAL mode
    if background_checkpoints:  # the _Checkpointer does most of it
        cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
    _enable_wal(cursor)
    cursor.close()


def _sqlite_connect_uri(dbapi_connection: Any, record: Any) -> None:
    _sqlite_connect(dbapi_connection, record, background_checkpoints=False)


def _enable_wal(cursor: Any) -> None:
    """Switch the file to WAL once (the mode is stored in the file).

    The switch needs the database to itself and, unlike other statements, answers "database
    is locked" at once instead of waiting in the busy handler when another connection (a
    second process starting at the same time) is busy with it; so wait here.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    delay = 0.001
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            if cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("could not switch the database to WAL mode: database is locked")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get(BEGIN_OPTION, 'DEFERRED')}")


class _WriterQueue:
    """SQLite: one writer at a time, queued on locks that hand over almost at once.

    Writers would otherwise wait for the database lock in SQLite's busy handler, which polls
    with sleeps of up to 100 ms: under concurrent writes most of a write's latency (and the
    p99 of creates) was that sleep. Threads of a process queue on a lock; processes (server
    workers, the delivery worker, the CLI) on an exclusive ``flock`` of ``<database>.lock``,
    polled every millisecond at most and released by the kernel when a process dies. A writer
    that waits longer than the busy timeout gets "database is locked", as before. Where
    ``flock`` does not exist or the lock file cannot be opened (another user's directory),
    other processes fall back to the busy handler. Re-entrant within a thread.
    """

    def __init__(self, database: str) -> None:
        self.path = os.path.abspath(f"{database}.lock")
        self._fd: int | None = None
        self._pid = os.getpid()
        self._reset()
        _QUEUES.add(self)

    def _reset(self) -> None:
        # A child forked while a thread of its parent wrote holds nothing: a fresh thread lock,
        # depth 0, and its own lock file later (flock belongs to the open file, which the
        # inherited descriptor shares with the parent: closing it here leaves the parent's lock).
        self._thread = threading.RLock()
        self._depth = 0
        if self._pid != os.getpid():
            self._close_fd()
            self._pid = os.getpid()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int | None:
        if self._fd is None and fcntl is not None:
            try:  # read access is all flock needs; the umask decides who else may open it
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)
            except OSError:
                log.warning("cannot open %s: writers of other processes wait in SQLite's busy handler", self.path)
                return None
        return self._fd

    def __enter__(self) -> None:
        self._thread.acquire()
        try:
            if self._depth == 0 and (fd := self._open()) is not None:
                _flock(fd, self.path)
            self._depth += 1
        except BaseException:
            self._thread.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None and fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread.release()

    def close(self) -> None:
        """Close the lock file (the store is closing); a later write opens it again."""
        with self._thread:
            if self._depth == 0:
                self._close_fd()


def _flock(fd: int, path: str) -> None:
    """Take the exclusive lock, polling every 0.1-1 ms, or raise "database is locked" after
    the busy timeout (a stopped or stuck holder must not block every writer for ever)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    pause = 0.0001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError(f"database is locked (another process has held {path} for {SQLITE_BUSY_TIMEOUT_S} s)") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.001)


class _Checkpointer:
    """SQLite: WAL checkpoints in a background thread of each writing process.

    SQLite's own (automatic) checkpoint runs inside the commit that pushes the WAL past 1,000
    pages: that writer copies the pages into the database file and waits for the disk's sync
    while it holds the write lock, and every writer queued behind it waits too (measured:
    one commit in ~40 took 16-25 ms, which more than doubled the mean commit). Here the first
    write of a process starts a thread that, at most every :data:`CHECKPOINT_INTERVAL_S` and
    only after a write, runs a ``PASSIVE`` checkpoint on a connection of its own: it blocks
    neither readers nor writers, and the sqlite3 module lets go of the GIL while it runs. The
    thread ends after :data:`CHECKPOINT_IDLE_S` without writes. Several processes may each run
    one; a checkpoint that finds another under way returns at once.

    Such a checkpoint, running beside the writers, always ends a little behind the newest
    commit, and SQLite rewinds the WAL to its start only after a checkpoint that left nothing
    behind: alone it would let the WAL grow for as long as writes keep coming (measured:
    885 MB in 9 s of creates). So SQLite's own checkpoint stays on, past
    :data:`WAL_BACKSTOP_PAGES`, and once the WAL holds a quarter of that the thread passes
    four times as often: the commit that crosses the backstop copies only what came since
    the last pass, completes the checkpoint, and the next write rewinds the WAL.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self._reset()
        _CHECKPOINTERS.add(self)

    def _reset(self) -> None:
        # also after a fork: the parent's thread does not exist in the child
        self._wrote = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()
        self._busy = threading.Lock()  # held during a pass, and across a fork (_hold_checkpoints)

    def wrote(self) -> None:
        """A write was committed: check it into the database file soon."""
        with self._starting:  # the thread decides to end under this lock: no wake-up is lost
            self._wrote.set()
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._run, name="iop-fhir-wal-checkpoint", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        wal_pages = 0
        while True:
            if not self._wrote.wait(CHECKPOINT_IDLE_S):
                with self._starting:  # idle: end, holding nothing; the next write starts another
                    if not self._wrote.is_set():
                        if self._thread is threading.current_thread():
                            self._thread = None
                        return
                continue
            # let a burst of writes gather; once the WAL grows, pass four times as often, so
            # the backstop finds little left to copy (yet no fsync storm under steady writes)
            pause = CHECKPOINT_INTERVAL_S if wal_pages < WAL_BACKSTOP_PAGES // 4 else CHECKPOINT_INTERVAL_S / 4
            stopping = self._stopping.wait(pause)
            self._wrote.clear()
            wal_pages = self._checkpoint()
            if stopping:
                return

    def _checkpoint(self) -> int:
        """One pass; returns the pages in the WAL (0 when unknown: another checkpoint ran)."""
        # A connection of its own for each pass, closed before a fork can copy it (a SQLite
        # connection must not cross one): an idle process keeps no file open for it.
        with self._busy:
            try:  # mode=rw: a database removed meanwhile is not created again, empty
                uri = Path(self.database).as_uri() + "?mode=rw"
                conn = sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
                try:
                    busy, wal_pages, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                finally:
                    conn.close()
            except sqlite3.Error as exc:  # the next write brings another attempt
                log.warning("WAL checkpoint of %s failed: %s", self.database, exc)
                return 0
        return 0 if busy else max(int(wal_pages), 0)

    def stop(self) -> None:
        """Stop the thread (the store is closing); a later write starts another."""
        with self._starting:
            thread, self._thread = self._thread, None
            self._stopping.set()
            self._wrote.set()
        if thread is not None:
            thread.join(timeout=SQLITE_BUSY_TIMEOUT_S)
        with self._starting:
            self._stopping.clear()
            self._wrote.clear()


_QUEUES: weakref.WeakSet[_WriterQueue] = weakref.WeakSet()
_CHECKPOINTERS: weakref.WeakSet[_Checkpointer] = weakref.WeakSet()
_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, _WriterQueue] = weakref.WeakKeyDictionary()
_WAL_CHECKPOINTERS: weakref.WeakKeyDictionary[Engine, _Checkpointer] = weakref.WeakKeyDictionary()
_SQLITE_FILES: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
_CREATING = threading.Lock()


_HELD_FOR_FORK: list[_Checkpointer] = []
_FORKING = threading.Lock()  # one fork at a time holds the checkpointers


def _hold_checkpoints() -> None:
    # a fork waits for a checkpoint under way: the child must not copy its open connection
    _FORKING.acquire()
    _HELD_FOR_FORK[:] = list(_CHECKPOINTERS)
    for checkpointer in _HELD_FOR_FORK:
        checkpointer._busy.acquire()


def _release_checkpoints() -> None:
    for checkpointer in _HELD_FOR_FORK:
        checkpointer._busy.release()
    _HELD_FOR_FORK.clear()
    _FORKING.release()


def _reset_after_fork() -> None:
    global _CREATING, _FORKING
    _CREATING = threading.Lock()
    _FORKING = threading.Lock()
    _HELD_FOR_FORK.clear()  # the child's checkpointers get fresh locks below
    for queue in list(_QUEUES):
        queue._reset()
    for checkpointer in list(_CHECKPOINTERS):
        checkpointer._reset()


os.register_at_fork(before=_hold_checkpoints, after_in_parent=_release_checkpoints, after_in_child=_reset_after_fork)


def _write_lock(engine: Engine) -> AbstractContextManager[Any]:
    """The queue of writers of a SQLite database file (:class:`_WriterQueue`). PostgreSQL needs
    none; the writers of a SQLite URI database (``?uri=true``) wait in SQLite's busy handler."""
    path = _SQLITE_FILES.get(engine)
    if path is None:
        return nullcontext()
    lock = _WRITE_LOCKS.get(engine)
    if lock is None:
        with _CREATING:
            lock = _WRITE_LOCKS.get(engine) or _WRITE_LOCKS.setdefault(engine, _WriterQueue(path))
    return lock


def _checkpointer(engine: Engine) -> _Checkpointer | None:
    """The engine's checkpoint thread; None for PostgreSQL and for a SQLite URI database
    (``?uri=true``), which keep their own checkpoints."""
    path = _SQLITE_FILES.get(engine)
    if path is None:
        return None
    found = _WAL_CHECKPOINTERS.get(engine)
    if found is None:
        with _CREATING:
            found = _WAL_CHECKPOINTERS.get(engine) or _WAL_CHECKPOINTERS.setdefault(engine, _Checkpointer(path))
    return found


def release(engine: Engine) -> None:
    """Let go of what this process holds for ``engine`` beyond its connections (the lock file,
    the checkpoint thread, after a last checkpoint of what it wrote)."""
    queue = _WRITE_LOCKS.pop(engine, None)
    if queue is not None:
        queue.close()
    checkpointer = _WAL_CHECKPOINTERS.pop(engine, None)
    if checkpointer is not None:
        checkpointer.stop()


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A connection in a write transaction, committed when the block ends (rolled back on error)."""
    with _write_lock(engine), engine.connect() as conn:
        conn.execution_options(**WRITE)
        with conn.begin():
            yield conn
    checkpointer = _checkpointer(engine)
    if checkpointer is not None:
        checkpointer.wrote()


class json_list(FunctionElement[str]):
    """A column's values over a group (or a correlated subquery) as the text of a JSON array
    (any value survives, spaces included): ``json_group_array`` on SQLite, ``json_agg`` on
    PostgreSQL (NULL there when there is none)."""

    type = Text()
    inherit_cache = True
    name = "json_list"


@compiles(json_list, "sqlite")
def _json_list_sqlite(element: json_list, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_group_array({compiler.process(element.clauses, **kw)})"


@compiles(json_list, "postgresql")
def _json_list_postgresql(element: json_list, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(json_agg({compiler.process(element.clauses, **kw)}) AS TEXT)"


class unindexed(ColumnElement[Any]):
    """A column that must not drive an index lookup: ``+column`` on SQLite, ``column`` elsewhere.

    SQLite plans without statistics and prefers an index that yields rows already in the
    ORDER BY order, even when it then scans every row of a type to find the twenty that a
    selective ``id IN (...)`` filter names (~30x slower at 10k resources). Writing a term as
    ``+column`` is SQLite's documented way to take that index out of the race. PostgreSQL
    keeps statistics and needs no hint.
    """

    inherit_cache = True
    _traverse_internals: ClassVar = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(unindexed)
def _unindexed_default(element: unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(unindexed, "sqlite")
def _unindexed_sqlite(element: unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return "+" + compiler.process(element.column, **kw)


ROWS_PER_INSERT = (64, 16)  # statement shapes, biggest first: few, so the driver keeps them prepared
SQLITE_MAX_PARAMETERS = 999  # SQLite's default limit before 3.32, the lowest any build may have


def _insert_rows(cursor: Any, sql: str, sizes: dict[int, str], args: Sequence[Sequence[Any]]) -> None:
    """Insert ``args`` (positional rows) with the multi-row statements in ``sizes``, biggest
    first, and what is left (fewer than the smallest) row by row with ``sql``."""
    done, total = 0, len(args)
    for size in sorted(sizes, reverse=True):
        while total - done >= size:
            cursor.execute(sizes[size], [value for row in args[done : done + size] for value in row])
            done += size
    if done < total:
        cursor.executemany(sql, args[done:])


class Prepared:
    """A statement compiled once per dialect and run straight on a DBAPI cursor.

    Why: a statement through SQLAlchemy's ``Connection`` costs 100-250 µs of Python (building,
    cache keys, events, result wrapping); on a DBAPI cursor a read by id takes ~30 µs and a
    write of one version (a dozen statements) drops from ~3 ms to under 1 ms. On a
    Connection the statement joins that connection's transaction (and savepoints); on an
    Engine it runs alone on a pooled connection (SQLite autocommit; PostgreSQL rolls back on
    return to the pool). Values bound at run time must need no type conversion (strings,
    numbers, bytes, bools, None; microsecond integers for times); literal values the
    statement was built with are bound as compiled. Rows come back raw (driver tuples).
    Driver errors are raised as SQLAlchemy's (``IntegrityError`` ...), as ``execute`` would.
    """

    def __init__(self, statement: Executable, *, rows_at_once: bool = False) -> None:
        """:param rows_at_once: the statement is a plain ``INSERT INTO t (...) VALUES (...)``
        (:func:`insert_all`), which ``executemany`` may send as multi-row INSERTs on SQLite."""
        self._statement = statement
        self._sql: dict[str, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}
        self._rows_at_once = rows_at_once
        self._multirow: dict[int, str] | None = None  # SQLite: rows per INSERT -> its SQL (see executemany)

    def _compiled(self, dialect: Dialect) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
        found = self._sql.get(dialect.name)
        if found is None:
            compiled = self._statement.compile(dialect=dialect)
            order = tuple(compiled.positiontup or ()) if compiled.positional else None
            found = self._sql[dialect.name] = (compiled.string, order, dict(compiled.params))
        return found

    def _args(self, dialect: Dialect, params: dict[str, Any]) -> tuple[str, Any]:
        sql, order, defaults = self._compiled(dialect)
        if defaults:
            params = {**defaults, **params}
        return sql, tuple(params[name] for name in order) if order is not None else params

    def _run(
        self, target: Engine | Connection, params: Any, action: Callable[[Any, str, Any], Any], many: bool = False
    ) -> Any:
        dialect = target.dialect
        if many:
            sql = self._compiled(dialect)[0]
            args: Any = [self._args(dialect, p)[1] for p in params]
        else:
            sql, args = self._args(dialect, params)
        proxy = target.connection if isinstance(target, Connection) else target.raw_connection()
        try:
            cursor = proxy.cursor()
            try:
                return action(cursor, sql, args)
            except dialect.loaded_dbapi.Error as exc:
                raise DBAPIError.instance(sql, args, exc, dialect.loaded_dbapi.Error, dialect=dialect) from exc
            finally:
                cursor.close()
        finally:
            if not isinstance(target, Connection):
                proxy.close()

    def first(self, target: Engine | Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """The first row, or None."""
        return self._run(target, params, lambda cursor, sql, args: cursor.execute(sql, args).fetchone())

    def all(self, target: Engine | Connection, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self._run(target, params, lambda cursor, sql, args: cursor.execute(sql, args).fetchall())

    def execute(self, conn: Connection, params: dict[str, Any]) -> int:
        """Run a write in ``conn``'s transaction; returns the row count."""

        def run(cursor: Any, sql: str, args: Any) -> int:
            cursor.execute(sql, args)
            return cursor.rowcount

        return self._run(conn, params, run)

    def executemany(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Run a write once per parameter set, in ``conn``'s transaction.

        On SQLite a bulk ``INSERT ... VALUES`` (16 rows or more) goes as multi-row INSERTs of
        :data:`ROWS_PER_INSERT` rows: the driver lets other threads run around every statement
        it steps, and a thread of a busy process then waits for the GIL before each next row.
        Row by row, the audit flusher's 400-event insert took seconds of wall time beside one
        busy request thread, and more of its own CPU. The few rows of one write's index stay
        row by row: preparing more statement shapes would cost them more than it saves.
        """
        if not rows:
            return
        sizes = self._multirow_sql(conn.dialect) if len(rows) >= min(ROWS_PER_INSERT) else None
        if sizes:
            self._run(conn, rows, lambda cursor, sql, args: _insert_rows(cursor, sql, sizes, args), many=True)
        else:
            self._run(conn, rows, lambda cursor, sql, args: cursor.executemany(sql, args), many=True)

    def _multirow_sql(self, dialect: Dialect) -> dict[int, str] | None:
        """SQLite only: a ``rows_at_once`` statement as multi-row INSERTs of each
        :data:`ROWS_PER_INSERT` size (fewer where SQLite's parameter limit says so); None for
        any other statement."""
        if dialect.name != "sqlite" or not self._rows_at_once:
            return None
        if self._multirow is None:
            sql, order, _defaults = self._compiled(dialect)
            head, found, values = sql.rpartition(" VALUES ")
            if not (found and order and values.startswith("(") and values.endswith(")") and values.count("(") == 1):
                self._multirow = {}
            else:
                width = max(1, values.count("?"))
                self._multirow = {
                    n: f"{head} VALUES {', '.join([values] * n)}" for n in {min(size, SQLITE_MAX_PARAMETERS // width) for size in ROWS_PER_INSERT}
                }
        return self._multirow or None


def insert_all(table: Table, *, skip: tuple[str, ...] = ()) -> Prepared:
    """``INSERT`` of every column of ``table`` (but ``skip``), bound by column name."""
    columns = {c.name: bindparam(c.name) for c in table.c if c.name not in skip}
    return Prepared(insert(table).values(columns).inline(), rows_at_once=True)


class PreparedCache:
    """Prepared statements by shape (least recently used dropped beyond ``size``)."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, Prepared] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], Executable]) -> Prepared:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        prepared = Prepared(build())
        with self._lock:
            self._items[key] = prepared
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return prepared


# PostgreSQL's "try the transaction again" states: serialization failure, deadlock detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def is_retryable(exc: DBAPIError) -> bool:
    """The database gave up this transaction in favour of another; running it again is safe."""
    return getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES


_ADVISORY_LOCK = Prepared(select(func.pg_advisory_xact_lock(func.hashtextextended(bindparam("key"), 0))))


def lock(conn: Connection, key: str) -> None:
    """Hold an exclusive lock on ``key`` until the current transaction ends.

    PostgreSQL: ``pg_advisory_xact_lock`` on a 64-bit hash of the key (a collision only
    serialises two unrelated writers). SQLite: nothing; ``BEGIN IMMEDIATE`` already holds the
    database's write lock.
    """
    if conn.dialect.name == "postgresql":
        _ADVISORY_LOCK.first(conn, {"key": key})
