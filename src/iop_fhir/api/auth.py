"""Who may do what: bearer tokens (JWT) carrying SMART scopes, checked before every request.

One ``before_request`` hook authenticates the caller and authorises the request, so handlers
never test scopes themselves. It classifies the request on its own (method + path, and for a
transaction or batch Bundle each entry) into *needs*: a resource type and the SMART v2
permission letters (``c r u d s``) the interaction requires. The token's scopes must grant
every need, or the answer is 403; a missing, malformed, expired or unverifiable token is 401.

Tokens are JWTs verified with keys from the settings:

* ``JWT_SECRET``: a shared secret for HS256 (development and tests);
* ``JWKS_FILE``: a JSON Web Key Set file (RS256, RS384, ES256, ES384);
* ``JWKS_URL``: the same fetched over HTTPS (cached; refetched when a token names an unknown
  ``kid``, at most once per ``JWKS_MIN_REFETCH`` seconds).

``exp`` is required; ``exp``, ``nbf`` and ``iat`` are checked with ``LEEWAY`` seconds of clock
skew; ``iss`` and ``aud`` are checked when ``JWT_ISSUER`` / ``JWT_AUDIENCE`` are set.

Scopes (claim ``scope``, space separated, or ``scp``, a list): SMART v2
``<context>/<Type|*>.<cruds>`` with context ``system``, ``user`` or ``patient``; the SMART v1
forms ``.read``, ``.write`` and ``.*`` count as ``.rs``, ``.cud`` and ``.cruds``. Granular v2
scopes with a query (``patient/Observation.rs?category=laboratory``) grant nothing: the
gateway cannot yet confine results to them. ``user/`` scopes grant as ``system/`` ones do (the
gateway keeps no per-user permissions).

What each interaction needs (the table the hook applies):

=========================================  =====================================================
read, vread, instance/type history          ``r`` on the type (system history: ``r`` on ``*``)
search (GET, POST ``_search``)              ``s`` on the type (system search: ``s`` on ``*``)
``_include`` / ``_revinclude``              ``r`` on the included type (the named target, the
                                            parameter's target, else ``*``)
create                                      ``c`` (conditional create, If-None-Exist: ``c`` + ``s``)
update (PUT Type/id), patch                 ``u`` (create-on-update included)
conditional update (PUT Type?criteria)      ``u`` + ``c`` (it creates when nothing matches)
delete                                      ``d`` (conditional delete: ``d`` + ``s``)
``$validate``                               a valid token only: it stores and reveals nothing
``Patient/{id}/$everything``                ``r`` on Patient, ``rs`` on every patient-compartment
                                            type, ``r`` on Practitioner, PractitionerRole,
                                            Organization
``Patient/{id}/$medication-history``        ``r`` on Patient; ``rs`` on MedicationRequest,
                                            MedicationDispense, MedicationStatement,
                                            Observation; ``r`` on Practitioner,
                                            PractitionerRole, Organization
other operations                            ``r`` + ``s`` on the type (or on ``*``)
transaction / batch                         each entry as above; a refusal names
                                            ``Bundle.entry[i]``
``POST``/``PUT /iop/records``               ``c`` + ``u`` on every type a record maps to
``GET /iop/records…``                       ``r`` (and ``s`` for a list) on those types
                                            (``…/reconciliation`` also MedicationStatement and
                                            MedicationDispense, ``…/discharge`` Bundle)
``/admin/…`` (the sync queue, the NCPDP     ``cruds`` on ``*``: ``system/*.cruds`` (v1
message store)                              ``system/*.*``)
``POST /ncpdp`` (a pharmacy's message)      ``c`` on MedicationDispense
=========================================  =====================================================

``patient/`` scopes need the token's patient (claim ``patient``, or a ``Patient/…`` reference
in ``fhirContext``); without one they grant no resource access at all. With one they cover
that patient's compartment: the Patient itself and every resource whose ``patient`` search
parameter names it (:func:`compartment_patients`, the rule the store's index applies).

* Where the URL pins a patient (``Patient/{id}``; a search with ``patient=``,
  ``subject=Patient/…`` or, for Patient, ``_id=``; ``$everything`` / ``$medication-history``)
  this hook checks it: another patient is a 403 here.
* Everything else a compartment can confine passes the hook *confined*
  (:class:`Confinement`, kept for the request), and the handler that sees the stored
  resources enforces it: read, vread and instance history show only what lies in the
  compartment (a version outside is a 403, a history leaves it out); searches are answered
  with the patient added to their criteria; ``_include`` / ``_revinclude`` leave out what
  lies outside; create, update, patch and delete write only resources in that patient's
  compartment and no other patient's, checked on the version replaced and the version
  stored inside the write's own unit of work (a refusal rolls it back); transaction and
  batch entries each on their own.
* Practitioner, PractitionerRole and Organization (and Location, Medication) belong to no
  patient: ``r`` / ``s`` on them (or on ``*``) under ``patient/`` scopes read and search
  them all, so that a patient's app can resolve the references in its records (US Core
  expects that); ``patient/`` scopes never write them.
* What cannot be confined (type and system history, other operations, ``/iop``) needs
  ``user/`` or ``system/`` scopes.

Public without a token: ``/fhir/metadata``, ``/.well-known/smart-configuration`` (also under
``/fhir``), ``/healthz``, ``/readyz``, ``/iop/schema``. ``AUTH = "off"`` (development only)
turns all of this off, with a loud warning at start.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from iop_fhir.config import ConfigError
from iop_fhir.errors import Gone, IopFhirError, Issue, NotFound
from iop_fhir.store import Saved, Store, UnitOfWork
from iop_fhir.store.search_index import PARAMETERS, referenced_ids, search_parameters

log = logging.getLogger(__name__)

SECURITY_KEY = "iop_fhir.security"
VERIFIER_KEY = "iop_fhir.auth.verifier"
READS_KEY = "iop_fhir.auth.operation_reads"
_CONFINED = "iop_fhir_confined"  # g: where the request is confined to a patient's compartment

LEEWAY = 30  # seconds of clock skew allowed on exp / nbf / iat
JWKS_TIMEOUT = 5.0  # seconds for fetching JWKS_URL
JWKS_MAX_AGE = 300  # seconds a fetched key set is used before it is fetched again
JWKS_MIN_REFETCH = 30  # seconds between two fetches forced by an unknown kid
TOKEN_CACHE_SECONDS = 300  # a verified token is trusted this long (or until it expires)
TOKEN_CACHE_SIZE = 4096
ASYMMETRIC = {"RS256": ("RSA", None), "RS384": ("RSA", None), "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384")}

PERMISSIONS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"(patient|user|system)/([A-Z][A-Za-z]*|\*)\.([a-z*]+)")
_V2 = re.compile(r"c?r?u?d?s?")
_TYPE = re.compile(r"[A-Z][A-Za-z]*")

PUBLIC_PATHS = frozenset(
    {"/fhir/metadata", "/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration", "/healthz", "/readyz", "/iop/schema"}
)

# The types one IOP record maps to (mappers/bundle.py); /iop needs scopes on all of them.
IOP_TYPES = (
    "CarePlan", "CareTeam", "Condition", "Consent", "Encounter", "EpisodeOfCare", "Goal", "MedicationRequest",
    "Observation", "Organization", "Patient", "Practitioner", "PractitionerRole", "Provenance", "Task",
)  # fmt: skip
# The record views (/iop/records/{id}/{view}) also show outside medications pulled from EHRs,
# and the discharge package Bundle.
IOP_VIEW_TYPES = {"reconciliation": ("MedicationStatement", "MedicationDispense"), "discharge": ("Bundle",)}
# Types a patient's compartment holds here: those with a ``patient`` search parameter.
COMPARTMENT_TYPES = tuple(sorted(t for t in PARAMETERS if "patient" in search_parameters(t)))
PARTIES = ("Practitioner", "PractitionerRole", "Organization")
# What the Patient-level operations return, as (type, permissions).
OPERATION_READS: dict[str, tuple[tuple[str, str], ...]] = {
    "everything": (("Patient", "r"), *((t, "rs") for t in COMPARTMENT_TYPES), *((t, "r") for t in PARTIES)),
    "medication-history": (
        ("Patient", "r"),
        *((t, "rs") for t in ("MedicationRequest", "MedicationDispense", "MedicationStatement", "Observation")),
        *((t, "r") for t in PARTIES),
    ),
}
TOKEN_ONLY_OPERATIONS = frozenset({"validate"})
# Who and what records point at without being any patient's: patient/ scopes read them all.
# (Location and Medication are not served today; listed so serving them needs no new rule.)
DIRECTORY_TYPES = frozenset({*PARTIES, "Location", "Medication"})
# The types a patient/ scope can be confined to: the patient's own compartment, or "*".
_CONFINABLE = frozenset({"Patient", "*", *COMPARTMENT_TYPES})
_INCLUDES = ("_include", "_revinclude")  # the interaction of the needs of what these add to a page


# --- errors --------------------------------------------------------------------------------------


def _quoted(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")


class Unauthorized(IopFhirError):
    """No usable bearer token: missing, malformed, expired, or not signed by a trusted key (401).

    ``headers`` carries the ``WWW-Authenticate`` challenge (RFC 6750 §3): without a token it
    names only the scheme, as the RFC asks; with a bad one it says ``error="invalid_token"``.
    """

    status = 401
    issue_code = "login"

    def __init__(self, message: str, *, token_given: bool = True) -> None:
        super().__init__(message)
        challenge = 'Bearer realm="iop-fhir"'
        if token_given:
            challenge += f', error="invalid_token", error_description="{_quoted(message)}"'
        self.headers = {"WWW-Authenticate": challenge}


class Forbidden(IopFhirError):
    """A valid token whose scopes do not cover the request (403); each issue names a missing need."""

    status = 403
    issue_code = "forbidden"

    def __init__(self, message: str, issues: list[Issue], scopes: Iterable[str]) -> None:
        super().__init__(message, issues)
        wanted = " ".join(dict.fromkeys(scopes))
        self.headers = {"WWW-Authenticate": f'Bearer realm="iop-fhir", error="insufficient_scope", scope="{wanted}"'}


class KeysUnavailable(IopFhirError):
    """The key set at ``JWKS_URL`` could not be fetched and none is cached: not the client's fault."""

    status = 503
    issue_code = "transient"


