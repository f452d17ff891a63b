"""The Admin API over real HTTP on 127.0.0.1 (ports of Kong's admin_api specs)."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, AsyncIterator, Callable
from urllib.parse import quote

import pytest
import pytest_twisted

from kongtx.schema import store_metas
from tests.admin.helpers import CONTENT_TYPES, NODE_ID, AdminServer, new_uuid, raw_request

PROTOCOLS_ERR = "expected one of: grpc, grpcs, http, https, tcp, tls, tls_passthrough, udp"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


async def with_server(fn: Callable[[AdminServer], Any], **kwargs: Any) -> None:
    from twisted.internet import reactor

    server = AdminServer(reactor, **kwargs)
    try:
        await fn(server)
    finally:
        await server.close()


# -- services -------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_service_defaults(content_type: str) -> None:
    """POST /services with a host only: 201 with Kong's defaults and explicit nulls."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/services", {"host": "service.test"}, content_type)
        assert r.status == 201
        body = r.json
        assert UUID_RE.match(body["id"])
        assert body["port"] == 80 and body["protocol"] == "http" and body["name"] is None
        assert body["connect_timeout"] == body["read_timeout"] == body["write_timeout"] == 60000
        assert body["retries"] == 5 and body["enabled"] is True and body["path"] is None
        assert r.header("content-type") == "application/json; charset=utf-8"
        assert r.header("server") == "kong/3.10.0"
        assert r.header("access-control-allow-origin") == "*"
        assert r.header("x-kong-admin-latency") is not None

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_service_url(content_type: str) -> None:
    """url shorthand: http -> 80, https -> 443, path '/'; empty or blank url -> 400."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/services", {"url": "http://service.test/"}, content_type)
        assert r.status == 201
        assert (r.json["protocol"], r.json["host"], r.json["port"], r.json["path"]) == ("http", "service.test", 80, "/")
        r = await s.request("POST", "/services", {"url": "https://service.test/"}, content_type)
        assert (r.json["protocol"], r.json["port"]) == ("https", 443)
        r = await s.request("POST", "/services", {"url": " "}, content_type)
        assert r.status == 400
        r = await s.request("POST", "/services", {"url": "invalid url"}, content_type)
        assert r.status == 400
        assert r.json == {
            "code": 2,
            "name": "schema violation",
            "message": "2 schema violations (host: required field missing; path: should start with: /)",
            "fields": {"host": "required field missing", "path": "should start with: /"},
        }

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_post_service_empty_url_json() -> None:
    """url "" (JSON) is a 400 schema violation on url."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/services", {"url": ""})
        assert r.status == 400
        assert r.json["fields"] == {"url": "length must be at least 1"}

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_service_invalid(content_type: str) -> None:
    """Missing host and a bad protocol give Kong's field errors."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/services", {"name": "x"}, content_type)
        assert r.status == 400
        assert r.json["fields"] == {"host": "required field missing"}
        r = await s.request("POST", "/services", {"host": "example.test", "protocol": "foo"}, content_type)
        assert r.json["fields"] == {"protocol": PROTOCOLS_ERR}

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_malformed_json() -> None:
    """Malformed JSON is exactly {"message":"Cannot parse JSON body"}."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/services", raw=b'{"hello": "world"', content_type="application/json")
        assert r.status == 400
        assert r.raw == b'{"message":"Cannot parse JSON body"}'

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_strict_schema_hedge_case() -> None:
    """aio-kong's hedge case: unknown 'config' and null host are a 400."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/services", {"config": "x", "host": None, "name": "correlation-id"})
        assert r.status == 400
        assert r.json["fields"] == {"config": "unknown field", "host": "required field missing"}

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_pagination() -> None:
    """10 services, size=3: pages of 3,3,3,1 via offset; next is the escaped relative URL."""

    async def run(s: AdminServer) -> None:
        for i in range(10):
            assert (await s.request("POST", "/services", {"host": "h%d.test" % i})).status == 201
        seen = []
        path = "/services?size=3"
        sizes = []
        while True:
            r = await s.request("GET", path)
            assert r.status == 200
            body = r.json
            sizes.append(len(body["data"]))
            seen.extend(row["id"] for row in body["data"])
            if body["next"] is None:
                assert "offset" not in body
                break
            assert body["next"] == "/services?offset=%s&size=3" % quote(body["offset"], safe="")
            path = body["next"]
        assert sizes == [3, 3, 3, 1]
        assert len(set(seen)) == 10
        # decK's way: offset from the body, size=1000
        r = await s.request("GET", "/services?size=1000")
        assert len(r.json["data"]) == 10 and r.json["next"] is None

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_empty_collection_and_filters() -> None:
    """Empty lists serialise as "data":[]; unknown query parameters are ignored."""

    async def run(s: AdminServer) -> None:
        r = await s.request("GET", "/services")
        assert r.raw == b'{"data":[],"next":null}'
        r = await s.request("GET", "/routes?foo=bar")
        assert r.status == 200 and r.json == {"data": [], "next": None}

    await with_server(run)


@pytest.mark.parametrize(
    "query, body",
    [
        ("size=x", {"code": 9, "name": "invalid size", "message": "size must be a number"}),
        ("size=0", {"code": 9, "name": "invalid size", "message": "size must be an integer between 1 and 1000"}),
        ("size=1001", {"code": 9, "name": "invalid size", "message": "size must be an integer between 1 and 1000"}),
        ("offset=x", {"code": 7, "name": "invalid offset", "message": "'x' is not a valid offset: bad base64 encoding"}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_paging(query: str, body: dict) -> None:
    """Bad size and offset are 400s with codes 9 and 7."""

    async def run(s: AdminServer) -> None:
        r = await s.request("GET", "/routes?" + query)
        assert (r.status, r.json) == (400, body)

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_service_entity_crud(content_type: str) -> None:
    """GET/PATCH by id and by name, 409 on duplicate names, DELETE 204 even when absent."""

    async def run(s: AdminServer) -> None:
        created = (await s.request("POST", "/services", {"host": "a.test", "name": "svc"}, content_type)).json
        r = await s.request("GET", "/services/svc")
        assert r.status == 200 and r.json == created
        r = await s.request("GET", "/services/" + created["id"])
        assert r.json == created
        r = await s.request("PATCH", "/services/svc", {"retries": 3, "url": "https://example2.test:80/"}, content_type)
        assert r.status == 200
        assert (r.json["retries"], r.json["protocol"], r.json["port"], r.json["path"]) == (3, "https", 80, "/")
        assert r.json["created_at"] == created["created_at"]
        r = await s.request("POST", "/services", {"host": "b.test", "name": "svc"}, content_type)
        assert r.status == 409
        assert r.json == {
            "code": 5,
            "name": "unique constraint violation",
            "message": "UNIQUE violation detected on '{name=\"svc\"}'",
            "fields": {"name": "svc"},
        }
        assert (await s.request("PATCH", "/services/nope", {"retries": 1}, content_type)).status == 404
        assert (await s.request("GET", "/services/nope")).json == {"message": "Not found"}
        r = await s.request("DELETE", "/services/svc")
        assert r.status == 204 and r.raw == b""
        assert (await s.request("DELETE", "/services/svc")).status == 204
        assert (await s.request("DELETE", "/services/" + new_uuid())).status == 204
        assert (await s.request("GET", "/services/svc")).status == 404

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_put_upserts_with_client_ids() -> None:
    """decK's PUT /services/{uuid} and /routes/{uuid} create, then replace."""

    async def run(s: AdminServer) -> None:
        sid, rid = new_uuid(), new_uuid()
        r = await s.request("PUT", "/services/" + sid, {"id": sid, "name": "deck", "host": "d.test"})
        assert r.status == 200 and r.json["id"] == sid
        r = await s.request("PUT", "/routes/" + rid, {"id": rid, "paths": ["/d"], "service": {"id": sid}})
        assert r.status == 200 and r.json["service"] == {"id": sid}
        r = await s.request("PUT", "/services/" + sid, {"id": sid, "name": "deck", "host": "e.test"})
        assert r.json["host"] == "e.test" and r.json["retries"] == 5
        listing = (await s.request("GET", "/services")).json["data"]
        assert [row["id"] for row in listing] == [sid]

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_delete_service_with_routes_refused() -> None:
    """Deleting a service still referenced by routes is 400 code 4."""

    async def run(s: AdminServer) -> None:
        svc = (await s.request("POST", "/services", {"host": "a.test"})).json
        assert (await s.request("POST", "/services/%s/routes" % svc["id"], {"paths": ["/"]})).status == 201
        r = await s.request("DELETE", "/services/" + svc["id"])
        assert r.status == 400
        assert r.json["code"] == 4
        assert r.json["message"] == "an existing 'routes' entity references this 'services' entity"

    await with_server(run)


