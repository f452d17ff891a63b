"""``twistd kongtx``: command-line options and the service tree. Wiring only.

``makeService`` loads the configuration (``--conf``, ``--prefix`` and ``KONG_*``
environment variables), prepares the prefix directory and returns a
:class:`KongtxService` that opens the store, builds the first snapshot and then
serves the proxy and Admin API sites on the configured listeners.

A configuration problem stops start-up with one line naming the property.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from typing import Any, Dict, List, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

import kongtx
from kongtx import tls
from kongtx.config import Config, ConfigError, ListenSpec, load_config

log = Logger()


class Options(usage.Options):
    synopsis = "[--conf FILE] [--prefix DIR]"
    longdesc = (
        "Run the kongtx gateway: the proxy and the Kong-compatible Admin API. Every "
        "kong.conf property can also be set with a KONG_<NAME> environment variable."
    )
    optParameters = [
        ["conf", "c", None, "Configuration file in kong.conf format."],
        ["prefix", "p", None, "Prefix directory (overrides the 'prefix' property)."],
    ]


class StartupError(Exception):
    """A problem that stops start-up; ``str()`` is the one line the operator sees."""


def _fail(message: str) -> "SystemExit":
    return SystemExit("Error: %s" % (message,))


def makeService(options: Options) -> service.IService:
    """Build the service tree; exit with one line on a configuration problem."""
    try:
        config = load_config(options["conf"], os.environ, options["prefix"])
        prepare_prefix(config)
        preflight_listeners(config)
        check_database(config)
    except (ConfigError, StartupError) as exc:
        raise _fail(str(exc))
    from twisted.internet import reactor

    return KongtxService(config, reactor)


def prepare_prefix(config: Config) -> None:
    """Create the prefix directory (and ``logs/``, ``ssl/``) if needed."""
    for path in (config.prefix, config.prefix_path("logs"), config.prefix_path("ssl")):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise StartupError("prefix: cannot create %s: %s" % (path, exc.strerror))
        if not os.access(path, os.W_OK):
            raise StartupError("prefix: %s is not writable" % (path,))


def check_database(config: Config) -> None:
    """Refuse to start on a Postgres database that needs ``kongtx migrations``.

    Runs before the reactor (blocking is fine here). An unreachable database is not
    an error: the node starts from its last known configuration if it has one.
    """
    if config.database != "postgres":
        return
    from kongtx.store.interface import StoreUnavailable
    from kongtx.store.migrations import schema_problem_blocking
    from kongtx.store.postgres import PgSettings

    try:
        problem = schema_problem_blocking(PgSettings.from_config(config))
    except StoreUnavailable:
        return
    if problem is not None:
        raise StartupError(problem)


def preflight_listeners(config: Config) -> None:
    """Bind and release every configured address once, before twistd redirects
    output and daemonises, so "address in use" reaches the operator as one line."""
    for prop in ("proxy_listen", "admin_listen"):
        for spec in getattr(config, prop):
            family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
            probe = socket.socket(family, socket.SOCK_STREAM)
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((spec.host, spec.port))
            except OSError as exc:
                raise StartupError("%s: cannot listen on %s:%d: %s"
                                   % (prop, spec.host, spec.port, exc.strerror or exc))
            finally:
                probe.close()


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


class ServerStats:
    """Connection and request counters for ``GET /status``."""

    def __init__(self) -> None:
        self.sites: List[Any] = []
        self.gateway: Optional[Any] = None

    def __call__(self) -> Dict[str, int]:
        accepted = sum(getattr(s, "connections_accepted", 0) for s in self.sites)
        active = sum(getattr(s, "connections_active", 0) for s in self.sites)
        writing = sum(getattr(s, "requests_in_flight", 0) for s in self.sites)
        total = self.gateway.requests_total if self.gateway is not None else 0
        return {
            "total_requests": total,
            "connections_active": active,
            "connections_accepted": accepted,
            "connections_handled": accepted,
            "connections_reading": 0,
            "connections_writing": writing,
            "connections_waiting": max(active - writing, 0),
        }


class KongtxService(service.MultiService):
    """Store, snapshot, upstream pool and the two sites of one kongtx node."""

    def __init__(self, config: Config, reactor: Any) -> None:
        service.MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.ports: List[Any] = []
        self.store: Any = None
        self.snapshots: Any = None
        self.cache: Any = None
        self.plugins: Dict[str, type] = {}
        self.pool: Any = None
        self.proxy_site: Any = None
        self.admin_site: Any = None
        self.logs: Any = None
        self.ready: defer.Deferred = defer.Deferred()
        self._store_retry: Any = None

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
            raise _fail(str(exc))

    def _build(self) -> None:
        from kongtx.admin import AdminResource, make_site
        from kongtx.proxy.client import UpstreamPool
        from kongtx.proxy.resource import GatewayResource, ProxySettings, ProxySite
        from kongtx.plugins import PluginError, load_plugins
        from kongtx.snapshot import SettledStore, SnapshotManager
        from kongtx.cache import EntityCache
        from kongtx.logging.setup import LogService
        from kongtx.plugins import syslog as syslog_plugin

        config = self.config
        reactor = self.reactor
        for name in config.unknown_properties:
            log.warn("unknown property '{name}' ignored", name=name)
        node_id = node_id_for(config)
        # Access and error logs, syslog, SIGUSR1 reopening, pids/kongtx.pid.
        # The syslog plugin sends to the same syslog as the node's own logs.
        syslog_plugin.set_address(config.syslog_address)
        self.logs = LogService(config, reactor)
        self.logs.setServiceParent(self)
        try:
            self.plugins = load_plugins(config.plugins)
        except PluginError as exc:
            raise StartupError(str(exc))
        self.store = open_store(config, reactor, node_id)
        if "rate-limiting" in self.plugins:
            from kongtx.plugins import rate_limiting

            # The plugin's counters (local), store (cluster) and Redis clients, per node.
            rate_limiting.install(node_id, reactor, self.store)
            self._rate_limiting_node = node_id
        self.snapshots = SnapshotManager(
            self.store, reactor, cache_path=last_known_config_path(config),
            plugins=self.plugins,
        )
        self.pool = UpstreamPool(
            reactor,
            pool_size=config.upstream_keepalive_pool_size,
            max_requests=config.upstream_keepalive_max_requests,
            idle_timeout=float(config.upstream_keepalive_idle_timeout),
            tls_creator=tls.upstream_tls_creator(
                config.lua_ssl_trusted_certificate, config.lua_ssl_verify_depth
            ),
        )
        stats = ServerStats()
        # The entity cache plugins read credentials through (``kong.cache``).
        self.cache = EntityCache.from_config(self.store, reactor, config)
        gateway = GatewayResource(self.snapshots, self.pool, ProxySettings(config), reactor,
                                  node_id=node_id, cache=self.cache)
        stats.gateway = gateway
        self.proxy_site = ProxySite(
            gateway,
            max_body_size=config.nginx_http_client_max_body_size,
            max_headers=config.lua_max_req_headers,
            max_header_size=config.client_max_header_size,
        )
        admin = AdminResource(
            SettledStore(self.store, self.snapshots),
            reactor=reactor,
            node_id=node_id,
            hostname=socket.gethostname(),
            configuration=config.sanitized(),
            max_body_size=config.nginx_admin_client_max_body_size,
            server_stats=stats,
            version=kongtx.__version__,
            kong_version=kongtx.KONG_VERSION,
            plugins=self.plugins,
        )
        self.admin_site = make_site(admin)
        self.logs.install_access_log(self.proxy_site, config.proxy_access_log)
        self.logs.install_access_log(self.admin_site, config.admin_access_log)
        stats.sites = [self.proxy_site]

    def _listen_all(self) -> None:
        config = self.config
        for prop, specs, site, cert_prop, key_prop, basename in (
            ("proxy_listen", config.proxy_listen, self.proxy_site,
             "ssl_cert", "ssl_cert_key", "kong-default"),
            ("admin_listen", config.admin_listen, self.admin_site,
             "admin_ssl_cert", "admin_ssl_cert_key", "admin-kong-default"),
        ):
            context = None
            for spec in specs:
                if spec.ssl and context is None:
                    context = self._tls_context(cert_prop, key_prop, basename)
                self.ports.append(self._listen(prop, spec, site, context if spec.ssl else None))

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
        if spec.reuseport:
            log.info("{prop}: reuseport on {host}:{port} is accepted and ignored "
                     "(one process serves each listener)",
                     prop=prop, host=spec.host, port=spec.port)
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
        for port in self.ports:
            port.startReading()
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
        if self.reactor.running:
            self.reactor.stop()

    # -- shutdown --------------------------------------------------------------

    def _close_ports(self) -> List[defer.Deferred]:
        ports, self.ports = self.ports, []
        return [defer.maybeDeferred(p.stopListening) for p in ports]

    def stopService(self) -> defer.Deferred:
        service.MultiService.stopService(self)
        waits = self._close_ports()
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
        node_id = getattr(self, "_rate_limiting_node", None)
        if node_id is not None:
            from kongtx.plugins import rate_limiting

            rate_limiting.uninstall(node_id)
        return defer.DeferredList(waits, consumeErrors=True)

    def addresses(self, site: Any) -> List[Any]:
        """The bound addresses serving ``site`` (for tests that listen on port 0)."""
        return [p.getHost() for p in self.ports if p.factory is site]


def last_known_config_path(config: Config) -> Optional[str]:
    """Where the node saves the configuration it serves, for starting during a
    database outage: only a shared database can be unreachable."""
    if config.database != "postgres":
        return None
    return config.prefix_path("kongtx-config.json")

