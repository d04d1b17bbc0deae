"""Search: token, string, date, reference and quantity semantics, sorting, paging, counting."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest

from iop_fhir.store import InvalidSearch, Store, search_parameters
from iop_fhir.store.search_index import date_range, index_rows

LOINC = "http://loinc.org"
RX = "http://www.nlm.nih.gov/research/umls/rxnorm"
MRN = "https://iop.example/mrn"


def ids(store: Store, resource_type: str, params, **kwargs) -> list[str]:
    return [e.id for e in store.search(resource_type, params, count=100, **kwargs).entries]


def ids_set(store: Store, resource_type: str, params) -> set[str]:
    return set(ids(store, resource_type, params))


def observation(id: str, patient: str, code: str, when: object, value: str | None = None, **extra) -> dict:
    obs = {
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}]}
        ],
        "code": {"coding": [{"system": LOINC, "code": code}], "text": "score"},
        "subject": {"reference": patient},
        **extra,
    }
    if isinstance(when, dict):
        obs["effectivePeriod"] = when
    elif when:
        obs["effectiveDateTime"] = when
    if value is not None:
        obs["valueQuantity"] = {"value": Decimal(value), "system": "http://unitsofmeasure.org", "code": "mg"}
    return obs


@pytest.fixture
def loaded(store: Store) -> Store:
    for id, family, given, birth in [
        ("p1", "Müller", "Ann", "1980-02-03"),
        ("p2", "Muller", "Bo", "1975"),
        ("p3", "Rivera", "Müll", "1990-06"),
    ]:
        store.update(
            "Patient",
            id,
            {
                "resourceType": "Patient",
                "identifier": [{"system": MRN, "value": id.upper()}, {"value": f"local-{id}"}],
                "active": id != "p3",
                "gender": "female",
                "name": [{"family": family, "given": [given]}],
                "birthDate": birth,
            },
        )
    for obs in [
        observation("o1", "Patient/p1", "44249-1", "2026-01-15T10:00:00Z", "5.4"),
        observation("o2", "Patient/p1", "70274-6", "2026-01-20T23:30:00-05:00", "12"),
        observation("o3", "Patient/p2", "44249-1", {"start": "2026-01-10", "end": "2026-02-05"}, "0.25"),
        observation("o4", "http://other.example/fhir/Patient/p2", "44249-1", "2025-12-31"),
        observation("o5", "Group/g1", "44249-1", "2026-03"),
        observation("o6", "Patient/p3", "urine", None, status="preliminary"),
    ]:
        store.update("Observation", obs["id"], obs)
    return store


def test_token_forms(loaded: Store) -> None:
    assert ids_set(loaded, "Observation", [("code", f"{LOINC}|44249-1")]) == {"o1", "o3", "o4", "o5"}
    assert ids_set(loaded, "Observation", [("code", "44249-1")]) == {"o1", "o3", "o4", "o5"}
    assert ids_set(loaded, "Observation", [("code", "http://other|44249-1")]) == set()
    assert ids_set(loaded, "Observation", [("code", f"{LOINC}|")]) == {"o1", "o2", "o3", "o4", "o5", "o6"}
    assert ids_set(loaded, "Patient", [("identifier", "|local-p1")]) == {"p1"}  # no system
    assert ids_set(loaded, "Patient", [("identifier", "|P1")]) == set()  # that one has a system
    assert ids_set(loaded, "Patient", [("identifier", f"{MRN}|P2")]) == {"p2"}
    assert ids_set(loaded, "Observation", [("code", "70274-6,urine")]) == {"o2", "o6"}  # OR
    assert ids_set(loaded, "Observation", [("code", "44249-1"), ("patient", "p2")]) == {"o3", "o4"}  # AND
    assert ids_set(loaded, "Observation", [("status:not", "final")]) == {"o6"}
    assert ids_set(loaded, "Observation", [("status", "FINAL")]) == set()  # tokens are case-sensitive
    assert ids_set(loaded, "Patient", [("active", "false")]) == {"p3"}
    assert ids_set(loaded, "Patient", [("_id", "p1,p3")]) == {"p1", "p3"}
    assert ids_set(loaded, "Observation", [("category", "survey")]) == {"o1", "o2", "o3", "o4", "o5", "o6"}


def test_string_starts_with_ignoring_case_and_accents(loaded: Store) -> None:
    assert ids_set(loaded, "Patient", [("family", "mul")]) == {"p1", "p2"}
    assert ids_set(loaded, "Patient", [("family", "MÜLLER")]) == {"p1", "p2"}
    assert ids_set(loaded, "Patient", [("name", "mull")]) == {"p1", "p2", "p3"}  # any part of the name
    assert ids_set(loaded, "Patient", [("name", "ller")]) == set()
    assert ids_set(loaded, "Patient", [("name:contains", "ller")]) == {"p1", "p2"}
    assert ids_set(loaded, "Patient", [("family:exact", "Müller")]) == {"p1"}
    assert ids_set(loaded, "Patient", [("family:exact", "müller")]) == set()
    assert ids_set(loaded, "Patient", [("given", "an,bo")]) == {"p1", "p2"}
    assert ids_set(loaded, "Patient", [("name", "50%")]) == set()  # LIKE wildcards are literal


DATE_CASES = [
    ("2026", {"o1", "o2", "o3", "o5"}),  # o3's period runs into February: still 2026
    ("2026-01", {"o1", "o2"}),  # o3 (Jan 10 - Feb 5) is not within January
    ("2026-01-15", {"o1"}),
    ("eq2026-01-21", {"o2"}),  # 23:30 at -05:00 is Jan 21 in UTC
    ("2026-01-15T10:00", {"o1"}),
    ("2026-01-15T10:00:00Z", {"o1"}),
    ("2026-01-15T11:00:00+01:00", {"o1"}),
    ("ne2026-01", {"o3", "o4", "o5"}),
    ("gt2026-01-15", {"o2", "o3", "o5"}),
    ("ge2026-01-15", {"o1", "o2", "o3", "o5"}),
    ("lt2026-01-15", {"o3", "o4"}),
    ("le2026-01-15", {"o1", "o3", "o4"}),
    ("sa2026-01-15", {"o2", "o5"}),
    ("eb2026-01-15", {"o4"}),
    ("ap2026-02-01", {"o3"}),
    ("lt2026-01-01,ge2026-03", {"o4", "o5"}),
]


def test_date_prefixes_and_partial_dates(loaded: Store) -> None:
    # one loaded store for the whole table: the cases only read
    got = {value: ids_set(loaded, "Observation", [("date", value)]) for value, _ in DATE_CASES}
    assert got == dict(DATE_CASES)


def test_date_ranges_of_partial_values() -> None:
    low, high = date_range("2026")
    assert (date_range("2026-01-01")[0], date_range("2026-12-31")[1]) == (low, high)
    assert date_range("2026-02")[1] + 1 == date_range("2026-03-01")[0]
    tenth = date_range("2026-01-15T10:00:00.5Z")
    assert tenth[1] - tenth[0] == 99_999
    assert date_range("9999") is not None and date_range("2026-13") is None and date_range("soon") is None


def test_date_and_lastupdated_on_patients(loaded: Store, clock) -> None:
    assert ids_set(loaded, "Patient", [("birthdate", "1980")]) == {"p1"}
    assert ids_set(loaded, "Patient", [("birthdate", "lt1980-01-01")]) == {"p2"}
    assert ids_set(loaded, "Patient", [("birthdate", "ge1990-06-15")]) == {"p3"}  # "1990-06" overlaps, ends after
    middle = loaded.read("Patient", "p2").last_updated
    assert ids_set(loaded, "Patient", [("_lastUpdated", f"gt{middle.isoformat()}")]) == {"p3"}
    assert ids_set(loaded, "Patient", [("_lastUpdated", f"le{middle.isoformat()}")]) == {"p1", "p2"}
    assert ids_set(loaded, "Patient", [("_lastUpdated", "2026-01")]) == {"p1", "p2", "p3"}


def test_reference_forms(loaded: Store) -> None:
    assert ids_set(loaded, "Observation", [("patient", "Patient/p1")]) == {"o1", "o2"}
    assert ids_set(loaded, "Observation", [("patient", "p1")]) == {"o1", "o2"}
    assert ids_set(loaded, "Observation", [("patient", "http://gw.example/fhir/Patient/p2")]) == {"o3", "o4"}
    assert ids_set(loaded, "Observation", [("patient", "g1")]) == set()  # a Group is no patient
    assert ids_set(loaded, "Observation", [("subject", "g1")]) == {"o5"}
    assert ids_set(loaded, "Observation", [("subject", "Group/g1")]) == {"o5"}
    assert ids_set(loaded, "Observation", [("subject:Group", "g1")]) == {"o5"}
    assert ids_set(loaded, "Observation", [("subject:Patient", "g1")]) == set()
    assert ids_set(loaded, "Observation", [("patient", "Patient/p1,Patient/p3")]) == {"o1", "o2", "o6"}


QUANTITY_CASES = [
    ("5.4", {"o1"}),
    ("5", {"o1"}),  # 5 means [4.5, 5.5)
    ("5.40", {"o1"}),  # [5.395, 5.405)
    ("5.41", set()),
    ("gt5.4", {"o2"}),
    ("ge5.4", {"o1", "o2"}),
    ("lt1", {"o3"}),
    ("le12", {"o1", "o2", "o3"}),
    ("ne5.4", {"o2", "o3"}),
    ("ap12.5", {"o2"}),
    ("5.4|http://unitsofmeasure.org|mg", {"o1"}),
    ("5.4||mg", {"o1"}),
    ("5.4|http://unitsofmeasure.org|g", set()),
    ("0.25,12", {"o2", "o3"}),
]


def test_quantity(loaded: Store) -> None:
    got = {value: ids_set(loaded, "Observation", [("value-quantity", value)]) for value, _ in QUANTITY_CASES}
    assert got == dict(QUANTITY_CASES)


def test_missing(loaded: Store) -> None:
    assert ids_set(loaded, "Observation", [("date:missing", "true")]) == {"o6"}
    assert ids_set(loaded, "Observation", [("value-quantity:missing", "false")]) == {"o1", "o2", "o3"}


BAD_SEARCHES = [
    [("nonsense", "1")],
    [("name:exact", "x")],  # Observation has no name
    [("code:exact", "x")],
    [("date", "yesterday")],
    [("date", "")],
    [("value-quantity", "lots")],
    [("value-quantity", "5|mg")],
    [("status:missing", "maybe")],
]


def test_bad_searches_are_client_errors(loaded: Store) -> None:
    for params in BAD_SEARCHES:
        with pytest.raises(InvalidSearch) as caught:
            loaded.search("Observation", params)
        assert caught.value.status == 400 and caught.value.issues[0].location, params


def test_match_ids_answer_what_search_finds_up_to_the_limit(loaded: Store) -> None:
    """A conditional write's match: the same filter as search, ids only, no page."""
    for params in ([("patient", "Patient/p1")], [("code", "44249-1")], [("identifier", f"{MRN}|P2")], [("patient", "p9")]):
        resource_type = "Patient" if params[0][0] == "identifier" else "Observation"
        found = loaded.match_ids(resource_type, params, limit=10)
        assert sorted(found) == sorted(ids(loaded, resource_type, params)), params
    assert len(loaded.match_ids("Observation", [("code", "44249-1")])) == 2  # of 4: enough to say "several"
    loaded.delete("Observation", "o2")
    assert loaded.match_ids("Observation", [("patient", "Patient/p1")]) == ["o1"]
    with loaded.unit() as uow:
        assert uow.match_ids("Observation", [("patient", "Patient/p1")]) == ["o1"]
    for params in BAD_SEARCHES:
        with pytest.raises(InvalidSearch):
            loaded.match_ids("Observation", params)


