"""Unit tests of the key-auth plugin: key lookup, hide_credentials, consumer headers,
anonymous and the cache paths, on an in-memory request, MemoryStore and task.Clock."""

from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Tuple

import pytest
from twisted.internet import defer, task
from twisted.web.http_headers import Headers

from kongtx.cache import EntityCache
from kongtx.pdk import Kong, Node
from kongtx.plugins.key_auth import (
    DUPLICATE,
    KeyAuthPlugin,
    find_values,
    parse_body,
    query_pairs,
    strip_query,
)
from kongtx.schema import store_metas
from kongtx.store.interface import StoreUnavailable
from kongtx.store.memory import MemoryStore

CONSUMER = "11111111-1111-4111-8111-111111111111"
ANON = "44444444-4444-4444-8444-444444444444"
CRED = "22222222-2222-4222-8222-222222222222"
KEY = "kong"


class FakeRequest:
    """What the PDK reads of a twisted.web request."""

    def __init__(self, method: str = "GET", uri: str = "/", headers: Any = (),
                 body: bytes = b"") -> None:
        self.method = method.encode()
        self.uri = uri.encode()
        self.path = uri.split("?")[0].encode()
        self.requestHeaders = Headers()
        for name, value in headers:
            self.requestHeaders.addRawHeader(name.encode(), value.encode())
        self.responseHeaders = Headers()
        self.content = io.BytesIO(body)
        self.stream = None
        self.code = 200


class FakePeer:
    remote = "127.0.0.1"
    trusted = False


class World:
    """A MemoryStore with alice (key ``kong``), an anonymous consumer, and a cache."""

    def __init__(self, **cache_kw: Any) -> None:
        self.store = MemoryStore(store_metas())
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.cache = EntityCache(self.store, self.clock, **cache_kw)
        self.node = Node("node", cache=self.cache)
        self.queries = 0
        get_by = self.store.get_by

        def counting_get_by(*args: Any) -> Any:
            self.queries += 1
            return get_by(*args)

        self.store.get_by = counting_get_by  # type: ignore[assignment]
        self._do(self.store.insert("consumers", {
            "id": CONSUMER, "username": "alice", "custom_id": "a-1", "tags": None,
            "created_at": 1, "updated_at": 1}))
        self._do(self.store.insert("consumers", {
            "id": ANON, "username": "nobody", "custom_id": None, "tags": None,
            "created_at": 1, "updated_at": 1}))
        self._do(self.store.insert("keyauth_credentials", {
            "id": CRED, "consumer": {"id": CONSUMER}, "key": KEY, "ttl": None,
            "expires_at": None, "tags": None, "created_at": 1}))

    @staticmethod
    def _do(d: defer.Deferred) -> Any:
        out: List[Any] = []
        d.addBoth(out.append)
        assert out and not hasattr(out[0], "raiseException"), out
        return out[0]

    def run(self, config: Optional[Dict[str, Any]] = None, **request: Any
            ) -> Tuple[Kong, Any]:
        """Run the plugin's access phase; returns the Kong and access()'s result."""
        plugin = KeyAuthPlugin(full_config(config or {}))
        kong = Kong(FakeRequest(**request), peer=FakePeer(), scheme="http", path="/",
                    request_id="rid", index=None, chain=None, route_id=None,
                    service_id=None, node=self.node)
        result = plugin.access(kong)
        if isinstance(result, defer.Deferred):
            out: List[Any] = []
            result.addBoth(out.append)
            assert out, "access() did not finish"
            if hasattr(out[0], "raiseException"):
                out[0].raiseException()
        return kong, result


def full_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The config with Kong's defaults filled in, as the plugins entity does."""
    defaults = {name: field.default for name, field in KeyAuthPlugin.CONFIG.fields
                if field.has_default}
    for name, field in KeyAuthPlugin.CONFIG.fields:
        defaults.setdefault(name, None)
    defaults.update(config)
    return defaults


def upstream(kong: Kong) -> Dict[str, Optional[str]]:
    return {k.decode(): (v[1].decode() if v else None)
            for k, v in kong.upstream_headers.items()}


def exit_of(kong: Kong) -> Tuple[int, Any, Dict[str, Any]]:
    assert kong.exited is not None, "the plugin did not answer"
    return kong.exited


