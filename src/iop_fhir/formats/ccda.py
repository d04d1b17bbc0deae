"""C-CDA R2.1 documents in, FHIR R4 resources out: another EHR's record, as its FHIR would look.

Why: EHRs that cannot speak FHIR send C-CDA (CCDs, Discharge Summaries). Reading one gives the
same kind of input as foreign FHIR, so the reverse mappers take it from there and report what
the IOP record cannot hold. This module reads; it decides nothing about the IOP record.

``read_ccda(data)`` parses through :func:`.safe_xml.parse` (the one hardened parser: no DTD, no
entities, size and depth limits; root must be ``ClinicalDocument``) and returns a
:class:`CcdaResult`: FHIR R4 JSON dicts, each valid against the R4 models, and the issues met —
what could not be read, at XPath-like locations (``/ClinicalDocument/component/.../entry[2]/act``).
Input that is not a C-CDA document at all (not XML, a DTD, another root) raises
:class:`.safe_xml.XmlRejected`; anything odd inside a document is an issue, never an exception.

What is read (field tables in :mod:`.ccda_entries`, datatypes in :mod:`.ccda_types`):

* header: ``recordTarget`` -> Patient (identifiers, names, telecom, gender, birth date,
  address, marital status, race/ethnicity, language, guardian, birthplace, religion; the
  ``providerOrganization`` as managingOrganization); ``author``s -> Practitioner (and a
  PractitionerRole for their role code and organization) or Organization;
  ``custodian`` -> Organization; ``componentOf/encompassingEncounter`` -> Encounter (period,
  discharge disposition, participants). The document's confidentiality ``R``/``V`` (and a
  stricter one on a section or entry) labels every resource's ``meta.security`` (§12: 42 CFR
  Part 2 restrictions must travel with the data).
* body: every section, nested sections included; each entry by its templates
  (:data:`.ccda_entries.TEMPLATES`); a Plan of Treatment section also becomes one CarePlan.
  HL7's example fragments (a section or an entry) are read with ``fragment=True``.

Not read, and reported: header participants other than the above (legal authenticator,
informants, data enterer, recipients, ``documentationOf``), sections with narrative only (the
narrative is the attested text; nothing structured to map), entry templates outside the table,
DS4P privacy markings beyond the confidentiality code, and an unstructured ``nonXMLBody``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

from lxml import etree

from iop_fhir.errors import Issue

from .ccda_entries import PLAN_ACTIVITY_TYPES, Scope, care_plan, read_entry
from .ccda_types import CDA_NAMESPACE, JSON, Context, clean, is_null, statement, template_roots
from .fhir_validate import validate_resource
from .safe_xml import XmlRejected, child_text, children, first_child, local_name, namespace, parse

__all__ = ["SECTIONS", "CcdaResult", "read_ccda"]

S = "2.16.840.1.113883.10.20.22.2."  # C-CDA section template arc
IHE = "1.3.6.1.4.1.19376.1.5.3.1.3."

# Section templateId root -> (name, kind). The kind sets what entries inherit (discharge
# medications are discharge requests; a plan section becomes a CarePlan); "" marks sections
# whose entries the gateway does not read, so a narrative-only one is no loss worth a warning.
SECTIONS: dict[str, tuple[str, str]] = {
    S + "1": ("Medications", "medications"),
    S + "1.1": ("Medications", "medications"),
    S + "11": ("Discharge Medications", "discharge-medications"),
    S + "11.1": ("Discharge Medications", "discharge-medications"),
    S + "44": ("Admission Medications", "medications"),
    S + "38": ("Medications Administered", "medications"),
    S + "5": ("Problems", "problems"),
    S + "5.1": ("Problems", "problems"),
    S + "3": ("Results", "results"),
    S + "3.1": ("Results", "results"),
    S + "4": ("Vital Signs", "vital-signs"),
    S + "4.1": ("Vital Signs", "vital-signs"),
    S + "56": ("Mental Status", "mental-status"),
    S + "10": ("Plan of Treatment", "plan"),
    S + "60": ("Goals", "goals"),
    S + "58": ("Health Concerns", "health-concerns"),
    S + "24": ("Discharge Diagnosis", "problems"),
    S + "43": ("Admission Diagnosis", "problems"),
    S + "17": ("Social History", "social-history"),
    S + "6": ("Allergies", ""),
    S + "6.1": ("Allergies", ""),
    S + "2": ("Immunizations", ""),
    S + "2.1": ("Immunizations", ""),
    S + "22": ("Encounters", ""),
    S + "22.1": ("Encounters", ""),
    S + "7": ("Procedures", ""),
    S + "7.1": ("Procedures", ""),
    S + "15": ("Family History", ""),
    S + "14": ("Functional Status", ""),
    S + "21": ("Advance Directives", ""),
    S + "23": ("Medical Equipment", ""),
    S + "18": ("Payers", ""),
    S + "13": ("Chief Complaint and Reason for Visit", ""),
    S + "20": ("Past Medical History", ""),
    S + "41": ("Hospital Discharge Instructions", ""),
    S + "42": ("Hospital Consultations", ""),
    S + "16": ("Hospital Discharge Studies Summary", ""),
    S + "9": ("Assessment and Plan", ""),
    S + "8": ("Assessment", ""),
    S + "45": ("Instructions", ""),
    S + "61": ("Health Status Evaluations and Outcomes", ""),
    IHE + "4": ("History of Present Illness", ""),
    IHE + "5": ("Hospital Course", ""),
    IHE + "18": ("Review of Systems", ""),
    IHE + "26": ("Hospital Discharge Physical", ""),
}

DOCUMENT_TYPES = {
    "2.16.840.1.113883.10.20.22.1.2": "Continuity of Care Document",
    "2.16.840.1.113883.10.20.22.1.8": "Discharge Summary",
    "2.16.840.1.113883.10.20.22.1.13": "Transfer Summary",
    "2.16.840.1.113883.10.20.22.1.14": "Referral Note",
    "2.16.840.1.113883.10.20.22.1.9": "Progress Note",
    "2.16.840.1.113883.10.20.22.1.15": "Care Plan",
    "2.16.840.1.113883.10.20.22.1.10": "Unstructured Document",
}
US_REALM_HEADER = "2.16.840.1.113883.10.20.22.1.1"
DS4P_ARC = "2.16.840.1.113883.3.3251."  # HL7 Data Segmentation for Privacy templates

# Header participations read elsewhere or not at all, each reported once when present.
HEADER_UNMAPPED = {
    "dataEnterer": "who typed the document in",
    "informant": "who informed the document",
    "informationRecipient": "to whom it was sent",
    "legalAuthenticator": "who signed it",
    "authenticator": "who verified it",
    "participant": "support persons and other participants",
    "inFulfillmentOf": "the orders it fulfils",
    "documentationOf": "the care events it summarises (and their performers)",
    "relatedDocument": "the document it replaces or appends to",
    "authorization": "the consents it was made under",
}

_XML_DECLARATION = re.compile(r"\s*<\?xml[^>]*\?>")
_FRAGMENT_ROOT = (
    f'<ClinicalDocument xmlns="{CDA_NAMESPACE}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    'xmlns:sdtc="urn:hl7-org:sdtc">'
)

OMB_RACE = frozenset({"1002-5", "2028-9", "2054-5", "2076-8", "2106-3"})
OMB_ETHNICITY = frozenset({"2135-2", "2186-5"})
US_CORE_EXT = "http://hl7.org/fhir/us/core/StructureDefinition/"
FHIR_EXT = "http://hl7.org/fhir/StructureDefinition/"
GENDER = {"M": "male", "F": "female", "UN": "other"}
CLINICAL_STATEMENTS = frozenset(
    {"act", "observation", "organizer", "substanceAdministration", "supply", "encounter", "procedure", "regionOfInterest", "observationMedia"}
)
# Section kinds whose entries we read: an empty one may hide what the reader is for.
READ_KINDS = frozenset(kind for _, kind in SECTIONS.values() if kind)


@dataclass
class CcdaResult:
    """What one C-CDA document gave: FHIR R4 resources (valid), and what could not be read."""

    resources: list[JSON]
    issues: list[Issue]

    def counts(self) -> dict[str, int]:
        """Resources by type, e.g. ``{"Patient": 1, "MedicationStatement": 2}``."""
        return dict(Counter(r["resourceType"] for r in self.resources))

    def of_type(self, resource_type: str) -> list[JSON]:
        return [r for r in self.resources if r["resourceType"] == resource_type]


def read_ccda(data: bytes | str, *, fragment: bool = False) -> CcdaResult:
    """Read a C-CDA document into FHIR R4 resources and a list of issues.

    :param fragment: ``data`` is a fragment as HL7 publishes its examples (a section, an entry
        or a clinical statement, UTF-8, namespaces undeclared): it is read inside a bare
        ``ClinicalDocument`` that declares the CDA, ``xsi`` and ``sdtc`` namespaces.
    :raises XmlRejected: not XML, a DTD, too large or deep, or a root other than ``ClinicalDocument``.
    """
    if fragment:
        data = _in_document(data)
    root = parse(data, expected_root={"ClinicalDocument"})
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    ctx = Context(doc_key=_document_key(root, raw))
    _narrative(ctx, root)
    _check_document(ctx, root)
    _patient(ctx, root)
    _parties(ctx, root)
    _encounter(ctx, root)
    _walk(ctx, root, Scope())
    _keep_valid(ctx)
    return CcdaResult(ctx.resources, ctx.issues)


# --- the document ---------------------------------------------------------------------------


def _in_document(data: bytes | str) -> bytes:
    """A fragment inside a bare ClinicalDocument. Nothing is trusted: the result still goes
    through the hardened parser, and a DOCTYPE in the fragment is malformed there."""
    if not isinstance(data, str):
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise XmlRejected(f"a C-CDA fragment must be UTF-8: {exc.reason} at byte {exc.start}") from None
    text = data.lstrip("\ufeff")
    declaration = _XML_DECLARATION.match(text)
    if declaration:
        text = text[declaration.end() :]
    return (_FRAGMENT_ROOT + text + "</ClinicalDocument>").encode("utf-8")


def _document_key(root: etree._Element, raw: bytes) -> str:
    """The document id (root|extension) that seeds ids of entries without their own; the
    content's hash when the document has none."""
    ident = first_child(root, "id")
    if ident is not None and ident.get("root") and not ident.get("nullFlavor"):
        return f"{ident.get('root').strip()}|{(ident.get('extension') or '').strip()}"
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _narrative(ctx: Context, root: etree._Element) -> None:
    """Index every narrative element with an ``ID`` so ``reference/@value="#x"`` resolves."""
    for el in root.iter():
        if isinstance(el.tag, str) and el.get("ID"):
            text = clean("".join(el.itertext()))
            if text:
                ctx.narrative.setdefault(el.get("ID"), text)


