"""Consent enforcement and the audit trail at the HTTP API: what leaves, for whom, recorded.

Two things happen to every request, whatever handler answers it:

* **The decision.** A request from a recipient (an authenticated client that is not the
  program's own, :func:`~iop_fhir.privacy.recipients.recipient_for_client`) gets a
  :class:`Gatekeeper`: each handler passes the stored versions it is about to send through
  :meth:`Gatekeeper.screen`, which asks the :class:`~iop_fhir.privacy.gate.PrivacyGate` and
  returns what may go (released copies: labelled, redacted). A read of a withheld resource is
  a 403 ``suppressed`` that says nothing of what it holds; a Bundle leaves withheld entries
  out and says so (``meta``: ``privacy.gate.bundle_meta``; an outcome entry). AuditEvents are the
  program's security records: never shown to a recipient. The program itself (``internal``
  clients, the development client with AUTH off) gets no Gatekeeper: its reads serve the
  stored bytes as before.
* **The audit.** After the response, one AuditEvent records the request (who, what, when,
  the recipient, the purpose, the outcome: 0 for 2xx/3xx, 4 for 4xx, 8 for 5xx), buffered;
  a write records it inside its own unit of work instead (:func:`audit_write`), so the write
  and its audit commit together. The Gatekeeper's decisions are audited once per request,
  per patient (:meth:`PrivacyGate.audit_disclosure`).

Headers on a response that carries released data: ``X-Redisclosure-Notice`` (the 42 CFR 2.32
notice) when Part 2 data went out, ``X-Data-Withheld: consent-policy`` when something was
withheld or cut. Bundles carry the same in their outcome entry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from flask import Flask, Response, current_app, g, request

from iop_fhir.api import store
from iop_fhir.api.auth import compartment_patients, current_client, is_public
from iop_fhir.errors import ConsentDenied, Gone, IopFhirError, Issue, NotFound
from iop_fhir.privacy.audit import READ_ONLY_TYPES, AuditLog, audit_event
from iop_fhir.privacy.consent import ConsentTerms, Disclosure, Recipient
from iop_fhir.privacy.gate import PrivacyGate, StoreResolver, bundle_meta, combine, name_of
from iop_fhir.privacy.recipients import recipient_for_client
from iop_fhir.store import Saved, UnitOfWork

log = logging.getLogger(__name__)

JSON = dict[str, Any]

GATE_KEY = "iop_fhir.privacy.gate"
NOTICE_HEADER = "X-Redisclosure-Notice"
WITHHELD_HEADER = "X-Data-Withheld"
NOT_AVAILABLE = "the resource is not available to this client under the patient's consent directives"
WITHHELD = "Some data was withheld from this response under the patients' consent directives."
AUDITED_PREFIXES = ("/fhir", "/iop", "/admin", "/ncpdp")

# endpoint -> (restful-interaction code, AuditEvent.action); a search or an operation is E (Execute)
_INTERACTIONS = {
    "fhir.read": ("read", "R"),
    "fhir.vread": ("vread", "R"),
    "fhir.create": ("create", "C"),
    "fhir.update": ("update", "U"),
    "fhir.conditional_update": ("update", "U"),
    "fhir.patch": ("patch", "U"),
    "fhir.delete": ("delete", "D"),
    "fhir.conditional_delete": ("delete", "D"),
    "fhir.history_instance": ("history-instance", "R"),
    "fhir.history_type": ("history-type", "R"),
    "fhir.history_system": ("history-system", "R"),
    "fhir.search_type": ("search-type", "E"),
    "fhir.search_post": ("search-type", "E"),
    "bundles.system_bundle": ("batch", "E"),  # the handler says when it is a transaction
    "operations.everything": ("operation", "E"),
    "operations.medication_history": ("operation", "E"),
    "operations.medication_history_definition": ("read", "R"),
    "operations.validate": ("operation", "E"),
    "iop.post_records": ("create", "C"),
    "iop.put_record": ("update", "U"),
    "iop.get_record": ("read", "R"),
    "iop.get_discharge": ("read", "R"),
    "iop.get_reconciliation": ("read", "R"),
    "ncpdp.receive": ("create", "C"),
}
_BY_METHOD = {"GET": ("read", "R"), "POST": ("operation", "E"), "PUT": ("update", "U"), "PATCH": ("patch", "U"), "DELETE": ("delete", "D")}
# where the data of an endpoint leaves, for the disclosure's AuditEvent (the rest: "rest")
_EXITS = {"operations.everything": "everything", "operations.medication_history": "medication-history"}

_GATEKEEPER = "iop_fhir_gatekeeper"
_RECIPIENT = "iop_fhir_recipient"
_NOTED = "iop_fhir_audit_noted"
_RECORDED = "iop_fhir_audit_recorded"
_SUBTYPE = "iop_fhir_audit_subtype"


class AuditRecordsRefused(IopFhirError):
    """A recipient asked for the audit trail, which only the program's own systems read."""

    status = 403
    issue_code = "forbidden"

    @classmethod
    def of(cls, resource_type: str) -> AuditRecordsRefused:
        message = f"{resource_type} resources are served to the program's own systems only"
        return cls(message, [Issue(message, code="forbidden")])


