"""Security labels for 42 CFR Part 2 and mental-health data (DS4P ``meta.security``).

The rules are data, in ``labels.json`` beside this module: code lists and ICD-10-CM block
ranges by system, each naming the sensitivity it reveals (``SUD``, ``OPIOIDUD``, ``MH``, ...);
what a sensitivity entails (confidentiality ``R`` and policy ``42CFRPart2`` for SUD data,
``N`` for mental health); and, per resource type, where its codes live, which references say
what it is *about* (it inherits their labels) and which only *mention* other data (removed at a
disclosure when the recipient may not see the target, see ``redact.py``). One small
interpreter below applies them to any resource; nothing here branches on resource types.

Labels we set carry the extension ``security-label-origin``, so labelling again replaces
exactly ours: labels other systems set stay (a C-CDA's ``R``, a foreign ``42CFRPart2``), and
a confidentiality is only ever raised, never lowered (DS4P: one confidentiality, the
strictest). Labelling is pure, idempotent and deterministic.

A resource inherits from its targets through a ``Resolver`` (the store gives one that reads
the current versions, whose labels were set when they were written); without one only the
resource's own codes count.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from iop_fhir import terminology
from iop_fhir.formats.ccda_types import CONFIDENTIALITY_RANK
from iop_fhir.mappers.datatypes import as_dict, as_list, extension
from iop_fhir.store.search_index import parse_reference

JSON = dict[str, Any]
Resolver = Callable[[str], JSON | None]
"""The resource a literal reference (``Condition/1``, ``urn:uuid:...``) names, or None."""

ORIGIN = terminology.extension_url("security-label-origin")
_ORIGIN = extension("security-label-origin", valueCode="iop-fhir")
BASELINE = "N"  # HIPAA-level protection: the confidentiality of ordinary data (DS4P)
PART2 = "42CFRPart2"


# --- the rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Consequence:
    confidentiality: str
    policies: frozenset[str]
    implies: frozenset[str]


@dataclass(frozen=True)
class _Match:
    """Where a rule-like matcher looks (``path``) and what it accepts."""

    path: str
    keys: frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Rules:
    """``labels.json``, indexed for look-ups (read once, see :func:`rules`)."""

    by_code: dict[tuple[str, str], frozenset[str]]
    blocks: dict[str, tuple[tuple[str, str, frozenset[str]], ...]]
    extensions: tuple[tuple[JSON, frozenset[str]], ...]
    rule_codes: dict[str, frozenset[tuple[str, str]]]
    sensitivities: dict[str, _Consequence]
    policies: dict[str, _Consequence]
    aliases: dict[tuple[str, str], str]
    code_paths: dict[str, tuple[str, ...]]
    about_paths: dict[str, tuple[str, ...]]
    mention_paths: dict[str, tuple[str, ...]]
    free_text: dict[str, tuple[str, ...]]
    program_paths: dict[str, tuple[str, ...]]
    program_codes: frozenset[tuple[str, str]]
    directory: frozenset[str]
    categories: dict[str, tuple[tuple[_Match | None, frozenset[str]], ...]]


def _systems(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _paths(section: JSON) -> dict[str, tuple[str, ...]]:
    return {rtype: tuple(paths) for rtype, paths in section.items() if not rtype.startswith("_")}


@cache
def rules() -> Rules:
    """The labelling rules (``labels.json``), read and indexed once."""
    raw = json.loads(resources.files(__package__).joinpath("labels.json").read_text(encoding="utf-8"))
    by_code: dict[tuple[str, str], set[str]] = {}
    blocks: dict[str, list[tuple[str, str, frozenset[str]]]] = {}
    extensions: list[tuple[JSON, frozenset[str]]] = []
    rule_codes: dict[str, frozenset[tuple[str, str]]] = {}
    for rule in raw["rules"]:
        labels = frozenset(rule["sensitivity"])
        if "extension" in rule:
            extensions.append((rule["extension"], labels))
            continue
        keys = {(system, code) for system in _systems(rule["system"]) for code in rule.get("codes", ())}
        for key in keys:
            by_code.setdefault(key, set()).update(labels)
        for system in _systems(rule["system"]):
            blocks.setdefault(system, []).extend((low, high, labels) for low, high in rule.get("blocks", ()))
        rule_codes[rule["id"]] = frozenset(keys)

    def consequences(section: JSON) -> dict[str, _Consequence]:
        return {
            code: _Consequence(spec["confidentiality"], frozenset(spec.get("policies", ())), frozenset(spec.get("implies", ())))
            for code, spec in section.items()
            if not code.startswith("_")
        }

    def match(spec: JSON | None) -> _Match | None:
        if spec is None:
            return None
        keys = rule_codes[spec["rule"]] if "rule" in spec else frozenset((spec["system"], c) for c in spec["codes"])
        return _Match(spec["path"], keys)

    program = raw["part2_programs"]
    return Rules(
        by_code={key: frozenset(labels) for key, labels in by_code.items()},
        blocks={system: tuple(found) for system, found in blocks.items()},
        extensions=tuple(extensions),
        rule_codes=rule_codes,
        sensitivities=consequences(raw["sensitivities"]),
        policies=consequences(raw["policies"]),
        aliases={(a["system"], a["code"]): a["as"] for a in raw["aliases"]["entries"]},
        code_paths=_paths(raw["code_paths"]),
        about_paths=_paths(raw["about_paths"]),
        mention_paths=_paths(raw["mention_paths"]),
        free_text=_paths(raw["free_text"]),
        program_paths=_paths(program["paths"]),
        program_codes=frozenset((c["system"], code) for c in program["codes"] for code in c["codes"]),
        directory=frozenset(raw["directory"]["types"]),
        categories={
            rtype: tuple((match(entry.get("when")), frozenset(entry["categories"])) for entry in entries)
            for rtype, entries in raw["categories"].items()
            if not rtype.startswith("_")
        },
    )


# --- walking resources ---------------------------------------------------------------------------


def values_at(node: Any, path: str) -> list[Any]:
    """Every value at a dotted element path (``activity.detail.code``), lists walked."""
    items = [node]
    for step in path.split("."):
        found: list[Any] = []
        for item in items:
            value = as_dict(item).get(step)
            found.extend(value if isinstance(value, list) else [] if value is None else [value])
        items = found
    return items


def code_keys_at(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(system, code) of the Codings at a path, whether it holds CodeableConcepts or Codings."""
    for value in values_at(node, path):
        value = as_dict(value)
        for coding in as_list(value.get("coding")) if "coding" in value else [value]:
            system, code = as_dict(coding).get("system"), as_dict(coding).get("code")
            if isinstance(system, str) and isinstance(code, str):
                yield system, code


