"""C-CDA data types, parties and per-document state, read into FHIR R4 datatypes.

Companion of :mod:`.ccda` (the document walk) and :mod:`.ccda_entries` (one reader per entry
template): the pieces every entry reader uses. The conversions follow HL7 "C-CDA on FHIR"
(``shared/reference/ccda.md`` §11 and the IG's mapping guidance):

* ``II`` -> Identifier. A root with a FHIR system of its own (SSN, NPI) takes it; an OID or
  UUID root with an extension becomes ``urn:oid:``/``urn:uuid:`` + value; a root alone is the
  value, under ``urn:ietf:rfc:3986``. ids with a nullFlavor are skipped.
* ``CD``/``CE``/``CO`` -> CodeableConcept: the code and its translations as codings (systems by
  OID through :data:`CODE_SYSTEMS`, else ``urn:oid:``), ``originalText`` as text (references
  into the section narrative resolved).
* ``TS`` -> dateTime at the precision sent. A time without a UTC offset is cut to the day:
  FHIR requires the offset, and inventing one could move a dose to another day (reported).
* ``PQ`` -> Quantity (UCUM), ``IVL_TS`` -> Period, names, addresses, telecoms.

Parties (C-CDA on FHIR participations): an ``assignedAuthor``/``assignedEntity`` with a person
becomes a Practitioner, and with a role code or an organization also a PractitionerRole tying
the two; one without a person (an authoring device, an organisation) stands for the
Organization it represents. One resource per party identifier in a document; a later mention
adds what an earlier one lacked.

Ids are name-based UUIDs (v5) of the resource type and the entry's own ``id`` (C-CDA entry ids
are meant to be stable across documents, so a resent document upserts), or, where the entry
has none or repeats one already used in the document, of the document id and the element's
path. A patient id never derives from an SSN (a hash of nine digits is easily reversed).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from lxml import etree

from iop_fhir.errors import Issue
from iop_fhir.terminology import (
    CPT,
    HCPCS,
    ICD10CM,
    LOINC,
    NDC,
    NPI,
    NUCC_TAXONOMY,
    OBSERVATION_INTERPRETATION,
    RXNORM,
    SNOMED,
    UCUM,
    V3_ACT_CODE,
    V3_CONFIDENTIALITY,
)

from .safe_xml import child_text, children, first_child, local_name

JSON = dict[str, Any]

CDA_NAMESPACE = "urn:hl7-org:v3"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"

# Fixed forever: changing it changes every id minted from a C-CDA document.
NAMESPACE = uuid.UUID("2f0b6c1e-7a53-5d8e-b4c9-3e6a1d0f9b27")

THO = "http://terminology.hl7.org/CodeSystem/"
SSN = "http://hl7.org/fhir/sid/us-ssn"
URI_SYSTEM = "urn:ietf:rfc:3986"
DATA_ABSENT = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"

# Code system OID (``@codeSystem``) -> FHIR system URI. ccda.md §11 plus the HL7 v3 systems the
# header uses; any other OID is kept as ``urn:oid:<oid>`` (valid FHIR, nothing guessed).
CODE_SYSTEMS: dict[str, str] = {
    "2.16.840.1.113883.6.1": LOINC,
    "2.16.840.1.113883.6.96": SNOMED,
    "2.16.840.1.113883.6.88": RXNORM,
    "2.16.840.1.113883.6.90": ICD10CM,
    "2.16.840.1.113883.6.103": "http://hl7.org/fhir/sid/icd-9-cm",
    "2.16.840.1.113883.6.69": NDC,
    "2.16.840.1.113883.6.8": UCUM,
    "2.16.840.1.113883.6.12": CPT,
    "2.16.840.1.113883.6.285": HCPCS,
    "2.16.840.1.113883.6.101": NUCC_TAXONOMY,
    "2.16.840.1.113883.12.292": "http://hl7.org/fhir/sid/cvx",
    "2.16.840.1.113883.3.26.1.1": "http://ncimeta.nci.nih.gov",
    "2.16.840.1.113883.5.1": THO + "v3-AdministrativeGender",
    "2.16.840.1.113883.5.2": THO + "v3-MaritalStatus",
    "2.16.840.1.113883.5.4": V3_ACT_CODE,
    "2.16.840.1.113883.5.6": THO + "v3-ActClass",
    "2.16.840.1.113883.5.25": V3_CONFIDENTIALITY,
    "2.16.840.1.113883.5.83": OBSERVATION_INTERPRETATION,
    "2.16.840.1.113883.5.85": THO + "v3-orderableDrugForm",
    "2.16.840.1.113883.5.111": THO + "v3-RoleCode",
    "2.16.840.1.113883.5.1076": THO + "v3-ReligiousAffiliation",
}

# Identifier roots with a FHIR system of their own (ccda.md §11).
IDENTIFIER_SYSTEMS: dict[str, str] = {
    "2.16.840.1.113883.4.1": SSN,
    "2.16.840.1.113883.4.6": NPI,
}

# Confidentiality, least to most restrictive; R and V are carried into meta.security (§12).
CONFIDENTIALITY_RANK = {"U": 0, "L": 1, "M": 2, "N": 3, "R": 4, "V": 5}
CONFIDENTIALITY_DISPLAY = {"R": "restricted", "V": "very restricted"}

NAME_USE = {"L": "official", "OR": "official", "P": "nickname", "ASGN": "usual", "C": "official"}
ADDRESS_USE = {"H": "home", "HP": "home", "HV": "home", "WP": "work", "DIR": "work", "PUB": "work", "TMP": "temp", "OLD": "old", "BAD": "old"}
TELECOM_USE = {"H": "home", "HP": "home", "HV": "home", "WP": "work", "DIR": "work", "PUB": "work", "MC": "mobile", "PG": "mobile", "TMP": "temp", "BAD": "old"}
TELECOM_SCHEME = {"tel": "phone", "fax": "fax", "mailto": "email", "http": "url", "https": "url", "sms": "sms"}
GENDER = {"M": "male", "F": "female", "UN": "other"}

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TS = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,9})?(Z|[+-]\d{4})?")
_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_SPACE = re.compile(r"\s+")
_MAX_NUMBER = Decimal("1e15")


def prune(value: Any) -> Any:
    """``value`` without None, empty strings, empty lists and empty objects (FHIR JSON has none)."""
    if isinstance(value, dict):
        out = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None and v != "" and v != [] and v != {}}
    if isinstance(value, list):
        items = [prune(v) for v in value]
        return [v for v in items if v is not None and v != "" and v != [] and v != {}]
    return value


def xsi_type(el: etree._Element | None) -> str:
    """The ``xsi:type`` of an element without its prefix (``IVL_TS``), ``""`` when absent."""
    raw = el.get(XSI_TYPE) if el is not None else None
    return raw.rsplit(":", 1)[-1].strip() if raw else ""


def is_null(el: etree._Element | None) -> bool:
    return el is None or bool(el.get("nullFlavor"))


def clean(text: str | None) -> str | None:
    """Whitespace collapsed; None when nothing legible is left (HL7's ``. . .`` placeholders)."""
    if not text:
        return None
    text = _SPACE.sub(" ", text).strip()
    return text if any(ch.isalnum() for ch in text) else None


def path(el: etree._Element) -> str:
    """XPath-like location of an element: ``/ClinicalDocument/component/.../entry[2]/act``."""
    parts: list[str] = []
    node: etree._Element | None = el
    while node is not None:
        name = local_name(node)
        parent = node.getparent()
        if parent is not None:
            same = [c for c in children(parent, name)]
            if len(same) > 1:
                name += f"[{same.index(node) + 1}]"
        parts.append(name)
        node = parent
    return "/" + "/".join(reversed(parts))


def template_roots(el: etree._Element) -> list[str]:
    """The ``templateId/@root`` values of an element, in document order (extension ignored)."""
    return [t.get("root", "").strip() for t in children(el, "templateId") if t.get("root")]


def statement(relationship: etree._Element) -> etree._Element | None:
    """The clinical statement an ``entry``/``entryRelationship``/``component`` holds."""
    for child in children(relationship):
        if local_name(child) not in ("templateId", "sequenceNumber", "seperatableInd", "realmCode", "typeId"):
            return child
    return None


@dataclass
class Context:
    """What one document's read shares: narrative, issues, resources made so far, parties, ids."""

    doc_key: str
    narrative: dict[str, str] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    resources: list[JSON] = field(default_factory=list)
    patient: JSON | None = None
    encounter: JSON | None = None
    confidentiality: str = "N"
    _ids: set[str] = field(default_factory=set)
    _parties: dict[str, JSON] = field(default_factory=dict)
    _shared: dict[str, JSON] = field(default_factory=dict)

    # --- issues -----------------------------------------------------------------------------

    def issue(self, where: etree._Element | str, message: str, severity: str = "warning", code: str = "not-supported") -> None:
        location = where if isinstance(where, str) else path(where)
        self.issues.append(Issue(message, location, severity, code))

    def info(self, where: etree._Element | str, message: str, code: str = "informational") -> None:
        self.issue(where, message, "information", code)

    # --- resources and ids ------------------------------------------------------------------

    def seeds(self, el: etree._Element) -> list[str]:
        """Identity seeds from an element's ``id`` children (system|value of each)."""
        out = []
        for ident in self.identifiers(el, report=False):
            out.append(f"{ident.get('system', '')}|{ident['value']}")
        return out

    def mint(self, resource_type: str, el: etree._Element, seeds: list[str] | None = None, *, part: str = "") -> str:
        """A fresh deterministic id for a resource read from ``el`` (see the module docstring)."""
        seeds = self.seeds(el) if seeds is None else seeds
        for seed in seeds:
            rid = str(uuid.uuid5(NAMESPACE, f"{resource_type}|{seed}{part}"))
            if rid not in self._ids:
                self._ids.add(rid)
                return rid
        if seeds:
            self.issue(
                el,
                f"id {seeds[0]} is also used by an earlier {resource_type} of this document; this one is identified by its place",
                code="duplicate",
            )
        rid = str(uuid.uuid5(NAMESPACE, f"{resource_type}|{self.doc_key}|{path(el)}{part}"))
        self._ids.add(rid)
        return rid

    def add(self, resource: JSON, el: etree._Element | None = None) -> JSON:
        """Append a resource (pruned, security-labelled) and return a reference to it."""
        resource = prune(resource)
        label = self._confidentiality(el)
        if label in CONFIDENTIALITY_DISPLAY:
            security = {"system": V3_CONFIDENTIALITY, "code": label, "display": CONFIDENTIALITY_DISPLAY[label]}
            resource.setdefault("meta", {}).setdefault("security", []).append(security)
        self.resources.append(resource)
        return {"reference": f"{resource['resourceType']}/{resource['id']}"}

    def add_shared(self, resource: JSON, el: etree._Element) -> JSON:
        """Add a resource without identity of its own (a Medication) once per distinct content:
        an activity, its supply order and its dispense naming the same product share one."""
        key = json.dumps(prune(resource), sort_keys=True)
        known = self._shared.get(key)
        if known is None:
            rid = str(uuid.uuid5(NAMESPACE, f"{resource['resourceType']}|{self.doc_key}|{key}"))
            self._ids.add(rid)
            self.add({"resourceType": resource["resourceType"], "id": rid, **{k: v for k, v in resource.items() if k != "resourceType"}}, el)
            known = self._shared[key] = self.resources[-1]
        return {"reference": f"{known['resourceType']}/{known['id']}"}

    def _confidentiality(self, el: etree._Element | None) -> str:
        """The most restrictive confidentiality of the document and the element's ancestors."""
        best = self.confidentiality
        node = el
        while node is not None:
            code = first_child(node, "confidentialityCode")
            value = code.get("code", "").strip().upper() if code is not None else ""
            if CONFIDENTIALITY_RANK.get(value, -1) > CONFIDENTIALITY_RANK.get(best, -1):
                best = value
            node = node.getparent()
        return best

    def subject(self) -> JSON:
        """The patient reference every clinical resource carries."""
        return dict(self.patient) if self.patient else {"display": "patient not identified (the document has no recordTarget)"}

    # --- narrative and text -----------------------------------------------------------------

    def text_of(self, el: etree._Element | None) -> str | None:
        """Legible text of a ``text``/``originalText`` element: its own words, else what its
        ``reference`` points at in the narrative."""
        if el is None:
            return None
        own = clean("".join(el.itertext()))
        if own:
            return own
        ref = first_child(el, "reference")
        target = ref.get("value", "").strip() if ref is not None else ""
        return self.narrative.get(target.removeprefix("#")) if target else None

    def entry_text(self, el: etree._Element) -> str | None:
        return self.text_of(first_child(el, "text"))

    # --- coded values -----------------------------------------------------------------------

    def coding(self, el: etree._Element) -> JSON | None:
        code = (el.get("code") or "").strip()
        if not code:
            return None
        oid = (el.get("codeSystem") or "").strip()
        if not oid:
            self.issue(el, f"code {code!r} has no codeSystem; kept without a system", code="incomplete")
        system = CODE_SYSTEMS.get(oid) or (f"urn:oid:{oid}" if _OID.fullmatch(oid) else None)
        if oid and system is None:
            self.issue(el, f"codeSystem {oid!r} is not an OID; code {code!r} kept without a system", code="value")
        return {"system": system, "code": code, "display": clean(el.get("displayName"))}

    def concept(self, el: etree._Element | None) -> JSON | None:
        """CodeableConcept from a CD/CE/CO element; None when it carries neither code nor text."""
        if el is None:
            return None
        codings: list[JSON] = []
        seen: set[tuple[Any, Any]] = set()
        for source in (el, *children(el, "translation")):
            found = self.coding(source)
            if found is not None and (found.get("system"), found["code"]) not in seen:
                seen.add((found.get("system"), found["code"]))
                codings.append(found)
        if first_child(el, "qualifier") is not None:
            self.info(el, "code qualifiers (post-coordination) not mapped: a CodeableConcept has no place for them")
        text = self.text_of(first_child(el, "originalText"))
        if not codings and not text:
            return None
        return prune({"coding": codings, "text": text})

    # --- numbers, quantities, times ---------------------------------------------------------

    def number(self, el: etree._Element, attribute: str = "value") -> int | float | None:
        raw = (el.get(attribute) or "").strip()
        if not raw:
            return None
        try:
            value = Decimal(raw)
        except InvalidOperation:
            value = None
        if value is None or not value.is_finite() or abs(value) >= _MAX_NUMBER:
            self.issue(el, f"{attribute} {raw!r} is not a usable number; left out", code="value")
            return None
        return int(value) if value == value.to_integral_value() else float(raw)

    def quantity(self, el: etree._Element | None) -> JSON | None:
        """Quantity from a PQ, its unit as UCUM when one is written (CDA's default unit ``1``,
        a plain count, is left unsaid when the sender left it unsaid)."""
        if is_null(el):
            return None
        value = self.number(el)
        if value is None:
            return None
        unit = (el.get("unit") or "").strip()
        if unit:
            return {"value": value, "unit": unit, "system": UCUM, "code": unit}
        return {"value": value}

    def datetime(self, el: etree._Element | None, *, date_only: bool = False) -> str | None:
        """FHIR dateTime (or date) from a TS element's ``@value``; None when absent or unreadable."""
        if is_null(el):
            return None
        raw = (el.get("value") or "").strip()
        if not raw:
            return None
        m = _TS.fullmatch(raw)
        if m is None:
            self.issue(el, f"{raw!r} is not a C-CDA timestamp (YYYYMMDD[HHMM[SS]][+ZZZZ]); left out", code="value")
            return None
        year, month, day, hour, minute, second, fraction, zone = m.groups()
        if not _valid_date(year, month, day) or not _valid_time(hour, minute, second, zone):
            self.issue(el, f"{raw!r} is not a real date or time; left out", code="value")
            return None
        out = year + (f"-{month}" if month else "") + (f"-{day}" if day else "")
        if hour is None or date_only:
            return out
        if zone is None:
            self.info(el, f"time {raw!r} has no UTC offset; kept to the day (FHIR needs the offset)", code="incomplete")
            return out
        offset = "Z" if zone == "Z" else f"{zone[:3]}:{zone[3:]}"
        return f"{out}T{hour}:{minute or '00'}:{second or '00'}{fraction or ''}{offset}"

    def when(self, el: etree._Element | None) -> tuple[str, Any] | None:
        """A TS or IVL_TS as ``("DateTime", str)`` or ``("Period", {...})``."""
        if is_null(el):
            return None
        if el.get("value"):
            value = self.datetime(el)
            return ("DateTime", value) if value else None
        center = self.datetime(first_child(el, "center"))
        if center:
            return "DateTime", center
        low, high = self.datetime(first_child(el, "low")), self.datetime(first_child(el, "high"))
        if low and low == high:
            return "DateTime", low
        if low or high:
            return "Period", prune({"start": low, "end": high})
        if first_child(el, "width") is not None:
            self.issue(el, "a time given only as a width (duration) is not mapped")
        return None

    # --- identifiers, names, addresses, telecoms --------------------------------------------

    def identifier(self, el: etree._Element, *, report: bool = True) -> JSON | None:
        if el.get("nullFlavor"):
            return None
        root, ext = (el.get("root") or "").strip(), (el.get("extension") or "").strip()
        if _UUID.fullmatch(root):
            root_uri = f"urn:uuid:{root.lower()}"
        elif _OID.fullmatch(root):
            root_uri = f"urn:oid:{root}"
        else:
            if root and report:
                self.issue(el, f"id root {root!r} is neither an OID nor a UUID", code="value")
            return {"value": ext} if ext else None
        if ext:
            return {"system": IDENTIFIER_SYSTEMS.get(root, root_uri), "value": ext}
        if root in IDENTIFIER_SYSTEMS:
            return None  # an SSN or NPI root without the number identifies nothing
        return {"system": URI_SYSTEM, "value": root_uri}

    def identifiers(self, el: etree._Element, *, report: bool = True) -> list[JSON]:
        out: list[JSON] = []
        for child in children(el, "id"):
            ident = self.identifier(child, report=report)
            if ident is not None and ident not in out:
                out.append(ident)
        return out

    def names(self, el: etree._Element | None) -> list[JSON]:
        out: list[JSON] = []
        for name in _valued(el, "name"):
            given = [clean(g.text) for g in children(name, "given") if g.get("qualifier") != "CL"]
            called = [clean(g.text) for g in children(name, "given") if g.get("qualifier") == "CL"]
            family_el = first_child(name, "family")
            family = clean(family_el.text) if family_el is not None else None
            use = _use(name, NAME_USE)
            if use is None and family_el is not None and family_el.get("qualifier") == "BR":
                use = "maiden"
            parts = {
                "use": use,
                "family": family,
                "given": [g for g in given if g],
                "prefix": [clean(p.text) for p in children(name, "prefix") if clean(p.text)],
                "suffix": [clean(s.text) for s in children(name, "suffix") if clean(s.text)],
            }
            if not any(parts[k] for k in ("family", "given", "prefix", "suffix")):
                parts["text"] = clean("".join(name.itertext()))
            parts = prune(parts)
            if len(parts) > (1 if "use" in parts else 0):
                out.append(parts)
            if any(called):
                out.append(prune({"use": "nickname", "family": family, "given": [c for c in called if c]}))
        return out

    def addresses(self, el: etree._Element | None) -> list[JSON]:
        out: list[JSON] = []
        for addr in _valued(el, "addr"):
            uses = (addr.get("use") or "").split()
            found = prune(
                {
                    "use": _use(addr, ADDRESS_USE),
                    "type": "postal" if "PST" in uses else "physical" if "PHYS" in uses else None,
                    "line": [clean(line.text) for line in children(addr, "streetAddressLine") if clean(line.text)],
                    "city": clean(child_text(addr, "city")),
                    "district": clean(child_text(addr, "county")),
                    "state": clean(child_text(addr, "state")),
                    "postalCode": clean(child_text(addr, "postalCode")),
                    "country": clean(child_text(addr, "country")),
                }
            )
            if set(found) - {"use", "type"}:
                out.append(found)
        return out

    def telecoms(self, el: etree._Element | None) -> list[JSON]:
        out: list[JSON] = []
        for telecom in _valued(el, "telecom"):
            raw = (telecom.get("value") or "").strip()
            if not raw:
                continue
            scheme, _, rest = raw.partition(":")
            system = TELECOM_SCHEME.get(scheme.lower()) if rest else None
            value = (raw if system == "url" else rest.strip()) if system else raw
            if not value:
                continue
            out.append(prune({"system": system or "other", "value": value, "use": _use(telecom, TELECOM_USE)}))
        return out

    # --- parties ----------------------------------------------------------------------------

    def party(self, role: etree._Element | None) -> JSON | None:
        """Reference to who an ``assignedAuthor``/``assignedEntity`` is: a Practitioner for a
        person (or a bare id with nothing else), else the Organization it represents."""
        if is_null(role):
            return None
        person = first_child(role, "assignedPerson")
        device = first_child(role, "assignedAuthoringDevice")
        org = first_child(role, "representedOrganization")
        identifiers = self.identifiers(role)
        if person is not None or (device is None and org is None and identifiers):
            resource = {
                "resourceType": "Practitioner",
                "identifier": identifiers,
                "name": self.names(person),
                "telecom": self.telecoms(role),
                "address": self.addresses(role),
            }
            reference = self._once(resource, role)
            code = self.concept(first_child(role, "code"))
            place = self.organization(org)
            if reference is not None and (code is not None or place is not None):
                # C-CDA on FHIR: a person with a role code or an organization is also a
                # PractitionerRole; a NUCC taxonomy code is both its role and its specialty.
                nucc = [c for c in (code or {}).get("coding", []) if c.get("system") == NUCC_TAXONOMY]
                role_resource = {
                    "resourceType": "PractitionerRole",
                    "practitioner": reference,
                    "organization": place,
                    "code": [code] if code else None,
                    "specialty": [{"coding": nucc}] if nucc else None,
                }
                self.add_shared(role_resource, role)
            return reference
        if device is not None:
            self.info(device, "an authoring device is not mapped; the organization it represents stands in")
        return self.organization(org)

    def organization(self, org: etree._Element | None) -> JSON | None:
        if is_null(org):
            return None
        resource = {
            "resourceType": "Organization",
            "identifier": self.identifiers(org),
            "name": clean(child_text(org, "name")),
            "telecom": self.telecoms(org),
            "address": self.addresses(org),
        }
        return self._once(resource, org)

    def _once(self, resource: JSON, el: etree._Element) -> JSON | None:
        """Add a party unless the document already named it, then fill in what the first
        mention lacked."""
        resource = prune(resource)
        if len(resource) == 1:
            return None  # nothing but a resourceType: a placeholder element (``. . .``)
        rtype = resource["resourceType"]
        keys = [f"{rtype}|{i.get('system', '')}|{i['value']}" for i in resource.get("identifier", [])]
        if not keys:
            keys = [f"{rtype}|name|{resource.get('name')}"] if resource.get("name") else []
        for key in keys:
            known = self._parties.get(key)
            if known is not None:
                for name, value in resource.items():
                    known.setdefault(name, value)
                return {"reference": f"{rtype}/{known['id']}"}
        seeds = [k.split("|", 1)[1] for k in keys if not k.startswith(f"{rtype}|{SSN}|")]
        resource = {"resourceType": rtype, "id": self.mint(rtype, el, seeds), **{k: v for k, v in resource.items() if k != "resourceType"}}
        reference = self.add(resource, el)
        for key in keys:
            self._parties[key] = self.resources[-1]
        return reference

    def authors(self, el: etree._Element) -> list[tuple[str | None, JSON | None]]:
        """(time, party reference) of each ``author`` of an element, in document order."""
        out = []
        for author in children(el, "author"):
            time = self.datetime(first_child(author, "time"))
            out.append((time, self.party(first_child(author, "assignedAuthor"))))
        return out


def _valued(el: etree._Element | None, name: str) -> list[etree._Element]:
    """Children named ``name`` that carry a value (no nullFlavor)."""
    return [c for c in children(el, name) if not c.get("nullFlavor")] if el is not None else []


def _use(el: etree._Element, table: dict[str, str]) -> str | None:
    """The FHIR ``use`` for the first of an element's space-separated CDA uses that has one."""
    return next((table[u] for u in (el.get("use") or "").split() if u in table), None)


def _valid_date(year: str, month: str | None, day: str | None) -> bool:
    if int(year) == 0:
        return False
    if month is None:
        return True
    m = int(month)
    if not 1 <= m <= 12:
        return False
    if day is None:
        return True
    d = int(day)
    leap = int(year) % 4 == 0 and (int(year) % 100 != 0 or int(year) % 400 == 0)
    return 1 <= d <= (_DAYS[m - 1] if m != 2 else 29 if leap else 28)


def _valid_time(hour: str | None, minute: str | None, second: str | None, zone: str | None) -> bool:
    if hour is not None and int(hour) > 23:
        return False
    if minute is not None and int(minute) > 59:
        return False
    if second is not None and int(second) > 59:
        return False
    if zone and zone != "Z":
        hours, minutes = int(zone[1:3]), int(zone[3:])
        if minutes > 59 or hours > 14 or (hours == 14 and minutes):
            return False
    return True


def first_time(authors: list[tuple[str | None, JSON | None]]) -> str | None:
    """The earliest author time (C-CDA on FHIR: authoredOn / recordedDate)."""
    times = sorted(t for t, _ in authors if t)
    return times[0] if times else None


def data_absent(reason: str = "unknown") -> JSON:
    """A CodeableConcept that says only why the value is missing (data-absent-reason)."""
    return {"extension": [{"url": DATA_ABSENT, "valueCode": reason}]}
