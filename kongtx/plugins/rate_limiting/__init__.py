"""The ``rate-limiting`` plugin: Kong's, with exact counting.

Requests are counted per identifier (``limit_by``) in fixed UTC calendar
windows (:mod:`kongtx.ratelimit`) for every configured period. Unlike Kong,
which reads the usage and adds to it later in a timer (so concurrent requests
overshoot), the check and the addition are one atomic step in every policy
(:mod:`kongtx.plugins.rate_limiting.policies`): with a limit of N, exactly N
requests pass per window. A refused request is not counted.

Headers (unless ``hide_client_headers``): ``X-RateLimit-Limit-<Period>`` and
``X-RateLimit-Remaining-<Period>`` per period, and ``RateLimit-Limit``,
``RateLimit-Remaining``, ``RateLimit-Reset`` for the most restrictive window;
a refused request gets ``Retry-After`` and ``error_code`` with
``{"message": error_message}``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

from twisted.logger import Logger

from kongtx import ratelimit
from kongtx.plugins.base import BasePlugin
from kongtx.plugins.rate_limiting import policies
from kongtx.schema import typedefs as t

__all__ = ["RateLimitingPlugin", "install", "uninstall", "validate_config"]

install = policies.install
uninstall = policies.uninstall

ERR_PERIOD_ORDER = "The limit for %s(%.1f) cannot be lower than the limit for %s(%.1f)"
ERR_SYNC_RATE_POLICY = "sync_rate can only be used with the redis policy"
ERR_SYNC_RATE_MIN = "sync_rate must be greater than 0.02, or -1 to disable"
ERR_REQUIRED = "required field missing"
MSG_UNEXPECTED = "An unexpected error occurred"
LOG_USAGE_FAILED = "failed to get usage: {error}"
LOG_SYNC_RATE = "sync_rate {sync_rate} is not supported yet: counting synchronously (-1)"

HEADER_LIMIT = "X-RateLimit-Limit-%s"
HEADER_REMAINING = "X-RateLimit-Remaining-%s"

#: Counters kept per plugin for the current windows (then the cache starts over):
#: a request of a known identifier builds no counter objects.
MAX_CACHED_IDENTIFIERS = 10000

_log = Logger(namespace="kongtx.plugins.rate-limiting")


def validate_config(config: Mapping[str, Any]) -> Any:
    """Kong's ``validate_periods_order`` and conditional fields; ``None`` when valid."""
    periods = ratelimit.PERIODS
    for i, lower in enumerate(periods):
        v1 = config.get(lower)
        if not isinstance(v1, (int, float)) or isinstance(v1, bool):
            continue
        for upper in periods[i + 1:]:
            v2 = config.get(upper)
            if isinstance(v2, (int, float)) and not isinstance(v2, bool) and v2 < v1:
                return ERR_PERIOD_ORDER % (upper, v2, lower, v1)
    policy = config.get("policy") or "local"
    sync_rate = config.get("sync_rate")
    if sync_rate is None:
        sync_rate = -1
    if policy != "redis" and sync_rate != -1:
        return ERR_SYNC_RATE_POLICY
    if policy == "redis" and sync_rate != -1 and sync_rate < 0.02:
        return ERR_SYNC_RATE_MIN
    limit_by = config.get("limit_by") or "consumer"
    if limit_by == "header" and not config.get("header_name"):
        return {"header_name": ERR_REQUIRED}
    if limit_by == "path" and not config.get("path"):
        return {"path": ERR_REQUIRED}
    if policy == "redis" and not (config.get("redis") or {}).get("host"):
        return {"redis": {"host": ERR_REQUIRED}}
    return None


_REDIS = t.record([
    ("host", t.host()),
    ("port", t.port(default=6379)),
    ("timeout", t.integer(default=2000, between=(0, 2 ** 31 - 2))),
    ("username", t.string()),
    ("password", t.string()),
    ("database", t.integer(default=0)),
    ("ssl", t.boolean(required=True, default=False)),
    ("ssl_verify", t.boolean(required=True, default=False)),
    ("server_name", t.host()),
], required=True)

