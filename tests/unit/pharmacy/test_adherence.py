"""Adherence from pharmacy fills (pharmacy/adherence.py): PDC, refill gaps, overdue MAT flags.

The hand-computed cases spell their arithmetic out in comments (dates are 2024, a leap year).
"""

from __future__ import annotations

import datetime as dt
import random
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iop_fhir.errors import RecordInvalid
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers.ids import resource_id
from iop_fhir.pharmacy.adherence import (
    FLAG_DETAIL,
    SUPPORTING_INFO,
    adherence_observations,
    overdue_mat,
    pdc,
)
from iop_fhir.terminology import RXNORM, UCUM, extension_url

D = dt.date
BASE = "https://iop-fhir.org/fhir/sid/riverbend-iop"
PATIENT = "Patient/p1"
UTC = dt.timezone.utc

SERTRALINE = "312941"
BUPROPION = "993541"  # antidepressant too
LITHIUM = "197890"  # mood-stabiliser
BUP_FILM = "1010604"  # buprenorphine/naloxone film, MAT (moud)
BUP_TAB = "351265"  # buprenorphine tablet: the same ingredient
NALTREXONE = "1483744"  # MAT by the drug table
NOT_IN_TABLE = "99999999"


def dispense(
    did: str,
    day: str | None,
    days: int | float | None,
    *,
    rx: str | None = "a",
    code: str | None = SERTRALINE,
    status: str = "completed",
    unit: str = "d",
) -> dict:
    out: dict = {"resourceType": "MedicationDispense", "id": did, "status": status, "subject": {"reference": PATIENT}}
    out["medicationCodeableConcept"] = {"coding": [{"system": RXNORM, "code": code}]} if code else {"text": "a compounded product"}
    if rx:
        out["authorizingPrescription"] = [{"reference": f"MedicationRequest/{rx}"}]
    if days is not None:
        out["daysSupply"] = {"value": days, "unit": unit, "system": UCUM, "code": unit}
    if day:
        out["whenHandedOver"] = day
    return out


def window(first: str, last: str) -> tuple[dt.date, dt.date]:
    return D.fromisoformat(first), D.fromisoformat(last)


# --- PDC: hand-computed cases ---------------------------------------------------------------------


def test_no_overlap_back_to_back_fills():
    # Jan 1 +30 -> Jan 1-30; Jan 31 +30 -> Jan 31-Feb 29; Mar 1 +30 -> Mar 1-30. Window Jan 1-Mar 31 = 91 days.
    fills = [dispense("d1", "2024-01-01", 30), dispense("d2", "2024-01-31", 30), dispense("d3", "2024-03-01", 30)]
    a = pdc(fills, window=window("2024-01-01", "2024-03-31")).by_prescription["MedicationRequest/a"]
    assert (a.index_date, a.days_in_period, a.days_covered) == (D(2024, 1, 1), 91, 90)
    assert a.pdc == Fraction(90, 91)
    assert a.gaps == ()
    assert a.supply_ends == D(2024, 3, 30)


def test_early_refill_is_shifted_not_double_counted():
    # Jan 1 +30 covers Jan 1-30; the Jan 25 refill starts Jan 31 and covers to Feb 29.
    # Window Jan 1-Feb 29 = 60 days, all covered (without the shift: Jan 1-Feb 23 = 54).
    fills = [dispense("d1", "2024-01-01", 30), dispense("d2", "2024-01-25", 30)]
    a = pdc(fills, window=window("2024-01-01", "2024-02-29")).by_prescription["MedicationRequest/a"]
    assert [(s.start, s.end) for s in a.supply] == [(D(2024, 1, 1), D(2024, 1, 30)), (D(2024, 1, 31), D(2024, 2, 29))]
    assert (a.days_covered, a.days_in_period, a.pdc) == (60, 60, 1)


