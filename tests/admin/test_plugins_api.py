"""/plugins and nested plugin scopes over real HTTP (ports of Kong's plugins routes specs)."""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import pytest_twisted

from kongtx.schema import store_metas
from kongtx.store import migrations
from kongtx.store.postgres import PostgresStore
from tests.admin.helpers import CONTENT_TYPES, AdminServer, new_uuid
from tests.pg import Database, fresh_database  # noqa: F401 (fixture)
from tests.test_schema_plugins import TEST_PLUGINS

NOT_ENABLED = "plugin '%s' not enabled; add it to the 'plugins' configuration property"
KEY_AUTH_CONFIG = {
    "key_names": ["apikey"],
    "hide_credentials": False,
    "anonymous": None,
    "key_in_header": True,
    "key_in_query": True,
    "key_in_body": False,
    "run_on_preflight": True,
    "realm": None,
}
FORM = "application/x-www-form-urlencoded"


async def with_server(fn: Callable[[AdminServer], Any], **kwargs: Any) -> None:
    from twisted.internet import reactor

    kwargs.setdefault("plugins", TEST_PLUGINS)
    server = AdminServer(reactor, **kwargs)
    try:
        await fn(server)
    finally:
        await server.close()


async def service(s: AdminServer, name: str) -> Dict[str, Any]:
    r = await s.request("POST", "/services", {"name": name, "host": "upstream.test"})
    assert r.status == 201
    return r.json


async def route(s: AdminServer, service_name: str, name: str) -> Dict[str, Any]:
    r = await s.request("POST", "/services/%s/routes" % service_name, {"name": name, "paths": ["/" + name]})
    assert r.status == 201
    return r.json


# -- POST /plugins ----------------------------------------------------------------------


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_global_plugin(content_type: str) -> None:
    """POST /plugins: 201, config defaults filled in, protocols default, scope null."""

    async def run(s: AdminServer) -> None:
        r = await s.request(
            "POST", "/plugins", {"name": "key-auth", "config": {"key_names": ["apikey", "key"]}}, content_type
        )
        assert r.status == 201
        body = r.json
        assert body["config"] == dict(KEY_AUTH_CONFIG, key_names=["apikey", "key"])
        assert body["protocols"] == ["grpc", "grpcs", "http", "https"]
        assert (body["route"], body["service"], body["consumer"]) == (None, None, None)
        assert body["enabled"] is True and body["instance_name"] is None
        assert body["created_at"] == body["updated_at"]

    await with_server(run)


@pytest.mark.parametrize(
    "raw, config",
    [
        (
            b"name=rate-limiting&config.minute=5&config.policy=local",
            {"second": None, "minute": 5, "hour": None, "policy": "local",
             "limit_by": "consumer", "fault_tolerant": True},
        ),
        (
            b"name=key-auth&config.key_names[]=apikey&config.hide_credentials=true",
            dict(KEY_AUTH_CONFIG, hide_credentials=True),
        ),
        (
            b"name=key-auth&config.key_names[1]=apikey&config.key_names[2]=key",
            dict(KEY_AUTH_CONFIG, key_names=["apikey", "key"]),
        ),
        (b"name=key-auth&config.key_names=x-key", dict(KEY_AUTH_CONFIG, key_names=["x-key"])),
    ],
)
@pytest_twisted.ensureDeferred
async def test_post_plugin_form_syntax(raw: bytes, config: Dict[str, Any]) -> None:
    """Form bodies use Kong's key syntax and are coerced by the plugin's config schema."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/plugins", raw=raw, content_type=FORM)
        assert r.status == 201, r.json
        assert r.json["config"] == config

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_post_plugin_errors(content_type: str) -> None:
    """Missing name, a plugin not loaded, an unknown config field: Kong's schema violations."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/plugins", {}, content_type)
        assert r.status == 400
        assert r.json == {
            "code": 2,
            "name": "schema violation",
            "message": "schema violation (name: required field missing)",
            "fields": {"name": "required field missing"},
        }
        r = await s.request("POST", "/plugins", {"name": "foo"}, content_type)
        assert r.status == 400
        assert r.json == {
            "code": 2,
            "name": "schema violation",
            "message": "schema violation (name: %s)" % (NOT_ENABLED % "foo"),
            "fields": {"name": NOT_ENABLED % "foo"},
        }
        r = await s.request("POST", "/plugins", {"name": "key-auth", "config": {"foo": "bar"}}, content_type)
        assert r.status == 400
        assert r.json == {
            "code": 2,
            "name": "schema violation",
            "message": "schema violation (config.foo: unknown field)",
            "fields": {"config": {"foo": "unknown field"}},
        }
        r = await s.request("POST", "/plugins", {"name": "rate-limiting", "config": {"minute": 0}}, content_type)
        assert r.status == 400
        assert r.json["fields"] == {"config": {"minute": "value must be greater than 0"}}

    await with_server(run)


