"""Properties over generated records, random consents, recipients and moments.

* no resource labelled Part 2 is ever disclosed without a Part 2 consent in force that names
  the recipient, the purpose and the data (or an emergency);
* a consent revoked at t permits nothing at or after t, and changes nothing before t;
* labelling is idempotent and deterministic;
* every label written is one of the reference's (terminology ``security_labels``).

The oracle below restates the consent rule from the consent's fields, apart from the code under test.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from privacy_helpers import of_type, resources_of, stored

from iop_fhir import terminology
from iop_fhir.generate import generate_record
from iop_fhir.privacy import ConsentTerms, Decision, Recipient, disclose, label, terms_from_fhir
from iop_fhir.privacy.labels import data_categories, labels_of

PROPERTIES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PURPOSES = ["TREAT", "TREAT", "TREAT", "ETREAT", "COC", "HPAYMT", "HOPERAT", "PATRQT", "PUBHLTH", "HRESCH"]
CATEGORIES = ["demographics", "diagnoses", "medications", "assessments", "drug-screens", "vitals", "sessions", "care-plan", "discharge", "all"]
LABELS = {(e["system"], code): e["kind"] for code, e in terminology.tables()["security_labels"].items()}


@cache
def record(index: int, seed: int) -> tuple[dict, ...]:
    return tuple(resources_of(generate_record(index, seed)))


def _id(reference: str) -> str:
    return reference.rsplit("/", 1)[-1].removeprefix("urn:uuid:")


def _start(resources: tuple[dict, ...]) -> datetime:
    episode = of_type(list(resources), "EpisodeOfCare")[0]
    return datetime.fromisoformat(episode["period"]["start"]).replace(tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A record (by generator index and seed, so a failure prints small), a recipient, consents, a moment."""

    index: int
    seed: int
    recipient: Recipient
    consents: list[ConsentTerms]
    at: datetime

    @property
    def resources(self) -> tuple[dict, ...]:
        return record(self.index, self.seed)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    index, seed = draw(st.integers(0, 12)), draw(st.integers(1, 3))
    resources = record(index, seed)
    parties = sorted(f"{r['resourceType']}/{r['id']}" for r in resources if r["resourceType"] in ("Organization", "Practitioner"))
    parties.append("Organization/stranger")
    patient = f"urn:uuid:{of_type(list(resources), 'Patient')[0]['id']}"
    start = _start(resources)

    def moment(days: int) -> datetime:
        return start + timedelta(days=days, hours=draw(st.integers(0, 23)))

    consents = [t for c in of_type(list(resources), "Consent") if (t := terms_from_fhir(c)) is not None]
    for n in range(draw(st.integers(0, 4))):
        begin = moment(draw(st.integers(-60, 120)))
        consents.append(
            ConsentTerms(
                id=f"Consent/drawn-{n}",
                patient=draw(st.sampled_from([patient, patient.replace("urn:uuid:", "Patient/"), "Patient/someone-else"])),
                recipients=frozenset(draw(st.sets(st.sampled_from(parties), max_size=2))),
                purposes=frozenset(draw(st.sets(st.sampled_from(PURPOSES), min_size=1, max_size=3))),
                categories=frozenset(draw(st.sets(st.sampled_from(CATEGORIES), min_size=1, max_size=3))),
                period=(begin, draw(st.none() | st.integers(1, 400).map(lambda d, b=begin: b + timedelta(days=d)))),
                part2=draw(st.booleans()),
                status=draw(st.sampled_from(["active"] * 5 + ["inactive", "draft", "rejected"])),
                revoked_at=moment(draw(st.integers(-30, 300))) if draw(st.integers(0, 3)) == 0 else None,
                deny=draw(st.integers(0, 5)) == 0,
            )
        )
    who, purpose, at = draw(st.sampled_from(parties)), draw(st.sampled_from(PURPOSES)), moment(draw(st.integers(-30, 500)))
    aimed = [c for c in consents if c.recipients and not c.deny]
    if aimed and draw(st.booleans()):
        # aim at a consent, so that its permits get exercised (and its edges: period, revocation)
        target = draw(st.sampled_from(aimed))
        who = draw(st.sampled_from(sorted(target.recipients)))
        purpose = draw(st.sampled_from(sorted(target.purposes | {"COC"})) | st.sampled_from(PURPOSES))
        start_of = target.period[0] or start
        at = start_of + timedelta(hours=draw(st.integers(-24 * 30, 24 * 200)))
    if draw(st.booleans()):
        who = f"urn:uuid:{_id(who)}" if not who.startswith("urn:") else f"Organization/{_id(who)}"  # the other form
    recipient = Recipient(references=frozenset({who}), purpose=purpose, break_glass=draw(st.integers(0, 19)) == 0)
    return Scenario(index, seed, recipient, consents, at)


