"""The discharge continuity package: what the next provider needs, assembled when a client leaves.

When ``POST``/``PUT /iop/records`` stores a record with a ``discharge``, :func:`schedule_discharge`
runs in the same unit of work: it assembles the package from the resources *as stored* and
stores it as one ``Bundle`` of type ``collection`` (the worker delivers a stored collection as
its entries) addressed to the destinations that serve the aftercare provider.

What the package holds (:func:`discharge_package`), for one episode:

* the Patient and the episode's Conditions;
* the discharge medication list: the MedicationRequests of kind ``discharge-medication``
  (category ``discharge``; continued, changed or stopped, see mappers/medication_request.py)
  and the prescriptions they name (``priorPrescription``), so the list reads on its own;
* the aftercare CarePlan with its follow-up (mappers/care_plan.py);
* the latest score of each assessment instrument, and the latest drug screen of each method
  (screen, confirmatory) with its results;
* the CareTeam, its Practitioners, their PractitionerRoles (the contacts) and the
  Organizations these name, plus every party the other entries reference (the receiving
  provider, the pharmacy, prescribers).

References among entries stay as stored (``Type/id``); each entry's ``fullUrl`` is
``urn:uuid:{id}`` (ids minted here are UUIDs). References to resources outside the package
(the treatment plan the aftercare plan ``replaces``) are left as they are.

Identity and idempotence: the Bundle's id and ``identifier``
(``{program base}/discharge-package|{episode id}``) derive from the episode, and nothing in
it comes from the clock: ``timestamp`` is the newest ``meta.lastUpdated`` among its entries.
So re-posting an unchanged record assembles the same content, the store writes nothing, and
nothing is queued again; a change to anything in the package gives a new version, delivered
again. Destinations are chosen when a version is written: a destination added later receives
the package with its next change. A record whose discharge is taken out loses its package
(deleted, delivered nowhere).

Who receives it: every destination whose ``aftercare_providers`` holds an identifier
(``system|value``: its NPI, or the program's provider identifier) of the provider the
aftercare plan's follow-up names (:meth:`Destination.serves_aftercare`). What is learnt of the
client after the package left (pharmacy/inbound.py: overdue MAT refills, adherence from fills) is
addressed to the same destinations, found from the stored plan by :func:`aftercare_destinations`.

:func:`discharge_status` is ``GET /iop/records/{id}/discharge``: the package and, per
destination, the state of its latest delivery: ``pending`` (queued, in flight, or failed and
waiting for its retry), ``delivered``, or ``failed`` (dead-lettered); ``no-destination`` when
no destination serves the aftercare provider.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from iop_fhir.api.operations import every, parties
from iop_fhir.errors import Gone, NotFound
from iop_fhir.mappers import care_plan, care_team, condition, medication_request, observation_assessment, observation_drug_screen
from iop_fhir.mappers import patient as patient_mapper
from iop_fhir.mappers.context import MappingContext, identifier_base, local_id
from iop_fhir.mappers.datatypes import as_dict, as_list, code_keys, identifiers_in, nonblank, own_extensions, parse_datetime
from iop_fhir.mappers.episode import KIND as EPISODE_KIND
from iop_fhir.mappers.ids import NAMESPACE, resource_id
from iop_fhir.record import IopRecord
from iop_fhir.store import Delivery, DeliveryState, Saved, Store, UnitOfWork, instant
from iop_fhir.store.search_index import parse_reference
from iop_fhir.sync.destinations import Destination

JSON = dict[str, Any]
Ops = Store | UnitOfWork

KIND = "discharge-package"
# Entry order: parties first, then the patient, then what refers to them.
ORDER = (
    "Organization", "Practitioner", "PractitionerRole", "Patient", "CareTeam", "Condition",
    "MedicationRequest", "Observation", "CarePlan",
)  # fmt: skip
# References followed to close the package: parties, and the clinical types the package carries.
FOLLOWED = frozenset({"Organization", "Practitioner", "PractitionerRole", "Patient", "CareTeam", "Condition", "MedicationRequest", "Observation"})
STATES = {
    DeliveryState.QUEUED: "pending",
    DeliveryState.IN_FLIGHT: "pending",
    DeliveryState.FAILED: "pending",  # waiting for its retry
    DeliveryState.DELIVERED: "delivered",
    DeliveryState.DEAD: "failed",
}
OUTBOX_PAGE = 200


def package_id(base: str, record_id: str) -> str:
    """The package Bundle's id: a name-based UUID of the episode, like every id the gateway mints."""
    return resource_id("Bundle", f"{base}/{KIND}", record_id)


def has_discharge(episode: JSON) -> bool:
    """Whether the episode says the client was discharged (its ``discharge-disposition``)."""
    return "discharge-disposition" in own_extensions(episode)


