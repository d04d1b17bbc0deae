"""The FHIR R4 RESTful API under ``/fhir``: read, vread, create, update, patch, delete,
history and search (R4 http.html), in JSON and XML.

Each route declares the interaction it implements (:func:`_interaction`), and that table is
what the CapabilityStatement lists, so ``/fhir/metadata`` cannot claim what is not routed.
Handlers are thin: check the type, parse the body (:mod:`.negotiate`), validate
(:func:`~iop_fhir.formats.fhir_validate.require_valid`), call the store, answer. Every client
mistake is raised as an ``IopFhirError`` and answered by the one error handler.

Decisions, where R4 leaves a choice:

* the served resource types are the store's search table; another type is 404 ``not-supported``;
* ``POST`` ignores an id in the body (the server assigns ids); ``PUT`` needs one equal to the URL's;
* ``DELETE`` answers 204 (200 with an OperationOutcome under ``Prefer: return=OperationOutcome``),
  also when there was nothing to delete, as R4 allows;
* conditional writes match strictly: an unknown parameter in their criteria is a 400, never
  ignored, since ignoring it would widen what gets overwritten or deleted;
* JSON Patch: a failed ``test`` operation, or a path the resource does not have, is 422 (RFC 5789
  §2.2: the patch is understood but cannot be applied to this content); 412 stays for ``If-Match``.
  Patching ``id`` or ``resourceType`` (or the whole document) is 422 as well;
* reads serve the stored bytes for JSON as they are: no parse, no validation;
* under ``patient/`` scopes (:class:`~iop_fhir.api.auth.Confinement`) reads check the version
  they found, searches and conditional writes get the patient added to their criteria, and
  writes run in a unit of work that checks the version replaced and the version stored;
* for a recipient of a disclosure (:mod:`.disclosure`) every version that leaves goes through
  its consent decision: a withheld read is a 403 ``suppressed``, Bundles leave withheld entries
  out; every write runs in a unit of work that stores its AuditEvent with it, and AuditEvent
  itself is read-only (writes are 405).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import jsonpatch
import jsonpointer
from flask import Blueprint, Response, current_app, request
from werkzeug.http import http_date, parse_date

from iop_fhir.api import auth, capability, disclosure, search, store
from iop_fhir.api.capability import Interaction
from iop_fhir.api.negotiate import read_body, respond, response_format
from iop_fhir.errors import Gone, IopFhirError, Issue, NotFound, PreconditionFailed, UnsupportedFormat, operation_outcome
from iop_fhir.formats.fhir_validate import require_valid
from iop_fhir.privacy.audit import refuse_write
from iop_fhir.store import Saved, Store, UnitOfWork
from iop_fhir.store.search_index import PARAMETERS

JSON = dict[str, Any]

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

# What the routes below implement, in registration order (the CapabilityStatement reads it).
INTERACTIONS: list[Interaction] = []

ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ETAG = re.compile(r'\s*(?:W/)?"(\d+)"\s*')
JSON_PATCH = "application/json-patch+json"
FORM = "application/x-www-form-urlencoded"
PATCH_ATTEMPTS = 3  # a patch without If-Match retries when another write slips in between


class InvalidRequest(IopFhirError):
    """A request FHIR's HTTP rules refuse before any resource rule applies (id mismatch, bad header)."""

    status = 400
    issue_code = "invalid"


class UnknownResourceType(NotFound):
    """A resource type this API does not serve (R4: 404 for an unknown type)."""

    issue_code = "not-supported"


class PatchFailed(IopFhirError):
    """A well-formed JSON Patch that cannot be applied to this resource (failed test, missing path)."""

    status = 422
    issue_code = "processing"


View = Callable[..., Response]


def _interaction(rule: str, method: str, code: str, level: str, *, conditional: bool = False) -> Callable[[View], View]:
    """Route ``method rule`` to the view and record the interaction it implements."""

    def register(view: View) -> View:
        bp.add_url_rule(rule, view_func=view, methods=[method])
        INTERACTIONS.append(Interaction(code, level, conditional))
        return view

    return register


