"""Who may receive what: consent terms and the disclosure decision (42 CFR Part 2, HIPAA).

One question, one function: may this resource go to this recipient, for this purpose, now?
:func:`decide` answers it for one resource, :func:`disclose` for a batch (a search page, an
``$everything``, a sync delivery) and prepares what goes out. The policy (docs/privacy.md):

* **Part 2 data** (labelled ``42CFRPart2``, or SUD data by its codes or by what it is about)
  goes out only under a consent in force at that moment: active, not revoked (a consent
  revoked at *t* permits nothing at or after *t*), within its period, given under Part 2,
  naming this recipient and purpose (``TREAT`` covers its specialisations ``COC`` and
  ``ETREAT``), covering the resource's data category, for the resource's patient.
* **Other sensitive data** (mental health, or a confidentiality above normal) goes out for
  treatment (``TREAT``, ``COC``, ``ETREAT``: HIPAA needs no authorization there) or under a
  consent of any kind; psychotherapy notes (``PSYTHPN``) only under a consent.
* **Ordinary data** goes out to any authenticated recipient for the purposes HIPAA allows
  without an authorization (treatment, payment, operations, public health, the patient's own
  request); research (``HRESCH``) and unknown purposes need a consent.
* A **deny** consent in force for the recipient, purpose and data withholds even ordinary data.
* **Break the glass**: a medical emergency (purpose ``ETREAT`` or the recipient's emergency
  flag) lets Part 2 data out without consent (42 CFR 2.51), marked for audit and labelled
  ``ETREAT``.
* Directory data (Organization, Practitioner, Medication, ...) is nobody's health record.

A permitted resource that *mentions* something the recipient may not see (``redact.py``) is
disclosed without those elements (``REDACT``). Disclosed Part 2 data carries the refrain label
``NORDSCLCD`` and the disclosure carries the notice against redisclosure (42 CFR 2.32).

Consents come as FHIR Consent resources, ours (``mappers/consent.py``) and foreign ones;
:func:`read_terms` turns one into :class:`ConsentTerms` or says, located, why it cannot: a
permit is only taken as far as it can be read exactly, since reading it loosely could let
more through than its author meant (the same rule the reverse mapper follows).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, NamedTuple

from iop_fhir import terminology
from iop_fhir.errors import Issue, IssueList, RecordInvalid
from iop_fhir.mappers.consent import CATEGORY_DISPLAY, CONSENT_PROVISION_RESTRICTIONS, DATA_CATEGORY, REVOKED_ON
# the reverse mapper's test of a Part 2 consent (policy URI or policyRule), so both read one alike
from iop_fhir.mappers.consent import is_part2_consent
from iop_fhir.mappers.context import ResourceIndex, reference_text
from iop_fhir.mappers.datatypes import as_dict, as_list, code_in, codings_of, identifiers_in, own_extensions
from iop_fhir.privacy.labels import (
    Labels,
    Resolver,
    about_references,
    data_categories,
    is_directory,
    is_part2_program,
    labels_of,
    reference_key,
    resolve_in,
    write_labels,
)
from iop_fhir.privacy.redact import mentions, redact
from iop_fhir.store.search_index import date_range, parse_reference
from iop_fhir.store.tables import from_micros

JSON = dict[str, Any]

# Purposes of use (v3-ActReason) and the policy above, as data.
PURPOSE_PARENT = {"COC": "TREAT", "ETREAT": "TREAT"}  # v3 PurposeOfUse: specialisations of TREAT
TREATMENT = frozenset({"TREAT", "COC", "ETREAT"})
ROUTINE = frozenset({"TREAT", "COC", "ETREAT", "HPAYMT", "HOPERAT", "PUBHLTH", "PATRQT"})
CONSENT_ONLY = frozenset({"PSYTHPN"})
EMERGENCY = "ETREAT"
RECIPIENT_ROLES = frozenset({"IRCP", "PRCP"})  # v3-ParticipationType: (primary) information recipient
DISCLOSING_ACTIONS = frozenset({"disclose", "access"})
STATUSES = frozenset({"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"})
REFRAIN = "NORDSCLCD"

# The gist of the 42 CFR 2.32 notice, in the project's words.
NOTICE = (
    "Notice of confidentiality (42 CFR Part 2): this disclosure contains substance use disorder "
    "treatment records that federal rules protect. You may use or disclose them further only as the "
    "patient's written consent expressly permits or as 42 CFR Part 2 otherwise allows; a general "
    "authorization to release medical information does not suffice. The records may not be used to "
    "investigate or prosecute the patient for a crime, nor against the patient in any civil, criminal, "
    "administrative or legislative proceeding, except as 42 CFR Part 2 permits."
)


# --- consents ------------------------------------------------------------------------------------


def _keys(reference: str) -> frozenset[str]:
    """Comparable forms of a reference: ``Type/id``, and ``urn:uuid:id`` since a transaction
    Bundle names the same resource that way before the server stores it."""
    found = parse_reference(reference)
    if found is not None and found[0] is not None:
        return frozenset({f"{found[0]}/{found[1]}", f"urn:uuid:{found[1]}"})
    return frozenset({reference})


def _any_same(left: Iterable[str], right: Iterable[str]) -> bool:
    ours = frozenset().union(*(_keys(r) for r in left))
    return any(_keys(r) & ours for r in right)


@dataclass(frozen=True)
class ConsentTerms:
    """What one consent allows (or, with ``deny``, refuses): the terms the decision reads.

    :param period: (start, end) as aware datetimes, the end exclusive (a consent running to
        2027-02-06 covers that whole day, UTC); None is unbounded.
    :param revoked_at: from this moment on the consent permits nothing.
    """

    id: str | None
    patient: str | None
    recipients: frozenset[str] = frozenset()
    recipient_identifiers: frozenset[tuple[str, str]] = frozenset()
    purposes: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset({"all"})
    period: tuple[datetime | None, datetime | None] = (None, None)
    part2: bool = False
    status: str = "active"
    revoked_at: datetime | None = None
    deny: bool = False

    def in_force(self, at: datetime) -> bool:
        """Active (or revoked later than ``at``), and ``at`` within the period."""
        if self.status != "active" and not (self.status == "inactive" and self.revoked_at is not None):
            return False
        if self.revoked_at is not None and at >= self.revoked_at:
            return False
        start, end = self.period
        return (start is None or at >= start) and (end is None or at < end)

    def names(self, recipient: Recipient) -> bool:
        """The recipient is one the consent names (a deny naming nobody refuses everybody)."""
        if not self.recipients and not self.recipient_identifiers:
            return self.deny
        return _any_same(self.recipients, recipient.references) or bool(self.recipient_identifiers & recipient.identifiers)

    def covers_purpose(self, purpose: str) -> bool:
        if not self.purposes:
            return self.deny
        while purpose:
            if purpose in self.purposes:
                return True
            purpose = PURPOSE_PARENT.get(purpose, "")
        return False

    def covers(self, categories: frozenset[str]) -> bool:
        return "all" in self.categories or bool(self.categories & categories)

    def concerns(self, patients: frozenset[str]) -> bool:
        """The data is about the consent's patient alone (a patient unknown on either side: the
        caller chose the consents for the data)."""
        return self.patient is None or all(_any_same([self.patient], [p]) for p in patients)

    def applies(self, recipient: Recipient, at: datetime, categories: frozenset[str], patients: frozenset[str]) -> bool:
        return (
            self.in_force(at)
            and self.names(recipient)
            and self.covers_purpose(recipient.purpose)
            and self.covers(categories)
            and self.concerns(patients)
        )


def _instant(text: Any, where: str, issues: IssueList, *, end: bool = False) -> datetime | None:
    """The first (or, with ``end``, the first after the last) moment a FHIR date/dateTime covers."""
    if text is None:
        return None
    found = date_range(text) if isinstance(text, str) else None
    if found is None:
        issues.add(where, f"{text!r} is not a FHIR date or dateTime", code="value")
        return None
    return from_micros(found[1] + 1) if end else from_micros(found[0])


def read_terms(consent: JSON) -> ConsentTerms:
    """The terms of a FHIR Consent (ours or another system's).

    :raises RecordInvalid: the Consent cannot be read exactly as terms of disclosure; each issue
        names the element (a permit with exceptions, data restrictions the terms cannot hold, no
        recipient or purpose, unreadable dates, ...).
    """
    issues = IssueList()
    if consent.get("resourceType") != "Consent":
        raise RecordInvalid("not a Consent", [Issue("not a Consent", location="resourceType", code="value")])
    status = consent.get("status")
    if status not in STATUSES:
        issues.add("Consent.status", f"status {status!r} is not a Consent status", code="value")
    scope = code_in(consent.get("scope"), terminology.CONSENT_SCOPE)
    if scope is not None and scope != "patient-privacy":
        issues.add("Consent.scope", f"a {scope!r} consent is not a consent to disclose (patient-privacy)", code="value")
    provision = as_dict(consent.get("provision"))
    kind = provision.get("type")
    deny = kind == "deny"
    if kind not in ("permit", "deny"):
        issues.add("Consent.provision.type", "a consent to disclose permits or denies (provision.type)", code="required")
    if consent.get("modifierExtension") or provision.get("modifierExtension"):
        issues.add("Consent.modifierExtension", "modifier extensions the gateway does not know", code="not-supported")
    if not deny:
        # A narrower permit read as a wider one would let through what its author excluded;
        # a deny read wider only withholds more.
        if provision.get("provision"):
            issues.add("Consent.provision.provision", "exceptions (nested provisions) of a permit cannot be applied", code="not-supported")
        narrowing = [key for key in CONSENT_PROVISION_RESTRICTIONS if provision.get(key)]
        if narrowing:
            issues.add("Consent.provision", f"{', '.join(narrowing)} restrict a permit in ways the terms cannot hold", code="not-supported")
        actions = {code_in(a, terminology.CONSENT_ACTION) for a in as_list(provision.get("action"))}
        if actions and not actions & DISCLOSING_ACTIONS:
            issues.add("Consent.provision.action", "the consent permits no disclosure (action disclose or access)", code="value")
    recipients, identifiers = _recipients(provision)
    if not (recipients or identifiers) and not deny:
        issues.add("Consent.provision.actor", "no recipient (actor with role IRCP or PRCP and a reference)", code="required")
    purposes = frozenset(c["code"] for c in as_list(provision.get("purpose")) if isinstance(c, dict) and c.get("system") == terminology.V3_ACT_REASON and isinstance(c.get("code"), str))
    if not purposes and not deny:
        issues.add("Consent.provision.purpose", "no purpose of use (v3-ActReason)", code="required")
    categories = _categories(provision, deny, issues)
    period = as_dict(provision.get("period"))
    begins = period.get("start", consent.get("dateTime"))  # no start: in force from its signing
    if begins is None and not deny:
        issues.add("Consent.provision.period.start", "no start of the period nor a signing date (dateTime)", code="required")
    start = _instant(begins, "Consent.provision.period.start", issues)
    end = _instant(period.get("end"), "Consent.provision.period.end", issues, end=True)
    revoked_at = None
    if REVOKED_ON in (ours := own_extensions(consent)):
        when = as_dict(ours[REVOKED_ON])
        revoked_at = _instant(when.get("valueDate", when.get("valueDateTime", "")), f"Consent.extension({REVOKED_ON})", issues)
    if issues.errors:
        raise RecordInvalid("the Consent cannot be read as terms of disclosure", issues.errors)
    patient = reference_text(consent.get("patient"))
    rid = consent.get("id")
    return ConsentTerms(
        id=f"Consent/{rid}" if isinstance(rid, str) and rid else None,
        patient=reference_key(patient) if patient else None,
        recipients=recipients,
        recipient_identifiers=identifiers,
        purposes=purposes,
        categories=categories,
        period=(start, end),
        part2=is_part2_consent(consent),
        status=str(status),
        revoked_at=revoked_at,
        deny=deny,
    )


def _recipients(provision: JSON) -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
    refs: set[str] = set()
    idents: set[tuple[str, str]] = set()
    for actor in as_list(provision.get("actor")):
        actor = as_dict(actor)
        if not any(c.get("system") == terminology.V3_PARTICIPATION_TYPE and c.get("code") in RECIPIENT_ROLES for c in codings_of(actor.get("role"))):
            continue
        ref = reference_text(actor.get("reference"))
        if ref:
            refs.add(reference_key(ref))
        for ident in identifiers_in([as_dict(actor.get("reference")).get("identifier")]):
            if isinstance(ident.get("system"), str) and isinstance(ident.get("value"), str):
                idents.add((ident["system"], ident["value"]))
    return frozenset(refs), frozenset(idents)


def _categories(provision: JSON, deny: bool, issues: IssueList) -> frozenset[str]:
    concepts = as_list(provision.get("code"))
    if not concepts:
        return frozenset({"all"})  # a provision that restricts no data covers all of it
    codes = [code_in(c, DATA_CATEGORY) for c in concepts]
    if all(code in CATEGORY_DISPLAY for code in codes):
        return frozenset(c for c in codes if c is not None)
    if deny:
        return frozenset({"all"})  # data a deny names but we cannot tell apart: withhold all
    issues.add("Consent.provision.code", f"data codes outside {DATA_CATEGORY}", code="not-supported")
    return frozenset()


def terms_from_fhir(consent: JSON) -> ConsentTerms | None:
    """The terms of a Consent, or None when it cannot be read exactly (it then permits nothing)."""
    try:
        return read_terms(consent)
    except RecordInvalid:
        return None


# --- the decision ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    """Who receives the data and why: an authenticated client, a sync destination, a pharmacy.

    :param references: the recipient's Organization/Practitioner references (``Organization/7``).
    :param identifiers: its (system, value) identifiers (NPI, ...), for consents naming it so.
    :param purpose: the purpose of use (v3-ActReason) the request declares.
    :param break_glass: an emergency asserted outside the purpose (a token flag).
    """

    references: frozenset[str] = frozenset()
    identifiers: frozenset[tuple[str, str]] = frozenset()
    purpose: str = "TREAT"
    break_glass: bool = False

    @property
    def emergency(self) -> bool:
        return self.break_glass or self.purpose == EMERGENCY


class Decision(Enum):
    PERMIT = "permit"
    REDACT = "redact"  # permit, with the elements in ``Verdict.removed`` taken out
    DENY = "deny"


class Verdict(NamedTuple):
    """A decision and what an audit needs of it."""

    decision: Decision
    reason: str
    consent: str | None = None  # the consent it was disclosed under (accounting of disclosures)
    break_glass: bool = False  # let out only by an emergency: audit it
    part2: bool = False  # the resource is Part 2 data
    removed: tuple[str, ...] = ()  # REDACT: locations of the removed mentions


def _aware(at: datetime) -> None:
    if at.tzinfo is None:
        raise ValueError("the moment of a disclosure is an aware datetime (with its UTC offset)")


def _own_patient(resource: JSON) -> str | None:
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return f"Patient/{rid}" if isinstance(rid, str) and rid else None
    for element in ("subject", "patient", "for", "beneficiary"):
        ref = reference_text(resource.get(element))
        if ref:
            return reference_key(ref)
    return None


def patients_of(resource: JSON, resolve: Resolver | None = None) -> frozenset[str]:
    """The patients a resource is about: its subject (the Patient itself for a Patient), else,
    for what names none (a Provenance), the patients of what it is about."""
    own = _own_patient(resource)
    if own is not None:
        return frozenset({own})
    return frozenset(
        patient
        for ref in about_references(resource)
        if isinstance(target := resolve_in(resource, ref, resolve), dict) and (patient := _own_patient(target)) is not None
    )


def _permission(
    resource: JSON, recipient: Recipient, consents: tuple[ConsentTerms, ...], at: datetime, resolve: Resolver | None, *, as_part2: bool = False
) -> Verdict:
    """The decision on the resource as a whole (mentions aside)."""
    if is_directory(resource):
        return Verdict(Decision.PERMIT, "directory data, about no patient")
    labels: Labels = labels_of(resource, resolve)
    part2 = labels.part2 or as_part2
    categories, patients = data_categories(resource), patients_of(resource, resolve)
    applicable = [c for c in consents if c.applies(recipient, at, categories, patients)]
    refusal = next((c for c in applicable if c.deny), None)
    permits = [c for c in applicable if not c.deny]
    if refusal is not None and not recipient.emergency:
        return Verdict(Decision.DENY, "the patient's consent directive refuses this disclosure", refusal.id, part2=part2)
    if part2:
        consent = next((c for c in permits if c.part2), None)
        if consent is not None:
            return Verdict(Decision.PERMIT, "42 CFR Part 2 consent", consent.id, part2=True)
        if recipient.emergency:
            return Verdict(Decision.PERMIT, "medical emergency (break the glass)", break_glass=True, part2=True)
        return Verdict(Decision.DENY, "42 CFR Part 2 data without a consent in force for this recipient, purpose and data", part2=True)
    consent = permits[0] if permits else None
    if labels.sensitivities & CONSENT_ONLY:
        if consent is not None:
            return Verdict(Decision.PERMIT, "patient's consent", consent.id)
        if recipient.emergency:
            return Verdict(Decision.PERMIT, "medical emergency (break the glass)", break_glass=True)
        return Verdict(Decision.DENY, "psychotherapy notes without the patient's consent")
    allowed = TREATMENT if labels.sensitive else ROUTINE
    if recipient.purpose in allowed:
        return Verdict(Decision.PERMIT, f"{'sensitive' if labels.sensitive else 'ordinary'} data for {recipient.purpose}")
    if consent is not None:
        return Verdict(Decision.PERMIT, "patient's consent", consent.id)
    what = "sensitive data" if labels.sensitive else "data"
    return Verdict(Decision.DENY, f"{what} for {recipient.purpose} needs the patient's consent")


def decide(
    resource: JSON,
    recipient: Recipient,
    consents: Iterable[ConsentTerms],
    *,
    at: datetime,
    resolve: Resolver | None = None,
) -> Verdict:
    """May ``resource`` go to ``recipient`` at ``at``, given the patient's ``consents``?

    ``resolve`` finds the resources it links to: what it is about (their labels count) and what
    it mentions (a mention of something the recipient may not see makes the answer REDACT).
    """
    _aware(at)
    terms = tuple(consents)
    verdict = _permission(resource, recipient, terms, at, resolve)
    if verdict.decision is not Decision.PERMIT:
        return verdict
    removed = []
    for mention in mentions(resource):
        target = resolve_in(resource, mention.reference, resolve)
        if not isinstance(target, dict):
            continue  # nothing we hold: the reference tells no more than its id
        if is_part2_program(target):
            # naming the program tells the patient is in SUD treatment: Part 2 information
            hidden = _permission(resource, recipient, terms, at, resolve, as_part2=True).decision is not Decision.PERMIT
        else:
            hidden = _permission(target, recipient, terms, at, resolve).decision is not Decision.PERMIT
        if hidden:
            removed.append(mention.location)
    if removed:
        return verdict._replace(decision=Decision.REDACT, removed=tuple(removed))
    return verdict


# --- a disclosure -----------------------------------------------------------------------------------


class _Batch:
    """A resolver over the disclosed resources (then ``outside``): each answers with its labels
    worked out, transitively, so an Encounter inherits through its episode from a diagnosis
    even when none of them was labelled when stored."""

    def __init__(self, batch: list[JSON], outside: Resolver | None) -> None:
        self.index = ResourceIndex.build(batch)
        self.outside = outside
        self.done: dict[int, JSON] = {}
        self.busy: set[int] = set()

    def __call__(self, reference: str) -> JSON | None:
        target = self.index.resolve(reference)
        if target is None:
            return self.outside(reference) if self.outside is not None else None
        key = id(target)
        if key in self.done:
            return self.done[key]
        if key in self.busy:
            return target  # a reference cycle: its own labels, no further
        self.busy.add(key)
        try:
            labelled = write_labels(target, labels_of(target, self))
        finally:
            self.busy.discard(key)
        self.done[key] = labelled
        return labelled


@dataclass(frozen=True)
class Disclosure:
    """What goes out, and what an audit and the accounting of disclosures need.

    :param permitted: copies to send, labelled (``NORDSCLCD`` on Part 2 data, ``ETREAT`` on
        what an emergency let out, ``REDACTED`` on redacted ones), in input order.
    :param notice: the notice against redisclosure, when Part 2 data goes out.
    :param verdicts: each input resource's verdict, by ``Type/id``.
    """

    permitted: tuple[JSON, ...]
    withheld_count: int
    redacted_count: int
    notice: str | None
    verdicts: Mapping[str, Verdict] = field(default_factory=dict)

    @property
    def break_glass(self) -> bool:
        return any(v.break_glass and v.decision is not Decision.DENY for v in self.verdicts.values())

    @property
    def consents(self) -> frozenset[str]:
        """The consents this disclosure was made under."""
        return frozenset(v.consent for v in self.verdicts.values() if v.consent and v.decision is not Decision.DENY)

    def bundle_security(self) -> list[JSON]:
        """``Bundle.meta.security`` for the disclosure: ``REDACTED`` when anything was withheld
        or cut, which says data was left out without saying what."""
        return [terminology.security_label("REDACTED")] if self.withheld_count or self.redacted_count else []


def _name(resource: JSON, position: int) -> str:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    return f"{rtype}/{rid}" if isinstance(rid, str) and rid else f"{rtype}/#{position}"


def disclose(
    resources: Iterable[JSON],
    recipient: Recipient,
    consents: Iterable[ConsentTerms],
    *,
    at: datetime,
    resolve: Resolver | None = None,
) -> Disclosure:
    """Decide every resource and prepare the copies that may go (the inputs are left alone).

    References resolve among ``resources`` first, then through ``resolve`` (the store).
    """
    _aware(at)
    batch = list(resources)
    terms = tuple(consents)
    linked = _Batch(batch, resolve)
    permitted: list[JSON] = []
    verdicts: dict[str, Verdict] = {}
    withheld = redacted = 0
    part2_out = False
    for position, resource in enumerate(batch):
        verdict = decide(resource, recipient, terms, at=at, resolve=linked)
        verdicts[_name(resource, position)] = verdict
        if verdict.decision is Decision.DENY:
            withheld += 1
            continue
        extra = [code for code, wanted in ((REFRAIN, verdict.part2), (EMERGENCY, verdict.break_glass)) if wanted]
        out = write_labels(resource, labels_of(resource, linked), extra)
        if verdict.removed:
            out = redact(out, verdict.removed)
            redacted += 1
        permitted.append(out)
        part2_out |= verdict.part2
    return Disclosure(tuple(permitted), withheld, redacted, NOTICE if part2_out else None, verdicts)

