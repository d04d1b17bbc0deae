"""FHIR operations: ``Patient/{id}/$everything``, ``Patient/{id}/$medication-history`` and
``$validate`` on every type.

Each is listed in ``app.extensions["iop_fhir.operations"]`` (name, canonical definition, resource
types, level) so the CapabilityStatement names exactly what is served.

**$everything** (GET or POST; http://hl7.org/fhir/OperationDefinition/Patient-everything): the
Patient, then every resource the store holds in its compartment (each searchable type whose
``patient`` parameter names it: MedicationRequest, Observation, CarePlan, Condition,
Encounter, EpisodeOfCare, MedicationDispense, MedicationStatement, Consent, Goal, CareTeam,
Provenance), then the resources those reach that the store cannot search by patient (Task
reached through Provenance.target, kept when its ``for``/``subject`` names the patient), all
``search.mode = match``; then the parties they reference, followed transitively
(Practitioner, PractitionerRole, Organization, Location, Medication, ...) as ``include``.
AuditEvents are left out: they are security records, not care. Parameters: ``start`` /
``end`` (care dates: each type's date parameter, ``authoredon``, ``date``, ``onset-date``...;
resources of a dated type without a date are left out when either is given), ``_since``
(``meta.lastUpdated``), ``_type`` (comma list), ``_count`` with ``_offset`` for pages (no
``_count``: everything in one Bundle). Pages are offsets into a list rebuilt per request, so
a page may shift when the patient's data changes between requests.

**$medication-history** (GET or POST; :data:`MEDICATION_HISTORY_URL`, served as an
OperationDefinition at ``/fhir/OperationDefinition/Patient-medication-history``): for aftercare
providers, every MedicationRequest, MedicationDispense, MedicationStatement and adherence
Observation (LOINC 71799-1, and the proportion of days covered computed from fills) of the patient as a ``searchset`` Bundle (type searchset because it
is a query result with match and include modes and a total), newest first by
``authoredOn`` / ``whenHandedOver`` (else ``whenPrepared``) / ``effective[x]`` (else
``dateAsserted``, for Observations ``issued``), falling back to ``meta.lastUpdated``; ties by
``meta.lastUpdated`` newest first, then type and id. Included (``search.mode = include``): the
Patient, the prescribers (``requester``: Practitioner, or PractitionerRole with its
Practitioner and Organization), the pharmacies (``dispenseRequest.performer``,
``MedicationDispense.performer.actor``) and Medication resources named by
``medicationReference``. Unknown patient: 404; deleted: 410. No parameters; everything in one
Bundle (an episode's medication history is bounded).

**$validate** (POST ``/fhir/{type}/$validate`` and ``/fhir/{type}/{id}/$validate``): the body
is the resource, or a Parameters resource with ``resource`` and optionally ``mode``
(create | update | delete; also accepted as ``?mode=``) and ``profile`` (noted, not checked:
the base R4 rules are). Answers 200 with an OperationOutcome of the findings, or one
information issue saying it is valid; stores nothing. Unknown type: 404. A body that is not
JSON or XML at all is a 400 (that is the request failing, not the resource).

Unknown parameters are ignored, or a 400 under ``Prefer: handling=strict``.

For a recipient of a disclosure (:mod:`.disclosure`), ``$everything`` and
``$medication-history`` pass what they gathered through its consent decision before anything
else is derived from it: withheld resources are left out, the parties included are those the
released copies reference, ``total`` and the pages count only what is released, and the Bundle
says data was withheld (``meta.security`` ``REDACTED``, an outcome entry) without saying what.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, request
from flask.blueprints import BlueprintSetupState

from iop_fhir.api import disclosure, store
from iop_fhir.api.bundles import fhir_base, prefer, references
from iop_fhir.api.search import mark_released
from iop_fhir.api.negotiate import EmptyBody, read_body, respond
from iop_fhir.errors import IopFhirError, Issue, NotFound, RecordInvalid, operation_outcome
from iop_fhir.formats import fhir_validate
from iop_fhir.store import Saved, Store, instant
from iop_fhir.store.search_index import PARAMETERS, date_range, parse_reference, search_parameters
from iop_fhir.terminology import CANONICAL, LOINC, code_system

JSON = dict[str, Any]

bp = Blueprint("operations", __name__, url_prefix="/fhir")

OPERATIONS_KEY = "iop_fhir.operations"
EVERYTHING_URL = "http://hl7.org/fhir/OperationDefinition/Patient-everything"
VALIDATE_URL = "http://hl7.org/fhir/OperationDefinition/Resource-validate"
MEDICATION_HISTORY_ID = "Patient-medication-history"
MEDICATION_HISTORY_URL = f"{CANONICAL}/OperationDefinition/{MEDICATION_HISTORY_ID}"
# adherence as reported (LOINC 71799-1) and as computed from pharmacy fills (proportion of days covered)
ADHERENCE_CODE = f"{LOINC}|71799-1,{code_system('adherence-measure')}|pdc"

# The types the store searches by patient, in the order $everything lists them. AuditEvent
# is a security record: it does not go out with the patient's care data.
COMPARTMENT_TYPES: tuple[str, ...] = tuple(t for t in PARAMETERS if "patient" in search_parameters(t) and t != "AuditEvent")
# Each compartment type's care date, for $everything's start and end.
CARE_DATES = {
    "MedicationRequest": "authoredon",
    "Observation": "date",
    "CarePlan": "date",
    "Condition": "onset-date",
    "Encounter": "date",
    "EpisodeOfCare": "date",
    "MedicationDispense": "whenhandedover",
    "MedicationStatement": "effective",
    "Consent": "date",
    "Provenance": "recorded",
}
# Who and what care resources point at without belonging to one patient: followed as includes.
PARTY_TYPES = frozenset(
    {"Practitioner", "PractitionerRole", "Organization", "Location", "Medication", "Device", "HealthcareService", "Endpoint", "RelatedPerson", "Substance"}
)
# Elements that say whose a resource is (R4 compartment-patient "for", "subject", ...).
_PATIENT_ELEMENTS = ("patient", "subject", "for", "beneficiary")
PAGE = 500  # rows per store page while gathering

OPERATIONS: list[JSON] = [
    {"name": "everything", "definition": EVERYTHING_URL, "types": ["Patient"], "level": "instance"},
    {"name": "medication-history", "definition": MEDICATION_HISTORY_URL, "types": ["Patient"], "level": "instance"},
    {
        "name": "validate",
        "definition": VALIDATE_URL,
        "types": ["*"],  # every R4 type
        "level": "type",
        "levels": ["type", "instance"],
    },
]


class InvalidParameters(IopFhirError):
    """An operation parameter the server cannot use (named in the issue's location)."""

    status = 400
    issue_code = "invalid"


@bp.record_once
def _register(state: BlueprintSetupState) -> None:
    state.app.extensions.setdefault(OPERATIONS_KEY, []).extend(dict(op) for op in OPERATIONS)


# --- parameters -------------------------------------------------------------------------------


def operation_params(known: Iterable[str]) -> dict[str, str]:
    """The operation's parameters from the query string and, for a POST, a Parameters body.

    Unknown names are ignored, or a 400 under ``Prefer: handling=strict``; a name given twice
    is a 400.
    """
    pairs = [(k, v) for k, v in request.args.items(multi=True) if k not in ("_format", "_pretty")]
    if request.method == "POST" and request.get_data(cache=True).strip():
        body = read_body()
        if body.get("resourceType") != "Parameters":
            message = f"the operation takes a Parameters resource, not {body.get('resourceType')}"
            raise InvalidParameters(message, [Issue(message, "resourceType", code="not-supported")])
        for i, param in enumerate(body.get("parameter") or ()):
            value = next((v for k, v in param.items() if k.startswith("value")), None)
            if value is None or isinstance(value, (dict, list)):
                message = f"parameter {param.get('name')!r} needs a primitive value[x]"
                raise InvalidParameters(message, [Issue(message, f"Parameters.parameter[{i}]", code="value")])
            pairs.append((str(param.get("name")), str(value).lower() if isinstance(value, bool) else str(value)))
    wanted = set(known)
    out: dict[str, str] = {}
    strict = (prefer("handling") or "").lower() == "strict"
    for name, value in pairs:
        if name not in wanted:
            if strict:
                raise InvalidParameters(f"unknown parameter {name!r}", [Issue(f"unknown parameter {name!r} (Prefer: handling=strict)", name, code="not-supported")])
            continue
        if name in out:
            raise InvalidParameters(f"{name} is given twice", [Issue(f"{name} is given twice", name, code="value")])
        out[name] = value
    return out


def _whole(params: dict[str, str], name: str, maximum: int | None = None) -> int | None:
    text = params.get(name)
    if text is None:
        return None
    if not text.isdigit() or (maximum is not None and int(text) > maximum):
        bound = f" up to {maximum}" if maximum is not None else ""
        raise InvalidParameters(f"{name} must be a whole number{bound}", [Issue(f"{name}={text!r} is not a whole number{bound}", name, code="value")])
    return int(text)


def _date(params: dict[str, str], name: str) -> str | None:
    text = params.get(name)
    if text is not None and date_range(text) is None:
        raise InvalidParameters(f"{name} is not a date", [Issue(f"{name}={text!r} is not a date (YYYY, YYYY-MM, YYYY-MM-DD or a dateTime)", name, code="value")])
    return text


# --- gathering --------------------------------------------------------------------------------


def every(st: Store, resource_type: str, params: list[tuple[str, str]]) -> list[Saved]:
    """Every live match of a search, page after page."""
    out: list[Saved] = []
    cursor = None
    while True:
        page = st.search(resource_type, params, count=PAGE, cursor=cursor)
        out.extend(page.entries)
        cursor = page.next_cursor
        if cursor is None:
            return out


def _reference_targets(value: Any, base: str) -> list[tuple[str, str]]:
    """``(type, id)`` of every literal reference inside ``value`` that names this server."""
    out = []
    for ref, _ in references(value):
        text = ref["reference"]
        parsed = parse_reference(text) if "://" not in text or text.startswith(base + "/") else None
        if parsed and parsed[0]:
            out.append((parsed[0], parsed[1]))
    return out


def read_references(st: Store, wanted: Iterable[tuple[str, str]], have: set[str]) -> list[Saved]:
    """The live resources among ``wanted`` not yet in ``have`` (updated), by type then request order."""
    by_type: dict[str, list[str]] = {}
    for rtype, rid in wanted:
        if f"{rtype}/{rid}" not in have:
            by_type.setdefault(rtype, []).append(rid)
    out: list[Saved] = []
    for rtype in sorted(by_type):
        for saved in st.read_many(rtype, by_type[rtype]):
            have.add(saved.reference)
            out.append(saved)
    return out


def parties(st: Store, resources: list[Saved], base: str, have: set[str], types: frozenset[str] = PARTY_TYPES) -> list[Saved]:
    """The parties ``resources`` reference, followed until none is new (a PractitionerRole
    brings its Practitioner and Organization)."""
    out: list[Saved] = []
    frontier = resources
    while frontier:
        wanted = [(t, i) for s in frontier for t, i in _reference_targets(s.resource, base) if t in types]
        frontier = read_references(st, wanted, have)
        out.extend(frontier)
    return out


def _names_patient(resource: JSON, patient: str) -> bool:
    """Whether the resource's ``patient``/``subject``/``for``/``beneficiary`` is ``Patient/{id}``."""
    for name in _PATIENT_ELEMENTS:
        value = resource.get(name)
        for ref in value if isinstance(value, list) else [value]:
            found = parse_reference(ref["reference"]) if isinstance(ref, dict) and isinstance(ref.get("reference"), str) else None
            if found and f"{found[0]}/{found[1]}" == patient:
                return True
    return False


def searchset(matches: list[Saved], includes: list[Saved], base: str, *, total: int | None = None, links: list[JSON] | None = None) -> JSON:
    """A searchset Bundle: ``matches`` with mode match, ``includes`` with mode include."""
    entries = [
        {"fullUrl": f"{base}/{s.reference}", "resource": s.resource, "search": {"mode": mode}}
        for group, mode in ((matches, "match"), (includes, "include"))
        for s in group
    ]
    bundle: JSON = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": instant(store().clock())},
        "type": "searchset",
        "total": len(matches) if total is None else total,
    }
    if links:
        bundle["link"] = links
    if entries:
        bundle["entry"] = entries
    return bundle


