"""kong.conf + ``KONG_*`` environment -> one frozen, validated ``Config``.

``load_config`` reads Kong's configuration format, applies environment overrides and
the ``--prefix`` option, checks every property and returns a ``Config`` whose attribute
names are Kong's property names. A bad value raises ``ConfigError``; its ``str()`` is
the single line an operator sees. This module reads files but never touches the reactor:
it runs once, before the server starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import attr

DEFAULT_PATHS = ("/etc/kong/kong.conf", "/etc/kong.conf")

#: What ``sanitized()`` shows instead of a secret.
REDACTED = "******"

#: Properties whose values are never shown.
SECRET_PROPERTIES = frozenset({"pg_password"})

LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
CIPHER_SUITE_NAMES = ("modern", "intermediate", "old", "custom")
SSL_PROTOCOLS = ("TLSv1.1", "TLSv1.2", "TLSv1.3")
ERROR_TYPES = ("text/plain", "text/html", "application/json", "application/xml")
DATABASES = ("sqlite", "postgres", "off")
ROUTER_FLAVORS = ("traditional", "traditional_compatible")
WORKER_CONSISTENCIES = ("strict", "eventual")

#: Response headers that ``headers`` may enable, by lower-case name.
RESPONSE_HEADERS = {
    name.lower(): name
    for name in (
        "Server",
        "Via",
        "X-Kong-Proxy-Latency",
        "X-Kong-Response-Latency",
        "X-Kong-Upstream-Latency",
        "X-Kong-Admin-Latency",
        "X-Kong-Upstream-Status",
        "X-Kong-Request-Id",
    )
}
HEADER_GROUPS = {
    "server_tokens": ("Server", "Via"),
    "latency_tokens": (
        "X-Kong-Proxy-Latency",
        "X-Kong-Response-Latency",
        "X-Kong-Upstream-Latency",
        "X-Kong-Admin-Latency",
    ),
}
UPSTREAM_HEADERS = {"x-kong-request-id": "X-Kong-Request-Id"}

#: Listen flags kongtx honours, and nginx-only ones it accepts and ignores.
LISTEN_FLAGS = ("ssl", "http2", "reuseport")
IGNORED_LISTEN_FLAGS = ("proxy_protocol", "deferred", "bind")

_DIGITS = re.compile(r"[0-9]{1,18}")
_NUMBER = re.compile(r"[0-9]{1,18}(\.[0-9]{1,9})?")
_SIZE = re.compile(r"([0-9]{1,15})([kKmMgG]?)")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SO_KEEPALIVE = re.compile(r"so_keepalive=(on|off|[0-9]*[smh]?:[0-9]*[smh]?:[0-9]*)")
_COMMENT = re.compile(r"(?<!\\)#.*$")

TrustedNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(Exception):
    """A configuration property has a bad value; ``str()`` is ``'<property>: <problem>'``."""

    def __init__(self, property: str, problem: str) -> None:
        super().__init__(property, problem)
        self.property = property
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.property}: {self.problem}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ListenSpec:
    """One ``address:port [flags]`` entry of a ``*_listen`` property."""

    host: str  # IPv6 without brackets; "localhost" kept as given
    port: int  # 0 lets the OS pick (tests)
    ssl: bool = False
    http2: bool = False
    reuseport: bool = False
    backlog: Optional[int] = None
    ignored_flags: Tuple[str, ...] = ()
    #: The entry as written (for ``GET /``); not part of equality.
    entry: str = attr.ib(default="", eq=False, repr=False)

    @property
    def address(self) -> str:
        """``host:port`` with IPv6 hosts in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def listener(self) -> str:
        """Kong's canonical ``listener`` string: address then flags in Kong's order."""
        flags = [name for name in ("ssl", "http2") if getattr(self, name)]
        flags.extend(f for f in self.ignored_flags if f in IGNORED_LISTEN_FLAGS)
        if self.reuseport:
            flags.append("reuseport")
        if self.backlog is not None:
            flags.append(f"backlog={self.backlog}")
        flags.extend(f for f in self.ignored_flags if f not in IGNORED_LISTEN_FLAGS)
        return " ".join([self.address] + flags)

    def to_kong(self) -> Dict[str, Any]:
        """The entry as Kong shows it in ``GET /`` (``proxy_listeners`` items)."""
        ip = f"[{self.host}]" if ":" in self.host else self.host
        out: Dict[str, Any] = {
            "ip": ip,
            "port": self.port,
            "ssl": self.ssl,
            "http2": self.http2,
            "proxy_protocol": "proxy_protocol" in self.ignored_flags,
            "deferred": "deferred" in self.ignored_flags,
            "bind": "bind" in self.ignored_flags,
            "reuseport": self.reuseport,
        }
        if self.backlog is not None:
            out[f"backlog={self.backlog}"] = True
        for flag in self.ignored_flags:
            if flag not in IGNORED_LISTEN_FLAGS:
                out[flag] = True
        out["listener"] = self.listener
        return out


