"""Unit tests of ``kongtx.cache.EntityCache`` on a ``task.Clock`` and a MemoryStore."""

from __future__ import annotations

from typing import Any, List

import pytest
from twisted.internet import defer, task

from kongtx.cache import MISS, EntityCache, Loaded, row_tags, tag
from kongtx.schema import store_metas
from kongtx.store.interface import ChangeEvent, StoreUnavailable
from kongtx.store.memory import MemoryStore

CONSUMER = "11111111-1111-4111-8111-111111111111"
CRED = "22222222-2222-4222-8222-222222222222"


def _store() -> MemoryStore:
    return MemoryStore(store_metas())


def _consumer(**kw: Any) -> dict:
    row = {"id": CONSUMER, "username": "alice", "custom_id": None, "tags": None,
           "created_at": 1, "updated_at": 1}
    row.update(kw)
    return row


def _cred(**kw: Any) -> dict:
    row = {"id": CRED, "consumer": {"id": CONSUMER}, "key": "k1", "ttl": None,
           "expires_at": None, "tags": None, "created_at": 1}
    row.update(kw)
    return row


def _result(d: defer.Deferred) -> Any:
    out: List[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


class Loader:
    """Counts its calls; answers from the store (or fails when ``down``)."""

    def __init__(self, store: MemoryStore, key: str) -> None:
        self.store = store
        self.key = key
        self.calls = 0
        self.down = False
        self.pending: List[defer.Deferred] = []
        self.hold = False

    def __call__(self) -> Any:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("connection refused")
        if self.hold:
            d: defer.Deferred = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.ensureDeferred(self._load())

    async def _load(self) -> Loaded:
        row = await self.store.get_by("keyauth_credentials", "key", self.key)
        tags = [tag("keyauth_credentials", "key", self.key)]
        if row is not None:
            tags.append(tag("keyauth_credentials", "id", row["id"]))
            tags.append(tag("consumers", "id", row["consumer"]["id"]))
        return Loaded(row, tags)


def _setup(**kw: Any):
    store = _store()
    clock = task.Clock()
    cache = EntityCache(store, clock, **kw)
    return store, clock, cache


@pytest.mark.parametrize("entity,row,expected", [
    ("consumers", {"id": "c", "username": "u", "custom_id": None},
     ["consumers:id:c", "consumers:username:u"]),
    ("keyauth_credentials", {"id": "k", "key": "secret"},
     ["keyauth_credentials:id:k", "keyauth_credentials:key:secret"]),
    ("routes", {"id": "r", "name": "x"}, ["routes:id:r"]),
    ("routes", None, []),
])
def test_row_tags(entity: str, row: Any, expected: List[str]) -> None:
    """A changed row invalidates its id tag and its entity's tag fields (None values skipped)."""
    assert row_tags(entity, row) == expected


def test_peek_miss_then_hit_without_deferred() -> None:
    """peek() answers MISS before a load and the value (not a Deferred) after it."""
    store, clock, cache = _setup()
    _result(store.insert("consumers", _consumer()))
    _result(store.insert("keyauth_credentials", _cred()))
    assert cache.peek("k1") is MISS
    loader = Loader(store, "k1")
    row = _result(cache.get("k1", loader))
    assert row["id"] == CRED
    hit = cache.peek("k1")
    assert not isinstance(hit, defer.Deferred) and hit["id"] == CRED
    _result(cache.get("k1", loader))
    assert loader.calls == 1


def test_negative_entry_cached_and_invalidated_by_create() -> None:
    """A miss is cached (peek gives None); creating the row drops the negative entry."""
    store, clock, cache = _setup()
    _result(store.insert("consumers", _consumer()))
    loader = Loader(store, "k1")
    assert _result(cache.get("k1", loader)) is None
    assert cache.peek("k1") is None
    _result(cache.get("k1", loader))
    assert loader.calls == 1
    _result(store.insert("keyauth_credentials", _cred()))
    assert cache.peek("k1") is MISS
    assert _result(cache.get("k1", loader))["id"] == CRED


@pytest.mark.parametrize("change", ["update-cred", "delete-cred", "update-consumer",
                                    "delete-consumer"])
def test_invalidation_by_dependencies(change: str) -> None:
    """Updating or deleting the credential or its consumer drops the cached entry."""
    store, clock, cache = _setup()
    _result(store.insert("consumers", _consumer()))
    _result(store.insert("keyauth_credentials", _cred()))
    _result(cache.get("k1", Loader(store, "k1")))
    assert cache.peek("k1") is not MISS
    if change == "update-cred":
        _result(store.update("keyauth_credentials", _cred(key="k2")))
    elif change == "delete-cred":
        _result(store.delete("keyauth_credentials", CRED))
    elif change == "update-consumer":
        _result(store.update("consumers", _consumer(username="bob")))
    else:
        _result(store.delete("consumers", CONSUMER))
    assert cache.peek("k1") is MISS


def test_unrelated_change_keeps_entries() -> None:
    """A change to another entity leaves the entries alone."""
    store, clock, cache = _setup()
    _result(store.insert("consumers", _consumer()))
    _result(store.insert("keyauth_credentials", _cred()))
    _result(cache.get("k1", Loader(store, "k1")))
    _result(store.insert("consumers", _consumer(id="33333333-3333-4333-8333-333333333333",
                                                username="carol")))
    assert cache.peek("k1") is not MISS


def test_reload_event_clears_everything() -> None:
    """ChangeEvent("*", "reload") (after a long outage) drops every entry."""
    store, clock, cache = _setup()
    _result(cache.get("a", lambda: Loaded(1, ["x:id:1"])))
    _result(cache.get("b", lambda: 2))
    assert len(cache) == 2
    cache._on_change(ChangeEvent("*", "reload", "", None, None))
    assert len(cache) == 0 and cache.peek("a") is MISS


def test_concurrent_misses_share_one_load() -> None:
    """Three gets of one missing key while the load runs make one store query."""
    store, clock, cache = _setup()
    loader = Loader(store, "k1")
    loader.hold = True
    waits = [cache.get("k1", loader) for _ in range(3)]
    assert loader.calls == 1
    loader.pending[0].callback(Loaded("v", ()))
    assert [_result(d) for d in waits] == ["v", "v", "v"]


def test_load_invalidated_in_flight_is_answered_not_cached() -> None:
    """A change to a row a running load depends on: the answer is given but not cached."""
    store, clock, cache = _setup()
    loader = Loader(store, "k1")
    loader.hold = True
    d = cache.get("k1", loader)
    _result(store.insert("consumers", _consumer()))
    loader.pending[0].callback(Loaded("stale", [tag("consumers", "id", CONSUMER)]))
    assert _result(d) == "stale"
    assert cache.peek("k1") is MISS


@pytest.mark.parametrize("ttl,neg_ttl,value,fresh_at,stale_at", [
    (10, None, "v", 9.9, 10),
    (10, None, None, 9.9, 10),
    (10, 2, None, 1.9, 2),
    (0, 3, None, 2.9, 3),
    (0, 3, "v", 1e9, None),
])
def test_ttls(ttl: float, neg_ttl: Any, value: Any, fresh_at: float, stale_at: Any) -> None:
    """Values live ``ttl`` seconds, negative entries ``neg_ttl`` (default ttl); 0 is forever."""
    store, clock, cache = _setup(ttl=ttl, neg_ttl=neg_ttl)
    _result(cache.get("k", lambda: value))
    clock.advance(fresh_at)
    assert cache.peek("k") == value
    if stale_at is not None:
        clock.advance(stale_at - fresh_at)
        assert cache.peek("k") is MISS


def test_resurrect_when_store_unavailable() -> None:
    """An expired entry is served again for resurrect_ttl seconds while the store is down."""
    store, clock, cache = _setup(ttl=5, resurrect_ttl=30)
    _result(store.insert("consumers", _consumer()))
    _result(store.insert("keyauth_credentials", _cred()))
    loader = Loader(store, "k1")
    _result(cache.get("k1", loader))
    clock.advance(6)
    loader.down = True
    assert _result(cache.get("k1", loader))["id"] == CRED
    clock.advance(29)
    assert cache.peek("k1")["id"] == CRED
    clock.advance(2)
    failed = _result(cache.get("k1", loader))
    # resurrected again: the entry is still at hand
    assert not hasattr(failed, "check") and failed["id"] == CRED


def test_miss_while_store_unavailable_fails() -> None:
    """A key never seen fails with StoreUnavailable when the store is down."""
    store, clock, cache = _setup()
    loader = Loader(store, "k1")
    loader.down = True
    failed = _result(cache.get("k1", loader))
    assert failed.check(StoreUnavailable)
    assert cache.peek("k1") is MISS


def test_async_def_loader() -> None:
    """A loader may be ``async def``."""
    store, clock, cache = _setup()

    async def load() -> Loaded:
        row = await store.get("consumers", CONSUMER)
        return Loaded(row, [tag("consumers", "id", CONSUMER)])

    assert _result(cache.get("c", load)) is None
    assert cache.peek("c") is None


def test_max_entries_evicts_oldest() -> None:
    """Past max_entries, the oldest entry goes first."""
    store, clock, cache = _setup(max_entries=2)
    for key in ("a", "b", "c"):
        _result(cache.get(key, lambda key=key: key.upper()))
    assert cache.peek("a") is MISS and cache.peek("b") == "B" and cache.peek("c") == "C"


def test_close_stops_listening() -> None:
    """After close(), store changes no longer reach the cache."""
    store, clock, cache = _setup()
    cache.close()
    assert cache._on_change not in store._listeners
