"""Plugins through real sockets: a proxy on loopback, an echo upstream, plugin rows
written directly to the store, and the example third-party plugin loaded through
(injected) entry points."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet import defer

from kongtx.plugins import load_plugins
from kongtx.plugins.base import BasePlugin
from tests.integration.helpers import Client

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures", "example_plugin"))

from tests.test_pipeline import EXAMPLE_EP  # noqa: E402

SERVICE_ID = "5c2f1a3e-0000-4000-8000-000000000001"
ROUTE_ID = "5c2f1a3e-0000-4000-8000-000000000002"
OTHER_ROUTE_ID = "5c2f1a3e-0000-4000-8000-000000000003"

#: Filled by SlowLog: (event, reactor time).
EVENTS: List[Any] = []


class Boom(BasePlugin):
    NAME = "boom"
    PRIORITY = 500

    def access(self, kong: Any) -> None:
        if kong.request.get_header("x-boom"):
            raise RuntimeError("boom")
        kong.service.request.set_header("X-Added", "by-boom")
        kong.service.request.clear_header("X-Remove-Me")
        kong.ctx.shared["seen"] = True


class SlowLog(BasePlugin):
    NAME = "slow-log"
    PRIORITY = 1

    def log(self, kong: Any) -> defer.Deferred:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        EVENTS.append(("log-start", kong.response.get_status()))
        return deferLater(reactor, 0.5, EVENTS.append, ("log-end", None))


def _metas() -> Dict[str, Any]:
    from kongtx.schema import store_metas
    from kongtx.store.interface import EntityMeta, ForeignKey

    metas = dict(store_metas())
    metas.setdefault("consumers", EntityMeta("consumers", unique=("username", "custom_id")))
    metas.setdefault("plugins", EntityMeta(
        "plugins",
        foreign={"route": ForeignKey("routes", "cascade"),
                 "service": ForeignKey("services", "cascade"),
                 "consumer": ForeignKey("consumers", "cascade")},
        cache_key=("name", "route", "service", "consumer"),
    ))
    return metas


class Stack:
    """A store, a snapshot manager and a proxy site listening on loopback."""

    def __init__(self, reactor: Any, upstream_url: str) -> None:
        from kongtx.config import load_config
        from kongtx.proxy.client import UpstreamPool
        from kongtx.proxy.resource import GatewayResource, ProxySettings, ProxySite
        from kongtx.snapshot import SnapshotManager
        from kongtx.store.memory import MemoryStore

        self.reactor = reactor
        self.upstream_url = upstream_url
        self.store = MemoryStore(_metas())
        plugins = load_plugins(["example-header"], entry_points=[EXAMPLE_EP])
        plugins.update(boom=Boom, **{"slow-log": SlowLog})
        self.snapshots = SnapshotManager(self.store, reactor, plugins=plugins)
        config = load_config(None, {})
        self.pool = UpstreamPool(reactor)
        resource = GatewayResource(self.snapshots, self.pool, ProxySettings(config), reactor,
                                   node_id="node-1")
        self.site = ProxySite(resource, max_body_size=0, max_headers=100,
                              max_header_size=65536)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = "http://127.0.0.1:%d" % (self.port.getHost().port,)

    async def start(self) -> None:
        port = int(self.upstream_url.rsplit(":", 1)[1])
        base = {"created_at": 1, "updated_at": 1, "tags": None}
        await self.store.insert("services", dict(
            base, id=SERVICE_ID, name="echo", protocol="http", host="127.0.0.1", port=port,
            path=None, retries=0, connect_timeout=2000, write_timeout=2000,
            read_timeout=2000, tls_verify=None, enabled=True))
        for route_id, path in ((ROUTE_ID, "/p"), (OTHER_ROUTE_ID, "/other")):
            await self.store.insert("routes", dict(
                base, id=route_id, name=None, protocols=["http", "https"], methods=None,
                hosts=None, paths=[path], headers=None, snis=None, sources=None,
                destinations=None, https_redirect_status_code=426, regex_priority=0,
                strip_path=True, path_handling="v0", preserve_host=False,
                request_buffering=True, response_buffering=True,
                service={"id": SERVICE_ID}))
        await self.snapshots.start()

    async def plugin(self, name: str, config: Dict[str, Any], *, route: Any = ROUTE_ID,
                     protocols: Any = ("http", "https"), id: str) -> None:
        await self.store.insert("plugins", {
            "id": id, "name": name, "instance_name": None,
            "route": {"id": route} if route else None, "service": None, "consumer": None,
            "config": config, "protocols": list(protocols), "enabled": True,
            "tags": None, "created_at": 1, "updated_at": 1,
        })
        await self.snapshots.settled()

    async def stop(self) -> None:
        await self.port.stopListening()
        await self.snapshots.stop()
        await self.pool.close() if hasattr(self.pool, "close") else None


@pytest_twisted.async_yield_fixture
async def stack(upstream):
    from twisted.internet import reactor

    s = Stack(reactor, upstream.url)
    await s.start()
    yield s
    await s.stop()


EXAMPLE_CONFIG = {"header_name": "X-Example", "header_value": "hi", "block_on": "X-Block",
                  "block_status": 403}


@pytest_twisted.ensureDeferred
async def test_example_plugin_adds_a_response_header(stack, upstream):
    """The third-party plugin's header_filter adds its header to the upstream response;
    a route without plugins is untouched."""
    from twisted.internet import reactor

    await stack.plugin("example-header", EXAMPLE_CONFIG, id="a0000000-0000-4000-8000-000000000001")
    client = Client(reactor)
    response = await client.request("GET", stack.url + "/p/x")
    assert response.code == 200
    assert response.header("x-example") == "hi"
    assert response.json()["uri"] == "/x"
    other = await client.request("GET", stack.url + "/other")
    assert other.code == 200
    assert other.header("x-example") is None


@pytest_twisted.ensureDeferred
async def test_example_plugin_short_circuits(stack, upstream):
    """kong.response.exit answers the client; the upstream is never called;
    header_filter still runs."""
    from twisted.internet import reactor

    await stack.plugin("example-header", EXAMPLE_CONFIG, id="a0000000-0000-4000-8000-000000000001")
    before = len(upstream.requests)
    response = await Client(reactor).request("GET", stack.url + "/p", headers={"X-Block": "1"})
    assert response.code == 403
    assert response.json() == {"message": "Blocked by example-header"}
    assert response.header("content-type") == "application/json; charset=utf-8"
    assert response.header("x-example") == "hi"
    assert len(upstream.requests) == before


@pytest_twisted.ensureDeferred
async def test_plugin_exception_is_a_500_for_that_request_only(stack, upstream):
    """A plugin that raises gives Kong's 500 body; the next request is proxied and
    sees the plugin's upstream header changes."""
    from twisted.internet import reactor

    await stack.plugin("boom", {}, id="a0000000-0000-4000-8000-000000000002")
    client = Client(reactor)
    failed = await client.request("GET", stack.url + "/p", headers={"X-Boom": "1"})
    assert failed.code == 500
    assert failed.json()["message"] == "An unexpected error occurred"
    ok = await client.request("GET", stack.url + "/p", headers={"X-Remove-Me": "1"})
    assert ok.code == 200
    seen = ok.json()["headers"]
    assert seen["x-added"] == ["by-boom"]
    assert "x-remove-me" not in seen


