"""Kong's JSON log record (``kong.log.serialize()``) for one proxied request.

The logging plugins (syslog, file-log, http-log) call :func:`note_upstream` in
their ``header_filter`` phase (the moment the upstream's response headers are
known: what was sent upstream, when, and how many tries it took) and
:func:`serialize_json` in their ``log`` phase. The record has Kong's shape::

    {"request": {"id", "uri", "url", "querystring", "method", "headers", "size", "tls"},
     "upstream_uri", "upstream_status",
     "response": {"status", "headers", "size"},
     "latencies": {"kong", "proxy", "request", "receive"},
     "tries": [...], "authenticated_entity", "route", "service", "consumer",
     "client_ip", "started_at", "source"}

Keys Kong leaves out when they are ``nil`` are left out here too
(``upstream_status`` when nothing was proxied, ``authenticated_entity`` and
``consumer`` when nobody authenticated, ``request.tls`` over plain HTTP).

Never logged: the values of ``Authorization`` and ``Proxy-Authorization``
(``"REDACTED"``, as Kong), and, beyond Kong, the API key of a key-auth plugin
that ran on the request: its ``key_names`` are redacted in the request headers,
the query string and the ``uri``/``url``.

Sizes are computed from what twisted.web holds: ``request.size`` is the request
line, headers and body; ``response.size`` the status line, the headers kongtx
set and the body bytes written (Twisted may add framing headers of its own).

:func:`serialize_json` writes the record's compact JSON text directly (what the
logging plugins send; the route, service and consumer rows, the same for every
request on a route, are encoded once per row and spliced in); :func:`serialize` is
its value as a dict, and :func:`encode` the text of such a dict.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple
from urllib.parse import unquote_plus

__all__ = ["REDACTED", "note_upstream", "serialize", "serialize_json", "key_names", "encode"]

REDACTED = "REDACTED"
_REDACTED_JSON = '"REDACTED"'

#: Pieces of the record's JSON text.
_LATENCIES = '{"kong":%d,"proxy":%d,"request":%d,"receive":%d}'
_TRY = '{"ip":%s,"port":%d,"balancer_start":%d,"balancer_latency":0'
_FAILED = ',"state":"failed"}'

#: Request headers whose values are never logged (Kong's list).
_SECRET_HEADERS = frozenset(("authorization", "proxy-authorization"))

#: Where :func:`note_upstream` keeps its facts in ``kong.ctx.shared``.
_UPSTREAM_KEY = "kongtx.log.upstream"


def note_upstream(kong: Any, now: float) -> None:
    """Record the upstream exchange of *kong*'s request, if it was proxied.

    Call it from ``header_filter`` with ``time.monotonic()``: for a proxied
    request the response headers have just come from the upstream. Several
    plugins may call it; the first call wins. A response that did not come
    from an upstream (``kong.response.exit``) records nothing.
    """
    shared = kong.ctx.shared
    if _UPSTREAM_KEY in shared:
        return
    exchange = getattr(kong._request, "exchange", None)
    if exchange is None or kong.exited is not None:
        return
    service = exchange.service
    args = exchange.args
    shared[_UPSTREAM_KEY] = {
        "started": exchange.started,
        "sent_at": exchange.sent_at,
        "headers_at": now,
        "tries": exchange.tries,
        "ip": service.host,
        "port": service.port,
        "target": args.get("target", b"").decode("latin-1"),
        "status": kong._request.code,
    }


_NO_NAMES: FrozenSet[str] = frozenset()


def key_names(kong: Any) -> FrozenSet[str]:
    """The key-auth ``key_names`` of the key-auth plugin in *kong*'s chain (lower-case)."""
    chain = kong.chain
    for config in getattr(chain, "access", ()) or ():
        if config.name == "key-auth":
            handler = config.handler
            names = getattr(handler, "redacted_names", None)
            if names is None:
                names = frozenset(n.lower() for n in handler.config.get("key_names") or ())
            return names
    return _NO_NAMES


def _redact_query(raw: str, secret: FrozenSet[str]) -> str:
    if not secret or not raw:
        return raw
    parts = raw.split("&")
    for i, part in enumerate(parts):
        name, eq, _ = part.partition("=")
        if eq and unquote_plus(name).lower() in secret:
            parts[i] = name + "=" + REDACTED
    return "&".join(parts)


def _redact_uri(target: str, secret: FrozenSet[str]) -> str:
    path, qmark, raw = target.partition("?")
    return path + qmark + _redact_query(raw, secret) if qmark else target


def _ms(seconds: float) -> int:
    return max(0, int(round(seconds * 1000)))


def _tls(request: Any) -> Optional[Dict[str, Any]]:
    if not request.isSecure():
        return None
    info: Dict[str, Any] = {"version": None, "cipher": None, "client_verify": "NONE"}
    try:
        handle = request.channel.transport.getHandle()
        info["version"] = handle.get_protocol_version_name()
        info["cipher"] = handle.get_cipher_name()
    except Exception:  # not a pyOpenSSL connection: keep what we know
        pass
    return info


