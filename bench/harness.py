"""The kongtx benchmark: one command that measures kongtx against nginx and stock Twisted.

It starts, on 127.0.0.1 and on ports chosen free at start:

- a fast upstream (nginx, one worker, ``return 200`` with ~100 bytes of JSON);
- nginx as a keep-alive reverse proxy to it;
- Twisted's stock ``ReverseProxyResource`` proxying to it (``bench/stock_proxy.py``);
- kongtx, started as a user would (``twistd -n kongtx``), with one service and route;

drives each with ``wrk`` (a 2 s warm-up, then the measured run) and prints
requests/s, p50/p99 latency, errors and RSS for each, plus kongtx/nginx and
kongtx/stock. Run it with ``bench/run``; see ``bench/README.md``.

The harness is standard library only, so it runs under any Python 3.9+; the
servers under test run with ``--python`` (default: this interpreter). It is a
script that blocks on purpose: it orchestrates processes, it is not a Twisted
program.
"""

from __future__ import annotations

import argparse
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

#: (name for --only, row label), in the order they are measured and printed.
TARGETS: Tuple[Tuple[str, str], ...] = (
    ("upstream", "upstream direct"),
    ("nginx", "nginx keep-alive proxy"),
    ("stock", "twisted stock ReverseProxyResource"),
    ("kongtx", "kongtx (no plugins)"),
    ("kongtx-plugins", "kongtx key-auth + rate-limiting (local)"),
    ("kongtx-plugins-redis", "kongtx key-auth + rate-limiting (redis)"),
)

#: kongtx targets, and the rate-limiting policy each configures (None: no plugins).
KONGTX_POLICIES: Dict[str, Optional[str]] = {
    "kongtx": None,
    "kongtx-plugins": "local",
    "kongtx-plugins-redis": "redis",
}
#: The consumer's key the plugin targets send (wrk -H).
BENCH_KEY = "bench-key-0123456789"
TARGET_NAMES = tuple(name for name, _ in TARGETS)
LABELS = dict(TARGETS)

#: What the upstream answers: about 100 bytes of JSON.
UPSTREAM_BODY = (
    '{"message":"hello from the kongtx bench upstream",'
    '"service":"bench","padding":"0123456789abcdef0123"}'
)

