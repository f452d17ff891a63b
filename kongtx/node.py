"""One kongtx node's service tree: store, snapshot, proxy and Admin API.

A :class:`KongtxService` plays one of three roles:

* ``node``: everything in one process (the proxy and the Admin API on one
  reactor). Tests and embedders use it.
* ``master`` (what ``twistd kongtx`` runs): the store, the Admin API and a
  :class:`~kongtx.workers.supervisor.Supervisor` that binds the proxy's
  sockets and runs ``nginx_worker_processes`` workers.
* ``worker`` (a process the master starts): the proxy only, reading the
  configuration through the master (``kongtx.workers.remote.RemoteStore``)
  on the sockets the master bound.

In every role the listeners are bound before the reactor runs and accept
nothing until the first snapshot is built, and stopping drains the proxy:
in-flight requests finish (``nginx_main_worker_shutdown_timeout``).
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

import kongtx
from kongtx import tls
from kongtx.config import Config, ConfigError, ListenSpec

__all__ = [
    "KongtxService", "ServerStats", "StartupError", "fail", "node_id_for", "open_store",
    "last_known_config_path", "counters_path", "ROLES",
]

log = Logger()

ROLES = ("node", "master", "worker")


class StartupError(Exception):
    """A problem that stops start-up; ``str()`` is the one line the operator sees."""


def fail(message: str) -> "SystemExit":
    return SystemExit("Error: %s" % (message,))


def node_id_for(config: Config) -> str:
    """The node's id: ``node_id`` if set, else one generated once and kept in the prefix."""
    if getattr(config, "node_id", None):
        return str(config.node_id)
    path = config.prefix_path("node.id")
    try:
        with open(path) as f:
            value = f.read().strip()
        uuid.UUID(value)
        return value
    except (OSError, ValueError):
        value = str(uuid.uuid4())
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(value + "\n")
        os.replace(tmp, path)
        return value


def open_store(config: Config, reactor: Any, node_id: str) -> Any:
    """The store the configuration asks for (not started)."""
    from kongtx.schema import store_metas

    metas = store_metas()
    if config.database == "postgres":
        from kongtx.store.postgres import PostgresStore

        return PostgresStore.from_config(config, metas, reactor, node_id)
    if config.database == "sqlite":
        from kongtx.store.sqlite import SQLiteStore

        return SQLiteStore(metas, config.sqlite_path, reactor)
    if config.database == "off":
        from kongtx.store.memory import MemoryStore

        return MemoryStore(metas)
    raise StartupError(
        "database: '%s' is not available in this kongtx release" % (config.database,)
    )


def last_known_config_path(config: Config) -> Optional[str]:
    """Where the node saves the configuration it serves, for starting during a
    database outage: only a shared database can be unreachable."""
    if config.database != "postgres":
        return None
    return config.prefix_path("kongtx-config.json")


def counters_path(config: Config) -> str:
    """The shared-memory file the workers' ``local`` rate-limiting counters live in."""
    return config.prefix_path("kongtx-counters.shm")


def freeze_startup_objects() -> None:
    """Move everything alive now (modules, the first snapshot, the plugin classes)
    out of the garbage collector's sight before serving.

    A full collection otherwise walks all of them: 30-40 ms on CPython, a p99
    spike every time one runs; frozen, it takes under a millisecond. Done once:
    a later snapshot freed with a cycle in it would never be collected if it
    were frozen. PyPy's collector is incremental and has no ``gc.freeze``.
    """
    freeze = getattr(gc, "freeze", None)
    if freeze is not None:
        gc.collect()
        freeze()


