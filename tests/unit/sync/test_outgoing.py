"""Deliveries -> one transaction Bundle: each rule, a property over a real record, and our own
gateway accepting the Bundle (twice, the second time changing nothing)."""

from __future__ import annotations

import functools
import uuid
from dataclasses import replace
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from iop_fhir.api.bundles import Options, apply_transaction, check_transaction, references
from iop_fhir.errors import PermanentDeliveryError
from iop_fhir.formats import fhir_json
from iop_fhir.generate import generate_record
from iop_fhir.mappers.bundle import record_to_bundle, record_to_resources
from iop_fhir.mappers.ids import NAMESPACE
from iop_fhir.record import validate_record
from iop_fhir.server import create_app
from iop_fhir.store import Delivery, DeliveryState, Store
from iop_fhir.store.search_index import criterion, identifiers
from iop_fhir.sync.outgoing import delivery_bundle, identifier_search, store_identify

MRN = "https://iop.example/mrn"
STAFF = "https://iop.example/staff"
NOW = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
PATIENT_ID = "0d5c6f3e-8a34-4f1e-9a57-0b7c2a9d1e11"
PRACTITIONER_ID = "5b8e0e0a-3c2f-4e65-9d0a-7f4e2c1b9a22"


def delivery(resource: dict | None, *, number: int = 1, rtype: str | None = None, id: str | None = None, version: int = 1) -> Delivery:
    """A claimed delivery as the outbox hands it over (``resource`` None: a deletion)."""
    rtype = rtype or (resource or {})["resourceType"]
    id = id or (resource or {})["id"]
    return Delivery(
        id=number,
        destination="ehr",
        resource_type=rtype,
        resource_id=id,
        version_id=version,
        action="upsert" if resource is not None else "delete",
        patient_key=None,
        state=DeliveryState.IN_FLIGHT,
        attempts=1,
        created=NOW,
        next_attempt_at=NOW,
        lease_owner="w",
        lease_expires_at=NOW,
        last_error=None,
        data=fhir_json.dumps(resource) if resource is not None else None,
    )


def patient(id: str = PATIENT_ID, mrn: str = "1", family: str = "Rivera", **extra: Any) -> dict:
    return {
        "resourceType": "Patient",
        "id": id,
        "meta": {
            "versionId": "3",
            "lastUpdated": "2026-01-15T09:00:00.000000Z",
            "source": "urn:iop:gateway",
            "profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"],
            "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"}],
            "tag": [{"system": "https://iop.example/tags", "code": "iop"}],
        },
        "identifier": [{"value": "no-system"}, {"system": MRN, "value": mrn}],
        "name": [{"family": family}],
        **extra,
    }


def observation(id: str, *, subject: str = f"Patient/{PATIENT_ID}", **extra: Any) -> dict:
    return {
        "resourceType": "Observation",
        "id": id,
        "meta": {"versionId": "1", "lastUpdated": "2026-01-15T09:00:00.000000Z"},
        "identifier": [{"system": "https://iop.example/obs", "value": id}],
        "status": "final",
        "code": {"text": "PHQ-9"},
        "subject": {"reference": subject},
        **extra,
    }


def provenance(id: str, target: str) -> dict:
    return {
        "resourceType": "Provenance",
        "id": id,
        "meta": {"versionId": "1", "lastUpdated": "2026-01-15T09:00:00.000000Z"},
        "target": [{"reference": target}],
        "recorded": "2026-01-15T09:00:00Z",
        "agent": [{"who": {"display": "iop-fhir"}}],
    }


class Identities:
    """An ``identify`` that answers from a table and counts the questions."""

    def __init__(self, table: dict[tuple[str, str], tuple[str, str]] | None = None) -> None:
        self.table = table or {}
        self.asked: list[tuple[str, str]] = []

    def __call__(self, rtype: str, id: str) -> tuple[str, str] | None:
        self.asked.append((rtype, id))
        return self.table.get((rtype, id))


def collection(*entries: dict) -> dict:
    """A stored package Bundle (``Bundle/b-1``)."""
    return {"resourceType": "Bundle", "id": "b-1", "type": "collection", "entry": list(entries)}


def without_id(resource: dict) -> dict:
    return {k: v for k, v in resource.items() if k != "id"}


def requests_of(bundle: dict) -> list[tuple[str, str]]:
    return [(e["request"]["method"], e["request"]["url"]) for e in bundle.get("entry", ())]


# --- the rules ---------------------------------------------------------------------------------


