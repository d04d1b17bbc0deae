"""MedicationRequest <-> prescriptions and discharge medications: forward, round trip, foreign FHIR."""

from __future__ import annotations

import copy
import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import texts

from iop_fhir import terminology
from iop_fhir.mappers import medication_request as mr
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record.model import DischargeMedication, IopRecord, Medication, Prescription
from iop_fhir.record.validate import DOSE_UNITS

JSON = dict[str, Any]
UCUM = terminology.UCUM
EXT = terminology.extension_url


def party_stubs(ctx: MappingContext) -> list[JSON]:
    """Bare Practitioner/Organization/Condition resources the references point at (other families make the real ones)."""
    rec = ctx.record
    parts = [("Practitioner", "staff", m.id, True) for m in rec.care_team]
    parts += [("Organization", "pharmacy", p.id, True) for p in rec.pharmacies]
    parts += [("Condition", "diagnosis", d.id, False) for d in rec.diagnoses]
    return [
        {"resourceType": t, "id": ctx.ids.id(t, kind, local, shared=shared), "identifier": [ctx.ids.identifier(kind, local, shared=shared)]}
        for t, kind, local, shared in parts
    ]


def reverse(resources: list[JSON], draft: JSON | None = None) -> tuple[JSON, MappingReport]:
    draft = {} if draft is None else draft
    report = MappingReport()
    mr.from_fhir(ResourceIndex.build(resources), draft, report)
    return draft, report


def messages(report: MappingReport, severity: str) -> list[str]:
    return [f"{i.location}: {i.message}" for i in report.issues if i.severity == severity]


def by_local(resources: list[JSON], kind: str, local: str) -> JSON:
    return next(r for r in resources if r["identifier"][0]["system"].endswith(f"/{kind}") and r["identifier"][0]["value"].endswith(f"/{local}"))


def assert_no_empty(value: Any) -> None:
    if isinstance(value, dict):
        assert value, "empty object"
        for v in value.values():
            assert v is not None
            assert_no_empty(v)
    elif isinstance(value, list):
        assert value, "empty array"
        for v in value:
            assert_no_empty(v)
    elif isinstance(value, str):
        assert value != ""


def validate_r4b(resource: JSON) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


# --- forward --------------------------------------------------------------------------------


@pytest.fixture
def ctx(example_record: IopRecord) -> MappingContext:
    return MappingContext(example_record)


@pytest.fixture
def resources(ctx: MappingContext) -> list[JSON]:
    return mr.to_fhir(ctx)


def test_forward_validates_and_meets_us_core(resources: list[JSON]) -> None:
    assert len(resources) == 4 + 3  # four prescriptions, three discharge entries
    for res in resources:
        validate_r4b(res)
        assert_no_empty(res)
        assert res["meta"]["profile"] == [terminology.us_core("us-core-medicationrequest")]
        # US Core mandatory and must-support elements the record has data for
        assert res["status"] and res["intent"] and res["subject"]["reference"].startswith("urn:uuid:")
        assert terminology.MEDREQ_CATEGORY in {c["system"] for cat in res["category"] for c in cat["coding"]}
        assert res["medicationCodeableConcept"]["coding"][0]["system"] == terminology.RXNORM
        assert res["authoredOn"] and res["requester"]["reference"].startswith("urn:uuid:")
        assert res["reportedBoolean"] is False
        d = res["dosageInstruction"][0]
        assert d["timing"]["repeat"] and d["doseAndRate"][0]["doseQuantity"]["system"] == UCUM
        assert res["identifier"][0]["use"] == "usual"


def test_forward_is_deterministic(ctx: MappingContext, example_record: IopRecord) -> None:
    assert mr.to_fhir(ctx) == mr.to_fhir(MappingContext(example_record))


