"""Keeping outside systems in step: destinations, delivery through the outbox, pull, discharge.

* :mod:`~iop_fhir.sync.destinations` — the ``[[destination]]`` settings and the router that puts
  each stored change in scope on a destination's queue (in the change's own transaction).
* :mod:`~iop_fhir.sync.worker` — drains the outbox: batches, retries with backoff, dead letters,
  the channel per destination kind; schedules pulls.
* :mod:`~iop_fhir.sync.outgoing` — deliveries as one transaction Bundle of conditional updates.
* :mod:`~iop_fhir.sync.fhir_client` and :mod:`~iop_fhir.sync.smart_backend` — the FHIR REST
  connector (session, timeouts, error classification) and SMART Backend Services tokens.
* :mod:`~iop_fhir.sync.pull` and :mod:`~iop_fhir.sync.reconcile` — incremental reads from an EHR,
  merged beside the IOP's own data, conflicts flagged.
* :mod:`~iop_fhir.sync.discharge` — the discharge continuity package for the aftercare provider.
"""
