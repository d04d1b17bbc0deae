"""What a delivery may carry: the privacy gate applied to a batch of deliveries (issue 6 §3).

The FHIR channel passes each batch through :func:`release_batch` before it builds the
transaction (docs/privacy.md, "Sync and pharmacy exits"):

* the last version of each resource in the batch is one disclosure to the destination's
  recipient (:func:`~iop_fhir.privacy.recipients.recipient_for_destination`), exit
  ``sync:<destination>``; each discharge package (a stored ``collection`` Bundle) is another,
  entry by entry, exit ``discharge:<destination>``: the package goes with what may go;
* deletions pass as they are: they carry no content;
* a withheld resource is left out, its delivery settled with a note (``withheld: <reason>``);
  what may go goes as the gate's copy (its labels worked out, ``NORDSCLCD`` on Part 2 data,
  mentions of withheld data removed);
* a reference from what goes to what the recipient may not see (withheld in this batch, or
  stored and denied now) is cut, with the smallest list item holding it (an episode's
  diagnosis, a reason), and the copy is labelled ``REDACTED``: the target could not resolve
  it, and the transaction would fail on it;
* our label-origin marker is removed from ``meta.security``: at the target the labels are
  another system's, which its labeller keeps (and another iop-fhir gateway would otherwise
  recompute, dropping ``NORDSCLCD``).

The gate audits as it decides, before anything is sent; :func:`ensure_audited` writes that
audit before the request leaves, so no disclosure goes out unrecorded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from iop_fhir.errors import TransientDeliveryError
from iop_fhir.formats import fhir_json
from iop_fhir.mappers.datatypes import as_dict, as_list
from iop_fhir.privacy.consent import Decision, Disclosure, Recipient, Verdict
from iop_fhir.privacy.gate import PrivacyGate, bundle_meta, name_of
from iop_fhir.privacy.labels import ORIGIN, add_labels, is_directory, reference_key
from iop_fhir.privacy.recipients import recipient_for_destination
from iop_fhir.privacy.redact import REDACTED
from iop_fhir.store import Delivery, DeliveryState
from iop_fhir.store.search_index import parse_reference
from iop_fhir.sync.destinations import Destination

JSON = dict[str, Any]

WHO = "iop-fhir worker"  # the requesting agent of every delivery's AuditEvent
WITHHELD = "withheld: "  # how the note of a delivery withheld whole begins
HISTORY = 200  # deliveries of one resource to one destination read back (a resource has a few versions)


@dataclass
class Released:
    """A batch as it may go: the deliveries to build the transaction from (deletions as they
    were, upserts carrying the released copies), and what the rest of the batch became."""

    deliveries: list[Delivery] = field(default_factory=list)
    notes: dict[int, str] = field(default_factory=dict)  # delivery id -> what was withheld or cut
    withheld: int = 0
    redacted: int = 0
    notice: str | None = None

    def bundle_meta(self) -> JSON | None:
        """``Bundle.meta`` of the transaction, as every exit labels a Bundle (:func:`privacy.gate.bundle_meta`)."""
        return bundle_meta(self.withheld, self.redacted, self.notice)


@dataclass
class _Part:
    """One disclosure of the batch: the plain resources, or one package's entries."""

    resources: list[JSON]
    disclosure: Disclosure
    copies: list[JSON | None]  # aligned with ``resources``; None = withheld

    def verdict(self, position: int) -> Verdict | None:
        return self.disclosure.verdicts.get(name_of(self.resources[position], position))