# -- routes ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_routes_options_and_verbs() -> None:
    """OPTIONS /routes is 204 with Allow; DELETE/PUT/PATCH on the collection are 405."""

    async def run(s: AdminServer) -> None:
        r = await s.request("OPTIONS", "/routes")
        assert r.status == 204
        assert r.header("allow") == "GET, HEAD, OPTIONS, POST"
        assert r.header("access-control-allow-methods") == "GET, HEAD, OPTIONS, POST"
        assert r.header("access-control-allow-headers") == "Content-Type"
        for method in ("DELETE", "PUT", "PATCH"):
            r = await s.request(method, "/routes")
            assert (r.status, r.json) == (405, {"message": "Method not allowed"})
        r = await s.request("OPTIONS", "/routes/x")
        assert r.header("allow") == "DELETE, GET, HEAD, OPTIONS, PATCH, PUT"

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_route_invalid(content_type: str) -> None:
    """Kong's 'handles invalid input' cases for POST /routes, in every body format."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/routes", {}, content_type)
        message = "must set one of 'methods', 'hosts', 'headers', 'paths', 'snis' when 'protocols' is 'https'"
        assert (r.status, r.json) == (
            400,
            {"code": 2, "name": "schema violation", "message": "schema violation (%s)" % message, "fields": {"@entity": [message]}},
        )
        r = await s.request("POST", "/routes", {"methods": ["GET"], "protocols": ["foo", "http"]}, content_type)
        assert r.json == {
            "code": 2,
            "name": "schema violation",
            "message": "schema violation (protocols.1: %s)" % PROTOCOLS_ERR,
            "fields": {"protocols": [PROTOCOLS_ERR]},
        }
        r = await s.request(
            "POST", "/routes", {"methods": ["GET"], "protocols": ["foo", "http"], "service": {"protocol": "foo"}}, content_type
        )
        assert r.json["message"] == "2 schema violations (protocols.1: %s; service.protocol: %s)" % (PROTOCOLS_ERR, PROTOCOLS_ERR)
        r = await s.request("POST", "/routes", {"methods": ["GET"], "service": {"name": "non-existing"}}, content_type)
        unresolved = "the foreign key cannot be resolved with '{name=\"non-existing\"}' for an existing 'services' entity"
        assert (r.status, r.json) == (
            400,
            {
                "code": 13,
                "name": "foreign keys unresolved",
                "message": "foreign key unresolved (service.name: %s)" % unresolved,
                "fields": {"service": {"name": unresolved}},
            },
        )
        r = await s.request("POST", "/routes", {"methods": ["GET"], "service": {"name": None}}, content_type)
        assert r.json["message"] == "schema violation (service.id: missing primary key)"
        r = await s.request("POST", "/routes", {"methods": ["GET"], "service": {"protocol": "http"}}, content_type)
        assert r.json["fields"] == {"service": {"id": "missing primary key"}}
        r = await s.request("POST", "/routes", {"methods": ["GET"], "service": {"id": new_uuid()}}, content_type)
        assert r.status == 400 and r.json["code"] == 4
        assert r.json["message"].endswith("does not reference an existing 'services' entity.")

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_route_with_service_by_name(content_type: str) -> None:
    """service.name is resolved to {id}; nested POST sets the service."""

    async def run(s: AdminServer) -> None:
        svc = (await s.request("POST", "/services", {"host": "a.test", "name": "svc"}, content_type)).json
        r = await s.request(
            "POST", "/routes", {"paths": ["/a"], "methods": ["GET", "POST"], "service": {"name": "svc"}, "strip_path": False}, content_type
        )
        assert r.status == 201
        assert r.json["service"] == {"id": svc["id"]}
        assert (r.json["paths"], r.json["methods"], r.json["strip_path"]) == (["/a"], ["GET", "POST"], False)
        r = await s.request("POST", "/services/svc/routes", {"hosts": ["h.test"], "headers": {"x-foo": ["bar"]}}, content_type)
        assert r.status == 201 and r.json["service"] == {"id": svc["id"]}
        assert r.json["headers"] == {"x-foo": ["bar"]}
        listing = (await s.request("GET", "/services/svc/routes")).json
        assert len(listing["data"]) == 2 and listing["next"] is None

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_put_route_by_name_replaces() -> None:
    """PUT /routes/{name} creates with that name, then replaces (omitted fields -> null)."""

    async def run(s: AdminServer) -> None:
        r = await s.request("PUT", "/routes/my-route", {"paths": ["/a"], "hosts": ["h.test"], "methods": ["GET"]})
        assert r.status == 200 and r.json["name"] == "my-route"
        first = r.json
        r = await s.request("PUT", "/routes/my-route", {"paths": ["/b"]})
        assert r.status == 200
        assert r.json["id"] == first["id"] and r.json["created_at"] == first["created_at"]
        assert (r.json["paths"], r.json["hosts"], r.json["methods"]) == (["/b"], None, None)
        r = await s.request("PUT", "/routes/other", {"paths": ["/b"], "name": "ignored"})
        assert r.json["name"] == "other"

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_route_service_subresource() -> None:
    """/routes/{r}/service: GET and PATCH the service, DELETE is 405, no service is 404."""

    async def run(s: AdminServer) -> None:
        svc = (await s.request("POST", "/services", {"host": "a.test", "name": "svc"})).json
        route = (await s.request("POST", "/services/svc/routes", {"paths": ["/"], "name": "r1"})).json
        r = await s.request("GET", "/routes/r1/service")
        assert r.status == 200 and r.json["id"] == svc["id"]
        r = await s.request("PATCH", "/routes/r1/service", {"port": 8080})
        assert r.status == 200 and r.json["port"] == 8080
        r = await s.request("DELETE", "/routes/r1/service")
        assert (r.status, r.json) == (405, {"message": "Method not allowed"})
        lonely = (await s.request("POST", "/routes", {"paths": ["/x"]})).json
        assert (await s.request("GET", "/routes/%s/service" % lonely["id"])).status == 404
        r = await s.request("PUT", "/routes/%s/service" % lonely["id"], {"host": "new.test"})
        assert r.status == 200
        r2 = await s.request("GET", "/routes/%s" % lonely["id"])
        assert r2.json["service"] == {"id": r.json["id"]}
        assert route["service"] == {"id": svc["id"]}

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_nested_route_must_belong() -> None:
    """/services/{s}/routes/{r} is 404 when the route belongs to another service."""

    async def run(s: AdminServer) -> None:
        await s.request("POST", "/services", {"host": "a.test", "name": "a"})
        await s.request("POST", "/services", {"host": "b.test", "name": "b"})
        route = (await s.request("POST", "/services/a/routes", {"paths": ["/"]})).json
        assert (await s.request("GET", "/services/a/routes/" + route["id"])).status == 200
        for method in ("GET", "PATCH", "DELETE"):
            r = await s.request(method, "/services/b/routes/" + route["id"], {} if method == "PATCH" else None)
            assert r.status == 404
        r = await s.request("PATCH", "/services/a/routes/" + route["id"], {"hosts": ["h"]})
        assert r.status == 200 and r.json["hosts"] == ["h"]
        assert (await s.request("DELETE", "/services/a/routes/" + route["id"])).status == 204
        assert (await s.request("GET", "/services/nope/routes")).status == 404

    await with_server(run)


# -- node endpoints, bodies and routing ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_root() -> None:
    """GET / answers Kong's shape with the node's values."""

    async def run(s: AdminServer) -> None:
        r = await s.request("GET", "/")
        body = r.json
        assert body["tagline"] == "Welcome to kong"
        assert body["version"] == "3.10.0" and body["edition"] == "community"
        assert body["node_id"] == NODE_ID and body["hostname"] == "test-host"
        assert body["plugins"]["enabled_in_cluster"] == []
        assert b'"enabled_in_cluster":[]' in r.raw
        assert body["plugins"]["available_on_server"]["key-auth"]["priority"] == 1250
        assert body["configuration"]["pg_password"] == "******"
        assert body["pids"] == {"master": os.getpid(), "workers": [os.getpid()]}
        assert re.match(r"^kong/", r.header("server") or "")

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_status() -> None:
    """GET /status: database reachable, memory with units, server stats; bad unit is 400."""

    async def run(s: AdminServer) -> None:
        r = await s.request("GET", "/status")
        assert r.status == 200
        assert r.json["database"] == {"reachable": True}
        assert r.json["server"] == {"total_requests": 1, "connections_active": 1}
        assert r.json["memory"]["workers_lua_vms"][0]["http_allocated_gc"].endswith(" MiB")
        r = await s.request("GET", "/status?unit=k&scale=1")
        assert re.match(r"^\d+\.\d KiB$", r.json["memory"]["process_rss"])
        r = await s.request("GET", "/status?unit=x")
        assert r.status == 400 and "message" in r.json

    await with_server(run)


class _BrokenStore:
    def ping(self) -> Any:
        from twisted.internet import defer

        return defer.Deferred()  # never fires

    def get(self, *args: Any) -> Any:
        raise RuntimeError("boom")

    def page(self, *args: Any) -> Any:
        from twisted.internet import defer

        from kongtx.store.interface import StoreUnavailable

        return defer.fail(StoreUnavailable("connection refused"))


@pytest_twisted.ensureDeferred
async def test_store_failures_are_kong_shaped() -> None:
    """A hanging ping is reachable:false; store errors and crashes give Kong's 500 body."""

    async def run(s: AdminServer) -> None:
        r = await s.request("GET", "/status")
        assert r.json["database"] == {"reachable": False}
        r = await s.request("GET", "/services")
        assert (r.status, r.json) == (500, {"message": "An unexpected error occurred"})
        r = await s.request("GET", "/services/" + new_uuid())
        assert (r.status, r.json) == (500, {"message": "An unexpected error occurred"})

    await with_server(run, store=_BrokenStore(), ping_timeout=0.2)


