"""The immutable configuration a node serves from, and its rebuild on change events.

The proxy never reads the store while serving a request: it reads
``SnapshotManager.current``, a :class:`Snapshot` holding the compiled router and the
services by id. The manager loads every row once at start, then keeps its own copy
of the rows up to date from the store's change events and compiles a new snapshot
when they change. A burst of writes gives one rebuild; requests in flight keep the
snapshot they started with.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import attr
from twisted.internet import defer
from twisted.logger import Logger

from kongtx.router import RouteSpec, Router

log = Logger()

#: Entities whose rows make up the proxy's snapshot.
SNAPSHOT_ENTITIES = ("services", "routes")

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


def build_snapshot(rows: Dict[str, Dict[str, Dict[str, Any]]], version: int) -> Snapshot:
    """Compile rows (entity -> id -> row) into a :class:`Snapshot`. Pure."""
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
    router = Router(routes)
    for route_id, message in getattr(router, "errors", ()):
        log.warn("route {id} is not routable: {message}", id=route_id, message=message)
    return Snapshot(router=router, services=services, version=version)


class SnapshotManager:
    """Keeps ``current`` in step with the store.

    :param store: an ``IStore``.
    :param reactor: provides ``callLater``.
    """

    def __init__(self, store: Any, reactor: Any) -> None:
        self._store = store
        self._reactor = reactor
        self._rows: Dict[str, Dict[str, Dict[str, Any]]] = {e: {} for e in SNAPSHOT_ENTITIES}
        self._version = 0
        self._pending: Optional[Any] = None
        self._waiters: List[defer.Deferred] = []
        self._listeners: List[Callable[[Snapshot], None]] = []
        self.current: Snapshot = build_snapshot(self._rows, 0)

    async def start(self) -> None:
        """Load every row and build the first snapshot; then follow change events."""
        self._store.add_listener(self._on_change)
        for entity in SNAPSHOT_ENTITIES:
            rows = await self._store.all(entity)
            self._rows[entity] = {row["id"]: row for row in rows}
        self._rebuild()

    def stop(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        remove = getattr(self._store, "remove_listener", None)
        if remove is not None:
            remove(self._on_change)

    def add_snapshot_listener(self, callback: Callable[[Snapshot], None]) -> None:
        """Call ``callback(snapshot)`` after every rebuild."""
        self._listeners.append(callback)

    def settled(self) -> defer.Deferred:
        """A Deferred firing with the current snapshot once no rebuild is pending."""
        if self._pending is None:
            return defer.succeed(self.current)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d

    def _on_change(self, event: Any) -> None:
        table = self._rows.get(event.entity)
        if table is None:
            return
        if event.op == "delete" or event.new is None:
            table.pop(event.id, None)
        else:
            table[event.id] = event.new
        if self._pending is None:
            self._pending = self._reactor.callLater(0, self._rebuild)

    def _rebuild(self) -> None:
        self._pending = None
        self._version += 1
        try:
            snapshot = build_snapshot(self._rows, self._version)
        except Exception:
            log.failure("could not rebuild router (stale router will be used)")
        else:
            self.current = snapshot
            for callback in list(self._listeners):
                try:
                    callback(snapshot)
                except Exception:
                    log.failure("snapshot listener failed")
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.current)


class SettledStore:
    """Wraps an ``IStore`` so a write's Deferred fires only after the proxy's snapshot
    includes it: an Admin API answer means "the next proxied request sees this"."""

    _WRITES = ("insert", "update", "delete")

    def __init__(self, store: Any, manager: SnapshotManager) -> None:
        self._store = store
        self._manager = manager

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if name not in self._WRITES:
            return attribute

        def write(*args: Any, **kwargs: Any) -> defer.Deferred:
            d = attribute(*args, **kwargs)

            def settle(result: Any) -> Any:
                return self._manager.settled().addCallback(lambda _: result)

            return d.addCallback(settle)

        return write

