"""The versioned FHIR store: resources, search, and the outbox of pending deliveries.

``Store.open(url)`` is the way in; see :mod:`iop_fhir.store.resources` for the operations,
:mod:`iop_fhir.store.search_index` for the search parameters and their semantics, and
:mod:`iop_fhir.store.outbox` for the delivery queue. SQLAlchemy stays inside this package.
"""

from iop_fhir.store.outbox import Delivery, DeliveryState, DestinationStats, Outbox
from iop_fhir.store.paging import Page
from iop_fhir.store.resources import Saved, Store, UnitOfWork, instant, new_id, utc_now
from iop_fhir.store.search_index import InvalidSearch, SearchParam, search_parameters

__all__ = [
    "Delivery",
    "DeliveryState",
    "DestinationStats",
    "InvalidSearch",
    "Outbox",
    "Page",
    "Saved",
    "SearchParam",
    "Store",
    "UnitOfWork",
    "instant",
    "new_id",
    "search_parameters",
    "utc_now",
]
