"""The 2017 operator's walkthrough (shared/seeds/000) against kongtx on Postgres:
migrations, start, a 0.x API with rate-limiting and the syslog plugin, HTTPie over
HTTPS, and every call landing in kong.log through a real rsyslogd."""

from __future__ import annotations

import os
import shutil
import sys

import pytest_twisted
from twisted.internet import utils

from tests.integration.processes import NodeProcess, free_port, kong_env
from tests.integration.test_cluster import _started, _until
from tests.integration.test_rsyslog import Rsyslog, _read
from tests.pg import fresh_database  # noqa: F401  (fixture)


def _httpie() -> str:
    found = os.path.join(os.path.dirname(sys.executable), "http")
    return found if os.path.exists(found) else (shutil.which("http") or "http")


def _headers(output: str) -> dict:
    """Response headers of ``http -v`` output (the block after the request)."""
    response = output[output.index("HTTP/1.1 ", output.index("\n\n")):]
    head = response.split("\n\n", 1)[0].splitlines()
    return {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
            for line in head[1:] if ":" in line}


@pytest_twisted.ensureDeferred
async def test_2017_walkthrough(fresh_database, tmp_path, client, upstream):
    from twisted.internet import reactor

    os.makedirs(str(tmp_path / "rsyslog"))
    rsyslog = Rsyslog(str(tmp_path / "rsyslog"))
    node = None
    try:
        await _until(lambda: _async_true(os.path.exists(rsyslog.socket)), timeout=10, step=0.05)
        env = dict(fresh_database.env)

        # kong migrations up (here: kongtx migrations bootstrap)
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "kongtx.cli", "migrations", "bootstrap"],
            env=kong_env(**env))
        assert code == 0, (out, err)
        assert b"Database is up-to-date" in out

        # kong start
        http_port, https_port = free_port(), free_port()
        node = NodeProcess(
            str(tmp_path / "kong"),
            KONG_PROXY_LISTEN="127.0.0.1:%d, 127.0.0.1:%d ssl" % (http_port, https_port),
            KONG_SYSLOG_ADDRESS=rsyslog.socket, **env)
        await _started(client, node)

        # Adding an API to Kong (0.x style)
        r = await client.request("POST", node.admin + "/apis", form={
            "name": "my-kong-api", "hosts": "localhost", "uris": "/kong1",
            "upstream_url": upstream.url + "/api"})
        assert r.code == 201, r.body
        r = await client.request("GET", node.admin + "/apis")
        assert r.json()["total"] == 1
        assert r.json()["data"][0]["uris"] == ["/kong1"]

        # The rate-limiting plugin, minute = 10, and the syslog plugin with the
        # seed's severities.
        r = await client.request("POST", node.admin + "/apis/my-kong-api/plugins",
                                 form={"name": "rate-limiting", "config.minute": "10"})
        assert r.code == 201, r.body
        r = await client.request("POST", node.admin + "/apis/my-kong-api/plugins", form={
            "name": "syslog", "config.server_errors_severity": "err",
            "config.successful_severity": "notice", "config.client_errors_severity": "err",
            "config.log_level": "notice"})
        assert r.code == 201, r.body

        # http --verify=no -v POST "https://.../kong1?query=version"
        url = "https://localhost:%d/kong1?query=version" % https_port
        out, err, code = await utils.getProcessOutputAndValue(
            _httpie(), ["--ignore-stdin", "--verify=no", "-v", "POST", url], env=dict(os.environ))
        assert code == 0, (out, err)
        text = out.decode("utf-8", "replace")
        headers = _headers(text)
        assert headers["via"].endswith("kong/3.10.0")
        assert "x-kong-proxy-latency" in headers
        assert "x-kong-upstream-latency" in headers
        assert headers["x-ratelimit-limit-minute"] == "10"
        assert headers["x-ratelimit-remaining-minute"] == "9"
        assert '"uri": "/api?query=version"' in text or '"uri":"/api?query=version"' in text

        for remaining in range(8, -1, -1):
            r = await client.request("POST", "http://127.0.0.1:%d/kong1?query=version"
                                     % http_port, headers={"Host": "localhost"})
            assert r.code == 200
            assert r.header("x-ratelimit-remaining-minute") == str(remaining)

        out, err, code = await utils.getProcessOutputAndValue(
            _httpie(), ["--ignore-stdin", "--verify=no", "--check-status", "POST", url],
            env=dict(os.environ))
        assert code == 4, (out, err)  # 4xx
        assert b"API rate limit exceeded" in out

        # Every call is a JSON line in kong.log (notice for 200s, err for the 429).
        def logged() -> int:
            return sum(1 for line in _read(rsyslog.kong_log).splitlines()
                       if "kong" in line and "/kong1" in line)

        await _until(lambda: _async_true(logged() >= 11), timeout=10, step=0.1)

        # A 5xx is logged at err, a success at notice.
        closed = free_port()
        r = await client.request("POST", node.admin + "/apis", form={
            "name": "broken", "uris": "/broken", "retries": "0",
            "upstream_url": "http://127.0.0.1:%d" % closed})
        assert r.code == 201, r.body
        r = await client.request("POST", node.admin + "/apis/broken/plugins", form={
            "name": "syslog", "config.server_errors_severity": "err",
            "config.successful_severity": "notice", "config.log_level": "notice"})
        assert r.code == 201, r.body
        r = await client.request("GET", "http://127.0.0.1:%d/broken" % http_port)
        assert r.code == 502

        def severities(path: str) -> set:
            return {line.split(" ", 1)[0] for line in _read(rsyslog.severity_log).splitlines()
                    if path in line}

        await _until(lambda: _async_true("err" in severities("/broken")), timeout=10, step=0.1)
        assert severities("/broken") == {"err"}
        assert "notice" in severities("/kong1")
    finally:
        if node is not None:
            node.stop()
        rsyslog.stop()


async def _async_true(value: bool) -> bool:
    return value
