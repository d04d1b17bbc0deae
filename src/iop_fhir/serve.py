"""Running the gateway: gunicorn with several workers, Flask's own server for development, and the demo.

Why gunicorn, and which worker: gunicorn is a pip install with no compiler, starts from Python
(``GatewayServer``), and stops gracefully on SIGTERM. The worker class was chosen with
``bench/api.py`` on the 2-core machine at 16 connections: threaded workers (``gthread``: keep-alive
connections, a pool of threads per process) served 3-4 times the requests of ``sync`` workers
(which close every connection and hold one request per process), for the floor, read-by-id and
search alike (e.g. read 1,284-1,523 req/s against 324-355; search 700-769 against 175-192).
Processes beat threads for CPU-bound work under the GIL, so there are ``2 x cores`` of them, each
with ``THREADS`` threads to overlap database and socket waits (4 and 8 threads measured alike
within the noise of a shared machine; fewer threads mean less GIL contention in the tail).

The app is built once in the master, before the workers fork (``preload_app``): a
configuration or database error stops ``serve`` at once with a message instead of a crash loop
of workers, the schema is migrated once, and the workers share the loaded code. The store's
connections are closed before the fork; each worker opens its own (a SQLite or PostgreSQL
connection must never cross a fork).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask

from iop_fhir.api import STORE_KEY
from iop_fhir.api.disclosure import GATE_KEY
from iop_fhir.errors import IopFhirError, Issue
from iop_fhir.formats import fhir_validate
from iop_fhir.server import create_app
from iop_fhir.store.search_index import PARAMETERS

WORKER_CLASS = "gthread"
THREADS = 4  # per worker process: 2 per core x 4 = 16 requests in flight on 2 cores


def default_workers() -> int:
    """Two processes per core: one computes while another waits on the database or the socket."""
    return 2 * (os.cpu_count() or 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick), for ``--port 0`` and for tests."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def build_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """The gateway app ready to fork: built, migrated, with no open database connection, and
    the FHIR models of the served types loaded (the workers share them, and no request waits
    for their import)."""
    app = create_app(overrides)
    app.extensions[STORE_KEY].close()
    fhir_validate.preload([*PARAMETERS, "Bundle", "Parameters", "OperationOutcome"])
    return app


def gunicorn_options(host: str, port: int, workers: int, *, threads: int = THREADS, worker_class: str = WORKER_CLASS) -> dict[str, Any]:
    return {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": worker_class,
        "threads": threads,
        "preload_app": True,
        "timeout": 60,
        "graceful_timeout": 10,
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": "iop-fhir",
    }


def run_gunicorn(app: Flask, options: Mapping[str, Any]) -> None:
    """Serve ``app`` with gunicorn until SIGINT or SIGTERM (a graceful stop)."""
    from gunicorn.app.base import BaseApplication

    def worker_exit(_arbiter: Any, _worker: Any) -> None:
        # the audit trail's buffered events (privacy/audit.py) are written before the worker goes
        gate = app.extensions.get(GATE_KEY)
        if gate is not None:  # an app without the gateway's blueprints (bench/api.py's floor) has none
            gate.audit.close()

    class GatewayServer(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)
            self.cfg.set("worker_exit", worker_exit)

        def load(self) -> Flask:
            return app

    # The app's objects, loaded once before the fork, never die: moved out of the collector's
    # reach, a full collection in a worker no longer walks them (shorter pauses in the tail).
    import gc

    gc.collect()
    gc.freeze()
    # Output still buffered would be written once more by every forked worker.
    sys.stdout.flush()
    sys.stderr.flush()
    GatewayServer().run()


def run_dev(app: Flask, host: str, port: int) -> None:
    """Flask's development server: one process, threads, no reloader."""
    app.run(host=host, port=port, threaded=True, use_reloader=False)


# --- the demo ----------------------------------------------------------------------------------


@dataclass
class Loaded:
    """One record loaded into the demo store."""

    record_id: str
    resources: int


