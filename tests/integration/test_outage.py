"""A node cut off from a real Postgres (through a loopback relay the test controls)
keeps proxying its whole configuration, says the database is unreachable, refuses
writes at once, catches up when the database returns, and starts from its last
known configuration when the database is down at start."""

from __future__ import annotations

import time

import pytest_twisted

from tests.integration.conftest import start_node
from tests.integration.relay import Relay
from tests.integration.test_cluster import _until
from tests.pg import fresh_database  # noqa: F401  (fixture)


async def _reachable(client, node) -> bool:
    r = await client.request("GET", node.admin + "/status")
    return r.json()["database"]["reachable"]


@pytest_twisted.ensureDeferred
async def test_outage_keeps_serving_and_catches_up(fresh_database, tmp_path, client, upstream):
    from twisted.internet import reactor

    from kongtx.store import migrations

    await migrations.bootstrap(fresh_database.settings, reactor)
    relay = Relay(reactor, "127.0.0.1", 5432)
    env = dict(fresh_database.env, KONG_PG_TIMEOUT="1000", KONG_DB_UPDATE_FREQUENCY="1")
    cut_off = await start_node(reactor, str(tmp_path / "a"),
                               **dict(env, KONG_PG_PORT=str(relay.port)))
    direct = await start_node(reactor, str(tmp_path / "b"), **env)
    restarted = None
    try:
        r = await client.request("POST", cut_off.admin + "/services",
                                 form={"name": "echo", "url": upstream.url})
        assert r.code == 201, r.body
        for path in ("/one", "/two"):
            r = await client.request("POST", cut_off.admin + "/services/echo/routes",
                                     form={"paths[]": path})
            assert r.code == 201, r.body

        await relay.cut()

        async def unreachable():
            return not await _reachable(client, cut_off)

        await _until(unreachable, timeout=15, step=0.1)
        # Every route keeps working, not just recently used ones.
        for path in ("/one", "/two"):
            assert (await client.request("GET", cut_off.proxy + path)).code == 200
        started = time.monotonic()
        r = await client.request("POST", cut_off.admin + "/services",
                                 form={"name": "other", "url": upstream.url})
        assert r.code >= 500
        assert "message" in r.json()
        assert time.monotonic() - started < 1.5

        # Meanwhile another node (with its database) adds a route.
        r = await client.request("POST", direct.admin + "/services/echo/routes",
                                 form={"paths[]": "/three"})
        assert r.code == 201, r.body

        relay.restore()

        async def caught_up():
            return (await client.request("GET", cut_off.proxy + "/three")).code == 200

        await _until(caught_up, timeout=20, step=0.1)
        assert await _reachable(client, cut_off)

        # Acknowledged writes survived; a node started during an outage serves the
        # last configuration it saw.
        await cut_off.service.stopService()
        cut_off = None
        await relay.cut()
        restarted = await start_node(reactor, str(tmp_path / "a"),
                                     **dict(env, KONG_PG_PORT=str(relay.port)))
        assert restarted.service.snapshots.source == "disk"
        for path in ("/one", "/two", "/three"):
            assert (await client.request("GET", restarted.proxy + path)).code == 200
        relay.restore()

        async def back_on_store():
            return restarted.service.snapshots.source == "store"

        await _until(back_on_store, timeout=20, step=0.1)
    finally:
        for node in (cut_off, direct, restarted):
            if node is not None:
                await node.service.stopService()
        await relay.stop()
