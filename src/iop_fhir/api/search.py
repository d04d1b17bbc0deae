"""Search and history over HTTP: FHIR query parameters in, searchset and history Bundles out.

The store runs the queries (:meth:`Store.search`, :meth:`Store.history`) and owns what a
search value means; this module owns what FHIR puts around them (R4 search.html):

* result parameters: ``_count`` (``DEFAULT_COUNT``, capped at ``MAX_COUNT``), ``_sort``,
  ``_summary`` (``count``, ``true``, ``text``, ``data``, ``false``), ``_elements``,
  ``_include`` / ``_revinclude`` (every reference parameter of the store's table, ``*`` for
  all of a type's), ``_total`` and the paging cursor ``_cursor``;
* unknown parameters: under ``Prefer: handling=strict`` a 400 naming each, otherwise ignored,
  named in an OperationOutcome entry (``search.mode = outcome``) and left out of the links;
* paging: keyset cursors from the store, so ``next``/``previous`` stay correct while
  resources are added or removed between page fetches;
* ``Bundle.total``: always for ``_summary=count`` (and ``_count=0``), on ``_total=accurate``
  or ``estimate``, and whenever it costs nothing (a first page without a next page).

For a recipient of a disclosure (``release``, :class:`Release`: the request's consent
decision, ``api.disclosure``) every page is screened: withheld resources are left out, the
rest are the released copies (labelled, redacted), and a page short of ``_count`` because
of them is filled from the following results (at most :data:`MAX_FILL` fetches), so its
length tells nothing. ``Bundle.total`` counts only what the recipient may see: for
``_summary=count``, ``_count=0`` and ``_total`` every match is decided (at most
:data:`COUNT_LIMIT` of them; beyond, no total and an outcome issue says why); otherwise it is
given when the whole released result is on the page. The Bundle carries ``meta.security`` ``REDACTED``
and an outcome entry saying data was withheld (without what); with Part 2 data shown, the
``42CFRPart2`` and ``NORDSCLCD`` labels in ``meta.security``, and the notice against
redisclosure in the outcome entry and in ``meta.extension`` (``redisclosure-notice``).

Entries: for JSON the stored bytes are spliced into the Bundle as they are (``orjson.Fragment``:
no parse, no re-serialisation, decimals untouched); XML and subsetting need the parsed dict.
Functions here take what they need (base URL, format, strictness, limits) as arguments, so the
handlers in :mod:`iop_fhir.api.fhir` stay the only place that reads the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, Protocol
from urllib.parse import urlencode

import orjson

from iop_fhir.api import store
from iop_fhir.api.negotiate import FHIR_JSON
from iop_fhir.errors import Issue, operation_outcome
from iop_fhir.formats.fhir_validate import elements_of, model_class
from iop_fhir.store import InvalidSearch, Page, Saved, instant, search_parameters
from iop_fhir.store import search_index
from iop_fhir.store.search_index import SearchParam, date_range, parse_reference
from iop_fhir.store.tables import from_micros

JSON = dict[str, Any]
Pairs = list[tuple[str, str]]

# Parameters about the result rather than the match; ``_format``/``_pretty`` only ride along.
RESULT_PARAMETERS = frozenset(
    {"_count", "_sort", "_summary", "_elements", "_include", "_revinclude", "_total", "_cursor", "_format", "_pretty"}
)
HISTORY_PARAMETERS = frozenset({"_count", "_since", "_cursor", "_format", "_pretty"})
SUMMARY_MODES = ("true", "text", "data", "count", "false")
TOTAL_MODES = ("none", "estimate", "accurate")
# R4 search.html#summary: a subset is tagged so nobody mistakes it for the whole resource.
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "Resource encoded in summary mode",
}
_ALWAYS = frozenset({"resourceType", "id", "meta"})
_ANY_TYPE = "Resource"  # enum_reference_types value for Reference(Any)
MAX_FILL = 8  # fetches per page at most while withheld resources leave it short of _count
COUNT_LIMIT = 5000  # matches decided at most for a recipient's total


class Release(Protocol):
    """What a recipient may be shown of stored versions (``api.disclosure.Gatekeeper``)."""

    def screen(self, found: Sequence[Saved]) -> list[Saved]:
        """The versions that may be shown, in order, as released copies (``Saved.resource``)."""
        ...

    def count(self, found: Sequence[Saved]) -> int:
        """How many of ``found`` may be shown (decided for a total, nothing disclosed)."""
        ...

    def outcome(self) -> list[Issue]:
        """What a Bundle's outcome says: data withheld, the notice against redisclosure."""
        ...

    def bundle_meta(self) -> JSON | None:
        """``Bundle.meta`` of a screened Bundle (``privacy.gate.bundle_meta``): ``REDACTED`` when
        anything was withheld or cut; with Part 2 data, its labels and the notice."""
        ...


