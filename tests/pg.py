"""Helpers for tests that need a real PostgreSQL: a fresh database per test (or module).

Postgres is expected on ``127.0.0.1:5432`` (user ``postgres``, trust auth; override
with ``KONGTX_TEST_PG_HOST``/``_PORT``/``_USER``). When it cannot be reached the
tests are skipped, unless the ``CI`` environment variable is set: then they fail,
because CI must never skip a backend silently.

Usage::

    from tests.pg import fresh_database  # noqa: F401  (a pytest fixture)

    def test_x(fresh_database):
        settings = fresh_database.settings      # a PgSettings for the new database
        env = fresh_database.env                # KONG_DATABASE=postgres, KONG_PG_* ...

``make_database()`` / ``drop_database(name)`` do the same by hand (module fixtures).
These helpers talk to Postgres synchronously: they only run in fixtures, outside
the reactor's turn.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Dict, Iterator, Optional

import attr
import pytest

from kongtx._pg import psycopg2
from kongtx.store.postgres import PgSettings

HOST = os.environ.get("KONGTX_TEST_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("KONGTX_TEST_PG_PORT", "5432"))
USER = os.environ.get("KONGTX_TEST_PG_USER", "postgres")


def _admin_connection(dbname: str = "postgres") -> Any:
    conn = psycopg2.connect(host=HOST, port=PORT, user=USER, dbname=dbname, connect_timeout=3)
    conn.autocommit = True
    return conn


def pg_available() -> bool:
    """Whether the test Postgres accepts a connection."""
    try:
        _admin_connection().close()
    except psycopg2.Error:
        return False
    return True


def require_pg() -> None:
    """Skips the calling test when Postgres is down; fails it instead when ``CI`` is set."""
    if pg_available():
        return
    message = f"PostgreSQL is not reachable on {HOST}:{PORT} as {USER}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: a skipped backend is a failure)")
    pytest.skip(message)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Database:
    """A freshly created database and how to reach it."""

    name: str
    settings: PgSettings
    env: Dict[str, str]

    def connect(self) -> Any:
        """A synchronous (autocommit) psycopg2 connection to it, for inspection."""
        return _admin_connection(self.name)

    def with_settings(self, **changes: Any) -> PgSettings:
        return attr.evolve(self.settings, **changes)


def make_database(prefix: str = "kongtx_test") -> Database:
    """Creates an empty database named ``<prefix>_<random>``."""
    require_pg()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = _admin_connection()
    try:
        conn.cursor().execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    settings = PgSettings(
        host=HOST, port=PORT, user=USER, database=name, timeout=5000, update_frequency=5.0
    )
    env = {
        "KONG_DATABASE": "postgres",
        "KONG_PG_HOST": HOST,
        "KONG_PG_PORT": str(PORT),
        "KONG_PG_USER": USER,
        "KONG_PG_DATABASE": name,
    }
    return Database(name, settings, env)


def drop_database(name: str) -> None:
    """Drops a database made by :func:`make_database`, disconnecting its clients."""
    conn = _admin_connection()
    try:
        conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def terminate_backends(database: str, application_name: Optional[str] = None, pid: Optional[int] = None) -> int:
    """Kills server-side connections to ``database`` (all, by application, or one pid)."""
    conn = _admin_connection()
    try:
        cur = conn.cursor()
        sql = (
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()"
        )
        params: list = [database]
        if application_name is not None:
            sql += " AND application_name = %s"
            params.append(application_name)
        if pid is not None:
            sql += " AND pid = %s"
            params.append(pid)
        cur.execute(sql, params)
        return int(cur.fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def fresh_database() -> Iterator[Database]:
    """A new empty database for one test, dropped afterwards."""
    database = make_database()
    try:
        yield database
    finally:
        drop_database(database.name)


@pytest.fixture(scope="module")
def module_database() -> Iterator[Database]:
    """A new empty database shared by one test module, dropped afterwards."""
    database = make_database()
    try:
        yield database
    finally:
        drop_database(database.name)


class Gate:
    """A TCP forwarder to the test Postgres that a test can cut, to play an outage.

    ``open()`` listens on 127.0.0.1 (a port chosen by the OS the first time, the
    same port afterwards); ``close()`` stops listening and aborts every forwarded
    connection (the database is "down": connections are refused); ``freeze()``
    drops what clients send while keeping sockets open (the database is
    "black-holed": queries hang until the client's timeout).
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.port_number = 0
        self._port: Any = None
        self.servers: list = []

    def open(self) -> int:
        from twisted.protocols import portforward

        gate = self

        class Factory(portforward.ProxyFactory):
            def buildProtocol(self, addr: Any) -> Any:
                protocol = portforward.ProxyFactory.buildProtocol(self, addr)
                gate.servers.append(protocol)
                return protocol

        self._port = self.reactor.listenTCP(
            self.port_number, Factory(HOST, PORT), interface="127.0.0.1"
        )
        self.port_number = self._port.getHost().port
        return self.port_number

    async def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            await port.stopListening()
        for server in self.servers:
            if server.transport is not None:
                server.transport.abortConnection()
            peer = getattr(server, "peer", None)
            if peer is not None and peer.transport is not None:
                peer.transport.abortConnection()
        self.servers = []

    def freeze(self) -> None:
        for server in self.servers:
            server.dataReceived = lambda data: None  # swallow what the client sends


async def wait_for(reactor: Any, predicate: Any, timeout: float = 5.0, step: float = 0.01) -> float:
    """Waits (on the reactor, no sleep) until ``predicate()`` is true; fires with the seconds waited.

    Raises ``AssertionError`` after ``timeout`` seconds.
    """
    from twisted.internet import task

    start = reactor.seconds()
    while not predicate():
        if reactor.seconds() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await task.deferLater(reactor, step, lambda: None)
    return reactor.seconds() - start