# --- $everything ------------------------------------------------------------------------------


@bp.route("/Patient/<pid>/$everything", methods=["GET", "POST"])
def everything(pid: str) -> Response:
    """``Patient/{id}/$everything``: the patient's compartment and the parties it references."""
    params = operation_params(("start", "end", "_since", "_type", "_count", "_offset"))
    start, end, since = _date(params, "start"), _date(params, "end"), _date(params, "_since")
    count = _whole(params, "_count")
    offset = _whole(params, "_offset") or 0
    types = {t.strip() for t in params["_type"].split(",") if t.strip()} if "_type" in params else None
    for name in types or ():
        if not fhir_validate.is_r4_resource_type(name):
            raise InvalidParameters(f"_type names {name!r}", [Issue(f"{name!r} is not an R4 resource type", "_type", code="value")])
    st, base = store(), fhir_base()
    patient = st.read("Patient", pid)
    reference = patient.reference
    matches = [patient] if _wanted(types, "Patient", patient, since) else []
    have = {reference}
    for rtype in COMPARTMENT_TYPES:
        if types is not None and rtype not in types:
            continue
        criteria = [("patient", reference)]
        if since:
            criteria.append(("_lastUpdated", f"ge{since}"))
        if rtype in CARE_DATES:
            criteria += [(CARE_DATES[rtype], f"{prefix}{day}") for prefix, day in (("ge", start), ("le", end)) if day]
        found = every(st, rtype, criteria)
        have.update(s.reference for s in found)
        matches.extend(found)
    # Types the store cannot search by patient (Task) are reached through the patient's
    # Provenances (whichever _type asked for).
    reached = [
        (t, i)
        for s in every(st, "Provenance", [("patient", reference)])
        for t, i in _reference_targets(s.resource.get("target"), base)
        if t not in COMPARTMENT_TYPES and t not in PARTY_TYPES and t != "Patient"
    ]
    matches.extend(
        s for s in read_references(st, reached, have) if _names_patient(s.resource, reference) and _wanted(types, s.resource_type, s, since)
    )
    keeper = disclosure.gatekeeper()
    disclosure.note(patients=[pid])
    if keeper is not None:  # before anything is derived from them: includes, totals, pages
        matches = keeper.screen(matches)
    includes = [s for s in parties(st, matches, base, have) if types is None or s.resource_type in types]
    if keeper is not None:
        includes = keeper.screen(includes)
    everything_found = [*matches, *includes]
    total = len(everything_found)
    if count is None:
        return respond(mark_released(searchset(matches, includes, base, total=total), keeper))
    # matches come first in the list, so a page splits into its matches and its includes
    split = min(max(len(matches) - offset, 0), count)
    page = everything_found[offset : offset + count]
    page_matches, page_includes = page[:split], page[split:]
    own = [(k, v) for k, v in params.items() if k not in ("_count", "_offset")]
    url = f"{base}/Patient/{pid}/$everything"
    links = [_link("self", url, own, count, offset)]
    if offset + count < total:
        links.append(_link("next", url, own, count, offset + count))
    if offset > 0:
        links.append(_link("previous", url, own, count, max(0, offset - count)))
    return respond(mark_released(searchset(page_matches, page_includes, base, total=total, links=links), keeper))


