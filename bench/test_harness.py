"""Tests of the benchmark harness: its pure pieces table-driven, then one real short run.

Run with ``.venv/bin/python -m pytest bench/test_harness.py -q``. The real run needs
nginx and wrk (``bench/run`` installs them as root) and is skipped without them.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import Measurement, WrkParseError, WrkResult  # noqa: E402

WRK_OK = """\
Running 3s test @ http://127.0.0.1:8080/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   621.45us  235.20us   6.79ms   86.71%
    Req/Sec    40.58k     3.32k   45.69k    71.67%
  Latency Distribution
     50%  575.00us
     75%  703.00us
     90%    0.88ms
     99%    1.48ms
  242280 requests in 3.00s, 36.05MB read
Requests/sec:  80746.21
Transfer/sec:     12.01MB
"""

# Real output of wrk 4.1.0 against an nginx answering 503.
WRK_503 = """\
Running 1s test @ http://127.0.0.1:18555/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   604.64us  683.16us   5.41ms   91.22%
    Req/Sec    49.16k    26.95k  140.78k    95.24%
  Latency Distribution
     50%  505.00us
     75%  752.00us
     90%    1.11ms
     99%    3.62ms
  102792 requests in 1.10s, 27.94MB read
  Non-2xx or 3xx responses: 102792
Requests/sec:  93446.76
Transfer/sec:     25.40MB
"""

WRK_SOCKET_ERRORS = """\
Running 10s test @ http://127.0.0.1:8002/
  2 threads and 50 connections
  Latency Distribution
     50%   12.85ms
     75%   15.10ms
     90%   20.00ms
     99%    1.20s
  11185 requests in 10.00s, 2.05MB read
  Socket errors: connect 3, read 7, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:   1118.50
Transfer/sec:    209.71KB
"""


@pytest.mark.parametrize(
    "text, ms",
    [
        ("575.00us", 0.575),
        ("1.48ms", 1.48),
        ("2.00s", 2000.0),
        ("1.50m", 90_000.0),
        ("1.00h", 3_600_000.0),
        ("  12ms ", 12.0),
    ],
)
def test_duration_to_ms(text: str, ms: float) -> None:
    """wrk's us/ms/s/m/h durations convert to milliseconds."""
    assert harness.duration_to_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "12", "1.5 parsecs", "-1ms", "ms"])
def test_duration_to_ms_rejects(text: str) -> None:
    """Anything that is not a wrk duration is a parse error, not a wrong number."""
    with pytest.raises(WrkParseError):
        harness.duration_to_ms(text)


@pytest.mark.parametrize(
    "output, expected",
    [
        (
            WRK_OK,
            WrkResult(80746.21, 0.575, 1.48, 242280),
        ),
        (
            WRK_503,
            WrkResult(93446.76, 0.505, 3.62, 102792, non_2xx=102792),
        ),
        (
            WRK_SOCKET_ERRORS,
            WrkResult(
                1118.5, 12.85, 1200.0, 11185,
                non_2xx=5, connect_errors=3, read_errors=7, write_errors=0, timeouts=12,
            ),
        ),
    ],
)
def test_parse_wrk(output: str, expected: WrkResult) -> None:
    """Requests/sec, the 50%/99% lines and the error counts are read from wrk --latency."""
    result = harness.parse_wrk(output)
    assert result.requests_per_sec == pytest.approx(expected.requests_per_sec)
    assert result.p50_ms == pytest.approx(expected.p50_ms)
    assert result.p99_ms == pytest.approx(expected.p99_ms)
    assert result.requests == expected.requests
    assert result.non_2xx == expected.non_2xx
    assert result.socket_errors == expected.socket_errors
    assert result.errors == expected.non_2xx + expected.socket_errors


@pytest.mark.parametrize(
    "output, problem",
    [
        ("unable to connect to 127.0.0.1:1 Connection refused", "Requests/sec"),
        (WRK_OK.replace("     99%    1.48ms\n", ""), "Latency Distribution"),
        ("Requests/sec:  10.00\n", "Latency Distribution"),
    ],
)
def test_parse_wrk_rejects(output: str, problem: str) -> None:
    """Output without the needed lines is an error that names what is missing."""
    with pytest.raises(WrkParseError, match=problem):
        harness.parse_wrk(output)