def test_same_day_refills_carry_over():
    # Two 10-day fills handed over together cover 20 days, not 10.
    fills = [dispense("d1", "2024-01-01", 10), dispense("d2", "2024-01-01", 10)]
    a = pdc(fills, window=window("2024-01-01", "2024-01-31")).by_prescription["MedicationRequest/a"]
    assert (a.days_covered, a.days_in_period) == (20, 31)


def test_gap_and_late_refill():
    # Jan 1 +30 -> Jan 1-30; refill Feb 15 +30 -> Feb 15-Mar 15. Window Jan 1-Mar 15 = 75 days, 60 covered.
    # Uncovered Jan 31-Feb 14 = 15 days: later than 7 days after the supply ran out.
    fills = [dispense("d1", "2024-01-01", 30), dispense("d2", "2024-02-15", 30)]
    a = pdc(fills, window=window("2024-01-01", "2024-03-15")).by_prescription["MedicationRequest/a"]
    assert a.pdc == Fraction(60, 75) == Fraction(4, 5)
    [gap] = a.gaps
    assert (gap.supply_ended, gap.refill.handed_over, gap.days, gap.late) == (D(2024, 1, 30), D(2024, 2, 15), 15, True)
    assert a.late_refills == (gap,)


@pytest.mark.parametrize(("refill", "late_after", "days", "late"), [("2024-02-07", 7, 7, False), ("2024-02-08", 7, 8, True), ("2024-02-08", 8, 8, False), ("2024-01-31", 0, None, None)])
def test_late_is_more_than_n_days_after_the_supply_ran_out(refill, late_after, days, late):
    # Supply Jan 1-30 runs out Jan 31; a refill on Feb 7 leaves Jan 31-Feb 6 (7 days) uncovered.
    fills = [dispense("d1", "2024-01-01", 30), dispense("d2", refill, 30)]
    a = pdc(fills, window=window("2024-01-01", "2024-03-31"), late_after_days=late_after).by_prescription["MedicationRequest/a"]
    if days is None:
        assert a.gaps == ()  # refilled the day the supply ran out: no gap
    else:
        assert [(g.days, g.late) for g in a.gaps] == [(days, late)]


def test_window_clipping_and_index_date():
    # The Dec 20 fill lies before the window: not counted, not carried in. The index date is the
    # Jan 10 fill; its 60 days run past Jan 31 and are clipped: period Jan 10-31 = 22 days, all covered.
    fills = [dispense("d0", "2023-12-20", 30), dispense("d1", "2024-01-10", 60), dispense("d2", "2024-02-05", 30)]
    a = pdc(fills, window=window("2024-01-01", "2024-01-31")).by_prescription["MedicationRequest/a"]
    assert (a.index_date, a.days_in_period, a.days_covered) == (D(2024, 1, 10), 22, 22)
    assert [f.dispense for f in a.fills] == ["MedicationDispense/d1"]


def test_partial_fill_counts_its_own_days_supply():
    # A partial fill (in progress, handed over) of 10 days on Jan 1, the balance of 20 days on Jan 11:
    # Jan 1-30 covered of Jan 1-31.
    fills = [
        dispense("d1", "2024-01-01", 10, status="in-progress"),
        dispense("d2", "2024-01-11", 20),
    ]
    a = pdc(fills, window=window("2024-01-01", "2024-01-31")).by_prescription["MedicationRequest/a"]
    assert (a.days_covered, a.days_in_period) == (30, 31)
    # In progress and not yet handed over: nothing in hand.
    waiting = dispense("d3", None, 30, status="in-progress")
    result = pdc([waiting], window=window("2024-01-01", "2024-01-31"))
    assert result.by_prescription == {}
    assert any("not handed over" in i.message for i in result.issues)


