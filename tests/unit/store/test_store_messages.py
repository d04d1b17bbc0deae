"""The message store (``store.messages``): wire messages kept as sent, found again for correlation."""

from __future__ import annotations

import threading
import time

import pytest

from iop_fhir.errors import NotFound
from iop_fhir.store import Store
from iop_fhir.store.messages import MESSAGE_ID_MAX, STATUS_MAX

RX = "MedicationRequest/rx-1"


def keep(store: Store, **fields: object) -> int:
    values: dict = {"direction": "out", "kind": "NewRx", "message_id": "m-1", "body": b"<Message/>", "status": "sent", **fields}
    return store.messages.record(**values)


def test_a_message_is_kept_byte_for_byte_with_its_correlation(store: Store, clock) -> None:
    body = b'<?xml version="1.0" encoding="ISO-8859-1"?>\n<Message>caf\xe9 \x00\xff</Message>'
    first = keep(store, body=body, relates_to="r-0", counterparty="pharmacy-a", prescription=RX, patient_key="Patient/p1", detail="first try")
    second = keep(store, message_id="m-2")
    assert second > first
    got = store.messages.get(first)
    assert got.body == body and isinstance(got.body, bytes)
    assert (got.direction, got.protocol, got.kind, got.message_id, got.relates_to) == ("out", "ncpdp", "NewRx", "m-1", "r-0")
    assert (got.counterparty, got.prescription, got.patient_key, got.status, got.detail) == ("pharmacy-a", RX, "Patient/p1", "sent", "first try")
    assert got.created <= clock.now and got.created.tzinfo is not None
    with pytest.raises(NotFound):
        store.messages.get(second + 100)


def test_find_gives_the_latest_receipt_of_a_message_id(store: Store) -> None:
    older = keep(store, direction="in", kind="RxFill", message_id="f-1", counterparty="A", status="failed")
    newer = keep(store, direction="in", kind="RxFill", message_id="f-1", counterparty="A", status="processed")
    other_sender = keep(store, direction="in", kind="RxFill", message_id="f-1", counterparty="B", status="processed")
    ours = keep(store, direction="out", kind="Status", message_id="f-1", counterparty="A")
    assert store.messages.find("f-1").id == ours
    assert store.messages.find("f-1", direction="in").id == other_sender
    assert store.messages.find("f-1", direction="in", counterparty="A").id == newer != older
    assert store.messages.find("f-1", protocol="hl7v2") is None
    assert store.messages.find("nope") is None


def test_replies_are_found_by_what_they_relate_to(store: Store) -> None:
    sent = keep(store, message_id="new-1")
    status = keep(store, direction="in", kind="Status", message_id="s-1", relates_to="new-1")
    keep(store, direction="in", kind="Status", message_id="s-2", relates_to="other")
    verify = keep(store, direction="in", kind="Verify", message_id="v-1", relates_to="new-1")
    assert [m.id for m in store.messages.replies_to("new-1")] == [status, verify]
    assert store.messages.replies_to("m-unknown") == []
    assert sent not in [m.id for m in store.messages.replies_to("new-1")]


def test_list_filters_and_pages_in_id_order(store: Store) -> None:
    ids = [
        keep(store, message_id="a", prescription=RX),
        keep(store, direction="in", kind="Status", message_id="b", prescription=RX, status="processed"),
        keep(store, direction="in", kind="RxFill", message_id="c", prescription="MedicationRequest/rx-2", status="processed"),
        keep(store, kind="CancelRx", message_id="d", prescription=RX),
    ]
    assert [m.id for m in store.messages.list()] == ids
    assert [m.id for m in store.messages.list(prescription=RX)] == [ids[0], ids[1], ids[3]]
    assert [m.id for m in store.messages.list(kind="RxFill")] == [ids[2]]
    assert [m.id for m in store.messages.list(direction="in", status="processed")] == [ids[1], ids[2]]
    page = store.messages.list(limit=2)
    assert [m.id for m in page] == ids[:2]
    assert [m.id for m in store.messages.list(after_id=page[-1].id, limit=2)] == ids[2:]


