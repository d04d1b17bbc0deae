"""Hypothesis strategies for whole, valid IOP records.

A record is a web of cross-references and rules (dates inside the episode, review chains,
controlled-substance limits, assessment totals), which random field values almost never
satisfy. So a draw starts from a generated record (any seed, any index: a realistic
skeleton) and then varies what can vary without breaking the rules: free text (any Unicode,
XML-special characters), optional fields present or absent, time-zone offsets, measured
decimals. Draws that still break a rule are discarded with ``assume``.

The last section serves the mapper tests of one record part (parties, diagnoses, consents):
strategies for parties (names, addresses, contacts, NPIs, DEA numbers) and the helpers that
build a record around a part and map it there and back.
"""

from __future__ import annotations

import copy
import datetime as dt
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from iop_fhir.errors import RecordInvalid
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.generate import generate_record
from iop_fhir.mappers.context import MappingContext, ResourceIndex
from iop_fhir.mappers.report import MappingReport
from iop_fhir.record import IopRecord, validate_record
from iop_fhir.record.validate import dea_is_valid, npi_is_valid



def texts(max_size: int = 40) -> st.SearchStrategy[str]:
    """Text users type, as the contract admits it: any Unicode but surrogates and control
    characters, with a visible character, plus the strings that break naive XML/JSON writers."""
    typed = st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2028\u2029"),
        min_size=1,
        max_size=max_size,
    ).filter(lambda s: bool(s.strip()) and not s.isspace() and any(not c.isspace() for c in s))
    return typed | st.sampled_from(["<b>&amp;</b>", "a < b & c > d", "\"quoted\" 'single'", "Zoë Ñúñez", "日本語", "tab\tand\nnewline"])


TEXT = texts()

OFFSETS = st.sampled_from([0, -6 * 60, -5 * 60, 60, 5 * 60 + 30, -9 * 60 - 30])

OPTIONAL_PATHS = [
    ("client", "gender_identity"), ("client", "contact"), ("client", "address"),
    ("enrolment", "referral_source"), ("enrolment", "planned_end"),
    ("program", "address"), ("program", "contact"), ("program", "npi"),
]


