"""SMART Backend Services authorization: OAuth2 client_credentials with a signed JWT assertion.

The gateway authenticates to an EHR as a system, not a user (SMART App Launch v2, "Backend
Services"): it signs a short-lived JWT with its private key (RS384 or ES384, the two
algorithms servers must support), posts it to the authorization server's token endpoint::

    grant_type=client_credentials
    scope=system/*.cruds
    client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer
    client_assertion=<JWT: iss = sub = client_id, aud = token URL, exp <= 5 minutes, jti>

and sends the access token it gets back as ``Authorization: Bearer``. The token is cached
until ``expires_in`` minus a 30 s margin, so a token never expires on the way to the EHR;
one fetch serves every thread (a lock around the fetch). When the EHR still answers 401 (a
token revoked early), :class:`~iop_fhir.sync.fhir_client.FhirClient` calls
:meth:`SmartBackendAuth.invalidate` and retries once.

Token endpoint failures are classified for the worker: no answer, 429 and 5xx are
:class:`~iop_fhir.errors.TransientDeliveryError` (retry later); 400 and 401 (RFC 6749 §5.2:
``invalid_client``, ``invalid_scope``...) and a reply without an ``access_token`` are
:class:`~iop_fhir.errors.PermanentDeliveryError`, since a retry would get the same answer
until someone fixes the registration.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from iop_fhir.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from iop_fhir.sync.destinations import SmartBackend
from iop_fhir.sync.fhir_client import TRANSIENT_STATUSES, retry_after_seconds, server_now

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300  # seconds; SMART Backend Services: exp at most five minutes ahead
EXPIRY_MARGIN = 30.0  # seconds before expires_in that a cached token counts as expired
DEFAULT_EXPIRES_IN = 300.0  # when a token response omits expires_in (SMART recommends 300)
DEFAULT_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds


def client_assertion(config: SmartBackend, now: float) -> str:
    """The signed JWT that authenticates the client at the token endpoint.

    The key file is read on every call (once per token), so a rotated key is picked up
    without a restart.

    :param now: the current time in seconds since the epoch (``iat``; ``exp`` is 300 s later).
    :raises PermanentDeliveryError: the key file is unreadable, not a PEM private key, or not
        the kind the algorithm needs (RSA for RS384, EC P-384 for ES384).
    """
    key = _private_key(config)
    issued = int(now)
    claims = {
        "iss": config.client_id,
        "sub": config.client_id,
        "aud": config.token_url,
        "exp": issued + ASSERTION_LIFETIME,
        "iat": issued,
        "jti": str(uuid.uuid4()),
    }
    headers: dict[str, Any] = {"typ": "JWT"}
    if config.key_id:
        headers["kid"] = config.key_id
    return jwt.encode(claims, key, algorithm=config.algorithm, headers=headers)


def _private_key(config: SmartBackend) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    where = f"SMART Backend Services private key {config.private_key}"
    try:
        key = serialization.load_pem_private_key(config.private_key.read_bytes(), password=None)
    except OSError as exc:
        raise PermanentDeliveryError(f"{where} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:  # not PEM, encrypted, or an unsupported key type
        raise PermanentDeliveryError(f"{where} is not an unencrypted PEM private key: {exc}") from None
    if config.algorithm == "RS384" and isinstance(key, rsa.RSAPrivateKey):
        return key
    if config.algorithm == "ES384" and isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise PermanentDeliveryError(f"{where} is on curve {key.curve.name}; ES384 signs with P-384 (secp384r1)")
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        kind = "an RSA key"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        kind = "an EC key"
    else:
        kind = f"a {type(key).__name__}"
    raise PermanentDeliveryError(f"{where} is {kind}, which cannot sign {config.algorithm}")


class SmartBackendAuth(requests.auth.AuthBase):
    """``requests`` auth that puts a cached SMART Backend Services access token on each request.

    :param session: the session the token requests go through (the FHIR client's own, so they
        share its connection pool).
    :param clock: seconds since the epoch; tests inject one to move past expiry.
    :param timeout: (connect, read) seconds for the token request.
    """

    def __init__(
        self,
        config: SmartBackend,
        session: requests.Session,
        *,
        clock: Callable[[], float] = time.time,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    ) -> None:
        self.config = config
        self.session = session
        self.clock = clock
        self.timeout = timeout
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        return request

    def token(self) -> str:
        """The cached access token, fetched first when there is none or it is about to expire.

        :raises TransientDeliveryError: the token endpoint did not answer, or answered 429/5xx.
        :raises PermanentDeliveryError: it refused the client (400/401...) or sent no token.
        """
        with self._lock:
            if self._token is None or self.clock() >= self._expires_at:
                self._token, lifetime = self._fetch()
                self._expires_at = self.clock() + max(lifetime - EXPIRY_MARGIN, 0.0)
            return self._token

    def invalidate(self) -> None:
        """Forget the cached token (the EHR refused it), so the next request fetches a new one."""
        with self._lock:
            self._token = None
            self._expires_at = 0.0

    def _fetch(self) -> tuple[str, float]:
        """POST the client credentials grant; the access token and its lifetime in seconds."""
        url = self.config.token_url
        where = f"token request POST {url}"
        form = {
            "grant_type": "client_credentials",
            "scope": self.config.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": client_assertion(self.config, self.clock()),
        }
        try:
            response = self.session.post(
                url, data=form, headers={"Accept": "application/json"}, timeout=self.timeout, allow_redirects=False
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientDeliveryError(f"{where}: no answer: {exc}") from None
        except requests.RequestException as exc:
            raise PermanentDeliveryError(f"{where}: {exc}") from None
        status = response.status_code
        body = _json_object(response)
        if status in TRANSIENT_STATUSES or status >= 500:
            raise _failed(TransientDeliveryError, where, response, body)
        if not 200 <= status < 300:
            raise _failed(PermanentDeliveryError, where, response, body)
        token = body.get("access_token") if body is not None else None
        if not isinstance(token, str) or not token:
            raise PermanentDeliveryError(f"{where}: the answer has no access_token", http_status=status)
        token_type = body.get("token_type") if body is not None else None
        if isinstance(token_type, str) and token_type.lower() != "bearer":
            raise PermanentDeliveryError(f"{where}: token_type {token_type!r} is not supported (only bearer)", http_status=status)
        expires_in = body.get("expires_in") if body is not None else None
        valid = isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in >= 0
        return token, float(expires_in) if valid else DEFAULT_EXPIRES_IN  # type: ignore[arg-type]


def _json_object(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _failed(
    kind: type[DeliveryError], where: str, response: requests.Response, body: dict[str, Any] | None
) -> DeliveryError:
    """The error for a refused token request, with the OAuth ``error`` and its description."""
    status = response.status_code
    detail = ""
    if body is not None and isinstance(body.get("error"), str):
        detail = body["error"]
        if isinstance(body.get("error_description"), str):
            detail += f": {body['error_description']}"
    elif response.text.strip():
        detail = response.text.strip()[:300]
    message = f"{where} answered {status} {response.reason or ''}".rstrip() + (f": {detail}" if detail else "")
    retry_after = retry_after_seconds(response.headers.get("Retry-After"), server_now(response))
    return kind(message, http_status=status, retry_after=retry_after)
