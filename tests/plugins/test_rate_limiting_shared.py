"""``SharedCounters``: the rate-limiting ``local`` counters every worker process of a
node maps from one file. Same answers as ``kongtx.store.memory.Counters`` and
``policies.local_usage``; exact across processes; expiry, reclaim and eviction;
creating, attaching and refusing files. Cross-process tests use real processes."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import types
from typing import Any, Iterator, List, Sequence, Tuple

import pytest
from twisted.logger import globalLogPublisher

from kongtx.plugins.rate_limiting import policies, shared
from kongtx.plugins.rate_limiting.policies import Counter
from kongtx.plugins.rate_limiting.shared import SharedCounters, SharedCountersError
from kongtx.store.memory import Counters

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIG = 10 ** 9


class MemoryTable:
    """``Counters`` behind the SharedCounters API (usage is ``policies.local_usage``)."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.get = self.counters.get
        self.increment = self.counters.increment

    def usage(self, counters: Sequence[Counter]) -> Tuple[bool, List[int]]:
        return policies.local_usage(types.SimpleNamespace(local=self.counters), counters)


@pytest.fixture(params=["memory", "shared"])
def table(request: Any, tmp_path: Any) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryTable()
    else:
        with SharedCounters.open(str(tmp_path / "rl.shm"), slots=1000) as counters:
            yield counters


@pytest.fixture
def path(tmp_path: Any) -> str:
    return str(tmp_path / "rl.shm")


@pytest.fixture
def logged() -> Iterator[List[Any]]:
    events: List[Any] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def messages(events: List[Any], start: str) -> List[Any]:
    return [e for e in events if e.get("log_format", "").startswith(start)]


# -- the same answers as Counters / local_usage (a table over both) -------------------


def test_increment_counts_per_key_and_window(table: Any) -> None:
    """increment returns the new value; keys and window starts count separately."""
    assert table.get("k", 60) == 0
    assert table.increment("k", 60, 120) == 1
    assert table.increment("k", 60, 120) == 2
    assert table.increment("k", 60, 120, 5) == 7
    assert table.increment("k", 120, 120) == 1
    assert table.increment("other", 60, 120) == 1
    assert table.increment("k", 60, 120, -1) == 6
    assert (table.get("k", 60), table.get("k", 120), table.get("other", 60)) == (6, 1, 1)


def test_increment_refuses_past_the_limit(table: Any) -> None:
    """With a limit, an addition that would exceed it returns > limit and changes nothing."""
    assert [table.increment("k", 0, 60, 1, 2) for _ in range(4)] == [1, 2, 3, 3]
    assert table.increment("k", 0, 60, 1, None) == 3
    assert table.increment("fresh", 0, 60, 3, 2) == 3
    assert table.get("fresh", 0) == 0
    assert table.increment("fresh", 0, 60, 2, 2) == 2


def test_usage_is_all_or_nothing(table: Any) -> None:
    """A request refused by one period adds to none of them; values are what they would be."""
    counters = [Counter("m", 0, 60, 5), Counter("h", 0, 3600, 1)]
    assert table.usage(counters) == (True, [1, 1])
    assert table.usage(counters) == (False, [2, 2])
    assert (table.get("m", 0), table.get("h", 0)) == (1, 1)
    assert table.usage([Counter("m", 0, 60, 5)]) == (True, [2])


def test_usage_with_the_same_counter_twice(table: Any) -> None:
    """A counter listed twice is checked once per listing and added twice, as local_usage does."""
    counters = [Counter("d", 0, 60, 3), Counter("d", 0, 60, 3)]
    assert table.usage(counters) == (True, [1, 1])
    assert table.usage(counters) == (True, [3, 3])
    assert table.usage(counters) == (False, [5, 5])
    assert table.get("d", 0) == 4


@pytest.mark.parametrize("key", [
    "",
    "é:ünïcode:☃",
    "x" * shared.KEY_MAX,
    "x" * (shared.KEY_MAX + 1),
    "route-id:service-id:" + "h" * 500 + ":minute",
    "bad \udc80 surrogate",
])
def test_keys_of_any_length_and_text(table: Any, key: str) -> None:
    """Empty, non-ASCII, long (stored as SHA-256) and lone-surrogate keys all count."""
    assert table.usage([Counter(key, 60, 60, 2)]) == (True, [1])
    assert table.increment(key, 60, 60) == 2
    assert table.get(key, 60) == 2
    assert table.get(key + "!", 60) == 0


