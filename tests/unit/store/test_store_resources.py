"""Versions, reads, writes, conditional writes, deletes, history and units of work."""

from __future__ import annotations

from decimal import Decimal

import pytest

from iop_fhir.errors import Gone, NotFound, PreconditionFailed, RecordInvalid, VersionConflict
from iop_fhir.formats import fhir_json
from iop_fhir.store import InvalidSearch, Store, instant

MRN = "https://iop.example/mrn"


def test_create_assigns_id_and_meta_from_the_clock(store: Store, make_patient, clock) -> None:
    saved = store.create(make_patient(id="ignored", meta={"profile": ["http://p"]}))
    assert saved.created and saved.changed and saved.version == 1 and not saved.deleted
    assert saved.id != "ignored"  # FHIR create: the server assigns the id
    assert saved.last_updated == clock.now
    doc = fhir_json.loads(saved.data)
    assert list(doc)[:3] == ["resourceType", "id", "meta"]
    assert doc["meta"] == {"profile": ["http://p"], "versionId": "1", "lastUpdated": instant(clock.now)}
    assert saved.resource == doc and saved.etag == 'W/"1"'
    assert saved.location == f"Patient/{saved.id}/_history/1"


def test_read_returns_the_stored_bytes_and_decimals_survive(store: Store) -> None:
    body = b'{"resourceType":"Observation","status":"final","valueQuantity":{"value":1.50,"unit":"mg"}}'
    saved = store.create(fhir_json.loads(body, exact_decimals=True))
    read = store.read("Observation", saved.id)
    assert read.data == saved.data
    assert b'"value":1.50' in read.data
    assert read.resource["valueQuantity"]["value"] == Decimal("1.50")
    assert str(read.resource["valueQuantity"]["value"]) == "1.50"
    assert (read.version, read.created, read.changed) == (1, False, False)


def test_create_with_a_given_id(store: Store, make_patient) -> None:
    saved = store.create(make_patient(), id="p-1")
    assert saved.id == "p-1"
    with pytest.raises(VersionConflict):
        store.create(make_patient("2"), id="p-1")
    with pytest.raises(RecordInvalid):
        store.create(make_patient("3"), id="not an id!")


def test_update_creates_with_the_clients_id_then_versions(store: Store, make_patient) -> None:
    first = store.update("Patient", "p1", make_patient())
    assert (first.id, first.version, first.created, first.changed) == ("p1", 1, True, True)
    second = store.update("Patient", "p1", make_patient(family="Diaz"))
    assert (second.version, second.created, second.changed) == (2, False, True)
    assert store.read("Patient", "p1").resource["name"][0]["family"] == "Diaz"
    assert store.vread("Patient", "p1", 1).resource["name"][0]["family"] == "Rivera"


def test_no_op_update_writes_no_version(store: Store, make_patient) -> None:
    first = store.update("Patient", "p1", make_patient(), deliver_to=["ehr"])
    resent = make_patient()
    resent["meta"] = {"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z"}  # ignored
    resent = dict(reversed(list(resent.items())))  # key order does not matter either
    again = store.update("Patient", "p1", resent, deliver_to=["ehr"])
    assert (again.version, again.changed, again.created) == (1, False, False)
    assert again.data == first.data
    assert len(store.history("Patient", "p1").entries) == 1
    assert len(store.outbox.list()) == 1  # the re-post enqueued nothing
    # but a change of meta that is content (a security label) is a new version
    labelled = make_patient(meta={"security": [{"system": "http://s", "code": "R"}]})
    assert store.update("Patient", "p1", labelled).version == 2


def test_if_match(store: Store, make_patient) -> None:
    store.update("Patient", "p1", make_patient())
    assert store.update("Patient", "p1", make_patient(family="B"), if_match=1).version == 2
    with pytest.raises(PreconditionFailed):
        store.update("Patient", "p1", make_patient(family="C"), if_match=1)
    with pytest.raises(PreconditionFailed):
        store.update("Patient", "nope", make_patient("9"), if_match=1)
    assert store.read("Patient", "p1").version == 2


