"""Access log lines and the buffered, reopenable file writer they (and error logs) go to.

The access line is nginx's *combined* format followed by two latencies in seconds::

    127.0.0.1 - - [28/Nov/2026:08:02:59 +0000] "GET / HTTP/1.1" 200 90 "-" "curl/8" 0.001 0.004

``request_time`` (from the first request line to the end of the response) and
``upstream_latency`` (from ``X-Kong-Upstream-Latency`` when the proxy set it, else
``-``). Non-printable bytes and ``"``/``\\`` are escaped as nginx does (``\\xHH``).

:class:`FileLogWriter` buffers lines and writes them on a short timer (or at once
when 64 KiB are waiting), so a request never waits for the disk. A failed write
(``ENOSPC``, ``EIO``...) is reported once and the lines are dropped; it never raises
into the request path. :meth:`FileLogWriter.reopen` closes and reopens the path
(after logrotate renamed it).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, List, Optional, Tuple

from twisted.logger import Logger
from twisted.python import threadable

log = Logger()

#: Lines waiting for more than this many bytes are written at once.
MAX_BUFFERED = 64 * 1024
#: How long a line may wait in the buffer (seconds).
FLUSH_DELAY = 0.1

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_STANDARD_STREAMS = {"/dev/stdout": 1, "/dev/stderr": 2}

WRITE_FAILED = "cannot write to {path}: {error}; log lines are dropped until it works again"


def _escape_byte(b: int) -> str:
    if b in (0x22, 0x5C) or b < 0x20 or b >= 0x7F:
        return "\\x%02X" % (b,)
    return chr(b)


_ESCAPES = tuple(_escape_byte(b) for b in range(256))
#: The bytes logged as they are; deleting them from a value leaves the ones to escape.
_PLAIN = bytes(b for b in range(256) if len(_ESCAPES[b]) == 1)


def escape(value: Any) -> str:
    """nginx's escaping of a logged value (bytes or str)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        value = value.encode("utf-8", "replace")
    if not value.translate(None, _PLAIN):
        return value.decode("ascii")  # nothing to escape (the usual case)
    return "".join([_ESCAPES[b] for b in value])


#: The last second formatted by :func:`time_local`, and its text.
_last_local: Tuple[int, str] = (-1, "")