def test_forward_controlled_mat_prescription(ctx: MappingContext, resources: list[JSON]) -> None:
    rx3 = by_local(resources, "prescription", "rx-3")
    assert rx3["id"] == ctx.ids.id("MedicationRequest", "prescription", "rx-3")
    assert rx3["identifier"][0] == ctx.ids.identifier("prescription", "rx-3")
    assert rx3["extension"] == [
        {"url": EXT("dea-schedule"), "valueCode": "III"},
        {"url": EXT("medication-assisted-treatment"), "valueBoolean": True},
    ]
    assert rx3["intent"] == "order" and rx3["status"] == "active"
    assert rx3["medicationCodeableConcept"] == {
        "coding": [{"system": terminology.RXNORM, "code": "1010604", "display": "buprenorphine 8 MG / naloxone 2 MG Sublingual Film"}],
        "text": "buprenorphine 8 MG / naloxone 2 MG Sublingual Film",
    }
    assert rx3["category"][0]["coding"][0]["code"] == "community"
    course = {"system": terminology.MEDREQ_COURSE, "code": "continuous", "display": "Continuous long term therapy"}
    assert rx3["courseOfTherapyType"]["coding"] == [course]
    assert rx3["reasonReference"] == [ctx.condition("dx-2")]
    assert rx3["requester"] == ctx.practitioner("st-psy-1")
    dosage = rx3["dosageInstruction"][0]
    assert dosage["text"] == "Dissolve 2 films under the tongue once daily."
    assert dosage["route"]["coding"] == [{"system": terminology.SNOMED, "code": "37839007", "display": "Sublingual route"}]
    bounds = {"start": "2026-01-06", "end": "2026-07-01"}
    assert dosage["timing"]["repeat"] == {"boundsPeriod": bounds, "frequency": 1, "period": 1, "periodUnit": "d"}
    assert dosage["asNeededBoolean"] is False
    # unit "1" counts films: the human unit comes from the product's dose form
    assert dosage["doseAndRate"] == [{"doseQuantity": {"value": 2, "unit": "film", "system": UCUM, "code": "1"}}]
    assert rx3["dispenseRequest"] == {
        "numberOfRepeatsAllowed": 3,
        "quantity": {"value": 28, "unit": "film", "system": UCUM, "code": "1"},
        "expectedSupplyDuration": {"value": 14, "unit": "days", "system": UCUM, "code": "d"},
        "performer": ctx.pharmacy("ph-1"),
    }
    assert rx3["substitution"] == {"allowedBoolean": False}
    assert "priorPrescription" not in rx3 and "statusReason" not in rx3


