"""The FHIR REST connector: one destination's transactions, searches and reads over HTTP.

A :class:`FhirClient` posts and reads FHIR in the destination's wire format
(``application/fhir+json``, or ``+xml`` through :mod:`~iop_fhir.formats.fhir_xml`) over a
:class:`DestinationHttp`: a ``requests.Session`` with a pooled ``HTTPAdapter`` (connections to
the EHR are reused across batches), the destination's auth (``none``, ``bearer``, or SMART
Backend Services via :mod:`~iop_fhir.sync.smart_backend`) and its timeouts on every request.
The NCPDP channel (:mod:`iop_fhir.pharmacy.channel`) uses the same :class:`DestinationHttp`.

It never retries by itself, beyond one retry after a 401 with a SMART token (the token may
have been revoked early; a fresh one is fetched): backoff, attempts and dead-lettering belong
to the worker. Instead every failure is classified for it:

* **transient** (:class:`~iop_fhir.errors.TransientDeliveryError`): no connection, a connect
  or read timeout, a broken answer, or status 408, 425, 429, 500, 502, 503 or 504. ``retry_after``
  holds the target's Retry-After in seconds (delta-seconds or an HTTP-date, measured against
  the answer's own ``Date`` so clock skew does not matter), else ``None``;
* **permanent** (:class:`~iop_fhir.errors.PermanentDeliveryError`): any other non-2xx (the
  message carries the OperationOutcome's diagnostics, or the first 300 characters of the
  body), a redirect (redirects are not followed: a POST turned into a GET would silently
  deliver nothing; fix ``base_url``), or a 2xx whose body is not the Bundle expected
  (``transaction-response``, ``searchset``) or resource asked for.

Both carry ``http_status`` (``None`` when no answer came), and every message names the
destination and the request: ``ehr: POST http://host/fhir answered 422 ...``.

Transactions are posted with ``Prefer: return=minimal``: the worker needs each entry's status,
not the resources back, and the target is spared serialising them.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from iop_fhir import __version__
from iop_fhir.errors import DeliveryError, IopFhirError, PermanentDeliveryError, TransientDeliveryError
from iop_fhir.formats import fhir_json, fhir_xml
from iop_fhir.store.search_index import parse_reference
from iop_fhir.sync.destinations import Destination

if TYPE_CHECKING:
    from iop_fhir.sync.smart_backend import SmartBackendAuth

JSON = dict[str, Any]

# Answers that may pass if asked again later; every other non-2xx will not.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MEDIA_TYPES = {"json": "application/fhir+json", "xml": "application/fhir+xml"}
USER_AGENT = f"iop-fhir/{__version__}"
BODY_EXCERPT = 300  # characters of a non-FHIR error body quoted in a message
POOL_SIZE = 16  # connections kept per host: a worker's threads share one client


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """A Retry-After header (RFC 9110 §10.2.3) as seconds from ``now``, never negative.

    :param value: delta-seconds (``120``) or an HTTP-date (``Wed, 21 Oct 2026 07:28:00 GMT``).
    :param now: an aware datetime to measure an HTTP-date against.
    :returns: ``None`` when the header is absent or neither form.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000": a UTC time from a source that does not know its zone
        moment = moment.replace(tzinfo=UTC)
    return max((moment - now).total_seconds(), 0.0)


def server_now(response: requests.Response) -> datetime:
    """The answer's own ``Date`` (what its Retry-After date is relative to), else our clock."""
    header = response.headers.get("Date")
    if header:
        try:
            moment = parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError):
            moment = None
        if moment is not None:
            return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return datetime.now(UTC)