def test_set_status_changes_status_and_detail_and_fills_in_what_it_is_about(store: Store) -> None:
    id = keep(store, detail="sent to A")
    store.messages.set_status(id, "error: 900", "unknown patient")
    got = store.messages.get(id)
    assert (got.status, got.detail, got.prescription) == ("error: 900", "unknown patient", None)
    store.messages.set_status(id, "accepted", prescription=RX, patient_key="Patient/p1")
    got = store.messages.get(id)
    assert (got.status, got.detail, got.prescription, got.patient_key) == ("accepted", None, RX, "Patient/p1")
    store.messages.set_status(id, "verified")
    assert store.messages.get(id).prescription == RX  # kept when not given
    with pytest.raises(NotFound):
        store.messages.set_status(id + 1, "accepted")


def test_sent_for_is_the_last_outbound_of_its_kind_whatever_its_status(store: Store) -> None:
    assert store.messages.sent_for(RX) is None
    first = keep(store, message_id="n-1", prescription=RX, status="accepted")
    second = keep(store, message_id="n-2", prescription=RX, status="error: 602")
    keep(store, kind="CancelRx", message_id="c-1", prescription=RX)
    keep(store, direction="in", kind="NewRx", message_id="n-3", prescription=RX)  # inbound: not ours
    keep(store, message_id="n-4", prescription="MedicationRequest/rx-2")
    assert store.messages.sent_for(RX).id == second != first
    assert store.messages.sent_for(RX, "CancelRx").message_id == "c-1"
    assert store.messages.sent_for(RX, "RxHistoryRequest") is None


def test_a_message_recorded_in_a_unit_of_work_commits_or_rolls_back_with_it(store: Store, make_patient) -> None:
    with store.unit() as uow:
        id = store.messages.record(direction="in", kind="RxFill", message_id="f-1", body=b"<x/>", status="processed", conn=uow.connection)
        uow.update("Patient", "p1", make_patient())
        assert store.messages.find("f-1", conn=uow.connection).id == id  # the unit sees its own writes
        store.messages.set_status(id, "error", "later", conn=uow.connection)
    assert store.messages.get(id).status == "error"
    with pytest.raises(RuntimeError), store.unit() as uow:
        store.messages.record(direction="in", kind="RxFill", message_id="f-2", body=b"<x/>", status="processed", conn=uow.connection)
        uow.update("Patient", "p2", make_patient("2"))
        raise RuntimeError("the application failed")
    assert store.messages.find("f-2") is None
    assert [m.message_id for m in store.messages.list()] == ["f-1"]


def test_values_that_do_not_fit_are_refused_not_cut(store: Store) -> None:
    with pytest.raises(ValueError, match="message_id"):
        keep(store, message_id="x" * (MESSAGE_ID_MAX + 1))
    with pytest.raises(ValueError, match="status"):
        keep(store, status="e" * (STATUS_MAX + 1))
    with pytest.raises(ValueError, match="direction"):
        keep(store, direction="sideways")
    id = keep(store)
    with pytest.raises(ValueError, match="status"):
        store.messages.set_status(id, "e" * (STATUS_MAX + 1))
    assert [m.id for m in store.messages.list()] == [id]


def test_the_lock_serialises_receipts_of_one_message_id(store: Store) -> None:
    """A second receipt of the same message waits until the first has committed, then sees it."""
    held, seen = threading.Event(), []

    def second() -> None:
        held.wait(5)
        with store.unit() as uow:
            store.messages.lock("f-1", counterparty="A", conn=uow.connection)
            seen.append(store.messages.find("f-1", counterparty="A", conn=uow.connection))

    thread = threading.Thread(target=second)
    thread.start()
    with store.unit() as uow:
        store.messages.lock("f-1", counterparty="A", conn=uow.connection)
        held.set()
        time.sleep(0.2)  # the other receipt is waiting now, not reading
        assert seen == []
        store.messages.record(direction="in", kind="RxFill", message_id="f-1", counterparty="A", body=b"<x/>", status="processed", conn=uow.connection)
    thread.join(10)
    assert not thread.is_alive() and seen[0] is not None and seen[0].status == "processed"
