"""Tests of the benchmark harness: its pure pieces table-driven (wrk output, configs, row
names, targets, the report, the soak's pacing script and RSS trend), then two short real
runs (nginx and a stand-in for kongtx, paced by the soak's script).

Collected by the normal ``python -m pytest -q`` (setup.cfg's testpaths), or alone with
``.venv/bin/python -m pytest bench/test_harness.py -q``. The real runs need nginx and
wrk (``bench/run`` installs them as root) and are skipped without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import subprocess
import sys
from typing import Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import soak  # noqa: E402
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
    "threads, connections, duration, latency, headers, script, expected",
    [
        (2, 50, 10, True, (), None,
         ["wrk", "-t2", "-c50", "-d10s", "--latency", "http://127.0.0.1:9/"]),
        (1, 8, 2, False, (), None, ["wrk", "-t1", "-c8", "-d2s", "http://127.0.0.1:9/"]),
        (2, 50, 120, True, ("apikey: k",), "/t/soak.lua",
         ["wrk", "-t2", "-c50", "-d120s", "--latency", "-H", "apikey: k", "-s", "/t/soak.lua",
          "http://127.0.0.1:9/"]),
    ],
)
def test_wrk_command(threads: int, connections: int, duration: int, latency: bool,
                     headers: tuple, script: Optional[str], expected: list) -> None:
    """wrk is run as -t<threads> -c<connections> -d<duration>s [--latency] [-H ...]
    [-s script] on loopback."""
    assert harness.wrk_command(
        "wrk", 9, threads, connections, duration, latency, headers, script) == expected


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
    "workers, extra, expected",
    [
        ("1", (), "1"),
        ("auto", (), "auto"),
        ("auto", (("KONG_NGINX_WORKER_PROCESSES", "3"),), "3"),
    ],
)
def test_kongtx_environment_workers(workers: str, extra: tuple, expected: str) -> None:
    """A row's workers reach kongtx as KONG_NGINX_WORKER_PROCESSES; --extra-kongtx-env wins."""
    env = harness.kongtx_environment({}, 8000, 8001, "/repo", extra, workers=workers)
    assert env["KONG_NGINX_WORKER_PROCESSES"] == expected


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
        ("kongtx-cpython-1", ("kongtx-cpython-1",)),
        ("nginx, kongtx-pypy-auto", ("nginx", "kongtx-pypy-auto")),
        ("upstream,stock,", ("upstream", "stock")),
        ("soak", ("soak",)),
        ("kongtx*-pypy-auto", (
            "kongtx-plugins-pypy-auto", "kongtx-plugins-redis-pypy-auto", "kongtx-pypy-auto",
        )),
        ("kongtx-plugins-redis-*", (
            "kongtx-plugins-redis-cpython-1", "kongtx-plugins-redis-cpython-auto",
            "kongtx-plugins-redis-pypy-1", "kongtx-plugins-redis-pypy-auto",
        )),
        ("nginx,ngin?", ("nginx",)),
        ("kongtx", None),
        ("nginx,envoy", None),
        (",", None),
    ],
)
def test_parse_only(text: str, expected: Optional[tuple]) -> None:
    """--only takes row names, globs over them and 'soak', keeps the order given, drops
    repeats, and refuses a name that selects nothing."""
    if expected is None:
        with pytest.raises(argparse.ArgumentTypeError):
            harness.parse_only(text)
    else:
        assert sorted(harness.parse_only(text)) == sorted(expected)
        if "*" not in text:
            assert harness.parse_only(text) == expected


@pytest.mark.parametrize(
    "policy, interpreter, workers, name",
    [
        (None, "cpython", "1", "kongtx-cpython-1"),
        (None, "pypy", "auto", "kongtx-pypy-auto"),
        ("local", "cpython", "auto", "kongtx-plugins-cpython-auto"),
        ("local", "pypy", "1", "kongtx-plugins-pypy-1"),
        ("redis", "pypy", "auto", "kongtx-plugins-redis-pypy-auto"),
    ],
)
def test_kongtx_row_name(policy: Optional[str], interpreter: str, workers: str, name: str) -> None:
    """A kongtx row is named plugin set - interpreter - nginx_worker_processes."""
    assert harness.kongtx_row_name(policy, interpreter, workers) == name
    row = harness.ROWS_BY_NAME[name]
    assert (row.kind, row.policy, row.interpreter, row.workers) == (
        "kongtx", policy, interpreter, workers)


