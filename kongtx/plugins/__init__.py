"""The plugin registry: bundled plugins, third-party entry points, loading.

``BUNDLED`` lists every plugin shipped with kongtx in one place (wire name →
``"module:Class"``). Third-party plugins are installed as Python distributions
declaring an entry point in the ``kongtx.plugins`` group::

    [options.entry_points]
    kongtx.plugins =
        example-header = kongtx_example_header:ExampleHeaderPlugin

:func:`load_plugins` turns the ``plugins`` configuration property (e.g.
``("bundled", "example-header")``) into ``{name: plugin class}``.
``KONG_PRIORITIES`` is Kong's table of bundled plugin priorities (3.10); a test
pins every bundled plugin's ``PRIORITY`` to it.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Iterable, Optional, Sequence

from kongtx.plugins.base import BasePlugin

__all__ = [
    "BUNDLED",
    "ENTRY_POINT_GROUP",
    "KONG_PRIORITIES",
    "PluginError",
    "load_plugins",
    "load_plugin_class",
    "BasePlugin",
]

ENTRY_POINT_GROUP = "kongtx.plugins"

ERR_NOT_INSTALLED = "plugin '%s' is not installed"
ERR_BAD_PLUGIN = "plugin '%s' could not be loaded: %s"

#: Plugins shipped with kongtx: wire name -> "module:Class".
BUNDLED: Dict[str, str] = {
    "key-auth": "kongtx.plugins.key_auth:KeyAuthPlugin",
    "rate-limiting": "kongtx.plugins.rate_limiting:RateLimitingPlugin",
    "syslog": "kongtx.plugins.syslog:SyslogPlugin",
    "file-log": "kongtx.plugins.file_log:FileLogPlugin",
    "http-log": "kongtx.plugins.http_log:HttpLogPlugin",
}

#: Kong 3.10 ``BUNDLED_PLUGINS`` priorities (handler ``PRIORITY``).
KONG_PRIORITIES: Dict[str, int] = {
    # auth
    "jwt": 1450,
    "oauth2": 1400,
    "key-auth": 1250,
    "ldap-auth": 1200,
    "basic-auth": 1100,
    "hmac-auth": 1030,
    "session": 1900,
    "acl": 950,
    # security / traffic
    "bot-detection": 2500,
    "cors": 2000,
    "acme": 1705,
    "ip-restriction": 990,
    "request-size-limiting": 951,
    "rate-limiting": 910,
    "response-ratelimiting": 900,
    "redirect": 779,
    "proxy-cache": 100,
    "request-termination": 2,
    # transformations
    "correlation-id": 100001,
    "grpc-gateway": 998,
    "request-transformer": 801,
    "response-transformer": 800,
    "grpc-web": 3,
    # serverless
    "pre-function": 1000000,
    "aws-lambda": 750,
    "azure-functions": 749,
    "post-function": -1000,
    # logging
    "http-log": 12,
    "statsd": 11,
    "datadog": 10,
    "file-log": 9,
    "udp-log": 8,
    "tcp-log": 7,
    "loggly": 6,
    "syslog": 4,
    # observability
    "zipkin": 100000,
    "opentelemetry": 14,
    "prometheus": 13,
    # AI
    "ai-request-transformer": 777,
    "ai-prompt-template": 773,
    "ai-prompt-decorator": 772,
    "ai-prompt-guard": 771,
    "ai-proxy": 770,
    "ai-response-transformer": 768,
    "standard-webhooks": 760,
}


class PluginError(Exception):
    """A plugin that cannot be loaded; ``str()`` is the operator's one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return "plugins: %s" % (self.message,)


def _system_entry_points() -> Iterable[Any]:
    from importlib import metadata

    eps = metadata.entry_points()
    if hasattr(eps, "select"):  # Python 3.10+
        return list(eps.select(group=ENTRY_POINT_GROUP))
    return list(eps.get(ENTRY_POINT_GROUP, ()))  # Python 3.9: a dict


def load_plugin_class(name: str, target: str) -> type:
    """Import ``"module:Class"`` and check it is a plugin named *name*."""
    module_name, _, attr_name = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr_name.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # an import error names the broken plugin
        raise PluginError(ERR_BAD_PLUGIN % (name, exc)) from exc
    return _checked(name, obj)


def _checked(name: str, cls: Any) -> type:
    if not (isinstance(cls, type) and issubclass(cls, BasePlugin)):
        raise PluginError(ERR_BAD_PLUGIN % (name, "not a BasePlugin subclass"))
    if cls.NAME != name:
        raise PluginError(
            ERR_BAD_PLUGIN % (name, "its NAME is %r" % (cls.NAME,))
        )
    return cls


def load_plugins(
    names: Sequence[str], entry_points: Optional[Iterable[Any]] = None
) -> Dict[str, type]:
    """Resolve the ``plugins`` property into ``{wire name: plugin class}``.

    ``"bundled"`` expands to every bundled plugin; ``"off"`` alone loads none.
    Other names are looked up in ``BUNDLED`` and then in the ``kongtx.plugins``
    entry points (*entry_points*, for tests, replaces the installed ones: any
    objects with ``name``, ``group`` (optional) and ``load()``). An unknown name
    raises :class:`PluginError` (``plugins: plugin 'x' is not installed``).
    """
    wanted = []
    for name in names:
        if name == "off":
            continue
        if name == "bundled":
            wanted.extend(BUNDLED)
        else:
            wanted.append(name)
    loaded: Dict[str, type] = {}
    third_party: Optional[Dict[str, Any]] = None
    for name in wanted:
        if name in loaded:
            continue
        if name in BUNDLED:
            loaded[name] = load_plugin_class(name, BUNDLED[name])
            continue
        if third_party is None:
            eps = _system_entry_points() if entry_points is None else entry_points
            third_party = {}
            for ep in eps:
                if getattr(ep, "group", ENTRY_POINT_GROUP) == ENTRY_POINT_GROUP:
                    third_party.setdefault(ep.name, ep)
        ep = third_party.get(name)
        if ep is None:
            raise PluginError(ERR_NOT_INSTALLED % (name,))
        try:
            cls = ep.load()
        except Exception as exc:
            raise PluginError(ERR_BAD_PLUGIN % (name, exc)) from exc
        loaded[name] = _checked(name, cls)
    return loaded
