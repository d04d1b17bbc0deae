"""Settings, shared by the gateway, the worker and the CLI.

Load order (later wins): the defaults below, the TOML file named by ``IOP_FHIR_CONFIG``,
environment variables ``IOP_FHIR_<KEY>``, and finally explicit overrides (a test's dict, a
CLI option). Environment values are read as JSON when they parse (``IOP_FHIR_MAX_COUNT=200``
is an int, ``IOP_FHIR_AUTH=off`` a string), as Flask's ``from_prefixed_env`` does.

Keys are upper case in the code and lower or upper case in the TOML file. Arrays of tables
(``[[destination]]``) are kept as lists of dicts under their lower-case key.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from iop_fhir.errors import IopFhirError

ENV_PREFIX = "IOP_FHIR_"

DEFAULTS: dict[str, Any] = {
    # Where resources live: a SQLite file by default (nothing to install), PostgreSQL to scale out.
    "DATABASE_URL": "sqlite:///iop-fhir.sqlite",
    # on: bearer tokens required; off: development only, logged loudly at start.
    "AUTH": "on",
    # JWT verification: a shared secret (HS256, development) or a JWKS file/URL (RS/ES keys).
    "JWT_SECRET": None,
    "JWKS_FILE": None,
    "JWKS_URL": None,
    "JWT_ISSUER": None,
    "JWT_AUDIENCE": None,
    # The authorization server's token endpoint, advertised to SMART clients when set.
    "TOKEN_URL": None,
    # The public base URL of the gateway (for links in bundles); derived from requests if unset.
    "BASE_URL": None,
    # Request limits.
    "MAX_BODY_BYTES": 10 * 1024 * 1024,
    "DEFAULT_COUNT": 20,
    "MAX_COUNT": 500,
    "LOG_LEVEL": "INFO",
    # The delivery worker (iop-fhir worker): lease seconds per batch (None: 2 x the destination's
    # connect + read timeouts + 10 s), idle sleep seconds between passes, lease owner (None: host:pid).
    "WORKER_LEASE": None,
    "WORKER_POLL": 1.0,
    "WORKER_NAME": None,
    # Pharmacy fills (POST /ncpdp): days a discharged client's medication-assisted-treatment supply
    # may have run out before a refill counts as overdue and a Flag goes to the care team.
    "MAT_REFILL_GRACE_DAYS": 3,
    # The audit trail (privacy/audit.py): AuditEvents of reads are buffered and written every this
    # many seconds, or as soon as this many wait; a process killed outright loses at most that window.
    "AUDIT_FLUSH_INTERVAL": 0.1,
    "AUDIT_MAX_BUFFER": 500,
    # Stored events are indexed for search when the gateway is nearly idle (see AuditLog.index),
    # or under sustained load as soon as more than this many wait (the first audit query after
    # a burst indexes the rest: about 0.3 ms per event).
    "AUDIT_INDEX_BACKLOG": 50_000,
    # Seconds between the worker's checks for discharged clients whose medication-assisted
    # treatment ran out without a new fill (pharmacy/monitor.py): no fill, no message, no Flag.
    "MAT_CHECK_INTERVAL": 3600,
}


class ConfigError(IopFhirError):
    """A setting that cannot be used as given (names the key)."""

    status = 500
    issue_code = "exception"


def load_settings(overrides: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings in force: defaults < TOML file < environment < ``overrides``."""
    env = os.environ if environ is None else environ
    settings: dict[str, Any] = dict(DEFAULTS)
    path = (overrides or {}).get("CONFIG_FILE") or env.get(f"{ENV_PREFIX}CONFIG")
    if path:
        settings.update(read_toml(Path(path)))
    for name, raw in env.items():
        if name.startswith(ENV_PREFIX) and name != f"{ENV_PREFIX}CONFIG":
            settings[name[len(ENV_PREFIX):]] = _env_value(raw)
    settings.update(overrides or {})
    _check(settings)
    return settings


def read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        # Tables of settings keep their case-insensitive names; arrays of tables (destinations) stay lists.
        out[key if isinstance(value, list) and value and isinstance(value[0], dict) else key.upper()] = value
    return out


def _env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _check(settings: dict[str, Any]) -> None:
    if str(settings["AUTH"]).lower() not in ("on", "off"):
        raise ConfigError(f"AUTH must be 'on' or 'off', not {settings['AUTH']!r}")
    settings["AUTH"] = str(settings["AUTH"]).lower()
    for key in ("MAX_BODY_BYTES", "DEFAULT_COUNT", "MAX_COUNT"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < 1:
            raise ConfigError(f"{key} must be a positive integer, not {settings[key]!r}")
    if settings["DEFAULT_COUNT"] > settings["MAX_COUNT"]:
        raise ConfigError("DEFAULT_COUNT cannot exceed MAX_COUNT")
    for key, least in (("AUDIT_MAX_BUFFER", 1), ("AUDIT_INDEX_BACKLOG", 0)):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < least:
            raise ConfigError(f"{key} must be an integer of at least {least}, not {settings[key]!r}")
    interval = settings["AUDIT_FLUSH_INTERVAL"]
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not 0 < interval <= 60:
        raise ConfigError(f"AUDIT_FLUSH_INTERVAL must be a number of seconds above 0 and at most 60, not {interval!r}")


def namespace(settings: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The settings under ``PREFIX_`` with the prefix removed and keys lower-cased (as Flask's
    ``Config.get_namespace``), to hand a slice of the settings to one constructor."""
    return {k[len(prefix):].lower(): v for k, v in settings.items() if k.startswith(prefix)}
