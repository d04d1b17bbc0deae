"""GET /fhir/metadata: a valid CapabilityStatement that says exactly what the routes and the store do."""

from __future__ import annotations

from flask import Blueprint, Flask
from test_api_fhir_support import BASE, FHIR_XML, JSON_HEADERS, load

from iop_fhir.api import STORE_KEY, fhir
from iop_fhir.api.fhir import INTERACTIONS
from iop_fhir.api.search import include_values, revinclude_values
from iop_fhir.formats import fhir_json, fhir_xml
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.store import Store
from iop_fhir.store.search_index import PARAMETERS, search_parameters

TYPE_CODES = ["read", "vread", "create", "update", "patch", "delete", "history-instance", "history-type", "search-type"]


def statement(client, **headers: str) -> dict:
    response = client.get("/fhir/metadata", headers=headers)
    assert response.status_code == 200
    return response.get_json()


def test_metadata_is_a_valid_capability_statement(client):
    response = client.get("/fhir/metadata")
    document = fhir_json.loads(response.data, exact_decimals=True)
    assert validate_resource(document) == []
    assert document["resourceType"] == "CapabilityStatement"
    assert document["status"] == "active"
    assert document["kind"] == "instance"
    assert document["fhirVersion"] == "4.0.1"
    assert document["format"] == ["json", "xml", "application/fhir+json", "application/fhir+xml"]
    assert document["patchFormat"] == ["application/json-patch+json"]
    assert document["implementation"]["url"] == BASE
    assert document["rest"][0]["mode"] == "server"


def test_metadata_in_xml(client):
    response = client.get("/fhir/metadata", headers={"Accept": FHIR_XML})
    assert response.status_code == 200
    document = fhir_xml.from_xml(response.data)
    assert document["fhirVersion"] == "4.0.1"
    assert validate_resource(document) == []


def test_every_served_type_lists_the_routed_interactions(client):
    rest = statement(client)["rest"][0]
    assert [r["type"] for r in rest["resource"]] == list(PARAMETERS)
    routed = list(dict.fromkeys(i.code for i in INTERACTIONS if i.level != "system"))
    assert routed == TYPE_CODES
    for resource in rest["resource"]:
        if resource["type"] == "AuditEvent":  # the audit trail is read-only (tests/unit/api/test_api_privacy.py)
            continue
        assert [i["code"] for i in resource["interaction"]] == TYPE_CODES
        assert resource["versioning"] == "versioned-update"
        assert resource["readHistory"] is True
        assert resource["updateCreate"] is True
        assert resource["conditionalCreate"] is True
        assert resource["conditionalUpdate"] is True
        assert resource["conditionalDelete"] == "single"
        assert resource["conditionalRead"] == "full-support"


def test_search_parameters_come_from_the_store(client):
    resources = {r["type"]: r for r in statement(client)["rest"][0]["resource"]}
    medication = {p["name"]: p for p in resources["MedicationRequest"]["searchParam"]}
    assert set(medication) == set(search_parameters("MedicationRequest"))
    assert medication["authoredon"] == {"name": "authoredon", "type": "date", "documentation": "MedicationRequest.authoredOn"}
    assert medication["patient"]["documentation"] == "MedicationRequest.subject (references to Patient)"
    assert medication["_lastUpdated"]["type"] == "date"
    # a common parameter only where the type has the element: Provenance has no identifier
    assert "identifier" not in {p["name"] for p in resources["Provenance"]["searchParam"]}
    for resource in resources.values():
        for p in resource["searchParam"]:
            assert p["type"] == search_parameters(resource["type"])[p["name"]].type
            assert p["documentation"]


def test_includes_are_the_ones_search_accepts(client):
    resources = {r["type"]: r for r in statement(client)["rest"][0]["resource"]}
    assert {"MedicationRequest:patient", "MedicationRequest:requester", "MedicationRequest:subject"} <= set(resources["MedicationRequest"]["searchInclude"])
    assert "Observation:patient" in resources["Observation"]["searchInclude"]
    assert "CarePlan:patient" in resources["CarePlan"]["searchInclude"]
    assert "MedicationRequest:patient" in resources["Patient"]["searchRevInclude"]
    for name, resource in resources.items():
        assert resource.get("searchInclude", [])[1:] == include_values(name)
        assert resource.get("searchRevInclude", []) == list(revinclude_values(name))


def test_every_listed_include_works(client):
    load(client)
    for resource in statement(client)["rest"][0]["resource"]:
        for value in resource.get("searchInclude", []):
            assert client.get(f"/fhir/{resource['type']}?_include={value}&_count=1").status_code == 200, value
        for value in resource.get("searchRevInclude", []):
            assert client.get(f"/fhir/{resource['type']}?_revinclude={value}&_count=1").status_code == 200, value


def test_operations_and_security_come_from_the_extensions(make_app):
    app = make_app()
    app.extensions["iop_fhir.operations"] = [
        {"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything", "types": ["Patient"], "level": "instance"},
        {"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate", "types": ["*"], "level": "type"},
        {"name": "ping", "definition": "https://iop-fhir.org/fhir/OperationDefinition/ping", "level": "system"},
    ]
    security = {
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
        "description": "SMART v2 bearer tokens",
    }
    app.extensions["iop_fhir.security"] = security
    document = statement(app.test_client())
    assert validate_resource(document) == []
    rest = document["rest"][0]
    assert rest["security"] == security
    resources = {r["type"]: r for r in rest["resource"]}
    assert [op["name"] for op in resources["Patient"]["operation"]] == ["everything", "validate"]
    assert [op["name"] for op in resources["Observation"]["operation"]] == ["validate"]
    assert rest["operation"] == [{"name": "ping", "definition": "https://iop-fhir.org/fhir/OperationDefinition/ping"}]


def test_transaction_and_batch_only_with_a_bundles_route(make_app):
    app = make_app()
    has_route = any(rule.endpoint.startswith("bundles.") and "POST" in rule.methods for rule in app.url_map.iter_rules())
    codes = [i["code"] for i in statement(app.test_client())["rest"][0]["interaction"]]
    assert codes == (["history-system", "transaction", "batch"] if has_route else ["history-system"])


def test_a_registered_bundles_route_turns_transaction_on(tmp_path):
    app = Flask("t")
    app.config.update(BASE_URL=None, DEFAULT_COUNT=20, MAX_COUNT=500, MAX_BODY_BYTES=1000)
    app.extensions[STORE_KEY] = Store.open(f"sqlite:///{tmp_path / 't.sqlite'}")
    bundles = Blueprint("bundles", __name__, url_prefix="/fhir")
    bundles.add_url_rule("/", "transaction", lambda: "", methods=["POST"])
    app.register_blueprint(fhir.bp)
    app.register_blueprint(bundles)
    codes = [i["code"] for i in statement(app.test_client())["rest"][0]["interaction"]]
    assert codes == ["history-system", "transaction", "batch"]


def test_implementation_url_follows_the_base(make_app):
    app = make_app(BASE_URL="https://gateway.example/fhir")
    assert statement(app.test_client())["implementation"]["url"] == "https://gateway.example/fhir"
    plain = make_app()
    assert statement(plain.test_client(), Host="gw.internal:8080")["implementation"]["url"] == "http://gw.internal:8080/fhir"


def test_unused_headers_do_not_matter(client):
    assert statement(client, **JSON_HEADERS)["fhirVersion"] == "4.0.1"
