"""Where rate-limiting counters live: ``local``, ``cluster`` and ``redis``.

Every policy answers one question per request, atomically: "add 1 to each of
these windowed counters, unless one of them would pass its limit". The answer
is ``(allowed, values)``: the counters' values after the request (for a
refused request, what they would have been). A refused request is not counted,
as in Kong.

* ``local``: a dict of this node's :class:`Runtime`, checked and added in one
  synchronous step on the reactor thread (no Deferred at all): exact per node.
  A node with worker processes keeps them in shared memory instead
  (:mod:`~kongtx.plugins.rate_limiting.shared`), one locked step for all
  workers: still exact per node.
* ``cluster``: ``IStore.increment`` (one atomic upsert per counter, the limit
  checked under the row lock): exact across the nodes of one database. With
  several periods the counters are added one after the other; when a longer
  period refuses, the shorter ones already added are taken back, so for that
  moment a concurrent request may see them one too high (never too low: no
  request beyond a limit ever passes).
* ``redis``: one Lua script (``EVAL``) checks every counter and adds to all of
  them or to none: exact across every node using that Redis.

A :class:`Runtime` per node holds the local counters, the store and the Redis
connections; ``kongtx.tap`` installs it with :func:`install` (keyed by node id,
so two nodes in one process stay separate).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.internet import defer

from kongtx.plugins.rate_limiting.resp import RedisClient
from kongtx.store.memory import Counters

__all__ = ["Counter", "Runtime", "install", "uninstall", "runtime_for", "NotInstalled",
           "REDIS_SCRIPT", "local_usage", "cluster_usage", "redis_usage"]

Usage = Tuple[bool, List[int]]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Counter:
    """One counter a request adds to: ``key`` in the window starting at ``window_start``."""

    key: str
    window_start: int
    ttl: int
    limit: int


class NotInstalled(Exception):
    """No :class:`Runtime` was installed for this node (a wiring bug)."""


class Runtime:
    """One node's rate-limiting state: its clock, local counters, store and Redis clients."""

    def __init__(self, reactor: Any, store: Any = None) -> None:
        self.reactor = reactor
        self.store = store
        #: ``Counters``, or a worker's ``SharedCounters`` (set by ``kongtx.node``).
        self.local: Any = Counters()
        self._redis: Dict[Tuple[Any, ...], RedisClient] = {}
        #: Problems already logged (fault_tolerant logs each kind once, not per request).
        self.logged: set = set()

    def redis(self, conf: Any) -> RedisClient:
        """The client for a ``config.redis`` record (one per distinct server settings)."""
        key = (conf.get("host"), conf.get("port") or 6379, conf.get("database") or 0,
               conf.get("username"), conf.get("password"), bool(conf.get("ssl")),
               bool(conf.get("ssl_verify")), conf.get("server_name"),
               conf.get("timeout") or 2000)
        client = self._redis.get(key)
        if client is None:
            tls = None
            if conf.get("ssl"):
                from twisted.internet import ssl

                name = conf.get("server_name") or conf.get("host")
                if conf.get("ssl_verify"):
                    tls = ssl.optionsForClientTLS(name)
                else:
                    tls = ssl.CertificateOptions(verify=False)
            client = RedisClient(
                self.reactor, conf.get("host"), int(conf.get("port") or 6379),
                timeout=float(conf.get("timeout") or 2000) / 1000.0,
                username=conf.get("username"), password=conf.get("password"),
                database=int(conf.get("database") or 0), tls=tls,
            )
            self._redis[key] = client
        return client

    def close(self) -> None:
        for client in self._redis.values():
            client.close()
        self._redis.clear()
        if not isinstance(self.local, Counters):
            self.local.close()


_RUNTIMES: Dict[str, Runtime] = {}


def install(node_id: str, reactor: Any, store: Any = None) -> Runtime:
    """Create (or replace) the runtime of node ``node_id``; returns it."""
    old = _RUNTIMES.get(node_id)
    if old is not None:
        old.close()
    runtime = _RUNTIMES[node_id] = Runtime(reactor, store)
    return runtime


