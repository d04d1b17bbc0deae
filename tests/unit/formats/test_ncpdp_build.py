"""Writing SCRIPT: canonical values, every missing requirement named, build -> parse is lossless."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iop_fhir.formats import ncpdp
from iop_fhir.formats.ncpdp import NcpdpInvalid, format_decimal, format_sent_time

GOLDEN = Path(__file__).resolve().parents[3] / "fixtures" / "ncpdp"
NOW = dt.datetime(2026, 1, 6, 12, 0, tzinfo=dt.timezone.utc)


def golden(name: str) -> ncpdp.Message:
    return ncpdp.parse((GOLDEN / f"{name}.xml").read_bytes())


def refused(message: ncpdp.Message) -> set[str]:
    with pytest.raises(NcpdpInvalid) as info:
        ncpdp.build(message)
    assert info.value.status == 422
    return {issue.location for issue in info.value.issues}


# --- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [("0.50", "0.5"), (".5", "0.5"), ("30.0", "30"), ("1E+1", "10"), ("0", "0"), ("0.000", "0"), ("120", "120"), ("2.25", "2.25"), ("1E-7", "0.0000001")],
)
def test_decimals_have_a_leading_zero_and_no_trailing_zeros(value: str, text: str) -> None:
    assert format_decimal(Decimal(value)) == text


@given(st.decimals(min_value=0, max_value=10**9, allow_nan=False, allow_infinity=False))
def test_decimal_text_is_canonical_and_exact(value: Decimal) -> None:
    text = format_decimal(value)
    assert re.fullmatch(r"(0|[1-9][0-9]*)(\.[0-9]*[1-9])?", text), text
    assert Decimal(text) == value


def test_non_finite_decimals_are_refused() -> None:
    with pytest.raises(ValueError):
        format_decimal(Decimal("NaN"))


def test_sent_time_is_utc_with_a_fraction() -> None:
    chicago = dt.timezone(dt.timedelta(hours=-6))
    assert format_sent_time(dt.datetime(2026, 1, 5, 16, 30, tzinfo=chicago)) == "2026-01-05T22:30:00.0Z"
    assert format_sent_time(dt.datetime(2022, 5, 26, 6, 19, 46, 460000, tzinfo=dt.timezone.utc)) == "2022-05-26T06:19:46.46Z"
    assert format_sent_time(dt.datetime(2022, 5, 26, 6, 19, 46, 1, tzinfo=dt.timezone.utc)) == "2022-05-26T06:19:46.000001Z"


# --- requirements --------------------------------------------------------------------------------


def test_every_missing_requirement_is_named_at_once() -> None:
    message = golden("newrx")
    medication = dataclasses.replace(message.body.medication, quantity=None, written_date=None, sig_text=None)
    body = dataclasses.replace(message.body, patient=None, pharmacy=None, medication=medication)
    header = dataclasses.replace(message.header, to=None, sent_time=None)
    prefix = "/Message/Body/NewRx"
    assert refused(ncpdp.Message(header=header, body=body)) == {
        "/Message/Header/To",
        "/Message/Header/SentTime",
        f"{prefix}/Patient",
        f"{prefix}/Pharmacy",
        f"{prefix}/MedicationPrescribed/Quantity",
        f"{prefix}/MedicationPrescribed/WrittenDate",
        f"{prefix}/MedicationPrescribed/Sig/SigText",
    }


def test_parties_need_their_identity() -> None:
    message = golden("newrx")
    body = dataclasses.replace(
        message.body,
        patient=dataclasses.replace(message.body.patient, name=ncpdp.Name(first="Jordan"), gender=None, birth_date=None),
        pharmacy=ncpdp.Pharmacy(business_name="No ids"),
        prescriber=ncpdp.Prescriber(name=ncpdp.Name(last="Okafor", first="Daniel")),
    )
    person = "/Message/Body/NewRx/Patient/HumanPatient"
    assert refused(dataclasses.replace(message, body=body)) == {
        f"{person}/Name/LastName",
        f"{person}/Gender",
        f"{person}/DateOfBirth",
        "/Message/Body/NewRx/Pharmacy/Identification",
        "/Message/Body/NewRx/Prescriber/NonVeterinarian/Identification",
    }


def test_quantities_are_coded_and_positive() -> None:
    message = golden("newrx")
    medication = dataclasses.replace(message.body.medication, quantity=ncpdp.Quantity(value=Decimal("0"), unit_code=None), days_supply=0)
    where = "/Message/Body/NewRx/MedicationPrescribed"
    assert refused(dataclasses.replace(message, body=dataclasses.replace(message.body, medication=medication))) == {
        f"{where}/Quantity/Value",
        f"{where}/Quantity/QuantityUnitOfMeasure/Code",  # never free text
        f"{where}/DaysSupply",
    }


def test_text_limits_and_characters_xml_cannot_carry() -> None:
    message = golden("newrx")
    medication = dataclasses.replace(message.body.medication, note="n" * 211, sig_text="s" * 1001, description="bad \x00 byte")
    where = "/Message/Body/NewRx/MedicationPrescribed"
    assert refused(dataclasses.replace(message, body=dataclasses.replace(message.body, medication=medication))) == {
        f"{where}/Note",
        f"{where}/Sig/SigText",
        f"{where}/DrugDescription",
    }


def test_sent_time_needs_a_zone() -> None:
    message = golden("status")
    assert refused(dataclasses.replace(message, header=dataclasses.replace(message.header, sent_time=dt.datetime(2026, 1, 6, 12)))) == {"/Message/Header/SentTime"}


def test_choices_and_counts_are_checked() -> None:
    cancel = golden("cancelrx-response")
    wrong = dataclasses.replace(cancel, body=ncpdp.CancelRxResponse(response=ncpdp.Response(outcome="Replace")))
    assert refused(wrong) == {"/Message/Body/CancelRxResponse/Response"}
    fill = golden("rxfill-dispensed")
    assert refused(dataclasses.replace(fill, body=dataclasses.replace(fill.body, fill_status=ncpdp.FillStatus(status="Lost")))) == {"/Message/Body/RxFill/FillStatus"}
    assert refused(dataclasses.replace(fill, body=dataclasses.replace(fill.body, dispensed=None))) == {"/Message/Body/RxFill/MedicationDispensed"}
    newrx = golden("newrx")
    three = (ncpdp.Diagnosis(code="F1120"), ncpdp.Diagnosis(code="F329"), ncpdp.Diagnosis(code="F411"))
    medication = dataclasses.replace(newrx.body.medication, diagnoses=three)
    assert refused(dataclasses.replace(newrx, body=dataclasses.replace(newrx.body, medication=medication))) == {"/Message/Body/NewRx/MedicationPrescribed/Diagnosis"}
    change = golden("rxchange-request")
    many = dataclasses.replace(change.body, requested=change.body.requested * 10)
    assert refused(dataclasses.replace(change, body=many)) == {"/Message/Body/RxChangeRequest/MedicationRequested"}


def test_only_an_error_may_go_without_parties() -> None:
    header = ncpdp.Header(message_id="e-1", sent_time=NOW)
    assert ncpdp.parse(ncpdp.build(ncpdp.Message(header=header, body=ncpdp.Error(code="900")))).header == header
    assert refused(ncpdp.Message(header=header, body=ncpdp.Status())) == {"/Message/Header/To", "/Message/Header/From"}


def test_building_is_deterministic() -> None:
    message = golden("rxhistory-response")
    assert ncpdp.build(message) == ncpdp.build(message) == ncpdp.build(ncpdp.parse(ncpdp.build(message)))


# --- property: whatever a medication holds, build -> parse gives it back --------------------------

# Texts as a parser gives them back: XML characters, no surrounding white space.
TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xD7FF), min_size=1, max_size=30).map(str.strip).filter(bool)
CODE = st.from_regex(r"[A-Z0-9]{1,11}", fullmatch=True)
AMOUNT = st.decimals(min_value=Decimal("0.001"), max_value=Decimal(10**6), places=3)
DAY = st.dates(dt.date(1900, 1, 1), dt.date(2100, 12, 31))
MEDICATIONS = st.builds(
    ncpdp.Medication,
    description=TEXT,
    product_code=st.none() | st.builds(ncpdp.Code, code=CODE, qualifier=st.just("ND")),
    strength=st.none() | st.builds(ncpdp.Strength, value=AMOUNT, form_code=st.none() | CODE, unit_code=CODE),
    drug_db_code=st.none() | st.builds(ncpdp.Code, code=CODE, qualifier=st.sampled_from(["SCD", "SBD"])),
    dea_schedule=st.none() | st.sampled_from(sorted(ncpdp.DEA_SCHEDULES)),
    quantity=st.builds(ncpdp.Quantity, value=AMOUNT, unit_code=st.sampled_from(sorted(ncpdp.UNIT_BY_NCI))),
    days_supply=st.none() | st.integers(1, 365),
    written_date=DAY,
    last_fill_date=st.none() | DAY,
    substitutions=st.none() | st.sampled_from(["0", "1"]),
    number_of_refills=st.none() | st.integers(0, 99),
    note=st.none() | TEXT,
    sig_text=TEXT,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MEDICATIONS, TEXT, st.datetimes(timezones=st.just(dt.timezone.utc)))
def test_build_then_parse_gives_the_message_back(medication: ncpdp.Medication, message_id: str, sent: dt.datetime) -> None:
    template = golden("newrx")
    header = dataclasses.replace(template.header, message_id=message_id, sent_time=sent)
    message = ncpdp.Message(header=header, body=dataclasses.replace(template.body, medication=medication))
    assert ncpdp.parse(ncpdp.build(message)) == message