# --- request plumbing ----------------------------------------------------------------------------


def _served(resource_type: str) -> None:
    if resource_type not in PARAMETERS:
        message = f"resource type {resource_type!r} is not served here (GET /fhir/metadata lists the types)"
        raise UnknownResourceType(message, [Issue(message, code="not-supported")])


def _start(resource_type: str, *, writes: bool = False) -> str:
    """Check the type is served (and, for a write, writable) and settle the response format,
    before any work (a 404, 405 or 406 costs nothing)."""
    _served(resource_type)
    if writes:
        refuse_write(resource_type)
    return _response_format()


def _base_url() -> str:
    """Where this API lives, for fullUrl, Location and links: ``BASE_URL`` or the request's host + ``/fhir``."""
    configured = current_app.config.get("BASE_URL")
    if configured:
        return configured.rstrip("/")
    # request.host_url re-parses the environ each time (IRI decoding): memoise on what it reads
    environ = request.environ
    key = tuple(environ.get(k) for k in ("wsgi.url_scheme", "HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "SCRIPT_NAME"))
    return _memoised(_BASES, key, lambda: (request.host_url + "fhir").rstrip("/"))


def _response_format() -> str:
    """``response_format()`` memoised on what it reads (``_format``, Accept): reads are the hot path."""
    given = request.args.get("_format") if request.query_string else None
    return _memoised(_FORMATS, (given, request.headers.get("Accept")), response_format)


_BASES: dict[tuple[Any, ...], str] = {}
_FORMATS: dict[tuple[Any, ...], str] = {}


def _memoised(table: dict[tuple[Any, ...], str], key: tuple[Any, ...], compute: Callable[[], str]) -> str:
    found = table.get(key)
    if found is None:
        found = compute()  # errors (406) propagate and are not remembered
        if len(table) >= 256:  # the keys come from clients: keep the memo small
            table.clear()
        table[key] = found
    return found


def _prefer(name: str) -> str | None:
    """One preference of the ``Prefer`` header (RFC 7240): ``return``, ``handling``."""
    for token in re.split(r"[,;]", request.headers.get("Prefer", "")):
        key, _, value = token.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"')
    return None


def _strict() -> bool:
    return _prefer("handling") == "strict"


def _if_match() -> int | None:
    """The version ``If-Match`` names (``W/"3"``), or None; ``*`` asks nothing of the version."""
    value = request.headers.get("If-Match")
    if value is None or value.strip() == "*":
        return None
    m = _ETAG.fullmatch(value)
    if m is None:
        message = f'If-Match {value!r} is not a version ETag such as W/"3"'
        raise InvalidRequest(message, [Issue(message, location="If-Match")])
    return int(m.group(1))


def _stale(wanted: int, current: Saved) -> PreconditionFailed:
    message = f"If-Match names version {wanted}, but {current.reference} is at version {current.version}"
    return PreconditionFailed(message, [Issue(message, location="If-Match", code="conflict")])


def _check_id(resource_type: str, id: str) -> None:
    if not ID_PATTERN.fullmatch(id):
        message = f"{id!r} is not a FHIR id (1-64 of A-Z a-z 0-9 - .)"
        raise InvalidRequest(message, [Issue(message, location=f"{resource_type}.id", code="value")])


def _incoming(resource_type: str) -> JSON:
    """The request's resource, of the URL's type (400 otherwise)."""
    resource = read_body(max_bytes=current_app.config["MAX_BODY_BYTES"])
    found = resource.get("resourceType")
    if found != resource_type:
        message = f"the body is a {found}, but the URL is for {resource_type}"
        raise InvalidRequest(message, [Issue(message, location="resourceType", code="invalid")])
    return resource


def _criteria(resource_type: str, pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Search criteria of a conditional write (``pairs``, else the query); ``_format`` only says how to answer."""
    given = list(request.args.items(multi=True)) if pairs is None else pairs
    criteria = [(k, v) for k, v in given if k not in ("_format", "_pretty")]
    if not criteria:
        message = f"a conditional write to {resource_type} needs search criteria (e.g. ?identifier=system|value)"
        raise InvalidRequest(message, [Issue(message, code="required")])
    confined = auth.confinement()
    return criteria if confined is None else confined.criteria(resource_type, criteria)


def _shown(saved: Saved, interaction: str) -> Saved:
    """``saved``, once a read under ``patient/`` scopes may show it (403 otherwise)."""
    confined = auth.confinement()
    if confined is not None:
        confined.check(store(), saved, interaction)
    return saved


def _write(resource_type: str, interaction: str, write: Callable[[Store | UnitOfWork], Saved], id: str | None = None) -> Saved:
    """Run one write in a unit of work that also stores the request's AuditEvent. Under
    ``patient/`` scopes it checks what it replaced and what it stored (a refusal stores
    nothing); with ``id``, the resource there is checked first, so neither a 403 nor a 412
    tells anything of another patient's resource."""
    confined = auth.confinement()
    if confined is not None and not confined.covers(resource_type):
        confined = None
    with store().unit(all_or_nothing=True) as uow:
        if confined is not None and id is not None:
            confined.check(uow, _current(uow, resource_type, id), interaction)
        saved = write(uow)
        if confined is not None:
            confined.check(uow, saved, interaction)
        disclosure.audit_write(uow, saved)
    return saved


def _current(ops: Store | UnitOfWork, resource_type: str, id: str) -> Saved | None:
    try:
        return ops.read(resource_type, id)
    except (NotFound, Gone):
        return None


def _version_headers(saved: Saved) -> dict[str, str]:
    return {"ETag": saved.etag, "Last-Modified": http_date(saved.last_updated)}


def _not_modified(saved: Saved) -> bool:
    """``If-None-Match`` (an ETag list or ``*``) or, without it, ``If-Modified-Since`` (RFC 9110 §13.2.2)."""
    tags = request.headers.get("If-None-Match")
    if tags is not None:
        return any(tag.strip() in ("*", saved.etag, f'"{saved.version}"') for tag in tags.split(","))
    since = parse_date(request.headers.get("If-Modified-Since"))
    return since is not None and saved.last_updated.replace(microsecond=0) <= since


def _serve(saved: Saved, fmt: str) -> Response:
    """A stored version as a read answers it: what the client may see of it (the consent
    decision first, so a conditional read tells nothing of a withheld one), conditional,
    shaped when asked, else the bytes as stored."""
    saved = disclosure.shown(saved)
    disclosure.note(saved)
    headers = _version_headers(saved)
    if _not_modified(saved):
        return Response(status=304, headers=headers)
    shape = search.read_shaper(saved.resource_type, request.args) if request.query_string else None
    return respond(_body(saved) if shape is None else shape(saved.resource), 200, headers, fmt=fmt)


def _body(saved: Saved) -> JSON | bytes:
    """The stored bytes, or the released copy a recipient is shown instead."""
    return saved.data if saved.data is not None else saved.resource


def _information(message: str) -> JSON:
    return operation_outcome([Issue(message, severity="information", code="informational")])


def _written(saved: Saved, status: int, fmt: str) -> Response:
    """The answer to a write, as ``Prefer: return=`` asks (representation by default)."""
    headers = {**_version_headers(saved), "Location": f"{_base_url()}/{saved.location}"}
    mode = _prefer("return")
    if mode == "minimal":
        return respond(None, status, headers, fmt=fmt)
    if mode == "OperationOutcome":
        what = "created" if saved.created else "updated" if saved.changed else "unchanged"
        return respond(_information(f"{saved.reference} {what} (version {saved.version})"), status, headers, fmt=fmt)
    if not saved.changed:
        # not what the client just wrote: a conditional create's match, or the current version
        shown = disclosure.visible(saved)
        if shown is None:
            return respond(None, status, headers, fmt=fmt)
        saved = shown
    return respond(_body(saved), status, headers, fmt=fmt)


# --- read, vread ---------------------------------------------------------------------------------


@_interaction("/<resource_type>/<id>", "GET", "read", "instance", conditional=True)
def read(resource_type: str, id: str) -> Response:
    fmt = _start(resource_type)
    return _serve(_shown(store().read(resource_type, id), "read"), fmt)


@_interaction("/<resource_type>/<id>/_history/<vid>", "GET", "vread", "instance")
def vread(resource_type: str, id: str, vid: str) -> Response:
    fmt = _start(resource_type)
    if not vid.isdigit():
        raise NotFound(f"{resource_type}/{id} has no version {vid!r} (versions are numbers)")
    return _serve(_shown(store().vread(resource_type, id, int(vid)), "vread"), fmt)


# --- create, update, patch -----------------------------------------------------------------------


@_interaction("/<resource_type>", "POST", "create", "type", conditional=True)
def create(resource_type: str) -> Response:
    """POST: the server assigns the id (one in the body is ignored, R4 http.html#create);
    ``If-None-Exist`` makes it conditional (one match: 200 with it; several: 412)."""
    fmt = _start(resource_type, writes=True)
    resource = _incoming(resource_type)
    resource.pop("id", None)
    require_valid(resource)
    condition = request.headers.get("If-None-Exist", "").strip()
    criteria = _criteria(resource_type, _query_pairs(condition)) if condition else None
    saved = _write(resource_type, "create", lambda ops: ops.create(resource, if_none_exist=criteria))
    return _written(saved, 201 if saved.created else 200, fmt)


def _query_pairs(condition: str) -> list[tuple[str, str]]:
    return parse_qsl(condition.split("?", 1)[1] if "?" in condition else condition, keep_blank_values=True)


@_interaction("/<resource_type>/<id>", "PUT", "update", "instance")
def update(resource_type: str, id: str) -> Response:
    """PUT: a new version, or the resource created under the client's id (201)."""
    fmt = _start(resource_type, writes=True)
    _check_id(resource_type, id)
    resource = _incoming(resource_type)
    given = resource.get("id")
    if given != id:
        message = f"the body's id must be the URL's {id!r}" + (f", not {given!r}" if given is not None else "")
        code = "required" if given is None else "value"
        raise InvalidRequest(message, [Issue(message, location=f"{resource_type}.id", code=code)])
    require_valid(resource)
    wanted = _if_match()
    saved = _write(resource_type, "update", lambda ops: ops.update(resource_type, id, resource, if_match=wanted), id)
    return _written(saved, 201 if saved.created else 200, fmt)


@_interaction("/<resource_type>", "PUT", "update", "type", conditional=True)
def conditional_update(resource_type: str) -> Response:
    """``PUT Type?criteria``: update the one match, create when none matches, 412 when several do."""
    fmt = _start(resource_type, writes=True)
    criteria = _criteria(resource_type)
    resource = _incoming(resource_type)
    require_valid(resource)
    wanted = _if_match()
    saved = _write(resource_type, "update", lambda ops: ops.conditional_update(resource_type, criteria, resource, if_match=wanted))
    return _written(saved, 201 if saved.created else 200, fmt)


@_interaction("/<resource_type>/<id>", "PATCH", "patch", "instance")
def patch(resource_type: str, id: str) -> Response:
    """PATCH with a JSON Patch document; the patched resource is validated like any update.
    A recipient patches only what it may read (a ``test`` operation would otherwise probe a
    withheld resource)."""
    fmt = _start(resource_type, writes=True)
    operations = _json_patch_document()
    wanted = _if_match()
    for attempt in range(PATCH_ATTEMPTS):
        current = _shown(store().read(resource_type, id), "patch")
        disclosure.shown(current)
        if wanted is not None and current.version != wanted:
            raise _stale(wanted, current)
        patched = _apply_patch(current.resource, operations, resource_type, id)
        require_valid(patched)
        try:
            # the version just read: a write in between is a conflict, never silently overwritten
            version = current.version
            saved = _write(resource_type, "patch", lambda ops: ops.update(resource_type, id, patched, if_match=version))
        except PreconditionFailed:
            if wanted is not None or attempt == PATCH_ATTEMPTS - 1:
                raise
            continue
        return _written(saved, 200, fmt)
    raise AssertionError("unreachable")


def _json_patch_document() -> list[JSON]:
    """The request body as a JSON Patch (RFC 6902) document, numbers kept exact.

    Parsed here rather than in :mod:`.negotiate`, which reads FHIR resources only.
    """
    kind = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if kind != JSON_PATCH:
        raise UnsupportedFormat(f"PATCH takes {JSON_PATCH}, not {kind or 'no Content-Type'!r}")
    data = request.get_data(cache=True)
    try:
        document = json.loads(data.decode("utf-8"), parse_float=Decimal)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        message = f"the patch is not JSON: {exc}"
        raise InvalidRequest(message, [Issue(message, code="structure")]) from None
    if not isinstance(document, list) or not all(isinstance(op, dict) for op in document):
        message = "a JSON Patch is an array of operation objects"
        raise InvalidRequest(message, [Issue(message, code="structure")])
    return document


def _apply_patch(resource: JSON, operations: list[JSON], resource_type: str, id: str) -> JSON:
    """The resource with ``operations`` applied, one at a time so an error names its operation (``/2``)."""
    for index, op in enumerate(operations):
        for key in ("path", "from"):
            target = op.get(key)
            if op.get("op") != "test" and isinstance(target, str) and target.split("/")[:2] in _FIXED:
                message = f"operation {index} may not change {target or 'the whole resource'} (id and type are the URL's)"
                raise PatchFailed(message, [Issue(message, location=f"/{index}/{key}", code="business-rule")])
    document = resource
    for index, op in enumerate(operations):
        try:
            document = jsonpatch.JsonPatch([op]).apply(document, in_place=False)
        except jsonpatch.InvalidJsonPatch as exc:
            raise InvalidRequest(f"operation {index}: {exc}", [Issue(str(exc), location=f"/{index}", code="structure")]) from None
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            # a failed test (JsonPatchTestFailed), or a path this resource does not have
            raise PatchFailed(f"operation {index}: {exc}", [Issue(str(exc), location=f"/{index}")]) from None
    if not isinstance(document, dict) or document.get("resourceType") != resource_type or document.get("id") != id:
        message = "the patch changed the resource's id or type"
        raise PatchFailed(message, [Issue(message, code="business-rule")])
    return document


# JSON pointers (split on "/", first two parts) a patch may not write: the document, its id, its type.
_FIXED = ([""], ["", "id"], ["", "resourceType"])


# --- delete --------------------------------------------------------------------------------------


@_interaction("/<resource_type>/<id>", "DELETE", "delete", "instance")
def delete(resource_type: str, id: str) -> Response:
    fmt = _start(resource_type, writes=True)
    wanted = _if_match()
    confined = auth.confinement()
    try:
        with store().unit(all_or_nothing=True) as uow:
            current = uow.read(resource_type, id) if wanted is not None else None
            if confined is not None:
                confined.check(uow, current, "delete")  # before a 412 could tell its version
            if current is not None and current.version != wanted:
                raise _stale(wanted, current)
            saved = uow.delete(resource_type, id)
            if confined is not None:
                confined.check(uow, saved, "delete")
            disclosure.audit_write(uow, saved)
    except NotFound:
        if wanted is not None:
            raise
        saved = None  # nothing to delete: as good as deleted (R4 http.html#delete)
    return _deleted(saved, f"{resource_type}/{id}", fmt)


@_interaction("/<resource_type>", "DELETE", "delete", "type", conditional=True)
def conditional_delete(resource_type: str) -> Response:
    """``DELETE Type?criteria``: deletes the one match; several matches are 412 (``single``)."""
    fmt = _start(resource_type, writes=True)
    criteria = _criteria(resource_type)
    confined = auth.confinement()
    with store().unit(all_or_nothing=True) as uow:
        matches = uow.match_ids(resource_type, criteria)
        if len(matches) > 1:
            message = f"more than one {resource_type} matches; conditional delete removes one at a time"
            raise PreconditionFailed(message, [Issue(message, code="multiple-matches")])
        saved = uow.delete(resource_type, matches[0]) if matches else None
        if confined is not None:
            confined.check(uow, saved, "delete")
        if saved is not None:
            disclosure.audit_write(uow, saved)
    return _deleted(saved, saved.reference if saved else resource_type, fmt)


def _deleted(saved: Saved | None, what: str, fmt: str) -> Response:
    headers = {"ETag": saved.etag} if saved is not None else {}
    if _prefer("return") == "OperationOutcome":
        done = f"{what} deleted" if saved is not None else f"{what}: nothing to delete"
        return respond(_information(done), 200, headers, fmt=fmt)
    return respond(None, 204, headers, fmt=fmt)


# --- history and search --------------------------------------------------------------------------


def _history(resource_type: str | None, id: str | None) -> Response:
    fmt = _response_format()
    settings = current_app.config
    confined = auth.confinement()  # only instance history can be confined (api.auth)
    disclosure.require_program(resource_type)
    st = store()
    bundle = search.history_bundle(
        resource_type,
        id,
        list(request.args.items(multi=True)),
        base=_base_url(),
        fmt=fmt,
        strict=_strict(),
        default_count=settings["DEFAULT_COUNT"],
        max_count=settings["MAX_COUNT"],
        keep=None if confined is None else lambda saved: confined.shows(st, saved),
        release=disclosure.gatekeeper(),
        seen=lambda found: disclosure.note(*found, listed=False),
    )
    return respond(bundle, fmt=fmt)


@_interaction("/<resource_type>/<id>/_history", "GET", "history-instance", "instance")
def history_instance(resource_type: str, id: str) -> Response:
    _served(resource_type)
    return _history(resource_type, id)


@_interaction("/<resource_type>/_history", "GET", "history-type", "type")
def history_type(resource_type: str) -> Response:
    _served(resource_type)
    return _history(resource_type, None)


@_interaction("/_history", "GET", "history-system", "system")
def history_system() -> Response:
    return _history(None, None)


def _search(resource_type: str, pairs: list[tuple[str, str]]) -> Response:
    fmt = _start(resource_type)
    settings = current_app.config
    parsed = search.SearchRequest.parse(
        resource_type, pairs, strict=_strict(), default_count=settings["DEFAULT_COUNT"], max_count=settings["MAX_COUNT"]
    )
    confined = auth.confinement()
    if confined is not None:  # the patient is added to the criteria, never to the links
        parsed.criteria = confined.criteria(resource_type, parsed.criteria)
    disclosure.require_program(resource_type)
    st = store()
    keep = None if confined is None else lambda saved: confined.shows(st, saved, included=True)
    bundle = search.search_bundle(
        parsed,
        base=_base_url(),
        fmt=fmt,
        max_count=settings["MAX_COUNT"],
        keep=keep,
        release=disclosure.gatekeeper(),
        seen=lambda found: disclosure.note(*found, listed=False, current=True),
    )
    return respond(bundle, fmt=fmt)


@_interaction("/<resource_type>", "GET", "search-type", "type")
def search_type(resource_type: str) -> Response:
    return _search(resource_type, list(request.args.items(multi=True)))


@_interaction("/<resource_type>/_search", "POST", "search-type", "type")
def search_post(resource_type: str) -> Response:
    """``POST Type/_search``: the parameters in a form body (and the query string)."""
    kind = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if request.content_length and kind != FORM:
        raise UnsupportedFormat(f"POST _search takes {FORM}, not {kind or 'no Content-Type'!r}")
    return _search(resource_type, list(request.args.items(multi=True)) + list(request.form.items(multi=True)))


# --- capabilities --------------------------------------------------------------------------------


@bp.get("/metadata")
def metadata() -> Response:
    fmt = _response_format()
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    return respond(capability.capability_statement(app, _base_url(), INTERACTIONS), fmt=fmt)
