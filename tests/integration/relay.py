"""A loopback TCP relay that can be cut and restored, to make a server vanish in tests.

``Relay(reactor, host, port)`` listens on ``127.0.0.1`` (a port chosen by the OS) and
forwards every connection to ``host:port`` byte for byte, with flow control both
ways. Point a client (a kongtx node's ``pg_port``) at ``relay.port`` instead of the
server, then:

- ``await relay.cut()``: every relayed connection is aborted (the client sees a
  reset) and new connections are refused: the database has vanished;
- ``await relay.cut(mode="reset")``: the same, but new connections are accepted and
  aborted at once (a server that is up but dropping clients);
- ``await relay.cut(mode="blackhole")``: connections stay open but no byte goes
  through either way, and new connections are accepted and left silent (a network
  partition: clients only notice through their timeouts);
- ``relay.restore()``: forwards again, on the same port. Connections held during a
  blackhole are aborted (bytes were dropped, their streams are broken);
- ``await relay.stop()``: aborts everything and stops listening (teardown).

Twisted protocols only, no threads.
"""

from __future__ import annotations

from typing import Any, List, Optional, Set

from twisted.internet import defer, protocol

#: The ways :meth:`Relay.cut` can make the target vanish.
CUT_MODES = ("refuse", "reset", "blackhole")


class _Inbound(protocol.Protocol):
    """The client's side of one relayed connection."""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self.outbound: Optional[_Outbound] = None
        self.connector: Optional[Any] = None
        self.buffered: List[bytes] = []
        self.silent = False
        self.closed = False

    def connectionMade(self) -> None:
        relay = self.relay
        relay.inbound.add(self)
        relay.accepted += 1
        if relay.mode == "reset":
            self.transport.abortConnection()
            return
        if relay.mode == "blackhole":
            self.silent = True
            return
        # Read nothing more until the target answers.
        self.transport.pauseProducing()
        self.connector = relay.reactor.connectTCP(
            relay.target_host, relay.target_port, _OutboundFactory(self)
        )

    def dataReceived(self, data: bytes) -> None:
        if self.silent:
            return
        if self.outbound is None:
            self.buffered.append(data)
        else:
            self.outbound.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.relay.inbound.discard(self)
        if self.outbound is not None:
            self.outbound.transport.loseConnection()
        elif self.connector is not None:
            self.connector.disconnect()

    def paired(self, outbound: "_Outbound") -> None:
        """The target accepted: flush what arrived meanwhile and start relaying."""
        self.outbound = outbound
        if self.closed:
            outbound.transport.loseConnection()
            return
        for data in self.buffered:
            outbound.transport.write(data)
        self.buffered = []
        # Each side stops reading while the other side's write buffer is full.
        outbound.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(outbound.transport, True)
        self.transport.resumeProducing()

    def abort(self) -> None:
        self.transport.abortConnection()
        if self.outbound is not None:
            self.outbound.transport.abortConnection()


class _Outbound(protocol.Protocol):
    """The relay's connection to the target, paired with one :class:`_Inbound`."""

    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound

    def connectionMade(self) -> None:
        self.inbound.paired(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.inbound.silent:
            self.inbound.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        # In a blackhole not even the close gets through.
        if not self.inbound.silent:
            self.inbound.transport.loseConnection()


class _OutboundFactory(protocol.ClientFactory):
    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound

    def buildProtocol(self, addr: Any) -> _Outbound:
        return _Outbound(self.inbound)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        # The target refused: so does the relay (as far as a client can tell).
        if not self.inbound.closed:
            self.inbound.transport.abortConnection()


class _InboundFactory(protocol.Factory):
    def __init__(self, relay: "Relay") -> None:
        self.relay = relay

    def buildProtocol(self, addr: Any) -> _Inbound:
        return _Inbound(self.relay)


class Relay:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port`` until cut."""

    def __init__(self, reactor: Any, target_host: str, target_port: int) -> None:
        self.reactor = reactor
        self.target_host = target_host
        self.target_port = target_port
        self.inbound: Set[_Inbound] = set()
        #: Connections accepted so far (including those reset or held silent).
        self.accepted = 0
        #: ``None`` while forwarding, else the mode of the current cut.
        self.mode: Optional[str] = None
        self._factory = _InboundFactory(self)
        self._listening: Optional[Any] = reactor.listenTCP(
            0, self._factory, interface="127.0.0.1"
        )
        self.port: int = self._listening.getHost().port

    @property
    def connections(self) -> int:
        """Client connections currently open through the relay."""
        return len(self.inbound)

    def cut(self, mode: str = "refuse") -> defer.Deferred:
        """Make the target vanish (see the module docstring). Fires once in effect."""
        if mode not in CUT_MODES:
            raise ValueError("mode must be one of %s" % (", ".join(CUT_MODES),))
        self.mode = mode
        if mode == "blackhole":
            for inbound in list(self.inbound):
                inbound.silent = True
            return defer.succeed(None)
        self._abort_all()
        if mode == "refuse":
            return self._stop_listening()
        return defer.succeed(None)

    def restore(self) -> None:
        """Forward new connections again, on the same port."""
        if self.mode == "blackhole":
            self._abort_all()
        self.mode = None
        if self._listening is None:
            self._listening = self.reactor.listenTCP(
                self.port, self._factory, interface="127.0.0.1"
            )

    def stop(self) -> defer.Deferred:
        """Abort every connection and stop listening; fires when the port is closed."""
        self.mode = "refuse"
        self._abort_all()
        return self._stop_listening()

    def _abort_all(self) -> None:
        for inbound in list(self.inbound):
            inbound.abort()

    def _stop_listening(self) -> defer.Deferred:
        listening, self._listening = self._listening, None
        if listening is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listening.stopListening)
