"""FHIR data types <-> contract values, both directions side by side.

Every resource mapper builds its CodeableConcepts, Quantities, names, addresses and dates
here, so one FHIR data type has one shape everywhere, and the reverse reads it back with
the same rules. Reverse helpers are tolerant: foreign data may lack parts or use other code
systems; they return ``None`` and let the caller report what it could not use.
"""

from __future__ import annotations

import datetime as dt
import html
import re
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


def concept(*codings: JSON, text: str | None = None) -> JSON:
    out: JSON = {}
    if codings:
        out["coding"] = list(codings)
    if text:
        out["text"] = text
    return out


def code_in(value: JSON | None, system: str) -> str | None:
    """The first code of ``system`` in a CodeableConcept (or a Coding), else None."""
    if not value:
        return None
    codings = value.get("coding", []) if "coding" in value or "text" in value else [value]
    for c in codings:
        if c.get("system") == system and c.get("code"):
            return c["code"]
    return None


def codings_of(value: JSON | None) -> list[JSON]:
    return list((value or {}).get("coding", []))


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


def name_from_fhir(names: list[JSON] | None) -> JSON | None:
    """The official (else first) HumanName as contract data, or None if it has no family/given."""
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


def address_from_fhir(addresses: list[JSON] | None) -> JSON | None:
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


def contact_from_fhir(points: list[JSON] | None) -> JSON | None:
    out: JSON = {}
    for p in points or []:
        if p.get("system") == "phone" and "phone" not in out and p.get("value"):
            out["phone"] = p["value"]
        elif p.get("system") == "email" and "email" not in out and p.get("value"):
            out["email"] = p["value"]
    return out or None


# --- extensions -----------------------------------------------------------------------------


def extension(name: str, **value: Any) -> JSON:
    """One of the project's extensions: ``extension("session-attendance", valueCode="no-show")``."""
    return {"url": extension_url(name), **value}


def extension_value(resource: JSON, name: str, value_key: str) -> Any:
    url = extension_url(name)
    extensions = resource.get("extension") if isinstance(resource, dict) else None
    for ext in extensions if isinstance(extensions, list) else []:
        if isinstance(ext, dict) and ext.get("url") == url:
            return ext.get(value_key)
    return None


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


def nonblank(value: Any) -> str | None:
    """``value`` if it is a string with some non-space character, else None."""
    return value if isinstance(value, str) and value.strip() else None


def strings(value: Any) -> list[str]:
    """The non-blank strings of a JSON array; ``[]`` for anything else, a bare string included."""
    return [v for v in as_list(value) if nonblank(v)]


def names_in(value: Any) -> list[JSON]:
    """The HumanNames of untrusted JSON, their list parts kept to strings.

    So ``name_from_fhir(names_in(x))`` neither crashes on ``"name": "Bob"`` nor reads
    ``"given": "Ann"`` as the letters ``["A", "n", "n"]``.
    """
    return [{**n, **{k: strings(n[k]) for k in ("given", "prefix", "suffix") if k in n}} for n in as_list(value) if isinstance(n, dict)]


def addresses_in(value: Any) -> list[JSON]:
    """The Addresses of untrusted JSON, ``line`` kept to strings (see ``names_in``)."""
    return [{**a, "line": strings(a.get("line"))} for a in as_list(value) if isinstance(a, dict)]


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


def identifier_values(resource: JSON, system: str) -> list[str]:
    """The string values of a resource's identifiers in ``system``, in order."""
    return [i["value"] for i in as_list(resource.get("identifier")) if isinstance(i, dict) and i.get("system") == system and nonblank(i.get("value"))]


def readable_ids(resource: JSON) -> JSON:
    """A shallow copy of ``resource`` whose ``id`` and ``identifier`` have the types
    ``context.local_id`` and ``identifier_base`` expect (foreign JSON may hold anything there)."""
    idents = [i for i in as_list(resource.get("identifier")) if isinstance(i, dict) and all(isinstance(i.get(k, ""), str) for k in ("system", "value"))]
    return {**resource, "id": nonblank(resource.get("id")), "identifier": idents}


def identifier_kind(resource: JSON, kinds: tuple[str, ...]) -> str | None:
    """Which of ``kinds`` a resource's business identifier names (system ``{base}/{kind}``), if any."""
    for ident in readable_ids(resource)["identifier"]:
        system = ident.get("system", "")
        for kind in kinds:
            if system.endswith(f"/{kind}") and ident.get("value"):
                return kind
    return None


def reference_text(value: Any) -> str | None:
    """The ``reference`` string of a Reference in untrusted JSON (for ``ResourceIndex.resolve``), else None."""
    return nonblank(as_dict(value).get("reference"))


def choices(model: Any, field: str) -> frozenset[str]:
    """The values a ``Literal`` field of a contract model allows (``Literal | None`` too), so
    reverse mappers check codes against the contract itself, not a copy that may drift."""

    def values(annotation: Any) -> list[str]:
        return [v for arg in get_args(annotation) for v in ([arg] if isinstance(arg, str) else values(arg))]

    return frozenset(values(model.model_fields[field].annotation))
