"""A ``twisted.logger`` observer that sends kongtx's log lines to syslog.

Datagrams are RFC 3164-style: ``<PRI>Mmm dd hh:mm:ss kong[PID]: text`` (plus the
host name when sending over UDP), one datagram per line of text. The tag is ``kong``
so rsyslog's ``$programname`` is ``kong`` (see ``etc/rsyslog.d/kong.conf``).

Severities: Twisted's ``debug``/``info``/``warn``/``error``/``critical`` become syslog
``debug``/``notice``/``warning``/``err``/``crit``. Twisted has no *notice* level, and
kongtx's informational lines (start-up, listeners) are what Kong logs at *notice*,
so ``info`` maps to ``notice``; an event may name its severity explicitly with a
``syslog_severity`` key (a name such as ``"info"`` or a number 0-7).

The observer never blocks the reactor: the socket is non-blocking and a datagram
that cannot be sent right away (``EAGAIN``) is dropped and counted. A missing or
vanished socket never raises into the caller: the observer says so once on stderr,
drops lines, and reconnects lazily.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, TextIO, Tuple

import attr
from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

#: The tag rsyslog sees as ``$programname``.
DEFAULT_IDENT = "kong"
DEFAULT_ADDRESS = "/dev/log"
DEFAULT_FACILITY = "user"

#: Syslog severities by name (RFC 5424 table 2), with common aliases.
SEVERITIES: Dict[str, int] = {
    "emerg": 0,
    "alert": 1,
    "crit": 2,
    "err": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}

#: Syslog facilities by name (RFC 5424 table 1, Linux numbering).
FACILITIES: Dict[str, int] = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    "local0": 16,
    "local1": 17,
    "local2": 18,
    "local3": 19,
    "local4": 20,
    "local5": 21,
    "local6": 22,
    "local7": 23,
}

#: Twisted level -> syslog severity.
LEVEL_SEVERITIES: Dict[Any, int] = {
    LogLevel.debug: 7,
    LogLevel.info: 5,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}

#: Kong's ``log_level`` names -> the least severe syslog severity they let through.
KONG_LOG_LEVELS: Dict[str, int] = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warn": 4,
    "error": 3,
    "crit": 2,
    "alert": 1,
    "emerg": 0,
}

#: Longest datagram sent; longer lines are cut (rsyslog's default maxMessageSize is 8k).
MAX_DATAGRAM = 8192

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

ADDRESS_PROBLEM = "expected an absolute unix socket path or udp:host:port, got '%s'"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SyslogAddress:
    """Where datagrams go: a unix datagram socket ``path`` or a UDP ``host``/``port``."""

    path: Optional[str] = None
    host: Optional[str] = None
    port: int = 514

    @property
    def is_udp(self) -> bool:
        return self.path is None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        host = "[%s]" % (self.host,) if ":" in (self.host or "") else self.host
        return "udp:%s:%d" % (host, self.port)


def parse_address(text: str) -> SyslogAddress:
    """``/dev/log`` or another absolute path, or ``udp:host:port`` (``udp:[::1]:514``).

    Raises ``ValueError`` with the problem."""
    text = text.strip()
    if text.startswith("udp:"):
        rest = text[len("udp:"):]
        if rest.startswith("["):
            host, sep, tail = rest[1:].partition("]")
            if not sep or not tail.startswith(":"):
                raise ValueError(ADDRESS_PROBLEM % (text,))
            port_text = tail[1:]
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep:
                host, port_text = rest, "514"
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(ADDRESS_PROBLEM % (text,))
        return SyslogAddress(host=host, port=int(port_text))
    if not text.startswith("/"):
        raise ValueError(ADDRESS_PROBLEM % (text,))
    return SyslogAddress(path=text)


def severity_of(event: Mapping[str, Any]) -> int:
    """The syslog severity (0-7) of a ``twisted.logger`` event."""
    explicit = event.get("syslog_severity")
    if explicit is not None:
        if isinstance(explicit, int) and 0 <= explicit <= 7:
            return explicit
        named = SEVERITIES.get(str(explicit).lower())
        if named is not None:
            return named
    return LEVEL_SEVERITIES.get(event.get("log_level"), 6)


def event_text(event: Mapping[str, Any]) -> str:
    """The event's text, with the traceback of a ``log.failure`` appended."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text = text + "\n" + failure.getTraceback()
        except Exception:
            pass
    return text


def rfc3164_timestamp(when: float) -> str:
    """``Mmm dd hh:mm:ss`` in local time (the day space-padded, as RFC 3164 says)."""
    t = time.localtime(when)
    return "%s %2d %02d:%02d:%02d" % (_MONTHS[t.tm_mon - 1], t.tm_mday,
                                      t.tm_hour, t.tm_min, t.tm_sec)


