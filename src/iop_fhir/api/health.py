"""Liveness and readiness for load balancers and orchestrators, outside ``/fhir``.

``GET /healthz`` says the process answers (it touches nothing else, so a slow database never
gets a healthy worker killed). ``GET /readyz`` says the store answers a trivial query, so
traffic goes elsewhere while the database is away: 503 with an OperationOutcome when not.
Both are public (see ``api.auth``).
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify

from iop_fhir.api import store
from iop_fhir.errors import Gone, IopFhirError, NotFound

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)

PROBE_ID = "readyz-probe"  # an id no resource has: one indexed lookup that finds nothing


class NotReady(IopFhirError):
    """The store does not answer; the gateway cannot serve (503)."""

    status = 503
    issue_code = "transient"


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Response:
    try:
        store().read("Patient", PROBE_ID)
    except (NotFound, Gone):
        pass  # the query ran: the store answers
    except Exception as exc:  # any failure of the probe means "not ready", never a 500
        log.warning("readiness probe failed: %s", exc)
        raise NotReady(f"the store does not answer: {type(exc).__name__}") from None
    return jsonify(status="ok", database=store().dialect)
