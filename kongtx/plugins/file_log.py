"""The ``file-log`` plugin: Kong's JSON record of each request, one line per request,
appended to a file.

Kong 3.10's configuration: ``path`` (required; ``not a valid filename`` when it
holds ``*``, ``&``, ``%`` or a backquote), ``reopen`` (``false``: the file stays
open, shared by every configuration writing to that path; ``true``: opened and
closed for each line, for log rotation) and ``custom_fields_by_lua`` (accepted,
ignored: kongtx runs no Lua).

Lines are appended with ``write(2)`` on a descriptor opened ``O_APPEND``: a
line is never interleaved with another, and a small write to a local file does
not hold the reactor (the same trade-off Kong makes in nginx's worker). The
lines of requests finished in one reactor turn are written together at the end
of that turn, one ``write(2)`` per file instead of one per line (the system call
was a tenth of a PyPy worker's time with this plugin); a process killed in
the middle of a turn loses that turn's lines. An error (a missing directory, a
full disk) is logged, never raised into the request.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from twisted.logger import Logger

from kongtx.logging import serializer
from kongtx.plugins.base import ALL_PROTOCOLS, BasePlugin
from kongtx.schema import typedefs as t

__all__ = ["FileLogPlugin", "ERR_FILENAME"]

ERR_FILENAME = "not a valid filename"
MSG_WRITE_FAILED = "failed to write to the file {path!r}: {error}"

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
_MODE = 0o644

log = Logger()

#: Descriptors kept open, by path (shared by every file-log configuration).
_descriptors: Dict[str, int] = {}

#: Lines waiting for the end of the reactor turn, by (path, reopen).
_pending: Dict[Tuple[str, bool], List[bytes]] = {}
#: The reactor that runs :func:`flush` (None: the global one; tests set a clock).
_reactor: Optional[Any] = None
_flush_scheduled = False
_shutdown_hooked = False


def _queue(path: str, data: bytes, reopen: bool) -> None:
    """Append ``data`` to ``path`` at the end of this reactor turn."""
    global _flush_scheduled, _shutdown_hooked
    lines = _pending.get((path, reopen))
    if lines is not None:
        lines.append(data)
        return
    _pending[(path, reopen)] = [data]
    if not _flush_scheduled:
        reactor = _reactor
        if reactor is None:
            from twisted.internet import reactor
        if not _shutdown_hooked and _reactor is None:
            _shutdown_hooked = True
            reactor.addSystemEventTrigger("after", "shutdown", flush)
        reactor.callLater(0, flush)
        _flush_scheduled = True


def flush() -> None:
    """Write every waiting line now (the end of a turn; a node stopping)."""
    global _flush_scheduled
    _flush_scheduled = False
    while _pending:
        (path, reopen), lines = _pending.popitem()
        _write(path, lines[0] if len(lines) == 1 else b"".join(lines), reopen)


def _write(path: str, data: bytes, reopen: bool) -> None:
    fd = None if reopen else _descriptors.get(path)
    try:
        if fd is None:
            fd = os.open(path, _FLAGS, _MODE)
            if not reopen:
                _descriptors[path] = fd
        os.write(fd, data)
    except OSError as exc:
        log.warn(MSG_WRITE_FAILED, path=path, error=exc)
        if fd is not None and not reopen:
            _descriptors.pop(path, None)
            _close(fd)
        return
    finally:
        if reopen and fd is not None:
            _close(fd)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def close_all() -> None:
    """Write what waits, then close every descriptor kept open (tests; a node
    stopping)."""
    flush()
    while _descriptors:
        _close(_descriptors.popitem()[1])


class FileLogPlugin(BasePlugin):
    NAME = "file-log"
    PRIORITY = 9
    VERSION = "3.10.0"
    PROTOCOLS = ALL_PROTOCOLS
    CONFIG = t.record([
        ("path", t.string(required=True, match=r"^[^*&%`]+$", err=ERR_FILENAME)),
        ("reopen", t.boolean(required=True, default=False)),
        ("custom_fields_by_lua", t.map_of(t.string(len_min=1), t.string(len_min=1))),
    ])

    def __init__(self, config: Mapping[str, Any]) -> None:
        BasePlugin.__init__(self, config)
        self._path: str = config["path"]
        self._reopen = bool(config.get("reopen"))

    def header_filter(self, kong: Any) -> None:
        serializer.note_upstream(kong, time.monotonic())

    def log(self, kong: Any) -> None:
        line = serializer.serialize_json(kong, now=time.monotonic(), wall=time.time()) + "\n"
        _queue(self._path, line.encode("utf-8"), self._reopen)
