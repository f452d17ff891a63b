"""key-auth end to end (Kong's spec/03-plugins/09-key-auth/02-access_spec.lua): Admin
API writes, then real requests through a kongtx node to an echo upstream, over
loopback sockets."""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Optional

import pytest_twisted
from twisted.internet import task

from tests.pg import fresh_database  # noqa: F401  (fixture)

KEY = "kong-key-1"


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)


async def _setup(client, node, upstream, config: Optional[Dict[str, Any]] = None,
                 path: str = "/ka") -> Dict[str, Any]:
    """A service, a route on *path* with key-auth (*config*), alice with key KEY and
    an anonymous consumer; returns the rows."""
    r = await client.request("GET", node.admin + "/services/echo")
    if r.code == 404:
        r = await client.request("POST", node.admin + "/services",
                                 form={"name": "echo", "url": upstream.url})
        assert r.code == 201, r.body
    r = await client.request("POST", node.admin + "/services/echo/routes",
                             form={"paths[]": path})
    assert r.code == 201, r.body
    route = r.json()
    r = await client.request("POST", node.admin + "/routes/%s/plugins" % route["id"],
                             json_body={"name": "key-auth", "config": config or {}})
    assert r.code == 201, r.body
    rows: Dict[str, Any] = {"route": route, "plugin": r.json()}
    r = await client.request("GET", node.admin + "/consumers/alice")
    if r.code == 404:
        r = await client.request("POST", node.admin + "/consumers",
                                 form={"username": "alice", "custom_id": "a-1"})
        assert r.code == 201, r.body
        rows["alice"] = r.json()
        r = await client.request("POST", node.admin + "/consumers/alice/key-auth",
                                 form={"key": KEY})
        assert r.code == 201, r.body
        rows["credential"] = r.json()
        r = await client.request("POST", node.admin + "/consumers",
                                 form={"username": "nobody"})
        assert r.code == 201, r.body
        rows["anonymous"] = r.json()
    return rows


def _echo(r) -> Dict[str, Any]:
    assert r.code == 200, r.body
    return r.json()


@pytest_twisted.ensureDeferred
async def test_refusals_are_401_with_challenge(node, client, upstream):
    """No key, an empty key, an unknown key, a duplicate key and ``apikey[]`` are 401s
    with Kong's messages and ``WWW-Authenticate: Key``; nothing reaches the upstream."""
    await _setup(client, node, upstream)
    for url, headers, message in (
        ("/ka", {}, "No API key found in request"),
        ("/ka", {"apikey": ""}, "No API key found in request"),
        ("/ka?apikey=", {}, "No API key found in request"),
        ("/ka?apikey[]=" + KEY, {}, "No API key found in request"),
        ("/ka?apikey=123", {}, "Unauthorized"),
        ("/ka", {"apikey": "123"}, "Unauthorized"),
        ("/ka?apikey=%s&apikey=%s" % (KEY, KEY), {}, "Duplicate API key found"),
    ):
        r = await client.request("GET", node.proxy + url, headers=headers)
        assert r.code == 401, (url, r.body)
        assert r.json() == {"message": message}
        assert r.header("www-authenticate") == "Key"
    assert upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_key_in_header_query_and_body(node, client, upstream):
    """A valid key in a header, the query string or (key_in_body) a form or JSON body
    is accepted; without hide_credentials it reaches the upstream unchanged."""
    await _setup(client, node, upstream)
    await _setup(client, node, upstream, {"key_in_body": True}, path="/body")
    seen = _echo(await client.request("GET", node.proxy + "/ka", headers={"apikey": KEY}))
    assert seen["headers"]["apikey"] == [KEY]
    seen = _echo(await client.request("GET", node.proxy + "/ka?apikey=" + KEY))
    assert seen["uri"] == "/?apikey=" + KEY
    seen = _echo(await client.request("POST", node.proxy + "/body",
                                      form={"apikey": KEY, "foo": "bar"}))
    assert seen["body"] == "apikey=%s&foo=bar" % KEY
    seen = _echo(await client.request("POST", node.proxy + "/body",
                                      json_body={"apikey": KEY}))
    assert json.loads(seen["body"]) == {"apikey": KEY}
    r = await client.request("POST", node.proxy + "/ka", form={"apikey": KEY})
    assert r.code == 401 and r.json() == {"message": "No API key found in request"}


@pytest_twisted.ensureDeferred
async def test_custom_key_names_and_realm(node, client, upstream):
    """``key_names`` are looked up case-insensitively as headers; ``realm`` is in
    the challenge."""
    await _setup(client, node, upstream, {"key_names": ["x-api-key", "token"],
                                          "realm": "kongtx"})
    _echo(await client.request("GET", node.proxy + "/ka", headers={"X-API-KEY": KEY}))
    _echo(await client.request("GET", node.proxy + "/ka?token=" + KEY))
    r = await client.request("GET", node.proxy + "/ka?apikey=" + KEY)
    assert r.code == 401
    assert r.header("www-authenticate") == 'Key realm="kongtx"'


