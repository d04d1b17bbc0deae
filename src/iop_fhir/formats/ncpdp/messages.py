"""NCPDP SCRIPT 2017071 messages as typed, immutable dataclasses, with the code tables they use.

One :class:`Message` is a :class:`Header` and one body dataclass per transaction (``NewRx``,
``RxFill``, ``Status``, ...). The dataclasses hold values, not XML: :mod:`.build` writes them as
canonical 2017071 XML and :mod:`.parse` reads them back from whatever a sender wrote (2017071,
the 10.6 namespace variant, the quirks of the synthetic samples).

Fields the wire may omit are ``None`` (or empty tuples): the parser is tolerant and keeps what
it found; the builder checks what each transaction requires and names what is missing.
Codes stay strings (NDCs and status codes have leading zeros); amounts are ``Decimal``.

Confidence of the code values (``shared/reference/ncpdp-script.md``): [V] seen in an independent
authoritative or production-derived artifact, [M] background knowledge not re-verified,
[?] uncertain. Each table says which; check [M]/[?] values against the licensed ECL.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from ...errors import IopFhirError, Issue, RecordInvalid

# --- versions and envelope -------------------------------------------------------------------

VERSION = "2017071"
# All six root attributes carry this value in 2017071 [V]; order as senders emit them.
VERSION_ATTRIBUTE_VALUE = "20170715"
VERSION_ATTRIBUTES = (
    ("DatatypesVersion", VERSION_ATTRIBUTE_VALUE),
    ("TransportVersion", VERSION_ATTRIBUTE_VALUE),
    ("TransactionDomain", "SCRIPT"),
    ("TransactionVersion", VERSION_ATTRIBUTE_VALUE),
    ("StructuresVersion", VERSION_ATTRIBUTE_VALUE),
    ("ECLVersion", VERSION_ATTRIBUTE_VALUE),
)
XSI = "http://www.w3.org/2001/XMLSchema-instance"
# The 10.6 default namespace; accepted on input only (2017071 has no namespace) [V].
NAMESPACE_10_6 = "http://www.ncpdp.org/schema/SCRIPT"

# --- code tables -----------------------------------------------------------------------------

# Header To/From qualifiers [V]: P pharmacy (NCPDP Provider ID), D prescriber (network id),
# M mailbox/switch, ZZZ mutually defined.
PHARMACY_QUALIFIER = "P"
PRESCRIBER_QUALIFIER = "D"

# DEA schedule (DEASchedule/Code): NCI Thesaurus codes [V].
DEA_SCHEDULE_CODES = {"I": "C48672", "II": "C48675", "III": "C48676", "IV": "C48677", "V": "C48679"}
DEA_SCHEDULE_UNSPECIFIED = "C38046"  # "Unspecified": not a controlled substance [V]
DEA_SCHEDULES = {code: schedule for schedule, code in DEA_SCHEDULE_CODES.items()}


@dataclass(frozen=True)
class UnitCode:
    """One NCPDP quantity/strength unit (an NCI Thesaurus code) and the UCUM unit it stands for."""

    nci: str
    ucum: str
    text: str
    confidence: str  # V | M | ? (see the module docstring)


# Our UCUM dose units -> NCPDP unit codes (QuantityUnitOfMeasure, StrengthUnitOfMeasure).
# Data, not if-chains: a unit missing here is refused, never sent as free text.
QUANTITY_UNITS: tuple[UnitCode, ...] = (
    UnitCode("C48542", "{tbl}", "tablet", "V"),
    UnitCode("C48480", "{Capsule}", "capsule", "V"),  # [V usage in a REMS NewRx; display M]
    UnitCode("C28254", "mL", "milliliter", "V"),  # oral liquids only in mL [V: ONC criterion]
    UnitCode("C28253", "mg", "milligram", "V"),
    UnitCode("C48155", "g", "gram", "M"),
    # A plain count ("1": films, injections) as "Each" [M]; the ECL may hold a film-specific
    # code [?] -- replace it here when the licensed list is at hand.
    UnitCode("C64933", "1", "each", "M"),
)
UNIT_BY_UCUM = {unit.ucum: unit for unit in QUANTITY_UNITS}
UNIT_BY_NCI = {unit.nci: unit for unit in QUANTITY_UNITS}

# Dose-form codes for Strength/StrengthForm, keyed by the dose-form word of an RxNorm name.
# Only the tablet code was seen in use [V usage, display M]; other forms leave StrengthForm out.
STRENGTH_FORMS = {"tablet": "C42998"}

QUANTITY_ORIGINAL = "38"  # Quantity/CodeListQualifier 38 = original quantity [V]
ICD10CM_QUALIFIER = "ABF"  # Diagnosis Primary/Qualifier for ICD-10-CM [V]
DIAGNOSIS_PRESCRIBER_SUPPLIED = "1"  # ClinicalInformationQualifier; "1" seen [V], meaning [M]
NDC_QUALIFIER = "ND"  # ProductCode/Qualifier for an NDC [V]
# DrugDBCode/Qualifier: RxNorm term types. SCD/SBD [V]; the pack types [M].
RXNORM_TERM_TYPES = frozenset({"SCD", "SBD", "GPCK", "BPCK"})
SUBSTITUTION_ALLOWED = "0"  # no product selection indicated [M]
SUBSTITUTION_NOT_ALLOWED = "1"  # substitution not allowed by prescriber [M]
NOTE_MAX = 210  # MedicationPrescribed/Note [V: VistA length check]
SIG_MAX = 1000  # Sig/SigText [V: VistA]

# Patient/HumanPatient/Gender [M] <-> FHIR administrative gender.
GENDER_TO_FHIR = {"M": "male", "F": "female", "U": "unknown"}
GENDER_FROM_FHIR = {"male": "M", "female": "F", "other": "U", "unknown": "U"}

# RxFill/FillStatus choices [V: HL7 Da Vinci test-ehr model].
FILL_STATUSES = ("Dispensed", "PartiallyDispensed", "NotDispensed", "Transferred")

# Response choices per transaction [V: VistA; Validated M].
CANCEL_RESPONSES = ("Approved", "Denied")
RENEWAL_RESPONSES = ("Approved", "ApprovedWithChanges", "Denied", "Replace")
CHANGE_RESPONSES = ("Approved", "ApprovedWithChanges", "Denied", "Validated")
# Answers that write an order (a renewal is a new prescription; Replace: a new one follows).
APPROVING_RESPONSES = frozenset({"Approved", "ApprovedWithChanges", "Replace"})

# RxChangeRequest/MessageRequestCode [V for G, P, U; M for the others].
CHANGE_REQUEST_CODES = {
    "G": "Generic substitution",
    "P": "Prior authorization required",
    "U": "Prescriber authorization",
    "T": "Therapeutic interchange",
    "D": "Drug use evaluation",
    "S": "Script clarification",
    "OS": "Out of stock",
}

# Status/Verify/Error codes (§9 of the reference).
STATUS_OK = "000"  # transaction accepted by the next hop [V usage]
VERIFY_OK = "010"  # accepted by the ultimate receiver [V usage]
ERROR_COMMUNICATION = "600"  # communication problem, retry later [V]
ERROR_UNABLE = "601"  # receiver unable to process, do not retry [V]
ERROR_SYSTEM = "602"  # receiver system error, retry later [V]
ERROR_REJECTED = "900"  # transaction rejected, do not retry [V]
RETRYABLE_ERRORS = frozenset({ERROR_COMMUNICATION, ERROR_SYSTEM})
DESCRIPTION_INTERNAL_ERROR = "007"  # Error/DescriptionCode: internal processing error [V]


# --- errors ----------------------------------------------------------------------------------


class NcpdpRejected(IopFhirError):
    """An inbound SCRIPT message we cannot read: malformed, hostile, too large, the wrong
    document, or missing what correlation needs. Issues name the element path; answer it with
    an NCPDP ``Error`` (:func:`iop_fhir.formats.ncpdp.error_for`).

    ``header`` is the message's header when it could still be read, so the Error can be
    addressed to the sender and correlated with its MessageID."""

    status = 400
    issue_code = "structure"

    def __init__(self, message: str, issues: list[Issue] | None = None, *, header: Header | None = None) -> None:
        super().__init__(message, issues)
        self.header = header


class NcpdpInvalid(RecordInvalid):
    """A message we were asked to build lacks what the transaction requires, or the FHIR
    resources it is built from do; issues name each missing or unusable element."""


# --- shared building blocks ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RoutingId:
    """Header To/From: a routing id and its qualifier (``P`` pharmacy, ``D`` prescriber, ...)."""

    value: str
    qualifier: str | None = None


@dataclass(frozen=True, kw_only=True)
class SenderSoftware:
    developer: str
    product: str
    version: str


@dataclass(frozen=True, kw_only=True)
class Header:
    """The envelope header. Responses carry the request's MessageID in ``relates_to_message_id``."""

    message_id: str
    to: RoutingId | None = None
    from_: RoutingId | None = None
    sent_time: dt.datetime | None = None  # timezone-aware; written in UTC
    relates_to_message_id: str | None = None
    sender_software: SenderSoftware | None = None
    rx_reference_number: str | None = None  # the pharmacy's prescription number
    prescriber_order_number: str | None = None  # our MedicationRequest's business identifier
    digital_signature: bool | None = None  # EPCS indicator from the signing system, never set by us


