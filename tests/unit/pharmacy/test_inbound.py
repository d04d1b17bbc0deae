"""Pharmacy messages in (``pharmacy.inbound``), Flask-free: each SCRIPT transaction a pharmacy sends,
kept, applied once and answered; adherence recomputed from the stored fills; replay."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from iop_fhir.cli import main
from iop_fhir.config import ConfigError
from iop_fhir.errors import NotFound
from iop_fhir.formats import ncpdp
from iop_fhir.formats.ncpdp import messages as m
from iop_fhir.pharmacy import inbound
from iop_fhir.pharmacy.inbound import InboundOptions, NotReplayable, PrescriptionUnknown
from iop_fhir.pharmacy.script_mapping import FILL_SYSTEM
from iop_fhir.mappers.care_plan import PLAN_KIND
from iop_fhir.store import Store
from iop_fhir.sync.destinations import Destination
from iop_fhir.terminology import NPI

BASE = "https://iop.example/sid/river"
NOW = dt.datetime(2026, 3, 5, 15, 0, tzinfo=dt.UTC)
PATIENT = "Patient/p1"
BUPRENORPHINE = "MedicationRequest/rx-3"
SERTRALINE = "MedicationRequest/rx-2"
PHARMACY = m.RoutingId(value="1434567", qualifier="P")
PRESCRIBER = m.RoutingId(value="1245319599", qualifier="D")
OPTIONS = InboundOptions(grace_days=3)
# The parties every SCRIPT transaction names.
JORDAN = m.Patient(name=m.Name(last="RIVERA", first="jordan"), gender="F", birth_date=dt.date(1990, 2, 11))
MAIN_STREET = m.Pharmacy(ncpdp_id=PHARMACY.value, business_name="Main Street Pharmacy")
DR_OKAFOR = m.Prescriber(npi=PRESCRIBER.value, name=m.Name(last="Okafor", first="Daniel"))
PARTIES = {"patient": JORDAN, "pharmacy": MAIN_STREET, "prescriber": DR_OKAFOR}


def order(rid: str, number: str, rxnorm: str, text: str, *, intent: str = "order", kind: str = "prescription", base: str = BASE) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "identifier": [{"system": f"{base}/{kind}", "value": number}],
        "status": "active",
        "intent": intent,
        "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": rxnorm}], "text": text},
        "subject": {"reference": PATIENT},
        "authoredOn": "2026-01-05",
        "requester": {"reference": "Practitioner/dr-okafor"},
    }


def episode(end: str | None) -> dict[str, Any]:
    period = {"start": "2026-01-05", **({"end": end} if end else {})}
    return {
        "resourceType": "EpisodeOfCare",
        "id": "ep-1",
        "identifier": [{"system": f"{BASE}/episode", "value": "ep-1"}],
        "status": "finished" if end else "active",
        "patient": {"reference": PATIENT},
        "period": period,
    }


@pytest.fixture
def clock() -> list[dt.datetime]:
    return [NOW]


@pytest.fixture
def store(tmp_path, clock) -> Iterator[Store]:
    """A store with one client: a buprenorphine and a sertraline order, the discharge list's
    entry for the buprenorphine (same identifier value, intent plan), discharged 2026-02-27."""
    opened = Store.open(f"sqlite:///{tmp_path / 'inbound.db'}", clock=lambda: clock[0], router=lambda *_: ["ehr"])
    opened.update("Patient", "p1", {"resourceType": "Patient", "name": [{"family": "Rivera", "given": ["Jordan"]}], "gender": "female", "birthDate": "1990-02-11"})
    opened.update("MedicationRequest", "rx-3", order("rx-3", "ep-1/rx-3", "1010604", "buprenorphine 8 MG / naloxone 2 MG Sublingual Film"))
    opened.update("MedicationRequest", "rx-3-discharge", order("rx-3-discharge", "ep-1/rx-3", "1010604", "buprenorphine", intent="plan", kind="discharge-medication"))
    opened.update("MedicationRequest", "rx-2", order("rx-2", "ep-1/rx-2", "312941", "sertraline 50 MG Oral Tablet"))
    opened.update("EpisodeOfCare", "ep-1", episode("2026-02-27"))
    yield opened
    opened.close()


def header(message_id: str, *, order_number: str | None = "ep-1/rx-3", relates_to: str | None = None, sender: m.RoutingId | None = PHARMACY) -> m.Header:
    return m.Header(
        message_id=message_id,
        to=PRESCRIBER,
        from_=sender,
        sent_time=NOW,
        relates_to_message_id=relates_to,
        rx_reference_number="RX-0884213",
        prescriber_order_number=order_number,
    )


def drug(filled: dt.date | None = None, days: int = 14, rxnorm: str = "1010604") -> m.Medication:
    return m.Medication(
        description="buprenorphine 8 MG / naloxone 2 MG Sublingual Film",
        drug_db_code=m.Code(code=rxnorm, qualifier="SCD"),
        quantity=m.Quantity(value=Decimal(days * 2), unit_code="C64933"),
        days_supply=days,
        written_date=dt.date(2026, 1, 5),
        last_fill_date=filled,
    )


def fill(message_id: str, filled: dt.date | None, *, status: str = "Dispensed", days: int = 14, sender: m.RoutingId | None = PHARMACY, **head: Any) -> bytes:
    body = m.RxFill(
        fill_status=m.FillStatus(status=status),
        **PARTIES,
        prescribed=drug(),
        dispensed=drug(filled, days) if filled else None,
    )
    xml = ncpdp.build(m.Message(header=header(message_id, sender=sender or PHARMACY, **head), body=body))
    # The builder writes no message without a sender; some senders do.
    return xml if sender else re.sub(rb"\s*<From[^>]*>[^<]*</From>", b"", xml)


def reply(answer: inbound.Answer) -> m.Message:
    return ncpdp.parse(answer.body)


def search(store: Store, resource_type: str, *params: tuple[str, str]) -> list[dict[str, Any]]:
    return [s.resource for s in store.search(resource_type, list(params), count=100).entries]


def component(observation: dict[str, Any], code: str) -> Any:
    found = next(c for c in observation["component"] if c["code"]["coding"][0]["code"] == code)
    return next(v for k, v in found.items() if k.startswith("value"))


# --- the adherence window -------------------------------------------------------------------------


@given(st.lists(st.dates(dt.date(2025, 1, 1), dt.date(2026, 12, 31)), max_size=8), st.dates(dt.date(2025, 6, 1), dt.date(2026, 12, 31)))
def test_the_pdc_window_runs_from_the_first_fill_to_today_at_most_180_days(days: list[dt.date], today: dt.date) -> None:
    dispenses = [{"resourceType": "MedicationDispense", "whenHandedOver": d.isoformat()} for d in days]
    window = inbound.pdc_window(dispenses, today)
    past = [d for d in days if d <= today]
    if not past:
        assert window is None
        return
    assert window is not None
    first, last = window
    assert last == today and first <= today
    assert (today - first).days + 1 <= inbound.PDC_WINDOW_DAYS
    assert first == max(min(past), today - dt.timedelta(days=inbound.PDC_WINDOW_DAYS - 1))


def test_the_discharge_date_is_the_end_of_the_latest_episode(store: Store) -> None:
    assert inbound.discharge_date(store, PATIENT) == dt.date(2026, 2, 27)
    store.update("EpisodeOfCare", "ep-2", {**episode(None), "id": "ep-2", "period": {"start": "2026-03-01"}, "identifier": [{"system": f"{BASE}/episode", "value": "ep-2"}]})
    assert inbound.discharge_date(store, PATIENT) is None  # enrolled again: in the program's care
    assert inbound.discharge_date(store, "Patient/nobody") is None


# --- RxFill ----------------------------------------------------------------------------------------


def test_a_fill_becomes_a_dispense_of_our_order_and_pdc_observations(store: Store) -> None:
    answer = inbound.receive(store, fill("f-1", dt.date(2026, 2, 20)), OPTIONS)
    status = reply(answer)
    assert answer.http_status == 200 and status.kind == "Status" and status.body.code == "000"
    assert status.header.relates_to_message_id == "f-1" and status.header.to == PHARMACY and status.header.from_ == PRESCRIBER
    (dispense,) = search(store, "MedicationDispense", ("patient", PATIENT))
    assert dispense["authorizingPrescription"] == [{"reference": BUPRENORPHINE}]  # the order, not the discharge plan
    assert dispense["status"] == "completed" and dispense["whenHandedOver"] == "2026-02-20"
    assert dispense["identifier"][0] == {"system": FILL_SYSTEM, "value": "1434567/RX-0884213/date-2026-02-20"}
    observations = {o["identifier"][0]["value"]: o for o in search(store, "Observation", ("code", "pdc"))}
    # the window: the first fill (02-20) to today (03-05), 14 days, all covered by a 14-day supply
    mine = observations["rx-3/2026-02-20/2026-03-05"]
    assert mine["identifier"][0]["system"] == f"{BASE}/pdc"  # the program's identifier base
    assert mine["valueQuantity"]["value"] == 100 and mine["focus"] == [{"reference": BUPRENORPHINE}]
    assert component(mine, "days-in-period")["value"] == 14 and component(mine, "days-covered")["value"] == 14
    assert "p1/moud/2026-02-20/2026-03-05" in observations
    assert search(store, "Flag") == []  # supply lasts to 03-05: nothing overdue
    kept = store.messages.get(answer.message)
    assert (kept.kind, kept.status, kept.prescription, kept.patient_key, kept.counterparty) == ("RxFill", "processed", BUPRENORPHINE, PATIENT, "1434567")
    (sent,) = store.messages.replies_to("f-1")
    assert (sent.direction, sent.kind, sent.status, sent.body) == ("out", "Status", "sent", answer.body)


def test_written_resources_are_routed_like_every_other_write(store: Store) -> None:
    inbound.receive(store, fill("f-1", dt.date(2026, 2, 20)), OPTIONS)
    routed = {d.resource_type for d in store.outbox.list(destination="ehr")}
    assert {"MedicationDispense", "Observation"} <= routed


def test_a_lapsed_mat_supply_after_discharge_raises_a_flag_that_the_refill_closes(store: Store) -> None:
    inbound.receive(store, fill("f-1", dt.date(2026, 2, 13)), OPTIONS)  # supply to 02-26; discharged 02-27
    (flag,) = search(store, "Flag", ("patient", PATIENT))
    assert flag["status"] == "active" and flag["period"] == {"start": "2026-03-03"}  # out from 02-27, 3 days' grace
    assert "buprenorphine" in flag["code"]["text"] and flag["identifier"][0]["system"] == f"{BASE}/mat-refill-overdue"
    assert any(d.resource_type == "Flag" for d in store.outbox.list(destination="ehr"))
    inbound.receive(store, fill("f-2", dt.date(2026, 3, 5)), OPTIONS)
    (closed,) = search(store, "Flag", ("patient", PATIENT))
    assert closed["id"] == flag["id"] and closed["status"] == "inactive" and closed["period"]["end"] == "2026-03-05"


def test_a_not_dispensed_fill_counts_nothing_and_the_grace_days_decide(store: Store, clock) -> None:
    inbound.receive(store, fill("f-1", dt.date(2026, 2, 13)), InboundOptions(grace_days=10))
    assert search(store, "Flag") == []  # out from 02-27: overdue from 03-10
    clock[0] = dt.datetime(2026, 3, 10, 9, 0, tzinfo=dt.UTC)
    answer = inbound.receive(store, fill("f-2", None, status="NotDispensed"), InboundOptions(grace_days=10))
    assert reply(answer).kind == "Status"
    statuses = sorted(d["status"] for d in search(store, "MedicationDispense"))
    assert statuses == ["completed", "declined"]
    (flag,) = search(store, "Flag")
    assert flag["status"] == "active" and flag["period"]["start"] == "2026-03-10"


def test_no_flag_while_the_client_is_in_the_program(store: Store) -> None:
    store.update("EpisodeOfCare", "ep-1", episode(None))
    inbound.receive(store, fill("f-1", dt.date(2026, 1, 6)), OPTIONS)  # ran out long ago
    assert search(store, "Flag") == [] and search(store, "Observation", ("code", "pdc"))


def test_a_fill_for_a_prescription_we_did_not_write_is_answered_with_an_error_and_applies_nothing(store: Store) -> None:
    answer = inbound.receive(store, fill("f-9", dt.date(2026, 2, 20), order_number="elsewhere/rx-1"), OPTIONS)
    error = reply(answer)
    assert answer.http_status == 200 and error.kind == "Error" and error.body.code == "900"
    assert "/Message/Header/PrescriberOrderNumber" in error.body.description and "elsewhere/rx-1" in error.body.description
    assert error.header.relates_to_message_id == "f-9"
    assert search(store, "MedicationDispense") == [] and search(store, "Observation") == []
    kept = store.messages.get(answer.message)
    assert kept.status == "error" and "elsewhere/rx-1" in kept.detail
    again = inbound.receive(store, fill("f-9", dt.date(2026, 2, 20), order_number="elsewhere/rx-1"), OPTIONS)
    assert again.body == answer.body and again.duplicate  # the same Error: 900 says do not retry


def test_a_fill_naming_no_prescription_is_an_error(store: Store) -> None:
    error = reply(inbound.receive(store, fill("f-9", dt.date(2026, 2, 20), order_number=None), OPTIONS))
    assert error.kind == "Error" and "PrescriberOrderNumber: is required" in error.body.description


def test_several_orders_with_one_number_are_not_guessed_between(store: Store) -> None:
    # another program numbering its episodes alike
    store.update("MedicationRequest", "rx-3-other", order("rx-3-other", "ep-1/rx-3", "1010604", "copy", base="https://other.example/sid"))
    with pytest.raises(PrescriptionUnknown, match="several"):
        inbound.find_prescription(store, "ep-1/rx-3")
    assert inbound.find_prescription(store, "ep-1/rx-2").reference == SERTRALINE
    assert inbound.find_prescription(store, "ep-1/rx-2,ep-1/rx-3") is None  # a comma is not an OR here


# --- duplicates and failures ------------------------------------------------------------------------


def test_the_same_message_again_gets_the_same_answer_and_is_not_applied_again(store: Store) -> None:
    body = fill("f-1", dt.date(2026, 2, 20))
    first = inbound.receive(store, body, OPTIONS)
    (dispense,) = search(store, "MedicationDispense")
    store.delete("MedicationDispense", dispense["id"])  # were it applied again, the dispense would come back
    second = inbound.receive(store, body, OPTIONS)
    assert second.duplicate and not first.duplicate
    assert second.body == first.body and second.message == first.message
    assert search(store, "MedicationDispense") == []
    assert [(k.direction, k.kind) for k in store.messages.list()] == [("in", "RxFill"), ("out", "Status")]


def test_the_same_message_id_from_another_pharmacy_is_another_message(store: Store) -> None:
    inbound.receive(store, fill("f-1", dt.date(2026, 2, 20)), OPTIONS)
    other = inbound.receive(store, fill("f-1", dt.date(2026, 2, 21), sender=m.RoutingId(value="7654321", qualifier="P")), OPTIONS)
    assert not other.duplicate and reply(other).kind == "Status"
    assert len(search(store, "MedicationDispense")) == 2


def test_our_failure_is_answered_retry_later_and_the_retry_is_applied(store: Store, monkeypatch) -> None:
    def broken(unit: Any, message: m.Message) -> inbound.Applied:
        raise RuntimeError("database hiccup")

    body = fill("f-1", dt.date(2026, 2, 20))
    monkeypatch.setitem(inbound._HANDLERS, m.RxFill, broken)
    failed = inbound.receive(store, body, OPTIONS)
    error = reply(failed)
    assert failed.http_status == 500 and error.body.code == "602" and error.body.description_code == "007"
    assert "database hiccup" not in failed.body.decode()  # nothing of our internals leaks
    assert store.messages.get(failed.message).status == "failed"
    monkeypatch.undo()
    retried = inbound.receive(store, body, OPTIONS)
    assert not retried.duplicate and reply(retried).kind == "Status"
    assert len(search(store, "MedicationDispense")) == 1


def test_a_message_without_a_sender_cannot_be_answered_with_a_status(store: Store) -> None:
    answer = inbound.receive(store, fill("f-1", dt.date(2026, 2, 20), sender=None), OPTIONS)
    error = reply(answer)
    assert error.kind == "Error" and "/Message/Header/From" in error.body.description
    assert search(store, "MedicationDispense") == []


def test_transactions_a_prescriber_does_not_take_are_refused(store: Store) -> None:
    cancel = m.Message(header=header("n-1"), body=m.CancelRx(**PARTIES, medication=drug()))
    error = reply(inbound.receive(store, ncpdp.build(cancel), OPTIONS))
    assert error.kind == "Error" and "CancelRx is not a transaction" in error.body.description


@pytest.mark.parametrize(
    "body",
    [
        b"not xml at all",
        b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]><Message>&x;</Message>',
        b"<Bundle xmlns='http://hl7.org/fhir'/>",
        b"<Message><Header><MessageID>" + b"x" * 150 + b"</MessageID></Header><Body><Status><Code>000</Code></Status></Body></Message>",
    ],
    ids=["junk", "external-entity", "wrong-root", "message-id-too-long"],
)
def test_an_unreadable_message_is_rejected_and_kept_as_such(store: Store, body: bytes) -> None:
    answer = inbound.receive(store, body, OPTIONS)
    error = reply(answer)
    assert answer.http_status == 400 and error.kind == "Error" and error.body.code == "900"
    (kept,) = store.messages.list()
    assert (kept.status, kept.kind, kept.body) == ("rejected", inbound.UNREADABLE, body)
    assert len(kept.message_id) <= 100


# --- renewal and change requests ---------------------------------------------------------------------


def test_renewal_and_change_requests_become_review_tasks(store: Store) -> None:
    renewal = m.RxRenewalRequest(**PARTIES, dispensed=dataclasses.replace(drug(dt.date(2026, 2, 20)), pharmacy_requested_refills=2))
    change = m.RxChangeRequest(**PARTIES, request_code="G", prescribed=drug(), requested=(dataclasses.replace(drug(), description="buprenorphine 8 MG Sublingual Tablet"),))
    for message_id, body in (("r-1", renewal), ("c-1", change)):
        answer = inbound.receive(store, ncpdp.build(m.Message(header=header(message_id), body=body)), OPTIONS)
        assert reply(answer).kind == "Status"
    tasks = {t["identifier"][0]["value"]: t for t in search(store, "Task", ("patient", PATIENT))}
    assert set(tasks) == {"1434567/r-1", "1434567/c-1"}
    assert all(t["status"] == "requested" and t["focus"] == {"reference": BUPRENORPHINE} for t in tasks.values())
    assert "Generic substitution" in tasks["1434567/c-1"]["description"]
    assert store.messages.find("r-1", direction="in").prescription == BUPRENORPHINE


# --- cancel responses ----------------------------------------------------------------------------------


def our_cancel(store: Store, message_id: str = "cx-1") -> int:
    return store.messages.record(direction="out", kind="CancelRx", message_id=message_id, body=b"<Message/>", status="accepted", counterparty="main-street", prescription=BUPRENORPHINE, patient_key=PATIENT)


def cancel_response(message_id: str, outcome: str, relates_to: str | None, order_number: str = "ep-1/rx-3", **response: Any) -> bytes:
    body = m.CancelRxResponse(response=m.Response(outcome=outcome, **response))
    return ncpdp.build(m.Message(header=header(message_id, relates_to=relates_to, order_number=order_number), body=body))


def test_a_denied_cancel_marks_both_messages_and_tells_the_prescriber_why(store: Store) -> None:
    cancel = our_cancel(store)
    answer = inbound.receive(store, cancel_response("cr-1", "Denied", "cx-1", denial_reason="Already picked up by the patient"), OPTIONS)
    assert reply(answer).kind == "Status"
    assert store.messages.get(cancel).status == "denied" and store.messages.get(cancel).detail == "Already picked up by the patient"
    assert store.messages.get(answer.message).status == "denied"
    (task,) = search(store, "Task", ("patient", PATIENT))
    assert task["priority"] == "urgent" and task["focus"] == {"reference": BUPRENORPHINE}
    assert "Already picked up by the patient" in task["description"] and task["owner"] == {"reference": "Practitioner/dr-okafor"}
    assert task["requester"]["identifier"]["value"] == "1434567"


def test_an_approved_cancel_needs_no_task(store: Store) -> None:
    cancel = our_cancel(store)
    answer = inbound.receive(store, cancel_response("cr-1", "Approved", "cx-1"), OPTIONS)
    assert store.messages.get(cancel).status == "approved" and store.messages.get(answer.message).status == "approved"
    assert search(store, "Task") == []


def test_a_cancel_response_to_nothing_we_sent_is_kept_uncorrelated(store: Store) -> None:
    our_cancel(store)
    answer = inbound.receive(store, cancel_response("cr-1", "Denied", "someone-else", order_number="ep-1/rx-2"), OPTIONS)
    assert reply(answer).kind == "Status" and store.messages.get(answer.message).status == "uncorrelated"
    assert store.messages.find("cx-1").status == "accepted"
    (task,) = search(store, "Task")  # the prescription is still named by its order number: the prescriber hears
    assert task["focus"] == {"reference": SERTRALINE}


# --- medication history ---------------------------------------------------------------------------------


def history(message_id: str, relates_to: str | None, patient: m.Patient = JORDAN) -> bytes:
    entries = (
        dataclasses.replace(drug(dt.date(2026, 1, 6)), history_source=m.HistorySource(source_reference="RX-1", fill_number=0), pharmacy=m.Pharmacy(ncpdp_id="1434567")),
        dataclasses.replace(drug(dt.date(2026, 1, 20)), history_source=m.HistorySource(source_reference="RX-1", fill_number=1), pharmacy=m.Pharmacy(ncpdp_id="1434567")),
    )
    body = m.RxHistoryResponse(patient=patient, dispensed=entries)
    return ncpdp.build(m.Message(header=header(message_id, relates_to=relates_to, order_number=None), body=body))



def test_a_history_answering_our_request_is_stored_for_its_patient_once(store: Store) -> None:
    store.messages.record(direction="out", kind="RxHistoryRequest", message_id="hq-1", body=b"<Message/>", status="sent", patient_key=PATIENT)
    for message_id in ("h-1", "h-2"):  # two responses with the same fills
        assert reply(inbound.receive(store, history(message_id, "hq-1"), OPTIONS)).kind == "Status"
    dispenses = search(store, "MedicationDispense", ("patient", PATIENT))
    keys = sorted([i["value"] for i in d["identifier"]] for d in dispenses)
    # the fill key by the day handed over, the fill number beside it
    assert keys == [["1434567/RX-1/date-2026-01-06", "1434567/RX-1/fill-0"], ["1434567/RX-1/date-2026-01-20", "1434567/RX-1/fill-1"]]


def test_a_pushed_history_finds_its_patient_by_name_and_birth_date(store: Store) -> None:
    answer = inbound.receive(store, history("h-1", None, JORDAN), OPTIONS)
    assert reply(answer).kind == "Status" and store.messages.get(answer.message).patient_key == PATIENT
    assert len(search(store, "MedicationDispense", ("patient", PATIENT))) == 2


def test_a_history_of_someone_we_cannot_tell_apart_is_an_error(store: Store) -> None:
    stranger = dataclasses.replace(JORDAN, birth_date=dt.date(1991, 2, 11))
    error = reply(inbound.receive(store, history("h-1", None, stranger), OPTIONS))
    assert error.kind == "Error" and "no patient" in error.body.description
    store.update("Patient", "p2", {"resourceType": "Patient", "name": [{"family": "Rivera", "given": ["Jordan"]}], "birthDate": "1990-02-11"})
    error = reply(inbound.receive(store, history("h-2", None, JORDAN), OPTIONS))
    assert error.kind == "Error" and "2 patients" in error.body.description
    assert search(store, "MedicationDispense") == []


def test_apply_history_response_stores_in_the_callers_unit_of_work(store: Store) -> None:
    message = ncpdp.parse(history("h-1", None))  # addressed to nobody: the caller names the patient
    with store.unit() as uow:
        saved = inbound.apply_history_response(uow, message, PATIENT)
    assert [s.resource_type for s in saved] == ["MedicationDispense", "MedicationDispense"] and all(s.changed for s in saved)
    with store.unit() as uow:
        assert not any(s.changed for s in inbound.apply_history_response(uow, message, PATIENT))


# --- one fill, one dispense ------------------------------------------------------------------------------


def history_of_our_fill(message_id: str, filled: dt.date, fill_number: int) -> bytes:
    """The pharmacy's history answering our RxHistoryRequest hq-1, reporting a fill it also sent as an RxFill."""
    entry = dataclasses.replace(
        drug(filled), history_source=m.HistorySource(source_reference="RX-0884213", fill_number=fill_number), pharmacy=MAIN_STREET, prescriber=DR_OKAFOR
    )
    body = m.RxHistoryResponse(patient=JORDAN, dispensed=(entry,))
    return ncpdp.build(m.Message(header=header(message_id, relates_to="hq-1", order_number=None), body=body))


