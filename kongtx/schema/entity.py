"""``Entity``: one entity's fields, checks and the three write validations.

An :class:`Entity` turns Admin API input into a complete row (every field,
nulls explicit, foreign keys as ``{"id": ...}``) or raises
:class:`kongtx.errors.SchemaViolation` holding *all* errors, the way Kong's
``process_auto_fields`` + ``validate`` pair does.  Entity checks
(:class:`Conditional`, :class:`ConditionalAtLeastOneOf`, :class:`AtLeastOneOf`,
:class:`CustomCheck`) and subschemas (routes by ``protocols``) follow Kong's
semantics.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attr

from kongtx.errors import ENTITY_ERRORS_KEY, SchemaViolation
from kongtx.schema import typedefs
from kongtx.schema.typedefs import (
    ERR_IMMUTABLE,
    ERR_REQUIRED,
    ERR_UNKNOWN,
    Field,
    Resolver,
    is_nonempty,
    validate_field,
)
from kongtx.store.interface import EntityMeta, ForeignKey

__all__ = [
    "Entity",
    "Subschema",
    "Shorthand",
    "Conditional",
    "ConditionalAtLeastOneOf",
    "AtLeastOneOf",
    "CustomCheck",
]

ERR_CONDITIONAL = "failed conditional validation given value of field '%s'"
ERR_AT_LEAST_ONE_OF = "at least one of these fields must be non-empty: %s"
ERR_UNKNOWN_TYPE = "unknown type: %s"
WHEN_UPDATING = "when updating, "

Row = Dict[str, Any]
Errors = Dict[str, Any]
Predicate = Callable[[Any], bool]


def quoted_list(words: Sequence[str]) -> str:
    """``'a', 'b', 'c'``: Kong's rendering of field lists in messages."""
    return ", ".join("'%s'" % w for w in words)


# -- entity checks ---------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Conditional:
    """If ``if_field`` matches ``if_match``, ``then_check`` must accept ``then_field``.

    ``then_check(value)`` returns ``None`` or the field error; on failure the
    entity error is ``then_err`` or Kong's generic conditional message.
    """

    if_field: str
    if_match: Predicate
    then_field: str
    then_check: Callable[[Any], Optional[str]]
    then_err: Optional[str] = None

    def run(self, row: Row, errors: Errors, updating: bool) -> None:
        if_value = row.get(self.if_field)
        if if_value is None or not self.if_match(if_value):
            return
        err = self.then_check(row.get(self.then_field))
        if err is None:
            return
        errors[self.then_field] = err
        _entity_error(errors, self.then_err or ERR_CONDITIONAL % self.if_field)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ConditionalAtLeastOneOf:
    """Kong's ``conditional_at_least_one_of`` with its optional ``else`` branch."""

    if_field: str
    if_match: Predicate
    then_at_least_one_of: Tuple[str, ...]
    then_err: Optional[str] = None
    else_match: Optional[Predicate] = None
    else_then_at_least_one_of: Tuple[str, ...] = ()
    else_then_err: Optional[str] = None

    def run(self, row: Row, errors: Errors, updating: bool) -> None:
        if_value = row.get(self.if_field)
        if if_value is None:
            return
        if self.if_match(if_value):
            names, err = self.then_at_least_one_of, self.then_err
        elif self.else_match is not None and self.else_match(if_value):
            names, err = self.else_then_at_least_one_of, self.else_then_err
        else:
            return
        if any(is_nonempty(row.get(n)) for n in names):
            return
        if err is not None:
            message = err % quoted_list(names) if "%s" in err else err
        else:
            message = (WHEN_UPDATING if updating else "") + ERR_AT_LEAST_ONE_OF % (
                quoted_list(names)
            )
        _entity_error(errors, message)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AtLeastOneOf:
    """At least one of ``fields`` must be non-empty."""

    fields: Tuple[str, ...]

    def run(self, row: Row, errors: Errors, updating: bool) -> None:
        if any(is_nonempty(row.get(n)) for n in self.fields):
            return
        _entity_error(
            errors,
            (WHEN_UPDATING if updating else "")
            + ERR_AT_LEAST_ONE_OF % quoted_list(self.fields),
        )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CustomCheck:
    """``fn(row)`` returns ``None`` or an entity error; skipped if a field errored."""

    fields: Tuple[str, ...]
    fn: Callable[[Row], Optional[str]]

    def run(self, row: Row, errors: Errors, updating: bool) -> None:
        if any(f in errors for f in self.fields):
            return
        err = self.fn(row)
        if err is not None:
            _entity_error(errors, err)


