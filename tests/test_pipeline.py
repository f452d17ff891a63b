"""Unit tests of the plugin runtime: registry, scoping precedence, ordering, phases."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

import attr
import pytest
from twisted.internet import defer, task

from kongtx import pipeline
from kongtx.pdk import Kong
from kongtx.plugins import (
    BUNDLED,
    ENTRY_POINT_GROUP,
    KONG_PRIORITIES,
    PluginError,
    load_plugin_class,
    load_plugins,
)
from kongtx.plugins.base import BasePlugin

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures", "example_plugin"))

R, S, C = "route-1", "service-1", "consumer-1"


@attr.s(auto_attribs=True)
class FakeEntryPoint:
    name: str
    value: str
    group: str = ENTRY_POINT_GROUP

    def load(self) -> Any:
        module, _, name = self.value.partition(":")
        return getattr(__import__(module), name)


EXAMPLE_EP = FakeEntryPoint("example-header", "kongtx_example_header:ExampleHeaderPlugin")


def make_plugin(name: str, priority: int, calls: Optional[List[str]] = None,
                **phases: Any) -> type:
    """A plugin class whose phases record their calls in *calls*."""
    attrs: Dict[str, Any] = {"NAME": name, "PRIORITY": priority}
    for phase in ("rewrite", "access", "header_filter", "log"):
        if phase in phases:
            attrs[phase] = phases[phase]
        elif calls is not None:
            def record(self: Any, kong: Any, phase: str = phase) -> None:
                calls.append("%s:%s:%s" % (phase, self.NAME, self.config.get("tag", "")))
            attrs[phase] = record
    return type(name.replace("-", "_"), (BasePlugin,), attrs)


def row(name: str, route: Optional[str] = None, service: Optional[str] = None,
        consumer: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
    tag = extra.pop("tag", None)
    result = {
        "id": extra.pop("id", "%s-%s-%s-%s" % (name, route, service, consumer)),
        "name": name,
        "route": {"id": route} if route else None,
        "service": {"id": service} if service else None,
        "consumer": {"id": consumer} if consumer else None,
        "config": {"tag": tag or "%s/%s/%s" % (route, service, consumer)},
        "protocols": ["grpc", "grpcs", "http", "https"],
        "enabled": True,
    }
    result.update(extra)
    return result


class FakePeer:
    remote = "127.0.0.1"
    trusted = False


def make_kong(index: pipeline.PluginIndex, route_id: str = R, service_id: str = S,
              scheme: str = "http") -> Kong:
    chain = index.chain_for(route_id)
    return Kong(None, peer=FakePeer(), scheme=scheme, path="/", request_id="rid",
                index=index, chain=chain, route_id=route_id, service_id=service_id)


# -- registry ---------------------------------------------------------------------


def test_unknown_plugin_is_kongs_one_line():
    """An unknown plugin name stops loading with `plugins: plugin 'x' is not installed`."""
    with pytest.raises(PluginError) as info:
        load_plugins(["bundled", "x"], entry_points=[])
    assert str(info.value) == "plugins: plugin 'x' is not installed"


def test_bundled_expands_and_off_loads_nothing():
    """`bundled` loads every bundled plugin; `off` loads none."""
    assert set(load_plugins(["bundled"], entry_points=[])) == set(BUNDLED)
    assert load_plugins(["off"], entry_points=[]) == {}


def test_third_party_plugin_comes_from_the_entry_point_group():
    """A name not bundled is found in the `kongtx.plugins` entry points."""
    from kongtx_example_header import ExampleHeaderPlugin

    other = FakeEntryPoint("example-header", "nope:Nope", group="other.group")
    loaded = load_plugins(["bundled", "example-header"], entry_points=[other, EXAMPLE_EP])
    assert loaded["example-header"] is ExampleHeaderPlugin


def test_entry_point_with_wrong_name_is_refused():
    """An entry point whose class NAME differs from its name is a load error."""
    ep = FakeEntryPoint("other-name", "kongtx_example_header:ExampleHeaderPlugin")
    with pytest.raises(PluginError) as info:
        load_plugins(["other-name"], entry_points=[ep])
    assert str(info.value).startswith("plugins: plugin 'other-name' could not be loaded")


def test_bad_module_path_is_a_plugin_error():
    """A BUNDLED target that cannot be imported names the plugin."""
    with pytest.raises(PluginError) as info:
        load_plugin_class("zzz", "kongtx.no_such_module:Zzz")
    assert "plugin 'zzz' could not be loaded" in str(info.value)


def test_bundled_priorities_match_kong():
    """Every bundled plugin keeps Kong's PRIORITY (3.10 table), and the table is pinned."""
    for name in BUNDLED:
        assert load_plugins([name])[name].PRIORITY == KONG_PRIORITIES[name], name
    pinned = {
        "pre-function": 1000000, "correlation-id": 100001, "zipkin": 100000,
        "bot-detection": 2500, "cors": 2000, "session": 1900, "acme": 1705,
        "jwt": 1450, "oauth2": 1400, "key-auth": 1250, "ldap-auth": 1200,
        "basic-auth": 1100, "hmac-auth": 1030, "grpc-gateway": 998,
        "ip-restriction": 990, "request-size-limiting": 951, "acl": 950,
        "rate-limiting": 910, "response-ratelimiting": 900,
        "request-transformer": 801, "response-transformer": 800, "redirect": 779,
        "aws-lambda": 750, "azure-functions": 749, "proxy-cache": 100,
        "opentelemetry": 14, "prometheus": 13, "http-log": 12, "statsd": 11,
        "datadog": 10, "file-log": 9, "udp-log": 8, "tcp-log": 7, "loggly": 6,
        "syslog": 4, "grpc-web": 3, "request-termination": 2, "post-function": -1000,
    }
    for name, priority in pinned.items():
        assert KONG_PRIORITIES[name] == priority, name


