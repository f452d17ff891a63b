"""``PostgresStore``: the shared :class:`~kongtx.store.interface.IStore` on PostgreSQL.

All I/O goes through txpostgres (psycopg2 asynchronous connections driven by the
reactor; no threads). A small pool of connections runs reads and write
transactions, and one more connection ``LISTEN``\\ s for cluster events. Every
statement is bounded by ``pg_timeout``: a statement that does not answer in time
closes its connection and fails with :class:`StoreUnavailable`.

Tables are created by the migrations (``kongtx.store.migrations``), never on
start: one per entity with ``id``, one column per unique field, ``<field>_id``
per foreign key, ``cache_key``, ``order_<field>`` when ``order_by`` is not ``id``
and ``doc`` (``json``) holding the row. :class:`PgTable` describes that layout
and produces its DDL for the migrations.

Cluster events: each committed write also inserts one ``cluster_events`` row per
changed row and ``NOTIFY kongtx_events`` in the same transaction. Other nodes
apply the notification at once, and poll ``cluster_events`` every
``db_update_frequency`` seconds (and after every reconnection) so that a lost
notification is never a lost change. See ``docs/postgres.md``.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
)

import attr
from twisted.internet import defer, error as internet_error, main
from twisted.logger import Logger
from txpostgres import txpostgres
from zope.interface import implementer

from kongtx._pg import is_query_canceled, is_unique_violation, psycopg2
from kongtx.store.interface import (
    ChangeEvent,
    EntityMeta,
    ForeignKeyViolation,
    IStore,
    NotFoundError,
    ReferencedByOthers,
    Row,
    StoreError,
    StoreUnavailable,
    UniqueViolation,
    UnsupportedFilter,
    cache_key_fields,
    cache_key_text,
    decode_offset,
    encode_offset,
    foreign_id,
    index_value,
    normalize_where,
    order_value,
    references,
    row_id,
)
from kongtx.store.memory import ListenerRegistry, notify

log = Logger()

# -- messages -------------------------------------------------------------------------

NOT_STARTED = "the Postgres store is not started"
NOT_BOOTSTRAPPED = "database has not been bootstrapped: run 'kongtx migrations bootstrap'"
PENDING_MIGRATIONS = "database has pending migrations: run 'kongtx migrations up' ({names})"
MISSING_TABLE = "database has no table '{table}' for entity '{table}': no migration creates it"
MISSING_COLUMN = "table '{table}' has no column '{column}': the database needs a migration"
UNREACHABLE = "database unreachable: {reason}"
TIMED_OUT = "timeout: no answer from the database within {ms} ms"

# -- tunables -------------------------------------------------------------------------

#: The NOTIFY channel and the ``cluster_events.channel`` value of entity changes.
CHANNEL = "kongtx_events"
#: Pool size when ``pg_max_concurrent_queries`` is 0 (unlimited).
DEFAULT_POOL_SIZE = 4
#: Reconnection backoff (seconds): first delay, doubled up to the maximum.
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
#: A poll re-reads events this many seconds before the last one seen (late commits).
POLL_OFFSET = 10.0
#: Cluster events older than this (seconds) are purged; a node that was away longer reloads.
EVENT_RETENTION = 3600.0
#: How often (seconds) a node purges expired cluster events.
PURGE_INTERVAL = 60.0
#: Rows fetched per poll round trip.
POLL_BATCH = 1000

#: ``IStore.increment``: the rate-limiting counters (migration 0004).
COUNTER_UPSERT = (
    "INSERT INTO ratelimiting_counters AS c (key, window_start, value, expires_at) "
    "VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (key, window_start) DO UPDATE SET value = c.value + EXCLUDED.value "
    "WHERE %s::bigint IS NULL OR c.value + EXCLUDED.value <= %s::bigint "
    "RETURNING value"
)
#: Counters whose window ended long ago (the window start being counted stands for now).
COUNTER_PURGE = "DELETE FROM ratelimiting_counters WHERE expires_at < %s"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_COLUMNS = ("id", "doc", "cache_key")
_PG_IDENTIFIER_MAX = 63

_T = TypeVar("_T")


def quote(name: str) -> str:
    """A double-quoted SQL identifier (names are checked against ``[A-Za-z_][A-Za-z0-9_]*``)."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"{name!r} is not a valid SQL identifier")
    return '"' + name + '"'


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def column_value(entity: str, field: str, value: Any) -> Optional[str]:
    """How a unique or foreign value is held in its ``text`` column.

    Strings as they are, numbers as their JSON text, ``None`` as ``NULL``.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _dumps(value)
    raise ValueError(f"{entity}.{field} must be a scalar to be indexed, got {value!r}")


def order_text(value: Any) -> Optional[str]:
    """A text that sorts (``COLLATE "C"``) like :func:`~kongtx.store.interface.sort_key`.

    ``None`` stays ``NULL`` (sorted first); numbers become ``"1"`` followed by
    the 16 hex digits of an order-preserving transform of the IEEE double;
    strings become ``"2"`` followed by the string (code-point order).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return "2" + value
    bits = struct.unpack(">Q", struct.pack(">d", float(value)))[0]
    bits = (~bits & 0xFFFFFFFFFFFFFFFF) if bits >> 63 else (bits | (1 << 63))
    return "1%016x" % bits


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PgTable:
    """How one entity maps onto one Postgres table (used by the store and the migrations)."""

    meta: EntityMeta
    #: field -> column, for ``id``, unique fields and foreign keys.
    columns: Mapping[str, str]
    #: the column rows are ordered by before ``id``, or ``None`` for id order.
    order_column: Optional[str]

    @classmethod
    def of(cls, meta: EntityMeta) -> PgTable:
        if not _IDENTIFIER.match(meta.name):
            raise ValueError(f"entity name {meta.name!r} is not a valid table name")
        columns = {"id": "id"}
        for field in tuple(meta.unique) + tuple(meta.foreign):
            if not _IDENTIFIER.match(field):
                raise ValueError(f"{meta.name}.{field} is not a valid column name")
            columns[field] = field + "_id" if field in meta.foreign else field
        order_column = None
        if meta.order_by != "id":
            if not _IDENTIFIER.match(meta.order_by):
                raise ValueError(f"{meta.name}.{meta.order_by} is not a valid column name")
            order_column = "order_" + meta.order_by
        named = [c for f, c in columns.items() if f != "id"]
        if order_column is not None:
            named.append(order_column)
        if len(set(named)) != len(named) or set(named) & set(_RESERVED_COLUMNS):
            raise ValueError(f"the columns of {meta.name} collide: {named!r}")
        return cls(meta, columns, order_column)

    @property
    def name(self) -> str:
        return self.meta.name

    def _index(self, suffix: str) -> str:
        return quote(f"{self.name}_{suffix}"[:_PG_IDENTIFIER_MAX])

    def ddl(self) -> List[str]:
        """The statements creating this table and its indexes (for a migration)."""
        table = quote(self.name)
        defs = ['id text COLLATE "C" PRIMARY KEY']
        defs += [f'{quote(c)} text COLLATE "C"' for f, c in self.columns.items() if f != "id"]
        if self.meta.cache_key is not None:
            defs.append('cache_key text COLLATE "C"')
        if self.order_column is not None:
            defs.append(f'{quote(self.order_column)} text COLLATE "C"')
        defs.append("doc json NOT NULL")
        statements = [f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(defs)})"]
        for field in self.columns:
            if field != "id":
                statements.append(self.column_index_ddl(field))
        if self.meta.cache_key is not None:
            statements.append(
                f"CREATE UNIQUE INDEX IF NOT EXISTS {self._index('cache_key_key')} "
                f"ON {table} (cache_key)"
            )
        if self.order_column is not None:
            statements.append(self.order_index_ddl())
        return statements

    def column_index_ddl(self, field: str) -> str:
        """The index of a unique field (unique) or of a foreign key."""
        column = self.columns[field]
        if field in self.meta.unique:
            return (
                f"CREATE UNIQUE INDEX IF NOT EXISTS {self._index(column + '_key')} "
                f"ON {quote(self.name)} ({quote(column)})"
            )
        return (
            f"CREATE INDEX IF NOT EXISTS {self._index(column + '_idx')} "
            f"ON {quote(self.name)} ({quote(column)})"
        )

    def order_index_ddl(self) -> str:
        assert self.order_column is not None
        return (
            f"CREATE INDEX IF NOT EXISTS {self._index(self.order_column + '_idx')} "
            f"ON {quote(self.name)} ({quote(self.order_column)} NULLS FIRST, id)"
        )

    def constraint_fields(self) -> Dict[str, str]:
        """Unique index name -> the field it guards (``"id"``, a field, or ``"cache_key"``)."""
        found = {f"{self.name}_pkey"[:_PG_IDENTIFIER_MAX]: "id"}
        for field in self.meta.unique:
            found[f"{self.name}_{self.columns[field]}_key"[:_PG_IDENTIFIER_MAX]] = field
        if self.meta.cache_key is not None:
            found[f"{self.name}_cache_key_key"[:_PG_IDENTIFIER_MAX]] = "cache_key"
        return found

    def required_columns(self) -> List[str]:
        required = list(self.columns.values()) + ["doc"]
        if self.meta.cache_key is not None:
            required.append("cache_key")
        if self.order_column is not None:
            required.append(self.order_column)
        return required

    def values(self, row: Row) -> Dict[str, Any]:
        """Column -> value for a row (everything but ``doc``)."""
        values: Dict[str, Any] = {}
        for field, column in self.columns.items():
            value = row.get(field)
            if field in self.meta.foreign:
                value = foreign_id(value)
            values[column] = column_value(self.name, field, value)
        if self.meta.cache_key is not None:
            values["cache_key"] = cache_key_text(self.meta, row)
        if self.order_column is not None:
            values[self.order_column] = order_text(order_value(self.meta, row))
        return values

    def order_sql(self) -> str:
        if self.order_column is None:
            return "ORDER BY id"
        return f"ORDER BY {quote(self.order_column)} NULLS FIRST, id"

    def after_sql(self, value: Any, id: str) -> Tuple[str, List[Any]]:
        """The keyset condition selecting rows after (``value``, ``id``) in listing order."""
        if self.order_column is None:
            return "id > %s", [id]
        column = quote(self.order_column)
        encoded = order_text(value)
        if encoded is None:
            return f"({column} IS NOT NULL OR id > %s)", [id]
        return f"({column} > %s OR ({column} = %s AND id > %s))", [encoded, encoded, id]


