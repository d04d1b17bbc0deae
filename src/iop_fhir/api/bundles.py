"""Batch and transaction Bundles: ``POST /fhir`` (FHIR R4 http.html#transaction).

A **transaction** is all or nothing. Every entry is checked before anything is written (its
request, its URL, its resource valid per :mod:`~iop_fhir.formats.fhir_validate`, its
``urn:`` references naming entries of the Bundle); then all entries run in one
``store().unit()``. The first entry that fails fails the request with its own status (400,
404, 409, 412, 422...) and issues located at ``Bundle.entry[i]...``; the unit rolls back, so
nothing is stored. A **batch** runs each entry in its own unit: an entry that fails leaves
the others alone and answers with its status and an OperationOutcome (``response.outcome``).
Any other ``Bundle.type`` is a 400.

Processing follows R4 http.html#trules: DELETE entries, then POST, then PUT and PATCH, then
GET and HEAD; the response lists the entries in request order. Before the first write every
entry's target id is fixed:

* POST: a new id, or with ``ifNoneExist`` the one resource that matches (nothing is written;
  the entry answers ``200 OK``); several matches are a 412.
* PUT ``Type/id``: that id. Conditional PUT ``Type?criteria``: the one match, else the
  resource's own id (create-on-update), else a new id; several matches are a 412.
* PATCH and DELETE: the id in the URL, or the one match of their criteria.

Then every reference naming an entry's ``fullUrl`` (``urn:uuid:``, ``urn:oid:`` or an
absolute URL) is rewritten to ``Type/id``, in every entry, and a conditional reference
(``Patient?identifier=sys|val``) to its one match. A ``urn:`` reference that names no entry
the Bundle writes is a 400. A resource id that only repeats its ``urn:uuid:`` fullUrl is a
placeholder and gives way to the matched id, so a record Bundle re-posted against resources
an EHR created under other ids updates those resources. Two entries changing one resource is a
400. In a batch entries are independent, so ``urn:`` references there are errors too.

Requests: POST, PUT (conditional too), DELETE (conditional too: none matching is a quiet
``204``, several a 412; deleting an unknown id is a ``204`` as R4 http.html#delete allows),
PATCH with a JSON Patch (entry.resource a Binary of ``application/json-patch+json``), and
GET / HEAD of ``Type/id``, ``Type/id/_history/v`` and searches ``Type?params`` (with
``_count``, ``_sort``, ``_total`` and ``_cursor``; no ``_include`` inside a Bundle).
``ifMatch`` is honoured on PUT, PATCH and DELETE. ``Prefer: return=minimal |
representation | OperationOutcome`` (default representation) decides whether write entries
carry the resource or an OperationOutcome.

Under ``patient/`` scopes each entry is confined on its own (``Options.confined``, see
:class:`~iop_fhir.api.auth.Confinement`): its search and conditional criteria get the patient
added, what it reads and writes must lie in the patient's compartment (checked after the
entry's write, inside its unit of work), and a refusal is the entry's 403: the whole
transaction's, or that batch entry's.

For a recipient of a disclosure (``Options.release``, see :mod:`.disclosure`) what the
response carries of stored data goes through its consent decision: a GET entry's resource (a
withheld one is the entry's 403 ``suppressed``), a search entry's page, and the representation
of a write that is not what the client sent (a conditional create's match, an unchanged
update; withheld: the entry carries no resource). A PATCH entry needs a resource the recipient
may read. Writes to AuditEvent are 405. A transaction's AuditEvent commits with it.

The processor (:func:`check_transaction`, :func:`apply_transaction`, :func:`run_batch`) knows
no Flask: ``/iop/records`` stores its record Bundles through the same functions.
"""

from __future__ import annotations

import base64
import binascii
import http
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jsonpatch
import orjson
from flask import Blueprint, Response, current_app, request

from iop_fhir.api import auth, disclosure, store
from iop_fhir.api.negotiate import read_body, respond
from iop_fhir.api.search import Release, mark_released
from iop_fhir.errors import (
    ConsentDenied,
    Gone,
    IopFhirError,
    Issue,
    NotFound,
    PreconditionFailed,
    RecordInvalid,
    VersionConflict,
    operation_outcome,
)
from iop_fhir.formats import fhir_validate
from iop_fhir.privacy.audit import READ_ONLY_TYPES, refuse_write
from iop_fhir.store import Saved, Store, UnitOfWork, instant
from iop_fhir.store.resources import ID_PATTERN
from iop_fhir.store.search_index import InvalidSearch

JSON = dict[str, Any]
Ops = Store | UnitOfWork

bp = Blueprint("bundles", __name__, url_prefix="/fhir")

# R4 http.html#trules: the order entries are processed in (the response keeps request order).
ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
READS = frozenset({"GET", "HEAD"})
# Search result parameters a GET entry may carry; the rest are search criteria for the store.
_RESULT_PARAMS = frozenset({"_count", "_sort", "_total", "_cursor", "_format", "_pretty"})
_JSON_PATCH = frozenset({"application/json-patch+json", "application/json"})
_ETAG = re.compile(r'(?:W/)?"?(\d+)"?')
_CONDITIONAL_REFERENCE = re.compile(r"[A-Z][A-Za-z]*\?.+")
_INTERACTIONS = {"DELETE": "delete", "POST": "create", "PUT": "update", "PATCH": "patch", "GET": "read", "HEAD": "read"}


