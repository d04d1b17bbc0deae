"""FHIR XML <-> JSON: round trips keep every value to the character; hostile or non-FHIR XML is refused."""

from __future__ import annotations

import copy
from decimal import Decimal

import pytest
from lxml import etree

from iop_fhir.errors import RecordInvalid
from iop_fhir.formats import fhir_json
from iop_fhir.formats.fhir_validate import model_class, validate_resource
from iop_fhir.formats.fhir_xml import from_xml, to_xml
from iop_fhir.formats.safe_xml import XmlRejected

F = b'xmlns="http://hl7.org/fhir"'
UCUM = "http://unitsofmeasure.org"


def patient(n: int = 1) -> dict:
    return {
        "resourceType": "Patient",
        "id": f"pat-{n}",
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p>Jane &amp; <b>Doe</b></p></div>'},
        "extension": [
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
             "extension": [{"url": "text", "valueString": "Unknown"}]}
        ],
        "identifier": [{"use": "usual", "system": "https://iop-fhir.org/fhir/mrn", "value": f"MRN{n:05d}"}],
        "active": True,
        "name": [
            {"use": "official", "family": "Doe", "given": ["Jane", None, "Q"],
             "_given": [None, {"extension": [{"url": "http://example.org/nick", "valueString": "JJ"}]}, None]}
        ],
        "telecom": [{"system": "phone", "value": "555-0100", "use": "mobile"}],
        "gender": "female",
        "birthDate": "1985-04-12",
        "_birthDate": {"id": "bd", "extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1985-04-12T08:30:00.000-05:00"}
        ]},
        "maritalStatus": {"id": "ms", "text": "single"},
        "multipleBirthInteger": 2,
    }


def observation(n: int = 1) -> dict:
    return {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "subject": {"reference": "Patient/pat-1"},
        "effectiveDateTime": "2024-03-01T09:15:00.000Z",
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
             "valueQuantity": {"value": 120.5, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
             "valueQuantity": {"value": 80, "comparator": "<", "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
        ],
    }


def medication_request(n: int = 1) -> dict:
    return {
        "resourceType": "MedicationRequest",
        "id": f"mr-{n}",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [
            {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "312941", "display": "sertraline 50 MG Oral Tablet"}
        ]},
        "subject": {"reference": "Patient/pat-1"},
        "authoredOn": "2024-03-01",
        "dosageInstruction": [{
            "sequence": 1,
            "text": "1.5 tablets every morning",
            "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d", "when": ["MORN", "WAKE"]}},
            "asNeededBoolean": False,
            "doseAndRate": [{"doseQuantity": {"value": 1.5, "unit": "tablet", "system": UCUM, "code": "{tbl}"}}],
        }],
        "dispenseRequest": {"numberOfRepeatsAllowed": 0, "quantity": {"value": 45, "unit": "tablet", "system": UCUM, "code": "{tbl}"}},
    }


def transaction(count: int) -> dict:
    makers = (patient, observation, medication_request)
    entries = []
    for n in range(count):
        resource = makers[n % 3](n)
        entries.append({
            "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{n:012d}",
            "resource": resource,
            "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
        })
    return {"resourceType": "Bundle", "id": "tx", "type": "transaction", "entry": entries}


SAMPLES = [patient(), observation(), medication_request(), transaction(6)]


@pytest.mark.parametrize("resource", SAMPLES, ids=lambda r: r["resourceType"])
def test_samples_are_valid_r4(resource):
    assert validate_resource(resource) == []


@pytest.mark.parametrize("pretty", [False, True])
@pytest.mark.parametrize("resource", SAMPLES, ids=lambda r: r["resourceType"])
def test_json_xml_json_round_trip(resource, pretty):
    xml = to_xml(resource, pretty=pretty)
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<')
    assert from_xml(xml) == resource


def test_round_trip_keeps_key_order_of_fhir():
    resource = medication_request()
    assert list(from_xml(to_xml(resource))) == list(resource)


def test_exact_decimals_survive_both_ways():
    resource = observation()
    resource["component"][0]["valueQuantity"]["value"] = Decimal("120.50")
    resource["component"][1]["valueQuantity"]["value"] = Decimal("0.1234567890123456789")
    xml = to_xml(resource)
    assert b'<value value="120.50"/>' in xml and b'<value value="0.1234567890123456789"/>' in xml
    back = from_xml(xml, exact_decimals=True)
    values = [str(c["valueQuantity"]["value"]) for c in back["component"]]
    assert values == ["120.50", "0.1234567890123456789"]
    assert fhir_json.dumps(back) == fhir_json.dumps(resource)
    assert isinstance(from_xml(xml)["component"][0]["valueQuantity"]["value"], float)


