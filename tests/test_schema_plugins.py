"""Consumers, plugins and key-auth credentials schemas: defaults, Kong's messages, subschemas."""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping

import pytest

from kongtx.errors import SchemaViolation
from kongtx.schema import ENTITIES, store_metas
from kongtx.schema import typedefs as t
from kongtx.schema.plugins import ERR_NOT_ENABLED, with_plugins
from kongtx.store.interface import EntityMeta, ForeignKey

ID = "6f9e0a4e-4d0b-4a7e-9b3e-2f1d2c3b4a5e"
OTHER = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
NOW = 1700000000
AT_LEAST_ONE = "at least one of these fields must be non-empty: 'custom_id', 'username'"
HTTP_ONLY = "expected one of: grpc, grpcs, http, https"


# -- plugin classes as the plugin runtime declares them ---------------------------------


class KeyAuth:
    NAME = "key-auth"
    PRIORITY = 1250
    VERSION = "3.10.0"
    PROTOCOLS = ("grpc", "grpcs", "http", "https")
    NO_CONSUMER = True
    CONFIG = t.record(
        (
            ("key_names", t.array(t.header_name(), required=True, default=["apikey"])),
            ("hide_credentials", t.boolean(required=True, default=False)),
            ("anonymous", t.string()),
            ("key_in_header", t.boolean(required=True, default=True)),
            ("key_in_query", t.boolean(required=True, default=True)),
            ("key_in_body", t.boolean(required=True, default=False)),
            ("run_on_preflight", t.boolean(required=True, default=True)),
            ("realm", t.string()),
        )
    )


class BasicAuth:
    NAME = "basic-auth"
    PRIORITY = 1100
    VERSION = "3.10.0"
    PROTOCOLS = ("grpc", "grpcs", "http", "https")
    NO_CONSUMER = True
    CONFIG = t.record(
        (
            ("anonymous", t.string()),
            ("hide_credentials", t.boolean(required=True, default=False)),
            ("realm", t.string(required=True, default="service")),
        )
    )


class RateLimiting:
    NAME = "rate-limiting"
    PRIORITY = 910
    VERSION = "3.10.0"
    PROTOCOLS = ("grpc", "grpcs", "http", "https")
    NO_CONSUMER = False
    CONFIG = t.record(
        (
            ("second", t.number(gt=0)),
            ("minute", t.number(gt=0)),
            ("hour", t.number(gt=0)),
            ("policy", t.string(default="local", one_of=("local", "cluster", "redis"))),
            ("limit_by", t.string(default="consumer", one_of=("consumer", "ip", "service"))),
            ("fault_tolerant", t.boolean(required=True, default=True)),
        ),
        record_at_least_one_of=("second", "minute", "hour"),
    )


class IpRestriction:
    NAME = "ip-restriction"
    PRIORITY = 990
    VERSION = "3.10.0"
    PROTOCOLS = ("http", "https", "tcp", "tls", "grpc", "grpcs")
    NO_CONSUMER = False
    CONFIG = t.record((("allow", t.array(t.ip_or_cidr())), ("deny", t.array(t.ip_or_cidr()))))


TEST_PLUGINS: Mapping[str, type] = {
    cls.NAME: cls for cls in (KeyAuth, BasicAuth, RateLimiting, IpRestriction)
}

CONSUMERS = ENTITIES["consumers"]
KEYAUTH = ENTITIES["keyauth_credentials"]
PLUGINS = with_plugins(ENTITIES["plugins"], TEST_PLUGINS)


def insert(entity: Any, data: Any) -> Dict[str, Any]:
    return entity.validate_insert(data, now=NOW, new_id=ID)


def fields_of(entity: Any, data: Any) -> Dict[str, Any]:
    with pytest.raises(SchemaViolation) as info:
        insert(entity, data)
    return info.value.fields


# -- consumers ---------------------------------------------------------------------------


def test_consumer_defaults() -> None:
    """A consumer row has id, both timestamps, username, custom_id (null) and tags (null)."""
    assert insert(CONSUMERS, {"username": "bob"}) == {
        "id": ID,
        "created_at": NOW,
        "updated_at": NOW,
        "username": "bob",
        "custom_id": None,
        "tags": None,
    }


