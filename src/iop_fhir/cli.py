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


if __name__ == "__main__":  # pragma: no cover
    main()