def discharge_package(ops: Ops, patient_id: str, episode: JSON) -> JSON | None:
    """The discharge package of an episode as the store holds it, or None without a discharge.

    :param ops: the store or the unit of work that just stored the record.
    :param episode: the EpisodeOfCare (its identifier names the program base and the episode).
    """
    base, record_id = identifier_base(episode, EPISODE_KIND), local_id(episode, EPISODE_KIND, shared=True)
    if base is None or record_id is None or not has_discharge(episode):
        return None
    patient = f"Patient/{patient_id}"

    def items(resource_type: str, kind: str, *, shared: bool = False) -> list[Saved]:
        """The episode's resources of one kind: identifier ``{base}/{kind}|{episode}[/item]``."""
        system = f"{base}/{kind}"
        found = every(ops, resource_type, [("patient", patient), ("identifier", f"{system}|")])
        return [s for s in found if _of_episode(s.resource, system, record_id, shared)]

    gathered = [ops.read("Patient", patient_id)]
    gathered += items("Condition", condition.KIND)
    gathered += items("CareTeam", care_team.TEAM_KIND, shared=True)
    gathered += items("MedicationRequest", medication_request.DISCHARGE_KIND)
    gathered += items("CarePlan", care_plan.AFTERCARE_KIND)
    gathered += _latest_per_code(items("Observation", observation_assessment.KIND))
    gathered += _latest_per_code(items("Observation", observation_drug_screen.KIND))
    have = {s.reference for s in gathered}
    gathered += parties(ops, gathered, "", have, FOLLOWED)
    roles = _roles(ops, [s for s in gathered if s.resource_type == "Practitioner"], f"{base}/{care_team.ROLE_KIND}", have)
    gathered += roles + parties(ops, roles, "", have, FOLLOWED)
    entries = sorted(gathered, key=lambda s: (ORDER.index(s.resource_type) if s.resource_type in ORDER else len(ORDER), s.id))
    return {
        "resourceType": "Bundle",
        "id": package_id(base, record_id),
        "identifier": {"system": f"{base}/{KIND}", "value": record_id},
        "type": "collection",
        # from the data, not the clock: the same content must give the same package
        "timestamp": instant(max(s.last_updated for s in entries)),
        "entry": [{"fullUrl": _full_url(s), "resource": s.resource} for s in entries],
    }


def _of_episode(resource: JSON, system: str, record_id: str, shared: bool) -> bool:
    for ident in identifiers_in(resource.get("identifier")):
        value = ident.get("value")
        if ident.get("system") == system and isinstance(value, str):
            if value == record_id if shared else value.startswith(record_id + "/"):
                return True
    return False


def _latest_per_code(observations: list[Saved]) -> list[Saved]:
    """The latest observation of each code (instrument, or screen panel), by effective time."""
    latest: dict[tuple[str, str], tuple[datetime, datetime, Saved]] = {}
    for saved in observations:
        keys = code_keys(saved.resource.get("code"))
        if not keys:
            continue
        resource = saved.resource
        effective = parse_datetime(resource.get("effectiveDateTime") or as_dict(resource.get("effectivePeriod")).get("start"))
        rank = (effective or saved.last_updated, saved.last_updated, saved)
        if keys[0] not in latest or rank[:2] > latest[keys[0]][:2]:
            latest[keys[0]] = rank
    return [latest[key][2] for key in sorted(latest)]


def _roles(ops: Ops, practitioners: list[Saved], system: str, have: set[str]) -> list[Saved]:
    """The program's PractitionerRoles of these Practitioners (where their contacts are)."""
    out = []
    for practitioner in practitioners:
        for role in every(ops, "PractitionerRole", [("practitioner", practitioner.reference)]):
            ours = any(i.get("system") == system for i in identifiers_in(role.resource.get("identifier")))
            if ours and role.reference not in have:
                have.add(role.reference)
                out.append(role)
    return out


def _full_url(saved: Saved) -> str:
    try:
        return f"urn:uuid:{uuid.UUID(saved.id)}"
    except ValueError:  # an id a client chose: a name-based UUID of the reference stands in
        return f"urn:uuid:{uuid.uuid5(NAMESPACE, saved.reference)}"


# --- who receives it ----------------------------------------------------------------------------


def follow_up_performers(plan: JSON) -> list[str]:
    """The references of the providers an aftercare plan's follow-up (its Appointment activities) names."""
    found = []
    for activity in as_list(plan.get("activity")):
        detail = as_dict(as_dict(activity).get("detail"))
        if detail.get("kind") == "Appointment":
            found += [ref for performer in as_list(detail.get("performer")) if (ref := nonblank(as_dict(performer).get("reference")))]
    return found


def receiving_provider(package: JSON) -> list[JSON]:
    """The providers the aftercare plan's follow-up names, as found among the package's entries."""
    by_reference = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"] for e in package.get("entry") or ()}
    plans = [e["resource"] for e in package.get("entry") or () if e["resource"].get("resourceType") == "CarePlan"]
    return [by_reference[ref] for plan in plans for ref in follow_up_performers(plan) if ref in by_reference]


