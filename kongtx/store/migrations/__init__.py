"""Versioned Postgres migrations and the runner behind ``kongtx migrations``.

Each module ``vNNNN_<what>.py`` of this package defines ``MIGRATION``, a
:class:`Migration`: a name and the SQL statements it runs. Migrations run in
file order, each in its own transaction that also records its name in
``kongtx_migrations``; a file is never edited once released, a later release adds
a new file. Entity tables are described by entity metadata frozen *in the
migration file* (:func:`entity_migration`), so an old migration keeps creating
exactly what it created when it was released, whatever the schema code says
today; the store checks at start that the database has every table and column
its current metadata needs.

The runner (:func:`bootstrap`, :func:`up`, :func:`status`, :func:`reset`) holds a
Postgres advisory lock while it works, so several nodes may run it at once.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Any, Awaitable, Callable, List, Mapping, Optional, Sequence, Tuple

import attr

from kongtx.store.interface import EntityMeta, StoreError, StoreUnavailable
from kongtx.store.postgres import (
    NOT_BOOTSTRAPPED,
    Cursor,
    MigrationsNeeded,
    PgSettings,
    PgTable,
    open_connection,
    quote,
)

#: The table recording which migrations ran.
MIGRATIONS_TABLE = "kongtx_migrations"
#: The ``pg_advisory_lock`` key every runner takes (``b"kongtx"`` as an integer).
LOCK_KEY = 0x6B6F6E677478
#: How long (seconds) a runner waits for another one's lock, like Kong's ``--lock-timeout``.
LOCK_TIMEOUT = 60.0

_MODULE = re.compile(r"^v\d{4}_[a-z0-9_]+$")

Execute = Callable[..., Awaitable[List[Tuple[Any, ...]]]]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Migration:
    """One schema step: its ``name`` (recorded once run), its statements, the tables it creates."""

    name: str
    statements: Tuple[str, ...] = attr.ib(converter=tuple)
    #: Tables this migration creates (``reset`` drops them).
    tables: Tuple[str, ...] = attr.ib(default=(), converter=tuple)


def entity_migration(name: str, metas: Mapping[str, EntityMeta]) -> Migration:
    """A migration creating the tables (and indexes) of ``metas`` as they are given."""
    statements: List[str] = []
    for meta in metas.values():
        statements += PgTable.of(meta).ddl()
    return Migration(name, statements, tuple(metas))


def known_migrations() -> List[Migration]:
    """Every migration of this package, in file order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if _MODULE.match(info.name):
            found.append(info.name)
    migrations = []
    for module_name in sorted(found):
        module = importlib.import_module(f"{__name__}.{module_name}")
        migrations.append(module.MIGRATION)
    names = [m.name for m in migrations]
    if len(set(names)) != len(names):
        raise StoreError(f"duplicate migration names: {names!r}")
    return migrations


async def executed_names(execute: Execute) -> List[str]:
    """The names recorded in ``kongtx_migrations`` (``[]`` if the table does not exist)."""
    rows = await execute("SELECT to_regclass(%s) IS NOT NULL", [MIGRATIONS_TABLE])
    if not rows or not rows[0][0]:
        return []
    rows = await execute(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY executed_at, name")
    return [name for (name,) in rows]


class _Session:
    """One connection holding the migrations lock."""

    def __init__(self, settings: PgSettings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self.cursor: Optional[Cursor] = None

    async def __aenter__(self) -> Cursor:
        conn = await open_connection(self.reactor, self.settings)
        self.cursor = Cursor(
            self.reactor, conn, max(self.settings.timeout_seconds, LOCK_TIMEOUT)
        )
        try:
            await self.cursor.execute("SELECT pg_advisory_lock(%s)", [LOCK_KEY])
        except BaseException:
            conn.shut()
            raise
        return self.cursor

    async def __aexit__(self, *exc: Any) -> None:
        assert self.cursor is not None
        conn = self.cursor.conn
        try:
            if conn.is_open:
                await self.cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])
        finally:
            conn.shut()


async def _run(cursor: Cursor, migration: Migration) -> None:
    await cursor.execute("BEGIN")
    try:
        for statement in migration.statements:
            await cursor.execute(statement)
        await cursor.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name) VALUES (%s)", [migration.name])
        await cursor.execute("COMMIT")
    except BaseException:
        if cursor.conn.is_open:
            await cursor.execute("ROLLBACK")
        raise