def test_sort(loaded: Store) -> None:
    assert ids(loaded, "Observation", [("code", "44249-1")]) == ["o1", "o3", "o4", "o5"]  # by _lastUpdated
    assert ids(loaded, "Observation", [], sort="date") == ["o4", "o3", "o1", "o2", "o5", "o6"]  # missing last
    assert ids(loaded, "Observation", [], sort="-date") == ["o5", "o3", "o2", "o1", "o4", "o6"]
    assert ids(loaded, "Observation", [], sort=["-_lastUpdated"]) == ["o6", "o5", "o4", "o3", "o2", "o1"]
    assert ids(loaded, "Patient", [], sort="-_id") == ["p3", "p2", "p1"]
    assert ids(loaded, "Patient", [], sort="birthdate") == ["p2", "p1", "p3"]
    with pytest.raises(InvalidSearch):
        loaded.search("Patient", sort="name")


@pytest.mark.parametrize("sort", [None, "-date", "date,-_id"])
def test_paging_forward_and_back(loaded: Store, sort) -> None:
    everything = ids(loaded, "Observation", [], sort=sort)
    page = loaded.search("Observation", count=2, sort=sort, total=True)
    assert page.total == 6 and page.prev_cursor is None
    pages = [[e.id for e in page.entries]]
    while page.next_cursor:
        page = loaded.search("Observation", count=2, sort=sort, cursor=page.next_cursor)
        pages.append([e.id for e in page.entries])
    assert [i for page_ids in pages for i in page_ids] == everything and len(pages) == 3
    back = []
    while page.prev_cursor:
        page = loaded.search("Observation", count=2, sort=sort, cursor=page.prev_cursor)
        back.insert(0, [e.id for e in page.entries])
    assert back == pages[:-1]