def recompute(store: Store) -> dict[str, dict[str, Any]]:
    """The patient's adherence computed again now; the PDC Observations by identifier value."""
    base = inbound.adherence_base(store.read("MedicationRequest", "rx-3").resource)
    with store.unit() as uow:
        inbound.update_adherence(store, uow, PATIENT, now=NOW, identifier_base=base, options=OPTIONS)
    return {o["identifier"][0]["value"]: o for o in search(store, "Observation", ("code", "pdc"))}


@pytest.mark.parametrize("rx_fill_first", [True, False], ids=["rx-fill-then-history", "history-then-rx-fill"])
def test_a_fill_reported_by_rx_fill_and_history_is_one_dispense_counted_once(store: Store, rx_fill_first: bool) -> None:
    store.messages.record(direction="out", kind="RxHistoryRequest", message_id="hq-1", body=b"<Message/>", status="sent", patient_key=PATIENT)
    messages = [fill("f-1", dt.date(2026, 2, 1)), history_of_our_fill("h-1", dt.date(2026, 2, 1), 2)]
    for body in messages if rx_fill_first else messages[::-1]:
        assert reply(inbound.receive(store, body, OPTIONS)).kind == "Status"
    (dispense,) = search(store, "MedicationDispense", ("patient", PATIENT))
    assert dispense["authorizingPrescription"] == [{"reference": BUPRENORPHINE}]  # the RxFill's link to our order stays
    assert [i["value"] for i in dispense["identifier"]] == ["1434567/RX-0884213/date-2026-02-01", "1434567/RX-0884213/fill-2"]
    assert search(store, "MedicationDispense", ("identifier", f"{FILL_SYSTEM}|1434567/RX-0884213/fill-2"))  # found by its fill number
    # 14 days of supply from 02-01 in a window to 03-05: counted twice they would cover 28
    observations = recompute(store)
    for key in ("rx-3/2026-02-01/2026-03-05", "p1/moud/2026-02-01/2026-03-05"):
        assert component(observations[key], "days-covered")["value"] == 14 and component(observations[key], "days-in-period")["value"] == 33
    # the same history again changes nothing
    again = inbound.receive(store, history_of_our_fill("h-2", dt.date(2026, 2, 1), 2), OPTIONS)
    assert store.messages.get(again.message).detail == "1 history entries for Patient/p1" and len(search(store, "MedicationDispense")) == 1


