"""One place turns every error into an OperationOutcome in the negotiated format.

Client mistakes arrive as ``IopFhirError`` (4xx with the issues that locate them) or as
werkzeug HTTP errors (unknown route, wrong method, body over the size limit). Anything else
is a bug: it is logged with its traceback and answered 500, still with an OperationOutcome.
"""

from __future__ import annotations

import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from iop_fhir.api.negotiate import respond, safe_response_format
from iop_fhir.errors import IopFhirError, Issue, operation_outcome

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not-found", 405: "not-supported", 413: "too-costly", 415: "not-supported", 406: "not-supported", 401: "login", 403: "forbidden"}


def error_response(status: int, issues: list[Issue], headers: dict[str, str] | None = None) -> Response:
    return respond(operation_outcome(issues), status, headers, fmt=safe_response_format())


def _iop_error(exc: IopFhirError) -> Response:
    headers = dict(getattr(exc, "headers", None) or {})
    return error_response(exc.status, exc.issues, headers)


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    message = exc.description or exc.name
    headers = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "www-authenticate", "retry-after")}
    return error_response(status, [Issue(message, code=_HTTP_CODES.get(status, "processing"), severity="error")], headers)


def _bug(exc: Exception) -> Response:
    log.exception("unhandled error (a bug): %s", exc)
    return error_response(500, [Issue("internal error; the gateway logged it", code="exception", severity="fatal")])


def init_app(app: Flask) -> None:
    app.register_error_handler(IopFhirError, _iop_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _bug)
