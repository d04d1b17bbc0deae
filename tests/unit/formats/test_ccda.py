"""C-CDA reader: HL7's public examples and hand-written documents in, valid FHIR R4 out.

The samples are read from ``../shared/samples/ccda`` (CC0, never copied here); the tests that
need them skip when the folder is absent. The hand-written documents below are our own.
"""

from __future__ import annotations

import uuid
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from iop_fhir.formats import ccda_entries
from iop_fhir.formats.ccda import CcdaResult, read_ccda
from iop_fhir.formats.ccda_entries import Template
from iop_fhir.formats.ccda_types import NAMESPACE
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.formats.safe_xml import XmlRejected
from iop_fhir.terminology import LOINC, OBSERVATION_INTERPRETATION, RXNORM, SNOMED, V3_CONFIDENTIALITY, tables

# Where the shared_dir fixture looks (../shared beside the clone), read here to name the cases.
SAMPLE_DIR = Path(__file__).resolve().parents[4] / "shared" / "samples" / "ccda"
SAMPLES = sorted(p.name for p in SAMPLE_DIR.glob("*") if p.suffix.lower() == ".xml") if SAMPLE_DIR.is_dir() else []
SEVERITIES = {"fatal", "error", "warning", "information"}
NCI = "http://ncimeta.nci.nih.gov"


@cache
def _read_path(path: Path) -> CcdaResult:
    data = path.read_bytes()
    return read_ccda(data, fragment=b"<ClinicalDocument" not in data)


@pytest.fixture
def sample(shared_dir):
    """Read one sample by name (a whole document as sent, an HL7 fragment as a fragment)."""

    def read(name: str) -> CcdaResult:
        path = shared_dir / "samples" / "ccda" / name
        if not path.is_file():
            pytest.skip(f"{name} is not in ../shared/samples/ccda")
        return _read_path(path)

    return read


def one(result: CcdaResult, resource_type: str, **where) -> dict:
    found = [r for r in result.of_type(resource_type) if all(r.get(k) == v for k, v in where.items())]
    assert len(found) == 1, f"{len(found)} {resource_type} matching {where}: {result.counts()}"
    return found[0]


def codes(concept: dict | None, system: str) -> list[str]:
    return [c["code"] for c in (concept or {}).get("coding", []) if c.get("system") == system]


def resolve(result: CcdaResult, reference: dict) -> dict:
    kind, rid = reference["reference"].split("/")
    return one(result, kind, id=rid)


def messages(result: CcdaResult, severity: str | None = None) -> list[str]:
    return [i.message for i in result.issues if severity is None or i.severity == severity]


# --- every sample ----------------------------------------------------------------------------


def test_the_samples_are_there(shared_dir):
    assert len(SAMPLES) >= 11, f"expected HL7's C-CDA examples in {SAMPLE_DIR}"


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_reads_into_valid_r4(sample, name):
    result = sample(name)
    for resource in result.resources:
        assert validate_resource(resource) == [], (resource["resourceType"], resource["id"])
    ids = [(r["resourceType"], r["id"]) for r in result.resources]
    assert len(ids) == len(set(ids))
    # No reader tripped and nothing was dropped by the validity safety net.
    assert not [i for i in result.issues if i.code == "exception"]
    for issue in result.issues:
        assert issue.severity in SEVERITIES and issue.message
        assert issue.location.startswith("/ClinicalDocument")


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_references_resolve_within_the_result(sample, name):
    result = sample(name)
    known = {f"{r['resourceType']}/{r['id']}" for r in result.resources}

    def walk(value):
        if isinstance(value, dict):
            ref = value.get("reference")
            if isinstance(ref, str):
                assert ref in known, ref
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(result.resources)


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_reads_the_same_twice(shared_dir, name):
    data = (shared_dir / "samples" / "ccda" / name).read_bytes()
    first = read_ccda(data, fragment=b"<ClinicalDocument" not in data)
    second = read_ccda(data, fragment=b"<ClinicalDocument" not in data)
    assert first.resources == second.resources
    assert first.issues == second.issues


# --- what each sample gives --------------------------------------------------------------------


def test_phq9_is_a_survey_observation_with_its_items(sample):
    result = sample("Patient Health Questionnaire PHQ-9(C-CDAR2.1).xml")
    (panel,) = [o for o in result.of_type("Observation") if o.get("hasMember")]
    assert codes(panel["code"], LOINC) == ["44249-1"]
    assert panel["valueInteger"] == 12
    assert codes(panel["category"][0], "http://terminology.hl7.org/CodeSystem/observation-category") == ["survey"]
    assert codes(panel["interpretation"][0], OBSERVATION_INTERPRETATION) == ["H"]
    assert panel["effectiveDateTime"] == "2015-06-22"
    assert panel["referenceRange"] == [{"low": {"value": 0}, "high": {"value": 4}, "text": "0-4"}]
    members = [resolve(result, ref) for ref in panel["hasMember"]]
    by_code = {codes(m["code"], LOINC)[0]: m for m in members}
    phq = tables()["instruments"]["PHQ-9"]
    assert {i["code"] for i in phq["items"]} <= set(by_code)
    assert by_code[phq["total"]["code"]]["valueInteger"] == 12
    first = by_code["44250-9"]["valueCodeableConcept"]["coding"][0]
    assert (first["code"], first["extension"][0]["valueDecimal"]) == ("LA6568-5", 0)
    scores = [by_code[i["code"]]["valueCodeableConcept"]["coding"][0]["extension"][0]["valueDecimal"] for i in phq["items"]]
    assert sum(scores) == 12


