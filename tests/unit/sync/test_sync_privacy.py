"""42 CFR Part 2 at the sync exits: what the worker's FHIR channel sends each destination, by the
patients' consents; discharge packages entry by entry; the audit; the destination keys.

The targets are real gateway apps (auth off) served by werkzeug on loopback ports in threads;
the source store runs on SQLite, and on PostgreSQL when ``IOP_FHIR_TEST_POSTGRES_URL`` is set
(the store tests' fixtures). The example record (``fixtures/iop``) has a Part 2 consent ``cn-1``
for Lakeside (pr-1, NPI 1932102084) covering medications, diagnoses, care plan and discharge
from 2026-02-20; the source clock starts on 2026-01-15.
"""

from __future__ import annotations

import copy
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.serving import make_server

from iop_fhir.api.iop import save_records
from iop_fhir.config import ConfigError
from iop_fhir.errors import TransientDeliveryError
from iop_fhir.privacy import NOTICE
from iop_fhir.privacy.audit import EXIT_EXTENSION
from iop_fhir.privacy.gate import NOTICE_EXTENSION, PrivacyGate
from iop_fhir.privacy.labels import ORIGIN, label
from iop_fhir.privacy.recipients import recipient_for_destination
from iop_fhir.record import validate_record
from iop_fhir.server import create_app
from iop_fhir.store import Delivery, DeliveryState, Store
from iop_fhir.sync.destinations import Destination, Router, load_destinations
from iop_fhir.sync.release import literal_references, without_references
from iop_fhir.sync.worker import FhirChannel, Worker
from iop_fhir.terminology import NCPDP_PROVIDER, V3_ACT_CODE, security_label



JSON = dict[str, Any]
NPI = "http://hl7.org/fhir/sid/us-npi"
LAKESIDE = f"{NPI}|1932102084"  # pr-1, named by the example's Part 2 consent cn-1
STRANGER = f"{NPI}|1003000126"  # nobody's consent names it
PART2 = f"{V3_ACT_CODE}|42CFRPart2"
CONSENT_IN_FORCE = timedelta(days=40)  # from the clock's 2026-01-15 to past cn-1's start (2026-02-20)
DIRECTORY = {"Organization", "Practitioner", "PractitionerRole", "Location", "HealthcareService", "Endpoint", "Medication"}  # nobody's record


# --- the targets and the source -------------------------------------------------------------------


@dataclass
class Target:
    """A gateway app served on 127.0.0.1, and its store to look into."""

    url: str
    store: Store

    def found(self, resource_type: str, *params: tuple[str, str]) -> list[JSON]:
        return [saved.resource for saved in self.store.search(resource_type, list(params), count=500).entries]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str], Target]]:
    """``serve(name)``: one more target gateway for this test; all stopped at teardown."""
    running: list[tuple[Any, threading.Thread, Any]] = []

    def start(name: str) -> Target:
        app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / name}.sqlite", "AUTH": "off", "LOG_LEVEL": "WARNING"})
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        running.append((server, thread, app))
        return Target(f"http://127.0.0.1:{server.server_port}/fhir", app.extensions["iop_fhir.store"])

    yield start
    for server, thread, app in running:
        server.shutdown()
        thread.join(10)
        app.extensions["iop_fhir.store"].close()


def destination(name: str, target: Target, **keys: Any) -> Destination:
    return Destination(name=name, kind="fhir", base_url=target.url, connect_timeout=2, read_timeout=10, max_attempts=2, **keys)


class Spy(FhirChannel):
    """The FHIR channel, keeping each transaction Bundle it posts."""

    sent: list[JSON]

    def __init__(self, destination: Destination, store: Store, gate: PrivacyGate) -> None:
        super().__init__(destination, store, gate)
        self.sent = []
        post = self._client.transaction

        def transaction(bundle: JSON) -> JSON:
            self.sent.append(bundle)
            return post(bundle)

        self._client.transaction = transaction  # type: ignore[method-assign]


