"""Security labelling: the rules of labels.json, one by one, and how labels are written."""

from __future__ import annotations

import copy
import json

import pytest
from privacy_helpers import act, condition, conf, observation, of_type, prescription, resources_of, security, stored

from iop_fhir import terminology
from iop_fhir.mappers.datatypes import extension
from iop_fhir.privacy import is_part2, label, labels_of, sensitivity
from iop_fhir.privacy.labels import ORIGIN, data_categories, is_directory, is_part2_program, rules

SUD_LABELS = {conf("R"), act("SUD"), act("42CFRPart2")}


# --- diagnoses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("icd10", "expected"),
    [
        ("F11.20", SUD_LABELS | {act("OPIOIDUD")}),
        ("F10.20", SUD_LABELS | {act("ETHUD")}),
        ("F12.10", SUD_LABELS),
        ("F19.20", SUD_LABELS),
        ("F16.20", SUD_LABELS),  # hallucinogens: the block before nicotine
        ("F18.10", SUD_LABELS),  # inhalants: the block after it
        ("F17.210", {conf("N")}),  # nicotine dependence: 42 CFR 2.11 leaves tobacco out
        ("F33.1", {conf("N"), act("MH")}),
        ("F41.1", {conf("N"), act("MH")}),
        ("F20.9", {conf("N"), act("MH")}),
        ("F60.3", {conf("N"), act("MH")}),
        ("F90.0", {conf("N"), act("MH")}),
        ("F05", {conf("N")}),  # delirium due to a physiological condition: not behavioral health
        ("F84.0", {conf("N")}),  # a developmental disorder
        ("R45.851", {conf("N"), act("MH")}),
        ("E11.9", {conf("N")}),
    ],
)
def test_a_condition_is_labelled_by_its_icd10_block(icd10, expected):
    assert security(label(condition(icd10))) == expected


def test_labels_carry_the_displays_of_the_terminology_and_the_origin_mark():
    labelled = label(condition("F11.20"))
    for coding in labelled["meta"]["security"]:
        assert coding["display"] == terminology.security_label(coding["code"])["display"]
        assert coding["extension"] == [{"url": ORIGIN, "valueCode": "iop-fhir"}]


def test_the_confidentiality_comes_first_then_sensitivities_then_the_policy():
    codes = [c["code"] for c in label(condition("F11.20"))["meta"]["security"]]
    assert codes == ["R", "SUD", "OPIOIDUD", "42CFRPart2"]


# --- medications ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rxnorm", "extra"),
    [
        ("1010604", {"OPIOIDUD"}),  # buprenorphine/naloxone film
        ("991147", {"OPIOIDUD"}),  # methadone oral solution
        ("6813", {"OPIOIDUD"}),  # methadone, ingredient level
        ("637213", set()),  # naltrexone injection
        ("835726", {"ETHUD"}),  # acamprosate
        ("197623", {"ETHUD"}),  # disulfiram
    ],
)
def test_mat_medications_are_part2(rxnorm, extra):
    labelled = label(prescription(rxnorm))
    assert security(labelled) == SUD_LABELS | {act(code) for code in extra}
    assert is_part2(labelled)


def test_other_psychiatric_medications_are_ordinary_by_themselves():
    assert security(label(prescription("312941"))) == {conf("N")}  # sertraline


def test_the_mat_extension_marks_a_prescription_of_an_unknown_product():
    flagged = prescription("99999", extension=[extension("medication-assisted-treatment", valueBoolean=True)])
    unflagged = prescription("99999", extension=[extension("medication-assisted-treatment", valueBoolean=False)])
    assert is_part2(flagged) and not is_part2(unflagged)


def test_a_contained_medication_is_looked_into():
    resource = prescription("0")
    del resource["medicationCodeableConcept"]
    resource["medicationReference"] = {"reference": "#med"}
    resource["contained"] = [{"resourceType": "Medication", "id": "med", "code": {"coding": [{"system": terminology.RXNORM, "code": "864706"}]}}]
    assert sensitivity(resource) == {"SUD", "OPIOIDUD"}


# --- observations, programs, plans, consents ------------------------------------------------------