# --- the aftercare provider ---------------------------------------------------------------------------------

LAKESIDE_NPI = "1932102084"
EHR = Destination(name="ehr", kind="fhir", base_url="https://ehr.example/fhir")
# serves the aftercare provider; its scope names no adherence resource, the aftercare addressing goes past it
LAKESIDE = Destination(name="lakeside", kind="fhir", base_url="https://lakeside.example/fhir", resources=frozenset({"Patient"}), aftercare_providers=frozenset({f"{NPI}|{LAKESIDE_NPI}"}))
AFTERCARE_OPTIONS = InboundOptions(grace_days=3, destinations=(EHR, LAKESIDE))


def aftercare_plan(provider: str) -> dict[str, Any]:
    return {
        "resourceType": "CarePlan",
        "id": "aftercare-1",
        "identifier": [{"system": f"{BASE}/aftercare-plan", "value": "ac-1"}],
        "status": "active",
        "intent": "plan",
        "category": [{"coding": [{"system": PLAN_KIND, "code": "aftercare"}]}],
        "subject": {"reference": PATIENT},
        "period": {"start": "2026-02-27"},
        "activity": [{"detail": {"kind": "Appointment", "status": "scheduled", "performer": [{"reference": provider}]}}],
    }


def routed(store: Store, destination: str) -> set[str]:
    return {d.resource_type for d in store.outbox.list(destination=destination, limit=1000)}


