"""The base class every kongtx plugin derives from (Kong's ``handler.lua``).

A plugin is one module holding one subclass of :class:`BasePlugin`: its wire
``NAME`` (Kong's hyphens), its static ``PRIORITY`` (higher runs first), its
``VERSION``, the ``PROTOCOLS`` it may run on, whether it may be scoped to a
consumer (``NO_CONSUMER``: auth plugins may not) and ``CONFIG``, the schema of
its ``config`` record with defaults.

An instance is created once per plugin row with the validated config, when the
snapshot is rebuilt, never per request. The phase methods are all optional; the
pipeline only calls the ones a subclass defines:

* ``rewrite(kong)``: global plugins only, before the route's chain;
* ``access(kong)``: may short-circuit with ``kong.response.exit(...)``;
* ``header_filter(kong)``: the upstream (or exit) response headers;
* ``body_filter(kong, chunk) -> bytes``: each response body chunk;
* ``log(kong)``: after the response is finished; never delays it.

``rewrite``, ``access`` and ``log`` may return a Deferred or be ``async def``;
``header_filter`` and ``body_filter`` are synchronous.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Tuple

from kongtx.schema import typedefs

__all__ = ["BasePlugin", "PHASES", "HTTP_PROTOCOLS", "ALL_PROTOCOLS"]

#: The phases a plugin may implement, in the order they run.
PHASES: Tuple[str, ...] = ("rewrite", "access", "header_filter", "body_filter", "log")

#: Kong's ``protocols_http``.
HTTP_PROTOCOLS: Tuple[str, ...] = ("http", "https")

#: Kong's default plugin ``protocols``: the http subsystem's protocols.
ALL_PROTOCOLS: Tuple[str, ...] = ("grpc", "grpcs", "http", "https")


class BasePlugin:
    """A plugin handler; subclass it and define the phases you need."""

    NAME: ClassVar[str] = ""
    PRIORITY: ClassVar[int] = 0
    VERSION: ClassVar[str] = "0.1.0"
    PROTOCOLS: ClassVar[Tuple[str, ...]] = ALL_PROTOCOLS
    NO_CONSUMER: ClassVar[bool] = False
    CONFIG: ClassVar[typedefs.Field] = typedefs.record([])
    #: Write-only legacy ``config`` keys and the field path each one sets, like Kong's
    #: deprecated ``shorthand_fields`` (``{"redis_host": ("redis", "host")}``).
    CONFIG_SHORTHANDS: ClassVar[Mapping[str, Tuple[str, ...]]] = {}

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def __repr__(self) -> str:
        return "<%s %s>" % (type(self).__name__, self.NAME)

    @classmethod
    def implements(cls, phase: str) -> bool:
        """Whether this plugin defines *phase* (the base class defines none)."""
        return getattr(cls, phase, None) is not None


# The phase methods are declared as None on the base class so that the pipeline
# can skip the ones a plugin does not define without calling a no-op.
for _phase in PHASES:
    setattr(BasePlugin, _phase, None)
del _phase
