"""A tiny Redis client (RESP2) on Twisted, for the rate-limiting ``redis`` policy.

Why not txredisapi: it imports the global reactor at module level and builds
its endpoints on it (kongtx injects the reactor everywhere), its TLS defaults
to a context factory that does not verify, and the policy needs four commands
(``AUTH``, ``SELECT``, ``EVAL``, ``PING``). This module speaks just that: one
connection per Redis server, commands pipelined on it in order, a reply
timeout per command that drops the connection (the next command reconnects).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.python.failure import Failure

__all__ = ["RedisError", "RedisUnavailable", "RedisProtocol", "RedisClient", "encode"]


class RedisError(Exception):
    """Redis answered with an error reply (``-ERR ...``)."""


class RedisUnavailable(Exception):
    """Redis could not be reached, dropped the connection or did not answer in time."""


_INCOMPLETE = object()


def encode(*args: Any) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            raw = arg
        else:
            raw = str(arg).encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def _parse(buf: bytes, at: int) -> Tuple[Any, int]:
    """One reply starting at ``at``: ``(value, next position)`` or ``(_INCOMPLETE, at)``."""
    end = buf.find(b"\r\n", at)
    if end < 0:
        return _INCOMPLETE, at
    kind, line = buf[at:at + 1], buf[at + 1:end]
    after = end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _INCOMPLETE, at
        return buf[after:after + size], after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items: List[Any] = []
        for _ in range(count):
            item, after = _parse(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, at
            items.append(item)
        return items, after
    raise ValueError("bad RESP reply type %r" % (kind,))


class RedisProtocol(protocol.Protocol):
    """Pipelined commands; replies fire the oldest waiting Deferred."""

    def __init__(self) -> None:
        self._buf = b""
        self._waiting: List[defer.Deferred] = []
        self.connected_ = False
        self.lost: Optional[defer.Deferred] = None

    def connectionMade(self) -> None:
        self.connected_ = True

    def command(self, *args: Any) -> defer.Deferred:
        """Sends a command; fires with its reply (errors fail with :class:`RedisError`)."""
        if not self.connected_:
            return defer.fail(RedisUnavailable("connection closed"))
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        self.transport.write(encode(*args))
        return d

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        at = 0
        while self._waiting:
            try:
                value, at_next = _parse(self._buf, at)
            except ValueError:
                self.transport.abortConnection()
                return
            if value is _INCOMPLETE:
                break
            at = at_next
            d = self._waiting.pop(0)
            if isinstance(value, RedisError):
                d.errback(value)
            else:
                d.callback(value)
        self._buf = self._buf[at:]

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self.connected_ = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(RedisUnavailable("connection lost: %s" % (reason.getErrorMessage(),)))


class RedisClient:
    """One (lazily opened, re-opened on demand) connection to one Redis server.

    :param reactor: ``IReactorTCP`` and ``IReactorTime``.
    :param timeout: seconds for connecting and for each reply.
    :param tls: a ``twisted.internet.ssl`` client connection creator, or ``None``.
    """

    def __init__(self, reactor: Any, host: str, port: int, *, timeout: float = 2.0,
                 username: Optional[str] = None, password: Optional[str] = None,
                 database: int = 0, tls: Any = None) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.username = username
        self.password = password
        self.database = database
        self.tls = tls
        self._proto: Optional[RedisProtocol] = None
        self._waiters: List[defer.Deferred] = []

    async def _connect(self) -> RedisProtocol:
        endpoint: Any = HostnameEndpoint(self.reactor, self.host, self.port,
                                         timeout=max(1, int(self.timeout + 0.999)))
        if self.tls is not None:
            endpoint = wrapClientTLS(self.tls, endpoint)
        factory = protocol.Factory.forProtocol(RedisProtocol)
        try:
            proto = await self._bounded(endpoint.connect(factory))
        except RedisUnavailable:
            raise
        except Exception as e:
            raise RedisUnavailable("cannot connect to %s:%d: %s" % (self.host, self.port, e))
        try:
            if self.password:
                if self.username:
                    await self._bounded(proto.command("AUTH", self.username, self.password), proto)
                else:
                    await self._bounded(proto.command("AUTH", self.password), proto)
            if self.database:
                await self._bounded(proto.command("SELECT", self.database), proto)
        except BaseException:
            proto.transport.abortConnection()
            raise
        return proto

    def _bounded(self, d: defer.Deferred, proto: Optional[RedisProtocol] = None) -> defer.Deferred:
        """``d``, failing with :class:`RedisUnavailable` after ``timeout`` (dropping ``proto``)."""
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()
            d.cancel()

        call = self.reactor.callLater(self.timeout, expire)

        def done(result: Any) -> Any:
            if call.active():
                call.cancel()
            if timed_out:
                raise RedisUnavailable("no answer from %s:%d within %.0f ms"
                                       % (self.host, self.port, self.timeout * 1000))
            return result

        return d.addBoth(done)

    async def _connection(self) -> RedisProtocol:
        proto = self._proto
        if proto is not None and proto.connected_:
            return proto
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:  # one connection attempt for every waiter
            defer.Deferred.fromCoroutine(self._connect()).addBoth(self._connected)
        return await waiter

    def _connected(self, result: Any) -> None:
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            for waiter in waiters:
                waiter.errback(result)
            return
        self._proto = result
        for waiter in waiters:
            waiter.callback(result)

    async def execute(self, *args: Any) -> Any:
        """Runs one command (connecting first if needed); fires with the reply."""
        proto = await self._connection()
        return await self._bounded(proto.command(*args), proto)

    def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.loseConnection()
