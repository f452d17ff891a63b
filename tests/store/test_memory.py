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