def test_drug_screens_are_part2_whatever_their_result():
    assert is_part2(observation("19550-3", "laboratory"))  # methadone screen
    assert is_part2(observation("69739-1", "laboratory"))  # the panel
    assert not is_part2(observation("8867-4", "vital-signs"))


def test_substance_use_and_mental_health_instruments():
    assert sensitivity(observation("72109-2", "survey")) == {"SUD"}  # AUDIT-C
    assert sensitivity(observation("44249-1", "survey")) == {"MH"}  # PHQ-9
    local = observation("x", "survey")
    local["code"] = {"coding": [{"system": terminology.code_system("instrument"), "code": "C-SSRS-screen"}]}
    assert sensitivity(local) == {"MH"}


def test_program_services_mark_episodes():
    def episode(code: str) -> dict:
        return {"resourceType": "EpisodeOfCare", "id": "e", "type": [{"coding": [{"system": terminology.HCPCS, "code": code}]}]}

    assert is_part2(episode("H0015"))  # SUD intensive outpatient
    assert sensitivity(episode("S9480")) == {"MH"}  # psychiatric intensive outpatient
    alternate = episode("H0015")
    alternate["type"][0]["coding"][0]["system"] = terminology.HCPCS_ALT
    assert is_part2(alternate)


def test_a_part2_consent_is_itself_part2_data(example_json):
    consents = of_type(resources_of(example_json), "Consent")
    assert consents and all(is_part2(c) for c in consents)  # both consents of the example are Part 2
    hipaa = copy.deepcopy(consents[0])
    hipaa["policyRule"] = {"coding": [{"system": terminology.CONSENT_POLICY, "code": "hipaa-auth"}]}
    assert not is_part2(hipaa)


def test_sud_care_plan_activities():
    plan = {
        "resourceType": "CarePlan",
        "id": "cp",
        "activity": [{"detail": {"status": "scheduled", "code": {"coding": [{"system": terminology.code_system("care-plan-activity"), "code": "relapse-prevention"}]}}}],
    }
    assert is_part2(plan)


# --- what a resource is about -----------------------------------------------------------------------


def test_a_resource_inherits_the_labels_of_what_it_is_about():
    mat = label(prescription("1010604", rid="m1"))
    review = {"resourceType": "Task", "id": "t", "status": "completed", "intent": "order", "focus": {"reference": "MedicationRequest/m1"}}
    found = {"MedicationRequest/m1": mat}
    assert security(label(review, found.get)) == SUD_LABELS | {act("OPIOIDUD")}
    assert security(label(review)) == {conf("N")}  # without a look-up only its own codes count
    assert security(label(review, lambda ref: None)) == {conf("N")}  # a target we do not hold


def test_inheritance_is_by_the_targets_stored_labels_and_codes_one_level():
    episode = {"resourceType": "EpisodeOfCare", "id": "e", "diagnosis": [{"condition": {"reference": "Condition/c1"}}]}
    encounter = {"resourceType": "Encounter", "id": "s", "episodeOfCare": [{"reference": "EpisodeOfCare/e"}]}
    held = {"Condition/c1": condition("F10.20")}  # not labelled: its codes count all the same
    labelled_episode = label(episode, held.get)
    assert is_part2(labelled_episode)
    held["EpisodeOfCare/e"] = labelled_episode
    assert sensitivity(label(encounter, held.get)) == {"SUD", "ETHUD"}
    held["EpisodeOfCare/e"] = episode  # an unlabelled episode: one level only, no chain
    assert not is_part2(label(encounter, held.get))


def test_what_targets_state_and_reveal_is_closed_with_the_resources_own_codes():
    # One target only states a policy (whose sensitivity it implies), another only reveals a
    # sensitivity by its codes (whose parent and policy it implies): both entailments reach the task.
    stated = _with(condition("E11.9", rid="c1"), {"system": terminology.V3_ACT_CODE, "code": "42CFRPart2"})
    held = {"Condition/c1": stated, "Condition/c2": condition("F10.20", rid="c2")}
    task = {"resourceType": "Task", "id": "t", "status": "completed", "intent": "order", "focus": {"reference": "Condition/c1"}}
    assert security(label(task, held.get)) == SUD_LABELS
    task["reasonReference"] = {"reference": "Condition/c2"}
    assert security(label(task, held.get)) == SUD_LABELS | {act("ETHUD")}
    judged = labels_of(task, held.get)
    assert judged.part2 and judged.confidentiality == "R" and judged.sensitivities == {"SUD", "ETHUD"}


