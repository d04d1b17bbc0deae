"""Search parameters: what each one indexes, and how a search value becomes SQL.

One declarative table (:data:`PARAMETERS`) names each supported parameter, its FHIR search
type and the element paths it reads; the same table drives indexing (:func:`index_rows`, run
on every write), querying (:func:`criterion`) and the CapabilityStatement
(:func:`search_parameters`). Adding a parameter is one line.

Paths are dotted element names; every step flattens arrays (``name.given``). Choice
elements are listed by their concrete names (``effectiveDateTime | effectivePeriod``). What a
value means follows from its shape: a CodeableConcept gives a token per coding, an Identifier
its ``system|value``, a Period its start and end, a HumanName its parts.

Semantics, as FHIR R4 defines them (https://hl7.org/fhir/R4/search.html):

* token: ``system|code``, ``code`` (any system), ``|code`` (no system), ``system|``;
  modifier ``:not``. Case-sensitive.
* string: starts-with, case- and accent-insensitive; ``:exact``, ``:contains``.
* date: partial dates are ranges (``2026`` is the whole year), prefixes
  ``eq ne gt lt ge le sa eb ap`` compare ranges; dates without a time zone are taken as UTC.
* reference: ``Type/id``, ``id``, an absolute URL ending in ``Type/id``, or ``:Type`` with an id.
* quantity / number: ``[prefix]number[|system|code]``; ``eq`` means within the precision of
  the number given (``5.4`` matches 5.35 up to but excluding 5.45); ``ap`` is within 10%.
* any parameter: ``:missing=true|false``. A comma inside a value is OR; repeating a
  parameter is AND.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, and_, exists, false, func, not_, or_, select, true, type_coerce

from iop_fhir.errors import IopFhirError, Issue
from iop_fhir.store.tables import (
    SEARCH_TABLES,
    resource_current,
    search_date,
    to_micros,
)

JSON = dict[str, Any]

# The range of a FHIR date: 0001-01-01 to 9999-12-31 (microseconds since the epoch, inclusive).
MIN_MICROS = to_micros(datetime(1, 1, 1, tzinfo=UTC))
MAX_MICROS = to_micros(datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))


class InvalidSearch(IopFhirError):
    """A search the store cannot run: unknown parameter or modifier, or a malformed value."""

    status = 400
    issue_code = "invalid"


@dataclass(frozen=True)
class SearchParam:
    """One search parameter of one resource type.

    :param name: the parameter's code (``authoredon``).
    :param type: the FHIR search type: token, string, date, reference, quantity, number, uri.
    :param paths: element paths, dotted; empty for ``_id`` and ``_lastUpdated``, which read
        the resource's own columns.
    :param targets: for references, the resource types kept (``patient`` keeps ``Patient``).
    """

    name: str
    type: str
    paths: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    steps: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)
    # the ``search_*`` table this parameter's rows live in (asked for every value indexed)
    table: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(tuple(p.split(".")) for p in self.paths))
        object.__setattr__(self, "table", {"uri": "token", "number": "quantity"}.get(self.type, self.type))


def _p(name: str, type_: str, paths: str = "", targets: str = "") -> SearchParam:
    return SearchParam(name, type_, tuple(p.strip() for p in paths.split("|") if p.strip()), tuple(targets.split()))


def _patient(path: str = "subject") -> tuple[SearchParam, SearchParam]:
    """``patient`` (the reference when it points at a Patient) and ``subject`` (any target)."""
    return _p("patient", "reference", path, "Patient"), _p("subject", "reference", path)


COMMON: tuple[SearchParam, ...] = (
    _p("_id", "token"),
    _p("_lastUpdated", "date"),
    _p("identifier", "token", "identifier"),
    _p("_tag", "token", "meta.tag"),
    _p("_security", "token", "meta.security"),
    _p("_profile", "uri", "meta.profile"),
)

# parameters many types share, each the same element of the same name
STATUS = _p("status", "token", "status")
CATEGORY = _p("category", "token", "category")
INTENT = _p("intent", "token", "intent")
CODE = _p("code", "token", "code")
MEDICATION_CODE = _p("code", "token", "medicationCodeableConcept")
ENCOUNTER = _p("encounter", "reference", "encounter")
PERIOD = _p("date", "date", "period")
HUMAN_NAME = (_p("name", "string", "name"), _p("family", "string", "name.family"), _p("given", "string", "name.given"))

PARAMETERS: dict[str, tuple[SearchParam, ...]] = {
    "Patient": (
        *HUMAN_NAME,
        _p("birthdate", "date", "birthDate"),
        _p("gender", "token", "gender"),
        _p("active", "token", "active"),
    ),
    "MedicationRequest": (
        *_patient(),
        STATUS,
        INTENT,
        CATEGORY,
        MEDICATION_CODE,
        _p("medication", "reference", "medicationReference"),
        _p("authoredon", "date", "authoredOn"),
        _p("requester", "reference", "requester"),
        ENCOUNTER,
    ),
    "Observation": (
        *_patient(),
        CODE,
        CATEGORY,
        _p("date", "date", "effectiveDateTime | effectivePeriod | effectiveInstant"),
        STATUS,
        _p("focus", "reference", "focus"),
        ENCOUNTER,
        _p("value-quantity", "quantity", "valueQuantity"),
        _p("value-concept", "token", "valueCodeableConcept"),
    ),
    "CarePlan": (
        *_patient(),
        STATUS,
        INTENT,
        CATEGORY,
        PERIOD,
    ),
    "Condition": (
        *_patient(),
        CODE,
        _p("clinical-status", "token", "clinicalStatus"),
        CATEGORY,
        _p("onset-date", "date", "onsetDateTime | onsetPeriod"),
    ),
    "Encounter": (
        *_patient(),
        PERIOD,
        STATUS,
        _p("class", "token", "class"),
        _p("type", "token", "type"),
        _p("episode-of-care", "reference", "episodeOfCare"),
    ),
    "EpisodeOfCare": (
        _p("patient", "reference", "patient", "Patient"),
        STATUS,
        _p("type", "token", "type"),
        PERIOD,
    ),
    "MedicationDispense": (
        *_patient(),
        STATUS,
        MEDICATION_CODE,
        _p("prescription", "reference", "authorizingPrescription"),
        _p("whenhandedover", "date", "whenHandedOver"),
        _p("performer", "reference", "performer.actor"),
    ),
    "MedicationStatement": (
        *_patient(),
        STATUS,
        MEDICATION_CODE,
        _p("effective", "date", "effectiveDateTime | effectivePeriod"),
    ),
    # pulled from EHRs for the intake medication reconciliation (sync/pull.py)
    "AllergyIntolerance": (
        _p("patient", "reference", "patient", "Patient"),
        CODE,
        _p("clinical-status", "token", "clinicalStatus"),
    ),
    "Consent": (
        _p("patient", "reference", "patient", "Patient"),
        STATUS,
        CATEGORY,
        _p("date", "date", "dateTime"),
    ),
    "Goal": (*_patient(), _p("lifecycle-status", "token", "lifecycleStatus")),
    "CareTeam": (*_patient(), STATUS),
    "Practitioner": HUMAN_NAME,
    "PractitionerRole": (
        _p("practitioner", "reference", "practitioner"),
        _p("organization", "reference", "organization"),
    ),
    "Organization": (_p("name", "string", "name"),),
    "Task": (
        *_patient("for"),
        _p("focus", "reference", "focus"),
        STATUS,
        INTENT,
        CODE,
        _p("authored-on", "date", "authoredOn"),
        _p("owner", "reference", "owner"),
    ),
    # adherence alerts raised from pharmacy fills (pharmacy/adherence.py: overdue MAT refills)
    "Flag": (*_patient(), STATUS, CATEGORY, _p("code", "token", "code"), _p("date", "date", "period")),
    "Provenance": (
        _p("target", "reference", "target"),
        _p("patient", "reference", "target", "Patient"),
        _p("recorded", "date", "recorded"),
    ),
    # the audit trail (privacy/audit.py): who (agent: the recipient's reference; altid: the client id)
    "AuditEvent": (
        _p("date", "date", "recorded"),
        _p("entity", "reference", "entity.what"),
        _p("patient", "reference", "entity.what", "Patient"),
        _p("agent", "reference", "agent.who"),
        _p("altid", "token", "agent.altId"),
        _p("type", "token", "type"),
        _p("subtype", "token", "subtype"),
        _p("action", "token", "action"),
        _p("outcome", "token", "outcome"),
        _p("purpose", "token", "purposeOfEvent"),
    ),
}


def search_parameters(resource_type: str) -> Mapping[str, SearchParam]:
    """Every parameter ``resource_type`` supports, by name (the common ones included).
    Built once per served type and shared: read it, do not change it."""
    return _BY_TYPE.get(resource_type, _COMMON_ONLY)  # any other name (from a request): the common ones


_BY_TYPE: dict[str, Mapping[str, SearchParam]] = {
    t: MappingProxyType({p.name: p for p in (*COMMON, *params)}) for t, params in PARAMETERS.items()
}
_COMMON_ONLY: Mapping[str, SearchParam] = MappingProxyType({p.name: p for p in COMMON})


def param(resource_type: str, name: str) -> SearchParam:
    """The parameter ``name`` of ``resource_type``.

    :raises InvalidSearch: the type has no such parameter.
    """
    found = search_parameters(resource_type).get(name)
    if found is None:
        raise InvalidSearch(
            f"unknown search parameter {name!r} for {resource_type}",
            [Issue(f"unknown search parameter {name!r} for {resource_type}", location=name, code="not-supported")],
        )
    return found


# --- values: dates, numbers, strings -------------------------------------------------------------

_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+\- ]\d{2}:\d{2})?)?)?)?"
)


def date_range(text: str) -> tuple[int, int] | None:
    """The inclusive range (microseconds since the epoch) a FHIR date, dateTime or instant covers.

    ``2026`` covers the year, ``2026-01-15T10:00`` the minute, ``...T10:00:00.5`` a tenth of a
    second. A value without a zone is UTC. ``None`` for anything else.
    """
    m = _DATE.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    try:
        if hour is None:
            start, end = _calendar_range(int(year), month and int(month), day and int(day))
        else:
            tz = UTC if zone in (None, "Z") else _offset(zone)
            micros = int((fraction or "0")[:6].ljust(6, "0"))
            start = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0), micros, tz)
            if second is None:
                step = timedelta(minutes=1)
            elif fraction is None:
                step = timedelta(seconds=1)
            else:
                step = timedelta(microseconds=10 ** max(0, 6 - len(fraction)))
            end = start + step
    except (ValueError, OverflowError):
        return None
    low = to_micros(start)
    high = MAX_MICROS if end is None else to_micros(end) - 1
    return max(low, MIN_MICROS), min(high, MAX_MICROS)


def _calendar_range(year: int, month: int | None, day: int | None) -> tuple[datetime, datetime | None]:
    if month is None:
        return datetime(year, 1, 1, tzinfo=UTC), (datetime(year + 1, 1, 1, tzinfo=UTC) if year < 9999 else None)
    if day is None:
        start = datetime(year, month, 1, tzinfo=UTC)
        if month == 12:
            return start, (datetime(year + 1, 1, 1, tzinfo=UTC) if year < 9999 else None)
        return start, datetime(year, month + 1, 1, tzinfo=UTC)
    start = datetime(year, month, day, tzinfo=UTC)
    return start, (start + timedelta(days=1) if start.date() < datetime(9999, 12, 31).date() else None)


def _offset(zone: str) -> timezone:
    # "+" arrives as " " when a client forgot to percent-encode it in a query string
    sign = -1 if zone[0] == "-" else 1
    return timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))


def number_range(text: str) -> tuple[float, float, float]:
    """``(value, low, high)``: a number and the half-open range its precision implies.

    :raises InvalidSearch: not a finite decimal number.
    """
    try:
        number = Decimal(text)
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():
        raise InvalidSearch(f"{text!r} is not a number")
    half = Decimal(5).scaleb(number.as_tuple().exponent - 1)  # type: ignore[operator]
    return float(number), float(number - half), float(number + half)


def fold(text: str) -> str:
    """Case- and accent-insensitive form of a string, for starts-with search (``Ünal`` -> ``unal``)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