def test_medication_activity_is_a_statement_with_rxnorm_and_sig(sample):
    result = sample("Medication Activity (V2) Example.xml")
    statement = one(result, "MedicationStatement")
    assert codes(statement["medicationCodeableConcept"], RXNORM) == ["197380"]
    assert statement["status"] == "active"
    assert statement["effectivePeriod"] == {"start": "2012-03-18"}
    dosage = statement["dosage"][0]
    assert dosage["timing"]["repeat"] == {"frequency": 2, "period": 1, "periodUnit": "d"}  # BID
    assert codes(dosage["route"], NCI) == ["C38288"]
    assert dosage["doseAndRate"] == [{"doseQuantity": {"value": 1}}]
    assert codes(statement["reasonCode"][0], SNOMED) == ["38341003"]


def test_medications_with_indications_and_instructions(sample):
    result = sample("Med oral with indications and instructions(C-CDA2.1).xml")
    prn, instructed, indicated = result.of_type("MedicationStatement")
    for statement in (prn, instructed, indicated):
        assert codes(statement["medicationCodeableConcept"], RXNORM) == ["197806"]
        assert "Every 6 Hours" in statement["dosage"][0]["text"]  # the free-text sig, from the narrative
    assert codes(prn["dosage"][0]["asNeededCodeableConcept"], SNOMED) == ["57676002"]
    assert prn["dosage"][0]["timing"]["repeat"] == {"frequency": 4, "period": 1, "periodUnit": "d"}
    assert instructed["dosage"][0]["timing"]["repeat"] == {"frequency": 1, "period": 6, "periodUnit": "h"}
    assert instructed["dosage"][0]["patientInstruction"] == "Do not take on an empty stomach."
    assert codes(indicated["reasonCode"][0], SNOMED) == ["57676002"]


def test_planned_medication_is_a_plan_request_named_by_its_text(sample):
    result = sample("Planned Medication Activity (V2) Example.xml")
    request = one(result, "MedicationRequest")
    assert (request["intent"], request["status"]) == ("plan", "active")
    assert request["medicationCodeableConcept"] == {"text": "Heparin 0.25 ml Prefilled Syringe"}
    assert request["dosageInstruction"][0]["timing"] == {"event": ["2013-09-05"]}
    assert "medication not coded in RxNorm" in messages(result)


def test_supply_order_is_an_order_with_its_dispense_request(sample):
    result = sample("Medication Supply Order (V2) Example.xml")
    request = one(result, "MedicationRequest")
    assert request["intent"] == "order"
    assert request["dispenseRequest"] == {"validityPeriod": {"start": "2007-01-03"}, "numberOfRepeatsAllowed": 0, "quantity": {"value": 75}}
    # HL7 elided the product: the request says so instead of guessing.
    assert request["medicationCodeableConcept"]["extension"][0]["valueCode"] == "unknown"
    assert any("not identified" in m for m in messages(result, "warning"))


def test_dispense_is_a_first_fill(sample):
    dispense = one(sample("Medication Dispense (V2) Example.xml"), "MedicationDispense")
    assert dispense["status"] == "completed"
    assert dispense["whenHandedOver"] == "2012-08-15T14:50:00-08:00"
    assert dispense["quantity"] == {"value": 75}
    assert dispense["type"]["coding"][0]["code"] == "FF"


def test_discharge_medication_example_is_a_discharge_request(sample):
    result = sample("Discharge Medication (V3) Example.xml")
    request = one(result, "MedicationRequest")
    assert request["category"][0]["coding"][0]["code"] == "discharge"
    assert request["intent"] == "plan"  # HL7's example has an EVN activity inside (CF-MedActivityMood)
    assert any("Discharge Medication" in m for m in messages(result, "information"))


