"""Shared-memory payloads for messages between processes on one host.

A large message's arrays can travel in a POSIX shared-memory segment (a file in
``/dev/shm``) instead of through the socket: the sender writes them once, the message
carries only the segment's name, and the receiver maps it copy-on-write (its arrays are
private and writable, and no byte is copied on the way). Two kinds of segment:

* *transfer* segments are written for one message; the receiver unlinks the name as soon
  as it has mapped it (the sender unlinks it if the message never arrived);
* *owned* segments (:class:`SegmentPool`) hold arrays this process keeps (the server's
  global model): a message whose arrays all lie in one is sent by reference, to any number
  of receivers. They are written again once nobody uses them, so a round's model lands in
  pages that are already mapped (a fresh page costs more than copying into it); those the
  pool does not keep are unlinked when their last array is gone. Every reader holds a
  shared ``flock`` on the segment for as long as its mapping lives (a crashed reader's lock
  goes with it); the owner rewrites a segment only when its own arrays are gone and an
  exclusive lock can be taken, and bumps a generation number in the segment's first bytes
  first. A message names the generation it was sent with; a reader that maps the segment
  after it was rewritten (a stale message) gets a ProtocolError instead of another round's
  numbers.

Names are ``fedlift-SESSION-PID-N-RANDOM``; :func:`sweep` removes a session's leftovers
(a process killed between create and unlink), so nothing is leaked in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import mmap
import os
import re
import secrets
import stat
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProtocolError

__all__ = [
    "SESSION_ENV",
    "SHM_DIR",
    "SegmentPool",
    "available",
    "create_transfer",
    "locate",
    "open_segment",
    "prefetch",
    "session",
    "sweep",
    "unlink",
]

SHM_DIR = Path("/dev/shm")
SESSION_ENV = "FEDLIFT_SHM_SESSION"
_NAME = re.compile(r"^fedlift-[A-Za-z0-9]{1,64}-[0-9]{1,10}-[0-9]{1,20}-[0-9a-f]{8}$")
_ALIGN = 64
_MADV_POPULATE_READ = 22  # Linux >= 5.14; older kernels refuse it (EINVAL) and map lazily
_counter = itertools.count()
_default_session = secrets.token_hex(4)
_lock = threading.Lock()


@dataclass
class _Owned:
    base: int
    size: int
    ref: weakref.ref[mmap.mmap]
    gen: int
    """The segment's current generation."""


_MAGIC = b"FLSEG\x00\x00\x01"
_HEADER = 64  # pooled segments: magic + generation, then the arrays


_owned: dict[str, _Owned] = {}


def session() -> str:
    """This process's session id: ``$FEDLIFT_SHM_SESSION`` (set by the simulator) or random."""
    value = os.environ.get(SESSION_ENV, "")
    return value if value.isalnum() and len(value) <= 64 else _default_session


def available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def _new_name() -> str:
    return f"fedlift-{session()}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"


def _create(size: int) -> tuple[str, mmap.mmap]:
    name = _new_name()
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return name, mmap.mmap(fd, size, flags=flags)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def create_transfer(size: int) -> tuple[str, mmap.mmap]:
    """A segment for one message (the receiver unlinks it)."""
    return _create(max(size, 1))