def test_type_and_id_must_agree(store: Store, make_patient) -> None:
    with pytest.raises(RecordInvalid):
        store.update("Observation", "p1", make_patient())
    with pytest.raises(RecordInvalid):
        store.update("Patient", "p1", make_patient(id="p2"))
    with pytest.raises(RecordInvalid):
        store.create({"status": "final"})


def test_delete_then_gone_and_recreate(store: Store, make_patient) -> None:
    store.update("Patient", "p1", make_patient(), deliver_to=())
    deleted = store.delete("Patient", "p1", deliver_to=["ehr"])
    assert (deleted.version, deleted.deleted, deleted.data) == (2, True, None)
    with pytest.raises(Gone):
        store.read("Patient", "p1")
    with pytest.raises(Gone):
        store.vread("Patient", "p1", 2)
    with pytest.raises(Gone):
        _ = deleted.resource
    assert store.vread("Patient", "p1", 1).version == 1
    again = store.delete("Patient", "p1")  # idempotent: no new version
    assert (again.version, again.changed) == (2, False)
    assert store.search("Patient", [("identifier", f"{MRN}|1")]).entries == []
    # the identifier is free again, and an update brings the resource back
    back = store.update("Patient", "p1", make_patient())
    assert (back.version, back.created) == (3, True)
    assert [d.action for d in store.outbox.list()] == ["delete"]
    with pytest.raises(NotFound):
        store.delete("Patient", "never")


def test_not_found(store: Store, make_patient) -> None:
    with pytest.raises(NotFound):
        store.read("Patient", "x")
    store.update("Patient", "p1", make_patient())
    with pytest.raises(NotFound):
        store.vread("Patient", "p1", 5)
    with pytest.raises(NotFound):
        store.vread("Patient", "x", 1)
    with pytest.raises(NotFound):
        store.history("Patient", "x")


def test_history_newest_first_with_deletions_and_paging(store: Store, make_patient, clock) -> None:
    store.update("Patient", "p1", make_patient())
    clock.advance(seconds=1)
    start = clock.now  # _since is inclusive; the next write is 1 ms later
    store.update("Patient", "p1", make_patient(family="B"))
    store.update("Patient", "p2", make_patient("2"))
    store.delete("Patient", "p1")
    store.create({"resourceType": "Observation", "status": "final"})
    versions = [(e.id, e.version, e.deleted) for e in store.history("Patient", "p1").entries]
    assert versions == [("p1", 3, True), ("p1", 2, False), ("p1", 1, False)]
    assert [(e.id, e.version) for e in store.history("Patient").entries] == [("p1", 3), ("p2", 1), ("p1", 2), ("p1", 1)]
    everything = store.history(total=True)
    assert everything.total == 5 and everything.entries[0].resource_type == "Observation"
    since = store.history("Patient", since=start)
    assert [(e.id, e.version) for e in since.entries] == [("p1", 3), ("p2", 1), ("p1", 2)]
    page = store.history(count=2)
    seen = [(e.resource_type, e.id, e.version) for e in page.entries]
    while page.next_cursor:
        page = store.history(count=2, cursor=page.next_cursor)
        seen += [(e.resource_type, e.id, e.version) for e in page.entries]
    assert seen == [(e.resource_type, e.id, e.version) for e in everything.entries]


def test_save_and_read_many(store: Store, make_patient) -> None:
    a = store.save(make_patient("1"))
    b = store.save(make_patient("2", id="b"))
    assert b.id == "b" and a.id != "b"
    store.delete("Patient", "b")
    store.save(make_patient("3", id="c"))
    assert [s.id for s in store.read_many("Patient", ["c", "b", "zz", a.id, "c"])] == ["c", a.id]


def test_identifiers_are_unique_per_type(store: Store, make_patient) -> None:
    store.create(make_patient("1"), id="a")
    with pytest.raises(VersionConflict) as caught:
        store.create(make_patient("1"))
    assert "Patient/a" in caught.value.message
    # another type may carry the same identifier; a systemless identifier is not held unique
    store.create({"resourceType": "Practitioner", "identifier": [{"system": MRN, "value": "1"}]})
    store.create(make_patient(identifier=[{"value": "x"}]))
    store.create(make_patient(identifier=[{"value": "x"}]))
    # changing the identifier frees the old one
    store.update("Patient", "a", make_patient("9"))
    assert store.create(make_patient("1")).created


