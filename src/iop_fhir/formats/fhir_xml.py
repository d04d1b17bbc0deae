"""FHIR XML <-> FHIR JSON dicts (R4), exact to the character.

Why our own converter and not ``model_dump_xml`` / ``model_validate_xml``: fhir.resources 8.x
(``fhir_core.xml_utils``) parses with ``etree.fromstring(text, parser)`` — it accepts a custom
parser but only text, and its internal ``Node.from_element`` is not public API — and on the way
it changes the data (found by experiment; all but the narrative one pinned in the tests):

* decimals go through ``float``: ``1.50`` is written ``1.5``, ``0.1234567890123456789``
  becomes ``0.12345678901234568``;
* date-times are re-rendered: ``...T10:00:00.000Z`` becomes ``...T10:00:00+00:00``, and
  nanoseconds are cut to microseconds;
* ``Element.id`` is written as a child ``<id value=...>`` instead of the ``id`` attribute
  (schema-invalid XML), and ``_birthDate.id`` is lost;
* a pretty-printed narrative keeps the indentation after ``</div>`` inside the JSON ``div``;
* an unknown element, or an element outside any namespace, escapes as a bare ``KeyError``.

So both directions walk the document with the model classes' element tables
(:func:`~iop_fhir.formats.fhir_validate.elements_of`: element order, cardinality, primitive
type) and copy lexical values verbatim. Hostile XML never reaches another parser: input goes
through :mod:`~iop_fhir.formats.safe_xml` and the converter works on that tree; narrative
``div`` strings headed for XML go through it too.

Conversion is structural, as :func:`~iop_fhir.formats.fhir_json.loads` is for JSON: unknown
elements, repeats of single elements, misplaced text and bad primitive lexicals are errors;
business validation is :func:`~iop_fhir.formats.fhir_validate.validate_resource` on the dict.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from lxml import etree

from ..errors import Issue, IssueList, RecordInvalid
from . import safe_xml
from .fhir_json import summary
from .fhir_validate import ElementInfo, elements_of, model_class

__all__ = ["FHIR_NS", "XHTML_NS", "from_xml", "to_xml"]

FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"
_F = f"{{{FHIR_NS}}}"
_XHTML_DIV = f"{{{XHTML_NS}}}div"

_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_EXTENSION = get_fhir_model_class("Extension")
_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'


# --- JSON -> XML -----------------------------------------------------------------------------


def to_xml(resource: dict[str, Any], *, pretty: bool = False, xml_declaration: bool = True) -> bytes:
    """Serialize a FHIR JSON dict as FHIR XML (UTF-8), elements in FHIR order.

    Primitive values are written as given: ``Decimal("1.50")`` as ``1.50``, strings verbatim.

    :raises RecordInvalid: unknown resource type, unknown elements, or a narrative ``div`` that
        is not well-formed XHTML (each located).
    """
    resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
    cls = model_class(resource_type)  # type: ignore[arg-type]
    state = _WriteState(pretty=pretty)
    root = etree.Element(_F + resource_type, nsmap={None: FHIR_NS})
    _write(root, resource, cls, resource_type, True, state)  # type: ignore[arg-type]
    if state:
        raise RecordInvalid(f"cannot write {resource_type} as XML: {summary(state.issues)}", state.issues)
    if pretty:
        etree.indent(root, space="  ")
        # Indenting must not touch the narrative: put each div back as it was written.
        for div, original in state.divs:
            original.tail = div.tail
            div.getparent().replace(div, original)
    body = etree.tostring(root, encoding="UTF-8", xml_declaration=False)
    return _DECLARATION + body if xml_declaration else body


@dataclass
class _WriteState(IssueList):
    """Issues found while writing, and the narrative divs as parsed (kept out of indenting)."""

    pretty: bool = False
    divs: list[tuple[etree._Element, etree._Element]] = field(default_factory=list)


def _write(el: etree._Element, obj: dict[str, Any], cls: type, path: str, is_resource: bool, state: _WriteState) -> None:
    table = elements_of(cls)
    for key in obj:
        if key not in table and key != "resourceType":
            state.add(f"{path}.{key}", f"unknown element {key!r}", code="structure")
    for name, info in table.items():
        if name[0] == "_":
            continue  # written with its primitive
        value = obj.get(name)
        if info.primitive:
            extra = obj.get(f"_{name}")
            if value is None and extra is None:
                continue
            if (name == "id" and not is_resource) or (name == "url" and cls is _EXTENSION):
                if value is not None:  # Element.id and Extension.url are attributes in XML
                    el.set(name, _lexical(value))
            elif info.type == "xhtml":
                _write_div(el, value, f"{path}.{name}", state)
            else:
                _write_primitive(el, name, info, value, extra, f"{path}.{name}", state)
        elif value is not None:
            for index, item in enumerate(value if info.many and isinstance(value, list) else (value,)):
                where = f"{path}.{name}[{index}]" if info.many else f"{path}.{name}"
                if not isinstance(item, dict):
                    state.add(where, f"expected an object, got {type(item).__name__}", code="structure")
                    continue
                child = etree.SubElement(el, _F + name)
                if info.model is None:  # a resource inside a resource: <resource><Patient>...
                    try:
                        nested = model_class(item.get("resourceType"))  # type: ignore[arg-type]
                    except RecordInvalid as exc:
                        state.add(f"{where}.resourceType", exc.message, code="not-supported")
                        continue
                    inner = etree.SubElement(child, _F + item["resourceType"])
                    _write(inner, item, nested, where, True, state)
                else:
                    _write(child, item, info.model, where, False, state)


def _write_primitive(
    el: etree._Element, name: str, info: ElementInfo, value: Any, extra: Any, path: str, state: _WriteState
) -> None:
    if info.many:
        if not isinstance(value, (list, type(None))) or not isinstance(extra, (list, type(None))):
            state.add(path, f"{name} repeats: expected an array", code="structure")
            return
        if value is not None and extra is not None and len(value) != len(extra):
            state.add(path, f"{name} and _{name} differ in length", code="structure")
        count = max(len(value or ()), len(extra or ()))
        pairs = list(zip(value or [None] * count, extra or [None] * count))
    else:
        pairs = [(value, extra)]
    for value_, extra_ in pairs:
        if value_ is None and extra_ is None:
            continue
        extensions = extra_.get("extension") if isinstance(extra_, dict) else None
        if (extra_ is not None and not isinstance(extra_, dict)) or not isinstance(extensions, (list, type(None))):
            state.add(f"{path.rpartition('.')[0]}._{name}", "id and extensions of a primitive are an object", code="structure")
            continue
        if isinstance(value_, (dict, list)):
            state.add(path, f"{info.type} must be a primitive value", code="structure")
            continue
        child = etree.SubElement(el, _F + name)
        if extra_ is not None and extra_.get("id") is not None:
            child.set("id", _lexical(extra_["id"]))
        if value_ is not None:
            child.set("value", _lexical(value_))
        for index, extension in enumerate(extensions or ()):
            where = f"{path}.extension[{index}]"
            if not isinstance(extension, dict):
                state.add(where, "an extension is an object", code="structure")
                continue
            _write(etree.SubElement(child, _F + "extension"), extension, _EXTENSION, where, False, state)


def _write_div(el: etree._Element, value: Any, path: str, state: _WriteState) -> None:
    if not isinstance(value, str):
        state.add(path, "the narrative div must be a string of XHTML", code="structure")
        return
    try:
        div = safe_xml.parse(value, expected_root={_XHTML_DIV})
    except safe_xml.XmlRejected as exc:
        state.add(path, f"narrative is not a well-formed XHTML div: {exc.message}", code="value")
        return
    el.append(div)
    if state.pretty:
        state.divs.append((div, copy.deepcopy(div)))


def _lexical(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)  # str, int, Decimal (verbatim)


# --- XML -> JSON -----------------------------------------------------------------------------


def from_xml(
    data: bytes | str, *, exact_decimals: bool = False, max_bytes: int = safe_xml.MAX_BYTES
) -> dict[str, Any]:
    """Read one FHIR XML resource into a FHIR JSON dict.

    The bytes are parsed by :func:`safe_xml.parse` (no DTDs, size and depth limits); the tree
    is then converted element by element. Comments are dropped.

    :param exact_decimals: decimals as ``Decimal`` (``1.50`` stays ``1.50``); floats otherwise.
    :raises safe_xml.XmlRejected: not acceptable XML (see :mod:`safe_xml`).
    :raises RecordInvalid: XML, but not FHIR: wrong namespace, unknown resource type or
        element, repeated single element, bad boolean/integer/decimal, stray text — each
        located by FHIRPath and line.
    """
    root = safe_xml.parse(data, max_bytes=max_bytes)
    resource_type = safe_xml.local_name(root)
    if safe_xml.namespace(root) != FHIR_NS:
        message = f"root element {resource_type} is not in the FHIR namespace {FHIR_NS}"
        raise RecordInvalid(message, [Issue(message, location=resource_type, code="structure")])
    cls = model_class(resource_type)
    issues = IssueList()
    resource = _read(root, cls, resource_type, True, exact_decimals, issues)
    if issues:
        raise RecordInvalid(f"{resource_type} XML is not valid FHIR: {summary(issues.issues)}", issues.issues)
    return resource


def _read(
    el: etree._Element, cls: type, path: str, is_resource: bool, exact: bool, issues: IssueList
) -> dict[str, Any]:
    table = elements_of(cls)
    obj: dict[str, Any] = {"resourceType": safe_xml.local_name(el)} if is_resource else {}
    for attribute, value in el.attrib.items():
        if (attribute == "id" and not is_resource) or (attribute == "url" and cls is _EXTENSION):
            obj[attribute] = value
        else:
            issues.add(path, f"unexpected attribute {attribute!r} (line {el.sourceline})", code="structure")
    _no_text(el.text, path, el, issues)
    counts: dict[str, int] = {}
    for child in el:
        _no_text(child.tail, path, el, issues)
        if not isinstance(child.tag, str):
            continue  # entity references cannot occur (no DTD); comments and PIs are removed
        name = safe_xml.local_name(child)
        info = table.get(name)
        if info is None or name[0] == "_" or (name == "id" and not is_resource) or (name == "url" and cls is _EXTENSION):
            # Element.id and Extension.url are attributes in XML, never child elements.
            issues.add(f"{path}.{name}", f"unknown element {name!r} (line {child.sourceline})", code="structure")
            continue
        expected_ns = XHTML_NS if info.type == "xhtml" else FHIR_NS
        if safe_xml.namespace(child) != expected_ns:
            issues.add(f"{path}.{name}", f"{name} must be in the namespace {expected_ns} (line {child.sourceline})")
            continue
        index = counts.get(name, 0)
        counts[name] = index + 1
        if index and not info.many:
            issues.add(f"{path}.{name}", f"{name} may occur only once (line {child.sourceline})", code="structure")
            continue
        where = f"{path}.{name}[{index}]" if info.many else f"{path}.{name}"
        if info.primitive:
            _read_primitive(obj, child, info, where, exact, issues)
        elif info.model is None:
            inner = list(safe_xml.children(child))
            if len(inner) != 1 or safe_xml.namespace(inner[0]) != FHIR_NS:
                issues.add(where, f"{name} must hold exactly one FHIR resource (line {child.sourceline})")
                continue
            try:
                nested = model_class(safe_xml.local_name(inner[0]))
            except RecordInvalid as exc:
                issues.add(f"{where}.resourceType", exc.message, code="not-supported")
                continue
            _put(obj, name, info.many, _read(inner[0], nested, where, True, exact, issues))
        else:
            value = _read(child, info.model, where, False, exact, issues)
            if not value:
                issues.add(where, f"{name} is empty (line {child.sourceline})", code="structure")
                continue
            _put(obj, name, info.many, value)
    for name in counts:
        info = table[name]
        if info.primitive and info.many and name in obj and all(v is None for v in obj[name]):
            del obj[name]  # every item carried only extensions: "_given" alone says it all
    return obj


def _read_primitive(
    obj: dict[str, Any], el: etree._Element, info: ElementInfo, where: str, exact: bool, issues: IssueList
) -> None:
    name = info.name
    if info.type == "xhtml":
        div = copy.deepcopy(el)
        div.tail = None
        etree.cleanup_namespaces(div)  # drop declarations inherited from the resource
        obj[name] = etree.tostring(div, encoding="unicode")
        return
    value: Any = None
    extra: dict[str, Any] = {}
    for attribute, text in el.attrib.items():
        if attribute == "value":
            value = _typed(text, info, where, exact, el, issues)
        elif attribute == "id":
            extra["id"] = text
        else:
            issues.add(where, f"unexpected attribute {attribute!r} (line {el.sourceline})", code="structure")
    _no_text(el.text, where, el, issues)
    extensions = []
    for index, child in enumerate(safe_xml.children(el)):
        _no_text(child.tail, where, el, issues)
        if safe_xml.local_name(child) != "extension" or safe_xml.namespace(child) != FHIR_NS:
            issues.add(where, f"a primitive holds only extensions, not {safe_xml.local_name(child)!r}")
            continue
        extensions.append(_read(child, _EXTENSION, f"{where}.extension[{index}]", False, exact, issues))
    if extensions:
        extra["extension"] = extensions
    if value is None and not extra:
        if "value" not in el.attrib:  # a bad value was reported already
            issues.add(where, f"{name} has neither a value nor extensions (line {el.sourceline})", code="structure")
        return
    if not info.many:
        if value is not None:
            obj[name] = value
        if extra:
            obj[f"_{name}"] = extra
        return
    # Repeating primitive: "given": [...] and "_given": [...] stay aligned, null where absent.
    values = obj.setdefault(name, [])
    extras = obj.get(f"_{name}")
    if extra and extras is None:
        extras = obj[f"_{name}"] = [None] * len(values)
    values.append(value)
    if extras is not None:
        extras.append(extra or None)


def _typed(text: str, info: ElementInfo, where: str, exact: bool, el: etree._Element, issues: IssueList) -> Any:
    kind = info.json_kind
    if kind == "str":
        return text
    if kind == "bool":
        if text in ("true", "false"):
            return text == "true"
    elif kind == "int":
        if _INTEGER.fullmatch(text):
            return int(text)
    elif _DECIMAL.fullmatch(text):
        return Decimal(text) if exact else float(text)
    issues.add(where, f"{text!r} is not a valid {info.type} (line {el.sourceline})", code="value")
    return None


def _put(obj: dict[str, Any], name: str, many: bool, value: Any) -> None:
    if many:
        obj.setdefault(name, []).append(value)
    else:
        obj[name] = value


def _no_text(text: str | None, path: str, el: etree._Element, issues: IssueList) -> None:
    if text is not None and not text.isspace():
        issues.add(path, f"unexpected text {text.strip()[:40]!r} (line {el.sourceline})", code="structure")
