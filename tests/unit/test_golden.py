"""Fresh conversions equal the committed golden bundles byte for byte (README: regenerate)."""

from __future__ import annotations

import json
from pathlib import Path

from iop_fhir.convert import convert_record
from iop_fhir.formats import fhir_json
from iop_fhir.generate import generate_cohort

ROOT = Path(__file__).resolve().parents[2]
HINT = "mapping output changed: regenerate the golden files as the README says, and review the diff"


def test_example_bundle_is_unchanged():
    record = json.loads((ROOT / "fixtures/iop/example-dual-diagnosis.json").read_text())
    bundle = convert_record(record).output
    expected = (ROOT / "fixtures/fhir/example-dual-diagnosis.bundle.json").read_bytes()
    assert fhir_json.dumps(bundle, pretty=True) + b"\n" == expected, HINT


def test_generated_cohort_and_its_bundles_are_unchanged():
    lines = (ROOT / "fixtures/iop/cohort-seed7.ndjson").read_text().splitlines()
    assert [json.loads(line) for line in lines] == list(generate_cohort(5, 7)), "generator output changed"
    bundles = (ROOT / "fixtures/fhir/cohort-seed7.bundles.ndjson").read_bytes().splitlines()
    fresh = [fhir_json.dumps(convert_record(json.loads(line)).output) for line in lines]
    assert fresh == bundles, HINT
