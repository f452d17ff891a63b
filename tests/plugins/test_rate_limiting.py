"""Unit tests of the rate-limiting plugin: its schema, the local and cluster policies,
headers and blocking, limit_by and fault_tolerant, on an in-memory request and a
pinned clock (task.Clock)."""

from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.web.http_headers import Headers

from kongtx.errors import SchemaViolation
from kongtx.pdk import Kong, Node
from kongtx.pipeline import Chain, PluginConfig
from kongtx.plugins import rate_limiting
from kongtx.plugins.rate_limiting import RateLimitingPlugin, policies
from kongtx.schema import ENTITIES, store_metas
from kongtx.schema.plugins import with_plugins
from kongtx.store.interface import StoreUnavailable
from kongtx.store.memory import MemoryStore

PLUGINS = with_plugins(ENTITIES["plugins"], {"rate-limiting": RateLimitingPlugin})
NOON = 1717243200.0  # 2024-06-01 12:00:00 UTC
NODE = "rl-unit-node"


def validated(config: Dict[str, Any]) -> Dict[str, Any]:
    row = PLUGINS.validate_insert({"name": "rate-limiting", "config": config}, now=1,
                                  new_id="00000000-0000-4000-8000-000000000001")
    return row["config"]


def config_errors(config: Dict[str, Any]) -> Any:
    with pytest.raises(SchemaViolation) as info:
        validated(config)
    return info.value.fields.get("config")


class FakeRequest:
    def __init__(self, path: str = "/", headers: Any = ()) -> None:
        self.method = b"GET"
        self.uri = path.encode()
        self.path = path.encode()
        self.requestHeaders = Headers()
        for name, value in headers:
            self.requestHeaders.addRawHeader(name.encode(), value.encode())
        self.responseHeaders = Headers()
        self.content = io.BytesIO(b"")
        self.stream = None
        self.code = 200


class FakePeer:
    def __init__(self, ip: str) -> None:
        self.remote = ip
        self.trusted = False


class FakeIndex:
    routes: Dict[str, Any] = {}
    services = {"svc": {"id": "svc"}}


def make_kong(plugin: RateLimitingPlugin, *, ip: str = "10.0.0.1", path: str = "/",
              headers: Any = (), consumer: Optional[Dict[str, Any]] = None) -> Kong:
    config = PluginConfig(id="p", name="rate-limiting", route_id=None, service_id="svc",
                          consumer_id=None, protocols=frozenset(["http"]), priority=910,
                          handler=plugin, row={}, logger=None)  # type: ignore[arg-type]
    kong = Kong(FakeRequest(path, headers), peer=FakePeer(ip), scheme="http", path=path,
                request_id="r", index=FakeIndex(), chain=Chain.of((config,)), route_id="rt",
                service_id="svc", node=Node(NODE))
    if consumer is not None:
        kong.consumer = consumer
    return kong


@pytest.fixture
def clock() -> Any:
    clock = task.Clock()
    clock.advance(NOON)
    return clock


@pytest.fixture
def runtime(clock: Any) -> Any:
    runtime = rate_limiting.install(NODE, clock, MemoryStore(store_metas()))
    yield runtime
    rate_limiting.uninstall(NODE)


async def call(plugin: RateLimitingPlugin, **kw: Any) -> Tuple[Kong, Dict[str, str]]:
    """Runs access (and applies header changes); returns the Kong and the response headers."""
    kong = make_kong(plugin, **kw)
    result = plugin.access(kong)
    if isinstance(result, defer.Deferred):
        await result
    kong.apply_response_headers()
    headers = {k: v for k, v in kong.response.get_headers().items()}
    return kong, headers  # type: ignore[return-value]


# -- schema ------------------------------------------------------------------------------


def test_schema_defaults_are_kongs() -> None:
    """Only a limit given: every other field takes Kong's default."""
    config = validated({"minute": 5})
    assert config["minute"] == 5 and config["hour"] is None
    assert config["limit_by"] == "consumer"
    assert config["policy"] == "local"
    assert config["fault_tolerant"] is True
    assert config["hide_client_headers"] is False
    assert config["error_code"] == 429
    assert config["error_message"] == "API rate limit exceeded"
    assert config["sync_rate"] == -1
    assert config["redis"]["port"] == 6379 and config["redis"]["timeout"] == 2000
    assert config["redis"]["database"] == 0 and config["redis"]["ssl"] is False


