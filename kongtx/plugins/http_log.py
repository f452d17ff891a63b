"""The ``http-log`` plugin: Kong's JSON record of each request, sent in batches to
an HTTP endpoint.

Kong 3.10's configuration: ``http_endpoint`` (required URL; ``user:password@``
in it becomes ``Authorization: Basic``), ``method`` (``POST``, ``PUT`` or
``PATCH``), ``content_type`` (``application/json``), ``timeout`` (10000 ms),
``keepalive`` (60000 ms), ``headers`` (a map, sent with every batch),
``queue`` (Kong's queue record, see :mod:`kongtx.queue`) and
``custom_fields_by_lua`` (accepted, ignored: kongtx runs no Lua).

Records are queued in the log phase and sent by a :class:`kongtx.queue.Queue`
per plugin configuration: the body is the record when ``queue.max_batch_size``
is 1, else a JSON array of the batch's records (Kong's rule). A connection
error, a timeout or a status >= 400 is retried with exponential backoff until
``queue.max_retry_time``; the proxied request never waits for any of it.

The client is ``twisted.web.client.Agent`` with a persistent connection pool
(idle connections kept ``keepalive`` ms): this traffic is off the hot path, goes
to arbitrary URLs (http or https, with certificate checks) and needs no
streaming, so the upstream pool tuned for proxying brings nothing here.
"""

from __future__ import annotations

import base64
import time
from typing import Any, List, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from kongtx.logging import serializer
from kongtx.plugins.base import ALL_PROTOCOLS, BasePlugin
from kongtx.queue import Queue, QueueConfig
from kongtx.schema import typedefs as t

__all__ = ["HttpLogPlugin", "QUEUE_FIELD", "validate_url", "payload"]

ERR_URL_HOST = "missing host in url"
ERR_URL_SCHEME = "missing scheme in url"
ERR_STATUS = "request to %s:%d returned status code %d and body %s"


def validate_url(value: str) -> Optional[str]:
    """Kong's ``typedefs.url`` check."""
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        return "could not parse url. %s" % (exc,)
    if not parts.scheme:
        return ERR_URL_HOST if not parts.netloc else ERR_URL_SCHEME
    if not parts.hostname:
        return ERR_URL_HOST
    return None


#: Kong's ``queue`` record (``kong/tools/queue_schema.lua``).
QUEUE_FIELD = t.record([
    ("max_batch_size", t.integer(required=True, default=1, between=(1, 1000000))),
    ("max_coalescing_delay", t.number(required=True, default=1, between=(0, 3600))),
    ("max_entries", t.integer(required=True, default=10000, between=(1, 1000000))),
    ("max_bytes", t.integer()),
    ("max_retry_time", t.number(default=60)),
    ("initial_retry_delay", t.number(default=0.01, between=(0.001, 1000000))),
    ("max_retry_delay", t.number(default=60, between=(0.001, 1000000))),
    ("concurrency_limit", t.integer(default=1, one_of=(-1, 1))),
], required=True)


def payload(entries: List[str], max_batch_size: int) -> bytes:
    """The request body for a batch of JSON-encoded records."""
    if max_batch_size == 1:
        return entries[0].encode("utf-8")
    return ("[" + ",".join(entries) + "]").encode("utf-8")


