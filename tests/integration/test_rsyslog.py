"""kongtx's syslog observer against a real rsyslogd running the shipped rule
(etc/rsyslog.d/kong.conf) on a temporary socket: notice and above from `kong`
land in kong.log, debug does not."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.logger import Logger, LogPublisher

from kongtx.logging.syslog import SyslogAddress, SyslogObserver
from tests.integration.conftest import client, start_node, upstream  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_RULE = os.path.join(HERE, os.pardir, os.pardir, "etc", "rsyslog.d", "kong.conf")


def _rsyslogd() -> str:
    path = shutil.which("rsyslogd") or (os.path.exists("/usr/sbin/rsyslogd") and "/usr/sbin/rsyslogd")
    if not path and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "rsyslog"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = shutil.which("rsyslogd") or (os.path.exists("/usr/sbin/rsyslogd") and "/usr/sbin/rsyslogd")
    if not path:
        pytest.fail("rsyslogd is not installed and could not be installed (apt-get install rsyslog)")
    return str(path)


class Rsyslog:
    """rsyslogd in the foreground with the shipped rule on a temporary socket.

    ``severity_log``: kong's messages are also written there as ``<severity> <msg>``
    (a rule placed before the shipped one, which ends with ``stop``)."""

    def __init__(self, root: str) -> None:
        self.severity_log = os.path.join(root, "severity.log")
        self.socket = os.path.join(root, "log.sock")
        self.kong_log = os.path.join(root, "kong.log")
        self.other_log = os.path.join(root, "other.log")
        rule = open(SHIPPED_RULE).read().replace("/var/log/kong.log", self.kong_log)
        assert self.kong_log in rule
        conf = os.path.join(root, "rsyslog.conf")
        with open(conf, "w") as f:
            f.write('global(workDirectory="%s")\n' % (root,))
            f.write('module(load="imuxsock" SysSock.Use="off")\n')
            f.write('input(type="imuxsock" Socket="%s")\n' % (self.socket,))
            f.write('template(name="severity" type="string" '
                    'string="%syslogseverity-text% %msg%\\n")\n')
            f.write("if $programname == 'kong' then action(type=\"omfile\" file=\"%s\" "
                    "template=\"severity\")\n" % (self.severity_log,))
            f.write(rule)
            f.write('\n*.* action(type="omfile" file="%s")\n' % (self.other_log,))
        self.process = subprocess.Popen(
            [_rsyslogd(), "-n", "-f", conf, "-i", os.path.join(root, "rsyslogd.pid")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


async def _until(condition: Any, what: str) -> None:
    from twisted.internet import reactor

    for _ in range(500):
        if condition():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("timed out waiting for " + what)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


@pytest.fixture
def rsyslog(tmp_path: Any) -> Iterator[Rsyslog]:
    root = str(tmp_path / "rsyslog")
    os.makedirs(root)
    daemon = Rsyslog(root)
    yield daemon
    daemon.stop()


@pytest_twisted.ensureDeferred
async def test_notice_lands_in_kong_log_and_debug_does_not(rsyslog: Rsyslog) -> None:
    """Through the observer (ident kong), a notice line is routed to kong.log and
    stops there; a debug line does not reach kong.log (it goes to the catch-all)."""
    await _until(lambda: os.path.exists(rsyslog.socket), "rsyslogd's socket")
    observer = SyslogObserver(SyslogAddress(path=rsyslog.socket), min_severity=7)
    logger = Logger(namespace="kongtx", observer=LogPublisher(observer))
    logger.debug("debug line {n}", n=1)
    logger.info("kongtx listening on 127.0.0.1:{port}", port=8000)
    logger.error("upstream {name} failed", name="s")
    await _until(lambda: "upstream s failed" in _read(rsyslog.kong_log)
                 and "debug line 1" in _read(rsyslog.other_log), "the lines")
    kong_log = _read(rsyslog.kong_log)
    assert " kong[%d]: kongtx listening on 127.0.0.1:8000" % (os.getpid(),) in kong_log
    assert "debug line" not in kong_log
    assert "listening" not in _read(rsyslog.other_log)
    assert observer.dropped == 0
    observer.close()


@pytest_twisted.ensureDeferred
async def test_proxy_access_log_syslog(rsyslog: Rsyslog, tmp_path: Any, upstream: Any,
                                       client: Any) -> None:
    """With proxy_access_log = syslog, a proxied request's access line reaches
    kong.log through the node's syslog observer (syslog_address = the socket)."""
    from twisted.internet import reactor

    await _until(lambda: os.path.exists(rsyslog.socket), "rsyslogd's socket")
    node = await start_node(reactor, str(tmp_path / "prefix"),
                            KONG_PROXY_ACCESS_LOG="syslog", KONG_PROXY_ERROR_LOG="syslog",
                            KONG_ADMIN_ERROR_LOG="syslog", KONG_SYSLOG_ADDRESS=rsyslog.socket)
    try:
        r = await client.request("POST", node.admin + "/services",
                                 json_body={"name": "s", "url": upstream.url})
        assert r.code == 201
        r = await client.request("POST", node.admin + "/services/s/routes",
                                 json_body={"paths": ["/logged"]})
        assert r.code == 201
        for _ in range(100):
            r = await client.request("GET", node.proxy + "/logged/x",
                                     headers={"User-Agent": "rsyslog-test"})
            if r.code == 200:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert r.code == 200
        await _until(lambda: '"GET /logged/x HTTP/1.1" 200' in _read(rsyslog.kong_log),
                     "the access line")
    finally:
        await node.service.stopService()
    line = [x for x in _read(rsyslog.kong_log).splitlines() if "/logged/x" in x][-1]
    assert ' kong[%d]: 127.0.0.1 - - [' % (os.getpid(),) in line
    assert line.endswith('"-" "rsyslog-test" ' + " ".join(line.rsplit(" ", 2)[1:]))