# -- settings -------------------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PgSettings:
    """How to reach Postgres, from the ``pg_*`` and ``db_update_*`` properties.

    ``timeout`` is in milliseconds (``pg_timeout``); ``update_frequency`` and
    ``update_propagation`` in seconds.
    """

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "kong"
    password: Optional[str] = None
    database: str = "kong"
    schema: Optional[str] = None
    timeout: int = 5000
    ssl: bool = False
    ssl_verify: bool = False
    max_concurrent_queries: int = 0
    update_frequency: float = 5.0
    update_propagation: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> PgSettings:
        """The settings of a :class:`kongtx.config.Config`."""
        return cls(
            host=config.pg_host,
            port=int(config.pg_port),
            user=config.pg_user,
            password=config.pg_password or None,
            database=config.pg_database,
            schema=config.pg_schema or None,
            timeout=int(config.pg_timeout),
            ssl=bool(config.pg_ssl),
            ssl_verify=bool(config.pg_ssl_verify),
            max_concurrent_queries=int(config.pg_max_concurrent_queries),
            update_frequency=float(config.db_update_frequency),
            update_propagation=float(config.db_update_propagation),
        )

    @property
    def timeout_seconds(self) -> float:
        """``pg_timeout`` in seconds (0 means no bound, as in Kong: then 60 s is used)."""
        return self.timeout / 1000.0 if self.timeout > 0 else 60.0

    @property
    def pool_size(self) -> int:
        return self.max_concurrent_queries if self.max_concurrent_queries > 0 else DEFAULT_POOL_SIZE

    def connect_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``psycopg2.connect``."""
        kwargs: Dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": self.database,
            "application_name": "kongtx",
            "connect_timeout": max(1, int(round(self.timeout_seconds))),
            "sslmode": ("verify-full" if self.ssl_verify else "require") if self.ssl else "disable",
        }
        if self.password:
            kwargs["password"] = self.password
        if self.schema:
            kwargs["options"] = f"-c search_path={quote(self.schema)}"
        return kwargs


# -- connections ----------------------------------------------------------------------


class QueryTimeout(StoreUnavailable):
    """A statement (or a connection attempt) got no answer within ``pg_timeout``."""


class _Connection(txpostgres.Connection):
    """A txpostgres connection that reports its loss instead of raising from ``doRead``."""

    def __init__(self, reactor: Any, on_lost: Optional[Callable[[], None]] = None) -> None:
        super().__init__(reactor=reactor)
        self.on_lost = on_lost
        self._reported = False

    @property
    def is_open(self) -> bool:
        conn = self._connection
        return conn is not None and not conn.closed and not self._reported

    def doRead(self) -> Any:
        try:
            super().doRead()
        except psycopg2.Error:
            # The server went away (or killed this backend): let the reactor drop us.
            return main.CONNECTION_LOST
        return None

    def connectionLost(self, reason: Any) -> None:
        try:
            super().connectionLost(reason)
        finally:
            conn = self._connection
            if conn is not None and not conn.closed:
                try:
                    conn.close()
                except psycopg2.Error:
                    pass
            if not self._reported:
                self._reported = True
                if self.on_lost is not None:
                    self.on_lost()

    def shut(self) -> None:
        """Closes the connection if it was ever opened (idempotent)."""
        if self._connection is None:
            return
        try:
            self.close()
        except psycopg2.Error:
            pass


def is_connection_error(e: BaseException) -> bool:
    """Whether ``e`` means the connection (not the statement) failed."""
    return isinstance(
        e,
        (
            psycopg2.OperationalError,
            psycopg2.InterfaceError,
            internet_error.ConnectionDone,
            internet_error.ConnectionLost,
            txpostgres.RollbackFailed,
            StoreUnavailable,
        ),
    ) and not is_query_canceled(e)


def describe(e: BaseException) -> str:
    """A one-line reason for a failure."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


