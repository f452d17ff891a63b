"""Unit tests of the syslog plugin: Kong's config, severity by status, ``log_level``
filtering and the datagram format, sending to a temporary unix datagram socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from typing import Any, Dict, Iterator

import pytest

from kongtx.plugins import syslog
from kongtx.plugins.syslog import SyslogPlugin, format_message
from kongtx.schema import typedefs as t
from tests.plugins.test_serializer import FakeRequest, _kong

CONFIG_DEFAULTS = {
    "log_level": "info", "successful_severity": "info", "client_errors_severity": "info",
    "server_errors_severity": "info", "custom_fields_by_lua": None, "facility": "user",
}


def _config(**changes: Any) -> Dict[str, Any]:
    return dict(CONFIG_DEFAULTS, **changes)


def test_config_defaults_are_kongs() -> None:
    """Kong 3.10's syslog fields, defaults and priority."""
    defaults = {name: (f.default if f.has_default else None)
                for name, f in SyslogPlugin.CONFIG.fields}
    assert defaults == CONFIG_DEFAULTS
    assert (SyslogPlugin.NAME, SyslogPlugin.PRIORITY) == ("syslog", 4)


@pytest.mark.parametrize("config,errors", [
    (_config(), {}),
    (_config(log_level="loud"),
     {"log_level": "expected one of: debug, info, notice, warning, err, crit, alert, emerg"}),
    (_config(facility="local7"), {}),
    (_config(facility="nope"), {"facility": "expected one of: auth, authpriv, cron, daemon, "
                                "ftp, kern, lpr, mail, news, syslog, user, uucp, local0, "
                                "local1, local2, local3, local4, local5, local6, local7"}),
])
def test_config_validation(config: Dict[str, Any], errors: Dict[str, str]) -> None:
    """Severities and facilities are Kong's lists."""
    config = {k: v for k, v in config.items() if v is not None}
    assert t.validate_record(SyslogPlugin.CONFIG, config) == errors


@pytest.mark.parametrize("status,severity", [
    (200, 5), (302, 5), (399, 5), (400, 4), (404, 4), (499, 4), (500, 3), (503, 3),
])
def test_severity_follows_status(status: int, severity: int) -> None:
    """>= 500 server errors, >= 400 client errors, else successful."""
    plugin = SyslogPlugin(_config(successful_severity="notice",
                                  client_errors_severity="warning",
                                  server_errors_severity="err"))
    assert plugin.severity_for(status) == severity


def test_format_message() -> None:
    """``<PRI>Mmm dd hh:mm:ss kong: body``, PRI = facility * 8 + severity."""
    data = format_message(16, 6, '{"a":1}', 0.0)
    text = data.decode()
    assert text.startswith("<134>")
    assert text.endswith(' kong: {"a":1}')
    assert len(text.split(" kong: ")[0]) == len("<134>Jan  1 00:00:00")


@pytest.fixture
def receiver(monkeypatch: Any) -> Iterator[socket.socket]:
    tmp = tempfile.mkdtemp(prefix="kongtx-syslog-", dir="/tmp")
    path = os.path.join(tmp, "log.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setattr(syslog, "SYSLOG_ADDRESS", path)
    yield sock
    sock.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _received(sock: socket.socket) -> list:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("log_level,status,sent", [
    ("info", 200, True),
    ("notice", 200, False),   # info (6) is less urgent than notice (5)
    ("err", 500, True),       # server errors at err (3)
    ("crit", 500, False),
    ("debug", 404, True),
])
def test_log_level_filters(receiver: socket.socket, log_level: str, status: int,
                           sent: bool) -> None:
    """A message is sent only when its severity is at least as urgent as ``log_level``;
    its body is the JSON record."""
    plugin = SyslogPlugin(_config(log_level=log_level, server_errors_severity="err"))
    request = FakeRequest()
    request.code = status
    plugin.log(_kong(request))
    got = _received(receiver)
    assert len(got) == (1 if sent else 0)
    if sent:
        record = json.loads(got[0].decode().split(" kong: ", 1)[1])
        assert record["response"]["status"] == status


def test_missing_socket_never_raises(monkeypatch: Any, tmp_path: Any) -> None:
    """With no syslog daemon at the address, the message is dropped, nothing raises."""
    monkeypatch.setattr(syslog, "SYSLOG_ADDRESS", str(tmp_path / "absent.sock"))
    SyslogPlugin(_config()).log(_kong(FakeRequest()))


def test_set_address_accepts_kong_conf_syntax(monkeypatch: Any) -> None:
    """``set_address`` takes ``syslog_address``: a path, or ``udp:ip:port``."""
    monkeypatch.setattr(syslog, "SYSLOG_ADDRESS", syslog.SYSLOG_ADDRESS)
    syslog.set_address("udp:127.0.0.1:5514")
    assert syslog.SYSLOG_ADDRESS == ("127.0.0.1", 5514)
    syslog.set_address("/run/log.sock")
    assert syslog.SYSLOG_ADDRESS == "/run/log.sock"
