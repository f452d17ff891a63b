"""Entity storage: the ``IStore`` contract and its backends.

``kongtx.store.interface`` holds the contract (``IStore``, ``EntityMeta``,
``ForeignKey``, ``ChangeEvent`` and the errors); ``kongtx.store.memory`` and
``kongtx.store.sqlite`` hold the backends. See ``docs/store.md``.
"""

from __future__ import annotations

from kongtx.store.interface import (
    ChangeEvent,
    EntityMeta,
    ForeignKey,
    ForeignKeyViolation,
    InvalidOffset,
    IStore,
    NotFoundError,
    ReferencedByOthers,
    StoreError,
    StoreUnavailable,
    UniqueViolation,
    UnsupportedFilter,
)

__all__ = [
    "ChangeEvent",
    "EntityMeta",
    "ForeignKey",
    "ForeignKeyViolation",
    "IStore",
    "InvalidOffset",
    "NotFoundError",
    "ReferencedByOthers",
    "StoreError",
    "StoreUnavailable",
    "UniqueViolation",
    "UnsupportedFilter",
]
