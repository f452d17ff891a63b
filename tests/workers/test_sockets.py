"""The master's proxy sockets: one SO_REUSEPORT socket per worker slot, kept
across reloads so no queued connection is reset."""

from __future__ import annotations

import socket

import pytest

from kongtx.config import parse_listen
from kongtx.workers.sockets import ListenError, ListenerSockets


def _port(fd: int) -> int:
    s = socket.socket(fileno=socket.dup(fd))
    try:
        return s.getsockname()[1]
    finally:
        s.close()


def test_one_socket_per_slot_on_one_port() -> None:
    """Port 0 is resolved once: both slots' sockets listen on the same port."""
    sockets = ListenerSockets()
    try:
        assert sockets.serve(parse_listen("proxy_listen", "127.0.0.1:0"), 2) == []
        fds0, fds1 = sockets.fds(0), sockets.fds(1)
        assert len(fds0) == len(fds1) == 1 and len(fds0[0]) == len(fds1[0]) == 1
        assert fds0[0][0] != fds1[0][0]
        assert _port(fds0[0][0]) == _port(fds1[0][0]) == sockets.addresses()[0][1]
    finally:
        sockets.close()


def test_more_workers_keep_the_existing_sockets() -> None:
    specs = parse_listen("proxy_listen", "127.0.0.1:0")
    sockets = ListenerSockets()
    try:
        sockets.serve(specs, 2)
        before = [sockets.fds(0)[0][0], sockets.fds(1)[0][0]]
        assert sockets.serve(specs, 3) == []
        assert [sockets.fds(0)[0][0], sockets.fds(1)[0][0]] == before
        assert len(sockets.fds(2)[0]) == 1
    finally:
        sockets.close()


def test_fewer_workers_share_out_the_sockets_of_the_slots_that_went_away() -> None:
    """Closing a listening socket would reset the connections in its queue: with
    one worker left it accepts on all three sockets."""
    specs = parse_listen("proxy_listen", "127.0.0.1:0")
    sockets = ListenerSockets()
    try:
        sockets.serve(specs, 3)
        assert sockets.serve(specs, 1) == []
        assert len(sockets.fds(0)[0]) == 3
    finally:
        sockets.close()


def test_an_address_no_longer_listed_is_handed_back_to_close() -> None:
    sockets = ListenerSockets()
    try:
        sockets.serve(parse_listen("proxy_listen", "127.0.0.1:0"), 2)
        gone = sockets.serve(parse_listen("proxy_listen", "127.0.0.2:0"), 2)
        assert len(gone) == 2
        for sock in gone:
            sock.close()
        assert sockets.addresses()[0][0] == "127.0.0.2"
    finally:
        sockets.close()


def test_an_address_in_use_is_one_line() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    sockets = ListenerSockets()
    try:
        with pytest.raises(ListenError) as info:
            sockets.serve(parse_listen("proxy_listen", "127.0.0.1:%d" % port), 2)
        assert str(info.value).startswith("proxy_listen: cannot listen on 127.0.0.1:%d: " % port)
    finally:
        sockets.close()
        taken.close()



def test_a_failed_reload_restores_the_sockets_the_old_workers_have() -> None:
    """A reload to three workers on another address that fails goes back to the
    running layout: the old address's sockets are kept (the old workers accept on
    them) and the ones bound for the new workers are handed back to close."""
    old = parse_listen("proxy_listen", "127.0.0.1:0")
    sockets = ListenerSockets()
    try:
        sockets.serve(old, 2)
        before = [sockets.fds(0), sockets.fds(1)]
        layout = sockets.layout()
        gone = sockets.serve(parse_listen("proxy_listen", "127.0.0.2:0"), 3)
        assert len(gone) == 2
        added = sockets.restore(layout)
        assert len(added) == 3
        for sock in added:
            sock.close()
        assert [sockets.fds(0), sockets.fds(1)] == before
        assert sockets.addresses()[0][0] == "127.0.0.1"
    finally:
        sockets.close()