@dataclass(frozen=True, kw_only=True)
class Name:
    last: str | None = None
    first: str | None = None
    middle: str | None = None
    suffix: str | None = None
    prefix: str | None = None


@dataclass(frozen=True, kw_only=True)
class Address:
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country_code: str | None = None


@dataclass(frozen=True, kw_only=True)
class Patient:
    name: Name | None = None
    gender: str | None = None  # M | F | U
    birth_date: dt.date | None = None
    address: Address | None = None
    phone: str | None = None


@dataclass(frozen=True, kw_only=True)
class Prescriber:
    name: Name | None = None
    npi: str | None = None
    dea_number: str | None = None
    state_license_number: str | None = None
    address: Address | None = None
    phone: str | None = None


@dataclass(frozen=True, kw_only=True)
class Pharmacy:
    ncpdp_id: str | None = None
    npi: str | None = None
    business_name: str | None = None
    address: Address | None = None
    phone: str | None = None


@dataclass(frozen=True, kw_only=True)
class Code:
    """A coded product: ``ProductCode`` (NDC, qualifier ``ND``) or ``DrugDBCode`` (RxNorm, ``SCD``...)."""

    code: str
    qualifier: str | None = None


@dataclass(frozen=True, kw_only=True)
class Strength:
    value: Decimal | None = None
    form_code: str | None = None  # NCI dose form (StrengthForm/Code)
    unit_code: str | None = None  # NCI unit (StrengthUnitOfMeasure/Code)