class BearerAuth(requests.auth.AuthBase):
    """A fixed bearer token (``auth = "bearer"``)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


class DestinationHttp:
    """One destination's HTTP: a requests.Session with a pooled HTTPAdapter, the destination's
    auth and timeouts, and every failure classified for the worker (see the module doc).

    Shared by every channel that speaks HTTP: :class:`FhirClient` (FHIR REST) and the NCPDP
    SCRIPT channel (:mod:`iop_fhir.pharmacy.channel`) differ in what they post, not in how a
    connection, a token or a 503 is handled. A session passed in is the caller's and stays open.

    :param explain: what the target said in a refused answer, for the error message; by
        default an OperationOutcome's diagnostics, else the start of the body.
    """

    def __init__(
        self,
        destination: Destination,
        *,
        session: requests.Session | None = None,
        explain: Callable[[requests.Response], str] | None = None,
    ) -> None:
        self.destination = destination
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        self.timeout = (destination.connect_timeout, destination.read_timeout)
        self.explain = explain or _explanation
        self._smart: SmartBackendAuth | None = None
        self.auth: requests.auth.AuthBase | None = None
        if destination.auth == "bearer":
            if not destination.token:
                raise PermanentDeliveryError(f"{destination.name}: auth = 'bearer' needs a token")
            self.auth = BearerAuth(destination.token)
        elif destination.auth == "smart-backend":
            if destination.smart is None:
                raise PermanentDeliveryError(f"{destination.name}: auth = 'smart-backend' needs its settings")
            # Imported here: the JWT signing stack loads only for destinations that use it.
            from iop_fhir.sync.smart_backend import SmartBackendAuth

            self._smart = SmartBackendAuth(destination.smart, session, timeout=self.timeout)
            self.auth = self._smart

    def send(
        self,
        method: str,
        url: str,
        *,
        media_type: str,
        body: bytes | None = None,
        prefer: str | None = None,
        answered: Container[int] = (),
    ) -> tuple[requests.Response, str]:
        """One request (twice after a 401 with a SMART token); the response and its label.

        :param media_type: sent as Accept, and as Content-Type with a body.
        :param answered: non-2xx statuses whose answer the caller reads itself (a protocol that
            carries its refusals in the body); every other non-2xx is raised, classified.
        :raises TransientDeliveryError | PermanentDeliveryError: classified as the module doc says.
        """
        label = f"{self.destination.name}: {method} {url}"
        headers = {"User-Agent": USER_AGENT, "Accept": media_type}
        if body is not None:
            headers["Content-Type"] = media_type
        if prefer is not None:
            headers["Prefer"] = prefer
        for attempt in (1, 2):
            try:
                response = self.session.request(
                    method, url, data=body, headers=headers, auth=self.auth, timeout=self.timeout, allow_redirects=False
                )
            except DeliveryError as exc:  # from the token endpoint, while authorizing the request
                raise type(exc)(f"{label}: {exc.message}", http_status=exc.http_status, retry_after=exc.retry_after) from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                raise TransientDeliveryError(f"{label}: no answer: {_reason(exc)}") from None
            except requests.RequestException as exc:
                raise PermanentDeliveryError(f"{label}: {_reason(exc)}") from None
            if response.status_code == 401 and self._smart is not None and attempt == 1:
                self._smart.invalidate()  # revoked or expired early: one more try with a fresh token
                continue
            break
        status = response.status_code
        if 200 <= status < 300 or status in answered:
            return response, label
        answered_with = f"{label} answered {status} {response.reason or ''}".rstrip()
        if status in TRANSIENT_STATUSES:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"), server_now(response))
            raise TransientDeliveryError(f"{answered_with}: {self.explain(response)}", http_status=status, retry_after=retry_after)
        if 300 <= status < 400:
            where = response.headers.get("Location", "nowhere")
            raise PermanentDeliveryError(
                f"{answered_with}: redirected to {where}; redirects are not followed, check base_url", http_status=status
            )
        raise PermanentDeliveryError(f"{answered_with}: {self.explain(response)}", http_status=status)

    def close(self) -> None:
        """Release the pooled connections (of a session this object made)."""
        if self._owns_session:
            self.session.close()


class FhirClient:
    """A FHIR REST client for one destination, over its :class:`DestinationHttp` (pooled
    session, auth, timeouts, failures classified).

    Use it as a context manager, or :meth:`close` it; a session passed in is the caller's and
    stays open.
    """

    def __init__(self, destination: Destination, *, session: requests.Session | None = None) -> None:
        self.destination = destination
        self.base_url = destination.base_url.rstrip("/")
        self._origin = _origin(self.base_url)
        self.http = DestinationHttp(destination, session=session)
        self.session = self.http.session
        self.media_type = MEDIA_TYPES[destination.format]

    # -- the operations

    def transaction(self, bundle: dict) -> dict:
        """POST a transaction Bundle to the base; the transaction-response Bundle as a dict.

        :raises TransientDeliveryError: try again later (see the module doc).
        :raises PermanentDeliveryError: the target refused it, or answered something else.
        """
        body = fhir_xml.to_xml(bundle) if self.destination.format == "xml" else fhir_json.dumps(bundle)
        response, label = self._send("POST", self.base_url, body=body, prefer="return=minimal")
        return self._bundle(response, label, "transaction-response")

    def search(self, resource_type: str, params: Sequence[tuple[str, str]]) -> Iterator[dict]:
        """Every resource a search finds, following ``Bundle.link[relation=next]`` page by page.

        All entries' resources are yielded: matches, ``_include``\\ d resources and any
        ``outcome`` OperationOutcome alike (tell them apart by ``resourceType``). A next link
        may be absolute or relative, but must stay on the base URL's scheme, host and port:
        following it elsewhere would send our credentials there.

        :raises PermanentDeliveryError: a page is not a searchset, or a next link leaves the
            server or leads back to a page already read.
        """
        query = urlencode(list(params))
        url: str | None = f"{self.base_url}/{resource_type}" + (f"?{query}" if query else "")
        seen: set[str] = set()
        while url is not None:
            seen.add(url)
            response, label = self._send("GET", url)
            bundle = self._bundle(response, label, "searchset")
            for entry in bundle.get("entry") or ():
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(resource, dict):
                    yield resource
            url = self._next_page(bundle, url, label, seen)

    def read(self, reference: str) -> dict:
        """GET one resource by its reference: ``Type/id``, ``Type/id/_history/v``, or an
        absolute URL on this server.

        :raises PermanentDeliveryError: the reference is of another shape or server, the
            target answers 404/410 (``http_status`` tells), or sends another resource type.
        """
        parsed = parse_reference(reference)
        absolute = "://" in reference
        if parsed is None or parsed[0] is None or (absolute and _origin(reference) != self._origin):
            raise PermanentDeliveryError(
                f"{self.destination.name}: cannot read {reference!r}: not a Type/id reference on {self.base_url}"
            )
        if absolute:
            url = reference
        else:
            url = f"{self.base_url}/{reference.strip('/')}"
        response, label = self._send("GET", url)
        resource = self._parse(response, label)
        if resource.get("resourceType") != parsed[0]:
            raise PermanentDeliveryError(
                f"{label} answered a {resource.get('resourceType')}, not the {parsed[0]} asked for",
                http_status=response.status_code,
            )
        return resource

    def close(self) -> None:
        """Release the pooled connections (of a session this client made)."""
        self.http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    # -- HTTP

    def _send(
        self, method: str, url: str, *, body: bytes | None = None, prefer: str | None = None
    ) -> tuple[requests.Response, str]:
        """One FHIR request in the destination's format; a 2xx response and its label."""
        return self.http.send(method, url, media_type=self.media_type, body=body, prefer=prefer)

    def _parse(self, response: requests.Response, label: str) -> JSON:
        """The FHIR resource in a 2xx answer, read as its Content-Type says (else by its first byte)."""
        content_type = response.headers.get("Content-Type", "").lower()
        data = response.content
        if "xml" in content_type or "json" in content_type:
            is_xml = "xml" in content_type
        else:  # no or a generic Content-Type: the first byte tells
            is_xml = data.lstrip()[:1] == b"<"
        try:
            if not data.strip():
                raise PermanentDeliveryError("the body is empty")
            return fhir_xml.from_xml(data, exact_decimals=True) if is_xml else fhir_json.loads(data, exact_decimals=True)
        except IopFhirError as exc:
            raise PermanentDeliveryError(
                f"{label} answered {response.status_code} with no FHIR resource: {exc.message}",
                http_status=response.status_code,
            ) from None

    def _bundle(self, response: requests.Response, label: str, kind: str) -> JSON:
        """The Bundle of type ``kind`` in a 2xx answer."""
        bundle = self._parse(response, label)
        found = bundle.get("type") if bundle.get("resourceType") == "Bundle" else bundle.get("resourceType")
        if bundle.get("resourceType") != "Bundle" or found != kind:
            raise PermanentDeliveryError(
                f"{label} answered {response.status_code} with a {found or 'resource of no type'}, not a {kind} Bundle",
                http_status=response.status_code,
            )
        return bundle

    def _next_page(self, bundle: JSON, url: str, label: str, seen: set[str]) -> str | None:
        """The absolute URL of the next page, or None on the last page."""
        for link in bundle.get("link") or ():
            if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
                target = urljoin(url, link["url"])
                if _origin(target) != self._origin:
                    raise PermanentDeliveryError(
                        f"{label}: the next link {link['url']} leaves {self.base_url}; not followed"
                    )
                if target in seen:
                    raise PermanentDeliveryError(f"{label}: the next link {link['url']} leads back to a page already read")
                return target
        return None


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in, to compare servers."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: matches nothing
        return scheme, parts.netloc.lower(), -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _reason(exc: requests.RequestException) -> str:
    """The innermost reason of a requests error, for a message a person can act on."""
    return f"{type(exc).__name__}: {exc}"


def _explanation(response: requests.Response) -> str:
    """What the target said: its OperationOutcome's diagnostics, else the start of the body."""
    data = response.content
    if not data.strip():
        return "(empty body)"
    outcome: JSON | None = None
    try:
        outcome = fhir_xml.from_xml(data) if data.lstrip()[:1] == b"<" else fhir_json.loads(data)
    except IopFhirError:
        outcome = None
    if outcome is not None and outcome.get("resourceType") == "OperationOutcome":
        said = []
        for issue in outcome.get("issue") or ():
            if not isinstance(issue, dict):
                continue
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
            where = issue.get("expression") or issue.get("location")
            if text:
                said.append(f"{text} (at {', '.join(map(str, where))})" if isinstance(where, list) and where else str(text))
        if said:
            return "; ".join(said)
    return response.text[:BODY_EXCERPT]
