"""A real Admin API on 127.0.0.1:0 and a small HTTP client for the tests."""

from __future__ import annotations

import io
import json
import uuid
import warnings
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlencode

from twisted.internet import defer, protocol
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from kongtx.admin import AdminResource, make_site
from kongtx.schema import store_metas
from kongtx.store.memory import MemoryStore

CONTENT_TYPES = ("application/json", "application/x-www-form-urlencoded", "multipart/form-data")
NODE_ID = "3a9b5c1e-2f4d-4e6a-8b7c-9d0e1f2a3b4c"
BOUNDARY = "kongtx-test-boundary"


class Reply:
    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = body

    @property
    def json(self) -> Any:
        return json.loads(self.raw.decode("utf-8"))

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


def flatten(value: Any, prefix: str = "") -> List[Tuple[str, str]]:
    """Form pairs in Kong's key syntax: arrays as ``k[]``, records as ``k.sub``."""
    pairs: List[Tuple[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            pairs.extend(flatten(item, "%s.%s" % (prefix, key) if prefix else key))
    elif isinstance(value, list):
        for item in value:
            pairs.extend(flatten(item, prefix + "[]"))
    elif value is None:
        pairs.append((prefix, ""))
    elif value is True or value is False:
        pairs.append((prefix, "true" if value else "false"))
    else:
        pairs.append((prefix, str(value)))
    return pairs


def encode(body: Any, content_type: str) -> Tuple[bytes, str]:
    if content_type == "application/json":
        return json.dumps(body).encode("utf-8"), content_type
    pairs = flatten(body)
    if content_type == "application/x-www-form-urlencoded":
        return urlencode(pairs).encode("ascii"), content_type
    chunks = []
    for name, value in pairs:
        chunks.append(
            "--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n"
            % (BOUNDARY, name, value)
        )
    chunks.append("--%s--\r\n" % BOUNDARY)
    return "".join(chunks).encode("utf-8"), "multipart/form-data; boundary=%s" % BOUNDARY


class AdminServer:
    """An ``AdminResource`` on a real ``Site`` listening on 127.0.0.1:0."""

    def __init__(self, reactor: Any, store: Any = None, **kwargs: Any) -> None:
        self.reactor = reactor
        self.store = store if store is not None else MemoryStore(store_metas())
        options: Dict[str, Any] = dict(
            reactor=reactor,
            node_id=NODE_ID,
            hostname="test-host",
            configuration={"admin_listen": ["127.0.0.1:8001"], "pg_password": "******"},
            max_body_size=1024 * 1024,
            server_stats=lambda: {"total_requests": 1, "connections_active": 1},
            version="0.1.0",
            kong_version="3.10.0",
            plugins_available={"key-auth": {"version": "3.10.0", "priority": 1250}},
        )
        options.update(kwargs)
        self.resource = AdminResource(self.store, **options)
        self.site = make_site(self.resource)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.base = "http://127.0.0.1:%d" % self.port.getHost().port
        self.agent = Agent(reactor)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: Optional[str] = "application/json",
        headers: Optional[Dict[str, List[str]]] = None,
        raw: Optional[bytes] = None,
    ) -> Reply:
        sent_headers = Headers({k: v for k, v in (headers or {}).items()})
        payload: Optional[bytes] = raw
        if body is not None and raw is None:
            payload, ctype = encode(body, content_type or "application/json")
            sent_headers.setRawHeaders("content-type", [ctype])
        elif content_type is not None and raw is not None and not sent_headers.hasHeader("content-type"):
            sent_headers.setRawHeaders("content-type", [content_type])
        producer = FileBodyProducer(io.BytesIO(payload)) if payload is not None else None
        response = await self.agent.request(
            method.encode("ascii"), (self.base + path).encode("utf-8"), sent_headers, producer
        )
        with warnings.catch_warnings():
            # Agent's response transport lacks abortConnection; irrelevant here
            warnings.simplefilter("ignore", DeprecationWarning)
            reading = readBody(response)
        data = await reading
        return Reply(response.code, response.headers, data)

    async def close(self) -> None:
        await defer.maybeDeferred(self.port.stopListening)


async def raw_request(reactor: Any, port: int, data: bytes) -> bytes:
    """Send raw bytes on a new connection; fires with everything read until close."""
    done: defer.Deferred[bytes] = defer.Deferred()

    class Raw(protocol.Protocol):
        def connectionMade(self) -> None:
            self.buf = b""
            self.transport.write(data)

        def dataReceived(self, chunk: bytes) -> None:
            self.buf += chunk
            if b"\r\n\r\n" in self.buf:
                head, _, rest = self.buf.partition(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        if len(rest) >= int(line.split(b":")[1]):
                            self.transport.loseConnection()

        def connectionLost(self, reason: Any) -> None:
            done.callback(self.buf)

    factory = protocol.ClientFactory.forProtocol(Raw)
    reactor.connectTCP("127.0.0.1", port, factory)
    return await done


def new_uuid() -> str:
    return str(uuid.uuid4())
