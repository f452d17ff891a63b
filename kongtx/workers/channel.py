"""The channel between the master and one worker: length-prefixed JSON messages.

Each message is a JSON object with a type ``t``:

* ``call`` (``id``, ``op``, ``args``): a request answered by ``reply``
  (``id``, ``result``) or ``error`` (``id``, ``kind``, ``message``); the
  worker calls the master's store this way, the master asks workers nothing;
* anything else is a one-way message handed to the owner's ``on_message``.

A frame is a 4-byte big-endian length then UTF-8 JSON (Twisted's
``Int32StringReceiver``). Frames are bounded (:data:`MAX_FRAME`) so a corrupt
length cannot make a process allocate without limit.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python import failure

from kongtx.store.interface import StoreError, StoreUnavailable

__all__ = ["Channel", "ChannelClosed", "RemoteError", "MAX_FRAME"]

log = Logger()

#: The largest frame either side accepts (a whole configuration fits).
MAX_FRAME = 512 * 1024 * 1024


class ChannelClosed(StoreUnavailable):
    """The other process went away before answering."""


class RemoteError(StoreError):
    """The other side's call failed with an error this side has no class for."""


#: Errors that cross the channel as themselves (class name -> rebuild from message).
_KNOWN_ERRORS: Dict[str, Callable[[str], BaseException]] = {
    "StoreUnavailable": StoreUnavailable,
    "ChannelClosed": ChannelClosed,
    "ValueError": ValueError,
    "KeyError": KeyError,
}


def _encode_error(error: BaseException) -> Dict[str, str]:
    kind = type(error).__name__
    if isinstance(error, StoreUnavailable) and kind not in _KNOWN_ERRORS:
        kind = "StoreUnavailable"
    return {"kind": kind, "message": str(error)}


def _decode_error(kind: str, message: str) -> BaseException:
    factory = _KNOWN_ERRORS.get(kind)
    if factory is None:
        return RemoteError("%s: %s" % (kind, message))
    return factory(message)


class Channel(Int32StringReceiver):
    """One end of the master/worker channel.

    :param on_message: called with each one-way message (a dict).
    :param handle_call: ``handle_call(op, args)`` returns the result (or a
        Deferred firing with it) of the other side's ``call``; ``None``
        refuses every call.
    :param on_lost: called once with the reason when the connection ends.
    """

    MAX_LENGTH = MAX_FRAME

    def __init__(
        self,
        on_message: Callable[[Dict[str, Any]], None],
        handle_call: Optional[Callable[[str, list], Any]] = None,
        on_lost: Optional[Callable[[failure.Failure], None]] = None,
    ) -> None:
        self._on_message = on_message
        self._handle_call = handle_call
        self._on_lost = on_lost
        self._pending: Dict[int, defer.Deferred] = {}
        self._next_id = 0
        self.connected_ = False

    # -- sending --------------------------------------------------------------------

    def send(self, message: Dict[str, Any]) -> None:
        """Send a one-way message (dropped if the channel is closed)."""
        if self.transport is None or not self.connected_:
            return
        self.sendString(json.dumps(message, separators=(",", ":")).encode("utf-8"))

    def call(self, op: str, *args: Any) -> defer.Deferred:
        """Ask the other side to run *op*; fires with its result or fails with its error."""
        if not self.connected_:
            return defer.fail(ChannelClosed("the master process is not connected"))
        self._next_id += 1
        call_id = self._next_id
        d: defer.Deferred = defer.Deferred()
        self._pending[call_id] = d
        self.send({"t": "call", "id": call_id, "op": op, "args": list(args)})
        return d

    # -- receiving ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_ = True

    def stringReceived(self, data: bytes) -> None:
        try:
            message = json.loads(data.decode("utf-8"))
            kind = message["t"]
        except (ValueError, KeyError, TypeError):
            log.error("worker channel: dropping a malformed message")
            return
        if kind == "reply" or kind == "error":
            d = self._pending.pop(message.get("id"), None)
            if d is None:
                return
            if kind == "reply":
                d.callback(message.get("result"))
            else:
                d.errback(_decode_error(message.get("kind", ""), message.get("message", "")))
        elif kind == "call":
            self._answer(message)
        else:
            try:
                self._on_message(message)
            except Exception:
                log.failure("worker channel: handling a {kind!r} message failed", kind=kind)

    def _answer(self, message: Dict[str, Any]) -> None:
        call_id = message.get("id")
        if self._handle_call is None:
            self.send({"t": "error", "id": call_id, "kind": "RemoteError",
                       "message": "calls are not accepted here"})
            return
        d = defer.maybeDeferred(self._handle_call, message.get("op", ""),
                                list(message.get("args") or ()))

        def answered(result: Any) -> None:
            self.send({"t": "reply", "id": call_id, "result": result})

        def failed(reason: failure.Failure) -> None:
            self.send(dict(_encode_error(reason.value), t="error", id=call_id))

        d.addCallbacks(answered, failed)
        d.addErrback(lambda reason: log.failure("worker channel: answering failed", reason))

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("worker channel: a {length}-byte frame is over the limit; closing",
                  length=length)
        self.transport.loseConnection()

    def connectionLost(self, reason: failure.Failure = failure.Failure(ChannelClosed("closed"))) -> None:
        self.connected_ = False
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(ChannelClosed("the other process closed the channel"))
        if self._on_lost is not None:
            self._on_lost(reason)