# -- scoping precedence (pure) ---------------------------------------------------------

SCOPES = [
    # (level, route, service, consumer)
    (1, R, S, C),
    (2, R, None, C),
    (3, None, S, C),
    (4, R, S, None),
    (5, None, None, C),
    (6, R, None, None),
    (7, None, S, None),
    (8, None, None, None),
]


@pytest.mark.parametrize("level,route,service,consumer", SCOPES)
def test_precedence_levels(level, route, service, consumer):
    """Each scope has Kong's precedence level."""
    assert pipeline.precedence(route, service, consumer) == level


@pytest.mark.parametrize("winner", range(8))
def test_most_specific_scope_wins(winner):
    """With configs at this level and every less specific one, this level's config wins."""
    cls = make_plugin("p", 10)
    rows = [row("p", r, s, c) for (_, r, s, c) in SCOPES[winner:]]
    index = pipeline.build_plugin_index(rows, {"p": cls}, [(R, S)])
    resolved = pipeline.resolve(index.by_scope, R, S, C)
    assert len(resolved) == 1
    _, r, s, c = SCOPES[winner]
    assert resolved[0].scope == (r, s, c)


@pytest.mark.parametrize("route,service,consumer,expected", [
    (R, S, None, (R, S, None)),            # without a consumer, level 4 wins
    ("route-2", S, None, (None, S, None)),  # another route of the service: level 7
    ("route-2", "service-2", None, (None, None, None)),  # global
    ("route-2", "service-2", C, (None, None, C)),  # consumer only: level 5
    ("route-2", S, C, (None, S, C)),        # level 3
])
def test_scopes_of_other_routes(route, service, consumer, expected):
    """Configs scoped to another route, service or consumer never apply."""
    cls = make_plugin("p", 10)
    rows = [row("p", r, s, c) for (_, r, s, c) in SCOPES if (r, s, c) != (R, None, C)
            and (r, s, c) != (R, S, C)]
    index = pipeline.build_plugin_index(rows, {"p": cls}, [(R, S)])
    resolved = pipeline.resolve(index.by_scope, route, service, consumer)
    assert [c.scope for c in resolved] == [expected]


def test_one_config_per_plugin_name_and_priority_order():
    """Plugins run by descending PRIORITY, ties by name, one config per name."""
    classes = {
        "low": make_plugin("low", 1),
        "high": make_plugin("high", 1000),
        "b-mid": make_plugin("b-mid", 500),
        "a-mid": make_plugin("a-mid", 500),
    }
    rows = [row(name) for name in classes] + [row("high", R)]
    index = pipeline.build_plugin_index(rows, classes, [(R, S)])
    chain = index.chain_for(R)
    assert [c.name for c in chain.configs] == ["high", "a-mid", "b-mid", "low"]
    assert chain.configs[0].route_id == R


def test_disabled_and_unknown_rows_are_ignored():
    """Disabled rows and rows of plugins not loaded on this node give no chain."""
    cls = make_plugin("p", 10)
    rows = [row("p", enabled=False), row("not-loaded")]
    index = pipeline.build_plugin_index(rows, {"p": cls}, [(R, S)])
    assert index.chain_for(R) is None
    assert index.configs == {}


def test_no_consumer_plugins_ignore_consumer_scoped_rows():
    """A consumer-scoped row of an auth (NO_CONSUMER) plugin is never used."""
    cls = make_plugin("auth", 10)
    cls.NO_CONSUMER = True
    index = pipeline.build_plugin_index([row("auth", consumer=C)], {"auth": cls}, [(R, S)])
    assert index.configs == {}


