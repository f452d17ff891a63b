"""Unit tests of the file-log plugin: Kong's config and filename check, one JSON line
per request appended, ``reopen``, and errors that never reach the request."""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import pytest

from kongtx.plugins import file_log
from kongtx.plugins.file_log import FileLogPlugin
from kongtx.schema import typedefs as t
from tests.plugins.test_serializer import FakeRequest, _kong


@pytest.fixture(autouse=True)
def clock(monkeypatch: Any) -> Any:
    """The reactor turn that writes the lines, as a fake clock (``advance(0)``)."""
    from twisted.internet import task

    clock = task.Clock()
    monkeypatch.setattr(file_log, "_reactor", clock)
    monkeypatch.setattr(file_log, "_flush_scheduled", False)
    yield clock
    file_log.close_all()


def test_config_defaults_are_kongs() -> None:
    """Kong 3.10's file-log fields, defaults and priority."""
    defaults = {name: (f.default if f.has_default else None)
                for name, f in FileLogPlugin.CONFIG.fields}
    assert defaults == {"path": None, "reopen": False, "custom_fields_by_lua": None}
    assert (FileLogPlugin.NAME, FileLogPlugin.PRIORITY) == ("file-log", 9)


@pytest.mark.parametrize("config,errors", [
    ({"reopen": False}, {"path": "required field missing"}),
    ({"path": "/tmp/a*b", "reopen": False}, {"path": "not a valid filename"}),
    ({"path": "/tmp/a&b", "reopen": False}, {"path": "not a valid filename"}),
    ({"path": "/tmp/100%", "reopen": False}, {"path": "not a valid filename"}),
    ({"path": "/tmp/a`b", "reopen": False}, {"path": "not a valid filename"}),
    ({"path": "/var/log/kong/file.log", "reopen": True}, {}),
])
def test_path_validation(config: Dict[str, Any], errors: Dict[str, str]) -> None:
    """``path`` is required; Kong refuses ``* & % `` with ``not a valid filename``."""
    assert t.validate_record(FileLogPlugin.CONFIG, config) == errors


@pytest.mark.parametrize("reopen", [False, True])
def test_one_line_per_request(tmp_path: Any, reopen: bool, clock: Any) -> None:
    """Each log phase appends one JSON line (to an existing file, too), written at
    the end of the reactor turn with the turn's other lines."""
    path = tmp_path / "requests.log"
    path.write_text("existing\n")
    plugin = FileLogPlugin({"path": str(path), "reopen": reopen})
    for uri in ("/a", "/b?x=1"):
        plugin.log(_kong(FakeRequest(uri=uri)))
    assert path.read_text() == "existing\n"
    clock.advance(0)
    lines = path.read_text().splitlines()
    assert lines[0] == "existing"
    assert [json.loads(line)["request"]["uri"] for line in lines[1:]] == ["/a", "/b?x=1"]


def test_reopen_follows_rotation(tmp_path: Any, clock: Any) -> None:
    """With ``reopen``, a rotated (renamed) file is not written any more: the next
    line goes to a new file at ``path``."""
    path = tmp_path / "requests.log"
    plugin = FileLogPlugin({"path": str(path), "reopen": True})
    plugin.log(_kong(FakeRequest(uri="/one")))
    clock.advance(0)
    os.rename(str(path), str(tmp_path / "requests.log.1"))
    plugin.log(_kong(FakeRequest(uri="/two")))
    clock.advance(0)
    assert json.loads(path.read_text())["request"]["uri"] == "/two"


def test_unwritable_path_never_raises(tmp_path: Any) -> None:
    """A path in a missing directory is logged, not raised into the request."""
    plugin = FileLogPlugin({"path": str(tmp_path / "missing" / "x.log"), "reopen": False})
    plugin.log(_kong(FakeRequest()))
    file_log.flush()
    assert not (tmp_path / "missing").exists()


def test_lines_of_several_files_in_one_turn_and_close_all_writes_what_waits(
        tmp_path: Any, clock: Any) -> None:
    """Each file gets its own lines in order; ``close_all`` (a node stopping)
    writes what waits without waiting for the turn to end."""
    a = FileLogPlugin({"path": str(tmp_path / "a.log"), "reopen": False})
    b = FileLogPlugin({"path": str(tmp_path / "b.log"), "reopen": True})
    for uri in ("/1", "/2", "/3"):
        a.log(_kong(FakeRequest(uri=uri)))
        b.log(_kong(FakeRequest(uri=uri + "b")))
    assert len(clock.getDelayedCalls()) == 1
    file_log.close_all()
    uris = [[json.loads(line)["request"]["uri"] for line in (tmp_path / name).read_text().splitlines()]
            for name in ("a.log", "b.log")]
    assert uris == [["/1", "/2", "/3"], ["/1b", "/2b", "/3b"]]
    clock.advance(0)  # the scheduled flush finds nothing left
    assert len((tmp_path / "a.log").read_text().splitlines()) == 3