@dataclass
class Source:
    """The source store, its destinations and a worker whose channels are spies."""

    store: Store
    destinations: dict[str, Destination]
    clock: Any
    spies: dict[str, Spy] = field(default_factory=dict)

    def save(self, record: JSON) -> None:
        save_records(self.store, [validate_record(record)], self.destinations)

    def drain(self) -> Any:
        def spy(d: Destination, s: Store, gate: PrivacyGate) -> Spy:
            self.spies[d.name] = Spy(d, s, gate)
            return self.spies[d.name]

        with Worker(self.store, self.destinations, name="w", channels={"fhir": spy}, random=random.Random(5), sleep=lambda s: self.clock.advance(seconds=s)) as worker:
            result = worker.drain(max_wait=0)
        assert result.dead == 0 and result.pending == 0, self.store.outbox.list(state="dead")
        return result

    def bundles(self, name: str) -> list[JSON]:
        return self.spies[name].sent if name in self.spies else []

    def deliveries(self, name: str) -> list[Delivery]:
        return self.store.outbox.list(destination=name, limit=5000)

    def disclosures(self, exit: str) -> list[JSON]:
        events = [s.resource for s in self.store.search("AuditEvent", [], count=1000).entries]
        return [e for e in events if {"url": EXIT_EXTENSION, "valueString": exit} in e.get("extension", ())]


@pytest.fixture
def source(open_store: Callable[..., Store], clock: Any) -> Callable[..., Source]:
    def build(*destinations: Destination) -> Source:
        store = open_store(router=Router(destinations), labeller=label)
        return Source(store, {d.name: d for d in destinations}, clock)

    return build


def part2(resources: Sequence[JSON]) -> list[JSON]:
    return [r for r in resources if any(c.get("code") == "42CFRPart2" for c in r.get("meta", {}).get("security", ()))]


def codes(resource: JSON) -> set[str]:
    return {c["code"] for c in resource.get("meta", {}).get("security", ())}


def mat(requests: Sequence[JSON]) -> list[JSON]:
    return [r for r in requests if "buprenorphine" in str(r["medicationCodeableConcept"]).lower()]


# --- destinations and recipients ------------------------------------------------------------------


def test_recipient_and_purpose_are_destination_keys_checked_with_their_location() -> None:
    loaded = load_destinations(
        {"destination": [{"name": "ehr", "kind": "fhir", "base_url": "http://ehr.test/fhir", "recipient": [LAKESIDE, "Organization/7"], "purpose": "COC"}]}
    )["ehr"]
    assert loaded.recipient == (LAKESIDE, "Organization/7") and loaded.purpose == "COC"
    assert load_destinations({"destination": [{"name": "ehr", "kind": "fhir", "base_url": "http://ehr.test/fhir"}]})["ehr"].purpose == "TREAT"
    with pytest.raises(ConfigError) as raised:
        load_destinations(
            {"destination": [{"name": "ehr", "kind": "fhir", "base_url": "http://x.test", "recipient": ["lakeside", "Patient/1", "|v"], "purpose": "ETREAT"}]}
        )
    where = [issue.location for issue in raised.value.issues]
    assert where == ["destination[0] ('ehr').recipient"] * 3 + ["destination[0] ('ehr').purpose"]
    assert "break the glass" in raised.value.issues[-1].message
    with pytest.raises(ConfigError, match=r"purpose: must be a purpose of use"):
        load_destinations({"destination": [{"name": "ehr", "kind": "fhir", "base_url": "http://x.test", "purpose": "MARKETING"}]})


def test_a_destination_is_the_recipient_its_keys_name() -> None:
    ehr = Destination(name="ehr", kind="fhir", base_url="http://x.test", recipient=(LAKESIDE, "Organization/7"), aftercare_providers=frozenset({f"{NPI}|1111111112"}), purpose="COC")
    recipient = recipient_for_destination(ehr)
    assert recipient.references == {"Organization/7"}
    assert recipient.identifiers == {(NPI, "1932102084"), (NPI, "1111111112")}
    assert recipient.purpose == "COC" and not recipient.emergency
    pharmacy = Destination(name="rx", kind="ncpdp", base_url="http://x.test", ncpdp_id="1234567")
    assert recipient_for_destination(pharmacy).identifiers == {(NCPDP_PROVIDER, "1234567")}


# --- the FHIR channel -----------------------------------------------------------------------------


