"""The IOP record, version ``iop-record/1``: one client's episode in one program.

These pydantic models *are* the contract: the JSON Schema (``iop-fhir schema``) is generated
from them and ``docs/record.md`` describes them field by field. Shape rules (types, enums,
required fields, patterns) live here; rules that span fields or items (dates in order,
references that resolve, controlled-substance limits, assessment totals) live in
``validate.py`` so that all of them are reported at once with JSON pointers.

Identifiers: ``IopRecord.id`` (the episode) is unique within the program; every item id
(``prescriptions[].id``, ``sessions[].id``, ...) is unique within its record. Shared parties
(``care_team``, ``pharmacies``, ``providers``) use program-wide ids, because the same
psychiatrist or pharmacy serves many clients.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

RECORD_VERSION = "iop-record/1"

# --- small shared types -------------------------------------------------------------------

LocalId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9\-.]{1,64}$"),
    Field(description="Local identifier: letters, digits, '-' and '.', at most 64 (the FHIR id alphabet)."),
]
# Text must hold a visible character (FHIR strings may not be whitespace only) and no control
# characters other than tab, CR and LF (FHIR forbids them and XML cannot carry them).
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f]*[^\s\x00-\x1f][^\x00-\x08\x0b\x0c\x0e-\x1f]*$"
NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=4000, pattern=TEXT_PATTERN)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=TEXT_PATTERN)]


def _local_time(value: dt.time) -> dt.time:
    # FHIR ``time`` is a wall-clock time of day with no offset; an offset would be lost.
    if value.tzinfo is not None:
        raise ValueError("a time of day has no UTC offset (write 08:00:00, not 08:00:00Z)")
    return value


TimeOfDay = Annotated[dt.time, AfterValidator(_local_time)]


def _number(value: Decimal) -> int | float:
    # JSON numbers, not strings: integral values stay integers, others keep their digits.
    return int(value) if value == value.to_integral_value() else float(value)


Amount = Annotated[
    Decimal,
    Field(ge=0, max_digits=12, decimal_places=4),
    PlainSerializer(_number, when_used="json"),
    WithJsonSchema({"type": "number", "minimum": 0}),
]

Npi = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9]{10}$"),
    Field(description="National Provider Identifier: 10 digits with a valid Luhn check digit."),
]
DeaNumber = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Z]{2}[0-9]{7}$"),
    Field(description="DEA registration number: two letters and seven digits with its check digit."),
]
NcpdpId = Annotated[str, StringConstraints(pattern=r"^[0-9]{7}$"), Field(description="7-digit NCPDP Provider ID.")]
RxNormCode = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,8}$")]
Icd10Code = Annotated[str, StringConstraints(pattern=r"^[A-TV-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")]


class Model(BaseModel):
    """Base of every contract model: unknown fields are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_default=True)


class HumanName(Model):
    family: ShortText
    given: list[ShortText] = Field(min_length=1, max_length=5)
    prefix: ShortText | None = None
    suffix: ShortText | None = None


class Address(Model):
    lines: list[ShortText] = Field(min_length=1, max_length=4)
    city: ShortText
    state: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")] = Field(description="USPS state code")
    postal_code: Annotated[str, StringConstraints(pattern=r"^[0-9]{5}(-[0-9]{4})?$")]
    country: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")] = "US"


class Contact(Model):
    """How to reach someone: a phone number, an email address, or both (not neither)."""

    phone: Annotated[str, StringConstraints(pattern=r"^\+?[0-9 ()\-.]{7,20}$")] | None = None
    email: Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Contact:
        if self.phone is None and self.email is None:
            raise ValueError("a contact needs a phone or an email (leave contact out instead)")
        return self


class Period(Model):
    start: dt.date
    end: dt.date | None = None


class Quantity(Model):
    """A value with its UCUM unit (``mg``, ``mL``, ``{tbl}``, ``{Capsule}``, ``1``)."""

    value: Amount
    unit: Annotated[str, StringConstraints(min_length=1, max_length=30)]


