"""The iop-fhir command: each command end to end through click, errors as messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from iop_fhir.cli import main

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "fixtures" / "iop" / "example-dual-diagnosis.json"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_every_command_has_help_with_an_example(runner):
    for name, command in main.commands.items():
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example:" in result.output, f"{name} --help lacks an example"


def test_schema_prints_the_contract(runner):
    result = runner.invoke(main, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"] == "IOP record (iop-record/1)"


def test_generate_is_deterministic(runner):
    one = runner.invoke(main, ["generate", "--patients", "3", "--seed", "5"])
    two = runner.invoke(main, ["generate", "--patients", "3", "--seed", "5"])
    assert one.exit_code == 0 and one.stdout_bytes == two.stdout_bytes
    assert len(one.stdout_bytes.splitlines()) == 3


def test_convert_one_record_gives_one_bundle(runner):
    result = runner.invoke(main, ["convert", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    bundle = json.loads(result.stdout)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"


def test_convert_and_back_through_files(runner, tmp_path):
    cohort, bundles, back = tmp_path / "c.ndjson", tmp_path / "b.ndjson", tmp_path / "r.ndjson"
    assert runner.invoke(main, ["generate", "-n", "4", "-s", "2", "-o", str(cohort)]).exit_code == 0
    result = runner.invoke(main, ["convert", str(cohort), "-o", str(bundles)])
    assert result.exit_code == 0, result.output
    assert len(bundles.read_text().splitlines()) == 4
    result = runner.invoke(main, ["convert", str(bundles), "--reverse", "-o", str(back)])
    assert result.exit_code == 0, result.output
    originals = [json.loads(line) for line in cohort.read_text().splitlines()]
    rebuilt = [json.loads(line) for line in back.read_text().splitlines()]
    from iop_fhir.record import validate_record

    assert [validate_record(r) for r in rebuilt] == [validate_record(r) for r in originals]


def test_one_bad_record_stops_nothing(runner, tmp_path):
    good = json.loads(EXAMPLE.read_text())
    bad = json.loads(EXAMPLE.read_text())
    bad["prescriptions"][2]["refills"] = 9
    source = tmp_path / "mixed.ndjson"
    source.write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    result = runner.invoke(main, ["convert", str(source)])
    assert result.exit_code == 1
    assert len(result.stdout.splitlines()) == 2
    assert "item 1 (ep-2026-0042): error: /prescriptions/2/refills" in result.stderr
    assert "Traceback" not in result.output


def test_convert_stdin_array(runner):
    data = json.dumps([json.loads(EXAMPLE.read_text())])
    result = runner.invoke(main, ["convert", "-"], input=data)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["type"] == "transaction"


def test_not_json_is_a_message(runner, tmp_path):
    source = tmp_path / "x.json"
    source.write_text("{not json")
    result = runner.invoke(main, ["convert", str(source)])
    assert result.exit_code != 0 and "not JSON" in result.output
    assert "Traceback" not in result.output


def test_missing_file_is_a_message(runner, tmp_path):
    result = runner.invoke(main, ["validate", str(tmp_path / "nope.json")])
    assert result.exit_code == 1 and "cannot read" in result.output


def test_validate_reports_pointer_and_exit_status(runner, tmp_path):
    record = json.loads(EXAMPLE.read_text())
    record["assessments"][0]["total"] = 3
    source = tmp_path / "r.json"
    source.write_text(json.dumps(record, indent=2))
    result = runner.invoke(main, ["validate", str(source)])
    assert result.exit_code == 1
    assert "/assessments/0/total" in result.stderr


def test_validate_fhir_resources(runner, tmp_path):
    source = tmp_path / "r.ndjson"
    source.write_text(
        json.dumps({"resourceType": "Patient", "id": "p1", "gender": "female"})
        + "\n"
        + json.dumps({"resourceType": "Patient", "id": "p2", "gender": "sometimes"})
        + "\n"
    )
    result = runner.invoke(main, ["validate", str(source)])
    assert result.exit_code == 1
    assert "1 valid, 1 invalid" in result.stderr
    assert "gender" in result.stderr


def test_xml_output_single_and_many(runner, tmp_path):
    result = runner.invoke(main, ["convert", str(EXAMPLE), "--format", "xml"])
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes.lstrip().startswith(b"<")
    cohort = tmp_path / "c.ndjson"
    runner.invoke(main, ["generate", "-n", "2", "-o", str(cohort)])
    assert runner.invoke(main, ["convert", str(cohort), "--format", "xml"]).exit_code != 0  # needs a directory
    out = tmp_path / "xml"
    out.mkdir()
    result = runner.invoke(main, ["convert", str(cohort), "--format", "xml", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.xml"))) == 2


def test_xml_reverse_round_trip(runner, tmp_path):
    xml = tmp_path / "b.xml"
    xml.write_bytes(runner.invoke(main, ["convert", str(EXAMPLE), "--format", "xml"]).stdout_bytes)
    result = runner.invoke(main, ["convert", str(xml), "--format", "xml", "--reverse"])
    assert result.exit_code == 0, result.output
    from iop_fhir.record import validate_record

    assert validate_record(json.loads(result.stdout)) == validate_record(json.loads(EXAMPLE.read_text()))