def references_at(node: Any, path: str) -> list[str]:
    """The literal reference strings of the References at a path."""
    return [ref for value in values_at(node, path) if isinstance(ref := as_dict(value).get("reference"), str) and ref]


def reference_key(text: str) -> str:
    """A reference in a comparable form: ``Type/id`` for literal references (absolute or
    versioned ones too), the text itself for ``urn:uuid:`` and anything else."""
    found = parse_reference(text)
    if found is not None and found[0] is not None:
        return f"{found[0]}/{found[1]}"
    return text


def resolve_in(resource: JSON, reference: str, resolve: Resolver | None) -> JSON | None:
    """The target of a reference held by ``resource``: a contained one (``#id``) or via ``resolve``."""
    if reference.startswith("#"):
        return next((c for c in as_list(resource.get("contained")) if as_dict(c).get("id") == reference[1:]), None)
    return resolve(reference) if resolve is not None else None


def _type(resource: JSON) -> str:
    rtype = resource.get("resourceType")
    return rtype if isinstance(rtype, str) else ""


def is_directory(resource: JSON) -> bool:
    """A party or product (Organization, Practitioner, Medication, ...), not data about a patient."""
    return _type(resource) in rules().directory


def is_part2_program(resource: JSON) -> bool:
    """An organization coded as treating substance-use disorders (a Part 2 program)."""
    table = rules()
    return any(key in table.program_codes for path in table.program_paths.get(_type(resource), ()) for key in code_keys_at(resource, path))


def data_categories(resource: JSON) -> frozenset[str]:
    """The consent data categories (``medications``, ``drug-screens``, ...) the resource falls under;
    empty when only a consent for ``all`` covers it."""
    for when, categories in rules().categories.get(_type(resource), ()):
        if when is None or any(key in when.keys for key in code_keys_at(resource, when.path)):
            return categories
    return frozenset()


# --- what labels a resource needs -----------------------------------------------------------------