def test_unchanged_rows_keep_their_instance():
    """A rebuild reuses the plugin instance of a row that did not change."""
    cls = make_plugin("p", 10)
    first = pipeline.build_plugin_index([row("p", id="1"), row("p", R, id="2")],
                                        {"p": cls}, [(R, S)])
    changed = row("p", R, id="2", tag="new")
    second = pipeline.build_plugin_index([row("p", id="1"), changed], {"p": cls}, [(R, S)],
                                         first)
    assert second.configs["1"].handler is first.configs["1"].handler
    assert second.configs["2"].handler is not first.configs["2"].handler
    assert second.configs["2"].handler.config == {"tag": "new"}


def test_routes_without_plugins_have_no_chain():
    """Only routes with an applicable config get a chain (the others cost nothing)."""
    cls = make_plugin("p", 10)
    index = pipeline.build_plugin_index([row("p", R)], {"p": cls}, [(R, S), ("r2", S)])
    assert index.chain_for(R) is not None
    assert index.chain_for("r2") is None


# -- running phases ----------------------------------------------------------------


def test_rewrite_runs_global_plugins_only_then_access():
    """rewrite runs only global configs; access runs the route's chain in order."""
    calls: List[str] = []
    classes = {"g": make_plugin("g", 5, calls), "r": make_plugin("r", 50, calls)}
    index = pipeline.build_plugin_index([row("g", tag="g"), row("r", R, tag="r")],
                                        classes, [(R, S)])
    kong = make_kong(index)
    assert pipeline.run_access(kong) is None
    assert calls == ["rewrite:g:g", "access:r:r", "access:g:g"]


def test_exit_skips_the_remaining_access_plugins():
    """kong.response.exit stops the access phase: later plugins do not run."""
    calls: List[str] = []

    def stop(self: Any, kong: Any) -> None:
        calls.append("stop")
        return kong.response.exit(418, {"message": "teapot"})

    classes = {"first": make_plugin("first", 100, calls, access=stop),
               "second": make_plugin("second", 1, calls)}
    index = pipeline.build_plugin_index([row("first"), row("second")], classes, [(R, S)])
    kong = make_kong(index)
    assert pipeline.run_access(kong) is None
    assert calls == ["rewrite:first:None/None/None", "rewrite:second:None/None/None", "stop"]
    assert kong.exited == (418, {"message": "teapot"}, {})
    assert kong.exit_body() == (b'{"message": "teapot"}', b"application/json; charset=utf-8")


def test_exception_marks_the_request_failed_and_stops():
    """A plugin that raises stops the phase and marks only this request failed."""
    calls: List[str] = []

    def boom(self: Any, kong: Any) -> None:
        raise RuntimeError("boom")

    classes = {"bad": make_plugin("bad", 100, access=boom),
               "next": make_plugin("next", 1, calls)}
    index = pipeline.build_plugin_index([row("bad", R), row("next", R)], classes, [(R, S)])
    kong = make_kong(index)
    pipeline.run_access(kong)
    assert kong.failed
    assert calls == []
    other = make_kong(index)
    assert not other.failed


def test_async_access_waits_and_keeps_order():
    """An access phase returning a Deferred (or a coroutine) delays the next plugin."""
    clock = task.Clock()
    calls: List[str] = []

    def slow(self: Any, kong: Any) -> defer.Deferred:
        calls.append("slow-start")
        return task.deferLater(clock, 1.0, calls.append, "slow-end")

    async def coro(self: Any, kong: Any) -> None:
        await task.deferLater(clock, 1.0, lambda: None)
        calls.append("coro")

    classes = {"slow": make_plugin("slow", 100, access=slow),
               "coro": make_plugin("coro", 50, access=coro),
               "last": make_plugin("last", 1, access=lambda self, kong: calls.append("last"))}
    index = pipeline.build_plugin_index([row(n) for n in classes], classes, [(R, S)])
    kong = make_kong(index)
    d = pipeline.run_access(kong)
    assert isinstance(d, defer.Deferred)
    assert calls == ["slow-start"]
    clock.advance(1.0)
    assert calls == ["slow-start", "slow-end"]
    clock.advance(1.0)
    assert calls == ["slow-start", "slow-end", "coro", "last"]
    assert d.called


def test_async_failure_marks_failed():
    """A Deferred that fails in access marks the request failed."""
    classes = {"bad": make_plugin("bad", 1, access=lambda self, kong: defer.fail(ValueError()))}
    index = pipeline.build_plugin_index([row("bad")], classes, [(R, S)])
    kong = make_kong(index)
    pipeline.run_access(kong)
    assert kong.failed


