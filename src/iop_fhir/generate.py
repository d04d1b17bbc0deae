"""Deterministic synthetic IOP cohort: realistic ``iop-record/1`` records for demos, tests and benchmarks.

``generate_record(index, seed)`` builds one client's episode; ``generate_cohort(n, seed)`` yields
records ``0 .. n-1`` lazily. Every record is JSON-ready, in exactly the form
``IopRecord.model_dump(mode="json", exclude_none=True)`` gives (defaults included, ``None`` left out,
keys in contract order), and passes ``validate_record``.

Design
------
* **One record, one random stream.** Each record draws only from ``random.Random(f"{seed}:{index}")``
  (string seeds hash with SHA-512, so the stream is stable across runs and processes and does not
  depend on ``PYTHONHASHSEED``). Records can therefore be generated in any order, in parallel, or one
  at a time while streaming; no clock, no I/O, no state between calls. Identifiers that must be unique
  across a cohort (record id, MRN) are derived from ``index`` rather than drawn, so they cannot collide.
* **A small fixed world.** Three synthetic programs (a co-occurring IOP in Portland, a substance-use IOP
  in Chicago, a virtual mental-health IOP in Worcester) each with a care team, pharmacies (retail, a
  specialty pharmacy for injectables, an opioid-treatment-program dispensary for methadone) and external
  providers (aftercare clinics, PHP, hospital, residential, primary care). They are immutable module
  constants; each record gets fresh dict copies of the parties it references, with program-wide ids, so
  the same psychiatrist or pharmacy appears identically across records. NPIs carry a valid Luhn check
  digit and DEA numbers a valid check digit, both computed here from a 9- or 6-digit base.
* **The episode is simulated, not sampled field by field.** Choices flow in clinical order so that the
  parts agree with each other: client type (mental-health only ~45 %, substance-use only ~20 %, dual
  ~35 %) -> program whose ``focus`` admits that client -> diagnoses -> risk profile (suicidal ideation,
  adherence, lapse propensity) -> disposition and symptom trajectory -> calendar of program days ->
  sessions with attendance -> medication plan and weekly reviews held at the attended
  medication-management visits -> adherence, side effects, drug levels -> assessments, urine drug
  screens (results derived from the prescriptions active that day), vitals -> care plan (goal
  achievement from the scores) -> discharge and aftercare (medication dispositions from the final
  prescription statuses) -> consents.
* **Terminology comes from the tables.** Medications, their DEA schedule and MAT flag, ICD-10-CM
  displays, instrument item counts and severity bands, and which drug-screen analytes a prescribed
  ingredient explains are all read through ``iop_fhir.terminology``; nothing clinical is coded twice.
  The few SNOMED CT side-effect codes used here are not in the tables (see ``_EFFECTS``).
* **Rules are honoured by construction** (Schedule II: no refills; III-IV: at most 5 refills and an end
  within 6 months of writing; a dose change is a new prescription that ``replaces_id`` the old one,
  which is stopped; every dated item lies inside the episode window; ...), and the unit tests
  validate hundreds of records to prove it.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from iop_fhir import terminology
from iop_fhir.record.model import RECORD_VERSION
from iop_fhir.record.validate import add_months

__all__ = ["generate_cohort", "generate_record"]

Json = dict[str, Any]

# Episodes start between these dates ("start dates spread over 2025-2026"); the last start leaves room
# for an eight-week episode to finish inside 2026.
_FIRST_START: Final = dt.date(2025, 1, 6)
_LAST_START: Final = dt.date(2026, 10, 30)


# --- check digits ----------------------------------------------------------------------------


def npi_with_check_digit(base9: str) -> str:
    """Append the Luhn check digit (over the ``80840`` card-issuer prefix) to a 9-digit NPI base.

    The same rule ``validate.npi_is_valid`` checks; synthetic NPIs must pass it or every record
    carrying them would be rejected.
    """
    if len(base9) != 9 or not base9.isdigit():
        raise ValueError(f"an NPI base is 9 digits, got {base9!r}")
    total = 0
    for i, digit in enumerate(reversed([int(c) for c in "80840" + base9])):
        if i % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return base9 + str((10 - total % 10) % 10)


def dea_with_check_digit(letters: str, base6: str) -> str:
    """A DEA registration number: two letters, six digits and the check digit.

    Check digit: last digit of (d1 + d3 + d5) + 2 * (d2 + d4 + d6). The first letter is the registrant
    type (``B`` hospital/clinic practitioner, ``M`` mid-level practitioner such as a nurse
    practitioner), the second the initial of the registrant's last name.
    """
    d = [int(c) for c in base6]
    check = (d[0] + d[2] + d[4] + 2 * (d[1] + d[3] + d[5])) % 10
    return f"{letters}{base6}{check}"


# --- time -----------------------------------------------------------------------------------

# Fixed-offset zones, built once; dt.timezone objects are immutable.
_ZONES: Final = MappingProxyType({h: dt.timezone(dt.timedelta(hours=h)) for h in range(-10, -3)})


def _local_zone(day: dt.date, standard_hours: int) -> dt.timezone:
    """The US civil UTC offset on ``day``: DST from the second Sunday of March to the first Sunday of
    November. Computed rather than read from the tz database, so output never depends on the host's
    tzdata; sessions happen by day, far from the 2 a.m. switch.
    """
    march8 = dt.date(day.year, 3, 8)
    nov1 = dt.date(day.year, 11, 1)
    dst_start = march8 + dt.timedelta(days=(6 - march8.weekday()) % 7)
    dst_end = nov1 + dt.timedelta(days=(6 - nov1.weekday()) % 7)
    return _ZONES[standard_hours + (1 if dst_start <= day < dst_end else 0)]


def _hm(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def _days(n: int) -> dt.timedelta:
    return dt.timedelta(days=n)


def _num(value: float) -> int | float:
    """A JSON number as the contract's ``Amount`` serializes it: integral values as int, else at most
    4 decimals (``Amount`` allows 4, and float noise such as 0.30000000000000004 would fail it)."""
    rounded = round(float(value), 4)
    return int(rounded) if rounded == int(rounded) else rounded


def _pick(rng: random.Random, weighted: Sequence[tuple[Any, float]]) -> Any:
    values = [v for v, _ in weighted]
    weights = [w for _, w in weighted]
    return rng.choices(values, weights)[0]


def _quantity(value: float, unit: str) -> Json:
    return {"value": _num(value), "unit": unit}


# --- the fixed world: programs, clinicians, pharmacies, providers -----------------------------


@dataclass(frozen=True)
class _Locality:
    city: str
    state: str
    postal_code: str
    area_code: str


@dataclass(frozen=True)
class _Clinician:
    id: str
    role: str
    given: str
    family: str
    suffix: str | None
    npi_base: str
    dea: tuple[str, str] | None = None  # (letters, six digits) when registered to prescribe controlled drugs
    prefix: str | None = None

    def to_json(self, email_domain: str) -> Json:
        name: Json = {"family": self.family, "given": [self.given]}
        if self.prefix:
            name["prefix"] = self.prefix
        if self.suffix:
            name["suffix"] = self.suffix
        member: Json = {"id": self.id, "role": self.role, "name": name, "npi": npi_with_check_digit(self.npi_base)}
        if self.dea:
            member["dea_number"] = dea_with_check_digit(*self.dea)
        local = f"{self.given}.{self.family}".lower().replace("'", "").replace(" ", "")
        member["contact"] = {"email": f"{local}@{email_domain}"}
        return member


@dataclass(frozen=True)
class _PharmacySite:
    id: str
    name: str
    ncpdp_id: str
    npi_base: str
    kind: str
    street: str
    locality: _Locality
    phone: str

    def to_json(self) -> Json:
        return {
            "id": self.id,
            "name": self.name,
            "ncpdp_id": self.ncpdp_id,
            "npi": npi_with_check_digit(self.npi_base),
            "kind": self.kind,
            "address": _address_json([self.street], self.locality),
            "contact": {"phone": self.phone},
        }


@dataclass(frozen=True)
class _ExternalProvider:
    id: str
    kind: str  # organization | practitioner
    name: str
    npi_base: str
    levels: tuple[str, ...]  # next levels of care it can receive: OP, PHP, inpatient, residential, primary-care
    treats_sud: bool
    treats_mh: bool
    street: str
    locality: _Locality
    phone: str

    def to_json(self) -> Json:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "npi": npi_with_check_digit(self.npi_base),
            "address": _address_json([self.street], self.locality),
            "contact": {"phone": self.phone},
        }


@dataclass(frozen=True)
class _Site:
    """One program and everything shared by its clients."""

    id: str
    name: str
    level_of_care: str
    focus: str
    npi_base: str
    tin: str
    street: str
    locality: _Locality
    phone: str
    email_domain: str
    standard_utc_offset: int
    mrn_prefix: str
    modalities: tuple[tuple[str, float], ...]
    localities: tuple[_Locality, ...]
    clinicians: tuple[_Clinician, ...]
    pharmacies: tuple[_PharmacySite, ...]
    providers: tuple[_ExternalProvider, ...]
    referral_sources: tuple[str, ...]

    def program_json(self) -> Json:
        return {
            "id": self.id,
            "name": self.name,
            "level_of_care": self.level_of_care,
            "focus": self.focus,
            "npi": npi_with_check_digit(self.npi_base),
            # EIN/TIN under its HL7 OID: a second identifier, as billing-capable programs have.
            "identifiers": [{"system": "urn:oid:2.16.840.1.113883.4.4", "value": self.tin}],
            "address": _address_json([self.street], self.locality),
            "contact": {"phone": self.phone, "email": f"intake@{self.email_domain}"},
        }

    def by_role(self, role: str) -> list[_Clinician]:
        return [c for c in self.clinicians if c.role == role]

    def pharmacies_of(self, kind: str) -> list[_PharmacySite]:
        return [p for p in self.pharmacies if p.kind == kind]


def _address_json(lines: list[str], where: _Locality) -> Json:
    return {"lines": lines, "city": where.city, "state": where.state, "postal_code": where.postal_code, "country": "US"}


_PDX = _Locality("Portland", "OR", "97232", "503")
_CHI = _Locality("Chicago", "IL", "60614", "312")
_WOR = _Locality("Worcester", "MA", "01608", "508")

# NCPDP ids start with the state's NCPDP code (OR 38, IL 14, MA 22) as real ones do.
_SITES: Final[tuple[_Site, ...]] = (
    _Site(
        id="riverbend-iop",
        name="Riverbend Behavioral Health Intensive Outpatient Program",
        level_of_care="IOP",
        focus="co-occurring",
        npi_base="153829104",
        tin="93-4821706",
        street="2150 NE Broadway St",
        locality=_PDX,
        phone="(503) 555-0110",
        email_domain="riverbend-bh.example.org",
        standard_utc_offset=-8,
        mrn_prefix="RB",
        modalities=(("in-person", 0.6), ("hybrid", 0.28), ("telehealth", 0.12)),
        localities=(
            _Locality("Portland", "OR", "97202", "503"),
            _Locality("Portland", "OR", "97206", "971"),
            _Locality("Portland", "OR", "97211", "503"),
            _Locality("Portland", "OR", "97217", "503"),
            _Locality("Gresham", "OR", "97030", "503"),
            _Locality("Beaverton", "OR", "97005", "971"),
            _Locality("Milwaukie", "OR", "97222", "503"),
            _Locality("Vancouver", "WA", "98661", "360"),
        ),
        clinicians=(
            _Clinician("rb-md-okafor", "psychiatrist", "Amara", "Okafor", "MD", "164820935", ("BO", "482913"), "Dr."),
            _Clinician("rb-np-reyes", "nurse-practitioner", "Daniel", "Reyes", "PMHNP-BC", "172940386", ("MR", "730418")),
            _Clinician("rb-th-lindqvist", "therapist", "Hannah", "Lindqvist", "LCSW", "181736204"),
            _Clinician("rb-th-bell", "therapist", "Marcus", "Bell", "LPC", "139578026"),
            _Clinician("rb-th-natarajan", "therapist", "Priya", "Natarajan", "LMFT", "120486753"),
            _Clinician("rb-cm-morgan", "case-manager", "Tessa", "Morgan", "QMHA", "145093871"),
            _Clinician("rb-rn-kim", "nurse", "Grace", "Kim", "RN", "190364528"),
            _Clinician("rb-ps-ortega", "peer-specialist", "Luis", "Ortega", "CRM", "158402716"),
        ),
        pharmacies=(
            _PharmacySite("ph-rb-hawthorne", "Hawthorne Community Pharmacy", "3812746", "148203957", "retail",
                          "3620 SE Hawthorne Blvd", _Locality("Portland", "OR", "97214", "503"), "(503) 555-0131"),
            _PharmacySite("ph-rb-sellwood", "Sellwood Family Pharmacy", "3820519", "159374026", "retail",
                          "7805 SE 13th Ave", _Locality("Portland", "OR", "97202", "503"), "(503) 555-0132"),
            _PharmacySite("ph-rb-gresham", "Gresham Main Street Pharmacy", "3807241", "163028475", "retail",
                          "118 N Main Ave", _Locality("Gresham", "OR", "97030", "503"), "(503) 555-0133"),
            _PharmacySite("ph-rb-cascadia", "Cascadia Specialty Pharmacy", "3831650", "170493862", "specialty",
                          "4400 NE Halsey St", _Locality("Portland", "OR", "97213", "971"), "(971) 555-0134"),
            _PharmacySite("ph-rb-burnside-otp", "Burnside Opioid Treatment Program Dispensary", "3829904", "182649307",
                          "opioid-treatment-program", "1020 E Burnside St", _Locality("Portland", "OR", "97214", "503"),
                          "(503) 555-0135"),
        ),
        providers=(
            _ExternalProvider("prv-rb-willamette", "organization", "Willamette Counseling Associates", "113820574",
                              ("OP",), True, True, "900 SW 5th Ave Suite 300", _Locality("Portland", "OR", "97204", "503"),
                              "(503) 555-0141"),
            _ExternalProvider("prv-rb-eastside", "organization", "Eastside Community Mental Health Clinic", "124093856",
                              ("OP",), False, True, "10330 SE Division St", _Locality("Portland", "OR", "97266", "503"),
                              "(503) 555-0142"),
            _ExternalProvider("prv-rb-cascade", "organization", "Cascade Recovery Outpatient Services", "135720918",
                              ("OP",), True, False, "5200 N Lombard St", _Locality("Portland", "OR", "97203", "971"),
                              "(971) 555-0143"),
            _ExternalProvider("prv-rb-columbia-php", "organization", "Columbia Ridge Partial Hospitalization Program",
                              "146381029", ("PHP",), True, True, "2801 N Gantenbein Ave", _Locality("Portland", "OR", "97227", "503"),
                              "(503) 555-0144"),
            _ExternalProvider("prv-rb-tabor", "organization", "Mount Tabor Behavioral Health Hospital", "157204863",
                              ("inpatient",), True, True, "6040 SE Belmont St", _Locality("Portland", "OR", "97215", "503"),
                              "(503) 555-0145"),
            _ExternalProvider("prv-rb-laurelhurst", "organization", "Laurelhurst Residential Recovery Center", "168539201",
                              ("residential",), True, False, "3721 NE Glisan St", _Locality("Portland", "OR", "97232", "503"),
                              "(503) 555-0146"),
            _ExternalProvider("prv-rb-fitzgerald", "practitioner", "Nora Fitzgerald, MD (Family Medicine)", "179240385",
                              ("primary-care",), True, True, "1515 NE 41st Ave", _Locality("Portland", "OR", "97232", "503"),
                              "(503) 555-0147"),
        ),
        referral_sources=(
            "Primary care physician", "Emergency department", "Inpatient psychiatric unit (step-down)",
            "Withdrawal management program", "Self-referral", "Outpatient therapist", "Employee assistance program",
        ),
    ),
    _Site(
        id="lakeshore-recovery-iop",
        name="Lakeshore Recovery Center Intensive Outpatient Program",
        level_of_care="IOP",
        focus="substance-use",
        npi_base="128465390",
        tin="36-7150248",
        street="2740 N Clark St",
        locality=_CHI,
        phone="(312) 555-0120",
        email_domain="lakeshore-recovery.example.org",
        standard_utc_offset=-6,
        mrn_prefix="LR",
        modalities=(("in-person", 0.72), ("hybrid", 0.23), ("telehealth", 0.05)),
        localities=(
            _Locality("Chicago", "IL", "60614", "312"),
            _Locality("Chicago", "IL", "60618", "773"),
            _Locality("Chicago", "IL", "60625", "773"),
            _Locality("Chicago", "IL", "60647", "872"),
            _Locality("Evanston", "IL", "60201", "847"),
            _Locality("Oak Park", "IL", "60302", "708"),
            _Locality("Cicero", "IL", "60804", "708"),
            _Locality("Hammond", "IN", "46320", "219"),
        ),
        clinicians=(
            _Clinician("ls-md-adeyemi", "psychiatrist", "Samuel", "Adeyemi", "MD", "193047562", ("BA", "615204"), "Dr."),
            _Clinician("ls-np-novak", "nurse-practitioner", "Rachel", "Novak", "PMHNP-BC", "104862937", ("MN", "294731")),
            _Clinician("ls-th-obrien", "therapist", "Kevin", "O'Brien", "LCPC, CADC", "115739204"),
            _Clinician("ls-th-rahman", "therapist", "Aisha", "Rahman", "LCSW", "126940385"),
            _Clinician("ls-th-kowalski", "therapist", "Anna", "Kowalski", "LMFT", "137205849"),
            _Clinician("ls-cm-davis", "case-manager", "Monique", "Davis", "CADC", "148391026"),
            _Clinician("ls-rn-chen", "nurse", "Olivia", "Chen", "RN", "159602734"),
            _Clinician("ls-ps-wright", "peer-specialist", "Jamal", "Wright", "CPRS", "160374928"),
        ),
        pharmacies=(
            _PharmacySite("ph-ls-lincoln", "Lincoln Square Pharmacy", "1438205", "171930462", "retail",
                          "4753 N Lincoln Ave", _Locality("Chicago", "IL", "60625", "773"), "(773) 555-0151"),
            _PharmacySite("ph-ls-logan", "Logan Boulevard Pharmacy", "1427391", "182047596", "retail",
                          "2600 N Milwaukee Ave", _Locality("Chicago", "IL", "60647", "773"), "(773) 555-0152"),
            _PharmacySite("ph-ls-oakpark", "Oak Park Avenue Pharmacy", "1419864", "193574028", "retail",
                          "1042 Lake St", _Locality("Oak Park", "IL", "60301", "708"), "(708) 555-0153"),
            _PharmacySite("ph-ls-midwest", "Midwest Specialty Pharmacy", "1450729", "104638295", "specialty",
                          "225 W Wacker Dr", _Locality("Chicago", "IL", "60606", "312"), "(312) 555-0154"),
            _PharmacySite("ph-ls-otp", "Lakeshore Methadone Clinic Dispensary", "1446017", "115284730",
                          "opioid-treatment-program", "2744 N Clark St", _Locality("Chicago", "IL", "60614", "312"),
                          "(312) 555-0155"),
        ),
        providers=(
            _ExternalProvider("prv-ls-lincolnpark", "organization", "Lincoln Park Outpatient Recovery", "126093847",
                              ("OP",), True, False, "2433 N Lincoln Ave", _Locality("Chicago", "IL", "60614", "773"),
                              "(773) 555-0161"),
            _ExternalProvider("prv-ls-northside", "organization", "Northside Behavioral Health Clinic", "137482093",
                              ("OP",), True, True, "5050 N Broadway", _Locality("Chicago", "IL", "60640", "773"),
                              "(773) 555-0162"),
            _ExternalProvider("prv-ls-ravenswood", "organization", "Ravenswood Office-Based Addiction Treatment", "148205936",
                              ("OP",), True, False, "4520 N Ravenswood Ave", _Locality("Chicago", "IL", "60640", "773"),
                              "(773) 555-0163"),
            _ExternalProvider("prv-ls-midway", "organization", "Midway Partial Hospital Program", "159630284",
                              ("PHP",), True, True, "6300 S Cicero Ave", _Locality("Chicago", "IL", "60638", "773"),
                              "(773) 555-0164"),
            _ExternalProvider("prv-ls-lakefront", "organization", "Lakefront Behavioral Hospital", "160947352",
                              ("inpatient",), True, True, "4840 N Marine Dr", _Locality("Chicago", "IL", "60640", "773"),
                              "(773) 555-0165"),
            _ExternalProvider("prv-ls-prairie", "organization", "Prairie House Residential Treatment", "171208463",
                              ("residential",), True, False, "1200 S Harlem Ave", _Locality("Berwyn", "IL", "60402", "708"),
                              "(708) 555-0166"),
            _ExternalProvider("prv-ls-alvarez", "practitioner", "Victor Alvarez, MD (Internal Medicine)", "182539704",
                              ("primary-care",), True, True, "3000 N Halsted St", _Locality("Chicago", "IL", "60657", "773"),
                              "(773) 555-0167"),
        ),
        referral_sources=(
            "Withdrawal management program", "Emergency department", "Primary care physician", "Self-referral",
            "Drug court", "Family member", "Employee assistance program",
        ),
    ),
    _Site(
        id="cedar-grove-virtual-iop",
        name="Cedar Grove Virtual Mental Health IOP",
        level_of_care="virtual-IOP",
        focus="mental-health",
        npi_base="139027465",
        tin="04-6283917",
        street="100 Front St Suite 1200",
        locality=_WOR,
        phone="(508) 555-0170",
        email_domain="cedargrove-health.example.org",
        standard_utc_offset=-5,
        mrn_prefix="CG",
        modalities=(("telehealth", 1.0),),
        localities=(
            _Locality("Worcester", "MA", "01602", "508"),
            _Locality("Worcester", "MA", "01605", "774"),
            _Locality("Shrewsbury", "MA", "01545", "508"),
            _Locality("Framingham", "MA", "01702", "508"),
            _Locality("Springfield", "MA", "01103", "413"),
            _Locality("Boston", "MA", "02130", "617"),
            _Locality("Lowell", "MA", "01852", "978"),
        ),
        clinicians=(
            _Clinician("cg-md-petrova", "psychiatrist", "Elena", "Petrova", "MD", "142093857", ("BP", "538120"), "Dr."),
            _Clinician("cg-np-whitfield", "nurse-practitioner", "Sarah", "Whitfield", "PMHNP-BC", "153847209", ("MW", "847362")),
            _Clinician("cg-th-ellis", "therapist", "Jordan", "Ellis", "LICSW", "164920385"),
            _Clinician("cg-th-goldberg", "therapist", "Maya", "Goldberg", "LMHC", "175038249"),
            _Clinician("cg-th-torres", "therapist", "Benjamin", "Torres", "LMFT", "186204937"),
            _Clinician("cg-cm-brennan", "case-manager", "Kelly", "Brennan", None, "197305842"),
            _Clinician("cg-rn-doyle", "nurse", "Patrick", "Doyle", "RN", "108463925"),
        ),
        pharmacies=(
            _PharmacySite("ph-cg-elm", "Elm Street Pharmacy", "2230418", "119572046", "retail",
                          "350 Elm St", _Locality("Worcester", "MA", "01609", "508"), "(508) 555-0181"),
            _PharmacySite("ph-cg-shrewsbury", "Shrewsbury Center Pharmacy", "2241907", "120684395", "retail",
                          "585 Boston Turnpike", _Locality("Shrewsbury", "MA", "01545", "508"), "(508) 555-0182"),
            _PharmacySite("ph-cg-pioneer", "Pioneer Valley Pharmacy", "2226583", "131705248", "retail",
                          "1655 Main St", _Locality("Springfield", "MA", "01103", "413"), "(413) 555-0183"),
            _PharmacySite("ph-cg-baystate-mail", "Bay State Mail-Order Pharmacy", "2253076", "142816039", "mail-order",
                          "40 Shattuck Rd", _Locality("Andover", "MA", "01810", "978"), "(978) 555-0184"),
        ),
        providers=(
            _ExternalProvider("prv-cg-blackstone", "organization", "Blackstone Valley Counseling Center", "153920476",
                              ("OP",), False, True, "44 Pleasant St", _Locality("Worcester", "MA", "01609", "508"),
                              "(508) 555-0191"),
            _ExternalProvider("prv-cg-quinsigamond", "organization", "Quinsigamond Psychiatric Associates", "164037285",
                              ("OP",), False, True, "277 Lincoln St", _Locality("Worcester", "MA", "01605", "508"),
                              "(508) 555-0192"),
            _ExternalProvider("prv-cg-elmpark", "organization", "Elm Park Partial Hospitalization Program", "175148392",
                              ("PHP",), False, True, "20 Institute Rd", _Locality("Worcester", "MA", "01609", "508"),
                              "(508) 555-0193"),
            _ExternalProvider("prv-cg-greendale", "organization", "Greendale Behavioral Hospital", "186259403",
                              ("inpatient",), False, True, "500 W Boylston St", _Locality("Worcester", "MA", "01606", "508"),
                              "(508) 555-0194"),
            _ExternalProvider("prv-cg-becker", "practitioner", "Hannah Becker, DO (Family Medicine)", "197360512",
                              ("primary-care",), False, True, "123 Summer St", _Locality("Worcester", "MA", "01608", "508"),
                              "(508) 555-0195"),
        ),
        referral_sources=(
            "Primary care physician", "Outpatient therapist", "Emergency department",
            "Inpatient psychiatric unit (step-down)", "Self-referral", "Employee assistance program",
        ),
    ),
)
_SITE_BY_ID: Final = MappingProxyType({s.id: s for s in _SITES})

# Which programs admit which clients: the program's focus must fit the client (a mental-health-only
# program cannot hold Part 2 substance-use records), weighted so that each program gets a sensible mix.
_PROGRAMS_FOR: Final = MappingProxyType({
    "mh": (("cedar-grove-virtual-iop", 0.55), ("riverbend-iop", 0.45)),
    "sud": (("lakeshore-recovery-iop", 0.65), ("riverbend-iop", 0.35)),
    "dual": (("riverbend-iop", 0.65), ("lakeshore-recovery-iop", 0.35)),
})


# --- people ---------------------------------------------------------------------------------

_GIVEN_FEMALE: Final = (
    "Olivia", "Emma", "Ava", "Sophia", "Isabella", "Mia", "Amelia", "Harper", "Evelyn", "Abigail", "Emily", "Ella",
    "Madison", "Scarlett", "Grace", "Chloe", "Camila", "Aria", "Layla", "Zoe", "Nora", "Hannah", "Lily", "Maria",
    "Jasmine", "Aaliyah", "Ximena", "Mei", "Priya", "Fatima", "Keisha", "Rosa", "Danielle", "Tanya", "Brianna",
    "Megan", "Kimberly", "Latoya", "Yesenia", "Ingrid",
)
_GIVEN_MALE: Final = (
    "Liam", "Noah", "Oliver", "Elijah", "James", "William", "Benjamin", "Lucas", "Henry", "Alexander", "Mason",
    "Michael", "Ethan", "Daniel", "Jacob", "Logan", "Jackson", "Sebastian", "Mateo", "Jack", "Owen", "Samuel",
    "David", "Joseph", "Carter", "Wyatt", "Luis", "Andre", "Darnell", "Tyrone", "Wei", "Arjun", "Omar", "Kevin",
    "Brandon", "Cody", "Travis", "Marcus", "Diego", "Tomasz",
)
_GIVEN_NEUTRAL: Final = ("Alex", "Jordan", "Taylor", "Casey", "Riley", "Avery", "Quinn", "Rowan", "Sage", "Emerson")
_FAMILY: Final = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee",
    "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young",
    "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker",
    "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "Kowalczyk", "Nowak", "Okonkwo", "Mensah",
    "Patel", "Shah", "Kim", "Park", "Chen", "Wang", "Yamamoto", "Ivanova", "Murphy", "O'Connor", "Sullivan",
    "Schmidt", "Jensen", "Haddad", "Cohen", "Begay", "Yazzie", "Tran", "Pham", "Silva", "Costa", "Reyes", "Cruz",
    "Morales", "Ortiz", "Gutierrez",
)
_STREETS: Final = (
    "Oak St", "Maple Ave", "Cedar Ln", "Elm St", "Pine St", "Washington Ave", "Lincoln Blvd", "Park Ave", "Lake St",
    "Hillcrest Dr", "Sunset Ave", "Mill Rd", "Church St", "Highland Ave", "Chestnut St", "Willow Way", "River Rd",
    "Franklin St", "Jefferson Ave", "Madison St", "Spring St", "Walnut St", "Forest Ave", "Prospect St", "Union St",
)


# --- diagnoses ------------------------------------------------------------------------------

# ICD-10-CM codes by condition, with weights; every code is in the terminology tables (checked by tests).
_MH_CODES: Final = MappingProxyType({
    "depression": (("F32.1", 3), ("F32.2", 2), ("F32.9", 1), ("F33.1", 4), ("F33.2", 3), ("F33.9", 1)),
    "bipolar": (("F31.30", 2), ("F31.4", 2), ("F31.81", 2), ("F31.0", 1), ("F31.10", 1), ("F31.60", 1), ("F31.9", 1)),
    "gad": (("F41.1", 1),),
    "ptsd": (("F43.10", 1), ("F43.12", 3)),
})
_SUD_CODES: Final = MappingProxyType({
    "opioid": (("F11.20", 5), ("F11.10", 1)),
    "alcohol": (("F10.20", 4), ("F10.10", 2)),
    "cannabis": (("F12.20", 2), ("F12.10", 2)),
    "cocaine": (("F14.20", 2), ("F14.10", 1)),
    "stimulant": (("F15.20", 2), ("F15.10", 1)),
})
_MH_WEIGHTS: Final = (("depression", 45), ("gad", 20), ("bipolar", 15), ("ptsd", 20))
_SUD_WEIGHTS: Final = (("alcohol", 35), ("opioid", 35), ("stimulant", 10), ("cocaine", 10), ("cannabis", 10))
_SUBSTANCE_WORD: Final = MappingProxyType({
    "opioid": "opioids", "alcohol": "alcohol", "cannabis": "cannabis", "cocaine": "cocaine", "stimulant": "methamphetamine",
})
# Which urine analytes a use of the substance turns positive.
_SUBSTANCE_ANALYTES: Final = MappingProxyType({
    "alcohol": ("ethyl-glucuronide",),
    "cannabis": ("cannabinoids",),
    "cocaine": ("cocaine",),
    "stimulant": ("amphetamines",),
})
_MANIC_BIPOLAR: Final = frozenset({"F31.0", "F31.10", "F31.60"})


# --- medications ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One rung of a dose ladder: ``dose`` in the regimen's dose unit, given ``frequency`` times per
    ``period`` ``period_unit``; ``per_admin`` is how many product units (tablets, mL, ...) one dose
    uses, for the dispense quantity. ``rxnorm`` names a different strength for this rung."""

    dose: float
    per_admin: float
    frequency: int = 1
    period: float = 1
    period_unit: str = "d"
    rxnorm: str | None = None