def release_batch(
    gate: PrivacyGate, destination: Destination, deliveries: Sequence[Delivery], *, recipient: Recipient | None = None, at: datetime | None = None
) -> Released:
    """Decide and audit what of ``deliveries`` may go to ``destination`` (see the module doc)."""
    recipient = recipient or recipient_for_destination(destination)
    at = at or gate.clock()
    last: dict[tuple[str, str], Delivery] = {}  # the delivery of each resource the transaction sends
    for delivery in deliveries:
        if delivery.resource_type != "Bundle":
            last.pop((delivery.resource_type, delivery.resource_id), None)
            last[(delivery.resource_type, delivery.resource_id)] = delivery
    upserts = [d for d in last.values() if d.action != "delete" and d.data is not None]
    parts: list[_Part] = []
    plain: _Part | None = None
    if upserts:
        plain = _release(gate, [_load(d) for d in upserts], recipient, f"sync:{destination.name}", at)
        parts.append(plain)
    packages: dict[int, tuple[JSON, _Part]] = {}
    for delivery in deliveries:
        if delivery.resource_type == "Bundle" and delivery.action != "delete" and delivery.data is not None:
            package = _load(delivery)
            entries = [as_dict(e).get("resource") for e in as_list(package.get("entry"))]
            packages[delivery.id] = package, _release(gate, [e for e in entries if isinstance(e, dict)], recipient, f"discharge:{destination.name}", at)
            parts.append(packages[delivery.id][1])
    gone = _withheld(gate, destination, parts, recipient, at)
    out = Released(notice=next((p.disclosure.notice for p in parts if p.disclosure.notice), None))
    for part in parts:
        part.copies = [None if c is None else _as_sent(c, gone) for c in part.copies]
        out.withheld += sum(1 for c in part.copies if c is None)
        out.redacted += sum(1 for c in part.copies if c is not None and _is_redacted(c))
    positions = {id(d): i for i, d in enumerate(upserts)}
    for delivery in deliveries:
        if delivery.action == "delete" or delivery.data is None:
            out.deliveries.append(delivery)  # no content to decide on (an upsert without any fails in delivery_bundle)
        elif delivery.resource_type == "Bundle":
            _package(delivery, *packages[delivery.id], out)
        elif plain is not None and id(delivery) in positions:
            _single(delivery, plain, positions[id(delivery)], out)
        # else: an earlier version, superseded in this batch by the last one
    return out


def ensure_audited(gate: PrivacyGate) -> None:
    """Write the audit of what was just released before it leaves.

    :raises TransientDeliveryError: the audit trail cannot be written now; nothing is sent
        until it can (the delivery is retried).
    """
    gate.audit.flush()
    if gate.audit.pending:
        raise TransientDeliveryError("the audit trail cannot be written; nothing is disclosed until it can")


# --- deciding -------------------------------------------------------------------------------------


def _load(delivery: Delivery) -> JSON:
    assert delivery.data is not None
    return fhir_json.loads(delivery.data, exact_decimals=True)


def _release(gate: PrivacyGate, resources: list[JSON], recipient: Recipient, exit: str, at: datetime) -> _Part:
    disclosure = gate.release(resources, recipient, exit=exit, who=WHO, at=at)
    return _Part(resources, disclosure, aligned(resources, disclosure))


def aligned(resources: Sequence[JSON], disclosure: Disclosure) -> list[JSON | None]:
    """The released copy of each resource, in input order; None for a withheld one."""
    permitted = iter(disclosure.permitted)
    out: list[JSON | None] = []
    for position, resource in enumerate(resources):
        verdict = disclosure.verdicts.get(name_of(resource, position))
        out.append(None if verdict is None or verdict.decision is Decision.DENY else next(permitted))
    return out


def _withheld(gate: PrivacyGate, destination: Destination, parts: list[_Part], recipient: Recipient, at: datetime) -> set[str]:
    """``Type/id`` of what the released copies refer to and the destination does not hold:
    withheld in this batch; outside it, withheld (or deleted) when last delivered there, or,
    never delivered there on its own, denied now (decided, not disclosed: no audit)."""
    gone = {reference_key(name_of(r, i)) for part in parts for i, r in enumerate(part.resources) if part.copies[i] is None}
    inside = {reference_key(name_of(r, i)) for part in parts for i, r in enumerate(part.resources)}
    outside = sorted({key for part in parts for copy in part.copies if copy is not None for key in literal_references(copy)} - inside)
    if not outside:
        return gone
    resolve = gate.resolver()
    undecided: list[JSON] = []
    for key in outside:
        found = resolve(key)
        if found is None or is_directory(found):
            continue  # nothing stored to tell about, or a party: always disclosed
        held = _held_there(gate, destination, key)
        if held is None:
            undecided.append(found)
        elif not held:
            gone.add(key)
    if undecided:
        decided = gate.disclosure(undecided, recipient, at=at, resolve=resolve)
        gone |= {reference_key(name_of(r, i)) for i, r in enumerate(undecided) if decided.verdicts[name_of(r, i)].decision is Decision.DENY}
    return gone


def _held_there(gate: PrivacyGate, destination: Destination, key: str) -> bool | None:
    """Whether the destination holds the resource as far as its deliveries tell: its last
    delivered change went (True) or was withheld or a deletion (False); None when no delivery
    of its own was delivered there (it went in a package, or predates the destination)."""
    resource_type, _, resource_id = key.partition("/")
    found = gate.store.outbox.list(destination=destination.name, resource=(resource_type, resource_id), limit=HISTORY)
    delivered = [d for d in found if d.state is DeliveryState.DELIVERED]
    if not delivered:
        return None
    last = delivered[-1]
    return last.action != "delete" and not (last.last_error or "").startswith(WITHHELD)


