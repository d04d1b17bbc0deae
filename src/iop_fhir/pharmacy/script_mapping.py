"""FHIR <-> NCPDP SCRIPT messages: what the gateway sends pharmacies and what it makes of their answers.

Out (FHIR -> message), from a stored MedicationRequest and what it references (``resolve``
looks a reference string up: ``"Patient/…"``, ``"urn:uuid:…"``; ``#id`` reads ``contained``):

* :func:`new_rx` -- NewRx. Refused (:class:`~iop_fhir.formats.ncpdp.NcpdpInvalid`, every problem
  named by its FHIR path) when the order is not active, something NewRx requires is missing,
  or a controlled-substance rule forbids it (:func:`iop_fhir.pharmacy.controlled.check`).
* :func:`cancel_rx` -- CancelRx for a stopped, cancelled or entered-in-error order.
* :func:`renewal_response`, :func:`change_response` -- the prescriber's answers.
* :func:`history_request` -- RxHistoryRequest for a patient's medication history.

In (message -> FHIR):

* :func:`medication_dispense` -- RxFill -> MedicationDispense (US Core).
* :func:`history_resources` -- RxHistoryResponse -> MedicationDispense / MedicationStatement.
* :func:`review_task` -- RxRenewalRequest / RxChangeRequest -> a Task for the prescriber.
* :func:`medication_request_from_new_rx` -- NewRx -> MedicationRequest (what NewRx carries).

NewRx field table (FHIR -> SCRIPT 2017071):

=================================================  ===============================================
``identifier[0].value``                            Header/PrescriberOrderNumber
``subject`` -> Patient name, gender, birthDate,    Patient/HumanPatient Name, Gender (M/F/U),
address[0], telecom phone                          DateOfBirth, Address, PrimaryTelephone
``requester`` -> Practitioner (or                  Prescriber/NonVeterinarian: Identification NPI
PractitionerRole.practitioner) name, NPI, DEA      (required, check digit), DEANumber (controlled
                                                   substances only, required then), Name, Address
``dispenseRequest.performer`` -> Organization      Pharmacy: Identification NCPDPID (must equal the
                                                   addressee), NPI, BusinessName, Address, phone
``medicationCodeableConcept`` text / RxNorm / NDC  DrugDescription; DrugDBCode (SCD, or SBD for a
                                                   branded "[Brand]" name); ProductCode ND
drug table ``strength_mg`` (solid/count forms)     DrugCoded/Strength (mg; tablet form code)
drug table ``dea_schedule`` (else our extension)   DrugCoded/DEASchedule (NCI code)
``dispenseRequest.quantity`` (UCUM)                Quantity Value + QuantityUnitOfMeasure (NCI)
``dispenseRequest.expectedSupplyDuration``         DaysSupply
``authoredOn``                                     WrittenDate
``substitution.allowed[x]`` (false / N)            Substitutions 1 (else 0)
``dispenseRequest.numberOfRepeatsAllowed``         NumberOfRefills (absent: 0)
``reasonReference`` Conditions / ``reasonCode``    Diagnosis Primary, Secondary (ICD-10-CM, no dot)
``dosageInstruction[0].text``                      Sig/SigText (composed from the structured
                                                   dose, route, timing when there is no text)
=================================================  ===============================================

A Condition coded only in SNOMED CT gives no Diagnosis (SCRIPT takes ICD-10-CM here), and only
the first two ICD-10-CM reasons fit (Primary, Secondary).

**The fill key** (first identifier of MedicationDispense / MedicationStatement, system
:data:`FILL_SYSTEM`): ``{pharmacy}/{prescription number}/{fill}``.

* *pharmacy*: the dispensing pharmacy's NCPDPID (``npi-…`` when only its NPI is known); a
  history entry naming no pharmacy uses its source, ``source-{Header/From}``;
* *prescription number*: the pharmacy's own -- RxFill: Header/RxReferenceNumber (else
  ``order-{PrescriberOrderNumber}``); history: HistorySource/SourceReference (else the drug's
  code and the date written);
* *fill*: ``date-YYYY-MM-DD``, the day it was handed over (LastFillDate), else ``fill-N`` from
  HistorySource/FillNumber. Without either, an RxFill (not dispensed, transferred) is keyed
  ``message-{MessageID}`` -- the message is the event -- and a history entry
  ``written-YYYY-MM-DD``: a prescription never filled.

**One fill, one resource.** The handed-over date keys the fill because both messages that report
it carry that date: an RxFill (which rarely carries a fill number) and an RxHistoryResponse entry
(which always does). So a redelivered RxFill, the same fill in the histories of two sources, and
an RxFill and a history entry of one fill all get the same key, and storing by it keeps one
MedicationDispense, counted once in PDC. A fill number, when known, is kept as a second
identifier ``{pharmacy}/{prescription number}/fill-N`` (same system), so a fill re-dated by a
correction is still found by it. :func:`merge_fill` says what is kept when two reports meet. A
status change of a fill on one day (PartiallyDispensed, then Dispensed) updates it. The reports
meet only when both name the pharmacy and its prescription number alike: a history entry
without its pharmacy (keyed by its source), or an RxFill without RxReferenceNumber (keyed by
our order number), stays a resource of its own. Two fills of one prescription handed over on
the same day are one fill here. The ``id`` derives from the key (``mappers.ids.resource_id``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from decimal import Decimal
from typing import Any

from iop_fhir import terminology
from iop_fhir.errors import Issue
from iop_fhir.formats.ncpdp import messages as m
from iop_fhir.mappers.datatypes import (
    address_from_fhir,
    as_dict,
    as_list,
    code_in,
    code_in_any,
    codings_of,
    coding,
    concept,
    concept_text,
    contact_from_fhir,
    drop_empty,
    fhir_datetime,
    identifier_values,
    identifiers_in,
    name_from_fhir,
    nonblank,
    number,
    parse_date,
    quantity_parts,
    to_decimal,
    ucum_quantity,
    whole_number,
)
from iop_fhir.mappers.ids import resource_id
from iop_fhir.mappers.medication_request import ORDER_INTENTS, UNIT_SYNONYMS
from iop_fhir.mappers.medication_review import REVIEW_CODE
from iop_fhir.mappers.organization import PHARMACY_TYPE
from iop_fhir.pharmacy import controlled
from iop_fhir.pharmacy.controlled import Resolve, lookup, medication_concept
from iop_fhir.record.validate import dea_is_valid, npi_is_valid
from iop_fhir.store.search_index import parse_reference
from iop_fhir.terminology import DEA, ICD10CM, NCPDP_PROVIDER, NDC, NPI, RXNORM, SNOMED, V3_SUBSTITUTION

__all__ = [
    "FILL_SYSTEM",
    "MESSAGE_SYSTEM",
    "PRESCRIBER_ORDER_SYSTEM",
    "cancel_rx",
    "change_response",
    "fill_key",
    "history_request",
    "history_resources",
    "medication_dispense",
    "medication_request_from_new_rx",
    "merge_fill",
    "new_rx",
    "renewal_response",
    "review_task",
    "sig_text",
]

JSON = dict[str, Any]

FILL_SYSTEM = terminology.CANONICAL + "/sid/pharmacy-fill"
MESSAGE_SYSTEM = terminology.CANONICAL + "/sid/ncpdp-message"  # {sender}/{MessageID}
# Orders read from a NewRx: the prescriber system's order number, whoever's it is.
PRESCRIBER_ORDER_SYSTEM = terminology.CANONICAL + "/sid/prescriber-order-number"
PHARMACY_REQUEST_INPUT = terminology.code_system("pharmacy-request-input")
DISPENSE_PROFILE = terminology.us_core("us-core-medicationdispense")
# The THO NamingSystem URI for DEA numbers, which other systems use beside the OID we write.
DEA_THO = "http://terminology.hl7.org/NamingSystem/usdeanumber"
# NCI Thesaurus, for a unit code our table cannot turn into UCUM [M: THO's URI for NCIt].
NCI_THESAURUS = "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl"

# RxFill FillStatus -> R4 medicationdispense-status. Completed / in-progress as the Da Vinci
# REMS EHR maps them [V]; a fill the pharmacy did not dispense was declined, and a transfer
# ends this pharmacy's dispensing before it happened (stopped) -- both dispensed nothing.
DISPENSE_STATUS = {"Dispensed": "completed", "PartiallyDispensed": "in-progress", "NotDispensed": "declined", "Transferred": "stopped"}
NOT_DISPENSED_REASON = {"NotDispensed": "Not dispensed", "Transferred": "Transferred to another pharmacy"}
# DrugDBCode qualifiers that say RxNorm: term types [V for SCD/SBD]; "RXNORM" as some senders write it.
RXNORM_QUALIFIERS = m.RXNORM_TERM_TYPES | {"RXNORM"}
CANCELLABLE = frozenset({"stopped", "cancelled", "entered-in-error"})
# Task.input types of the pharmacy-request-input code system (what the pharmacy asked).
REQUEST_INPUTS = {
    "message-kind": "SCRIPT transaction",
    "change-code": "Change requested",
    "requested-medication": "Requested medication",
    "requested-refills": "Refills requested",
    "rx-reference-number": "Pharmacy prescription number",
}
_STRENGTH = re.compile(r"\d+(\.\d+)?\s*(MG|MCG|ML|UNT|MEQ|%)\b")
_PERIOD_WORDS = {"h": "hour", "d": "day", "wk": "week", "mo": "month", "min": "minute", "a": "year"}
_TIMES = {1: "once", 2: "twice"}


# --- out: NewRx and CancelRx ---------------------------------------------------------------------


def new_rx(
    request: JSON,
    resolve: Resolve,
    *,
    message_id: str,
    sent: dt.datetime,
    to_ncpdp_id: str,
    from_id: str | None = None,
) -> m.Message:
    """The NewRx sending ``request`` to the pharmacy with NCPDPID ``to_ncpdp_id``.

    ``from_id`` is our prescriber routing id on the network (Header/From, qualifier D); the
    prescriber's NPI stands in when the network assigned none.

    :raises NcpdpInvalid: with every problem: not an active order, a required element missing
        or unusable (named by FHIR path), or a controlled-substance rule broken.
    """
    order = _Order(request, resolve)
    if request.get("status") != "active":
        order.problem("MedicationRequest.status", f"is {request.get('status')!r}; only an active order is sent as a NewRx")
    if request.get("intent") not in ORDER_INTENTS:
        order.problem("MedicationRequest.intent", f"is {request.get('intent')!r}; only an order is sent to a pharmacy")
    schedule = controlled.dea_schedule(request, resolve)
    patient = order.patient()
    prescriber = order.prescriber(need_dea=schedule is not None)
    pharmacy, kind = order.pharmacy(to_ncpdp_id)
    medication = order.medication(schedule, need_sig=True)
    order.issues.extend(controlled.check(request, pharmacy_kind=kind, resolve=resolve))
    header = order.header(message_id, sent, to_ncpdp_id, from_id, prescriber)
    order.raise_if_any("NewRx")
    body = m.NewRx(patient=patient, pharmacy=pharmacy, prescriber=prescriber, medication=medication)
    return m.Message(header=header, body=body)


def cancel_rx(
    request: JSON,
    resolve: Resolve,
    *,
    message_id: str,
    sent: dt.datetime,
    to_ncpdp_id: str,
    from_id: str | None = None,
    relates_to: str | None = None,
    rx_reference_number: str | None = None,
) -> m.Message:
    """The CancelRx of a stopped or replaced order (status stopped, cancelled, entered-in-error).

    PrescriberOrderNumber is the order's identifier, as on its NewRx; ``relates_to`` is that
    NewRx's MessageID and ``rx_reference_number`` the pharmacy's number when known. The
    status reason travels as the Note (at most 210 characters; longer is cut with an ellipsis).
    """
    order = _Order(request, resolve)
    if request.get("status") not in CANCELLABLE:
        order.problem("MedicationRequest.status", f"is {request.get('status')!r}; a CancelRx is for a {', '.join(sorted(CANCELLABLE))} order")
    schedule = controlled.dea_schedule(request, resolve)
    patient = order.patient()
    prescriber = order.prescriber(need_dea=False)
    pharmacy, _kind = order.pharmacy(to_ncpdp_id)
    medication = order.medication(schedule, need_sig=False)
    reason = concept_text(request.get("statusReason"), codes=True)
    if reason and medication is not None:
        note = reason if len(reason) <= m.NOTE_MAX else reason[: m.NOTE_MAX - 1] + "…"
        medication = dataclasses.replace(medication, note=note)
    header = order.header(message_id, sent, to_ncpdp_id, from_id, prescriber)
    order.raise_if_any("CancelRx")
    header = dataclasses.replace(header, relates_to_message_id=relates_to, rx_reference_number=rx_reference_number)
    return m.Message(header=header, body=m.CancelRx(patient=patient, pharmacy=pharmacy, prescriber=prescriber, medication=medication))


class _Order:
    """Reads one MedicationRequest and what it references; collects every problem by FHIR path."""

    def __init__(self, request: JSON, resolve: Resolve) -> None:
        self.request = request
        self.resolve = resolve
        self.issues: list[Issue] = []

    def problem(self, location: str, message: str, code: str = "invalid") -> None:
        self.issues.append(Issue(message, location=location, code=code))

    def missing(self, location: str, message: str = "is required") -> None:
        self.problem(location, message, code="required")

    def raise_if_any(self, kind: str) -> None:
        if self.issues:
            raise m.NcpdpInvalid(f"cannot send {kind}: {self.issues[0]}", self.issues)

    def follow(self, element: str, types: tuple[str, ...]) -> JSON | None:
        reference = as_dict(self.request.get(element)).get("reference")
        if not isinstance(reference, str):
            self.missing(f"MedicationRequest.{element}", f"is required: a reference to a {' or '.join(types)}")
            return None
        found = lookup(self.request, reference, self.resolve)
        if found is None or found.get("resourceType") not in types:
            self.problem(f"MedicationRequest.{element}", f"{reference!r} does not resolve to a {' or '.join(types)}", code="not-found")
            return None
        return found

    def header(self, message_id: str, sent: dt.datetime, to_ncpdp_id: str, from_id: str | None, prescriber: m.Prescriber | None) -> m.Header:
        values = [i.get("value") for i in as_list(self.request.get("identifier")) if isinstance(i, dict)]
        order_number = next((v for v in values if nonblank(v)), None)
        if order_number is None:
            self.missing("MedicationRequest.identifier", "is required: its value is the PrescriberOrderNumber the pharmacy echoes")
        sender = from_id or (prescriber.npi if prescriber else None) or ""
        return m.Header(
            message_id=message_id,
            to=m.RoutingId(value=to_ncpdp_id, qualifier=m.PHARMACY_QUALIFIER),
            from_=m.RoutingId(value=sender, qualifier=m.PRESCRIBER_QUALIFIER),
            sent_time=sent,
            prescriber_order_number=order_number,
        )

    def patient(self) -> m.Patient | None:
        patient = self.follow("subject", ("Patient",))
        return None if patient is None else self.patient_of(patient)

    def patient_of(self, patient: JSON) -> m.Patient:
        name = name_from_fhir(patient.get("name"))
        if name is None:
            self.missing("Patient.name", "is required: a family and a given name")
        stated = patient.get("gender")
        gender = m.GENDER_FROM_FHIR.get(stated) if isinstance(stated, str) else None
        if gender is None:
            self.missing("Patient.gender", "is required (male, female, other or unknown)")
        birth = parse_date(patient.get("birthDate"))
        if birth is None:
            self.missing("Patient.birthDate", "is required: a full date")
        return m.Patient(
            name=_name(name),
            gender=gender,
            birth_date=birth,
            address=_address(patient.get("address")),
            phone=_phone(patient.get("telecom")),
        )

    def prescriber(self, *, need_dea: bool) -> m.Prescriber | None:
        person = self.follow("requester", ("Practitioner", "PractitionerRole"))
        if person is not None and person["resourceType"] == "PractitionerRole":
            role = person
            person = lookup(role, as_dict(role.get("practitioner")).get("reference"), self.resolve)
            if person is None:
                self.problem("PractitionerRole.practitioner", "does not resolve to a Practitioner", code="not-found")
        return None if person is None else self.prescriber_of(person, need_dea=need_dea)

    def prescriber_of(self, person: JSON, *, need_dea: bool) -> m.Prescriber:
        name = name_from_fhir(person.get("name"))
        if name is None:
            self.missing("Practitioner.name", "is required: a family and a given name")
        npi = next(iter(identifier_values(person, NPI)), None)
        if npi is None:
            self.missing("Practitioner.identifier", f"an NPI ({NPI}) is required to prescribe electronically")
        elif not npi_is_valid(npi):
            self.problem("Practitioner.identifier", f"NPI {npi!r} fails its check digit")
        dea = next(iter(identifier_values(person, DEA) + identifier_values(person, DEA_THO)), None)
        if need_dea:
            if dea is None:
                self.missing("Practitioner.identifier", f"a DEA registration number ({DEA}) is required for a controlled substance")
            elif not dea_is_valid(dea):
                self.problem("Practitioner.identifier", f"DEA number {dea!r} fails its check digit")
        return m.Prescriber(
            name=_name(name),
            npi=npi,
            dea_number=dea if need_dea else None,  # disclosed only where the law asks for it
            address=_address(person.get("address")),
            phone=_phone(person.get("telecom")),
        )

    def pharmacy(self, to_ncpdp_id: str) -> tuple[m.Pharmacy, str | None]:
        """The Pharmacy block and the pharmacy's kind (``retail``, ...; None when not stated)."""
        performer = as_dict(as_dict(self.request.get("dispenseRequest")).get("performer")).get("reference")
        if performer is None:
            return m.Pharmacy(ncpdp_id=to_ncpdp_id), None
        organization = lookup(self.request, performer, self.resolve)
        if organization is None or organization.get("resourceType") != "Organization":
            self.problem("MedicationRequest.dispenseRequest.performer", f"{performer!r} does not resolve to an Organization", code="not-found")
            return m.Pharmacy(ncpdp_id=to_ncpdp_id), None
        ncpdp = identifier_values(organization, NCPDP_PROVIDER)
        if ncpdp and to_ncpdp_id not in ncpdp:
            self.problem(
                "MedicationRequest.dispenseRequest.performer",
                f"names the pharmacy with NCPDPID {ncpdp[0]}, but the message is addressed to {to_ncpdp_id}",
            )
        pharmacy = m.Pharmacy(
            ncpdp_id=to_ncpdp_id,
            npi=next(iter(identifier_values(organization, NPI)), None),
            business_name=nonblank(organization.get("name")),
            address=_address(organization.get("address")),
            phone=_phone(organization.get("telecom")),
        )
        return pharmacy, code_in_any(organization.get("type"), PHARMACY_TYPE)

    def medication(self, schedule: str | None, *, need_sig: bool) -> m.Medication | None:
        request = self.request
        product = medication_concept(request, self.resolve)
        description = concept_text(product)
        if description is None:
            self.missing("MedicationRequest.medicationCodeableConcept", "is required: a drug name (text or display)")
            return None
        rxnorm = code_in(product, RXNORM)
        known = terminology.medication(rxnorm) if rxnorm else None
        dispense = as_dict(request.get("dispenseRequest"))
        quantity = self.quantity(dispense.get("quantity"))
        written = parse_date(request.get("authoredOn"))
        if written is None:
            self.missing("MedicationRequest.authoredOn", "is required: the date written")
        sig = sig_text(request)
        if sig is None and need_sig:
            self.missing("MedicationRequest.dosageInstruction", "is required: sig text, or a dose to compose it from")
        refills = whole_number(dispense.get("numberOfRepeatsAllowed"))
        diagnoses = self.diagnoses()
        return m.Medication(
            description=description,
            product_code=self.ndc(product),
            strength=_strength(known, description, quantity),
            drug_db_code=_drug_db_code(rxnorm, product, description),
            dea_schedule=m.DEA_SCHEDULE_CODES.get(schedule) if schedule else None,
            quantity=quantity,
            days_supply=controlled.days_supply(request),
            written_date=written,
            substitutions=m.SUBSTITUTION_NOT_ALLOWED if _substitution_refused(request) else m.SUBSTITUTION_ALLOWED,
            number_of_refills=refills if refills is not None and refills >= 0 else 0,
            clinical_information_qualifier=m.DIAGNOSIS_PRESCRIBER_SUPPLIED if diagnoses else None,
            diagnoses=diagnoses,
            sig_text=sig,
        )

    def quantity(self, value: Any) -> m.Quantity | None:
        parts = quantity_parts(as_dict(value))
        if parts is None:
            self.missing("MedicationRequest.dispenseRequest.quantity", "is required: how much to dispense, with its unit")
            return None
        amount, unit = parts
        # Other systems write unit words ("tablets", "film") where we write UCUM codes.
        code = m.UNIT_BY_UCUM.get(unit) or m.UNIT_BY_UCUM.get(UNIT_SYNONYMS.get(unit.lower(), ""))
        if code is None:
            known = ", ".join(sorted(m.UNIT_BY_UCUM))
            self.problem("MedicationRequest.dispenseRequest.quantity.code", f"unit {unit!r} has no NCPDP unit code (known: {known}); never sent as free text")
            return None
        if not amount.is_finite() or amount <= 0:
            self.problem("MedicationRequest.dispenseRequest.quantity.value", f"{amount} is not a positive quantity")
            return None
        return m.Quantity(value=amount, unit_code=code.nci)

    def ndc(self, product: JSON) -> m.Code | None:
        ndc = code_in(product, NDC)
        if ndc is None:
            return None
        eleven = _ndc11(ndc)
        if eleven is None:
            self.problem("MedicationRequest.medicationCodeableConcept.coding", f"NDC {ndc!r} is neither 11 digits nor hyphenated 10 digits")
            return None
        return m.Code(code=eleven, qualifier=m.NDC_QUALIFIER)

    def diagnoses(self) -> tuple[m.Diagnosis, ...]:
        found: list[m.Diagnosis] = []
        for i, reference in enumerate(as_list(self.request.get("reasonReference"))):
            target = as_dict(reference).get("reference")
            condition = lookup(self.request, target, self.resolve)
            if condition is None:
                self.problem(f"MedicationRequest.reasonReference[{i}]", f"{target!r} does not resolve to a Condition", code="not-found")
                continue
            found.extend(_diagnosis(condition.get("code")))
        for reason in as_list(self.request.get("reasonCode")):
            found.extend(_diagnosis(reason))
        return tuple(list(dict.fromkeys(found))[:2])  # Primary and Secondary are all SCRIPT holds