# -- nested scopes ----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_service_plugins_empty_body_and_conflict(content_type: str) -> None:
    """/services/{s}/plugins: {} is the name error; the same plugin twice is Kong's exact 409."""

    async def run(s: AdminServer) -> None:
        svc = await service(s, "svc")
        r = await s.request("POST", "/services/%s/plugins" % svc["id"], {}, content_type)
        assert r.status == 400
        assert r.json == {
            "code": 2,
            "name": "schema violation",
            "message": "schema violation (name: required field missing)",
            "fields": {"name": "required field missing"},
        }
        r = await s.request("POST", "/services/%s/plugins" % svc["id"], {"name": "basic-auth"}, content_type)
        assert r.status == 201 and r.json["service"] == {"id": svc["id"]}
        r = await s.request("POST", "/services/%s/plugins" % svc["id"], {"name": "basic-auth"}, content_type)
        assert r.status == 409
        assert r.json == {
            "code": 5,
            "name": "unique constraint violation",
            "message": "UNIQUE violation detected on '{consumer=null,name=\"basic-auth\","
            "route=null,service={id=\"%s\"}}'" % svc["id"],
            "fields": {"consumer": None, "name": "basic-auth", "route": None, "service": {"id": svc["id"]}},
        }
        # the same plugin on another scope is fine
        r = await s.request("POST", "/plugins", {"name": "basic-auth"}, content_type)
        assert r.status == 201

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_nested_scopes_list_only_their_plugins() -> None:
    """/services/{s}/plugins, /routes/{r}/plugins, /consumers/{c}/plugins list and create in their scope."""

    async def run(s: AdminServer) -> None:
        svc = await service(s, "svc")
        rt = await route(s, "svc", "rt")
        bob = (await s.request("POST", "/consumers", {"username": "bob"})).json
        glob = (await s.request("POST", "/plugins", {"name": "key-auth"})).json
        by_service = (await s.request("POST", "/services/svc/plugins", {"name": "key-auth"})).json
        by_route = (await s.request("POST", "/routes/rt/plugins", {"name": "key-auth"})).json
        r = await s.request("POST", "/consumers/bob/plugins", {"name": "rate-limiting", "config": {"minute": 1}})
        assert r.status == 201
        by_consumer = r.json
        assert by_service["service"] == {"id": svc["id"]} and by_service["route"] is None
        assert by_route["route"] == {"id": rt["id"]} and by_route["service"] is None
        assert by_consumer["consumer"] == {"id": bob["id"]}
        assert (await s.request("GET", "/services/svc/plugins")).json == {"data": [by_service], "next": None}
        assert (await s.request("GET", "/routes/rt/plugins")).json == {"data": [by_route], "next": None}
        assert (await s.request("GET", "/consumers/bob/plugins")).json == {"data": [by_consumer], "next": None}
        listed = (await s.request("GET", "/plugins?size=1000")).json["data"]
        assert sorted(p["id"] for p in listed) == sorted(
            p["id"] for p in (glob, by_service, by_route, by_consumer)
        )
        r = await s.request("GET", "/services/svc/plugins/" + by_service["id"])
        assert r.status == 200 and r.json == by_service
        assert (await s.request("GET", "/routes/rt/plugins/" + by_service["id"])).status == 404
        r = await s.request("PATCH", "/routes/rt/plugins/" + by_route["id"], {"enabled": False})
        assert r.status == 200 and r.json["enabled"] is False and r.json["route"] == {"id": rt["id"]}
        assert (await s.request("DELETE", "/routes/rt/plugins/" + by_route["id"])).status == 204
        assert (await s.request("DELETE", "/routes/rt/plugins/" + by_route["id"])).status == 404
        assert (await s.request("GET", "/plugins/%s/service" % by_service["id"])).json == svc

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_auth_plugin_cannot_be_consumer_scoped(content_type: str) -> None:
    """A NO_CONSUMER plugin on a consumer: 400 consumer 'value must be null'."""

    async def run(s: AdminServer) -> None:
        await s.request("POST", "/consumers", {"username": "bob"})
        r = await s.request("POST", "/consumers/bob/plugins", {"name": "key-auth"}, content_type)
        assert r.status == 400
        assert r.json == {
            "code": 2,
            "name": "schema violation",
            "message": "schema violation (consumer: value must be null)",
            "fields": {"consumer": "value must be null"},
        }

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_foreign_consumer_by_username() -> None:
    """POST /routes/{id}/plugins with consumer {"username": ...} resolves the consumer (aio-kong)."""

    async def run(s: AdminServer) -> None:
        await service(s, "svc")
        rt = await route(s, "svc", "rt")
        bob = (await s.request("POST", "/consumers", {"username": "an-xxxx-test"})).json
        r = await s.request(
            "POST",
            "/routes/%s/plugins" % rt["id"],
            {"name": "rate-limiting", "consumer": {"username": "an-xxxx-test"}, "config": {"hour": 10}},
        )
        assert r.status == 201
        assert r.json["consumer"] == {"id": bob["id"]} and r.json["route"] == {"id": rt["id"]}

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_deleting_a_service_or_route_deletes_its_plugins() -> None:
    """Plugins cascade with the service or route they are scoped to; global ones stay."""

    async def run(s: AdminServer) -> None:
        await service(s, "svc")
        await route(s, "svc", "rt")
        await s.request("POST", "/routes/rt/plugins", {"name": "key-auth"})
        await s.request("POST", "/plugins", {"name": "key-auth"})
        assert (await s.request("DELETE", "/routes/rt")).status == 204
        await s.request("POST", "/services/svc/plugins", {"name": "key-auth"})
        assert (await s.request("DELETE", "/services/svc")).status == 204
        data = (await s.request("GET", "/plugins")).json["data"]
        assert [(p["service"], p["route"]) for p in data] == [(None, None)]

    await with_server(run)