@pytest.mark.parametrize(
    "data, errors",
    [
        ({}, {"@entity": [AT_LEAST_ONE]}),
        ({"username": None, "custom_id": None}, {"@entity": [AT_LEAST_ONE]}),
        ({"username": 5}, {"username": "expected a string"}),
        ({"username": "a", "foo": 1}, {"foo": "unknown field"}),
        (
            {"custom_id": "c", "tags": ["a,b"]},
            {"tags": ["invalid tag 'a,b': expected printable ascii (except `,` and `/`) "
                      "or valid utf-8 sequences"]},
        ),
    ],
)
def test_consumer_errors(data: Dict[str, Any], errors: Dict[str, Any]) -> None:
    """Kong's consumer errors: at_least_one_of(custom_id, username), strict fields, tags."""
    assert fields_of(CONSUMERS, data) == errors


def test_consumer_at_least_one_message() -> None:
    """The at_least_one_of violation renders as Kong's single-error message."""
    with pytest.raises(SchemaViolation) as info:
        insert(CONSUMERS, {})
    assert info.value.message == "schema violation (%s)" % AT_LEAST_ONE


def test_consumer_update_prefixes_when_updating() -> None:
    """PATCH clearing the only identifier fails with the 'when updating, ' prefix."""
    row = insert(CONSUMERS, {"username": "bob"})
    with pytest.raises(SchemaViolation) as info:
        CONSUMERS.validate_update(row, {"username": None}, now=NOW + 1)
    assert info.value.fields == {"@entity": ["when updating, " + AT_LEAST_ONE]}


# -- key-auth credentials ----------------------------------------------------------------------


def test_keyauth_generates_a_key() -> None:
    """A credential without key gets 32 hex characters; each insert a different one."""
    first = insert(KEYAUTH, {"consumer": {"id": OTHER}})
    second = insert(KEYAUTH, {"consumer": {"id": OTHER}, "key": None})
    assert re.match(r"^[0-9a-f]{32}$", first["key"])
    assert re.match(r"^[0-9a-f]{32}$", second["key"])
    assert first["key"] != second["key"]
    assert first == {
        "id": ID,
        "created_at": NOW,
        "consumer": {"id": OTHER},
        "key": first["key"],
        "ttl": None,
        "expires_at": None,
        "tags": None,
    }


def test_keyauth_keeps_a_given_key_and_replace_generates() -> None:
    """A given key is kept; PUT without a key generates one as Kong's upsert does."""
    assert insert(KEYAUTH, {"consumer": {"id": OTHER}, "key": "secret"})["key"] == "secret"
    row = KEYAUTH.validate_replace({"consumer": {"id": OTHER}}, now=NOW, id=ID)
    assert re.match(r"^[0-9a-f]{32}$", row["key"])


@pytest.mark.parametrize(
    "data, errors",
    [
        ({}, {"consumer": "required field missing"}),
        ({"consumer": {"id": "x"}}, {"consumer": {"id": "expected a valid UUID"}}),
        ({"consumer": {"id": OTHER}, "key": 5}, {"key": "expected a string"}),
        ({"consumer": {"id": OTHER}, "ttl": -1}, {"ttl": "value should be between 0 and 100000000"}),
        ({"consumer": {"id": OTHER}, "ttl": "x"}, {"ttl": "expected an integer"}),
        ({"consumer": {"id": OTHER}, "foo": 1}, {"foo": "unknown field"}),
    ],
)
def test_keyauth_errors(data: Dict[str, Any], errors: Dict[str, Any]) -> None:
    """Credential errors: consumer required, key a string, ttl bounded, strict fields."""
    assert fields_of(KEYAUTH, data) == errors


@pytest.mark.parametrize(
    "ttl, expires_at",
    [(None, None), (0, None), (60, NOW + 60), (100000000, NOW + 100000000)],
)
def test_keyauth_ttl_sets_expires_at(ttl: Any, expires_at: Any) -> None:
    """ttl is stored as given; a positive ttl stores expires_at = now + ttl."""
    row = insert(KEYAUTH, {"consumer": {"id": OTHER}, "ttl": ttl})
    assert (row["ttl"], row["expires_at"]) == (ttl, expires_at)


