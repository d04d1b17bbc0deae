"""Shared fixtures: the example record, and where the shared reference material lives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iop_fhir.record import IopRecord, validate_record

# the store fixtures (store, open_store, clock, backend, ...) for every directory that needs a store
pytest_plugins = ["store_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
# ../shared beside the clone (CI puts it there); tests that read it skip cleanly without it.
SHARED = ROOT.parent / "shared"


@pytest.fixture
def example_json() -> dict:
    return json.loads((FIXTURES / "iop" / "example-dual-diagnosis.json").read_text())


@pytest.fixture
def example_record(example_json: dict) -> IopRecord:
    return validate_record(example_json)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the repository")
    return SHARED