def parse_listen(property_name: str, value: str) -> Tuple[ListenSpec, ...]:
    """
    Parse a ``*_listen`` value: ``off`` or comma-separated ``address:port [flags]``.

    Addresses: IPv4, bracketed IPv6, ``localhost`` or ``*`` (= ``0.0.0.0``). Flags:
    ``ssl``, ``http2``, ``reuseport``, ``backlog=N``; the nginx-only ``proxy_protocol``,
    ``deferred``, ``bind``, ``ipv6only=on|off`` and ``so_keepalive=...`` are kept in
    ``ignored_flags``. Raises ``ConfigError`` naming ``property_name``.
    """
    value = value.strip()
    if value == "off":
        return ()
    if not value:
        raise ConfigError(
            property_name, "must be 'off' or a list of '<ip>:<port> [flags]' entries"
        )
    specs = []
    for entry in value.split(","):
        entry = entry.strip()
        tokens = entry.split()
        if not tokens:
            raise ConfigError(property_name, f"empty entry in '{value}'")
        if tokens == ["off"]:
            raise ConfigError(property_name, "'off' cannot be combined with other entries")
        host, port = _parse_address(property_name, tokens[0], entry)
        flags: Dict[str, Any] = {"ssl": False, "http2": False, "reuseport": False}
        backlog = None
        ignored: List[str] = []
        for flag in tokens[1:]:
            if flag in LISTEN_FLAGS:
                flags[flag] = True
            elif flag.startswith("backlog="):
                number = flag[len("backlog="):]
                if not _DIGITS.fullmatch(number) or int(number) == 0:
                    raise ConfigError(
                        property_name, f"invalid backlog '{number}' in '{entry}'"
                    )
                backlog = int(number)
            elif (
                flag in IGNORED_LISTEN_FLAGS
                or flag in ("ipv6only=on", "ipv6only=off")
                or _SO_KEEPALIVE.fullmatch(flag)
            ):
                if flag not in ignored:
                    ignored.append(flag)
            else:
                raise ConfigError(property_name, f"invalid flag '{flag}' in '{entry}'")
        specs.append(
            ListenSpec(
                host=host,
                port=port,
                backlog=backlog,
                ignored_flags=tuple(ignored),
                entry=entry,
                **flags,
            )
        )
    return tuple(specs)


def _parse_address(property_name: str, text: str, entry: str) -> Tuple[str, int]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ConfigError(property_name, f"invalid address '{text}' in '{entry}'")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                property_name, f"invalid IPv6 address '{host}' in '{entry}'"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(
                property_name, f"missing port in '{entry}' (expected <ip>:<port>)"
            )
        if host == "*":
            host = "0.0.0.0"
        elif host != "localhost":
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ConfigError(
                    property_name, f"invalid address '{host}' in '{entry}'"
                ) from None
    if not _DIGITS.fullmatch(port_text) or int(port_text) > 65535:
        raise ConfigError(property_name, f"invalid port '{port_text}' in '{entry}'")
    return host, int(port_text)


# --- property parsers: (name, raw text) -> value, raising ConfigError -------------


def _string(name: str, text: str) -> str:
    return text


def _optional_string(name: str, text: str) -> Optional[str]:
    return text or None


