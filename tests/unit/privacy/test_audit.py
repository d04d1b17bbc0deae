"""The audit trail: AuditEvents as R4 defines them, stored in the caller's transaction or buffered
and flushed, never routed, read back as the accounting of disclosures. On SQLite, and on
PostgreSQL when IOP_FHIR_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from iop_fhir import terminology
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.privacy import Recipient, label
from iop_fhir.privacy.audit import (
    AUDIT_CODES,
    CLIENT_ID_SYSTEM,
    EXIT_EXTENSION,
    QUIET_EVENTS,
    AuditLog,
    ReadOnlyResource,
    accounting,
    audit_event,
    refuse_write,
)
from iop_fhir.store import Store, utc_now
from iop_fhir.sync.destinations import Destination, Router

AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
ORG = "Organization/org-a"
NPI = ("http://hl7.org/fhir/sid/us-npi", "1932102084")
EVERYWHERE = Destination(name="ehr", kind="fhir", base_url="http://127.0.0.1:9/fhir")


@pytest.fixture
def store(open_store) -> Store:
    """A labelling store that routes every change to one destination, on a fresh database (SQLite, and PostgreSQL when configured: tests/store_fixtures.py)."""
    return open_store(clock=utc_now, labeller=label, router=Router([EVERYWHERE]))


def event(**changes: object) -> dict:
    arguments: dict = {
        "action": "R",
        "subtype": "read",
        "outcome": "0",
        "who": "lakeside-ehr",
        "recipient": Recipient(references=frozenset({ORG}), identifiers=frozenset({NPI})),
        "entities": ["MedicationRequest/m1/_history/2"],
        "patient": "Patient/p1",
        "purpose": "TREAT",
        "exit": "rest",
        "recorded": AT,
    }
    arguments.update(changes)
    return audit_event(**arguments)


def codes(concepts: list[dict]) -> list[tuple[str, str]]:
    return [(c["system"], c["code"]) for c in concepts]


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# --- one AuditEvent ----------------------------------------------------------------------------------


def test_a_rest_read_is_a_valid_r4_audit_event():
    found = event()
    assert validate_resource(found) == []
    assert found["type"] == {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"}
    assert codes(found["subtype"]) == [("http://hl7.org/fhir/restful-interaction", "read")]
    assert (found["action"], found["outcome"], found["recorded"]) == ("R", "0", "2026-03-01T12:00:00.000000Z")
    assert found["extension"] == [{"url": EXIT_EXTENSION, "valueString": "rest"}]
    requester, receiving = found["agent"]
    assert requester["requestor"] is True and requester["altId"] == "lakeside-ehr"
    assert requester["who"]["identifier"] == {"system": CLIENT_ID_SYSTEM, "value": "lakeside-ehr"}
    assert codes(requester["purposeOfUse"][0]["coding"]) == [(terminology.V3_ACT_REASON, "TREAT")]
    assert receiving["requestor"] is False
    assert codes(receiving["type"]["coding"]) == [(terminology.V3_PARTICIPATION_TYPE, "IRCP")]
    assert receiving["who"] == {"reference": ORG, "identifier": {"system": NPI[0], "value": NPI[1]}}
    patient, resource = found["entity"]
    assert patient["what"] == {"reference": "Patient/p1"} and patient["role"]["code"] == "1" and patient["type"]["code"] == "1"
    assert resource["what"] == {"reference": "MedicationRequest/m1/_history/2"} and resource["role"]["code"] == "4"


def test_a_disclosure_is_an_export_with_the_iso_21089_disclose_subtype_and_its_consents():
    found = event(subtype="disclose", consents=["Consent/c1"], exit="sync:ehr", detail="2 resource(s) disclosed")
    assert validate_resource(found) == []
    assert (found["type"]["system"], found["type"]["code"]) == ("http://dicom.nema.org/resources/ontology/DCM", "110106")
    assert codes(found["subtype"]) == [("http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle", "disclose")]
    consent = [e for e in found["entity"] if e["role"]["code"] == "13"]
    assert [e["what"]["reference"] for e in consent] == ["Consent/c1"]
    assert found["outcomeDesc"] == "2 resource(s) disclosed"
    assert found["extension"][0]["valueString"] == "sync:ehr"


def test_break_the_glass_is_marked_in_the_subtype_and_the_purpose():
    found = event(subtype="disclose", break_glass=True)
    assert (AUDIT_CODES, "break-the-glass") in codes(found["subtype"])
    assert [c["coding"][0]["code"] for c in found["purposeOfEvent"]] == ["TREAT", "ETREAT"]
    assert [c["coding"][0]["code"] for c in event(purpose="ETREAT", break_glass=True)["purposeOfEvent"]] == ["ETREAT"]


def test_a_query_is_an_entity_with_its_text_and_base64():
    found = event(subtype="search-type", action="E", entities=["Observation?code=44249-1&patient=p1"], patient=None)
    (query,) = found["entity"]
    assert query["role"]["code"] == "24" and "what" not in query
    assert query["description"] == "Observation?code=44249-1&patient=p1"
    assert base64.b64decode(query["query"]).decode() == "Observation?code=44249-1&patient=p1"
    assert validate_resource(found) == []


def test_the_program_itself_is_no_recipient_and_a_refusal_says_why():
    found = event(recipient=None, outcome="4", detail="HTTP 401: a bearer token is required", who="unauthenticated", purpose=None)
    assert len(found["agent"]) == 1 and "purposeOfEvent" not in found
    assert found["outcomeDesc"] == "HTTP 401: a bearer token is required"
    assert validate_resource(found) == []
    unnamed = event(recipient=Recipient())["agent"][1]
    assert unnamed["name"] == "unidentified recipient" and "who" not in unnamed


@pytest.mark.parametrize(("change", "message"), [({"action": "X"}, "action"), ({"outcome": "1"}, "outcome"), ({"subtype": "peek"}, "subtype")])
def test_codes_r4_does_not_have_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        event(**change)


def test_writes_to_the_audit_trail_are_405():
    with pytest.raises(ReadOnlyResource) as raised:
        refuse_write("AuditEvent", "Bundle.entry[0].request.url")
    assert raised.value.status == 405 and raised.value.headers == {"Allow": "GET"}
    assert raised.value.issues[0].location == "Bundle.entry[0].request.url"
    refuse_write("Observation")  # anything else is writable


# --- storing them ------------------------------------------------------------------------------------


def audit_events(store: Store) -> list[dict]:
    return [s.resource for s in store.search("AuditEvent", count=500).entries]


def test_in_a_unit_of_work_the_event_commits_and_rolls_back_with_the_write(store):
    log = AuditLog(store)
    with store.unit() as uow:
        uow.update("Patient", "p1", {"resourceType": "Patient", "id": "p1"})
        log.record(event(), uow=uow)
    assert len(audit_events(store)) == 1 and log.pending == 0
    with pytest.raises(RuntimeError), store.unit() as uow:
        uow.update("Patient", "p2", {"resourceType": "Patient", "id": "p2"})
        log.record(event(patient="Patient/p2"), uow=uow)
        raise RuntimeError("the write fails after its audit")
    assert len(audit_events(store)) == 1
    log.close()


def test_buffered_events_are_written_by_the_background_flush(store):
    log = AuditLog(store, flush_interval=0.05)
    for n in range(3):
        log.record(event(entities=[f"Observation/o{n}"]))
    assert wait_for(lambda: len(audit_events(store)) == 3)
    assert log.pending == 0
    log.close()


def test_stored_events_are_indexed_for_search_once_the_process_is_idle(store):
    log = AuditLog(store, flush_interval=0.05)
    for n in range(3):
        log.record(event(entities=[f"Observation/o{n}"]))
    # nobody asks for them (a search would index them itself): the idle flusher does
    assert wait_for(lambda: log.pending == 0 and store.appended_backlog() == 0)
    log.close()
    assert len(audit_events(store)) == 3


def test_writes_audited_in_their_unit_keep_the_process_busy(store):
    log = AuditLog(store, flush_interval=30)
    assert not log.took_events()
    with store.unit() as uow:
        log.record(event(), uow=uow)
    assert log.took_events() and not log.took_events()  # a write-only process is not idle
    log.close()


def test_under_load_indexing_waits_until_the_backlog_passes_its_bound(store):
    log = AuditLog(store, flush_interval=30, index_backlog=3)
    for n in range(5):
        log.record(event(entities=[f"Observation/o{n}"]))
    assert log.flush() == 5 and store.appended_backlog() == 5
    assert log.index(idle=False) == 2 and store.appended_backlog() == 3  # down to the bound, no further
    assert log.index(idle=False) == 0
    assert log.index(idle=True) == 3 and store.appended_backlog() == 0  # nothing queued since the last look
    log.close()


def test_an_idle_process_leaves_indexing_alone_while_another_keeps_queueing(store):
    """Two workers of one store: the one without requests must not take the cores the other
    is serving on, yet it indexes as soon as the whole store is quiet, or nearly."""
    busy, idle = AuditLog(store, flush_interval=30), AuditLog(store, flush_interval=30)

    def serve(requests: int) -> None:
        for n in range(requests):
            busy.record(event(entities=[f"Observation/o{n}"]))
        assert busy.flush() == requests

    serve(1)
    assert idle.index(idle=True) == 0  # events arrived since it last looked (it never did)
    serve(QUIET_EVENTS + 1)
    assert idle.index(idle=True) == 0 and store.appended_backlog() == QUIET_EVENTS + 2  # the gateway is busy
    assert idle.index(idle=False) == 0  # and a busy process waits for the bound, as before
    assert idle.index(idle=True) == QUIET_EVENTS + 2 and store.appended_backlog() == 0  # quiet since the last look
    serve(QUIET_EVENTS)
    assert idle.index(idle=True) == QUIET_EVENTS  # a trickle of requests does not stop indexing
    busy.close()
    idle.close()


def test_a_full_buffer_is_flushed_without_waiting_for_the_interval(store):
    log = AuditLog(store, flush_interval=30, max_buffer=5)
    for n in range(5):
        log.record(event(entities=[f"Observation/o{n}"]))
    assert wait_for(lambda: len(audit_events(store)) == 5, seconds=10)
    log.close()


def test_close_writes_what_is_buffered(store):
    log = AuditLog(store, flush_interval=30)
    log.record(event())
    assert log.pending == 1 and audit_events(store) == []
    log.close()
    assert log.pending == 0 and len(audit_events(store)) == 1


def test_audit_events_are_never_routed_nor_in_the_system_history(store):
    log = AuditLog(store)
    store.update("Patient", "p1", {"resourceType": "Patient", "id": "p1"})
    with store.unit() as uow:
        log.record(event(), uow=uow)
    log.record(event())
    log.flush()
    queued = store.outbox.claim("w", destination="ehr", lease=timedelta(seconds=30), limit=10)
    assert [(d.resource_type, d.resource_id) for d in queued] == [("Patient", "p1")]
    assert [s.resource_type for s in store.history(count=10).entries] == ["Patient"]
    assert store.history("AuditEvent", count=10, total=True).total == 2
    log.close()


def test_a_failing_database_keeps_the_events_for_the_next_flush(store, monkeypatch, caplog):
    log = AuditLog(store, flush_interval=30)
    log.record(event())

    def unavailable(events: object, **options: object) -> None:
        raise OSError("the database is away")

    with monkeypatch.context() as patched:
        patched.setattr(store, "append", unavailable)
        log.flush()
    assert log.pending == 1 and "cannot write 1 audit events" in caplog.text
    log.flush()
    assert log.pending == 0 and len(audit_events(store)) == 1
    log.close()


def test_a_forked_worker_starts_without_the_parents_buffer(store):
    log = AuditLog(store, flush_interval=30)
    log.record(event())
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status
        os._exit(10 + log.pending)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 10
    assert log.pending == 1  # the parent still holds (and writes) its own
    log.close()
    assert len(audit_events(store)) == 1


# --- the accounting ------------------------------------------------------------------------------------


def test_the_accounting_lists_the_patients_disclosures_oldest_first(store):
    log = AuditLog(store)
    later = event(subtype="disclose", entities=["Condition/c1/_history/1", "MedicationRequest/m1/_history/1"], consents=["Consent/c9"], recorded=AT + timedelta(days=1))
    earlier = event(subtype="disclose", entities=["MedicationRequest/m2/_history/3"], break_glass=True, purpose="ETREAT", exit="sync:ehr", who="ehr")
    withheld = event(subtype="disclose", outcome="4", entities=["Observation/o1/_history/1"])
    another = event(subtype="disclose", patient="Patient/p2", entities=["Observation/o2/_history/1"])
    access = event()  # a REST access, not a disclosure
    for one in (later, earlier, withheld, another, access):
        log.record(one)
    log.flush()
    found = accounting(store, "p1")
    assert [a.recorded for a in found] == ["2026-03-01T12:00:00.000000Z", "2026-03-02T12:00:00.000000Z"]
    first, second = found
    assert first.break_glass and first.exit == "sync:ehr" and first.client == "ehr" and first.purpose == "ETREAT"
    assert first.resources == ("MedicationRequest/m2/_history/3",) and first.consents == ()
    assert second.consents == ("Consent/c9",) and not second.break_glass
    assert second.counts() == {"Condition": 1, "MedicationRequest": 1}
    assert second.recipient == f"{ORG}, {NPI[0]}|{NPI[1]}"
    assert second.as_json()["counts"] == {"Condition": 1, "MedicationRequest": 1}
    assert [a.recorded for a in accounting(store, "Patient/p1", since="2026-03-02")] == ["2026-03-02T12:00:00.000000Z"]
    assert accounting(store, "Patient/nobody") == []
    log.close()