def test_an_identified_resource_is_a_conditional_update_without_our_id_and_meta() -> None:
    bundle = delivery_bundle([delivery(patient())], Identities())
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction" and "id" not in bundle
    (entry,) = bundle["entry"]
    assert entry["request"] == {"method": "PUT", "url": "Patient?identifier=https://iop.example/mrn|1"}
    assert entry["fullUrl"] == f"urn:uuid:{PATIENT_ID}"
    sent = entry["resource"]
    assert "id" not in sent
    assert set(sent["meta"]) == {"profile", "security", "tag"}
    assert sent["identifier"] == patient()["identifier"]  # the systemless one skipped as the key, kept as data


def test_meta_with_only_our_elements_goes_entirely() -> None:
    (entry,) = delivery_bundle([delivery(observation("o-1"))], Identities())["entry"]
    assert "meta" not in entry["resource"]


def test_a_resource_without_identifier_is_put_under_its_own_id() -> None:
    prov = provenance("9f0a3d43-7f8b-4d7e-8c1e-111111111111", f"Patient/{PATIENT_ID}")
    (entry,) = delivery_bundle([delivery(prov)], Identities())["entry"]
    assert entry["request"] == {"method": "PUT", "url": f"Provenance/{prov['id']}"}
    assert entry["resource"]["id"] == prov["id"] and "meta" not in entry["resource"]


def test_only_the_last_version_of_a_resource_is_sent_where_its_last_delivery_stands() -> None:
    first = delivery(patient(family="Old"), number=1, version=1)
    obs = delivery(observation("o-1"), number=2)
    second = delivery(patient(family="New"), number=3, version=2)
    bundle = delivery_bundle([first, obs, second], Identities())
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == ["Observation", "Patient"]
    assert bundle["entry"][1]["resource"]["name"] == [{"family": "New"}]


def test_a_later_deletion_wins_over_an_earlier_version_and_a_later_version_over_a_deletion() -> None:
    identities = Identities({("Patient", PATIENT_ID): (MRN, "1")})
    gone = delivery_bundle([delivery(patient(), number=1), delivery(None, number=2, rtype="Patient", id=PATIENT_ID)], identities)
    assert requests_of(gone) == [("DELETE", "Patient?identifier=https://iop.example/mrn|1")]
    back = delivery_bundle([delivery(None, number=1, rtype="Patient", id=PATIENT_ID), delivery(patient(), number=2)], identities)
    assert requests_of(back) == [("PUT", "Patient?identifier=https://iop.example/mrn|1")]


def test_a_deletion_uses_the_identifier_identify_gives_else_the_id() -> None:
    identities = Identities({("Patient", PATIENT_ID): (MRN, "1")})
    bundle = delivery_bundle(
        [delivery(None, rtype="Patient", id=PATIENT_ID), delivery(None, number=2, rtype="Provenance", id="p-1")], identities
    )
    assert requests_of(bundle) == [
        ("DELETE", "Patient?identifier=https://iop.example/mrn|1"),
        ("DELETE", "Provenance/p-1"),
    ]
    assert bundle["entry"][0]["fullUrl"] == f"urn:uuid:{PATIENT_ID}"
    assert "resource" not in bundle["entry"][0]


def test_a_non_uuid_id_gets_a_name_based_urn() -> None:
    (entry,) = delivery_bundle([delivery(observation("obs-1"))], Identities())["entry"]
    assert entry["fullUrl"] == f"urn:uuid:{uuid.uuid5(NAMESPACE, 'Observation/obs-1')}"


def test_two_types_sharing_one_uuid_id_get_distinct_full_urls() -> None:
    bundle = delivery_bundle([delivery(patient()), delivery(observation(PATIENT_ID), number=2)], Identities())
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert urls[0] == f"urn:uuid:{PATIENT_ID}" and len(set(urls)) == 2