def _count_steps(*counts: float, frequency: int = 1) -> tuple[_Step, ...]:
    return tuple(_Step(c, c, frequency) for c in counts)


def _mg_steps(strength: float, *doses: tuple[float, int]) -> tuple[_Step, ...]:
    return tuple(_Step(mg, mg / strength, freq) for mg, freq in doses)


@dataclass(frozen=True)
class _Regimen:
    """How a drug is prescribed here: products, dose ladder, sig, supply, where it is dispensed."""

    key: str
    slot: str  # therapeutic slot: one course per slot; switches stay within it
    products: tuple[str, ...]  # interchangeable RxNorm products (SCD and branded SBD)
    steps: tuple[_Step, ...]
    start_steps: tuple[int, ...]
    dose_unit: str | None = None  # None: the product's own unit ({tbl}, {Capsule}, 1, mL)
    when: str | None = None  # "morning" | "bedtime" for once-daily drugs
    days_supply: int = 30
    refills: tuple[int, int] = (0, 2)
    setting: str = "community"
    pharmacy_kind: str = "retail"
    as_needed_reason: str | None = None
    prn_quantity: int | None = None
    course: str = "continuous"
    advice: str | None = None
    sig: str | None = None  # a fixed sig template, for drugs not taken "by mouth" from a bottle
    effects: tuple[str, ...] = ()
    level: str | None = None  # drug-level analyte monitored for it
    home_steps: tuple[int, ...] | None = None  # doses a client may already be on at intake; None: any above the first

    def step_rxnorm(self, step: int, product: str) -> str:
        return self.steps[step].rxnorm or product


