"""The HTTP face of the gateway: Flask blueprints over the store, mappers and formats.

Handlers stay thin: parse (``negotiate``), call the store or a mapper, respond. The store
is reached through ``store()``, set up once by ``server.create_app``.
"""

from __future__ import annotations

from flask import current_app

from iop_fhir.store import Store
from iop_fhir.sync.destinations import Destination

STORE_KEY = "iop_fhir.store"
DESTINATIONS_KEY = "iop_fhir.destinations"


def store() -> Store:
    """The application's store (one per app, shared by its requests)."""
    return current_app.extensions[STORE_KEY]


def destinations() -> dict[str, Destination]:
    """The configured destinations by name (``[[destination]]`` in the settings file)."""
    return current_app.extensions[DESTINATIONS_KEY]
