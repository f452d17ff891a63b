"""Legacy 0.x ``/apis`` end to end: the seed's operator steps through a real kongtx node
(Admin API and proxy on loopback) to an echo upstream."""

from __future__ import annotations

import json

import pytest_twisted

from tests.integration.conftest import start_node
from tests.integration.helpers import raw_exchange, split_response


@pytest_twisted.ensureDeferred
async def test_seed_apis_walkthrough(node, upstream, client) -> None:
    """POST /apis (name, hosts, uris /kong1, upstream_url); GET /apis shows it with ``total``;
    ``POST /kong1?query=version`` reaches the upstream with the query (uri stripped);
    rate-limiting minute=10 on the API: ``X-RateLimit-Remaining-Minute: 9``, the 11th is 429."""
    r = await client.request("POST", node.admin + "/apis", form={
        "name": "my-kong-api",
        "hosts": "example.com,kong.example.com",
        "uris": "/kong1",
        "upstream_url": upstream.url + "/api",
    })
    assert r.code == 201, r.body
    api = r.json()
    r = await client.request("GET", node.admin + "/apis")
    assert r.code == 200 and r.json() == {"data": [api], "total": 1}

    r = await client.request("POST", node.proxy + "/kong1?query=version",
                             headers={"Host": "example.com"}, body=b"{}")
    assert r.code == 200, r.body
    assert r.json()["uri"] == "/api?query=version"
    assert r.json()["method"] == "POST"
    r = await client.request("GET", node.proxy + "/kong1", headers={"Host": "other.com"})
    assert r.code == 404

    r = await client.request("POST", node.admin + "/apis/my-kong-api/plugins",
                             form={"name": "rate-limiting", "config.minute": "10"})
    assert r.code == 201, r.body
    assert r.json()["api"] == {"id": api["id"]}
    codes = []
    for i in range(11):
        r = await client.request("GET", node.proxy + "/kong1?query=version",
                                 headers={"Host": "kong.example.com"})
        codes.append(r.code)
        if i == 0:
            assert r.header("X-RateLimit-Remaining-Minute") == "9"
            assert r.header("X-RateLimit-Limit-Minute") == "10"
    assert codes == [200] * 10 + [429]


@pytest_twisted.ensureDeferred
async def test_routes_win_over_apis(node, upstream, client) -> None:
    """Kong 0.13-0.14 precedence: a route matching the request wins over an API that also
    matches; the API serves what no route matches."""
    r = await client.request("POST", node.admin + "/services",
                             form={"name": "svc", "url": upstream.url + "/from-route"})
    assert r.code == 201, r.body
    r = await client.request("POST", node.admin + "/services/svc/routes",
                             form={"paths[]": "/shared"})
    assert r.code == 201, r.body
    r = await client.request("POST", node.admin + "/apis", json_body={
        "name": "legacy", "uris": ["/shared", "/legacy"],
        "upstream_url": upstream.url + "/from-api"})
    assert r.code == 201, r.body
    r = await client.request("GET", node.proxy + "/shared/x")
    assert r.json()["uri"] == "/from-route/x"
    r = await client.request("GET", node.proxy + "/legacy/x")
    assert r.json()["uri"] == "/from-api/x"
    r = await client.request("DELETE", node.admin + "/apis/legacy")
    assert r.code == 204
    r = await client.request("GET", node.proxy + "/legacy/x")
    assert r.code == 404


@pytest_twisted.ensureDeferred
async def test_https_only_answers_426(tmp_path, upstream, client) -> None:
    """``https_only``: plain http gets 426 ``Please use HTTPS protocol`` with ``Connection:
    Upgrade`` and ``Upgrade: TLS/1.2, HTTP/1.1``; with ``http_if_terminated`` a trusted
    ``X-Forwarded-Proto: https`` is let through, an untrusted one is not."""
    from twisted.internet import reactor

    started = await start_node(reactor, str(tmp_path / "prefix"),
                               KONG_TRUSTED_IPS="127.0.0.1")
    try:
        for name, terminated in (("strict", "false"), ("terminated", "true")):
            r = await client.request("POST", started.admin + "/apis", form={
                "name": name, "uris": "/" + name, "upstream_url": upstream.url,
                "https_only": "true", "http_if_terminated": terminated})
            assert r.code == 201, r.body
        port = int(started.proxy.rsplit(":", 1)[1])
        raw = await raw_exchange(reactor, "127.0.0.1", port,
                                 b"GET /strict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = split_response(raw)
        assert status.startswith("HTTP/1.1 426 ")
        assert json.loads(body)["message"] == "Please use HTTPS protocol"
        assert headers["connection"] == "Upgrade"
        assert headers["upgrade"] == "TLS/1.2, HTTP/1.1"
        forwarded = {"X-Forwarded-Proto": "https"}
        r = await client.request("GET", started.proxy + "/strict", headers=forwarded)
        assert r.code == 426
        r = await client.request("GET", started.proxy + "/terminated", headers=forwarded)
        assert r.code == 200, r.body
        r = await client.request("GET", started.proxy + "/terminated")
        assert r.code == 426
    finally:
        await started.service.stopService()


@pytest_twisted.ensureDeferred
async def test_http_if_terminated_needs_a_trusted_client(node, upstream, client) -> None:
    """Without ``trusted_ips`` covering the client, ``X-Forwarded-Proto: https`` is ignored."""
    r = await client.request("POST", node.admin + "/apis", form={
        "name": "t", "uris": "/t", "upstream_url": upstream.url,
        "https_only": "true", "http_if_terminated": "true"})
    assert r.code == 201, r.body
    r = await client.request("GET", node.proxy + "/t", headers={"X-Forwarded-Proto": "https"})
    assert r.code == 426