def _wanted(types: set[str] | None, rtype: str, saved: Saved, since: str | None) -> bool:
    if types is not None and rtype not in types:
        return False
    if since is None:
        return True
    low = date_range(since)
    return low is None or _micros(saved.last_updated) >= low[0]


def _micros(moment: datetime) -> int:
    found = date_range(instant(moment))
    return found[0] if found else 0


def _link(relation: str, url: str, own: list[tuple[str, str]], count: int, offset: int) -> JSON:
    return {"relation": relation, "url": f"{url}?{urlencode([*own, ('_count', str(count)), ('_offset', str(offset))])}"}


# --- $medication-history ----------------------------------------------------------------------

# Where each kind of medication resource keeps its date, in order of preference.
_EVENT_DATES: dict[str, tuple[tuple[str, ...], ...]] = {
    "MedicationRequest": (("authoredOn",),),
    "MedicationDispense": (("whenHandedOver",), ("whenPrepared",)),
    "MedicationStatement": (("effectiveDateTime",), ("effectivePeriod", "start"), ("effectivePeriod", "end"), ("dateAsserted",)),
    "Observation": (("effectiveDateTime",), ("effectiveInstant",), ("effectivePeriod", "start"), ("effectivePeriod", "end"), ("issued",)),
}
# What the history includes: prescribers, pharmacies, the drug when it is a resource.
_HISTORY_INCLUDES: dict[str, tuple[tuple[str, ...], ...]] = {
    "MedicationRequest": (("requester",), ("dispenseRequest", "performer"), ("medicationReference",)),
    "MedicationDispense": (("performer", "actor"), ("medicationReference",)),
    "MedicationStatement": (("medicationReference",),),
    "Observation": (),
}


