"""The Postgres migrations: runner, locking, layout, and the ``kongtx migrations`` command."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from typing import Any, Dict, List, Tuple

import pytest_twisted
from twisted.internet import defer

from kongtx.cli import EXIT_NOT_BOOTSTRAPPED, EXIT_PENDING, migrations_command
from kongtx.schema import store_metas
from kongtx.store import migrations
from kongtx.store.interface import EntityMeta, StoreUnavailable
from kongtx.store.migrations import Migration, entity_migration, known_migrations
from kongtx.store.postgres import (
    NOT_BOOTSTRAPPED,
    MigrationsNeeded,
    PgSettings,
    PostgresStore,
)
from tests.pg import Database, Gate, fresh_database  # noqa: F401 (fixture)
from tests.store.contract import failure_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _in_schema(database: Database) -> PgSettings:
    return database.with_settings(schema="m_" + uuid.uuid4().hex[:10])


def _dump(database: Database, schema: str) -> Tuple[List[Any], List[Any]]:
    """Columns and indexes of ``schema`` (schema name blanked out)."""
    conn = database.connect()
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT table_name, column_name, data_type, collation_name, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = %s ORDER BY 1, 2",
            [schema],
        )
        columns = cur.fetchall()
        cur.execute(
            "SELECT tablename, indexname, replace(indexdef, %s, 'S') FROM pg_indexes "
            "WHERE schemaname = %s ORDER BY 1, 2",
            [schema + ".", schema],
        )
        return columns, cur.fetchall()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_bootstrap_status_up_reset_are_idempotent(fresh_database: Database) -> None:  # noqa: F811
    """bootstrap runs every migration once; again it does nothing; status/up/reset agree."""
    reactor = _reactor()
    settings = fresh_database.settings
    names = [m.name for m in known_migrations()]
    assert names == sorted(names) and names[0] == "0001_cluster_events"
    assert await migrations.status(settings, reactor) == ([], names)
    error = await failure_of(defer.Deferred.fromCoroutine(migrations.up(settings, reactor)))
    assert isinstance(error, MigrationsNeeded) and str(error) == NOT_BOOTSTRAPPED
    assert await migrations.bootstrap(settings, reactor) == names
    assert await migrations.bootstrap(settings, reactor) == []
    assert await migrations.up(settings, reactor) == []
    assert await migrations.status(settings, reactor) == (names, [])
    assert await migrations.reset(settings, reactor) is True
    assert await migrations.status(settings, reactor) == ([], names)
    assert await migrations.reset(settings, reactor) is False
    assert await migrations.bootstrap(settings, reactor) == names


@pytest_twisted.ensureDeferred
async def test_up_runs_only_a_later_release_migration(fresh_database: Database) -> None:  # noqa: F811
    """A new migration file is pending after an upgrade: start() refuses, up runs just it, start() works."""
    reactor = _reactor()
    settings = fresh_database.settings
    await migrations.bootstrap(settings, reactor)
    later = known_migrations() + [
        entity_migration("9001_consumers", {"consumers": EntityMeta("consumers", unique=("username",))})
    ]
    metas = dict(store_metas(), consumers=EntityMeta("consumers", unique=("username",)))
    assert (await migrations.status(settings, reactor, later))[1] == ["9001_consumers"]
    store = PostgresStore(metas, settings, reactor, "n1", migrations=later)
    error = await failure_of(store.start())
    assert isinstance(error, MigrationsNeeded)
    assert str(error) == "database has pending migrations: run 'kongtx migrations up' (9001_consumers)"
    assert "\n" not in str(error)
    assert await migrations.up(settings, reactor, later) == ["9001_consumers"]
    await store.start()
    try:
        row = await store.insert("consumers", {"id": str(uuid.uuid4()), "username": "bob"})
        assert await store.get_by("consumers", "username", "bob") == row
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_concurrent_bootstraps_run_once(fresh_database: Database) -> None:  # noqa: F811
    """Two nodes bootstrapping at once: one runs the migrations, the other finds them done; no error."""
    reactor = _reactor()
    settings = fresh_database.settings
    results = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(migrations.bootstrap(settings, reactor)) for _ in range(3)]
    )
    names = [m.name for m in known_migrations()]
    assert sorted(results, key=len) == [[], [], names]
    assert await migrations.status(settings, reactor) == (names, [])


@pytest_twisted.ensureDeferred
async def test_stepwise_upgrades_equal_a_fresh_bootstrap(fresh_database: Database) -> None:  # noqa: F811
    """Applying the migrations one release at a time gives the same tables, columns and indexes as a
    fresh bootstrap, and the entity tables are exactly those the current metadata describes."""
    reactor = _reactor()
    every = known_migrations()
    fresh = _in_schema(fresh_database)
    await migrations.bootstrap(fresh, reactor)
    stepwise = _in_schema(fresh_database)
    await migrations.bootstrap(stepwise, reactor, every[:1])
    for n in range(2, len(every) + 1):
        assert await migrations.up(stepwise, reactor, every[:n]) == [every[n - 1].name]
    assert _dump(fresh_database, fresh.schema) == _dump(fresh_database, stepwise.schema)

    current = _in_schema(fresh_database)
    # Non-entity migrations (0001 cluster_events, 0004 ratelimiting_counters) create
    # tables no entity metadata describes: they are applied as they are.
    others = [m for m in every if not set(m.tables) & set(store_metas())]
    await migrations.bootstrap(current, reactor, others + [entity_migration("now", store_metas())])
    assert _dump(fresh_database, fresh.schema) == _dump(fresh_database, current.schema)


@pytest_twisted.ensureDeferred
async def test_reset_with_pg_schema_drops_the_schema(fresh_database: Database) -> None:  # noqa: F811
    """With pg_schema set, bootstrap creates the schema and reset drops it whole."""
    reactor = _reactor()
    settings = _in_schema(fresh_database)
    await migrations.bootstrap(settings, reactor)
    conn = fresh_database.connect()
    try:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s", [settings.schema])
        # kongtx_migrations, cluster_events, services, routes, consumers, plugins,
        # keyauth_credentials, ratelimiting_counters, apis
        assert cur.fetchone()[0] == 9
        assert await migrations.reset(settings, reactor) is True
        cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [settings.schema])
        assert cur.fetchone()[0] == 0
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_runner_on_unreachable_database_fails_unavailable() -> None:
    """The runner against a closed port fails with StoreUnavailable."""
    reactor = _reactor()
    gate = Gate(reactor)
    port = gate.open()
    await gate.close()
    error = await failure_of(
        defer.Deferred.fromCoroutine(migrations.status(PgSettings(port=port, timeout=1000), reactor))
    )
    assert isinstance(error, StoreUnavailable)


# -- the command ----------------------------------------------------------------------


async def _command(command: str, settings: PgSettings, migrations_: Any = None) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await migrations_command(command, settings, _reactor(), out, err, migrations_)
    return code, out.getvalue(), err.getvalue()


@pytest_twisted.ensureDeferred
async def test_command_messages_and_exit_statuses(fresh_database: Database) -> None:  # noqa: F811
    """kongtx migrations list/bootstrap/status/up/reset print Kong's messages with Kong's exit codes."""
    settings = fresh_database.settings
    names = [m.name for m in known_migrations()]
    code, out, _ = await _command("list", settings)
    assert code == EXIT_NOT_BOOTSTRAPPED
    assert out.startswith("Database needs bootstrapping or is older than Kong 1.0.")
    code, out, err = await _command("bootstrap", settings)
    assert (code, err) == (0, "")
    assert out.startswith("Bootstrapping database...\n")
    assert out.endswith(f"{len(names)} migrations processed\n{len(names)} executed\nDatabase is up-to-date\n")
    assert await _command("bootstrap", settings) == (
        0, "Bootstrapping database...\nDatabase already bootstrapped\n", "")
    assert await _command("up", settings) == (0, "Database is already up-to-date\n", "")
    code, out, _ = await _command("list", settings)
    assert code == 0 and out == "Executed migrations:\n" + "".join(f"  {n}\n" for n in names) + (
        "Database is up-to-date\n")
    later = known_migrations() + [Migration("9002_noop", ("SELECT 1",))]
    assert await _command("status", settings, later) == (
        EXIT_PENDING, "Database has pending migrations: 9002_noop\n", "")
    code, out, _ = await _command("up", settings, later)
    assert code == 0 and "1 migrations processed\n1 executed\n" in out
    assert await _command("reset", settings, later) == (0, "Database successfully reset\n", "")
    assert await _command("reset", settings, later) == (
        0, "Database not bootstrapped, nothing to reset\n", "")


@pytest_twisted.ensureDeferred
async def test_command_on_unreachable_database_is_one_error_line() -> None:
    """An unreachable database gives exit status 1 and a single 'Error: ...' line."""
    gate = Gate(_reactor())
    port = gate.open()
    await gate.close()
    code, out, err = await _command("bootstrap", PgSettings(port=port, timeout=1000))
    assert code == 1
    assert err.startswith("Error: database unreachable: ") and err.count("\n") == 1


def _cli(args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KONG_")}
    environ.update(env)
    environ["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-m", "kongtx.cli", "migrations"] + args,
        env=environ, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def test_command_as_a_subprocess_with_env(fresh_database: Database) -> None:  # noqa: F811
    """KONG_DATABASE=postgres KONG_PG_* kongtx migrations bootstrap works; reset needs -y without a tty."""
    env = dict(fresh_database.env, KONG_PREFIX=os.path.join("/tmp", fresh_database.name))
    done = _cli(["bootstrap"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("Database is up-to-date\n")
    assert _cli(["status"], env).stdout.startswith("Database is up-to-date")
    refused = _cli(["reset"], env)
    assert refused.returncode == 1
    assert refused.stderr == "Error: not a tty: invoke 'reset' non-interactively with the --yes flag\n"
    reset = _cli(["reset", "-y"], env)
    assert (reset.returncode, reset.stdout) == (0, "Database successfully reset\n")
    down = _cli(["up"], dict(env, KONG_PG_PORT="1"))
    assert down.returncode == 1
    assert down.stderr.startswith("Error: database unreachable") and "Traceback" not in down.stderr
    sqlite = _cli(["up"], dict(env, KONG_DATABASE="sqlite"))
    assert sqlite.returncode == 1
    assert sqlite.stderr == (
        "Error: 'kongtx migrations' needs database = postgres (this configuration uses 'sqlite')\n")