# -- schema ---------------------------------------------------------------------------


def test_config_defaults_are_kongs() -> None:
    """Every Kong key-auth config field and its default."""
    assert full_config({}) == {
        "key_names": ["apikey"], "hide_credentials": False, "anonymous": None,
        "key_in_header": True, "key_in_query": True, "key_in_body": False,
        "run_on_preflight": True, "realm": None,
    }
    assert (KeyAuthPlugin.NAME, KeyAuthPlugin.PRIORITY, KeyAuthPlugin.NO_CONSUMER) == (
        "key-auth", 1250, True)
    assert set(KeyAuthPlugin.PROTOCOLS) == {"grpc", "grpcs", "http", "https"}


# -- pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize("raw,name,expected", [
    ("apikey=a", "apikey", "a"),
    ("apikey=a&apikey=a", "apikey", DUPLICATE),
    ("apikey", "apikey", True),
    ("apikey=", "apikey", ""),
    ("apikey[]=a", "apikey", None),
    ("apikey[1]=a", "apikey", None),
    ("foo=1&apikey=a%20b&bar=2", "apikey", "a b"),
    ("APIKEY=a", "apikey", None),
    ("", "apikey", None),
])
def test_find_values(raw: str, name: str, expected: Any) -> None:
    """Query values as Kong sees them: repeated is a duplicate, a bare name is no key,
    ``apikey[]`` is another name."""
    assert find_values(query_pairs(raw), name) == expected


@pytest.mark.parametrize("raw,name,expected", [
    ("apikey=a", "apikey", ""),
    ("z=1&apikey=a&b=%20x&a=3", "apikey", "z=1&b=%20x&a=3"),
    ("a=1", "apikey", None),
])
def test_strip_query(raw: str, name: str, expected: Optional[str]) -> None:
    """hide_credentials removes the key and keeps the other arguments as sent, in order."""
    assert strip_query(raw, name) == expected


MULTIPART = (b"--XyZ\r\nContent-Disposition: form-data; name=\"foo\"\r\n\r\nbar\r\n"
             b"--XyZ\r\nContent-Disposition: form-data; name=\"apikey\"\r\n\r\nkong\r\n"
             b"--XyZ--\r\n")


@pytest.mark.parametrize("body,ctype,value,without", [
    (b"apikey=kong&foo=bar", "application/x-www-form-urlencoded", "kong", b"foo=bar"),
    (b"apikey=a&apikey=b", "application/x-www-form-urlencoded", DUPLICATE, b""),
    (b'{"apikey":"kong","foo":1}', "application/json", "kong", b'{"foo": 1}'),
    (b'{"apikey":["a","b"]}', "application/json", DUPLICATE, b"{}"),
    (b'{"apikey":5}', "application/json", 5, b"{}"),
    (b"[1]", "application/json", None, None),
    (b"{bad", "application/json", None, None),
    (MULTIPART, "multipart/form-data; boundary=XyZ", "kong",
     b"--XyZ\r\nContent-Disposition: form-data; name=\"foo\"\r\n\r\nbar\r\n--XyZ--\r\n"),
    (b"apikey=kong", "text/plain", None, None),
])
def test_parse_body(body: bytes, ctype: str, value: Any, without: Optional[bytes]) -> None:
    """Form, JSON and multipart bodies give the key; re-encoding drops it."""
    parsed = parse_body(body, ctype)
    assert parsed.get("apikey") == value
    assert parsed.without("apikey") == without


# -- access ---------------------------------------------------------------------------


