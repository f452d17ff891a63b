"""The outage relay: forwards byte for byte, and makes its target vanish and come back.

Proven against a tiny echo server and against the real PostgreSQL on 127.0.0.1:5432
(``PGUSER``/``PGDATABASE``/``PGPASSWORD`` when set, else user and database
``postgres``). psycopg2 is blocking, so its calls run in the reactor's thread pool
while the relay runs on the reactor.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError

from tests.integration.relay import Relay


class Echo(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)
        self.transport.write(data)


class EchoFactory(protocol.Factory):
    protocol = Echo

    def __init__(self) -> None:
        self.connections = 0
        self.received = 0


class Collector(protocol.Protocol):
    """Collects what arrives; ``until(n)`` fires once ``n`` bytes are in."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred = defer.Deferred()
        self._want: Optional[int] = None
        self._ready: Optional[defer.Deferred] = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def until(self, n: int) -> defer.Deferred:
        self._want, self._ready = n, defer.Deferred()
        d = self._ready
        self._check()
        return d

    def _check(self) -> None:
        if self._ready is not None and self._want is not None and len(self.data) >= self._want:
            d, self._ready = self._ready, None
            d.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        if self._ready is not None:
            d, self._ready = self._ready, None
            d.errback(reason)
        self.reason = reason
        self.lost.callback(None)


@pytest.fixture
def echo():
    from twisted.internet import reactor

    factory = EchoFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = port.getHost().port
    yield factory
    port.stopListening()


async def connect(relay: Relay) -> Collector:
    from twisted.internet import reactor

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port, timeout=5)
    return await connectProtocol(endpoint, Collector())


@pytest_twisted.ensureDeferred
async def test_bytes_flow_both_ways(echo):
    """Everything the client sends reaches the target and every reply comes back, in
    order, including a payload far larger than the socket buffers."""
    from twisted.internet import reactor

    relay = Relay(reactor, "127.0.0.1", echo.port)
    try:
        client = await connect(relay)
        client.transport.write(b"hello")
        assert await client.until(5) == b"hello"
        payload = bytes(range(256)) * 16384  # 4 MiB
        client.transport.write(payload)
        data = await client.until(5 + len(payload))
        assert data == b"hello" + payload
        assert relay.connections == 1
    finally:
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_cut_aborts_and_refuses_then_restore_on_same_port(echo):
    """cut() drops open connections and refuses new ones; restore() forwards again on
    the same port."""
    from twisted.internet import reactor

    relay = Relay(reactor, "127.0.0.1", echo.port)
    port = relay.port
    try:
        client = await connect(relay)
        client.transport.write(b"ping")
        await client.until(4)
        await relay.cut()
        await client.lost
        with pytest.raises(ConnectionRefusedError):
            await connect(relay)
        relay.restore()
        assert relay.port == port
        again = await connect(relay)
        again.transport.write(b"back")
        assert await again.until(4) == b"back"
        again.transport.loseConnection()
        await again.lost
    finally:
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_cut_reset_accepts_and_closes(echo):
    """In ``reset`` mode a new connection is accepted, then closed before any byte."""
    from twisted.internet import reactor

    relay = Relay(reactor, "127.0.0.1", echo.port)
    try:
        await relay.cut(mode="reset")
        client = await connect(relay)
        await client.lost
        assert client.data == b""
        assert echo.connections == 0
    finally:
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_blackhole_passes_nothing_and_restore_aborts_held(echo):
    """In ``blackhole`` mode connections stay open but nothing gets through; restore()
    aborts them and new connections work."""
    from twisted.internet import reactor

    relay = Relay(reactor, "127.0.0.1", echo.port)
    try:
        client = await connect(relay)
        client.transport.write(b"one")
        await client.until(3)
        await relay.cut(mode="blackhole")
        before = echo.received
        client.transport.write(b"lost")
        held = await connect(relay)
        held.transport.write(b"also lost")
        assert relay.connections == 2
        relay.restore()
        await client.lost
        await held.lost
        assert client.data == b"one"
        assert held.data == b""
        assert echo.received == before
        again = await connect(relay)
        again.transport.write(b"ok")
        assert await again.until(2) == b"ok"
        again.transport.loseConnection()
        await again.lost
    finally:
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_target_down_closes_client(echo):
    """When the target refuses, the client's connection through the relay closes."""
    from twisted.internet import reactor

    probe = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    dead_port = probe.getHost().port
    await probe.stopListening()
    relay = Relay(reactor, "127.0.0.1", dead_port)
    try:
        client = await connect(relay)
        await client.lost
        assert client.data == b""
    finally:
        await relay.stop()


def test_cut_rejects_unknown_mode():
    """Only the documented cut modes are accepted."""
    from twisted.internet import reactor

    relay = Relay(reactor, "127.0.0.1", 9)
    try:
        with pytest.raises(ValueError):
            relay.cut(mode="sometimes")
    finally:
        relay.stop()


# -- against the real PostgreSQL -----------------------------------------------------------


def _pg_connect(port: int) -> Any:
    from kongtx._pg import psycopg2

    return psycopg2.connect(
        host="127.0.0.1",
        port=port,
        user=os.environ.get("PGUSER", "postgres"),
        dbname=os.environ.get("PGDATABASE", "postgres"),
        connect_timeout=5,
    )


def _query(conn: Any, sql: str) -> List[Any]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


@pytest_twisted.ensureDeferred
async def test_postgres_through_relay_cut_and_restore():
    """A psycopg2 connection through the relay queries PostgreSQL; after cut() the
    query fails and new connections are refused; after restore() a new connection
    works."""
    from kongtx._pg import psycopg2
    from twisted.internet import reactor

    relay = Relay(reactor, "127.0.0.1", 5432)
    conn = None
    try:
        conn = await threads.deferToThread(_pg_connect, relay.port)
        assert await threads.deferToThread(_query, conn, "SELECT 41 + 1") == [(42,)]
        await relay.cut()
        with pytest.raises(psycopg2.OperationalError):
            await threads.deferToThread(_query, conn, "SELECT 1")
        assert conn.closed
        with pytest.raises(psycopg2.OperationalError) as refused:
            await threads.deferToThread(_pg_connect, relay.port)
        assert "refused" in str(refused.value).lower()
        relay.restore()
        conn = await threads.deferToThread(_pg_connect, relay.port)
        assert await threads.deferToThread(_query, conn, "SELECT 'back'") == [("back",)]
    finally:
        if conn is not None:
            conn.close()
        await relay.stop()
