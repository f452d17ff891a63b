"""key-auth credentials over real HTTP: /consumers/{c}/key-auth and /key-auths."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict

import pytest
import pytest_twisted

from tests.admin.helpers import CONTENT_TYPES, AdminServer, new_uuid
from tests.test_schema_plugins import TEST_PLUGINS

FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
HEX32 = re.compile(r"^[0-9a-f]{32}$")


async def with_server(fn: Callable[[AdminServer], Any]) -> None:
    from twisted.internet import reactor

    server = AdminServer(reactor, plugins=TEST_PLUGINS)
    try:
        await fn(server)
    finally:
        await server.close()


async def consumer(s: AdminServer, username: str) -> Dict[str, Any]:
    r = await s.request("POST", "/consumers", {"username": username})
    assert r.status == 201
    return r.json


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_empty_body_generates_a_key(content_type: str) -> None:
    """POST /consumers/{c}/key-auth with {}: 201, a generated key, consumer {id} (aio-kong)."""

    async def run(s: AdminServer) -> None:
        bob = await consumer(s, "bob")
        r = await s.request("POST", "/consumers/%s/key-auth" % bob["id"], {}, content_type)
        assert r.status == 201
        body = r.json
        assert HEX32.match(body["key"])
        assert body["consumer"] == {"id": bob["id"]}
        assert set(body) == {"id", "created_at", "consumer", "key", "ttl", "expires_at", "tags"}
        r = await s.request("POST", "/consumers/bob/key-auth", {}, content_type)
        assert r.status == 201 and r.json["key"] != body["key"]

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_given_key_and_conflict(content_type: str) -> None:
    """A given key is kept; the same key again is 409 UNIQUE on key."""

    async def run(s: AdminServer) -> None:
        await consumer(s, "bob")
        r = await s.request("POST", "/consumers/bob/key-auth", {"key": "abc", "ttl": 60}, content_type)
        assert r.status == 201 and r.json["key"] == "abc" and r.json["ttl"] == 60
        assert r.json["expires_at"] == r.json["created_at"] + 60
        r = await s.request("POST", "/consumers/bob/key-auth", {"key": "abc"}, content_type)
        assert r.status == 409
        assert r.json == {
            "code": 5,
            "name": "unique constraint violation",
            "message": "UNIQUE violation detected on '{key=\"abc\"}'",
            "fields": {"key": "abc"},
        }

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_nested_list_and_unknown_consumer() -> None:
    """GET /consumers/{c}/key-auth lists only that consumer's keys (unknown ?limit ignored); unknown consumer 404."""

    async def run(s: AdminServer) -> None:
        await consumer(s, "bob")
        await consumer(s, "alice")
        mine = (await s.request("POST", "/consumers/bob/key-auth", {"key": "k1"})).json
        await s.request("POST", "/consumers/alice/key-auth", {"key": "k2"})
        r = await s.request("GET", "/consumers/bob/key-auth?limit=1")
        assert r.status == 200 and r.json == {"data": [mine], "next": None}
        assert (await s.request("GET", "/consumers/nobody/key-auth")).status == 404
        assert (await s.request("POST", "/consumers/nobody/key-auth", {})).status == 404

    await with_server(run)