# --- indexing: resource -> rows ------------------------------------------------------------------

_NAME_PARTS = ("text", "family", "given", "prefix", "suffix")
_ADDRESS_PARTS = ("text", "line", "city", "district", "state", "postalCode", "country")


def _walk(resource: JSON, steps: tuple[str, ...]) -> list[Any]:
    items: list[Any] = [resource]
    for step in steps:
        found: list[Any] = []
        for item in items:
            if isinstance(item, dict):
                value = item.get(step)
                if isinstance(value, list):
                    found.extend(value)
                elif value is not None:
                    found.append(value)
        items = found
    return items


def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        if "coding" in value or ("text" in value and "code" not in value and "value" not in value):
            for coding in value.get("coding") or ():
                if isinstance(coding, dict) and coding.get("code"):
                    yield coding.get("system"), str(coding["code"])
        elif value.get("code") is not None:  # Coding
            yield value.get("system"), str(value["code"])
        elif value.get("value") is not None:  # Identifier, ContactPoint
            yield value.get("system"), str(value["value"])


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for part in _NAME_PARTS + _ADDRESS_PARTS:
            found = value.get(part)
            for item in found if isinstance(found, list) else (found,):
                if isinstance(item, str):
                    yield item


def _dates(value: Any) -> Iterator[tuple[int, int]]:
    if isinstance(value, str):
        found = date_range(value)
        if found:
            yield found
    elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
        end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
        yield (start[0] if start else MIN_MICROS), (end[1] if end else MAX_MICROS)