class ServerStats:
    """Connection and request counters for ``GET /status``: this process's proxy
    site plus, on a master, what the workers last reported."""

    def __init__(self) -> None:
        self.sites: List[Any] = []
        self.gateway: Optional[Any] = None
        #: A master's ``Supervisor``: its workers' counters and memory.
        self.supervisor: Optional[Any] = None

    def local(self) -> Dict[str, int]:
        accepted = sum(getattr(s, "connections_accepted", 0) for s in self.sites)
        active = sum(getattr(s, "connections_active", 0) for s in self.sites)
        writing = sum(getattr(s, "requests_in_flight", 0) for s in self.sites)
        total = self.gateway.requests_total if self.gateway is not None else 0
        return {"total_requests": total, "connections_active": active,
                "connections_accepted": accepted, "connections_writing": writing}

    def workers_memory(self) -> List[Any]:
        """(pid, RSS bytes) of each worker a master runs; empty otherwise."""
        return self.supervisor.memory() if self.supervisor is not None else []

    def __call__(self) -> Dict[str, int]:
        counts = self.local()
        if self.supervisor is not None:
            for name, value in self.supervisor.stats().items():
                counts[name] = counts.get(name, 0) + value
        active, writing = counts["connections_active"], counts["connections_writing"]
        return {
            "total_requests": counts["total_requests"],
            "connections_active": active,
            "connections_accepted": counts["connections_accepted"],
            "connections_handled": counts["connections_accepted"],
            "connections_reading": 0,
            "connections_writing": writing,
            "connections_waiting": max(active - writing, 0),
        }