# --- FHIR values -> SCRIPT values ------------------------------------------------------------------


def _name(name: JSON | None) -> m.Name | None:
    """A contract-shaped name (``name_from_fhir``) as SCRIPT's: given names after the first are middle names."""
    if name is None:
        return None
    given = list(name["given"])
    return m.Name(last=name["family"], first=given[0], middle=" ".join(given[1:]) or None, prefix=name.get("prefix"), suffix=name.get("suffix"))


def _address(value: Any) -> m.Address | None:
    found = address_from_fhir(value)
    if found is None:
        return None
    lines = found["lines"]
    return m.Address(
        line1=lines[0],
        line2=", ".join(lines[1:]) or None,
        city=found["city"],
        state=found["state"],
        postal_code=found["postal_code"],
        country_code=found["country"],
    )


def _phone(telecom: Any) -> str | None:
    """The first phone as the 10 digits SCRIPT numbers carry [M]; other shapes are left out."""
    phone = as_dict(contact_from_fhir(telecom)).get("phone")
    digits = re.sub(r"\D", "", phone) if isinstance(phone, str) else ""
    if len(digits) == 11 and digits.startswith("1"):  # the North American country code
        digits = digits[1:]
    return digits if len(digits) == 10 else None


def rxnorm_term_type(name: str) -> str | None:
    """SCD or SBD from an RxNorm name, by RxNorm's naming conventions: clinical and branded drugs
    name a strength ("… 50 MG Oral Tablet"), branded ones end in "[Brand]". A name without a
    strength is a dose-form group (SCDF/SBDF), which SCRIPT does not take as DrugDBCode [?]."""
    if not _STRENGTH.search(name.upper()):
        return None
    return "SBD" if name.rstrip().endswith("]") else "SCD"


