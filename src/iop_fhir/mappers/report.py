"""What a reverse mapping could not carry over, said out loud instead of dropped."""

from __future__ import annotations

from dataclasses import dataclass, field

from iop_fhir.errors import Issue


@dataclass
class MappingReport:
    """Issues met while mapping FHIR to the IOP record: severity, FHIRPath-like location, why.

    ``error``: something the record needs could not be built (the item was left out);
    ``warning``: data present in FHIR that the record has no place for, or had to be guessed;
    ``information``: a normalisation worth knowing (a foreign code system mapped to ours).
    """

    issues: list[Issue] = field(default_factory=list)

    def error(self, location: str, message: str, code: str = "invalid") -> None:
        self.issues.append(Issue(message, location, "error", code))

    def warning(self, location: str, message: str, code: str = "not-supported") -> None:
        self.issues.append(Issue(message, location, "warning", code))

    def info(self, location: str, message: str, code: str = "informational") -> None:
        self.issues.append(Issue(message, location, "information", code))

    def extend(self, issues: list[Issue]) -> None:
        self.issues.extend(issues)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity in ("error", "fatal")]
