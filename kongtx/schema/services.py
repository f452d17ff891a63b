"""The ``services`` entity (Kong's ``kong/db/schema/entities/services.lua``)."""

from __future__ import annotations

import re
from typing import Any, Dict, Optional

from kongtx.schema import typedefs as t
from kongtx.schema.entity import Conditional, Entity, Shorthand

__all__ = ["SERVICES", "parse_url"]

DEFAULT_PROTOCOL = "http"
DEFAULT_PORT = 80
ERR_MUST_BE_NULL = t.ERR_EQ % "null"

_SCHEME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9+\-.]*):")


def parse_url(url: str) -> Dict[str, Any]:
    """LuaSocket's ``url.parse`` (scheme, authority, path; query and fragment dropped)."""
    parsed: Dict[str, Any] = {}
    m = _SCHEME.match(url)
    if m:
        parsed["scheme"] = m.group(1)
        url = url[m.end():]
    if url.startswith("//"):
        end = url.find("/", 2)
        end = len(url) if end < 0 else end
        parsed["authority"] = url[2:end]
        url = url[end:]
    url = url.split("#", 1)[0]
    url = url.split("?", 1)[0]
    url = url.split(";", 1)[0]
    if url:
        parsed["path"] = url
    authority = parsed.get("authority")
    if authority is None:
        return parsed
    if "@" in authority:
        authority = authority.split("@", 1)[1]
    pm = re.search(r":([^:\]]*)$", authority)
    if pm:
        parsed["port"] = pm.group(1)
        authority = authority[: pm.start()]
    if authority:
        v6 = re.match(r"^\[(.+)\]$", authority)
        parsed["host"] = v6.group(1) if v6 else authority
    return parsed


def _expand_url(value: Any) -> Optional[Dict[str, Any]]:
    """The ``url`` shorthand: protocol, host, port and path from one URL."""
    parsed = parse_url(str(value))
    raw_port = parsed.get("port")
    port: Any = None
    if raw_port is not None:
        try:
            port = int(raw_port)
        except ValueError:
            port = raw_port
    implied = None
    if port == 80:
        implied = "http"
    elif port == 443:
        implied = "https"
    protocol = parsed.get("scheme") or implied or DEFAULT_PROTOCOL
    if port is None:
        port = 80 if protocol == "http" else 443 if protocol == "https" else DEFAULT_PORT
    return {
        "protocol": protocol,
        "host": parsed.get("host"),
        "port": port,
        "path": parsed.get("path"),
    }


def _one_of(*options: str) -> Any:
    return lambda value: value in options


def _not_one_of(*options: str) -> Any:
    return lambda value: value not in options


def _must_be_null(value: Any) -> Optional[str]:
    return None if value is None else ERR_MUST_BE_NULL


def _https_only(field: str) -> Conditional:
    return Conditional(
        if_field="protocol",
        if_match=_not_one_of("https", "tls"),
        then_field=field,
        then_check=_must_be_null,
    )


SERVICES = Entity(
    name="services",
    endpoint_key="name",
    fields=(
        ("id", t.uuid()),
        ("created_at", t.auto_timestamp_s()),
        ("updated_at", t.auto_timestamp_s()),
        ("name", t.utf8_name()),
        ("retries", t.integer(default=5, between=(0, 32767))),
        ("protocol", t.protocol(required=True, default=DEFAULT_PROTOCOL)),
        ("host", t.host(required=True)),
        ("port", t.port(required=True, default=DEFAULT_PORT)),
        ("path", t.path()),
        ("connect_timeout", t.nonzero_timeout(default=60000)),
        ("write_timeout", t.nonzero_timeout(default=60000)),
        ("read_timeout", t.nonzero_timeout(default=60000)),
        ("tags", t.tags()),
        ("client_certificate", t.foreign("certificates")),
        ("tls_verify", t.boolean()),
        ("tls_verify_depth", t.integer(between=(0, 64))),
        ("ca_certificates", t.array(t.string(uuid=True))),
        ("enabled", t.boolean(required=True, default=True)),
    ),
    checks=(
        Conditional(
            if_field="protocol",
            if_match=_one_of("tcp", "tls", "udp", "grpc", "grpcs"),
            then_field="path",
            then_check=_must_be_null,
        ),
        _https_only("client_certificate"),
        _https_only("tls_verify"),
        _https_only("tls_verify_depth"),
        _https_only("ca_certificates"),
    ),
    shorthands=(Shorthand("url", t.string(), _expand_url),),
)