def _entity_error(errors: Errors, message: str) -> None:
    errors.setdefault(ENTITY_ERRORS_KEY, []).append(message)


# -- subschemas and shorthands ------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Subschema:
    """Field overrides and extra checks selected by the subschema key's value."""

    name: str
    fields: Mapping[str, Field] = attr.ib(factory=dict)
    checks: Tuple[Any, ...] = ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Shorthand:
    """A write-only input field expanded into real fields (``url`` on services)."""

    name: str
    field: Field
    expand: Callable[[Any], Optional[Dict[str, Any]]]


# -- the entity ------------------------------------------------------------------------


def _fields_tuple(value: Sequence[Tuple[str, Field]]) -> Tuple[Tuple[str, Field], ...]:
    return tuple(value)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Entity:
    """One entity type: fields in order, endpoint key, checks, store metadata."""

    name: str
    fields: Tuple[Tuple[str, Field], ...] = attr.ib(converter=_fields_tuple)
    endpoint_key: Optional[str] = None
    checks: Tuple[Any, ...] = ()
    subschema_key: Optional[str] = None
    subschemas: Mapping[str, Subschema] = attr.ib(factory=dict)
    shorthands: Tuple[Shorthand, ...] = ()
    cache_key: Optional[Tuple[str, ...]] = None
    order_by: str = "id"
    admin_api_name: Optional[str] = None
    admin_api_nested_name: Optional[str] = None
    resolver: Optional[Resolver] = attr.ib(default=None, eq=False)

    # -- introspection -------------------------------------------------------------

    @property
    def path_name(self) -> str:
        """The collection's URL segment (``/services``)."""
        return self.admin_api_name or self.name

    @property
    def nested_path_name(self) -> str:
        """The URL segment when nested under a parent (``/services/{s}/routes``)."""
        return self.admin_api_nested_name or self.path_name

    @property
    def field_names(self) -> Tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    def field(self, name: str, row: Optional[Mapping[str, Any]] = None) -> Optional[Field]:
        """The definition of *name*, the subschema's when *row* selects one."""
        if row is not None:
            sub = self.subschema_for(row)
            if sub is not None and name in sub.fields:
                return sub.fields[name]
        for fname, fdef in self.fields:
            if fname == name:
                return fdef
        return None

    def shorthand(self, name: str) -> Optional[Shorthand]:
        for item in self.shorthands:
            if item.name == name:
                return item
        return None

    def foreign_fields(self) -> List[Tuple[str, Field]]:
        """``(name, field)`` of each foreign key, in field order."""
        return [(n, f) for n, f in self.fields if f.type == "foreign"]

    def unique_fields(self) -> Tuple[str, ...]:
        return tuple(n for n, f in self.fields if f.unique and n != "id")

    @property
    def meta(self) -> EntityMeta:
        """What the store needs: unique fields, foreign keys, cache key, order."""
        return self.meta_for(None)

    def meta_for(self, known: Optional[Sequence[str]]) -> EntityMeta:
        """:attr:`meta` keeping only foreign keys to entities in *known*."""
        foreign = {
            name: ForeignKey(f.reference or "", f.on_delete)
            for name, f in self.foreign_fields()
            if known is None or f.reference in known
        }
        return EntityMeta(
            self.name,
            unique=self.unique_fields(),
            foreign=foreign,
            cache_key=self.cache_key,
            order_by=self.order_by,
        )

    def subschema_for(self, row: Mapping[str, Any]) -> Optional[Subschema]:
        """Kong's ``get_subschema``: the first key value that names a subschema."""
        if not self.subschema_key or not self.subschemas:
            return None
        key = row.get(self.subschema_key)
        if isinstance(key, str):
            return self.subschemas.get(key)
        if isinstance(key, list):
            for item in key:
                if isinstance(item, str) and item in self.subschemas:
                    return self.subschemas[item]
        return None

    # -- the three writes --------------------------------------------------------------

    def validate_insert(self, data: Any, *, now: int, new_id: str) -> Row:
        """POST: a complete row with id, timestamps and defaults, or ``SchemaViolation``."""
        row = self._expand_shorthands(self._input(data))
        if row.get("id") is None and self.field("id") is not None:
            row["id"] = new_id
        self._stamp(row, now, created_at=None)
        self._fill_defaults(row)
        return self._finish(row, updating=False)

    def validate_replace(
        self, data: Any, *, now: int, id: str, created_at: Optional[int] = None
    ) -> Row:
        """PUT: the whole entity; omitted fields go back to defaults or null."""
        row = self._expand_shorthands(self._input(data))
        row["id"] = id
        row.pop("created_at", None)
        self._stamp(row, now, created_at=created_at)
        self._fill_defaults(row)
        return self._finish(row, updating=False)

    def validate_update(self, existing: Mapping[str, Any], patch: Any, *, now: int) -> Row:
        """PATCH: *patch* merged over *existing*, then every check re-run."""
        patch = self._expand_shorthands(self._input(patch))
        errors: Errors = {}
        for name in ("id", "created_at"):
            if name in patch and patch[name] != existing.get(name):
                errors[name] = ERR_IMMUTABLE
        if errors:
            raise SchemaViolation(errors)
        merged = self._merge(dict(existing), patch)
        if "updated_at" in dict(self.fields):
            merged["updated_at"] = now
        return self._finish(merged, updating=True)

    def validate_partial(self, data: Mapping[str, Any]) -> Errors:
        """Errors of the given keys only (how Kong checks ``service: {...}`` input)."""
        errors: Errors = {}
        for key, value in data.items():
            fdef = self.field(key)
            if fdef is None:
                errors[key] = ERR_UNKNOWN
                continue
            err = validate_field(fdef, value, self.resolver)
            if err is not None:
                errors[key] = err
            elif value is None and fdef.required:
                errors[key] = ERR_REQUIRED
        return errors

    def validate(self, row: Mapping[str, Any], *, updating: bool = False) -> Errors:
        """All errors of a complete row (fields, required, entity checks)."""
        errors: Errors = {}
        if self.subschema_key:
            key = row.get(self.subschema_key)
            if key is None:
                return {self.subschema_key: ERR_REQUIRED}
            if self.subschema_for(row) is None:
                if isinstance(key, list) and key and all(isinstance(k, str) for k in key):
                    return {self.subschema_key: ERR_UNKNOWN_TYPE % key[0]}
        sub = self.subschema_for(row)
        for key, value in row.items():
            fdef = self.field(key, row)
            if fdef is None:
                errors[key] = ERR_UNKNOWN
                continue
            err = validate_field(fdef, value, self.resolver)
            if err is not None:
                errors[key] = err
        for name, _ in self.fields:
            fdef = self.field(name, row)
            assert fdef is not None
            if fdef.required and row.get(name) is None:
                errors[name] = ERR_REQUIRED
        for check in self.checks:
            check.run(row, errors, updating)
        if sub is not None:
            for check in sub.checks:
                check.run(row, errors, updating)
        return errors

    # -- helpers ------------------------------------------------------------------------

    def _input(self, data: Any) -> Row:
        if not isinstance(data, dict):
            raise SchemaViolation({ENTITY_ERRORS_KEY: [typedefs.ERR_RECORD]})
        return copy.deepcopy(data)

    def _expand_shorthands(self, data: Row) -> Row:
        errors: Errors = {}
        for item in self.shorthands:
            if item.name not in data:
                continue
            value = data.pop(item.name)
            if value is None:
                continue
            err = validate_field(item.field, value)
            if err is not None:
                errors[item.name] = err
                continue
            expanded = item.expand(value) or {}
            for key, new in expanded.items():
                old = data.get(key)
                if isinstance(new, dict) and isinstance(old, dict):
                    merged = dict(old)
                    merged.update(new)
                    data[key] = merged
                else:
                    data[key] = new
        if errors:
            raise SchemaViolation(errors)
        return data

    def _stamp(self, row: Row, now: int, *, created_at: Optional[int]) -> None:
        names = dict(self.fields)
        if "created_at" in names and row.get("created_at") is None:
            row["created_at"] = created_at if created_at is not None else now
        if "updated_at" in names:
            row["updated_at"] = now

    def _fill_defaults(self, row: Row) -> None:
        for name, _ in self.fields:
            fdef = self.field(name, row)
            assert fdef is not None
            if name in row:
                if fdef.type == "record" and isinstance(row[name], dict):
                    row[name] = _record_defaults(fdef, row[name])
                continue
            value = _missing_value(fdef)
            if value is not _MISSING:
                row[name] = value

    def _merge(self, existing: Row, patch: Row) -> Row:
        for key, value in patch.items():
            fdef = self.field(key)
            old = existing.get(key)
            if (
                fdef is not None
                and fdef.type == "record"
                and isinstance(value, dict)
                and isinstance(old, dict)
            ):
                merged = dict(old)
                merged.update(value)
                existing[key] = merged
            else:
                existing[key] = value
        return existing

    def _finish(self, row: Row, *, updating: bool) -> Row:
        _normalize(self, row)
        errors = self.validate(row, updating=updating)
        if errors:
            raise SchemaViolation(errors)
        ordered: Row = {}
        for name, _ in self.fields:
            ordered[name] = row.get(name)
        return ordered


