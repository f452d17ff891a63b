"""ProxyChannel's timers with a fake clock: the idle timeout (one timer for the
connection's life) and the deadline of a request head."""

from __future__ import annotations

from typing import Any, List

from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from kongtx.proxy.resource import ProxySite

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


class _Held(Resource):
    """Keeps every request unanswered until the test finishes it."""

    def __init__(self) -> None:
        Resource.__init__(self)
        self.requests: List[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        return server.NOT_DONE_YET


def _connect(clock: task.Clock, timeout: float = 10.0, header_timeout: float = 60.0) -> Any:
    resource = _Held()
    site = ProxySite(resource, max_body_size=1024, max_headers=100,  # type: ignore[arg-type]
                     max_header_size=8192, header_timeout=header_timeout, timeout=timeout)
    channel = site.buildProtocol(None)
    channel.callLater = clock.callLater
    channel.makeConnection(StringTransport())
    return channel, resource


def _answer(request: Any) -> None:
    request.setHeader(b"content-length", b"2")
    request.write(b"ok")
    request.finish()


def test_an_idle_connection_times_out():
    clock = task.Clock()
    channel, _ = _connect(clock)
    clock.advance(9.9)
    assert not channel.transport.disconnecting
    clock.advance(0.2)
    assert channel.transport.disconnecting


def test_the_idle_timer_does_not_count_while_a_request_is_answered():
    clock = task.Clock()
    channel, resource = _connect(clock)
    channel.dataReceived(GET)
    clock.advance(25)  # a slow upstream: past the idle timeout, twice
    assert not channel.transport.disconnecting
    _answer(resource.requests[0])
    clock.advance(9.9)
    assert not channel.transport.disconnecting
    clock.advance(0.2)
    assert channel.transport.disconnecting


def test_one_timer_serves_many_requests():
    """twisted.web cancels its timer for each request and makes a new one when the
    request is answered; the channel keeps one."""
    clock = task.Clock()
    channel, resource = _connect(clock)
    first = channel._idle_call
    for i in range(5):
        clock.advance(1)
        channel.dataReceived(GET)
        _answer(resource.requests[i])
    assert channel._idle_call is first
    assert clock.getDelayedCalls() == [first]
    clock.advance(9.9)
    assert not channel.transport.disconnecting
    clock.advance(0.2)
    assert channel.transport.disconnecting


def test_connection_lost_leaves_no_timer():
    clock = task.Clock()
    channel, _ = _connect(clock)
    channel.dataReceived(b"GET / HT")  # a head begun: its deadline is set too
    assert len(clock.getDelayedCalls()) == 2
    channel.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_a_head_must_end_within_the_header_timeout_however_bytes_trickle():
    clock = task.Clock()
    channel, resource = _connect(clock, timeout=10.0, header_timeout=3.5)
    for piece in (b"GET / HTTP/1.1\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n"):
        channel.dataReceived(piece)
        clock.advance(1.0)  # every read restarts the idle timer, not the deadline
    assert not channel.transport.disconnecting
    clock.advance(0.6)
    assert channel.transport.disconnecting
    assert channel.transport.value().startswith(b"HTTP/1.1 400 Bad Request")  # not a gateway
    assert resource.requests == []


def test_a_head_that_ends_in_time_cancels_its_deadline():
    clock = task.Clock()
    channel, resource = _connect(clock, timeout=10.0, header_timeout=3.0)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(2.0)
    channel.dataReceived(b"Host: a\r\n\r\n")
    assert len(resource.requests) == 1
    clock.advance(5.0)
    assert not channel.transport.disconnecting


def test_when_done_runs_once_when_the_response_is_finished_or_the_client_leaves():
    """``ProxyRequest.when_done`` (the log phase's hook): once after ``finish``, once
    when the client leaves first, never twice."""
    clock = task.Clock()
    channel, resource = _connect(clock)
    done: List[str] = []
    channel.dataReceived(GET)
    resource.requests[0].when_done(done.append, "first")
    _answer(resource.requests[0])
    assert done == ["first"]
    channel.dataReceived(GET)
    second = resource.requests[1]
    second.when_done(done.append, "second")
    channel.connectionLost(Failure(ConnectionDone()))
    assert done == ["first", "second"]
    second._done()
    assert done == ["first", "second"]


def test_a_head_one_byte_at_a_time_then_a_pipelined_one_in_a_single_read():
    """Bytes of a head that ends in a later read are searched once (the search
    resumes where it stopped, across a CRLF CRLF split between reads); the next
    head, whole in one read, is found as usual."""
    clock = task.Clock()
    channel, resource = _connect(clock)
    head = b"GET /one HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 3000 + b"\r\n\r\n"
    for i in range(len(head)):
        channel.dataReceived(head[i:i + 1])
    assert [r.uri for r in resource.requests] == [b"/one"]
    assert resource.requests[0].requestHeaders.getRawHeaders(b"x-long") == [b"v" * 3000]
    _answer(resource.requests[0])
    channel.dataReceived(b"\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [r.uri for r in resource.requests] == [b"/one", b"/two"]