def test_keyauth_patch_restarts_or_keeps_expiry() -> None:
    """PATCH with ttl restarts the expiry from now; PATCH without ttl keeps it."""
    row = insert(KEYAUTH, {"consumer": {"id": OTHER}, "ttl": 60})
    kept = KEYAUTH.validate_update(row, {"tags": ["a"], "expires_at": 1}, now=NOW + 10)
    assert kept["expires_at"] == NOW + 60
    restarted = KEYAUTH.validate_update(row, {"ttl": 30}, now=NOW + 10)
    assert restarted["expires_at"] == NOW + 40
    cleared = KEYAUTH.validate_update(row, {"ttl": None}, now=NOW + 10)
    assert (cleared["ttl"], cleared["expires_at"]) == (None, None)


# -- plugins -------------------------------------------------------------------------------------


def test_plugin_defaults_from_the_plugin_class() -> None:
    """A plugin row gets the class's config defaults and PROTOCOLS; scope keys are null."""
    assert insert(PLUGINS, {"name": "key-auth"}) == {
        "id": ID,
        "name": "key-auth",
        "instance_name": None,
        "created_at": NOW,
        "updated_at": NOW,
        "route": None,
        "service": None,
        "consumer": None,
        "config": {
            "key_names": ["apikey"],
            "hide_credentials": False,
            "anonymous": None,
            "key_in_header": True,
            "key_in_query": True,
            "key_in_body": False,
            "run_on_preflight": True,
            "realm": None,
        },
        "protocols": ["grpc", "grpcs", "http", "https"],
        "enabled": True,
        "tags": None,
        "api": None,
    }


@pytest.mark.parametrize(
    "data, config",
    [
        ({"name": "basic-auth", "config": None}, {"anonymous": None, "hide_credentials": False, "realm": "service"}),
        ({"name": "basic-auth", "config": {}}, {"anonymous": None, "hide_credentials": False, "realm": "service"}),
        ({"name": "basic-auth", "config": {"realm": "r"}}, {"anonymous": None, "hide_credentials": False, "realm": "r"}),
        (
            {"name": "rate-limiting", "config": {"minute": 5.0}},
            {"second": None, "minute": 5, "hour": None, "policy": "local",
             "limit_by": "consumer", "fault_tolerant": True},
        ),
    ],
)
def test_plugin_config_defaults(data: Dict[str, Any], config: Dict[str, Any]) -> None:
    """Missing, null and partial configs are completed with the plugin's defaults."""
    assert insert(PLUGINS, data)["config"] == config


def test_plugin_protocols_default_per_plugin() -> None:
    """protocols defaults to the class's PROTOCOLS; non-HTTP plugins accept stream protocols."""
    row = insert(PLUGINS, {"name": "ip-restriction", "protocols": ["tcp"]})
    assert row["protocols"] == ["tcp"]
    assert insert(PLUGINS, {"name": "ip-restriction"})["protocols"] == [
        "http", "https", "tcp", "tls", "grpc", "grpcs"
    ]


