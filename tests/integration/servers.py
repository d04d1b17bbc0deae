"""Real gateway processes on loopback, for the integration tests (fixtures in conftest.py).

Each server is ``iop-fhir …`` (``serve``: gunicorn, two workers) on a free 127.0.0.1 port with
its own SQLite file, awaited until ``/healthz`` answers (bounded), and stopped at teardown
(SIGTERM, then SIGKILL of its process group). Test modules use these directly
(``import servers``) when they start servers of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from iop_fhir.serve import free_port

START_TIMEOUT = 30.0  # seconds for a server to answer /healthz
STOP_TIMEOUT = 10.0
HS256_SECRET = "integration-secret-of-at-least-thirty-two-bytes"


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


def with_part2_consent(record: dict) -> tuple[dict, str]:
    """``record`` whose only consent is a Part 2 consent (every category, treatment, in force
    since 2020) naming its first outside provider with an NPI, and that provider's identifier
    (``system|value``): a destination whose ``recipient`` lists it receives all of the record,
    its substance-use data included (42 CFR Part 2)."""
    provider = next(p for p in record["providers"] if p.get("npi"))
    consent = {
        "id": "consent-part2",
        "recipient_id": provider["id"],
        "purpose": "TREAT",
        "categories": ["all"],
        "period": {"start": "2020-01-01"},
        "part2": True,
        "signed": "2020-01-01",
    }
    return {**record, "consents": [consent]}, f"http://hl7.org/fhir/sid/us-npi|{provider['npi']}"
