"""Benchmark: outbox delivery to a loopback FHIR server, batched vs one request per resource,
beside the target's own ingest floor.

Prints figures; asserts nothing (timings do not belong in tests). Everything runs on
127.0.0.1, bounded in time, and stops itself.

* Source: a generated cohort loaded into a SQLite file through the gateway's own loading path
  (``iop_fhir.serve.load_records``: ``POST /iop/records``) with one destination configured, so
  every stored resource has a queued delivery. That file is kept pristine and copied for each
  measurement, so every run starts from the same full queue.
* Target: ``iop-fhir serve`` (gunicorn, auth off) on a **fresh SQLite file per measurement**, so
  each measurement is the same insert workload.
* Measurements, in resources/s:
  1. *direct* (the floor): the target's own ingest of the very transaction Bundles the worker
     would send (``sync.outgoing.delivery_bundle`` over the queue in id order, ``--batch-size``
     entries each, serialised beforehand), posted back to back by one client;
  2. *batched*: ``Worker.drain`` in process (claim, build, post, mark delivered) with
     ``batch_size`` = ``--batch-size``;
  3. *single*: the same with ``batch_size = 1``, on a smaller cohort (``--single-records``),
     beside *direct, one per request*: that cohort's Bundles of one entry posted straight, the
     target's own gain from batching (no worker can gain more from batches than the target does,
     plus the worker's own per-request cost).
* Each measurement runs ``--repeat`` times (a fresh target each time) and the fastest counts:
  on a shared machine a single run can land in a busy moment.
* Targets: batched >= 10x single; batched >= 70% of direct.

Usage: python bench/sync.py [--records 20] [--batch-size 50 100] [--single-records 2] [--workers 2] [--repeat 2] [--seed 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import requests
from processes import Server, launch

from iop_fhir.api import STORE_KEY
from iop_fhir.formats import fhir_json
from iop_fhir.generate import generate_cohort
from iop_fhir.serve import build_app, free_port, load_records
from iop_fhir.store import Store
from iop_fhir.sync.destinations import Destination
from iop_fhir.sync.outgoing import delivery_bundle, store_identify
from iop_fhir.sync.worker import Worker, check_transaction_response

DESTINATION = Destination(name="bench", kind="fhir", base_url="http://127.0.0.1:9/fhir", read_timeout=120.0, max_attempts=3)
TARGET_BATCHED_VS_SINGLE = 10.0
TARGET_BATCHED_VS_DIRECT = 0.70


# --- the target ----------------------------------------------------------------------------------


def start_target(folder: Path, workers: int) -> Server:
    """``iop-fhir serve`` on a new SQLite file, awaited until ``/healthz`` answers (60 s at most)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOP_FHIR_")}
    env.update({"IOP_FHIR_DATABASE_URL": f"sqlite:///{folder / 'target.sqlite'}", "IOP_FHIR_AUTH": "off", "IOP_FHIR_LOG_LEVEL": "WARNING"})
    command = [sys.executable, "-m", "iop_fhir.cli", "serve", "--port", str(port), "--workers", str(workers)]
    target = launch(command, port, env, label="target", log=folder / "target.log")
    for _ in range(2 * workers):  # every worker answers once before the clock starts
        requests.get(f"{target.fhir}/metadata", timeout=10)
    return target


# --- the source ----------------------------------------------------------------------------------


def build_source(folder: Path, records: int, seed: int) -> tuple[Path, int]:
    """A pristine SQLite file holding ``records`` records and a delivery queued for each resource."""
    path = folder / f"source-{records}.sqlite"
    settings = {"DATABASE_URL": f"sqlite:///{path}", "AUTH": "off", "LOG_LEVEL": "WARNING"}
    table = {"name": DESTINATION.name, "kind": "fhir", "base_url": DESTINATION.base_url}
    app = build_app({**settings, "destination": [table]})
    started = time.perf_counter()
    for _ in load_records(app, generate_cohort(records, seed)):
        pass
    store: Store = app.extensions[STORE_KEY]
    queued = store.outbox.stats()[DESTINATION.name].queued
    store.close()  # checkpoints the WAL into the file, so a file copy is the whole database
    print(f"source: {records} records, {queued} deliveries queued ({time.perf_counter() - started:.1f} s to load)")
    return path, queued


def copy_of(pristine: Path, folder: Path, label: str) -> Store:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{label}.sqlite"
    shutil.copyfile(pristine, path)
    return Store.open(f"sqlite:///{path}")


# --- the measurements ----------------------------------------------------------------------------


@dataclass
class Figure:
    label: str
    resources: int
    requests: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.resources / self.seconds if self.seconds else 0.0


