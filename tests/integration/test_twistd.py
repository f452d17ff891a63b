"""Start-up as a user runs it: ``twistd kongtx`` in a child process, real ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.integration.processes import free_port, kong_env as _env, twistd as _twistd


def _wait_for(url: str, timeout: float = 30.0, context=None) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            return e.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Running:
    def __init__(self, tmp_path, *extra_args: str, daemon: bool = False, **env: str):
        self.proxy_port = free_port()
        self.tls_port = free_port()
        self.admin_port = free_port()
        self.prefix = str(tmp_path / "prefix")
        settings = {
            "KONG_PROXY_LISTEN": "127.0.0.1:%d, 127.0.0.1:%d ssl" % (self.proxy_port,
                                                                   self.tls_port),
            "KONG_ADMIN_LISTEN": "127.0.0.1:%d" % self.admin_port,
        }
        settings.update(env)
        environ = _env(**settings)
        self.pidfile = str(tmp_path / "twistd.pid")
        args = ["--pidfile", self.pidfile]
        if not daemon:
            args.insert(0, "-n")
        else:
            args += ["--logfile", str(tmp_path / "twistd.log")]
        self.proc = subprocess.Popen(
            _twistd(*args, "kongtx", "--prefix", self.prefix, *extra_args),
            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path),
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def test_twistd_lists_the_plugin():
    """``twistd --help`` lists kongtx (the plugin is found from the checkout)."""
    out = subprocess.run(_twistd("--help"), env=_env(), capture_output=True, text=True)
    assert "kongtx" in out.stdout


def test_foreground_start_serves_admin_and_proxy_and_reuses_certificate(tmp_path):
    """``twistd -n kongtx`` serves the Admin API and the proxy (HTTP and TLS); the
    self-signed certificate generated on first start is reused on the next."""
    node = Running(tmp_path)
    try:
        body = json.loads(_wait_for("http://127.0.0.1:%d/" % node.admin_port))
        assert body["tagline"] == "Welcome to kong"
        raw = _wait_for("http://127.0.0.1:%d/nothing" % node.proxy_port)
        assert json.loads(raw)["message"] == "no Route matched with those values"
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        raw = _wait_for("https://127.0.0.1:%d/nothing" % node.tls_port, context=insecure)
        assert json.loads(raw)["message"] == "no Route matched with those values"
    finally:
        node.stop()
    cert = os.path.join(node.prefix, "ssl", "kong-default.crt")
    assert os.path.exists(cert)
    first = open(cert, "rb").read()
    again = Running(tmp_path)
    try:
        _wait_for("http://127.0.0.1:%d/" % again.admin_port)
    finally:
        again.stop()
    assert open(cert, "rb").read() == first


def test_daemonised_start_writes_pidfile(tmp_path):
    """``twistd kongtx`` daemonises, writes its pidfile and serves."""
    node = Running(tmp_path, daemon=True)
    try:
        assert node.proc.wait(30) == 0
        _wait_for("http://127.0.0.1:%d/" % node.admin_port)
        pid = int(open(node.pidfile).read())
        os.kill(pid, 0)
    finally:
        if os.path.exists(node.pidfile):
            pid = int(open(node.pidfile).read())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        node.stop()


@pytest.mark.parametrize(
    "env, prop",
    [
        ({"KONG_PROXY_LISTEN": "0.0.0.0:99999"}, "proxy_listen"),
        ({"KONG_DATABASE": "mongodb"}, "database"),
        ({"KONG_SSL_CERT": "/nonexistent.crt", "KONG_SSL_CERT_KEY": "/nonexistent.key"},
         "ssl_cert"),
    ],
)
def test_bad_value_stops_startup_with_one_line(tmp_path, env, prop):
    """A wrong value stops start-up with one line naming the property, no traceback."""
    proc = subprocess.run(
        _twistd("-n", "--pidfile=", "kongtx", "--prefix", str(tmp_path / "p")),
        env=_env(**env), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert prop in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_port_in_use_stops_startup_with_one_line(tmp_path):
    """A listener that cannot be bound names the property and the address."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run(
            _twistd("-n", "--pidfile=", "kongtx", "--prefix", str(tmp_path / "p")),
            env=_env(KONG_PROXY_LISTEN="127.0.0.1:%d" % port,
                     KONG_ADMIN_LISTEN="127.0.0.1:%d" % free_port()),
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode != 0
    assert "proxy_listen" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback on this machine")
def test_ipv6_listener(tmp_path):
    """An IPv6 listen address in Kong's bracket syntax works."""
    port = free_port(socket.AF_INET6, "::1")
    node = Running(tmp_path, KONG_PROXY_LISTEN="[::1]:%d" % port)
    try:
        raw = _wait_for("http://[::1]:%d/nothing" % port)
        assert json.loads(raw)["message"] == "no Route matched with those values"
    finally:
        node.stop()
