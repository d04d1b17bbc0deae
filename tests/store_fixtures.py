"""Store fixtures (a pytest plugin, registered in tests/conftest.py, so every test directory
has them): every store test runs on SQLite, and on PostgreSQL when a URL is given.

``IOP_FHIR_TEST_POSTGRES_URL`` (e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
turns the PostgreSQL half on; without it those cases skip.

Isolation, kept cheap: ``store`` / ``store_url`` give each test an empty store (SQLite: a
copy of a migrated template file; PostgreSQL: one migrated schema per session, its tables
truncated before each test). ``database_url`` gives a database without any tables (SQLite: a
new file; PostgreSQL: a new schema, dropped afterwards) for tests of schema creation.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from iop_fhir.store import Store
from iop_fhir.store.tables import metadata

POSTGRES_URL = os.environ.get("IOP_FHIR_TEST_POSTGRES_URL")
START = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
MRN = "https://iop.example/mrn"


class Clock:
    """A deterministic clock: each reading is one millisecond after the one before.

    Thread-safe, so concurrent writers still get distinct, increasing times.
    """

    def __init__(self, start: datetime = START, step: timedelta = timedelta(milliseconds=1)) -> None:
        self.now = start
        self.step = step
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self.now += self.step
            return self.now

    def advance(self, **delta: float) -> None:
        with self._lock:
            self.now += timedelta(**delta)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql" and not POSTGRES_URL:
        pytest.skip("PostgreSQL: set IOP_FHIR_TEST_POSTGRES_URL to run the store tests on it")
    return request.param


@pytest.fixture(scope="session")
def _postgres_admin() -> Iterator[Engine]:
    engine = create_engine(POSTGRES_URL or "", isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def _schema_url(schema: str) -> str:
    url = make_url(POSTGRES_URL or "").update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "store.db"
    Store.open(f"sqlite:///{path}").close()  # closing checkpoints the WAL into the file
    return path


@pytest.fixture(scope="session")
def _postgres_store_schema(_postgres_admin: Engine) -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with _postgres_admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    Store.open(_schema_url(schema)).close()
    yield schema
    with _postgres_admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database without tables: a new SQLite file, or a new PostgreSQL schema."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/fresh.db"
        return
    admin = request.getfixturevalue("_postgres_admin")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _schema_url(schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty, migrated store for this test alone."""
    if backend == "sqlite":
        path = tmp_path / "store.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        return f"sqlite:///{path}"
    schema = request.getfixturevalue("_postgres_store_schema")
    admin = request.getfixturevalue("_postgres_admin")
    tables = ", ".join(f'"{schema}"."{t.name}"' for t in metadata.sorted_tables if t.name != "schema_version")
    with admin.connect() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY"))
    return _schema_url(schema)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def open_store(store_url: str, clock: Clock) -> Iterator[Callable[..., Store]]:
    """Opens (more) stores on the test's store database; all are closed at the end."""
    opened: list[Store] = []

    def factory(**kwargs: object) -> Store:
        kwargs.setdefault("clock", clock)
        store = Store.open(store_url, **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., Store]) -> Store:
    return open_store()


def _patient(mrn: str = "1", family: str = "Rivera", **extra: object) -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": family, "given": ["Alex"]}],
        **extra,
    }


@pytest.fixture
def make_patient() -> Callable[..., dict]:
    """``make_patient(mrn="1", family="Rivera", **elements)``: a small Patient with an MRN."""
    return _patient