def test_rows_and_default_selection() -> None:
    """The baselines come first, then CPython's kongtx rows, then PyPy's; the default run
    is every row but the Redis ones, plus the soak."""
    assert harness.ROW_NAMES[:3] == ("upstream", "nginx", "stock")
    assert harness.ROW_NAMES[3:7] == (
        "kongtx-cpython-1", "kongtx-cpython-auto",
        "kongtx-plugins-cpython-1", "kongtx-plugins-cpython-auto",
    )
    assert harness.DEFAULT_SELECTION == (
        "upstream", "nginx", "stock",
        "kongtx-cpython-1", "kongtx-cpython-auto",
        "kongtx-plugins-cpython-1", "kongtx-plugins-cpython-auto",
        "kongtx-pypy-1", "kongtx-pypy-auto",
        "kongtx-plugins-pypy-1", "kongtx-plugins-pypy-auto",
        "soak",
    )
    assert harness.LABELS["kongtx-plugins-pypy-auto"] == (
        "kongtx key-auth + rate-limiting (local) + file-log, PyPy, auto workers")
    assert harness.LABELS["kongtx-cpython-1"] == "kongtx no plugins, CPython, 1 worker"


@pytest.mark.parametrize(
    "name, expected",
    [("upstream", 2), ("stock", 2), ("kongtx-cpython-auto", 2), ("kongtx-pypy-1", 8),
     ("kongtx-plugins-pypy-auto", 8)],
)
def test_warmup_for(name: str, expected: int) -> None:
    """PyPy rows get the longer warm-up (its JIT), every other row the short one."""
    assert harness.warmup_for(harness.ROWS_BY_NAME[name], 2, 8) == expected


@pytest.mark.parametrize(
    "pythons, expected",
    [
        ({"cpython": "/c", "pypy": "/p"}, "kongtx-plugins-pypy-auto"),
        ({"cpython": "/c", "pypy": None}, "kongtx-plugins-cpython-auto"),
    ],
)
def test_soak_row(pythons: dict, expected: str) -> None:
    """The soak runs kongtx with the plugins and auto workers, on PyPy when there is one."""
    assert harness.soak_row(pythons).name == expected


def _row(
    name: str, rps: Optional[float], error: Optional[str] = None, p99: float = 2.0,
    non_2xx: int = 0, sizes: tuple = (10.0,),
) -> Measurement:
    result = WrkResult(rps, 1.0, p99, 100, non_2xx=non_2xx) if rps is not None else None
    return Measurement(name, harness.LABELS[name], result, sizes if result else None, error)


@pytest.mark.parametrize(
    "rows, expected",
    [
        (
            [_row("nginx", 80000.0), _row("stock", 4000.0), _row("kongtx-cpython-1", 8000.0)],
            {"stock/nginx": 0.05, "kongtx-cpython-1/nginx": 0.1, "kongtx-cpython-1/stock": 2.0},
        ),
        (
            [_row("nginx", 80000.0), _row("kongtx-pypy-auto", 40000.0),
             _row("kongtx-cpython-1", None, "boom")],
            {"kongtx-pypy-auto/nginx": 0.5, "kongtx-cpython-1/nginx": None,
             "kongtx-cpython-1/stock": None},
        ),
        ([_row("kongtx-pypy-1", 8000.0), _row("nginx", 0.0)], {"kongtx-pypy-1/nginx": None}),
        ([], {}),
    ],
)
def test_ratios(rows: list, expected: dict) -> None:
    """Every row's req/s over nginx's, and kongtx-cpython-1 over stock; None when a side
    has no result."""
    got = harness.ratios(rows)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value) if value is not None else None)


def _soak(samples: tuple = (100.0, 104.0, 98.0, 103.0), non_2xx: int = 0, timeouts: int = 0,
          error: Optional[str] = None, rps: float = 1999.0) -> harness.SoakResult:
    result = WrkResult(rps, 1.0, 3.0, 239880, non_2xx=non_2xx, timeouts=timeouts)
    return harness.SoakResult(
        "kongtx-plugins-pypy-auto", 2000, 120, 8, 5.0,
        tuple(soak.RssSample(i * 5.0, (mb * 0.4, mb * 0.6)) for i, mb in enumerate(samples)),
        None if error else result, error,
    )


