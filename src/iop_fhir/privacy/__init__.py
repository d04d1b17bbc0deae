"""Privacy under 42 CFR Part 2: security labels, consent terms, the disclosure decision.

* ``labels``: :func:`label` sets ``meta.security`` (the store applies it to every write);
  :func:`is_part2` and :func:`sensitivity` read what a resource is. The rules are data in
  ``labels.json``.
* ``consent``: :func:`read_terms` / :func:`terms_from_fhir` read FHIR Consents;
  :func:`decide` judges one resource for one recipient, :func:`disclose` a batch, returning
  what may go out (labelled, redacted) and the verdicts an audit records.
* ``redact``: removes the mentions of what a recipient may not see.
* ``gate``: :class:`~iop_fhir.privacy.gate.PrivacyGate`, the one place every exit asks what may
  leave for a recipient (and has it audited); ``recipients`` maps API clients and destinations
  to recipients; ``audit`` builds and stores the AuditEvents and reads back the accounting.

docs/privacy.md states the policy and how each exit uses this package.
"""

from iop_fhir.privacy.consent import (
    NOTICE,
    ConsentTerms,
    Decision,
    Disclosure,
    Recipient,
    Verdict,
    decide,
    disclose,
    read_terms,
    terms_from_fhir,
)
from iop_fhir.privacy.labels import Labels, Resolver, is_part2, label, labels_of, sensitivity
from iop_fhir.privacy.redact import redact

__all__ = [
    "NOTICE",
    "ConsentTerms",
    "Decision",
    "Disclosure",
    "Labels",
    "Recipient",
    "Resolver",
    "Verdict",
    "decide",
    "disclose",
    "is_part2",
    "label",
    "labels_of",
    "read_terms",
    "redact",
    "sensitivity",
    "terms_from_fhir",
]
