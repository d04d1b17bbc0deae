"""The pharmacy loop end to end, every part a real process on loopback.

A gateway (``iop-fhir serve``) has one pharmacy destination (``kind = "ncpdp"``) pointing at a
real ``iop-fhir pharmacy-sim`` whose ``--gateway`` is that gateway. A generated IOP record whose
prescriptions go to that pharmacy is posted; ``iop-fhir worker --once`` sends the NewRx; the
simulator answers Status, then posts an RxFill to the gateway's ``/ncpdp``; the gateway stores a
MedicationDispense linked to the prescription and a PDC Observation for it. Then
``iop-fhir ncpdp history`` asks the simulator for the patient's medication history: the fills it
reports are the fills the RxFills reported, so each stays one MedicationDispense, linked to its
prescription, however often the history is asked. Bounded: every wait has a deadline, and every
process is stopped at teardown.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import servers
import requests

from iop_fhir.generate import generate_record
from iop_fhir.serve import free_port

if TYPE_CHECKING:
    from servers import Server

pytestmark = pytest.mark.integration

SEED = 31
PHARMACY_ID = "3899907"  # the simulator's NCPDPID; the record's pharmacy is renumbered to it
HTTP_TIMEOUT = 15
COMMAND_TIMEOUT = 40  # seconds for one CLI run
ARRIVAL_TIMEOUT = 25  # seconds for the fill to come back through the simulator
PDC = "https://iop-fhir.org/fhir/CodeSystem/adherence-measure|pdc"




@dataclass
class Loop:
    gateway: Server
    pharmacy: Server
    env: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "iop_fhir.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )

    def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        url = f"{self.gateway.fhir}/{resource_type}"
        bundle = requests.get(url, params={**params, "_count": "200"}, headers={"Accept": "application/fhir+json"}, timeout=HTTP_TIMEOUT).json()
        return [e["resource"] for e in bundle.get("entry", ()) if e.get("search", {}).get("mode", "match") == "match"]


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    gateway_port, pharmacy_port = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        "\n".join(
            [
                "[[destination]]",
                'name = "pharmacy"',
                'kind = "ncpdp"',
                f'base_url = "http://127.0.0.1:{pharmacy_port}/ncpdp"',
                f'ncpdp_id = "{PHARMACY_ID}"',
                "timeout = 10",
                "max_attempts = 3",
                "backoff_base = 0.2",
                "backoff_max = 1",
            ]
        )
        + "\n"
    )
    folders = {name: tmp_path / name for name in ("gateway", "pharmacy")}
    for folder in folders.values():
        folder.mkdir()
    env = servers.gateway_env(folders["gateway"] / "gateway.sqlite", AUTH="off", CONFIG=str(config))
    gateway = servers.start(["serve", "--port", str(gateway_port), "--workers", "2"], gateway_port, folders["gateway"], env)
    try:
        simulator = [
            "pharmacy-sim", "--port", str(pharmacy_port), "--gateway", gateway.base, "--ncpdp-id", PHARMACY_ID,
            "--fill-delay", "0.5", "--partial", "0", "--not-dispensed", "0", "--seed", "1",
        ]  # fmt: skip
        pharmacy = servers.start(simulator, pharmacy_port, folders["pharmacy"], env)
        try:
            yield Loop(gateway, pharmacy, env)
        finally:
            servers.stop(pharmacy)
    finally:
        servers.stop(gateway)


def record_for_the_pharmacy() -> tuple[dict[str, Any], list[str]]:
    """A generated record with active prescriptions to one pharmacy, that pharmacy renumbered to
    the simulator's NCPDPID; and the ids of those prescriptions."""
    for index in range(40):
        record = generate_record(index, SEED)
        active = [p for p in record["prescriptions"] if p["status"] == "active" and p.get("pharmacy_id")]
        if not active:
            continue
        chosen = active[0]["pharmacy_id"]
        for pharmacy in record["pharmacies"]:
            if pharmacy["id"] == chosen:
                pharmacy["ncpdp_id"] = PHARMACY_ID
        # MAT orders are Part 2 data: they go to the pharmacy under the patient's written consent
        part2 = {"purpose": "TREAT", "categories": ["medications"], "period": {"start": "2020-01-01"}, "part2": True, "signed": "2020-01-01"}
        record["consents"].append({"id": "consent-pharmacy", "recipient_id": chosen, **part2})
        return record, [p["id"] for p in active if p["pharmacy_id"] == chosen]
    raise AssertionError(f"no record of seed {SEED} has an active prescription to a pharmacy")


