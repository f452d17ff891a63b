"""The entity cache plugins read the database through (Kong's ``kong.cache``).

A proxied request must not query the database on its hot path. When a plugin
needs a row that is not part of the configuration snapshot (a credential by its
key, a consumer), it asks :class:`EntityCache`: a hit is answered synchronously
by :meth:`EntityCache.peek` without allocating a Deferred, a miss goes through
:meth:`EntityCache.get` which runs the caller's loader once however many
requests are waiting for the same key.

* A miss is cached too (a loader that fires with ``None``: a negative entry).
* Entries live ``ttl`` seconds (``0``: until invalidated), negative entries
  ``neg_ttl`` seconds (``None``: like ``ttl``); Kong's ``db_cache_ttl`` and
  ``db_cache_neg_ttl``.
* Invalidation: every entry depends on *tags* (``"consumers:id:<uuid>"``,
  ``"keyauth_credentials:key:<key>"``...) given by its loader through
  :class:`Loaded`. The cache listens to the store's change events, local or
  from another node, and drops every entry depending on a tag of the changed
  row, before or after the change. The ``reload`` event (``entity == "*"``,
  sent after a long outage) drops everything.
* When the database is unreachable (the loader fails with
  :class:`~kongtx.store.interface.StoreUnavailable`), an expired entry is
  served again for ``resurrect_ttl`` seconds (Kong's ``db_resurrect_ttl``); a
  key never seen fails.

Cache keys and tags may hold secrets (API keys): nothing here logs them.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import attr
from twisted.internet import defer
from twisted.python import failure

from kongtx.store.interface import ChangeEvent, StoreUnavailable

__all__ = ["EntityCache", "Loaded", "MISS", "DEFAULT_TAG_FIELDS", "tag", "row_tags"]

#: Returned by :meth:`EntityCache.peek` when the key has no fresh entry.
MISS: Any = type("_Miss", (), {"__repr__": lambda self: "MISS", "__slots__": ()})()

#: Besides ``id``, the fields of a changed row that name it in tags, by entity.
DEFAULT_TAG_FIELDS: Mapping[str, Tuple[str, ...]] = {
    "keyauth_credentials": ("key",),
    "consumers": ("username", "custom_id"),
}

#: The default upper bound on the number of entries (oldest first out).
DEFAULT_MAX_ENTRIES = 100000


def tag(entity: str, field: str, value: Any) -> str:
    """The tag naming the rows of *entity* whose *field* equals *value*."""
    return "%s:%s:%s" % (entity, field, value)


def row_tags(entity: str, row: Optional[Mapping[str, Any]],
             tag_fields: Mapping[str, Tuple[str, ...]] = DEFAULT_TAG_FIELDS) -> List[str]:
    """The tags a change to *row* invalidates: its id and its tag fields' values."""
    if not row:
        return []
    found = []
    if row.get("id") is not None:
        found.append(tag(entity, "id", row["id"]))
    for field in tag_fields.get(entity, ()):
        value = row.get(field)
        if value is not None:
            found.append(tag(entity, field, value))
    return found


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Loaded:
    """What a loader may fire with: the value and the tags it depends on.

    ``value`` ``None`` makes a negative entry. A loader firing with anything
    that is not a ``Loaded`` caches that value with no tags (only the
    ``reload`` event and the ttl end it).
    """

    value: Any
    tags: Tuple[str, ...] = attr.ib(default=(), converter=tuple)


class _Entry:
    __slots__ = ("value", "expires", "tags")

    def __init__(self, value: Any, expires: Optional[float], tags: Tuple[str, ...]) -> None:
        self.value = value
        self.expires = expires
        self.tags = tags


class _Flight:
    """One running load and the requests waiting for it."""

    __slots__ = ("waiters", "invalidated", "cleared")

    def __init__(self) -> None:
        self.waiters: List[defer.Deferred] = []
        self.invalidated: Set[str] = set()
        self.cleared = False


