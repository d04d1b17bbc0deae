"""Hypothesis strategies for whole, valid IOP records.

A record is a web of cross-references and rules (dates inside the episode, review chains,
controlled-substance limits, assessment totals), which random field values almost never
satisfy. So a draw starts from a generated record (any seed, any index: a realistic
skeleton) and then varies what can vary without breaking the rules: free text (any Unicode,
XML-special characters), optional fields present or absent, time-zone offsets, measured
decimals. Draws that still break a rule are discarded with ``assume``.
"""

from __future__ import annotations

import copy
import datetime as dt
from decimal import Decimal
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from iop_fhir.errors import RecordInvalid
from iop_fhir.generate import generate_record
from iop_fhir.record import IopRecord, validate_record



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