def _drug_db_code(rxnorm: str | None, product: JSON, description: str) -> m.Code | None:
    if rxnorm is None:
        return None
    display = next((c.get("display") for c in codings_of(product) if c.get("system") == RXNORM and c.get("code") == rxnorm), None)
    known = terminology.medication(rxnorm)
    name = (known or {}).get("display") or display or description
    term_type = rxnorm_term_type(name)
    return None if term_type is None else m.Code(code=rxnorm, qualifier=term_type)


def _strength(known: JSON | None, description: str, quantity: m.Quantity | None) -> m.Strength | None:
    """Strength in mg from the drug table, for products counted in units (tablets, capsules,
    films, injections); a liquid's strength is per mL, which the table does not say."""
    if known is None or not known.get("strength_mg") or quantity is None or quantity.unit_code == m.UNIT_BY_UCUM["mL"].nci:
        return None
    words = re.findall(r"[a-z]+", description.split("[")[0].lower())
    form = next((m.STRENGTH_FORMS[w] for w in reversed(words) if w in m.STRENGTH_FORMS), None)
    return m.Strength(value=Decimal(known["strength_mg"]), form_code=form, unit_code=m.UNIT_BY_UCUM["mg"].nci)


def _substitution_refused(request: JSON) -> bool:
    """R4: substitution may be done unless ``allowed`` says no (false, or v3 code N = none)."""
    substitution = as_dict(request.get("substitution"))
    if isinstance(substitution.get("allowedBoolean"), bool):
        return not substitution["allowedBoolean"]
    return code_in(substitution.get("allowedCodeableConcept"), V3_SUBSTITUTION) == "N"