def test_paging_is_stable_while_data_changes(loaded: Store) -> None:
    before = ids(loaded, "Observation", [])
    seen: list[str] = []
    page = loaded.search("Observation", count=2)
    n = 0
    while True:
        seen += [e.id for e in page.entries]
        # between pages: new resources arrive, and one already shown is deleted
        loaded.create(observation(f"new{n}", "Patient/p9", "1-1", "2026-01-01"))
        if n == 0:
            loaded.delete("Observation", seen[0])
        n += 1
        if not page.next_cursor:
            break
        page = loaded.search("Observation", count=2, cursor=page.next_cursor)
    assert seen[: len(before)] == before  # nothing skipped or repeated; newcomers only at the end
    assert len(seen) == len(set(seen))


def test_paging_with_a_concurrent_writer(store: Store) -> None:
    for i in range(30):
        store.update("Observation", f"a{i:02}", observation(f"a{i:02}", "Patient/p1", "x", None))
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            store.update("Observation", f"b{n:03}", observation(f"b{n:03}", "Patient/p1", "x", None))
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen: list[str] = []
        page = store.search("Observation", [("patient", "p1")], count=4)
        seen += [e.id for e in page.entries]
        while page.next_cursor and len(seen) < 30:
            page = store.search("Observation", [("patient", "p1")], count=4, cursor=page.next_cursor)
            seen += [e.id for e in page.entries]
    finally:
        stop.set()
        thread.join()
    assert seen[:30] == [f"a{i:02}" for i in range(30)]