# -- /plugins/{id or instance_name} ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_plugin_entity_endpoints() -> None:
    """/plugins/{id or instance_name}: GET, form PATCH without name, PUT upsert, DELETE."""

    async def run(s: AdminServer) -> None:
        r = await s.request(
            "POST", "/plugins", {"name": "rate-limiting", "instance_name": "rl", "config": {"minute": 5}}
        )
        assert r.status == 201
        plugin = r.json
        assert (await s.request("GET", "/plugins/rl")).json == plugin
        assert (await s.request("GET", "/plugins/" + plugin["id"])).json == plugin
        r = await s.request("PATCH", "/plugins/rl", raw=b"config.hour=100&config.fault_tolerant=false", content_type=FORM)
        assert r.status == 200, r.json
        assert r.json["config"]["minute"] == 5 and r.json["config"]["hour"] == 100
        assert r.json["config"]["fault_tolerant"] is False
        r = await s.request("PATCH", "/plugins/" + plugin["id"], {"config": {"nope": 1}})
        assert r.status == 400 and r.json["fields"] == {"config": {"nope": "unknown field"}}
        r = await s.request("PATCH", "/plugins/" + new_uuid(), {"enabled": False})
        assert r.status == 404
        pid = new_uuid()
        r = await s.request("PUT", "/plugins/" + pid, {"name": "key-auth", "config": {"hide_credentials": True}})
        assert r.status == 200 and r.json["id"] == pid and r.json["config"]["hide_credentials"] is True
        r = await s.request("PUT", "/plugins/" + pid, {"name": "key-auth"})
        assert r.status == 200 and r.json["config"] == KEY_AUTH_CONFIG
        r = await s.request("PUT", "/plugins/named", {"name": "basic-auth"})
        assert r.status == 200 and r.json["instance_name"] == "named"
        r = await s.request("POST", "/plugins", {"name": "basic-auth", "instance_name": "rl"})
        assert r.status == 409 and r.json["fields"] == {"instance_name": "rl"}
        assert (await s.request("DELETE", "/plugins/rl")).status == 204
        assert (await s.request("GET", "/plugins/rl")).status == 404
        assert (await s.request("DELETE", "/plugins/rl")).status == 204

    await with_server(run)