def test_forward_as_needed_stopped_and_replacement(ctx: MappingContext, resources: list[JSON]) -> None:
    rx4 = by_local(resources, "prescription", "rx-4")
    assert rx4["status"] == "stopped" and rx4["statusReason"] == {"text": "Sedation"}
    assert rx4["dosageInstruction"][0]["asNeededCodeableConcept"] == {"text": "anxiety"}
    assert "asNeededBoolean" not in rx4["dosageInstruction"][0]
    assert rx4["extension"] == [{"url": EXT("medication-assisted-treatment"), "valueBoolean": False}]
    assert "performer" not in rx4["dispenseRequest"] and rx4["dispenseRequest"]["numberOfRepeatsAllowed"] == 0
    assert rx4["courseOfTherapyType"]["coding"][0]["code"] == "acute"
    rx1 = by_local(resources, "prescription", "rx-1")
    assert rx1["dosageInstruction"][0]["timing"]["repeat"]["timeOfDay"] == ["08:00:00"]
    assert rx1["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["unit"] == "tablet"
    rx2 = by_local(resources, "prescription", "rx-2")
    assert rx2["priorPrescription"] == ctx.prescription("rx-1") == {"reference": f"urn:uuid:{rx1['id']}"}


def test_forward_discharge_medications(ctx: MappingContext, resources: list[JSON]) -> None:
    entries = [r for r in resources if r["identifier"][0]["system"].endswith("/discharge-medication")]
    assert [e["identifier"][0]["value"] for e in entries] == [f"{ctx.record.id}/rx-{n}" for n in (2, 3, 4)]
    changed, continued, stopped = entries
    for entry in entries:
        assert entry["intent"] == "plan" and entry["authoredOn"] == "2026-02-27"
        assert entry["category"][0]["coding"][0]["code"] == "discharge"
        assert entry["id"] == ctx.ids.id("MedicationRequest", "discharge-medication", entry["identifier"][0]["value"].split("/")[1])
    assert changed["extension"] == [{"url": EXT("discharge-disposition"), "valueCode": "changed"}]
    assert changed["status"] == "active" and changed["note"] == [{"text": "Dose doubled during IOP"}]
    assert changed["priorPrescription"] == ctx.prescription("rx-2")
    # medication and dosage are copies of the prescription's
    rx2 = by_local(resources, "prescription", "rx-2")
    assert changed["dosageInstruction"] == rx2["dosageInstruction"]
    assert changed["medicationCodeableConcept"] == rx2["medicationCodeableConcept"]
    assert continued["status"] == "active" and "note" not in continued
    assert stopped["status"] == "stopped" and stopped["extension"][0]["valueCode"] == "stopped"


def test_helpers() -> None:
    assert mr.route_coding("oral") == {"system": terminology.SNOMED, "code": "26643006", "display": "Oral route"}
    assert {mr.route_coding(r)["code"] for r in mr.ROUTES} == {"26643006", "37839007", "54471007", "78421000", "34206005", "46713006", "45890007"}
    injection = Medication(rxnorm="637213", display=terminology.medication("637213")["display"])
    assert mr.unit_text("1", injection) == "injection"
    assert mr.unit_text("1") is None and mr.unit_text("mg") is None and mr.unit_text("{Capsule}") == "capsule"
    assert mr.days_supply_for({"value": 60, "unit": "{tbl}"}, {"value": 2, "unit": "{tbl}"}, {"frequency": 1, "period": 1, "period_unit": "d"}) == 30
    assert mr.days_supply_for({"value": 60, "unit": "mg"}, {"value": 2, "unit": "{tbl}"}, {"frequency": 1, "period": 1, "period_unit": "d"}) is None


# --- round trip -----------------------------------------------------------------------------


def test_round_trip_example(ctx: MappingContext, resources: list[JSON], example_record: IopRecord) -> None:
    draft, report = reverse(party_stubs(ctx) + resources)
    assert report.issues == []
    assert [Prescription.model_validate(p) for p in draft["prescriptions"]] == example_record.prescriptions
    medications = draft["discharge"]["aftercare"]["medications"]
    assert [DischargeMedication.model_validate(m) for m in medications] == example_record.discharge.aftercare.medications
    assert set(draft["discharge"]) == {"aftercare"} and set(draft["discharge"]["aftercare"]) == {"medications"}


def test_reverse_only_sets_the_medication_list(ctx: MappingContext, resources: list[JSON]) -> None:
    draft = {"discharge": {"date": "2026-02-27", "aftercare": {"id": "ac-1", "next_level_of_care": "OP"}}}
    draft, _ = reverse(party_stubs(ctx) + resources, draft)
    assert draft["discharge"]["date"] == "2026-02-27"
    assert draft["discharge"]["aftercare"]["id"] == "ac-1" and len(draft["discharge"]["aftercare"]["medications"]) == 3
    prescriptions_only = [r for r in resources if not r["identifier"][0]["system"].endswith("/discharge-medication")]
    draft, _ = reverse(party_stubs(ctx) + prescriptions_only)
    assert "discharge" not in draft


def test_reverse_checks_parties_other_families_mapped(ctx: MappingContext, resources: list[JSON]) -> None:
    """Only care-team members prescribe; unmapped pharmacies and diagnoses are dropped, not dangled."""
    draft = {"care_team": [{"id": "st-psy-1"}], "pharmacies": [], "diagnoses": [{"id": "dx-1"}]}
    draft, report = reverse(party_stubs(ctx) + resources, draft)
    rx3 = next(p for p in draft["prescriptions"] if p["id"] == "rx-3")
    assert "pharmacy_id" not in rx3 and "indication_id" not in rx3
    assert any("dispenseRequest.performer" in m for m in messages(report, "warning"))
    draft, report = reverse(party_stubs(ctx) + resources, {"care_team": [{"id": "st-ther-1"}]})
    assert draft["prescriptions"] == [] and "discharge" not in draft
    assert len([m for m in messages(report, "error") if "care-team member" in m]) == 4


ROUTES = sorted(mr.ROUTES)
MEDICATIONS = sorted(terminology.tables()["medications"].items())
TEXT = texts()
AMOUNT = st.decimals(min_value=0, max_value=9999, places=3, allow_nan=False, allow_infinity=False)
POSITIVE = st.decimals(min_value=Decimal("0.001"), max_value=999, places=3, allow_nan=False, allow_infinity=False)
DAYS = st.dates(min_value=dt.date(2025, 1, 1), max_value=dt.date(2027, 12, 31))


@st.composite
def prescriptions(draw: st.DrawFn, index: int, earlier: list[str]) -> JSON:
    """One random valid prescription (DEA refill rules and the drug table's schedule respected)."""
    code, known = draw(st.sampled_from(MEDICATIONS))
    schedule = known["dea_schedule"]
    max_refills = {"II": 0, "III": 5, "IV": 5}.get(schedule, 99)
    written = draw(DAYS)
    start = written + dt.timedelta(days=draw(st.integers(0, 30)))
    as_needed = draw(st.booleans())
    optional = {
        "end": st.integers(0, 150).map(lambda n: (start + dt.timedelta(days=n)).isoformat()),
        "as_needed_reason": TEXT if as_needed else st.nothing(),
        "pharmacy_id": st.just("ph-1"),
        "indication_id": st.sampled_from(["dx-1", "dx-2"]),
        "instructions": texts(200),
        "status_reason": TEXT,
        "replaces_id": st.sampled_from(earlier) if earlier else st.nothing(),
    }
    item = {
        "id": f"rx-g{index}",
        "medication": {"rxnorm": code, "display": known["display"]},
        "dose": {"value": draw(AMOUNT), "unit": draw(st.sampled_from(sorted(DOSE_UNITS)))},
        "route": draw(st.sampled_from(ROUTES)),
        "timing": {
            "frequency": draw(st.integers(1, 24)),
            "period": draw(POSITIVE),
            "period_unit": draw(st.sampled_from(["h", "d", "wk", "mo"])),
            "times_of_day": draw(st.lists(st.times(), max_size=8)),
        },
        "as_needed": as_needed,
        "written": written.isoformat(),
        "start": start.isoformat(),
        "quantity": {"value": draw(AMOUNT), "unit": draw(st.sampled_from(sorted(DOSE_UNITS)))},
        "days_supply": draw(st.integers(1, 365)),
        "refills": draw(st.integers(0, max_refills)),
        "substitution_allowed": draw(st.booleans()),
        "prescriber_id": draw(st.sampled_from(["st-psy-1", "st-ther-1", "st-cm-1"])),
        "mat": known["mat"],
        **({"dea_schedule": schedule} if schedule else {}),
        "status": draw(st.sampled_from(sorted(mr.STATUSES))),
        "setting": draw(st.sampled_from(sorted(mr.SETTINGS))),
        "course": draw(st.sampled_from(sorted(mr.COURSES))),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            value = draw(st.one_of(strategy, st.none()))
            if value is not None:
                item[name] = value
    return item


@st.composite
def records(draw: st.DrawFn, base: JSON) -> IopRecord:
    data = copy.deepcopy(base)
    items: list[JSON] = []
    for i in range(draw(st.integers(1, 4))):
        items.append(draw(prescriptions(i, [p["id"] for p in items])))
    data["prescriptions"] = items
    chosen = draw(st.lists(st.sampled_from(items), unique_by=lambda p: p["id"], max_size=len(items)))
    entries = []
    for p in chosen:
        entry = {"prescription_id": p["id"], "disposition": draw(st.sampled_from(sorted(mr.DISPOSITIONS)))}
        if (note := draw(st.none() | TEXT)) is not None:
            entry["note"] = note
        entries.append(entry)
    data["discharge"]["aftercare"]["medications"] = entries
    return IopRecord.model_validate(data)  # shape only: these are compared at the prescription level


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip_property(example_json: JSON, data: st.DataObject) -> None:
    record = data.draw(records(example_json))
    ctx = MappingContext(record)
    resources = mr.to_fhir(ctx)
    for res in resources:
        validate_r4b(res)
        assert_no_empty(res)
    draft, report = reverse(party_stubs(ctx) + resources)
    assert report.issues == []
    assert [Prescription.model_validate(p) for p in draft["prescriptions"]] == record.prescriptions
    back = draft.get("discharge", {}).get("aftercare", {}).get("medications", [])
    assert [DischargeMedication.model_validate(m) for m in back] == record.discharge.aftercare.medications


# --- foreign FHIR ---------------------------------------------------------------------------

OTHER = "https://ehr.example.org/fhir"


def foreign_parties() -> list[JSON]:
    return [
        {"resourceType": "Practitioner", "id": "doc-7", "identifier": [{"system": terminology.NPI, "value": "1245319599"}]},
        {"resourceType": "PractitionerRole", "id": "role-7", "practitioner": {"reference": f"{OTHER}/Practitioner/doc-7"}},
        {"resourceType": "Condition", "id": "cond-9", "code": {"coding": [{"system": terminology.ICD10CM, "code": "F11.20"}]}},
    ]


def foreign_order(**changes: Any) -> JSON:
    """A MedicationRequest as another EHR writes it: contained Medication, v3 route, BID, words for units."""
    resource = {
        "resourceType": "MedicationRequest",
        "id": "mr-100",
        "contained": [{"resourceType": "Medication", "id": "med", "code": {"coding": [
            {"system": terminology.NDC, "code": "12496-1208-3"},
            {"system": terminology.RXNORM, "code": "1010604"},
        ]}}],
        "extension": [{"url": "http://example.org/fhir/StructureDefinition/local-flag", "valueBoolean": True}],
        "status": "active",
        "intent": "order",
        "medicationReference": {"reference": "#med"},
        "subject": {"reference": "Patient/p-1"},
        "authoredOn": "2026-01-05T10:30:00-06:00",
        "requester": {"reference": "PractitionerRole/role-7"},
        "reasonCode": [{"coding": [{"system": terminology.ICD10CM, "code": "F11.20"}]}],
        "dosageInstruction": [{
            "patientInstruction": "Place one film under the tongue twice a day",
            "timing": {"code": {"coding": [{"system": terminology.V3_TIMING_ABBREVIATION, "code": "BID"}]}},
            "route": {"coding": [{"system": terminology.V3_ROUTE, "code": "SL"}]},
            "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "film"}}],
        }],
        "dispenseRequest": {"quantity": {"value": 28, "unit": "films"}},
    }
    resource.update(changes)
    return resource


def test_foreign_order_maps_with_justified_fills() -> None:
    draft, report = reverse(foreign_parties() + [foreign_order()])
    assert messages(report, "error") == []
    (p,) = draft["prescriptions"]
    assert p["id"] == "mr-100" and p["prescriber_id"] == "doc-7" and p["indication_id"] == "cond-9"
    assert p["medication"] == {"rxnorm": "1010604", "display": "buprenorphine 8 MG / naloxone 2 MG Sublingual Film"}
    assert p["dose"] == {"value": 1, "unit": "1"} and p["quantity"] == {"value": 28, "unit": "1"}
    assert p["route"] == "sublingual" and p["timing"] == {"frequency": 2, "period": 1, "period_unit": "d", "times_of_day": []}
    assert p["instructions"] == "Place one film under the tongue twice a day"
    assert p["written"] == "2026-01-05" and p["start"] == "2026-01-05"
    assert p["days_supply"] == 14 and p["refills"] == 0  # 28 films at 2 a day; no repeats stated
    assert p["dea_schedule"] == "III" and p["mat"] is True  # from the drug table
    assert "substitution_allowed" not in p  # the contract's default (allowed) applies
    Prescription.model_validate(p)
    warnings = messages(report, "warning")
    assert any("local-flag" in m for m in warnings)  # an extension we do not know
    assert any("expectedSupplyDuration" in m for m in warnings) and any("boundsPeriod.start" in m for m in warnings)
    infos = messages(report, "information")
    assert any("BID" in m for m in infos) and any("drug table" in m for m in infos) and any("'films'" in m for m in infos)


def test_foreign_plan_absolute_and_logical_references() -> None:
    order = foreign_order(
        intent="plan",
        requester={"identifier": {"system": terminology.NPI, "value": "1245319599"}},
        reasonReference=[{"reference": f"{OTHER}/Condition/cond-9/_history/2"}],
        medicationCodeableConcept={"coding": [{"system": terminology.RXNORM, "code": "312941", "display": "Sertraline 50mg tab"}]},
        category=[{"coding": [{"system": terminology.MEDREQ_CATEGORY, "code": "discharge"}]}],
        substitution={"allowedCodeableConcept": {"coding": [{"system": terminology.V3_SUBSTITUTION, "code": "N"}]}},
    )
    del order["medicationReference"]
    draft, report = reverse(foreign_parties() + [order])
    (p,) = draft["prescriptions"]
    assert p["prescriber_id"] == "doc-7" and p["indication_id"] == "cond-9"
    assert p["medication"] == {"rxnorm": "312941", "display": "Sertraline 50mg tab"}
    assert p["setting"] == "discharge" and p["substitution_allowed"] is False  # foreign discharge MR = prescription
    assert "dea_schedule" not in p and p["mat"] is False
    assert any(".intent" in m for m in messages(report, "warning"))


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"medicationReference": None, "medicationCodeableConcept": {"coding": [{"system": terminology.NDC, "code": "12496-1208-3"}]}},
         "medicationCodeableConcept"),
        ({"medicationReference": {"reference": "Medication/elsewhere"}}, "medicationReference"),
        ({"requester": {"reference": "Organization/org-1"}}, "requester"),
        ({"requester": None}, "requester"),
        ({"authoredOn": "2026-01"}, "authoredOn"),
        ({"status": "unknown"}, "status"),
        ({"dispenseRequest": None}, "dispenseRequest.quantity"),
        ({"dosageInstruction": []}, "doseQuantity"),
        ({"dosageInstruction": [{"doseAndRate": [{"doseRange": {"low": {"value": 1, "unit": "film"}, "high": {"value": 2, "unit": "film"}}}],
                                 "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}}]}, "doseRange"),
        ({"dosageInstruction": [{"doseAndRate": [{"doseQuantity": {"value": 1, "unit": "puff"}}],
                                 "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}}]}, "doseQuantity"),
        ({"dosageInstruction": [{"doseAndRate": [{"doseQuantity": {"value": 1, "unit": "film"}}],
                                 "timing": {"repeat": {"frequency": 1, "period": 30, "periodUnit": "min"}}}]}, "repeat"),
        ({"identifier": [{"system": "urn:x", "value": "a"}], "id": None}, "identifier"),
    ],
)
def test_foreign_order_missing_required_parts_is_left_out(changes: JSON, where: str) -> None:
    order = {k: v for k, v in {**foreign_order(), **changes}.items() if v is not None}
    draft, report = reverse(foreign_parties() + [order])
    assert draft["prescriptions"] == []
    assert any(where in m for m in messages(report, "error")), report.issues


def test_foreign_unknown_product_route_and_schedule() -> None:
    unknown = {"coding": [{"system": terminology.RXNORM, "code": "999999"}], "text": "Some new drug 5 MG Oral Tablet"}
    order = foreign_order(medicationReference=None, medicationCodeableConcept=unknown)
    order = {k: v for k, v in order.items() if v is not None}
    order["dosageInstruction"][0]["route"] = {"text": "Oral"}
    draft, report = reverse(foreign_parties() + [order])
    (p,) = draft["prescriptions"]
    assert p["route"] == "oral" and p["medication"]["display"] == "Some new drug 5 MG Oral Tablet"
    assert "dea_schedule" not in p and p["mat"] is False
    assert any("not in the drug table" in m for m in messages(report, "warning"))
    del order["dosageInstruction"][0]["route"]
    draft, report = reverse(foreign_parties() + [order])
    assert draft["prescriptions"] == [] and any(".route" in m for m in messages(report, "error"))


def test_foreign_leave_outs_and_not_carried() -> None:
    never = foreign_order(id="mr-never", doNotPerform=True)
    modified = foreign_order(id="mr-mod", modifierExtension=[{"url": "http://x.org/negate", "valueBoolean": True}])
    extra = foreign_order(id="mr-extra", note=[{"text": "n"}], priority="urgent")
    extra["dosageInstruction"] = extra["dosageInstruction"] * 2
    draft, report = reverse(foreign_parties() + [never, modified, extra])
    assert [p["id"] for p in draft["prescriptions"]] == ["mr-extra"]
    warnings = messages(report, "warning")
    for where in ("mr-never.doNotPerform", "mr-mod.modifierExtension", "mr-extra.note", "mr-extra.priority", "mr-extra.dosageInstruction"):
        assert any(where in m for m in warnings), where


def test_duplicates_and_dangling_prior(ctx: MappingContext, resources: list[JSON]) -> None:
    rx1 = by_local(resources, "prescription", "rx-1")
    again = {**rx1, "id": "other-copy"}
    without_rx1 = [r for r in resources if r is not rx1]
    draft, report = reverse(party_stubs(ctx) + resources + [again])
    assert [p["id"] for p in draft["prescriptions"]] == ["rx-1", "rx-2", "rx-3", "rx-4"]
    assert any("other-copy" in m for m in messages(report, "warning"))
    # rx-2 replaces rx-1; with rx-1 unreadable the link is dropped rather than left dangling
    broken = {**rx1, "dosageInstruction": "garbage"}
    draft, report = reverse(party_stubs(ctx) + without_rx1 + [broken])
    rx2 = next(p for p in draft["prescriptions"] if p["id"] == "rx-2")
    assert "replaces_id" not in rx2 and any("priorPrescription" in m for m in messages(report, "warning"))


def test_discharge_entries_foreign_and_broken(ctx: MappingContext, resources: list[JSON]) -> None:
    entries = [r for r in resources if r["identifier"][0]["system"].endswith("/discharge-medication")]
    prescriptions = [r for r in resources if r not in entries]
    no_extension = {k: v for k, v in entries[2].items() if k != "extension"}
    stored = {**entries[1], "priorPrescription": {"reference": "MedicationRequest/not-here"}}
    orphan = {**entries[0], "identifier": [ctx.ids.identifier("discharge-medication", "rx-9")], "priorPrescription": {"reference": "x"}}
    draft, report = reverse(party_stubs(ctx) + prescriptions + [no_extension, stored, orphan])
    assert draft["discharge"]["aftercare"]["medications"] == [
        {"prescription_id": "rx-4", "disposition": "stopped", "note": "Stopped for sedation"},
        {"prescription_id": "rx-3", "disposition": "continue"},
    ]
    assert any("'stopped' read from status" in m for m in messages(report, "warning"))
    assert any("rx-9" in m for m in messages(report, "error"))


GARBAGE: list[Any] = [None, 7, "text", [], {}, [1, "a"], {"x": []}, True]


@pytest.mark.parametrize("junk", GARBAGE)
@pytest.mark.parametrize(
    "element",
    ["identifier", "extension", "medicationCodeableConcept", "medicationReference", "requester", "dosageInstruction",
     "dispenseRequest", "substitution", "category", "courseOfTherapyType", "reasonReference", "priorPrescription",
     "statusReason", "note", "authoredOn", "contained"],
)
def test_garbage_never_crashes(ctx: MappingContext, resources: list[JSON], element: str, junk: Any) -> None:
    rx3 = copy.deepcopy(by_local(resources, "prescription", "rx-3"))
    rx3[element] = junk
    entry = copy.deepcopy(by_local(resources, "discharge-medication", "rx-3"))
    entry[element] = junk
    try:
        index_input = party_stubs(ctx) + [rx3, entry]
        ResourceIndex.build(index_input)
    except (AttributeError, TypeError):
        pytest.skip("ResourceIndex itself cannot hold this shape")
    draft, report = reverse(index_input)
    assert isinstance(draft["prescriptions"], list)
    if not draft["prescriptions"]:
        assert report.errors or any(i.severity == "warning" for i in report.issues)


@pytest.mark.parametrize(
    "dosage",
    [
        {"timing": {"repeat": "daily"}, "doseAndRate": "one"},
        {"timing": {"repeat": {"frequency": "2", "period": [], "periodUnit": 5, "timeOfDay": "08:00"}}},
        {"doseAndRate": [{"doseQuantity": {"value": "NaN", "unit": "mg"}}], "route": [], "asNeededCodeableConcept": "yes"},
        {"doseAndRate": [{"doseQuantity": {"value": -1, "code": 5, "system": UCUM}}], "timing": {"code": "BID"}},
    ],
)
def test_garbage_dosage(dosage: JSON) -> None:
    draft, report = reverse(foreign_parties() + [foreign_order(dosageInstruction=[dosage])])
    assert draft["prescriptions"] == [] and report.errors