def parse_reference(text: str) -> tuple[str | None, str] | None:
    """``(type, id)`` of a literal reference: ``Patient/1``, ``Patient/1/_history/2``,
    ``https://host/fhir/Patient/1``; ``(None, text)`` for ``urn:uuid:...``; ``None`` for a
    contained reference (``#x``) or nothing."""
    if not text or text.startswith("#"):
        return None
    if text.startswith("urn:"):
        return None, text
    parts = text.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2], parts[-1]
    return None, parts[-1]


def _references(value: Any, targets: tuple[str, ...]) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        found = parse_reference(value["reference"])
        if found and (not targets or found[0] in targets):
            yield found


def _quantities(value: Any) -> Iterator[tuple[float, str | None, str | None]]:
    if isinstance(value, dict) and isinstance(value.get("value"), (int, float, Decimal)):
        yield float(value["value"]), value.get("system"), value.get("code") or value.get("unit")
    elif isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        yield float(value), None, None


def _rows(p: SearchParam, value: Any) -> Iterator[dict[str, Any]]:
    """The index rows (value columns only) one element value gives for parameter ``p``."""
    if p.table == "token":
        for system, code in _tokens(value):
            yield {"system": system, "code": code}
    elif p.table == "string":
        for text in _strings(value):
            yield {"value": text, "value_norm": fold(text)}
    elif p.table == "date":
        for low, high in _dates(value):
            yield {"low": low, "high": high}
    elif p.table == "reference":
        for ref_type, ref_id in _references(value, p.targets):
            yield {"ref_type": ref_type, "ref_id": ref_id}
    elif p.table == "quantity":
        for number, system, code in _quantities(value):
            yield {"value": number, "system": system, "code": code}