_MISSING: Any = object()


def _missing_value(fdef: Field) -> Any:
    """Kong's ``handle_missing_field``: default, null, or left missing if required."""
    if fdef.has_default:
        return copy.deepcopy(fdef.default)
    if not fdef.required:
        return None
    if fdef.type == "record":
        return _record_defaults(fdef, {})
    return _MISSING


def _record_defaults(fdef: Field, value: Row) -> Row:
    for name, sub in fdef.fields:
        if name in value:
            if sub.type == "record" and isinstance(value[name], dict):
                value[name] = _record_defaults(sub, value[name])
            continue
        missing = _missing_value(sub)
        if missing is not _MISSING:
            value[name] = missing
    return value


def _normalize(entity: Entity, row: Row) -> None:
    """Sets lose duplicates; integral floats become ints; ``{}`` counts as ``[]``."""
    for name in list(row):
        fdef = entity.field(name, row)
        if fdef is not None:
            row[name] = _normalize_value(fdef, row[name])


def _normalize_value(fdef: Field, value: Any) -> Any:
    if value is None:
        return None
    if fdef.type in ("array", "set"):
        if isinstance(value, dict) and not value:
            value = []
        if isinstance(value, list):
            assert fdef.elements is not None
            value = [_normalize_value(fdef.elements, v) for v in value]
            if fdef.type == "set":
                unique: List[Any] = []
                for item in value:
                    if item not in unique:
                        unique.append(item)
                value = unique
        return value
    if fdef.type == "map" and isinstance(value, list) and not value:
        return {}
    if fdef.type == "map" and isinstance(value, dict) and fdef.values is not None:
        return {k: _normalize_value(fdef.values, v) for k, v in value.items()}
    if fdef.type == "record" and isinstance(value, dict):
        out = {}
        for key, item in value.items():
            sub = fdef.field(key)
            out[key] = _normalize_value(sub, item) if sub is not None else item
        return out
    if fdef.type in ("integer", "number") and isinstance(value, float):
        if value.is_integer() and fdef.type == "integer":
            return int(value)
    return value
