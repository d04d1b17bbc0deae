"""R4 validation: the model's checks, located, plus what fhir.resources leaves out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from iop_fhir.errors import RecordInvalid
from iop_fhir.formats import fhir_validate
from iop_fhir.formats.fhir_validate import (
    REQUIRED_CODES,
    elements_of,
    is_r4_resource_type,
    model_class,
    require_valid,
    validate_bundle_entries,
    validate_resource,
)

SUBJECT = {"reference": "Patient/p1"}


def med_request(**changes) -> dict:
    resource = {
        "resourceType": "MedicationRequest",
        "id": "mr1",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "312941"}]},
        "subject": SUBJECT,
        "dosageInstruction": [{"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                               "doseAndRate": [{"doseQuantity": {"value": 1.5, "unit": "tablet"}}]}],
        "dispenseRequest": {"numberOfRepeatsAllowed": 2},
    }
    resource.update(changes)
    return resource


def condition(**changes) -> dict:
    resource = {
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
        "code": {"text": "Major depressive disorder"},
        "subject": SUBJECT,
    }
    resource.update(changes)
    return resource


def where(issues) -> list[str]:
    return [issue.location for issue in issues]


VALID = [
    med_request(),
    condition(),
    {"resourceType": "Patient", "gender": "unknown", "telecom": [{"system": "email", "value": "a@b.c", "use": "home"}]},
    {"resourceType": "Observation", "status": "final", "code": {"text": "PHQ-9"}, "valueInteger": 12},
    {"resourceType": "CarePlan", "status": "active", "intent": "plan", "subject": SUBJECT,
     "activity": [{"detail": {"kind": "Appointment", "status": "scheduled"}}]},
    {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
     "statusHistory": [{"status": "arrived", "period": {"start": "2024-01-01"}}]},
    {"resourceType": "EpisodeOfCare", "status": "active", "patient": SUBJECT},
    {"resourceType": "Consent", "status": "active", "scope": {"text": "privacy"}, "category": [{"text": "42 CFR Part 2"}],
     "provision": {"type": "permit", "provision": [{"type": "deny"}]}},
    {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "sobriety"}, "subject": SUBJECT},
    {"resourceType": "MedicationDispense", "status": "completed", "medicationCodeableConcept": {"text": "x"}},
    {"resourceType": "Task", "status": "requested", "intent": "order", "priority": "routine"},
    {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1"}, "request": {"method": "PUT", "url": "Patient/p1"}},
        {"request": {"method": "DELETE", "url": "Patient/p2"}}]},
]


@pytest.mark.parametrize("resource", VALID, ids=lambda r: r["resourceType"])
def test_valid_resources_have_no_issues(resource):
    assert validate_resource(resource) == []
    assert require_valid(resource) is resource


# --- resource types --------------------------------------------------------------------------


def test_model_class_for_r4_types():
    assert model_class("MedicationRequest").__name__ == "MedicationRequest"
    assert model_class("MedicationRequest") is model_class("MedicationRequest")
    assert is_r4_resource_type("CarePlan")


@pytest.mark.parametrize(
    "name", ["Citation", "SubscriptionStatus", "Evidence", "Bogus", "CodeableConcept", "Resource",
             "DomainResource", "patient", "", "Patient; drop", 3, ["Patient"], {"a": 1}]
)
def test_model_class_refuses_what_is_not_an_r4_resource(name):
    with pytest.raises(RecordInvalid) as info:
        model_class(name)
    assert info.value.issues[0].location == "resourceType"
    assert info.value.issues[0].code == "not-supported"
    assert not is_r4_resource_type(name)


def test_unknown_type_and_missing_type_are_issues_not_exceptions():
    assert where(validate_resource({"resourceType": "Citation"})) == ["resourceType"]
    assert where(validate_resource({"resourceType": ["Patient"]})) == ["resourceType"]
    assert [i.code for i in validate_resource({"id": "x"})] == ["required"]
    assert validate_resource([]) != []


# --- what the model checks, located ----------------------------------------------------------


def test_model_errors_are_located_fhirpath_style():
    resource = med_request(subject=None, dosageInstruction=[{"timing": {"bogus": 1}}])
    del resource["subject"]
    issues = validate_resource(resource)
    assert ("MedicationRequest.subject", "required") in [(i.location, i.code) for i in issues]
    assert ("MedicationRequest.dosageInstruction[0].timing.bogus", "structure") in [(i.location, i.code) for i in issues]


def test_errors_inside_bundle_entries_are_located():
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": {"resourceType": "Patient", "birthDate": "1999-99"}}]}
    assert where(validate_resource(bundle)) == ["Bundle.entry[0].resource.birthDate"]


# --- what the model does not check -----------------------------------------------------------


def test_model_alone_misses_these():
    # If fhir.resources starts checking one of these, the table or walk here may go.
    for resource in (
        {"resourceType": "Patient", "gender": "bogus"},
        {"resourceType": "Patient", "identifier": [], "maritalStatus": {}},
        med_request(note=[{"text": ""}]),
        med_request(dispenseRequest={"numberOfRepeatsAllowed": "3"}, doNotPerform="true"),
        med_request(contained=[{"id": "x"}]),
        med_request(extension=[{"url": "http://x"}]),
        med_request(id="a" * 65),
        med_request(text={"status": "generated", "div": "<script>alert(1)</script>"}),
    ):
        model_class(resource["resourceType"]).model_validate(resource)  # accepted
        assert validate_resource(resource) != []


@pytest.mark.parametrize(
    "resource, location",
    [
        ({"resourceType": "Patient", "gender": "F"}, "Patient.gender"),
        (med_request(status="pending"), "MedicationRequest.status"),
        (med_request(intent="prescription"), "MedicationRequest.intent"),
        ({"resourceType": "Observation", "status": "done", "code": {"text": "x"}}, "Observation.status"),
        ({"resourceType": "CarePlan", "status": "active", "intent": "directive", "subject": SUBJECT}, "CarePlan.intent"),
        ({"resourceType": "CarePlan", "status": "active", "intent": "plan", "subject": SUBJECT,
          "activity": [{"detail": {"status": "booked"}}]}, "CarePlan.activity[0].detail.status"),
        ({"resourceType": "Encounter", "status": "done", "class": {"code": "AMB"}}, "Encounter.status"),
        ({"resourceType": "EpisodeOfCare", "status": "on-hold", "patient": SUBJECT}, "EpisodeOfCare.status"),
        ({"resourceType": "Consent", "status": "active", "scope": {"text": "x"}, "category": [{"text": "x"}],
          "provision": {"provision": [{"type": "allow"}]}}, "Consent.provision.provision[0].type"),
        ({"resourceType": "Goal", "lifecycleStatus": "done", "description": {"text": "x"}, "subject": SUBJECT},
         "Goal.lifecycleStatus"),
        ({"resourceType": "Bundle", "type": "bundle"}, "Bundle.type"),
        ({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GETT", "url": "x"}}]},
         "Bundle.entry[0].request.method"),
        ({"resourceType": "MedicationDispense", "status": "dispensed", "medicationCodeableConcept": {"text": "x"}},
         "MedicationDispense.status"),
        ({"resourceType": "Task", "status": "open", "intent": "order"}, "Task.status"),
        ({"resourceType": "Task", "status": "ready", "intent": "directive"}, "Task.intent"),
        (med_request(dosageInstruction=[{"timing": {"repeat": {"periodUnit": "day"}}}]),
         "MedicationRequest.dosageInstruction[0].timing.repeat.periodUnit"),
        (med_request(dosageInstruction=[{"timing": {"repeat": {"when": ["MORN", "BEDTIME"]}}}]),
         "MedicationRequest.dosageInstruction[0].timing.repeat.when[1]"),
        (med_request(dosageInstruction=[{"doseAndRate": [{"doseQuantity": {"value": 1, "comparator": "~"}}]}]),
         "MedicationRequest.dosageInstruction[0].doseAndRate[0].doseQuantity.comparator"),
        ({"resourceType": "Patient", "telecom": [{"system": "telephone", "value": "1"}]}, "Patient.telecom[0].system"),
        ({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patient", "gender": "x"}}]},
         "Bundle.entry[0].resource.gender"),
    ],
)
def test_required_bindings(resource, location):
    issues = validate_resource(resource)
    assert [(i.location, i.code) for i in issues] == [(location, "code-invalid")]
    assert "required value set" in issues[0].message


def test_codeable_concept_bindings():
    wrong_code = condition(clinicalStatus={"coding": [
        {"system": "http://snomed.info/sct", "code": "55561003"},
        {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "current"}]})
    assert where(validate_resource(wrong_code)) == ["Condition.clinicalStatus.coding[1].code"]
    text_only = condition(verificationStatus={"text": "confirmed"})
    issues = validate_resource(text_only)
    assert where(issues) == ["Condition.verificationStatus"] and "condition-ver-status" in issues[0].message


def test_empty_values_and_nulls():
    resource = med_request(note=[], requester={}, groupIdentifier={"value": ""})
    resource["priority"] = None
    assert sorted(where(validate_resource(resource))) == [
        "MedicationRequest.groupIdentifier.value",
        "MedicationRequest.note",
        "MedicationRequest.priority",
        "MedicationRequest.requester",
    ]


@pytest.mark.parametrize(
    "change, location",
    [
        ({"dispenseRequest": {"numberOfRepeatsAllowed": "3"}}, "MedicationRequest.dispenseRequest.numberOfRepeatsAllowed"),
        ({"dispenseRequest": {"numberOfRepeatsAllowed": 3.0}}, "MedicationRequest.dispenseRequest.numberOfRepeatsAllowed"),
        ({"dispenseRequest": {"numberOfRepeatsAllowed": True}}, "MedicationRequest.dispenseRequest.numberOfRepeatsAllowed"),
        ({"doNotPerform": "true"}, "MedicationRequest.doNotPerform"),
        ({"doNotPerform": 1}, "MedicationRequest.doNotPerform"),
        ({"dosageInstruction": [{"doseAndRate": [{"doseQuantity": {"value": "1.5"}}]}]},
         "MedicationRequest.dosageInstruction[0].doseAndRate[0].doseQuantity.value"),
    ],
)
def test_json_primitive_types(change, location):
    issues = validate_resource(med_request(**change))
    assert where(issues) == [location]
    assert "must be a JSON" in issues[0].message


def test_nested_resources_need_a_known_type():
    assert where(validate_resource(med_request(contained=[{"id": "x"}]))) == ["MedicationRequest.contained[0].resourceType"]
    issues = validate_resource(med_request(contained=[{"resourceType": "Bogus", "id": "x"}]))
    assert where(issues) == ["MedicationRequest.contained[0].resourceType"]  # not a bare KeyError
    issues = validate_resource({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Citation"}}]})
    assert where(issues) == ["Bundle.entry[0].resource.resourceType"]


def test_extension_needs_a_value_or_extensions_not_both():
    assert where(validate_resource(med_request(extension=[{"url": "http://x"}]))) == ["MedicationRequest.extension[0]"]
    nested = med_request(extension=[{"url": "http://x", "extension": [{"url": "a", "valueString": "b"}]}])
    assert validate_resource(nested) == []
    primitive = med_request(_status={"extension": [{"url": "http://x"}]})
    assert where(validate_resource(primitive)) == ["MedicationRequest._status.extension[0]"]


def test_id_length_and_fhir_comments():
    assert where(validate_resource(med_request(id="a" * 65))) == ["MedicationRequest.id"]
    assert validate_resource(med_request(id="a" * 64)) == []
    assert where(validate_resource(med_request(fhir_comments="hi"))) == ["MedicationRequest.fhir_comments"]


def test_a_wrong_type_is_reported_once():
    issues = validate_resource({"resourceType": "Patient", "name": [{"given": [1]}]})
    assert where(issues) == ["Patient.name[0].given[0]"]


XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'


@pytest.mark.parametrize(
    "div, problem",
    [
        (f"<div {XHTML}><p>Sertraline <b>50 mg</b></p></div>", None),
        (f'<div {XHTML}><img src="x.png" alt=""/></div>', None),
        ("plain text", "one XHTML <div>"),
        ("<div><p>no namespace</p></div>", "one XHTML <div>"),
        (f"<div {XHTML}><p>unclosed</div>", "one XHTML <div>"),
        (f"<div {XHTML}><script>alert(1)</script></div>", "<script>"),
        (f'<div {XHTML}><p onclick="x()">hi</p></div>', "'onclick'"),
        (f'<div {XHTML} xmlns:xl="http://www.w3.org/1999/xlink"><a xl:href="x">hi</a></div>', "'href'"),
        (f"<div {XHTML}><iframe/></div>", "<iframe>"),
        (f"<div {XHTML}>  <p> </p></div>", "txt-2"),
        (f'<!DOCTYPE div [<!ENTITY x "y">]><div {XHTML}>&x;</div>', "DOCTYPE"),
    ],
)
def test_narrative(div, problem):
    issues = validate_resource({"resourceType": "Patient", "text": {"status": "generated", "div": div}})
    if problem is None:
        assert issues == []
    else:
        assert where(issues) == ["Patient.text.div"] and problem in issues[0].message


# --- bundles and raising ---------------------------------------------------------------------


def test_validate_bundle_entries_prefixes_locations():
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1"}},
        {"request": {"method": "DELETE", "url": "Patient/p2"}},
        {"resource": med_request(status="bogus", note=[])},
        {"resource": {"resourceType": "Citation"}},
        {"resource": {"id": "no-type"}},
    ]}
    assert where(validate_bundle_entries(bundle)) == [
        "Bundle.entry[2].resource.note",
        "Bundle.entry[2].resource.status",
        "Bundle.entry[3].resource.resourceType",
        "Bundle.entry[4].resource.resourceType",
    ]
    assert validate_bundle_entries({"resourceType": "Bundle", "type": "collection"}) == []
    assert validate_bundle_entries({"resourceType": "Bundle", "type": "collection", "entry": 3}) == []


def test_require_valid_raises_with_every_issue():
    with pytest.raises(RecordInvalid) as info:
        require_valid(med_request(status="bogus", intent="wish"))
    assert info.value.status == 422
    assert where(info.value.issues) == ["MedicationRequest.status", "MedicationRequest.intent"]
    assert "MedicationRequest.status" in info.value.message


# --- the code table --------------------------------------------------------------------------


def test_every_table_entry_names_a_coded_element():
    for key, binding in REQUIRED_CODES.items():
        owner, element = key.split(".")
        info = elements_of(model_class(owner) if owner[0].isupper() and is_r4_resource_type(owner) else _datatype(owner))[element]
        expected = "CodeableConcept" if isinstance(binding, tuple) else "code"
        assert info.type == expected, key
        assert info.binding is binding, key


def _datatype(name: str):
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(name)


def test_table_agrees_with_the_shared_reference(shared_dir):
    codes = json.loads((shared_dir / "reference" / "codes.json").read_text())
    checked = 0
    for entry in codes:
        use = entry.get("use", "")
        if "(required" not in use:
            continue
        element = use.split(" (", 1)[0]
        key = {"CarePlan.activity.detail.status": "CarePlanActivityDetail.status",
               "CarePlan.activity.detail.kind": "CarePlanActivityDetail.kind",
               "Consent.provision.type": "ConsentProvision.type"}.get(element, element)
        binding = REQUIRED_CODES.get(key)
        if binding is None or isinstance(binding, tuple):
            continue
        assert entry["code"] in binding, (key, entry["code"])
        checked += 1
    assert checked >= 40


def test_validation_is_cheap_on_repeat():
    # The element tables are built once per class and shared.
    elements_of.cache_clear()
    validate_resource(med_request())
    built = elements_of.cache_info().currsize
    validate_resource(med_request())
    assert elements_of.cache_info().currsize == built
    assert fhir_validate.elements_of(model_class("MedicationRequest")) is elements_of(model_class("MedicationRequest"))


def test_a_served_app_starts_with_the_models_of_its_types_loaded(tmp_path) -> None:
    # a fresh interpreter: in this one, earlier tests have long imported most models
    script = (
        "import sys\n"
        "from iop_fhir.formats import fhir_validate\n"
        "from iop_fhir.serve import build_app\n"
        f"build_app({{'DATABASE_URL': 'sqlite:///{tmp_path / 'p.db'}', 'AUTH': 'off', 'LOG_LEVEL': 'ERROR'}})\n"
        "print(fhir_validate._model_class.cache_info().currsize, fhir_validate.elements_of.cache_info().currsize,\n"
        "      'fhir.resources.R4B.medicationdispense' in sys.modules, 'fhir.resources.R4B.episodeofcare' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    types, tables, dispense, episode = done.stdout.split()
    assert int(types) >= 20 and int(tables) > 100 and dispense == episode == "True"


def test_preload_builds_the_tables_of_every_class_a_type_reaches() -> None:
    ready = fhir_validate.preload(["Observation"])
    assert ready > 10  # Observation, its backbone elements, CodeableConcept, Quantity, Reference, ...
    before = fhir_validate.elements_of.cache_info()
    fhir_validate.elements_of(fhir_validate.model_class("Observation"))
    assert fhir_validate.elements_of.cache_info().hits == before.hits + 1
    with pytest.raises(RecordInvalid):
        fhir_validate.preload(["NoSuchType"])