def index_rows(resource_type: str, resource_id: str, resource: JSON) -> dict[str, list[dict[str, Any]]]:
    """The ``search_*`` rows of one resource version, by table kind (``token``, ``date``, ...)."""
    out: dict[str, list[dict[str, Any]]] = {kind: [] for kind in SEARCH_TABLES}
    for p in search_parameters(resource_type).values():
        seen: set[tuple[Any, ...]] = set()
        rows = out[p.table]
        for steps in p.steps:
            for value in _walk(resource, steps):
                for row in _rows(p, value):
                    key = tuple(row.values())
                    if key not in seen:
                        seen.add(key)
                        rows.append(
                            {"resource_type": resource_type, "resource_id": resource_id, "param": p.name, **row}
                        )
    return out


def referenced_ids(resource_type: str, resource: JSON, param: str, target: str) -> frozenset[str]:
    """The ids of the ``target`` resources that reference parameter ``param`` finds in
    ``resource``: what :func:`index_rows` would index for that one parameter alone (cheap
    enough to ask for every resource a search returns)."""
    p = search_parameters(resource_type).get(param)
    if p is None or p.table != "reference":
        return frozenset()
    return frozenset(
        ref_id
        for steps in p.steps
        for value in _walk(resource, steps)
        for ref_type, ref_id in _references(value, p.targets)
        if ref_type == target
    )