def _checks(rows: list, soak_result: Optional[harness.SoakResult]) -> dict:
    return {c.target: (c.status, c.value) for c in harness.evaluate_targets(rows, soak_result)}


RATIO_PYPY = "PyPy auto, no plugins (kongtx-pypy-auto): >= 0.45 x nginx"
RATIO_PYPY_PLUGINS = "PyPy auto, with plugins (kongtx-plugins-pypy-auto): >= 0.35 x nginx"
RATIO_CPYTHON = "CPython auto, no plugins (kongtx-cpython-auto): >= 0.22 x nginx"
SOAK_RSS = "soak: RSS change within 5%"
SOAK_ERRORS = "soak: no non-2xx answers, no socket errors"


def test_targets_pass_and_miss() -> None:
    """A share of nginx at or above its target passes, below misses; p99 < 10 ms is
    checked per kongtx row; the soak passes within 5% RSS and with no errors."""
    rows = [
        _row("nginx", 100000.0),
        _row("kongtx-pypy-auto", 45000.0, p99=9.99),
        _row("kongtx-plugins-pypy-auto", 34000.0, p99=10.0),
        _row("kongtx-cpython-auto", 30000.0, p99=4.0),
    ]
    checks = _checks(rows, _soak())
    assert checks[RATIO_PYPY] == ("PASS", "0.45")
    assert checks[RATIO_PYPY_PLUGINS] == ("MISS", "0.34")
    assert checks[RATIO_CPYTHON] == ("PASS", "0.30")
    assert checks["p99 < 10 ms: kongtx-pypy-auto"] == ("PASS", "9.99 ms")
    assert checks["p99 < 10 ms: kongtx-plugins-pypy-auto"] == ("MISS", "10.00 ms")
    assert checks["p99 < 10 ms: kongtx-cpython-auto"] == ("PASS", "4.00 ms")
    assert "p99 < 10 ms: nginx" not in checks
    assert checks[SOAK_RSS] == ("PASS", "+3.0% (100.0 -> 103.0 MB)")
    assert checks[SOAK_ERRORS] == ("PASS", "0 non-2xx, 0 socket errors")


def test_targets_not_measured() -> None:
    """A row not run, a failed row, no nginx figure or no soak make the target n/a; a row
    with errors misses whatever its share (its figure is not clean)."""
    rows = [
        _row("kongtx-pypy-auto", 90000.0),
        _row("kongtx-plugins-pypy-auto", None, "kongtx exited"),
    ]
    checks = _checks(rows, None)
    assert checks[RATIO_PYPY] == ("n/a", "no nginx figure")
    assert checks[RATIO_PYPY_PLUGINS] == ("n/a", "no result")
    assert checks[RATIO_CPYTHON] == ("n/a", "not run")
    assert checks[SOAK_RSS] == ("n/a", "not run")
    assert checks[SOAK_ERRORS] == ("n/a", "not run")
    errors = _checks([_row("nginx", 1000.0), _row("kongtx-cpython-auto", 900.0, non_2xx=3)], None)
    assert errors[RATIO_CPYTHON] == ("MISS", "0.90 (3 errors)")


@pytest.mark.parametrize(
    "soak_result, rss, errors",
    [
        (_soak((100.0, 106.0)), ("MISS", "+6.0% (100.0 -> 106.0 MB)"), "PASS"),
        (_soak((100.0, 94.0)), ("MISS", "-6.0% (100.0 -> 94.0 MB)"), "PASS"),
        (_soak((100.0, 120.0, 105.0)), ("PASS", "+5.0% (100.0 -> 105.0 MB)"), "PASS"),
        (_soak(non_2xx=1), ("PASS", "+3.0% (100.0 -> 103.0 MB)"), "MISS"),
        (_soak(timeouts=2), ("PASS", "+3.0% (100.0 -> 103.0 MB)"), "MISS"),
        (_soak((), error="kongtx exited"), ("n/a", "no result"), "n/a"),
    ],
)
def test_soak_targets(soak_result: harness.SoakResult, rss: tuple, errors: str) -> None:
    """The soak's RSS may move 5% either way from start to end (a peak in between does
    not count); one non-2xx answer or socket error misses the errors target."""
    checks = _checks([], soak_result)
    assert checks[SOAK_RSS] == rss
    assert checks[SOAK_ERRORS][0] == errors


