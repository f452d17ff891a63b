"""``twistd kongtx`` with several worker processes, run as a user runs it.

A master process serves the Admin API and binds the proxy's sockets; the
workers serve the proxy. These tests pin what an operator relies on: every
worker serves a change as soon as the Admin API answers, ``local`` rate
limits count per node, a crashed worker comes back, SIGTERM lets in-flight
requests finish, and ``kongtx reload`` applies a changed kong.conf without a
single failed request.

The tests are blocking (threads and ``http.client``), so the upstream runs in
a thread of its own rather than on the test's reactor.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from tests.integration.processes import NodeProcess, kong_env


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.startswith("/delay/"):
            time.sleep(float(self.path.split("/")[2]))
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def thread_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "http://127.0.0.1:%d" % server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _request(base: str, method: str, path: str, form: Optional[Dict[str, str]] = None,
             headers: Optional[Dict[str, str]] = None, timeout: float = 10.0,
             ) -> Tuple[int, Dict[str, str], bytes]:
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        body = None
        sent = dict(headers or {})
        if form is not None:
            from urllib.parse import urlencode

            body = urlencode(form)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def _wait_for(check, timeout: float = 30.0, what: str = "condition", node=None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            detail = ("\n" + node.output()) if node is not None else ""
            raise AssertionError("%s not met within %.0f s%s" % (what, timeout, detail))
        time.sleep(0.05)


def _children(pid: int) -> List[int]:
    """The pids of *pid*'s child processes that run kongtx workers."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"kongtx.workers.main" in cmdline:
            found.append(int(entry))
    return sorted(found)


def _start(tmp_path, upstream: str, **env: str) -> NodeProcess:
    node = NodeProcess(str(tmp_path / "p"), **env)
    _wait_for(lambda: _request(node.admin, "GET", "/")[0] == 200, what="admin up", node=node)
    status, _, body = _request(node.admin, "POST", "/services",
                               {"name": "echo", "url": upstream})
    assert status == 201, body
    status, _, body = _request(node.admin, "POST", "/services/echo/routes",
                               {"name": "r", "paths[]": "/echo"})
    assert status == 201, body
    return node


def _kongtx_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kongtx.cli", *args], env=kong_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)


def test_every_worker_serves_a_change_and_a_crashed_worker_comes_back(tmp_path, thread_upstream):
    """With two workers, a route is served on every new connection as soon as the
    Admin API has answered; a worker killed with SIGKILL is logged and replaced,
    and the proxy keeps answering."""
    node = _start(tmp_path, thread_upstream, KONG_NGINX_WORKER_PROCESSES="2")
    try:
        workers = _wait_for(lambda: len(_children(node.proc.pid)) == 2 and _children(node.proc.pid),
                            what="two workers", node=node)
        # A new route, then at once 40 new connections (spread over both workers).
        status, _, body = _request(node.admin, "POST", "/services/echo/routes",
                                   {"name": "fresh", "paths[]": "/fresh"})
        assert status == 201, body
        statuses = [_request(node.proxy, "GET", "/fresh")[0] for _ in range(40)]
        assert statuses == [200] * 40

        os.kill(workers[0], signal.SIGKILL)
        replaced = _wait_for(
            lambda: (lambda now: len(now) == 2 and workers[0] not in now and now)(
                _children(node.proc.pid)),
            what="a replacement worker", node=node)
        assert workers[1] in replaced
        _wait_for(lambda: "exited unexpectedly" in node.output(), what="the crash logged",
                  node=node)
        assert "(pid %d) exited unexpectedly (signal 9); restarting it" % workers[0] \
            in node.output()
        statuses = [_request(node.proxy, "GET", "/echo")[0] for _ in range(40)]
        assert statuses == [200] * 40
        # Workers report their counters every STATS_INTERVAL; the killed worker's are
        # gone with it, so the 40 requests since show up within a report or two.
        _wait_for(lambda: json.loads(_request(node.admin, "GET", "/status")[2])
                  ["server"]["total_requests"] >= 40,
                  what="/status counting the 40 requests", node=node)
    finally:
        node.stop()


