"""The kongtx benchmark: one command that measures kongtx against nginx and stock Twisted.

It starts, on 127.0.0.1 and on ports chosen free at start:

- a fast upstream (nginx, one worker, ``return 200`` with ~100 bytes of JSON);
- nginx as a keep-alive reverse proxy to it;
- Twisted's stock ``ReverseProxyResource`` proxying to it (``bench/stock_proxy.py``);
- kongtx, started as a user would (``twistd -n kongtx``), with one service and route,
  without plugins and with key-auth + rate-limiting (local) + file-log, each under
  CPython and PyPy and with ``nginx_worker_processes`` ``1`` and ``auto``;

drives each with ``wrk`` (a warm-up, then the measured run) and prints
requests/s, p50/p99 latency, errors, RSS per process and the ratio to nginx for
each, then the targets with PASS/MISS; then a soak: kongtx with the plugins at a
fixed rate for minutes, its RSS sampled. Run it with ``bench/run``; see
``bench/README.md``.

The harness is standard library only, so it runs under any Python 3.9+; the
servers under test run with ``--python`` (CPython) and ``--pypy``. It is a
script that blocks on purpose: it orchestrates processes, it is not a Twisted
program.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, IO, List, Mapping, Optional, Sequence, Tuple

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import soak  # noqa: E402  (bench/soak.py, next to this file)

#: Interpreter slots of the kongtx rows: --python and --pypy.
INTERPRETERS: Tuple[str, ...] = ("cpython", "pypy")
INTERPRETER_NAMES = {"cpython": "CPython", "pypy": "PyPy"}
#: nginx_worker_processes values of the kongtx rows.
WORKER_MODES: Tuple[str, ...] = ("1", "auto")
#: Plugin sets of the kongtx rows: the rate-limiting policy, None for no plugins.
POLICIES: Tuple[Optional[str], ...] = (None, "local", "redis")
_POLICY_PREFIX = {None: "kongtx", "local": "kongtx-plugins", "redis": "kongtx-plugins-redis"}
_POLICY_LABEL = {
    None: "no plugins",
    "local": "key-auth + rate-limiting (local) + file-log",
    "redis": "key-auth + rate-limiting (redis) + file-log",
}


@dataclass(frozen=True)
class Row:
    """One row of the report: what runs, under which interpreter, with how many workers."""

    name: str
    label: str
    kind: str  # "upstream", "nginx", "stock" or "kongtx"
    interpreter: str = "cpython"
    workers: str = "1"
    policy: Optional[str] = None

    @property
    def is_kongtx(self) -> bool:
        return self.kind == "kongtx"


def kongtx_row_name(policy: Optional[str], interpreter: str, workers: str) -> str:
    """``kongtx-plugins-pypy-auto``: plugin set, interpreter, nginx_worker_processes."""
    return "%s-%s-%s" % (_POLICY_PREFIX[policy], interpreter, workers)


def kongtx_row(policy: Optional[str], interpreter: str, workers: str) -> Row:
    label = "kongtx %s, %s, %s" % (
        _POLICY_LABEL[policy],
        INTERPRETER_NAMES[interpreter],
        "1 worker" if workers == "1" else "%s workers" % workers,
    )
    return Row(kongtx_row_name(policy, interpreter, workers), label, "kongtx", interpreter,
               workers, policy)


def all_rows() -> Tuple[Row, ...]:
    """Every row, in the order they are measured and printed."""
    rows = [
        Row("upstream", "upstream direct (nginx, 1 worker)", "upstream"),
        Row("nginx", "nginx keep-alive proxy (worker_processes auto)", "nginx"),
        Row("stock", "twisted stock ReverseProxyResource (CPython)", "stock"),
    ]
    for interpreter in INTERPRETERS:
        for policy in POLICIES:
            for workers in WORKER_MODES:
                rows.append(kongtx_row(policy, interpreter, workers))
    return tuple(rows)


ROWS: Tuple[Row, ...] = all_rows()
ROWS_BY_NAME: Dict[str, Row] = {row.name: row for row in ROWS}
ROW_NAMES = tuple(row.name for row in ROWS)
LABELS = {row.name: row.label for row in ROWS}
#: --only's name for the soak.
SOAK = "soak"
#: What `bench/run` measures without --only: every row but the Redis ones, and the soak.
DEFAULT_SELECTION = tuple(row.name for row in ROWS if row.policy != "redis") + (SOAK,)
SELECTABLE = ROW_NAMES + (SOAK,)

#: The consumer's key the plugin rows send (wrk -H).
BENCH_KEY = "bench-key-0123456789"
#: The file-log plugin's file, inside the kongtx prefix.
FILE_LOG_NAME = "file-log.json"

#: What the upstream answers: about 100 bytes of JSON.
UPSTREAM_BODY = (
    '{"message":"hello from the kongtx bench upstream",'
    '"service":"bench","padding":"0123456789abcdef0123"}'
)

APT_PACKAGES = {"nginx": "nginx-light", "wrk": "wrk"}
#: Warm-up before each measured run; PyPy's JIT needs longer (--warmup, --pypy-warmup).
WARMUP_SECONDS = 2
PYPY_WARMUP_SECONDS = 8
READY_TIMEOUT = 30.0
#: Consecutive right answers, each on a new connection, before a kongtx row counts as
#: configured: with several workers, every one of them must have the new snapshot.
READY_STREAK = 20

#: The soak's defaults: requests/s in total, seconds, seconds between RSS samples.
SOAK_RATE = 2000
SOAK_SECONDS = 120
SOAK_SAMPLE_SECONDS = 5.0

#: The issue's targets: the row, the least share of nginx's req/s, what it is.
RATIO_TARGETS: Tuple[Tuple[str, float, str], ...] = (
    ("kongtx-pypy-auto", 0.45, "PyPy auto, no plugins"),
    ("kongtx-plugins-pypy-auto", 0.35, "PyPy auto, with plugins"),
    ("kongtx-cpython-auto", 0.22, "CPython auto, no plugins"),
)
#: Every kongtx row's p99 must be below this.
P99_TARGET_MS = 10.0

#: How to make the PyPy environment the PyPy rows need.
PYPY_VENV_HINT = (
    "pypy3 -m venv .venv-pypy && .venv-pypy/bin/pip install -q --upgrade pip "
    "&& .venv-pypy/bin/pip install -q '.[test]'"
)

#: Exit status when nginx/wrk are missing and cannot be installed.
EXIT_MISSING_DEPENDENCIES = 2


# ---------------------------------------------------------------------------
# Pure pieces: wrk output, configuration text, the report.
# ---------------------------------------------------------------------------


class WrkParseError(ValueError):
    """wrk's output did not contain the figures we need."""


@dataclass(frozen=True)
class WrkResult:
    """The figures of one wrk run."""

    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int = 0
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    @property
    def errors(self) -> int:
        """Non-2xx/3xx responses plus socket errors: what the table shows."""
        return self.non_2xx + self.socket_errors


@dataclass(frozen=True)
class Measurement:
    """One row of the report: a result, or why there is none."""

    name: str
    label: str
    result: Optional[WrkResult] = None
    rss_per_process_mb: Optional[Tuple[float, ...]] = None
    error: Optional[str] = None
    warmup: int = WARMUP_SECONDS

    @property
    def rss_mb(self) -> Optional[float]:
        """RSS summed over the server's processes."""
        if self.rss_per_process_mb is None:
            return None
        return sum(self.rss_per_process_mb)