@implementer(IBodyProducer)
class _Body:
    """A body written in one go (no cooperator, no global reactor)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred:
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class HttpLogPlugin(BasePlugin):
    NAME = "http-log"
    PRIORITY = 12
    VERSION = "3.10.0"
    PROTOCOLS = ALL_PROTOCOLS
    CONFIG = t.record([
        ("http_endpoint", t.string(required=True, custom=validate_url)),
        ("method", t.string(default="POST", one_of=("POST", "PUT", "PATCH"))),
        ("content_type", t.string(default="application/json",
                                  one_of=("application/json", "application/json; charset=utf-8"))),
        ("timeout", t.number(default=10000)),
        ("keepalive", t.number(default=60000)),
        ("retry_count", t.integer()),
        ("headers", t.map_of(t.header_name(), t.string(required=True))),
        ("queue", QUEUE_FIELD),
        ("custom_fields_by_lua", t.map_of(t.string(len_min=1), t.string(len_min=1))),
    ])

    #: Kong's deprecated shorthands (write-only): they set the queue's fields.
    CONFIG_SHORTHANDS = {
        "queue_size": ("queue", "max_batch_size"),
        "flush_timeout": ("queue", "max_coalescing_delay"),
    }

    #: Created with the first record (the reactor is the running one).
    _queue: Optional[Queue] = None

    def __init__(self, config: Any, reactor: Any = None) -> None:
        super().__init__(config)
        self._reactor = reactor
        self._agent: Any = None
        self._pool: Any = None
        self._log = Logger(namespace="kongtx.plugins.http-log")
        parts = urlsplit(config["http_endpoint"])
        self._auth: Optional[bytes] = None
        if parts.username is not None:
            userinfo = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
            self._auth = b"Basic " + base64.b64encode(userinfo.encode("utf-8"))
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = "[%s]" % (netloc,)
        if parts.port is not None:
            netloc += ":%d" % (parts.port,)
        self._url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._queue_config = QueueConfig.from_config(config.get("queue"))

    def queue(self) -> Queue:
        """This configuration's queue (created on first use)."""
        if self._queue is None:
            reactor = self._reactor
            if reactor is None:
                # The runtime edge: plugins are built without a reactor.
                from twisted.internet import reactor as global_reactor

                reactor = self._reactor = global_reactor
            keepalive = float(self.config.get("keepalive") or 60000) / 1000.0
            pool = HTTPConnectionPool(reactor, persistent=keepalive > 0)
            pool.cachedConnectionTimeout = keepalive
            pool.retryAutomatically = False
            self._pool = pool
            self._agent = Agent(reactor, pool=pool,
                                connectTimeout=self._timeout())
            self._queue = Queue(self.send, self._queue_config, reactor=reactor,
                                name="http-log " + self._url, log=self._log)
        return self._queue

    def _timeout(self) -> float:
        return float(self.config.get("timeout") or 10000) / 1000.0

    def header_filter(self, kong: Any) -> None:
        serializer.note_upstream(kong, time.monotonic())

    def log(self, kong: Any) -> None:
        self.queue().add(serializer.serialize_json(kong, now=time.monotonic(), wall=time.time()))

    async def _send(self, entries: List[str]) -> None:
        config = self.config
        body = payload(entries, self._queue_config.max_batch_size)
        headers = Headers()
        for name, value in (config.get("headers") or {}).items():
            if name.lower() in ("host", "content-length", "content-type"):
                continue
            headers.addRawHeader(name.encode("latin-1"), str(value).encode("latin-1"))
        headers.setRawHeaders(b"Content-Type",
                              [(config.get("content_type") or "application/json").encode("latin-1")])
        if self._auth is not None and not headers.hasHeader(b"authorization"):
            headers.setRawHeaders(b"Authorization", [self._auth])
        d = self._agent.request((config.get("method") or "POST").encode("ascii"),
                                self._url.encode("ascii"), headers, _Body(body))
        d.addTimeout(self._timeout(), self._reactor)
        response = await d
        reply = readBody(response)
        reply.addTimeout(self._timeout(), self._reactor)
        text = await reply
        if response.code >= 400:
            raise RuntimeError(ERR_STATUS % (self._host, self._port, response.code,
                                             text.decode("utf-8", "replace")))

    def send(self, entries: List[str]) -> defer.Deferred:
        """Send one batch; fires when the endpoint answered < 400, fails otherwise."""
        return defer.ensureDeferred(self._send(entries))

    def close(self) -> defer.Deferred:
        """Close the idle connections (tests; a configuration being dropped)."""
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()
