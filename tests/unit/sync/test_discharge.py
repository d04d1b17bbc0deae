"""The discharge continuity package: what it holds, that it is the same for the same record,
who receives it, and how its delivery state reads.

The store runs on SQLite, and on PostgreSQL when ``IOP_FHIR_TEST_POSTGRES_URL`` is set (the
store fixtures, tests/store_fixtures.py).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from iop_fhir.api.iop import save_records
from iop_fhir.errors import NotFound
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers.context import MappingContext
from iop_fhir.record import IopRecord, validate_record
from iop_fhir.store import Store
from iop_fhir.sync.destinations import Destination
from iop_fhir.sync.discharge import discharge_package, discharge_status, package_id



JSON = dict[str, Any]
NPI = "http://hl7.org/fhir/sid/us-npi"
LAKESIDE_NPI = "1932102084"  # the example's receiving provider, pr-1
PROGRAM = "https://iop-fhir.org/fhir/sid/riverbend-iop"


def destination(name: str, *providers: str, **settings: Any) -> Destination:
    return Destination(name=name, kind="fhir", base_url=f"http://{name}.example/fhir", aftercare_providers=frozenset(providers), **settings)


LAKESIDE = destination("lakeside", f"{NPI}|{LAKESIDE_NPI}")
ELSEWHERE = destination("elsewhere", f"{NPI}|1234567893")
DESTINATIONS = {d.name: d for d in (LAKESIDE, ELSEWHERE)}


@pytest.fixture
def store(open_store: Callable[..., Store]) -> Store:
    return open_store()


def package_of(store: Store, record: IopRecord) -> Any:
    return store.read("Bundle", package_id(MappingContext(record).ids.base, record.id))


def identifier_values(bundle: JSON, resource_type: str) -> list[str]:
    return sorted(
        e["resource"]["identifier"][0]["value"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type
    )


def test_the_package_holds_what_the_next_provider_needs(store: Store, example_record: IopRecord) -> None:
    save_records(store, [example_record], DESTINATIONS)
    package = package_of(store, example_record)
    bundle = package.resource
    assert (bundle["type"], bundle["identifier"]) == ("collection", {"system": f"{PROGRAM}/discharge-package", "value": "ep-2026-0042"})
    kinds = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
    assert kinds["Patient"] == 1 and kinds["CareTeam"] == 1 and kinds["CarePlan"] == 1  # the aftercare plan only
    assert "Encounter" not in kinds and "Goal" not in kinds and "EpisodeOfCare" not in kinds  # sessions, goals: not here
    # the discharge list (continue, changed, stopped) and the prescriptions it names
    requests = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "MedicationRequest"]
    discharge = [r for r in requests if r["identifier"][0]["system"].endswith("/discharge-medication")]
    assert sorted(r["extension"][0]["valueCode"] for r in discharge) == ["changed", "continue", "stopped"]
    assert all(r["category"][0]["coding"][0]["code"] == "discharge" for r in discharge)
    prescribed = {r["identifier"][0]["value"] for r in requests if r["identifier"][0]["system"].endswith("/prescription")}
    assert {"ep-2026-0042/rx-2", "ep-2026-0042/rx-3", "ep-2026-0042/rx-4"} <= prescribed
    # the latest score of each instrument: the February PHQ-9 (as-6), not the intake one (as-1)
    observations = identifier_values(bundle, "Observation")
    assert "ep-2026-0042/as-6" in observations and "ep-2026-0042/as-1" not in observations
    assert {f"ep-2026-0042/as-{n}" for n in (2, 3, 4, 5)} <= set(observations)
    # the latest drug screen with its results; no adherence, side effects or vitals
    assert {"ep-2026-0042/ds-1", "ep-2026-0042/ds-1.buprenorphine"} <= set(observations)
    assert all(v.split("/")[1].startswith(("as-", "ds-")) for v in observations)
    assert identifier_values(bundle, "Condition") == ["ep-2026-0042/dx-1", "ep-2026-0042/dx-2"]
    # the care team's contacts: Practitioners and their PractitionerRoles, and the receiving provider
    assert identifier_values(bundle, "PractitionerRole") == identifier_values(bundle, "Practitioner") == ["st-cm-1", "st-psy-1", "st-ther-1"]
    assert {"pr-1", "ph-1", "riverbend-iop"} <= set(identifier_values(bundle, "Organization"))
    # entries as stored, fullUrl urn:uuid:<id>, and references to parties resolve inside the package
    for entry in bundle["entry"]:
        stored = store.read(entry["resource"]["resourceType"], entry["resource"]["id"])
        assert entry["resource"] == stored.resource and entry["fullUrl"] == f"urn:uuid:{stored.id}"
    held = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    for entry in bundle["entry"]:
        for reference in references(entry["resource"]):
            if reference.split("/")[0] in ("Patient", "Practitioner", "PractitionerRole", "Organization", "Condition", "MedicationRequest", "Observation"):
                assert reference in held, f"{reference} in {entry['resource']['resourceType']} is not in the package"
    assert not [i for i in validate_resource(bundle) if i.severity == "error"]


def references(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return own + [r for v in value.values() for r in references(v)]
    if isinstance(value, list):
        return [r for v in value for r in references(v)]
    return []


def test_the_package_is_deterministic_and_a_repost_queues_nothing(store: Store, example_record: IopRecord) -> None:
    save_records(store, [example_record], DESTINATIONS)
    first = package_of(store, example_record)
    episode = store.search("EpisodeOfCare", [("identifier", f"{PROGRAM}/episode|ep-2026-0042")]).entries[0].resource
    patient = episode["patient"]["reference"].split("/")[1]
    rebuilt = discharge_package(store, patient, episode)
    assert rebuilt == discharge_package(store, patient, episode)
    assert rebuilt == {k: v for k, v in first.resource.items() if k != "meta"}  # what was stored, built again
    # no wall clock inside: the timestamp is the newest entry's lastUpdated
    assert first.resource["timestamp"] == max(e["resource"]["meta"]["lastUpdated"] for e in first.resource["entry"])
    save_records(store, [example_record], DESTINATIONS)
    again = package_of(store, example_record)
    assert again.version == first.version == 1
    assert len(store.outbox.list(resource=("Bundle", first.id))) == 1


def test_a_change_in_the_package_gives_a_new_version_delivered_again(store: Store, example_json: JSON) -> None:
    save_records(store, [validate_record(example_json)], DESTINATIONS)
    changed = copy.deepcopy(example_json)
    changed["discharge"]["aftercare"]["medications"][0]["note"] = "Dose doubled in week 2; keep at 100 mg"
    record = validate_record(changed)
    save_records(store, [record], DESTINATIONS)
    assert package_of(store, record).version == 2
    assert [d.version_id for d in store.outbox.list(resource=("Bundle", package_of(store, record).id))] == [1, 2]
    # a change outside the package (a session) does not touch it
    later = copy.deepcopy(changed)
    later["sessions"][0]["minutes"] += 5
    save_records(store, [validate_record(later)], DESTINATIONS)
    assert package_of(store, record).version == 2


def test_the_package_goes_to_the_destinations_serving_the_aftercare_provider(store: Store, example_record: IopRecord) -> None:
    by_our_identifier = destination("clinic", f"{PROGRAM}/provider|pr-1")
    save_records(store, [example_record], {**DESTINATIONS, "clinic": by_our_identifier})
    package = package_of(store, example_record)
    assert sorted(d.destination for d in store.outbox.list(resource=("Bundle", package.id))) == ["clinic", "lakeside"]


def test_without_a_serving_destination_the_package_is_stored_for_nobody(store: Store, example_record: IopRecord) -> None:
    save_records(store, [example_record], {"elsewhere": ELSEWHERE})
    package = package_of(store, example_record)
    assert store.outbox.list(resource=("Bundle", package.id)) == []
    episode = store.search("EpisodeOfCare", [("identifier", f"{PROGRAM}/episode|ep-2026-0042")]).entries[0].resource
    status = discharge_status(store, episode)
    assert (status["state"], status["destinations"]) == ("no-destination", [])
    assert status["package"] == {
        "reference": package.reference, "version": 1, "lastUpdated": status["package"]["lastUpdated"], "entries": len(package.resource["entry"]),
    }  # fmt: skip


def test_delivery_states_read_as_pending_delivered_failed(store: Store, example_record: IopRecord, clock) -> None:
    two = {"lakeside": LAKESIDE, "backup": destination("backup", f"{NPI}|{LAKESIDE_NPI}")}
    save_records(store, [example_record], two)
    episode = store.search("EpisodeOfCare", [("identifier", f"{PROGRAM}/episode|ep-2026-0042")]).entries[0].resource

    def states() -> dict[str, tuple[str, str]]:
        status = discharge_status(store, episode)
        return {d["destination"]: (d["state"], d["delivery_state"]) for d in status["destinations"]} | {"": (status["state"], "")}

    assert states() == {"backup": ("pending", "queued"), "lakeside": ("pending", "queued"), "": ("pending", "")}
    (to_lakeside,) = store.outbox.claim("w1", destination="lakeside")
    assert states()["lakeside"] == ("pending", "in-flight")
    store.outbox.retry("w1", [to_lakeside.id], error="ehr: POST answered 503", at=clock.now + timedelta(seconds=30))
    assert states()["lakeside"] == ("pending", "failed")
    clock.advance(seconds=60)
    (to_lakeside,) = store.outbox.claim("w1", destination="lakeside")
    store.outbox.delivered("w1", [to_lakeside.id])
    (to_backup,) = store.outbox.claim("w1", destination="backup")
    store.outbox.dead_letter("w1", [to_backup.id], error="backup: POST answered 422: unknown profile")
    assert states() == {"backup": ("failed", "dead"), "lakeside": ("delivered", "delivered"), "": ("failed", "")}
    lakeside = next(d for d in discharge_status(store, episode)["destinations"] if d["destination"] == "lakeside")
    assert lakeside["attempts"] == 2 and lakeside["last_error"] is None and lakeside["delivered_at"] is not None
    assert lakeside["current"] is True and lakeside["version"] == 1
    backup = next(d for d in discharge_status(store, episode)["destinations"] if d["destination"] == "backup")
    assert backup["last_error"] == "backup: POST answered 422: unknown profile" and backup["delivered_at"] is None


def undischarged(record: JSON) -> JSON:
    """The example record as it stood before the client left: no discharge, enrolment active."""
    out = copy.deepcopy(record)
    del out["discharge"]
    out["enrolment"]["status"] = "active"
    out["enrolment"].pop("actual_end", None)
    return out


def test_a_record_without_discharge_has_no_package(store: Store, example_json: JSON) -> None:
    save_records(store, [validate_record(undischarged(example_json))], DESTINATIONS)
    episode = store.search("EpisodeOfCare", [("identifier", f"{PROGRAM}/episode|ep-2026-0042")]).entries[0].resource
    with pytest.raises(NotFound, match="has no discharge"):
        discharge_status(store, episode)
    assert store.count("Bundle") == 0


def test_a_discharge_taken_out_again_withdraws_the_package(store: Store, example_json: JSON) -> None:
    record = validate_record(example_json)
    save_records(store, [record], DESTINATIONS)
    save_records(store, [validate_record(undischarged(example_json))], DESTINATIONS)
    assert store.count("Bundle") == 0
    # deleted, and the deletion goes nowhere
    assert [d.action for d in store.outbox.list(resource=("Bundle", package_id(MappingContext(record).ids.base, record.id)))] == ["upsert"]
