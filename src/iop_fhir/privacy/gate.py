"""The privacy gate: the one place every exit passes what it would send through (issue 6 §3).

An exit (a REST response, ``$everything``, a sync delivery, a discharge package, a pharmacy
message) names its recipient and hands the gate the resources; :meth:`PrivacyGate.release`
reads the patients' consents from the store, decides (:func:`~iop_fhir.privacy.consent.disclose`,
references resolved through the store), and writes the audit: per patient one AuditEvent for
what was disclosed and one for what was withheld. The exit then sends ``permitted``, says that
data was withheld when ``withheld_count`` is not zero, and carries the notice.

The REST API decides a response in pieces (a search page, then what it includes) and audits
once per request: :meth:`PrivacyGate.disclosure` decides without auditing, and
:meth:`PrivacyGate.audit_disclosure` writes the audit of what was decided (:func:`combine`
joins the pieces).

A recipient named by identifiers (``[[client]]`` ``organization = "system|value"``) is also
known by the references of the stored Organizations and Practitioners with those identifiers,
since a consent names its recipient by reference (the record's consents do).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from iop_fhir import terminology
from iop_fhir.errors import Gone, NotFound, RecordInvalid
from iop_fhir.privacy.audit import DISCLOSE, AuditLog, audit_event
from iop_fhir.privacy.consent import ConsentTerms, Decision, Disclosure, Recipient, Verdict, disclose, patients_of, read_terms
from iop_fhir.privacy.labels import Resolver, is_directory, reference_key
from iop_fhir.store import Store
from iop_fhir.store.resources import ID_PATTERN
from iop_fhir.store.search_index import parse_reference

log = logging.getLogger(__name__)

JSON = dict[str, Any]

# The notice against redisclosure (42 CFR 2.32) on a Bundle carrying Part 2 data: Bundle.meta.extension
# (R4's Bundle has no extension element of its own; its meta, an Element, has).
NOTICE_EXTENSION = terminology.extension_url("redisclosure-notice")
PART2_BUNDLE_LABELS = ("42CFRPart2", "NORDSCLCD")
PATIENTS_PER_QUERY = 50  # patients per Consent search (a comma list is one OR)
IDENTITY_SECONDS = 60.0  # how long the stored parties behind a recipient's identifiers are trusted
PARTY_TYPES = ("Organization", "Practitioner", "PractitionerRole")


class StoreResolver:
    """A :data:`~iop_fhir.privacy.labels.Resolver` over the store's current versions, remembering
    what it read (one disclosure looks up the same diagnoses and episodes many times)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seen: dict[str, JSON | None] = {}

    def __call__(self, reference: str) -> JSON | None:
        key = reference_key(reference)
        if key in self.seen:
            return self.seen[key]
        found = parse_reference(reference)
        resource = None
        if found is not None and found[0] is not None and ID_PATTERN.fullmatch(found[1]):
            try:
                resource = self.store.read(found[0], found[1]).resource
            except (NotFound, Gone):
                resource = None
        self.seen[key] = resource
        return resource


def name_of(resource: JSON, position: int) -> str:
    """``Type/id`` as :class:`Disclosure.verdicts` keys a resource (``Type/#n`` without an id)."""
    rtype, rid = resource.get("resourceType"), resource.get("id")
    return f"{rtype}/{rid}" if isinstance(rid, str) and rid else f"{rtype}/#{position}"


def versioned(resource: JSON, position: int) -> str:
    """The resource's reference with its version (``Type/id/_history/3``) when it has one: what
    exactly went out, for the accounting of disclosures."""
    name = name_of(resource, position)
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return f"{name}/_history/{version}" if isinstance(version, str) and version and "#" not in name else name


def combine(disclosures: Iterable[Disclosure]) -> Disclosure:
    """One disclosure from several decided apart (a search page and its includes)."""
    parts = list(disclosures)
    verdicts: dict[str, Verdict] = {}
    for part in parts:
        verdicts.update(part.verdicts)
    return Disclosure(
        permitted=tuple(r for part in parts for r in part.permitted),
        withheld_count=sum(part.withheld_count for part in parts),
        redacted_count=sum(part.redacted_count for part in parts),
        notice=next((part.notice for part in parts if part.notice), None),
        verdicts=verdicts,
    )


