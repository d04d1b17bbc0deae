"""FHIR REST: read, vread, create, update, delete and their conditional forms, JSON and XML."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from test_api_fhir_support import BASE, FHIR_JSON, FHIR_XML, JSON_HEADERS, XML_HEADERS, example, issue, load, versions, without_id
from werkzeug.http import http_date

from iop_fhir.formats import fhir_json, fhir_xml

MRN = "https://iop-fhir.org/fhir/sid/riverbend-iop/mrn"


def patient(mrn: str = "RB-1", family: str = "Alvarez") -> dict:
    """The example's patient under another MRN and family name."""
    return {**without_id(example("Patient")), "identifier": [{"system": MRN, "value": mrn}], "name": [{"family": family, "given": ["Maria"]}]}


def created(client, resource: dict, **headers: str):
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers={**JSON_HEADERS, **headers})
    assert response.status_code == 201, response.get_json()
    return response


# --- create --------------------------------------------------------------------------------------


def test_create_assigns_an_id_and_answers_with_location_etag_and_the_resource(client):
    response = created(client, {**patient(), "id": "client-chosen"})
    body = response.get_json()
    assert body["id"] != "client-chosen"  # R4: the server assigns ids on create
    assert body["meta"]["versionId"] == "1"
    assert response.headers["Location"] == f"{BASE}/Patient/{body['id']}/_history/1"
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Last-Modified"].endswith(" GMT")
    assert response.headers["Content-Type"] == f"{FHIR_JSON}; charset=utf-8"
    assert {k: body[k] for k in ("name", "gender", "birthDate")} == {k: patient()[k] for k in ("name", "gender", "birthDate")}


def test_create_in_xml_answers_in_xml(client):
    document = fhir_xml.to_xml(patient())
    response = client.post("/fhir/Patient", data=document, headers=XML_HEADERS)
    assert response.status_code == 201
    assert response.headers["Content-Type"] == f"{FHIR_XML}; charset=utf-8"
    back = fhir_xml.from_xml(response.data)
    assert back["name"] == [{"family": "Alvarez", "given": ["Maria"]}]
    assert client.get(f"/fhir/Patient/{back['id']}").get_json()["gender"] == "female"


def test_create_of_a_realistic_medication_request(client):
    resource = without_id(example("MedicationRequest"))
    body = created(client, resource).get_json()
    assert body["medicationCodeableConcept"] == resource["medicationCodeableConcept"]
    assert body["meta"]["profile"] == ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-medicationrequest"]


def test_decimals_are_kept_exactly_as_sent(client):
    observation = without_id(example("Observation"))
    observation.pop("valueCodeableConcept", None)
    observation.pop("component", None)
    observation["valueQuantity"] = {"value": 1.50, "unit": "mg/L", "system": "http://unitsofmeasure.org", "code": "mg/L"}
    raw = fhir_json.dumps(observation).replace(b'"value":1.5,', b'"value":1.50,')
    assert b'"value":1.50,' in raw
    response = client.post("/fhir/Observation", data=raw, headers=JSON_HEADERS)
    assert response.status_code == 201, response.get_json()
    assert b'"value":1.50,' in response.data
    read = client.get(response.headers["Location"].split("/_history")[0])
    assert b'"valueQuantity":{"value":1.50,' in read.data
    assert b'<value value="1.50"/>' in client.get(read.request.path, headers={"Accept": FHIR_XML}).data


# --- conditional create --------------------------------------------------------------------------


def test_conditional_create_creates_once_then_returns_the_match(client):
    first = client.post("/fhir/Patient", json=patient(), headers={**JSON_HEADERS, "If-None-Exist": f"identifier={MRN}|RB-1"})
    assert first.status_code == 201
    again = client.post("/fhir/Patient", json=patient(family="Other"), headers={**JSON_HEADERS, "If-None-Exist": f"identifier={MRN}|RB-1"})
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["name"][0]["family"] == "Alvarez"  # nothing was written
    assert again.headers["ETag"] == 'W/"1"'