class EntityCache:
    """Values loaded from the store, by key, with negative entries and invalidation.

    :param store: an ``IStore``; the cache registers a change listener on it
        (undo with :meth:`close`).
    :param reactor: gives the time (``seconds()``).
    :param ttl: seconds a value is fresh; ``0`` means until invalidated.
    :param neg_ttl: the same for negative entries; ``None`` means ``ttl``.
    :param resurrect_ttl: seconds an expired entry is served again while the
        store is unavailable.
    """

    def __init__(self, store: Any, reactor: Any, *, ttl: float = 0,
                 neg_ttl: Optional[float] = None, resurrect_ttl: float = 30,
                 tag_fields: Mapping[str, Tuple[str, ...]] = DEFAULT_TAG_FIELDS,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.store = store
        self._reactor = reactor
        self._ttl = float(ttl or 0)
        self._neg_ttl = self._ttl if neg_ttl is None else float(neg_ttl)
        self._resurrect_ttl = float(resurrect_ttl or 0)
        self._tag_fields = dict(tag_fields)
        self._max_entries = max_entries
        self._entries: Dict[Any, _Entry] = {}
        self._by_tag: Dict[str, Set[Any]] = {}
        self._flights: Dict[Any, _Flight] = {}
        self.loads = 0  # how many times a loader ran (for tests and stats)
        store.add_listener(self._on_change)

    @classmethod
    def from_config(cls, store: Any, reactor: Any, config: Any) -> "EntityCache":
        """A cache with ``db_cache_ttl``, ``db_cache_neg_ttl`` and ``db_resurrect_ttl``."""
        return cls(store, reactor, ttl=config.db_cache_ttl,
                   neg_ttl=config.db_cache_neg_ttl,
                   resurrect_ttl=config.db_resurrect_ttl)

    def close(self) -> None:
        """Stop listening to the store and drop every entry."""
        self.store.remove_listener(self._on_change)
        self.clear()

    def now(self) -> float:
        """The reactor's time, in seconds (Unix time on a real reactor)."""
        return float(self._reactor.seconds())

    def __len__(self) -> int:
        return len(self._entries)

    # -- reads -------------------------------------------------------------------

    def peek(self, key: Any) -> Any:
        """The fresh cached value of *key* (``None`` for a negative entry), or :data:`MISS`.

        Synchronous: the hot path of a hit allocates no Deferred.
        """
        entry = self._entries.get(key)
        if entry is None:
            return MISS
        expires = entry.expires
        if expires is not None and expires <= self._reactor.seconds():
            return MISS
        return entry.value

    def get(self, key: Any, loader: Callable[[], Any]) -> defer.Deferred:
        """A Deferred firing with the value of *key*, loading it on a miss.

        *loader* is called with no argument and returns a value, a
        :class:`Loaded`, or a Deferred/coroutine firing with one. Concurrent
        misses for one key share one call. The Deferred fails with the loader's
        error, except that :class:`StoreUnavailable` with an expired entry at
        hand fires with that entry's value (resurrected for ``resurrect_ttl``).
        """
        value = self.peek(key)
        if value is not MISS:
            return defer.succeed(value)
        waiter: defer.Deferred = defer.Deferred()
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters.append(waiter)
            return waiter
        flight = self._flights[key] = _Flight()
        flight.waiters.append(waiter)
        self.loads += 1
        d = defer.maybeDeferred(loader).addCallback(_resolve_awaitable)
        d.addCallbacks(self._loaded, self._load_failed, callbackArgs=(key, flight),
                       errbackArgs=(key, flight))
        return waiter

    def _loaded(self, result: Any, key: Any, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if isinstance(result, Loaded):
            value, tags = result.value, result.tags
        else:
            value, tags = result, ()
        if not flight.cleared and not flight.invalidated.intersection(tags):
            self._store(key, value, tags)
        for waiter in flight.waiters:
            waiter.callback(value)

    def _load_failed(self, reason: failure.Failure, key: Any, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        entry = self._entries.get(key)
        if reason.check(StoreUnavailable) and entry is not None and self._resurrect_ttl > 0:
            entry.expires = self.now() + self._resurrect_ttl
            for waiter in flight.waiters:
                waiter.callback(entry.value)
            return
        for waiter in flight.waiters:
            waiter.errback(reason)

    # -- writes ------------------------------------------------------------------

    def _store(self, key: Any, value: Any, tags: Tuple[str, ...]) -> None:
        self._drop(key)
        ttl = self._neg_ttl if value is None else self._ttl
        expires = self.now() + ttl if ttl > 0 else None
        entries = self._entries
        while len(entries) >= self._max_entries > 0:
            self._drop(next(iter(entries)))
        entries[key] = _Entry(value, expires, tags)
        by_tag = self._by_tag
        for name in tags:
            keys = by_tag.get(name)
            if keys is None:
                keys = by_tag[name] = set()
            keys.add(key)

    def _drop(self, key: Any) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for name in entry.tags:
            keys = self._by_tag.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[name]

    def invalidate(self, key: Any) -> None:
        """Drop the entry of *key*, if any."""
        self._drop(key)

    def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Drop every entry depending on one of *tags*; loads running now are
        answered but not cached if they depend on one."""
        tags = list(tags)
        for flight in self._flights.values():
            flight.invalidated.update(tags)
        for name in tags:
            keys = self._by_tag.get(name)
            if keys:
                for key in list(keys):
                    self._drop(key)

    def clear(self) -> None:
        """Drop every entry; loads running now are answered but not cached."""
        self._entries.clear()
        self._by_tag.clear()
        for flight in self._flights.values():
            flight.cleared = True

    def _on_change(self, event: ChangeEvent) -> None:
        if event.entity == "*" or event.op == "reload":
            self.clear()
            return
        tags = row_tags(event.entity, event.old, self._tag_fields)
        tags.extend(row_tags(event.entity, event.new, self._tag_fields))
        if not tags and event.id:
            tags.append(tag(event.entity, "id", event.id))
        if tags:
            self.invalidate_tags(tags)


def _resolve_awaitable(result: Any) -> Any:
    """A loader may be ``async def``: wait for its coroutine."""
    if hasattr(result, "__await__") and not isinstance(result, defer.Deferred):
        return defer.ensureDeferred(result)
    return result