def _ndc11(ndc: str) -> str | None:
    """An NDC as the 11 digits networks expect: hyphenated 4-4-2 / 5-3-2 / 5-4-1 padded to 5-4-2."""
    parts = ndc.strip().split("-")
    if len(parts) == 1:
        return parts[0] if len(parts[0]) == 11 and parts[0].isdigit() else None
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or len("".join(parts)) != 10:
        return None
    return parts[0].zfill(5) + parts[1].zfill(4) + parts[2].zfill(2)


def _diagnosis(value: Any) -> list[m.Diagnosis]:
    code = code_in(value, ICD10CM)
    if code is None:
        return []
    display = next((c.get("display") for c in codings_of(value) if c.get("system") == ICD10CM and c.get("code") == code), None)
    return [m.Diagnosis(code=code.replace(".", ""), description=nonblank(display) or terminology.icd10_display(code))]


def sig_text(request: JSON) -> str | None:
    """The Sig of an order: ``dosageInstruction[0].text``, else composed from the structured
    dose, route and timing ("Take 1 tablet by oral route 3 times a day as needed for anxiety.");
    None when there is neither text nor a dose."""
    dosage = as_dict(next(iter(as_list(request.get("dosageInstruction"))), None))
    text = nonblank(dosage.get("text"))
    if text:
        return text
    dose_quantity = as_dict(as_dict(next(iter(as_list(dosage.get("doseAndRate"))), None)).get("doseQuantity"))
    dose = quantity_parts(dose_quantity)
    if dose is None:
        return None
    amount, unit_code = dose
    unit = nonblank(dose_quantity.get("unit")) or unit_code
    if unit.isalpha() and amount != 1:
        unit += "s"  # tablet -> tablets; codes such as mg stay as they are
    words = [f"Take {number(amount)} {unit}"]
    route = concept_text(dosage.get("route"))
    if route:
        words.append(f"by {route.lower()}")
    repeat = as_dict(as_dict(dosage.get("timing")).get("repeat"))
    period, period_unit = to_decimal(repeat.get("period")), repeat.get("periodUnit")
    if period is not None and period_unit in _PERIOD_WORDS:
        frequency = whole_number(repeat.get("frequency")) or 1
        times = _TIMES.get(frequency, f"{frequency} times")
        every = f"a {_PERIOD_WORDS[period_unit]}" if period == 1 else f"every {number(period)} {_PERIOD_WORDS[period_unit]}s"
        words.append(f"{times} {every}")
    reason = concept_text(dosage.get("asNeededCodeableConcept"))
    if reason:
        words.append(f"as needed for {reason}")
    elif dosage.get("asNeededBoolean") is True:
        words.append("as needed")
    return " ".join(words) + "."


