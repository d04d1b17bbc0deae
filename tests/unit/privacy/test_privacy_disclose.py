"""Redaction of mentions, and a whole disclosure: what goes out, how it is labelled, what is counted."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from privacy_helpers import act, of_type, resources_of, security, stored

from iop_fhir import terminology
from iop_fhir.privacy import NOTICE, Decision, Recipient, disclose, is_part2, read_terms, redact
from iop_fhir.privacy.labels import labels_of
from iop_fhir.privacy.redact import WITHHELD_TEXT, mentions

AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
REDACTED = (terminology.V3_OBSERVATION_VALUE, "REDACTED")


def _kind(resource: dict) -> str:
    return resource["identifier"][0]["system"].rsplit("/", 1)[-1] if resource.get("identifier") else resource["resourceType"]


def _aftercare(resources: list[dict]) -> dict:
    return next(r for r in resources if r["resourceType"] == "CarePlan" and _kind(r) == "aftercare-plan")


# --- redact -------------------------------------------------------------------------------------


PLAN = {
    "resourceType": "CarePlan",
    "id": "ac",
    "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">methadone 100 mg daily</div>'},
    "status": "active",
    "intent": "plan",
    "description": "Keep naloxone at home.",
    "subject": {"reference": "Patient/p1"},
    "activity": [
        {"id": "follow-up", "detail": {"status": "scheduled", "description": "Outpatient visit"}},
        {"reference": {"reference": "MedicationRequest/methadone", "display": "methadone"}},
        {"reference": {"reference": "MedicationRequest/sertraline"}},
        {"id": "a4", "outcomeReference": [{"reference": "Encounter/1"}, {"reference": "Encounter/2"}], "detail": {"status": "completed"}},
    ],
}


def test_mentions_are_located():
    assert [(m.location, m.reference) for m in mentions(PLAN)] == [
        ("CarePlan.activity[1].reference", "MedicationRequest/methadone"),
        ("CarePlan.activity[2].reference", "MedicationRequest/sertraline"),
        ("CarePlan.activity[3].outcomeReference[0]", "Encounter/1"),
        ("CarePlan.activity[3].outcomeReference[1]", "Encounter/2"),
    ]


def test_redact_removes_the_mentions_their_emptied_elements_and_the_free_text():
    before = json.dumps(PLAN, sort_keys=True)
    out = redact(PLAN, {"CarePlan.activity[1].reference", "CarePlan.activity[3].outcomeReference[0]"})
    assert json.dumps(PLAN, sort_keys=True) == before  # the input is left alone
    assert "methadone" not in json.dumps({k: v for k, v in out.items() if k != "meta"})
    assert out["activity"] == [
        {"id": "follow-up", "detail": {"status": "scheduled"}},  # free text gone, the activity stays
        {"reference": {"reference": "MedicationRequest/sertraline"}},
        {"id": "a4", "outcomeReference": [{"reference": "Encounter/2"}], "detail": {"status": "completed"}},
    ]
    assert "description" not in out and out["id"] == "ac" and out["status"] == "active"
    assert WITHHELD_TEXT in out["text"]["div"] and out["text"]["status"] == "generated"
    assert REDACTED in security(out)


def test_an_element_left_with_only_its_id_goes_too():
    out = redact(PLAN, {"CarePlan.activity[3].outcomeReference[0]", "CarePlan.activity[3].outcomeReference[1]"})
    assert out["activity"][3] == {"id": "a4", "detail": {"status": "completed"}}
    bare = {"resourceType": "CarePlan", "id": "x", "status": "active", "intent": "plan", "activity": [{"id": "only", "reference": {"reference": "MedicationRequest/m"}}]}
    assert "activity" not in redact(bare, {"CarePlan.activity[0].reference"})


def test_nothing_to_remove_gives_an_unchanged_copy():
    out = redact(PLAN, {"CarePlan.activity[9].reference"})
    assert out == PLAN and out is not PLAN


# --- disclose ---------------------------------------------------------------------------------------


def _example(example_json: dict) -> tuple[list[dict], list]:
    resources = resources_of(example_json)
    return resources, [read_terms(c) for c in of_type(resources, "Consent")]


def test_a_recipient_without_consent_gets_no_part2_data(example_json):
    resources, consents = _example(example_json)
    before = json.dumps(resources, sort_keys=True)
    out = disclose(resources, Recipient(references=frozenset({"Organization/stranger"}), purpose="TREAT"), consents, at=AT)
    assert json.dumps(resources, sort_keys=True) == before
    assert not any(is_part2(r) for r in out.permitted)
    assert out.withheld_count == sum(v.decision is Decision.DENY for v in out.verdicts.values()) > 0
    assert len(out.permitted) + out.withheld_count == len(resources)
    assert out.notice is None and not out.break_glass and not out.consents
    assert out.bundle_security() == [terminology.security_label("REDACTED")]
    # the SUD diagnosis, the buprenorphine prescription, the drug screens and the sessions stay home
    kinds = {_kind(r) for r in out.permitted}
    assert "session" not in kinds and "drug-screen-result" not in kinds
    assert {"mrn", "diagnosis", "prescription"} <= kinds


def test_part2_data_under_its_consent_carries_the_refrain_label_and_the_notice(example_json):
    resources, consents = _example(example_json)
    provider = Recipient(references=consents[0].recipients, purpose="TREAT")
    out = disclose(resources, provider, consents, at=AT)
    part2 = [r for r in out.permitted if is_part2(r)]
    assert part2 and all(act("NORDSCLCD") in security(r) for r in part2)
    assert not any(act("NORDSCLCD") in security(r) for r in out.permitted if not is_part2(r))
    assert out.notice == NOTICE and out.consents == {consents[0].id}
    # cn-1 names medications, diagnoses, care plan and discharge: not the sessions or drug screens
    assert "session" not in {_kind(r) for r in out.permitted}
    assert {"diagnosis", "prescription"} <= {_kind(r) for r in part2}


def test_an_emergency_lets_everything_out_marked(example_json):
    resources, consents = _example(example_json)
    out = disclose(resources, Recipient(references=frozenset({"Organization/er"}), purpose="ETREAT"), consents, at=AT)
    assert out.withheld_count == 0 and out.break_glass and out.notice == NOTICE
    glass = [r for r in out.permitted if out.verdicts[f"{r['resourceType']}/{r['id']}"].break_glass]
    assert glass and all({act("NORDSCLCD"), (terminology.V3_ACT_REASON, "ETREAT")} <= security(r) for r in glass)


def test_the_aftercare_plan_goes_without_the_mat_prescription_it_lists(example_json):
    resources, consents = _example(example_json)
    stranger = Recipient(references=frozenset({"Organization/stranger"}), purpose="TREAT")
    out = disclose(resources, stranger, consents, at=AT)
    plan = _aftercare(resources)
    verdict = out.verdicts[f"CarePlan/{plan['id']}"]
    assert verdict.decision is Decision.REDACT and verdict.removed
    sent = next(r for r in out.permitted if r["id"] == plan["id"])
    left = {a["reference"]["reference"] for a in sent.get("activity", []) if "reference" in a}
    withheld = {f"urn:uuid:{r['id']}" for r in resources if out.verdicts[f"{r['resourceType']}/{r['id']}"].decision is Decision.DENY}
    assert left and not left & withheld
    assert REDACTED in security(sent) and out.redacted_count >= 1


def test_the_patient_does_not_name_its_sud_program_without_a_consent(example_json):
    resources, consents = _example(example_json)
    patient = of_type(resources, "Patient")[0]
    stranger = disclose(resources, Recipient(references=frozenset({"Organization/stranger"}), purpose="TREAT"), consents, at=AT)
    sent = next(r for r in stranger.permitted if r["resourceType"] == "Patient")
    assert "managingOrganization" not in sent and REDACTED in security(sent)
    everything = read_terms(of_type(resources, "Consent")[0])
    everything = type(everything)(**{**everything.__dict__, "categories": frozenset({"all"})})
    provider = disclose(resources, Recipient(references=everything.recipients, purpose="TREAT"), [everything], at=AT)
    assert next(r for r in provider.permitted if r["resourceType"] == "Patient")["managingOrganization"] == patient["managingOrganization"]


def test_links_count_even_when_nothing_was_labelled_before(example_json):
    raw = resources_of(example_json)  # straight from the mappers: no labels yet
    sessions = of_type(raw, "Encounter")
    assert sessions and not any(is_part2(s) for s in sessions)  # by their own codes they are not
    out = disclose(raw, Recipient(references=frozenset({"Organization/stranger"}), purpose="TREAT"), [], at=AT)
    assert all(out.verdicts[f"Encounter/{s['id']}"].decision is Decision.DENY for s in sessions)  # via episode -> diagnosis


def test_disclosed_copies_keep_the_labels_they_were_stored_with(example_json):
    labelled = stored(resources_of(example_json))
    session = of_type(labelled, "Encounter")[0]
    out = disclose([session], Recipient(references=frozenset({"Organization/er"}), purpose="ETREAT"), [], at=AT)
    assert labels_of(out.permitted[0]).part2  # its episode is not in the batch, its stored labels are


def test_a_batch_resolver_reaches_outside(example_json):
    labelled = stored(resources_of(example_json))
    mat = next(r for r in of_type(labelled, "MedicationRequest") if is_part2(r))
    review = {"resourceType": "Task", "id": "t", "status": "requested", "intent": "order", "focus": {"reference": f"MedicationRequest/{mat['id']}"}}
    held = {f"MedicationRequest/{mat['id']}": mat}
    stranger = Recipient(references=frozenset({"Organization/stranger"}), purpose="TREAT")
    assert disclose([review], stranger, [], at=AT).withheld_count == 0  # nothing known of its focus
    assert disclose([review], stranger, [], at=AT, resolve=held.get).withheld_count == 1