def _body_size(request: Any) -> int:
    stream = getattr(request, "stream", None)
    if stream is not None:
        return stream.length or 0
    content = request.content
    if content is None:
        return 0
    position = content.tell()
    content.seek(0, 2)
    size = content.tell()
    content.seek(position, 0)
    return size


#: By raw header name: the name as logged (decoded, lower-case), its JSON object
#: key, the ``"key":"value"`` texts of the values seen first (None for a name
#: always redacted) and the bytes of ``name: \r\n`` on the wire. Most requests
#: carry the same few names, most of them with the same few values.
_NAMES: Dict[bytes, Tuple[str, str, Optional[Dict[bytes, str]], int]] = {}
_MAX_NAMES = 1000
#: Values remembered per name (a request id or a date is new each time: the
#: first ones fill the slots and the rest are encoded as they come).
_MAX_VALUES = 32


def _headers_json(pairs: Any, secret: FrozenSet[str] = _NO_NAMES) -> Tuple[str, int]:
    """The logged headers as a JSON object (names lower-case, values decoded, a
    list when repeated, secrets redacted) and the bytes they took on the wire
    (``name: value\r\n`` each). *pairs* come from twisted.web's ``Headers``,
    which holds each name once."""
    out = []
    size = 0
    names = _NAMES
    for raw_name, raw_values in pairs:
        entry = names.get(raw_name)
        if entry is None:
            if len(names) >= _MAX_NAMES:
                names.clear()
            name = raw_name.decode("latin-1").lower()
            entry = names[raw_name] = (
                name, _quote(name) + ":", None if name in _SECRET_HEADERS else {},
                len(raw_name) + 4)
        name, key, texts, n = entry
        if len(raw_values) == 1:
            value = raw_values[0]
            size += n + len(value)
            if texts is None or (secret and name in secret):
                out.append(key + _REDACTED_JSON)
                continue
            text = texts.get(value)
            if text is None:
                text = key + _quote(value.decode("latin-1"))
                if len(texts) < _MAX_VALUES:
                    texts[value] = text
            out.append(text)
            continue
        for value in raw_values:
            size += n + len(value)
        if texts is None or (secret and name in secret):
            out.append(key + _REDACTED_JSON)
        else:
            out.append(key + "[%s]" % ",".join([_quote(v.decode("latin-1")) for v in raw_values]))
    return "{%s}" % ",".join(out), size


def _querystring(raw: str, secret: FrozenSet[str]) -> Dict[str, Any]:
    """Kong's ``get_query()``: ``?a`` is ``true``, a repeated name a list."""
    found: Dict[str, List[Any]] = {}
    if raw:
        for part in raw.split("&"):
            if not part:
                continue
            name, eq, value = part.partition("=")
            key = unquote_plus(name)
            if key.lower() in secret:
                found.setdefault(key, []).append(REDACTED)
                continue
            found.setdefault(key, []).append(unquote_plus(value) if eq else True)
    return {k: (v[0] if len(v) == 1 else v) for k, v in found.items()}


