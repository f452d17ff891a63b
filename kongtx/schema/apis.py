"""The legacy Kong 0.x ``apis`` entity (Kong 0.14.1's ``kong/dao/schemas/apis.lua``).

An API is the 0.x ancestor of a route + service pair: match rules (``hosts``,
``uris``, ``methods``) and an ``upstream_url`` in one row.  :data:`APIS` declares
the fields for the store and ``/schemas/apis``; :func:`validate_api` is the
0.x DAO validation the ``/apis`` endpoints use, with 0.x's flat error messages
(``{"name": "name is required"}``) raised as :class:`ApiViolation`.
:func:`api_paths` turns ``uris`` into router paths the way 0.x told prefix
URIs from regex ones.  ``created_at`` is in milliseconds, as in 0.x.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from kongtx.schema import typedefs as t
from kongtx.schema.entity import Entity
from kongtx.schema.services import parse_url

__all__ = [
    "APIS",
    "ApiViolation",
    "validate_api",
    "api_paths",
    "ERR_REQUIRED",
    "ERR_UNKNOWN",
    "ERR_SELF_CHECK",
    "ERR_PROTOCOLS",
    "ERR_NOT_URL",
    "ERR_ALREADY_EXISTS",
]

ERR_REQUIRED = "%s is required"
ERR_UNKNOWN = "unknown field"
ERR_NOT_TYPE = "%s is not a %s"
ERR_SELF_CHECK = "at least one of 'hosts', 'uris' or 'methods' must be specified"
ERR_PROTOCOLS = "Supported protocols are HTTP and HTTPS"
ERR_NOT_URL = "upstream_url is not a url"
ERR_ALREADY_EXISTS = "already exists with value '%s'"
ERR_NAME = "name must only contain alphanumeric and '., -, _, ~' characters"
ERR_HOST = "host with value '%s' is invalid: %s"
ERR_URI = "uri with value '%s' is invalid: %s"
ERR_METHOD = "method with value '%s' is invalid: %s"
ERR_WILDCARD_COUNT = "Only one wildcard is allowed"
ERR_WILDCARD_PLACE = "Invalid wildcard placement"
ERR_HOSTNAME = "Invalid hostname"
ERR_URI_SLASH = "must be prefixed with slash"
ERR_URI_EMPTY_SEGMENTS = "must not have empty segments"
ERR_METHOD_UPPER = "only uppercase letters are allowed"
ERR_BETWEEN = "%s must be an integer between %d and %d"
ERR_IMMUTABLE = "%s cannot be changed"

#: Field -> (0.x type, default).  Order is the order of a row's keys.
FIELDS: Tuple[Tuple[str, str, Any], ...] = (
    ("id", "id", None),
    ("created_at", "timestamp", None),
    ("name", "string", None),
    ("hosts", "array", None),
    ("uris", "array", None),
    ("methods", "array", None),
    ("upstream_url", "url", None),
    ("strip_uri", "boolean", True),
    ("preserve_host", "boolean", False),
    ("retries", "number", 5),
    ("https_only", "boolean", False),
    ("http_if_terminated", "boolean", False),
    ("upstream_connect_timeout", "number", 60000),
    ("upstream_send_timeout", "number", 60000),
    ("upstream_read_timeout", "number", 60000),
)

_TYPES = {name: kind for name, kind, _ in FIELDS}
_BOUNDS = {
    "retries": (0, 32767),
    "upstream_connect_timeout": (1, 2 ** 31 - 2),
    "upstream_send_timeout": (1, 2 ** 31 - 2),
    "upstream_read_timeout": (1, 2 ** 31 - 2),
}
_NAME = re.compile(r"^[A-Za-z0-9.\-_~]+$")
_METHOD = re.compile(r"^[A-Z]+$")
#: 0.x: a URI made only of these characters is a prefix, anything else a regex.
_PLAIN_URI = re.compile(r"^[A-Za-z0-9.\-_~/%]*$")

Row = Dict[str, Any]


class ApiViolation(Exception):
    """0.x validation errors: a flat ``{field: message}`` dict (or ``{"message": ...}``)."""

    def __init__(self, errors: Dict[str, str]) -> None:
        super().__init__(errors)
        self.errors = errors


def _split(value: Any) -> Any:
    """0.x arrays: a string is a comma-separated list (``hosts=a.com,b.com``)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _coerce(kind: str, value: Any) -> Any:
    """Form strings to the field's type; JSON values of the right type pass as they are."""
    if kind == "array":
        return _split(value)
    if isinstance(value, str):
        if kind == "boolean" and value in ("true", "false"):
            return value == "true"
        if kind == "number":
            try:
                return int(value)
            except ValueError:
                return value
    return value