@pytest.mark.parametrize("status", ["declined", "cancelled", "stopped", "preparation", "on-hold", "entered-in-error", "unknown"])
def test_not_dispensed_counts_nothing(status):
    # A declined fill neither covers days nor sets the index date: the period starts Jan 11.
    fills = [dispense("d0", "2024-01-01", 30, status=status), dispense("d1", "2024-01-11", 10)]
    result = pdc(fills, window=window("2024-01-01", "2024-01-31"))
    a = result.by_prescription["MedicationRequest/a"]
    assert (a.index_date, a.days_in_period, a.days_covered) == (D(2024, 1, 11), 21, 10)
    assert any(i.location == "MedicationDispense/d0.status" for i in result.issues)


def test_two_prescriptions_one_class_overlap_without_shifting():
    # Sertraline (a) Jan 1 +30; bupropion (b) Jan 1 +30 and Jan 31 +30. Window Jan 1-Mar 1 = 61 days.
    # Per prescription: a 30/61, b 60/61. The class: different drugs overlap (no shift), union Jan 1-Feb 29 = 60/61.
    fills = [
        dispense("s1", "2024-01-01", 30, rx="a", code=SERTRALINE),
        dispense("b1", "2024-01-01", 30, rx="b", code=BUPROPION),
        dispense("b2", "2024-01-31", 30, rx="b", code=BUPROPION),
    ]
    result = pdc(fills, window=window("2024-01-01", "2024-03-01"))
    assert result.by_prescription["MedicationRequest/a"].pdc == Fraction(30, 61)
    assert result.by_prescription["MedicationRequest/b"].pdc == Fraction(60, 61)
    cls = result.by_class["antidepressant"]
    assert (cls.days_covered, cls.days_in_period) == (60, 61)
    assert cls.prescriptions == ("MedicationRequest/a", "MedicationRequest/b")
    assert set(result.by_class) == {"antidepressant"}


def test_same_ingredient_in_a_class_shifts_across_prescriptions():
    # Two buprenorphine products (a dose change: a new prescription) filled the same day: the
    # second supply waits for the first, as PQA shifts fills of one drug. Class moud: Jan 1-28 of Jan 1-31.
    fills = [
        dispense("f1", "2024-01-01", 14, rx="old", code=BUP_FILM),
        dispense("t1", "2024-01-01", 14, rx="new", code=BUP_TAB),
    ]
    cls = pdc(fills, window=window("2024-01-01", "2024-01-31")).by_class["moud"]
    assert (cls.days_covered, cls.days_in_period) == (28, 31)


def test_class_gap_is_closed_by_any_drug_of_the_class():
    # Lithium Jan 1 +10 (Jan 1-10), sertraline Jan 5 +10: antidepressant and mood-stabiliser are separate classes.
    fills = [dispense("l1", "2024-01-01", 10, rx="l", code=LITHIUM), dispense("s1", "2024-01-20", 10, rx="s")]
    result = pdc(fills, window=window("2024-01-01", "2024-01-31"))
    assert set(result.by_class) == {"antidepressant", "mood-stabiliser"}
    assert result.by_class["mood-stabiliser"].gaps == ()
    assert result.by_class["antidepressant"].index_date == D(2024, 1, 20)


def test_days_supply_in_weeks_and_unreadable_dispenses_are_reported():
    fills = [
        dispense("w", "2024-01-01", 4, unit="wk"),  # 28 days
        dispense("no-days", "2024-01-02", None),
        dispense("half", "2024-01-03", 2.5),
        dispense("no-date", None, 30),
        dispense("unknown-drug", "2024-01-05", 5, rx="z", code=NOT_IN_TABLE),
        dispense("years", "2024-01-06", 5000),
        {"resourceType": "Observation", "id": "x"},
    ]
    result = pdc(fills, window=window("2024-01-01", "2024-01-31"))
    assert result.by_prescription["MedicationRequest/a"].days_covered == 28
    assert result.by_prescription["MedicationRequest/z"].days_covered == 5
    assert "antidepressant" in result.by_class and len(result.by_class) == 1  # the unknown drug has no class
    where = {i.location for i in result.issues}
    assert {"MedicationDispense/no-days.daysSupply", "MedicationDispense/half.daysSupply", "MedicationDispense/years.daysSupply"} <= where
    assert "MedicationDispense/no-date.whenHandedOver" in where
    assert "MedicationDispense/unknown-drug.medication[x]" in where
    assert "Observation/x" in where