def _authenticated_entity(credential: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    if credential is None:
        return None
    consumer = credential.get("consumer")
    consumer_id = consumer.get("id") if isinstance(consumer, Mapping) else consumer
    entity: Dict[str, Any] = {"id": credential.get("id")}
    if consumer_id is not None:
        entity["consumer_id"] = consumer_id
    return entity


def serialize_json(kong: Any, *, now: float, wall: float) -> str:
    """Kong's log record of *kong*'s finished request, as compact JSON text.

    The text is written piece by piece rather than built as a dict and encoded
    (the logging plugins' hot path); :func:`serialize` is its parsed value.
    The route, service and consumer rows are encoded once per row object.

    :param now: ``time.monotonic()`` in the log phase (the response is finished).
    :param wall: ``time.time()`` at the same instant (for ``started_at``).
    """
    request = kong._request
    secret = key_names(kong)
    uri = request.uri.decode("latin-1")
    raw_query = uri.partition("?")[2]
    if secret and raw_query:
        uri = _redact_uri(uri, secret)
    host = kong.request.get_header("host") or ""
    if not host:
        address = request.getHost()
        host = "%s:%d" % (address.host, address.port)
    elif ":" not in host.rsplit("]", 1)[-1]:
        host = "%s:%d" % (host, request.getHost().port)
    started = kong.started
    upstream = kong.ctx.shared.get(_UPSTREAM_KEY)
    total = now - started
    if upstream is not None:
        started = upstream["started"]
        total = now - started
        receive = now - upstream["headers_at"]
        before = upstream["sent_at"] - started
        latencies = _LATENCIES % (_ms(before) + _ms(receive),
                                  _ms(upstream["headers_at"] - upstream["sent_at"]),
                                  _ms(total), _ms(receive))
        started_ms = int((wall - total) * 1000)
        attempt = _TRY % (_quote(upstream["ip"]), upstream["port"], started_ms + _ms(before))
        count = upstream["tries"]
        tries = "[%s]" % ",".join(
            [attempt + _FAILED] * (count - 1) + [attempt + "}"]) if count else "[]"
        source = '"service"'
    else:
        latencies = _LATENCIES % (_ms(total), -1, _ms(total), 0)
        started_ms = int((wall - total) * 1000)
        tries = "[]"
        source = '"exit"' if kong.exited is not None else '"error"'
    request_headers, request_size = _headers_json(
        request.requestHeaders.getAllRawHeaders(), secret)
    response_headers, response_size = _headers_json(
        request.responseHeaders.getAllRawHeaders(), _NO_NAMES)
    method = request.method
    client_ip = kong.client.get_forwarded_ip()
    parts = [
        '{"request":{"id":', _quote(kong.request_id),
        ',"uri":', _quote(uri),
        ',"url":', _quote("%s://%s%s" % (kong.scheme, host, uri)),
        ',"querystring":',
        _ENCODER.encode(_querystring(raw_query, secret)) if raw_query else "{}",
        ',"method":', _quote(method.decode("ascii")),
        ',"headers":', request_headers,
        ',"size":', str(len(method) + len(request.uri) + len(request.clientproto or b"") + 6
                        + request_size + _body_size(request)),
    ]
    tls = _tls(request)
    if tls is not None:
        parts += (',"tls":', _ENCODER.encode(tls))
    parts += (
        '},"upstream_uri":',
        _quote(_redact_uri(upstream["target"], secret)) if upstream is not None else '""',
        ',"response":{"status":', str(request.code),
        ',"headers":', response_headers,
        ',"size":', str(9 + 3 + 1 + len(request.code_message or b"") + 2 + response_size + 2
                        + request.sentLength),
        '},"latencies":', latencies,
        ',"tries":', tries,
        ',"client_ip":', "null" if client_ip is None else _quote(client_ip),
        ',"started_at":', str(started_ms),
        ',"source":', source,
    )
    if upstream is not None:
        parts += (',"upstream_status":"', str(upstream["status"]), '"')
    credential = kong.credential
    if credential is not None:
        parts += (',"authenticated_entity":', _cached_json(credential, _ENTITIES, _entity_json))
    consumer = kong.consumer
    if consumer is not None:
        parts += (',"consumer":', _row_json(consumer))
    parts += (',"route":', _row_json(kong.router.get_route()),
              ',"service":', _row_json(kong.router.get_service()), "}")
    return "".join(parts)


def serialize(kong: Any, *, now: float, wall: float) -> Dict[str, Any]:
    """Kong's log record of *kong*'s finished request, as a dict (the value of
    :func:`serialize_json`'s text), for a plugin that changes it before
    writing it out (:func:`encode` gives its text again)."""
    record: Dict[str, Any] = json.loads(serialize_json(kong, now=now, wall=wall))
    return record


# -- JSON text ------------------------------------------------------------------------

#: No circular-reference bookkeeping: a record is a tree :func:`serialize` builds
#: (a cycle a plugin put in would fail with RecursionError instead of ValueError,
#: and the log phase reports either). It saves ~0.9 us a record on PyPy.
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"), check_circular=False)

#: Rows' JSON text by ``id(row)``, holding the row (so its id is not reused while
#: cached). Rows come from the immutable configuration snapshot; a new
#: configuration brings new rows, and the cache starts over when it is full.
_ROWS: Dict[int, Tuple[Any, str]] = {}
#: The same for credentials' ``authenticated_entity`` (credentials come from the
#: entity cache, one row object per credential until it changes).
_ENTITIES: Dict[int, Tuple[Any, str]] = {}
_MAX_ROWS = 1000


def _cached_json(row: Any, cache: Dict[int, Tuple[Any, str]], encode: Any) -> str:
    found = cache.get(id(row))
    if found is not None and found[0] is row:
        return found[1]
    if len(cache) >= _MAX_ROWS:
        cache.clear()
    text: str = encode(row)
    cache[id(row)] = (row, text)
    return text


def _row_json(row: Any) -> str:
    return "null" if row is None else _cached_json(row, _ROWS, _ENCODER.encode)


def _entity_json(credential: Mapping[str, Any]) -> str:
    return _ENCODER.encode(_authenticated_entity(credential))


def encode(record: Mapping[str, Any]) -> str:
    """The compact JSON text of a :func:`serialize` record (``str()`` for values
    JSON cannot hold). Same value as ``json.dumps(record, default=str)``; the
    ``route`` and ``service`` rows are encoded once per row, not per request."""
    if "route" not in record or "service" not in record:
        return _ENCODER.encode(record)
    rest = {k: v for k, v in record.items() if k != "route" and k != "service"}
    head = _ENCODER.encode(rest)
    return "%s%s\"route\":%s,\"service\":%s}" % (
        head[:-1], "," if len(head) > 2 else "", _row_json(record["route"]),
        _row_json(record["service"]))
