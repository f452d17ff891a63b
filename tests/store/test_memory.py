"""MemoryStore passes the IStore contract."""

from __future__ import annotations

from typing import Any, Mapping

from kongtx.store.interface import EntityMeta
from kongtx.store.memory import MemoryStore
from tests.store.contract import StoreContract


class TestMemoryStore(StoreContract):
    """The whole contract against the in-memory backend."""

    def make_store(self, entities: Mapping[str, EntityMeta], directory: str) -> Any:
        return MemoryStore(entities)


def test_counters_drop_what_expired_when_a_newer_window_starts() -> None:
    """``Counters`` (the rate-limiting ``local`` policy of a single process) keeps a
    counter until a window starts after its expiry, then drops it; the drop looks
    only at the counters that expired (an index by expiry), however many there are."""
    from kongtx.store.memory import Counters

    counters = Counters()
    for client in range(5000):  # limiting by IP: a counter per client per window
        counters.increment("second:%d" % client, 100, 1)
    counters.increment("hour:x", 0, 3600)
    assert counters.get("second:7", 100) == 1
    counters.increment("second:0", 101, 1)  # expires at 101: still counted
    assert len(counters.values) == 5002
    counters.increment("second:0", 102, 1)  # window 100 (expired at 101) is gone
    assert sorted(counters.values) == [("hour:x", 0), ("second:0", 101), ("second:0", 102)]
    assert counters.get("second:7", 100) == 0
    assert counters.increment("hour:x", 0, 3600) == 2
    assert sorted(counters._expiring) == [102, 103, 3600]