_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s|m|h)\s*$")
_PERCENTILE_RE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+(\S+)\s*$", re.MULTILINE)
_RPS_RE = re.compile(r"^Requests/sec:\s+([0-9]+(?:\.[0-9]+)?)\s*$", re.MULTILINE)
_REQUESTS_RE = re.compile(r"^\s*([0-9]+) requests in ", re.MULTILINE)
_NON_2XX_RE = re.compile(r"^\s*Non-2xx or 3xx responses:\s+([0-9]+)\s*$", re.MULTILINE)
_SOCKET_RE = re.compile(
    r"^\s*Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)",
    re.MULTILINE,
)


def duration_to_ms(text: str) -> float:
    """Convert one of wrk's durations (``575.00us``, ``1.48ms``, ``2.00s``) to ms."""
    match = _TIME_RE.match(text)
    if match is None:
        raise WrkParseError("not a wrk duration: %r" % (text,))
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Read requests/s, the 50%/99% latency lines and the error counts of ``wrk --latency``."""
    rps = _RPS_RE.search(output)
    if rps is None:
        raise WrkParseError("no 'Requests/sec:' line in wrk's output")
    percentiles = {m.group(1): duration_to_ms(m.group(2)) for m in _PERCENTILE_RE.finditer(output)}
    if "50" not in percentiles or "99" not in percentiles:
        raise WrkParseError("no 'Latency Distribution' 50%/99% lines (was --latency given?)")
    requests = _REQUESTS_RE.search(output)
    non_2xx = _NON_2XX_RE.search(output)
    sockets = _SOCKET_RE.search(output)
    connect, read, write, timeout = (
        (int(g) for g in sockets.groups()) if sockets is not None else (0, 0, 0, 0)
    )
    return WrkResult(
        requests_per_sec=float(rps.group(1)),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
        requests=int(requests.group(1)) if requests is not None else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx is not None else 0,
        connect_errors=connect,
        read_errors=read,
        write_errors=write,
        timeouts=timeout,
    )


def wrk_command(
    wrk: str, port: int, threads: int, connections: int, duration: int, latency: bool = True,
    headers: Sequence[str] = (), script: Optional[str] = None,
) -> List[str]:
    """The wrk command line for one run against 127.0.0.1:<port> (``script``: wrk -s)."""
    command = [wrk, "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration]
    if latency:
        command.append("--latency")
    for header in headers:
        command += ["-H", header]
    if script is not None:
        command += ["-s", script]
    command.append("http://127.0.0.1:%d/" % port)
    return command


def _nginx_common(tmpdir: str, name: str, workers: str) -> str:
    """Directives both nginx configurations share: everything stays inside tmpdir."""
    return (
        "worker_processes {workers};\n"
        "daemon off;\n"
        "pid {tmp}/{name}.pid;\n"
        "error_log {tmp}/{name}-error.log error;\n"
        "events {{ worker_connections 4096; }}\n"
    ).format(workers=workers, tmp=tmpdir, name=name)


#: The temp paths every nginx build has; `nginx -V` may list more (fastcgi, ...).
DEFAULT_TEMP_MODULES: Tuple[str, ...] = ("client_body", "proxy")
_TEMP_PATH_RE = re.compile(r"--http-([a-z-]+)-temp-path=")


def nginx_temp_modules(version_output: str) -> Tuple[str, ...]:
    """The ``*_temp_path`` directives this nginx build knows, from ``nginx -V``.

    nginx creates every compiled-in temp directory at start, by default under
    /var/lib/nginx, which a non-root user cannot write: we point them all into
    the temp dir, and must not name a module the build lacks.
    """
    modules = list(DEFAULT_TEMP_MODULES)
    for match in _TEMP_PATH_RE.finditer(version_output):
        module = match.group(1).replace("-", "_")
        if "--without-http_%s_module" % module in version_output:
            continue
        if module not in modules:
            modules.append(module)
    return tuple(modules)


def _nginx_temp_paths(tmpdir: str, name: str, modules: Sequence[str]) -> str:
    return "".join(
        "    %s_temp_path %s/%s-temp-%s;\n" % (module, tmpdir, name, module) for module in modules
    )


def upstream_nginx_conf(
    tmpdir: str,
    port: int,
    body: str = UPSTREAM_BODY,
    temp_modules: Sequence[str] = DEFAULT_TEMP_MODULES,
) -> str:
    """nginx.conf for the upstream: one worker, keep-alive, ``return 200 <json>``."""
    if "'" in body or "\\" in body:
        raise ValueError("the upstream body must not contain quotes or backslashes")
    return (
        _nginx_common(tmpdir, "upstream", "1")
        + "http {\n"
        + "    access_log off;\n"
        + "    keepalive_requests 1000000;\n"
        + "    keepalive_timeout 75s;\n"
        + _nginx_temp_paths(tmpdir, "upstream", temp_modules)
        + "    server {\n"
        + "        listen 127.0.0.1:%d backlog=4096;\n" % port
        + "        default_type application/json;\n"
        + "        location / { return 200 '%s'; }\n" % body
        + "    }\n"
        + "}\n"
    )


def proxy_nginx_conf(
    tmpdir: str,
    port: int,
    upstream_port: int,
    temp_modules: Sequence[str] = DEFAULT_TEMP_MODULES,
) -> str:
    """nginx.conf for the reference proxy: auto workers, keep-alive pool to the upstream."""
    return (
        _nginx_common(tmpdir, "proxy", "auto")
        + "http {\n"
        + "    access_log off;\n"
        + "    keepalive_requests 1000000;\n"
        + _nginx_temp_paths(tmpdir, "proxy", temp_modules)
        + "    upstream bench_upstream {\n"
        + "        server 127.0.0.1:%d;\n" % upstream_port
        + "        keepalive 64;\n"
        + "    }\n"
        + "    server {\n"
        + "        listen 127.0.0.1:%d backlog=4096;\n" % port
        + "        location / {\n"
        + "            proxy_pass http://bench_upstream;\n"
        + "            proxy_http_version 1.1;\n"
        + '            proxy_set_header Connection "";\n'
        + "        }\n"
        + "    }\n"
        + "}\n"
    )


_LOG_PREFIX_RE = re.compile(r"^\d{4}-\d\d-\d\dT\S+ \[[^\]]*\] ?")


def last_log_line(text: str) -> str:
    """The last non-empty line of a server's output, without twistd's time/system prefix.

    A crash's last line is its exception (``ImportError: ...``): what a failed row shows.
    """
    for line in reversed(text.splitlines()):
        line = _LOG_PREFIX_RE.sub("", line).strip()
        if line:
            return line
    return ""


def kongtx_environment(
    base: Mapping[str, str],
    proxy_port: int,
    admin_port: int,
    repo_root: str,
    extra: Sequence[Tuple[str, str]] = (),
    workers: Optional[str] = None,
) -> Dict[str, str]:
    """The environment kongtx is started with; ``extra`` (--extra-kongtx-env) wins.

    ``workers`` is ``nginx_worker_processes`` (``1``, ``auto``), None to leave it unset.
    """
    env = dict(base)
    env.update(
        {
            "KONG_PROXY_LISTEN": "127.0.0.1:%d" % proxy_port,
            "KONG_ADMIN_LISTEN": "127.0.0.1:%d" % admin_port,
            "KONG_PROXY_ACCESS_LOG": "off",
            "KONG_ADMIN_ACCESS_LOG": "off",
            "KONG_LOG_LEVEL": "error",
        }
    )
    if workers is not None:
        env["KONG_NGINX_WORKER_PROCESSES"] = workers
    previous = base.get("PYTHONPATH")
    env["PYTHONPATH"] = repo_root + (os.pathsep + previous if previous else "")
    env.update(dict(extra))
    return env


def parse_env_assignment(text: str) -> Tuple[str, str]:
    """``K=V`` -> (K, V); argparse type for --extra-kongtx-env."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected K=V, got %r" % (text,))
    return name, value


