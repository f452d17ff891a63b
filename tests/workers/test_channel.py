"""The master/worker channel: calls, replies, errors and one-way messages over
length-prefixed JSON, driven in memory."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from kongtx.store.interface import StoreUnavailable
from kongtx.workers.channel import Channel, ChannelClosed, RemoteError


def _pair(handle_call: Any = None) -> Tuple[Channel, Channel, List[Dict[str, Any]], Any]:
    """A worker-side and a master-side channel wired through two StringTransports;
    ``pump()`` delivers what each wrote to the other."""
    received: List[Dict[str, Any]] = []
    worker = Channel(received.append)
    master = Channel(lambda message: None, handle_call)
    tw, tm = StringTransport(), StringTransport()
    worker.makeConnection(tw)
    master.makeConnection(tm)

    def pump() -> None:
        for _ in range(10):
            a, b = tw.value(), tm.value()
            tw.clear()
            tm.clear()
            if not a and not b:
                return
            master.dataReceived(a)
            worker.dataReceived(b)

    return worker, master, received, pump


def test_a_call_fires_with_the_other_sides_result() -> None:
    """``call("get", ...)`` fires with what the master's handler returned."""
    worker, _, _, pump = _pair(lambda op, args: {"op": op, "args": args})
    d = worker.call("get", "consumers", "abc")
    pump()
    assert d.result == {"op": "get", "args": ["consumers", "abc"]}


def test_a_deferred_result_is_awaited() -> None:
    later: defer.Deferred = defer.Deferred()
    worker, _, _, pump = _pair(lambda op, args: later)
    d = worker.call("all", "routes")
    pump()
    assert not d.called
    later.callback([{"id": "r"}])
    pump()
    assert d.result == [{"id": "r"}]


def test_store_unavailable_crosses_as_itself() -> None:
    """A worker's cache sees the database outage as ``StoreUnavailable`` (so it
    serves stale entries), not as an unknown error."""
    def handler(op: str, args: list) -> Any:
        raise StoreUnavailable("connection refused")

    worker, _, _, pump = _pair(handler)
    d = worker.call("get_by", "keyauth_credentials", "key", "k")
    pump()
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(StoreUnavailable)
    assert str(failure[0].value) == "connection refused"


def test_an_unknown_error_is_a_remote_error() -> None:
    def handler(op: str, args: list) -> Any:
        raise ZeroDivisionError("boom")

    worker, _, _, pump = _pair(handler)
    d = worker.call("get", "services", "x")
    pump()
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(RemoteError)
    assert "ZeroDivisionError: boom" in str(failure[0].value)


def test_one_way_messages_reach_on_message() -> None:
    worker, master, received, pump = _pair()
    master.send({"t": "event", "seq": 3, "event": {"entity": "routes"}})
    pump()
    assert received == [{"t": "event", "seq": 3, "event": {"entity": "routes"}}]


def test_pending_calls_fail_when_the_channel_closes() -> None:
    """A master that goes away fails the worker's pending reads with
    ``ChannelClosed`` (a ``StoreUnavailable``), and later calls fail at once."""
    worker, _, _, _ = _pair(lambda op, args: None)
    d = worker.call("get", "services", "x")
    worker.connectionLost()
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(ChannelClosed, StoreUnavailable)
    later = []
    worker.call("get", "services", "y").addErrback(later.append)
    assert later[0].check(ChannelClosed)


def test_a_malformed_frame_is_dropped() -> None:
    worker, master, received, pump = _pair()
    master.sendString(b"not json")
    master.send({"t": "event", "seq": 1})
    pump()
    assert received == [{"t": "event", "seq": 1}]
