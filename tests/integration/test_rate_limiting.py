"""rate-limiting through real sockets: the Admin API configures it, the proxy counts.

Exactness is the point: with a limit of N and 200 concurrent requests exactly N
pass, for ``local``, ``cluster`` (SQLite and Postgres) and ``redis``, and across
two nodes sharing one Postgres or one Redis. The ``hour`` window is used so that
no window rolls over during a test (a test starting in the last seconds of an
hour could see two windows: the counts below allow for none of that, so the
tests wait out the last 5 seconds of an hour first).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet import defer, task

from tests.integration.conftest import start_node
from tests.pg import fresh_database  # noqa: F401  (fixture)

REDIS_HOST = os.environ.get("KONGTX_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("KONGTX_TEST_REDIS_PORT", "6379"))


def require_redis() -> None:
    """Skips when Redis is down; fails instead when ``CI`` is set."""
    try:
        socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=2).close()
    except OSError:
        message = "Redis is not reachable on %s:%d" % (REDIS_HOST, REDIS_PORT)
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: a skipped backend is a failure)")
        pytest.skip(message)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)


async def _away_from_the_hour() -> None:
    if 3600 - time.time() % 3600 < 5:
        await _sleep(6)


async def configure(client: Any, admin: str, upstream: Any, **config: Any) -> Dict[str, Any]:
    """A service, a route ``/<random>`` and a rate-limiting plugin on the service (form body)."""
    name = "s" + uuid.uuid4().hex[:8]
    r = await client.request("POST", admin + "/services", form={"name": name, "url": upstream.url})
    assert r.code == 201, r.body
    r = await client.request("POST", admin + "/services/%s/routes" % name,
                             form={"paths[]": "/" + name})
    assert r.code == 201, r.body
    form = {"name": "rate-limiting"}
    form.update({"config.%s" % k: str(v) for k, v in config.items()})
    r = await client.request("POST", admin + "/services/%s/plugins" % name, form=form)
    assert r.code == 201, r.body
    return {"name": name, "path": "/" + name, "plugin": r.json()}


async def until_limited(client: Any, url: str) -> None:
    """Waits until ``url`` answers with rate-limit headers (the plugin reached that node).

    The probes are counted under ``X-Tenant: probe`` (the tests limit by that header).
    """
    for _ in range(500):
        r = await client.request("GET", url, headers={"X-Tenant": "probe"})
        if r.header("RateLimit-Limit") is not None or r.code == 429:
            return
        await _sleep(0.02)
    raise AssertionError("the plugin never applied on " + url)


async def burst(client: Any, urls: List[str], n: int) -> List[int]:
    """``n`` concurrent GETs spread over ``urls``; their statuses."""
    responses = await defer.gatherResults(
        [defer.ensureDeferred(client.request("GET", urls[i % len(urls)])) for i in range(n)]
    )
    return [r.code for r in responses]


# -- Kong's spec through the Admin API ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sixth_request_is_429_with_kongs_body_and_headers(node, client, upstream):
    """POST /services/{s}/plugins name=rate-limiting&config.minute=5&config.policy=local:
    five requests pass with falling RateLimit-Remaining, the sixth is 429."""
    setup = await configure(client, node.admin, upstream, minute=5, policy="local")
    assert setup["plugin"]["config"]["minute"] == 5
    url = node.proxy + setup["path"]
    remaining = []
    for _ in range(5):
        r = await client.request("GET", url)
        assert r.code == 200
        remaining.append(r.header("RateLimit-Remaining"))
        assert r.header("X-RateLimit-Limit-Minute") == "5"
        assert r.header("RateLimit-Limit") == "5"
        assert 1 <= int(r.header("RateLimit-Reset")) <= 60
    assert remaining == ["4", "3", "2", "1", "0"]
    r = await client.request("GET", url)
    assert r.code == 429
    assert r.json() == {"message": "API rate limit exceeded"}
    assert r.header("X-RateLimit-Remaining-Minute") == "0"
    assert r.header("RateLimit-Remaining") == "0"
    assert 1 <= int(r.header("Retry-After")) <= 60


@pytest_twisted.ensureDeferred
async def test_schema_message_through_the_admin_api(node, client, upstream):
    """A smaller hour limit than the minute limit is Kong's 400 with its message."""
    r = await client.request("POST", node.admin + "/plugins", form={
        "name": "rate-limiting", "config.minute": "10", "config.hour": "5"})
    assert r.code == 400
    assert r.json()["fields"]["config"] == (
        "The limit for hour(5.0) cannot be lower than the limit for minute(10.0)")


