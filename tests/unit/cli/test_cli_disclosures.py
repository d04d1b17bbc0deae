"""``iop-fhir disclosures --patient ID``: the accounting of disclosures, read from the audit trail a
gateway wrote while two clients read the example record (one under its Part 2 consent, one by
breaking the glass)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner

from iop_fhir.api.disclosure import GATE_KEY
from iop_fhir.cli import main
from iop_fhir.server import create_app

SECRET = "a-development-secret-of-32-bytes-or-more"
AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
NPI = "http://hl7.org/fhir/sid/us-npi"
CLIENTS = [
    {"client_id": "riverbend-ehr", "internal": True},
    {"client_id": "lakeside", "organization": f"{NPI}|1932102084"},  # named by the record's Part 2 consent
    {"client_id": "er", "organization": f"{NPI}|1619980209"},
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("IOP_FHIR_")]:
        monkeypatch.delenv(name)


def token(client_id: str, **claims: Any) -> dict[str, str]:
    now = int(time.time())
    payload = {"client_id": client_id, "scope": "system/*.cruds", "iat": now, "exp": now + 600, **claims}
    return {"Authorization": "Bearer " + jwt.encode(payload, SECRET, algorithm="HS256")}


@pytest.fixture
def database(tmp_path: Path, example_json: dict) -> tuple[str, str]:
    """A gateway database after the disclosures; (its URL, the patient's id)."""
    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    app = create_app({"DATABASE_URL": url, "AUTH": "on", "JWT_SECRET": SECRET, "client": CLIENTS, "LOG_LEVEL": "WARNING"})
    app.extensions[GATE_KEY].clock = lambda: AT
    api = app.test_client()
    assert api.post("/iop/records", json=example_json, headers=token("riverbend-ehr")).status_code == 201
    patient = api.get("/fhir/Patient", headers=token("riverbend-ehr")).get_json()["entry"][0]["resource"]["id"]
    assert api.get("/fhir/MedicationRequest?_count=100", headers=token("lakeside")).status_code == 200
    app.extensions[GATE_KEY].clock = lambda: AT + timedelta(minutes=5)
    assert api.get(f"/fhir/Patient/{patient}/$medication-history", headers=token("er", purpose_of_use="ETREAT")).status_code == 200
    app.extensions[GATE_KEY].audit.close()
    app.extensions["iop_fhir.store"].close()
    return url, patient


def run(url: str, *args: str):
    return CliRunner().invoke(main, ["disclosures", *args], env={"IOP_FHIR_DATABASE_URL": url})


def test_the_accounting_lists_each_disclosure_with_recipient_what_and_consent(database):
    url, patient = database
    result = run(url, "--patient", patient)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"Accounting of disclosures for Patient/{patient}: 2"
    lakeside, er = [line for line in lines if line.startswith("2026-03-01T12:")]
    assert lakeside.startswith("2026-03-01T12:00:00.000000Z  to Organization/") and er.startswith("2026-03-01T12:05:00.000000Z")
    assert "(client lakeside)  via rest  for TREAT  under Consent/" in lakeside
    assert "(client er)  via medication-history  for ETREAT  under break the glass" in er
    assert "  BREAK THE GLASS: disclosed without consent in a medical emergency" in lines
    assert any(line.strip().startswith("MedicationRequest/") and "/_history/" in line for line in lines)
    counts = [line for line in lines if "resource(s):" in line]
    assert counts[0].strip().endswith("MedicationRequest") and len(counts) == 2


def test_json_names_counts_ids_consents_and_break_the_glass(database):
    url, patient = database
    result = run(url, "--patient", f"Patient/{patient}", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["patient"] == f"Patient/{patient}" and document["since"] is None
    lakeside, er = document["disclosures"]
    assert lakeside["client"] == "lakeside" and lakeside["exit"] == "rest" and not lakeside["break_glass"]
    assert lakeside["consents"] and all(c.startswith("Consent/") for c in lakeside["consents"])
    assert lakeside["counts"]["MedicationRequest"] == len(lakeside["resources"])
    assert lakeside["recipient"].startswith("Organization/") and "1932102084" in lakeside["recipient"]
    assert er["break_glass"] and er["consents"] == [] and er["purpose"] == "ETREAT" and er["exit"] == "medication-history"
    assert er["audit_event"].startswith("AuditEvent/")


def test_since_narrows_the_accounting(database):
    url, patient = database
    assert json.loads(run(url, "--patient", patient, "--since", "2026-03-02", "--json").output)["disclosures"] == []
    assert len(json.loads(run(url, "--patient", patient, "--since", "2026-03-01T11:00:00Z", "--json").output)["disclosures"]) == 2


def test_an_unknown_patient_is_a_message_and_status_1(database):
    url, _ = database
    result = run(url, "--patient", "nobody")
    assert result.exit_code == 1 and "no Patient/nobody in the store" in result.output


def test_a_malformed_date_is_a_usage_error(database):
    url, patient = database
    result = run(url, "--patient", patient, "--since", "yesterday")
    assert result.exit_code == 2 and "'yesterday' is not a date" in result.output
