"""The one hardened XML parser of the project: every XML document enters through ``parse``.

Why one parser: XML parsers are dangerous by default (external entities read local files or
reach the network, entity expansion eats memory, deep nesting eats the stack), and a single
place is a single thing to audit. FHIR XML, C-CDA and NCPDP SCRIPT all go through here.

What it guarantees, in the order it checks:

* **size** — the byte length is checked before anything is parsed (``max_bytes``).
* **no DTD at all** — a ``<!DOCTYPE`` in the prolog is refused before libxml2 sees the bytes,
  and the parsed document is checked again (``docinfo``) so an odd encoding cannot slip one by.
  FHIR, C-CDA and NCPDP SCRIPT never need a DTD; refusing them outright closes billion-laughs,
  quadratic blow-up, XXE (``file:``/``http:`` entities), external DTDs and parameter entities
  in one rule. The parser settings make the parse itself harmless even before that check:
  entities are never substituted (``resolve_entities=False``), no DTD is loaded
  (``load_dtd=False``), nothing is fetched (``no_network=True``) and libxml2 keeps its limits
  (``huge_tree=False``: 10 MB text nodes, depth 256).
* **shape** — nesting deeper than ``max_depth`` (libxml2 itself stops at 256) and more than
  ``max_elements`` elements are refused; when a cheap upper bound (the count of ``<``) shows the
  document may exceed ``max_elements``, it is parsed incrementally and abandoned at the limit,
  so a flood of tiny elements never builds a tree.
* **root** — ``expected_root`` names the acceptable root elements.

Comments and processing instructions are dropped while parsing: no format we read gives them
meaning, and callers then meet only elements. Whitespace is kept (FHIR narrative is XHTML).

Errors are :class:`XmlRejected` (400) naming what was wrong (line and column for malformed
XML) and :class:`XmlTooLarge` (413) for the limits.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

from lxml import etree

from ..errors import Issue, UnsupportedFormat

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "XmlRejected",
    "XmlTooLarge",
    "child_text",
    "children",
    "first_child",
    "local_name",
    "namespace",
    "parse",
]

MAX_BYTES = 10 * 1024 * 1024
MAX_ELEMENTS = 200_000
# libxml2 refuses deeper documents on its own unless huge_tree is set, which we never do.
MAX_DEPTH = 256

_PARSER_OPTIONS = {
    "resolve_entities": False,  # never substitute entities (XXE, billion laughs)
    "no_network": True,  # never fetch anything
    "load_dtd": False,  # never read an external DTD or external parameter entities
    "dtd_validation": False,
    "attribute_defaults": False,  # attribute defaults come from a DTD: none
    "huge_tree": False,  # keep libxml2's own size and depth limits
    "remove_comments": True,
    "remove_pis": True,
    "strip_cdata": True,
    "collect_ids": False,  # no xml:id hash table: nobody looks ids up through it
    "recover": False,  # malformed is an error, never a guess
}

# The prolog (optional BOM, XML declaration, comments, PIs, whitespace) followed by a DOCTYPE.
_PROLOG_SCAN = 64 * 1024  # a prolog longer than this is checked after parsing (docinfo)


class XmlRejected(UnsupportedFormat):
    """XML we refuse to read: malformed, carrying a DTD, too deep, or the wrong document."""

    status = 400
    issue_code = "structure"


class XmlTooLarge(XmlRejected):
    """XML over one of the size limits (bytes or elements)."""

    status = 413
    issue_code = "too-costly"


_local = threading.local()


def _parser() -> etree.XMLParser:
    # One parser per thread: an lxml parser is not meant to be used by two threads at once.
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = etree.XMLParser(**_PARSER_OPTIONS)
    return parser


def parse(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int = MAX_BYTES,
    expected_root: set[str] | frozenset[str] | None = None,
    max_depth: int = MAX_DEPTH,
    max_elements: int = MAX_ELEMENTS,
) -> etree._Element:
    """Parse one XML document safely and return its root element.

    The encoding comes from the BOM or the XML declaration (UTF-8 when neither says);
    ``str`` input is encoded as UTF-8 first, so it must not declare another encoding.

    :param max_bytes: refuse larger input before parsing (:class:`XmlTooLarge`).
    :param expected_root: acceptable root elements; a plain name (``"Bundle"``) matches the local
        name in any namespace, a Clark name (``"{http://hl7.org/fhir}Bundle"``) must match exactly.
    :param max_depth: deepest element nesting accepted (at most 256, libxml2's own limit).
    :param max_elements: most elements accepted (:class:`XmlTooLarge`).
    :raises XmlRejected: malformed XML (message and location carry line and column), a DTD,
        nesting too deep, or an unexpected root.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > max_bytes:
        raise XmlTooLarge(
            f"XML document is {len(data)} bytes; the limit is {max_bytes}",
            [Issue(f"XML document larger than {max_bytes} bytes", code="too-costly")],
        )
    if not data.strip():
        raise XmlRejected("empty XML document")
    if _prolog_has_doctype(data):
        raise _dtd_refused()

    try:
        # data.count(b"<") bounds the element count from above: the common case parses in one
        # C call; only a document that may be over the limit is parsed incrementally.
        if data.count(b"<") <= max_elements:
            root = etree.fromstring(data, _parser())
        else:
            root = _parse_counting(data, max_elements)
    except etree.XMLSyntaxError as exc:
        raise _malformed(exc) from None

    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise _dtd_refused()
    if max_depth < MAX_DEPTH and root.xpath("boolean(/*" + "/*" * max_depth + ")"):
        raise XmlRejected(
            f"XML nesting deeper than {max_depth} elements",
            [Issue(f"XML nesting deeper than {max_depth} elements", code="too-costly")],
        )
    if expected_root is not None and not _root_matches(root, expected_root):
        found = f"{{{namespace(root)}}}{local_name(root)}" if namespace(root) else local_name(root)
        wanted = ", ".join(sorted(expected_root))
        raise XmlRejected(
            f"unexpected root element {found}; expected {wanted}",
            [Issue(f"root element is {found}, expected one of: {wanted}", location=local_name(root))],
        )
    return root


def _parse_counting(data: bytes, max_elements: int) -> etree._Element:
    """Parse in chunks, counting elements as they start, and stop at the limit."""
    parser = etree.XMLPullParser(events=("start",), **_PARSER_OPTIONS)
    count = 0
    chunk = 64 * 1024
    for offset in range(0, len(data), chunk):
        parser.feed(data[offset : offset + chunk])
        for _event in parser.read_events():
            count += 1
            if count > max_elements:
                raise XmlTooLarge(
                    f"XML document has more than {max_elements} elements",
                    [Issue(f"more than {max_elements} XML elements", code="too-costly")],
                )
    return parser.close()


def _prolog_has_doctype(data: bytes) -> bool:
    """Whether the prolog declares a DOCTYPE, found without handing the bytes to libxml2."""
    head = data[:_PROLOG_SCAN]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head[:2] in (b"<\x00", b"\x00<"):
        codec = "utf-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else (
            "utf-16-le" if head[:2] == b"<\x00" else "utf-16-be"
        )
        text = head[: len(head) // 2 * 2].decode(codec, errors="replace")
    else:
        # ASCII-compatible encodings (UTF-8, Latin-1, ...): markup is plain ASCII in all of them.
        text = head.decode("latin-1")
    return _doctype_after_prolog(text)


def _doctype_after_prolog(text: str) -> bool:
    """Skip the BOM, white space, processing instructions and comments; is a DOCTYPE next?

    A plain left-to-right scan, linear in the prolog's length: a regular expression with
    lazy repeats here backtracks exponentially on a run of processing instructions, which
    would let a few hundred bytes hang the one parser every XML input goes through.
    """
    pos = 1 if text.startswith("\ufeff") else 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if text.startswith("<?", pos):
            end = text.find("?>", pos + 2)
        elif text.startswith("<!--", pos):
            end = text.find("-->", pos + 4)
        else:
            return text.startswith("<!DOCTYPE", pos)
        if end < 0:
            return False  # unterminated: libxml2 will call it malformed
        pos = end + 2 if text[end] == "?" else end + 3


def _dtd_refused() -> XmlRejected:
    message = "XML with a DOCTYPE/DTD is not accepted (no entities, no external DTDs)"
    return XmlRejected(message, [Issue(message, code="security")])


def _malformed(exc: etree.XMLSyntaxError) -> XmlRejected:
    line, column = exc.position if exc.position else (exc.lineno or 0, 0)
    reason = (exc.msg or str(exc)).split(" (<string>", 1)[0]
    # libxml2 adds its own ", line L, column C" to some messages; ours is in the location.
    reason = re.sub(r", line \d+, column \d+$", "", reason)
    location = f"line {line}, column {column}"
    if "Excessive depth" in reason:
        reason = f"XML nesting deeper than {MAX_DEPTH} elements"
        return XmlRejected(f"{reason} (at {location})", [Issue(reason, location=location, code="too-costly")])
    return XmlRejected(f"malformed XML at {location}: {reason}", [Issue(reason, location=location, code="structure")])


def _root_matches(root: etree._Element, expected: set[str] | frozenset[str]) -> bool:
    return root.tag in expected or local_name(root) in expected


# --- walking a parsed tree by local name --------------------------------------------------


def local_name(el: etree._Element) -> str:
    """The element's name without its namespace (``{urn:x}Foo`` -> ``Foo``)."""
    tag = el.tag
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def namespace(el: etree._Element) -> str:
    """The element's namespace URI, ``""`` when it has none."""
    tag = el.tag
    return tag[1:].split("}", 1)[0] if isinstance(tag, str) and tag.startswith("{") else ""


def children(el: etree._Element, *names: str) -> Iterator[etree._Element]:
    """The element children of ``el`` whose local name is one of ``names`` (all when none given),
    in document order, whatever their namespace."""
    for child in el:
        if not isinstance(child.tag, str):
            continue
        if not names or local_name(child) in names:
            yield child


def first_child(el: etree._Element, name: str) -> etree._Element | None:
    """The first element child of ``el`` with local name ``name``, or None."""
    return next(children(el, name), None)


def child_text(el: etree._Element, name: str, default: str | None = None) -> str | None:
    """The stripped text of the first child named ``name``; ``default`` when it is absent or empty."""
    child = first_child(el, name)
    if child is None or child.text is None:
        return default
    text = child.text.strip()
    return text if text else default
