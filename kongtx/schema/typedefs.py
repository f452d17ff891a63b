"""Field declarations and field-level validation, after Kong's ``kong/db/schema``.

A :class:`Field` declares a type (``string``, ``integer``, ``number``,
``boolean``, ``array``, ``set``, ``map``, ``record``, ``foreign``) and the
validators Kong knows (``one_of``, ``between``, ``len_min``, ``match_none`` ...).
:func:`validate_field` checks one value and returns ``None`` or Kong's error:
a string, a dict (records, foreign keys) or a list with one slot per array item.

The module-level constructors (:func:`string`, :func:`host`, :func:`port`,
:func:`tags` ...) are Kong's typedefs; pass keyword arguments to specialise
them, like ``typedefs.port { required = true, default = 80 }`` in Lua.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attr

__all__ = [
    "Field",
    "NO_DEFAULT",
    "Resolver",
    "validate_field",
    "is_nonempty",
    "UUID_RE",
]

# Kong's generic validation messages (kong/db/schema/init.lua).
ERR_ARRAY = "expected an array"
ERR_SET = "expected a set"
ERR_MAP = "expected a map"
ERR_RECORD = "expected a record"
ERR_STRING = "expected a string"
ERR_NUMBER = "expected a number"
ERR_BOOLEAN = "expected a boolean"
ERR_INTEGER = "expected an integer"
ERR_EQ = "value must be %s"
ERR_NE = "value must not be %s"
ERR_GT = "value must be greater than %s"
ERR_BETWEEN = "value should be between %d and %d"
ERR_LEN_EQ = "length must be %d"
ERR_LEN_MIN = "length must be at least %d"
ERR_LEN_MAX = "length must be at most %d"
ERR_MATCH = "invalid value: %s"
ERR_STARTS_WITH = "should start with: %s"
ERR_CONTAINS = "expected to contain: %s"
ERR_ONE_OF = "expected one of: %s"
ERR_NOT_ONE_OF = "must not be one of: %s"
ERR_TIMESTAMP = "expected a valid timestamp"
ERR_UUID = "expected a valid UUID"
ERR_REQUIRED = "required field missing"
ERR_UNKNOWN = "unknown field"
ERR_IMMUTABLE = "immutable field cannot be updated"
ERR_MISSING_PK = "missing primary key"
ERR_MUTUALLY_EXCLUSIVE_SETS = "these sets are mutually exclusive: %s"
ERR_AT_LEAST_ONE_OF = "at least one of these fields must be non-empty: %s"

UUID_RE = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE
)


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()

#: Looks up another entity by name (for validating foreign keys); returns an
#: object with ``validate_partial(dict) -> dict`` or ``None``.
Resolver = Callable[[str], Any]

Validator = Callable[[Any], Optional[str]]


def _tuple(value: Any) -> Tuple[Any, ...]:
    return tuple(value) if value is not None else ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Field:
    """One field declaration; attribute names follow Kong's schema DSL."""

    type: str
    required: bool = False
    default: Any = NO_DEFAULT
    auto: bool = False
    uuid: bool = False
    timestamp: bool = False
    unique: bool = False
    immutable: bool = False
    description: str = ""
    # aggregates
    elements: Optional["Field"] = None
    keys: Optional["Field"] = None
    values: Optional["Field"] = None
    fields: Tuple[Tuple[str, "Field"], ...] = attr.ib(default=(), converter=_tuple)
    record_at_least_one_of: Tuple[str, ...] = attr.ib(default=(), converter=_tuple)
    reference: Optional[str] = None
    on_delete: str = "restrict"
    # validators, in Kong's order
    eq_null: bool = False
    ne: Any = NO_DEFAULT
    not_one_of: Tuple[Any, ...] = attr.ib(default=(), converter=_tuple)
    one_of: Tuple[Any, ...] = attr.ib(default=(), converter=_tuple)
    gt: Optional[float] = None
    between: Optional[Tuple[int, int]] = None
    len_eq: Optional[int] = None
    len_min: Optional[int] = None
    len_max: Optional[int] = None
    starts_with: Optional[str] = None
    match_none: Tuple[Tuple[str, str], ...] = attr.ib(default=(), converter=_tuple)
    match: Optional[str] = None
    match_all: Tuple[Tuple[str, str], ...] = attr.ib(default=(), converter=_tuple)
    match_any: Optional[Tuple[Tuple[str, ...], str]] = None
    contains: Any = NO_DEFAULT
    custom: Optional[Validator] = attr.ib(default=None, eq=False)
    mutually_exclusive_subsets: Tuple[Tuple[str, ...], ...] = attr.ib(
        default=(), converter=_tuple
    )
    err: Optional[str] = None

    def evolve(self, **changes: Any) -> "Field":
        """A copy with some attributes changed (Kong's ``typedef { ... }``)."""
        return attr.evolve(self, **changes)

    @property
    def has_default(self) -> bool:
        return self.default is not NO_DEFAULT

    def field(self, name: str) -> Optional["Field"]:
        """The sub-field *name* of a record."""
        for fname, fdef in self.fields:
            if fname == name:
                return fdef
        return None