def test_mentions_are_not_inherited():
    plan = {"resourceType": "CarePlan", "id": "ac", "activity": [{"reference": {"reference": "MedicationRequest/m1"}}]}
    assert not is_part2(label(plan, {"MedicationRequest/m1": label(prescription("991147"))}.get))


def test_a_whole_record_as_the_store_labels_it(example_json):
    resources = stored(resources_of(example_json))
    part2 = {(r["resourceType"], r["identifier"][0]["value"].rsplit("/", 1)[-1]) for r in resources if is_part2(r) and r.get("identifier")}
    assert ("Condition", "dx-2") in part2 and ("Condition", "dx-1") not in part2
    assert ("MedicationRequest", "rx-3") in part2 and ("MedicationRequest", "rx-1") not in part2
    assert all(is_part2(e) for e in of_type(resources, "Encounter"))  # sessions of an SUD episode
    assert all(is_part2(p) for p in of_type(resources, "Provenance"))
    assert not any(is_part2(r) for r in resources if r["resourceType"] in ("Patient", "Organization", "Practitioner"))
    screens = [o for o in of_type(resources, "Observation") if "drug-screen" in o["identifier"][0]["system"]]
    assert screens and all(is_part2(o) for o in screens)
    assert {"MH"} <= sensitivity(next(r for r in resources if r["resourceType"] == "Condition" and not is_part2(r)))


# --- foreign labels ---------------------------------------------------------------------------------


def _with(resource: dict, *codings: dict) -> dict:
    return {**resource, "meta": {"security": list(codings)}}


def test_foreign_labels_are_kept_and_ours_replaced():
    foreign = {"system": terminology.V3_ACT_CODE, "code": "PSYTHPN"}
    once = label(_with(condition("F11.20"), foreign))
    assert foreign in once["meta"]["security"]
    corrected = copy.deepcopy(once)
    corrected["code"]["coding"][0]["code"] = "F33.1"
    again = label(corrected)
    assert security(again) == {act("PSYTHPN"), conf("R"), act("MH")}  # SUD gone; R from psychotherapy notes
    assert foreign in again["meta"]["security"]


def test_a_stricter_foreign_confidentiality_stands_and_a_laxer_one_is_replaced():
    very = {"system": terminology.V3_CONFIDENTIALITY, "code": "V"}
    normal = {"system": terminology.V3_CONFIDENTIALITY, "code": "N"}
    assert [c for c in label(_with(condition("F11.20"), very))["meta"]["security"] if c["system"] == terminology.V3_CONFIDENTIALITY] == [very]
    relabelled = label(_with(condition("F11.20"), normal))["meta"]["security"]
    assert [c["code"] for c in relabelled if c["system"] == terminology.V3_CONFIDENTIALITY] == ["R"]
    assert normal not in relabelled


def test_old_places_of_labels_are_read():
    deprecated = {"system": terminology.V3_ACT_US_PRIVACY_LAW, "code": "42CFRPart2"}
    retired = {"system": terminology.V3_CONFIDENTIALITY, "code": "ETH"}
    for legacy in (deprecated, retired):
        resource = _with(condition("E11.9"), legacy)
        assert is_part2(resource)
        labelled = label(resource)
        assert legacy in labelled["meta"]["security"]
        assert {conf("R"), act("SUD"), act("42CFRPart2")} <= security(labelled)


def test_a_label_code_from_another_system_means_nothing():
    stranger = {"system": "https://example.org/labels", "code": "SUD"}
    assert not is_part2(_with(condition("E11.9"), stranger))


def test_labelling_leaves_its_input_alone_and_is_idempotent():
    original = _with(condition("F11.20"), {"system": terminology.V3_CONFIDENTIALITY, "code": "N"})
    before = json.dumps(original, sort_keys=True)
    once = label(original)
    assert json.dumps(original, sort_keys=True) == before
    assert label(once) == once


