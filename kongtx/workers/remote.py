"""A worker's store: reads go to the master's store over the channel.

A worker never opens the database itself. The master forwards every change
event it sees (its own Admin API's writes and other nodes'), and answers the
few reads a worker makes: every row of a configuration entity when the
worker builds its snapshot (answered from the master's snapshot rows, so a
worker starts even while the database is down), and cache misses such as a
credential by key or a ``cluster`` rate-limiting counter. Writes are the
Admin API's business, which only the master serves.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.logger import Logger

from kongtx.store.interface import ChangeEvent

__all__ = ["RemoteStore", "event_to_message", "event_from_message", "READ_OPS"]

log = Logger()

#: The store methods a worker may ask the master for.
READ_OPS = frozenset({"ping", "get", "get_by", "page", "all", "increment"})


def event_to_message(event: ChangeEvent) -> Dict[str, Any]:
    return {"entity": event.entity, "op": event.op, "id": event.id,
            "old": event.old, "new": event.new}


def event_from_message(data: Dict[str, Any]) -> ChangeEvent:
    return ChangeEvent(data["entity"], data["op"], data["id"], data.get("old"), data.get("new"))


class RemoteStore:
    """The ``IStore`` a worker uses: reads through *call*, events from :meth:`notify`.

    :param call: ``call(op, *args)`` returns a Deferred (``Channel.call``).
    """

    def __init__(self, call: Callable[..., defer.Deferred]) -> None:
        self._call = call
        self._listeners: List[Callable[[ChangeEvent], Any]] = []

    def start(self) -> defer.Deferred:
        return defer.succeed(None)

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)

    def ping(self) -> defer.Deferred:
        return self._call("ping")

    def get(self, entity: str, id: str) -> defer.Deferred:
        return self._call("get", entity, id)

    def get_by(self, entity: str, field: str, value: Any) -> defer.Deferred:
        return self._call("get_by", entity, field, value)

    def page(self, entity: str, size: int = 100, offset: Optional[str] = None,
             where: Optional[Dict[str, Any]] = None) -> defer.Deferred:
        return self._call("page", entity, size, offset, where)

    def all(self, entity: str, where: Optional[Dict[str, Any]] = None) -> defer.Deferred:
        return self._call("all", entity, where)

    def increment(self, counter_key: str, window_start: int, ttl: int, amount: int = 1,
                  limit: Optional[int] = None) -> defer.Deferred:
        return self._call("increment", counter_key, window_start, ttl, amount, limit)

    def insert(self, entity: str, row: Dict[str, Any]) -> defer.Deferred:
        return defer.fail(NotImplementedError("workers do not write; the master's Admin API does"))

    update = insert

    def delete(self, entity: str, id: str) -> defer.Deferred:
        return defer.fail(NotImplementedError("workers do not write; the master's Admin API does"))

    # -- change events ----------------------------------------------------------------

    def add_listener(self, callback: Callable[[ChangeEvent], Any]) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[ChangeEvent], Any]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def notify(self, event: ChangeEvent) -> None:
        """Hand an event the master forwarded to every listener."""
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:
                log.failure("change event listener failed")
