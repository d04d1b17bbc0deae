"""The sync admin API: status per destination, listing deliveries, requeue and discard, who may."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.api import STORE_KEY
from iop_fhir.generate import generate_record
from iop_fhir.store import Store

SECRET = "a-development-secret-of-32-bytes-or-more"
EHR = {"name": "ehr", "kind": "fhir", "base_url": "http://127.0.0.1:9/fhir", "resources": ["Patient", "Condition"]}
REGISTRY = {"name": "registry", "kind": "fhir", "base_url": "http://127.0.0.1:9/fhir", "resources": ["Patient"], "enabled": False}


@pytest.fixture
def app(make_app) -> Flask:
    return make_app(destination=[EHR, REGISTRY])


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def store_of(app: Flask) -> Store:
    return app.extensions[STORE_KEY]


def post_record(client: FlaskClient, index: int = 0) -> None:
    response = client.post("/iop/records", json=generate_record(index, 11))
    assert response.status_code in (200, 201), response.get_data(as_text=True)


def row(client: FlaskClient, name: str) -> dict[str, Any]:
    response = client.get("/admin/sync")
    assert response.status_code == 200 and response.mimetype == "application/json"
    return {r["name"]: r for r in response.get_json()["destinations"]}[name]


def issue_at(response: Any, status: int = 400) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]["expression"][0]


def test_every_configured_destination_is_listed_with_zero_counts(client: FlaskClient) -> None:
    rows = client.get("/admin/sync").get_json()["destinations"]
    assert [r["name"] for r in rows] == ["ehr", "registry"]
    assert rows[0] == {
        "name": "ehr",
        "configured": True,
        "enabled": True,
        "kind": "fhir",
        "base_url": "http://127.0.0.1:9/fhir",
        "queued": 0,
        "in_flight": 0,
        "delivered": 0,
        "failed": 0,
        "dead": 0,
        "oldest_pending_age_seconds": None,
        "last_success": None,
        "last_error": None,
    }
    assert rows[1]["enabled"] is False


def test_status_counts_states_ages_successes_and_errors(app: Flask, client: FlaskClient) -> None:
    post_record(client)
    outbox = store_of(app).outbox
    queued = row(client, "ehr")["queued"]
    assert queued >= 2  # a Patient and its Conditions
    assert row(client, "ehr")["oldest_pending_age_seconds"] >= 0
    first, second, *_ = outbox.claim("w", destination="ehr", limit=queued)
    outbox.delivered("w", [first.id])
    outbox.dead_letter("w", [second.id], error="422: Condition.code unknown")
    status = row(client, "ehr")
    assert (status["delivered"], status["dead"], status["in_flight"]) == (1, 1, queued - 2)
    assert status["last_success"].endswith("Z") and status["last_error"] == "422: Condition.code unknown"


def test_deliveries_of_a_destination_no_longer_configured_are_shown(app: Flask, client: FlaskClient) -> None:
    store_of(app).create({"resourceType": "Patient", "identifier": [{"system": "https://x/mrn", "value": "9"}]}, deliver_to=["old-ehr"])
    old = row(client, "old-ehr")
    assert (old["configured"], old["kind"], old["base_url"], old["queued"]) == (False, None, None, 1)


def test_deliveries_are_listed_without_bodies_filtered_and_paged(app: Flask, client: FlaskClient) -> None:
    post_record(client)
    outbox = store_of(app).outbox
    claimed = outbox.claim("w", destination="ehr", limit=3)
    outbox.dead_letter("w", [d.id for d in claimed], error="refused")
    page = client.get("/admin/sync/deliveries?state=dead&destination=ehr&limit=2").get_json()
    assert [d["id"] for d in page["deliveries"]] == [d.id for d in claimed[:2]]
    assert page["next_after"] == claimed[1].id
    first = page["deliveries"][0]
    assert set(first) == {"id", "destination", "resource", "version", "action", "state", "attempts", "last_error", "created", "next_attempt_at"}
    assert first["resource"] == f"{claimed[0].resource_type}/{claimed[0].resource_id}"
    assert (first["state"], first["attempts"], first["last_error"]) == ("dead", 1, "refused")
    rest = client.get(f"/admin/sync/deliveries?state=dead&after={page['next_after']}").get_json()
    assert [d["id"] for d in rest["deliveries"]] == [claimed[2].id] and rest["next_after"] is None


@pytest.mark.parametrize(
    ("query", "field"),
    [("state=gone", "state"), ("limit=0", "limit"), ("limit=5000", "limit"), ("after=x", "after"), ("status=dead", "status")],
)
def test_bad_list_parameters_are_400_naming_the_parameter(client: FlaskClient, query: str, field: str) -> None:
    assert issue_at(client.get(f"/admin/sync/deliveries?{query}")) == field


def _dead(app: Flask, count: int) -> list[int]:
    outbox = store_of(app).outbox
    claimed = outbox.claim("w", destination="ehr", limit=count)
    outbox.dead_letter("w", [d.id for d in claimed], error="refused")
    return [d.id for d in claimed]


def test_requeue_by_ids_then_by_destination(app: Flask, client: FlaskClient) -> None:
    post_record(client)
    dead = _dead(app, 3)
    assert client.post("/admin/sync/requeue", json={"ids": [dead[0], 999999]}).get_json() == {"requeued": 1}
    again = store_of(app).outbox.list(resource=None, after_id=dead[0] - 1, limit=1)[0]
    assert (again.state.value, again.attempts) == ("queued", 0)
    assert client.post("/admin/sync/requeue", json={"destination": "ehr"}).get_json() == {"requeued": 2}
    assert row(client, "ehr")["dead"] == 0


def test_discard_with_an_empty_object_takes_every_dead_delivery(app: Flask, client: FlaskClient) -> None:
    post_record(client)
    assert len(_dead(app, 2)) == 2
    before = row(client, "ehr")
    assert client.post("/admin/sync/discard", json={}).get_json() == {"discarded": 2}
    after = row(client, "ehr")
    assert after["dead"] == 0 and after["queued"] == before["queued"]  # only dead ones go
    assert store_of(app).outbox.list(state="dead") == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([1, 2], "/"),
        ({"ids": "1"}, "ids"),
        ({"ids": []}, "ids"),
        ({"ids": [1, "two"]}, "ids[1]"),
        ({"ids": [True]}, "ids[0]"),
        ({"destination": "nowhere"}, "destination"),
        ({"destination": 3}, "destination"),
        ({"state": "dead"}, "state"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(client: FlaskClient, body: Any, field: str) -> None:
    for path in ("/admin/sync/requeue", "/admin/sync/discard"):
        assert issue_at(client.post(path, json=body)) == field


def test_an_empty_body_is_refused_rather_than_taken_for_all(client: FlaskClient) -> None:
    response = client.post("/admin/sync/discard", data=b"", content_type="application/json")
    assert response.status_code == 400


def _token(scope: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"client_id": "ops", "scope": scope, "iat": now, "exp": now + 300}, SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer not-a-jwt"}, 401),
        (_token("system/Patient.rs"), 403),
        (_token("system/*.rs"), 403),
        (_token("patient/*.cruds"), 403),
        (_token("system/*.cruds"), 200),
        (_token("system/*.*"), 200),
    ],
)
def test_admin_needs_full_system_access(make_app, headers: dict[str, str], status: int) -> None:
    client = make_app(AUTH="on", JWT_SECRET=SECRET, destination=[EHR]).test_client()
    assert client.get("/admin/sync", headers=headers).status_code == status
    assert client.post("/admin/sync/requeue", json={}, headers=headers).status_code == status


def test_a_403_names_the_scope_it_needs(make_app) -> None:
    client = make_app(AUTH="on", JWT_SECRET=SECRET).test_client()
    response = client.get("/admin/sync", headers=_token("system/*.rs"))
    assert response.status_code == 403 and 'scope="system/*.cud"' in response.headers["WWW-Authenticate"]


def test_the_age_of_the_oldest_pending_delivery_grows(app: Flask, client: FlaskClient) -> None:
    post_record(client)
    store = store_of(app)
    now = store.clock()
    store.clock = lambda: now + timedelta(minutes=5)  # what the endpoint reads "now" from
    assert row(client, "ehr")["oldest_pending_age_seconds"] >= 300
