"""Real-socket helpers for integration tests: an echo upstream and a small HTTP client."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlencode

from twisted.internet import defer, protocol
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


class EchoResource(resource.Resource):
    """Answers every request with a JSON description of what it received.

    ``/status/<code>`` answers that status; ``/delay/<seconds>`` never answers before
    that many seconds; ``/bytes/<n>`` answers n bytes.
    """

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        resource.Resource.__init__(self)
        self.reactor = reactor
        self.requests: List[Dict[str, Any]] = []

    def render(self, request: server.Request) -> Any:
        body = request.content.read()
        seen = {
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": {
                k.decode().lower(): [v.decode("latin-1") for v in vs]
                for k, vs in request.requestHeaders.getAllRawHeaders()
            },
            "body": body.decode("latin-1"),
        }
        parts = request.path.split(b"/")
        if len(parts) >= 2 and parts[1] == b"count":
            # Only the size and digest of the body (large uploads).
            import hashlib

            request.setHeader(b"content-type", b"application/json")
            return json.dumps({
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "headers": seen["headers"],
            }).encode()
        self.requests.append(seen)
        if len(parts) >= 3 and parts[1] == b"status":
            request.setResponseCode(int(parts[2]))
        if len(parts) >= 3 and parts[1] == b"bytes":
            n = int(parts[2])
            request.setHeader(b"content-type", b"application/octet-stream")
            return b"x" * n
        if len(parts) >= 3 and parts[1] == b"delay":
            delay = float(parts[2])

            def later() -> None:
                if not request._disconnected:
                    request.write(json.dumps(seen).encode())
                    request.finish()

            call = self.reactor.callLater(delay, later)
            request.notifyFinish().addBoth(lambda _: call.active() and call.cancel())
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"server", b"echo-upstream")
        return json.dumps(seen).encode()


@implementer(IBodyProducer)
class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred:
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Response:
    """What a test needs of a response: status, headers (lower-case names), body."""

    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode("latin-1") if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A tiny HTTP client on twisted.web's Agent (fresh connections each time)."""

    def __init__(self, reactor: Any) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    async def request(self, method: str, url: str, *, body: Optional[bytes] = None,
                      headers: Optional[Dict[str, str]] = None, form: Optional[Any] = None,
                      json_body: Any = None) -> Response:
        hdrs = Headers()
        for k, v in (headers or {}).items():
            hdrs.addRawHeader(k.encode(), v.encode())
        if form is not None:
            body = urlencode(form, doseq=True).encode()
            hdrs.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs.setRawHeaders(b"content-type", [b"application/json"])
        producer = _Bytes(body) if body is not None else None
        response = await self.agent.request(method.encode(), url.encode(), hdrs, producer)
        data = await readBody(response)
        return Response(response.code, response.headers, data)


class RawClient(protocol.Protocol):
    """Sends raw bytes, collects everything until the server closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.received)


async def raw_exchange(reactor: Any, host: str, port: int, payload: bytes,
                       timeout: float = 5.0) -> bytes:
    """Send ``payload`` on a fresh connection and return all bytes until close."""
    proto = RawClient(payload)
    creator = protocol.ClientCreator(reactor, lambda: proto)
    await creator.connectTCP(host, port)
    timer = reactor.callLater(timeout, proto.transport.loseConnection)
    data = await proto.done
    if timer.active():
        timer.cancel()
    return data


def split_response(raw: bytes) -> Tuple[str, Dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body