@pytest.mark.parametrize("config, error", [
    ({"minute": 10, "hour": 5},
     "The limit for hour(5.0) cannot be lower than the limit for minute(10.0)"),
    ({"second": 20, "hour": 10},
     "The limit for hour(10.0) cannot be lower than the limit for second(20.0)"),
    ({"minute": 5, "sync_rate": 1}, "sync_rate can only be used with the redis policy"),
    ({"minute": 5, "limit_by": "header"}, {"header_name": "required field missing"}),
    ({"minute": 5, "limit_by": "path"}, {"path": "required field missing"}),
    ({"minute": 5, "policy": "redis"}, {"redis": {"host": "required field missing"}}),
    ({"minute": 5, "policy": "memcached"},
     {"policy": "expected one of: local, cluster, redis"}),
    ({"minute": 0}, {"minute": "value must be greater than 0"}),
])
def test_schema_errors(config: Dict[str, Any], error: Any) -> None:
    """Kong's schema checks and their messages (periods order, conditional fields)."""
    assert config_errors(config) == error


def test_schema_needs_one_limit() -> None:
    """A config without any period is refused."""
    errors = config_errors({"policy": "local"})
    assert "at least one of these fields must be non-empty" in str(errors)


# -- local policy, headers, blocking ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_kong_spec_minute_six(runtime: Any) -> None:
    """minute=6: six pass with RateLimit-Remaining 5..0, the seventh is 429 with Retry-After."""
    plugin = RateLimitingPlugin(validated({"minute": 6, "limit_by": "ip"}))
    seen: List[Any] = []
    for _ in range(7):
        kong, headers = await call(plugin)
        seen.append((kong.exited[0] if kong.exited else 200, headers["ratelimit-remaining"]))
        assert headers["ratelimit-limit"] == "6"
        assert headers["x-ratelimit-limit-minute"] == "6"
        assert 0 < int(headers["ratelimit-reset"]) <= 60
    assert seen == [(200, "5"), (200, "4"), (200, "3"), (200, "2"), (200, "1"), (200, "0"),
                    (429, "0")]
    assert kong.exited is not None
    status, body, extra = kong.exited
    assert body == {"message": "API rate limit exceeded"}
    assert extra["Retry-After"] == 60  # NOON is the first second of its minute


@pytest_twisted.ensureDeferred
async def test_next_window_starts_fresh(runtime: Any, clock: Any) -> None:
    """A blocked client passes again once the calendar window rolls over."""
    plugin = RateLimitingPlugin(validated({"second": 1, "limit_by": "ip"}))
    assert (await call(plugin))[0].exited is None
    assert (await call(plugin))[0].exited is not None
    clock.advance(1)
    assert (await call(plugin))[0].exited is None


@pytest_twisted.ensureDeferred
async def test_each_period_rolls_over_on_its_own(runtime: Any, clock: Any) -> None:
    """minute=2, hour=3: the minute refuses first; in the next minute the hour still
    counts what passed, and RateLimit-Reset follows the window that is the tightest."""
    plugin = RateLimitingPlugin(validated({"minute": 2, "hour": 3, "limit_by": "ip"}))
    await call(plugin)
    kong, headers = await call(plugin)
    assert kong.exited is None and headers["ratelimit-reset"] == "60"
    assert (await call(plugin))[0].exited is not None  # minute: 3 > 2
    clock.advance(60)
    kong, headers = await call(plugin)
    assert kong.exited is None
    assert headers["x-ratelimit-remaining-minute"] == "1"
    assert headers["x-ratelimit-remaining-hour"] == "0"
    assert headers["ratelimit-remaining"] == "0" and headers["ratelimit-reset"] == "3540"
    kong, headers = await call(plugin)
    assert kong.exited is not None and kong.exited[2] == {"Retry-After": 3540}


@pytest_twisted.ensureDeferred
async def test_counters_are_built_once_per_identifier_and_window(
        runtime: Any, clock: Any, monkeypatch: Any) -> None:
    """A request of an identifier already seen in the current windows builds no
    counter objects (they are kept per plugin until a window rolls over)."""
    built: List[Any] = []
    original = policies.Counter

    def counting(*args: Any) -> Any:
        built.append(args)
        return original(*args)

    monkeypatch.setattr(policies, "Counter", counting)
    plugin = RateLimitingPlugin(validated({"second": 100, "hour": 1000, "limit_by": "ip"}))
    for _ in range(3):
        await call(plugin, ip="1.1.1.1")
    assert len(built) == 2  # one per period
    await call(plugin, ip="2.2.2.2")
    assert len(built) == 4
    clock.advance(1)  # a new second: new windows
    kong, headers = await call(plugin, ip="1.1.1.1")
    assert len(built) == 6
    assert headers["x-ratelimit-remaining-second"] == "99"
    assert headers["x-ratelimit-remaining-hour"] == "996"


