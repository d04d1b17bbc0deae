"""FHIR JSON on the wire: bytes in, dicts out, and back.

Why here and not ``json``: orjson is several times faster on the resource sizes we move, and
FHIR JSON has rules plain JSON does not (RFC 8259 allows what FHIR forbids):

* the top level is an object with a ``resourceType``;
* no empty objects, empty arrays or empty strings anywhere, and no ``null`` — except inside a
  primitive array whose ``_name`` twin carries the extension at that index
  (``"given": ["a", null], "_given": [null, {"extension": [...]}]``); twins are equally long;
* decimals keep their precision: ``1.50`` is not ``1.5``. ``loads(..., exact_decimals=True)``
  reads numbers with a fraction or exponent as :class:`~decimal.Decimal` (stdlib ``json``, slower)
  and ``dumps`` writes a ``Decimal`` verbatim through ``orjson.Fragment``. The default fast
  mode reads floats, as every JSON library does.

Output is deterministic: keys keep insertion order (FHIR puts ``resourceType`` first and the
mappers insert it first), never sorted.

Errors: :class:`JsonRejected` (400) when the bytes are not JSON at all, with line and column;
:class:`~iop_fhir.errors.RecordInvalid` (422) when they are JSON but break the rules above,
with the FHIRPath-like location of the first few offenders (``Patient.name[0].given``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import IO, Any

import orjson

from ..errors import Issue, RecordInvalid, UnsupportedFormat

__all__ = [
    "JsonRejected",
    "dumps",
    "empty_and_null_issues",
    "iter_ndjson",
    "iter_resources",
    "loads",
    "summary",
    "write_ndjson",
]

RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
MAX_REPORTED = 10  # offenders named in one error; the rest are counted


class JsonRejected(UnsupportedFormat):
    """Bytes that are not JSON (or not UTF-8)."""

    status = 400
    issue_code = "structure"


# --- writing ---------------------------------------------------------------------------------


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            raise TypeError(f"{obj} is not a JSON number")
        return orjson.Fragment(str(obj))
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(resource: Any, *, pretty: bool = False) -> bytes:
    """Serialize to UTF-8 JSON bytes, keys in insertion order, ``Decimal`` written verbatim.

    :param pretty: indent by two spaces (for people; the wire default is compact).
    """
    return orjson.dumps(resource, default=_default, option=orjson.OPT_INDENT_2 if pretty else 0)


def write_ndjson(resources: Iterable[Any], stream: IO[bytes]) -> int:
    """Write one compact JSON object a line (NDJSON, as FHIR bulk data); returns the count."""
    count = 0
    for resource in resources:
        stream.write(dumps(resource))
        stream.write(b"\n")
        count += 1
    return count


# --- reading ---------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode(data: bytes | bytearray | memoryview | str, exact_decimals: bool) -> Any:
    """Plain JSON parse, no FHIR checks (the store parses its own bytes with it); raises
    JsonRejected with line and column."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if isinstance(data, bytes) and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # RFC 8259 lets a parser ignore a UTF-8 BOM; clients do send one
    elif isinstance(data, str) and data.startswith("\ufeff"):
        data = data[1:]
    try:
        if not exact_decimals:
            return orjson.loads(data)
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise JsonRejected(
            f"JSON is not valid UTF-8 (byte {exc.start})",
            [Issue("JSON is not valid UTF-8", location=f"byte {exc.start}", code="structure")],
        ) from None
    except json.JSONDecodeError as exc:  # orjson.JSONDecodeError is a subclass
        location = f"line {exc.lineno}, column {exc.colno}"
        raise JsonRejected(
            f"malformed JSON at {location}: {exc.msg}",
            [Issue(exc.msg, location=location, code="structure")],
        ) from None
    except ValueError as exc:  # NaN / Infinity in exact mode
        raise JsonRejected(f"malformed JSON: {exc}", [Issue(str(exc), code="structure")]) from None


def loads(data: bytes | bytearray | memoryview | str, *, exact_decimals: bool = False) -> dict[str, Any]:
    """Parse one FHIR resource from JSON and enforce the FHIR JSON rules.

    :param exact_decimals: read fractional numbers as ``Decimal`` so ``1.50`` stays ``1.50``
        (through the stdlib parser: slower than the default orjson path).
    :raises JsonRejected: not JSON (line and column in the message and the issue location).
    :raises RecordInvalid: JSON, but not a FHIR resource: not an object, ``resourceType``
        missing or malformed, or empty values / nulls (each located).
    """
    return _checked_resource(decode(data, exact_decimals), "")


def _checked_resource(value: Any, where: str) -> dict[str, Any]:
    """Enforce the FHIR JSON rules on one parsed value; ``where`` prefixes messages (``item 3: ``)."""
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else type(value).__name__
        raise RecordInvalid(
            f"{where}FHIR JSON must be an object, got {kind}",
            [Issue(f"a FHIR resource is a JSON object, not {kind}", code="structure")],
        )
    resource_type = value.get("resourceType")
    if resource_type is None:
        raise RecordInvalid(
            f"{where}resourceType is missing",
            [Issue("resourceType is required", location="resourceType", code="required")],
        )
    if not isinstance(resource_type, str) or not RESOURCE_TYPE.fullmatch(resource_type):
        raise RecordInvalid(
            f"{where}resourceType {resource_type!r} is not a resource type name",
            [Issue(f"invalid resourceType {resource_type!r}", location="resourceType", code="value")],
        )
    issues = empty_and_null_issues(value)
    if issues:
        raise RecordInvalid(f"{where}FHIR JSON forbids empty values and nulls: {summary(issues)}", issues)
    return value


