"""Query parameters and answers of the plain-JSON operator APIs (``/admin/sync``, ``/admin/ncpdp``).

Those routes answer JSON, not FHIR, but their errors are OperationOutcomes like everywhere else:
a parameter that cannot be used is a 400 naming it. The rules live here once, so both APIs
refuse a stray parameter, read a number and page alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from flask import Response, request

from iop_fhir.errors import IopFhirError, Issue

JSON_TYPE = "application/json"
DEFAULT_LIMIT = 100  # rows in a page when ``limit`` is not given
MAX_LIMIT = 1000  # the largest page: a bigger one is refused, not cut (the caller would miss rows)


class InvalidAdminRequest(IopFhirError):
    """A parameter or body field of an admin request that cannot be used (400, names the field)."""

    status = 400
    issue_code = "value"


def invalid(location: str, message: str) -> InvalidAdminRequest:
    """The error for one unusable parameter or field, located at it."""
    return InvalidAdminRequest(f"{location}: {message}", [Issue(message, location=location, code="value")])


def only(allowed: Sequence[str]) -> None:
    """Refuse a query parameter the route does not take: a typo must not quietly widen the answer.

    :raises InvalidAdminRequest: naming the first unknown parameter and the ones allowed.
    """
    for name in request.args:
        if name not in allowed:
            raise invalid(name, f"is not a parameter here ({', '.join(allowed)})")


def integer(name: str, default: int, *, minimum: int) -> int:
    """Query parameter ``name`` as a whole number of at least ``minimum`` (``default`` when absent).

    :raises InvalidAdminRequest: not an integer, or below ``minimum``.
    """
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(name, f"must be an integer, not {raw!r}") from None
    if value < minimum:
        raise invalid(name, f"must be at least {minimum}")
    return value


def limit() -> int:
    """The page size ``limit`` (1 to :data:`MAX_LIMIT`, default :data:`DEFAULT_LIMIT`)."""
    value = integer("limit", DEFAULT_LIMIT, minimum=1)
    if value > MAX_LIMIT:
        raise invalid("limit", f"must be at most {MAX_LIMIT}")
    return value


def json_response(document: Any, status: int = 200) -> Response:
    """``document`` as an ``application/json`` answer."""
    return Response(orjson.dumps(document), status, content_type=JSON_TYPE)


__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "InvalidAdminRequest", "integer", "invalid", "json_response", "limit", "only"]