CONFIG = t.record(
    [(period, t.number(gt=0)) for period in ratelimit.PERIODS] + [
        ("limit_by", t.string(default="consumer", required=True,
                              one_of=("consumer", "credential", "ip", "service", "header",
                                      "path"))),
        ("header_name", t.header_name()),
        ("path", t.path()),
        ("policy", t.string(default="local", required=True,
                            one_of=("local", "cluster", "redis"))),
        ("fault_tolerant", t.boolean(required=True, default=True)),
        ("redis", _REDIS),
        ("hide_client_headers", t.boolean(required=True, default=False)),
        ("error_code", t.number(default=429, gt=0)),
        ("error_message", t.string(default="API rate limit exceeded")),
        ("sync_rate", t.number(required=True, default=-1)),
    ],
    record_at_least_one_of=ratelimit.PERIODS,
    custom=validate_config,
)


class RateLimitingPlugin(BasePlugin):
    """Kong's rate-limiting (priority 910), consumer-scopable, exact in every policy."""

    NAME = "rate-limiting"
    PRIORITY = 910
    VERSION = "3.10.0"
    NO_CONSUMER = False
    CONFIG = CONFIG
    #: Kong's deprecated flat Redis settings, still accepted on input.
    CONFIG_SHORTHANDS = {
        "redis_" + name: ("redis", name)
        for name in ("host", "port", "username", "password", "database", "timeout",
                     "ssl", "ssl_verify", "server_name")
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.limits: List[Tuple[str, int]] = [
            (p, int(math.floor(config[p]))) for p in ratelimit.PERIODS
            if config.get(p) is not None
        ]
        self.policy = config.get("policy") or "local"
        self.limit_by = config.get("limit_by") or "consumer"
        self.fault_tolerant = config.get("fault_tolerant", True) is not False
        self.hide = bool(config.get("hide_client_headers"))
        self.error_code = int(config.get("error_code") or 429)
        self.error_message = config.get("error_message")
        if self.error_message is None:
            self.error_message = "API rate limit exceeded"
        self._scope: Optional[str] = None
        sync_rate = config.get("sync_rate")
        self._warn_sync_rate = sync_rate is not None and sync_rate != -1
        #: Per period, in ``limits`` order: its two header names and window length.
        self._headers = [
            (HEADER_LIMIT % ratelimit.header_period(p),
             HEADER_REMAINING % ratelimit.header_period(p), ratelimit.EXPIRATION[p])
            for p, _ in self.limits
        ]
        # The current windows: valid for lo <= now < hi; their starts and ends, and
        # the counters of each identifier seen in them.
        self._lo = 0.0
        self._hi = -1.0
        self._starts: List[int] = []
        self._ends: List[int] = []
        self._counters: Dict[str, List[policies.Counter]] = {}

    # -- what is counted -------------------------------------------------------------

    def _identifier(self, kong: Any) -> Optional[str]:
        """Kong's ``get_identifier``; ``None`` means "not counted" (another path)."""
        by = self.limit_by
        found: Optional[str] = None
        if by == "service":
            found = (kong.router.get_service() or {}).get("id")
        elif by == "consumer":
            found = ((kong.client.get_consumer() or kong.client.get_credential() or {})
                     .get("id"))
        elif by == "credential":
            found = (kong.client.get_credential() or {}).get("id")
        elif by == "header":
            found = kong.request.get_header(self.config.get("header_name") or "")
        elif by == "path":
            if kong.request.get_path() != self.config.get("path"):
                return None
            found = self.config.get("path")
        return found or kong.client.get_forwarded_ip() or ""

    def _scope_of(self, kong: Any) -> str:
        """``<route id>:<service id>`` of this plugin's row (Kong keys counters by them)."""
        if self._scope is None:
            scope = ":"
            for config in kong.chain.configs:
                if config.handler is self:
                    scope = "%s:%s" % (config.route_id or "", config.service_id or "")
                    break
            self._scope = scope
        return self._scope

    # -- phases -------------------------------------------------------------------------

    def _windows(self, now: float) -> None:
        """Compute the windows holding ``now`` (and forget the counters of the old ones)."""
        starts = [ratelimit.window_start(p, now) for p, _ in self.limits]
        ends = [ratelimit.window_end(p, now) for p, _ in self.limits]
        self._starts = starts
        self._ends = ends
        self._lo = float(max(starts)) if starts else 0.0
        self._hi = float(min(ends)) if ends else -1.0
        self._counters = {}

    def _ttl(self, period: str) -> int:
        """How long a counter is kept: the window's length for ``local`` (Kong's
        shm expiry; a node's shared counter table then holds only live windows),
        a day more in the shared stores."""
        if self.policy == "local":
            return ratelimit.EXPIRATION[period]
        return ratelimit.EXPIRATION[period] + 86400

    def _counters_for(self, kong: Any, identifier: str, now: float) -> List[policies.Counter]:
        if not self._lo <= now < self._hi:
            self._windows(now)
        cache = self._counters
        counters = cache.get(identifier)
        if counters is None:
            if len(cache) >= MAX_CACHED_IDENTIFIERS:
                cache.clear()
            prefix = "%s:%s:" % (self._scope_of(kong), identifier)
            counters = cache[identifier] = [
                policies.Counter(prefix + period, start, self._ttl(period),
                                 limit)
                for (period, limit), start in zip(self.limits, self._starts)
            ]
        return counters

    def access(self, kong: Any) -> Any:
        try:
            runtime = policies.runtime_for(kong.node.get_id())
        except policies.NotInstalled as e:
            return self._failed(kong, None, e)
        if self._warn_sync_rate and "sync_rate" not in runtime.logged:
            runtime.logged.add("sync_rate")
            kong.log.warn(LOG_SYNC_RATE, sync_rate=self.config.get("sync_rate"))
        identifier = self._identifier(kong)
        if identifier is None:
            return None
        now = runtime.reactor.seconds()
        counters = self._counters_for(kong, identifier, now)
        ends = self._ends
        try:
            result = policies.usage(runtime, self.policy, counters, self.config.get("redis"))
        except Exception as e:
            return self._failed(kong, runtime, e)
        if isinstance(result, tuple):
            return self._decide(kong, now, ends, result)
        return result.addCallbacks(
            lambda usage: self._decide(kong, now, ends, usage),
            lambda reason: self._failed(kong, runtime, reason.value),
        )

    def _failed(self, kong: Any, runtime: Optional[policies.Runtime], error: BaseException) -> None:
        """The counter store failed: let the request through (logged once) or answer 500."""
        kind = "%s:%s" % (self.policy, type(error).__name__)
        if runtime is None or kind not in runtime.logged:
            if runtime is not None:
                runtime.logged.add(kind)
            _log.error(LOG_USAGE_FAILED, error=str(error) or type(error).__name__)
        if self.fault_tolerant and runtime is not None:
            return None
        return kong.response.exit(500, {"message": MSG_UNEXPECTED})

    def _decide(self, kong: Any, now: float, ends: List[int],
                usage: Tuple[bool, List[int]]) -> None:
        """Set the headers and refuse or not; ``ends``: the windows' ends (as ``limits``)."""
        allowed, values = usage
        hide = self.hide
        if hide and allowed:
            return None
        reset = 1
        best_remaining = best_window = best_limit = 0
        best_end = 0
        first = True
        set_header = kong.response.set_header
        for (_, limit), (limit_name, remaining_name, window), value, end in zip(
                self.limits, self._headers, values, ends):
            if not allowed and value <= limit:
                value -= 1  # this period did not refuse: show its usage as Kong does
            remaining = limit - value if value < limit else 0
            if first or (remaining, -window) < (best_remaining, -best_window):
                first = False
                best_remaining, best_window, best_limit, best_end = remaining, window, limit, end
            if not hide:
                set_header(limit_name, limit)
                set_header(remaining_name, remaining)
        if not first:
            reset = max(1, int(math.ceil(best_end - now)))
        if not hide:
            set_header("RateLimit-Limit", best_limit)
            set_header("RateLimit-Remaining", best_remaining)
            set_header("RateLimit-Reset", reset)
        if not allowed:
            return kong.response.exit(self.error_code, {"message": self.error_message},
                                      {"Retry-After": reset})
        return None
