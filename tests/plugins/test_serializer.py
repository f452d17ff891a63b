"""Unit tests of Kong's JSON log record (``kongtx.logging.serializer``), on an
in-memory request: shape, redaction, latencies, source, sizes."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace
from typing import Any, Dict

import pytest
from twisted.web.http_headers import Headers

from kongtx.logging import serializer
from kongtx.pdk import Kong

ROUTE = {"id": "r-1", "name": "logged", "paths": ["/log"]}
SERVICE = {"id": "s-1", "name": "echo", "host": "127.0.0.1", "port": 9000}
CONSUMER = {"id": "c-1", "username": "alice"}
CREDENTIAL = {"id": "k-1", "consumer": {"id": "c-1"}, "key": "secret-key"}


class FakeRequest:
    """What the serializer reads of a finished twisted.web request."""

    def __init__(self, uri: str = "/log/x?a=1", headers: Any = (), body: bytes = b"",
                 secure: bool = False) -> None:
        self.method = b"GET"
        self.uri = uri.encode()
        self.path = uri.split("?")[0].encode()
        self.clientproto = b"HTTP/1.1"
        self.requestHeaders = Headers()
        for name, value in headers:
            self.requestHeaders.addRawHeader(name.encode(), value.encode())
        self.responseHeaders = Headers({b"Content-Type": [b"text/plain"]})
        self.content = io.BytesIO(body)
        self.stream = None
        self.code = 200
        self.code_message = b"OK"
        self.sentLength = 5
        self.exchange: Any = None
        self._secure = secure

    def isSecure(self) -> bool:
        return self._secure

    def getHost(self) -> Any:
        return SimpleNamespace(host="127.0.0.1", port=8000)


class FakePeer:
    remote = "10.0.0.1"
    trusted = False


def _kong(request: FakeRequest, key_auth: bool = False, started: float = 100.0) -> Kong:
    access = ()
    if key_auth:
        access = (SimpleNamespace(name="key-auth",
                                  handler=SimpleNamespace(config={"key_names": ["apikey"]})),)
    index = SimpleNamespace(routes={"r-1": ROUTE}, services={"s-1": SERVICE})
    return Kong(request, peer=FakePeer(), scheme="http", path=request.path.decode(),
                request_id="req-1", index=index, chain=SimpleNamespace(access=access),
                route_id="r-1", service_id="s-1", started=started)


def _proxied(request: FakeRequest, tries: int = 1) -> None:
    """Pretend the request went upstream: sent at t=100.010, headers at t=100.050."""
    request.exchange = SimpleNamespace(
        started=100.0, sent_at=100.010, tries=tries,
        service=SimpleNamespace(host="127.0.0.1", port=9000),
        args={"target": b"/x?a=1"})


def test_proxied_record_has_kongs_shape() -> None:
    """A proxied request: every top-level key of Kong's record, latencies split into
    kong/proxy/request/receive, ``source`` = ``service``, ``started_at`` in ms."""
    request = FakeRequest(headers=[("Host", "example.com"), ("X-A", "1"), ("X-A", "2")])
    kong = _kong(request)
    _proxied(request)
    serializer.note_upstream(kong, 100.050)
    request.exchange = None  # finished: the exchange is gone
    record = serializer.serialize(kong, now=100.080, wall=2000.0)
    assert set(record) == {
        "request", "upstream_uri", "upstream_status", "response", "latencies", "tries",
        "route", "service", "client_ip", "started_at", "source"}
    assert record["request"]["id"] == "req-1"
    assert record["request"]["uri"] == "/log/x?a=1"
    assert record["request"]["url"] == "http://example.com:8000/log/x?a=1"
    assert record["request"]["querystring"] == {"a": "1"}
    assert record["request"]["method"] == "GET"
    assert record["request"]["headers"] == {"host": "example.com", "x-a": ["1", "2"]}
    assert "tls" not in record["request"]
    assert record["upstream_uri"] == "/x?a=1"
    assert record["upstream_status"] == "200"
    assert record["response"]["status"] == 200
    assert record["response"]["headers"] == {"content-type": "text/plain"}
    assert record["latencies"] == {"kong": 40, "proxy": 40, "request": 80, "receive": 30}
    assert record["tries"] == [{"ip": "127.0.0.1", "port": 9000,
                                "balancer_start": 1999930, "balancer_latency": 0}]
    assert record["route"] == ROUTE and record["service"] == SERVICE
    assert record["client_ip"] == "10.0.0.1"
    assert record["started_at"] == 1999920
    assert record["source"] == "service"
    json.dumps(record)


def test_exit_record_has_no_proxy_latency() -> None:
    """A ``kong.response.exit`` answer: proxy latency -1, no upstream_status,
    ``upstream_uri`` empty, ``source`` = ``exit``; header_filter records nothing."""
    request = FakeRequest()
    request.code = 401
    kong = _kong(request)
    kong.exited = (401, {"message": "Unauthorized"}, {})
    serializer.note_upstream(kong, 100.002)
    record = serializer.serialize(kong, now=100.005, wall=50.0)
    assert record["latencies"] == {"kong": 5, "proxy": -1, "request": 5, "receive": 0}
    assert "upstream_status" not in record
    assert record["upstream_uri"] == ""
    assert record["tries"] == []
    assert record["source"] == "exit"
    assert record["response"]["status"] == 401


def test_error_source_when_nothing_answered() -> None:
    """A Kong-produced error (no exit, nothing proxied) has ``source`` = ``error``."""
    request = FakeRequest()
    request.code = 502
    record = serializer.serialize(_kong(request), now=100.0, wall=1.0)
    assert record["source"] == "error"


def test_failed_tries_are_marked() -> None:
    """With retries, the earlier tries are ``state = failed``, the last is not."""
    request = FakeRequest()
    kong = _kong(request)
    _proxied(request, tries=3)
    serializer.note_upstream(kong, 100.050)
    tries = serializer.serialize(kong, now=100.1, wall=1.0)["tries"]
    assert [t.get("state") for t in tries] == ["failed", "failed", None]


@pytest.mark.parametrize("headers,expected", [
    ([("Authorization", "Basic xyz")], {"authorization": "REDACTED"}),
    ([("Proxy-Authorization", "Basic xyz")], {"proxy-authorization": "REDACTED"}),
    ([("X-Other", "visible")], {"x-other": "visible"}),
])
def test_authorization_headers_are_redacted(headers: Any, expected: Dict[str, str]) -> None:
    """``Authorization`` and ``Proxy-Authorization`` are logged as ``REDACTED``."""
    record = serializer.serialize(_kong(FakeRequest(headers=headers)), now=100.0, wall=1.0)
    assert record["request"]["headers"] == expected


@pytest.mark.parametrize("uri,key_auth,query,logged_uri", [
    ("/log?apikey=s3cret&a=1", True, {"apikey": "REDACTED", "a": "1"},
     "/log?apikey=REDACTED&a=1"),
    ("/log?APIKEY=s3cret", True, {"APIKEY": "REDACTED"}, "/log?APIKEY=REDACTED"),
    ("/log?apikey=s3cret", False, {"apikey": "s3cret"}, "/log?apikey=s3cret"),
    ("/log?flag&b=%20x", True, {"flag": True, "b": " x"}, "/log?flag&b=%20x"),
    ("/log?a=1&a=2", True, {"a": ["1", "2"]}, "/log?a=1&a=2"),
])
def test_key_auth_key_is_redacted(uri: str, key_auth: bool, query: Dict[str, Any],
                                  logged_uri: str) -> None:
    """When key-auth runs on the route, its ``key_names`` are redacted in the query
    string and the uri (and a header of that name); otherwise the query is as sent."""
    request = FakeRequest(uri=uri, headers=[("apikey", "s3cret")])
    record = serializer.serialize(_kong(request, key_auth=key_auth), now=100.0, wall=1.0)
    assert record["request"]["querystring"] == query
    assert record["request"]["uri"] == logged_uri
    if key_auth:
        assert record["request"]["headers"]["apikey"] == "REDACTED"


def test_remembered_header_values_never_outlive_their_meaning() -> None:
    """Header texts are remembered per value: a key logged in the clear where
    key-auth does not run is still redacted where it does, and values past the
    remembered ones are logged as they are."""
    plain = FakeRequest(headers=[("apikey", "s3cret"), ("X-Id", "0")])
    assert serializer.serialize(_kong(plain), now=100.0, wall=1.0)["request"]["headers"] == {
        "apikey": "s3cret", "x-id": "0"}
    keyed = FakeRequest(headers=[("apikey", "s3cret")])
    assert serializer.serialize(_kong(keyed, key_auth=True), now=100.0, wall=1.0)[
        "request"]["headers"] == {"apikey": "REDACTED"}
    for i in range(serializer._MAX_VALUES * 2):
        request = FakeRequest(headers=[("X-Id", str(i)), ("X-Id", "again")])
        request.requestHeaders.setRawHeaders(b"X-Single", [b"v%d" % i])
        headers = serializer.serialize(_kong(request), now=100.0, wall=1.0)["request"]["headers"]
        assert headers == {"x-id": [str(i), "again"], "x-single": "v%d" % i}


def test_authenticated_consumer() -> None:
    """An authenticated request logs ``consumer`` and ``authenticated_entity``
    {id, consumer_id} (the credential's key itself is not logged)."""
    kong = _kong(FakeRequest())
    kong.consumer = CONSUMER
    kong.credential = CREDENTIAL
    record = serializer.serialize(kong, now=100.0, wall=1.0)
    assert record["consumer"] == CONSUMER
    assert record["authenticated_entity"] == {"id": "k-1", "consumer_id": "c-1"}
    assert "secret-key" not in json.dumps(record)


def test_sizes_count_head_and_body() -> None:
    """``request.size`` counts the request line, headers and body; ``response.size``
    the status line, headers and body bytes written."""
    request = FakeRequest(uri="/a", headers=[("Host", "h")], body=b"12345")
    record = serializer.serialize(_kong(request), now=100.0, wall=1.0)
    assert record["request"]["size"] == len(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n12345")
    assert record["response"]["size"] == len(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n12345")


def test_tls_is_logged_for_https() -> None:
    """Over TLS, ``request.tls`` is present with ``client_verify`` = ``NONE``."""
    request = FakeRequest(secure=True)
    request.channel = SimpleNamespace(transport=SimpleNamespace(getHandle=lambda: SimpleNamespace(
        get_protocol_version_name=lambda: "TLSv1.3",
        get_cipher_name=lambda: "TLS_AES_256_GCM_SHA384")))
    record = serializer.serialize(_kong(request), now=100.0, wall=1.0)
    assert record["request"]["tls"] == {"version": "TLSv1.3",
                                        "cipher": "TLS_AES_256_GCM_SHA384",
                                        "client_verify": "NONE"}


# -- JSON text -------------------------------------------------------------------------


def test_encode_is_the_records_json() -> None:
    """``encode`` gives the same JSON value as ``json.dumps(record, default=str)``, with
    or without route and service, and for values JSON cannot hold."""
    request = FakeRequest(headers=[("Host", "example.com")])
    kong = _kong(request)
    _proxied(request)
    serializer.note_upstream(kong, 100.050)
    record = serializer.serialize(kong, now=100.080, wall=2000.0)
    record["odd"] = object()
    assert json.loads(serializer.encode(record)) == json.loads(json.dumps(record, default=str))
    record["route"] = None
    assert json.loads(serializer.encode(record))["route"] is None
    assert json.loads(serializer.encode({"route": ROUTE, "service": SERVICE})) == {
        "route": ROUTE, "service": SERVICE}
    assert json.loads(serializer.encode({"a": 1})) == {"a": 1}


def test_encode_follows_a_new_row() -> None:
    """A route row's text is reused while the row is the same object; a new row (a new
    configuration) is encoded afresh."""
    first = serializer.encode({"route": ROUTE, "service": SERVICE})
    assert serializer.encode({"route": ROUTE, "service": SERVICE}) == first
    renamed = dict(ROUTE, name="renamed")
    assert json.loads(serializer.encode({"route": renamed, "service": SERVICE}))[
        "route"]["name"] == "renamed"


@pytest.mark.parametrize("case", ["proxied", "retried", "exit", "error", "key-auth", "tls"])
def test_json_text_is_compact_json_of_the_record(case: str) -> None:
    """``serialize_json`` writes the record's text directly; it is exactly the compact
    JSON (``ensure_ascii``) of the record it parses to, with route and service last,
    whatever the request: proxied (once or with failed tries), answered by a plugin,
    failed, authenticated with its key redacted, over TLS; non-ASCII and quotes in
    header values are escaped as ``json.dumps`` escapes them."""
    headers = [("Host", "example.com"), ("X-A", "1"), ("X-A", "2"),
               ("X-Quote", 'say "hi" \\ caf\xe9'), ("apikey", "secret-key")]
    request = FakeRequest(uri="/log/x?a=1&apikey=secret-key&b", headers=headers,
                          body=b"body", secure=case == "tls")
    if case == "tls":
        request.channel = SimpleNamespace(transport=SimpleNamespace(getHandle=lambda: SimpleNamespace(
            get_protocol_version_name=lambda: "TLSv1.3", get_cipher_name=lambda: "X")))
    kong = _kong(request, key_auth=case == "key-auth")
    if case in ("proxied", "retried", "key-auth", "tls"):
        _proxied(request, tries=3 if case == "retried" else 1)
        serializer.note_upstream(kong, 100.050)
    elif case == "exit":
        request.code = 401
        kong.exited = (401, {"message": "Unauthorized"}, {})
    if case == "key-auth":
        kong.consumer = CONSUMER
        kong.credential = CREDENTIAL
    text = serializer.serialize_json(kong, now=100.080, wall=2000.0)
    record = json.loads(text)
    assert text == serializer.encode(record)
    rest = {k: v for k, v in record.items() if k not in ("route", "service")}
    assert text == json.dumps(dict(rest, route=ROUTE, service=SERVICE), separators=(",", ":"))
    assert record == serializer.serialize(kong, now=100.080, wall=2000.0)
    # (the fake request holds the value UTF-8 encoded; header bytes are logged as Latin-1)
    assert record["request"]["headers"]["x-quote"] == 'say "hi" \\ caf\xe9'.encode().decode("latin-1")
    assert ("secret-key" in text) is (case != "key-auth")
