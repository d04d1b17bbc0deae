"""FHIR JSON on the wire: deterministic output, exact decimals, located errors, FHIR's JSON rules."""

from __future__ import annotations

import io
from decimal import Decimal

import pytest

from iop_fhir.errors import RecordInvalid, UnsupportedFormat
from iop_fhir.formats import fhir_json
from iop_fhir.formats.fhir_json import JsonRejected, dumps, empty_and_null_issues, loads


def locations(error: RecordInvalid) -> list[str]:
    return [issue.location for issue in error.issues]


# --- writing ---------------------------------------------------------------------------------


def test_dumps_keeps_insertion_order_and_is_compact():
    resource = {"resourceType": "Patient", "id": "p1", "active": True, "birthDate": "1980-01-01"}
    assert dumps(resource) == b'{"resourceType":"Patient","id":"p1","active":true,"birthDate":"1980-01-01"}'
    assert dumps(dict(reversed(list(resource.items())))).startswith(b'{"birthDate"')  # never sorted


def test_dumps_pretty():
    assert dumps({"resourceType": "Basic", "id": "b"}, pretty=True) == b'{\n  "resourceType": "Basic",\n  "id": "b"\n}'


def test_dumps_writes_decimals_verbatim():
    data = {"a": Decimal("1.50"), "b": [Decimal("-0.000"), Decimal("1E+2"), Decimal("0.1234567890123456789")]}
    assert dumps(data) == b'{"a":1.50,"b":[-0.000,1E+2,0.1234567890123456789]}'


@pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("Infinity"), object()])
def test_dumps_refuses_what_json_cannot_say(bad):
    with pytest.raises(TypeError):
        dumps({"a": bad})


# --- reading ---------------------------------------------------------------------------------


def test_loads_bytes_and_str():
    assert loads(b'{"resourceType":"Patient","id":"p"}') == {"resourceType": "Patient", "id": "p"}
    assert loads('{"resourceType":"Patient","id":"p"}')["id"] == "p"
    assert loads(bytearray(b'{"resourceType":"Patient"}')) == {"resourceType": "Patient"}


def test_loads_floats_by_default_and_exact_decimals_on_request():
    data = b'{"resourceType":"Observation","valueQuantity":{"value":1.50},"n":3,"e":1e2}'
    fast = loads(data)
    assert fast["valueQuantity"]["value"] == 1.5 and type(fast["valueQuantity"]["value"]) is float
    exact = loads(data, exact_decimals=True)
    value = exact["valueQuantity"]["value"]
    assert isinstance(value, Decimal) and str(value) == "1.50"
    assert type(exact["n"]) is int
    assert dumps(exact) == b'{"resourceType":"Observation","valueQuantity":{"value":1.50},"n":3,"e":1E+2}'


def test_exact_round_trip_is_byte_identical():
    data = b'{"resourceType":"Observation","valueQuantity":{"value":0.1234567890123456789,"unit":"mg"}}'
    assert dumps(loads(data, exact_decimals=True)) == data


def test_utf8_bom_is_ignored():
    assert loads(b'\xef\xbb\xbf{"resourceType":"Patient"}') == {"resourceType": "Patient"}
    assert loads('\ufeff{"resourceType":"Patient"}', exact_decimals=True) == {"resourceType": "Patient"}


@pytest.mark.parametrize("exact", [False, True])
def test_malformed_json_is_located(exact):
    with pytest.raises(JsonRejected) as info:
        loads(b'{"resourceType": "Patient",\n  "active": tru}', exact_decimals=exact)
    error = info.value
    assert error.status == 400 and isinstance(error, UnsupportedFormat)
    assert error.issues[0].location.startswith("line 2, column")
    assert "line 2" in error.message


@pytest.mark.parametrize(
    "data", [b"", b"{", b'{"a":1,}', b'{"a":1} {"b":2}', b"\xff\xfe", b'{"a":"\\ud800"}']
)
def test_not_json(data):
    with pytest.raises(JsonRejected):
        loads(data)


def test_invalid_utf8_is_rejected_in_exact_mode():
    with pytest.raises(JsonRejected, match="UTF-8"):
        loads(b'{"resourceType":"Patient","name":"\xff"}', exact_decimals=True)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_rejected(constant):
    for exact in (False, True):
        with pytest.raises(JsonRejected):
            loads(b'{"resourceType":"Observation","v":' + constant + b"}", exact_decimals=exact)


@pytest.mark.parametrize("data, kind", [(b"[]", "array"), (b'"x"', "str"), (b"3", "int"), (b"null", "NoneType")])
def test_top_level_must_be_an_object(data, kind):
    with pytest.raises(RecordInvalid, match=kind):
        loads(data)


def test_resource_type_required_and_well_formed():
    with pytest.raises(RecordInvalid) as info:
        loads(b'{"id":"x"}')
    assert locations(info.value) == ["resourceType"] and info.value.issues[0].code == "required"
    for bad in (b"3", b'"patient"', b'""', b'"Pa tient"', b"null"):
        with pytest.raises(RecordInvalid) as info:
            loads(b'{"resourceType":' + bad + b"}")
        assert locations(info.value) == ["resourceType"]