# -- value helpers ---------------------------------------------------------------


def is_nonempty(value: Any) -> bool:
    """Kong's ``is_nonempty``: not null, not an empty string, list or map."""
    if value is None:
        return False
    if isinstance(value, (str, list, dict, tuple)) and len(value) == 0:
        return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    if not _is_number(value):
        return False
    if isinstance(value, float):
        return value.is_integer()
    return True


def _fmt_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quoted_list(words: Sequence[Any]) -> str:
    parts = []
    for word in words:
        if isinstance(word, (list, tuple)):
            parts.append("(%s)" % _quoted_list(word))
        else:
            parts.append("'%s'" % word)
    return ", ".join(parts)


def _sequence(value: Any) -> Optional[list]:
    """The list behind an array/set value; an empty JSON object counts (as in Lua)."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and not value:
        return []
    return None


# -- validation ------------------------------------------------------------------


def _run_validators(field: Field, value: Any) -> Optional[str]:
    """Kong's ``Schema.validators`` in ``validators_order``; first failure wins."""
    err: Optional[str] = None
    if field.ne is not NO_DEFAULT and value == field.ne:
        err = ERR_NE % (
            "true" if value is True else "false" if value is False else value
        )
    elif field.not_one_of and value in field.not_one_of:
        err = ERR_NOT_ONE_OF % ", ".join(str(o) for o in field.not_one_of)
    elif field.one_of and not _in_options(value, field.one_of):
        err = ERR_ONE_OF % ", ".join(str(o) for o in field.one_of)
    elif field.gt is not None and not value > field.gt:
        err = ERR_GT % _fmt_number(field.gt)
    elif field.timestamp and not value > 0:
        err = ERR_TIMESTAMP
    elif field.uuid and not UUID_RE.match(value):
        err = ERR_UUID
    elif field.between is not None and not (
        field.between[0] <= value <= field.between[1]
    ):
        err = ERR_BETWEEN % (field.between[0], field.between[1])
    else:
        err = _run_string_validators(field, value)
    if err is not None and field.err is not None:
        return field.err
    return err


def _in_options(value: Any, options: Sequence[Any]) -> bool:
    for option in options:
        if type(option) is type(value) and option == value:
            return True
        if _is_number(option) and _is_number(value) and option == value:
            return True
    return False


def _run_string_validators(field: Field, value: Any) -> Optional[str]:
    length_of = None
    if isinstance(value, (str, list, dict)):
        length_of = len(value)
    if length_of is not None:
        len_min = field.len_min
        if len_min is None and field.type == "string":
            len_min = 1  # empty strings are not accepted by default
        if field.len_eq is not None and length_of != field.len_eq:
            return ERR_LEN_EQ % field.len_eq
        if len_min is not None and length_of < len_min:
            return ERR_LEN_MIN % len_min
        if field.len_max is not None and length_of > field.len_max:
            return ERR_LEN_MAX % field.len_max
    if isinstance(value, str):
        if field.starts_with is not None and not value.startswith(field.starts_with):
            return ERR_STARTS_WITH % field.starts_with
        for pattern, message in field.match_none:
            if re.search(pattern, value):
                return message
        if field.match is not None and not re.search(field.match, value):
            return ERR_MATCH % value
        for pattern, message in field.match_all:
            if not re.search(pattern, value):
                return message
        if field.match_any is not None:
            patterns, message = field.match_any
            if not any(re.search(p, value) for p in patterns):
                return message
    if field.contains is not NO_DEFAULT and isinstance(value, list):
        if field.contains not in value:
            return ERR_CONTAINS % field.contains
    if field.custom is not None:
        message = field.custom(value)
        if message is not None:
            return message
    if field.mutually_exclusive_subsets and isinstance(value, list):
        return _mutually_exclusive_subsets(value, field.mutually_exclusive_subsets)
    return None


