"""Gateway fixtures: an app on a fresh SQLite file per test (auth off unless a test turns it on)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.server import create_app


@pytest.fixture
def make_app(tmp_path) -> Callable[..., Flask]:
    """Build an app with overrides: ``make_app(AUTH="on", JWT_SECRET="s")``."""

    def build(**overrides: Any) -> Flask:
        settings = {"DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.sqlite'}", "AUTH": "off", **overrides}
        app = create_app(settings)
        app.testing = True
        return app

    return build


@pytest.fixture
def app(make_app) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
