"""Who receives what leaves the gateway: the :class:`~iop_fhir.privacy.consent.Recipient` of an
exit, or None when the data stays with the program itself (no disclosure, nothing to decide).

REST clients are mapped by ``[[client]]`` tables in the settings file::

    [[client]]
    client_id = "lakeside-ehr"                 # the token's client_id (else azp, else sub)
    name = "Lakeside Community Behavioral Health"
    organization = "http://hl7.org/fhir/sid/us-npi|1932102084"   # "system|value" or "Organization/{id}"; or an array
    practitioner = ["Practitioner/c915c212-9252-5667-b092-e994987a1337"]
    purpose = "TREAT"                          # the default purpose of use (v3-ActReason)

    [[client]]
    client_id = "riverbend-ehr"
    internal = true                            # the program's own system: audited, never a disclosure

* a mapped client is a recipient with the organizations and practitioners of its table;
* an authenticated client no table maps is a recipient with no identity: a consent names
  nobody it could be, so Part 2 data is withheld from it;
* the token's purpose-of-use claim (``purpose_of_use`` / ``purposeOfUse``) overrides the
  table's purpose (``ETREAT`` wins when the token lists several); ``ETREAT``, or a
  ``break_glass: true`` claim, is an emergency: break the glass (42 CFR 2.51), audited;
* ``internal = true``, the development client (AUTH off) and requests without a client are
  the program itself: no decision, only the audit.

Every key of every table is checked when the app starts (``load_clients``), and a mistake
names the table and the key (``client[1] ("lakeside-ehr").organization: ...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from iop_fhir.api.auth import Client
from iop_fhir.config import ConfigError
from iop_fhir.errors import Issue
from iop_fhir.privacy.consent import EMERGENCY, Recipient
from iop_fhir.store.search_index import parse_reference
from iop_fhir.sync.destinations import Destination
from iop_fhir.terminology import NCPDP_PROVIDER

DEFAULT_PURPOSE = "TREAT"  # what a client with no purpose (table or token) asks for
_PURPOSE = re.compile(r"[A-Z][A-Z0-9_]*")
_KEYS = frozenset({"client_id", "name", "organization", "practitioner", "purpose", "internal"})
# The types each key may reference: who a consent can name as its recipient.
_PARTY_TYPES = {"organization": ("Organization",), "practitioner": ("Practitioner", "PractitionerRole")}


@dataclass(frozen=True)
class ClientMapping:
    """One ``[[client]]`` table, checked."""

    client_id: str
    name: str | None = None
    references: frozenset[str] = frozenset()
    identifiers: frozenset[tuple[str, str]] = frozenset()
    purpose: str = DEFAULT_PURPOSE
    internal: bool = False


def load_clients(settings: Mapping[str, Any]) -> dict[str, ClientMapping]:
    """The ``[[client]]`` tables of the settings, by client id.

    :raises ConfigError: naming every problem as ``client[i] ("id").key``.
    """
    raw = settings.get("client", settings.get("CLIENT")) or []
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError("client must be an array of tables ([[client]])")
    problems: list[Issue] = []
    out: dict[str, ClientMapping] = {}
    for index, table in enumerate(raw):
        mapping = _read_table(index, table, problems)
        if mapping is None:
            continue
        if mapping.client_id in out:
            problems.append(Issue(f"{mapping.client_id!r} is mapped twice", location=f"client[{index}].client_id", code="value"))
        out[mapping.client_id] = mapping
    if problems:
        raise ConfigError("; ".join(f"{p.location}: {p.message}" for p in problems), problems)
    return out


def _read_table(index: int, table: Any, problems: list[Issue]) -> ClientMapping | None:
    if not isinstance(table, Mapping):
        problems.append(Issue("must be a table", location=f"client[{index}]", code="value"))
        return None
    name = table.get("client_id")
    label = f"client[{index}]" + (f" ({name!r})" if isinstance(name, str) else "")
    found = len(problems)

    def fail(key: str, message: str) -> None:
        problems.append(Issue(message, location=f"{label}.{key}", code="value"))

    for key in sorted(set(table) - _KEYS):
        fail(key, "is not a client setting")
    if not isinstance(name, str) or not name.strip():
        fail("client_id", "is required (a non-empty string: the token's client_id)")
    display = table.get("name")
    if display is not None and (not isinstance(display, str) or not display.strip()):
        fail("name", f"must be a non-empty string, not {display!r}")
    references: set[str] = set()
    identifiers: set[tuple[str, str]] = set()
    for key, types in _PARTY_TYPES.items():
        value = table.get(key)
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
        if value is None:
            continue
        if items is None or not all(isinstance(i, str) and i.strip() for i in items):
            fail(key, "must be a string or an array of strings ('system|value' identifiers or references)")
            continue
        for item in items:
            if "|" in item:
                system, _, ident = item.partition("|")
                if not system or not ident:
                    fail(key, f"{item!r} must be an identifier 'system|value'")
                identifiers.add((system, ident))
                continue
            target = parse_reference(item)
            if target is None or target[0] not in types or "://" in item:
                fail(key, f"{item!r} must be an identifier 'system|value' or a reference {' or '.join(t + '/{id}' for t in types)}")
                continue
            references.add(f"{target[0]}/{target[1]}")
    purpose = table.get("purpose", DEFAULT_PURPOSE)
    if not isinstance(purpose, str) or not _PURPOSE.fullmatch(purpose):
        fail("purpose", f"must be a purpose of use code (v3-ActReason, e.g. TREAT), not {purpose!r}")
    internal = table.get("internal", False)
    if not isinstance(internal, bool):
        fail("internal", f"must be true or false, not {internal!r}")
    elif internal and (references or identifiers):
        fail("internal", "an internal client is the program itself: it names no organization or practitioner")
    if len(problems) > found:
        return None
    return ClientMapping(str(name), display, frozenset(references), frozenset(identifiers), str(purpose), bool(internal))


# Parsed tables, by the identity of the raw list in the settings (parsed once, not per request).
_PARSED: dict[int, tuple[Any, dict[str, ClientMapping]]] = {}


def _mappings(settings: Mapping[str, Any]) -> dict[str, ClientMapping]:
    raw = settings.get("client", settings.get("CLIENT"))
    if not raw:
        return {}
    cached = _PARSED.get(id(raw))
    if cached is not None and cached[0] is raw:
        return cached[1]
    parsed = load_clients(settings)
    if len(_PARSED) >= 16:
        _PARSED.clear()
    _PARSED[id(raw)] = (raw, parsed)
    return parsed


def _break_glass(claims: Mapping[str, Any]) -> bool:
    flag = claims.get("break_glass")
    return flag is True or (isinstance(flag, str) and flag.lower() == "true")


def recipient_for_client(client: Client | None, settings: Mapping[str, Any]) -> Recipient | None:
    """The recipient a REST client stands for, or None for the program itself (see the module doc).

    :raises ConfigError: the ``[[client]]`` tables are wrong (``load_clients`` says how).
    """
    if client is None or not client.authenticated:
        return None
    mapping = _mappings(settings).get(client.client_id or "")
    if mapping is not None and mapping.internal:
        return None
    codes = client.purpose_of_use
    purpose = EMERGENCY if EMERGENCY in codes else codes[0] if codes else mapping.purpose if mapping else DEFAULT_PURPOSE
    return Recipient(
        references=mapping.references if mapping else frozenset(),
        identifiers=mapping.identifiers if mapping else frozenset(),
        purpose=purpose,
        break_glass=_break_glass(client.claims),
    )


def recipient_for_destination(destination: Destination) -> Recipient:
    """The recipient a sync destination or pharmacy stands for: the parties its ``recipient`` key
    names (references, and ``system|value`` identifiers), the aftercare providers it serves,
    and, for a pharmacy, its NCPDPID under the NCPDP Provider ID system; with its ``purpose``.

    Identifiers become references in the gate (:meth:`PrivacyGate.known`), which finds the
    stored parties carrying them: the record's consents name their recipient by reference.
    A destination is never an emergency: break the glass is per request.
    """
    references: set[str] = set()
    identifiers: set[tuple[str, str]] = set()
    for item in (*destination.recipient, *sorted(destination.aftercare_providers)):
        if "|" in item:
            system, _, value = item.partition("|")
            identifiers.add((system, value))
        else:
            references.add(item)
    if destination.kind == "ncpdp" and destination.ncpdp_id:
        identifiers.add((NCPDP_PROVIDER, destination.ncpdp_id))
    return Recipient(references=frozenset(references), identifiers=frozenset(identifiers), purpose=destination.purpose)