def _info(**changes: object) -> harness.RunInfo:
    pythons = {
        "cpython": {"implementation": "CPython", "version": "3.11.7", "executable": "/x/python"},
        "pypy": None,
    }
    info = harness.RunInfo(pythons=pythons, cores=2, threads=2, connections=50, duration=3,
                           notes=("PyPy rows skipped: no .venv-pypy/bin/python in the checkout; "
                                  "make it with: " + harness.PYPY_VENV_HINT,))
    return dataclasses.replace(info, **changes)


def test_format_report() -> None:
    """The table has every row (a failed one with its reason) with req/s, p50, p99,
    errors, the share of nginx, RSS total, process count and per process; then the
    legend, the soak, the targets with PASS/MISS, the interpreters and the skip note."""
    rows = [
        _row("upstream", 100000.0),
        _row("nginx", 80000.0, sizes=(6.5, 6.0, 6.1)),
        _row("stock", 4000.0),
        _row("kongtx-cpython-auto", 20000.0, p99=12.5, sizes=(50.0, 40.25, 40.0)),
        _row("kongtx-cpython-1", None, "kongtx exited with status 1 before answering"),
    ]
    text = harness.format_report(rows, _soak(), _info())
    lines = text.splitlines()
    assert lines[0].split() == [
        "row", "req/s", "p50", "ms", "p99", "ms", "errors", "x", "nginx", "RSS", "MB", "procs",
        "RSS", "per", "process", "MB",
    ]
    assert lines[2].split() == ["upstream", "100000", "1.00", "2.00", "0", "1.25", "10.0", "1",
                                "10.0"]
    assert lines[3].split() == ["nginx", "80000", "1.00", "2.00", "0", "1.00", "18.6", "3",
                                "6.5+6.0+6.1"]
    assert lines[4].split()[:6] == ["stock", "4000", "1.00", "2.00", "0", "0.05"]
    assert lines[5].split() == ["kongtx-cpython-auto", "20000", "1.00", "12.50", "0", "0.25",
                                "130.2", "3", "50.0+40.2+40.0"]
    assert lines[6].split()[0] == "kongtx-cpython-1"
    assert "FAILED: kongtx exited with status 1 before answering" in lines[6]
    assert "  MISS  p99 < 10 ms: kongtx-cpython-auto" in text
    assert "  PASS  " + RATIO_CPYTHON in text
    assert "  n/a   " + RATIO_PYPY in text
    assert "soak: kongtx-plugins-pypy-auto at 2000 req/s for 120 s (after 8 s of warm-up" in text
    assert "  achieved 1999 req/s (239880 requests), p50 1.00 ms, p99 3.00 ms" in lines
    assert ("  RSS total MB: start 100.0, end 103.0 (+3.0%), min 98.0, max 104.0 "
            "(4 samples, every 5 s)") in lines
    assert "  RSS per process MB at start: 40.0+60.0; at end: 41.2+61.8" in lines
    assert "  errors: 0 non-2xx, 0 socket errors (connect 0, read 0, write 0, timeout 0)" in lines
    assert "cpython: CPython 3.11.7 (/x/python)" in lines
    assert "pypy: not run" in lines
    assert any(line.startswith("PyPy rows skipped: no .venv-pypy/bin/python") for line in lines)
    assert any(line.startswith("cores: 2") for line in lines)
    assert "wrk: -t2 -c50 -d3s --latency, after a 2 s warm-up (8 s for PyPy rows)" in lines


@pytest.mark.parametrize(
    "soak_result, expected",
    [
        (None, ["soak: not run"]),
        (_soak(rps=1500.0), ["(the server did not keep up: not the fixed rate asked)"]),
        (_soak((100.0,), error="kongtx exited with status 1 during the soak"),
         ["  FAILED: kongtx exited with status 1 during the soak", "  RSS total MB: start 100.0"]),
    ],
)
def test_format_soak(soak_result: Optional[harness.SoakResult], expected: list) -> None:
    """No soak says so; a soak below the rate asked says the server fell behind; a failed
    soak gives its reason and the samples it has."""
    text = "\n".join(harness.format_soak(soak_result, 2, 50))
    for part in expected:
        assert part in text