@dataclass(frozen=True)
class Labels:
    """The security labels of one resource, by DS4P kind."""

    confidentiality: str = BASELINE
    sensitivities: frozenset[str] = frozenset()
    policies: frozenset[str] = frozenset()

    @property
    def part2(self) -> bool:
        """42 CFR Part 2 governs the data."""
        return PART2 in self.policies

    @property
    def sensitive(self) -> bool:
        """More than ordinary health data: a sensitivity label, or a confidentiality above normal."""
        return bool(self.sensitivities) or CONFIDENTIALITY_RANK.get(self.confidentiality, 0) > CONFIDENTIALITY_RANK[BASELINE]

    def __or__(self, other: Labels) -> Labels:
        return Labels(
            _stricter(self.confidentiality, other.confidentiality),
            self.sensitivities | other.sensitivities,
            self.policies | other.policies,
        )


def _stricter(a: str, b: str) -> str:
    return a if CONFIDENTIALITY_RANK.get(a, -1) >= CONFIDENTIALITY_RANK.get(b, -1) else b


def _entailed(sensitivities: Iterable[str], policies: Iterable[str]) -> Labels:
    """Close a set of sensitivity and policy codes under what the rules say they entail."""
    table = rules()
    sens, pols = set(sensitivities), set(policies)
    confidentiality = BASELINE
    pending = True
    while pending:  # implications chain (ETHUD -> SUD -> 42CFRPart2 -> R); a few rounds at most
        pending = False
        for code in list(sens):
            rule = table.sensitivities.get(code)
            if rule and not (rule.implies <= sens and rule.policies <= pols):
                sens |= rule.implies
                pols |= rule.policies
                pending = True
        for code in list(pols):
            rule = table.policies.get(code)
            if rule and not rule.implies <= sens:
                sens |= rule.implies
                pending = True
    for code in sens:
        if code in table.sensitivities:
            confidentiality = _stricter(confidentiality, table.sensitivities[code].confidentiality)
    for code in pols:
        if code in table.policies:
            confidentiality = _stricter(confidentiality, table.policies[code].confidentiality)
    return Labels(confidentiality, frozenset(sens), frozenset(pols))


def content_sensitivities(resource: JSON) -> frozenset[str]:
    """The sensitivities the resource's own codes (and our MAT extension) reveal."""
    table = rules()
    found: set[str] = set()
    for path in table.code_paths.get(_type(resource), ()):
        for system, code in code_keys_at(resource, path):
            found |= table.by_code.get((system, code), frozenset())
            category = code[:3].upper()  # ICD-10-CM blocks are by category (F11 of F11.20)
            for low, high, labels in table.blocks.get(system, ()):
                if low <= category <= high:
                    found |= labels
    for wanted, labels in table.extensions:
        if any(all(as_dict(ext).get(k) == v for k, v in wanted.items()) for ext in as_list(resource.get("extension"))):
            found |= labels
    return frozenset(found)


def _read(codings: Iterable[Any]) -> Labels:
    """The labels a list of ``meta.security`` Codings states (live codes and their old aliases)."""
    table = rules()
    confidentiality, sens, pols = None, set(), set()
    for coding in codings:
        system, code = as_dict(coding).get("system"), as_dict(coding).get("code")
        if not isinstance(system, str) or not isinstance(code, str):
            continue
        if (system, code) in table.aliases:
            system, code = terminology.V3_ACT_CODE, table.aliases[(system, code)]
        if system == terminology.V3_CONFIDENTIALITY and code in CONFIDENTIALITY_RANK:
            confidentiality = code if confidentiality is None else _stricter(confidentiality, code)
        elif system == terminology.V3_ACT_CODE and code in table.sensitivities:
            sens.add(code)
        elif system == terminology.V3_ACT_CODE and code in table.policies:
            pols.add(code)
    return Labels(confidentiality or BASELINE, frozenset(sens), frozenset(pols))


def _security(resource: JSON) -> list[Any]:
    return as_list(as_dict(resource.get("meta")).get("security"))


def _ours(coding: Any) -> bool:
    return any(as_dict(e).get("url") == ORIGIN for e in as_list(as_dict(coding).get("extension")))


def stated_labels(resource: JSON) -> Labels:
    """The labels the resource carries now (ours and foreign), with what they entail."""
    found = _read(_security(resource))
    return _entailed(found.sensitivities, found.policies) | Labels(found.confidentiality)


def about_references(resource: JSON) -> list[str]:
    """The references to what the resource is about (``about_paths``)."""
    return [ref for path in rules().about_paths.get(_type(resource), ()) for ref in references_at(resource, path)]


