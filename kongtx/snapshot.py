"""The immutable configuration a node serves from, its rebuild on change events,
and the copy of it kept on disk for a database outage.

The proxy never reads the store while serving a request: it reads
``SnapshotManager.current``, a :class:`Snapshot` holding the compiled router and the
services by id. The manager loads every row once at start, then keeps its own copy
of the rows up to date from the store's change events and compiles a new snapshot
when they change. A burst of writes gives one rebuild; requests in flight keep the
snapshot they started with.

With a ``cache_path``, the rows of every successful build are also saved there
(the "last known configuration"). A node that starts while the database is
unreachable builds its snapshot from that file, says so in its log, and keeps
trying the database with backoff until it can reload everything from it. A
store's ``reload`` event (``ChangeEvent(entity="*", op="reload", ...)``, sent
after an outage long enough for change events to have been missed) makes the
manager fetch every row again.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attr
from twisted.internet import defer, threads
from twisted.logger import Logger

from kongtx.pipeline import EMPTY_INDEX, PluginIndex, build_plugin_index
from kongtx.router import FallbackRouter, RouteSpec, Router
from kongtx.schema.apis import api_paths
from kongtx.schema.services import parse_url
from kongtx.store.interface import StoreUnavailable

log = Logger()

#: Entities whose rows make up the proxy's snapshot (and the file on disk).
SNAPSHOT_ENTITIES = ("services", "routes", "plugins", "apis")

#: Snapshot entities a store may not know yet (read as empty if it does not).
OPTIONAL_ENTITIES = frozenset(["plugins", "apis"])

#: The ``version`` field of the last-known-configuration file this code writes and reads.
CACHE_FORMAT_VERSION = 1

#: Seconds between a rebuild and the file write that saves it (a burst of
#: rebuilds inside this window gives one write).
CACHE_WRITE_DELAY = 1.0

#: Backoff between attempts to reload every row after a failure (seconds).
RETRY_INITIAL = 1.0
RETRY_MAX = 30.0

#: The store's "reload everything" event.
RELOAD_ENTITY = "*"
RELOAD_OP = "reload"

MSG_SERVING_FROM_DISK = (
    "database unreachable ({reason}); serving the last known configuration "
    "from {path} written at {written_at}"
)
MSG_RELOAD_FAILED = (
    "could not reload the configuration from the database ({reason}); "
    "the current configuration stays in use, retrying with backoff"
)
MSG_RELOADED = "configuration reloaded from the database after {failures} failed attempt(s)"
MSG_BACK_FROM_DISK = (
    "database reachable again; the configuration is now served from the database "
    "(was the file written at {written_at})"
)
MSG_CACHE_WRITE_FAILED = "could not save the last known configuration to {path}: {error}"
MSG_CACHE_UNUSABLE = "the last known configuration in %s cannot be used: %s"
MSG_REBUILD_FAILED = "could not rebuild router (stale router will be used)"

_DEFAULT_PORTS = {"http": 80, "https": 443}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ServiceSpec:
    """What the proxy needs of a service, precomputed (timeouts in seconds)."""

    id: str
    name: Optional[str]
    protocol: str
    host: str
    port: int
    path: Optional[str]
    retries: int
    connect_timeout: float
    write_timeout: float
    read_timeout: float
    tls_verify: bool
    enabled: bool
    #: The ``Host`` header sent upstream when the route does not preserve the host.
    host_header: bytes

    @classmethod
    def from_row(cls, row: Dict[str, Any]) -> "ServiceSpec":
        host = row["host"]
        port = int(row["port"])
        protocol = row.get("protocol") or "http"
        shown = "[%s]" % (host,) if ":" in host else host
        if _DEFAULT_PORTS.get(protocol) != port:
            shown = "%s:%d" % (shown, port)
        return cls(
            id=row["id"],
            name=row.get("name"),
            protocol=protocol,
            host=host,
            port=port,
            path=row.get("path"),
            retries=int(row.get("retries") if row.get("retries") is not None else 5),
            connect_timeout=int(row.get("connect_timeout") or 60000) / 1000.0,
            write_timeout=int(row.get("write_timeout") or 60000) / 1000.0,
            read_timeout=int(row.get("read_timeout") or 60000) / 1000.0,
            tls_verify=bool(row.get("tls_verify")),
            enabled=row.get("enabled", True) is not False,
            host_header=shown.encode("idna" if not shown.isascii() else "ascii"),
        )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Snapshot:
    """One consistent view of the configuration: never mutated once built."""

    router: Router
    services: Dict[str, ServiceSpec]
    version: int
    #: Plugin configurations and the precomputed chain of every route.
    plugins: PluginIndex = EMPTY_INDEX


def build_snapshot(
    rows: Dict[str, Dict[str, Dict[str, Any]]],
    version: int,
    plugin_classes: Optional[Mapping[str, type]] = None,
    previous: Optional[Snapshot] = None,
) -> Snapshot:
    """Compile rows (entity -> id -> row) into a :class:`Snapshot`. Pure.

    ``plugin_classes`` are the plugins enabled on this node (none if ``None``);
    plugin instances of ``previous`` whose rows did not change are kept.
    """
    services = {}
    for row in rows.get("services", {}).values():
        try:
            spec = ServiceSpec.from_row(row)
        except (KeyError, TypeError, ValueError) as exc:
            log.warn("skipping service {id}: {error}", id=row.get("id"), error=exc)
            continue
        if spec.enabled:
            services[spec.id] = spec
    routes = []
    for row in rows.get("routes", {}).values():
        try:
            routes.append(RouteSpec.from_row(row))
        except (KeyError, TypeError, ValueError) as exc:
            log.warn("skipping route {id}: {error}", id=row.get("id"), error=exc)
    # Kong: routes of a disabled service are not routable at all.
    disabled = {
        row["id"] for row in rows.get("services", {}).values() if row.get("enabled") is False
    }
    routes = [r for r in routes if r.service_id not in disabled]
    router: Any = Router(routes)
    api_routes, api_route_rows, api_service_rows = _legacy_apis(rows.get("apis") or {})
    if api_routes:
        for row in api_service_rows.values():
            services[row["id"]] = ServiceSpec.from_row(row)
        router = FallbackRouter(router, Router(api_routes))
    for route_id, message in getattr(router, "errors", ()):
        log.warn("route {id} is not routable: {message}", id=route_id, message=message)
    plugin_rows = rows.get("plugins") or {}
    if plugin_rows and plugin_classes:
        plugins = build_plugin_index(
            [_api_scoped(row) for row in plugin_rows.values()],
            plugin_classes,
            [(r.id, r.service_id) for r in routes + api_routes],
            previous.plugins if previous is not None else None,
            route_rows=dict(rows.get("routes", {}), **api_route_rows),
            service_rows=dict(rows.get("services", {}), **api_service_rows),
        )
    else:
        plugins = EMPTY_INDEX
    return Snapshot(router=router, services=services, version=version, plugins=plugins)


# -- legacy 0.x APIs ------------------------------------------------------------------


def api_to_rows(api: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The route row and service row a legacy API stands for. Pure.

    Both take the API's id (and name), so a plugin on the API is a plugin on that
    route + service pair. ``uris`` become ``paths`` (0.x regex URIs as ``~`` paths),
    ``strip_uri`` is ``strip_path`` with 0.x's path joining (``v0``), ``https_only``
    leaves only ``https`` in ``protocols`` (426 for http) and ``http_if_terminated``
    lets a trusted ``X-Forwarded-Proto: https`` through.
    """
    url = parse_url(str(api["upstream_url"]))
    protocol = str(url.get("scheme") or "http").lower()
    port = int(url["port"]) if str(url.get("port") or "").isdigit() else _DEFAULT_PORTS[protocol]
    https_only = bool(api.get("https_only"))
    route = {
        "id": api["id"],
        "name": api.get("name"),
        "created_at": int(api.get("created_at") or 0) // 1000,
        "protocols": ["https"] if https_only else ["http", "https"],
        "methods": api.get("methods"),
        "hosts": api.get("hosts"),
        "paths": api_paths(api.get("uris")) or None,
        "strip_path": api.get("strip_uri") is not False,
        "preserve_host": bool(api.get("preserve_host")),
        "regex_priority": 0,
        "path_handling": "v0",
        "https_redirect_status_code": 426,
        "service": {"id": api["id"]},
    }
    service = {
        "id": api["id"],
        "name": api.get("name"),
        "protocol": protocol,
        "host": url.get("host"),
        "port": port,
        "path": url.get("path"),
        "retries": api.get("retries"),
        "connect_timeout": api.get("upstream_connect_timeout"),
        "write_timeout": api.get("upstream_send_timeout"),
        "read_timeout": api.get("upstream_read_timeout"),
        "enabled": True,
    }
    return route, service


