"""Golden SCRIPT 2017071 files: one per message kind, built byte for byte and parsed back equal.

``fixtures/ncpdp/*.xml`` are what :func:`iop_fhir.formats.ncpdp.build` writes for the messages
in :data:`EXAMPLES` (all people, ids and product codes synthetic; NPIs and DEA numbers pass
their check digits), plus ``newrx-from-record.xml``: the NewRx the mapping makes of the
example record's buprenorphine prescription. After an intended change to the builder or the
mapping, regenerate them and review the diff::

    python tests/unit/formats/test_ncpdp_golden.py
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from iop_fhir.formats import ncpdp
from iop_fhir.formats.ncpdp import (
    Address,
    Code,
    Diagnosis,
    FillStatus,
    Header,
    HistorySource,
    Medication,
    Message,
    Name,
    Patient,
    Pharmacy,
    Prescriber,
    Quantity,
    Response,
    RoutingId,
    Strength,
)
from iop_fhir.mappers.bundle import record_to_resources
from iop_fhir.pharmacy import script_mapping
from iop_fhir.record import validate_record

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = ROOT / "fixtures" / "ncpdp"
HINT = "SCRIPT output changed: regenerate with `python tests/unit/formats/test_ncpdp_golden.py` and review the diff"

UTC = dt.timezone.utc
PHARMACY_ID, PRESCRIBER_ID = "1434567", "1245319599"
TO_PHARMACY = RoutingId(value=PHARMACY_ID, qualifier="P")
TO_PRESCRIBER = RoutingId(value=PRESCRIBER_ID, qualifier="D")

PATIENT = Patient(
    name=Name(last="Rivera", first="Jordan", middle="Ann"),
    gender="F",
    birth_date=dt.date(1990, 2, 11),
    address=Address(line1="12 Elm Street", city="Springfield", state="IL", postal_code="62704", country_code="US"),
    phone="2175550142",
)
PHARMACY = Pharmacy(
    ncpdp_id=PHARMACY_ID,
    npi="1316945652",
    business_name="Main Street Pharmacy",
    address=Address(line1="88 Main Street", city="Springfield", state="IL", postal_code="62701", country_code="US"),
    phone="2175550190",
)
PRESCRIBER = Prescriber(
    name=Name(last="Okafor", first="Daniel", prefix="Dr."),
    npi=PRESCRIBER_ID,
    dea_number="BO1234563",
    address=Address(line1="400 River Road", line2="Suite 2", city="Springfield", state="IL", postal_code="62701", country_code="US"),
    phone="2175550110",
)
BUPRENORPHINE = Medication(
    description="buprenorphine 8 MG / naloxone 2 MG Sublingual Tablet",
    product_code=Code(code="00000000000", qualifier="ND"),
    strength=Strength(value=Decimal("8"), form_code="C42998", unit_code="C28253"),
    drug_db_code=Code(code="351267", qualifier="SCD"),
    dea_schedule="C48676",
    quantity=Quantity(value=Decimal("14"), unit_code="C48542"),
    days_supply=7,
    written_date=dt.date(2026, 1, 5),
    substitutions="0",
    number_of_refills=0,
    clinical_information_qualifier="1",
    diagnoses=(Diagnosis(code="F1120", description="Opioid dependence, uncomplicated"),),
    note="IOP patient, weekly supply.",
    sig_text="Dissolve 1 tablet under the tongue twice daily.",
)
SERTRALINE = Medication(
    description="sertraline 50 MG Oral Tablet",
    drug_db_code=Code(code="312941", qualifier="SCD"),
    quantity=Quantity(value=Decimal("30"), unit_code="C48542"),
    days_supply=30,
    written_date=dt.date(2026, 1, 19),
    substitutions="0",
    number_of_refills=2,
    sig_text="Take 1 tablet by mouth every morning.",
)
METHADONE_LIQUID = Medication(
    description="methadone hydrochloride 10 MG/ML Oral Solution",
    drug_db_code=Code(code="991147", qualifier="SCD"),
    dea_schedule="C48675",
    quantity=Quantity(value=Decimal("0.5"), unit_code="C28254"),
    days_supply=1,
    written_date=dt.date(2026, 1, 6),
    substitutions="1",
    number_of_refills=0,
    sig_text="Take 0.5 mL by mouth once daily.",
)


def _header(message_id: str, *, to: RoutingId, from_: RoutingId, minute: int, **more: object) -> Header:
    return Header(message_id=message_id, to=to, from_=from_, sent_time=dt.datetime(2026, 1, 6, 15, minute, 10, 250000, tzinfo=UTC), **more)


def _from_pharmacy(message_id: str, minute: int, **more: object) -> Header:
    return _header(message_id, to=TO_PRESCRIBER, from_=TO_PHARMACY, minute=minute, rx_reference_number="RX-0884213", prescriber_order_number="ep-2026-0042/rx-3", **more)


def _to_pharmacy(message_id: str, minute: int, **more: object) -> Header:
    return _header(message_id, to=TO_PHARMACY, from_=TO_PRESCRIBER, minute=minute, prescriber_order_number="ep-2026-0042/rx-3", **more)


DISPENSED = Medication(
    description=BUPRENORPHINE.description,
    product_code=BUPRENORPHINE.product_code,
    drug_db_code=BUPRENORPHINE.drug_db_code,
    dea_schedule="C48676",
    quantity=Quantity(value=Decimal("14"), unit_code="C48542"),
    days_supply=7,
    written_date=dt.date(2026, 1, 5),
    last_fill_date=dt.date(2026, 1, 6),
    substitutions="0",
    number_of_refills=0,
    sig_text=BUPRENORPHINE.sig_text,
)

EXAMPLES: dict[str, Message] = {
    "newrx": Message(
        header=_to_pharmacy(
            "iopgw-newrx-0001",
            1,
            sender_software=ncpdp.SenderSoftware(developer="iop-fhir", product="iop-fhir gateway", version="0.1.0"),
            digital_signature=True,
        ),
        body=ncpdp.NewRx(patient=PATIENT, pharmacy=PHARMACY, prescriber=PRESCRIBER, medication=BUPRENORPHINE, prohibit_renewal_request=False),
    ),
    "newrx-liquid": Message(
        header=_to_pharmacy("iopgw-newrx-0002", 2),
        body=ncpdp.NewRx(patient=PATIENT, pharmacy=PHARMACY, prescriber=PRESCRIBER, medication=METHADONE_LIQUID),
    ),
    "cancelrx": Message(
        header=_to_pharmacy("iopgw-cancel-0001", 3, relates_to_message_id="iopgw-newrx-0001", rx_reference_number="RX-0884213"),
        body=ncpdp.CancelRx(patient=PATIENT, pharmacy=PHARMACY, prescriber=PRESCRIBER, medication=BUPRENORPHINE),
    ),
    "cancelrx-response": Message(
        header=_from_pharmacy("ph-cancel-0001", 4, relates_to_message_id="iopgw-cancel-0001"),
        body=ncpdp.CancelRxResponse(response=Response(outcome="Denied", reason_codes=("AA",), denial_reason="Already dispensed")),
    ),
    "rxrenewal-request": Message(
        header=_from_pharmacy("ph-renew-0001", 5),
        body=ncpdp.RxRenewalRequest(
            patient=PATIENT,
            pharmacy=PHARMACY,
            prescriber=PRESCRIBER,
            dispensed=Medication(
                description=SERTRALINE.description,
                drug_db_code=SERTRALINE.drug_db_code,
                quantity=SERTRALINE.quantity,
                days_supply=30,
                written_date=SERTRALINE.written_date,
                last_fill_date=dt.date(2026, 3, 20),
                number_of_refills=0,
                pharmacy_requested_refills=2,
                sig_text=SERTRALINE.sig_text,
            ),
            prescribed=SERTRALINE,
        ),
    ),
    "rxrenewal-response": Message(
        header=_to_pharmacy("iopgw-renew-0001", 6, relates_to_message_id="ph-renew-0001", rx_reference_number="RX-0884213"),
        body=ncpdp.RxRenewalResponse(
            response=Response(outcome="Approved", note="Renewed for 90 days"),
            patient=PATIENT,
            pharmacy=PHARMACY,
            prescriber=PRESCRIBER,
            prescribed=Medication(**{**SERTRALINE.__dict__, "written_date": dt.date(2026, 3, 21)}),
        ),
    ),
    "rxchange-request": Message(
        header=_from_pharmacy("ph-change-0001", 7),
        body=ncpdp.RxChangeRequest(
            request_code="G",
            patient=PATIENT,
            pharmacy=PHARMACY,
            prescriber=PRESCRIBER,
            prescribed=Medication(**{**SERTRALINE.__dict__, "description": "sertraline 50 MG Oral Tablet [Zoloft]", "drug_db_code": Code(code="208161", qualifier="SBD"), "substitutions": "1"}),
            requested=(SERTRALINE,),
        ),
    ),
    "rxchange-response": Message(
        header=_to_pharmacy("iopgw-change-0001", 8, relates_to_message_id="ph-change-0001", rx_reference_number="RX-0884213"),
        body=ncpdp.RxChangeResponse(response=Response(outcome="Approved"), patient=PATIENT, pharmacy=PHARMACY, prescriber=PRESCRIBER, prescribed=SERTRALINE),
    ),
    "rxfill-dispensed": Message(
        header=_from_pharmacy("ph-fill-0001", 9, relates_to_message_id="iopgw-newrx-0001"),
        body=ncpdp.RxFill(fill_status=FillStatus(status="Dispensed", note="Picked up by patient"), patient=PATIENT, pharmacy=PHARMACY, prescriber=PRESCRIBER, dispensed=DISPENSED),
    ),
    "rxfill-partially-dispensed": Message(
        header=_from_pharmacy("ph-fill-0002", 10),
        body=ncpdp.RxFill(
            fill_status=FillStatus(status="PartiallyDispensed", note="8 tablets owed"),
            patient=PATIENT,
            pharmacy=PHARMACY,
            prescriber=PRESCRIBER,
            dispensed=Medication(**{**DISPENSED.__dict__, "quantity": Quantity(value=Decimal("6"), unit_code="C48542"), "days_supply": 3}),
        ),
    ),
    "rxfill-not-dispensed": Message(
        header=_from_pharmacy("ph-fill-0003", 11),
        body=ncpdp.RxFill(
            fill_status=FillStatus(status="NotDispensed", note="Not picked up within 10 days; returned to stock"),
            patient=PATIENT,
            pharmacy=PHARMACY,
            prescriber=PRESCRIBER,
            prescribed=BUPRENORPHINE,
        ),
    ),
    "rxfill-transferred": Message(
        header=_from_pharmacy("ph-fill-0004", 12),
        body=ncpdp.RxFill(fill_status=FillStatus(status="Transferred", note="Transferred to NCPDPID 1499999"), patient=PATIENT, pharmacy=PHARMACY, prescriber=PRESCRIBER, prescribed=BUPRENORPHINE),
    ),
    "rxhistory-request": Message(
        header=_header("iopgw-hist-0001", to=RoutingId(value="MEDHX", qualifier="ZZZ"), from_=TO_PRESCRIBER, minute=13),
        body=ncpdp.RxHistoryRequest(patient=PATIENT, prescriber=PRESCRIBER, start_date=dt.date(2025, 1, 6), end_date=dt.date(2026, 1, 6), consent="Y"),
    ),
    "rxhistory-response": Message(
        header=_header("mh-0001", to=TO_PRESCRIBER, from_=RoutingId(value="MEDHX", qualifier="ZZZ"), minute=14, relates_to_message_id="iopgw-hist-0001"),
        body=ncpdp.RxHistoryResponse(
            patient=PATIENT,
            prescriber=PRESCRIBER,
            dispensed=(
                Medication(
                    description="naltrexone hydrochloride 50 MG Oral Tablet",
                    drug_db_code=Code(code="1483744", qualifier="SCD"),
                    quantity=Quantity(value=Decimal("30"), unit_code="C48542"),
                    days_supply=30,
                    written_date=dt.date(2025, 12, 2),
                    last_fill_date=dt.date(2025, 12, 3),
                    history_source=HistorySource(source_reference="RX-0771902", fill_number=1),
                    pharmacy=PHARMACY,
                    prescriber=Prescriber(name=Name(last="Ferris", first="Jo"), npi="1679576722"),
                ),
                # The same fill again, as a second source (a PBM's claims) reports it.
                Medication(
                    description="naltrexone 50 MG Oral Tablet",
                    quantity=Quantity(value=Decimal("30"), unit_code="C48542"),
                    days_supply=30,
                    written_date=dt.date(2025, 12, 2),
                    last_fill_date=dt.date(2025, 12, 3),
                    history_source=HistorySource(source_reference="RX-0771902", fill_number=1, payment_type="01"),
                    pharmacy=Pharmacy(ncpdp_id=PHARMACY_ID),
                ),
                Medication(
                    description="sertraline 50 MG Oral Tablet",
                    drug_db_code=Code(code="312941", qualifier="SCD"),
                    quantity=Quantity(value=Decimal("30"), unit_code="C48542"),
                    days_supply=30,
                    written_date=dt.date(2025, 11, 20),
                    number_of_refills=5,
                    sig_text="Take 1 tablet by mouth daily.",
                    history_source=HistorySource(source_reference="RX-0779115"),
                    prescriber=Prescriber(name=Name(last="Ferris", first="Jo"), npi="1679576722"),
                ),
            ),
        ),
    ),
    "status": Message(header=_header("iopgw-st-0001", to=TO_PHARMACY, from_=TO_PRESCRIBER, minute=15, relates_to_message_id="ph-fill-0001"), body=ncpdp.Status()),
    "verify": Message(
        header=_header("ph-ver-0001", to=TO_PRESCRIBER, from_=TO_PHARMACY, minute=16, relates_to_message_id="iopgw-newrx-0001"),
        body=ncpdp.Verify(description="Accepted by pharmacy"),
    ),
    "error": Message(
        header=_header("iopgw-err-0001", to=TO_PHARMACY, from_=TO_PRESCRIBER, minute=17, relates_to_message_id="ph-fill-0005"),
        body=ncpdp.Error(code="900", description="/Message/Body/RxFill/FillStatus: is required, with one of Dispensed, PartiallyDispensed, NotDispensed, Transferred"),
    ),
}


def record_new_rx() -> Message:
    """The NewRx of the example record's buprenorphine/naloxone film prescription (ep-2026-0042/rx-3)."""
    record = validate_record(json.loads((ROOT / "fixtures/iop/example-dual-diagnosis.json").read_text()))
    resources = record_to_resources(record)
    by_reference = {f"urn:uuid:{r['id']}": r for r in resources}
    request = next(r for r in resources if r["resourceType"] == "MedicationRequest" and r["identifier"][0]["value"] == "ep-2026-0042/rx-3")
    sent = dt.datetime(2026, 1, 5, 16, 30, tzinfo=dt.timezone(dt.timedelta(hours=-6)))
    return script_mapping.new_rx(request, by_reference.get, message_id="iopgw-example-0001", sent=sent, to_ncpdp_id="1234567")


