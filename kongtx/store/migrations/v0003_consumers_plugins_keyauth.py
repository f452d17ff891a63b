"""0003: the plugin era's tables, ``consumers``, ``plugins`` and ``keyauth_credentials``.

The metadata is written out here as it was when this migration was released;
later changes to these entities come as new migration files.
"""

from __future__ import annotations

from kongtx.store.interface import EntityMeta, ForeignKey
from kongtx.store.migrations import entity_migration

MIGRATION = entity_migration(
    "0003_consumers_plugins_keyauth",
    {
        "consumers": EntityMeta("consumers", unique=("username", "custom_id")),
        "plugins": EntityMeta(
            "plugins",
            unique=("instance_name",),
            foreign={
                "route": ForeignKey("routes", "cascade"),
                "service": ForeignKey("services", "cascade"),
                "consumer": ForeignKey("consumers", "cascade"),
            },
            cache_key=("name", "route", "service", "consumer"),
        ),
        "keyauth_credentials": EntityMeta(
            "keyauth_credentials",
            unique=("key",),
            foreign={"consumer": ForeignKey("consumers", "cascade")},
        ),
    },
)