def test_same_answers_as_counters_on_a_random_workload(tmp_path: Any) -> None:
    """10,000 random usage/increment/get calls answer exactly as Counters + local_usage."""
    rng = random.Random(20240601)
    memory = MemoryTable()
    keys = ["k%d" % i for i in range(40)] + ["long:" + "z" * 100 + str(i) for i in range(10)]
    with SharedCounters.open(str(tmp_path / "rl.shm"), slots=200) as table:
        for _ in range(10000):
            op = rng.random()
            window = rng.choice((0, 60, 3600))
            if op < 0.6:
                counters = [Counter(rng.choice(keys), window, BIG, rng.randint(1, 30))
                            for _ in range(rng.randint(1, 3))]
                assert table.usage(counters) == memory.usage(counters)
            elif op < 0.9:
                args = (rng.choice(keys), window, BIG, rng.randint(-2, 4),
                        rng.choice((None, 5, 20)))
                assert table.increment(*args) == memory.increment(*args)
            else:
                key = rng.choice(keys)
                assert table.get(key, window) == memory.get(key, window)
        for key in keys:
            for window in (0, 60, 3600):
                assert table.get(key, window) == memory.get(key, window)


def test_colliding_hashes_are_never_confused(path: str) -> None:
    """Two keys with the same CRC32 (same home slot) are told apart by their bytes."""
    a, b = "c50963c80102", "d3f504638284"
    assert shared._ident(a, 0)[0] == shared._ident(b, 0)[0]
    with SharedCounters.open(path, slots=4) as table:
        assert table.increment(a, 0, 60) == 1
        assert table.get(b, 0) == 0
        assert table.increment(b, 0, 60, 5) == 5
        assert (table.get(a, 0), table.get(b, 0)) == (1, 5)


# -- expiry, reclaim and a full table --------------------------------------------------


def test_expired_counters_are_reclaimed_so_churn_never_evicts(path: str) -> None:
    """A day of new keys every minute in a 64-counter table: expired ones make room, none
    live is evicted, every live counter keeps its value."""
    with SharedCounters.open(path, slots=64) as table:
        for minute in range(1440):
            window = minute * 60
            for ip in range(20):
                key = "route:service:10.0.%d.%d:minute" % (minute % 256, ip)
                assert table.usage([Counter(key, window, 60, 5)]) == (True, [1])
                assert table.usage([Counter(key, window, 60, 5)]) == (True, [2])
        stats = table.stats()
        assert stats["evictions"] == 0 and stats["used"] <= 64
        window = 1439 * 60
        assert [table.get("route:service:10.0.%d.%d:minute" % (1439 % 256, ip), window)
                for ip in range(20)] == [2] * 20


def test_an_expired_counter_is_gone_once_swept(path: str) -> None:
    """A counter expires ttl seconds after its window starts (the newest window seen is
    now): a sweep of the table then reclaims it, and it reads 0."""
    with SharedCounters.open(path, slots=6) as table:
        table.increment("old", 0, 60)
        table.increment("edge", 60, 60)
        for i in range(table.table_size):  # new counters sweep the whole table
            table.increment("new%d" % (i % 3), 120, 60)
        assert table.get("old", 0) == 0
        assert table.get("edge", 60) == 1  # expires at 120: not before now (120)
        assert table.stats()["evictions"] == 0


def test_a_full_table_evicts_the_least_recently_used_and_logs_once(
        path: str, logged: List[Any]) -> None:
    """Full of live counters, a new counter evicts the least recently used one (as Kong's
    shared dict does), is counted normally, and the eviction is logged once."""
    with SharedCounters.open(path, slots=8) as table:
        for i in range(8):
            table.increment("k%d" % i, 0, BIG)
        for i in (3, 1, 2, 0, 4, 5, 6, 7):  # k3 is now the least recently used
            table.increment("k%d" % i, 0, BIG)
        assert table.usage([Counter("new", 0, BIG, 1)]) == (True, [1])
        assert table.get("k3", 0) == 0
        assert [table.get("k%d" % i, 0) for i in (0, 1, 2, 4, 5, 6, 7)] == [2] * 7
        assert table.usage([Counter("newer", 0, BIG, 1)]) == (True, [1])
        assert table.get("k1", 0) == 0
        assert table.stats() == {"capacity": 8, "used": 8, "evictions": 2}
    full = messages(logged, "rate-limiting shared counters are full")
    assert len(full) == 1 and full[0]["capacity"] == 8


# -- files: create, attach, open, refuse ---------------------------------------------------