# --- SCRIPT values -> FHIR values ------------------------------------------------------------------


def product_concept(medication: m.Medication) -> JSON:
    """The drug of a SCRIPT medication as a CodeableConcept: RxNorm (DrugDBCode), NDC (ProductCode ND), the description as text."""
    codings = []
    db = medication.drug_db_code
    if db is not None and (db.qualifier or "").upper() in RXNORM_QUALIFIERS:
        codings.append(coding(RXNORM, db.code, medication.description))
    product = medication.product_code
    if product is not None and product.qualifier == m.NDC_QUALIFIER:
        codings.append(coding(NDC, product.code))
    return concept(*codings, text=medication.description)


def _quantity(quantity: m.Quantity) -> JSON:
    unit = m.UNIT_BY_NCI.get(quantity.unit_code or "")
    if unit is not None:
        return ucum_quantity(quantity.value, unit.ucum, unit.text)
    if quantity.unit_code:
        return {"value": number(quantity.value), "unit": quantity.unit_code, "system": NCI_THESAURUS, "code": quantity.unit_code}
    return {"value": number(quantity.value)}


def _days(days: int | None) -> JSON | None:
    return None if days is None else ucum_quantity(days, "d", "days")


def _person_name(name: m.Name | None) -> str | None:
    if name is None:
        return None
    return " ".join(part for part in (name.prefix, name.first, name.middle, name.last, name.suffix) if part) or None


def pharmacy_reference(pharmacy: m.Pharmacy | None) -> JSON | None:
    """A logical reference to a pharmacy by its NCPDP Provider ID (else NPI), with its name."""
    if pharmacy is None:
        return None
    if pharmacy.ncpdp_id:
        identifier = {"system": NCPDP_PROVIDER, "value": pharmacy.ncpdp_id}
    elif pharmacy.npi:
        identifier = {"system": NPI, "value": pharmacy.npi}
    else:
        return {"display": pharmacy.business_name} if pharmacy.business_name else None
    return drop_empty({"type": "Organization", "identifier": identifier, "display": pharmacy.business_name})


def prescriber_reference(prescriber: m.Prescriber | None) -> JSON | None:
    """A logical reference to a prescriber by NPI, with the name."""
    if prescriber is None:
        return None
    name = _person_name(prescriber.name)
    if not prescriber.npi:
        return {"display": name} if name else None
    return drop_empty({"type": "Practitioner", "identifier": {"system": NPI, "value": prescriber.npi}, "display": name})


def _icd10(code: str) -> str:
    """ICD-10-CM as FHIR writes it, the dot after the category: F1120 -> F11.20."""
    return code if "." in code or len(code) <= 3 else f"{code[:3]}.{code[3:]}"


# --- in: RxFill, RxHistoryResponse -----------------------------------------------------------------


def _pharmacy_key(pharmacy: m.Pharmacy | None) -> str | None:
    if pharmacy is None:
        return None
    return pharmacy.ncpdp_id or (f"npi-{pharmacy.npi}" if pharmacy.npi else None)


def fill_key(pharmacy: m.Pharmacy | None, rx_number: str | None, medication: m.Medication | None, *, fallback_pharmacy: str | None = None) -> str | None:
    """``{pharmacy}/{prescription number}/{fill}`` (module docstring); None when a part is unknown."""
    who = _pharmacy_key(pharmacy) or fallback_pharmacy
    number = _fill_number(medication)
    if medication is not None and medication.last_fill_date is not None:
        fill = f"date-{medication.last_fill_date.isoformat()}"
    elif number is not None:
        fill = f"fill-{number}"
    else:
        return None
    return f"{who}/{rx_number}/{fill}" if who and rx_number else None


def _fill_number(medication: m.Medication | None) -> int | None:
    source = medication.history_source if medication is not None else None
    return source.fill_number if source is not None else None


def _fill_identifiers(key: str, medication: m.Medication | None) -> list[JSON]:
    """The fill key, then ``{pharmacy}/{prescription number}/fill-N`` when the fill number is known
    and the key is not already it."""
    out = [{"system": FILL_SYSTEM, "value": key}]
    number = _fill_number(medication)
    by_number = f"{key.rsplit('/', 1)[0]}/fill-{number}"
    if number is not None and by_number != key:
        out.append({"system": FILL_SYSTEM, "value": by_number})
    return out


def _authorized_by_an_order(dispense: JSON) -> bool:
    """Linked to a stored MedicationRequest (an RxFill's link to our order), not to a contained
    copy of the prescription (a history entry's ``#prescription``)."""
    references = (r for a in as_list(dispense.get("authorizingPrescription")) if isinstance(r := as_dict(a).get("reference"), str))
    return any((found := parse_reference(r)) is not None and found[0] == "MedicationRequest" for r in references)


def merge_fill(stored: JSON | None, incoming: JSON) -> JSON:
    """What to keep when ``incoming`` (from an RxFill or a history entry) reports the fill that
    ``stored`` already holds (None: the first report of it).

    The result keeps ``stored``'s id and every identifier either carries, so the fill stays one
    resource found by its key and its fill number. Its content is the newer report -- a re-sent or
    corrected RxFill, a history after a history, an RxFill after a history entry -- except that a
    history entry never replaces a dispense linked to our order: the RxFill is the dispensing
    pharmacy's own word to the prescriber about that order, the history entry a copy of it that
    knows the prescription only as a contained stand-in, and replacing the link would take the
    fill out of the prescription's PDC.
    """
    if stored is None:
        return incoming
    kept = stored if _authorized_by_an_order(stored) and not _authorized_by_an_order(incoming) else incoming
    other = incoming if kept is stored else stored
    seen = {(i.get("system"), i.get("value")) for i in identifiers_in(kept.get("identifier"))}
    extra = [i for i in identifiers_in(other.get("identifier")) if (i.get("system"), i.get("value")) not in seen]
    return {**kept, "id": stored["id"], "identifier": [*identifiers_in(kept.get("identifier")), *extra]}


