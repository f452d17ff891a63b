"""syslog, file-log and http-log end to end: plugins configured through the Admin API,
real requests through a kongtx node to an echo upstream, and the records read where
each plugin sends them (a unix datagram socket, a file, an HTTP receiver), all on
loopback."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet import protocol, task
from twisted.web import resource, server

from kongtx.plugins import file_log, syslog

KEY = "log-key-1"


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    waited = 0.0
    while not predicate():
        assert waited < timeout, "condition not met in %ss" % timeout
        await _sleep(0.02)
        waited += 0.02


async def _route(client, node, upstream, path: str, plugin: Dict[str, Any],
                 key_auth: bool = False) -> Dict[str, Any]:
    """A service, a route on *path* with *plugin* (and key-auth, with alice's key KEY)."""
    r = await client.request("GET", node.admin + "/services/echo")
    if r.code == 404:
        r = await client.request("POST", node.admin + "/services",
                                 form={"name": "echo", "url": upstream.url})
        assert r.code == 201, r.body
    r = await client.request("POST", node.admin + "/services/echo/routes",
                             form={"paths[]": path})
    assert r.code == 201, r.body
    route = r.json()
    r = await client.request("POST", node.admin + "/routes/%s/plugins" % route["id"],
                             json_body=plugin)
    assert r.code == 201, r.body
    if key_auth:
        r = await client.request("POST", node.admin + "/routes/%s/plugins" % route["id"],
                                 json_body={"name": "key-auth"})
        assert r.code == 201, r.body
        r = await client.request("POST", node.admin + "/consumers",
                                 form={"username": "alice"})
        assert r.code == 201, r.body
        r = await client.request("POST", node.admin + "/consumers/alice/key-auth",
                                 form={"key": KEY})
        assert r.code == 201, r.body
    return route


class _Datagrams(protocol.DatagramProtocol):
    def __init__(self) -> None:
        self.received: List[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received.append(data)


@pytest.fixture
def syslog_socket(monkeypatch):
    """A unix datagram socket standing in for /dev/log."""
    from twisted.internet import reactor

    tmp = tempfile.mkdtemp(prefix="kongtx-syslog-", dir="/tmp")
    address = os.path.join(tmp, "log.sock")
    receiver = _Datagrams()
    port = reactor.listenUNIXDatagram(address, receiver)
    monkeypatch.setattr(syslog, "SYSLOG_ADDRESS", address)
    yield receiver
    port.stopListening()
    shutil.rmtree(tmp, ignore_errors=True)


def _syslog_body(datagram: bytes):
    head, _, body = datagram.decode("utf-8").partition(" kong: ")
    assert head.startswith("<")
    return int(head[1:head.index(">")]), json.loads(body)


@pytest_twisted.ensureDeferred
async def test_syslog_sends_one_record_per_request(node, client, upstream, syslog_socket):
    """A proxied request sends one datagram ``<PRI>... kong: {json}`` with the facility
    and the severity chosen by status; the record names the route, service, consumer
    and upstream; the key and Authorization are redacted."""
    route = await _route(client, node, upstream, "/sl", {
        "name": "syslog",
        "config": {"successful_severity": "notice", "client_errors_severity": "warning",
                   "facility": "local0", "log_level": "debug"},
    }, key_auth=True)
    r = await client.request("GET", node.proxy + "/sl/x?apikey=%s&a=1" % KEY,
                             headers={"Authorization": "Basic secret"})
    assert r.code == 200
    await _until(lambda: len(syslog_socket.received) == 1)
    pri, record = _syslog_body(syslog_socket.received[0])
    assert pri == 16 * 8 + 5
    assert record["route"]["id"] == route["id"]
    assert record["service"]["name"] == "echo"
    assert record["consumer"]["username"] == "alice"
    assert record["authenticated_entity"]["consumer_id"] == record["consumer"]["id"]
    assert record["request"]["querystring"] == {"apikey": "REDACTED", "a": "1"}
    assert record["request"]["uri"] == "/sl/x?apikey=REDACTED&a=1"
    assert record["request"]["headers"]["authorization"] == "REDACTED"
    assert record["request"]["method"] == "GET"
    assert record["response"]["status"] == 200
    assert record["upstream_status"] == "200"
    assert record["upstream_uri"] == "/x?apikey=REDACTED&a=1"
    assert record["source"] == "service"
    assert record["latencies"]["proxy"] >= 0
    assert record["client_ip"] == "127.0.0.1"
    assert len(record["tries"]) == 1
    assert KEY not in syslog_socket.received[0].decode()

    r = await client.request("GET", node.proxy + "/sl/x")
    assert r.code == 401
    await _until(lambda: len(syslog_socket.received) == 2)
    pri, record = _syslog_body(syslog_socket.received[1])
    assert pri == 16 * 8 + 4
    assert record["source"] == "exit"
    assert record["latencies"]["proxy"] == -1
    assert "upstream_status" not in record


@pytest_twisted.ensureDeferred
async def test_syslog_log_level_filters(node, client, upstream, syslog_socket):
    """With ``log_level = err``, a 200 logged at ``info`` is not sent, and a 500
    logged at ``crit`` is."""
    await _route(client, node, upstream, "/slf", {
        "name": "syslog",
        "config": {"log_level": "err", "server_errors_severity": "crit"},
    })
    r = await client.request("GET", node.proxy + "/slf/ok")
    assert r.code == 200
    r = await client.request("GET", node.proxy + "/slf/status/500")
    assert r.code == 500
    await _until(lambda: len(syslog_socket.received) == 1)
    await _sleep(0.1)
    assert len(syslog_socket.received) == 1
    pri, record = _syslog_body(syslog_socket.received[0])
    assert pri == 1 * 8 + 2
    assert record["response"]["status"] == 500


@pytest_twisted.ensureDeferred
async def test_file_log_appends_one_line_per_request(node, client, upstream, tmp_path):
    """Each request appends one JSON line to ``path``; a bad path is refused with
    Kong's ``not a valid filename``."""
    path = str(tmp_path / "requests.log")
    r = await client.request("POST", node.admin + "/plugins",
                             json_body={"name": "file-log", "config": {"path": "/tmp/a*b"}})
    assert r.code == 400
    assert r.json()["fields"]["config"]["path"] == "not a valid filename"
    await _route(client, node, upstream, "/fl", {"name": "file-log", "config": {"path": path}})
    for i in range(3):
        r = await client.request("GET", node.proxy + "/fl/%d" % i)
        assert r.code == 200
    await _until(lambda: os.path.exists(path) and open(path).read().count("\n") == 3)
    lines = [json.loads(line) for line in open(path).read().splitlines()]
    assert [line["request"]["uri"] for line in lines] == ["/fl/0", "/fl/1", "/fl/2"]
    assert all(line["response"]["status"] == 200 for line in lines)
    assert all(line["response"]["size"] > 0 for line in lines)
    file_log.close_all()


class _Receiver(resource.Resource):
    """An http-log endpoint: records bodies; answers 500 to the first ``failures``."""

    isLeaf = True

    def __init__(self, failures: int = 0) -> None:
        resource.Resource.__init__(self)
        self.failures = failures
        self.bodies: List[Any] = []
        self.attempts = 0
        self.headers: List[Dict[str, str]] = []

    def render(self, request: server.Request) -> bytes:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            request.setResponseCode(500)
            return b"try later"
        self.headers.append({k.decode().lower(): vs[0].decode()
                             for k, vs in request.requestHeaders.getAllRawHeaders()})
        self.bodies.append(json.loads(request.content.read()))
        return b"ok"


@pytest.fixture
def receiver_factory():
    from twisted.internet import reactor

    ports = []

    def start(failures: int = 0):
        receiver = _Receiver(failures)
        port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
        ports.append(port)
        return receiver, "http://127.0.0.1:%d/logs" % port.getHost().port

    yield start
    for port in ports:
        port.stopListening()


@pytest_twisted.ensureDeferred
async def test_http_log_batches(node, client, upstream, receiver_factory):
    """With ``max_batch_size = 3``, three requests arrive as one JSON array, with the
    configured headers and Basic credentials from the URL."""
    receiver, url = receiver_factory()
    url = url.replace("http://", "http://user:pass@")
    await _route(client, node, upstream, "/hl", {
        "name": "http-log",
        "config": {"http_endpoint": url, "headers": {"X-Token": "t1"},
                   "queue": {"max_batch_size": 3, "max_coalescing_delay": 5}},
    })
    for i in range(3):
        r = await client.request("GET", node.proxy + "/hl/%d" % i)
        assert r.code == 200
    await _until(lambda: len(receiver.bodies) == 1)
    batch = receiver.bodies[0]
    assert isinstance(batch, list)
    assert sorted(entry["request"]["uri"] for entry in batch) == ["/hl/0", "/hl/1", "/hl/2"]
    assert receiver.headers[0]["x-token"] == "t1"
    assert receiver.headers[0]["authorization"] == "Basic dXNlcjpwYXNz"
    assert receiver.headers[0]["content-type"] == "application/json"


@pytest_twisted.ensureDeferred
async def test_http_log_retries_after_500(node, client, upstream, receiver_factory):
    """A 500 from the endpoint is retried (exponential backoff) until it succeeds; the
    proxied request is answered at once regardless; batch size 1 sends an object."""
    receiver, url = receiver_factory(failures=2)
    await _route(client, node, upstream, "/hr", {
        "name": "http-log",
        "config": {"http_endpoint": url, "queue": {"initial_retry_delay": 0.05}},
    })
    r = await client.request("GET", node.proxy + "/hr/once")
    assert r.code == 200
    await _until(lambda: len(receiver.bodies) == 1)
    assert receiver.attempts == 3
    assert receiver.bodies[0]["request"]["uri"] == "/hr/once"


@pytest_twisted.ensureDeferred
async def test_http_log_deprecated_shorthands(node, client, upstream, receiver_factory):
    """``queue_size`` and ``flush_timeout`` (deprecated) set the queue record."""
    _, url = receiver_factory()
    r = await client.request("POST", node.admin + "/plugins", json_body={
        "name": "http-log",
        "config": {"http_endpoint": url, "queue_size": 7, "flush_timeout": 3}})
    assert r.code == 201, r.body
    queue = r.json()["config"]["queue"]
    assert (queue["max_batch_size"], queue["max_coalescing_delay"]) == (7, 3)
    assert "queue_size" not in r.json()["config"]
