"""Unit tests of the PDK object (``kongtx.pdk.Kong``): its parts keep their own state,
and a request's objects form no reference cycle (they are freed by reference
counting, not by the cyclic garbage collector, whose full collections pause the
reactor)."""

from __future__ import annotations

import gc
import io
import platform
import weakref
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from twisted.web.http_headers import Headers

from kongtx.pdk import Kong


class FakeRequest:
    """What the PDK reads of a twisted.web request (weak-referenceable)."""

    def __init__(self) -> None:
        self.method = b"GET"
        self.uri = b"/x?a=1"
        self.path = b"/x"
        self.requestHeaders = Headers({b"Host": [b"example.com"], b"X-A": [b"1"]})
        self.responseHeaders = Headers()
        self.content = io.BytesIO(b"")
        self.stream = None
        self.code = 200


class FakePeer:
    remote = "10.0.0.1"
    trusted = False


INDEX = SimpleNamespace(routes={"r-1": {"id": "r-1"}}, services={"s-1": {"id": "s-1"}})


def make_kong(request: Any) -> Kong:
    return Kong(request, peer=FakePeer(), scheme="http", path="/x", request_id="req",
                index=INDEX, chain=SimpleNamespace(access=()), route_id="r-1",
                service_id="s-1", started=1.0)


def use_every_part(kong: Kong) -> None:
    """What plugins do with a Kong during a request."""
    assert kong.request.get_header("host") == "example.com"
    assert kong.request.get_query_arg("a") == "1"
    assert kong.client.get_forwarded_ip() == "10.0.0.1"
    kong.client.authenticate({"id": "c-1"}, {"id": "k-1"})
    kong.service.request.set_header("X-Consumer-ID", "c-1")
    kong.service.request.clear_header("X-Anonymous-Consumer")
    kong.service.request.set_raw_query("b=2")
    kong.response.set_header("X-Limit", 5)
    kong.ctx.shared["seen"] = {"by": [kong.request_id]}
    assert kong.router.get_route() == {"id": "r-1"}
    assert kong.router.get_service() == {"id": "s-1"}
    kong.apply_response_headers()
    kong.response.add_header("X-More", "yes")
    kong.response.exit(418, {"message": "teapot"})


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.skipif(platform.python_implementation() != "CPython",
                    reason="pins reference counting, which only CPython has: PyPy frees "
                           "everything through its (incremental) collector")
def test_a_used_kong_is_freed_without_the_cyclic_collector(no_cyclic_gc: None) -> None:
    """Every PDK part used, then the last reference dropped: the request (and all the
    Kong holds) is freed at once, with the cyclic garbage collector switched off."""
    request = FakeRequest()
    gone = weakref.ref(request)
    kong = make_kong(request)
    use_every_part(kong)
    del request, kong
    assert gone() is None
    assert gc.collect() == 0


def test_outcome_attributes_are_the_parts_state() -> None:
    """``kong.exited``, ``consumer``, ``credential``, ``consumer_changed`` and the
    upstream changes read (and set) what the parts hold."""
    kong = make_kong(FakeRequest())
    assert kong.exited is None and kong.consumer is None and not kong.consumer_changed
    kong.client.authenticate({"id": "c-1"}, {"id": "k-1"})
    assert kong.consumer == {"id": "c-1"} and kong.credential == {"id": "k-1"}
    assert kong.consumer_changed
    kong.consumer_changed = False
    assert not kong.client.changed
    kong.consumer = {"id": "c-2"}
    assert kong.client.get_consumer() == {"id": "c-2"}
    kong.service.request.set_header("X-A", 1)
    kong.service.request.clear_header("X-B")
    kong.service.request.set_path("/y")
    assert kong.upstream_headers == {b"x-a": (b"X-A", b"1"), b"x-b": None}
    assert kong.upstream_path == b"/y" and kong.upstream_query is None
    kong.response.exit(401, "no", {"WWW-Authenticate": "Key"})
    assert kong.exited == (401, "no", {"WWW-Authenticate": "Key"})


def test_response_header_changes_wait_for_the_response() -> None:
    """Before ``header_filter`` header changes are kept, then applied in order over the
    response's headers; after it they apply at once."""
    request = FakeRequest()
    request.responseHeaders.setRawHeaders(b"X-Up", [b"1"])
    kong = make_kong(request)
    kong.response.set_header("X-A", "1")
    kong.response.add_header("X-A", "2")
    kong.response.clear_header("X-Up")
    assert request.responseHeaders.getRawHeaders(b"x-a") is None
    kong.apply_response_headers()
    assert request.responseHeaders.getRawHeaders(b"x-a") == [b"1", b"2"]
    assert request.responseHeaders.getRawHeaders(b"x-up") is None
    kong.response.set_header("X-B", 3)
    assert kong.response.get_header("x-b") == "3"


def test_response_headers_are_kept_as_headers_would_keep_them() -> None:
    """Names in any case are one header under twisted.web's canonical name; a line
    break in a value becomes a space (no header injection); a name that is not a
    token is refused as ``Headers`` refuses it."""
    from twisted.web.http_headers import InvalidHeaderName

    request = FakeRequest()
    request.responseHeaders.setRawHeaders(b"X-Upstream-Thing", [b"u"])
    kong = make_kong(request)
    kong.apply_response_headers()
    kong.response.add_header("x-upstream-thing", "p")
    kong.response.set_header("x-ratelimit-limit-minute", 5)
    kong.response.add_header("X-Evil", "a\r\nSet-Cookie: b=c")
    kong.response.clear_header("X-UPSTREAM-THING")
    kong.response.add_header("x-upstream-thing", "again")
    assert list(request.responseHeaders.getAllRawHeaders()) == [
        (b"X-Ratelimit-Limit-Minute", [b"5"]),
        (b"X-Evil", [b"a Set-Cookie: b=c"]),
        (b"X-Upstream-Thing", [b"again"]),
    ]
    with pytest.raises(InvalidHeaderName):
        kong.response.set_header("Bad Name", "x")


def test_ctx_and_router_are_per_request() -> None:
    """``kong.ctx.shared`` is one dict per request; ``kong.router`` gives the rows."""
    first, second = make_kong(FakeRequest()), make_kong(FakeRequest())
    first.ctx.shared["k"] = 1
    assert first.ctx is first.ctx and first.ctx.shared == {"k": 1}
    assert second.ctx.shared == {}
    assert first.router.get_route() == {"id": "r-1"}