@pytest_twisted.ensureDeferred
async def test_consumer_headers_replace_spoofed_ones(node, client, upstream):
    """On success the upstream gets the consumer headers; client-sent copies (and
    X-Anonymous-Consumer, and a custom id the consumer does not have) are removed."""
    rows = await _setup(client, node, upstream)
    spoofed = {"apikey": KEY, "X-Consumer-ID": "evil", "X-Consumer-Username": "evil",
               "X-Consumer-Custom-ID": "evil", "X-Credential-Identifier": "evil",
               "X-Anonymous-Consumer": "true"}
    seen = _echo(await client.request("GET", node.proxy + "/ka", headers=spoofed))
    headers = seen["headers"]
    assert headers["x-consumer-id"] == [rows["alice"]["id"]]
    assert headers["x-consumer-username"] == ["alice"]
    assert headers["x-consumer-custom-id"] == ["a-1"]
    assert headers["x-credential-identifier"] == [rows["credential"]["id"]]
    assert "x-anonymous-consumer" not in headers
    r = await client.request("POST", node.admin + "/consumers/nobody/key-auth",
                             form={"key": "nobody-key"})
    assert r.code == 201
    spoofed["apikey"] = "nobody-key"
    headers = _echo(await client.request("GET", node.proxy + "/ka", headers=spoofed))["headers"]
    assert headers["x-consumer-username"] == ["nobody"]
    assert "x-consumer-custom-id" not in headers


@pytest_twisted.ensureDeferred
async def test_hide_credentials(node, client, upstream):
    """hide_credentials strips the key from the header, the query string (the other
    arguments kept in order) and the body before proxying."""
    await _setup(client, node, upstream, {"hide_credentials": True, "key_in_body": True})
    seen = _echo(await client.request("GET", node.proxy + "/ka",
                                      headers={"apikey": KEY, "x-other": "1"}))
    assert "apikey" not in seen["headers"] and seen["headers"]["x-other"] == ["1"]
    seen = _echo(await client.request("GET", node.proxy + "/ka?z=1&apikey=%s&a=b%%20c" % KEY))
    assert seen["uri"] == "/?z=1&a=b%20c"
    seen = _echo(await client.request("POST", node.proxy + "/ka",
                                      form=[("x", "1"), ("apikey", KEY), ("y", "2")]))
    assert seen["body"] == "x=1&y=2"
    assert seen["headers"]["content-length"] == ["7"]
    seen = _echo(await client.request("POST", node.proxy + "/ka",
                                      json_body={"apikey": KEY, "keep": True}))
    assert json.loads(seen["body"]) == {"keep": True}
    boundary = "b0undary"
    body = ("--%s\r\nContent-Disposition: form-data; name=\"apikey\"\r\n\r\n%s\r\n"
            "--%s\r\nContent-Disposition: form-data; name=\"foo\"\r\n\r\nbar\r\n--%s--\r\n"
            % (boundary, KEY, boundary, boundary)).encode()
    seen = _echo(await client.request(
        "POST", node.proxy + "/ka", body=body,
        headers={"content-type": "multipart/form-data; boundary=" + boundary}))
    assert KEY not in seen["body"] and 'name="foo"' in seen["body"]


@pytest_twisted.ensureDeferred
async def test_anonymous_consumer(node, client, upstream):
    """With ``anonymous`` (username or id), requests without a valid key go on as that
    consumer with X-Anonymous-Consumer: true; a valid key still authenticates; a
    missing anonymous consumer is a 500."""
    rows = await _setup(client, node, upstream)
    anon_id = rows["anonymous"]["id"]
    await _setup(client, node, upstream, {"anonymous": "nobody"}, path="/anon")
    await _setup(client, node, upstream, {"anonymous": anon_id}, path="/anon-id")
    await _setup(client, node, upstream, {"anonymous": "ghost"}, path="/ghost")
    for path in ("/anon", "/anon-id", "/anon?apikey=wrong"):
        headers = _echo(await client.request("GET", node.proxy + path))["headers"]
        assert headers["x-anonymous-consumer"] == ["true"]
        assert headers["x-consumer-id"] == [anon_id]
        assert headers["x-consumer-username"] == ["nobody"]
        assert "x-credential-identifier" not in headers
    headers = _echo(await client.request("GET", node.proxy + "/anon?apikey=" + KEY))["headers"]
    assert headers["x-consumer-username"] == ["alice"]
    assert "x-anonymous-consumer" not in headers
    r = await client.request("GET", node.proxy + "/ghost")
    assert r.code == 500
    assert r.json() == {"message": "anonymous consumer ghost is configured but doesn't exist"}


@pytest_twisted.ensureDeferred
async def test_run_on_preflight(node, client, upstream):
    """OPTIONS without a key passes when run_on_preflight is false, not by default."""
    await _setup(client, node, upstream)
    await _setup(client, node, upstream, {"run_on_preflight": False}, path="/pre")
    r = await client.request("OPTIONS", node.proxy + "/ka")
    assert r.code == 401
    r = await client.request("OPTIONS", node.proxy + "/pre")
    assert r.code == 200
    r = await client.request("GET", node.proxy + "/pre")
    assert r.code == 401


