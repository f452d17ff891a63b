"""Wiring kongtx's own logs: access logs, error logs, syslog, reopening, the pid file.

Each of ``proxy_access_log``, ``admin_access_log``, ``proxy_error_log`` and
``admin_error_log`` names a *target*: a file path (relative to the prefix),
``/dev/stdout``, ``/dev/stderr``, ``syslog`` (the :class:`SyslogObserver` configured by
``syslog_address``/``syslog_facility``) or ``off``.

:class:`LogService` (a child of the node's service) opens the files, adds one error
log observer per distinct target to the global log publisher (filtered by
``log_level``; twistd's own observers keep working), writes ``<prefix>/pids/kongtx.pid``
and reopens every file on ``SIGUSR1`` (chaining to a handler installed before it,
such as twistd's own log rotation). ``kongtx reopen-logs`` sends that signal.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import attr
from twisted.application import service
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from zope.interface import implementer

from kongtx.logging.access import AccessLogger, FileLogWriter
from kongtx.logging.syslog import (
    KONG_LOG_LEVELS,
    SyslogObserver,
    event_text,
    observer_from_config,
    severity_of,
)

log = Logger()

#: Where the running node records its process id, relative to the prefix.
PID_FILE = os.path.join("pids", "kongtx.pid")

#: Error log level names by syslog severity (nginx's names).
LEVEL_NAMES = ("emerg", "alert", "crit", "error", "warn", "notice", "info", "debug")

OFF = "off"
SYSLOG = "syslog"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LogTarget:
    """Where one log goes: ``kind`` is ``off``, ``syslog`` or ``file`` (with ``path``)."""

    kind: str
    path: Optional[str] = None


def parse_target(value: str, prefix: str) -> LogTarget:
    """A log property's value as a :class:`LogTarget`; relative paths are in *prefix*."""
    value = (value or "").strip()
    if not value or value == OFF:
        return LogTarget(OFF)
    if value == SYSLOG:
        return LogTarget(SYSLOG)
    if value in ("/dev/stdout", "/dev/stderr"):
        return LogTarget("file", value)
    return LogTarget("file", value if os.path.isabs(value) else os.path.join(prefix, value))


def format_error_line(event: Mapping[str, Any], pid: int) -> Tuple[int, str]:
    """``(severity, "2026/11/28 08:02:59 [notice] 1234#0: text")``, nginx's error log
    layout; continuation lines (tracebacks) follow as they are."""
    severity = severity_of(event)
    when = event.get("log_time") or time.time()
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(when))
    return severity, "%s [%s] %d#0: %s" % (stamp, LEVEL_NAMES[severity], pid,
                                           event_text(event).rstrip("\n"))


@implementer(ILogObserver)
class ErrorLogObserver:
    """Write events at or above *min_severity* to a :class:`FileLogWriter`."""

    def __init__(self, writer: FileLogWriter, min_severity: int,
                 pid: Optional[int] = None) -> None:
        self.writer = writer
        self.min_severity = min_severity
        self.pid = os.getpid() if pid is None else pid

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            severity, line = format_error_line(event, self.pid)
            if severity <= self.min_severity:
                self.writer.write(line)
        except Exception:
            pass


