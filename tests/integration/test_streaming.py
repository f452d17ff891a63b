"""Request bodies: small ones buffered, large or chunked ones (and any on a route with
request_buffering=false) streamed to the upstream while they arrive."""

from __future__ import annotations

import hashlib
import json

import pytest_twisted
from twisted.internet import defer, protocol

from tests.integration.conftest import start_node
from tests.integration.helpers import split_response


class RawUpstream(protocol.Protocol):
    """Records bytes as they arrive; answers when told to (or at once if ``early``)."""

    def __init__(self, owner: "RawUpstreamFactory") -> None:
        self.owner = owner
        self.data = b""

    def connectionMade(self) -> None:
        self.owner.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        owner = self.owner
        if owner.early is not None and b"\r\n\r\n" in self.data and not owner.answered:
            owner.answered = True
            self.transport.write(owner.early)
        waiting, owner.waiting = owner.waiting, []
        for size, d in waiting:
            if len(self.data) >= size:
                d.callback(self)
            else:
                owner.waiting.append((size, d))


class RawUpstreamFactory(protocol.Factory):
    def __init__(self, early: bytes = None) -> None:
        self.connections = []
        self.waiting = []
        self.early = early
        self.answered = False

    def buildProtocol(self, addr):
        return RawUpstream(self)

    def received_at_least(self, size: int) -> defer.Deferred:
        d = defer.Deferred()
        for conn in self.connections:
            if len(conn.data) >= size:
                d.callback(conn)
                return d
        self.waiting.append((size, d))
        return d


class RawClient(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.done = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.done.callback(self.received)


async def _connect(reactor, port):
    client = RawClient()
    await protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
    return client


async def _node_with_route(reactor, tmp_path, client, url, **route):
    node = await start_node(reactor, str(tmp_path / "prefix"),
                            KONG_NGINX_HTTP_CLIENT_MAX_BODY_SIZE="0")
    r = await client.request("POST", node.admin + "/services",
                             form={"name": "s", "url": url, "retries": "0"})
    assert r.code == 201, r.body
    form = {"paths[]": "/"}
    form.update(route)
    r = await client.request("POST", node.admin + "/services/s/routes", form=form)
    assert r.code == 201, r.body
    return node


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _raw_setup(reactor, tmp_path, client, early=None, **route):
    """A raw upstream we control byte by byte, and a node routing / to it."""
    factory = RawUpstreamFactory(early)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    node = await _node_with_route(reactor, tmp_path, client,
                                  "http://127.0.0.1:%d" % listening.getHost().port, **route)
    return factory, listening, node


async def _teardown(listening, node):
    await node.service.stopService()
    await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_large_body_reaches_upstream_before_client_finished(tmp_path, client):
    """A 200 kB body is forwarded while it arrives: the upstream holds the first half
    before the client has sent the second."""
    from twisted.internet import reactor

    factory, listening, node = await _raw_setup(reactor, tmp_path, client)
    try:
        first, second = b"a" * 100000, b"b" * 100000
        raw = await _connect(reactor, _port(node.proxy))
        raw.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n"
                            b"Connection: close\r\n\r\n" + first)
        upstream_conn = await factory.received_at_least(100000)
        assert b"content-length: 200000" in upstream_conn.data.lower()
        assert len(upstream_conn.data.split(b"\r\n\r\n", 1)[1]) <= 100000
        raw.transport.write(second)
        upstream_conn = await factory.received_at_least(
            len(upstream_conn.data.split(b"\r\n\r\n", 1)[0]) + 4 + 200000)
        body = upstream_conn.data.split(b"\r\n\r\n", 1)[1]
        assert body == first + second
        upstream_conn.transport.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        received = await raw.done
        status, headers, payload = split_response(received)
        assert status.startswith("HTTP/1.1 201")
        assert payload == b"ok"
    finally:
        await _teardown(listening, node)


@pytest_twisted.ensureDeferred
async def test_chunked_upload_is_streamed_chunked(tmp_path, client, upstream):
    """A chunked request body of unknown length arrives whole, re-chunked upstream."""
    from twisted.internet import reactor

    node = await _node_with_route(reactor, tmp_path, client, upstream.url)
    try:
        pieces = [b"x" * 70000, b"y" * 5, b"z" * 130000]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        raw = await _connect(reactor, _port(node.proxy))
        raw.transport.write(b"POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                            b"Connection: close\r\n\r\n" + body)
        status, headers, payload = split_response(await raw.done)
        assert status.startswith("HTTP/1.1 200")
        if headers.get("transfer-encoding") == "chunked":
            payload = payload.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
        seen = json.loads(payload)
        whole = b"".join(pieces)
        assert seen["length"] == len(whole)
        assert seen["sha256"] == hashlib.sha256(whole).hexdigest()
        assert seen["headers"]["transfer-encoding"] == ["chunked"]
    finally:
        await node.service.stopService()


@pytest_twisted.ensureDeferred
async def test_twenty_megabyte_upload(tmp_path, client, upstream):
    """A 20 MB upload arrives whole and intact."""
    from twisted.internet import reactor

    node = await _node_with_route(reactor, tmp_path, client, upstream.url)
    try:
        data = bytes(range(256)) * (20 * 4096)
        r = await client.request("PUT", node.proxy + "/count", body=data)
        assert r.code == 200, r.body[:200]
        seen = r.json()
        assert seen["length"] == len(data)
        assert seen["sha256"] == hashlib.sha256(data).hexdigest()
    finally:
        await node.service.stopService()


@pytest_twisted.ensureDeferred
async def test_upstream_answering_early_ends_the_exchange(tmp_path, client):
    """An upstream that answers before reading the body (e.g. 401) is relayed and the
    client connection is closed instead of hanging on the unread body."""
    from twisted.internet import reactor

    factory, listening, node = await _raw_setup(
        reactor, tmp_path, client,
        early=b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope")
    try:
        raw = await _connect(reactor, _port(node.proxy))
        raw.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n"
                            + b"q" * 300000)
        timer = reactor.callLater(10, raw.transport.loseConnection)
        received = await raw.done
        if timer.active():
            timer.cancel()
        status, headers, payload = split_response(received)
        assert status.startswith("HTTP/1.1 401")
        assert payload == b"nope"
    finally:
        await _teardown(listening, node)


@pytest_twisted.ensureDeferred
async def test_unbuffered_route_streams_small_bodies(tmp_path, client):
    """On a route with request_buffering=false even a small body is streamed: the
    upstream sees its first bytes before the client sent the rest."""
    from twisted.internet import reactor

    factory, listening, node = await _raw_setup(reactor, tmp_path, client,
                                                request_buffering="false")
    try:
        raw = await _connect(reactor, _port(node.proxy))
        raw.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                            b"Connection: close\r\n\r\nhello")
        conn = await factory.received_at_least(1)
        while not conn.data.endswith(b"hello"):
            await factory.received_at_least(len(conn.data) + 1)
        raw.transport.write(b"world")
        while not conn.data.endswith(b"helloworld"):
            await factory.received_at_least(len(conn.data) + 1)
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        status, _, _ = split_response(await raw.done)
        assert status.startswith("HTTP/1.1 200")
    finally:
        await _teardown(listening, node)