# -- node endpoints -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_plugins_enabled() -> None:
    """GET /plugins/enabled lists the loaded plugins, sorted."""

    async def run(s: AdminServer) -> None:
        r = await s.request("GET", "/plugins/enabled")
        assert r.status == 200
        assert r.json == {"enabled_plugins": ["basic-auth", "ip-restriction", "key-auth", "rate-limiting"]}

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_root_lists_available_and_enabled_plugins() -> None:
    """GET /: available_on_server from the loaded classes, enabled_in_cluster from plugin rows."""

    async def run(s: AdminServer) -> None:
        r = await s.request("GET", "/")
        plugins = r.json["plugins"]
        assert plugins["available_on_server"]["key-auth"] == {"version": "3.10.0", "priority": 1250}
        assert plugins["available_on_server"]["rate-limiting"] == {"version": "3.10.0", "priority": 910}
        assert r.raw.count(b'"enabled_in_cluster":[]') == 1
        await service(s, "svc")
        await s.request("POST", "/plugins", {"name": "key-auth"})
        await s.request("POST", "/services/svc/plugins", {"name": "key-auth"})
        await s.request("POST", "/plugins", {"name": "basic-auth"})
        r = await s.request("GET", "/")
        assert r.json["plugins"]["enabled_in_cluster"] == ["basic-auth", "key-auth"]

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_plugin_schema_endpoint() -> None:
    """GET /schemas/plugins/{name}: consumer, protocols and config fields; unknown is 404."""

    async def run(s: AdminServer) -> None:
        r = await s.request("GET", "/schemas/plugins/key-auth")
        assert r.status == 200
        fields = r.json["fields"]
        assert [list(f)[0] for f in fields] == ["consumer", "protocols", "config"]
        assert fields[0]["consumer"]["eq"] is None and fields[0]["consumer"]["type"] == "foreign"
        assert fields[1]["protocols"]["default"] == ["grpc", "grpcs", "http", "https"]
        config = fields[2]["config"]
        assert config["type"] == "record" and config["required"] is True
        assert config["fields"][0] == {
            "key_names": {
                "type": "array",
                "required": True,
                "default": ["apikey"],
                "elements": {"type": "string"},
            }
        }
        r = await s.request("GET", "/schemas/plugins/nope")
        assert r.status == 404 and r.json == {"message": "No plugin named 'nope'"}
        r = await s.request("GET", "/schemas/plugins")
        assert r.status == 200 and "fields" in r.json

    await with_server(run)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest_twisted.ensureDeferred
async def test_plugin_schema_validate(content_type: str) -> None:
    """POST /schemas/plugins/validate: success message, or the schema violation; nothing stored."""

    async def run(s: AdminServer) -> None:
        r = await s.request(
            "POST", "/schemas/plugins/validate", {"name": "rate-limiting", "config": {"minute": 5}}, content_type
        )
        assert r.status == 200 and r.json == {"message": "schema validation successful"}
        r = await s.request("POST", "/schemas/plugins/validate", {"name": "nope"}, content_type)
        assert r.status == 400 and r.json["fields"] == {"name": NOT_ENABLED % "nope"}
        assert (await s.request("GET", "/plugins")).json == {"data": [], "next": None}

    await with_server(run)


