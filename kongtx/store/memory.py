"""``MemoryStore``: an :class:`~kongtx.store.interface.IStore` in plain dicts.

Used by tests and as the base of DB-less mode. Every method returns an
already-fired Deferred. Rows are deep-copied in and out, so callers never share
state with the store. Unique values, cache keys and foreign keys are indexed so
that loading thousands of rows stays linear.
"""

from __future__ import annotations

import copy
import functools
import heapq
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from kongtx.store.interface import (
    ChangeEvent,
    EntityMeta,
    ForeignKeyViolation,
    IStore,
    NotFoundError,
    ReferencedByOthers,
    Row,
    UniqueViolation,
    UnsupportedFilter,
    cache_key_fields,
    cache_key_text,
    decode_offset,
    encode_offset,
    foreign_id,
    index_value,
    normalize_where,
    order_value,
    references,
    row_id,
    sort_key,
)

_log = Logger()

_T = TypeVar("_T")


def _fired(method: Callable[..., _T]) -> Callable[..., "defer.Deferred[_T]"]:
    """Runs ``method`` now and returns its result or exception as a fired Deferred."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> "defer.Deferred[_T]":
        try:
            return defer.succeed(method(*args, **kwargs))
        except Exception:
            return defer.fail()

    return wrapper


def notify(listeners: List[Callable[[ChangeEvent], Any]], events: List[ChangeEvent]) -> None:
    """Delivers ``events`` in order to every listener, logging (never raising) their errors."""
    for event in events:
        for listener in list(listeners):
            try:
                listener(event)
            except Exception:
                _log.failure(
                    "store listener {listener!r} failed on {event!r}",
                    listener=listener,
                    event=event,
                )


class ListenerRegistry:
    """``add_listener``/``remove_listener`` of every store; the store keeps the
    callbacks in ``self._listeners`` and calls :func:`notify` after each commit."""

    _listeners: List[Callable[[ChangeEvent], Any]]

    def add_listener(self, callback: Callable[[ChangeEvent], Any]) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[ChangeEvent], Any]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)


class Counters:
    """Windowed counters in a dict, checked and added in one synchronous step.

    Used by :class:`MemoryStore` and by the rate-limiting ``local`` policy. A
    counter expires ``ttl`` seconds after its window starts. Expired counters
    are dropped when a newer window start is first seen (it stands for "now",
    so nothing is dropped early), through an index of counters by expiry time:
    the work is proportional to the counters that expired, not to all of them.
    """

    def __init__(self) -> None:
        self.values: Dict[Tuple[str, int], List[int]] = {}
        self._latest = 0
        #: Counter keys by expiry time, and those times in a heap.
        self._expiring: Dict[int, List[Tuple[str, int]]] = {}
        self._expiries: List[int] = []

    def get(self, counter_key: str, window_start: int) -> int:
        """The counter's value (0 when absent)."""
        found = self.values.get((counter_key, window_start))
        return found[0] if found is not None else 0

    def increment(
        self, counter_key: str, window_start: int, ttl: int, amount: int = 1,
        limit: Optional[int] = None,
    ) -> int:
        """Adds ``amount`` unless the result would exceed ``limit``; see ``IStore.increment``."""
        key = (counter_key, window_start)
        found = self.values.get(key)
        value = (found[0] if found is not None else 0) + amount
        if limit is not None and value > limit:
            return value
        if found is None:
            expires = window_start + ttl
            self.values[key] = [value, expires]
            keys = self._expiring.get(expires)
            if keys is None:
                self._expiring[expires] = [key]
                heapq.heappush(self._expiries, expires)
            else:
                keys.append(key)
            if window_start > self._latest:
                self._latest = window_start
                self._sweep()
        else:
            found[0] = value
        return value

    def _sweep(self) -> None:
        """Drop the counters that expired before the newest window start."""
        expiries = self._expiries
        latest = self._latest
        values = self.values
        while expiries and expiries[0] < latest:
            for key in self._expiring.pop(heapq.heappop(expiries)):
                del values[key]


