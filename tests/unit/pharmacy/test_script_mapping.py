"""FHIR <-> SCRIPT: NewRx and CancelRx from stored orders, RxFill and history into FHIR, review Tasks
and the prescriber's answers. MedicationRequest -> NewRx -> XML -> parse -> MedicationRequest keeps
every field NewRx carries, for generated records of any seed."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iop_fhir.formats import ncpdp
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.formats.ncpdp import NcpdpInvalid
from iop_fhir.formats.ncpdp import messages as m
from iop_fhir.generate import generate_record
from iop_fhir.mappers.bundle import record_to_resources
from iop_fhir.mappers.datatypes import code_in, concept_text, identifier_values
from iop_fhir.pharmacy import controlled, script_mapping
from iop_fhir.pharmacy.script_mapping import FILL_SYSTEM, sig_text
from iop_fhir.record import validate_record
from iop_fhir.terminology import DEA, ICD10CM, NCPDP_PROVIDER, NDC, NPI, RXNORM, extension_url

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = ROOT / "fixtures" / "ncpdp"
SENT = dt.datetime(2026, 1, 6, 9, 30, tzinfo=dt.timezone.utc)
PATIENT_REF = "Patient/10bc811d"
REQUEST_REF = "MedicationRequest/951f5fc2"


class World:
    """A record's resources, looked up by reference as the store would."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.resources = record_to_resources(validate_record(record))
        self.by_reference = {f"urn:uuid:{r['id']}": r for r in self.resources}

    def resolve(self, reference: str) -> dict[str, Any] | None:
        return self.by_reference.get(reference)

    def order(self, value: str) -> dict[str, Any]:
        return next(r for r in self.resources if r["resourceType"] == "MedicationRequest" and r["identifier"][0]["value"] == value)

    def pharmacy_of(self, request: dict[str, Any]) -> str:
        return identifier_values(self.resolve(request["dispenseRequest"]["performer"]["reference"]), NCPDP_PROVIDER)[0]

    def with_changed(self, reference: str, change: Any) -> Any:
        """A resolver where the resource behind ``reference`` was changed by ``change``."""
        changed = copy.deepcopy(self.resolve(reference))
        change(changed)
        return lambda ref: changed if ref == reference else self.resolve(ref)

    def new_rx(self, request: dict[str, Any], resolve: Any = None, **more: Any) -> ncpdp.Message:
        return script_mapping.new_rx(request, resolve or self.resolve, message_id="m-1", sent=SENT, to_ncpdp_id=more.pop("to", self.pharmacy_of(request)), **more)


@pytest.fixture
def world(example_json: dict) -> World:
    return World(example_json)


def golden(name: str) -> ncpdp.Message:
    return ncpdp.parse((GOLDEN / f"{name}.xml").read_bytes())


def problems(call: Any) -> dict[str, str]:
    with pytest.raises(NcpdpInvalid) as info:
        call()
    return {issue.location: issue.message for issue in info.value.issues}


def valid(resource: dict[str, Any]) -> dict[str, Any]:
    assert validate_resource(resource) == [], resource
    return resource


# --- NewRx ------------------------------------------------------------------------------------------


def test_new_rx_of_a_controlled_order_names_the_dea_number(world: World) -> None:
    message = world.new_rx(world.order("ep-2026-0042/rx-3"))
    assert message.header.prescriber_order_number == "ep-2026-0042/rx-3"
    assert message.header.to == ncpdp.RoutingId(value="1234567", qualifier="P")
    assert message.header.from_ == ncpdp.RoutingId(value="1245319599", qualifier="D")
    body = message.body
    assert body.prescriber.dea_number == "BO1234563" and body.prescriber.npi == "1245319599"
    medication = body.medication
    assert medication.dea_schedule == "C48676" and medication.drug_db_code == ncpdp.Code(code="1010604", qualifier="SCD")
    assert medication.quantity == ncpdp.Quantity(value=Decimal(28), unit_code="C64933")
    assert (medication.days_supply, medication.number_of_refills, medication.substitutions) == (14, 3, "1")
    assert medication.diagnoses == (ncpdp.Diagnosis(code="F1120", description="Opioid dependence, uncomplicated"),)
    assert ncpdp.parse(ncpdp.build(message)) == message


