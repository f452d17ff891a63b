"""The reactor a worker process runs: Twisted's epoll reactor, with writes sent
in the turn that makes them.

Twisted's reactor, when a transport has bytes to send, registers the socket
for writability (``epoll_ctl``) and sends in a later turn, once ``epoll_wait``
reports it writable, then unregisters it (``epoll_ctl`` again). A proxied
request writes to two sockets (the upstream, then the client), so that is four
``epoll_ctl`` calls and two extra reactor turns per request, for sockets that
are nearly always writable at once. It also runs every event inside
``twisted.python.log.callWithLogger``, which copies a logging-context
dictionary per event for the legacy ``log.msg`` system prefix.

:class:`WorkerReactor` changes two things and nothing else:

- a transport asking to write is put on a *pending* list instead of being
  registered; at the end of the turn (after the events of one
  ``epoll_wait``, and before waiting again) each pending transport is given
  the write event the reactor would have given it (``doWrite``, through the
  reactor's own ``_doReadOrWrite``, with its error and disconnection
  handling). One that could not send everything (a full socket buffer) is then
  registered with ``epoll`` as before, and continues as with the stock
  reactor. What a request writes in one turn (a response head, then its body)
  still leaves in one ``send``;
- events are dispatched without ``callWithLogger``: exceptions are caught and
  logged as before (a failure in one connection's handling never stops the
  reactor), and log events keep their own namespaces (kongtx logs through
  ``twisted.logger``); only legacy ``log.msg`` lines lose the connection's
  ``system`` prefix.

This is how asyncio's selector transports write (send at once when nothing
is buffered, register only what is left). Only worker processes run it
(:mod:`kongtx.workers.main`): the master, ``twistd`` and the tests keep
Twisted's default reactor.
"""

from __future__ import annotations

import errno
from typing import Any, Dict, List

from twisted.internet import epollreactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

__all__ = ["WorkerReactor", "install", "MAX_FLUSH_ROUNDS"]

#: How many times one turn flushes writers that became pending while others
#: were flushed (a producer resumed by a flush writes again); what is still
#: pending after that is registered with epoll, as by the stock reactor.
MAX_FLUSH_ROUNDS = 4

_POLLOUT = epollreactor.EPOLLOUT

log = Logger(namespace="kongtx.worker")


class WorkerReactor(epollreactor.EPollReactor):
    """An epoll reactor that sends pending writes at the end of each turn."""

    def __init__(self) -> None:
        #: Writers asked for but not registered with epoll, in order.
        self._write_pending: Dict[Any, None] = {}
        #: The writer being flushed, and whether it called ``stopWriting``.
        self._write_flushing: Any = None
        self._writer_stopped = False
        epollreactor.EPollReactor.__init__(self)

    # -- writers -----------------------------------------------------------------

    def addWriter(self, writer: Any) -> None:
        if writer not in self._write_pending and writer.fileno() not in self._writes:
            self._write_pending[writer] = None

    def removeWriter(self, writer: Any) -> None:
        if writer is self._write_flushing:
            self._writer_stopped = True
        if self._write_pending.pop(writer, _ABSENT) is _ABSENT:
            epollreactor.EPollReactor.removeWriter(self, writer)

    def getWriters(self) -> List[Any]:
        return epollreactor.EPollReactor.getWriters(self) + list(self._write_pending)

    def removeAll(self) -> List[Any]:
        pending = list(self._write_pending)
        self._write_pending.clear()
        removed = epollreactor.EPollReactor.removeAll(self)
        return removed + [w for w in pending if w not in removed]

    def flush_writes(self) -> None:
        """Give every pending writer its write event now; register with epoll
        those that still want to write (they did not call ``stopWriting``)."""
        rounds = 0
        while self._write_pending:
            pending = self._write_pending
            self._write_pending = {}
            rounds += 1
            if rounds > MAX_FLUSH_ROUNDS:
                for writer in pending:
                    epollreactor.EPollReactor.addWriter(self, writer)
                return
            for writer in pending:
                try:
                    fd = writer.fileno()
                    if fd == -1:
                        continue
                    self._write_flushing = writer
                    self._writer_stopped = False
                    try:
                        self._doReadOrWrite(writer, fd, _POLLOUT)
                    finally:
                        self._write_flushing = None
                    if not self._writer_stopped and writer.fileno() != -1:
                        self._write_pending.pop(writer, None)
                        epollreactor.EPollReactor.addWriter(self, writer)
                except Exception:
                    log.failure("error flushing {writer!r}", writer=writer)

    # -- the turn ----------------------------------------------------------------

    def doPoll(self, timeout: Any) -> None:
        if self._write_pending:
            self.flush_writes()  # written by timed calls, before this turn's wait
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except Exception:
                log.failure("error handling {selectable!r}", selectable=selectable)
        if self._write_pending:
            self.flush_writes()

    doIteration = doPoll


_ABSENT = object()


def install() -> WorkerReactor:
    """Install a :class:`WorkerReactor` as the global reactor."""
    reactor = WorkerReactor()
    installReactor(reactor)
    return reactor
