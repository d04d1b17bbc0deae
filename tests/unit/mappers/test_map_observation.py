"""Observation family: adherence, side effects, assessments, drug screens, vitals, drug levels."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any, get_args

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import texts as contract_texts

from iop_fhir import terminology
from iop_fhir.mappers import observation
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record import IopRecord, validate_record
from iop_fhir.record.model import AdherenceEvent, Assessment, AssessmentItem, SideEffect
from iop_fhir.record.validate import scored_item_count, severity_band
from iop_fhir.terminology import LOINC, OBSERVATION_INTERPRETATION, SNOMED, UCUM, code_system, extension_url, us_core

PARTS = ("adherence", "side_effects", "assessments", "drug_screens", "vitals", "drug_levels")
JSON = dict[str, Any]


# --- helpers --------------------------------------------------------------------------------


def party_stubs(record: IopRecord) -> list[JSON]:
    """The MedicationRequests and Practitioners our Observations point at (other families make the real ones)."""
    ctx = MappingContext(record)
    out = [
        {"resourceType": "MedicationRequest", "id": ctx.ids.id("MedicationRequest", "prescription", p.id), "identifier": [ctx.ids.identifier("prescription", p.id)]}
        for p in record.prescriptions
    ]
    out += [
        {"resourceType": "Practitioner", "id": ctx.ids.id("Practitioner", "staff", m.id, shared=True), "identifier": [ctx.ids.identifier("staff", m.id, shared=True)]}
        for m in record.care_team
    ]
    return out


def reverse(resources: list[JSON], base_json: JSON) -> tuple[JSON, MappingReport]:
    """from_fhir over ``resources`` with a draft already holding what earlier families fill."""
    draft = {"client": copy.deepcopy(base_json["client"]), "prescriptions": copy.deepcopy(base_json["prescriptions"])}
    report = MappingReport()
    observation.from_fhir(ResourceIndex.build(resources), draft, report)
    return draft, report


def round_trip(record: IopRecord, base_json: JSON) -> tuple[IopRecord, MappingReport]:
    resources = observation.to_fhir(MappingContext(record))
    draft, report = reverse(party_stubs(record) + resources, base_json)
    rebuilt = validate_record({**base_json, **{k: draft.get(k, []) for k in PARTS}})
    return rebuilt, report


def by_identifier(resources: list[JSON], kind: str, local: str) -> JSON:
    return next(r for r in resources if r["identifier"][0]["system"].endswith(f"/{kind}") and r["identifier"][0]["value"].endswith(f"/{local}"))


def codes(concept: JSON) -> list[tuple[str, str]]:
    return [(c["system"], c["code"]) for c in concept.get("coding", [])]


def no_empty(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(no_empty(v) for v in value.values())
    if isinstance(value, list):
        return bool(value) and all(no_empty(v) for v in value)
    if isinstance(value, str):
        return value != ""
    return value is not None


def messages(report: MappingReport, severity: str) -> list[str]:
    return [f"{i.location}: {i.message}" for i in report.issues if i.severity == severity]


@pytest.fixture
def resources(example_record: IopRecord) -> list[JSON]:
    return observation.to_fhir(MappingContext(example_record))


# --- forward on the example -----------------------------------------------------------------


def test_every_resource_validates_and_has_no_empty_parts(resources: list[JSON]) -> None:
    assert len(resources) == 3 + 1 + 6 + (1 + 4) + 3
    for resource in resources:
        get_fhir_model_class("Observation").model_validate(resource)
        assert no_empty(resource)
        assert resource["status"] == "final"
        assert resource["subject"]["reference"].startswith("urn:uuid:")
        assert resource["id"] == resource["id"].lower() and len(resource["id"]) == 36
    assert len({r["id"] for r in resources}) == len(resources)


def test_forward_is_deterministic(example_record: IopRecord) -> None:
    assert observation.to_fhir(MappingContext(example_record)) == observation.to_fhir(MappingContext(example_record))


def test_phq9_components_value_and_band(resources: list[JSON], example_record: IopRecord) -> None:
    phq = by_identifier(resources, "assessment", "as-1")
    assert phq["meta"]["profile"] == [us_core("us-core-observation-screening-assessment")]
    assert codes(phq["category"][0]) == [("http://terminology.hl7.org/CodeSystem/observation-category", "survey")]
    assert codes(phq["category"][1]) == [("http://hl7.org/fhir/us/core/CodeSystem/us-core-category", "cognitive-status")]
    assert codes(phq["code"]) == [(LOINC, "44249-1")]
    assert phq["valueQuantity"] == {"value": 15, "unit": "{score}", "system": UCUM, "code": "{score}"}
    assert codes(phq["interpretation"][0]) == [(code_system("severity-band"), "moderately-severe")]
    assert phq["effectiveDateTime"] == "2026-01-05T10:00:00Z"
    assert phq["performer"] == [MappingContext(example_record).practitioner("st-psy-1")]
    items = phq["component"][:10]
    assert [c["code"]["coding"][0]["code"] for c in items] == [
        "44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8", "69722-7",
    ]
    # scores 2,2,2,2,1,2,2,1,1 as the PHQ answer list; item 10 (difficulty) has no answer list here
    answers = [c["valueCodeableConcept"]["coding"][0]["code"] for c in items[:9]]
    assert answers == ["LA6570-1"] * 4 + ["LA6569-3"] + ["LA6570-1"] * 2 + ["LA6569-3"] * 2
    assert items[9]["valueInteger"] == 2
    # the derived total component, so component-code searches for 44261-6 find it
    assert len(phq["component"]) == 11
    assert codes(phq["component"][10]["code"]) == [(LOINC, "44261-6")]
    assert phq["component"][10]["valueQuantity"]["value"] == 15


def test_assessment_without_items_and_local_codes(resources: list[JSON]) -> None:
    dast = by_identifier(resources, "assessment", "as-3")
    assert codes(dast["code"]) == [(LOINC, "82666-9")]
    assert [codes(c["code"]) for c in dast["component"]] == [[(LOINC, "82667-7")]]
    assert "performer" not in dast
    audit = by_identifier(resources, "assessment", "as-4")
    assert [c["code"]["coding"][0] for c in audit["component"][:3]][0]["system"] == code_system("instrument-item")
    assert [c["code"]["coding"][0]["code"] for c in audit["component"][:3]] == ["AUDIT-C-1", "AUDIT-C-2", "AUDIT-C-3"]
    assert [c["valueInteger"] for c in audit["component"][:3]] == [1, 0, 0]
    assert (OBSERVATION_INTERPRETATION, "NEG") in codes(audit["interpretation"][0])


def test_cssrs_screen_code_answers_and_risk_level(resources: list[JSON]) -> None:
    cssrs = by_identifier(resources, "assessment", "as-5")
    assert codes(cssrs["code"]) == [(code_system("instrument"), "C-SSRS-screen")]
    answers = [c["valueCodeableConcept"]["coding"][0]["code"] for c in cssrs["component"][:7]]
    assert answers == ["LA33-6", "LA32-8", "LA32-8", "LA32-8", "LA32-8", "LA33-6", "LA32-8"]
    risk = cssrs["component"][7]
    assert codes(risk["code"]) == [(LOINC, "93374-7")]
    assert codes(risk["valueCodeableConcept"]) == [(code_system("severity-band"), "moderate")]


def test_drug_screen_panel_and_members(resources: list[JSON]) -> None:
    panel = by_identifier(resources, "drug-screen", "ds-1")
    assert panel["meta"]["profile"] == [us_core("us-core-observation-lab")]
    assert codes(panel["category"][0]) == [("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")]
    assert codes(panel["code"]) == [(LOINC, "69739-1")]
    assert "valueQuantity" not in panel and "valueCodeableConcept" not in panel
    members = {r["id"]: r for r in resources if r["identifier"][0]["system"].endswith("/drug-screen-result")}
    assert [m["reference"][len("urn:uuid:"):] for m in panel["hasMember"]] == list(members)
    fentanyl = by_identifier(resources, "drug-screen-result", "ds-1.fentanyl")
    assert codes(fentanyl["code"]) == [(LOINC, "59673-4")]
    assert codes(fentanyl["valueCodeableConcept"]) == [(SNOMED, "10828004")]
    assert codes(fentanyl["interpretation"][0]) == [(OBSERVATION_INTERPRETATION, "POS")]
    assert fentanyl["extension"] == [{"url": extension_url("drug-screen-expected"), "valueBoolean": False}]
    assert fentanyl["note"] == [{"text": "Unexpected result given current prescriptions"}]
    assert fentanyl["effectiveDateTime"] == panel["effectiveDateTime"] == "2026-01-13T09:30:00-06:00"
    opiates = by_identifier(resources, "drug-screen-result", "ds-1.opiates")
    assert codes(opiates["valueCodeableConcept"]) == [(SNOMED, "260385009")]
    assert codes(opiates["interpretation"][0]) == [(OBSERVATION_INTERPRETATION, "NEG")]
    assert "note" not in opiates and opiates["extension"][0]["valueBoolean"] is True


def test_vitals(resources: list[JSON]) -> None:
    bp = by_identifier(resources, "vital", "vt-2")
    assert bp["meta"]["profile"] == [us_core("us-core-blood-pressure")]
    assert codes(bp["category"][0]) == [("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")]
    assert codes(bp["code"]) == [(LOINC, "85354-9")]
    assert "valueQuantity" not in bp
    assert [(c["code"]["coding"][0]["code"], c["valueQuantity"]) for c in bp["component"]] == [
        ("8480-6", {"value": 128, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}),
        ("8462-4", {"value": 82, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}),
    ]
    weight = by_identifier(resources, "vital", "vt-1")
    assert weight["meta"]["profile"] == [us_core("us-core-body-weight")]
    assert codes(weight["code"]) == [(LOINC, "29463-7")]
    assert weight["valueQuantity"] == {"value": 72.5, "unit": "kg", "system": UCUM, "code": "kg"}
    assert by_identifier(resources, "vital", "vt-3")["meta"]["profile"] == [us_core("us-core-heart-rate")]


def test_adherence_and_side_effect(resources: list[JSON], example_record: IopRecord) -> None:
    ctx = MappingContext(example_record)
    missed = by_identifier(resources, "adherence", "ad-2")
    assert "meta" not in missed
    assert codes(missed["code"]) == [(LOINC, "71799-1")]
    assert codes(missed["category"][0]) == [("http://terminology.hl7.org/CodeSystem/observation-category", "therapy")]
    assert missed["focus"] == [ctx.prescription("rx-2")]
    assert missed["effectiveDateTime"] == "2026-01-26"
    assert codes(missed["valueCodeableConcept"]) == [(SNOMED, "702565001")]
    assert codes(missed["method"]) == [(code_system("adherence-source"), "pill-count")]
    assert missed["note"] == [{"text": "4 tablets left over"}]
    effect = by_identifier(resources, "side-effect", "se-1")
    assert codes(effect["code"]) == [(SNOMED, "62014003")]
    assert effect["valueCodeableConcept"] == {"coding": [{"system": SNOMED, "code": "79519003"}], "text": "Daytime sedation"}
    severity, action = effect["component"]
    assert codes(severity["code"]) == [(code_system("side-effect"), "severity")]
    assert codes(severity["valueCodeableConcept"]) == [(code_system("severity"), "moderate"), (SNOMED, "6736007")]
    assert codes(action["valueCodeableConcept"]) == [(code_system("side-effect-action"), "stopped")]


def test_drug_level_forward(example_json: JSON) -> None:
    data = copy.deepcopy(example_json)
    data["drug_levels"] = [
        {"id": "dl-1", "date": "2026-01-20T08:00:00Z", "analyte": "lithium", "value": 0.8, "unit": "mmol/L", "trough": True, "prescription_id": "rx-1"},
        {"id": "dl-2", "date": "2026-01-21T08:00:00Z", "analyte": "valproate", "value": 72.25, "unit": "ug/mL"},
    ]
    record = validate_record(data)
    out = observation.to_fhir(MappingContext(record))
    trough, plain = by_identifier(out, "drug-level", "dl-1"), by_identifier(out, "drug-level", "dl-2")
    for level in (trough, plain):
        get_fhir_model_class("Observation").model_validate(level)
        assert level["meta"]["profile"] == [us_core("us-core-observation-lab")]
    assert codes(trough["code"]) == [(LOINC, "74806-1")]
    assert trough["valueQuantity"] == {"value": 0.8, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"}
    assert trough["focus"] == [MappingContext(record).prescription("rx-1")]
    assert codes(plain["code"]) == [(LOINC, "4086-5")] and "focus" not in plain
    rebuilt, report = round_trip(record, data)
    assert rebuilt.drug_levels == record.drug_levels
    assert not report.issues


# --- round trip -----------------------------------------------------------------------------


def test_round_trip_example_is_lossless_and_silent(example_record: IopRecord, example_json: JSON) -> None:
    rebuilt, report = round_trip(example_record, example_json)
    for part in PARTS:
        assert getattr(rebuilt, part) == getattr(example_record, part), part
    assert not report.issues, [str(i) for i in report.issues]


def test_round_trip_after_a_server_rewrote_ids(example_record: IopRecord, example_json: JSON) -> None:
    """A server assigns its own ids and rewrites references to Type/id: our identifiers still carry the ids."""
    resources = party_stubs(example_record) + observation.to_fhir(MappingContext(example_record))
    renamed = {f"urn:uuid:{r['id']}": f"{r['resourceType']}/srv{i}" for i, r in enumerate(resources)}

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (renamed.get(v, v) if k == "reference" else rewrite(v)) for k, v in value.items()}
        return [rewrite(v) for v in value] if isinstance(value, list) else value

    stored = [{**rewrite(r), "id": f"srv{i}"} for i, r in enumerate(resources)]
    draft, report = reverse(stored, example_json)
    rebuilt = validate_record({**example_json, **{k: draft.get(k, []) for k in PARTS}})
    for part in PARTS:
        assert getattr(rebuilt, part) == getattr(example_record, part), part
    assert not report.issues, [str(i) for i in report.issues]


# --- hypothesis: random valid parts ---------------------------------------------------------

START, END = dt.date(2026, 1, 5), dt.date(2026, 2, 27)
OFFSETS = [dt.timezone.utc, dt.timezone(dt.timedelta(hours=-6)), dt.timezone(dt.timedelta(hours=5, minutes=30))]
PRESCRIPTIONS = ["rx-1", "rx-2", "rx-3", "rx-4"]
STAFF = ["st-psy-1", "st-ther-1", "st-cm-1"]
local_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9\-.]{0,20}", fullmatch=True)
days = st.dates(min_value=START, max_value=END)
texts = contract_texts(60)


@st.composite
def moments(draw: st.DrawFn) -> str:
    day = draw(days)
    t = draw(st.times())
    return dt.datetime.combine(day, t, draw(st.sampled_from(OFFSETS))).isoformat()


def amounts(max_value: int = 500) -> st.SearchStrategy[float | int]:
    """JSON numbers as the contract holds them: up to 4 decimal places."""
    return st.decimals(min_value=0, max_value=max_value, places=4).map(lambda d: int(d) if d == d.to_integral_value() else float(d))


@st.composite
def assessments(draw: st.DrawFn) -> JSON:
    name = draw(st.sampled_from(sorted(terminology.tables()["instruments"])))
    spec = terminology.instrument(name)
    count = scored_item_count(name)
    low, high = spec["item_range"]
    with_items = name == "C-SSRS-screen" or draw(st.booleans())
    items = []
    if with_items:
        items = [{"number": n, "score": draw(st.integers(low, high))} for n in range(1, count + 1)]
        if spec["extra_items"] and draw(st.booleans()):
            items.append({"number": count + 1, "score": draw(st.integers(0, 3))})
        if draw(st.booleans()):
            items = draw(st.permutations(items))
        total = sum(i["score"] for i in items if i["number"] <= count)
    else:
        total = draw(st.integers(*spec["range"]))
    probe = Assessment.model_construct(instrument=name, total=total, items=[AssessmentItem.model_construct(**i) for i in items])
    out = {"instrument": name, "date": draw(moments()), "items": items, "total": total, "severity": severity_band(probe, "female")}
    if draw(st.booleans()):
        out["performer_id"] = draw(st.sampled_from(STAFF))
    return out


@st.composite
def drug_screens(draw: st.DrawFn) -> JSON:
    analytes = draw(st.lists(st.sampled_from(sorted(terminology.tables()["drug_screen_analytes"])), min_size=1, max_size=12, unique=True))
    results = [
        {"analyte": a, "result": draw(st.sampled_from(["positive", "negative", "inconclusive"])), "expected": draw(st.booleans())}
        for a in analytes
    ]
    return {"collected": draw(moments()), "specimen": "urine", "method": draw(st.sampled_from(["screen", "confirmatory"])), "results": results}


@st.composite
def vitals(draw: st.DrawFn) -> JSON:
    table = terminology.tables()["vitals"]
    kind = draw(st.sampled_from(sorted(table)))
    out = {"date": draw(moments()), "kind": kind, "unit": draw(st.sampled_from(table[kind]["units"]))}
    if kind == "blood-pressure":
        out["systolic"], out["diastolic"] = draw(amounts(300)), draw(amounts(200))
    else:
        out["value"] = draw(amounts())
    return out


@st.composite
def drug_levels(draw: st.DrawFn) -> JSON:
    table = terminology.tables()["drug_levels"]
    analyte = draw(st.sampled_from(sorted(table)))
    out = {"date": draw(moments()), "analyte": analyte, "value": draw(amounts(200)), "unit": table[analyte]["unit"]}
    out["trough"] = bool(table[analyte]["trough_code"]) and draw(st.booleans())
    if draw(st.booleans()):
        out["prescription_id"] = draw(st.sampled_from(PRESCRIPTIONS))
    return out


def choice(model: type, field: str) -> st.SearchStrategy[str]:
    """Any value of a contract Literal field."""
    return st.sampled_from(get_args(model.model_fields[field].annotation))


adherence = st.fixed_dictionaries(
    {
        "date": days.map(dt.date.isoformat),
        "prescription_id": st.sampled_from(PRESCRIPTIONS),
        "status": choice(AdherenceEvent, "status"),
        "source": choice(AdherenceEvent, "source"),
    },
    optional={"note": texts},
)
side_effects = st.fixed_dictionaries(
    {
        "date": days.map(dt.date.isoformat),
        "prescription_id": st.sampled_from(PRESCRIPTIONS),
        "effect": texts,
        "severity": choice(SideEffect, "severity"),
        "action_taken": choice(SideEffect, "action_taken"),
    },
    optional={"snomed": st.from_regex(r"[0-9]{6,18}", fullmatch=True)},
)


def with_ids(strategy: st.SearchStrategy[JSON], max_size: int = 4) -> st.SearchStrategy[list[JSON]]:
    return st.lists(st.tuples(local_ids, strategy), max_size=max_size, unique_by=lambda pair: pair[0]).map(
        lambda pairs: [{"id": local, **item} for local, item in pairs]
    )


parts = st.fixed_dictionaries(
    {
        "adherence": with_ids(adherence),
        "side_effects": with_ids(side_effects),
        "assessments": with_ids(assessments(), 6),
        "drug_screens": with_ids(drug_screens(), 3),
        "vitals": with_ids(vitals()),
        "drug_levels": with_ids(drug_levels()),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(parts=parts)
def test_round_trip_random_parts(parts: JSON, example_json: JSON) -> None:
    record = validate_record({**example_json, **parts})
    rebuilt, report = round_trip(record, example_json)
    for part in PARTS:
        assert getattr(rebuilt, part) == getattr(record, part), part
    assert not report.issues, [str(i) for i in report.issues]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(parts=parts)
def test_random_parts_validate_as_r4(parts: JSON, example_json: JSON) -> None:
    record = validate_record({**example_json, **parts})
    for resource in observation.to_fhir(MappingContext(record)):
        get_fhir_model_class("Observation").model_validate(resource)
        assert no_empty(resource)


# --- foreign FHIR ---------------------------------------------------------------------------

FOREIGN_RX = {
    "resourceType": "MedicationRequest",
    "id": "rx-bup",
    "identifier": [{"system": "https://ehr.example.org/orders", "value": "998877"}],
}
PATIENT = {"reference": "Patient/p1"}


def coded(system: str, code: str, display: str | None = None) -> JSON:
    return {"coding": [{"system": system, "code": code, **({"display": display} if display else {})}]}


def foreign_obs(rid: str, code: JSON, **elements: Any) -> JSON:
    return {"resourceType": "Observation", "id": rid, "status": "final", "code": code, "subject": PATIENT, **elements}


def phq_item(rid: str, code: str, answer: str) -> JSON:
    return foreign_obs(rid, coded(LOINC, code), effectiveDateTime="2026-01-20T09:00:00-05:00", valueCodeableConcept=coded(LOINC, answer))


def test_foreign_us_core_style_phq9_panel_reads_items_from_members(example_json: JSON) -> None:
    items = ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"]
    answers = ["LA6570-1", "LA6569-3", "LA6568-5", "LA6571-9", "LA6569-3", "LA6568-5", "LA6568-5", "LA6568-5", "LA6568-5"]
    members = [phq_item(f"i{n}", code, answer) for n, (code, answer) in enumerate(zip(items, answers), start=1)]
    total = foreign_obs("tot", coded(LOINC, "44261-6"), effectiveDateTime="2026-01-20T09:00:00-05:00", valueString="7")
    panel = foreign_obs(
        "phq-panel",
        coded(LOINC, "44249-1"),
        effectiveDateTime="2026-01-20T09:00:00-05:00",
        performer=[{"reference": "Practitioner/unknown"}],
        hasMember=[{"reference": f"Observation/{m['id']}"} for m in [*members, total]] + [{"reference": "Observation/gone"}],
        derivedFrom=[{"reference": "QuestionnaireResponse/qr1"}],
    )
    draft, report = reverse([panel, *members, total], example_json)
    (assessment,) = draft["assessments"]  # members are not mapped again on their own
    assert assessment == {
        "id": "phq-panel",
        "instrument": "PHQ-9",
        "date": "2026-01-20T09:00:00-05:00",
        "items": [{"number": n, "score": s} for n, s in enumerate([2, 1, 0, 3, 1, 0, 0, 0, 0], start=1)],
        "total": 7,
        "severity": "mild",
    }
    infos = messages(report, "information")
    assert any("severity band 'mild' derived" in m for m in infos)
    warnings = messages(report, "warning")
    assert any("hasMember[10]" in m for m in warnings)  # the missing member
    assert any("performer[0]" in m for m in warnings)
    assert not report.errors


@pytest.mark.parametrize(
    ("value", "total", "band"),
    [({"valueInteger": 12}, 12, "moderate"), ({"valueString": "21"}, 21, "severe"), ({"valueQuantity": {"value": 3, "unit": "{score}"}}, 3, "minimal")],
)
def test_foreign_lone_phq9_total(example_json: JSON, value: JSON, total: int, band: str) -> None:
    obs = foreign_obs("phq-total", coded(LOINC, "44261-6", "PHQ-9 total"), effectiveDateTime="2026-02-02T10:00:00Z", **value)
    draft, report = reverse([obs], example_json)
    assert draft["assessments"] == [
        {"id": "phq-total", "instrument": "PHQ-9", "date": "2026-02-02T10:00:00Z", "items": [], "total": total, "severity": band}
    ]
    assert any("derived from the total" in m for m in messages(report, "information"))


def test_foreign_assessment_oddities(example_json: JSON) -> None:
    out_of_range = foreign_obs("gad-bad", coded(LOINC, "70274-6"), effectiveDateTime="2026-02-02T10:00:00Z", valueInteger=40)
    no_date = foreign_obs("gad-nodate", coded(LOINC, "70274-6"), valueInteger=4)
    lone_item = phq_item("lonely", "44250-9", "LA6570-1")
    partial = foreign_obs(
        "gad-partial", coded(LOINC, "69737-5"), effectiveDateTime="2026-02-03",
        component=[{"code": coded(LOINC, "69725-0"), "valueCodeableConcept": coded(LOINC, "LA6570-1")}],
        valueInteger=9,
    )
    draft, report = reverse([out_of_range, no_date, lone_item, partial], example_json)
    (gad,) = draft["assessments"]
    assert gad["id"] == "gad-partial" and gad["items"] == [] and gad["total"] == 9 and gad["date"] == "2026-02-03T00:00:00Z"
    errors = [str(i) for i in report.errors]
    assert any("gad-bad" in e for e in errors) and any("gad-nodate" in e for e in errors)
    warnings = messages(report, "warning")
    assert any("lonely" in w and "outside its panel" in w for w in warnings)
    assert any("1 of 7 scored items" in w for w in warnings)


def test_foreign_single_urine_fentanyl_test_becomes_a_screen(example_json: JSON) -> None:
    fentanyl = foreign_obs(
        "lab-1", coded(LOINC, "59673-4", "Fentanyl urine screen"), effectiveDateTime="2026-01-30T08:15:00-06:00", valueString="Detected"
    )
    bup = foreign_obs(
        "lab-2", coded(LOINC, "93494-3"), effectiveDateTime="2026-01-30T08:15:00-06:00",
        valueCodeableConcept={"text": "Positive"},
    )
    draft, report = reverse([fentanyl, bup], example_json)
    assert draft["drug_screens"] == [
        {"id": "lab-1", "collected": "2026-01-30T08:15:00-06:00", "specimen": "urine", "method": "screen",
         "results": [{"analyte": "fentanyl", "result": "positive", "expected": False}]},
        # rx-3 (buprenorphine/naloxone) is active on 2026-01-30 in the example record
        {"id": "lab-2", "collected": "2026-01-30T08:15:00-06:00", "specimen": "urine", "method": "screen",
         "results": [{"analyte": "buprenorphine", "result": "positive", "expected": True}]},
    ]
    warnings = messages(report, "warning")
    assert sum("is not stated; derived from the prescriptions" in w for w in warnings) == 2


def test_foreign_diagnostic_report_groups_results_into_one_screen(example_json: JSON) -> None:
    results = [
        foreign_obs("r1", coded(LOINC, "16208-1"), valueCodeableConcept=coded(SNOMED, "260385009"),
                    extension=[{"url": extension_url("drug-screen-expected"), "valueBoolean": False}]),
        foreign_obs("r2", coded(LOINC, "40839-3"), interpretation=[coded(OBSERVATION_INTERPRETATION, "ND")]),
        foreign_obs("r3", coded(LOINC, "2161-8", "Creatinine [Mass/volume] in Urine"), valueQuantity={"value": 80, "unit": "mg/dL"}),
    ]
    report_resource = {
        "resourceType": "DiagnosticReport", "id": "dr-1", "status": "final", "code": coded(LOINC, "87428-9"),
        "effectiveDateTime": "2026-02-10T07:00:00Z", "result": [{"reference": f"Observation/{r['id']}"} for r in results],
    }
    draft, report = reverse([report_resource, *results], example_json)
    (screen,) = draft["drug_screens"]
    assert screen["id"] == "dr-1" and screen["method"] == "confirmatory" and screen["collected"] == "2026-02-10T07:00:00Z"
    assert screen["results"] == [
        {"analyte": "buprenorphine", "result": "negative", "expected": False},
        {"analyte": "fentanyl", "result": "negative", "expected": True},
    ]
    assert any("r3" in w and "2161-8" in w for w in messages(report, "warning"))


def test_drug_screen_members_are_not_mapped_twice(resources: list[JSON], example_record: IopRecord, example_json: JSON) -> None:
    draft, _ = reverse(party_stubs(example_record) + resources, example_json)
    assert [s["id"] for s in draft["drug_screens"]] == ["ds-1"]


def test_foreign_vitals_units(example_json: JSON) -> None:
    def weight(rid: str, quantity: JSON) -> JSON:
        return foreign_obs(rid, coded(LOINC, "29463-7"), effectiveDateTime="2026-01-10T08:00:00Z", valueQuantity=quantity)

    resources = [
        weight("w-lb", {"value": 160.2, "unit": "lb", "system": UCUM, "code": "[lb_av]"}),
        weight("w-text", {"value": 160.2, "unit": "lbs"}),
        weight("w-stone", {"value": 11, "unit": "stone"}),
        weight("w-precise", {"value": 72.123456, "unit": "kg", "system": UCUM, "code": "kg"}),
        foreign_obs("bp-old", coded(LOINC, "55284-4"), effectiveDateTime="2026-01-10T08:00:00Z", component=[
            {"code": coded(LOINC, "8480-6"), "valueQuantity": {"value": 120, "unit": "mmHg"}},
            {"code": coded(LOINC, "8462-4"), "valueQuantity": {"value": 80, "unit": "mmHg"}},
        ]),
        foreign_obs("bp-half", coded(LOINC, "85354-9"), effectiveDateTime="2026-01-10T08:00:00Z", component=[
            {"code": coded(LOINC, "8480-6"), "valueQuantity": {"value": 120, "system": UCUM, "code": "mm[Hg]"}},
        ]),
        foreign_obs("sys-alone", coded(LOINC, "8480-6"), effectiveDateTime="2026-01-10T08:00:00Z", valueQuantity={"value": 120, "code": "mm[Hg]"}),
    ]
    draft, report = reverse(resources, example_json)
    by_id = {v["id"]: v for v in draft["vitals"]}
    assert set(by_id) == {"w-lb", "w-text", "w-precise", "bp-old"}
    assert (by_id["w-lb"]["value"], by_id["w-lb"]["unit"]) == (160.2, "[lb_av]")
    assert by_id["w-text"]["unit"] == "[lb_av]"
    assert by_id["w-precise"]["value"] == 72.1235
    assert by_id["bp-old"] == {"id": "bp-old", "date": "2026-01-10T08:00:00Z", "kind": "blood-pressure", "systolic": 120, "diastolic": 80, "unit": "mm[Hg]"}
    assert any("w-stone" in w and "stone" in w for w in messages(report, "warning"))
    assert any("sys-alone" in w and "systolic" in w for w in messages(report, "warning"))
    assert any("bp-half" in str(e) and "diastolic" in str(e) for e in report.errors)
    validate_record({**example_json, "vitals": draft["vitals"]})


def test_foreign_adherence_side_effect_and_level(example_json: JSON) -> None:
    contained_rx = {"resourceType": "MedicationRequest", "id": "inner"}
    resources = [
        FOREIGN_RX,
        foreign_obs("adh-1", coded(LOINC, "71799-1"), effectiveDateTime="2026-01-15T21:00:00-06:00", valueBoolean=False,
                    basedOn=[{"reference": "https://ehr.example.org/fhir/MedicationRequest/rx-bup"}],
                    note=[{"text": "forgot"}, {"text": "travelling"}]),
        foreign_obs("adh-2", coded(LOINC, "71799-1"), effectiveDate="2026-01-15", valueBoolean=True),
        foreign_obs("se-x", coded(SNOMED, "62014003"), effectiveDateTime="2026-01-16",
                    contained=[contained_rx], focus=[{"reference": "#inner"}],
                    valueCodeableConcept=coded(SNOMED, "271807003", "Eruption of skin"),
                    component=[{"code": coded(code_system("side-effect"), "severity"), "valueCodeableConcept": coded(SNOMED, "24484000")}]),
        foreign_obs("se-y", coded(SNOMED, "62014003"), effectiveDateTime="2026-01-16", focus=[{"reference": "MedicationRequest/rx-bup"}],
                    valueCodeableConcept={"text": "Nausea"}),
        foreign_obs("li-1", coded(LOINC, "74806-1"), effectiveDateTime="2026-01-17T07:30:00Z",
                    valueQuantity={"value": 0.9, "unit": "mEq/L", "system": UCUM, "code": "meq/L"}),
        foreign_obs("junk", coded("http://example.org/local", "XYZ-1"), effectiveDateTime="2026-01-17T07:30:00Z", valueString="n/a"),
        foreign_obs("void", coded(LOINC, "71799-1"), effectiveDateTime="2026-01-17", valueBoolean=True, status="entered-in-error"),
    ]
    draft, report = reverse(resources, example_json)
    assert draft["adherence"] == [
        {"id": "adh-1", "date": "2026-01-15", "prescription_id": "rx-bup", "status": "missed", "source": "self-report", "note": "forgot\n\ntravelling"}
    ]
    assert draft["side_effects"] == [
        {"id": "se-x", "date": "2026-01-16", "prescription_id": "inner", "effect": "Eruption of skin", "snomed": "271807003",
         "severity": "severe", "action_taken": "none"}
    ]
    assert draft["drug_levels"] == [
        {"id": "li-1", "date": "2026-01-17T07:30:00Z", "analyte": "lithium", "value": 0.9, "unit": "mmol/L", "trough": True}
    ]
    errors = [str(e) for e in report.errors]
    assert any("adh-2" in e and "prescription" in e for e in errors)  # no focus/basedOn, and no effectiveDateTime
    assert any("se-y" in e and "severity" in e for e in errors)
    warnings = messages(report, "warning")
    assert any("junk" in w and "http://example.org/local|XYZ-1" in w for w in warnings)
    assert any("void" in w and "entered-in-error" in w for w in warnings)
    assert any("self-report assumed" in w for w in warnings)
    assert any("'none' recorded" in w for w in warnings)


GARBAGE: list[Any] = [
    {"resourceType": "Observation"},
    {"resourceType": "Observation", "id": "g1", "code": "44261-6", "valueInteger": "x"},
    {"resourceType": "Observation", "id": "g2", "code": {"coding": "loinc"}, "status": ["final"]},
    {"resourceType": "Observation", "id": "g3", "code": {"coding": [None, 5, {"system": LOINC, "code": 44261}]}},
    {"resourceType": "Observation", "id": "g4", "code": coded(LOINC, "44249-1"), "hasMember": "Observation/x", "component": {"a": 1},
     "effectiveDateTime": 20260101, "interpretation": [None], "performer": [{"reference": 7}]},
    {"resourceType": "Observation", "id": "g5", "code": coded(LOINC, "69739-1"), "hasMember": [None, {"reference": None}, {"reference": "Observation/g6"}],
     "effectiveDateTime": "2026-01-10T10:00:00"},
    {"resourceType": "Observation", "id": "g6", "code": coded(LOINC, "19295-5"), "valueCodeableConcept": {"coding": {"x": 1}}, "extension": "no"},
    {"resourceType": "Observation", "id": "g7", "code": coded(LOINC, "29463-7"), "effectiveDateTime": "2026-01", "valueQuantity": [1, 2]},
    {"resourceType": "Observation", "id": "g8", "code": coded(LOINC, "8867-4"), "effectivePeriod": {"start": "2026-01-10T10:00:00Z"},
     "valueQuantity": {"value": "NaN", "unit": "/min"}},
    {"resourceType": "Observation", "id": "g9", "code": coded(LOINC, "14334-7"), "effectiveDateTime": "2026-01-10T10:00:00Z",
     "valueQuantity": {"value": -1, "unit": "mmol/L"}, "identifier": [None, {"system": 5, "value": "x"}]},
    {"resourceType": "Observation", "id": "g10", "code": coded(SNOMED, "62014003"), "effectiveDateTime": "2026-01-10",
     "focus": "MedicationRequest/x", "component": [None, {"code": None}], "note": "text"},
    {"resourceType": "Observation", "id": "g11", "code": coded(LOINC, "71799-1"), "effectiveDateTime": None, "valueCodeableConcept": []},
    {"resourceType": "DiagnosticReport", "id": "d1", "result": "nope"},
]


def test_garbage_never_crashes_and_is_reported(example_json: JSON) -> None:
    draft, report = reverse(GARBAGE, example_json)
    assert not any(draft.get(part) for part in PARTS if part != "drug_screens")
    # g5 is a screen panel whose only resolvable member (g6) has no readable result: left out
    assert "drug_screens" not in draft
    located = {i.location.split(".")[0] for i in report.issues}
    for rid in ("g1", "g2", "g3", "g4", "g5", "g6", "g7", "g8", "g9", "g10", "g11"):
        assert f"Observation/{rid}" in located, rid


def test_resource_without_id_uses_its_full_url(example_json: JSON) -> None:
    obs = foreign_obs("x", coded(LOINC, "8867-4"), effectiveDateTime="2026-01-10T10:00:00Z", valueQuantity={"value": 64, "unit": "/min"})
    del obs["id"]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"fullUrl": "urn:uuid:2b1f0c8e-58d5-4c36-9a59-5b2f0c1e7d11", "resource": obs}]}
    draft = {"client": example_json["client"]}
    report = MappingReport()
    observation.from_fhir(ResourceIndex.from_bundle(bundle), draft, report)
    assert draft["vitals"][0]["id"] == "2b1f0c8e-58d5-4c36-9a59-5b2f0c1e7d11"
    assert draft["vitals"][0]["unit"] == "/min"


def test_resources_share_no_mutable_parts(resources: list[JSON]) -> None:
    """Callers (privacy labels, formats) may edit one resource; no other may change with it."""
    seen: dict[int, int] = {}

    def walk(value: Any, owner: int) -> None:
        if isinstance(value, (dict, list)):
            assert seen.setdefault(id(value), owner) == owner
            for child in value.values() if isinstance(value, dict) else value:
                walk(child, owner)

    for i, resource in enumerate(resources):
        walk(resource, i)


def test_foreign_items_disagreeing_with_total_use_the_sum(example_json: JSON) -> None:
    gad = ["69725-0", "68509-9", "69733-4", "69734-2", "69735-9", "69689-8", "69736-7"]
    panel = foreign_obs(
        "gad-1", coded(LOINC, "69737-5"), effectiveDateTime="2026-01-22T11:00:00Z", valueQuantity={"value": 20},
        component=[{"code": coded(LOINC, code), "valueCodeableConcept": coded(LOINC, "LA6571-9")} for code in gad],
    )
    draft, report = reverse([panel], example_json)
    (gad_7,) = draft["assessments"]
    assert gad_7["total"] == 21 and gad_7["severity"] == "severe" and len(gad_7["items"]) == 7
    assert any("differs from the sum" in w for w in messages(report, "warning"))