@pytest.mark.parametrize("config,req,status,message", [
    ({}, {}, 401, "No API key found in request"),
    ({}, {"headers": [("apikey", "")]}, 401, "No API key found in request"),
    ({}, {"uri": "/?apikey="}, 401, "No API key found in request"),
    ({}, {"uri": "/?apikey[]=kong"}, 401, "No API key found in request"),
    ({}, {"uri": "/?apikey=kong&apikey=kong"}, 401, "Duplicate API key found"),
    ({}, {"headers": [("apikey", "kong"), ("apikey", "kong")]}, 401,
     "Duplicate API key found"),
    ({}, {"uri": "/?apikey=nope"}, 401, "Unauthorized"),
    ({}, {"headers": [("apikey", "nope")]}, 401, "Unauthorized"),
    ({"key_in_header": False}, {"headers": [("apikey", KEY)]}, 401,
     "No API key found in request"),
    ({"key_in_query": False}, {"uri": "/?apikey=kong"}, 401, "No API key found in request"),
    ({}, {"method": "POST", "body": b"apikey=kong",
          "headers": [("content-type", "application/x-www-form-urlencoded")]},
     401, "No API key found in request"),
])
def test_refusals(config: Dict[str, Any], req: Dict[str, Any], status: int,
                  message: str) -> None:
    """Missing, empty, duplicate, unknown and disabled-location keys are 401s with
    Kong's messages and ``WWW-Authenticate: Key``."""
    world = World()
    kong, _ = world.run(config, **req)
    assert exit_of(kong) == (status, {"message": message}, {"WWW-Authenticate": "Key"})
    assert kong.consumer is None


def test_realm() -> None:
    """``realm`` goes into the challenge: ``Key realm="<realm>"``."""
    kong, _ = World().run({"realm": "kongtx"})
    assert exit_of(kong)[2] == {"WWW-Authenticate": 'Key realm="kongtx"'}


@pytest.mark.parametrize("config,req", [
    ({}, {"headers": [("apikey", KEY)]}),
    ({}, {"headers": [("APIKEY", KEY)]}),
    ({}, {"uri": "/?apikey=kong"}),
    ({"key_names": ["x-key", "apikey"]}, {"uri": "/?apikey=kong"}),
    ({"key_in_body": True}, {"method": "POST", "body": b"apikey=kong",
                             "headers": [("content-type",
                                          "application/x-www-form-urlencoded")]}),
    ({"key_in_body": True}, {"method": "POST", "body": b'{"apikey": "kong"}',
                             "headers": [("content-type", "application/json")]}),
    ({"key_in_body": True}, {"method": "POST", "body": MULTIPART,
                             "headers": [("content-type",
                                          "multipart/form-data; boundary=XyZ")]}),
])
def test_accepted_sets_consumer_headers(config: Dict[str, Any],
                                        req: Dict[str, Any]) -> None:
    """A valid key (header, query or body) authenticates and sets the consumer headers."""
    world = World()
    kong, _ = world.run(config, **req)
    assert kong.exited is None
    assert kong.consumer["id"] == CONSUMER and kong.credential["id"] == CRED
    assert upstream(kong) == {
        "x-consumer-id": CONSUMER, "x-consumer-custom-id": "a-1",
        "x-consumer-username": "alice", "x-credential-identifier": CRED,
        "x-anonymous-consumer": None,
    }


def test_second_request_is_a_synchronous_hit() -> None:
    """After one load, access() returns None (no Deferred) and makes no store query."""
    world = World()
    world.run({}, uri="/?apikey=kong")
    queries = world.queries
    kong, result = world.run({}, uri="/?apikey=kong")
    assert result is None and kong.consumer["id"] == CONSUMER
    kong, result = world.run({}, uri="/?apikey=other")
    assert isinstance(result, defer.Deferred)
    kong, result = world.run({}, uri="/?apikey=other")
    assert result is None and exit_of(kong)[1] == {"message": "Unauthorized"}
    assert world.queries == queries + 1


def test_expired_credential_is_unauthorized() -> None:
    """A credential past its ``expires_at`` is refused like an unknown key."""
    world = World()
    world._do(world.store.update("keyauth_credentials", {
        "id": CRED, "consumer": {"id": CONSUMER}, "key": KEY, "ttl": 5,
        "expires_at": 1005, "tags": None, "created_at": 1}))
    kong, _ = world.run({}, uri="/?apikey=kong")
    assert kong.exited is None
    world.clock.advance(5)
    kong, _ = world.run({}, uri="/?apikey=kong")
    assert exit_of(kong)[:2] == (401, {"message": "Unauthorized"})


def test_deleted_credential_stops_working() -> None:
    """Deleting the credential invalidates the cached entry at once."""
    world = World()
    world.run({}, uri="/?apikey=kong")
    world._do(world.store.delete("keyauth_credentials", CRED))
    kong, _ = world.run({}, uri="/?apikey=kong")
    assert exit_of(kong)[:2] == (401, {"message": "Unauthorized"})