def test_discharge_summary(sample):
    result = sample("Discharge_Summary.xml")
    patient = one(result, "Patient")
    assert (patient["name"][0]["family"], patient["gender"], patient["birthDate"]) == ("Jones", "female", "2005-05-01")
    encounter = one(result, "Encounter")
    assert encounter["status"] == "finished"
    assert encounter["period"] == {"start": "2014-09-09T19:04:00-05:00", "end": "2014-09-16T19:04:00-05:00"}
    assert encounter["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "01"
    request = one(result, "MedicationRequest")
    assert request["category"][0]["coding"][0]["code"] == "discharge"
    assert (request["intent"], request["status"]) == ("order", "active")
    assert codes(request["medicationCodeableConcept"], RXNORM) == ["197806"]
    assert request["encounter"] == {"reference": f"Encounter/{encounter['id']}"}
    assert request["dosageInstruction"][0]["asNeededBoolean"] is True
    diagnoses = [c for c in result.of_type("Condition") if c["category"][0]["coding"][0]["code"] == "encounter-diagnosis"]
    assert len(diagnoses) == 2 and all(c["encounter"]["reference"] == f"Encounter/{encounter['id']}" for c in diagnoses)
    plan = one(result, "CarePlan")
    assert resolve(result, plan["activity"][0]["reference"])["resourceType"] == "ServiceRequest"
    assert plan["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">')
    # HL7 reused entry ids: each resource keeps its own id, and the reuse is reported.
    assert any(i.code == "duplicate" for i in result.issues)
    assert any("narrative only" in m for m in messages(result))


def test_result_panel_gives_lab_observations_with_interpretations(sample):
    result = sample("Result panel with coded values of negative-positive(C-CDA2.1).xml")
    report = one(result, "DiagnosticReport")
    assert codes(report["code"], LOINC) == ["70161-5"]
    assert report["category"][0]["coding"][0]["code"] == "LAB"
    negative, positive = (resolve(result, ref) for ref in report["result"])
    for obs in (negative, positive):
        assert obs["category"][0]["coding"][0]["code"] == "laboratory"
        assert obs["referenceRange"] == [{"text": "A negative value is a normal result"}]
    assert (codes(negative["code"], LOINC), codes(negative["valueCodeableConcept"], SNOMED)) == (["42931-6"], ["260385009"])
    assert codes(negative["interpretation"][0], OBSERVATION_INTERPRETATION) == ["N"]
    assert (codes(positive["code"], LOINC), codes(positive["valueCodeableConcept"], SNOMED)) == (["60256-5"], ["10828004"])
    assert codes(positive["interpretation"][0], OBSERVATION_INTERPRETATION) == ["A"]
    assert any("interpretation 'A'" in m for m in messages(result, "information"))


def test_plan_of_treatment_example_reports_what_it_cannot_read(sample):
    result = sample("Plan of Treatment Section (V2) Example.xml")
    assert result.resources == []
    said = messages(result)
    assert any(m.startswith("Handoff Communication Participants is not mapped") for m in said)
    assert any(m.startswith("Planned Encounter names nothing") for m in said)


def test_ccd(sample):
    result = sample("CCD.XML")
    patient = one(result, "Patient")
    assert patient["identifier"] == [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "444222222"}]
    # An id must not be a hash of an SSN (nine digits are quickly tried).
    assert patient["id"] != str(uuid.uuid5(NAMESPACE, "Patient|http://hl7.org/fhir/sid/us-ssn|444222222"))
    albuterol = next(s for s in result.of_type("MedicationStatement") if "basedOn" in s)
    medication = resolve(result, albuterol["medicationReference"])
    assert codes(medication["code"], RXNORM) == ["573621"]
    assert medication["ingredient"][0]["isActive"] is False  # the drug vehicle
    assert codes(albuterol["dosage"][0]["asNeededCodeableConcept"], SNOMED) == ["56018004"]
    order = resolve(result, albuterol["basedOn"][0])
    assert order["dispenseRequest"]["numberOfRepeatsAllowed"] == 0  # repeatNumber 1 = the first fill only
    assert resolve(result, order["requester"])["resourceType"] == "Practitioner"
    fill = resolve(result, albuterol["derivedFrom"][0])
    assert fill["authorizingPrescription"] == albuterol["basedOn"]
    assert {resolve(result, p["actor"])["resourceType"] for p in fill["performer"]} == {"Practitioner", "Organization"}
    pneumonia = next(c for c in result.of_type("Condition") if c.get("abatementDateTime") == "2008-08-14")
    assert pneumonia["clinicalStatus"]["coding"][0]["code"] == "resolved"
    assert any(i.code == "business-rule" for i in result.issues)  # resolved before its onset
    assert len(result.of_type("DiagnosticReport")) == 2
    panels = [o for o in result.of_type("Observation") if o.get("hasMember")]
    assert {o["category"][0]["coding"][0]["code"] for o in panels} == {"vital-signs"}
    assert one(result, "CarePlan")["activity"]
    assert sum("Allergy Concern Act is not mapped" in m for m in messages(result, "warning")) == 2


# --- hostile and odd input ---------------------------------------------------------------------

CDA_OPEN = '<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
PATIENT = """<recordTarget><patientRole>
  <id root="2.16.840.1.113883.19.5.99999.2" extension="MRN-0042"/>
  <patient><name use="L"><given>Alex</given><family>Rivera</family></name>
    <administrativeGenderCode code="UN" codeSystem="2.16.840.1.113883.5.1"/><birthTime value="19900101"/></patient>
</patientRole></recordTarget>"""


def document(body: str = "", *, header: str = PATIENT, extra: str = "", doc_id: str = "T1") -> bytes:
    """A small C-CDA document of our own around ``body`` (section components)."""
    return (
        f"{CDA_OPEN}<templateId root='2.16.840.1.113883.10.20.22.1.1' extension='2015-08-01'/>"
        f"<id root='2.16.840.1.113883.19.5.99999.1' extension='{doc_id}'/>{extra}{header}"
        f"<component><structuredBody>{body}</structuredBody></component></ClinicalDocument>"
    ).encode()


def section(*entries: str, root: str = "2.16.840.1.113883.10.20.22.2.1.1", attrs: str = "", extra: str = "") -> str:
    items = "".join(f"<entry>{e}</entry>" for e in entries)
    return f"<component><section{attrs}><templateId root='{root}'/><title>T</title>{extra}{items}</section></component>"


def medication(*, mood: str = "INT", rx_id: str = "RX-1", rxnorm: str = "1010604", inner: str = "", attrs: str = "", timing: str = "") -> str:
    return f"""<substanceAdministration classCode="SBADM" moodCode="{mood}"{attrs}>
  <templateId root="2.16.840.1.113883.10.20.22.4.16" extension="2014-06-09"/>
  <id root="2.16.840.1.113883.19.5.99999.71" extension="{rx_id}"/>
  <statusCode code="active"/>
  <effectiveTime xsi:type="IVL_TS"><low value="20250304"/><high nullFlavor="UNK"/></effectiveTime>
  {timing}
  <doseQuantity value="1"/>
  <consumable><manufacturedProduct classCode="MANU"><templateId root="2.16.840.1.113883.10.20.22.4.23"/>
    <manufacturedMaterial><code code="{rxnorm}" codeSystem="2.16.840.1.113883.6.88"/></manufacturedMaterial>
  </manufacturedProduct></consumable>{inner}
</substanceAdministration>"""


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not xml at all",
        b"<ClinicalDocument xmlns='urn:hl7-org:v3'><unclosed></ClinicalDocument>",
        b"<Bundle xmlns='http://hl7.org/fhir'><type value='collection'/></Bundle>",
        b"\xff\xfe\x00garbage",
    ],
    ids=["empty", "text", "malformed", "wrong-root", "binary"],
)
def test_what_is_not_a_clinical_document_is_refused(data):
    with pytest.raises(XmlRejected):
        read_ccda(data)