def test_conditional_create(store: Store, make_patient) -> None:
    first = store.create(make_patient("1"), if_none_exist=f"identifier={MRN}|1")
    second = store.create(make_patient("1"), if_none_exist=[("identifier", f"{MRN}|1")])
    assert first.created and not second.created and not second.changed
    assert second.id == first.id and second.data == first.data
    store.create(make_patient("2", family="Rivera"))
    with pytest.raises(PreconditionFailed):
        store.create(make_patient("3"), if_none_exist="family=Rivera")
    with pytest.raises(InvalidSearch):
        store.create(make_patient("3"), if_none_exist="")


def test_conditional_update(store: Store, make_patient) -> None:
    created = store.conditional_update("Patient", f"identifier={MRN}|1", make_patient("1"))
    assert created.created
    updated = store.conditional_update("Patient", f"Patient?identifier={MRN}|1", make_patient("1", family="B"))
    assert (updated.id, updated.version, updated.created) == (created.id, 2, False)
    with pytest.raises(RecordInvalid):
        store.conditional_update("Patient", f"identifier={MRN}|1", make_patient("1", id="other"))
    given = store.conditional_update("Patient", f"identifier={MRN}|5", make_patient("5", id="mine"))
    assert given.id == "mine"
    with pytest.raises(PreconditionFailed):
        store.conditional_update("Patient", "given=alex", make_patient("7"))


def test_unit_of_work_commits_together(store: Store, make_patient) -> None:
    with store.unit() as uow:
        p = uow.create(make_patient("1"))
        obs = uow.create({"resourceType": "Observation", "status": "final", "subject": {"reference": p.reference}})
        # reads inside the unit see its writes
        assert uow.read("Patient", p.id).version == 1
        assert [e.id for e in uow.search("Observation", [("patient", p.reference)]).entries] == [obs.id]
    assert store.read("Observation", obs.id).version == 1
    assert store.transaction(lambda u: u.update("Patient", p.id, make_patient("1", family="B"))).version == 2
    with pytest.raises(RuntimeError):
        uow.read("Patient", p.id)


def test_unit_of_work_rolls_back_as_a_whole(store: Store, make_patient) -> None:
    with pytest.raises(ZeroDivisionError), store.unit() as uow:
        uow.update("Patient", "p1", make_patient("1"), deliver_to=["ehr"])
        uow.update("Patient", "p2", make_patient("2"), deliver_to=["ehr"])
        raise ZeroDivisionError  # anything failing mid-unit
    with pytest.raises(NotFound):
        store.read("Patient", "p1")
    assert store.outbox.list() == [] and store.history().entries == []


def test_a_failed_operation_inside_a_unit_leaves_no_trace(store: Store, make_patient) -> None:
    store.create(make_patient("1"), id="holder")
    with store.unit() as uow:
        uow.update("Patient", "p2", make_patient("2"))
        with pytest.raises(VersionConflict):
            # p2 takes MRN 1 from "holder": refused after p2's old identifier was released
            uow.update("Patient", "p2", make_patient("1"))
        uow.create({"resourceType": "Observation", "status": "final"})
    assert store.read("Patient", "p2").version == 1
    assert store.search("Patient", [("identifier", f"{MRN}|2")]).entries[0].id == "p2"
    assert store.count("Observation") == 1


def test_append_stores_write_once_resources_in_bulk_searchable_and_undelivered(open_store) -> None:
    store = open_store(router=lambda *args: ["ehr"], labeller=lambda resource, linked: {**resource, "labelled": True})
    events = [
        {"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2026-01-15T09:00:00Z",
         "agent": [{"requestor": True, "who": {"display": f"client {i}"}}], "source": {"observer": {"display": "gw"}},
         "entity": [{"what": {"reference": "Patient/p1"}}]}
        for i in range(3)
    ]  # fmt: skip
    assert store.append(events) == 3 and store.append([]) == 0
    found = store.search("AuditEvent", [("entity", "Patient/p1")], count=10).entries
    assert len(found) == 3 and len({s.id for s in found}) == 3
    assert all(s.version == 1 and "labelled" not in s.resource for s in found)  # write-once: no labels
    assert store.outbox.list() == []  # never delivered
