"""Keyset paging: pages that stay correct while data changes.

An offset (``skip 40``) shifts when rows are inserted or deleted before it, so a client
following ``next`` links sees rows twice or never. A keyset cursor instead records the sort
values of the last row shown, and the next page is "rows after that position" — an indexed
range scan that ignores what happened elsewhere. Every ordering ends with a unique column
(the resource id, or the version), so positions are total and no two rows tie.

What "correct while data changes" means here: no row that stays put is skipped or shown twice.
New resources sort after the position (by ``_lastUpdated``) and show up on later pages; a
deleted one drops out; an *updated* one moves to its new place (in a ``_lastUpdated`` order:
the end), so a client may meet it again, newer.

Cursors are opaque to clients (URL-safe base64 of a small JSON document) and name the
ordering they belong to, so a cursor cannot be replayed against another ``_sort``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from sqlalchemy import ColumnElement, Connection, Engine, Select, Subquery, and_, bindparam, or_

from iop_fhir.errors import Issue
from iop_fhir.store.db import PreparedCache
from iop_fhir.store.search_index import InvalidSearch

T = TypeVar("T")


@dataclass(frozen=True)
class SortKey:
    """One ordering column: an expression and its direction."""

    expression: ColumnElement[Any]
    descending: bool = False


@dataclass
class Page(Generic[T]):
    """One page of results, with cursors for its neighbours.

    :param entries: the rows of this page, in the requested order.
    :param next_cursor: pass as ``cursor`` for the following page; ``None`` on the last page.
    :param prev_cursor: the same for the page before; ``None`` on the first page.
    :param total: the number of matches when asked for (``total=True``), else ``None``.
    """

    entries: list[T]
    next_cursor: str | None = None
    prev_cursor: str | None = None
    total: int | None = None


def encode_cursor(ordering: str, values: Sequence[Any], forward: bool) -> str:
    raw = orjson.dumps({"o": ordering, "v": list(values), "d": "n" if forward else "p"})
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, ordering: str, width: int) -> tuple[list[Any], bool]:
    """``(values, forward)`` from a cursor made for ``ordering``.

    :raises InvalidSearch: not a cursor of this store, or made for another ordering.
    """
    try:
        doc = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        values, direction = doc["v"], doc["d"]
        valid = (
            doc["o"] == ordering
            and direction in ("n", "p")
            and isinstance(values, list)
            and len(values) == width
            and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in values)
        )
    except (binascii.Error, ValueError, TypeError, KeyError):
        valid = False
    if not valid:
        raise InvalidSearch(
            "the paging cursor is not valid for this search",
            [Issue("invalid or foreign paging cursor (start again from the first page)", location="_cursor")],
        )
    return values, direction == "n"


def _beyond(keys: Sequence[SortKey], values: Sequence[Any], forward: bool) -> ColumnElement[bool]:
    """Rows strictly after (``forward``) or before the position ``values`` in this ordering."""
    alternatives = []
    for i, key in enumerate(keys):
        ascending = key.descending != forward
        step = key.expression > values[i] if ascending else key.expression < values[i]
        alternatives.append(and_(*(keys[j].expression == values[j] for j in range(i)), step))
    return or_(*alternatives)


# Joins what a page shows to the page's rows (a subquery of the build's columns and keys),
# returning a select of the columns ``make`` reads; see fetch_page.
Attach = Callable[[Subquery], Select[Any]]


def _statement(build: Callable[[], tuple[Select[Any], Sequence[SortKey]]], mode: str, attach: Attach | None) -> Select[Any]:
    """The page query: ``build``'s query after/before a bound position, ordered, limited."""
    query, keys = build()
    if mode != "first":
        query = query.where(_beyond(keys, [bindparam(f"page_k{i}") for i in range(len(keys))], mode == "after"))
    forward = mode != "before"
    query = query.add_columns(*(k.expression.label(f"_k{i}") for i, k in enumerate(keys)))
    query = query.order_by(*(k.expression.asc() if k.descending != forward else k.expression.desc() for k in keys))
    query = query.limit(bindparam("page_limit"))
    if attach is None:
        return query
    page = query.subquery("page")
    ordered = [page.c[f"_k{i}"] for i in range(len(keys))]
    return (
        attach(page)
        .add_columns(*ordered)
        .order_by(*(o.asc() if k.descending != forward else o.desc() for o, k in zip(ordered, keys, strict=True)))
    )


def fetch_page(
    target: Engine | Connection,
    cache: PreparedCache,
    *,
    shape: Hashable,
    build: Callable[[], tuple[Select[Any], Sequence[SortKey]]],
    values: dict[str, Any],
    ordering: str,
    width: int,
    count: int,
    cursor: str | None,
    make: Callable[[tuple[Any, ...]], T],
    attach: Attach | None = None,
) -> Page[T]:
    """``count`` rows from ``cursor`` on, of the query ``build`` returns with its sort keys.

    ``shape`` identifies the query up to ``values`` (the statement is compiled once per
    shape); ``ordering`` names the ordering in the cursors and ``width`` is its number of
    keys. ``make`` turns a raw row (the query's columns, then the keys) into an entry.
    ``attach`` adds what only the page's rows need (the stored JSON) after the ordering and
    limit, so the database sorts narrow rows, not every match's document.
    """
    if count <= 0:
        return Page([])
    forward, position = True, None
    if cursor:
        position, forward = decode_cursor(cursor, ordering, width)
    mode = "first" if position is None else ("after" if forward else "before")
    prepared = cache.get((shape, mode), lambda: _statement(build, mode, attach))
    params = {**values, "page_limit": count + 1, **{f"page_k{i}": v for i, v in enumerate(position or ())}}
    rows = prepared.all(target, params)
    more = len(rows) > count
    rows = rows[:count]
    if not forward:
        rows.reverse()

    def at(row: tuple[Any, ...]) -> list[Any]:
        return list(row[-width:])

    if forward:
        next_cursor = encode_cursor(ordering, at(rows[-1]), True) if more else None
        prev_cursor = None
        if position is not None:
            prev_cursor = encode_cursor(ordering, at(rows[0]) if rows else position, False)
    else:
        prev_cursor = encode_cursor(ordering, at(rows[0]), False) if more else None
        next_cursor = encode_cursor(ordering, at(rows[-1]) if rows else position or [], True)
    return Page([make(row) for row in rows], next_cursor, prev_cursor)