# --- scopes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """One SMART scope, parsed: ``system/MedicationRequest.rs`` is (system, MedicationRequest, rs)."""

    context: str  # patient | user | system
    resource_type: str  # a type or "*"
    permissions: str  # letters of "cruds", in that order

    def permits(self, resource_type: str, permission: str) -> bool:
        return permission in self.permissions and self.resource_type in ("*", resource_type)

    @property
    def scope(self) -> str:
        return f"{self.context}/{self.resource_type}.{self.permissions}"


def parse_scope(scope: str) -> Grant | None:
    """The grant of one scope string, or None for scopes that grant no resource access here
    (``openid``, ``launch``, granular scopes with a query, malformed ones)."""
    found = _SCOPE.fullmatch(scope)
    if found is None:
        return None
    context, resource_type, permissions = found.groups()
    if permissions in _V1:
        return Grant(context, resource_type, _V1[permissions])
    if permissions and _V2.fullmatch(permissions):
        return Grant(context, resource_type, permissions)
    return None


def parse_scopes(scopes: Iterable[str]) -> tuple[Grant, ...]:
    return tuple(grant for grant in map(parse_scope, scopes) if grant is not None)


# --- the caller --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """Who is calling: what the privacy work needs to decide per recipient and to audit.

    :param client_id: the OAuth client (``client_id``, else ``azp``, else ``sub``).
    :param scopes: the scopes as the token lists them.
    :param patient: the patient in context (SMART launch context), for ``patient/`` scopes.
    :param purpose_of_use: the token's purpose-of-use claim, as codes (e.g. ``TREAT``).
    :param authenticated: False only for the development client used when AUTH is off.
    """

    client_id: str | None
    subject: str | None = None
    scopes: tuple[str, ...] = ()
    grants: tuple[Grant, ...] = ()
    patient: str | None = None
    purpose_of_use: tuple[str, ...] = ()
    authenticated: bool = True
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Client:
        raw = claims.get("scope", claims.get("scp", ""))
        scopes = tuple(raw.split() if isinstance(raw, str) else (str(s) for s in raw or ()))
        return cls(
            client_id=_text(claims.get("client_id") or claims.get("azp") or claims.get("sub")),
            subject=_text(claims.get("sub")),
            scopes=scopes,
            grants=parse_scopes(scopes),
            patient=_patient_in_context(claims),
            purpose_of_use=_codes(claims.get("purpose_of_use", claims.get("purposeOfUse"))),
            claims=dict(claims),
        )

    @property
    def patient_scoped(self) -> bool:
        """Some of the token's grants are ``patient/`` scopes."""
        return any(grant.context == "patient" for grant in self.grants)