def test_new_rx_of_an_uncontrolled_order_keeps_the_dea_number_back(world: World) -> None:
    message = world.new_rx(world.order("ep-2026-0042/rx-2"))
    assert message.body.prescriber.dea_number is None and message.body.medication.dea_schedule is None
    assert message.body.medication.strength == ncpdp.Strength(value=Decimal(50), form_code="C42998", unit_code="C28253")
    assert message.body.medication.sig_text == "Take 2 tablets by mouth every morning."
    assert message.body.pharmacy.business_name == "Main Street Pharmacy"


def test_a_new_rx_is_refused_with_every_reason(world: World) -> None:
    request = copy.deepcopy(world.order("ep-2026-0042/rx-3"))
    request["status"] = "stopped"
    request["dispenseRequest"]["quantity"]["code"] = "{spray}"
    request["reasonReference"].append({"reference": "urn:uuid:nowhere"})
    request.pop("identifier")
    found = problems(lambda: world.new_rx(request))
    assert set(found) == {
        "MedicationRequest.status",
        "MedicationRequest.dispenseRequest.quantity.code",
        "MedicationRequest.reasonReference[1]",
        "MedicationRequest.identifier",
    }
    assert "never sent as free text" in found["MedicationRequest.dispenseRequest.quantity.code"]


def test_the_prescriber_needs_a_valid_npi_and_a_dea_number_for_controlled_orders(world: World) -> None:
    request = world.order("ep-2026-0042/rx-3")
    prescriber = request["requester"]["reference"]
    no_dea = world.with_changed(prescriber, lambda p: p.__setitem__("identifier", [i for i in p["identifier"] if i["system"] != DEA]))
    assert "DEA registration number" in problems(lambda: world.new_rx(request, no_dea))["Practitioner.identifier"]
    bad_npi = world.with_changed(prescriber, lambda p: [i.__setitem__("value", "1245319598") for i in p["identifier"] if i["system"] == NPI])
    assert "check digit" in problems(lambda: world.new_rx(request, bad_npi))["Practitioner.identifier"]
    uncontrolled = world.order("ep-2026-0042/rx-2")
    assert world.new_rx(uncontrolled, no_dea).body.prescriber.dea_number is None


def test_the_patient_needs_name_gender_and_birth_date(world: World) -> None:
    request = world.order("ep-2026-0042/rx-2")

    def strip(patient: dict) -> None:
        for element in ("name", "gender", "birthDate"):
            patient.pop(element)

    found = problems(lambda: world.new_rx(request, world.with_changed(request["subject"]["reference"], strip)))
    assert set(found) == {"Patient.name", "Patient.gender", "Patient.birthDate"}


def test_the_pharmacy_must_be_the_addressee(world: World) -> None:
    found = problems(lambda: world.new_rx(world.order("ep-2026-0042/rx-2"), to="7654321"))
    assert "7654321" in found["MedicationRequest.dispenseRequest.performer"]


def test_controlled_substance_rules_refuse_the_send(world: World) -> None:
    request = copy.deepcopy(world.order("ep-2026-0042/rx-3"))
    request["dispenseRequest"]["numberOfRepeatsAllowed"] = 6
    found = problems(lambda: world.new_rx(request))
    assert "at most 5 refills" in found["MedicationRequest.dispenseRequest.numberOfRepeatsAllowed"]


def test_methadone_for_oud_is_refused_for_a_retail_pharmacy(world: World) -> None:
    request = copy.deepcopy(world.order("ep-2026-0042/rx-3"))
    request["medicationCodeableConcept"] = {"coding": [{"system": RXNORM, "code": "864706", "display": "methadone hydrochloride 10 MG Oral Tablet"}]}
    request["dispenseRequest"]["numberOfRepeatsAllowed"] = 0
    found = problems(lambda: world.new_rx(request))
    assert "opioid treatment program" in found["MedicationRequest.dispenseRequest.performer"]


