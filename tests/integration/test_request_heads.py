"""Request heads on a real listener: how the proxy reads them and what it answers a
bad one (``ProxyChannel`` and ``kongtx.proxy.request_head``)."""

from __future__ import annotations

import json
import time
from typing import Any, List

import pytest
import pytest_twisted

from tests.integration.helpers import raw_exchange, split_response


def _port(node: Any) -> int:
    return int(node.proxy.rsplit(":", 1)[1])


async def _echo_route(client: Any, node: Any, upstream: Any) -> None:
    r = await client.request("POST", node.admin + "/services",
                             form={"name": "echo", "url": upstream.url})
    assert r.code == 201, r.body
    r = await client.request("POST", node.admin + "/services/echo/routes",
                             form={"paths[]": "/echo"})
    assert r.code == 201, r.body


def _responses(raw: bytes) -> List[Any]:
    """(status line, headers, body) of each response in ``raw`` (Content-Length framed)."""
    found = []
    while raw:
        status, headers, rest = split_response(raw)
        length = int(headers.get("content-length", "0"))
        found.append((status, headers, rest[:length]))
        raw = rest[length:]
    return found


BAD_HEADS = [
    ("garbage", b"\x00\x01garbage\r\n\r\n"),
    ("HTTP/2 request line", b"GET /echo HTTP/2.0\r\nHost: a\r\n\r\n"),
    ("obs-fold", b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n"),
    ("bare CR in a value", b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n"),
    ("bare LF hiding a header",
     b"POST /echo HTTP/1.1\r\nHost: a\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("Content-Length and Transfer-Encoding",
     b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two Content-Length", b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                           b"Content-Length: 0\r\n\r\nabc"),
    ("space before the colon", b"GET /echo HTTP/1.1\r\nHost : a\r\n\r\n"),
]


@pytest.mark.parametrize("payload", [case[1] for case in BAD_HEADS],
                         ids=[case[0] for case in BAD_HEADS])
@pytest_twisted.ensureDeferred
async def test_bad_head_gets_kongs_400_and_the_connection_closes(node, client, upstream,
                                                                   payload):
    """Kong's answer to a head nginx refuses: ``400``, ``Bad request`` in the
    ``error_default_type`` (text/plain), the connection closed; nothing reaches the
    upstream, and the node goes on serving."""
    from twisted.internet import reactor

    await _echo_route(client, node, upstream)
    raw = await raw_exchange(reactor, "127.0.0.1", _port(node), payload)
    [(status, headers, body)] = _responses(raw)
    assert status == "HTTP/1.1 400 Bad Request"
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert body.startswith(b"Bad request\nrequest_id: ")
    assert headers["server"].startswith("kong/")
    assert headers["connection"] == "close"
    assert upstream.requests == []
    r = await client.request("GET", node.proxy + "/echo")
    assert r.code == 200


@pytest_twisted.ensureDeferred
async def test_oversized_request_line_is_414_and_oversized_headers_400(node):
    """Past ``client_max_header_size`` (32k): ``414 URI too long`` when the request
    line alone is that long, else ``400 Request header or cookie too large`` (nginx's
    494, as Kong answers it); twisted.web dropped a line over 16 KiB without a word."""
    from twisted.internet import reactor

    long_line = b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    [(status, _, body)] = _responses(
        await raw_exchange(reactor, "127.0.0.1", _port(node), long_line))
    assert status == "HTTP/1.1 414 Request-URI Too Long"
    assert body.startswith(b"URI too long\n")

    big_header = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * 40000 + b"\r\n\r\n"
    [(status, _, body)] = _responses(
        await raw_exchange(reactor, "127.0.0.1", _port(node), big_header))
    assert status == "HTTP/1.1 400 Bad Request"
    assert body.startswith(b"Request header or cookie too large\n")

    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(
        b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"
    [(status, _, body)] = _responses(await raw_exchange(reactor, "127.0.0.1", _port(node), many))
    assert status == "HTTP/1.1 400 Bad Request"
    assert body.startswith(b"Bad request\n")


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_answered_in_order(node, client, upstream):
    """Three requests in one write (one with a body, one after empty lines) get three
    answers, in order, on the same connection."""
    from twisted.internet import reactor

    await _echo_route(client, node, upstream)
    payload = (b"GET /echo/1 HTTP/1.1\r\nHost: a\r\n\r\n"
               b"POST /echo/2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\r\n\r\n"
               b"GET /echo/3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    answers = _responses(await raw_exchange(reactor, "127.0.0.1", _port(node), payload))
    assert [a[0] for a in answers] == ["HTTP/1.1 200 OK"] * 3
    seen = [json.loads(a[2]) for a in answers]
    assert [s["uri"] for s in seen] == ["/1", "/2", "/3"]  # strip_path
    assert seen[1]["body"] == "hello"


class _Dribbler:
    """Writes ``pieces`` to a new connection, ``gap`` seconds apart; ``done`` fires
    with everything read when the server closes."""

    def __init__(self, reactor: Any, port: int, pieces: List[bytes], gap: float) -> None:
        from twisted.internet import defer, protocol

        self.received = b""
        self.done: Any = defer.Deferred()
        outer = self

        class Writer(protocol.Protocol):
            def connectionMade(self) -> None:
                self.pending = list(pieces)
                self.send()

            def send(self) -> None:
                if self.pending and self.transport.connected:
                    self.transport.write(self.pending.pop(0))
                    reactor.callLater(gap, self.send)

            def dataReceived(self, data: bytes) -> None:
                outer.received += data

            def connectionLost(self, reason: Any) -> None:
                outer.done.callback(outer.received)

        protocol.ClientCreator(reactor, Writer).connectTCP("127.0.0.1", port)


@pytest_twisted.ensureDeferred
async def test_head_in_pieces_is_served(node, client, upstream):
    """A head that arrives a few bytes at a time (CRLF split too) is served whole."""
    from twisted.internet import reactor

    await _echo_route(client, node, upstream)
    pieces = [b"GET /ec", b"ho HTTP/1.1\r", b"\nHost: a\r\nX-A:", b" b\r\nConnection: close\r\n",
              b"\r", b"\n"]
    raw = await _Dribbler(reactor, _port(node), pieces, 0.02).done
    [(status, _, body)] = _responses(raw)
    assert status == "HTTP/1.1 200 OK"
    assert json.loads(body)["headers"]["x-a"] == ["b"]


@pytest_twisted.ensureDeferred
async def test_a_head_trickled_past_the_header_timeout_gets_408(tmp_path):
    """``nginx_http_client_header_timeout`` bounds the time from a head's first byte
    to its end, however often bytes come (twisted.web's idle timer restarts at every
    read, so a byte a second held a connection for ever): ``408 Request timeout``."""
    from twisted.internet import reactor

    from tests.integration.conftest import start_node

    node = await start_node(reactor, str(tmp_path / "p"),
                            KONG_NGINX_HTTP_CLIENT_HEADER_TIMEOUT="400ms")
    try:
        pieces = [b"GET / HTTP/1.1\r\n"] + [b"X-%d: v\r\n" % i for i in range(40)]
        started = time.monotonic()
        raw = await _Dribbler(reactor, _port(node), pieces, 0.05).done
        elapsed = time.monotonic() - started
        [(status, _, body)] = _responses(raw)
        assert status == "HTTP/1.1 408 Request Timeout"
        assert body.startswith(b"Request timeout\n")
        assert elapsed < 1.5
    finally:
        await node.service.stopService()