DEVELOPMENT_CLIENT = Client(
    client_id="development", scopes=("system/*.cruds",), grants=(Grant("system", "*", "cruds"),), authenticated=False
)
_CLIENT = "iop_fhir_client"


def current_client() -> Client | None:
    """The caller of the current request: its token's client, the development client when
    AUTH is off, None on a public path or outside a request."""
    if current_app.config.get("AUTH") == "off":
        return DEVELOPMENT_CLIENT
    return g.get(_CLIENT)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _patient_in_context(claims: Mapping[str, Any]) -> str | None:
    patient = claims.get("patient")
    if isinstance(patient, str) and patient:
        return patient.rsplit("/", 1)[-1]
    for item in claims.get("fhirContext") or ():
        reference = item.get("reference") if isinstance(item, Mapping) else None
        if isinstance(reference, str) and reference.startswith("Patient/"):
            return reference.split("/", 1)[1]
    return None


def _codes(value: Any) -> tuple[str, ...]:
    """Purpose of use as codes, from a string, a list, or Coding-shaped objects."""
    items = value if isinstance(value, list) else [value] if value else []
    codes = []
    for item in items:
        code = item.get("code") if isinstance(item, Mapping) else item
        if isinstance(code, str) and code:
            codes.append(code)
    return tuple(codes)


# --- keys and token verification ----------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    kid: str | None
    kty: str
    alg: str | None
    crv: str | None
    key: Any

    def fits(self, alg: str) -> bool:
        kty, crv = ASYMMETRIC[alg]
        return self.kty == kty and self.alg in (None, alg) and (crv is None or self.crv == crv)


def _parse_key_set(data: Any, source: str) -> list[_Key]:
    """The usable signing keys of a JWK Set; keys for encryption or of other types are skipped."""
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{source} is not a JSON Web Key Set (an object with a 'keys' array)")
    keys = []
    for entry in data["keys"]:
        if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig" or entry.get("kty") not in ("RSA", "EC"):
            continue
        try:
            key = jwt.PyJWK(dict(entry)).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            log.warning("skipping key %s of %s: %s", entry.get("kid"), source, exc)
            continue
        keys.append(_Key(entry.get("kid"), entry["kty"], entry.get("alg"), entry.get("crv"), key))
    if not keys:
        raise ValueError(f"{source} holds no usable signing key (RSA or EC)")
    return keys


Fetch = Callable[[str], Any]


def _fetch_json(url: str) -> Any:
    import requests

    response = requests.get(url, timeout=JWKS_TIMEOUT, headers={"Accept": "application/json"})
    response.raise_for_status()
    return response.json()


class _RemoteKeys:
    """The key set at ``JWKS_URL``: fetched on first use, kept ``JWKS_MAX_AGE`` seconds, fetched
    again early for an unknown ``kid`` but never more often than every ``JWKS_MIN_REFETCH``
    seconds (a token with a made-up kid must not turn the gateway into a fetch loop)."""

    def __init__(self, url: str, fetch: Fetch, clock: Callable[[], float]) -> None:
        self.url, self.fetch, self.clock = url, fetch, clock
        self.keys: list[_Key] | None = None
        self.fetched_at = -1e18
        self.lock = threading.Lock()

    def get(self, *, refresh: bool = False) -> list[_Key]:
        with self.lock:
            age = self.clock() - self.fetched_at
            if self.keys is None or age > JWKS_MAX_AGE or (refresh and age > JWKS_MIN_REFETCH):
                self._refetch()
            if self.keys is None:
                raise KeysUnavailable(f"the signing keys at {self.url} cannot be fetched; try again later")
            return self.keys

    def _refetch(self) -> None:
        self.fetched_at = self.clock()
        try:
            self.keys = _parse_key_set(self.fetch(self.url), self.url)
        except Exception as exc:  # network, HTTP status, JSON, or key set: keep what we had
            log.warning("cannot fetch the key set at %s: %s%s", self.url, exc, "; keeping the cached keys" if self.keys else "")


