"""FHIR data types <-> contract values, both directions side by side.

Every resource mapper builds its CodeableConcepts, Quantities, names, addresses and dates
here, so one FHIR data type has one shape everywhere, and the reverse reads it back with
the same rules. Reverse helpers are tolerant: foreign data may lack parts, use other code
systems or put anything anywhere; they return ``None`` (or ``[]``) and let the caller report
what it could not use. The last section holds what every reverse mapper uses on untrusted
JSON: report locations, per-resource reading (``read_each``, ``ItemReader``) and contract
checks (``settle``). Our own identifiers and references are read in context.py.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import re
from collections.abc import Container
from decimal import Decimal, InvalidOperation
from typing import Any, get_args

from iop_fhir.terminology import UCUM, extension_url

JSON = dict[str, Any]


# --- Coding / CodeableConcept ---------------------------------------------------------------


def coding(system: str, code: str, display: str | None = None) -> JSON:
    out: JSON = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def table_coding(entry: JSON) -> JSON:
    """A fresh Coding of a terminology table entry: its system, code and display, nothing else."""
    return coding(entry["system"], entry["code"], entry.get("display"))


def concept(*codings: JSON, text: str | None = None) -> JSON:
    out: JSON = {}
    if codings:
        out["coding"] = list(codings)
    if text:
        out["text"] = text
    return out


def codings_of(value: Any) -> list[JSON]:
    """The Codings of a CodeableConcept in untrusted JSON (objects only; odd shapes give [])."""
    return [c for c in as_list(as_dict(value).get("coding")) if isinstance(c, dict)]


def code_in(value: Any, system: str, among: Container[str] | None = None) -> str | None:
    """The first code of ``system`` in a CodeableConcept (or a bare Coding), else None.

    With ``among`` (the codes a table knows), the first code of ``system`` that is one of them.
    """
    value = as_dict(value)
    codings = codings_of(value) if "coding" in value or "text" in value else [value]
    for c in codings:
        code = nonempty(c.get("code"))
        if c.get("system") == system and code and (among is None or code in among):
            return code
    return None


def code_in_any(values: Any, system: str, among: Container[str] | None = None) -> str | None:
    """``code_in`` over a list of CodeableConcepts (a ``type`` or ``category``): the first found."""
    return next((code for value in as_list(values) if (code := code_in(value, system, among))), None)


def code_keys(value: Any) -> list[tuple[str, str]]:
    """(system, code) of every well-formed coding of a CodeableConcept, for table look-ups."""
    return [(c["system"], c["code"]) for c in codings_of(value) if isinstance(c.get("system"), str) and isinstance(c.get("code"), str)]


def shown_codes(value: Any) -> str:
    """The codes of a CodeableConcept as ``system|code`` for report messages."""
    return ", ".join(f"{system}|{code}" for system, code in code_keys(value)) or "none"


def concept_text(value: Any, *, codes: bool = False) -> str | None:
    """What a person would read of a CodeableConcept: its text, else the first coding display
    (with ``codes``, else that coding's code), kept exactly as written.

    Blank strings are passed over: the contract refuses text without a visible character, so
    a display is better words than a blank text.
    """
    value = as_dict(value)
    text = nonblank(value.get("text"))
    if text:
        return text
    for c in codings_of(value):
        words = nonblank(c.get("display")) or (nonblank(c.get("code")) if codes else None)
        if words:
            return words
    return None


# --- numbers and quantities -----------------------------------------------------------------


def number(value: Decimal | int | float) -> int | float:
    """A JSON number: integral values as integers, others as the shortest float that round-trips."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def to_decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def finite_number(value: Any) -> int | float | None:
    """``value`` if it is a finite JSON number, else None (a boolean is not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    # ints need no check (and math.isfinite cannot take one too large for a float)
    return value if isinstance(value, int) or math.isfinite(value) else None


def whole_number(value: Any) -> int | None:
    """A JSON number that is whole, as an int (2.0 -> 2); None for anything else."""
    found = finite_number(value)
    return int(found) if found is not None and found == int(found) else None


def ucum_quantity(value: Decimal | int | float, unit: str, display_unit: str | None = None) -> JSON:
    """A Quantity coded in UCUM; ``display_unit`` is the human text (e.g. "film" for ``1``)."""
    return {"value": number(value), "unit": display_unit or unit, "system": UCUM, "code": unit}


def quantity_parts(value: JSON | None) -> tuple[Decimal, str] | None:
    """(value, UCUM code) of a Quantity; falls back to ``unit`` when no UCUM code is given."""
    if not value or "value" not in value:
        return None
    amount = to_decimal(value["value"])
    unit = value.get("code") if value.get("system") in (UCUM, None) and value.get("code") else value.get("unit")
    if amount is None or not unit:
        return None
    return amount, unit


# --- dates ----------------------------------------------------------------------------------


def fhir_date(value: dt.date) -> str:
    return value.isoformat()


def fhir_datetime(value: dt.datetime) -> str:
    """An instant with its offset; UTC written as ``Z``."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def parse_date(value: Any) -> dt.date | None:
    """A FHIR date or dateTime as a date (full dates only; ``2024`` or ``2024-05`` give None)."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def parse_datetime(value: Any) -> dt.datetime | None:
    """A FHIR dateTime with time and offset; a bare date becomes midnight UTC."""
    if not isinstance(value, str):
        return None
    try:
        if len(value) == 10:
            return dt.datetime.combine(dt.date.fromisoformat(value), dt.time(0, 0), dt.timezone.utc)
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None


# --- people and places ----------------------------------------------------------------------


def human_name(name: Any) -> JSON:
    out: JSON = {"use": "official", "family": name.family, "given": list(name.given)}
    if name.prefix:
        out["prefix"] = [name.prefix]
    if name.suffix:
        out["suffix"] = [name.suffix]
    return out


def name_from_fhir(value: Any) -> JSON | None:
    """The official (else first) HumanName as contract data, or None if it has no family/given.

    ``value`` is the ``name`` element as found, so untrusted JSON is read through ``names_in``:
    ``"name": "Bob"`` gives None, not a name spelled from its letters.
    """
    names = names_in(value)
    if not names:
        return None
    chosen = next((n for n in names if n.get("use") == "official"), names[0])
    if not chosen.get("family") or not chosen.get("given"):
        return None
    out: JSON = {"family": chosen["family"], "given": list(chosen["given"])[:5]}
    if chosen.get("prefix"):
        out["prefix"] = chosen["prefix"][0]
    if chosen.get("suffix"):
        out["suffix"] = chosen["suffix"][0]
    return out


def address(value: Any, use: str = "home") -> JSON:
    return {
        "use": use,
        "line": list(value.lines),
        "city": value.city,
        "state": value.state,
        "postalCode": value.postal_code,
        "country": value.country,
    }


def address_from_fhir(value: Any) -> JSON | None:
    """The first Address as contract data, or None if it lacks line, city, state or postal code.

    ``value`` is the ``address`` element as found, read through ``addresses_in`` (see
    ``name_from_fhir``).
    """
    addresses = addresses_in(value)
    if not addresses:
        return None
    a = addresses[0]
    if not (a.get("line") and a.get("city") and a.get("state") and a.get("postalCode")):
        return None
    return {
        "lines": list(a["line"])[:4],
        "city": a["city"],
        "state": a["state"],
        "postal_code": a["postalCode"],
        "country": a.get("country", "US"),
    }


def telecom(contact: Any) -> list[JSON]:
    out: list[JSON] = []
    if contact is None:
        return out
    if contact.phone:
        out.append({"system": "phone", "value": contact.phone, "use": "work"})
    if contact.email:
        out.append({"system": "email", "value": contact.email, "use": "work"})
    return out


def contact_from_fhir(value: Any) -> JSON | None:
    """The first phone and email of a ``telecom`` element (untrusted JSON) as contract data."""
    out: JSON = {}
    for p in as_list(value):
        p = as_dict(p)
        if p.get("system") == "phone" and "phone" not in out and p.get("value"):
            out["phone"] = p["value"]
        elif p.get("system") == "email" and "email" not in out and p.get("value"):
            out["email"] = p["value"]
    return out or None


# --- extensions -----------------------------------------------------------------------------


def extension(name: str, **value: Any) -> JSON:
    """One of the project's extensions: ``extension("session-attendance", valueCode="no-show")``."""
    return {"url": extension_url(name), **value}


def drop_empty(resource: JSON) -> JSON:
    """Remove keys whose values are None, empty lists or empty dicts (FHIR JSON forbids them)."""
    return {k: v for k, v in resource.items() if v is not None and v != [] and v != {}}


# --- narrative ------------------------------------------------------------------------------

XHTML_NS = "http://www.w3.org/1999/xhtml"
# Characters XML 1.0 cannot carry at all (C0 controls but tab/CR/LF, lone surrogates, U+FFFE/F).
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xhtml_text(value: str) -> str:
    """Text for a narrative: ``<&>`` escaped, characters XML cannot hold dropped (narrative is derived)."""
    return html.escape(_NOT_XML.sub("", value), quote=False)


def narrative(body: str) -> JSON:
    """A generated Narrative: ``body`` is XHTML built with ``xhtml_text``, wrapped in the FHIR div."""
    return {"status": "generated", "div": f'<div xmlns="{XHTML_NS}">{body}</div>'}


# --- tolerant reading of foreign JSON ---------------------------------------------------------


def as_dict(value: Any) -> JSON:
    """``value`` if it is a JSON object, else ``{}`` (foreign FHIR may put anything anywhere)."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` if it is a JSON array, else ``[]``."""
    return value if isinstance(value, list) else []


def own_extensions(element: Any, report: Any = None, where: str = "") -> dict[str, JSON]:
    """The project's extensions on an element by short name (first of each).

    Any other extension is data the record has no place for: with a ``report``
    (a MappingReport) each is reported as a warning at ``where``.
    """
    prefix = extension_url("")
    ours: dict[str, JSON] = {}
    for ext in as_list(as_dict(element).get("extension")):
        url = as_dict(ext).get("url")
        if isinstance(url, str) and url.startswith(prefix):
            ours.setdefault(url[len(prefix):], ext)
        elif report is not None:
            report.warning(f"{where}.extension", f"extension {url!r} is not one the record can carry")
    return ours


def unknown_modifiers(resource: JSON, report: Any) -> bool:
    """Whether ``resource`` has modifier extensions; if so report it (an error) to ``report``.

    FHIR forbids reading a resource whose modifier extensions one does not understand, and
    the gateway understands none: the caller leaves the resource out.
    """
    if not resource.get("modifierExtension"):
        return False
    report.error(where(resource, "modifierExtension"), "modifier extensions the gateway does not know: left out", code="not-supported")
    return True


# --- times of day -----------------------------------------------------------------------------


def fhir_time(value: dt.time) -> str:
    """A FHIR ``time`` (``hh:mm:ss``, fractions kept). FHIR times carry no offset, so one is dropped."""
    return value.replace(tzinfo=None).isoformat()


def parse_time(value: Any) -> dt.time | None:
    """A FHIR ``time`` as a naive ``datetime.time``, or None if it is not one."""
    if not isinstance(value, str) or len(value) < 8:
        return None
    try:
        parsed = dt.time.fromisoformat(value)
    except ValueError:
        return None
    return None if parsed.tzinfo else parsed


# --- untrusted JSON: typed parts, locations, contract checks -------------------------------------

# What reading a foreign resource of an unexpected shape may raise. ``read_each`` catches these
# per resource, so one odd resource is reported and left out instead of ending the conversion.
SHAPE_ERRORS = (AttributeError, TypeError, KeyError, ValueError, IndexError)


def nonempty(value: Any) -> str | None:
    """``value`` if it is a non-empty string, kept exactly (blank or not: see ``nonblank``)."""
    return value if isinstance(value, str) and value else None


def nonblank(value: Any) -> str | None:
    """``value`` if it is a string with some non-space character, else None."""
    return value if isinstance(value, str) and value.strip() else None


def note_texts(value: Any) -> list[str]:
    """The texts of a list of Annotations (``note``), non-empty strings kept exactly."""
    return [text for n in as_list(value) if (text := nonempty(as_dict(n).get("text")))]


def strings(value: Any) -> list[str]:
    """The non-blank strings of a JSON array; ``[]`` for anything else, a bare string included."""
    return [v for v in as_list(value) if nonblank(v)]


def names_in(value: Any) -> list[JSON]:
    """The HumanNames of untrusted JSON, their list parts kept to strings.

    So readers (``name_from_fhir`` among them) neither crash on ``"name": "Bob"`` nor read
    ``"given": "Ann"`` as the letters ``["A", "n", "n"]``.
    """
    return [{**n, **{k: strings(n[k]) for k in ("given", "prefix", "suffix") if k in n}} for n in as_list(value) if isinstance(n, dict)]


def addresses_in(value: Any) -> list[JSON]:
    """The Addresses of untrusted JSON, ``line`` kept to strings (see ``names_in``)."""
    return [{**a, "line": strings(a.get("line"))} for a in as_list(value) if isinstance(a, dict)]


def identifiers_in(value: Any) -> list[JSON]:
    """The Identifiers of untrusted JSON whose ``system`` and ``value``, where given, are strings."""
    return [i for i in as_list(value) if isinstance(i, dict) and all(isinstance(i.get(k, ""), str) for k in ("system", "value"))]


def where(resource: JSON, path: str = "") -> str:
    """A report location for (a part of) a resource: ``Patient/p1.birthDate``."""
    rtype = nonblank(resource.get("resourceType")) or "Resource"
    rid = nonblank(resource.get("id"))
    head = f"{rtype}/{rid}" if rid else rtype
    return f"{head}.{path}" if path else head


def read_each(resources: list[JSON], read: Any, report: Any) -> list[Any]:
    """``read(resource)`` for each resource, keeping the results that are not None.

    A resource whose shape breaks the reader (SHAPE_ERRORS) is reported to ``report`` (a
    MappingReport) as an error and left out.
    """
    out = []
    for resource in resources:
        try:
            item = read(resource)
        except SHAPE_ERRORS as exc:
            report.error(where(as_dict(resource)), f"unreadable: {type(exc).__name__}: {exc}", code="structure")
            continue
        if item is not None:
            out.append(item)
    return out


def settle(model: Any, item: JSON, report: Any, location: str) -> JSON | None:
    """``item`` (JSON-shaped) once the contract model ``model`` accepts it, else None.

    Reverse mappers check each item they build, so a problem is reported where it came from
    instead of failing the whole record later. Optional fields the model refuses are dropped
    with a warning (the rest of the item is worth having); if a required field is refused, the
    item is reported to ``report`` (a MappingReport) as an error and left out.
    """
    for _ in range(2):
        try:
            model.model_validate(item)
            return item
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            errors = exc.errors(include_url=False) if hasattr(exc, "errors") else []
        problems = {}
        for e in errors:
            key = str(e["loc"][0]) if e["loc"] else ""
            problems.setdefault(key, f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}")
        required = {name for name, f in model.model_fields.items() if f.is_required()}
        if not problems or "" in problems or required & problems.keys():
            report.error(location, "left out; the contract refuses it: " + "; ".join(problems.values()))
            return None
        item = dict(item)
        for key, why in problems.items():
            report.warning(location, f"{key} left out; the contract refuses it: {why}")
            item.pop(key, None)
    return None


class ItemReader:
    """Reports problems of one foreign resource at its location and remembers if it must be left out."""

    def __init__(self, resource: JSON, report: Any) -> None:
        self.resource = resource
        self.report = report
        self.ok = True

    def at(self, path: str = "") -> str:
        return where(self.resource, path)

    def error(self, path: str, message: str, code: str = "invalid") -> None:
        """Something the record needs is missing or unusable: the item is left out."""
        self.ok = False
        self.report.error(self.at(path), message, code=code)

    def leave_out(self, path: str, message: str) -> None:
        """The resource holds data the record has no place for at all: warned, left out."""
        self.ok = False
        self.report.warning(self.at(path), message)

    def warning(self, path: str, message: str) -> None:
        self.report.warning(self.at(path), message)

    def info(self, path: str, message: str) -> None:
        self.report.info(self.at(path), message)

    def checked(self, model: Any, item: JSON) -> JSON | None:
        """``item`` if nothing made the reader fail and the contract ``model`` accepts it (see ``settle``)."""
        if not self.ok:
            return None
        return settle(model, item, self.report, self.at())


def first_of_each(read: Any, key: str, sources: dict[str, JSON], report: Any) -> Any:
    """Wrap ``read`` (resource -> item or None) to keep the first item per ``item[key]``.

    A second resource for the same item (another version, a duplicate) cannot be carried: it
    is reported and left out. ``sources`` collects key -> the resource each kept item came from.
    """

    def first(resource: JSON) -> JSON | None:
        item = read(resource)
        if item is None:
            return None
        if item[key] in sources:
            report.warning(where(resource, "identifier"), f"another resource already gave {key} {item[key]!r}; left out")
            return None
        sources[item[key]] = resource
        return item

    return first


def identifier_values(resource: JSON, system: str) -> list[str]:
    """The string values of a resource's identifiers in ``system``, in order."""
    return [i["value"] for i in identifiers_in(resource.get("identifier")) if i.get("system") == system and nonblank(i.get("value"))]


def choices(model: Any, field: str) -> frozenset[str]:
    """The values a ``Literal`` field of a contract model allows (``Literal | None`` too), so
    reverse mappers check codes against the contract itself, not a copy that may drift."""

    def values(annotation: Any) -> list[str]:
        return [v for arg in get_args(annotation) for v in ([arg] if isinstance(arg, str) else values(arg))]

    return frozenset(values(model.model_fields[field].annotation))