def test_dtd_and_external_entities_are_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    xxe = (
        f'<?xml version="1.0"?><!DOCTYPE ClinicalDocument [<!ENTITY x SYSTEM "file://{secret}">]>'
        f"{CDA_OPEN}<title>&x;</title></ClinicalDocument>"
    ).encode()
    for data in (xxe, b'<!DOCTYPE ClinicalDocument SYSTEM "http://127.0.0.1:9/x.dtd"><ClinicalDocument/>'):
        with pytest.raises(XmlRejected) as caught:
            read_ccda(data)
        assert "TOP-SECRET" not in str(caught.value)
    # A fragment cannot smuggle a DTD in either: inside the wrapper it is malformed.
    with pytest.raises(XmlRejected):
        read_ccda(b'<!DOCTYPE x [<!ENTITY y "z">]><section>&y;</section>', fragment=True)
    with pytest.raises(XmlRejected):
        read_ccda(b"\xff\xfe<section/>", fragment=True)


def test_empty_clinical_document_gives_issues_not_resources():
    result = read_ccda(b"<ClinicalDocument xmlns='urn:hl7-org:v3'/>")
    assert result.resources == []
    said = {(i.severity, i.message) for i in result.issues}
    assert ("error", "no recordTarget: the resources read name no patient") in said
    assert any("no body" in m for _, m in said)
    assert all(i.location == "/ClinicalDocument" for i in result.issues)


def test_document_outside_the_cda_namespace_is_read_by_local_names():
    data = document(section(medication())).replace(b'xmlns="urn:hl7-org:v3" ', b"")
    result = read_ccda(data)
    assert one(result, "MedicationRequest")
    assert any("namespace" in m for m in messages(result, "warning"))


def test_unknown_and_missing_templates_are_issues_at_their_place():
    unknown = "<observation classCode='OBS' moodCode='EVN'><templateId root='1.2.3.4.5'/><code code='x'/></observation>"
    bare = "<act classCode='ACT' moodCode='EVN'><code code='y'/></act>"
    result = read_ccda(document(section(unknown, bare)))
    assert [r["resourceType"] for r in result.resources] == ["Patient"]
    found = {i.location: i.message for i in result.issues if i.severity == "warning"}
    base = "/ClinicalDocument/component/structuredBody/component/section"
    assert "unknown templates (1.2.3.4.5)" in found[f"{base}/entry[1]/observation"]
    assert "without a templateId" in found[f"{base}/entry[2]/act"]


def test_sections_without_entries_or_with_null_flavor_are_reported():
    body = section(root="2.16.840.1.113883.10.20.22.2.1.1") + section(attrs=" nullFlavor='NI'", root="2.16.840.1.113883.10.20.22.2.5.1")
    result = read_ccda(document(body))
    assert any("narrative only" in i.message and i.severity == "warning" for i in result.issues)
    assert any("nullFlavor NI" in i.message for i in result.issues)