@pytest.mark.parametrize(
    "threads, connections, duration, latency, expected",
    [
        (2, 50, 10, True, ["wrk", "-t2", "-c50", "-d10s", "--latency", "http://127.0.0.1:9/"]),
        (1, 8, 2, False, ["wrk", "-t1", "-c8", "-d2s", "http://127.0.0.1:9/"]),
    ],
)
def test_wrk_command(threads: int, connections: int, duration: int, latency: bool, expected: list) -> None:
    """wrk is run as -t<threads> -c<connections> -d<duration>s [--latency] on loopback."""
    assert harness.wrk_command("wrk", 9, threads, connections, duration, latency) == expected


NGINX_V = (
    "nginx version: nginx/1.22.1\nconfigure arguments: --with-cc-opt=-O2 "
    "--http-client-body-temp-path=/var/lib/nginx/body "
    "--http-fastcgi-temp-path=/var/lib/nginx/fastcgi "
    "--http-proxy-temp-path=/var/lib/nginx/proxy "
    "--http-scgi-temp-path=/var/lib/nginx/scgi "
    "--http-uwsgi-temp-path=/var/lib/nginx/uwsgi --with-http_ssl_module"
)


@pytest.mark.parametrize(
    "version_output, expected",
    [
        ("", ("client_body", "proxy")),
        (NGINX_V, ("client_body", "proxy", "fastcgi", "scgi", "uwsgi")),
        (NGINX_V + " --without-http_scgi_module", ("client_body", "proxy", "fastcgi", "uwsgi")),
    ],
)
def test_nginx_temp_modules(version_output: str, expected: tuple) -> None:
    """Every temp path the build has is moved into the temp dir, and no module it lacks."""
    assert harness.nginx_temp_modules(version_output) == expected


def test_upstream_conf() -> None:
    """The upstream: one worker, keep-alive, no access log, return 200 with the JSON body."""
    conf = harness.upstream_nginx_conf("/tmp/b", 8000, temp_modules=("client_body", "fastcgi"))
    for line in [
        "worker_processes 1;",
        "daemon off;",
        "pid /tmp/b/upstream.pid;",
        "error_log /tmp/b/upstream-error.log error;",
        "access_log off;",
        "keepalive_requests 1000000;",
        "client_body_temp_path /tmp/b/upstream-temp-client_body;",
        "fastcgi_temp_path /tmp/b/upstream-temp-fastcgi;",
        "listen 127.0.0.1:8000 backlog=4096;",
        "location / { return 200 '%s'; }" % harness.UPSTREAM_BODY,
    ]:
        assert line in conf
    assert 90 <= len(harness.UPSTREAM_BODY) <= 110


def test_upstream_conf_rejects_quotes() -> None:
    """A body that would break the nginx string literal is refused."""
    with pytest.raises(ValueError):
        harness.upstream_nginx_conf("/tmp/b", 8000, body="it's")


def test_proxy_conf() -> None:
    """The nginx proxy: auto workers, a keep-alive upstream pool, HTTP/1.1, no Connection header."""
    conf = harness.proxy_nginx_conf("/tmp/b", 8001, 8000)
    for line in [
        "worker_processes auto;",
        "daemon off;",
        "pid /tmp/b/proxy.pid;",
        "access_log off;",
        "server 127.0.0.1:8000;",
        "keepalive 64;",
        "listen 127.0.0.1:8001 backlog=4096;",
        "proxy_pass http://bench_upstream;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
    ]:
        assert line in conf


