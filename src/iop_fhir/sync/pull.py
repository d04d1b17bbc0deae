"""Incremental pull from an EHR: the outside medication picture of the enrolled patients.

``iop-fhir sync pull DESTINATION`` (and the worker, on a schedule) calls :func:`pull` with a
:class:`~iop_fhir.sync.fhir_client.FhirClient`. For every enrolled patient (a live Patient of
our store in the destination's scope: its ``programs``/``patients``; its ``resources`` filter
is about what is pushed and does not apply) the patient is found at the EHR by its
identifiers (``Patient?identifier=system|value``, the first that matches exactly one), then
for each of the destination's ``pull_resources``::

    GET Type?patient=Patient/<ehr id>&_lastUpdated=ge<cursor>&_sort=_lastUpdated&_count=100

following ``next`` links (the client does). What one such search returns is one *batch*,
stored in one unit of work together with its cursor, so a pull that fails half-way repeats
the batch and nothing else; storing the same content again writes nothing (the store
compares content hashes).

The cursor is the EHR's own ``meta.lastUpdated`` of the newest resource seen (its clock, not
ours), kept in ``sync_cursor`` per destination, patient and type (the destination column
holds ``{destination}|Patient/{our id}``): a cursor per destination and type alone would let
a patient enrolled after the last pull miss everything the EHR recorded before it, which is
exactly the history an intake reconciliation needs. ``ge`` re-reads the resources at the
cursor's instant, so none updated in the same instant is skipped; they come back unchanged.

A pulled resource is stored as a resource of ours:

* id ``mappers.ids.resource_id(Type, base_url, foreign id)``; its identifiers kept;
* ``meta.source`` the absolute URL at the EHR, ``meta.tag`` ``{CANONICAL}/CodeSystem/source``
  with the destination's name as code (its own profiles, security labels and tags kept);
* references to the EHR's patient become ``Patient/{ours}``; references to resources pulled
  from the same EHR (stored here, or in the same batch) become references to ours; every
  other relative reference becomes an absolute URL at the EHR (valid FHIR, and followable);
* checked with :func:`~iop_fhir.formats.fhir_validate.validate_resource`: an invalid one is
  reported (``PullResult.reported``, with its FHIRPath location) and skipped;
* delivered to the *other* destinations whose scope it falls in (the store's router), never
  back to its source.

A pulled resource that carries one of our business identifiers is the EHR's copy of what the
gateway delivered (an *echo*): it is not stored. When its clinically meaningful content
differs from our current version a conflict ``Task`` is recorded instead of overwriting (see
:mod:`~iop_fhir.sync.reconcile`); conflict Tasks are work items of the program and are
delivered nowhere.

Each batch that stored something gets one ``Provenance``: target the versions stored,
``recorded`` the pull's time, activity v3-DataOperation ``CREATE`` (every target new) or
``UPDATE``, agent the EHR as custodian (``who.display`` names the destination and its base
URL: the gateway keeps no Organization for a destination), and one entity per resource with
role ``source`` and ``what`` the EHR's (versioned) URL.

Pulled MedicationRequest, MedicationStatement and MedicationDispense resources go through the
reverse mappers' product and dosage readers, as the reconciliation view shows them; what they
cannot read is reported as warnings (they do not stop the pull).

Failures: a transient one (:class:`~iop_fhir.errors.TransientDeliveryError`: the EHR is
unreachable or busy) stops the pull and is raised, what was stored stays stored; a permanent
one on one search (the EHR refuses a type, say) is reported and the pull goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from iop_fhir.errors import Gone, IopFhirError, Issue, NotFound, PermanentDeliveryError, VersionConflict
from iop_fhir.formats.fhir_validate import validate_resource
from iop_fhir.mappers.datatypes import as_dict, coding, concept, identifiers_in, nonblank, parse_datetime, table_coding
from iop_fhir.mappers.ids import resource_id
from iop_fhir.mappers.report import MappingReport
from iop_fhir.store import Saved, Store, UnitOfWork, instant
from iop_fhir.store.resources import ID_PATTERN
from iop_fhir.store.search_index import index_rows, parse_reference, patient_key, search_parameters, token_value
from iop_fhir.sync import reconcile
from iop_fhir.sync.destinations import Destination
from iop_fhir.terminology import CANONICAL, PROVENANCE_PARTICIPANT, SYNC_SOURCE, data_operation

JSON = dict[str, Any]

PAGE_SIZE = 100  # _count asked of the EHR
PATIENT_PAGE = 200  # our Patients read per page when listing the enrolled
ERROR = ("error", "fatal")


class FhirReader(Protocol):
    """What a pull needs of a FHIR client (:class:`~iop_fhir.sync.fhir_client.FhirClient`)."""

    def search(self, resource_type: str, params: list[tuple[str, str]]) -> Iterator[JSON]: ...


class PullRefused(IopFhirError):
    """The destination is not one a pull can read (not a FHIR server)."""

    status = 400
    issue_code = "not-supported"


@dataclass
class TypeCounts:
    """What a pull did with the resources of one type."""

    fetched: int = 0  # resources of the type the EHR returned
    stored: int = 0  # new or changed: a new version here
    unchanged: int = 0  # the same content again, or an echo of ours without change
    conflicts: int = 0  # echoes that changed: a conflict Task recorded
    skipped: int = 0  # invalid, or not storable: reported

    def add(self, other: TypeCounts) -> None:
        for name in ("fetched", "stored", "unchanged", "conflicts", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class PullResult:
    """What one pull did, in total and per type; ``reported`` says what was not stored and why."""

    destination: str
    fetched: int = 0
    stored: int = 0
    unchanged: int = 0
    conflicts: int = 0
    reported: list[Issue] = field(default_factory=list)
    patients: int = 0  # enrolled patients found at the EHR
    by_type: dict[str, TypeCounts] = field(default_factory=dict)

    def add(self, resource_type: str, counts: TypeCounts) -> None:
        self.by_type.setdefault(resource_type, TypeCounts()).add(counts)
        self.fetched += counts.fetched
        self.stored += counts.stored
        self.unchanged += counts.unchanged
        self.conflicts += counts.conflicts

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.reported if i.severity in ERROR]

    def as_json(self) -> JSON:
        return {
            "destination": self.destination,
            "patients": self.patients,
            "fetched": self.fetched,
            "stored": self.stored,
            "unchanged": self.unchanged,
            "conflicts": self.conflicts,
            "by_type": {t: vars(c) for t, c in self.by_type.items()},
            "reported": [reconcile.issue_json(i) for i in self.reported],
        }


def pull(store: Store, destination: Destination, client: FhirReader, *, now: datetime | None = None) -> PullResult:
    """Pull what changed at ``destination`` for every enrolled patient (see the module doc).

    :param client: a :class:`~iop_fhir.sync.fhir_client.FhirClient` for ``destination``.
    :param now: the time the Provenance records (default: the store's clock).
    :raises PullRefused: the destination is not a FHIR server, or is disabled.
    :raises TransientDeliveryError: the EHR could not be read; pull again later.
    """
    _check_pullable(destination)
    result = PullResult(destination.name)
    patients = enrolled_patients(store, destination)
    puller = _Puller(store, destination, client, now or store.clock(), result, reconcile.program_bases(patients))
    for patient in patients:
        ehr_id = puller.find_patient(patient)
        if ehr_id is None:
            continue
        result.patients += 1
        for resource_type in destination.pull_resources:
            puller.pull_type(patient, ehr_id, resource_type)
    return result


def _check_pullable(destination: Destination) -> None:
    if destination.kind != "fhir":
        key, why = "kind", f"is a {destination.kind} destination; only FHIR servers are pulled from"
    elif not destination.enabled:
        key, why = "enabled", "is disabled (enabled = false)"
    else:
        return
    message = f"{destination.name} {why}"
    raise PullRefused(message, [Issue(message, location=f"destination {destination.name}.{key}", code="not-supported")])


def enrolled_patients(store: Store, destination: Destination) -> list[JSON]:
    """The live Patients of our store in the destination's scope (programs, patients)."""
    scope = replace(destination, resources=None)  # the push filter on types does not narrow who is enrolled
    found: list[JSON] = []
    cursor = None
    while True:
        page = store.search("Patient", (), count=PATIENT_PAGE, cursor=cursor)
        found += [s.resource for s in page.entries if scope.accepts("Patient", s.resource, s.reference)]
        cursor = page.next_cursor
        if cursor is None:
            return found


def cursor_key(destination: str, patient_id: str) -> str:
    """The ``sync_cursor.destination`` of one patient's cursors at a destination."""
    return f"{destination}|Patient/{patient_id}"


@dataclass
class _Batch:
    """What storing one batch did; merged into the result only once its unit committed
    (``Store.transaction`` may run the unit again after a deadlock)."""

    counts: TypeCounts = field(default_factory=TypeCounts)
    issues: list[Issue] = field(default_factory=list)


class _Puller:
    """One pull's state: the store, the EHR, the program bases that mark our identifiers."""

    def __init__(
        self, store: Store, destination: Destination, client: FhirReader, now: datetime, result: PullResult, bases: frozenset[str]
    ) -> None:
        self.store = store
        self.destination = destination
        self.base_url = destination.base_url.rstrip("/")
        self.client = client
        self.now = now
        self.result = result
        self.bases = bases

    def report(self, message: str, location: str, severity: str = "error", code: str = "processing") -> None:
        self.result.reported.append(Issue(message, location, severity, code))

    # -- finding the patient at the EHR

    def find_patient(self, patient: JSON) -> str | None:
        """The EHR's id of our patient: the first identifier that matches exactly one Patient there."""
        ours = f"Patient/{patient['id']}"
        for ident in identifiers_in(patient.get("identifier")):
            system, value = ident.get("system"), nonblank(ident.get("value"))
            if not system or value is None:
                continue
            criteria = [("identifier", token_value(system, value))]
            try:
                found = [r for r in self.client.search("Patient", criteria) if r.get("resourceType") == "Patient"]
            except PermanentDeliveryError as exc:
                self.report(f"{ours}: finding the patient at {self.destination.name} failed: {exc.message}", f"{ours}.identifier")
                return None
            if len(found) == 1 and isinstance(found[0].get("id"), str):
                return found[0]["id"]
            if len(found) > 1:
                self.report(
                    f"{ours}: {len(found)} patients at {self.destination.name} carry {system}|{value}; that identifier is not used",
                    f"{ours}.identifier",
                    "warning",
                    "multiple-matches",
                )
        unknown = f"{ours}: no patient at {self.destination.name} carries one of its identifiers"
        self.report(unknown, f"{ours}.identifier", "information", "not-found")
        return None

    # -- one batch: a patient's resources of one type

    def pull_type(self, patient: JSON, ehr_id: str, resource_type: str) -> None:
        key = cursor_key(self.destination.name, patient["id"])
        cursor = self.store.pull_cursor(key, resource_type)
        params = [("patient", f"Patient/{ehr_id}")]
        if cursor is not None:
            params.append(("_lastUpdated", f"ge{cursor}"))
        params += [("_sort", "_lastUpdated"), ("_count", str(PAGE_SIZE))]
        where = f"{resource_type}?patient=Patient/{ehr_id}"
        try:
            # Read it all before writing: no database lock is held while the EHR answers.
            fetched = list(self.client.search(resource_type, params))
        except PermanentDeliveryError as exc:
            self.report(f"{self.destination.name}: {exc.message}", where)
            return
        batch: list[JSON] = []
        for resource in fetched:
            if resource.get("resourceType") == resource_type:
                batch.append(resource)
            elif resource.get("resourceType") == "OperationOutcome":
                for issue in resource.get("issue") or ():
                    said = as_dict(issue).get("diagnostics") or as_dict(as_dict(issue).get("details")).get("text")
                    if said:
                        self.report(f"{self.destination.name} said: {said}", where, "warning", "informational")
        newest = _newest(batch, cursor)
        outcome = self.store.transaction(lambda uow: self._store_batch(uow, patient, ehr_id, resource_type, batch, key, newest))
        self.result.add(resource_type, outcome.counts)
        self.result.reported += outcome.issues

    def _store_batch(
        self, uow: UnitOfWork, patient: JSON, ehr_id: str, resource_type: str, batch: list[JSON], key: str, newest: str | None
    ) -> _Batch:
        out = _Batch()
        ours = f"Patient/{patient['id']}"
        in_batch = {
            (resource_type, r["id"]) for r in batch if isinstance(r.get("id"), str) and reconcile.our_identifier(r, self.bases) is None
        }
        written: list[tuple[Saved, str]] = []
        report = MappingReport()
        for foreign in batch:
            out.counts.fetched += 1
            fid = foreign.get("id")
            if not isinstance(fid, str) or not ID_PATTERN.fullmatch(fid):
                out.issues.append(Issue(f"a {resource_type} from {self.destination.name} has no usable id; not stored", f"{resource_type}.id"))
                out.counts.skipped += 1
                continue
            url = f"{self.base_url}/{resource_type}/{fid}"
            echo = reconcile.our_identifier(foreign, self.bases)
            if echo is not None:
                self._echo(uow, foreign, url, echo, ours, out)
                continue
            local = self.localise(uow, foreign, ehr_id, ours, url, in_batch)
            if not _about(local, ours):
                message = f"{url} is not about Patient/{ehr_id}, whose resources were asked for; not stored"
                out.issues.append(Issue(message, resource_type, "warning", "processing"))
                out.counts.skipped += 1
                continue
            problems = [i for i in validate_resource(local) if i.severity in ERROR]
            if problems:
                out.issues += [Issue(f"{url}: {i.message}; not stored", i.location, i.severity, i.code) for i in problems]
                out.counts.skipped += 1
                continue
            deliver = self._deliver_to(resource_type, local, ours)
            try:
                saved = uow.update(resource_type, local["id"], local, deliver_to=deliver)
            except VersionConflict as exc:  # its identifier is held by another resource here
                out.issues.append(Issue(f"{url}: {exc.message}; not stored", f"{resource_type}.identifier", code="duplicate"))
                out.counts.skipped += 1
                continue
            if not saved.changed:
                out.counts.unchanged += 1
                continue
            out.counts.stored += 1
            written.append((saved, _versioned(url, foreign)))
            if resource_type in reconcile.MEDICATION_TYPES:
                reconcile.outside_medication(local, report)
        # What the outside medication list cannot read is worth knowing, not a failed pull.
        out.issues += [
            Issue(f"outside medication list: {i.message}", i.location, "warning", i.code) for i in report.issues if i.severity != "information"
        ]
        if written:
            provenance = self.provenance(ours, resource_type, written)
            uow.update("Provenance", provenance["id"], provenance, deliver_to=self._deliver_to("Provenance", provenance, ours))
        if newest is not None:
            uow.set_pull_cursor(key, resource_type, newest)
        return out

    def _deliver_to(self, resource_type: str, resource: JSON, patient_key: str) -> list[str]:
        """The other destinations whose scope the resource falls in: never back to its source."""
        router = self.store.router
        names = router(resource_type, resource, patient_key) if router is not None else ()
        return [name for name in names if name != self.destination.name]

    def _echo(self, uow: UnitOfWork, theirs: JSON, url: str, identifier: tuple[str, str], patient: str, out: _Batch) -> None:
        """The EHR's copy of one of ours: nothing when it agrees, a conflict Task when it does not."""
        resource_type = str(theirs["resourceType"])
        matches = uow.search(resource_type, [("identifier", token_value(*identifier))], count=1).entries
        if not matches:
            out.issues.append(
                Issue(
                    f"{url} carries the program's identifier {identifier[0]}|{identifier[1]}, but no {resource_type} here holds it; not stored",
                    f"{resource_type}.identifier",
                    "warning",
                    "not-found",
                )
            )
            out.counts.skipped += 1
            return
        ours = matches[0]
        differences = reconcile.clinical_differences(ours.resource, theirs)
        if not differences:
            out.counts.unchanged += 1
            return
        task = reconcile.conflict_task(self.destination.name, url, theirs, ours, patient, differences)
        try:
            uow.read("Task", task["id"])
        except NotFound:
            uow.create(task, id=task["id"], deliver_to=())
            out.counts.conflicts += 1
            return
        except Gone:  # someone deleted the Task: the change was dealt with
            pass
        out.counts.unchanged += 1

    # -- making a foreign resource ours

    def localise(self, uow: UnitOfWork, foreign: JSON, ehr_id: str, patient: str, url: str, in_batch: set[tuple[str, str]]) -> JSON:
        """The foreign resource as we store it: our id, its source in ``meta``, references rewritten."""
        resource_type = str(foreign["resourceType"])
        meta = {k: v for k, v in as_dict(foreign.get("meta")).items() if k in ("profile", "security", "tag")}
        tags = [t for t in meta.get("tag") or () if as_dict(t).get("system") != SYNC_SOURCE]
        meta["tag"] = [*tags, reconcile.source_tag(self.destination.name)]
        meta["source"] = url
        known: dict[tuple[str, str], bool] = {}

        def ours(target_type: str, target_id: str) -> bool:
            """Whether a reference names a resource pulled from this EHR that we hold (or are storing)."""
            if (target_type, target_id) in in_batch:
                return True
            if target_type not in self.destination.pull_resources:
                return False
            if (target_type, target_id) not in known:
                try:
                    uow.read(target_type, self.our_id(target_type, target_id))
                    known[(target_type, target_id)] = True
                except (NotFound, Gone):
                    known[(target_type, target_id)] = False
            return known[(target_type, target_id)]

        def rewrite(reference: str) -> str:
            if reference.startswith(("#", "urn:")):
                return reference
            relative = reference[len(self.base_url) + 1 :] if reference.startswith(self.base_url + "/") else reference
            if "://" in relative:
                return reference  # another server's: already absolute
            parsed = parse_reference(relative)
            if parsed is None or parsed[0] is None:
                return reference
            target_type, target_id = parsed[0], parsed[1]
            if target_type == "Patient" and target_id == ehr_id:
                return patient
            if ours(target_type, target_id):
                return f"{target_type}/{self.our_id(target_type, target_id)}"
            return f"{self.base_url}/{relative}"

        body = {k: _references(v, rewrite) for k, v in foreign.items() if k not in ("resourceType", "id", "meta")}
        return {"resourceType": resource_type, "id": self.our_id(resource_type, str(foreign["id"])), "meta": meta, **body}

    def our_id(self, resource_type: str, foreign_id: str) -> str:
        return resource_id(resource_type, self.base_url, foreign_id)

    def provenance(self, patient: str, resource_type: str, written: list[tuple[Saved, str]]) -> JSON:
        """One Provenance for the resources one batch stored (see the module doc)."""
        targets = sorted(saved.location for saved, _ in written)
        activity = "CREATE" if all(saved.created for saved, _ in written) else "UPDATE"
        who = {"display": f"{self.destination.name} ({self.base_url})"}
        return {
            "resourceType": "Provenance",
            # the same batch stored again would be the same Provenance; a different one is another
            "id": resource_id("Provenance", f"{CANONICAL}/sid/sync/pull/{self.destination.name}", "|".join([patient, *targets])),
            "meta": {"tag": [reconcile.source_tag(self.destination.name)]},
            "target": [{"reference": t} for t in targets],
            "recorded": instant(self.now),
            "activity": concept(table_coding(data_operation(activity))),
            "agent": [{"type": concept(coding(PROVENANCE_PARTICIPANT, "custodian", "Custodian")), "who": who}],
            "entity": [{"role": "source", "what": {"reference": source}} for _, source in sorted(written, key=lambda w: w[0].location)],
        }


def _references(value: Any, rewrite: Any) -> Any:
    """A copy of ``value`` with every ``Reference.reference`` string passed through ``rewrite``."""
    if isinstance(value, dict):
        out = {k: _references(v, rewrite) for k, v in value.items()}
        if isinstance(value.get("reference"), str):
            out["reference"] = rewrite(value["reference"])
        return out
    if isinstance(value, list):
        return [_references(v, rewrite) for v in value]
    return value


def _about(resource: JSON, patient: str) -> bool:
    """Whether a resource is in the patient's compartment (by the store's own rule), where its
    type has one: an EHR that ignored ``patient=`` must not file another patient's data here."""
    resource_type = str(resource["resourceType"])
    if "patient" not in search_parameters(resource_type):
        return True
    rows = index_rows(resource_type, str(resource["id"]), resource)
    return patient_key(resource_type, str(resource["id"]), rows) == patient


def _versioned(url: str, foreign: JSON) -> str:
    version = nonblank(as_dict(foreign.get("meta")).get("versionId"))
    return f"{url}/_history/{version}" if version else url


def _newest(batch: list[JSON], cursor: str | None) -> str | None:
    """The newest ``meta.lastUpdated`` among the batch and the cursor, compared as instants, as written."""
    best, best_at = cursor, parse_datetime(cursor) if cursor else None
    for resource in batch:
        text = as_dict(resource.get("meta")).get("lastUpdated")
        moment = parse_datetime(text)
        if moment is not None and (best_at is None or moment > best_at):
            best, best_at = text, moment
    return best
