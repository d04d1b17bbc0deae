"""Integration fixtures: real gateway processes on loopback, as datasette's
``ds_localhost_http_server`` does (the processes themselves: ``servers.py``).

A module-scoped gateway is shared by the tests of a module; data are keyed per test. Select
these tests with ``-m integration``; they also run in the default ``python -m pytest``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servers import HS256_SECRET, Server, gateway_env, serve, start, stop


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: starts real server processes on loopback")


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
