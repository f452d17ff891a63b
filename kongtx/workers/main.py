"""A worker process: ``python -m kongtx.workers.main CHANNEL_FD``.

The master starts it with the channel on ``CHANNEL_FD`` and its proxy
sockets on the descriptors the ``setup`` message names. The worker builds the
master's exact configuration from that message, serves the proxy as a
``worker`` :class:`~kongtx.node.KongtxService`, applies the change events the
master forwards and acknowledges each one once its snapshot includes it.

Signals: ``SIGTERM``/``SIGINT`` drain and exit (Twisted's handlers stop the
reactor; the service drains before shutdown), ``SIGUSR1`` reopens the log
files, ``SIGHUP`` is ignored (the master reloads). If the master goes away the
worker drains and exits too.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Dict, List, Optional

__all__ = ["main", "Worker", "STATS_INTERVAL"]

#: Seconds between the counters a worker reports for ``GET /status``.
STATS_INTERVAL = 1.0


class Worker:
    """The worker's end of the channel and its service."""

    def __init__(self, reactor: Any, channel_fd: int) -> None:
        from twisted.logger import Logger

        self.log = Logger(namespace="kongtx.worker")
        self.reactor = reactor
        self.channel_fd = channel_fd
        self.channel: Any = None
        self.store: Any = None
        self.service: Any = None
        self.slot: Optional[int] = None
        self.applied = 0
        self.exit_code = 0
        self._stats: Any = None

    def connect(self) -> None:
        from twisted.internet import protocol

        from kongtx.workers.channel import Channel

        channel = self.channel = Channel(self.on_message, None, self.on_lost)
        factory = protocol.Factory()
        factory.buildProtocol = lambda addr: channel  # type: ignore[assignment]
        self.reactor.adoptStreamConnection(self.channel_fd, socket.AF_UNIX, factory)
        os.close(self.channel_fd)

    # -- messages from the master ----------------------------------------------------

    def on_message(self, message: Dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "setup" and self.service is None:
            self.setup(message)
        elif kind == "event" and self.store is not None:
            self.on_event(message)

    def setup(self, message: Dict[str, Any]) -> None:
        from kongtx.config import ConfigError, config_from_values
        from kongtx.node import KongtxService
        from kongtx.workers.remote import RemoteStore

        try:
            config = config_from_values(message["values"], message.get("source_path"),
                                        message.get("unknown") or ())
        except ConfigError as exc:
            self.fail("Error: %s" % (exc,))
            return
        self.slot = message.get("slot")
        self.applied = int(message.get("seq", 0))
        self.store = RemoteStore(self.channel.call)
        service = self.service = KongtxService(
            config, self.reactor, role="worker", store=self.store,
            listen_fds=list(message.get("listen_fds") or ()),
        )
        try:
            service.privilegedStartService()
        except SystemExit as exc:
            self.fail(str(exc))
            return
        except Exception as exc:  # a bug: say what, and let the master restart us
            self.fail("Error: worker %s cannot start: %s" % (self.slot, exc))
            return
        service.before_serving = self._catch_up
        service.startService()
        self.reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        service.ready.addCallbacks(self._ready, lambda reason: self.fail(
            "Error: worker %s cannot start: %s" % (self.slot, reason.value)))

    async def _catch_up(self) -> None:
        """Before accepting: ask the master for its newest change number. Its answer
        comes after every change it numbered so far (one ordered channel), so once
        the snapshot has settled this worker serves all of them; the master does
        not wait for workers that are still starting."""
        newest = int(await self.channel.call("seq"))
        await self.service.snapshots.settled()
        self.applied = max(self.applied, newest)

    def _ready(self, _: Any) -> None:
        from twisted.internet import task

        self.channel.send({"t": "applied", "seq": self.applied})
        self.channel.send({"t": "ready", "pid": os.getpid()})
        self._stats = task.LoopingCall(self._send_stats)
        self._stats.clock = self.reactor
        self._stats.start(STATS_INTERVAL, now=True)

    def _send_stats(self) -> None:
        if self.service is not None:
            from kongtx.admin.node import _rss_bytes

            self.channel.send({"t": "stats", "counts": self.service.stats.local(),
                               "rss": _rss_bytes()})

    def on_event(self, message: Dict[str, Any]) -> None:
        from kongtx.workers.remote import event_from_message

        seq = int(message.get("seq", 0))
        self.store.notify(event_from_message(message["event"]))

        def applied(_: Any) -> None:
            if seq > self.applied:
                self.applied = seq
                self.channel.send({"t": "applied", "seq": seq})

        self.service.snapshots.settled().addCallback(applied)

    def on_lost(self, reason: Any) -> None:
        if self.reactor.running:
            self.log.info("worker {slot}: the master went away; draining and exiting",
                          slot=self.slot)
            self.reactor.stop()

    def fail(self, line: str) -> None:
        sys.stderr.write(line.rstrip() + "\n")
        sys.stderr.flush()
        self.exit_code = 1
        if self.reactor.running:
            self.reactor.stop()


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        sys.stderr.write("usage: python -m kongtx.workers.main CHANNEL_FD "
                         "(started by the kongtx master process)\n")
        return 2
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        from kongtx.workers import reactor as worker_reactor
    except ImportError:  # no epoll: Twisted's default reactor
        from twisted.internet import default

        default.install()
    else:
        worker_reactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)],
                                     redirectStandardIO=False)
    worker = Worker(reactor, int(args[0]))
    reactor.callWhenRunning(worker.connect)
    reactor.run()
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main())
