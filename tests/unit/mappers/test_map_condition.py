"""Diagnoses <-> Condition."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import LOCAL_IDS, SETTINGS, TEXT, assert_lossless, reverse, with_parts

from iop_fhir import terminology
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers import condition
from iop_fhir.mappers.context import MappingContext
from iop_fhir.mappers.datatypes import choices
from iop_fhir.record.model import Diagnosis

RANK_URL = terminology.extension_url("diagnosis-rank")
ICD10 = st.from_regex(r"[A-TV-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?", fullmatch=True) | st.sampled_from(sorted(terminology.tables()["icd10cm"]))


@st.composite
def diagnoses(draw: st.DrawFn) -> list[dict]:
    items = draw(
        st.lists(
            st.fixed_dictionaries(
                {"id": LOCAL_IDS, "code": ICD10},
                optional={
                    "display": TEXT,
                    "clinical_status": st.sampled_from(sorted(choices(Diagnosis, "clinical_status"))),
                    "onset": st.dates(dt.date(1988, 3, 14), dt.date(2026, 2, 27)).map(dt.date.isoformat),  # after the example's birth
                },
            ),
            min_size=1,
            max_size=6,
            unique_by=lambda d: d["id"],
        )
    )
    primary = draw(st.integers(0, len(items) - 1))
    return [{**d, "rank": "primary" if i == primary else "secondary"} for i, d in enumerate(items)]


def test_example_conditions(example_record):
    ctx = MappingContext(example_record)
    first, second = condition.to_fhir(ctx)
    assert validate_resource(first) == [] and validate_resource(second) == []
    assert first["meta"]["profile"] == [terminology.us_core("us-core-condition-problems-health-concerns")]
    assert first["id"] == ctx.condition("dx-1")["reference"].removeprefix("urn:uuid:")
    assert first["identifier"][0]["value"] == "ep-2026-0042/dx-1"
    assert first["extension"] == [{"url": RANK_URL, "valueCode": "primary"}]
    assert first["code"] == {
        "coding": [{"system": terminology.ICD10CM, "code": "F33.1", "display": "Major depressive disorder, recurrent, moderate"}],
        "text": "Major depressive disorder, recurrent, moderate",
    }
    assert first["category"][0]["coding"][0]["code"] == "problem-list-item"
    assert first["clinicalStatus"]["coding"][0]["code"] == "active"
    assert first["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert first["onsetDateTime"] == "2019-06-01" and first["subject"] == ctx.patient
    assert second["extension"][0]["valueCode"] == "secondary" and "onsetDateTime" not in second


def test_display_from_the_table_is_not_read_back(example_json):
    record = with_parts(example_json, diagnoses=[{"id": "d", "code": "F41.1", "rank": "primary"}])
    (resource,) = condition.to_fhir(MappingContext(record))
    assert resource["code"] == {"coding": [{"system": terminology.ICD10CM, "code": "F41.1", "display": "Generalized anxiety disorder"}]}
    draft, report = reverse([resource], condition)
    assert draft["diagnoses"] == [{"id": "d", "code": "F41.1", "rank": "primary", "clinical_status": "active"}]


def test_example_round_trip(example_record):
    assert_lossless(example_record, (condition,), diagnoses=Diagnosis)


@SETTINGS
@given(items=diagnoses())
def test_any_diagnoses_round_trip(example_json, items):
    assert_lossless(with_parts(example_json, diagnoses=items), (condition,), diagnoses=Diagnosis)


# --- foreign FHIR ----------------------------------------------------------------------------


def foreign(cid: str, *codings: dict, **extra: object) -> dict:
    return {"resourceType": "Condition", "id": cid, "code": {"coding": list(codings)}, "subject": {"reference": "Patient/p"}, **extra}


SNOMED_MDD = {"system": terminology.SNOMED, "code": "66344007", "display": "Recurrent major depression"}


def test_snomed_only_is_an_error_naming_the_code():
    draft, report = reverse([foreign("c1", SNOMED_MDD)], condition)
    assert draft["diagnoses"] == []
    (error,) = report.errors
    assert error.location == "Condition/c1.code" and "http://snomed.info/sct|66344007" in error.message


@pytest.mark.parametrize("raw, code", [("F3310", "F33.10"), ("f33.1", "F33.1"), ("F329", "F32.9"), ("F29", "F29")])
def test_icd10cm_codes_are_normalised(raw, code):
    draft, report = reverse([foreign("c2", SNOMED_MDD, {"system": terminology.ICD10CM, "code": raw}, clinicalStatus={"coding": [{"system": terminology.CONDITION_CLINICAL, "code": "remission"}]})], condition)
    assert draft["diagnoses"] == [{"id": "c2", "code": code, "rank": "primary", "clinical_status": "remission"}]
    normalised = [i for i in report.issues if i.location == "Condition/c2.code"]
    assert [i.severity for i in normalised] == (["information"] if raw != code else [])


def test_rank_comes_from_the_episode_and_a_missing_primary_is_guessed_with_a_warning():
    conditions = [foreign(f"c{n}", {"system": terminology.ICD10CM, "code": "F41.1"}) for n in (1, 2, 3)]
    episode = {"resourceType": "EpisodeOfCare", "diagnosis": [{"condition": {"reference": "Condition/c2"}, "rank": 1}, {"condition": {"reference": "Condition/c3"}, "rank": 2}]}
    draft, report = reverse([*conditions, episode], condition)
    assert [d["rank"] for d in draft["diagnoses"]] == ["secondary", "primary", "secondary"]
    assert [i.location for i in report.issues if i.severity == "warning"] == ["Condition/c1.extension"]
    draft, report = reverse(conditions, condition)
    assert [d["rank"] for d in draft["diagnoses"]] == ["primary", "secondary", "secondary"]


def test_onset_forms():
    icd = {"system": terminology.ICD10CM, "code": "F41.1"}
    draft, report = reverse(
        [
            foreign("a", icd, onsetDateTime="2020-05-04T10:00:00-05:00"),
            foreign("b", icd, onsetPeriod={"start": "2021-01-02"}),
            foreign("c", icd, onsetString="childhood"),
            foreign("d", icd, onsetDateTime="2019"),
        ],
        condition,
    )
    assert [d.get("onset") for d in draft["diagnoses"]] == ["2020-05-04", "2021-01-02", None, None]
    assert [i.location for i in report.issues if i.severity == "warning" and "onset" in i.location] == ["Condition/c.onsetString", "Condition/d.onsetDateTime"]


def test_refuted_conditions_are_not_diagnoses():
    refuted = foreign("r", {"system": terminology.ICD10CM, "code": "F41.1"}, verificationStatus={"coding": [{"system": terminology.CONDITION_VERIFICATION, "code": "refuted"}]})
    draft, report = reverse([refuted], condition)
    assert draft["diagnoses"] == [] and report.issues[0].severity == "warning"


@pytest.mark.parametrize(
    "garbage",
    [
        {"code": "F33.1"},
        {"code": {"coding": "F33.1"}, "clinicalStatus": "active", "extension": {"url": "x"}},
        {"code": {"coding": [None, {"system": terminology.ICD10CM, "code": 33}]}, "onsetDateTime": 2019, "identifier": 5},
        {"code": {"coding": [{"system": terminology.ICD10CM, "code": "not a code"}]}, "onsetPeriod": "2019"},
    ],
)
def test_garbage_shapes_never_crash(garbage):
    episode = {"resourceType": "EpisodeOfCare", "diagnosis": [{"condition": "Condition/g", "rank": "1"}, None]}
    draft, report = reverse([{"resourceType": "Condition", "id": "g", **garbage}, episode], condition)
    assert draft["diagnoses"] == [] and report.errors
