"""Incremental pull from an EHR: cursors, paging, foreign resources made ours, echoes and
conflicts, Provenance, and no echo back to the source.

The EHR is :class:`FakeEhr`, an in-memory search API with the FhirClient's methods; paging
through ``next`` links is tested with the real FhirClient against ``responses``. The store
runs on SQLite, and on PostgreSQL when ``IOP_FHIR_TEST_POSTGRES_URL`` is set (the store
store fixtures, tests/store_fixtures.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iop_fhir.api.iop import save_records
from iop_fhir.errors import PermanentDeliveryError, TransientDeliveryError
from iop_fhir.mappers.ids import resource_id
from iop_fhir.record import IopRecord
from iop_fhir.store import Store
from iop_fhir.store.search_index import token_value
from iop_fhir.sync import reconcile
from iop_fhir.sync.destinations import Destination, Router
from iop_fhir.sync.pull import PullRefused, cursor_key, pull
from iop_fhir.terminology import SYNC, SYNC_SOURCE



JSON = dict[str, Any]
BASE = "http://ehr.example/fhir"
EHR_PATIENT = "p-77"
MRN = ("https://iop-fhir.org/fhir/sid/riverbend-iop/mrn", "RB-100042")
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EHR = Destination(name="ehr", kind="fhir", base_url=BASE)
OTHER = Destination(name="registry", kind="fhir", base_url="http://registry.example/fhir")


class FakeEhr:
    """An EHR's search API in memory, with the FhirClient's ``search`` (no paging: that is the
    client's job, tested below with the real one). Each resource keeps the EHR's own
    ``meta.lastUpdated``; ``fail`` makes a search of a type break after some resources."""

    def __init__(self) -> None:
        self.resources: dict[str, list[JSON]] = {}
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []
        self.fail: dict[str, tuple[int, Exception]] = {}
        self.stray: list[JSON] = []  # returned whatever the search asked, as a careless server might

    def add(self, resource: JSON, last_updated: str, version: str = "1") -> JSON:
        resource = {**resource, "meta": {"versionId": version, "lastUpdated": last_updated}}
        found = self.resources.setdefault(resource["resourceType"], [])
        found[:] = [r for r in found if r["id"] != resource["id"]] + [resource]
        return resource

    def search(self, resource_type: str, params: list[tuple[str, str]]) -> Iterator[JSON]:
        self.requests.append((resource_type, list(params)))
        query = dict(params)
        matches = [r for r in self.resources.get(resource_type, []) if self._matches(r, query)]
        matches.sort(key=lambda r: r["meta"]["lastUpdated"])
        for i, resource in enumerate(matches):
            if resource_type in self.fail and i == self.fail[resource_type][0]:
                raise self.fail[resource_type][1]
            yield copy.deepcopy(resource)
        yield from (copy.deepcopy(r) for r in self.stray if r["resourceType"] == resource_type)

    @staticmethod
    def _matches(resource: JSON, query: dict[str, str]) -> bool:
        if "identifier" in query:
            return any(f"{i['system']}|{i['value']}" == query["identifier"] for i in resource.get("identifier", []))
        subject = (resource.get("subject") or resource.get("patient") or {}).get("reference")
        since = query.get("_lastUpdated", "ge")[2:]
        return subject in (query["patient"], f"{BASE}/{query['patient']}") and resource["meta"]["lastUpdated"] >= since


@pytest.fixture
def ours(open_store: Callable[..., Store], example_record: IopRecord) -> Store:
    """Our store holding the example record, routing to the EHR and to another destination."""
    store = open_store(router=Router([EHR, OTHER]))
    save_records(store, [example_record])
    return store


@pytest.fixture
def ehr() -> FakeEhr:
    ehr = FakeEhr()
    ehr.add({"resourceType": "Patient", "id": EHR_PATIENT, "identifier": [{"system": MRN[0], "value": MRN[1]}]}, "2026-01-01T00:00:00Z")
    ehr.add(statement("ms-1"), "2026-02-01T10:00:00Z")
    ehr.add(order("mr-1"), "2026-02-01T09:00:00Z")
    ehr.add(dispense("md-1", "mr-1"), "2026-02-02T10:00:00+01:00")
    ehr.add(
        {
            "resourceType": "Condition",
            "id": "c-1",
            "subject": {"reference": f"Patient/{EHR_PATIENT}"},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10"}]},
        },
        "2026-01-20T08:00:00Z",
    )
    ehr.add(
        {
            "resourceType": "AllergyIntolerance",
            "id": "a-1",
            "patient": {"reference": f"{BASE}/Patient/{EHR_PATIENT}"},
            "code": {"text": "penicillin"},
        },
        "2026-01-21T08:00:00Z",
    )
    return ehr


def statement(fid: str, **changes: Any) -> JSON:
    return {
        "resourceType": "MedicationStatement",
        "id": fid,
        "identifier": [{"system": "http://ehr.example/statement", "value": fid}],
        "status": "active",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "314076", "display": "lisinopril 10 MG Oral Tablet"}]},
        "subject": {"reference": f"Patient/{EHR_PATIENT}"},
        "informationSource": {"reference": "Practitioner/dr-9"},
        "effectiveDateTime": "2025-11-01",
        "dosage": [{"text": "1 tablet by mouth daily"}],
        **changes,
    }


def order(fid: str) -> JSON:
    return {
        "resourceType": "MedicationRequest",
        "id": fid,
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "314076"}], "text": "lisinopril 10 MG Oral Tablet"},
        "subject": {"reference": f"Patient/{EHR_PATIENT}"},
        "requester": {"reference": "Practitioner/dr-9", "display": "Dr. Nine"},
        "authoredOn": "2025-10-30",
    }


def dispense(fid: str, order_id: str) -> JSON:
    return {
        "resourceType": "MedicationDispense",
        "id": fid,
        "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "314076"}]},
        "subject": {"reference": f"Patient/{EHR_PATIENT}"},
        "authorizingPrescription": [{"reference": f"MedicationRequest/{order_id}"}],
        "quantity": {"value": 30, "unit": "tablet"},
        "whenHandedOver": "2026-02-02T09:30:00Z",
    }


def our_id(resource_type: str, fid: str) -> str:
    return resource_id(resource_type, BASE, fid)


def echo_of(store: Store, reference: str, **changes: Any) -> JSON:
    """The EHR's copy of one of our resources: its ids and references, our identifier and content."""
    resource_type, rid = reference.split("/")
    copy_ = {k: v for k, v in store.read(resource_type, rid).resource.items() if k != "meta"}
    copy_.update(id="ehr-copy-1", subject={"reference": f"Patient/{EHR_PATIENT}"}, requester={"reference": "Practitioner/ehr-dr"})
    copy_.update(changes)
    return copy_


def rx2(store: Store) -> str:
    (found,) = store.search("MedicationRequest", [("identifier", "https://iop-fhir.org/fhir/sid/riverbend-iop/prescription|ep-2026-0042/rx-2")]).entries
    return found.reference


# --- the first pull --------------------------------------------------------------------------------


def test_first_pull_stores_each_foreign_resource_as_ours(ours: Store, ehr: FakeEhr) -> None:
    result = pull(ours, EHR, ehr, now=NOW)
    assert (result.patients, result.fetched, result.stored, result.unchanged, result.conflicts) == (1, 5, 5, 0, 0)
    assert {t: c.stored for t, c in result.by_type.items()} == {
        "MedicationRequest": 1, "MedicationStatement": 1, "MedicationDispense": 1, "Observation": 0, "Condition": 1, "AllergyIntolerance": 1,
    }  # fmt: skip
    patient = ours.search("Patient", [("identifier", f"{MRN[0]}|{MRN[1]}")]).entries[0].reference
    stored = ours.read("MedicationStatement", our_id("MedicationStatement", "ms-1")).resource
    assert stored["meta"]["source"] == f"{BASE}/MedicationStatement/ms-1"
    assert {"system": SYNC_SOURCE, "code": "ehr"} in stored["meta"]["tag"]
    assert stored["identifier"] == [{"system": "http://ehr.example/statement", "value": "ms-1"}]
    assert stored["subject"] == {"reference": patient}  # the EHR's patient is ours
    assert stored["informationSource"] == {"reference": f"{BASE}/Practitioner/dr-9"}  # not held here: absolute, followable
    # a reference to a resource pulled from the same EHR points at ours
    fill = ours.read("MedicationDispense", our_id("MedicationDispense", "md-1")).resource
    assert fill["authorizingPrescription"] == [{"reference": f"MedicationRequest/{our_id('MedicationRequest', 'mr-1')}"}]
    # an absolute reference to the EHR's patient is recognised too
    allergy = ours.read("AllergyIntolerance", our_id("AllergyIntolerance", "a-1")).resource
    assert allergy["patient"] == {"reference": patient}
    assert ours.search("AllergyIntolerance", [("patient", patient)]).entries  # searchable by patient


def test_the_ehr_is_searched_by_patient_and_last_updated_with_the_cursor(ours: Store, ehr: FakeEhr) -> None:
    pull(ours, EHR, ehr, now=NOW)
    patient_id = ours.search("Patient", [("identifier", f"{MRN[0]}|{MRN[1]}")]).entries[0].id
    assert ehr.requests[0] == ("Patient", [("identifier", f"{MRN[0]}|{MRN[1]}")])
    first = dict(ehr.requests[1][1])
    assert ehr.requests[1][0] == "MedicationRequest" and "_lastUpdated" not in first
    assert (first["patient"], first["_sort"], first["_count"]) == (f"Patient/{EHR_PATIENT}", "_lastUpdated", "100")
    # the cursor is the EHR's newest lastUpdated, as it wrote it
    assert ours.pull_cursor(cursor_key("ehr", patient_id), "MedicationDispense") == "2026-02-02T10:00:00+01:00"
    assert ours.pull_cursor(cursor_key("ehr", patient_id), "Observation") is None  # nothing seen yet
    ehr.requests.clear()
    pull(ours, EHR, ehr, now=NOW)
    again = {t: dict(p) for t, p in ehr.requests if t != "Patient"}
    assert again["MedicationStatement"]["_lastUpdated"] == "ge2026-02-01T10:00:00Z"
    assert "_lastUpdated" not in again["Observation"]


def test_a_second_pull_stores_nothing_new(ours: Store, ehr: FakeEhr) -> None:
    pull(ours, EHR, ehr, now=NOW)
    versions = ours.history(count=1, total=True).total
    queued = len(ours.outbox.list(limit=1000))
    again = pull(ours, EHR, ehr, now=NOW)
    # ge<cursor> reads the newest of each type again: it comes back unchanged
    assert (again.stored, again.conflicts) == (0, 0) and again.unchanged == again.fetched == 5
    assert ours.history(count=1, total=True).total == versions
    assert len(ours.outbox.list(limit=1000)) == queued


def test_a_change_at_the_ehr_is_pulled_as_a_new_version(ours: Store, ehr: FakeEhr) -> None:
    pull(ours, EHR, ehr, now=NOW)
    ehr.add(statement("ms-1", status="stopped"), "2026-02-10T10:00:00Z", version="2")
    result = pull(ours, EHR, ehr, now=NOW)
    assert result.stored == 1 and result.by_type["MedicationStatement"].stored == 1
    saved = ours.read("MedicationStatement", our_id("MedicationStatement", "ms-1"))
    assert (saved.version, saved.resource["status"]) == (2, "stopped")
    provenances = [p.resource for p in ours.search("Provenance", [("target", saved.reference)]).entries]
    latest = next(p for p in provenances if p["target"] == [{"reference": saved.location}])
    assert latest["activity"]["coding"][0]["code"] == "UPDATE"
    assert latest["entity"] == [{"role": "source", "what": {"reference": f"{BASE}/MedicationStatement/ms-1/_history/2"}}]


# --- failures ------------------------------------------------------------------------------------


def test_a_failed_pull_keeps_its_cursor_and_resumes(ours: Store, ehr: FakeEhr) -> None:
    ehr.add(statement("ms-2"), "2026-02-03T10:00:00Z")
    ehr.fail["MedicationStatement"] = (1, TransientDeliveryError("ehr: GET ... answered 503"))
    with pytest.raises(TransientDeliveryError):
        pull(ours, EHR, ehr, now=NOW)
    patient_id = ours.search("Patient", [("identifier", f"{MRN[0]}|{MRN[1]}")]).entries[0].id
    # the type before the failure is stored with its cursor; the failed one has neither
    assert ours.pull_cursor(cursor_key("ehr", patient_id), "MedicationRequest") == "2026-02-01T09:00:00Z"
    assert ours.pull_cursor(cursor_key("ehr", patient_id), "MedicationStatement") is None
    assert ours.count("MedicationStatement") == 0
    del ehr.fail["MedicationStatement"]
    resumed = pull(ours, EHR, ehr, now=NOW)
    assert resumed.by_type["MedicationStatement"].stored == 2 and resumed.by_type["MedicationRequest"].unchanged == 1
    assert ours.pull_cursor(cursor_key("ehr", patient_id), "MedicationStatement") == "2026-02-03T10:00:00Z"


def test_a_refused_search_is_reported_and_the_pull_goes_on(ours: Store, ehr: FakeEhr) -> None:
    ehr.fail["AllergyIntolerance"] = (0, PermanentDeliveryError("ehr: GET .../AllergyIntolerance answered 403 Forbidden"))
    result = pull(ours, EHR, ehr, now=NOW)
    assert result.stored == 4
    (issue,) = result.errors
    assert issue.location == f"AllergyIntolerance?patient=Patient/{EHR_PATIENT}" and "403" in issue.message


def test_a_patient_unknown_or_ambiguous_at_the_ehr(ours: Store, ehr: FakeEhr) -> None:
    ehr.resources["Patient"].append({**ehr.resources["Patient"][0], "id": "p-78"})
    result = pull(ours, EHR, ehr, now=NOW)
    assert result.patients == 0 and result.fetched == 0
    assert [(i.severity, i.code) for i in result.reported] == [("warning", "multiple-matches"), ("information", "not-found")]


def test_an_invalid_foreign_resource_is_reported_and_skipped(ours: Store, ehr: FakeEhr) -> None:
    ehr.add(statement("ms-bad", status="taking-it-sometimes"), "2026-02-04T10:00:00Z")
    result = pull(ours, EHR, ehr, now=NOW)
    assert result.by_type["MedicationStatement"].stored == 1 and result.by_type["MedicationStatement"].skipped == 1
    (issue,) = result.errors
    assert issue.location == "MedicationStatement.status"
    assert f"{BASE}/MedicationStatement/ms-bad" in issue.message and "not stored" in issue.message
    with pytest.raises(Exception):
        ours.read("MedicationStatement", our_id("MedicationStatement", "ms-bad"))


def test_another_patients_resource_is_not_filed_under_ours(ours: Store, ehr: FakeEhr) -> None:
    ehr.stray.append(statement("ms-9", subject={"reference": "Patient/p-99"}) | {"meta": {"lastUpdated": "2026-02-01T11:00:00Z"}})
    result = pull(ours, EHR, ehr, now=NOW)
    assert result.by_type["MedicationStatement"].skipped == 1 and result.by_type["MedicationStatement"].stored == 1
    assert any("not about Patient/p-77" in i.message for i in result.reported)
    assert ours.count("MedicationStatement") == 1


def test_what_the_outside_medication_list_cannot_read_is_a_warning(ours: Store, ehr: FakeEhr) -> None:
    ehr.add(statement("ms-3", medicationCodeableConcept={"text": "fish oil"}), "2026-02-05T10:00:00Z")
    result = pull(ours, EHR, ehr, now=NOW)
    assert result.by_type["MedicationStatement"].stored == 2 and not result.errors  # stored all the same
    warnings = [i for i in result.reported if i.severity == "warning"]
    assert any("RxNorm" in i.message and i.location.startswith("MedicationStatement/") for i in warnings)


def test_only_fhir_destinations_are_pulled(ours: Store, ehr: FakeEhr) -> None:
    pharmacy = Destination(name="pharmacy", kind="ncpdp", base_url="http://pharmacy.example", ncpdp_id="1234567")
    with pytest.raises(PullRefused, match="only FHIR servers"):
        pull(ours, pharmacy, ehr)
    with pytest.raises(PullRefused, match="disabled"):
        pull(ours, Destination(name="ehr", kind="fhir", base_url=BASE, enabled=False), ehr)
    assert ehr.requests == []


def test_patients_outside_the_destinations_scope_are_not_pulled(ours: Store, ehr: FakeEhr) -> None:
    elsewhere = Destination(name="ehr", kind="fhir", base_url=BASE, programs=frozenset({"https://other.example/sid"}))
    assert pull(ours, elsewhere, ehr).patients == 0 and ehr.requests == []


# --- echoes of what we delivered -----------------------------------------------------------------


def test_an_echo_without_change_stores_nothing(ours: Store, ehr: FakeEhr) -> None:
    ehr.add(echo_of(ours, rx2(ours)), "2026-02-06T10:00:00Z")
    result = pull(ours, EHR, ehr, now=NOW)
    assert result.by_type["MedicationRequest"].unchanged == 1 and result.conflicts == 0
    assert ours.count("MedicationRequest", [("_tag", f"{SYNC_SOURCE}|ehr")]) == 1  # only mr-1
    assert ours.count("Task", [("code", f"{SYNC}|reconcile-conflict")]) == 0


def test_an_echo_with_a_change_raises_one_conflict_task_and_overwrites_nothing(ours: Store, ehr: FakeEhr) -> None:
    reference = rx2(ours)
    before = ours.read(*reference.split("/"))
    ehr.add(echo_of(ours, reference, status="stopped"), "2026-02-06T10:00:00Z", version="4")
    result = pull(ours, EHR, ehr, now=NOW)
    assert result.conflicts == 1 and result.by_type["MedicationRequest"].conflicts == 1
    assert ours.read(*reference.split("/")).version == before.version  # not overwritten
    (saved,) = ours.search("Task", [("code", f"{SYNC}|reconcile-conflict")]).entries
    task = saved.resource
    assert (task["status"], task["intent"]) == ("requested", "proposal")
    assert task["focus"] == {"reference": reference}
    assert task["for"] == {"reference": before.resource["subject"]["reference"]}
    assert "status" in task["description"] and "dosageInstruction" not in task["description"]
    assert task["identifier"] == [{"system": reconcile.CONFLICT_SYSTEM, "value": "ehr/MedicationRequest/ehr-copy-1/4"}]
    inputs = {i["type"]["coding"][0]["code"]: i for i in task["input"]}
    assert inputs["source-url"]["valueUrl"] == f"{BASE}/MedicationRequest/ehr-copy-1"
    assert inputs["source-version"]["valueString"] == "4"
    assert inputs["source-last-updated"]["valueInstant"] == "2026-02-06T10:00:00Z"
    assert ours.outbox.list(resource=("Task", saved.id)) == []  # a work item here, delivered nowhere
    # pulled again (ge the cursor reads it again): still one Task, still one version
    again = pull(ours, EHR, ehr, now=NOW)
    assert again.conflicts == 0
    assert ours.count("Task", [("code", f"{SYNC}|reconcile-conflict")]) == 1 and ours.read("Task", saved.id).version == 1


def test_an_echo_of_something_not_held_here_is_reported(ours: Store, ehr: FakeEhr) -> None:
    ghost = order("ghost") | {"identifier": [{"system": "https://iop-fhir.org/fhir/sid/riverbend-iop/prescription", "value": "ep-9/rx-9"}]}
    ehr.add(ghost, "2026-02-06T10:00:00Z")
    result = pull(ours, EHR, ehr, now=NOW)
    assert result.by_type["MedicationRequest"].skipped == 1
    assert any(i.code == "not-found" and "ep-9/rx-9" in i.message for i in result.reported)


# --- provenance and routing ----------------------------------------------------------------------


def test_one_provenance_per_batch_names_the_source(ours: Store, ehr: FakeEhr) -> None:
    ehr.add(statement("ms-2"), "2026-02-03T10:00:00Z", version="3")
    pull(ours, EHR, ehr, now=NOW)
    stored = sorted(ours.read("MedicationStatement", our_id("MedicationStatement", f)).location for f in ("ms-1", "ms-2"))
    (provenance,) = [p.resource for p in ours.search("Provenance", [("target", stored[0].rsplit("/_history", 1)[0])]).entries]
    assert [t["reference"] for t in provenance["target"]] == stored
    assert provenance["recorded"] == "2026-03-01T12:00:00.000000Z"
    assert provenance["activity"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE", "display": "create",
    }  # fmt: skip
    assert provenance["agent"][0]["who"] == {"display": f"ehr ({BASE})"}
    assert provenance["agent"][0]["type"]["coding"][0]["code"] == "custodian"
    assert {e["what"]["reference"] for e in provenance["entity"]} == {
        f"{BASE}/MedicationStatement/ms-1/_history/1", f"{BASE}/MedicationStatement/ms-2/_history/3",
    }  # fmt: skip
    assert all(e["role"] == "source" for e in provenance["entity"])


def test_pulled_data_never_goes_back_to_its_source(ours: Store, ehr: FakeEhr) -> None:
    pull(ours, EHR, ehr, now=NOW)
    pulled = ours.search("MedicationStatement", [("_tag", f"{SYNC_SOURCE}|ehr")]).entries[0]
    deliveries = ours.outbox.list(resource=("MedicationStatement", pulled.id))
    assert [d.destination for d in deliveries] == ["registry"]  # the router would say both
    for provenance in ours.search("Provenance", [("target", pulled.reference)]).entries:
        assert [d.destination for d in ours.outbox.list(resource=("Provenance", provenance.id))] == ["registry"]


# --- paging with the real client -----------------------------------------------------------------


def test_next_links_are_followed_page_by_page(ours: Store) -> None:
    fhir_client = pytest.importorskip("iop_fhir.sync.fhir_client", reason="the FHIR client (sync/fhir_client.py) is not importable")
    responses = pytest.importorskip("responses")

    def page(resources: list[JSON], next_url: str | None) -> JSON:
        bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
        return bundle | ({"link": [{"relation": "next", "url": next_url}]} if next_url else {})

    first = [dict(statement(f"ms-{i}"), meta={"lastUpdated": f"2026-02-0{i}T10:00:00Z"}) for i in (1, 2)]
    second = [dict(statement("ms-3"), meta={"lastUpdated": "2026-02-03T10:00:00Z"})]
    patients = page([{"resourceType": "Patient", "id": EHR_PATIENT}], None)
    only_statements = Destination(name="ehr", kind="fhir", base_url=BASE, pull_resources=("MedicationStatement",))
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/Patient", json=patients)
        mock.get(f"{BASE}/MedicationStatement", json=page(first, f"{BASE}/MedicationStatement?page=2"))
        mock.get(f"{BASE}/MedicationStatement?page=2", json=page(second, None))
        with fhir_client.FhirClient(only_statements) as client:
            result = pull(ours, only_statements, client, now=NOW)
    assert result.by_type["MedicationStatement"].stored == 3
    patient_id = ours.search("Patient", [("identifier", f"{MRN[0]}|{MRN[1]}")]).entries[0].id
    assert ours.pull_cursor(cursor_key("ehr", patient_id), "MedicationStatement") == "2026-02-03T10:00:00Z"


# --- what counts as a clinical change ------------------------------------------------------------

references = st.text(alphabet="abcdefghijk/-0123456789", min_size=1, max_size=12)


@given(
    dose=st.decimals(min_value=0, max_value=1000, places=2, allow_nan=False),
    display=st.text(max_size=20),
    subject=references,
    extra_identifier=st.booleans(),
)
def test_what_another_server_rewrites_is_no_clinical_change(dose, display, subject, extra_identifier) -> None:
    ours = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "identifier": [{"system": "https://iop-fhir.org/fhir/sid/p/prescription", "value": "e/rx"}],
        "subject": {"reference": "Patient/ours"},
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "312941", "display": "sertraline"}]},
        "dosageInstruction": [{"doseAndRate": [{"doseQuantity": {"value": dose, "unit": "mg"}}], "timing": {"event": ["2026-01-05T10:00:00Z"]}}],
    }
    theirs = copy.deepcopy(ours) | {"id": "x", "meta": {"versionId": "9"}, "text": {"status": "generated", "div": "<div/>"}}
    theirs["subject"] = {"reference": subject}
    theirs["medicationCodeableConcept"]["coding"][0]["display"] = display
    theirs["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] = float(dose)  # 1.50 -> 1.5
    theirs["dosageInstruction"][0]["timing"]["event"] = ["2026-01-05T05:00:00-05:00"]  # the same instant
    if extra_identifier:
        theirs["identifier"].append({"system": "http://ehr.example/rx", "value": "77"})
    assert reconcile.clinical_differences(ours, theirs) == []
    changed = copy.deepcopy(theirs)
    changed["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] = float(dose) + 1
    assert reconcile.clinical_differences(ours, changed) == ["dosageInstruction"]


@pytest.mark.parametrize("value", ["RB-1", "RB,1", "a|b", "$x", "c\\d", "ends\\", "\\|,"])
def test_identifier_searches_escape_fhir_separators(open_store: Callable[..., Store], value: str) -> None:
    store = open_store()
    saved = store.create({"resourceType": "Patient", "identifier": [{"system": "http://x.example/mrn", "value": value}]})
    found = store.search("Patient", [("identifier", token_value("http://x.example/mrn", value))]).entries
    assert [s.id for s in found] == [saved.id]
