"""Streaming conversion of many records (or bundles), one failure never stopping the rest.

This is the library behind ``iop-fhir convert`` and ``validate``: it reads one JSON object,
a JSON array or JSON lines lazily, converts each item, and yields an ``Outcome`` per item
(the output, or the located issues that stopped it). The CLI only prints and counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from iop_fhir.errors import IopFhirError, Issue, RecordInvalid, UnsupportedFormat
from iop_fhir.formats import fhir_validate
from iop_fhir.mappers.bundle import bundle_to_record, record_to_bundle
from iop_fhir.record import validate_record

JSON = dict[str, Any]


@dataclass
class Outcome:
    """What became of one input item: ``output`` when it converted, ``issues`` always."""

    index: int
    output: JSON | None
    issues: list[Issue] = field(default_factory=list)
    label: str = ""

    @property
    def ok(self) -> bool:
        return self.output is not None and not any(i.severity in ("error", "fatal") for i in self.issues)


def iter_json_items(stream: IO[str]) -> Iterator[tuple[int, Any]]:
    """Items of one JSON object, a JSON array, or JSON lines, read lazily where the shape allows.

    JSON lines stream line by line (bounded memory for any number of records); a single
    object or an array is read whole. A line that is not JSON yields an ``UnsupportedFormat``
    in place of its item, so the caller can report it and go on.
    """
    first = stream.readline()
    while first and not first.strip():
        first = stream.readline()
    if not first:
        raise UnsupportedFormat("the input is empty")
    head = first.lstrip()
    if head.startswith("["):
        text = first + stream.read()
        items = _load(text, "input")
        for i, item in enumerate(items):
            yield i, item
        return
    try:
        one = json.loads(first)
    except json.JSONDecodeError:
        # A pretty-printed single object: its first line is not JSON on its own.
        yield 0, _load(first + stream.read(), "input")
        return
    yield 0, one
    index = 1
    for line in stream:
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as exc:
            yield index, UnsupportedFormat(f"line {index + 1}: not JSON ({exc.msg} at column {exc.colno})")
        index += 1


def _load(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnsupportedFormat(f"{what} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def convert_record(item: Any, index: int = 0, *, validate_output: bool = True) -> Outcome:
    """One IOP record to its transaction Bundle, the output checked against FHIR R4."""
    if isinstance(item, IopFhirError):
        return Outcome(index, None, item.issues)
    try:
        record = validate_record(item)
    except RecordInvalid as exc:
        label = item.get("id", "") if isinstance(item, dict) else ""
        return Outcome(index, None, exc.issues, label=str(label))
    bundle = record_to_bundle(record)
    issues = fhir_validate.validate_bundle_entries(bundle) if validate_output else []
    if issues:
        # Our own output failing FHIR validation is a bug; say so rather than emit it.
        issues = [Issue(f"internal mapping error: {i.message}", i.location, "fatal", "exception") for i in issues]
        return Outcome(index, None, issues, label=record.id)
    return Outcome(index, bundle, [], label=record.id)


def reverse_bundle(item: Any, index: int = 0) -> Outcome:
    """One Bundle back to an IOP record; the mapping report rides along as issues."""
    if isinstance(item, IopFhirError):
        return Outcome(index, None, item.issues)
    result = bundle_to_record(item)
    label = result.record.id if result.record else ""
    output = result.record.model_dump(mode="json", exclude_none=True) if result.record else None
    return Outcome(index, output, list(result.report.issues), label=label)


def check_item(item: Any, index: int = 0) -> Outcome:
    """Validate one item: a FHIR resource (it has ``resourceType``) or an IOP record."""
    if isinstance(item, IopFhirError):
        return Outcome(index, None, item.issues)
    if isinstance(item, dict) and "resourceType" in item:
        if item.get("resourceType") == "Bundle":
            issues = fhir_validate.validate_bundle_entries(item) + fhir_validate.validate_resource(_shell(item))
        else:
            issues = fhir_validate.validate_resource(item)
        return Outcome(index, item if not issues else None, issues, label=f"{item.get('resourceType')}/{item.get('id', '')}")
    try:
        record = validate_record(item)
    except RecordInvalid as exc:
        return Outcome(index, None, exc.issues)
    return Outcome(index, item, [], label=record.id)


def _shell(bundle: JSON) -> JSON:
    # The Bundle without its entries' resources, which validate_bundle_entries already checked.
    return {k: v for k, v in bundle.items() if k != "entry"}