# -- exactness under concurrency --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_local_200_concurrent_exactly_50(node, client, upstream):
    """local: 200 concurrent requests against hour=50: exactly 50 pass, 150 get 429."""
    await _away_from_the_hour()
    setup = await configure(client, node.admin, upstream, hour=50, policy="local",
                            limit_by="service")
    codes = await burst(client, [node.proxy + setup["path"]], 200)
    assert codes.count(200) == 50 and codes.count(429) == 150


@pytest_twisted.ensureDeferred
async def test_cluster_sqlite_200_concurrent_exactly_50(node, client, upstream):
    """cluster on the embedded SQLite store: exactly 50 of 200 concurrent requests pass."""
    await _away_from_the_hour()
    setup = await configure(client, node.admin, upstream, hour=50, policy="cluster",
                            limit_by="service")
    codes = await burst(client, [node.proxy + setup["path"]], 200)
    assert codes.count(200) == 50 and codes.count(429) == 150


@pytest_twisted.ensureDeferred
async def test_cluster_postgres_two_nodes_exactly_50(fresh_database, tmp_path, client,  # noqa: F811
                                                     upstream):
    """cluster on Postgres: two nodes, 200 concurrent requests spread over both: exactly 50 pass."""
    from twisted.internet import reactor

    from kongtx.store import migrations

    await migrations.bootstrap(fresh_database.settings, reactor)
    a = await start_node(reactor, str(tmp_path / "a"), **fresh_database.env)
    b = await start_node(reactor, str(tmp_path / "b"), **fresh_database.env)
    try:
        await _away_from_the_hour()
        setup = await configure(client, a.admin, upstream, hour=50, policy="cluster",
                                limit_by="header", header_name="X-Tenant")
        urls = [a.proxy + setup["path"], b.proxy + setup["path"]]
        for url in urls:
            await until_limited(client, url)
        codes = await burst(client, urls, 200)
        assert codes.count(200) == 50 and codes.count(429) == 150
    finally:
        await a.service.stopService()
        await b.service.stopService()


@pytest_twisted.ensureDeferred
async def test_redis_two_nodes_exactly_50(tmp_path, client, upstream):
    """redis: two nodes (SQLite each) on one Redis, 200 concurrent requests: exactly 50 pass."""
    require_redis()
    from twisted.internet import reactor

    a = await start_node(reactor, str(tmp_path / "a"))
    b = await start_node(reactor, str(tmp_path / "b"))
    try:
        await _away_from_the_hour()
        config = {"hour": 50, "policy": "redis", "limit_by": "ip",
                  "redis.host": REDIS_HOST, "redis.port": REDIS_PORT}
        setup_a = await configure(client, a.admin, upstream, **config)
        plugin = setup_a["plugin"]
        # The same service, route and plugin ids on node B: one set of counters.
        service = (await client.request("GET", a.admin + "/services/" + setup_a["name"])).json()
        route = (await client.request(
            "GET", a.admin + "/services/%s/routes" % setup_a["name"])).json()["data"][0]
        for entity, row in (("services", service), ("routes", route), ("plugins", plugin)):
            body = {k: v for k, v in row.items() if v is not None}
            r = await client.request("PUT", b.admin + "/%s/%s" % (entity, row["id"]),
                                     json_body=body)
            assert r.code == 200, r.body
        urls = [a.proxy + setup_a["path"], b.proxy + setup_a["path"]]
        codes = await burst(client, urls, 200)
        assert codes.count(200) == 50 and codes.count(429) == 150
    finally:
        await a.service.stopService()
        await b.service.stopService()


# -- fault tolerance --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unreachable_redis_fault_tolerant(node, client, upstream):
    """fault_tolerant=true (default) with Redis on a closed port: requests pass, no headers."""
    setup = await configure(client, node.admin, upstream, minute=1, policy="redis",
                            **{"redis.host": "127.0.0.1", "redis.port": closed_port()})
    for _ in range(3):
        r = await client.request("GET", node.proxy + setup["path"])
        assert r.code == 200
        assert r.header("RateLimit-Limit") is None


@pytest_twisted.ensureDeferred
async def test_unreachable_redis_not_fault_tolerant(node, client, upstream):
    """fault_tolerant=false with Redis on a closed port: 500 An unexpected error occurred."""
    setup = await configure(client, node.admin, upstream, minute=1, policy="redis",
                            fault_tolerant="false",
                            **{"redis.host": "127.0.0.1", "redis.port": closed_port()})
    r = await client.request("GET", node.proxy + setup["path"])
    assert r.code == 500
    assert r.json() == {"message": "An unexpected error occurred"}