def test_only_the_consented_destination_receives_part2_data(serve, source, clock, example_json: JSON) -> None:
    consented, other = serve("consented"), serve("other")
    src = source(destination("lakeside", consented, recipient=[LAKESIDE]), destination("stranger", other, recipient=[STRANGER]))
    clock.advance(days=CONSENT_IN_FORCE.days)
    src.save(example_json)
    src.drain()

    # Lakeside holds the Part 2 data its consent covers: the opioid diagnosis, the buprenorphine order
    conditions = consented.found("Condition")
    assert {c["code"]["coding"][0]["code"] for c in part2(conditions)} == {"F11.20"}
    requests = consented.found("MedicationRequest")
    assert mat(requests) and all("NORDSCLCD" in codes(r) and "42CFRPart2" in codes(r) for r in mat(requests))
    # ... but not what cn-1 leaves out (drug screens, sessions: its categories)
    assert not [o for o in part2(consented.found("Observation")) if o["category"][0]["coding"][0]["code"] == "laboratory"]
    # The stranger holds no Part 2 data at all, and the ordinary data all the same.
    for resource_type in ("Condition", "MedicationRequest", "Observation", "Encounter", "CarePlan", "EpisodeOfCare", "Consent"):
        assert other.found(resource_type, ("_security", PART2)) == [], resource_type
    assert {c["code"]["coding"][0]["code"] for c in other.found("Condition")} == {"F33.1"}
    assert other.found("MedicationRequest") and not mat(other.found("MedicationRequest"))
    assert len(other.found("Patient")) == 1
    # Our label-origin marker stays here: at the target the labels are another system's.
    assert all(ORIGIN not in str(c) for r in requests for c in r["meta"]["security"] if c["code"] == "NORDSCLCD")

    # Withheld deliveries are settled, visibly; the destination's health is not an error.
    withheld = [d for d in src.deliveries("stranger") if (d.last_error or "").startswith("withheld: ")]
    assert withheld and all(d.state is DeliveryState.DELIVERED for d in withheld)
    assert any("42 CFR Part 2" in (d.last_error or "") for d in withheld)
    assert src.store.outbox.stats()["stranger"].last_error is None
    kinds = {d.resource_type for d in withheld}
    assert {"Condition", "MedicationRequest", "Encounter"} <= kinds


def test_the_transaction_says_what_it_carries_without_naming_what_it_left_out(serve, source, clock, example_json: JSON) -> None:
    consented, other = serve("consented"), serve("other")
    src = source(destination("lakeside", consented, recipient=[LAKESIDE]), destination("stranger", other, recipient=[STRANGER]))
    clock.advance(days=CONSENT_IN_FORCE.days)
    src.save(example_json)
    src.drain()
    with_part2 = [b for b in src.bundles("lakeside") if "meta" in b and NOTICE_EXTENSION in str(b["meta"])]
    assert with_part2
    meta = with_part2[0]["meta"]
    assert meta["extension"] == [{"url": NOTICE_EXTENSION, "valueString": NOTICE}]
    assert {"42CFRPart2", "NORDSCLCD"} <= {c["code"] for c in meta["security"]}
    stranger = src.bundles("stranger")
    assert stranger and all(NOTICE_EXTENSION not in str(b.get("meta")) for b in stranger)
    # what was left out is said, not what: REDACTED on the Bundle, nothing else
    assert any(b.get("meta") == {"security": [security_label("REDACTED")]} for b in stranger)
    sent = [e["resource"] for b in stranger for e in b.get("entry", ()) if "resource" in e]
    assert sent and not part2(sent)


def test_every_delivery_has_its_disclosure_or_refusal_audited(serve, source, clock, example_json: JSON) -> None:
    consented, other = serve("consented"), serve("other")
    src = source(destination("lakeside", consented, recipient=[LAKESIDE]), destination("stranger", other, recipient=[STRANGER]))
    clock.advance(days=CONSENT_IN_FORCE.days)
    src.save(example_json)
    src.drain()
    for name in ("lakeside", "stranger"):
        events = src.disclosures(f"sync:{name}")
        audited = {e["what"]["reference"].split("/_history/")[0] for ev in events for e in ev.get("entity", ()) if "what" in e}
        upserts = {f"{d.resource_type}/{d.resource_id}" for d in src.deliveries(name) if d.action == "upsert" and d.resource_type not in DIRECTORY}
        assert upserts and upserts <= audited, sorted(upserts - audited)[:5]
        assert all(ev["subtype"][0]["code"] == "disclose" and ev["agent"][0]["altId"] == "iop-fhir worker" for ev in events)
    refused = [ev for ev in src.disclosures("sync:stranger") if ev["outcome"] == "4"]
    assert refused and all("withheld" in ev["outcomeDesc"] for ev in refused)
    used = {e["what"]["reference"] for ev in src.disclosures("sync:lakeside") if ev["outcome"] == "0" for e in ev["entity"] if e["role"]["code"] == "13"}
    assert any(ref.startswith("Consent/") for ref in used)  # the consent it went under, for the accounting


