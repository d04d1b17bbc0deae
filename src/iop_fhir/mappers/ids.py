"""Deterministic resource ids and business identifiers.

A resource's id is a name-based UUID (v5) of its type, its identifier system and value, so
converting the same record twice gives the same ids and a resend upserts instead of
duplicating. Every resource also carries that business identifier, which is what
conditional writes (``PUT Type?identifier=system|value``) match on at other servers.

Identifier systems are per program: ``{base}/{kind}``, where ``base`` is the program's
``identifier_system`` or ``https://iop-fhir.org/fhir/sid/{program.id}``. Items owned by one
episode (prescriptions, sessions, ...) have values ``{episode id}/{item id}``; shared parties
(staff, pharmacies, outside providers) and the client (MRN) have their own program-wide ids.
"""

from __future__ import annotations

import uuid
from typing import Any

from iop_fhir.terminology import CANONICAL

# Fixed forever: changing it would change every id the gateway has ever minted.
NAMESPACE = uuid.UUID("8d1f6a52-2b7e-5c43-9e1a-4f0c2d6b7a90")


def resource_id(resource_type: str, system: str, value: str) -> str:
    """The id of the resource of ``resource_type`` whose business identifier is ``system|value``."""
    return str(uuid.uuid5(NAMESPACE, f"{resource_type}|{system}|{value}"))


def default_system_base(program_id: str) -> str:
    return f"{CANONICAL}/sid/{program_id}"


class Ids:
    """Identifier and reference factory for one record's program and episode."""

    def __init__(self, program_id: str, episode_id: str, system_base: str | None = None) -> None:
        self.program_id = program_id
        self.episode_id = episode_id
        self.base = (system_base or default_system_base(program_id)).rstrip("/")

    def system(self, kind: str) -> str:
        return f"{self.base}/{kind}"

    def value(self, kind: str, local_id: str, *, shared: bool = False) -> str:
        """Identifier value: program-wide ids as they are, episode items prefixed by the episode."""
        return local_id if shared else f"{self.episode_id}/{local_id}"

    def identifier(self, kind: str, local_id: str, *, shared: bool = False) -> dict[str, Any]:
        return {"use": "usual", "system": self.system(kind), "value": self.value(kind, local_id, shared=shared)}

    def id(self, resource_type: str, kind: str, local_id: str, *, shared: bool = False) -> str:
        return resource_id(resource_type, self.system(kind), self.value(kind, local_id, shared=shared))

    def reference(self, resource_type: str, kind: str, local_id: str, *, shared: bool = False) -> dict[str, Any]:
        """A reference as it stands inside the record's transaction Bundle (``urn:uuid:``)."""
        return {"reference": f"urn:uuid:{self.id(resource_type, kind, local_id, shared=shared)}"}
