"""The contract's rules: each one fires, names its field, and all are reported together."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from iop_fhir.errors import RecordInvalid
from iop_fhir.record import RECORD_VERSION, record_json_schema, validate_record
from iop_fhir.record.validate import add_months, dea_is_valid, npi_is_valid, pointer

import datetime as dt


def problems(data: dict[str, Any]) -> dict[str, str]:
    """location -> message of every violation in ``data`` (fails if the record is valid)."""
    with pytest.raises(RecordInvalid) as info:
        validate_record(data)
    return {issue.location: issue.message for issue in info.value.issues}


def test_example_record_is_valid(example_record):
    assert example_record.version == RECORD_VERSION
    assert len(example_record.prescriptions) == 4


def test_not_an_object():
    with pytest.raises(RecordInvalid):
        validate_record([1, 2])


def test_unsupported_version(example_json):
    example_json["version"] = "iop-record/9"
    assert "/version" in problems(example_json)


def test_shape_errors_carry_json_pointers_and_are_all_reported(example_json):
    del example_json["client"]["birth_date"]
    example_json["prescriptions"][2]["refills"] = "many"
    example_json["sessions"][0]["colour"] = "blue"
    found = problems(example_json)
    assert found["/client/birth_date"] == "required field is missing"
    assert "/prescriptions/2/refills" in found
    assert "unknown field" in found["/sessions/0/colour"]


def test_references_must_resolve(example_json):
    example_json["prescriptions"][0]["prescriber_id"] = "nobody"
    example_json["medication_reviews"][0]["prescription_id"] = "rx-99"
    example_json["care_plan"]["activities"][0]["goal_ids"] = ["g-404"]
    example_json["consents"][0]["recipient_id"] = "pr-404"
    found = problems(example_json)
    assert "care_team member" in found["/prescriptions/0/prescriber_id"]
    assert "/medication_reviews/0/prescription_id" in found
    assert "/care_plan/activities/0/goal_ids/0" in found
    assert "/consents/0/recipient_id" in found


def test_duplicate_ids(example_json):
    example_json["sessions"][1]["id"] = example_json["sessions"][0]["id"]
    assert "duplicate" in problems(example_json)["/sessions/1/id"]


def test_dates_within_episode(example_json):
    example_json["sessions"][0]["start"] = "2025-12-01T09:00:00Z"
    example_json["adherence"][0]["date"] = "2026-03-30"
    found = problems(example_json)
    assert "before the enrolment start" in found["/sessions/0/start"]
    assert "after the episode ended" in found["/adherence/0/date"]


def test_discharge_must_match_actual_end(example_json):
    example_json["discharge"]["date"] = "2026-02-26"
    assert "/discharge/date" in problems(example_json)


def test_finished_enrolment_needs_actual_end(example_json):
    del example_json["enrolment"]["actual_end"]
    assert "/enrolment/actual_end" in problems(example_json)


def test_schedule_ii_no_refills(example_json):
    rx = example_json["prescriptions"][2]
    rx.update(medication={"rxnorm": "864706", "display": "methadone hydrochloride 10 MG Oral Tablet"}, dea_schedule="II", refills=1, end=None)
    found = problems(example_json)
    assert "Schedule II" in found["/prescriptions/2/refills"]
    assert "opioid treatment program" in found["/prescriptions/2/pharmacy_id"]


def test_schedule_iii_refill_limit_and_six_months(example_json):
    rx = example_json["prescriptions"][2]
    rx.update(refills=6, end="2026-07-06")
    found = problems(example_json)
    assert "at most 5 refills" in found["/prescriptions/2/refills"]
    assert "6 months" in found["/prescriptions/2/end"]


def test_schedule_must_match_the_drug(example_json):
    example_json["prescriptions"][2]["dea_schedule"] = None
    assert "Schedule III" in problems(example_json)["/prescriptions/2/dea_schedule"]


def test_controlled_prescriber_needs_dea(example_json):
    del example_json["care_team"][0]["dea_number"]
    assert "DEA number" in problems(example_json)["/prescriptions/2/prescriber_id"]


def test_only_prescribers_prescribe(example_json):
    example_json["prescriptions"][0]["prescriber_id"] = "st-ther-1"
    assert "cannot prescribe" in problems(example_json)["/prescriptions/0/prescriber_id"]


def test_replaced_prescription_cannot_stay_active(example_json):
    example_json["prescriptions"][0]["status"] = "active"
    example_json["prescriptions"][0].pop("end")
    assert "/prescriptions/0/status" in problems(example_json)


def test_increase_must_raise_the_dose(example_json):
    example_json["prescriptions"][1]["dose"]["value"] = 0.5
    example_json["medication_reviews"][1]["new_dose"]["value"] = 0.5
    assert "dose went" in problems(example_json)["/medication_reviews/1/action"]


def test_change_review_needs_new_prescription(example_json):
    del example_json["medication_reviews"][1]["new_prescription_id"]
    assert "/medication_reviews/1/new_prescription_id" in problems(example_json)


def test_assessment_total_must_equal_items(example_json):
    example_json["assessments"][0]["total"] = 14
    found = problems(example_json)
    assert "sum of its items" in found["/assessments/0/total"]
    assert "/assessments/0/severity" in found


def test_assessment_band_and_range(example_json):
    example_json["assessments"][5]["severity"] = "severe"
    example_json["assessments"][2]["total"] = 11
    found = problems(example_json)
    assert "'mild'" in found["/assessments/5/severity"]
    assert "0-10" in found["/assessments/2/total"]


def test_audit_c_band_depends_on_sex(example_json):
    example_json["assessments"][3]["items"] = [{"number": 1, "score": 2}, {"number": 2, "score": 1}, {"number": 3, "score": 0}]
    example_json["assessments"][3]["total"] = 3
    example_json["assessments"][3]["severity"] = "positive"
    validate_record(copy.deepcopy(example_json))  # female client: 3 is positive
    example_json["client"]["sex"] = "male"
    assert "/assessments/3/severity" in problems(example_json)


def test_cssrs_needs_all_items(example_json):
    example_json["assessments"][4]["items"] = example_json["assessments"][4]["items"][:5]
    assert "/assessments/4/items" in problems(example_json)


def test_vital_shapes_and_units(example_json):
    example_json["vitals"][0]["unit"] = "lbs"
    example_json["vitals"][1]["value"] = 120
    found = problems(example_json)
    assert "/vitals/0/unit" in found
    assert "/vitals/1/value" in found


def test_invalid_npi_and_dea(example_json):
    example_json["care_team"][1]["npi"] = "1234567890"
    example_json["care_team"][0]["dea_number"] = "BO1234564"
    found = problems(example_json)
    assert "Luhn" in found["/care_team/1/npi"]
    assert "check digit" in found["/care_team/0/dea_number"]


def test_discharge_medication_disposition_must_match_status(example_json):
    example_json["discharge"]["aftercare"]["medications"][1]["disposition"] = "stopped"
    assert "/discharge/aftercare/medications/1/disposition" in problems(example_json)


def test_dose_units_are_ucum(example_json):
    example_json["prescriptions"][0]["dose"]["unit"] = "tablets"
    assert "/prescriptions/0/dose/unit" in problems(example_json)


def test_exactly_one_primary_diagnosis(example_json):
    example_json["diagnoses"][1]["rank"] = "primary"
    assert "/diagnoses" in problems(example_json)


def test_schema_is_published_and_matches_docs():
    from pathlib import Path

    schema = record_json_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    published = Path(__file__).resolve().parents[3] / "docs" / "iop-record-1.schema.json"
    assert json.loads(published.read_text()) == schema, "regenerate: iop-fhir schema > docs/iop-record-1.schema.json"


def test_schema_accepts_the_example(example_json):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(example_json, record_json_schema())


def test_helpers():
    assert npi_is_valid("1234567893") and not npi_is_valid("1234567890") and not npi_is_valid("12345")
    assert dea_is_valid("AB1234563") and not dea_is_valid("AB1234560")
    assert add_months(dt.date(2026, 1, 31), 1) == dt.date(2026, 2, 28)
    assert add_months(dt.date(2026, 8, 15), 6) == dt.date(2027, 2, 15)
    assert pointer(("prescriptions", 0, "a/b")) == "/prescriptions/0/a~1b"


def test_text_needs_visible_characters_and_no_controls(example_json):
    example_json["client"]["name"]["family"] = "A\x0cB"
    example_json["prescriptions"][0]["instructions"] = "   "
    found = problems(example_json)
    assert "control characters" in found["/client/name/family"]
    assert "visible character" in found["/prescriptions/0/instructions"]


def test_times_of_day_have_no_offset(example_json):
    example_json["prescriptions"][0]["timing"]["times_of_day"] = ["08:00:00Z"]
    assert "no UTC offset" in problems(example_json)["/prescriptions/0/timing/times_of_day/0"]


def test_mat_drugs_are_flagged(example_json):
    example_json["prescriptions"][2]["mat"] = False
    assert "medication-assisted" in problems(example_json)["/prescriptions/2/mat"]


def test_discharge_needs_actual_end(example_json):
    example_json["enrolment"].update(status="cancelled")
    del example_json["enrolment"]["actual_end"]
    assert "/enrolment/actual_end" in problems(example_json)


def test_goal_target_within_instrument_range(example_json):
    example_json["care_plan"]["goals"][0]["target"].update(measure="PHQ-2", value=10)
    assert "0-6" in problems(example_json)["/care_plan/goals/0/target/value"]


def test_contact_needs_a_value_and_identifiers_are_uris(example_json):
    example_json["client"]["contact"] = {}
    example_json["program"]["identifiers"].append({"system": "not a uri", "value": "x"})
    found = problems(example_json)
    assert "phone or an email" in found["/client/contact"]
    assert "/program/identifiers/1/system" in found


def test_program_identifiers_do_not_shadow_npi_or_minted_systems(example_json):
    example_json["program"]["identifiers"].append({"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"})
    example_json["program"]["identifiers"].append({"system": "https://iop-fhir.org/fhir/sid/riverbend-iop/mrn", "value": "x"})
    found = problems(example_json)
    assert "/program/npi" in found["/program/identifiers/1/system"]
    assert "mints" in found["/program/identifiers/2/system"]


def test_consent_categories_are_unique(example_json):
    example_json["consents"][0]["categories"] = ["medications", "medications"]
    assert "twice" in problems(example_json)["/consents/0/categories"]
