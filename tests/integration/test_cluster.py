"""Several kongtx nodes on one Postgres database: a change made through one node's
Admin API reaches every node's proxy, within milliseconds (LISTEN/NOTIFY)."""

from __future__ import annotations

import statistics
import time

import pytest_twisted
from twisted.internet import task

from tests.integration.processes import NodeProcess
from tests.pg import fresh_database  # noqa: F401  (fixture)


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)


async def _until(check, timeout: float = 30.0, step: float = 0.005):
    """Await ``check()`` (async) until it returns a true value; return it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await check()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %.1f s" % timeout)
        await _sleep(step)


async def _started(client, node: NodeProcess) -> None:
    async def up():
        r = await client.request("GET", node.admin + "/")
        return r.code == 200

    try:
        await _until(up, timeout=30.0, step=0.1)
    except AssertionError:
        raise AssertionError("node did not start:\n" + node.output())


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_changes_within_a_second(fresh_database, tmp_path, client,
                                                      upstream):
    """Routes created, changed and deleted on node A are served (or no longer served)
    by node B's proxy; the median propagation delay is well under a second."""
    from twisted.internet import reactor

    from kongtx.store import migrations

    await migrations.bootstrap(fresh_database.settings, reactor)
    a = NodeProcess(str(tmp_path / "a"), **fresh_database.env)
    b = NodeProcess(str(tmp_path / "b"), **fresh_database.env)
    try:
        await _started(client, a)
        await _started(client, b)
        r = await client.request("POST", a.admin + "/services",
                                 form={"name": "echo", "url": upstream.url})
        assert r.code == 201, r.body

        delays = []
        for i in range(10):
            path = "/p%d" % i
            r = await client.request("POST", a.admin + "/services/echo/routes",
                                     form={"name": "r%d" % i, "paths[]": path})
            assert r.code == 201, r.body
            written = time.monotonic()

            async def served(path=path):
                return (await client.request("GET", b.proxy + path)).code == 200

            await _until(served, timeout=10)
            delays.append(time.monotonic() - written)
        median = statistics.median(delays)
        print("\ncluster propagation A->B over %d route creations: median %.1f ms, max %.1f ms"
              % (len(delays), median * 1000, max(delays) * 1000))
        assert median < 1.0

        r = await client.request("PATCH", a.admin + "/routes/r0", form={"paths[]": "/moved"})
        assert r.code == 200, r.body

        async def moved():
            return (await client.request("GET", b.proxy + "/moved")).code == 200

        await _until(moved, timeout=10)
        assert (await client.request("GET", b.proxy + "/p0")).code == 404

        r = await client.request("DELETE", a.admin + "/routes/r1")
        assert r.code == 204

        async def gone():
            return (await client.request("GET", b.proxy + "/p1")).code == 404

        await _until(gone, timeout=10)

        # And the other way round: B's Admin API reaches A's proxy.
        r = await client.request("POST", b.admin + "/services/echo/routes",
                                 form={"paths[]": "/from-b"})
        assert r.code == 201, r.body

        async def from_b():
            return (await client.request("GET", a.proxy + "/from-b")).code == 200

        await _until(from_b, timeout=10)
    finally:
        a.stop()
        b.stop()


@pytest_twisted.ensureDeferred
async def test_node_refuses_a_database_that_needs_migrations(fresh_database, tmp_path):
    """Starting on a database never bootstrapped stops with one line naming the command."""
    import subprocess

    from tests.integration.processes import kong_env, twistd

    proc = subprocess.run(
        twistd("-n", "--pidfile=", "kongtx", "--prefix", str(tmp_path / "p")),
        env=kong_env(KONG_PROXY_LISTEN="127.0.0.1:0", KONG_ADMIN_LISTEN="127.0.0.1:0",
                     **fresh_database.env),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "kongtx migrations bootstrap" in lines[0]
