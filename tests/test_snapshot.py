"""SnapshotManager: rebuilds on change events, the last known configuration on disk,
starting from it while the database is down, and reloading everything from the store.

Everything runs on a ``task.Clock`` with ``MemoryStore`` behind :class:`SwitchableStore`,
a real wrapper that can be switched to fail like an unreachable database. File work
runs inline (``run_now``) except in the one test that uses the reactor's thread pool.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from kongtx import snapshot as snapshot_module
from kongtx.schema import ENTITIES, store_metas
from kongtx.snapshot import (
    CachedConfigError,
    SnapshotManager,
    read_cached_config,
    write_cached_config,
)
from kongtx.store.interface import ChangeEvent, StoreUnavailable
from kongtx.store.memory import MemoryStore

#: 2024-05-01T12:00:00Z
T0 = 1714564800.0

RELOAD = ChangeEvent(entity="*", op="reload", id="", old=None, new=None)


class SwitchableStore:
    """A MemoryStore whose reads can be made to fail (``down``) or wait (``hold``),
    and whose change events can be muted (changes "made by another node" that this
    node never heard of)."""

    def __init__(self) -> None:
        self.inner = MemoryStore(store_metas())
        self.down: Optional[str] = None
        self.hold = False
        self.held: List[Tuple[defer.Deferred, Any]] = []
        self.muted = False
        self.reads = 0
        self._listeners: List[Callable[[ChangeEvent], Any]] = []
        self.inner.add_listener(self._forward)

    def _forward(self, event: ChangeEvent) -> None:
        if not self.muted:
            self.emit(event)

    def emit(self, event: ChangeEvent) -> None:
        for listener in list(self._listeners):
            listener(event)

    def add_listener(self, callback: Callable[[ChangeEvent], Any]) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[ChangeEvent], Any]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def all(self, entity: str, where: Any = None) -> defer.Deferred:
        self.reads += 1
        if self.down is not None:
            return defer.fail(StoreUnavailable(self.down))
        if self.hold:
            # Read now, deliver when the test releases it.
            rows = self.inner.all(entity, where)
            d: defer.Deferred = defer.Deferred()
            rows.addCallback(lambda value: self.held.append((d, value)))
            return d
        return self.inner.all(entity, where)

    def release(self) -> None:
        held, self.held = self.held, []
        for d, value in held:
            d.callback(value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def run_now(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """Runs file work inline (the tests' stand-in for a thread)."""
    return defer.maybeDeferred(f, *args)


def service_row(name: str, host: str = "upstream.test") -> Dict[str, Any]:
    return ENTITIES["services"].validate_insert(
        {"name": name, "url": "http://%s:8080/" % host}, now=1, new_id=str(uuid.uuid4())
    )


def route_row(service: Dict[str, Any], path: str) -> Dict[str, Any]:
    return ENTITIES["routes"].validate_insert(
        {"paths": [path], "service": {"id": service["id"]}}, now=1, new_id=str(uuid.uuid4())
    )


def result_of(d: defer.Deferred) -> Any:
    results: List[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def add_service_and_route(store: SwitchableStore, name: str, path: str) -> Dict[str, Any]:
    service = result_of(store.inner.insert("services", service_row(name)))
    result_of(store.inner.insert("routes", route_row(service, path)))
    return service


def routes_to(manager: SnapshotManager, path: str) -> Optional[str]:
    """The name of the service the current snapshot sends ``GET path`` to."""
    match = manager.current.router.select("GET", "gateway.test", path)
    if match is None:
        return None
    service = manager.current.services.get(match.route.service_id)
    return service.name if service is not None else "<no service>"


@pytest.fixture
def clock() -> task.Clock:
    c = task.Clock()
    c.advance(T0)
    return c


@pytest.fixture
def logged():
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def lines(events: List[Dict[str, Any]], level: Optional[LogLevel] = None) -> List[str]:
    return [
        formatEvent(e) for e in events
        if e.get("log_namespace") == "kongtx.snapshot"
        and (level is None or e.get("log_level") == level)
    ]


def make_manager(store: Any, clock: task.Clock, path: Optional[str], **kw: Any) -> SnapshotManager:
    return SnapshotManager(store, clock, cache_path=path, run_in_thread=run_now, **kw)


def save_config(tmp_path: Any, clock: task.Clock, *names_paths: Any) -> str:
    """Run a node against a healthy store so it saves ``names_paths`` to disk."""
    path = str(tmp_path / "kongtx-config.json")
    store = SwitchableStore()
    for name, route_path in names_paths:
        add_service_and_route(store, name, route_path)
    manager = make_manager(store, clock, path)
    result_of(defer.ensureDeferred(manager.start()))
    clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    result_of(manager.stop())
    assert manager.cache_writes == 1
    return path


# -- the file on disk -----------------------------------------------------------------


def test_file_holds_version_time_and_rows_after_start(tmp_path, clock):
    """After the first build the rows it was built from are saved, with the format
    version and the node's time of writing; the file is private (0600)."""
    store = SwitchableStore()
    service = add_service_and_route(store, "a", "/a")
    path = str(tmp_path / "kongtx-config.json")
    manager = make_manager(store, clock, path)
    result_of(defer.ensureDeferred(manager.start()))
    assert not os.path.exists(path)
    clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    with open(path) as f:
        document = json.load(f)
    assert document["version"] == 1
    assert document["written_at"] == "2024-05-01T12:00:01Z"
    assert [r["id"] for r in document["rows"]["services"]] == [service["id"]]
    assert document["rows"]["routes"][0]["paths"] == ["/a"]
    assert document["rows"]["routes"][0]["service"] == {"id": service["id"]}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")] == []


def test_burst_of_writes_gives_one_file_write(tmp_path, clock):
    """Ten writes, each rebuilt on its own, reach the file in one write holding all."""
    store = SwitchableStore()
    path = str(tmp_path / "kongtx-config.json")
    manager = make_manager(store, clock, path)
    result_of(defer.ensureDeferred(manager.start()))
    for i in range(10):
        add_service_and_route(store, "s%d" % i, "/p%d" % i)
        clock.advance(0)
    assert manager.current.version == 11
    assert routes_to(manager, "/p9") == "s9"
    clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    assert manager.cache_writes == 1
    cached = read_cached_config(path)
    assert len(cached.rows["services"]) == 10
    assert len(cached.rows["routes"]) == 10


def test_writes_during_a_slow_file_write_give_one_more_write(tmp_path, clock):
    """While a file write is in flight no second one starts; changes made meanwhile
    are saved by exactly one further write, with the newest rows."""
    started: List[defer.Deferred] = []

    def slow(f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        started.append(d)
        d.addCallback(lambda _: f(*args))
        return d

    store = SwitchableStore()
    path = str(tmp_path / "kongtx-config.json")
    manager = SnapshotManager(store, clock, cache_path=path, run_in_thread=slow)
    result_of(defer.ensureDeferred(manager.start()))
    clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    assert len(started) == 1
    for i in range(3):
        add_service_and_route(store, "s%d" % i, "/p%d" % i)
        clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    assert len(started) == 1
    started[0].callback(None)
    clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    assert len(started) == 2
    started[1].callback(None)
    assert manager.cache_writes == 2
    assert len(read_cached_config(path).rows["services"]) == 3


def test_failed_file_write_logs_one_line_and_keeps_serving(tmp_path, clock, logged):
    """A file that cannot be written gives one warning; the snapshot is unaffected."""
    store = SwitchableStore()
    path = str(tmp_path / "missing-dir" / "kongtx-config.json")
    manager = make_manager(store, clock, path)
    result_of(defer.ensureDeferred(manager.start()))
    add_service_and_route(store, "a", "/a")
    clock.advance(0)
    clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    assert routes_to(manager, "/a") == "a"
    warnings = lines(logged, LogLevel.warn)
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "could not save the last known configuration to %s: " % (path,))
    assert manager.cache_writes == 0


def test_no_cache_path_writes_nothing(tmp_path, clock):
    """Without ``cache_path`` the manager never touches the disk."""
    store = SwitchableStore()
    add_service_and_route(store, "a", "/a")
    manager = make_manager(store, clock, None)
    result_of(defer.ensureDeferred(manager.start()))
    clock.advance(60)
    assert manager.cache_writes == 0
    assert os.listdir(str(tmp_path)) == []


def test_stop_flushes_a_pending_write(tmp_path, clock):
    """stop() writes rows still waiting for their coalescing delay, then fires."""
    store = SwitchableStore()
    add_service_and_route(store, "a", "/a")
    path = str(tmp_path / "kongtx-config.json")
    manager = make_manager(store, clock, path)
    result_of(defer.ensureDeferred(manager.start()))
    result_of(manager.stop())
    assert manager.cache_writes == 1
    assert len(read_cached_config(path).rows["routes"]) == 1
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "not a kongtx configuration file"),
    (b'{"version": 7, "written_at": "x", "rows": {}}', "unsupported version 7 (expected 1)"),
    (b'{"written_at": "x", "rows": {}}', "unsupported version None (expected 1)"),
    (b'{"version": 1, "rows": {}}', "'written_at' is missing"),
    (b'{"version": 1, "written_at": "x"}', "'rows' is missing"),
    (b'{"version": 1, "written_at": "x", "rows": {"routes": {}}}',
     "'rows.routes' is not a list"),
    (b'{"version": 1, "written_at": "x", "rows": {"services": [{"name": "a"}]}}',
     "'rows.services[0]' is not a row with an id"),
])
def test_unusable_file_is_a_clear_error(tmp_path, content, problem):
    """Each way a file can be unusable is named in one line with the file's path."""
    path = str(tmp_path / "kongtx-config.json")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(CachedConfigError) as info:
        read_cached_config(path)
    assert str(info.value).startswith(
        "the last known configuration in %s cannot be used: %s" % (path, problem))