def medication_dispense(fill: m.Message, request_ref: str | None, patient_ref: str) -> JSON:
    """An RxFill as a US Core MedicationDispense linked to the prescription it fills.

    Status by FillStatus (:data:`DISPENSE_STATUS`); quantity, days supply and ``whenHandedOver``
    (LastFillDate) from MedicationDispensed when something was handed over; the drug and Sig
    from MedicationDispensed, else MedicationPrescribed; the pharmacy as performer; the fill key
    as identifier, the prescription number being the pharmacy's RxReferenceNumber (else
    ``order-{PrescriberOrderNumber}``). A fill without a fill date (not dispensed, transferred)
    is keyed by its MessageID: the message is the event.

    :param request_ref: the MedicationRequest found by the header's PrescriberOrderNumber
        (``"MedicationRequest/…"``), None when it is not one of ours.
    :raises NcpdpInvalid: not an RxFill, or it names no medication or no pharmacy.
    """
    body = fill.body
    if not isinstance(body, m.RxFill):
        raise m.NcpdpInvalid(f"expected an RxFill, got {fill.kind}", [Issue(f"{fill.kind} is not an RxFill", location="/Message/Body")])
    header = fill.header
    status = body.fill_status.status
    medication = body.dispensed or body.prescribed
    sender = header.from_.value if header.from_ and header.from_.qualifier == m.PHARMACY_QUALIFIER else None
    pharmacy = body.pharmacy if _pharmacy_key(body.pharmacy) else m.Pharmacy(ncpdp_id=sender) if sender else None
    who = _pharmacy_key(pharmacy)
    if medication is None or pharmacy is None or who is None:
        issues = []
        if medication is None:
            issues.append(Issue("names no medication (MedicationDispensed or MedicationPrescribed)", location="/Message/Body/RxFill", code="required"))
        if who is None:
            issues.append(Issue("names no pharmacy (Pharmacy/Identification, or From with qualifier P)", location="/Message/Body/RxFill/Pharmacy", code="required"))
        raise m.NcpdpInvalid(f"cannot record the RxFill: {issues[0]}", issues)
    order = header.prescriber_order_number
    rx_number = header.rx_reference_number or (f"order-{order}" if order else "unnumbered")
    handed_over = status in ("Dispensed", "PartiallyDispensed")
    key = fill_key(pharmacy, rx_number, body.dispensed if handed_over else None) or f"{who}/{rx_number}/message-{header.message_id}"
    dispensed = body.dispensed
    reason = None
    if not handed_over:
        reason = concept(text=" - ".join(filter(None, [NOT_DISPENSED_REASON.get(status), body.fill_status.note, body.fill_status.reason_code])))
    resource = {
        "resourceType": "MedicationDispense",
        "id": resource_id("MedicationDispense", FILL_SYSTEM, key),
        "meta": {"profile": [DISPENSE_PROFILE]},
        "identifier": _fill_identifiers(key, dispensed if handed_over else None),
        "status": DISPENSE_STATUS[status],
        "statusReasonCodeableConcept": reason,
        "medicationCodeableConcept": product_concept(medication),
        "subject": {"reference": patient_ref},
        "performer": [{"actor": pharmacy_reference(pharmacy)}],
        "authorizingPrescription": [{"reference": request_ref}] if request_ref else None,
        "quantity": _quantity(dispensed.quantity) if handed_over and dispensed and dispensed.quantity else None,
        "daysSupply": _days(dispensed.days_supply) if handed_over and dispensed else None,
        "whenHandedOver": dispensed.last_fill_date.isoformat() if handed_over and dispensed and dispensed.last_fill_date else None,
        "note": [{"text": body.fill_status.note}] if handed_over and body.fill_status.note else None,
        "dosageInstruction": [{"text": medication.sig_text}] if medication.sig_text else None,
    }
    return drop_empty(resource)


def history_resources(response: m.Message, patient_ref: str) -> list[JSON]:
    """An RxHistoryResponse as FHIR: one MedicationDispense (completed) per entry with a fill
    date, a MedicationStatement (status unknown) per entry without one; each keyed by the fill
    key, so the same fill reported by two sources is returned once (the first kept).

    The prescription behind an entry (its prescriber, written date, refills) rides along as a
    contained MedicationRequest (status unknown: another prescriber's order, not ours) in
    ``authorizingPrescription`` / ``derivedFrom``; an aftercare provider reading the history
    sees who prescribed what, when.
    """
    body = response.body
    if not isinstance(body, m.RxHistoryResponse):
        raise m.NcpdpInvalid(f"expected an RxHistoryResponse, got {response.kind}", [Issue(f"{response.kind} is not an RxHistoryResponse", location="/Message/Body")])
    network = response.header.from_.value if response.header.from_ else None
    source = f"source-{network}" if network else "unknown-source"
    asserted = fhir_datetime(response.header.sent_time) if response.header.sent_time else None
    out: list[JSON] = []
    seen: set[str] = set()
    for entry in body.dispensed:
        rx_number = (entry.history_source.source_reference if entry.history_source else None) or _unnumbered(entry)
        # An entry without fill number or date (a prescription never filled) is its prescription.
        written = f"written-{entry.written_date.isoformat()}" if entry.written_date else "unfilled"
        key = fill_key(entry.pharmacy, rx_number, entry, fallback_pharmacy=source) or f"{_pharmacy_key(entry.pharmacy) or source}/{rx_number}/{written}"
        if key in seen:
            continue
        seen.add(key)
        out.append(_history_entry(entry, key, patient_ref, asserted))
    return out


def _unnumbered(entry: m.Medication) -> str:
    """A stand-in prescription number for an entry without SourceReference: drug and date written."""
    if entry.product_code is not None:
        product = entry.product_code.code
    elif entry.drug_db_code is not None:
        product = entry.drug_db_code.code
    else:
        product = re.sub(r"\W+", "-", entry.description.lower())[:40]
    written = entry.written_date.isoformat() if entry.written_date else "undated"
    return f"{product}-{written}"


