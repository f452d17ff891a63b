"""The ``syslog`` plugin: one syslog message per request, Kong's JSON record as body.

Kong 3.10's configuration: ``log_level``, ``successful_severity``,
``client_errors_severity``, ``server_errors_severity`` (each ``info``, one of
the eight syslog severities), ``facility`` (``user``) and
``custom_fields_by_lua`` (accepted, ignored: kongtx runs no Lua).

The severity follows the response status (>= 500: server errors, >= 400: client
errors, else successful); a message is sent only when its severity is at least
as urgent as ``log_level``. Messages go, with the ident ``kong``, to a unix
datagram socket (``/dev/log``) or a UDP address: :data:`SYSLOG_ADDRESS`, which
the node may set from its ``syslog_address`` property with :func:`set_address`
(tests set it to a socket of their own), through a non-blocking socket:
when the syslog daemon is not there or is too slow, the message is dropped and
logged (once until a send succeeds again), never retried on the reactor.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Dict, Optional, Tuple, Union

from twisted.logger import Logger

from kongtx.logging import serializer
from kongtx.plugins.base import ALL_PROTOCOLS, BasePlugin
from kongtx.schema import typedefs as t

__all__ = ["SyslogPlugin", "SYSLOG_ADDRESS", "set_address", "SEVERITIES", "FACILITIES", "format_message"]

#: Where messages are sent: a unix datagram socket path, or ``(ip, port)`` for UDP.
#: The node may set it from its ``syslog_address`` property with :func:`set_address`.
SYSLOG_ADDRESS: Union[str, Tuple[str, int]] = "/dev/log"


def set_address(text: str) -> None:
    """Send to *text*: a socket path or ``udp:ip:port`` (``kong.conf``'s
    ``syslog_address`` syntax; use an IP address: a host name would be resolved
    by a blocking call on every message)."""
    from kongtx.logging.syslog import parse_address

    global SYSLOG_ADDRESS
    parsed = parse_address(text)
    SYSLOG_ADDRESS = parsed.path if parsed.path else (parsed.host, parsed.port)

#: Syslog severities by name (RFC 5424 numbers; lower is more urgent).
SEVERITIES: Dict[str, int] = {
    "emerg": 0, "alert": 1, "crit": 2, "err": 3,
    "warning": 4, "notice": 5, "info": 6, "debug": 7,
}
#: Kong's order of the severity names in its schema.
_SEVERITY_NAMES = ("debug", "info", "notice", "warning", "err", "crit", "alert", "emerg")

FACILITIES: Dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    "local0": 16, "local1": 17, "local2": 18, "local3": 19,
    "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}
_FACILITY_NAMES = ("auth", "authpriv", "cron", "daemon", "ftp", "kern", "lpr", "mail",
                   "news", "syslog", "user", "uucp", "local0", "local1", "local2",
                   "local3", "local4", "local5", "local6", "local7")

IDENT = "kong"
MSG_SEND_FAILED = "could not send to syslog at {address}: {error} (dropping messages)"

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

log = Logger()


def _severity(**kw: Any) -> t.Field:
    return t.string(required=True, default="info", one_of=_SEVERITY_NAMES, **kw)


def format_message(facility: int, severity: int, body: str, wall: float) -> bytes:
    """One datagram as the C library's ``syslog(3)`` sends it to ``/dev/log``:
    ``<PRI>Mmm dd hh:mm:ss kong: body`` (local time)."""
    tm = time.localtime(wall)
    stamp = "%s %2d %02d:%02d:%02d" % (_MONTHS[tm.tm_mon - 1], tm.tm_mday,
                                       tm.tm_hour, tm.tm_min, tm.tm_sec)
    return ("<%d>%s %s: %s" % (facility * 8 + severity, stamp, IDENT, body)).encode("utf-8")


class _Sender:
    """A non-blocking unix datagram socket, reconnected after errors."""

    def __init__(self) -> None:
        self._sock: Optional[socket.socket] = None
        self._family = socket.AF_UNIX
        self._failing = False

    def send(self, address: Any, data: bytes) -> None:
        if isinstance(address, str):
            family = socket.AF_UNIX
        else:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        try:
            if self._sock is not None and family != self._family:
                self._sock.close()
                self._sock = None
            if self._sock is None:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock, self._family = sock, family
            self._sock.sendto(data, address)
            self._failing = False
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warn(MSG_SEND_FAILED, address=address, error=exc)
            sock, self._sock = self._sock, None
            if sock is not None and not isinstance(exc, BlockingIOError):
                sock.close()
            elif sock is not None:
                self._sock = sock


_SENDER = _Sender()


class SyslogPlugin(BasePlugin):
    NAME = "syslog"
    PRIORITY = 4
    VERSION = "3.10.0"
    PROTOCOLS = ALL_PROTOCOLS
    CONFIG = t.record([
        ("log_level", _severity()),
        ("successful_severity", _severity()),
        ("client_errors_severity", _severity()),
        ("server_errors_severity", _severity()),
        ("custom_fields_by_lua", t.map_of(t.string(len_min=1), t.string(len_min=1))),
        ("facility", t.string(required=True, default="user", one_of=_FACILITY_NAMES)),
    ])

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        get = config.get
        self._level = SEVERITIES[get("log_level") or "info"]
        self._severities: Tuple[int, int, int] = (
            SEVERITIES[get("successful_severity") or "info"],
            SEVERITIES[get("client_errors_severity") or "info"],
            SEVERITIES[get("server_errors_severity") or "info"],
        )
        self._facility = FACILITIES[get("facility") or "user"]

    def severity_for(self, status: int) -> int:
        """The severity number of a response with *status*."""
        if status >= 500:
            return self._severities[2]
        if status >= 400:
            return self._severities[1]
        return self._severities[0]

    def header_filter(self, kong: Any) -> None:
        serializer.note_upstream(kong, time.monotonic())

    def log(self, kong: Any) -> None:
        severity = self.severity_for(kong.response.get_status())
        if severity > self._level:
            return
        wall = time.time()
        body = serializer.serialize_json(kong, now=time.monotonic(), wall=wall)
        _SENDER.send(SYSLOG_ADDRESS, format_message(self._facility, severity, body, wall))
