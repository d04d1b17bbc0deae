"""FHIR REST history: instance, type and system, as history Bundles with request and response per entry."""

from __future__ import annotations


from test_api_fhir_support import BASE, FHIR_XML, JSON_HEADERS, issue

from iop_fhir.formats import fhir_json, fhir_xml
from iop_fhir.formats.fhir_validate import validate_resource


def write_three_versions(client) -> str:
    """Patient/p1: created, updated, deleted."""
    client.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1", "gender": "female"}, headers=JSON_HEADERS)
    client.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1", "gender": "male"}, headers=JSON_HEADERS)
    client.delete("/fhir/Patient/p1")
    return "/fhir/Patient/p1/_history"


def test_instance_history_newest_first_with_request_and_response(client):
    response = client.get(write_three_versions(client))
    assert response.status_code == 200
    bundle = response.get_json()
    assert bundle["type"] == "history"
    assert bundle["total"] == 3
    assert bundle["link"] == [{"relation": "self", "url": f"{BASE}/Patient/p1/_history"}]
    deleted, updated, created = bundle["entry"]
    assert deleted == {
        "fullUrl": f"{BASE}/Patient/p1",
        "request": {"method": "DELETE", "url": "Patient/p1"},
        "response": {"status": "204 No Content", "etag": 'W/"3"', "lastModified": deleted["response"]["lastModified"]},
    }
    assert updated["request"] == {"method": "PUT", "url": "Patient/p1"}
    assert updated["response"]["status"] == "200 OK"
    assert updated["resource"]["gender"] == "male"
    assert updated["resource"]["meta"]["versionId"] == "2"
    assert created["request"] == {"method": "POST", "url": "Patient"}
    assert created["response"]["etag"] == 'W/"1"'
    assert created["resource"]["gender"] == "female"


def test_history_in_xml(client):
    response = client.get(write_three_versions(client), headers={"Accept": FHIR_XML})
    assert response.status_code == 200
    bundle = fhir_xml.from_xml(response.data)
    assert [e["request"]["method"] for e in bundle["entry"]] == ["DELETE", "PUT", "POST"]


def test_type_and_system_history(client):
    write_three_versions(client)
    client.post("/fhir/Observation", json={"resourceType": "Observation", "status": "final", "code": {"text": "mood"}}, headers=JSON_HEADERS)
    patients = client.get("/fhir/Patient/_history").get_json()
    assert [e["response"]["etag"] for e in patients["entry"]] == ['W/"3"', 'W/"2"', 'W/"1"']
    everything = client.get("/fhir/_history").get_json()
    assert everything["total"] == 4
    assert everything["entry"][0]["resource"]["resourceType"] == "Observation"
    assert everything["link"][0]["url"] == f"{BASE}/_history"


def test_history_pages_and_since(client):
    for i in range(5):
        client.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1", "birthDate": f"198{i}"}, headers=JSON_HEADERS)
    first = client.get("/fhir/Patient/p1/_history?_count=2").get_json()
    assert [e["response"]["etag"] for e in first["entry"]] == ['W/"5"', 'W/"4"']
    assert "total" not in first
    next_url = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = client.get(next_url.removeprefix("http://localhost")).get_json()
    assert [e["response"]["etag"] for e in second["entry"]] == ['W/"3"', 'W/"2"']
    since = client.get("/fhir/Patient/p1/_history/5").get_json()["meta"]["lastUpdated"]
    recent = client.get(f"/fhir/Patient/p1/_history?_since={since}").get_json()
    assert [e["response"]["etag"] for e in recent["entry"]] == ['W/"5"']
    counted = client.get("/fhir/Patient/p1/_history?_count=0").get_json()
    assert counted["total"] == 5
    assert "entry" not in counted


def test_history_bad_count_is_400_and_unknown_parameters_are_left_out(client):
    write_three_versions(client)
    bad = client.get("/fhir/Patient/_history?_count=abc")
    assert bad.status_code == 400
    assert issue(bad)["expression"] == ["_count"]
    lenient = client.get("/fhir/Patient/_history?_at=2026").get_json()
    assert [e["request"]["method"] for e in lenient["entry"]] == ["DELETE", "PUT", "POST"]
    assert lenient["link"][0]["url"] == f"{BASE}/Patient/_history"


def test_history_bundles_are_valid_r4(client):
    url = write_three_versions(client)
    for path in (url, "/fhir/Patient/_history?_count=2", "/fhir/_history"):
        assert validate_resource(fhir_json.loads(client.get(path).data, exact_decimals=True)) == [], path