class _Table:
    """One entity's rows and indexes."""

    def __init__(self, meta: EntityMeta) -> None:
        self.meta = meta
        self.rows: Dict[str, Row] = {}
        self.unique: Dict[str, Dict[Any, str]] = {field: {} for field in meta.unique}
        self.cache_keys: Dict[str, str] = {}
        self.foreign: Dict[str, Dict[Optional[str], Set[str]]] = {f: {} for f in meta.foreign}

    def conflict(self, row: Row) -> Optional[Dict[str, Any]]:
        """The ``fields`` of the unique violation ``row`` would cause, if any.

        The row's own id is ignored (an update does not conflict with itself).
        """
        id = row["id"]
        for field in self.meta.unique:
            value = row.get(field)
            if value is None:
                continue
            owner = self.unique[field].get(index_value(self.meta, field, value))
            if owner is not None and owner != id:
                return {field: value}
        text = cache_key_text(self.meta, row)
        if text is not None:
            owner = self.cache_keys.get(text)
            if owner is not None and owner != id:
                return cache_key_fields(self.meta, row)
        return None

    def add(self, row: Row) -> None:
        id = row["id"]
        self.rows[id] = row
        for field in self.meta.unique:
            value = index_value(self.meta, field, row.get(field))
            if value is not None:
                self.unique[field][value] = id
        text = cache_key_text(self.meta, row)
        if text is not None:
            self.cache_keys[text] = id
        for field in self.meta.foreign:
            self.foreign[field].setdefault(foreign_id(row.get(field)), set()).add(id)

    def remove(self, id: str) -> Row:
        row = self.rows.pop(id)
        for field in self.meta.unique:
            value = index_value(self.meta, field, row.get(field))
            if value is not None and self.unique[field].get(value) == id:
                del self.unique[field][value]
        text = cache_key_text(self.meta, row)
        if text is not None and self.cache_keys.get(text) == id:
            del self.cache_keys[text]
        for field in self.meta.foreign:
            target = foreign_id(row.get(field))
            ids = self.foreign[field].get(target)
            if ids is not None:
                ids.discard(id)
                if not ids:
                    del self.foreign[field][target]
        return row

    def matching(self, where: Mapping[str, Any]) -> List[Row]:
        """The rows equal to every filter of a normalized ``where``, unordered."""
        candidates: Optional[List[Row]] = None
        for field, value in where.items():
            if field == "id":
                row = self.rows.get(value)
                candidates = [row] if row is not None else []
            elif field in self.meta.foreign:
                ids = self.foreign[field].get(value, ())
                candidates = [self.rows[i] for i in ids]
            elif value is not None:
                owner = self.unique[field].get(value)
                candidates = [self.rows[owner]] if owner is not None else []
            if candidates is not None:
                break
        if candidates is None:
            candidates = list(self.rows.values())
        return [row for row in candidates if _matches(self.meta, row, where)]


def _matches(meta: EntityMeta, row: Row, where: Mapping[str, Any]) -> bool:
    for field, value in where.items():
        actual = row.get(field)
        if field in meta.foreign:
            actual = foreign_id(actual)
        if actual != value:
            return False
    return True


class _Transaction:
    """Applies changes to the tables, remembering how to undo them and what to announce."""

    def __init__(self, tables: Dict[str, _Table]) -> None:
        self._tables = tables
        self._undo: List[Callable[[], None]] = []
        self.events: List[ChangeEvent] = []

    def put(self, entity: str, row: Row, op: str) -> None:
        table = self._tables[entity]
        conflict = table.conflict(row)
        if conflict is not None:
            raise UniqueViolation(entity, conflict)
        id = row["id"]
        old = table.remove(id) if id in table.rows else None
        table.add(row)

        def undo() -> None:
            table.remove(id)
            if old is not None:
                table.add(old)

        self._undo.append(undo)
        self.events.append(
            ChangeEvent(entity, op, id, copy.deepcopy(old), copy.deepcopy(row))
        )

    def remove(self, entity: str, id: str) -> None:
        table = self._tables[entity]
        old = table.remove(id)
        self._undo.append(lambda: table.add(old))
        self.events.append(ChangeEvent(entity, "delete", id, copy.deepcopy(old), None))

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        self.events = []