def _check_document(ctx: Context, root: etree._Element) -> None:
    if namespace(root) != CDA_NAMESPACE:
        ctx.issue(root, f"root element is not in the {CDA_NAMESPACE} namespace; read by local names", code="structure")
    if first_child(root, "id") is None or is_null(first_child(root, "id")):
        ctx.info(root, "document has no id; ids of entries without their own derive from its content")
    roots = template_roots(root)
    if not any(r in DOCUMENT_TYPES or r == US_REALM_HEADER for r in roots):
        ctx.info(root, "no C-CDA R2.1 document template; read as far as the entry templates allow")
    code = first_child(root, "confidentialityCode")
    if code is not None and code.get("code"):
        ctx.confidentiality = code.get("code").strip().upper()
    marked = next((el for el in root.iter("{*}templateId") if (el.get("root") or "").startswith(DS4P_ARC)), None)
    if marked is not None:
        ctx.issue(
            marked,
            "DS4P privacy markings are not read: only confidentialityCode travels into meta.security; review before any disclosure",
            code="security",
        )
    for name, what in HEADER_UNMAPPED.items():
        found = first_child(root, name)
        if found is not None:
            ctx.info(found, f"{name} ({what}) is not mapped")
    if first_child(root, "recordTarget") is None:
        ctx.issue(root, "no recordTarget: the resources read name no patient", "error", "required")