def served_types() -> tuple[str, ...]:
    """The resource types the REST API serves: those the store keeps a search table for."""
    return tuple(search_index.PARAMETERS)


# --- parameters ----------------------------------------------------------------------------------


def _bad(location: str, message: str, code: str = "invalid") -> InvalidSearch:
    return InvalidSearch(f"{location}: {message}", [Issue(message, location=location, code=code)])


def parse_count(value: str | None, default: int, maximum: int) -> int:
    """``_count``: a whole number from 0; above ``maximum`` is served as ``maximum`` (R4 lets a
    server return fewer than asked).

    :raises InvalidSearch: not a whole number, or negative (location ``_count``).
    """
    if value is None:
        return default
    if not value.isdigit():
        raise _bad("_count", f"{value!r} is not a whole number of 0 or more")
    return min(int(value), maximum)


def parse_since(value: str | None) -> datetime | None:
    """``_since``: an instant (partial dates mean their start), for history."""
    if value is None:
        return None
    found = date_range(value)
    if found is None:
        raise _bad("_since", f"{value!r} is not an instant (e.g. 2026-01-15T10:00:00Z)")
    return from_micros(found[0])


def _ignore_or_refuse(unknown: list[str], strict: bool, known: str) -> list[str]:
    """Unknown parameter names: refused under strict handling (R4 search.html#errors), else returned to be reported."""
    if unknown and strict:
        issues = [
            Issue(f"unknown or unsupported parameter {key!r} ({known})", location=key, code="not-supported") for key in unknown
        ]
        raise InvalidSearch(f"unsupported parameters: {', '.join(unknown)}", issues)
    return unknown


@dataclass(frozen=True)
class Include:
    """One ``_include`` / ``_revinclude``: resources of ``source`` point at others by ``param``."""

    source: str
    param: SearchParam
    target: str | None = None  # ``MedicationRequest:subject:Patient`` narrows to one type

    @property
    def value(self) -> str:
        return f"{self.source}:{self.param.name}" + (f":{self.target}" if self.target else "")


@dataclass
class SearchRequest:
    """A search as FHIR sent it, sorted into what the store matches on and what shapes the result."""

    resource_type: str
    criteria: Pairs
    used: Pairs  # every parameter honoured, in the order given (for the links)
    ignored: list[str]
    count: int
    sort: list[str] = field(default_factory=list)
    summary: str | None = None
    elements: frozenset[str] | None = None
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    total: str | None = None
    cursor: str | None = None

    @classmethod
    def parse(
        cls, resource_type: str, pairs: Sequence[tuple[str, str]], *, strict: bool, default_count: int, max_count: int
    ) -> SearchRequest:
        """Sort ``pairs`` (the query, or query plus form for ``POST _search``) and check result parameters.

        :raises InvalidSearch: a malformed result parameter, or unknown ones under strict handling.
        """
        known = search_parameters(resource_type)
        criteria: Pairs = []
        used: Pairs = []
        unknown: list[str] = []
        result: dict[str, list[str]] = {}
        for key, value in pairs:
            if key in RESULT_PARAMETERS:
                result.setdefault(key, []).append(value)
            elif key.partition(":")[0] in known:
                criteria.append((key, value))
            else:
                unknown.append(key)
                continue
            used.append((key, value))
        ignored = _ignore_or_refuse(unknown, strict, f"{resource_type} searches by {', '.join(sorted(known))}")

        def one(name: str) -> str | None:
            values = result.get(name)
            return values[0] if values else None

        request = cls(resource_type, criteria, used, ignored, parse_count(one("_count"), default_count, max_count))
        request.cursor = one("_cursor")
        request.sort = _sort_names(resource_type, one("_sort"))
        request.summary = _choice("_summary", one("_summary"), SUMMARY_MODES)
        request.total = _choice("_total", one("_total"), TOTAL_MODES)
        if one("_elements"):
            request.elements = frozenset(_element_names(resource_type, ",".join(result["_elements"])))
        request.includes = [i for v in result.get("_include", ()) for i in parse_include(resource_type, v)]
        request.revincludes = [parse_revinclude(resource_type, v) for v in result.get("_revinclude", ())]
        return request