class TokenVerifier:
    """Verifies bearer tokens against the configured keys and returns their claims.

    Algorithms are tied to key sources so one kind of key can never verify the other's tokens:
    HS256 only with ``JWT_SECRET``, RS256/RS384/ES256/ES384 only with JWK Set keys.
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        *,
        fetch: Fetch = _fetch_json,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self._clients: dict[str, tuple[float, Client]] = {}  # token -> (valid until, client)
        self.secret: str | None = settings.get("JWT_SECRET") or None
        self.issuer: str | None = settings.get("JWT_ISSUER") or None
        audience = settings.get("JWT_AUDIENCE") or None
        self.audience: str | list[str] | None = audience
        self.file_keys: list[_Key] = []
        self.remote: _RemoteKeys | None = None
        if settings.get("JWKS_FILE"):
            path = Path(settings["JWKS_FILE"])
            try:
                self.file_keys = _parse_key_set(json.loads(path.read_text(encoding="utf-8")), str(path))
            except OSError as exc:
                raise ConfigError(f"JWKS_FILE {path}: {exc.strerror}") from None
            except ValueError as exc:
                raise ConfigError(f"JWKS_FILE: {exc}") from None
        if settings.get("JWKS_URL"):
            self.remote = _RemoteKeys(str(settings["JWKS_URL"]), fetch, clock)
        if not (self.secret or self.file_keys or self.remote):
            raise ConfigError("AUTH is on but no key is configured: set JWT_SECRET, JWKS_FILE or JWKS_URL (or AUTH=off for development)")
        if self.secret and len(self.secret.encode()) < 32:
            log.warning("JWT_SECRET is shorter than 32 bytes; HS256 needs a longer secret (RFC 7518 §3.2)")

    def client(self, token: str) -> Client:
        """The caller a token stands for, verified once and then remembered until it expires.

        Verification costs a few hundred microseconds (PyJWT), more than a whole read of a
        resource; clients send the same token for many requests. A remembered token is
        re-verified after ``TOKEN_CACHE_SECONDS`` so that a key withdrawn from the key set
        stops being honoured within that time.
        """
        now = self.clock()
        cached = self._clients.get(token)
        if cached is not None and now < cached[0]:
            return cached[1]
        claims = self.verify(token)
        client = Client.from_claims(claims)
        expires = float(claims["exp"]) + LEEWAY
        if len(self._clients) >= TOKEN_CACHE_SIZE:
            self._clients.pop(next(iter(self._clients)), None)  # the oldest entry
        self._clients[token] = (min(expires, now + TOKEN_CACHE_SECONDS), client)
        return client

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims once signature, time and audience/issuer checks pass.

        :raises Unauthorized: anything wrong with the token, said in words.
        :raises KeysUnavailable: JWKS_URL cannot be fetched and no keys are cached.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Unauthorized("the bearer token is not a JWT") from None
        alg = header.get("alg")
        for key, algorithm in self._candidates(alg, header.get("kid")):
            try:
                return self._decode(token, key, algorithm)
            except jwt.InvalidSignatureError:
                continue  # another key without a kid may fit
        raise Unauthorized("the token's signature does not verify")

    def _candidates(self, alg: Any, kid: Any) -> Iterable[tuple[Any, str]]:
        if alg == "HS256":
            if not self.secret:
                raise Unauthorized("HS256 tokens are not accepted here")
            return [(self.secret, alg)]
        if alg not in ASYMMETRIC:
            raise Unauthorized(f"tokens signed with {alg!r} are not accepted; use {', '.join(['HS256', *ASYMMETRIC])}")
        if not (self.file_keys or self.remote):
            raise Unauthorized(f"{alg} tokens are not accepted here (no key set configured)")
        found = self._matching(alg, kid, refresh=False)
        if not found and self.remote is not None and kid is not None:
            found = self._matching(alg, kid, refresh=True)  # the issuer may have rotated its keys
        if not found:
            raise Unauthorized(f"no trusted {alg} key {'with kid ' + repr(kid) if kid else 'fits the token'}")
        return [(k.key, alg) for k in found]

    def _matching(self, alg: str, kid: Any, *, refresh: bool) -> list[_Key]:
        keys = list(self.file_keys)
        if self.remote is not None:
            keys += self.remote.get(refresh=refresh)
        return [k for k in keys if k.fits(alg) and (kid is None or k.kid == kid)]

    def _decode(self, token: str, key: Any, algorithm: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.InvalidSignatureError:
            raise
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the token is not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized(f"the token's issuer is not {self.issuer}") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(f"the token is not meant for this gateway (aud must be {self.audience})") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"the token is not valid: {exc}") from None


# --- what a request needs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """Permission letters a request needs on one resource type.

    :param patient: the patient the URL pins the request to (``Patient/{id}``, ``patient=``),
        so a ``patient/`` scope may grant it when that is the token's patient.
    :param location: where in the request the need comes from (``Bundle.entry[3]``).
    :param confined: the handler can confine the interaction to a patient's compartment
        (it sees the resources), so a ``patient/`` scope may grant it without a pin.
    """

    resource_type: str  # a type, or "*" for system-wide interactions
    permissions: str
    interaction: str
    location: str = ""
    patient: str | None = None
    confined: bool = False


def is_public(path: str) -> bool:
    """Paths served without a token (metadata, SMART configuration, probes, the IOP schema)."""
    return path in PUBLIC_PATHS or path.rstrip("/") in PUBLIC_PATHS


Params = Sequence[tuple[str, str]]
BodyLoader = Callable[[], Any]
Reads = Mapping[str, tuple[tuple[str, str], ...]]


def classify(
    method: str,
    path: str,
    params: Params,
    headers: Mapping[str, str],
    body: BodyLoader,
    reads: Reads = OPERATION_READS,
) -> list[Need] | None:
    """The needs of a request; None for a public path (no token needed); [] for a valid token only.

    :param params: query (and for ``_search`` form) parameters, as pairs.
    :param body: loads the parsed request body (called only for a transaction or batch).
    :param reads: what each Patient-level operation returns (``OPERATION_READS`` and the registry's).
    """
    if is_public(path):
        return None
    segments = [s for s in path.split("/") if s]
    method = "GET" if method in ("HEAD", "OPTIONS") else method
    if segments[:1] == ["fhir"]:
        if len(segments) == 1 and method == "POST":
            return _bundle_needs(body(), reads)
        return _fhir_needs(method, segments[1:], params, bool(headers.get("If-None-Exist")), reads)
    if segments[:1] == ["iop"]:
        return _iop_needs(method, segments[1:])
    if segments[:1] == ["admin"]:  # the sync queue: requeueing re-sends anyone's records
        return [Need("*", "cruds", "administration")]
    if segments == ["ncpdp"]:  # a pharmacy (a system client) sends SCRIPT: its fills become MedicationDispenses
        return [Need("MedicationDispense", "c", "NCPDP SCRIPT message")]
    return []  # an unknown path: a valid token, then the router answers 404


def _fhir_needs(
    method: str, segments: list[str], params: Params, if_none_exist: bool, reads: Reads, location: str = ""
) -> list[Need]:
    def need(resource_type: str, permissions: str, interaction: str, patient: str | None = None, *, confined: bool = False) -> list[Need]:
        return [Need(resource_type, permissions, interaction, location, patient, confined)]

    if not segments:  # the base: whole-system search
        return need("*", "s", "search-system")
    first, rest = segments[0], segments[1:]
    if first == "_history":
        return need("*", "r", "history-system")
    if first == "_search":
        return need("*", "s", "search-system")
    if first.startswith("$"):
        return _operation_needs(first[1:], "*", None, reads, location)
    if not _TYPE.fullmatch(first):
        return need("*", "cruds", "unknown")  # the router answers 404; only full access gets that far
    rtype = first
    # Below, confined=True marks what the handlers confine to a compartment (see the module doc).
    if not rest:
        if method == "GET":
            search = need(rtype, "s", "search-type", _pinned_patient(rtype, params), confined=True)
            return search + _include_needs(params, location)
        if method == "POST":
            if if_none_exist:
                return need(rtype, "cs", "conditional create", confined=True)
            return need(rtype, "c", "create", confined=True)
        if method == "PUT":
            return need(rtype, "cu", "conditional update", confined=True)
        if method == "PATCH":
            return need(rtype, "us", "conditional patch", confined=True)
        if method == "DELETE":
            return need(rtype, "ds", "conditional delete", confined=True)
        return need(rtype, "cruds", method.lower())
    second = rest[0]
    if second == "_search":
        return need(rtype, "s", "search-type", _pinned_patient(rtype, params), confined=True) + _include_needs(params, location)
    if second == "_history":
        return need(rtype, "r", "history-type")
    if second.startswith("$"):
        return _operation_needs(second[1:], rtype, None, reads, location)
    own = second if rtype == "Patient" else None  # Patient/{id} is in its own compartment
    if len(rest) == 1:
        interaction = {"GET": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
        permission = {"read": "r", "update": "u", "patch": "u", "delete": "d"}.get(interaction or "", "cruds")
        return need(rtype, permission, interaction or method.lower(), own, confined=interaction is not None)
    if rest[1] == "_history":
        return need(rtype, "r", "vread" if len(rest) > 2 else "history-instance", own, confined=True)
    if rest[1].startswith("$"):
        return _operation_needs(rest[1][1:], rtype, second, reads, location)
    return need(rtype, "cruds", "unknown")


def _operation_needs(name: str, rtype: str, instance: str | None, reads: Reads, location: str) -> list[Need]:
    if name in TOKEN_ONLY_OPERATIONS:
        return []
    returned = reads.get(name) if rtype == "Patient" else None
    if returned is None:
        return [Need(rtype, "rs", f"${name}", location)]
    return [Need(t, p, f"${name}", location, instance) for t, p in returned]


def operation_reads(registry: Iterable[Mapping[str, Any]]) -> Reads:
    """``OPERATION_READS``, overridden by operations whose registry entry (``app.extensions
    ["iop_fhir.operations"]``) lists the types it returns under ``reads``."""
    reads = dict(OPERATION_READS)
    for op in registry:
        if op.get("reads"):
            reads[op["name"]] = (("Patient", "r"), *((t, "rs") for t in op["reads"]))
    return reads


def _include_needs(params: Params, location: str) -> list[Need]:
    """``r`` on what ``_include`` / ``_revinclude`` add to a page: the named target type, else the
    parameter's targets, else every type (``*``). Confined: the page leaves out what lies outside."""
    needs = []
    for name, value in params:
        kind = name.split(":", 1)[0]
        if kind not in _INCLUDES:
            continue
        parts = value.split(":")
        if len(parts) < 2 or not _TYPE.fullmatch(parts[0]):
            needs.append(Need("*", "r", kind, location, confined=True))
        elif kind == "_revinclude":
            needs.append(Need(parts[0], "r", kind, location, confined=True))
        else:
            known = search_parameters(parts[0]).get(parts[1])
            targets = parts[2:3] or (known.targets if known is not None else ()) or ("*",)
            needs += [Need(t, "r", kind, location, confined=True) for t in targets]
    return needs


def _pinned_patient(rtype: str, params: Params) -> str | None:
    """The one patient a search names (``patient=``, ``subject=Patient/…``, for Patient ``_id=``),
    or None when it names none or several. Other parameters only narrow the matches further
    (``_include`` and ``_revinclude`` are confined on their own)."""
    pinned: set[str] = set()
    for name, value in params:
        if rtype == "Patient" and name == "_id":
            pinned.add(value)
        elif rtype != "Patient" and name == "patient" and "patient" in search_parameters(rtype):
            pinned.add(value.rsplit("Patient/", 1)[-1])
        elif rtype != "Patient" and name == "subject" and "patient" in search_parameters(rtype) and "Patient/" in value:
            pinned.add(value.rsplit("Patient/", 1)[-1])
    if len(pinned) != 1:
        return None
    (patient,) = pinned
    return patient if patient and "," not in patient else None


def _bundle_needs(bundle: Any, reads: Reads) -> list[Need]:
    """Each entry of a transaction or batch, located as ``Bundle.entry[i]``."""
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
        return []  # not something the base accepts: its handler answers with the 4xx
    needs: list[Need] = []
    for i, entry in enumerate(bundle.get("entry") or ()):
        where = f"Bundle.entry[{i}]"
        req = entry.get("request") if isinstance(entry, Mapping) else None
        if not isinstance(req, Mapping) or not isinstance(req.get("url"), str) or not isinstance(req.get("method"), str):
            needs.append(Need("*", "cruds", "unreadable entry", where))
            continue
        parts = urlsplit(req["url"])
        path = parts.path.split("/fhir/", 1)[-1] if "/fhir/" in parts.path else parts.path
        segments = [s for s in path.split("/") if s]
        if not segments:  # a nested transaction or a system search: not worth the risk
            needs.append(Need("*", "cruds", "entry on the base", where))
            continue
        method = req["method"].upper()
        entry_needs = _fhir_needs(method, segments, parse_qsl(parts.query), bool(req.get("ifNoneExist")), reads, where)
        resource = entry.get("resource")
        if method in ("POST", "PUT") and isinstance(resource, Mapping) and resource.get("resourceType") != segments[0]:
            # the handler should refuse the mismatch; until it does, the body's type needs the scope too
            entry_needs += [Need(str(resource.get("resourceType")), n.permissions, n.interaction, where) for n in entry_needs]
        needs += entry_needs
    return needs


def _iop_needs(method: str, segments: list[str]) -> list[Need]:
    if method == "GET":
        permissions, interaction = ("r", "read IOP record") if len(segments) > 1 else ("rs", "list IOP records")
    else:
        permissions, interaction = "cu", "write IOP record"
    needs = [Need(t, permissions, interaction) for t in IOP_TYPES]
    if method == "GET" and len(segments) == 3:  # /iop/records/{id}/{view}: what the view shows besides
        needs += [Need(t, "r", f"read IOP record {segments[2]}") for t in IOP_VIEW_TYPES.get(segments[2], ())]
    return needs


# --- the check ---------------------------------------------------------------------------------


def authorize(client: Client, needs: Iterable[Need]) -> None:
    """Raise :class:`Forbidden` naming every need the client's grants do not cover."""
    missing = [need for need in needs if not _granted(client, need)]
    if not missing:
        return
    issues, wanted = [], []
    for need in missing:
        absent = "".join(p for p in need.permissions if not _granted(client, replace(need, permissions=p)))
        scope = f"system/{need.resource_type}.{absent}"
        wanted.append(scope)
        message = f"{need.interaction} on {need.resource_type} needs the scope {scope} (or user/{need.resource_type}.{absent})"
        if client.patient_scoped:
            message += f"; {_beyond_patient_scopes(client, need, absent)}"
        issues.append(Issue(f"{need.location}: {message}" if need.location else message, location=need.location, code="forbidden"))
    where = f" ({len(missing)} of the request's needs)" if len(missing) > 1 else ""
    raise Forbidden(f"the token's scopes do not allow this request{where}: {issues[0].message}", issues, wanted)


def _granted(client: Client, need: Need, *, patient_scopes: bool = True) -> bool:
    """Whether the client's grants cover every letter of ``need`` (``patient_scopes=False``:
    without its ``patient/`` grants)."""
    return all(
        any(
            grant.permits(need.resource_type, permission)
            and (grant.context != "patient" or (patient_scopes and _patient_may(client, need, permission)))
            for grant in client.grants
        )
        for permission in need.permissions
    )


def _patient_may(client: Client, need: Need, permission: str) -> bool:
    """Whether a ``patient/`` grant of the right type and letter may cover ``need`` (module doc)."""
    if client.patient is None:
        return False
    if need.patient is not None:
        return need.patient == client.patient
    if not need.confined:
        return False
    if need.resource_type in DIRECTORY_TYPES:
        return permission in "rs"
    return need.resource_type in _CONFINABLE


def _beyond_patient_scopes(client: Client, need: Need, absent: str) -> str:
    """Why the token's ``patient/`` scopes do not cover ``need``, for the 403's message."""
    if client.patient is None:
        return "the token's patient/ scopes have no patient in context"
    compartment = f"Patient/{client.patient}'s compartment"
    if need.patient is not None and need.patient != client.patient:
        return f"the token's patient/ scopes cover only {compartment}, not Patient/{need.patient}'s"
    if need.resource_type in DIRECTORY_TYPES and any(p in "cud" for p in absent):
        return f"patient/ scopes read {need.resource_type} but never write it"
    if not need.confined or need.resource_type not in _CONFINABLE | DIRECTORY_TYPES:
        return f"patient/ scopes cover only {compartment}, and {need.interaction} on {need.resource_type} cannot be confined to it"
    return f"the token's patient/ scopes (for {compartment}) do not grant it either"


def confine(client: Client, needs: Iterable[Need]) -> dict[str, Confinement]:
    """For an authorised request: where it relies on ``patient/`` grants for needs the handlers
    confine, the :class:`Confinement` they must apply, by location (``""``, ``Bundle.entry[i]``).

    Needs pinned by the URL were checked here already, directory types are open to the
    patient's app, and needs ``user/`` or ``system/`` grants cover are not confined at all.
    """
    if client.patient is None:
        return {}
    found: dict[str, tuple[set[str], set[str]]] = {}  # location -> (types, included types)
    for need in needs:
        if (
            need.confined
            and need.patient is None
            and need.resource_type not in DIRECTORY_TYPES
            and not _granted(client, need, patient_scopes=False)
        ):
            types, included = found.setdefault(need.location, (set(), set()))
            (included if need.interaction in _INCLUDES else types).add(need.resource_type)
    return {
        where: Confinement(client.patient, frozenset(types), frozenset(included)) for where, (types, included) in found.items()
    }


# --- patient compartments ----------------------------------------------------------------------

Ops = Store | UnitOfWork
# The permission letter of a write interaction, for the scope a refusal names.
_WRITE_LETTERS = {"create": "c", "update": "u", "patch": "u", "delete": "d"}


def compartment_patients(resource_type: str, resource: Mapping[str, Any]) -> frozenset[str]:
    """The ids of the patients whose compartment holds ``resource``: a Patient's own id, else
    the Patients its ``patient`` search parameter names, read by the store's own indexing
    (so exactly what ``patient=`` finds; ``search_index.patient_key`` is the first of them).
    Empty for types that name no patient."""
    if resource_type == "Patient":
        own = resource.get("id")
        return frozenset({own}) if isinstance(own, str) and own else frozenset()
    return referenced_ids(resource_type, resource if isinstance(resource, dict) else dict(resource), "patient", "Patient")


@dataclass(frozen=True)
class Confinement:
    """A request, or one Bundle entry, that only ``patient/`` scopes allow: what it reads and
    writes of ``types`` must lie in ``patient``'s compartment (see the module doc).

    The handlers apply it where they see stored resources: :meth:`criteria` on a search's or
    a conditional write's criteria, :meth:`check` on what a read found or a write stored,
    :meth:`shows` to leave out of a page what lies outside.
    """

    patient: str
    types: frozenset[str]  # what only patient/ grants let this request read or write
    included: frozenset[str] = frozenset()  # the same for its _include / _revinclude results ("*": any type)

    def covers(self, resource_type: str, *, included: bool = False) -> bool:
        """Whether ``resource_type`` is confined here (``included``: as an ``_include`` /
        ``_revinclude`` result, which the searched type's grants do not open)."""
        if resource_type in self.types:
            return True
        return included and (resource_type in self.included or "*" in self.included)

    def criteria(
        self, resource_type: str, criteria: Iterable[tuple[str, str]], *, every_type: bool = False
    ) -> list[tuple[str, str]]:
        """``criteria`` narrowed to the compartment (a search, a conditional write's match,
        ``If-None-Exist``): the patient is added, so paging and totals stay the store's.

        :param every_type: confine it even where the type is not among ``types`` (a
            conditional reference inside a resource, which no scope was asked about).
        """
        pairs = list(criteria)
        if not (every_type or self.covers(resource_type)) or resource_type in DIRECTORY_TYPES:
            return pairs
        if resource_type == "Patient":
            return [*pairs, ("_id", self.patient)]
        if "patient" in search_parameters(resource_type):
            return [*pairs, ("patient", f"Patient/{self.patient}")]
        raise self._refusal(resource_type, f"searching {resource_type}", "r", f"a {resource_type} names no patient")

    def admits(self, resource_type: str, resource: Mapping[str, Any], *, write: bool = False, included: bool = False) -> bool:
        """Whether the compartment holds ``resource``: to read it, the patient is among those
        it names (directory types: always); to write it, the patient is the only one it names."""
        if not self.covers(resource_type, included=included):
            return True
        if resource_type in DIRECTORY_TYPES:
            return not write
        patients = compartment_patients(resource_type, resource)
        return patients == {self.patient} if write else self.patient in patients

    def shows(self, ops: Ops, saved: Saved, *, included: bool = False) -> bool:
        """Whether a page (a history; with ``included``, a search's includes) may show this
        version. A deletion carries no content: it is shown when the version it ended was."""
        if not self.covers(saved.resource_type, included=included):
            return True
        if not saved.deleted:
            return self.admits(saved.resource_type, saved.resource, included=included)
        try:
            ended = ops.vread(saved.resource_type, saved.id, saved.version - 1)
        except (NotFound, Gone):
            return False
        return self.admits(saved.resource_type, ended.resource, included=included)

    def check(self, ops: Ops, saved: Saved | None, interaction: str) -> None:
        """Refuse (403) what a read found or a write did outside the compartment.

        A write that stored a version is checked on the version it replaced ("is") and on the
        version it stored ("stays"): call this inside the write's unit of work, so that a
        refusal rolls the write back, and the version checked is the one the write replaced.
        A read, or a write that changed nothing, is checked as a read. Refusals never say whose
        a stored resource is: that would tell a patient's app about other patients.

        :param interaction: ``read``, ``vread``, ``create``, ``update``, ``patch``, ``delete``.
        """
        if saved is None or not self.covers(saved.resource_type):
            return
        rtype, what = saved.resource_type, f"{interaction} of {saved.reference}"
        letter = _WRITE_LETTERS.get(interaction.rsplit(" ", 1)[-1], "r")
        if not saved.changed:
            if not saved.deleted and not self.admits(rtype, saved.resource):
                raise self._refusal(rtype, what, letter, f"it is not in Patient/{self.patient}'s compartment")
            return
        if not saved.created:
            replaced = ops.vread(rtype, saved.id, saved.version - 1)
            if not self.admits(rtype, replaced.resource, write=True):
                raise self._refusal(rtype, what, letter, f"it is not Patient/{self.patient}'s alone", write=True)
        if not saved.deleted and not self.admits(rtype, saved.resource, write=True):
            # the version the client sent: saying whom it names tells it nothing new
            patients = sorted(compartment_patients(rtype, saved.resource))
            whose = ", ".join(f"Patient/{p}" for p in patients) or "no patient"
            raise self._refusal(rtype, what, letter, f"the resource names {whose}", write=True)

    def _refusal(self, resource_type: str, what: str, letter: str, why: str, *, write: bool = False) -> Forbidden:
        scope = f"system/{resource_type}.{letter}"
        if write:
            rule = f"patient/ scopes write only what belongs to Patient/{self.patient} alone"
        else:
            rule = f"patient/ scopes reach only Patient/{self.patient}'s compartment"
        message = f"{what}: {why}; {rule} (or use {scope} or user/{resource_type}.{letter})"
        location = ""  # a write is refused at the element naming the patient
        if write:
            path = search_parameters(resource_type).get("patient")
            location = "Patient.id" if resource_type == "Patient" else f"{resource_type}.{path.paths[0]}" if path else ""
        return Forbidden(message, [Issue(message, location=location, code="forbidden")], [scope])


def confinement(location: str = "") -> Confinement | None:
    """How the current request (``location=""``) or one of its Bundle entries
    (``"Bundle.entry[2]"``) is confined; None when its scopes allow it unconfined."""
    found: dict[str, Confinement] | None = g.get(_CONFINED)
    return None if found is None else found.get(location)


def confinements() -> dict[str, Confinement]:
    """Every confinement of the current request, by location (for a Bundle's entries)."""
    return dict(g.get(_CONFINED) or {})


def _bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        what = "no Authorization header" if not header else f"the Authorization scheme is {scheme!r}, not Bearer"
        raise Unauthorized(f"a bearer token is required ({what})", token_given=False)
    return token.strip()


def _request_params() -> list[tuple[str, str]]:
    pairs = list(request.args.items(multi=True))
    if request.method == "POST" and request.path.endswith("/_search") and request.mimetype == "application/x-www-form-urlencoded":
        pairs += list(request.form.items(multi=True))
    return pairs


def _parsed_body() -> Any:
    from iop_fhir.api.negotiate import read_body

    return read_body(request)


def check_request() -> None:
    """The before_request hook: authenticate, then classify and authorise (see the module doc).

    The token is checked before the request is classified, so an unauthenticated caller never
    gets a transaction body parsed, nor learns anything but 401.
    """
    if is_public(request.path):
        return
    app = current_app
    verifier: TokenVerifier = app.extensions[VERIFIER_KEY]
    client = verifier.client(_bearer_token())
    g.setdefault(_CLIENT, client)
    reads = app.extensions.get(READS_KEY)
    if reads is None:  # the operations registry is complete once every blueprint is registered
        reads = app.extensions[READS_KEY] = operation_reads(app.extensions.get("iop_fhir.operations", ()))
    needs = classify(request.method, request.path, _request_params(), request.headers, _parsed_body, reads) or []
    authorize(client, needs)
    if client.patient_scoped:
        confined = confine(client, needs)
        if confined:
            setattr(g, _CONFINED, confined)


# --- SMART configuration and the CapabilityStatement's security -----------------------------------

bp = Blueprint("auth", __name__)


def smart_configuration(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``/.well-known/smart-configuration``: what this gateway honestly supports (SMART App
    Launch 2.x §2.0.9). It verifies tokens and never issues them, so endpoints appear only
    when configured (``TOKEN_URL``, ``JWKS_URL``)."""
    config: dict[str, Any] = {}
    if settings.get("JWT_ISSUER"):
        config["issuer"] = settings["JWT_ISSUER"]
    if settings.get("JWKS_URL"):
        config["jwks_uri"] = settings["JWKS_URL"]
    if settings.get("TOKEN_URL"):
        config["token_endpoint"] = settings["TOKEN_URL"]
        config["token_endpoint_auth_methods_supported"] = ["private_key_jwt"]
        config["token_endpoint_auth_signing_alg_values_supported"] = list(ASYMMETRIC)
    config["grant_types_supported"] = ["client_credentials"]
    config["scopes_supported"] = ["system/*.cruds", "system/*.rs", "user/*.cruds", "user/*.rs", "patient/*.cruds", "patient/*.rs", "patient/Patient.r"]
    config["capabilities"] = ["permission-v2", "permission-v1"]
    return config


def security_statement(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``CapabilityStatement.rest.security`` for this configuration."""
    if settings.get("AUTH") == "off":
        return {"cors": False, "description": "Authentication is OFF (development mode): every request is allowed."}
    statement: dict[str, Any] = {
        "cors": False,
        "service": [
            {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}],
                "text": "SMART-on-FHIR",
            }
        ],
        "description": (
            "Bearer JWT access tokens with SMART v2 scopes (system/, user/, patient/ with .cruds; v1 .read/.write accepted), "
            "checked per interaction and resource type; patient/ scopes reach only the compartment of the token's "
            "patient (and read Practitioner, PractitionerRole, Organization); see /.well-known/smart-configuration."
        ),
    }
    if settings.get("TOKEN_URL"):
        statement["extension"] = [
            {
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": settings["TOKEN_URL"]}],
            }
        ]
    return statement


@bp.get("/.well-known/smart-configuration")
@bp.get("/fhir/.well-known/smart-configuration")
def well_known() -> Response:
    return jsonify(smart_configuration(current_app.config))


def init_app(app: Flask) -> None:
    """Install the hook, the well-known route and the CapabilityStatement's security part."""
    settings = app.config
    app.extensions[SECURITY_KEY] = security_statement(settings)
    app.register_blueprint(bp)
    if settings["AUTH"] == "off":
        log.warning("*" * 72)
        log.warning("AUTHENTICATION IS OFF (IOP_FHIR_AUTH=off): every request is allowed. Development only!")
        log.warning("*" * 72)
        return
    app.extensions[VERIFIER_KEY] = TokenVerifier(settings)
    app.before_request(check_request)
