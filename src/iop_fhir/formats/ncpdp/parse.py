"""NCPDP SCRIPT XML bytes -> message dataclasses, tolerantly, through the hardened parser.

Every byte goes through :func:`iop_fhir.formats.safe_xml.parse` (no DTD, no entities, no
network, size, depth and element-count limits), then the tree is read by **local element
name**, so the 10.6 default namespace (``http://www.ncpdp.org/schema/SCRIPT``) reads like
2017071's none. Another namespace on the root is refused: that is some other document.

Tolerant of what real and synthetic senders do (``shared/samples/ncpdp``):

* missing optional parts (no Pharmacy, no To/From, no SentTime, no unit) are ``None``;
* 10.6 shapes: ``Patient``/``Prescriber`` without ``HumanPatient``/``NonVeterinarian``,
  ``RefillRequest``/``RefillResponse`` for the renewal pair (``DeniedNewPrescriptionToFollow``
  reads as ``Replace``), ``Directions`` for ``Sig/SigText``, ``Refills/Value`` for
  ``NumberOfRefills``, ``Primary/Value`` for ``Primary/Code``, ``PotencyUnitCode`` for the
  quantity unit, ``Communication`` numbers, ``Country`` for ``CountryCode``;
* qualifiers as XML attributes (``<ProductCode Qualifier="ND">…``) or as ``…Qualifier`` siblings;
  ``Strength`` beside ``DrugCoded`` instead of inside it; ``DateTime`` for ``Date``;
* unknown elements are skipped.

What is not tolerated -- each is one :class:`~.messages.NcpdpRejected` (400) whose issues name
the element path (``/Message/Body/NewRx/MedicationPrescribed/Quantity/Value``): bytes that are
not XML or are hostile (DOCTYPE, entities), over the size limits, a root that is not
``Message``, no ``Header/MessageID`` (nothing to correlate a reply with), not exactly one known
transaction in ``Body``, a medication without ``DrugDescription``, a response or fill status
that is not one of the choices, and values that are present but malformed (a date that is not
a date, a quantity that is not a number). Everything found wrong is reported at once.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from lxml import etree

from ...errors import Issue
from .. import safe_xml
from ..safe_xml import child_text, children, first_child, local_name
from .messages import (
    CANCEL_RESPONSES,
    CHANGE_RESPONSES,
    FILL_STATUSES,
    NAMESPACE_10_6,
    RENEWAL_RESPONSES,
    VERSION,
    VERSION_ATTRIBUTE_VALUE,
    Address,
    Body,
    CancelRx,
    CancelRxResponse,
    Code,
    Diagnosis,
    Error,
    FillStatus,
    Header,
    HistorySource,
    Medication,
    Message,
    Name,
    NcpdpRejected,
    NewRx,
    Patient,
    Pharmacy,
    Prescriber,
    Quantity,
    Response,
    RoutingId,
    RxChangeRequest,
    RxChangeResponse,
    RxFill,
    RxHistoryRequest,
    RxHistoryResponse,
    RxRenewalRequest,
    RxRenewalResponse,
    SenderSoftware,
    Status,
    Strength,
    Verify,
)

__all__ = ["MAX_MESSAGE_BYTES", "parse"]

# SCRIPT messages are a few kilobytes; a medication history with hundreds of fills is a few
# hundred. These limits leave room for that and stop anything else early.
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_DEPTH = 32  # the deepest SCRIPT path (a structured Sig) is about 10 elements
MAX_ELEMENTS = 50_000

# 10.6 transaction and response names that mean the 2017071 ones.
_BODY_ALIASES = {"RefillRequest": "RxRenewalRequest", "RefillResponse": "RxRenewalResponse"}
_RESPONSE_ALIASES = {"DeniedNewPrescriptionToFollow": "Replace"}
_DECIMAL = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")
_WHOLE = re.compile(r"^[0-9]{1,9}$")


def parse(xml: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Read one SCRIPT message.

    :raises NcpdpRejected: anything we cannot read (see the module docstring); when the header
        could be read it rides along on the error (``exc.header``) so the reply can correlate.
    """
    try:
        root = safe_xml.parse(xml, max_bytes=max_bytes, max_depth=MAX_DEPTH, max_elements=MAX_ELEMENTS)
    except safe_xml.XmlRejected as exc:  # XmlTooLarge included: one error type for callers
        raise NcpdpRejected(f"not a readable SCRIPT message: {exc.message}", exc.issues) from None
    found = f"{{{safe_xml.namespace(root)}}}{local_name(root)}" if safe_xml.namespace(root) else local_name(root)
    if local_name(root) != "Message" or safe_xml.namespace(root) not in ("", NAMESPACE_10_6):
        message = f"root element is {found}; a SCRIPT message is Message (no namespace, or the 10.6 one)"
        raise NcpdpRejected(message, [Issue(message, location=f"/{local_name(root)}", code="structure")])
    reader = _Reader()
    header = reader.header(root)
    body = reader.body(root)
    if reader.issues or header is None or body is None:
        issues = reader.issues or [Issue("unreadable message", location="/Message")]
        raise NcpdpRejected(f"SCRIPT message rejected: {issues[0]}", issues, header=header)
    return Message(header=header, body=body, version=_version(root))


