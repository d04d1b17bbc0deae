"""42 CFR Part 2 at the pharmacy exit: a NewRx or CancelRx goes only as the patient's consents let
the prescription (and its patient, and its diagnoses) go to that pharmacy; a refusal is a dead
delivery saying why, recorded in the message store and audited.

The pharmacy is the simulator's WSGI app served by werkzeug on a loopback port; the store runs on
SQLite, and on PostgreSQL when ``IOP_FHIR_TEST_POSTGRES_URL`` is set (the store
fixtures, tests/store_fixtures.py). The example record's pharmacy ph-1 (Main Street, NCPDPID
1234567) is named by the Part 2 consent ``cn-2`` (medications, from 2026-01-05, revoked on
2026-02-01); the store's clock starts on 2026-01-15. rx-2 (sertraline) and rx-3
(buprenorphine/naloxone, MAT) are active orders to ph-1.
"""

from __future__ import annotations

import copy
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from werkzeug.serving import make_server

from iop_fhir.api.iop import save_records
from iop_fhir.formats.ncpdp import messages as m
from iop_fhir.pharmacy.channel import NcpdpChannel
from iop_fhir.pharmacy.simulator import PharmacySimulator, make_app
from iop_fhir.privacy.audit import EXIT_EXTENSION
from iop_fhir.privacy.labels import label
from iop_fhir.record import validate_record
from iop_fhir.store import DeliveryState, Store
from iop_fhir.sync.destinations import Destination, Router
from iop_fhir.sync.worker import DrainResult, Worker

JSON = dict[str, Any]
MAIN_STREET = "1234567"
ELM_STREET = "2230418"  # no consent names it
EXIT = "ncpdp:main-street"


