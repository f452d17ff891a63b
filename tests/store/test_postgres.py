"""PostgresStore passes the IStore contract and broadcasts its changes to other nodes."""

from __future__ import annotations

import uuid
from typing import Any, Iterator, List, Mapping, Optional

import attr
import pytest
import pytest_twisted

from kongtx.store import migrations
from kongtx.store.interface import ChangeEvent, EntityMeta
from kongtx.store.postgres import PgSettings, PostgresStore
from tests.pg import Database, module_database  # noqa: F401 (fixture)
from tests.store.contract import ENTITIES, StoreContract

#: The migrations of the contract's test-only entities.
CONTRACT_MIGRATIONS = [
    migrations.known_migrations()[0],  # cluster_events
    migrations.entity_migration("0002_contract_entities", ENTITIES),
]


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def make_store(
    settings: PgSettings, node_id: Optional[str] = None, entities: Mapping[str, EntityMeta] = ENTITIES
) -> PostgresStore:
    return PostgresStore(
        entities, settings, _reactor(), node_id or str(uuid.uuid4()), migrations=CONTRACT_MIGRATIONS
    )


def schema_settings(database: Database, **changes: Any) -> PgSettings:
    """Settings for a new schema of the module's database (one per test)."""
    return database.with_settings(schema="t_" + uuid.uuid4().hex[:10], **changes)


class TestPostgresStore(StoreContract):
    """The whole contract against Postgres (each test in a fresh, bootstrapped schema)."""

    @pytest.fixture
    def store(self, module_database: Database) -> Iterator[Any]:  # noqa: F811
        settings = schema_settings(module_database)
        pytest_twisted.blockon(
            defer_of(migrations.bootstrap(settings, _reactor(), CONTRACT_MIGRATIONS))
        )
        store = make_store(settings)
        pytest_twisted.blockon(store.start())
        yield store
        pytest_twisted.blockon(store.stop())
        pytest_twisted.blockon(defer_of(migrations.reset(settings, _reactor(), CONTRACT_MIGRATIONS)))


def defer_of(coroutine: Any) -> Any:
    from twisted.internet import defer

    return defer.Deferred.fromCoroutine(coroutine)


# -- cluster events, outage and reconnection -------------------------------------------

import json  # noqa: E402

from twisted.internet import defer  # noqa: E402

from kongtx.store.interface import StoreUnavailable  # noqa: E402
from kongtx.store.postgres import (  # noqa: E402
    NOT_BOOTSTRAPPED,
    MigrationsNeeded,
)
from tests.pg import Gate, terminate_backends, wait_for  # noqa: E402
from tests.store.contract import (  # noqa: E402
    consumer,
    credential,
    failure_of,
    plugin,
    ref,
    route,
    service,
    team,
)


@attr.s(auto_attribs=True)
class Cluster:
    settings: PgSettings
    stores: List[PostgresStore]

    async def node(self, settings: Optional[PgSettings] = None, **changes: Any) -> PostgresStore:
        store = make_store(attr.evolve(settings or self.settings, **changes))
        await store.start()
        self.stores.append(store)
        return store


@pytest.fixture
def cluster(module_database: Database) -> Iterator[Cluster]:  # noqa: F811
    """A bootstrapped schema; nodes started with ``await cluster.node()`` are stopped after."""
    settings = schema_settings(module_database, update_frequency=60.0)
    pytest_twisted.blockon(defer_of(migrations.bootstrap(settings, _reactor(), CONTRACT_MIGRATIONS)))
    c = Cluster(settings, [])
    yield c
    for store in c.stores:
        pytest_twisted.blockon(store.stop())
    pytest_twisted.blockon(defer_of(migrations.reset(settings, _reactor(), CONTRACT_MIGRATIONS)))


def _sql(database: Database, settings: PgSettings, sql: str, params: Any = ()) -> List[Any]:
    conn = database.connect()
    try:
        cur = conn.cursor()
        cur.execute(f'SET search_path TO "{settings.schema}"')
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_write_on_one_node_reaches_another_by_notify(cluster: Cluster) -> None:
    """A's insert/update/delete reach B's listeners within milliseconds (NOTIFY, no poll: poll every 60 s).

    B gets the current row for create/update, None for delete, and never its own events twice.
    """
    reactor = _reactor()
    a, b = await cluster.node(), await cluster.node()
    seen_a: List[ChangeEvent] = []
    seen_b: List[ChangeEvent] = []
    a.add_listener(seen_a.append)
    b.add_listener(seen_b.append)
    start = reactor.seconds()
    row = await a.insert("services", service("s"))
    waited = await wait_for(reactor, lambda: len(seen_b) == 1, timeout=2.0)
    delay = reactor.seconds() - start
    assert seen_b == [ChangeEvent("services", "create", row["id"], None, row)]
    assert delay < 0.5, delay
    assert b.last_event_delay is not None and b.last_event_delay < 0.5
    changed = await a.update("services", dict(row, port=81))
    await a.delete("services", row["id"])
    await wait_for(reactor, lambda: len(seen_b) == 3, timeout=2.0)
    assert seen_b[1:] == [
        ChangeEvent("services", "update", row["id"], None, changed),
        ChangeEvent("services", "delete", row["id"], None, None),
    ]
    assert [e.op for e in seen_a] == ["create", "update", "delete"]  # A: local events only
    assert b.events_applied == 3 and a.events_applied == 0
    assert waited < 2.0


