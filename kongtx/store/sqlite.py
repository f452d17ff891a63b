"""``SQLiteStore``: the embedded :class:`~kongtx.store.interface.IStore` (the default).

All database work runs on one dedicated thread (a single-thread
``ThreadPool``) that owns the only connection; the reactor thread never touches
SQLite. The file is created on first start (``CREATE TABLE IF NOT EXISTS``,
WAL journal): one table per entity with ``id``, one column per unique field,
``<field>_id`` per foreign key, ``cache_key`` when the entity has one, an
ordering column when ``order_by`` is not ``id``, and ``doc`` holding the JSON
row. Unique indexes enforce uniqueness; foreign keys are checked inside the
write transaction. ``PRAGMA user_version`` records the schema version.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from typing import (
    Any,
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
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

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

#: The layout version written to ``PRAGMA user_version``.
SCHEMA_VERSION = 1

NOT_STARTED = "the SQLite store is not started"
NEWER_SCHEMA = "database schema version {found} is newer than this kongtx supports ({ours})"
MISSING_COLUMN = "table '{table}' has no column '{column}': the database needs a migration"

#: The rate-limiting counters (``IStore.increment``), beside the entity tables.
COUNTERS_TABLE = "ratelimiting_counters"
COUNTERS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {COUNTERS_TABLE} ("
    "key TEXT NOT NULL, window_start INTEGER NOT NULL, value INTEGER NOT NULL, "
    "expires_at INTEGER NOT NULL, PRIMARY KEY (key, window_start))",
    f"CREATE INDEX IF NOT EXISTS {COUNTERS_TABLE}_expires_idx ON {COUNTERS_TABLE} (expires_at)",
)
#: Expired counters are deleted after this many new counters.
SWEEP_EVERY = 1000

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_COLUMNS = ("id", "doc", "cache_key")

_T = TypeVar("_T")


def _quote(name: str) -> str:
    return '"' + name + '"'


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _scalar(entity: str, field: str, value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise ValueError(f"{entity}.{field} must be a scalar to be indexed, got {value!r}")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Table:
    """How one entity maps onto one SQLite table."""

    meta: EntityMeta
    #: field -> column, for ``id``, unique fields and foreign keys.
    columns: Mapping[str, str]
    #: the column rows are ordered by (besides ``id``), or ``None``.
    order_column: Optional[str]

    @classmethod
    def of(cls, meta: EntityMeta) -> _Table:
        if not _IDENTIFIER.match(meta.name):
            raise ValueError(f"entity name {meta.name!r} is not a valid table name")
        columns = {"id": "id"}
        for field in tuple(meta.unique) + tuple(meta.foreign):
            if not _IDENTIFIER.match(field):
                raise ValueError(f"{meta.name}.{field} is not a valid column name")
            columns[field] = field + "_id" if field in meta.foreign else field
        order_column = None
        if meta.order_by != "id":
            if meta.order_by in meta.unique and meta.order_by not in meta.foreign:
                order_column = columns[meta.order_by]
            elif _IDENTIFIER.match(meta.order_by):
                order_column = "order_" + meta.order_by
            else:
                raise ValueError(f"{meta.name}.{meta.order_by} is not a valid column name")
        named = [c for f, c in columns.items() if f != "id"]
        if order_column is not None and order_column not in columns.values():
            named.append(order_column)
        if len(set(named)) != len(named) or set(named) & set(_RESERVED_COLUMNS):
            raise ValueError(f"the columns of {meta.name} collide: {named!r}")
        return cls(meta, columns, order_column)

    @property
    def name(self) -> str:
        return self.meta.name

    def ddl(self) -> List[str]:
        """The statements creating this table and its indexes if missing."""
        table = _quote(self.name)
        defs = ["id TEXT PRIMARY KEY NOT NULL"]
        defs += [_quote(c) for f, c in self.columns.items() if f != "id"]
        if self.meta.cache_key is not None:
            defs.append("cache_key TEXT UNIQUE")
        if self.order_column is not None and self.order_column not in self.columns.values():
            defs.append(_quote(self.order_column))
        defs.append("doc TEXT NOT NULL")
        statements = [f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(defs)})"]
        for field, column in self.columns.items():
            if field == "id":
                continue
            kind = "UNIQUE INDEX" if field in self.meta.unique else "INDEX"
            index = _quote(f"{self.name}_{column}_idx")
            statements.append(f"CREATE {kind} IF NOT EXISTS {index} ON {table} ({_quote(column)})")
        if self.order_column is not None:
            index = _quote(f"{self.name}_{self.order_column}_order_idx")
            statements.append(
                f"CREATE INDEX IF NOT EXISTS {index} ON {table} ({_quote(self.order_column)}, id)"
            )
        return statements

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
            values[column] = _scalar(self.name, field, value)
        if self.meta.cache_key is not None:
            values["cache_key"] = cache_key_text(self.meta, row)
        if self.order_column is not None:
            values[self.order_column] = order_value(self.meta, row)
        return values

    def order_sql(self) -> str:
        if self.order_column is None:
            return "ORDER BY id"
        return f"ORDER BY {_quote(self.order_column)}, id"

    def after_sql(self, value: Any, id: str) -> Tuple[str, List[Any]]:
        """The keyset condition selecting rows after (``value``, ``id``) in listing order."""
        if self.order_column is None:
            return "id > ?", [id]
        column = _quote(self.order_column)
        if value is None:
            return f"({column} IS NOT NULL OR id > ?)", [id]
        return f"({column} > ? OR ({column} = ? AND id > ?))", [value, value, id]


def _connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=10.0, isolation_level=None)


@implementer(IStore)
class SQLiteStore(ListenerRegistry):
    """An embedded store in one SQLite file; all SQL runs on a private thread."""

    def __init__(
        self,
        entities: Mapping[str, EntityMeta],
        path: str,
        reactor: Any,
        connect: Callable[[str], sqlite3.Connection] = _connect,
    ) -> None:
        self._references = references(entities)
        self._tables: Dict[str, _Table] = {name: _Table.of(meta) for name, meta in entities.items()}
        self._path = path
        self._reactor = reactor
        self._connect = connect
        self._listeners: List[Callable[[ChangeEvent], Any]] = []
        self._pool: Optional[ThreadPool] = None
        self._trigger: Any = None
        # Touched only on the pool's thread.
        self._conn: Optional[sqlite3.Connection] = None
        self._since_sweep = 0

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """Opens the file (creating tables if missing) on a new thread. Fires with ``None``."""
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self._pool is not None:
            return
        pool = ThreadPool(minthreads=1, maxthreads=1, name=f"kongtx-sqlite:{self._path}")
        pool.start()
        self._pool = pool
        self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)
        try:
            await self._call(self._open)
        except BaseException:
            self._shutdown()
            raise

    def stop(self) -> defer.Deferred[None]:
        """Closes the connection and stops the thread. Fires with ``None``."""
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._pool is None:
            return
        try:
            await self._call(self._close)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        """Closes the connection on its thread and joins the thread (also run at reactor shutdown)."""
        pool, self._pool = self._pool, None
        if self._trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass
            self._trigger = None
        if pool is not None:
            pool.callInThread(self._close)
            pool.stop()

    def ping(self) -> defer.Deferred[bool]:
        """Fires with ``True`` if ``SELECT 1`` answers, ``False`` otherwise."""
        if self._pool is None:
            return defer.succeed(False)
        d = self._call(lambda conn: conn.execute("SELECT 1").fetchone() == (1,))
        d.addErrback(lambda _: False)
        return d

    # -- reads ------------------------------------------------------------------

    def get(self, entity: str, id: str) -> defer.Deferred[Optional[Row]]:
        """Fires with the row whose id is ``id``, or ``None``."""
        return self._call(self._get, entity, "id", id)

    def get_by(self, entity: str, field: str, value: Any) -> defer.Deferred[Optional[Row]]:
        """Fires with the row whose unique ``field`` equals ``value``, or ``None``."""
        try:
            table = self._table(entity)
            if field != "id" and field not in table.meta.unique:
                raise UnsupportedFilter(entity, field)
            value = index_value(table.meta, field, value)
        except Exception:
            return defer.fail()
        if value is None:
            return defer.succeed(None)
        return self._call(self._get, entity, field, value)

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
        return self._call(self._page, table, size, after, filters)

    def all(self, entity: str, where: Optional[Mapping[str, Any]] = None) -> defer.Deferred[List[Row]]:
        """Fires with every (matching) row in listing order."""
        try:
            table = self._table(entity)
            filters = normalize_where(table.meta, where)
        except Exception:
            return defer.fail()
        return self._call(self._select, table, filters, None, None)

    # -- writes -----------------------------------------------------------------

    def insert(self, entity: str, row: Row) -> defer.Deferred[Row]:
        """Stores a new row; fires with the stored row. See ``IStore.insert``."""
        return self._write(self._insert, entity, row)

    def update(self, entity: str, row: Row) -> defer.Deferred[Row]:
        """Replaces the row with ``row["id"]``; fires with the stored row."""
        return self._write(self._update, entity, row)

    def delete(self, entity: str, id: str) -> defer.Deferred[bool]:
        """Deletes a row (applying ``on_delete``); fires with ``False`` if it was absent."""
        try:
            self._table(entity)
        except Exception:
            return defer.fail()
        return defer.Deferred.fromCoroutine(self._transact(self._delete_root, entity, id))

    # -- counters ---------------------------------------------------------------

    def increment(
        self,
        counter_key: str,
        window_start: int,
        ttl: int,
        amount: int = 1,
        limit: Optional[int] = None,
    ) -> defer.Deferred[int]:
        """Adds to a counter in one ``BEGIN IMMEDIATE`` transaction; see ``IStore.increment``."""
        return self._call(self._increment, counter_key, int(window_start), int(ttl),
                          int(amount), limit)

    # -- listeners --------------------------------------------------------------

    # -- reactor-side plumbing ----------------------------------------------------

    def _table(self, entity: str) -> _Table:
        try:
            return self._tables[entity]
        except KeyError:
            raise ValueError(f"unknown entity {entity!r}") from None

    def _call(self, work: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """Runs ``work(connection, *args)`` on the store's thread."""
        if self._pool is None:
            return defer.fail(StoreUnavailable(NOT_STARTED))
        return threads.deferToThreadPool(self._reactor, self._pool, self._guarded, work, args)

    def _write(self, work: Callable[..., Row], entity: str, row: Row) -> defer.Deferred[Row]:
        try:
            table = self._table(entity)
            row_id(table.meta, row)
            doc = _dumps(row)  # a private copy, taken before the caller can mutate it
        except Exception:
            return defer.fail()
        return defer.Deferred.fromCoroutine(self._transact(work, table, doc))

    async def _transact(self, work: Callable[..., _T], *args: Any) -> _T:
        result, events = await self._call(self._in_transaction, work, args)
        notify(self._listeners, events)
        return result

    # -- thread side: everything below runs on the pool's thread -----------------

    def _guarded(self, work: Callable[..., _T], args: Sequence[Any]) -> _T:
        assert threading.current_thread() is not threading.main_thread()
        if self._conn is None and work not in (self._open, self._close):
            raise StoreUnavailable(NOT_STARTED)
        try:
            return work(self._conn, *args)
        except sqlite3.IntegrityError as e:
            # Unique violations are translated where they happen; anything else is a bug.
            raise StoreError(f"IntegrityError: {e}") from e
        except sqlite3.Error as e:
            raise StoreUnavailable(f"{type(e).__name__}: {e}") from e

    def _open(self, _: None) -> None:
        conn = self._connect(self._path)
        try:
            conn.isolation_level = None
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(NEWER_SCHEMA.format(found=version, ours=SCHEMA_VERSION))
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in COUNTERS_DDL:
                    conn.execute(statement)
                for table in self._tables.values():
                    create, *indexes = table.ddl()
                    conn.execute(create)
                    present = {r[1] for r in conn.execute(f"PRAGMA table_info({_quote(table.name)})")}
                    for column in table.required_columns():
                        if column in present:
                            continue
                        if column in _RESERVED_COLUMNS:
                            raise StoreError(MISSING_COLUMN.format(table=table.name, column=column))
                        # A field this release indexes (a new foreign key or unique
                        # field): nullable, so older rows simply have none.
                        conn.execute(f"ALTER TABLE {_quote(table.name)} ADD COLUMN {_quote(column)}")
                    for statement in indexes:
                        conn.execute(statement)
                if version < SCHEMA_VERSION:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _increment(
        self, conn: sqlite3.Connection, key: str, window_start: int, ttl: int, amount: int,
        limit: Optional[int],
    ) -> int:
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute(
                f"SELECT value FROM {COUNTERS_TABLE} WHERE key = ? AND window_start = ?",
                (key, window_start),
            ).fetchone()
            value = (found[0] if found is not None else 0) + amount
            if limit is None or value <= limit:
                if found is None:
                    conn.execute(
                        f"INSERT INTO {COUNTERS_TABLE} (key, window_start, value, expires_at) "
                        "VALUES (?, ?, ?, ?)",
                        (key, window_start, value, window_start + ttl),
                    )
                    self._since_sweep += 1
                    if self._since_sweep >= SWEEP_EVERY:
                        self._since_sweep = 0
                        conn.execute(
                            f"DELETE FROM {COUNTERS_TABLE} WHERE expires_at < ?", (window_start,)
                        )
                else:
                    conn.execute(
                        f"UPDATE {COUNTERS_TABLE} SET value = ? WHERE key = ? AND window_start = ?",
                        (value, key, window_start),
                    )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return value

    def _close(self, _: Any = None) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _in_transaction(
        self, conn: sqlite3.Connection, work: Callable[..., _T], args: Sequence[Any]
    ) -> Tuple[_T, List[ChangeEvent]]:
        events: List[ChangeEvent] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn, events, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result, events

    def _get(self, conn: sqlite3.Connection, entity: str, field: str, value: Any) -> Optional[Row]:
        table = self._tables[entity]
        column = table.columns[field]
        found = conn.execute(
            f"SELECT doc FROM {_quote(entity)} WHERE {_quote(column)} = ?", (value,)
        ).fetchone()
        return json.loads(found[0]) if found is not None else None

    def _select(
        self,
        conn: sqlite3.Connection,
        table: _Table,
        filters: Mapping[str, Any],
        after: Optional[Tuple[Any, str]],
        limit: Optional[int],
    ) -> List[Row]:
        conditions: List[str] = []
        params: List[Any] = []
        for field, value in filters.items():
            column = _quote(table.columns[field])
            if value is None:
                conditions.append(f"{column} IS NULL")
            else:
                conditions.append(f"{column} = ?")
                params.append(value)
        if after is not None:
            condition, values = table.after_sql(*after)
            conditions.append(condition)
            params.extend(values)
        sql = f"SELECT doc FROM {_quote(table.name)}"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += " " + table.order_sql()
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [json.loads(doc) for (doc,) in conn.execute(sql, params)]

    def _page(
        self,
        conn: sqlite3.Connection,
        table: _Table,
        size: int,
        after: Optional[Tuple[Any, str]],
        filters: Mapping[str, Any],
    ) -> Tuple[List[Row], Optional[str]]:
        rows = self._select(conn, table, filters, after, size + 1)
        if len(rows) <= size:
            return rows, None
        rows = rows[:size]
        last = rows[-1]
        return rows, encode_offset(order_value(table.meta, last), last["id"])

    def _load(self, conn: sqlite3.Connection, entity: str, id: str) -> Optional[str]:
        found = conn.execute(f"SELECT doc FROM {_quote(entity)} WHERE id = ?", (id,)).fetchone()
        return found[0] if found is not None else None

    def _check_foreign(self, conn: sqlite3.Connection, table: _Table, row: Row) -> None:
        for field, fk in table.meta.foreign.items():
            value = row.get(field)
            target = foreign_id(value)
            if target is not None and self._load(conn, fk.entity, target) is None:
                raise ForeignKeyViolation(table.name, field, fk.entity, value)

    def _conflict(self, conn: sqlite3.Connection, table: _Table, row: Row) -> Dict[str, Any]:
        """Finds which unique constraint ``row`` breaks (after an ``IntegrityError``)."""
        quoted = _quote(table.name)
        id = row["id"]
        for field in table.meta.unique:
            value = row.get(field)
            if value is None:
                continue
            column = _quote(table.columns[field])
            lookup = index_value(table.meta, field, value)
            if conn.execute(
                f"SELECT 1 FROM {quoted} WHERE {column} = ? AND id != ?", (lookup, id)
            ).fetchone():
                return {field: value}
        if table.meta.cache_key is not None:
            text = cache_key_text(table.meta, row)
            if conn.execute(
                f"SELECT 1 FROM {quoted} WHERE cache_key = ? AND id != ?", (text, id)
            ).fetchone():
                return cache_key_fields(table.meta, row)
        return {"id": id}

    def _store(
        self,
        conn: sqlite3.Connection,
        events: List[ChangeEvent],
        table: _Table,
        doc: str,
        old: Optional[str],
    ) -> Row:
        """Writes ``doc`` (inserting if ``old`` is ``None``) and records the event."""
        row = json.loads(doc)
        values = table.values(row)
        values["doc"] = doc
        columns = list(values)
        quoted = _quote(table.name)
        try:
            if old is None:
                conn.execute(
                    f"INSERT INTO {quoted} ({', '.join(_quote(c) for c in columns)}) "
                    f"VALUES ({', '.join('?' for _ in columns)})",
                    [values[c] for c in columns],
                )
            else:
                conn.execute(
                    f"UPDATE {quoted} SET {', '.join(_quote(c) + ' = ?' for c in columns)} "
                    "WHERE id = ?",
                    [values[c] for c in columns] + [row["id"]],
                )
        except sqlite3.IntegrityError:
            raise UniqueViolation(table.name, self._conflict(conn, table, row)) from None
        op = "create" if old is None else "update"
        events.append(
            ChangeEvent(table.name, op, row["id"], json.loads(old) if old else None, json.loads(doc))
        )
        return json.loads(doc)

    def _insert(
        self, conn: sqlite3.Connection, events: List[ChangeEvent], table: _Table, doc: str
    ) -> Row:
        row = json.loads(doc)
        if self._load(conn, table.name, row["id"]) is not None:
            raise UniqueViolation(table.name, {"id": row["id"]})
        table.values(row)
        self._check_foreign(conn, table, row)
        return self._store(conn, events, table, doc, None)

    def _update(
        self, conn: sqlite3.Connection, events: List[ChangeEvent], table: _Table, doc: str
    ) -> Row:
        row = json.loads(doc)
        old = self._load(conn, table.name, row["id"])
        if old is None:
            raise NotFoundError(table.name, row["id"])
        table.values(row)
        self._check_foreign(conn, table, row)
        return self._store(conn, events, table, doc, old)

    def _delete_root(
        self, conn: sqlite3.Connection, events: List[ChangeEvent], entity: str, id: str
    ) -> bool:
        if self._load(conn, entity, id) is None:
            return False
        self._delete(conn, events, entity, id, set())
        return True

    def _delete(
        self,
        conn: sqlite3.Connection,
        events: List[ChangeEvent],
        entity: str,
        id: str,
        seen: Set[Tuple[str, str]],
    ) -> None:
        """Deletes one row after applying the ``on_delete`` of everything pointing at it."""
        seen.add((entity, id))
        for ref in self._references[entity]:
            child_table = self._tables[ref.entity]
            column = _quote(child_table.columns[ref.field])
            ids = [
                child
                for (child,) in conn.execute(
                    f"SELECT id FROM {_quote(ref.entity)} WHERE {column} = ? ORDER BY id", (id,)
                ).fetchall()
                if (ref.entity, child) not in seen
            ]
            if not ids:
                continue
            if ref.on_delete == "restrict":
                raise ReferencedByOthers(entity, ref.entity)
            for child in ids:
                old = self._load(conn, ref.entity, child)
                if old is None:
                    continue
                if ref.on_delete == "cascade":
                    self._delete(conn, events, ref.entity, child, seen)
                else:
                    row = json.loads(old)
                    row[ref.field] = None
                    self._store(conn, events, child_table, _dumps(row), old)
        old = self._load(conn, entity, id)
        conn.execute(f"DELETE FROM {_quote(entity)} WHERE id = ?", (id,))
        events.append(ChangeEvent(entity, "delete", id, json.loads(old) if old else None, None))