def test_supply_at_the_end_of_the_calendar_does_not_overflow():
    fills = [dispense("d1", "9999-12-20", 30), dispense("d2", "9999-12-21", 30)]
    a = pdc(fills, window=window("9999-12-01", "9999-12-31")).by_prescription["MedicationRequest/a"]
    assert (a.days_covered, a.days_in_period, a.supply_ends) == (12, 12, D.max)


def test_handed_over_falls_back_to_prepared_and_duplicates_count_once():
    prepared = dispense("p", None, 10)
    prepared["whenPrepared"] = "2024-01-01T10:00:00-05:00"
    copy = dispense("p", None, 10)
    copy["whenPrepared"] = "2024-01-01T10:00:00-05:00"
    same_fill = dispense("other-id", "2024-01-01", 10)
    same_fill["identifier"] = [{"system": "urn:pharmacy", "value": "rx1-fill0"}]
    again = dispense("third-id", "2024-01-01", 10)
    again["identifier"] = [{"system": "urn:pharmacy", "value": "rx1-fill0"}]
    result = pdc([prepared, copy, same_fill, again], window=window("2024-01-01", "2024-01-31"))
    a = result.by_prescription["MedicationRequest/a"]
    assert len(a.fills) == 2 and a.days_covered == 20
    assert sum("given twice" in i.message for i in result.issues) == 2
    assert any(i.location == "MedicationDispense/p.whenPrepared" for i in result.issues)


def test_references_in_every_form_name_the_same_prescription():
    fills = [dispense("d1", "2024-01-01", 10, rx=None), dispense("d2", "2024-01-11", 10, rx=None), dispense("d3", "2024-01-21", 10, rx=None)]
    fills[0]["authorizingPrescription"] = [{"reference": "MedicationRequest/abc"}]
    fills[1]["authorizingPrescription"] = [{"reference": "https://ehr.example.org/fhir/MedicationRequest/abc/_history/2"}]
    fills[2]["authorizingPrescription"] = [{"reference": "urn:uuid:abc"}]
    a = pdc(fills, window=window("2024-01-01", "2024-01-30")).by_prescription["MedicationRequest/abc"]
    assert (a.days_covered, a.days_in_period) == (30, 30)


def test_invalid_parameters_are_caller_errors():
    with pytest.raises(RecordInvalid) as err:
        pdc([], window=(D(2024, 2, 1), D(2024, 1, 1)))
    assert err.value.issues[0].location == "window"
    with pytest.raises(RecordInvalid):
        pdc([], window=window("2024-01-01", "2024-01-31"), late_after_days=-1)
    assert pdc([], window=window("2024-01-01", "2024-01-31")).by_prescription == {}


# --- PDC: properties ------------------------------------------------------------------------------

START = D(2024, 1, 1)
END = D(2024, 6, 30)
DRUGS = [(SERTRALINE, "a"), (BUPROPION, "b"), (SERTRALINE, "c"), (LITHIUM, "d"), (BUP_FILM, "e"), (BUP_TAB, "f")]

fill_specs = st.tuples(
    st.integers(min_value=-20, max_value=200),  # day offset from the window start (some fall outside)
    st.integers(min_value=1, max_value=90),  # days supply
    st.sampled_from(DRUGS),
    st.sampled_from(["completed", "completed", "completed", "in-progress", "declined"]),
)


def build(specs: list, shift: int = 0) -> list[dict]:
    return [
        dispense(f"d{i}", (START + dt.timedelta(days=offset + shift)).isoformat(), days, rx=rx, code=code, status=status)
        for i, (offset, days, (code, rx), status) in enumerate(specs)
    ]