@pytest_twisted.ensureDeferred
async def test_cascade_is_one_transaction_with_its_cluster_events(
    cluster: Cluster, module_database: Database  # noqa: F811
) -> None:
    """A cascade commits its rows and one cluster event per changed row together; a refused one neither."""
    reactor = _reactor()
    a, b = await cluster.node(), await cluster.node()
    seen_b: List[ChangeEvent] = []
    b.add_listener(seen_b.append)
    t = await a.insert("teams", team("t"))
    c = await a.insert("consumers", consumer("bob", team=ref(t)))
    await a.insert("keyauth_credentials", credential(c, "k"))
    svc = await a.insert("services", service("s", team=ref(t)))
    r = await a.insert("routes", route(svc, "r"))
    count = "SELECT count(*) FROM cluster_events"
    before = _sql(module_database, cluster.settings, count)[0][0]
    await failure_of(a.delete("teams", t["id"]))  # the route restricts the service half-way
    assert _sql(module_database, cluster.settings, count)[0][0] == before
    assert await a.get("consumers", c["id"]) == c
    await a.delete("routes", r["id"])
    await a.delete("teams", t["id"])
    after = _sql(module_database, cluster.settings, count)[0][0]
    assert after == before + 1 + 4  # the route, then credential, consumer, service, team
    await wait_for(reactor, lambda: len(seen_b) == 5 + 5, timeout=2.0)
    assert [(e.entity, e.op) for e in seen_b[-4:]] == [
        ("keyauth_credentials", "delete"),
        ("consumers", "delete"),
        ("services", "delete"),
        ("teams", "delete"),
    ]


@pytest_twisted.ensureDeferred
async def test_lost_notifications_are_caught_by_polling(
    cluster: Cluster, module_database: Database  # noqa: F811
) -> None:
    """A cluster event written without NOTIFY is applied by the next poll (every db_update_frequency)."""
    reactor = _reactor()
    a = await cluster.node()
    b = await cluster.node(update_frequency=0.1)
    seen_b: List[ChangeEvent] = []
    b.add_listener(seen_b.append)
    svc = await a.insert("services", service("s"))
    await wait_for(reactor, lambda: len(seen_b) == 1)
    # A change made by a node whose NOTIFY never arrived: only the table row says so.
    changed = dict(svc, port=99)
    _sql(
        module_database,
        cluster.settings,
        "UPDATE services SET doc = %s WHERE id = %s;"
        "INSERT INTO cluster_events (id, node_id, channel, data) VALUES (%s, 'ghost', 'kongtx_events', %s)",
        [json.dumps(changed), svc["id"], str(uuid.uuid4()),
         json.dumps({"entity": "services", "op": "update", "id": svc["id"]})],
    )
    await wait_for(reactor, lambda: len(seen_b) == 2, timeout=2.0)
    assert seen_b[1] == ChangeEvent("services", "update", svc["id"], None, changed)
    # Later polls do not apply it again.
    applied = b.events_applied
    from twisted.internet import task

    await task.deferLater(reactor, 0.35, lambda: None)  # three more polls
    assert b.events_applied == applied


@pytest_twisted.ensureDeferred
async def test_cut_listen_connection_reconnects_and_loses_nothing(
    cluster: Cluster, module_database: Database  # noqa: F811
) -> None:
    """When B's LISTEN connection is killed server-side, B reconnects and still gets every change once."""
    reactor = _reactor()
    a, b = await cluster.node(), await cluster.node()
    seen_b: List[ChangeEvent] = []
    b.add_listener(seen_b.append)
    assert b._listen is not None
    pid = b._listen.get_backend_pid()
    assert terminate_backends(module_database.name, pid=pid) == 1
    rows = [await a.insert("services", service(f"s{i}")) for i in range(5)]
    await wait_for(reactor, lambda: len(seen_b) == 5, timeout=5.0)
    await wait_for(reactor, lambda: b._listen is not None and b._listen.is_open)
    assert b._listen.get_backend_pid() != pid
    assert sorted(e.id for e in seen_b) == sorted(r["id"] for r in rows)
    more = await a.insert("services", service("after"))
    await wait_for(reactor, lambda: len(seen_b) == 6, timeout=2.0)
    assert seen_b[-1].id == more["id"]
    assert b.reachable and await b.ping() is True


@pytest_twisted.ensureDeferred
async def test_unreachable_server_fails_start_fast(module_database: Database) -> None:  # noqa: F811
    """start() against a closed port fails with StoreUnavailable well under pg_timeout; ping is False."""
    reactor = _reactor()
    gate = Gate(reactor)
    port = gate.open()
    await gate.close()  # a port nobody listens on any more
    store = make_store(module_database.with_settings(port=port, timeout=2000))
    start = reactor.seconds()
    error = await failure_of(store.start())
    assert isinstance(error, StoreUnavailable)
    assert str(error).startswith("database unreachable: ")
    assert reactor.seconds() - start < 1.0
    assert await store.ping() is False
    assert isinstance(await failure_of(store.get("services", "x")), StoreUnavailable)


