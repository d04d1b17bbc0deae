"""The scheduled overdue-MAT check (``pharmacy.monitor``): a discharged client who stops filling is
flagged without any message arriving; the worker runs the check on its interval; the CLI runs it once.

Store-level: on SQLite, and on PostgreSQL when ``IOP_FHIR_TEST_POSTGRES_URL`` is set (the store
fixtures, tests/store_fixtures.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from iop_fhir.cli import main
from iop_fhir.config import ConfigError
from iop_fhir.errors import IopFhirError
from iop_fhir.mappers.care_plan import PLAN_KIND
from iop_fhir.pharmacy import monitor
from iop_fhir.pharmacy.inbound import InboundOptions
from iop_fhir.pharmacy.script_mapping import FILL_SYSTEM
from iop_fhir.store import Store
from iop_fhir.sync.destinations import Destination
from iop_fhir.sync.worker import Worker, WorkerOptions
from iop_fhir.terminology import NPI, RXNORM

BASE = "https://iop.example/sid/river"
NOW = dt.datetime(2026, 3, 5, 15, 0, tzinfo=dt.UTC)
BUPRENORPHINE = "1010604"
SERTRALINE = "312941"
LAKESIDE_NPI = "1932102084"
LAKESIDE = Destination(name="lakeside", kind="fhir", base_url="https://lakeside.example/fhir", aftercare_providers=frozenset({f"{NPI}|{LAKESIDE_NPI}"}))
OPTIONS = InboundOptions(grace_days=3, destinations=(LAKESIDE,))


def order(patient: str, rxnorm: str, authored: dt.date = dt.date(2026, 1, 5)) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": f"rx-{patient}",
        "identifier": [{"system": f"{BASE}/prescription", "value": f"{patient}/rx-1"}],
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": rxnorm}]},
        "subject": {"reference": f"Patient/{patient}"},
        "authoredOn": authored.isoformat(),
    }


def episode(patient: str, end: dt.date | None) -> dict[str, Any]:
    return {
        "resourceType": "EpisodeOfCare",
        "id": f"ep-{patient}",
        "status": "finished" if end else "active",
        "patient": {"reference": f"Patient/{patient}"},
        "period": {"start": "2026-01-05", **({"end": end.isoformat()} if end else {})},
    }


def dispense(patient: str, handed_over: dt.date, days: int) -> dict[str, Any]:
    key = f"1434567/RX-{patient}/date-{handed_over.isoformat()}"
    return {
        "resourceType": "MedicationDispense",
        "id": f"md-{patient}-{handed_over.isoformat()}",
        "identifier": [{"system": FILL_SYSTEM, "value": key}],
        "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": BUPRENORPHINE}]},
        "subject": {"reference": f"Patient/{patient}"},
        "authorizingPrescription": [{"reference": f"MedicationRequest/rx-{patient}"}],
        "daysSupply": {"value": days, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"},
        "whenHandedOver": handed_over.isoformat(),
    }


def client(store: Store, patient: str, rxnorm: str, discharged: dt.date | None, authored: dt.date = dt.date(2026, 1, 5)) -> None:
    store.update("MedicationRequest", f"rx-{patient}", order(patient, rxnorm, authored))
    store.update("EpisodeOfCare", f"ep-{patient}", episode(patient, discharged))


@pytest.fixture
def now() -> list[dt.datetime]:
    return [NOW]


@pytest.fixture
def store(open_store: Callable[..., Store], now: list[dt.datetime]) -> Store:
    """p1: buprenorphine, discharged 02-27, last supply 02-13 for 14 days (out from 02-27), its
    aftercare provider served by ``lakeside``; p2: buprenorphine, still in the program, out long
    ago; p3: sertraline only, discharged (no MAT)."""
    opened = open_store(clock=lambda: now[0], router=lambda *_: ["ehr"])
    client(opened, "p1", BUPRENORPHINE, dt.date(2026, 2, 27))
    opened.update("MedicationDispense", "md-p1-2026-02-13", dispense("p1", dt.date(2026, 2, 13), 14))
    opened.update("Organization", "lakeside", {"resourceType": "Organization", "identifier": [{"system": NPI, "value": LAKESIDE_NPI}]})
    plan = {
        "resourceType": "CarePlan",
        "status": "active",
        "intent": "plan",
        "category": [{"coding": [{"system": PLAN_KIND, "code": "aftercare"}]}],
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-02-27"},
        "activity": [{"detail": {"kind": "Appointment", "status": "scheduled", "performer": [{"reference": "Organization/lakeside"}]}}],
    }
    opened.update("CarePlan", "aftercare-p1", plan)
    client(opened, "p2", BUPRENORPHINE, None)
    opened.update("MedicationDispense", "md-p2-2026-01-06", dispense("p2", dt.date(2026, 1, 6), 7))
    client(opened, "p3", SERTRALINE, dt.date(2026, 2, 27))
    return opened


def flags(store: Store) -> dict[str, dict[str, Any]]:
    return {s.resource["subject"]["reference"]: s.resource for s in store.search("Flag", [], count=100).entries}


def test_a_discharged_client_who_stops_filling_is_flagged_without_a_new_fill(store: Store, now: list[dt.datetime]) -> None:
    now[0] = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)  # out since 02-27: within the 3 days' grace
    early = monitor.check_adherence(store, OPTIONS)
    assert early.checked == ("Patient/p1",) and early.written == () and flags(store) == {}
    now[0] = NOW
    result = monitor.check_adherence(store, OPTIONS)
    assert result.checked == ("Patient/p1",)  # p2 is in the program's care, p3 takes no MAT
    (flag,) = flags(store).values()
    assert flag["status"] == "active" and flag["period"] == {"start": "2026-03-03"} and "buprenorphine" in flag["code"]["text"]
    assert flag["identifier"][0]["system"] == f"{BASE}/mat-refill-overdue"  # the program's base, from the order
    assert result.written == result.active == (f"Flag/{flag['id']}",) and result.failed == {}
    assert store.search("Observation", []).entries == []  # without a fill no PDC series grows
    to = {d.destination for d in store.outbox.list(resource=("Flag", flag["id"]))}
    assert to == {"ehr", "lakeside"}  # the router's choice and the aftercare provider's system


def test_checking_again_writes_nothing_and_a_refill_closes_the_flag(store: Store, now: list[dt.datetime]) -> None:
    monitor.check_adherence(store, OPTIONS)
    again = monitor.check_adherence(store, OPTIONS)
    assert again.written == () and len(again.active) == 1
    store.update("MedicationDispense", "md-p1-2026-03-06", dispense("p1", dt.date(2026, 3, 6), 14))
    now[0] = dt.datetime(2026, 3, 6, 15, 0, tzinfo=dt.UTC)
    closed = monitor.check_adherence(store, OPTIONS)
    (flag,) = flags(store).values()
    assert flag["status"] == "inactive" and flag["period"] == {"start": "2026-03-03", "end": "2026-03-06"}
    assert closed.written == (f"Flag/{flag['id']}",) and closed.active == ()


@pytest.mark.parametrize("failure", [IopFhirError("the store refused it"), RuntimeError("a bug")], ids=["refused", "bug"])
def test_one_patients_failure_neither_stops_nor_spoils_the_others(store: Store, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    client(store, "p4", BUPRENORPHINE, dt.date(2026, 2, 20))  # nothing ever dispensed
    real = monitor.update_adherence

    def failing(st: Store, uow: Any, patient: str, **kwargs: Any) -> Any:
        saved = real(st, uow, patient, **kwargs)  # written, then undone with its unit of work
        if patient == "Patient/p1":
            raise failure
        return saved

    monkeypatch.setattr(monitor, "update_adherence", failing)
    result = monitor.check_adherence(store, OPTIONS)
    assert result.checked == ("Patient/p1", "Patient/p4") and list(result.failed) == ["Patient/p1"]
    assert ("refused" in result.failed["Patient/p1"]) == isinstance(failure, IopFhirError)
    found = flags(store)
    assert list(found) == ["Patient/p4"] and "nothing dispensed since it was written on 2026-01-05" in found["Patient/p4"]["code"]["text"]


def test_the_worker_runs_the_check_every_interval_and_survives_its_failure(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    moments = [NOW]
    calls: list[dt.datetime] = []
    worker = Worker(store, {}, clock=lambda: moments[0], mat_check=lambda: calls.append(moments[0]), mat_check_interval=3600)
    assert worker.mat_check_due() and calls == [NOW]  # the first check at once
    moments[0] = NOW + dt.timedelta(minutes=59)
    assert not worker.mat_check_due() and len(calls) == 1
    moments[0] = NOW + dt.timedelta(hours=1)
    assert worker.mat_check_due() and len(calls) == 2

    def broken() -> None:
        raise RuntimeError("database away")

    failing = Worker(store, {}, mat_check=broken)
    with caplog.at_level(logging.ERROR, logger="iop_fhir.sync"):
        assert failing.mat_check_due()
    assert "scheduled MAT refill check failed" in caplog.text
    assert Worker(store, {}).mat_check_due() is False  # nothing to run


def test_the_long_running_loop_calls_the_check(store: Store) -> None:
    stop = threading.Event()
    ran: list[monitor.AdherenceCheck] = []

    def check() -> None:
        ran.append(monitor.check_adherence(store, OPTIONS))
        stop.set()

    Worker(store, {}, mat_check=check, poll=0.01).run(stop)
    assert len(ran) == 1 and ran[0].checked == ("Patient/p1",) and flags(store)


def test_the_check_interval_setting_is_checked() -> None:
    assert WorkerOptions.from_settings({}).mat_check_interval == 3600
    assert WorkerOptions.from_settings({"MAT_CHECK_INTERVAL": 600}).mat_check_interval == 600
    for bad in (0, -5, "hourly", True, float("inf")):
        with pytest.raises(ConfigError, match="MAT_CHECK_INTERVAL"):
            WorkerOptions.from_settings({"MAT_CHECK_INTERVAL": bad})


def test_check_adherence_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("IOP_FHIR_")]:
        monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", url)
    today = dt.datetime.now(dt.UTC).date()  # the command runs on the wall clock
    with Store.open(url) as seeded:
        client(seeded, "p1", BUPRENORPHINE, today - dt.timedelta(days=20), authored=today - dt.timedelta(days=60))
    runner = CliRunner()
    first = runner.invoke(main, ["ncpdp", "check-adherence"])
    assert first.exit_code == 0, first.output
    assert "checked 1 discharged patients with MAT prescriptions: 1 Flags written, 1 active" in first.output and "active Flag/" in first.output
    second = runner.invoke(main, ["ncpdp", "check-adherence"])
    assert second.exit_code == 0 and "0 Flags written, 1 active" in second.output
