"""The ``plugins`` entity (Kong's ``kong/db/schema/entities/plugins.lua``).

A plugin row names its plugin (``name``), its scope (``route``, ``service``,
``consumer``, and the legacy 0.x ``api``: null means "any") and its ``config``.  As in Kong, ``name`` is the
subschema key: each loaded plugin class contributes a :class:`Subschema` that
specialises ``config`` (the class's ``CONFIG`` record, defaults filled in),
``protocols`` (default: the class's ``PROTOCOLS``) and, for ``NO_CONSUMER``
plugins, ``consumer`` (``value must be null``).  A name no loaded plugin has is
the single error ``plugin '<name>' not enabled; ...``.

:data:`PLUGINS` knows no plugin; :func:`with_plugins` gives the entity for the
plugin classes a node loaded (``kongtx.plugins.load_plugins``).  Plugin classes
are only read through their class attributes ``NAME``, ``PRIORITY``,
``VERSION``, ``PROTOCOLS``, ``NO_CONSUMER`` and ``CONFIG``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import attr

from kongtx.schema import typedefs as t
from kongtx.schema.entity import Entity, Subschema

__all__ = [
    "PLUGINS",
    "PluginsEntity",
    "with_plugins",
    "plugin_subschema",
    "HTTP_PROTOCOLS",
    "ERR_NOT_ENABLED",
]

ERR_NOT_ENABLED = "plugin '%s' not enabled; add it to the 'plugins' configuration property"

#: Kong's ``http_protocols``: the default ``protocols`` of a plugin.
HTTP_PROTOCOLS = ("grpc", "grpcs", "http", "https")

Row = Dict[str, Any]


def _protocols_field(defaults: Tuple[str, ...]) -> t.Field:
    """``typedefs.protocols_http`` when *defaults* are HTTP only, else ``typedefs.protocols``."""
    if set(defaults) <= set(HTTP_PROTOCOLS):
        element = t.string(one_of=HTTP_PROTOCOLS)
    else:
        element = t.protocol()
    return t.set_of(element, required=True, default=list(defaults))


def _consumer_field(no_consumer: bool) -> t.Field:
    # typedefs.no_consumer: a foreign key whose only valid value is null
    return t.foreign("consumers", default=None, on_delete="cascade", eq_null=no_consumer)


#: Plugin name -> (its ``CONFIG_SHORTHANDS``: legacy config key -> field path, and
#: its ``CONFIG`` record, to type form strings given for a legacy key).
_SHORTHANDS: Dict[str, Tuple[Mapping[str, Tuple[str, ...]], Any]] = {}


def plugin_subschema(plugin: Any) -> Subschema:
    """The fields plugin class *plugin* specialises (``config``, ``protocols``, ``consumer``)."""
    shorthands = getattr(plugin, "CONFIG_SHORTHANDS", None)
    config = getattr(plugin, "CONFIG", None)
    if shorthands:
        _SHORTHANDS[plugin.NAME] = (dict(shorthands), config)
    if config is None:
        config = t.record(())
    protocols = tuple(getattr(plugin, "PROTOCOLS", HTTP_PROTOCOLS))
    return Subschema(
        name=plugin.NAME,
        fields={
            "consumer": _consumer_field(bool(getattr(plugin, "NO_CONSUMER", False))),
            "protocols": _protocols_field(protocols),
            "config": config.evolve(required=True),
        },
    )


class PluginsEntity(Entity):
    """``Entity`` whose unknown subschema key is Kong's ``subschema_error``."""

    __slots__ = ()

    def validate(self, row: Any, *, updating: bool = False) -> Dict[str, Any]:
        """As :meth:`Entity.validate`; an unloaded ``name`` is the only error reported."""
        name = row.get("name")
        if isinstance(name, list) and name:
            name = name[0]
        if name is not None and self.subschema_for(row) is None:
            return {"name": ERR_NOT_ENABLED % (name,)}
        return Entity.validate(self, row, updating=updating)

    def validate_insert(self, data: Any, *, now: int, new_id: str) -> Row:
        """POST: as :meth:`Entity.validate_insert`; a null ``config`` gets the defaults."""
        data = _expand_shorthands(_null_config(data))
        return Entity.validate_insert(self, data, now=now, new_id=new_id)

    def validate_update(self, existing: Any, patch: Any, *, now: int) -> Row:
        """PATCH: as :meth:`Entity.validate_update`, legacy config keys expanded."""
        name = patch.get("name") if isinstance(patch, dict) else None
        if name is None and isinstance(existing, dict):
            name = existing.get("name")
        base = existing.get("config") if isinstance(existing, dict) else None
        return Entity.validate_update(
            self, existing, _expand_shorthands(patch, name, base), now=now)

    def validate_replace(
        self, data: Any, *, now: int, id: str, created_at: Optional[int] = None
    ) -> Row:
        """PUT: as :meth:`Entity.validate_replace`; a null ``config`` gets the defaults."""
        return Entity.validate_replace(
            self, _expand_shorthands(_null_config(data)), now=now, id=id, created_at=created_at
        )


