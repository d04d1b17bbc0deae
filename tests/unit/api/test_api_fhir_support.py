"""Helpers shared by the FHIR REST tests (no tests here): realistic resources and a loader.

The resources are the mappers' own output for ``fixtures/iop/example-dual-diagnosis.json``
(US Core shaped, valid R4), with the transaction's ``urn:uuid`` references rewritten to the
``Type/id`` references a server holds.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.api import STORE_KEY
from iop_fhir.mappers.bundle import record_to_bundle
from iop_fhir.record import validate_record
from iop_fhir.store.search_index import PARAMETERS

JSON = dict[str, Any]
FIXTURE = Path(__file__).parents[3] / "fixtures" / "iop" / "example-dual-diagnosis.json"
FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"
JSON_HEADERS = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
XML_HEADERS = {"Content-Type": FHIR_XML, "Accept": FHIR_XML}
BASE = "http://localhost/fhir"


@cache
def _example() -> tuple[JSON, ...]:
    bundle = record_to_bundle(validate_record(json.loads(FIXTURE.read_text(encoding="utf-8"))))
    local = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (local.get(v, v) if isinstance(v, str) else rewrite(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    return tuple(rewrite(e["resource"]) for e in bundle["entry"] if e["resource"]["resourceType"] in PARAMETERS)


def example_resources(resource_type: str | None = None) -> list[JSON]:
    """Fresh copies of the example's resources (of one type), in dependency order."""
    return [copy.deepcopy(r) for r in _example() if resource_type in (None, r["resourceType"])]


def example(resource_type: str) -> JSON:
    return example_resources(resource_type)[0]


def without_id(resource: JSON) -> JSON:
    """A resource ready for POST: no id, no identifiers (so creates do not collide)."""
    return {k: v for k, v in resource.items() if k not in ("id", "identifier")}


def load(client: FlaskClient, resources: list[JSON] | None = None) -> list[JSON]:
    """PUT every resource under its own id; returns what was stored."""
    stored = []
    for resource in example_resources() if resources is None else resources:
        response = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource, headers=JSON_HEADERS)
        assert response.status_code in (200, 201), response.get_json()
        stored.append(response.get_json())
    return stored


def versions(app: Flask) -> int:
    """How many resource versions the store holds (a failed request must not change it)."""
    return app.extensions[STORE_KEY].history(count=0, total=True).total


def issue(response: Any) -> JSON:
    """The first issue of an OperationOutcome answer."""
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]
