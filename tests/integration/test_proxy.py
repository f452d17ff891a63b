"""The proxy end to end: Admin API writes, then real requests through kongtx to a
real upstream, all over loopback sockets."""

from __future__ import annotations

import pytest_twisted

from kongtx import KONG_VERSION


async def _service_and_route(client, node, upstream, route_form=None, **service):
    form = {"name": "echo", "url": upstream.url}
    form.update(service)
    r = await client.request("POST", node.admin + "/services", form=form)
    assert r.code == 201, r.body
    r = await client.request("POST", node.admin + "/services/echo/routes",
                             form=route_form or {"paths[]": "/echo"})
    assert r.code == 201, r.body
    return r.json()


@pytest_twisted.ensureDeferred
async def test_no_route_is_kong_404(node, client):
    """With no matching route the proxy answers Kong's 404 body and Server header."""
    r = await client.request("GET", node.proxy + "/nothing")
    assert r.code == 404
    assert r.json()["message"] == "no Route matched with those values"
    assert r.header("server") == "kong/%s" % KONG_VERSION
    assert len(r.header("x-kong-request-id")) == 32


@pytest_twisted.ensureDeferred
async def test_route_and_service_proxy_with_kong_headers(node, client, upstream):
    """A service + route created through the Admin API is proxied on the next request,
    with Kong's response headers and X-Forwarded-* headers upstream."""
    await _service_and_route(client, node, upstream)
    r = await client.request("GET", node.proxy + "/echo/hello?b=2&a=1",
                             headers={"X-Forwarded-For": "10.0.0.1", "Via": "1.0 edge"})
    assert r.code == 200, r.body
    seen = r.json()
    assert seen["uri"] == "/hello?b=2&a=1"
    assert r.header("via") == "1.1 kong/%s" % KONG_VERSION
    assert r.header("x-kong-upstream-latency") is not None
    assert r.header("x-kong-proxy-latency") is not None
    assert r.header("server") == "echo-upstream"
    headers = seen["headers"]
    assert headers["host"] == [upstream.url.split("//")[1]]
    assert headers["x-forwarded-for"] == ["10.0.0.1, 127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-path"] == ["/echo/hello"]
    assert headers["x-forwarded-prefix"] == ["/echo"]
    assert headers["x-real-ip"] == ["127.0.0.1"]
    assert headers["x-kong-request-id"] == [r.header("x-kong-request-id")]
    assert headers["via"] == ["1.0 edge, 1.1 kong/%s" % KONG_VERSION]