def test_geometry_and_file_size(path: str) -> None:
    """slots counters fit at a load of at most 3/4: 128-byte header plus 128-byte slots."""
    with SharedCounters.create(path, slots=300) as table:
        assert (table.capacity, table.table_size) == (300, 401)
        assert os.path.getsize(path) == 128 + 401 * 128
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)


def test_attach_sees_counters_of_another_instance(path: str) -> None:
    """Two instances on one file (as two workers) share every counter."""
    with SharedCounters.create(path, slots=10) as master, SharedCounters.attach(path) as worker:
        assert master.usage([Counter("k", 0, 60, 2)]) == (True, [1])
        assert worker.usage([Counter("k", 0, 60, 2)]) == (True, [2])
        assert master.usage([Counter("k", 0, 60, 2)]) == (False, [3])


def test_create_replaces_a_previous_file_without_touching_its_users(path: str) -> None:
    """create() starts fresh; a process still mapping the old file keeps its own copy."""
    old = SharedCounters.create(path, slots=10)
    old.increment("k", 0, 60, 7)
    with SharedCounters.create(path, slots=20) as new, SharedCounters.attach(path) as worker:
        assert (new.get("k", 0), worker.get("k", 0), worker.capacity) == (0, 0, 20)
        assert old.get("k", 0) == 7
    old.close()
    assert sorted(os.listdir(os.path.dirname(path))) == ["rl.shm"]


def test_open_keeps_a_valid_file_and_replaces_one_of_another_capacity(path: str) -> None:
    """open() attaches a valid table of the same capacity, and recreates one of another."""
    with SharedCounters.open(path, slots=10) as first:
        first.increment("k", 0, 60, 3)
    with SharedCounters.open(path, slots=10) as again:
        assert again.get("k", 0) == 3
    with SharedCounters.open(path, slots=11) as other:
        assert (other.capacity, other.get("k", 0)) == (11, 0)


def test_attach_refuses_a_missing_file(path: str) -> None:
    with pytest.raises(SharedCountersError) as info:
        SharedCounters.attach(path)
    assert str(info.value) == (
        "rate-limiting shared counters file %s does not exist (the master creates it at start)"
        % path)


def _version(data: bytearray) -> None:
    struct.pack_into("<I", data, 8, 2)


def _checksum(data: bytearray) -> None:
    data[24] ^= 0xFF  # the capacity, under the checksum


def _truncated(data: bytearray) -> None:
    del data[-128:]


def _garbage(data: bytearray) -> None:
    data[:] = b"\x00not a counters file" * 100


@pytest.mark.parametrize("damage, message", [
    (_garbage, "{path} is not a kongtx rate-limiting shared counters file"),
    (_version, "{path} holds rate-limiting shared counters of format version 2; this kongtx "
               "reads version 1 (restart the node so that the master creates it anew)"),
    (_checksum, "rate-limiting shared counters file {path} is corrupt: header checksum mismatch"),
    (_truncated, "rate-limiting shared counters file {path} is corrupt: 1920 bytes, "
                 "expected 2048"),
])
def test_a_damaged_or_foreign_file_is_refused_by_attach_and_reset_by_open(
        path: str, damage: Any, message: str) -> None:
    """attach() says what is wrong with the file; open() and create() replace it."""
    SharedCounters.create(path, slots=10).close()
    with open(path, "rb") as f:
        data = bytearray(f.read())
    damage(data)
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(SharedCountersError) as info:
        SharedCounters.attach(path)
    assert str(info.value) == message.format(path=path)
    with SharedCounters.open(path, slots=10) as table:
        assert table.increment("k", 0, 60) == 1
    with SharedCounters.attach(path) as table:
        assert table.get("k", 0) == 1
    damage(data)
    with open(path, "wb") as f:
        f.write(data)
    with SharedCounters.create(path, slots=10) as table:
        assert table.get("k", 0) == 0


def test_bad_slots_and_closed_tables_are_errors(path: str) -> None:
    with pytest.raises(SharedCountersError):
        SharedCounters.create(path, slots=0)
    table = SharedCounters.create(path, slots=1)
    table.close()
    table.close()
    with pytest.raises(SharedCountersError):
        table.get("k", 0)