def event_time(saved: Saved) -> int:
    """When a medication event happened (microseconds since the epoch), for newest-first order."""
    resource = saved.resource
    for path in _EVENT_DATES.get(saved.resource_type, ()):
        value: Any = resource
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        found = date_range(value) if isinstance(value, str) else None
        if found:
            return found[0]
    return _micros(saved.last_updated)


def _at_path(value: Any, path: tuple[str, ...]) -> list[Any]:
    items = [value]
    for step in path:
        nxt: list[Any] = []
        for item in items:
            found = item.get(step) if isinstance(item, dict) else None
            nxt.extend(found if isinstance(found, list) else [found] if found is not None else [])
        items = nxt
    return items


@bp.route("/Patient/<pid>/$medication-history", methods=["GET", "POST"])
def medication_history(pid: str) -> Response:
    """``Patient/{id}/$medication-history``: the medication events of a patient, newest first,
    with prescribers, pharmacies and the patient included (see the module doc)."""
    operation_params(())
    st, base = store(), fhir_base()
    patient = st.read("Patient", pid)
    subject = ("patient", patient.reference)
    matches = [
        *every(st, "MedicationRequest", [subject]),
        *every(st, "MedicationDispense", [subject]),
        *every(st, "MedicationStatement", [subject]),
        *every(st, "Observation", [subject, ("code", ADHERENCE_CODE)]),
    ]
    matches.sort(key=lambda s: (-event_time(s), -_micros(s.last_updated), s.resource_type, s.id))
    keeper = disclosure.gatekeeper()
    disclosure.note(patients=[pid])
    if keeper is not None:
        matches = keeper.screen(matches)
    have = {patient.reference, *(s.reference for s in matches)}
    wanted = [
        (t, i)
        for s in matches
        for path in _HISTORY_INCLUDES[s.resource_type]
        for ref in _at_path(s.resource, path)
        for t, i in _reference_targets(ref, base)
        if t in PARTY_TYPES
    ]
    direct = read_references(st, wanted, have)
    includes = [patient, *direct, *parties(st, direct, base, have, frozenset({"Practitioner", "Organization"}))]
    if keeper is not None:
        includes = keeper.screen(includes)
    return respond(mark_released(searchset(matches, includes, base), keeper))


