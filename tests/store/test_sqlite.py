"""SQLiteStore passes the IStore contract, persists across reopen and keeps SQL off the reactor thread."""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any, List, Mapping

import pytest_twisted

from kongtx.store.interface import (
    EntityMeta,
    ForeignKey,
    StoreError,
    StoreUnavailable,
    UniqueViolation,
)
from kongtx.store.sqlite import SCHEMA_VERSION, SQLiteStore
from tests.store.contract import (
    ENTITIES,
    StoreContract,
    credential,
    consumer,
    failure_of,
    plugin,
    ref,
    route,
    service,
)


def _store(path: str, entities: Mapping[str, EntityMeta] = ENTITIES, **kwargs: Any) -> SQLiteStore:
    from twisted.internet import reactor

    return SQLiteStore(entities, path, reactor, **kwargs)


class TestSQLiteStore(StoreContract):
    """The whole contract against the embedded SQLite backend."""

    def make_store(self, entities: Mapping[str, EntityMeta], directory: str) -> Any:
        return _store(os.path.join(directory, "kong.db"), entities)


@pytest_twisted.ensureDeferred
async def test_rows_survive_close_and_reopen(tmp_path: Any) -> None:
    """Everything written (rows, indexes, deletions) is there after stop() and a new start()."""
    path = str(tmp_path / "kong.db")
    store = _store(path)
    await store.start()
    svc = await store.insert("services", service("s", tags=["x"]))
    r = await store.insert("routes", route(svc, "r"))
    c = await store.insert("consumers", consumer("bob"))
    gone = await store.insert("keyauth_credentials", credential(c, "gone"))
    await store.insert("plugins", plugin("cors", route_row=r))
    await store.delete("keyauth_credentials", gone["id"])
    await store.stop()

    reopened = _store(path)
    await reopened.start()
    try:
        assert await reopened.get("services", svc["id"]) == svc
        assert await reopened.get_by("routes", "name", "r") == r
        assert await reopened.get("keyauth_credentials", gone["id"]) is None
        assert [x["id"] for x in await reopened.all("routes", where={"service": svc["id"]})] == [r["id"]]
        error = await failure_of(reopened.insert("consumers", consumer("bob")))
        assert isinstance(error, UniqueViolation)
        error = await failure_of(reopened.insert("plugins", plugin("cors", route_row=r)))
        assert isinstance(error, UniqueViolation)
    finally:
        await reopened.stop()


@pytest_twisted.ensureDeferred
async def test_sql_never_runs_on_the_reactor_thread(tmp_path: Any) -> None:
    """Every SQL statement (open, reads, writes, close) executes off the main (reactor) thread."""
    threads: List[threading.Thread] = []

    def connect(path: str) -> sqlite3.Connection:
        threads.append(threading.current_thread())
        conn = sqlite3.connect(path)
        conn.set_trace_callback(lambda sql: threads.append(threading.current_thread()))
        return conn

    store = _store(str(tmp_path / "kong.db"), connect=connect)
    await store.start()
    svc = await store.insert("services", service("s"))
    await store.update("services", dict(svc, port=1))
    await store.get("services", svc["id"])
    await store.get_by("services", "name", "s")
    await store.page("services", 10)
    await store.all("services")
    assert await store.ping() is True
    await store.delete("services", svc["id"])
    await store.stop()
    assert len(threads) > 10
    assert threading.main_thread() not in threads
    assert len(set(threads)) == 1


