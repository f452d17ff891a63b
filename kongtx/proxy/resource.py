"""The proxy site: routes each request through the current snapshot and relays it upstream.

:class:`GatewayResource` derives from Twisted's ``ReverseProxyResource`` but is a leaf:
one resource receives every request, asks the pure router for a match and sends the
request to the matched service through :class:`kongtx.proxy.client.UpstreamPool`
(pooled HTTP/1.1 keep-alive connections). :class:`ProxyRequest` trims twisted.web's
per-request work that a proxy does not need (query-string and form parsing, resource
traversal) and enforces the body size limit while the body is being received.
"""

from __future__ import annotations

import ipaddress
import time
from random import getrandbits
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import failure
from twisted.web import http, server
from twisted.web.http import _ChunkedTransferDecoder, _IdentityTransferDecoder
from twisted.web.http_headers import Headers
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource

from kongtx import KONG_VERSION, pipeline, uri
from kongtx.errors import reason_phrase
from kongtx.pdk import Kong, Node
from kongtx.proxy import client as upstream
from kongtx.proxy import request_head, responses
from kongtx.snapshot import ServiceSpec, SnapshotManager

log = Logger()

#: Hop-by-hop headers never forwarded in either direction (RFC 9110 7.6.1, plus the
#: legacy ones Kong strips: Proxy-Connection, and ``Proxy`` for httpoxy).
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy",
    ]
)
#: Request headers kongtx computes itself for the upstream request.
_REPLACED_UPSTREAM = frozenset(
    [
        b"host",
        b"content-length",
        b"x-real-ip",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-path",
        b"x-forwarded-prefix",
        b"x-kong-request-id",
        b"via",
    ]
)
_FORWARDED_TRUSTED = (
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-forwarded-path",
    b"x-forwarded-prefix",
)
_DROPPED_RESPONSE = HOP_BY_HOP | frozenset([b"content-length"])

#: A Content-Length of at most this many digits (< 100 kB) is sent without
#: registering the upstream connection as the client's producer.
_SMALL_BODY_DIGITS = 5

#: Request bodies up to this size are buffered (so a retry can resend them); larger
#: or chunked bodies, and any body on a route with request_buffering=false, are
#: streamed upstream as they arrive.
STREAM_THRESHOLD = 64 * 1024

#: twisted.web.http is a deprecation proxy module: look the base method up once.
_http_request_write = http.Request.write

_SERVER_TOKEN = ("kong/%s" % (KONG_VERSION,)).encode("ascii")
_VIA_TOKEN = ("1.1 kong/%s" % (KONG_VERSION,)).encode("ascii")


class _Peer:
    """Facts about one client connection, computed on its first request."""

    __slots__ = ("scheme", "scheme_bytes", "remote", "remote_bytes", "trusted", "port_bytes")

    def __init__(self, scheme: str, remote: Optional[str], trusted: bool, port: int) -> None:
        self.scheme = scheme
        self.scheme_bytes = scheme.encode("ascii")
        self.remote = remote
        self.remote_bytes = (remote or "unix").encode("latin-1")
        self.trusted = trusted
        self.port_bytes = b"%d" % (port,)


class ProxySettings:
    """What the proxy resource needs of the configuration, precomputed once."""

    def __init__(self, config: Any) -> None:
        enabled = {h.lower() for h in config.headers}
        self.server_header = "server" in enabled
        self.via_header = "via" in enabled
        self.proxy_latency = "x-kong-proxy-latency" in enabled
        self.upstream_latency = "x-kong-upstream-latency" in enabled
        self.response_latency = "x-kong-response-latency" in enabled
        self.request_id = "x-kong-request-id" in enabled
        self.upstream_status = "x-kong-upstream-status" in enabled
        self.request_id_upstream = "x-kong-request-id" in {
            h.lower() for h in config.headers_upstream
        }
        self.trusted_ips = tuple(config.trusted_ips)
        self.trust_all = any(net.prefixlen == 0 for net in self.trusted_ips)
        self.trusts_unix = bool(getattr(config, "trusts_unix", False))
        self.real_ip_header = config.real_ip_header.lower().encode("ascii")
        self.real_ip_recursive = bool(config.real_ip_recursive)
        self.error_default_type = responses.default_type(config.error_default_type)
        self.allow_debug_header = bool(config.allow_debug_header)


# What response_started does with an upstream header, by name.
_COPY, _CONNECTION, _HOP_BY_HOP, _CONTENT_LENGTH, _SERVER, _DATE = range(6)
_NAME_KINDS = {b"connection": _CONNECTION, b"content-length": _CONTENT_LENGTH,
               b"server": _SERVER, b"date": _DATE}

#: (twisted.web's canonical name, kind) by upstream header name, as sent.
_RESPONSE_NAMES: Dict[bytes, Tuple[bytes, int]] = {}
_MAX_RESPONSE_NAMES = 1000


def _response_name(name: bytes) -> Tuple[bytes, int]:
    """Classify an upstream response header name and find the name twisted.web's
    ``Headers`` stores it under (``content-type`` -> ``Content-Type``); both are
    remembered, an upstream sends the same few names over and over."""
    lower = name.lower()
    kind = _NAME_KINDS.get(lower, _COPY)
    if kind == _COPY and lower in HOP_BY_HOP:
        kind = _HOP_BY_HOP
    if len(_RESPONSE_NAMES) >= _MAX_RESPONSE_NAMES:
        _RESPONSE_NAMES.clear()
    entry = _RESPONSE_NAMES[name] = (request_head.canonical_name(name), kind)
    return entry


def _ms(seconds: float) -> bytes:
    return b"%d" % (int(seconds * 1000),)