class InvalidBundle(IopFhirError):
    """A Bundle or entry the server cannot process as asked: wrong type, bad request, bad URL."""

    status = 400
    issue_code = "invalid"


class EntryFailed(IopFhirError):
    """An entry's error re-told at the entry: same status, issues located at ``Bundle.entry[i]``."""

    def __init__(self, cause: IopFhirError, index: int, issues: list[Issue]) -> None:
        super().__init__(f"Bundle.entry[{index}]: {cause.message}", issues)
        self.status = cause.status
        self.issue_code = cause.issue_code
        self.headers = dict(getattr(cause, "headers", None) or {})


@dataclass(frozen=True)
class Options:
    """What the processor needs from the request and the settings.

    :param base: the FHIR base URL (``https://host/fhir``) for ``fullUrl`` and links; absolute
        request URLs under it are accepted.
    :param prefer: ``Prefer: return=`` (minimal, representation, OperationOutcome).
    :param confined: the entries only ``patient/`` scopes allow, by ``Bundle.entry[i]``.
    :param release: the recipient's consent decision on what the response shows; None for
        the program itself.
    """

    base: str = ""
    default_count: int = 20
    max_count: int = 500
    prefer: str = "representation"
    confined: Mapping[str, auth.Confinement] = field(default_factory=dict)
    release: Release | None = None


@dataclass
class Entry:
    """One request entry, checked; resolution fills ``id`` (the target) and ``matched``."""

    index: int
    method: str
    url: str
    resource_type: str
    id: str | None = None
    version: int | None = None
    query: list[tuple[str, str]] | None = None  # conditional criteria or search parameters
    resource: JSON | None = None
    full_url: str | None = None
    if_none_exist: list[tuple[str, str]] | None = None
    if_match: int | None = None
    patch: list[Any] | None = None
    matched: bool = False  # a conditional write found its one match
    confinement: auth.Confinement | None = None  # set by _confine() under patient/ scopes

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"

    @property
    def conditional(self) -> bool:
        return self.query is not None and self.method in ("PUT", "PATCH", "DELETE")


@dataclass
class EntryResult:
    """What one entry did: the status, the version it wrote or read, or why it failed."""

    index: int
    method: str
    status: int
    saved: Saved | None = None
    resource: JSON | None = None  # a GET search's searchset Bundle
    issues: list[Issue] = field(default_factory=list)
    withheld: bool = False  # the representation is withheld from the recipient

    @property
    def outcome(self) -> str:
        """``created``, ``updated``, ``unchanged``, ``deleted`` or ``failed`` (for API clients)."""
        if self.issues:
            return "failed"
        if self.saved is None or self.saved.deleted:
            return "deleted" if self.method == "DELETE" else "unchanged"
        if self.saved.created:
            return "created"
        return "updated" if self.saved.changed else "unchanged"


# --- the routes -------------------------------------------------------------------------------


@bp.post("")
@bp.post("/")
def system_bundle() -> Response:
    """``POST [base]``: a batch or transaction Bundle; answers its -response Bundle."""
    bundle = read_body()
    kind = bundle_kind(bundle)
    disclosure.note_interaction(kind)
    opts = request_options()
    if kind == "transaction":
        entries = check_transaction(bundle, opts.base)
        with store().unit(all_or_nothing=True) as uow:  # any failed entry fails the request
            results = apply_transaction(uow, entries, opts)
            disclosure.audit_write(uow, *(r.saved for r in results if r.saved is not None))
    else:
        results = run_batch(store(), bundle, opts)
        disclosure.note(*(r.saved for r in results if r.saved is not None))
    return respond(response_bundle(kind, results, opts))


def fhir_base() -> str:
    """The FHIR base URL: ``BASE_URL`` from the settings (``/fhir`` added unless it ends so),
    else this request's root + ``/fhir``."""
    configured = current_app.config.get("BASE_URL")
    base = str(configured).rstrip("/") if configured else request.url_root.rstrip("/")
    return base if base.endswith("/fhir") else base + "/fhir"


def prefer(name: str) -> str | None:
    """One preference of the ``Prefer`` header (RFC 7240): ``prefer("return")`` -> ``minimal``."""
    for token in re.split(r"[,;]", request.headers.get("Prefer", "")):
        key, _, value = token.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"') or None
    return None


def request_options() -> Options:
    wanted = prefer("return")
    chosen = {"minimal": "minimal", "operationoutcome": "OperationOutcome"}.get((wanted or "").lower(), "representation")
    config = current_app.config
    return Options(fhir_base(), config["DEFAULT_COUNT"], config["MAX_COUNT"], chosen, auth.confinements(), disclosure.gatekeeper())


# --- checking ---------------------------------------------------------------------------------