@pytest.mark.parametrize(
    "base, extra, expected",
    [
        (
            {"HOME": "/root"},
            (),
            {
                "HOME": "/root",
                "KONG_PROXY_LISTEN": "127.0.0.1:8000",
                "KONG_ADMIN_LISTEN": "127.0.0.1:8001",
                "KONG_PROXY_ACCESS_LOG": "off",
                "KONG_ADMIN_ACCESS_LOG": "off",
                "KONG_LOG_LEVEL": "error",
                "PYTHONPATH": "/repo",
            },
        ),
        (
            {"PYTHONPATH": "/elsewhere", "KONG_LOG_LEVEL": "debug"},
            (("KONG_PLUGINS", "bundled"), ("KONG_LOG_LEVEL", "warn")),
            {
                "KONG_PROXY_LISTEN": "127.0.0.1:8000",
                "KONG_ADMIN_LISTEN": "127.0.0.1:8001",
                "KONG_PROXY_ACCESS_LOG": "off",
                "KONG_ADMIN_ACCESS_LOG": "off",
                "KONG_LOG_LEVEL": "warn",
                "KONG_PLUGINS": "bundled",
                "PYTHONPATH": "/repo" + os.pathsep + "/elsewhere",
            },
        ),
    ],
)
def test_kongtx_environment(base: dict, extra: tuple, expected: dict) -> None:
    """kongtx gets loopback listens, no access logs, error level, the checkout first on
    PYTHONPATH; --extra-kongtx-env entries win."""
    assert harness.kongtx_environment(base, 8000, 8001, "/repo", extra) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("KONG_PLUGINS=bundled", ("KONG_PLUGINS", "bundled")),
        ("K=a=b", ("K", "a=b")),
        ("K=", ("K", "")),
        ("K", None),
        ("=v", None),
    ],
)
def test_parse_env_assignment(text: str, expected: Optional[tuple]) -> None:
    """--extra-kongtx-env takes K=V; the value may hold '=' or be empty."""
    if expected is None:
        with pytest.raises(argparse.ArgumentTypeError):
            harness.parse_env_assignment(text)
    else:
        assert harness.parse_env_assignment(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("kongtx", ("kongtx",)),
        ("nginx, kongtx", ("nginx", "kongtx")),
        ("upstream,stock,", ("upstream", "stock")),
        ("nginx,envoy", None),
        (",", None),
    ],
)
def test_parse_only(text: str, expected: Optional[tuple]) -> None:
    """--only takes a comma-separated subset of the four target names."""
    if expected is None:
        with pytest.raises(argparse.ArgumentTypeError):
            harness.parse_only(text)
    else:
        assert harness.parse_only(text) == expected


def _row(name: str, rps: Optional[float], error: Optional[str] = None) -> Measurement:
    result = WrkResult(rps, 1.0, 2.0, 100) if rps is not None else None
    return Measurement(name, harness.LABELS[name], result, 10.0 if result else None, error)


@pytest.mark.parametrize(
    "rows, expected",
    [
        (
            [_row("nginx", 80000.0), _row("stock", 4000.0), _row("kongtx", 8000.0)],
            {"kongtx/nginx": 0.1, "kongtx/stock": 2.0},
        ),
        (
            [_row("nginx", 80000.0), _row("stock", 4000.0), _row("kongtx", None, "boom")],
            {"kongtx/nginx": None, "kongtx/stock": None},
        ),
        ([_row("kongtx", 8000.0), _row("stock", 0.0)], {"kongtx/nginx": None, "kongtx/stock": None}),
        ([], {"kongtx/nginx": None, "kongtx/stock": None}),
    ],
)
def test_ratios(rows: list, expected: dict) -> None:
    """kongtx/nginx and kongtx/stock are ratios of req/s, None when a side has no result."""
    got = harness.ratios(rows)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value) if value is not None else None)