def test_adherence_of_a_discharged_client_also_goes_to_the_aftercare_provider(store: Store) -> None:
    store.update("Organization", "lakeside", {"resourceType": "Organization", "identifier": [{"system": NPI, "value": LAKESIDE_NPI}], "name": "Lakeside"})
    store.update("CarePlan", "aftercare-1", aftercare_plan("Organization/lakeside"))
    inbound.receive(store, fill("f-1", dt.date(2026, 2, 13)), AFTERCARE_OPTIONS)  # ran out 02-27: overdue
    (flag,) = search(store, "Flag")
    assert flag["status"] == "active"
    assert routed(store, "lakeside") == {"Flag", "Observation"}  # not the dispense: that the router decides
    assert {"Flag", "Observation", "MedicationDispense"} <= routed(store, "ehr")  # the router's choice stands


def test_no_aftercare_addressing_while_in_the_program_or_without_a_provider_served(store: Store) -> None:
    store.update("Organization", "lakeside", {"resourceType": "Organization", "identifier": [{"system": NPI, "value": LAKESIDE_NPI}], "name": "Lakeside"})
    store.update("Organization", "elsewhere", {"resourceType": "Organization", "identifier": [{"system": NPI, "value": "1111111112"}], "name": "Elsewhere"})
    store.update("CarePlan", "aftercare-1", aftercare_plan("Organization/elsewhere"))
    inbound.receive(store, fill("f-1", dt.date(2026, 2, 13)), AFTERCARE_OPTIONS)
    assert search(store, "Flag") and routed(store, "lakeside") == set()  # no destination serves that provider
    store.update("CarePlan", "aftercare-1", aftercare_plan("Organization/lakeside"))
    store.update("EpisodeOfCare", "ep-1", episode(None))  # back in the program
    inbound.receive(store, fill("f-2", dt.date(2026, 3, 5)), AFTERCARE_OPTIONS)
    assert routed(store, "lakeside") == set()