def _walk(ctx: Context, el: etree._Element, scope: Scope) -> None:
    """Find sections and clinical statements below the header, whatever wraps them."""
    found_body = False
    for child in children(el):
        name = local_name(child)
        if name == "section":
            found_body = True
            _section(ctx, child, scope)
        elif name in ("component", "structuredBody", "entry"):
            found_body = True
            _walk(ctx, child, scope)
        elif name == "nonXMLBody":
            found_body = True
            ctx.issue(child, "an unstructured body (nonXMLBody) has no entries to map")
        elif name in CLINICAL_STATEMENTS:
            found_body = True
            read_entry(ctx, child, scope)
    if not found_body and local_name(el) == "ClinicalDocument":
        ctx.issue(el, "document has no body; nothing clinical to map", code="incomplete")


def _section(ctx: Context, section: etree._Element, outer: Scope) -> None:
    roots = template_roots(section)
    code = first_child(section, "code")
    spec = next((SECTIONS[r] for r in roots if r in SECTIONS), None)
    title = clean(child_text(section, "title"))
    label = repr(title or (spec[0] if spec else None) or (code.get("code") if code is not None else None) or "untitled")
    if section.get("nullFlavor"):
        ctx.info(section, f"section {label} says it holds no information (nullFlavor {section.get('nullFlavor')})")
        return
    if first_child(section, "subject") is not None:
        ctx.issue(section, f"section {label} is about a related subject, not the patient; not mapped")
        return
    if spec is None:
        ctx.info(section, f"section {label} has no known template ({', '.join(roots) or 'none'}); its entries are read by their own templates")
    kind = spec[1] if spec else outer.section  # a subsection without a known template is its parent's
    scope = Scope(
        section=kind,
        discharge=kind == "discharge-medications",
        authors=(*outer.authors, section),
        details=[] if kind == "plan" else None,
    )
    made: list[JSON] = []
    entries = list(children(section, "entry"))
    for entry in entries:
        inner = statement(entry)
        if inner is not None:
            made.extend(read_entry(ctx, inner, scope))
    for component in children(section, "component"):
        nested = first_child(component, "section")
        if nested is not None:
            _section(ctx, nested, scope)
    if not entries:
        what = f"section {label}" + (f" (LOINC {code.get('code')})" if code is not None and code.get("code") else "")
        if kind in READ_KINDS:
            ctx.issue(section, f"{what} has narrative only: nothing structured to map, its text is not carried into FHIR", code="incomplete")
        else:
            ctx.info(section, f"{what} has narrative only; not mapped")
    if kind == "plan":
        activities = [ref for ref in made if ref["reference"].split("/", 1)[0] in PLAN_ACTIVITY_TYPES]
        goals = [ref for ref in made if ref["reference"].startswith("Goal/")]
        care_plan(ctx, section, activities, scope.details or [], goals, title)