async def bounded(reactor: Any, d: "defer.Deferred[_T]", conn: _Connection, seconds: float) -> _T:
    """Awaits ``d``; after ``seconds`` closes ``conn`` and fails with :class:`StoreUnavailable`."""
    expired: List[bool] = []

    def expire() -> None:
        expired.append(True)
        conn.shut()
        if not d.called:  # closing a connection that never answered may not fire it
            try:
                d.cancel()
            except Exception:
                pass

    call = reactor.callLater(seconds, expire)
    try:
        return await d
    except BaseException as e:
        if expired:
            raise QueryTimeout(TIMED_OUT.format(ms=int(seconds * 1000))) from e
        raise
    finally:
        if call.active():
            call.cancel()


async def open_connection(
    reactor: Any, settings: PgSettings, on_lost: Optional[Callable[[], None]] = None
) -> _Connection:
    """A connected :class:`_Connection`; fails with :class:`StoreUnavailable` (bounded by the timeout)."""
    conn = _Connection(reactor, on_lost)
    try:
        await bounded(reactor, conn.connect(**settings.connect_kwargs()), conn, settings.timeout_seconds)
    except StoreUnavailable:
        raise
    except Exception as e:
        conn.shut()
        raise StoreUnavailable(UNREACHABLE.format(reason=describe(e))) from e
    return conn


class Cursor:
    """Runs one statement at a time on a connection, each bounded by the timeout."""

    def __init__(self, reactor: Any, conn: _Connection, seconds: float) -> None:
        self._reactor = reactor
        self.conn = conn
        self._seconds = seconds

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        """Runs ``sql`` with ``params``; fires with the rows it returns (``[]`` if none)."""
        cursor = self.conn.cursor()
        d = cursor.execute(sql, tuple(params) if params else None)
        await bounded(self._reactor, d, self.conn, self._seconds)
        if cursor.description is None:
            return []
        return list(cursor.fetchall())