#: The last second :func:`_http_date` formatted, and its ``Date`` value.
_last_date: Tuple[int, bytes] = (-1, b"")


def _http_date() -> bytes:
    """The ``Date`` header value for now, formatted once per second (twisted.web's
    ``datetimeToString`` costs more than the rest of the response head)."""
    global _last_date
    second = int(time.time())
    cached = _last_date
    if cached[0] != second:
        cached = _last_date = (second, http.datetimeToString(second))
    return cached[1]


def _terminated_https(request: Any, peer: "_Peer") -> bool:
    """A legacy API's ``http_if_terminated``: TLS ended before us, as a trusted client says."""
    if not peer.trusted:
        return False
    proto = request.requestHeaders.getRawHeaders(b"x-forwarded-proto")
    return bool(proto) and proto[0].strip().lower() == b"https"


def _select(router: Any, request: Any, host: Optional[str], path: str, scheme: str) -> Any:
    """Ask ``router`` for the route of ``request`` (headers only built when needed)."""
    header_map = None
    if router.uses_headers:
        header_map = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
    return router.select(request.method.decode("latin-1"), host, path, scheme, header_map)


class ProxyRequest(server.Request):
    """A ``twisted.web`` request trimmed for proxying.

    The site's ``max_body_size`` is enforced as the body arrives (twisted.web has no
    cap of its own): an oversized body is discarded, not stored, and answered 413.
    """

    body_too_large = False
    _received = 0
    #: twisted.web gives a response without Content-Type ``text/html``; a proxied
    #: response keeps the upstream's headers as they are (kongtx's own answers
    #: set theirs).
    defaultContentType = None
    #: The upstream exchange serving this request (cancelled if the client leaves).
    exchange: Optional["_Exchange"] = None
    #: The body being streamed upstream as it arrives (None: buffered body).
    stream: Optional[upstream.BodyStream] = None

    #: Counted in the site's ``requests_in_flight`` (from routing to the end).
    _in_flight = False
    #: ``(function, argument)`` called once, when the response is finished or the
    #: client has gone (``notifyFinish`` without a Deferred per request).
    _when_done: Optional[Tuple[Callable[[Any], None], Any]] = None

    def when_done(self, function: Callable[[Any], None], argument: Any) -> None:
        """Call ``function(argument)`` once the request is over, either way."""
        self._when_done = (function, argument)

    def _done(self) -> None:
        hook = self._when_done
        if hook is not None:
            self._when_done = None
            hook[0](hook[1])

    def parseCookies(self) -> None:
        """Cookies are forwarded verbatim, never read: twisted.web parses them for
        every request."""

    def write(self, data: bytes) -> None:
        """``http.Request.write`` directly: ``server.Request.write`` only adds a
        default Content-Type (none here, see above), response encoders (none
        here) and the fake HEAD of ``render`` (not used)."""
        _http_request_write(self, data)

    def connectionLost(self, reason: failure.Failure) -> None:
        server.Request.connectionLost(self, reason)
        if self._in_flight:
            # (twisted.web has just dropped self.channel; process() kept the site.)
            self._in_flight = False
            self.site.requests_in_flight -= 1
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.cancel()
        self._done()

    def gotLength(self, length: Optional[int]) -> None:
        """Headers are in: refuse an oversized body, or start streaming a large one."""
        channel = self.channel
        site = channel.site
        limit = site.max_body_size
        if limit and length is not None and length > limit:
            self.body_too_large = True
            server.Request.gotLength(self, 0)
            return
        if length == 0:
            server.Request.gotLength(self, 0)
            return
        # The request line and headers are known before the body arrives.
        self.method, self.uri = channel._command, channel._path
        self.clientproto = channel._version
        self.path = self.uri.split(b"?", 1)[0]
        if length is not None and length <= STREAM_THRESHOLD and not site.resource.unbuffered(self):
            server.Request.gotLength(self, length)
            return
        server.Request.gotLength(self, 0)
        transport = channel.transport
        self.stream = upstream.BodyStream(
            length, on_full=transport.pauseProducing, on_drained=transport.resumeProducing)
        self.process()

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        limit = self.channel.site.max_body_size
        if limit:
            self._received += len(data)
            if self._received > limit:
                self.body_too_large = True
                if self.stream is not None:
                    self._stream_too_large()
                    return
                self.content.seek(0)
                self.content.truncate()
                return
        stream = self.stream
        if stream is not None:
            stream.feed(data)
        else:
            self.content.write(data)

    def _stream_too_large(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.cancel()
        if self.startedWriting:
            self.channel.transport.abortConnection()
        else:
            self.site.resource.respond_error(self, 413, None, upstream_error=True)

    def finish_response(self) -> None:
        """Finish the response; if the request body is still arriving (streamed),
        close the connection after it instead of reading the rest."""
        stream = self.stream
        if stream is not None and not stream.finished:
            self.channel.persistent = False
            self.channel.transport.resumeProducing()
        self.finish()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        stream = self.stream
        if stream is not None:
            # Already routed and streaming: the body is complete.
            stream.finish()
            return
        # Unlike http.Request, parse neither the query string nor form bodies: the
        # proxy forwards them verbatim.
        self.content.seek(0, 0)
        self.args = {}
        self.method, self.uri = command, path
        self.clientproto = version
        self.path = path.split(b"?", 1)[0]
        self.process()

    def finish(self) -> None:
        if self._in_flight:
            self._in_flight = False
            self.channel.site.requests_in_flight -= 1
        server.Request.finish(self)
        self._done()

    def process(self) -> None:
        site = self.site = self.channel.site
        if not self._in_flight:
            self._in_flight = True
            site.requests_in_flight += 1
        self.prepath = []
        self.postpath = []
        try:
            site.resource.render(self)
        except Exception:
            self.processingFailed(failure.Failure())

    def processingFailed(self, reason: failure.Failure) -> None:
        log.failure("unexpected error while proxying {uri!r}", reason, uri=self.uri)
        resource = self.site.resource
        if isinstance(resource, GatewayResource) and not self.startedWriting:
            resource.respond_error(self, 500, None)
        elif not self.finished and not self._disconnected:
            self.loseConnection()


class ProxyChannel(http.HTTPChannel):
    """An ``HTTPChannel`` that reads each request head whole, asks the socket for
    its local address once per connection instead of once per request
    (twisted.web's Request does), and closes the connection after the current
    request while its site drains.

    twisted.web parses a head line by line; this channel waits for the empty
    line that ends it and parses it in one go (``kongtx.proxy.request_head``),
    answering a bad head as Kong does (``400 Bad request``, ``414 URI too
    long``, ``400 Request header or cookie too large``) instead of a bare 400
    or, for a line over 16 KiB, a silent close. A head must arrive whole within
    ``header_timeout`` of its first byte (``408 Request timeout`` otherwise):
    trickling bytes no longer keeps a connection open (twisted.web resets its
    idle timer on every read). The body and the pipelined requests that wait
    behind a request are still twisted.web's (``rawDataReceived``).
    """

    _local_address: Any = None
    _peer_address: Any = None
    #: Seconds from a head's first bytes to its end (the site's ``header_timeout``).
    header_timeout = 60.0
    #: Fires when a head that started arriving has not ended in time.
    _head_deadline: Any = None
    #: How much of the buffer is known to hold no head end (a head that arrives
    #: in many reads is searched once, not once per read).
    _head_scanned = 0
    #: The idle timer, kept for the connection's life: twisted.web's
    #: ``TimeoutMixin`` cancels its timer when a request arrives and makes a new
    #: one when it is answered, a ``DelayedCall`` per request.
    _idle_call: Any = None
    #: A request is being answered: the idle timer does not count.
    _idle_paused = False

    def getHost(self) -> Any:
        address = self._local_address
        if address is None:
            address = self._local_address = super().getHost()
        return address

    def getPeer(self) -> Any:
        address = self._peer_address
        if address is None:
            address = self._peer_address = super().getPeer()
        return address

    def dataReceived(self, data: bytes) -> None:
        """``LineReceiver.dataReceived`` with a whole head in place of a line
        (same buffer, same guard against reentry: a request answered at once
        replays the pipelined bytes through here)."""
        self.resetTimeout()
        if self._busyReceiving:
            self._buffer += data
            return
        try:
            self._busyReceiving = True
            self._buffer += data
            while self._buffer:
                if self.line_mode:
                    if not self._head_received():
                        return
                else:
                    data = self._buffer
                    self._buffer = b""
                    self.rawDataReceived(data)
        finally:
            self._busyReceiving = False

    def _head_received(self) -> bool:
        """Take one request head off the buffer and start its request; False
        when the head is not all here yet, or the connection is closing."""
        buffer = self._buffer
        if not self.persistent:
            # The last request said close: what follows it is ignored.
            self._buffer = b""
            return False
        while buffer[:2] == b"\r\n":
            # Empty lines before a request line (some clients end a POST body
            # with an extra CRLF); RFC 9112 2.2 says to ignore them.
            buffer = buffer[2:]
            self._head_scanned = 0
        scanned = self._head_scanned
        end = buffer.find(b"\r\n\r\n", scanned - 3 if scanned > 3 else 0)
        limit = self.totalHeadersSize
        if end < 0 or end + 4 > limit:
            self._buffer = buffer
            self._head_scanned = len(buffer)
            if len(buffer) > limit:
                self._refuse_head(self._oversized(buffer[:limit]))
                return False
            if buffer and self._head_deadline is None and self.header_timeout:
                self._head_deadline = self.callLater(self.header_timeout, self._head_timed_out)
            return False
        self._head_scanned = 0
        deadline = self._head_deadline
        if deadline is not None:
            self._head_deadline = None
            if deadline.active():
                deadline.cancel()
        self._buffer = buffer[end + 4:]
        try:
            method, target, version, headers, length = request_head.parse_request_head(
                buffer[:end], self.maxHeaders)
        except request_head.BadRequestHead as refused:
            self._refuse_head(refused)
            return False
        request = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        self._command, self._path, self._version = method, target, version
        request.requestHeaders._rawHeaders = headers
        self.length = length
        if length is None:
            self._transferDecoder = _ChunkedTransferDecoder(
                request.handleContentChunk, self._finishRequestBody)
        elif length:
            self._transferDecoder = _IdentityTransferDecoder(
                length, request.handleContentChunk, self._finishRequestBody)
        self.allHeadersReceived()
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()
        return not self.transport.disconnecting

    @staticmethod
    def _oversized(start: bytes) -> request_head.BadRequestHead:
        """What a head over the size limit gets: 414 if the request line alone
        fills it (nginx's answer), else 400 (nginx's 494, as Kong reports it)."""
        if b"\r\n" not in start:
            return request_head.BadRequestHead(414, responses.DEFAULT_MESSAGES[414])
        return request_head.BadRequestHead(400, responses.HEADERS_TOO_LARGE)

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.line_mode and self._buffer and not self.requests:
            self._buffer = b""
            self._refuse_head(request_head.BadRequestHead(408, responses.DEFAULT_MESSAGES[408]))

    def _refuse_head(self, refused: request_head.BadRequestHead) -> None:
        """Answer a refused head in Kong's shape (its status, its message, the
        error type of kong.conf) and close the connection."""
        self._buffer = b""
        self._head_scanned = 0
        self.persistent = False
        log.info("refused a request head from {peer}: {status} {message}",
                 peer=self.getPeer(), status=refused.status, message=refused.message)
        resource = getattr(self.site, "resource", None)
        if not isinstance(resource, GatewayResource):
            self._respondToBadRequestAndDisconnect()
            return
        request = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        request.method, request.uri, request.path = b"-", b"-", b"-"
        request.clientproto = b"HTTP/1.1"
        request.site = self.site
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        resource.respond_error(request, refused.status, refused.message, upstream_error=True)

    def setTimeout(self, period: Optional[float]) -> Optional[float]:
        """``TimeoutMixin.setTimeout`` with one timer: ``None`` (a request is being
        answered) pauses it, a period restarts it."""
        previous = self.timeOut
        self.timeOut = period
        if period is None:
            self._idle_paused = True
            return previous
        self._idle_paused = False
        call = self._idle_call
        if call is not None:
            call.reset(period)
        else:
            self._idle_call = self.callLater(period, self._idle_fired)
        return previous

    def resetTimeout(self) -> None:
        call = self._idle_call
        if call is not None and not self._idle_paused:
            call.reset(self.timeOut)

    def _idle_fired(self) -> None:
        self._idle_call = None
        if not self._idle_paused:
            self.timeoutConnection()
        # Paused: the request outlived the timeout; the timer is made anew when
        # it is answered.

    def connectionLost(self, reason: failure.Failure) -> None:
        for name in ("_head_deadline", "_idle_call"):
            call = getattr(self, name)
            if call is not None:
                setattr(self, name, None)
                if call.active():
                    call.cancel()
        super().connectionLost(reason)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """The response head as one ``bytes`` (twisted.web hands the transport a
        list of four pieces per header, each checked and counted one by one)."""
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        lines = [b"%s %s %s" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%s: %s" % (name, value))
        lines.append(b"\r\n")
        self.transport.write(b"\r\n".join(lines))

    def allHeadersReceived(self) -> None:
        """twisted.web's, reading the headers' dict (canonical names) directly."""
        request = self.requests[-1]
        self.persistent = self.checkPersistence(request, self._version)
        request.gotLength(self.length)
        expect = request.requestHeaders._rawHeaders.get(b"Expect")
        if expect and self._version == b"HTTP/1.1" and expect[0].lower() == b"100-continue":
            self._send100Continue()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """HTTP/1.1 keeps the connection unless the client's ``Connection`` lists
        ``close`` (twisted.web splits it at spaces only), or the site drains."""
        if self.site.draining:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        if version != b"HTTP/1.1":
            return False
        connection = request.requestHeaders._rawHeaders.get(b"Connection")
        if connection is not None and any(
                token.strip().lower() == b"close"
                for value in connection for token in value.split(b",")):
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True


class ProxySite(server.Site):
    """The proxy's ``Site``: quiet by default, bounded header and body sizes."""

    protocol = ProxyChannel
    requestFactory = ProxyRequest
    displayTracebacks = False

    def __init__(self, resource: "GatewayResource", *, max_body_size: int,
                 max_headers: int, max_header_size: int, header_timeout: float = 60.0,
                 **kwargs: Any) -> None:
        server.Site.__init__(self, resource, **kwargs)
        self.max_body_size = max_body_size
        self.max_headers = max_headers
        self.max_header_size = max_header_size
        #: Seconds a request head may take to arrive whole (nginx's
        #: ``client_header_timeout``); 0: only the idle timeout.
        self.header_timeout = header_timeout

        #: Open client connections (``kongtx.proxy.drain`` closes them gracefully).
        self.channels: Set[Any] = set()
        #: Set by ``kongtx.proxy.drain``: every response closes its connection.
        self.draining = False

    connections_accepted = 0
    connections_active = 0
    #: Requests being answered (``/status`` ``connections_writing``, as nginx
    #: counts connections writing a response).
    requests_in_flight = 0

    def buildProtocol(self, addr: Any) -> Any:
        channel = server.Site.buildProtocol(self, addr)
        channel.kongtx_peer = None
        channel.maxHeaders = self.max_headers
        channel.totalHeadersSize = self.max_header_size
        channel.header_timeout = self.header_timeout
        self.connections_accepted += 1
        self.connections_active += 1
        channels = self.channels
        channels.add(channel)
        lost = channel.connectionLost

        def connectionLost(reason: Any) -> None:
            self.connections_active -= 1
            channels.discard(channel)
            lost(reason)

        channel.connectionLost = connectionLost
        return channel


class _Exchange:
    """One proxied request: relays the upstream response into the twisted.web request
    (implements ``IResponseSink``)."""

    __slots__ = (
        "resource",
        "request",
        "service",
        "started",
        "sent_at",
        "tries",
        "upstream",
        "args",
        "began",
        "request_id",
        "kong",
    )

    def __init__(self, resource: "GatewayResource", request: ProxyRequest,
                 service: ServiceSpec, started: float, request_id: str,
                 kong: Optional[Kong], args: dict) -> None:
        self.resource = resource
        self.kong = kong
        self.request = request
        self.service = service
        self.started = started
        self.request_id = request_id
        self.args = args
        self.sent_at = 0.0
        self.tries = 0
        self.began = False
        #: The upstream request of the current try (``cancel()`` aborts it).
        self.upstream: Optional[upstream.Exchange] = None

    def send(self) -> None:
        self.tries += 1
        self.sent_at = time.monotonic()
        self.upstream = self.resource.pool.send(self._outcome, sink=self, **self.args)

    def _outcome(self, reason: Optional[failure.Failure]) -> None:
        """The upstream request of this try is over (``reason``: why it failed)."""
        self.upstream = None
        if reason is None:
            return
        try:
            self._failed(reason)
        except Exception:
            self._crashed(failure.Failure())

    # IResponseSink
    def response_started(self, status: int, reason: bytes,
                         headers: List[Tuple[bytes, bytes]], producer: Any) -> None:
        self.began = True
        request = self.request
        if request._disconnected:
            return
        now = time.monotonic()
        settings = self.resource.settings
        request.setResponseCode(status, reason or None)
        responseHeaders = request.responseHeaders
        # The upstream's headers go straight into the Headers' dict: the parser
        # (kongtx.proxy.http11) already refused names that are not tokens and
        # values with CR, LF or other controls, which is what addRawHeader checks.
        raw = responseHeaders._rawHeaders
        raw.pop(b"Server", None)
        has_server = False
        has_date = False
        small = request.method == b"HEAD" or status in (204, 304)
        connection_tokens = ()
        names = _RESPONSE_NAMES
        for name, value in headers:
            entry = names.get(name)
            if entry is None:
                entry = _response_name(name)
            canonical, kind = entry
            if kind:
                if kind == _CONNECTION:
                    connection_tokens = tuple(t.strip().lower() for t in value.split(b","))
                    continue
                if kind == _HOP_BY_HOP:
                    continue
                if kind == _CONTENT_LENGTH:
                    if request.method != b"HEAD":
                        if len(value) <= _SMALL_BODY_DIGITS:
                            small = True
                    else:
                        continue
                elif kind == _SERVER:
                    has_server = True
                else:  # _DATE
                    has_date = True
            values = raw.get(canonical)
            if values is None:
                raw[canonical] = [value]
            else:
                values.append(value)
        for token in connection_tokens:
            if token not in HOP_BY_HOP:  # those were never copied
                responseHeaders.removeHeader(token)
        # Kong's own headers, under the names twisted.web would give them; added
        # after any the upstream sent (as addRawHeader would).
        if not has_server and settings.server_header:
            raw.setdefault(b"Server", []).append(_SERVER_TOKEN)
        if not has_date:
            raw.setdefault(b"Date", []).append(_http_date())
        if settings.via_header:
            raw.setdefault(b"Via", []).append(_VIA_TOKEN)
        if settings.upstream_latency:
            raw.setdefault(b"X-Kong-Upstream-Latency", []).append(_ms(now - self.sent_at))
        if settings.proxy_latency:
            raw.setdefault(b"X-Kong-Proxy-Latency", []).append(_ms(self.sent_at - self.started))
        if settings.upstream_status:
            raw.setdefault(b"X-Kong-Upstream-Status", []).append(b"%d" % (status,))
        if settings.request_id:
            raw.setdefault(b"X-Kong-Request-Id", []).append(self.request_id.encode("ascii"))
        if self.kong is not None:
            pipeline.run_header_filter(self.kong)
        if not small:
            # Flow control (pause the upstream while the client is slow) only
            # matters for bodies that do not fit in one socket buffer.
            request.registerProducer(producer, True)

    def response_data(self, data: bytes) -> None:
        if not self.request._disconnected:
            kong = self.kong
            if kong is not None and kong.chain.body_filter:
                data = pipeline.run_body_filter(kong, data)
                if not data:
                    return
            self.request.write(data)

    def response_finished(self) -> None:
        request = self.request
        request.exchange = None
        if request._disconnected:
            return
        if request.producer is not None:
            request.unregisterProducer()
        request.finish_response()

    # Outcome of one try
    def _failed(self, reason: failure.Failure) -> None:
        if reason.check(defer.CancelledError):
            return
        request = self.request
        error = reason.value
        if self.began or getattr(error, "response_started", False):
            # Part of the response is already on its way: all we can do is cut it.
            log.warn(
                "upstream response interrupted ({error}) while proxying {uri!r}",
                error=error, uri=request.uri,
            )
            if not request._disconnected:
                request.loseConnection()
            return
        if isinstance(error, upstream.UpstreamConnectError):
            if self.tries <= self.service.retries and not request._disconnected:
                self.send()
                return
            status = 502
        elif isinstance(error, upstream.UpstreamTimeout):
            status = 504
        elif isinstance(error, (upstream.UpstreamProtocolError, upstream.UpstreamClosed)):
            status = 502
        else:
            log.failure("unexpected upstream failure", reason)
            status = 502
        log.warn(
            "{status} for {uri!r}: upstream {host}:{port}: {error}",
            status=status, uri=request.uri, host=self.service.host,
            port=self.service.port, error=error,
        )
        self.resource.respond_error(request, status, None, request_id=self.request_id,
                                    started=self.started, upstream_error=True)

    def _crashed(self, reason: failure.Failure) -> None:
        """Last resort: a bug on the error path must not leave the request open."""
        log.failure("unexpected error while proxying {uri!r}", reason, uri=self.request.uri)
        request = self.request
        if request.finished or request._disconnected:
            return
        if not request.startedWriting:
            try:
                self.resource.respond_error(request, 500, None, request_id=self.request_id)
                return
            except Exception:
                log.failure("could not answer 500")
        request.loseConnection()

    def cancel(self, _: Any = None) -> None:
        exchange = self.upstream
        if exchange is not None:
            self.upstream = None
            exchange.cancel()


class GatewayResource(ReverseProxyResource):
    """The proxy's one resource: route, then relay upstream.

    :param snapshots: gives ``current`` (the snapshot to route with).
    :param pool: an :class:`~kongtx.proxy.client.UpstreamPool`.
    :param settings: :class:`ProxySettings`.
    """

    isLeaf = True

    def __init__(self, snapshots: SnapshotManager, pool: Any, settings: ProxySettings,
                 reactor: Any, *, request_id_factory: Callable[[], str] = None,
                 node_id: str = "", cache: Any = None) -> None:
        ReverseProxyResource.__init__(self, "", 0, b"", reactor)
        self.node = Node(node_id, cache=cache)
        self.snapshots = snapshots
        self.pool = pool
        self.settings = settings
        # Request ids only need to be unique, not secret: no syscall per request.
        self._request_id = request_id_factory or (lambda: "%032x" % getrandbits(128))
        self.requests_total = 0

    def getChild(self, path: bytes, request: Any) -> Resource:
        return self

    def render(self, request: ProxyRequest) -> Any:
        self.requests_total += 1
        started = time.monotonic()
        request_id = self._request_id()
        if request.body_too_large:
            request.setHeader(b"connection", b"close")
            return self.respond_error(request, 413, None, request_id=request_id,
                                      started=started, upstream_error=True)
        raw_path = request.path
        try:
            path = uri.normalize(uri.from_wire(raw_path))
        except ValueError:
            return self.respond_error(request, 400, None, request_id=request_id,
                                      started=started, upstream_error=True)
        headers = request.requestHeaders
        hosts = headers.getRawHeaders(b"host")
        if hosts is not None and len(hosts) > 1:
            return self.respond_error(request, 400, None, request_id=request_id,
                                      started=started, upstream_error=True)
        host = hosts[0].decode("latin-1") if hosts else None
        peer = self._peer(request)
        scheme = peer.scheme
        snapshot = self.snapshots.current
        match = _select(snapshot.router, request, host, path, scheme)
        if match is None:
            return self.respond_error(request, 404, responses.NO_ROUTE,
                                      request_id=request_id, started=started)
        route = match.route
        if match.https_redirect and not (
                route.https_if_terminated and _terminated_https(request, peer)):
            return self._redirect_https(request, route, host, request_id, started)
        service = snapshot.services.get(route.service_id) if route.service_id else None
        if service is None:
            return self.respond_error(request, 503, responses.NO_SERVICE,
                                      request_id=request_id, started=started)

        chain = snapshot.plugins.chains.get(route.id) if snapshot.plugins.chains else None
        if chain is None:
            return self._forward(request, match, route, service, path, raw_path, host,
                                 peer, request_id, started, None)
        return self._run_plugins(request, snapshot.plugins, chain, match, route, service,
                                 path, raw_path, host, peer, request_id, started)

    def _run_plugins(self, request: ProxyRequest, index: Any, chain: Any, match: Any,
                     route: Any, service: ServiceSpec, path: str, raw_path: bytes,
                     host: Optional[str], peer: _Peer, request_id: str,
                     started: float) -> Any:
        """Run rewrite/access, then go upstream, answer the exit, or answer 500."""
        kong = Kong(request, peer=peer, scheme=peer.scheme, path=path,
                    request_id=request_id, index=index, chain=chain, route_id=route.id,
                    service_id=service.id, node=self.node,
                    real_ip_header=self.settings.real_ip_header, started=started)
        if chain.log or index.consumer_scoped:
            request.when_done(self._run_log_phase, kong)
        d = pipeline.run_access(kong)
        if d is None:
            return self._after_access(request, kong, match, route, service, path, raw_path,
                                      host, peer, request_id, started)

        def proceed(_: Any) -> None:
            self._after_access(request, kong, match, route, service, path, raw_path,
                               host, peer, request_id, started)

        def failed(reason: failure.Failure) -> None:
            log.failure("unexpected error while running plugins for {uri!r}", reason,
                        uri=request.uri)
            self.respond_error(request, 500, None, request_id=request_id, started=started)

        d.addCallback(proceed).addErrback(failed)
        return server.NOT_DONE_YET

    def _after_access(self, request: ProxyRequest, kong: Kong, match: Any, route: Any,
                      service: ServiceSpec, path: str, raw_path: bytes, host: Optional[str],
                      peer: _Peer, request_id: str, started: float) -> Any:
        if request.finished or request._disconnected:
            return server.NOT_DONE_YET
        if kong.failed:
            return self.respond_error(request, 500, None, request_id=request_id,
                                      started=started)
        if kong.exited is not None:
            return self._respond_exit(request, kong, request_id, started)
        return self._forward(request, match, route, service, path, raw_path, host,
                             peer, request_id, started, kong)

    def _run_log_phase(self, kong: Kong) -> None:
        """The response is finished: run the log phase now.

        The response's bytes are in the transport's buffer and go out at the next
        poll, after the rest of this reactor turn, so deferring the log phase to a
        later turn would not send them sooner; it would keep every finished
        request's objects alive longer, which measured twice as many garbage
        collections (see ``docs/performance.md``). Errors are only logged.
        """
        if not kong.chain.log:
            return
        try:
            d = pipeline.run_log(kong)
        except Exception:
            log.failure("log phase failed")
            return
        if d is not None:
            d.addErrback(lambda reason: log.failure("log phase failed", reason))

    def _respond_exit(self, request: ProxyRequest, kong: Kong, request_id: str,
                      started: float) -> Any:
        """Answer with ``kong.response.exit(status, body, headers)`` (Kong's semantics:
        header_filter, body_filter and log still run)."""
        assert kong.exited is not None
        status, _, extra = kong.exited
        body, content_type = kong.exit_body()
        settings = self.settings
        request.setResponseCode(status, reason_phrase(status))
        headers = request.responseHeaders
        headers.removeHeader(b"server")
        if settings.server_header:
            headers.setRawHeaders(b"Server", [_SERVER_TOKEN])
        headers.setRawHeaders(b"Date", [_http_date()])
        if content_type is not None:
            headers.setRawHeaders(b"Content-Type", [content_type])
        for name, value in extra.items():
            raw = name.encode("latin-1")
            if isinstance(value, (list, tuple)):
                headers.setRawHeaders(raw, [str(v).encode("latin-1") for v in value])
            else:
                headers.setRawHeaders(raw, [str(value).encode("latin-1")])
        headers.setRawHeaders(b"Content-Length", [b"%d" % (len(body),)])
        if settings.request_id:
            headers.setRawHeaders(b"X-Kong-Request-Id", [request_id.encode("ascii")])
        if settings.response_latency:
            headers.setRawHeaders(b"X-Kong-Response-Latency",
                                  [_ms(time.monotonic() - started)])
        pipeline.run_header_filter(kong)
        if kong.chain.body_filter:
            body = pipeline.run_body_filter(kong, body)
        if body and request.method != b"HEAD":
            request.write(body)
        request.finish_response()
        return server.NOT_DONE_YET

    def _forward(self, request: ProxyRequest, match: Any, route: Any, service: ServiceSpec,
                 path: str, raw_path: bytes, host: Optional[str], peer: _Peer,
                 request_id: str, started: float, kong: Optional[Kong]) -> Any:
        """Send ``request`` to ``service`` (``kong``: the plugins' changes to apply)."""
        headers = request.requestHeaders
        upstream_path = match.upstream_path(service.path, path)
        target = uri.escape_path(upstream_path).encode("ascii")
        query_at = request.uri.find(b"?")
        changes = kong.upstream_headers if kong is not None else None
        out = self._upstream_headers(request, route, service, match, raw_path,
                                     host, peer, request_id, changes)
        if kong is None:
            if query_at >= 0:
                target += request.uri[query_at:]
        else:
            if kong.upstream_path is not None:
                target = kong.upstream_path
            if kong.upstream_query is not None:
                if kong.upstream_query:
                    target += b"?" + kong.upstream_query
            elif query_at >= 0:
                target += request.uri[query_at:]
            if changes:
                # The client's headers named in changes were left out already;
                # the ones kongtx computes are replaced here (rarely needed).
                if not _REPLACED_UPSTREAM.isdisjoint(changes):
                    out = [(n, v) for (n, v) in out if n.lower() not in changes]
                out.extend(change for change in changes.values() if change is not None)
        stream = request.stream
        if stream is not None:
            body: Any = stream
            length = stream.length or 0
            if stream.length is not None:
                out.append((b"Content-Length", b"%d" % (length,)))
        else:
            body = content = request.content
            content.seek(0, 2)
            length = content.tell()
            content.seek(0, 0)
            if length or request.method in (b"POST", b"PUT", b"PATCH"):
                out.append((b"Content-Length", b"%d" % (length,)))
            if not length:
                body = None
        if self.settings.allow_debug_header and headers.getRawHeaders(b"kong-debug"):
            self._debug_headers(request, route, service)
        exchange = _Exchange(
            self, request, service, started, request_id, kong,
            dict(
                scheme=service.protocol,
                host=service.host,
                port=service.port,
                method=request.method,
                target=target,
                headers=out,
                body=body,
                body_length=length,
                connect_timeout=service.connect_timeout,
                write_timeout=service.write_timeout,
                read_timeout=service.read_timeout,
                tls_verify=service.tls_verify,
                sni=None,
            ),
        )
        request.exchange = exchange
        exchange.send()
        return server.NOT_DONE_YET

    def unbuffered(self, request: ProxyRequest) -> bool:
        """Whether ``request`` (headers received, body not yet) goes to a route with
        ``request_buffering = false``."""
        try:
            path = uri.normalize(uri.from_wire(request.path))
        except ValueError:
            return False
        hosts = request.requestHeaders.getRawHeaders(b"host")
        host = hosts[0].decode("latin-1") if hosts else None
        match = _select(self.snapshots.current.router, request, host, path,
                        self._peer(request).scheme)
        return match is not None and not match.route.request_buffering

    def _upstream_headers(self, request: ProxyRequest, route: Any, service: ServiceSpec,
                          match: Any, raw_path: bytes, host: Optional[str], peer: _Peer,
                          request_id: str, changes: Optional[Mapping[bytes, Any]] = None,
                          ) -> List[Tuple[bytes, bytes]]:
        """The headers of the upstream request, but for Content-Length. The client's
        headers named in ``changes`` (the plugins' changes, by lower-case name) are
        left out; the caller applies ``changes``."""
        settings = self.settings
        remote = peer.remote
        trusted = peer.trusted
        out: List[Tuple[bytes, bytes]] = []
        append = out.append
        incoming = {}
        connection_tokens = ()
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower == b"connection":
                connection_tokens = tuple(
                    t.strip().lower() for v in values for t in v.split(b","))
                continue
            if lower in HOP_BY_HOP:
                if lower == b"te" and any(b"trailers" in v.lower() for v in values):
                    if not changes or b"te" not in changes:
                        append((b"TE", b"trailers"))
                continue
            if lower in _REPLACED_UPSTREAM:
                incoming[lower] = values
                continue
            if changes and lower in changes:
                continue
            for value in values:
                append((name, value))
        if connection_tokens:
            drop = set(connection_tokens)
            out[:] = [(n, v) for (n, v) in out if n.lower() not in drop]

        client_ip = remote or "unix"
        if trusted and settings.real_ip_header in incoming:
            # real_ip_header is honoured only from trusted clients (nginx realip).
            values = b",".join(incoming[settings.real_ip_header]).split(b",")
            candidate = values[-1].strip().decode("latin-1")
            if candidate:
                client_ip = candidate
        elif trusted and settings.real_ip_header not in _REPLACED_UPSTREAM:
            real = request.requestHeaders.getRawHeaders(settings.real_ip_header)
            if real:
                client_ip = real[-1].split(b",")[-1].strip().decode("latin-1") or client_ip

        if route.preserve_host and host is not None:
            append((b"Host", host.encode("latin-1")))
        else:
            append((b"Host", service.host_header))
        xff = incoming.get(b"x-forwarded-for")
        remote_b = peer.remote_bytes
        append((b"X-Forwarded-For", b", ".join(xff + [remote_b]) if xff else remote_b))
        if trusted:
            forwarded = {k: incoming[k][0] for k in _FORWARDED_TRUSTED if k in incoming}
        else:
            forwarded = {}
        host_only = host.rsplit(":", 1)[0] if host and not host.endswith("]") else host
        append((b"X-Forwarded-Proto", forwarded.get(b"x-forwarded-proto", peer.scheme_bytes)))
        append((b"X-Forwarded-Host", forwarded.get(
            b"x-forwarded-host", (host_only or "").encode("latin-1"))))
        append((b"X-Forwarded-Port", forwarded.get(b"x-forwarded-port", peer.port_bytes)))
        append((b"X-Forwarded-Path", forwarded.get(b"x-forwarded-path", raw_path)))
        prefix = forwarded.get(b"x-forwarded-prefix")
        if prefix is None:
            stripped = match.stripped_prefix
            if stripped:
                prefix = stripped.encode("utf-8")
        if prefix is not None:
            append((b"X-Forwarded-Prefix", prefix))
        append((b"X-Real-IP", client_ip.encode("latin-1")))
        via = incoming.get(b"via")
        if settings.via_header:
            append((b"Via", b", ".join(via + [_VIA_TOKEN]) if via else _VIA_TOKEN))
        elif via:
            append((b"Via", b", ".join(via)))
        if settings.request_id_upstream:
            append((b"X-Kong-Request-Id", request_id.encode("ascii")))
        return out

    def _peer(self, request: ProxyRequest) -> _Peer:
        channel = request.channel
        peer = getattr(channel, "kongtx_peer", None)
        if peer is None:
            remote = getattr(request.getClientAddress(), "host", None)
            peer = _Peer(
                "https" if request.isSecure() else "http",
                remote,
                self._is_trusted(remote),
                getattr(request.getHost(), "port", 0),
            )
            channel.kongtx_peer = peer
        return peer

    def _is_trusted(self, remote: Optional[str]) -> bool:
        settings = self.settings
        if remote is None:
            return settings.trusts_unix
        if settings.trust_all:
            return True
        if not settings.trusted_ips:
            return False
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(address in net for net in settings.trusted_ips)

    def _debug_headers(self, request: Any, route: Any, service: ServiceSpec) -> None:
        request.setHeader(b"Kong-Route-Id", route.id.encode())
        if route.name:
            request.setHeader(b"Kong-Route-Name", route.name.encode("utf-8"))
        request.setHeader(b"Kong-Service-Id", service.id.encode())
        if service.name:
            request.setHeader(b"Kong-Service-Name", service.name.encode("utf-8"))

    def _redirect_https(self, request: Any, route: Any, host: Optional[str],
                        request_id: str, started: float) -> Any:
        status = route.https_redirect_status_code
        if status == 426:
            request.setHeader(b"Connection", b"Upgrade")
            request.setHeader(b"Upgrade", b"TLS/1.2, HTTP/1.1")
            return self.respond_error(request, 426, responses.USE_HTTPS,
                                      request_id=request_id, started=started)
        location = b"https://" + (host or "").encode("latin-1") + request.uri
        request.setHeader(b"Location", location)
        return self.respond_error(request, status, "Moved", request_id=request_id,
                                  started=started)

    def respond_error(self, request: Any, status: int, message: Optional[str], *,
                      request_id: Optional[str] = None, started: Optional[float] = None,
                      upstream_error: bool = False) -> Any:
        """Finish ``request`` with a Kong-produced error response."""
        if request.finished or request._disconnected:
            return server.NOT_DONE_YET
        settings = self.settings
        request_id = request_id or self._request_id()
        accept = request.requestHeaders.getRawHeaders(b"accept")
        accept_value = accept[0] if accept else None
        default = responses._JSON
        if upstream_error:
            # nginx-level errors: Accept, else the request's Content-Type, else
            # error_default_type (Kong's error handler).
            if accept_value is None:
                ctype = request.requestHeaders.getRawHeaders(b"content-type")
                accept_value = ctype[0] if ctype else None
            default = settings.error_default_type
        content_type, body = responses.render_error(status, message, request_id,
                                                    accept_value, default)
        request.setResponseCode(status, reason_phrase(status))
        headers = request.responseHeaders
        headers.removeHeader(b"server")
        if settings.server_header:
            headers.setRawHeaders(b"Server", [_SERVER_TOKEN])
        headers.setRawHeaders(b"Date", [_http_date()])
        headers.setRawHeaders(b"Content-Type", [content_type])
        headers.setRawHeaders(b"Content-Length", [b"%d" % (len(body),)])
        if settings.request_id:
            headers.setRawHeaders(b"X-Kong-Request-Id", [request_id.encode("ascii")])
        if settings.response_latency and started is not None:
            headers.setRawHeaders(b"X-Kong-Response-Latency",
                                  [_ms(time.monotonic() - started)])
        request.write(body)
        request.finish_response()
        return server.NOT_DONE_YET