def test_file_round_trip_and_missing_entities(tmp_path):
    """What is written reads back by id; an entity absent from the file has no rows."""
    path = str(tmp_path / "c.json")
    service = service_row("a")
    write_cached_config(path, {"services": [service]}, T0)
    cached = read_cached_config(path)
    assert cached.rows == {"services": {service["id"]: service}, "routes": {}, "plugins": {},
                           "apis": {}}
    assert cached.written_at == "2024-05-01T12:00:00Z"


# -- starting while the database is down ------------------------------------------------


def test_start_from_disk_when_store_is_down(tmp_path, clock, logged):
    """With the database unreachable at start, the node serves the saved configuration,
    says so in one critical line, and reports where it came from."""
    path = save_config(tmp_path, clock, ("a", "/a"), ("b", "/b"))
    clock.advance(100)
    store = SwitchableStore()
    store.down = "connection refused"
    manager = make_manager(store, clock, path)
    result_of(defer.ensureDeferred(manager.start()))
    assert routes_to(manager, "/a") == "a"
    assert routes_to(manager, "/b") == "b"
    assert manager.source == "disk"
    assert manager.loaded_from_disk_at == clock.seconds()
    assert manager.disk_written_at == "2024-05-01T12:00:01Z"
    assert lines(logged, LogLevel.critical) == [
        "database unreachable (connection refused); serving the last known "
        "configuration from %s written at 2024-05-01T12:00:01Z" % (path,)
    ]
    # Serving the file does not rewrite it.
    clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    assert manager.cache_writes == 0