async def _prepare(cursor: Cursor, settings: PgSettings) -> None:
    if settings.schema:
        await cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(settings.schema)}")
    await cursor.execute(
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
        "name text PRIMARY KEY, executed_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


async def bootstrap(
    settings: PgSettings, reactor: Any, migrations: Optional[Sequence[Migration]] = None
) -> List[str]:
    """Runs every migration on a database that has none; fires with the names run.

    Fires with ``[]`` if the database was already bootstrapped (by us earlier or
    by another node at the same time). Fails with ``StoreUnavailable`` if the
    database cannot be reached.
    """
    todo = list(known_migrations() if migrations is None else migrations)
    async with _Session(settings, reactor) as cursor:
        if await executed_names(cursor.execute):
            return []
        await _prepare(cursor, settings)
        for migration in todo:
            await _run(cursor, migration)
        return [m.name for m in todo]


async def up(
    settings: PgSettings, reactor: Any, migrations: Optional[Sequence[Migration]] = None
) -> List[str]:
    """Runs the pending migrations; fires with the names run (``[]`` when up to date).

    Fails with :class:`MigrationsNeeded` if the database was never bootstrapped.
    """
    known = list(known_migrations() if migrations is None else migrations)
    async with _Session(settings, reactor) as cursor:
        executed = await executed_names(cursor.execute)
        if not executed:
            raise MigrationsNeeded(NOT_BOOTSTRAPPED)
        todo = [m for m in known if m.name not in executed]
        for migration in todo:
            await _run(cursor, migration)
        return [m.name for m in todo]


async def status(
    settings: PgSettings, reactor: Any, migrations: Optional[Sequence[Migration]] = None
) -> Tuple[List[str], List[str]]:
    """Fires with ``(executed, pending)`` names; ``executed`` is empty if never bootstrapped."""
    known = list(known_migrations() if migrations is None else migrations)
    async with _Session(settings, reactor) as cursor:
        executed = await executed_names(cursor.execute)
    return executed, [m.name for m in known if m.name not in executed]


async def reset(
    settings: PgSettings, reactor: Any, migrations: Optional[Sequence[Migration]] = None
) -> bool:
    """Drops everything the migrations created (the whole ``pg_schema`` when one is set).

    Fires with ``True`` if the database was bootstrapped, ``False`` if there was
    nothing to reset.
    """
    known = list(known_migrations() if migrations is None else migrations)
    async with _Session(settings, reactor) as cursor:
        executed = await executed_names(cursor.execute)
        if settings.schema:
            await cursor.execute(f"DROP SCHEMA IF EXISTS {quote(settings.schema)} CASCADE")
            return bool(executed)
        tables = [t for m in reversed(known) for t in reversed(m.tables)]
        await cursor.execute("BEGIN")
        for table in tables + [MIGRATIONS_TABLE]:
            await cursor.execute(f"DROP TABLE IF EXISTS {quote(table)} CASCADE")
        await cursor.execute("COMMIT")
        return bool(executed)


def schema_problem_blocking(settings: PgSettings) -> Optional[str]:
    """What the operator must run before a node can start on this database, or None.

    Blocking (psycopg2): only for start-up checks before the reactor runs, so that a
    database that needs ``kongtx migrations`` stops start-up with one line. Raises
    ``StoreUnavailable`` when the database cannot be reached (a node may then start
    from its last known configuration).
    """
    from kongtx._pg import psycopg2
    from kongtx.store.postgres import NOT_BOOTSTRAPPED, PENDING_MIGRATIONS

    try:
        connection = psycopg2.connect(**settings.connect_kwargs())
    except psycopg2.OperationalError as exc:
        raise StoreUnavailable(str(exc).strip().splitlines()[0] if str(exc).strip() else
                               "cannot connect")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [MIGRATIONS_TABLE])
            executed: List[str] = []
            if cursor.fetchone()[0]:
                cursor.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")
                executed = [name for (name,) in cursor.fetchall()]
    finally:
        connection.close()
    if not executed:
        return NOT_BOOTSTRAPPED
    pending = [m.name for m in known_migrations() if m.name not in executed]
    if pending:
        return PENDING_MIGRATIONS.format(names=", ".join(pending))
    return None
