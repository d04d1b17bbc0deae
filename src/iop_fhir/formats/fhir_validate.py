"""Validation of FHIR R4 JSON dicts: the fhir.resources R4B models plus what they leave out.

Why R4B models: fhir.resources has no R4 package; R4B (4.3) matches R4 (4.0.1) for every
resource the gateway exchanges. Resource types that exist only in R4B, or whose R4B model is a
different shape from R4 (Evidence, EvidenceVariable), are refused by :func:`model_class`.

What ``model_validate`` checks: structure, unknown elements, cardinality 1..1/1..*, choice types
``value[x]``, primitive regexes (dates, ids, codes' whitespace). What it does not (each found by
experiment against fhir.resources 8.x; the tests pin them) and this module adds:

* **required value-set bindings** — ``Patient.gender = "bogus"`` passes the model. The codes
  for the bindings our gateway and its clients use are in :data:`REQUIRED_CODES` (one table,
  FHIR R4 4.0.1). Keys are ``Type.element`` of the model class, so datatype bindings
  (``ContactPoint.system``, ``TimingRepeat.periodUnit``) apply wherever the type appears and
  nested backbones (``ConsentProvision.type``) at any depth.
* **the FHIR JSON rule on empties and nulls** — ``"identifier": []`` and ``{}`` pass, and so
  does ``""`` where the type's regex allows it (``markdown``: ``Annotation.text``).
* **JSON primitive types** — ``"numberOfRepeatsAllowed": "3"``, ``"doNotPerform": "true"`` and
  ``"value": "1.5"`` pass (pydantic coerces, even in strict mode); FHIR JSON wants numbers and
  booleans as such.
* **resources without resourceType** — ``contained: [{"id": "x"}]`` passes as a bare Resource;
  an unknown ``resourceType`` there escapes as a bare ``KeyError``.
* **ext-1** — an Extension with neither a value nor nested extensions passes.
* **the narrative** — ``text.div`` may be any string: not XHTML, or with ``<script>`` and
  ``onclick`` (txt-1, txt-2); it is parsed here through :mod:`.safe_xml`.
* **id length** — ``id`` is at most 64 characters; the model checks only the characters.

Keep it lean: the benchmark measures "conversion + validation" against "validation alone", so
validation is one ``model_validate`` (result discarded, nothing dumped) plus one walk over the
dict guided by cached per-class element tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.extension import Extension as _EXTENSION
from fhir.resources.R4B.resource import Resource
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from fhir_core.utils import (
    determine_version_prefix_from_class,
    get_fhir_type_name,
    is_list_type,
    is_primitive_type,
)
from pydantic import ValidationError

from ..errors import Issue, RecordInvalid
from . import safe_xml
from .fhir_json import empty_and_null_issues, summary

__all__ = [
    "R4B_ONLY_RESOURCE_TYPES",
    "REQUIRED_CODES",
    "ElementInfo",
    "elements_of",
    "is_r4_resource_type",
    "model_class",
    "narrative_problem",
    "require_valid",
    "validate_bundle_entries",
    "validate_resource",
]

# Resource types fhir.resources.R4B has but FHIR R4 4.0.1 does not, or has in another shape.
R4B_ONLY_RESOURCE_TYPES = frozenset(
    {
        "AdministrableProductDefinition",
        "Citation",
        "ClinicalUseDefinition",
        "EvidenceReport",
        "Ingredient",
        "ManufacturedItemDefinition",
        "MedicinalProductDefinition",
        "NutritionProduct",
        "PackagedProductDefinition",
        "RegulatedAuthorization",
        "SubscriptionStatus",
        "SubscriptionTopic",
        "SubstanceDefinition",
        # In R4 too, but rebuilt in R4B: an R4 instance does not fit the R4B model.
        "Evidence",
        "EvidenceVariable",
    }
)

_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{0,63}")

_REQUEST_INTENT = (
    "proposal plan order original-order reflex-order filler-order instance-order option"
)
_ADMIN_GENDER = "male female other unknown"
_REQUEST_PRIORITY = "routine urgent asap stat"
_QUANTITY_COMPARATOR = "< <= >= >"
_DAYS_OF_WEEK = "mon tue wed thu fri sat sun"

# Required bindings, FHIR R4 4.0.1: "ModelClass.element" -> allowed codes (space separated), or
# for a CodeableConcept (system, codes): at least one coding from that system, all of them valid.
_CODE_TABLE: dict[str, str | tuple[str, str]] = {
    # datatypes: wherever they appear
    "Address.use": "home work temp old billing",
    "Address.type": "postal physical both",
    "ContactPoint.system": "phone fax email pager url sms other",
    "ContactPoint.use": "home work temp old mobile",
    "HumanName.use": "usual official temp nickname anonymous old maiden",
    "Identifier.use": "usual official temp secondary old",
    "Narrative.status": "generated extensions additional empty",
    "Quantity.comparator": _QUANTITY_COMPARATOR,
    "Age.comparator": _QUANTITY_COMPARATOR,
    "Count.comparator": _QUANTITY_COMPARATOR,
    "Distance.comparator": _QUANTITY_COMPARATOR,
    "Duration.comparator": _QUANTITY_COMPARATOR,
    "TimingRepeat.durationUnit": "s min h d wk mo a",
    "TimingRepeat.periodUnit": "s min h d wk mo a",
    "TimingRepeat.dayOfWeek": _DAYS_OF_WEEK,
    "TimingRepeat.when": (
        "MORN MORN.early MORN.late NOON AFT AFT.early AFT.late EVE EVE.early EVE.late NIGHT PHS "
        "HS WAKE C CM CD CV AC ACM ACD ACV PC PCM PCD PCV"
    ),
    # people
    "Patient.gender": _ADMIN_GENDER,
    "PatientContact.gender": _ADMIN_GENDER,
    "PatientLink.type": "replaced-by replaces refer seealso",
    "Practitioner.gender": _ADMIN_GENDER,
    "RelatedPerson.gender": _ADMIN_GENDER,
    "Person.gender": _ADMIN_GENDER,
    "PractitionerRoleAvailableTime.daysOfWeek": _DAYS_OF_WEEK,
    "CareTeam.status": "proposed active suspended inactive entered-in-error",
    # medications
    "MedicationRequest.status": "active on-hold cancelled completed entered-in-error stopped draft unknown",
    "MedicationRequest.intent": _REQUEST_INTENT,
    "MedicationRequest.priority": _REQUEST_PRIORITY,
    "MedicationDispense.status": (
        "preparation in-progress cancelled on-hold completed entered-in-error stopped declined unknown"
    ),
    "MedicationStatement.status": "active completed entered-in-error intended stopped on-hold unknown not-taken",
    "Medication.status": "active inactive entered-in-error",
    # clinical
    "Observation.status": "registered preliminary final amended corrected cancelled entered-in-error unknown",
    "Condition.clinicalStatus": (
        "http://terminology.hl7.org/CodeSystem/condition-clinical",
        "active recurrence relapse inactive remission resolved",
    ),
    "Condition.verificationStatus": (
        "http://terminology.hl7.org/CodeSystem/condition-ver-status",
        "unconfirmed provisional differential confirmed refuted entered-in-error",
    ),
    "CarePlan.status": "draft active on-hold revoked completed entered-in-error unknown",
    "CarePlan.intent": "proposal plan order option",
    "CarePlanActivityDetail.status": (
        "not-started scheduled in-progress on-hold completed cancelled stopped unknown entered-in-error"
    ),
    "CarePlanActivityDetail.kind": (
        "Appointment CommunicationRequest DeviceRequest MedicationRequest NutritionOrder Task "
        "ServiceRequest VisionPrescription"
    ),
    "Goal.lifecycleStatus": "proposed planned accepted active on-hold completed cancelled entered-in-error rejected",
    "ServiceRequest.status": "draft active on-hold revoked completed entered-in-error unknown",
    "ServiceRequest.intent": "directive " + _REQUEST_INTENT,
    "ServiceRequest.priority": _REQUEST_PRIORITY,
    "Task.status": (
        "draft requested received accepted rejected ready cancelled in-progress on-hold failed completed "
        "entered-in-error"
    ),
    "Task.intent": "unknown " + _REQUEST_INTENT,
    "Task.priority": _REQUEST_PRIORITY,
    # encounters and episodes
    "Encounter.status": "planned arrived triaged in-progress onleave finished cancelled entered-in-error unknown",
    "EncounterStatusHistory.status": (
        "planned arrived triaged in-progress onleave finished cancelled entered-in-error unknown"
    ),
    "EncounterLocation.status": "planned active reserved completed",
    "EpisodeOfCare.status": "planned waitlist active onhold finished cancelled entered-in-error",
    "EpisodeOfCareStatusHistory.status": "planned waitlist active onhold finished cancelled entered-in-error",
    # privacy and records
    "Consent.status": "draft proposed active rejected inactive entered-in-error",
    "ConsentProvision.type": "deny permit",
    "ConsentProvisionData.meaning": "instance related dependents authoredby",
    "DocumentReference.status": "current superseded entered-in-error",
    "AuditEvent.action": "C R U D E",
    "AuditEvent.outcome": "0 4 8 12",
    "ProvenanceEntity.role": "derivation revision quotation source removal",
    # exchange
    "Bundle.type": "document message transaction transaction-response batch batch-response history searchset collection",
    "BundleEntryRequest.method": "GET HEAD POST PUT DELETE PATCH",
    "BundleEntrySearch.mode": "match include outcome",
    "OperationOutcomeIssue.severity": "fatal error warning information",
    "OperationOutcomeIssue.code": (
        "invalid structure required value invariant security login unknown expired forbidden suppressed "
        "processing not-supported duplicate multiple-matches not-found deleted too-long code-invalid "
        "extension too-costly business-rule conflict transient lock-error no-store exception timeout "
        "incomplete throttled informational"
    ),
    "CapabilityStatement.status": "draft active retired unknown",
    "CapabilityStatement.kind": "instance capability requirements",
}

REQUIRED_CODES: dict[str, frozenset[str] | tuple[str, frozenset[str]]] = {
    key: (value[0], frozenset(value[1].split())) if isinstance(value, tuple) else frozenset(value.split())
    for key, value in _CODE_TABLE.items()
}


# --- model classes and their element tables --------------------------------------------------


def is_r4_resource_type(name: str) -> bool:
    """Whether ``name`` is an R4 resource type we hold a model for."""
    try:
        model_class(name)
    except RecordInvalid:
        return False
    return True


def model_class(resource_type: str) -> type[FHIRAbstractModel]:
    """The R4B model class for an R4 resource type.

    :raises RecordInvalid: not a resource type name, not a resource, or not in R4
        (issue located at ``resourceType``, code ``not-supported``).
    """
    if not isinstance(resource_type, str) or not _TYPE_NAME.fullmatch(resource_type):
        raise _unknown_type(resource_type, "is not a resource type name")
    return _model_class(resource_type)


@cache
def _model_class(resource_type: str) -> type[FHIRAbstractModel]:
    if resource_type in R4B_ONLY_RESOURCE_TYPES:
        raise _unknown_type(resource_type, "is not an R4 (4.0.1) resource type this gateway reads")
    try:
        cls = get_fhir_model_class(resource_type)
    except (ValueError, KeyError):
        raise _unknown_type(resource_type, "is not a FHIR R4 resource type") from None
    if not issubclass(cls, Resource) or resource_type in ("Resource", "DomainResource"):
        raise _unknown_type(resource_type, "is not a concrete FHIR resource type")
    return cls


def preload(resource_types: Iterable[str]) -> int:
    """Import the model classes of ``resource_types`` and build the element tables of every
    class they reach, now rather than in the first requests that need them (a server's
    workers then start warm: the first Bundle of the IOP's types spent ~0.5 s importing).
    Returns how many classes are ready."""
    ready: set[type[FHIRAbstractModel]] = set()
    waiting = [model_class(name) for name in resource_types]
    while waiting:
        cls = waiting.pop()
        if cls not in ready:
            ready.add(cls)
            waiting.extend(info.model for info in elements_of(cls).values() if info.model is not None)
    return len(ready)


def _unknown_type(resource_type: object, why: str) -> RecordInvalid:
    message = f"resourceType {resource_type!r} {why}"
    return RecordInvalid(message, [Issue(message, location="resourceType", code="not-supported")])


@dataclass(frozen=True, slots=True)
class ElementInfo:
    """What the walkers need to know of one element of a model class."""

    name: str  # JSON name (``class``, ``_birthDate``)
    type: str  # FHIR type: ``code``, ``CodeableConcept``, ``Resource``, ``xhtml``, ...
    many: bool
    primitive: bool
    model: type[FHIRAbstractModel] | None  # the class of a complex type; None for Resource/primitives
    json_kind: str = ""  # primitives: "bool" | "int" | "number" | "str"
    binding: Any = None  # REQUIRED_CODES entry for this element, if any


_INT_TYPES = frozenset({"integer", "positiveInt", "unsignedInt", "integer64"})

# The Python types a JSON primitive of each kind arrives as (``type(v) in ...``: bool is not int).
_ACCEPTS: dict[str, tuple[tuple[type, ...], str]] = {
    "bool": ((bool,), "a JSON boolean (true/false)"),
    "int": ((int,), "a JSON integer"),
    "number": ((int, float, Decimal), "a JSON number"),
    "str": ((str,), "a JSON string"),
}


def _json_kind(fhir_type: str) -> str:
    if fhir_type == "boolean":
        return "bool"
    if fhir_type in _INT_TYPES:
        return "int"
    if fhir_type == "decimal":
        return "number"
    return "str"


@cache
def elements_of(cls: type[FHIRAbstractModel]) -> dict[str, ElementInfo]:
    """The elements of a model class in FHIR order, keyed by JSON name.

    A primitive ``x`` is followed by its ``_x`` (id and extensions, typed ``Element``).
    Cached per class: built once, shared read-only by validation and the XML converter.
    """
    prefix = determine_version_prefix_from_class(cls)
    aliases = cls.get_alias_mapping()
    primitive_ext = get_fhir_model_class("FHIRPrimitiveExtension")
    table: dict[str, ElementInfo] = {}
    for name in cls.elements_sequence():
        field = cls.model_fields[aliases[name]]
        fhir_type = get_fhir_type_name(field, prefix=prefix)
        many = is_list_type(field)
        binding = REQUIRED_CODES.get(f"{cls.__name__}.{name}")
        if is_primitive_type(field):
            table[name] = ElementInfo(name, fhir_type, many, True, None, _json_kind(fhir_type), binding)
            table[f"_{name}"] = ElementInfo(f"_{name}", "Element", many, False, primitive_ext)
        elif fhir_type == "Resource":
            table[name] = ElementInfo(name, fhir_type, many, False, None)
        else:
            table[name] = ElementInfo(name, fhir_type, many, False, get_fhir_model_class(fhir_type), "", binding)
    return table


# --- validation -------------------------------------------------------------------------------


def validate_resource(resource: dict[str, Any]) -> list[Issue]:
    """Every problem with one FHIR R4 resource (JSON dict); an empty list when it is valid.

    Locations are FHIRPath-like: ``MedicationRequest.dosageInstruction[0].timing``.
    """
    if not isinstance(resource, dict):
        return [Issue("a FHIR resource is a JSON object", code="structure")]
    resource_type = resource.get("resourceType")
    if resource_type is None:
        return [Issue("resourceType is required", location="resourceType", code="required")]
    try:
        cls = model_class(resource_type)
    except RecordInvalid as exc:
        return list(exc.issues)

    ours = empty_and_null_issues(resource, resource_type)
    _walk(resource, cls, resource_type, ours)
    try:
        cls.model_validate(resource)
    except ValidationError as exc:
        # One issue a place: where our checks spoke (empty string, JSON type) theirs is a
        # duplicate, and below a resource whose type we refused their findings are noise.
        seen = {issue.location for issue in ours}
        refused = tuple(i.location.removesuffix("resourceType") for i in ours if i.location.endswith(".resourceType"))
        model_issues = [_from_pydantic(resource_type, error) for error in exc.errors(include_url=False)]
        return [i for i in model_issues if i.location not in seen and not i.location.startswith(refused)] + ours
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        # fhir.resources lets some inputs escape as bare exceptions (an unknown resourceType in
        # ``contained``); the walk names those precisely, so only say something if it did not.
        if not ours:
            return [Issue(f"not a valid {resource_type}: {exc!r}", location=resource_type)]
    return ours


def require_valid(resource: dict[str, Any]) -> dict[str, Any]:
    """Return ``resource`` unchanged when it is valid R4; raise :class:`RecordInvalid` otherwise."""
    issues = [issue for issue in validate_resource(resource) if issue.severity in ("error", "fatal")]
    if issues:
        raise RecordInvalid(f"invalid {resource.get('resourceType', 'resource')}: {summary(issues)}", issues)
    return resource


def validate_bundle_entries(bundle: dict[str, Any]) -> list[Issue]:
    """Validate each ``Bundle.entry.resource`` on its own, locations prefixed
    ``Bundle.entry[i].resource`` (a transaction answers per entry).

    Entries without a resource (a DELETE in a transaction) are skipped; the Bundle's own
    elements are not checked here (``validate_resource(bundle)`` does both).
    """
    issues: list[Issue] = []
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    for index, entry in enumerate(entries if isinstance(entries, list) else ()):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if resource is None:
            continue
        prefix = f"Bundle.entry[{index}].resource"
        for issue in validate_resource(resource):
            issues.append(_prefixed(issue, prefix, resource))
    return issues


def _prefixed(issue: Issue, prefix: str, resource: Any) -> Issue:
    location = issue.location
    resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
    if isinstance(resource_type, str) and (location == resource_type or location.startswith(resource_type + ".")):
        location = location[len(resource_type) :]
    elif location:
        location = "." + location
    return Issue(issue.message, location=prefix + location, severity=issue.severity, code=issue.code)


def _from_pydantic(resource_type: str, error: Any) -> Issue:
    path = resource_type
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "resource_type":
            path += ".resourceType"
        else:
            path += f".{part}"
    message = error["msg"].removeprefix("Value error, ")
    kind = error["type"]
    code = "required" if "missing" in kind else "structure" if kind == "extra_forbidden" else "value"
    return Issue(message, location=path, code=code)


def _walk(obj: dict[str, Any], cls: type[FHIRAbstractModel], path: str, issues: list[Issue]) -> None:
    """Check one object against its class: bindings, JSON primitive types, nested resource types, ext-1.

    Hot path (every node of every resource): locations are built only on the way down into
    objects or when something is wrong.
    """
    table = elements_of(cls)
    for key, value in obj.items():
        info = table.get(key)
        if info is None:
            if key == "fhir_comments":
                issues.append(Issue("fhir_comments is not part of FHIR R4 JSON", location=f"{path}.{key}", code="structure"))
            continue  # resourceType, or unknown: the model reports those
        if value is None:
            continue  # the empty/null rule reports it
        many = info.many and type(value) is list
        if info.primitive:
            if info.type == "xhtml" and type(value) is str:
                problem = narrative_problem(value)
                if problem:
                    issues.append(Issue(problem, location=f"{path}.{key}", code="value"))
                continue
            accepts = _ACCEPTS[info.json_kind][0]
            binding = info.binding
            for index, item in enumerate(value if many else (value,)):
                if item is None:
                    continue
                if type(item) not in accepts or (binding is not None and item not in binding) or (
                    info.type == "id" and len(item) > 64
                ):
                    where = f"{path}.{key}[{index}]" if many else f"{path}.{key}"
                    issues.append(_primitive_issue(item, info, where))
            continue
        for index, item in enumerate(value if many else (value,)):
            if type(item) is not dict:
                continue  # the model reports the wrong shape
            where = f"{path}.{key}[{index}]" if many else f"{path}.{key}"
            if info.model is None:  # a resource inside a resource
                _walk_resource(item, where, issues)
                continue
            if info.binding is not None:
                _check_codeable(item, info.binding, where, issues)
            _walk(item, info.model, where, issues)
    if cls is _EXTENSION and (any(key.startswith("value") for key in obj) == bool(obj.get("extension"))):
        issues.append(Issue("an extension has either a value[x] or nested extensions, not both (ext-1)", location=path))


def _walk_resource(item: dict[str, Any], where: str, issues: list[Issue]) -> None:
    resource_type = item.get("resourceType")
    if resource_type is None:
        issues.append(Issue("a resource here needs a resourceType", location=f"{where}.resourceType", code="required"))
        return
    try:
        nested = model_class(resource_type)
    except RecordInvalid as exc:
        issues.append(Issue(exc.message, location=f"{where}.resourceType", code="not-supported"))
        return
    _walk(item, nested, where, issues)


_XHTML = "http://www.w3.org/1999/xhtml"
# txt-1: no head, body, scripts, forms, base/link/xlink, frames or objects; no event handlers.
_NARRATIVE_FORBIDDEN = frozenset(
    {"head", "body", "script", "style", "form", "base", "link", "frame", "frameset", "iframe", "object", "applet", "embed"}
)


def narrative_problem(div: str) -> str | None:
    """What is wrong with a ``Narrative.div`` (txt-1, txt-2 and well-formedness), or None.

    The narrative is rendered by clients as HTML, so this is also where script injection stops.
    """
    try:
        root = safe_xml.parse(div, expected_root={f"{{{_XHTML}}}div"}, max_bytes=1024 * 1024)
    except safe_xml.XmlRejected as exc:
        return f"the narrative must be one XHTML <div> (xmlns {_XHTML}): {exc.message}"
    for el in root.iter():
        if not isinstance(el.tag, str):
            continue
        if safe_xml.namespace(el) != _XHTML or safe_xml.local_name(el) in _NARRATIVE_FORBIDDEN:
            return f"the narrative may not contain <{safe_xml.local_name(el)}> (txt-1)"
        for attribute in el.attrib:
            name = attribute.rsplit("}", 1)[-1]
            if name.lower().startswith("on") or attribute.startswith("{http://www.w3.org/1999/xlink}"):
                return f"the narrative may not use the attribute {name!r} (txt-1)"
    if not "".join(root.itertext()).strip() and root.find(f".//{{{_XHTML}}}img") is None:
        return "the narrative has no content (txt-2)"
    return None


def _primitive_issue(value: Any, info: ElementInfo, where: str) -> Issue:
    accepts, wanted = _ACCEPTS[info.json_kind]
    if type(value) not in accepts:
        return Issue(f"{info.type} must be {wanted}, got {value!r}", location=where, code="value")
    if info.binding is not None and value not in info.binding:
        allowed = ", ".join(sorted(info.binding))
        return Issue(f"{value!r} is not in the required value set ({allowed})", location=where, code="code-invalid")
    return Issue(f"id longer than 64 characters ({len(value)})", location=where, code="value")


def _check_codeable(value: dict[str, Any], binding: tuple[str, frozenset[str]], where: str, issues: list[Issue]) -> None:
    system, codes = binding
    codings = value.get("coding")
    found = False
    if isinstance(codings, list):
        for index, coding in enumerate(codings):
            if not isinstance(coding, dict) or coding.get("system") != system:
                continue
            found = True
            code = coding.get("code")
            if type(code) is not str or code not in codes:
                allowed = ", ".join(sorted(codes))
                issues.append(
                    Issue(
                        f"{code!r} is not in the required value set ({allowed})",
                        location=f"{where}.coding[{index}].code",
                        code="code-invalid",
                    )
                )
    if not found:
        issues.append(Issue(f"needs a coding from {system} (required binding)", location=where, code="code-invalid"))
