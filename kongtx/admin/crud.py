"""Generic entity operations for the Admin API, driven by the entity schema.

:class:`Crud` sits between the HTTP layer and the store: it looks entities up
by id or endpoint key, resolves foreign keys given by a unique field
(``service: {"name": "x"}``), validates through the schema and turns store
errors into :mod:`kongtx.errors`.  Every method is ``async`` and returns plain
rows.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from twisted.logger import Logger

from kongtx import errors
from kongtx.schema.entity import Entity
from kongtx.schema.typedefs import UUID_RE, validate_field
from kongtx.store import interface as store_api

__all__ = ["Crud", "is_uuid", "DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

#: Cache-key fields of 0.x entities (``plugins.api``): Kong 3.x has none, so a
#: 409 body leaves them out when null.
LEGACY_KEYS = frozenset(["api"])

Row = Dict[str, Any]

_log = Logger()


def is_uuid(value: Any) -> bool:
    """Whether a URL segment names an entity by id."""
    return isinstance(value, str) and UUID_RE.match(value) is not None


def _new_id() -> str:
    return str(uuid.uuid4())


class Crud:
    """Schema-driven reads and writes against an ``IStore``.

    *now* returns the current time in seconds (the reactor's clock), *new_id*
    a fresh UUID string.
    """

    def __init__(
        self,
        store: Any,
        entities: Mapping[str, Entity],
        now: Callable[[], float],
        new_id: Callable[[], str] = _new_id,
    ) -> None:
        self._store = store
        self._entities = entities
        self._now = now
        self._new_id = new_id

    # -- reads ---------------------------------------------------------------------

    async def select(self, entity: Entity, key: str) -> Optional[Row]:
        """The row addressed by a URL segment (UUID -> id, else endpoint key)."""
        if is_uuid(key):
            return await self._call(self._store.get, entity.name, key.lower())
        if entity.endpoint_key is None:
            return None
        return await self._call(self._store.get_by, entity.name, entity.endpoint_key, key)

    async def select_by(self, entity: Entity, field: str, value: Any) -> Optional[Row]:
        """The row whose unique *field* equals *value*, or ``None``."""
        return await self._call(self._store.get_by, entity.name, field, value)

    async def page(
        self,
        entity: Entity,
        size: Optional[int],
        offset: Optional[str],
        where: Optional[Mapping[str, Any]] = None,
    ) -> Tuple[List[Row], Optional[str]]:
        """One page of rows and the next page's offset (``None`` on the last)."""
        return await self._call(
            self._store.page,
            entity.name,
            size if size is not None else DEFAULT_PAGE_SIZE,
            offset,
            dict(where) if where else None,
        )

    # -- writes --------------------------------------------------------------------------

    async def insert(self, entity: Entity, data: Any) -> Row:
        """POST: validate and store a new row; fires with the stored row."""
        data = await self.resolve_foreign(entity, data)
        row = entity.validate_insert(data, now=self._now_s(), new_id=self._new_id())
        return await self._call(self._store.insert, entity.name, row)

    async def update(self, entity: Entity, existing: Row, patch: Any) -> Row:
        """PATCH: merge *patch* over *existing* and store it."""
        patch = await self.resolve_foreign(entity, patch)
        row = entity.validate_update(existing, patch, now=self._now_s())
        return await self._call(self._store.update, entity.name, row)

    async def upsert(self, entity: Entity, key: str, data: Any) -> Row:
        """PUT: create or replace the row addressed by *key* (id or endpoint key)."""
        existing = await self.select(entity, key)
        data = await self.resolve_foreign(entity, data)
        if isinstance(data, dict) and not is_uuid(key) and entity.endpoint_key:
            data[entity.endpoint_key] = key
        if existing is not None:
            row_id = existing["id"]
            created_at = existing.get("created_at")
        else:
            row_id = key.lower() if is_uuid(key) else self._new_id()
            created_at = None
        row = entity.validate_replace(
            data, now=self._now_s(), id=row_id, created_at=created_at
        )
        if existing is not None:
            return await self._call(self._store.update, entity.name, row)
        return await self._call(self._store.insert, entity.name, row)

    async def delete(self, entity: Entity, row: Row) -> None:
        """DELETE a row (refused if others reference it with ``restrict``)."""
        await self._call(self._store.delete, entity.name, row["id"])

    async def resolve_foreign(self, entity: Entity, data: Any) -> Any:
        """Replace foreign keys given by a unique field with ``{"id": ...}``.

        Raises :class:`~kongtx.errors.ForeignKeysUnresolved` (code 13) when
        no row has that value.  Keys with a valid ``id`` are left alone.
        """
        if not isinstance(data, dict):
            return data
        unresolved: Dict[str, Dict[str, Tuple[Any, str]]] = {}
        for name, field in entity.foreign_fields():
            value = data.get(name)
            if not isinstance(value, dict) or is_uuid(value.get("id")):
                continue
            target = self._entities.get(field.reference or "")
            if target is None:
                continue
            for unique_name, unique_field in target.fields:
                if not (unique_field.unique or unique_name == target.endpoint_key):
                    continue
                if unique_name == "id":
                    continue
                unique_value = value.get(unique_name)
                if unique_value is None or validate_field(unique_field, unique_value):
                    continue
                found = await self._call(
                    self._store.get_by, target.name, unique_name, unique_value
                )
                if found is not None:
                    data[name] = {"id": found["id"]}
                    unresolved.pop(name, None)
                    break
                unresolved.setdefault(name, {})[unique_name] = (unique_value, target.name)
        if unresolved:
            raise errors.ForeignKeysUnresolved(unresolved)
        return data

    # -- helpers -----------------------------------------------------------------------

    def _now_s(self) -> int:
        return int(self._now())

    async def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        """Call a store method and map its errors to Kong's."""
        try:
            return await method(*args)
        except store_api.UniqueViolation as exc:
            fields = {
                k: v for k, v in exc.fields.items() if not (k in LEGACY_KEYS and v is None)
            }
            raise errors.UniqueViolation(fields) from None
        except store_api.ForeignKeyViolation as exc:
            value = exc.value if isinstance(exc.value, dict) else {"id": exc.value}
            raise errors.ForeignKeyViolation.invalid_reference(
                value, exc.field, exc.target
            ) from None
        except store_api.ReferencedByOthers as exc:
            raise errors.ForeignKeyViolation.restricted(
                exc.entity, exc.referencing
            ) from None
        except store_api.InvalidOffset as exc:
            raise errors.InvalidOffset(exc.offset, exc.reason) from None
        except store_api.NotFoundError:
            raise errors.NotFound() from None
        except store_api.StoreUnavailable as exc:
            _log.error("store unavailable: {reason}", reason=exc.reason)
            raise errors.DatabaseError(str(exc.reason)) from None