def test_medication_request_fields_from_a_hand_written_entry():
    supply = """<entryRelationship typeCode="REFR"><supply classCode="SPLY" moodCode="INT">
      <templateId root="2.16.840.1.113883.10.20.22.4.17"/><id root="2.16.840.1.113883.19.5.99999.72" extension="RX-1"/>
      <statusCode code="active"/>
      <effectiveTime xsi:type="IVL_TS"><low value="20250304"/><high value="20250904"/></effectiveTime>
      <repeatNumber value="3"/><quantity value="14"/>
      <author><time value="202503041015-0500"/><assignedAuthor><id root="2.16.840.1.113883.4.6" extension="1234567893"/>
        <assignedPerson><name><given>Dana</given><family>Okafor</family></name></assignedPerson></assignedAuthor></author>
    </supply></entryRelationship>"""
    timing = """<effectiveTime xsi:type="EIVL_TS" operator="A"><event code="HS"/>
      <offset xsi:type="IVL_PQ"><low value="1" unit="h"/></offset></effectiveTime>"""
    result = read_ccda(document(section(medication(inner=supply, timing=timing), root="2.16.840.1.113883.10.20.22.2.11.1")))
    request = one(result, "MedicationRequest")
    assert request["identifier"] == [{"system": "urn:oid:2.16.840.1.113883.19.5.99999.71", "value": "RX-1"}]
    assert request["category"][0]["coding"][0]["code"] == "discharge"  # a Discharge Medications section
    assert request["dispenseRequest"] == {
        "validityPeriod": {"start": "2025-03-04", "end": "2025-09-04"},
        "numberOfRepeatsAllowed": 2,
        "quantity": {"value": 14},
    }
    assert request["authoredOn"] == "2025-03-04T10:15:00-05:00"
    prescriber = resolve(result, request["requester"])
    assert prescriber["identifier"] == [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}]
    repeat = request["dosageInstruction"][0]["timing"]["repeat"]
    assert repeat == {"boundsPeriod": {"start": "2025-03-04"}, "when": ["HS"], "offset": 60}
    assert request["subject"] == {"reference": f"Patient/{one(result, 'Patient')['id']}"}


@pytest.mark.parametrize(
    ("period", "expected"),
    [
        ('<period value="8" unit="h"/>', {"frequency": 1, "period": 8, "periodUnit": "h"}),
        ('<period value="0.5" unit="d"/>', {"frequency": 2, "period": 1, "periodUnit": "d"}),
        ('<period xsi:type="IVL_PQ"><low value="4" unit="h"/><high value="6" unit="h"/></period>', {"frequency": 1, "period": 4, "periodUnit": "h", "periodMax": 6}),
    ],
)
def test_periodic_timing(period, expected):
    inst = "true" if "0.5" in period else "false"
    timing = f'<effectiveTime xsi:type="PIVL_TS" institutionSpecified="{inst}" operator="A">{period}</effectiveTime>'
    result = read_ccda(document(section(medication(timing=timing))))
    repeat = one(result, "MedicationRequest")["dosageInstruction"][0]["timing"]["repeat"]
    assert {k: v for k, v in repeat.items() if k != "boundsPeriod"} == expected


def test_negated_medications():
    result = read_ccda(document(section(medication(attrs=' negationInd="true"'), medication(mood="EVN", rx_id="RX-2", attrs=' negationInd="true"'))))
    assert one(result, "MedicationRequest")["doNotPerform"] is True
    assert one(result, "MedicationStatement")["status"] == "not-taken"


def test_odd_values_are_issues_and_the_rest_still_maps():
    timing = """<effectiveTime xsi:type="PIVL_TS" operator="A"><period value="2" unit="fortnight"/></effectiveTime>
      <effectiveTime xsi:type="EIVL_TS" operator="A"><event code="AFTERNOON-TEA"/></effectiveTime>
      <effectiveTime xsi:type="SXPR_TS"/>"""
    odd = medication(timing=timing).replace('<low value="20250304"/>', '<low value="20250230"/>').replace(
        '<doseQuantity value="1"/>', '<doseQuantity value="1e999"/>'
    )
    observation = """<observation classCode="OBS" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.2"/>
      <code code="93494-3" codeSystem="2.16.840.1.113883.6.1"/><statusCode code="completed"/>
      <effectiveTime value="202503041030"/><value xsi:type="GLIST_PQ"/></observation>"""
    result = read_ccda(document(section(odd, observation)))
    request = one(result, "MedicationRequest")
    assert codes(request["medicationCodeableConcept"], RXNORM) == ["1010604"]
    assert "dosageInstruction" not in request  # nothing in it could be read
    obs = one(result, "Observation")
    assert obs["effectiveDateTime"] == "2025-03-04"  # no UTC offset: kept to the day
    said = " | ".join(messages(result))
    for expected in ("not a real date", "not a usable number", "frequency not mapped", "AFTERNOON-TEA", "SXPR_TS", "GLIST_PQ", "no UTC offset"):
        assert expected in said


