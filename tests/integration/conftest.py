"""Fixtures that start real listeners on loopback: an echo upstream and a kongtx node."""

from __future__ import annotations

from typing import Any, Dict

import pytest
import pytest_twisted
from twisted.web import server

from tests.integration.helpers import Client, EchoResource


class Upstream:
    def __init__(self, reactor: Any) -> None:
        self.resource = EchoResource(reactor)
        self.site = server.Site(self.resource)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = "http://127.0.0.1:%d" % (self.port.getHost().port,)

    @property
    def requests(self):
        return self.resource.requests


class Node:
    """A started kongtx node (in this process) with its base URLs."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.proxy = "http://127.0.0.1:%d" % service.addresses(service.proxy_site)[0].port
        self.admin = "http://127.0.0.1:%d" % service.addresses(service.admin_site)[0].port


async def start_node(reactor: Any, prefix: str, **env: str) -> Node:
    import os

    from kongtx.config import load_config
    from kongtx.tap import KongtxService, prepare_prefix

    conf = os.path.join(prefix, "kong.conf")
    os.makedirs(prefix, exist_ok=True)
    if not os.path.exists(conf):
        open(conf, "w").close()
    environ: Dict[str, str] = {
        "KONG_PROXY_LISTEN": "127.0.0.1:0",
        "KONG_ADMIN_LISTEN": "127.0.0.1:0",
        "KONG_PROXY_ACCESS_LOG": "off",
        "KONG_ADMIN_ACCESS_LOG": "off",
    }
    environ.update(env)
    config = load_config(conf, environ, prefix)
    prepare_prefix(config)
    service = KongtxService(config, reactor)
    service.stop_reactor_on_failure = False  # the test reactor is shared
    service.privilegedStartService()
    service.startService()
    await service.ready
    return Node(service)


@pytest.fixture
def upstream():
    from twisted.internet import reactor

    up = Upstream(reactor)
    yield up
    up.port.stopListening()


@pytest_twisted.async_yield_fixture
async def node(tmp_path):
    from twisted.internet import reactor

    started = await start_node(reactor, str(tmp_path / "prefix"))
    yield started
    await started.service.stopService()


@pytest.fixture
def client():
    from twisted.internet import reactor

    return Client(reactor)