def _typed(value: Any, field: Any) -> Any:
    """A form string given for a legacy key, typed like the field it stands for."""
    if not isinstance(value, str) or field is None:
        return value
    if field.type == "boolean" and value in ("true", "false"):
        return value == "true"
    if field.type == "integer" and value.isdigit():
        return int(value)
    if field.type == "number":
        try:
            return float(value) if not value.isdigit() else int(value)
        except ValueError:
            return value
    return value


def _expand_shorthands(data: Any, name: Any = None, base: Any = None) -> Any:
    """Move a plugin's legacy ``config`` keys to the fields they stand for; a value
    given for the field itself wins. ``base`` is the stored config a PATCH applies to:
    the record a legacy key lands in starts from its stored value."""
    if not isinstance(data, dict):
        return data
    config = data.get("config")
    if name is None:
        name = data.get("name")
    known = _SHORTHANDS.get(name) if isinstance(name, str) else None
    if not known or not isinstance(config, dict):
        return data
    shorthands, record = known
    hits = [key for key in config if key in shorthands]
    if not hits:
        return data
    original = config
    config = dict(config)
    for key in hits:
        value = config.pop(key)
        *parents, leaf = shorthands[key]
        target = config
        stored = base if isinstance(base, dict) else {}
        field = record
        for part in parents:
            child = target.get(part)
            if not isinstance(child, dict):
                child = stored.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            stored = stored.get(part) if isinstance(stored.get(part), dict) else {}
            target[part] = child
            target = child
            field = field.field(part) if field is not None else None
        leaf_field = field.field(leaf) if field is not None else None
        given: Any = original
        for part in parents:
            given = given.get(part) if isinstance(given, dict) else None
        if not (isinstance(given, dict) and leaf in given):
            target[leaf] = _typed(value, leaf_field)
    data = dict(data)
    data["config"] = config
    return data


def _null_config(data: Any) -> Any:
    """Kong fills a required record given as null with its defaults, like a missing one."""
    if isinstance(data, dict) and "config" in data and data["config"] is None:
        data = dict(data)
        del data["config"]
    return data


def with_plugins(entity: Entity, plugins: Mapping[str, Any]) -> Entity:
    """*entity* (the plugins entity) with one subschema per class of *plugins*."""
    subschemas = {name: plugin_subschema(cls) for name, cls in sorted(plugins.items())}
    return attr.evolve(entity, subschemas=subschemas)


PLUGINS = PluginsEntity(
    name="plugins",
    endpoint_key="instance_name",
    cache_key=("name", "route", "service", "consumer", "api"),
    subschema_key="name",
    fields=(
        ("id", t.uuid()),
        ("name", t.string(required=True)),
        ("instance_name", t.utf8_name()),
        ("created_at", t.auto_timestamp_s()),
        ("updated_at", t.auto_timestamp_s()),
        ("route", t.foreign("routes", default=None, on_delete="cascade")),
        ("service", t.foreign("services", default=None, on_delete="cascade")),
        ("consumer", _consumer_field(False)),
        ("config", t.record(())),
        ("protocols", _protocols_field(HTTP_PROTOCOLS)),
        ("enabled", t.boolean(required=True, default=True)),
        ("tags", t.tags()),
        # Kong 0.x: a plugin on a legacy API (``/apis/{api}/plugins``).
        ("api", t.foreign("apis", default=None, on_delete="cascade")),
    ),
)