def bundle_kind(bundle: JSON) -> str:
    """``batch`` or ``transaction``; anything else posted to the base is a 400."""
    if bundle.get("resourceType") != "Bundle":
        message = f"the base accepts a batch or transaction Bundle, not {bundle.get('resourceType')}"
        raise InvalidBundle(message, [Issue(message, "resourceType", code="not-supported")])
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        message = f"Bundle.type {kind!r} cannot be processed; post a batch or a transaction"
        raise InvalidBundle(message, [Issue(message, "Bundle.type", code="not-supported")])
    return str(kind)


def check_transaction(bundle: JSON, base: str = "") -> list[Entry]:
    """Every entry of a transaction checked at once; raise with all the problems found.

    :raises InvalidBundle: 400 when a request, URL, reference or the Bundle itself is wrong.
    :raises RecordInvalid: 422 when the requests are fine but resources are invalid.
    """
    raw_entries, problems = _bundle_entries(bundle)
    full_urls = _written_full_urls(raw_entries)
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_entries):
        url = raw.get("fullUrl") if isinstance(raw, dict) else None
        if isinstance(url, str) and url in seen:
            problems.append(Issue(f"fullUrl {url} is also entry {seen[url]}'s", f"Bundle.entry[{index}].fullUrl", code="duplicate"))
        elif isinstance(url, str):
            seen[url] = index
    entries: list[Entry] = []
    invalid: list[Issue] = []
    for index, raw in enumerate(raw_entries):
        try:
            entries.append(check_entry(index, raw, base, full_urls, problems_for(problems, index)))
        except RecordInvalid as exc:
            invalid.extend(exc.issues)
        except InvalidBundle as exc:
            problems.extend(i for i in exc.issues if i not in problems)  # the shell's are there already
    if problems:
        issues = problems + invalid
        raise InvalidBundle(f"the transaction cannot be processed: {len(issues)} problem(s)", issues)
    if invalid:
        raise RecordInvalid(f"the transaction holds invalid resources: {len(invalid)} problem(s)", invalid)
    return entries


def problems_for(problems: list[Issue], index: int) -> list[Issue]:
    """The Bundle-level problems located in entry ``index`` (from validating the Bundle's shell)."""
    prefix = f"Bundle.entry[{index}]"
    return [i for i in problems if i.location == prefix or i.location.startswith((prefix + ".", prefix + "["))]