def literal_references(resource: JSON) -> set[str]:
    """``Type/id`` of every literal reference in the resource (contained, ``urn:``, absolute and
    conditional references aside)."""
    return {key for _, key in _references(resource)}


def _references(node: Any) -> Iterator[tuple[JSON, str]]:
    if isinstance(node, dict):
        text = node.get("reference")
        if isinstance(text, str) and (key := _literal(text)) is not None:
            yield node, key
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def _literal(text: str) -> str | None:
    if text.startswith(("#", "urn:")) or "://" in text or "?" in text:
        return None
    found = parse_reference(text)
    return f"{found[0]}/{found[1]}" if found is not None and found[0] is not None else None


# --- the copies as sent ---------------------------------------------------------------------------


class _Cut:
    """Marks an element removed with the reference it held."""


_CUT = _Cut()


def without_references(resource: JSON, gone: set[str]) -> JSON:
    """The resource without its references to ``gone`` (``Type/id``): each goes with the
    nearest list item holding it (a reason, an episode's diagnosis), or with the element that
    is that reference; a list left empty goes too. Unchanged: the same object."""
    if not gone or not (literal_references(resource) & gone):
        return resource
    out = {key: kept for key, value in resource.items() if (kept := _cut(value, gone)[0]) is not _CUT}
    return add_labels(out, [REDACTED])


def _cut(node: Any, gone: set[str]) -> tuple[Any, bool]:
    """(the node without references to ``gone``, whether something was cut outside any list)."""
    if isinstance(node, dict):
        text = node.get("reference")
        if isinstance(text, str) and _literal(text) in gone:
            return _CUT, True
        out: JSON = {}
        lost = False
        for key, value in node.items():
            kept, cut = _cut(value, gone)
            lost |= cut
            if kept is not _CUT:
                out[key] = kept
        return out, lost
    if isinstance(node, list):
        items = [_cut(item, gone) for item in node]
        kept_items = [kept for kept, cut in items if not cut and kept is not _CUT]
        return (_CUT if node and not kept_items else kept_items), False
    return node, False


def _as_sent(resource: JSON, gone: set[str]) -> JSON:
    """The copy as it goes to the target: references to ``gone`` cut, our origin marker off the labels."""
    out = without_references(resource, gone)
    meta = as_dict(out.get("meta"))
    security = as_list(meta.get("security"))
    if not any(as_dict(c).get("extension") for c in security):
        return out
    unmarked = []
    for coding in security:
        coding = dict(as_dict(coding))
        extensions = [e for e in as_list(coding.pop("extension", None)) if as_dict(e).get("url") != ORIGIN]
        unmarked.append({**coding, "extension": extensions} if extensions else coding)
    return {**out, "meta": {**meta, "security": unmarked}}


def _is_redacted(resource: JSON) -> bool:
    return any(as_dict(c).get("code") == REDACTED for c in as_list(as_dict(resource.get("meta")).get("security")))


# --- the deliveries --------------------------------------------------------------------------------


def _single(delivery: Delivery, part: _Part, position: int, out: Released) -> None:
    copy = part.copies[position]
    if copy is None:
        verdict = part.verdict(position)
        out.notes[delivery.id] = f"{WITHHELD}{verdict.reason if verdict is not None else 'not released'}"
        return
    out.deliveries.append(replace(delivery, data=fhir_json.dumps(copy)))
    if _is_redacted(copy):
        out.notes[delivery.id] = "sent redacted: elements naming data the recipient may not see were removed"


def _package(delivery: Delivery, package: JSON, part: _Part, out: Released) -> None:
    """The package with only what may go (each entry's fullUrl kept), or nothing when nothing may."""
    copies = iter(part.copies)
    entries: list[Any] = []
    for entry in as_list(package.get("entry")):
        resource = as_dict(entry).get("resource")
        if not isinstance(resource, dict):
            entries.append(entry)  # no resource: delivery_bundle skips it
            continue
        copy = next(copies)
        if copy is not None:
            entries.append({**entry, "resource": copy})
    kept = sum(1 for c in part.copies if c is not None)
    withheld = len(part.copies) - kept
    redacted = sum(1 for c in part.copies if c is not None and _is_redacted(c))
    if not kept:
        out.notes[delivery.id] = f"{WITHHELD}all {withheld} entries of the package"
        return
    out.deliveries.append(replace(delivery, data=fhir_json.dumps({**package, "entry": entries})))
    if withheld or redacted:
        out.notes[delivery.id] = f"partly withheld: {withheld} of {len(part.copies)} entries withheld, {redacted} redacted"
