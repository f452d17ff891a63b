"""Services and routes schemas: defaults, Kong's error strings, url shorthand, checks."""

from __future__ import annotations

from typing import Any, Dict

import pytest

from kongtx.errors import SchemaViolation
from kongtx.schema import ENTITIES, store_metas
from kongtx.schema.services import parse_url

SERVICES = ENTITIES["services"]
ROUTES = ENTITIES["routes"]
ID = "6f9e0a4e-4d0b-4a7e-9b3e-2f1d2c3b4a5e"
OTHER = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
PROTOCOLS_ERR = "expected one of: grpc, grpcs, http, https, tcp, tls, tls_passthrough, udp"


def insert(entity: Any, data: Dict[str, Any]) -> Dict[str, Any]:
    return entity.validate_insert(data, now=1700000000, new_id=ID)


def fields_of(entity: Any, data: Any) -> Dict[str, Any]:
    with pytest.raises(SchemaViolation) as info:
        insert(entity, data)
    return info.value.fields


def test_service_defaults() -> None:
    """POST /services with a host only gives every field, Kong's defaults and explicit nulls."""
    assert insert(SERVICES, {"host": "service.test"}) == {
        "id": ID,
        "created_at": 1700000000,
        "updated_at": 1700000000,
        "name": None,
        "retries": 5,
        "protocol": "http",
        "host": "service.test",
        "port": 80,
        "path": None,
        "connect_timeout": 60000,
        "write_timeout": 60000,
        "read_timeout": 60000,
        "tags": None,
        "client_certificate": None,
        "tls_verify": None,
        "tls_verify_depth": None,
        "ca_certificates": None,
        "enabled": True,
    }


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://service.test/", ("http", "service.test", 80, "/")),
        ("https://service.test/", ("https", "service.test", 443, "/")),
        ("http://example.test:443", ("http", "example.test", 443, None)),
        ("https://example2.test:80/", ("https", "example2.test", 80, "/")),
        ("http://example2.test", ("http", "example2.test", 80, None)),
        ("grpc://g.test:9000", ("grpc", "g.test", 9000, None)),
        ("http://h.test/a/b?q=1#f", ("http", "h.test", 80, "/a/b")),
    ],
)
def test_url_shorthand(url: str, expected: tuple) -> None:
    """The write-only url is parsed into protocol, host, port and path as Kong does."""
    row = insert(SERVICES, {"url": url})
    assert (row["protocol"], row["host"], row["port"], row["path"]) == expected
    assert "url" not in row


@pytest.mark.parametrize(
    "url, fields",
    [
        ("", {"url": "length must be at least 1"}),
        (" ", {"host": "required field missing", "path": "should start with: /"}),
        ("invalid url", {"host": "required field missing", "path": "should start with: /"}),
        (5, {"url": "expected a string"}),
    ],
)
def test_url_shorthand_errors(url: Any, fields: dict) -> None:
    """Empty or invalid urls are 400s with Kong's field errors."""
    assert fields_of(SERVICES, {"url": url}) == fields


def test_parse_url_parts() -> None:
    """LuaSocket-style parsing: userinfo dropped, IPv6 brackets removed."""
    assert parse_url("http://u:p@[::1]:8080/x") == {
        "scheme": "http",
        "authority": "u:p@[::1]:8080",
        "path": "/x",
        "port": "8080",
        "host": "::1",
    }