# --- program and client ---------------------------------------------------------------------

LevelOfCare = Literal["IOP", "virtual-IOP", "hybrid-IOP", "PHP", "OP"]


Uri = Annotated[str, StringConstraints(pattern=r"^(https?://|urn:)\S+$", max_length=300)]


class Identifier(Model):
    system: Uri
    value: ShortText


class Program(Model):
    """The treating program (an Organization)."""

    id: LocalId = Field(description="Program slug; part of every identifier system the program mints.")
    name: ShortText
    level_of_care: LevelOfCare
    focus: Literal["mental-health", "substance-use", "co-occurring"] = Field(
        description="Whether the program treats substance-use disorders (42 CFR Part 2 applies) or not."
    )
    npi: Npi | None = None
    identifiers: list[Identifier] = Field(default_factory=list, max_length=10)
    identifier_system: Annotated[str, StringConstraints(pattern=r"^(https?://|urn:)\S+$")] | None = Field(
        default=None,
        description="Base URI for identifiers the program mints (MRNs, prescription ids, ...); "
        "default https://iop-fhir.org/fhir/sid/{program.id}.",
    )
    address: Address | None = None
    contact: Contact | None = None


AdministrativeSex = Literal["male", "female", "other", "unknown"]


class Client(Model):
    mrn: ShortText = Field(description="Medical record number within the program.")
    name: HumanName
    birth_date: dt.date
    sex: AdministrativeSex = Field(description="Administrative sex (FHIR Patient.gender).")
    gender_identity: ShortText | None = None
    contact: Contact | None = None
    address: Address | None = None


# --- enrolment ------------------------------------------------------------------------------


class Schedule(Model):
    days_per_week: int = Field(ge=1, le=7)
    hours_per_day: Amount = Field(gt=0, le=12)
    weeks: int = Field(ge=1, le=52)


class Enrolment(Model):
    """The episode of care (FHIR EpisodeOfCare)."""

    status: Literal["planned", "waitlist", "active", "onhold", "finished", "cancelled"]
    start: dt.date
    planned_end: dt.date | None = None
    actual_end: dt.date | None = None
    schedule: Schedule
    modality: Literal["in-person", "telehealth", "hybrid"]
    referral_source: ShortText | None = None


# --- diagnoses and care team ----------------------------------------------------------------


class Diagnosis(Model):
    id: LocalId
    code: Icd10Code = Field(description="ICD-10-CM code, with its dot (F33.1).")
    display: ShortText | None = None
    rank: Literal["primary", "secondary"]
    clinical_status: Literal["active", "recurrence", "relapse", "inactive", "remission", "resolved"] = "active"
    onset: dt.date | None = None


CareTeamRole = Literal["psychiatrist", "nurse-practitioner", "therapist", "case-manager", "nurse", "peer-specialist"]


class CareTeamMember(Model):
    """A clinician of the program (Practitioner + PractitionerRole; member of the CareTeam)."""

    id: LocalId
    role: CareTeamRole
    name: HumanName
    npi: Npi
    dea_number: DeaNumber | None = Field(default=None, description="Required to prescribe controlled substances.")
    contact: Contact | None = None


class Pharmacy(Model):
    id: LocalId
    name: ShortText
    ncpdp_id: NcpdpId
    npi: Npi | None = None
    kind: Literal["retail", "mail-order", "specialty", "opioid-treatment-program"] = "retail"
    address: Address | None = None
    contact: Contact | None = None


class Provider(Model):
    """Someone outside the program: aftercare provider, consent recipient, referrer."""

    id: LocalId
    kind: Literal["organization", "practitioner"]
    name: ShortText
    npi: Npi | None = None
    address: Address | None = None
    contact: Contact | None = None


# --- prescriptions and their reviews --------------------------------------------------------