@pytest.fixture
def pharmacy() -> Iterator[tuple[PharmacySimulator, str]]:
    """The simulator (Main Street) answering SCRIPT on 127.0.0.1; it and its URL."""
    sim = PharmacySimulator(MAIN_STREET, fill_delay=3600, seed=1)
    server = make_server("127.0.0.1", 0, make_app(sim), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sim, f"http://127.0.0.1:{server.server_port}/ncpdp"
    finally:
        server.shutdown()
        thread.join(10)


def pharmacies(url: str) -> tuple[Destination, Destination]:
    main = Destination(name="main-street", kind="ncpdp", base_url=url, ncpdp_id=MAIN_STREET, max_attempts=2, read_timeout=10)
    elm = Destination(name="elm-street", kind="ncpdp", base_url=url, ncpdp_id=ELM_STREET, max_attempts=2, read_timeout=10)
    return main, elm


@pytest.fixture
def store(open_store: Callable[..., Store], pharmacy: tuple[PharmacySimulator, str]) -> Store:
    return open_store(router=Router(pharmacies(pharmacy[1])), labeller=label)


def save(store: Store, record: JSON) -> None:
    save_records(store, [validate_record(record)])


def drain(store: Store, clock: Any, url: str) -> DrainResult:
    destinations = {d.name: d for d in pharmacies(url)}
    with Worker(store, destinations, name="w", random=random.Random(3), sleep=lambda s: clock.advance(seconds=s)) as worker:
        return worker.drain(max_wait=0)


def received(sim: PharmacySimulator) -> list[str]:
    """The drugs of the NewRx the pharmacy holds."""
    return sorted(p.new_rx.body.medication.description for p in sim.prescriptions if isinstance(p.new_rx.body, m.NewRx))


def events(store: Store, exit: str = EXIT) -> list[JSON]:
    found = [s.resource for s in store.search("AuditEvent", [], count=1000).entries]
    return [e for e in found if {"url": EXIT_EXTENSION, "valueString": exit} in e.get("extension", ())]


def audited(store: Store, outcome: str, exit: str = EXIT) -> set[str]:
    return {e["what"]["reference"].split("/_history/")[0] for ev in events(store, exit) if ev["outcome"] == outcome for e in ev["entity"] if "what" in e}


def order_reference(store: Store, drug: str) -> str:
    found = store.search("MedicationRequest", [("intent", "order"), ("status", "active")]).entries
    return next(s.reference for s in found if drug in s.resource["medicationCodeableConcept"]["text"].lower())


def test_under_the_consent_the_mat_order_goes_and_the_disclosure_is_audited(store: Store, clock: Any, pharmacy, example_json: JSON) -> None:
    sim, url = pharmacy
    save(store, example_json)  # 2026-01-15: cn-2 in force
    result = drain(store, clock, url)
    assert result.dead == 0 and result.pending == 0
    assert len(received(sim)) == 2 and any("buprenorphine" in d.lower() for d in received(sim))
    buprenorphine = order_reference(store, "buprenorphine")
    assert buprenorphine in audited(store, "0")
    used = {e["what"]["reference"] for ev in events(store) for e in ev["entity"] if e["role"]["code"] == "13"}
    assert any(ref.startswith("Consent/") for ref in used)
    assert all(ev["agent"][0]["altId"] == "iop-fhir worker" for ev in events(store))


def test_after_the_revocation_the_mat_new_rx_is_refused_and_dead(store: Store, clock: Any, pharmacy, example_json: JSON) -> None:
    sim, url = pharmacy
    clock.advance(days=18)  # 2026-02-02: cn-2 was revoked on 2026-02-01
    save(store, example_json)
    result = drain(store, clock, url)
    assert result.dead == 1 and result.pending == 0
    assert ["sertraline" in d.lower() for d in received(sim)] == [True]  # ordinary data still goes
    [dead] = store.outbox.list(state=DeliveryState.DEAD, limit=10)
    buprenorphine = order_reference(store, "buprenorphine")
    assert f"MedicationRequest/{dead.resource_id}" == buprenorphine
    assert "no Part 2 consent for pharmacy 1234567" in (dead.last_error or "")
    refused = [s for s in store.messages.list(direction="out", limit=100) if s.prescription == buprenorphine]
    assert [(s.kind, s.status, s.detail, s.body) for s in refused] == [("NewRx", "refused", "no Part 2 consent for pharmacy 1234567", b"")]
    assert buprenorphine in audited(store, "4") and buprenorphine not in audited(store, "0")


def test_a_cancel_rx_after_the_revocation_is_refused_too(store: Store, clock: Any, pharmacy, example_json: JSON) -> None:
    sim, url = pharmacy
    save(store, example_json)
    drain(store, clock, url)
    clock.advance(days=18)
    stopped = copy.deepcopy(example_json)
    stopped["prescriptions"][2].update(status="stopped", status_reason="Patient declined", end="2026-02-02")
    stopped["discharge"]["aftercare"]["medications"][1]["disposition"] = "stopped"
    save(store, stopped)
    result = drain(store, clock, url)
    assert result.dead == 1
    [dead] = store.outbox.list(state=DeliveryState.DEAD, limit=10)
    assert "CancelRx" in (dead.last_error or "") and "no Part 2 consent for pharmacy 1234567" in (dead.last_error or "")
    assert not any(p.cancelled for p in sim.prescriptions)


def test_a_pharmacy_no_consent_names_is_sent_no_mat_order(store: Store, clock: Any, pharmacy, example_json: JSON) -> None:
    sim, url = pharmacy
    record = copy.deepcopy(example_json)
    record["pharmacies"].append({**record["pharmacies"][0], "id": "ph-2", "name": "Elm Street Pharmacy", "ncpdp_id": ELM_STREET, "npi": None})
    record["prescriptions"][2]["pharmacy_id"] = "ph-2"
    save(store, record)
    result = drain(store, clock, url)
    assert result.dead == 1
    [dead] = store.outbox.list(state=DeliveryState.DEAD, limit=10)
    assert dead.destination == "elm-street" and "no Part 2 consent for pharmacy 2230418" in (dead.last_error or "")
    assert order_reference(store, "buprenorphine") in audited(store, "4", "ncpdp:elm-street")


@pytest.mark.parametrize(("categories", "diagnoses"), [(["medications"], []), (["medications", "diagnoses"], ["F1120"])])
def test_a_diagnosis_goes_only_when_the_consent_covers_diagnoses(
    store: Store, clock: Any, pharmacy, example_json: JSON, categories: list[str], diagnoses: list[str]
) -> None:
    sim, url = pharmacy
    record = copy.deepcopy(example_json)
    record["prescriptions"][2]["indication_id"] = "dx-2"  # buprenorphine for the opioid dependence
    record["consents"][1]["categories"] = categories
    save(store, record)
    assert drain(store, clock, url).dead == 0
    [order] = [p for p in sim.prescriptions if "buprenorphine" in p.new_rx.body.medication.description.lower()]
    assert [d.code for d in order.new_rx.body.medication.diagnoses] == diagnoses


def test_a_channel_without_the_workers_gate_audits_through_its_own(store: Store, clock: Any, pharmacy, example_json: JSON) -> None:
    sim, url = pharmacy
    save(store, example_json)
    channel = NcpdpChannel(pharmacies(url)[0], store)
    channel.deliver(store.outbox.list(destination="main-street", limit=100))
    channel.close()
    assert len(received(sim)) == 2
    assert order_reference(store, "buprenorphine") in audited(store, "0")
