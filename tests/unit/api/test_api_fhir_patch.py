"""FHIR REST: PATCH with JSON Patch (RFC 6902), validated like any update."""

from __future__ import annotations

import json

import pytest
from test_api_fhir_support import FHIR_JSON, FHIR_XML, example, issue, load, versions

from iop_fhir.formats import fhir_xml

JSON_PATCH = "application/json-patch+json"


@pytest.fixture
def prescription(client) -> str:
    """The URL of a stored MedicationRequest (version 1)."""
    resource = example("MedicationRequest")
    load(client, [resource])
    return f"/fhir/MedicationRequest/{resource['id']}"


def patch(client, url: str, operations: object, **headers: str):
    body = operations if isinstance(operations, (bytes, str)) else json.dumps(operations)
    return client.patch(url, data=body, headers={"Content-Type": JSON_PATCH, "Accept": FHIR_JSON, **headers})


def test_patch_writes_a_new_version(client, prescription):
    response = patch(client, prescription, [{"op": "replace", "path": "/status", "value": "active"}, {"op": "remove", "path": "/statusReason"}])
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "active"
    assert "statusReason" not in body
    assert body["meta"]["versionId"] == "2"
    assert response.headers["ETag"] == 'W/"2"'
    assert response.headers["Location"].endswith("/_history/2")
    assert client.get(prescription).get_json()["status"] == "active"


def test_patch_answers_in_xml_and_keeps_decimals(client, prescription):
    response = client.patch(
        prescription,
        data=b'[{"op": "add", "path": "/dispenseRequest/quantity/value", "value": 30.50}]',
        headers={"Content-Type": JSON_PATCH, "Accept": FHIR_XML},
    )
    assert response.status_code == 200
    assert b'<value value="30.50"/>' in response.data
    assert fhir_xml.from_xml(response.data)["meta"]["versionId"] == "2"
    assert b'"value":30.50' in client.get(prescription).data


def test_patch_with_a_passing_test_applies(client, prescription):
    response = patch(client, prescription, [{"op": "test", "path": "/status", "value": "stopped"}, {"op": "replace", "path": "/status", "value": "completed"}])
    assert response.status_code == 200
    assert response.get_json()["status"] == "completed"


def test_a_failing_test_operation_is_422_and_writes_nothing(client, app, prescription):
    response = patch(client, prescription, [{"op": "test", "path": "/status", "value": "active"}, {"op": "replace", "path": "/status", "value": "completed"}])
    assert response.status_code == 422
    assert issue(response)["expression"] == ["/0"]
    assert versions(app) == 1


def test_a_patch_that_makes_the_resource_invalid_is_422(client, app, prescription):
    response = patch(client, prescription, [{"op": "replace", "path": "/status", "value": "bogus"}])
    assert response.status_code == 422
    assert issue(response)["expression"] == ["MedicationRequest.status"]
    empty = patch(client, prescription, [{"op": "replace", "path": "/category", "value": []}])
    assert empty.status_code == 422
    assert versions(app) == 1


@pytest.mark.parametrize(
    ("operation", "location"),
    [
        ({"op": "replace", "path": "/id", "value": "other"}, "/0/path"),
        ({"op": "replace", "path": "/resourceType", "value": "Observation"}, "/0/path"),
        ({"op": "remove", "path": "/id"}, "/0/path"),
        ({"op": "replace", "path": "", "value": {"resourceType": "MedicationRequest"}}, "/0/path"),
        ({"op": "move", "from": "/id", "path": "/note"}, "/0/from"),
    ],
)
def test_patching_id_or_type_is_forbidden(client, app, prescription, operation, location):
    response = patch(client, prescription, [operation])
    assert response.status_code == 422
    assert issue(response)["expression"] == [location]
    assert versions(app) == 1


def test_a_path_the_resource_lacks_is_422(client, prescription):
    response = patch(client, prescription, [{"op": "replace", "path": "/priority/deep", "value": "x"}])
    assert response.status_code == 422
    assert issue(response)["expression"] == ["/0"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[{", 400),
        (b'{"op": "replace"}', 400),
        (b'[{"op": "frobnicate", "path": "/status"}]', 400),
        (b'[{"op": "replace", "value": "x"}]', 400),
    ],
)
def test_malformed_patch_documents_are_400(client, app, prescription, body, status):
    response = patch(client, prescription, body)
    assert response.status_code == status
    assert versions(app) == 1


def test_patch_needs_the_json_patch_media_type(client, prescription):
    response = client.patch(prescription, data=b"[]", headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 415


def test_patch_honours_if_match(client, app, prescription):
    stale = patch(client, prescription, [{"op": "replace", "path": "/status", "value": "active"}], **{"If-Match": 'W/"3"'})
    assert stale.status_code == 412
    assert issue(stale)["expression"] == ["If-Match"]
    assert versions(app) == 1
    fresh = patch(client, prescription, [{"op": "replace", "path": "/status", "value": "active"}], **{"If-Match": 'W/"1"'})
    assert fresh.status_code == 200


def test_patch_of_missing_or_deleted_resources(client, prescription):
    assert patch(client, "/fhir/MedicationRequest/nothing", []).status_code == 404
    client.delete(prescription)
    assert patch(client, prescription, []).status_code == 410


def test_prefer_minimal_on_patch(client, prescription):
    response = patch(client, prescription, [{"op": "replace", "path": "/status", "value": "active"}], Prefer="return=minimal")
    assert response.status_code == 200
    assert response.data == b""
    assert response.headers["ETag"] == 'W/"2"'