def serving(providers: Iterable[JSON], destinations: Iterable[Destination]) -> list[str]:
    """Names of the destinations that serve one of these providers (by any of its identifiers)."""
    identifiers = [
        (i["system"], i["value"])
        for provider in providers
        for i in identifiers_in(provider.get("identifier"))
        if i.get("system") and i.get("value")
    ]
    return sorted(d.name for d in destinations if d.serves_aftercare(identifiers))


def receiving_destinations(package: JSON, destinations: Mapping[str, Destination]) -> list[str]:
    """Names of the destinations that serve the aftercare provider (by any of its identifiers)."""
    return serving(receiving_provider(package), destinations.values())


def aftercare_destinations(ops: Ops, patient_ref: str, destinations: Iterable[Destination]) -> list[str]:
    """Names of the destinations serving the patient's aftercare provider, as stored: the provider
    the follow-up of the patient's latest active aftercare plan (by ``period.start``) names.

    What the package's addressing does for a package, this does for what is learnt after it was
    sent (an overdue MAT refill, adherence from fills): the same provider, the same destinations.
    """
    destinations = list(destinations)
    if not any(d.aftercare_providers for d in destinations):
        return []  # nothing to look up: no destination serves an aftercare provider
    criteria = [("patient", patient_ref), ("category", f"{care_plan.PLAN_KIND}|aftercare"), ("status", "active")]
    plans = [s.resource for s in every(ops, "CarePlan", criteria)]
    if not plans:
        return []
    latest = max(plans, key=lambda plan: (str(as_dict(plan.get("period")).get("start") or ""), str(plan.get("id"))))
    providers = []
    for reference in follow_up_performers(latest):
        found = parse_reference(reference)
        if found is not None and found[0] is not None:
            providers += [s.resource for s in ops.read_many(found[0], [found[1]])]
    return serving(providers, destinations)


def schedule_discharge(uow: UnitOfWork, record: IopRecord, destinations: Mapping[str, Destination]) -> Saved | None:
    """Store a record's discharge package (after its resources, in the same unit of work),
    addressed to the destinations serving its aftercare provider.

    The store writes nothing, and queues nothing, when the package is unchanged. A record
    without a discharge has none: a package left from an earlier version is deleted.
    :returns: the package as stored, or None.
    """
    ids = MappingContext(record).ids
    if record.discharge is None:
        try:
            uow.delete("Bundle", package_id(ids.base, record.id), deliver_to=())
        except NotFound:
            pass
        return None
    episode = uow.read("EpisodeOfCare", ids.id("EpisodeOfCare", EPISODE_KIND, record.id, shared=True))
    patient_id = ids.id("Patient", patient_mapper.KIND, record.client.mrn, shared=True)
    package = discharge_package(uow, patient_id, episode.resource)
    if package is None:
        return None
    return uow.update("Bundle", package["id"], package, deliver_to=receiving_destinations(package, destinations))


# --- where it is --------------------------------------------------------------------------------


def discharge_status(store: Store, episode: JSON) -> JSON:
    """The package of an episode and the state of its delivery to each destination.

    :raises NotFound: the episode has no discharge, or no package was assembled for it.
    """
    base, record_id = identifier_base(episode, EPISODE_KIND), local_id(episode, EPISODE_KIND, shared=True)
    if base is None or record_id is None or not has_discharge(episode):
        raise NotFound(f"record {record_id or episode.get('id')} has no discharge")
    try:
        package = store.read("Bundle", package_id(base, record_id))
    except (NotFound, Gone):
        raise NotFound(f"record {record_id} has a discharge, but no discharge package was assembled for it") from None
    latest: dict[str, Delivery] = {}
    for delivery in _deliveries(store, package.id):
        latest[delivery.destination] = delivery  # in id order: the last one is the latest
    destinations = [_delivery_json(latest[name], package.version) for name in sorted(latest)]
    states = {d["state"] for d in destinations}
    overall = "no-destination" if not destinations else next(s for s in ("failed", "pending", "delivered") if s in states)
    return {
        "record": record_id,
        "package": {
            "reference": package.reference,
            "version": package.version,
            "lastUpdated": instant(package.last_updated),
            "entries": len(package.resource.get("entry") or ()),
        },
        "state": overall,
        "destinations": destinations,
    }


def _deliveries(store: Store, bundle_id: str) -> Iterable[Delivery]:
    after = 0
    while True:
        page = store.outbox.list(resource=("Bundle", bundle_id), limit=OUTBOX_PAGE, after_id=after)
        yield from page
        if len(page) < OUTBOX_PAGE:
            return
        after = page[-1].id


def _delivery_json(delivery: Delivery, current: int) -> JSON:
    return {
        "destination": delivery.destination,
        "state": STATES[delivery.state],
        "delivery_state": delivery.state.value,
        "version": delivery.version_id,
        "current": delivery.version_id == current,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "queued_at": instant(delivery.created),
        "delivered_at": instant(delivery.delivered_at) if delivery.delivered_at else None,
        "next_attempt_at": instant(delivery.next_attempt_at) if delivery.state == DeliveryState.FAILED else None,
    }