def test_xml_shape_follows_the_fhir_rules():
    xml = to_xml(patient())
    root = etree.fromstring(xml)
    ns = {"f": "http://hl7.org/fhir", "h": "http://www.w3.org/1999/xhtml"}
    assert root.tag == "{http://hl7.org/fhir}Patient"
    assert root.xpath("f:id/@value", namespaces=ns) == ["pat-1"]  # Resource.id: an element
    assert root.xpath("f:maritalStatus/@id", namespaces=ns) == ["ms"]  # Element.id: an attribute
    assert root.xpath("f:birthDate/@id", namespaces=ns) == ["bd"]
    assert root.xpath("f:extension/@url", namespaces=ns) == [
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
    ]
    assert root.xpath("f:active/@value", namespaces=ns) == ["true"]
    assert root.xpath("f:text/h:div/h:p/h:b/text()", namespaces=ns) == ["Doe"]
    assert root.xpath("count(f:name/f:given)", namespaces=ns) == 3
    # Elements in FHIR order whatever the dict order.
    shuffled = dict(reversed(list(patient().items())))
    assert to_xml(shuffled) == xml


def test_datetimes_and_strings_are_copied_verbatim():
    resource = observation()
    resource["effectiveDateTime"] = "2024-03-01T09:15:00.123456789+05:30"
    assert from_xml(to_xml(resource))["effectiveDateTime"] == "2024-03-01T09:15:00.123456789+05:30"


def test_bundle_entries_wrap_their_resource():
    bundle = transaction(3)
    root = etree.fromstring(to_xml(bundle))
    ns = {"f": "http://hl7.org/fhir"}
    assert [el.tag.split("}")[1] for el in root.xpath("f:entry/f:resource/*", namespaces=ns)] == [
        "Patient", "Observation", "MedicationRequest"
    ]
    assert root.xpath("f:entry/f:request/f:method/@value", namespaces=ns) == ["PUT"] * 3


def test_contained_resources_round_trip():
    resource = medication_request()
    del resource["medicationCodeableConcept"]
    resource["contained"] = [{"resourceType": "Medication", "id": "med", "code": {"text": "sertraline"}}]
    resource["medicationReference"] = {"reference": "#med"}
    assert validate_resource(resource) == []
    assert from_xml(to_xml(resource)) == resource


def test_extension_only_primitive_list():
    resource = {"resourceType": "Patient", "name": [{"_given": [{"extension": [{"url": "u", "valueBoolean": True}]}]}]}
    assert from_xml(to_xml(resource)) == resource


def test_comments_in_xml_are_dropped():
    xml = b'<Patient ' + F + b'><!-- who --><id value="p"/><active value="false"><!-- x --></active></Patient>'
    assert from_xml(xml) == {"resourceType": "Patient", "id": "p", "active": False}


def test_a_200_resource_bundle_round_trips():
    bundle = transaction(200)
    assert from_xml(to_xml(bundle)) == bundle


# --- refused input ---------------------------------------------------------------------------


def test_hostile_xml_never_reaches_the_converter(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET")
    data = f'<!DOCTYPE Patient [<!ENTITY x SYSTEM "file://{secret}">]><Patient xmlns="http://hl7.org/fhir"><id value="&x;"/></Patient>'
    with pytest.raises(XmlRejected):
        from_xml(data.encode())


def test_size_limit_is_passed_on():
    with pytest.raises(XmlRejected):
        from_xml(to_xml(patient()), max_bytes=100)


def xml_error(data: bytes) -> RecordInvalid:
    with pytest.raises(RecordInvalid) as info:
        from_xml(data)
    return info.value


def test_root_outside_the_fhir_namespace():
    error = xml_error(b'<Patient><id value="p"/></Patient>')
    assert "namespace" in error.message


@pytest.mark.parametrize("name", [b"Bogus", b"Citation", b"CodeableConcept"])
def test_unknown_or_non_r4_resource_types(name):
    error = xml_error(b"<" + name + b" " + F + b"/>")
    assert error.issues[0].location == "resourceType" and error.issues[0].code == "not-supported"


def test_structural_errors_are_located():
    data = (
        b"<Patient " + F + b">\n"
        b'  <bogus value="1"/>\n'
        b'  <active value="yes"/>\n'
        b'  <gender value="female"/>\n'
        b'  <gender value="male"/>\n'
        b'  <name><given value="A"/>stray</name>\n'
        b'  <maritalStatus><id value="x"/></maritalStatus>\n'
        b"  <birthDate/>\n"
        b'  <multipleBirthInteger value="1.5"/>\n'
        b"</Patient>"
    )
    error = xml_error(data)
    found = {(issue.location, issue.message.split(" (line")[0]) for issue in error.issues}
    assert ("Patient.bogus", "unknown element 'bogus'") in found
    assert ("Patient.active", "'yes' is not a valid boolean") in found
    assert ("Patient.gender", "gender may occur only once") in found
    assert ("Patient.name[0]", "unexpected text 'stray'") in found
    assert ("Patient.maritalStatus.id", "unknown element 'id'") in found  # Element.id is an attribute
    assert ("Patient.birthDate", "birthDate has neither a value nor extensions") in found
    assert ("Patient.multipleBirthInteger", "'1.5' is not a valid integer") in found
    assert all("(line" in issue.message for issue in error.issues)


def test_wrong_namespace_inside_and_bad_resource_wrapper():
    error = xml_error(b"<Patient " + F + b'><x:active xmlns:x="urn:x" value="true"/></Patient>')
    assert error.issues[0].location == "Patient.active"
    error = xml_error(b"<Bundle " + F + b'><type value="collection"/><entry><resource/></entry></Bundle>')
    assert error.issues[0].location == "Bundle.entry[0].resource"
    error = xml_error(b"<Bundle " + F + b'><type value="collection"/><entry><resource><Citation/></resource></entry></Bundle>')
    assert error.issues[0].location == "Bundle.entry[0].resource.resourceType"


def test_empty_complex_element_is_an_error():
    error = xml_error(b"<Patient " + F + b"><maritalStatus/></Patient>")
    assert error.issues[0].location == "Patient.maritalStatus"


def test_to_xml_refuses_what_it_cannot_write():
    with pytest.raises(RecordInvalid) as info:
        to_xml({"resourceType": "Patient", "bogus": 1, "name": ["x"], "gender": {"a": 1}})
    assert {issue.location for issue in info.value.issues} == {"Patient.bogus", "Patient.name[0]", "Patient.gender"}
    for bad_type in ("Citation", ["Patient"], None):
        with pytest.raises(RecordInvalid):
            to_xml({"resourceType": bad_type})
    with pytest.raises(RecordInvalid) as info:
        to_xml({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"id": "x"}}]})
    assert info.value.issues[0].location == "Bundle.entry[0].resource.resourceType"