def test_problem_without_a_problem_is_an_error_and_others_still_map():
    concern = """<act classCode="ACT" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.3"/>
      <statusCode code="active"/>
      <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN">
        <templateId root="2.16.840.1.113883.10.20.22.4.4"/><id root="1.2.3" extension="p1"/>
        <code code="55607006" codeSystem="2.16.840.1.113883.6.96"/><statusCode code="completed"/>
        <value xsi:type="CD" nullFlavor="UNK"/></observation></entryRelationship>
      <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN">
        <templateId root="2.16.840.1.113883.10.20.22.4.4"/><id root="1.2.3" extension="p2"/>
        <code code="55607006" codeSystem="2.16.840.1.113883.6.96"/><statusCode code="completed"/>
        <effectiveTime><low value="20240101"/><high nullFlavor="UNK"/></effectiveTime>
        <value xsi:type="CD" code="F11.20" codeSystem="2.16.840.1.113883.6.90"/></observation></entryRelationship>
    </act>"""
    result = read_ccda(document(section(concern, root="2.16.840.1.113883.10.20.22.2.5.1")))
    condition = one(result, "Condition")
    assert codes(condition["code"], "http://hl7.org/fhir/sid/icd-10-cm") == ["F11.20"]
    assert condition["clinicalStatus"]["coding"][0]["code"] == "resolved"  # high present, date unknown
    assert condition["_abatementDateTime"]["extension"][0]["valueCode"] == "unknown"
    assert condition["category"][0]["coding"][0]["code"] == "problem-list-item"
    assert any(i.severity == "error" and "names no problem" in i.message for i in result.issues)


def test_restricted_document_labels_every_resource_and_sections_can_be_stricter():
    restricted = document(section(medication()), extra="<confidentialityCode code='R' codeSystem='2.16.840.1.113883.5.25'/>")
    result = read_ccda(restricted)
    for resource in result.resources:
        assert resource["meta"]["security"] == [{"system": V3_CONFIDENTIALITY, "code": "R", "display": "restricted"}]
    stricter = document(section(medication(), extra="<confidentialityCode code='V'/>"))
    result = read_ccda(stricter)
    assert "meta" not in one(result, "Patient")
    assert one(result, "MedicationRequest")["meta"]["security"][0]["code"] == "V"


def test_entries_about_someone_else_are_not_the_patients():
    family = medication(inner="<subject><relatedSubject classCode='PRS'><code code='MTH'/></relatedSubject></subject>")
    result = read_ccda(document(section(family)))
    assert result.of_type("MedicationRequest") == []
    assert any("related subject" in m for m in messages(result, "warning"))


def test_entry_ids_upsert_across_documents_and_repeats_stay_distinct():
    first = read_ccda(document(section(medication()), doc_id="A"))
    second = read_ccda(document(section(medication()), doc_id="B"))
    assert one(first, "MedicationRequest")["id"] == one(second, "MedicationRequest")["id"]
    twice = read_ccda(document(section(medication(), medication())))
    ids = [r["id"] for r in twice.of_type("MedicationRequest")]
    assert len(set(ids)) == 2
    assert any(i.code == "duplicate" for i in twice.issues)


def test_a_reader_that_fails_is_reported_and_the_rest_still_read(monkeypatch):
    def broken(ctx, el, scope):
        raise KeyError("boom")

    root = "2.16.840.1.113883.10.20.22.4.16"
    monkeypatch.setitem(ccda_entries.TEMPLATES, root, Template("Medication Activity", broken))
    concern = """<act classCode="ACT" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.3"/>
      <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN">
      <templateId root="2.16.840.1.113883.10.20.22.4.4"/><value xsi:type="CD" code="F11.20" codeSystem="2.16.840.1.113883.6.90"/>
      </observation></entryRelationship></act>"""
    result = read_ccda(document(section(medication(), concern)))
    assert one(result, "Condition")
    failed = [i for i in result.issues if i.code == "exception"]
    assert len(failed) == 1 and failed[0].location.endswith("/entry[1]/substanceAdministration")


def test_an_invalid_resource_never_leaves_the_reader(monkeypatch):
    def sloppy(ctx, el, scope):
        return [ctx.add({"resourceType": "Observation", "id": "bad", "status": "done"}, el)]

    monkeypatch.setitem(ccda_entries.TEMPLATES, "2.16.840.1.113883.10.20.22.4.16", Template("Medication Activity", sloppy))
    result = read_ccda(document(section(medication())))
    assert result.of_type("Observation") == []
    assert any(i.location == "Observation/bad" and i.severity == "error" for i in result.issues)


# --- anything shaped like C-CDA: never a crash, never an invalid resource ---------------------

