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
from typing import Any

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
    for ext in resource.get("extension", []):
        if ext.get("url") == url:
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