@pytest.mark.parametrize(
    "data, fields",
    [
        ({}, {"host": "required field missing"}),
        ({"host": "example.test", "protocol": "foo"}, {"protocol": PROTOCOLS_ERR}),
        ({"host": "x", "port": "80"}, {"port": "expected an integer"}),
        ({"host": "x", "port": 70000}, {"port": "value should be between 0 and 65535"}),
        ({"host": "x", "retries": 40000}, {"retries": "value should be between 0 and 32767"}),
        ({"host": "x", "connect_timeout": 0}, {"connect_timeout": "value should be between 1 and 2147483646"}),
        ({"host": "x", "enabled": "yes"}, {"enabled": "expected a boolean"}),
        ({"host": "x", "name": "a b"}, {"name": "invalid value 'a b': the only accepted ascii characters are alphanumerics or ., -, _, and ~"}),
        ({"host": "x", "name": ""}, {"name": "length must be at least 1"}),
        ({"host": "x:80"}, {"host": "must not have a port"}),
        ({"host": "a b"}, {"host": "invalid value: a b"}),
        ({"host": "x", "path": "a"}, {"path": "should start with: /"}),
        ({"host": "x", "path": "/a//b"}, {"path": "must not have empty segments"}),
        ({"host": "x", "path": "/a b"}, {"path": "invalid path: '/a b' (characters outside of the reserved list of RFC 3986 found)"}),
        ({"host": "x", "path": "/a%zz"}, {"path": "invalid url-encoded value: '%zz'"}),
        ({"host": "x", "tags": ["a,b"]}, {"tags": ["invalid tag 'a,b': expected printable ascii (except `,` and `/`) or valid utf-8 sequences"]}),
        ({"host": "x", "tags": "a"}, {"tags": "expected a set"}),
        ({"host": "x", "foo": 1}, {"foo": "unknown field"}),
        ({"host": None, "config": "x", "name": "correlation-id"}, {"host": "required field missing", "config": "unknown field"}),
        (
            {"host": "x", "tls_verify": True},
            {"tls_verify": "value must be null", "@entity": ["failed conditional validation given value of field 'protocol'"]},
        ),
        (
            {"host": "x", "protocol": "tcp", "path": "/a"},
            {"path": "value must be null", "@entity": ["failed conditional validation given value of field 'protocol'"]},
        ),
        ({"host": "x", "protocol": "https", "tls_verify_depth": 65}, {"tls_verify_depth": "value should be between 0 and 64"}),
        ({"host": "x", "protocol": "https", "ca_certificates": ["nope"]}, {"ca_certificates": ["expected a valid UUID"]}),
        ({"host": "x", "protocol": "https", "client_certificate": {"id": "nope"}}, {"client_certificate": {"id": "expected a valid UUID"}}),
    ],
)
def test_service_errors(data: dict, fields: dict) -> None:
    """Every service error string matches Kong's."""
    assert fields_of(SERVICES, data) == fields


def test_service_https_fields_allowed_for_https() -> None:
    """tls_verify, tls_verify_depth and ca_certificates are accepted when protocol is https."""
    row = insert(SERVICES, {"host": "x", "protocol": "https", "tls_verify": True, "tls_verify_depth": 3, "ca_certificates": [OTHER]})
    assert (row["tls_verify"], row["tls_verify_depth"], row["ca_certificates"]) == (True, 3, [OTHER])


def test_route_defaults() -> None:
    """A route with paths only gets Kong's defaults."""
    row = insert(ROUTES, {"paths": ["/a"]})
    assert row == {
        "id": ID,
        "created_at": 1700000000,
        "updated_at": 1700000000,
        "name": None,
        "protocols": ["http", "https"],
        "https_redirect_status_code": 426,
        "strip_path": True,
        "preserve_host": False,
        "request_buffering": True,
        "response_buffering": True,
        "tags": None,
        "service": None,
        "snis": None,
        "sources": None,
        "destinations": None,
        "methods": None,
        "hosts": None,
        "paths": ["/a"],
        "headers": None,
        "regex_priority": 0,
        "path_handling": "v0",
    }


MUST_SET_HTTPS = "must set one of 'methods', 'hosts', 'headers', 'paths', 'snis' when 'protocols' is 'https'"
STREAM = "'protocols' is 'tcp', 'tls', 'tls_passthrough' or 'udp'"