# --- header ---------------------------------------------------------------------------------


def _patient(ctx: Context, root: etree._Element) -> None:
    targets = list(children(root, "recordTarget"))
    if len(targets) > 1:
        ctx.issue(targets[1], "more than one recordTarget; only the first patient is read")
    role = first_child(targets[0], "patientRole") if targets else None
    if role is None:
        if targets:
            ctx.issue(targets[0], "recordTarget without a patientRole; no patient read", "error", "required")
        return
    person = first_child(role, "patient")
    identifiers = ctx.identifiers(role)
    seeds = [f"{i.get('system', '')}|{i['value']}" for i in identifiers if i.get("system") != "http://hl7.org/fhir/sid/us-ssn"]
    resource: JSON = {
        "resourceType": "Patient",
        "id": ctx.mint("Patient", role, seeds),
        "identifier": identifiers,
        "telecom": ctx.telecoms(role),
        "address": ctx.addresses(role),
        "managingOrganization": ctx.organization(first_child(role, "providerOrganization")),
    }
    if person is None:
        ctx.issue(role, "patientRole without a patient: no name, gender or birth date", code="incomplete")
    else:
        resource.update(_person(ctx, person))
    ctx.patient = ctx.add(resource, role)


def _person(ctx: Context, person: etree._Element) -> JSON:
    gender_el = first_child(person, "administrativeGenderCode")
    gender = None
    if gender_el is not None:
        gender = "unknown" if gender_el.get("nullFlavor") else GENDER.get((gender_el.get("code") or "").upper())
        if gender is None:
            ctx.issue(gender_el, f"administrative gender {gender_el.get('code')!r} is not M, F or UN; not mapped", code="value")
    deceased = first_child(person, "deceasedInd")
    deceased_time = ctx.datetime(first_child(person, "deceasedTime"))
    contacts = [_guardian(ctx, g) for g in children(person, "guardian")]
    communication = []
    for language in children(person, "languageCommunication"):
        code = first_child(language, "languageCode")
        if code is None or not code.get("code"):
            continue
        preferred = first_child(language, "preferenceInd")
        communication.append(
            {
                "language": {"coding": [{"system": "urn:ietf:bcp:47", "code": code.get("code").strip()}]},
                **({"preferred": preferred.get("value") == "true"} if preferred is not None and preferred.get("value") in ("true", "false") else {}),
            }
        )
    extensions = [
        _omb(ctx, person, "raceCode", "us-core-race", OMB_RACE),
        _omb(ctx, person, "ethnicGroupCode", "us-core-ethnicity", OMB_ETHNICITY),
    ]
    religion = ctx.concept(first_child(person, "religiousAffiliationCode"))
    if religion is not None:
        extensions.append({"url": FHIR_EXT + "patient-religion", "valueCodeableConcept": religion})
    place = first_child(first_child(person, "birthplace"), "place") if first_child(person, "birthplace") is not None else None
    birthplace = ctx.addresses(place) if place is not None else []
    if birthplace:
        extensions.append({"url": FHIR_EXT + "patient-birthPlace", "valueAddress": birthplace[0]})
    return {
        "extension": [e for e in extensions if e],
        "name": ctx.names(person),
        "gender": gender,
        "birthDate": ctx.datetime(first_child(person, "birthTime"), date_only=True),
        "deceasedDateTime": deceased_time,
        "deceasedBoolean": (deceased.get("value") == "true") if deceased is not None and not deceased_time and deceased.get("value") in ("true", "false") else None,
        "maritalStatus": ctx.concept(first_child(person, "maritalStatusCode")),
        "contact": [c for c in contacts if c],
        "communication": communication,
    }