def test_codes_references_and_composed_sig(world: World) -> None:
    request = copy.deepcopy(world.order("ep-2026-0042/rx-2"))
    request["contained"] = [{"resourceType": "Medication", "id": "med", "code": {"coding": [
        {"system": RXNORM, "code": "312941", "display": "sertraline 50 MG Oral Tablet"},
        {"system": NDC, "code": "0093-7198-56"},
    ]}}]
    request.pop("medicationCodeableConcept")
    request["medicationReference"] = {"reference": "#med"}
    request["dosageInstruction"][0].pop("text")
    medication = world.new_rx(request).body.medication
    assert medication.product_code == ncpdp.Code(code="00093719856", qualifier="ND")
    assert medication.description == "sertraline 50 MG Oral Tablet"
    assert medication.sig_text == "Take 2 tablets by oral route once a day."
    request["dispenseRequest"]["quantity"] = {"value": 60, "unit": "Tablets"}  # a unit word, no UCUM code
    assert world.new_rx(request).body.medication.quantity == ncpdp.Quantity(value=Decimal(60), unit_code="C48542")
    request["contained"][0]["code"]["coding"][1]["code"] = "123-45"
    assert "NDC" in problems(lambda: world.new_rx(request))["MedicationRequest.medicationCodeableConcept.coding"]


def test_a_practitioner_role_requester_is_followed(world: World) -> None:
    request = copy.deepcopy(world.order("ep-2026-0042/rx-2"))
    role = next(r for r in world.resources if r["resourceType"] == "PractitionerRole" and r["practitioner"] == request["requester"])
    request["requester"] = {"reference": f"urn:uuid:{role['id']}"}
    assert world.new_rx(request).body.prescriber.npi == "1245319599"


def test_sig_is_composed_from_the_structured_dose() -> None:
    order = {"dosageInstruction": [{
        "timing": {"repeat": {"frequency": 3, "period": 1, "periodUnit": "d"}},
        "asNeededCodeableConcept": {"text": "anxiety"},
        "route": {"coding": [{"display": "Oral route"}]},
        "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet", "code": "{tbl}"}}],
    }]}
    assert sig_text(order) == "Take 1 tablet by oral route 3 times a day as needed for anxiety."
    order["dosageInstruction"][0]["timing"]["repeat"].update(frequency=2, period=12, periodUnit="h")
    order["dosageInstruction"][0].pop("asNeededCodeableConcept")
    assert sig_text(order) == "Take 1 tablet by oral route twice every 12 hours."
    assert sig_text({"dosageInstruction": [{"timing": {}}]}) is None


def carried(request: dict[str, Any], resolve: Any) -> dict[str, Any]:
    """The fields NewRx carries, read the same way from our order and from one read back."""

    def follow(reference: dict[str, Any] | None, system: str) -> str | None:
        target = resolve((reference or {}).get("reference", ""))
        if target is not None:
            return identifier_values(target, system)[0]
        return ((reference or {}).get("identifier") or {}).get("value")

    dispense = request["dispenseRequest"]
    reasons = [resolve(r["reference"]).get("code") for r in request.get("reasonReference", [])] + request.get("reasonCode", [])
    return {
        "order": request["identifier"][0]["value"],
        "rxnorm": code_in(request["medicationCodeableConcept"], RXNORM),
        "drug": concept_text(request["medicationCodeableConcept"]),
        "quantity": (Decimal(str(dispense["quantity"]["value"])), dispense["quantity"]["code"]),
        "days": dispense["expectedSupplyDuration"]["value"],
        "refills": dispense.get("numberOfRepeatsAllowed", 0),
        "substitution": request.get("substitution", {}).get("allowedBoolean", True),
        "written": request["authoredOn"][:10],
        "sig": sig_text(request),
        "diagnoses": [code_in(r, ICD10CM) for r in reasons if code_in(r, ICD10CM)][:2],
        "prescriber": follow(request.get("requester"), NPI),
        "pharmacy": follow(dispense.get("performer"), NCPDP_PROVIDER),
    }


def schedule(request: dict[str, Any]) -> str | None:
    return next((e["valueCode"] for e in request.get("extension", []) if e["url"] == extension_url("dea-schedule")), None)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.integers(0, 2**16))
