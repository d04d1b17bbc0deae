"""Real gateway processes on loopback, as datasette's ``ds_localhost_http_server`` does.

Each server is ``iop-fhir serve`` (gunicorn, two workers) on a free 127.0.0.1 port with its own
SQLite file, started once per module, awaited until ``/healthz`` answers (bounded), and stopped
at teardown (SIGTERM, then SIGKILL of its process group). Select these tests with
``-m integration``; they also run in the default ``python -m pytest``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from iop_fhir.serve import free_port

START_TIMEOUT = 30.0  # seconds for a server to answer /healthz
STOP_TIMEOUT = 10.0
HS256_SECRET = "integration-secret-of-at-least-thirty-two-bytes"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: starts real server processes on loopback")


@dataclass
class Server:
    """A running process answering HTTP on 127.0.0.1."""

    base: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log: Path
    database: Path

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def gateway_env(database: Path, **settings: str) -> dict[str, str]:
    """The environment for a server: this one's, minus any IOP_FHIR_* of the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOP_FHIR_")}
    env.update({"IOP_FHIR_DATABASE_URL": f"sqlite:///{database}", "IOP_FHIR_LOG_LEVEL": "WARNING"})
    env.update({f"IOP_FHIR_{k}": v for k, v in settings.items()})
    return env


def start(args: Sequence[str], port: int, folder: Path, env: dict[str, str]) -> Server:
    """Start ``iop-fhir ARGS`` and wait until it answers ``/healthz``."""
    log = folder / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "iop_fhir.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: teardown can reach the workers too
        )
    server = Server(f"http://127.0.0.1:{port}", process, log, folder / "gateway.sqlite")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.output()}")
        try:
            if requests.get(f"{server.base}/healthz", timeout=1).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    stop(server)
    raise RuntimeError(f"the server did not answer within {START_TIMEOUT} s:\n{server.output()}")


def stop(server: Server) -> None:
    """SIGTERM (gunicorn stops its workers gracefully), then SIGKILL the whole group."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(STOP_TIMEOUT)


def serve(folder: Path, **settings: str) -> Iterator[Server]:
    port = free_port()
    env = gateway_env(folder / "gateway.sqlite", **settings)
    server = start(["serve", "--port", str(port), "--workers", "2"], port, folder, env)
    try:
        yield server
    finally:
        stop(server)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway with auth off (every test in the module shares it; data are keyed per test)."""
    yield from serve(tmp_path_factory.mktemp("gateway"), AUTH="off")


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start other commands: ``launch("demo", "--patients", "2", port=port)``; stopped at teardown."""
    started: list[Server] = []

    def run(*args: str, port: int) -> Server:
        started.append(start(args, port, tmp_path, gateway_env(tmp_path / "gateway.sqlite")))
        return started[-1]

    yield run
    for server in started:
        stop(server)


@pytest.fixture
def make_token() -> Callable[[str], str]:
    """HS256 bearer tokens the secured gateway accepts: ``make_token("system/Patient.rs")``."""
    import jwt

    def token(scope: str) -> str:
        now = int(time.time())
        return jwt.encode({"client_id": "integration", "scope": scope, "iat": now, "exp": now + 120}, HS256_SECRET, algorithm="HS256")

    return token


@pytest.fixture(scope="module")
def secured_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway with auth on and an HS256 secret."""
    yield from serve(tmp_path_factory.mktemp("secured"), AUTH="on", JWT_SECRET=HS256_SECRET)