def test_format_report() -> None:
    """The table has every row (a failed one with its reason), then ratios, Python, cores."""
    rows = [
        _row("upstream", 100000.0),
        _row("nginx", 80000.0),
        _row("stock", 4000.0),
        _row("kongtx", None, "kongtx exited with status 1 before answering"),
    ]
    text = harness.format_report(rows, "CPython 3.11.7 (/x/python)", 2, "-t2 -c50 -d3s")
    lines = text.splitlines()
    assert lines[0].split() == ["target", "req/s", "p50", "ms", "p99", "ms", "errors", "RSS", "MB"]
    assert lines[2].split()[-5:] == ["100000", "1.00", "2.00", "0", "10.0"]
    assert lines[3].startswith("nginx keep-alive proxy ")
    assert lines[4].startswith("twisted stock ReverseProxyResource ")
    assert lines[5].startswith("kongtx (no plugins) ")
    assert "FAILED: kongtx exited with status 1 before answering" in lines[5]
    assert "kongtx/nginx = n/a" in lines
    assert "kongtx/stock = n/a" in lines
    assert "python: CPython 3.11.7 (/x/python)" in lines
    assert any(line.startswith("cores: 2") for line in lines)


def test_report_json() -> None:
    """--json carries every row (errors included), the ratios, the Python and the settings."""
    rows = [_row("nginx", 80000.0), _row("kongtx", 8000.0), _row("stock", None, "no twisted")]
    doc = harness.report_json(rows, {"implementation": "PyPy"}, 2, {"threads": 2})
    assert doc["ratios"] == {"kongtx/nginx": pytest.approx(0.1), "kongtx/stock": None}
    assert doc["results"][0]["requests_per_sec"] == 80000.0
    assert doc["results"][0]["socket_errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    assert doc["results"][2] == {"name": "stock", "label": harness.LABELS["stock"], "error": "no twisted"}
    assert doc["python"] == {"implementation": "PyPy"}
    assert doc["cores"] == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", ""),
        ("Traceback...\n  File x\nImportError: no kongtx\n\n", "ImportError: no kongtx"),
        (
            "2026-11-28T06:15:50+0000 [stderr#error] ImportError: cannot import name 'X'\n",
            "ImportError: cannot import name 'X'",
        ),
        ("2026-11-28T06:15:50+0000 [-] \n", ""),
    ],
)
def test_last_log_line(text: str, expected: str) -> None:
    """A crashed server's last line, stripped of twistd's log prefix, explains its failed row."""
    assert harness.last_log_line(text) == expected


