"""The object plugins talk to: a small, Python-shaped subset of Kong's PDK.

One :class:`Kong` is created per proxied request that has plugins to run (a
request without plugins creates none). Its parts mirror Kong's names:
``kong.request``, ``kong.client``, ``kong.service.request``, ``kong.response``,
``kong.ctx.shared``, ``kong.router``, ``kong.log`` and ``kong.node``. Strings
are ``str`` (header values decoded as latin-1, paths as sent on the wire).
See ``docs/plugins.md`` for the list of methods.

The parts hold what they need (the twisted.web request, the peer, their own
state) and never a reference back to the :class:`Kong` that owns them: a
request's objects form no reference cycle, so they are freed as soon as the
request is done instead of waiting for the cyclic garbage collector (whose
full collections pause the reactor; see ``docs/performance.md``). ``Kong``'s
outcome attributes (``exited``, ``consumer``, ``upstream_headers``...) are
views on the part that holds them.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import parse_qsl, urlencode

from twisted.logger import Logger

from kongtx.proxy.request_head import canonical_name

__all__ = ["Kong"]

JSON_TYPE = b"application/json; charset=utf-8"

_HeaderValue = Union[str, List[str]]


def _one_or_list(values: List[str]) -> _HeaderValue:
    return values[0] if len(values) == 1 else values


#: Header names plugins use, encoded: ``name -> (raw, lower-case raw)``. Plugins
#: use a few constant names, so each is encoded once, not per request.
_NAMES: Dict[str, Tuple[bytes, bytes]] = {}
_MAX_NAMES = 1000


def _encoded(name: str) -> Tuple[bytes, bytes]:
    found = _NAMES.get(name)
    if found is None:
        if len(_NAMES) >= _MAX_NAMES:
            _NAMES.clear()
        raw = name.encode("latin-1")
        found = _NAMES[name] = (raw, raw.lower())
    return found


#: Response header names plugins set, as twisted.web's ``Headers`` keys them
#: (``x-ratelimit-limit-minute`` -> ``X-Ratelimit-Limit-Minute``).
_RESPONSE_NAMES: Dict[str, bytes] = {}


def _response_name(name: str) -> bytes:
    """Raises ``InvalidHeaderName`` for a name that is not a token, as
    ``Headers.setRawHeaders`` would."""
    found = _RESPONSE_NAMES.get(name)
    if found is None:
        if len(_RESPONSE_NAMES) >= _MAX_NAMES:
            _RESPONSE_NAMES.clear()
        found = _RESPONSE_NAMES[name] = canonical_name(_encoded(name)[0])
    return found


def _response_value(value: Any) -> bytes:
    """A plugin's header value as bytes, line breaks replaced by a space (as
    ``Headers`` does: a value can never start a header of its own)."""
    raw: bytes = str(value).encode("latin-1")
    if b"\r" in raw or b"\n" in raw:
        raw = b" ".join(raw.splitlines())
    return raw


class Request:
    """``kong.request``: the request as the client sent it."""

    __slots__ = ("_request", "_scheme", "_path", "_query")

    def __init__(self, request: Any, scheme: str, path: str) -> None:
        self._request = request
        self._scheme = scheme
        self._path = path
        self._query: Optional[List[Tuple[str, str]]] = None

    def get_method(self) -> str:
        return self._request.method.decode("ascii")

    def get_scheme(self) -> str:
        return self._scheme

    def get_path(self) -> str:
        """The normalised path (what the router matched)."""
        return self._path

    def get_raw_path(self) -> str:
        """The path exactly as sent (percent-encoded, not normalised)."""
        return self._request.path.decode("latin-1")

    def get_header(self, name: str) -> Optional[str]:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        values = self._request.requestHeaders.getRawHeaders(name.encode("latin-1"))
        return values[0].decode("latin-1") if values else None

    def get_headers(self) -> Dict[str, _HeaderValue]:
        """Every header by lower-case name: a string, or a list when repeated."""
        return {
            name.decode("latin-1").lower(): _one_or_list([v.decode("latin-1") for v in values])
            for name, values in self._request.requestHeaders.getAllRawHeaders()
        }

    def get_header_values(self, name: str) -> List[str]:
        """Every value of header ``name`` (case-insensitive), in order; ``[]`` if absent."""
        values = self._request.requestHeaders.getRawHeaders(name.encode("latin-1"))
        return [v.decode("latin-1") for v in values] if values else []

    def get_raw_query(self) -> str:
        uri = self._request.uri
        at = uri.find(b"?")
        return uri[at + 1:].decode("latin-1") if at >= 0 else ""

    def _pairs(self) -> List[Tuple[str, str]]:
        if self._query is None:
            self._query = parse_qsl(self.get_raw_query(), keep_blank_values=True,
                                    encoding="latin-1")
        return self._query

    def get_query_arg(self, name: str) -> Optional[str]:
        """The first value of query argument ``name`` (``""`` for ``?name``), or ``None``."""
        for key, value in self._pairs():
            if key == name:
                return value
        return None

    def get_query(self) -> Dict[str, _HeaderValue]:
        """Every query argument: a string, or a list when repeated."""
        found: Dict[str, List[str]] = {}
        for key, value in self._pairs():
            found.setdefault(key, []).append(value)
        return {key: _one_or_list(values) for key, values in found.items()}

    def get_raw_body(self) -> Optional[bytes]:
        """The buffered body (``b""`` if none), or ``None`` while it is streamed."""
        request = self._request
        if getattr(request, "stream", None) is not None:
            return None
        content = request.content
        position = content.tell()
        content.seek(0, 0)
        body = content.read()
        content.seek(position, 0)
        return body

    def get_body(self) -> Any:
        """The buffered body parsed by its Content-Type (JSON or form), else ``None``."""
        raw = self.get_raw_body()
        if not raw:
            return None
        ctype = (self.get_header("content-type") or "").lower()
        try:
            if "json" in ctype:
                return json.loads(raw.decode("utf-8"))
            if ctype.startswith("application/x-www-form-urlencoded"):
                found: Dict[str, List[str]] = {}
                for key, value in parse_qsl(raw.decode("utf-8"), keep_blank_values=True):
                    found.setdefault(key, []).append(value)
                return {key: _one_or_list(values) for key, values in found.items()}
        except (UnicodeDecodeError, ValueError):
            return None
        return None


class Client:
    """``kong.client``: who is calling, and who they turned out to be."""

    __slots__ = ("_request", "_peer", "_real_ip_header", "consumer", "credential",
                 "changed")

    def __init__(self, request: Any, peer: Any, real_ip_header: bytes) -> None:
        self._request = request
        self._peer = peer
        self._real_ip_header = real_ip_header
        self.consumer: Optional[Mapping[str, Any]] = None
        self.credential: Optional[Mapping[str, Any]] = None
        #: Set by :meth:`authenticate`; the pipeline resets it once it re-resolved.
        self.changed = False

    def get_ip(self) -> Optional[str]:
        """The address of the peer connected to kongtx."""
        return self._peer.remote

    def get_forwarded_ip(self) -> Optional[str]:
        """The client address after ``real_ip_header`` from trusted peers."""
        peer = self._peer
        if peer.trusted:
            values = self._request.requestHeaders.getRawHeaders(self._real_ip_header)
            if values:
                candidate = values[-1].split(b",")[-1].strip().decode("latin-1")
                if candidate:
                    return candidate
        return peer.remote

    def authenticate(self, consumer: Optional[Mapping[str, Any]],
                     credential: Optional[Mapping[str, Any]]) -> None:
        """Set the authenticated consumer and credential (rows; either may be None).

        The configurations of the plugins that run after this one are resolved
        again with this consumer (Kong's consumer-scoped plugins).
        """
        if consumer is None and credential is None:
            raise ValueError("either credential or consumer must be provided")
        self.consumer = consumer
        self.credential = credential
        self.changed = True

    def get_consumer(self) -> Optional[Mapping[str, Any]]:
        return self.consumer

    def get_credential(self) -> Optional[Mapping[str, Any]]:
        return self.credential


class ServiceRequest:
    """``kong.service.request``: changes to the request sent upstream."""

    __slots__ = ("_request", "headers", "path", "query")

    def __init__(self, request: Any) -> None:
        self._request = request
        #: Header changes by lower-case name: ``(name, value)`` to send, ``None`` to drop.
        self.headers: Dict[bytes, Optional[Tuple[bytes, bytes]]] = {}
        self.path: Optional[bytes] = None
        self.query: Optional[bytes] = None

    def set_header(self, name: str, value: Any) -> None:
        """Replace every value of header ``name`` with ``value``."""
        raw, lower = _encoded(name)
        self.headers[lower] = (raw, str(value).encode("latin-1"))

    def clear_header(self, name: str) -> None:
        """Do not send header ``name`` upstream."""
        self.headers[_encoded(name)[1]] = None

    def set_path(self, path: str) -> None:
        """Send ``path`` (already escaped, starting with ``/``) instead of the routed path."""
        if not path.startswith("/"):
            raise ValueError("path must start with /")
        self.path = path.encode("latin-1")

    def set_raw_query(self, query: str) -> None:
        """Send ``query`` (without ``?``) as the query string."""
        self.query = query.encode("latin-1")

    def set_query(self, args: Mapping[str, Any]) -> None:
        """Send ``args`` (values: strings or lists of strings) as the query string."""
        self.set_raw_query(urlencode(
            [(k, v) for k, vs in args.items()
             for v in (vs if isinstance(vs, (list, tuple)) else [vs])]))

    def set_raw_body(self, body: bytes) -> None:
        """Send ``body`` upstream instead of the buffered request body (its
        Content-Length follows). Not possible while the body is streamed."""
        request = self._request
        if getattr(request, "stream", None) is not None:
            raise ValueError("the request body is streamed")
        content = request.content
        content.seek(0, 0)
        content.truncate()
        content.write(body)
        content.seek(0, 0)


class Service:
    """``kong.service``."""

    __slots__ = ("request",)

    def __init__(self, request: Any) -> None:
        self.request = ServiceRequest(request)


class Response:
    """``kong.response``: the response to the client.

    Before ``header_filter`` (in ``rewrite``/``access``), header changes are kept
    and applied over the upstream's (or the exit's) headers.
    """

    __slots__ = ("_request", "_pending", "_applied", "exited")

    def __init__(self, request: Any) -> None:
        self._request = request
        self._pending: Optional[List[Tuple[str, bytes, Optional[bytes]]]] = None
        self._applied = False
        #: ``(status, body, headers)`` once a plugin called :meth:`exit`.
        self.exited: Optional[Tuple[int, Any, Dict[str, Any]]] = None

    def exit(self, status: int, body: Any = None,
             headers: Optional[Mapping[str, Any]] = None) -> None:
        """Answer the client now (rewrite/access only): the remaining access
        plugins and the upstream are skipped. A dict or list body is sent as
        JSON. Call it as ``return kong.response.exit(...)``."""
        self.exited = (int(status), body, dict(headers or {}))

    def _op(self, op: str, name: str, value: Optional[Any]) -> None:
        raw_name = _response_name(name)
        raw_value = None if value is None else _response_value(value)
        if not self._applied:
            pending = self._pending
            if pending is None:
                pending = self._pending = []
            pending.append((op, raw_name, raw_value))
            return
        self._raw_op(op, raw_name, raw_value)

    def _raw_op(self, op: str, raw_name: bytes, raw_value: Optional[bytes]) -> None:
        """Apply one change to the headers' dict (``raw_name`` canonical,
        ``raw_value`` sanitised: what ``Headers`` would check is done)."""
        headers = self._request.responseHeaders._rawHeaders
        if op == "set":
            headers[raw_name] = [raw_value]
        elif op == "add":
            values = headers.get(raw_name)
            if values is None:
                headers[raw_name] = [raw_value]
            else:
                values.append(raw_value)
        else:
            headers.pop(raw_name, None)

    def set_header(self, name: str, value: Any) -> None:
        self._op("set", name, value)

    def add_header(self, name: str, value: Any) -> None:
        self._op("add", name, value)

    def clear_header(self, name: str) -> None:
        self._op("clear", name, None)

    def get_header(self, name: str) -> Optional[str]:
        values = self._request.responseHeaders.getRawHeaders(name.encode("latin-1"))
        return values[0].decode("latin-1") if values else None

    def get_headers(self) -> Dict[str, _HeaderValue]:
        return {
            name.decode("latin-1").lower(): _one_or_list([v.decode("latin-1") for v in values])
            for name, values in self._request.responseHeaders.getAllRawHeaders()
        }

    def get_status(self) -> int:
        return self._request.code

    def _apply(self) -> None:
        self._applied = True
        pending, self._pending = self._pending, None
        if pending:
            raw_op = self._raw_op
            for op, name, value in pending:
                raw_op(op, name, value)


class Ctx:
    """``kong.ctx``: ``shared`` is one dict per request for every plugin."""

    __slots__ = ("shared",)

    def __init__(self) -> None:
        self.shared: Dict[str, Any] = {}


class Router:
    """``kong.router``: the matched route and its service, as rows."""

    __slots__ = ("_index", "_route_id", "_service_id")

    def __init__(self, index: Any, route_id: Optional[str],
                 service_id: Optional[str]) -> None:
        self._index = index
        self._route_id = route_id
        self._service_id = service_id

    def get_route(self) -> Optional[Mapping[str, Any]]:
        return self._index.routes.get(self._route_id)

    def get_service(self) -> Optional[Mapping[str, Any]]:
        service_id = self._service_id
        return self._index.services.get(service_id) if service_id else None


class Node:
    """``kong.node``; ``cache`` is the node's :class:`kongtx.cache.EntityCache`
    (``None`` until the service wires one), served to plugins as ``kong.cache``."""

    __slots__ = ("_id", "cache")

    def __init__(self, node_id: str, cache: Any = None) -> None:
        self._id = node_id
        self.cache = cache

    def get_id(self) -> str:
        return self._id


_NO_NODE = Node("")
_DEFAULT_LOG = Logger(namespace="kongtx.plugins")


class Kong:
    """Everything a plugin sees of one request (the pipeline reads its outcome).

    ``exited`` is ``(status, body, headers)`` once a plugin called
    ``kong.response.exit``; ``failed`` is true once a plugin raised.
    """

    __slots__ = (
        "_request", "_peer", "scheme", "path", "request_id",
        "index", "chain", "route_id", "service_id",
        "request", "client", "service", "response", "_ctx", "_router", "log", "node",
        "failed", "started",
    )

    def __init__(self, request: Any, *, peer: Any, scheme: str, path: str,
                 request_id: str, index: Any, chain: Any, route_id: Optional[str],
                 service_id: Optional[str], node: Optional[Node] = None,
                 real_ip_header: bytes = b"x-real-ip",
                 started: Optional[float] = None) -> None:
        self._request = request
        self._peer = peer
        self.scheme = scheme
        self.path = path
        self.request_id = request_id
        self.index = index
        self.chain = chain
        self.route_id = route_id
        self.service_id = service_id
        self.request = Request(request, scheme, path)
        self.client = Client(request, peer, real_ip_header)
        self.service = Service(request)
        self.response = Response(request)
        self._ctx: Optional[Ctx] = None  # kong.ctx and kong.router: made when first used
        self._router: Optional[Router] = None
        self.log: Logger = _DEFAULT_LOG
        self.node = node or _NO_NODE
        self.failed = False
        #: ``time.monotonic()`` when the request started (for the log serializer).
        self.started = time.monotonic() if started is None else started

    @property
    def ctx(self) -> Ctx:
        """``kong.ctx`` (``kong.ctx.shared``: one dict per request for every plugin)."""
        ctx = self._ctx
        if ctx is None:
            ctx = self._ctx = Ctx()
        return ctx

    @property
    def router(self) -> Router:
        """``kong.router``: the matched route and service rows."""
        router = self._router
        if router is None:
            router = self._router = Router(self.index, self.route_id, self.service_id)
        return router

    # The outcome, kept by the parts that produce it.

    @property
    def exited(self) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """``(status, body, headers)`` once a plugin called ``kong.response.exit``."""
        return self.response.exited

    @exited.setter
    def exited(self, value: Optional[Tuple[int, Any, Dict[str, Any]]]) -> None:
        self.response.exited = value

    @property
    def consumer(self) -> Optional[Mapping[str, Any]]:
        """The authenticated consumer row, or ``None``."""
        return self.client.consumer

    @consumer.setter
    def consumer(self, value: Optional[Mapping[str, Any]]) -> None:
        self.client.consumer = value

    @property
    def credential(self) -> Optional[Mapping[str, Any]]:
        """The authenticated credential row, or ``None``."""
        return self.client.credential

    @credential.setter
    def credential(self, value: Optional[Mapping[str, Any]]) -> None:
        self.client.credential = value

    @property
    def consumer_changed(self) -> bool:
        """Whether a plugin authenticated since the pipeline last reset this."""
        return self.client.changed

    @consumer_changed.setter
    def consumer_changed(self, value: bool) -> None:
        self.client.changed = value

    @property
    def upstream_headers(self) -> Dict[bytes, Optional[Tuple[bytes, bytes]]]:
        """Header changes for the upstream request (``kong.service.request``)."""
        return self.service.request.headers

    @property
    def upstream_path(self) -> Optional[bytes]:
        """The path to send upstream instead of the routed one, or ``None``."""
        return self.service.request.path

    @property
    def upstream_query(self) -> Optional[bytes]:
        """The query string to send upstream instead of the client's, or ``None``."""
        return self.service.request.query

    @property
    def cache(self) -> Any:
        """``kong.cache``: the node's entity cache (``kongtx.cache.EntityCache``)."""
        return self.node.cache

    def apply_response_headers(self) -> None:
        """Apply the header changes made before the response existed (the
        pipeline calls this before ``header_filter``)."""
        self.response._apply()

    def exit_body(self) -> Tuple[bytes, Optional[bytes]]:
        """The exit's body as bytes, and its default Content-Type (if any)."""
        assert self.exited is not None
        body = self.exited[1]
        if body is None:
            return b"", None
        if isinstance(body, bytes):
            return body, None
        if isinstance(body, str):
            return body.encode("utf-8"), None
        return json.dumps(body).encode("utf-8"), JSON_TYPE