@pytest_twisted.ensureDeferred
async def test_protocols_restrict_where_a_plugin_runs(stack, upstream):
    """A plugin configured with protocols ["https"] does not run on http."""
    from twisted.internet import reactor

    await stack.plugin("example-header", EXAMPLE_CONFIG, protocols=["https"],
                       id="a0000000-0000-4000-8000-000000000001")
    response = await Client(reactor).request("GET", stack.url + "/p", headers={"X-Block": "1"})
    assert response.code == 200
    assert response.header("x-example") is None


@pytest_twisted.ensureDeferred
async def test_global_plugin_applies_to_every_route(stack, upstream):
    """A plugin without route/service/consumer runs on every route."""
    from twisted.internet import reactor

    await stack.plugin("example-header", EXAMPLE_CONFIG, route=None,
                       id="a0000000-0000-4000-8000-000000000001")
    response = await Client(reactor).request("GET", stack.url + "/other")
    assert response.header("x-example") == "hi"


@pytest_twisted.ensureDeferred
async def test_response_arrives_before_a_slow_log_finishes(stack, upstream):
    """The log phase runs after the response is sent and never delays it."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    del EVENTS[:]
    await stack.plugin("slow-log", {}, id="a0000000-0000-4000-8000-000000000003")
    response = await Client(reactor).request("GET", stack.url + "/p")
    assert response.code == 200
    # The client has the whole response; the log phase started but has not ended.
    await deferLater(reactor, 0.05, lambda: None)
    assert EVENTS == [("log-start", 200)]
    await deferLater(reactor, 0.6, lambda: None)
    assert EVENTS == [("log-start", 200), ("log-end", None)]
