"""The scheduled check for overdue medication-assisted treatment (MAT) refills.

Adherence is recomputed when a fill arrives (:func:`iop_fhir.pharmacy.inbound.update_adherence`).
A discharged client who stops filling sends nothing, so nothing would ever raise the overdue-MAT
Flag. :func:`check_adherence` closes that gap: it finds every patient with an active MAT order
(by our extension or the drug, :func:`iop_fhir.pharmacy.adherence.is_mat`) whose latest
EpisodeOfCare has ended, and runs ``update_adherence`` for each, in a unit of work of its own, so
one patient's failure neither undoes nor stops the others.

It writes Flags only (``with_pdc=False``): without a new fill the PDC is merely a day older, and
an Observation per prescription per discharged client per day, for ever, would bury the signal;
PDC is recomputed when fills arrive. A Flag is upserted by its identifier, so a check that finds
nothing new writes nothing, and running it from several workers at once is harmless.

Run by the long-running worker every ``MAT_CHECK_INTERVAL`` seconds (``sync/worker.py``) and by
``iop-fhir ncpdp check-adherence``.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from iop_fhir.api.operations import every
from iop_fhir.errors import IopFhirError
from iop_fhir.mappers.datatypes import as_dict, nonblank
from iop_fhir.mappers.medication_request import ORDER_INTENTS
from iop_fhir.pharmacy.adherence import is_mat
from iop_fhir.pharmacy.inbound import InboundOptions, adherence_base, discharge_date, update_adherence
from iop_fhir.store import Saved, Store, UnitOfWork
from iop_fhir.store.search_index import parse_reference

log = logging.getLogger(__name__)

JSON = dict[str, Any]


@dataclass(frozen=True)
class AdherenceCheck:
    """What one check found and did."""

    checked: tuple[str, ...] = ()  # discharged patients with an active MAT order ("Patient/{id}")
    written: tuple[str, ...] = ()  # the Flags that changed ("Flag/{id}")
    active: tuple[str, ...] = ()  # the MAT Flags active after the check, changed or not
    failed: dict[str, str] = field(default_factory=dict)  # patient -> why its check failed


def mat_orders(store: Store) -> dict[str, JSON]:
    """Each patient with an active MAT order, and one of those orders (the first by id): the
    one whose identifier base the patient's adherence resources are written under."""
    criteria = [("status", "active"), ("intent", ",".join(sorted(ORDER_INTENTS)))]
    out: dict[str, JSON] = {}
    for saved in sorted(every(store, "MedicationRequest", criteria), key=lambda s: s.id):
        subject = parse_reference(nonblank(as_dict(saved.resource.get("subject")).get("reference")) or "")
        if subject is None or subject[0] != "Patient" or not is_mat(saved.resource):
            continue
        out.setdefault(f"Patient/{subject[1]}", saved.resource)
    return out


def check_adherence(store: Store, options: InboundOptions, *, now: dt.datetime | None = None) -> AdherenceCheck:
    """Raise, keep or close the overdue-MAT Flags of every discharged patient with an active MAT
    order, as of ``now`` (default: the store's clock); see the module docstring."""
    now = now or store.clock()
    checked: list[str] = []
    written: list[str] = []
    active: list[str] = []
    failed: dict[str, str] = {}
    for patient, order in sorted(mat_orders(store).items()):
        if discharge_date(store, patient) is None:
            continue  # still in the program: its staff see the client
        checked.append(patient)

        def run(uow: UnitOfWork, patient: str = patient, order: JSON = order) -> list[Saved]:
            return update_adherence(store, uow, patient, now=now, identifier_base=adherence_base(order), options=options, with_pdc=False)

        try:
            saved = store.transaction(run)
        except IopFhirError as exc:
            log.warning("MAT check of %s failed: %s", patient, exc.message)
            failed[patient] = exc.message
            continue
        except Exception as exc:  # a bug, or the database away: the next patient, and the next check, may fare better
            log.exception("MAT check of %s failed", patient)
            failed[patient] = f"internal error ({type(exc).__name__}); see the log"
            continue
        flags = [s for s in saved if s.resource_type == "Flag"]
        written += [s.reference for s in flags if s.changed]
        active += [s.reference for s in flags if s.resource.get("status") == "active"]
    result = AdherenceCheck(tuple(checked), tuple(written), tuple(active), failed)
    log.info(
        "MAT check: %d discharged patients with MAT orders, %d Flags written, %d active, %d failed",
        len(result.checked), len(result.written), len(result.active), len(result.failed),
    )  # fmt: skip
    return result


__all__ = ["AdherenceCheck", "check_adherence", "mat_orders"]