def test_conditional_create_with_several_matches_is_412(client, app):
    created(client, patient("A", family="Same"))
    created(client, patient("B", family="Same"))
    before = versions(app)
    response = client.post("/fhir/Patient", json=patient("C"), headers={**JSON_HEADERS, "If-None-Exist": "family=Same"})
    assert response.status_code == 412
    assert issue(response)["severity"] == "error"
    assert versions(app) == before


def test_conditional_create_with_an_unknown_criterion_is_400(client, app):
    response = client.post("/fhir/Patient", json=patient(), headers={**JSON_HEADERS, "If-None-Exist": "shoe-size=42"})
    assert response.status_code == 400
    assert issue(response)["expression"] == ["shoe-size"]
    assert versions(app) == 0


# --- read, vread, conditional read ---------------------------------------------------------------


def test_read_serves_the_stored_bytes_with_version_headers(client):
    response = created(client, patient())
    location = response.headers["Location"]
    id = response.get_json()["id"]
    read = client.get(f"/fhir/Patient/{id}")
    assert read.status_code == 200
    assert read.data == response.data
    assert read.headers["ETag"] == 'W/"1"'
    assert read.headers["Last-Modified"] == response.headers["Last-Modified"]
    assert location.endswith("/_history/1")


@pytest.mark.parametrize(("query", "accept"), [("", FHIR_XML), ("?_format=xml", None), ("?_format=application/fhir%2Bxml", FHIR_JSON)])
def test_read_in_xml(client, query, accept):
    id = created(client, patient()).get_json()["id"]
    response = client.get(f"/fhir/Patient/{id}{query}", headers={"Accept": accept} if accept else {})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == f"{FHIR_XML}; charset=utf-8"
    assert fhir_xml.from_xml(response.data)["id"] == id


@pytest.mark.parametrize("url", ["/fhir/Patient/nobody", "/fhir/Patient/nobody/_history", "/fhir/Patient/nobody/_history/1"])
def test_unknown_ids_are_404(client, url):
    response = client.get(url)
    assert response.status_code == 404
    assert issue(response)["code"] == "not-found"


def test_read_with_summary_and_elements(client):
    id = created(client, patient()).get_json()["id"]
    body = client.get(f"/fhir/Patient/{id}?_elements=gender").get_json()
    assert set(body) == {"resourceType", "id", "meta", "gender"}
    assert body["meta"]["tag"][-1]["code"] == "SUBSETTED"
    assert set(client.get(f"/fhir/Patient/{id}?_summary=text").get_json()) == {"resourceType", "id", "meta"}
    assert client.get(f"/fhir/Patient/{id}?_summary=maybe").status_code == 400