@pytest.mark.parametrize(
    "changes, location",
    [
        ({"birthDate": "2000-01-01", "_birthDate": 5}, "Patient._birthDate"),
        ({"_birthDate": {"extension": True}}, "Patient._birthDate"),
        ({"_active": {"extension": [3]}}, "Patient.active.extension[0]"),
        ({"name": [{"given": "Jane"}]}, "Patient.name[0].given"),
        ({"name": [{"given": ["A", "B"], "_given": [None]}]}, "Patient.name[0].given"),
        ({"identifier": [7]}, "Patient.identifier[0]"),
    ],
)
def test_to_xml_refuses_malformed_shapes(changes, location):
    with pytest.raises(RecordInvalid) as info:
        to_xml({"resourceType": "Patient", **changes})
    assert info.value.issues[0].location == location


@pytest.mark.parametrize(
    "div",
    [
        "<div>not xhtml namespace</div>",
        '<div xmlns="http://www.w3.org/1999/xhtml"><p>unclosed</div>',
        '<!DOCTYPE div [<!ENTITY x SYSTEM "file:///etc/passwd">]><div xmlns="http://www.w3.org/1999/xhtml">&x;</div>',
        '<p xmlns="http://www.w3.org/1999/xhtml">not a div</p>',
    ],
)
def test_narrative_must_be_a_safe_xhtml_div(div):
    resource = {"resourceType": "Patient", "text": {"status": "generated", "div": div}}
    with pytest.raises(RecordInvalid) as info:
        to_xml(resource)
    assert info.value.issues[0].location == "Patient.text.div"


def test_pretty_printing_leaves_the_narrative_alone():
    resource = patient()
    xml = to_xml(resource, pretty=True)
    assert b'<div xmlns="http://www.w3.org/1999/xhtml"><p>Jane &amp; <b>Doe</b></p></div>' in xml
    assert b"\n  <id " in xml


# --- why not fhir.resources' own XML (pins the behaviour the module docstring describes) -----


def test_fhir_resources_xml_would_lose_precision_and_shape():
    resource = copy.deepcopy(observation())
    resource["component"][0]["valueQuantity"]["value"] = Decimal("120.50")
    model = model_class("Observation").model_validate(resource)
    theirs = model.model_dump_xml()
    assert b'value="120.5"' in theirs and b'value="120.50"' not in theirs
    assert b"2024-03-01T09:15:00+00:00" in theirs  # ".000Z" re-rendered
    ours = to_xml(resource)
    assert b'value="120.50"' in ours and b"2024-03-01T09:15:00.000Z" in ours
    theirs = model_class("Patient").model_validate(patient()).model_dump_xml()
    assert b'<maritalStatus><id value="ms"/>' in theirs  # Element.id as a child element
    assert b'id="bd"' not in theirs  # _birthDate.id lost
    with pytest.raises(KeyError):  # an unknown element escapes unlocated
        model_class("Patient").model_validate_xml(b"<Patient " + F + b'><bogus value="1"/></Patient>')