def _in_force(c: ConsentTerms, at: datetime) -> bool:
    alive = c.status == "active" or (c.status == "inactive" and c.revoked_at is not None)
    revoked = c.revoked_at is not None and at >= c.revoked_at
    start, end = c.period
    return alive and not revoked and (start is None or start <= at) and (end is None or at < end)


def _part2_consent_for(resource: dict, recipient: Recipient, consents: list[ConsentTerms], at: datetime) -> bool:
    """The oracle: a Part 2 permit in force naming recipient, purpose, data and patient."""
    wanted = {recipient.purpose} | ({"TREAT"} if recipient.purpose in ("COC", "ETREAT") else set())
    named = {_id(r) for r in recipient.references}
    subject = resource.get("subject") or resource.get("patient") or resource.get("for")
    patient = _id(subject["reference"]) if isinstance(subject, dict) and "reference" in subject else None
    return any(
        c.part2
        and not c.deny
        and _in_force(c, at)
        and bool(named & {_id(r) for r in c.recipients})
        and bool(wanted & c.purposes)
        and ("all" in c.categories or bool(c.categories & data_categories(resource)))
        and (c.patient is None or patient is None or _id(c.patient) == patient)
        for c in consents
    )


@settings(PROPERTIES, max_examples=60)
@given(scenarios())
def test_no_part2_resource_leaves_without_a_matching_consent_or_an_emergency(scenario):
    resources, recipient, consents, at = scenario.resources, scenario.recipient, scenario.consents, scenario.at
    out = disclose(resources, recipient, consents, at=at)
    assert len(out.permitted) + out.withheld_count == len(resources)
    originals = {f"{r['resourceType']}/{r['id']}": r for r in resources}
    for sent in out.permitted:
        name = f"{sent['resourceType']}/{sent['id']}"
        verdict = out.verdicts[name]
        if labels_of(sent).part2:  # the copy carries every label its original earned
            assert verdict.break_glass or _part2_consent_for(originals[name], recipient, consents, at), name
            assert (terminology.V3_ACT_CODE, "NORDSCLCD") in {(c["system"], c["code"]) for c in sent["meta"]["security"]}
        if verdict.break_glass:
            assert recipient.emergency
    assert (out.notice is not None) == any(v.part2 and v.decision is not Decision.DENY for v in out.verdicts.values())


@PROPERTIES
@given(scenarios(), st.integers(0, 50), st.integers(-200, 200))
def test_a_revoked_consent_permits_nothing_from_its_revocation_on(scenario, which, offset_hours):
    resources, recipient, consents, at = scenario.resources, scenario.recipient, scenario.consents, scenario.at
    if not consents:
        return
    chosen = consents[which % len(consents)]
    if chosen.status not in ("active", "inactive"):
        return
    revoked_at = at + timedelta(hours=offset_hours)
    never = dataclasses.replace(chosen, id="Consent/revoked", status="active", revoked_at=None)
    revoked = dataclasses.replace(never, status="inactive", revoked_at=revoked_at)
    others = [c for c in consents if c is not chosen]
    out = disclose(resources, recipient, [*others, revoked], at=at)
    if at >= revoked_at:
        assert "Consent/revoked" not in out.consents
        assert all(v.consent != "Consent/revoked" for v in out.verdicts.values())
    else:  # before its revocation a consent is what it was
        unrevoked = disclose(resources, recipient, [*others, never], at=at)
        assert out.verdicts == unrevoked.verdicts


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 12), st.integers(1, 3))
def test_labelling_is_idempotent_deterministic_and_writes_only_reference_labels(index, seed):
    resources = list(record(index, seed))
    first, second = stored(resources), stored(resources)
    assert first == second
    for labelled in first:
        assert label(labelled) == label(label(labelled))
        assert stored([labelled])[0] == label(labelled)
        codes = [(c["system"], c["code"]) for c in labelled["meta"]["security"]]
        assert len(codes) == len(set(codes))
        assert [LABELS.get(key) for key in codes if LABELS.get(key) == "confidentiality"] == ["confidentiality"]
        assert all(LABELS.get(key) in ("confidentiality", "sensitivity", "policy") for key in codes), codes


