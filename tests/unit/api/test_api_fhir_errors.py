"""FHIR REST: every client mistake is a 4xx OperationOutcome that says where, and stores nothing."""

from __future__ import annotations

import pytest
from test_api_fhir_support import FHIR_JSON, FHIR_XML, JSON_HEADERS, XML_HEADERS, example, issue, versions, without_id

from iop_fhir.formats import fhir_json


def medication_request(**changes: object) -> dict:
    return {**without_id(example("MedicationRequest")), **changes}


def post(client, body: bytes | str, content_type: str = FHIR_JSON, url: str = "/fhir/MedicationRequest", accept: str = FHIR_JSON):
    return client.post(url, data=body, headers={"Content-Type": content_type, "Accept": accept})


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"resourceType": "MedicationRequest", ', FHIR_JSON, 400, "structure"),
        (b"<MedicationRequest xmlns='http://hl7.org/fhir'><status value='active'/>", FHIR_XML, 400, "structure"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><MedicationRequest xmlns="http://hl7.org/fhir"/>', FHIR_XML, 400, None),
        (b"[]", FHIR_JSON, 422, "structure"),
        (b"", FHIR_JSON, 400, "required"),
        (b"status=active", "application/x-www-form-urlencoded", 415, "not-supported"),
    ],
)
def test_unreadable_bodies(client, app, body, content_type, status, code):
    response = post(client, body, content_type)
    assert response.status_code == status
    if code:
        assert issue(response)["code"] == code
    assert versions(app) == 0


def test_wrong_resource_type_for_the_url_is_400(client, app):
    response = client.post("/fhir/Observation", json=medication_request(), headers=JSON_HEADERS)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["resourceType"]
    xml = client.put(
        "/fhir/Patient/p1",
        data=b'<Observation xmlns="http://hl7.org/fhir"><id value="p1"/><status value="final"/></Observation>',
        headers=XML_HEADERS,
    )
    assert xml.status_code == 400
    assert versions(app) == 0


@pytest.mark.parametrize(
    ("changes", "expression"),
    [
        ({"status": "bogus"}, "MedicationRequest.status"),
        ({"intent": "wish"}, "MedicationRequest.intent"),
        ({"dispenseRequest": {"numberOfRepeatsAllowed": "3"}}, "MedicationRequest.dispenseRequest.numberOfRepeatsAllowed"),
        ({"colour": "blue"}, "MedicationRequest.colour"),
    ],
)
def test_invalid_resources_are_422_with_the_element(client, app, changes, expression):
    response = client.post("/fhir/MedicationRequest", json=medication_request(**changes), headers=JSON_HEADERS)
    assert response.status_code == 422
    assert expression in [e for i in response.get_json()["issue"] for e in i.get("expression", ())]
    assert versions(app) == 0


def test_invalid_status_in_xml_is_422(client, app):
    from iop_fhir.formats import fhir_xml

    document = fhir_xml.to_xml(medication_request()).replace(b'<status value="stopped"/>', b'<status value="bogus"/>')
    response = client.post("/fhir/MedicationRequest", data=document, headers=XML_HEADERS)
    assert response.status_code == 422
    assert response.headers["Content-Type"] == f"{FHIR_XML}; charset=utf-8"
    assert b"MedicationRequest.status" in response.data
    assert versions(app) == 0


def test_required_binding_on_update_is_422(client, app):
    response = client.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1", "gender": "bogus"}, headers=JSON_HEADERS)
    assert response.status_code == 422
    assert issue(response)["expression"] == ["Patient.gender"]
    assert versions(app) == 0


@pytest.mark.parametrize(
    ("body", "expression"),
    [
        (b'{"resourceType":"Patient","name":[{"family":"A","given":[]}]}', "Patient.name[0].given"),
        (b'{"resourceType":"Patient","name":[{}]}', "Patient.name[0]"),
        (b'{"resourceType":"Patient","gender":null}', "Patient.gender"),
    ],
)
def test_empty_arrays_objects_and_nulls_are_422(client, app, body, expression):
    response = post(client, body, url="/fhir/Patient")
    assert response.status_code == 422
    assert issue(response)["expression"] == [expression]
    assert versions(app) == 0


def test_body_too_large_is_413(make_app):
    app = make_app(MAX_BODY_BYTES=300)
    client = app.test_client()
    body = fhir_json.dumps(medication_request())
    assert len(body) > 300
    response = post(client, body)
    assert response.status_code == 413
    assert issue(response)["code"] == "too-costly"
    assert versions(app) == 0


def test_unacceptable_accept_is_406(client):
    response = client.get("/fhir/Patient/x", headers={"Accept": "text/csv"})
    assert response.status_code == 406
    assert issue(response)["code"] == "not-supported"


def test_search_errors_name_the_parameter(client):
    for url, location in [
        ("/fhir/MedicationRequest?_count=abc", "_count"),
        ("/fhir/MedicationRequest?_count=-1", "_count"),
        ("/fhir/MedicationRequest?authoredon=yesterday", "authoredon"),
        ("/fhir/MedicationRequest?status:fuzzy=active", "status:fuzzy"),
        ("/fhir/MedicationRequest?_sort=status", "_sort"),
        ("/fhir/MedicationRequest?_summary=some", "_summary"),
        ("/fhir/MedicationRequest?_total=exact", "_total"),
        ("/fhir/MedicationRequest?_elements=colour", "_elements"),
        ("/fhir/MedicationRequest?_include=MedicationRequest:status", "_include"),
        ("/fhir/MedicationRequest?_include=Observation:patient", "_include"),
        ("/fhir/Patient?_revinclude=MedicationRequest:requester:Organization", "_revinclude"),
        ("/fhir/MedicationRequest?_cursor=garbage", "_cursor"),
        ("/fhir/MedicationRequest/_history?_since=last-week", "_since"),
    ]:
        response = client.get(url)
        assert response.status_code == 400, url
        assert issue(response)["expression"] == [location], url


def test_strict_handling_refuses_unknown_parameters(client):
    response = client.get("/fhir/Patient?shoe-size=42&name=x&colour=red", headers={"Prefer": "handling=strict"})
    assert response.status_code == 400
    body = response.get_json()
    assert [i["expression"] for i in body["issue"]] == [["shoe-size"], ["colour"]]
    assert {i["code"] for i in body["issue"]} == {"not-supported"}
    history = client.get("/fhir/Patient/_history?_at=2026", headers={"Prefer": "handling=strict"})
    assert history.status_code == 400
    assert issue(history)["expression"] == ["_at"]


def test_a_failed_write_in_a_series_leaves_the_earlier_ones_alone(client, app):
    assert client.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1"}, headers=JSON_HEADERS).status_code == 201
    assert client.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1", "gender": "x"}, headers=JSON_HEADERS).status_code == 422
    assert client.get("/fhir/Patient/p1").headers["ETag"] == 'W/"1"'
    assert versions(app) == 1