def _omb(ctx: Context, person: etree._Element, name: str, profile: str, omb: frozenset[str]) -> JSON | None:
    """US Core race/ethnicity extension from raceCode (+ sdtc:raceCode) or ethnicGroupCode."""
    parts, texts = [], []
    for el in children(person, name):
        coding = ctx.coding(el) if not el.get("nullFlavor") else None
        if coding is None:
            continue
        parts.append({"url": "ombCategory" if coding["code"] in omb else "detailed", "valueCoding": coding})
        texts.append(coding.get("display") or coding["code"])
    if not parts:
        return None
    return {"url": US_CORE_EXT + profile, "extension": [*parts, {"url": "text", "valueString": ", ".join(texts)}]}


def _guardian(ctx: Context, guardian: etree._Element) -> JSON | None:
    names = ctx.names(first_child(guardian, "guardianPerson"))
    addresses = ctx.addresses(guardian)
    relationship = ctx.concept(first_child(guardian, "code"))
    contact = {
        "relationship": [relationship] if relationship else None,
        "name": names[0] if names else None,
        "telecom": ctx.telecoms(guardian),
        "address": addresses[0] if addresses else None,
        "organization": ctx.organization(first_child(guardian, "guardianOrganization")),
    }
    return {k: v for k, v in contact.items() if v} or None