def test_bad_cursors(loaded: Store) -> None:
    page = loaded.search("Observation", count=2)
    with pytest.raises(InvalidSearch):
        loaded.search("Observation", count=2, cursor="garbage!")
    with pytest.raises(InvalidSearch):
        loaded.search("Observation", count=2, sort="-date", cursor=page.next_cursor)  # another ordering


def test_count_and_summary(loaded: Store) -> None:
    assert loaded.count("Observation", [("patient", "p2")]) == 2
    assert loaded.count("Observation", "code=44249-1&date=ge2026") == 3
    page = loaded.search("Observation", [("patient", "p2")], count=0, total=True)
    assert page.entries == [] and page.total == 2 and page.next_cursor is None


def test_index_follows_updates_and_deletes(loaded: Store) -> None:
    obs = loaded.read("Observation", "o1").resource
    obs["status"] = "amended"
    loaded.update("Observation", "o1", obs)
    assert "o1" not in ids_set(loaded, "Observation", [("status", "final")])
    assert ids_set(loaded, "Observation", [("status", "amended")]) == {"o1"}
    loaded.delete("Observation", "o1")
    assert ids_set(loaded, "Observation", [("status", "amended")]) == set()
    assert loaded.count("Observation") == 5


def test_parameter_table_covers_the_issue() -> None:
    wanted = {
        "Patient": "identifier name birthdate _id _lastUpdated",
        "MedicationRequest": "patient subject status intent category code authoredon identifier requester _lastUpdated",
        "Observation": "patient subject code category date status focus",
        "CarePlan": "patient status category date",
        "Condition": "patient code clinical-status",
        "Encounter": "patient date status",
        "EpisodeOfCare": "patient status",
        "MedicationDispense": "patient status prescription",
        "Consent": "patient status",
    }
    for resource_type, names in wanted.items():
        assert set(names.split()) <= set(search_parameters(resource_type)), resource_type
    assert search_parameters("MedicationRequest")["authoredon"].type == "date"


def test_indexing_extracts_by_shape() -> None:
    request = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": "http://c", "code": "discharge"}]}],
        "medicationCodeableConcept": {"coding": [{"system": RX, "code": "1116632"}]},
        "subject": {"reference": "Patient/p1"},
        "requester": {"reference": "Practitioner/d1"},
        "authoredOn": "2026-01-15",
        "identifier": [{"system": "s", "value": "rx-1"}],
    }
    rows = index_rows("MedicationRequest", "m1", request)
    tokens = {(r["param"], r["system"], r["code"]) for r in rows["token"]}
    assert {("status", None, "active"), ("code", RX, "1116632"), ("identifier", "s", "rx-1")} <= tokens
    refs = {(r["param"], r["ref_type"], r["ref_id"]) for r in rows["reference"]}
    assert refs == {("patient", "Patient", "p1"), ("subject", "Patient", "p1"), ("requester", "Practitioner", "d1")}
    assert [r["param"] for r in rows["date"]] == ["authoredon"]


def test_search_parameters_are_one_shared_read_only_table_per_served_type() -> None:
    from iop_fhir.store import search_index

    observation = search_parameters("Observation")
    assert observation is search_parameters("Observation") and "patient" in observation and "_id" in observation
    with pytest.raises(TypeError):
        observation["patient"] = observation["_id"]  # type: ignore[index]
    served = len(search_index._BY_TYPE)
    # a made-up type name (from a request) gets the common parameters and is not remembered
    assert search_parameters("Zz1") is search_parameters("Zz2") and set(search_parameters("Zz1")) == {p.name for p in search_index.COMMON}
    assert len(search_index._BY_TYPE) == served