@pytest_twisted.ensureDeferred
async def test_most_restrictive_window_and_custom_error(runtime: Any) -> None:
    """RateLimit-* follow the period with the fewest remaining; error_code/message apply."""
    plugin = RateLimitingPlugin(validated({"minute": 2, "hour": 10, "limit_by": "ip",
                                           "error_code": 403, "error_message": "Slow down"}))
    kong, headers = await call(plugin)
    assert headers["x-ratelimit-remaining-minute"] == "1"
    assert headers["x-ratelimit-remaining-hour"] == "9"
    assert headers["ratelimit-limit"] == "2" and headers["ratelimit-remaining"] == "1"
    await call(plugin)
    kong, headers = await call(plugin)
    assert kong.exited == (403, {"message": "Slow down"}, {"Retry-After": 60})
    # The refused request was not counted against the hour.
    assert headers["x-ratelimit-remaining-hour"] == "8"


@pytest_twisted.ensureDeferred
async def test_hide_client_headers(runtime: Any) -> None:
    """hide_client_headers: no rate-limit headers, but Retry-After on the block."""
    plugin = RateLimitingPlugin(validated({"minute": 1, "limit_by": "ip",
                                           "hide_client_headers": True}))
    kong, headers = await call(plugin)
    assert not [h for h in headers if "ratelimit" in h]
    kong, headers = await call(plugin)
    assert not [h for h in headers if "ratelimit" in h]
    assert kong.exited is not None and "Retry-After" in kong.exited[2]


@pytest_twisted.ensureDeferred
async def test_limit_by_identifiers(runtime: Any) -> None:
    """ip, header, consumer (falling back to ip), service and path count separately."""
    by_ip = RateLimitingPlugin(validated({"minute": 1, "limit_by": "ip"}))
    assert (await call(by_ip, ip="1.1.1.1"))[0].exited is None
    assert (await call(by_ip, ip="2.2.2.2"))[0].exited is None
    assert (await call(by_ip, ip="1.1.1.1"))[0].exited is not None

    by_header = RateLimitingPlugin(validated({"minute": 1, "limit_by": "header",
                                              "header_name": "X-Tenant"}))
    assert (await call(by_header, headers=[("X-Tenant", "a")]))[0].exited is None
    assert (await call(by_header, headers=[("X-Tenant", "b")]))[0].exited is None
    assert (await call(by_header, headers=[("X-Tenant", "a")]))[0].exited is not None

    by_consumer = RateLimitingPlugin(validated({"minute": 1}))
    assert (await call(by_consumer, consumer={"id": "c1"}))[0].exited is None
    assert (await call(by_consumer, consumer={"id": "c2"}))[0].exited is None
    assert (await call(by_consumer, ip="9.9.9.9"))[0].exited is None  # no consumer: by ip
    assert (await call(by_consumer, consumer={"id": "c1"}))[0].exited is not None

    by_service = RateLimitingPlugin(validated({"minute": 1, "limit_by": "service"}))
    assert (await call(by_service, ip="1.1.1.1"))[0].exited is None
    assert (await call(by_service, ip="2.2.2.2"))[0].exited is not None

    by_path = RateLimitingPlugin(validated({"minute": 1, "limit_by": "path", "path": "/a"}))
    assert (await call(by_path, path="/a"))[0].exited is None
    kong, headers = await call(by_path, path="/b")
    assert kong.exited is None and "ratelimit-limit" not in headers  # not counted
    assert (await call(by_path, path="/a", ip="3.3.3.3"))[0].exited is not None


def test_local_policy_is_synchronous(runtime: Any) -> None:
    """The local policy checks and adds without a Deferred (no reactor turn in between)."""
    plugin = RateLimitingPlugin(validated({"minute": 1, "limit_by": "ip"}))
    assert plugin.access(make_kong(plugin)) is None