def parse_only(text: str) -> Tuple[str, ...]:
    """``nginx,kongtx-*-pypy-*,soak`` -> the names, globs expanded; argparse type for --only.

    A name is a row's name or ``soak``; a glob (``*``, ``?``, ``[...]``) selects every
    row it matches. The order given is kept, without repeats.
    """
    names: List[str] = []
    unknown = []
    for part in (n.strip() for n in text.split(",")):
        if not part:
            continue
        matched = [n for n in SELECTABLE if fnmatch.fnmatchcase(n, part)]
        if not matched:
            unknown.append(part)
        names.extend(n for n in matched if n not in names)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            "unknown row(s) %s; choose from %s (globs allowed)"
            % (", ".join(unknown) or "(none)", ",".join(SELECTABLE))
        )
    return tuple(names)


def warmup_for(row: Row, warmup: int, pypy_warmup: int) -> int:
    """The warm-up before a row's measured run: PyPy's JIT gets the longer one."""
    return pypy_warmup if row.kind in ("kongtx", "stock") and row.interpreter == "pypy" else warmup


def ratio(numerator: Optional[Measurement], denominator: Optional[Measurement]) -> Optional[float]:
    """requests/s of one over the other, or None when either has no result."""
    if numerator is None or denominator is None:
        return None
    if numerator.result is None or denominator.result is None:
        return None
    if denominator.result.requests_per_sec <= 0:
        return None
    return numerator.result.requests_per_sec / denominator.result.requests_per_sec


def ratios(measurements: Sequence[Measurement]) -> Dict[str, Optional[float]]:
    """``<row>/nginx`` for every row but nginx, and kongtx-cpython-1/stock.

    (kongtx on CPython with one process is the like-for-like comparison with the
    stock ReverseProxyResource.)
    """
    by_name = {m.name: m for m in measurements}
    nginx = by_name.get("nginx")
    result: Dict[str, Optional[float]] = {}
    for m in measurements:
        if m.name != "nginx":
            result["%s/nginx" % m.name] = ratio(m, nginx)
    if "kongtx-cpython-1" in by_name:
        result["kongtx-cpython-1/stock"] = ratio(by_name["kongtx-cpython-1"], by_name.get("stock"))
    return result


@dataclass(frozen=True)
class SoakResult:
    """The soak: which kongtx row it ran, at what rate, the RSS samples and wrk's figures."""

    name: str
    rate: int
    seconds: int
    warmup: int
    sample_every: float
    samples: Tuple[soak.RssSample, ...] = ()
    result: Optional[WrkResult] = None
    error: Optional[str] = None

    @property
    def trend(self) -> Optional[soak.RssTrend]:
        return soak.rss_trend(self.samples)


PASS = "PASS"
MISS = "MISS"
NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class TargetCheck:
    """One of the issue's targets, the figure this run has for it, PASS/MISS/n/a."""

    target: str
    value: str
    status: str


def evaluate_targets(
    measurements: Sequence[Measurement], soak_result: Optional[SoakResult]
) -> List[TargetCheck]:
    """The issue's targets against this run's figures.

    A share of nginx is a MISS when its row had errors (the figure is not clean);
    a target whose row was not run or failed is ``n/a``. p99 is checked for every
    kongtx row that was measured.
    """
    by_name = {m.name: m for m in measurements}
    nginx = by_name.get("nginx")
    checks = []
    for name, least, what in RATIO_TARGETS:
        target = "%s (%s): >= %.2f x nginx" % (what, name, least)
        row = by_name.get(name)
        value = ratio(row, nginx)
        if row is None:
            checks.append(TargetCheck(target, "not run", NOT_APPLICABLE))
        elif value is None:
            why = "no result" if row.result is None else "no nginx figure"
            checks.append(TargetCheck(target, why, NOT_APPLICABLE))
        elif row.result is not None and row.result.errors:
            checks.append(TargetCheck(target, "%.2f (%d errors)" % (value, row.result.errors), MISS))
        else:
            checks.append(TargetCheck(target, "%.2f" % value, PASS if value >= least else MISS))
    for m in measurements:
        if not ROWS_BY_NAME.get(m.name, Row(m.name, "", "")).is_kongtx or m.result is None:
            continue
        p99 = m.result.p99_ms
        checks.append(TargetCheck(
            "p99 < %g ms: %s" % (P99_TARGET_MS, m.name),
            "%.2f ms" % p99,
            PASS if p99 < P99_TARGET_MS else MISS,
        ))
    rss_target = "soak: RSS change within %g%%" % soak.RSS_CHANGE_TARGET_PCT
    errors_target = "soak: no non-2xx answers, no socket errors"
    if soak_result is None:
        checks.append(TargetCheck(rss_target, "not run", NOT_APPLICABLE))
        checks.append(TargetCheck(errors_target, "not run", NOT_APPLICABLE))
        return checks
    trend = soak_result.trend
    if trend is None or soak_result.error is not None:
        checks.append(TargetCheck(rss_target, "no result", NOT_APPLICABLE))
    else:
        checks.append(TargetCheck(
            rss_target,
            "%+.1f%% (%.1f -> %.1f MB)" % (trend.change_pct, trend.start_mb, trend.end_mb),
            PASS if trend.within_target else MISS,
        ))
    r = soak_result.result
    if r is None:
        checks.append(TargetCheck(errors_target, "no result", NOT_APPLICABLE))
    else:
        checks.append(TargetCheck(
            errors_target,
            "%d non-2xx, %d socket errors" % (r.non_2xx, r.socket_errors),
            PASS if r.errors == 0 else MISS,
        ))
    return checks


@dataclass(frozen=True)
class RunInfo:
    """What the report says about the run besides the rows: interpreters, cores, wrk."""

    pythons: Mapping[str, Optional[Mapping[str, str]]]
    cores: int
    threads: int
    connections: int
    duration: int
    warmup: int = WARMUP_SECONDS
    pypy_warmup: int = PYPY_WARMUP_SECONDS
    notes: Tuple[str, ...] = ()


LEGEND = (
    "upstream: nginx answering directly; nginx: nginx keep-alive proxy; "
    "stock: Twisted's stock ReverseProxyResource",
    "kongtx-*: no plugins; kongtx-plugins-*: key-auth + rate-limiting (local, limit never "
    "reached) + file-log",
    "  -cpython-/-pypy-: interpreter; -1/-auto: nginx_worker_processes (auto: one per core)",
    "x nginx: req/s over the nginx proxy's; RSS: VmRSS after the run, summed, and per "
    "process (root first)",
)


def _format_row(m: Measurement, width: int, nginx: Optional[Measurement]) -> str:
    if m.result is None:
        return "%-*s  FAILED: %s" % (width, m.name, m.error or "no result")
    r = m.result
    share = ratio(m, nginx)
    per_process = m.rss_per_process_mb or ()
    return "%-*s %9.0f %8.2f %8.2f %7d %8s %8s %5s  %s" % (
        width,
        m.name,
        r.requests_per_sec,
        r.p50_ms,
        r.p99_ms,
        r.errors,
        "n/a" if share is None else "%.2f" % share,
        "?" if m.rss_mb is None else "%.1f" % m.rss_mb,
        len(per_process) if per_process else "?",
        soak.format_per_process(per_process),
    )


