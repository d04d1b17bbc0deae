"""The synthetic cohort generator: every record valid, deterministic, lazy, and clinically varied."""

from __future__ import annotations

import datetime as dt
import inspect
import itertools
import json
from collections import Counter
from typing import Any

import pytest

from iop_fhir import terminology
from iop_fhir.generate import dea_with_check_digit, generate_cohort, generate_record, npi_with_check_digit
from iop_fhir.record.validate import dea_is_valid, npi_is_valid, validate_record

SEEDS = (0, 1, 2)
PER_SEED = 100


def dump(record: dict[str, Any]) -> str:
    """Deterministic JSON text of a record, for byte-for-byte comparisons."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


@pytest.fixture(scope="module")
def cohort() -> list[dict[str, Any]]:
    """300 records over three seeds, generated once for the whole module."""
    return [generate_record(i, seed) for seed in SEEDS for i in range(PER_SEED)]


def client_kind(record: dict[str, Any]) -> str:
    codes = [d["code"] for d in record["diagnoses"] if d["code"] != "R45.851"]
    sud = any(terminology.is_substance_use_diagnosis(c) for c in codes)
    mh = any(not terminology.is_substance_use_diagnosis(c) for c in codes)
    return "dual" if sud and mh else "sud" if sud else "mh"


def ingredient(rx: dict[str, Any]) -> str:
    med = terminology.medication(rx["medication"]["rxnorm"])
    assert med is not None
    return str(med["ingredient"])


# --- validity ------------------------------------------------------------------------------


def test_every_record_passes_validation_and_is_in_canonical_json_form(cohort: list[dict[str, Any]]) -> None:
    for record in cohort:
        model = validate_record(record)  # raises RecordInvalid listing every violation
        # What model_dump gives back is exactly what was generated: defaults present, no None.
        assert model.model_dump(mode="json", exclude_none=True) == record, record["id"]


def test_records_are_json_ready(cohort: list[dict[str, Any]]) -> None:
    for record in cohort[:50]:
        assert json.loads(json.dumps(record)) == record


def test_codes_come_from_the_terminology_tables(cohort: list[dict[str, Any]]) -> None:
    icd = terminology.tables()["icd10cm"]
    for record in cohort:
        for dx in record["diagnoses"]:
            assert dx["code"] in icd and dx["display"] == icd[dx["code"]]
        for rx in record["prescriptions"]:
            med = terminology.medication(rx["medication"]["rxnorm"])
            assert med is not None
            assert rx["medication"]["display"] == med["display"]
            assert rx["dea_schedule"] == med["dea_schedule"] if med["dea_schedule"] else "dea_schedule" not in rx
            assert rx["mat"] is med["mat"]
            assert rx["route"] == med["route"]


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_and_index_give_byte_identical_records() -> None:
    for index in (0, 1, 17, 4242):
        first, second = generate_record(index, 99), generate_record(index, 99)
        assert dump(first) == dump(second)
        assert json.dumps(first) == json.dumps(second)  # key order too, not only content


def test_a_record_does_not_depend_on_what_was_generated_before() -> None:
    alone = dump(generate_record(7, 5))
    list(generate_cohort(7, 5))
    generate_record(3, 11)
    assert dump(generate_record(7, 5)) == alone
    assert dump(list(generate_cohort(8, 5))[7]) == alone


def test_different_seeds_give_different_cohorts() -> None:
    a = [dump(r) for r in generate_cohort(20, 1)]
    b = [dump(r) for r in generate_cohort(20, 2)]
    assert a != b
    assert sum(x != y for x, y in zip(a, b)) >= 19


def test_mutating_a_record_does_not_leak_into_the_next() -> None:
    record = generate_record(0, 3)
    record["program"]["name"] = "changed"
    record["care_team"][0]["name"]["given"].append("X")
    again = generate_record(0, 3)
    assert again["program"]["name"] != "changed"
    assert "X" not in again["care_team"][0]["name"]["given"]


# --- streaming -----------------------------------------------------------------------------


def test_generate_cohort_is_a_lazy_generator() -> None:
    stream = generate_cohort(10**9, 4)  # a cohort this size could never be built as a list
    assert inspect.isgenerator(stream)
    first_three = list(itertools.islice(stream, 3))
    assert [r["id"] for r in first_three] == ["ep-000000", "ep-000001", "ep-000002"]
    assert [dump(r) for r in first_three] == [dump(generate_record(i, 4)) for i in range(3)]


def test_generate_cohort_yields_exactly_n_records() -> None:
    assert list(generate_cohort(0, 1)) == []
    assert len(list(generate_cohort(5, 1))) == 5


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_arguments_are_rejected(bad: Any) -> None:
    with pytest.raises(ValueError):
        generate_record(bad, 1)
    with pytest.raises(ValueError):
        list(generate_cohort(bad, 1))


# --- identifiers and parties -----------------------------------------------------------------


def test_check_digit_helpers_agree_with_the_validator() -> None:
    for base in ("123456789", "000000000", "999999999", "153829104", "292837465"):
        assert npi_is_valid(npi_with_check_digit(base))
    assert npi_with_check_digit("123456789") == "1234567893"  # the CMS worked example
    for digits in ("123456", "000000", "987654", "482913"):
        assert dea_is_valid(dea_with_check_digit("BO", digits))


def test_record_ids_and_mrns_are_unique_within_a_cohort(cohort: list[dict[str, Any]]) -> None:
    for start in range(0, len(cohort), PER_SEED):
        records = cohort[start : start + PER_SEED]  # one seed's cohort
        assert len({r["id"] for r in records}) == PER_SEED
        assert len({(r["program"]["id"], r["client"]["mrn"]) for r in records}) == PER_SEED


def test_shared_parties_are_identical_across_records(cohort: list[dict[str, Any]]) -> None:
    seen: dict[str, str] = {}
    for record in cohort:
        for name in ("care_team", "pharmacies", "providers"):
            for party in record[name]:
                text = dump(party)
                assert seen.setdefault(party["id"], text) == text, party["id"]
        program = record["program"]
        assert seen.setdefault(program["id"], dump(program)) == dump(program)


def test_program_focus_fits_its_clients(cohort: list[dict[str, Any]]) -> None:
    for record in cohort:
        focus, kind = record["program"]["focus"], client_kind(record)
        if focus == "mental-health":
            assert kind == "mh"
        if focus == "substance-use":
            assert kind in ("sud", "dual")
        if record["program"]["level_of_care"] == "virtual-IOP":
            assert record["enrolment"]["modality"] == "telehealth"


def test_controlled_substances_are_prescribed_by_registered_prescribers(cohort: list[dict[str, Any]]) -> None:
    for record in cohort:
        team = {m["id"]: m for m in record["care_team"]}
        for rx in record["prescriptions"]:
            prescriber = team[rx["prescriber_id"]]
            assert prescriber["role"] in ("psychiatrist", "nurse-practitioner")
            if "dea_schedule" in rx:
                assert "dea_number" in prescriber


# --- clinical mix ----------------------------------------------------------------------------


def test_cohort_mix_has_every_client_type_and_outcome(cohort: list[dict[str, Any]]) -> None:
    kinds = Counter(client_kind(r) for r in cohort)
    assert set(kinds) == {"mh", "sud", "dual"}
    assert kinds["mh"] > kinds["sud"]  # ~45 % vs ~20 %
    outcomes = Counter(r["discharge"]["disposition"] if "discharge" in r else "active" for r in cohort)
    assert outcomes["active"] >= 15
    assert {"completed", "stepped-down", "left-against-advice"} <= set(outcomes)
    assert {"stepped-up-php", "stepped-up-inpatient"} & set(outcomes)
    assert len({r["program"]["id"] for r in cohort}) == 3
    for record in cohort:
        primaries = [d for d in record["diagnoses"] if d["rank"] == "primary"]
        assert len(primaries) == 1
        age = (dt.date.fromisoformat(record["enrolment"]["start"]) - dt.date.fromisoformat(record["client"]["birth_date"])).days / 365.25
        assert 18 <= age < 71


def test_active_clients_have_no_discharge_and_no_end(cohort: list[dict[str, Any]]) -> None:
    active = [r for r in cohort if "discharge" not in r]
    assert active
    for record in active:
        assert record["enrolment"]["status"] == "active"
        assert "actual_end" not in record["enrolment"]
    for record in cohort:
        if "discharge" in record:
            assert record["enrolment"]["status"] == "finished"
            assert record["enrolment"]["actual_end"] == record["discharge"]["date"]


def test_mat_includes_buprenorphine_and_methadone_from_an_opioid_treatment_program(cohort: list[dict[str, Any]]) -> None:
    mat = Counter(ingredient(rx) for r in cohort for rx in r["prescriptions"] if rx["mat"])
    assert {"buprenorphine", "methadone", "naltrexone"} <= set(mat)
    for record in cohort:
        pharmacies = {p["id"]: p for p in record["pharmacies"]}
        for rx in record["prescriptions"]:
            if ingredient(rx) == "methadone":
                assert pharmacies[rx["pharmacy_id"]]["kind"] == "opioid-treatment-program"
                assert rx["setting"] == "outpatient" and rx["refills"] == 0
            if rx["mat"]:
                assert client_kind(record) in ("sud", "dual")


def test_dose_changes_are_new_prescriptions_replacing_stopped_ones(cohort: list[dict[str, Any]]) -> None:
    actions = Counter(v["action"] for r in cohort for v in r["medication_reviews"])
    assert actions["continue"] > actions["increase"] > 0
    assert actions["decrease"] > 0 and actions["start"] > 0
    assert actions["stop"] + actions["switch"] + actions["hold"] > 0
    for record in cohort:
        rx = {p["id"]: p for p in record["prescriptions"]}
        for review in record["medication_reviews"]:
            if review["action"] in ("increase", "decrease", "switch"):
                new, old = rx[review["new_prescription_id"]], rx[review["prescription_id"]]
                assert new["replaces_id"] == old["id"]
                assert old["status"] == "stopped" and old["end"] == review["date"] == new["written"]


def test_drug_screens_agree_with_prescriptions(cohort: list[dict[str, Any]]) -> None:
    """Prescribed buprenorphine/methadone is expected positive; illicit positives are unexpected."""
    unexpected = Counter()
    analytes = terminology.tables()["drug_screen_analytes"]
    for record in cohort:
        for screen in record["drug_screens"]:
            day = dt.date.fromisoformat(screen["collected"][:10])
            taking = {
                ingredient(rx) for rx in record["prescriptions"]
                if dt.date.fromisoformat(rx["start"]) <= day <= dt.date.fromisoformat(rx.get("end", "9999-12-31"))
            }
            for result in screen["results"]:
                prescribed = bool(set(analytes[result["analyte"]]["ingredients"]) & taking)
                if result["result"] == "positive":
                    assert result["expected"] == prescribed, (record["id"], screen["id"], result)
                if result["result"] == "negative" and not prescribed:
                    assert result["expected"], (record["id"], screen["id"], result)
                if not result["expected"]:
                    unexpected[result["result"]] += 1
    assert unexpected["positive"] > 0  # lapses
    assert unexpected["negative"] > 0  # prescribed MAT missing from the urine


def test_assessments_are_scored_and_mostly_improve(cohort: list[dict[str, Any]]) -> None:
    instruments = Counter(a["instrument"] for r in cohort for a in r["assessments"])
    assert {"PHQ-9", "GAD-7", "PHQ-2", "AUDIT-C", "DAST-10", "C-SSRS-screen"} <= set(instruments)
    improved = worse = 0
    for record in cohort:
        phq = [a["total"] for a in record["assessments"] if a["instrument"] == "PHQ-9"]
        if len(phq) >= 3 and record.get("discharge", {}).get("disposition") == "completed":
            improved += phq[-1] < phq[0]
            worse += phq[-1] > phq[0]
        if client_kind(record) != "mh":
            assert {"AUDIT-C", "DAST-10"} <= {a["instrument"] for a in record["assessments"]}
    assert improved > 3 * worse


def test_sessions_are_sized_and_timed_sensibly(cohort: list[dict[str, Any]]) -> None:
    counts = sorted(len(r["sessions"]) for r in cohort)
    median = counts[len(counts) // 2]
    assert 20 <= median <= 60
    attendance = Counter(s["attendance"] for r in cohort for s in r["sessions"])
    no_show_rate = attendance["no-show"] / sum(attendance.values())
    assert 0.04 < no_show_rate < 0.16
    nominal = {"group": (150, 180), "individual": (50,), "family": (50,), "psychoeducation": (60,),
               "medication-management": (25, 60)}
    for record in cohort:
        for session in record["sessions"]:
            if session["attendance"] == "attended":
                assert session["minutes"] in nominal[session["kind"]]
            else:
                assert session["minutes"] == 0
            if record["enrolment"]["modality"] == "telehealth":
                assert session["telehealth"]
            if record["enrolment"]["modality"] == "in-person":
                assert not session["telehealth"]


def test_discharge_medications_match_prescription_statuses(cohort: list[dict[str, Any]]) -> None:
    dispositions = Counter()
    for record in cohort:
        aftercare = record.get("discharge", {}).get("aftercare")
        if not aftercare:
            continue
        rx = {p["id"]: p for p in record["prescriptions"]}
        for med in aftercare["medications"]:
            dispositions[med["disposition"]] += 1
            status = rx[med["prescription_id"]]["status"]
            assert status == "active" if med["disposition"] != "stopped" else status in ("stopped", "completed")
    assert {"continue", "changed", "stopped"} <= set(dispositions)


def test_substance_use_clients_get_part2_consents(cohort: list[dict[str, Any]]) -> None:
    sud = [r for r in cohort if client_kind(r) != "mh"]
    with_part2 = [r for r in sud if any(c["part2"] for c in r["consents"])]
    assert len(with_part2) > len(sud) // 2
    assert any("revoked_on" in c for r in cohort for c in r["consents"])
    for record in cohort:
        if client_kind(record) == "mh":
            assert not any(c["part2"] for c in record["consents"])
