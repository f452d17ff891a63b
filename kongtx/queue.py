"""A batching queue with retries, for plugins that ship log entries somewhere
(Kong's ``kong/tools/queue.lua``).

Entries are added with :meth:`Queue.add` (never blocks, never raises). They are
sent in batches of at most ``max_batch_size`` entries by the *handler*, a
callable taking a list of entries and returning a Deferred (or a value); a
failure (an exception or a failed Deferred) is retried after
``initial_retry_delay`` seconds, doubling up to ``max_retry_delay``, until
``max_retry_time`` seconds have passed since the first try; then the batch is
dropped and logged. A batch is sent when it is full, or ``max_coalescing_delay``
seconds after its first entry arrived. At most ``concurrency_limit`` batches are
in flight (``1``: strictly in order; ``-1``: no limit, each batch on its own).

The queue is bounded: with ``max_entries`` waiting, a new entry pushes out the
oldest one (logged once until the queue has room again); ``max_bytes`` (when
set) bounds the total size of the waiting entries, which must then be
``bytes`` or ``str``.

Time is the injected reactor's (``callLater``, ``seconds``), so tests drive it
with ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Deque, List, Mapping, Optional

import attr
from twisted.internet import defer
from twisted.logger import Logger

__all__ = ["Queue", "QueueConfig"]

MSG_FULL = "queue {name}: queue full, dropping oldest entries"
MSG_GAVE_UP = ("queue {name}: could not send entries after {tries} tries in "
               "{elapsed:.3f}s, dropping {count} entries: {error}")
MSG_RETRY = "queue {name}: handler could not process entries: {error}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class QueueConfig:
    """Kong's ``queue`` record (the defaults are Kong's)."""

    max_batch_size: int = 1
    max_coalescing_delay: float = 1.0
    max_entries: int = 10000
    max_bytes: Optional[int] = None
    max_retry_time: float = 60.0
    initial_retry_delay: float = 0.01
    max_retry_delay: float = 60.0
    concurrency_limit: int = 1

    @classmethod
    def from_config(cls, record: Optional[Mapping[str, Any]]) -> "QueueConfig":
        """Build from a validated ``queue`` config record (missing keys: defaults)."""
        record = record or {}
        names = [a.name for a in attr.fields(cls)]
        return cls(**{k: record[k] for k in names if record.get(k) is not None})


def _size(entry: Any) -> int:
    return len(entry) if isinstance(entry, (bytes, str)) else 0


class Queue:
    """A bounded batching queue; see the module docstring."""

    def __init__(self, handler: Callable[[List[Any]], Any], config: QueueConfig, *,
                 reactor: Any, name: str = "", log: Optional[Logger] = None) -> None:
        self._handler = handler
        self.config = config
        self._reactor = reactor
        self.name = name
        self._log = log or Logger(namespace="kongtx.queue")
        self._entries: Deque[Any] = collections.deque()
        self._bytes = 0
        self._first_at: Optional[float] = None
        self._timer: Any = None
        self._in_flight = 0
        self._warned_full = False
        #: Entries dropped because the queue was full, and after giving up retrying.
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Entries waiting to be batched (not counting the batches in flight)."""
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        """Batches being sent (or waiting to be retried)."""
        return self._in_flight

    def add(self, entry: Any) -> None:
        """Queue *entry*; the oldest entries make room when the queue is full."""
        config = self.config
        full = False
        while len(self._entries) >= config.max_entries or (
            config.max_bytes is not None and self._entries
            and self._bytes + _size(entry) > config.max_bytes
        ):
            self._bytes -= _size(self._entries.popleft())
            self.dropped += 1
            full = True
        if full:
            if not self._warned_full:
                self._warned_full = True
                self._log.warn(MSG_FULL, name=self.name)
        else:
            self._warned_full = False
        if not self._entries:
            self._first_at = self._reactor.seconds()
        self._entries.append(entry)
        self._bytes += _size(entry)
        self._schedule()

    def _can_send(self) -> bool:
        limit = self.config.concurrency_limit
        return limit < 0 or self._in_flight < limit

    def _schedule(self) -> None:
        if not self._entries or not self._can_send():
            return
        config = self.config
        if len(self._entries) >= config.max_batch_size:
            delay = 0.0
        else:
            assert self._first_at is not None
            delay = max(0.0, self._first_at + config.max_coalescing_delay
                        - self._reactor.seconds())
        timer = self._timer
        if timer is not None and timer.active():
            if delay == 0.0 and timer.getTime() > self._reactor.seconds():
                timer.reset(0)
            return
        self._timer = self._reactor.callLater(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        while self._entries and self._can_send():
            batch = []
            for _ in range(min(self.config.max_batch_size, len(self._entries))):
                entry = self._entries.popleft()
                self._bytes -= _size(entry)
                batch.append(entry)
            self._first_at = self._reactor.seconds() if self._entries else None
            self._in_flight += 1
            self._attempt(batch, self._reactor.seconds(), 1, self.config.initial_retry_delay)
            if self._entries and len(self._entries) < self.config.max_batch_size:
                break
        self._schedule()

    def _attempt(self, batch: List[Any], first: float, tries: int, delay: float) -> None:
        d = defer.maybeDeferred(self._handler, batch)

        def sent(_: Any) -> None:
            self._done()

        def failed(reason: Any) -> None:
            elapsed = self._reactor.seconds() - first
            config = self.config
            if elapsed + delay > config.max_retry_time:
                self.dropped += len(batch)
                self._log.error(MSG_GAVE_UP, name=self.name, tries=tries, elapsed=elapsed,
                                count=len(batch), error=reason.getErrorMessage())
                self._done()
                return
            self._log.warn(MSG_RETRY, name=self.name, error=reason.getErrorMessage())
            self._reactor.callLater(delay, self._attempt, batch, first, tries + 1,
                                    min(delay * 2, config.max_retry_delay))

        d.addCallbacks(sent, failed)
        d.addErrback(lambda reason: self._log.failure("queue {name}: internal error",
                                                      reason, name=self.name))

    def _done(self) -> None:
        self._in_flight -= 1
        self._schedule()