def wait_for(what: str, found: Callable[[], Any], loop: Loop) -> Any:
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not arrive within {ARRIVAL_TIMEOUT} s\n--- pharmacy log ---\n{loop.pharmacy.output()[-3000:]}")


def test_prescribe_fill_and_adherence_through_the_simulator(loop: Loop) -> None:
    record, sent = record_for_the_pharmacy()
    posted = requests.post(f"{loop.gateway.base}/iop/records", json=record, timeout=HTTP_TIMEOUT)
    assert posted.status_code == 201, posted.text
    references = [r["reference"] for r in posted.json()["records"][0]["resources"]]
    patient = next(r for r in references if r.startswith("Patient/"))

    worker = loop.cli("worker", "--once", "--max-wait", "20")
    assert worker.returncode == 0, worker.stderr
    assert "dead 0" in worker.stderr and "left pending 0" in worker.stderr

    # The simulator fills each NewRx and posts the RxFill back: a MedicationDispense per prescription.
    def filled_orders() -> list[dict[str, Any]] | None:
        found = [d for d in loop.search("MedicationDispense", patient=patient) if _authorized_by_an_order(d)]
        return found if len(found) >= len(sent) else None

    dispenses = wait_for("the MedicationDispenses", filled_orders, loop)
    orders = {r["id"]: r for r in loop.search("MedicationRequest", patient=patient, intent="order")}
    filled = {d["authorizingPrescription"][0]["reference"].removeprefix("MedicationRequest/") for d in dispenses}
    expected = {rid for rid, r in orders.items() if r["identifier"][0]["value"].rsplit("/", 1)[-1] in sent}
    assert filled == expected and len(filled) == len(sent)
    assert all(d["status"] == "completed" and d["performer"][0]["actor"]["identifier"]["value"] == PHARMACY_ID for d in dispenses)

    # ... and a PDC Observation for each filled prescription.
    observations = wait_for("the PDC Observations", lambda: loop.search("Observation", patient=patient, code=PDC), loop)
    focused = {f["reference"].removeprefix("MedicationRequest/") for o in observations for f in o.get("focus", ())}
    assert expected <= focused

    # Every message of the loop is kept at the gateway: the NewRx accepted, the RxFill processed.
    listed = loop.cli("ncpdp", "messages", "--json", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    messages = json.loads(listed.stdout)["messages"]
    new_rx = [m for m in messages if m["kind"] == "NewRx"]
    assert len(new_rx) == len(sent) and {m["status"] for m in new_rx} == {"accepted"}
    fills = [m for m in messages if m["kind"] == "RxFill" and m["direction"] == "in"]
    assert len(fills) == len(sent) and {m["status"] for m in fills} == {"processed"}

    # The patient's medication history, from the simulator's own fills: the fills the RxFills
    # reported, so nothing new is stored; each dispense gains the history's fill number. Asking
    # again changes nothing.
    patient_id = patient.removeprefix("Patient/")
    history = loop.cli("ncpdp", "history", "--patient", patient_id, "--destination", "pharmacy")
    assert history.returncode == 0, history.stderr
    assert f"pharmacy: {len(sent)} history entries; stored 0 new, {len(sent)} updated, 0 unchanged" in history.stdout, history.stdout
    again = loop.cli("ncpdp", "history", "--patient", patient_id, "--destination", "pharmacy")
    assert again.returncode == 0, again.stderr
    assert f"stored 0 new, 0 updated, {len(sent)} unchanged" in again.stdout, again.stdout
    stored = {line.strip() for line in history.stdout.splitlines() if line.startswith("  MedicationDispense/")}
    assert stored == {f"MedicationDispense/{d['id']}" for d in dispenses}  # one fill, one dispense
    after = loop.search("MedicationDispense", patient=patient)
    assert len(after) == len(sent) and all(_authorized_by_an_order(d) for d in after)
    assert all(i["value"].endswith("/fill-1") for d in after for i in d["identifier"][1:]) and all(len(d["identifier"]) == 2 for d in after)


def _authorized_by_an_order(dispense: dict[str, Any]) -> bool:
    """Linked to one of our MedicationRequests (an RxFill's), not to a contained one (a history entry's)."""
    return any(str(a.get("reference", "")).startswith("MedicationRequest/") for a in dispense.get("authorizingPrescription", ()))