def uninstall(node_id: str) -> None:
    """Forget node ``node_id``'s runtime, closing its Redis connections."""
    runtime = _RUNTIMES.pop(node_id, None)
    if runtime is not None:
        runtime.close()


def runtime_for(node_id: str) -> Runtime:
    runtime = _RUNTIMES.get(node_id)
    if runtime is None:
        raise NotInstalled("rate-limiting is not installed on node %r" % (node_id,))
    return runtime


# -- the policies ----------------------------------------------------------------------


def local_usage(runtime: Runtime, counters: Sequence[Counter]) -> Usage:
    """Check and add in one synchronous step (nothing can run in between).

    With worker processes ``runtime.local`` is the node's
    :class:`~kongtx.plugins.rate_limiting.shared.SharedCounters`, whose
    ``usage`` is one step under a lock shared by every worker.
    """
    local = runtime.local
    if not isinstance(local, Counters):
        return local.usage(counters)  # type: ignore[no-any-return]
    values = [local.get(c.key, c.window_start) + 1 for c in counters]
    if any(v > c.limit for v, c in zip(values, counters)):
        return False, values
    for c in counters:
        local.increment(c.key, c.window_start, c.ttl, 1)
    return True, values


async def cluster_usage(runtime: Runtime, counters: Sequence[Counter]) -> Usage:
    """``IStore.increment`` per counter, longest period first; undo on refusal."""
    store = runtime.store
    if store is None:
        raise NotInstalled("the cluster policy needs a database")
    values: List[int] = [0] * len(counters)
    added: List[int] = []
    refused = False
    for i in reversed(range(len(counters))):
        c = counters[i]
        if refused:
            values[i] = await store.increment(c.key, c.window_start, c.ttl, 0) + 1
            continue
        values[i] = await store.increment(c.key, c.window_start, c.ttl, 1, c.limit)
        if values[i] > c.limit:
            refused = True
            for j in added:
                u = counters[j]
                await store.increment(u.key, u.window_start, u.ttl, -1)
        else:
            added.append(i)
    return not refused, values


#: KEYS: the counters; ARGV[1]: the amount, then per counter its limit and ttl.
#: Adds to every counter or to none; returns {allowed, value1, value2, ...}.
REDIS_SCRIPT = """
local amount = tonumber(ARGV[1])
local values = {}
local allowed = 1
for i, key in ipairs(KEYS) do
  local value = tonumber(redis.call('GET', key) or '0') + amount
  values[i] = value
  if value > tonumber(ARGV[i * 2]) then allowed = 0 end
end
if allowed == 1 then
  for i, key in ipairs(KEYS) do
    values[i] = redis.call('INCRBY', key, amount)
    if values[i] == amount then redis.call('EXPIRE', key, ARGV[i * 2 + 1]) end
  end
end
table.insert(values, 1, allowed)
return values
"""


async def redis_usage(runtime: Runtime, counters: Sequence[Counter], conf: Any) -> Usage:
    """One ``EVAL`` of :data:`REDIS_SCRIPT` on the configured Redis."""
    client = runtime.redis(conf)
    args: List[Any] = ["EVAL", REDIS_SCRIPT, len(counters)]
    args += ["ratelimit:%s:%d" % (c.key, c.window_start) for c in counters]
    args.append(1)
    for c in counters:
        args += [c.limit, c.ttl]
    reply = await client.execute(*args)
    return bool(reply[0]), [int(v) for v in reply[1:]]


def usage(runtime: Runtime, policy: str, counters: Sequence[Counter],
          redis_conf: Optional[Any] = None) -> Any:
    """``(allowed, values)`` now (``local``) or a Deferred firing with it."""
    if policy == "local":
        return local_usage(runtime, counters)
    if policy == "cluster":
        return defer.Deferred.fromCoroutine(cluster_usage(runtime, counters))
    return defer.Deferred.fromCoroutine(redis_usage(runtime, counters, redis_conf))
