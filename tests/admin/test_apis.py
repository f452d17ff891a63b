"""The legacy Kong 0.x ``/apis`` entity: its validation and its Admin API over real HTTP."""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import pytest_twisted

from kongtx.admin.legacy import flatten_errors
from kongtx.plugins import load_plugins
from kongtx.schema.apis import ApiViolation, api_paths, validate_api
from kongtx.snapshot import api_to_rows, build_snapshot
from tests.admin.helpers import AdminServer

FORM = "application/x-www-form-urlencoded"
ID = "6f1d0c4e-5b7a-4c1e-9d2f-0a1b2c3d4e5f"
NOW_MS = 1513401906560
SELF_CHECK = "at least one of 'hosts', 'uris' or 'methods' must be specified"

DEFAULTS = {
    "id": ID,
    "created_at": NOW_MS,
    "name": "my-api",
    "hosts": None,
    "uris": ["/kong1"],
    "methods": None,
    "upstream_url": "http://upstream.test",
    "strip_uri": True,
    "preserve_host": False,
    "retries": 5,
    "https_only": False,
    "http_if_terminated": False,
    "upstream_connect_timeout": 60000,
    "upstream_send_timeout": 60000,
    "upstream_read_timeout": 60000,
}


def validate(data: Dict[str, Any], existing: Any = None) -> Dict[str, Any]:
    return validate_api(data, now_ms=NOW_MS, new_id=ID, existing=existing)


def errors_of(data: Dict[str, Any]) -> Dict[str, str]:
    with pytest.raises(ApiViolation) as info:
        validate(data)
    return info.value.errors


# -- validation (pure) ----------------------------------------------------------------------


def test_defaults() -> None:
    """A minimal API gets 0.x's defaults; created_at is in milliseconds."""
    data = {"name": "my-api", "uris": "/kong1", "upstream_url": "http://upstream.test"}
    assert validate(data) == DEFAULTS


@pytest.mark.parametrize(
    "data, errors",
    [
        ({"uris": "/a"}, {"name": "name is required", "upstream_url": "upstream_url is required"}),
        ({"name": "a", "uris": "/a", "upstream_url": "http://x", "foo": 1},
         {"foo": "unknown field"}),
        ({"name": "a", "upstream_url": "http://x"}, {"message": SELF_CHECK}),
        ({"name": "a", "uris": "/a", "upstream_url": "ftp://x"},
         {"upstream_url": "Supported protocols are HTTP and HTTPS"}),
        ({"name": "a", "uris": "/a", "upstream_url": "nope"},
         {"upstream_url": "upstream_url is not a url"}),
        ({"name": "a", "uris": "a", "upstream_url": "http://x"},
         {"uris": "uri with value 'a' is invalid: must be prefixed with slash"}),
        ({"name": "a", "hosts": "a.*.com", "upstream_url": "http://x"},
         {"hosts": "host with value 'a.*.com' is invalid: Invalid wildcard placement"}),
        ({"name": "a", "hosts": "*.a.*", "upstream_url": "http://x"},
         {"hosts": "host with value '*.a.*' is invalid: Only one wildcard is allowed"}),
        ({"name": "a", "hosts": "a b", "upstream_url": "http://x"},
         {"hosts": "host with value 'a b' is invalid: Invalid hostname"}),
        ({"name": "a", "methods": "get", "upstream_url": "http://x"},
         {"methods": "method with value 'get' is invalid: only uppercase letters are allowed"}),
        ({"name": "a", "uris": "/a", "upstream_url": "http://x", "retries": 40000},
         {"retries": "retries must be an integer between 0 and 32767"}),
        ({"name": "a", "uris": "/a", "upstream_url": "http://x", "strip_uri": "yes"},
         {"strip_uri": "strip_uri is not a boolean"}),
        ({"name": "a b", "uris": "/a", "upstream_url": "http://x"},
         {"name": "name must only contain alphanumeric and '., -, _, ~' characters"}),
    ],
)
def test_flat_errors(data: Dict[str, Any], errors: Dict[str, str]) -> None:
    """0.x errors are flat ``{field: message}`` objects (the self-check under ``message``)."""
    assert errors_of(data) == errors


@pytest.mark.parametrize(
    "given, stored",
    [
        ("a.com, b.com", ["a.com", "b.com"]),
        (["a.com", "b.com"], ["a.com", "b.com"]),
        ("", None),
        ([], None),
    ],
)
def test_hosts_as_comma_separated_string(given: Any, stored: Any) -> None:
    """Arrays may be given as 0.x's comma-separated strings; empty arrays are null."""
    row = validate({"name": "a", "hosts": given, "uris": "/a", "upstream_url": "http://x"})
    assert row["hosts"] == stored


def test_patch_merges_and_keeps_identity() -> None:
    """PATCH keeps id and created_at, merges the fields given and re-checks the whole row."""
    existing = dict(DEFAULTS)
    row = validate({"strip_uri": "false", "retries": "3"}, existing)
    assert row == dict(DEFAULTS, strip_uri=False, retries=3)
    with pytest.raises(ApiViolation) as info:
        validate({"uris": None}, existing)
    assert info.value.errors == {"message": SELF_CHECK}


