"""The proxy's listening sockets, bound by the master, one per worker slot.

For every ``proxy_listen`` address the master binds one ``SO_REUSEPORT``
socket per worker slot (all on the same port) and gives slot *i*'s sockets to
worker *i*, which adopts them. The kernel spreads new connections evenly over
the sockets of a port (nginx's ``reuseport``), and because the master keeps
every socket open, a connection waiting in the accept queue of a worker that
crashed or is being replaced is not lost: the next worker of that slot adopts
the same socket and accepts it.

A socket leaves the group only when its address leaves ``proxy_listen`` or the
node stops: closing a listening socket resets the connections in its queue,
so after ``kongtx reload`` lowers the number of workers the sockets of the
slots that went away are shared out to the remaining workers (worker *i*
accepts on every socket whose slot is *i* modulo the worker count) instead of
being closed. See ``docs/workers.md``.
"""

from __future__ import annotations

import socket
from typing import Dict, List, Sequence, Tuple

from kongtx.config import ListenSpec

__all__ = ["ListenerSockets", "ListenError"]


class ListenError(Exception):
    """A socket could not be bound; ``str()`` is the operator's one line."""


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


Address = Tuple[str, int]


class ListenerSockets:
    """The master's listening sockets for the proxy, by address and slot (never
    accepting themselves).

    :meth:`serve` makes sure every address of *specs* has a socket for each of
    *slots* worker slots; port 0 is resolved once, by the first socket bound.
    """

    def __init__(self, prop: str = "proxy_listen") -> None:
        self.prop = prop
        self.specs: Tuple[ListenSpec, ...] = ()
        self.workers = 0
        #: (host, requested port) -> sockets, by slot.
        self._sockets: Dict[Address, List[socket.socket]] = {}

    def serve(self, specs: Sequence[ListenSpec], workers: int) -> List[socket.socket]:
        """Bind what *specs* with *workers* workers need; returns the sockets of
        addresses no longer listed (the caller closes them once the workers
        using them are gone). Raises :class:`ListenError` (binding nothing new)."""
        added: List[Tuple[Address, socket.socket]] = []
        try:
            for spec in specs:
                key = (spec.host, spec.port)
                current = self._sockets.get(key, [])
                port = current[0].getsockname()[1] if current else spec.port
                for _ in range(len(current), workers):
                    sock = self._bind(spec, port)
                    port = sock.getsockname()[1]
                    added.append((key, sock))
                    current = current + [sock]
                for sock in current:
                    # A changed backlog applies to sockets already listening too.
                    sock.listen(spec.backlog or 511)
        except BaseException:
            for _, sock in added:
                sock.close()
            raise
        for key, sock in added:
            self._sockets.setdefault(key, []).append(sock)
        wanted = {(spec.host, spec.port) for spec in specs}
        gone: List[socket.socket] = []
        for key in [k for k in self._sockets if k not in wanted]:
            gone.extend(self._sockets.pop(key))
        self.specs = tuple(specs)
        self.workers = workers
        return gone

    def layout(self) -> Tuple[Tuple[ListenSpec, ...], int, Dict[Address, List[socket.socket]]]:
        """What :meth:`restore` needs to undo the next :meth:`serve`."""
        return self.specs, self.workers, {k: list(v) for k, v in self._sockets.items()}

    def restore(self, layout: Tuple[Tuple[ListenSpec, ...], int,
                                    Dict[Address, List[socket.socket]]]) -> List[socket.socket]:
        """Go back to *layout* (a reload that failed); returns the sockets bound
        since, for the caller to close once no process uses them."""
        specs, workers, sockets = layout
        kept = {id(sock) for group in sockets.values() for sock in group}
        added = [sock for group in self._sockets.values() for sock in group
                 if id(sock) not in kept]
        self.specs, self.workers = specs, workers
        self._sockets = {k: list(v) for k, v in sockets.items()}
        return added

    def _bind(self, spec: ListenSpec, port: int) -> socket.socket:
        sock = socket.socket(_family(spec.host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((spec.host, port))
            sock.listen(spec.backlog or 511)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ListenError("%s: cannot listen on %s:%d: %s"
                              % (self.prop, spec.host, port, exc.strerror or exc))
        return sock

    def fds(self, slot: int) -> List[List[int]]:
        """Worker *slot*'s file descriptors for each spec, in ``specs`` order: the
        socket of its own slot plus those of slots beyond the worker count that
        fall to it."""
        out = []
        for spec in self.specs:
            sockets = self._sockets[(spec.host, spec.port)]
            out.append([s.fileno() for i, s in enumerate(sockets)
                        if i % self.workers == slot])
        return out

    def addresses(self) -> List[Address]:
        """The bound (host, port) of each spec (for logs and tests)."""
        return [self._sockets[(spec.host, spec.port)][0].getsockname()[:2]
                for spec in self.specs]

    def close(self) -> None:
        for sockets in self._sockets.values():
            for sock in sockets:
                sock.close()
        self._sockets = {}
