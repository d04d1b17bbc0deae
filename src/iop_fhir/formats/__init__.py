"""Wire formats apart from HTTP: bytes in, dicts (or lxml trees) out, and back. No Flask here.

* :mod:`.safe_xml` — the one hardened XML parser; every XML document enters through it.
* :mod:`.fhir_json` — FHIR JSON (orjson): ``loads``/``dumps``, the empty-value and null rule,
  exact decimals, NDJSON.
* :mod:`.fhir_xml` — FHIR XML <-> FHIR JSON dicts, lexical values kept exactly.
* :mod:`.fhir_validate` — R4 validation of FHIR JSON dicts (fhir.resources R4B models plus the
  required bindings and JSON rules the models do not check).

Only the light modules are imported here; ``fhir_xml`` and ``fhir_validate`` load the
fhir.resources models, so import them where they are used.
"""

from .fhir_json import JsonRejected
from .safe_xml import XmlRejected, XmlTooLarge

__all__ = ["JsonRejected", "XmlRejected", "XmlTooLarge"]