def test_references_inside_the_bundle_become_its_urns_others_conditional_or_left_alone() -> None:
    obs = observation(
        "o-1",
        performer=[
            {"reference": f"Practitioner/{PRACTITIONER_ID}"},  # not in the Bundle, identified
            {"reference": "Organization/unknown"},  # not in the Bundle, no identifier known
            {"reference": "https://other.example/fhir/Practitioner/7"},
            {"reference": "#lab"},
            {"reference": "urn:oid:1.2.3"},
            {"reference": "Organization?identifier=x|y"},
        ],
        contained=[{"resourceType": "Organization", "id": "lab", "partOf": {"reference": f"Practitioner/{PRACTITIONER_ID}"}}],
        hasMember=[{"reference": "Observation/o-2/_history/4"}],
    )
    identities = Identities({("Practitioner", PRACTITIONER_ID): (STAFF, "md 1/a")})
    bundle = delivery_bundle([delivery(obs), delivery(patient(), number=2), delivery(observation("o-2"), number=3)], identities)
    sent = bundle["entry"][0]["resource"]
    assert sent["subject"] == {"reference": f"urn:uuid:{PATIENT_ID}"}
    assert sent["hasMember"] == [{"reference": f"urn:uuid:{uuid.uuid5(NAMESPACE, 'Observation/o-2')}"}]
    conditional = "Practitioner?identifier=https://iop.example/staff|md%201/a"
    assert [p["reference"] for p in sent["performer"]] == [
        conditional,
        "Organization/unknown",
        "https://other.example/fhir/Practitioner/7",
        "#lab",
        "urn:oid:1.2.3",
        "Organization?identifier=x|y",
    ]
    assert sent["contained"][0]["partOf"] == {"reference": conditional}
    # each resource outside the Bundle is asked about once, however often it is referred to
    assert sorted(identities.asked) == [("Organization", "unknown"), ("Practitioner", PRACTITIONER_ID)]


def test_a_reference_to_a_type_the_destination_does_not_receive_is_logical() -> None:
    """A conditional reference the target cannot resolve would fail the whole transaction."""
    obs = observation("o-1", performer=[{"reference": f"Practitioner/{PRACTITIONER_ID}", "display": "Dr A"}])
    identities = Identities({("Practitioner", PRACTITIONER_ID): (STAFF, "md-1"), ("Patient", PATIENT_ID): (MRN, "1")})
    bundle = delivery_bundle([delivery(obs)], identities, receives=lambda rtype: rtype != "Practitioner")
    assert bundle["entry"][0]["resource"]["performer"] == [
        {"display": "Dr A", "type": "Practitioner", "identifier": {"system": STAFF, "value": "md-1"}}
    ]
    # the patient, a received type, stays a conditional reference
    assert bundle["entry"][0]["resource"]["subject"]["reference"].startswith("Patient?identifier=")


def test_a_reference_to_a_resource_the_bundle_deletes_is_conditional() -> None:
    identities = Identities({("Patient", PATIENT_ID): (MRN, "1")})
    bundle = delivery_bundle([delivery(None, rtype="Patient", id=PATIENT_ID), delivery(observation("o-1"), number=2)], identities)
    assert bundle["entry"][1]["resource"]["subject"] == {"reference": "Patient?identifier=https://iop.example/mrn|1"}


def test_the_delivery_data_is_not_changed() -> None:
    original = delivery(observation("o-1"))
    delivery_bundle([original, delivery(patient(), number=2)], Identities())
    assert fhir_json.loads(original.data or b"") == observation("o-1")


def test_a_stored_collection_bundle_contributes_its_entries_in_order() -> None:
    obs_id = "3c0f1d2e-1111-4a4a-8b8b-222222222222"
    package = {
        "resourceType": "Bundle",
        "id": "7e7e7e7e-0000-4000-8000-000000000001",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:uuid:{PATIENT_ID}", "resource": patient()},
            # a resource without an id takes it from its urn:uuid fullUrl; the reference by fullUrl counts
            {"fullUrl": f"urn:uuid:{obs_id}", "resource": without_id(observation(obs_id, subject=f"urn:uuid:{PATIENT_ID}"))},
        ],
    }
    bundle = delivery_bundle([delivery(observation("o-9"), number=1), delivery(package, number=2)], Identities())
    assert [e["fullUrl"] for e in bundle["entry"]] == [
        f"urn:uuid:{uuid.uuid5(NAMESPACE, 'Observation/o-9')}",
        f"urn:uuid:{PATIENT_ID}",
        f"urn:uuid:{obs_id}",
    ]
    assert requests_of(bundle)[2] == ("PUT", f"Observation?identifier=https://iop.example/obs|{obs_id}")
    assert bundle["entry"][0]["resource"]["subject"] == {"reference": f"urn:uuid:{PATIENT_ID}"}
    assert bundle["entry"][2]["resource"]["subject"] == {"reference": f"urn:uuid:{PATIENT_ID}"}