@implementer(IStore)
class MemoryStore(ListenerRegistry):
    """An in-memory store with the semantics of every other backend."""

    def __init__(self, entities: Mapping[str, EntityMeta]) -> None:
        self._references = references(entities)
        self._tables: Dict[str, _Table] = {
            name: _Table(meta) for name, meta in entities.items()
        }
        self._listeners: List[Callable[[ChangeEvent], Any]] = []
        self._counters = Counters()

    # -- lifecycle --------------------------------------------------------------

    @_fired
    def start(self) -> None:
        return None

    @_fired
    def stop(self) -> None:
        return None

    @_fired
    def ping(self) -> bool:
        return True

    # -- reads ------------------------------------------------------------------

    @_fired
    def get(self, entity: str, id: str) -> Optional[Row]:
        return copy.deepcopy(self._table(entity).rows.get(id))

    @_fired
    def get_by(self, entity: str, field: str, value: Any) -> Optional[Row]:
        table = self._table(entity)
        if field == "id":
            return copy.deepcopy(table.rows.get(value))
        if field not in table.meta.unique:
            raise UnsupportedFilter(entity, field)
        value = index_value(table.meta, field, value)
        if value is None:
            return None
        owner = table.unique[field].get(value)
        return copy.deepcopy(table.rows[owner]) if owner is not None else None

    @_fired
    def page(
        self,
        entity: str,
        size: int,
        offset: Optional[str] = None,
        where: Optional[Mapping[str, Any]] = None,
    ) -> Tuple[List[Row], Optional[str]]:
        if size < 1:
            raise ValueError(f"page size must be at least 1, got {size!r}")
        table = self._table(entity)
        after = decode_offset(offset) if offset is not None else None
        rows = self._ordered(table, normalize_where(table.meta, where))
        if after is not None:
            cursor = sort_key(after[0], after[1])
            rows = [r for r in rows if sort_key(order_value(table.meta, r), r["id"]) > cursor]
        chosen = rows[:size]
        next_offset = None
        if len(rows) > size:
            last = chosen[-1]
            next_offset = encode_offset(order_value(table.meta, last), last["id"])
        return copy.deepcopy(chosen), next_offset

    @_fired
    def all(self, entity: str, where: Optional[Mapping[str, Any]] = None) -> List[Row]:
        table = self._table(entity)
        return copy.deepcopy(self._ordered(table, normalize_where(table.meta, where)))

    # -- writes -----------------------------------------------------------------

    @_fired
    def insert(self, entity: str, row: Row) -> Row:
        table = self._table(entity)
        id = row_id(table.meta, row)
        if id in table.rows:
            raise UniqueViolation(entity, {"id": id})
        return self._write(entity, copy.deepcopy(dict(row)), "create")

    @_fired
    def update(self, entity: str, row: Row) -> Row:
        table = self._table(entity)
        id = row_id(table.meta, row)
        if id not in table.rows:
            raise NotFoundError(entity, id)
        return self._write(entity, copy.deepcopy(dict(row)), "update")

    @_fired
    def delete(self, entity: str, id: str) -> bool:
        if id not in self._table(entity).rows:
            return False
        txn = _Transaction(self._tables)
        try:
            self._delete(txn, entity, id, set())
        except BaseException:
            txn.rollback()
            raise
        notify(self._listeners, txn.events)
        return True

    # -- counters ---------------------------------------------------------------

    @_fired
    def increment(
        self,
        counter_key: str,
        window_start: int,
        ttl: int,
        amount: int = 1,
        limit: Optional[int] = None,
    ) -> int:
        return self._counters.increment(counter_key, window_start, ttl, amount, limit)

    # -- listeners --------------------------------------------------------------

    # -- internals --------------------------------------------------------------

    def _table(self, entity: str) -> _Table:
        try:
            return self._tables[entity]
        except KeyError:
            raise ValueError(f"unknown entity {entity!r}") from None

    def _ordered(self, table: _Table, where: Mapping[str, Any]) -> List[Row]:
        meta = table.meta
        rows = table.matching(where)
        rows.sort(key=lambda r: sort_key(order_value(meta, r), r["id"]))
        return rows

    def _check_foreign(self, entity: str, row: Row) -> None:
        meta = self._tables[entity].meta
        for field, fk in meta.foreign.items():
            value = row.get(field)
            target = foreign_id(value)
            if target is not None and target not in self._tables[fk.entity].rows:
                raise ForeignKeyViolation(entity, field, fk.entity, value)

    def _write(self, entity: str, row: Row, op: str) -> Row:
        order_value(self._tables[entity].meta, row)
        self._check_foreign(entity, row)
        txn = _Transaction(self._tables)
        try:
            txn.put(entity, row, op)
        except BaseException:
            txn.rollback()
            raise
        notify(self._listeners, txn.events)
        return copy.deepcopy(row)

    def _delete(
        self, txn: _Transaction, entity: str, id: str, seen: Set[Tuple[str, str]]
    ) -> None:
        """Deletes one row after applying the ``on_delete`` of everything pointing at it."""
        seen.add((entity, id))
        for ref in self._references[entity]:
            table = self._tables[ref.entity]
            ids = sorted(
                i for i in table.foreign[ref.field].get(id, ()) if (ref.entity, i) not in seen
            )
            if not ids:
                continue
            if ref.on_delete == "restrict":
                raise ReferencedByOthers(entity, ref.entity)
            for child in ids:
                if child not in table.rows:
                    continue
                if ref.on_delete == "cascade":
                    self._delete(txn, ref.entity, child, seen)
                else:
                    nulled = copy.deepcopy(table.rows[child])
                    nulled[ref.field] = None
                    txn.put(ref.entity, nulled, "update")
        txn.remove(entity, id)