def test_authentication_re_resolves_consumer_scoped_configs():
    """After an auth plugin authenticates a consumer, the later plugins use the
    consumer-scoped configs, and plugins only configured for that consumer run."""
    calls: List[str] = []

    def auth(self: Any, kong: Any) -> None:
        kong.client.authenticate({"id": C}, {"id": "cred"})

    classes = {"auth": make_plugin("auth", 1000, access=auth),
               "limit": make_plugin("limit", 900, calls),
               "only-consumer": make_plugin("only-consumer", 10, calls)}
    rows = [row("auth", R), row("limit", R, tag="route"), row("limit", None, S, C, tag="sc"),
            row("only-consumer", consumer=C, tag="c")]
    index = pipeline.build_plugin_index(rows, classes, [(R, S)])
    kong = make_kong(index)
    pipeline.run_access(kong)
    assert [c for c in calls if c.startswith("access")] == ["access:limit:sc",
                                                            "access:only-consumer:c"]
    assert [c.name for c in kong.chain.log] == ["limit", "only-consumer"]
    assert kong.client.get_consumer() == {"id": C}


def test_authentication_in_an_async_access_re_resolves_too():
    """An auth plugin that authenticates after a Deferred: the plugins after it still
    run with the consumer-scoped configs."""
    clock = task.Clock()
    calls: List[str] = []

    def auth(self: Any, kong: Any) -> defer.Deferred:
        return task.deferLater(clock, 1.0, kong.client.authenticate, {"id": C}, None)

    classes = {"auth": make_plugin("auth", 1000, access=auth),
               "limit": make_plugin("limit", 900, calls)}
    rows = [row("auth", R), row("limit", R, tag="route"), row("limit", None, S, C, tag="sc")]
    index = pipeline.build_plugin_index(rows, classes, [(R, S)])
    kong = make_kong(index)
    d = pipeline.run_access(kong)
    assert calls == []
    clock.advance(1.0)
    assert d.called and calls == ["access:limit:sc"]


def test_chain_with_a_consumer_is_resolved_once_per_index(monkeypatch: Any) -> None:
    """The chain of (route, service, consumer) is computed on first use and then reused
    (no per-request resolution); the cache is bounded and belongs to one index."""
    classes = {"limit": make_plugin("limit", 900, [])}
    rows = [row("limit", R), row("limit", None, S, C)]
    index = pipeline.build_plugin_index(rows, classes, [(R, S)])
    first = index.chain_with_consumer(R, S, C)
    assert index.chain_with_consumer(R, S, C) is first
    assert [c.consumer_id for c in first.access] == [C]
    assert index.chain_with_consumer(R, S, "other").access[0].consumer_id is None
    rebuilt = pipeline.build_plugin_index(rows, classes, [(R, S)], index)
    assert rebuilt.chain_with_consumer(R, S, C) is not first
    monkeypatch.setattr(pipeline, "MAX_CONSUMER_CHAINS", 2)
    index.chain_with_consumer(R, S, "third")
    assert index.chain_with_consumer(R, S, C) is not first  # forgotten when full
    assert index.chain_with_consumer(R, S, C).access == first.access


def test_chain_steps_are_rewrite_then_access_with_bound_methods():
    """A chain's steps (what run_access walks) are the global rewrites, then the
    access phases, in order, each with its handler's bound method."""
    classes = {"g": make_plugin("g", 5, []), "r": make_plugin("r", 50, [])}
    index = pipeline.build_plugin_index([row("g"), row("r", R)], classes, [(R, S)])
    chain = index.chain_for(R)
    assert [(phase, c.name) for phase, c, _ in chain.steps] == [
        ("rewrite", "g"), ("access", "r"), ("access", "g")]
    assert all(method == getattr(c.handler, phase) for phase, c, method in chain.steps)


def test_protocols_are_respected():
    """A config with protocols ["https"] does not run on an http request."""
    calls: List[str] = []
    classes = {"p": make_plugin("p", 1, calls)}
    index = pipeline.build_plugin_index([row("p", R, protocols=["https"])], classes, [(R, S)])
    pipeline.run_access(make_kong(index, scheme="http"))
    assert calls == []
    pipeline.run_access(make_kong(index, scheme="https"))
    assert calls == ["access:p:%s/None/None" % (R,)]


def test_log_errors_are_only_logged_and_later_plugins_run():
    """A log phase that raises does not stop the other log plugins."""
    calls: List[str] = []

    def bad(self: Any, kong: Any) -> None:
        raise RuntimeError("log boom")

    classes = {"bad": make_plugin("bad", 10, log=bad), "ok": make_plugin("ok", 1, calls)}
    index = pipeline.build_plugin_index([row("bad"), row("ok")], classes, [(R, S)])
    assert pipeline.run_log(make_kong(index)) is None
    assert calls == ["log:ok:None/None/None"]
