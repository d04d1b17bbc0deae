"""Benchmark: the gateway over HTTP (read-by-id, search by patient, create) beside its floor.

Prints figures; asserts nothing (timings do not belong in tests). Everything runs on
127.0.0.1, bounded in time, and stops itself.

* Setup: a generated cohort loaded into a fresh SQLite file through the gateway's own loading
  path (``iop_fhir.serve.load_records``: ``POST /iop/records``).
* Servers: the gateway (``iop_fhir.serve.build_app``, auth off unless ``--auth``) and the
  floor, a bare Flask app whose one endpoint returns one stored resource's JSON bytes from the
  same database (``Store.read(...).data``), both under the same gunicorn settings
  (``iop_fhir.serve.gunicorn_options``: same worker class, workers, threads).
* Load: ``wrk`` (Debian's package) at ``--connections`` connections for ``--duration`` seconds
  per scenario after a short warm-up, rotating through real ids; without wrk, a Python client
  (processes of threads, one requests.Session per connection), which shares the 2 cores with
  the servers and so gives lower absolute figures (the ratios remain comparable).
* Scenarios: read-by-id (``GET /fhir/Observation/{id}``), search by patient (a page of 20:
  ``GET /fhir/Observation?patient={id}&_count=20``), create (``POST /fhir/Observation``, for a
  patient the searches leave out, so every round searches the same data), and the
  floor (``GET /floor/Observation/{id}``), each in ``--repeat`` interleaved rounds (the best round
  of each counts). After each run the script waits until the gateway has indexed the audit
  events the run left queued (it does so when idle) and prints how long that took: the deferred
  part of auditing every request, shown beside the figures. Targets at 16 connections: read >= 60% of the floor,
  search >= 40%, create >= 15%, read p99 < 20 ms.
* In process, first (``--in-process N``, 0 to skip): the CPU each scenario costs per request
  with no server and no socket (the apps called as WSGI callables, the audit flusher's thread
  included, its idle-time indexing not), beside the same requests with the audit trail's work
  taken out (nothing noted, no event built or stored; the patients a search page's query reads
  for it stay: an analysis only, the gateway has no such switch). Steadier than the HTTP figures on a shared machine, and it shows what auditing every
  access (issue 6) costs against the floor, which audits nothing.

Usage: python bench/api.py [--patients 20] [--workers 4] [--duration 10] [--connections 16] [--repeat 2]
                           [--worker-class gthread|sync] [--threads 4] [--auth] [--client auto|wrk|python]
                           [--in-process 1000]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from processes import Server, launch

ROOT = Path(__file__).resolve().parent
SECRET = "bench-secret-of-at-least-thirty-two-bytes!"
TARGETS = {"read": 0.60, "search": 0.40, "create": 0.15}
READ_P99_MS = 20.0


# --- the servers (this script, re-run with --serve, is the server process) ---------------------


def floor_app(database_url: str) -> Any:
    """The floor: Flask, one route, the stored bytes of one resource, nothing else."""
    from flask import Flask, Response

    from iop_fhir.store import Store

    app = Flask("floor")
    store = app.extensions["floor.store"] = Store.open(database_url)
    store.close()  # connections are opened per worker after the fork

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b"ok")

    @app.get("/floor/<resource_type>/<id>")
    def floor(resource_type: str, id: str) -> Response:
        return Response(store.read(resource_type, id).data, content_type="application/fhir+json; charset=utf-8")

    return app


def gateway_settings(database_url: str, auth: bool = False) -> dict[str, Any]:
    settings = {"DATABASE_URL": database_url, "LOG_LEVEL": "WARNING", "AUTH": "on" if auth else "off"}
    return {**settings, "JWT_SECRET": SECRET} if auth else settings


def serve(kind: str, port: int, database_url: str, workers: int, worker_class: str, threads: int, auth: bool) -> None:
    from iop_fhir.serve import build_app, gunicorn_options, run_gunicorn

    if kind == "floor":
        app = floor_app(database_url)
    else:
        app = build_app(gateway_settings(database_url, auth))
    run_gunicorn(app, gunicorn_options("127.0.0.1", port, workers, threads=threads, worker_class=worker_class))


def start(kind: str, database_url: str, args: argparse.Namespace) -> Server:
    from iop_fhir.serve import free_port

    port = free_port()
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--database-url", database_url]
    command += ["--workers", str(args.workers), "--worker-class", args.worker_class, "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOP_FHIR_")}
    return launch([*command, *(["--auth"] if args.auth else [])], port, env, label=f"{kind} server")


# --- data --------------------------------------------------------------------------------------


def load(database_url: str, patients: int, seed: int) -> tuple[list[str], list[str]]:
    """Load a cohort; return Observation ids (for reads) and patient ids (with 20+ Observations)."""
    from iop_fhir.generate import generate_cohort
    from iop_fhir.serve import build_app, load_records

    app = build_app(gateway_settings(database_url))
    started = time.perf_counter()
    for _ in load_records(app, generate_cohort(patients, seed)):
        pass
    store = app.extensions["iop_fhir.store"]
    observations = [s.id for s in store.search("Observation", count=500).entries]
    people = [s.id for s in store.search("Patient", count=500).entries]
    searchable = [p for p in people if store.count("Observation", [("patient", f"Patient/{p}")]) >= 20]
    print(f"loaded {patients} records in {time.perf_counter() - started:.1f} s: "
          f"{store.count('Observation')} Observations, {len(people)} patients ({len(searchable)} with 20+ Observations)")  # fmt: skip
    store.close()
    return observations, searchable


def new_observation(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6", "display": "PHQ-9 total score"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2026-02-03T10:00:00Z",
        "valueInteger": 11,
    }


# --- in process ----------------------------------------------------------------------------------


def in_process(database_url: str, scenarios: dict[str, tuple[str, list[str], bytes | None]], count: int) -> None:
    """Print the CPU per request of each scenario called straight on the apps, as served and
    with the audit trail's work taken out (see the module doc)."""
    from unittest import mock

    from werkzeug.test import EnvironBuilder

    from iop_fhir.api import STORE_KEY, disclosure
    from iop_fhir.api.disclosure import GATE_KEY
    from iop_fhir.serve import build_app

    apps = {"floor": floor_app(database_url), "gateway": build_app(gateway_settings(database_url))}
    audit = apps["gateway"].extensions[GATE_KEY].audit
    # as serve.run_gunicorn does before its workers fork: the loaded code's objects out of the
    # collector's reach (without it, full collections cost a read about a sixth more CPU here)
    gc.collect()
    gc.freeze()

    def cpu_ms(name: str) -> float:
        method, paths, data = scenarios[name]
        app = apps["floor" if name == "floor" else "gateway"]
        environs = []
        for path in paths[:200]:
            where, _, query = path.partition("?")
            built = EnvironBuilder(method=method, path=where, query_string=query, data=data, content_type="application/fhir+json" if data else None)
            environs.append(built.get_environ())
        n = count if method == "GET" else max(1, count // 4)

        def call(i: int) -> None:
            environ = dict(environs[i % len(environs)])
            if data is not None:
                environ["wsgi.input"] = io.BytesIO(data)
            status: list[str] = []
            answer = app(environ, lambda s, h, e=None: status.append(s))
            b"".join(answer)
            answer.close()  # as a WSGI server does
            if not status[0].startswith("2"):
                raise SystemExit(f"in process, {name}: {method} {paths[i % len(paths)]} answered {status[0]}")

        for i in range(min(50, n)):  # warm-up
            call(i)
        audit.flush()
        # the queued events of earlier runs indexed now, or an unaudited run (which records
        # nothing, so its process looks idle) would pay for indexing them
        audit.store.index_appended()
        started = time.process_time()
        for i in range(n):
            call(i)
        audit.flush()  # what the flusher's thread still holds is part of these requests' cost
        return (time.process_time() - started) / n * 1e3

    rows: list[tuple[str, float, float | None]] = []
    for name in scenarios:
        served = cpu_ms(name)
        if name == "floor":
            rows.append((name, served, None))
            continue
        # what each request does for its AuditEvent: note what it touched, build and record
        # the event (after the response, or in the write's unit of work)
        with (
            mock.patch.object(disclosure, "note", lambda *_a, **_k: None),
            mock.patch.object(disclosure, "audit_write", lambda *_a, **_k: None),
            mock.patch.object(disclosure, "_audited", lambda _path: False),
        ):
            rows.append((name, served, cpu_ms(name)))
    audit.close()
    for app in apps.values():
        for key in (STORE_KEY, "floor.store"):
            if key in app.extensions:
                app.extensions[key].close()
    floor = rows[0][1]
    print(f"\nin process ({count} requests each, creates a quarter of that; no server, no socket, auth off): CPU per request")
    print(f"{'scenario':<10}{'ms':>8}{'floor/ms':>10}{'no audit ms':>13}{'floor/ms':>10}{'audit share':>13}")
    for name, served, bare in rows:
        if bare is None:
            print(f"{name:<10}{served:>8.3f}{'100%':>10}")
        else:
            print(f"{name:<10}{served:>8.3f}{floor / served:>10.0%}{bare:>13.3f}{floor / bare:>10.0%}{1 - bare / served:>13.0%}")
    print()


# --- load generators ---------------------------------------------------------------------------


@dataclass
class Figures:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    indexed_after: float = 0.0  # seconds the gateway then spent indexing the run's audit events

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_WRK_SCRIPT = """
local paths = {%(paths)s}
local i = math.random(#paths)
wrk.method = "%(method)s"
%(setup)s
request = function()
  i = i %% #paths + 1
  return wrk.format(nil, paths[i])
end
"""


def run_wrk(base: str, method: str, paths: list[str], body: bytes | None, headers: dict[str, str], args: argparse.Namespace, seconds: float) -> Figures:
    lines = [f'wrk.headers["{k}"] = {json.dumps(v)}' for k, v in headers.items()]
    if body is not None:
        lines.append(f"wrk.body = {json.dumps(body.decode())}")
    script = _WRK_SCRIPT % {"paths": ", ".join(json.dumps(p) for p in paths), "method": method, "setup": "\n".join(lines)}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        threads = min(2, args.connections)
        command = ["wrk", f"-t{threads}", f"-c{args.connections}", f"-d{seconds:.0f}s", "--latency", "--timeout", "5s", "-s", handle.name, base]
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    finally:
        os.unlink(handle.name)
    total = int(re.search(r"(\d+) requests in ([\d.]+)(m?s)", out).group(1))
    duration_match = re.search(r"requests in ([\d.]+)(ms|s|m)", out)
    duration = float(duration_match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[duration_match.group(2)]
    errors = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out.split("Socket errors:")[1].splitlines()[0])) if "Socket errors:" in out else 0
    return Figures(total, duration, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"), errors)


def _wrk_ms(out: str, percentile: str) -> float:
    value, unit = re.search(rf"^\s*{re.escape(percentile)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _python_client(job: tuple[str, str, list[str], bytes | None, dict[str, str], int, float]) -> tuple[list[float], int]:
    """One process of the Python load generator: ``connections`` threads, a Session each."""
    import threading

    base, method, paths, body, headers, connections, until = job
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def loop(offset: int) -> None:
        session = requests.Session()
        mine, failed, i = [], 0, offset
        while time.monotonic() < until:
            i += 1
            started = time.perf_counter()
            response = session.request(method, base + paths[i % len(paths)], data=body, headers=headers, timeout=5)
            mine.append(time.perf_counter() - started)
            failed += response.status_code >= 400
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=loop, args=(random.randrange(len(paths)),)) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def run_python(base: str, method: str, paths: list[str], body: bytes | None, headers: dict[str, str], args: argparse.Namespace, seconds: float) -> Figures:
    from multiprocessing import Pool

    processes = 2
    started = time.monotonic()
    until = started + seconds
    jobs = [(base, method, paths, body, headers, args.connections // processes + (i < args.connections % processes), until) for i in range(processes)]
    with Pool(processes) as pool:
        results = pool.map(_python_client, jobs)
    elapsed = time.monotonic() - started
    latencies = sorted(x for lat, _ in results for x in lat)
    if not latencies:
        return Figures(0, elapsed, 0.0, 0.0, 0)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return Figures(len(latencies), elapsed, pick(0.50), pick(0.99), sum(e for _, e in results))


# --- the run -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2 * (os.cpu_count() or 1))
    parser.add_argument("--worker-class", default="gthread", choices=["sync", "gthread"])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario (after a 2 s warm-up)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of every scenario; the best round counts")
    parser.add_argument("--auth", action="store_true", help="run the gateway with auth on (HS256 tokens)")
    parser.add_argument("--client", default="auto", choices=["auto", "wrk", "python"])
    parser.add_argument("--only", default="", help="comma-separated scenarios (read,search,create)")
    parser.add_argument("--in-process", type=int, default=1000, help="requests per scenario in process, first (0: skip)")
    parser.add_argument("--serve", choices=["gateway", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process < 0:
        parser.error("--in-process: a number of requests, 0 or more")
    if args.serve:
        serve(args.serve, args.port, args.database_url, args.workers, args.worker_class, args.threads, args.auth)
        return

    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    run = run_wrk if use_wrk else run_python
    folder = Path(tempfile.mkdtemp(prefix="iop-fhir-bench-"))
    servers: list[Server] = []
    try:
        database_url = f"sqlite:///{folder / 'bench.sqlite'}"
        observations, patients = load(database_url, args.patients, args.seed)
        if len(patients) < 2:
            raise SystemExit("fewer than 2 patients have 20 Observations; use more --patients")
        writer = patients.pop()  # creates go to a patient the searches leave out
        headers = {"Accept": "application/fhir+json"}
        if args.auth:
            import jwt

            claims = {"client_id": "bench", "scope": "system/*.cruds", "exp": int(time.time()) + 3600}
            headers["Authorization"] = "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")
        body = json.dumps(new_observation(writer)).encode()
        requested: dict[str, tuple[str, list[str], bytes | None]] = {
            "floor": ("GET", [f"/floor/Observation/{i}" for i in observations], None),
            "read": ("GET", [f"/fhir/Observation/{i}" for i in observations], None),
            "search": ("GET", [f"/fhir/Observation?patient={p}&_count=20" for p in patients], None),
            "create": ("POST", ["/fhir/Observation"], body),
        }
        wanted = {"floor", *(args.only.split(",") if args.only else ("read", "search", "create"))}
        if args.in_process:
            in_process(database_url, {n: found for n, found in requested.items() if n in wanted}, args.in_process)
        gateway = start("gateway", database_url, args)
        floor = start("floor", database_url, args)
        servers = [gateway, floor]
        scenarios = {n: (floor.base if n == "floor" else gateway.base, *found) for n, found in requested.items()}
        for name, (base, method, paths, data) in scenarios.items():
            sample = requests.request(method, base + paths[0], data=data, headers={**headers, "Content-Type": "application/fhir+json"}, timeout=10)
            if sample.status_code >= 400:
                raise SystemExit(f"{name}: {method} {paths[0]} answered {sample.status_code}: {sample.text[:300]}")
        print(f"load generator: {'wrk (2 threads)' if use_wrk else 'Python (2 processes of threads, requests sessions)'}; "
              f"{args.connections} connections; gunicorn {args.worker_class} x {args.workers} workers"
              f"{f' x {args.threads} threads' if args.worker_class == 'gthread' else ''}; auth {'on' if args.auth else 'off'}; "
              f"{args.duration:.0f} s per scenario on {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
        results: dict[str, Figures] = {}
        # Every scenario, the floor included, runs --repeat rounds, interleaved, and its best
        # round counts: on a shared machine a single run can land in a busy moment, and
        # treating the floor and the gateway alike keeps the ratios honest either way.
        for _round in range(args.repeat):
            for name in (n for n in scenarios if n in wanted):
                base, method, paths, data = scenarios[name]
                send = {**headers, "Content-Type": "application/fhir+json"} if data else headers
                if name not in results:
                    run(base, method, paths, data, send, args, 2)  # warm-up: every worker imports and caches
                figures = run(base, method, paths, data, send, args, args.duration)
                figures.indexed_after = wait_until_indexed(database_url)
                if name not in results or figures.rate > results[name].rate:
                    results[name] = figures
        report(results)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def wait_until_indexed(database_url: str, limit: float = 300.0) -> float:
    """Wait until the gateway has indexed every audit event a run left queued (it does so when
    idle: privacy/audit.py), so each run starts from the same state and the deferred work is
    shown, not hidden; returns the seconds it took."""
    from iop_fhir.store import Store

    store = Store.open(database_url)
    started = time.perf_counter()
    try:
        while store.appended_backlog() and time.perf_counter() - started < limit:
            time.sleep(0.2)
    finally:
        store.close()
    return time.perf_counter() - started


def report(results: dict[str, Figures]) -> None:
    floor = results["floor"].rate
    print("\n(indexed s: how long the gateway, idle, then took to index the run's queued AuditEvents)")
    print(f"\n{'scenario':<10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}{'/ floor':>9}{'target':>9}  ok  {'indexed s':>9}")
    for name, figures in results.items():
        ratio = figures.rate / floor if floor else 0.0
        target = TARGETS.get(name)
        ok = "" if target is None else "yes" if ratio >= target else "NO"
        if name == "read" and figures.p99_ms >= READ_P99_MS:
            ok = "NO (p99)"
        target_text = f"{target:.0%}" if target is not None else ""
        print(f"{name:<10}{figures.rate:>10.0f}{figures.p50_ms:>10.2f}{figures.p99_ms:>10.2f}{figures.errors:>8}{ratio:>9.0%}{target_text:>9}  {ok:<8}{figures.indexed_after:>6.1f}")


if __name__ == "__main__":
    main()
