"""/healthz and /readyz: liveness without the store, readiness through it."""

from __future__ import annotations

from iop_fhir.api import STORE_KEY


def test_healthz(client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_when_the_store_answers(client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "sqlite"}


def test_readyz_503_when_the_store_does_not_answer(app, monkeypatch) -> None:
    def broken(*args: object) -> None:
        raise ConnectionError("database is away")

    monkeypatch.setattr(app.extensions[STORE_KEY], "read", broken)
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json(force=True) == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "transient", "diagnostics": "the store does not answer: ConnectionError"}],
    }
    assert app.test_client().get("/healthz").status_code == 200  # alive all the same


def test_probes_are_public_when_auth_is_on(make_app) -> None:
    api = make_app(AUTH="on", JWT_SECRET="x" * 32).test_client()
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 200