def test_if_none_match_and_if_modified_since_give_304(client):
    response = created(client, patient())
    url = f"/fhir/Patient/{response.get_json()['id']}"
    assert client.get(url, headers={"If-None-Match": 'W/"1"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": "*"}).status_code == 304
    not_modified = client.get(url, headers={"If-None-Match": 'W/"1"'})
    assert not_modified.data == b""
    assert not_modified.headers["ETag"] == 'W/"1"'
    assert client.get(url, headers={"If-None-Match": 'W/"7"'}).status_code == 200
    later = http_date(datetime.now(UTC) + timedelta(hours=1))
    earlier = http_date(datetime.now(UTC) - timedelta(days=1))
    assert client.get(url, headers={"If-Modified-Since": later}).status_code == 304
    assert client.get(url, headers={"If-Modified-Since": earlier}).status_code == 200


def test_vread_gives_each_version(client):
    id = created(client, patient()).get_json()["id"]
    second = client.put(f"/fhir/Patient/{id}", json={**patient(family="Reyes"), "id": id}, headers=JSON_HEADERS)
    assert second.status_code == 200
    assert second.headers["ETag"] == 'W/"2"'
    v1 = client.get(f"/fhir/Patient/{id}/_history/1")
    assert v1.status_code == 200
    assert v1.get_json()["name"][0]["family"] == "Alvarez"
    assert v1.headers["ETag"] == 'W/"1"'
    assert client.get(f"/fhir/Patient/{id}/_history/2").get_json()["name"][0]["family"] == "Reyes"
    assert client.get(f"/fhir/Patient/{id}/_history/2", headers={"Accept": FHIR_XML}).data.startswith(b"<?xml")
    assert client.get(f"/fhir/Patient/{id}/_history/3").status_code == 404
    assert client.get(f"/fhir/Patient/{id}/_history/latest").status_code == 404


# --- update --------------------------------------------------------------------------------------


def test_update_creates_under_the_clients_id_then_versions(client):
    first = client.put("/fhir/Patient/rb-100042", json={**patient(), "id": "rb-100042"}, headers=JSON_HEADERS)
    assert first.status_code == 201
    assert first.headers["Location"] == f"{BASE}/Patient/rb-100042/_history/1"
    second = client.put("/fhir/Patient/rb-100042", json={**patient(family="Reyes"), "id": "rb-100042"}, headers=JSON_HEADERS)
    assert second.status_code == 200
    assert second.get_json()["meta"]["versionId"] == "2"
    same = client.put("/fhir/Patient/rb-100042", json={**patient(family="Reyes"), "id": "rb-100042"}, headers=JSON_HEADERS)
    assert same.status_code == 200
    assert same.get_json()["meta"]["versionId"] == "2"  # same content: no new version


def test_update_in_xml(client):
    document = fhir_xml.to_xml({**patient(), "id": "x1"})
    response = client.put("/fhir/Patient/x1", data=document, headers=XML_HEADERS)
    assert response.status_code == 201
    assert fhir_xml.from_xml(response.data)["meta"]["versionId"] == "1"


def test_load_the_whole_example_record(client):
    stored = load(client)
    assert len(stored) == 54  # every resource of the record, the review Tasks included
    assert all(s["meta"]["versionId"] == "1" for s in stored)


def test_update_honours_if_match(client, app):
    client.put("/fhir/Patient/p1", json={**patient(), "id": "p1"}, headers=JSON_HEADERS)
    stale = client.put("/fhir/Patient/p1", json={**patient(family="B"), "id": "p1"}, headers={**JSON_HEADERS, "If-Match": 'W/"9"'})
    assert stale.status_code == 412
    assert versions(app) == 1
    fresh = client.put("/fhir/Patient/p1", json={**patient(family="B"), "id": "p1"}, headers={**JSON_HEADERS, "If-Match": 'W/"1"'})
    assert fresh.status_code == 200
    assert fresh.headers["ETag"] == 'W/"2"'
    bad = client.put("/fhir/Patient/p1", json={**patient(), "id": "p1"}, headers={**JSON_HEADERS, "If-Match": "yesterday"})
    assert bad.status_code == 400
    assert issue(bad)["expression"] == ["If-Match"]


@pytest.mark.parametrize(
    ("url", "body", "expression"),
    [
        ("/fhir/Patient/p1", {"id": "p2"}, "Patient.id"),
        ("/fhir/Patient/p1", {}, "Patient.id"),
        ("/fhir/Patient/bad_id", {"id": "bad_id"}, "Patient.id"),
    ],
)
def test_update_id_problems_are_400(client, app, url, body, expression):
    response = client.put(url, json={**patient(), **body}, headers=JSON_HEADERS)
    assert response.status_code == 400
    assert issue(response)["expression"] == [expression]
    assert versions(app) == 0


def test_prefer_return(client):
    minimal = client.post("/fhir/Patient", json=patient(), headers={**JSON_HEADERS, "Prefer": "return=minimal"})
    assert minimal.status_code == 201
    assert minimal.data == b""
    assert minimal.headers["Location"].endswith("/_history/1")
    outcome = client.post("/fhir/Patient", json=patient("RB-2"), headers={**JSON_HEADERS, "Prefer": "return=OperationOutcome"})
    assert outcome.status_code == 201
    assert issue(outcome)["severity"] == "information"
    assert "created" in issue(outcome)["diagnostics"]
    full = client.post("/fhir/Patient", json=patient("RB-3"), headers={**JSON_HEADERS, "Prefer": "return=representation"})
    assert full.get_json()["resourceType"] == "Patient"


# --- conditional update --------------------------------------------------------------------------


def test_conditional_update_creates_then_updates_the_match(client):
    url = f"/fhir/Patient?identifier={MRN}|RB-9"
    first = client.put(url, json=patient("RB-9"), headers=JSON_HEADERS)
    assert first.status_code == 201
    id = first.get_json()["id"]
    second = client.put(url, json=patient("RB-9", family="Reyes"), headers=JSON_HEADERS)
    assert second.status_code == 200
    assert second.get_json()["id"] == id
    assert second.get_json()["meta"]["versionId"] == "2"
    xml = client.put(url + "&_format=xml", data=fhir_xml.to_xml(patient("RB-9", family="Xu")), headers=XML_HEADERS)
    assert xml.status_code == 200
    assert fhir_xml.from_xml(xml.data)["meta"]["versionId"] == "3"


def test_conditional_update_with_several_matches_is_412(client, app):
    created(client, patient("A", family="Twin"))
    created(client, patient("B", family="Twin"))
    response = client.put("/fhir/Patient?family=Twin", json=patient("C"), headers=JSON_HEADERS)
    assert response.status_code == 412
    assert versions(app) == 2


def test_conditional_update_needs_criteria(client):
    response = client.put("/fhir/Patient?_format=json", json=patient(), headers=JSON_HEADERS)
    assert response.status_code == 400
    assert issue(response)["code"] == "required"


# --- delete --------------------------------------------------------------------------------------


def test_delete_then_read_is_410_and_delete_is_idempotent(client):
    id = created(client, patient()).get_json()["id"]
    deleted = client.delete(f"/fhir/Patient/{id}")
    assert deleted.status_code == 204
    assert deleted.data == b""
    assert deleted.headers["ETag"] == 'W/"2"'
    gone = client.get(f"/fhir/Patient/{id}")
    assert gone.status_code == 410
    assert issue(gone)["code"] == "deleted"
    assert client.delete(f"/fhir/Patient/{id}").status_code == 204
    assert client.delete("/fhir/Patient/never-was").status_code == 204
    assert client.get(f"/fhir/Patient/{id}/_history/1").status_code == 200
    assert client.get(f"/fhir/Patient/{id}/_history/2").status_code == 410


def test_delete_with_prefer_operation_outcome_and_if_match(client, app):
    id = created(client, patient()).get_json()["id"]
    stale = client.delete(f"/fhir/Patient/{id}", headers={"If-Match": 'W/"4"'})
    assert stale.status_code == 412
    assert versions(app) == 1
    done = client.delete(f"/fhir/Patient/{id}", headers={"If-Match": 'W/"1"', "Prefer": "return=OperationOutcome"})
    assert done.status_code == 200
    assert issue(done)["diagnostics"] == f"Patient/{id} deleted"


def test_conditional_delete(client, app):
    created(client, patient("A", family="Twin"))
    created(client, patient("B", family="Twin"))
    only = created(client, patient("C", family="Single")).get_json()["id"]
    assert client.delete("/fhir/Patient?family=Twin").status_code == 412
    assert client.delete("/fhir/Patient?family=Nobody").status_code == 204
    assert client.delete("/fhir/Patient?family=Single").status_code == 204
    assert client.get(f"/fhir/Patient/{only}").status_code == 410
    assert client.delete("/fhir/Patient").status_code == 400
    assert client.delete("/fhir/Patient?shoe-size=1").status_code == 400
    assert versions(app) == 4


# --- types and methods ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/fhir/Foo/1", "/fhir/Foo", "/fhir/patient/1", "/fhir/Foo/_history", "/fhir/Foo/1/_history/1"])
def test_unknown_resource_type_is_404_not_supported(client, url):
    response = client.get(url)
    assert response.status_code == 404
    assert issue(response)["code"] == "not-supported"


def test_unknown_type_in_xml(client):
    response = client.get("/fhir/Foo/1", headers={"Accept": FHIR_XML})
    assert response.status_code == 404
    assert b"not-supported" in response.data
    assert response.headers["Content-Type"] == f"{FHIR_XML}; charset=utf-8"


@pytest.mark.parametrize(("method", "url"), [("post", "/fhir/Patient/1"), ("patch", "/fhir/Patient"), ("post", "/fhir/Patient/1/_history")])
def test_unsupported_interaction_is_405(client, method, url):
    response = getattr(client, method)(url, json=patient(), headers=JSON_HEADERS)
    assert response.status_code == 405
    assert "Allow" in response.headers
    assert issue(response)["code"] == "not-supported"
