"""Message dataclasses -> canonical NCPDP SCRIPT 2017071 XML bytes.

What comes out is always the 2017071 shape of ``shared/reference/ncpdp-script.md`` §2: root
``Message`` with the six version attributes and no namespace, ``Header`` then ``Body`` with one
transaction, UTF-8 with a double-quoted XML declaration, two-space indentation. Element order
follows the reference's trees (§3, §5, §6, §8), because the XSD validates order.

Deterministic: the same dataclass gives the same bytes (golden files compare byte for byte);
nothing here reads a clock or generates an id -- MessageID and SentTime are the caller's.

Value rules: decimals with a leading zero and no trailing zeros (``0.5``, ``30``; the ONC
criterion [V]), dates ``YYYY-MM-DD``, SentTime in UTC with at least one fractional digit
(``2025-03-04T15:22:10.0Z`` as networks send it), booleans ``true``/``false``.

What a transaction requires and is missing is collected, each with its element path, and
raised together as one :class:`~.messages.NcpdpInvalid`; so is a value XML cannot carry (a
control character) or one over its length limit (Note 210, SigText 1000 characters).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal

from lxml import etree

from ...errors import Issue
from .messages import (
    APPROVING_RESPONSES,
    CANCEL_RESPONSES,
    CHANGE_RESPONSES,
    FILL_STATUSES,
    NOTE_MAX,
    RENEWAL_RESPONSES,
    SIG_MAX,
    VERSION_ATTRIBUTES,
    XSI,
    Address,
    CancelRx,
    CancelRxResponse,
    Error,
    Header,
    Medication,
    Message,
    Name,
    NcpdpInvalid,
    NewRx,
    Patient,
    Pharmacy,
    Prescriber,
    Response,
    RoutingId,
    RxChangeRequest,
    RxChangeResponse,
    RxFill,
    RxHistoryRequest,
    RxHistoryResponse,
    RxRenewalRequest,
    RxRenewalResponse,
    Status,
    Verify,
)

__all__ = ["build", "format_decimal", "format_sent_time"]

_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'

# What each medication element must carry, by where it stands (beyond DrugDescription).
_PRESCRIBED = ("quantity", "written_date")  # an order names how much and when it was written
_NEW_PRESCRIPTION = (*_PRESCRIBED, "sig_text")  # ... and a new one tells the patient how to take it


def format_decimal(value: Decimal) -> str:
    """A decimal as NCPDP wants it: leading zero, no trailing zeros, no exponent (``0.5``, ``30``)."""
    if not value.is_finite():
        raise ValueError(f"{value} is not a finite number")
    # Fixed-point text is exact (normalize() would round to the context's 28 digits).
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "0", "") else text


def format_sent_time(value: dt.datetime) -> str:
    """SentTime in UTC, fractional seconds without trailing zeros but at least one digit."""
    utc = value.astimezone(dt.timezone.utc)
    fraction = f"{utc.microsecond:06d}".rstrip("0") or "0"
    # isoformat, not strftime: %Y does not pad years before 1000 on every platform.
    return f"{utc.replace(microsecond=0, tzinfo=None).isoformat()}.{fraction}Z"


def build(message: Message) -> bytes:
    """The message as 2017071 XML bytes.

    :raises NcpdpInvalid: something the transaction requires is missing or cannot be written;
        every such problem is listed with its element path.
    """
    writer = _Writer()
    root = etree.Element("Message", nsmap={"xsi": XSI})
    for name, value in VERSION_ATTRIBUTES:
        root.set(name, value)
    writer.header(root, message.header, parties_required=not isinstance(message.body, Error))
    body = etree.SubElement(root, "Body")
    kind = message.kind
    write = _BODY_WRITERS.get(type(message.body))
    if write is None:
        writer.problem("/Message/Body", f"{kind} is not a SCRIPT transaction this gateway writes")
    else:
        write(writer, etree.SubElement(body, kind), message.body, f"/Message/Body/{kind}")
    if writer.issues:
        raise NcpdpInvalid(f"cannot build {kind}: {writer.issues[0]}", writer.issues)
    etree.indent(root, space="  ")
    return _DECLARATION + etree.tostring(root, encoding="UTF-8") + b"\n"


class _Writer:
    """Writes elements in order and collects every problem with its path."""

    def __init__(self) -> None:
        self.issues: list[Issue] = []

    def problem(self, path: str, message: str, code: str = "invalid") -> None:
        self.issues.append(Issue(message, location=path, code=code))

    def missing(self, path: str) -> None:
        self.problem(path, "is required", code="required")

    # --- leaves -----------------------------------------------------------------------------

    def text(self, parent: etree._Element, name: str, value: str | None, path: str, *, required: bool = False, limit: int | None = None) -> None:
        where = f"{path}/{name}"
        if value is None or not value.strip():
            if required:
                self.missing(where)
            return
        if limit is not None and len(value) > limit:
            self.problem(where, f"is {len(value)} characters; at most {limit} are allowed")
            return
        element = etree.SubElement(parent, name)
        try:
            element.text = value
        except ValueError:
            parent.remove(element)
            self.problem(where, "contains characters XML cannot carry")

    def number(self, parent: etree._Element, name: str, value: Decimal | int | None, path: str, *, required: bool = False, positive: bool = False) -> None:
        if value is None:
            if required:
                self.missing(f"{path}/{name}")
            return
        amount = Decimal(value)
        if not amount.is_finite() or amount < 0 or (positive and amount == 0):
            self.problem(f"{path}/{name}", f"{value} is not a {'positive' if positive else 'non-negative'} number")
            return
        self.text(parent, name, format_decimal(amount), path)

    def coded(self, parent: etree._Element, name: str, code: str | None, path: str, *, required: bool = False) -> None:
        """``<Name><Code>value</Code></Name>``: how 2017071 wraps NCI codes."""
        if code is None:
            if required:
                self.missing(f"{path}/{name}/Code")
            return
        self.text(etree.SubElement(parent, name), "Code", code, f"{path}/{name}", required=True)

    def date(self, parent: etree._Element, name: str, value: dt.date | None, path: str, *, required: bool = False) -> None:
        if value is None:
            if required:
                self.missing(f"{path}/{name}")
            return
        self.text(etree.SubElement(parent, name), "Date", value.isoformat(), f"{path}/{name}")

    def flag(self, parent: etree._Element, name: str, value: bool | None, path: str) -> None:
        if value is not None:
            self.text(parent, name, "true" if value else "false", path)

    # --- header -----------------------------------------------------------------------------

    def header(self, root: etree._Element, header: Header, *, parties_required: bool) -> None:
        path = "/Message/Header"
        element = etree.SubElement(root, "Header")
        for name, party in (("To", header.to), ("From", header.from_)):
            self.routing(element, name, party, path, required=parties_required)
        self.text(element, "MessageID", header.message_id, path, required=True)
        self.text(element, "RelatesToMessageID", header.relates_to_message_id, path)
        if header.sent_time is None:
            self.missing(f"{path}/SentTime")
        elif header.sent_time.tzinfo is None or header.sent_time.utcoffset() is None:
            self.problem(f"{path}/SentTime", "needs a timezone (it is written in UTC)")
        else:
            self.text(element, "SentTime", format_sent_time(header.sent_time), path)
        software = header.sender_software
        if software is not None:
            block = etree.SubElement(element, "SenderSoftware")
            where = f"{path}/SenderSoftware"
            self.text(block, "SenderSoftwareDeveloper", software.developer, where, required=True)
            self.text(block, "SenderSoftwareProduct", software.product, where, required=True)
            self.text(block, "SenderSoftwareVersionRelease", software.version, where, required=True)
        self.text(element, "RxReferenceNumber", header.rx_reference_number, path)
        self.text(element, "PrescriberOrderNumber", header.prescriber_order_number, path)
        if header.digital_signature is not None:
            # Position and attributes as seen in a network sample [V presence; position ?].
            signature = etree.SubElement(element, "DigitalSignature", Version="1.1")
            self.flag(signature, "DigitalSignatureIndicator", header.digital_signature, f"{path}/DigitalSignature")

    def routing(self, parent: etree._Element, name: str, party: RoutingId | None, path: str, *, required: bool) -> None:
        if party is None:
            if required:
                self.missing(f"{path}/{name}")
            return
        before = len(parent)
        self.text(parent, name, party.value, path, required=True)
        if party.qualifier and len(parent) > before:
            parent[-1].set("Qualifier", party.qualifier)

    # --- parties ----------------------------------------------------------------------------

    def name(self, parent: etree._Element, name: Name | None, path: str, *, first_required: bool = True) -> None:
        where = f"{path}/Name"
        if name is None:
            self.missing(where)
            return
        element = etree.SubElement(parent, "Name")
        self.text(element, "LastName", name.last, where, required=True)
        self.text(element, "FirstName", name.first, where, required=first_required)
        self.text(element, "MiddleName", name.middle, where)
        self.text(element, "Suffix", name.suffix, where)
        self.text(element, "Prefix", name.prefix, where)

    def address(self, parent: etree._Element, address: Address | None, path: str) -> None:
        if address is None:
            return
        element = etree.SubElement(parent, "Address")
        where = f"{path}/Address"
        self.text(element, "AddressLine1", address.line1, where, required=True)
        self.text(element, "AddressLine2", address.line2, where)
        self.text(element, "City", address.city, where, required=True)
        self.text(element, "StateProvince", address.state, where)
        self.text(element, "PostalCode", address.postal_code, where)
        self.text(element, "CountryCode", address.country_code, where)

    def phone(self, parent: etree._Element, phone: str | None, path: str) -> None:
        if phone:
            numbers = etree.SubElement(parent, "CommunicationNumbers")
            primary = etree.SubElement(numbers, "PrimaryTelephone")
            self.text(primary, "Number", phone, f"{path}/CommunicationNumbers/PrimaryTelephone")

    def patient(self, parent: etree._Element, patient: Patient | None, path: str) -> None:
        where = f"{path}/Patient"
        if patient is None:
            self.missing(where)
            return
        human = etree.SubElement(etree.SubElement(parent, "Patient"), "HumanPatient")
        where += "/HumanPatient"
        self.name(human, patient.name, where)
        self.text(human, "Gender", patient.gender, where, required=True)
        self.date(human, "DateOfBirth", patient.birth_date, where, required=True)
        self.address(human, patient.address, where)
        self.phone(human, patient.phone, where)

    def pharmacy(self, parent: etree._Element, pharmacy: Pharmacy | None, path: str, *, required: bool = True) -> None:
        where = f"{path}/Pharmacy"
        if pharmacy is None:
            if required:
                self.missing(where)
            return
        element = etree.SubElement(parent, "Pharmacy")
        ids = etree.SubElement(element, "Identification")
        if not (pharmacy.ncpdp_id or pharmacy.npi):
            self.problem(f"{where}/Identification", "needs the pharmacy's NCPDPID or NPI", code="required")
        self.text(ids, "NCPDPID", pharmacy.ncpdp_id, f"{where}/Identification")
        self.text(ids, "NPI", pharmacy.npi, f"{where}/Identification")
        self.text(element, "BusinessName", pharmacy.business_name, where)
        self.address(element, pharmacy.address, where)
        self.phone(element, pharmacy.phone, where)

    def prescriber(self, parent: etree._Element, prescriber: Prescriber | None, path: str, *, required: bool = True) -> None:
        where = f"{path}/Prescriber"
        if prescriber is None:
            if required:
                self.missing(where)
            return
        person = etree.SubElement(etree.SubElement(parent, "Prescriber"), "NonVeterinarian")
        where += "/NonVeterinarian"
        ids = etree.SubElement(person, "Identification")
        if not (prescriber.npi or prescriber.dea_number or prescriber.state_license_number):
            self.problem(f"{where}/Identification", "needs the prescriber's NPI, DEA or state license number", code="required")
        # Identification order as VistA emits it [V]: StateLicenseNumber, ..., DEANumber, ..., NPI.
        self.text(ids, "StateLicenseNumber", prescriber.state_license_number, f"{where}/Identification")
        self.text(ids, "DEANumber", prescriber.dea_number, f"{where}/Identification")
        self.text(ids, "NPI", prescriber.npi, f"{where}/Identification")
        self.name(person, prescriber.name, where)
        self.address(person, prescriber.address, where)
        self.phone(person, prescriber.phone, where)

    # --- medication -------------------------------------------------------------------------

    def medication(self, parent: etree._Element, name: str, medication: Medication | None, path: str, *, requires: tuple[str, ...] = ()) -> None:
        where = f"{path}/{name}"
        if medication is None:
            self.missing(where)
            return
        element = etree.SubElement(parent, name)
        m = medication
        self.text(element, "DrugDescription", m.description, where, required=True)
        if m.product_code or m.strength or m.drug_db_code or m.dea_schedule:
            coded = etree.SubElement(element, "DrugCoded")
            self.drug_coded(coded, m, f"{where}/DrugCoded")
        if m.quantity is not None:
            quantity = etree.SubElement(element, "Quantity")
            self.number(quantity, "Value", m.quantity.value, f"{where}/Quantity", required=True, positive=True)
            self.text(quantity, "CodeListQualifier", m.quantity.code_list_qualifier, f"{where}/Quantity", required=True)
            # Never free text: an order's quantity unit is an NCI code from the ECL. A medication
            # only echoed (a denial, a pharmacy's report) goes as its sender wrote it.
            self.coded(quantity, "QuantityUnitOfMeasure", m.quantity.unit_code, f"{where}/Quantity", required="quantity" in requires)
        elif "quantity" in requires:
            self.missing(f"{where}/Quantity")
        self.number(element, "DaysSupply", m.days_supply, where, positive=True)
        self.date(element, "WrittenDate", m.written_date, where, required="written_date" in requires)
        self.date(element, "LastFillDate", m.last_fill_date, where)
        self.text(element, "Substitutions", m.substitutions, where)
        self.number(element, "NumberOfRefills", m.number_of_refills, where)
        # PharmacyRequestedRefills sits in RxRenewalRequest's MedicationDispensed [V]; position [?].
        self.number(element, "PharmacyRequestedRefills", m.pharmacy_requested_refills, where)
        self.diagnoses(element, m, where)
        self.text(element, "Note", m.note, where, limit=NOTE_MAX)
        if m.sig_text is not None:
            self.text(etree.SubElement(element, "Sig"), "SigText", m.sig_text, f"{where}/Sig", required=True, limit=SIG_MAX)
        elif "sig_text" in requires:
            self.missing(f"{where}/Sig/SigText")
        source = m.history_source
        if source is not None:
            history = etree.SubElement(element, "HistorySource")  # child order [?] (reference §10.3)
            self.text(history, "SourceReference", source.source_reference, f"{where}/HistorySource")
            self.number(history, "FillNumber", source.fill_number, f"{where}/HistorySource")
            self.text(history, "PaymentType", source.payment_type, f"{where}/HistorySource")
        self.pharmacy(element, m.pharmacy, where, required=False)
        self.prescriber(element, m.prescriber, where, required=False)

    def drug_coded(self, coded: etree._Element, m: Medication, where: str) -> None:
        if m.product_code is not None:
            product = etree.SubElement(coded, "ProductCode")
            self.text(product, "Code", m.product_code.code, f"{where}/ProductCode", required=True)
            self.text(product, "Qualifier", m.product_code.qualifier, f"{where}/ProductCode", required=True)
        if m.strength is not None:
            strength = etree.SubElement(coded, "Strength")
            self.number(strength, "StrengthValue", m.strength.value, f"{where}/Strength", required=True, positive=True)
            self.coded(strength, "StrengthForm", m.strength.form_code, f"{where}/Strength")
            self.coded(strength, "StrengthUnitOfMeasure", m.strength.unit_code, f"{where}/Strength", required=True)
        if m.drug_db_code is not None:
            db = etree.SubElement(coded, "DrugDBCode")
            self.text(db, "Code", m.drug_db_code.code, f"{where}/DrugDBCode", required=True)
            self.text(db, "Qualifier", m.drug_db_code.qualifier, f"{where}/DrugDBCode", required=True)
        self.coded(coded, "DEASchedule", m.dea_schedule, where)

    def diagnoses(self, element: etree._Element, m: Medication, where: str) -> None:
        if not m.diagnoses:
            return
        block = etree.SubElement(element, "Diagnosis")
        where += "/Diagnosis"
        self.text(block, "ClinicalInformationQualifier", m.clinical_information_qualifier, where, required=True)
        if len(m.diagnoses) > 2:
            self.problem(where, f"{len(m.diagnoses)} diagnoses; SCRIPT carries a Primary and a Secondary only")
        for rank, diagnosis in zip(("Primary", "Secondary"), m.diagnoses):
            item = etree.SubElement(block, rank)
            self.text(item, "Code", diagnosis.code, f"{where}/{rank}", required=True)
            self.text(item, "Qualifier", diagnosis.qualifier, f"{where}/{rank}", required=True)
            self.text(item, "Description", diagnosis.description, f"{where}/{rank}")

    def response(self, parent: etree._Element, response: Response, path: str, allowed: tuple[str, ...]) -> None:
        where = f"{path}/Response"
        if response.outcome not in allowed:
            self.problem(where, f"{response.outcome!r} is not a response here ({', '.join(allowed)})")
            return
        choice = etree.SubElement(etree.SubElement(parent, "Response"), response.outcome)
        where += f"/{response.outcome}"
        if response.outcome == "Denied":
            for code in response.reason_codes:
                self.text(choice, "ReasonCode", code, where)
            self.text(choice, "DenialReason", response.denial_reason, where)
        else:
            self.text(choice, "Note", response.note, where, limit=NOTE_MAX)
        self.text(choice, "ReferenceNumber", response.reference_number, where)


# --- transactions ------------------------------------------------------------------------------


def _new_rx(w: _Writer, el: etree._Element, b: NewRx, path: str) -> None:
    w.patient(el, b.patient, path)
    w.pharmacy(el, b.pharmacy, path)
    w.prescriber(el, b.prescriber, path)
    w.medication(el, "MedicationPrescribed", b.medication, path, requires=_NEW_PRESCRIPTION)
    w.flag(el, "ProhibitRenewalRequest", b.prohibit_renewal_request, path)


def _cancel_rx(w: _Writer, el: etree._Element, b: CancelRx, path: str) -> None:
    w.patient(el, b.patient, path)
    w.pharmacy(el, b.pharmacy, path, required=False)
    w.prescriber(el, b.prescriber, path)
    w.medication(el, "MedicationPrescribed", b.medication, path, requires=_PRESCRIBED)


def _cancel_rx_response(w: _Writer, el: etree._Element, b: CancelRxResponse, path: str) -> None:
    w.response(el, b.response, path, CANCEL_RESPONSES)


def _renewal_request(w: _Writer, el: etree._Element, b: RxRenewalRequest, path: str) -> None:
    w.patient(el, b.patient, path)
    w.pharmacy(el, b.pharmacy, path)
    w.prescriber(el, b.prescriber, path)
    w.medication(el, "MedicationDispensed", b.dispensed, path)
    if b.prescribed is not None:
        w.medication(el, "MedicationPrescribed", b.prescribed, path)


def _answer(w: _Writer, el: etree._Element, b: RxRenewalResponse | RxChangeResponse, path: str, allowed: tuple[str, ...]) -> None:
    """Renewal and change responses: an approval is an order (quantity, date written); a
    denial may echo the medication as the pharmacy sent it, or leave it out."""
    w.response(el, b.response, path, allowed)
    w.patient(el, b.patient, path)
    w.pharmacy(el, b.pharmacy, path)
    w.prescriber(el, b.prescriber, path)
    if b.response.outcome in APPROVING_RESPONSES:
        w.medication(el, "MedicationPrescribed", b.prescribed, path, requires=_PRESCRIBED)
    elif b.prescribed is not None:
        w.medication(el, "MedicationPrescribed", b.prescribed, path)


def _renewal_response(w: _Writer, el: etree._Element, b: RxRenewalResponse, path: str) -> None:
    _answer(w, el, b, path, RENEWAL_RESPONSES)


def _change_request(w: _Writer, el: etree._Element, b: RxChangeRequest, path: str) -> None:
    w.text(el, "MessageRequestCode", b.request_code, path, required=True)
    for code in b.request_sub_codes:
        w.text(el, "MessageRequestSubCode", code, path)
    w.patient(el, b.patient, path)
    w.pharmacy(el, b.pharmacy, path)
    w.prescriber(el, b.prescriber, path)
    w.medication(el, "MedicationPrescribed", b.prescribed, path)
    if len(b.requested) > 9:
        w.problem(f"{path}/MedicationRequested", f"{len(b.requested)} alternatives; at most 9 are allowed")
    for medication in b.requested:
        w.medication(el, "MedicationRequested", medication, path)


def _change_response(w: _Writer, el: etree._Element, b: RxChangeResponse, path: str) -> None:
    _answer(w, el, b, path, CHANGE_RESPONSES)


def _rx_fill(w: _Writer, el: etree._Element, b: RxFill, path: str) -> None:
    status = b.fill_status
    if status.status not in FILL_STATUSES:
        w.problem(f"{path}/FillStatus", f"{status.status!r} is not a fill status ({', '.join(FILL_STATUSES)})")
    else:
        choice = etree.SubElement(etree.SubElement(el, "FillStatus"), status.status)
        where = f"{path}/FillStatus/{status.status}"
        w.text(choice, "Note", status.note, where, limit=NOTE_MAX)
        w.text(choice, "ReasonCode", status.reason_code, where)
    w.patient(el, b.patient, path)
    w.pharmacy(el, b.pharmacy, path)
    w.prescriber(el, b.prescriber, path)
    if b.prescribed is not None:
        w.medication(el, "MedicationPrescribed", b.prescribed, path)
    if b.dispensed is not None:
        w.medication(el, "MedicationDispensed", b.dispensed, path)
    elif status.status in ("Dispensed", "PartiallyDispensed"):
        w.missing(f"{path}/MedicationDispensed")


def _history_request(w: _Writer, el: etree._Element, b: RxHistoryRequest, path: str) -> None:
    w.patient(el, b.patient, path)
    w.prescriber(el, b.prescriber, path)
    if b.start_date is not None or b.end_date is not None:
        dates = etree.SubElement(el, "RequestedDates")
        w.date(dates, "StartDate", b.start_date, f"{path}/RequestedDates", required=True)
        w.date(dates, "EndDate", b.end_date, f"{path}/RequestedDates", required=True)
    w.text(el, "Consent", b.consent, path)


def _history_response(w: _Writer, el: etree._Element, b: RxHistoryResponse, path: str) -> None:
    w.patient(el, b.patient, path)
    w.prescriber(el, b.prescriber, path, required=False)
    for medication in b.dispensed:
        w.medication(el, "MedicationDispensed", medication, path)


def _status(w: _Writer, el: etree._Element, b: Status, path: str) -> None:
    w.text(el, "Code", b.code, path, required=True)
    w.text(el, "DescriptionCode", b.description_code, path)
    w.text(el, "Description", b.description, path)


def _verify(w: _Writer, el: etree._Element, b: Verify, path: str) -> None:
    status = etree.SubElement(el, "VerifyStatus")
    w.text(status, "Code", b.code, f"{path}/VerifyStatus", required=True)
    w.text(status, "Description", b.description, f"{path}/VerifyStatus")


def _error(w: _Writer, el: etree._Element, b: Error, path: str) -> None:
    w.text(el, "Code", b.code, path, required=True)
    w.text(el, "DescriptionCode", b.description_code, path)
    w.text(el, "Description", b.description, path)


_BODY_WRITERS: dict[type, Callable[[_Writer, etree._Element, object, str], None]] = {
    NewRx: _new_rx,
    CancelRx: _cancel_rx,
    CancelRxResponse: _cancel_rx_response,
    RxRenewalRequest: _renewal_request,
    RxRenewalResponse: _renewal_response,
    RxChangeRequest: _change_request,
    RxChangeResponse: _change_response,
    RxFill: _rx_fill,
    RxHistoryRequest: _history_request,
    RxHistoryResponse: _history_response,
    Status: _status,
    Verify: _verify,
    Error: _error,
}
