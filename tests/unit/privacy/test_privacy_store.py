"""The store's labeller hook: what is written is labelled, from the stored versions of its links,
and searchable by ``_security``. On SQLite, and on PostgreSQL when IOP_FHIR_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import pytest
from privacy_helpers import act, condition, of_type, prescription, resources_of, security

from iop_fhir import terminology
from iop_fhir.privacy import is_part2, label
from iop_fhir.store import Store, utc_now

PART2 = f"{terminology.V3_ACT_CODE}|42CFRPart2"


@pytest.fixture
def store(open_store) -> Store:
    """A store that labels, on a fresh database (SQLite, and PostgreSQL when configured: tests/store_fixtures.py)."""
    return open_store(clock=utc_now, labeller=label)


def test_a_written_resource_is_stored_labelled_and_found_by_its_labels(store):
    saved = store.update("Condition", "c1", condition("F11.20"))
    assert is_part2(store.read("Condition", "c1").resource)
    assert {act("SUD"), act("42CFRPart2")} <= security(saved.resource)
    store.update("Condition", "c2", condition("F33.1", rid="c2"))
    assert [s.id for s in store.search("Condition", [("_security", PART2)]).entries] == ["c1"]
    assert [s.id for s in store.search("Condition", [("_security", f"{terminology.V3_ACT_CODE}|MH")]).entries] == ["c2"]


def test_labels_are_content_a_repeat_writes_nothing(store):
    first = store.update("MedicationRequest", "m1", prescription("1010604"))
    again = store.update("MedicationRequest", "m1", prescription("1010604"))
    assert first.version == again.version == 1 and not again.changed
    changed = store.update("MedicationRequest", "m1", prescription("312941"))  # now sertraline
    assert changed.version == 2 and not is_part2(changed.resource)


def test_links_resolve_to_the_stored_versions(store):
    store.update("MedicationRequest", "m1", prescription("991147"))
    review = {"resourceType": "Task", "status": "completed", "intent": "order", "focus": {"reference": "MedicationRequest/m1"}}
    assert is_part2(store.update("Task", "t1", review).resource)
    unknown = {**review, "focus": {"reference": "MedicationRequest/nowhere"}}
    assert not is_part2(store.update("Task", "t2", unknown).resource)


def test_a_transaction_labels_in_order_so_sessions_inherit(store, example_json):
    resources = resources_of(example_json)
    # what the bundle processor does first: urn:uuid references become Type/id
    targets = {f"urn:uuid:{r['id']}": f"{r['resourceType']}/{r['id']}" for r in resources}
    with store.unit() as uow:
        for resource in resources:
            uow.update(resource["resourceType"], resource["id"], _rewrite(resource, targets))
    sessions = store.search("Encounter", [("_security", PART2)], count=100).entries
    assert len(sessions) == len(of_type(resources, "Encounter")) > 0
    assert store.search("Provenance", [("_security", PART2)]).entries
    assert not store.search("Patient", [("_security", PART2)]).entries


def _rewrite(value: object, targets: dict[str, str]) -> object:
    if isinstance(value, dict):
        out = {k: _rewrite(v, targets) for k, v in value.items()}
        if isinstance(out.get("reference"), str):
            out["reference"] = targets.get(out["reference"], out["reference"])
        return out
    if isinstance(value, list):
        return [_rewrite(v, targets) for v in value]
    return value