class KongtxService(service.MultiService):
    """Store, snapshot, upstream pool and the sites of one kongtx process.

    :param role: one of :data:`ROLES`.
    :param store: the store to use instead of opening the configured one (a
        worker's ``RemoteStore``).
    :param listen_fds: a worker's proxy sockets for each ``proxy_listen``
        entry, in order, adopted instead of bound.
    :param load_config: a master's way to read the configuration again on
        ``kongtx reload``.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        role: str = "node",
        store: Any = None,
        listen_fds: Sequence[Sequence[int]] = (),
        load_config: Optional[Callable[[], Config]] = None,
        python: Optional[str] = None,
    ) -> None:
        service.MultiService.__init__(self)
        if role not in ROLES:
            raise ValueError("role must be one of %s" % (", ".join(ROLES),))
        self.config = config
        self.reactor = reactor
        self.role = role
        self.serves_proxy = role != "master"
        self.serves_admin = role != "worker"
        self.ports: List[Any] = []
        self.store: Any = store
        self.snapshots: Any = None
        self.cache: Any = None
        self.plugins: Dict[str, type] = {}
        self.pool: Any = None
        self.proxy_site: Any = None
        self.admin_site: Any = None
        self.logs: Any = None
        self.supervisor: Any = None
        self.stats = ServerStats()
        self.ready: defer.Deferred = defer.Deferred()
        self._store_retry: Any = None
        self._listen_fds = list(listen_fds)
        self._load_config = load_config
        self._python = python or sys.executable
        self._rate_limiting_node: Optional[str] = None
        #: Seconds an idle keep-alive connection may still send a request while draining.
        self.drain_idle_grace: Optional[float] = None
        #: A failed start stops the reactor (the process); embedders sharing the
        #: reactor (in-process tests) turn this off and see ``ready`` fail instead.
        self.stop_reactor_on_failure = True
        #: Awaited after the first snapshot, before the listeners accept (a worker
        #: catches up with every change its master sent before it serves).
        self.before_serving: Optional[Callable[[], Any]] = None

    # -- start-up --------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Build the sites and bind every listener, paused until the store is ready.

        Runs before the reactor: a listener that cannot be bound stops start-up
        with one line.
        """
        service.MultiService.privilegedStartService(self)
        try:
            self._build()
            self._listen_all()
        except (ConfigError, StartupError) as exc:
            self._close_ports()
            if self.supervisor is not None:
                self.supervisor.close_sockets()
            raise fail(str(exc))

    def _build(self) -> None:
        from kongtx.plugins import PluginError, load_plugins
        from kongtx.snapshot import SnapshotManager
        from kongtx.logging.setup import LogService
        from kongtx.plugins import syslog as syslog_plugin

        config = self.config
        reactor = self.reactor
        if self.role != "worker":
            for name in config.unknown_properties:
                log.warn("unknown property '{name}' ignored", name=name)
        node_id = self.node_id = node_id_for(config)
        # Access and error logs, syslog, SIGUSR1 reopening, pids/kongtx.pid.
        # The syslog plugin sends to the same syslog as the node's own logs.
        syslog_plugin.set_address(config.syslog_address)
        self.logs = LogService(config, reactor, write_pid=self.role != "worker")
        self.logs.setServiceParent(self)
        try:
            self.plugins = load_plugins(config.plugins)
        except PluginError as exc:
            raise StartupError(str(exc))
        if self.store is None:
            self.store = open_store(config, reactor, node_id)
        self.snapshots = SnapshotManager(
            self.store, reactor,
            cache_path=last_known_config_path(config) if self.role != "worker" else None,
            plugins=self.plugins,
        )
        if self.serves_proxy:
            self._build_proxy(node_id)
        if self.role == "master":
            from kongtx.workers.supervisor import Supervisor

            self.supervisor = Supervisor(
                config, reactor, self.store, self.snapshots, python=self._python,
                counters_path=counters_path(config),
            )
            self.stats.supervisor = self.supervisor
            self.supervisor.on_reload = self.reload
            self.logs.reopen_listeners.append(self.supervisor.reopen_logs)
        if self.serves_admin:
            self._build_admin(node_id)

    def _build_proxy(self, node_id: str) -> None:
        from kongtx.cache import EntityCache
        from kongtx.proxy.client import UpstreamPool
        from kongtx.proxy.resource import GatewayResource, ProxySettings, ProxySite

        config = self.config
        reactor = self.reactor
        if "rate-limiting" in self.plugins:
            from kongtx.plugins import rate_limiting

            # The plugin's counters (local), store (cluster) and Redis clients, per node;
            # a worker's local counters are shared with the node's other workers.
            runtime = rate_limiting.install(node_id, reactor, self.store)
            if self.role == "worker":
                from kongtx.plugins.rate_limiting.shared import SharedCounters

                runtime.local = SharedCounters.attach(counters_path(config))
            self._rate_limiting_node = node_id
        self.pool = UpstreamPool(
            reactor,
            pool_size=config.upstream_keepalive_pool_size,
            max_requests=config.upstream_keepalive_max_requests,
            idle_timeout=float(config.upstream_keepalive_idle_timeout),
            tls_creator=tls.upstream_tls_creator(
                config.lua_ssl_trusted_certificate, config.lua_ssl_verify_depth
            ),
        )
        # The entity cache plugins read credentials through (``kong.cache``).
        self.cache = EntityCache.from_config(self.store, reactor, config)
        gateway = GatewayResource(self.snapshots, self.pool, ProxySettings(config), reactor,
                                  node_id=node_id, cache=self.cache)
        self.stats.gateway = gateway
        self.proxy_site = ProxySite(
            gateway,
            max_body_size=config.nginx_http_client_max_body_size,
            max_headers=config.lua_max_req_headers,
            max_header_size=config.client_max_header_size,
            header_timeout=config.nginx_http_client_header_timeout,
        )
        self.logs.install_access_log(self.proxy_site, config.proxy_access_log)
        self.stats.sites = [self.proxy_site]

    def _build_admin(self, node_id: str) -> None:
        from kongtx.admin import AdminResource, make_site
        from kongtx.snapshot import SettledStore

        config = self.config
        settlers = [self.snapshots.settled]
        if self.supervisor is not None:
            # An Admin API answer means every worker serves the change.
            settlers.append(self.supervisor.settled)
        admin = AdminResource(
            SettledStore(self.store, *settlers),
            reactor=self.reactor,
            node_id=node_id,
            hostname=socket.gethostname(),
            configuration=config.sanitized(),
            max_body_size=config.nginx_admin_client_max_body_size,
            server_stats=self.stats,
            version=kongtx.__version__,
            kong_version=kongtx.KONG_VERSION,
            plugins=self.plugins,
        )
        self.admin_site = make_site(admin)
        self.logs.install_access_log(self.admin_site, config.admin_access_log)

    def _listen_all(self) -> None:
        config = self.config
        if self.serves_proxy:
            self._listen_proxy()
        elif self.supervisor is not None:
            from kongtx.workers.sockets import ListenError

            # The master makes sure the default certificate exists before the
            # workers load it, then binds their sockets.
            if any(spec.ssl for spec in config.proxy_listen):
                self._tls_context("ssl_cert", "ssl_cert_key", "kong-default")
            try:
                self.supervisor.bind()
            except ListenError as exc:
                raise StartupError(str(exc))
        if self.serves_admin:
            context = None
            for spec in config.admin_listen:
                if spec.ssl and context is None:
                    context = self._tls_context("admin_ssl_cert", "admin_ssl_cert_key",
                                                "admin-kong-default")
                self.ports.append(self._listen("admin_listen", spec, self.admin_site,
                                               context if spec.ssl else None))

    def _listen_proxy(self) -> None:
        specs = self.config.proxy_listen
        context = None
        if any(spec.ssl for spec in specs):
            context = self._tls_context("ssl_cert", "ssl_cert_key", "kong-default")
        if self.role == "worker":
            for spec, fds in zip(specs, self._listen_fds):
                for fd in fds:
                    self.ports.append(self._adopt(spec, fd, context if spec.ssl else None))
            return
        for spec in specs:
            self.ports.append(self._listen("proxy_listen", spec, self.proxy_site,
                                           context if spec.ssl else None))

    def _tls_context(self, cert_prop: str, key_prop: str, basename: str) -> Any:
        config = self.config
        certs = list(getattr(config, cert_prop))
        keys = list(getattr(config, key_prop))
        if not certs:
            try:
                cert, key = tls.ensure_default_certificate(config.prefix_path("ssl"), basename)
            except OSError as exc:
                raise StartupError("%s: cannot create the default certificate: %s"
                                   % (cert_prop, exc))
            certs, keys = [cert], [key]
        try:
            return tls.server_context_factory(
                certs, keys, config.ssl_cipher_suite, config.ssl_ciphers, config.ssl_protocols
            )
        except Exception as exc:
            raise StartupError("%s: %s" % (cert_prop, exc))

    def _listen(self, prop: str, spec: ListenSpec, site: Any, context: Any) -> Any:
        for flag in spec.ignored_flags:
            log.info("{prop}: flag '{flag}' on {host}:{port} is accepted and ignored",
                     prop=prop, flag=flag, host=spec.host, port=spec.port)
        if spec.http2:
            log.info("{prop}: http2 on {host}:{port} is not served yet; HTTP/1.1 only",
                     prop=prop, host=spec.host, port=spec.port)
        backlog = spec.backlog or 511
        try:
            if context is not None:
                port = self.reactor.listenSSL(spec.port, site, context, backlog=backlog,
                                              interface=spec.host)
            else:
                port = self.reactor.listenTCP(spec.port, site, backlog=backlog,
                                              interface=spec.host)
        except CannotListenError as exc:
            reason = exc.socketError
            detail = getattr(reason, "strerror", None) or str(reason)
            raise StartupError("%s: cannot listen on %s:%d: %s"
                               % (prop, spec.host, spec.port, detail))
        # Accept nothing until the first snapshot is built.
        port.stopReading()
        return port

    def _adopt(self, spec: ListenSpec, fd: int, context: Any) -> Any:
        """Serve the proxy on a socket the master bound (a worker's listeners)."""
        factory: Any = self.proxy_site
        if context is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(context, False, self.proxy_site)
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        port = self.reactor.adoptStreamPort(fd, family, factory)
        os.close(fd)
        port.stopReading()
        return port

    def startService(self) -> None:
        service.MultiService.startService(self)
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._start_failed)

    async def _start(self) -> None:
        from kongtx.store.interface import StoreUnavailable

        store_error = None
        try:
            await self.store.start()
        except StoreUnavailable as exc:
            # The snapshot may still start from the last known configuration.
            store_error = exc
        except Exception as exc:
            raise StartupError("database: cannot open the %s store: %s"
                               % (self.config.database, exc))
        try:
            await self.snapshots.start(store_error=store_error)
        except Exception as exc:
            raise StartupError("database: cannot open the %s store: %s"
                               % (self.config.database, exc))
        if store_error is not None:
            self._retry_store_start(1.0)
        if self.supervisor is not None:
            # The Admin API opens once the workers serve: an answer from it means
            # the proxy serves what it says.
            self.supervisor.startService()
            try:
                await self.supervisor.first_generation_ready()
            except Exception as exc:
                raise StartupError("nginx_worker_processes: %s" % (exc,))
        if self.before_serving is not None:
            await self.before_serving()
        if self.role == "worker":
            # Not for role "node": an embedding process's objects are not ours to freeze.
            freeze_startup_objects()
        for port in self.ports:
            port.startReading()
        if self.role != "worker":
            for port in self.ports:
                address = port.getHost()
                log.info("kongtx {version} listening on {host}:{port}",
                         version=kongtx.__version__, host=address.host, port=address.port)
        self.ready.callback(self)

    def _retry_store_start(self, delay: float) -> None:
        """The database was unreachable at start: try ``store.start()`` again with
        backoff; once it works, reload every row from it."""

        def attempt() -> None:
            self._store_retry = None
            d = defer.maybeDeferred(self.store.start)

            def started(_: Any) -> defer.Deferred:
                log.info("database reachable: the {database} store is open",
                         database=self.config.database)
                return defer.ensureDeferred(self.snapshots.reload())

            def failed(_: Any) -> None:
                if self.running:
                    self._retry_store_start(min(delay * 2, 30.0))

            d.addCallbacks(started, failed)
            # A failed reload is logged and retried by the snapshot manager.
            d.addErrback(lambda _: None)

        self._store_retry = self.reactor.callLater(delay, attempt)

    def _start_failed(self, reason: Any) -> None:
        if reason.check(StartupError):
            sys.stderr.write("Error: %s\n" % (reason.value,))
            log.critical("{error}", error=reason.value)
        else:
            log.failure("kongtx failed to start", reason)
        self.ready.errback(reason)
        if self.stop_reactor_on_failure and self.reactor.running:
            self.reactor.stop()

    # -- kongtx reload -----------------------------------------------------------

    def reload(self) -> defer.Deferred:
        """Read the configuration again and replace the workers with ones that use
        it; fires when the new workers serve (a master's ``SIGHUP``)."""
        if self.supervisor is None or self._load_config is None:
            log.warn("reload: only a master process (twistd kongtx) reloads")
            return defer.succeed(None)
        try:
            config = self._load_config()
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: {error}", error=exc)
            return defer.succeed(None)
        return self.supervisor.reload(config)

    # -- shutdown --------------------------------------------------------------

    def _close_ports(self) -> List[defer.Deferred]:
        ports, self.ports = self.ports, []
        return [defer.maybeDeferred(p.stopListening) for p in ports]

    def stopService(self) -> defer.Deferred:
        """Stop accepting, let in-flight requests finish (bounded by
        ``nginx_main_worker_shutdown_timeout``), then close everything."""
        closing = self._close_ports()
        d = defer.DeferredList(closing, consumeErrors=True)
        if self.proxy_site is not None:
            from kongtx.proxy.drain import IDLE_GRACE, drain

            grace = IDLE_GRACE if self.drain_idle_grace is None else self.drain_idle_grace
            timeout = self.config.nginx_main_worker_shutdown_timeout
            d.addCallback(lambda _: drain(self.proxy_site, self.reactor, timeout, grace))
        if self.supervisor is not None:
            d.addCallback(lambda _: self.supervisor.stopService())
        d.addCallback(lambda _: self._stop_rest())
        return d

    def _stop_rest(self) -> defer.Deferred:
        waits = [defer.maybeDeferred(service.MultiService.stopService, self)]
        if self._store_retry is not None and self._store_retry.active():
            self._store_retry.cancel()
        self._store_retry = None
        if self.cache is not None:
            self.cache.close()
        if self.snapshots is not None:
            # Fires once the last known configuration is on disk.
            waits.append(self.snapshots.stop())
        if self.pool is not None:
            waits.append(defer.maybeDeferred(self.pool.close))
        if self.store is not None:
            waits.append(defer.maybeDeferred(self.store.stop))
        node_id = self._rate_limiting_node
        if node_id is not None:
            from kongtx.plugins import rate_limiting

            rate_limiting.uninstall(node_id)
        return defer.DeferredList(waits, consumeErrors=True)

    def addresses(self, site: Any) -> List[Any]:
        """The bound addresses serving ``site`` (for tests that listen on port 0)."""
        return [p.getHost() for p in self.ports if p.factory is site]