def gate() -> PrivacyGate:
    """The application's privacy gate (set up by ``server.create_app``)."""
    return current_app.extensions[GATE_KEY]


def audit_log() -> AuditLog:
    return gate().audit


def recipient() -> Recipient | None:
    """The recipient this request's data goes to; None for the program itself."""
    if _RECIPIENT not in g:
        setattr(g, _RECIPIENT, recipient_for_client(current_client(), current_app.config))
    return g.get(_RECIPIENT)


def requester() -> str:
    """Who asks: the client id, ``development`` with AUTH off, ``unauthenticated`` before a token."""
    client = current_client()
    if client is None:
        return "unauthenticated"
    return client.client_id or client.subject or "unknown client"


# --- the decision --------------------------------------------------------------------------------


def _same_version(copy: JSON, original: JSON) -> bool:
    meta_a, meta_b = copy.get("meta") or {}, original.get("meta") or {}
    return (copy.get("resourceType"), copy.get("id"), meta_a.get("versionId")) == (
        original.get("resourceType"),
        original.get("id"),
        meta_b.get("versionId"),
    )


@dataclass
class Gatekeeper:
    """One request's consent decisions for its recipient (see the module doc).

    Decisions are made at one moment (``at``, when the request began deciding) with the
    consents read once per patient, and audited together when the response is out.
    """

    gate: PrivacyGate
    recipient: Recipient
    who: str
    exit: str
    at: datetime | None = None
    withheld: int = 0
    redacted: int = 0
    notice: str | None = None
    break_glass: bool = False  # an emergency let something out that no consent did
    rounds: list[tuple[Disclosure, list[JSON]]] = field(default_factory=list)
    _terms: list[ConsentTerms] = field(default_factory=list)
    _loaded: set[str] = field(default_factory=set)
    _resolve: StoreResolver | None = None

    def __post_init__(self) -> None:
        self.at = self.at or self.gate.clock()
        self._resolve = self.gate.resolver()

    def screen(self, found: Sequence[Saved]) -> list[Saved]:
        """What of ``found`` the recipient may see, in order: released copies (``Saved.resource``
        is the copy, ``Saved.data`` None). A deletion is shown when the version it ended would be."""
        return self._decide(found, disclosed=True)

    def count(self, found: Sequence[Saved]) -> int:
        """How many of ``found`` the recipient may see: decided, not disclosed (a total, which
        leaves the withheld out and says so, but shows nothing that needs the notice)."""
        return len(self._decide(found, disclosed=False))

    def _decide(self, found: Sequence[Saved], *, disclosed: bool) -> list[Saved]:
        decided: dict[int, Saved] = {}
        layers: list[tuple[set[tuple[str, str]], list[tuple[int, Saved, JSON]]]] = []
        for index, saved in enumerate(found):
            content = None if saved.resource_type in READ_ONLY_TYPES else self._content(saved)
            if content is None:
                self.withheld += 1
                continue
            key = (saved.resource_type, saved.id)
            # a history holds several versions of one resource: a layer decides each resource once
            for keys, items in layers:
                if key not in keys:
                    break
            else:
                keys, items = set(), []
                layers.append((keys, items))
            keys.add(key)
            items.append((index, saved, content))
        for _, items in layers:
            resources = [content for _, _, content in items]
            disclosure = self.gate.disclosure(resources, self.recipient, at=self.at, consents=self._consents(resources), resolve=self._resolve)
            self.withheld += disclosure.withheld_count
            if disclosed:
                self.rounds.append((disclosure, resources))
                self.redacted += disclosure.redacted_count
                self.notice = self.notice or disclosure.notice
                self.break_glass = self.break_glass or disclosure.break_glass
            copies = iter(disclosure.permitted)
            copy = next(copies, None)
            for index, saved, content in items:
                if copy is not None and _same_version(copy, content):
                    decided[index] = saved if saved.deleted else replace(saved, data=None, _resource=copy)
                    copy = next(copies, None)
        return [decided[i] for i in sorted(decided)]

    def _content(self, saved: Saved) -> JSON | None:
        if not saved.deleted:
            return saved.resource
        try:
            return self.gate.store.vread(saved.resource_type, saved.id, saved.version - 1).resource
        except (NotFound, Gone):
            return None

    def _consents(self, resources: list[JSON]) -> list[ConsentTerms]:
        patients = self.gate.patients(resources, self._resolve) - self._loaded
        if patients:
            self._terms += self.gate.consents(patients)
            self._loaded |= patients
        return self._terms

    def outcome(self) -> list[Issue]:
        issues = []
        if self.withheld or self.redacted:
            issues.append(Issue(WITHHELD, severity="information", code="suppressed"))
        if self.notice:
            issues.append(Issue(self.notice, severity="information", code="informational"))
        return issues

    def bundle_meta(self) -> JSON | None:
        return bundle_meta(self.withheld, self.redacted, self.notice)

    def audit(self, *, delivered: bool) -> None:
        """Audit every decision of the request, per patient: rounds that decided distinct
        resources are joined, so a search page and its includes make one event per patient."""
        groups: list[tuple[set[str], list[Disclosure], list[JSON]]] = []
        for disclosure, resources in self.rounds:
            names = {name_of(r, i) for i, r in enumerate(resources)}
            group = next((grp for grp in groups if not grp[0] & names), None)
            if group is None:
                groups.append(group := (set(), [], []))
            group[0].update(names)
            group[1].append(disclosure)
            group[2].extend(resources)
        for _, disclosures, resources in groups:
            self.gate.audit_disclosure(
                combine(disclosures), resources, self.recipient, exit=self.exit, who=self.who, at=self.at,
                delivered=delivered, resolve=self._resolve,
            )  # fmt: skip
        self.rounds.clear()