def test_missing_tools_not_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Without nginx/wrk and not root, the exact apt-get command is printed and the exit is 2."""
    monkeypatch.setattr(harness, "find_tool", lambda name: None)
    monkeypatch.setattr(harness.os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as exit_info:
        harness.ensure_tools()
    assert exit_info.value.code == 2
    assert "apt-get update -qq && apt-get install -y -qq nginx-light wrk" in capsys.readouterr().err


def test_rss_of_this_process() -> None:
    """RSS is read from /proc/<pid>/status, and a vanished pid gives None."""
    mine = harness.rss_mb(os.getpid())
    assert mine is not None and mine > 1.0
    assert harness.rss_mb(2**22 + 12345) is None


def test_free_ports_distinct() -> None:
    """The ports handed out at start are distinct."""
    ports = harness.free_ports(5)
    assert len(set(ports)) == 5 and all(p > 0 for p in ports)


have_tools = harness.find_tool("nginx") is not None and harness.find_tool("wrk") is not None


@pytest.mark.skipif(not have_tools, reason="needs nginx and wrk (bench/run installs them as root)")
def test_short_real_run(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """A real 1 s run: the upstream and stock rows are measured with no errors, a kongtx that
    dies at start becomes a FAILED row naming its last stderr line, ratios are n/a, the exit
    status is 1 and no process is left behind."""
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\n"
        'case "$*" in *stock_proxy.py*) exec %s "$@";; esac\n'
        'echo "ImportError: this interpreter has no kongtx" >&2\n'
        "exit 1\n" % sys.executable
    )
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)
    before = set(os.listdir("/proc"))

    code = harness.main(
        ["--python", str(fake_python), "--duration", "1", "--connections", "4",
         "--only", "upstream,stock,kongtx", "--json"]
    )

    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    upstream = next(line for line in lines if line.startswith("upstream direct"))
    stock = next(line for line in lines if line.startswith("twisted stock ReverseProxyResource"))
    kongtx = next(line for line in lines if line.startswith("kongtx (no plugins)"))
    assert float(upstream.split()[2]) > 0 and upstream.split()[5] == "0"
    assert float(stock.split()[3]) > 0 and stock.split()[6] == "0"
    assert "FAILED: kongtx exited with status 1" in kongtx
    assert "ImportError: this interpreter has no kongtx" in kongtx
    assert "kongtx/stock = n/a" in lines
    import json

    doc = json.loads(lines[-1])
    assert [r["name"] for r in doc["results"]] == ["upstream", "stock", "kongtx"]
    leftovers = []
    for pid in set(os.listdir("/proc")) - before:
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"nginx" in cmdline or b"stock_proxy" in cmdline or b"wrk" in cmdline:
            leftovers.append(cmdline)
    assert leftovers == []


FAKE_KONGTX = r'''
"""Stands in for kongtx: checks how it was started, then plays the Admin API and proxy."""
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
expected = ["-n", "--pidfile=", "kongtx", "--prefix"]
if argv[:4] != expected or len(argv) != 5 or not os.path.isdir(argv[4]):
    sys.exit("ValueError: started with %r" % (argv,))
env = os.environ
for name, value in [("KONG_PROXY_ACCESS_LOG", "off"), ("KONG_ADMIN_ACCESS_LOG", "off"),
                    ("KONG_LOG_LEVEL", "error"), ("KONG_BENCH_EXTRA", "yes")]:
    if env.get(name) != value:
        sys.exit("ValueError: %s=%r" % (name, env.get(name)))
if not env["PYTHONPATH"].split(os.pathsep)[0] == REPO_ROOT:
    sys.exit("ValueError: PYTHONPATH=%r" % env["PYTHONPATH"])
state = {"service": False, "route": False}


def listen(spec):
    host, port = spec.rsplit(":", 1)
    return host, int(port)


class Admin(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body=b"{}"):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(200 if self.path == "/" else 404)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        if self.path == "/services" and form.get("name") == ["bench"] and \
                form.get("url", [""])[0].startswith("http://127.0.0.1:"):
            state["service"] = True
            return self.answer(201)
        if self.path == "/services/bench/routes" and form == {"paths[]": ["/"]} and state["service"]:
            state["route"] = True
            return self.answer(201)
        self.answer(400, repr((self.path, form)).encode())


class Proxy(Admin):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.answer(200 if state["route"] else 404, b'{"proxied":true}')


admin = ThreadingHTTPServer(listen(env["KONG_ADMIN_LISTEN"]), Admin)
proxy = ThreadingHTTPServer(listen(env["KONG_PROXY_LISTEN"]), Proxy)
threading.Thread(target=admin.serve_forever, daemon=True).start()
proxy.serve_forever()
'''


@pytest.mark.skipif(not have_tools, reason="needs nginx and wrk (bench/run installs them as root)")
def test_kongtx_contract_with_stand_in(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """kongtx is started as `twistd -n --pidfile= kongtx --prefix <dir>` with the KONG_* env,
    PYTHONPATH and --extra-kongtx-env; the harness creates the service and route with form
    posts, waits for the proxy to answer 200, and then measures the kongtx row."""
    fake_kongtx = tmp_path / "fake_kongtx.py"
    fake_kongtx.write_text("REPO_ROOT = %r\n" % harness.REPO_ROOT + FAKE_KONGTX)
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\n"
        'case "$2" in *twistd*) shift 2; exec %s %s "$@";; esac\n'
        'exec %s "$@"\n' % (sys.executable, fake_kongtx, sys.executable)
    )
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)

    code = harness.main(
        ["--python", str(fake_python), "--duration", "1", "--connections", "4",
         "--only", "kongtx", "--extra-kongtx-env", "KONG_BENCH_EXTRA=yes"]
    )

    lines = capsys.readouterr().out.splitlines()
    kongtx = next(line for line in lines if line.startswith("kongtx (no plugins)"))
    assert "FAILED" not in kongtx, kongtx
    assert code == 0
    assert float(kongtx.split()[3]) > 0 and kongtx.split()[6] == "0"