def _version(root: etree._Element) -> str | None:
    """2017071 from the six attributes; 10.6 from ``version``/``release``; else what was declared."""
    declared = root.get("TransactionVersion")
    if declared == VERSION_ATTRIBUTE_VALUE:
        return VERSION
    if root.get("version") == "010" and root.get("release") == "006":
        return "10.6"
    return declared or root.get("version")


class _Reader:
    """Reads elements by local name; collects a located issue for every malformed value."""

    def __init__(self) -> None:
        self.issues: list[Issue] = []

    def problem(self, path: str, message: str, code: str = "invalid") -> None:
        self.issues.append(Issue(message, location=path, code=code))

    # --- leaves -----------------------------------------------------------------------------

    def text(self, el: etree._Element | None, name: str) -> str | None:
        return None if el is None else child_text(el, name)

    def whole(self, el: etree._Element | None, name: str, path: str) -> int | None:
        text = self.text(el, name)
        if text is None:
            return None
        if not _WHOLE.match(text):
            self.problem(f"{path}/{name}", f"{text[:40]!r} is not a whole number")
            return None
        return int(text)

    def decimal(self, el: etree._Element | None, name: str, path: str) -> Decimal | None:
        text = self.text(el, name)
        if text is None:
            return None
        try:
            if not _DECIMAL.match(text):
                raise InvalidOperation
            return Decimal(text)
        except InvalidOperation:
            self.problem(f"{path}/{name}", f"{text[:40]!r} is not a decimal number")
            return None

    def date(self, el: etree._Element | None, name: str, path: str) -> dt.date | None:
        """A date element: ``<X><Date>…</Date></X>``, ``<X><DateTime>…</DateTime></X>`` or ``<X>…</X>``."""
        holder = None if el is None else first_child(el, name)
        if holder is None:
            return None
        text = child_text(holder, "Date") or child_text(holder, "DateTime") or (holder.text or "").strip() or None
        if text is None:
            return None
        try:
            day = dt.date.fromisoformat(text[:10])
        except ValueError:
            day = None
        if day is None or (len(text) > 10 and text[10] != "T"):  # a DateTime keeps its date part
            self.problem(f"{path}/{name}", f"{text[:40]!r} is not a date (YYYY-MM-DD)")
            return None
        return day

    def coded(self, el: etree._Element | None, name: str) -> str | None:
        """``<Name><Code>x</Code></Name>`` (2017071) or ``<Name>x</Name>``."""
        holder = None if el is None else first_child(el, name)
        if holder is None:
            return None
        return child_text(holder, "Code") or (holder.text or "").strip() or None

    def code(self, el: etree._Element, name: str) -> Code | None:
        """ProductCode / DrugDBCode: ``Code``+``Qualifier`` children (2017071), a ``Qualifier``
        attribute, or the 10.6 text with a ``…Qualifier`` sibling."""
        holder = first_child(el, name)
        if holder is None:
            return None
        value = child_text(holder, "Code") or (holder.text or "").strip() or None
        if value is None:
            return None
        qualifier = child_text(holder, "Qualifier") or holder.get("Qualifier") or child_text(el, f"{name}Qualifier")
        return Code(code=value, qualifier=qualifier)

    # --- header -----------------------------------------------------------------------------

    def header(self, root: etree._Element) -> Header | None:
        element = first_child(root, "Header")
        path = "/Message/Header"
        if element is None:
            self.problem(path, "is required", code="required")
            return None
        message_id = child_text(element, "MessageID")
        if message_id is None:
            self.problem(f"{path}/MessageID", "is required: replies correlate by it", code="required")
            return None
        software = first_child(element, "SenderSoftware")
        signature = first_child(element, "DigitalSignature")
        indicator = self.text(signature, "DigitalSignatureIndicator")
        return Header(
            message_id=message_id,
            to=self.routing(element, "To"),
            from_=self.routing(element, "From"),
            sent_time=self.sent_time(element, path),
            relates_to_message_id=child_text(element, "RelatesToMessageID"),
            sender_software=None
            if software is None
            else SenderSoftware(
                developer=child_text(software, "SenderSoftwareDeveloper", ""),
                product=child_text(software, "SenderSoftwareProduct", ""),
                version=child_text(software, "SenderSoftwareVersionRelease", ""),
            ),
            rx_reference_number=child_text(element, "RxReferenceNumber"),
            prescriber_order_number=child_text(element, "PrescriberOrderNumber"),
            digital_signature=None if indicator is None else indicator.lower() == "true",
        )

    def routing(self, header: etree._Element, name: str) -> RoutingId | None:
        element = first_child(header, name)
        value = child_text(header, name)
        if element is None or value is None:
            return None
        return RoutingId(value=value, qualifier=element.get("Qualifier") or None)

    def sent_time(self, header: etree._Element, path: str) -> dt.datetime | None:
        text = child_text(header, "SentTime")
        if text is None:
            return None
        try:
            sent = dt.datetime.fromisoformat(text)
        except ValueError:
            self.problem(f"{path}/SentTime", f"{text[:40]!r} is not an ISO 8601 timestamp")
            return None
        # SentTime is UTC by definition; a sender that left the zone out still meant UTC.
        return sent if sent.tzinfo is not None else sent.replace(tzinfo=dt.timezone.utc)

    # --- body -------------------------------------------------------------------------------

    def body(self, root: etree._Element) -> Body | None:
        element = first_child(root, "Body")
        if element is None:
            self.problem("/Message/Body", "is required", code="required")
            return None
        transactions = list(children(element))
        # A 10.6-era quirk some senders keep: RequestReferenceNumber beside the transaction.
        transactions = [t for t in transactions if local_name(t) != "RequestReferenceNumber"]
        if len(transactions) != 1:
            names = ", ".join(local_name(t) for t in transactions) or "nothing"
            self.problem("/Message/Body", f"holds {names}; exactly one transaction is expected", code="structure")
            return None
        transaction = transactions[0]
        name = _BODY_ALIASES.get(local_name(transaction), local_name(transaction))
        read = _BODY_READERS.get(name)
        if read is None:
            self.problem(f"/Message/Body/{local_name(transaction)}", "is not a SCRIPT transaction this gateway reads", code="not-supported")
            return None
        return read(self, transaction, f"/Message/Body/{local_name(transaction)}")

    # --- parties ----------------------------------------------------------------------------

    def name(self, el: etree._Element) -> Name | None:
        element = first_child(el, "Name")
        if element is None:
            return None
        return Name(
            last=child_text(element, "LastName"),
            first=child_text(element, "FirstName"),
            middle=child_text(element, "MiddleName"),
            suffix=child_text(element, "Suffix"),
            prefix=child_text(element, "Prefix"),
        )

    def address(self, el: etree._Element) -> Address | None:
        element = first_child(el, "Address")
        if element is None:
            return None
        return Address(
            line1=child_text(element, "AddressLine1"),
            line2=child_text(element, "AddressLine2"),
            city=child_text(element, "City"),
            state=child_text(element, "StateProvince") or child_text(element, "State"),
            postal_code=child_text(element, "PostalCode") or child_text(element, "ZipCode"),
            country_code=child_text(element, "CountryCode") or child_text(element, "Country"),
        )

    def phone(self, el: etree._Element) -> str | None:
        numbers = first_child(el, "CommunicationNumbers")
        if numbers is None:
            return None
        primary = first_child(numbers, "PrimaryTelephone")
        if primary is not None:
            return child_text(primary, "Number")
        for communication in children(numbers, "Communication"):  # 10.6: Number + Qualifier TE
            if child_text(communication, "Qualifier") in ("TE", None):
                return child_text(communication, "Number")
        return None

    def patient(self, el: etree._Element, path: str) -> Patient | None:
        element = first_child(el, "Patient")
        if element is None:
            return None
        person = first_child(element, "HumanPatient")
        where = f"{path}/Patient/HumanPatient"
        if person is None:  # 10.6 puts the person's parts directly under Patient
            person, where = element, f"{path}/Patient"
        gender = child_text(person, "Gender")
        return Patient(
            name=self.name(person),
            gender=gender.upper() if gender else None,
            birth_date=self.date(person, "DateOfBirth", where),
            address=self.address(person),
            phone=self.phone(person),
        )

    def pharmacy(self, el: etree._Element) -> Pharmacy | None:
        element = first_child(el, "Pharmacy")
        if element is None:
            return None
        ids = first_child(element, "Identification")
        return Pharmacy(
            ncpdp_id=self.text(ids, "NCPDPID"),
            npi=self.text(ids, "NPI"),
            business_name=child_text(element, "BusinessName") or child_text(element, "StoreName"),
            address=self.address(element),
            phone=self.phone(element),
        )

    def prescriber(self, el: etree._Element) -> Prescriber | None:
        element = first_child(el, "Prescriber")
        if element is None:
            return None
        person = first_child(element, "NonVeterinarian")
        if person is None:
            person = first_child(element, "Veterinarian")
        if person is None:  # 10.6: the person's parts directly under Prescriber
            person = element
        ids = first_child(person, "Identification")
        return Prescriber(
            name=self.name(person),
            npi=self.text(ids, "NPI"),
            dea_number=self.text(ids, "DEANumber"),
            state_license_number=self.text(ids, "StateLicenseNumber"),
            address=self.address(person),
            phone=self.phone(person),
        )

    # --- medication -------------------------------------------------------------------------

    def medication(self, el: etree._Element | None, path: str) -> Medication | None:
        if el is None:
            return None
        description = child_text(el, "DrugDescription")
        if description is None:
            self.problem(f"{path}/DrugDescription", "is required", code="required")
            return None
        coded = first_child(el, "DrugCoded")
        # Strength belongs inside DrugCoded; some senders put it beside it.
        strength_holder = coded if coded is not None and first_child(coded, "Strength") is not None else el
        return Medication(
            description=description,
            product_code=None if coded is None else self.code(coded, "ProductCode"),
            strength=self.strength(strength_holder, path),
            drug_db_code=None if coded is None else self.code(coded, "DrugDBCode"),
            dea_schedule=None if coded is None else self.coded(coded, "DEASchedule"),
            quantity=self.quantity(el, path),
            days_supply=self.whole(el, "DaysSupply", path),
            written_date=self.date(el, "WrittenDate", path),
            last_fill_date=self.date(el, "LastFillDate", path),
            substitutions=child_text(el, "Substitutions"),
            number_of_refills=self.refills(el, path),
            pharmacy_requested_refills=self.whole(el, "PharmacyRequestedRefills", path),
            clinical_information_qualifier=self.text(first_child(el, "Diagnosis"), "ClinicalInformationQualifier"),
            diagnoses=self.diagnoses(el),
            note=child_text(el, "Note"),
            sig_text=self.text(first_child(el, "Sig"), "SigText") or child_text(el, "Directions"),
            history_source=self.history_source(el, path),
            pharmacy=self.pharmacy(el),
            prescriber=self.prescriber(el),
        )

    def strength(self, el: etree._Element, path: str) -> Strength | None:
        element = first_child(el, "Strength")
        if element is None:
            return None
        return Strength(
            value=self.decimal(element, "StrengthValue", f"{path}/Strength"),
            form_code=self.coded(element, "StrengthForm"),
            unit_code=self.coded(element, "StrengthUnitOfMeasure"),
        )

    def quantity(self, el: etree._Element, path: str) -> Quantity | None:
        element = first_child(el, "Quantity")
        if element is None:
            return None
        value = self.decimal(element, "Value", f"{path}/Quantity")
        if value is None:
            return None
        unit = self.coded(element, "QuantityUnitOfMeasure") or child_text(element, "PotencyUnitCode")
        return Quantity(value=value, unit_code=unit, code_list_qualifier=child_text(element, "CodeListQualifier") or child_text(element, "Qualifier"))

    def refills(self, el: etree._Element, path: str) -> int | None:
        if first_child(el, "NumberOfRefills") is not None:
            return self.whole(el, "NumberOfRefills", path)
        refills = first_child(el, "Refills")  # 10.6: Qualifier (R, PRN) + Value
        if refills is None or child_text(refills, "Qualifier") == "PRN":
            return None
        return self.whole(refills, "Value", f"{path}/Refills")

    def diagnoses(self, el: etree._Element) -> tuple[Diagnosis, ...]:
        block = first_child(el, "Diagnosis")
        if block is None:
            return ()
        found = []
        for rank in ("Primary", "Secondary"):
            item = first_child(block, rank)
            code = None if item is None else child_text(item, "Code") or child_text(item, "Value")
            if item is not None and code is not None:
                found.append(Diagnosis(code=code, qualifier=child_text(item, "Qualifier"), description=child_text(item, "Description")))
        return tuple(found)

    def history_source(self, el: etree._Element, path: str) -> HistorySource | None:
        element = first_child(el, "HistorySource")
        if element is None:
            return None
        return HistorySource(
            source_reference=child_text(element, "SourceReference"),
            fill_number=self.whole(element, "FillNumber", f"{path}/HistorySource"),
            payment_type=child_text(element, "PaymentType"),
        )

    def medications(self, el: etree._Element, name: str, path: str) -> tuple[Medication, ...]:
        found = (self.medication(m, f"{path}/{name}[{i + 1}]") for i, m in enumerate(children(el, name)))
        return tuple(m for m in found if m is not None)

    def response(self, el: etree._Element, path: str, allowed: tuple[str, ...]) -> Response | None:
        element = first_child(el, "Response")
        where = f"{path}/Response"
        choice = None if element is None else next(children(element), None)
        if choice is None:
            self.problem(where, f"is required, with one of {', '.join(allowed)}", code="required")
            return None
        outcome = _RESPONSE_ALIASES.get(local_name(choice), local_name(choice))
        if outcome not in allowed:
            self.problem(f"{where}/{local_name(choice)}", f"is not a response here ({', '.join(allowed)})")
            return None
        return Response(
            outcome=outcome,
            note=child_text(choice, "Note"),
            reason_codes=tuple(code for c in children(choice, "ReasonCode") if (code := (c.text or "").strip())),
            denial_reason=child_text(choice, "DenialReason"),
            reference_number=child_text(choice, "ReferenceNumber"),
        )