@dataclass(frozen=True, kw_only=True)
class Quantity:
    value: Decimal
    unit_code: str | None = None  # NCI unit (QuantityUnitOfMeasure/Code)
    code_list_qualifier: str | None = QUANTITY_ORIGINAL


@dataclass(frozen=True, kw_only=True)
class Diagnosis:
    code: str  # ICD-10-CM without the dot (F1120)
    qualifier: str | None = ICD10CM_QUALIFIER
    description: str | None = None


@dataclass(frozen=True, kw_only=True)
class HistorySource:
    """Where a medication-history entry came from: the prescription number and fill sequence."""

    source_reference: str | None = None
    fill_number: int | None = None
    payment_type: str | None = None


@dataclass(frozen=True, kw_only=True)
class Medication:
    """MedicationPrescribed, MedicationDispensed and MedicationRequested share this shape;
    the element name comes from where it stands. ``diagnoses`` are Primary then Secondary;
    ``pharmacy``/``prescriber``/``history_source`` are only carried in RxHistoryResponse."""

    description: str
    product_code: Code | None = None
    strength: Strength | None = None
    drug_db_code: Code | None = None
    dea_schedule: str | None = None  # NCI code (C48675 ...)
    quantity: Quantity | None = None
    days_supply: int | None = None
    written_date: dt.date | None = None
    last_fill_date: dt.date | None = None
    substitutions: str | None = None
    number_of_refills: int | None = None
    pharmacy_requested_refills: int | None = None
    clinical_information_qualifier: str | None = None
    diagnoses: tuple[Diagnosis, ...] = ()
    note: str | None = None
    sig_text: str | None = None
    history_source: HistorySource | None = None
    pharmacy: Pharmacy | None = None
    prescriber: Prescriber | None = None