# --- empties and nulls -----------------------------------------------------------------------


def test_empty_values_and_nulls_are_located():
    data = (
        b'{"resourceType":"Patient","id":"","active":null,"name":[{"given":[]},{}],'
        b'"maritalStatus":{},"contained":[{"resourceType":"Basic","code":{"text":""}}]}'
    )
    with pytest.raises(RecordInvalid) as info:
        loads(data)
    assert info.value.status == 422
    assert locations(info.value) == [
        "Patient.id",
        "Patient.active",
        "Patient.name[0].given",
        "Patient.name[1]",
        "Patient.maritalStatus",
        "Patient.contained[0].code.text",
    ]
    assert [issue.message for issue in info.value.issues[:4]] == ["empty string", "null value", "empty array", "empty object"]


def test_nulls_aligned_with_primitive_extensions_are_allowed():
    resource = {
        "resourceType": "Patient",
        "name": [{"given": ["A", None, "C"], "_given": [None, {"extension": [{"url": "u", "valueString": "B"}]}, None]}],
    }
    assert empty_and_null_issues(resource) == []
    assert loads(dumps(resource)) == resource


def test_nulls_on_both_sides_or_without_a_twin_are_not():
    resource = {"resourceType": "Patient", "name": [{"given": ["A", None], "_given": [None, None]}]}
    assert [i.location for i in empty_and_null_issues(resource)] == [
        "Patient.name[0].given[1]",
        "Patient.name[0]._given[1]",
    ]
    lone = {"resourceType": "Patient", "name": [{"given": ["A", None]}]}
    assert [i.location for i in empty_and_null_issues(lone)] == ["Patient.name[0].given[1]"]
    assert [i.location for i in empty_and_null_issues({"resourceType": "Patient", "identifier": [None]})] == [
        "Patient.identifier[0]"
    ]


def test_twin_arrays_must_have_the_same_length():
    resource = {"resourceType": "Patient", "name": [{"given": ["A", "B"], "_given": [{"id": "x"}]}]}
    issues = empty_and_null_issues(resource)
    assert [i.location for i in issues] == ["Patient.name[0].given"]
    assert "twin" in issues[0].message


def test_many_offenders_are_capped():
    resource = {"resourceType": "Patient", "identifier": [{"value": ""} for _ in range(25)]}
    issues = empty_and_null_issues(resource)
    assert len(issues) == fhir_json.MAX_REPORTED + 1
    assert issues[-1].severity == "information" and "15 more" in issues[-1].message


def test_root_of_locations_can_be_given():
    assert [i.location for i in empty_and_null_issues({"a": {}}, "Bundle.entry[0].resource")] == [
        "Bundle.entry[0].resource.a"
    ]


def test_clean_resource_has_no_issues():
    assert empty_and_null_issues({"resourceType": "Patient", "name": [{"given": ["A"]}], "active": False}) == []
    assert empty_and_null_issues({"resourceType": "Basic", "": [1]}) == []  # odd keys are the model's business


# --- many resources --------------------------------------------------------------------------


def test_iter_resources_single_array_and_ndjson():
    one = b'{"resourceType":"Patient","id":"a"}'
    assert [r["id"] for r in fhir_json.iter_resources(one)] == ["a"]
    array = b' [{"resourceType":"Patient","id":"a"},{"resourceType":"Patient","id":"b"}]'
    assert [r["id"] for r in fhir_json.iter_resources(array)] == ["a", "b"]
    lines = b'{"resourceType":"Patient","id":"a"}\n\n{"resourceType":"Patient","id":"b"}\n'
    assert [r["id"] for r in fhir_json.iter_resources(lines)] == ["a", "b"]
    assert [r["id"] for r in fhir_json.iter_resources(lines.decode())] == ["a", "b"]


def test_iter_resources_names_the_bad_item():
    with pytest.raises(RecordInvalid, match="item 1"):
        list(fhir_json.iter_resources(b'[{"resourceType":"Patient"},{"id":"x"}]'))
    with pytest.raises(JsonRejected, match="line 2"):
        list(fhir_json.iter_resources(b'{"resourceType":"Patient"}\n{"resourceType":\n'))
    with pytest.raises(RecordInvalid, match="line 3"):
        list(fhir_json.iter_resources(b'{"resourceType":"Patient"}\n\n{"resourceType":"Patient","id":""}\n'))
    with pytest.raises(JsonRejected):
        list(fhir_json.iter_resources(b'{"resourceType":'))


def test_ndjson_round_trip():
    resources = [{"resourceType": "Patient", "id": str(i), "v": Decimal("1.10")} for i in range(3)]
    stream = io.BytesIO()
    assert fhir_json.write_ndjson(resources, stream) == 3
    assert stream.getvalue().count(b"\n") == 3 and b"1.10" in stream.getvalue()
    stream.seek(0)
    assert list(fhir_json.iter_ndjson(stream, exact_decimals=True)) == resources