def _check_type(name: str, kind: str, value: Any) -> Optional[str]:
    if kind in ("string", "url", "id"):
        ok = isinstance(value, str)
        label = "string"
    elif kind == "boolean":
        ok = isinstance(value, bool)
        label = "boolean"
    elif kind in ("number", "timestamp"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        label = "number"
    else:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        label = "array"
    return None if ok else ERR_NOT_TYPE % (name, label)


def _check_host(host: str) -> Optional[str]:
    if host.count("*") > 1:
        return ERR_HOST % (host, ERR_WILDCARD_COUNT)
    if "*" in host and not (host.startswith("*.") or host.endswith(".*")):
        return ERR_HOST % (host, ERR_WILDCARD_PLACE)
    if t.check_host_with_optional_port(host.replace("*", "abc")) is not None:
        return ERR_HOST % (host, ERR_HOSTNAME)
    return None


def _clean_uri(uri: str) -> Tuple[str, Optional[str]]:
    """The URI as stored (a trailing slash dropped, as 0.x did) and its error."""
    if not uri.startswith("/"):
        return uri, ERR_URI % (uri, ERR_URI_SLASH)
    if _PLAIN_URI.match(uri) and "//" in uri:
        return uri, ERR_URI % (uri, ERR_URI_EMPTY_SEGMENTS)
    if len(uri) > 1 and uri.endswith("/"):
        uri = uri[:-1]
    if not _PLAIN_URI.match(uri):
        try:
            re.compile(uri)
        except re.error as exc:
            return uri, ERR_URI % (uri, "invalid regex: %s" % exc)
    return uri, None


def _check_url(url: str) -> Optional[str]:
    parsed = parse_url(url)
    scheme = parsed.get("scheme")
    if not scheme or not parsed.get("host"):
        return ERR_NOT_URL
    if scheme.lower() not in ("http", "https"):
        return ERR_PROTOCOLS
    return None


def _field_errors(row: Row) -> Dict[str, str]:
    errors: Dict[str, str] = {}
    for name, kind, _ in FIELDS:
        value = row.get(name)
        if value is None:
            if name in ("name", "upstream_url"):
                errors[name] = ERR_REQUIRED % name
            continue
        err = _check_type(name, kind, value)
        if err is None and name == "name" and not _NAME.match(value):
            err = ERR_NAME
        if err is None and name == "upstream_url":
            err = _check_url(value)
        if err is None and name in _BOUNDS:
            low, high = _BOUNDS[name]
            if value != int(value) or not low <= value <= high:
                err = ERR_BETWEEN % (name, low, high)
        if err is None and name == "hosts":
            err = next((e for e in map(_check_host, value) if e), None)
        if err is None and name == "uris":
            cleaned = [_clean_uri(u) for u in value]
            err = next((e for _, e in cleaned if e), None)
            row[name] = [u for u, _ in cleaned]
        if err is None and name == "methods":
            err = next(
                (ERR_METHOD % (m, ERR_METHOD_UPPER) for m in value if not _METHOD.match(m)),
                None,
            )
        if err is not None:
            errors[name] = err
    return errors


def validate_api(
    data: Any,
    *,
    now_ms: int,
    new_id: str,
    existing: Optional[Mapping[str, Any]] = None,
) -> Row:
    """A complete ``apis`` row from admin input, or :class:`ApiViolation`.

    Without *existing* this is a POST/PUT (missing fields take their defaults);
    with it a PATCH (*data* merged over *existing*; ``id`` and ``created_at``
    stay).  Arrays may be given as comma-separated strings and scalars as form
    strings.  Empty arrays count as not given (``[]`` is stored as ``null``).
    """
    if not isinstance(data, dict):
        raise ApiViolation({"message": "request body must be an object"})
    errors: Dict[str, str] = {}
    for key in data:
        if key not in _TYPES:
            errors[key] = ERR_UNKNOWN
    if existing is not None:
        for key in ("id", "created_at"):
            if key in data and data[key] != existing.get(key):
                errors[key] = ERR_IMMUTABLE % key
    if errors:
        raise ApiViolation(errors)
    row: Row = {}
    for name, kind, default in FIELDS:
        if name in data:
            value = _coerce(kind, data[name])
        elif existing is not None:
            value = existing.get(name)
        else:
            value = default
        if isinstance(value, list) and not value:
            value = None
        row[name] = value
    if existing is None or row.get("id") is None:
        row["id"] = row.get("id") or new_id
    if row.get("created_at") is None:
        row["created_at"] = now_ms
    errors = _field_errors(row)
    if errors:
        raise ApiViolation(errors)
    if not any(row.get(n) for n in ("hosts", "uris", "methods")):
        raise ApiViolation({"message": ERR_SELF_CHECK})
    return row


def api_paths(uris: Optional[List[str]]) -> List[str]:
    """Router paths for an API's ``uris``: plain URIs as prefixes, others as ``~`` regexes."""
    return [u if _PLAIN_URI.match(u) else "~" + u for u in uris or ()]


APIS = Entity(
    name="apis",
    endpoint_key="name",
    fields=(
        ("id", t.uuid()),
        ("created_at", t.integer(timestamp=True, auto=True)),
        ("name", t.string(required=True, unique=True)),
        ("hosts", t.array(t.string())),
        ("uris", t.array(t.string())),
        ("methods", t.array(t.string())),
        ("upstream_url", t.string(required=True)),
        ("strip_uri", t.boolean(required=True, default=True)),
        ("preserve_host", t.boolean(required=True, default=False)),
        ("retries", t.integer(default=5, between=(0, 32767))),
        ("https_only", t.boolean(required=True, default=False)),
        ("http_if_terminated", t.boolean(required=True, default=False)),
        ("upstream_connect_timeout", t.nonzero_timeout(default=60000)),
        ("upstream_send_timeout", t.nonzero_timeout(default=60000)),
        ("upstream_read_timeout", t.nonzero_timeout(default=60000)),
    ),
)