def time_local(when: float) -> str:
    """nginx's ``$time_local``: ``28/Nov/2026:08:02:59 +0000`` (local time).

    Formatted once per second (the lines of one second share it)."""
    global _last_local
    second = int(when // 1)
    cached = _last_local
    if cached[0] == second:
        return cached[1]
    t = time.localtime(second)
    offset = t.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    text = "%02d/%s/%d:%02d:%02d:%02d %s%02d%02d" % (
        t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec,
        sign, offset // 60, offset % 60)
    _last_local = (second, text)
    return text


def seconds(value: Optional[float]) -> str:
    """A latency as nginx prints it: seconds with millisecond precision, ``-`` if unknown."""
    if value is None:
        return "-"
    return "%.3f" % (max(value, 0.0),)


def format_line(*, remote_addr: str, remote_user: Optional[str], when: float,
                method: bytes, uri: bytes, protocol: bytes, status: int, sent: int,
                referer: Optional[bytes], user_agent: Optional[bytes],
                request_time: Optional[float], upstream_latency: Optional[float]) -> str:
    """One access line from plain values. Pure."""
    return '%s - %s [%s] "%s %s %s" %d %d "%s" "%s" %s %s' % (
        remote_addr or "-", escape(remote_user) if remote_user else "-", time_local(when),
        escape(method), escape(uri), escape(protocol), status, sent,
        escape(referer), escape(user_agent), seconds(request_time), seconds(upstream_latency),
    )


def request_line(request: Any, when: float, started: Optional[float]) -> str:
    """The access line of a finished ``twisted.web`` request."""
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    upstream = request.responseHeaders.getRawHeaders(b"x-kong-upstream-latency")
    upstream_latency: Optional[float] = None
    if upstream:
        try:
            upstream_latency = int(upstream[0]) / 1000.0
        except ValueError:
            upstream_latency = None
    return format_line(
        remote_addr=host or "-",
        remote_user=None,
        when=when,
        method=request.method or b"-",
        uri=request.uri or b"-",
        protocol=request.clientproto or b"-",
        status=request.code,
        sent=request.sentLength,
        referer=request.getHeader(b"referer"),
        user_agent=request.getHeader(b"user-agent"),
        request_time=None if started is None else when - started,
        upstream_latency=upstream_latency,
    )


class FileLogWriter:
    """Buffered, reopenable line writer for a path (``/dev/stdout``/``/dev/stderr``
    write to the process's own descriptors and are never reopened)."""

    def __init__(self, path: str, reactor: Any, *, flush_delay: float = FLUSH_DELAY,
                 max_buffered: int = MAX_BUFFERED,
                 report: Optional[Callable[[str, str], None]] = None) -> None:
        self.path = path
        self.reactor = reactor
        self.flush_delay = flush_delay
        self.max_buffered = max_buffered
        self._report_cb = report
        self._fd: Optional[int] = _STANDARD_STREAMS.get(path)
        self._owns_fd = self._fd is None
        self._buffer: List[bytes] = []
        self._buffered = 0
        self._timer: Any = None
        self._failing = False
        #: Lines lost to failed writes.
        self.dropped = 0

    def open(self) -> None:
        """Open the file now (at start-up, so a bad path is reported early).

        Raises ``OSError``."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: str) -> None:
        """Queue one line (a newline is added). Never raises."""
        data = line.encode("utf-8", "replace") + b"\n"
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= self.max_buffered:
            if threadable.isInIOThread():
                self.flush()
                return
        if self._timer is None:
            self._timer = True
            if threadable.isInIOThread():
                self._timer = self.reactor.callLater(self.flush_delay, self._timed_flush)
            else:
                self.reactor.callFromThread(self._schedule_from_thread)

    def _schedule_from_thread(self) -> None:
        self._timer = self.reactor.callLater(self.flush_delay, self._timed_flush)

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write every queued line now. Never raises."""
        timer, self._timer = self._timer, None
        if timer is not None and timer is not True and timer.active():
            timer.cancel()
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        lines = len(self._buffer)
        self._buffer = []
        self._buffered = 0
        try:
            self.open()
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)  # type: ignore[arg-type]
                view = view[written:]
        except OSError as exc:
            self.dropped += lines
            self._report(exc)
            return
        if self._failing:
            self._failing = False
            log.info("{path} is writable again ({dropped} lines were dropped)",
                     path=self.path, dropped=self.dropped)

    def reopen(self) -> None:
        """Flush, then close and reopen the path (after a rename by logrotate)."""
        self.flush()
        if self._owns_fd:
            fd, self._fd = self._fd, None
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            try:
                self.open()
            except OSError as exc:
                self._report(exc)

    def close(self) -> None:
        """Flush and close."""
        self.flush()
        if self._owns_fd and self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def _report(self, exc: OSError) -> None:
        if self._failing:
            return
        self._failing = True
        error = exc.strerror or str(exc)
        if self._report_cb is not None:
            self._report_cb(self.path, error)
        else:
            log.error(WRITE_FAILED, path=self.path, error=error)


class AccessLogger:
    """``Site.log`` replacement: formats each finished request and hands the line to
    *sink* (``FileLogWriter.write`` or the syslog observer's ``send_line``)."""

    def __init__(self, sink: Callable[[str], None], clock: Callable[[], float]) -> None:
        self.sink = sink
        self.clock = clock

    def __call__(self, request: Any) -> None:
        try:
            line = request_line(request, self.clock(),
                                getattr(request, "kongtx_log_started", None))
            self.sink(line)
        except Exception:
            log.failure("could not write an access log line")


__all__: Tuple[str, ...] = (
    "AccessLogger", "FileLogWriter", "escape", "format_line", "request_line", "time_local",
)