# --- acknowledgements -------------------------------------------------------------------------------------


def acknowledgement(message_id: str, relates_to: str, body: Any) -> bytes:
    return ncpdp.build(m.Message(header=header(message_id, relates_to=relates_to), body=body))


def test_acknowledgements_settle_the_status_of_what_we_sent(store: Store) -> None:
    sent = store.messages.record(direction="out", kind="NewRx", message_id="nx-1", body=b"<Message/>", status="sent", prescription=BUPRENORPHINE)
    inbound.receive(store, acknowledgement("a-1", "nx-1", m.Verify(description="Accepted by pharmacy")), OPTIONS)
    assert store.messages.get(sent).status == "verified"
    late = inbound.receive(store, acknowledgement("a-2", "nx-1", m.Status()), OPTIONS)
    assert store.messages.get(sent).status == "verified"  # a late Status does not undo the Verify
    assert store.messages.get(late.message).prescription == BUPRENORPHINE
    inbound.receive(store, acknowledgement("a-3", "nx-1", m.Error(code="601", description_code="002", description="Receiver ID not on file")), OPTIONS)
    got = store.messages.get(sent)
    assert got.status == "error: 601" and got.detail == "description code 002; Receiver ID not on file"


def test_an_acknowledgement_of_nothing_we_sent_is_kept_and_answered(store: Store) -> None:
    answer = inbound.receive(store, acknowledgement("a-1", "who-knows", m.Status()), OPTIONS)
    assert answer.http_status == 200 and reply(answer).kind == "Status"
    assert store.messages.get(answer.message).status == "uncorrelated"


