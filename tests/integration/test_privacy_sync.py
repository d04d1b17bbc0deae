"""42 CFR Part 2 across the sync, end to end: one destination a consent names, one it does not.

Every part is a real process on loopback: two target gateways and a source gateway
(``iop-fhir serve``), and ``iop-fhir worker --once``. The source's TOML declares both targets as
destinations with different ``recipient`` identities (NPIs). Generated records are posted whose
consents are replaced by one Part 2 consent (all categories, treatment) naming one of each
record's providers, whose NPIs the first destination's ``recipient`` lists. Then the consented
target holds the SUD data (Part 2 Conditions F10–F19, MAT MedicationRequests, drug screens)
labelled ``NORDSCLCD``; the other holds none of it, but every resource that is not Part 2 data;
and each delivery's disclosure or refusal has its AuditEvent at the source. Bounded: every wait
has a deadline, every process is stopped.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import servers
import requests

from iop_fhir.generate import generate_record
from iop_fhir.privacy.audit import EXIT_EXTENSION
from iop_fhir.serve import free_port
from iop_fhir.store import Store

if TYPE_CHECKING:
    from servers import Server

pytestmark = pytest.mark.integration

SEED = 41
RECORDS = (0, 1, 5, 7)  # alcohol and cocaine use, anxiety alone, opioid use on MAT, alcohol use on MAT
HTTP_TIMEOUT = 20
WORKER_TIMEOUT = 60
STRANGER = "http://hl7.org/fhir/sid/us-npi|1003000126"  # nobody's consent names it
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PART2 = f"{V3_ACT_CODE}|42CFRPart2"
SYNCED = ("Patient", "Condition", "MedicationRequest", "Observation", "Encounter", "EpisodeOfCare", "CarePlan", "Goal", "CareTeam", "Consent", "Provenance")
DIRECTORY = frozenset({"Organization", "Practitioner", "PractitionerRole", "Location", "HealthcareService", "Endpoint", "Medication"})




@dataclass
class Setup:
    source: Server
    consented: Server
    stranger: Server
    env: dict[str, str]
    database: Path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    folders = {name: tmp_path / name for name in ("consented", "stranger", "source")}
    with ExitStack() as running:
        targets = {}
        for name in ("consented", "stranger"):
            folders[name].mkdir()
            run = servers.serve(folders[name], AUTH="off")
            targets[name] = next(run)
            running.callback(run.close)  # the generator's finally stops the server
        config = tmp_path / "source.toml"
        identities = {"consented": sorted({consented_record(index)[1] for index in RECORDS}), "stranger": [STRANGER]}
        config.write_text(
            "".join(
                f'[[destination]]\nname = "{name}"\nkind = "fhir"\nbase_url = "{target.fhir}"\nrecipient = {identities[name]!r}\n'
                "timeout = 20\nmax_attempts = 3\nbackoff_base = 0.2\nbackoff_max = 1\n\n"
                for name, target in targets.items()
            )
        )
        folders["source"].mkdir()
        database = folders["source"] / "source.sqlite"
        env = servers.gateway_env(database, AUTH="off", CONFIG=str(config))
        port = free_port()
        source = servers.start(["serve", "--port", str(port), "--workers", "2"], port, folders["source"], env)
        running.callback(servers.stop, source)
        yield Setup(source, targets["consented"], targets["stranger"], env, database)


def consented_record(index: int) -> tuple[dict[str, Any], str]:
    """Generated record ``index`` whose only consent is a Part 2 consent naming one of its
    providers, and that provider's NPI (``system|value``): the consented destination's identity."""
    return servers.with_part2_consent(generate_record(index, SEED))


def everything(fhir_base: str, resource_type: str, **params: str) -> list[dict[str, Any]]:
    """Every current resource of a type matching ``params``, following the ``next`` links."""
    found: list[dict[str, Any]] = []
    url: str | None = f"{fhir_base}/{resource_type}"
    query: dict[str, str] | None = {**params, "_count": "500"}
    while url is not None:
        response = requests.get(url, params=query, headers={"Accept": "application/fhir+json"}, timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, response.text
        bundle = response.json()
        found += [e["resource"] for e in bundle.get("entry", ()) if e.get("search", {}).get("mode", "match") == "match"]
        url, query = next((link["url"] for link in bundle.get("link", ()) if link["relation"] == "next"), None), None
    return found


def is_part2(resource: dict[str, Any]) -> bool:
    return any(c.get("system") == V3_ACT_CODE and c.get("code") == "42CFRPart2" for c in resource.get("meta", {}).get("security", ()))


def labels(resource: dict[str, Any]) -> set[str]:
    return {c.get("code") for c in resource.get("meta", {}).get("security", ())}


def test_only_the_consented_destination_receives_the_sud_data(setup: Setup) -> None:
    for index in RECORDS:
        posted = requests.post(f"{setup.source.base}/iop/records", json=consented_record(index)[0], timeout=HTTP_TIMEOUT)
        assert posted.status_code == 201, posted.text
    worker = subprocess.run(
        [sys.executable, "-m", "iop_fhir.cli", "worker", "--once", "--max-wait", "20"],
        env=setup.env, capture_output=True, text=True, timeout=WORKER_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert "dead 0" in worker.stderr and "left pending 0" in worker.stderr

    at_source = {t: everything(setup.source.fhir, t) for t in SYNCED}
    ordinary = Counter({t: sum(1 for r in found if not is_part2(r)) for t, found in at_source.items()})
    assert sum(1 for found in at_source.values() for r in found if is_part2(r)) > 50

    # The consented target: the SUD data, labelled refrain-from-redisclosure, and everything else.
    consented = {t: everything(setup.consented.fhir, t) for t in SYNCED}
    assert Counter({t: len(found) for t, found in consented.items()}) == Counter({t: len(found) for t, found in at_source.items()})
    sud = everything(setup.consented.fhir, "Condition", _security=PART2)
    assert {c["code"]["coding"][0]["code"][:3] for c in sud} >= {"F10", "F11"}
    assert all("F10" <= c["code"]["coding"][0]["code"][:3] <= "F19" for c in sud)
    mat = [r for r in everything(setup.consented.fhir, "MedicationRequest", _security=PART2) if r["intent"] == "order"]
    assert mat and all({"42CFRPart2", "NORDSCLCD", "SUD"} <= labels(r) for r in mat)
    screens = [o for o in everything(setup.consented.fhir, "Observation", _security=PART2) if "laboratory" in str(o.get("category"))]
    assert screens and all("NORDSCLCD" in labels(o) for o in screens)

    # The other target: no Part 2 data of any type, and every resource that is not Part 2 data.
    for resource_type in SYNCED:
        assert everything(setup.stranger.fhir, resource_type, _security=PART2) == [], resource_type
    stranger = Counter({t: len(everything(setup.stranger.fhir, t)) for t in SYNCED})
    assert stranger == ordinary
    assert stranger["Patient"] == len(RECORDS) and stranger["Condition"] > 0 and stranger["MedicationRequest"] > 0

    # Every delivery's disclosure or refusal has its AuditEvent at the source.
    exits: dict[str, dict[str, set[str]]] = {"sync:consented": {"0": set(), "4": set()}, "sync:stranger": {"0": set(), "4": set()}}
    for event in everything(setup.source.fhir, "AuditEvent", subtype="disclose"):
        exit = next((e["valueString"] for e in event.get("extension", ()) if e["url"] == EXIT_EXTENSION), None)
        if exit in exits:
            exits[exit][event["outcome"]] |= {e["what"]["reference"].split("/_history/")[0] for e in event["entity"] if "what" in e}
    with Store.open(f"sqlite:///{setup.database}") as store:
        for name in ("consented", "stranger"):
            deliveries = store.outbox.list(destination=name, limit=100_000)
            assert deliveries and all(d.state.value == "delivered" for d in deliveries)
            upserts = {f"{d.resource_type}/{d.resource_id}" for d in deliveries if d.action == "upsert" and d.resource_type not in DIRECTORY}
            withheld = {f"{d.resource_type}/{d.resource_id}" for d in deliveries if (d.last_error or "").startswith("withheld: ")}
            audited = exits[f"sync:{name}"]
            assert upserts - withheld <= audited["0"], sorted(upserts - withheld - audited["0"])[:5]
            assert withheld <= audited["4"], sorted(withheld - audited["4"])[:5]
            assert bool(withheld) is (name == "stranger")
