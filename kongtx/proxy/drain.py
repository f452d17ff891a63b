"""Draining a proxy site: finish what is in flight, then let the process exit.

Used on SIGTERM/SIGQUIT and by a worker the master retires after ``kongtx
reload``. The listening ports are closed first (by the caller), so no new
connection arrives; then :func:`drain`:

* marks the site ``draining``: from now on every response carries
  ``Connection: close`` and its connection is closed once it is sent, so a
  keep-alive client reconnects (to another worker, or to the new generation)
  without ever seeing a connection die under a request it had sent;
* gives connections that sit idle between requests ``idle_grace`` seconds to
  send one more request (it is answered, then closed) before closing them:
  closing an idle keep-alive connection at once would race a client that is
  sending its next request at that moment;
* fires once every connection is gone, or after ``timeout`` seconds, when the
  remaining connections are aborted (Kong's ``nginx_main_worker_shutdown_timeout``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

__all__ = ["drain", "IDLE_GRACE", "POLL_INTERVAL"]

log = Logger()

#: Seconds an idle keep-alive connection may still send one request.
IDLE_GRACE = 1.0
#: How often the drain looks at the remaining connections.
POLL_INTERVAL = 0.05


def _busy(channel: Any) -> bool:
    return bool(getattr(channel, "requests", None)) or bool(
        getattr(channel, "_handlingRequest", False))


def drain(site: Any, reactor: Any, timeout: float, idle_grace: float = IDLE_GRACE) -> defer.Deferred:
    """Close *site*'s connections gracefully; fires with the number aborted at the end."""
    site.draining = True
    for channel in list(site.channels):
        if channel.requests and channel.persistent:
            # A request in progress: its response closes the connection.
            channel.persistent = False
            request = channel.requests[-1]
            if not getattr(request, "startedWriting", False):
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
    started = reactor.seconds()
    done: defer.Deferred = defer.Deferred()

    def look() -> None:
        channels = site.channels
        elapsed = reactor.seconds() - started
        if not channels:
            poller.stop()
            done.callback(0)
            return
        if elapsed >= timeout:
            poller.stop()
            count = len(channels)
            log.warn("shutdown timeout ({timeout:g}s): aborting {count} connection(s) "
                     "still open", timeout=timeout, count=count)
            for channel in list(channels):
                transport = getattr(channel, "transport", None)
                if transport is not None:
                    transport.abortConnection()
                channels.discard(channel)
            done.callback(count)
            return
        if elapsed >= idle_grace:
            for channel in list(channels):
                if not _busy(channel):
                    channel.loseConnection()

    poller = task.LoopingCall(look)
    poller.clock = reactor
    poller.start(POLL_INTERVAL, now=True)
    return done
