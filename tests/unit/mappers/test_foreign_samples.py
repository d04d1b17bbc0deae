"""Foreign FHIR through the reverse mappers: mapped as far as it goes, the rest reported.

Other systems' FHIR comes here from C-CDA: ``read_ccda`` turns HL7's public examples
(``../shared/samples/ccda``, CC0, skipped when absent) and one hand-written IOP discharge
document into the FHIR another EHR would send, and ``resources_to_record`` must never raise,
must keep what the IOP record can hold and must say, per resource, why it dropped the rest.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from iop_fhir.formats.ccda import CcdaResult, read_ccda
from iop_fhir.mappers.bundle import ReverseResult, resources_to_record
from iop_fhir.terminology import RXNORM, tables

# Where the shared_dir fixture looks (../shared beside the clone), read here to name the cases.
SAMPLE_DIR = Path(__file__).resolve().parents[4] / "shared" / "samples" / "ccda"
SAMPLES = sorted(p.name for p in SAMPLE_DIR.glob("*") if p.suffix.lower() == ".xml") if SAMPLE_DIR.is_dir() else []
SEVERITIES = {"fatal", "error", "warning", "information"}
# What the record can hold, by resource type; a resource of these types is kept or explained.
HOLDABLE = ("Patient", "Condition", "MedicationRequest", "MedicationStatement", "MedicationDispense", "Observation", "CarePlan", "Goal", "ServiceRequest", "Encounter")
# Reverse-mapper gaps these samples show: no family in mappers/bundle.py reads these types, and
# nothing reports a resource no family read. Where they are all that is missing the test below
# is an expected failure naming them; once the mappers keep or report them it simply passes.
KNOWN_GAPS = {"MedicationStatement", "MedicationDispense"}


@cache
def _read(path: Path) -> tuple[CcdaResult, ReverseResult]:
    data = path.read_bytes()
    foreign = read_ccda(data, fragment=b"<ClinicalDocument" not in data)
    return foreign, resources_to_record(foreign.resources)


@pytest.fixture
def reverse(shared_dir):
    def run(name: str) -> tuple[CcdaResult, ReverseResult]:
        path = shared_dir / "samples" / "ccda" / name
        if not path.is_file():
            pytest.skip(f"{name} is not in ../shared/samples/ccda")
        return _read(path)

    return run


def mentioned(back: ReverseResult, resource: dict) -> bool:
    """Whether the report says something located at this resource."""
    here = f"{resource['resourceType']}/{resource['id']}"
    return any(i.location == here or i.location.startswith((here + ".", here + "[")) for i in back.report.issues)


def kept(back: ReverseResult, resource: dict) -> bool:
    """Whether the draft holds what this resource carries (the kinds the record keeps by code)."""
    draft = back.draft
    if resource["resourceType"] in ("MedicationRequest", "MedicationStatement", "MedicationDispense"):
        rxnorm = {c.get("code") for c in resource.get("medicationCodeableConcept", {}).get("coding", []) if c.get("system") == RXNORM}
        return any(p.get("medication", {}).get("rxnorm") in rxnorm for p in draft.get("prescriptions") or [])
    return False


def covered(foreign: CcdaResult, back: ReverseResult) -> set[str]:
    """Resources kept or explained, and what those point at (panel members, plan activities)."""
    by_ref = {f"{r['resourceType']}/{r['id']}": r for r in foreign.resources}
    done = {ref for ref, r in by_ref.items() if kept(back, r) or mentioned(back, r)}
    todo = list(done)
    while todo:
        for target in _references(by_ref[todo.pop()]):
            if target in by_ref and target not in done:
                done.add(target)
                todo.append(target)
    return done


def _references(value) -> list[str]:
    if isinstance(value, dict):
        found = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return found + [ref for item in value.values() for ref in _references(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in _references(item)]
    return []


@pytest.mark.parametrize("name", SAMPLES)
def test_foreign_sample_never_raises_and_always_reports(reverse, name):
    foreign, back = reverse(name)
    assert isinstance(back.draft, dict)
    assert back.report.issues, "a foreign document never maps without a word"
    for issue in back.report.issues:
        assert issue.severity in SEVERITIES
        assert isinstance(issue.location, str) and issue.location
        assert isinstance(issue.message, str) and issue.message
    # Order is the sender's business: the reverse mapping copes with any.
    resources_to_record(list(reversed(foreign.resources)))


@pytest.mark.parametrize("name", SAMPLES)
def test_what_the_record_can_hold_is_kept_or_explained(reverse, name):
    foreign, back = reverse(name)
    done = covered(foreign, back)
    silent = sorted(
        f"{r['resourceType']}/{r['id']}"
        for r in foreign.resources
        if r["resourceType"] in HOLDABLE and f"{r['resourceType']}/{r['id']}" not in done
    )
    if silent and {ref.split("/")[0] for ref in silent} <= KNOWN_GAPS:
        pytest.xfail(f"reverse mappers drop {sorted({ref.split('/')[0] for ref in silent})} without a word: {silent}")
    assert silent == []


def test_phq9_sample_becomes_an_assessment(reverse):
    foreign, back = reverse("Patient Health Questionnaire PHQ-9(C-CDAR2.1).xml")
    (assessment,) = back.draft["assessments"]
    assert (assessment["instrument"], assessment["total"], assessment["severity"]) == ("PHQ-9", 12, "moderate")
    assert [i["number"] for i in assessment["items"]] == list(range(1, 10))
    assert sum(i["score"] for i in assessment["items"]) == 12
    # Item 10 (difficulty) has a coded answer only: the report says it was dropped.
    assert any("item 10" in i.message for i in back.report.issues)


def test_discharge_summary_medication_is_explained_precisely(reverse):
    foreign, back = reverse("Discharge_Summary.xml")
    (request,) = foreign.of_type("MedicationRequest")
    here = f"MedicationRequest/{request['id']}"
    why = {i.location: i.message for i in back.report.issues if i.location.startswith(here) and i.severity == "error"}
    assert why, "the discharge ibuprofen is neither kept nor explained"
    assert back.draft["client"]["name"]["family"] == "Jones"


def test_sample_without_a_patient_says_so(reverse):
    _, back = reverse("Medication Activity (V2) Example.xml")
    assert back.record is None
    assert any(i.location == "Patient" and i.severity == "error" for i in back.report.issues)


# --- a hand-written IOP discharge document (our own, not from the samples) ---------------------

T = tables()
PHQ = T["instruments"]["PHQ-9"]
SCORES = [1, 2, 1, 2, 1, 1, 2, 1, 0]
BUPRENORPHINE_SCREEN = T["drug_screen_analytes"]["buprenorphine"]["screen"]["code"]
SCREEN_PANEL = T["drug_screen_panels"]["screen"]["code"]
FILM = "1010604"  # buprenorphine 8 MG / naloxone 2 MG Sublingual Film (terminology table)
SNOMED_OID, LOINC_OID, RXNORM_OID = "2.16.840.1.113883.6.96", "2.16.840.1.113883.6.1", "2.16.840.1.113883.6.88"


def _item(code: str, score: int) -> str:
    answer = T["phq_answers"][score]["code"]
    return f"""<entryRelationship typeCode="COMP"><observation classCode="OBS" moodCode="EVN">
      <templateId root="2.16.840.1.113883.10.20.22.4.86"/><id root="2.16.840.1.113883.19.5.99999.81" extension="{code}"/>
      <code code="{code}" codeSystem="{LOINC_OID}"/><statusCode code="completed"/><effectiveTime value="202503031400-0500"/>
      <value xsi:type="INT" value="{score}"/><value xsi:type="CO" code="{answer}" codeSystem="{LOINC_OID}"/>
    </observation></entryRelationship>"""


def _section(root: str, entry: str) -> str:
    return f"<component><section><templateId root='2.16.840.1.113883.10.20.22.2.{root}'/><entry>{entry}</entry></section></component>"


IOP_DISCHARGE = f"""<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <templateId root="2.16.840.1.113883.10.20.22.1.2" extension="2015-08-01"/>
 <id root="2.16.840.1.113883.19.5.99999.1" extension="IOP-DC-1"/>
 <confidentialityCode code="R" codeSystem="2.16.840.1.113883.5.25"/>
 <recordTarget><patientRole><id root="2.16.840.1.113883.19.5.99999.2" extension="MRN-0042"/>
   <patient><name use="L"><given>Alex</given><family>Rivera</family></name>
     <administrativeGenderCode code="F" codeSystem="2.16.840.1.113883.5.1"/><birthTime value="19900101"/></patient>
 </patientRole></recordTarget>
 <author><time value="202503041200-0500"/><assignedAuthor><id root="2.16.840.1.113883.4.6" extension="1234567893"/>
   <code code="2084P0800X" codeSystem="2.16.840.1.113883.6.101"/>
   <assignedPerson><name><given>Dana</given><family>Okafor</family></name></assignedPerson></assignedAuthor></author>
 <component><structuredBody>
 {_section("5.1", f'''<act classCode="ACT" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.3"/>
   <statusCode code="active"/><entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN">
   <templateId root="2.16.840.1.113883.10.20.22.4.4"/><id root="2.16.840.1.113883.19.5.99999.61" extension="dx1"/>
   <code code="55607006" codeSystem="{SNOMED_OID}"/><statusCode code="completed"/><effectiveTime><low value="20250110"/></effectiveTime>
   <value xsi:type="CD" code="F11.20" codeSystem="2.16.840.1.113883.6.90"/></observation></entryRelationship></act>''')}
 {_section("11.1", f'''<act classCode="ACT" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.35"/>
   <code code="10183-2" codeSystem="{LOINC_OID}"/><statusCode code="completed"/>
   <entryRelationship typeCode="SUBJ"><substanceAdministration classCode="SBADM" moodCode="INT">
   <templateId root="2.16.840.1.113883.10.20.22.4.16"/><id root="2.16.840.1.113883.19.5.99999.71" extension="RX-1"/>
   <statusCode code="active"/><effectiveTime xsi:type="IVL_TS"><low value="20250304"/></effectiveTime>
   <effectiveTime xsi:type="PIVL_TS" institutionSpecified="true" operator="A"><period value="1" unit="d"/></effectiveTime>
   <routeCode code="C38300" codeSystem="2.16.840.1.113883.3.26.1.1"/><doseQuantity value="1" unit="1"/>
   <consumable><manufacturedProduct><manufacturedMaterial><code code="{FILM}" codeSystem="{RXNORM_OID}"/></manufacturedMaterial></manufacturedProduct></consumable>
   <author><time value="202503041015-0500"/><assignedAuthor><id root="2.16.840.1.113883.4.6" extension="1234567893"/></assignedAuthor></author>
   <entryRelationship typeCode="REFR"><supply classCode="SPLY" moodCode="INT"><templateId root="2.16.840.1.113883.10.20.22.4.17"/>
     <statusCode code="active"/><repeatNumber value="3"/><quantity value="14" unit="1"/></supply></entryRelationship>
   </substanceAdministration></entryRelationship></act>''')}
 {_section("56", f'''<observation classCode="OBS" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.69"/>
   <id root="2.16.840.1.113883.19.5.99999.80" extension="phq-1"/><code code="{PHQ['panel']['code']}" codeSystem="{LOINC_OID}"/>
   <statusCode code="completed"/><effectiveTime value="202503031400-0500"/><value xsi:type="INT" value="{sum(SCORES)}"/>
   {''.join(_item(i['code'], s) for i, s in zip(PHQ['items'], SCORES))}</observation>''')}
 {_section("3.1", f'''<organizer classCode="BATTERY" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.1"/>
   <id root="2.16.840.1.113883.19.5.99999.90" extension="uds-1"/><code code="{SCREEN_PANEL}" codeSystem="{LOINC_OID}"/>
   <statusCode code="completed"/><effectiveTime value="202503031000-0500"/>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.2"/>
     <id root="2.16.840.1.113883.19.5.99999.91" extension="uds-1-bup"/><code code="{BUPRENORPHINE_SCREEN}" codeSystem="{LOINC_OID}"/>
     <statusCode code="completed"/><effectiveTime value="202503031000-0500"/>
     <value xsi:type="CD" code="10828004" codeSystem="{SNOMED_OID}"/></observation></component></organizer>''')}
 </structuredBody></component>