def gatekeeper() -> Gatekeeper | None:
    """This request's Gatekeeper; None when the data stays with the program (no decision)."""
    if _GATEKEEPER not in g:
        found = recipient()
        keeper = None
        if found is not None:
            endpoint = request.endpoint or ""
            keeper = Gatekeeper(gate(), found, requester(), _exit(endpoint))
        setattr(g, _GATEKEEPER, keeper)
    return g.get(_GATEKEEPER)


def visible(saved: Saved) -> Saved | None:
    """The version as this request may see it: as stored for the program itself, else the
    released copy, or None when it is withheld."""
    keeper = gatekeeper()
    if keeper is None:
        return saved
    found = keeper.screen([saved])
    return found[0] if found else None


def shown(saved: Saved) -> Saved:
    """The version a read may answer with (:func:`visible`).

    :raises ConsentDenied: withheld from this recipient (403, ``suppressed``), saying nothing
        of what it holds.
    """
    found = visible(saved)
    if found is None:
        raise ConsentDenied(NOT_AVAILABLE, [Issue(NOT_AVAILABLE, code="suppressed")])
    return found


def require_program(resource_type: str | None) -> None:
    """Refuse a recipient a search or history of the audit trail (403): only the program's
    own systems read AuditEvents (a read by id is withheld like any other)."""
    if resource_type in READ_ONLY_TYPES and gatekeeper() is not None:
        raise AuditRecordsRefused.of(resource_type)