def patient_key(resource_type: str, resource_id: str, rows: Mapping[str, list[dict[str, Any]]]) -> str | None:
    """``Patient/{id}`` of the patient a resource belongs to (its own for a Patient), else None."""
    if resource_type == "Patient":
        return f"Patient/{resource_id}"
    for row in rows.get("reference", ()):
        if row["param"] == "patient" and row["ref_type"] == "Patient":
            return f"Patient/{row['ref_id']}"
    return None


def identifiers(resource: JSON) -> list[tuple[str, str]]:
    """The ``(system, value)`` business key that must be unique per type: the first identifier.

    FHIR itself makes no identifier unique. The gateway holds a resource's *first*
    identifier with a system unique per type (the IOP mappers put the program's own
    identifier first), so parallel conditional creates on it can never duplicate. Later
    identifiers stay searchable but are not held unique: one clinician or pharmacy is
    recorded once per program, each record carrying the same NPI or NCPDP ID. An identifier
    without a system cannot be told apart from another system's, so it is never the key.
    """
    items = resource.get("identifier")
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and isinstance(item.get("system"), str) and item.get("value") is not None:
            return [(item["system"], str(item["value"]))]
    return []


# --- querying: (name, value) -> criterion -> SQL ----------------------------------------------
#
# A search pair is parsed once into a Criterion: its *shape* (which SQL it needs) apart from
# its *values* (what is bound into that SQL). Searches of one shape share one compiled
# statement (see resources.py), so a repeated search costs no SQLAlchemy expression
# building, only binding. ``Criterion.clause`` takes the bind parameters in ``values`` order.

PREFIXES = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"})
_MODIFIERS = {
    "token": {"not", "missing"},
    "uri": {"missing"},
    "string": {"exact", "contains", "missing"},
    "date": {"missing"},
    "reference": {"missing"},
    "quantity": {"missing"},
    "number": {"missing"},
}
_ESCAPED = re.compile(r"\\([\\,$|])")
_SPECIAL = re.compile(r"([\\,$|])")


def escape_value(text: str) -> str:
    """``text`` as a search value that reads back as exactly itself: FHIR's backslash before
    ``\\``, ``,``, ``$`` and ``|``, so an identifier holding a comma is not read as an OR, nor
    one holding a pipe as a system. The inverse of what :func:`criterion` un-escapes."""
    return _SPECIAL.sub(r"\\\1", text)


def token_value(system: str, code: str) -> str:
    """A token search value ``system|code`` (an identifier: ``system|value``), each part escaped."""
    return f"{escape_value(system)}|{escape_value(code)}"


def _unescape(text: str) -> str:
    return _ESCAPED.sub(r"\1", text)


