"""Push: a source gateway's outbox delivered by ``iop-fhir worker`` to a second gateway, over loopback.

Every process is real: the target and the source are ``iop-fhir serve`` (gunicorn), the worker is
``python -m iop_fhir.cli worker``. What arrived is counted at the target by business identifier.

The fault run puts a seeded fault-injecting proxy between the worker and the target: it answers
500, or 429 with ``Retry-After: 1``, or forwards the request and then holds the answer past the
worker's read timeout (the target has written it; the worker does not know), for about 30% of
requests. A long-running worker is SIGKILLed mid-run; ``worker --once`` finishes. Every resource
must be at the target exactly once, and no delivery dead.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import servers
import requests

from iop_fhir.api.auth import IOP_TYPES
from iop_fhir.generate import generate_record

if TYPE_CHECKING:
    from servers import Server

pytestmark = pytest.mark.integration

SEED = 23
HTTP_TIMEOUT = 30
WORKER_TIMEOUT = 60  # seconds for a `worker --once` run
FAULT_SHARE = 0.3
RECORDS = 4  # the most records a test posts (generated with SEED, indexes from 0)




# --- processes -------------------------------------------------------------------------------------


def write_config(folder: Path, base_url: str, **keys: Any) -> Path:
    # the target is the provider the records' Part 2 consents name, so it receives everything
    providers = sorted({consented(index)[1] for index in range(RECORDS)})
    lines = ["[[destination]]", 'name = "ehr"', 'kind = "fhir"', f'base_url = "{base_url}"', f"recipient = {providers!r}"]
    lines += [f"{key} = {value!r}" for key, value in keys.items()]
    path = folder / "source.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def source_env(folder: Path, config: Path, **settings: str) -> dict[str, str]:
    return servers.gateway_env(folder / "source.sqlite", AUTH="off", CONFIG=str(config), **settings)


def start_source(folder: Path, env: dict[str, str]) -> Server:
    from iop_fhir.serve import free_port

    port = free_port()
    folder.mkdir(exist_ok=True)
    return servers.start(["serve", "--port", str(port), "--workers", "2"], port, folder, env)


def worker_once(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iop_fhir.cli", "worker", "--once", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def consented(index: int) -> tuple[dict[str, Any], str]:
    """Generated record ``index`` with one Part 2 consent, and the provider it names (``system|value``)."""
    return servers.with_part2_consent(generate_record(index, SEED))


def post_records(source: Server, indexes: range) -> None:
    for index in indexes:
        response = requests.post(f"{source.base}/iop/records", json=consented(index)[0], timeout=HTTP_TIMEOUT)
        assert response.status_code in (200, 201), response.text


def sync_row(source: Server) -> dict[str, Any]:
    response = requests.get(f"{source.base}/admin/sync", timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    return {r["name"]: r for r in response.json()["destinations"]}["ehr"]


# --- counting by identifier ------------------------------------------------------------------------


def everything(fhir_base: str, resource_type: str) -> list[dict[str, Any]]:
    """Every current resource of a type, following the ``next`` links."""
    found: list[dict[str, Any]] = []
    url: str | None = f"{fhir_base}/{resource_type}?_count=500"
    while url is not None:
        bundle = requests.get(url, headers={"Accept": "application/fhir+json"}, timeout=HTTP_TIMEOUT).json()
        found += [e["resource"] for e in bundle.get("entry", ()) if e.get("search", {}).get("mode", "match") == "match"]
        url = next((link["url"] for link in bundle.get("link", ()) if link["relation"] == "next"), None)
    return found


def census(fhir_base: str) -> tuple[Counter[tuple[str, str, str]], dict[str, str]]:
    """How often each (type, system, value) identifier occurs, and every resource's version by
    ``Type/id``; resources without an identifier (Provenance) count by ``Type/id``."""
    identifiers: Counter[tuple[str, str, str]] = Counter()
    versions: dict[str, str] = {}
    for resource_type in IOP_TYPES:
        for resource in everything(fhir_base, resource_type):
            keys = {(resource_type, i["system"], i["value"]) for i in resource.get("identifier", ()) if i.get("system")}
            identifiers.update(keys or {(resource_type, "id", resource["id"])})
            versions[f"{resource_type}/{resource['id']}"] = resource["meta"]["versionId"]
    return identifiers, versions


def assert_same_at_target(source: Server, target: Server) -> dict[str, str]:
    """Every identifier the source holds is at the target exactly once, and nothing else is."""
    at_source, _ = census(source.fhir)
    at_target, versions = census(target.fhir)
    assert at_source and all(n == 1 for n in at_source.values())
    duplicated = {k: n for k, n in at_target.items() if n != 1}
    assert not duplicated, f"at the target more than once: {sorted(duplicated)[:5]}"
    assert set(at_target) == set(at_source), (sorted(set(at_source) - set(at_target))[:5], sorted(set(at_target) - set(at_source))[:5])
    assert {t for t, _, _ in at_target} == {t for t, _, _ in at_source}  # every stored type arrived
    return versions


# --- push ------------------------------------------------------------------------------------------


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Server]:
    folder = tmp_path / "target"
    folder.mkdir()
    yield from servers.serve(folder, AUTH="off")


def test_push_delivers_every_resource_once_and_a_repeat_changes_nothing(tmp_path: Path, target: Server) -> None:
    config = write_config(tmp_path, target.fhir, batch_size=50)
    env = source_env(tmp_path, config)
    source = start_source(tmp_path / "source", env)
    try:
        post_records(source, range(3))
        assert sync_row(source)["queued"] > 300

        run = worker_once(env)
        assert run.returncode == 0, run.stderr
        status = sync_row(source)
        assert (status["queued"], status["in_flight"], status["failed"], status["dead"]) == (0, 0, 0, 0)
        assert status["delivered"] > 300 and status["last_success"] is not None
        versions = assert_same_at_target(source, target)

        again = worker_once(env)
        assert again.returncode == 0 and "delivered 0," in again.stderr
        post_records(source, range(3))  # the same records again: nothing changes, nothing is queued
        assert sync_row(source)["queued"] == 0
        assert worker_once(env).returncode == 0
        assert census(target.fhir)[1] == versions  # no new version of anything at the target
    finally:
        servers.stop(source)


# --- the fault run ---------------------------------------------------------------------------------


class FaultyProxy:
    """A forwarding HTTP proxy that misbehaves for a seeded share of requests."""

    def __init__(self, upstream: str, *, seed: int, share: float, hold: float) -> None:
        self.upstream = upstream.rstrip("/")
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.share, self.hold = share, hold
        self.faults: Counter[str] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.handle(self, "GET")

            def do_POST(self) -> None:
                proxy.handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the test reports the fault counts

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def _fault(self) -> str:
        with self.lock:
            draw = self.random.random()
        if draw >= self.share:
            return "forward"
        return ("500", "429", "timeout")[int(draw / self.share * 3)]

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        fault = self._fault()
        with self.lock:
            self.faults[fault] += 1
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        if fault == "500":
            return self._answer(handler, 500, b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception"}]}')
        if fault == "429":
            return self._answer(handler, 429, b"slow down", {"Retry-After": "1"})
        forwarded = {k: v for k, v in handler.headers.items() if k.lower() in ("content-type", "accept", "prefer")}
        upstream = requests.request(method, self.upstream + handler.path, data=body, headers=forwarded, timeout=HTTP_TIMEOUT)
        if fault == "timeout":
            time.sleep(self.hold)  # the target has written it; the worker gives up before the answer
        kept = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "etag", "location")}
        self._answer(handler, upstream.status_code, upstream.content, kept)

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            handler.send_response(status)
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker timed out and hung up: that was the point


def test_faults_and_a_killed_worker_still_deliver_everything_exactly_once(tmp_path: Path, target: Server) -> None:
    started = time.monotonic()
    with FaultyProxy(target.base, seed=SEED, share=FAULT_SHARE, hold=1.5) as proxy:
        config = write_config(
            tmp_path,
            f"{proxy.url}/fhir",
            batch_size=20,
            connect_timeout=1.0,
            read_timeout=1.0,
            backoff_base=0.2,
            backoff_max=1.0,
            max_attempts=100,
        )
        env = source_env(tmp_path, config, WORKER_LEASE="3", WORKER_POLL="0.2")
        source = start_source(tmp_path / "source", env)
        worker: subprocess.Popen[bytes] | None = None
        try:
            post_records(source, range(4))
            total = sync_row(source)["queued"]
            with (tmp_path / "worker.log").open("wb") as log:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "iop_fhir.cli", "worker"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            deadline = time.monotonic() + 40
            while sync_row(source)["delivered"] < total // 3:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                assert time.monotonic() < deadline, f"too slow: {sync_row(source)}"
                time.sleep(0.1)
            os.killpg(worker.pid, signal.SIGKILL)  # mid-run: it may hold a batch in flight
            worker.wait(10)
            killed_at = sync_row(source)
            assert killed_at["delivered"] < total, "the worker finished before it could be killed"

            run = worker_once(env, "--max-wait", "30")
            assert run.returncode == 0, run.stderr
            status = sync_row(source)
            assert (status["queued"], status["in_flight"], status["failed"], status["dead"]) == (0, 0, 0, 0)
            assert status["delivered"] == total
            assert_same_at_target(source, target)
            assert proxy.faults["500"] and proxy.faults["429"] and proxy.faults["timeout"], proxy.faults
        finally:
            if worker is not None and worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
            servers.stop(source)
    assert time.monotonic() - started < 90
