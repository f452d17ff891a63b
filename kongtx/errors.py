"""Kong's error codes and the mapping of each error to an HTTP status and body.

Every error the Admin API can answer with is a :class:`KongError`: it knows its
``status`` and renders its JSON ``body()``.  Codes, names and message formats are
those of Kong's ``kong/db/errors.lua`` and ``kong/api/endpoints.lua``.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any, Dict, List, Mapping, Optional

__all__ = [
    "reason_phrase",
    "CODES",
    "NAMES",
    "KongError",
    "SchemaViolation",
    "UniqueViolation",
    "ForeignKeyViolation",
    "ForeignKeysUnresolved",
    "InvalidOffset",
    "InvalidSize",
    "InvalidPrimaryKey",
    "NotFound",
    "MethodNotAllowed",
    "DatabaseError",
    "ServiceUnavailable",
    "OperationUnsupported",
    "BadRequest",
    "UnsupportedMediaType",
    "PayloadTooLarge",
    "lua_repr",
]

# Error codes, exactly as kong/db/errors.lua.
INVALID_PRIMARY_KEY = 1
SCHEMA_VIOLATION = 2
PRIMARY_KEY_VIOLATION = 3
FOREIGN_KEY_VIOLATION = 4
UNIQUE_VIOLATION = 5
NOT_FOUND = 6
INVALID_OFFSET = 7
DATABASE_ERROR = 8
INVALID_SIZE = 9
INVALID_UNIQUE = 10
INVALID_OPTIONS = 11
OPERATION_UNSUPPORTED = 12
FOREIGN_KEYS_UNRESOLVED = 13
DECLARATIVE_CONFIG = 14
TRANSFORMATION_ERROR = 15
INVALID_FOREIGN_KEY = 16
INVALID_WORKSPACE = 17
INVALID_UNIQUE_GLOBAL = 18
REFERENCED_BY_OTHERS = 19
INVALID_SEARCH_QUERY = 20
SYNC_DELTAS = 21

CODES: Dict[str, int] = {
    "INVALID_PRIMARY_KEY": INVALID_PRIMARY_KEY,
    "SCHEMA_VIOLATION": SCHEMA_VIOLATION,
    "PRIMARY_KEY_VIOLATION": PRIMARY_KEY_VIOLATION,
    "FOREIGN_KEY_VIOLATION": FOREIGN_KEY_VIOLATION,
    "UNIQUE_VIOLATION": UNIQUE_VIOLATION,
    "NOT_FOUND": NOT_FOUND,
    "INVALID_OFFSET": INVALID_OFFSET,
    "DATABASE_ERROR": DATABASE_ERROR,
    "INVALID_SIZE": INVALID_SIZE,
    "INVALID_UNIQUE": INVALID_UNIQUE,
    "INVALID_OPTIONS": INVALID_OPTIONS,
    "OPERATION_UNSUPPORTED": OPERATION_UNSUPPORTED,
    "FOREIGN_KEYS_UNRESOLVED": FOREIGN_KEYS_UNRESOLVED,
    "DECLARATIVE_CONFIG": DECLARATIVE_CONFIG,
    "TRANSFORMATION_ERROR": TRANSFORMATION_ERROR,
    "INVALID_FOREIGN_KEY": INVALID_FOREIGN_KEY,
    "INVALID_WORKSPACE": INVALID_WORKSPACE,
    "INVALID_UNIQUE_GLOBAL": INVALID_UNIQUE_GLOBAL,
    "REFERENCED_BY_OTHERS": REFERENCED_BY_OTHERS,
    "INVALID_SEARCH_QUERY": INVALID_SEARCH_QUERY,
    "SYNC_DELTAS": SYNC_DELTAS,
}

NAMES: Dict[int, str] = {
    INVALID_PRIMARY_KEY: "invalid primary key",
    SCHEMA_VIOLATION: "schema violation",
    PRIMARY_KEY_VIOLATION: "primary key violation",
    FOREIGN_KEY_VIOLATION: "foreign key violation",
    UNIQUE_VIOLATION: "unique constraint violation",
    NOT_FOUND: "not found",
    INVALID_OFFSET: "invalid offset",
    DATABASE_ERROR: "database error",
    INVALID_SIZE: "invalid size",
    INVALID_UNIQUE: "invalid unique %s",
    INVALID_OPTIONS: "invalid options",
    OPERATION_UNSUPPORTED: "operation unsupported",
    FOREIGN_KEYS_UNRESOLVED: "foreign keys unresolved",
    DECLARATIVE_CONFIG: "invalid declarative configuration",
    TRANSFORMATION_ERROR: "transformation error",
    INVALID_FOREIGN_KEY: "invalid foreign key",
    INVALID_WORKSPACE: "invalid workspace",
    INVALID_UNIQUE_GLOBAL: "invalid global query",
    REFERENCED_BY_OTHERS: "referenced by others",
    INVALID_SEARCH_QUERY: "invalid search query",
    SYNC_DELTAS: "invalid sync deltas",
}

# Message strings.
MSG_NOT_FOUND = "Not found"
MSG_METHOD_NOT_ALLOWED = "Method not allowed"
MSG_UNEXPECTED = "An unexpected error occurred"
MSG_SERVICE_UNAVAILABLE = "Service unavailable"
MSG_CANNOT_PARSE_JSON = "Cannot parse JSON body"
MSG_MULTIPLE_CONTENT_TYPES = "Multiple Content-Type headers not allowed"
MSG_UNSUPPORTED_MEDIA_TYPE = "Unsupported Media Type"
MSG_PAYLOAD_TOO_LARGE = "Request size limit exceeded"
MSG_SIZE_NOT_A_NUMBER = "size must be a number"
MSG_SIZE_OUT_OF_RANGE = "size must be an integer between 1 and %d"
MSG_INVALID_OFFSET = "'%s' is not a valid offset: %s"
MSG_BAD_BASE64 = "bad base64 encoding"
MSG_SCHEMA_VIOLATION_ONE = "schema violation (%s)"
MSG_SCHEMA_VIOLATION_MANY = "%d schema violations (%s)"
MSG_FK_UNRESOLVED_ONE = "foreign key unresolved (%s)"
MSG_FK_UNRESOLVED_MANY = "%d foreign keys unresolved (%s)"
MSG_FK_CANNOT_RESOLVE = (
    "the foreign key cannot be resolved with '%s' for an existing '%s' entity"
)
MSG_FK_INVALID_REFERENCE = (
    "the foreign key '%s' does not reference an existing '%s' entity."
)
MSG_FK_RESTRICTED = "an existing '%s' entity references this '%s' entity"
MSG_UNIQUE = "UNIQUE violation detected on '%s'"
MSG_INVALID_PRIMARY_KEY = "invalid primary key: '%s'"

ENTITY_ERRORS_KEY = "@entity"

_LUA_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LUA_KEYWORDS = frozenset(
    "and break do else elseif end false for function goto if in local nil not "
    "or repeat return then true until while".split()
)


def _lua_string(value: str) -> str:
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
    )
    return '"' + escaped + '"'


def _sort_key(key: Any) -> Any:
    return (0, key, "") if isinstance(key, (int, float)) else (1, 0, str(key))


def lua_repr(value: Any) -> str:
    """Render *value* the way Penlight's ``pretty.write(v, "")`` does.

    Kong embeds this rendering in several messages, e.g.
    ``UNIQUE violation detected on '{name="x"}'``.  Table keys come out sorted,
    ``None`` is rendered as ``null`` (Kong's ``ngx.null``).
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        return _lua_string(value)
    if isinstance(value, Mapping):
        parts = []
        for key in sorted(value, key=_sort_key):
            if (
                isinstance(key, str)
                and _LUA_IDENTIFIER.match(key)
                and key not in _LUA_KEYWORDS
            ):
                rendered_key = key
            else:
                rendered_key = "[%s]" % lua_repr(key)
            parts.append("%s=%s" % (rendered_key, lua_repr(value[key])))
        return "{" + ",".join(parts) + "}"
    if isinstance(value, (list, tuple)):
        return "{" + ",".join(lua_repr(item) for item in value) + "}"
    return _lua_string(str(value))


class KongError(Exception):
    """An error with an HTTP status and a Kong-shaped JSON body."""

    status: int = 500

    def body(self) -> Dict[str, Any]:
        """The JSON object sent to the client."""
        return {"message": MSG_UNEXPECTED}

    def __str__(self) -> str:
        message = self.body().get("message")
        return str(message) if message is not None else type(self).__name__


class _CodedError(KongError):
    """An error carrying a Kong DAO error code (``code``/``name``/``message``)."""

    code: int = DATABASE_ERROR

    def __init__(self, message: str, fields: Optional[Any] = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    @property
    def name(self) -> str:
        return NAMES[self.code]

    def body(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {
            "code": self.code,
            "name": self.name,
            "message": self.message,
        }
        if self.fields is not None:
            body["fields"] = self.fields
        return body


def _is_array_errors(value: Any) -> bool:
    return isinstance(value, list)


def _flatten_subfields(field_name: str, field_errors: Any) -> List[str]:
    """``parent.child: err`` lines for a nested error table, Kong's order."""
    lines = []
    if isinstance(field_errors, list):
        items = [
            (index + 1, err)
            for index, err in enumerate(field_errors)
            if err is not None
        ]
    else:
        items = sorted(field_errors.items(), key=lambda kv: _sort_key(kv[0]))
    for sub_field, value in items:
        if isinstance(value, (dict, list)):
            value = lua_repr(_lua_table(value))
        lines.append("%s.%s: %s" % (field_name, sub_field, value))
    return lines


def _lua_table(value: Any) -> Any:
    """Turn our sparse error lists (None holes) into 1-based dicts for rendering."""
    if isinstance(value, list):
        return {
            index + 1: _lua_table(item)
            for index, item in enumerate(value)
            if item is not None
        }
    if isinstance(value, dict):
        return {key: _lua_table(item) for key, item in value.items()}
    return value


class SchemaViolation(_CodedError):
    """Code 2: the input does not satisfy the entity schema.

    *fields* maps field names to an error string, a nested dict (records,
    foreign keys, maps) or a list whose items are ``None`` or the error of the
    array element at that position.  Entity-level errors are a list under
    ``"@entity"``.
    """

    status = 400
    code = SCHEMA_VIOLATION

    def __init__(self, fields: Mapping[str, Any]) -> None:
        fields = dict(fields)
        super().__init__(self.render_message(fields), fields)

    @staticmethod
    def render_message(fields: Mapping[str, Any]) -> str:
        lines: List[str] = list(fields.get(ENTITY_ERRORS_KEY) or [])
        for field_name in sorted(k for k in fields if k != ENTITY_ERRORS_KEY):
            field_errors = fields[field_name]
            if isinstance(field_errors, (dict, list)):
                lines.extend(_flatten_subfields(field_name, field_errors))
            else:
                lines.append("%s: %s" % (field_name, field_errors))
        if len(lines) == 1:
            return MSG_SCHEMA_VIOLATION_ONE % lines[0]
        return MSG_SCHEMA_VIOLATION_MANY % (len(lines), "; ".join(lines))


class InvalidPrimaryKey(_CodedError):
    """Code 1: a primary key value that does not validate."""

    status = 400
    code = INVALID_PRIMARY_KEY

    def __init__(self, primary_key: Mapping[str, Any]) -> None:
        super().__init__(
            MSG_INVALID_PRIMARY_KEY % lua_repr(primary_key), dict(primary_key)
        )


class UniqueViolation(_CodedError):
    """Code 5 (HTTP 409): a unique field value already exists."""

    status = 409
    code = UNIQUE_VIOLATION

    def __init__(self, unique_key: Mapping[str, Any]) -> None:
        super().__init__(MSG_UNIQUE % lua_repr(unique_key), dict(unique_key))


class ForeignKeyViolation(_CodedError):
    """Code 4: a foreign key that references nothing, or a restricted delete."""

    status = 400
    code = FOREIGN_KEY_VIOLATION

    @classmethod
    def invalid_reference(
        cls, foreign_key: Mapping[str, Any], field_name: str, parent_name: str
    ) -> "ForeignKeyViolation":
        """Insert/update case: ``the foreign key '{id="..."}' does not reference ...``."""
        return cls(
            MSG_FK_INVALID_REFERENCE % (lua_repr(foreign_key), parent_name),
            {field_name: dict(foreign_key)},
        )

    @classmethod
    def restricted(cls, parent_name: str, child_name: str) -> "ForeignKeyViolation":
        """Delete case: ``an existing 'routes' entity references this 'services' entity``."""
        return cls(
            MSG_FK_RESTRICTED % (child_name, parent_name),
            {"@referenced_by": child_name},
        )


class ForeignKeysUnresolved(_CodedError):
    """Code 13: a foreign key given by a unique field that matches nothing.

    *unresolved* maps the foreign field name to ``{unique_field: (value, parent)}``,
    e.g. ``{"service": {"name": ("x", "services")}}``.
    """

    status = 400
    code = FOREIGN_KEYS_UNRESOLVED

    def __init__(self, unresolved: Mapping[str, Mapping[str, Any]]) -> None:
        fields: Dict[str, Dict[str, str]] = {}
        lines = []
        for field_name in sorted(unresolved):
            fields[field_name] = {}
            for sub_field in sorted(unresolved[field_name]):
                value, parent = unresolved[field_name][sub_field]
                text = MSG_FK_CANNOT_RESOLVE % (lua_repr({sub_field: value}), parent)
                fields[field_name][sub_field] = text
                lines.append("%s.%s: %s" % (field_name, sub_field, text))
        if len(lines) == 1:
            message = MSG_FK_UNRESOLVED_ONE % lines[0]
        else:
            message = MSG_FK_UNRESOLVED_MANY % (len(lines), "; ".join(lines))
        super().__init__(message, fields)


class InvalidOffset(_CodedError):
    """Code 7: ``'x' is not a valid offset: bad base64 encoding``."""

    status = 400
    code = INVALID_OFFSET

    def __init__(self, offset: str, reason: str = MSG_BAD_BASE64) -> None:
        super().__init__(MSG_INVALID_OFFSET % (offset, reason))


class InvalidSize(_CodedError):
    """Code 9: ``size must be a number`` or out of range."""

    status = 400
    code = INVALID_SIZE

    @classmethod
    def not_a_number(cls) -> "InvalidSize":
        return cls(MSG_SIZE_NOT_A_NUMBER)

    @classmethod
    def out_of_range(cls, max_size: int) -> "InvalidSize":
        return cls(MSG_SIZE_OUT_OF_RANGE % max_size)


class DatabaseError(_CodedError):
    """Code 8 (HTTP 500): the body never leaks the database message."""

    status = 500
    code = DATABASE_ERROR

    def __init__(self, message: str = NAMES[DATABASE_ERROR]) -> None:
        super().__init__(message)

    def body(self) -> Dict[str, Any]:
        return {"message": MSG_UNEXPECTED}


class OperationUnsupported(_CodedError):
    """Code 12 (HTTP 405), e.g. writes in DB-less mode."""

    status = 405
    code = OPERATION_UNSUPPORTED


class _MessageError(KongError):
    """A plain ``{"message": ...}`` error."""

    default_message = MSG_UNEXPECTED

    def __init__(self, message: Optional[str] = None) -> None:
        self.message = message if message is not None else self.default_message
        super().__init__(self.message)

    def body(self) -> Dict[str, Any]:
        return {"message": self.message}


class NotFound(_MessageError):
    """404 ``{"message":"Not found"}``."""

    status = 404
    default_message = MSG_NOT_FOUND


class MethodNotAllowed(_MessageError):
    """405 ``{"message":"Method not allowed"}``."""

    status = 405
    default_message = MSG_METHOD_NOT_ALLOWED


class BadRequest(_MessageError):
    """400 ``{"message": message}``."""

    status = 400
    default_message = "Bad request"


class UnsupportedMediaType(_MessageError):
    """415 (Kong sends no body; kongtx sends a JSON message)."""

    status = 415
    default_message = MSG_UNSUPPORTED_MEDIA_TYPE


class PayloadTooLarge(_MessageError):
    """413 when the body exceeds the admin body size limit."""

    status = 413
    default_message = MSG_PAYLOAD_TOO_LARGE


class ServiceUnavailable(_MessageError):
    """503 when the store cannot be reached."""

    status = 503
    default_message = MSG_SERVICE_UNAVAILABLE


class Unexpected(_MessageError):
    """500 ``{"message":"An unexpected error occurred"}``."""

    status = 500
    default_message = MSG_UNEXPECTED


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (twisted.web's table lacks some, such
    as 426 and 429, and would send ``Unknown Status``)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown Status"
