"""The master's side of the workers: spawn, restart, forward, reload, drain.

The master binds the proxy's sockets (:class:`~kongtx.workers.sockets.ListenerSockets`)
and starts one worker process per slot with ``sys.executable -m
kongtx.workers.main``, giving it slot *i*'s sockets and one end of a socket
pair for the :class:`~kongtx.workers.channel.Channel`. Over the channel it
sends the worker its configuration, then every change event the master's
store reports, numbered; the worker answers with the number it has applied,
which is how an Admin API write waits until every worker serves it
(:meth:`Supervisor.settled`). The worker's store reads come back the other way.

* A worker that exits unexpectedly is logged and started again in its slot
  (at once, or with a growing delay if it keeps dying within seconds of
  starting).
* :meth:`Supervisor.reload` starts a new generation of workers with the new
  configuration and, once all of them serve, retires the old ones: they stop
  accepting and drain, so no connection is dropped.
* Stopping sends every worker ``SIGTERM``; each drains (bounded by
  ``nginx_main_worker_shutdown_timeout``) and exits; stragglers are killed.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python import failure

import kongtx
from kongtx.config import Config
from kongtx.snapshot import RELOAD_ENTITY, RELOAD_OP
from kongtx.store.interface import ChangeEvent
from kongtx.workers.channel import Channel
from kongtx.workers.remote import READ_OPS, event_to_message
from kongtx.workers.sockets import ListenerSockets

__all__ = ["Supervisor", "WorkerProcess", "SETTLE_TIMEOUT", "READY_TIMEOUT",
           "RESTART_DELAY_MAX"]

log = Logger()

#: Longest an Admin API write waits for the workers to apply it.
SETTLE_TIMEOUT = 5.0
#: Longest a new worker may take to serve before it counts as failed.
READY_TIMEOUT = 60.0
#: A worker that dies sooner than this after starting is restarted with a delay.
QUICK_DEATH = 5.0
#: The longest delay before restarting a worker that keeps dying.
RESTART_DELAY_MAX = 10.0
#: Extra seconds a stopping worker gets beyond the shutdown timeout before SIGKILL.
KILL_GRACE = 5.0

#: Properties only the master uses: a reload keeps the running values (a
#: restart applies them), so the workers never disagree with the master.
RESTART_ONLY = (
    "prefix", "database", "plugins", "admin_listen", "status_listen",
    "admin_access_log", "admin_error_log", "node_id",
) + tuple("pg_" + name for name in (
    "host", "port", "user", "password", "database", "schema", "ssl", "ssl_verify",
    "timeout", "max_concurrent_queries", "pool_size", "keepalive_timeout",
    "semaphore_timeout", "backlog",
))


_ON_PYPY = platform.python_implementation() == "PyPy"

#: PyPy's young-generation size for workers, unless ``PYPY_GC_NURSERY`` is set.
#: With PyPy's default (about the L2 cache) every minor collection promotes the
#: objects of the requests in flight, and the major collections that follow were
#: the proxy's p99 (25-50 ms at 50 connections). 16 MB brings it under 10 ms and
#: throughput up by half, for about 90 MB more RSS per worker, flat over a soak;
#: 32 MB was faster still but its RSS kept growing (docs/performance.md).
PYPY_NURSERY = "16MB"

#: How much of the old generation one step of PyPy's incremental major collection
#: marks, unless ``PYPY_GC_INCREMENT_STEP`` is set. PyPy's default is twice the
#: nursery (32 MB here): single steps held a worker's reactor 35-52 ms, the p99 of
#: the plugin benchmark. 4 MB steps pause under 10 ms; the steps' total time is
#: the same (docs/performance.md).
PYPY_INCREMENT_STEP = "4MB"


def worker_environment(environ: Mapping[str, str], pypy: bool) -> Dict[str, str]:
    """A worker's environment: the master's, with this kongtx importable and, on
    PyPy, :data:`PYPY_NURSERY` and :data:`PYPY_INCREMENT_STEP` unless the operator
    chose those GC settings."""
    env = dict(environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(kongtx.__file__)))
    env["PYTHONPATH"] = package_root + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if pypy and not env.get("PYPY_GC_NURSERY"):
        env["PYPY_GC_NURSERY"] = PYPY_NURSERY
    if pypy and not env.get("PYPY_GC_INCREMENT_STEP"):
        env["PYPY_GC_INCREMENT_STEP"] = PYPY_INCREMENT_STEP
    return env


class WorkerProcess(protocol.ProcessProtocol):
    """One worker process and its channel, as the master sees it."""

    def __init__(self, supervisor: "Supervisor", slot: int, generation: int,
                 config: Config) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.generation = generation
        self.config = config
        self.pid: Optional[int] = None
        self.channel: Optional[Channel] = None
        self.started_at = 0.0
        #: "starting" -> "ready" -> ("retiring") -> "exited"
        self.state = "starting"
        self.applied = 0
        #: Set when the worker asked for the newest change number: from then on
        #: it is about to serve, and Admin API writes wait for it.
        self.catching_up = False
        self.stats: Dict[str, int] = {}
        self.rss: Optional[int] = None
        self.ready: defer.Deferred = defer.Deferred()
        self.exited: defer.Deferred = defer.Deferred()
        self.expected_exit = False

    # -- ProcessProtocol ----------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def processEnded(self, reason: failure.Failure) -> None:
        self.state = "exited"
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        if not self.ready.called:
            self.ready.errback(RuntimeError(
                "worker %d exited before serving (its error is logged above)" % (self.slot,)))
            self.ready.addErrback(lambda _: None)
        self.supervisor.worker_ended(self, reason)
        self.exited.callback(None)

    # -- the channel ----------------------------------------------------------------

    def on_message(self, message: Dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "applied":
            self.applied = max(self.applied, int(message.get("seq", 0)))
            self.supervisor.check_settled()
        elif kind == "ready":
            if self.state == "starting":
                self.state = "ready"
            if not self.ready.called:
                self.ready.callback(self)
        elif kind == "stats":
            self.stats = {k: int(v) for k, v in (message.get("counts") or {}).items()}
            rss = message.get("rss")
            self.rss = int(rss) if isinstance(rss, int) else None

    def signal(self, signum: int) -> None:
        if self.state != "exited" and self.transport is not None:
            try:
                self.transport.signalProcess(signum)
            except Exception:
                pass


class _ChannelFactory(protocol.Factory):
    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: Any) -> Channel:
        return self.channel


class Supervisor:
    """Runs the node's workers. The master calls :meth:`bind` before the reactor
    runs (it may need privileges), :meth:`startService` once its own store and
    snapshot are ready, and :meth:`stopService` to drain and stop them.
    """

    def __init__(self, config: Config, reactor: Any, store: Any, snapshots: Any, *,
                 python: str = sys.executable, counters_path: Optional[str] = None) -> None:
        self.config = config
        self.reactor = reactor
        self.store = store
        self.snapshots = snapshots
        self.python = python
        self.counters_path = counters_path
        self.sockets: Optional[ListenerSockets] = None
        self.workers: Dict[int, WorkerProcess] = {}
        self.retiring: List[WorkerProcess] = []
        self.generation = 0
        self.seq = 0
        self.running = False
        self._settle_waiters: List[Tuple[int, defer.Deferred, Any]] = []
        self._restart_delays: Dict[int, float] = {}
        self._restart_timers: Dict[int, Any] = {}
        self._first_ready: defer.Deferred = defer.Deferred()
        self._old_sockets: List[Any] = []
        self._counters: Any = None
        #: Called on SIGHUP (the master's ``KongtxService.reload``).
        self.on_reload: Any = None

    # -- start and stop -----------------------------------------------------------

    def bind(self) -> None:
        """Bind the proxy's sockets (before the reactor runs; may raise ListenError)."""
        config = self.config
        self.sockets = ListenerSockets()
        self.sockets.serve(config.proxy_listen, config.worker_count)
        if self.counters_path is not None:
            from kongtx.plugins.rate_limiting.shared import SharedCounters

            self._counters = SharedCounters.create(self.counters_path)

    def close_sockets(self) -> None:
        if self.sockets is not None:
            self.sockets.close()

    def addresses(self) -> List[Tuple[str, int]]:
        return self.sockets.addresses() if self.sockets is not None else []

    def startService(self) -> None:
        self.running = True
        self.store.add_listener(self._on_change)
        self.snapshots.add_reload_listener(self._on_reload)
        self._install_signals()
        self.generation += 1
        for slot in range(self.config.worker_count):
            self._spawn(slot, self.generation, self.config)
        ready = [w.ready for w in self.workers.values()]
        d = defer.DeferredList(ready, fireOnOneErrback=True, consumeErrors=True)

        def served(_: Any) -> None:
            log.info("{count} worker process(es) serving the proxy on {addresses}",
                     count=len(self.workers), addresses=self._address_text())
            self._first_ready.callback(None)

        def failed(reason: failure.Failure) -> None:
            error = reason.value.subFailure if hasattr(reason.value, "subFailure") else reason
            self._first_ready.errback(error)

        d.addCallbacks(served, failed)

    def first_generation_ready(self) -> defer.Deferred:
        """Fires when the first workers serve; fails if one dies before that."""
        return self._first_ready

    def stopService(self) -> defer.Deferred:
        """SIGTERM every worker; fires when all have exited (killing stragglers)."""
        self.running = False
        self.store.remove_listener(self._on_change)
        for timer in self._restart_timers.values():
            if timer.active():
                timer.cancel()
        self._restart_timers.clear()
        workers = list(self.workers.values()) + list(self.retiring)
        for worker in workers:
            worker.expected_exit = True
            worker.signal(signal.SIGTERM)
        # New connections are refused from now on; the workers keep their copies
        # of the sockets only until they stop accepting.
        self.close_sockets()
        pending = [w.exited for w in workers if w.state != "exited"]
        timer = self.reactor.callLater(
            self.config.nginx_main_worker_shutdown_timeout + KILL_GRACE, self._kill, workers)
        d = defer.DeferredList(pending)

        def done(_: Any) -> None:
            if timer.active():
                timer.cancel()
            for old in self._old_sockets:
                old.close()
            self._old_sockets = []
            if self._counters is not None:
                self._counters.close()
                self._counters = None
                try:
                    os.unlink(self.counters_path)  # type: ignore[arg-type]
                except OSError:
                    pass
            for _, waiter, t in self._settle_waiters:
                if t.active():
                    t.cancel()
                waiter.callback(None)
            self._settle_waiters = []

        return d.addCallback(done)

    def _kill(self, workers: List[WorkerProcess]) -> None:
        for worker in workers:
            if worker.state != "exited":
                log.warn("worker {slot} (pid {pid}) did not stop in time: killing it",
                         slot=worker.slot, pid=worker.pid)
                worker.signal(signal.SIGKILL)

    def _install_signals(self) -> None:
        """SIGHUP reloads; SIGQUIT stops gracefully (as SIGTERM does), like Kong's
        ``kong reload`` and ``kong quit``."""
        try:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._sighup))
            signal.signal(signal.SIGQUIT, lambda *_: self.reactor.callFromThread(self._sigquit))
        except ValueError:
            pass  # not the main thread (tests, embedding)

    def _sighup(self) -> None:
        log.info("SIGHUP: reloading the configuration")
        if self.on_reload is not None:
            self.on_reload()

    def _sigquit(self) -> None:
        log.info("SIGQUIT: stopping gracefully")
        if self.reactor.running:
            self.reactor.stop()

    # -- workers --------------------------------------------------------------------

    def _spawn(self, slot: int, generation: int, config: Config) -> WorkerProcess:
        sockets = self.sockets
        assert sockets is not None
        worker = WorkerProcess(self, slot, generation, config)
        channel = Channel(worker.on_message,
                          lambda op, args: self._handle_call(op, args, worker),
                          lambda reason: None)
        worker.channel = channel
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: Dict[int, Any] = {0: "w", 1: 1, 2: 2, 3: child_end.fileno()}
        # The worker's descriptors for each proxy_listen entry, from 4 on.
        listen_fds: List[List[int]] = []
        for fds in sockets.fds(slot):
            listen_fds.append([])
            for fd in fds:
                child_fd = len(child_fds)  # 0-3 are taken: the next free number
                child_fds[child_fd] = fd
                listen_fds[-1].append(child_fd)
        env = worker_environment(os.environ, self.python == sys.executable and _ON_PYPY)
        args = [self.python, "-m", "kongtx.workers.main", "3"]
        try:
            self.reactor.spawnProcess(worker, self.python, args, env=env, childFDs=child_fds)
        finally:
            child_end.close()
        self.reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX,
                                           _ChannelFactory(channel))
        parent_end.close()
        worker.started_at = self.reactor.seconds()
        channel.send({
            "t": "setup",
            "values": dict(config.raw_values),
            "source_path": config.source_path,
            "unknown": list(config.unknown_properties),
            "slot": slot,
            "listen_fds": listen_fds,
            "seq": self.seq,
        })
        if generation == self.generation:
            self.workers[slot] = worker
        log.info("worker {slot} started (pid {pid})", slot=slot, pid=worker.pid)
        return worker

    def worker_ended(self, worker: WorkerProcess, reason: failure.Failure) -> None:
        if worker in self.retiring:
            self.retiring.remove(worker)
        current = self.workers.get(worker.slot) is worker
        if not current:
            self.check_settled()
            return
        if worker.expected_exit or not self.running:
            del self.workers[worker.slot]
            self.check_settled()
            return
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = "signal %s" % (sig,) if sig else "status %s" % (code,)
        lived = self.reactor.seconds() - worker.started_at
        delay = 0.0
        if lived < QUICK_DEATH:
            delay = min(max(self._restart_delays.get(worker.slot, 0.0) * 2, 0.5),
                        RESTART_DELAY_MAX)
        self._restart_delays[worker.slot] = delay
        log.error("worker {slot} (pid {pid}) exited unexpectedly ({how}); restarting it"
                  "{later}", slot=worker.slot, pid=worker.pid, how=how,
                  later=" in %gs" % (delay,) if delay else "")
        self.check_settled()

        def restart() -> None:
            self._restart_timers.pop(worker.slot, None)
            if self.running and self.workers.get(worker.slot) is worker:
                self._spawn(worker.slot, self.generation, self.config)

        self._restart_timers[worker.slot] = self.reactor.callLater(delay, restart)

    def stats(self) -> Dict[str, int]:
        """The sum of the counters every serving worker last reported."""
        total: Dict[str, int] = {}
        for worker in list(self.workers.values()) + self.retiring:
            for name, value in worker.stats.items():
                total[name] = total.get(name, 0) + value
        return total

    def memory(self) -> List[Tuple[int, Optional[int]]]:
        """(pid, RSS bytes as last reported) of every serving worker, by slot."""
        return [(w.pid, w.rss) for _, w in sorted(self.workers.items())
                if w.pid is not None and w.state == "ready" and w.rss is not None]

    def reopen_logs(self) -> None:
        """Tell every worker to reopen its log files (after the master did)."""
        for worker in list(self.workers.values()) + self.retiring:
            worker.signal(signal.SIGUSR1)

    def _address_text(self) -> str:
        return ", ".join("%s:%d" % address for address in self.addresses())

    # -- change events and the workers' reads -----------------------------------------

    def _broadcast(self, event: Dict[str, Any]) -> None:
        self.seq += 1
        message = {"t": "event", "seq": self.seq, "event": event}
        for worker in list(self.workers.values()) + self.retiring:
            if worker.channel is not None:
                worker.channel.send(message)

    def _on_change(self, event: ChangeEvent) -> None:
        if event.entity == RELOAD_ENTITY:
            # Forwarded by _on_reload, once the master's own rows are fresh.
            return
        self._broadcast(event_to_message(event))

    def _on_reload(self) -> None:
        self._broadcast({"entity": RELOAD_ENTITY, "op": RELOAD_OP, "id": "",
                         "old": None, "new": None})

    def _handle_call(self, op: str, args: list, worker: Optional[WorkerProcess] = None) -> Any:
        if op == "seq":
            if worker is not None:
                worker.catching_up = True
            return self.seq
        if op not in READ_OPS:
            raise ValueError("workers may not call %r" % (op,))
        if op == "all" and self.snapshots.tracks(args[0]) and not (len(args) > 1 and args[1]):
            # The master's own rows: consistent with the events forwarded so far,
            # and there even while the database is unreachable.
            return self.snapshots.rows(args[0])
        # Results cross as JSON (a page's (rows, offset) tuple becomes a list).
        return defer.maybeDeferred(getattr(self.store, op), *args)

    def settled(self) -> defer.Deferred:
        """Fires once every worker has applied every change sent so far (or after
        :data:`SETTLE_TIMEOUT`, logged: a stuck worker does not hang the Admin API)."""
        target = self.seq
        if self._settled_for(target):
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()

        def too_slow() -> None:
            for i, (_, waiter, _t) in enumerate(self._settle_waiters):
                if waiter is d:
                    del self._settle_waiters[i]
                    break
            slow = [w.slot for w in self._lagging(target)]
            log.warn("worker(s) {slots} did not apply a change within {timeout:g}s",
                     slots=slow, timeout=SETTLE_TIMEOUT)
            d.callback(None)

        timer = self.reactor.callLater(SETTLE_TIMEOUT, too_slow)
        self._settle_waiters.append((target, d, timer))
        return d

    def _lagging(self, target: int) -> List[WorkerProcess]:
        # A starting worker catches up before it accepts (``seq``): only serving
        # workers are waited for.
        return [w for w in self.workers.values()
                if (w.state == "ready" or (w.state == "starting" and w.catching_up))
                and w.applied < target]

    def _settled_for(self, target: int) -> bool:
        return not self._lagging(target)

    def check_settled(self) -> None:
        waiters, self._settle_waiters = self._settle_waiters, []
        for target, d, timer in waiters:
            if self._settled_for(target):
                if timer.active():
                    timer.cancel()
                d.callback(None)
            else:
                self._settle_waiters.append((target, d, timer))

    # -- kongtx reload ----------------------------------------------------------------

    def reload(self, config: Config) -> defer.Deferred:
        """Start workers with *config*; once they all serve, retire the current ones.

        Master-only properties (:data:`RESTART_ONLY`) keep their running values.
        Fires when the switch is done (or abandoned: the old workers stay).
        """
        from kongtx.config import config_from_values

        running = dict(self.config.raw_values)
        wanted = dict(config.raw_values)
        kept = sorted(name for name in RESTART_ONLY if running.get(name) != wanted.get(name))
        for name in kept:
            if name in running:
                wanted[name] = running[name]
            else:
                wanted.pop(name, None)
        if kept:
            log.warn("reload: {names} changed; a restart applies them", names=", ".join(kept))
        config = config_from_values(wanted, config.source_path, config.unknown_properties)
        from kongtx.workers.sockets import ListenError

        assert self.sockets is not None
        old_config = self.config
        old_layout = self.sockets.layout()
        try:
            gone = self.sockets.serve(config.proxy_listen, config.worker_count)
        except ListenError as exc:
            log.error("reload refused, the running configuration stays: {error}", error=exc)
            return defer.succeed(None)
        old_workers = list(self.workers.values())
        self.config = config
        self.generation += 1
        generation = self.generation
        self.workers = {}
        for slot in range(config.worker_count):
            self._spawn(slot, generation, config)
        log.info("reload: starting {count} worker(s) with the new configuration",
                 count=config.worker_count)
        new_workers = list(self.workers.values())
        d = defer.DeferredList([w.ready for w in new_workers], fireOnOneErrback=True,
                               consumeErrors=True)
        timer = self.reactor.callLater(READY_TIMEOUT, d.cancel)

        def switched(_: Any) -> None:
            if timer.active():
                timer.cancel()
            self._retire(old_workers)
            self._close_when_exited(gone, old_workers)
            log.info("reload: done; {count} worker(s) serve the new configuration",
                     count=len(new_workers))

        def abandoned(reason: failure.Failure) -> None:
            if timer.active():
                timer.cancel()
            log.error("reload failed, the running configuration stays: a new worker "
                      "did not start")
            self.config = old_config
            assert self.sockets is not None
            # The old workers keep exactly the sockets they had (including those of
            # addresses the new configuration dropped); the ones bound for the new
            # workers close once those are gone.
            added = self.sockets.restore(old_layout)
            self.workers = {w.slot: w for w in old_workers}
            self.generation += 1
            for worker in new_workers:
                worker.expected_exit = True
                worker.signal(signal.SIGKILL)
            self._close_when_exited(added, new_workers)
            for worker in old_workers:
                worker.generation = self.generation

        d.addCallbacks(switched, abandoned)
        return d

    def _retire(self, workers: List[WorkerProcess]) -> None:
        for worker in workers:
            if worker.state == "exited":
                continue
            worker.expected_exit = True
            worker.state = "retiring"
            self.retiring.append(worker)
            worker.signal(signal.SIGTERM)

    def _close_when_exited(self, sockets: List[Any], workers: List[WorkerProcess]) -> None:
        """Close *sockets* (addresses no longer served) once *workers* are gone."""
        self._old_sockets.extend(sockets)

        def close(_: Any) -> None:
            for sock in sockets:
                if sock in self._old_sockets:
                    self._old_sockets.remove(sock)
                    sock.close()

        defer.DeferredList([w.exited for w in workers]).addCallback(close)