@pytest_twisted.ensureDeferred
async def test_file_is_wal_with_schema_version(tmp_path: Any) -> None:
    """The created file uses the WAL journal and records the schema version in user_version."""
    path = str(tmp_path / "kong.db")
    store = _store(path)
    await store.start()
    await store.stop()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert set(ENTITIES) <= tables
        columns = {r[1] for r in conn.execute("PRAGMA table_info(plugins)")}
        assert {"id", "instance_name", "route_id", "service_id", "consumer_id", "cache_key", "doc"} <= columns
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_new_entity_adds_a_table_to_an_existing_file(tmp_path: Any) -> None:
    """Starting with an extra entity on an existing file adds its table and keeps the old rows."""
    path = str(tmp_path / "kong.db")
    small = {"services": EntityMeta("services", unique=("name",))}
    store = _store(path, small)
    await store.start()
    svc = await store.insert("services", {"id": "5f9a4c36-0000-4000-8000-000000000001", "name": "s"})
    await store.stop()

    bigger = dict(small, routes=EntityMeta("routes", foreign={"service": ForeignKey("services")}))
    store = _store(path, bigger)
    await store.start()
    try:
        assert await store.get("services", svc["id"]) == svc
        r = await store.insert("routes", {"id": "r1", "service": ref(svc)})
        assert await store.all("routes") == [r]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_new_indexed_field_adds_a_column_to_an_existing_table(tmp_path: Any) -> None:
    """A field a later release indexes (a new foreign key, a new unique field) is added
    to an existing table as a nullable column: the file opens, old rows stay readable
    and the new constraint holds for new rows."""
    path = str(tmp_path / "kong.db")
    before = {
        "services": EntityMeta("services", unique=("name",)),
        "plugins": EntityMeta("plugins", foreign={"service": ForeignKey("services")}),
    }
    store = _store(path, before)
    await store.start()
    svc = await store.insert("services", {"id": "5f9a4c36-0000-4000-8000-000000000002", "name": "s"})
    old = await store.insert("plugins", {"id": "p1", "service": ref(svc)})
    await store.stop()

    after = dict(before, plugins=EntityMeta("plugins", unique=("instance_name",), foreign={
        "service": ForeignKey("services"), "api": ForeignKey("services", on_delete="cascade")}))
    store = _store(path, after)
    await store.start()
    try:
        assert await store.get("plugins", "p1") == old
        await store.insert("plugins", {"id": "p2", "instance_name": "x", "service": None,
                                       "api": ref(svc)})
        error = await failure_of(store.insert("plugins", {
            "id": "p3", "instance_name": "x", "service": None, "api": None}))
        assert isinstance(error, UniqueViolation)
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_newer_schema_version_is_refused(tmp_path: Any) -> None:
    """A file written by a newer kongtx (higher user_version) is not opened."""
    path = str(tmp_path / "kong.db")
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = _store(path)
    error = await failure_of(store.start())
    assert isinstance(error, StoreError)
    assert "newer" in str(error)
    assert await store.ping() is False


@pytest_twisted.ensureDeferred
async def test_unopenable_path_is_unavailable(tmp_path: Any) -> None:
    """A path that cannot be opened fails start() with StoreUnavailable."""
    store = _store(str(tmp_path / "missing-dir" / "kong.db"))
    error = await failure_of(store.start())
    assert isinstance(error, StoreUnavailable)


@pytest_twisted.ensureDeferred
async def test_unstarted_or_stopped_store_is_unavailable(tmp_path: Any) -> None:
    """Before start() and after stop(), calls fail with StoreUnavailable and ping is False."""
    store = _store(str(tmp_path / "kong.db"))
    assert await store.ping() is False
    error = await failure_of(store.get("services", "x"))
    assert isinstance(error, StoreUnavailable)
    await store.start()
    assert await store.ping() is True
    await store.stop()
    assert await store.ping() is False
    error = await failure_of(store.insert("services", service("s")))
    assert isinstance(error, StoreUnavailable)


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_file_share_rows_and_constraints(tmp_path: Any) -> None:
    """Two stores on one file (two workers) see each other's rows; a contested name is won once."""
    from twisted.internet import defer

    path = str(tmp_path / "kong.db")
    first, second = _store(path), _store(path)
    await first.start()
    await second.start()
    try:
        svc = await first.insert("services", service("shared"))
        assert await second.get_by("services", "name", "shared") == svc
        attempts = [
            store.insert("consumers", consumer("bob"))
            for _ in range(3)
            for store in (first, second)
        ]
        results = await defer.DeferredList(attempts, consumeErrors=True)
        assert [ok for ok, _ in results].count(True) == 1
        assert all(value.check(UniqueViolation) for ok, value in results if not ok)
        assert len(await second.all("consumers")) == 1
    finally:
        await first.stop()
        await second.stop()