def test_report_json() -> None:
    """--json carries every row (errors included) with RSS per process, the ratios, the
    soak with its samples, the targets, the interpreters and the settings."""
    rows = [_row("nginx", 80000.0), _row("kongtx-cpython-1", 8000.0, sizes=(30.0, 20.0)),
            _row("stock", None, "no twisted")]
    doc = harness.report_json(rows, _soak(), _info())
    assert doc["ratios"] == {"kongtx-cpython-1/nginx": pytest.approx(0.1),
                             "stock/nginx": None, "kongtx-cpython-1/stock": None}
    assert doc["results"][0]["requests_per_sec"] == 80000.0
    assert doc["results"][0]["socket_errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    assert doc["results"][1]["rss_mb"] == 50.0
    assert doc["results"][1]["rss_per_process_mb"] == [30.0, 20.0]
    assert doc["results"][2] == {"name": "stock", "label": harness.LABELS["stock"],
                                 "error": "no twisted"}
    assert doc["soak"]["rss"]["change_pct"] == pytest.approx(3.0)
    assert doc["soak"]["samples"][0] == {"seconds": 0.0, "per_process_mb": [40.0, 60.0]}
    assert doc["soak"]["wrk"]["requests_per_sec"] == 1999.0
    assert {"target": SOAK_RSS, "value": "+3.0% (100.0 -> 103.0 MB)", "status": "PASS"} in \
        doc["targets"]
    assert doc["python"]["pypy"] is None
    assert doc["python"]["cpython"]["implementation"] == "CPython"
    assert doc["cores"] == 2
    assert doc["wrk"]["pypy_warmup"] == 8
    json.dumps(doc)


@pytest.mark.parametrize(
    "rate, threads, connections, interval, fallback",
    [
        (2000, 2, 50, "1.000000", "25.000"),
        (300, 1, 10, "3.333333", "33.333"),
        (5000, 4, 50, "0.800000", "9.600"),
    ],
)
def test_pacing_script(rate: int, threads: int, connections: int, interval: str,
                       fallback: str) -> None:
    """Each wrk thread hands its requests one slot every threads*1000/rate ms from the
    monotonic clock (LuaJIT's FFI); without the FFI a connection pauses
    connections-per-thread slots."""
    script = soak.pacing_script(rate, threads, connections)
    assert "local interval = %s\n" % interval in script
    assert "local fallback = %s " % fallback in script
    assert "function delay()" in script
    assert "clock_gettime(1, ts)" in script
    assert "if slot == nil or slot < now then" in script
    assert "{" not in script.replace("{ long tv_sec; long tv_nsec; }", "")


@pytest.mark.parametrize("rate, threads, connections", [(0, 2, 50), (100, 0, 5), (100, 4, 2)])
def test_pacing_script_rejects(rate: int, threads: int, connections: int) -> None:
    """A rate of zero, no thread, or fewer connections than threads is refused."""
    with pytest.raises(ValueError):
        soak.pacing_script(rate, threads, connections)


@pytest.mark.parametrize(
    "totals, start, end, low, high, change, within",
    [
        ((100.0, 104.0, 98.0, 103.0), 100.0, 103.0, 98.0, 104.0, 3.0, True),
        ((200.0, 189.0), 200.0, 189.0, 189.0, 200.0, -5.5, False),
        ((50.0,), 50.0, 50.0, 50.0, 50.0, 0.0, True),
    ],
)
def test_rss_trend(totals: tuple, start: float, end: float, low: float, high: float,
                   change: float, within: bool) -> None:
    """Start is the first sample, end the last, with min, max and the change in percent."""
    trend = soak.rss_trend([soak.RssSample(float(i), (t,)) for i, t in enumerate(totals)])
    assert trend is not None
    assert (trend.start_mb, trend.end_mb, trend.min_mb, trend.max_mb) == (start, end, low, high)
    assert trend.change_pct == pytest.approx(change)
    assert trend.within_target is within
    assert trend.samples == len(totals)
    assert soak.rss_trend([]) is None


@pytest.mark.parametrize(
    "achieved, rate, held", [(2000.0, 2000, True), (1900.0, 2000, True), (1899.0, 2000, False)]
)
def test_rate_held(achieved: float, rate: int, held: bool) -> None:
    """The soak counts as fixed-rate when it reached 95% of the rate asked."""
    assert soak.rate_held(achieved, rate) is held


def test_format_per_process() -> None:
    """Per-process RSS reads root first, joined with '+'; nothing known reads '?'."""
    assert soak.format_per_process((61.04, 48.0, 47.96)) == "61.0+48.0+48.0"
    assert soak.format_per_process(()) == "?"


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
    assert harness.rss_per_process_mb(2**22 + 12345) is None


def test_rss_per_process_of_a_tree() -> None:
    """RSS per process covers a process and its children, the root first (kongtx's
    master, then its workers), and the total is their sum."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        # Popen returns once the child has exec'd: it has its own VmRSS already.
        tree = harness.process_tree(os.getpid())
        sizes = harness.rss_per_process_mb(os.getpid())
        assert tree[0] == os.getpid() and child.pid in tree
        assert sizes is not None and len(sizes) == len(tree)
        assert sizes[0] == pytest.approx(harness.rss_mb(os.getpid()) - sum(sizes[1:]), rel=0.2)
        assert sum(sizes) > sizes[0] > 1.0
    finally:
        child.communicate(b"")


def test_free_ports_distinct() -> None:
    """The ports handed out at start are distinct."""
    ports = harness.free_ports(5)
    assert len(set(ports)) == 5 and all(p > 0 for p in ports)


have_tools = harness.find_tool("nginx") is not None and harness.find_tool("wrk") is not None


@pytest.fixture
def leftovers(monkeypatch: pytest.MonkeyPatch):
    """A function listing what the harness started and left running: processes in the
    session of a server it started (servers get their own), or in this test's process
    group (wrk). Other users of the machine are in neither."""
    started: list = []
    start = harness.Processes.start

    def recording_start(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        server = start(self, *args, **kwargs)
        started.append(server.process.pid)
        return server

    monkeypatch.setattr(harness.Processes, "start", recording_start)
    before = set(os.listdir("/proc"))

    def find() -> list:
        assert started, "the harness started no server"
        found = []
        for entry in set(os.listdir("/proc")) - before:
            pid = int(entry)
            try:
                with open("/proc/%d/stat" % pid) as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ")
                ours = os.getsid(pid) in started or os.getpgid(pid) == os.getpgrp()
            except (OSError, IndexError):
                continue
            if ours and state != "Z":
                found.append(cmdline)
        return found

    return find


@pytest.mark.skipif(not have_tools, reason="needs nginx and wrk (bench/run installs them as root)")
def test_short_real_run(tmp_path, capsys: pytest.CaptureFixture, leftovers) -> None:
    """A real 1 s run: the upstream and stock rows are measured with no errors, a kongtx that
    dies at start becomes a FAILED row naming its last stderr line, its target is n/a, the
    exit status is 1 and no process is left behind."""
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\n"
        'case "$*" in *stock_proxy.py*) exec %s "$@";; esac\n'
        'echo "ImportError: this interpreter has no kongtx" >&2\n'
        "exit 1\n" % sys.executable
    )
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)

    code = harness.main(
        ["--python", str(fake_python), "--no-pypy", "--duration", "1", "--warmup", "0",
         "--connections", "4", "--only", "upstream,stock,kongtx-cpython-auto", "--json"]
    )

    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    upstream = next(line for line in lines if line.startswith("upstream "))
    stock = next(line for line in lines if line.startswith("stock "))
    kongtx = next(line for line in lines if line.startswith("kongtx-cpython-auto "))
    assert float(upstream.split()[1]) > 0 and upstream.split()[4] == "0"
    assert float(stock.split()[1]) > 0 and stock.split()[4] == "0"
    assert "FAILED: kongtx-cpython-auto exited with status 1" in kongtx
    assert "ImportError: this interpreter has no kongtx" in kongtx
    assert any(line.split()[:2] == ["n/a", "CPython"] and line.endswith("no result")
               for line in lines)
    assert "soak: not run" in lines
    doc = json.loads(lines[-1])
    assert [r["name"] for r in doc["results"]] == ["upstream", "stock", "kongtx-cpython-auto"]
    assert leftovers() == []


FAKE_KONGTX = r'''
"""Stands in for kongtx: checks how it was started, then plays the Admin API and proxy
(key-auth, file-log); with `auto` workers it starts a child, as kongtx's workers are."""
import os
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
expected = ["-n", "--pidfile=", "kongtx", "--prefix"]
if argv[:4] != expected or len(argv) != 5 or not os.path.isdir(argv[4]):
    sys.exit("ValueError: started with %r" % (argv,))
prefix = argv[4]
env = os.environ
for name, value in [("KONG_PROXY_ACCESS_LOG", "off"), ("KONG_ADMIN_ACCESS_LOG", "off"),
                    ("KONG_LOG_LEVEL", "error"), ("KONG_BENCH_EXTRA", "yes")]:
    if env.get(name) != value:
        sys.exit("ValueError: %s=%r" % (name, env.get(name)))
if env.get("KONG_NGINX_WORKER_PROCESSES") not in ("1", "auto"):
    sys.exit("ValueError: KONG_NGINX_WORKER_PROCESSES=%r" % env.get("KONG_NGINX_WORKER_PROCESSES"))
if not env["PYTHONPATH"].split(os.pathsep)[0] == REPO_ROOT:
    sys.exit("ValueError: PYTHONPATH=%r" % env["PYTHONPATH"])
if env["KONG_NGINX_WORKER_PROCESSES"] == "auto":
    worker = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()  # bench-fake-worker"],
                              stdin=subprocess.PIPE)
