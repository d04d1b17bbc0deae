"""Server processes the benchmarks start on loopback: launched in their own process group,
awaited until ``/healthz`` answers (bounded), stopped gracefully, then killed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

START_TIMEOUT = 60.0  # seconds for a server to answer /healthz


@dataclass
class Server:
    base: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def launch(command: Sequence[str], port: int, env: Mapping[str, str], *, label: str, log: Path | None = None) -> Server:
    """Start ``command`` (a server on ``port``) and wait until it answers ``/healthz``.

    :raises SystemExit: it exited, or did not answer within :data:`START_TIMEOUT` (naming ``label``
        and, with ``log``, the end of its output).
    """
    if log is not None:
        with log.open("wb") as out:
            process = subprocess.Popen(list(command), env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    else:
        process = subprocess.Popen(list(command), env=dict(env), start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = f": {log.read_text()[-2000:]}" if log is not None else ""
            raise SystemExit(f"the {label} exited with {process.returncode}{output}")
        try:
            if requests.get(f"{server.base}/healthz", timeout=1).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    server.stop()
    raise SystemExit(f"the {label} did not answer within {START_TIMEOUT:.0f} s")
