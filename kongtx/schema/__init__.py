"""Entity schemas: one module per entity, gathered in :data:`ENTITIES`.

``ENTITIES`` maps an entity name to its :class:`~kongtx.schema.entity.Entity`.
A new entity is one module defining an ``Entity`` plus one :func:`register`
call here; the Admin API and the store pick it up from this mapping.
Pass :func:`store_metas` to a store constructor.
"""

from __future__ import annotations

from typing import Dict, Optional

import attr

from kongtx.schema.entity import Entity
from kongtx.store.interface import EntityMeta

__all__ = ["ENTITIES", "Entity", "register", "store_metas", "get_entity"]

ENTITIES: Dict[str, Entity] = {}


def get_entity(name: str) -> Optional[Entity]:
    """The registered entity *name*, or ``None``."""
    return ENTITIES.get(name)


def register(entity: Entity) -> Entity:
    """Add *entity* to :data:`ENTITIES` (wired to resolve its foreign keys)."""
    wired = attr.evolve(entity, resolver=get_entity)
    ENTITIES[wired.name] = wired
    return wired


def store_metas() -> Dict[str, EntityMeta]:
    """Store metadata for every registered entity.

    Foreign keys to entities that are not registered yet (``services.client_certificate``
    before ``certificates`` exists) are left out so the store accepts the set.
    """
    known = list(ENTITIES)
    return {name: entity.meta_for(known) for name, entity in ENTITIES.items()}


def _register_core() -> None:
    from kongtx.schema.apis import APIS
    from kongtx.schema.consumers import CONSUMERS
    from kongtx.schema.keyauth_credentials import KEYAUTH_CREDENTIALS
    from kongtx.schema.plugins import PLUGINS
    from kongtx.schema.routes import ROUTES
    from kongtx.schema.services import SERVICES

    register(SERVICES)
    register(ROUTES)
    register(CONSUMERS)
    register(PLUGINS)
    register(KEYAUTH_CREDENTIALS)
    register(APIS)


_register_core()
