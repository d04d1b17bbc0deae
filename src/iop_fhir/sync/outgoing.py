"""Deliveries -> one FHIR transaction Bundle whose writes are harmless to repeat.

A worker claims a batch of deliveries for one destination and posts them as a single
transaction. Delivery is at-least-once (a worker killed after the post delivers again), so
every entry must leave the target as it was when it arrives a second time. The rules:

* **One entry per resource, in delivery order.** When the batch holds several versions of
  one resource, only the last is sent (a transaction may not touch a resource twice), at the
  place of its *last* delivery; a later deletion wins over an earlier version and vice versa.
* **Upsert by business identifier.** A resource with an identifier (the first with a system,
  :func:`~iop_fhir.store.search_index.identifiers`, the key the store holds unique) becomes
  ``PUT Type?identifier=system|value``: the target updates whatever resource it holds under
  that identifier, whatever id it gave it, or creates one. The resource goes without ``id``
  and without ``meta.versionId``, ``meta.lastUpdated`` and ``meta.source`` (ours, not the
  target's); ``meta.profile``, ``security`` and ``tag`` stay.
* **No identifier** (R4 Provenance has none): ``PUT Type/{id}`` with our id kept.
* **Delete**: ``DELETE Type?identifier=system|value`` with the identifier the resource had
  (from ``identify``, which reads the last live version), else ``DELETE Type/{id}``.
* **fullUrl** ``urn:uuid:<our id>`` on every entry (our ids are UUIDs; any other id gets the
  name-based ``uuid5`` of ``Type/id``). Every reference inside the resources (contained ones
  too) to a resource *written* by the Bundle becomes that ``urn:uuid:``, which the target
  resolves to its own ids. A reference ``Type/id`` to anything else becomes the conditional
  reference ``Type?identifier=system|value`` (via ``identify``), or stays ``Type/id`` when the
  resource has no identifier. When the destination does not receive that type at all (its
  ``resources`` filter), a conditional reference could never resolve there and would fail the
  whole transaction, so the reference becomes a *logical* one: ``Reference.identifier``, the
  ``reference`` element dropped (``display`` kept). Absolute URLs, ``#contained`` and ``urn:`` references, and
  conditional references already, stay as they are.
* **A stored Bundle** (the discharge package, type ``collection``) contributes each entry's
  resource, in entry order, under the same rules; references naming another entry's
  ``fullUrl`` count as references to that entry's resource. Deleting a stored Bundle sends
  nothing: the target never held the package, only its resources, which outlive it.

Identifier values are FHIR-escaped (``\\``, ``|``, ``,``, ``$``) and percent-encoded in the
URLs (``/`` in a value is harmless either way: it only ever stands after the ``?``).

The result is ``Bundle.type = transaction`` with no id; our own gateway's transaction
processor (:mod:`iop_fhir.api.bundles`) accepts it, and a repeat changes nothing there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from iop_fhir.api.bundles import references
from iop_fhir.errors import Gone, NotFound, PermanentDeliveryError
from iop_fhir.formats import fhir_json
from iop_fhir.mappers.ids import NAMESPACE
from iop_fhir.store import Delivery, Store
from iop_fhir.store.search_index import escape_value, identifiers, parse_reference

JSON = dict[str, Any]
Identify = Callable[[str, str], tuple[str, str] | None]  # (type, id) -> the resource's business identifier (system, value)

OUR_META = ("versionId", "lastUpdated", "source")  # what only our store means; the target sets its own


@dataclass
class _Item:
    """One resource to send: the last version the batch holds of it (``resource`` None: deleted)."""

    resource_type: str
    id: str
    resource: JSON | None
    full_url: str = ""


def delivery_bundle(
    deliveries: Sequence[Delivery], identify: Identify, *, receives: Callable[[str], bool] | None = None
) -> dict:
    """The transaction Bundle delivering ``deliveries`` (see the module doc for the rules).

    :param identify: the business identifier of a resource the Bundle refers to or deletes;
        asked at most once per resource.
    :param receives: whether the destination receives resources of a type (None: every type).
    :raises PermanentDeliveryError: an upsert without stored content, or a stored Bundle
        entry with neither an id nor a ``urn:uuid:`` fullUrl to take one from: neither can
        ever be delivered as it is.
    """
    aliases: dict[str, tuple[str, str]] = {}  # a stored Bundle's entry fullUrls -> (type, id)
    latest: dict[tuple[str, str], _Item] = {}
    for delivery in deliveries:
        for item in _items(delivery, aliases):
            key = (item.resource_type, item.id)
            latest.pop(key, None)  # re-inserted: dict order is then the order of last deliveries
            latest[key] = item
    items = list(latest.values())
    _assign_full_urls(items)
    known: dict[tuple[str, str], tuple[str, str] | None] = {}

    def business_key(resource_type: str, id: str) -> tuple[str, str] | None:
        if (resource_type, id) not in known:
            known[(resource_type, id)] = identify(resource_type, id)
        return known[(resource_type, id)]

    written = {(i.resource_type, i.id): i.full_url for i in items if i.resource is not None}
    entries = [_entry(item, written, aliases, business_key, receives) for item in items]
    bundle: JSON = {"resourceType": "Bundle", "type": "transaction"}
    if entries:
        bundle["entry"] = entries
    return bundle


def store_identify(store: Store) -> Identify:
    """``identify`` over a store: the first identifier of the current version, or for a deleted
    resource of its last live version; ``None`` for an unknown resource or none with a system."""

    def identify(resource_type: str, id: str) -> tuple[str, str] | None:
        try:
            return _first(identifiers(store.read(resource_type, id).resource))
        except NotFound:
            return None
        except Gone:
            pass
        cursor: str | None = None
        while True:  # newest first: the deletion, then (usually) the version it deleted
            page = store.history(resource_type, id, count=10, cursor=cursor)
            for saved in page.entries:
                if not saved.deleted:
                    return _first(identifiers(saved.resource))
            cursor = page.next_cursor
            if cursor is None:
                return None

    return identify


def identifier_search(system: str, value: str) -> str:
    """``identifier=system|value`` as a URL query, each part FHIR-escaped and percent-encoded."""
    return "identifier=" + "|".join(quote(escape_value(part), safe=":/") for part in (system, value))


def _first(found: list[tuple[str, str]]) -> tuple[str, str] | None:
    return found[0] if found else None


def _items(delivery: Delivery, aliases: dict[str, tuple[str, str]]) -> list[_Item]:
    """What one delivery contributes: its resource, a stored Bundle's entries, or a deletion."""
    if delivery.action == "delete":
        if delivery.resource_type == "Bundle":
            return []
        return [_Item(delivery.resource_type, delivery.resource_id, None)]
    if delivery.data is None:  # an upsert of a version the store holds no content for
        raise PermanentDeliveryError(
            f"{delivery.resource_type}/{delivery.resource_id} version {delivery.version_id} (delivery {delivery.id}) "
            "has no stored content to deliver"
        )
    resource = fhir_json.loads(delivery.data, exact_decimals=True)
    if delivery.resource_type != "Bundle":
        return [_Item(delivery.resource_type, delivery.resource_id, resource)]
    out: list[_Item] = []
    for index, entry in enumerate(resource.get("entry") or ()):
        inner = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(inner, dict) or not isinstance(inner.get("resourceType"), str):
            continue
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        id = inner.get("id")
        if not isinstance(id, str) and full_url is not None and full_url.startswith("urn:uuid:"):
            id = full_url.removeprefix("urn:uuid:")
        if not isinstance(id, str) or not id:
            raise PermanentDeliveryError(
                f"Bundle/{delivery.resource_id} (delivery {delivery.id}): entry[{index}] has no resource id "
                "and no urn:uuid: fullUrl, so it cannot be delivered"
            )
        if full_url is not None:
            aliases[full_url] = (inner["resourceType"], id)
        out.append(_Item(inner["resourceType"], id, inner))
    return out