_SUPPLY = """<entryRelationship typeCode="REFR"><supply classCode="SPLY" moodCode="INT">
  <templateId root="2.16.840.1.113883.10.20.22.4.17"/><id root="1.2.3.4" extension="s1"/><statusCode code="active"/>
  <effectiveTime xsi:type="IVL_TS"><low value="20250304"/><high value="20250904"/></effectiveTime>
  <repeatNumber value="3"/><quantity value="14" unit="1"/>
  <author><time value="202503041015-0500"/><assignedAuthor><id root="2.16.840.1.113883.4.6" extension="1234567893"/>
    <code code="2084P0800X" codeSystem="2.16.840.1.113883.6.101"/>
    <assignedPerson><name><given>Dana</given><family>Okafor</family></name></assignedPerson>
    <representedOrganization><name>Clinic</name></representedOrganization></assignedAuthor></author>
  <entryRelationship typeCode="SUBJ" inversionInd="true"><act classCode="ACT" moodCode="INT">
    <templateId root="2.16.840.1.113883.10.20.22.4.20"/><code code="409073007" codeSystem="2.16.840.1.113883.6.96"/>
    <text>Take with water</text></act></entryRelationship>
</supply></entryRelationship>
<entryRelationship typeCode="REFR"><supply classCode="SPLY" moodCode="EVN">
  <templateId root="2.16.840.1.113883.10.20.22.4.18"/><id root="1.2.3.4" extension="d1"/><statusCode code="completed"/>
  <effectiveTime value="202503051200-0500"/><repeatNumber value="2"/><quantity value="14"/>
  <performer><assignedEntity><id root="1.2.3.5" extension="ph"/><representedOrganization><name>Pharmacy</name></representedOrganization></assignedEntity></performer>
</supply></entryRelationship>
<entryRelationship typeCode="RSON"><observation classCode="OBS" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.19"/>
  <value xsi:type="CD" code="F11.20" codeSystem="2.16.840.1.113883.6.90"/></observation></entryRelationship>
<precondition><criterion><value xsi:type="CD" code="57676002" codeSystem="2.16.840.1.113883.6.96"/></criterion></precondition>"""
_TIMING = """<effectiveTime xsi:type="PIVL_TS" institutionSpecified="true" operator="A"><period value="12" unit="h"/>
  <phase><low value="198701010800"/></phase></effectiveTime>
<effectiveTime xsi:type="EIVL_TS" operator="A"><event code="HS"/><offset><width value="30" unit="min"/></offset></effectiveTime>"""
_CONCERN = """<act classCode="ACT" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.3"/><statusCode code="active"/>
  <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.4"/>
  <id root="1.2.3" extension="p1"/><code code="55607006" codeSystem="2.16.840.1.113883.6.96"/>
  <effectiveTime><low value="20240101"/><high value="20240601"/></effectiveTime>
  <value xsi:type="CD" code="F11.20" codeSystem="2.16.840.1.113883.6.90"><originalText><reference value="#r1"/></originalText></value>
  <entryRelationship typeCode="REFR"><observation classCode="OBS" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.6"/>
    <code code="33999-4" codeSystem="2.16.840.1.113883.6.1"/><value xsi:type="CD" code="413322009" codeSystem="2.16.840.1.113883.6.96"/></observation></entryRelationship>
  <entryRelationship typeCode="SUBJ" inversionInd="true"><observation classCode="OBS" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.31"/>
    <code code="445518008" codeSystem="2.16.840.1.113883.6.96"/><value xsi:type="PQ" value="30" unit="a"/></observation></entryRelationship>
  </observation></entryRelationship></act>"""
_PANEL = """<organizer classCode="BATTERY" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.1"/>
  <code code="69739-1" codeSystem="2.16.840.1.113883.6.1"/><statusCode code="completed"/>
  <component><observation classCode="OBS" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.2"/>
    <code code="93494-3" codeSystem="2.16.840.1.113883.6.1"/><statusCode code="completed"/><effectiveTime value="202503041030-0500"/>
    <value xsi:type="PQ" value="5" unit="ng/mL"/><interpretationCode code="N" codeSystem="2.16.840.1.113883.5.83"/>
    <referenceRange><observationRange><value xsi:type="IVL_PQ"><low value="0" unit="ng/mL"/><high value="10" unit="ng/mL"/></value></observationRange></referenceRange>
  </observation></component></organizer>"""
_SCALE = """<observation classCode="OBS" moodCode="EVN"><templateId root="2.16.840.1.113883.10.20.22.4.69"/>
  <code code="44249-1" codeSystem="2.16.840.1.113883.6.1"/><statusCode code="completed"/><effectiveTime value="20250303"/>
  <value xsi:type="INT" value="3"/><entryRelationship typeCode="COMP"><observation classCode="OBS" moodCode="EVN">
  <templateId root="2.16.840.1.113883.10.20.22.4.86"/><code code="44250-9" codeSystem="2.16.840.1.113883.6.1"/>
  <value xsi:type="INT" value="3"/><value xsi:type="CO" code="LA6571-9" codeSystem="2.16.840.1.113883.6.1"/></observation></entryRelationship></observation>"""
_PLAN = """<encounter classCode="ENC" moodCode="INT"><templateId root="2.16.840.1.113883.10.20.22.4.40"/>
  <code code="185389009" codeSystem="2.16.840.1.113883.6.96"/><effectiveTime value="20250320"/></encounter>"""