@bp.get(f"/OperationDefinition/{MEDICATION_HISTORY_ID}")
def medication_history_definition() -> Response:
    """The OperationDefinition of ``$medication-history`` at its canonical's id."""
    return respond(MEDICATION_HISTORY_DEFINITION)


MEDICATION_HISTORY_DEFINITION: JSON = {
    "resourceType": "OperationDefinition",
    "id": MEDICATION_HISTORY_ID,
    "url": MEDICATION_HISTORY_URL,
    "version": "1.0.0",
    "name": "PatientMedicationHistory",
    "title": "A patient's medication history, for aftercare",
    "status": "active",
    "kind": "operation",
    "publisher": "iop-fhir",
    "description": (
        "Every MedicationRequest, MedicationDispense, MedicationStatement and adherence Observation "
        "(LOINC 71799-1, and proportion of days covered from fills) of the patient, newest first (authoredOn, whenHandedOver, effective[x] or "
        "dateAsserted, else meta.lastUpdated), with the patient, the prescribers (requester) and the "
        "pharmacies (dispenseRequest.performer, MedicationDispense.performer.actor) included."
    ),
    "affectsState": False,
    "code": "medication-history",
    "resource": ["Patient"],
    "system": False,
    "type": False,
    "instance": True,
    "parameter": [
        {
            "name": "return",
            "use": "out",
            "min": 1,
            "max": "1",
            "documentation": "A searchset Bundle: the medication resources (search.mode match, newest first), then the included parties (search.mode include).",
            "type": "Bundle",
        }
    ],
}