def test_hide_credentials_query_header() -> None:
    """hide_credentials: the key header is cleared and the key leaves the query string,
    other arguments kept in order."""
    world = World()
    kong, _ = world.run({"hide_credentials": True}, uri="/?z=1&apikey=kong&a=2",
                        headers=[("apikey", KEY)])
    assert kong.upstream_query == b"z=1&a=2"
    assert upstream(kong)["apikey"] is None


def test_hide_credentials_body() -> None:
    """hide_credentials with key_in_body: the key is removed from the body sent upstream."""
    world = World()
    kong, _ = world.run({"hide_credentials": True, "key_in_body": True}, method="POST",
                        body=b"a=1&apikey=kong&b=2",
                        headers=[("content-type", "application/x-www-form-urlencoded")])
    assert kong.consumer is not None
    assert kong._request.content.getvalue() == b"a=1&b=2"


def test_no_hide_keeps_everything() -> None:
    """Without hide_credentials the key is passed upstream untouched."""
    kong, _ = World().run({}, uri="/?apikey=kong", headers=[("apikey", KEY)])
    assert kong.upstream_query is None and "apikey" not in upstream(kong)


@pytest.mark.parametrize("anonymous", [ANON, "nobody"])
def test_anonymous(anonymous: str) -> None:
    """With ``anonymous`` (id or username) a refused request goes on as that consumer."""
    world = World()
    kong, _ = world.run({"anonymous": anonymous})
    assert kong.exited is None
    assert kong.consumer["id"] == ANON and kong.credential is None
    assert upstream(kong) == {
        "x-consumer-id": ANON, "x-consumer-custom-id": None,
        "x-consumer-username": "nobody", "x-credential-identifier": None,
        "x-anonymous-consumer": "true",
    }
    kong, result = world.run({"anonymous": anonymous}, uri="/?apikey=bad")
    assert kong.consumer["id"] == ANON
    kong, _ = world.run({"anonymous": anonymous}, uri="/?apikey=kong")
    assert kong.consumer["id"] == CONSUMER


def test_anonymous_missing_is_500() -> None:
    """A configured anonymous consumer that does not exist is a 500 naming it."""
    kong, _ = World().run({"anonymous": "ghost"})
    assert exit_of(kong)[:2] == (
        500, {"message": "anonymous consumer ghost is configured but doesn't exist"})


def test_anonymous_logical_or() -> None:
    """With anonymous set, a request already authenticated by another plugin is left alone."""
    world = World()
    plugin = KeyAuthPlugin(full_config({"anonymous": ANON}))
    kong = Kong(FakeRequest(), peer=FakePeer(), scheme="http", path="/", request_id="r",
                index=None, chain=None, route_id=None, service_id=None, node=world.node)
    kong.client.authenticate({"id": "other"}, {"id": "cred"})
    assert plugin.access(kong) is None
    assert kong.exited is None and kong.consumer == {"id": "other"}


@pytest.mark.parametrize("preflight,exited", [(True, True), (False, False)])
def test_run_on_preflight(preflight: bool, exited: bool) -> None:
    """OPTIONS without a key passes only when run_on_preflight is false."""
    kong, _ = World().run({"run_on_preflight": preflight}, method="OPTIONS")
    assert (kong.exited is not None) is exited


def test_store_unavailable_on_miss_fails() -> None:
    """A key never seen while the store is down fails the phase (the pipeline answers 500)."""
    world = World()

    def down(*args: Any) -> Any:
        return defer.fail(StoreUnavailable("connection refused"))

    world.store.get_by = down  # type: ignore[assignment]
    with pytest.raises(StoreUnavailable):
        world.run({}, uri="/?apikey=kong")


def test_config_validates_key_names() -> None:
    """key_names elements are header names (Kong's typedefs.header_name)."""
    field = dict(KeyAuthPlugin.CONFIG.fields)["key_names"]
    assert field.elements is not None and field.elements.custom is not None
    assert field.elements.custom("bad name") is not None
    assert field.elements.custom("apikey") is None