def format_soak(soak_result: Optional[SoakResult], threads: int, connections: int) -> List[str]:
    """The soak's lines of the report."""
    if soak_result is None:
        return ["soak: not run"]
    s = soak_result
    lines = [
        "soak: %s at %d req/s for %d s (after %d s of warm-up at full speed), wrk -t%d -c%d, "
        "paced by a Lua delay() script"
        % (s.name, s.rate, s.seconds, s.warmup, threads, connections)
    ]
    if s.error is not None:
        lines.append("  FAILED: %s" % s.error)
    r = s.result
    if r is not None:
        lines.append(
            "  achieved %.0f req/s (%d requests), p50 %.2f ms, p99 %.2f ms%s"
            % (r.requests_per_sec, r.requests, r.p50_ms, r.p99_ms,
               "" if soak.rate_held(r.requests_per_sec, s.rate)
               else " (the server did not keep up: not the fixed rate asked)")
        )
    if s.samples or s.error is None:
        lines.extend(soak.format_trend(s.trend, s.sample_every))
    if s.samples:
        lines.append(
            "  RSS per process MB at start: %s; at end: %s"
            % (soak.format_per_process(s.samples[0].per_process_mb),
               soak.format_per_process(s.samples[-1].per_process_mb))
        )
    if r is not None:
        lines.append(
            "  errors: %d non-2xx, %d socket errors (connect %d, read %d, write %d, timeout %d)"
            % (r.non_2xx, r.socket_errors, r.connect_errors, r.read_errors, r.write_errors,
               r.timeouts)
        )
    return lines


def format_targets(checks: Sequence[TargetCheck]) -> List[str]:
    """``  PASS  <target>  <value>``, one line per target."""
    width = max([len(c.target) for c in checks] + [0])
    return ["targets (a report, not the exit status):"] + [
        "  %-4s  %-*s  %s" % (c.status, width, c.target, c.value) for c in checks
    ]


def format_report(
    measurements: Sequence[Measurement],
    soak_result: Optional[SoakResult],
    info: RunInfo,
) -> str:
    """The human-readable report: the table, its legend, the soak, the targets, the setup."""
    width = max([len(m.name) for m in measurements] + [len("row")])
    header = "%-*s %9s %8s %8s %7s %8s %8s %5s  %s" % (
        width, "row", "req/s", "p50 ms", "p99 ms", "errors", "x nginx", "RSS MB", "procs",
        "RSS per process MB",
    )
    lines = [header, "-" * len(header)]
    nginx = next((m for m in measurements if m.name == "nginx"), None)
    lines.extend(_format_row(m, width, nginx) for m in measurements)
    lines.append("")
    lines.extend(LEGEND)
    stock = ratios(measurements).get("kongtx-cpython-1/stock")
    if stock is not None:
        lines.append("kongtx-cpython-1/stock = %.2f" % stock)
    lines.append("")
    lines.extend(format_soak(soak_result, info.threads, info.connections))
    lines.append("")
    lines.extend(format_targets(evaluate_targets(measurements, soak_result)))
    lines.append("")
    for slot in INTERPRETERS:
        probe = info.pythons.get(slot)
        lines.append("%s: %s" % (slot, "not run" if probe is None else python_description(probe)))
    lines.extend(info.notes)
    lines.append("cores: %d (wrk shares them with the server under test)" % info.cores)
    lines.append(
        "wrk: -t%d -c%d -d%ds --latency, after a %d s warm-up (%d s for PyPy rows)"
        % (info.threads, info.connections, info.duration, info.warmup, info.pypy_warmup)
    )
    return "\n".join(lines)


def _wrk_json(r: WrkResult) -> Dict[str, object]:
    return {
        "requests_per_sec": r.requests_per_sec,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "requests": r.requests,
        "non_2xx": r.non_2xx,
        "socket_errors": {
            "connect": r.connect_errors,
            "read": r.read_errors,
            "write": r.write_errors,
            "timeout": r.timeouts,
        },
        "errors": r.errors,
    }


def report_json(
    measurements: Sequence[Measurement],
    soak_result: Optional[SoakResult],
    info: RunInfo,
) -> Dict[str, object]:
    """The machine-readable report (--json)."""
    rows = []
    for m in measurements:
        row: Dict[str, object] = {"name": m.name, "label": m.label, "error": m.error}
        if m.result is not None:
            row.update(_wrk_json(m.result))
            row.update({
                "rss_mb": m.rss_mb,
                "rss_per_process_mb": list(m.rss_per_process_mb or ()),
                "warmup": m.warmup,
            })
        rows.append(row)
    soak_doc: Optional[Dict[str, object]] = None
    if soak_result is not None:
        s = soak_result
        soak_doc = {
            "name": s.name,
            "rate": s.rate,
            "seconds": s.seconds,
            "warmup": s.warmup,
            "sample_every": s.sample_every,
            "error": s.error,
            "wrk": _wrk_json(s.result) if s.result is not None else None,
            "rss": soak.trend_json(s.trend),
            "samples": [
                {"seconds": x.seconds, "per_process_mb": list(x.per_process_mb)}
                for x in s.samples
            ],
        }
    return {
        "results": rows,
        "ratios": ratios(measurements),
        "soak": soak_doc,
        "targets": [
            {"target": c.target, "value": c.value, "status": c.status}
            for c in evaluate_targets(measurements, soak_result)
        ],
        "python": {slot: (dict(p) if p is not None else None) for slot, p in info.pythons.items()},
        "notes": list(info.notes),
        "cores": info.cores,
        "wrk": {
            "threads": info.threads,
            "connections": info.connections,
            "duration": info.duration,
            "warmup": info.warmup,
            "pypy_warmup": info.pypy_warmup,
        },
    }


# ---------------------------------------------------------------------------
# Processes, ports, HTTP.
# ---------------------------------------------------------------------------