def _history_entry(entry: m.Medication, key: str, patient_ref: str, asserted: str | None) -> JSON:
    patient = {"reference": patient_ref}
    drug = product_concept(entry)
    prescription = drop_empty(
        {
            "resourceType": "MedicationRequest",
            "id": "prescription",
            "status": "unknown",
            "intent": "order",
            "medicationCodeableConcept": drug,
            "subject": patient,
            "authoredOn": entry.written_date.isoformat() if entry.written_date else None,
            "requester": prescriber_reference(entry.prescriber),
            "dispenseRequest": drop_empty({"numberOfRepeatsAllowed": entry.number_of_refills}),
        }
    )
    carries = any(prescription.get(k) for k in ("authoredOn", "requester", "dispenseRequest"))
    contained = [prescription] if carries else None
    common = {
        "contained": contained,
        "identifier": _fill_identifiers(key, entry),
    }
    if entry.last_fill_date is not None:
        return drop_empty(
            {
                "resourceType": "MedicationDispense",
                "id": resource_id("MedicationDispense", FILL_SYSTEM, key),
                "meta": {"profile": [DISPENSE_PROFILE]},
                **common,
                "status": "completed",
                "medicationCodeableConcept": drug,
                "subject": patient,
                "performer": [{"actor": pharmacy_reference(entry.pharmacy)}] if pharmacy_reference(entry.pharmacy) else None,
                "authorizingPrescription": [{"reference": "#prescription"}] if contained else None,
                "quantity": _quantity(entry.quantity) if entry.quantity else None,
                "daysSupply": _days(entry.days_supply),
                "whenHandedOver": entry.last_fill_date.isoformat(),
                "dosageInstruction": [{"text": entry.sig_text}] if entry.sig_text else None,
            }
        )
    return drop_empty(
        {
            "resourceType": "MedicationStatement",
            "id": resource_id("MedicationStatement", FILL_SYSTEM, key),
            **common,
            "status": "unknown",  # prescribed; whether it was ever taken the history does not say
            "medicationCodeableConcept": drug,
            "subject": patient,
            "effectiveDateTime": entry.written_date.isoformat() if entry.written_date else None,
            "dateAsserted": asserted,
            "informationSource": pharmacy_reference(entry.pharmacy),
            "derivedFrom": [{"reference": "#prescription"}] if contained else None,
            "note": [{"text": "Reported in a medication history without a fill date."}],
            "dosage": [{"text": entry.sig_text}] if entry.sig_text else None,
        }
    )


# --- in: renewal and change requests; out: their responses ---------------------------------------


def _request_part(code: str) -> JSON:
    return concept(coding(PHARMACY_REQUEST_INPUT, code, REQUEST_INPUTS[code]))


def review_task(request_message: m.Message, request_ref: str | None, patient_ref: str) -> JSON:
    """An RxRenewalRequest or RxChangeRequest as a Task for the prescriber to review.

    Like our medication-review Tasks (code SNOMED CT 182836005 |Review of medication|, focus
    the prescription, ``for`` the patient), but open: status ``requested``, intent ``proposal``
    (the pharmacy proposes, the prescriber decides), requester the pharmacy, owner the
    prescriber (both by identifier), and inputs in the ``pharmacy-request-input`` code system:
    the SCRIPT transaction, the change code(s), each medication asked for, the refills asked
    for and the pharmacy's prescription number. The identifier is the message's sender and
    MessageID, so a redelivered request is the same Task; the answer is built from the
    message itself (:func:`renewal_response`, :func:`change_response`).
    """
    body = request_message.body
    if not isinstance(body, (m.RxRenewalRequest, m.RxChangeRequest)):
        kind = request_message.kind
        raise m.NcpdpInvalid(f"expected an RxRenewalRequest or RxChangeRequest, got {kind}", [Issue(f"{kind} is not reviewed", location="/Message/Body")])
    header = request_message.header
    sender = (header.from_.value if header.from_ else None) or (body.pharmacy.ncpdp_id if body.pharmacy else None) or "unknown-sender"
    key = f"{sender}/{header.message_id}"
    inputs = [{"type": _request_part("message-kind"), "valueCode": request_message.kind}]
    if isinstance(body, m.RxRenewalRequest):
        original = body.dispensed or body.prescribed
        asked = "Renewal requested by the pharmacy"
        wanted = [original] if original is not None else []
        refills = original.pharmacy_requested_refills if original is not None else None
    else:
        original = body.prescribed
        label = m.CHANGE_REQUEST_CODES.get(body.request_code or "", body.request_code or "unspecified")
        asked = f"Change requested by the pharmacy: {label}"
        inputs += [{"type": _request_part("change-code"), "valueCode": code} for code in (body.request_code, *body.request_sub_codes) if code]
        wanted, refills = list(body.requested), None
    inputs += [{"type": _request_part("requested-medication"), "valueCodeableConcept": product_concept(w)} for w in wanted]
    if refills is not None:
        inputs.append({"type": _request_part("requested-refills"), "valueUnsignedInt": refills})
    if header.rx_reference_number:
        inputs.append({"type": _request_part("rx-reference-number"), "valueString": header.rx_reference_number})
    notes = [w.note for w in (original, *wanted) if w is not None and w.note]
    return drop_empty(
        {
            "resourceType": "Task",
            "id": resource_id("Task", MESSAGE_SYSTEM, key),
            "identifier": [{"system": MESSAGE_SYSTEM, "value": key}],
            "status": "requested",
            "businessStatus": {"text": asked},
            "intent": "proposal",
            "priority": "routine",
            "code": concept(coding(SNOMED, REVIEW_CODE, terminology.snomed_display(REVIEW_CODE))),
            "description": f"{asked}: {original.description}" if original is not None else asked,
            "focus": {"reference": request_ref} if request_ref else None,
            "for": {"reference": patient_ref},
            "authoredOn": fhir_datetime(header.sent_time) if header.sent_time else None,
            "requester": pharmacy_reference(body.pharmacy),
            "owner": prescriber_reference(body.prescriber),
            "note": [{"text": text} for text in dict.fromkeys(notes)],
            "input": inputs,
        }
    )


def renewal_response(
    request: m.Message,
    *,
    decision: str,
    message_id: str,
    sent: dt.datetime,
    note: str | None = None,
    denial_reason: str | None = None,
    reason_codes: tuple[str, ...] = (),
    refills: int | None = None,
    medication: m.Medication | None = None,
) -> m.Message:
    """The RxRenewalResponse to ``request`` (an RxRenewalRequest).

    ``decision`` is Approved, ApprovedWithChanges (then ``medication`` is the changed order),
    Denied (``denial_reason``, ``reason_codes``) or Replace. An approval is a new prescription
    written today: its MedicationPrescribed is the request's (or ``medication``) with
    ``refills`` applied and WrittenDate = the date of ``sent``.
    """
    body = _expect(request, m.RxRenewalRequest)
    prescribed = _answered(decision, m.RENEWAL_RESPONSES, medication, body.prescribed or body.dispensed, sent, refills)
    return _reply(request, m.RxRenewalResponse, _response(decision, note, denial_reason, reason_codes), prescribed, message_id=message_id, sent=sent)