def groups(result) -> dict:
    return {**{("rx", k): v for k, v in result.by_prescription.items()}, **{("class", k): v for k, v in result.by_class.items()}}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fill_specs, max_size=12))
def test_pdc_is_a_proportion(specs):
    for a in groups(pdc(build(specs), window=(START, END))).values():
        assert 0 <= a.pdc <= 1
        assert 0 <= a.days_covered <= a.days_in_period
        assert START <= a.index_date <= END
        assert all(g.days > 0 for g in a.gaps)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fill_specs, min_size=1, max_size=10), fill_specs)
def test_adding_a_fill_never_lowers_pdc(specs, extra):
    before = groups(pdc(build(specs), window=(START, END)))
    offset, days, drug, _status = extra
    # PQA's period starts at the first fill: a fill added *before* a group's index date moves the
    # start earlier, so the property holds for fills on or after every index date (or outside the window).
    latest_index = max((a.index_date for a in before.values()), default=START)
    offset = max(offset, (latest_index - START).days)
    after = groups(pdc(build([*specs, (offset, days, drug, "completed")]), window=(START, END)))
    for key, a in before.items():
        assert after[key].pdc >= a.pdc, key


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fill_specs, max_size=12), st.integers(min_value=-400, max_value=400))
def test_shifting_every_date_leaves_pdc_unchanged(specs, shift):
    moved = (START + dt.timedelta(days=shift), END + dt.timedelta(days=shift))
    before = groups(pdc(build(specs), window=(START, END)))
    after = groups(pdc(build(specs, shift), window=moved))
    assert {k: (a.pdc, len(a.gaps), len(a.late_refills)) for k, a in before.items()} == {
        k: (a.pdc, len(a.gaps), len(a.late_refills)) for k, a in after.items()
    }


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fill_specs, max_size=12), st.randoms(use_true_random=False))
def test_result_does_not_depend_on_input_order(specs, rnd: random.Random):
    dispenses = build(specs)
    shuffled = list(dispenses)
    rnd.shuffle(shuffled)
    assert pdc(shuffled, window=(START, END)) == pdc(dispenses, window=(START, END))


# --- Observations ---------------------------------------------------------------------------------

AS_OF = dt.datetime(2024, 4, 1, 8, 30, tzinfo=UTC)


def two_class_result():
    fills = [
        dispense("s1", "2024-01-01", 30, rx="a"),
        dispense("s2", "2024-02-15", 30, rx="a"),
        dispense("l1", "2024-01-05", 30, rx="l", code=LITHIUM),
    ]
    return pdc(fills, window=window("2024-01-01", "2024-03-31"))


def component(obs: dict, code: str):
    [found] = [c for c in obs["component"] if c["code"]["coding"][0]["code"] == code]
    return next(v for k, v in found.items() if k.startswith("value"))