def _mutually_exclusive_subsets(
    value: List[Any], subsets: Sequence[Sequence[str]]
) -> Optional[str]:
    union: Dict[Any, Sequence[str]] = {}
    for subset in subsets:
        for element in subset:
            union[element] = subset
    member_of: List[Sequence[str]] = []
    for element in value:
        subset = union.get(element) if isinstance(element, str) else None
        if subset is not None and subset not in member_of:
            member_of.append(subset)
    if len(member_of) <= 1:
        return None
    return ERR_MUTUALLY_EXCLUSIVE_SETS % _quoted_list(member_of)


def validate_field(
    field: Field, value: Any, resolver: Optional[Resolver] = None
) -> Any:
    """Validate *value* against *field*; ``None`` when valid, else Kong's error.

    The error is a string, a dict of sub-field errors (records, foreign keys) or
    a list holding ``None`` or the error of each array item.
    """
    if value is None:
        if field.ne is None:
            return field.err or ERR_NE % "null"
        if field.required:
            return ERR_REQUIRED
        return None
    if field.eq_null:
        return field.err or ERR_EQ % "null"

    ftype = field.type
    if ftype in ("array", "set"):
        items = _sequence(value)
        if items is None:
            return ERR_ARRAY if ftype == "array" else ERR_SET
        assert field.elements is not None
        element = field.elements.evolve(required=True)
        errors: List[Any] = [validate_field(element, item, resolver) for item in items]
        if any(e is not None for e in errors):
            while errors[-1] is None:
                errors.pop()
            return errors
        value = items
    elif ftype == "map":
        if not isinstance(value, dict) and _sequence(value) != []:
            return ERR_MAP
        assert field.keys is not None and field.values is not None
        keys = field.keys.evolve(required=True)
        values = field.values.evolve(required=True)
        for key, item in (value.items() if isinstance(value, dict) else ()):
            err = validate_field(keys, key, resolver)
            if err is not None:
                return err
            err = validate_field(values, item, resolver)
            if err is not None:
                return err
    elif ftype == "record":
        if not isinstance(value, dict):
            return ERR_RECORD
        errors_map = validate_record(field, value, resolver)
        if errors_map:
            return errors_map
    elif ftype == "foreign":
        return _validate_foreign(field, value, resolver)
    elif ftype == "integer":
        if not _is_integer(value):
            return ERR_INTEGER
    elif ftype == "number":
        if not _is_number(value):
            return ERR_NUMBER
    elif ftype == "string":
        if not isinstance(value, str):
            return ERR_STRING
    elif ftype == "boolean":
        if not isinstance(value, bool):
            return ERR_BOOLEAN
    else:  # pragma: no cover - a schema definition error
        return "invalid type: %s" % ftype
    return _run_validators(field, value)


def validate_record(
    field: Field, value: Mapping[str, Any], resolver: Optional[Resolver] = None
) -> Dict[str, Any]:
    """Errors of a record value (nested fields, then the record's own checks)."""
    errors: Dict[str, Any] = {}
    for key, item in value.items():
        sub = field.field(key)
        if sub is None:
            errors[key] = ERR_UNKNOWN
            continue
        err = validate_field(sub, item, resolver)
        if err is not None:
            errors[key] = err
    for name, sub in field.fields:
        if sub.required and value.get(name) is None and name not in errors:
            errors[name] = ERR_REQUIRED
    if field.record_at_least_one_of:
        if not any(is_nonempty(value.get(n)) for n in field.record_at_least_one_of):
            errors.setdefault("@entity", []).append(
                ERR_AT_LEAST_ONE_OF % _quoted_list(field.record_at_least_one_of)
            )
    return errors


def _validate_foreign(field: Field, value: Any, resolver: Optional[Resolver]) -> Any:
    """Kong validates a foreign key as the referenced entity's primary key.

    When ``id`` is missing, the other keys are first checked against the
    referenced entity (``service.protocol: expected one of ...``).
    """
    if isinstance(value, dict):
        if "id" in value:
            pk = value["id"]
            if pk is None:
                return {"id": ERR_REQUIRED}
            if not isinstance(pk, str):
                return {"id": ERR_STRING}
            if not UUID_RE.match(pk):
                return {"id": ERR_UUID}
            return None
        target = resolver(field.reference) if resolver and field.reference else None
        if target is not None:
            errors = target.validate_partial(value)
            if errors:
                return errors
    return {"id": ERR_MISSING_PK}


