"""The worker processes' reactor (``kongtx.workers.reactor``): writes leave in the
turn that makes them, without registering the socket with epoll, and everything
Twisted's transports rely on (partial sends, producers, closing after the last
byte, errors) behaves as with the stock reactor.

Each test runs its own :class:`WorkerReactor` on loopback sockets (not the
process's global reactor) and stops it when done or after a few seconds.
"""

from __future__ import annotations

import select
from typing import Any, Callable, List

import pytest
from twisted.internet import protocol
from twisted.protocols import basic

if not hasattr(select, "epoll"):
    pytest.skip("the worker reactor needs epoll (Linux)", allow_module_level=True)

from kongtx.workers.reactor import WorkerReactor  # noqa: E402

BIG = 8 * 1024 * 1024  # well beyond a loopback socket's buffers


class CountingPoller:
    """Wraps an epoll object, counting registrations for writability."""

    def __init__(self, poller: Any) -> None:
        self._poller = poller
        self.write_registrations = 0

    def register(self, fd: int, flags: int) -> None:
        if flags & select.EPOLLOUT:
            self.write_registrations += 1
        self._poller.register(fd, flags)

    def modify(self, fd: int, flags: int) -> None:
        if flags & select.EPOLLOUT:
            self.write_registrations += 1
        self._poller.modify(fd, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


def run(reactor: WorkerReactor, start: Callable[[], Any], seconds: float = 10.0) -> None:
    """Run *reactor* until it is stopped, calling *start* once it runs; fail
    the test if it is still running after *seconds*."""
    timed_out: List[bool] = []

    def give_up() -> None:
        timed_out.append(True)
        reactor.stop()

    reactor.callWhenRunning(start)
    guard = reactor.callLater(seconds, give_up)
    reactor.run(installSignalHandlers=False)
    if guard.active():
        guard.cancel()
    assert not timed_out, "the reactor did not finish in %s s" % seconds


class Sink(protocol.Protocol):
    """Counts what it receives; stops the reactor when the peer closes."""

    def __init__(self, reactor: WorkerReactor, expect: int) -> None:
        self.reactor = reactor
        self.expect = expect
        self.received = 0
        self.data: List[bytes] = []
        self.closed = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if len(self.data) < 4:
            self.data.append(data)

    def connectionLost(self, reason: Any) -> None:
        self.closed += 1
        self.reactor.stop()


def serve(reactor: WorkerReactor, on_connection: Callable[[Any], None]) -> int:
    """Listen on loopback; *on_connection* gets each server-side transport."""

    class Server(protocol.Protocol):
        def connectionMade(self) -> None:
            on_connection(self.transport)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Server), interface="127.0.0.1")
    return port.getHost().port


def connect(reactor: WorkerReactor, port: int, client: protocol.Protocol) -> None:
    protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)


def test_a_small_write_leaves_without_registering_for_writability() -> None:
    """A reply that fits the socket's buffer is sent in the turn that writes it:
    epoll is never asked to report the socket writable."""
    reactor = WorkerReactor()
    counting = reactor._poller = CountingPoller(reactor._poller)
    sink = Sink(reactor, 5)

    def reply(transport: Any) -> None:
        transport.write(b"hel")
        transport.write(b"lo")  # the same turn: one send with the first
        transport.loseConnection()

    run(reactor, lambda: connect(reactor, serve(reactor, reply), sink))
    assert sink.received == 5 and sink.data == [b"hello"]
    assert sink.closed == 1
    assert counting.write_registrations == 0


def test_a_write_larger_than_the_socket_buffer_waits_for_writability() -> None:
    """What a send cannot take is left to epoll, as with the stock reactor: every
    byte arrives, then the close."""
    reactor = WorkerReactor()
    counting = reactor._poller = CountingPoller(reactor._poller)
    sink = Sink(reactor, BIG)

    def reply(transport: Any) -> None:
        transport.write(b"x" * BIG)
        transport.loseConnection()

    run(reactor, lambda: connect(reactor, serve(reactor, reply), sink))
    assert sink.received == BIG
    assert sink.closed == 1
    assert counting.write_registrations >= 1


def test_a_producer_is_resumed_until_it_has_written_everything(tmp_path) -> None:
    """``FileSender`` (a pull producer) writes a large file chunk by chunk: each
    flush that empties the buffer asks it for more, and all of it arrives."""
    reactor = WorkerReactor()
    path = tmp_path / "big"
    path.write_bytes(b"y" * BIG)
    sink = Sink(reactor, BIG)

    def reply(transport: Any) -> None:
        handle = open(path, "rb")
        sent = basic.FileSender().beginFileTransfer(handle, transport)

        def done(_: Any) -> None:
            handle.close()
            transport.loseConnection()

        sent.addCallback(done)

    run(reactor, lambda: connect(reactor, serve(reactor, reply), sink))
    assert sink.received == BIG
    assert sink.closed == 1


def test_echo_in_both_directions() -> None:
    """A client and a server both writing: a request-reply exchange repeated
    many times on one connection completes, on the reactor's writes alone."""
    reactor = WorkerReactor()
    rounds = 2000

    class Echo(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

    class Client(protocol.Protocol):
        count = 0

        def connectionMade(self) -> None:
            self.transport.write(b"ping")

        def dataReceived(self, data: bytes) -> None:
            self.count += data.count(b"ping")
            if self.count >= rounds:
                self.transport.loseConnection()
            else:
                self.transport.write(b"ping")

        def connectionLost(self, reason: Any) -> None:
            reactor.stop()

    client = Client()
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    run(reactor, lambda: connect(reactor, port.getHost().port, client))
    assert client.count == rounds


def test_a_write_to_a_reset_connection_reports_the_loss() -> None:
    """Writing after the peer reset the connection ends in ``connectionLost``
    (through the reactor's own error handling), not in a stuck or crashed
    reactor; the pending write is dropped."""
    reactor = WorkerReactor()
    lost: List[Any] = []
    writes: List[int] = []

    class Writer(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.stopReading()  # only a write can find the reset
            reactor.callLater(0.05, self.write_more)

        def write_more(self) -> None:
            if self.transport.connected:
                writes.append(1)
                self.transport.write(b"z" * 65536)
                reactor.callLater(0.02, self.write_more)

        def connectionLost(self, reason: Any) -> None:
            lost.append(reason)
            reactor.stop()

    class Resetter(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.abortConnection()

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Writer), interface="127.0.0.1")
    run(reactor, lambda: connect(reactor, port.getHost().port, Resetter()))
    assert len(lost) == 1
    assert writes, "the server never wrote"


def test_pending_writers_are_listed_and_removed_with_the_rest() -> None:
    """A writer waiting for the end of the turn is one of ``getWriters()`` and
    goes with ``removeAll()``; ``removeWriter`` takes it off without epoll."""
    reactor = WorkerReactor()

    class Writer:
        connected = True
        disconnected = False

        def fileno(self) -> int:
            return 1000

    writer = Writer()
    reactor.addWriter(writer)
    assert writer in reactor.getWriters()
    reactor.removeWriter(writer)
    assert writer not in reactor.getWriters()
    reactor.addWriter(writer)
    assert writer in reactor.removeAll()
    assert reactor.getWriters() == []