def direct(pristine: Path, folder: Path, batch_size: int, workers: int) -> Figure:
    """The floor: the worker's own Bundles, prepared beforehand, posted straight to the target."""
    store = copy_of(pristine, folder, f"direct-{batch_size}")
    try:
        deliveries, after = [], 0
        while page := store.outbox.list(destination=DESTINATION.name, after_id=after, limit=1000):
            deliveries += page
            after = page[-1].id
        identify = store_identify(store)
        bodies = [fhir_json.dumps(delivery_bundle(deliveries[i : i + batch_size], identify)) for i in range(0, len(deliveries), batch_size)]
    finally:
        store.close()
    target = start_target(folder / f"target-direct-{batch_size}", workers)
    try:
        session = requests.Session()
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json", "Prefer": "return=minimal"}
        started = time.perf_counter()
        for body in bodies:
            response = session.post(target.fhir, data=body, headers=headers, timeout=DESTINATION.read_timeout)
            if response.status_code != 200:
                raise SystemExit(f"direct: the target answered {response.status_code}: {response.text[:300]}")
            check_transaction_response(response.json(), len(fhir_json.loads(body)["entry"]))
        seconds = time.perf_counter() - started
    finally:
        target.stop()
    label = "direct, one per request" if batch_size == 1 else f"direct, batches of {batch_size}"
    return Figure(label, len(deliveries), len(bodies), seconds)


def delivered(pristine: Path, folder: Path, batch_size: int, workers: int) -> Figure:
    """``Worker.drain`` from a full queue to a fresh target."""
    store = copy_of(pristine, folder, f"worker-{batch_size}")
    target = start_target(folder / f"target-worker-{batch_size}", workers)
    try:
        destination = replace(DESTINATION, base_url=target.fhir, batch_size=batch_size)
        with Worker(store, {destination.name: destination}, name="bench") as worker:
            result = worker.drain(max_wait=0)
        if result.dead or result.pending or result.retried:
            raise SystemExit(f"worker, batches of {batch_size}: {result}")
    finally:
        target.stop()
        store.close()
    label = "one request per resource" if batch_size == 1 else f"worker, batches of {batch_size}"
    return Figure(label, result.delivered, result.requests, result.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20, help="records in the cohort for direct and batched runs")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[50, 100], help="deliveries per transaction (one or more)")
    parser.add_argument("--single-records", type=int, default=2, help="records for the one-request-per-resource run")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes of the target")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest counts")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    def best(measure, source: Path, batch_size: int) -> Figure:
        runs = [measure(source, folder / f"run-{n}", batch_size, args.workers) for n in range(args.repeat)]
        return max(runs, key=lambda figure: figure.rate)

    folder = Path(tempfile.mkdtemp(prefix="iop-fhir-bench-sync-"))
    try:
        print(f"target: iop-fhir serve, gunicorn x {args.workers} workers, SQLite, auth off; "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
        pristine, _ = build_source(folder, args.records, args.seed)
        small, _ = build_source(folder, args.single_records, args.seed) if args.single_records != args.records else (pristine, 0)
        figures: list[tuple[int, Figure, Figure]] = []
        for batch_size in args.batch_size:
            figures.append((batch_size, best(direct, pristine, batch_size), best(delivered, pristine, batch_size)))
        single_floor = best(direct, small, 1)
        single = best(delivered, small, 1)
        report(figures, single_floor, single)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(figures: list[tuple[int, Figure, Figure]], single_floor: Figure, single: Figure) -> None:
    print(f"\n{'measurement':<32}{'resources':>10}{'requests':>10}{'seconds':>9}{'resources/s':>13}")
    for figure in [f for _, floor, batched in figures for f in (floor, batched)] + [single_floor, single]:
        print(f"{figure.label:<32}{figure.resources:>10}{figure.requests:>10}{figure.seconds:>9.2f}{figure.rate:>13.0f}")
    print()
    for batch_size, floor, batched in figures:
        vs_single = batched.rate / single.rate if single.rate else 0.0
        vs_direct = batched.rate / floor.rate if floor.rate else 0.0
        print(f"batches of {batch_size}: batched / single {vs_single:5.1f}x (target >= {TARGET_BATCHED_VS_SINGLE:.0f}x) "
              f"{'yes' if vs_single >= TARGET_BATCHED_VS_SINGLE else 'NO'};  "
              f"batched / direct {vs_direct:4.0%} (target >= {TARGET_BATCHED_VS_DIRECT:.0%}) "
              f"{'yes' if vs_direct >= TARGET_BATCHED_VS_DIRECT else 'NO'}")  # fmt: skip
        if single_floor.rate:
            print(f"  the target's own gain from batches of {batch_size}: {floor.rate / single_floor.rate:.1f}x (direct / direct, one per request)")


if __name__ == "__main__":
    main()
