"""The main flows against a real ``iop-fhir serve`` process, driven by fhirpy, a FHIR client from the registry.

fhirpy is used unmodified; where it has no call for a FHIR feature (If-None-Exist, XML), the
test says so and uses its ``extra_headers`` or plain requests.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import AuthorizationError, ForbiddenError

from iop_fhir.formats import fhir_xml

if TYPE_CHECKING:
    from servers import Server

pytestmark = pytest.mark.integration

SYSTEM = "https://iop.example.org/test-mrn"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def fhir(server: Server, **headers: str) -> SyncFHIRClient:
    return SyncFHIRClient(server.fhir, extra_headers={"Accept": "application/fhir+json", **headers}, requests_config={"timeout": 30})


def patient(mrn: str, family: str = "Rivera") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": mrn}],
        "name": [{"family": family, "given": ["Ana"]}],
        "gender": "female",
        "birthDate": "1988-04-02",
    }


def prescription(patient_ref: str, n: int) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "identifier": [{"system": "https://iop.example.org/rx", "value": f"{patient_ref}-{n}"}],
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "312938", "display": "sertraline 50 MG Oral Tablet"}]},
        "subject": {"reference": patient_ref},
        "authoredOn": f"2026-01-{n % 28 + 1:02d}",
    }


def count(client: SyncFHIRClient, resource_type: str, **params: str) -> int:
    bundle = client.resources(resource_type).search(**params, _summary="count").fetch_raw()
    return bundle["total"]


def test_create_then_read(gateway: Server) -> None:
    client = fhir(gateway)
    created = client.resource("Patient", **patient(f"create-{uuid.uuid4()}")).save()
    assert created.id
    assert created["meta"]["versionId"] == "1"
    again = client.reference("Patient", created.id).to_resource()
    assert again.serialize() == created.serialize()


def test_conditional_create_twice_makes_one_resource(gateway: Server) -> None:
    mrn = f"cond-{uuid.uuid4()}"
    client = fhir(gateway, **{"If-None-Exist": f"identifier={SYSTEM}|{mrn}"})  # fhirpy has no If-None-Exist call
    first = client.resource("Patient", **patient(mrn)).save()
    second = client.resource("Patient", **patient(mrn)).save()
    assert first.id == second.id
    assert count(fhir(gateway), "Patient", identifier=f"{SYSTEM}|{mrn}") == 1


def test_parallel_conditional_creates_make_one_resource(gateway: Server) -> None:
    mrn = f"race-{uuid.uuid4()}"

    def create(_: int) -> str:
        client = fhir(gateway, **{"If-None-Exist": f"identifier={SYSTEM}|{mrn}"})
        return client.resource("Patient", **patient(mrn)).save().id

    with ThreadPoolExecutor(20) as pool:
        ids = set(pool.map(create, range(20)))
    assert len(ids) == 1
    assert count(fhir(gateway), "Patient", identifier=f"{SYSTEM}|{mrn}") == 1


def test_search_paging_and_include(gateway: Server) -> None:
    client = fhir(gateway)
    owner = client.resource("Patient", **patient(f"paging-{uuid.uuid4()}")).save()
    for n in range(25):
        client.resource("MedicationRequest", **prescription(f"Patient/{owner.id}", n)).save()

    search = client.resources("MedicationRequest").search(patient=owner.id).include("MedicationRequest", "patient").limit(10)
    first = search.fetch_raw()
    matches = [e for e in first["entry"] if e["search"]["mode"] == "match"]
    included = [e for e in first["entry"] if e["search"]["mode"] == "include"]
    assert len(matches) == 10
    assert [e["resource"]["id"] for e in included] == [owner.id]
    assert any(link["relation"] == "next" for link in first["link"])

    everything = search.fetch_all()  # fhirpy follows the next links
    assert len(everything) == 25
    assert len({r.id for r in everything}) == 25


def test_transaction_resolves_urn_uuid_references(gateway: Server) -> None:
    client = fhir(gateway)
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    mrn = f"tx-{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": patient_urn, "resource": patient(mrn), "request": {"method": "POST", "url": "Patient"}},
            {"resource": prescription(patient_urn, 1), "request": {"method": "POST", "url": "MedicationRequest"}},
        ],
    }
    response = client.execute("/", method="post", data=bundle)
    assert response["resourceType"] == "Bundle"
    assert response["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in response["entry"]]
    assert [s.split()[0] for s in statuses] == ["201", "201"]
    patient_id = response["entry"][0]["response"]["location"].split("/")[1]
    rx_id = response["entry"][1]["response"]["location"].split("/")[1]
    stored = client.reference("MedicationRequest", rx_id).to_resource()
    assert stored["subject"]["reference"] == f"Patient/{patient_id}"


def test_xml_round_trip(gateway: Server) -> None:
    """fhirpy speaks only JSON; XML goes over requests with the project's own fhir_xml."""
    sent = patient(f"xml-{uuid.uuid4()}", family="Ñúñez")
    sent["extension"] = [{"url": "https://iop.example.org/weight", "valueDecimal": Decimal("1.50")}]
    headers = {"Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"}
    created = requests.post(f"{gateway.fhir}/Patient", data=fhir_xml.to_xml(sent), headers=headers, timeout=30)
    assert created.status_code == 201, created.text
    assert created.headers["Content-Type"].startswith("application/fhir+xml")
    back = fhir_xml.from_xml(created.content, exact_decimals=True)
    assert {k: v for k, v in back.items() if k not in ("id", "meta")} == sent

    read = requests.get(f"{gateway.fhir}/Patient/{back['id']}", headers={"Accept": "application/fhir+xml"}, timeout=30)
    assert read.status_code == 200
    assert fhir_xml.from_xml(read.content, exact_decimals=True) == back
    as_json = requests.get(f"{gateway.fhir}/Patient/{back['id']}", timeout=30)
    assert b'"valueDecimal":1.50' in as_json.content  # the decimal as sent, in both formats


def test_iop_record_posted_then_read_back_equal(gateway: Server) -> None:
    from iop_fhir.generate import generate_record

    record = generate_record(7, seed=11)
    posted = requests.post(f"{gateway.base}/iop/records", json=record, timeout=60)
    assert posted.status_code in (200, 201), posted.text
    back = requests.get(f"{gateway.base}/iop/records/{record['id']}", timeout=60)
    assert back.status_code == 200, back.text
    assert back.json() == record


def test_auth_on_401_403_and_allowed(secured_gateway: Server, make_token: Callable[[str], str]) -> None:
    with pytest.raises(AuthorizationError):
        fhir(secured_gateway).resources("Patient").fetch()
    reader = SyncFHIRClient(secured_gateway.fhir, authorization=f"Bearer {make_token('system/Patient.rs')}")
    with pytest.raises(ForbiddenError):
        reader.resource("Patient", **patient("denied")).save()
    writer = SyncFHIRClient(secured_gateway.fhir, authorization=f"Bearer {make_token('system/Patient.cruds')}")
    created = writer.resource("Patient", **patient(f"auth-{uuid.uuid4()}")).save()
    assert reader.reference("Patient", created.id).to_resource().id == created.id
    assert requests.get(f"{secured_gateway.base}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{secured_gateway.fhir}/metadata", timeout=10).status_code == 200
