"""The hardened XML parser: hostile documents are refused quickly, honest ones parse as sent."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
from lxml import etree

from iop_fhir.errors import UnsupportedFormat
from iop_fhir.formats import safe_xml
from iop_fhir.formats.safe_xml import XmlRejected, XmlTooLarge, parse

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz a="&lol9;">&lol9;</lolz>"""


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("TOP-SECRET-CONTENT")
    return path


@pytest.fixture
def external_dtd(tmp_path):
    path = tmp_path / "evil.dtd"
    path.write_text('<!ENTITY leaked "LEAKED-FROM-DTD">')
    return path


def assert_dtd_refused(data: bytes) -> None:
    with pytest.raises(XmlRejected) as info:
        parse(data)
    assert "DOCTYPE" in info.value.message
    assert info.value.status == 400
    assert info.value.issues[0].code == "security"


# --- honest documents ------------------------------------------------------------------------


def test_parses_and_walks_by_local_name():
    root = parse(
        b'<Msg xmlns="urn:a" xmlns:b="urn:b"><Header><To>pharm</To></Header>'
        b"<b:Body><Item>1</Item><Item> 2 </Item><Other/></b:Body></Msg>"
    )
    assert safe_xml.local_name(root) == "Msg"
    assert safe_xml.namespace(root) == "urn:a"
    body = safe_xml.first_child(root, "Body")
    assert body is not None and safe_xml.namespace(body) == "urn:b"
    assert [el.text for el in safe_xml.children(body, "Item")] == ["1", " 2 "]
    assert [safe_xml.local_name(el) for el in safe_xml.children(body)] == ["Item", "Item", "Other"]
    assert safe_xml.child_text(safe_xml.first_child(root, "Header"), "To") == "pharm"
    assert safe_xml.child_text(body, "Other", "none") == "none"
    assert safe_xml.child_text(body, "Missing") is None
    assert safe_xml.first_child(root, "Missing") is None


def test_comments_and_processing_instructions_are_dropped_whitespace_kept():
    root = parse(b"<?xml version='1.0'?><!-- c --><r><?pi x?><!-- c --><a> x </a></r>")
    assert [safe_xml.local_name(c) for c in root] == ["a"]
    assert root[0].text == " x "


def test_utf8_bom_and_declaration():
    root = parse(b'\xef\xbb\xbf<?xml version="1.0" encoding="UTF-8"?><r>\xc3\xa9</r>')
    assert root.text == "\u00e9"


def test_declared_latin1():
    root = parse('<?xml version="1.0" encoding="ISO-8859-1"?><r>\u00e9\u00fc</r>'.encode("latin-1"))
    assert root.text == "\u00e9\u00fc"


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16(codec):
    text = '<?xml version="1.0" encoding="UTF-16"?><r a="\u00e9">\u65e5\u672c</r>'
    data = ("\ufeff" + text).encode(codec) if codec != "utf-16" else text.encode(codec)
    root = parse(data)
    assert root.text == "\u65e5\u672c" and root.get("a") == "\u00e9"


def test_str_input_is_utf8():
    assert parse("<r>\u00e9</r>").text == "\u00e9"


def test_encoding_declaration_that_lies_is_rejected():
    with pytest.raises(XmlRejected):
        parse(b'<?xml version="1.0" encoding="UTF-16"?><r>x</r>')


def test_parses_concurrently_from_threads():
    errors: list[Exception] = []

    def work() -> None:
        try:
            for i in range(200):
                assert parse(b"<r><a>%d</a></r>" % i)[0].text == str(i)
        except (AssertionError, XmlRejected) as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


# --- DTDs and entities -----------------------------------------------------------------------


def test_billion_laughs():
    assert_dtd_refused(BILLION_LAUGHS)


def test_quadratic_blowup():
    big = "x" * 50_000
    refs = "&a;" * 50_000
    assert_dtd_refused(f'<!DOCTYPE r [<!ENTITY a "{big}">]><r>{refs}</r>'.encode())


