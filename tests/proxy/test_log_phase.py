"""When the proxy runs the plugins' log phase (in memory): as soon as the response is
finished, without a timer (deferring it would not send the response sooner, and
would keep every finished request alive longer)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, List

from twisted.internet import task

from kongtx.pipeline import PluginConfig
from kongtx.proxy.resource import GatewayResource


class Recorder:
    """A log-phase handler recording the requests it logs."""

    def __init__(self, seen: List[str]) -> None:
        self.seen = seen

    def log(self, kong: Any) -> None:
        self.seen.append(kong.request_id)
        if kong.request_id == "boom":
            raise ValueError("a broken log plugin")


def finished(request_id: str, seen: List[str]) -> Any:
    config = PluginConfig(id="p", name="recorder", route_id=None, service_id=None,
                          consumer_id=None, protocols=frozenset(["http"]), priority=1,
                          handler=Recorder(seen), row={},
                          logger=None)  # type: ignore[arg-type]
    return SimpleNamespace(request_id=request_id, scheme="http",
                           chain=SimpleNamespace(log=(config,)), log=None)


def test_log_phase_runs_when_the_response_is_finished() -> None:
    """Each finished request is logged at once, with no timer; a failing log plugin
    is only logged and the next request is logged as usual."""
    clock = task.Clock()
    resource = GatewayResource(None, None, SimpleNamespace(), clock)  # type: ignore[arg-type]
    seen: List[str] = []
    for request_id in ("a", "boom", "b"):
        resource._run_log_phase(finished(request_id, seen))
        assert seen[-1] == request_id
    assert seen == ["a", "boom", "b"]
    assert clock.getDelayedCalls() == []


def test_no_log_plugins_nothing_runs() -> None:
    """A chain without log plugins (after authentication, say) runs nothing."""
    clock = task.Clock()
    resource = GatewayResource(None, None, SimpleNamespace(), clock)  # type: ignore[arg-type]
    kong = SimpleNamespace(request_id="x", chain=SimpleNamespace(log=()))
    resource._run_log_phase(kong)
    assert clock.getDelayedCalls() == []
