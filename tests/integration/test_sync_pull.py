"""Pull from a real FHIR server on loopback: a second ``iop-fhir serve`` acts as the EHR.

The EHR holds a Patient with the same MRN as a record posted to our (in-process) store, and
outside MedicationStatement, MedicationDispense, Observation, Condition and AllergyIntolerance
resources for it. :func:`pull` runs in-process against it with the real FhirClient: the first
pull stores them, a second stores nothing new, and a change at the EHR is pulled again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from iop_fhir.api.iop import save_records
from iop_fhir.mappers.ids import resource_id
from iop_fhir.record import IopRecord
from iop_fhir.store import Store
from iop_fhir.sync.destinations import Destination
from iop_fhir.sync.pull import pull
from iop_fhir.terminology import SYNC_SOURCE

if TYPE_CHECKING:
    from servers import Server

pytestmark = pytest.mark.integration

fhir_client = pytest.importorskip(
    "iop_fhir.sync.fhir_client", reason="the FHIR REST client (iop_fhir.sync.fhir_client) is not importable yet"
)

JSON = dict[str, Any]
MRN = {"system": "https://iop-fhir.org/fhir/sid/riverbend-iop/mrn", "value": "RB-100042"}
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
TIMEOUT = 30
PULLED = ("MedicationStatement", "MedicationDispense", "Observation", "Condition", "AllergyIntolerance")


def post(server: Server, resource: JSON) -> JSON:
    r = requests.post(f"{server.fhir}/{resource['resourceType']}", json=resource, headers={"Prefer": "return=representation"}, timeout=TIMEOUT)
    assert r.status_code == 201, r.text
    return r.json()


def seed(server: Server) -> dict[str, JSON]:
    """The EHR's patient (our MRN) and what it recorded for them."""
    patient = post(server, {"resourceType": "Patient", "identifier": [MRN], "name": [{"family": "Alvarez", "given": ["Maria"]}]})
    subject = {"reference": f"Patient/{patient['id']}"}
    lisinopril = {"coding": [{"system": RXNORM, "code": "314076", "display": "lisinopril 10 MG Oral Tablet"}]}
    made = {"Patient": patient}
    for resource in (
        {"resourceType": "MedicationStatement", "status": "active", "medicationCodeableConcept": lisinopril, "subject": subject,
         "effectiveDateTime": "2025-11-01", "dosage": [{"text": "1 tablet by mouth daily"}]},
        {"resourceType": "MedicationDispense", "status": "completed", "medicationCodeableConcept": lisinopril, "subject": subject,
         "quantity": {"value": 30, "unit": "tablet"}, "whenHandedOver": "2026-02-02T09:30:00Z"},
        {"resourceType": "Observation", "status": "final", "subject": subject, "effectiveDateTime": "2026-01-20T08:00:00Z",
         "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
         "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}},
        {"resourceType": "Condition", "subject": subject,
         "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10", "display": "Essential (primary) hypertension"}]}},
        {"resourceType": "AllergyIntolerance", "patient": subject, "code": {"text": "penicillin"}},
    ):  # fmt: skip
        made[resource["resourceType"]] = post(server, resource)
    return made


@pytest.fixture
def ours(tmp_path: Path, example_record: IopRecord) -> Iterator[Store]:
    store = Store.open(f"sqlite:///{tmp_path / 'ours.sqlite'}")
    save_records(store, [example_record])
    yield store
    store.close()


def test_pull_from_a_second_gateway(gateway: Server, ours: Store) -> None:
    made = seed(gateway)
    ehr = Destination(name="ehr", kind="fhir", base_url=gateway.fhir, read_timeout=TIMEOUT)
    with fhir_client.FhirClient(ehr) as client:
        first = pull(ours, ehr, client)
        assert first.patients == 1 and not first.errors, first.reported
        assert {t: first.by_type[t].stored for t in PULLED} == dict.fromkeys(PULLED, 1)
        statement_id = resource_id("MedicationStatement", gateway.fhir, made["MedicationStatement"]["id"])
        stored = ours.read("MedicationStatement", statement_id).resource
        assert stored["meta"]["source"] == f"{gateway.fhir}/MedicationStatement/{made['MedicationStatement']['id']}"
        assert {"system": SYNC_SOURCE, "code": "ehr"} in stored["meta"]["tag"]
        patient = ours.search("Patient", [("identifier", f"{MRN['system']}|{MRN['value']}")]).entries[0]
        assert stored["subject"] == {"reference": patient.reference}
        assert ours.count("Provenance", [("target", f"MedicationStatement/{statement_id}")]) == 1

        versions = ours.history(count=1, total=True).total
        second = pull(ours, ehr, client)
        assert second.stored == 0 and second.unchanged == second.fetched == 5
        assert ours.history(count=1, total=True).total == versions

        changed = {**made["MedicationStatement"], "status": "stopped"}
        changed.pop("meta")
        r = requests.put(f"{gateway.fhir}/MedicationStatement/{changed['id']}", json=changed, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        third = pull(ours, ehr, client)
    assert third.stored == 1 and third.by_type["MedicationStatement"].stored == 1
    again = ours.read("MedicationStatement", statement_id)
    assert (again.version, again.resource["status"]) == (2, "stopped")