def _split(text: str, separator: str, maxsplit: int = 0) -> list[str]:
    """``text`` cut at each ``separator`` no backslash escapes (``\\\\`` is an escaped backslash,
    so ``a\\\\|b`` is cut after it); at most ``maxsplit`` cuts when it is not 0."""
    if "\\" not in text:  # nothing escaped (nearly every value): str.split is the same cut
        return text.split(separator, maxsplit or -1)
    parts: list[str] = []
    start = index = 0
    while index < len(text):
        if text[index] == "\\":
            index += 2  # the escaped character is never a separator
            continue
        if text[index] == separator and (not maxsplit or len(parts) < maxsplit):
            parts.append(text[start:index])
            start = index + 1
        index += 1
    parts.append(text[start:])
    return parts


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _prefixed(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES and (value[2].isdigit() or value[2] == "-"):
        return value[:2], value[2:]
    return "eq", value


def _bad(name: str, message: str) -> InvalidSearch:
    return InvalidSearch(f"{name}: {message}", [Issue(message, location=name, code="invalid")])


Form = tuple[Any, ...]
# Which criterion lists the fewest resources, by index kind: a reference (the patient) names
# a handful, a token (a code) maybe many, a date range often most of a type.
_RANK = {"reference": 1, "token": 2, "string": 3, "quantity": 4, "date": 5}


@dataclass(frozen=True)
class Criterion:
    """One parsed ``key=value`` search pair.

    :param forms: one per OR-alternative: the variant of SQL it needs (``("both",)`` for a
        ``system|code`` token, ``("ge",)`` for a date with prefix ``ge`` ...).
    :param values: what is bound, alternatives after each other, in the order ``clause``
        consumes its bind parameters.
    """

    resource_type: str
    param: SearchParam
    modifier: str
    forms: tuple[Form, ...]
    values: tuple[Any, ...]

    @property
    def shape(self) -> tuple[Any, ...]:
        """Everything the SQL depends on besides ``values``."""
        return self.param.name, self.modifier, self.forms

    @property
    def selective(self) -> bool:
        """Narrows the search to the ids its index rows name (so those drive the query).

        ``:missing``, ``:not`` and ``_lastUpdated`` filter what a scan of the type finds.
        """
        return self.param.name != "_lastUpdated" and self.modifier not in ("missing", "not")

    @property
    def rank(self) -> int:
        """How few rows this criterion is likely to leave (lower: fewer); the lowest drives."""
        return 0 if self.param.name == "_id" else _RANK[self.param.table]

    def clause(self, binds: Iterable[Any], *, drive: bool = False) -> ColumnElement[bool]:
        """The condition on ``resource_current``, with ``binds`` standing for ``values``.

        :param drive: this criterion's id list drives the query (``id IN (...)``: the rows
            come from its index); otherwise it is checked per candidate (``EXISTS``, by the
            resource's own index rows), so a broad criterion never lists a whole type.
        """
        take = iter(binds).__next__
        rc, name = resource_current, self.param.name
        if self.modifier == "missing":
            if not self.param.paths:
                return false() if self.forms[0][0] == "true" else true()
            has = self._rows(true(), drive=False)
            return not_(has) if self.forms[0][0] == "true" else has
        if name == "_id":
            return rc.c.id.in_([take() for _ in self.forms])
        if name == "_lastUpdated":
            column = type_coerce(rc.c.last_updated, BigInteger)
            return or_(*(_date_sql(form, take, column, column) for form in self.forms))
        table = SEARCH_TABLES[self.param.table]
        build = _SQL[self.param.table]
        condition = or_(*(build(form, take, table) for form in self.forms))
        if self.modifier == "not":
            return not_(self._rows(condition, drive=False))
        return self._rows(condition, drive=drive)

    def _rows(self, condition: ColumnElement[bool], *, drive: bool) -> ColumnElement[bool]:
        """This parameter's index rows meeting ``condition`` exist for the resource."""
        table = SEARCH_TABLES[self.param.table]
        of_param = (table.c.resource_type == self.resource_type, table.c.param == self.param.name)
        if drive:
            return resource_current.c.id.in_(select(table.c.resource_id).where(*of_param, condition))
        return exists().where(*of_param, table.c.resource_id == resource_current.c.id, condition)


def criterion(resource_type: str, key: str, value: str) -> Criterion:
    """Parse one ``key=value`` pair (``key`` may carry a modifier: ``name:exact``).

    :raises InvalidSearch: unknown parameter or modifier, or a value the type cannot read.
    """
    name, _, modifier = key.partition(":")
    p = param(resource_type, name)
    type_modifier = p.type == "reference" and modifier[:1].isupper()  # subject:Patient
    if modifier and modifier not in _MODIFIERS[p.type] and not type_modifier:
        raise InvalidSearch(
            f"modifier :{modifier} is not supported on {name}",
            [Issue(f"modifier :{modifier} is not supported", location=key, code="not-supported")],
        )
    if modifier == "missing":
        if value not in ("true", "false"):
            raise _bad(key, "expects true or false")
        return Criterion(resource_type, p, modifier, ((value,),), ())
    alternatives = _split(value, ",")
    if not value or not all(alternatives):
        raise _bad(key, "empty value")
    forms: list[Form] = []
    values: list[Any] = []
    for alternative in alternatives:
        form, bound = _parse(p, modifier, key, alternative)
        forms.append(form)
        values.extend(bound)
    return Criterion(resource_type, p, modifier, tuple(forms), tuple(values))


def _parse(p: SearchParam, modifier: str, key: str, value: str) -> tuple[Form, tuple[Any, ...]]:
    """``(form, values)`` of one OR-alternative."""
    if p.name == "_id":
        return ("id",), (_unescape(value),)
    kind = "date" if p.name == "_lastUpdated" else p.table
    if kind == "token":
        parts = _split(value, "|", maxsplit=1)
        if len(parts) == 1:
            return ("code",), (_unescape(value),)
        system, code = (_unescape(part) for part in parts)
        if not system:
            return ("nosystem",), (code,)
        return (("system",), (system,)) if not code else (("both",), (system, code))
    if kind == "string":
        text = _unescape(value)
        if modifier == "exact":
            return ("exact",), (text,)
        pattern = _like_escape(fold(text)) + "%"
        return ("like",), ("%" + pattern if modifier == "contains" else pattern,)
    if kind == "date":
        prefix, text = _prefixed(value)
        found = date_range(text)
        if found is None:
            raise _bad(key, f"{value!r} is not a date (YYYY, YYYY-MM, YYYY-MM-DD or a dateTime)")
        return (prefix,), found
    if kind == "reference":
        found = parse_reference(_unescape(value))
        if found is None:
            return ("none",), ()
        ref_type = modifier or found[0]
        return (("typed",), (ref_type, found[1])) if ref_type else (("id",), (found[1],))
    prefix, text = _prefixed(value)
    number, *unit = _split(text, "|")
    if len(unit) not in (0, 2):
        raise _bad(key, f"{value!r} is not [prefix]number[|system|code]")
    try:
        exact, low, high = number_range(number)
    except InvalidSearch:
        raise _bad(key, f"{number!r} is not a number") from None
    system, code = (_unescape(u) for u in unit) if unit else ("", "")
    near = sorted((exact * 0.9, exact * 1.1))
    extra = tuple(v for v in (system, code) if v)
    return (prefix, bool(system), bool(code)), (exact, low, high, near[0], near[1], *extra)


Take = Callable[[], Any]


def _token_sql(form: Form, take: Take, table: Any) -> ColumnElement[bool]:
    if form[0] == "code":
        return table.c.code == take()
    if form[0] == "nosystem":
        return and_(table.c.system.is_(None), table.c.code == take())
    if form[0] == "system":
        return table.c.system == take()
    return and_(table.c.system == take(), table.c.code == take())


def _string_sql(form: Form, take: Take, table: Any) -> ColumnElement[bool]:
    if form[0] == "exact":
        return table.c.value == take()
    return table.c.value_norm.like(take(), escape="\\")


def _date_sql(form: Form, take: Take, low: Any, high: Any) -> ColumnElement[bool]:
    """FHIR's range comparisons: the target [low, high] against the searched [s_low, s_high]."""
    s_low, s_high = take(), take()
    within = and_(low >= s_low, high <= s_high)
    return {
        "eq": lambda: within,
        "ne": lambda: or_(low < s_low, high > s_high),
        "gt": lambda: high > s_high,
        "lt": lambda: low < s_low,
        "ge": lambda: or_(high > s_high, within),
        "le": lambda: or_(low < s_low, within),
        "sa": lambda: low > s_high,
        "eb": lambda: high < s_low,
        "ap": lambda: and_(low <= s_high, high >= s_low),
    }[form[0]]()


def _reference_sql(form: Form, take: Take, table: Any) -> ColumnElement[bool]:
    if form[0] == "none":
        return false()
    if form[0] == "typed":
        ref_type = take()
        return and_(table.c.ref_id == take(), table.c.ref_type == ref_type)
    return table.c.ref_id == take()


def _quantity_sql(form: Form, take: Take, table: Any) -> ColumnElement[bool]:
    prefix, has_system, has_code = form
    exact, low, high, near_low, near_high = take(), take(), take(), take(), take()
    column = table.c.value
    condition = {
        "eq": lambda: and_(column >= low, column < high),
        "ne": lambda: or_(column < low, column >= high),
        "gt": lambda: column > exact,
        "sa": lambda: column > exact,
        "lt": lambda: column < exact,
        "eb": lambda: column < exact,
        "ge": lambda: column >= exact,
        "le": lambda: column <= exact,
        "ap": lambda: column.between(near_low, near_high),
    }[prefix]()
    if has_system:
        condition = and_(condition, table.c.system == take())
    if has_code:
        condition = and_(condition, table.c.code == take())
    return condition


_SQL: dict[str, Callable[[Form, Take, Any], ColumnElement[bool]]] = {
    "token": _token_sql,
    "string": _string_sql,
    "date": lambda form, take, table: _date_sql(form, take, table.c.low, table.c.high),
    "reference": _reference_sql,
    "quantity": _quantity_sql,
}


def check_sort(resource_type: str, name: str) -> None:
    """:raises InvalidSearch: ``name`` is not something the type can be sorted by."""
    if name not in ("_lastUpdated", "_id") and param(resource_type, name).table != "date":
        raise InvalidSearch(
            f"sorting by {name} is not supported (use _lastUpdated, _id or a date parameter)",
            [Issue(f"cannot sort by {name}", location="_sort", code="not-supported")],
        )


def sort_expression(resource_type: str, name: str, descending: bool) -> ColumnElement[Any]:
    """The value a search is ordered by for ``_sort=name`` (never NULL, so keyset paging works).

    ``_lastUpdated`` and ``_id`` read the resource; a date parameter sorts by the earliest
    start ascending and the latest end descending, as FHIR says; resources without a value
    come last either way.

    :raises InvalidSearch: not a parameter of the type, or not one the store sorts by.
    """
    rc = resource_current
    check_sort(resource_type, name)
    if name == "_lastUpdated":
        return type_coerce(rc.c.last_updated, BigInteger)
    if name == "_id":
        return rc.c.id
    bound = func.max(search_date.c.high) if descending else func.min(search_date.c.low)
    value = (
        select(bound)
        .where(
            search_date.c.resource_type == rc.c.resource_type,
            search_date.c.param == name,
            search_date.c.resource_id == rc.c.id,
        )
        .scalar_subquery()
    )
    return func.coalesce(value, MIN_MICROS - 1 if descending else MAX_MICROS + 1)


__all__ = [
    "COMMON",
    "PARAMETERS",
    "Criterion",
    "InvalidSearch",
    "SearchParam",
    "check_sort",
    "criterion",
    "date_range",
    "escape_value",
    "fold",
    "identifiers",
    "index_rows",
    "number_range",
    "param",
    "parse_reference",
    "patient_key",
    "search_parameters",
    "sort_expression",
    "token_value",
]
