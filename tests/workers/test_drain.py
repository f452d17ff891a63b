"""Draining the proxy site: in-flight requests finish on a connection that then
closes, idle keep-alive connections get a grace period, stragglers are aborted
at the timeout. Driven with a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from kongtx.proxy.drain import drain
from kongtx.proxy.resource import ProxySite


class _Transport(StringTransport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def _site() -> ProxySite:
    return ProxySite(Resource(), max_body_size=1024, max_headers=100,  # type: ignore[arg-type]
                     max_header_size=8192)


def _connect(site: ProxySite) -> Any:
    channel = site.buildProtocol(None)
    transport = _Transport()
    channel.makeConnection(transport)
    return channel


def _lose(site: ProxySite, channel: Any) -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    channel.connectionLost(Failure(ConnectionDone()))


def test_no_connections_drains_at_once() -> None:
    clock = task.Clock()
    d = drain(_site(), clock, timeout=10)
    assert d.result == 0


def test_an_idle_connection_is_closed_after_the_grace() -> None:
    clock = task.Clock()
    site = _site()
    channel = _connect(site)
    d = drain(site, clock, timeout=10, idle_grace=1.0)
    clock.advance(0.5)
    assert not channel.transport.disconnecting
    clock.advance(0.6)
    assert channel.transport.disconnecting
    _lose(site, channel)
    clock.advance(0.1)
    assert d.result == 0


def test_a_new_request_while_draining_is_answered_with_connection_close() -> None:
    site = _site()
    site.draining = True
    channel = _connect(site)

    class Req:
        from twisted.web.http_headers import Headers

        requestHeaders = Headers()
        responseHeaders = Headers()

    request = Req()
    assert channel.checkPersistence(request, b"HTTP/1.1") is False
    assert request.responseHeaders.getRawHeaders(b"connection") == [b"close"]


def test_a_busy_connection_is_not_closed_before_the_timeout_then_aborted() -> None:
    clock = task.Clock()
    site = _site()
    channel = _connect(site)
    from twisted.web.server import Request

    request = Request(channel, False)
    channel.requests.append(request)  # a request in progress, not yet answered
    d = drain(site, clock, timeout=3.0, idle_grace=1.0)
    assert not channel.persistent
    assert request.responseHeaders.getRawHeaders(b"connection") == [b"close"]
    clock.advance(2.0)
    assert not channel.transport.disconnecting
    clock.advance(1.1)
    assert channel.transport.aborted
    assert d.result == 1
