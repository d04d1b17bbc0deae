"""The CapabilityStatement (``GET /fhir/metadata``), built from the code that does the work.

Nothing here is a hand-kept list that could drift from what the server does:

* resource types and their search parameters: the store's table
  (:data:`iop_fhir.store.search_index.PARAMETERS`, documented from its element paths);
* interactions and the conditional flags: the route table of :mod:`iop_fhir.api.fhir`
  (each route registers the :class:`Interaction` it implements);
* ``_include`` / ``_revinclude``: what :mod:`iop_fhir.api.search` accepts;
* operations: what other blueprints put in ``app.extensions["iop_fhir.operations"]``;
* ``transaction`` / ``batch``: present when the bundles blueprint has a route at the base;
* security: ``app.extensions["iop_fhir.security"]`` (the auth module's SMART description);
* read-only types (AuditEvent, the audit trail: ``privacy.audit.READ_ONLY_TYPES``) list only
  the interactions that read (read, vread, history, search).

Built once per app (everything above is fixed once the blueprints are registered); only
``implementation.url`` changes with the request's base URL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from flask import Flask

from iop_fhir.api.search import include_values, reference_targets, revinclude_values, served_types
from iop_fhir.formats.fhir_validate import elements_of, model_class
from iop_fhir.privacy.audit import READ_ONLY_TYPES
from iop_fhir.store import SearchParam, search_parameters

JSON = dict[str, Any]

OPERATIONS_KEY = "iop_fhir.operations"
SECURITY_KEY = "iop_fhir.security"
_CACHE_KEY = "iop_fhir.capability"
FORMATS = ["json", "xml", "application/fhir+json", "application/fhir+xml"]
PATCH_FORMATS = ["application/json-patch+json"]
# The interactions that read: all a read-only type offers.
READ_INTERACTIONS = frozenset({"read", "vread", "history-instance", "history-type", "search-type"})
# The parameters without element paths read the resource's own columns.
_OWN_COLUMNS = {
    "_id": "The logical id of the resource",
    "_lastUpdated": "When the current version was stored (meta.lastUpdated)",
}


@dataclass(frozen=True)
class Interaction:
    """One RESTful interaction a route implements.

    :param code: the CapabilityStatement code (``read``, ``history-type``, ``history-system``...).
    :param level: ``instance``, ``type`` or ``system``.
    :param conditional: the route is the conditional form (``If-None-Exist`` on create,
        ``PUT``/``DELETE`` on the type with search criteria, ``If-None-Match`` /
        ``If-Modified-Since`` on read).
    """

    code: str
    level: str
    conditional: bool = False


def capability_statement(app: Flask, base: str, interactions: Sequence[Interaction]) -> JSON:
    """The CapabilityStatement of ``app`` as served at ``base``."""
    body = app.extensions.get(_CACHE_KEY)
    if body is None:
        body = app.extensions[_CACHE_KEY] = _build(app, interactions)
    head, rest = body
    return {**head, "implementation": {"description": "iop-fhir gateway", "url": base}, **rest}


def _build(app: Flask, interactions: Sequence[Interaction]) -> tuple[JSON, JSON]:
    try:
        version = metadata.version("iop-fhir")
    except metadata.PackageNotFoundError:  # running from a source tree without an install
        version = "0"
    head: JSON = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "publisher": "iop-fhir",
        "kind": "instance",
        "software": {"name": "iop-fhir", "version": version},
    }
    operations: list[JSON] = list(app.extensions.get(OPERATIONS_KEY) or ())
    rest: JSON = {"mode": "server"}
    security = app.extensions.get(SECURITY_KEY)
    if security:
        rest["security"] = security
    rest["resource"] = [_resource(t, interactions, operations) for t in served_types()]
    system = [{"code": code} for code in _system_interactions(app, interactions)]
    if system:
        rest["interaction"] = system
    system_operations = [_operation(op) for op in operations if op.get("level") == "system"]
    if system_operations:
        rest["operation"] = system_operations
    tail = {"fhirVersion": "4.0.1", "format": FORMATS, "patchFormat": PATCH_FORMATS, "rest": [rest]}
    return head, tail


def _system_interactions(app: Flask, interactions: Sequence[Interaction]) -> list[str]:
    codes = _codes(i for i in interactions if i.level == "system")
    # The bundles blueprint answers POST at the base: transaction and batch Bundles.
    if "bundles" in app.blueprints and any(
        rule.endpoint.startswith("bundles.") and "POST" in (rule.methods or ()) for rule in app.url_map.iter_rules()
    ):
        codes += ["transaction", "batch"]
    return codes


def _codes(interactions: Iterable[Interaction]) -> list[str]:
    return list(dict.fromkeys(i.code for i in interactions))


def _resource(resource_type: str, interactions: Sequence[Interaction], operations: list[JSON]) -> JSON:
    mine = [i for i in interactions if i.level in ("instance", "type")]
    if resource_type in READ_ONLY_TYPES:
        mine = [i for i in mine if i.code in READ_INTERACTIONS]
    codes = _codes(mine)

    def conditional(code: str) -> bool:
        return any(i.code == code and i.conditional for i in mine)

    entry: JSON = {
        "type": resource_type,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
        "interaction": [{"code": code} for code in codes],
        # every write takes If-Match (api.fhir._if_match), so updates are version-aware
        "versioning": "versioned-update" if "update" in codes else "versioned" if "vread" in codes else "no-version",
        "readHistory": "vread" in codes,
        "updateCreate": "update" in codes,
        "conditionalCreate": conditional("create"),
        "conditionalRead": "full-support" if conditional("read") else "not-supported",
        "conditionalUpdate": conditional("update"),
        "conditionalDelete": "single" if conditional("delete") else "not-supported",
    }
    if "search-type" in codes:
        includes = include_values(resource_type)
        revincludes = list(revinclude_values(resource_type))
        if includes:
            entry["searchInclude"] = ["*", *includes]
        if revincludes:
            entry["searchRevInclude"] = revincludes
        entry["searchParam"] = [_search_param(resource_type, p) for p in _applicable(resource_type)]
    found = [_operation(op) for op in operations if op.get("level") != "system" and _applies(op, resource_type)]
    if found:
        entry["operation"] = list({op["name"]: op for op in found}.values())
    return entry


def _applies(op: JSON, resource_type: str) -> bool:
    types = op.get("types")
    return types in (None, "*", ["*"]) or resource_type in types


def _applicable(resource_type: str) -> list[SearchParam]:
    """The type's parameters whose elements exist in it (a common one such as ``identifier``
    does not apply to a type without identifiers)."""
    elements = elements_of(model_class(resource_type))
    params = search_parameters(resource_type).values()
    return [p for p in params if not p.steps or any(steps[0] in elements for steps in p.steps)]


def _search_param(resource_type: str, p: SearchParam) -> JSON:
    if p.name in _OWN_COLUMNS:
        documentation = _OWN_COLUMNS[p.name]
    else:
        documentation = " | ".join(f"{resource_type}.{path}" for path in p.paths)
        if p.type == "reference":
            documentation += f" (references to {', '.join(sorted(reference_targets(resource_type, p.name)))})"
    return {"name": p.name, "type": p.type, "documentation": documentation}


def _operation(op: JSON) -> JSON:
    return {"name": op["name"], "definition": op["definition"]}