@pytest_twisted.ensureDeferred
async def test_no_plugins_loaded() -> None:
    """Without loaded plugin classes every plugin name is 'not enabled' and /plugins/enabled is empty."""

    async def run(s: AdminServer) -> None:
        r = await s.request("POST", "/plugins", {"name": "key-auth"})
        assert r.status == 400 and r.json["fields"] == {"name": NOT_ENABLED % "key-auth"}
        assert (await s.request("GET", "/plugins/enabled")).json == {"enabled_plugins": []}
        # the older plugins_available argument still feeds GET /
        r = await s.request("GET", "/")
        assert r.json["plugins"]["available_on_server"] == {"key-auth": {"version": "3.10.0", "priority": 1250}}

    await with_server(run, plugins={})


# -- on PostgreSQL, through the real migrations ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_on_postgres_conflict_cascade_and_enabled(fresh_database: Database) -> None:  # noqa: F811
    """On Postgres bootstrapped by the real migrations: the 409 cache-key body, the
    consumer cascade to credentials and plugins, and GET / enabled_in_cluster."""
    from twisted.internet import reactor

    settings = fresh_database.settings
    await migrations.bootstrap(settings, reactor)
    store = PostgresStore(store_metas(), settings, reactor, "node-a")
    await store.start()
    server = AdminServer(reactor, store=store, plugins=TEST_PLUGINS)
    try:
        s = server
        svc = await service(s, "svc")
        assert (await s.request("POST", "/services/svc/plugins", {"name": "basic-auth"})).status == 201
        r = await s.request("POST", "/services/svc/plugins", {"name": "basic-auth"})
        assert r.status == 409
        assert r.json == {
            "code": 5,
            "name": "unique constraint violation",
            "message": "UNIQUE violation detected on '{consumer=null,name=\"basic-auth\","
            "route=null,service={id=\"%s\"}}'" % svc["id"],
            "fields": {"consumer": None, "name": "basic-auth", "route": None, "service": {"id": svc["id"]}},
        }
        await s.request("POST", "/consumers", {"username": "bob", "custom_id": "b1"})
        cred = (await s.request("POST", "/consumers/bob/key-auth", {})).json
        assert (await s.request("GET", "/key-auths/" + cred["key"])).json == cred
        r = await s.request("POST", "/consumers/bob/plugins", {"name": "rate-limiting", "config": {"minute": 3}})
        assert r.status == 201
        assert len((await s.request("GET", "/consumers?custom_id=b1")).json["data"]) == 1
        assert (await s.request("GET", "/")).json["plugins"]["enabled_in_cluster"] == [
            "basic-auth", "rate-limiting"
        ]
        assert (await s.request("DELETE", "/consumers/bob")).status == 204
        assert (await s.request("GET", "/key-auths")).json == {"data": [], "next": None}
        assert [p["name"] for p in (await s.request("GET", "/plugins")).json["data"]] == ["basic-auth"]
        assert (await s.request("DELETE", "/services/svc")).status == 204
        assert (await s.request("GET", "/")).json["plugins"]["enabled_in_cluster"] == []
    finally:
        await server.close()
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_rate_limiting_accepts_kongs_legacy_redis_keys() -> None:
    """Kong's deprecated flat ``config.redis_host``/``redis_port`` still configure the
    ``redis`` record (JSON and form bodies), and are not echoed back."""
    from kongtx.plugins import load_plugins

    async def check(s: AdminServer) -> None:
        r = await s.request("POST", "/plugins", {"name": "rate-limiting", "config": {
            "minute": 5, "policy": "redis", "redis_host": "10.0.0.1", "redis_port": 6380}})
        assert r.status == 201, r.json
        redis = r.json["config"]["redis"]
        assert (redis["host"], redis["port"]) == ("10.0.0.1", 6380)
        assert "redis_host" not in r.json["config"]
        r = await s.request("PATCH", "/plugins/" + r.json["id"], {"config.redis_port": "6390"},
                            content_type=FORM)
        assert r.status == 200, r.json
        assert r.json["config"]["redis"]["port"] == 6390

    await with_server(check, plugins=load_plugins(["rate-limiting"]))