def format_datagrams(text: str, *, severity: int, facility: int, when: float,
                     ident: str = DEFAULT_IDENT, pid: Optional[int] = None,
                     hostname: Optional[str] = None) -> List[bytes]:
    """One RFC 3164 datagram per non-empty line of *text*. Pure."""
    tag = ident if pid is None else "%s[%d]" % (ident, pid)
    header = "<%d>%s %s%s: " % (facility * 8 + severity, rfc3164_timestamp(when),
                                "" if hostname is None else hostname + " ", tag)
    head = header.encode("utf-8")
    out = []
    for line in text.rstrip("\n").split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        data = head + line.encode("utf-8", "replace")
        out.append(data[:MAX_DATAGRAM])
    return out


_DROP_ERRNOS = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)


@implementer(ILogObserver)
class SyslogObserver:
    """Send events at or above *min_severity* (a syslog number; 7 lets all through)
    to *address*. Call :meth:`send_line` to send a preformatted line (access logs)."""

    def __init__(self, address: SyslogAddress, facility: int = FACILITIES["user"],
                 *, ident: str = DEFAULT_IDENT, min_severity: int = 7,
                 pid: Optional[int] = None, stderr: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.time,
                 retry_interval: float = 1.0) -> None:
        self.address = address
        self.facility = facility
        self.ident = ident
        self.min_severity = min_severity
        self.pid = os.getpid() if pid is None else pid
        self.hostname = socket.gethostname().split(".")[0] if address.is_udp else None
        self._stderr = stderr
        self._clock = clock
        self._retry_interval = retry_interval
        self._socket: Optional[socket.socket] = None
        self._next_attempt = 0.0
        self._reported = False
        #: Datagrams dropped (socket busy, missing or refused).
        self.dropped = 0
        #: Datagrams sent.
        self.sent = 0

    # -- ILogObserver ----------------------------------------------------------

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            severity = severity_of(event)
            if severity > self.min_severity:
                return
            when = event.get("log_time") or self._clock()
            self._send_all(format_datagrams(
                event_text(event), severity=severity, facility=self.facility, when=when,
                ident=self.ident, pid=self.pid, hostname=self.hostname))
        except Exception:
            # An observer must never raise into the code that logged.
            self.dropped += 1

    def send_line(self, text: str, severity: int = SEVERITIES["notice"]) -> None:
        """Send one preformatted line (not filtered by ``min_severity``)."""
        try:
            self._send_all(format_datagrams(
                text, severity=severity, facility=self.facility, when=self._clock(),
                ident=self.ident, pid=self.pid, hostname=self.hostname))
        except Exception:
            self.dropped += 1

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    # -- the socket --------------------------------------------------------------

    def _send_all(self, datagrams: List[bytes]) -> None:
        for data in datagrams:
            sock = self._socket or self._connect()
            if sock is None:
                self.dropped += 1
                continue
            try:
                sock.send(data)
                self.sent += 1
            except OSError as exc:
                self.dropped += 1
                if exc.errno not in _DROP_ERRNOS:
                    # The socket vanished (rsyslog restarted, ...): reconnect later.
                    self.close()
                    self._next_attempt = self._clock() + self._retry_interval
                    self._report(exc)

    def _connect(self) -> Optional[socket.socket]:
        now = self._clock()
        if now < self._next_attempt:
            return None
        address = self.address
        sock = None
        try:
            if address.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.connect(address.path)
            else:
                family, kind, proto, _, sockaddr = socket.getaddrinfo(
                    address.host, address.port, 0, socket.SOCK_DGRAM,
                    0, socket.AI_NUMERICHOST if _is_numeric(address.host) else 0)[0]
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                sock.connect(sockaddr)
        except OSError as exc:
            if sock is not None:
                sock.close()
            self._next_attempt = now + self._retry_interval
            self._report(exc)
            return None
        self._socket = sock
        if self._reported:
            self._reported = False
            self._write_stderr("kongtx: syslog %s reachable again (%d lines dropped so far)\n"
                               % (address, self.dropped))
        return sock

    def _report(self, exc: OSError) -> None:
        if self._reported:
            return
        self._reported = True
        self._write_stderr("kongtx: syslog %s unavailable (%s); dropping syslog lines "
                           "until it is back\n" % (self.address, exc.strerror or exc))

    def _write_stderr(self, line: str) -> None:
        stream = self._stderr if self._stderr is not None else sys.__stderr__
        try:
            if stream is not None:
                stream.write(line)
                stream.flush()
        except Exception:
            pass


def _is_numeric(host: Optional[str]) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in (host or "") else socket.AF_INET, host or "")
        return True
    except OSError:
        return False


def observer_from_config(config: Any, **kwargs: Any) -> SyslogObserver:
    """The observer described by ``syslog_address``/``syslog_facility``/``log_level``."""
    return SyslogObserver(
        parse_address(config.syslog_address),
        FACILITIES[config.syslog_facility],
        min_severity=KONG_LOG_LEVELS.get(config.log_level, 5),
        **kwargs,
    )


__all__: Tuple[str, ...] = (
    "SyslogAddress", "SyslogObserver", "parse_address", "severity_of", "format_datagrams",
    "observer_from_config", "SEVERITIES", "FACILITIES", "LEVEL_SEVERITIES",
    "KONG_LOG_LEVELS",
)