class Medication(Model):
    rxnorm: RxNormCode = Field(description="RxNorm SCD or SBD code (the product, not the ingredient).")
    display: ShortText


class Timing(Model):
    """How often: ``frequency`` times per ``period`` ``period_unit`` (e.g. 2 per 1 d)."""

    frequency: int = Field(ge=1, le=24)
    period: Amount = Field(gt=0)
    period_unit: Literal["h", "d", "wk", "mo"]
    times_of_day: list[TimeOfDay] = Field(default_factory=list, max_length=8)


DeaSchedule = Literal["II", "III", "IV", "V"]
PrescriptionStatus = Literal["active", "on-hold", "cancelled", "completed", "stopped", "draft", "entered-in-error"]


class Prescription(Model):
    """One medication order (FHIR MedicationRequest)."""

    id: LocalId
    medication: Medication
    dose: Quantity
    route: Literal["oral", "sublingual", "buccal", "intramuscular", "subcutaneous", "nasal", "transdermal"]
    timing: Timing
    as_needed: bool = False
    as_needed_reason: ShortText | None = None
    written: dt.date = Field(description="Date the prescription was written (authoredOn).")
    start: dt.date
    end: dt.date | None = None
    quantity: Quantity = Field(description="Quantity to dispense per fill.")
    days_supply: int = Field(ge=1, le=365)
    refills: int = Field(ge=0, le=99)
    substitution_allowed: bool = True
    prescriber_id: LocalId = Field(description="A care_team member id.")
    pharmacy_id: LocalId | None = Field(default=None, description="A pharmacies id.")
    dea_schedule: DeaSchedule | None = None
    mat: bool = Field(description="Medication-assisted treatment for a substance-use disorder.")
    indication_id: LocalId | None = Field(default=None, description="A diagnoses id: why it is prescribed.")
    instructions: NonEmpty | None = Field(default=None, description="Sig text for the patient.")
    status: PrescriptionStatus = "active"
    status_reason: ShortText | None = Field(default=None, description="Why it was stopped, held or cancelled.")
    setting: Literal["community", "outpatient", "discharge"] = Field(
        default="community",
        description="community: taken at home; outpatient: given in session (observed dosing, injection); "
        "discharge: written at discharge.",
    )
    course: Literal["continuous", "acute", "seasonal"] = "continuous"
    replaces_id: LocalId | None = Field(default=None, description="The prescription this one replaces (a dose change or switch).")


ReviewAction = Literal["start", "continue", "increase", "decrease", "switch", "hold", "stop"]


class MedicationReview(Model):
    id: LocalId
    date: dt.date
    prescription_id: LocalId
    action: ReviewAction
    reason: NonEmpty | None = None
    new_dose: Quantity | None = None
    new_prescription_id: LocalId | None = Field(
        default=None, description="For increase/decrease/switch: the prescription the change produced."
    )
    reviewer_id: LocalId


class AdherenceEvent(Model):
    id: LocalId
    date: dt.date
    prescription_id: LocalId
    status: Literal["taken", "missed", "partial"]
    source: Literal["self-report", "pill-count", "pharmacy-fill", "observed-dosing"]
    note: NonEmpty | None = None


class SideEffect(Model):
    id: LocalId
    date: dt.date
    prescription_id: LocalId
    effect: ShortText
    snomed: Annotated[str, StringConstraints(pattern=r"^[0-9]{6,18}$")] | None = None
    severity: Literal["mild", "moderate", "severe"]
    action_taken: Literal["none", "monitor", "dose-reduced", "held", "stopped", "switched", "treated"]


# --- measurements ---------------------------------------------------------------------------

Instrument = Literal["PHQ-9", "PHQ-2", "GAD-7", "AUDIT-C", "DAST-10", "C-SSRS-screen"]