@dataclass(frozen=True, kw_only=True)
class Response:
    """The ``Response`` choice of CancelRxResponse, RxRenewalResponse and RxChangeResponse."""

    outcome: str  # Approved | ApprovedWithChanges | Denied | Replace | Validated
    note: str | None = None
    reason_codes: tuple[str, ...] = ()  # Denied/ReasonCode (ECL values [?])
    denial_reason: str | None = None
    reference_number: str | None = None


@dataclass(frozen=True, kw_only=True)
class FillStatus:
    status: str  # one of FILL_STATUSES
    note: str | None = None
    reason_code: str | None = None  # ECL values [?]


# --- transactions ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NewRx:
    patient: Patient | None = None
    pharmacy: Pharmacy | None = None
    prescriber: Prescriber | None = None
    medication: Medication | None = None  # MedicationPrescribed
    prohibit_renewal_request: bool | None = None


@dataclass(frozen=True, kw_only=True)
class CancelRx:
    patient: Patient | None = None
    pharmacy: Pharmacy | None = None
    prescriber: Prescriber | None = None
    medication: Medication | None = None  # the prescription being cancelled


@dataclass(frozen=True, kw_only=True)
class CancelRxResponse:
    response: Response


@dataclass(frozen=True, kw_only=True)
class RxRenewalRequest:
    patient: Patient | None = None
    pharmacy: Pharmacy | None = None
    prescriber: Prescriber | None = None
    dispensed: Medication | None = None  # what was last dispensed
    prescribed: Medication | None = None  # the original order


@dataclass(frozen=True, kw_only=True)
class RxRenewalResponse:
    response: Response
    patient: Patient | None = None
    pharmacy: Pharmacy | None = None
    prescriber: Prescriber | None = None
    prescribed: Medication | None = None  # on ApprovedWithChanges: the changed medication


@dataclass(frozen=True, kw_only=True)
class RxChangeRequest:
    request_code: str | None = None  # MessageRequestCode (CHANGE_REQUEST_CODES)
    request_sub_codes: tuple[str, ...] = ()
    patient: Patient | None = None
    pharmacy: Pharmacy | None = None
    prescriber: Prescriber | None = None
    prescribed: Medication | None = None  # the original order
    requested: tuple[Medication, ...] = ()  # proposed alternatives (0..9)


@dataclass(frozen=True, kw_only=True)
class RxChangeResponse:
    response: Response
    patient: Patient | None = None
    pharmacy: Pharmacy | None = None
    prescriber: Prescriber | None = None
    prescribed: Medication | None = None  # the approved medication


@dataclass(frozen=True, kw_only=True)
class RxFill:
    fill_status: FillStatus
    patient: Patient | None = None
    pharmacy: Pharmacy | None = None
    prescriber: Prescriber | None = None
    prescribed: Medication | None = None
    dispensed: Medication | None = None


@dataclass(frozen=True, kw_only=True)
class RxHistoryRequest:
    patient: Patient | None = None
    prescriber: Prescriber | None = None
    start_date: dt.date | None = None  # RequestedDates [V names; position ?]
    end_date: dt.date | None = None
    consent: str | None = None  # patient consent flag (Y/N...) [?]


@dataclass(frozen=True, kw_only=True)
class RxHistoryResponse:
    patient: Patient | None = None
    prescriber: Prescriber | None = None
    dispensed: tuple[Medication, ...] = ()  # one per dispense event


@dataclass(frozen=True, kw_only=True)
class Status:
    code: str = STATUS_OK
    description_code: str | None = None
    description: str | None = None


@dataclass(frozen=True, kw_only=True)
class Verify:
    code: str = VERIFY_OK
    description: str | None = None


@dataclass(frozen=True, kw_only=True)
class Error:
    code: str
    description_code: str | None = None
    description: str | None = None