@pytest_twisted.ensureDeferred
async def test_untrusted_forwarded_headers_are_overwritten(node, client, upstream):
    """X-Forwarded-Proto/Host from an untrusted client are replaced, not forwarded."""
    await _service_and_route(client, node, upstream)
    r = await client.request("GET", node.proxy + "/echo", headers={
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.test", "X-Real-IP": "1.2.3.4"})
    headers = r.json()["headers"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] == ["127.0.0.1"]
    assert headers["x-real-ip"] == ["127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_headers_removed(node, client, upstream):
    """Connection-named and hop-by-hop request headers never reach the upstream."""
    await _service_and_route(client, node, upstream)
    r = await client.request("GET", node.proxy + "/echo", headers={
        "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "5",
        "Proxy": "http://evil", "X-Kept": "yes"})
    headers = r.json()["headers"]
    assert "x-secret-hop" not in headers
    assert "keep-alive" not in headers
    assert "proxy" not in headers
    assert headers["x-kept"] == ["yes"]


@pytest_twisted.ensureDeferred
async def test_strip_path_false_and_preserve_host(node, client, upstream):
    """strip_path=false forwards the whole path; preserve_host forwards the client Host."""
    await _service_and_route(client, node, upstream, route_form={
        "paths[]": "/echo", "strip_path": "false", "preserve_host": "true"})
    r = await client.request("GET", node.proxy + "/echo/x", headers={"Host": "api.example.test"})
    seen = r.json()
    assert seen["uri"] == "/echo/x"
    assert seen["headers"]["host"] == ["api.example.test"]


@pytest_twisted.ensureDeferred
async def test_request_body_forwarded(node, client, upstream):
    """POST bodies reach the upstream unchanged with their length."""
    await _service_and_route(client, node, upstream)
    r = await client.request("POST", node.proxy + "/echo", body=b"a=1&b=2",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    seen = r.json()
    assert seen["body"] == "a=1&b=2"
    assert seen["headers"]["content-length"] == ["7"]


@pytest_twisted.ensureDeferred
async def test_large_response_streamed(node, client, upstream):
    """A 5 MB upstream body arrives whole."""
    await _service_and_route(client, node, upstream)
    r = await client.request("GET", node.proxy + "/echo/bytes/5000000")
    assert r.code == 200
    assert len(r.body) == 5000000


@pytest_twisted.ensureDeferred
async def test_route_without_service_is_503(node, client):
    """A route with no service answers Kong's 503."""
    r = await client.request("POST", node.admin + "/routes", form={"paths[]": "/lonely"})
    assert r.code == 201, r.body
    r = await client.request("GET", node.proxy + "/lonely")
    assert r.code == 503
    assert r.json()["message"] == "no Service found with those values"


@pytest_twisted.ensureDeferred
async def test_upstream_down_is_502(node, client):
    """Connection refused on every try gives Kong's 502 message."""
    from twisted.internet import reactor

    port = reactor.listenTCP(0, __import__("twisted.internet.protocol").internet.protocol.Factory(),
                             interface="127.0.0.1")
    dead = port.getHost().port
    await port.stopListening()
    r = await client.request("POST", node.admin + "/services",
                             form={"name": "dead", "url": "http://127.0.0.1:%d" % dead,
                                   "retries": "1"})
    assert r.code == 201, r.body
    await client.request("POST", node.admin + "/services/dead/routes", form={"paths[]": "/dead"})
    r = await client.request("GET", node.proxy + "/dead", headers={"Accept": "application/json"})
    assert r.code == 502
    assert r.json()["message"] == "An invalid response was received from the upstream server"


@pytest_twisted.ensureDeferred
async def test_upstream_timeout_is_504(node, client, upstream):
    """A read timeout gives Kong's 504 message."""
    await _service_and_route(client, node, upstream, read_timeout="200")
    r = await client.request("GET", node.proxy + "/echo/delay/5",
                             headers={"Accept": "application/json"})
    assert r.code == 504
    assert r.json()["message"] == "The upstream server is timing out"


@pytest_twisted.ensureDeferred
async def test_change_is_served_on_next_request(node, client, upstream):
    """PATCHing a route's paths is visible to the very next proxied request."""
    route = await _service_and_route(client, node, upstream)
    r = await client.request("PATCH", node.admin + "/routes/" + route["id"],
                             json_body={"paths": ["/moved"]})
    assert r.code == 200, r.body
    assert (await client.request("GET", node.proxy + "/moved")).code == 200
    assert (await client.request("GET", node.proxy + "/echo")).code == 404
    r = await client.request("DELETE", node.admin + "/routes/" + route["id"])
    assert r.code == 204
    assert (await client.request("GET", node.proxy + "/moved")).code == 404


@pytest_twisted.ensureDeferred
async def test_normalised_path_is_routed_and_forwarded(node, client, upstream):
    """Dot segments and unreserved escapes are normalised before routing and forwarding."""
    await _service_and_route(client, node, upstream)
    r = await client.request("GET", node.proxy + "/x/../%65cho/a/./b")
    assert r.code == 200, r.body
    assert r.json()["uri"] == "/a/b"


@pytest_twisted.ensureDeferred
async def test_configuration_survives_restart(tmp_path, client, upstream):
    """Everything written through the Admin API is there after a restart (SQLite)."""
    from twisted.internet import reactor

    from tests.integration.conftest import start_node

    prefix = str(tmp_path / "p")
    first = await start_node(reactor, prefix)
    try:
        await _service_and_route(client, first, upstream)
    finally:
        await first.service.stopService()
    second = await start_node(reactor, prefix)
    try:
        r = await client.request("GET", second.proxy + "/echo")
        assert r.code == 200
        r = await client.request("GET", second.admin + "/services/echo")
        assert r.json()["host"] == "127.0.0.1"
    finally:
        await second.service.stopService()


@pytest_twisted.ensureDeferred
async def test_malformed_requests_get_400_and_node_keeps_serving(node, client):
    """A bad percent-escape or two Host headers get 400 with Kong's body; the node
    keeps answering afterwards."""
    from twisted.internet import reactor

    from tests.integration.helpers import raw_exchange, split_response

    port = int(node.proxy.rsplit(":", 1)[1])
    raw = await raw_exchange(reactor, "127.0.0.1", port,
                             b"GET /a%zz HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n"
                             b"Connection: close\r\n\r\n")
    status, _, body = split_response(raw)
    assert status.startswith("HTTP/1.1 400")
    assert b"Bad request" in body
    raw = await raw_exchange(reactor, "127.0.0.1", port,
                             b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n")
    assert split_response(raw)[0].startswith("HTTP/1.1 400")
    raw = await raw_exchange(reactor, "127.0.0.1", port, b"\x00\x01garbage\r\n\r\n")
    assert raw == b"" or raw.startswith(b"HTTP/1.1 400")
    r = await client.request("GET", node.proxy + "/still-here")
    assert r.code == 404


_CANNED = (b"HTTP/1.1 200 OK\r\n"
           b"content-type: text/plain\r\n"
           b"Set-Cookie: a=1\r\n"
           b"set-cookie: b=2\r\n"
           b"X-MiXeD-Case: kept\r\n"
           b"Connection: keep-alive, X-Hop\r\n"
           b"X-Hop: dropped\r\n"
           b"Keep-Alive: timeout=5\r\n"
           b"Server: canned\r\n"
           b"Content-Length: 2\r\n\r\nok")

_BARE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest_twisted.ensureDeferred
async def test_upstream_response_headers_on_the_wire(node, client):
    """What the client reads, byte for byte in the head: the upstream's headers under
    twisted.web's canonical names, repeated ones kept in order, ``Connection`` and the
    headers it names and other hop-by-hop headers dropped, the upstream's ``Server``
    kept, Kong's ``Via`` added, one ``Content-Length``; no ``Content-Type`` added to an
    answer that has none (twisted.web would add ``text/html``)."""
    from twisted.internet import defer, protocol, reactor

    class Canned(protocol.Protocol):
        def connectionMade(self) -> None:
            self.buffer = b""

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            if b"\r\n\r\n" in self.buffer:
                bare = self.buffer.startswith(b"GET /bare ")
                self.buffer = b""
                self.transport.write(_BARE if bare else _CANNED)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Canned), interface="127.0.0.1")
    try:
        url = "http://127.0.0.1:%d" % port.getHost().port
        r = await client.request("POST", node.admin + "/services", form={"name": "canned", "url": url})
        assert r.code == 201, r.body
        r = await client.request("POST", node.admin + "/services/canned/routes",
                                 form={"paths[]": "/canned"})
        assert r.code == 201, r.body

        host, proxy_port = node.proxy.split("//")[1].split(":")

        async def get(path: bytes) -> bytes:
            done: defer.Deferred = defer.Deferred()

            class Raw(protocol.Protocol):
                def connectionMade(self) -> None:
                    self.received = b""
                    self.transport.write(b"GET %s HTTP/1.1\r\nHost: x\r\n"
                                         b"Connection: close\r\n\r\n" % path)

                def dataReceived(self, data: bytes) -> None:
                    self.received += data

                def connectionLost(self, reason: object) -> None:
                    done.callback(self.received)

            await protocol.ClientCreator(reactor, Raw).connectTCP(host, int(proxy_port))
            return await done

        raw = await get(b"/canned")
        bare = await get(b"/canned/bare")
    finally:
        await port.stopListening()
    # An upstream answer without Content-Type gets none added.
    assert b"content-type" not in bare.partition(b"\r\n\r\n")[0].lower()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    names = [line.split(b":", 1)[0] for line in lines[1:]]
    assert b"Content-Type: text/plain" in lines
    assert [line for line in lines if line.startswith(b"Set-Cookie")] == [
        b"Set-Cookie: a=1", b"Set-Cookie: b=2"]
    assert b"X-Mixed-Case: kept" in lines
    assert b"Server: canned" in lines
    assert b"Via: 1.1 kong/%s" % KONG_VERSION.encode() in lines
    assert names.count(b"Content-Length") == 1
    for dropped in (b"X-Hop", b"Keep-Alive"):
        assert dropped not in names
    assert b"Connection: close" in lines
    assert body == b"ok"


@pytest_twisted.ensureDeferred
async def test_status_counts_requests_being_answered(node, client, upstream):
    """``/status`` ``connections_writing`` counts the requests being answered (one
    while an upstream takes its time, none once it answered), and
    ``connections_waiting`` the other open connections."""
    from twisted.internet import defer, reactor, task

    await _service_and_route(client, node, upstream)
    slow = defer.ensureDeferred(client.request("GET", node.proxy + "/echo/delay/0.5"))
    for _ in range(50):
        await task.deferLater(reactor, 0.02, lambda: None)
        server = (await client.request("GET", node.admin + "/status")).json()["server"]
        if server["connections_writing"]:
            break
    assert server["connections_writing"] == 1
    assert (await slow).code == 200
    server = (await client.request("GET", node.admin + "/status")).json()["server"]
    assert server["connections_writing"] == 0
    assert server["connections_waiting"] == server["connections_active"]

    # A client that leaves while the upstream takes its time is not counted any more.
    from twisted.internet import protocol

    port = int(node.proxy.rsplit(":", 1)[1])
    leaver = await protocol.ClientCreator(reactor, protocol.Protocol).connectTCP(
        "127.0.0.1", port)
    leaver.transport.write(b"GET /echo/delay/2 HTTP/1.1\r\nHost: a\r\n\r\n")
    for _ in range(50):
        await task.deferLater(reactor, 0.02, lambda: None)
        if (await client.request("GET", node.admin + "/status")).json()["server"][
                "connections_writing"]:
            break
    leaver.transport.loseConnection()
    for _ in range(50):
        await task.deferLater(reactor, 0.02, lambda: None)
        server = (await client.request("GET", node.admin + "/status")).json()["server"]
        if not server["connections_writing"]:
            break
    assert server["connections_writing"] == 0
