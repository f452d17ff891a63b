"""Proxy behaviour that depends on kong.conf: headers, trusted_ips, body limits and
upstream TLS verification; each test starts its own node on loopback."""

from __future__ import annotations

import os

import pytest_twisted
from twisted.web import server

from kongtx import KONG_VERSION, tls
from tests.integration.conftest import start_node
from tests.integration.helpers import EchoResource, raw_exchange, split_response


async def _node(tmp_path, **env):
    from twisted.internet import reactor

    return await start_node(reactor, str(tmp_path / "prefix"), **env)


async def _route(client, node, url, **service):
    form = {"name": "svc", "url": url}
    form.update(service)
    r = await client.request("POST", node.admin + "/services", form=form)
    assert r.code == 201, r.body
    r = await client.request("POST", node.admin + "/services/svc/routes", form={"paths[]": "/"})
    assert r.code == 201, r.body


@pytest_twisted.ensureDeferred
async def test_headers_off_removes_kong_headers(tmp_path, client, upstream):
    """headers=off: no Via, no latency headers, no request id, no Server on errors."""
    node = await _node(tmp_path, KONG_HEADERS="off")
    try:
        await _route(client, node, upstream.url)
        r = await client.request("GET", node.proxy + "/x")
        assert r.code == 200
        for name in ("via", "x-kong-upstream-latency", "x-kong-proxy-latency",
                     "x-kong-request-id"):
            assert r.header(name) is None, name
        assert r.header("server") == "echo-upstream"
    finally:
        await node.service.stopService()


@pytest_twisted.ensureDeferred
async def test_headers_server_only(tmp_path, client):
    """headers=Server: Kong-produced responses carry Server but no request id."""
    node = await _node(tmp_path, KONG_HEADERS="Server")
    try:
        r = await client.request("GET", node.proxy + "/none")
        assert r.code == 404
        assert r.header("server") == "kong/%s" % KONG_VERSION
        assert r.header("x-kong-request-id") is None
    finally:
        await node.service.stopService()


@pytest_twisted.ensureDeferred
async def test_trusted_client_forwarded_headers_are_kept(tmp_path, client, upstream):
    """From a client in trusted_ips, X-Forwarded-Proto/Host and X-Real-IP are honoured."""
    node = await _node(tmp_path, KONG_TRUSTED_IPS="127.0.0.1")
    try:
        await _route(client, node, upstream.url)
        r = await client.request("GET", node.proxy + "/x", headers={
            "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.test",
            "X-Real-IP": "203.0.113.9"})
        headers = r.json()["headers"]
        assert headers["x-forwarded-proto"] == ["https"]
        assert headers["x-forwarded-host"] == ["api.example.test"]
        assert headers["x-real-ip"] == ["203.0.113.9"]
    finally:
        await node.service.stopService()


@pytest_twisted.ensureDeferred
async def test_body_over_limit_is_413(tmp_path, client, upstream):
    """A body larger than nginx_http_client_max_body_size gets 413 and never reaches
    the upstream."""
    from twisted.internet import reactor

    node = await _node(tmp_path, KONG_NGINX_HTTP_CLIENT_MAX_BODY_SIZE="1k")
    try:
        await _route(client, node, upstream.url)
        before = len(upstream.requests)
        port = int(node.proxy.rsplit(":", 1)[1])
        raw = await raw_exchange(reactor, "127.0.0.1", port, (
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n"
            b"Accept: application/json\r\n\r\n" + b"x" * 2000))
        status, headers, body = split_response(raw)
        assert status.startswith("HTTP/1.1 413")
        assert b"Payload too large" in body
        r = await client.request("POST", node.proxy + "/x", body=b"y" * 1000)
        assert r.code == 200
        assert len(upstream.requests) == before + 1
    finally:
        await node.service.stopService()


def _tls_upstream(reactor, directory):
    cert, key = tls.ensure_default_certificate(directory, "upstream")
    context = tls.server_context_factory([cert], [key], "intermediate", "",
                                         ["TLSv1.2", "TLSv1.3"])
    site = server.Site(EchoResource(reactor))
    port = reactor.listenSSL(0, site, context, interface="127.0.0.1")
    return port, cert


@pytest_twisted.ensureDeferred
async def test_https_service_with_and_without_verification(tmp_path, client):
    """An https service is reached over TLS; with tls_verify on, a certificate the node
    does not trust gives 502, one from lua_ssl_trusted_certificate passes."""
    from twisted.internet import reactor

    port, cert = _tls_upstream(reactor, str(tmp_path))
    url = "https://localhost:%d" % port.getHost().port
    try:
        node = await _node(tmp_path)
        try:
            await _route(client, node, url)
            r = await client.request("GET", node.proxy + "/plain")
            assert r.code == 200, r.body
            assert r.json()["uri"] == "/plain"
            await client.request("PATCH", node.admin + "/services/svc",
                                 form={"tls_verify": "true", "retries": "0"})
            r = await client.request("GET", node.proxy + "/verified",
                                     headers={"Accept": "application/json"})
            assert r.code == 502
        finally:
            await node.service.stopService()
        trusting = await start_node(reactor, str(tmp_path / "trusting"),
                                    KONG_LUA_SSL_TRUSTED_CERTIFICATE=cert)
        try:
            await _route(client, trusting, url, tls_verify="true")
            r = await client.request("GET", trusting.proxy + "/verified")
            assert r.code == 200, r.body
        finally:
            await trusting.service.stopService()
    finally:
        await port.stopListening()
        os.remove(cert)
