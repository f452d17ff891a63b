"""Rate-limiting ``local`` counters in memory shared by every worker process of a node.

With ``nginx_worker_processes`` above one, a node runs a master and N worker
processes (separate interpreters, not forks). Kong's ``local`` policy counts
per node in nginx shared memory, so a limit of 50/minute lets exactly 50
requests through across all workers together. :class:`SharedCounters` is the
same thing for kongtx: a fixed-size hash table in a file that every process of
the node maps ``MAP_SHARED``, with the API of :class:`kongtx.store.memory.Counters`
(``get``, ``increment``) plus ``usage``, the ``local`` policy's all-or-nothing
check-and-add as one atomic step across processes.

The file
    A 128-byte header then ``table_size`` slots of 128 bytes. The header holds a
    magic string, the format :data:`VERSION`, the geometry (slot size, key size,
    capacity, table size) and a CRC32 of those; then the mutable part: a *dirty*
    flag, the number of counters, the newest window start seen, the sweep
    cursor, a use clock and the eviction count. Put the file on a tmpfs
    (``/dev/shm``) where there is one: its pages are memory only, so the kernel
    never writes them back to a disk and no page fault under the lock waits for
    a device. A file in the node's prefix works too (the pages are allocated
    up front with ``posix_fallocate``, so a full disk fails :meth:`create`
    rather than killing a worker with SIGBUS later); on a disk the kernel writes
    the dirty pages back in the background, which costs I/O but no correctness.
    The path must not be on NFS (``flock`` there is not reliable).

Creating and attaching
    The master calls :meth:`SharedCounters.create` at start: it builds a fresh
    file under a temporary name and renames it over ``path``, so a file left by
    a previous run is never reused and is never truncated under a process that
    still maps it (that would be SIGBUS); such a process keeps its own, now
    unnamed, copy. Workers call :meth:`SharedCounters.attach`, which never
    creates: it validates the header (magic, version, checksum, geometry, file
    size) and raises :class:`SharedCountersError` with a message saying what is
    wrong. :meth:`SharedCounters.open` creates or attaches for a single process
    or for tests, and is safe when several processes call it at once: a missing
    file is published with ``link`` (exactly one creator wins, the others attach
    the winner's); an invalid file or one of another capacity is replaced while
    its lock is held, and every opener re-checks after locking that ``path``
    still names the file it opened, so nobody ends up alone on a replaced copy.

Slots and keys
    Open addressing with linear probing from ``crc32(key, window_start) %
    table_size``. A slot holds the hash, the window start, the key, the expiry
    (``window_start + ttl``), the value and the clock of its last use. Keys up to
    :data:`KEY_MAX` (88) UTF-8 bytes are stored as they are; a longer key is
    stored as its SHA-256 digest, flagged as such. A lookup compares the hash,
    the window start, the flag, the length and every stored byte (one slice
    comparison), so two keys are never confused (short keys exactly, long keys
    unless SHA-256 collides). Deletion shifts the following entries of the probe
    run back (no tombstones), so probe runs stay short however many counters
    come and go. The table holds at most
    ``capacity`` counters in ``ceil(capacity * 4 / 3) + 1`` slots (load at most
    3/4, at least one slot always empty).

Expiry and reclaim
    As in ``Counters``, there is no clock: the newest window start seen stands
    for "now", and a counter whose expiry is before it is expired, so nothing is
    reclaimed early. Each new counter first examines :data:`SWEEP_STEP` slots at a
    cursor that walks the table, reclaiming expired counters: the table is swept
    continuously, a few slots at a time, never in one long pass under the lock.

When the table is full
    Kong's shared dict evicts the least recently used items when it has no room,
    and so does this table, approximately: a new counter in a full table first
    makes the sweep examine :data:`FULL_SCAN` slots, reclaiming expired counters;
    if none of them had expired, the least recently used counter among those
    slots is evicted (a sampled LRU, like Redis's). The counters of past windows
    are the least recently used ones, so these go first; evicting a live counter
    resets it, which lets that key through more often (fail open for one key,
    never refusing a request that is within its limits). The first eviction is
    logged once per process, with the capacity to raise; :meth:`stats` counts
    evictions.

Locking
    One ``flock(LOCK_EX)``/``flock(LOCK_UN)`` pair on the file per call (1 to
    1.5 µs; a whole ``usage`` of two counters is about 5 µs on CPython 3.11,
    3 µs on PyPy): nothing does I/O, allocates pages, logs or waits while it is
    held, and the work under it is bounded (at most :data:`FULL_SCAN` slots
    examined, unless they are all empty), so a waiting reactor thread waits
    microseconds. ``flock`` rather than POSIX
    ``lockf``: ``lockf`` locks belong to the process (two instances in one
    process would not exclude each other, and closing any descriptor of the file
    drops the lock) and cost more per pair; ``flock`` locks belong to the open
    file description, which each :class:`SharedCounters` opens for itself. Both
    are released by the kernel when their holder dies, which a POSIX or SysV
    semaphore is not (a worker killed while holding one would stop the node).
    One instance belongs to one thread (the reactor's): threads sharing an
    instance share its file description and would not exclude each other.

Crash safety
    Adding to a counter is one 16-byte write (value and last use). A change of
    structure (a new counter, with the reclaiming or evicting it may do) first
    sets the header's dirty flag and clears it when done. A process killed
    inside that window (microseconds) leaves the flag set, the kernel releases
    its lock, and the next process to lock rebuilds the table from the slots it
    finds (dropping any that do not check out and the duplicates a half-done
    shift may have left, recounting the counters; one pass over the table under
    the lock, about 0.2 s for a full default-size table, once per crash). At
    worst the counter being added is lost, or one being moved (reset to 0, as
    if evicted).

Pure Python and the standard library (``mmap``, ``fcntl``, ``struct``,
``zlib``, ``hashlib``); Unix only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import struct
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.logger import Logger

__all__ = ["SharedCounters", "SharedCountersError", "VERSION", "DEFAULT_SLOTS", "KEY_MAX"]

_log = Logger()

#: Version of the file format; a file of another version is refused by ``attach``.
VERSION = 1
MAGIC = b"KTXRLCNT"
#: Counters a table holds by default: about 11 MiB, near Kong's 12m ``kong_rate_limiting_counters``.
DEFAULT_SLOTS = 65536
HEADER_SIZE = 128
SLOT_SIZE = 128
#: Slot layout: a head (hash u32, state u8 = 1 when used, kind u8 = 1 when the key is a
#: SHA-256 digest, key length u16, window start i64), the key, then at the slot's end its
#: expiry i64, value i64 and last use u64. Head and key together identify a counter: a
#: lookup compares them in one slice.
_HEAD = struct.Struct("<IBBHq")
KEY_OFF = _HEAD.size
_TAIL = struct.Struct("<qqQ")
_EXPIRES_OFF = SLOT_SIZE - _TAIL.size
_VALUE_OFF = _EXPIRES_OFF + 8
_USED_AT_OFF = _VALUE_OFF + 8
#: Longest key stored as it is (UTF-8 bytes); longer keys are stored as their SHA-256.
KEY_MAX = _EXPIRES_OFF - KEY_OFF
_STATE_OFF = 4
_Q = struct.Struct("<q")
_QQ = struct.Struct("<qQ")  # value, last use

#: magic, version, header size, slot size, key max, capacity, table size; then its CRC32.
_GEOMETRY = struct.Struct("<8sIIIIII")
_CRC = struct.Struct("<I")
_CRC_OFF = _GEOMETRY.size
#: Mutable header fields.
_DIRTY_OFF = 64
_USED_OFF = 68      # u32
_LATEST_OFF = 72    # i64, newest window start seen
_CURSOR_OFF = 80    # u64, next slot the sweep examines
_CLOCK_OFF = 88     # u64, bumped by every change: a slot's "last use"
_EVICTIONS_OFF = 96  # u64
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

#: Slots examined (expired counters reclaimed) before each new counter is added.
SWEEP_STEP = 4
#: Slots examined when the table is full before the least recently used one is evicted.
FULL_SCAN = 64
_OPEN_ATTEMPTS = 20
_ZEROS = bytes(1 << 20)

MSG_MISSING = ("rate-limiting shared counters file %s does not exist (the master creates it "
               "at start)")
MSG_CANNOT_OPEN = "cannot open rate-limiting shared counters file %s: %s"
MSG_NOT_OURS = "%s is not a kongtx rate-limiting shared counters file"
MSG_VERSION = ("%s holds rate-limiting shared counters of format version %d; this kongtx "
               "reads version %d (restart the node so that the master creates it anew)")
MSG_CORRUPT = "rate-limiting shared counters file %s is corrupt: %s"
MSG_ALLOCATE = "cannot allocate %d bytes for rate-limiting shared counters at %s: %s"
MSG_BAD_SLOTS = "rate-limiting shared counters need at least 1 slot, got %r"
MSG_UNSTABLE = "rate-limiting shared counters file %s kept being replaced while opening it"
MSG_CLOSED = "rate-limiting shared counters are closed"
LOG_FULL = ("rate-limiting shared counters are full ({capacity} counters): evicting the least "
            "recently used ones (raise the number of slots)")
LOG_REPAIRED = ("rate-limiting shared counters: a process died while changing them; rebuilt "
                "the table ({kept} counters kept, {dropped} dropped)")


class SharedCountersError(Exception):
    """The counters file is missing, unreadable, corrupt or of another format version."""


def _ident(key: str, window_start: int) -> Tuple[int, bytes]:
    """``(hash, head + key)``: what a used slot of this counter starts with.

    The key is stored as UTF-8, or as its SHA-256 (kind 1) when longer than
    KEY_MAX; the hash is their CRC32 seeded by the window start.
    """
    raw = key.encode("utf-8", "surrogatepass")
    kind = 0
    if len(raw) > KEY_MAX:
        raw = hashlib.sha256(raw).digest()
        kind = 1
    h = zlib.crc32(raw, (window_start + kind) & 0xFFFFFFFF)
    return h, _HEAD.pack(h, 1, kind, len(raw), window_start) + raw


def _table_size(capacity: int) -> int:
    """Slots for ``capacity`` counters at a load of at most 3/4 (one always empty)."""
    return -(-capacity * 4 // 3) + 1


def _geometry(capacity: int) -> bytes:
    head = _GEOMETRY.pack(MAGIC, VERSION, HEADER_SIZE, SLOT_SIZE, KEY_MAX, capacity,
                          _table_size(capacity))
    return head + _CRC.pack(zlib.crc32(head))


def _read_geometry(fd: int, path: str) -> Tuple[int, int]:
    """``(capacity, table_size)`` of an open counters file, or :class:`SharedCountersError`."""
    length = os.fstat(fd).st_size
    head = os.pread(fd, HEADER_SIZE, 0)
    if len(head) < HEADER_SIZE or head[:len(MAGIC)] != MAGIC:
        raise SharedCountersError(MSG_NOT_OURS % (path,))
    magic, version, header, slot, key_max, capacity, size = _GEOMETRY.unpack_from(head)
    if version != VERSION:
        raise SharedCountersError(MSG_VERSION % (path, version, VERSION))
    if _CRC.unpack_from(head, _CRC_OFF)[0] != zlib.crc32(head[:_CRC_OFF]):
        raise SharedCountersError(MSG_CORRUPT % (path, "header checksum mismatch"))
    if (header, slot, key_max) != (HEADER_SIZE, SLOT_SIZE, KEY_MAX) or capacity < 1 \
            or size != _table_size(capacity):
        raise SharedCountersError(MSG_CORRUPT % (path, "unexpected geometry"))
    if length != HEADER_SIZE + size * SLOT_SIZE:
        raise SharedCountersError(MSG_CORRUPT % (
            path, "%d bytes, expected %d" % (length, HEADER_SIZE + size * SLOT_SIZE)))
    return capacity, size


def _new_file(path: str, capacity: int, mode: int) -> Tuple[int, str]:
    """A fresh, fully allocated counters file at a temporary name beside ``path``."""
    if not isinstance(capacity, int) or capacity < 1:
        raise SharedCountersError(MSG_BAD_SLOTS % (capacity,))
    tmp = "%s.%d.%s.tmp" % (path, os.getpid(), os.urandom(4).hex())
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise SharedCountersError(MSG_CANNOT_OPEN % (path, e.strerror or e)) from e
    total = HEADER_SIZE + _table_size(capacity) * SLOT_SIZE
    try:
        try:
            os.posix_fallocate(fd, 0, total)
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL,
                                                          errno.ENOSYS):
                raise
            written = 0
            while written < total:
                written += os.write(fd, _ZEROS[:min(len(_ZEROS), total - written)])
        os.pwrite(fd, _geometry(capacity), 0)
    except OSError as e:
        os.close(fd)
        os.unlink(tmp)
        raise SharedCountersError(MSG_ALLOCATE % (total, path, e.strerror or e)) from e
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


class SharedCounters:
    """Windowed counters shared by every process that maps the same file.

    Build one with :meth:`create` (the master), :meth:`attach` (a worker) or
    :meth:`open` (create or attach). ``get``/``increment`` behave as
    :class:`kongtx.store.memory.Counters`; :meth:`usage` is the ``local``
    policy's check-and-add, atomic across processes. See the module docstring.
    """

    def __init__(self, fd: int, path: str) -> None:
        """Maps the counters file open on ``fd`` (validated); takes ownership of ``fd``."""
        try:
            self.capacity, self.table_size = _read_geometry(fd, path)
            self._mm: Optional[mmap.mmap] = mmap.mmap(
                fd, HEADER_SIZE + self.table_size * SLOT_SIZE, mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self._fd = fd
        self._moves = 0
        self._noted_full = False
        self._log_after: List[Tuple[str, Dict[str, Any]]] = []
        mm = self._mm
        if _U32.unpack_from(mm, _USED_OFF)[0] > self.capacity \
                or _U64.unpack_from(mm, _CURSOR_OFF)[0] >= self.table_size:
            mm[_DIRTY_OFF] = 1  # implausible: rebuilt under the lock on first use

    # -- building ------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, slots: int = DEFAULT_SLOTS, mode: int = 0o600) -> "SharedCounters":
        """A fresh table for ``slots`` counters at ``path``, replacing any file there.

        The new file is built under a temporary name and renamed over ``path``:
        processes still mapping an old file keep it and never see a torn one.
        ``mode`` is the file's permission bits (workers running as another user
        need to be able to read and write it).
        """
        fd, tmp = _new_file(path, slots, mode)
        try:
            os.replace(tmp, path)
        except OSError as e:
            os.close(fd)
            os.unlink(tmp)
            raise SharedCountersError(MSG_CANNOT_OPEN % (path, e.strerror or e)) from e
        return cls(fd, path)

    @classmethod
    def attach(cls, path: str) -> "SharedCounters":
        """The table another process created at ``path``; never creates one.

        Raises :class:`SharedCountersError` when the file is missing, cannot be
        opened read-write, is not a counters file, has another format version
        or does not check out.
        """
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as e:
            raise SharedCountersError(MSG_MISSING % (path,)) from e
        except OSError as e:
            raise SharedCountersError(MSG_CANNOT_OPEN % (path, e.strerror or e)) from e
        return cls(fd, path)

    @classmethod
    def open(cls, path: str, slots: int = DEFAULT_SLOTS, mode: int = 0o600) -> "SharedCounters":
        """Attaches the table at ``path`` if it is valid and holds ``slots`` counters,
        else creates it (replacing an invalid file or one of another capacity).

        Safe when several processes open the same path at once: they all end up
        on the same file. Counters left in a valid file are kept.
        """
        if not isinstance(slots, int) or slots < 1:
            raise SharedCountersError(MSG_BAD_SLOTS % (slots,))
        for _ in range(_OPEN_ATTEMPTS):
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                fd, tmp = _new_file(path, slots, mode)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    os.close(fd)
                    continue  # another process published first: attach its file
                except OSError as e:
                    os.close(fd)
                    raise SharedCountersError(MSG_CANNOT_OPEN % (path, e.strerror or e)) from e
                finally:
                    os.unlink(tmp)
                return cls(fd, path)
            except OSError as e:
                raise SharedCountersError(MSG_CANNOT_OPEN % (path, e.strerror or e)) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not _names(path, fd):
                    os.close(fd)
                    continue  # replaced while we waited for the lock
                try:
                    valid = _read_geometry(fd, path)[0] == slots
                except SharedCountersError:
                    valid = False
                if valid:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                else:
                    # Invalid or another capacity: replace it while holding its lock.
                    new_fd, tmp = _new_file(path, slots, mode)
                    try:
                        os.replace(tmp, path)
                    except OSError as e:
                        os.close(new_fd)
                        os.unlink(tmp)
                        raise SharedCountersError(
                            MSG_CANNOT_OPEN % (path, e.strerror or e)) from e
                    os.close(fd)  # drops our lock on the replaced file
                    fd = new_fd
            except BaseException:
                os.close(fd)
                raise
            return cls(fd, path)
        raise SharedCountersError(MSG_UNSTABLE % (path,))

    def close(self) -> None:
        """Unmaps the table and closes the file (the file itself stays)."""
        if self._mm is not None:
            self._mm.close()
            self._mm = None
            os.close(self._fd)

    def __enter__(self) -> "SharedCounters":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- the Counters API ----------------------------------------------------------

    def get(self, counter_key: str, window_start: int) -> int:
        """The counter's value (0 when absent)."""
        h, ident = _ident(counter_key, window_start)
        mm = self._acquire()
        try:
            off, hit = self._find(mm, h, ident)
            return _Q.unpack_from(mm, off + _VALUE_OFF)[0] if hit else 0
        finally:
            self._release()

    def increment(
        self, counter_key: str, window_start: int, ttl: int, amount: int = 1,
        limit: Optional[int] = None,
    ) -> int:
        """Adds ``amount`` unless the result would exceed ``limit``; see ``IStore.increment``."""
        h, ident = _ident(counter_key, window_start)
        mm = self._acquire()
        try:
            off, hit = self._find(mm, h, ident)
            value = (_Q.unpack_from(mm, off + _VALUE_OFF)[0] if hit else 0) + amount
            if limit is not None and value > limit:
                return value
            clock = _U64.unpack_from(mm, _CLOCK_OFF)[0] + 1
            _U64.pack_into(mm, _CLOCK_OFF, clock)
            if hit:
                _QQ.pack_into(mm, off + _VALUE_OFF, value, clock)
            else:
                self._insert(mm, h, ident, window_start, ttl, value, clock)
            return value
        finally:
            self._release()

    def usage(self, counters: Sequence[Any]) -> Tuple[bool, List[int]]:
        """Adds 1 to every counter (``key``, ``window_start``, ``ttl``, ``limit``
        attributes, as ``policies.Counter``) unless one would pass its limit.

        ``(allowed, values)``: the values after the request, or for a refused
        request what they would have been (then nothing is added). One atomic
        step across every process of the node.
        """
        idents = [_ident(c.key, c.window_start) for c in counters]
        mm = self._acquire()
        try:
            found: List[int] = []
            values: List[int] = []
            allowed = True
            for (h, ident), c in zip(idents, counters):
                off, hit = self._find(mm, h, ident)
                value = (_Q.unpack_from(mm, off + _VALUE_OFF)[0] if hit else 0) + 1
                values.append(value)
                found.append(off if hit else -1)
                if value > c.limit:
                    allowed = False
            if not allowed:
                return False, values
            clock = _U64.unpack_from(mm, _CLOCK_OFF)[0] + 1
            _U64.pack_into(mm, _CLOCK_OFF, clock)
            moves = self._moves
            for (h, ident), c, off in zip(idents, counters, found):
                if off < 0 or self._moves != moves:  # new, or entries moved since the lookup
                    off, hit = self._find(mm, h, ident)
                    if not hit:
                        self._insert(mm, h, ident, c.window_start, c.ttl, 1, clock)
                        continue
                _QQ.pack_into(mm, off + _VALUE_OFF, _Q.unpack_from(mm, off + _VALUE_OFF)[0] + 1,
                              clock)
            return True, values
        finally:
            self._release()

    def stats(self) -> Dict[str, int]:
        """``capacity``, ``used`` (counters held now) and ``evictions`` (ever, by any process)."""
        mm = self._acquire()
        try:
            return {"capacity": self.capacity, "used": _U32.unpack_from(mm, _USED_OFF)[0],
                    "evictions": _U64.unpack_from(mm, _EVICTIONS_OFF)[0]}
        finally:
            self._release()

    # -- under the lock ------------------------------------------------------------

    def _acquire(self) -> mmap.mmap:
        mm = self._mm
        if mm is None:
            raise SharedCountersError(MSG_CLOSED)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        if mm[_DIRTY_OFF]:
            try:
                self._repair(mm)
            except BaseException:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                raise
        return mm

    def _release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        if self._log_after:
            pending, self._log_after = self._log_after, []
            for message, fields in pending:
                _log.warn(message, **fields)

    def _find(self, mm: mmap.mmap, h: int, ident: bytes) -> Tuple[int, bool]:
        """``(offset, True)`` of the slot starting with ``ident``, or ``(offset, False)``
        of the empty slot that ends its probe run."""
        size = self.table_size
        i = h % size
        n = len(ident)
        for _ in range(size):
            off = HEADER_SIZE + i * SLOT_SIZE
            found = mm[off:off + n]
            if found == ident:
                return off, True
            if not found[_STATE_OFF]:
                return off, False
            i += 1
            if i == size:
                i = 0
        mm[_DIRTY_OFF] = 1  # no empty slot: impossible unless damaged; rebuilt next time
        raise SharedCountersError(MSG_CORRUPT % (self.path, "no empty slot"))

    def _insert(self, mm: mmap.mmap, h: int, ident: bytes, window_start: int, ttl: int,
                value: int, clock: int) -> None:
        """Adds a counter that is not in the table, making room first. The dirty flag
        is up meanwhile (entries move, several words change)."""
        mm[_DIRTY_OFF] = 1
        if window_start > _Q.unpack_from(mm, _LATEST_OFF)[0]:
            _Q.pack_into(mm, _LATEST_OFF, window_start)
        used = _U32.unpack_from(mm, _USED_OFF)[0]
        if used >= self.capacity:
            used -= self._sweep(mm, FULL_SCAN, evict=True)
        else:
            used -= self._sweep(mm, SWEEP_STEP, evict=False)
        off, _ = self._find(mm, h, ident)
        _TAIL.pack_into(mm, off + _EXPIRES_OFF, window_start + ttl, value, clock)
        mm[off:off + len(ident)] = ident
        _U32.pack_into(mm, _USED_OFF, used + 1)
        mm[_DIRTY_OFF] = 0

    def _sweep(self, mm: mmap.mmap, count: int, evict: bool) -> int:
        """Examines ``count`` slots at the cursor, reclaiming expired counters; with
        ``evict`` and none expired, evicts the least recently used one seen (examining
        on until a counter is seen). Returns how many counters were removed."""
        size = self.table_size
        now = _Q.unpack_from(mm, _LATEST_OFF)[0]
        cursor = _U64.unpack_from(mm, _CURSOR_OFF)[0] % size
        removed = 0
        oldest: Optional[Tuple[int, int]] = None  # (last use, slot)
        for examined in range(size):
            if examined >= count and (removed or oldest is not None or not evict):
                break
            off = HEADER_SIZE + cursor * SLOT_SIZE
            if mm[off + _STATE_OFF]:
                expires = _Q.unpack_from(mm, off + _EXPIRES_OFF)[0]
                if expires < now:
                    self._delete(mm, cursor)
                    removed += 1
                    continue  # the slot may now hold a shifted counter: examine it too
                used_at = _U64.unpack_from(mm, off + _USED_AT_OFF)[0]
                if oldest is None or used_at < oldest[0]:
                    oldest = (used_at, cursor)
            cursor += 1
            if cursor == size:
                cursor = 0
        _U64.pack_into(mm, _CURSOR_OFF, cursor)
        if evict and not removed and oldest is not None:
            self._delete(mm, oldest[1])
            removed = 1
            _U64.pack_into(mm, _EVICTIONS_OFF, _U64.unpack_from(mm, _EVICTIONS_OFF)[0] + 1)
            if not self._noted_full:
                self._noted_full = True
                self._log_after.append((LOG_FULL, {"capacity": self.capacity}))
        return removed

    def _delete(self, mm: mmap.mmap, slot: int) -> None:
        """Empties ``slot``, shifting later entries of its probe run back (no tombstones)."""
        size = self.table_size
        hole = slot
        j = slot
        self._moves += 1
        while True:
            j += 1
            if j == size:
                j = 0
            off = HEADER_SIZE + j * SLOT_SIZE
            if not mm[off + _STATE_OFF]:
                break
            home = _U32.unpack_from(mm, off)[0] % size
            # The entry at j may move into the hole unless its home lies cyclically in (hole, j].
            if (hole < home <= j) if hole <= j else (home > hole or home <= j):
                continue
            hole_off = HEADER_SIZE + hole * SLOT_SIZE
            mm[hole_off:hole_off + SLOT_SIZE] = mm[off:off + SLOT_SIZE]
            hole = j
        hole_off = HEADER_SIZE + hole * SLOT_SIZE
        mm[hole_off:hole_off + SLOT_SIZE] = bytes(SLOT_SIZE)

    def _repair(self, mm: mmap.mmap) -> None:
        """Rebuilds the table from its slots after a process died while changing it."""
        size = self.table_size
        entries: Dict[bytes, bytes] = {}
        dropped = 0
        for i in range(size):
            off = HEADER_SIZE + i * SLOT_SIZE
            if not mm[off + _STATE_OFF]:
                continue
            slot = mm[off:off + SLOT_SIZE]
            h, state, kind, klen, ws = _HEAD.unpack_from(slot)
            ident = slot[:KEY_OFF + klen]
            if state != 1 or kind > 1 or klen > KEY_MAX or (kind == 1 and klen != 32) \
                    or h != zlib.crc32(ident[KEY_OFF:], (ws + kind) & 0xFFFFFFFF) \
                    or ident in entries or len(entries) >= self.capacity:
                dropped += 1
                continue
            entries[ident] = slot
        mm[HEADER_SIZE:HEADER_SIZE + size * SLOT_SIZE] = bytes(size * SLOT_SIZE)
        for ident, slot in entries.items():
            off, _ = self._find(mm, _HEAD.unpack_from(slot)[0], ident)
            mm[off:off + SLOT_SIZE] = slot
        _U32.pack_into(mm, _USED_OFF, len(entries))
        _U64.pack_into(mm, _CURSOR_OFF, _U64.unpack_from(mm, _CURSOR_OFF)[0] % size)
        self._moves += 1
        mm[_DIRTY_OFF] = 0
        self._log_after.append((LOG_REPAIRED, {"kept": len(entries), "dropped": dropped}))


def _names(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file open on ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)