def test_medication_request_to_new_rx_and_back_keeps_what_new_rx_carries(index: int, seed: int) -> None:
    world = World(generate_record(index, seed))
    active = [r for r in world.resources if r["resourceType"] == "MedicationRequest" and r["intent"] == "order" and r["status"] == "active"]
    for request in active:
        message = world.new_rx(request)
        back = script_mapping.medication_request_from_new_rx(ncpdp.parse(ncpdp.build(message)))
        assert carried(back, lambda _reference: None) == carried(request, world.resolve)
        assert schedule(back) == controlled.dea_schedule(request)
        valid(back)


# --- CancelRx ---------------------------------------------------------------------------------------


def test_cancel_rx_of_a_stopped_order(world: World) -> None:
    request = world.order("ep-2026-0042/rx-1")
    message = script_mapping.cancel_rx(
        request, world.resolve, message_id="c-1", sent=SENT, to_ncpdp_id="1234567", relates_to="m-0", rx_reference_number="RX-1"
    )
    assert message.kind == "CancelRx" and message.header.prescriber_order_number == "ep-2026-0042/rx-1"
    assert (message.header.relates_to_message_id, message.header.rx_reference_number) == ("m-0", "RX-1")
    assert message.body.medication.note == "Dose increased for partial response"
    assert ncpdp.parse(ncpdp.build(message)) == message


def test_cancel_rx_is_for_inactive_orders_and_cuts_long_reasons(world: World) -> None:
    active = world.order("ep-2026-0042/rx-2")
    found = problems(lambda: script_mapping.cancel_rx(active, world.resolve, message_id="c", sent=SENT, to_ncpdp_id="1234567"))
    assert set(found) == {"MedicationRequest.status"}
    stopped = copy.deepcopy(world.order("ep-2026-0042/rx-1"))
    stopped["statusReason"] = {"text": "x" * 400}
    note = script_mapping.cancel_rx(stopped, world.resolve, message_id="c", sent=SENT, to_ncpdp_id="1234567").body.medication.note
    assert len(note) == ncpdp.messages.NOTE_MAX and note.endswith("…")


# --- RxFill -> MedicationDispense -----------------------------------------------------------------------


def test_a_dispensed_fill_is_a_completed_dispense() -> None:
    dispense = valid(script_mapping.medication_dispense(golden("rxfill-dispensed"), REQUEST_REF, PATIENT_REF))
    assert dispense["status"] == "completed"
    assert dispense["identifier"] == [{"system": FILL_SYSTEM, "value": "1434567/RX-0884213/date-2026-01-06"}]
    assert dispense["quantity"] == {"value": 14, "unit": "tablet", "system": "http://unitsofmeasure.org", "code": "{tbl}"}
    assert dispense["daysSupply"]["value"] == 7 and dispense["whenHandedOver"] == "2026-01-06"
    assert dispense["authorizingPrescription"] == [{"reference": REQUEST_REF}] and dispense["subject"] == {"reference": PATIENT_REF}
    assert dispense["performer"][0]["actor"]["identifier"] == {"system": NCPDP_PROVIDER, "value": "1434567"}
    assert code_in(dispense["medicationCodeableConcept"], RXNORM) == "351267" and code_in(dispense["medicationCodeableConcept"], NDC) == "00000000000"
    assert dispense["note"] == [{"text": "Picked up by patient"}]


def test_a_redelivered_fill_and_a_later_status_of_it_keep_one_identity() -> None:
    first = script_mapping.medication_dispense(golden("rxfill-dispensed"), REQUEST_REF, PATIENT_REF)
    again = script_mapping.medication_dispense(golden("rxfill-dispensed"), REQUEST_REF, PATIENT_REF)
    assert first == again
    partial = valid(script_mapping.medication_dispense(golden("rxfill-partially-dispensed"), REQUEST_REF, PATIENT_REF))
    assert partial["status"] == "in-progress" and partial["quantity"]["value"] == 6 and partial["whenHandedOver"] == "2026-01-06"
    assert (partial["id"], partial["identifier"]) == (first["id"], first["identifier"])  # the same fill, progressed