# --- replay -----------------------------------------------------------------------------------------------


def test_replay_applies_a_kept_message_again_once_it_can_be(store: Store) -> None:
    answer = inbound.receive(store, fill("f-1", dt.date(2026, 2, 20), order_number="ep-1/rx-9"), OPTIONS)
    with pytest.raises(PrescriptionUnknown):
        inbound.replay(store, answer.message, OPTIONS)
    assert store.messages.get(answer.message).status == "error"  # a failed replay changes nothing
    store.update("MedicationRequest", "rx-9", order("rx-9", "ep-1/rx-9", "1010604", "buprenorphine"))
    done = inbound.replay(store, answer.message, OPTIONS)
    assert done.applied.status == "processed" and done.kind == "RxFill"
    assert any(r.startswith("MedicationDispense/") for r in done.applied.written)
    kept = store.messages.get(answer.message)
    assert kept.status == "processed" and kept.detail.startswith("replayed: ") and kept.prescription == "MedicationRequest/rx-9"
    again = inbound.replay(store, answer.message, OPTIONS)
    assert again.applied.written == ()  # upserts: nothing changed since
    assert len(search(store, "MedicationDispense")) == 1


def test_what_cannot_be_replayed(store: Store) -> None:
    sent = store.messages.record(direction="out", kind="NewRx", message_id="nx-1", body=b"<Message/>", status="sent")
    with pytest.raises(NotReplayable, match="sync requeue"):
        inbound.replay(store, sent, OPTIONS)
    junk = inbound.receive(store, b"junk", OPTIONS)
    with pytest.raises(NotReplayable, match="not a readable"):
        inbound.replay(store, junk.message, OPTIONS)
    with pytest.raises(NotFound):
        inbound.replay(store, 999, OPTIONS)