def load_records(app: Flask, records: Iterable[dict[str, Any]]) -> Iterator[Loaded]:
    """Load IOP records through the gateway's own ``POST /iop/records`` (the test client, no
    socket), so the demo data takes exactly the path a real client's does.

    Falls back to ``POST /fhir`` with the record's transaction Bundle while ``/iop/records`` is
    not served: the same mapper output, through the FHIR transaction code.

    :raises IopFhirError: the gateway refused a record (a bug: generated records are valid).
    """
    client = app.test_client()
    for record in records:
        response = client.post("/iop/records", json=record)
        if response.status_code in (404, 405):
            response = _post_transaction(client, record)
        if response.status_code >= 400:
            body = response.get_json(silent=True, force=True) or {}
            issues = [Issue(i.get("diagnostics", ""), "/".join(i.get("expression", []))) for i in body.get("issue", [])]
            raise IopFhirError(f"the gateway refused record {record.get('id')} ({response.status_code})", issues or None)
        yield Loaded(str(record.get("id")), _count_resources(response.get_json(silent=True, force=True)))


def _post_transaction(client: Any, record: dict[str, Any]) -> Any:
    from iop_fhir.formats import fhir_json
    from iop_fhir.mappers.bundle import record_to_bundle
    from iop_fhir.record import validate_record

    bundle = record_to_bundle(validate_record(record))
    return client.post("/fhir", data=fhir_json.dumps(bundle), content_type="application/fhir+json")


def _count_resources(body: Any) -> int:
    if isinstance(body, dict):
        for key in ("entry", "resources", "references"):
            if isinstance(body.get(key), list):
                return len(body[key])
    if isinstance(body, list):
        return sum(_count_resources(item) for item in body)
    return 0


@dataclass
class Demo:
    """A demo gateway, loaded and ready to fork (its store's connections closed)."""

    app: Flask
    database: str
    base: str
    records: int
    resources: int
    examples: list[tuple[str, str]]


def prepare_demo(
    folder: str, patients: int, seed: int, port: int, *, progress: Callable[[Iterator[Loaded]], Iterable[Loaded]] = lambda it: it
) -> Demo:
    """Generate a cohort, load it into a fresh SQLite file in ``folder`` (auth off), and find
    real ids for the examples. ``progress`` wraps the loading (the CLI's progress bar).

    :raises IopFhirError: the gateway refused a record.
    """
    from iop_fhir.generate import generate_cohort

    database = f"{folder}/demo.sqlite"
    app = build_app({"DATABASE_URL": f"sqlite:///{database}", "AUTH": "off", "LOG_LEVEL": "WARNING"})
    records = resources = 0
    first = ""
    for loaded in progress(load_records(app, generate_cohort(patients, seed))):
        records, resources, first = records + 1, resources + loaded.resources, first or loaded.record_id
    base = f"http://127.0.0.1:{port}"
    examples = demo_examples(app, base, first)
    app.extensions[STORE_KEY].close()  # the workers open their own connections
    return Demo(app, database, base, records, resources, examples)


def demo_examples(app: Flask, base: str, record_id: str) -> list[tuple[str, str]]:
    """(what, curl command) pairs against real ids of the loaded cohort."""
    store = app.extensions[STORE_KEY]
    page = store.search("Patient", count=1)
    patient = page.entries[0].id if page.entries else "PATIENT-ID"
    fhir = f"{base}/fhir"
    return [
        ("What the server supports", f"curl -s '{fhir}/metadata'"),
        ("Patients, a page of 5", f"curl -s '{fhir}/Patient?_count=5'"),
        ("A patient's prescriptions with the patient", f"curl -s '{fhir}/MedicationRequest?patient={patient}&_include=MedicationRequest:patient'"),
        ("Medication history for aftercare", f"curl -s '{fhir}/Patient/{patient}/$medication-history'"),
        ("The same patient in FHIR XML", f"curl -s -H 'Accept: application/fhir+xml' '{fhir}/Patient/{patient}'"),
        ("An IOP record, rebuilt from the store", f"curl -s '{base}/iop/records/{record_id}'"),
    ]