def test_labels_of_keeps_what_relabelling_would_drop():
    # A resource stored with inherited labels, judged without its targets: the labels it carries count.
    encounter = label({"resourceType": "Encounter", "id": "s", "episodeOfCare": [{"reference": "EpisodeOfCare/e"}]}, {"EpisodeOfCare/e": label(condition("F11.20"))}.get)
    assert labels_of(encounter).part2 and not labels_of(label(encounter)).part2


# --- categories and parties ---------------------------------------------------------------------------


def test_data_categories(example_json):
    resources = resources_of(example_json)
    found = {}
    for r in resources:
        kind = r["identifier"][0]["system"].rsplit("/", 1)[-1] if r.get("identifier") else r["resourceType"]
        found.setdefault((r["resourceType"], kind), set()).add(data_categories(r))
    assert found[("Patient", "mrn")] == {frozenset({"demographics"})}
    assert found[("Condition", "diagnosis")] == {frozenset({"diagnoses"})}
    assert found[("MedicationRequest", "prescription")] == {frozenset({"medications"})}
    assert found[("MedicationRequest", "discharge-medication")] == {frozenset({"medications", "discharge"})}
    assert found[("Observation", "drug-screen-result")] == {frozenset({"drug-screens"})}
    assert found[("Observation", "drug-screen")] == {frozenset({"drug-screens"})}
    assert found[("Observation", "assessment")] == {frozenset({"assessments"})}
    assert found[("Observation", "vital")] == {frozenset({"vitals"})}
    assert found[("Observation", "adherence")] == {frozenset({"medications"})}
    assert found[("Encounter", "session")] == {frozenset({"sessions"})}
    assert found[("CarePlan", "care-plan")] == {frozenset({"care-plan"})}
    assert found[("CarePlan", "aftercare-plan")] == {frozenset({"discharge", "care-plan"})}
    assert found[("Consent", "consent")] == {frozenset()}  # only a consent for "all" covers it


def test_directory_and_part2_programs(example_json):
    resources = resources_of(example_json)
    program = next(r for r in of_type(resources, "Organization") if "program-focus" in json.dumps(r))
    assert is_directory(program) and is_part2_program(program)  # the example program is co-occurring
    assert not is_directory(of_type(resources, "Patient")[0])
    mental_health = copy.deepcopy(program)
    for concept in mental_health["type"]:
        for coding in concept["coding"]:
            if coding["system"].endswith("program-focus"):
                coding["code"] = "mental-health"
    assert not is_part2_program(mental_health)


# --- the rules against the terminology ---------------------------------------------------------------


def _rule(rule_id: str) -> frozenset[tuple[str, str]]:
    return rules().rule_codes[rule_id]


def test_every_mat_product_of_the_drug_table_is_labelled_sud():
    mat = [code for code, drug in terminology.tables()["medications"].items() if drug["mat"]]
    assert mat
    for code in mat:
        assert "SUD" in rules().by_code[(terminology.RXNORM, code)], code


def test_every_urine_drug_test_of_the_tables_is_labelled_sud():
    tables = terminology.tables()
    codes = {panel["code"] for panel in tables["drug_screen_panels"].values()}
    codes |= {analyte[method]["code"] for analyte in tables["drug_screen_analytes"].values() for method in ("screen", "confirmatory")}
    assert codes <= {code for _, code in _rule("urine-drug-testing")}


def test_every_label_the_rules_can_write_is_in_the_terminology():
    table = terminology.tables()["security_labels"]
    for code in [*rules().sensitivities, *rules().policies]:
        assert table[code]["kind"] in ("sensitivity", "policy")


def test_the_label_table_agrees_with_the_reference(shared_dir):
    reference = json.loads((shared_dir / "reference" / "codes.json").read_text())
    privacy = {(e["system"], e["code"]): e["display"] for e in reference if e.get("group") == "privacy"}
    for code, entry in terminology.tables()["security_labels"].items():
        if entry.get("verification") == "corroborated":
            continue  # REDACTED: checked elsewhere, as its entry says
        assert privacy[(entry["system"], code)] == entry["display"]