@pytest_twisted.ensureDeferred
async def test_schemas_endpoints() -> None:
    """/schemas/{entity} lists fields; /schemas/{entity}/validate checks a body."""

    async def run(s: AdminServer) -> None:
        r = await s.request("GET", "/schemas/services")
        assert r.status == 200
        names = [list(f)[0] for f in r.json["fields"]]
        assert names[:4] == ["id", "created_at", "updated_at", "name"]
        r = await s.request("POST", "/schemas/routes/validate", {"paths": ["/"], "service": {"name": "x"}})
        assert (r.status, r.json) == (200, {"message": "schema validation successful"})
        r = await s.request("POST", "/schemas/routes/validate", {})
        assert r.status == 400 and r.json["code"] == 2
        assert (await s.request("GET", "/schemas/nope")).status == 404

    await with_server(run)


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/nope", 404),
        ("GET", "/services/x/nope", 404),
        ("GET", "/services/", 200),
        ("GET", "/services/a/routes/b/c", 404),
        ("POST", "/", 405),
        ("TRACE", "/services", 405),
    ],
)
@pytest_twisted.ensureDeferred
async def test_routing(method: str, path: str, status: int) -> None:
    """Unknown paths are 404 {"message":"Not found"}; trailing slash tolerated."""

    async def run(s: AdminServer) -> None:
        r = await s.request(method, path)
        assert r.status == status
        assert r.header("content-type") == "application/json; charset=utf-8"

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_percent_decoded_names() -> None:
    """URL segments are percent-decoded before the endpoint-key lookup."""

    async def run(s: AdminServer) -> None:
        await s.request("POST", "/services", {"host": "a.test", "name": "a~b"})
        assert (await s.request("GET", "/services/a%7Eb")).status == 200

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_body_edge_cases() -> None:
    """415 for unknown types, empty JSON body is {}, 413 over the limit, 400 for two Content-Types."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/services", raw=b'{"hello": "world"}', content_type="invalid")
        assert r.status == 415
        r = await s.request("POST", "/services", raw=b"invalid", content_type=None)
        assert r.status == 415
        r = await s.request("POST", "/services", raw=b"", content_type="application/json")
        assert r.status == 400 and r.json["fields"] == {"host": "required field missing"}
        r = await s.request("POST", "/services", raw=b"x" * 2000, content_type="application/json")
        assert r.status == 413
        r = await s.request("PATCH", "/services/" + new_uuid(), raw=b"[1]", content_type="application/json")
        assert r.status == 404
        created = (await s.request("POST", "/services", {"host": "a.test"})).json
        r = await s.request("PATCH", "/services/" + created["id"], raw=b"{}", content_type="application/json")
        assert r.status == 200
        r = await s.request("PATCH", "/services/" + created["id"], raw=b'"x"', content_type="application/json")
        assert r.status == 400 and r.json["fields"] == {"@entity": ["expected a record"]}
        port = s.port.getHost().port
        reply = await raw_request(
            s.reactor,
            port,
            b"POST /services HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        assert reply.startswith(b"HTTP/1.1 400")
        assert reply.endswith(b'{"message":"Multiple Content-Type headers not allowed"}')

    await with_server(run, max_body_size=1000)


@pytest_twisted.ensureDeferred
async def test_sqlite_store() -> None:
    """The same API over SQLiteStore: create, list, page and refuse a restricted delete."""
    from twisted.internet import reactor

    from kongtx.store.sqlite import SQLiteStore

    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(store_metas(), os.path.join(tmp, "kong.db"), reactor)
        await store.start()
        try:

            async def run(s: AdminServer) -> None:
                svc = await s.request("POST", "/services", {"host": "a.test", "name": "svc"}, "application/x-www-form-urlencoded")
                assert svc.status == 201
                r = await s.request("POST", "/services/svc/routes", {"paths": ["/a"]})
                assert r.status == 201
                for i in range(3):
                    await s.request("POST", "/routes", {"paths": ["/p%d" % i], "service": {"name": "svc"}})
                page = (await s.request("GET", "/routes?size=2")).json
                assert len(page["data"]) == 2 and page["next"].startswith("/routes?offset=")
                rest = (await s.request("GET", page["next"])).json
                assert len(rest["data"]) == 2 and rest["next"] is None
                r = await s.request("DELETE", "/services/svc")
                assert r.status == 400 and r.json["code"] == 4
                r = await s.request("POST", "/services", {"host": "b.test", "name": "svc"})
                assert r.status == 409

            await with_server(run, store=store)
        finally:
            await store.stop()