def test_observations_per_prescription_and_class_are_valid_fhir():
    observations = adherence_observations(two_class_result(), PATIENT, as_of=AS_OF, identifier_base=BASE)
    assert len(observations) == 4  # prescriptions a and l, classes antidepressant and mood-stabiliser
    for obs in observations:
        assert validate_resource(obs) == [], obs
        assert obs["subject"] == {"reference": PATIENT}
        assert obs["effectivePeriod"] == {"start": "2024-01-01", "end": "2024-03-31"}
        assert obs["category"][0]["coding"][0]["code"] == "therapy"  # beside the reported adherence Observations
        assert obs["method"]["coding"][0]["code"] == "pharmacy-fill"
        assert obs["issued"] == "2024-04-01T08:30:00Z"
        assert obs["valueQuantity"]["system"] == UCUM and obs["valueQuantity"]["code"] == "%"
    by_value = {o["identifier"][0]["value"]: o for o in observations}
    # Sertraline: Jan 1-30 and Feb 15-Mar 15 = 60 of 91 days = 65.9 %.
    a = by_value["a/2024-01-01/2024-03-31"]
    assert a["valueQuantity"]["value"] == 65.9
    assert a["focus"] == [{"reference": "MedicationRequest/a"}]
    assert [e["valueReference"]["reference"] for e in a["extension"]] == ["MedicationDispense/s1", "MedicationDispense/s2"]
    assert all(e["url"] == SUPPORTING_INFO for e in a["extension"])
    assert component(a, "days-covered")["value"] == 60 and component(a, "days-in-period")["value"] == 91
    assert (component(a, "refill-gaps"), component(a, "late-refills"), component(a, "index-date")) == (1, 1, "2024-01-01")
    cls = by_value["p1/mood-stabiliser/2024-01-01/2024-03-31"]
    assert component(cls, "drug-class")["coding"][0]["code"] == "mood-stabiliser"
    assert cls["valueQuantity"]["value"] == 34.5  # Jan 5-Feb 3 = 30 of Jan 5-Mar 31 = 87 days: 34.48
    for obs in observations:
        assert obs["id"] == resource_id("Observation", obs["identifier"][0]["system"], obs["identifier"][0]["value"])
        assert obs["identifier"][0]["system"] == f"{BASE}/pdc"


def test_recomputation_updates_the_same_observations():
    first = adherence_observations(two_class_result(), PATIENT, as_of=AS_OF, identifier_base=BASE)
    more = [dispense("s1", "2024-01-01", 30, rx="a"), dispense("s2", "2024-02-15", 30, rx="a"), dispense("s3", "2024-03-10", 30, rx="a")]
    more.append(dispense("l1", "2024-01-05", 30, rx="l", code=LITHIUM))
    later = adherence_observations(pdc(more, window=window("2024-01-01", "2024-03-31")), PATIENT, as_of=AS_OF + dt.timedelta(days=1), identifier_base=BASE)
    assert [o["id"] for o in first] == [o["id"] for o in later]
    assert first[0]["valueQuantity"]["value"] < later[0]["valueQuantity"]["value"]
    other_window = adherence_observations(pdc(more, window=window("2024-01-01", "2024-02-29")), PATIENT, as_of=AS_OF, identifier_base=BASE)
    assert not {o["id"] for o in other_window} & {o["id"] for o in first}


def test_observation_parameters_are_checked():
    result = two_class_result()
    with pytest.raises(RecordInvalid):  # window ends after as_of
        adherence_observations(result, PATIENT, as_of=D(2024, 3, 30), identifier_base=BASE)
    with pytest.raises(RecordInvalid):
        adherence_observations(result, PATIENT, as_of=dt.datetime(2024, 4, 1), identifier_base=BASE)
    with pytest.raises(RecordInvalid):
        adherence_observations(result, "Practitioner/x", as_of=AS_OF, identifier_base=BASE)
    plain = adherence_observations(result, "urn:uuid:10bc811d-3fc4-537e-bfff-56334d78bc82", as_of=D(2024, 4, 1), identifier_base=BASE)
    assert all("issued" not in o and validate_resource(o) == [] for o in plain)


# --- overdue medication-assisted treatment -------------------------------------------------------


def request(rid: str, code: str, *, mat: bool | None = None, status: str = "active", written: str = "2024-01-01", intent: str = "order") -> dict:
    out: dict = {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": status,
        "intent": intent,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code}], "text": f"drug {code}"},
        "subject": {"reference": PATIENT},
        "authoredOn": written,
    }
    if mat is not None:
        out["extension"] = [{"url": extension_url("medication-assisted-treatment"), "valueBoolean": mat}]
    return out


DISCHARGE = D(2024, 1, 20)
BUP_FILLS = [dispense("b1", "2024-01-01", 14, rx="bup", code=BUP_FILM), dispense("b2", "2024-01-15", 14, rx="bup", code=BUP_FILM)]