def _choice(name: str, value: str | None, allowed: Sequence[str]) -> str | None:
    if value is not None and value not in allowed:
        raise _bad(name, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _sort_names(resource_type: str, value: str | None) -> list[str]:
    names = [s.strip() for s in (value or "").split(",") if s.strip()]
    for name in names:
        try:
            search_index.sort_expression(resource_type, name.lstrip("-"), name.startswith("-"))
        except InvalidSearch as exc:
            why = exc.issues[0].message
            raise _bad("_sort", f"cannot sort {resource_type} by {name.lstrip('-')!r}: {why}", "not-supported") from None
    return names


def _element_names(resource_type: str, value: str) -> list[str]:
    names = [n.strip().removeprefix(f"{resource_type}.") for n in value.split(",") if n.strip()]
    table = _element_sets(resource_type)
    for name in names:
        if name not in table.elements and name not in table.choices:
            raise _bad("_elements", f"{name!r} is not an element of {resource_type}")
    return names


# --- _include / _revinclude ----------------------------------------------------------------------


@cache
def reference_targets(resource_type: str, name: str) -> frozenset[str]:
    """The resource types a reference search parameter can point at.

    The store's table names them when it narrows (``patient`` keeps ``Patient``); otherwise
    they are the element's own targets in the R4 model (``Reference(Patient | Group)``), with
    ``Resource`` standing for any type.
    """
    p = search_parameters(resource_type)[name]
    if p.targets:
        return frozenset(p.targets)
    found: set[str] = set()
    for steps in p.steps:
        cls = model_class(resource_type)
        for step in steps[:-1]:
            cls = elements_of(cls)[step].model
        model_field = cls.model_fields[cls.get_alias_mapping()[steps[-1]]]
        found.update((model_field.json_schema_extra or {}).get("enum_reference_types", ()))
    return frozenset(found)


def _points_at(source: str, p: SearchParam, resource_type: str) -> bool:
    targets = reference_targets(source, p.name)
    return resource_type in targets or _ANY_TYPE in targets


def reference_parameters(resource_type: str) -> list[SearchParam]:
    return [p for p in search_parameters(resource_type).values() if p.type == "reference"]


def include_values(resource_type: str) -> list[str]:
    """Every ``_include`` a search of ``resource_type`` honours (the CapabilityStatement lists these)."""
    return [f"{resource_type}:{p.name}" for p in reference_parameters(resource_type)]


@cache
def revinclude_values(resource_type: str) -> tuple[str, ...]:
    """Every ``_revinclude`` a search of ``resource_type`` honours: the served types' reference
    parameters that can point at it."""
    return tuple(
        f"{source}:{p.name}"
        for source in served_types()
        for p in reference_parameters(source)
        if _points_at(source, p, resource_type)
    )


def _reference_param(location: str, source: str, name: str) -> SearchParam:
    if source not in search_index.PARAMETERS:
        raise _bad(location, f"{source!r} is not a resource type searched here", "not-supported")
    p = search_parameters(source).get(name)
    if p is None or p.type != "reference":
        raise _bad(location, f"{source} has no reference search parameter {name!r}", "not-supported")
    return p


def parse_include(resource_type: str, value: str) -> list[Include]:
    """``Type:param[:Target]`` (``Type`` must be the searched type), or ``*`` for every reference parameter."""
    if value == "*":
        return [Include(resource_type, p) for p in reference_parameters(resource_type)]
    source, _, rest = value.partition(":")
    name, _, target = rest.partition(":")
    if source != resource_type:
        raise _bad("_include", f"{value!r} does not start from the searched type {resource_type}")
    return [Include(source, _reference_param("_include", source, name), target or None)]


def parse_revinclude(resource_type: str, value: str) -> Include:
    """``Source:param[:Target]``: resources of ``Source`` whose ``param`` points at a match."""
    source, _, rest = value.partition(":")
    name, _, target = rest.partition(":")
    p = _reference_param("_revinclude", source, name)
    if (target and target != resource_type) or not _points_at(source, p, resource_type):
        raise _bad("_revinclude", f"{value!r} cannot point at {resource_type}")
    return Include(source, p, target or None)


def _local_references(resource: JSON, p: SearchParam, base: str) -> Iterable[tuple[str | None, str]]:
    """``(type, id)`` of the literal references ``p`` reads, skipping other servers' absolute URLs."""
    for steps in p.steps:
        items: list[Any] = [resource]
        for step in steps:
            items = [v for item in items if isinstance(item, dict) for v in _as_list(item.get(step))]
        for item in items:
            reference = item.get("reference") if isinstance(item, dict) else None
            if not isinstance(reference, str) or ("://" in reference and not reference.startswith(base + "/")):
                continue
            found = parse_reference(reference)
            if found is not None:
                yield found


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


def _included(matches: list[Saved], includes: list[Include], base: str) -> list[Saved]:
    wanted: dict[str, list[str]] = {}
    for include in includes:
        for saved in matches:
            for ref_type, ref_id in _local_references(saved.resource, include.param, base):
                if ref_type is not None and (include.target is None or ref_type == include.target):
                    wanted.setdefault(ref_type, []).append(ref_id)
    st = store()
    return [s for ref_type, ids in wanted.items() for s in st.read_many(ref_type, ids)]


def _revincluded(
    resource_type: str, matches: list[Saved], revincludes: list[Include], limit: int
) -> tuple[list[Saved], list[str]]:
    """Resources pointing at the matches, at most ``limit`` per ``_revinclude`` (the rest is reported)."""
    if not matches:
        return [], []
    targets = ",".join(f"{resource_type}/{s.id}" for s in matches)
    found: list[Saved] = []
    truncated: list[str] = []
    for include in revincludes:
        page = store().search(include.source, [(include.param.name, targets)], count=limit)
        found.extend(page.entries)
        if page.next_cursor is not None:
            truncated.append(include.value)
    return found, truncated


# --- shaping: _elements and _summary -------------------------------------------------------------


@dataclass(frozen=True)
class _Elements:
    elements: frozenset[str]  # every JSON name of the type
    mandatory: frozenset[str]  # min 1 (for a required choice, every variant)
    summary: frozenset[str]  # isSummary
    choices: dict[str, frozenset[str]]  # medication -> {medicationCodeableConcept, medicationReference}


@cache
def _element_sets(resource_type: str) -> _Elements:
    cls = model_class(resource_type)
    aliases = cls.get_alias_mapping()
    names = [n for n in elements_of(cls) if not n.startswith("_")]
    mandatory: set[str] = set()
    summary: set[str] = set()
    choices: dict[str, set[str]] = {}
    for name in names:
        model_field = cls.model_fields[aliases[name]]
        extra = model_field.json_schema_extra or {}
        if model_field.is_required() or extra.get("element_required") or extra.get("one_of_many_required"):
            mandatory.add(name)
        if extra.get("summary_element_property"):
            summary.add(name)
        if extra.get("one_of_many"):
            choices.setdefault(extra["one_of_many"], set()).add(name)
    frozen = {k: frozenset(v) for k, v in choices.items()}
    return _Elements(frozenset(names), frozenset(mandatory), frozenset(summary), frozen)


Shaper = Callable[[JSON], JSON]


def shaper(resource_type: str, summary: str | None, elements: frozenset[str] | None) -> Shaper | None:
    """What ``_summary`` / ``_elements`` keep of a resource, or None to send it whole.

    Mandatory elements, ``id``, ``meta`` and ``resourceType`` always stay (R4 search.html#elements),
    and the result is tagged ``SUBSETTED``.
    """
    if summary in (None, "false", "count") and elements is None:
        return None
    table = _element_sets(resource_type)
    if summary == "data":
        keep = table.elements - {"text"}
    elif summary == "text":
        keep = _ALWAYS | table.mandatory | {"text"}
    elif summary == "true":
        keep = _ALWAYS | table.mandatory | table.summary
    else:
        chosen = {variant for name in elements or () for variant in table.choices.get(name, {name})}
        keep = _ALWAYS | table.mandatory | chosen

    def shape(resource: JSON) -> JSON:
        out = {k: v for k, v in resource.items() if k in keep or (k[:1] == "_" and k[1:] in keep)}
        meta = dict(out.get("meta") or {})
        meta["tag"] = [*meta.get("tag", ()), SUBSETTED]
        out["meta"] = meta
        return out

    return shape


def read_shaper(resource_type: str, args: Any) -> Shaper | None:
    """``_summary`` / ``_elements`` on a read (R4 allows them there too)."""
    summary = _choice("_summary", args.get("_summary"), SUMMARY_MODES)
    elements = args.get("_elements")
    return shaper(resource_type, summary, frozenset(_element_names(resource_type, elements)) if elements else None)


# --- Bundles -------------------------------------------------------------------------------------


def _embedded(saved: Saved, fmt: str, shape: Shaper | None = None) -> Any:
    """The entry's resource: the stored bytes themselves for plain JSON, else the parsed dict."""
    if shape is not None:
        return shape(saved.resource)
    if fmt == FHIR_JSON and saved.data is not None:
        return orjson.Fragment(saved.data)
    return saved.resource


def _link(base: str, path: str, params: Pairs) -> str:
    return f"{base}/{path}?{urlencode(params)}" if params else f"{base}/{path}"


def _links(base: str, path: str, used: Pairs, page: Page[Saved] | None, cursor: str | None) -> list[JSON]:
    plain = [(k, v) for k, v in used if k != "_cursor"]
    links = [{"relation": "self", "url": _link(base, path, plain + ([("_cursor", cursor)] if cursor else []))}]
    if page is not None and page.next_cursor:
        links.append({"relation": "next", "url": _link(base, path, plain + [("_cursor", page.next_cursor)])})
    if page is not None and page.prev_cursor:
        links.append({"relation": "previous", "url": _link(base, path, plain + [("_cursor", page.prev_cursor)])})
    return links


def _outcome_entry(issues: list[Issue]) -> JSON:
    return {"resource": operation_outcome(issues), "search": {"mode": "outcome"}}


def _ignored_issues(ignored: list[str]) -> list[Issue]:
    message = "parameter {!r} is not supported and was ignored"
    return [Issue(message.format(key), location=key, severity="warning", code="not-supported") for key in ignored]


Keep = Callable[[Saved], bool]
Seen = Callable[[Sequence[Saved]], None]


def search_bundle(
    request: SearchRequest,
    *,
    base: str,
    fmt: str,
    max_count: int,
    keep: Keep | None = None,
    release: Release | None = None,
    seen: Seen | None = None,
) -> JSON:
    """Run a parsed search and answer with its searchset Bundle (one page).

    :param keep: which ``_include`` / ``_revinclude`` results the page may show (the caller's
        access rules, :meth:`iop_fhir.api.auth.Confinement.shows`); all when None.
    :param release: the recipient's screen (see the module doc); None for the program itself.
    :param seen: told what the Bundle shows (the request's audit).
    """
    resource_type = request.resource_type
    st = store()
    bundle: JSON = {"resourceType": "Bundle", "type": "searchset"}
    outcome = _ignored_issues(request.ignored)

    def fetch(count: int, cursor: str | None, total: bool = False) -> Page[Saved]:
        sort = request.sort or None
        return st.search(resource_type, request.criteria, count=count, sort=sort, cursor=cursor, total=total)

    if request.summary == "count" or request.count == 0:
        if release is None:
            bundle["total"] = st.count(resource_type, request.criteria)
        else:
            _released_total(bundle, outcome, fetch, release, max_count)
            _secure(bundle, release)
        bundle["link"] = _links(base, resource_type, request.used, None, None)
        if outcome:
            bundle["entry"] = [_outcome_entry(outcome)]
        return bundle

    if release is None:
        page = fetch(request.count, request.cursor, request.total in ("accurate", "estimate"))
        matches = page.entries
        if page.total is not None:
            bundle["total"] = page.total
        elif request.total != "none" and request.cursor is None and page.next_cursor is None:
            bundle["total"] = len(matches)  # the whole result is on this page: counting is free
    else:
        matches, page = fill(fetch, request.count, request.cursor, release.screen)
        if request.total in ("accurate", "estimate"):
            _released_total(bundle, outcome, fetch, release, max_count)
        elif request.total != "none" and request.cursor is None and page.next_cursor is None:
            bundle["total"] = len(matches)  # the whole released result is on this page
    bundle["link"] = _links(base, resource_type, request.used, page, request.cursor)
    shape = shaper(resource_type, request.summary, request.elements)
    entries = [_entry(s, base, fmt, "match", shape) for s in matches]
    extra = _included(matches, request.includes, base) if request.includes else []
    if request.revincludes:
        found, truncated = _revincluded(resource_type, matches, request.revincludes, max_count)
        extra.extend(found)
        message = "{} found more than {} resources; only the first {} are included"
        outcome.extend(
            Issue(message.format(value, max_count, max_count), location="_revinclude", severity="warning", code="too-costly")
            for value in truncated
        )
    if keep is not None:
        extra = [s for s in extra if keep(s)]
    present = {(s.resource_type, s.id) for s in matches}
    extra = [s for s in extra if (s.resource_type, s.id) not in present]
    if release is not None:
        extra = release.screen(extra)
    for saved in extra:
        if (saved.resource_type, saved.id) not in present:
            present.add((saved.resource_type, saved.id))
            entries.append(_entry(saved, base, fmt, "include"))
    if release is not None:
        outcome.extend(release.outcome())
        _secure(bundle, release)
    if seen is not None:
        seen([*matches, *extra])
    if outcome:
        entries.append(_outcome_entry(outcome))
    if entries:
        bundle["entry"] = entries
    return bundle


def _released_total(
    bundle: JSON, outcome: list[Issue], fetch: Callable[[int, str | None], Page[Saved]], release: Release, page_size: int
) -> None:
    """``Bundle.total`` for a recipient: the matches it may see, every one decided (a count of
    the store would tell how much is withheld); beyond :data:`COUNT_LIMIT` matches, no total."""
    total = examined = 0
    cursor: str | None = None
    while True:
        page = fetch(page_size, cursor)
        examined += len(page.entries)
        total += release.count(page.entries)
        cursor = page.next_cursor
        if cursor is None:
            bundle["total"] = total
            return
        if examined >= COUNT_LIMIT:
            message = f"no total: more than {COUNT_LIMIT} matches would have to be decided one by one under the patients' consent directives"
            outcome.append(Issue(message, location="_total", severity="information", code="too-costly"))
            return


def fill(
    fetch: Callable[[int, str | None], Page[Saved]], count: int, cursor: str | None, screen: Callable[[Sequence[Saved]], list[Saved]]
) -> tuple[list[Saved], Page[Saved]]:
    """A page of ``count`` versions a recipient may see: fetch, screen, and while withheld ones
    leave it short, fetch exactly the missing number from where the last fetch ended (so the
    next cursor still points right after what was examined); at most :data:`MAX_FILL` fetches.

    :returns: what is shown, and a page whose cursors are those of the first and last fetch.
    """
    first = page = fetch(count, cursor)
    shown = screen(page.entries)
    for _ in range(MAX_FILL - 1):
        if len(shown) >= count or page.next_cursor is None:
            break
        page = fetch(count - len(shown), page.next_cursor)
        shown += screen(page.entries)
    return shown, Page(shown, next_cursor=page.next_cursor, prev_cursor=first.prev_cursor)


def _secure(bundle: JSON, release: Release) -> None:
    """``Bundle.meta`` of a screened Bundle, placed where FHIR puts ``meta``."""
    marks = release.bundle_meta()
    if marks:
        rest = {k: v for k, v in bundle.items() if k not in ("resourceType", "id", "meta")}
        head = {k: bundle[k] for k in ("resourceType", "id") if k in bundle}
        meta = {**(bundle.get("meta") or {}), **marks}
        bundle.clear()
        bundle.update(head, meta=meta, **rest)


def mark_released(bundle: JSON, release: Release | None) -> JSON:
    """A searchset Bundle built from screened versions (``$everything``, ``$medication-history``,
    a search inside a batch): its ``meta`` and the outcome entry of the screen."""
    if release is None:
        return bundle
    _secure(bundle, release)
    issues = release.outcome()
    if issues:
        bundle.setdefault("entry", []).append(_outcome_entry(issues))
    return bundle


def _entry(saved: Saved, base: str, fmt: str, mode: str, shape: Shaper | None = None) -> JSON:
    return {"fullUrl": f"{base}/{saved.reference}", "resource": _embedded(saved, fmt, shape), "search": {"mode": mode}}


def history_bundle(
    resource_type: str | None,
    id: str | None,
    pairs: Sequence[tuple[str, str]],
    *,
    base: str,
    fmt: str,
    strict: bool,
    default_count: int,
    max_count: int,
    keep: Keep | None = None,
    release: Release | None = None,
    seen: Seen | None = None,
) -> JSON:
    """A history Bundle (newest first) of one resource, a type, or everything, one page.

    Each entry says what happened: ``request`` (POST for a first version, PUT for a later
    one, DELETE for a deletion) and ``response`` (status, etag, lastModified).

    :param keep: which versions the page may show (the caller's access rules); all when None.
        Versions left out shorten the page, and the total is then given only for a history
        that fits on one page.
    :param release: the recipient's screen: versions withheld are left out and the page is
        filled from older ones (see the module doc). A history Bundle has no place for an
        outcome entry: it says what was withheld and carries the notice in ``meta`` only.
    :param seen: told what the Bundle shows (the request's audit).
    """
    used = [(k, v) for k, v in pairs if k in HISTORY_PARAMETERS]
    # A history Bundle has no place for an outcome entry (bdl-2, bdl-3): under lenient handling
    # unknown parameters are only left out of the links.
    _ignore_or_refuse([k for k, _ in pairs if k not in HISTORY_PARAMETERS], strict, "history takes _count, _since")
    args = dict(reversed(used))  # the first of a repeated parameter wins
    cursor = args.get("_cursor")
    count = parse_count(args.get("_count"), default_count, max_count)
    since = parse_since(args.get("_since"))

    def fetch(n: int, at: str | None) -> Page[Saved]:
        return store().history(resource_type, id, since=since, count=n, cursor=at, total=n == 0 and release is None)

    if release is None or count == 0:
        page = fetch(count, cursor)
        shown = page.entries if keep is None else [s for s in page.entries if keep(s)]
    else:
        screen = release.screen

        def kept(found: Sequence[Saved]) -> list[Saved]:
            return screen([s for s in found if keep is None or keep(s)])

        shown, page = fill(fetch, count, cursor, kept)
    path = "/".join(p for p in (resource_type, id, "_history") if p)
    bundle: JSON = {"resourceType": "Bundle", "type": "history"}
    if page.total is not None and keep is None and release is None:
        bundle["total"] = page.total
    elif cursor is None and page.next_cursor is None and count > 0:
        bundle["total"] = len(shown)  # the whole history is on this page: counting is free
    bundle["link"] = _links(base, path, used, page, cursor)
    entries = [_history_entry(s, base, fmt) for s in shown]
    if entries:
        bundle["entry"] = entries
    if release is not None:
        _secure(bundle, release)
    if seen is not None:
        seen(shown)
    return bundle


def _history_entry(saved: Saved, base: str, fmt: str) -> JSON:
    entry: JSON = {"fullUrl": f"{base}/{saved.reference}"}
    if saved.deleted:
        request, status = {"method": "DELETE", "url": saved.reference}, "204 No Content"
    elif saved.version == 1:
        entry["resource"] = _embedded(saved, fmt)
        request, status = {"method": "POST", "url": saved.resource_type}, "201 Created"
    else:
        entry["resource"] = _embedded(saved, fmt)
        request, status = {"method": "PUT", "url": saved.reference}, "200 OK"
    entry["request"] = request
    entry["response"] = {"status": status, "etag": saved.etag, "lastModified": instant(saved.last_updated)}
    return entry


__all__ = [
    "MAX_FILL",
    "RESULT_PARAMETERS",
    "SUBSETTED",
    "Include",
    "Release",
    "SearchRequest",
    "fill",
    "history_bundle",
    "include_values",
    "mark_released",
    "parse_count",
    "parse_since",
    "read_shaper",
    "reference_targets",
    "revinclude_values",
    "search_bundle",
    "served_types",
    "shaper",
]
