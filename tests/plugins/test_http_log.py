"""Unit tests of the batching queue (``kongtx.queue``, on ``task.Clock``) and of the
http-log plugin's pure parts: schema defaults, URL checks, payloads."""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
from twisted.internet import defer, task

from kongtx.plugins.http_log import HttpLogPlugin, payload, validate_url
from kongtx.queue import Queue, QueueConfig
from kongtx.schema import typedefs as t


class Endpoint:
    """A handler whose answers the test controls: each call gets a Deferred."""

    def __init__(self) -> None:
        self.calls: List[List[Any]] = []
        self.pending: List[defer.Deferred] = []

    def __call__(self, batch: List[Any]) -> defer.Deferred:
        self.calls.append(list(batch))
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d

    def succeed(self) -> None:
        self.pending.pop(0).callback(None)

    def fail(self) -> None:
        self.pending.pop(0).errback(RuntimeError("returned status code 500"))


def _queue(endpoint: Any, clock: task.Clock, **conf: Any) -> Queue:
    return Queue(endpoint, QueueConfig(**conf), reactor=clock, name="test")


# -- the queue ---------------------------------------------------------------------------


def test_batch_of_one_is_sent_on_the_next_turn() -> None:
    """With the defaults (batch size 1), an entry is sent without waiting for the
    coalescing delay; the next waits for the first to finish (concurrency 1)."""
    clock, endpoint = task.Clock(), Endpoint()
    queue = _queue(endpoint, clock)
    queue.add("a")
    queue.add("b")
    clock.advance(0)
    assert endpoint.calls == [["a"]]
    endpoint.succeed()
    clock.advance(0)
    assert endpoint.calls == [["a"], ["b"]]


def test_coalescing_waits_for_a_full_batch_or_the_delay() -> None:
    """A partial batch leaves after ``max_coalescing_delay`` since its first entry; a
    full batch leaves at once."""
    clock, endpoint = task.Clock(), Endpoint()
    queue = _queue(endpoint, clock, max_batch_size=3, max_coalescing_delay=1)
    queue.add("a")
    clock.advance(0.5)
    queue.add("b")
    clock.advance(0.4)
    assert endpoint.calls == []
    clock.advance(0.1)
    assert endpoint.calls == [["a", "b"]]
    endpoint.succeed()
    for entry in "cde":
        queue.add(entry)
    clock.advance(0)
    assert endpoint.calls[-1] == ["c", "d", "e"]


def test_retries_back_off_exponentially_then_give_up() -> None:
    """A failed batch is retried after 0.01, 0.02, 0.04... seconds (capped by
    ``max_retry_delay``) and dropped once ``max_retry_time`` would be exceeded."""
    clock, endpoint = task.Clock(), Endpoint()
    queue = _queue(endpoint, clock, initial_retry_delay=1, max_retry_delay=4,
                   max_retry_time=10)
    queue.add("a")
    clock.advance(0)
    times = []
    while endpoint.pending:
        times.append(clock.seconds())
        endpoint.fail()
        clock.advance(0.5)
        clock.advance(0.5)
        for _ in range(8):
            if endpoint.pending:
                break
            clock.advance(0.5)
    assert times == [0, 1, 3, 7]
    assert queue.dropped == 1
    assert queue.in_flight == 0


def test_retry_then_success_keeps_order() -> None:
    """While a batch is being retried the next one waits (concurrency 1), then goes."""
    clock, endpoint = task.Clock(), Endpoint()
    queue = _queue(endpoint, clock, initial_retry_delay=0.01)
    queue.add("a")
    queue.add("b")
    clock.advance(0)
    endpoint.fail()
    clock.advance(0.01)
    assert endpoint.calls == [["a"], ["a"]]
    endpoint.succeed()
    clock.advance(0)
    assert endpoint.calls == [["a"], ["a"], ["b"]]
    assert queue.dropped == 0


def test_full_queue_drops_oldest_and_logs_once() -> None:
    """With ``max_entries`` waiting, new entries push out the oldest; the warning is
    logged once per episode."""
    clock, endpoint = task.Clock(), Endpoint()
    queue = _queue(endpoint, clock, max_entries=2, max_batch_size=10,
                   max_coalescing_delay=5)
    logged: List[Any] = []
    queue._log.observer = logged.append  # type: ignore[assignment]
    for entry in "abcd":
        queue.add(entry)
    assert queue.pending == 2 and queue.dropped == 2
    assert len([e for e in logged if "queue full" in e["log_format"]]) == 1
    clock.advance(5)
    assert endpoint.calls == [["c", "d"]]