def test_start_without_file_raises_the_store_error(tmp_path, clock):
    """No saved configuration and no database: start() fails with the store's error."""
    store = SwitchableStore()
    store.down = "connection refused"
    manager = make_manager(store, clock, str(tmp_path / "kongtx-config.json"))
    with pytest.raises(StoreUnavailable) as info:
        result_of(defer.ensureDeferred(manager.start()))
    assert str(info.value) == "connection refused"
    assert clock.getDelayedCalls() == []


def test_start_with_store_error_skips_the_store(tmp_path, clock, logged):
    """Given the error the store's own start() failed with, the manager does not read
    the store, serves the file and reports that error as the reason."""
    path = save_config(tmp_path, clock, ("a", "/a"))
    store = SwitchableStore()
    manager = make_manager(store, clock, path)
    error = StoreUnavailable("could not connect to server: Connection refused")
    result_of(defer.ensureDeferred(manager.start(store_error=error)))
    assert store.reads == 0
    assert manager.source == "disk"
    assert routes_to(manager, "/a") == "a"
    assert lines(logged, LogLevel.critical)[0].startswith(
        "database unreachable (could not connect to server: Connection refused); ")


def test_start_with_store_error_and_no_file_raises_it(tmp_path, clock):
    """Given the store's start() error and no file, start() raises that very error."""
    manager = make_manager(SwitchableStore(), clock, str(tmp_path / "none.json"))
    error = StoreUnavailable("timeout expired")
    with pytest.raises(StoreUnavailable) as info:
        result_of(defer.ensureDeferred(manager.start(store_error=error)))
    assert info.value is error


def test_start_with_corrupted_file_names_both_problems(tmp_path, clock):
    """No database and a corrupted file: start() fails with one line naming both."""
    path = str(tmp_path / "kongtx-config.json")
    with open(path, "w") as f:
        f.write('{"version": 1, "written_at": "2024-05-01T12:00:00Z", "rows": ')
    store = SwitchableStore()
    store.down = "connection refused"
    manager = make_manager(store, clock, path)
    with pytest.raises(StoreUnavailable) as info:
        result_of(defer.ensureDeferred(manager.start()))
    assert str(info.value).startswith(
        "connection refused; the last known configuration in %s cannot be used: "
        "not valid JSON" % (path,))


