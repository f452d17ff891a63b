"""The HTTP router: compile routes once, then pick the route for a request.

Pure code (no reactor, no clock, no I/O, no logging) following Kong's
traditional router (``kong/router/traditional.lua``); ``docs/routing.md``
states the rules in plain words. ``Router(routes)`` does all the work that
does not depend on a request (sorting, indexes, regex compilation);
``Router.select()`` only looks up dicts, compares strings and runs the
pre-compiled path regexes, and keeps an LRU cache of recent answers.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import (
    Any,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import attr

from kongtx import uri

__all__ = [
    "FallbackRouter", "Match", "RouteSpec", "Router", "regex_path_error", "split_port",
    "translate_regex",
]

#: Protocols a route must carry (at least one) to be routable by this router.
HTTP_PROTOCOLS = frozenset(("http", "https"))

#: Default size of the selection cache (Kong's DEFAULT_MATCH_LRUCACHE_SIZE).
DEFAULT_CACHE_SIZE = 5000

# Router.errors messages.
ERR_NO_FIELDS = "could not categorize route"
ERR_INVALID_REGEX = "invalid regex: '%s' (Python re returned: %s)"

# Match rule bits; the order of the values is the precedence between
# categories with the same number of fields (kong/router/traditional.lua).
_HOST = 0x40
_HEADER = 0x20
_URI = 0x10
_METHOD = 0x08
_SNI = 0x04

# Sub-rules ordering routes inside one category.
_HAS_REGEX_URI = 0x01
_PLAIN_HOSTS_ONLY = 0x02
_HAS_WILDCARD_HOST_PORT = 0x04


# --------------------------------------------------------------------------
# Route values


def _tuple(value: Any) -> Tuple[Any, ...]:
    return tuple(value) if value else ()


def _header_value(value: str) -> str:
    # A "~*" value is a regex (Kong 3.x); lower-casing it would turn \S into
    # \s, so only plain values are lower-cased.
    return value if value.startswith("~*") else value.lower()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RouteSpec:
    """What the router needs of one route entity."""

    id: str
    name: Optional[str]
    created_at: int
    protocols: Tuple[str, ...]
    methods: Tuple[str, ...]
    hosts: Tuple[str, ...]
    paths: Tuple[str, ...]
    #: ``(lower-case name, (lower-case values, ...))`` pairs.
    headers: Tuple[Tuple[str, Tuple[str, ...]], ...]
    snis: Tuple[str, ...]
    strip_path: bool
    preserve_host: bool
    regex_priority: int
    path_handling: str
    https_redirect_status_code: int
    service_id: Optional[str]
    request_buffering: bool = True
    response_buffering: bool = True
    #: A legacy 0.x API's ``https_only`` + ``http_if_terminated``: an http request
    #: from a trusted client that says ``X-Forwarded-Proto: https`` is not redirected.
    https_if_terminated: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "RouteSpec":
        """Build a spec from a stored route row (Kong's JSON shape)."""
        service = row.get("service")
        headers = row.get("headers") or {}

        def flag(name: str, default: bool) -> bool:
            value = row.get(name)
            return default if value is None else bool(value)

        return cls(
            id=row["id"],
            name=row.get("name"),
            created_at=int(row.get("created_at") or 0),
            protocols=_tuple(row.get("protocols")) or ("http", "https"),
            methods=tuple(m.upper() for m in _tuple(row.get("methods"))),
            hosts=tuple(h.lower() for h in _tuple(row.get("hosts"))),
            paths=_tuple(row.get("paths")),
            headers=tuple(
                (name.lower(), tuple(_header_value(v) for v in values or ()))
                for name, values in headers.items()
            ),
            snis=tuple(s.lower() for s in _tuple(row.get("snis"))),
            strip_path=flag("strip_path", True),
            preserve_host=flag("preserve_host", False),
            regex_priority=int(row.get("regex_priority") or 0),
            path_handling=row.get("path_handling") or "v0",
            https_redirect_status_code=int(
                row.get("https_redirect_status_code") or 426),
            service_id=service.get("id") if service else None,
            request_buffering=flag("request_buffering", True),
            response_buffering=flag("response_buffering", True),
        )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Match:
    """The route selected for a request and what the path match captured."""

    route: RouteSpec
    #: The matched prefix of a prefix path, the whole match of a regex path,
    #: None when the route has no paths.
    matched_prefix: Optional[str]
    #: Regex captures: ``0`` is the whole match, then ``1..n`` and the named
    #: groups (None for a group that did not participate). None when the
    #: route matched by prefix or its regex has no groups.
    uri_captures: Optional[Dict[Any, Optional[str]]]
    #: The request came over http to a route that only accepts https: answer
    #: ``route.https_redirect_status_code`` instead of proxying.
    https_redirect: bool

    def upstream_path(self, service_path: Optional[str],
                      request_path: str) -> str:
        """The path to send upstream (unescaped; see ``uri.escape_path``)."""
        route = self.route
        return uri.upstream_path(service_path, request_path,
                                 self.matched_prefix, route.strip_path,
                                 route.path_handling)

    @property
    def stripped_prefix(self) -> Optional[str]:
        """The prefix strip_path removes, for ``X-Forwarded-Prefix``.

        None unless the route strips and the prefix is not ``/``.
        """
        prefix = self.matched_prefix
        if self.route.strip_path and prefix and prefix != "/":
            return prefix
        return None


# --------------------------------------------------------------------------
# Host helpers


def _only_digits(s: str) -> bool:
    return s.isdigit() and s.isascii()


def split_port(name: str, default_port: Optional[int] = None,
               ) -> Tuple[str, str, bool]:
    """Split an optional ``:port`` off a Host value (Kong's ``split_port``).

    Returns ``(host without port and brackets, host with port, had a port)``;
    ``default_port`` is added to the second value when the name has none.
    Unparseable input comes back unchanged.
    """
    def with_port(host: str) -> str:
        return host if default_port is None else "%s:%d" % (host, default_port)

    if name.startswith("["):
        if name.endswith("]"):
            return name[1:-1], with_port(name), False
        split = name.find("]:", 1)
        if split != -1:
            if split == len(name) - 2:
                suffix = "" if default_port is None else str(default_port)
                return name[1:split], name + suffix, False
            if _only_digits(name[split + 2:]):
                return name[1:split], name, True
        return name, with_port(name), False

    colon = name.find(":")
    if colon == -1:
        return name, with_port(name), False
    if colon == len(name) - 1:
        host = name[:colon]
        return host, with_port(host), False
    if not _only_digits(name[colon + 1:]):
        if default_port is not None:
            return name, "[%s]:%d" % (name, default_port), False
        return name, name, False
    return name[:colon], name, True


def _wildcard_matches(value: str, prefix: str, suffix: str) -> bool:
    """``prefix .+ suffix`` anchored at both ends, without a regex."""
    return (len(value) > len(prefix) + len(suffix)
            and value.startswith(prefix) and value.endswith(suffix))


def _split_wildcard(pattern: str) -> Tuple[str, str]:
    star = pattern.index("*")
    return pattern[:star], pattern[star + 1:]


# --------------------------------------------------------------------------
# PCRE -> Python re

_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def translate_regex(pattern: str) -> str:
    """Rewrite the PCRE spellings Python ``re`` lacks into its own.

    ``(?<name>...)`` and ``(?'name'...)`` become ``(?P<name>...)``;
    ``\\k<name>``, ``\\k'name'`` and ``\\k{name}`` become ``(?P=name)``;
    ``\\z`` becomes ``\\Z``. Escapes and character classes are respected.
    Anything else Python cannot compile is reported by the caller.
    """
    out: List[str] = []
    i = 0
    n = len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if not in_class and nxt == "k" and i + 2 < n \
                    and pattern[i + 2] in "<'{":
                close = {"<": ">", "'": "'", "{": "}"}[pattern[i + 2]]
                end = pattern.find(close, i + 3)
                name = pattern[i + 3:end] if end != -1 else ""
                if end != -1 and _GROUP_NAME.fullmatch(name):
                    out.append("(?P=%s)" % name)
                    i = end + 1
                    continue
            if not in_class and nxt == "z":
                out.append("\\Z")
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            # a "]" (or "^]") right after "[" is a literal
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("]")
                i += 1
            continue
        if c == "(" and pattern.startswith("(?", i) and i + 2 < n \
                and pattern[i + 2] in "<'":
            close = ">" if pattern[i + 2] == "<" else "'"
            end = pattern.find(close, i + 3)
            name = pattern[i + 3:end] if end != -1 else ""
            if end != -1 and _GROUP_NAME.fullmatch(name):
                out.append("(?P<%s>" % name)
                i = end + 1
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _compile_path_regex(pattern: str) -> "re.Pattern[str]":
    # Kong uses PCRE without UTF/UCP: \d, \w, \s are ASCII-only.
    translated = translate_regex(pattern)
    re.compile(translated, re.ASCII)  # errors with positions in the source
    return re.compile("(?:%s)" % translated, re.ASCII)


def regex_path_error(path: str) -> Optional[str]:
    """Why the regex path ``path`` (with or without ``~``) cannot be routed.

    None when it compiles; otherwise the message ``Router.errors`` would
    carry, for the Admin API to reject the route up front.
    """
    source = path[1:] if path.startswith("~") else path
    try:
        _compile_path_regex(source)
    except (re.error, OverflowError, RecursionError) as e:
        return ERR_INVALID_REGEX % (source, e)
    return None


# --------------------------------------------------------------------------
# Compiled routes


class _Path:
    """One route path: a plain prefix or an anchored regex."""

    __slots__ = ("value", "regex")

    def __init__(self, value: str, regex: Optional["re.Pattern[str]"]):
        self.value = value  # the prefix, or the regex source without "~"
        self.regex = regex


class _Header:
    __slots__ = ("name", "values", "pattern")

    def __init__(self, name: str, values: FrozenSet[str],
                 pattern: Optional["re.Pattern[str]"]):
        self.name = name
        self.values = values
        self.pattern = pattern


class _Wildcard:
    __slots__ = ("value", "prefix", "suffix", "has_port")

    def __init__(self, value: str, has_port: bool):
        self.value = value
        self.prefix, self.suffix = _split_wildcard(value)
        self.has_port = has_port

    def matches(self, host_no_port: str, host_with_port: str) -> bool:
        return _wildcard_matches(
            host_with_port if self.has_port else host_no_port,
            self.prefix, self.suffix)


class _Compiled:
    """A route with at most one path (routes are split per path, as Kong)."""

    __slots__ = (
        "spec", "rules", "weight", "submatch", "max_uri_length",
        "plain_hosts", "wildcards", "headers", "path", "methods",
        "snis", "wild_snis", "host_keys", "redirect_https",
    )

    def __init__(self, spec: RouteSpec, path: Optional[_Path],
                 headers: Tuple[_Header, ...]):
        self.spec = spec
        self.path = path
        self.headers = headers
        rules = 0
        weight = 0
        submatch = 0

        plain: List[str] = []
        wildcards: List[_Wildcard] = []
        # keys of routes_by_hosts: the route's host values (port routes as
        # written, no-port routes without IPv6 brackets)
        host_keys: List[str] = []
        for host in spec.hosts:
            bare, _, has_port = split_port(host)
            if "*" in host:
                wildcards.append(_Wildcard(host, has_port))
                host_keys.append(host)
            else:
                key = host if has_port else bare
                plain.append(key)
                host_keys.append(key)
        if spec.hosts:
            rules |= _HOST
            weight += 1
            if not wildcards:
                submatch |= _PLAIN_HOSTS_ONLY
            if any(w.has_port for w in wildcards):
                submatch |= _HAS_WILDCARD_HOST_PORT
        self.plain_hosts = frozenset(plain)
        self.wildcards = tuple(wildcards)
        self.host_keys = tuple(host_keys)

        if headers:
            rules |= _HEADER
            weight += 1

        self.max_uri_length = 0
        if path is not None:
            rules |= _URI
            weight += 1
            if path.regex is not None:
                submatch |= _HAS_REGEX_URI
            else:
                self.max_uri_length = len(path.value)

        self.methods = frozenset(spec.methods)
        if spec.methods:
            rules |= _METHOD
            weight += 1

        snis = [s[:-1] if len(s) > 1 and s.endswith(".") else s
                for s in spec.snis]
        self.snis = frozenset(s for s in snis if "*" not in s)
        self.wild_snis = tuple(_split_wildcard(s) for s in snis if "*" in s)
        if spec.snis:
            rules |= _SNI
            weight += 1

        self.rules = rules
        self.weight = weight
        self.submatch = submatch
        protocols = spec.protocols
        self.redirect_https = "https" in protocols and "http" not in protocols

    def sort_key(self) -> Tuple[int, int, int, int, int]:
        regex_priority = (self.spec.regex_priority
                          if self.submatch & _HAS_REGEX_URI else 0)
        return (-self.submatch, -len(self.headers), -regex_priority,
                -self.max_uri_length, self.spec.created_at)


class _Request:
    """The facts of one request, computed once per (uncached) select()."""

    __slots__ = ("method", "path", "host", "host_no_port", "host_with_port",
                 "host_key", "scheme", "sni", "headers")

    def __init__(self, method: str, path: str, host: Optional[str],
                 scheme: str, sni: Optional[str],
                 headers: Mapping[str, Sequence[str]]):
        self.method = method
        self.path = path
        self.scheme = scheme
        self.sni = sni
        self.headers = headers
        self.host = host
        if host is None:
            self.host_no_port = None
            self.host_with_port = None
            self.host_key = None
        else:
            bare, with_port, has_port = split_port(
                host, 443 if scheme == "https" else 80)
            self.host_no_port = bare
            self.host_with_port = with_port
            self.host_key = host if has_port else bare


class _Category:
    """All routes sharing one set of match rules, in precedence order."""

    __slots__ = ("bits", "weight", "all", "by_host", "by_header", "by_uri",
                 "by_method", "by_sni", "reducers")

    def __init__(self, bits: int, weight: int):
        self.bits = bits
        self.weight = weight
        self.all: List[_Compiled] = []
        self.by_host: Dict[str, List[_Compiled]] = {}
        self.by_header: Dict[str, List[_Compiled]] = {}
        self.by_uri: Dict[str, List[_Compiled]] = {}
        self.by_method: Dict[str, List[_Compiled]] = {}
        self.by_sni: Dict[str, List[_Compiled]] = {}

    def add(self, route: _Compiled) -> None:
        self.all.append(route)
        for key in route.host_keys:
            self.by_host.setdefault(key, []).append(route)
        for header in route.headers:
            self.by_header.setdefault(header.name, []).append(route)
        if route.path is not None:
            self.by_uri.setdefault(route.path.value, []).append(route)
        for method in route.methods:
            self.by_method.setdefault(method, []).append(route)
        for sni in route.snis:
            self.by_sni.setdefault(sni, []).append(route)


# --------------------------------------------------------------------------
# Matching one route


def _match_host(route: _Compiled, req: _Request) -> bool:
    if req.host is None:
        return False
    plain = route.plain_hosts
    if (req.host in plain or req.host_no_port in plain
            or req.host_with_port in plain):
        return True
    for wildcard in route.wildcards:
        if wildcard.matches(req.host_no_port, req.host_with_port):  # type: ignore[arg-type]
            return True
    return False


def _match_headers(route: _Compiled, req: _Request) -> bool:
    for header in route.headers:
        values = req.headers.get(header.name)
        if values is None:
            return False
        if isinstance(values, str):
            values = (values,)
        for value in values:
            value = value.lower()
            if value in header.values:
                break
            if header.pattern is not None and header.pattern.search(value):
                break
        else:
            return False
    return True


def _match_sni(route: _Compiled, req: _Request) -> bool:
    if req.scheme != "https":
        return True  # SNIs only restrict https requests (Kong #6425)
    sni = req.sni
    if not sni:
        return False
    if sni in route.snis:
        return True
    for prefix, suffix in route.wild_snis:
        if _wildcard_matches(sni, prefix, suffix):
            return True
    return False


def _try_route(route: _Compiled, req: _Request) -> Optional[Match]:
    rules = route.rules
    if rules & _METHOD and req.method not in route.methods:
        return None
    if rules & _HOST and not _match_host(route, req):
        return None
    if rules & _HEADER and not _match_headers(route, req):
        return None
    if rules & _SNI and not _match_sni(route, req):
        return None
    prefix = None
    captures = None
    path = route.path
    if path is not None:
        if not req.path:
            return None
        if path.regex is None:
            if not req.path.startswith(path.value):
                return None
            prefix = path.value
        else:
            m = path.regex.match(req.path)
            if m is None:
                return None
            prefix = m.group(0)
            if path.regex.groups:
                captures = {0: prefix}
                for i, value in enumerate(m.groups(), 1):
                    captures[i] = value
                captures.update(m.groupdict())
    return Match(
        route=route.spec,
        matched_prefix=prefix,
        uri_captures=captures,
        https_redirect=route.redirect_https and req.scheme != "https",
    )


# --------------------------------------------------------------------------
# The router

_MISS = object()


class Router:
    """Routes compiled for selection; build a new one when routes change."""

    def __init__(self, routes: Iterable[RouteSpec],
                 cache_size: int = DEFAULT_CACHE_SIZE):
        #: ``(route id, message)`` for each route left out of the router.
        self.errors: List[Tuple[str, str]] = []
        compiled: List[_Compiled] = []
        for spec in routes:
            if not HTTP_PROTOCOLS.intersection(spec.protocols):
                continue  # stream / grpc routes are not routed here
            compiled.extend(self._compile(spec))

        # one global precedence order; stable, so ties keep the input order
        compiled.sort(key=_Compiled.sort_key)

        categories: Dict[int, _Category] = {}
        regexes: List[_Path] = []
        prefixes: set = set()
        wildcards: List[_Wildcard] = []
        plain_hosts: set = set()
        header_names: List[str] = []
        methods: set = set()
        snis: set = set()
        wild_snis: List[Tuple[str, str]] = []
        for route in compiled:
            category = categories.get(route.rules)
            if category is None:
                category = categories[route.rules] = _Category(
                    route.rules, route.weight)
            category.add(route)
            if route.path is not None:
                if route.path.regex is not None:
                    regexes.append(route.path)
                else:
                    prefixes.add(route.path.value)
            wildcards.extend(route.wildcards)
            plain_hosts.update(route.plain_hosts)
            for header in route.headers:
                if header.name not in header_names:
                    header_names.append(header.name)
            methods.update(route.methods)
            snis.update(route.snis)
            wild_snis.extend(route.wild_snis)

        self._categories = sorted(categories.values(),
                                  key=lambda c: (-c.weight, -c.bits))
        self._regexes = tuple(regexes)
        self._prefixes = frozenset(prefixes)
        self._prefix_lengths = tuple(sorted({len(p) for p in prefixes},
                                            reverse=True))
        self._wildcards = tuple(wildcards)
        self._plain_hosts = frozenset(plain_hosts)
        self._header_names = tuple(header_names)
        self._methods = frozenset(methods)
        self._snis = frozenset(snis)
        self._wild_snis = tuple(wild_snis)
        self._has_sni_routes = bool(snis or wild_snis)
        #: True when some route matches on headers: only then does
        #: ``select()`` read its ``headers`` argument.
        self.uses_headers = bool(header_names)
        self._cache: "OrderedDict[Tuple[Any, ...], Any]" = OrderedDict()
        self._cache_size = cache_size

    def _compile(self, spec: RouteSpec) -> List[_Compiled]:
        headers: List[_Header] = []
        try:
            for name, values in spec.headers:
                if name == "host":
                    continue
                pattern = None
                if len(values) == 1 and values[0].startswith("~*"):
                    pattern = re.compile(translate_regex(values[0][2:]))
                headers.append(_Header(
                    name, frozenset(v.lower() for v in values), pattern))
        except re.error as e:
            self.errors.append((spec.id, ERR_INVALID_REGEX % (values[0], e)))
            return []

        paths: List[Optional[_Path]] = []
        for value in spec.paths:
            if value.startswith("~"):
                source = value[1:]
                try:
                    regex = _compile_path_regex(source)
                except (re.error, OverflowError, RecursionError) as e:
                    self.errors.append(
                        (spec.id, ERR_INVALID_REGEX % (source, e)))
                    return []
                paths.append(_Path(source, regex))
            else:
                paths.append(_Path(value, None))
        if not paths:
            paths.append(None)

        header_t = tuple(headers)
        compiled = [_Compiled(spec, path, header_t) for path in paths]
        if compiled[0].rules == 0:
            self.errors.append((spec.id, ERR_NO_FIELDS))
            return []
        return compiled

    def select(self, method: str, host: Optional[str], path: str,
               scheme: str = "http",
               headers: Optional[Mapping[str, Sequence[str]]] = None,
               sni: Optional[str] = None) -> Optional[Match]:
        """Return the route for a request, or None (Kong answers 404).

        ``host`` is the raw Host header (any case, may carry ``:port``, may be
        ``[v6]:port``), ``path`` the normalised path without query string,
        ``scheme`` the request scheme (``X-Forwarded-Proto`` when trusted),
        ``headers`` lower-case names to values (read only when
        ``uses_headers``), ``sni`` the TLS server name (consulted only for
        https requests to routes with ``snis``).
        """
        if host is not None:
            host = host.lower()
        if not self._has_sni_routes:
            sni = None
        elif sni is not None:
            sni = sni.lower()
        if self.uses_headers:
            hdrs: Mapping[str, Sequence[str]] = headers or {}
            key: Tuple[Any, ...] = (method, host, path, scheme, sni,
                                    self._headers_key(hdrs))
        else:
            hdrs = {}
            key = (method, host, path, scheme, sni)

        cache = self._cache
        cached = cache.get(key, _MISS)
        if cached is not _MISS:
            cache.move_to_end(key)
            if cached is not None and cached.uri_captures is not None:
                # callers may mutate the captures: hand out a copy
                return attr.evolve(cached,
                                   uri_captures=dict(cached.uri_captures))
            return cached  # type: ignore[no-any-return]

        found = self._find(_Request(method, path, host, scheme, sni, hdrs))
        cache[key] = found
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        if found is not None and found.uri_captures is not None:
            return attr.evolve(found, uri_captures=dict(found.uri_captures))
        return found

    def _headers_key(self, headers: Mapping[str, Sequence[str]],
                     ) -> Tuple[Any, ...]:
        key = []
        for name in self._header_names:
            values = headers.get(name)
            if values is None:
                key.append(None)
            elif isinstance(values, str):
                key.append(values.lower())
            else:
                key.append(tuple(sorted(v.lower() for v in values)))
        return tuple(key)

    def _find(self, req: _Request) -> Optional[Match]:
        # Which kinds of field could match at all, and the index hits the
        # reducers use (kong/router/traditional.lua find_route).
        possible = 0
        hit_host = None
        if req.host is not None:
            if (req.host in self._plain_hosts
                    or req.host_no_port in self._plain_hosts
                    or req.host_with_port in self._plain_hosts):
                possible |= _HOST
            else:
                for wildcard in self._wildcards:
                    if wildcard.matches(req.host_no_port,  # type: ignore[arg-type]
                                        req.host_with_port):  # type: ignore[arg-type]
                        hit_host = wildcard.value
                        possible |= _HOST
                        break

        hit_header = None
        for name in self._header_names:
            if name in req.headers:
                hit_header = name
                possible |= _HEADER
                break

        hit_uri = None
        path = req.path
        if path:
            for regex_path in self._regexes:
                if regex_path.regex.match(path):  # type: ignore[union-attr]
                    hit_uri = regex_path.value
                    break
            if hit_uri is None:
                if path in self._prefixes:
                    hit_uri = path
                else:
                    for length in self._prefix_lengths:
                        if len(path) >= length \
                                and path[:length] in self._prefixes:
                            hit_uri = path[:length]
                            break
            if hit_uri is not None:
                possible |= _URI

        if req.method in self._methods:
            possible |= _METHOD

        if self._has_sni_routes:
            if req.scheme != "https":
                possible |= _SNI
            elif req.sni and (req.sni in self._snis or any(
                    _wildcard_matches(req.sni, p, s)
                    for p, s in self._wild_snis)):
                possible |= _SNI

        if not possible:
            return None

        for category in self._categories:
            bits = category.bits
            if bits & ~possible:
                continue  # needs a kind of field nothing in the request hits

            # reduce to the smallest indexed candidate set (headers win)
            reduced = None
            if bits & _HOST:
                key = hit_host if hit_host is not None else req.host_key
                reduced = category.by_host.get(key)  # type: ignore[arg-type]
            if bits & _HEADER and hit_header is not None:
                candidates = category.by_header.get(hit_header)
                if candidates is not None:
                    reduced = candidates
                    bits = 0  # the header reducer ends the reduction
            if bits & _URI and hit_uri is not None:
                candidates = category.by_uri.get(hit_uri)
                if candidates is not None and (
                        reduced is None or len(candidates) < len(reduced)):
                    reduced = candidates
            if bits & _METHOD:
                candidates = category.by_method.get(req.method)
                if candidates is not None and (
                        reduced is None or len(candidates) < len(reduced)):
                    reduced = candidates
            if bits & _SNI and req.sni:
                candidates = category.by_sni.get(req.sni)
                if candidates is not None and (
                        reduced is None or len(candidates) < len(reduced)):
                    reduced = candidates

            if reduced is not None:
                for route in reduced:
                    found = _try_route(route, req)
                    if found is not None:
                        return found
            for route in category.all:
                found = _try_route(route, req)
                if found is not None:
                    return found
        return None


# --------------------------------------------------------------------------
# Routes first, then legacy APIs


class FallbackRouter:
    """Two routers asked in turn: Kong 0.13-0.14 matched routes, then APIs.

    ``primary`` holds the routes, ``fallback`` the routes made from legacy 0.x
    APIs; a request matched by no route is offered to the APIs. Same
    ``select()`` signature and ``uses_headers``/``errors`` as :class:`Router`.
    """

    def __init__(self, primary: Router, fallback: Router) -> None:
        self.primary = primary
        self.fallback = fallback
        self.uses_headers = primary.uses_headers or fallback.uses_headers
        self.errors = list(primary.errors) + list(fallback.errors)

    def select(self, method: str, host: Optional[str], path: str,
               scheme: str = "http",
               headers: Optional[Mapping[str, Sequence[str]]] = None,
               sni: Optional[str] = None) -> Optional[Match]:
        """The route's match, else the API's, else None."""
        match = self.primary.select(method, host, path, scheme, headers, sni)
        if match is None:
            match = self.fallback.select(method, host, path, scheme, headers, sni)
        return match
