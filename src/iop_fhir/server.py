"""The app factory: settings, store, error handling, security, blueprints.

``create_app(config)`` is all a WSGI server, the tests or the CLI need. It reads like
Flask's tutorial factory: load settings, open the parts, register the blueprints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from iop_fhir.api import DESTINATIONS_KEY, STORE_KEY, admin, auth, bundles, disclosure, errors, fhir, health, iop, ncpdp, operations
from iop_fhir.config import load_settings
from iop_fhir.privacy import label
from iop_fhir.privacy.audit import AuditLog
from iop_fhir.privacy.gate import PrivacyGate
from iop_fhir.privacy.recipients import load_clients
from iop_fhir.store import Store
from iop_fhir.sync.destinations import Destination, Router, load_destinations

log = logging.getLogger("iop_fhir")


def open_store(settings: Mapping[str, Any], destinations: Mapping[str, Destination]) -> Store:
    """The store as every gateway process uses it (the app, the worker, the CLI): changes routed
    to the destinations in scope, and every write security-labelled (42 CFR Part 2, DS4P) before
    it is stored (docs/privacy.md)."""
    return Store.open(settings["DATABASE_URL"], router=Router(destinations.values()), labeller=label)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """A gateway app. ``config`` overrides the settings (see ``iop_fhir.config``)."""
    settings = load_settings(config)
    app = Flask("iop_fhir")
    app.config.update(settings)
    # Werkzeug refuses larger bodies with 413 before a handler reads them.
    app.config["MAX_CONTENT_LENGTH"] = settings["MAX_BODY_BYTES"]
    logging.basicConfig(level=settings["LOG_LEVEL"])

    destinations = load_destinations(settings)
    app.extensions[DESTINATIONS_KEY] = destinations
    app.extensions[STORE_KEY] = open_store(settings, destinations)
    # what leaves for a recipient is decided by consent and audited, every access too (docs/privacy.md)
    load_clients(settings)  # a mistake in a [[client]] table stops the start, naming the key
    audit = AuditLog.from_settings(app.extensions[STORE_KEY], settings)
    app.extensions[disclosure.GATE_KEY] = PrivacyGate(app.extensions[STORE_KEY], audit)

    errors.init_app(app)
    auth.init_app(app)
    disclosure.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(fhir.bp)
    app.register_blueprint(bundles.bp)
    app.register_blueprint(operations.bp)
    app.register_blueprint(iop.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(ncpdp.bp)
    return app
