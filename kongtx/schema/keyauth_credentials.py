"""The ``keyauth_credentials`` entity (Kong's ``kong/plugins/key-auth/daos.lua``).

Served as ``/key-auths`` and nested as ``/consumers/{c}/key-auth``; addressed by
id or ``key`` (its endpoint key).  A missing ``key`` is generated on insert and
upsert: 32 random hex characters, like Kong's ``random_string()``.

``ttl`` (seconds, Kong's entity TTL) is stored as given; when it is positive a
write that sets it also stores ``expires_at = now + ttl`` (Unix seconds).  The
key-auth plugin treats a credential past ``expires_at`` as invalid; rows are not
purged.  Keys are secrets: nothing here logs them.
"""

from __future__ import annotations

import secrets
from typing import Any, Dict, Optional

from kongtx.schema import typedefs as t
from kongtx.schema.entity import Entity

__all__ = ["KEYAUTH_CREDENTIALS", "KeyAuthCredentials", "generate_key", "MAX_TTL"]

#: Kong's upper bound for an entity TTL (``kong/db/dao/init.lua``).
MAX_TTL = 100000000

Row = Dict[str, Any]


def generate_key() -> str:
    """A fresh API key: 32 hex characters from ``secrets``."""
    return secrets.token_hex(16)


def _expires_at(ttl: Any, now: int) -> Optional[int]:
    if isinstance(ttl, int) and not isinstance(ttl, bool) and 0 < ttl <= MAX_TTL:
        return now + ttl
    return None


class KeyAuthCredentials(Entity):
    """``Entity`` plus the auto-generated ``key`` and ``expires_at`` from ``ttl``."""

    __slots__ = ()

    def _with_auto_fields(self, data: Any, now: int) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("key") is None:
            data["key"] = generate_key()
        data["expires_at"] = _expires_at(data.get("ttl"), now)
        return data

    def validate_insert(self, data: Any, *, now: int, new_id: str) -> Row:
        """POST: as :meth:`Entity.validate_insert`, generating ``key`` when missing."""
        return Entity.validate_insert(
            self, self._with_auto_fields(data, now), now=now, new_id=new_id
        )

    def validate_replace(
        self, data: Any, *, now: int, id: str, created_at: Optional[int] = None
    ) -> Row:
        """PUT: as :meth:`Entity.validate_replace`, generating ``key`` when missing."""
        return Entity.validate_replace(
            self, self._with_auto_fields(data, now), now=now, id=id, created_at=created_at
        )

    def validate_update(self, existing: Any, patch: Any, *, now: int) -> Row:
        """PATCH: a patch that sets ``ttl`` restarts the expiry from *now*."""
        if isinstance(patch, dict):
            patch = dict(patch)
            patch.pop("expires_at", None)
            if "ttl" in patch:
                patch["expires_at"] = _expires_at(patch["ttl"], now)
        return Entity.validate_update(self, existing, patch, now=now)


KEYAUTH_CREDENTIALS = KeyAuthCredentials(
    name="keyauth_credentials",
    endpoint_key="key",
    admin_api_name="key-auths",
    admin_api_nested_name="key-auth",
    fields=(
        ("id", t.uuid()),
        ("created_at", t.auto_timestamp_s()),
        ("consumer", t.foreign("consumers", required=True, on_delete="cascade")),
        ("key", t.string(unique=True, auto=True)),
        ("ttl", t.integer(between=(0, MAX_TTL))),
        ("expires_at", t.integer()),
        ("tags", t.tags()),
    ),
)
