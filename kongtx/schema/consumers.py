"""The ``consumers`` entity (Kong's ``kong/db/schema/entities/consumers.lua``).

A consumer is addressed by id or ``username`` (its endpoint key); ``custom_id``
is unique too and is searched with ``GET /consumers?custom_id=``.  Credentials
and consumer-scoped plugins reference it with ``on_delete = "cascade"``, so
deleting a consumer deletes them in the same store operation.
"""

from __future__ import annotations

from kongtx.schema import typedefs as t
from kongtx.schema.entity import AtLeastOneOf, Entity

__all__ = ["CONSUMERS"]

CONSUMERS = Entity(
    name="consumers",
    endpoint_key="username",
    fields=(
        ("id", t.uuid()),
        ("created_at", t.auto_timestamp_s()),
        ("updated_at", t.auto_timestamp_s()),
        ("username", t.string(unique=True)),
        ("custom_id", t.string(unique=True)),
        ("tags", t.tags()),
    ),
    checks=(AtLeastOneOf(("custom_id", "username")),),
)