class BenchError(Exception):
    """A target could not be set up or measured.

    ``str()`` is the one line its row shows; ``detail`` (the server's output, ...)
    is printed to stderr as it happens.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


def log(message: str) -> None:
    """Progress goes to stderr so that stdout carries only the report."""
    sys.stderr.write("bench: %s\n" % message)
    sys.stderr.flush()


def free_ports(count: int) -> List[int]:
    """``count`` distinct ports on 127.0.0.1 that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def http_request(
    url: str,
    data: Optional[Mapping[str, str]] = None,
    timeout: float = 5.0,
    headers: Optional[Mapping[str, str]] = None,
) -> Tuple[int, bytes]:
    """GET (or POST a form when ``data`` is given) on a new connection; (status, body)."""
    body = urllib.parse.urlencode(data).encode("ascii") if data is not None else None
    request = urllib.request.Request(
        url, data=body, method="POST" if data else "GET", headers=dict(headers or {})
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _proc_children() -> Dict[int, List[int]]:
    """Every process's children, from /proc/<pid>/stat."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: ppid follows the last ")".
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(pid: int) -> List[int]:
    """``pid`` and all its descendants, parents before children."""
    children = _proc_children()
    tree = []
    pending = [pid]
    while pending:
        current = pending.pop(0)
        tree.append(current)
        pending.extend(sorted(children.get(current, ())))
    return tree


def _vm_rss_kb(pid: int) -> Optional[int]:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None  # a zombie has no VmRSS


def rss_per_process_mb(pid: int) -> Optional[Tuple[float, ...]]:
    """VmRSS of ``pid`` and each of its descendants (root first), in MB; None if it is gone.

    With kongtx's workers: the master (the twistd process) first, then its workers.
    """
    sizes = []
    for current in process_tree(pid):
        kb = _vm_rss_kb(current)
        if kb is not None:
            sizes.append(kb / 1024.0)
    return tuple(sizes) if sizes else None


def rss_mb(pid: int) -> Optional[float]:
    """VmRSS of ``pid`` and all its descendants, summed, in MB; None if it is gone."""
    sizes = rss_per_process_mb(pid)
    return sum(sizes) if sizes is not None else None


@dataclass
class Server:
    """A process the harness started, with its output files."""

    name: str
    process: "subprocess.Popen[bytes]"
    stdout_path: str
    stderr_path: str
    files: List[IO[bytes]] = field(default_factory=list)

    def last_error_line(self) -> str:
        """The last line of its stderr, else of its stdout (twistd logs there), or ""."""
        for path in (self.stderr_path, self.stdout_path):
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            line = last_log_line(text)
            if line:
                return line
        return ""

    def failure(self, error: BenchError) -> BenchError:
        """``error`` with this server's last stderr line in its message and its output tail."""
        message = error.message
        last = self.last_error_line()
        if last and last not in message:
            message = "%s: %s" % (message, last)
        detail = "\n".join(part for part in (error.detail, self.output_tail()) if part)
        return BenchError(message, detail)

    def output_tail(self, lines: int = 30) -> str:
        """The last lines of its stderr and stdout, for a failure report."""
        parts = []
        for label, path in (("stderr", self.stderr_path), ("stdout", self.stdout_path)):
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            tail = "\n".join(text.strip().splitlines()[-lines:])
            if tail:
                parts.append("--- %s %s ---\n%s" % (self.name, label, tail))
        return "\n".join(parts)


class Processes:
    """Starts servers in their own process groups and always stops all of them."""

    def __init__(self, tmpdir: str) -> None:
        self._tmpdir = tmpdir
        self._servers: List[Server] = []

    def start(self, name: str, command: Sequence[str], env: Optional[Mapping[str, str]] = None) -> Server:
        stdout_path = os.path.join(self._tmpdir, "%s.stdout" % name)
        stderr_path = os.path.join(self._tmpdir, "%s.stderr" % name)
        stdout = open(stdout_path, "wb")
        stderr = open(stderr_path, "wb")
        try:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=dict(env) if env is not None else None,
                cwd=self._tmpdir,
                # Own process group: Ctrl-C reaches only us, and we stop the whole
                # group (nginx's workers included).
                start_new_session=True,
            )
        except OSError as e:
            stdout.close()
            stderr.close()
            raise BenchError("cannot run %s: %s" % (command[0], e))
        server = Server(name, process, stdout_path, stderr_path, [stdout, stderr])
        self._servers.append(server)
        return server

    def stop(self, server: Server, grace: float = 5.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds."""
        process = server.process
        try:
            # Descendants that may have left the group (their own session): found now,
            # while the root is alive to be their parent.
            descendants = [
                (pid, _start_time(pid))
                for pid in (process_tree(process.pid)[1:] if process.poll() is None else [])
            ]
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait(timeout=grace)
            # Leftovers in the group (a worker that outlived its master), and elsewhere.
            _signal_group(process.pid, signal.SIGKILL)
            for pid, start_time in descendants:
                _kill_if_same(pid, start_time)
        finally:
            for f in server.files:
                f.close()
            if server in self._servers:
                self._servers.remove(server)

    def stop_all(self) -> None:
        for server in list(reversed(self._servers)):
            try:
                self.stop(server)
            except Exception as e:  # keep stopping the others
                log("could not stop %s (pid %d): %s" % (server.name, server.process.pid, e))


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _start_time(pid: int) -> Optional[str]:
    """A process's start time (field 22 of /proc/<pid>/stat): with the pid, its identity."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _kill_if_same(pid: int, start_time: Optional[str]) -> None:
    """SIGKILL ``pid`` if it is still the process that had ``start_time`` (not a reuse)."""
    if start_time is None or _start_time(pid) != start_time:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def wait_until_http(
    server: Server, url: str, want_status: Optional[int], timeout: float = READY_TIMEOUT
) -> Tuple[int, bytes]:
    """Poll ``url`` until it answers (with ``want_status`` if given) or fail clearly."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        exit_code = server.process.poll()
        if exit_code is not None:
            raise BenchError(
                "%s exited with status %d before answering %s" % (server.name, exit_code, url)
            )
        try:
            status, body = http_request(url, timeout=2.0)
        except (OSError, urllib.error.URLError) as e:
            last = str(getattr(e, "reason", e))
        else:
            if want_status is None or status == want_status:
                return status, body
            last = "status %d: %s" % (status, body[:200].decode("utf-8", "replace"))
        if time.monotonic() >= deadline:
            raise BenchError(
                "%s did not answer %s within %.0f s (last: %s)" % (server.name, url, timeout, last)
            )
        time.sleep(0.1)


#: One readiness probe: URL, request headers, the status it must answer.
Probe = Tuple[str, Mapping[str, str], int]


def wait_until_consistent(
    server: Server, probes: Sequence[Probe], streak: int = READY_STREAK,
    timeout: float = READY_TIMEOUT,
) -> None:
    """Poll until every probe answers its status ``streak`` times in a row.

    Each request is on a new connection, so with several workers sharing the port
    the answers come from all of them: a worker that has not yet rebuilt its
    snapshot after the Admin API writes breaks the streak.
    """
    deadline = time.monotonic() + timeout
    good = 0
    last = "no answer"
    while good < streak:
        exit_code = server.process.poll()
        if exit_code is not None:
            raise BenchError("%s exited with status %d while being configured"
                             % (server.name, exit_code))
        ok = True
        for url, headers, want in probes:
            try:
                status, body = http_request(url, timeout=2.0, headers=headers)
            except (OSError, urllib.error.URLError) as e:
                ok, last = False, "%s: %s" % (url, getattr(e, "reason", e))
                break
            if status != want:
                ok = False
                last = "%s answered %d (want %d): %s" % (
                    url, status, want, body[:200].decode("utf-8", "replace"))
                break
        good = good + 1 if ok else 0
        if good >= streak:
            return
        if time.monotonic() >= deadline:
            raise BenchError("%s did not answer as configured %d times in a row within %.0f s "
                             "(last: %s)" % (server.name, streak, timeout, last))
        if not ok:
            time.sleep(0.1)


# ---------------------------------------------------------------------------
# Dependencies and the interpreter under test.
# ---------------------------------------------------------------------------


def find_tool(name: str) -> Optional[str]:
    """The path of nginx/wrk, looking in sbin too (it is often not on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_tools() -> Dict[str, str]:
    """nginx and wrk paths; installs the Debian packages as root, else exits 2."""
    missing = [tool for tool in ("nginx", "wrk") if find_tool(tool) is None]
    if missing:
        packages = " ".join(APT_PACKAGES[tool] for tool in missing)
        command = "apt-get update -qq && apt-get install -y -qq %s" % packages
        if os.geteuid() != 0:
            sys.stderr.write(
                "bench: missing %s; install with (as root):\n    %s\n" % (", ".join(missing), command)
            )
            sys.exit(EXIT_MISSING_DEPENDENCIES)
        log("installing %s: %s" % (packages, command))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        # Its chatter goes to stderr: stdout carries only the report.
        result = subprocess.run(["sh", "-c", command], env=env, stdout=sys.stderr)
        still = [tool for tool in missing if find_tool(tool) is None]
        if result.returncode != 0 or still:
            sys.stderr.write("bench: could not install %s (exit %d)\n" % (packages, result.returncode))
            sys.exit(EXIT_MISSING_DEPENDENCIES)
    return {tool: find_tool(tool) or tool for tool in ("nginx", "wrk")}


def probe_nginx_temp_modules(nginx: str) -> Tuple[str, ...]:
    """nginx_temp_modules() of this nginx's ``-V`` (printed on stderr)."""
    try:
        done = subprocess.run([nginx, "-V"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_TEMP_MODULES
    return nginx_temp_modules(done.stdout.decode("utf-8", "replace"))


def describe_python(python: str) -> Dict[str, str]:
    """Implementation, version and path of the interpreter under test."""
    probe = (
        "import json, platform, sys\n"
        "try:\n    import twisted; tw = twisted.__version__\n"
        "except Exception:\n    tw = None\n"
        "print(json.dumps({'implementation': platform.python_implementation(),"
        " 'version': platform.python_version(), 'executable': sys.executable, 'twisted': tw}))\n"
    )
    try:
        out = subprocess.run(
            [python, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"implementation": "?", "version": "?", "executable": python, "error": str(e)}
    if out.returncode != 0:
        return {
            "implementation": "?",
            "version": "?",
            "executable": python,
            "error": out.stderr.decode("utf-8", "replace").strip(),
        }
    info = json.loads(out.stdout.decode("utf-8"))
    return {k: ("" if v is None else str(v)) for k, v in info.items()}


def python_description(info: Mapping[str, str]) -> str:
    text = "%s %s (%s)" % (info.get("implementation"), info.get("version"), info.get("executable"))
    if info.get("twisted"):
        text += ", Twisted %s" % info["twisted"]
    if info.get("error"):
        text += " [probe failed: %s]" % info["error"]
    return text


# ---------------------------------------------------------------------------
# The rows and the soak.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    threads: int
    connections: int
    duration: int
    #: Interpreter per slot ("cpython", "pypy"); None: that slot's rows are skipped.
    pythons: Mapping[str, Optional[str]]
    extra_kongtx_env: Tuple[Tuple[str, str], ...] = ()
    warmup: int = WARMUP_SECONDS
    pypy_warmup: int = PYPY_WARMUP_SECONDS
    keep_tmp: bool = False


@dataclass(frozen=True)
class Kongtx:
    """A kongtx the harness started and configured."""

    server: Server
    port: int
    file_log: Optional[str]


@dataclass
class Bench:
    """One run: tools, temp dir, ports and the processes it started."""

    tools: Mapping[str, str]
    settings: Settings
    tmpdir: str
    processes: Processes
    ports: Dict[str, int]
    nginx_temp_modules: Tuple[str, ...] = DEFAULT_TEMP_MODULES

    def start_nginx(self, name: str, conf_text: str, port: int) -> Server:
        conf = os.path.join(self.tmpdir, "%s.conf" % name)
        with open(conf, "w") as f:
            f.write(conf_text)
        command = [
            self.tools["nginx"],
            "-c", conf,
            "-p", self.tmpdir + "/",
            "-e", os.path.join(self.tmpdir, "%s-error.log" % name),
        ]
        server = self.processes.start(name, command)
        try:
            wait_until_http(server, "http://127.0.0.1:%d/" % port, 200)
        except BenchError as e:
            error_log = _read_tail(os.path.join(self.tmpdir, "%s-error.log" % name))
            raise server.failure(BenchError(e.message, error_log))
        return server

    def start_upstream(self) -> Server:
        return self.start_nginx(
            "upstream", upstream_nginx_conf(
                self.tmpdir, self.ports["upstream"], temp_modules=self.nginx_temp_modules
            ),
            self.ports["upstream"],
        )

    def start_nginx_proxy(self) -> Server:
        conf = proxy_nginx_conf(
            self.tmpdir, self.ports["nginx"], self.ports["upstream"], self.nginx_temp_modules
        )
        return self.start_nginx("proxy", conf, self.ports["nginx"])

    def python_for(self, row: Row) -> str:
        python = self.settings.pythons.get(row.interpreter)
        if python is None:
            raise BenchError("no %s interpreter" % INTERPRETER_NAMES[row.interpreter])
        return python

    def start_stock(self, row: Row) -> Server:
        command = [
            self.python_for(row),
            os.path.join(BENCH_DIR, "stock_proxy.py"),
            "--port", str(self.ports["stock"]),
            "--upstream-port", str(self.ports["upstream"]),
        ]
        server = self.processes.start("stock", command)
        try:
            wait_until_http(server, "http://127.0.0.1:%d/" % self.ports["stock"], 200)
        except BenchError as e:
            raise server.failure(e)
        return server

    def start_kongtx(self, row: Row, name: Optional[str] = None) -> Kongtx:
        """Start kongtx for ``row`` (prefix and logs under ``name``), configure it through
        the Admin API, and wait until every worker serves the configuration."""
        name = name or row.name
        prefix = os.path.join(self.tmpdir, name)
        os.makedirs(prefix, exist_ok=True)
        port, admin_port = free_ports(2)
        # `python -m twisted` is `twist`, which has no -n/--pidfile: run twistd itself,
        # with the interpreter under test.
        command = [
            self.python_for(row),
            "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "-n", "--pidfile=", "kongtx", "--prefix", prefix,
        ]
        env = kongtx_environment(
            os.environ, port, admin_port, REPO_ROOT, self.settings.extra_kongtx_env,
            workers=row.workers,
        )
        server = self.processes.start(name, command, env)
        admin = "http://127.0.0.1:%d" % admin_port
        proxy = "http://127.0.0.1:%d/" % port
        file_log = None
        try:
            wait_until_http(server, admin + "/", None)
            self._admin_post(admin + "/services", {
                "name": "bench",
                "url": "http://127.0.0.1:%d/" % self.ports["upstream"],
            })
            self._admin_post(admin + "/services/bench/routes", {"paths[]": "/"})
            probes: List[Probe] = [(proxy, {}, 200)]
            if row.policy is not None:
                file_log = os.path.join(prefix, FILE_LOG_NAME)
                self._add_plugins(admin, row.policy, file_log)
                probes = [(proxy, {}, 401), (proxy, {"apikey": BENCH_KEY}, 200)]
            # Each worker serves from a snapshot rebuilt after the writes.
            wait_until_consistent(server, probes)
        except BenchError as e:
            raise server.failure(e)
        return Kongtx(server, port, file_log)

    def _add_plugins(self, admin: str, policy: str, file_log: str) -> None:
        """key-auth, a rate limit that never blocks (every request still counts), file-log."""
        self._admin_post(admin + "/consumers", {"username": "bench"})
        self._admin_post(admin + "/consumers/bench/key-auth", {"key": BENCH_KEY})
        self._admin_post(admin + "/services/bench/plugins", {"name": "key-auth"})
        form = {"name": "rate-limiting", "config.hour": "1000000000", "config.policy": policy}
        if policy == "redis":
            form["config.redis.host"] = "127.0.0.1"
        self._admin_post(admin + "/services/bench/plugins", form)
        self._admin_post(admin + "/services/bench/plugins",
                         {"name": "file-log", "config.path": file_log})

    @staticmethod
    def _admin_post(url: str, form: Mapping[str, str]) -> None:
        try:
            status, body = http_request(url, form)
        except (OSError, urllib.error.URLError) as e:
            raise BenchError("POST %s failed: %s" % (url, getattr(e, "reason", e)))
        if status != 201:
            raise BenchError(
                "POST %s answered %d: %s" % (url, status, body[:300].decode("utf-8", "replace"))
            )

    def wrk(self, port: int, duration: int, latency: bool, headers: Sequence[str] = (),
            script: Optional[str] = None) -> List[str]:
        s = self.settings
        return wrk_command(self.tools["wrk"], port, s.threads, s.connections, duration, latency,
                           headers, script)

    def run_wrk(self, port: int, duration: int, latency: bool,
                headers: Sequence[str] = ()) -> str:
        command = self.wrk(port, duration, latency, headers)
        try:
            done = subprocess.run(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=duration + 60,
            )
        except subprocess.TimeoutExpired:
            raise BenchError("wrk did not finish within %d s" % (duration + 60))
        output = done.stdout.decode("utf-8", "replace")
        _check_wrk_exit(done.returncode, output)
        return output

    def measure(self, row: Row, server: Server, port: int,
                file_log: Optional[str] = None) -> Measurement:
        """The warm-up, the measured run, then the server's RSS per process."""
        headers = ("apikey: %s" % BENCH_KEY,) if row.policy is not None else ()
        warmup = warmup_for(row, self.settings.warmup, self.settings.pypy_warmup)
        if warmup > 0:
            log("%s: warm-up %d s" % (row.name, warmup))
            self.run_wrk(port, warmup, latency=False, headers=headers)
        log("%s: measuring %d s" % (row.name, self.settings.duration))
        output = self.run_wrk(port, self.settings.duration, latency=True, headers=headers)
        try:
            result = parse_wrk(output)
        except WrkParseError as e:
            raise BenchError("cannot read wrk's output: %s" % (e,), output)
        sizes = rss_per_process_mb(server.process.pid)
        if file_log is not None:
            _check_file_log(file_log)
        return Measurement(row.name, row.label, result, sizes, warmup=warmup)

    def run_soak(self, row: Row, rate: int, seconds: int, sample_every: float) -> SoakResult:
        """Start kongtx for ``row``, warm it up at full speed, then drive it at ``rate``
        requests/s for ``seconds`` while sampling its RSS every ``sample_every`` s."""
        warmup = warmup_for(row, self.settings.warmup, self.settings.pypy_warmup)
        log("soak: starting %s" % row.name)
        kongtx = self.start_kongtx(row, name="soak")
        server = kongtx.server
        headers = ("apikey: %s" % BENCH_KEY,)
        samples: List[soak.RssSample] = []
        wrk: Optional["subprocess.Popen[bytes]"] = None
        try:
            if warmup > 0:
                log("soak: warm-up %d s at full speed" % warmup)
                self.run_wrk(kongtx.port, warmup, latency=False, headers=headers)
            script = os.path.join(self.tmpdir, "soak.lua")
            with open(script, "w") as f:
                f.write(soak.pacing_script(rate, self.settings.threads, self.settings.connections))
            output_path = os.path.join(self.tmpdir, "soak-wrk.out")
            log("soak: %d req/s for %d s, RSS every %g s" % (rate, seconds, sample_every))
            with open(output_path, "wb") as output_file:
                wrk = subprocess.Popen(
                    self.wrk(kongtx.port, seconds, True, headers, script),
                    stdout=output_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
                problem = self._sample_while(wrk, server, samples, seconds, sample_every)
            with open(output_path, "rb") as f:
                output = f.read().decode("utf-8", "replace")
            if problem is not None:
                return SoakResult(row.name, rate, seconds, warmup, sample_every, tuple(samples),
                                  error=problem)
            _check_wrk_exit(wrk.returncode, output)
            try:
                result = parse_wrk(output)
            except WrkParseError as e:
                raise BenchError("cannot read wrk's output: %s" % (e,), output)
            if kongtx.file_log is not None:
                _check_file_log(kongtx.file_log)
            return SoakResult(row.name, rate, seconds, warmup, sample_every, tuple(samples),
                              result)
        except BenchError as e:
            log("soak failed: %s\n%s" % (e, e.detail))
            return SoakResult(row.name, rate, seconds, warmup, sample_every, tuple(samples),
                              error=str(e))
        finally:
            if wrk is not None and wrk.poll() is None:
                wrk.kill()
                wrk.wait()
            self.processes.stop(server)
            self.drop_file_log(kongtx.file_log)

    @staticmethod
    def _sample_while(
        wrk: "subprocess.Popen[bytes]", server: Server, samples: List[soak.RssSample],
        seconds: int, sample_every: float,
    ) -> Optional[str]:
        """Sample the server's RSS (at once, then every ``sample_every`` s, and when wrk
        ends) until wrk exits; what went wrong, or None."""
        start = time.monotonic()
        next_sample = start
        deadline = start + seconds + 60
        while True:
            now = time.monotonic()
            done = wrk.poll() is not None
            if done or now >= next_sample:
                if server.process.poll() is not None:
                    return "%s exited with status %d during the soak: %s" % (
                        server.name, server.process.returncode, server.last_error_line())
                sizes = rss_per_process_mb(server.process.pid)
                if sizes is not None and (not samples or now - start - samples[-1].seconds > 0.5
                                          or not done):
                    samples.append(soak.RssSample(round(now - start, 1), sizes))
                while next_sample <= now:  # on schedule; a late sample skips, not bunches
                    next_sample += sample_every
            if done:
                return None
            if now >= deadline:
                return "wrk did not finish within %d s" % (seconds + 60)
            time.sleep(max(0.0, min(0.2, next_sample - time.monotonic())))

    def drop_file_log(self, path: Optional[str]) -> None:
        """The file-log grows by hundreds of MB per row: remove it unless --keep-tmp."""
        if path is not None and not self.settings.keep_tmp:
            try:
                os.unlink(path)
            except OSError:
                pass


def _check_wrk_exit(returncode: int, output: str) -> None:
    if returncode != 0:
        last = output.strip().splitlines()[-1:] or [""]
        raise BenchError("wrk exited %d: %s" % (returncode, last[0]), output)


def _check_file_log(path: str) -> None:
    """The file-log plugin must have written its lines (else the row measured less work)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    if size == 0:
        raise BenchError("file-log wrote nothing to %s" % path)


def _read_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = "\n".join(text.strip().splitlines()[-lines:])
    return "--- %s ---\n%s" % (os.path.basename(path), tail) if tail else ""


def soak_row(pythons: Mapping[str, Optional[str]]) -> Row:
    """The soak runs kongtx with the plugins and auto workers, on PyPy when there is one."""
    interpreter = "pypy" if pythons.get("pypy") else "cpython"
    return kongtx_row("local", interpreter, "auto")


def runnable(row: Row, pythons: Mapping[str, Optional[str]]) -> bool:
    """A kongtx/stock row needs its interpreter; the nginx rows always run."""
    return row.kind in ("upstream", "nginx") or pythons.get(row.interpreter) is not None


def run_rows(
    bench: Bench, rows: Sequence[Row], soak_settings: Optional[Tuple[int, int, float]],
) -> Tuple[List[Measurement], Optional[SoakResult]]:
    """Start, measure and stop each row in turn (failures become rows), then the soak
    (``soak_settings``: rate, seconds, sample interval; None: no soak)."""
    measurements: List[Measurement] = []
    soak_target = soak_row(bench.settings.pythons)
    try:
        upstream = bench.start_upstream()
    except BenchError as e:
        log("upstream failed: %s\n%s" % (e, e.detail))
        short = "upstream did not start: %s" % e
        failed_soak = None
        if soak_settings is not None:
            rate, seconds, every = soak_settings
            failed_soak = SoakResult(soak_target.name, rate, seconds, 0, every, error=short)
        return [Measurement(r.name, r.label, error=short) for r in rows], failed_soak

    for row in rows:
        server: Optional[Server] = None
        file_log: Optional[str] = None
        log("%s: starting" % row.name)
        try:
            if row.kind == "upstream":
                server, port = upstream, bench.ports["upstream"]
            elif row.kind == "nginx":
                server, port = bench.start_nginx_proxy(), bench.ports["nginx"]
            elif row.kind == "stock":
                server, port = bench.start_stock(row), bench.ports["stock"]
            else:
                kongtx = bench.start_kongtx(row)
                server, port, file_log = kongtx.server, kongtx.port, kongtx.file_log
            measurements.append(bench.measure(row, server, port, file_log))
        except BenchError as e:
            log("%s failed: %s\n%s" % (row.name, e, e.detail))
            measurements.append(Measurement(row.name, row.label, error=str(e)))
        finally:
            if server is not None and server is not upstream:
                bench.processes.stop(server)
            bench.drop_file_log(file_log)
    soak_result = None
    if soak_settings is not None:
        rate, seconds, every = soak_settings
        try:
            soak_result = bench.run_soak(soak_target, rate, seconds, every)
        except BenchError as e:
            log("soak failed: %s\n%s" % (e, e.detail))
            warmup = warmup_for(soak_target, bench.settings.warmup, bench.settings.pypy_warmup)
            soak_result = SoakResult(soak_target.name, rate, seconds, warmup, every, error=str(e))
    return measurements, soak_result


# ---------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------


def default_python() -> str:
    """The checkout's .venv interpreter when there is one, else this one."""
    candidate = os.path.join(REPO_ROOT, ".venv", "bin", "python")
    return candidate if os.access(candidate, os.X_OK) else sys.executable


def default_pypy() -> Optional[str]:
    """The checkout's .venv-pypy interpreter, None when there is none."""
    candidate = os.path.join(REPO_ROOT, ".venv-pypy", "bin", "python")
    return candidate if os.access(candidate, os.X_OK) else None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Measure kongtx (CPython and PyPy, 1 worker and auto, without and with "
        "plugins) against an nginx keep-alive proxy and Twisted's stock "
        "ReverseProxyResource, all in front of the same nginx upstream; then soak it.",
    )
    parser.add_argument("--python", default=None,
                        help="CPython for the kongtx -cpython- rows and the stock proxy "
                        "(default: the checkout's .venv/bin/python, else this interpreter)")
    parser.add_argument("--pypy", default=None,
                        help="PyPy for the -pypy- rows (default: the checkout's "
                        ".venv-pypy/bin/python; without it those rows are skipped)")
    parser.add_argument("--no-pypy", action="store_true", help="skip the PyPy rows")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    parser.add_argument("--warmup", type=int, default=WARMUP_SECONDS,
                        help="seconds of warm-up before each run (default %(default)s)")
    parser.add_argument("--pypy-warmup", type=int, default=PYPY_WARMUP_SECONDS,
                        help="the same for PyPy rows, whose JIT needs longer (default %(default)s)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    parser.add_argument("--only", type=parse_only, default=None,
                        help="comma-separated rows (globs allowed) and/or 'soak', from: %s "
                        "(default: all but the redis rows, and the soak)" % ",".join(SELECTABLE))
    parser.add_argument("--no-soak", action="store_true", help="do not run the soak")
    parser.add_argument("--soak-seconds", type=int, default=SOAK_SECONDS,
                        help="length of the soak (default %(default)s)")
    parser.add_argument("--soak-rate", type=int, default=SOAK_RATE,
                        help="the soak's fixed rate, requests/s in total (default %(default)s)")
    parser.add_argument("--soak-sample-seconds", type=float, default=SOAK_SAMPLE_SECONDS,
                        help="seconds between two RSS samples in the soak (default %(default)s)")
    parser.add_argument("--extra-kongtx-env", type=parse_env_assignment, action="append",
                        default=[], metavar="K=V",
                        help="extra environment for kongtx (repeatable; wins over the row's "
                        "KONG_NGINX_WORKER_PROCESSES), e.g. KONG_PLUGINS=bundled")
    parser.add_argument("--json", action="store_true",
                        help="also print the results as one line of JSON after the report")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temp dir (configs, logs, kongtx prefixes) for inspection")
    args = parser.parse_args(argv)
    for option in ("duration", "connections", "threads", "soak_seconds", "soak_rate"):
        if getattr(args, option) < 1:
            parser.error("--%s must be at least 1" % option.replace("_", "-"))
    for option in ("warmup", "pypy_warmup"):
        if getattr(args, option) < 0:
            parser.error("--%s must not be negative" % option.replace("_", "-"))
    if args.soak_sample_seconds <= 0:
        parser.error("--soak-sample-seconds must be positive")
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads (wrk needs one per thread)")
    return args


def choose_pythons(args: argparse.Namespace) -> Tuple[Dict[str, Optional[str]], List[str]]:
    """The interpreter per slot, and the notes the report prints about them."""
    python = os.path.abspath(args.python) if args.python else default_python()
    notes = []
    if args.no_pypy:
        pypy: Optional[str] = None
        notes.append("PyPy rows skipped (--no-pypy)")
    elif args.pypy:
        pypy = os.path.abspath(args.pypy)
    else:
        pypy = default_pypy()
        if pypy is None:
            notes.append(
                "PyPy rows skipped: no .venv-pypy/bin/python in the checkout; make it with: %s"
                % PYPY_VENV_HINT
            )
    return {"cpython": python, "pypy": pypy}, notes


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; 0 if every selected row (and the soak) ran, 1 if one failed."""
    args = parse_args(argv)
    tools = ensure_tools()
    pythons, notes = choose_pythons(args)
    settings = Settings(
        threads=args.threads,
        connections=args.connections,
        duration=args.duration,
        pythons=pythons,
        extra_kongtx_env=tuple(args.extra_kongtx_env),
        warmup=args.warmup,
        pypy_warmup=args.pypy_warmup,
        keep_tmp=args.keep_tmp,
    )
    selection = set(args.only if args.only is not None else DEFAULT_SELECTION)
    if args.no_soak:
        selection.discard(SOAK)
    wanted = [row for row in ROWS if row.name in selection]
    rows = [row for row in wanted if runnable(row, pythons)]
    run_soak = SOAK in selection
    used = {row.interpreter for row in rows if row.kind in ("stock", "kongtx")}
    if run_soak:
        used.add(soak_row(pythons).interpreter)
    probes: Dict[str, Optional[Mapping[str, str]]] = {
        slot: None for slot in INTERPRETERS
    }
    for slot in used:
        python = pythons[slot]
        if python is not None:
            probes[slot] = describe_python(python)
    for note in notes:
        log(note)
    for slot, probe in probes.items():
        if probe is not None:
            log("%s under test: %s" % (slot, python_description(probe)))

    tmpdir = tempfile.mkdtemp(prefix="kongtx-bench-")
    # nginx workers run as `nobody` when we are root: let them reach their temp dirs.
    os.chmod(tmpdir, 0o755)
    processes = Processes(tmpdir)
    previous_term = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    interrupted = False
    measurements: List[Measurement] = []
    soak_result: Optional[SoakResult] = None
    try:
        names = ("upstream", "nginx", "stock")
        ports = dict(zip(names, free_ports(len(names))))
        bench = Bench(tools, settings, tmpdir, processes, ports, probe_nginx_temp_modules(tools["nginx"]))
        soak_settings = (
            (args.soak_rate, args.soak_seconds, args.soak_sample_seconds) if run_soak else None
        )
        measurements, soak_result = run_rows(bench, rows, soak_settings)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping everything")
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous_term)
        if args.keep_tmp:
            log("temp dir kept: %s" % tmpdir)
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
    if interrupted:
        return 130

    info = RunInfo(
        pythons=probes,
        cores=os.cpu_count() or 1,
        threads=settings.threads,
        connections=settings.connections,
        duration=settings.duration,
        warmup=settings.warmup,
        pypy_warmup=settings.pypy_warmup,
        notes=tuple(notes) if any(not runnable(r, pythons) for r in wanted) else (),
    )
    print(format_report(measurements, soak_result, info))
    if args.json:
        print(json.dumps(report_json(measurements, soak_result, info), sort_keys=True))
    failed = any(m.result is None for m in measurements)
    if soak_result is not None and soak_result.error is not None:
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
