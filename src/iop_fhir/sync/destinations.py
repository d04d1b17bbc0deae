"""Destinations: the outside systems the gateway delivers to and pulls from.

Declared as ``[[destination]]`` tables in the TOML file named by ``IOP_FHIR_CONFIG``::

    [[destination]]
    name = "ehr"
    kind = "fhir"                        # fhir | ncpdp
    base_url = "http://127.0.0.1:8090/fhir"
    auth = "none"                        # none | bearer | smart-backend
    resources = ["Patient", "MedicationRequest", "Observation", "CarePlan", "Condition"]
    recipient = ["http://hl7.org/fhir/sid/us-npi|1932102084"]   # who it is, for consents
    purpose = "TREAT"                    # why it receives (v3-ActReason)

Every key is checked when the settings load, and a mistake names the destination and the key
(``destination[0] ("ehr").batch_size: ...``): a typo must not silently deliver nowhere.

Which changes go where (the *scope*) is decided here and nowhere else: :class:`Router` is the
store's router, so each stored change that falls in a destination's scope is enqueued in the
same transaction as the change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iop_fhir.config import ConfigError
from iop_fhir.errors import Issue
from iop_fhir.mappers.consent import PURPOSE_DISPLAY
from iop_fhir.mappers.ids import default_system_base, resource_id

JSON = dict[str, Any]

KINDS = ("fhir", "ncpdp")
AUTHS = ("none", "bearer", "smart-backend")
FORMATS = ("json", "xml")
SIGNING_ALGORITHMS = ("RS384", "ES384")  # what SMART Backend Services requires servers to support
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

# Never delivered by routing: audit trails stay here, Bundles go only as discharge packages
# (addressed explicitly), and OperationOutcomes are not stored resources.
NEVER_ROUTED = frozenset({"AuditEvent", "Bundle", "OperationOutcome"})
# What a pharmacy is sent: prescriptions (as NewRx / CancelRx) and Tasks, of which the channel
# answers only the reviews of that pharmacy's renewal and change requests (RxRenewalResponse, ...).
PHARMACY_RESOURCES = frozenset({"MedicationRequest", "Task"})
# Purposes of use a destination may declare: those a consent can name (v3-ActReason) but
# ETREAT: an emergency is asserted per request (break the glass), never a system's standing purpose.
EMERGENCY_PURPOSE = "ETREAT"
PURPOSES = tuple(p for p in PURPOSE_DISPLAY if p != EMERGENCY_PURPOSE)
DEFAULT_PURPOSE = "TREAT"
# How a destination names itself as a party a consent may name, by reference.
RECIPIENT_REFERENCE = re.compile(r"(Organization|Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}")
# What a pull reads by default: the outside medication picture an intake reconciliation needs.
DEFAULT_PULL_RESOURCES = (
    "MedicationRequest",
    "MedicationStatement",
    "MedicationDispense",
    "Observation",
    "Condition",
    "AllergyIntolerance",
)


@dataclass(frozen=True)
class SmartBackend:
    """SMART Backend Services client credentials (OAuth2 client_credentials + private_key_jwt)."""

    token_url: str
    client_id: str
    private_key: Path  # PEM file of the RSA or EC private key
    algorithm: str = "RS384"  # RS384 | ES384
    key_id: str | None = None  # the ``kid`` the authorization server knows the key by
    scope: str = "system/*.cruds"


@dataclass(frozen=True)
class Destination:
    """One outside system, as configured."""

    name: str
    kind: str
    base_url: str
    auth: str = "none"
    token: str | None = field(default=None, repr=False)  # auth = "bearer"
    smart: SmartBackend | None = None  # auth = "smart-backend"
    format: str = "json"
    # scope: None means no filter
    resources: frozenset[str] | None = None
    programs: frozenset[str] | None = None  # program ids or identifier-system bases
    patients: frozenset[str] | None = None  # "Patient/{id}" keys
    # delivery
    batch_size: int = 50
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 8
    backoff_base: float = 1.0  # seconds; doubled per attempt, with jitter
    backoff_max: float = 600.0
    # pull
    pull: bool = False  # pull on a schedule inside the worker
    pull_interval: float = 300.0
    pull_resources: tuple[str, ...] = DEFAULT_PULL_RESOURCES
    # discharge continuity: the aftercare providers (identifiers "system|value") this system serves
    aftercare_providers: frozenset[str] = frozenset()
    # pharmacies (kind = "ncpdp")
    ncpdp_id: str | None = None
    # privacy: who the destination is, for the patients' consents ("system|value" identifiers
    # and "Organization/..." references; privacy.recipients.recipient_for_destination), and why it
    # receives (a v3-ActReason purpose of use)
    recipient: tuple[str, ...] = ()
    purpose: str = DEFAULT_PURPOSE
    enabled: bool = True

    def accepts(self, resource_type: str, resource: JSON, patient_key: str | None) -> bool:
        """Whether a change of this resource falls in this destination's scope.

        Resources without a patient (organisations, practitioners) pass the patient filter,
        because the patients' resources refer to them and the target must be able to resolve
        those references.
        """
        if not self.enabled or resource_type in NEVER_ROUTED:
            return False
        if self.kind == "ncpdp" and resource_type not in PHARMACY_RESOURCES:
            return False
        if self.resources is not None and resource_type not in self.resources:
            return False
        if self.patients is not None and patient_key is not None and patient_key not in self.patients:
            return False
        return self.programs is None or _in_programs(resource, self.programs)

    def serves_aftercare(self, identifiers: Iterable[tuple[str, str]]) -> bool:
        """Whether this system is the aftercare provider with one of these identifiers."""
        return self.enabled and any(f"{system}|{value}" in self.aftercare_providers for system, value in identifiers)


def _in_programs(resource: JSON, bases: frozenset[str]) -> bool:
    """A resource belongs to a program when one of its identifier systems is under the program's base."""
    for item in resource.get("identifier") or ():
        system = item.get("system") if isinstance(item, dict) else None
        if isinstance(system, str) and any(system.startswith(base + "/") for base in bases):
            return True
    return False


