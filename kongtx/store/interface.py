"""The store contract: ``IStore``, entity metadata, change events and store errors.

Every backend (memory, SQLite, later Postgres) implements :class:`IStore` and
passes ``tests/store/contract.py``. Rows are JSON-shaped dicts holding every
field of an entity; the store only looks at the fields named by
:class:`EntityMeta` (``id``, unique fields, foreign keys, the cache key and the
ordering field). A foreign key is held in a row as ``{"id": "<uuid>"}`` or
``None``.

The small pure helpers at the bottom (offset tokens, cache keys, ordering) are
shared by the backends so that they agree byte for byte: an offset token from
one backend is a valid token for another.
"""

from __future__ import annotations

import base64
import binascii
import json
import types
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import attr
from zope.interface import Interface

#: The ``on_delete`` actions a foreign key may declare.
ON_DELETE_ACTIONS = ("restrict", "cascade", "null")

#: Reasons given by :class:`InvalidOffset` (Kong's wording where Kong has one).
BAD_BASE64 = "bad base64 encoding"
BAD_JSON = "bad json encoding"
BAD_CURSOR = "bad cursor"

Row = Dict[str, Any]


def _frozen_mapping(value: Mapping[str, ForeignKey]) -> Mapping[str, ForeignKey]:
    return types.MappingProxyType(dict(value))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ForeignKey:
    """A foreign key from one entity's field to another entity's ``id``."""

    entity: str
    on_delete: str = attr.ib(
        default="restrict", validator=attr.validators.in_(ON_DELETE_ACTIONS)
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class EntityMeta:
    """What a store needs to know about one entity; built by the schema layer.

    ``unique`` names single-field unique constraints besides ``id`` (``None``
    values never conflict). ``foreign`` maps a field to its :class:`ForeignKey`.
    ``cache_key`` is a composite uniqueness over fields in which ``None`` counts
    as a value. Listings are ordered by ``order_by`` with ties broken by ``id``.
    """

    name: str
    unique: Tuple[str, ...] = attr.ib(default=(), converter=tuple)
    foreign: Mapping[str, ForeignKey] = attr.ib(
        factory=dict, converter=_frozen_mapping, hash=False
    )
    cache_key: Optional[Tuple[str, ...]] = attr.ib(
        default=None, converter=attr.converters.optional(tuple)
    )
    order_by: str = "id"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ChangeEvent:
    """One committed change to one row.

    ``op`` is ``"create"`` (``old`` is ``None``), ``"update"`` or ``"delete"``
    (``new`` is ``None``).
    """

    entity: str
    op: str
    id: str
    old: Optional[Row]
    new: Optional[Row]


# -- errors -------------------------------------------------------------------


class StoreError(Exception):
    """Base class of every error a store reports."""


class UniqueViolation(StoreError):
    """An insert or update would duplicate a unique value.

    ``fields`` holds the offending field(s) with the row's values: ``{"name":
    "x"}``, ``{"id": "<uuid>"}``, or for a cache key every cache-key field
    (foreign keys as ``{"id": ...}`` or ``None``).
    """

    def __init__(self, entity: str, fields: Dict[str, Any]) -> None:
        super().__init__(entity, fields)
        self.entity = entity
        self.fields = fields

    def __str__(self) -> str:
        return f"UNIQUE violation on {self.entity}: {self.fields!r}"


class ForeignKeyViolation(StoreError):
    """An insert or update references a row of ``target`` that does not exist."""

    def __init__(self, entity: str, field: str, target: str, value: Dict[str, Any]) -> None:
        super().__init__(entity, field, target, value)
        self.entity = entity
        self.field = field
        self.target = target
        self.value = value

    def __str__(self) -> str:
        return (
            f"{self.entity}.{self.field}: the foreign key {self.value!r} does not "
            f"reference an existing '{self.target}' entity"
        )


class ReferencedByOthers(StoreError):
    """A delete was refused because rows of ``referencing`` still point at it."""

    def __init__(self, entity: str, referencing: str) -> None:
        super().__init__(entity, referencing)
        self.entity = entity
        self.referencing = referencing

    @property
    def message(self) -> str:
        """Kong's message for this error."""
        return f"an existing '{self.referencing}' entity references this '{self.entity}' entity"

    def __str__(self) -> str:
        return self.message


class InvalidOffset(StoreError):
    """A pagination token could not be decoded (``reason`` e.g. ``bad base64 encoding``)."""

    def __init__(self, offset: str, reason: str) -> None:
        super().__init__(offset, reason)
        self.offset = offset
        self.reason = reason

    @property
    def message(self) -> str:
        """Kong's message for this error."""
        return f"'{self.offset}' is not a valid offset: {self.reason}"

    def __str__(self) -> str:
        return self.message


class NotFoundError(StoreError):
    """An update named a row that does not exist."""

    def __init__(self, entity: str, id: str) -> None:
        super().__init__(entity, id)
        self.entity = entity
        self.id = id

    def __str__(self) -> str:
        return f"no {self.entity} row with id {self.id!r}"


class UnsupportedFilter(StoreError):
    """A ``where`` filter named a field that is neither ``id``, unique nor foreign."""

    def __init__(self, entity: str, field: str) -> None:
        super().__init__(entity, field)
        self.entity = entity
        self.field = field

    def __str__(self) -> str:
        return f"cannot filter {self.entity} on {self.field!r}"


class StoreUnavailable(StoreError):
    """The database cannot be reached (or the store is not started)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


# -- the interface --------------------------------------------------------------


class IStore(Interface):
    """Entity storage. Every method returns a Deferred (except the listener calls)."""

    def start() -> Any:
        """Open (creating if needed) the database. Fires with ``None``."""

    def stop() -> Any:
        """Close the database and release threads. Fires with ``None``."""

    def ping() -> Any:
        """Fires with ``True`` when the database answers, ``False`` otherwise."""

    def get(entity: str, id: str) -> Any:
        """Fires with the row whose id is ``id``, or ``None``."""

    def get_by(entity: str, field: str, value: Any) -> Any:
        """Fires with the row whose unique ``field`` (or ``"id"``) equals ``value``, or ``None``.

        Fails with :class:`UnsupportedFilter` if ``field`` is not unique.
        """

    def page(
        entity: str,
        size: int,
        offset: Optional[str] = None,
        where: Optional[Mapping[str, Any]] = None,
    ) -> Any:
        """Fires with ``(rows, next_offset)``; ``next_offset`` is ``None`` on the last page.

        ``offset`` is the token of a previous page (fails with
        :class:`InvalidOffset` if it cannot be decoded). ``where`` holds
        equality filters on ``id``, unique fields and foreign-key fields; a
        foreign key is given by its id string (``{"service": "<uuid>"}``), a
        ``{"id": ...}`` dict, or ``None`` for rows whose key is null. Any other
        field fails with :class:`UnsupportedFilter`. Rows come ordered by the
        entity's ``order_by`` then ``id``.
        """

    def all(entity: str, where: Optional[Mapping[str, Any]] = None) -> Any:
        """Fires with a list of every (matching) row, in listing order."""

    def insert(entity: str, row: Row) -> Any:
        """Stores a new row; fires with the stored row.

        Fails with :class:`UniqueViolation` (id, unique field or cache key) or
        :class:`ForeignKeyViolation` (a non-null foreign key to a missing row).
        """

    def update(entity: str, row: Row) -> Any:
        """Replaces the whole row with ``row["id"]``; fires with the stored row.

        Fails with :class:`NotFoundError` if absent, else as :meth:`insert`.
        """

    def delete(entity: str, id: str) -> Any:
        """Deletes a row; fires with ``True``, or ``False`` if it was absent.

        Applies every referencing foreign key's ``on_delete``: ``restrict``
        fails with :class:`ReferencedByOthers`, ``cascade`` deletes the
        referencing rows (recursively), ``null`` sets the field to ``None``.
        All or nothing.
        """

    def increment(
        counter_key: str, window_start: int, ttl: int, amount: int = 1, limit: Optional[int] = None
    ) -> Any:
        """Atomically adds ``amount`` to the counter (``counter_key``, ``window_start``).

        A missing counter starts at 0; it may be forgotten ``ttl`` seconds after
        ``window_start``. Fires with the new value. With ``limit``, the addition
        is refused when the new value would exceed it: the counter is unchanged
        and the Deferred fires with a value greater than ``limit`` (check and
        add are one atomic step, so with a limit of N exactly N additions of 1
        succeed per counter, whatever the concurrency and across every node of
        a shared database). A negative ``amount`` with no ``limit`` takes back
        an earlier addition. Used by the rate-limiting ``cluster`` policy.
        """

    def add_listener(callback: Callable[[ChangeEvent], Any]) -> None:
        """Calls ``callback(event)`` on the reactor thread after each committed change.

        A cascade gives one event per changed row (children before parent).
        Exceptions raised by a listener are logged and never fail the write.
        """

    def remove_listener(callback: Callable[[ChangeEvent], Any]) -> None:
        """Stops calling ``callback``; a callback that is not registered is ignored."""


# -- helpers shared by the backends ----------------------------------------------


def foreign_id(value: Any) -> Optional[str]:
    """The id held by a foreign-key value (``{"id": x}`` or ``None``).

    A bare id string is accepted too (that is how ``where`` filters name it).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return value["id"]
    raise ValueError(f"not a foreign key value: {value!r}")


def index_value(meta: EntityMeta, field: str, value: Any) -> Any:
    """The value a unique or foreign field is indexed and compared by (foreign keys by id)."""
    return foreign_id(value) if field in meta.foreign else value


def cache_key_text(meta: EntityMeta, row: Mapping[str, Any]) -> Optional[str]:
    """The text a row's cache key is compared by, or ``None`` if the entity has none.

    Foreign-key fields count by their id; ``None`` counts as a value.
    """
    if meta.cache_key is None:
        return None
    values = []
    for field in meta.cache_key:
        value = row.get(field)
        if field in meta.foreign:
            value = foreign_id(value)
        values.append(value)
    return json.dumps(values, separators=(",", ":"), sort_keys=True)


def cache_key_fields(meta: EntityMeta, row: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``fields`` of a cache-key :class:`UniqueViolation` for ``row``."""
    assert meta.cache_key is not None
    return {field: row.get(field) for field in meta.cache_key}


def order_value(meta: EntityMeta, row: Mapping[str, Any]) -> Any:
    """The value of the ordering field (``None``, a number or a string)."""
    value = row.get(meta.order_by)
    if value is not None and not isinstance(value, (int, float, str)):
        raise ValueError(f"{meta.name}.{meta.order_by} cannot order rows: {value!r}")
    return value


def sort_key(value: Any, id: str) -> Tuple[int, Any, str]:
    """Orders like SQL does: ``NULL`` first, then numbers, then text; ties by id."""
    if value is None:
        return (0, 0, id)
    if isinstance(value, str):
        return (2, value, id)
    return (1, value, id)


def encode_offset(value: Any, id: str) -> str:
    """The opaque token for "the page after the row (``value``, ``id``)"."""
    raw = json.dumps([value, id], separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_offset(offset: str) -> Tuple[Any, str]:
    """Reverses :func:`encode_offset`; raises :class:`InvalidOffset`."""
    if not isinstance(offset, str) or not offset:
        raise InvalidOffset(str(offset), BAD_BASE64)
    try:
        padded = offset + "=" * (-len(offset) % 4)
        raw = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise InvalidOffset(offset, BAD_BASE64) from None
    try:
        cursor = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise InvalidOffset(offset, BAD_JSON) from None
    if (
        not isinstance(cursor, list)
        or len(cursor) != 2
        or not isinstance(cursor[1], str)
        or not (cursor[0] is None or isinstance(cursor[0], (int, float, str)))
    ):
        raise InvalidOffset(offset, BAD_CURSOR)
    return cursor[0], cursor[1]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Reference:
    """A foreign key seen from the referenced side: ``entity.field`` points here."""

    entity: str
    field: str
    on_delete: str


def references(entities: Mapping[str, EntityMeta]) -> Dict[str, List[Reference]]:
    """For each entity name, the foreign keys of other entities that point at it.

    Raises ``ValueError`` if a foreign key names an entity that is not given.
    """
    found: Dict[str, List[Reference]] = {name: [] for name in entities}
    for name, meta in entities.items():
        if meta.name != name:
            raise ValueError(f"entity {name!r} has metadata named {meta.name!r}")
        for field, fk in meta.foreign.items():
            if fk.entity not in entities:
                raise ValueError(f"{name}.{field} references unknown entity {fk.entity!r}")
            found[fk.entity].append(Reference(name, field, fk.on_delete))
    return found


def filter_fields(meta: EntityMeta) -> Tuple[str, ...]:
    """The fields a ``where`` filter (and ``get_by`` for the unique ones) may name."""
    return ("id",) + tuple(meta.unique) + tuple(f for f in meta.foreign if f not in meta.unique)


def normalize_where(meta: EntityMeta, where: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Checks a ``where`` filter and reduces foreign-key values to id strings (or ``None``).

    Raises :class:`UnsupportedFilter` for a field that cannot be filtered on.
    """
    if not where:
        return {}
    allowed = filter_fields(meta)
    normalized: Dict[str, Any] = {}
    for field, value in where.items():
        if field not in allowed:
            raise UnsupportedFilter(meta.name, field)
        normalized[field] = foreign_id(value) if field in meta.foreign else value
    return normalized


def row_id(meta: EntityMeta, row: Any) -> str:
    """The id of a row handed to ``insert``/``update``; raises ``ValueError`` if there is none."""
    if not isinstance(row, Mapping):
        raise ValueError(f"a {meta.name} row must be a mapping, not {type(row).__name__}")
    id = row.get("id")
    if not isinstance(id, str) or not id:
        raise ValueError(f"a {meta.name} row needs a string id, got {id!r}")
    return id
