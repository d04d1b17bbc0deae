"""The one error tree of the package.

Every error a caller can cause is an ``IopFhirError``; each carries the HTTP status the
gateway answers with and a list of issues that point at the offending field, so the API can
turn any of them into an OperationOutcome and the CLI into a message. Anything else that
escapes is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Issue:
    """One problem, located: ``location`` is a JSON pointer into the input (``/prescriptions/0/refills``)
    or a FHIRPath-like path for FHIR input (``MedicationRequest.status``)."""

    message: str
    location: str = ""
    severity: str = "error"  # error | warning | information (OperationOutcome.issue.severity)
    code: str = "invalid"  # OperationOutcome.issue.code (invalid, required, value, not-supported, ...)

    def __str__(self) -> str:
        return f"{self.location or '/'}: {self.message}"


class IopFhirError(Exception):
    """Root of every error the package raises on purpose."""

    status: int = 400
    issue_code: str = "processing"

    def __init__(self, message: str, issues: list[Issue] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.issues: list[Issue] = issues if issues is not None else [Issue(message, code=self.issue_code)]


class RecordInvalid(IopFhirError):
    """An IOP record (or FHIR input) broke the contract; ``issues`` names every violation."""

    status = 422
    issue_code = "invalid"


class UnsupportedFormat(IopFhirError):
    """Input that is not JSON/XML of a kind we read, or a format nobody asked for."""

    status = 415
    issue_code = "not-supported"


class NotFound(IopFhirError):
    status = 404
    issue_code = "not-found"


class Gone(IopFhirError):
    status = 410
    issue_code = "deleted"


class VersionConflict(IopFhirError):
    status = 409
    issue_code = "conflict"


class PreconditionFailed(IopFhirError):
    status = 412
    issue_code = "conflict"


class ConsentDenied(IopFhirError):
    status = 403
    issue_code = "suppressed"


class DeliveryError(IopFhirError):
    """A delivery to an outside system failed. Besides our own ``status`` (what the gateway
    answers), it carries what the target said: ``http_status`` (``None`` when no answer came)
    and ``retry_after`` (seconds, from its Retry-After header), so the worker can back off."""

    def __init__(
        self,
        message: str,
        issues: list[Issue] | None = None,
        *,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, issues)
        self.http_status = http_status
        self.retry_after = retry_after


class TransientDeliveryError(DeliveryError):
    """A delivery failed in a way that may pass: retry with backoff."""

    status = 503
    issue_code = "transient"


class PermanentDeliveryError(DeliveryError):
    """A delivery that will never succeed as it is: dead-letter it."""

    status = 502
    issue_code = "exception"


@dataclass
class IssueList:
    """Collects issues while walking an input, so that every violation is reported at once."""

    issues: list[Issue] = field(default_factory=list)

    def add(self, location: str, message: str, *, severity: str = "error", code: str = "invalid") -> None:
        self.issues.append(Issue(message=message, location=location, severity=severity, code=code))

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity in ("error", "fatal")]

    def __bool__(self) -> bool:
        return bool(self.issues)


def operation_outcome(issues: Iterable[Issue], *, default: str = "all OK") -> dict[str, Any]:
    """Issues as a FHIR OperationOutcome; each issue's location goes in ``expression``.

    Locations are FHIRPath-like for FHIR input (``MedicationRequest.status``) and JSON
    pointers for IOP records (``/prescriptions/2/refills``). No issues gives one
    ``information`` issue, since an OperationOutcome must have at least one.
    """
    out = [
        {
            "severity": i.severity,
            "code": i.code,
            "diagnostics": i.message,
            **({"expression": [i.location]} if i.location else {}),
        }
        for i in issues
    ] or [{"severity": "information", "code": "informational", "diagnostics": default}]
    return {"resourceType": "OperationOutcome", "issue": out}