@pytest.mark.parametrize(("name", "status", "words"), [("rxfill-not-dispensed", "declined", "returned to stock"), ("rxfill-transferred", "stopped", "Transferred")])
def test_fills_that_dispensed_nothing(name: str, status: str, words: str) -> None:
    message = golden(name)
    dispense = valid(script_mapping.medication_dispense(message, None, PATIENT_REF))
    assert dispense["status"] == status and words in dispense["statusReasonCodeableConcept"]["text"]
    assert not {"quantity", "daysSupply", "whenHandedOver", "authorizingPrescription"} & set(dispense)
    assert dispense["identifier"][0]["value"] == f"1434567/RX-0884213/message-{message.header.message_id}"
    assert concept_text(dispense["medicationCodeableConcept"]) == "buprenorphine 8 MG / naloxone 2 MG Sublingual Tablet"


def test_a_fill_needs_a_medication_and_a_pharmacy() -> None:
    message = golden("rxfill-not-dispensed")
    bare = dataclasses.replace(message, header=dataclasses.replace(message.header, from_=None), body=dataclasses.replace(message.body, pharmacy=None, prescribed=None))
    assert set(problems(lambda: script_mapping.medication_dispense(bare, None, PATIENT_REF))) == {"/Message/Body/RxFill", "/Message/Body/RxFill/Pharmacy"}
    # A pharmacy that names itself only in the header still counts.
    headed = dataclasses.replace(message, body=dataclasses.replace(message.body, pharmacy=None))
    assert script_mapping.medication_dispense(headed, None, PATIENT_REF)["performer"][0]["actor"]["identifier"]["value"] == "1434567"
    assert "/Message/Body" in problems(lambda: script_mapping.medication_dispense(golden("status"), None, PATIENT_REF))


# --- RxHistoryResponse -------------------------------------------------------------------------------


def test_history_becomes_dispenses_and_statements_once_per_fill() -> None:
    resources = [valid(r) for r in script_mapping.history_resources(golden("rxhistory-response"), PATIENT_REF)]
    assert [r["resourceType"] for r in resources] == ["MedicationDispense", "MedicationStatement"]
    dispense, statement = resources
    # the PBM's copy of this fill is dropped; the fill number stands beside the key by date
    assert [i["value"] for i in dispense["identifier"]] == ["1434567/RX-0771902/date-2025-12-03", "1434567/RX-0771902/fill-1"]
    assert dispense["whenHandedOver"] == "2025-12-03" and dispense["status"] == "completed"
    prescription = dispense["contained"][0]
    assert prescription["requester"]["identifier"] == {"system": NPI, "value": "1679576722"} and prescription["authoredOn"] == "2025-12-02"
    assert dispense["authorizingPrescription"] == [{"reference": "#prescription"}]
    assert statement["status"] == "unknown" and statement["effectiveDateTime"] == "2025-11-20"
    assert statement["identifier"][0]["value"] == "source-MEDHX/RX-0779115/written-2025-11-20"
    assert statement["dateAsserted"] == "2026-01-06T15:14:10.250000Z"


def test_history_identity_does_not_depend_on_order_or_source() -> None:
    message = golden("rxhistory-response")
    reversed_message = dataclasses.replace(message, body=dataclasses.replace(message.body, dispensed=message.body.dispensed[::-1]))

    def ids(history: ncpdp.Message) -> list[str]:
        return sorted(r["identifier"][0]["value"] for r in script_mapping.history_resources(history, PATIENT_REF))

    assert ids(message) == ids(reversed_message)


def history_of(fill: ncpdp.Message, fill_number: int) -> ncpdp.Message:
    """An RxHistoryResponse from the same pharmacy reporting the fill an RxFill reported."""
    dispensed = dataclasses.replace(
        fill.body.dispensed,
        history_source=m.HistorySource(source_reference=fill.header.rx_reference_number, fill_number=fill_number),
        pharmacy=fill.body.pharmacy,
    )
    header = dataclasses.replace(fill.header, message_id="hist-1", rx_reference_number=None, prescriber_order_number=None)
    return ncpdp.Message(header=header, body=m.RxHistoryResponse(patient=fill.body.patient, dispensed=(dispensed,)))


