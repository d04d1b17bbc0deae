"""The pharmacy side of the gateway: NCPDP SCRIPT exchange and adherence from pharmacy fills.

* :mod:`.script_mapping` -- FHIR <-> SCRIPT messages (NewRx and CancelRx out, RxFill and
  RxHistoryResponse in as MedicationDispense/MedicationStatement, renewal and change requests
  as review Tasks and their responses); the wire format is :mod:`iop_fhir.formats.ncpdp`.
* :mod:`.controlled` -- the controlled-substance rules checked before anything is sent.
* :mod:`.adherence` -- proportion of days covered, refill gaps, overdue MAT refills.
* :mod:`.monitor` -- the scheduled check for overdue MAT refills of discharged clients who stop filling.

Submodules are imported where used; this package imports none of them.
"""