@pytest.mark.parametrize(
    "data, fields",
    [
        ({}, {"@entity": [MUST_SET_HTTPS]}),
        ({"protocols": ["https"]}, {"@entity": [MUST_SET_HTTPS]}),
        ({"protocols": ["http"]}, {"@entity": ["must set one of 'methods', 'hosts', 'headers', 'paths' when 'protocols' is 'http'"]}),
        ({"methods": ["GET"], "protocols": ["foo", "http"]}, {"protocols": [PROTOCOLS_ERR]}),
        ({"methods": ["GET"], "protocols": ["http", "foo"]}, {"protocols": [None, PROTOCOLS_ERR]}),
        (
            {"methods": ["GET"], "protocols": ["foo", "http"], "service": {"protocol": "foo"}},
            {"protocols": [PROTOCOLS_ERR], "service": {"protocol": PROTOCOLS_ERR}},
        ),
        ({"methods": ["GET"], "service": {"protocol": "http"}}, {"service": {"id": "missing primary key"}}),
        ({"methods": ["GET"], "service": {"name": None}}, {"service": {"id": "missing primary key"}}),
        ({"methods": ["GET"], "service": {"id": "x"}}, {"service": {"id": "expected a valid UUID"}}),
        ({"protocols": ["foo"]}, {"protocols": "unknown type: foo"}),
        ({"protocols": [], "paths": ["/"]}, {"protocols": "length must be at least 1"}),
        ({"protocols": None}, {"protocols": "required field missing"}),
        ({"protocols": ["http", "tcp"], "paths": ["/"]}, {"protocols": "these sets are mutually exclusive: ('http', 'https'), ('tcp', 'tls', 'udp')"}),
        ({"methods": ["get"]}, {"methods": ["invalid value: get"]}),
        ({"paths": ["a"]}, {"paths": ["should start with: / (fixed path) or ~/ (regex path)"]}),
        ({"paths": ["/a//b"]}, {"paths": ["must not have empty segments"]}),
        ({"paths": ["/a/../b"]}, {"paths": ["non-normalized path, consider use '/b' instead"]}),
        ({"paths": ["/%7Efoo"]}, {"paths": ["non-normalized path, consider use '/~foo' instead"]}),
        ({"paths": ["/a%zz"]}, {"paths": ["invalid url-encoded value: '%zz'"]}),
        ({"hosts": ["*.a.*"]}, {"hosts": ["invalid wildcard: must have at most one wildcard"]}),
        ({"hosts": ["a.*.b"]}, {"hosts": ["invalid wildcard: must be placed at leftmost or rightmost label"]}),
        ({"hosts": ["a b"]}, {"hosts": ["invalid hostname: a b"]}),
        ({"headers": {"Host": ["x"]}}, {"headers": "cannot contain 'host' header, which must be specified in the 'hosts' attribute"}),
        ({"headers": {"a b": ["x"]}}, {"headers": "bad header name 'a b', allowed characters are A-Z, a-z, 0-9, '_', and '-'"}),
        ({"headers": {"x": "y"}}, {"headers": "expected an array"}),
        (
            {"paths": ["/"], "snis": ["x.test"], "protocols": ["http"]},
            {"snis": "length must be 0", "@entity": ["'snis' can only be set when 'protocols' is 'grpcs', 'https', 'tls' or 'tls_passthrough'"]},
        ),
        ({"paths": ["/"], "sources": [{"ip": "1.2.3.4"}]}, {"sources": "cannot set 'sources' when 'protocols' is 'http' or 'https'"}),
        (
            {"protocols": ["tcp"], "paths": ["/x"]},
            {"paths": "cannot set 'paths' when " + STREAM, "@entity": ["must set one of 'sources', 'destinations', 'snis' when 'protocols' is 'tcp', 'tls' or 'udp'"]},
        ),
        ({"protocols": ["tls_passthrough"]}, {"@entity": ["must set snis when 'protocols' is 'tls_passthrough'"]}),
        ({"protocols": ["grpc"], "paths": ["/x"], "strip_path": True}, {"strip_path": "cannot set 'strip_path' when 'protocols' is 'grpc' or 'grpcs'"}),
        ({"protocols": ["grpc"], "methods": ["GET"]}, {"methods": "cannot set 'methods' when 'protocols' is 'grpc' or 'grpcs'", "@entity": ["must set one of 'hosts', 'headers', 'paths' when 'protocols' is 'grpc'"]}),
        ({"protocols": ["tcp"], "sources": [{}]}, {"sources": [{"@entity": ["at least one of these fields must be non-empty: 'ip', 'port'"]}]}),
        ({"protocols": ["tcp"], "sources": [{"ip": "nope"}]}, {"sources": [{"ip": "invalid ip or cidr range: 'nope'"}]}),
        ({"paths": ["/"], "https_redirect_status_code": 200}, {"https_redirect_status_code": "expected one of: 426, 301, 302, 307, 308"}),
        ({"paths": ["/"], "path_handling": "v2"}, {"path_handling": "expected one of: v0, v1"}),
    ],
)
def test_route_errors(data: dict, fields: dict) -> None:
    """Every route error string and entity check matches Kong's."""
    assert fields_of(ROUTES, data) == fields