# --- the audit -----------------------------------------------------------------------------------


@dataclass
class _Noted:
    references: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)


def note(*touched: Saved | str, listed: bool = True, patients: Iterable[str] = (), current: bool = False) -> None:
    """What the request touched, for its AuditEvent: each version's reference (unless
    ``listed`` is False: a search records its query, and the patients of what it returned)
    and the patients whose compartment holds it. ``current``: every version given is its
    resource's current one (a search page), so the patients come from the search index (read
    with the page, else in a query per type) instead of from each document."""
    noted: _Noted = g.setdefault(_NOTED, _Noted())
    noted.patients.extend(p if p.startswith("Patient/") else f"Patient/{p}" for p in patients)
    by_type: dict[str, list[Saved]] = {}
    for item in touched:
        if isinstance(item, str):
            noted.references.append(item)
            continue
        if listed:
            noted.references.append(item.location if not item.deleted else item.reference)
        if item.deleted or item.resource_type == "AuditEvent":
            continue
        if current and item.patients is not None:  # the search read them with the page
            noted.patients.extend(f"Patient/{p}" for p in sorted(item.patients))
        elif current:
            by_type.setdefault(item.resource_type, []).append(item)
        else:
            _note_patients(noted, item)
    for resource_type, items in by_type.items():
        found = store().patient_ids(resource_type, {item.id: item.version for item in items})
        for item in items:
            if item.id in found:
                noted.patients.extend(f"Patient/{p}" for p in sorted(found[item.id]))
            else:  # changed since the page was read: the version shown says whose it is
                _note_patients(noted, item)


def _note_patients(noted: _Noted, item: Saved) -> None:
    noted.patients.extend(f"Patient/{p}" for p in sorted(compartment_patients(item.resource_type, item.view)))


def note_interaction(subtype: str) -> None:
    """The restful-interaction code when the route alone does not tell it (``transaction``)."""
    setattr(g, _SUBTYPE, subtype)


def _url_entity() -> str | None:
    args = request.view_args or {}
    rtype = args.get("resource_type") or args.get("rtype")
    if "pid" in args:
        return f"Patient/{args['pid']}"
    if rtype and args.get("id"):
        return f"{rtype}/{args['id']}" + (f"/_history/{args['vid']}" if args.get("vid") else "")
    if rtype and (request.method == "GET" or request.path.endswith("/_search")) and "/_history" not in request.path:
        query = request.query_string.decode("utf-8", "replace")
        if request.path.endswith("/_search") and request.form:
            query = "&".join(filter(None, [query, request.get_data(as_text=True)]))
        return f"{rtype}?{query}"
    if request.path.startswith(("/iop", "/admin")) or (rtype is None and request.method == "GET"):
        return request.full_path.rstrip("?")
    return None


def _detail(response: Response) -> str | None:
    if response.status_code < 400:
        return None
    body = response.get_json(silent=True) if response.is_json else None
    issues = body.get("issue") if isinstance(body, dict) else None
    first = issues[0].get("diagnostics") if isinstance(issues, list) and issues and isinstance(issues[0], dict) else None
    return f"HTTP {response.status_code}" + (f": {first}" if first else "")