</ClinicalDocument>"""


def test_hand_written_iop_discharge_document_maps_into_the_draft():
    foreign = read_ccda(IOP_DISCHARGE.encode())
    assert all(r["meta"]["security"][0]["code"] == "R" for r in foreign.resources)  # Part 2 label travels
    back = resources_to_record(foreign.resources)
    draft = back.draft
    assert draft["client"]["mrn"] == "MRN-0042"
    assert [d["code"] for d in draft["diagnoses"]] == ["F11.20"]
    (member,) = draft["care_team"]
    assert (member["role"], member["npi"]) == ("psychiatrist", "1234567893")  # NUCC code via PractitionerRole
    (prescription,) = draft["prescriptions"]
    assert prescription["medication"]["rxnorm"] == FILM
    assert (prescription["setting"], prescription["refills"], prescription["route"]) == ("discharge", 2, "sublingual")
    assert prescription["prescriber_id"] == member["id"]
    (assessment,) = draft["assessments"]
    assert (assessment["instrument"], assessment["total"]) == ("PHQ-9", sum(SCORES))
    assert [i["score"] for i in assessment["items"]] == SCORES
    (screen,) = draft["drug_screens"]
    assert screen["results"][0]["analyte"] == "buprenorphine" and screen["results"][0]["result"] == "positive"
    # A document carries no IOP enrolment: the record stays a draft, and the report says why.
    assert back.record is None
    assert {i.location for i in back.report.errors} >= {"EpisodeOfCare", "record/program"}
    assert all(i.message and i.location and i.severity in SEVERITIES for i in back.report.issues)