APT_PACKAGES = {"nginx": "nginx-light", "wrk": "wrk"}
WARMUP_SECONDS = 2
READY_TIMEOUT = 30.0

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
    rss_mb: Optional[float] = None
    error: Optional[str] = None


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
    headers: Sequence[str] = (),
) -> List[str]:
    """The wrk command line for one run against 127.0.0.1:<port>."""
    command = [wrk, "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration]
    if latency:
        command.append("--latency")
    for header in headers:
        command += ["-H", header]
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
) -> Dict[str, str]:
    """The environment kongtx is started with; ``extra`` (--extra-kongtx-env) wins."""
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
    """``nginx,kongtx`` -> ("nginx", "kongtx"); argparse type for --only."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in TARGET_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            "unknown target(s) %s; choose from %s"
            % (", ".join(unknown) or "(none)", ",".join(TARGET_NAMES))
        )
    return names


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
    """kongtx/nginx and kongtx/stock."""
    by_name = {m.name: m for m in measurements}
    kongtx = by_name.get("kongtx")
    result = {
        "kongtx/nginx": ratio(kongtx, by_name.get("nginx")),
        "kongtx/stock": ratio(kongtx, by_name.get("stock")),
    }
    for name in ("kongtx-plugins", "kongtx-plugins-redis"):
        if name in by_name:
            result["%s/nginx" % name] = ratio(by_name[name], by_name.get("nginx"))
            result["%s/kongtx" % name] = ratio(by_name[name], kongtx)
    return result


def format_report(
    measurements: Sequence[Measurement],
    python_description: str,
    cores: int,
    wrk_settings: str,
) -> str:
    """The human-readable report: the table, the ratios, the Python and the core count."""
    label_width = max([len(label) for _, label in TARGETS] + [len("target")])
    header = "%-*s %10s %8s %8s %8s %8s" % (
        label_width, "target", "req/s", "p50 ms", "p99 ms", "errors", "RSS MB"
    )
    lines = [header, "-" * len(header)]
    for m in measurements:
        if m.result is None:
            lines.append("%-*s  FAILED: %s" % (label_width, m.label, m.error or "no result"))
            continue
        r = m.result
        lines.append(
            "%-*s %10.0f %8.2f %8.2f %8d %8s"
            % (
                label_width,
                m.label,
                r.requests_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.errors,
                "%.1f" % m.rss_mb if m.rss_mb is not None else "?",
            )
        )
    lines.append("")
    for name, value in ratios(measurements).items():
        lines.append("%s = %s" % (name, "n/a" if value is None else "%.2f" % value))
    lines.append("python: %s" % python_description)
    lines.append("cores: %d (wrk shares them with the server under test)" % cores)
    lines.append("wrk: %s" % wrk_settings)
    return "\n".join(lines)


def report_json(
    measurements: Sequence[Measurement],
    python_info: Mapping[str, str],
    cores: int,
    settings: Mapping[str, int],
) -> Dict[str, object]:
    """The machine-readable report (--json)."""
    rows = []
    for m in measurements:
        row: Dict[str, object] = {"name": m.name, "label": m.label, "error": m.error}
        if m.result is not None:
            r = m.result
            row.update(
                {
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
                    "rss_mb": m.rss_mb,
                }
            )
        rows.append(row)
    return {
        "results": rows,
        "ratios": ratios(measurements),
        "python": dict(python_info),
        "cores": cores,
        "wrk": dict(settings),
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
    url: str, data: Optional[Mapping[str, str]] = None, timeout: float = 5.0
) -> Tuple[int, bytes]:
    """GET (or POST a form when ``data`` is given); returns (status, body), any status."""
    body = urllib.parse.urlencode(data).encode("ascii") if data is not None else None
    request = urllib.request.Request(url, data=body, method="POST" if data else "GET")
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


def rss_mb(pid: int) -> Optional[float]:
    """VmRSS of ``pid`` and all its descendants, in MB; None if it is gone."""
    children = _proc_children()
    total_kb = 0
    found = False
    pending = [pid]
    while pending:
        current = pending.pop()
        pending.extend(children.get(current, ()))
        try:
            with open("/proc/%d/status" % current) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        found = True
                        break
        except OSError:
            continue
    return total_kb / 1024.0 if found else None


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
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait(timeout=grace)
            # Leftovers in the group (a worker that outlived its master).
            _signal_group(process.pid, signal.SIGKILL)
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
# The targets.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    threads: int
    connections: int
    duration: int
    python: str
    extra_kongtx_env: Tuple[Tuple[str, str], ...] = ()


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

    def start_stock(self) -> Server:
        command = [
            self.settings.python,
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

    def start_kongtx(self, name: str = "kongtx") -> Server:
        prefix = os.path.join(self.tmpdir, name)
        os.makedirs(prefix, exist_ok=True)
        # `python -m twisted` is `twist`, which has no -n/--pidfile: run twistd itself,
        # with the interpreter under test.
        command = [
            self.settings.python,
            "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "-n", "--pidfile=", "kongtx", "--prefix", prefix,
        ]
        env = kongtx_environment(
            os.environ,
            self.ports[name],
            self.ports["kongtx-admin"],
            REPO_ROOT,
            self.settings.extra_kongtx_env,
        )
        server = self.processes.start(name, command, env)
        admin = "http://127.0.0.1:%d" % self.ports["kongtx-admin"]
        proxy = "http://127.0.0.1:%d/" % self.ports[name]
        try:
            wait_until_http(server, admin + "/", None)
            self._admin_post(admin + "/services", {
                "name": "bench",
                "url": "http://127.0.0.1:%d/" % self.ports["upstream"],
            })
            self._admin_post(admin + "/services/bench/routes", {"paths[]": "/"})
            policy = KONGTX_POLICIES.get(name)
            if policy is not None:
                self._add_plugins(admin, policy)
            # The proxy serves from a snapshot rebuilt after the write: give it a moment.
            wait_until_http(server, proxy, 200 if policy is None else 401, timeout=10.0)
        except BenchError as e:
            raise server.failure(e)
        return server

    def _add_plugins(self, admin: str, policy: str) -> None:
        """key-auth and a rate limit that never blocks (every request still counts)."""
        self._admin_post(admin + "/consumers", {"username": "bench"})
        self._admin_post(admin + "/consumers/bench/key-auth", {"key": BENCH_KEY})
        self._admin_post(admin + "/services/bench/plugins", {"name": "key-auth"})
        form = {"name": "rate-limiting", "config.hour": "1000000000", "config.policy": policy}
        if policy == "redis":
            form["config.redis.host"] = "127.0.0.1"
        self._admin_post(admin + "/services/bench/plugins", form)

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

    def run_wrk(self, port: int, duration: int, latency: bool,
                headers: Sequence[str] = ()) -> str:
        s = self.settings
        command = wrk_command(self.tools["wrk"], port, s.threads, s.connections, duration, latency,
                              headers)
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
        if done.returncode != 0:
            last = output.strip().splitlines()[-1:] or [""]
            raise BenchError("wrk exited %d: %s" % (done.returncode, last[0]), output)
        return output

    def measure(self, name: str, server: Server, port: int) -> Measurement:
        """The 2 s warm-up, the measured run, then the server's RSS."""
        headers = ("apikey: %s" % BENCH_KEY,) if KONGTX_POLICIES.get(name) else ()
        log("%s: warm-up %d s" % (name, WARMUP_SECONDS))
        self.run_wrk(port, WARMUP_SECONDS, latency=False, headers=headers)
        log("%s: measuring %d s" % (name, self.settings.duration))
        output = self.run_wrk(port, self.settings.duration, latency=True, headers=headers)
        try:
            result = parse_wrk(output)
        except WrkParseError as e:
            raise BenchError("cannot read wrk's output: %s" % (e,), output)
        return Measurement(name, LABELS[name], result, rss_mb(server.process.pid))


