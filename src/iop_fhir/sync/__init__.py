"""Keeping outside systems in step: destinations, delivery through the outbox, pull, discharge.

* :mod:`~iop_fhir.sync.destinations` — the ``[[destination]]`` settings and the router that puts
  each stored change in scope on a destination's queue (in the change's own transaction).
"""