# -- value checks used by the typedefs ----------------------------------------------

_RFC3986_PATH = re.compile(r"^/[A-Za-z0-9.\-_~/%:@!$&'()*+,;=]*$")
_PERCENT_TRIPLET = re.compile(r"%[0-9A-Fa-f]{2}")
_HOSTNAME_CHARS = re.compile(r"^[0-9A-Za-z\-._]+$")
_IPV4 = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?::(\d+))?$")
_HEADER_NAME = re.compile(r"^[a-zA-Z0-9\-_]+$")
_UTF8_NAME = re.compile(r"^[A-Za-z0-9.\-_~\u0080-\U0010ffff]+$")
_TAG = re.compile(r"^[ !-+\-.0-~\u0080-\U0010ffff]+$")


def check_path(path: str) -> Optional[str]:
    """Kong's ``validate_path``: RFC 3986 characters, well-formed %-escapes."""
    if not _RFC3986_PATH.match(path):
        return (
            "invalid path: '%s' (characters outside of the reserved list of RFC 3986 found)"
            % path
        )
    raw = _PERCENT_TRIPLET.sub("___", path)
    index = raw.find("%")
    if index >= 0:
        return "invalid url-encoded value: '%s'" % raw[index : index + 3]
    return None


def _hostname_type(name: str) -> str:
    if name.count(":") > 1:
        return "ipv6"
    if re.match(r"^[\d.]+$", name.replace(":", "")):
        return "ipv4"
    return "name"


def _check_ipv6(address: str) -> Tuple[Optional[str], Optional[int], Optional[str]]:
    port: Optional[int] = None
    check = address
    bracketed = re.match(r"^\[([^\]]*)\](.*)$", address)
    if bracketed:
        check, rest = bracketed.group(1), bracketed.group(2)
        if rest:
            port_match = re.match(r"^:(\d*)$", rest)
            if not port_match:
                return None, None, "invalid ipv6 address"
            port = int(port_match.group(1) or 0)
            if port > 65535:
                return None, None, "invalid port number"
    if check.startswith(":"):
        check = "0" + check
    if check.endswith(":"):
        check = check + "0"
    if "::" in check:
        count = check.count(":")
        check = check.replace("::", ":" + "0:" * (8 - count), 1)
    groups = check.split(":")
    if len(groups) != 8 or not all(re.match(r"^[0-9A-Fa-f]{1,4}$", g) for g in groups):
        return None, None, "invalid ipv6 address: " + address
    return check, port, None


def normalize_ip(address: str) -> Tuple[Optional[str], Optional[int], Optional[str], str]:
    """Kong's ``tools.ip.normalize_ip``: ``(host, port, error, type)``."""
    kind = _hostname_type(address)
    if kind == "ipv4":
        m = _IPV4.match(address)
        if not m or any(int(m.group(i)) > 255 for i in range(1, 5)):
            return None, None, "invalid ipv4 address: " + address, kind
        port = int(m.group(5)) if m.group(5) else None
        if port is not None and port > 65535:
            return None, None, "invalid port number", kind
        return ".".join(str(int(m.group(i))) for i in range(1, 5)), port, None, kind
    if kind == "ipv6":
        host, port, err = _check_ipv6(address)
        return host, port, err, kind
    name = address
    port = None
    m = re.search(r":(\d+)$", address)
    if m:
        name = address[: -(len(m.group(1)) + 1)]
        port = int(m.group(1))
        if port > 65535:
            return None, None, "invalid port number", kind
    if not _HOSTNAME_CHARS.match(name):
        return None, None, "invalid hostname: " + address, kind
    segments = name.split(".")
    for index, segment in enumerate(segments):
        if segment.endswith("-") or (segment == "" and index != len(segments) - 1):
            return None, None, "invalid hostname: " + address, kind
    return name, port, None, kind


def check_host(host: str) -> Optional[str]:
    """Kong's ``validate_host``: a name or IP, without a port."""
    _, port, err, _ = normalize_ip(host)
    if err is not None and err != "invalid port number":
        return "invalid value: " + host
    if err == "invalid port number" or port is not None:
        return "must not have a port"
    return None


