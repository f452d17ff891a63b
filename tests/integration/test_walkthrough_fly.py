"""The Fly.io Kong walkthrough (shared/seeds/003), step by step against kongtx, with
the same Admin API calls (hosts and ports adjusted, a local upstream instead of
JSON Placeholder)."""

from __future__ import annotations

import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_fly_walkthrough(node, client, upstream):
    admin, proxy = node.admin, node.proxy

    # Adding a Backend Service
    r = await client.request("POST", admin + "/services",
                             form={"name": "posts", "url": upstream.url + "/posts"})
    assert r.code == 201, r.body
    r = await client.request("POST", admin + "/services/posts/routes",
                             form={"paths[]": "/posts"})
    assert r.code == 201, r.body
    r = await client.request("GET", proxy + "/posts")
    assert r.code == 200
    assert r.json()["uri"] == "/posts"

    # Rate Limiting Access: the 6th request within the minute is refused.
    r = await client.request("POST", admin + "/services/posts/plugins/", form={
        "name": "rate-limiting", "config.minute": "5", "config.policy": "local"})
    assert r.code == 201, r.body
    statuses = [(await client.request("GET", proxy + "/posts")).code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    r = await client.request("GET", proxy + "/posts")
    assert r.code == 429
    assert r.json()["message"] == "API rate limit exceeded"

    # API Key Authentication
    r = await client.request("POST", admin + "/services/posts/plugins/", form={
        "name": "key-auth", "config.hide_credentials": "true"})
    assert r.code == 201, r.body
    r = await client.request("GET", proxy + "/posts")
    assert r.code == 401
    assert r.json()["message"] == "No API key found in request"

    r = await client.request("POST", admin + "/consumers/", form={"username": "admin"})
    assert r.code == 201, r.body
    r = await client.request("POST", admin + "/consumers/admin/key-auth", form={})
    assert r.code == 201, r.body
    key = r.json()["key"]
    assert key

    seen_before = len(upstream.requests)
    r = await client.request("GET", proxy + "/posts?apikey=" + key)
    assert r.code == 200, r.body
    forwarded = upstream.requests[seen_before]
    assert key not in forwarded["uri"]
    assert forwarded["headers"]["x-consumer-username"] == ["admin"]

    # Securing the Kong Admin API: the Admin API through the proxy, with a key.
    admin_port = admin.rsplit(":", 1)[1]
    r = await client.request("POST", admin + "/services", form={
        "name": "admin-api", "host": "localhost", "port": admin_port})
    assert r.code == 201, r.body
    r = await client.request("POST", admin + "/services/admin-api/routes",
                             form={"paths[]": "/admin-api"})
    assert r.code == 201, r.body
    r = await client.request("POST", admin + "/services/admin-api/plugins/", form={
        "name": "key-auth", "config.hide_credentials": "true"})
    assert r.code == 201, r.body

    r = await client.request("GET", proxy + "/admin-api")
    assert r.code == 401
    r = await client.request("GET", proxy + "/admin-api?apikey=" + key)
    assert r.code == 200, r.body
    assert r.json()["tagline"] == "Welcome to kong"
    r = await client.request("GET", proxy + "/admin-api/services/posts?apikey=" + key)
    assert r.code == 200, r.body
    assert r.json()["name"] == "posts"


@pytest_twisted.ensureDeferred
async def test_rate_limited_answer_has_a_real_reason_phrase(node, client, upstream):
    """429 goes out as 'Too Many Requests' (twisted.web alone says 'Unknown Status')."""
    from twisted.internet import reactor

    from tests.integration.helpers import raw_exchange

    await client.request("POST", node.admin + "/services",
                         form={"name": "s", "url": upstream.url})
    await client.request("POST", node.admin + "/services/s/routes", form={"paths[]": "/"})
    await client.request("POST", node.admin + "/services/s/plugins", form={
        "name": "rate-limiting", "config.hour": "1"})
    assert (await client.request("GET", node.proxy + "/")).code == 200
    port = int(node.proxy.rsplit(":", 1)[1])
    raw = await raw_exchange(reactor, "127.0.0.1", port,
                             b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