def _assign_full_urls(items: list[_Item]) -> None:
    """``urn:uuid:<id>`` for UUID ids, else a name-based UUID; never the same for two entries."""
    used: set[str] = set()
    for item in items:
        url = f"urn:uuid:{item.id}" if _is_uuid(item.id) else ""
        if not url or url in used:  # a non-UUID id, or two types sharing one UUID id
            url = f"urn:uuid:{uuid.uuid5(NAMESPACE, f'{item.resource_type}/{item.id}')}"
        used.add(url)
        item.full_url = url


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _entry(
    item: _Item,
    written: dict[tuple[str, str], str],
    aliases: dict[str, tuple[str, str]],
    business_key: Identify,
    receives: Callable[[str], bool] | None,
) -> JSON:
    rtype, id = item.resource_type, item.id
    if item.resource is None:
        key = business_key(rtype, id)
        url = f"{rtype}?{identifier_search(*key)}" if key else f"{rtype}/{id}"
        return {"fullUrl": item.full_url, "request": {"method": "DELETE", "url": url}}
    resource = _without_our_meta(item.resource)
    _point_references(resource, written, aliases, business_key, receives)
    key = _first(identifiers(resource))
    if key is not None:
        resource.pop("id", None)
        url = f"{rtype}?{identifier_search(*key)}"
    else:
        resource["id"] = id
        url = f"{rtype}/{id}"
    return {"fullUrl": item.full_url, "resource": resource, "request": {"method": "PUT", "url": url}}


def _without_our_meta(resource: JSON) -> JSON:
    """A shallow copy without the meta elements only our store means (an emptied meta goes)."""
    out = dict(resource)
    meta = out.get("meta")
    if isinstance(meta, dict):
        kept = {k: v for k, v in meta.items() if k not in OUR_META}
        if kept:
            out["meta"] = kept
        else:
            out.pop("meta")
    return out


def _point_references(
    resource: JSON,
    written: dict[tuple[str, str], str],
    aliases: dict[str, tuple[str, str]],
    business_key: Identify,
    receives: Callable[[str], bool] | None = None,
) -> None:
    """Rewrite the references in ``resource`` (parsed for this Bundle alone) in place."""
    for ref, _path in references(resource):
        text = ref["reference"]
        target = aliases.get(text)
        if target is None:
            if text.startswith(("#", "urn:")) or "://" in text or "?" in text:
                continue  # contained, already a Bundle-local name, absolute, or conditional
            parsed = parse_reference(text)
            if parsed is None or parsed[0] is None:
                continue
            target = (parsed[0], parsed[1])
        if target in written:
            ref["reference"] = written[target]
            continue
        key = business_key(*target)
        if key is not None and receives is not None and not receives(target[0]):
            del ref["reference"]  # logical: the target holds no resources of this type to point at
            ref.setdefault("type", target[0])
            ref["identifier"] = {"system": key[0], "value": key[1]}
            continue
        ref["reference"] = f"{target[0]}?{identifier_search(*key)}" if key else f"{target[0]}/{target[1]}"