def test_xxe_local_file(secret):
    assert_dtd_refused(f'<!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]><r>&x;</r>'.encode())


def test_xxe_http():
    assert_dtd_refused(b'<!DOCTYPE r [<!ENTITY x SYSTEM "http://127.0.0.1:9/x">]><r>&x;</r>')


def test_external_dtd(external_dtd):
    assert_dtd_refused(f'<!DOCTYPE r SYSTEM "file://{external_dtd}"><r>&leaked;</r>'.encode())
    assert_dtd_refused(b'<!DOCTYPE r PUBLIC "-//X//Y" "http://127.0.0.1:9/x.dtd"><r/>')


def test_parameter_entities(external_dtd):
    assert_dtd_refused(f'<!DOCTYPE r [<!ENTITY % pe SYSTEM "file://{external_dtd}"> %pe;]><r>&leaked;</r>'.encode())


def test_doctype_after_prolog_comments_and_pis():
    assert_dtd_refused(b'<?xml version="1.0"?>\n<!-- a -->\n<?pi x?>\n<!DOCTYPE r [<!ENTITY x "y">]><r>&x;</r>')


def test_doctype_in_utf16():
    assert_dtd_refused('<!DOCTYPE r [<!ENTITY x "y">]><r>&x;</r>'.encode("utf-16"))


def test_doctype_behind_a_long_prolog_is_caught_after_parsing(secret):
    # Longer than the prefix scanned before parsing: the docinfo check after parsing refuses it.
    data = b"<!--" + b"x" * 70_000 + b"-->" + f'<!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]><r>&x;</r>'.encode()
    assert_dtd_refused(data)


def test_parser_settings_keep_entities_unexpanded_even_without_the_prescan(secret, external_dtd):
    # Defence in depth: the settings alone never read the file or the external DTD.
    for data in (
        f'<!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]><r>&x;</r>',
        f'<!DOCTYPE r SYSTEM "file://{external_dtd}"><r>&leaked;</r>',
        f'<!DOCTYPE r [<!ENTITY % pe SYSTEM "file://{external_dtd}"> %pe;]><r>&leaked;</r>',
    ):
        root = etree.fromstring(data.encode(), safe_xml._parser())
        text = etree.tostring(root)
        assert b"TOP-SECRET" not in text and b"LEAKED" not in text
    with pytest.raises(etree.XMLSyntaxError):  # libxml2's own amplification limit
        etree.fromstring(BILLION_LAUGHS, safe_xml._parser())


def test_undefined_entity_is_malformed():
    with pytest.raises(XmlRejected, match="Entity 'x' not defined"):
        parse(b"<r>&x;</r>")


# --- limits ----------------------------------------------------------------------------------


def test_oversize_is_refused_before_parsing():
    with pytest.raises(XmlTooLarge) as info:
        parse(b"<" * 101, max_bytes=100)  # malformed too: the size check came first
    assert info.value.status == 413
    assert isinstance(info.value, UnsupportedFormat)
    assert "100" in info.value.message


def test_default_size_limit_is_ten_mib():
    with pytest.raises(XmlTooLarge):
        parse(b" " * (10 * 1024 * 1024 + 1))


def test_deep_nesting_is_refused():
    with pytest.raises(XmlRejected, match="deeper than 256"):
        parse(b"<a>" * 5000 + b"</a>" * 5000)


def test_custom_depth_limit():
    assert parse(b"<a>" * 10 + b"</a>" * 10, max_depth=10) is not None
    with pytest.raises(XmlRejected, match="deeper than 10"):
        parse(b"<a>" * 11 + b"</a>" * 11, max_depth=10)