state = {"service": False, "route": False, "consumer": False, "key": None, "plugins": {}}
lock = threading.Lock()


def listen(spec):
    host, port = spec.rsplit(":", 1)
    return host, int(port)


class Admin(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True  # headers and body go in two writes

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
        form = {k: v[0] for k, v in urllib.parse.parse_qs(self.rfile.read(length).decode()).items()}
        if self.path == "/services" and form.get("name") == "bench" and \
                form.get("url", "").startswith("http://127.0.0.1:"):
            state["service"] = True
            return self.answer(201)
        if self.path == "/services/bench/routes" and form == {"paths[]": "/"} and state["service"]:
            state["route"] = True
            return self.answer(201)
        if self.path == "/consumers" and form == {"username": "bench"}:
            state["consumer"] = True
            return self.answer(201)
        if self.path == "/consumers/bench/key-auth" and state["consumer"] and "key" in form:
            state["key"] = form["key"]
            return self.answer(201)
        if self.path == "/services/bench/plugins" and state["service"]:
            name = form.pop("name", None)
            ok = {
                "key-auth": form == {},
                "rate-limiting": form == {"config.hour": "1000000000", "config.policy": "local"},
                "file-log": os.path.dirname(form.get("config.path", "")) == prefix,
            }
            if ok.get(name):
                state["plugins"][name] = form
                return self.answer(201)
        self.answer(400, repr((self.path, form)).encode())


class Proxy(Admin):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        plugins = state["plugins"]
        status = 200 if state["route"] else 404
        if "key-auth" in plugins and self.headers.get("apikey") != state["key"]:
            status = 401
        if "file-log" in plugins:
            with lock, open(plugins["file-log"]["config.path"], "a") as f:
                f.write('{"response":{"status":%d}}\n' % status)
        self.answer(status, b'{"proxied":true}')


admin = ThreadingHTTPServer(listen(env["KONG_ADMIN_LISTEN"]), Admin)
proxy = ThreadingHTTPServer(listen(env["KONG_PROXY_LISTEN"]), Proxy)
threading.Thread(target=admin.serve_forever, daemon=True).start()
proxy.serve_forever()
'''


@pytest.mark.skipif(not have_tools, reason="needs nginx and wrk (bench/run installs them as root)")
def test_kongtx_contract_with_stand_in(tmp_path, capsys: pytest.CaptureFixture,
                                      leftovers) -> None:
    """kongtx is started as `twistd -n --pidfile= kongtx --prefix <dir>` with the KONG_* env,
    the row's KONG_NGINX_WORKER_PROCESSES, PYTHONPATH and --extra-kongtx-env; the harness
    creates the service and route (and for a plugin row a consumer, its key, key-auth,
    rate-limiting and file-log into the prefix) with form posts, waits until the proxy
    answers as configured, measures each row with the RSS of every process, then soaks
    the plugin row at the fixed rate asked, and leaves no process behind."""
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
        ["--python", str(fake_python), "--no-pypy", "--duration", "1", "--warmup", "0",
         "--connections", "4", "--only", "kongtx-cpython-1,kongtx-plugins-cpython-auto,soak",
         "--soak-seconds", "3", "--soak-rate", "200", "--soak-sample-seconds", "1",
         "--extra-kongtx-env", "KONG_BENCH_EXTRA=yes", "--json"]
    )

    lines = capsys.readouterr().out.splitlines()
    plain = next(line for line in lines if line.startswith("kongtx-cpython-1 "))
    plugins = next(line for line in lines if line.startswith("kongtx-plugins-cpython-auto "))
    assert "FAILED" not in plain + plugins, "\n".join(lines)
    assert code == 0
    assert float(plain.split()[1]) > 0 and plain.split()[4] == "0"
    assert float(plugins.split()[1]) > 0 and plugins.split()[4] == "0"
    assert plain.split()[7] == "1"  # one process
    assert plugins.split()[7] == "2"  # the stand-in's master and its worker
    doc = json.loads(lines[-1])
    soaked = doc["soak"]
    assert soaked["name"] == "kongtx-plugins-cpython-auto" and soaked["error"] is None
    assert soaked["wrk"]["requests_per_sec"] == pytest.approx(200, rel=0.1)
    assert soaked["wrk"]["errors"] == 0
    assert len(soaked["samples"]) >= 3
    assert all(len(sample["per_process_mb"]) == 2 for sample in soaked["samples"])
    assert soaked["samples"][0]["seconds"] == 0.0
    assert soaked["samples"][-1]["seconds"] >= 2.5
    assert any(line.startswith("  PASS  soak: no non-2xx answers") for line in lines)
    assert leftovers() == []


@pytest.mark.parametrize(
    "argv, found, pypy, note",
    [
        ([], "/co/.venv-pypy/bin/python", "/co/.venv-pypy/bin/python", None),
        ([], None, None, "PyPy rows skipped: no .venv-pypy/bin/python in the checkout; make it "
                         "with: pypy3 -m venv .venv-pypy && "),
        (["--pypy", "/opt/pypy/bin/python"], None, "/opt/pypy/bin/python", None),
        (["--no-pypy"], "/co/.venv-pypy/bin/python", None, "PyPy rows skipped (--no-pypy)"),
    ],
)
def test_choose_pythons(monkeypatch: pytest.MonkeyPatch, argv: list, found: Optional[str],
                        pypy: Optional[str], note: Optional[str]) -> None:
    """PyPy is --pypy, else the checkout's .venv-pypy; without one the PyPy rows are
    skipped with one line saying how to make it. CPython is --python, else the
    checkout's .venv or this interpreter."""
    monkeypatch.setattr(harness, "default_pypy", lambda: found)
    pythons, notes = harness.choose_pythons(harness.parse_args(argv))
    assert pythons["pypy"] == pypy
    assert pythons["cpython"] == harness.default_python()
    if note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(note)
    assert harness.choose_pythons(harness.parse_args(["--python", "/x/py"]))[0]["cpython"] == "/x/py"


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--soak-seconds", "0"], "--soak-seconds must be at least 1"),
        (["--soak-rate", "0"], "--soak-rate must be at least 1"),
        (["--warmup", "-1"], "--warmup must not be negative"),
        (["--soak-sample-seconds", "0"], "--soak-sample-seconds must be positive"),
        (["--only", "kongtx"], "unknown row(s) kongtx"),
    ],
)
def test_parse_args_rejects(argv: list, problem: str, capsys: pytest.CaptureFixture) -> None:
    """Nonsense settings are refused with a line naming the option."""
    with pytest.raises(SystemExit):
        harness.parse_args(argv)
    assert problem in capsys.readouterr().err
