"""The ``iop-fhir`` command line: thin over the library, errors as messages, never tracebacks.

Each command reads, calls one library function per item, and reports; one bad record stops
nothing, and the exit status is 1 when any item failed (2 for usage errors, as click does).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import click

from iop_fhir import __version__
from iop_fhir.errors import IopFhirError, Issue

PROGRESS_THRESHOLD = 20  # records before a progress bar is worth showing


def _issue_lines(issues: Iterable[Issue], prefix: str) -> Iterator[str]:
    for issue in issues:
        yield f"{prefix}{issue.severity}: {issue.location or '/'}: {issue.message}"


def _progress(items: Iterable[Any], label: str, total: int | None = None) -> Iterable[Any]:
    """A progress bar on an interactive stderr, nothing otherwise (pipes and CI stay clean)."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="rec", total=total, file=sys.stderr, mininterval=0.5, leave=False)


def _open_input(path: str) -> IO[str]:
    if path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")  # noqa: SIM115 - closed by the caller's context
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None


class _Output:
    """Where results go: stdout, a file, or (XML, several records) a directory of files."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.stream: IO[bytes] | None = None

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None and self.path not in (None, "-"):
            self.stream.close()

    def binary(self) -> IO[bytes]:
        if self.stream is None:
            if self.path in (None, "-"):
                self.stream = sys.stdout.buffer
            else:
                try:
                    self.stream = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__
                except OSError as exc:
                    raise click.ClickException(f"cannot write {self.path}: {exc.strerror}") from None
        return self.stream


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iop-fhir")
def main() -> None:
    """IOP records <-> FHIR R4: convert, validate, generate test data.

    Example: iop-fhir generate --patients 5 --seed 1 | iop-fhir convert - -o bundles.ndjson
    """


@main.command()
@click.option("--patients", "-n", type=click.IntRange(min=1), default=10, show_default=True, help="How many records.")
@click.option("--seed", "-s", type=int, default=1, show_default=True, help="Same seed, same output.")
@click.option("--out", "-o", default="-", show_default=True, help="File to write (JSON lines), - for stdout.")
def generate(patients: int, seed: int, out: str) -> None:
    """Write a synthetic cohort of IOP records as JSON lines.

    Mental-health, substance-use and dual-diagnosis clients with prescriptions, reviews,
    adherence, assessments, drug screens, sessions, care plans, discharges and consents.

    Example: iop-fhir generate --patients 100 --seed 7 --out cohort.ndjson
    """
    from iop_fhir.generate import generate_cohort

    with _Output(out) as output:
        stream = output.binary()
        for record in _progress(generate_cohort(patients, seed), "generate", total=patients):
            stream.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")


@main.command()
def schema() -> None:
    """Print the JSON Schema of the IOP record contract (iop-record/1).

    Example: iop-fhir schema > iop-record-1.schema.json
    """
    from iop_fhir.record import record_json_schema

    click.echo(json.dumps(record_json_schema(), indent=2))


@main.command()
@click.argument("file")
def validate(file: str) -> None:
    """Check IOP records or FHIR resources (one object, an array, or JSON lines).

    Each item is reported with its index and the JSON pointer (records) or FHIR path
    (resources) of every problem; the exit status is 1 if any item is invalid.

    Example: iop-fhir validate cohort.ndjson
    """
    from iop_fhir.convert import check_item

    failed = total = 0
    with _open_input(file) as stream:
        for index, item in _read_items(stream):
            outcome = check_item(item, index)
            total += 1
            if not outcome.ok:
                failed += 1
                for line in _issue_lines(outcome.issues, f"item {index}{_label(outcome.label)}: "):
                    click.echo(line, err=True)
    click.echo(f"{total - failed} valid, {failed} invalid", err=True)
    if failed:
        sys.exit(1)


def _label(label: str) -> str:
    return f" ({label})" if label else ""


def _read_items(stream: IO[str]) -> Iterator[tuple[int, Any]]:
    from iop_fhir.convert import iter_json_items

    try:
        yield from iter_json_items(stream)
    except IopFhirError as exc:
        raise click.ClickException(exc.message) from None


@main.command()
@click.argument("source")
@click.option("-o", "--out", default="-", show_default=True, help="Output file, - for stdout; a directory for several XML bundles.")
@click.option("--format", "fmt", type=click.Choice(["json", "xml"]), default="json", show_default=True, help="FHIR wire format.")
@click.option("--reverse", is_flag=True, help="Read FHIR bundles and write IOP records.")
@click.option("--no-validate", is_flag=True, help="Skip checking the output against FHIR R4 (faster; for trusted pipelines).")
def convert(source: str, out: str, fmt: str, reverse: bool, no_validate: bool) -> None:
    """Convert IOP records to FHIR R4 transaction Bundles, or back with --reverse.

    SOURCE is a file or - for stdin: one JSON object, a JSON array, or JSON lines (for
    --reverse with --format xml, one FHIR XML Bundle). One record gives one Bundle; several
    give JSON lines, one Bundle per line (with --format xml: one file per record in the -o
    directory). A bad record is reported with its index and JSON pointer and the rest go on;
    the exit status is 1 if any failed.

    Example: iop-fhir convert cohort.ndjson -o bundles.ndjson
    """
    from iop_fhir.convert import convert_record, reverse_bundle

    with _open_input(source) as stream:
        items = _read_reverse_xml(stream) if reverse and fmt == "xml" else _read_items(stream)
        work = (
            reverse_bundle(item, index) if reverse else convert_record(item, index, validate_output=not no_validate)
            for index, item in items
        )
        failed = 0
        with _Output(out) as output:
            writer = _ResultWriter(output, fmt, reverse)
            for outcome in _progress(work, "convert"):
                if reverse:
                    # Mapping notes (what did not map) are worth seeing even when the record came through.
                    for line in _issue_lines((i for i in outcome.issues if i.severity != "information"), f"item {outcome.index}: "):
                        click.echo(line, err=True)
                if not outcome.ok:
                    failed += 1
                    if not reverse:
                        for line in _issue_lines(outcome.issues, f"item {outcome.index}{_label(outcome.label)}: "):
                            click.echo(line, err=True)
                    continue
                writer.write(outcome)
            writer.close()
    if failed:
        click.echo(f"{failed} item(s) failed", err=True)
        sys.exit(1)


def _read_reverse_xml(stream: IO[str]) -> Iterator[tuple[int, Any]]:
    from iop_fhir.formats import fhir_xml

    try:
        yield 0, fhir_xml.from_xml(stream.read().encode("utf-8"))
    except IopFhirError as exc:
        yield 0, exc


class _ResultWriter:
    """Writes results as they come: one result pretty-printed, several as JSON lines.

    The first result is held back until a second arrives (or the input ends), because only
    then is it known whether the output is one document or a stream. XML has no lines, so
    several XML bundles go to files in the ``-o`` directory, one per record.
    """

    def __init__(self, output: _Output, fmt: str, reverse: bool) -> None:
        self.output, self.xml = output, fmt == "xml" and not reverse
        self.held: Any = None
        self.count = 0

    def write(self, outcome: Any) -> None:
        self.count += 1
        if self.count == 1:
            self.held = outcome
            return
        if self.held is not None:
            self._one_of_many(self.held)
            self.held = None
        self._one_of_many(outcome)

    def close(self) -> None:
        if self.held is None:
            return
        if self.xml and self._directory() is not None:
            self._one_of_many(self.held)
        else:
            self.output.binary().write(self._bytes(self.held.output, pretty=True) + b"\n")

    def _directory(self) -> Path | None:
        path = self.output.path
        return Path(path) if path not in (None, "-") and Path(path).is_dir() else None

    def _one_of_many(self, outcome: Any) -> None:
        if not self.xml:
            self.output.binary().write(self._bytes(outcome.output, pretty=False) + b"\n")
            return
        directory = self._directory()
        if directory is None:
            raise click.ClickException("several records in XML need -o DIRECTORY (one XML Bundle per record)")
        (directory / f"{outcome.label or outcome.index}.xml").write_bytes(self._bytes(outcome.output, pretty=False))

    def _bytes(self, document: dict[str, Any], *, pretty: bool) -> bytes:
        if self.xml:
            from iop_fhir.formats import fhir_xml

            return fhir_xml.to_xml(document)
        from iop_fhir.formats import fhir_json

        return fhir_json.dumps(document, pretty=pretty)


def _server_app(overrides: dict[str, Any]) -> Any:
    """The gateway app for serving, with library errors (configuration, database) as messages."""
    from iop_fhir.serve import build_app

    try:
        return build_app(overrides)
    except IopFhirError as exc:
        raise click.ClickException(exc.message) from None


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--workers", "-w", type=click.IntRange(min=1), default=None, help="Worker processes  [default: 2 per core].")
@click.option("--dev", is_flag=True, help="Flask's development server (one process) instead of gunicorn.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML settings file (as IOP_FHIR_CONFIG).")
def serve(host: str, port: int, workers: int | None, dev: bool, config_file: str | None) -> None:
    """Run the gateway: FHIR R4 under /fhir, IOP records under /iop, /healthz and /readyz.

    A production WSGI server (gunicorn) with several worker processes; settings come from
    IOP_FHIR_* environment variables and the TOML file named by --config or IOP_FHIR_CONFIG.
    Stops gracefully on Ctrl-C or SIGTERM.

    Example: IOP_FHIR_JWT_SECRET=... iop-fhir serve --port 8080 --workers 4
    """
    from iop_fhir.serve import default_workers, gunicorn_options, run_dev, run_gunicorn

    app = _server_app({"CONFIG_FILE": config_file} if config_file else {})
    if dev:
        run_dev(app, host, port)
    else:
        run_gunicorn(app, gunicorn_options(host, port, workers or default_workers()))


@main.command()
@click.option("--patients", "-n", type=click.IntRange(min=1), default=20, show_default=True, help="Synthetic clients to load.")
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port on 127.0.0.1 (0: any free one).")
@click.option("--seed", "-s", type=int, default=1, show_default=True, help="Same seed, same cohort.")
def demo(patients: int, port: int, seed: int) -> None:
    """Serve a sample gateway on 127.0.0.1 loaded with a synthetic cohort, auth off.

    Generates the cohort, loads it into a fresh SQLite file (removed on exit) through
    POST /iop/records, prints the base URL and curl commands to try, then serves until Ctrl-C.
    Development only: anyone on this machine can read and write it.

    Example: iop-fhir demo --patients 50 --port 8080
    """
    import shutil
    import tempfile

    from iop_fhir.serve import default_workers, free_port, gunicorn_options, prepare_demo, run_gunicorn

    port = port or free_port()
    folder = tempfile.mkdtemp(prefix="iop-fhir-demo-")
    try:
        try:
            demo = prepare_demo(folder, patients, seed, port, progress=lambda items: _progress(items, "load", total=patients))
        except IopFhirError as exc:
            for line in _issue_lines(exc.issues, "  "):
                click.echo(line, err=True)
            raise click.ClickException(exc.message) from None
        click.echo(f"Loaded {demo.records} IOP records ({demo.resources} resources) into {demo.database}")
        click.echo(f"FHIR base: {demo.base}/fhir   (authentication is OFF: development only)\n")
        for what, command in demo.examples:
            click.echo(f"# {what}\n{command}\n")
        click.echo("Ctrl-C stops the demo and removes its database.")
        run_gunicorn(demo.app, gunicorn_options("127.0.0.1", port, min(default_workers(), 4)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- sync: the delivery worker and the queue ------------------------------------------------------


class _SyncContext:
    """What the worker and ``sync`` commands share: the settings, the destinations, the store."""

    def __init__(self) -> None:
        from iop_fhir.config import load_settings
        from iop_fhir.server import open_store
        from iop_fhir.sync.destinations import load_destinations

        from sqlalchemy.exc import ArgumentError, SQLAlchemyError

        try:
            self.settings = load_settings()
            self.destinations = load_destinations(self.settings)
            url = self.settings["DATABASE_URL"]
            self.store = open_store(self.settings, self.destinations)
        except IopFhirError as exc:
            raise click.ClickException(exc.message) from None
        except (ArgumentError, SQLAlchemyError) as exc:  # a malformed URL or a database away: a message
            raise click.ClickException(f"cannot open the store {url!r}: {exc}") from None

    def chosen(self, names: Iterable[str]) -> dict[str, Any]:
        """The destinations named (all when none is), refusing unknown names and an empty configuration."""
        names = list(names)
        unknown = [n for n in names if n not in self.destinations]
        if unknown:
            known = ", ".join(self.destinations) or "none"
            raise click.ClickException(f"unknown destination {', '.join(map(repr, unknown))} (configured: {known})")
        if not self.destinations:
            raise click.ClickException("no destination is configured: add [[destination]] tables to the file named by IOP_FHIR_CONFIG")
        return {n: d for n, d in self.destinations.items() if not names or n in names}


@main.command()
@click.option("--once", is_flag=True, help="Drain the queue and exit (for scripts and tests) instead of running until stopped.")
@click.option("--destination", "-d", "names", multiple=True, help="Deliver only to this destination (repeatable)  [default: all].")
@click.option("--max-wait", type=click.FloatRange(min=0), default=None, help="With --once: longest wait for retries not yet due, in seconds  [default: 60].")
def worker(once: bool, names: tuple[str, ...], max_wait: float | None) -> None:
    """Deliver stored changes to the configured destinations (the outbox).

    Runs until SIGTERM or Ctrl-C (the batch in hand is finished first). Any number of workers
    may share a PostgreSQL database; on SQLite run one. With --once it drains the queue and
    exits: status 1 when deliveries are left pending or went dead.

    Example: IOP_FHIR_CONFIG=gateway.toml iop-fhir worker --once --destination ehr
    """
    import logging
    import signal
    import threading

    from iop_fhir.pharmacy.inbound import InboundOptions
    from iop_fhir.pharmacy.monitor import check_adherence
    from iop_fhir.privacy.audit import AuditLog
    from iop_fhir.sync.worker import DEFAULT_MAX_WAIT, Worker, WorkerOptions

    if max_wait is not None and not once:
        raise click.UsageError("--max-wait goes with --once")
    context = _SyncContext()
    logging.basicConfig(level=context.settings["LOG_LEVEL"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = WorkerOptions.from_settings(context.settings)
        adherence = InboundOptions.from_settings(context.settings, context.destinations.values())
    except IopFhirError as exc:
        raise click.ClickException(exc.message) from None
    chosen = context.chosen(names)

    def mat_check() -> object:  # the worker calls it every MAT_CHECK_INTERVAL seconds
        return check_adherence(context.store, adherence)

    with context.store, Worker(
        context.store, chosen, name=options.name, lease=options.lease, poll=options.poll, mat_check=mat_check,
        mat_check_interval=options.mat_check_interval, audit=AuditLog.from_settings(context.store, context.settings),
    ) as running:
        if not running.destinations:
            raise click.ClickException(f"none of {', '.join(chosen)} can be delivered to (disabled, or no channel for its kind)")
        if once:
            result = running.drain(max_wait=DEFAULT_MAX_WAIT if max_wait is None else max_wait)
            click.echo(
                f"delivered {result.delivered}, retried {result.retried}, dead {result.dead}, "
                f"left pending {result.pending} ({result.passes} passes, {result.requests} requests, {result.seconds:.1f} s)",
                err=True,
            )
            for name, count in result.left.items():
                click.echo(f"  {name}: {count} deliveries still pending", err=True)
            if result.pending or result.dead:
                sys.exit(1)
            return
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        running.run(stop)


@main.group()
def sync() -> None:
    """Look after the sync: queue status, requeue or discard dead deliveries, pull from an EHR.

    Example: iop-fhir sync status
    """


def _age(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h10m``, ``4d03h``: an age at a glance."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@sync.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (as GET /admin/sync answers).")
def sync_status(as_json: bool) -> None:
    """Show each destination's queue: queued, in flight, delivered, failed, dead, the age of the
    oldest pending delivery, the last success and the last error.

    Example: iop-fhir sync status --json
    """
    from iop_fhir.api.admin import status_rows

    context = _SyncContext()
    with context.store as store:
        rows = status_rows(context.destinations, store.outbox.stats(), store.clock())
    if as_json:
        click.echo(json.dumps({"destinations": rows}, indent=2))
        return
    if not rows:
        click.echo("no destination is configured and the queue is empty")
        return
    header = ("destination", "queued", "in flight", "delivered", "failed", "dead", "oldest pending", "last success", "last error")
    table = [header] + [
        (
            r["name"] + ("" if r["configured"] else " (not configured)") + ("" if r["enabled"] or not r["configured"] else " (disabled)"),
            *(str(r[k]) for k in ("queued", "in_flight", "delivered", "failed", "dead")),
            _age(r["oldest_pending_age_seconds"]),
            (r["last_success"] or "-")[:19].replace("T", " "),
            _shorten(r["last_error"] or "-", 60),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _dead_selection(context: _SyncContext, destination: str | None, ids: tuple[int, ...]) -> tuple[list[int] | None, str | None]:
    from iop_fhir.api.admin import selection

    body: dict[str, Any] = {}
    if destination is not None:
        body["destination"] = destination
    if ids:
        body["ids"] = list(ids)
    try:
        return selection(body, context.destinations, context.store.outbox.stats())
    except IopFhirError as exc:
        raise click.ClickException(exc.message) from None


def _select_options(command: Any) -> Any:
    """``--destination`` and ``--id``: which dead deliveries a requeue or discard takes."""
    command = click.option("--id", "ids", type=click.IntRange(min=1), multiple=True, help="Only this delivery (repeatable; ids from GET /admin/sync/deliveries?state=dead).")(command)
    return click.option("--destination", "-d", default=None, help="Only this destination's dead deliveries.")(command)


@sync.command("requeue")
@_select_options
def sync_requeue(destination: str | None, ids: tuple[int, ...]) -> None:
    """Put dead deliveries back in the queue with a fresh attempt count (all dead ones when no
    option narrows them).

    Example: iop-fhir sync requeue --destination ehr
    """
    context = _SyncContext()
    with context.store as store:
        chosen, where = _dead_selection(context, destination, ids)
        click.echo(f"requeued {store.outbox.requeue(chosen, destination=where)} dead deliveries")


@sync.command("discard")
@_select_options
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def sync_discard(destination: str | None, ids: tuple[int, ...], yes: bool) -> None:
    """Delete dead deliveries for good: they will not be delivered (the stored versions stay).
    Asks first unless --yes.

    Example: iop-fhir sync discard --destination ehr --yes
    """
    context = _SyncContext()
    with context.store as store:
        chosen, where = _dead_selection(context, destination, ids)
        if not yes:
            what = f"deliveries {', '.join(map(str, chosen))}" if chosen else "deliveries"
            scope = f" of {where}" if where else ""
            click.confirm(f"Discard the dead {what}{scope}? They will never be delivered", abort=True, err=True)
        click.echo(f"discarded {store.outbox.discard(chosen, destination=where)} dead deliveries")


@sync.command("pull")
@click.argument("destination")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sync_pull(destination: str, as_json: bool) -> None:
    """Pull what changed at DESTINATION (a FHIR EHR) for the enrolled patients, since the last pull.

    Foreign medications, dispenses, observations, conditions and allergies are stored beside the
    IOP's own, each with its source; changes to what the gateway sent are flagged as conflicts,
    never overwritten. Exits 1 when anything could not be read or stored.

    Example: iop-fhir sync pull ehr
    """
    from iop_fhir.sync.fhir_client import FhirClient
    from iop_fhir.sync.pull import pull

    context = _SyncContext()
    (chosen,) = context.chosen([destination]).values()
    with context.store as store:
        try:
            with FhirClient(chosen) as client:
                result = pull(store, chosen, client)
        except IopFhirError as exc:
            raise click.ClickException(f"pull from {destination} failed: {exc.message}") from None
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
    else:
        click.echo(
            f"{destination}: {result.patients} patients, fetched {result.fetched}, stored {result.stored}, "
            f"unchanged {result.unchanged}, new conflicts {result.conflicts}"
        )
        for line in _issue_lines(result.reported, "  "):
            click.echo(line, err=True)
    if result.errors:
        sys.exit(1)


# --- ncpdp: the pharmacy message store ----------------------------------------------------------------


@main.group()
def ncpdp() -> None:
    """Look after the NCPDP SCRIPT messages exchanged with pharmacies: list them, replay one.

    Example: iop-fhir ncpdp messages --kind RxFill
    """


@ncpdp.command("messages")
@click.option("--prescription", default=None, help="Only messages about this prescription (MedicationRequest/ID or ID).")
@click.option("--kind", default=None, help="Only this transaction (NewRx, RxFill, Status, Error, ...).")
@click.option("--after", type=click.IntRange(min=0), default=0, help="Only messages after this id (paging).")
@click.option("--limit", type=click.IntRange(min=1, max=1000), default=100, show_default=True, help="At most this many messages.")
@click.option("--json", "as_json", is_flag=True, help="Print the messages as JSON (as GET /admin/ncpdp/messages answers).")
def ncpdp_messages(prescription: str | None, kind: str | None, after: int, limit: int, as_json: bool) -> None:
    """List the kept messages in id order: id, time, direction, kind, MessageID, counterparty,
    prescription, status and detail (bodies: GET /admin/ncpdp/messages/ID).

    Example: iop-fhir ncpdp messages --prescription MedicationRequest/951f5fc2-6e5e-580b-9190-a1f7f3e7a0d6
    """
    from iop_fhir.api.ncpdp import message_row, prescription_key

    context = _SyncContext()
    with context.store as store:
        found = store.messages.list(prescription=prescription_key(prescription), kind=kind, after_id=after, limit=limit)
    rows = [message_row(m) for m in found]
    if as_json:
        click.echo(json.dumps({"messages": rows}, indent=2))
        return
    if not rows:
        click.echo("no messages")
        return
    header = ("id", "time", "dir", "kind", "message id", "counterparty", "prescription", "status", "detail")
    table = [header] + [
        (
            str(r["id"]),
            r["created"][:19].replace("T", " "),
            r["direction"],
            r["kind"],
            r["message_id"] or "-",
            r["counterparty"] or "-",
            (r["prescription"] or "-").removeprefix("MedicationRequest/"),
            r["status"],
            _shorten(r["detail"] or "-", 60),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


@ncpdp.command("replay")
@click.argument("message_id", metavar="ID", type=click.IntRange(min=1))
def ncpdp_replay(message_id: int) -> None:
    """Apply the received message ID again (ids from `iop-fhir ncpdp messages`): its fill,
    review request, cancel response, history or acknowledgement, as when it arrived. Writes are
    upserts, so only what changed since is stored again. An outbound message is not replayed:
    requeue its delivery (iop-fhir sync requeue).

    Example: iop-fhir ncpdp replay 42
    """
    from iop_fhir.pharmacy.inbound import InboundOptions, replay

    context = _SyncContext()
    with context.store as store:
        try:
            result = replay(store, message_id, InboundOptions.from_settings(context.settings, context.destinations.values()))
        except IopFhirError as exc:
            raise click.ClickException(f"message {message_id}: {exc.message}") from None
    applied = result.applied
    click.echo(f"message {message_id} ({result.kind}): {applied.status}" + (f" - {applied.detail}" if applied.detail else ""))
    for reference in applied.written:
        click.echo(f"  stored {reference}")

@ncpdp.command("check-adherence")
def ncpdp_check_adherence() -> None:
    """Look once for discharged clients whose medication-assisted treatment ran out without a new
    fill, and raise (or close) their overdue-MAT Flags, as the worker does every
    MAT_CHECK_INTERVAL seconds. Exits 1 when the check failed for a patient.

    Example: IOP_FHIR_CONFIG=gateway.toml iop-fhir ncpdp check-adherence
    """
    from iop_fhir.pharmacy.inbound import InboundOptions
    from iop_fhir.pharmacy.monitor import check_adherence

    context = _SyncContext()
    try:
        options = InboundOptions.from_settings(context.settings, context.destinations.values())
    except IopFhirError as exc:
        raise click.ClickException(exc.message) from None
    with context.store as store:
        result = check_adherence(store, options)
    click.echo(f"checked {len(result.checked)} discharged patients with MAT prescriptions: {len(result.written)} Flags written, {len(result.active)} active")
    for reference in result.active:
        click.echo(f"  active {reference}")
    for patient, why in result.failed.items():
        click.echo(f"  {patient}: not checked: {why}", err=True)
    if result.failed:
        sys.exit(1)


# --- pharmacies: medication history, and a simulated pharmacy for developers -----------------------


@ncpdp.command("history")
@click.option("--patient", "patient_id", required=True, help="The id of the Patient whose history is asked for.")
@click.option("--destination", "-d", required=True, help="The pharmacy or history network to ask (a kind = \"ncpdp\" destination).")
@click.option("--prescriber", default=None, help="The id of the Practitioner asking  [default: the patient's latest prescriber].")
def ncpdp_history(patient_id: str, destination: str, prescriber: str | None) -> None:
    """Ask a pharmacy for a patient's medication history (RxHistoryRequest) and store what it
    answers: a MedicationDispense per fill, once per fill however often it is asked. A source
    that answers later sends its RxHistoryResponse to POST /ncpdp.

    Example: iop-fhir ncpdp history --patient 10bc811d-... --destination main-street
    """
    from iop_fhir.pharmacy.history import request_history

    context = _SyncContext()
    (chosen,) = context.chosen([destination]).values()
    with context.store as store:
        try:
            result = request_history(store, chosen, patient_id, prescriber_id=prescriber)
        except IopFhirError as exc:
            for line in _issue_lines(exc.issues[1:] if len(exc.issues) > 1 else (), "  "):
                click.echo(line, err=True)
            raise click.ClickException(f"history from {destination}: {exc.message}") from None
    if result.answer != "RxHistoryResponse":
        click.echo(f"{destination} answered {result.answer} to RxHistoryRequest {result.request_id}: the history will arrive at POST /ncpdp")
        return
    click.echo(
        f"{destination}: {result.entries} history entries; stored {result.created} new, {result.updated} updated, "
        f"{result.unchanged} unchanged (RxHistoryRequest {result.request_id})"
    )
    for saved in result.saved:
        click.echo(f"  {saved.reference}")


@main.command("pharmacy-sim")
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=8095, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--gateway", default=None, help="The gateway's base URL (http://127.0.0.1:8080); fills go to GATEWAY/ncpdp  [default: kept, not sent].")
@click.option("--ncpdp-id", default=None, help="The NCPDPID it answers as (the destination's ncpdp_id)  [default: 3812746, a pharmacy of the synthetic cohort].")
@click.option("--fill-delay", type=click.FloatRange(min=0), default=2.0, show_default=True, help="Seconds from a NewRx to its RxFill (and a CancelRx to its response).")
@click.option("--partial", type=click.FloatRange(0, 1), default=0.1, show_default=True, help="Share of fills that are PartiallyDispensed.")
@click.option("--not-dispensed", type=click.FloatRange(0, 1), default=0.05, show_default=True, help="Share of fills that are NotDispensed.")
@click.option("--seed", type=int, default=None, help="Seed for which fills are partial or not dispensed  [default: random].")
@click.option("--token", default=None, help="Bearer token for the gateway's /ncpdp (when its authentication is on).")
def pharmacy_sim(port: int, host: str, gateway: str | None, ncpdp_id: str | None, fill_delay: float, partial: float, not_dispensed: float, seed: int | None, token: str | None) -> None:
    """Run a simulated pharmacy speaking NCPDP SCRIPT, for development: it answers NewRx and
    CancelRx with Status, sends RxFill (some partial or not dispensed) and CancelRxResponse to
    the gateway after --fill-delay, and answers RxHistoryRequest from the fills it made. State
    is in memory; stops on Ctrl-C or SIGTERM.

    Example: iop-fhir pharmacy-sim --port 8095 --gateway http://127.0.0.1:8080 --seed 1
    """
    import logging
    import signal
    import threading

    from iop_fhir.pharmacy.simulator import DEFAULT_NCPDP_ID, PharmacySimulator, serve

    if gateway is not None and not gateway.startswith(("http://", "https://")):
        raise click.BadParameter(f"{gateway!r} is not an http(s) URL", param_hint="--gateway")
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request: the simulator logs what matters
    try:
        simulator = PharmacySimulator(ncpdp_id or DEFAULT_NCPDP_ID, fill_delay=fill_delay, partial=partial, not_dispensed=not_dispensed, seed=seed)
    except IopFhirError as exc:
        raise click.UsageError(exc.message) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def started(url: str) -> None:
        target = f"{gateway.rstrip('/')}/ncpdp" if gateway else "nowhere (no --gateway)"
        click.echo(f"pharmacy simulator NCPDPID {simulator.ncpdp_id} listening on {url}; fills go to {target}")
        sys.stdout.flush()

    try:
        serve(simulator, host=host, port=port, gateway=gateway, token=token, stop=stop, started=started)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# --- privacy: the accounting of disclosures -----------------------------------------------------------


@main.command()
@click.option("--patient", "patient_id", required=True, help="The id of the Patient (or Patient/ID) whose disclosures are listed.")
@click.option("--since", default=None, help="Only disclosures from this date or dateTime on (2026-01-01, 2026-01-01T08:00:00Z).")
@click.option("--json", "as_json", is_flag=True, help="Print the accounting as JSON.")
def disclosures(patient_id: str, since: str | None, as_json: bool) -> None:
    """The accounting of disclosures a patient may ask for (42 CFR 2.24, HIPAA 164.528): each
    disclosure with its date, recipient, exit, what went out (types, count and ids), the
    consent it was made under, and break-the-glass marked. Read from the audit trail.

    Example: iop-fhir disclosures --patient 10bc811d-3fc4-537e-bfff-56334d78bc82 --since 2026-01-01
    """
    from iop_fhir.errors import Gone, NotFound
    from iop_fhir.privacy.audit import accounting
    from iop_fhir.store.search_index import date_range

    if since is not None and date_range(since) is None:
        raise click.BadParameter(f"{since!r} is not a date or dateTime (2026-01-01, 2026-01-01T08:00:00Z)", param_hint="--since")
    reference = patient_id if patient_id.startswith("Patient/") else f"Patient/{patient_id}"
    context = _SyncContext()
    with context.store as store:
        try:
            store.read("Patient", reference.split("/", 1)[1])
        except NotFound:
            raise click.ClickException(f"no {reference} in the store") from None
        except Gone:
            pass  # a deleted patient may still ask what was disclosed
        found = accounting(store, reference, since=since)
    if as_json:
        click.echo(json.dumps({"patient": reference, "since": since, "disclosures": [a.as_json() for a in found]}, indent=2))
        return
    click.echo(f"Accounting of disclosures for {reference}" + (f" since {since}" if since else "") + f": {len(found)}")
    for item in found:
        under = ", ".join([*item.consents, *(["break the glass"] if item.break_glass else [])]) or "no consent needed (HIPAA)"
        click.echo(f"{item.recorded}  to {item.recipient} (client {item.client})  via {item.exit}  for {item.purpose or '-'}  under {under}")
        counts = ", ".join(f"{n} {t}" for t, n in item.counts().items())
        click.echo(f"  {len(item.resources)} resource(s): {counts}")
        if item.break_glass:
            click.echo("  BREAK THE GLASS: disclosed without consent in a medical emergency")
        for reference_text in item.resources:
            click.echo(f"    {reference_text}")


if __name__ == "__main__":  # pragma: no cover
    main()