def test_disk_node_catches_up_when_store_returns(tmp_path, clock, logged):
    """Serving from disk, the node retries the store with backoff; once it answers,
    everything is reloaded from it, ``source`` is back to "store" and the file is
    rewritten from the database's rows."""
    path = save_config(tmp_path, clock, ("a", "/a"))
    store = SwitchableStore()
    add_service_and_route(store, "fresh", "/fresh")
    store.down = "connection refused"
    manager = make_manager(store, clock, path)
    result_of(defer.ensureDeferred(manager.start()))
    assert routes_to(manager, "/fresh") is None
    store.down = None
    clock.advance(snapshot_module.RETRY_INITIAL)
    assert manager.source == "store"
    assert manager.loaded_from_disk_at is None
    assert routes_to(manager, "/fresh") == "fresh"
    assert routes_to(manager, "/a") is None
    clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    names = [r["name"] for r in read_cached_config(path).rows["services"].values()]
    assert names == ["fresh"]
    assert lines(logged, LogLevel.warn) == [
        "database reachable again; the configuration is now served from the database "
        "(was the file written at 2024-05-01T12:00:01Z)"
    ]


def test_disk_node_applies_change_events(tmp_path, clock):
    """While serving from disk, change events from the store still update the snapshot."""
    path = save_config(tmp_path, clock, ("a", "/a"))
    store = SwitchableStore()
    store.down = "connection refused"
    manager = make_manager(store, clock, path)
    result_of(defer.ensureDeferred(manager.start()))
    add_service_and_route(store, "new", "/new")
    clock.advance(0)
    assert routes_to(manager, "/new") == "new"
    assert routes_to(manager, "/a") == "a"


def test_retry_backoff_doubles_up_to_the_maximum(tmp_path, clock, logged):
    """Reload attempts come after 1, 2, 4, 8 s ... capped at ``retry_max``; the outage
    is logged once, not per attempt."""
    path = save_config(tmp_path, clock, ("a", "/a"))
    store = SwitchableStore()
    store.down = "connection refused"
    manager = make_manager(store, clock, path, retry_initial=1.0, retry_max=8.0)
    result_of(defer.ensureDeferred(manager.start()))
    attempts = []
    for _ in range(6):
        before = store.reads
        waited = 0.0
        while store.reads == before:
            clock.advance(0.5)
            waited += 0.5
        attempts.append(waited)
    assert attempts == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert len(lines(logged, LogLevel.critical)) == 1
    assert lines(logged, LogLevel.warn) == []
    result_of(manager.stop())
    assert clock.getDelayedCalls() == []


# -- reloading everything -----------------------------------------------------------------


def test_reload_event_refetches_every_row(clock):
    """A ``reload`` event makes the node fetch every row again: changes it never
    heard of (made while events were lost) appear, deleted rows disappear."""
    store = SwitchableStore()
    gone = add_service_and_route(store, "gone", "/gone")
    manager = make_manager(store, clock, None)
    result_of(defer.ensureDeferred(manager.start()))
    store.muted = True
    add_service_and_route(store, "missed", "/missed")
    for route in result_of(store.inner.all("routes")):
        if route["service"]["id"] == gone["id"]:
            result_of(store.inner.delete("routes", route["id"]))
    result_of(store.inner.delete("services", gone["id"]))
    store.muted = False
    assert routes_to(manager, "/gone") == "gone"
    store.emit(RELOAD)
    assert routes_to(manager, "/missed") == "missed"
    assert routes_to(manager, "/gone") is None


def test_reload_event_while_store_down_keeps_snapshot_and_retries(clock, logged):
    """A reload that cannot reach the store keeps the current snapshot, logs once,
    and retries with backoff until the store answers."""
    store = SwitchableStore()
    add_service_and_route(store, "a", "/a")
    manager = make_manager(store, clock, None)
    result_of(defer.ensureDeferred(manager.start()))
    store.down = "timeout"
    store.emit(RELOAD)
    clock.advance(1.0)
    clock.advance(2.0)
    assert routes_to(manager, "/a") == "a"
    assert lines(logged, LogLevel.warn) == [
        "could not reload the configuration from the database (timeout); "
        "the current configuration stays in use, retrying with backoff"
    ]
    store.muted = True
    add_service_and_route(store, "b", "/b")
    store.down = None
    clock.advance(4.0)
    assert routes_to(manager, "/b") == "b"
    assert lines(logged, LogLevel.info)[-1] == (
        "configuration reloaded from the database after 3 failed attempt(s)")
    assert clock.getDelayedCalls() == []