class AssessmentItem(Model):
    number: int = Field(ge=1, le=10, description="1-based item number in the instrument's order.")
    score: int = Field(ge=0, le=4, description="Item score (0-3 PHQ/GAD, 0-4 AUDIT-C, 0/1 DAST-10 and C-SSRS yes/no).")


class Assessment(Model):
    id: LocalId
    instrument: Instrument
    date: AwareDatetime
    items: list[AssessmentItem] = Field(default_factory=list, max_length=10)
    total: int = Field(ge=0, le=27, description="Sum of the scored items; for the C-SSRS screen, the number of yes answers.")
    severity: Annotated[str, StringConstraints(pattern=r"^[a-z\-]{1,30}$")] = Field(
        description="The instrument's severity band for the total (docs/record.md lists them)."
    )
    performer_id: LocalId | None = None


Analyte = Literal[
    "buprenorphine", "norbuprenorphine", "opiates", "fentanyl", "norfentanyl", "methadone", "eddp",
    "amphetamines", "cocaine", "benzodiazepines", "cannabinoids", "ethyl-glucuronide",
]


class DrugScreenResult(Model):
    analyte: Analyte
    result: Literal["positive", "negative", "inconclusive"]
    expected: bool = Field(description="Whether this result was expected given the prescriptions active that day.")


class DrugScreen(Model):
    id: LocalId
    collected: AwareDatetime
    specimen: Literal["urine"] = "urine"
    method: Literal["screen", "confirmatory"] = "screen"
    results: list[DrugScreenResult] = Field(min_length=1, max_length=12)


class Vital(Model):
    id: LocalId
    date: AwareDatetime
    kind: Literal["body-weight", "heart-rate", "body-height", "bmi", "blood-pressure"]
    value: Amount | None = Field(default=None, description="The value; for blood-pressure use systolic/diastolic.")
    systolic: Amount | None = None
    diastolic: Amount | None = None
    unit: Annotated[str, StringConstraints(min_length=1, max_length=20)]


class DrugLevel(Model):
    id: LocalId
    date: AwareDatetime
    analyte: Literal["lithium", "valproate", "valproate-free"]
    value: Amount
    unit: Literal["mmol/L", "ug/mL"]
    trough: bool = False
    prescription_id: LocalId | None = None


# --- sessions and plans ---------------------------------------------------------------------

SessionKind = Literal["group", "individual", "family", "psychoeducation", "medication-management"]


class Session(Model):
    id: LocalId
    start: AwareDatetime
    kind: SessionKind
    attendance: Literal["attended", "no-show", "cancelled"]
    minutes: int = Field(ge=0, le=600)
    telehealth: bool = False
    clinician_id: LocalId | None = None


class GoalTarget(Model):
    """A measurable target, e.g. PHQ-9 total below 10 by a date."""

    measure: Instrument
    comparator: Literal["<", "<=", ">=", ">"]
    value: int = Field(ge=0, le=27)
    due: dt.date | None = None


class Goal(Model):
    id: LocalId
    description: NonEmpty
    status: Literal["proposed", "active", "on-hold", "completed", "cancelled"] = "active"
    achievement: Literal["in-progress", "improving", "worsening", "no-change", "achieved", "not-achieved"] | None = None
    target: GoalTarget | None = None
    addresses_ids: list[LocalId] = Field(default_factory=list, description="diagnoses ids this goal serves.")


class Activity(Model):
    """A planned recurring activity, e.g. group therapy 3 h x 4 days a week."""

    id: LocalId
    kind: Literal["group", "individual", "family", "psychoeducation", "medication-management", "relapse-prevention", "drug-screening"]
    description: NonEmpty
    days_per_week: int | None = Field(default=None, ge=1, le=7)
    minutes_per_session: int | None = Field(default=None, ge=1, le=600)
    status: Literal["not-started", "scheduled", "in-progress", "on-hold", "completed", "cancelled", "stopped"] = "scheduled"
    goal_ids: list[LocalId] = Field(default_factory=list)