# --- $validate --------------------------------------------------------------------------------

_MODES = ("create", "update", "delete")


@bp.post("/<rtype>/$validate")
@bp.post("/<rtype>/<rid>/$validate")
def validate(rtype: str, rid: str | None = None) -> Response:
    """``$validate``: the findings on a resource as an OperationOutcome (200); nothing is stored."""
    if not fhir_validate.is_r4_resource_type(rtype):
        raise NotFound(f"{rtype!r} is not a resource type this server knows", [Issue(f"unknown resource type {rtype!r}", "type", code="not-supported")])
    try:
        resource, mode, notes = _validate_input(rtype)
    except RecordInvalid as exc:
        # The body parsed but breaks the FHIR JSON/XML rules: findings, not a failed request.
        return respond(operation_outcome(exc.issues))
    issues = notes + _findings(rtype, rid, resource, mode)
    if not any(i.severity in ("error", "fatal") for i in issues):
        what = f"{rtype}/{rid}" if rid else rtype
        issues.append(Issue(f"{what}: valid for {mode or 'any mode'}", severity="information", code="informational"))
    return respond(operation_outcome(issues))


def _validate_input(rtype: str) -> tuple[JSON | None, str | None, list[Issue]]:
    """The resource, the mode and notes (an unchecked profile) from the body and query."""
    mode = request.args.get("mode")
    notes: list[Issue] = []
    try:
        body: JSON | None = read_body()
    except EmptyBody:
        body = None
    resource = body
    if body is not None and body.get("resourceType") == "Parameters" and rtype != "Parameters":
        resource = None
        for i, param in enumerate(body.get("parameter") or ()):
            name = param.get("name")
            if name == "resource":
                resource = param.get("resource")
            elif name == "mode":
                mode = param.get("valueCode") or param.get("valueString")
            elif name == "profile":
                notes.append(Issue(f"profile {param.get('valueUri') or param.get('valueCanonical')} is not checked; the base R4 rules are", f"Parameters.parameter[{i}]", "warning", "not-supported"))
            else:
                notes.append(Issue(f"parameter {name!r} is not one of resource, mode, profile; ignored", f"Parameters.parameter[{i}]", "warning", "not-supported"))
    if mode is not None and mode not in _MODES:
        raise InvalidParameters(f"mode {mode!r} is not create, update or delete", [Issue(f"mode {mode!r} is not one of {', '.join(_MODES)}", "mode", code="value")])
    if resource is None and mode != "delete":
        message = "$validate needs a resource: the body, or a Parameters resource with a 'resource' parameter"
        raise InvalidParameters(message, [Issue(message, "resource", code="required")])
    return resource, mode, notes


def _findings(rtype: str, rid: str | None, resource: JSON | None, mode: str | None) -> list[Issue]:
    if mode == "delete":
        if rid is None:
            raise InvalidParameters("mode=delete needs the instance: POST [type]/[id]/$validate", [Issue("mode delete needs an id in the URL", "mode", code="required")])
        try:
            store().read(rtype, rid)
        except IopFhirError:
            return [Issue(f"{rtype}/{rid} does not exist (deleting it changes nothing)", f"{rtype}.id", "warning", "not-found")]
        return []
    assert resource is not None
    if resource.get("resourceType") != rtype:
        return [Issue(f"resourceType {resource.get('resourceType')!r} is not {rtype}", "resourceType", code="value")]
    issues = fhir_validate.validate_resource(resource)
    given = resource.get("id")
    if mode == "update" and given is None:
        issues.append(Issue("an update needs the resource's id", f"{rtype}.id", code="required"))
    if rid is not None and given is not None and given != rid:
        issues.append(Issue(f"the resource's id {given!r} is not {rid!r} from the URL", f"{rtype}.id", code="value"))
    return issues
