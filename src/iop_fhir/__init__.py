"""iop-fhir: Intensive Outpatient Program records <-> FHIR R4, kept in sync with EHRs and pharmacies."""

from iop_fhir.errors import (
    ConsentDenied,
    Gone,
    IopFhirError,
    NotFound,
    PermanentDeliveryError,
    PreconditionFailed,
    RecordInvalid,
    TransientDeliveryError,
    UnsupportedFormat,
    VersionConflict,
)

__version__ = "0.1.0"

__all__ = [
    "ConsentDenied", "Gone", "IopFhirError", "NotFound", "PermanentDeliveryError", "PreconditionFailed",
    "RecordInvalid", "TransientDeliveryError", "UnsupportedFormat", "VersionConflict", "__version__",
]