# --- transactions ------------------------------------------------------------------------------


def _new_rx(r: _Reader, el: etree._Element, path: str) -> NewRx:
    prohibit = child_text(el, "ProhibitRenewalRequest")
    return NewRx(
        patient=r.patient(el, path),
        pharmacy=r.pharmacy(el),
        prescriber=r.prescriber(el),
        medication=r.medication(first_child(el, "MedicationPrescribed"), f"{path}/MedicationPrescribed"),
        prohibit_renewal_request=None if prohibit is None else prohibit.lower() == "true",
    )


def _cancel_rx(r: _Reader, el: etree._Element, path: str) -> CancelRx:
    return CancelRx(
        patient=r.patient(el, path),
        pharmacy=r.pharmacy(el),
        prescriber=r.prescriber(el),
        medication=r.medication(first_child(el, "MedicationPrescribed"), f"{path}/MedicationPrescribed"),
    )


def _cancel_rx_response(r: _Reader, el: etree._Element, path: str) -> CancelRxResponse | None:
    response = r.response(el, path, CANCEL_RESPONSES)
    return None if response is None else CancelRxResponse(response=response)


def _renewal_request(r: _Reader, el: etree._Element, path: str) -> RxRenewalRequest:
    return RxRenewalRequest(
        patient=r.patient(el, path),
        pharmacy=r.pharmacy(el),
        prescriber=r.prescriber(el),
        dispensed=r.medication(first_child(el, "MedicationDispensed"), f"{path}/MedicationDispensed"),
        prescribed=r.medication(first_child(el, "MedicationPrescribed"), f"{path}/MedicationPrescribed"),
    )


