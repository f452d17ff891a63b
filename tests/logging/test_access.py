"""Access lines, the buffered file writer, error log lines, and reopening logs
(SIGUSR1 and ``kongtx reopen-logs``) after a real rename."""

from __future__ import annotations

import io
import os
import signal
import time
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, Logger, LogPublisher

from kongtx import cli
from kongtx.config import load_config
from kongtx.logging.access import FileLogWriter, escape, format_line, time_local
from kongtx.logging.setup import (
    ErrorLogObserver,
    LogService,
    LogTarget,
    format_error_line,
    parse_target,
)
from tests.integration.conftest import client, upstream  # noqa: F401 (fixtures)

WHEN = time.mktime((2026, 11, 3, 8, 2, 59, 0, 0, -1))


def _offset() -> str:
    minutes = time.localtime(WHEN).tm_gmtoff // 60
    return "%s%02d%02d" % ("+" if minutes >= 0 else "-", abs(minutes) // 60, abs(minutes) % 60)


@pytest.mark.parametrize("value, expected", [
    (b"curl/8", "curl/8"),
    (b"Mozilla/5.0 (X11; Linux) ~!@#$%^&*()_+{}|:<>?", "Mozilla/5.0 (X11; Linux) ~!@#$%^&*()_+{}|:<>?"),
    (b"", ""),
    (b'say "hi"', "say \\x22hi\\x22"),
    (b"back\\slash", "back\\x5Cslash"),
    (b"tab\there\x7f", "tab\\x09here\\x7F"),
    ("caf\u00e9", "caf\\xC3\\xA9"),
    (None, "-"),
])
def test_escape(value: Any, expected: str) -> None:
    """Values are escaped as nginx does: quote, backslash, controls and non-ASCII as \\xHH."""
    assert escape(value) == expected


def test_format_line() -> None:
    """Combined log format followed by request time and upstream latency in seconds."""
    line = format_line(remote_addr="127.0.0.1", remote_user=None, when=WHEN, method=b"GET",
                       uri=b"/", protocol=b"HTTP/1.1", status=200, sent=90, referer=None,
                       user_agent=b"curl/8", request_time=0.0012, upstream_latency=0.004)
    assert line == ('127.0.0.1 - - [03/Nov/2026:08:02:59 %s] "GET / HTTP/1.1" 200 90 "-" '
                    '"curl/8" 0.001 0.004' % (_offset(),))
    line = format_line(remote_addr="::1", remote_user=None, when=WHEN, method=b"POST",
                       uri=b"/a?b=c", protocol=b"HTTP/1.0", status=404, sent=0,
                       referer=b"http://x/", user_agent=None, request_time=None,
                       upstream_latency=None)
    assert line.endswith('"POST /a?b=c HTTP/1.0" 404 0 "http://x/" "-" - -')
    assert time_local(WHEN) == "03/Nov/2026:08:02:59 " + _offset()


def test_time_local_within_and_across_seconds() -> None:
    """Times within one second share its text; the next second (and going back) is
    formatted anew."""
    assert time_local(WHEN + 0.25) == time_local(WHEN + 0.75) == time_local(WHEN)
    assert time_local(WHEN + 1) == "03/Nov/2026:08:03:00 " + _offset()
    assert time_local(WHEN - 1) == "03/Nov/2026:08:02:58 " + _offset()
    assert time_local(WHEN + 1.5) == "03/Nov/2026:08:03:00 " + _offset()


@pytest.mark.parametrize("value, target", [
    ("off", LogTarget("off")),
    ("syslog", LogTarget("syslog")),
    ("/dev/stdout", LogTarget("file", "/dev/stdout")),
    ("/dev/stderr", LogTarget("file", "/dev/stderr")),
    ("logs/access.log", LogTarget("file", "/p/logs/access.log")),
    ("/var/log/kongtx/access.log", LogTarget("file", "/var/log/kongtx/access.log")),
])
def test_parse_target(value: str, target: LogTarget) -> None:
    """A log property names a file (relative to the prefix), a standard stream, syslog or off."""
    assert parse_target(value, "/p") == target


def test_writer_buffers_until_timer(tmp_path: Any) -> None:
    """Lines reach the file on the short flush timer, not during the request."""
    path = str(tmp_path / "access.log")
    clock = MemoryReactorClock()
    writer = FileLogWriter(path, clock, flush_delay=0.1)
    writer.write("one")
    writer.write("two")
    assert not os.path.exists(path) or open(path).read() == ""
    clock.advance(0.1)
    assert open(path).read() == "one\ntwo\n"
    writer.write("three")
    writer.close()
    assert open(path).read() == "one\ntwo\nthree\n"


def test_writer_flushes_large_buffer_at_once(tmp_path: Any) -> None:
    """More than max_buffered bytes waiting are written without waiting for the timer."""
    path = str(tmp_path / "access.log")
    writer = FileLogWriter(path, MemoryReactorClock(), max_buffered=100)
    for _ in range(11):
        writer.write("x" * 9)
    assert open(path).read() == ("x" * 9 + "\n") * 10
    writer.close()
    assert open(path).read() == ("x" * 9 + "\n") * 11


def test_writer_full_disk_reports_once_and_drops() -> None:
    """ENOSPC (/dev/full) is reported once, lines are dropped and counted, nothing raises."""
    reports: List[Any] = []
    writer = FileLogWriter("/dev/full", MemoryReactorClock(),
                           report=lambda path, error: reports.append((path, error)))
    for _ in range(3):
        writer.write("line")
        writer.flush()
    assert writer.dropped == 3
    assert reports == [("/dev/full", os.strerror(28))]
    writer.close()


def test_writer_reopen_after_rename(tmp_path: Any) -> None:
    """After logrotate renames the file, reopen() makes new lines go to a new file."""
    path = str(tmp_path / "access.log")
    writer = FileLogWriter(path, MemoryReactorClock())
    writer.write("before")
    writer.flush()
    os.rename(path, path + ".1")
    writer.write("still old")
    writer.reopen()
    writer.write("after")
    writer.close()
    assert open(path + ".1").read() == "before\nstill old\n"
    assert open(path).read() == "after\n"


def test_error_log_lines_and_level_filter(tmp_path: Any) -> None:
    """Error log lines use nginx's layout and log_level filters them (info counts as notice)."""
    assert format_error_line({"log_level": LogLevel.warn, "log_format": "x {a}", "a": 1,
                              "log_time": WHEN}, 12) == (4, "2026/11/03 08:02:59 [warn] 12#0: x 1")
    path = str(tmp_path / "error.log")
    writer = FileLogWriter(path, MemoryReactorClock())
    logger = Logger(observer=LogPublisher(ErrorLogObserver(writer, 5, pid=3)))
    logger.debug("hidden")
    logger.info("listening")
    logger.info("detail", syslog_severity="info")
    logger.error("bad")
    writer.close()
    lines = open(path).read().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == ["[notice] 3#0: listening",
                                                          "[error] 3#0: bad"]


def _config(prefix: str, **env: str) -> Any:
    environ = {"KONG_PROXY_ACCESS_LOG": "logs/access.log", "KONG_LOG_LEVEL": "info"}
    environ.update(env)
    return load_config(None, environ, prefix, search_paths=[])


@pytest_twisted.ensureDeferred
async def test_sigusr1_and_cli_reopen_after_rename(tmp_path: Any) -> None:
    """The running service writes pids/kongtx.pid; SIGUSR1 (sent by `kongtx reopen-logs
    -p PREFIX`) reopens the files after a rename, and chains to the previous handler."""
    from twisted.internet import reactor

    prefix = str(tmp_path / "prefix")
    config = _config(prefix)
    chained: List[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: chained.append(signum))
    logs = LogService(config, reactor, publisher=LogPublisher())
    try:
        writer = logs._writer(config.prefix_path("logs/access.log"))
        os.makedirs(config.prefix_path("logs"))
        logs.startService()
        assert logs._signal_installed
        assert open(config.prefix_path("pids/kongtx.pid")).read() == "%d\n" % os.getpid()
        writer.write("before")
        writer.flush()
        os.rename(writer.path, writer.path + ".1")
        out, err = io.StringIO(), io.StringIO()
        args = cli.build_parser().parse_args(["reopen-logs", "-p", prefix])
        assert args.run(args, out, err) == 0, err.getvalue()
        assert out.getvalue() == "Log files reopened (signalled process %d)\n" % os.getpid()
        for _ in range(100):
            if logs.reopened:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert logs.reopened == 1
        assert chained == [signal.SIGUSR1]
        writer.write("after")
        writer.flush()
        assert open(writer.path + ".1").read() == "before\n"
        assert open(writer.path).read() == "after\n"
    finally:
        logs.stopService()
        signal.signal(signal.SIGUSR1, previous)
    assert not os.path.exists(config.prefix_path("pids/kongtx.pid"))


def test_cli_reopen_without_node(tmp_path: Any) -> None:
    """No pid file (or a stale one): one line and exit status 1."""
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(["reopen-logs", "-p", str(tmp_path)])
    assert args.run(args, out, err) == 1
    assert err.getvalue().startswith("Error: kongtx is not running in %s" % (tmp_path,))
    os.makedirs(str(tmp_path / "pids"))
    with open(str(tmp_path / "pids" / "kongtx.pid"), "w") as f:
        f.write("999999999\n")
    err = io.StringIO()
    assert args.run(args, out, err) == 1
    assert "stale" in err.getvalue()


@pytest_twisted.ensureDeferred
async def test_proxied_request_access_and_error_log(tmp_path: Any, upstream: Any,
                                                    client: Any) -> None:
    """A proxied request writes one combined-format line with latencies to
    proxy_access_log; the node's own start-up lines reach proxy_error_log."""
    from twisted.internet import reactor

    from tests.integration.conftest import start_node

    prefix = str(tmp_path / "prefix")
    node = await start_node(reactor, prefix, KONG_PROXY_ACCESS_LOG="logs/access.log",
                            KONG_ADMIN_ACCESS_LOG="logs/admin_access.log")
    try:
        r = await client.request("POST", node.admin + "/services",
                                 json_body={"name": "s", "url": upstream.url})
        assert r.code == 201
        r = await client.request("POST", node.admin + "/services/s/routes",
                                 json_body={"paths": ["/echo"]})
        assert r.code == 201
        for _ in range(100):
            r = await client.request("GET", node.proxy + "/echo/x",
                                     headers={"User-Agent": "curl/8"})
            if r.code == 200:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert r.code == 200
    finally:
        await node.service.stopService()
    lines = open(os.path.join(prefix, "logs", "access.log")).read().splitlines()
    last = lines[-1]
    assert last.startswith("127.0.0.1 - - [")
    assert '"GET /echo/x HTTP/1.1" 200 %d "-" "curl/8" ' % (len(r.body),) in last
    request_time, upstream_latency = last.rsplit(" ", 2)[1:]
    assert float(request_time) >= 0 and float(upstream_latency) >= 0
    admin_lines = open(os.path.join(prefix, "logs", "admin_access.log")).read()
    assert '"POST /services HTTP/1.1" 201 ' in admin_lines
    error_log = open(os.path.join(prefix, "logs", "error.log")).read()
    assert "[notice]" in error_log and "listening on 127.0.0.1:" in error_log