def _non_empty(name: str, text: str) -> str:
    if not text:
        raise ConfigError(name, "must not be empty")
    return text


def _boolean(name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("on", "true"):
        return True
    if lowered in ("off", "false"):
        return False
    raise ConfigError(name, f"invalid boolean '{text}' (expected on, off, true or false)")


def _integer(name: str, text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise ConfigError(name, f"invalid integer '{text}'")
    return int(text)


def _bounded(low: int, high: Optional[int] = None) -> Callable[[str, str], int]:
    def parse(name: str, text: str) -> int:
        number = _integer(name, text)
        if number < low or (high is not None and number > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ConfigError(name, f"must be an integer {bounds}, got '{text}'")
        return number

    return parse


def _number(name: str, text: str) -> Union[int, float]:
    if not _NUMBER.fullmatch(text):
        raise ConfigError(name, f"invalid number '{text}'")
    return float(text) if "." in text else int(text)


def _positive_number(name: str, text: str) -> Union[int, float]:
    number = _number(name, text)
    if number <= 0:
        raise ConfigError(name, f"must be greater than 0, got '{text}'")
    return number


def _optional_number(name: str, text: str) -> Optional[Union[int, float]]:
    return _number(name, text) if text else None


def _size(name: str, text: str) -> int:
    match = _SIZE.fullmatch(text)
    if not match:
        raise ConfigError(name, f"invalid size '{text}' (expected e.g. 512, 16k, 10m, 1g)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _positive_size(name: str, text: str) -> int:
    size = _size(name, text)
    if size == 0:
        raise ConfigError(name, "must be greater than 0")
    return size


def _one_of(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, text: str) -> str:
        if text not in choices:
            raise ConfigError(
                name, f"invalid value '{text}' (expected {_or_list(choices)})"
            )
        return text

    return parse


def _list(text: str) -> Tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _name_list(name: str, text: str) -> Tuple[str, ...]:
    items = _list(text)
    if items == ("off",):
        return ()
    return items


def _path_list(name: str, text: str) -> Tuple[str, ...]:
    return tuple(os.path.abspath(item) for item in _list(text))


def _optional_path(name: str, text: str) -> Optional[str]:
    return os.path.abspath(text) if text else None


def _listen(name: str, text: str) -> Tuple[ListenSpec, ...]:
    return parse_listen(name, text)


def _log_level(name: str, text: str) -> str:
    if text not in LOG_LEVELS:
        raise ConfigError(name, f"invalid log level '{text}' (expected {_or_list(LOG_LEVELS)})")
    return text


def _syslog_address(name: str, text: str) -> str:
    from kongtx.logging.syslog import parse_address

    try:
        return str(parse_address(text))
    except ValueError as exc:
        raise ConfigError(name, str(exc))


def _syslog_facility(name: str, text: str) -> str:
    from kongtx.logging.syslog import FACILITIES

    value = text.strip().lower()
    if value not in FACILITIES:
        raise ConfigError(name, f"invalid syslog facility '{text}' (expected {_or_list(list(FACILITIES))})")
    return value


def _worker_processes(name: str, text: str) -> str:
    if text != "auto" and not (_DIGITS.fullmatch(text) and int(text) > 0):
        raise ConfigError(name, f"must be 'auto' or a positive integer, got '{text}'")
    return text


_NGINX_TIME = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_NGINX_TIME_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _nginx_time(name: str, text: str) -> float:
    """An nginx time (``10s``, ``500ms``, ``1m``; a bare number is seconds) in seconds."""
    found = _NGINX_TIME.fullmatch(text.strip())
    if found is None:
        raise ConfigError(name, f"invalid time '{text}' (expected e.g. 10s, 500ms or 1m)")
    return float(found.group(1)) * _NGINX_TIME_UNITS[found.group(2) or "s"]


def _ssl_protocols(name: str, text: str) -> Tuple[str, ...]:
    tokens = tuple(t for t in re.split(r"[\s,]+", text) if t)
    if not tokens:
        raise ConfigError(name, f"must list at least one of {', '.join(SSL_PROTOCOLS)}")
    for token in tokens:
        if token not in SSL_PROTOCOLS:
            raise ConfigError(
                name, f"unsupported protocol '{token}' (expected {_or_list(SSL_PROTOCOLS)})"
            )
    return tuple(p for p in SSL_PROTOCOLS if p in tokens)


def _header_set(
    allowed: Mapping[str, str], groups: Mapping[str, Tuple[str, ...]]
) -> Callable[[str, str], FrozenSet[str]]:
    def parse(name: str, text: str) -> FrozenSet[str]:
        items = _list(text)
        if not items:
            return frozenset()
        if any(item.lower() == "off" for item in items):
            if len(items) > 1:
                raise ConfigError(name, "'off' cannot be combined with other values")
            return frozenset()
        headers = set()
        for item in items:
            lowered = item.lower()
            if lowered in groups:
                headers.update(groups[lowered])
            elif lowered in allowed:
                headers.add(allowed[lowered])
            else:
                raise ConfigError(name, f"invalid header '{item}'")
        return frozenset(headers)

    return parse


def _trusted_ips(name: str, text: str) -> Tuple[Any, ...]:
    """Returns networks, plus the string ``unix:`` when present (split out later)."""
    out: List[Any] = []
    for item in _list(text):
        if item == "unix:":
            out.append(item)
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                name, f"invalid IP address or CIDR range '{item}'"
            ) from None
    return tuple(out)


def _router_flavor(name: str, text: str) -> str:
    if text == "expressions":
        raise ConfigError(name, "'expressions' is not supported by kongtx")
    return _one_of(*ROUTER_FLAVORS)(name, text)


def _database(name: str, text: str) -> str:
    if text not in DATABASES:
        raise ConfigError(
            name, f"unknown database '{text}' (expected {_or_list(DATABASES)})"
        )
    return text


def _trusted_certificates(name: str, text: str) -> Tuple[str, ...]:
    items = _list(text)
    if items == ("off",):
        return ()
    return tuple(item if item == "system" else os.path.abspath(item) for item in items)


def _node_id(name: str, text: str) -> Optional[str]:
    if not text:
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ConfigError(name, f"must be a valid UUID, got '{text}'") from None


def _or_list(choices: Sequence[str]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


Parser = Callable[[str, str], Any]

#: Every property kongtx knows: name -> (default text, parser). Order = documentation.
PROPERTIES: Dict[str, Tuple[str, Parser]] = {
    "prefix": ("/usr/local/kong/", _non_empty),
    "log_level": ("notice", _log_level),
    "proxy_access_log": ("logs/access.log", _non_empty),
    "proxy_error_log": ("logs/error.log", _non_empty),
    "admin_access_log": ("logs/admin_access.log", _non_empty),
    "admin_error_log": ("logs/error.log", _non_empty),
    # kongtx: where the ``syslog`` log target sends datagrams (see kongtx/logging).
    "syslog_address": ("/dev/log", _syslog_address),
    "syslog_facility": ("user", _syslog_facility),
    "plugins": ("bundled", _name_list),
    "anonymous_reports": ("on", _boolean),
    "proxy_listen": (
        "0.0.0.0:8000 reuseport backlog=16384, "
        "0.0.0.0:8443 http2 ssl reuseport backlog=16384",
        _listen,
    ),
    "admin_listen": (
        "127.0.0.1:8001 reuseport backlog=16384, "
        "127.0.0.1:8444 http2 ssl reuseport backlog=16384",
        _listen,
    ),
    "status_listen": ("off", _listen),
    "nginx_worker_processes": ("auto", _worker_processes),
    "nginx_main_worker_shutdown_timeout": ("10s", _nginx_time),
    "ssl_cipher_suite": ("intermediate", _one_of(*CIPHER_SUITE_NAMES)),
    "ssl_ciphers": ("", _string),
    "ssl_protocols": ("TLSv1.2 TLSv1.3", _ssl_protocols),
    "ssl_cert": ("", _path_list),
    "ssl_cert_key": ("", _path_list),
    "admin_ssl_cert": ("", _path_list),
    "admin_ssl_cert_key": ("", _path_list),
    "headers": (
        "server_tokens, latency_tokens, X-Kong-Request-Id",
        _header_set(RESPONSE_HEADERS, HEADER_GROUPS),
    ),
    "headers_upstream": ("X-Kong-Request-Id", _header_set(UPSTREAM_HEADERS, {})),
    "trusted_ips": ("", _trusted_ips),
    "real_ip_header": ("X-Real-IP", _non_empty),
    "real_ip_recursive": ("off", _boolean),
    "error_default_type": ("text/plain", _one_of(*ERROR_TYPES)),
    "upstream_keepalive_pool_size": ("512", _bounded(0)),
    "upstream_keepalive_max_requests": ("10000", _bounded(0)),
    "upstream_keepalive_idle_timeout": ("60", _bounded(0)),
    "allow_debug_header": ("off", _boolean),
    "nginx_http_client_max_body_size": ("128m", _size),
    "nginx_http_client_header_timeout": ("60s", _nginx_time),
    "nginx_admin_client_max_body_size": ("10m", _size),
    "lua_max_req_headers": ("100", _bounded(1, 1000)),
    "client_max_header_size": ("32k", _positive_size),
    "database": ("sqlite", _database),
    "sqlite_path": ("kongtx.db", _non_empty),
    "pg_host": ("127.0.0.1", _non_empty),
    "pg_port": ("5432", _bounded(1, 65535)),
    "pg_timeout": ("5000", _bounded(0)),
    "pg_user": ("kong", _non_empty),
    "pg_password": ("", _optional_string),
    "pg_database": ("kong", _non_empty),
    "pg_schema": ("", _optional_string),
    "pg_ssl": ("off", _boolean),
    "pg_ssl_verify": ("off", _boolean),
    "pg_max_concurrent_queries": ("0", _bounded(0)),
    "pg_semaphore_timeout": ("60000", _bounded(0)),
    "declarative_config": ("", _optional_path),
    "db_update_frequency": ("5", _positive_number),
    "db_update_propagation": ("0", _number),
    "db_cache_ttl": ("0", _number),
    "db_cache_neg_ttl": ("", _optional_number),
    "db_resurrect_ttl": ("30", _number),
    "router_flavor": ("traditional_compatible", _router_flavor),
    "lua_ssl_trusted_certificate": ("system", _trusted_certificates),
    "lua_ssl_verify_depth": ("1", _bounded(0, 100)),
    "worker_consistency": ("eventual", _one_of(*WORKER_CONSISTENCIES)),
    "worker_state_update_frequency": ("5", _positive_number),
    "node_id": ("", _node_id),
}

_LISTEN_PROPERTIES = ("proxy_listen", "admin_listen", "status_listen")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Config:
    """The validated configuration; attribute names are kong.conf property names."""

    prefix: str
    log_level: str
    proxy_access_log: str
    proxy_error_log: str
    admin_access_log: str
    admin_error_log: str
    syslog_address: str
    syslog_facility: str
    plugins: Tuple[str, ...]
    anonymous_reports: bool
    proxy_listen: Tuple[ListenSpec, ...]
    admin_listen: Tuple[ListenSpec, ...]
    status_listen: Tuple[ListenSpec, ...]
    nginx_worker_processes: str
    nginx_main_worker_shutdown_timeout: float
    ssl_cipher_suite: str
    #: The effective OpenSSL cipher string (the suite's list unless ``custom``).
    ssl_ciphers: str
    ssl_protocols: Tuple[str, ...]
    ssl_cert: Tuple[str, ...]
    ssl_cert_key: Tuple[str, ...]
    admin_ssl_cert: Tuple[str, ...]
    admin_ssl_cert_key: Tuple[str, ...]
    headers: FrozenSet[str]
    headers_upstream: FrozenSet[str]
    trusted_ips: Tuple[TrustedNetwork, ...]
    real_ip_header: str
    real_ip_recursive: bool
    error_default_type: str
    upstream_keepalive_pool_size: int
    upstream_keepalive_max_requests: int
    upstream_keepalive_idle_timeout: int
    allow_debug_header: bool
    nginx_http_client_max_body_size: int
    nginx_http_client_header_timeout: float
    nginx_admin_client_max_body_size: int
    lua_max_req_headers: int
    client_max_header_size: int
    database: str
    sqlite_path: str
    pg_host: str
    pg_port: int
    pg_timeout: int
    pg_user: str
    pg_password: Optional[str]
    pg_database: str
    pg_schema: Optional[str]
    pg_ssl: bool
    pg_ssl_verify: bool
    pg_max_concurrent_queries: int
    pg_semaphore_timeout: int
    declarative_config: Optional[str]
    db_update_frequency: float
    db_update_propagation: float
    db_cache_ttl: float
    db_cache_neg_ttl: Optional[float]
    db_resurrect_ttl: float
    router_flavor: str
    lua_ssl_trusted_certificate: Tuple[str, ...]
    lua_ssl_verify_depth: int
    worker_consistency: str
    worker_state_update_frequency: float
    node_id: Optional[str]
    #: ``trusted_ips`` contained ``unix:``.
    trusts_unix: bool = False
    #: Names found in the file that kongtx does not know (the server logs them).
    unknown_properties: Tuple[str, ...] = ()
    #: The configuration file read, or None when only defaults and env were used.
    source_path: Optional[str] = None
    #: The text values this configuration was parsed from (file, then ``KONG_*``,
    #: then ``--prefix``), sorted by name: :func:`config_from_values` rebuilds the
    #: same configuration from them (worker processes do).
    #: Not part of equality: two sources that give the same settings are equal.
    raw_values: Tuple[Tuple[str, str], ...] = attr.ib(default=(), eq=False)

    @property
    def worker_count(self) -> int:
        """How many worker processes ``nginx_worker_processes`` asks for (``auto``:
        one per CPU this process may run on)."""
        if self.nginx_worker_processes != "auto":
            return int(self.nginx_worker_processes)
        try:
            return max(len(os.sched_getaffinity(0)), 1)
        except (AttributeError, OSError):
            return max(os.cpu_count() or 1, 1)

    def prefix_path(self, *parts: str) -> str:
        """A path inside the prefix; an absolute part wins, as with ``os.path.join``."""
        return os.path.join(self.prefix, *parts)

    def sanitized(self) -> Dict[str, Any]:
        """Every property as JSON-able values, secrets replaced by ``'******'``."""
        out: Dict[str, Any] = {}
        for name in PROPERTIES:
            value = getattr(self, name)
            if name in SECRET_PROPERTIES and value is not None:
                out[name] = REDACTED
            elif name in _LISTEN_PROPERTIES:
                out[name] = [spec.entry or spec.listener for spec in value]
                out[name[: -len("_listen")] + "_listeners"] = [
                    spec.to_kong() for spec in value
                ]
            elif name == "trusted_ips":
                out[name] = [str(n) for n in value] + (["unix:"] if self.trusts_unix else [])
            elif isinstance(value, frozenset):
                out[name] = sorted(value)
            elif isinstance(value, tuple):
                out[name] = list(value)
            else:
                out[name] = value
        return out


def load_config(
    path: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    prefix: Optional[str] = None,
    *,
    search_paths: Optional[Sequence[str]] = None,
) -> Config:
    """
    Load and validate the configuration.

    ``path=None`` reads the first existing file of ``search_paths`` (default
    ``DEFAULT_PATHS``: Kong's ``/etc/kong/kong.conf``, ``/etc/kong.conf``), or uses
    defaults only. Then each property
    is overridden by ``KONG_<NAME>`` from ``env`` (default ``os.environ``), and
    ``prefix`` (the ``--prefix`` option) overrides both. Raises ``ConfigError``.
    """
    if env is None:
        env = os.environ
    source_path: Optional[str] = None
    values: Dict[str, str] = {}
    unknown: List[str] = []
    if path is None:
        for candidate in DEFAULT_PATHS if search_paths is None else search_paths:
            if os.path.isfile(candidate):
                path = candidate
                break
    if path is not None:
        source_path = os.path.abspath(path)
        for name, value in _parse_conf_file(source_path):
            if name in PROPERTIES:
                values[name] = value
            elif name not in unknown:
                unknown.append(name)
    for name in PROPERTIES:
        env_value = env.get("KONG_" + name.upper())
        if env_value is not None:
            values[name] = _clean_value(env_value)
    if prefix is not None:
        values["prefix"] = prefix.strip()
    return config_from_values(values, source_path, unknown)


def config_from_values(
    values: Mapping[str, str],
    source_path: Optional[str] = None,
    unknown: Sequence[str] = (),
) -> Config:
    """Validate text *values* (property name -> kong.conf text) into a :class:`Config`.

    :func:`load_config` gathers the values; a worker process rebuilds its
    master's exact configuration from ``Config.raw_values`` with this.
    Raises ``ConfigError``.
    """
    parsed: Dict[str, Any] = {}
    for name, (default, parser) in PROPERTIES.items():
        parsed[name] = parser(name, values.get(name, default))

    parsed["prefix"] = os.path.abspath(parsed["prefix"])
    parsed["sqlite_path"] = os.path.abspath(
        os.path.join(parsed["prefix"], parsed["sqlite_path"])
    )
    networks = parsed["trusted_ips"]
    trusts_unix = "unix:" in networks
    parsed["trusted_ips"] = tuple(n for n in networks if n != "unix:")
    _check_tls(parsed)
    _check_trusted_certificates(parsed["lua_ssl_trusted_certificate"])
    return Config(
        trusts_unix=trusts_unix,
        unknown_properties=tuple(unknown),
        source_path=source_path,
        raw_values=tuple(sorted(values.items())),
        **parsed,
    )


def _check_tls(parsed: Dict[str, Any]) -> None:
    from kongtx import tls

    suite = parsed["ssl_cipher_suite"]
    if suite == "custom":
        if not parsed["ssl_ciphers"]:
            raise ConfigError(
                "ssl_ciphers", "must be specified when ssl_cipher_suite is 'custom'"
            )
        try:
            tls.check_cipher_string(parsed["ssl_ciphers"])
        except ValueError as e:
            raise ConfigError("ssl_ciphers", str(e)) from None
    else:
        parsed["ssl_ciphers"] = tls.CIPHER_SUITES[suite]
    for cert_name, key_name in (
        ("ssl_cert", "ssl_cert_key"),
        ("admin_ssl_cert", "admin_ssl_cert_key"),
    ):
        certs, keys = parsed[cert_name], parsed[key_name]
        if certs and not keys:
            raise ConfigError(key_name, f"must be specified when {cert_name} is set")
        if keys and not certs:
            raise ConfigError(cert_name, f"must be specified when {key_name} is set")
        if len(certs) != len(keys):
            raise ConfigError(
                key_name,
                f"lists {len(keys)} keys but {cert_name} lists {len(certs)} certificates",
            )
        for cert_path, key_path in zip(certs, keys):
            try:
                tls.load_pem_pair(cert_path, key_path)
            except ValueError as e:
                problem = str(e)
                culprit = cert_name if problem.startswith("failed loading certificate") else key_name
                raise ConfigError(culprit, problem) from None


def _check_trusted_certificates(entries: Tuple[str, ...]) -> None:
    from kongtx import tls

    for entry in entries:
        if entry != "system":
            try:
                tls.load_ca_file(entry)
            except ValueError as e:
                raise ConfigError("lua_ssl_trusted_certificate", str(e)) from None


def _clean_value(text: str) -> str:
    """Strip an unescaped ``#`` comment, unescape ``\\#`` and trim whitespace."""
    return _COMMENT.sub("", text).replace("\\#", "#").strip()


def _parse_conf_file(path: str) -> List[Tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("conf", f"no file at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError("conf", f"cannot read {path}: {reason}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, value = stripped.partition("=")
        name = name.strip()
        if not sep or not name or re.search(r"\s", name):
            raise ConfigError(
                "conf", f"{path}:{number}: expected 'name = value', got '{stripped}'"
            )
        pairs.append((name, _clean_value(value)))
    return pairs