@pytest_twisted.ensureDeferred
async def test_start_refuses_a_database_that_was_never_bootstrapped(
    module_database: Database,  # noqa: F811
) -> None:
    """start() on an empty schema fails with one line telling the operator what to run."""
    store = make_store(schema_settings(module_database))
    error = await failure_of(store.start())
    assert isinstance(error, MigrationsNeeded)
    assert str(error) == NOT_BOOTSTRAPPED
    assert str(error) == "database has not been bootstrapped: run 'kongtx migrations bootstrap'"


@pytest_twisted.ensureDeferred
async def test_outage_fails_fast_then_reconnects_and_catches_up(
    cluster: Cluster, module_database: Database  # noqa: F811
) -> None:
    """While the database is down B answers ping False and fails fast; back up, it gets A's writes."""
    reactor = _reactor()
    gate = Gate(reactor)
    port = gate.open()
    a = await cluster.node()
    b = await cluster.node(port=port, timeout=1000)
    seen_b: List[ChangeEvent] = []
    b.add_listener(seen_b.append)
    before = await b.insert("services", service("before"))
    await gate.close()
    await wait_for(reactor, lambda: not b.reachable, timeout=2.0)
    start = reactor.seconds()
    assert await b.ping() is False
    for d in (b.get("services", before["id"]), b.insert("services", service("x")), b.all("services")):
        error = await failure_of(d)
        assert isinstance(error, StoreUnavailable)
        assert str(error).startswith("database unreachable: ")
    assert reactor.seconds() - start < 0.1
    # Meanwhile another node writes; nothing B acknowledged was lost.
    during = await a.insert("services", service("during"))
    assert await a.get("services", before["id"]) == before
    gate.open()
    await wait_for(reactor, lambda: b.reachable, timeout=5.0)
    await wait_for(reactor, lambda: any(e.id == during["id"] for e in seen_b), timeout=5.0)
    assert await b.get("services", during["id"]) == during
    assert await b.ping() is True
    await gate.close()
    await wait_for(reactor, lambda: not b.reachable, timeout=2.0)


@pytest_twisted.ensureDeferred
async def test_black_holed_database_fails_within_pg_timeout(cluster: Cluster) -> None:
    """When the server stops answering, a read fails with StoreUnavailable after pg_timeout, never hangs."""
    reactor = _reactor()
    gate = Gate(reactor)
    port = gate.open()
    b = await cluster.node(port=port, timeout=300)
    await b.get("services", "warm-up")
    gate.freeze()
    start = reactor.seconds()
    error = await failure_of(b.get("services", "x"))
    elapsed = reactor.seconds() - start
    assert isinstance(error, StoreUnavailable)
    assert 0.25 < elapsed < 1.5, elapsed
    assert await b.ping() is False or not b.reachable
    await gate.close()


@pytest_twisted.ensureDeferred
async def test_away_longer_than_retention_asks_for_a_reload(
    cluster: Cluster, module_database: Database  # noqa: F811
) -> None:
    """A node whose last seen event is older than the retained events emits ChangeEvent('*', 'reload')."""
    reactor = _reactor()
    b = await cluster.node()
    seen_b: List[ChangeEvent] = []
    b.add_listener(seen_b.append)
    b.last_event_at -= 2 * 3600
    assert b._listen is not None
    terminate_backends(module_database.name, pid=b._listen.get_backend_pid())
    await wait_for(reactor, lambda: len(seen_b) == 1, timeout=5.0)
    assert seen_b == [ChangeEvent("*", "reload", "", None, None)]


@pytest_twisted.ensureDeferred
async def test_snapshot_manager_on_b_follows_writes_on_a(module_database: Database) -> None:  # noqa: F811
    """With the real entities and migrations, node B's SnapshotManager routes a route created on A."""
    from kongtx.schema import store_metas
    from kongtx.snapshot import SnapshotManager

    reactor = _reactor()
    settings = schema_settings(module_database, update_frequency=60.0)
    await migrations.bootstrap(settings, reactor)
    metas = store_metas()
    a = PostgresStore(metas, settings, reactor, "node-a")
    b = PostgresStore(metas, settings, reactor, "node-b")
    await a.start()
    await b.start()
    manager = SnapshotManager(b, reactor)
    try:
        await manager.start()
        version = manager.current.version
        svc = {"id": str(uuid.uuid4()), "name": "s", "host": "example.com", "port": 80,
               "protocol": "http", "path": None, "retries": 5}
        await a.insert("services", svc)
        rt = {"id": str(uuid.uuid4()), "name": "r", "paths": ["/x"], "service": {"id": svc["id"]},
              "protocols": ["http"]}
        await a.insert("routes", rt)
        await wait_for(reactor, lambda: svc["id"] in manager.current.services, timeout=2.0)
        assert manager.current.version > version
    finally:
        manager.stop()
        await a.stop()
        await b.stop()
        await migrations.reset(settings, reactor)
