"""NCPDP SCRIPT 2017071: the XML pharmacies speak, as typed messages.

The whole API::

    from iop_fhir.formats import ncpdp

    message = ncpdp.parse(xml_bytes)        # -> ncpdp.Message (header + typed body); tolerant
    message.kind                            # "NewRx", "RxFill", "Status", ...
    xml = ncpdp.build(message)              # -> canonical 2017071 bytes; deterministic
    ack = ncpdp.status_for(message.header, message_id=..., sent=...)   # Status 000
    err = ncpdp.error_for(exc, message_id=..., sent=...)               # Error 900/602

``parse`` raises :class:`NcpdpRejected` (400) for anything unreadable or hostile, naming the
element path; answer it with ``build(error_for(exc, ...))``. ``build`` raises
:class:`NcpdpInvalid` (422) when a transaction lacks what it requires.

Modules: :mod:`.messages` (dataclasses, code tables, reply helpers), :mod:`.build`,
:mod:`.parse`. FHIR <-> message mapping lives in :mod:`iop_fhir.pharmacy.script_mapping`.
Reference: ``shared/reference/ncpdp-script.md`` (confidence tags [V]/[M]/[?] in the tables).
"""

from .build import build, format_decimal, format_sent_time
from .messages import (
    DEA_SCHEDULE_CODES,
    DEA_SCHEDULES,
    FILL_STATUSES,
    PHARMACY_QUALIFIER,
    PRESCRIBER_QUALIFIER,
    RETRYABLE_ERRORS,
    UNIT_BY_NCI,
    UNIT_BY_UCUM,
    Address,
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
    NcpdpInvalid,
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
    error_for,
    reply_header,
    status_for,
    verify_for,
)
from .parse import MAX_MESSAGE_BYTES, parse

__all__ = [
    "DEA_SCHEDULES",
    "DEA_SCHEDULE_CODES",
    "FILL_STATUSES",
    "MAX_MESSAGE_BYTES",
    "PHARMACY_QUALIFIER",
    "PRESCRIBER_QUALIFIER",
    "RETRYABLE_ERRORS",
    "UNIT_BY_NCI",
    "UNIT_BY_UCUM",
    "Address",
    "CancelRx",
    "CancelRxResponse",
    "Code",
    "Diagnosis",
    "Error",
    "FillStatus",
    "Header",
    "HistorySource",
    "Medication",
    "Message",
    "Name",
    "NcpdpInvalid",
    "NcpdpRejected",
    "NewRx",
    "Patient",
    "Pharmacy",
    "Prescriber",
    "Quantity",
    "Response",
    "RoutingId",
    "RxChangeRequest",
    "RxChangeResponse",
    "RxFill",
    "RxHistoryRequest",
    "RxHistoryResponse",
    "RxRenewalRequest",
    "RxRenewalResponse",
    "SenderSoftware",
    "Status",
    "Strength",
    "Verify",
    "build",
    "error_for",
    "format_decimal",
    "format_sent_time",
    "parse",
    "reply_header",
    "status_for",
    "verify_for",
]