def all_golden() -> dict[str, Message]:
    return {**EXAMPLES, "newrx-from-record": record_new_rx()}


@pytest.mark.parametrize("name", sorted(all_golden()))
def test_build_equals_golden_and_parses_back(name: str) -> None:
    message = all_golden()[name]
    expected = (GOLDEN / f"{name}.xml").read_bytes()
    assert ncpdp.build(message) == expected, HINT
    assert ncpdp.parse(expected) == message


def test_every_message_kind_has_a_golden_file() -> None:
    kinds = {message.kind for message in all_golden().values()}
    assert kinds == set(ncpdp.messages.BODY_KINDS)
    assert {m.body.fill_status.status for m in EXAMPLES.values() if isinstance(m.body, ncpdp.RxFill)} == set(ncpdp.FILL_STATUSES)
    assert sorted(p.stem for p in GOLDEN.glob("*.xml")) == sorted(all_golden()), "a golden file without its example, or the reverse"


def test_golden_files_have_the_2017071_envelope() -> None:
    for path in GOLDEN.glob("*.xml"):
        text = path.read_text(encoding="utf-8")
        assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<Message '), path.name
        assert 'TransactionVersion="20170715"' in text and 'ECLVersion="20170715"' in text, path.name
        assert "ncpdp.org/schema" not in text, path.name
        assert ncpdp.parse(path.read_bytes()).version == "2017071"


def regenerate() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name, message in sorted(all_golden().items()):
        (GOLDEN / f"{name}.xml").write_bytes(ncpdp.build(message))
        print(f"wrote fixtures/ncpdp/{name}.xml", file=sys.stderr)


if __name__ == "__main__":
    regenerate()
