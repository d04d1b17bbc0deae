"""The [[destination]] settings and the router that decides which changes go where."""

from __future__ import annotations

from pathlib import Path

import pytest

from iop_fhir.config import ConfigError, load_settings
from iop_fhir.mappers.ids import resource_id
from iop_fhir.sync.destinations import DEFAULT_PULL_RESOURCES, Router, load_destinations

EHR = {"name": "ehr", "kind": "fhir", "base_url": "http://127.0.0.1:8090/fhir/"}
MRN = "https://iop-fhir.org/fhir/sid/riverbend-iop/mrn"


def patient(program: str = "riverbend-iop") -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": f"https://iop-fhir.org/fhir/sid/{program}/mrn", "value": "1"}]}


def test_the_issue_example_loads_from_a_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "iop.toml"
    config.write_text(
        """
[[destination]]
name = "ehr"
kind = "fhir"                       # "ncpdp" arrives with the pharmacy issue
base_url = "http://127.0.0.1:8090/fhir"
auth = "none"                       # none | bearer | smart-backend
resources = ["Patient", "MedicationRequest", "Observation", "CarePlan", "Condition"]
""",
        encoding="utf-8",
    )
    settings = load_settings({"CONFIG_FILE": str(config)}, environ={})
    (ehr,) = load_destinations(settings).values()
    assert (ehr.name, ehr.kind, ehr.base_url, ehr.auth) == ("ehr", "fhir", "http://127.0.0.1:8090/fhir", "none")
    assert ehr.resources == {"Patient", "MedicationRequest", "Observation", "CarePlan", "Condition"}
    assert ehr.pull_resources == DEFAULT_PULL_RESOURCES and ehr.batch_size == 50 and ehr.format == "json"


def test_no_destinations_is_an_empty_map() -> None:
    assert load_destinations({}) == {}


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"kind": "fhir", "base_url": "http://x"}, "destination[0].name"),
        ({**EHR, "kind": "hl7v2"}, "destination[0] ('ehr').kind"),
        ({**EHR, "base_url": "ftp://x"}, "destination[0] ('ehr').base_url"),
        ({**EHR, "batch_size": 0}, "destination[0] ('ehr').batch_size"),
        ({**EHR, "batch_size": True}, "destination[0] ('ehr').batch_size"),
        ({**EHR, "resources": "Patient"}, "destination[0] ('ehr').resources"),
        ({**EHR, "auth": "bearer"}, "destination[0] ('ehr').token"),
        ({**EHR, "auth": "smart-backend"}, "destination[0] ('ehr').token_url"),
        ({**EHR, "base_ur": "http://x"}, "destination[0] ('ehr').base_ur"),  # a typo is not ignored
        ({**EHR, "kind": "ncpdp"}, "destination[0] ('ehr').ncpdp_id"),
        ({**EHR, "aftercare_providers": ["1234567893"]}, "destination[0] ('ehr').aftercare_providers"),
        ({**EHR, "pull": "yes"}, "destination[0] ('ehr').pull"),
        ({**EHR, "name": "no spaces"}, "destination[0] ('no spaces').name"),
    ],
)
def test_each_mistake_names_the_destination_and_key(table: dict, where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_destinations({"destination": [table]})
    assert where in [issue.location for issue in caught.value.issues]


def test_every_problem_is_reported_at_once_and_names_are_unique() -> None:
    with pytest.raises(ConfigError) as caught:
        load_destinations({"destination": [EHR, {**EHR}, {"name": "x", "kind": "fhir"}]})
    locations = [issue.location for issue in caught.value.issues]
    assert "destination[1] ('ehr').name" in locations and "destination[2] ('x').base_url" in locations


def test_bearer_token_from_the_environment() -> None:
    table = {**EHR, "auth": "bearer", "token_env": "EHR_TOKEN"}
    assert load_destinations({"destination": [table]}, environ={"EHR_TOKEN": "s3cret"})["ehr"].token == "s3cret"
    with pytest.raises(ConfigError, match="EHR_TOKEN"):
        load_destinations({"destination": [table]}, environ={})


def test_smart_backend_needs_a_readable_key(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n", encoding="utf-8")
    table = {**EHR, "auth": "smart-backend", "token_url": "http://t/token", "client_id": "iop", "private_key": str(key), "algorithm": "ES384"}
    smart = load_destinations({"destination": [table]})["ehr"].smart
    assert smart is not None and (smart.algorithm, smart.client_id, smart.scope) == ("ES384", "iop", "system/*.cruds")
    with pytest.raises(ConfigError, match="private_key"):
        load_destinations({"destination": [{**table, "private_key": str(tmp_path / "missing.pem")}]})
    with pytest.raises(ConfigError, match="algorithm"):
        load_destinations({"destination": [{**table, "algorithm": "HS256"}]})


def test_the_router_applies_type_program_and_patient_scopes() -> None:
    ours = resource_id("Patient", MRN, "RB-1")
    destinations = load_destinations(
        {
            "destination": [
                {**EHR, "resources": ["Patient", "MedicationRequest"]},
                {"name": "riverbend-only", "kind": "fhir", "base_url": "http://b", "programs": ["riverbend-iop"]},
                {"name": "one-client", "kind": "fhir", "base_url": "http://c", "patients": [f"{MRN}|RB-1"]},
                {"name": "off", "kind": "fhir", "base_url": "http://d", "enabled": False},
                {"name": "pharmacy", "kind": "ncpdp", "base_url": "http://e", "ncpdp_id": "1234567"},
            ]
        }
    )
    route = Router(destinations.values())
    assert route("Patient", patient(), f"Patient/{ours}") == ["ehr", "riverbend-only", "one-client"]
    assert route("Patient", patient("other-iop"), "Patient/someone-else") == ["ehr"]
    observation = {"resourceType": "Observation", "identifier": [{"system": "https://iop-fhir.org/fhir/sid/riverbend-iop/assessment", "value": "x"}]}
    assert route("Observation", observation, f"Patient/{ours}") == ["riverbend-only", "one-client"]
    # shared parties have no patient: the patient filter lets them through so references resolve at the target
    practitioner = {"resourceType": "Practitioner", "identifier": [{"system": "https://iop-fhir.org/fhir/sid/riverbend-iop/staff", "value": "s"}]}
    assert route("Practitioner", practitioner, None) == ["riverbend-only", "one-client"]
    # a pharmacy is sent prescriptions, and Tasks (its channel answers the reviews of its requests)
    assert "pharmacy" in route("MedicationRequest", {"resourceType": "MedicationRequest"}, f"Patient/{ours}")
    assert "pharmacy" in route("Task", {"resourceType": "Task"}, f"Patient/{ours}")
    assert "pharmacy" not in route("Condition", {"resourceType": "Condition"}, f"Patient/{ours}")
    # audit trails and bundles are never routed
    assert route("AuditEvent", {"resourceType": "AuditEvent"}, None) == []
    assert route("Bundle", {"resourceType": "Bundle"}, None) == []


def test_aftercare_providers_are_matched_by_identifier() -> None:
    npi = "http://hl7.org/fhir/sid/us-npi"
    (d,) = load_destinations({"destination": [{**EHR, "aftercare_providers": [f"{npi}|1234567893"]}]}).values()
    assert d.serves_aftercare([("x", "y"), (npi, "1234567893")])
    assert not d.serves_aftercare([(npi, "1111111111")])
