"""The IOP record contract (``iop-record/1``): models, JSON Schema and validation."""

from iop_fhir.record.model import RECORD_VERSION, IopRecord
from iop_fhir.record.schema import record_json_schema
from iop_fhir.record.validate import validate_record

__all__ = ["RECORD_VERSION", "IopRecord", "record_json_schema", "validate_record"]