def summary(issues: list[Issue], shown: int = 3) -> str:
    """The first few issues on one line, for an exception message (the issues travel whole)."""
    text = "; ".join(str(issue) for issue in issues[:shown])
    return f"{text} (+{len(issues) - shown} more)" if len(issues) > shown else text


def iter_resources(data: bytes | str, *, exact_decimals: bool = False) -> Iterator[dict[str, Any]]:
    """Resources from one document holding a single object, an array of them, or JSON lines.

    The CLI reads whichever a person hands it. Errors name the array index or line.
    """
    text = data.lstrip() if isinstance(data, str) else data.lstrip(b" \t\r\n\xef\xbb\xbf")
    if text[:1] in ("[", b"["):
        items = decode(text, exact_decimals)
        for index, item in enumerate(items):
            yield _checked_resource(item, f"item {index}: ")
        return
    try:
        value = decode(text, exact_decimals)
    except JsonRejected:
        lines = text.splitlines()
        if len(lines) < 2:
            raise
        yield from iter_ndjson(lines, exact_decimals=exact_decimals)
        return
    yield _checked_resource(value, "")


def iter_ndjson(lines: Iterable[bytes | str], *, exact_decimals: bool = False) -> Iterator[dict[str, Any]]:
    """Resources from NDJSON (a binary file or any iterable of lines); blank lines are skipped."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = decode(line, exact_decimals)
        except JsonRejected as exc:
            raise JsonRejected(f"line {number}: {exc.message}", exc.issues) from None
        yield _checked_resource(value, f"line {number}: ")


# --- the empty-value and null rule -----------------------------------------------------------


def empty_and_null_issues(resource: dict[str, Any], root: str | None = None) -> list[Issue]:
    """Every place ``resource`` breaks the FHIR JSON rule on empty values and nulls.

    A fast pass without paths runs first (the common, valid case costs one walk); only when it
    finds something does a second pass name the places. ``root`` starts the locations
    (default: the resourceType).
    """
    if _clean(resource):
        return []
    issues: list[Issue] = []
    start = root if root is not None else str(resource.get("resourceType") or "")
    _collect(resource, start, issues)
    if len(issues) > MAX_REPORTED:
        extra = len(issues) - MAX_REPORTED
        issues = issues[:MAX_REPORTED]
        issues.append(Issue(f"... and {extra} more empty values or nulls", severity="information"))
    return issues


def _clean(value: Any) -> bool:
    """True when nothing below ``value`` is empty or null and twin arrays match in length
    (aligned nulls count as not clean: the second pass judges them)."""
    if type(value) is dict:
        if not value:
            return False
        for key, item in value.items():
            kind = type(item)
            if kind is str:
                if not item:
                    return False
            elif kind is dict:
                if not _clean(item):
                    return False
            elif kind is list:
                if not _clean(item):
                    return False
                if key[:1] == "_":  # a primitive's extensions: the twin must be as long
                    twin = value.get(key[1:])
                    if type(twin) is list and len(twin) != len(item):
                        return False
            elif item is None:
                return False
        return True
    if not value:  # an empty list
        return False
    for item in value:
        kind = type(item)
        if kind is str:
            if not item:
                return False
        elif kind is dict or kind is list:
            if not _clean(item):
                return False
        elif item is None:
            return False
    return True


def _collect(value: Any, path: str, issues: list[Issue]) -> None:
    if isinstance(value, dict):
        if not value:
            issues.append(Issue("empty object", location=path, code="structure"))
            return
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if item is None:
                issues.append(Issue("null value", location=where, code="structure"))
            elif isinstance(item, list):
                twin = value.get(key[1:] if key.startswith("_") else f"_{key}")
                _collect_list(item, where, twin if isinstance(twin, list) else None, issues)
            else:
                _collect(item, where, issues)
    elif isinstance(value, list):
        _collect_list(value, path, None, issues)
    elif isinstance(value, str) and not value:
        issues.append(Issue("empty string", location=path, code="structure"))


def _collect_list(items: list[Any], path: str, twin: list[Any] | None, issues: list[Issue]) -> None:
    """A list may hold null only where its ``_name`` twin (same length) has a value at that index."""
    if not items:
        issues.append(Issue("empty array", location=path, code="structure"))
        return
    if twin is not None and len(twin) != len(items) and not path.rsplit(".", 1)[-1].startswith("_"):
        issues.append(
            Issue(f"array has {len(items)} items but its extension twin has {len(twin)}", location=path, code="structure")
        )
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        if item is None:
            if twin is None or index >= len(twin) or twin[index] is None:
                issues.append(Issue("null value", location=where, code="structure"))
        else:
            _collect(item, where, issues)