def _base_address(buffer: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


Specs = list[tuple[tuple[int, ...], np.dtype[Any]]]


def _layout(specs: Specs, start: int) -> tuple[list[int], int]:
    offsets, total = [], start
    for shape, dtype in specs:
        offsets.append(total)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        total = (total + nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return offsets, total


def _views(
    buffer: mmap.mmap, specs: list[tuple[tuple[int, ...], np.dtype[Any]]], offsets: list[int]
) -> list[np.ndarray]:
    return [
        np.frombuffer(
            buffer, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=off
        ).reshape(shape)
        for (shape, dtype), off in zip(specs, offsets, strict=True)
    ]


class _Pooled:
    """One pooled segment: its name, an open descriptor (for ``flock``) and its mapping."""

    def __init__(self, size: int) -> None:
        self.name, self.buffer = _create(size)
        self.fd = os.open(SHM_DIR / self.name, os.O_RDWR | os.O_CLOEXEC)
        self.size = size
        self.gen = 0
        self.live = 0
        self.buffer[:8] = _MAGIC

    def claim(self) -> bool:
        """Take the segment for new contents if no reader maps it; bump its generation."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            self.gen += 1
            self.buffer[8:16] = self.gen.to_bytes(8, "little")
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True

    def close(self) -> None:
        with _lock:
            _owned.pop(self.name, None)
        unlink(self.name)
        os.close(self.fd)
        with contextlib.suppress(BufferError):  # an export still alive: the GC unmaps it
            self.buffer.close()


class SegmentPool:
    """Owned segments that are reused once free (see the module docstring).

    :meth:`allocate` has the :data:`~fedlift.server.Allocator` signature; its arrays'
    contents are unspecified (callers fill them). Free segments are kept for reuse: at
    least ``keep`` of them, and more while they total at most ``spare_bytes`` (small models:
    a segment that late readers still map is not traded for a new one every round, which
    would cost fresh pages each time). :meth:`close` (also at exit) removes them all.
    """

    def __init__(self, keep: int = 1, spare_bytes: int = 0) -> None:
        self._keep = keep
        self._spare_bytes = spare_bytes
        self._free: list[_Pooled] = []
        self._all: dict[str, _Pooled] = {}
        self._lock = threading.RLock()  # finalizers may run while this thread holds it
        self._finalizer = weakref.finalize(self, SegmentPool._close_all, self._all)

    def allocate(self, specs: list[tuple[tuple[int, ...], np.dtype[Any]]]) -> list[np.ndarray]:
        offsets, total = _layout(specs, _HEADER)
        segment = self._take(total)
        if segment is None:
            segment = _Pooled(total)
            with self._lock:
                self._all[segment.name] = segment
        with _lock:
            _owned[segment.name] = _Owned(
                _base_address(segment.buffer), segment.size, weakref.ref(segment.buffer),
                segment.gen,
            )  # fmt: skip
        arrays = _views(segment.buffer, specs, offsets)
        segment.live = len(arrays)
        for array in arrays:
            weakref.finalize(array, self._returned, segment)
        if not arrays:
            self._returned(segment, count=0)
        return arrays

    def _take(self, size: int) -> _Pooled | None:
        # Candidates leave the free list while they are tried, so that a finalizer running
        # meanwhile (any thread, any allocation) cannot trim one away under us.
        with self._lock:
            candidates = [s for s in self._free if s.size == size]
            for segment in candidates:
                self._free.remove(segment)
        taken = None
        for segment in candidates:
            if taken is None and segment.claim():
                taken = segment
        with self._lock:
            self._free.extend(s for s in candidates if s is not taken)
        return taken

    def _returned(self, segment: _Pooled, count: int = 1) -> None:
        surplus = []
        with self._lock:
            segment.live -= count
            if segment.live > 0 or segment.name not in self._all:
                return
            self._free.append(segment)
            while len(self._free) > self._keep and (
                sum(s.size for s in self._free) > self._spare_bytes
            ):
                old = self._free.pop(0)
                self._all.pop(old.name, None)
                surplus.append(old)
        for old in surplus:
            old.close()

    @property
    def segments(self) -> int:
        """How many segments the pool holds (in use or free)."""
        with self._lock:
            return len(self._all)

    def close(self) -> None:
        """Remove every free segment now; segments still in use go when their arrays do."""
        with self._lock:
            free, self._free = self._free, []
            for segment in free:
                self._all.pop(segment.name, None)
        for segment in free:
            segment.close()

    @staticmethod
    def _close_all(segments: dict[str, _Pooled]) -> None:
        for segment in list(segments.values()):
            unlink(segment.name)


def locate(arrays: list[np.ndarray]) -> tuple[str, int, list[int], int] | None:
    """If every non-empty array lies in one owned segment: (name, size, their offsets, its
    generation)."""
    with _lock:
        entries = [(name, e) for name, e in _owned.items() if e.ref() is not None]
    chosen: tuple[str, _Owned] | None = None
    offsets: list[int] = []
    for array in arrays:
        if array.nbytes == 0:
            offsets.append(0)
            continue
        if not array.flags.c_contiguous:
            return None
        address = int(array.__array_interface__["data"][0])

        def inside(entry: _Owned, address: int = address, n: int = array.nbytes) -> bool:
            return entry.base <= address <= entry.base + entry.size - n

        if chosen is None:
            chosen = next(((name, e) for name, e in entries if inside(e)), None)
            if chosen is None:
                return None
        elif not inside(chosen[1]):
            return None
        offsets.append(address - chosen[1].base)
    if chosen is None:
        return None
    return chosen[0], chosen[1].size, offsets, chosen[1].gen


def open_segment(
    name: str, size: int, populate: bool = True, gen: int | None = None
) -> mmap.mmap | bytearray:
    """Map a peer's segment copy-on-write (private, writable). Validates name and size.

    With ``gen`` (a pooled segment) the mapping holds a shared lock on the segment while it
    lives, and the segment must still be at that generation.

    ``populate`` maps every page at once (fast to read all of it, no copy); without it
    pages are mapped as they are touched.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProtocolError(f"invalid shared-memory segment name {name!r:.80}")
    if size == 0:
        return bytearray()
    try:
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolError(f"cannot open shared-memory segment {name}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise ProtocolError(f"shared-memory segment {name} is not a file of this user.")
        if info.st_size < size:
            raise ProtocolError(
                f"shared-memory segment {name} holds {info.st_size} bytes, not {size}."
            )
        if gen is not None:
            # Held by the mapping's own descriptor (mmap keeps a duplicate) until it is gone.
            fcntl.flock(fd, fcntl.LOCK_SH)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    if gen is not None and (
        size < _HEADER or mapping[:8] != _MAGIC or int.from_bytes(mapping[8:16], "little") != gen
    ):
        mapping.close()
        raise ProtocolError(
            f"shared-memory segment {name} no longer holds generation {gen} of its data: "
            "the message is stale (its sender has reused the memory since)."
        )
    if populate:
        # Not MAP_POPULATE: on a private writable mapping that pre-faults every page for
        # writing, i.e. copies the whole segment. POPULATE_READ maps the shared pages as they
        # are (a page is copied only if the receiver writes to it).
        with contextlib.suppress(OSError, ValueError, OverflowError):
            mapping.madvise(_MADV_POPULATE_READ)
    return mapping


def prefetch(arrays: list[np.ndarray]) -> None:
    """Map in, in one call per segment, the pages of arrays that lie in a lazily mapped
    segment (a result about to be read): cheaper than a page fault per 4 KiB as they are
    read. Arrays elsewhere are left alone."""
    seen: set[int] = set()
    for array in arrays:
        base: Any = array
        while base is not None and not isinstance(base, mmap.mmap):
            base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
        if base is None or id(base) in seen or base.closed:
            continue
        seen.add(id(base))
        with contextlib.suppress(OSError, ValueError, OverflowError):
            base.madvise(_MADV_POPULATE_READ)


def unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SHM_DIR / name)


def sweep(session_id: str) -> list[str]:
    """Remove every segment of ``session_id`` still in /dev/shm; returns their names."""
    if not available() or not session_id.isalnum():
        return []
    removed = []
    for path in SHM_DIR.glob(f"fedlift-{session_id}-*"):
        unlink(path.name)
        removed.append(path.name)
    return removed