def _texts(record: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(container, key) of every free-text field a draw may rewrite."""
    places: list[tuple[Any, Any]] = []
    for rx in record.get("prescriptions", []):
        places += [(rx, k) for k in ("instructions", "status_reason", "as_needed_reason") if k in rx]
    for group, keys in (("medication_reviews", ("reason",)), ("adherence", ("note",)), ("side_effects", ("effect",))):
        for item in record.get(group, []):
            places += [(item, k) for k in keys if k in item]
    if plan := record.get("care_plan"):
        places += [(plan, "summary")] if "summary" in plan else []
        places += [(g, "description") for g in plan.get("goals", [])]
        places += [(a, "description") for a in plan.get("activities", [])]
        places += [(plan["relapse_prevention"], i) for i in range(len(plan.get("relapse_prevention", [])))]
    if discharge := record.get("discharge"):
        places += [(discharge, "summary")] if "summary" in discharge else []
        if after := discharge.get("aftercare"):
            places += [(after, "instructions")] if "instructions" in after else []
            places += [(m, "note") for m in after.get("medications", []) if "note" in m]
    places += [(record["client"]["name"], "family"), (record["program"], "name")]
    places += [(d, "display") for d in record.get("diagnoses", []) if "display" in d]
    return places


def _shift_offset(value: str, minutes: int) -> str:
    """The same wall-clock time written with another UTC offset."""
    moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    local = moment.replace(tzinfo=dt.timezone(dt.timedelta(minutes=minutes)))
    return local.isoformat()


@st.composite
def record_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A valid record as JSON (a dict), varied beyond what the generator writes."""
    record = copy.deepcopy(generate_record(draw(st.integers(0, 10_000)), draw(st.integers(0, 2**16))))
    for container, key in _texts(record):
        if draw(st.booleans()):
            container[key] = draw(TEXT)
    for part, key in OPTIONAL_PATHS:
        if key in record[part] and draw(st.booleans()):
            del record[part][key]
    offset = draw(OFFSETS)
    for group, key in (("sessions", "start"), ("assessments", "date"), ("vitals", "date"), ("drug_screens", "collected")):
        for item in record.get(group, []):
            item[key] = _shift_offset(item[key], offset)
    for vital in record.get("vitals", []):
        if vital.get("value") is not None and draw(st.booleans()):
            vital["value"] = float(draw(st.decimals(Decimal("1"), Decimal("400"), places=2)))
    try:
        validate_record(record)
    except RecordInvalid:
        assume(False)
    return record


def records() -> st.SearchStrategy[IopRecord]:
    return record_dicts().map(validate_record)


# --- parties, and the round-trip helpers the mapper tests of a record part share -----------------

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BASE_PARTS = ("version", "id", "program", "client", "enrolment")

LOCAL_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9\-.]{0,20}", fullmatch=True)
NPIS = st.integers(0, 999_999_999).map(lambda n: next(f"{n:09d}{d}" for d in range(10) if npi_is_valid(f"{n:09d}{d}")))
DEAS = st.tuples(st.from_regex(r"[A-Z]{2}", fullmatch=True), st.integers(0, 999_999)).map(
    lambda t: next(f"{t[0]}{t[1]:06d}{d}" for d in range(10) if dea_is_valid(f"{t[0]}{t[1]:06d}{d}"))
)
PHONES = st.from_regex(r"\+?[0-9][0-9 ()\-.]{5,17}[0-9]", fullmatch=True)
EMAILS = st.builds("{}@{}.example".format, st.from_regex(r"[a-z0-9._]{1,12}", fullmatch=True), st.from_regex(r"[a-z]{1,12}", fullmatch=True))
# An empty contact ({}) is left out: it maps to no telecom and so reads back as no contact.
CONTACTS = st.fixed_dictionaries({}, optional={"phone": PHONES, "email": EMAILS}).filter(bool)
ADDRESSES = st.fixed_dictionaries(
    {
        "lines": st.lists(TEXT, min_size=1, max_size=4),
        "city": TEXT,
        "state": st.from_regex(r"[A-Z]{2}", fullmatch=True),
        "postal_code": st.from_regex(r"[0-9]{5}(-[0-9]{4})?", fullmatch=True),
    },
    optional={"country": st.from_regex(r"[A-Z]{2}", fullmatch=True)},
)
HUMAN_NAMES = st.fixed_dictionaries(
    {"family": TEXT, "given": st.lists(TEXT, min_size=1, max_size=5)}, optional={"prefix": TEXT, "suffix": TEXT}
)
PLACES = {"address": ADDRESSES, "contact": CONTACTS}


def with_parts(example_json: dict, **parts: object) -> IopRecord:
    """A valid record: the example's program, client and enrolment, plus ``parts``."""
    return validate_record({**{k: example_json[k] for k in BASE_PARTS}, **parts})


def reverse(resources: list[dict], *families: object) -> tuple[dict, MappingReport]:
    draft, report, index = {}, MappingReport(), ResourceIndex.build(resources)
    for family in families:
        family.from_fhir(index, draft, report)
    return draft, report


def assert_lossless(record: IopRecord, families: tuple, **parts: type) -> None:
    """Map ``record`` with ``families``: every resource is valid R4 and, read back without a
    single issue, each named part (``field=ContractModel``) equals the record's."""
    ctx = MappingContext(record)
    resources = [r for family in families for r in family.to_fhir(ctx)]
    for resource in resources:
        assert validate_resource(resource) == [], resource
    draft, report = reverse(resources, *families)
    assert report.issues == []
    for field, model in parts.items():
        value = getattr(record, field)
        back = [model.model_validate(x) for x in draft[field]] if isinstance(value, list) else model.model_validate(draft[field])
        assert back == value, field