def test_the_grace_days_setting_is_checked() -> None:
    assert InboundOptions.from_settings({"MAT_REFILL_GRACE_DAYS": 5}).grace_days == 5
    assert InboundOptions.from_settings({}).grace_days == 3
    for bad in (-1, "3", True, 1.5):
        with pytest.raises(ConfigError, match="MAT_REFILL_GRACE_DAYS"):
            InboundOptions.from_settings({"MAT_REFILL_GRACE_DAYS": bad})


# --- the same from the command line ----------------------------------------------------------------------


def test_the_ncpdp_commands_list_and_replay_messages(tmp_path, monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("IOP_FHIR_")]:
        monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", url)
    with Store.open(url, clock=lambda: NOW) as store:
        store.update("Patient", "p1", {"resourceType": "Patient"})
        failed = inbound.receive(store, fill("f-1", dt.date(2026, 2, 20)), OPTIONS)  # no prescription yet
        store.update("MedicationRequest", "rx-3", order("rx-3", "ep-1/rx-3", "1010604", "buprenorphine"))
    runner = CliRunner()
    listed = runner.invoke(main, ["ncpdp", "messages", "--kind", "RxFill", "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)["messages"]
    assert (row["id"], row["status"], row["kind"]) == (failed.message, "error", "RxFill")
    table = runner.invoke(main, ["ncpdp", "messages", "--limit", "1"])
    assert table.exit_code == 0 and "RxFill" in table.output and "f-1" in table.output and "Error" not in table.output
    replayed = runner.invoke(main, ["ncpdp", "replay", str(failed.message)])
    assert replayed.exit_code == 0, replayed.output
    assert f"message {failed.message} (RxFill): processed" in replayed.output and "stored MedicationDispense/" in replayed.output
    mine = runner.invoke(main, ["ncpdp", "messages", "--prescription", "rx-3", "--json"])
    assert [r["id"] for r in json.loads(mine.output)["messages"]] == [failed.message]
    outbound = runner.invoke(main, ["ncpdp", "replay", str(failed.message + 1)])
    assert outbound.exit_code == 1 and "sync requeue" in outbound.output and "Traceback" not in outbound.output