class CarePlan(Model):
    id: LocalId
    status: Literal["draft", "active", "on-hold", "revoked", "completed"]
    created: dt.date
    period: Period
    addresses_ids: list[LocalId] = Field(default_factory=list, description="diagnoses ids the plan addresses.")
    goals: list[Goal] = Field(default_factory=list, max_length=50)
    activities: list[Activity] = Field(default_factory=list, max_length=50)
    relapse_prevention: list[NonEmpty] = Field(default_factory=list, max_length=50, description="Triggers, coping strategies, supports.")
    summary: NonEmpty | None = Field(default=None, description="Narrative assessment and plan.")
    author_id: LocalId | None = None


class DischargeMedication(Model):
    prescription_id: LocalId
    disposition: Literal["continue", "changed", "stopped"]
    note: NonEmpty | None = None


class Aftercare(Model):
    id: LocalId = Field(description="Id of the aftercare plan.")
    next_level_of_care: Literal["OP", "IOP", "PHP", "inpatient", "residential", "primary-care", "none"]
    receiving_provider_id: LocalId | None = Field(default=None, description="A providers id.")
    first_follow_up: dt.date | None = None
    pharmacy_id: LocalId | None = None
    medications: list[DischargeMedication] = Field(default_factory=list, max_length=100)
    instructions: NonEmpty | None = None


class Discharge(Model):
    date: dt.date
    disposition: Literal["completed", "stepped-down", "stepped-up-php", "stepped-up-inpatient", "left-against-advice", "administrative"]
    summary: NonEmpty | None = None
    aftercare: Aftercare | None = None


DataCategory = Literal[
    "demographics", "diagnoses", "medications", "assessments", "drug-screens", "vitals", "sessions", "care-plan", "discharge", "all"
]
PurposeOfUse = Literal["TREAT", "ETREAT", "COC", "HPAYMT", "HOPERAT", "PATRQT", "PUBHLTH", "HRESCH"]


class Consent(Model):
    id: LocalId
    recipient_id: LocalId = Field(description="A providers or pharmacies id: who may receive the data.")
    purpose: PurposeOfUse
    categories: list[DataCategory] = Field(min_length=1, max_length=10)
    period: Period
    part2: bool = Field(description="A written consent under 42 CFR Part 2 (needed to disclose substance-use records).")
    signed: dt.date
    revoked_on: dt.date | None = None


# --- the record -----------------------------------------------------------------------------


class IopRecord(Model):
    """One client's episode in one program."""

    version: Literal["iop-record/1"] = Field(default=RECORD_VERSION, description="Contract version.")
    id: LocalId = Field(description="Episode id, unique within the program.")
    program: Program
    client: Client
    enrolment: Enrolment
    diagnoses: list[Diagnosis] = Field(default_factory=list, max_length=50)
    care_team: list[CareTeamMember] = Field(default_factory=list, max_length=50)
    pharmacies: list[Pharmacy] = Field(default_factory=list, max_length=20)
    providers: list[Provider] = Field(default_factory=list, max_length=50)
    prescriptions: list[Prescription] = Field(default_factory=list, max_length=500)
    medication_reviews: list[MedicationReview] = Field(default_factory=list, max_length=1000)
    adherence: list[AdherenceEvent] = Field(default_factory=list, max_length=5000)
    side_effects: list[SideEffect] = Field(default_factory=list, max_length=500)
    assessments: list[Assessment] = Field(default_factory=list, max_length=500)
    drug_screens: list[DrugScreen] = Field(default_factory=list, max_length=500)
    vitals: list[Vital] = Field(default_factory=list, max_length=1000)
    drug_levels: list[DrugLevel] = Field(default_factory=list, max_length=500)
    sessions: list[Session] = Field(default_factory=list, max_length=1000)
    care_plan: CarePlan | None = None
    discharge: Discharge | None = None
    consents: list[Consent] = Field(default_factory=list, max_length=100)
