"""The syslog observer: severities, datagram format, and its socket behaviour."""

from __future__ import annotations

import io
import os
import socket
import time
from typing import Any, List

import pytest
from twisted.logger import LogLevel, Logger, LogPublisher

from kongtx.config import ConfigError, load_config
from kongtx.logging.syslog import (
    FACILITIES,
    SyslogAddress,
    SyslogObserver,
    format_datagrams,
    parse_address,
    severity_of,
)

WHEN = time.mktime((2026, 11, 3, 8, 2, 59, 0, 0, -1))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _receiver(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    return sock


def _drain(sock: socket.socket) -> List[bytes]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("event, severity", [
    ({"log_level": LogLevel.debug}, 7),
    ({"log_level": LogLevel.info}, 5),
    ({"log_level": LogLevel.warn}, 4),
    ({"log_level": LogLevel.error}, 3),
    ({"log_level": LogLevel.critical}, 2),
    ({}, 6),
    ({"log_level": LogLevel.info, "syslog_severity": "info"}, 6),
    ({"log_level": LogLevel.info, "syslog_severity": "alert"}, 1),
    ({"log_level": LogLevel.debug, "syslog_severity": 0}, 0),
    ({"log_level": LogLevel.warn, "syslog_severity": "bogus"}, 4),
])
def test_severity_of(event: Any, severity: int) -> None:
    """Twisted levels map to debug/notice/warning/err/crit; an explicit
    ``syslog_severity`` (name or number) wins; a bad one is ignored."""
    assert severity_of(event) == severity


@pytest.mark.parametrize("text, expected", [
    ("/dev/log", SyslogAddress(path="/dev/log")),
    ("/run/x/log.sock", SyslogAddress(path="/run/x/log.sock")),
    ("udp:127.0.0.1:5514", SyslogAddress(host="127.0.0.1", port=5514)),
    ("udp:logs.example.com", SyslogAddress(host="logs.example.com", port=514)),
    ("udp:[::1]:514", SyslogAddress(host="::1", port=514)),
])
def test_parse_address(text: str, expected: SyslogAddress) -> None:
    """syslog_address is an absolute unix socket path or udp:host[:port]."""
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected


@pytest.mark.parametrize("text", ["dev/log", "udp:", "udp:host:99999", "udp:[::1]", "tcp:x:1"])
def test_parse_address_rejects(text: str) -> None:
    """Anything else is refused with the expected forms in the message."""
    with pytest.raises(ValueError, match="expected an absolute unix socket path"):
        parse_address(text)


def test_config_properties() -> None:
    """syslog_address / syslog_facility default to /dev/log and user and are validated."""
    config = load_config(None, {}, "/tmp/kongtx-prefix", search_paths=[])
    assert (config.syslog_address, config.syslog_facility) == ("/dev/log", "user")
    with pytest.raises(ConfigError) as e:
        load_config(None, {"KONG_SYSLOG_ADDRESS": "log.sock"}, "/tmp/p", search_paths=[])
    assert str(e.value).startswith("syslog_address: expected an absolute")
    with pytest.raises(ConfigError) as e:
        load_config(None, {"KONG_SYSLOG_FACILITY": "local9"}, "/tmp/p", search_paths=[])
    assert str(e.value).startswith("syslog_facility: invalid syslog facility 'local9'")


def test_format_datagrams() -> None:
    """RFC 3164: <facility*8+severity>, 'Mmm dd hh:mm:ss' (day space-padded), the
    'kong[pid]:' tag, one datagram per non-empty line; the host name only when asked."""
    out = format_datagrams("hello\nworld\n\n", severity=5, facility=FACILITIES["user"],
                           when=WHEN, pid=42)
    assert out == [b"<13>Nov  3 08:02:59 kong[42]: hello", b"<13>Nov  3 08:02:59 kong[42]: world"]
    out = format_datagrams("x", severity=3, facility=FACILITIES["local0"], when=WHEN,
                           hostname="gw1")
    assert out == [b"<131>Nov  3 08:02:59 gw1 kong: x"]


def test_observer_sends_to_unix_socket(tmp_path: Any) -> None:
    """Events at or above min_severity reach the socket with ident kong and the
    real severity; less severe ones are not sent."""
    path = str(tmp_path / "log.sock")
    receiver = _receiver(path)
    observer = SyslogObserver(SyslogAddress(path=path), FACILITIES["daemon"], min_severity=5,
                              pid=7)
    publisher = LogPublisher(observer)
    logger = Logger(namespace="t", observer=publisher)
    logger.info("started {n}", n=1)
    logger.debug("noise")
    logger.error("broken")
    logger.info("quiet", syslog_severity="info")
    got = _drain(receiver)
    assert len(got) == 2
    assert got[0].startswith(b"<29>") and got[0].endswith(b" kong[7]: started 1")
    assert got[1].startswith(b"<27>") and got[1].endswith(b" kong[7]: broken")
    assert observer.sent == 2 and observer.dropped == 0
    observer.close()
    receiver.close()


def test_failure_traceback_lines(tmp_path: Any) -> None:
    """log.failure (critical) sends the message and each traceback line as crit datagrams."""
    path = str(tmp_path / "log.sock")
    receiver = _receiver(path)
    observer = SyslogObserver(SyslogAddress(path=path), pid=1)
    logger = Logger(observer=observer)
    try:
        1 / 0
    except ZeroDivisionError:
        logger.failure("boom")
    got = _drain(receiver)
    assert got[0].endswith(b"kong[1]: boom") and got[0].startswith(b"<10>")
    assert any(b"ZeroDivisionError" in line for line in got[1:])
    receiver.close()


def test_missing_socket_reports_once_then_reconnects(tmp_path: Any) -> None:
    """No socket: one line on stderr, lines are dropped and counted, nothing raises;
    once the socket exists (and the retry interval passed) lines flow again."""
    path = str(tmp_path / "log.sock")
    stderr = io.StringIO()
    clock = FakeClock()
    observer = SyslogObserver(SyslogAddress(path=path), stderr=stderr, clock=clock, pid=1)
    logger = Logger(observer=observer)
    for _ in range(3):
        logger.warn("lost")
    assert observer.dropped == 3
    assert stderr.getvalue().count("\n") == 1
    assert "syslog %s unavailable" % (path,) in stderr.getvalue()
    receiver = _receiver(path)
    logger.warn("still within the retry interval")
    assert observer.dropped == 4
    clock.now += 1.5
    logger.warn("back")
    assert [d.split(b": ", 1)[1] for d in _drain(receiver)] == [b"back"]
    assert "reachable again" in stderr.getvalue()
    receiver.close()


def test_vanished_socket_never_raises(tmp_path: Any) -> None:
    """The receiver going away (rsyslog restarting) drops lines; a new receiver at
    the same path gets them again without restarting kongtx."""
    path = str(tmp_path / "log.sock")
    clock = FakeClock()
    receiver = _receiver(path)
    observer = SyslogObserver(SyslogAddress(path=path), stderr=io.StringIO(), clock=clock)
    logger = Logger(observer=observer)
    logger.warn("one")
    receiver.close()
    os.unlink(path)
    logger.warn("two")
    assert observer.dropped == 1
    receiver = _receiver(path)
    clock.now += 2
    logger.warn("three")
    assert [d.split(b": ", 1)[1] for d in _drain(receiver)] == [b"three"]
    receiver.close()


def test_full_socket_drops_instead_of_blocking(tmp_path: Any) -> None:
    """A receiver that does not read fills up: further lines are dropped (EAGAIN)
    and counted, and the call returns at once."""
    path = str(tmp_path / "log.sock")
    receiver = _receiver(path)
    observer = SyslogObserver(SyslogAddress(path=path), stderr=io.StringIO(), pid=1)
    logger = Logger(observer=observer)
    for i in range(5000):
        logger.warn("line {i} " + "x" * 200, i=i)
    assert observer.dropped > 0
    assert observer.sent + observer.dropped == 5000
    _drain(receiver)
    logger.warn("after")
    assert observer.sent + observer.dropped == 5001
    receiver.close()


def test_udp_target() -> None:
    """udp:host:port sends the same datagrams, with the host name after the time."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    observer = SyslogObserver(parse_address("udp:127.0.0.1:%d" % port), FACILITIES["local3"],
                              pid=9)
    Logger(observer=observer).critical("down")
    receiver.settimeout(2)
    data = receiver.recv(65536)
    host = socket.gethostname().split(".")[0].encode()
    assert data.startswith(b"<154>")
    assert data.endswith(b" " + host + b" kong[9]: down")
    receiver.close()
    observer.close()