def bundle_meta(withheld: int, redacted: int, notice: str | None) -> JSON | None:
    """``Bundle.meta`` of a Bundle of released resources: ``REDACTED`` when anything was left out
    or cut (saying so without saying what); with Part 2 data, its policy and refrain labels and
    the notice against redisclosure (:data:`NOTICE_EXTENSION`). None when there is nothing to say."""
    security = Disclosure((), withheld, redacted, None).bundle_security()
    meta: JSON = {}
    if notice:
        security += [terminology.security_label(code) for code in PART2_BUNDLE_LABELS]
        meta["extension"] = [{"url": NOTICE_EXTENSION, "valueString": notice}]
    if security:
        meta["security"] = security
    return meta or None


class PrivacyGate:
    """Decides and audits what leaves for a recipient (see the module doc). Thread-safe."""

    def __init__(self, store: Store, audit: AuditLog, *, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.audit = audit
        self.clock = clock or store.clock
        self._identities: dict[frozenset[tuple[str, str]], tuple[float, frozenset[str]]] = {}

    # --- what the decision reads

    def consents(self, patients: Iterable[str]) -> list[ConsentTerms]:
        """The terms of the patients' Consent resources in the store. A Consent that cannot be
        read exactly as terms of disclosure is skipped (it permits nothing) and logged."""
        from iop_fhir.api.operations import every  # the api package imports this module

        keys = sorted({reference_key(p if "/" in p else f"Patient/{p}") for p in patients if p})
        out: list[ConsentTerms] = []
        for start in range(0, len(keys), PATIENTS_PER_QUERY):
            for saved in every(self.store, "Consent", [("patient", ",".join(keys[start : start + PATIENTS_PER_QUERY]))]):
                try:
                    out.append(read_terms(saved.resource))
                except RecordInvalid as exc:
                    log.warning(
                        "%s permits nothing: it cannot be read as terms of disclosure (%s)",
                        saved.reference,
                        "; ".join(str(i) for i in exc.issues),
                    )
        return out

    def resolver(self) -> StoreResolver:
        """A look-up of the current versions references name, for one decision."""
        return StoreResolver(self.store)

    def patients(self, resources: Iterable[JSON], resolve: Resolver | None = None) -> set[str]:
        """``Patient/{id}`` of every patient the resources are about."""
        resolve = resolve or self.resolver()
        return {p for resource in resources for p in patients_of(resource, resolve)}

    def known(self, recipient: Recipient) -> Recipient:
        """The recipient with the references of the stored parties its identifiers name."""
        if not recipient.identifiers:
            return recipient
        now = time.monotonic()
        cached = self._identities.get(recipient.identifiers)
        if cached is None or now - cached[0] > IDENTITY_SECONDS:
            found = frozenset(
                saved.reference
                for system, value in sorted(recipient.identifiers)
                for rtype in PARTY_TYPES
                for saved in self.store.search(rtype, [("identifier", f"{system}|{value}")], count=10).entries
            )
            if len(self._identities) >= 256:
                self._identities.clear()
            self._identities[recipient.identifiers] = cached = (now, found)
        return recipient if cached[1] <= recipient.references else replace(recipient, references=recipient.references | cached[1])

    # --- deciding and auditing

    def disclosure(
        self,
        resources: Sequence[JSON],
        recipient: Recipient,
        *,
        at: datetime | None = None,
        consents: Iterable[ConsentTerms] | None = None,
        resolve: Resolver | None = None,
    ) -> Disclosure:
        """Decide what of ``resources`` may go to ``recipient`` at ``at`` (now), without auditing.

        :param consents: the terms to judge by; read from the store for the resources'
            patients when not given.
        """
        at = at or self.clock()
        resolve = resolve or self.resolver()
        terms = list(consents) if consents is not None else self.consents(self.patients(resources, resolve))
        return disclose(resources, self.known(recipient), terms, at=at, resolve=resolve)

    def audit_disclosure(
        self,
        disclosure: Disclosure,
        resources: Sequence[JSON],
        recipient: Recipient,
        *,
        exit: str,
        who: str,
        purpose: str | None = None,
        at: datetime | None = None,
        delivered: bool = True,
        resolve: Resolver | None = None,
    ) -> list[JSON]:
        """Record what ``disclosure`` decided about ``resources``: per patient an AuditEvent for
        what went out (outcome 0) and one for what was withheld (outcome 4). Directory data
        (who and what, about no patient) is nobody's record and is not accounted for.

        :param delivered: False when the exit failed after deciding (nothing went out): only
            the withheld part is recorded.
        :returns: the events recorded (buffered).
        """
        at = at or self.clock()
        resolve = resolve or self.resolver()
        recipient = self.known(recipient)  # named in the events by its references too: searchable by agent
        groups: dict[str | None, tuple[list[str], list[str], list[Verdict], list[Verdict]]] = {}
        for position, resource in enumerate(resources):
            verdict = disclosure.verdicts.get(name_of(resource, position))
            if verdict is None or is_directory(resource):
                continue
            reference = versioned(resource, position)
            for patient in sorted(patients_of(resource, resolve)) or [None]:
                out, held, out_verdicts, held_verdicts = groups.setdefault(patient, ([], [], [], []))
                if verdict.decision is Decision.DENY:
                    held.append(reference)
                    held_verdicts.append(verdict)
                else:
                    out.append(reference)
                    out_verdicts.append(verdict)
        purpose = purpose or recipient.purpose
        recorded: list[JSON] = []
        for patient, (out, held, out_verdicts, held_verdicts) in groups.items():
            common: Mapping[str, Any] = {
                "action": "R", "subtype": DISCLOSE, "who": who, "recipient": recipient, "patient": patient,
                "purpose": purpose, "exit": exit, "recorded": at,
            }  # fmt: skip
            if out and delivered:
                redacted = sum(1 for v in out_verdicts if v.decision is Decision.REDACT)
                detail = f"{len(out)} resource(s) disclosed" + (f", {redacted} with elements withheld" if redacted else "")
                recorded.append(
                    audit_event(
                        **common,
                        outcome="0",
                        entities=out,
                        consents=sorted({v.consent for v in out_verdicts if v.consent}),
                        break_glass=any(v.break_glass for v in out_verdicts),
                        detail=detail,
                    )
                )
            if held:
                reasons = "; ".join(sorted({v.reason for v in held_verdicts}))
                recorded.append(
                    audit_event(
                        **common,
                        outcome="4",
                        entities=held,
                        consents=sorted({v.consent for v in held_verdicts if v.consent}),
                        detail=f"{len(held)} resource(s) withheld under the patient's consent directives: {reasons}",
                    )
                )
        for event in recorded:
            self.audit.record(event)
        return recorded

    def release(
        self,
        resources: Sequence[JSON],
        recipient: Recipient,
        *,
        exit: str,
        who: str,
        purpose: str | None = None,
        at: datetime | None = None,
    ) -> Disclosure:
        """Decide what of ``resources`` may go to ``recipient``, and audit it (see the module doc).

        :param exit: the exit: ``rest``, ``everything``, ``medication-history``, ``iop-record``,
            ``sync:<destination>``, ``discharge:<destination>``, ``ncpdp:<destination>``.
        :param who: who asked (the client id; the destination for a delivery).
        :param purpose: the purpose of use, when it is not the recipient's own.
        :param at: the moment of the disclosure (now).
        """
        at = at or self.clock()
        if purpose is not None and purpose != recipient.purpose:
            recipient = replace(recipient, purpose=purpose)
        resolve = self.resolver()
        decided = self.disclosure(resources, recipient, at=at, resolve=resolve)
        self.audit_disclosure(decided, resources, recipient, exit=exit, who=who, at=at, resolve=resolve)
        return decided