def test_an_rx_fill_and_a_history_entry_of_one_fill_have_one_key() -> None:
    fill = golden("rxfill-dispensed")
    from_fill = script_mapping.medication_dispense(fill, REQUEST_REF, PATIENT_REF)
    (from_history,) = script_mapping.history_resources(history_of(fill, 3), PATIENT_REF)
    assert from_history["id"] == from_fill["id"] and from_history["identifier"][0] == from_fill["identifier"][0]
    assert from_history["identifier"][1] == {"system": FILL_SYSTEM, "value": "1434567/RX-0884213/fill-3"}
    # another day is another fill, whatever the history's fill number
    later = dataclasses.replace(fill, body=dataclasses.replace(fill.body, dispensed=dataclasses.replace(fill.body.dispensed, last_fill_date=dt.date(2026, 2, 3))))
    assert script_mapping.medication_dispense(later, REQUEST_REF, PATIENT_REF)["id"] != from_fill["id"]


def test_a_history_entry_never_replaces_the_fills_link_to_our_order() -> None:
    fill = golden("rxfill-dispensed")
    from_fill = script_mapping.medication_dispense(fill, REQUEST_REF, PATIENT_REF)
    (from_history,) = script_mapping.history_resources(history_of(fill, 3), PATIENT_REF)
    assert script_mapping.merge_fill(None, from_history) == from_history  # the first report stands
    kept = script_mapping.merge_fill(from_fill, from_history)
    assert kept["authorizingPrescription"] == [{"reference": REQUEST_REF}] and "contained" not in kept
    assert kept == {**from_fill, "identifier": from_history["identifier"]}  # only the fill number is added
    # the other way round, the RxFill replaces the history's copy and keeps its fill number
    replaced = script_mapping.merge_fill(from_history, from_fill)
    assert replaced["authorizingPrescription"] == [{"reference": REQUEST_REF}] and replaced["note"] == from_fill["note"]
    assert replaced["identifier"] == from_history["identifier"] and replaced["id"] == from_history["id"]
    # a newer report of the same standing wins, under the id already kept
    stored = {**from_fill, "id": "kept-before", "status": "in-progress"}
    assert script_mapping.merge_fill(stored, from_fill) == {**from_fill, "id": "kept-before"}


# --- renewal and change requests ----------------------------------------------------------------------


def test_a_renewal_request_is_a_review_task() -> None:
    task = valid(script_mapping.review_task(golden("rxrenewal-request"), REQUEST_REF, PATIENT_REF))
    assert task["identifier"] == [{"system": script_mapping.MESSAGE_SYSTEM, "value": "1434567/ph-renew-0001"}]
    assert (task["status"], task["intent"], task["focus"], task["for"]) == ("requested", "proposal", {"reference": REQUEST_REF}, {"reference": PATIENT_REF})
    assert task["code"]["coding"][0]["code"] == "182836005"
    assert task["owner"]["identifier"]["value"] == "1245319599" and task["requester"]["identifier"]["value"] == "1434567"
    inputs = {part["type"]["coding"][0]["code"]: part for part in task["input"]}
    assert inputs["message-kind"]["valueCode"] == "RxRenewalRequest" and inputs["requested-refills"]["valueUnsignedInt"] == 2
    assert inputs["rx-reference-number"]["valueString"] == "RX-0884213"


def test_a_change_request_is_a_review_task_with_its_alternatives() -> None:
    task = valid(script_mapping.review_task(golden("rxchange-request"), None, PATIENT_REF))
    assert "Generic substitution" in task["businessStatus"]["text"]
    parts = [(p["type"]["coding"][0]["code"], p.get("valueCode") or concept_text(p.get("valueCodeableConcept"))) for p in task["input"]]
    assert ("change-code", "G") in parts and ("requested-medication", "sertraline 50 MG Oral Tablet") in parts
    assert "focus" not in task
    assert "/Message/Body" in problems(lambda: script_mapping.review_task(golden("rxfill-dispensed"), None, PATIENT_REF))


