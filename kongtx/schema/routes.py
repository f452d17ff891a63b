"""The ``routes`` entity (Kong's ``routes.lua`` and ``routes_subschemas.lua``).

kongtx implements Kong's ``traditional_compatible`` router flavour without
``expressions``: the ``expression``/``priority`` fields are not offered.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from kongtx.schema import typedefs as t
from kongtx.schema.entity import (
    Conditional,
    ConditionalAtLeastOneOf,
    Entity,
    Subschema,
)

try:
    from kongtx.uri import normalize as _normalize_path
except ImportError:  # pragma: no cover - kongtx.uri ships with kongtx
    _normalize_path = None  # type: ignore[assignment]

try:
    from kongtx.router import translate_regex as _translate_regex
except ImportError:  # pragma: no cover - kongtx.router ships with kongtx
    def _translate_regex(pattern: str) -> str:
        return pattern

__all__ = ["ROUTES", "check_router_path"]

ERR_SNIS_ONLY = (
    "'snis' can only be set when 'protocols' is 'grpcs', 'https', 'tls' or 'tls_passthrough'"
)
ERR_HOST_HEADER = "cannot contain 'host' header, which must be specified in the 'hosts' attribute"
ERR_PATH_START = "should start with: / (fixed path) or ~/ (regex path)"
ERR_EMPTY_SEGMENTS = "must not have empty segments"
ERR_NON_NORMALIZED = "non-normalized path, consider use '%s' instead"
ERR_INVALID_REGEX = "invalid regex: '%s' (PCRE returned: %s)"
ERR_WILDCARD_COUNT = "invalid wildcard: must have at most one wildcard"
ERR_WILDCARD_PLACE = "invalid wildcard: must be placed at leftmost or rightmost label"

HTTP_ERR = "cannot set '%s' when 'protocols' is 'http' or 'https'"
STREAM_ERR = "cannot set '%s' when 'protocols' is 'tcp', 'tls', 'tls_passthrough' or 'udp'"
GRPC_ERR = "cannot set '%s' when 'protocols' is 'grpc' or 'grpcs'"


def check_router_path(path: str) -> Optional[str]:
    """Kong's ``validate_path_with_regexes``: %-escapes, normal form, regex syntax."""
    err = t.check_path(path)
    if err is not None and err.startswith("invalid url-encoded value"):
        return err
    if not path.startswith("~"):
        normalized = _normalize_path(path) if _normalize_path is not None else path
        if normalized != path:
            return ERR_NON_NORMALIZED % normalized
        return None
    regex = path[1:]
    try:
        # the router's translation, so PCRE spellings such as (?<name>...) pass
        re.compile(_translate_regex(regex), re.ASCII)
    except (re.error, OverflowError, RecursionError) as exc:
        return ERR_INVALID_REGEX % (regex, exc)
    return None


def _host_with_wildcards(host: str) -> Optional[str]:
    return t.check_host_with_optional_port(host.replace("*", "abc"))


def _sources(**kw: Any) -> t.Field:
    return t.set_of(
        t.record(
            (("ip", t.ip_or_cidr()), ("port", t.port())),
            record_at_least_one_of=("ip", "port"),
        ),
        **kw,
    )


def _methods(**kw: Any) -> t.Field:
    return t.set_of(t.http_method(), **kw)


def _hosts(**kw: Any) -> t.Field:
    return t.array(
        t.string(
            match_all=((r"^[^*]*\*?[^*]*$", ERR_WILDCARD_COUNT),),
            match_any=((r"^\*\.", r"\.\*$", r"^[^*]*$"), ERR_WILDCARD_PLACE),
            custom=_host_with_wildcards,
        ),
        **kw,
    )


def _paths(**kw: Any) -> t.Field:
    return t.array(
        t.string(
            match_any=((r"^/", r"^~/"), ERR_PATH_START),
            match_none=(("//", ERR_EMPTY_SEGMENTS),),
            custom=check_router_path,
        ),
        **kw,
    )


def _headers(**kw: Any) -> t.Field:
    return t.map_of(
        t.header_name(match_none=((r"^[Hh][Oo][Ss][Tt]$", ERR_HOST_HEADER),)),
        t.array(t.string()),
        **kw,
    )