class _Link:
    """One pooled connection slot, (re)connected on demand."""

    def __init__(self) -> None:
        self.conn: Optional[_Connection] = None

    @property
    def alive(self) -> bool:
        return self.conn is not None and self.conn.is_open

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.shut()


# -- the store ------------------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Remote:
    """A cluster event written by another node, waiting to be applied."""

    event_id: str
    at: float
    entity: str
    op: str
    id: str


class MigrationsNeeded(StoreError):
    """The database was never bootstrapped, or has pending migrations (``str()`` says what to run)."""


@implementer(IStore)
class PostgresStore(ListenerRegistry):
    """The shared store: rows in Postgres, changes broadcast to every node.

    :param entities: the entity metadata (``kongtx.schema.store_metas()``).
    :param settings: a :class:`PgSettings`.
    :param reactor: the reactor (``IReactorTime`` and ``IReactorFDSet``).
    :param node_id: this node's id (written in ``cluster_events.node_id``).
    :param migrations: the migrations this release expects to have run
        (default: every file of ``kongtx.store.migrations``).
    """

    def __init__(
        self,
        entities: Mapping[str, EntityMeta],
        settings: PgSettings,
        reactor: Any,
        node_id: str,
        migrations: Optional[Sequence[Any]] = None,
    ) -> None:
        self._references = references(entities)
        self._tables: Dict[str, PgTable] = {name: PgTable.of(meta) for name, meta in entities.items()}
        self._constraints = {name: t.constraint_fields() for name, t in self._tables.items()}
        self.settings = settings
        self._reactor = reactor
        self.node_id = node_id
        self._migrations = migrations
        self._listeners: List[Callable[[ChangeEvent], Any]] = []
        self._links = [_Link() for _ in range(settings.pool_size)]
        self._idle = list(self._links)
        self._slots = defer.DeferredSemaphore(settings.pool_size)
        self._running = False
        self._listen: Optional[_Connection] = None
        self._supervisor: Optional[defer.Deferred[None]] = None
        self._wake: Optional[defer.Deferred[None]] = None
        self._remote: List[_Remote] = []
        self._draining = False
        self._drained: Optional[defer.Deferred[None]] = None
        #: ``True`` while the database answers; reads and writes fail at once when ``False``.
        self.reachable = False
        self._unreachable_reason = NOT_STARTED
        #: Position of the newest cluster event applied (database epoch seconds).
        self.last_event_at = 0.0
        #: Event id -> ``at`` of the events seen recently (so none is applied twice).
        self._seen: Dict[str, float] = {}
        #: Seconds between a remote event's commit and its delivery to listeners
        #: (local clock minus the database's; includes any clock skew).
        self.last_event_delay: Optional[float] = None
        #: Remote events delivered to listeners so far (for tests and ``/status``).
        self.events_applied = 0
        self._last_purge = 0.0
        self._last_counter_purge = 0.0

    @classmethod
    def from_config(
        cls, config: Any, entities: Mapping[str, EntityMeta], reactor: Any, node_id: str
    ) -> PostgresStore:
        """A store for the ``pg_*`` properties of ``config``."""
        return cls(entities, PgSettings.from_config(config), reactor, node_id)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """Connects, checks the migrations and starts listening. Fires with ``None``.

        Fails with :class:`StoreUnavailable` if the database cannot be reached,
        or :class:`MigrationsNeeded` if it needs ``kongtx migrations bootstrap``
        or ``up``.
        """
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self._running:
            return
        self._running = True
        self._unreachable_reason = NOT_STARTED
        try:
            listen = await open_connection(self._reactor, self.settings, self._listen_lost)
            self._listen = listen
            cursor = self._cursor(listen)
            await self._check_schema(cursor)
            rows = await cursor.execute("SELECT extract(epoch FROM now())::float8")
            self.last_event_at = float(rows[0][0])
            listen.addNotifyObserver(self._on_notify)
            await cursor.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            self._running = False
            if self._listen is not None:
                self._listen.shut()
                self._listen = None
            raise
        self._set_reachable()
        self._supervisor = defer.Deferred.fromCoroutine(self._supervise())
        self._supervisor.addErrback(lambda f: log.failure("Postgres supervisor failed", f))

    def stop(self) -> defer.Deferred[None]:
        """Closes every connection. Fires with ``None``."""
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self.reachable = False
        self._unreachable_reason = NOT_STARTED
        self._wake_up()
        if self._listen is not None:
            self._listen.shut()
        for link in self._links:
            link.close()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await supervisor
        if self._drained is not None:
            await self._drained

    def ping(self) -> defer.Deferred[bool]:
        """Fires with ``True`` if ``SELECT 1`` answers in time; ``False`` at once when unreachable."""
        if not self._running or not self.reachable:
            return defer.succeed(False)

        async def probe(cursor: Cursor) -> bool:
            return (await cursor.execute("SELECT 1")) == [(1,)]

        d = defer.Deferred.fromCoroutine(self._with_cursor(probe))
        d.addErrback(lambda _: False)
        return d

    # -- reads ------------------------------------------------------------------------

    def get(self, entity: str, id: str) -> defer.Deferred[Optional[Row]]:
        """Fires with the row whose id is ``id``, or ``None``."""
        try:
            self._table(entity)
        except Exception:
            return defer.fail()
        return self._read(lambda c: self._get(c, entity, "id", id))

    def get_by(self, entity: str, field: str, value: Any) -> defer.Deferred[Optional[Row]]:
        """Fires with the row whose unique ``field`` equals ``value``, or ``None``."""
        try:
            table = self._table(entity)
            if field != "id" and field not in table.meta.unique:
                raise UnsupportedFilter(entity, field)
            value = column_value(entity, field, index_value(table.meta, field, value))
        except Exception:
            return defer.fail()
        if value is None:
            return defer.succeed(None)
        return self._read(lambda c: self._get(c, entity, field, value))

    def page(
        self,
        entity: str,
        size: int,
        offset: Optional[str] = None,
        where: Optional[Mapping[str, Any]] = None,
    ) -> defer.Deferred[Tuple[List[Row], Optional[str]]]:
        """Fires with ``(rows, next_offset)``; see ``IStore.page``."""
        try:
            if size < 1:
                raise ValueError(f"page size must be at least 1, got {size!r}")
            table = self._table(entity)
            filters = normalize_where(table.meta, where)
            after = decode_offset(offset) if offset is not None else None
        except Exception:
            return defer.fail()
        return self._read(lambda c: self._page(c, table, size, after, filters))

    def all(self, entity: str, where: Optional[Mapping[str, Any]] = None) -> defer.Deferred[List[Row]]:
        """Fires with every (matching) row in listing order."""
        try:
            table = self._table(entity)
            filters = normalize_where(table.meta, where)
        except Exception:
            return defer.fail()
        return self._read(lambda c: self._select(c, table, filters, None, None))

    # -- writes -----------------------------------------------------------------------

    def insert(self, entity: str, row: Row) -> defer.Deferred[Row]:
        """Stores a new row; fires with the stored row. See ``IStore.insert``."""
        return self._write(self._insert, entity, row)

    def update(self, entity: str, row: Row) -> defer.Deferred[Row]:
        """Replaces the row with ``row["id"]``; fires with the stored row."""
        return self._write(self._update, entity, row)

    def delete(self, entity: str, id: str) -> defer.Deferred[bool]:
        """Deletes a row (applying ``on_delete``) in one transaction; fires ``False`` if absent."""
        try:
            self._table(entity)
        except Exception:
            return defer.fail()
        return defer.Deferred.fromCoroutine(
            self._transact(lambda c, events: self._delete_root(c, events, entity, id))
        )

    # -- counters ---------------------------------------------------------------------

    def increment(
        self,
        counter_key: str,
        window_start: int,
        ttl: int,
        amount: int = 1,
        limit: Optional[int] = None,
    ) -> defer.Deferred[int]:
        """Adds to a counter with one ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``.

        See ``IStore.increment``. The limit is checked in the statement's
        ``WHERE``, under the row lock the upsert takes: exact across nodes.
        Never retried (the addition may have happened).
        """
        amount = int(amount)
        if limit is not None and amount > limit:
            return defer.succeed(amount)
        params = [counter_key, int(window_start), amount, int(window_start) + int(ttl), limit, limit]

        async def add(cursor: Cursor) -> int:
            rows = await cursor.execute(COUNTER_UPSERT, params)
            now = self._reactor.seconds()
            if now - self._last_counter_purge >= PURGE_INTERVAL:
                self._last_counter_purge = now
                await cursor.execute(COUNTER_PURGE, [int(window_start)])
            if not rows:
                assert limit is not None
                return limit + amount
            return int(rows[0][0])

        return defer.Deferred.fromCoroutine(self._with_cursor(add))

    # -- listeners --------------------------------------------------------------------

    # -- plumbing ---------------------------------------------------------------------

    def _table(self, entity: str) -> PgTable:
        try:
            return self._tables[entity]
        except KeyError:
            raise ValueError(f"unknown entity {entity!r}") from None

    def _cursor(self, conn: _Connection) -> Cursor:
        return Cursor(self._reactor, conn, self.settings.timeout_seconds)

    def _set_reachable(self) -> None:
        if not self.reachable and self._unreachable_reason != NOT_STARTED:
            log.info("database reachable again")
        self.reachable = True
        self._unreachable_reason = ""

    def _set_unreachable(self, reason: str) -> None:
        if not self._running:
            return
        if self.reachable or self._unreachable_reason == NOT_STARTED:
            log.warn("database unreachable: {reason}; retrying", reason=reason)
        self.reachable = False
        self._unreachable_reason = UNREACHABLE.format(reason=reason)

    async def _with_cursor(self, work: Callable[[Cursor], Awaitable[_T]], retry: bool = False) -> _T:
        """Runs ``work(cursor)`` on a pooled connection (connecting it if needed).

        A connection-level failure closes that connection and fails with
        :class:`StoreUnavailable`; with ``retry`` (reads) it is tried once more
        on a fresh connection first.
        """
        if not self._running:
            raise StoreUnavailable(NOT_STARTED)
        if not self.reachable:
            raise StoreUnavailable(self._unreachable_reason)
        await self._slots.acquire()
        link = self._idle.pop()
        try:
            attempts = 2 if retry else 1
            while True:
                attempts -= 1
                fresh = not link.alive
                if fresh:
                    link.close()
                    try:
                        link.conn = await open_connection(self._reactor, self.settings)
                    except StoreUnavailable as e:
                        self._set_unreachable(e.reason)
                        self._wake_up()
                        raise
                    if not self._running:
                        raise StoreUnavailable(NOT_STARTED)
                assert link.conn is not None
                try:
                    return await work(self._cursor(link.conn))
                except Exception as e:
                    if not is_connection_error(e):
                        raise
                    link.close()
                    if isinstance(e, QueryTimeout):
                        # The server does not answer: fail fast until the supervisor sees it back.
                        self._set_unreachable(e.reason)
                        self._wake_up()
                        raise
                    if attempts > 0 and not fresh and self._running:
                        continue
                    if isinstance(e, StoreUnavailable):
                        raise
                    raise StoreUnavailable(describe(e)) from e
        finally:
            self._idle.append(link)
            self._slots.release()

    def _read(self, work: Callable[[Cursor], Awaitable[_T]]) -> defer.Deferred[_T]:
        return defer.Deferred.fromCoroutine(self._with_cursor(work, retry=True))

    def _write(self, work: Callable[..., Awaitable[Row]], entity: str, row: Row) -> defer.Deferred[Row]:
        try:
            table = self._table(entity)
            row_id(table.meta, row)
            doc = _dumps(row)  # a private copy, taken before the caller can mutate it
            table.values(row)
        except Exception:
            return defer.fail()
        return defer.Deferred.fromCoroutine(
            self._transact(lambda c, events: work(c, events, table, doc))
        )

    async def _transact(self, work: Callable[[Cursor, List[ChangeEvent]], Awaitable[_T]]) -> _T:
        """Runs ``work`` in one transaction that also records and notifies its events."""

        async def transaction(cursor: Cursor) -> Tuple[_T, List[ChangeEvent]]:
            events: List[ChangeEvent] = []
            await cursor.execute("BEGIN")
            try:
                result = await work(cursor, events)
                if events:
                    await self._broadcast(cursor, events)
                await cursor.execute("COMMIT")
            except BaseException:
                if cursor.conn.is_open:
                    try:
                        await cursor.execute("ROLLBACK")
                    except Exception:
                        cursor.conn.shut()
                raise
            return result, events

        result, events = await self._with_cursor(transaction)
        notify(self._listeners, events)
        return result

    async def _broadcast(self, cursor: Cursor, events: List[ChangeEvent]) -> None:
        """Inserts one ``cluster_events`` row per event and notifies them (in the transaction)."""
        params: List[Any] = []
        values = []
        for event in events:
            data = _dumps({"entity": event.entity, "op": event.op, "id": event.id})
            values.append("(%s, %s, %s, %s)")
            params += [str(uuid.uuid4()), self.node_id, CHANNEL, data]
        rows = await cursor.execute(
            "INSERT INTO cluster_events (id, node_id, channel, data) VALUES "
            + ", ".join(values)
            + " RETURNING id::text, extract(epoch FROM at)::float8",
            params,
        )
        payloads = [
            _dumps({"e": event_id, "n": self.node_id, "at": at, "t": e.entity, "o": e.op, "i": e.id})
            for (event_id, at), e in zip(rows, events)
        ]
        await cursor.execute(
            "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", [CHANNEL, payloads]
        )

    # -- schema check -----------------------------------------------------------------

    async def _check_schema(self, cursor: Cursor) -> None:
        from kongtx.store import migrations as runner

        expected = self._migrations if self._migrations is not None else runner.known_migrations()
        executed = await runner.executed_names(cursor.execute)
        if not executed:
            raise MigrationsNeeded(NOT_BOOTSTRAPPED)
        pending = [m.name for m in expected if m.name not in executed]
        if pending:
            raise MigrationsNeeded(PENDING_MIGRATIONS.format(names=", ".join(pending)))
        present: Dict[str, Set[str]] = {}
        for table, column in await cursor.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        ):
            present.setdefault(table, set()).add(column)
        for table in self._tables.values():
            if table.name not in present:
                raise MigrationsNeeded(MISSING_TABLE.format(table=table.name))
            for column in table.required_columns():
                if column not in present[table.name]:
                    raise MigrationsNeeded(MISSING_COLUMN.format(table=table.name, column=column))

    # -- reads (in a connection) --------------------------------------------------------

    async def _get(self, c: Cursor, entity: str, field: str, value: Any) -> Optional[Row]:
        column = self._tables[entity].columns[field]
        found = await c.execute(
            f"SELECT doc::text FROM {quote(entity)} WHERE {quote(column)} = %s", [value]
        )
        return json.loads(found[0][0]) if found else None

    async def _select(
        self,
        c: Cursor,
        table: PgTable,
        filters: Mapping[str, Any],
        after: Optional[Tuple[Any, str]],
        limit: Optional[int],
    ) -> List[Row]:
        conditions: List[str] = []
        params: List[Any] = []
        for field, value in filters.items():
            column = quote(table.columns[field])
            value = column_value(table.name, field, value)
            if value is None:
                conditions.append(f"{column} IS NULL")
            else:
                conditions.append(f"{column} = %s")
                params.append(value)
        if after is not None:
            condition, values = table.after_sql(*after)
            conditions.append(condition)
            params.extend(values)
        sql = f"SELECT doc::text FROM {quote(table.name)}"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += " " + table.order_sql()
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)
        return [json.loads(doc) for (doc,) in await c.execute(sql, params)]

    async def _page(
        self,
        c: Cursor,
        table: PgTable,
        size: int,
        after: Optional[Tuple[Any, str]],
        filters: Mapping[str, Any],
    ) -> Tuple[List[Row], Optional[str]]:
        rows = await self._select(c, table, filters, after, size + 1)
        if len(rows) <= size:
            return rows, None
        rows = rows[:size]
        last = rows[-1]
        return rows, encode_offset(order_value(table.meta, last), last["id"])

    # -- writes (in a transaction) ------------------------------------------------------

    async def _load(self, c: Cursor, entity: str, id: str, lock: str = "") -> Optional[str]:
        found = await c.execute(
            f"SELECT doc::text FROM {quote(entity)} WHERE id = %s {lock}", [id]
        )
        return found[0][0] if found else None

    async def _check_foreign(self, c: Cursor, table: PgTable, row: Row) -> None:
        for field, fk in table.meta.foreign.items():
            value = row.get(field)
            target = foreign_id(value)
            if target is None:
                continue
            # KEY SHARE holds the referenced row until commit: a concurrent delete waits.
            found = await c.execute(
                f"SELECT 1 FROM {quote(fk.entity)} WHERE id = %s FOR KEY SHARE", [target]
            )
            if not found:
                raise ForeignKeyViolation(table.name, field, fk.entity, value)

    def _unique_violation(self, table: PgTable, row: Row, e: psycopg2.Error) -> UniqueViolation:
        name = getattr(getattr(e, "diag", None), "constraint_name", None) or ""
        field = self._constraints[table.name].get(name, "id")
        if field == "cache_key":
            return UniqueViolation(table.name, cache_key_fields(table.meta, row))
        if field == "id":
            return UniqueViolation(table.name, {"id": row["id"]})
        return UniqueViolation(table.name, {field: row.get(field)})

    async def _store(
        self, c: Cursor, events: List[ChangeEvent], table: PgTable, doc: str, old: Optional[str]
    ) -> Row:
        """Writes ``doc`` (inserting if ``old`` is ``None``) and records the event."""
        row = json.loads(doc)
        values = table.values(row)
        values["doc"] = doc
        columns = list(values)
        quoted = quote(table.name)
        try:
            if old is None:
                await c.execute(
                    f"INSERT INTO {quoted} ({', '.join(quote(col) for col in columns)}) "
                    f"VALUES ({', '.join('%s' for _ in columns)})",
                    [values[col] for col in columns],
                )
            else:
                await c.execute(
                    f"UPDATE {quoted} SET {', '.join(quote(col) + ' = %s' for col in columns)} "
                    "WHERE id = %s",
                    [values[col] for col in columns] + [row["id"]],
                )
        except psycopg2.IntegrityError as e:
            if not is_unique_violation(e):
                raise
            raise self._unique_violation(table, row, e) from None
        op = "create" if old is None else "update"
        events.append(
            ChangeEvent(table.name, op, row["id"], json.loads(old) if old else None, json.loads(doc))
        )
        return json.loads(doc)

    async def _insert(self, c: Cursor, events: List[ChangeEvent], table: PgTable, doc: str) -> Row:
        row = json.loads(doc)
        if await self._load(c, table.name, row["id"]) is not None:
            raise UniqueViolation(table.name, {"id": row["id"]})
        await self._check_foreign(c, table, row)
        return await self._store(c, events, table, doc, None)

    async def _update(self, c: Cursor, events: List[ChangeEvent], table: PgTable, doc: str) -> Row:
        row = json.loads(doc)
        old = await self._load(c, table.name, row["id"], "FOR UPDATE")
        if old is None:
            raise NotFoundError(table.name, row["id"])
        await self._check_foreign(c, table, row)
        return await self._store(c, events, table, doc, old)

    async def _delete_root(self, c: Cursor, events: List[ChangeEvent], entity: str, id: str) -> bool:
        if await self._load(c, entity, id, "FOR UPDATE") is None:
            return False
        await self._delete(c, events, entity, id, set())
        return True

    async def _delete(
        self,
        c: Cursor,
        events: List[ChangeEvent],
        entity: str,
        id: str,
        seen: Set[Tuple[str, str]],
    ) -> None:
        """Deletes one row after applying the ``on_delete`` of everything pointing at it."""
        seen.add((entity, id))
        for ref in self._references[entity]:
            child_table = self._tables[ref.entity]
            column = quote(child_table.columns[ref.field])
            found = await c.execute(
                f"SELECT id FROM {quote(ref.entity)} WHERE {column} = %s ORDER BY id FOR UPDATE",
                [id],
            )
            ids = [child for (child,) in found if (ref.entity, child) not in seen]
            if not ids:
                continue
            if ref.on_delete == "restrict":
                raise ReferencedByOthers(entity, ref.entity)
            for child in ids:
                old = await self._load(c, ref.entity, child)
                if old is None:
                    continue
                if ref.on_delete == "cascade":
                    await self._delete(c, events, ref.entity, child, seen)
                else:
                    row = json.loads(old)
                    row[ref.field] = None
                    await self._store(c, events, child_table, _dumps(row), old)
        old = await self._load(c, entity, id)
        await c.execute(f"DELETE FROM {quote(entity)} WHERE id = %s", [id])
        events.append(ChangeEvent(entity, "delete", id, json.loads(old) if old else None, None))

    # -- cluster events -----------------------------------------------------------------

    def _on_notify(self, notification: Any) -> None:
        """A ``NOTIFY kongtx_events`` arrived on the LISTEN connection."""
        try:
            payload = json.loads(notification.payload)
            remote = _Remote(
                str(payload["e"]), float(payload["at"]), payload["t"], payload["o"], payload["i"]
            )
            node = payload["n"]
        except (ValueError, KeyError, TypeError):
            log.warn("ignoring a malformed cluster event: {payload!r}", payload=notification.payload)
            return
        if node == self.node_id:
            return
        self._enqueue([remote])

    def _enqueue(self, remotes: Sequence[_Remote]) -> None:
        self._remote.extend(remotes)
        if not self._draining:
            self._draining = True
            self._drained = defer.Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        """Applies queued remote events one at a time, in order."""
        try:
            while self._remote and self._running:
                remote = self._remote.pop(0)
                if remote.event_id in self._seen:
                    continue
                if remote.entity not in self._tables:
                    self._mark_seen(remote)
                    continue
                if self.settings.update_propagation > 0:
                    await self._nap_for(self.settings.update_propagation)
                try:
                    await self._apply(remote)
                except Exception as e:
                    # Not marked seen: the next poll brings it back.
                    log.warn(
                        "could not apply cluster event {id}: {reason}",
                        id=remote.event_id,
                        reason=describe(e),
                    )
                    if is_connection_error(e):
                        break
        finally:
            self._draining = False
            if not self._running:
                self._remote.clear()

    async def _apply(self, remote: _Remote) -> None:
        new: Optional[Row] = None
        if remote.op != "delete":
            new = await self._read(lambda c: self._get(c, remote.entity, "id", remote.id))
            if new is None:
                # Deleted since: the delete event follows and says so.
                self._mark_seen(remote)
                return
        self._mark_seen(remote)
        self.last_event_delay = max(0.0, self._reactor.seconds() - remote.at)
        self.events_applied += 1
        notify(self._listeners, [ChangeEvent(remote.entity, remote.op, remote.id, None, new)])

    def _mark_seen(self, remote: _Remote) -> None:
        self._seen[remote.event_id] = remote.at
        if remote.at > self.last_event_at:
            self.last_event_at = remote.at

    def _forget_old(self) -> None:
        horizon = self.last_event_at - POLL_OFFSET - 1.0
        for event_id in [k for k, at in self._seen.items() if at < horizon]:
            del self._seen[event_id]

    async def _poll(self, cursor: Cursor) -> None:
        """Queues the cluster events of other nodes since the last position (minus the offset)."""
        since = self.last_event_at - POLL_OFFSET
        now = float((await cursor.execute("SELECT extract(epoch FROM now())::float8"))[0][0])
        if now - since > EVENT_RETENTION:
            # Events may have been purged while we were away: reload everything.
            self.last_event_at = now
            self._forget_old()
            log.warn("cluster events older than the retention were missed; reloading")
            notify(self._listeners, [ChangeEvent("*", "reload", "", None, None)])
            return
        last_at, last_id = since, ""
        while True:
            rows = await cursor.execute(
                "SELECT id::text, extract(epoch FROM at)::float8, data FROM cluster_events "
                "WHERE channel = %s AND node_id <> %s "
                "AND (at, id::text) > (to_timestamp(%s), %s) "
                "ORDER BY at, id::text LIMIT %s",
                [CHANNEL, self.node_id, last_at, last_id, POLL_BATCH],
            )
            remotes = []
            for event_id, at, data in rows:
                last_at, last_id = float(at), event_id
                if event_id in self._seen:
                    continue
                try:
                    body = json.loads(data)
                    remotes.append(_Remote(event_id, float(at), body["entity"], body["op"], body["id"]))
                except (ValueError, KeyError, TypeError):
                    log.warn("ignoring a malformed cluster event {id}", id=event_id)
            if remotes:
                self._enqueue(remotes)
            if len(rows) < POLL_BATCH:
                break
        self._forget_old()
        if now - self._last_purge >= PURGE_INTERVAL:
            self._last_purge = now
            await cursor.execute(
                "DELETE FROM cluster_events WHERE at < now() - make_interval(secs => %s)",
                [EVENT_RETENTION],
            )

    # -- the supervisor: LISTEN connection, polling, reconnection -----------------------

    def _listen_lost(self) -> None:
        self._wake_up()

    def _wake_up(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.called:
            wake.callback(None)

    async def _nap(self, seconds: float) -> None:
        """Sleeps ``seconds``, or less if woken (connection lost, pool failure, stop)."""
        wake: defer.Deferred[None] = defer.Deferred()
        self._wake = wake
        call = self._reactor.callLater(seconds, self._wake_up)
        try:
            await wake
        finally:
            if call.active():
                call.cancel()

    async def _nap_for(self, seconds: float) -> None:
        d: defer.Deferred[None] = defer.Deferred()
        self._reactor.callLater(seconds, d.callback, None)
        await d

    async def _supervise(self) -> None:
        """Keeps the LISTEN connection up, polls, and reconnects with backoff."""
        delay = BACKOFF_INITIAL
        connected = True  # start() opened the first connection
        while self._running:
            if not connected:
                try:
                    listen = await open_connection(self._reactor, self.settings, self._listen_lost)
                    if not self._running:
                        listen.shut()
                        return
                    self._listen = listen
                    listen.addNotifyObserver(self._on_notify)
                    await self._cursor(listen).execute(f"LISTEN {CHANNEL}")
                except Exception as e:
                    if self._listen is not None:
                        self._listen.shut()
                        self._listen = None
                    self._set_unreachable(describe(e))
                    await self._nap(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                delay = BACKOFF_INITIAL
                self._set_reachable()
            listen = self._listen
            assert listen is not None
            try:
                cursor = self._cursor(listen)
                if not connected:
                    await self._poll(cursor)  # catch up on what was missed while away
                connected = False
                while self._running and listen.is_open:
                    await self._nap(self.settings.update_frequency)
                    if not (self._running and listen.is_open):
                        break
                    await self._poll(cursor)
                    self._set_reachable()
            except Exception as e:
                if self._running:
                    log.info("Postgres LISTEN connection failed: {reason}", reason=describe(e))
            connected = False
            listen.shut()
            self._listen = None
