"""Plugin phases: which configurations apply to a request, in what order, and running them.

Pure part (computed when the configuration changes, see :func:`build_plugin_index`):

* one :class:`PluginConfig` per enabled plugin row, holding the plugin instance
  created once from the row's ``config``;
* Kong's eight-level scoping precedence (``kong/runloop/plugins_iterator.lua``):
  for each plugin name, the configuration of the most specific scope among
  1 Route+Service+Consumer, 2 Route+Consumer, 3 Service+Consumer,
  4 Route+Service, 5 Consumer, 6 Route, 7 Service, 8 Global wins;
* one :class:`Chain` per route: the configurations that apply without a
  consumer, in descending ``PRIORITY`` (ties by name), split per phase.

Running part (per request, given a :class:`kongtx.pdk.Kong`): ``rewrite``
(global configurations only) and ``access`` may return a Deferred or an
awaitable; a plain return costs no Deferred. A plugin that calls
``kong.response.exit(...)`` stops the phase (the remaining access plugins and
the upstream are skipped). An exception stops the phase and marks the request
failed (the proxy answers Kong's 500). When an access plugin authenticates a
consumer, the configurations of the remaining plugins are resolved again with
that consumer. ``header_filter`` and ``body_filter`` are synchronous; ``log``
runs after the response is finished and its errors are only logged.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import failure

from kongtx.plugins.base import ALL_PROTOCOLS

__all__ = [
    "PluginConfig",
    "Chain",
    "PluginIndex",
    "EMPTY_INDEX",
    "precedence",
    "resolve",
    "order",
    "build_plugin_index",
    "run_access",
    "run_header_filter",
    "run_body_filter",
    "run_log",
]

log = Logger()

MSG_PLUGIN_FAILED = "plugin {plugin} failed in its {phase} phase (request {request_id})"
MSG_PLUGIN_SKIPPED = "plugin {id} ({name}) is not used: {reason}"

ScopeKey = Tuple[Optional[str], Optional[str], Optional[str]]

#: At most this many chains with a consumer are kept per index (then they are
#: resolved afresh): bounds the memory of many consumers on many routes.
MAX_CONSUMER_CHAINS = 10000


def _fk(value: Any) -> Optional[str]:
    if isinstance(value, Mapping):
        return value.get("id")
    return value if isinstance(value, str) else None


@attr.s(frozen=True, slots=True, auto_attribs=True, eq=False)
class PluginConfig:
    """One enabled plugin row, ready to run: its scope and its plugin instance."""

    id: str
    name: str
    route_id: Optional[str]
    service_id: Optional[str]
    consumer_id: Optional[str]
    protocols: frozenset
    priority: int
    handler: Any
    row: Mapping[str, Any]
    logger: Logger

    @property
    def scope(self) -> ScopeKey:
        return (self.route_id, self.service_id, self.consumer_id)

    @property
    def is_global(self) -> bool:
        return self.route_id is None and self.service_id is None and self.consumer_id is None


def precedence(route_id: Optional[str], service_id: Optional[str],
               consumer_id: Optional[str]) -> int:
    """The precedence level (1 = most specific, 8 = global) of a scope. Pure."""
    return _LEVELS[(route_id is not None, service_id is not None, consumer_id is not None)]


_LEVELS = {
    (True, True, True): 1,
    (True, False, True): 2,
    (False, True, True): 3,
    (True, True, False): 4,
    (False, False, True): 5,
    (True, False, False): 6,
    (False, True, False): 7,
    (False, False, False): 8,
}


def _lookup_keys(route_id: Optional[str], service_id: Optional[str],
                 consumer_id: Optional[str]) -> Tuple[ScopeKey, ...]:
    r, s, c = route_id, service_id, consumer_id
    if c is None:
        return ((r, s, None), (r, None, None), (None, s, None), (None, None, None))
    return (
        (r, s, c),
        (r, None, c),
        (None, s, c),
        (r, s, None),
        (None, None, c),
        (r, None, None),
        (None, s, None),
        (None, None, None),
    )


def _order_key(config: PluginConfig) -> Tuple[int, str]:
    return (-config.priority, config.name)


def order(configs: Iterable[PluginConfig]) -> Tuple[PluginConfig, ...]:
    """Configurations in execution order: descending ``PRIORITY``, ties by name."""
    return tuple(sorted(configs, key=_order_key))


def resolve(by_scope: Mapping[ScopeKey, Mapping[str, PluginConfig]],
            route_id: Optional[str], service_id: Optional[str],
            consumer_id: Optional[str]) -> Tuple[PluginConfig, ...]:
    """The configurations that apply to a request, one per plugin name, in order.

    ``by_scope`` maps a scope ``(route id, service id, consumer id)`` (``None``
    for "any") to ``{plugin name: config}``. Pure.
    """
    chosen: Dict[str, PluginConfig] = {}
    for key in _lookup_keys(route_id, service_id, consumer_id):
        table = by_scope.get(key)
        if table:
            for name, config in table.items():
                if name not in chosen:
                    chosen[name] = config
    return order(chosen.values())


def _implementing(configs: Sequence[PluginConfig], phase: str) -> Tuple[PluginConfig, ...]:
    return tuple(c for c in configs if getattr(c.handler, phase, None) is not None)


#: One step of the rewrite/access phases: the phase, the configuration and its
#: handler's bound method for that phase.
Step = Tuple[str, PluginConfig, Callable[[Any], Any]]


def _steps(phase: str, configs: Iterable[PluginConfig]) -> Tuple[Step, ...]:
    return tuple((phase, c, getattr(c.handler, phase)) for c in configs)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Chain:
    """The configurations that apply to one (route, service[, consumer]), per phase.

    ``steps`` is what :func:`run_access` runs: ``rewrite`` then ``access``, each
    with its bound phase method, computed once here rather than per request.
    """

    configs: Tuple[PluginConfig, ...]
    rewrite: Tuple[PluginConfig, ...]
    access: Tuple[PluginConfig, ...]
    header_filter: Tuple[PluginConfig, ...]
    body_filter: Tuple[PluginConfig, ...]
    log: Tuple[PluginConfig, ...]
    steps: Tuple[Step, ...] = attr.ib()

    @steps.default
    def _all_steps(self) -> Tuple[Step, ...]:
        return _steps("rewrite", self.rewrite) + _steps("access", self.access)

    @classmethod
    def of(cls, configs: Tuple[PluginConfig, ...]) -> "Chain":
        return cls(
            configs=configs,
            rewrite=tuple(c for c in _implementing(configs, "rewrite") if c.is_global),
            access=_implementing(configs, "access"),
            header_filter=_implementing(configs, "header_filter"),
            body_filter=_implementing(configs, "body_filter"),
            log=_implementing(configs, "log"),
        )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PluginIndex:
    """Every plugin configuration of a snapshot, and the chains per route.

    ``chains`` maps a route id to its :class:`Chain` and holds only routes with
    at least one applicable configuration: a request on any other route runs
    no plugin at all. ``consumer_scoped`` says whether any configuration is
    scoped to a consumer (if not, authenticating a consumer changes nothing).
    """

    configs: Mapping[str, PluginConfig]
    by_scope: Mapping[ScopeKey, Mapping[str, PluginConfig]]
    chains: Mapping[str, Chain]
    consumer_scoped: bool
    routes: Mapping[str, Mapping[str, Any]] = attr.ib(factory=dict)
    services: Mapping[str, Mapping[str, Any]] = attr.ib(factory=dict)
    #: Chains with a consumer, resolved on first use (the index never changes:
    #: a new configuration is a new index, with an empty cache).
    _with_consumer: Dict[ScopeKey, Chain] = attr.ib(factory=dict, eq=False, repr=False)

    def chain_for(self, route_id: str) -> Optional[Chain]:
        """The chain of a route without a consumer (``None``: no plugin runs)."""
        return self.chains.get(route_id)

    def chain_with_consumer(self, route_id: Optional[str], service_id: Optional[str],
                            consumer_id: Optional[str]) -> Chain:
        """The chain once ``consumer_id`` is authenticated (computed once per
        route, service and consumer)."""
        key = (route_id, service_id, consumer_id)
        cache = self._with_consumer
        chain = cache.get(key)
        if chain is None:
            if len(cache) >= MAX_CONSUMER_CHAINS:
                cache.clear()
            chain = cache[key] = Chain.of(
                resolve(self.by_scope, route_id, service_id, consumer_id))
        return chain


EMPTY_INDEX = PluginIndex(configs={}, by_scope={}, chains={}, consumer_scoped=False)


def _make_config(row: Mapping[str, Any], cls: type) -> PluginConfig:
    consumer_id = _fk(row.get("consumer"))
    protocols = row.get("protocols") or cls.PROTOCOLS or ALL_PROTOCOLS
    handler = cls(row.get("config") or {})
    return PluginConfig(
        id=row["id"],
        name=row["name"],
        route_id=_fk(row.get("route")),
        service_id=_fk(row.get("service")),
        consumer_id=consumer_id,
        protocols=frozenset(protocols),
        priority=int(cls.PRIORITY),
        handler=handler,
        row=row,
        logger=Logger(namespace="kongtx.plugins.%s" % (row["name"],)),
    )


def build_plugin_index(
    rows: Iterable[Mapping[str, Any]],
    classes: Mapping[str, type],
    routes: Iterable[Tuple[str, Optional[str]]],
    previous: Optional[PluginIndex] = None,
    *,
    route_rows: Optional[Mapping[str, Mapping[str, Any]]] = None,
    service_rows: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> PluginIndex:
    """Instantiate enabled plugin rows and precompute the chain of every route.

    :param rows: ``plugins`` rows (Kong's JSON shape, ``config`` validated).
    :param classes: loaded plugin classes by name (see ``kongtx.plugins``).
    :param routes: ``(route id, service id)`` of every routable route.
    :param previous: the index of the previous snapshot: a config whose row did
        not change keeps its plugin instance.
    """
    old = previous.configs if previous is not None else {}
    configs: Dict[str, PluginConfig] = {}
    by_scope: Dict[ScopeKey, Dict[str, PluginConfig]] = {}
    consumer_scoped = False
    for row in rows:
        if row.get("enabled") is False:
            continue
        name = row.get("name")
        cls = classes.get(name)  # type: ignore[arg-type]
        if cls is None:
            log.warn(MSG_PLUGIN_SKIPPED, id=row.get("id"), name=name,
                     reason="plugin not enabled on this node")
            continue
        kept = old.get(row.get("id"))  # type: ignore[arg-type]
        if kept is not None and kept.row == row and type(kept.handler) is cls:
            config = kept
        else:
            try:
                config = _make_config(row, cls)
            except Exception as exc:
                log.failure(MSG_PLUGIN_SKIPPED, id=row.get("id"), name=name, reason=exc)
                continue
        if config.consumer_id is not None:
            if cls.NO_CONSUMER:
                log.warn(MSG_PLUGIN_SKIPPED, id=config.id, name=name,
                         reason="this plugin cannot be scoped to a consumer")
                continue
            consumer_scoped = True
        configs[config.id] = config
        by_scope.setdefault(config.scope, {})[config.name] = config
    chains: Dict[str, Chain] = {}
    if configs:
        for route_id, service_id in routes:
            resolved = resolve(by_scope, route_id, service_id, None)
            if resolved or consumer_scoped:
                chains[route_id] = Chain.of(resolved)
    return PluginIndex(
        configs=configs,
        by_scope=by_scope,
        chains=chains,
        consumer_scoped=consumer_scoped,
        routes=route_rows or {},
        services=service_rows or {},
    )


# -- running phases -------------------------------------------------------------------


def _as_deferred(result: Any) -> Optional[defer.Deferred]:
    """A Deferred for an asynchronous result, ``None`` for a plain one (no allocation)."""
    if result is None:
        return None
    if isinstance(result, defer.Deferred):
        return result
    if inspect.isawaitable(result):
        return defer.ensureDeferred(result)
    return None


def _failed(kong: Any, config: PluginConfig, phase: str, reason: failure.Failure) -> None:
    log.failure(MSG_PLUGIN_FAILED, reason, plugin=config.name, phase=phase,
                request_id=kong.request_id)


def run_access(kong: Any) -> Optional[defer.Deferred]:
    """Run ``rewrite`` then ``access`` of ``kong.chain``.

    Returns ``None`` when every plugin returned synchronously, else a Deferred
    firing with ``None`` when the phases are over. Either way the outcome is on
    ``kong``: ``kong.exited`` (a plugin called ``kong.response.exit``),
    ``kong.failed`` (a plugin raised) or neither (go upstream).
    """
    steps = kong.chain.steps
    if not steps:
        return None
    return _run_steps(kong, steps, 0)


def _run_steps(kong: Any, steps: Sequence[Step], i: int) -> Optional[defer.Deferred]:
    scheme = kong.scheme
    n = len(steps)
    while i < n:
        phase, config, method = steps[i]
        i += 1
        if scheme not in config.protocols:
            continue
        kong.log = config.logger
        try:
            result = method(kong)
        except Exception:
            _failed(kong, config, phase, failure.Failure())
            kong.failed = True
            return None
        d = None if result is None else _as_deferred(result)
        if d is not None:
            def resumed(_: Any, i: int = i, config: PluginConfig = config,
                        phase: str = phase) -> Optional[defer.Deferred]:
                rest = _next_steps(kong, steps, i, config, phase)
                if rest is None:
                    return None
                return _run_steps(kong, rest, i)

            def errored(reason: failure.Failure, config: PluginConfig = config,
                        phase: str = phase) -> None:
                _failed(kong, config, phase, reason)
                kong.failed = True

            return d.addCallbacks(resumed, errored)
        rest = _next_steps(kong, steps, i, config, phase)
        if rest is None:
            return None
        if rest is not steps:
            steps = rest
            n = len(steps)
    return None


def _next_steps(kong: Any, steps: Sequence[Step], i: int, config: PluginConfig,
                phase: str) -> Optional[Sequence[Step]]:
    """After one plugin: ``None`` to stop, else the steps to go on with (``steps``
    itself, or, after an authentication, its first ``i`` and the access steps of
    the chain with the consumer that come after ``config``)."""
    if kong.exited is not None or kong.failed:
        return None
    if kong.consumer_changed:
        kong.consumer_changed = False
        index = kong.index
        if index.consumer_scoped:
            consumer = kong.consumer
            consumer_id = consumer.get("id") if consumer else None
            chain = index.chain_with_consumer(kong.route_id, kong.service_id, consumer_id)
            kong.chain = chain
            if phase == "access":
                after = _order_key(config)
                return tuple(steps[:i]) + tuple(
                    step for step in chain.steps
                    if step[0] == "access" and _order_key(step[1]) > after)
    return steps


def run_header_filter(kong: Any) -> None:
    """Run ``header_filter`` of the chain (synchronous; errors are logged)."""
    kong.apply_response_headers()
    scheme = kong.scheme
    for config in kong.chain.header_filter:
        if scheme not in config.protocols:
            continue
        kong.log = config.logger
        try:
            config.handler.header_filter(kong)
        except Exception:
            _failed(kong, config, "header_filter", failure.Failure())


def run_body_filter(kong: Any, chunk: bytes) -> bytes:
    """Pass one response body chunk through ``body_filter`` of the chain."""
    scheme = kong.scheme
    for config in kong.chain.body_filter:
        if scheme not in config.protocols:
            continue
        kong.log = config.logger
        try:
            filtered = config.handler.body_filter(kong, chunk)
        except Exception:
            _failed(kong, config, "body_filter", failure.Failure())
            continue
        if filtered is not None:
            chunk = filtered
    return chunk


def run_log(kong: Any) -> Optional[defer.Deferred]:
    """Run ``log`` of the chain, one plugin after the other; errors are only logged.

    Returns ``None`` if every plugin returned synchronously, else a Deferred
    firing with ``None`` when the last one is done (it never fails).
    """
    return _run_log(kong, kong.chain.log, 0)


def _run_log(kong: Any, configs: Sequence[PluginConfig], i: int) -> Optional[defer.Deferred]:
    scheme = kong.scheme
    while i < len(configs):
        config = configs[i]
        i += 1
        if scheme not in config.protocols:
            continue
        kong.log = config.logger
        try:
            d = _as_deferred(config.handler.log(kong))
        except Exception:
            _failed(kong, config, "log", failure.Failure())
            continue
        if d is not None:
            def errored(reason: failure.Failure, config: PluginConfig = config) -> None:
                _failed(kong, config, "log", reason)

            d.addErrback(errored)
            d.addCallback(lambda _, i=i: _run_log(kong, configs, i))
            return d
    return None
