"""0005: the legacy Kong 0.x ``apis`` table, and ``plugins.api`` (a plugin on an API).

The metadata is written out here as it was when this migration was released;
later changes to these entities come as new migration files.  ``plugins`` was
created by 0003: this adds its ``api`` foreign-key column and that column's index.
"""

from __future__ import annotations

from kongtx.store.interface import EntityMeta, ForeignKey
from kongtx.store.migrations import Migration
from kongtx.store.postgres import PgTable

_APIS = EntityMeta("apis", unique=("name",))

_PLUGINS = PgTable.of(
    EntityMeta(
        "plugins",
        unique=("instance_name",),
        foreign={
            "route": ForeignKey("routes", "cascade"),
            "service": ForeignKey("services", "cascade"),
            "consumer": ForeignKey("consumers", "cascade"),
            "api": ForeignKey("apis", "cascade"),
        },
        cache_key=("name", "route", "service", "consumer", "api"),
    )
)

MIGRATION = Migration(
    "0005_apis",
    PgTable.of(_APIS).ddl()
    + [
        'ALTER TABLE plugins ADD COLUMN IF NOT EXISTS api_id text COLLATE "C"',
        _PLUGINS.column_index_ddl("api"),
    ],
    ("apis",),
)