def timed_request_factory(cls: type, clock: Callable[[], float]) -> type:
    """A subclass of the request class *cls* that records when each request began
    (``kongtx_log_started``), for the access line's ``request_time``."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        self.kongtx_log_started = clock()

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def _no_access_log(request: Any) -> None:
    """Access logging switched off."""


class LogService(service.Service):
    """kongtx's logs for one node: build it from the configuration, attach the sites
    with :meth:`install_access_log`, and add it to the node's service first."""

    name = "kongtx-logs"

    def __init__(self, config: Any, reactor: Any, *, publisher: Any = globalLogPublisher,
                 install_signal: bool = True, syslog: Optional[SyslogObserver] = None,
                 write_pid: bool = True) -> None:
        self.config = config
        self.write_pid = write_pid
        #: Called after every :meth:`reopen` (a master tells its workers).
        self.reopen_listeners: List[Callable[[], None]] = []
        self.reactor = reactor
        self.publisher = publisher
        self.install_signal = install_signal
        self._syslog = syslog
        self._writers: Dict[str, FileLogWriter] = {}
        self._observers: List[Any] = []
        self._previous_handler: Any = None
        self._signal_installed = False
        self.pid_path = config.prefix_path(PID_FILE)
        self.reopened = 0
        min_severity = KONG_LOG_LEVELS.get(config.log_level, 5)
        seen = set()
        for prop in ("proxy_error_log", "admin_error_log"):
            target = parse_target(getattr(config, prop), config.prefix)
            key = target.path or target.kind
            if target.kind == OFF or key in seen:
                continue
            seen.add(key)
            if target.kind == SYSLOG:
                self._observers.append(self.syslog_observer())
            else:
                self._observers.append(ErrorLogObserver(self._writer(target.path), min_severity))

    # -- building -----------------------------------------------------------------

    def syslog_observer(self) -> SyslogObserver:
        """The node's one syslog observer (created on first use)."""
        if self._syslog is None:
            self._syslog = observer_from_config(self.config)
        return self._syslog

    def _writer(self, path: str) -> FileLogWriter:
        writer = self._writers.get(path)
        if writer is None:
            writer = self._writers[path] = FileLogWriter(path, self.reactor)
        return writer

    def install_access_log(self, site: Any, value: str) -> None:
        """Make *site* log each request to the target *value* (or not at all)."""
        target = parse_target(value, self.config.prefix)
        if target.kind == OFF:
            # twisted.web would otherwise send every access line to the global log.
            site.log = _no_access_log
            return
        if target.kind == SYSLOG:
            sink = self.syslog_observer().send_line
        else:
            sink = self._writer(target.path).write  # type: ignore[arg-type]
        site.log = AccessLogger(sink, self.reactor.seconds)
        site.requestFactory = timed_request_factory(site.requestFactory, self.reactor.seconds)

    # -- life cycle -----------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        for writer in self._writers.values():
            try:
                writer.open()
            except OSError as exc:
                log.error("cannot open log file {path}: {error}", path=writer.path,
                          error=exc.strerror or exc)
        for observer in self._observers:
            self.publisher.addObserver(observer)
        if self.write_pid:
            self._write_pid()
        if self.install_signal:
            self._install_signal()

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._signal_installed:
            self._signal_installed = False
            try:
                signal.signal(signal.SIGUSR1, self._previous_handler or signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        for observer in self._observers:
            self.publisher.removeObserver(observer)
        for writer in self._writers.values():
            writer.close()
        if self._syslog is not None:
            self._syslog.close()
        if self.write_pid:
            self._remove_pid()

    def reopen(self) -> None:
        """Reopen every log file (after logrotate renamed them)."""
        for writer in self._writers.values():
            writer.reopen()
        self.reopened += 1
        log.info("log files reopened")
        for callback in list(self.reopen_listeners):
            try:
                callback()
            except Exception:
                log.failure("reopen listener failed")

    # -- SIGUSR1 and the pid file ----------------------------------------------------------

    def _install_signal(self) -> None:
        try:
            previous = signal.getsignal(signal.SIGUSR1)
            signal.signal(signal.SIGUSR1, self._on_signal)
        except ValueError:
            # Not the main thread: no signal handling (tests, embedding).
            return
        self._previous_handler = previous
        self._signal_installed = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reopen)
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)

    def _write_pid(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.pid_path), exist_ok=True)
            tmp = self.pid_path + ".tmp"
            with open(tmp, "w") as f:
                f.write("%d\n" % (os.getpid(),))
            os.replace(tmp, self.pid_path)
        except OSError as exc:
            log.warn("cannot write {path}: {error}", path=self.pid_path,
                     error=exc.strerror or exc)

    def _remove_pid(self) -> None:
        try:
            with open(self.pid_path) as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:
                os.unlink(self.pid_path)
        except OSError:
            pass


class NotRunning(Exception):
    """No running kongtx node in the prefix; ``str()`` is the operator's one line."""


def running_pid(prefix: str) -> int:
    """The pid of the node running in *prefix*. Raises :class:`NotRunning`."""
    path = os.path.join(prefix, PID_FILE)
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        raise NotRunning("kongtx is not running in %s (no valid %s)" % (prefix, path))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise NotRunning("kongtx is not running in %s (stale %s: no process %d)"
                         % (prefix, path, pid))
    except PermissionError:
        pass
    return pid


def signal_reopen(prefix: str) -> int:
    """Ask the node running in *prefix* to reopen its log files; returns its pid."""
    pid = running_pid(prefix)
    os.kill(pid, signal.SIGUSR1)
    return pid


__all__: Tuple[str, ...] = (
    "LogService", "LogTarget", "ErrorLogObserver", "NotRunning", "parse_target",
    "format_error_line", "running_pid", "signal_reopen", "timed_request_factory", "PID_FILE",
)