def test_too_many_elements():
    with pytest.raises(XmlTooLarge, match="more than 1000 elements"):
        parse(b"<r>" + b"<a/>" * 1000 + b"</r>", max_elements=1000)
    # A flood of tiny elements under the default limit is stopped while parsing.
    with pytest.raises(XmlTooLarge):
        parse(b"<r>" + b"<a/>" * 250_000 + b"</r>")


def test_many_angle_brackets_but_few_elements_parse():
    # More '<' than max_elements (comments) sends it down the counting path, which accepts it.
    root = parse(b"<r>" + b"<!--c-->" * 2000 + b"<a/></r>", max_elements=1000)
    assert [safe_xml.local_name(c) for c in root] == ["a"]


# --- malformed and unexpected ----------------------------------------------------------------


def test_malformed_reports_line_and_column():
    with pytest.raises(XmlRejected) as info:
        parse(b"<a>\n  <b>\n</a>")
    error = info.value
    assert "line 3" in error.message and "column" in error.message
    assert error.issues[0].location.startswith("line 3, column")
    assert "mismatch" in error.issues[0].message


@pytest.mark.parametrize("data", [b"", b"   \n", b"not xml", b"<a>", b"<a></b>", b"<a/><b/>"])
def test_not_xml(data):
    with pytest.raises(XmlRejected):
        parse(data)


def test_expected_root_by_local_name_in_any_namespace():
    assert parse(b'<Bundle xmlns="http://hl7.org/fhir"/>', expected_root={"Bundle"}) is not None
    assert parse(b"<Bundle/>", expected_root={"Bundle", "Patient"}) is not None
    with pytest.raises(XmlRejected) as info:
        parse(b'<Patient xmlns="http://hl7.org/fhir"/>', expected_root={"Bundle"})
    assert "{http://hl7.org/fhir}Patient" in info.value.message and "Bundle" in info.value.message


def test_expected_root_by_clark_name_is_namespace_sensitive():
    wanted = {"{http://www.ncpdp.org/schema/SCRIPT}Message"}
    assert parse(b'<Message xmlns="http://www.ncpdp.org/schema/SCRIPT"/>', expected_root=wanted) is not None
    with pytest.raises(XmlRejected):
        parse(b"<Message/>", expected_root=wanted)
    with pytest.raises(XmlRejected):
        parse(b'<Message xmlns="urn:other"/>', expected_root=wanted)


# --- the design rule: no other XML parser in the package --------------------------------------

_PARSING_CALLS = {"fromstring", "fromstringlist", "XML", "XMLID", "parse", "iterparse", "XMLParser", "XMLPullParser"}
_PARSER_MODULES = ("xml.etree", "xml.dom", "xml.sax", "xml.parsers", "defusedxml")


def test_no_module_but_safe_xml_parses_xml():
    package = Path(safe_xml.__file__).resolve().parent.parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "safe_xml.py" and path.parent.name == "formats":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id == "etree" and node.func.attr in _PARSING_CALLS:
                    offenders.append(f"{path.relative_to(package)}:{node.lineno} etree.{node.func.attr}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                offenders += [f"{path.relative_to(package)}:{node.lineno} import {n}" for n in names if n.startswith(_PARSER_MODULES)]
    assert offenders == [], "XML must be parsed through formats/safe_xml.py only"


def test_a_run_of_processing_instructions_cannot_hang_the_prolog_scan():
    # A regular-expression scan backtracked exponentially on this shape (30 PIs took minutes);
    # the linear scan gets through 5,000 at once.
    from iop_fhir.formats.safe_xml import parse

    assert parse(b"<?a ?>" * 5000 + b"<root/>").tag == "root"


def test_doctype_behind_processing_instructions_and_comments_is_refused():
    import pytest

    from iop_fhir.formats.safe_xml import XmlRejected, parse

    with pytest.raises(XmlRejected):
        parse(b"<?xml version='1.0'?><?a b?><!-- c --><!DOCTYPE r [<!ENTITY e 'x'>]><r>&e;</r>")