class Router:
    """The store's router: the names of the destinations whose scope a change falls in."""

    def __init__(self, destinations: Iterable[Destination]) -> None:
        self.destinations = tuple(destinations)

    def __call__(self, resource_type: str, resource: JSON, patient_key: str | None) -> list[str]:
        return [d.name for d in self.destinations if d.accepts(resource_type, resource, patient_key)]


# --- loading -------------------------------------------------------------------------------------

_KEYS = {
    "name", "kind", "base_url", "auth", "token", "token_env", "token_url", "client_id", "private_key",
    "algorithm", "key_id", "scope", "format", "resources", "programs", "patients", "batch_size",
    "connect_timeout", "read_timeout", "timeout", "max_attempts", "backoff_base", "backoff_max", "pull",
    "pull_interval", "pull_resources", "aftercare_providers", "ncpdp_id", "recipient", "purpose", "enabled",
}  # fmt: skip


def load_destinations(settings: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> dict[str, Destination]:
    """The destinations declared in the settings (``destination`` array of tables), by name.

    :raises ConfigError: naming every problem as ``destination[i] ("name").key``.
    """
    raw = settings.get("destination", settings.get("DESTINATION")) or []
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError("destination must be an array of tables ([[destination]])")
    env = os.environ if environ is None else environ
    problems: list[Issue] = []
    out: dict[str, Destination] = {}
    for index, table in enumerate(raw):
        reader = _Reader(index, table, problems)
        destination = reader.destination(env)
        if destination is None:
            continue
        if destination.name in out:
            reader.fail("name", f"{destination.name!r} is declared twice")
        out[destination.name] = destination
    if problems:
        raise ConfigError("; ".join(f"{p.location}: {p.message}" for p in problems), problems)
    return out


class _Reader:
    """Reads one ``[[destination]]`` table, collecting every problem with its location."""

    def __init__(self, index: int, table: Any, problems: list[Issue]) -> None:
        self.index = index
        self.table: Mapping[str, Any] = table if isinstance(table, Mapping) else {}
        self.problems = problems
        self.ok = True
        if not isinstance(table, Mapping):
            self.fail("", "must be a table")

    def where(self, key: str) -> str:
        name = self.table.get("name")
        label = f"destination[{self.index}]" + (f" ({name!r})" if isinstance(name, str) else "")
        return f"{label}.{key}" if key else label

    def fail(self, key: str, message: str) -> None:
        self.ok = False
        self.problems.append(Issue(message, location=self.where(key), code="value"))

    def text(self, key: str, *, required: bool = False, choices: Sequence[str] | None = None, default: str | None = None) -> str | None:
        value = self.table.get(key, default)
        if value is None:
            if required:
                self.fail(key, "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a non-empty string, not {value!r}")
            return None
        if choices is not None and value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, not {value!r}")
            return None
        return value

    def number(self, key: str, default: float, *, integer: bool = False) -> Any:
        value = self.table.get(key, default)
        kind_ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not kind_ok or value <= 0:
            self.fail(key, f"must be a positive {'integer' if integer else 'number'}, not {value!r}")
            return default
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {value!r}")
            return default
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            self.fail(key, "must be an array of non-empty strings")
            return None
        return value

    def destination(self, env: Mapping[str, str]) -> Destination | None:
        if not self.ok:
            return None
        for key in sorted(set(self.table) - _KEYS):
            self.fail(key, "is not a destination setting")
        name = self.text("name", required=True)
        if name is not None and not NAME.fullmatch(name):
            self.fail("name", "must be letters, digits, '.', '_' or '-' (at most 100)")
        kind = self.text("kind", required=True, choices=KINDS)
        base_url = self.text("base_url", required=True)
        if base_url is not None and not re.match(r"https?://[^/\s]+", base_url):
            self.fail("base_url", f"must be an http or https URL, not {base_url!r}")
        auth = self.text("auth", choices=AUTHS, default="none") or "none"
        token = self._token(auth, env)
        smart = self._smart() if auth == "smart-backend" else None
        timeout = self.number("timeout", 30.0)
        resources = self.strings("resources")
        pull_resources = self.strings("pull_resources")
        programs = self.strings("programs")
        patients = self.strings("patients")
        aftercare = self.strings("aftercare_providers") or []
        for item in aftercare:
            if not _is_identifier(item):
                self.fail("aftercare_providers", f"{item!r} must be an identifier 'system|value'")
        ncpdp_id = self.text("ncpdp_id")
        if kind == "ncpdp" and ncpdp_id is None:
            self.fail("ncpdp_id", "is required for an ncpdp destination (the pharmacy's NCPDPID)")
        recipient = self.strings("recipient") or []
        for item in recipient:
            if not _is_identifier(item) and not RECIPIENT_REFERENCE.fullmatch(item):
                self.fail("recipient", f"{item!r} must be an identifier 'system|value' or a reference 'Organization/{{id}}' (or Practitioner, PractitionerRole)")
        purpose = self.text("purpose", default=DEFAULT_PURPOSE) or DEFAULT_PURPOSE
        if purpose == EMERGENCY_PURPOSE:
            self.fail("purpose", "cannot be ETREAT: an emergency is asserted per request (break the glass), not as a destination's standing purpose")
        elif purpose not in PURPOSES:
            self.fail("purpose", f"must be a purpose of use, one of {', '.join(PURPOSES)}, not {purpose!r}")
        destination = Destination(
            name=name or "",
            kind=kind or "fhir",
            base_url=(base_url or "").rstrip("/"),
            auth=auth,
            token=token,
            smart=smart,
            format=self.text("format", choices=FORMATS, default="json") or "json",
            resources=frozenset(resources) if resources is not None else None,
            programs=frozenset(_program_base(p) for p in programs) if programs is not None else None,
            patients=frozenset(_patient_key(p) for p in patients) if patients is not None else None,
            batch_size=self.number("batch_size", 50, integer=True),
            connect_timeout=self.number("connect_timeout", 5.0),
            read_timeout=self.number("read_timeout", timeout),
            max_attempts=self.number("max_attempts", 8, integer=True),
            backoff_base=self.number("backoff_base", 1.0),
            backoff_max=self.number("backoff_max", 600.0),
            pull=self.flag("pull", False),
            pull_interval=self.number("pull_interval", 300.0),
            pull_resources=tuple(pull_resources) if pull_resources is not None else DEFAULT_PULL_RESOURCES,
            aftercare_providers=frozenset(aftercare),
            ncpdp_id=ncpdp_id,
            recipient=tuple(dict.fromkeys(recipient)),
            purpose=purpose,
            enabled=self.flag("enabled", True),
        )
        return destination if self.ok else None

    def _token(self, auth: str, env: Mapping[str, str]) -> str | None:
        token = self.text("token")
        variable = self.text("token_env")
        if variable is not None:
            token = env.get(variable)
            if not token:
                self.fail("token_env", f"names the environment variable {variable}, which is not set")
        if auth == "bearer" and token is None and variable is None:
            self.fail("token", "is required when auth = 'bearer' (or token_env naming a variable)")
        return token

    def _smart(self) -> SmartBackend | None:
        token_url = self.text("token_url", required=True)
        client_id = self.text("client_id", required=True)
        key = self.text("private_key", required=True)
        algorithm = self.text("algorithm", choices=SIGNING_ALGORITHMS, default="RS384") or "RS384"
        if key is not None and not Path(key).is_file():
            self.fail("private_key", f"{key} is not a readable file")
        if token_url is None or client_id is None or key is None:
            return None
        return SmartBackend(
            token_url=token_url,
            client_id=client_id,
            private_key=Path(key),
            algorithm=algorithm,
            key_id=self.text("key_id"),
            scope=self.text("scope", default="system/*.cruds") or "system/*.cruds",
        )


def _is_identifier(text: str) -> bool:
    """``system|value`` with both parts present."""
    system, bar, value = text.partition("|")
    return bool(bar and system.strip() and value.strip())


def _program_base(program: str) -> str:
    """A program id (``riverbend-iop``) or an identifier-system base given as a URI."""
    return program.rstrip("/") if "://" in program or program.startswith("urn:") else default_system_base(program)


def _patient_key(patient: str) -> str:
    """``Patient/{id}``, or a client identifier ``system|value`` (the MRN the records carry)."""
    if "|" in patient:
        system, value = patient.split("|", 1)
        return f"Patient/{resource_id('Patient', system, value)}"
    return patient if patient.startswith("Patient/") else f"Patient/{patient}"
