"""FHIR content negotiation: which format a request speaks and wants, bodies in, responses out.

Formats (FHIR R4 http.html#mime-type): ``application/fhir+json`` and ``application/fhir+xml``,
with the ``json``/``xml`` shorthands and ``application/json``/``application/xml`` accepted.
The response format is chosen by ``_format`` first, then ``Accept``; JSON when neither says.
Handlers never serialise themselves: they hand ``respond`` a dict, or stored JSON bytes, which
are served as they are when JSON is wanted (no parse, no re-serialisation on reads).
"""

from __future__ import annotations

from typing import Any

from flask import Request, Response, request

from iop_fhir.errors import IopFhirError, UnsupportedFormat
from iop_fhir.formats import fhir_json

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"

_ALIASES = {
    "json": FHIR_JSON,
    "application/json": FHIR_JSON,
    "application/fhir+json": FHIR_JSON,
    "application/json+fhir": FHIR_JSON,  # DSTU2-era name some clients still send
    "xml": FHIR_XML,
    "text/xml": FHIR_XML,
    "application/xml": FHIR_XML,
    "application/fhir+xml": FHIR_XML,
    "application/xml+fhir": FHIR_XML,
}


class NotAcceptable(IopFhirError):
    """The client accepts no format the gateway can write."""

    status = 406
    issue_code = "not-supported"


def _mime(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def response_format(req: Request | None = None) -> str:
    """The media type to answer in: ``_format``, else the best of ``Accept``, else FHIR JSON.

    Errors must still be answerable, so an unusable ``_format`` or ``Accept`` raises
    ``NotAcceptable`` (answered in JSON by the error handler).
    """
    req = req or request
    fmt = req.args.get("_format")
    if fmt:
        chosen = _ALIASES.get(_mime(fmt))
        if chosen is None:
            raise NotAcceptable(f"_format {fmt!r} is not served; use json or xml")
        return chosen
    accept = req.accept_mimetypes
    if not accept.provided or accept.best in (None, "*/*"):
        return FHIR_JSON
    for mime, _quality in sorted(accept, key=lambda mq: -mq[1]):
        if mime in ("*/*", "application/*"):
            return FHIR_JSON
        if mime in _ALIASES:
            return _ALIASES[mime]
    raise NotAcceptable(f"none of the accepted types ({req.headers.get('Accept')}) is served; use application/fhir+json or application/fhir+xml")


def safe_response_format(req: Request | None = None) -> str:
    """``response_format`` for error responses: never raises, falls back to JSON."""
    try:
        return response_format(req)
    except IopFhirError:
        return FHIR_JSON


def read_body(req: Request | None = None, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The request body as a FHIR resource dict, decimals kept exact (``1.50`` stays ``1.50``).

    :raises UnsupportedFormat: 415 for a Content-Type that is neither FHIR JSON nor XML.
    :raises RecordInvalid / JsonRejected / XmlRejected: 4xx naming what is wrong in the body.
    """
    req = req or request
    raw_type = req.headers.get("Content-Type", "")
    kind = _ALIASES.get(_mime(raw_type)) if raw_type else FHIR_JSON
    if kind is None:
        raise UnsupportedFormat(f"Content-Type {raw_type!r} is not accepted; send application/fhir+json or application/fhir+xml")
    data = req.get_data(cache=True)
    if max_bytes is not None and len(data) > max_bytes:
        raise BodyTooLarge(f"the body is {len(data)} bytes; at most {max_bytes} are accepted")
    if not data.strip():
        raise EmptyBody("the request has no body; a FHIR resource was expected")
    if kind == FHIR_XML:
        from iop_fhir.formats import fhir_xml

        return fhir_xml.from_xml(data, exact_decimals=True)
    return fhir_json.loads(data, exact_decimals=True)


class BodyTooLarge(IopFhirError):
    status = 413
    issue_code = "too-costly"


class EmptyBody(IopFhirError):
    status = 400
    issue_code = "required"


def render(resource: dict[str, Any] | bytes, fmt: str) -> bytes:
    """Serialise for ``fmt``; JSON bytes from the store pass through untouched."""
    if fmt == FHIR_XML:
        from iop_fhir.formats import fhir_xml

        document = fhir_json.loads(resource, exact_decimals=True) if isinstance(resource, bytes) else resource
        return fhir_xml.to_xml(document)
    return resource if isinstance(resource, bytes) else fhir_json.dumps(resource)


def respond(
    resource: dict[str, Any] | bytes | None,
    status: int = 200,
    headers: dict[str, str] | None = None,
    *,
    fmt: str | None = None,
) -> Response:
    """A FHIR response in the negotiated format (``resource=None``: no body, e.g. 204/304)."""
    fmt = fmt or response_format()
    body = b"" if resource is None else render(resource, fmt)
    response = Response(body, status=status, headers=headers or {})
    if resource is not None:
        response.headers["Content-Type"] = f"{fmt}; charset=utf-8"
    return response