_REGIMEN_LIST: Final[tuple[_Regimen, ...]] = (
    # Antidepressants: one per client, titrated up over the weeks; venlafaxine climbs through strengths.
    _Regimen("sertraline", "antidepressant", ("312941",), _count_steps(0.5, 1, 2, 3, 4), (0, 1, 1), when="morning",
             effects=("nausea", "diarrhea", "headache", "insomnia", "sexual")),
    _Regimen("fluoxetine", "antidepressant", ("310385",), _count_steps(1, 2, 3), (0,), when="morning",
             effects=("nausea", "insomnia", "headache", "sexual")),
    _Regimen("escitalopram", "antidepressant", ("349332",), _count_steps(0.5, 1, 2), (0, 1, 1), when="morning",
             effects=("nausea", "headache", "fatigue", "sexual")),
    _Regimen("bupropion-xl", "antidepressant", ("993541",), _count_steps(1, 2), (0,), when="morning",
             effects=("insomnia", "dry-mouth", "headache")),
    _Regimen("bupropion-sr", "antidepressant", ("993518",), _count_steps(1, frequency=2), (0,),
             effects=("insomnia", "dry-mouth", "headache")),
    _Regimen("venlafaxine", "antidepressant", ("313585",),
             (_Step(1, 1, rxnorm="313583"), _Step(1, 1, rxnorm="313585"), _Step(1, 1, rxnorm="313581")), (0, 1, 1),
             when="morning", effects=("nausea", "sweating", "dizziness", "headache")),
    _Regimen("trazodone", "sleep", ("856377",), _count_steps(1, 2), (0,), when="bedtime",
             advice="May cause drowsiness.", effects=("drowsiness", "dizziness")),
    _Regimen("trazodone-prn", "sleep", ("856377",), _count_steps(1), (0,), when="bedtime", as_needed_reason="insomnia",
             prn_quantity=30, advice="May cause drowsiness.", effects=("drowsiness",)),
    # Mood stabilisers, dosed in mg; lithium and valproate get serum levels.
    _Regimen("lithium-er", "mood-stabiliser", ("197891", "206786"), _mg_steps(300, (600, 1), (900, 1), (1200, 1)), (0, 1),
             dose_unit="mg", when="bedtime", advice="Drink plenty of fluids; keep salt intake steady.",
             effects=("tremor", "nausea", "polyuria", "diarrhea"), level="lithium"),
    _Regimen("lithium-ir", "mood-stabiliser", ("197889", "197890"), _mg_steps(300, (300, 3), (600, 2)), (0,),
             dose_unit="mg", advice="Drink plenty of fluids; keep salt intake steady.",
             effects=("tremor", "nausea", "polyuria"), level="lithium"),
    _Regimen("divalproex", "mood-stabiliser", ("1099870", "1099871"), _mg_steps(500, (500, 2), (1000, 2)), (0,),
             dose_unit="mg", advice="Swallow whole; do not crush or chew.",
             effects=("nausea", "tremor", "weight-gain", "drowsiness"), level="valproate"),
    # Lamotrigine must be titrated up from 25 mg over weeks (rash risk) and the tables hold only the
    # 100 mg tablet, so it appears only as a home medication continued at intake.
    _Regimen("lamotrigine", "mood-stabiliser", ("198427", "105018"), _count_steps(1, 2), (0, 1),
             advice="Stop and call the clinic right away if a rash appears.", effects=("rash", "headache", "dizziness"),
             home_steps=(0, 1)),
    # Antipsychotics.
    _Regimen("quetiapine", "antipsychotic", ("312743", "153639"), _count_steps(1, 2, 3), (0, 1), when="bedtime",
             advice="May cause drowsiness.", effects=("drowsiness", "weight-gain", "dry-mouth", "dizziness")),
    _Regimen("aripiprazole", "antipsychotic", ("349545", "352307"), _count_steps(0.5, 1, 1.5, 2), (0, 1), when="morning",
             effects=("akathisia", "nausea", "insomnia")),
    _Regimen("olanzapine", "antipsychotic", ("314154", "153048"), _count_steps(0.5, 1, 1.5, 2), (0, 1), when="bedtime",
             advice="May cause drowsiness.", effects=("weight-gain", "drowsiness", "dry-mouth")),
    # Anxiolytics and adjuncts.
    _Regimen("buspirone", "anxiolytic", ("866083", "866086"), _count_steps(1, 1.5, 2, frequency=2), (0,),
             effects=("dizziness", "headache", "nausea")),
    _Regimen("hydroxyzine-prn", "anxiolytic-prn", ("995258", "995253"),
             (_Step(1, 1, 1, 6, "h"), _Step(2, 2, 1, 6, "h")), (0,), as_needed_reason="anxiety", prn_quantity=30,
             advice="May cause drowsiness. Do not exceed 4 doses in 24 hours.", effects=("drowsiness", "dry-mouth")),
    _Regimen("prazosin", "nightmares", ("312593",), _count_steps(1, 2, 3), (0,), when="bedtime",
             advice="Rise slowly from lying or sitting.", effects=("dizziness", "fatigue", "headache")),
    _Regimen("clonidine-prn", "withdrawal", ("884173",), (_Step(1, 1, 1, 6, "h"),), (0,),
             as_needed_reason="opioid withdrawal symptoms", prn_quantity=28, days_supply=7, refills=(0, 0),
             course="acute", advice="Hold for dizziness or systolic BP below 90.",
             effects=("drowsiness", "dizziness", "dry-mouth")),
    # Medication-assisted treatment.
    _Regimen("buprenorphine-naloxone", "moud", ("1010604", "1010606", "351267", "1010609"), _count_steps(1, 2), (0, 1, 1),
             days_supply=14, refills=(1, 3), advice="Let dissolve completely; do not chew or swallow.",
             effects=("constipation", "headache", "nausea", "sweating")),
    _Regimen("methadone", "moud", ("991147", "991149"),
             # A new induction starts at 30 mg (first-day ceiling); clients transferring from another OTP
             # keep a maintenance dose of 60-100 mg.
             tuple(_Step(mg, mg / 10, 1) for mg in (30, 40, 50, 60, 70, 80, 90, 100, 110, 120)), (0,),
             home_steps=(3, 4, 5, 6, 7),
             dose_unit="mg", days_supply=28, refills=(0, 0), setting="outpatient", pharmacy_kind="opioid-treatment-program",
             sig="Take {mg} mg ({ml} mL of 10 mg/mL oral solution) by mouth once daily; observed dosing at the opioid "
                 "treatment program.",
             effects=("constipation", "drowsiness", "sweating")),
    _Regimen("naltrexone-oral", "moud", ("1483744",), _count_steps(1), (0,), when="morning",
             advice="Carry a card stating you take naltrexone; opioid pain medicines will not work.",
             effects=("nausea", "headache", "dizziness")),
    _Regimen("naltrexone-xr", "moud", ("637213",), (_Step(1, 1, 1, 4, "wk"),), (0,), days_supply=28, refills=(0, 2),
             setting="outpatient", pharmacy_kind="specialty",
             sig="Naltrexone extended-release 380 mg by deep intramuscular gluteal injection every 4 weeks, "
                 "alternating buttocks; administered in clinic.",
             effects=("injection-site", "nausea")),
    _Regimen("acamprosate", "aud", ("835726",), (_Step(2, 2, 3),), (0,), advice="Swallow whole; continue even after a lapse.",
             effects=("diarrhea",)),
    _Regimen("disulfiram", "aud", ("197623",), _count_steps(1), (0,), when="morning",
             advice="Do not drink alcohol or use alcohol-containing products, including mouthwash.",
             effects=("drowsiness", "headache")),
)
_REGIMENS: Final = MappingProxyType({r.key: r for r in _REGIMEN_LIST})

# Side effects: display and, where known, a SNOMED CT finding. These codes are not in codes.json; they
# were cross-checked against public code listings (DICOM CID 3220, HL7 symptom value sets). Effects
# without a well-established code carry none rather than a guessed one.
_EFFECTS: Final = MappingProxyType({
    "nausea": ("Nausea", "422587007"),
    "headache": ("Headache", "25064002"),
    "dizziness": ("Dizziness", "404640003"),
    "fatigue": ("Fatigue", "84229001"),
    "insomnia": ("Insomnia", "193462001"),
    "weight-gain": ("Weight gain", "8943002"),
    "tremor": ("Tremor", "26079004"),
    "dry-mouth": ("Dry mouth", "87715008"),
    "drowsiness": ("Drowsiness", "271782001"),
    "diarrhea": ("Diarrhea", "62315008"),
    "constipation": ("Constipation", "14760008"),
    "sexual": ("Sexual side effects (decreased libido, delayed orgasm)", None),
    "akathisia": ("Akathisia (inner restlessness)", None),
    "rash": ("Maculopapular rash", None),
    "sweating": ("Increased sweating", None),
    "injection-site": ("Injection-site pain and induration", None),
    "polyuria": ("Increased thirst and urination", None),
})

_FORM_WORDS: Final = MappingProxyType({"{tbl}": "tablet", "{Capsule}": "capsule", "1": "film", "mL": "mL"})


def _form_word(rxnorm: str, unit: str) -> str:
    if unit == "1":
        return "injection" if terminology.medication(rxnorm)["route"] == "intramuscular" else "film"
    return _FORM_WORDS.get(unit, "unit")


def _count_text(count: float, word: str) -> str:
    whole, frac = int(count), count - int(count)
    if frac == 0:
        number = str(whole)
    elif whole == 0:
        number = "1/2"
    else:
        number = f"{whole} 1/2"
    return f"{number} {word}{'' if count <= 1 else 's'}"


def _frequency_text(step: _Step, when: str | None) -> str:
    if step.period_unit == "h":
        return f"every {_num(step.period)} hours"
    if step.period_unit == "wk":
        return f"every {_num(step.period)} weeks"
    if step.frequency == 1:
        return {"morning": "once daily in the morning", "bedtime": "once daily at bedtime"}.get(when or "", "once daily")
    return {2: "twice daily", 3: "three times daily", 4: "four times daily"}[step.frequency]


def _times_of_day(step: _Step, when: str | None, as_needed: bool) -> list[str]:
    if as_needed or step.period_unit != "d":
        return []
    if step.frequency == 1:
        return ["21:00:00"] if when == "bedtime" else ["08:00:00"] if when == "morning" else []
    return {2: ["08:00:00", "20:00:00"], 3: ["08:00:00", "14:00:00", "20:00:00"]}.get(step.frequency, [])


# --- instruments ----------------------------------------------------------------------------


def _band(instrument: str, total: int, sex: str, items: Sequence[int]) -> str:
    """The severity band the validator expects (table bands; AUDIT-C by sex; C-SSRS by which answers)."""
    bands = terminology.instrument(instrument)["bands"]
    if bands == "audit-c":
        return "positive" if total >= (4 if sex == "male" else 3) else "negative"
    if bands == "c-ssrs":
        yes = {i + 1 for i, score in enumerate(items) if score == 1}
        if yes & {4, 5, 7}:
            return "high"
        if yes & {3, 6}:
            return "moderate"
        return "low" if yes & {1, 2} else "none"
    for low, high, name in bands:
        if low <= total <= high:
            return str(name)
    raise ValueError(f"{instrument} total {total} is outside every band")


# --- the episode ----------------------------------------------------------------------------


@dataclass
class _Course:
    """One line of drug therapy: the chain of prescriptions for one slot (dose changes continue the
    chain; a switch starts a new course that replaces the old one)."""

    regimen: _Regimen
    product: str
    step: int
    target_step: int
    indication_id: str
    rx: Json
    changes: int = 0
    on_hold: bool = False
    ended: bool = False


@dataclass
class _RxInfo:
    """What the simulation remembers about a prescription beyond its JSON."""

    regimen: _Regimen
    holds: list[tuple[dt.date, dt.date | None]] = field(default_factory=list)


