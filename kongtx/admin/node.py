"""Node endpoints: ``GET /``, ``GET /status`` and ``GET /schemas/{entity}`` bodies."""

from __future__ import annotations

import os
import platform
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.internet import defer

from kongtx import errors
from kongtx.schema.entity import (
    AtLeastOneOf,
    Conditional,
    ConditionalAtLeastOneOf,
    CustomCheck,
    Entity,
    Subschema,
)
from kongtx.schema.typedefs import NO_DEFAULT, Field

__all__ = ["NodeInfo", "memory_info", "ping", "schema_to_json", "plugin_schema_to_json"]

TAGLINE = "Welcome to kong"
EDITION = "community"
UNITS = {"b": (1, None), "k": (1024, "KiB"), "m": (1024**2, "MiB"), "g": (1024**3, "GiB")}
MSG_BAD_UNIT = "invalid unit '%s' (expected 'k/K', 'm/M', or 'g/G')"
MSG_BAD_SCALE = "invalid scale: '%s' (expected a positive integer)"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class NodeInfo:
    """The values ``GET /`` reports, given once at start-up."""

    node_id: str
    hostname: str
    configuration: Dict[str, Any]
    version: str
    kong_version: str
    plugins_available: Dict[str, Any]
    server_stats: Callable[[], Dict[str, Any]] = attr.ib(eq=False)

    def root(self) -> Dict[str, Any]:
        """The ``GET /`` body."""
        pid = os.getpid()
        return {
            "tagline": TAGLINE,
            "version": self.kong_version,
            "kongtx_version": self.version,
            "edition": EDITION,
            "hostname": self.hostname,
            "node_id": self.node_id,
            "timers": {"running": 0, "pending": 0},
            "plugins": {
                "available_on_server": self.plugins_available,
                "enabled_in_cluster": [],
            },
            "lua_version": "%s %s"
            % (platform.python_implementation(), platform.python_version()),
            "configuration": self.configuration,
            "pids": {"master": pid, "workers": [p for p, _ in workers(self.server_stats)]},
        }


def workers(server_stats: Any) -> List[Tuple[int, Optional[int]]]:
    """(pid, RSS bytes or None for "this process") of each process serving the
    proxy: the workers a master runs, else this process."""
    memory = getattr(server_stats, "workers_memory", None)
    found = memory() if memory is not None else []
    return list(found) or [(os.getpid(), None)]


def _rss_bytes() -> Optional[int]:
    """Resident set size of this process (``/proc`` where available)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * 1024 if platform.system() != "Darwin" else peak
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return None


def _format(size: Optional[int], unit: str, scale: int) -> Any:
    if size is None:
        return None
    divisor, suffix = UNITS[unit]
    if suffix is None:
        return size
    return "%.*f %s" % (scale, size / divisor, suffix)


def memory_info(unit: Optional[str] = None, scale: Optional[str] = None,
                workers: Sequence[Tuple[int, Optional[int]]] = ()) -> Dict[str, Any]:
    """The ``memory`` object of ``/status`` in Kong's shape: the RSS of each
    worker (*workers*: (pid, bytes), bytes ``None`` for this process; none
    given: this process) and of this process.

    Raises :class:`~kongtx.errors.BadRequest` for a bad ``unit``/``scale``.
    """
    unit_key = (unit or "m").lower()
    if unit_key not in UNITS:
        raise errors.BadRequest(MSG_BAD_UNIT % unit)
    scale_value = 2
    if scale is not None:
        try:
            scale_value = int(scale)
        except ValueError:
            raise errors.BadRequest(MSG_BAD_SCALE % scale) from None
        if scale_value < 0:
            raise errors.BadRequest(MSG_BAD_SCALE % scale)
    own = _rss_bytes()
    rss = _format(own, unit_key, scale_value)
    vms = [{"http_allocated_gc": _format(own if size is None else size, unit_key, scale_value),
            "pid": pid} for pid, size in (workers or [(os.getpid(), None)])]
    return {
        "workers_lua_vms": vms,
        "lua_shared_dicts": {},
        "process_rss": rss,
    }


async def ping(store: Any, reactor: Any, timeout: float) -> bool:
    """``store.ping()`` with a deadline; any failure or timeout is ``False``."""
    try:
        d = defer.maybeDeferred(store.ping)
        d.addTimeout(timeout, reactor)
        return bool(await d)
    except Exception:
        return False


# -- /schemas/{entity} --------------------------------------------------------------


def _field_json(field: Field) -> Dict[str, Any]:
    out: Dict[str, Any] = {"type": field.type}
    if field.required:
        out["required"] = True
    if field.default is not NO_DEFAULT:
        out["default"] = field.default
    for flag in ("auto", "unique", "uuid", "timestamp", "immutable"):
        if getattr(field, flag):
            out[flag] = True
    if field.reference:
        out["reference"] = field.reference
        out["on_delete"] = field.on_delete
    if field.one_of:
        out["one_of"] = list(field.one_of)
    if field.between is not None:
        out["between"] = list(field.between)
    for name in ("len_min", "len_max", "len_eq", "starts_with", "match", "gt"):
        value = getattr(field, name)
        if value is not None:
            out[name] = value
    if field.eq_null:
        out["eq"] = None
    if field.elements is not None:
        out["elements"] = _field_json(field.elements)
    if field.keys is not None:
        out["keys"] = _field_json(field.keys)
    if field.values is not None:
        out["values"] = _field_json(field.values)
    if field.fields:
        out["fields"] = [{name: _field_json(sub)} for name, sub in field.fields]
    if field.mutually_exclusive_subsets:
        out["mutually_exclusive_subsets"] = [list(s) for s in field.mutually_exclusive_subsets]
    if field.description:
        out["description"] = field.description
    return out


def _check_json(check: Any) -> Dict[str, Any]:
    if isinstance(check, Conditional):
        return {"conditional": {"if_field": check.if_field, "then_field": check.then_field}}
    if isinstance(check, ConditionalAtLeastOneOf):
        return {
            "conditional_at_least_one_of": {
                "if_field": check.if_field,
                "then_at_least_one_of": list(check.then_at_least_one_of),
                "else_then_at_least_one_of": list(check.else_then_at_least_one_of),
            }
        }
    if isinstance(check, AtLeastOneOf):
        return {"at_least_one_of": list(check.fields)}
    if isinstance(check, CustomCheck):
        return {"custom_entity_check": {"field_sources": list(check.fields)}}
    return {"check": type(check).__name__}


def schema_to_json(entity: Entity) -> Dict[str, Any]:
    """``{"fields": [{name: {...}}...], "entity_checks": [...]}`` like Kong."""
    fields: List[Dict[str, Any]] = [{name: _field_json(f)} for name, f in entity.fields]
    checks = [_check_json(c) for c in entity.checks]
    body: Dict[str, Any] = {"fields": fields, "entity_checks": checks}
    if entity.endpoint_key:
        body["endpoint_key"] = entity.endpoint_key
    return body


def plugin_schema_to_json(subschema: Subschema) -> Dict[str, Any]:
    """``GET /schemas/plugins/{name}``: the fields the plugin specialises, Kong's order.

    Kong answers with the plugin's schema file: ``consumer``, ``protocols`` and
    ``config`` (every config field with its type, default and validators).
    """
    order = ("consumer", "protocols", "config")
    names = [n for n in order if n in subschema.fields]
    names += sorted(n for n in subschema.fields if n not in order)
    return {"fields": [{name: _field_json(subschema.fields[name])} for name in names]}