def _parties(ctx: Context, root: etree._Element) -> None:
    """Document authors and the custodian as Practitioner/Organization resources."""
    for author in children(root, "author"):
        role = first_child(author, "assignedAuthor")
        if ctx.party(role) is None:
            ctx.issue(author, "author names nobody (no person, id or organization); not mapped", code="incomplete")
    custodian = first_child(first_child(root, "custodian"), "assignedCustodian") if first_child(root, "custodian") is not None else None
    org = first_child(custodian, "representedCustodianOrganization") if custodian is not None else None
    if org is not None and ctx.organization(org) is None:
        ctx.issue(org, "custodian organization names nothing; not mapped", code="incomplete")


def _encounter(ctx: Context, root: etree._Element) -> None:
    """``componentOf/encompassingEncounter`` -> Encounter (the visit or stay the document is about)."""
    component = first_child(root, "componentOf")
    encounter = first_child(component, "encompassingEncounter") if component is not None else None
    if encounter is None:
        return
    found = ctx.when(first_child(encounter, "effectiveTime"))
    period = ({"start": found[1]} if found[0] == "DateTime" else found[1]) if found else None
    status = "finished" if period and period.get("end") else "in-progress" if period else "unknown"
    code = ctx.concept(first_child(encounter, "code"))
    act_code = next((c for c in (code or {}).get("coding", []) if c.get("system", "").endswith("/v3-ActCode")), None)
    if act_code is None:
        ctx.info(encounter, "encounter class not given as an HL7 ActCode; class says unknown (NullFlavor UNK)")
    participants = []
    for holder, name in (("responsibleParty", "assignedEntity"), ("encounterParticipant", "assignedEntity")):
        for part in children(encounter, holder):
            who = ctx.party(first_child(part, name))
            if who and who["reference"].startswith("Practitioner/"):
                participants.append({"individual": who})
    location = first_child(encounter, "location")
    facility = first_child(location, "healthCareFacility") if location is not None else None
    if facility is not None:
        ctx.info(facility, "the facility (location) of the encounter is not mapped")
    provider = ctx.organization(first_child(facility, "serviceProviderOrganization")) if facility is not None else None
    discharge = ctx.concept(first_child(encounter, "dischargeDispositionCode"))
    resource = {
        "resourceType": "Encounter",
        "id": ctx.mint("Encounter", encounter),
        "identifier": ctx.identifiers(encounter),
        "status": status,
        "class": act_code or {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "UNK", "display": "unknown"},
        "type": [code] if code else None,
        "subject": ctx.subject(),
        "participant": participants,
        "period": period,
        "hospitalization": {"dischargeDisposition": discharge} if discharge else None,
        "serviceProvider": provider,
    }
    ctx.encounter = ctx.add(resource, encounter)


def _keep_valid(ctx: Context) -> None:
    """Last line of defence: a resource that fails R4 validation is left out and reported, so
    what the reader returns always validates (the readers aim never to get here)."""
    kept = []
    for resource in ctx.resources:
        errors = [i for i in validate_resource(resource) if i.severity in ("error", "fatal")]
        if errors:
            where = f"{resource.get('resourceType')}/{resource.get('id')}"
            ctx.issue(where, f"the {resource.get('resourceType')} read here is not valid R4 ({errors[0]}); left out", "error", "exception")
        else:
            kept.append(resource)
    ctx.resources[:] = kept