def test_reload_on_demand_raises_when_store_down(clock):
    """``reload()`` fires with the new snapshot, or raises the store's error and keeps
    the current one."""
    store = SwitchableStore()
    add_service_and_route(store, "a", "/a")
    manager = make_manager(store, clock, None)
    result_of(defer.ensureDeferred(manager.start()))
    before = manager.current
    store.down = "connection refused"
    with pytest.raises(StoreUnavailable):
        result_of(defer.ensureDeferred(manager.reload()))
    assert manager.current is before
    store.down = None
    snap = result_of(defer.ensureDeferred(manager.reload()))
    assert snap is manager.current and snap.version > before.version
    assert routes_to(manager, "/a") == "a"


def test_events_during_a_reload_are_replayed_over_its_result(clock):
    """A change event that arrives while a reload's reads are in flight is not lost
    when the fetched rows replace the old ones."""
    store = SwitchableStore()
    add_service_and_route(store, "a", "/a")
    manager = make_manager(store, clock, None)
    result_of(defer.ensureDeferred(manager.start()))
    store.hold = True
    reloaded = defer.ensureDeferred(manager.reload())
    assert len(store.held) == 1  # the services were read before "late" existed
    late = result_of(store.inner.insert("services", service_row("late")))
    while store.held:
        store.release()
    result_of(reloaded)
    assert late["id"] in manager.current.services


def test_second_reload_during_a_reload_fetches_again(clock):
    """A reload requested while one is fetching runs once more after it, so changes
    committed after the first fetch started are seen."""
    store = SwitchableStore()
    manager = make_manager(store, clock, None)
    result_of(defer.ensureDeferred(manager.start()))
    store.hold = True
    store.muted = True
    first = defer.ensureDeferred(manager.reload())
    add_service_and_route(store, "later", "/later")
    second = defer.ensureDeferred(manager.reload())
    while store.held:
        store.release()
    result_of(first)
    result_of(second)
    assert routes_to(manager, "/later") == "later"


def test_rebuild_failure_keeps_old_snapshot_and_file(tmp_path, clock, logged, monkeypatch):
    """A build that raises keeps the previous snapshot serving (Kong's "stale router"
    message) and does not save the rows that failed to build."""
    store = SwitchableStore()
    add_service_and_route(store, "a", "/a")
    path = str(tmp_path / "kongtx-config.json")
    manager = make_manager(store, clock, path)
    result_of(defer.ensureDeferred(manager.start()))
    clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    before = manager.current

    def broken(rows: Any, version: int) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(snapshot_module, "build_snapshot", broken)
    add_service_and_route(store, "b", "/b")
    clock.advance(0)
    assert manager.current is before
    assert any("could not rebuild router (stale router will be used)" in line
               for line in lines(logged))
    clock.advance(snapshot_module.CACHE_WRITE_DELAY)
    assert manager.cache_writes == 1
    assert len(read_cached_config(path).rows["services"]) == 1


def test_settled_fires_after_pending_rebuild(clock):
    """``settled()`` waits for a pending rebuild and fires with the new snapshot."""
    store = SwitchableStore()
    manager = make_manager(store, clock, None)
    result_of(defer.ensureDeferred(manager.start()))
    add_service_and_route(store, "a", "/a")
    d = manager.settled()
    assert not d.called
    clock.advance(0)
    assert result_of(d) is manager.current
    assert routes_to(manager, "/a") == "a"


# -- the real thread pool ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_file_written_from_reactor_thread_pool(tmp_path):
    """With the default runner the file is written by the reactor's thread pool, and a
    second manager with the store down starts from it."""
    from twisted.internet import reactor

    store = SwitchableStore()
    add_service_and_route(store, "a", "/a")
    path = str(tmp_path / "kongtx-config.json")
    manager = SnapshotManager(store, reactor, cache_path=path)
    await manager.start()
    await manager.stop()  # flushes the pending write through the thread pool
    assert manager.cache_writes == 1
    down = SwitchableStore()
    down.down = "connection refused"
    second = SnapshotManager(down, reactor, cache_path=path)
    await second.start()
    try:
        assert second.source == "disk"
        assert routes_to(second, "/a") == "a"
    finally:
        await second.stop()
