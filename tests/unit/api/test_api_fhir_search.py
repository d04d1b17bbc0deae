"""FHIR REST search: parameters, result parameters, includes, paging, strictness; JSON and XML."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from flask.testing import FlaskClient
from test_api_fhir_support import BASE, FHIR_XML, JSON_HEADERS, example, example_resources, load

from iop_fhir.api.search import SUBSETTED
from iop_fhir.formats import fhir_json, fhir_xml
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.server import create_app

PATIENT = example("Patient")["id"]
PRESCRIBER = example("MedicationRequest")["requester"]["reference"]
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Iterator[FlaskClient]:
    """A client over one app holding the whole example record (read-only tests share it)."""
    logging.getLogger("iop_fhir.api.auth").setLevel(logging.ERROR)
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path_factory.mktemp('search') / 'g.sqlite'}", "AUTH": "off"})
    app.testing = True
    client = app.test_client()
    load(client)
    yield client


def search(client: FlaskClient, url: str, **headers: str) -> dict:
    response = client.get(url, headers=headers)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "searchset"
    return body


def matches(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", ()) if e["search"]["mode"] == "match"]


def modes(bundle: dict) -> list[tuple[str, str]]:
    return [(e["resource"]["resourceType"], e["search"]["mode"]) for e in bundle.get("entry", ())]


def link(bundle: dict, relation: str) -> str | None:
    return next((entry["url"] for entry in bundle["link"] if entry["relation"] == relation), None)


# --- parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "count"),
    [
        (f"patient=Patient/{PATIENT}", 7),
        (f"patient={PATIENT}", 7),
        (f"subject=Patient/{PATIENT}", 7),
        (f"subject:Patient={PATIENT}", 7),
        ("patient=Patient/someone-else", 0),
        ("status=active", 4),
        ("status:not=active", 3),
        ("status=active,stopped", 7),
        ("intent=order", 4),
        ("intent=plan", 3),
        (f"code={RXNORM}|312941", 3),
        ("code=995258", 2),
        ("authoredon=2026-01-05", 2),
        ("authoredon=ge2026-02", 3),
        ("authoredon=lt2026-01-19", 3),
        ("authoredon=gt2026-01-05&authoredon=le2026-01-19", 2),
        ("identifier=https://iop-fhir.org/fhir/sid/riverbend-iop/prescription|ep-2026-0042/rx-1", 1),
        ("_id=8dbd47a5-926e-5b25-9a3d-22d74b1cd614", 1),
        ("_lastUpdated=gt2000-01-01", 7),
        (f"requester={PRESCRIBER}", 7),
        ("category=community", 4),
        ("category=http://terminology.hl7.org/CodeSystem/medicationrequest-category|discharge", 3),
    ],
)
def test_medication_request_parameters(loaded, query, count):
    bundle = search(loaded, f"/fhir/MedicationRequest?{query}")
    assert bundle["total"] == count
    assert len(matches(bundle)) == count


@pytest.mark.parametrize(
    ("url", "count"),
    [
        ("/fhir/Patient?name=alv", 1),
        ("/fhir/Patient?family:exact=Alvarez", 1),
        ("/fhir/Patient?birthdate=1988", 1),
        ("/fhir/Patient?birthdate=lt1980", 0),
        ("/fhir/Patient?identifier=https://iop-fhir.org/fhir/sid/riverbend-iop/mrn|RB-100042", 1),
        (f"/fhir/Observation?patient=Patient/{PATIENT}", 18),
        ("/fhir/Observation?category=vital-signs", 3),
        ("/fhir/Observation?code=http://loinc.org|44249-1", 2),
        ("/fhir/Observation?date=2026-01-05", 8),
        ("/fhir/Observation?value-quantity=gt10", 3),
        ("/fhir/Observation?value-quantity=lt10&category=survey", 5),
        ("/fhir/Observation?value-quantity=72.5|http://unitsofmeasure.org|kg", 1),
        ("/fhir/Observation?status=final", 18),
        (f"/fhir/CarePlan?patient=Patient/{PATIENT}", 2),
        ("/fhir/CarePlan?status=active", 1),
        ("/fhir/CarePlan?date=ge2026-02-27", 1),
        ("/fhir/CarePlan?date=ap2026-02-27", 2),
        ("/fhir/Condition?clinical-status=active", 2),
        (f"/fhir/Encounter?patient={PATIENT}", 5),
        ("/fhir/EpisodeOfCare?status=finished", 1),
        (f"/fhir/Consent?patient={PATIENT}", 2),
    ],
)
def test_other_types_parameters(loaded, url, count):
    bundle = search(loaded, url)
    assert bundle["total"] == count
    assert len(matches(bundle)) == count


def test_entries_have_absolute_full_urls_and_match_mode(loaded):
    bundle = search(loaded, "/fhir/CarePlan")
    for entry in bundle["entry"]:
        assert entry["fullUrl"] == f"{BASE}/CarePlan/{entry['resource']['id']}"
        assert entry["search"] == {"mode": "match"}
    assert link(bundle, "self") == f"{BASE}/CarePlan"


def test_base_url_from_settings(make_app):
    app = make_app(BASE_URL="https://gateway.example/fhir/")
    client = app.test_client()
    id = client.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "male"}, headers=JSON_HEADERS).get_json()["id"]
    bundle = search(client, "/fhir/Patient")
    assert bundle["entry"][0]["fullUrl"] == f"https://gateway.example/fhir/Patient/{id}"
    assert link(bundle, "self") == "https://gateway.example/fhir/Patient"


def test_post_search_with_a_form(loaded):
    response = loaded.post(
        "/fhir/MedicationRequest/_search?status=active",
        data={"patient": f"Patient/{PATIENT}", "_count": "2"},
        headers={"Accept": "application/fhir+json"},
    )
    assert response.status_code == 200
    bundle = response.get_json()
    assert len(matches(bundle)) == 2
    assert parse_qs(urlsplit(link(bundle, "next")).query)["status"] == ["active"]
    assert loaded.post("/fhir/MedicationRequest/_search", data=b"{}", headers={"Content-Type": "application/json"}).status_code == 415


def test_search_in_xml(loaded):
    response = loaded.get(f"/fhir/MedicationRequest?patient={PATIENT}&_include=MedicationRequest:patient", headers={"Accept": FHIR_XML})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == f"{FHIR_XML}; charset=utf-8"
    bundle = fhir_xml.from_xml(response.data)
    assert bundle["total"] == 7
    assert modes(bundle).count(("Patient", "include")) == 1
    assert loaded.get("/fhir/Patient?_format=xml").data.startswith(b"<?xml")


# --- _include / _revinclude ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "included"),
    [
        ("/fhir/MedicationRequest?_include=MedicationRequest:patient", [("Patient", "include")]),
        ("/fhir/MedicationRequest?_include=MedicationRequest:subject", [("Patient", "include")]),
        ("/fhir/MedicationRequest?_include=MedicationRequest:subject:Patient", [("Patient", "include")]),
        ("/fhir/MedicationRequest?_include=MedicationRequest:subject:Group", []),
        ("/fhir/MedicationRequest?_include=MedicationRequest:requester", [("Practitioner", "include")]),
        (
            "/fhir/MedicationRequest?_include=MedicationRequest:patient&_include=MedicationRequest:requester",
            [("Patient", "include"), ("Practitioner", "include")],
        ),
        ("/fhir/MedicationRequest?_include=*", [("Patient", "include"), ("Practitioner", "include")]),
        ("/fhir/Observation?_include=Observation:patient", [("Patient", "include")]),
        ("/fhir/Observation?_include=Observation:subject", [("Patient", "include")]),
        ("/fhir/CarePlan?_include=CarePlan:patient", [("Patient", "include")]),
        ("/fhir/CarePlan?_include=CarePlan:subject", [("Patient", "include")]),
    ],
)
def test_include(loaded, url, included):
    bundle = search(loaded, url)
    found = modes(bundle)
    assert sorted(m for m in found if m[1] == "include") == included
    assert all(m[1] == "match" for m in found[: bundle["total"]])


def test_revinclude_on_patient(loaded):
    bundle = search(loaded, "/fhir/Patient?_revinclude=MedicationRequest:patient&_revinclude=CarePlan:subject")
    assert modes(bundle)[0] == ("Patient", "match")
    assert bundle["total"] == 1
    assert modes(bundle)[1:].count(("MedicationRequest", "include")) == 7
    assert modes(bundle)[1:].count(("CarePlan", "include")) == 2
    entry = bundle["entry"][1]
    assert entry["fullUrl"] == f"{BASE}/MedicationRequest/{entry['resource']['id']}"


def test_revinclude_of_provenance(loaded):
    bundle = search(loaded, "/fhir/MedicationRequest?_revinclude=Provenance:target&_id=8dbd47a5-926e-5b25-9a3d-22d74b1cd614")
    assert modes(bundle) == [("MedicationRequest", "match"), ("Provenance", "include")]


# --- result parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["_summary=count", "_count=0"])
def test_summary_count(loaded, query):
    bundle = search(loaded, f"/fhir/Observation?category=survey&{query}")
    assert bundle == {"resourceType": "Bundle", "type": "searchset", "total": 6, "link": [{"relation": "self", "url": f"{BASE}/Observation?category=survey&{query}"}]}


def test_elements_keep_the_listed_and_the_mandatory(loaded):
    bundle = search(loaded, "/fhir/MedicationRequest?_elements=status,medication&_include=MedicationRequest:patient")
    entry = next(e for e in bundle["entry"] if e["search"]["mode"] == "match")
    resource = entry["resource"]
    # intent and subject are mandatory (1..1), so they stay; medication[x] names its choice
    assert set(resource) == {"resourceType", "id", "meta", "status", "intent", "medicationCodeableConcept", "subject"}
    assert resource["meta"]["tag"] == [SUBSETTED]
    assert resource["meta"]["versionId"] == "1"
    included = next(e for e in bundle["entry"] if e["search"]["mode"] == "include")["resource"]
    assert "name" in included  # _elements shapes the matches only
    assert "_elements=status%2Cmedication" in link(bundle, "self")


def test_summary_true_keeps_summary_elements(loaded):
    resource = search(loaded, "/fhir/Patient?_summary=true")["entry"][0]["resource"]
    assert {"name", "gender", "birthDate", "identifier"} <= set(resource)
    assert "extension" not in resource
    assert resource["meta"]["tag"][-1] == SUBSETTED
    assert "text" not in search(loaded, "/fhir/Patient?_summary=data")["entry"][0]["resource"]
    assert "extension" in search(loaded, "/fhir/Patient?_summary=false")["entry"][0]["resource"]


def test_sort(loaded):
    ascending = search(loaded, "/fhir/MedicationRequest?_sort=authoredon")["entry"]
    dates = [e["resource"]["authoredOn"] for e in ascending]
    assert dates == sorted(dates)
    descending = search(loaded, "/fhir/MedicationRequest?_sort=-authoredon,_id")["entry"]
    assert [e["resource"]["authoredOn"] for e in descending] == sorted(dates, reverse=True)
    by_id = search(loaded, "/fhir/MedicationRequest?_sort=_id")["entry"]
    assert [e["resource"]["id"] for e in by_id] == sorted(e["resource"]["id"] for e in by_id)


def test_total_is_given_when_asked_or_free(loaded):
    paged = search(loaded, "/fhir/Observation?_count=5")
    assert "total" not in paged  # more pages: counting is not free
    assert search(loaded, "/fhir/Observation?_count=5&_total=accurate")["total"] == 18
    assert "total" not in search(loaded, "/fhir/CarePlan?_total=none")


def test_count_above_the_maximum_is_capped(make_app):
    app = make_app(MAX_COUNT=3, DEFAULT_COUNT=2)
    client = app.test_client()
    load(client, example_resources("CarePlan") + example_resources("Condition") + example_resources("MedicationRequest"))
    assert len(search(client, "/fhir/MedicationRequest")["entry"]) == 2
    assert len(search(client, "/fhir/MedicationRequest?_count=100")["entry"]) == 3


# --- unknown parameters --------------------------------------------------------------------------


def test_lenient_handling_ignores_unknown_parameters_and_says_so(loaded):
    bundle = search(loaded, "/fhir/CarePlan?shoe-size=42&status=active&_has:Goal:patient:status=x")
    assert matches(bundle) == ["663afe79-e46d-5f4f-9d2f-8bf519370095"]
    outcome = bundle["entry"][-1]
    assert outcome["search"] == {"mode": "outcome"}
    assert outcome["resource"]["resourceType"] == "OperationOutcome"
    assert [i["expression"] for i in outcome["resource"]["issue"]] == [["shoe-size"], ["_has:Goal:patient:status"]]
    assert {i["severity"] for i in outcome["resource"]["issue"]} == {"warning"}
    assert link(bundle, "self") == f"{BASE}/CarePlan?status=active"
    lenient = search(loaded, "/fhir/CarePlan?shoe-size=42", Prefer="handling=lenient")
    assert len(matches(lenient)) == 2


# --- paging --------------------------------------------------------------------------------------


def _follow(client: FlaskClient, url: str, between=lambda page: None) -> list[str]:
    """Every match id, following next links; ``between`` runs after each page."""
    seen: list[str] = []
    page_number = 0
    while url:
        bundle = search(client, url.removeprefix("http://localhost"))
        seen.extend(matches(bundle))
        between(page_number)
        page_number += 1
        url = link(bundle, "next")
    return seen


@pytest.mark.parametrize("sort", ["", "&_sort=-_lastUpdated", "&_sort=_id", "&_sort=-birthdate"])
def test_paging_stays_correct_while_data_changes(client, sort):
    originals = [
        client.post("/fhir/Patient", json={"resourceType": "Patient", "birthDate": f"19{50 + i}-01-01"}, headers=JSON_HEADERS).get_json()["id"]
        for i in range(10)
    ]
    added: list[str] = []

    def churn(page: int) -> None:
        if page < 3:
            response = client.post("/fhir/Patient", json={"resourceType": "Patient", "birthDate": f"20{10 + page}-01-01"}, headers=JSON_HEADERS)
            added.append(response.get_json()["id"])

    seen = _follow(client, f"/fhir/Patient?_count=3{sort}", churn)
    assert len(seen) == len(set(seen)), "a resource was served twice"
    assert set(originals) <= set(seen), "a resource that was there all along was skipped"
    assert set(seen) <= set(originals) | set(added)


def test_previous_links_walk_back(loaded):
    first = search(loaded, "/fhir/Observation?_count=4")
    assert link(first, "previous") is None
    second = search(loaded, link(first, "next").removeprefix("http://localhost"))
    back = search(loaded, link(second, "previous").removeprefix("http://localhost"))
    assert matches(back) == matches(first)
    assert parse_qs(urlsplit(link(second, "self")).query)["_count"] == ["4"]
    everything = _follow(loaded, "/fhir/Observation?_count=4")
    assert len(everything) == len(set(everything)) == 18


def test_deleted_resources_leave_search(client):
    resource = example("CarePlan")
    load(client, [resource])
    assert search(client, "/fhir/CarePlan")["total"] == 1
    client.delete(f"/fhir/CarePlan/{resource['id']}")
    assert search(client, "/fhir/CarePlan")["total"] == 0


def test_searchset_bundles_are_valid_r4(loaded):
    for url in [
        f"/fhir/MedicationRequest?patient={PATIENT}&_include=MedicationRequest:patient&_include=MedicationRequest:requester&shoe-size=1",
        "/fhir/Patient?_revinclude=MedicationRequest:patient&_elements=name",
        "/fhir/Observation?_count=3&_summary=true",
        "/fhir/CarePlan?_summary=count",
    ]:
        response = loaded.get(url)
        assert validate_resource(fhir_json.loads(response.data, exact_decimals=True)) == [], url
