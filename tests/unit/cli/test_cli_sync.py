"""``iop-fhir worker`` and ``iop-fhir sync``: settings from IOP_FHIR_CONFIG, errors as messages.

The worker's target is a real gateway app served by werkzeug on a loopback port in a thread.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from werkzeug.serving import make_server

from iop_fhir.cli import main
from iop_fhir.config import load_settings
from iop_fhir.server import create_app
from iop_fhir.store import DeliveryState, Store
from iop_fhir.sync.destinations import Router, load_destinations

MRN = "https://iop.example/mrn"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("IOP_FHIR_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[str]:
    """A second gateway (auth off) on 127.0.0.1; its FHIR base URL."""
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'target.sqlite'}", "AUTH": "off", "LOG_LEVEL": "WARNING"})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/fhir"
    finally:
        server.shutdown()
        thread.join(10)
        app.extensions["iop_fhir.store"].close()


def write_config(tmp_path: Path, *destinations: str, extra: str = "") -> Path:
    config = tmp_path / "gateway.toml"
    tables = "".join(f"\n[[destination]]\n{d}\n" for d in destinations)
    config.write_text(f'database_url = "sqlite:///{tmp_path / "source.sqlite"}"\nlog_level = "WARNING"\n{extra}\n{tables}')
    return config


def fhir_destination(name: str, base_url: str, **keys: object) -> str:
    lines = [f'name = "{name}"', 'kind = "fhir"', f'base_url = "{base_url}"', "connect_timeout = 2", "read_timeout = 5"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines)


def source_store(config: Path) -> Store:
    settings = load_settings({"CONFIG_FILE": str(config)})
    return Store.open(settings["DATABASE_URL"], router=Router(load_destinations(settings).values()))


def add_patients(config: Path, *mrns: str) -> None:
    with source_store(config) as store:
        for mrn in mrns:
            store.create({"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}], "name": [{"family": f"F{mrn}"}]})


def make_dead(config: Path, count: int, destination: str = "ehr") -> list[int]:
    with source_store(config) as store:
        claimed = store.outbox.claim("test", destination=destination, limit=count)
        store.outbox.dead_letter("test", [d.id for d in claimed], error="422 refused")
        return [d.id for d in claimed]


def run(config: Path, *args: str, input: str | None = None, **env: str):
    environment = {"IOP_FHIR_CONFIG": str(config), **{f"IOP_FHIR_{k}": v for k, v in env.items()}}
    return CliRunner().invoke(main, list(args), env=environment, input=input)


def test_worker_once_delivers_everything_then_nothing_more(tmp_path: Path, target: str) -> None:
    config = write_config(tmp_path, fhir_destination("ehr", target, batch_size=2))
    add_patients(config, "1", "2", "3")
    result = run(config, "worker", "--once")
    assert result.exit_code == 0, result.output
    assert "delivered 3, retried 0, dead 0, left pending 0" in result.output
    with source_store(config) as store:
        assert {d.state for d in store.outbox.list()} == {DeliveryState.DELIVERED}
    found = requests.get(f"{target}/Patient", params={"identifier": f"{MRN}|", "_total": "accurate"}, timeout=10).json()
    assert sorted(e["resource"]["identifier"][0]["value"] for e in found["entry"]) == ["1", "2", "3"]
    again = run(config, "worker", "--once")
    assert again.exit_code == 0 and "delivered 0" in again.output


def test_worker_once_reports_what_it_could_not_deliver(tmp_path: Path, target: str) -> None:
    from iop_fhir.serve import free_port

    nowhere = f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens: connection refused, transient
    config = write_config(tmp_path, fhir_destination("ehr", target), fhir_destination("down", nowhere, backoff_base=30))
    add_patients(config, "1")
    result = run(config, "worker", "--once", "--max-wait", "0")
    assert result.exit_code == 1
    assert "delivered 1, retried 1, dead 0, left pending 1" in result.output and "down: 1 deliveries still pending" in result.output


def test_worker_delivers_only_to_the_destinations_named(tmp_path: Path, target: str) -> None:
    config = write_config(tmp_path, fhir_destination("ehr", target), fhir_destination("other", target))
    add_patients(config, "1")
    assert run(config, "worker", "--once", "--destination", "other").exit_code == 0
    with source_store(config) as store:
        assert {(d.destination, d.state) for d in store.outbox.list()} == {("ehr", "queued"), ("other", "delivered")}


@pytest.mark.parametrize(
    ("destinations", "args", "env", "message"),
    [
        (("ehr",), ["worker", "--once", "-d", "billing"], {}, "unknown destination 'billing' (configured: ehr)"),
        ((), ["worker", "--once"], {}, "no destination is configured"),
        (("ehr",), ["worker", "--once"], {"WORKER_LEASE": "-3"}, "WORKER_LEASE must be a positive number"),
        (("ehr",), ["worker", "--once"], {"WORKER_POLL": "\"often\""}, "WORKER_POLL must be a positive number"),
    ],
)
def test_worker_errors_are_messages_with_status_1(tmp_path: Path, destinations, args, env, message) -> None:
    config = write_config(tmp_path, *(fhir_destination(n, "http://127.0.0.1:9/fhir") for n in destinations))
    result = run(config, *args, **env)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_a_bad_destination_table_names_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir_destination("ehr", "http://127.0.0.1:9/fhir", batch_size=0))
    result = run(config, "worker", "--once")
    assert result.exit_code == 1 and 'destination[0] (\'ehr\').batch_size' in result.output


def test_max_wait_without_once_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir_destination("ehr", "http://127.0.0.1:9/fhir"))
    assert run(config, "worker", "--max-wait", "5").exit_code == 2


def test_sync_status_as_a_table_and_as_json(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir_destination("ehr", "http://127.0.0.1:9/fhir"))
    add_patients(config, "1", "2", "3")
    make_dead(config, 1)
    with source_store(config) as store:
        store.create({"resourceType": "Patient", "identifier": [{"system": MRN, "value": "x"}]}, deliver_to=["retired"])
    table = run(config, "sync", "status")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["destination", "queued", "in"]
    ehr = next(line for line in lines if line.startswith("ehr "))
    assert ehr.split()[1:6] == ["2", "0", "0", "0", "1"] and "422 refused" in ehr
    assert any(line.startswith("retired (not configured)") for line in lines)
    document = json.loads(run(config, "sync", "status", "--json").output)
    rows = {r["name"]: r for r in document["destinations"]}
    assert (rows["ehr"]["queued"], rows["ehr"]["dead"], rows["retired"]["configured"]) == (2, 1, False)


def test_sync_requeue_by_id_and_by_destination(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir_destination("ehr", "http://127.0.0.1:9/fhir"))
    add_patients(config, "1", "2", "3")
    dead = make_dead(config, 3)
    result = run(config, "sync", "requeue", "--id", str(dead[0]))
    assert result.exit_code == 0 and "requeued 1 dead deliveries" in result.output
    assert "requeued 2 dead deliveries" in run(config, "sync", "requeue", "--destination", "ehr").output
    with source_store(config) as store:
        assert {d.state for d in store.outbox.list()} == {DeliveryState.QUEUED}


def test_sync_discard_asks_first_unless_yes(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir_destination("ehr", "http://127.0.0.1:9/fhir"))
    add_patients(config, "1", "2")
    make_dead(config, 2)
    refused = run(config, "sync", "discard", "--destination", "ehr", input="n\n")
    assert refused.exit_code == 1 and "Discard the dead deliveries of ehr?" in refused.output
    with source_store(config) as store:
        assert len(store.outbox.list(state="dead")) == 2
    accepted = run(config, "sync", "discard", input="y\n")
    assert accepted.exit_code == 0 and "discarded 2 dead deliveries" in accepted.output
    assert "discarded 0 dead deliveries" in run(config, "sync", "discard", "--yes").output


def test_sync_refuses_an_unknown_destination(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir_destination("ehr", "http://127.0.0.1:9/fhir"))
    for args in (["requeue", "--destination", "ehr2"], ["discard", "--destination", "ehr2", "--yes"]):
        result = run(config, "sync", *args)
        assert result.exit_code == 1 and "'ehr2' is not a configured destination" in result.output


def test_sync_pull_reports_counts_and_fails_cleanly_when_the_ehr_is_away(tmp_path: Path, target: str) -> None:
    from iop_fhir.serve import free_port

    nowhere = f"http://127.0.0.1:{free_port()}/fhir"
    config = write_config(tmp_path, fhir_destination("ehr", target), fhir_destination("down", nowhere))
    add_patients(config, "1")
    # the EHR knows the patient under its own id, with nothing recorded yet
    requests.post(f"{target}/Patient", json={"resourceType": "Patient", "identifier": [{"system": MRN, "value": "1"}]}, timeout=10)
    result = run(config, "sync", "pull", "ehr", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["patients"] == 1
    away = run(config, "sync", "pull", "down")
    assert away.exit_code == 1 and "pull from down failed" in away.output and "Traceback" not in away.output
    unknown = run(config, "sync", "pull", "nobody")
    assert unknown.exit_code == 1 and "unknown destination 'nobody'" in unknown.output