def test_before_the_consent_starts_and_after_it_is_revoked_nothing_part2_goes(serve, source, clock, example_json: JSON) -> None:
    lakeside = serve("lakeside")
    src = source(destination("lakeside", lakeside, recipient=[LAKESIDE]))
    src.save(example_json)  # 2026-01-15: cn-1 signed for 2026-02-20 on
    src.drain()
    assert part2(lakeside.found("MedicationRequest")) == [] and part2(lakeside.found("Condition")) == []

    # A later consent does not resend what was withheld: those deliveries are settled.
    clock.advance(days=CONSENT_IN_FORCE.days)
    src.drain()
    assert part2(lakeside.found("MedicationRequest")) == []

    # ... a new version is decided when it is delivered: now it goes.
    changed = copy.deepcopy(example_json)
    changed["prescriptions"][2]["instructions"] = "Dissolve one film under the tongue once daily."
    src.save(changed)
    src.drain()
    assert len(mat(lakeside.found("MedicationRequest", ("intent", "order")))) == 1

    # Revoked: from that day on nothing more goes, whatever was written before.
    revoked = copy.deepcopy(changed)
    revoked["consents"][0]["revoked_on"] = clock.now.date().isoformat()  # in force from the start of today
    revoked["prescriptions"][2]["instructions"] = "Dissolve one film under the tongue each morning."
    src.save(revoked)
    src.drain()
    held = mat(lakeside.found("MedicationRequest", ("intent", "order")))
    assert len(held) == 1 and "once daily" in str(held[0]["dosageInstruction"])  # the earlier version stays
    ident = held[0]["identifier"][0]
    [ours] = src.store.search("MedicationRequest", [("identifier", f"{ident['system']}|{ident['value']}")]).entries
    last = [d for d in src.deliveries("lakeside") if d.resource_id == ours.id][-1]
    assert last.version_id == ours.version and last.state is DeliveryState.DELIVERED and last.last_error.startswith("withheld: ")


def test_deletions_are_always_sent(serve, source, clock, example_json: JSON) -> None:
    other = serve("other")
    src = source(destination("stranger", other, recipient=[STRANGER]))
    src.save(example_json)
    src.drain()
    condition = next(s for s in src.store.search("Condition", [("_security", PART2)]).entries)
    src.store.delete("Condition", condition.id)
    src.drain()
    deletes = [e for b in src.bundles("stranger") for e in b.get("entry", ()) if e["request"]["method"] == "DELETE"]
    assert [e["request"]["url"].split("?")[0] for e in deletes] == ["Condition"]


def test_a_redacted_copy_goes_redacted(serve, source, clock, example_json: JSON) -> None:
    other = serve("other")
    src = source(destination("stranger", other, recipient=[STRANGER]))
    src.save(example_json)
    src.drain()
    # The Patient names its program, a co-occurring (SUD) program: that is Part 2 information.
    patient = other.found("Patient")[0]
    assert "managingOrganization" not in patient and "REDACTED" in codes(patient)
    assert "managingOrganization" in src.store.search("Patient", []).entries[0].resource
    notes = [d.last_error for d in src.deliveries("stranger") if d.resource_type == "Patient"]
    assert notes == ["sent redacted: elements naming data the recipient may not see were removed"]