def check_host_with_optional_port(host: str) -> Optional[str]:
    _, _, err, _ = normalize_ip(host)
    return err


def check_wildcard_host(host: str) -> Optional[str]:
    """Kong's ``validate_wildcard_host`` (SNIs)."""
    index = host.find("*")
    if index >= 0:
        if index != 0 and index != len(host) - 1:
            return "wildcard must be leftmost or rightmost character"
        if host.count("*") > 1:
            return "only one wildcard must be specified"
        host = host.replace("*", "wildcard")
    _, port, err, kind = normalize_ip(host)
    if err is not None and err != "invalid port number":
        return "invalid value: " + host
    if err is None and kind != "name":
        return "must not be an IP"
    if err == "invalid port number" or port is not None:
        return "must not have a port"
    return None


def check_utf8_name(name: str) -> Optional[str]:
    if not _UTF8_NAME.match(name):
        return (
            "invalid value '%s': the only accepted ascii characters are "
            "alphanumerics or ., -, _, and ~" % name
        )
    return None


def check_tag(tag: str) -> Optional[str]:
    if not _TAG.match(tag):
        return (
            "invalid tag '%s': expected printable ascii (except `,` and `/`) "
            "or valid utf-8 sequences" % tag
        )
    return None


def check_header_name(name: str) -> Optional[str]:
    if not _HEADER_NAME.match(name):
        return (
            "bad header name '%s', allowed characters are A-Z, a-z, 0-9, '_', and '-'"
            % name
        )
    return None


def check_ip_or_cidr(value: str) -> Optional[str]:
    import ipaddress

    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return "invalid ip or cidr range: '%s'" % value
    return None


# -- typedefs ----------------------------------------------------------------------

PROTOCOLS = ("grpc", "grpcs", "http", "https", "tcp", "tls", "tls_passthrough", "udp")


def string(**kw: Any) -> Field:
    return Field("string", **kw)


def integer(**kw: Any) -> Field:
    return Field("integer", **kw)


def number(**kw: Any) -> Field:
    return Field("number", **kw)


def boolean(**kw: Any) -> Field:
    return Field("boolean", **kw)


def array(elements: Field, **kw: Any) -> Field:
    return Field("array", elements=elements, **kw)


def set_of(elements: Field, **kw: Any) -> Field:
    return Field("set", elements=elements, **kw)


def map_of(keys: Field, values: Field, **kw: Any) -> Field:
    return Field("map", keys=keys, values=values, **kw)


def record(fields: Sequence[Tuple[str, Field]], **kw: Any) -> Field:
    return Field("record", fields=tuple(fields), **kw)


def foreign(reference: str, **kw: Any) -> Field:
    return Field("foreign", reference=reference, **kw)


def uuid(**kw: Any) -> Field:
    kw.setdefault("auto", True)
    return Field("string", uuid=True, **kw)


def auto_timestamp_s(**kw: Any) -> Field:
    return Field("integer", timestamp=True, auto=True, **kw)


def utf8_name(**kw: Any) -> Field:
    return Field("string", unique=True, custom=check_utf8_name, **kw)


def host(**kw: Any) -> Field:
    return Field("string", custom=check_host, **kw)


def port(**kw: Any) -> Field:
    return Field("integer", between=(0, 65535), **kw)


def path(**kw: Any) -> Field:
    return Field(
        "string",
        starts_with="/",
        match_none=(("//", "must not have empty segments"),),
        custom=check_path,
        **kw,
    )


def protocol(**kw: Any) -> Field:
    return Field("string", one_of=PROTOCOLS, **kw)


def timeout(**kw: Any) -> Field:
    return Field("integer", between=(0, 2**31 - 2), **kw)


def nonzero_timeout(**kw: Any) -> Field:
    return Field("integer", between=(1, 2**31 - 2), **kw)


def tag(**kw: Any) -> Field:
    return Field("string", required=True, custom=check_tag, **kw)


def tags(**kw: Any) -> Field:
    return Field("set", elements=tag(), **kw)


def header_name(**kw: Any) -> Field:
    return Field("string", custom=check_header_name, **kw)


def http_method(**kw: Any) -> Field:
    return Field("string", match=r"^[A-Z]+$", **kw)


def wildcard_host(**kw: Any) -> Field:
    return Field("string", custom=check_wildcard_host, **kw)


def ip_or_cidr(**kw: Any) -> Field:
    return Field("string", custom=check_ip_or_cidr, **kw)