def flags(requests, dispenses, as_of: dt.date, grace: int = 3) -> list[dict]:
    return overdue_mat(requests, dispenses, as_of=as_of, discharge_date=DISCHARGE, grace_days=grace, identifier_base=BASE)


def test_mat_supply_run_out_after_discharge_raises_an_active_flag():
    # Supply Jan 1-28; runs out Jan 29; more than 3 days later, from Feb 2, it is overdue.
    [flag] = flags([request("bup", BUP_FILM, mat=True)], BUP_FILLS, D(2024, 2, 5))
    assert validate_resource(flag) == []
    assert flag["status"] == "active"
    assert flag["subject"] == {"reference": PATIENT}
    assert flag["code"]["text"] == "MAT refill overdue: buprenorphine, last supply ended 2024-01-28"
    assert flag["category"][0]["coding"][0] == {"system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": "drug", "display": "Drug"}
    assert flag["period"] == {"start": "2024-02-02"}
    assert flag["identifier"][0] == {"use": "usual", "system": f"{BASE}/mat-refill-overdue", "value": "p1/buprenorphine"}
    assert flag["id"] == resource_id("Flag", f"{BASE}/mat-refill-overdue", "p1/buprenorphine")
    details = [e["valueReference"]["reference"] for e in flag["extension"] if e["url"] == FLAG_DETAIL]
    assert details == ["MedicationRequest/bup", "MedicationDispense/b2"]


@pytest.mark.parametrize("as_of", [D(2024, 1, 29), D(2024, 1, 31), D(2024, 2, 1)])
def test_within_grace_no_flag(as_of):
    # Ran out Jan 29: Feb 1 is 3 days later, not more than 3.
    assert flags([request("bup", BUP_FILM, mat=True)], BUP_FILLS, as_of) == []


def test_refill_turns_the_same_flag_inactive():
    active = flags([request("bup", BUP_FILM, mat=True)], BUP_FILLS, D(2024, 2, 5))
    refilled = [*BUP_FILLS, dispense("b3", "2024-02-10", 14, rx="bup", code=BUP_FILM)]
    [closed] = flags([request("bup", BUP_FILM, mat=True)], refilled, D(2024, 2, 12))
    assert closed["id"] == active[0]["id"]
    assert closed["status"] == "inactive"
    assert closed["period"] == {"start": "2024-02-02", "end": "2024-02-10"}
    assert validate_resource(closed) == []
    # A dispense after as_of has not happened yet: still active on Feb 5.
    assert flags([request("bup", BUP_FILM, mat=True)], refilled, D(2024, 2, 5))[0]["status"] == "active"


def test_a_refill_inside_the_grace_raises_nothing():
    # Ran out Jan 29, refilled Jan 31 (2 days), the new supply lasts to Feb 29.
    fills = [*BUP_FILLS, dispense("b3", "2024-01-31", 30, rx="bup", code=BUP_FILM)]
    assert flags([request("bup", BUP_FILM, mat=True)], fills, D(2024, 2, 20)) == []


def test_mat_known_by_the_drug_table_and_dispenses_without_prescription():
    # Naltrexone without our extension is MAT by the drug table; a fill from another pharmacy
    # (no authorizingPrescription) still counts by its ingredient: supply Jan 1-Jan 30.
    fills = [dispense("n1", "2024-01-01", 30, rx=None, code=NALTREXONE)]
    assert flags([request("ntx", NALTREXONE)], fills, D(2024, 2, 3)) == []  # ran out Jan 31: 3 days
    [flag] = flags([request("ntx", NALTREXONE)], fills, D(2024, 2, 4))
    assert flag["code"]["text"] == "MAT refill overdue: naltrexone, last supply ended 2024-01-30"
    assert flag["period"] == {"start": "2024-02-04"}


