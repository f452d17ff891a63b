"""Tests for the upstream HTTP/1.1 client pool.

Most tests use real listeners on 127.0.0.1 (OS-chosen ports): either a
twisted.web `Site` or a raw `Protocol` server scripted byte by byte.  The
connect and idle timeouts are also pinned on a `MemoryReactorClock`.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import tempfile
from typing import Any, Callable, List, Optional, Tuple

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, ssl, task
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import resource, server
from zope.interface import implementer

from kongtx.proxy.client import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
)

# ------------------------------------------------------------------ helpers


class Sink:
    """An IResponseSink that records what it receives."""

    def __init__(self, on_start: Optional[Callable[["Sink"], None]] = None) -> None:
        self.status: Optional[int] = None
        self.reason = b""
        self.headers: List[Tuple[bytes, bytes]] = []
        self.producer: Any = None
        self.chunks: List[bytes] = []
        self.received = 0
        self.finished = False
        self._on_start = on_start
        self.on_data: Optional[Callable[["Sink", bytes], None]] = None

    def response_started(self, status, reason, headers, producer) -> None:
        assert self.status is None
        self.status, self.reason, self.headers, self.producer = status, reason, headers, producer
        if self._on_start is not None:
            self._on_start(self)

    def response_data(self, data: bytes) -> None:
        assert not self.finished
        self.chunks.append(data)
        self.received += len(data)
        if self.on_data is not None:
            self.on_data(self, data)

    def response_finished(self) -> None:
        assert not self.finished
        self.finished = True

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def get(pool: UpstreamPool, port: int, sink: Optional[Sink] = None, *, method: bytes = b"GET",
        target: bytes = b"/", headers: Optional[List[Tuple[bytes, bytes]]] = None,
        body: Any = None, body_length: int = 0, host: str = "127.0.0.1", scheme: str = "http",
        read_timeout: float = 5.0, write_timeout: float = 5.0, connect_timeout: float = 5.0,
        **kw: Any) -> "defer.Deferred[None]":
    return pool.request(
        scheme=scheme, host=host, port=port, method=method, target=target,
        headers=headers if headers is not None else [(b"Host", b"upstream")],
        body=body, body_length=body_length, sink=sink if sink is not None else Sink(),
        connect_timeout=connect_timeout, write_timeout=write_timeout, read_timeout=read_timeout,
        **kw,
    )


async def failure_of(d: "defer.Deferred[Any]") -> BaseException:
    try:
        await d
    except BaseException as e:  # noqa: B902 - we want whatever it failed with
        return e
    raise AssertionError("expected the request to fail")


def sleep(seconds: float) -> "defer.Deferred[None]":
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: None)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("condition not reached")
        await sleep(0.01)
        waited += 0.01


class RawConnection(protocol.Protocol):
    """Server side of one connection: splits requests, hands them to the script."""

    def __init__(self, server: "RawServer") -> None:
        self.server = server
        self.buffer = b""
        self.requests: List[bytes] = []
        self.lost = defer.Deferred()
        self.body_received = 0

    def connectionMade(self) -> None:
        self.server.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.server.count_only:
            self.body_received += len(data)
            self.server.on_bytes(self)
            return
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            request = head + b"\r\n\r\n" + rest[:length]
            self.requests.append(request)
            self.server.requests.append(request)
            self.server.script(self, request)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class RawServer(protocol.Factory):
    """A listener whose responses are written byte by byte by `script`."""

    def __init__(self, script: Callable[[RawConnection, bytes], None]) -> None:
        self.script = script
        self.connections: List[RawConnection] = []
        self.requests: List[bytes] = []
        self.count_only = False
        self.on_bytes: Callable[[RawConnection], None] = lambda conn: None
        from twisted.internet import reactor

        self.listening = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def buildProtocol(self, addr: Any) -> RawConnection:
        return RawConnection(self)

    async def stop(self) -> None:
        await self.listening.stopListening()
        for conn in self.connections:
            if conn.transport.connected:
                conn.transport.abortConnection()
        await defer.gatherResults([c.lost for c in self.connections])


def reply(raw: bytes, close: bool = False) -> Callable[[RawConnection, bytes], None]:
    def script(conn: RawConnection, request: bytes) -> None:
        conn.transport.write(raw)
        if close:
            conn.transport.loseConnection()

    return script


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def pool():
    from twisted.internet import reactor

    p = UpstreamPool(reactor)
    yield p
    pytest_twisted.blockon(p.close())


# ------------------------------------------------------------ basic framing


@pytest_twisted.ensureDeferred
async def test_content_length_response(pool):
    """A Content-Length response is delivered with its status, headers and body, and the request fires None."""
    server = RawServer(reply(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhello"))
    sink = Sink()
    result = await get(pool, server.port, sink)
    assert result is None
    assert (sink.status, sink.reason) == (201, b"Created")
    assert sink.headers == [(b"Content-Length", b"5"), (b"X-Up", b"1")]
    assert sink.body == b"hello" and sink.finished
    assert IPushProducer.providedBy(sink.producer)
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_request_head_is_sent_as_given_with_content_length_added(pool):
    """The request line and headers go out verbatim; Content-Length is added for a body the caller did not size."""
    server = RawServer(reply(OK))
    await get(pool, server.port, method=b"POST", target=b"/a?b=c",
              headers=[(b"Host", b"svc"), (b"X-A", b"1")], body=io.BytesIO(b"data"), body_length=4)
    await get(pool, server.port, method=b"PUT", target=b"/",
              headers=[(b"Host", b"svc"), (b"content-length", b"4")], body=io.BytesIO(b"more"), body_length=4)
    await get(pool, server.port, headers=[(b"Host", b"svc")])
    assert server.requests == [
        b"POST /a?b=c HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\nContent-Length: 4\r\n\r\ndata",
        b"PUT / HTTP/1.1\r\nHost: svc\r\ncontent-length: 4\r\n\r\nmore",
        b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n",
    ]
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_crlf_in_request_headers_is_refused(pool):
    """A header value with CR/LF (request smuggling) is never written upstream."""
    d = get(pool, 9, headers=[(b"Host", b"x\r\nEvil: 1")])
    assert isinstance(await failure_of(d), ValueError)


@pytest_twisted.ensureDeferred
async def test_chunked_response_split_across_writes(pool):
    """A chunked body written in odd pieces is dechunked; extensions and trailers are dropped."""
    from twisted.internet import reactor

    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5", b";ext=1\r\nhel",
              b"lo\r", b"\n3\r\n, w\r\n4\r\norld\r\n0\r\nX-T: 1\r", b"\n\r\n"]

    def script(conn, request):
        for i, piece in enumerate(pieces):
            reactor.callLater(0.01 * i, conn.transport.write, piece)

    server = RawServer(script)
    sink = Sink()
    await get(pool, server.port, sink)
    assert sink.body == b"hello, world" and sink.finished
    # the connection was kept for reuse
    await get(pool, server.port)
    assert len(server.connections) == 1
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_close_delimited_response(pool):
    """A body without length or chunking is read until the server closes; the connection is not reused."""
    server = RawServer(reply(b"HTTP/1.1 200 OK\r\n\r\nall of it", close=True))
    sink = Sink()
    await get(pool, server.port, sink)
    assert sink.body == b"all of it" and sink.finished
    await get(pool, server.port)
    assert len(server.connections) == 2
    await server.stop()


@pytest.mark.parametrize(
    "method,raw",
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n"),
    ],
    ids=["HEAD", "204", "304"],
)
@pytest_twisted.ensureDeferred
async def test_responses_without_body(pool, method, raw):
    """HEAD, 204 and 304 responses end after the head (Content-Length notwithstanding) and keep the connection."""
    server = RawServer(reply(raw))
    sink = Sink()
    await get(pool, server.port, sink, method=method)
    assert sink.finished and sink.chunks == []
    await get(pool, server.port, method=method)
    assert len(server.connections) == 1
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_100_continue_is_skipped(pool):
    """Interim 100 Continue is not shown to the sink; the final response is."""
    server = RawServer(reply(b"HTTP/1.1 100 Continue\r\n\r\n" + OK))
    sink = Sink()
    await get(pool, server.port, sink, method=b"POST",
              headers=[(b"Host", b"x"), (b"Expect", b"100-continue")], body=io.BytesIO(b"abc"), body_length=3)
    assert sink.status == 200 and sink.body == b"ok"
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_twisted_web_upstream(pool):
    """Against twisted.web (chunked when no length is set) the response arrives intact."""

    class Streaming(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            request.write(b"part1-")
            request.write(b"part2")
            request.finish()
            return server.NOT_DONE_YET

    from twisted.internet import reactor

    listening = reactor.listenTCP(0, server.Site(Streaming()), interface="127.0.0.1")
    try:
        for _ in range(3):
            sink = Sink()
            await get(pool, listening.getHost().port, sink)
            assert sink.status == 200 and sink.body == b"part1-part2"
        assert sum(len(c) for c in pool._idle.values()) == 1
    finally:
        await pool.close()
        await listening.stopListening()


# ----------------------------------------------------------- protocol errors

PROTOCOL_ERRORS = [
    ("two different Content-Lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", False),
    ("Content-Length with Transfer-Encoding", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", False),
    ("Content-Length +5", b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", False),
    ("Content-Length 0x5", b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello", False),
    ("Content-Length 5_0", b"HTTP/1.1 200 OK\r\nContent-Length: 5_0\r\n\r\nhello", False),
    ("status line garbage", b"SSH-2.0-OpenSSH\r\n\r\n", False),
    ("too many headers", b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 201 + b"\r\n", False),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: y\r\n z\r\nContent-Length: 0\r\n\r\n", False),
    ("101 Switching Protocols", b"HTTP/1.1 101 Switching Protocols\r\n\r\n", False),
    ("bad chunk size Z", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\n", True),
    ("body longer than declared", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n", True),
]


@pytest.mark.parametrize("raw,started", [c[1:] for c in PROTOCOL_ERRORS], ids=[c[0] for c in PROTOCOL_ERRORS])
@pytest_twisted.ensureDeferred
async def test_protocol_errors(pool, raw, started):
    """Invalid responses fail with UpstreamProtocolError (Kong's 502), say whether the
    response had started, and the connection is closed, not pooled."""
    server = RawServer(reply(raw))
    sink = Sink()
    err = await failure_of(get(pool, server.port, sink))
    assert isinstance(err, UpstreamProtocolError)
    assert err.response_started is started
    assert (sink.status is not None) is started and not sink.finished
    await server.connections[0].lost
    assert pool._idle.get(("http", "127.0.0.1", server.port, False, None), []) == []
    await server.stop()


# -------------------------------------------------------------- keep-alive


@pytest_twisted.ensureDeferred
async def test_keepalive_reuses_one_connection(pool):
    """Sequential requests to the same upstream share one connection."""
    server = RawServer(reply(OK))
    for _ in range(5):
        await get(pool, server.port)
    assert len(server.connections) == 1
    assert len(server.connections[0].requests) == 5
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_pool_is_keyed_by_scheme_host_port_verify_and_sni(pool):
    """A different pool key (here the host spelling) never shares a connection."""
    server = RawServer(reply(OK))
    await get(pool, server.port)
    await get(pool, server.port, host="localhost")
    await get(pool, server.port, host="localhost")
    assert len(server.connections) == 2
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_connection_close_is_not_reused(pool):
    """A response with Connection: close is not pooled."""
    server = RawServer(reply(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"))
    await get(pool, server.port)
    await get(pool, server.port)
    assert len(server.connections) == 2
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_http10_reuse_needs_keep_alive(pool):
    """HTTP/1.0 responses are pooled only with Connection: keep-alive."""
    plain = RawServer(reply(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    await get(pool, plain.port)
    await get(pool, plain.port)
    assert len(plain.connections) == 2
    keep = RawServer(reply(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"))
    await get(pool, keep.port)
    await get(pool, keep.port)
    assert len(keep.connections) == 1
    await plain.stop()
    await keep.stop()


@pytest_twisted.ensureDeferred
async def test_max_requests_is_honoured():
    """A connection serves at most max_requests requests, then is closed."""
    from twisted.internet import reactor

    pool = UpstreamPool(reactor, max_requests=2)
    server = RawServer(reply(OK))
    for _ in range(5):
        await get(pool, server.port)
    assert [len(c.requests) for c in server.connections] == [2, 2, 1]
    await server.connections[0].lost
    await pool.close()
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_pool_size_limits_idle_connections():
    """At most pool_size idle connections are kept per key; extra ones are closed."""
    from twisted.internet import reactor

    pool = UpstreamPool(reactor, pool_size=2)
    server = RawServer(reply(OK))
    await defer.gatherResults([get(pool, server.port) for _ in range(4)])
    assert len(server.connections) == 4
    key = ("http", "127.0.0.1", server.port, False, None)
    assert len(pool._idle[key]) == 2
    await eventually(lambda: sum(1 for c in server.connections if c.lost.called) == 2)
    await pool.close()
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_idle_timeout_closes_connections():
    """An idle pooled connection is closed after idle_timeout seconds (real, short timeout)."""
    from twisted.internet import reactor

    pool = UpstreamPool(reactor, idle_timeout=0.1)
    server = RawServer(reply(OK))
    await get(pool, server.port)
    await server.connections[0].lost
    assert pool._idle[("http", "127.0.0.1", server.port, False, None)] == []
    await get(pool, server.port)
    assert len(server.connections) == 2
    await pool.close()
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_server_closing_idle_connection_removes_it(pool):
    """When the server closes an idle connection it leaves the pool; the next request opens a new one."""
    server = RawServer(reply(OK))
    await get(pool, server.port)
    server.connections[0].transport.loseConnection()
    await server.connections[0].lost
    key = ("http", "127.0.0.1", server.port, False, None)
    await eventually(lambda: pool._idle[key] == [])
    sink = Sink()
    await get(pool, server.port, sink)
    assert sink.body == b"ok" and len(server.connections) == 2
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_keepalive_race_is_retried_once(pool):
    """A reused connection closed by the server before any response byte is retried
    once on a fresh connection, body included, and the caller sees only success."""

    def script(conn, request):
        if len(conn.requests) == 1:
            conn.transport.write(OK)
        else:  # the server "timed out" the keep-alive connection just as we reused it
            conn.transport.abortConnection()

    server = RawServer(script)
    await get(pool, server.port)
    sink = Sink()
    await get(pool, server.port, sink, method=b"POST", body=io.BytesIO(b"payload"), body_length=7)
    assert sink.body == b"ok"
    assert len(server.connections) == 2
    assert server.connections[1].requests[0].endswith(b"\r\n\r\npayload")
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_keepalive_race_retry_happens_only_once(pool):
    """If the retry's fresh connection is closed too, the request fails with UpstreamClosed."""

    def script(conn, request):
        if conn is server.connections[0] and len(conn.requests) == 1:
            conn.transport.write(OK)
        else:
            conn.transport.abortConnection()

    server = RawServer(script)
    await get(pool, server.port)
    err = await failure_of(get(pool, server.port))
    assert isinstance(err, UpstreamClosed) and err.response_started is False
    assert len(server.connections) == 2
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_stop_producing_aborts_the_upstream(pool):
    """The sink's producer.stopProducing() aborts the upstream connection and fails the request."""
    server = RawServer(lambda conn, request: conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npar"))
    sink = Sink()
    d = get(pool, server.port, sink)
    await eventually(lambda: sink.received == 3)
    sink.producer.stopProducing()
    err = await failure_of(d)
    assert isinstance(err, UpstreamClosed) and err.response_started is True
    await server.connections[0].lost
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_fresh_connection_closed_is_not_retried(pool):
    """A new connection closed before the response fails with UpstreamClosed, without retry."""
    server = RawServer(lambda conn, request: conn.transport.loseConnection())
    err = await failure_of(get(pool, server.port))
    assert isinstance(err, UpstreamClosed) and err.response_started is False
    assert len(server.connections) == 1
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_reused_connection_closed_mid_response_is_not_retried(pool):
    """Once response bytes arrived, a close is UpstreamClosed (no retry), with response_started."""

    def script(conn, request):
        if len(conn.requests) == 1:
            conn.transport.write(OK)
        else:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal")
            conn.transport.loseConnection()

    server = RawServer(script)
    await get(pool, server.port)
    err = await failure_of(get(pool, server.port))
    assert isinstance(err, UpstreamClosed) and err.response_started is True
    assert len(server.connections) == 1
    await server.stop()


# ----------------------------------------------------------- errors, timeouts


@pytest_twisted.ensureDeferred
async def test_connect_refused(pool):
    """A refused connection fails with UpstreamConnectError (nothing was sent)."""
    from twisted.internet import reactor

    listening = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    port = listening.getHost().port
    await listening.stopListening()
    err = await failure_of(get(pool, port))
    assert isinstance(err, UpstreamConnectError) and err.response_started is False


@pytest_twisted.ensureDeferred
async def test_dns_failure_is_a_connect_error(pool):
    """A host name that does not resolve fails with UpstreamConnectError."""
    err = await failure_of(get(pool, 80, host="no-such-host.invalid"))
    assert isinstance(err, UpstreamConnectError)


@pytest_twisted.ensureDeferred
async def test_read_timeout(pool):
    """No response within read_timeout fails with UpstreamTimeout phase "read"; the connection is aborted."""
    server = RawServer(lambda conn, request: None)
    err = await failure_of(get(pool, server.port, read_timeout=0.2))
    assert isinstance(err, UpstreamTimeout) and err.phase == "read" and err.response_started is False
    await server.connections[0].lost
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_read_timeout_is_between_reads(pool):
    """read_timeout bounds the gap between reads, not the whole response."""
    from twisted.internet import reactor

    def script(conn, request):
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for i in range(6):
            reactor.callLater(0.1 * (i + 1), conn.transport.write, b"x")

    server = RawServer(script)
    sink = Sink()
    await get(pool, server.port, sink, read_timeout=0.3)
    assert sink.body == b"xxxxxx"

    def stalls(conn, request):
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nxx")

    server.script = stalls
    err = await failure_of(get(pool, server.port, read_timeout=0.2))
    assert isinstance(err, UpstreamTimeout) and err.phase == "read" and err.response_started is True
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_write_timeout(pool):
    """A server that stops reading the request body triggers UpstreamTimeout phase "write"."""
    server = RawServer(lambda conn, request: None)
    server.count_only = True
    server.on_bytes = lambda conn: conn.transport.pauseProducing()
    body = io.BytesIO(b"x" * (64 * 1024 * 1024))
    err = await failure_of(get(pool, server.port, method=b"POST", body=body,
                               body_length=64 * 1024 * 1024, write_timeout=0.3))
    assert isinstance(err, UpstreamTimeout) and err.phase == "write"
    await server.stop()


def _memory_pool(**kw: Any) -> Tuple[MemoryReactorClock, UpstreamPool]:
    clock = MemoryReactorClock()
    return clock, UpstreamPool(clock, **kw)


def test_connect_timeout_on_a_clock():
    """If the connection is not set up within connect_timeout, the request fails with
    UpstreamTimeout phase "connect" and the attempt is cancelled."""
    clock, pool = _memory_pool()
    d = get(pool, 8000, connect_timeout=2.0)
    assert len(clock.tcpClients) == 1
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.2)
    err = []
    d.addErrback(err.append)
    assert err[0].check(UpstreamTimeout) and err[0].value.phase == "connect"
    assert clock.getDelayedCalls() == []


def _connect_in_memory(clock: MemoryReactorClock, index: int = -1) -> Tuple[Any, StringTransport]:
    host, port, factory, _, _ = clock.tcpClients[index]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_idle_timeout_on_a_clock():
    """A pooled connection is closed idle_timeout seconds after its last response, not before."""
    clock, pool = _memory_pool(idle_timeout=60.0)
    sink = Sink()
    d = get(pool, 8000, sink)
    proto, transport = _connect_in_memory(clock)
    assert transport.value() == b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n"
    proto.dataReceived(OK)
    assert d.called and sink.finished
    clock.advance(59)
    assert not transport.disconnecting
    # reuse within the idle time restarts it
    d2 = get(pool, 8000)
    proto.dataReceived(OK)
    assert d2.called and len(clock.tcpClients) == 1
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
    assert pool._idle[("http", "127.0.0.1", 8000, False, None)] == []


def test_read_timeout_timer_is_not_recreated_per_read():
    """Reads on the hot path move a deadline; they do not schedule a new timer each time."""
    clock, pool = _memory_pool()
    d = get(pool, 8000, read_timeout=10.0)
    proto, transport = _connect_in_memory(clock)
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    for _ in range(50):
        clock.advance(1)
        proto.dataReceived(b"x")
    assert not d.called
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    err = []
    d.addErrback(err.append)
    assert err[0].check(UpstreamTimeout) and err[0].value.phase == "read"
    assert err[0].value.response_started is True
    assert transport.disconnected  # aborted, not pooled


def test_read_timeout_is_suspended_while_the_client_pauses_us():
    """While the sink has paused reading (slow client), the read timeout does not fire;
    it runs again, in full, from the resume."""
    clock, pool = _memory_pool()
    sink = Sink()
    d = get(pool, 8000, sink, read_timeout=10.0)
    proto, transport = _connect_in_memory(clock)
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nx")
    sink.producer.pauseProducing()
    assert transport.producerState == "paused"
    clock.advance(100)
    assert not d.called
    sink.producer.resumeProducing()
    assert transport.producerState == "producing"
    clock.advance(9)
    assert not d.called
    clock.advance(2)
    err = []
    d.addErrback(err.append)
    assert err[0].check(UpstreamTimeout) and err[0].value.phase == "read"


@pytest_twisted.ensureDeferred
async def test_cancel_aborts_the_connection(pool):
    """Cancelling the request (client went away) aborts the upstream connection; it is not pooled."""
    server = RawServer(lambda conn, request: conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npar"))
    sink = Sink()
    d = get(pool, server.port, sink)
    await eventually(lambda: sink.status == 200)
    d.cancel()
    assert isinstance(await failure_of(d), CancelledError)
    await server.connections[0].lost
    assert pool._idle.get(("http", "127.0.0.1", server.port, False, None), []) == []
    assert not sink.finished
    await server.stop()


def test_cancel_while_connecting_on_a_clock():
    """Cancelling during connection setup stops the attempt and leaves no timer behind."""
    clock, pool = _memory_pool()
    d = get(pool, 8000)
    d.cancel()
    err = []
    d.addErrback(err.append)
    assert err[0].check(CancelledError)
    assert clock.getDelayedCalls() == []


# --------------------------------------------------------------- streaming


@implementer(IPushProducer)
class BigBodyProducer:
    """Server side: writes `total` bytes as a streaming producer, recording pauses."""

    def __init__(self, conn: RawConnection, total: int) -> None:
        self.conn, self.left, self.pauses = conn, total, 0
        self.paused = False

    def start(self) -> None:
        t = self.conn.transport
        t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.left)
        t.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        block = b"y" * 65536
        while not self.paused and self.left > 0:
            n = min(self.left, len(block))
            self.left -= n
            self.conn.transport.write(block[:n])
        if self.left == 0:
            self.conn.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.left = 0


@pytest_twisted.ensureDeferred
async def test_large_response_is_streamed_with_flow_control(pool):
    """A 20 MB response arrives in many pieces; pausing the producer stops reading
    (the server is paused in turn), resuming completes it."""
    total = 20 * 1024 * 1024
    producers: List[BigBodyProducer] = []

    def script(conn, request):
        producers.append(BigBodyProducer(conn, total))
        producers[-1].start()

    server = RawServer(script)
    sink = Sink()

    def pause_once(s: Sink, data: bytes) -> None:
        if s.received > 1024 * 1024 and s.on_data is not None:
            s.on_data = None
            s.producer.pauseProducing()

    sink.on_data = pause_once
    d = get(pool, server.port, sink)
    await eventually(lambda: sink.on_data is None)
    held = sink.received
    await eventually(lambda: producers[0].paused)
    await sleep(0.1)
    assert sink.received == held  # nothing read while paused
    sink.producer.resumeProducing()
    await d
    assert sink.received == total and sink.finished
    assert len(sink.chunks) > 20
    assert max(len(c) for c in sink.chunks) <= 1024 * 1024
    assert producers[0].pauses >= 1
    # the connection went back to the pool, reading resumed
    await get(pool, server.port, Sink())
    await server.stop()


class TrackingFile(io.RawIOBase):
    """A file-like request body that records how far it has been read."""

    def __init__(self, total: int) -> None:
        self.total, self.pos = total, 0

    def read(self, n: int = -1) -> bytes:
        n = min(n, self.total - self.pos)
        self.pos += n
        return b"z" * n

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos
        return pos


@pytest_twisted.ensureDeferred
async def test_large_request_body_is_streamed_with_flow_control(pool):
    """A 20 MB request body is read from its file in chunks as the upstream accepts it:
    while the server stops reading, the client stops reading the file."""
    total = 20 * 1024 * 1024
    server = RawServer(lambda conn, request: None)
    server.count_only = True
    paused = []

    def on_bytes(conn):
        if not paused and conn.body_received > 2 * 1024 * 1024:
            paused.append(True)
            conn.transport.pauseProducing()
        if conn.body_received >= total + 60:
            conn.transport.write(OK)

    server.on_bytes = on_bytes
    body = TrackingFile(total)
    d = get(pool, server.port, method=b"PUT", body=body, body_length=total)
    await eventually(lambda: bool(paused))
    # Socket buffers still absorb some bytes after the server stops reading; wait
    # until the reads settle, which they must do well before the end of the body.
    position = -1
    for _ in range(25):
        if body.pos == position:
            break
        position = body.pos
        await sleep(0.2)
    assert body.pos == position < total  # flow control held the file reads back
    server.connections[0].transport.resumeProducing()
    await d
    assert body.pos == total
    assert server.connections[0].body_received > total
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_request_body_from_a_temp_file(pool):
    """A spooled temp file body is sent from its current position, all of it."""
    server = RawServer(reply(OK))
    f = tempfile.TemporaryFile()
    f.write(b"skip" + b"b" * 200000)
    f.seek(4)
    await get(pool, server.port, method=b"POST", body=f, body_length=200000)
    assert server.requests[0].endswith(b"\r\n\r\n" + b"b" * 200000)
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_short_body_fails(pool):
    """A body file shorter than body_length fails the request instead of hanging."""
    server = RawServer(reply(OK))
    err = await failure_of(get(pool, server.port, method=b"POST", body=io.BytesIO(b"abc"), body_length=10))
    assert isinstance(err, ValueError)
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_early_response_stops_body_and_is_not_reused(pool):
    """A server answering before reading the whole body (e.g. 413) completes the request; the connection is not reused."""
    server = RawServer(lambda conn, request: None)
    server.count_only = True

    def on_bytes(conn):
        if conn.body_received and not getattr(conn, "answered", False):
            conn.answered = True
            conn.transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
            conn.transport.pauseProducing()

    server.on_bytes = on_bytes
    sink = Sink()
    total = 50 * 1024 * 1024
    await get(pool, server.port, sink, method=b"POST", body=TrackingFile(total), body_length=total)
    assert sink.status == 413 and sink.finished
    server.connections[0].transport.resumeProducing()  # so the server notices the abort
    await server.connections[0].lost
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_sink_error_is_reported_and_connection_aborted(pool):
    """If the sink raises, the request fails with that error and the connection is dropped."""
    server = RawServer(reply(OK))

    class Boom(Sink):
        def response_data(self, data):
            raise RuntimeError("sink broke")

    err = await failure_of(get(pool, server.port, Boom()))
    assert isinstance(err, RuntimeError)
    await server.connections[0].lost
    await server.stop()


# ---------------------------------------------------------------------- TLS


def _self_signed() -> Tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def tls_material():
    return _self_signed()


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"secure hello"


@pytest.fixture
def tls_server(tls_material):
    from twisted.internet import reactor

    key_pem, cert_pem = tls_material
    options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    seen = []
    options.getContext().set_tlsext_servername_callback(lambda conn: seen.append(conn.get_servername()))
    listening = reactor.listenSSL(0, server.Site(Hello()), options, interface="127.0.0.1")
    listening.sni_seen = seen
    yield listening
    pytest_twisted.blockon(listening.stopListening())


def _trusting_creator(cert_pem: bytes):
    from kongtx.proxy.client import default_tls_creator

    def creator(name: str, verify: bool):
        if verify:
            return ssl.optionsForClientTLS(name, trustRoot=ssl.Certificate.loadPEM(cert_pem))
        return default_tls_creator(name, verify)

    return creator


@pytest_twisted.ensureDeferred
async def test_https_without_verification(pool, tls_server):
    """https with tls_verify off accepts a self-signed certificate, sends SNI and reuses the connection."""
    port = tls_server.getHost().port
    for _ in range(2):
        sink = Sink()
        await get(pool, port, sink, scheme="https", sni="localhost")
        assert sink.status == 200 and sink.body == b"secure hello"
    assert tls_server.sni_seen == [b"localhost"]


@pytest_twisted.ensureDeferred
async def test_https_with_verification(tls_server, tls_material):
    """https with tls_verify on succeeds when the certificate chains to a trusted root and matches the name."""
    from twisted.internet import reactor

    pool = UpstreamPool(reactor, tls_creator=_trusting_creator(tls_material[1]))
    sink = Sink()
    await get(pool, tls_server.getHost().port, sink, scheme="https", host="localhost", tls_verify=True)
    assert sink.body == b"secure hello"
    await pool.close()


@pytest_twisted.ensureDeferred
async def test_https_verification_failure_is_a_connect_error(tls_server, tls_material):
    """A certificate that does not verify (untrusted, or wrong name) fails with UpstreamConnectError."""
    from twisted.internet import reactor

    port = tls_server.getHost().port
    untrusting = UpstreamPool(reactor)  # platform trust: the self-signed cert is unknown
    err = await failure_of(get(untrusting, port, scheme="https", host="localhost", tls_verify=True))
    assert isinstance(err, UpstreamConnectError) and err.response_started is False

    trusting = UpstreamPool(reactor, tls_creator=_trusting_creator(tls_material[1]))
    err = await failure_of(get(trusting, port, scheme="https", tls_verify=True, sni="wrong.example"))
    assert isinstance(err, UpstreamConnectError)
    await untrusting.close()
    await trusting.close()


@pytest_twisted.ensureDeferred
async def test_https_to_a_plain_http_port_is_a_connect_error(pool):
    """A TLS handshake that fails (the server answers in plain HTTP) is an UpstreamConnectError;
    a handshake that never completes is UpstreamTimeout phase "connect"."""
    from twisted.internet import reactor

    class PlainHTTP(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.loseConnection()

    listening = reactor.listenTCP(0, protocol.Factory.forProtocol(PlainHTTP), interface="127.0.0.1")
    err = await failure_of(get(pool, listening.getHost().port, scheme="https", connect_timeout=2.0))
    assert isinstance(err, UpstreamConnectError) and err.response_started is False
    await listening.stopListening()

    silent = RawServer(lambda conn, request: None)
    err = await failure_of(get(pool, silent.port, scheme="https", connect_timeout=0.2))
    assert isinstance(err, UpstreamTimeout) and err.phase == "connect"
    await silent.stop()


@pytest_twisted.ensureDeferred
async def test_ipv6_literal(pool):
    """An IPv6 literal host (bracketed or not) connects directly."""
    from twisted.internet import reactor

    try:
        listening = reactor.listenTCP(0, server.Site(Hello()), interface="::1")
    except Exception:
        pytest.skip("no IPv6 loopback")
    port = listening.getHost().port
    try:
        for host in ("::1", "[::1]"):
            sink = Sink()
            await get(pool, port, sink, host=host)
            assert sink.body == b"secure hello"
    finally:
        await pool.close()
        await listening.stopListening()


# ------------------------------------------------- send(): no Deferred per request


def send(pool: UpstreamPool, port: int, listener: Callable[[Any], None],
         sink: Optional[Sink] = None, **kw: Any) -> Any:
    headers = kw.pop("headers", [(b"Host", b"upstream")])
    return pool.send(
        listener, scheme="http", host="127.0.0.1", port=port, method=b"GET", target=b"/",
        headers=headers, body=None, body_length=0, sink=sink if sink is not None else Sink(),
        connect_timeout=5.0, write_timeout=5.0, read_timeout=5.0, **kw)


@pytest_twisted.ensureDeferred
async def test_send_calls_the_listener_once_after_the_response(pool):
    """``send`` reports success with ``listener(None)``, once, after
    ``response_finished``; the connection is pooled as with ``request``."""
    server = RawServer(reply(OK))
    outcomes: List[Any] = []
    sink = Sink()
    send(pool, server.port, lambda reason: outcomes.append((reason, sink.finished)), sink)
    await eventually(lambda: outcomes)
    assert outcomes == [(None, True)] and sink.body == b"ok"
    send(pool, server.port, outcomes.append)
    await eventually(lambda: len(outcomes) == 2)
    assert len(server.connections) == 1
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_send_reports_failures_to_the_listener(pool):
    """A refused connection is ``listener(failure)`` with UpstreamConnectError; a bad
    request head fails at once, before ``send`` returns."""
    from twisted.internet import reactor

    listening = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    port = listening.getHost().port
    await listening.stopListening()
    outcomes: List[Any] = []
    send(pool, port, outcomes.append)
    await eventually(lambda: outcomes)
    assert outcomes[0].check(UpstreamConnectError)
    send(pool, port, outcomes.append, headers=[(b"Host", b"x\r\nEvil: 1")])
    assert len(outcomes) == 2 and outcomes[1].check(ValueError)


@pytest_twisted.ensureDeferred
async def test_cancelled_send_aborts_and_stays_silent(pool):
    """``cancel()`` on what ``send`` returned aborts the upstream connection (never
    pooled) and the listener is not called."""
    server = RawServer(lambda conn, request: conn.transport.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npar"))
    outcomes: List[Any] = []
    sink = Sink()
    exchange = send(pool, server.port, outcomes.append, sink)
    await eventually(lambda: sink.status == 200)
    exchange.cancel()
    await server.connections[0].lost
    await sleep(0.05)
    assert outcomes == [] and not sink.finished
    assert pool._idle.get(("http", "127.0.0.1", server.port, False, None), []) == []
    await server.stop()
