"""The published JSON Schema of the IOP record, generated from the models."""

from __future__ import annotations

from functools import cache
from typing import Any

from iop_fhir.record.model import RECORD_VERSION, IopRecord

SCHEMA_ID = "https://iop-fhir.org/schema/iop-record-1.json"


@cache
def record_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of ``iop-record/1``; the cross-field rules are in docs/record.md."""
    schema = IopRecord.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"IOP record ({RECORD_VERSION})",
        **{k: v for k, v in schema.items() if k != "title"},
    }