def _outcome(status: int) -> str:
    return "0" if status < 400 else "4" if status < 500 else "8"


def _exit(endpoint: str) -> str:
    """Where the data of an endpoint leaves: ``rest``, ``everything``, ``iop-record``, ..."""
    if endpoint in _EXITS:
        return _EXITS[endpoint]
    top = request.path.split("/")[1] if request.path.count("/") else ""
    return {"fhir": "rest", "iop": "iop-record"}.get(top, top or "rest")


def request_event(status: int, detail: str | None = None, *, break_glass: bool = False) -> JSON:
    """The AuditEvent of the current request, answered with ``status``.

    :param break_glass: the request let data out only by an emergency.
    """
    endpoint = request.endpoint or ""
    subtype, action = _INTERACTIONS.get(endpoint) or _BY_METHOD.get(request.method, ("operation", "E"))
    if endpoint.startswith(("admin.", "ncpdp.")) and endpoint != "ncpdp.receive":
        subtype, action = _BY_METHOD["GET"] if request.method == "GET" else ("operation", "E")
    subtype = g.get(_SUBTYPE) or subtype
    noted: _Noted = g.get(_NOTED) or _Noted()
    entities = [e for e in [_url_entity()] if e] + noted.references
    entities += sorted(set(noted.patients))
    client = current_client()
    found = recipient() if client is not None else None
    if found is not None:
        found = gate().known(found)  # named by its references too: searchable by agent
    purpose = found.purpose if found else (client.purpose_of_use[0] if client and client.purpose_of_use else None)
    event = audit_event(
        action=action,
        subtype=subtype,
        outcome=_outcome(status),
        who=requester(),
        recipient=found,
        entities=entities,
        patient=None,
        purpose=purpose,
        exit=_exit(endpoint),
        break_glass=break_glass,
        detail=detail,
        recorded=gate().clock(),
    )
    if request.remote_addr:
        event["agent"][0]["network"] = {"address": request.remote_addr, "type": "2"}
    return event


def audit_write(uow: UnitOfWork, *written: Saved | str) -> None:
    """Record the request's AuditEvent in the write's own unit of work: it commits with the
    write or not at all. A request that still fails afterwards gets a failure event too."""
    note(*written)
    keeper: Gatekeeper | None = g.get(_GATEKEEPER)
    audit_log().record(request_event(200, break_glass=keeper is not None and keeper.break_glass), uow=uow)
    setattr(g, _RECORDED, True)


def _audited(path: str) -> bool:
    return path.startswith(AUDITED_PREFIXES) and not is_public(path) and request.method != "OPTIONS"


def _after_request(response: Response) -> Response:
    """Audit the request and its disclosures; mark a response that carries released data."""
    if not _audited(request.path):
        return response
    status = response.status_code
    try:
        keeper: Gatekeeper | None = g.get(_GATEKEEPER)
        glass = keeper is not None and keeper.break_glass and status < 400
        if keeper is not None:
            keeper.audit(delivered=status < 400)
            if status < 400 and keeper.notice:
                response.headers[NOTICE_HEADER] = keeper.notice
            if status < 400 and (keeper.withheld or keeper.redacted):
                response.headers[WITHHELD_HEADER] = "consent-policy"
        if not g.get(_RECORDED) or status >= 400:
            audit_log().record(request_event(status, _detail(response), break_glass=glass))
    except Exception:  # the answer is out; a failing audit is logged loudly, never turned into a 500
        log.exception("cannot audit %s %s", request.method, request.path)
    return response


def init_app(app: Flask) -> None:
    """Install the audit of every request (after the response is built)."""
    app.after_request(_after_request)
    if app.config.get("AUTH") == "off":
        log.warning(
            "Consent enforcement (42 CFR Part 2) applies to authenticated clients only: with AUTH off every "
            "caller is the program itself, nothing is withheld, and every access is still audited."
        )