def _change_request(r: _Reader, el: etree._Element, path: str) -> RxChangeRequest:
    return RxChangeRequest(
        request_code=child_text(el, "MessageRequestCode"),
        request_sub_codes=tuple(code for c in children(el, "MessageRequestSubCode") if (code := (c.text or "").strip())),
        patient=r.patient(el, path),
        pharmacy=r.pharmacy(el),
        prescriber=r.prescriber(el),
        prescribed=r.medication(first_child(el, "MedicationPrescribed"), f"{path}/MedicationPrescribed"),
        requested=r.medications(el, "MedicationRequested", path),
    )


def _decision(
    kind: type[RxRenewalResponse] | type[RxChangeResponse], choices: tuple[str, ...]
) -> Callable[[_Reader, etree._Element, str], RxRenewalResponse | RxChangeResponse | None]:
    """The parser of a prescriber's answer (renewal or change): the same shape, its own choices."""

    def parse(r: _Reader, el: etree._Element, path: str) -> RxRenewalResponse | RxChangeResponse | None:
        response = r.response(el, path, choices)
        if response is None:
            return None
        return kind(
            response=response,
            patient=r.patient(el, path),
            pharmacy=r.pharmacy(el),
            prescriber=r.prescriber(el),
            prescribed=r.medication(first_child(el, "MedicationPrescribed"), f"{path}/MedicationPrescribed"),
        )

    return parse