def test_never_filled_order_is_overdue_from_when_it_was_written():
    [flag] = flags([request("bup", BUP_FILM, mat=True, written="2024-01-18")], [], D(2024, 1, 25))
    assert flag["code"]["text"] == "MAT refill overdue: buprenorphine, nothing dispensed since it was written on 2024-01-18"
    assert flag["period"] == {"start": "2024-01-22"}


@pytest.mark.parametrize(
    "requests",
    [
        [request("ser", SERTRALINE, mat=False)],  # not MAT
        [request("bup", BUP_FILM, mat=True, status="stopped")],  # stopped
        [request("bup", BUP_FILM, mat=True, status="completed")],
        [request("bup", BUP_FILM, mat=True, intent="plan")],  # not an order
    ],
)
def test_no_flag_for_what_is_not_followed(requests):
    assert flags(requests, BUP_FILLS, D(2024, 3, 1)) == []


def test_discharge_list_that_stops_the_prescription_silences_it():
    stop = request("bup-discharge", BUP_FILM, mat=True, status="stopped", intent="plan")
    stop["priorPrescription"] = {"reference": "MedicationRequest/bup"}
    assert flags([request("bup", BUP_FILM, mat=True), stop], BUP_FILLS, D(2024, 3, 1)) == []
    going_on = dict(stop, status="active")
    assert len(flags([request("bup", BUP_FILM, mat=True), going_on], BUP_FILLS, D(2024, 3, 1))) == 1


def test_no_flags_before_discharge_nor_for_lapses_closed_before_it():
    assert flags([request("bup", BUP_FILM, mat=True)], BUP_FILLS, D(2024, 1, 19)) == []
    # Lapse Jan 11-14 during the program (supply Jan 1-10, refill Jan 15), then covered past as_of.
    fills = [dispense("b1", "2024-01-01", 10, rx="bup", code=BUP_FILM), dispense("b2", "2024-01-15", 30, rx="bup", code=BUP_FILM)]
    assert flags([request("bup", BUP_FILM, mat=True)], fills, D(2024, 2, 10), grace=1) == []


def test_replaced_order_fills_count_for_the_new_one():
    # The dose change replaced order "old" (now stopped) by "new", not yet filled: the old fills
    # (by prescription, even without a drug code) cover to Jan 28 and the lapse is the drug's.
    old = request("old", BUP_FILM, mat=True, status="stopped")
    new = request("new", BUP_TAB, mat=True, written="2024-01-20")
    fills = [dispense("x1", "2024-01-01", 14, rx="old", code=None), dispense("x2", "2024-01-15", 14, rx="old", code=None)]
    [flag] = flags([old, new], fills, D(2024, 2, 5))
    assert flag["code"]["text"] == "MAT refill overdue: buprenorphine, last supply ended 2024-01-28"
    assert [e["valueReference"]["reference"] for e in flag["extension"]] == ["MedicationRequest/new", "MedicationDispense/x2"]


def test_overdue_parameters_are_checked():
    with pytest.raises(RecordInvalid):
        flags([request("bup", BUP_FILM, mat=True)], BUP_FILLS, D(2024, 3, 1), grace=-1)
    other = request("bup2", BUP_TAB, mat=True)
    other["subject"] = {"reference": "Patient/p2"}
    with pytest.raises(RecordInvalid):
        flags([request("bup", BUP_FILM, mat=True), other], BUP_FILLS, D(2024, 3, 1))
    assert flags([], BUP_FILLS, D(2024, 3, 1)) == []


def test_flags_are_deterministic_and_independent_of_input_order():
    requests = [request("bup", BUP_FILM, mat=True), request("ntx", NALTREXONE)]
    fills = [*BUP_FILLS, dispense("n1", "2024-01-01", 30, rx="ntx", code=NALTREXONE)]
    first = flags(requests, fills, D(2024, 3, 1))
    assert len(first) == 2
    assert flags(list(reversed(requests)), list(reversed(fills)), D(2024, 3, 1)) == first