def test_max_bytes_bounds_the_waiting_entries() -> None:
    """``max_bytes`` drops the oldest entries until the new one fits."""
    clock, endpoint = task.Clock(), Endpoint()
    queue = _queue(endpoint, clock, max_bytes=6, max_batch_size=10, max_coalescing_delay=1)
    for entry in ("aaa", "bbb", "cc"):
        queue.add(entry)
    clock.advance(1)
    assert endpoint.calls == [["bbb", "cc"]]


def test_unlimited_concurrency_sends_batches_in_parallel() -> None:
    """``concurrency_limit = -1``: batches do not wait for each other."""
    clock, endpoint = task.Clock(), Endpoint()
    queue = _queue(endpoint, clock, concurrency_limit=-1)
    for entry in "abc":
        queue.add(entry)
    clock.advance(0)
    assert endpoint.calls == [["a"], ["b"], ["c"]]
    assert queue.in_flight == 3


def test_handler_raising_is_a_failure() -> None:
    """A handler that raises is retried like a failed Deferred; add() never raises."""
    clock = task.Clock()
    calls: List[Any] = []

    def handler(batch: List[Any]) -> None:
        calls.append(batch)
        raise ValueError("boom")

    queue = _queue(handler, clock, initial_retry_delay=1, max_retry_time=1.5)
    queue.add("a")
    clock.advance(0)
    clock.advance(1)
    clock.advance(2)
    assert len(calls) == 2
    assert queue.dropped == 1


# -- http-log ---------------------------------------------------------------------------


def _defaults(field: t.Field) -> Any:
    out = {}
    for name, sub in field.fields:
        if sub.type == "record":
            out[name] = _defaults(sub)
        else:
            out[name] = sub.default if sub.has_default else None
    return out


def test_config_defaults_are_kongs() -> None:
    """Kong 3.10's http-log fields and defaults, and its priority."""
    defaults = _defaults(HttpLogPlugin.CONFIG)
    assert defaults["method"] == "POST"
    assert defaults["content_type"] == "application/json"
    assert defaults["timeout"] == 10000 and defaults["keepalive"] == 60000
    assert defaults["queue"] == {
        "max_batch_size": 1, "max_coalescing_delay": 1, "max_entries": 10000,
        "max_bytes": None, "max_retry_time": 60, "initial_retry_delay": 0.01,
        "max_retry_delay": 60, "concurrency_limit": 1}
    assert QueueConfig.from_config(defaults["queue"]) == QueueConfig()
    assert (HttpLogPlugin.NAME, HttpLogPlugin.PRIORITY) == ("http-log", 12)


@pytest.mark.parametrize("config,errors", [
    ({}, {"http_endpoint": "required field missing"}),
    ({"http_endpoint": "http://"}, {"http_endpoint": "missing host in url"}),
    ({"http_endpoint": "http://h/p", "method": "GET"},
     {"method": "expected one of: POST, PUT, PATCH"}),
    ({"http_endpoint": "https://h:8443/p", "method": "PATCH"}, {}),
])
def test_config_validation(config: Any, errors: Any) -> None:
    """The endpoint is a required URL with a host; the method is POST, PUT or PATCH."""
    # the entity layer fills the queue record's defaults before validating
    config = dict(config, queue=_defaults(HttpLogPlugin.CONFIG)["queue"])
    assert t.validate_record(HttpLogPlugin.CONFIG, config) == errors


@pytest.mark.parametrize("url,error", [
    ("http://127.0.0.1:9/logs", None),
    ("https://user:pw@logs.example.com/x", None),
    ("logs.example.com", "missing host in url"),
    ("http://", "missing host in url"),
])
def test_validate_url(url: str, error: Optional[str]) -> None:
    """Kong's ``typedefs.url`` messages."""
    assert validate_url(url) == error


@pytest.mark.parametrize("entries,size,body", [
    (['{"a":1}'], 1, b'{"a":1}'),
    (['{"a":1}'], 5, b'[{"a":1}]'),
    (['{"a":1}', '{"b":2}'], 5, b'[{"a":1},{"b":2}]'),
])
def test_payload(entries: List[str], size: int, body: bytes) -> None:
    """Batch size 1 sends the record; a larger batch size sends a JSON array."""
    assert payload(entries, size) == body
