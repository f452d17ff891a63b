"""0002: the first entity tables, ``services`` and ``routes``.

The metadata is written out here as it was when this migration was released;
later changes to an entity come as new migration files.
"""

from __future__ import annotations

from kongtx.store.interface import EntityMeta, ForeignKey
from kongtx.store.migrations import entity_migration

MIGRATION = entity_migration(
    "0002_core_entities",
    {
        "services": EntityMeta("services", unique=("name",)),
        "routes": EntityMeta(
            "routes", unique=("name",), foreign={"service": ForeignKey("services", "restrict")}
        ),
    },
)
