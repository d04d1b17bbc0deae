"""Reading SCRIPT: tolerant of what senders write, one 400 error for anything unreadable or hostile.

Hostile inputs are refused quickly (each bounded to a couple of seconds on a slow machine),
and a property test mutates the golden files at random: every outcome is a Message or an
NcpdpRejected, never another exception.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from iop_fhir.errors import IopFhirError, TransientDeliveryError
from iop_fhir.formats import ncpdp
from iop_fhir.formats.ncpdp import NcpdpRejected

GOLDEN = Path(__file__).resolve().parents[3] / "fixtures" / "ncpdp"
NOW = dt.datetime(2026, 1, 6, 12, 0, tzinfo=dt.timezone.utc)
SCRIPT_10_6 = "http://www.ncpdp.org/schema/SCRIPT"
BOUND = 2.0  # seconds; the limits stop hostile input long before


def golden(name: str) -> bytes:
    return (GOLDEN / f"{name}.xml").read_bytes()


def rejected(data: bytes | str) -> NcpdpRejected:
    start = time.perf_counter()
    with pytest.raises(NcpdpRejected) as info:
        ncpdp.parse(data)
    assert time.perf_counter() - start < BOUND
    assert info.value.status == 400 and info.value.issues
    return info.value


def locations(exc: IopFhirError) -> set[str]:
    return {issue.location for issue in exc.issues}


# --- the shared samples: synthetic and not conformant, read tolerantly ---------------------------


def test_every_shared_sample_parses(shared_dir: Path) -> None:
    samples = sorted((shared_dir / "samples" / "ncpdp").glob("*.xml"))
    assert len(samples) >= 5
    kinds = {path.name: ncpdp.parse(path.read_bytes()).kind for path in samples}
    assert kinds == {
        "cancelrx-response-denied.xml": "CancelRxResponse",
        "newrx-coded-and-strength.xml": "NewRx",
        "newrx.xml": "NewRx",
        "rxchange-request.xml": "RxChangeRequest",
        "rxrenewal-request.xml": "RxRenewalRequest",
    }


def test_sample_quirks_are_read_for_what_they_mean(shared_dir: Path) -> None:
    folder = shared_dir / "samples" / "ncpdp"
    coded = ncpdp.parse((folder / "newrx-coded-and-strength.xml").read_bytes())
    medication = coded.body.medication
    # Qualifier as an attribute, Strength beside DrugCoded, 10.6 Directions, no To qualifier.
    assert medication.product_code == ncpdp.Code(code="00185010201", qualifier="ND")
    assert medication.strength == ncpdp.Strength(value=Decimal("10"), form_code="C42998", unit_code="C28253")
    assert medication.sig_text == "Take 1 tablet by mouth once daily."
    assert medication.number_of_refills == 3 and medication.days_supply == 90
    assert coded.header.to == ncpdp.RoutingId(value="SurescriptsTestPharmacy")
    assert coded.header.sent_time == dt.datetime(2026, 2, 1, 14, 5, tzinfo=dt.timezone.utc)

    bare = ncpdp.parse((folder / "newrx.xml").read_bytes())  # no version, header holds only MessageID
    assert bare.version is None and bare.header.message_id == "1675932112456"
    assert bare.header.to is None and bare.header.sent_time is None and bare.body.pharmacy is None
    assert bare.body.patient.address.country_code == "US"  # written as <Country>
    assert bare.body.prescriber.phone == "716-873-1557"

    denied = ncpdp.parse((folder / "cancelrx-response-denied.xml").read_bytes())
    assert denied.body.response == ncpdp.Response(outcome="Denied", reason_codes=("AA",), denial_reason="Prescription was already dispensed and cannot be cancelled.")
    assert denied.header.relates_to_message_id == "SYNTH-MSG-0401"

    change = ncpdp.parse((folder / "rxchange-request.xml").read_bytes())
    assert change.body.prescribed.quantity == ncpdp.Quantity(value=Decimal("30"), unit_code=None, code_list_qualifier="38")
    assert change.body.pharmacy.npi == "1999999999" and change.body.requested == ()


# --- the 10.6 namespace variant ------------------------------------------------------------------


def as_10_6(data: bytes) -> bytes:
    """The same message in the 10.6 envelope: default namespace, version/release, no 2017071 attributes."""
    root = etree.fromstring(data)
    for element in root.iter():
        element.tag = f"{{{SCRIPT_10_6}}}{element.tag}"
    new_root = etree.Element(f"{{{SCRIPT_10_6}}}Message", nsmap={None: SCRIPT_10_6}, version="010", release="006")
    new_root.extend(list(root))
    return etree.tostring(new_root, xml_declaration=True, encoding="UTF-8")


@pytest.mark.parametrize("name", ["newrx", "rxfill-dispensed", "rxhistory-response", "rxchange-request", "status"])
def test_the_10_6_namespace_variant_reads_like_2017071(name: str) -> None:
    original = ncpdp.parse(golden(name))
    variant = ncpdp.parse(as_10_6(golden(name)))
    assert variant == original
    assert variant.version == "10.6" and original.version == "2017071"


def test_10_6_names_and_shapes_are_understood() -> None:
    message = f"""<Message xmlns="{SCRIPT_10_6}" version="010" release="006">
      <Header><To Qualifier="D">123</To><From Qualifier="P">1434567</From><MessageID>r1</MessageID>
        <SentTime>2016-05-01T10:00:00</SentTime></Header>
      <Body><RefillRequest>
        <Patient><Name><LastName>Doe</LastName><FirstName>Ann</FirstName></Name><Gender>f</Gender>
          <DateOfBirth><Date>1980-01-02</Date></DateOfBirth></Patient>
        <Pharmacy><Identification><NCPDPID>1434567</NCPDPID></Identification><StoreName>Corner Drug</StoreName>
          <CommunicationNumbers><Communication><Number>5555550100</Number><Qualifier>TE</Qualifier></Communication></CommunicationNumbers></Pharmacy>
        <Prescriber><Name><LastName>Roe</LastName><FirstName>Al</FirstName></Name><Identification><NPI>1245319599</NPI></Identification></Prescriber>
        <MedicationPrescribed><DrugDescription>sertraline 50 MG Oral Tablet</DrugDescription>
          <DrugCoded><ProductCode>00000000000</ProductCode><ProductCodeQualifier>ND</ProductCodeQualifier></DrugCoded>
          <Quantity><Qualifier>38</Qualifier><Value>30</Value><PotencyUnitCode>C48542</PotencyUnitCode></Quantity>
          <Directions>Take one daily</Directions><Refills><Qualifier>R</Qualifier><Value>2</Value></Refills>
          <Diagnosis><ClinicalInformationQualifier>1</ClinicalInformationQualifier><Primary><Qualifier>ABF</Qualifier><Value>F329</Value></Primary></Diagnosis>
        </MedicationPrescribed>
      </RefillRequest></Body></Message>"""
    parsed = ncpdp.parse(message)  # str input is accepted too
    assert parsed.kind == "RxRenewalRequest" and parsed.version == "10.6"
    assert parsed.header.sent_time == dt.datetime(2016, 5, 1, 10, 0, tzinfo=dt.timezone.utc)  # UTC when unzoned
    body = parsed.body
    assert body.patient.name == ncpdp.Name(last="Doe", first="Ann") and body.patient.gender == "F"
    assert body.pharmacy == ncpdp.Pharmacy(ncpdp_id="1434567", business_name="Corner Drug", phone="5555550100")
    assert body.prescriber.npi == "1245319599" and body.prescriber.name.last == "Roe"
    medication = body.prescribed
    assert medication.product_code == ncpdp.Code(code="00000000000", qualifier="ND")
    assert medication.quantity == ncpdp.Quantity(value=Decimal("30"), unit_code="C48542", code_list_qualifier="38")
    assert medication.sig_text == "Take one daily" and medication.number_of_refills == 2
    assert medication.diagnoses == (ncpdp.Diagnosis(code="F329", qualifier="ABF"),)


def test_10_6_replace_alias_and_prn_refills() -> None:
    message = b"""<Message><Header><MessageID>x</MessageID></Header><Body><RefillResponse>
      <Response><DeniedNewPrescriptionToFollow><Note>new Rx follows</Note></DeniedNewPrescriptionToFollow></Response>
      <MedicationPrescribed><DrugDescription>d</DrugDescription><Refills><Qualifier>PRN</Qualifier></Refills></MedicationPrescribed>
    </RefillResponse></Body></Message>"""
    parsed = ncpdp.parse(message)
    assert parsed.body.response == ncpdp.Response(outcome="Replace", note="new Rx follows")
    assert parsed.body.prescribed.number_of_refills is None


def test_dates_may_be_datetimes_and_unknown_elements_are_skipped() -> None:
    data = golden("rxfill-dispensed").replace(b"<Date>2026-01-06</Date>", b"<DateTime>2026-01-06T14:00:00.5Z</DateTime>")
    data = data.replace(b"<DaysSupply>", b"<Mystery><Deep>ignored</Deep></Mystery><DaysSupply>")
    assert ncpdp.parse(data) == ncpdp.parse(golden("rxfill-dispensed"))


# --- refusals: one error type, located ------------------------------------------------------------


def test_wrong_root_is_refused_naming_it() -> None:
    exc = rejected(b"<Bundle xmlns='http://hl7.org/fhir'/>")
    assert locations(exc) == {"/Bundle"}
    exc = rejected(b"<Message xmlns='urn:not-ncpdp'><Header><MessageID>1</MessageID></Header></Message>")
    assert "urn:not-ncpdp" in exc.issues[0].message


@pytest.mark.parametrize(
    "data",
    [b"", b"   ", b"<Message><Header>", b"not xml at all", b"\xff\xfe\x00<\x00M", b"<Message></Mess>", b"<?xml version='1.0'?>"],
)
def test_malformed_bytes_are_refused(data: bytes) -> None:
    rejected(data)


def test_external_entities_never_resolve(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    data = f"""<?xml version="1.0"?><!DOCTYPE Message [<!ENTITY leak SYSTEM "file://{secret}">]>
    <Message><Header><MessageID>&leak;</MessageID></Header><Body><Status><Code>000</Code></Status></Body></Message>"""
    exc = rejected(data.encode())
    assert "TOP-SECRET" not in str(exc.issues) and "DOCTYPE" in exc.message


def test_entity_expansion_bombs_are_refused() -> None:
    entities = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    bomb = f'<?xml version="1.0"?><!DOCTYPE Message [<!ENTITY l0 "lol">{entities}]><Message><Header><MessageID>&l9;</MessageID></Header></Message>'
    rejected(bomb.encode())


def test_oversize_is_the_same_400_error() -> None:
    padding = b"<Note>" + b"x" * ncpdp.MAX_MESSAGE_BYTES + b"</Note>"
    exc = rejected(golden("status").replace(b"<Code>", padding + b"<Code>"))
    assert exc.issues[0].code == "too-costly"


def test_deep_nesting_and_element_floods_are_refused() -> None:
    deep = b"<Message><Header><MessageID>1</MessageID></Header><Body>" + b"<a>" * 5000 + b"</a>" * 5000 + b"</Body></Message>"
    rejected(deep)
    flood = b"<Message><Header><MessageID>1</MessageID></Header><Body>" + b"<a/>" * 60_000 + b"</Body></Message>"
    rejected(flood)


def test_correlation_needs_a_message_id() -> None:
    exc = rejected(b"<Message><Header><To>1</To></Header><Body><Status><Code>000</Code></Status></Body></Message>")
    assert locations(exc) == {"/Message/Header/MessageID"} and exc.header is None
    assert locations(rejected(b"<Message><Body/></Message>")) == {"/Message/Header", "/Message/Body"}  # all at once


def test_the_body_holds_exactly_one_known_transaction_and_the_header_is_salvaged() -> None:
    head = b"<Message><Header><To Qualifier='D'>9</To><From Qualifier='P'>1434567</From><MessageID>m-7</MessageID></Header>"
    exc = rejected(head + b"<Body><NewRxRequest/></Body></Message>")
    assert locations(exc) == {"/Message/Body/NewRxRequest"} and exc.issues[0].code == "not-supported"
    assert exc.header.message_id == "m-7" and exc.header.from_.value == "1434567"
    assert locations(rejected(head + b"<Body><Status><Code>000</Code></Status><Status><Code>000</Code></Status></Body></Message>")) == {"/Message/Body"}
    assert locations(rejected(head + b"<Body/></Message>")) == {"/Message/Body"}
    assert locations(rejected(head + b"</Message>")) == {"/Message/Body"}


def test_every_malformed_value_is_reported_with_its_path() -> None:
    data = golden("newrx")
    for before, after in [
        (b"<Value>14</Value>", b"<Value>fourteen</Value>"),
        (b"<DaysSupply>7</DaysSupply>", b"<DaysSupply>-7</DaysSupply>"),
        (b"<Date>2026-01-05</Date>", b"<Date>2026-13-05</Date>"),
        (b"<Date>1990-02-11</Date>", b"<Date>11/02/1990</Date>"),
        (b"<SentTime>2026-01-06T15:01:10.25Z</SentTime>", b"<SentTime>yesterday</SentTime>"),
        (b"<StrengthValue>8</StrengthValue>", b"<StrengthValue>1e3</StrengthValue>"),
        (b"<NumberOfRefills>0</NumberOfRefills>", b"<NumberOfRefills>3.5</NumberOfRefills>"),
    ]:
        assert before in data, before
        data = data.replace(before, after)
    exc = rejected(data)
    medication = "/Message/Body/NewRx/MedicationPrescribed"
    assert locations(exc) == {
        f"{medication}/Quantity/Value",
        f"{medication}/DaysSupply",
        f"{medication}/WrittenDate",
        "/Message/Body/NewRx/Patient/HumanPatient/DateOfBirth",
        "/Message/Header/SentTime",
        f"{medication}/Strength/StrengthValue",
        f"{medication}/NumberOfRefills",
    }
    assert exc.header is not None and exc.header.message_id == "iopgw-newrx-0001"


def test_choices_must_be_known() -> None:
    fill = golden("rxfill-dispensed").replace(b"Dispensed>", b"Eaten>")
    assert locations(rejected(fill)) == {"/Message/Body/RxFill/FillStatus/Eaten"}
    no_status = re.sub(rb"<FillStatus>.*?</FillStatus>", b"", golden("rxfill-dispensed"), flags=re.S)
    assert locations(rejected(no_status)) == {"/Message/Body/RxFill/FillStatus"}
    # Replace is a renewal answer, not a cancel answer.
    cancel = golden("cancelrx-response").replace(b"<Denied>", b"<Replace>").replace(b"</Denied>", b"</Replace>")
    assert locations(rejected(cancel)) == {"/Message/Body/CancelRxResponse/Response/Replace"}
    nameless = golden("rxhistory-response").replace(b"<DrugDescription>sertraline 50 MG Oral Tablet</DrugDescription>", b"")
    assert locations(rejected(nameless)) == {"/Message/Body/RxHistoryResponse/MedicationDispensed[3]/DrugDescription"}
    assert locations(rejected(golden("status").replace(b"<Code>000</Code>", b""))) == {"/Message/Body/Status/Code"}
    assert locations(rejected(golden("verify").replace(b"<Code>010</Code>", b""))) == {"/Message/Body/Verify/VerifyStatus/Code"}


# --- property: whatever is done to a message, the outcome is a Message or the one error ----------

GOLDEN_NAMES = sorted(p.stem for p in GOLDEN.glob("*.xml"))
XML_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF), max_size=30)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    root = etree.fromstring(golden(draw(st.sampled_from(GOLDEN_NAMES))))
    elements = list(root.iter())
    for _ in range(draw(st.integers(1, 4))):
        element = draw(st.sampled_from(elements))
        action = draw(st.sampled_from(["drop", "text", "duplicate", "rename", "empty"]))
        parent = element.getparent()
        if action == "drop" and parent is not None:
            parent.remove(element)
        elif action == "text":
            element.text = draw(XML_TEXT)
        elif action == "duplicate" and parent is not None:
            parent.append(etree.fromstring(etree.tostring(element)))
        elif action == "rename":
            element.tag = draw(st.sampled_from(["Foo", "Code", "Date", "Body", "Header", "Value", "Response", "NewRx"]))
        elif action == "empty":
            element[:] = []
        elements = list(root.iter())
    return etree.tostring(root)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_messages_parse_or_raise_the_one_error(data: bytes) -> None:
    try:
        message = ncpdp.parse(data)
    except NcpdpRejected as exc:
        assert exc.status == 400 and all(issue.location for issue in exc.issues)
        return
    assert isinstance(message, ncpdp.Message) and message.header.message_id


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        message = ncpdp.parse(b"<Message>" + data)
    except NcpdpRejected as exc:
        assert exc.status == 400 and exc.issues
    else:  # only if the bytes happened to finish a message with a MessageID and a transaction
        assert message.header.message_id


# --- answers: Status, Verify, Error -----------------------------------------------------------------


def test_status_and_verify_answer_the_sender() -> None:
    fill = ncpdp.parse(golden("rxfill-dispensed"))
    status = ncpdp.status_for(fill.header, message_id="ack-1", sent=NOW)
    assert status.header.to == fill.header.from_ and status.header.from_ == fill.header.to
    assert status.header.relates_to_message_id == fill.header.message_id
    assert status.header.rx_reference_number == "RX-0884213" and status.body == ncpdp.Status(code="000")
    assert ncpdp.parse(ncpdp.build(status)) == status
    verify = ncpdp.verify_for(fill.header, message_id="v-1", sent=NOW, description="Accepted")
    assert ncpdp.parse(ncpdp.build(verify)).body == ncpdp.Verify(code="010", description="Accepted")


def test_an_error_answers_a_rejected_message_with_its_paths() -> None:
    data = golden("rxfill-dispensed").replace(b"<DaysSupply>7</DaysSupply>", b"<DaysSupply>seven</DaysSupply>")
    with pytest.raises(NcpdpRejected) as info:
        ncpdp.parse(data)
    error = ncpdp.error_for(info.value, message_id="err-1", sent=NOW)
    assert error.body.code == "900"
    assert "/Message/Body/RxFill/MedicationDispensed/DaysSupply" in error.body.description
    assert error.header.to == ncpdp.RoutingId(value="1434567", qualifier="P")
    assert error.header.relates_to_message_id == "ph-fill-0001"
    assert ncpdp.parse(ncpdp.build(error)) == error


def test_an_error_for_bytes_that_are_not_xml_still_builds() -> None:
    with pytest.raises(NcpdpRejected) as info:
        ncpdp.parse(b"\x00garbage")
    me = ncpdp.RoutingId(value="1245319599", qualifier="D")
    error = ncpdp.error_for(info.value, message_id="err-2", sent=NOW, sender=me)
    assert error.header.to is None and error.header.from_ == me and error.header.relates_to_message_id is None
    assert ncpdp.parse(ncpdp.build(error)).body.code == "900"


def test_our_own_failures_are_602_and_leak_nothing() -> None:
    request = ncpdp.parse(golden("newrx")).header
    bug = ncpdp.error_for(KeyError("/secret/path"), request, message_id="e", sent=NOW)
    assert bug.body == ncpdp.Error(code="602", description_code="007", description="internal processing error")
    busy = ncpdp.error_for(TransientDeliveryError("store busy"), request, message_id="e", sent=NOW)
    assert busy.body.code == "602" and busy.body.code in ncpdp.RETRYABLE_ERRORS
    many = IopFhirError("bad", [IopFhirError("x").issues[0]] * 8)
    assert ncpdp.error_for(many, request, message_id="e", sent=NOW).body.description.endswith("and 3 more")