# -- cluster policy and fault tolerance ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cluster_policy_counts_in_the_store(runtime: Any) -> None:
    """cluster: 200 concurrent requests with minute=50 through IStore.increment: exactly 50 pass."""
    plugin = RateLimitingPlugin(validated({"minute": 50, "hour": 60, "limit_by": "ip",
                                           "policy": "cluster"}))
    kongs = [make_kong(plugin) for _ in range(200)]
    await defer.gatherResults([defer.maybeDeferred(plugin.access, k) for k in kongs])
    assert sum(1 for k in kongs if k.exited is None) == 50


class BrokenStore:
    def increment(self, *args: Any) -> Any:
        return defer.fail(StoreUnavailable("database unreachable"))


@pytest_twisted.ensureDeferred
async def test_fault_tolerant_lets_requests_through_and_logs_once(runtime: Any) -> None:
    """fault_tolerant (default): a failing counter store passes requests, logging once."""
    runtime.store = BrokenStore()
    from twisted.logger import globalLogPublisher

    logged: List[Any] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        plugin = RateLimitingPlugin(validated({"minute": 1, "policy": "cluster"}))
        for _ in range(3):
            kong, headers = await call(plugin)
            assert kong.exited is None and "ratelimit-limit" not in headers
    finally:
        globalLogPublisher.removeObserver(logged.append)
    failures = [e for e in logged if "failed to get usage" in e.get("log_format", "")]
    assert len(failures) == 1


@pytest_twisted.ensureDeferred
async def test_not_fault_tolerant_answers_500(runtime: Any) -> None:
    """fault_tolerant=false: a failing counter store answers 500 An unexpected error occurred."""
    runtime.store = BrokenStore()
    plugin = RateLimitingPlugin(validated({"minute": 1, "policy": "cluster",
                                           "fault_tolerant": False}))
    kong, _ = await call(plugin)
    assert kong.exited == (500, {"message": "An unexpected error occurred"}, {})


def test_local_usage_is_all_or_nothing() -> None:
    """local: a request refused by one period adds to none of them."""
    runtime = policies.Runtime(task.Clock())
    counters = [policies.Counter("m", 0, 60, 5), policies.Counter("h", 0, 3600, 1)]
    assert policies.local_usage(runtime, counters) == (True, [1, 1])
    assert policies.local_usage(runtime, counters) == (False, [2, 2])
    assert runtime.local.get("m", 0) == 1


# -- the RESP client's wire format ----------------------------------------------------------

from kongtx.plugins.rate_limiting import resp  # noqa: E402


def test_resp_encodes_commands_as_bulk_string_arrays() -> None:
    """A command goes out as a RESP array of bulk strings (numbers as text)."""
    assert resp.encode("INCRBY", "k", 5) == b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$1\r\n5\r\n"


@pytest.mark.parametrize("wire, value", [
    (b"+OK\r\n", "OK"),
    (b":42\r\n", 42),
    (b"$3\r\nabc\r\n", b"abc"),
    (b"$-1\r\n", None),
    (b"*3\r\n:1\r\n:7\r\n$1\r\nx\r\n", [1, 7, b"x"]),
])
def test_resp_parses_replies(wire: bytes, value: Any) -> None:
    """Each RESP2 reply type parses to its Python value, consuming exactly its bytes."""
    assert resp._parse(wire + b"+next\r\n", 0) == (value, len(wire))


@pytest.mark.parametrize("wire", [b"$3\r\nab", b"*2\r\n:1\r\n", b":4", b""])
def test_resp_waits_for_incomplete_replies(wire: bytes) -> None:
    """A reply cut anywhere is incomplete: nothing is consumed until the rest arrives."""
    assert resp._parse(wire, 0) == (resp._INCOMPLETE, 0)


def test_resp_error_reply_fails_the_command() -> None:
    """-ERR replies fail the command's Deferred with RedisError; replies keep their order."""
    from twisted.internet.testing import StringTransport

    proto = resp.RedisProtocol()
    proto.makeConnection(StringTransport())
    first, second = proto.command("GET", "a"), proto.command("BAD")
    got: List[Any] = []
    first.addCallback(got.append)
    second.addErrback(lambda f: got.append(f.value))
    proto.dataReceived(b"$1\r\n1\r\n-ERR unknown")
    proto.dataReceived(b" command\r\n")
    assert got[0] == b"1" and isinstance(got[1], resp.RedisError)
    assert str(got[1]) == "ERR unknown command"