class _Episode:
    """Builds one record. State lives only here, for the duration of one ``generate_record`` call."""

    def __init__(self, index: int, seed: int) -> None:
        self.index = index
        self.rng = random.Random(f"{seed}:{index}")
        # MRN: a bijective scramble of the index (7919 is coprime to 10**7), so MRNs are unique within a
        # cohort yet do not read as a counter; the seed shifts it so two cohorts do not share MRNs.
        self.mrn_number = (index * 7919 + (seed % 9_973) * 1_009 + 104_729) % 10_000_000
        self.team_used: set[str] = set()
        self.pharmacies_used: set[str] = set()
        self.providers_used: set[str] = set()
        self.prescriptions: list[Json] = []
        self.rx_info: dict[str, _RxInfo] = {}
        self.reviews: list[Json] = []
        self.side_effects: list[Json] = []
        self.adherence: list[Json] = []
        self.assessments: list[Json] = []
        self.drug_screens: list[Json] = []
        self.vitals: list[Json] = []
        self.drug_levels: list[Json] = []
        self.sessions: list[Json] = []
        self.courses: list[_Course] = []
        self.level_orders: list[tuple[Json, dt.date]] = []
        self.phq_scores: list[tuple[dt.date, int]] = []
        self.gad_scores: list[tuple[dt.date, int]] = []
        self.aftercare_provider: str | None = None
        self.zones: dict[dt.date, dt.timezone] = {}

    # -- orchestration --------------------------------------------------------------------

    def build(self) -> Json:
        self._choose_program()
        self._client()
        self._diagnoses()
        self._risk_profile()
        self._timeline()
        self.client_json = self._client_json()  # the birth date counts back from the start
        self._sessions()
        self._medications()
        self._adherence()
        self._assessments()
        self._drug_screens()
        self._vitals()
        self._drug_levels()
        care_plan = self._care_plan()
        discharge = self._discharge()
        consents = self._consents()
        return self._assemble(care_plan, discharge, consents)

    # -- who --------------------------------------------------------------------------------

    def _choose_program(self) -> None:
        rng = self.rng
        self.kind = _pick(rng, (("mh", 0.45), ("sud", 0.20), ("dual", 0.35)))
        self.site = _SITE_BY_ID[_pick(rng, _PROGRAMS_FOR[self.kind])]
        self.modality = _pick(rng, self.site.modalities)

    def _client(self) -> None:
        rng = self.rng
        self.sex = _pick(rng, (("female", 0.5), ("male", 0.47), ("other", 0.02), ("unknown", 0.01)))
        if self.kind != "mh" and self.sex in ("female", "male"):
            # Substance-use programs see more men: turn a quarter of the women into men rather than keep
            # a second sex table.
            if self.sex == "female" and rng.random() < 0.25:
                self.sex = "male"
        pool = {"female": _GIVEN_FEMALE, "male": _GIVEN_MALE}.get(self.sex, _GIVEN_NEUTRAL + _GIVEN_FEMALE + _GIVEN_MALE)
        given = [rng.choice(pool)]
        if rng.random() < 0.3:
            given.append(rng.choice(pool if rng.random() < 0.8 else _GIVEN_NEUTRAL))
        self.given = given
        self.family = rng.choice(_FAMILY)
        self.age = int(rng.triangular(18, 70.99, 33))
        self.locality = rng.choice(self.site.localities)
        self.gender_identity = None
        if self.sex == "other":
            self.gender_identity = rng.choice(("non-binary", "genderqueer"))
        elif rng.random() < 0.02:
            self.gender_identity = "transgender woman" if self.sex == "male" else "transgender man"

    def _client_json(self) -> Json:
        rng = self.rng
        # Birth date exactly `age` whole years before the start (minus 1-364 days), so 18 <= age <= 70.
        birth = add_months(self.start, -12 * self.age) - _days(rng.randint(1, 364))
        self.birth = birth
        lines = [f"{rng.randint(10, 9899)} {rng.choice(_STREETS)}"]
        if rng.random() < 0.3:
            lines.append(f"Apt {rng.randint(1, 40)}{rng.choice('ABCD')}")
        contact: Json = {"phone": f"({self.locality.area_code}) 555-01{rng.randint(0, 99):02d}"}
        if rng.random() < 0.7:
            handle = f"{self.given[0]}.{self.family}".lower().replace("'", "")
            contact["email"] = f"{handle}{rng.randint(1, 99)}@example.com"
        name: Json = {"family": self.family, "given": list(self.given)}
        client: Json = {
            "mrn": f"{self.site.mrn_prefix}{self.mrn_number:07d}",
            "name": name,
            "birth_date": birth.isoformat(),
            "sex": self.sex,
        }
        if self.gender_identity:
            client["gender_identity"] = self.gender_identity
        client["contact"] = contact
        client["address"] = _address_json(lines, self.locality)
        return client

    # -- what -------------------------------------------------------------------------------

    def _diagnoses(self) -> None:
        """Conditions (for medication and scores), then ICD-10-CM diagnoses with exactly one primary."""
        rng = self.rng
        self.mh: list[str] = []
        self.substances: list[str] = []
        if self.kind in ("mh", "dual"):
            self.mh.append(_pick(rng, _MH_WEIGHTS))
            if rng.random() < 0.4:
                # Common comorbidities: anxiety with depression or PTSD, depression with PTSD.
                extra = {"depression": "gad", "ptsd": rng.choice(("depression", "gad")), "gad": "depression"}.get(self.mh[0])
                if extra:
                    self.mh.append(extra)
        if self.kind in ("sud", "dual"):
            self.substances.append(_pick(rng, _SUD_WEIGHTS))
            if rng.random() < 0.3:
                other = _pick(rng, (("cannabis", 4), ("alcohol", 3), ("cocaine", 2), ("stimulant", 1), ("opioid", 1)))
                if other not in self.substances:
                    self.substances.append(other)
        self.codes: dict[str, str] = {}  # condition -> ICD-10-CM code
        for condition in self.mh:
            self.codes[condition] = _pick(rng, _MH_CODES[condition])
        for substance in self.substances:
            self.codes[substance] = _pick(rng, _SUD_CODES[substance])
        # Rank: a substance-use program treats the use disorder first; a co-occurring one either way.
        order = list(self.mh) + list(self.substances)
        if self.kind == "sud" or (self.kind == "dual" and (self.site.focus == "substance-use" or rng.random() < 0.5)):
            order = list(self.substances) + list(self.mh)
        self.primary_condition = order[0]
        self.dx_ids: dict[str, str] = {c: f"dx-{i + 1}" for i, c in enumerate(order)}
        self.condition_order = order

    def _risk_profile(self) -> None:
        rng = self.rng
        depressive = any(c in ("depression", "ptsd") for c in self.mh) or (
            "bipolar" in self.mh and self.codes["bipolar"] not in _MANIC_BIPOLAR
        )
        self.suicidal = rng.random() < (0.22 if depressive else 0.08)
        # C-SSRS screener answers (Q1..Q5, Q6 lifetime behaviour, Q6b behaviour in the last 3 months).
        self.cssrs: list[int] | None = None
        if self.suicidal or rng.random() < 0.5:
            wish = 1 if self.suicidal else 0
            thoughts = 1 if self.suicidal and rng.random() < 0.6 else 0
            # Q3-Q5 are asked only after a "yes" to Q2, so they stay 0 otherwise.
            method = 1 if thoughts and rng.random() < 0.5 else 0
            intent = 1 if thoughts and rng.random() < 0.15 else 0
            plan = 1 if intent and rng.random() < 0.4 else 0
            ever = 1 if rng.random() < (0.35 if self.suicidal else 0.08) else 0
            recent = 1 if ever and rng.random() < 0.25 else 0
            self.cssrs = [wish, thoughts, method, intent, plan, ever, recent]
        high_risk = bool(self.cssrs and (self.cssrs[3] or self.cssrs[4] or self.cssrs[6]))
        self.adherence_profile = _pick(rng, (("good", 0.6), ("fair", 0.28), ("poor", 0.12)))
        self.family_sessions = rng.random() < 0.35
        if high_risk and rng.random() < 0.5:
            self.disposition = "stepped-up-inpatient"
        else:
            self.disposition = _pick(rng, (
                ("active", 15), ("completed", 43), ("stepped-down", 14), ("stepped-up-php", 7),
                ("stepped-up-inpatient", 4), ("left-against-advice", 14), ("administrative", 3),
            ))
        if self.disposition.startswith("stepped-up"):
            self.trajectory = _pick(rng, (("worsening", 0.7), ("flat", 0.3)))
        elif self.disposition in ("completed", "stepped-down"):
            self.trajectory = _pick(rng, (("improving", 0.85), ("flat", 0.15)))
        elif self.disposition == "left-against-advice":
            self.trajectory = _pick(rng, (("improving", 0.3), ("flat", 0.45), ("worsening", 0.25)))
        else:
            self.trajectory = _pick(rng, (("improving", 0.65), ("flat", 0.25), ("worsening", 0.10)))
        if self.adherence_profile == "poor" and self.disposition == "active" and rng.random() < 0.3:
            self.trajectory = "flat"

    # -- when -------------------------------------------------------------------------------

    def _timeline(self) -> None:
        """Program days, the episode's end (discharge) or, for active clients, how far it has got."""
        rng = self.rng
        self.days_per_week = _pick(rng, ((3, 3), (4, 4), (5, 3)))
        weekdays = {
            3: rng.choice(((0, 2, 4), (1, 2, 3), (0, 1, 3))),
            4: rng.choice(((0, 1, 2, 3), (0, 1, 3, 4))),
            5: (0, 1, 2, 3, 4),
        }[self.days_per_week]
        self.weekdays = weekdays
        self.weeks = _pick(rng, ((5, 2), (6, 3), (7, 3), (8, 2)))
        day = _FIRST_START + _days(rng.randrange((_LAST_START - _FIRST_START).days + 1))
        while day.weekday() not in weekdays:
            day += _days(1)
        self.start = day
        last_planned = self.start + _days(7 * self.weeks - 1)
        every_day = (self.start + _days(i) for i in range(7 * self.weeks + 14))
        calendar = [d for d in every_day if d.weekday() in weekdays]
        plan = [d for d in calendar if d <= last_planned]
        self.planned_end = plan[-1]
        n = len(plan)
        d = self.disposition
        if d == "active":
            last = max(3, int(n * rng.uniform(0.15, 0.9)))
        elif d == "completed":
            last = _pick(rng, ((n - 1, 0.8), (n - 1 + self.days_per_week, 0.1), (n - 2, 0.1)))
        elif d == "stepped-down":
            last = int(n * rng.uniform(0.6, 0.85))
        elif d.startswith("stepped-up"):
            last = int(n * rng.uniform(0.2, 0.6))
        elif d == "left-against-advice":
            last = int(n * rng.uniform(0.15, 0.6))
        else:
            last = int(n * rng.uniform(0.3, 0.8))
        last = max(3, min(last, len(calendar) - 1))
        self.days = calendar[: last + 1]
        if d == "active":
            self.horizon = self.days[-1]  # "today" for the record: nothing is dated after it
            self.discharge_date: dt.date | None = None
        else:
            grace = rng.randint(0, 3) if d == "left-against-advice" else 0  # discharged after failed outreach
            self.discharge_date = self.days[-1] + _days(grace)
            self.horizon = self.discharge_date
        # Session track: morning, afternoon or evening IOP block of 3 hours.
        self.track = _pick(rng, (("morning", 0.5), ("afternoon", 0.2), ("evening", 0.3)))
        self.group_start = {"morning": _hm("09:00"), "afternoon": _hm("13:00"), "evening": _hm("17:30")}[self.track]

    def _stamp(self, day: dt.date, minute_of_day: int) -> str:
        """Local date-time in the program's zone; the day's offset is memoised for this record only."""
        zone = self.zones.get(day)
        if zone is None:
            zone = self.zones[day] = _local_zone(day, self.site.standard_utc_offset)
        return dt.datetime.combine(day, dt.time(minute_of_day // 60, minute_of_day % 60), zone).isoformat()

    def _week(self, day: dt.date) -> int:
        return (day - self.start).days // 7

    # -- care team ---------------------------------------------------------------------------

    def _team(self) -> None:
        rng = self.rng
        site = self.site
        self.psychiatrist = site.by_role("psychiatrist")[0].id
        self.np = site.by_role("nurse-practitioner")[0].id
        self.prescriber = self.psychiatrist if rng.random() < 0.7 else self.np
        therapists = site.by_role("therapist")
        self.therapist = rng.choice(therapists).id
        family = [t for t in therapists if t.suffix and "LMFT" in t.suffix]
        self.family_therapist = family[0].id if family else self.therapist
        self.group_therapists = [t.id for t in therapists]
        self.case_manager = site.by_role("case-manager")[0].id
        nurses = site.by_role("nurse")
        self.nurse = nurses[0].id if nurses else self.case_manager
        peers = site.by_role("peer-specialist")
        self.peer = peers[0].id if peers and self.substances else None

    def _use(self, clinician_id: str) -> str:
        self.team_used.add(clinician_id)
        return clinician_id

    # -- sessions ---------------------------------------------------------------------------

    def _sessions(self) -> None:
        """The schedule and who came: group every program day, individual, psychoeducation (first four
        weeks), medication management (intake evaluation, then weekly) and family sessions."""
        rng = self.rng
        self._team()
        p_noshow = {"good": 0.05, "fair": 0.1, "poor": 0.18}[self.adherence_profile]
        if self.disposition == "left-against-advice":
            p_noshow += 0.06
        ama_tail = rng.randint(1, 3) if self.disposition == "left-against-advice" else 0
        ama_tail = min(ama_tail, len(self.days) - 2)
        telehealth_days: set[int] = set()
        if self.modality == "hybrid":
            telehealth_days = set(rng.sample(self.weekdays, k=max(1, len(self.weekdays) // 2)))
        by_week: dict[int, list[dt.date]] = {}
        for day in self.days:
            by_week.setdefault(self._week(day), []).append(day)

        self.status_by_day: dict[dt.date, str] = {}
        for i, day in enumerate(self.days):
            if i == 0 or (i == len(self.days) - 1 and self.disposition != "left-against-advice"):
                status = "attended"  # intake, and the discharge/step-up day itself
            elif i >= len(self.days) - ama_tail:
                status = "no-show"  # stopped coming before leaving against advice
            else:
                status = _pick(rng, (("attended", 1 - p_noshow - 0.03), ("no-show", p_noshow), ("cancelled", 0.03)))
            self.status_by_day[day] = status
        self.attended_days = [d for d in self.days if self.status_by_day[d] == "attended"]

        self.med_visits: list[tuple[dt.date, str, bool]] = []  # attended medication-management visits
        raw: list[tuple[dt.date, int, int, Json]] = []
        for week, week_days in by_week.items():
            first = week_days[0]
            individual_day = week_days[1] if len(week_days) > 1 else week_days[0]
            extras: dict[dt.date, list[tuple[str, int, str]]] = {}
            med_day = self.start if week == 0 else first
            prescriber = self.prescriber if rng.random() < 0.8 else (self.np if self.prescriber == self.psychiatrist else self.psychiatrist)
            extras.setdefault(med_day, []).append(("medication-management", 60 if week == 0 else 25, prescriber))
            extras.setdefault(individual_day, []).append(("individual", 50, self.therapist))
            if self.family_sessions and week % 2 == 1:
                extras.setdefault(individual_day, []).append(("family", 50, self.family_therapist))
            if week < 4:
                educator = rng.choice([c for c in (self.nurse, self.case_manager, self.peer) if c])
                extras.setdefault(week_days[-1], []).append(("psychoeducation", 60, educator))
            for day in week_days:
                status = self.status_by_day[day]
                remote = self.modality == "telehealth" or (day.weekday() in telehealth_days and day != self.start)
                group_minutes = 180 if rng.random() > 0.05 else 150  # a late arrival now and then
                therapist = self.group_therapists[day.weekday() % len(self.group_therapists)]
                raw.append((day, self.group_start, 0, self._session_json("group", day, self.group_start, status,
                                                                          group_minutes, remote, therapist)))
                # Extra sessions follow a morning block and end 15 minutes before an afternoon or evening one.
                todays = extras.get(day, [])
                if self.track == "morning":
                    clock = _hm("12:30")
                else:
                    clock = self.group_start - 15 - sum(m + 10 for _, m, _ in todays) + 10
                for order, (kind, minutes, clinician) in enumerate(todays):
                    one_remote = remote
                    if self.modality == "hybrid" and kind in ("individual", "medication-management", "family"):
                        one_remote = day != self.start and rng.random() < 0.5
                    raw.append((day, clock, order + 1, self._session_json(kind, day, clock, status, minutes, one_remote, clinician)))
                    if kind == "medication-management" and status == "attended":
                        self.med_visits.append((day, clinician, one_remote))
                    clock += minutes + 10
        raw.sort(key=lambda r: (r[0], r[1], r[2]))
        for i, (_, _, _, session) in enumerate(raw):
            session["id"] = f"ses-{i + 1}"
            self.sessions.append(session)
        self.med_visits.sort()

    def _session_json(self, kind: str, day: dt.date, minute: int, status: str, minutes: int, remote: bool, clinician: str) -> Json:
        return {
            "id": "",
            "start": self._stamp(day, minute),
            "kind": kind,
            "attendance": status,
            "minutes": minutes if status == "attended" else 0,
            "telehealth": remote,
            "clinician_id": self._use(clinician),
        }

    # -- medications --------------------------------------------------------------------------

    def _plan_regimens(self) -> list[tuple[str, str, bool]]:
        """(regimen key, condition it treats, continued home medication?) for the intake orders."""
        rng = self.rng
        plan: list[tuple[str, str, bool]] = []
        slots: set[str] = set()

        def add(key: str, condition: str, home: bool = False) -> None:
            regimen = _REGIMENS[key]
            if regimen.slot not in slots:
                slots.add(regimen.slot)
                plan.append((key, condition, home))

        alcohol = "alcohol" in self.substances
        antidepressants = [("sertraline", 25), ("escitalopram", 20), ("fluoxetine", 15), ("venlafaxine", 20),
                           ("bupropion-xl", 0 if alcohol else 15), ("bupropion-sr", 0 if alcohol else 5)]
        for condition in self.mh:
            code = self.codes[condition]
            if condition == "depression" and rng.random() < 0.94:
                add(_pick(rng, antidepressants), condition, rng.random() < 0.35)
                if code in ("F33.2", "F32.2") and rng.random() < 0.2:
                    add("aripiprazole", condition)
                if rng.random() < 0.3:
                    add("trazodone-prn" if rng.random() < 0.4 else "trazodone", condition)
            elif condition == "gad":
                add(_pick(rng, (("escitalopram", 35), ("sertraline", 30), ("venlafaxine", 25))), condition, rng.random() < 0.3)
                extra = rng.random()
                if extra < 0.35:
                    add("buspirone", condition)
                elif extra < 0.7:
                    add("hydroxyzine-prn", condition)
            elif condition == "ptsd":
                add(_pick(rng, (("sertraline", 45), ("venlafaxine", 30), ("fluoxetine", 25))), condition, rng.random() < 0.3)
                if rng.random() < 0.4:
                    add("prazosin", condition)
                if rng.random() < 0.2:
                    add("hydroxyzine-prn", condition)
            elif condition == "bipolar":
                stabiliser = _pick(rng, (("lithium-er", 22), ("lithium-ir", 13), ("divalproex", 25),
                                         ("lamotrigine", 0 if code in _MANIC_BIPOLAR else 22), (None, 18)))
                if stabiliser:
                    add(stabiliser, condition, stabiliser == "lamotrigine" or rng.random() < 0.5)
                if stabiliser is None or code in _MANIC_BIPOLAR or rng.random() < 0.45:
                    add(_pick(rng, (("quetiapine", 45), ("aripiprazole", 35), ("olanzapine", 20))), condition, rng.random() < 0.3)
        if "opioid" in self.substances:
            moud = _pick(rng, (("buprenorphine-naloxone", 58), ("methadone", 20), ("naltrexone-xr", 15), (None, 7)))
            if moud:
                add(moud, "opioid", moud == "methadone" and rng.random() < 0.5)
            if moud in ("buprenorphine-naloxone", "naltrexone-xr") and rng.random() < 0.25:
                add("clonidine-prn", "opioid")
        if alcohol:
            opioid_agonist = any(k in ("buprenorphine-naloxone", "methadone") for k, _, _ in plan)
            if any(k == "naltrexone-xr" for k, _, _ in plan):
                pass  # already covers alcohol use disorder as well
            elif opioid_agonist:
                # Naltrexone would precipitate withdrawal on an opioid agonist; acamprosate is safe.
                if rng.random() < 0.5:
                    add("acamprosate", "alcohol")
            else:
                add_key = _pick(rng, (("naltrexone-oral", 40), ("acamprosate", 25), ("naltrexone-xr", 10),
                                      ("disulfiram", 10), (None, 15)))
                if add_key:
                    add(add_key, "alcohol")
        if self.substances and not self.mh and rng.random() < 0.15:
            add("trazodone", self.substances[0])
        return plan

    def _rx(self, course_regimen: _Regimen, product: str, step: int, indication: str, written: dt.date,
            prescriber: str, *, replaces: str | None = None, setting: str | None = None,
            days_supply: int | None = None, refills: int | None = None) -> Json:
        """A new prescription (JSON with every key, ``None`` stripped at assembly) in contract order."""
        rng = self.rng
        reg = course_regimen
        st = reg.steps[step]
        rxnorm = reg.step_rxnorm(step, product)
        med = terminology.medication(rxnorm)
        assert med is not None, rxnorm
        unit = reg.dose_unit or med["unit"]
        product_unit = med["unit"]
        supply = days_supply if days_supply is not None else reg.days_supply
        if reg.prn_quantity is not None:
            quantity = float(reg.prn_quantity)
        else:
            per_day = st.per_admin * st.frequency / {"h": st.period / 24, "d": st.period, "wk": st.period * 7}[st.period_unit]
            quantity = max(1.0, math.ceil(per_day * supply * 2) / 2)
        schedule = med["dea_schedule"]
        if refills is None:
            refills = rng.randint(*reg.refills)
        if schedule == "II":
            refills = 0  # 21 CFR 1306.12
        elif schedule in ("III", "IV", "V"):
            refills = min(refills, 5)  # 21 CFR 1306.22
        branded = "[" in med["display"]
        rx: Json = {
            "id": f"rx-{len(self.prescriptions) + 1}",
            "medication": {"rxnorm": rxnorm, "display": med["display"]},
            "dose": _quantity(st.dose, unit),
            "route": med["route"],
            "timing": {
                "frequency": st.frequency,
                "period": _num(st.period),
                "period_unit": st.period_unit,
                "times_of_day": _times_of_day(st, reg.when, reg.as_needed_reason is not None),
            },
            "as_needed": reg.as_needed_reason is not None,
            "as_needed_reason": reg.as_needed_reason,
            "written": written.isoformat(),
            "start": written.isoformat(),
            "end": None,
            "quantity": _quantity(quantity, product_unit),
            "days_supply": supply,
            "refills": refills,
            "substitution_allowed": not (branded and rng.random() < 0.5),  # brand "dispense as written" at times
            "prescriber_id": self._use(prescriber),
            "pharmacy_id": self._pharmacy_for(reg),
            "dea_schedule": schedule,
            "mat": bool(med["mat"]),
            "indication_id": indication,
            "instructions": self._sig(reg, st, rxnorm, unit),
            "status": "active",
            "status_reason": None,
            "setting": setting or reg.setting,
            "course": reg.course,
            "replaces_id": replaces,
        }
        if reg.course == "acute":
            rx["end"] = (written + _days(supply - 1)).isoformat()
        self.prescriptions.append(rx)
        self.rx_info[rx["id"]] = _RxInfo(reg)
        return rx

    def _pharmacy_for(self, reg: _Regimen) -> str:
        if reg.pharmacy_kind == "retail":
            pharmacy_id = self.home_pharmacy
        else:
            pharmacy_id = self.site.pharmacies_of(reg.pharmacy_kind)[0].id
        self.pharmacies_used.add(pharmacy_id)
        return pharmacy_id

    def _sig(self, reg: _Regimen, st: _Step, rxnorm: str, unit: str) -> str:
        med = terminology.medication(rxnorm)
        assert med is not None
        if reg.sig:
            return reg.sig.format(mg=_num(st.dose), ml=_num(st.per_admin))
        strength = float(med["strength_mg"])
        word = _form_word(rxnorm, med["unit"])
        if unit == "mg":
            amount = f"{_num(st.dose)} mg ({_count_text(st.per_admin, word)})"
        else:
            amount = f"{_count_text(st.dose, word)} ({_num(st.dose * strength)} mg)"
        verb, where = ("Dissolve", "under the tongue") if med["route"] == "sublingual" else ("Take", "by mouth")
        text = f"{verb} {amount} {where} {_frequency_text(st, reg.when)}"
        if reg.as_needed_reason:
            text += f" as needed for {reg.as_needed_reason}"
        text += "."
        if reg.advice:
            text += " " + reg.advice
        return text

    def _review(self, day: dt.date, rx: Json, action: str, reviewer: str, reason: str | None = None,
                new_rx: Json | None = None) -> None:
        self.reviews.append({
            "id": "",
            "date": day.isoformat(),
            "prescription_id": rx["id"],
            "action": action,
            "reason": reason,
            "new_dose": dict(new_rx["dose"]) if new_rx is not None else None,
            "new_prescription_id": new_rx["id"] if new_rx is not None else None,
            "reviewer_id": self._use(reviewer),
        })

    def _end_rx(self, rx: Json, day: dt.date, status: str, reason: str) -> None:
        rx["status"] = status
        rx["status_reason"] = reason
        rx["end"] = day.isoformat()

    def _medications(self) -> None:
        """Intake orders, then a review of every current prescription at each attended weekly
        medication-management visit: mostly continue, sometimes titrate, switch, hold or stop."""
        rng = self.rng
        retail = self.site.pharmacies_of("retail")
        mail = self.site.pharmacies_of("mail-order")
        self.home_pharmacy = (mail[0] if mail and rng.random() < 0.25 else rng.choice(retail)).id
        if not self.med_visits:
            return
        intake_day, intake_prescriber, _ = self.med_visits[0]
        for key, condition, home in self._plan_regimens():
            reg = _REGIMENS[key]
            step = rng.choice(reg.start_steps)
            if home:
                # A continued home medication is usually already past the starting dose.
                step = rng.choice(reg.home_steps or tuple(range(min(1, len(reg.steps) - 1), len(reg.steps))))
            product = rng.choice(reg.products)
            rx = self._rx(reg, product, step, self.dx_ids[condition], intake_day, intake_prescriber)
            if reg.key == "naltrexone-xr" or (reg.key == "methadone" and not home):
                pass  # given or started in the program on the day ordered
            elif not home and rng.random() < 0.3:
                rx["start"] = (intake_day + _days(1)).isoformat()  # filled and first taken the next day
            bump = {"improving": (0, 0, 1), "flat": (0, 1, 1, 2), "worsening": (1, 1, 2)}[self.trajectory]
            target = min(len(reg.steps) - 1, step + (rng.choice(bump) if not home else rng.choice((0, 0, 1))))
            if reg.key == "methadone":
                target = max(step, min(len(reg.steps) - 1, rng.randint(3, 7)))  # 60-100 mg is a usual maintenance dose
            course = _Course(reg, product, step, target, self.dx_ids[condition], rx)
            self.courses.append(course)
            if home:
                self._review(intake_day, rx, "continue", intake_prescriber,
                             "Home medication reconciled at intake; continue current dose.")
            else:
                self._review(intake_day, rx, "start", intake_prescriber, self._start_reason(reg))
        added_on = False
        for week_no, (day, reviewer, _) in enumerate(self.med_visits[1:], start=1):
            for course in list(self.courses):
                if course.ended:
                    continue
                self._review_course(course, day, reviewer, week_no)
            if not added_on and rng.random() < 0.025:
                added_on = self._add_on(day, reviewer)
        self._close_courses()

    def _start_reason(self, reg: _Regimen) -> str:
        return {
            "antidepressant": "Started for depressive/anxiety symptoms; reassess weekly.",
            "sleep": "Started for insomnia.",
            "mood-stabiliser": "Started for mood stabilisation.",
            "antipsychotic": "Started for mood symptoms.",
            "anxiolytic": "Started for persistent anxiety.",
            "anxiolytic-prn": "As needed for acute anxiety.",
            "nightmares": "Started for trauma-related nightmares.",
            "withdrawal": "Short course for opioid withdrawal symptoms.",
            "moud": "Medication for opioid use disorder started; risks, benefits and naloxone reviewed.",
            "aud": "Medication for alcohol use disorder started.",
        }[reg.slot]

    def _add_on(self, day: dt.date, reviewer: str) -> bool:
        """A drug added mid-episode (sleep or anxiety symptoms emerging in treatment)."""
        taken = {c.regimen.slot for c in self.courses if not c.ended}
        options = [k for k in ("trazodone-prn", "hydroxyzine-prn") if _REGIMENS[k].slot not in taken]
        if not options:
            return False
        if "hydroxyzine-prn" in options and "trazodone-prn" in options and "sleep" in taken:
            options = ["hydroxyzine-prn"]
        reg = _REGIMENS[self.rng.choice(options)]
        indication = self.dx_ids[self.primary_condition]
        product = self.rng.choice(reg.products)
        rx = self._rx(reg, product, 0, indication, day, reviewer)
        self.courses.append(_Course(reg, product, 0, 0, indication, rx))
        self._review(day, rx, "start", reviewer, self._start_reason(reg))
        return True

    def _review_course(self, course: _Course, day: dt.date, reviewer: str, week_no: int) -> None:
        rng = self.rng
        reg = course.regimen
        rx = course.rx
        if course.regimen.course == "acute" and rx["end"] and dt.date.fromisoformat(rx["end"]) < day:
            return  # a finished short course is closed as completed, not reviewed
        if course.on_hold:
            info = self.rx_info[rx["id"]]
            start_hold, _ = info.holds[-1]
            info.holds[-1] = (start_hold, day)
            course.on_hold = False
            if rng.random() < 0.7:
                rx["status"] = "active"
                rx["status_reason"] = None
                self._review(day, rx, "continue", reviewer, "Side effect resolved; resumed at the same dose.")
            else:
                self._end_rx(rx, day, "stopped", "Not resumed after hold; side effects outweighed benefit.")
                course.ended = True
                self._review(day, rx, "stop", reviewer, "Not resumed after hold.")
            return

        mat = reg.slot in ("moud", "aud")
        # Titration toward the target dose: methadone climbs weekly, others when response is partial.
        if course.step < course.target_step and course.changes < 3:
            p = 0.8 if reg.key == "methadone" else 0.45 if week_no <= 4 else 0.2
            if rng.random() < p:
                self._change_dose(course, day, reviewer, course.step + 1, "increase")
                return
        # One draw, disjoint bands: troublesome side effect 2.5 %, tolerable one 5 %, switch for
        # non-response 8 % (only where it applies), client-initiated stop 1 %, else continue.
        roll = rng.random()
        if roll < 0.025:
            self._side_effect_action(course, day, reviewer)
            return
        if roll < 0.075:
            # A tolerable side effect reported at review: note it, keep going.
            effect = rng.choice(reg.effects)
            self._side_effect(course, day - _days(rng.randint(0, 5)), effect, "mild",
                              _pick(rng, (("monitor", 0.6), ("none", 0.25), ("treated", 0.15))))
            self._review(day, rx, "continue", reviewer, f"Mild {_EFFECTS[effect][0].lower()} reported; monitoring.")
            return
        if roll < 0.155:
            if (self.trajectory != "improving" and reg.slot in ("antidepressant", "antipsychotic")
                    and week_no >= 3 and course.changes < 2):
                self._switch(course, day, reviewer, "Inadequate response after an adequate trial.")
                return
        elif roll < 0.165 and not mat and reg.course != "acute":
            self._end_rx(rx, day, "stopped", "Client declined to continue.")
            course.ended = True
            self._review(day, rx, "stop", reviewer, "Client preferred to stop; discussed risks.")
            return
        reason = None
        if rng.random() < 0.3:
            reason = rng.choice((
                "Tolerating well; continue.", "Adherent by report; no side effects.", "Partial benefit; continue current dose.",
                "Stable; no changes.",
            ))
        self._review(day, rx, "continue", reviewer, reason)

    def _side_effect(self, course: _Course, day: dt.date, effect: str, severity: str, action: str) -> None:
        display, snomed = _EFFECTS[effect]
        rx_start = dt.date.fromisoformat(course.rx["start"])
        self.side_effects.append({
            "id": "",
            "date": max(day, rx_start, self.start).isoformat(),
            "prescription_id": course.rx["id"],
            "effect": display,
            "snomed": snomed,
            "severity": severity,
            "action_taken": action,
        })

    def _side_effect_action(self, course: _Course, day: dt.date, reviewer: str) -> None:
        """A troublesome side effect and what the prescriber did about it."""
        rng = self.rng
        reg = course.regimen
        effect = rng.choice(reg.effects)
        severity = _pick(rng, (("moderate", 0.75), ("severe", 0.25)))
        name = _EFFECTS[effect][0].lower()
        reported = day - _days(rng.randint(0, 4))
        if effect == "rash" and reg.key == "lamotrigine":
            # Any rash on lamotrigine is stopped outright (risk of Stevens-Johnson syndrome).
            self._side_effect(course, reported, effect, severity, "stopped")
            self._end_rx(course.rx, day, "stopped", "Rash on lamotrigine; discontinued.")
            course.ended = True
            self._review(day, course.rx, "stop", reviewer, "New rash; lamotrigine stopped per protocol.")
            return
        options: list[tuple[str, float]] = [("stopped", 0.15)]
        if course.step > 0:
            options.append(("dose-reduced", 0.45))
        if reg.slot in ("antidepressant", "antipsychotic") and course.changes < 2:
            options.append(("switched", 0.3))
        if reg.slot not in ("moud", "aud", "withdrawal") and reg.as_needed_reason is None:
            options.append(("held", 0.15))
        action = _pick(rng, options)
        self._side_effect(course, reported, effect, severity, action)
        if action == "dose-reduced":
            if reg.level and effect == "tremor":
                self._level(course.rx, day, high=True)  # the level that prompted the reduction
            self._change_dose(course, day, reviewer, course.step - 1, "decrease", f"{_EFFECTS[effect][0]} ({severity}); dose reduced.")
        elif action == "switched":
            self._switch(course, day, reviewer, f"Not tolerated: {name}.")
        elif action == "held":
            course.rx["status"] = "on-hold"
            course.rx["status_reason"] = f"Held for {name}."
            self.rx_info[course.rx["id"]].holds.append((day, None))
            course.on_hold = True
            self._review(day, course.rx, "hold", reviewer, f"Held for {name}; reassess next week.")
        else:
            self._end_rx(course.rx, day, "stopped", f"Stopped for {name}.")
            course.ended = True
            self._review(day, course.rx, "stop", reviewer, f"{_EFFECTS[effect][0]} ({severity}); discontinued.")

    def _change_dose(self, course: _Course, day: dt.date, reviewer: str, new_step: int, action: str,
                     reason: str | None = None) -> None:
        old = course.rx
        reg = course.regimen
        new = self._rx(reg, course.product, new_step, course.indication_id, day, reviewer, replaces=old["id"])
        word = "increased" if action == "increase" else "decreased"
        self._end_rx(old, day, "stopped", f"Dose {word}; replaced by {new['id']}.")
        if reason is None:
            reason = ("Titrating to a therapeutic dose." if reg.key == "methadone"
                      else "Partial response; dose increased." if action == "increase" else "Dose reduced.")
        self._review(day, old, action, reviewer, reason, new)
        course.rx = new
        course.step = new_step
        course.changes += 1
        if action == "decrease":
            course.target_step = new_step  # a dose lowered for a side effect is not titrated back up
        if reg.level:
            self.level_orders.append((new, day))  # drawn once the whole course is known

    def _switch(self, course: _Course, day: dt.date, reviewer: str, reason: str) -> None:
        rng = self.rng
        alcohol = "alcohol" in self.substances
        options = [r for r in _REGIMEN_LIST if r.slot == course.regimen.slot and r.key != course.regimen.key
                   and r.as_needed_reason is None and not (alcohol and r.key.startswith("bupropion"))
                   and r.key != "lamotrigine"]
        if not options:
            self._review(day, course.rx, "continue", reviewer, reason + " No suitable alternative; continue.")
            return
        reg = rng.choice(options)
        product = rng.choice(reg.products)
        step = min(reg.start_steps)
        old = course.rx
        new = self._rx(reg, product, step, course.indication_id, day, reviewer, replaces=old["id"])
        self._end_rx(old, day, "stopped", f"Switched to {reg.key.split('-')[0]}.")
        self._review(day, old, "switch", reviewer, reason, new)
        course.regimen = reg
        course.product = product
        course.step = step
        course.target_step = min(len(reg.steps) - 1, step + 1)
        course.rx = new
        course.changes += 1

    def _close_courses(self) -> None:
        """End-of-window bookkeeping: short courses complete; holds are settled before discharge; a
        buprenorphine client discharged to outpatient care gets a bridge prescription."""
        rng = self.rng
        horizon = self.horizon
        last_reviewer = self.med_visits[-1][1]
        for course in self.courses:
            rx = course.rx
            if course.ended:
                continue
            if course.regimen.course == "acute" and rx["end"] and dt.date.fromisoformat(rx["end"]) <= horizon:
                rx["status"] = "completed"
                rx["status_reason"] = "Course completed."
                course.ended = True
                continue
            if course.on_hold and self.discharge_date is not None:
                info = self.rx_info[rx["id"]]
                info.holds[-1] = (info.holds[-1][0], self.discharge_date)
                course.on_hold = False
                if rng.random() < 0.6:
                    rx["status"] = "active"
                    rx["status_reason"] = None
                    self._review(self.discharge_date, rx, "continue", last_reviewer, "Resumed at discharge; aftercare prescriber to monitor.")
                else:
                    self._end_rx(rx, self.discharge_date, "stopped", "Stopped at discharge after hold.")
                    course.ended = True
                    self._review(self.discharge_date, rx, "stop", last_reviewer, "Not resumed; stopped at discharge.")
        if self.discharge_date is not None and self.disposition in ("completed", "stepped-down"):
            for course in self.courses:
                if course.ended or course.regimen.key != "buprenorphine-naloxone" or rng.random() < 0.5:
                    continue
                old = course.rx
                if dt.date.fromisoformat(old["written"]) >= self.discharge_date:
                    continue
                bridge = self._rx(course.regimen, course.product, course.step, course.indication_id, self.discharge_date,
                                  last_reviewer, setting="discharge", days_supply=14, refills=0)
                bridge["start"] = (self.discharge_date + _days(1)).isoformat()
                bridge["instructions"] += " Bridge supply until the first aftercare visit."
                self._end_rx(old, self.discharge_date, "completed", "Completed at discharge; bridge prescription written.")
                course.rx = bridge

    # -- adherence ---------------------------------------------------------------------------

    def _rx_window(self, rx: Json) -> tuple[dt.date, dt.date]:
        start = dt.date.fromisoformat(rx["start"])
        end = dt.date.fromisoformat(rx["end"]) if rx["end"] else self.horizon
        return start, min(end, self.horizon)

    def _taking_on(self, rx: Json, day: dt.date) -> bool:
        start, end = self._rx_window(rx)
        if not start <= day <= end or rx["status"] in ("cancelled", "entered-in-error"):
            return False
        return not any(a <= day and (b is None or day < b) for a, b in self.rx_info[rx["id"]].holds)

    def _adherence(self) -> None:
        """Self-reports and pill counts weekly, pharmacy fills, observed dosing for MAT given in clinic."""
        rng = self.rng
        p_taken = {"good": 0.93, "fair": 0.8, "poor": 0.62}[self.adherence_profile]
        review_days = [d for d, _, _ in self.med_visits]
        for rx in self.prescriptions:
            if rx["setting"] == "discharge":
                continue
            reg = self.rx_info[rx["id"]].regimen
            start, end = self._rx_window(rx)
            if reg.key == "methadone":
                for day in self.attended_days:
                    if self._taking_on(rx, day) and day.weekday() != 6:
                        status = "taken" if rng.random() < 0.97 else "missed"
                        note = None if status == "taken" else "Did not present for dosing before the dispensary closed."
                        self._adherence_event(day, rx, status, "observed-dosing", note)
                continue
            if reg.key == "naltrexone-xr":
                day = start
                while day <= end:
                    if self._taking_on(rx, day):
                        self._adherence_event(day, rx, "taken", "observed-dosing", "Injection given in clinic.")
                    day += _days(28)
                continue
            if reg.key == "buprenorphine-naloxone" and rng.random() < 0.3 and self._taking_on(rx, start):
                self._adherence_event(start, rx, "taken", "observed-dosing", "First dose observed in clinic.")
            if rx["setting"] == "community" and start <= end and self._taking_on(rx, start):
                self._adherence_event(start, rx, "taken", "pharmacy-fill", None)
                fill = start + _days(rx["days_supply"])
                refills = rx["refills"]
                while refills > 0 and fill <= end:
                    late = rng.random() > p_taken
                    if late:
                        self._adherence_event(fill, rx, "missed", "pharmacy-fill", f"Refill picked up {rng.randint(3, 9)} days late.")
                    else:
                        self._adherence_event(fill, rx, "taken", "pharmacy-fill", None)
                    refills -= 1
                    fill += _days(rx["days_supply"])
            if rx["as_needed"]:
                continue  # PRN use is not scored as adherence
            for day in review_days:
                if day <= start or not self._taking_on(rx, day):
                    continue
                roll = rng.random()
                status = "taken" if roll < p_taken else "partial" if roll < p_taken + (1 - p_taken) / 2 else "missed"
                source = "pill-count" if (rng.random() < 0.15 and rx["dose"]["unit"] in ("{tbl}", "{Capsule}")) else "self-report"
                note = None
                if status == "missed":
                    note = rng.choice(("Missed several doses this week.", "Ran out before the refill.",
                                       "Stopped for two days because of side effects.", "Forgot doses while away from home."))
                elif status == "partial":
                    note = rng.choice(("Missed about one dose in four.", "Skips evening doses.", "Took a lower dose on some days."))
                self._adherence_event(day, rx, status, source, note)

    def _adherence_event(self, day: dt.date, rx: Json, status: str, source: str, note: str | None) -> None:
        self.adherence.append({
            "id": "", "date": day.isoformat(), "prescription_id": rx["id"], "status": status, "source": source, "note": note,
        })

    # -- assessments --------------------------------------------------------------------------

    def _score_days(self, every: int) -> list[dt.date]:
        """The first attended day of every ``every``-th week (week 0 is the intake day)."""
        chosen: list[dt.date] = []
        seen: set[int] = set()
        for day in self.attended_days:
            week = self._week(day)
            if week % every == 0 and week not in seen:
                seen.add(week)
                chosen.append(day)
        return chosen

    def _trajectory_scores(self, days: list[dt.date], baseline: int, top: int) -> list[int]:
        rng = self.rng
        slope = {"improving": -rng.uniform(1.2, 2.8), "flat": rng.uniform(-0.5, 0.5), "worsening": rng.uniform(0.8, 2.0)}[self.trajectory]
        floor = rng.randint(2, 6)
        scores = []
        for day in days:
            weeks = (day - self.start).days / 7
            value = baseline + slope * weeks * top / 27 + rng.gauss(0, 1.3)
            if self.trajectory == "improving":
                value = max(value, floor * top / 27)
            scores.append(max(0, min(top, round(value))))
        if scores:
            scores[0] = baseline
        return scores

    def _spread(self, total: int, weights: Sequence[float], top: int) -> list[int]:
        """Item scores summing to ``total``, each 0..top, more points on heavier-weighted items."""
        scores = [0] * len(weights)
        items = [i for i, w in enumerate(weights) if w > 0]
        item_weights = [weights[i] for i in items]
        placed = 0
        # Draw points in batches and drop those landing on a full item: the same distribution as
        # re-weighting after every point, at a fraction of the calls. Callers keep total <= capacity.
        while placed < total:
            for i in self.rng.choices(items, item_weights, k=2 * (total - placed)):
                if scores[i] < top:
                    scores[i] += 1
                    placed += 1
                    if placed == total:
                        break
        return scores

    def _assessment(self, instrument: str, day: dt.date, minute: int, items: list[int], performer: str,
                    extra: list[int] | None = None) -> Json:
        total = sum(items)
        numbered = [{"number": i + 1, "score": s} for i, s in enumerate(items)]
        for j, s in enumerate(extra or []):
            numbered.append({"number": len(items) + j + 1, "score": s})
        record = {
            "id": "",
            "instrument": instrument,
            "date": self._stamp(day, minute),
            "items": numbered,
            "total": total,
            "severity": _band(instrument, total, self.sex, items),
            "performer_id": self._use(performer),
        }
        self.assessments.append(record)
        return record

    def _assessments(self) -> None:
        rng = self.rng
        if not self.attended_days:
            return
        minute = self.group_start - 15
        every = 1 if rng.random() < 0.6 else 2
        days = self._score_days(every)
        intake = self.days[0]
        mh = set(self.mh)
        bipolar_code = self.codes.get("bipolar")
        if "depression" in mh or "ptsd" in mh:
            phq_base = rng.randint(14, 23)
        elif bipolar_code and bipolar_code not in _MANIC_BIPOLAR:
            phq_base = rng.randint(13, 22)
        elif mh:
            phq_base = rng.randint(7, 15)
        else:
            phq_base = rng.randint(5, 15)
        gad_base = rng.randint(12, 19) if "gad" in mh else rng.randint(10, 17) if "ptsd" in mh else rng.randint(5, 15)
        # PHQ-9 item 9 (self-harm thoughts) only for clients with suicidal ideation, easing with treatment.
        phq_weights = [1.0, 1.1, 1.3, 1.3, 1.0, 1.0, 1.0, 0.7, 0.6 if self.suicidal else 0.0]
        phq_totals = self._trajectory_scores(days, phq_base, 27)
        do_gad = rng.random() < 0.9 or "gad" in mh
        gad_totals = self._trajectory_scores(days, gad_base, 21)
        performer = self.therapist
        for i, (day, total) in enumerate(zip(days, phq_totals)):
            weights = list(phq_weights)
            if self.suicidal and i > 1:
                weights[8] = 0.2
            cap = 27 if weights[8] > 0 else 24
            items = self._spread(min(total, cap), weights, 3)
            if self.suicidal and i == 0 and items[8] == 0 and sum(items) > 0:
                # Intake screen of a client with ideation endorses item 9: move one point onto it.
                donor = max(range(8), key=lambda k: items[k])
                items[donor] -= 1
                items[8] = 1
            extra = [min(3, sum(items) // 7)] if rng.random() < 0.5 else None
            who = self.nurse if i == 0 else performer
            self._assessment("PHQ-9", day, minute, items, who, extra)
            self.phq_scores.append((day, sum(items)))
            if i == 0 and rng.random() < 0.3:
                self._assessment("PHQ-2", day, minute, items[:2], who)
            if do_gad:
                gad_items = self._spread(gad_totals[i], [1.2, 1.2, 1.1, 1.0, 0.8, 0.9, 0.8], 3)
                self._assessment("GAD-7", day, minute, gad_items, who)
                self.gad_scores.append((day, gad_totals[i]))
        # Substance-use screens at intake: AUDIT-C and DAST-10 for substance-use clients, AUDIT-C often for others.
        if self.substances or rng.random() < 0.3:
            if "alcohol" in self.substances:
                audit = [rng.randint(3, 4), rng.randint(1, 4), rng.randint(2, 4)]
            elif self.substances:
                audit = [rng.randint(0, 3), rng.randint(0, 2), rng.randint(0, 2)]
            else:
                audit = [rng.randint(0, 2), rng.randint(0, 1), rng.randint(0, 1)]
            self._assessment("AUDIT-C", intake, minute, audit, self.case_manager)
        if self.substances:
            drugs = [s for s in self.substances if s != "alcohol"]
            total = rng.randint(4, 9) if drugs else rng.randint(0, 2)
            weights = [1.5, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.6]
            dast = self._spread(total, weights, 1)
            if drugs and dast[0] == 0:
                # Item 1 ("used drugs other than those required for medical reasons") is the gateway "yes".
                donor = max(range(1, 10), key=lambda k: dast[k])
                dast[donor], dast[0] = 0, 1
            self._assessment("DAST-10", intake, minute, dast, self.case_manager)
        if self.cssrs is not None:
            self._assessment("C-SSRS-screen", intake, minute + 5, list(self.cssrs),
                             self.psychiatrist if rng.random() < 0.4 else self.therapist)

    # -- drug screens --------------------------------------------------------------------------

    def _expected_positive(self, day: dt.date) -> set[str]:
        """Analytes the prescriptions active that day explain (from the tables' analyte ingredients)."""
        ingredients = set()
        for rx in self.prescriptions:
            if self._taking_on(rx, day):
                med = terminology.medication(rx["medication"]["rxnorm"])
                if med:
                    ingredients.add(med["ingredient"])
        analytes = terminology.tables()["drug_screen_analytes"]
        return {a for a, spec in analytes.items() if ingredients & set(spec["ingredients"])}

    def _drug_screens(self) -> None:
        """Weekly observed urine screens for substance-use clients (an intake screen for some others)."""
        rng = self.rng
        if not self.attended_days:
            return
        if self.substances:
            days = [self.days[0]]
            for week in sorted({self._week(d) for d in self.attended_days} - {0}):
                candidates = [d for d in self.attended_days if self._week(d) == week]
                days.append(rng.choice(candidates))
        elif rng.random() < 0.2:
            days = [self.days[0]]
        else:
            return
        lapse_p = {"improving": 0.06, "flat": 0.13, "worsening": 0.25}[self.trajectory]
        cannabis_weeks = rng.randint(1, 4) if "cannabis" in self.substances else -1
        analyte_order = list(terminology.tables()["drug_screen_analytes"])
        opioid = "opioid" in self.substances
        for n, day in enumerate(days):
            expected = self._expected_positive(day)
            panel = {"opiates", "fentanyl", "buprenorphine", "methadone", "amphetamines", "cocaine", "benzodiazepines", "cannabinoids"}
            if opioid or "buprenorphine" in expected:
                panel |= {"norbuprenorphine", "norfentanyl"}
            if opioid or "methadone" in expected:
                panel.add("eddp")
            if "alcohol" in self.substances or rng.random() < 0.2:
                panel.add("ethyl-glucuronide")
            use: set[str] = set()
            if n == 0:
                for substance in self.substances:
                    p = {"cannabis": 0.75, "opioid": 0.5, "alcohol": 0.3}.get(substance, 0.5)
                    if rng.random() < p:
                        use |= self._analytes_for(substance)
            elif self.substances and rng.random() < lapse_p:
                use |= self._analytes_for(rng.choice(self.substances))
            if "cannabinoids" in panel and self._week(day) <= cannabis_weeks:
                use.add("cannabinoids")  # THC is excreted for weeks after heavy use
            if rng.random() < 0.01:
                use.add("benzodiazepines")  # non-prescribed benzodiazepine
            missed_mat = bool(expected & {"buprenorphine", "methadone"}) and n > 0 and rng.random() < (
                0.12 if self.adherence_profile == "poor" else 0.04)
            spiked = "buprenorphine" in expected and not missed_mat and rng.random() < 0.01
            results = []
            for analyte in analyte_order:
                if analyte not in panel:
                    continue
                if analyte in expected:
                    if missed_mat or (spiked and analyte == "norbuprenorphine"):
                        results.append({"analyte": analyte, "result": "negative", "expected": False})
                    else:
                        results.append({"analyte": analyte, "result": "positive", "expected": True})
                elif analyte in use:
                    results.append({"analyte": analyte, "result": "positive", "expected": False})
                elif rng.random() < 0.0015:  # e.g. a dilute specimen at the cut-off
                    results.append({"analyte": analyte, "result": "inconclusive", "expected": False})
                else:
                    results.append({"analyte": analyte, "result": "negative", "expected": True})
            minute = self.group_start - 20 + rng.randint(0, 15)
            collected = self._stamp(day, minute)
            self.drug_screens.append({"id": "", "collected": collected, "specimen": "urine", "method": "screen", "results": results})
            if missed_mat:
                mat_rx = next(rx for rx in self.prescriptions if self._taking_on(rx, day)
                              and terminology.medication(rx["medication"]["rxnorm"])["ingredient"] in ("buprenorphine", "methadone"))
                self._adherence_event(day, mat_rx, "missed", "self-report",
                                      "Urine negative for prescribed medication; reports running out early.")
            flagged = [r["analyte"] for r in results if r["result"] == "positive" and not r["expected"]]
            if spiked:
                flagged.append("norbuprenorphine")
            if flagged and n > 0 and rng.random() < 0.5:
                # The same specimen sent for confirmatory testing (LC-MS/MS).
                confirm = []
                for analyte in flagged:
                    if analyte in expected:
                        confirm.append({"analyte": analyte, "result": "negative", "expected": False})
                    elif rng.random() < 0.9:
                        confirm.append({"analyte": analyte, "result": "positive", "expected": False})
                    else:
                        confirm.append({"analyte": analyte, "result": "negative", "expected": True})
                self.drug_screens.append({"id": "", "collected": collected, "specimen": "urine", "method": "confirmatory",
                                          "results": confirm})

    def _analytes_for(self, substance: str) -> set[str]:
        if substance == "opioid":
            # Today's street opioid supply is mostly fentanyl; heroin shows as opiates.
            return {"fentanyl", "norfentanyl"} if self.rng.random() < 0.75 else {"opiates"}
        return set(_SUBSTANCE_ANALYTES[substance])

    # -- vitals and levels ----------------------------------------------------------------------

    def _vitals(self) -> None:
        rng = self.rng
        if not self.attended_days:
            return
        male = self.sex == "male"
        height = rng.gauss(176 if male else 163, 7)
        weight = max(45.0, min(160.0, rng.gauss(86 if male else 74, 15)))
        systolic_base = rng.randint(108, 138)
        diastolic_base = rng.randint(68, 88)
        gainers = {"olanzapine", "quetiapine", "divalproex", "lithium-er", "lithium-ir"}
        gaining = any(c.regimen.key in gainers for c in self.courses)
        opioid_withdrawal = "opioid" in self.substances
        intake = self.days[0]
        minute = self.group_start - 30
        if self.modality == "telehealth":
            # Virtual clients report a home scale weight at intake only.
            self._vital(intake, minute, "body-weight", value=round(weight, 1), unit="kg")
            return
        self._vital(intake, minute, "body-height", value=round(height, 1), unit="cm")
        self._vital(intake, minute, "body-weight", value=round(weight, 1), unit="kg")
        self._vital(intake, minute, "bmi", value=round(weight / (height / 100) ** 2, 1), unit="kg/m2")
        visits = [(intake, False)] + [(d, remote) for d, _, remote in self.med_visits[1:]]
        for day, remote in visits:
            if remote:
                continue
            weeks = (day - self.start).days / 7
            if day != intake:
                if rng.random() > (0.9 if gaining else 0.4):
                    continue
                weight += rng.uniform(0.2, 0.7) if gaining else rng.uniform(-0.6, 0.5)
                self._vital(day, minute, "body-weight", value=round(weight, 1), unit="kg")
            withdrawal = 12 if opioid_withdrawal and weeks < 1 else 0
            self._vital(day, minute, "blood-pressure", systolic=systolic_base + rng.randint(-8, 8) + withdrawal // 2,
                        diastolic=diastolic_base + rng.randint(-6, 6), unit="mm[Hg]")
            self._vital(day, minute, "heart-rate", value=rng.randint(62, 92) + withdrawal, unit="/min")

    def _vital(self, day: dt.date, minute: int, kind: str, *, value: float | None = None, systolic: int | None = None,
               diastolic: int | None = None, unit: str) -> None:
        self.vitals.append({
            "id": "", "date": self._stamp(day, minute), "kind": kind,
            "value": None if value is None else _num(value),
            "systolic": systolic, "diastolic": diastolic, "unit": unit,
        })

    def _drug_levels(self) -> None:
        """A level about a week after each lithium/valproate order (first orders and dose changes).

        Runs after the medication simulation, so a level is only drawn while its prescription is
        really being taken (not after it was stopped, replaced or held)."""
        orders = [(rx, dt.date.fromisoformat(rx["written"])) for rx in self.prescriptions
                  if self.rx_info[rx["id"]].regimen.level and rx["replaces_id"] is None]
        for rx, ordered in orders + self.level_orders:
            self._level_after(rx, ordered)

    def _level_after(self, rx: Json, ordered: dt.date) -> None:
        """Draw the steady-state level on the first attended day 5+ days after the order, if the
        prescription is still being taken then."""
        rng = self.rng
        target = ordered + _days(rng.randint(5, 7))
        for day in self.attended_days:
            if day >= target:
                if self._taking_on(rx, day) and not any(lv["_rx"] == rx["id"] for lv in self.drug_levels):
                    self._level(rx, day)
                return

    def _level(self, rx: Json, day: dt.date, high: bool = False) -> None:
        rng = self.rng
        reg = self.rx_info[rx["id"]].regimen
        daily = rx["dose"]["value"] * rx["timing"]["frequency"]
        if reg.level == "lithium":
            value = rng.uniform(1.25, 1.6) if high else daily / 1200 * rng.uniform(0.75, 1.05)
            level = {"analyte": "lithium", "value": _num(round(value, 2)), "unit": "mmol/L", "trough": True}
        else:
            value = rng.uniform(115, 140) if high else daily / 1000 * rng.uniform(55, 85)
            level = {"analyte": "valproate", "value": _num(round(value, 0)), "unit": "ug/mL", "trough": False}
        # Trough: drawn in the morning before the dose, i.e. before the program day starts.
        self.drug_levels.append({"id": "", "date": self._stamp(day, _hm("08:15")), **level,
                                 "prescription_id": rx["id"], "_rx": rx["id"]})

    # -- care plan -----------------------------------------------------------------------------

    def _care_plan(self) -> Json:
        rng = self.rng
        discharged = self.discharge_date is not None
        finished_well = self.disposition in ("completed", "stepped-down")
        goals: list[Json] = []

        def trend(scores: list[tuple[dt.date, int]]) -> str:
            if len(scores) < 2:
                return "in-progress"
            delta = scores[-1][1] - scores[0][1]
            return "improving" if delta <= -3 else "worsening" if delta >= 3 else "no-change"

        def measured(description: str, measure: str, scores: list[tuple[dt.date, int]], condition: str) -> None:
            achieved = bool(scores) and len(scores) > 1 and scores[-1][1] < 10
            goal: Json = {"id": f"goal-{len(goals) + 1}", "description": description}
            if discharged:
                if achieved:
                    goal["status"], goal["achievement"] = "completed", "achieved"
                elif self.disposition in ("left-against-advice", "administrative"):
                    goal["status"], goal["achievement"] = "cancelled", "not-achieved"
                else:
                    goal["status"], goal["achievement"] = "active", trend(scores)  # carried into aftercare
            else:
                goal["status"], goal["achievement"] = "active", "achieved" if achieved else trend(scores)
            goal["target"] = {"measure": measure, "comparator": "<", "value": 10, "due": self.planned_end.isoformat()}
            goal["addresses_ids"] = [self.dx_ids[condition]]
            goals.append(goal)

        def plain(description: str, condition: str | None, achieved: bool | None = None) -> None:
            goal: Json = {"id": f"goal-{len(goals) + 1}", "description": description}
            if discharged:
                ok = achieved if achieved is not None else finished_well and rng.random() < 0.7
                goal["status"] = "completed" if ok else "cancelled" if not finished_well else "active"
                goal["achievement"] = "achieved" if ok else "not-achieved" if not finished_well else "improving"
            else:
                goal["status"], goal["achievement"] = "active", "in-progress"
            goal["addresses_ids"] = [self.dx_ids[condition]] if condition else []
            goals.append(goal)

        mood = next((c for c in self.mh if c in ("depression", "bipolar", "ptsd")), None)
        if mood and self.phq_scores and self.phq_scores[0][1] >= 10:
            measured("Reduce depressive symptoms to the mild range or below (PHQ-9 below 10).", "PHQ-9", self.phq_scores, mood)
        if ("gad" in self.mh or "ptsd" in self.mh) and self.gad_scores and self.gad_scores[0][1] >= 10:
            measured("Reduce anxiety to the mild range or below (GAD-7 below 10).", "GAD-7", self.gad_scores,
                     "gad" if "gad" in self.mh else "ptsd")
        if "bipolar" in self.mh:
            plain("Maintain mood stability: take mood medication daily and keep a regular sleep schedule.", "bipolar")
        if "ptsd" in self.mh:
            plain("Use grounding skills daily and reduce trauma-related avoidance.", "ptsd")
        recent_positive = any(
            r["result"] == "positive" and not r["expected"] for s in self.drug_screens[-2:] for r in s["results"]
        )
        for substance in self.substances:
            plain(f"Abstain from {_SUBSTANCE_WORD[substance]}; negative urine drug screens.", substance,
                  achieved=None if not discharged else (not recent_positive and finished_well))
        mat = [c for c in self.courses if c.regimen.slot in ("moud", "aud")]
        if mat:
            drug = mat[0].regimen.key.split("-")[0]
            plain(f"Take {drug} as prescribed every day and keep every dosing or injection appointment.",
                  self.substances[0] if self.substances else None)
        if self.suicidal:
            plain("Stay safe: use the written safety plan, remove access to lethal means, call 988 in a crisis.",
                  self.primary_condition)
        if rng.random() < 0.4:
            plain("Return to work or school part-time with a daily structure.", None)

        goal_ids = [g["id"] for g in goals]
        end_status = "completed" if finished_well else "stopped"
        status = end_status if discharged else "in-progress"
        activities: list[Json] = []

        def activity(kind: str, description: str, days: int | None, minutes: int | None) -> None:
            item: Json = {"id": f"act-{len(activities) + 1}", "kind": kind, "description": description}
            if days is not None:
                item["days_per_week"] = days
            if minutes is not None:
                item["minutes_per_session"] = minutes
            item["status"] = status
            item["goal_ids"] = list(goal_ids)
            activities.append(item)

        focus = "co-occurring disorders" if self.kind == "dual" else "substance use" if self.kind == "sud" else "mood and anxiety"
        activity("group", f"Group psychotherapy (CBT/DBT skills, {focus}), 3 hours per program day.", self.days_per_week, 180)
        activity("individual", "Individual therapy with the primary therapist.", 1, 50)
        activity("medication-management", "Medication management: weekly review of response, side effects and adherence.", 1, 25)
        activity("psychoeducation", "Psychoeducation: illness, medications, sleep and relapse warning signs (first 4 weeks).", 1, 60)
        if self.family_sessions:
            activity("family", "Family therapy every other week with the client's chosen supports.", 1, 50)
        if self.substances:
            activity("relapse-prevention", "Relapse-prevention planning: triggers, coping skills, mutual-help meetings.", 1, 60)
            activity("drug-screening", "Observed urine drug screen at least weekly, random day.", 1, 15)
        relapse: list[str] = []
        if self.substances:
            relapse = self._relapse_prevention()
        plan: Json = {
            "id": "cp-1",
            "status": ("completed" if finished_well else "revoked") if discharged else "active",
            "created": (self.start + _days(rng.choice((0, 0, 1, 2)))).isoformat(),
            "period": {"start": self.start.isoformat(), "end": (self.discharge_date or self.planned_end).isoformat()},
            "addresses_ids": [self.dx_ids[c] for c in self.condition_order],
            "goals": goals,
            "activities": activities,
            "relapse_prevention": relapse,
            "summary": self._plan_summary(),
            "author_id": self._use(self.therapist),
        }
        return plan

    def _relapse_prevention(self) -> list[str]:
        rng = self.rng
        triggers = {
            "alcohol": ("Trigger: after-work drinks with coworkers", "Trigger: weekends alone at home"),
            "opioid": ("Trigger: contact with former using friends", "Trigger: chronic back pain flares"),
            "cannabis": ("Trigger: boredom in the evenings", "Trigger: trouble falling asleep"),
            "cocaine": ("Trigger: payday and cash on hand", "Trigger: nightlife with old friends"),
            "stimulant": ("Trigger: long work shifts and fatigue", "Trigger: contact with former dealer"),
        }
        items = [rng.choice(triggers[s]) for s in self.substances]
        items += rng.sample((
            "Coping: urge surfing and 15-minute delay before acting on a craving",
            "Coping: call sponsor or peer specialist when cravings start",
            "Coping: leave high-risk situations; have a ride home planned",
            "Coping: daily walk and regular meals and sleep",
            "Support: attends mutual-help meetings (AA/NA/SMART Recovery) twice a week",
            "Support: sibling and partner know the warning signs and the plan",
        ), k=3)
        if "opioid" in self.substances:
            items.append("Naloxone kit at home and carried; household members trained to use it")
        return items

    def _plan_summary(self) -> str:
        primary = terminology.icd10_display(self.codes[self.primary_condition]) or self.codes[self.primary_condition]
        meds = sorted({c.regimen.key.split("-")[0] for c in self.courses})
        med_text = f" Medications: {', '.join(meds)}." if meds else " No medication started; therapy only."
        return (
            f"{self.age}-year-old admitted to {self.site.level_of_care} ({self.modality}) for {primary.lower()}. "
            f"Plan: {self.days_per_week} days a week, 3 hours a day, for {self.weeks} weeks; weekly individual therapy "
            f"and medication management.{med_text}"
        )

    # -- discharge -----------------------------------------------------------------------------

    def _discharge(self) -> Json | None:
        rng = self.rng
        if self.discharge_date is None:
            return None
        day = self.discharge_date
        d = self.disposition
        sud = bool(self.substances)
        next_level = {
            "completed": _pick(rng, (("OP", 0.85), ("primary-care", 0.15))),
            "stepped-down": "OP",
            "stepped-up-php": "PHP",
            "stepped-up-inpatient": "residential" if sud and self.primary_condition in self.substances and rng.random() < 0.5 else "inpatient",
            "left-against-advice": "OP",
            "administrative": "OP",
        }[d]
        attended = len([s for s in self.sessions if s["attendance"] == "attended"])
        summary = self._discharge_summary(attended)
        result: Json = {"date": day.isoformat(), "disposition": d, "summary": summary}
        if d == "left-against-advice" and rng.random() < 0.4:
            return result  # left without an aftercare plan
        provider = self._aftercare_provider(next_level)
        follow_up = {"OP": rng.randint(2, 7), "primary-care": rng.randint(5, 14), "PHP": rng.randint(1, 3),
                     "inpatient": rng.randint(0, 1), "residential": rng.randint(0, 2)}[next_level]
        aftercare: Json = {"id": "ac-1", "next_level_of_care": next_level, "receiving_provider_id": provider}
        if d != "left-against-advice":
            aftercare["first_follow_up"] = (day + _days(follow_up)).isoformat()
        pharmacy = self.home_pharmacy
        if any(c.regimen.key == "methadone" and not c.ended for c in self.courses):
            pharmacy = self.site.pharmacies_of("opioid-treatment-program")[0].id
        self.pharmacies_used.add(pharmacy)
        aftercare["pharmacy_id"] = pharmacy
        aftercare["medications"] = self._discharge_medications()
        aftercare["instructions"] = self._aftercare_instructions(next_level)
        result["aftercare"] = aftercare
        self.aftercare_provider = provider
        return result

    def _aftercare_provider(self, level: str) -> str:
        sud = bool(self.substances)
        candidates = [p for p in self.site.providers if level in p.levels and (p.treats_sud if sud else p.treats_mh)]
        if sud and self.mh and level == "OP":
            both = [p for p in candidates if p.treats_mh]
            candidates = both or candidates
        if not candidates:
            candidates = [p for p in self.site.providers if level in p.levels]
        chosen = self.rng.choice(candidates).id
        self.providers_used.add(chosen)
        return chosen

    def _discharge_medications(self) -> list[Json]:
        """Each course's latest prescription: continue (unchanged), changed (a dose change or switch
        during the episode) or stopped."""
        meds: list[Json] = []
        for course in self.courses:
            rx = course.rx
            if rx["status"] == "active":
                if rx["replaces_id"]:
                    meds.append({"prescription_id": rx["id"], "disposition": "changed",
                                 "note": f"Changed during IOP; now {rx['instructions'].split('.')[0].lower()}."})
                else:
                    note = "Bridge supply until the first aftercare visit." if rx["setting"] == "discharge" else None
                    meds.append({"prescription_id": rx["id"], "disposition": "continue", "note": note})
            elif rx["status"] in ("stopped", "completed"):
                meds.append({"prescription_id": rx["id"], "disposition": "stopped", "note": rx["status_reason"]})
        return meds

    def _aftercare_instructions(self, level: str) -> str:
        parts = {
            "OP": "Attend the first outpatient appointment; continue weekly therapy and monthly medication follow-up.",
            "primary-care": "See the primary care clinician for medication follow-up; return to IOP if symptoms worsen.",
            "PHP": "Report to the partial hospitalization program for admission; bring the medication list.",
            "inpatient": "Transferred for inpatient psychiatric care; medication list and safety plan sent with the client.",
            "residential": "Admitted to residential treatment; medication list and recent drug screens sent with consent.",
        }
        text = parts[level]
        if "opioid" in self.substances:
            text += " Keep naloxone on hand."
        return text + " In a crisis call or text 988."

    def _discharge_summary(self, attended: int) -> str:
        first = self.phq_scores[0][1] if self.phq_scores else None
        last = self.phq_scores[-1][1] if self.phq_scores else None
        scores = f" PHQ-9 {first} at intake, {last} at last measurement." if first is not None else ""
        text = {
            "completed": "Completed the program.",
            "stepped-down": "Stepped down to outpatient care after sustained improvement.",
            "stepped-up-php": "Stepped up to partial hospitalization for worsening symptoms.",
            "stepped-up-inpatient": "Stepped up to a higher level of care for safety.",
            "left-against-advice": "Left the program against clinical advice after missed sessions and outreach.",
            "administrative": "Discharged for administrative reasons (coverage ended).",
        }[self.disposition]
        return f"{text} Attended {attended} of {len(self.sessions)} scheduled sessions.{scores}"

    # -- consents ------------------------------------------------------------------------------

    def _consents(self) -> list[Json]:
        rng = self.rng
        consents: list[Json] = []
        horizon = self.horizon
        aftercare_provider = self.aftercare_provider
        pcp = next(p.id for p in self.site.providers if "primary-care" in p.levels)

        def consent(recipient: str, purpose: str, categories: list[str], part2: bool, signed: dt.date) -> None:
            revoked = None
            if rng.random() < 0.1 and signed < horizon:
                revoked = signed + _days(rng.randint(1, max(1, (horizon - signed).days)))
            consents.append({
                "id": f"consent-{len(consents) + 1}",
                "recipient_id": recipient,
                "purpose": purpose,
                "categories": categories,
                "period": {"start": signed.isoformat(), "end": (signed + _days(365)).isoformat()},
                "part2": part2,
                "signed": signed.isoformat(),
                "revoked_on": revoked.isoformat() if revoked else None,
            })

        signed_late = self.discharge_date or horizon
        if self.substances:
            if rng.random() < 0.85:
                recipient = aftercare_provider or pcp
                signed = self.start if recipient == pcp else max(self.start, signed_late - _days(rng.randint(0, 7)))
                categories = rng.choice((
                    ["all"], ["diagnoses", "medications", "drug-screens", "care-plan", "discharge"],
                    ["medications", "discharge"], ["diagnoses", "medications", "assessments", "discharge"],
                ))
                consent(recipient, "TREAT", categories, True, signed)
                self.providers_used.add(recipient)
            if recipient_pcp := (pcp if rng.random() < 0.3 and pcp != aftercare_provider else None):
                consent(recipient_pcp, "TREAT", ["diagnoses", "medications"], True, self.start)
                self.providers_used.add(recipient_pcp)
            mat_retail = [c for c in self.courses if c.regimen.slot in ("moud", "aud") and c.regimen.pharmacy_kind == "retail"]
            if mat_retail and rng.random() < 0.3:
                consent(self.home_pharmacy, "TREAT", ["medications"], True, self.start)
        elif rng.random() < 0.4:
            recipient = aftercare_provider if aftercare_provider and rng.random() < 0.6 else pcp
            consent(recipient, rng.choice(("TREAT", "COC")), ["diagnoses", "medications", "care-plan"], False, self.start)
            self.providers_used.add(recipient)
        return consents

    # -- assembly ------------------------------------------------------------------------------

    def _assemble(self, care_plan: Json, discharge: Json | None, consents: list[Json]) -> Json:
        site = self.site
        referral = self.rng.choice(site.referral_sources)
        if referral == "Primary care physician":
            self.providers_used.add(next(p.id for p in site.providers if "primary-care" in p.levels))
        enrolment: Json = {
            "status": "finished" if discharge else "active",
            "start": self.start.isoformat(),
            "planned_end": self.planned_end.isoformat(),
        }
        if discharge:
            enrolment["actual_end"] = discharge["date"]
        enrolment["schedule"] = {"days_per_week": self.days_per_week, "hours_per_day": 3, "weeks": self.weeks}
        enrolment["modality"] = self.modality
        enrolment["referral_source"] = referral

        diagnoses = []
        for condition in self.condition_order:
            code = self.codes[condition]
            dx: Json = {
                "id": self.dx_ids[condition],
                "code": code,
                "display": terminology.icd10_display(code),
                "rank": "primary" if condition == self.primary_condition else "secondary",
            }
            status = "active"
            if code.startswith("F33") and self.rng.random() < 0.3:
                status = "recurrence"
            elif condition in self.substances and self.rng.random() < 0.15:
                status = "relapse"
            dx["clinical_status"] = status
            if self.rng.random() < 0.7:
                earliest = add_months(self.birth, 12 * 14)
                latest = self.start - _days(30)
                if earliest < latest:
                    dx["onset"] = (earliest + _days(self.rng.randint(0, (latest - earliest).days))).isoformat()
            diagnoses.append(dx)
        if self.suicidal and self.rng.random() < 0.25:
            diagnoses.append({"id": f"dx-{len(diagnoses) + 1}", "code": "R45.851",
                              "display": terminology.icd10_display("R45.851"), "rank": "secondary",
                              "clinical_status": "active", "onset": self.start.isoformat()})

        def numbered(items: list[Json], prefix: str, key: str) -> list[Json]:
            ordered = sorted(items, key=lambda item: item[key])  # stable: same-day items keep creation order
            out = []
            for i, item in enumerate(ordered):
                clean = {k: v for k, v in item.items() if v is not None and not k.startswith("_")}
                clean["id"] = f"{prefix}-{i + 1}"
                out.append(clean)
            return out

        record: Json = {
            "version": RECORD_VERSION,
            "id": f"ep-{self.index:06d}",
            "program": site.program_json(),
            "client": self.client_json,
            "enrolment": enrolment,
            "diagnoses": diagnoses,
            "care_team": [c.to_json(site.email_domain) for c in site.clinicians if c.id in self.team_used],
            "pharmacies": [p.to_json() for p in site.pharmacies if p.id in self.pharmacies_used],
            "providers": [p.to_json() for p in site.providers if p.id in self.providers_used],
            "prescriptions": [{k: v for k, v in rx.items() if v is not None} for rx in self.prescriptions],
            "medication_reviews": numbered(self.reviews, "rev", "date"),
            "adherence": numbered(self.adherence, "adh", "date"),
            "side_effects": numbered(self.side_effects, "se", "date"),
            "assessments": numbered(self.assessments, "asm", "date"),
            "drug_screens": numbered(self.drug_screens, "uds", "collected"),
            "vitals": numbered(self.vitals, "vit", "date"),
            "drug_levels": numbered(self.drug_levels, "lvl", "date"),
            "sessions": self.sessions,
        }
        record["care_plan"] = care_plan
        if discharge:
            if "aftercare" in discharge:
                discharge["aftercare"]["medications"] = [
                    {k: v for k, v in m.items() if v is not None} for m in discharge["aftercare"]["medications"]
                ]
            record["discharge"] = discharge
        record["consents"] = [{k: v for k, v in c.items() if v is not None} for c in consents]
        return record


# --- public API -------------------------------------------------------------------------------


def generate_record(index: int, seed: int) -> dict[str, Any]:
    """One synthetic IOP record for position ``index`` of the cohort ``seed``.

    Depends only on ``(seed, index)``: the same pair always gives the same record, byte for byte once
    dumped, whatever else was generated before. The result is what
    ``IopRecord.model_dump(mode="json", exclude_none=True)`` would produce and passes
    ``validate_record``.

    :param index: position in the cohort, ``>= 0``; the record id is ``ep-{index:06d}``.
    :param seed: cohort seed; different seeds give different cohorts.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return _Episode(index, seed).build()


def generate_cohort(n: int, seed: int) -> Iterator[dict[str, Any]]:
    """Yield records ``0 .. n-1`` of cohort ``seed`` one at a time (never holding the cohort in memory).

    :param n: number of records, ``>= 0``.
    :param seed: cohort seed, as for :func:`generate_record`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    for index in range(n):
        yield generate_record(index, seed)