def test_local_rate_limiting_counts_per_node_across_workers(tmp_path, thread_upstream):
    """``policy=local`` with ``minute=50`` lets exactly 50 of 200 concurrent requests
    through, whichever of the three workers serves them."""
    node = _start(tmp_path, thread_upstream, KONG_NGINX_WORKER_PROCESSES="3")
    try:
        _wait_for(lambda: len(_children(node.proc.pid)) == 3, what="three workers", node=node)
        status, _, body = _request(node.admin, "POST", "/routes/r/plugins",
                                   {"name": "rate-limiting", "config.minute": "50",
                                    "config.policy": "local"})
        assert status == 201, body
        if time.time() % 60 > 50:  # keep all 200 requests in one minute window
            time.sleep(61 - time.time() % 60)
        results: List[int] = []
        lock = threading.Lock()

        def send(count: int) -> None:
            for _ in range(count):
                code = _request(node.proxy, "GET", "/echo")[0]
                with lock:
                    results.append(code)

        threads = [threading.Thread(target=send, args=(10,)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(200) == 50
        assert results.count(429) == 150
    finally:
        node.stop()


def test_sigterm_lets_in_flight_requests_finish(tmp_path, thread_upstream):
    """SIGTERM while a request waits 1.5 s on its upstream: the client still gets its
    200, new connections are refused, and the node exits cleanly."""
    node = _start(tmp_path, thread_upstream, KONG_NGINX_WORKER_PROCESSES="2")
    try:
        _wait_for(lambda: len(_children(node.proc.pid)) == 2, what="two workers", node=node)
        outcome: Dict[str, object] = {}

        def slow() -> None:
            try:
                outcome["status"] = _request(node.proxy, "GET", "/echo/delay/1.5")[0]
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = repr(exc)

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.5)
        node.proc.send_signal(signal.SIGTERM)
        t.join(15)
        assert outcome == {"status": 200}, node.output()
        # twistd ends by re-raising the signal it stopped for.
        assert node.proc.wait(20) in (0, -signal.SIGTERM)
        with pytest.raises(OSError):
            _request(node.proxy, "GET", "/echo", timeout=2)
    finally:
        node.stop()


def test_reload_applies_a_changed_conf_without_dropping_a_request(tmp_path, thread_upstream):
    """Under steady keep-alive load, ``kongtx reload`` after editing kong.conf
    (``headers = off``, three workers instead of two) switches to new workers
    running it; not one request fails. ``kongtx quit`` then stops the node."""
    conf = tmp_path / "kong.conf"
    conf.write_text("nginx_worker_processes = 2\n")
    prefix = str(tmp_path / "p")
    node = NodeProcess(prefix, conf=str(conf))
    try:
        _wait_for(lambda: _request(node.admin, "GET", "/")[0] == 200, what="admin up", node=node)
        _request(node.admin, "POST", "/services", {"name": "echo", "url": thread_upstream})
        _request(node.admin, "POST", "/services/echo/routes", {"name": "r", "paths[]": "/echo"})
        old = _wait_for(lambda: len(_children(node.proc.pid)) == 2 and _children(node.proc.pid),
                        what="two workers", node=node)
        status, headers, _ = _request(node.proxy, "GET", "/echo")
        assert status == 200 and "via" in headers

        stop = threading.Event()
        counts = {"ok": 0, "failed": 0, "no_via": 0}
        errors: List[str] = []
        lock = threading.Lock()
        host, port = node.proxy.split("//")[1].split(":")

        def load() -> None:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            while not stop.is_set():
                try:
                    conn.request("GET", "/echo")
                    response = conn.getresponse()
                    response.read()
                    with lock:
                        if response.status == 200:
                            counts["ok"] += 1
                            if response.getheader("via") is None:
                                counts["no_via"] += 1
                        else:
                            counts["failed"] += 1
                            errors.append("status %d" % response.status)
                    if response.getheader("connection", "").lower() == "close":
                        conn.close()
                except Exception as exc:
                    with lock:
                        counts["failed"] += 1
                        errors.append(repr(exc))
                    conn.close()
            conn.close()

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        conf.write_text("nginx_worker_processes = 3\nheaders = off\n")
        result = _kongtx_cli("reload", "--conf", str(conf), "--prefix", prefix)
        assert result.returncode == 0, result.stdout
        assert b"kongtx reloaded" in result.stdout
        new = _wait_for(
            lambda: (lambda now: len(now) == 3 and not set(old) & set(now) and now)(
                _children(node.proc.pid)),
            timeout=30, what="three new workers", node=node)
        _wait_for(lambda: counts["no_via"] > 100, what="responses without Via", node=node)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(15)
        assert counts["failed"] == 0, errors[:5]
        assert counts["ok"] > 200
        assert len(new) == 3
        assert "reload: done" in node.output()

        result = _kongtx_cli("quit", "--prefix", prefix)
        assert result.returncode == 0, (result.stdout, node.output())
        assert b"kongtx stopped (gracefully)" in result.stdout
        assert node.proc.wait(5) == 0
        assert _children(node.proc.pid) == []
    finally:
        node.stop()


def test_reopen_logs_reaches_every_worker(tmp_path, thread_upstream):
    """After logrotate renames the access log, ``kongtx reopen-logs`` makes every
    worker write to a new file: no line goes on landing in the renamed one."""
    node = _start(tmp_path, thread_upstream, KONG_NGINX_WORKER_PROCESSES="2",
                  KONG_PROXY_ACCESS_LOG="logs/access.log")
    prefix = str(tmp_path / "p")
    log = os.path.join(prefix, "logs", "access.log")
    try:
        _wait_for(lambda: len(_children(node.proc.pid)) == 2, what="two workers", node=node)
        for _ in range(20):
            assert _request(node.proxy, "GET", "/echo")[0] == 200
        _wait_for(lambda: os.path.exists(log) and open(log).read().count("\n") >= 20,
                  what="20 access lines", node=node)
        os.rename(log, log + ".1")
        result = _kongtx_cli("reopen-logs", "--prefix", prefix)
        assert result.returncode == 0, result.stdout
        _wait_for(lambda: node.output().count("log files reopened") >= 3,
                  what="the master and both workers reopening", node=node)
        for _ in range(20):
            assert _request(node.proxy, "GET", "/echo")[0] == 200
        _wait_for(lambda: os.path.exists(log) and open(log).read().count("\n") >= 20,
                  what="20 lines in the new file", node=node)
        time.sleep(1.5)  # the writers flush at least once a second
        with open(log + ".1") as f:
            assert f.read().count("\n") == 20
    finally:
        node.stop()
