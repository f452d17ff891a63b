"""Admin body decoding: Kong's form key syntax, coercion by field type, content types."""

from __future__ import annotations

from typing import Any

import pytest

from kongtx import errors
from kongtx.admin.body import decode_body, nest_pairs, parse_form_pairs, split_key
from kongtx.schema import ENTITIES

ROUTES = ENTITIES["routes"]
SERVICES = ENTITIES["services"]


@pytest.mark.parametrize(
    "key, segments",
    [
        ("name", ["name"]),
        ("paths[]", ["paths", None]),
        ("paths[2]", ["paths", 2]),
        ("service.name", ["service", "name"]),
        ("config.minute", ["config", "minute"]),
        ("headers.x-foo[]", ["headers", "x-foo", None]),
        ("config.headers[name]", ["config", "headers", "name"]),
        (".weird", [".weird"]),
    ],
)
def test_split_key(key: str, segments: list) -> None:
    """Dotted records, [] appends, [N] indexes and [name] map keys."""
    assert split_key(key) == segments


@pytest.mark.parametrize(
    "body, entity, expected",
    [
        (b"paths[]=/a&paths[]=/b", ROUTES, {"paths": ["/a", "/b"]}),
        (b"paths[2]=/b&paths[1]=/a", ROUTES, {"paths": ["/a", "/b"]}),
        (b"paths=/a", ROUTES, {"paths": ["/a"]}),
        (b"hosts=a&hosts=b", ROUTES, {"hosts": ["a", "b"]}),
        (b"service.name=x", ROUTES, {"service": {"name": "x"}}),
        (b"service.id=9748f662-7711-4a90-8186-dc02f10eb0f5", ROUTES, {"service": {"id": "9748f662-7711-4a90-8186-dc02f10eb0f5"}}),
        (b"headers.x-foo[]=bar&headers.x-foo[]=baz", ROUTES, {"headers": {"x-foo": ["bar", "baz"]}}),
        (b"headers.x-foo=bar", ROUTES, {"headers": {"x-foo": ["bar"]}}),
        (b"strip_path=false&preserve_host=true", ROUTES, {"strip_path": False, "preserve_host": True}),
        (b"regex_priority=10", ROUTES, {"regex_priority": 10}),
        (b"regex_priority=1.5", ROUTES, {"regex_priority": 1.5}),
        (b"regex_priority=abc", ROUTES, {"regex_priority": "abc"}),
        (b"name=", ROUTES, {"name": None}),
        (b"port=80&retries=3&host=h", SERVICES, {"port": 80, "retries": 3, "host": "h"}),
        (b"url=http://x.test/", SERVICES, {"url": "http://x.test/"}),
        (b"unknown=1", SERVICES, {"unknown": "1"}),
        (b"", SERVICES, {}),
    ],
)
def test_form_decoding(body: bytes, entity: Any, expected: dict) -> None:
    """Form values are nested by key syntax and coerced by the entity's field types."""
    assert decode_body(b"POST", [b"application/x-www-form-urlencoded"], body, entity) == expected


def test_multipart_decoding() -> None:
    """multipart/form-data fields use the same key syntax and coercion."""
    body = (
        b"--b\r\nContent-Disposition: form-data; name=\"paths[]\"\r\n\r\n/a\r\n"
        b"--b\r\nContent-Disposition: form-data; name=\"strip_path\"\r\n\r\nfalse\r\n"
        b"--b--\r\n"
    )
    decoded = decode_body(b"POST", [b"multipart/form-data; boundary=b"], body, ROUTES)
    assert decoded == {"paths": ["/a"], "strip_path": False}


def test_json_is_not_coerced() -> None:
    """JSON strings stay strings (the schema then reports 'expected an integer')."""
    assert decode_body(b"POST", [b"application/json"], b'{"port":"80"}', SERVICES) == {"port": "80"}


@pytest.mark.parametrize(
    "method, content_types, body, expected",
    [
        (b"POST", None, b"", {}),
        (b"POST", [b"application/json"], b"", {}),
        (b"POST", [b"application/json; charset=utf-8"], b"  ", {}),
        (b"GET", [b"text/plain"], b"whatever", {}),
        (b"PATCH", [b"Application/JSON"], b'{"a":1}', {"a": 1}),
    ],
)
def test_accepted_bodies(method: bytes, content_types: Any, body: bytes, expected: Any) -> None:
    """Empty bodies are an empty object; bodies on GET are ignored."""
    assert decode_body(method, content_types, body, SERVICES) == expected


@pytest.mark.parametrize(
    "content_types, body, error, message",
    [
        ([b"application/json"], b'{"hello": "world"', errors.BadRequest, "Cannot parse JSON body"),
        ([b"invalid"], b'{"hello": "world"}', errors.UnsupportedMediaType, "Unsupported Media Type"),
        (None, b"invalid", errors.UnsupportedMediaType, "Unsupported Media Type"),
        ([b"application/json", b"application/json"], b"{}", errors.BadRequest, "Multiple Content-Type headers not allowed"),
    ],
)
def test_rejected_bodies(content_types: Any, body: bytes, error: type, message: str) -> None:
    """Bad JSON is 400, unknown or missing content types with a body are 415."""
    with pytest.raises(error) as info:
        decode_body(b"POST", content_types, body, SERVICES)
    assert info.value.body() == {"message": message}


def test_nest_pairs_keeps_blank_values() -> None:
    """Blank form values survive parsing (they become null later)."""
    assert nest_pairs(parse_form_pairs(b"a=&b=1")) == {"a": "", "b": "1"}