def _contains(item: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and item in value


def _all_in(*options: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(v in options for v in value)


def _all_not_in(*options: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(v not in options for v in value)


def _empty_set(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, list) and not value):
        return None
    return t.ERR_LEN_EQ % 0


_HTTP = Subschema(
    "http",
    fields={
        "sources": _sources(eq_null=True, err=HTTP_ERR % "sources"),
        "destinations": _sources(eq_null=True, err=HTTP_ERR % "destinations"),
    },
    checks=(
        ConditionalAtLeastOneOf(
            if_field="protocols",
            if_match=_contains("https"),
            then_at_least_one_of=("methods", "hosts", "headers", "paths", "snis"),
            then_err="must set one of %s when 'protocols' is 'https'",
            else_match=_contains("http"),
            else_then_at_least_one_of=("methods", "hosts", "headers", "paths"),
            else_then_err="must set one of %s when 'protocols' is 'http'",
        ),
    ),
)

_STREAM = Subschema(
    "tcp",
    fields={
        "methods": _methods(eq_null=True, err=STREAM_ERR % "methods"),
        "hosts": _hosts(eq_null=True, err=STREAM_ERR % "hosts"),
        "paths": _paths(eq_null=True, err=STREAM_ERR % "paths"),
        "headers": _headers(eq_null=True, err=STREAM_ERR % "headers"),
    },
    checks=(
        ConditionalAtLeastOneOf(
            if_field="protocols",
            if_match=_all_in("tcp", "tls", "udp"),
            then_at_least_one_of=("sources", "destinations", "snis"),
            then_err="must set one of %s when 'protocols' is 'tcp', 'tls' or 'udp'",
        ),
        ConditionalAtLeastOneOf(
            if_field="protocols",
            if_match=_all_in("tls_passthrough"),
            then_at_least_one_of=("snis",),
            then_err="must set snis when 'protocols' is 'tls_passthrough'",
        ),
    ),
)

_GRPC = Subschema(
    "grpc",
    fields={
        "strip_path": t.boolean(
            required=True, default=False, ne=True, err=GRPC_ERR % "strip_path"
        ),
        "methods": _methods(eq_null=True, err=GRPC_ERR % "methods"),
        "sources": _sources(eq_null=True, err=GRPC_ERR % "sources"),
        "destinations": _sources(eq_null=True, err=GRPC_ERR % "destinations"),
    },
    checks=(
        ConditionalAtLeastOneOf(
            if_field="protocols",
            if_match=_contains("grpcs"),
            then_at_least_one_of=("hosts", "headers", "paths", "snis"),
            then_err="must set one of %s when 'protocols' is 'grpcs'",
            else_match=_contains("grpc"),
            else_then_at_least_one_of=("hosts", "headers", "paths"),
            else_then_err="must set one of %s when 'protocols' is 'grpc'",
        ),
    ),
)

ROUTES = Entity(
    name="routes",
    endpoint_key="name",
    subschema_key="protocols",
    subschemas={
        "http": _HTTP,
        "https": _HTTP,
        "tcp": _STREAM,
        "tls": _STREAM,
        "udp": _STREAM,
        "tls_passthrough": _STREAM,
        "grpc": _GRPC,
        "grpcs": _GRPC,
    },
    fields=(
        ("id", t.uuid()),
        ("created_at", t.auto_timestamp_s()),
        ("updated_at", t.auto_timestamp_s()),
        ("name", t.utf8_name()),
        (
            "protocols",
            t.set_of(
                t.protocol(),
                required=True,
                len_min=1,
                default=["http", "https"],
                mutually_exclusive_subsets=(
                    ("http", "https"),
                    ("tcp", "tls", "udp"),
                    ("tls_passthrough",),
                    ("grpc", "grpcs"),
                ),
            ),
        ),
        (
            "https_redirect_status_code",
            t.integer(required=True, default=426, one_of=(426, 301, 302, 307, 308)),
        ),
        ("strip_path", t.boolean(required=True, default=True)),
        ("preserve_host", t.boolean(required=True, default=False)),
        ("request_buffering", t.boolean(required=True, default=True)),
        ("response_buffering", t.boolean(required=True, default=True)),
        ("tags", t.tags()),
        ("service", t.foreign("services", on_delete="restrict")),
        ("snis", t.set_of(t.wildcard_host())),
        ("sources", _sources()),
        ("destinations", _sources()),
        ("methods", _methods()),
        ("hosts", _hosts()),
        ("paths", _paths()),
        ("headers", _headers()),
        ("regex_priority", t.integer(default=0)),
        ("path_handling", t.string(default="v0", one_of=("v0", "v1"))),
    ),
    checks=(
        Conditional(
            if_field="protocols",
            if_match=_all_not_in("grpcs", "https", "tls", "tls_passthrough"),
            then_field="snis",
            then_check=_empty_set,
            then_err=ERR_SNIS_ONLY,
        ),
    ),
)