def test_a_reference_to_what_the_consent_does_not_cover_is_cut(serve, source, clock, example_json: JSON) -> None:
    lakeside = serve("lakeside")
    src = source(destination("lakeside", lakeside, recipient=[LAKESIDE]))
    record = copy.deepcopy(example_json)
    record["prescriptions"][2]["indication_id"] = "dx-2"  # buprenorphine for the opioid dependence
    record["consents"][0]["categories"] = ["medications", "care-plan", "discharge"]  # no diagnoses
    clock.advance(days=CONSENT_IN_FORCE.days)
    src.save(record)
    src.drain()
    assert part2(lakeside.found("Condition")) == []
    [order] = mat(lakeside.found("MedicationRequest", ("intent", "order")))
    assert "reasonReference" not in order and {"REDACTED", "NORDSCLCD"} <= codes(order)


def test_the_discharge_package_goes_with_what_may_go(serve, source, clock, example_json: JSON) -> None:
    lakeside = serve("lakeside")
    # The aftercare provider's destination is the recipient its aftercare_providers name.
    src = source(destination("lakeside", lakeside, aftercare_providers=frozenset({LAKESIDE}), resources=frozenset({"Organization"})))
    clock.advance(days=CONSENT_IN_FORCE.days)
    src.save(example_json)
    src.drain()
    [package] = [d for d in src.deliveries("lakeside") if d.resource_type == "Bundle"]
    assert package.state is DeliveryState.DELIVERED and package.last_error.startswith("partly withheld: ")
    # cn-1 covers medications and diagnoses, not drug screens
    assert mat(lakeside.found("MedicationRequest")) and part2(lakeside.found("Condition"))
    assert not [o for o in lakeside.found("Observation") if "drug" in str(o["code"]).lower() and part2([o])]
    events = src.disclosures("discharge:lakeside")
    assert {e["outcome"] for e in events} == {"0", "4"}


def test_nothing_leaves_while_the_audit_cannot_be_written(serve, source, clock, example_json: JSON, monkeypatch: pytest.MonkeyPatch) -> None:
    other = serve("other")
    stranger = destination("stranger", other, recipient=[STRANGER])
    src = source(stranger)
    src.save(example_json)
    batch = src.store.outbox.claim("w", destination="stranger", limit=20)
    with Worker(src.store, src.destinations, name="w") as worker:
        monkeypatch.setattr(worker.audit, "flush", lambda: None)  # the database refuses the audit
        channel = FhirChannel(stranger, src.store, worker.gate)
        with pytest.raises(TransientDeliveryError, match="audit trail"):
            channel.deliver(batch)
        channel.close()
    assert other.found("Patient") == []


# --- cutting references ---------------------------------------------------------------------------

_ids = st.sampled_from(["Condition/a", "Condition/b", "Encounter/c", "Patient/p"])
_reference = st.builds(lambda ref: {"reference": ref}, _ids)
_json = st.recursive(
    st.one_of(_reference, st.integers(), st.text(max_size=3)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.sampled_from(["x", "y", "z"]), children, max_size=3)),
    max_leaves=12,
)


@given(body=st.dictionaries(st.sampled_from(["a", "b", "c"]), _json, max_size=3), gone=st.sets(_ids))
def test_cutting_leaves_no_reference_to_what_is_gone_and_keeps_the_rest_of_a_list(body: JSON, gone: set[str]) -> None:
    resource = {"resourceType": "Observation", **body}
    cut = without_references(resource, gone)
    assert not literal_references(cut) & gone
    if not literal_references(resource) & gone:
        assert cut is resource
    else:
        assert "REDACTED" in codes(cut) and cut["resourceType"] == "Observation"
        assert without_references(cut, gone) is cut  # nothing more to cut


def test_cutting_takes_the_list_item_that_holds_the_reference() -> None:
    episode = {
        "resourceType": "EpisodeOfCare",
        "diagnosis": [{"condition": {"reference": "Condition/a"}, "rank": 1}, {"condition": {"reference": "Condition/b"}, "rank": 2}],
        "managingOrganization": {"reference": "Organization/o"},
    }
    cut = without_references(episode, {"Condition/a", "Organization/o"})
    assert cut["diagnosis"] == [{"condition": {"reference": "Condition/b"}, "rank": 2}]
    assert "managingOrganization" not in cut
    assert without_references(episode, {"Condition/a", "Condition/b"}).keys() == {"resourceType", "managingOrganization", "meta"}