@pytest.mark.parametrize(
    "data, check",
    [
        ({"protocols": ["grpc", "grpcs"], "hosts": ["g.test"]}, ("strip_path", False)),
        ({"protocols": ["tcp"], "destinations": [{"port": 80}]}, ("protocols", ["tcp"])),
        ({"protocols": ["tls_passthrough"], "snis": ["*.x.test"]}, ("snis", ["*.x.test"])),
        ({"hosts": ["*.x.test", "x.*", "h.test:8080"]}, ("hosts", ["*.x.test", "x.*", "h.test:8080"])),
        ({"paths": ["~/api/(?<v>\\d+)"]}, ("regex_priority", 0)),
        ({"methods": ["GET", "GET", "POST"]}, ("methods", ["GET", "POST"])),
        ({"headers": {"x-foo": ["a", "b"]}}, ("headers", {"x-foo": ["a", "b"]})),
        ({"paths": {}, "hosts": ["h"]}, ("paths", [])),
    ],
)
def test_route_accepts(data: dict, check: tuple) -> None:
    """Valid route shapes pass (grpc defaults strip_path to false, sets lose duplicates)."""
    row = insert(ROUTES, data)
    assert row[check[0]] == check[1]


def test_update_merges_and_rechecks() -> None:
    """PATCH merges over the existing row, bumps updated_at and re-runs checks."""
    row = insert(ROUTES, {"paths": ["/a"], "name": "r"})
    updated = ROUTES.validate_update(row, {"hosts": ["h.test"]}, now=1700000100)
    assert updated["paths"] == ["/a"] and updated["hosts"] == ["h.test"]
    assert updated["created_at"] == 1700000000 and updated["updated_at"] == 1700000100
    with pytest.raises(SchemaViolation) as info:
        ROUTES.validate_update(row, {"paths": None}, now=1)
    assert info.value.fields == {"@entity": ["must set one of 'methods', 'hosts', 'headers', 'paths', 'snis' when 'protocols' is 'https'"]}
    with pytest.raises(SchemaViolation) as info:
        ROUTES.validate_update(row, {"id": OTHER}, now=1)
    assert info.value.fields == {"id": "immutable field cannot be updated"}
    with pytest.raises(SchemaViolation) as info:
        ROUTES.validate_update(row, {"strip_path": None}, now=1)
    assert info.value.fields == {"strip_path": "required field missing"}


def test_update_with_url() -> None:
    """PATCH url=http://example.test:443 keeps http and port 443, path null."""
    row = insert(SERVICES, {"host": "a.test", "path": "/p"})
    updated = SERVICES.validate_update(row, {"url": "http://example.test:443"}, now=2)
    assert (updated["protocol"], updated["host"], updated["port"], updated["path"]) == ("http", "example.test", 443, None)


def test_replace_resets_omitted_fields() -> None:
    """PUT replaces the whole entity: omitted fields go back to defaults or null."""
    row = insert(ROUTES, {"paths": ["/a"], "hosts": ["h"], "methods": ["GET"], "strip_path": False})
    replaced = ROUTES.validate_replace({"paths": ["/b"]}, now=5, id=row["id"], created_at=row["created_at"])
    assert replaced["hosts"] is None and replaced["methods"] is None
    assert replaced["strip_path"] is True and replaced["paths"] == ["/b"]
    assert (replaced["id"], replaced["created_at"], replaced["updated_at"]) == (ID, 1700000000, 5)


def test_not_an_object() -> None:
    """A body that is not a JSON object is a schema violation, not a crash."""
    assert fields_of(SERVICES, ["x"]) == {"@entity": ["expected a record"]}


def test_store_metas() -> None:
    """Store metadata: unique names, routes.service restricts deletes; unknown targets left out."""
    metas = store_metas()
    assert metas["services"].unique == ("name",)
    assert dict(metas["services"].foreign) == {}
    assert metas["routes"].foreign["service"].entity == "services"
    assert metas["routes"].foreign["service"].on_delete == "restrict"