def _inherited(resource: JSON, resolve: Resolver | None) -> Labels:
    """Sensitivities and policies of what the resource is about (one level: the targets carry
    what they inherited themselves, set when they were labelled): the codes the targets state
    and their own codes reveal, not yet closed under the rules.

    Why not closed here: every caller closes them together with the resource's own codes, and
    closing is distributive (each rule has one premise), so closing once is the same labels
    as closing per target and again (labelling runs on every write, against every target).
    """
    sens: set[str] = set()
    pols: set[str] = set()
    for ref in about_references(resource):
        target = resolve_in(resource, ref, resolve)
        if isinstance(target, dict):
            stated = _read(_security(target))
            sens |= stated.sensitivities | content_sensitivities(target)
            pols |= stated.policies
    return Labels(BASELINE, frozenset(sens), frozenset(pols))


def labels_of(resource: JSON, resolve: Resolver | None = None) -> Labels:
    """Everything that makes the resource sensitive: the labels it carries, its own codes and,
    with ``resolve``, what it is about. The decision function judges on these."""
    inherited = _inherited(resource, resolve)
    computed = _entailed(content_sensitivities(resource) | inherited.sensitivities, inherited.policies)
    return stated_labels(resource) | computed


def is_part2(resource: JSON, resolve: Resolver | None = None) -> bool:
    """42 CFR Part 2 governs the resource (by its labels, its codes, or what it is about)."""
    return labels_of(resource, resolve).part2


def sensitivity(resource: JSON, resolve: Resolver | None = None) -> set[str]:
    """The sensitivity codes (v3-ActCode: ``SUD``, ``OPIOIDUD``, ``MH``, ...) of the resource."""
    return set(labels_of(resource, resolve).sensitivities)


# --- writing labels ------------------------------------------------------------------------------------


def _coding(code: str) -> JSON:
    return {"extension": [dict(_ORIGIN)], **terminology.security_label(code)}


def _order(codes: Iterable[str], table: Iterable[str]) -> list[str]:
    wanted = set(codes)
    return [code for code in table if code in wanted]


def _with_security(resource: JSON, codings: list[JSON]) -> JSON:
    out = dict(resource)
    out["meta"] = {**as_dict(resource.get("meta")), "security": codings}
    return out


def write_labels(resource: JSON, labels: Labels, extra: Iterable[str] = ()) -> JSON:
    """A copy of the resource whose ``meta.security`` holds its foreign labels and ours: the
    confidentiality of ``labels`` (unless a foreign one is at least as strict), its sensitivities
    and policies, and the ``extra`` label codes (``NORDSCLCD``, ``REDACTED``, ...)."""
    foreign = [c for c in _security(resource) if not _ours(c)]
    present = {(as_dict(c).get("system"), as_dict(c).get("code")) for c in foreign}
    stated = [as_dict(c).get("code") for c in foreign if as_dict(c).get("system") == terminology.V3_CONFIDENTIALITY]
    foreign_level = max((CONFIDENTIALITY_RANK[c] for c in stated if c in CONFIDENTIALITY_RANK), default=-1)
    ours: list[str] = []
    if CONFIDENTIALITY_RANK.get(labels.confidentiality, -1) > foreign_level:
        foreign = [c for c in foreign if not (as_dict(c).get("system") == terminology.V3_CONFIDENTIALITY and as_dict(c).get("code") in CONFIDENTIALITY_RANK)]
        ours.append(labels.confidentiality)
    table = rules()
    ours += _order(labels.sensitivities, table.sensitivities)
    ours += _order(labels.policies, table.policies)
    ours += list(dict.fromkeys(extra))
    codings = foreign + [_coding(code) for code in ours if (terminology.security_label(code)["system"], code) not in present]
    return _with_security(resource, codings)


def label(resource: JSON, resolve: Resolver | None = None) -> JSON:
    """The resource with ``meta.security`` set: a copy, the input is left alone.

    Our labels are recomputed from its codes, from what it is about (with ``resolve``) and from
    what foreign labels entail; foreign labels stay. Ordinary data gets confidentiality ``N``.
    """
    foreign = _read(c for c in _security(resource) if not _ours(c))
    inherited = _inherited(resource, resolve)
    ours = _entailed(
        content_sensitivities(resource) | inherited.sensitivities | foreign.sensitivities,
        inherited.policies | foreign.policies,
    )
    return write_labels(resource, ours)


def add_labels(resource: JSON, codes: Iterable[str]) -> JSON:
    """A copy with the label ``codes`` added (as ours) to what it carries, nothing removed."""
    wanted = list(dict.fromkeys(codes))
    have = {(as_dict(c).get("system"), as_dict(c).get("code")) for c in _security(resource)}
    added = [_coding(code) for code in wanted if (terminology.security_label(code)["system"], code) not in have]
    return _with_security(resource, [*_security(resource), *added]) if added else copy.copy(resource)
