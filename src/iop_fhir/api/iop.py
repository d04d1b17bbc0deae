"""IOP record endpoints under ``/iop``: records in, records rebuilt from the store, the schema.

The record is the project's own JSON contract (``iop-record/1``), not FHIR: requests and
answers are ``application/json``; errors are OperationOutcomes like everywhere else.

``POST /iop/records``
    Body: one record, or a JSON list of records. Every record is validated and every
    violation reported at once (422, each issue's ``expression`` the JSON pointer; in a list
    prefixed by the item's index: ``/3/prescriptions/0/refills``). Valid records are mapped
    to their transaction Bundles (conditional PUTs by business identifier) and stored in ONE
    unit of work, through the same processor as ``POST /fhir`` transactions: all records or
    none. A record whose id is already stored replaces it: unchanged resources get no new
    version (the store skips identical content), changed ones one new version, and resources
    the episode owned in its previous version but no longer holds (a prescription taken out
    of the record) are deleted; shared parties (patient, staff, pharmacies) never are. A
    record with a ``discharge`` also gets its discharge package (see ``/discharge`` below).
    Answer: 201 when a record was new, else 200, with::

        {"records": [{"id": "ep-2026-0042",
                      "resources": [{"reference": "Patient/10bc…", "version": 1,
                                     "outcome": "created"}, ...]}]}

    ``outcome`` is ``created``, ``updated``, ``unchanged`` or ``deleted``; ``version`` is
    the version now current (for ``deleted``, the deletion's). A single record also gets a
    ``Location: /iop/records/{id}``.

``PUT /iop/records/{id}``
    The same for one record, whose ``id`` must be the URL's (else 400 at ``/id``).

``GET /iop/records/{id}``
    The record rebuilt from the store by the reverse mappers. The episode is found by its
    identifier: EpisodeOfCare with ``identifier`` value ``{id}`` in any system ending in
    ``/episode`` (the program's system base is not in the URL). Two programs may use one
    episode id: then 409 names the systems, and ``?system=<episode system or its base>``
    chooses. The record's resources are what its last write stored, listed by the record's
    Provenance (deterministic id; its ``target`` names every resource of the record's
    Bundle), read at their current versions. Without that Provenance (resources written
    one by one over FHIR) they are gathered instead: the patient's compartment, kept where
    an identifier of the program's systems has a value ``{id}/...`` (or ``{id}`` for the
    episode and care team), the medication-review Tasks by their identifier system, plus
    the parties these reference, in the order they were written (``meta.lastUpdated``).

    Stored data that no longer makes a valid record (an EHR deleted a prescription a review
    points at, or changed a code to one the contract does not know) is a state the server
    holds, not a bug and not the request's fault: 409 Conflict with the mapping report as
    the OperationOutcome (FHIRPath locations into the stored resources); never a partial
    record. Warnings (FHIR data the record has no place for) still give the record, 200,
    with their count in ``X-IOP-Mapping-Warnings``.

``GET /iop/records/{id}/discharge``
    Where the record's discharge continuity package is (sync/discharge.py): stored with the
    record, in the same unit of work, when the record has a ``discharge``, and addressed to
    the destinations serving its aftercare provider. Answer: the package's reference and
    version, ``state`` (``pending``, ``delivered``, ``failed`` or ``no-destination``) and per
    destination its latest delivery (state, attempts, last error, when delivered). 404 when
    the record has no discharge. ``?system=`` as for the record.

``GET /iop/records/{id}/reconciliation``
    The intake medication reconciliation (sync/reconcile.py): the record's own prescriptions
    (id, medication, status, dose) beside the outside medications pulled from EHRs for its
    patient (source, reference, medication, status, dates, last fill), the open conflict
    Tasks a pull raised, and what the reverse mappers could not read of the outside data.

``GET /iop/schema``
    The record's JSON Schema (``application/schema+json``).

For a recipient of a disclosure (:mod:`.disclosure`) the record is rebuilt from what it may be
shown of the record's resources; a record whose episode is withheld (an SUD program's episode
is Part 2 data), or whose released part no longer makes a valid record, is a 403
``suppressed`` that says nothing more. ``/reconciliation`` lists only the resources released
to it (``/discharge`` shows delivery states, no clinical data). ``X-Data-Withheld:
consent-policy`` says something was left out or cut; ``X-Redisclosure-Notice`` carries the
notice when Part 2 data is in the answer. Writes record their AuditEvent in their own unit of
work.

About Provenance versions: its ``recorded`` is the record's latest event date and its
``target`` the record's resources, so an edit that adds no later event and no resource (new
instructions on a prescription) leaves it unchanged; one that does gives it a new version,
which is right, since what it attests changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from typing import Any

import orjson
from flask import Blueprint, Response, request

from iop_fhir.api import destinations, disclosure, store
from iop_fhir.api.bundles import EntryResult, Options, apply_transaction, check_transaction
from iop_fhir.api.operations import COMPARTMENT_TYPES, every, parties, read_references
from iop_fhir.errors import ConsentDenied, Gone, IopFhirError, Issue, NotFound, RecordInvalid, UnsupportedFormat, VersionConflict
from iop_fhir.formats.fhir_json import JsonRejected
from iop_fhir.mappers import episode as episode_mapper
from iop_fhir.mappers import medication_review, provenance
from iop_fhir.mappers.bundle import record_to_bundle, resources_to_record
from iop_fhir.mappers.context import MappingContext
from iop_fhir.mappers.ids import resource_id
from iop_fhir.record import IopRecord, record_json_schema, validate_record
from iop_fhir.store import Saved, Store, UnitOfWork
from iop_fhir.store.resources import ID_PATTERN
from iop_fhir.sync import discharge, reconcile
from iop_fhir.sync.destinations import Destination

JSON = dict[str, Any]

bp = Blueprint("iop", __name__, url_prefix="/iop")

JSON_TYPE = "application/json"
SCHEMA_TYPE = "application/schema+json"
EPISODE_SUFFIX = f"/{episode_mapper.KIND}"


class RecordMismatch(IopFhirError):
    """The body does not fit the request (an id other than the URL's, a list where one record goes)."""

    status = 400
    issue_code = "value"


class RecordNotRebuilt(IopFhirError):
    """What the store holds for a record no longer maps back to a valid record."""

    status = 409
    issue_code = "conflict"


@dataclass
class RecordResult:
    """What storing one record did to each of its resources."""

    id: str
    resources: list[JSON] = field(default_factory=list)
    created: bool = False

    def as_json(self) -> JSON:
        return {"id": self.id, "resources": self.resources}


# --- routes -----------------------------------------------------------------------------------


@bp.post("/records")
def post_records() -> Response:
    """Store one record or a list of records (all or none); see the module doc for the answer."""
    body = read_json()
    if isinstance(body, list):
        if not body:
            raise RecordMismatch("the list holds no record", [Issue("an empty list stores nothing", "", code="required")])
        records = validate_records(body, [f"/{i}" for i in range(len(body))])
    else:
        records = validate_records([body], [""])
    results = save_records(store(), records, destinations(), audit=_audit_records)
    headers = {"Location": f"/iop/records/{records[0].id}"} if not isinstance(body, list) else {}
    return _json({"records": [r.as_json() for r in results]}, 201 if any(r.created for r in results) else 200, headers)


@bp.put("/records/<record_id>")
def put_record(record_id: str) -> Response:
    """Store one record under its id (the body's ``id`` must be ``record_id``)."""
    body = read_json()
    if not isinstance(body, dict):
        raise RecordMismatch("PUT takes one record (a JSON object)", [Issue("expected one record, a JSON object", "", code="structure")])
    if body.get("id") != record_id:
        message = f"the record's id {body.get('id')!r} is not {record_id!r} from the URL"
        raise RecordMismatch(message, [Issue(message, "/id", code="value")])
    results = save_records(store(), validate_records([body], [""]), destinations(), audit=_audit_records)
    return _json({"records": [r.as_json() for r in results]}, 201 if results[0].created else 200)


@bp.get("/records/<record_id>")
def get_record(record_id: str) -> Response:
    """The record rebuilt from the store (409 when the stored data no longer makes one)."""
    keeper = disclosure.gatekeeper()
    record, warnings = rebuild_record(
        store(),
        record_id,
        request.args.get("system"),
        screen=keeper.screen if keeper else None,
        seen=lambda found: disclosure.note(*found, listed=False),
    )
    headers = {"X-IOP-Mapping-Warnings": str(len(warnings))} if warnings else {}
    return _json(record.model_dump(mode="json", exclude_none=True), 200, headers)


@bp.get("/records/<record_id>/discharge")
def get_discharge(record_id: str) -> Response:
    """Where the record's discharge package is: per destination pending, delivered or failed."""
    episode, _ = find_episode(store(), record_id, request.args.get("system"))
    disclosure.note(episode, listed=False)
    return _json(discharge.discharge_status(store(), episode.resource))


@bp.get("/records/<record_id>/reconciliation")
def get_reconciliation(record_id: str) -> Response:
    """The intake medication reconciliation: the IOP's prescriptions beside outside medications."""
    episode, _ = find_episode(store(), record_id, request.args.get("system"))
    disclosure.note(episode, listed=False)
    view = reconcile.reconciliation(store(), episode.resource).as_json()
    keeper = disclosure.gatekeeper()
    return _json(view if keeper is None else _released_view(view, keeper.screen))


NOT_AVAILABLE = "the record is not available to this client under the patient's consent directives"
Screen = Callable[[Sequence[Saved]], list[Saved]]
Seen = Callable[[Sequence[Saved]], None]


def _released_view(view: JSON, screen: Screen) -> JSON:
    """The reconciliation without the lines of resources the recipient may not see; the
    conflicts' free text as the released Task has it; no mapping issues once anything is left
    out (they locate and describe the data)."""
    lines = [("prescriptions", "reference"), ("outside_medications", "reference"), ("conflicts", "task")]
    wanted: dict[str, list[str]] = {}
    for key, ref in lines:
        for line in view[key]:
            rtype, _, rid = str(line.get(ref) or "").partition("/")
            if rtype and rid:
                wanted.setdefault(rtype, []).append(rid)
    st = store()
    shown = {s.reference: s for s in screen([found for rtype, ids in wanted.items() for found in st.read_many(rtype, ids)])}
    out = dict(view)
    for key, ref in lines:
        out[key] = [line for line in view[key] if line.get(ref) in shown]
    for line in out["conflicts"]:
        line["description"] = shown[line["task"]].resource.get("description")
    if any(len(out[key]) < len(view[key]) for key, _ in lines):
        out["issues"] = []
    return out


@bp.get("/schema")
def schema() -> Response:
    """The JSON Schema of the record contract."""
    return Response(_schema_bytes(), 200, content_type=SCHEMA_TYPE)


@cache
def _schema_bytes() -> bytes:
    return orjson.dumps(record_json_schema())


def _json(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(document), status, headers=headers or {}, content_type=JSON_TYPE)


# --- reading and validating ---------------------------------------------------------------------


def read_json() -> Any:
    """The request body as JSON (numbers with a fraction as ``Decimal``, kept as sent).

    The record is not FHIR, so it does not go through ``negotiate.read_body``.

    :raises UnsupportedFormat: 415 for a Content-Type that is not JSON.
    :raises JsonRejected: 400, not JSON (line and column in the issue).
    """
    kind = (request.mimetype or JSON_TYPE).lower()
    if kind != JSON_TYPE and not kind.endswith("+json"):
        raise UnsupportedFormat(f"Content-Type {kind!r} is not accepted; IOP records are {JSON_TYPE}")
    data = request.get_data(cache=True)
    try:
        return json.loads(data.decode("utf-8-sig"), parse_float=Decimal)
    except UnicodeDecodeError as exc:
        raise JsonRejected("the body is not UTF-8", [Issue("the body is not UTF-8", f"byte {exc.start}", code="structure")]) from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise JsonRejected(f"malformed JSON at {where}: {exc.msg}", [Issue(exc.msg, where, code="structure")]) from None


def validate_records(items: list[Any], prefixes: list[str]) -> list[IopRecord]:
    """Every item validated; raise one RecordInvalid listing every violation of every item,
    pointers prefixed by the item's (``/3/prescriptions/0/refills``)."""
    records: list[IopRecord] = []
    issues: list[Issue] = []
    seen: dict[tuple[str, str], str] = {}
    for item, prefix in zip(items, prefixes, strict=True):
        try:
            record = validate_record(item)
        except RecordInvalid as exc:
            issues.extend(Issue(i.message, prefix + i.location, i.severity, i.code) for i in exc.issues)
            continue
        key = (MappingContext(record).ids.base, record.id)
        if key in seen:
            issues.append(Issue(f"record {record.id} is also at {seen[key] or '/'} in this list", f"{prefix}/id", code="duplicate"))
        seen[key] = prefix
        records.append(record)
    errors = [i for i in issues if i.severity in ("error", "fatal")]
    if errors:
        raise RecordInvalid(f"{len(errors)} problem(s) in the record(s)", issues)
    return records


# --- storing ------------------------------------------------------------------------------------


def save_records(
    st: Store,
    records: list[IopRecord],
    targets: Mapping[str, Destination] | None = None,
    *,
    audit: Callable[[UnitOfWork, list[RecordResult]], None] | None = None,
) -> list[RecordResult]:
    """Store the records' Bundles in one unit of work (all or none), with the discharge
    package of each discharged record (addressed to those of ``targets`` serving its aftercare).

    :param audit: records the write's AuditEvent in the same unit of work.
    """
    with st.unit(all_or_nothing=True) as uow:
        results = [save_record(uow, record, f"/{i}" if len(records) > 1 else "") for i, record in enumerate(records)]
        for record in records:
            discharge.schedule_discharge(uow, record, targets or {})
        if audit is not None:
            audit(uow, results)
        return results


def _audit_records(uow: UnitOfWork, results: list[RecordResult]) -> None:
    """The request's AuditEvent, naming every resource written, inside the records' unit of work."""
    disclosure.audit_write(uow, *(f"{r['reference']}/_history/{r['version']}" for result in results for r in result.resources))


def save_record(uow: UnitOfWork, record: IopRecord, pointer: str = "") -> RecordResult:
    """One record's Bundle through the transaction processor, then its stale resources deleted."""
    ids = MappingContext(record).ids
    bundle = record_to_bundle(record)
    try:
        entries = check_transaction(bundle)
    except IopFhirError as exc:
        # A valid record mapping to invalid FHIR is our bug, not the client's.
        raise RuntimeError(f"record {record.id} mapped to invalid FHIR: {exc.issues[:3]}") from exc
    manifest = ids.id("Provenance", provenance.KIND, record.id, shared=True)
    before = _targets(uow, manifest)
    try:
        results = apply_transaction(uow, entries, Options())
    except IopFhirError as exc:
        raise _at_record(exc, bundle, record.id, pointer) from None
    out = RecordResult(record.id, [_resource_json(r) for r in results if r.saved is not None])
    out.created = any(r.saved is not None and r.saved.resource_type == "EpisodeOfCare" and r.saved.created for r in results)
    kept = {r.saved.reference for r in results if r.saved is not None}
    for rtype, rid in before:
        if f"{rtype}/{rid}" in kept:
            continue
        try:
            stale = uow.read(rtype, rid)
        except (NotFound, Gone):
            continue
        if owned_by_episode(stale.resource, ids.base, record.id):
            gone = uow.delete(rtype, rid)
            out.resources.append({"reference": f"{rtype}/{rid}", "version": gone.version, "outcome": "deleted"})
    return out


def _targets(ops: UnitOfWork | Store, provenance_id: str) -> list[tuple[str, str]]:
    """``(type, id)`` of what a record's Provenance names, or nothing when there is none."""
    try:
        found = ops.read("Provenance", provenance_id)
    except (NotFound, Gone):
        return []
    out = []
    for target in found.resource.get("target") or ():
        rtype, _, rid = str(target.get("reference", "")).partition("/")
        if rtype and rid:
            out.append((rtype, rid))
    return out


def owned_by_episode(resource: JSON, base: str, record_id: str) -> bool:
    """Whether an identifier of the program's systems marks the resource as the episode's own:
    value ``{record_id}/...``, or ``{record_id}`` itself (the episode, its care team)."""
    for ident in resource.get("identifier") or ():
        system, value = ident.get("system"), ident.get("value")
        if isinstance(system, str) and system.startswith(base + "/") and isinstance(value, str):
            if value == record_id or value.startswith(record_id + "/"):
                return True
    return False


def _resource_json(result: EntryResult) -> JSON:
    assert result.saved is not None
    return {"reference": result.saved.reference, "version": result.saved.version, "outcome": result.outcome}


def _at_record(exc: IopFhirError, bundle: JSON, record_id: str, pointer: str) -> IopFhirError:
    """A store error on a record's entry re-told for the record's client: which resource
    (type and business identifier), located at the record."""
    issues = []
    for issue in exc.issues:
        found = re.match(r"Bundle\.entry\[(\d+)\]", issue.location)
        what = bundle["entry"][int(found.group(1))]["request"]["url"] if found else ""
        issues.append(Issue(f"record {record_id}: {what + ': ' if what else ''}{issue.message}", pointer, issue.severity, issue.code))
    error = IopFhirError(f"record {record_id} could not be stored: {exc.message}", issues)
    error.status = exc.status
    return error


# --- rebuilding ---------------------------------------------------------------------------------


def rebuild_record(
    st: Store, record_id: str, system: str | None = None, *, screen: Screen | None = None, seen: Seen | None = None
) -> tuple[IopRecord, list[Issue]]:
    """The record stored under ``record_id`` and the mapping warnings.

    :param screen: what a recipient may be shown of the record's resources (its consent
        decision); None for the program itself.
    :param seen: told which resources make the record (the request's audit).
    :raises NotFound: no episode with that id.
    :raises VersionConflict: several programs hold one (choose with ``system``).
    :raises RecordNotRebuilt: the stored resources no longer make a valid record.
    :raises ConsentDenied: the recipient may not see the episode, or what it may see makes no record.
    """
    episode, base = find_episode(st, record_id, system)
    resources = record_resources(st, episode, base, record_id)
    if seen is not None:
        seen(resources)
    if screen is not None:
        resources = screen(resources)
        if not any(s.reference == episode.reference for s in resources):
            raise ConsentDenied(NOT_AVAILABLE, [Issue(NOT_AVAILABLE, code="suppressed")])
    result = resources_to_record([s.resource for s in resources])
    if screen is not None and (result.record is None or result.report.errors):
        # what is missing would show in the report: say no more than that the record is not available
        raise ConsentDenied(NOT_AVAILABLE, [Issue(NOT_AVAILABLE, code="suppressed")])
    if result.record is None or result.report.errors:
        issues = [Issue(f"the stored resources of record {record_id} no longer make a valid record", "", "error", "conflict")]
        raise RecordNotRebuilt(issues[0].message, issues + [i for i in result.report.issues if i.severity != "information"])
    return result.record, [i for i in result.report.issues if i.severity == "warning"]


def find_episode(st: Store, record_id: str, system: str | None) -> tuple[Saved, str]:
    """The EpisodeOfCare whose identifier is ``{base}/episode|{record_id}``, and ``base``."""
    if not ID_PATTERN.fullmatch(record_id):
        raise NotFound(f"{record_id!r} is not a record id")
    wanted = None if system is None else system.rstrip("/") if system.rstrip("/").endswith(EPISODE_SUFFIX) else system.rstrip("/") + EPISODE_SUFFIX
    candidates: dict[str, Saved] = {}
    for saved in every(st, "EpisodeOfCare", [("identifier", record_id)]):
        for ident in saved.resource.get("identifier") or ():
            sys = ident.get("system")
            if ident.get("value") == record_id and isinstance(sys, str) and sys.endswith(EPISODE_SUFFIX) and wanted in (None, sys):
                candidates[sys] = saved
    if not candidates:
        raise NotFound(f"no record {record_id}" + (f" in {wanted}" if wanted else ""))
    if len(candidates) > 1:
        issues = [Issue(f"record {record_id} exists in {sys}; add ?system={sys}", "system", code="multiple-matches") for sys in sorted(candidates)]
        raise VersionConflict(f"{len(candidates)} programs hold a record {record_id}; name one with ?system=", issues)
    sys, saved = next(iter(candidates.items()))
    return saved, sys[: -len(EPISODE_SUFFIX)]


def record_resources(st: Store, episode: Saved, base: str, record_id: str) -> list[Saved]:
    """The resources of one record: its Provenance's targets, or gathered by scope without one."""
    manifest = resource_id("Provenance", f"{base}/{provenance.KIND}", record_id)
    targets = _targets(st, manifest)
    if targets:
        return read_references(st, targets, set())
    patient = str((episode.resource.get("patient") or {}).get("reference", ""))
    found = [episode]
    for rtype in COMPARTMENT_TYPES:
        if rtype != "EpisodeOfCare":
            found += [s for s in every(st, rtype, [("patient", patient)]) if owned_by_episode(s.resource, base, record_id)]
    reviews = every(st, "Task", [("identifier", f"{base}/{medication_review.KIND}|")])
    found += [s for s in reviews if owned_by_episode(s.resource, base, record_id)]
    have = {s.reference for s in found}
    found += parties(st, found, "", have, frozenset({"Patient", "Practitioner", "PractitionerRole", "Organization"}))
    # The reverse mappers keep the order they meet items in; resources one transaction wrote
    # carry increasing lastUpdated in Bundle order, which is the record's order.
    return sorted(found, key=lambda s: (s.last_updated, s.reference))