_GOAL = """<observation classCode="OBS" moodCode="GOL"><templateId root="2.16.840.1.113883.10.20.22.4.121"/>
  <code code="8302-2" codeSystem="2.16.840.1.113883.6.1"/><value xsi:type="PQ" value="0" unit="1"/><effectiveTime value="20250304"/></observation>"""
_INSTRUCTION = """<act classCode="ACT" moodCode="INT"><templateId root="2.16.840.1.113883.10.20.22.4.20"/><text>Attend group</text></act>"""
_HEADER = PATIENT.replace("</patient>", "<raceCode code='2106-3' codeSystem='2.16.840.1.113883.6.238'/></patient>") + """
<author><time value="202503041200-0500"/><assignedAuthor><id nullFlavor="NI"/><assignedAuthoringDevice/>
  <representedOrganization><id root="1.2.3.9"/><name>Org</name></representedOrganization></assignedAuthor></author>
<componentOf><encompassingEncounter><id root="1.2.3.10" extension="e1"/>
  <code code="AMB" codeSystem="2.16.840.1.113883.5.4"/><effectiveTime><low value="20250101"/><high value="20250304"/></effectiveTime>
  <encounterParticipant><assignedEntity><id root="2.16.840.1.113883.4.6" extension="1234567893"/>
    <assignedPerson><name>Dana Okafor</name></assignedPerson></assignedEntity></encounterParticipant></encompassingEncounter></componentOf>"""
RICH = document(
    section(medication(inner=_SUPPLY, timing=_TIMING), medication(mood="EVN", rx_id="RX-2", inner=_SUPPLY), extra="<text><content ID='r1'>opioid use disorder</content></text>")
    + section(_CONCERN, root="2.16.840.1.113883.10.20.22.2.5.1")
    + section(_PANEL, _SCALE, root="2.16.840.1.113883.10.20.22.2.3.1")
    + section(_PLAN, _GOAL, _INSTRUCTION, medication(rx_id="RX-3").replace("4.16", "4.42"), root="2.16.840.1.113883.10.20.22.2.10"),
    header=_HEADER,
)
_VALUES = {
    "root": ["2.16.840.1.113883.4.6", "6C844C75-AA34-411C-B7BD-5E4A9F206E29", "", "not an oid", "2.16.840.1.113883.10.20.22.4.16"],
    "extension": ["", "1", "RX-1"],
    "code": ["", "44249-1", "F11.20", "HS", "AFTERNOON", "active", "completed", "aborted", "A", "R", "V", "CSM", "UN"],
    "codeSystem": ["", "2.16.840.1.113883.6.1", "2.16.840.1.113883.6.96", "9.x"],
    "value": ["", "0", "-3", "0.5", "1e999", "abc", "20250304", "202503041030-0500", "20250230", "2025", "202513", "#r1", "r9", "true"],
    "unit": ["", "1", "h", "d", "wk", "mo", "a", "fortnight", "mg", "{tbl}"],
    "moodCode": ["EVN", "INT", "RQO", "PRP", "GOL", "???"],
    "typeCode": ["SUBJ", "REFR", "RSON", "COMP", "CSM", "X"],
    "nullFlavor": ["NI", "UNK", "OTH"],
    "negationInd": ["true", "false"],
    "institutionSpecified": ["true", "false"],
    "{http://www.w3.org/2001/XMLSchema-instance}type": ["CD", "CO", "PQ", "IVL_PQ", "INT", "IVL_INT", "ST", "BL", "TS", "IVL_TS", "PIVL_TS", "EIVL_TS", "RTO", "REAL", "ANY"],
}


@st.composite
def _mutated(draw) -> bytes:
    """The rich document above with a few random cuts, copies and odd attribute values."""
    root = etree.fromstring(RICH)
    for _ in range(draw(st.integers(1, 6))):
        nodes = [n for n in root.iter() if isinstance(n.tag, str) and n is not root]
        node = draw(st.sampled_from(nodes))
        action = draw(st.sampled_from(["drop", "copy", "set", "unset", "text"]))
        if action == "drop":
            node.getparent().remove(node)
        elif action == "copy":
            node.addnext(etree.fromstring(etree.tostring(node)))
        elif action == "set":
            key = draw(st.sampled_from(sorted(_VALUES)))
            node.set(key, draw(st.sampled_from(_VALUES[key])))
        elif action == "unset" and node.attrib:
            del node.attrib[draw(st.sampled_from(sorted(node.attrib)))]
        else:
            node.text = draw(st.sampled_from(["", "x", ". . .", "12"]))
    return etree.tostring(root)


def test_the_rich_document_exercises_the_readers():
    counts = read_ccda(RICH).counts()
    for kind in ("MedicationRequest", "MedicationStatement", "MedicationDispense", "Condition", "Observation", "DiagnosticReport", "ServiceRequest", "Goal", "CarePlan", "Encounter", "PractitionerRole"):
        assert counts.get(kind), (kind, counts)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_any_mangled_document_reads_into_valid_r4(data):
    result = read_ccda(data)
    for resource in result.resources:
        assert validate_resource(resource) == [], resource
    assert not [i for i in result.issues if i.code == "exception"], [str(i) for i in result.issues if i.code == "exception"]