def _rx_fill(r: _Reader, el: etree._Element, path: str) -> RxFill | None:
    holder = first_child(el, "FillStatus")
    choice = None if holder is None else next(children(holder), None)
    if choice is None:
        r.problem(f"{path}/FillStatus", f"is required, with one of {', '.join(FILL_STATUSES)}", code="required")
        return None
    if local_name(choice) not in FILL_STATUSES:
        r.problem(f"{path}/FillStatus/{local_name(choice)}", f"is not a fill status ({', '.join(FILL_STATUSES)})")
        return None
    return RxFill(
        fill_status=FillStatus(status=local_name(choice), note=child_text(choice, "Note"), reason_code=child_text(choice, "ReasonCode")),
        patient=r.patient(el, path),
        pharmacy=r.pharmacy(el),
        prescriber=r.prescriber(el),
        prescribed=r.medication(first_child(el, "MedicationPrescribed"), f"{path}/MedicationPrescribed"),
        dispensed=r.medication(first_child(el, "MedicationDispensed"), f"{path}/MedicationDispensed"),
    )


def _history_request(r: _Reader, el: etree._Element, path: str) -> RxHistoryRequest:
    dates = first_child(el, "RequestedDates")
    where = f"{path}/RequestedDates"
    return RxHistoryRequest(
        patient=r.patient(el, path),
        prescriber=r.prescriber(el),
        start_date=None if dates is None else r.date(dates, "StartDate", where),
        end_date=None if dates is None else r.date(dates, "EndDate", where),
        consent=child_text(el, "Consent"),
    )