@pytest.mark.parametrize(
    "data, errors",
    [
        ({}, {"name": "required field missing"}),
        ({"config": {"x": 1}}, {"name": "required field missing"}),
        ({"name": "nope"}, {"name": ERR_NOT_ENABLED % "nope"}),
        ({"name": "nope", "config": {"x": 1}, "foo": 2}, {"name": ERR_NOT_ENABLED % "nope"}),
        ({"name": "key-auth", "config": {"foo": 1}}, {"config": {"foo": "unknown field"}}),
        (
            {"name": "key-auth", "config": {"key_names": ["bad name!"]}},
            {"config": {"key_names": [
                "bad header name 'bad name!', allowed characters are A-Z, a-z, 0-9, '_', and '-'"
            ]}},
        ),
        ({"name": "key-auth", "config": {"hide_credentials": "yes"}}, {"config": {"hide_credentials": "expected a boolean"}}),
        ({"name": "key-auth", "config": "x"}, {"config": "expected a record"}),
        ({"name": "key-auth", "consumer": {"id": OTHER}}, {"consumer": "value must be null"}),
        ({"name": "key-auth", "protocols": ["tcp"]}, {"protocols": [HTTP_ONLY]}),
        ({"name": "key-auth", "protocols": []}, {}),
        ({"name": "key-auth", "enabled": None}, {"enabled": "required field missing"}),
        ({"name": "key-auth", "instance_name": "a b"}, {"instance_name": (
            "invalid value 'a b': the only accepted ascii characters are alphanumerics "
            "or ., -, _, and ~")}),
        ({"name": "key-auth", "service": {"id": "x"}}, {"service": {"id": "expected a valid UUID"}}),
        (
            {"name": "rate-limiting", "config": {}},
            {"config": {"@entity": [
                "at least one of these fields must be non-empty: 'second', 'minute', 'hour'"
            ]}},
        ),
        ({"name": "rate-limiting", "config": {"minute": 0}}, {"config": {"minute": "value must be greater than 0"}}),
        (
            {"name": "rate-limiting", "config": {"minute": 1, "policy": "x"}},
            {"config": {"policy": "expected one of: local, cluster, redis"}},
        ),
    ],
)
def test_plugin_errors(data: Dict[str, Any], errors: Dict[str, Any]) -> None:
    """Plugin errors: name first (missing or not loaded), then config nested under config."""
    if not errors:
        insert(PLUGINS, data)
        return
    assert fields_of(PLUGINS, data) == errors


def test_consumer_scoped_plugin_allowed_when_not_no_consumer() -> None:
    """rate-limiting may be consumer-scoped; its consumer key is kept."""
    row = insert(PLUGINS, {"name": "rate-limiting", "consumer": {"id": OTHER}, "config": {"hour": 1}})
    assert row["consumer"] == {"id": OTHER}


def test_plugin_patch_merges_config_and_revalidates() -> None:
    """PATCH config merges over the stored config and re-runs the plugin's checks."""
    row = insert(PLUGINS, {"name": "rate-limiting", "config": {"minute": 5}})
    patched = PLUGINS.validate_update(row, {"config": {"hour": 100}}, now=NOW + 1)
    assert patched["config"]["minute"] == 5 and patched["config"]["hour"] == 100
    with pytest.raises(SchemaViolation) as info:
        PLUGINS.validate_update(row, {"config": {"bogus": 1}}, now=NOW + 1)
    assert info.value.fields == {"config": {"bogus": "unknown field"}}


def test_plugins_entity_without_plugins_enables_nothing() -> None:
    """The registered plugins entity knows no plugin until the node's classes are given."""
    assert fields_of(ENTITIES["plugins"], {"name": "key-auth"}) == {
        "name": ERR_NOT_ENABLED % "key-auth"
    }


def test_store_metadata() -> None:
    """Store metadata: unique fields, cascading foreign keys and the plugins cache key."""
    metas = store_metas()
    assert metas["consumers"] == EntityMeta("consumers", unique=("username", "custom_id"))
    assert metas["keyauth_credentials"] == EntityMeta(
        "keyauth_credentials", unique=("key",), foreign={"consumer": ForeignKey("consumers", "cascade")}
    )
    assert metas["plugins"] == EntityMeta(
        "plugins",
        unique=("instance_name",),
        foreign={
            "route": ForeignKey("routes", "cascade"),
            "service": ForeignKey("services", "cascade"),
            "consumer": ForeignKey("consumers", "cascade"),
            "api": ForeignKey("apis", "cascade"),
        },
        cache_key=("name", "route", "service", "consumer", "api"),
    )


def test_admin_names() -> None:
    """URL names: /consumers, /plugins, /key-auths and nested /consumers/{c}/key-auth."""
    assert CONSUMERS.path_name == "consumers" and CONSUMERS.endpoint_key == "username"
    assert PLUGINS.path_name == "plugins" and PLUGINS.endpoint_key == "instance_name"
    assert (KEYAUTH.path_name, KEYAUTH.nested_path_name, KEYAUTH.endpoint_key) == (
        "key-auths", "key-auth", "key"
    )
