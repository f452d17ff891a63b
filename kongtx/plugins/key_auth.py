"""The ``key-auth`` plugin: authenticate consumers by an API key (Kong's
``kong/plugins/key-auth/{handler,schema}.lua``, 3.10 behaviour).

For each name of ``key_names`` the key is looked for in a header, then the
query string, then (``key_in_body``) a form, JSON or multipart body. A repeated
key is ``Duplicate API key found``; no key (or an empty one) is ``No API key
found in request``; a key that names no credential, or an expired one, is
``Unauthorized``. Every refusal is a 401 with ``WWW-Authenticate: Key`` (or
``Key realm="<realm>"``). With ``anonymous`` set, a refused request goes on as
that consumer instead (``X-Anonymous-Consumer: true``), and a request that an
earlier auth plugin already authenticated is left alone (Kong's logical OR).

Credentials come from the node's :class:`~kongtx.cache.EntityCache`
(``kong.cache``): a hit costs no Deferred. The presented key is compared with
the stored one in constant time before it is accepted. Keys are never logged.
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import unquote_plus

from twisted.internet import defer

import kongtx
from kongtx.cache import MISS, Loaded, tag
from kongtx.plugins.base import ALL_PROTOCOLS, BasePlugin
from kongtx.schema import typedefs as t
from kongtx.store.interface import foreign_id

__all__ = ["KeyAuthPlugin", "Credential", "DUPLICATE", "ParsedBody", "find_values",
           "parse_body", "query_pairs", "set_consumer", "strip_query"]

ERR_NO_KEY = "No API key found in request"
ERR_DUPLICATE = "Duplicate API key found"
ERR_INVALID = "Unauthorized"
ERR_ANONYMOUS_MISSING = "anonymous consumer %s is configured but doesn't exist"

HEADER_CONSUMER_ID = "X-Consumer-ID"
HEADER_CONSUMER_CUSTOM_ID = "X-Consumer-Custom-ID"
HEADER_CONSUMER_USERNAME = "X-Consumer-Username"
HEADER_CREDENTIAL_IDENTIFIER = "X-Credential-Identifier"
HEADER_ANONYMOUS = "X-Anonymous-Consumer"

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}$")

#: A name that is present more than once (Kong: a Lua table, "duplicate").
DUPLICATE: Any = type("_Duplicate", (), {"__repr__": lambda self: "DUPLICATE",
                                        "__slots__": ()})()


class Credential:
    """A cached credential with its consumer (rows)."""

    __slots__ = ("row", "consumer")

    def __init__(self, row: Mapping[str, Any], consumer: Mapping[str, Any]) -> None:
        self.row = row
        self.consumer = consumer


# -- finding the key (pure) ------------------------------------------------------------


def query_pairs(raw: str) -> List[Tuple[str, Optional[str], str]]:
    """``a=1&b&c=`` -> ``[(name, value or None when there is no "=", segment)]``."""
    found = []
    for segment in raw.split("&"):
        if not segment:
            continue
        name, eq, value = segment.partition("=")
        found.append((unquote_plus(name), unquote_plus(value) if eq else None, segment))
    return found


def find_values(pairs: List[Tuple[str, Optional[str], str]], name: str) -> Any:
    """The value of *name* among decoded pairs as Kong sees it: ``None`` if absent,
    the string, ``True`` for a bare ``name`` (not a key), :data:`DUPLICATE` if repeated."""
    found: Any = None
    for key, value, _ in pairs:
        if key == name:
            if found is not None:
                return DUPLICATE
            found = True if value is None else value
    return found


def strip_query(raw: str, name: str) -> Optional[str]:
    """*raw* without the arguments called *name* (others kept as sent, in order), or
    ``None`` if there was none."""
    pairs = query_pairs(raw)
    kept = [segment for key, _, segment in pairs if key != name]
    if len(kept) == len(pairs):
        return None
    return "&".join(kept)


class ParsedBody:
    """A request body seen as named values, able to re-encode itself without one."""

    __slots__ = ("kind", "values", "_raw", "_pairs", "_parts", "_boundary")

    def __init__(self, kind: str, values: Mapping[str, Any], raw: bytes = b"",
                 pairs: Optional[List[Tuple[str, Optional[str], str]]] = None,
                 parts: Optional[List[Tuple[Optional[str], bytes]]] = None,
                 boundary: bytes = b"") -> None:
        self.kind = kind
        self.values = values
        self._raw = raw
        self._pairs = pairs
        self._parts = parts
        self._boundary = boundary

    def get(self, name: str) -> Any:
        """As :func:`find_values`: ``None``, a string, another value, or DUPLICATE."""
        if self.kind == "form":
            return find_values(self._pairs or [], name)
        if self.kind == "multipart":
            found = [value for key, value in self.values.get("_list", ()) if key == name]
            if not found:
                return None
            return found[0] if len(found) == 1 else DUPLICATE
        value = self.values.get(name)
        if isinstance(value, (list, dict)):
            return DUPLICATE
        return value

    def without(self, name: str) -> Optional[bytes]:
        """The body re-encoded without *name*, or ``None`` if it had no such field."""
        if self.kind == "json":
            if name not in self.values:
                return None
            rest = {k: v for k, v in self.values.items() if k != name}
            return json.dumps(rest).encode("utf-8")
        if self.kind == "form":
            stripped = strip_query(self._raw.decode("latin-1"), name)
            return None if stripped is None else stripped.encode("latin-1")
        if self.kind == "multipart":
            parts = self._parts or []
            kept = [raw for key, raw in parts if key != name]
            if len(kept) == len(parts):
                return None
            delimiter = b"--" + self._boundary
            out = b"".join(delimiter + raw for raw in kept)
            return out + delimiter + b"--\r\n"
        return None


EMPTY_BODY = ParsedBody("empty", {})

_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.I)
_PART_NAME = re.compile(rb'(?:^|;)\s*name="([^"]*)"', re.I)


def _multipart(raw: bytes, boundary: bytes) -> ParsedBody:
    delimiter = b"--" + boundary
    chunks = raw.split(delimiter)
    parts: List[Tuple[Optional[str], bytes]] = []
    values: List[Tuple[str, str]] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, rest = chunk.partition(b"\r\n\r\n")
        if not sep:
            return EMPTY_BODY
        name: Optional[str] = None
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-disposition:"):
                m = _PART_NAME.search(line.split(b":", 1)[1])
                if m:
                    name = m.group(1).decode("utf-8", "replace")
        value = rest[:-2] if rest.endswith(b"\r\n") else rest
        parts.append((name, chunk))
        if name is not None:
            values.append((name, value.decode("utf-8", "replace")))
    return ParsedBody("multipart", {"_list": values}, raw=raw, parts=parts,
                      boundary=boundary)


def parse_body(raw: Optional[bytes], content_type: Optional[str]) -> ParsedBody:
    """The named values of a form, JSON or multipart body (Kong's ``get_body``);
    :data:`EMPTY_BODY` for anything else or anything that does not parse."""
    if not raw or not content_type:
        return EMPTY_BODY
    ctype = content_type.lower()
    try:
        if ctype.startswith("application/x-www-form-urlencoded"):
            text = raw.decode("latin-1")
            return ParsedBody("form", {}, raw=raw, pairs=query_pairs(text))
        if ctype.startswith("multipart/form-data"):
            m = _BOUNDARY.search(content_type)
            if not m:
                return EMPTY_BODY
            boundary = (m.group(1) or m.group(2)).encode("latin-1")
            return _multipart(raw, boundary)
        if "json" in ctype:
            value = json.loads(raw.decode("utf-8"))
            if isinstance(value, dict):
                return ParsedBody("json", value)
    except (UnicodeDecodeError, ValueError):
        pass
    return EMPTY_BODY


def _header_value(kong: Any, name: str) -> Any:
    values = kong.request.get_header_values(name)
    if not values:
        return None
    if len(values) > 1:
        return DUPLICATE
    return values[0]


# -- the plugin ------------------------------------------------------------------------


class KeyAuthPlugin(BasePlugin):
    """Kong's key-auth: API keys in a header, the query string or the body."""

    NAME = "key-auth"
    PRIORITY = 1250
    VERSION = kongtx.__version__
    PROTOCOLS = ALL_PROTOCOLS
    NO_CONSUMER = True
    CONFIG = t.record([
        ("key_names", t.array(t.header_name(), required=True, default=["apikey"])),
        ("hide_credentials", t.boolean(required=True, default=False)),
        ("anonymous", t.string()),
        ("key_in_header", t.boolean(required=True, default=True)),
        ("key_in_query", t.boolean(required=True, default=True)),
        ("key_in_body", t.boolean(required=True, default=False)),
        ("run_on_preflight", t.boolean(required=True, default=True)),
        ("realm", t.string()),
    ])

    def __init__(self, config: Mapping[str, Any]) -> None:
        BasePlugin.__init__(self, config)
        self._key_names: Tuple[str, ...] = tuple(config.get("key_names") or ("apikey",))
        #: What the log serializer redacts (lower-case key names), computed once.
        self.redacted_names = frozenset(name.lower() for name in self._key_names)
        self._hide = bool(config.get("hide_credentials", False))
        self._anonymous: Optional[str] = config.get("anonymous") or None
        self._in_header = config.get("key_in_header", True) is not False
        self._in_query = config.get("key_in_query", True) is not False
        self._in_body = bool(config.get("key_in_body", False))
        self._preflight = config.get("run_on_preflight", True) is not False
        realm = config.get("realm")
        self._challenge = {"WWW-Authenticate": 'Key realm="%s"' % (realm,) if realm else "Key"}

    # -- access --------------------------------------------------------------------

    def access(self, kong: Any) -> Optional[defer.Deferred]:
        if not self._preflight and kong.request.get_method() == "OPTIONS":
            return None
        if self._anonymous and kong.client.get_credential() is not None:
            return None  # already authenticated: logical OR with the other plugins
        key, error = self.find_key(kong)
        cache = kong.cache
        if key is not None:
            found = cache.peek(("keyauth_credentials", key))
            if found is MISS:
                return defer.ensureDeferred(self._access_loading(kong, key))
            if self._accept(kong, key, found, cache.now()):
                return None
            error = ERR_INVALID
        return self._refuse(kong, error)

    async def _access_loading(self, kong: Any, key: str) -> None:
        cache = kong.cache
        found = await cache.get(("keyauth_credentials", key), _credential_loader(cache, key))
        if not self._accept(kong, key, found, cache.now()):
            result = self._refuse(kong, ERR_INVALID)
            if result is not None:
                await result

    def find_key(self, kong: Any) -> Tuple[Optional[str], str]:
        """``(key, "")`` or ``(None, error message)``; applies ``hide_credentials``."""
        raw_query = kong.request.get_raw_query() if self._in_query else ""
        query = query_pairs(raw_query) if raw_query else []
        body: Optional[ParsedBody] = None
        for name in self._key_names:
            value: Any = None
            if self._in_header:
                value = _header_value(kong, name)
            if value is None and self._in_query:
                value = find_values(query, name)
            if value is None and self._in_body:
                if body is None:
                    body = self._body(kong)
                value = body.get(name)
            if isinstance(value, str):
                if self._hide:
                    self._hide_credential(kong, name, raw_query, body)
                if not value:
                    return None, ERR_NO_KEY
                return value, ""
            if value is DUPLICATE:
                return None, ERR_DUPLICATE
        return None, ERR_NO_KEY

    def _body(self, kong: Any) -> ParsedBody:
        return parse_body(kong.request.get_raw_body(), kong.request.get_header("content-type"))

    def _hide_credential(self, kong: Any, name: str, raw_query: str,
                         body: Optional[ParsedBody]) -> None:
        kong.service.request.clear_header(name)
        if raw_query:
            stripped = strip_query(raw_query, name)
            if stripped is not None:
                kong.service.request.set_raw_query(stripped)
        if self._in_body:
            if body is None:
                body = self._body(kong)
            stripped_body = body.without(name)
            if stripped_body is not None:
                kong.service.request.set_raw_body(stripped_body)

    def _accept(self, kong: Any, key: str, found: Optional[Credential], now: float) -> bool:
        if found is None:
            return False
        stored = found.row.get("key")
        if not isinstance(stored, str) or not hmac.compare_digest(
                stored.encode("utf-8"), key.encode("utf-8")):
            return False
        expires_at = found.row.get("expires_at")
        if expires_at is not None and expires_at <= now:
            return False
        set_consumer(kong, found.consumer, found.row)
        return True

    # -- refusal and the anonymous consumer ------------------------------------------

    def _refuse(self, kong: Any, error: str) -> Optional[defer.Deferred]:
        anonymous = self._anonymous
        if not anonymous:
            kong.response.exit(401, {"message": error}, self._challenge)
            return None
        cache = kong.cache
        consumer = cache.peek(("consumers", anonymous))
        if consumer is MISS:
            d = cache.get(("consumers", anonymous), _consumer_loader(cache, anonymous))
            return d.addCallback(lambda consumer: self._use_anonymous(kong, consumer))
        self._use_anonymous(kong, consumer)
        return None

    def _use_anonymous(self, kong: Any, consumer: Optional[Mapping[str, Any]]) -> None:
        if consumer is None:
            message = ERR_ANONYMOUS_MISSING % (self._anonymous,)
            kong.log.error("{message}", message=message)
            kong.response.exit(500, {"message": message})
            return
        set_consumer(kong, consumer, None)


def set_consumer(kong: Any, consumer: Optional[Mapping[str, Any]],
                 credential: Optional[Mapping[str, Any]]) -> None:
    """Authenticate, and set (or clear: client-sent copies never reach the
    upstream) the consumer headers, as Kong's auth plugins do."""
    kong.client.authenticate(consumer, credential)
    upstream = kong.service.request
    for header, value in (
        (HEADER_CONSUMER_ID, consumer.get("id") if consumer else None),
        (HEADER_CONSUMER_CUSTOM_ID, consumer.get("custom_id") if consumer else None),
        (HEADER_CONSUMER_USERNAME, consumer.get("username") if consumer else None),
        (HEADER_CREDENTIAL_IDENTIFIER, credential.get("id") if credential else None),
    ):
        if value is not None:
            upstream.set_header(header, value)
        else:
            upstream.clear_header(header)
    if credential is not None:
        upstream.clear_header(HEADER_ANONYMOUS)
    else:
        upstream.set_header(HEADER_ANONYMOUS, "true")


def _credential_loader(cache: Any, key: str) -> Any:
    async def load() -> Loaded:
        store = cache.store
        tags: List[str] = [tag("keyauth_credentials", "key", key)]
        row = await store.get_by("keyauth_credentials", "key", key)
        if row is None:
            return Loaded(None, tags)
        tags.append(tag("keyauth_credentials", "id", row["id"]))
        consumer_id = foreign_id(row.get("consumer"))
        if consumer_id is None:
            return Loaded(None, tags)
        tags.append(tag("consumers", "id", consumer_id))
        consumer = await store.get("consumers", consumer_id)
        if consumer is None:
            return Loaded(None, tags)
        return Loaded(Credential(row, consumer), tags)

    return load


def _consumer_loader(cache: Any, id_or_username: str) -> Any:
    async def load() -> Loaded:
        store = cache.store
        tags = [tag("consumers", "id", id_or_username),
                tag("consumers", "username", id_or_username)]
        consumer: Optional[Dict[str, Any]] = None
        if _UUID.match(id_or_username):
            consumer = await store.get("consumers", id_or_username.lower())
        if consumer is None:
            consumer = await store.get_by("consumers", "username", id_or_username)
        if consumer is not None:
            tags.append(tag("consumers", "id", consumer["id"]))
        return Loaded(consumer, tags)

    return load