def _history_response(r: _Reader, el: etree._Element, path: str) -> RxHistoryResponse:
    return RxHistoryResponse(
        patient=r.patient(el, path),
        prescriber=r.prescriber(el),
        dispensed=r.medications(el, "MedicationDispensed", path),
    )


def _acknowledgement(cls: type[Status] | type[Error]) -> Callable[[_Reader, etree._Element, str], Status | Error | None]:
    def read(r: _Reader, el: etree._Element, path: str) -> Status | Error | None:
        code = child_text(el, "Code")
        if code is None:
            r.problem(f"{path}/Code", "is required", code="required")
            return None
        return cls(code=code, description_code=child_text(el, "DescriptionCode"), description=child_text(el, "Description"))

    return read


def _verify(r: _Reader, el: etree._Element, path: str) -> Verify | None:
    status = first_child(el, "VerifyStatus")
    code = None if status is None else child_text(status, "Code")
    if code is None:
        r.problem(f"{path}/VerifyStatus/Code", "is required", code="required")
        return None
    return Verify(code=code, description=child_text(status, "Description"))


_BODY_READERS: dict[str, Callable[[_Reader, etree._Element, str], Body | None]] = {
    "NewRx": _new_rx,
    "CancelRx": _cancel_rx,
    "CancelRxResponse": _cancel_rx_response,
    "RxRenewalRequest": _renewal_request,
    "RxRenewalResponse": _decision(RxRenewalResponse, RENEWAL_RESPONSES),
    "RxChangeRequest": _change_request,
    "RxChangeResponse": _decision(RxChangeResponse, CHANGE_RESPONSES),
    "RxFill": _rx_fill,
    "RxHistoryRequest": _history_request,
    "RxHistoryResponse": _history_response,
    "Status": _acknowledgement(Status),
    "Error": _acknowledgement(Error),
    "Verify": _verify,
}