def test_a_package_resource_also_delivered_on_its_own_is_sent_once() -> None:
    package = collection({"fullUrl": f"urn:uuid:{PATIENT_ID}", "resource": patient(family="Package")})
    bundle = delivery_bundle([delivery(patient(family="Own"), number=1), delivery(package, number=2)], Identities())
    assert [e["resource"]["name"] for e in bundle["entry"]] == [[{"family": "Package"}]]


def test_a_deleted_package_sends_nothing() -> None:
    assert delivery_bundle([delivery(None, rtype="Bundle", id="b-1")], Identities()) == {"resourceType": "Bundle", "type": "transaction"}


def test_a_package_entry_without_any_id_is_a_permanent_failure() -> None:
    package = collection({"resource": {"resourceType": "Patient", "active": True}})
    with pytest.raises(PermanentDeliveryError, match=r"Bundle/b-1 \(delivery 4\): entry\[0\]"):
        delivery_bundle([delivery(package, number=4)], Identities())


def test_an_upsert_without_stored_content_is_a_permanent_failure_not_a_deletion() -> None:
    broken = replace(delivery(patient(), number=6), data=None)
    with pytest.raises(PermanentDeliveryError, match=rf"Patient/{PATIENT_ID} version 1 \(delivery 6\) has no stored content"):
        delivery_bundle([broken], Identities())


# Any text, backslashes included: an escaped backslash before the separator (``a\\|b``) is cut there.
_IDENTIFIER_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@given(_IDENTIFIER_TEXT, _IDENTIFIER_TEXT)
def test_identifier_search_reads_back_as_the_same_system_and_value(system: str, value: str) -> None:
    """Whatever the characters (``|``, ``,``, ``$``, ``\\``, ``/``, ``&``, ``%``, spaces), the search the
    gateway parses from the URL is exactly this identifier."""
    ((key, text),) = parse_qsl(identifier_search(system, value), keep_blank_values=True)
    assert key == "identifier"
    assert criterion("Patient", key, text).values == (system, value)


# --- store_identify ----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(f"sqlite:///{tmp_path / 'source.sqlite'}") as opened:
        yield opened


def test_store_identify_reads_the_current_version(store: Store) -> None:
    store.update("Patient", PATIENT_ID, patient(mrn="1"))
    store.update("Patient", PATIENT_ID, patient(mrn="2"))
    assert store_identify(store)("Patient", PATIENT_ID) == (MRN, "2")


def test_store_identify_reads_the_last_live_version_of_a_deleted_resource(store: Store) -> None:
    store.update("Patient", PATIENT_ID, patient(mrn="1"))
    store.update("Patient", PATIENT_ID, patient(mrn="2"))
    store.delete("Patient", PATIENT_ID)
    assert store_identify(store)("Patient", PATIENT_ID) == (MRN, "2")


def test_store_identify_knows_nothing_of_unknown_or_unidentified_resources(store: Store) -> None:
    store.update("Provenance", "p-1", provenance("p-1", f"Patient/{PATIENT_ID}"))
    identify = store_identify(store)
    assert identify("Patient", "nobody") is None
    assert identify("Provenance", "p-1") is None


# --- a real record, and our own gateway as the target --------------------------------------------


@functools.cache
def record_resources() -> tuple[dict, ...]:
    """A generated record's resources as the store keeps them: references are ``Type/id``."""
    resources = record_to_resources(validate_record(generate_record(0, 5)))
    types = {r["id"]: r["resourceType"] for r in resources}
    for resource in resources:
        for ref, _ in references(resource):
            if ref["reference"].startswith("urn:uuid:"):
                id = ref["reference"].removeprefix("urn:uuid:")
                ref["reference"] = f"{types[id]}/{id}"
    return tuple(resources)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_every_reference_out_is_an_entry_conditional_absolute_or_contained(data: st.DataObject) -> None:
    everything = record_resources()
    chosen = data.draw(st.lists(st.sampled_from(range(len(everything))), min_size=1, max_size=40))
    deleted = data.draw(st.sets(st.sampled_from(chosen)))
    table = {(r["resourceType"], r["id"]): identifiers(r)[0] for r in everything if identifiers(r)}
    deliveries = [
        delivery(None, number=n, rtype=everything[i]["resourceType"], id=everything[i]["id"])
        if i in deleted and n % 2
        else delivery(everything[i], number=n)
        for n, i in enumerate(chosen)
    ]
    bundle = delivery_bundle(deliveries, Identities(table))
    written = {e["fullUrl"] for e in bundle["entry"] if e["request"]["method"] == "PUT"}
    assert len({e["fullUrl"] for e in bundle["entry"]}) == len(bundle["entry"])
    conditional = {f"{rtype}?{identifier_search(*key)}" for (rtype, _), key in table.items()}
    for entry in bundle["entry"]:
        for ref, path in references(entry.get("resource")):
            text = ref["reference"]
            assert text in written or text in conditional or "://" in text or text.startswith("#"), (path, text)