@pytest_twisted.ensureDeferred
async def test_deleted_and_changed_credentials(node, client, upstream):
    """A credential deleted (or re-keyed) through the Admin API stops working on the
    next request; a new one works at once (the cached miss is invalidated)."""
    rows = await _setup(client, node, upstream)
    _echo(await client.request("GET", node.proxy + "/ka?apikey=" + KEY))
    r = await client.request("GET", node.proxy + "/ka?apikey=later")
    assert r.code == 401
    r = await client.request("POST", node.admin + "/consumers/alice/key-auth",
                             form={"key": "later"})
    assert r.code == 201
    _echo(await client.request("GET", node.proxy + "/ka?apikey=later"))
    r = await client.request("PATCH", node.admin + "/key-auths/" + rows["credential"]["id"],
                             form={"key": "renamed"})
    assert r.code == 200, r.body
    r = await client.request("GET", node.proxy + "/ka?apikey=" + KEY)
    assert r.code == 401 and r.json() == {"message": "Unauthorized"}
    _echo(await client.request("GET", node.proxy + "/ka?apikey=renamed"))
    r = await client.request("DELETE", node.admin + "/key-auths/" + rows["credential"]["id"])
    assert r.code == 204
    r = await client.request("GET", node.proxy + "/ka?apikey=renamed")
    assert r.code == 401 and r.json() == {"message": "Unauthorized"}
    r = await client.request("PATCH", node.admin + "/consumers/alice",
                             form={"username": "alice2"})
    assert r.code == 200
    headers = _echo(await client.request("GET", node.proxy + "/ka?apikey=later"))["headers"]
    assert headers["x-consumer-username"] == ["alice2"]


@pytest_twisted.ensureDeferred
async def test_ttl_expiry(node, client, upstream):
    """A credential created with a short ttl works, then is Unauthorized once expired."""
    await _setup(client, node, upstream)
    r = await client.request("POST", node.admin + "/consumers/alice/key-auth",
                             json_body={"key": "short", "ttl": 2})
    assert r.code == 201, r.body
    _echo(await client.request("GET", node.proxy + "/ka?apikey=short"))
    deadline = time.monotonic() + 5
    while True:
        r = await client.request("GET", node.proxy + "/ka?apikey=short")
        if r.code == 401:
            break
        assert time.monotonic() < deadline, "the credential never expired"
        await _sleep(0.1)
    assert r.json() == {"message": "Unauthorized"}


# -- several nodes on one Postgres ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_credentials_across_nodes_and_outage(fresh_database, tmp_path, client,
                                                   upstream):
    """A credential created on node A works on node B (whose cached miss is
    invalidated by A's change); deleted on A it stops working on B. While B is cut off
    from Postgres it keeps accepting a key it has cached, and answers 500 `An unexpected
    error occurred` for a key it has never seen."""
    from twisted.internet import reactor

    from kongtx.store import migrations
    from tests.integration.conftest import start_node
    from tests.integration.relay import Relay
    from tests.integration.test_cluster import _until

    await migrations.bootstrap(fresh_database.settings, reactor)
    relay = Relay(reactor, "127.0.0.1", 5432)
    env = dict(fresh_database.env, KONG_PG_TIMEOUT="1000", KONG_DB_UPDATE_FREQUENCY="1")
    a = await start_node(reactor, str(tmp_path / "a"), **env)
    b = await start_node(reactor, str(tmp_path / "b"),
                         **dict(env, KONG_PG_PORT=str(relay.port)))
    try:
        await _setup(client, a, upstream)

        async def b_serves_route():
            r = await client.request("GET", b.proxy + "/ka")
            return r.code == 401

        await _until(b_serves_route, timeout=10, step=0.05)
        r = await client.request("GET", b.proxy + "/ka?apikey=fresh")
        assert r.code == 401 and r.json() == {"message": "Unauthorized"}
        r = await client.request("POST", a.admin + "/consumers/alice/key-auth",
                                 form={"key": "fresh"})
        assert r.code == 201, r.body
        fresh_id = r.json()["id"]

        async def b_accepts():
            return (await client.request("GET", b.proxy + "/ka?apikey=fresh")).code == 200

        await _until(b_accepts, timeout=10, step=0.05)
        r = await client.request("DELETE", a.admin + "/key-auths/" + fresh_id)
        assert r.code == 204

        async def b_refuses():
            return (await client.request("GET", b.proxy + "/ka?apikey=fresh")).code == 401

        await _until(b_refuses, timeout=10, step=0.05)

        _echo(await client.request("GET", b.proxy + "/ka?apikey=" + KEY))
        await relay.cut()
        r = await client.request("GET", b.proxy + "/ka?apikey=" + KEY)
        assert r.code == 200
        r = await client.request("GET", b.proxy + "/ka?apikey=never-seen")
        assert r.code == 500
        assert r.json()["message"] == "An unexpected error occurred"
    finally:
        relay.restore()
        await a.service.stopService()
        await b.service.stopService()
        await relay.stop()
