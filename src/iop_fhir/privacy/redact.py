"""Removing the elements of a resource that mention data a recipient may not see.

A resource that is not Part 2 data itself can still point at some: an aftercare CarePlan lists
the discharge MedicationRequests, methadone among them; a Patient names the SUD program that
manages it. ``labels.json`` (``mention_paths``) says which references only mention other data;
the decision function (``consent.py``) finds which of them lead to what the recipient may not
see, and :func:`redact` takes them out of a copy:

* each such Reference is removed, and an element left with nothing but its id goes too (an
  activity that was only that reference), up to the resource;
* the free text of the resource (``free_text`` in ``labels.json``: descriptions, notes) goes,
  since nothing can tell what it says about the removed data, and the narrative is replaced
  by a line saying that parts were withheld (US Core requires a narrative on some types);
* the copy is labelled ``REDACTED`` (v3-ObservationValue), so its recipient knows it is partial.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from typing import Any, NamedTuple

from iop_fhir.mappers.datatypes import as_dict, narrative, xhtml_text
from iop_fhir.privacy.labels import add_labels, rules

JSON = dict[str, Any]
Trail = tuple[str | int, ...]

REDACTED = "REDACTED"
WITHHELD_TEXT = "Parts of this record were withheld from this disclosure."


class Mention(NamedTuple):
    """One Reference that only mentions other data: where it is, and what it names."""

    location: str  # FHIRPath-like, with indices: ``CarePlan.activity[2].reference``
    reference: str
    trail: Trail  # keys and list indices from the resource down to the Reference


class _Gone:
    """Marks a value to remove; a class of its own so no JSON value can equal it."""


_GONE = _Gone()


def _walk(node: Any, steps: list[str], trail: Trail, location: str) -> Iterator[tuple[Trail, str, Any]]:
    if not steps:
        yield trail, location, node
        return
    step, rest = steps[0], steps[1:]
    value = as_dict(node).get(step)
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, rest, (*trail, step, i), f"{location}.{step}[{i}]")
    elif value is not None:
        yield from _walk(value, rest, (*trail, step), f"{location}.{step}")


def _found(resource: JSON, path: str) -> Iterator[tuple[Trail, str, Any]]:
    return _walk(resource, path.split("."), (), str(resource.get("resourceType", "")))


def mentions(resource: JSON) -> list[Mention]:
    """The References of the resource that only mention other data (``mention_paths``)."""
    out: list[Mention] = []
    for path in rules().mention_paths.get(str(resource.get("resourceType", "")), ()):
        for trail, location, value in _found(resource, path):
            ref = as_dict(value).get("reference")
            if isinstance(ref, str) and ref:
                out.append(Mention(location, ref, trail))
    return out


def _mark(resource: JSON, trail: Trail) -> None:
    node: Any = resource
    for step in trail[:-1]:
        node = node[step]
    node[trail[-1]] = _GONE


def _prune(node: Any) -> tuple[Any, bool]:
    """``node`` without the marked values; a container emptied by a removal (nothing but an
    ``id`` left) is marked itself. Returns (value, whether anything below was removed)."""
    if node is _GONE:
        return _GONE, True
    if isinstance(node, dict):
        out: JSON = {}
        touched = False
        for key, value in node.items():
            kept, removed = _prune(value)
            touched |= removed
            if kept is not _GONE:
                out[key] = kept
        return (_GONE if touched and not set(out) - {"id"} else out), touched
    if isinstance(node, list):
        items = [_prune(item) for item in node]
        touched = any(removed for _, removed in items)
        kept_items = [kept for kept, _ in items if kept is not _GONE]
        return (_GONE if touched and not kept_items else kept_items), touched
    return node, False


def redact(resource: JSON, locations: Collection[str]) -> JSON:
    """A copy of the resource without the mentions at ``locations`` (as :func:`mentions` names
    them), its free text and narrative replaced, labelled ``REDACTED``. Nothing to remove gives
    an unchanged copy."""
    chosen = [m for m in mentions(resource) if m.location in locations]
    if not chosen:
        return copy.deepcopy(resource)
    out = copy.deepcopy(resource)
    for mention in chosen:
        _mark(out, mention.trail)
    for path in rules().free_text.get(str(resource.get("resourceType", "")), ()):
        for trail, _, _ in list(_found(out, path)):
            _mark(out, trail)
    # the resource itself stays whatever is left of it: prune below the top level only
    pruned = {key: kept for key, value in out.items() if (kept := _prune(value)[0]) is not _GONE}
    if "text" in resource:
        pruned["text"] = narrative(f"<p>{xhtml_text(WITHHELD_TEXT)}</p>")
    return add_labels(pruned, [REDACTED])