def _bundle_entries(bundle: JSON) -> tuple[list[Any], list[Issue]]:
    """The raw entries and the problems of the Bundle without its entries' resources.

    The shell goes through the validator, so unknown elements and bad codes in ``entry``
    and ``entry.request`` are found with their locations (the resources are checked one by
    one later, so that a batch can answer per entry).
    """
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        return [], [Issue("Bundle.entry must be a list", "Bundle.entry", code="structure")]
    shell = {**bundle, "entry": [{k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e for e in entries]}
    if not entries:
        shell.pop("entry")
    issues = [i for i in fhir_validate.validate_resource(shell) if i.severity in ("error", "fatal")]
    return entries, issues


def _written_full_urls(raw_entries: list[Any]) -> set[str]:
    """The fullUrls of entries that write a resource (what references may name)."""
    out = set()
    for raw in raw_entries:
        if isinstance(raw, dict) and isinstance(raw.get("fullUrl"), str):
            method = (raw.get("request") or {}).get("method") if isinstance(raw.get("request"), dict) else None
            if method in ("POST", "PUT", "PATCH"):
                out.add(raw["fullUrl"])
    return out


def check_entry(index: int, raw: Any, base: str, full_urls: set[str], found: list[Issue] | None = None) -> Entry:
    """One entry parsed and checked.

    :param full_urls: fullUrls of the Bundle's write entries (empty in a batch): a ``urn:``
        reference naming anything else is an error.
    :param found: problems already located in this entry (from the Bundle's shell).
    :raises InvalidBundle: the request is wrong (400), with every problem of the entry.
    :raises RecordInvalid: the request is fine, the resource invalid (422).
    """
    where = f"Bundle.entry[{index}]"
    problems: list[Issue] = list(found or ())
    if not isinstance(raw, dict):
        raise InvalidBundle(f"{where} is not an object", [*problems, Issue("an entry is a JSON object", where, code="structure")])
    req = raw.get("request")
    if not isinstance(req, dict):
        message = "entry.request is required in a batch or transaction"
        raise InvalidBundle(message, [*problems, Issue(message, f"{where}.request", code="required")])
    method, url = req.get("method"), req.get("url")
    if method not in ORDER and not any(i.location == f"{where}.request.method" for i in problems):
        problems.append(Issue(f"request.method {method!r} is not one of {', '.join(ORDER)}", f"{where}.request.method", code="value"))
    if not isinstance(url, str) or not url.strip():
        problems.append(Issue("request.url is required", f"{where}.request.url", code="required"))
    if problems:
        raise InvalidBundle(f"{where}: {problems[0].message}", problems)
    entry = Entry(index, str(method), str(url), "")
    _parse_url(entry, base, problems)
    if entry.method not in READS:
        refuse_write(entry.resource_type, f"{where}.request.url")  # 405: the audit trail is read-only
    _parse_conditions(entry, req, problems)
    full_url = raw.get("fullUrl")
    entry.full_url = full_url if isinstance(full_url, str) else None
    resource = raw.get("resource")
    invalid: list[Issue] = []
    if entry.method in ("POST", "PUT", "PATCH"):
        if not isinstance(resource, dict):
            problems.append(Issue(f"a {entry.method} entry needs a resource", f"{where}.resource", code="required"))
        elif entry.method == "PATCH":
            entry.patch = _json_patch(resource, where, problems)
        else:
            entry.resource = resource
            if resource.get("resourceType") != entry.resource_type and entry.resource_type:
                message = f"resourceType {resource.get('resourceType')} does not match the URL's {entry.resource_type}"
                problems.append(Issue(message, f"{where}.resource.resourceType", code="value"))
            else:
                invalid = located(fhir_validate.validate_resource(resource), f"{where}.resource", resource)
            problems.extend(_unknown_urns(resource, f"{where}.resource", full_urls))
    if problems:
        raise InvalidBundle(f"{where}: {problems[0].message}", problems + invalid)
    if invalid:
        raise RecordInvalid(f"{where}: invalid {entry.resource_type}: {invalid[0]}", invalid)
    return entry


def _parse_url(entry: Entry, base: str, problems: list[Issue]) -> None:
    """Fill type, id, version and query from ``request.url``; note what does not fit the method."""
    where = f"{entry.where}.request.url"
    path, mark, query = entry.url.partition("?")
    if "://" in path:
        if base and path.startswith(base + "/"):
            path = path[len(base) + 1 :]
        else:
            problems.append(Issue(f"{entry.url} is not a URL of this server ({base or 'relative URLs only'})", where, code="not-supported"))
            return
    parts = path.strip("/").split("/")
    entry.resource_type = parts[0]
    if not fhir_validate.is_r4_resource_type(parts[0]):
        problems.append(Issue(f"{parts[0]!r} is not an R4 resource type this server knows", where, code="not-supported"))
        return
    entry.query = parse_qsl(query, keep_blank_values=True) if mark else None
    shape = len(parts)
    if shape == 4 and parts[2] == "_history" and parts[3].isdigit():
        entry.id, entry.version = parts[1], int(parts[3])
    elif shape == 2:
        entry.id = parts[1]
    elif shape != 1:
        problems.append(Issue(f"{entry.url} is not a URL a Bundle entry can use", where, code="not-supported"))
        return
    reads = entry.method in READS
    if entry.version is not None and not reads:
        problems.append(Issue(f"{entry.method} cannot target a version", where, code="not-supported"))
    elif entry.method == "POST" and (shape != 1 or entry.query is not None):
        problems.append(Issue("POST entries name only the type (conditions go in ifNoneExist)", where, code="value"))
    elif not reads and entry.method != "POST":
        if shape == 1 and not entry.query:
            problems.append(Issue(f"{entry.method} needs Type/id or Type?criteria", where, code="value"))
        elif shape == 2 and entry.query:
            problems.append(Issue(f"{entry.method} takes Type/id or Type?criteria, not both", where, code="value"))
    if entry.id is not None and not ID_PATTERN.fullmatch(entry.id):
        problems.append(Issue(f"{entry.id!r} is not a FHIR id", where, code="value"))


def _parse_conditions(entry: Entry, req: JSON, problems: list[Issue]) -> None:
    where = f"{entry.where}.request"
    if_none_exist = req.get("ifNoneExist")
    if if_none_exist is not None:
        criteria = parse_qsl(str(if_none_exist).split("?", 1)[-1], keep_blank_values=True)
        if entry.method != "POST" or not criteria:
            problems.append(Issue("ifNoneExist needs a POST and search criteria", f"{where}.ifNoneExist", code="value"))
        entry.if_none_exist = criteria
    if_match = req.get("ifMatch")
    if if_match is not None:
        version = _ETAG.fullmatch(str(if_match).strip())
        if version is None or entry.method not in ("PUT", "PATCH", "DELETE"):
            problems.append(Issue(f"ifMatch {if_match!r} is not W/\"version\" on a PUT, PATCH or DELETE", f"{where}.ifMatch", code="value"))
        else:
            entry.if_match = int(version.group(1))


def _json_patch(resource: JSON, where: str, problems: list[Issue]) -> list[Any] | None:
    """The JSON Patch document a PATCH entry carries as a Binary (R4 http.html#patch)."""
    if resource.get("resourceType") != "Binary" or resource.get("contentType") not in _JSON_PATCH:
        problems.append(Issue("a PATCH entry carries a Binary of application/json-patch+json (FHIRPath Patch is not supported)", f"{where}.resource", code="not-supported"))
        return None
    try:
        document = orjson.loads(base64.b64decode(str(resource.get("data", "")), validate=True))
    except (binascii.Error, ValueError):
        document = None
    if not isinstance(document, list) or not all(isinstance(op, dict) for op in document):
        problems.append(Issue("Binary.data is not a base64 JSON Patch array", f"{where}.resource.data", code="structure"))
        return None
    return document


def located(issues: list[Issue], prefix: str, resource: Any) -> list[Issue]:
    """Issues of a resource relocated under ``prefix`` (``Patient.gender`` ->
    ``Bundle.entry[2].resource.gender``); warnings and information are left out."""
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    out = []
    for issue in issues:
        if issue.severity not in ("error", "fatal"):
            continue
        loc = issue.location
        loc = _under(loc, rtype, prefix) or (f"{prefix}.{loc}" if loc else prefix)
        out.append(Issue(issue.message, loc, issue.severity, issue.code))
    return out


def _under(location: str, resource_type: Any, prefix: str) -> str | None:
    """``Patient.gender`` -> ``{prefix}.gender`` when the location is inside ``resource_type``, else None."""
    if isinstance(resource_type, str) and resource_type and (location == resource_type or location.startswith((resource_type + ".", resource_type + "["))):
        return prefix + location[len(resource_type) :]
    return None


def references(value: Any, path: str = "") -> Iterator[tuple[JSON, str]]:
    """Every Reference (a dict with a string ``reference``) inside ``value``, with its path."""
    if isinstance(value, dict):
        if isinstance(value.get("reference"), str):
            yield value, f"{path}.reference"
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                yield from references(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (dict, list)):
                yield from references(item, f"{path}[{i}]")


def reference_elements(value: Any) -> list[JSON]:
    """The References of :func:`references` in the same order, without their paths.

    Why a second walker: a transaction walks every entry's resource twice (checking its
    ``urn:`` references, rewriting them), and building a path for every node costs more than
    the walk; a path is wanted only for an error (:func:`_path_of`).
    """
    found: list[JSON] = []
    _collect_references(value, found)
    return found


def _collect_references(value: Any, found: list[JSON]) -> None:
    if isinstance(value, dict):
        if isinstance(value.get("reference"), str):
            found.append(value)
        items: Iterable[Any] = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return
    for item in items:
        if isinstance(item, (dict, list)):
            _collect_references(item, found)


def _path_of(resource: JSON, element: JSON, prefix: str) -> str:
    """The path :func:`references` gives ``element`` (a Reference inside ``resource``)."""
    return next(path for ref, path in references(resource, prefix) if ref is element)


def _unknown_urn(text: str, full_urls: set[str]) -> bool:
    return text.startswith(("urn:uuid:", "urn:oid:")) and text not in full_urls


def _unknown_urns(resource: JSON, prefix: str, full_urls: set[str]) -> list[Issue]:
    if not any(_unknown_urn(ref["reference"], full_urls) for ref in reference_elements(resource)):
        return []  # the common case: no path is built
    return [
        Issue(f"{ref['reference']} names no entry this Bundle writes", path, code="not-found")
        for ref, path in references(resource, prefix)
        if _unknown_urn(ref["reference"], full_urls)
    ]


# --- resolving --------------------------------------------------------------------------------


def _ordered(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (ORDER[e.method], e.index))


def resolve(ops: Ops, entries: list[Entry]) -> dict[str, str]:
    """Fix every write's target id (see the module doc); return ``fullUrl -> Type/id``.

    :raises PreconditionFailed: a condition matches several resources.
    :raises InvalidBundle: two entries change one resource, or an id contradicts its match.
    """
    targets: dict[str, str] = {}
    changed: dict[tuple[str, str], int] = {}
    for e in _ordered(entries):
        if e.method in READS:
            continue
        if e.method == "POST":
            match = _one_match(ops, e, e.if_none_exist, "request.ifNoneExist") if e.if_none_exist else None
            e.matched = match is not None
            e.id = match or str(uuid.uuid4())
        elif e.conditional:
            match = _one_match(ops, e, e.query or [], "request.url")
            e.matched = match is not None
            given = e.resource.get("id") if e.resource else None
            if match is None and e.method == "PATCH":
                raise _at(NotFound(f"no {e.resource_type} matches {e.url}"), e, "request.url")
            e.id = match or (given if isinstance(given, str) and e.method == "PUT" else None)
            if e.id is None and e.method == "PUT":
                e.id = str(uuid.uuid4())
        if e.method == "PUT" and e.resource is not None:
            _settle_id(e)
        if e.id is None:
            continue  # a conditional DELETE that matched nothing
        key = (e.resource_type, e.id)
        if key in changed:
            message = f"entries {changed[key]} and {e.index} both change {e.resource_type}/{e.id}"
            raise InvalidBundle(message, [Issue(message, f"{e.where}.request.url", code="duplicate")])
        changed[key] = e.index
        if e.full_url and e.method != "DELETE":
            targets[e.full_url] = f"{e.resource_type}/{e.id}"
    return targets


def _settle_id(e: Entry) -> None:
    """Give a PUT's resource the target id; a differing id is an error unless it only repeats
    the entry's ``urn:uuid:`` fullUrl (a placeholder)."""
    assert e.resource is not None
    given = e.resource.get("id")
    placeholder = bool(e.full_url and e.full_url.startswith("urn:") and given and e.full_url.endswith(":" + str(given)))
    if given is not None and given != e.id and not placeholder:
        message = f"the resource's id {given!r} is not {e.resource_type}/{e.id}, which the request targets"
        raise InvalidBundle(message, [Issue(message, f"{e.where}.resource.id", code="value")])
    e.resource = {**e.resource, "id": e.id}


def _one_match(ops: Ops, e: Entry, criteria: list[tuple[str, str]], where: str) -> str | None:
    """The id of the one live resource matching ``criteria``, or None; several are a 412."""
    try:
        found = ops.match_ids(e.resource_type, criteria)
    except IopFhirError as exc:
        raise _at(exc, e, where) from None
    if len(found) > 1:
        raise _at(PreconditionFailed(f"more than one {e.resource_type} matches {urlencode(criteria)}"), e, where, "multiple-matches")
    return found[0] if found else None


def rewrite_references(ops: Ops, e: Entry, targets: dict[str, str], resolved: dict[str, str] | None = None) -> None:
    """Point the entry's references at what the Bundle's fullUrls resolved to; resolve
    conditional references (``Type?criteria``) to their one match.

    :param resolved: conditional references already resolved in this transaction (all are
        resolved before any entry runs, so one answer holds for every entry; a delivery Bundle
        names its patient in most entries).
    """
    if e.resource is None:
        return
    cache = resolved if resolved is not None and e.confinement is None else {}
    resource, prefix = e.resource, e.where + ".resource"
    for ref in reference_elements(resource):
        text = ref["reference"]
        if text in targets:
            ref["reference"] = targets[text]
        elif text in cache:
            ref["reference"] = cache[text]
        elif text.startswith(("urn:uuid:", "urn:oid:")):
            message = f"{text} names an entry that writes no resource"
            raise InvalidBundle(message, [Issue(message, _path_of(resource, ref, prefix), code="not-found")])
        elif _CONDITIONAL_REFERENCE.fullmatch(text):
            rtype, _, query = text.partition("?")
            criteria = parse_qsl(query, keep_blank_values=True)
            try:
                if e.confinement is not None:  # a search no scope was asked about: confined whatever its type
                    criteria = e.confinement.criteria(rtype, criteria, every_type=True)
                found = ops.match_ids(rtype, criteria)
            except IopFhirError as exc:
                path = _path_of(resource, ref, prefix)
                raise EntryFailed(exc, e.index, [Issue(f"{text}: {i.message}", path, i.severity, i.code) for i in exc.issues]) from None
            if len(found) != 1:
                path = _path_of(resource, ref, prefix)
                message = f"the conditional reference {text} matches {len(found) or 'no'}{'+' if len(found) > 1 else ''} resources; it must match one"
                error = PreconditionFailed if found else InvalidBundle
                raise error(message, [Issue(message, path, code="multiple-matches" if found else "not-found")])
            ref["reference"] = cache[text] = f"{rtype}/{found[0]}"


# --- running ----------------------------------------------------------------------------------


def _confine(e: Entry, opts: Options) -> None:
    """Confine an entry that only ``patient/`` scopes allow: its criteria (conditional match,
    ``ifNoneExist``, search) reach only the patient's compartment; :func:`execute` checks the rest."""
    confinement = opts.confined.get(e.where)
    if confinement is None:
        return
    e.confinement = confinement
    if e.query is not None:
        e.query = confinement.criteria(e.resource_type, e.query)
    if e.if_none_exist is not None:
        e.if_none_exist = confinement.criteria(e.resource_type, e.if_none_exist)


def apply_transaction(uow: UnitOfWork, entries: list[Entry], opts: Options) -> list[EntryResult]:
    """Run checked transaction entries in ``uow`` (all or nothing: any error propagates,
    located at its entry, and the caller's unit rolls back). Results in request order."""
    for e in entries:
        _confine(e, opts)
    targets = resolve(uow, entries)
    resolved: dict[str, str] = {}
    for e in entries:
        rewrite_references(uow, e, targets, resolved)
    results = {e.index: execute(uow, e, opts) for e in _ordered(entries)}
    return [results[i] for i in sorted(results)]


def run_batch(st: Store, bundle: JSON, opts: Options) -> list[EntryResult]:
    """Each entry on its own (writes in their own unit of work); failures answer per entry."""
    raw_entries, problems = _bundle_entries(bundle)
    located_elsewhere = [i for i in problems if not i.location.startswith("Bundle.entry[")]
    if located_elsewhere:
        raise InvalidBundle(f"the batch cannot be processed: {located_elsewhere[0].message}", located_elsewhere)
    results: dict[int, EntryResult] = {}
    entries: list[Entry] = []
    for index, raw in enumerate(raw_entries):
        try:
            entries.append(check_entry(index, raw, opts.base, set(), problems_for(problems, index)))
            _confine(entries[-1], opts)
        except IopFhirError as exc:
            method = raw.get("request", {}).get("method") if isinstance(raw, dict) and isinstance(raw.get("request"), dict) else None
            results[index] = EntryResult(index, str(method or ""), exc.status, issues=exc.issues)
    for e in _ordered(entries):
        try:
            if e.method in READS:
                results[e.index] = execute(st, e, opts)
            else:
                with st.unit(all_or_nothing=True) as uow:
                    resolve(uow, [e])
                    rewrite_references(uow, e, {})
                    results[e.index] = execute(uow, e, opts)
        except IopFhirError as exc:
            results[e.index] = EntryResult(e.index, e.method, exc.status, issues=_at(exc, e, "request").issues)
    return [results[i] for i in sorted(results)]


def execute(ops: Ops, e: Entry, opts: Options) -> EntryResult:
    """Carry out one resolved entry; errors come out located at the entry."""
    try:
        if e.confinement is not None and e.method in ("PUT", "PATCH", "DELETE") and e.id is not None:
            # before a 412 or a patch's failed test could tell anything of another patient's resource
            e.confinement.check(ops, _existing(ops, e), _INTERACTIONS[e.method])
        if e.method == "DELETE":
            result = _delete(ops, e)
        elif e.method == "POST":
            result = _create(ops, e)
        elif e.method == "PUT":
            result = _update(ops, e)
        elif e.method == "PATCH":
            if opts.release is not None and (current := _existing(ops, e)) is not None:
                _screened(current, opts)  # a patch's test operations would probe what it may not read
            result = _patch(ops, e)
        else:
            result = _read(ops, e, opts)
        if e.confinement is not None:
            e.confinement.check(ops, result.saved, _INTERACTIONS[e.method] if e.version is None else "vread")
        if opts.release is not None and result.saved is not None and not result.saved.deleted:
            if e.method in READS:
                result.saved = _screened(result.saved, opts)
            elif e.method in ("POST", "PUT") and not result.saved.changed:
                # the representation is not what the client sent: a conditional create's match, an unchanged version
                shown = opts.release.screen([result.saved])
                result.saved, result.withheld = (shown[0], False) if shown else (result.saved, True)
        return result
    except EntryFailed:
        raise
    except IopFhirError as exc:
        stale = isinstance(exc, PreconditionFailed) and e.if_match is not None
        raise _at(exc, e, "request.ifMatch" if stale else "request.url") from None


def _screened(found: Saved, opts: Options) -> Saved:
    """The version as the recipient may see it (as it is for the program itself).

    :raises ConsentDenied: it is withheld from the recipient (the entry's 403).
    """
    if opts.release is None:
        return found
    shown = opts.release.screen([found])
    if not shown:
        raise ConsentDenied(disclosure.NOT_AVAILABLE, [Issue(disclosure.NOT_AVAILABLE, code="suppressed")])
    return shown[0]


def _existing(ops: Ops, e: Entry) -> Saved | None:
    """The live resource an entry targets, or None."""
    assert e.id is not None
    try:
        return ops.read(e.resource_type, e.id)
    except (NotFound, Gone):
        return None


def _delete(ops: Ops, e: Entry) -> EntryResult:
    if e.id is None:
        return EntryResult(e.index, e.method, 204)
    if e.if_match is not None:
        _check_version(ops, e)
    try:
        saved = ops.delete(e.resource_type, e.id)
    except NotFound:
        return EntryResult(e.index, e.method, 204)  # R4 http.html#delete: nothing to delete is fine
    return EntryResult(e.index, e.method, 204, saved)


def _check_version(ops: Ops, e: Entry) -> None:
    assert e.id is not None
    try:
        current: int | None = ops.read(e.resource_type, e.id).version
    except IopFhirError:  # unknown or deleted
        current = None
    if current != e.if_match:
        have = "does not exist" if current is None else f"is at version {current}"
        raise _at(PreconditionFailed(f"ifMatch version {e.if_match}, but {e.resource_type}/{e.id} {have}"), e, "request.ifMatch")


def _create(ops: Ops, e: Entry) -> EntryResult:
    assert e.resource is not None and e.id is not None
    if e.matched:
        return EntryResult(e.index, e.method, 200, ops.read(e.resource_type, e.id))
    resource = {k: v for k, v in e.resource.items() if k != "id"}  # R4: a create ignores the id
    saved = ops.create(resource, id=e.id, if_none_exist=e.if_none_exist)
    if saved.id != e.id:
        # Another writer created the match after resolution; references already name e.id.
        raise _at(VersionConflict("a concurrent request created the resource ifNoneExist names; retry"), e, "request.ifNoneExist")
    return EntryResult(e.index, e.method, 201 if saved.created else 200, saved)


def _update(ops: Ops, e: Entry) -> EntryResult:
    assert e.resource is not None and e.id is not None
    if e.conditional and not e.matched:
        try:
            # Under the store's lock on the criteria: a match created meanwhile is a conflict.
            saved = ops.conditional_update(e.resource_type, e.query or [], e.resource, if_match=e.if_match)
        except RecordInvalid as exc:
            raise _at(VersionConflict(f"a concurrent request created a {e.resource_type} matching {e.url}; retry"), e, "request.url") from exc
    else:
        saved = ops.update(e.resource_type, e.id, e.resource, if_match=e.if_match)
    return EntryResult(e.index, e.method, 201 if saved.created else 200, saved)


def _patch(ops: Ops, e: Entry) -> EntryResult:
    assert e.id is not None and e.patch is not None
    current = ops.read(e.resource_type, e.id)
    try:
        patched = jsonpatch.apply_patch(current.resource, e.patch)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise RecordInvalid(f"the patch does not apply: {exc}", [Issue(f"the patch does not apply: {exc}", f"{e.where}.resource.data", code="processing")]) from None
    if patched.get("resourceType") != e.resource_type or patched.get("id") != e.id:
        message = "a patch cannot change resourceType or id"
        raise RecordInvalid(message, [Issue(message, f"{e.where}.resource.data", code="value")])
    invalid = located(fhir_validate.validate_resource(patched), f"{e.where}.resource", patched)
    if invalid:
        raise RecordInvalid(f"the patched {e.resource_type} is invalid: {invalid[0]}", invalid)
    saved = ops.update(e.resource_type, e.id, patched, if_match=e.if_match)
    return EntryResult(e.index, e.method, 200, saved)


def _read(ops: Ops, e: Entry, opts: Options) -> EntryResult:
    if e.id is None:
        return EntryResult(e.index, e.method, 200, resource=_search(ops, e, opts))
    found = ops.vread(e.resource_type, e.id, e.version) if e.version is not None else ops.read(e.resource_type, e.id)
    return EntryResult(e.index, e.method, 200, found)


def _search(ops: Ops, e: Entry, opts: Options) -> JSON:
    """A searchset Bundle for a GET entry's ``Type?params`` (keyset paging by ``_cursor``)."""
    pairs = e.query or []
    criteria = [(k, v) for k, v in pairs if k not in _RESULT_PARAMS]
    result = {k: v for k, v in pairs if k in _RESULT_PARAMS}
    count = opts.default_count
    if "_count" in result:
        text = result["_count"]
        if not text.isdigit() or int(text) > opts.max_count:
            raise InvalidSearch(f"_count must be a whole number from 0 to {opts.max_count}", [Issue(f"_count={text!r} is not 0..{opts.max_count}", "_count")])
        count = int(text)
    total = result.get("_total") == "accurate" and opts.release is None  # a count would tell what is withheld
    if opts.release is not None and e.resource_type in READ_ONLY_TYPES:
        raise disclosure.AuditRecordsRefused.of(e.resource_type)
    page = ops.search(e.resource_type, criteria, count=count, sort=result.get("_sort"), cursor=result.get("_cursor"), total=total)
    own = [(k, v) for k, v in pairs if k not in ("_cursor", "_format", "_pretty")]
    links = [{"relation": "self", "url": _search_url(opts.base, e.resource_type, own)}]
    for relation, cursor in (("next", page.next_cursor), ("previous", page.prev_cursor)):
        if cursor:
            links.append({"relation": relation, "url": _search_url(opts.base, e.resource_type, [*own, ("_cursor", cursor)])})
    bundle: JSON = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset"}
    shown = page.entries if opts.release is None else opts.release.screen(page.entries)
    if page.total is not None:
        bundle["total"] = page.total
    elif opts.release is not None and page.next_cursor is None and not result.get("_cursor"):
        bundle["total"] = len(shown)  # the whole released result
    bundle["link"] = links
    entries = [{"fullUrl": f"{opts.base}/{s.reference}", "resource": s.resource, "search": {"mode": "match"}} for s in shown]
    if entries:
        bundle["entry"] = entries
    return mark_released(bundle, opts.release)


def _search_url(base: str, resource_type: str, pairs: list[tuple[str, str]]) -> str:
    return f"{base}/{resource_type}" + (f"?{urlencode(pairs)}" if pairs else "")


def _at(exc: IopFhirError, e: Entry, where: str, code: str | None = None) -> EntryFailed:
    """``exc`` re-told at entry ``e``: resource paths go under ``.resource``, search parameter
    names and unlocated issues to ``where`` (with the parameter named in the message)."""
    if isinstance(exc, EntryFailed):
        return exc
    issues = []
    for issue in exc.issues:
        loc, message = issue.location, issue.message
        if loc.startswith("Bundle."):
            pass
        elif (inside := _under(loc, e.resource_type, f"{e.where}.resource")) is not None:
            loc = inside
        else:
            message = f"{loc}: {message}" if loc else message
            loc = f"{e.where}.{where}"
        issues.append(Issue(message, loc, issue.severity, code or issue.code))
    return EntryFailed(exc, e.index, issues)


# --- the response -----------------------------------------------------------------------------


def response_bundle(kind: str, results: list[EntryResult], opts: Options) -> JSON:
    """The ``batch-response`` / ``transaction-response`` Bundle, entries in request order."""
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": f"{kind}-response",
        **({"entry": [_response_entry(r, opts) for r in results]} if results else {}),
    }


def status_line(status: int) -> str:
    """``201 Created``: the status code and its reason phrase, as Bundle entries carry them."""
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _response_entry(result: EntryResult, opts: Options) -> JSON:
    response: JSON = {"status": status_line(result.status)}
    saved = result.saved
    if saved is not None:
        if not saved.deleted:
            response["location"] = saved.location
        response["etag"] = saved.etag
        response["lastModified"] = instant(saved.last_updated)
    entry: JSON = {}
    if result.issues:
        response["outcome"] = operation_outcome(result.issues)
    elif result.resource is not None and result.method == "GET":
        entry["resource"] = result.resource
    elif saved is not None and not saved.deleted and result.method != "HEAD" and not result.withheld:
        write = result.method not in READS
        if opts.prefer == "OperationOutcome" and write:
            response["outcome"] = operation_outcome([], default=f"{result.method} {saved.reference}: {result.outcome}")
        elif opts.prefer == "representation" or not write:
            entry["fullUrl"] = f"{opts.base}/{saved.reference}"
            entry["resource"] = saved.resource
    entry["response"] = response
    return entry