def _legacy_apis(
    apis: Mapping[str, Mapping[str, Any]]
) -> Tuple[List[RouteSpec], Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """Route specs, route rows and service rows of the legacy APIs (bad rows skipped)."""
    specs: List[RouteSpec] = []
    route_rows: Dict[str, Dict[str, Any]] = {}
    service_rows: Dict[str, Dict[str, Any]] = {}
    for api in apis.values():
        try:
            route, service = api_to_rows(api)
            ServiceSpec.from_row(service)
            spec = attr.evolve(
                RouteSpec.from_row(route),
                https_if_terminated=bool(api.get("https_only") and api.get("http_if_terminated")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warn("skipping API {id}: {error}", id=api.get("id"), error=exc)
            continue
        specs.append(spec)
        route_rows[spec.id] = route
        service_rows[spec.id] = service
    return specs, route_rows, service_rows


def _api_scoped(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """A plugin on a legacy API as the plugin on that API's route + service pair."""
    api = row.get("api")
    if not isinstance(api, dict) or api.get("id") is None:
        return row
    scoped = dict(row)
    scoped["route"] = {"id": api["id"]}
    scoped["service"] = {"id": api["id"]}
    return scoped


# -- the last known configuration on disk -----------------------------------------


class CachedConfigError(Exception):
    """The last known configuration file cannot be used; ``str()`` says why in one line."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return MSG_CACHE_UNUSABLE % (self.path, self.problem)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CachedConfig:
    """The content of a last-known-configuration file.

    ``rows`` maps each entity of ``SNAPSHOT_ENTITIES`` to its rows by id;
    ``written_at`` is the writing node's UTC time (``2024-05-01T12:00:00Z``).
    """

    rows: Dict[str, Dict[str, Dict[str, Any]]]
    written_at: str


def format_time(seconds: float) -> str:
    """``seconds`` since the epoch as ISO 8601 UTC with a ``Z`` (second precision)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def write_cached_config(
    path: str,
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    written_at: float,
    writer: str = "",
) -> None:
    """Write ``rows`` (entity -> list of rows) to ``path`` atomically. Blocking.

    The file is written next to ``path`` under a temporary name with mode 0600
    (rows may hold secrets), flushed to disk, then renamed over ``path``: a
    reader sees the old file or the new one, never a part.
    """
    document = {
        "version": CACHE_FORMAT_VERSION,
        "written_at": format_time(written_at),
        "written_by": writer,
        "rows": {entity: list(entity_rows) for entity, entity_rows in rows.items()},
    }
    data = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".kongtx-config.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_cached_config(
    path: str, entities: Sequence[str] = SNAPSHOT_ENTITIES
) -> CachedConfig:
    """Read and check a file written by :func:`write_cached_config`. Blocking.

    Raises :class:`CachedConfigError` naming the problem. An entity missing from
    the file (written before that entity was part of the snapshot) has no rows.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CachedConfigError(path, "cannot read it: %s" % (exc.strerror or exc,)) from exc
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CachedConfigError(path, "not valid JSON (%s)" % (exc,)) from exc
    if not isinstance(document, dict):
        raise CachedConfigError(path, "not a kongtx configuration file")
    version = document.get("version")
    if version != CACHE_FORMAT_VERSION:
        raise CachedConfigError(
            path, "unsupported version %r (expected %d)" % (version, CACHE_FORMAT_VERSION)
        )
    written_at = document.get("written_at")
    if not isinstance(written_at, str):
        raise CachedConfigError(path, "'written_at' is missing")
    stored = document.get("rows")
    if not isinstance(stored, dict):
        raise CachedConfigError(path, "'rows' is missing")
    rows: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for entity in entities:
        entity_rows = stored.get(entity, [])
        if not isinstance(entity_rows, list):
            raise CachedConfigError(path, "'rows.%s' is not a list" % (entity,))
        table: Dict[str, Dict[str, Any]] = {}
        for index, row in enumerate(entity_rows):
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise CachedConfigError(
                    path, "'rows.%s[%d]' is not a row with an id" % (entity, index)
                )
            table[row["id"]] = row
        rows[entity] = table
    return CachedConfig(rows=rows, written_at=written_at)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _apply(rows: Dict[str, Dict[str, Dict[str, Any]]], event: Any) -> bool:
    """Apply one change event to ``rows``; ``False`` if its entity is not tracked."""
    table = rows.get(event.entity)
    if table is None:
        return False
    if event.op == "delete" or event.new is None:
        table.pop(event.id, None)
    else:
        table[event.id] = event.new
    return True


# -- the manager --------------------------------------------------------------------


class SnapshotManager:
    """Keeps ``current`` in step with the store, and a copy of its rows on disk.

    :param store: an ``IStore``.
    :param reactor: provides ``callLater`` and ``seconds`` (and, unless
        ``run_in_thread`` is given, ``getThreadPool`` for the file work).
    :param cache_path: where to save the last known configuration, or ``None``
        for no file.
    :param run_in_thread: ``run_in_thread(f, *args)`` returns a Deferred firing
        with ``f(*args)`` run off the reactor thread; defaults to the reactor's
        thread pool.
    :param cache_delay: seconds from a rebuild to the file write that saves it.
    :param retry_initial, retry_max: backoff bounds for reloading after a failure.

    ``source`` is ``"store"`` or ``"disk"`` (serving the file because the store
    could not be read at start); while it is ``"disk"``, ``loaded_from_disk_at``
    is the reactor time the file was loaded and ``disk_written_at`` the time the
    file says it was written; both are ``None`` otherwise.
    """

    def __init__(
        self,
        store: Any,
        reactor: Any,
        *,
        cache_path: Optional[str] = None,
        run_in_thread: Optional[Callable[..., defer.Deferred]] = None,
        cache_delay: float = CACHE_WRITE_DELAY,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
        plugins: Optional[Mapping[str, type]] = None,
    ) -> None:
        self._store = store
        self._plugin_classes = dict(plugins or {})
        self._reactor = reactor
        self._cache_path = cache_path
        self._run_in_thread = run_in_thread or self._reactor_thread
        self._cache_delay = cache_delay
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._rows: Dict[str, Dict[str, Dict[str, Any]]] = {e: {} for e in SNAPSHOT_ENTITIES}
        self._version = 0
        self._pending: Optional[Any] = None
        self._waiters: List[defer.Deferred] = []
        self._listeners: List[Callable[[Snapshot], None]] = []
        self._reload_listeners: List[Callable[[], None]] = []
        self.current: Snapshot = build_snapshot(self._rows, 0)
        self.source = "store"
        self.loaded_from_disk_at: Optional[float] = None
        self.disk_written_at: Optional[str] = None
        self._started = False
        self._stopped = False
        # Reloading every row: one fetch at a time; events that arrive during a
        # fetch are journaled and replayed over its result.
        self._reloading = False
        self._reload_again = False
        self._reload_waiters: List[defer.Deferred] = []
        self._journal: Optional[List[Any]] = None
        self._failures = 0
        self._retry_timer: Optional[Any] = None
        # Saving to disk: rows of the last good build, one write at a time.
        self._built_rows: Optional[Dict[str, List[Dict[str, Any]]]] = None
        self._cache_dirty = False
        self._cache_timer: Optional[Any] = None
        self._cache_writing: Optional[defer.Deferred] = None
        #: How many times the file has been written (for tests and /status).
        self.cache_writes = 0

    def _reactor_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    # -- life cycle -----------------------------------------------------------------

    async def start(self, *, store_error: Optional[BaseException] = None) -> None:
        """Load every row and build the first snapshot; then follow change events.

        If the store cannot be read and ``cache_path`` holds a file, the snapshot
        is built from the file instead (``source`` becomes ``"disk"``) and the
        store is retried with backoff. Without a usable file the store's error
        is raised (with the file's problem appended when there is a bad file).

        ``store_error`` is the error the store's own ``start()`` failed with: the
        store is then not read at all, and that error is the one reported.
        """
        self._store.add_listener(self._on_change)
        if store_error is not None:
            await self._start_from_disk(store_error)
        else:
            try:
                await self._request_reload()
            except Exception as exc:
                await self._start_from_disk(exc)
        self._started = True

    async def _start_from_disk(self, error: BaseException) -> None:
        path = self._cache_path
        if path is None or not os.path.exists(path):
            raise error
        try:
            cached = await self._run_in_thread(read_cached_config, path)
        except CachedConfigError as bad:
            raise StoreUnavailable("%s; %s" % (_reason(error), bad)) from bad
        self._rows = cached.rows
        self.source = "disk"
        self.loaded_from_disk_at = self._reactor.seconds()
        self.disk_written_at = cached.written_at
        log.critical(MSG_SERVING_FROM_DISK, reason=_reason(error), path=path,
                     written_at=cached.written_at)
        self._rebuild_now()
        self._reloaded()
        # The start failure counts as the first failure (already logged).
        self._failures = 1
        self._schedule_retry()

    def stop(self) -> defer.Deferred:
        """Stop following the store. Fires once a pending file write is on disk."""
        self._stopped = True
        for timer in (self._pending, self._retry_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._pending = None
        self._retry_timer = None
        remove = getattr(self._store, "remove_listener", None)
        if remove is not None:
            remove(self._on_change)
        if self._cache_timer is not None and self._cache_timer.active():
            self._cache_timer.cancel()
            self._cache_timer = None
            self._write_cache()
        writing = self._cache_writing
        if writing is None:
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()

        def finished(result: Any) -> Any:
            done.callback(None)
            return result

        writing.addBoth(finished)
        return done

    def add_snapshot_listener(self, callback: Callable[[Snapshot], None]) -> None:
        """Call ``callback(snapshot)`` after every rebuild."""
        self._listeners.append(callback)

    def add_reload_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every rebuild from a full reload of the rows
        (from the store, or from the file at start): changes that came without
        change events, which followers of this manager must fetch again."""
        self._reload_listeners.append(callback)

    def rows(self, entity: str) -> List[Dict[str, Any]]:
        """Every row of a configuration entity this manager holds (a copy of the list)."""
        return list(self._rows.get(entity, {}).values())

    def tracks(self, entity: str) -> bool:
        """Whether *entity* is part of the configuration snapshot."""
        return entity in self._rows

    def settled(self) -> defer.Deferred:
        """A Deferred firing with the current snapshot once no rebuild is pending."""
        if self._pending is None:
            return defer.succeed(self.current)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d

    # -- reloading every row -----------------------------------------------------------

    async def reload(self) -> Snapshot:
        """Fetch every row from the store again and rebuild; returns the new snapshot.

        Raises the store's error if the fetch fails: the current snapshot stays
        in use and a retry with backoff is scheduled.
        """
        await self._request_reload()
        return self.current

    def _request_reload(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._reload_waiters.append(d)
        if self._reloading:
            self._reload_again = True
        else:
            defer.ensureDeferred(self._reload_loop())
        return d

    async def _reload_loop(self) -> None:
        self._reloading = True
        try:
            while True:
                self._reload_again = False
                waiters, self._reload_waiters = self._reload_waiters, []
                self._journal = []
                try:
                    fetched = await self._fetch_all()
                except Exception as exc:
                    self._journal = None
                    waiters.extend(self._reload_waiters)
                    self._reload_waiters = []
                    self._reload_failed(exc)
                    for d in waiters:
                        d.errback(exc)
                    return
                journal, self._journal = self._journal, None
                if not self._stopped:
                    self._install(fetched, journal)
                for d in waiters:
                    d.callback(None)
                if not self._reload_again:
                    return
        finally:
            self._reloading = False

    async def _fetch_all(self) -> Dict[str, Dict[str, Dict[str, Any]]]:
        rows: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for entity in SNAPSHOT_ENTITIES:
            try:
                fetched = await self._store.all(entity)
            except ValueError:
                if entity not in OPTIONAL_ENTITIES:
                    raise
                fetched = []  # a store without this entity yet
            rows[entity] = {row["id"]: row for row in fetched}
        return rows

    def _install(self, rows: Dict[str, Dict[str, Dict[str, Any]]], journal: List[Any]) -> None:
        for event in journal:
            _apply(rows, event)
        self._rows = rows
        if self._failures and self._started and self.source != "disk":
            log.info(MSG_RELOADED, failures=self._failures)
        self._failures = 0
        if self._retry_timer is not None and self._retry_timer.active():
            self._retry_timer.cancel()
        self._retry_timer = None
        if self.source == "disk":
            log.warn(MSG_BACK_FROM_DISK, written_at=self.disk_written_at)
            self.source = "store"
            self.loaded_from_disk_at = None
            self.disk_written_at = None
        self._rebuild_now()
        self._reloaded()

    def _reloaded(self) -> None:
        for callback in list(self._reload_listeners):
            try:
                callback()
            except Exception:
                log.failure("snapshot reload listener failed")

    def _reload_failed(self, error: Exception) -> None:
        if not self._started:
            # start() decides: the file on disk, or the error to the caller.
            return
        self._failures += 1
        if self._failures == 1:
            log.warn(MSG_RELOAD_FAILED, reason=_reason(error))
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._stopped or (self._retry_timer is not None and self._retry_timer.active()):
            return
        delay = min(self._retry_initial * 2 ** max(self._failures - 1, 0), self._retry_max)
        self._retry_timer = self._reactor.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        if not self._stopped:
            # A failure is logged (once) and rescheduled by the loop itself.
            self._request_reload().addErrback(lambda failure: None)

    # -- change events --------------------------------------------------------------

    def _on_change(self, event: Any) -> None:
        if event.entity == RELOAD_ENTITY and event.op == RELOAD_OP:
            if not self._stopped:
                self._request_reload().addErrback(lambda failure: None)
            return
        if self._journal is not None:
            self._journal.append(event)
        if not _apply(self._rows, event):
            return
        if self._pending is None and not self._stopped:
            self._pending = self._reactor.callLater(0, self._rebuild)

    def _rebuild_now(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._rebuild()

    def _rebuild(self) -> None:
        self._pending = None
        self._version += 1
        try:
            snapshot = build_snapshot(
                self._rows, self._version, self._plugin_classes, self.current
            )
        except Exception:
            log.failure(MSG_REBUILD_FAILED)
        else:
            self.current = snapshot
            self._saved_later()
            for callback in list(self._listeners):
                try:
                    callback(snapshot)
                except Exception:
                    log.failure("snapshot listener failed")
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.current)

    # -- saving to disk ---------------------------------------------------------------

    def _saved_later(self) -> None:
        """Note that the rows just built should reach the file.

        Only a configuration read from the store is saved (a node serving the
        file does not rewrite it). Writes are coalesced: one write per
        ``cache_delay`` at most, never two at once, always the newest rows.
        """
        if self._cache_path is None or self.source != "store" or self._stopped:
            return
        self._built_rows = {entity: list(table.values()) for entity, table in self._rows.items()}
        self._cache_dirty = True
        if self._cache_timer is None and self._cache_writing is None:
            self._cache_timer = self._reactor.callLater(self._cache_delay, self._write_cache)

    def _write_cache(self) -> None:
        self._cache_timer = None
        if not self._cache_dirty or self._built_rows is None or self._cache_path is None:
            return
        self._cache_dirty = False
        path = self._cache_path
        d = self._run_in_thread(
            write_cached_config, path, self._built_rows, self._reactor.seconds(), _writer()
        )
        self._cache_writing = d

        def written(_: Any) -> None:
            self.cache_writes += 1

        def failed(failure: Any) -> None:
            log.warn(MSG_CACHE_WRITE_FAILED, path=path, error=_reason(failure.value))

        def done(_: Any) -> None:
            self._cache_writing = None
            if self._cache_dirty and not self._stopped:
                self._cache_timer = self._reactor.callLater(self._cache_delay, self._write_cache)

        d.addCallbacks(written, failed)
        d.addBoth(done)


def _writer() -> str:
    import kongtx

    return "kongtx %s" % (kongtx.__version__,)


class SettledStore:
    """Wraps an ``IStore`` so a write's Deferred fires only after the proxy's snapshot
    includes it: an Admin API answer means "the next proxied request sees this".

    Each of *settlers* returns a Deferred firing once what serves the proxy has
    applied every change seen so far (a :meth:`SnapshotManager.settled`; on a
    master, also its workers'); they are waited for in order.
    """

    _WRITES = ("insert", "update", "delete")

    def __init__(self, store: Any, *settlers: Any) -> None:
        self._store = store
        self._settlers = tuple(
            s.settled if isinstance(s, SnapshotManager) else s for s in settlers
        )

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if name not in self._WRITES:
            return attribute

        def write(*args: Any, **kwargs: Any) -> defer.Deferred:
            d = attribute(*args, **kwargs)

            def settle(result: Any) -> defer.Deferred:
                waits: defer.Deferred = defer.succeed(None)
                for settled in self._settlers:
                    waits.addCallback(lambda _, settled=settled: settled())
                return waits.addCallback(lambda _: result)

            return d.addCallback(settle)

        return write