@pytest.mark.parametrize(
    "uris, paths",
    [
        (["/kong1"], ["/kong1"]),
        (["/status/\\d+"], ["~/status/\\d+"]),
        (["/a%20b", "/x_y~z.1-2"], ["/a%20b", "/x_y~z.1-2"]),
        (None, []),
    ],
)
def test_uris_become_router_paths(uris: Any, paths: Any) -> None:
    """A URI of plain characters is a prefix, anything else a regex (0.x's heuristic)."""
    assert api_paths(uris) == paths


def test_api_to_rows() -> None:
    """An API is a route + service pair sharing its id; https_only leaves only https."""
    api = dict(DEFAULTS, upstream_url="https://up.test:8443/base", https_only=True,
               strip_uri=False, upstream_send_timeout=5)
    route, service = api_to_rows(api)
    assert (route["id"], route["service"], route["paths"], route["protocols"],
            route["strip_path"], route["created_at"]) == (
        ID, {"id": ID}, ["/kong1"], ["https"], False, NOW_MS // 1000)
    assert (service["protocol"], service["host"], service["port"], service["path"],
            service["write_timeout"]) == ("https", "up.test", 8443, "/base", 5)


def test_snapshot_routes_routes_before_apis() -> None:
    """Kong 0.13-0.14: a request is offered to the routes first, then to the APIs."""
    route = {"id": "r1", "paths": ["/kong1"], "protocols": ["http", "https"],
             "service": {"id": "s1"}}
    svc = {"id": "s1", "host": "svc.test", "port": 80, "protocol": "http"}
    api = dict(DEFAULTS, uris=["/kong"])
    snap = build_snapshot({"services": {"s1": svc}, "routes": {"r1": route},
                           "apis": {ID: api}}, 1)
    assert snap.router.select("GET", None, "/kong1/x").route.id == "r1"
    assert snap.router.select("GET", None, "/kongx").route.id == ID
    assert snap.services[ID].host == "upstream.test"
    assert snap.router.select("GET", None, "/other") is None


def test_api_plugin_is_route_and_service_scoped() -> None:
    """A plugin on an API is in the chain of requests routed by that API only."""
    classes = load_plugins(["rate-limiting"])
    plugin = {"id": "p1", "name": "rate-limiting", "api": {"id": ID}, "route": None,
              "service": None, "consumer": None, "enabled": True,
              "protocols": ["http", "https"], "config": {"minute": 10, "policy": "local"}}
    other = dict(DEFAULTS, id="7f1d0c4e-5b7a-4c1e-9d2f-0a1b2c3d4e5f", name="b", uris=["/b"])
    snap = build_snapshot({"apis": {ID: dict(DEFAULTS), other["id"]: other},
                           "plugins": {"p1": plugin}}, 1, classes)
    assert ID in snap.plugins.chains
    assert other["id"] not in snap.plugins.chains


def test_flatten_errors() -> None:
    """3.x schema-violation fields (for plugins on an API) become 0.x flat keys."""
    assert flatten_errors({"config": {"minute": "expected an integer"}, "@entity": ["x"]}) == {
        "config.minute": "expected an integer", "message": "x"}


# -- /apis over HTTP -----------------------------------------------------------------------


async def with_server(fn: Callable[[AdminServer], Any], **kwargs: Any) -> None:
    from twisted.internet import reactor

    kwargs.setdefault("plugins", load_plugins(["rate-limiting"]))
    server = AdminServer(reactor, **kwargs)
    try:
        await fn(server)
    finally:
        await server.close()


MY_API = {"name": "my-api", "hosts": "example.com,kong.example.com", "uris": "/kong1",
          "upstream_url": "http://upstream.test"}


@pytest.mark.parametrize("content_type", ["application/json", FORM])
@pytest_twisted.ensureDeferred
async def test_post_and_list(content_type: str) -> None:
    """POST /apis (form or JSON, hosts comma-separated) is 201 with 0.x defaults; GET /apis is
    ``{"data": [...], "total": 1}``; an empty list is ``{"data": [], "total": 0}``."""

    async def run(s: AdminServer) -> None:
        r = await s.request("GET", "/apis")
        assert (r.status, r.json) == (200, {"data": [], "total": 0})
        r = await s.request("POST", "/apis", MY_API, content_type)
        assert r.status == 201
        api = r.json
        assert api["hosts"] == ["example.com", "kong.example.com"]
        assert api["uris"] == ["/kong1"]
        assert (api["strip_uri"], api["preserve_host"], api["retries"], api["https_only"],
                api["http_if_terminated"], api["upstream_read_timeout"]) == (
            True, False, 5, False, False, 60000)
        assert api["created_at"] > 10 ** 12  # milliseconds
        r = await s.request("GET", "/apis")
        assert (r.status, r.json) == (200, {"data": [api], "total": 1})

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_errors_are_flat() -> None:
    """0.x error bodies: 400 ``{"name": "name is required", ...}``, ``{"foo": "unknown field"}``,
    the self-check under ``message``, 409 ``{"name": "already exists with value 'my-api'"}``."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/apis", {"uris": "/a"}, FORM)
        assert (r.status, r.json) == (400, {"name": "name is required",
                                            "upstream_url": "upstream_url is required"})
        r = await s.request("POST", "/apis", dict(MY_API, foo="bar"))
        assert (r.status, r.json) == (400, {"foo": "unknown field"})
        r = await s.request("POST", "/apis", {"name": "x", "upstream_url": "http://x"})
        assert (r.status, r.json) == (400, {"message": SELF_CHECK})
        assert (await s.request("POST", "/apis", MY_API)).status == 201
        r = await s.request("POST", "/apis", MY_API)
        assert (r.status, r.json) == (409, {"name": "already exists with value 'my-api'"})

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_entity_by_id_or_name() -> None:
    """GET/PATCH/PUT/DELETE by id or name; PATCH re-checks; DELETE then GET is 404."""

    async def run(s: AdminServer) -> None:
        api = (await s.request("POST", "/apis", MY_API)).json
        assert (await s.request("GET", "/apis/my-api")).json == api
        assert (await s.request("GET", "/apis/%s" % api["id"])).json == api
        r = await s.request("PATCH", "/apis/my-api", {"strip_uri": "false"}, FORM)
        assert r.status == 200 and r.json["strip_uri"] is False
        assert r.json["created_at"] == api["created_at"]
        r = await s.request("PATCH", "/apis/%s" % api["id"], {"hosts": None, "uris": None})
        assert (r.status, r.json) == (400, {"message": SELF_CHECK})
        r = await s.request("PUT", "/apis/my-api", {"uris": ["/v2"], "upstream_url": "http://y"})
        assert r.status == 200
        got = r.json
        assert (got["id"], got["name"], got["hosts"], got["uris"], got["strip_uri"]) == (
            api["id"], "my-api", None, ["/v2"], True)
        r = await s.request("PUT", "/apis/other", {"uris": "/o", "upstream_url": "http://o"})
        assert r.status == 200 and r.json["name"] == "other"
        assert (await s.request("DELETE", "/apis/my-api")).status == 204
        r = await s.request("GET", "/apis/%s" % api["id"])
        assert (r.status, r.json) == (404, {"message": "Not found"})
        assert (await s.request("GET", "/apis")).json["total"] == 1

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_pagination_has_total_and_absolute_next() -> None:
    """A paginated list has ``offset`` and an absolute ``next`` URL; ``total`` counts all."""

    async def run(s: AdminServer) -> None:
        for i in range(3):
            body = {"name": "api-%d" % i, "uris": "/p%d" % i, "upstream_url": "http://x"}
            assert (await s.request("POST", "/apis", body)).status == 201
        r = await s.request("GET", "/apis?size=2")
        assert r.status == 200 and len(r.json["data"]) == 2 and r.json["total"] == 3
        assert r.json["next"].startswith(s.base + "/apis?offset=")
        assert r.json["next"].endswith("&size=2")
        page2 = await s.request("GET", r.json["next"][len(s.base):])
        assert len(page2.json["data"]) == 1 and "next" not in page2.json
        names = {a["name"] for a in r.json["data"] + page2.json["data"]}
        assert names == {"api-0", "api-1", "api-2"}

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_plugins_on_an_api() -> None:
    """POST /apis/{name}/plugins (form ``config.minute=10``) is 201 with ``api`` set; GET lists
    it 0.x-style; a bad config is a flat error; deleting the API deletes its plugins."""

    async def run(s: AdminServer) -> None:
        api = (await s.request("POST", "/apis", MY_API)).json
        r = await s.request("POST", "/apis/my-api/plugins",
                            {"name": "rate-limiting", "config.minute": "10"}, FORM)
        assert r.status == 201, r.json
        plugin = r.json
        assert plugin["api"] == {"id": api["id"]} and plugin["config"]["minute"] == 10
        r = await s.request("GET", "/apis/my-api/plugins")
        assert r.json == {"data": [plugin], "total": 1}
        r = await s.request("GET", "/apis/my-api/plugins/%s" % plugin["id"])
        assert r.json == plugin
        r = await s.request("POST", "/apis/my-api/plugins",
                            {"name": "rate-limiting", "config.minute": "10"}, FORM)
        assert (r.status, r.json) == (409, {"name": "already exists with value 'rate-limiting'"})
        r = await s.request("POST", "/apis/my-api/plugins",
                            {"name": "rate-limiting", "config": {"minute": "x"}})
        assert r.status == 400 and list(r.json) == ["config.minute"]
        r = await s.request("GET", "/apis/nope/plugins")
        assert r.status == 404
        assert (await s.request("DELETE", "/apis/my-api")).status == 204
        r = await s.request("GET", "/plugins/%s" % plugin["id"])
        assert r.status == 404

    await with_server(run)