def test_a_half_done_change_is_repaired_by_the_next_process(path: str, logged: List[Any]) -> None:
    """The dirty flag left by a process that died mid-change makes the next caller rebuild
    the table: duplicates and damaged slots are dropped, counts kept."""
    with SharedCounters.create(path, slots=8) as table:
        table.increment("a", 0, 60, 5)
        table.increment("b", 0, 60, 2)
        mm = table._mm
        assert mm is not None
        a_off, hit = table._find(mm, *shared._ident("a", 0))
        assert hit
        copy = bytes(mm[a_off:a_off + shared.SLOT_SIZE])
        spare = [shared.HEADER_SIZE + i * shared.SLOT_SIZE for i in range(table.table_size)
                 if not mm[shared.HEADER_SIZE + i * shared.SLOT_SIZE + 4]]
        mm[spare[0]:spare[0] + shared.SLOT_SIZE] = copy  # a duplicate of "a"
        mm[spare[1]:spare[1] + shared.SLOT_SIZE] = copy[:8] + b"\xff" * 8 + copy[16:]  # torn
        mm[shared._DIRTY_OFF] = 1
        assert table.get("a", 0) == 5
        assert table.stats()["used"] == 2
        assert table.increment("b", 0, 60) == 3
    repaired = messages(logged, "rate-limiting shared counters: a process died")
    assert [(e["kept"], e["dropped"]) for e in repaired] == [(2, 2)]


# -- real processes -----------------------------------------------------------------------

WORKER = r"""
import sys
from kongtx.plugins.rate_limiting.policies import Counter
from kongtx.plugins.rate_limiting.shared import SharedCounters
mode, path, attempts, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ready = sys.stdin.readline()  # everyone starts at once
table = SharedCounters.attach(path) if mode == "attach" else SharedCounters.open(path, 64)
print("ready", flush=True)
sys.stdin.readline()
allowed = 0
for _ in range(attempts):
    ok, _values = table.usage([Counter("minute", 0, 60, limit), Counter("hour", 0, 3600, 10 ** 6)])
    allowed += ok
print(allowed, flush=True)
"""


def run_workers(mode: str, path: str, processes: int, attempts: int, limit: int) -> List[int]:
    """Starts ``processes`` interpreters that open ``path`` together, then all call usage()
    ``attempts`` times at once; returns how many each was allowed."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, mode, path, str(attempts),
                                 str(limit)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                cwd=ROOT, env=env, text=True)
               for _ in range(processes)]
    try:
        for w in workers:  # all imported: open at once
            assert w.stdin is not None
            w.stdin.write("open\n")
            w.stdin.flush()
        for w in workers:
            assert w.stdout is not None
            assert w.stdout.readline() == "ready\n"
        for w in workers:  # all attached: count at once
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        return [int(w.communicate(timeout=120)[0]) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()


def test_four_processes_admit_exactly_the_limit(path: str) -> None:
    """4 worker processes × 500 attempts against a limit of 1000: exactly 1000 pass, and
    the refused ones add to no counter."""
    SharedCounters.create(path, slots=64).close()
    allowed = run_workers("attach", path, 4, 500, 1000)
    assert sum(allowed) == 1000
    with SharedCounters.attach(path) as table:
        assert (table.get("minute", 0), table.get("hour", 0)) == (1000, 1000)


@pytest.mark.parametrize("before", ["missing", "corrupt"])
def test_processes_opening_at_once_share_one_file(path: str, before: str) -> None:
    """Several processes open() a missing or corrupt file at the same moment: they all
    end up on the same table (every addition lands in one counter)."""
    if before == "corrupt":
        with open(path, "wb") as f:
            f.write(b"garbage" * 1000)
    allowed = run_workers("open", path, 4, 200, 10 ** 6)
    assert allowed == [200] * 4
    with SharedCounters.attach(path) as table:
        assert table.get("minute", 0) == 800
    assert sorted(os.listdir(os.path.dirname(path))) == ["rl.shm"]


DIES_HOLDING_THE_LOCK = r"""
import os, signal, sys
from kongtx.plugins.rate_limiting.shared import SharedCounters, _DIRTY_OFF
table = SharedCounters.attach(sys.argv[1])
mm = table._acquire()
mm[_DIRTY_OFF] = 1
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_killed_holding_the_lock_does_not_stop_the_others(path: str) -> None:
    """SIGKILL inside the critical section: the kernel drops the flock and the next caller
    repairs the table and carries on."""
    with SharedCounters.create(path, slots=8) as table:
        table.increment("k", 0, 60, 4)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run([sys.executable, "-c", DIES_HOLDING_THE_LOCK, path], cwd=ROOT,
                              env=env, timeout=60)
        assert done.returncode == -signal.SIGKILL
        import fcntl

        with open(path, "rb") as probe:  # the lock is free (would block forever otherwise)
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(probe.fileno(), fcntl.LOCK_UN)
        assert table.usage([Counter("k", 0, 60, 5)]) == (True, [5])
        assert table.stats()["used"] == 1
