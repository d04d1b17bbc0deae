"""The derived Provenance."""

from __future__ import annotations

import datetime as dt

import pytest
from strategies import reverse, with_parts

from iop_fhir import terminology
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers import condition, organization, patient, provenance
from iop_fhir.mappers.context import MappingContext


def test_example_provenance(example_record):
    ctx = MappingContext(example_record)
    resources = organization.to_fhir(ctx) + patient.to_fhir(ctx) + condition.to_fhir(ctx)
    (result,) = provenance.to_fhir(ctx, resources)
    assert validate_resource(result) == []
    assert result["meta"]["profile"] == [terminology.us_core("us-core-provenance")]
    assert result["target"] == [{"reference": f"urn:uuid:{r['id']}"} for r in resources]
    # the latest event: the discharge on 2026-02-27; the consent valid until 2027-02-20 and
    # the follow-up due 2026-03-04 look ahead and do not count
    assert result["recorded"] == "2026-02-27T00:00:00Z"
    author, transmitter = result["agent"]
    assert author == {"type": {"coding": [{"system": terminology.PROVENANCE_PARTICIPANT, "code": "author", "display": "Author"}]}, "who": ctx.organization}
    assert transmitter["type"]["coding"][0]["code"] == "transmitter" and transmitter["who"] == ctx.organization


def test_recorded_is_deterministic_and_in_utc(example_json):
    record = with_parts(example_json)  # program, client, enrolment only: the enrolment start/end
    assert provenance.as_of(record) == dt.datetime(2026, 2, 27, tzinfo=dt.timezone.utc)
    sessions = [{"id": "s1", "start": "2026-02-26T23:30:00-05:00", "kind": "group", "attendance": "attended", "minutes": 60}]
    later = with_parts(example_json, sessions=sessions)
    (result,) = provenance.to_fhir(MappingContext(later), [{"id": "x"}])
    assert result["recorded"] == "2026-02-27T04:30:00Z"
    assert provenance.to_fhir(MappingContext(later), [{"id": "x"}]) == [result]


def test_nothing_to_target_gives_no_provenance(example_record):
    assert provenance.to_fhir(MappingContext(example_record), []) == []


@pytest.mark.parametrize("resources", [[], [{"resourceType": "Provenance", "target": "everything", "recorded": 5}]])
def test_reading_back_does_nothing_and_never_crashes(resources):
    draft, report = reverse(resources, provenance)
    assert draft == {} and report.issues == []
