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
    "RecordInvalid", "TransientDeliveryError", "UnsupportedFormat", "VersionConflict", "__version__", "create_app",
]


def create_app(config=None):  # type: ignore[no-untyped-def]
    """The gateway's Flask app (see ``iop_fhir.server.create_app``); imported lazily so the
    conversion core does not load Flask and SQLAlchemy."""
    from iop_fhir.server import create_app as factory

    return factory(config)