Body = (
    NewRx
    | CancelRx
    | CancelRxResponse
    | RxRenewalRequest
    | RxRenewalResponse
    | RxChangeRequest
    | RxChangeResponse
    | RxFill
    | RxHistoryRequest
    | RxHistoryResponse
    | Status
    | Verify
    | Error
)
# Element name -> body class; the element name is the class name.
BODY_KINDS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        NewRx,
        CancelRx,
        CancelRxResponse,
        RxRenewalRequest,
        RxRenewalResponse,
        RxChangeRequest,
        RxChangeResponse,
        RxFill,
        RxHistoryRequest,
        RxHistoryResponse,
        Status,
        Verify,
        Error,
    )
}


@dataclass(frozen=True, kw_only=True)
class Message:
    """One SCRIPT message. ``version`` is what the sender declared (``2017071``, ``10.6``, ...;
    ``None`` when the root said nothing); :func:`build` always writes 2017071."""

    header: Header
    body: Body
    version: str | None = field(default=VERSION, compare=False)

    @property
    def kind(self) -> str:
        """The transaction's element name: ``NewRx``, ``RxFill``, ``Status``, ..."""
        return type(self.body).__name__


# --- replies ---------------------------------------------------------------------------------


def reply_header(request: Header, *, message_id: str, sent: dt.datetime, sender: RoutingId | None = None) -> Header:
    """The header of a response to ``request``: To/From swapped, RelatesToMessageID = its
    MessageID, the pharmacy's and prescriber's order numbers echoed [V].

    ``sender`` stands in for our own routing id when the request did not say whom it was for.
    """
    return Header(
        message_id=message_id,
        to=request.from_,
        from_=request.to or sender,
        sent_time=sent,
        relates_to_message_id=request.message_id,
        rx_reference_number=request.rx_reference_number,
        prescriber_order_number=request.prescriber_order_number,
    )


def status_for(request: Header, *, message_id: str, sent: dt.datetime, sender: RoutingId | None = None) -> Message:
    """The ``Status`` 000 acknowledgement of an accepted message."""
    return Message(header=reply_header(request, message_id=message_id, sent=sent, sender=sender), body=Status())


def verify_for(request: Header, *, message_id: str, sent: dt.datetime, description: str | None = None) -> Message:
    """The ``Verify`` 010 return receipt: accepted by the ultimate receiver."""
    return Message(header=reply_header(request, message_id=message_id, sent=sent), body=Verify(description=description))


def error_for(
    exc: BaseException,
    relates_to: Header | None = None,
    *,
    message_id: str,
    sent: dt.datetime,
    sender: RoutingId | None = None,
) -> Message:
    """The NCPDP ``Error`` answering a message that failed with ``exc``.

    Code: 900 (rejected, do not retry) for anything the sender caused (every 4xx
    ``IopFhirError``, an unreadable message included); 602 (system error, retry later) for
    our own failures (a 5xx ``IopFhirError``, or any other exception -- then DescriptionCode
    007, internal processing error, and no detail that could leak internals). The Description
    lists the issues with their element paths.

    ``relates_to`` is the request's header; by default the one an :class:`NcpdpRejected`
    salvaged. Without a header (bytes that are not XML at all) the Error cannot name its
    addressee and carries only ``sender`` as From.
    """
    if relates_to is None and isinstance(exc, NcpdpRejected):
        relates_to = exc.header
    if isinstance(exc, IopFhirError) and exc.status < 500:
        body = Error(code=ERROR_REJECTED, description=_describe(exc))
    elif isinstance(exc, IopFhirError):
        body = Error(code=ERROR_SYSTEM, description=_describe(exc))
    else:
        body = Error(code=ERROR_SYSTEM, description_code=DESCRIPTION_INTERNAL_ERROR, description="internal processing error")
    if relates_to is None:
        header = Header(message_id=message_id, from_=sender, sent_time=sent)
    else:
        header = reply_header(relates_to, message_id=message_id, sent=sent, sender=sender)
    return Message(header=header, body=body)


_DESCRIPTION_ISSUES = 5  # an Error names the first few problems; the sender fixes and resends


def _describe(exc: IopFhirError) -> str:
    parts = [f"{issue.location}: {issue.message}" if issue.location else issue.message for issue in exc.issues[:_DESCRIPTION_ISSUES]]
    if len(exc.issues) > _DESCRIPTION_ISSUES:
        parts.append(f"and {len(exc.issues) - _DESCRIPTION_ISSUES} more")
    return "; ".join(parts) or exc.message
