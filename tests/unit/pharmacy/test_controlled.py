"""Controlled-substance rules: each refusal says why and names the field; generated orders pass."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iop_fhir.generate import generate_record
from iop_fhir.mappers.bundle import record_to_resources
from iop_fhir.mappers.datatypes import code_in_any
from iop_fhir.mappers.organization import PHARMACY_TYPE
from iop_fhir.pharmacy import controlled
from iop_fhir.pharmacy.controlled import check
from iop_fhir.record import validate_record
from iop_fhir.record.validate import add_months
from iop_fhir.terminology import ICD10CM, RXNORM, extension_url

REFILLS = "MedicationRequest.dispenseRequest.numberOfRepeatsAllowed"
PERFORMER = "MedicationRequest.dispenseRequest.performer"
BUPRENORPHINE = ("351267", "buprenorphine 8 MG / naloxone 2 MG Sublingual Tablet")  # III in the table
METHADONE = ("991147", "methadone hydrochloride 10 MG/ML Oral Solution")  # II, MAT
SERTRALINE = ("312941", "sertraline 50 MG Oral Tablet")
LORAZEPAM = ("197901", "lorazepam 1 MG Oral Tablet")  # not in the table: the extension decides


def order(product: tuple[str, str], *, refills: int | None = 0, days: int | None = 30, written: str | None = "2026-01-05", **more: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": product[0], "display": product[1]}], "text": product[1]},
        "subject": {"reference": "Patient/p"},
        "dispenseRequest": {},
    }
    if written is not None:
        request["authoredOn"] = written
    if refills is not None:
        request["dispenseRequest"]["numberOfRepeatsAllowed"] = refills
    if days is not None:
        request["dispenseRequest"]["expectedSupplyDuration"] = {"value": days, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"}
    extensions = []
    if "schedule" in more:
        extensions.append({"url": extension_url("dea-schedule"), "valueCode": more.pop("schedule")})
    if "mat" in more:
        extensions.append({"url": extension_url("medication-assisted-treatment"), "valueBoolean": more.pop("mat")})
    if extensions:
        request["extension"] = extensions
    request.update(more)
    return request


def where(issues: list) -> list[str]:
    assert all(issue.code in ("business-rule", "required") and issue.message for issue in issues)
    return [issue.location for issue in issues]


def test_uncontrolled_orders_pass() -> None:
    assert check(order(SERTRALINE, refills=11, days=90), pharmacy_kind="retail") == []


def test_the_drug_table_decides_the_schedule_over_the_extension() -> None:
    assert controlled.dea_schedule(order(SERTRALINE, schedule="II")) is None
    assert controlled.dea_schedule(order(BUPRENORPHINE)) == "III"
    assert controlled.dea_schedule(order(LORAZEPAM, schedule="IV")) == "IV"
    assert controlled.dea_schedule(order(LORAZEPAM, schedule="VI")) is None


def test_schedule_two_has_no_refills() -> None:
    pain = dict(mat=False)
    assert check(order(METHADONE, refills=0, **pain), pharmacy_kind="retail") == []
    issues = check(order(METHADONE, refills=1, **pain), pharmacy_kind="retail")
    assert where(issues) == [REFILLS] and "Schedule II" in issues[0].message and "1306.12" in issues[0].message


@pytest.mark.parametrize(("product", "schedule"), [(BUPRENORPHINE, None), (LORAZEPAM, "IV")])
def test_schedules_three_and_four_allow_five_refills(product: tuple[str, str], schedule: str | None) -> None:
    extra = {"schedule": schedule} if schedule else {}
    assert check(order(product, refills=5, days=14, **extra), pharmacy_kind="retail") == []
    issues = check(order(product, refills=6, days=14, **extra), pharmacy_kind="retail")
    assert where(issues) == [REFILLS] and "at most 5 refills" in issues[0].message


def test_schedules_three_and_four_end_within_six_months_of_writing() -> None:
    # 2026-01-05 + 6 months = 2026-07-05: 180 days of supply fit, 186 do not.
    assert check(order(BUPRENORPHINE, refills=5, days=30), pharmacy_kind="retail") == []
    issues = check(order(BUPRENORPHINE, refills=5, days=31), pharmacy_kind="retail")
    assert where(issues) == [REFILLS] and "2026-07-10" in issues[0].message and "2026-07-05" in issues[0].message
    # The limit day itself is inside: written 01-31, limit 07-31 (181 days).
    assert check(order(BUPRENORPHINE, refills=0, days=181, written="2026-01-31"), pharmacy_kind="retail") == []
    assert where(check(order(BUPRENORPHINE, refills=0, days=182, written="2026-01-31"), pharmacy_kind="retail")) == [REFILLS]


def test_the_six_month_rule_needs_its_dates() -> None:
    issues = check(order(BUPRENORPHINE, days=None, written=None), pharmacy_kind="retail")
    assert where(issues) == ["MedicationRequest.authoredOn", "MedicationRequest.dispenseRequest.expectedSupplyDuration"]
    assert all(issue.code == "required" for issue in issues)


def test_schedule_five_has_no_federal_cap_and_schedule_one_is_never_prescribed() -> None:
    assert check(order(LORAZEPAM, refills=11, days=90, schedule="V"), pharmacy_kind="retail") == []
    assert where(check(order(LORAZEPAM, schedule="I"), pharmacy_kind="retail")) == ["MedicationRequest.medicationCodeableConcept"]


@pytest.mark.parametrize("kind", ["retail", "mail-order", "specialty", None])
def test_methadone_for_opioid_use_disorder_goes_to_an_otp_only(kind: str | None) -> None:
    issues = check(order(METHADONE, mat=True), pharmacy_kind=kind)
    assert where(issues) == [PERFORMER] and "opioid treatment program" in issues[0].message
    assert check(order(METHADONE, mat=True), pharmacy_kind=controlled.OPIOID_TREATMENT_PROGRAM) == []


def test_what_makes_methadone_for_opioid_use_disorder() -> None:
    condition = {"resourceType": "Condition", "code": {"coding": [{"system": ICD10CM, "code": "F11.20"}]}}
    resolve = {"Condition/oud": condition}.get
    # An OUD diagnosis outweighs a MAT flag said false.
    via_reference = order(METHADONE, mat=False, reasonReference=[{"reference": "Condition/oud"}])
    assert where(check(via_reference, pharmacy_kind="retail", resolve=resolve)) == [PERFORMER]
    via_code = order(METHADONE, mat=False, reasonCode=[{"coding": [{"system": ICD10CM, "code": "F11.23"}]}])
    assert where(check(via_code, pharmacy_kind="retail")) == [PERFORMER]
    # Nothing said: the drug table's MAT flag (true for methadone) decides.
    assert where(check(order(METHADONE), pharmacy_kind="retail")) == [PERFORMER]
    # Pain: MAT false and no OUD diagnosis.
    pain = order(METHADONE, mat=False, reasonCode=[{"coding": [{"system": ICD10CM, "code": "G89.29"}]}])
    assert check(pain, pharmacy_kind="retail") == []


def test_methadone_the_table_does_not_know_is_recognised_by_name() -> None:
    unknown = order(("999999", "Methadone Hydrochloride 5 MG Oral Tablet"), schedule="II")
    assert where(check(unknown, pharmacy_kind="retail")) == [PERFORMER]
    contained = {
        "resourceType": "MedicationRequest",
        "contained": [{"resourceType": "Medication", "id": "m", "code": {"text": "methadone 10 mg/mL oral concentrate"}}],
        "medicationReference": {"reference": "#m"},
        "authoredOn": "2026-01-05",
    }
    assert where(check(contained, pharmacy_kind="retail")) == [PERFORMER]


def test_refusals_add_up() -> None:
    issues = check(order(METHADONE, refills=2, mat=True), pharmacy_kind="retail")
    assert where(issues) == [REFILLS, PERFORMER]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 8), st.integers(1, 120), st.dates(dt.date(2024, 1, 1), dt.date(2027, 12, 31)))
def test_more_refills_or_supply_never_lifts_a_refusal(refills: int, days: int, written: dt.date) -> None:
    def refused(r: int, d: int) -> bool:
        return bool(check(order(BUPRENORPHINE, refills=r, days=d, written=written.isoformat()), pharmacy_kind="retail"))

    if refused(refills, days):
        assert refused(refills + 1, days) and refused(refills, days + 1)
    allowed_days = (add_months(written, 6) - written).days
    assert refused(refills, days) == (refills > 5 or days * (refills + 1) > allowed_days)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 2**16))
def test_generated_prescriptions_honour_the_rules(index: int, seed: int) -> None:
    """The generator writes lawful orders by construction; the rules agree with it."""
    resources = record_to_resources(validate_record(generate_record(index, seed)))
    by_reference = {f"urn:uuid:{r['id']}": r for r in resources}
    for request in resources:
        if request["resourceType"] != "MedicationRequest" or request["intent"] != "order":
            continue
        pharmacy = by_reference.get(request.get("dispenseRequest", {}).get("performer", {}).get("reference", ""))
        kind = code_in_any(pharmacy.get("type"), PHARMACY_TYPE) if pharmacy else None
        assert check(copy.deepcopy(request), pharmacy_kind=kind, resolve=by_reference.get) == [], request["identifier"]