def test_renewal_responses() -> None:
    request = golden("rxrenewal-request")
    approved = script_mapping.renewal_response(request, decision="Approved", message_id="r-1", sent=SENT, refills=3, note="OK for 3 more")
    assert approved.header.relates_to_message_id == "ph-renew-0001" and approved.header.to == request.header.from_
    prescribed = approved.body.prescribed
    assert (prescribed.number_of_refills, prescribed.written_date, prescribed.last_fill_date) == (3, SENT.date(), None)
    assert ncpdp.parse(ncpdp.build(approved)) == approved
    denied = script_mapping.renewal_response(request, decision="Denied", message_id="r-2", sent=SENT, denial_reason="Patient discharged", reason_codes=("AA",))
    assert denied.body.response == ncpdp.Response(outcome="Denied", denial_reason="Patient discharged", reason_codes=("AA",))
    assert ncpdp.parse(ncpdp.build(denied)) == denied
    assert set(problems(lambda: script_mapping.renewal_response(request, decision="ApprovedWithChanges", message_id="r", sent=SENT))) == {"medication"}
    assert set(problems(lambda: script_mapping.renewal_response(request, decision="Validated", message_id="r", sent=SENT))) == {"decision"}


def test_change_responses() -> None:
    request = golden("rxchange-request")
    approved = script_mapping.change_response(request, decision="Approved", message_id="c-1", sent=SENT)
    assert approved.body.prescribed.description == "sertraline 50 MG Oral Tablet"  # the generic the pharmacy proposed
    assert ncpdp.parse(ncpdp.build(approved)) == approved
    validated = script_mapping.change_response(request, decision="Validated", message_id="c-2", sent=SENT)
    assert validated.body.prescribed.description.endswith("[Zoloft]")
    assert ncpdp.parse(ncpdp.build(validated)) == validated


def test_approving_a_sample_without_coded_units_is_refused_when_built(shared_dir: Path) -> None:
    """The shared sample's order has no quantity unit: a renewal of it cannot go out as is."""
    request = ncpdp.parse((shared_dir / "samples" / "ncpdp" / "rxrenewal-request.xml").read_bytes())
    assert script_mapping.review_task(request, None, PATIENT_REF)["identifier"][0]["value"] == "SurescriptsTestPharmacy/SYNTH-MSG-0201"
    approved = script_mapping.renewal_response(request, decision="Approved", message_id="r", sent=SENT)
    with pytest.raises(NcpdpInvalid) as info:
        ncpdp.build(approved)
    assert "/Message/Body/RxRenewalResponse/MedicationPrescribed/Quantity/QuantityUnitOfMeasure/Code" in {i.location for i in info.value.issues}
    denied = script_mapping.renewal_response(request, decision="Denied", message_id="r", sent=SENT, denial_reason="unknown patient")
    assert ncpdp.parse(ncpdp.build(denied)).body.response.outcome == "Denied"


# --- RxHistoryRequest --------------------------------------------------------------------------------


def test_history_request_from_patient_and_prescriber(world: World) -> None:
    patient = next(r for r in world.resources if r["resourceType"] == "Patient")
    prescriber = world.resolve(world.order("ep-2026-0042/rx-3")["requester"]["reference"])
    to = ncpdp.RoutingId(value="MEDHX", qualifier="ZZZ")
    message = script_mapping.history_request(patient, prescriber, message_id="h-1", sent=SENT, to=to, start=dt.date(2025, 1, 1), end=dt.date(2026, 1, 1), consent="Y")
    assert message.body.patient.birth_date == dt.date(1988, 3, 14) and message.body.prescriber.dea_number is None
    assert ncpdp.parse(ncpdp.build(message)) == message
    nameless = {**patient, "name": []}
    found = problems(lambda: script_mapping.history_request(nameless, prescriber, message_id="h", sent=SENT, to=to, start=dt.date(2025, 1, 1)))
    assert set(found) == {"Patient.name", "RequestedDates"}


def test_medication_request_from_the_golden_new_rx_is_valid_fhir() -> None:
    request = valid(script_mapping.medication_request_from_new_rx(golden("newrx")))
    assert request["reasonCode"][0]["coding"][0] == {"system": ICD10CM, "code": "F11.20", "display": "Opioid dependence, uncomplicated"}
    assert schedule(request) == "III" and request["substitution"] == {"allowedBoolean": True}
    assert json.dumps(request)  # plain JSON, no Decimals