@pytest.mark.parametrize("content_type", FORMS)
@pytest_twisted.ensureDeferred
async def test_nested_credential_get_patch_delete(content_type: str) -> None:
    """/consumers/{c}/key-auth/{id or key}: GET, form PATCH, DELETE 204 then 404 (aio-kong)."""

    async def run(s: AdminServer) -> None:
        await consumer(s, "bob")
        await consumer(s, "alice")
        cred = (await s.request("POST", "/consumers/bob/key-auth", {"key": "k1"}, content_type)).json
        assert (await s.request("GET", "/consumers/bob/key-auth/" + cred["id"])).json == cred
        assert (await s.request("GET", "/consumers/bob/key-auth/k1")).json == cred
        assert (await s.request("GET", "/consumers/alice/key-auth/k1")).status == 404
        assert (await s.request("DELETE", "/consumers/alice/key-auth/k1")).status == 404
        r = await s.request("PATCH", "/consumers/bob/key-auth/" + cred["id"], {"key": "k2"}, content_type)
        assert r.status == 200 and r.json["key"] == "k2" and r.json["consumer"] == cred["consumer"]
        assert (await s.request("GET", "/consumers/bob/key-auth/k1")).status == 404
        assert (await s.request("DELETE", "/consumers/bob/key-auth/" + cred["id"])).status == 204
        assert (await s.request("DELETE", "/consumers/bob/key-auth/" + cred["id"])).status == 404
        assert (await s.request("GET", "/key-auths/" + cred["id"])).status == 404

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_nested_put_with_client_uuid() -> None:
    """decK's PUT /consumers/{cid}/key-auth/{uuid} creates with that id, then replaces it."""

    async def run(s: AdminServer) -> None:
        bob = await consumer(s, "bob")
        alice = await consumer(s, "alice")
        cid = new_uuid()
        body = {"id": cid, "key": "deck-key", "consumer": {"id": bob["id"]}, "tags": ["t"]}
        r = await s.request("PUT", "/consumers/%s/key-auth/%s" % (bob["id"], cid), body)
        assert r.status == 200 and r.json["id"] == cid and r.json["key"] == "deck-key"
        created_at = r.json["created_at"]
        r = await s.request("PUT", "/consumers/%s/key-auth/%s" % (bob["id"], cid), {"key": "other"})
        assert r.status == 200 and r.json["key"] == "other" and r.json["tags"] is None
        assert r.json["created_at"] == created_at
        r = await s.request("PUT", "/consumers/%s/key-auth/%s" % (alice["id"], cid), {"key": "x"})
        assert r.status == 404
        r = await s.request("GET", "/key-auths?size=1000")
        assert [c["id"] for c in r.json["data"]] == [cid]

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_key_auths_collection(content_type: str) -> None:
    """/key-auths: POST needs a consumer (by id or username), GET lists every credential."""

    async def run(s: AdminServer) -> None:
        bob = await consumer(s, "bob")
        r = await s.request("POST", "/key-auths", {"key": "k1"}, content_type)
        assert r.status == 400
        assert r.json["fields"] == {"consumer": "required field missing"}
        r = await s.request("POST", "/key-auths", {"key": "k1", "consumer": {"username": "bob"}}, content_type)
        assert r.status == 201 and r.json["consumer"] == {"id": bob["id"]}
        r = await s.request("POST", "/key-auths", {"consumer": {"id": bob["id"]}}, content_type)
        assert r.status == 201 and HEX32.match(r.json["key"])
        r = await s.request("POST", "/key-auths", {"consumer": {"username": "nobody"}}, content_type)
        assert r.status == 400 and r.json["code"] == 13
        r = await s.request("POST", "/key-auths", {"consumer": {"id": new_uuid()}}, content_type)
        assert r.status == 400 and r.json["code"] == 4
        r = await s.request("GET", "/key-auths")
        assert len(r.json["data"]) == 2 and r.json["next"] is None

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_key_auths_entity_and_consumer() -> None:
    """/key-auths/{id or key}: GET, PATCH, PUT by key, DELETE; /key-auths/{id}/consumer GET."""

    async def run(s: AdminServer) -> None:
        bob = await consumer(s, "bob")
        cred = (await s.request("POST", "/consumers/bob/key-auth", {"key": "k1"})).json
        assert (await s.request("GET", "/key-auths/k1")).json == cred
        assert (await s.request("GET", "/key-auths/" + cred["id"])).json == cred
        r = await s.request("GET", "/key-auths/%s/consumer" % cred["id"])
        assert r.status == 200 and r.json == bob
        r = await s.request("PATCH", "/key-auths/k1", {"tags": ["x"]})
        assert r.status == 200 and r.json["tags"] == ["x"] and r.json["key"] == "k1"
        r = await s.request("PUT", "/key-auths/k-new", {"consumer": {"username": "bob"}})
        assert r.status == 200 and r.json["key"] == "k-new" and r.json["consumer"] == {"id": bob["id"]}
        assert (await s.request("DELETE", "/key-auths/k1")).status == 204
        assert (await s.request("DELETE", "/key-auths/k1")).status == 204
        assert (await s.request("GET", "/key-auths/k1")).status == 404
        assert (await s.request("GET", "/key-auths/nope/consumer")).status == 404

    await with_server(run)