def change_response(
    request: m.Message,
    *,
    decision: str,
    message_id: str,
    sent: dt.datetime,
    medication: m.Medication | None = None,
    note: str | None = None,
    denial_reason: str | None = None,
    reason_codes: tuple[str, ...] = (),
) -> m.Message:
    """The RxChangeResponse to ``request`` (an RxChangeRequest).

    ``decision`` is Approved (of ``medication``, by default the first alternative the pharmacy
    proposed), ApprovedWithChanges (``medication`` required), Denied or Validated (a prescriber
    authorization confirmed; the original order stands).
    """
    body = _expect(request, m.RxChangeRequest)
    proposed = body.requested[0] if body.requested and decision == "Approved" else body.prescribed
    prescribed = _answered(decision, m.CHANGE_RESPONSES, medication, proposed, sent, None)
    return _reply(request, m.RxChangeResponse, _response(decision, note, denial_reason, reason_codes), prescribed, message_id=message_id, sent=sent)


def _reply(request: m.Message, kind: type, response: m.Response, prescribed: m.Medication | None, *, message_id: str, sent: dt.datetime) -> m.Message:
    """A prescriber's answer (``kind``: RxRenewalResponse, RxChangeResponse) to ``request``: the
    parties as the pharmacy named them, the decision, and the order it settles on."""
    asked = request.body
    return m.Message(
        header=m.reply_header(request.header, message_id=message_id, sent=sent),
        body=kind(response=response, patient=asked.patient, pharmacy=asked.pharmacy, prescriber=asked.prescriber, prescribed=prescribed),
    )


def _expect(message: m.Message, kind: type) -> Any:
    if not isinstance(message.body, kind):
        raise m.NcpdpInvalid(f"expected an {kind.__name__}, got {message.kind}", [Issue(f"{message.kind} is not an {kind.__name__}", location="/Message/Body")])
    return message.body


def _answered(decision: str, allowed: tuple[str, ...], medication: m.Medication | None, original: m.Medication | None, sent: dt.datetime, refills: int | None) -> m.Medication | None:
    """The MedicationPrescribed of an answer: an approval is an order written on ``sent``."""
    issues = []
    if decision not in allowed:
        issues.append(Issue(f"{decision!r} is not an answer here ({', '.join(allowed)})", location="decision"))
    if decision == "ApprovedWithChanges" and medication is None:
        issues.append(Issue("an approval with changes needs the changed medication", location="medication", code="required"))
    chosen = medication or original
    if chosen is None and decision in m.APPROVING_RESPONSES:
        issues.append(Issue("the request names no medication to approve; give one", location="medication", code="required"))
    if issues:
        raise m.NcpdpInvalid(f"cannot answer: {issues[0]}", issues)
    if chosen is None:
        return None
    # What the pharmacy reported about its own dispensing does not belong in the prescriber's order.
    chosen = dataclasses.replace(chosen, last_fill_date=None, pharmacy_requested_refills=None, history_source=None, pharmacy=None, prescriber=None)
    if decision in m.APPROVING_RESPONSES:
        chosen = dataclasses.replace(chosen, written_date=sent.astimezone(dt.timezone.utc).date())
    if refills is not None:
        chosen = dataclasses.replace(chosen, number_of_refills=refills)
    return chosen


def _response(decision: str, note: str | None, denial_reason: str | None, reason_codes: tuple[str, ...]) -> m.Response:
    if decision == "Denied":
        return m.Response(outcome=decision, denial_reason=denial_reason, reason_codes=tuple(reason_codes))
    return m.Response(outcome=decision, note=note)


def history_request(
    patient: JSON,
    prescriber: JSON,
    *,
    message_id: str,
    sent: dt.datetime,
    to: m.RoutingId,
    from_id: str | None = None,
    start: dt.date | None = None,
    end: dt.date | None = None,
    consent: str | None = None,
) -> m.Message:
    """An RxHistoryRequest for ``patient`` (a FHIR Patient) on behalf of ``prescriber`` (a
    Practitioner), to ``to`` (the history source's routing id). ``consent`` is the patient
    consent flag the source requires (``Y``; its values are [?] in the reference)."""
    reader = _Order({}, lambda _reference: None)
    who = reader.patient_of(patient)
    doctor = reader.prescriber_of(prescriber, need_dea=False)
    if (start is None) != (end is None):
        reader.problem("RequestedDates", "needs both a start and an end date")
    reader.raise_if_any("RxHistoryRequest")
    header = m.Header(
        message_id=message_id,
        to=to,
        from_=m.RoutingId(value=from_id or doctor.npi or "", qualifier=m.PRESCRIBER_QUALIFIER),
        sent_time=sent,
    )
    return m.Message(header=header, body=m.RxHistoryRequest(patient=who, prescriber=doctor, start_date=start, end_date=end, consent=consent))


# --- NewRx -> MedicationRequest -------------------------------------------------------------------


def medication_request_from_new_rx(message: m.Message) -> JSON:
    """What a NewRx says, as a MedicationRequest (intent order, status active).

    References are logical (the patient by name, the prescriber by NPI, the pharmacy by
    NCPDPID): a NewRx names people, it does not point at resources. The order number is the
    identifier (system :data:`PRESCRIBER_ORDER_SYSTEM`); ICD-10-CM diagnoses are ``reasonCode``.
    """
    body = _expect(message, m.NewRx)
    medication = body.medication
    if medication is None:
        raise m.NcpdpInvalid("the NewRx names no medication", [Issue("is required", location="/Message/Body/NewRx/MedicationPrescribed", code="required")])
    schedule = m.DEA_SCHEDULES.get(medication.dea_schedule or "")
    patient_name = _person_name(body.patient.name) if body.patient else None
    order_number = message.header.prescriber_order_number
    dispense = {
        "numberOfRepeatsAllowed": medication.number_of_refills,
        "quantity": _quantity(medication.quantity) if medication.quantity else None,
        "expectedSupplyDuration": _days(medication.days_supply),
        "performer": pharmacy_reference(body.pharmacy),
    }
    return drop_empty(
        {
            "resourceType": "MedicationRequest",
            "extension": [{"url": terminology.extension_url("dea-schedule"), "valueCode": schedule}] if schedule else None,
            "identifier": [{"system": PRESCRIBER_ORDER_SYSTEM, "value": order_number}] if order_number else None,
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": product_concept(medication),
            "subject": {"display": patient_name} if patient_name else {"display": "unnamed patient"},
            "authoredOn": medication.written_date.isoformat() if medication.written_date else None,
            "requester": prescriber_reference(body.prescriber),
            "reasonCode": [concept(coding(ICD10CM, _icd10(d.code), d.description)) for d in medication.diagnoses if d.qualifier in (m.ICD10CM_QUALIFIER, None)],
            "dosageInstruction": [{"text": medication.sig_text}] if medication.sig_text else None,
            "dispenseRequest": drop_empty(dispense),
            "substitution": {"allowedBoolean": medication.substitutions != m.SUBSTITUTION_NOT_ALLOWED} if medication.substitutions is not None else None,
        }
    )