@PROPERTIES
@given(scenarios())
def test_a_disclosure_writes_only_reference_labels_and_leaves_its_input_alone(scenario):
    resources, recipient, consents, at = scenario.resources, scenario.recipient, scenario.consents, scenario.at
    snapshot = [dict(r) for r in resources]
    out = disclose(resources, recipient, consents, at=at)
    assert [dict(r) for r in resources] == snapshot
    for sent in out.permitted:
        for coding in sent["meta"]["security"]:
            assert (coding["system"], coding["code"]) in LABELS
    assert out == disclose(resources, recipient, consents, at=at)


@PROPERTIES
@given(scenarios())
def test_the_consents_of_another_patient_permit_nothing(scenario):
    resources, recipient, consents, at = scenario.resources, scenario.recipient, scenario.consents, scenario.at
    strangers = [dataclasses.replace(c, patient="Patient/someone-else") for c in consents]
    out = disclose(resources, recipient, strangers, at=at)
    assert not out.consents
    assert out.verdicts == disclose(resources, recipient, [], at=at).verdicts


# One term of a consent that matches exactly, broken: each term is needed, none suffices alone.
BREAKS = {
    "recipient": lambda c, at: dataclasses.replace(c, recipients=frozenset({"Organization/someone-else"})),
    "purpose": lambda c, at: dataclasses.replace(c, purposes=frozenset({"HRESCH"})),
    "category": lambda c, at: dataclasses.replace(c, categories=frozenset({"vitals"})),
    "not yet begun": lambda c, at: dataclasses.replace(c, period=(at + timedelta(microseconds=1), None)),
    "ended": lambda c, at: dataclasses.replace(c, period=(None, at)),
    "revoked": lambda c, at: dataclasses.replace(c, status="inactive", revoked_at=at),
    "inactive": lambda c, at: dataclasses.replace(c, status="inactive"),
    "draft": lambda c, at: dataclasses.replace(c, status="draft"),
    "rejected": lambda c, at: dataclasses.replace(c, status="rejected"),
    "not under part 2": lambda c, at: dataclasses.replace(c, part2=False),
    "another patient": lambda c, at: dataclasses.replace(c, patient="Patient/someone-else"),
    "a refusal": lambda c, at: dataclasses.replace(c, deny=True),
}


@PROPERTIES
@given(st.integers(0, 12), st.integers(1, 3), st.sampled_from(["TREAT", "COC", "HPAYMT", "HOPERAT"]), st.integers(-30, 300), st.sampled_from(sorted(BREAKS)))
def test_every_term_of_a_part2_consent_is_needed(index, seed, purpose, day, broken):
    resources = record(index, seed)
    at = _start(resources) + timedelta(days=day)
    recipient = Recipient(references=frozenset({"Organization/aftercare"}), purpose=purpose)
    exact = ConsentTerms(
        id="Consent/exact",
        patient=f"Patient/{of_type(list(resources), 'Patient')[0]['id']}",
        recipients=frozenset({"Organization/aftercare"}),
        purposes=frozenset({purpose}),
        categories=frozenset({"all"}),
        period=(at - timedelta(days=1), at + timedelta(days=1)),
        part2=True,
    )
    whole = disclose(resources, recipient, [exact], at=at)
    part2 = [name for name, v in whole.verdicts.items() if v.part2]
    assert all(whole.verdicts[name].consent == "Consent/exact" for name in part2)  # none for a mental-health program
    out = disclose(resources, recipient, [BREAKS[broken](exact, at)], at=at)
    assert all(out.verdicts[name].decision is Decision.DENY for name in part2), broken