def _stored_record(tmp_path: Path, seed: int = 3) -> Store:
    """A generated record stored as ``/iop/records`` stores it, every change queued for ``ehr``."""
    source = Store.open(f"sqlite:///{tmp_path / 'source.sqlite'}", router=lambda rtype, resource, key: ["ehr"])
    with source.unit() as uow:
        apply_transaction(uow, check_transaction(record_to_bundle(validate_record(generate_record(0, seed)))), Options())
    return source


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Store]:
    store = _stored_record(tmp_path)
    yield store
    store.close()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[FlaskClient]:
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'target.sqlite'}", "AUTH": "off"})
    app.testing = True
    yield app.test_client()


def post(client: FlaskClient, bundle: dict) -> dict:
    headers = {"Content-Type": "application/fhir+json", "Prefer": "return=minimal"}
    answer = client.post("/fhir", data=fhir_json.dumps(bundle), headers=headers)
    assert answer.status_code == 200, answer.get_data(as_text=True)[:2000]
    return answer.get_json()


def versions(answer: dict) -> list[tuple[str, str]]:
    return [(e["response"]["status"], e["response"].get("location", "")) for e in answer["entry"]]


def test_our_gateway_accepts_a_record_delivered_in_batches_and_a_repeat_changes_nothing(source: Store, target: FlaskClient) -> None:
    deliveries = source.outbox.list(destination="ehr", limit=10_000)
    identify = store_identify(source)
    batches = [deliveries[i : i + 20] for i in range(0, len(deliveries), 20)]
    assert len(batches) >= 3  # later batches refer to earlier ones by conditional references
    conditional_references = 0
    for batch in batches:
        bundle = delivery_bundle(batch, identify)
        conditional_references += sum("?identifier=" in ref["reference"] for ref, _ in references(bundle))
        first = post(target, bundle)
        assert {status for status, _ in versions(first)} == {"201 Created"}
        again = post(target, bundle)
        assert {status for status, _ in versions(again)} == {"200 OK"}
        assert [loc for _, loc in versions(again)] == [loc for _, loc in versions(first)]  # same ids, same versionIds
    assert conditional_references > 0
    # every resource arrived once, and references point at the target's own ids
    assert target.get("/fhir/Observation?_summary=count").get_json()["total"] == sum(d.resource_type == "Observation" for d in deliveries)
    (mine,) = source.search("Patient", count=1).entries
    key = identifiers(mine.resource)[0]
    found = target.get(f"/fhir/Patient?{identifier_search(*key)}").get_json()["entry"]
    (their_patient,) = [e["resource"] for e in found]
    assert their_patient["id"] != mine.id
    some = target.get("/fhir/Observation?_count=5").get_json()["entry"]
    assert {e["resource"]["subject"]["reference"] for e in some} == {f"Patient/{their_patient['id']}"}


def test_changes_and_deletions_after_the_first_delivery_arrive_once(source: Store, target: FlaskClient) -> None:
    identify = store_identify(source)
    first = source.outbox.list(destination="ehr", limit=10_000)
    post(target, delivery_bundle(first, identify))
    after = first[-1].id
    observations = source.search("Observation", count=3).entries
    changed = {**observations[0].resource, "status": "amended"}
    source.update("Observation", observations[0].id, changed)
    source.update("Observation", observations[0].id, {**changed, "status": "corrected"})
    source.delete("Observation", observations[1].id)
    later = source.outbox.list(destination="ehr", after_id=after)
    assert len(later) == 3
    bundle = delivery_bundle(later, identify)
    assert [e["request"]["method"] for e in bundle["entry"]] == ["PUT", "DELETE"]
    for _ in range(2):
        post(target, bundle)
    key = identifiers(observations[0].resource)[0]
    (updated,) = target.get(f"/fhir/Observation?{identifier_search(*key)}").get_json()["entry"]
    assert updated["resource"]["status"] == "corrected" and updated["resource"]["meta"]["versionId"] == "2"
    gone = identifiers(observations[1].resource)[0]
    assert "entry" not in target.get(f"/fhir/Observation?{identifier_search(*gone)}").get_json()
