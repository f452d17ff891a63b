"""/consumers over real HTTP on 127.0.0.1 (ports of Kong's 03-consumers_routes_spec)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import pytest_twisted

from tests.admin.helpers import CONTENT_TYPES, AdminServer, new_uuid
from tests.test_schema_plugins import TEST_PLUGINS

AT_LEAST_ONE = "at least one of these fields must be non-empty: 'custom_id', 'username'"


async def with_server(fn: Callable[[AdminServer], Any]) -> None:
    from twisted.internet import reactor

    server = AdminServer(reactor, plugins=TEST_PLUGINS)
    try:
        await fn(server)
    finally:
        await server.close()


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_consumer(content_type: str) -> None:
    """POST /consumers: 201 with id, timestamps, username, custom_id and tags."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/consumers", {"username": "bob", "custom_id": "1234"}, content_type)
        assert r.status == 201
        body = r.json
        assert set(body) == {"id", "created_at", "updated_at", "username", "custom_id", "tags"}
        assert (body["username"], body["custom_id"], body["tags"]) == ("bob", "1234", None)
        r = await s.request("POST", "/consumers", {"custom_id": "only", "tags": ["a", "b"]}, content_type)
        assert r.status == 201 and r.json["username"] is None and r.json["tags"] == ["a", "b"]

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_consumer_needs_username_or_custom_id(content_type: str) -> None:
    """POST /consumers with neither username nor custom_id: 400 with the @entity error."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/consumers", {}, content_type)
        assert r.status == 400
        assert r.json == {
            "code": 2,
            "name": "schema violation",
            "message": "schema violation (%s)" % AT_LEAST_ONE,
            "fields": {"@entity": [AT_LEAST_ONE]},
        }

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_consumer_conflicts(content_type: str) -> None:
    """A second consumer with the same username or custom_id is 409 with Kong's body."""

    async def run(s: AdminServer) -> None:
        assert (await s.request("POST", "/consumers", {"username": "bob", "custom_id": "c1"}, content_type)).status == 201
        r = await s.request("POST", "/consumers", {"username": "bob"}, content_type)
        assert r.status == 409
        assert r.json == {
            "code": 5,
            "name": "unique constraint violation",
            "message": "UNIQUE violation detected on '{username=\"bob\"}'",
            "fields": {"username": "bob"},
        }
        r = await s.request("POST", "/consumers", {"username": "alice", "custom_id": "c1"}, content_type)
        assert r.status == 409
        assert r.json["message"] == "UNIQUE violation detected on '{custom_id=\"c1\"}'"
        assert r.json["fields"] == {"custom_id": "c1"}

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_post_consumer_unsupported_media_type() -> None:
    """POST /consumers with Content-Type: invalid is 415."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/consumers", raw=b"username=bob", content_type="invalid")
        assert r.status == 415

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_get_consumers_by_custom_id() -> None:
    """GET /consumers?custom_id=x is a one-row list; unknown is empty; blank is 400."""

    async def run(s: AdminServer) -> None:
        bob = (await s.request("POST", "/consumers", {"username": "bob", "custom_id": "c 1"})).json
        await s.request("POST", "/consumers", {"username": "alice", "custom_id": "c2"})
        r = await s.request("GET", "/consumers?custom_id=c%201")
        assert r.status == 200 and r.json == {"data": [bob], "next": None}
        r = await s.request("GET", "/consumers?custom_id=nobody")
        assert r.status == 200 and r.raw == b'{"data":[],"next":null}'
        r = await s.request("GET", "/consumers?custom_id=")
        assert r.status == 400 and r.json == {"message": "custom_id must be an unempty string"}
        r = await s.request("GET", "/consumers")
        assert sorted(c["username"] for c in r.json["data"]) == ["alice", "bob"]

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_consumer_by_username(content_type: str) -> None:
    """/consumers/{username}: GET, PATCH (also with {}), PUT upsert by username, DELETE 204."""

    async def run(s: AdminServer) -> None:
        bob = (await s.request("POST", "/consumers", {"username": "bob"})).json
        r = await s.request("GET", "/consumers/bob")
        assert r.status == 200 and r.json == bob
        r = await s.request("GET", "/consumers/" + bob["id"])
        assert r.status == 200 and r.json == bob
        r = await s.request("PATCH", "/consumers/bob", {}, "application/json")
        assert r.status == 200 and r.json["username"] == "bob"
        r = await s.request("PATCH", "/consumers/bob", {"custom_id": "c9"}, content_type)
        assert r.status == 200 and r.json["custom_id"] == "c9" and r.json["id"] == bob["id"]
        r = await s.request("PUT", "/consumers/carol", {"custom_id": "c10"}, content_type)
        assert r.status == 200 and r.json["username"] == "carol"
        r = await s.request("PATCH", "/consumers/bob", {"username": None, "custom_id": None}, "application/json")
        assert r.status == 400
        assert r.json["fields"] == {"@entity": ["when updating, " + AT_LEAST_ONE]}
        assert (await s.request("DELETE", "/consumers/bob")).status == 204
        assert (await s.request("GET", "/consumers/bob")).status == 404
        assert (await s.request("DELETE", "/consumers/bob")).status == 204
        assert (await s.request("GET", "/consumers/" + new_uuid())).status == 404

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_delete_consumer_cascades() -> None:
    """Deleting a consumer deletes its key-auth credentials and its consumer-scoped plugins."""

    async def run(s: AdminServer) -> None:
        bob = (await s.request("POST", "/consumers", {"username": "bob"})).json
        alice = (await s.request("POST", "/consumers", {"username": "alice"})).json
        for owner in ("bob", "alice"):
            r = await s.request("POST", "/consumers/%s/key-auth" % owner, {})
            assert r.status == 201
            r = await s.request(
                "POST", "/consumers/%s/plugins" % owner, {"name": "rate-limiting", "config": {"minute": 5}}
            )
            assert r.status == 201
        r = await s.request("POST", "/plugins", {"name": "key-auth"})
        assert r.status == 201
        assert (await s.request("DELETE", "/consumers/bob")).status == 204
        keys = (await s.request("GET", "/key-auths")).json["data"]
        assert [k["consumer"] for k in keys] == [{"id": alice["id"]}]
        plugins = (await s.request("GET", "/plugins")).json["data"]
        assert sorted((p["name"], (p["consumer"] or {}).get("id")) for p in plugins) == [
            ("key-auth", None),
            ("rate-limiting", alice["id"]),
        ]
        assert (await s.request("GET", "/consumers/%s/key-auth" % bob["id"])).status == 404
        # the same username can be used again, with fresh credentials
        assert (await s.request("POST", "/consumers", {"username": "bob"})).status == 201
        assert (await s.request("GET", "/consumers/bob/key-auth")).json == {"data": [], "next": None}

    await with_server(run)