def _read_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = "\n".join(text.strip().splitlines()[-lines:])
    return "--- %s ---\n%s" % (os.path.basename(path), tail) if tail else ""


def run_targets(bench: Bench, only: Sequence[str]) -> List[Measurement]:
    """Start, measure and stop each selected target in turn; failures become rows."""
    measurements: List[Measurement] = []
    try:
        upstream = bench.start_upstream()
    except BenchError as e:
        log("upstream failed: %s\n%s" % (e, e.detail))
        short = "upstream did not start: %s" % e
        return [Measurement(n, LABELS[n], error=short) for n in TARGET_NAMES if n in only]

    starters = {
        "upstream": lambda: upstream,
        "nginx": bench.start_nginx_proxy,
        "stock": bench.start_stock,
        "kongtx": bench.start_kongtx,
        "kongtx-plugins": lambda: bench.start_kongtx("kongtx-plugins"),
        "kongtx-plugins-redis": lambda: bench.start_kongtx("kongtx-plugins-redis"),
    }
    for name in TARGET_NAMES:
        if name not in only:
            continue
        port = bench.ports[name]
        server: Optional[Server] = None
        log("%s: starting on 127.0.0.1:%d" % (name, port))
        try:
            server = starters[name]()
            measurements.append(bench.measure(name, server, port))
        except BenchError as e:
            log("%s failed: %s\n%s" % (name, e, e.detail))
            measurements.append(Measurement(name, LABELS[name], error=str(e)))
        finally:
            if server is not None and server is not upstream:
                bench.processes.stop(server)
    return measurements


# ---------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Measure kongtx against an nginx keep-alive proxy and Twisted's stock "
        "ReverseProxyResource, all in front of the same nginx upstream.",
    )
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for kongtx and the stock proxy (default: %(default)s)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    parser.add_argument("--only", type=parse_only, default=TARGET_NAMES,
                        help="comma-separated subset of: %s" % ",".join(TARGET_NAMES))
    parser.add_argument("--extra-kongtx-env", type=parse_env_assignment, action="append",
                        default=[], metavar="K=V",
                        help="extra environment for kongtx (repeatable), e.g. KONG_NGINX_WORKER_PROCESSES=2")
    parser.add_argument("--json", action="store_true",
                        help="also print the results as one line of JSON after the table")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temp dir (configs, logs, kongtx prefix) for inspection")
    args = parser.parse_args(argv)
    for option in ("duration", "connections", "threads"):
        if getattr(args, option) < 1:
            parser.error("--%s must be at least 1" % option)
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads (wrk needs one per thread)")
    return args


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; 0 if every selected target was measured, 1 if one failed."""
    args = parse_args(argv)
    tools = ensure_tools()
    settings = Settings(
        threads=args.threads,
        connections=args.connections,
        duration=args.duration,
        python=args.python,
        extra_kongtx_env=tuple(args.extra_kongtx_env),
    )
    python_info = describe_python(args.python)
    cores = os.cpu_count() or 1

    tmpdir = tempfile.mkdtemp(prefix="kongtx-bench-")
    # nginx workers run as `nobody` when we are root: let them reach their temp dirs.
    os.chmod(tmpdir, 0o755)
    processes = Processes(tmpdir)
    previous_term = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    interrupted = False
    measurements: List[Measurement] = []
    try:
        names = TARGET_NAMES + ("kongtx-admin",)
        ports = dict(zip(names, free_ports(len(names))))
        bench = Bench(tools, settings, tmpdir, processes, ports, probe_nginx_temp_modules(tools["nginx"]))
        log("python under test: %s" % python_description(python_info))
        measurements = run_targets(bench, args.only)
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

    wrk_settings = "-t%d -c%d -d%ds --latency (after a %d s warm-up)" % (
        settings.threads, settings.connections, settings.duration, WARMUP_SECONDS
    )
    print(format_report(measurements, python_description(python_info), cores, wrk_settings))
    if args.json:
        settings_json = {
            "threads": settings.threads,
            "connections": settings.connections,
            "duration": settings.duration,
            "warmup": WARMUP_SECONDS,
        }
        print(json.dumps(report_json(measurements, python_info, cores, settings_json), sort_keys=True))
    return 0 if all(m.result is not None for m in measurements) else 1


if __name__ == "__main__":
    sys.exit(main())
