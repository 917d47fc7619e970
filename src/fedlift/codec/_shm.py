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

A receiver keeps its mappings of pooled segments up to 256 MiB once their arrays are gone
(a few of them): the owner's pool hands the same segments out round after round, and
mapping 40 MB afresh (page tables filled, then torn down) costs a receiver ~4 ms a round.
A kept mapping is private too, so before it is used again the pages the last user wrote to
(its private copies, found in ``/proc/self/pagemap``) are dropped, and the mapping shows
the segment as it is now. It is let go once the owner has removed the segment.

Names are ``fedlift-SESSION-PID-N-RANDOM`` (owned) and ``fedlift-SESSION-PID-N-RANDOM-t``
(transfer); :func:`sweep` removes a session's leftovers (a process killed between create
and unlink), so nothing is leaked in ``/dev/shm``. :func:`unlink` only removes transfer
segments: a message may ask its receiver to unlink the segment it came in, and a hostile
one must not be able to name a pooled segment (the receiver's own or another party's) and
so fail the job; pooled names never carry the transfer suffix.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import logging
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

log = logging.getLogger("fedlift.shm")

SHM_DIR = Path("/dev/shm")
SESSION_ENV = "FEDLIFT_SHM_SESSION"
_NAME = re.compile(r"^fedlift-[A-Za-z0-9]{1,64}-[0-9]{1,10}-[0-9]{1,20}-[0-9a-f]{8}(-t)?$")
_TRANSFER_SUFFIX = "-t"
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


def _new_name(transfer: bool) -> str:
    suffix = _TRANSFER_SUFFIX if transfer else ""
    return f"fedlift-{session()}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}{suffix}"


def _create(size: int, transfer: bool = False) -> tuple[str, mmap.mmap]:
    name = _new_name(transfer)
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return name, mmap.mmap(fd, size, flags=flags)
    except BaseException:
        _remove(name)
        raise
    finally:
        os.close(fd)


def create_transfer(size: int) -> tuple[str, mmap.mmap]:
    """A segment for one message (the receiver unlinks it)."""
    return _create(max(size, 1), transfer=True)


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
        _remove(self.name)
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
            _remove(segment.name)


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
) -> mmap.mmap | bytearray | ctypes.Array[ctypes.c_char]:
    """Map a peer's segment copy-on-write (private, writable). Validates name and size.

    With ``gen`` (a pooled segment) the mapping holds a shared lock on the segment while it
    (the returned buffer, and so any array on it) lives, and the segment must still be at
    that generation; such mappings are kept for reuse (see the module docstring).

    ``populate`` maps every page at once (fast to read all of it, no copy); without it
    pages are mapped as they are touched.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProtocolError(f"invalid shared-memory segment name {name!r:.80}")
    if size == 0:
        return bytearray()
    keepable = gen is not None and size <= _KEEP_MAX_BYTES and _readers.usable()
    if gen is not None and keepable:
        kept = _readers.take(name, size)
        if kept is not None:
            try:
                fcntl.flock(kept.fd, fcntl.LOCK_SH)
                _readers.restore(kept)
            except (OSError, ValueError, ProtocolError) as exc:
                log.debug("not reusing the mapping of %s: %s", name, exc)
                kept.close()  # and map it afresh below
            else:
                try:
                    _check_generation(kept.mapping, name, size, gen)
                except BaseException:
                    kept.close()
                    raise
                return _readers.lend(kept)
    fd = _open_peer(name, size)
    try:
        if gen is not None:
            # Held by the mapping's own descriptor (mmap keeps a duplicate) until it is gone.
            fcntl.flock(fd, fcntl.LOCK_SH)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        entry = _Kept(name, os.dup(fd), mapping, size) if keepable else None
    finally:
        os.close(fd)
    if gen is not None:
        try:
            _check_generation(mapping, name, size, gen)
        except ProtocolError:
            if entry is not None:
                entry.close()
            else:
                mapping.close()
            raise
    if populate:
        # Not MAP_POPULATE: on a private writable mapping that pre-faults every page for
        # writing, i.e. copies the whole segment. POPULATE_READ maps the shared pages as they
        # are (a page is copied only if the receiver writes to it).
        with contextlib.suppress(OSError, ValueError, OverflowError):
            mapping.madvise(_MADV_POPULATE_READ)
    return mapping if entry is None else _readers.lend(entry)


def _open_peer(name: str, size: int) -> int:
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
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_generation(mapping: mmap.mmap, name: str, size: int, gen: int) -> None:
    if size < _HEADER or mapping[:8] != _MAGIC or int.from_bytes(mapping[8:16], "little") != gen:
        raise ProtocolError(
            f"shared-memory segment {name} no longer holds generation {gen} of its data: "
            "the message is stale (its sender has reused the memory since)."
        )


_KEEP_MAX_BYTES = 256 * 2**20  # larger segments are mapped afresh each time
_KEEP_IDLE = 4  # idle mappings kept per process
_PAGE = mmap.PAGESIZE


class _Kept:
    """A receiver's mapping of a pooled segment, with its own descriptor (for ``flock``)."""

    def __init__(self, name: str, fd: int, mapping: mmap.mmap, size: int) -> None:
        self.name, self.fd, self.mapping, self.size = name, fd, mapping, size
        self.address = _base_address(mapping)

    def removed(self) -> bool:
        """Whether the owner has unlinked the segment (then only mappings keep its pages)."""
        try:
            return os.fstat(self.fd).st_nlink == 0
        except OSError:
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)  # releases the shared lock, if held
        with contextlib.suppress(BufferError):
            self.mapping.close()


class _Readers:
    """Idle :class:`_Kept` mappings of this process, by segment name (oldest first)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # finalizers may run while this thread holds it
        self._idle: dict[str, _Kept] = {}
        self._lent: dict[int, _Kept] = {}  # by the address of the buffer lent
        self._pagemap: int | None = None
        self._usable: bool | None = None

    def usable(self) -> bool:
        """Whether kept mappings can be cleaned (``/proc/self/pagemap`` is readable)."""
        if self._usable is None:
            try:
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
                os.pread(self._pagemap, 8, 0)
                self._usable = True
            except OSError:
                self._usable = False
        return self._usable

    def take(self, name: str, size: int) -> _Kept | None:
        """The idle mapping of ``name`` (now in use), if one is kept; drops removed ones."""
        with self._lock:
            gone = [k for k in self._idle.values() if k.removed()]
            for kept in gone:
                del self._idle[kept.name]
            entry = self._idle.pop(name, None)
        for kept in gone:
            kept.close()
        if entry is not None and entry.size != size:
            entry.close()
            return None
        return entry

    def lend(self, entry: _Kept) -> ctypes.Array[ctypes.c_char]:
        """A buffer on ``entry``'s pages; when it (and every array on it) is gone, the lock
        is released and the mapping is kept for the next message."""
        buffer = (ctypes.c_char * entry.size).from_address(entry.address)
        with self._lock:
            self._lent[entry.address] = entry
        weakref.finalize(buffer, self._returned, entry)
        return buffer

    def lent(self, address: int) -> mmap.mmap | None:
        """The mapping behind a buffer :meth:`lend` returned (while it lives)."""
        with self._lock:
            entry = self._lent.get(address)
        return None if entry is None else entry.mapping

    def _returned(self, entry: _Kept) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(entry.fd, fcntl.LOCK_UN)
        surplus = [entry] if entry.removed() else []
        with self._lock:
            self._lent.pop(entry.address, None)
            if not surplus:
                old = self._idle.pop(entry.name, None)
                if old is not None:
                    surplus.append(old)
                self._idle[entry.name] = entry
                while len(self._idle) > _KEEP_IDLE:
                    surplus.append(self._idle.pop(next(iter(self._idle))))
        for kept in surplus:
            kept.close()

    def restore(self, entry: _Kept) -> None:
        """Drop the pages the last user wrote to (private copies): the mapping then shows
        the segment's current contents everywhere."""
        if self._pagemap is None:
            raise ProtocolError("kept mappings need /proc/self/pagemap")
        first, count = entry.address // _PAGE, -(-entry.size // _PAGE)
        raw = os.pread(self._pagemap, 8 * count, 8 * first)
        if len(raw) != 8 * count:
            raise ProtocolError(f"/proc/self/pagemap gave {len(raw)} of {8 * count} bytes")
        flags = np.frombuffer(raw, np.uint64) >> np.uint64(61)
        present, swapped, file_page = (
            flags >> np.uint64(2),
            (flags >> np.uint64(1)) & np.uint64(1),
            flags & np.uint64(1),
        )
        private = np.flatnonzero(((present == 1) & (file_page == 0)) | (swapped == 1))
        if private.size == 0:
            return
        # Runs of consecutive pages: one madvise each.
        breaks = np.flatnonzero(np.diff(private) != 1) + 1
        for run in np.split(private, breaks):
            start = int(run[0]) * _PAGE
            length = min(len(run) * _PAGE, entry.size - start)
            entry.mapping.madvise(mmap.MADV_DONTNEED, start, length)

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)


_readers = _Readers()


def prefetch(arrays: list[np.ndarray]) -> None:
    """Map in, in one call per segment, the pages of arrays that lie in a lazily mapped
    segment (a result about to be read): cheaper than a page fault per 4 KiB as they are
    read. Arrays elsewhere are left alone."""
    seen: set[int] = set()
    for array in arrays:
        base: Any = array
        while base is not None and not isinstance(base, mmap.mmap | ctypes.Array):
            base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
        if isinstance(base, ctypes.Array):  # a kept mapping, lent
            base = _readers.lent(ctypes.addressof(base))
        if base is None or id(base) in seen or base.closed:
            continue
        seen.add(id(base))
        with contextlib.suppress(OSError, ValueError, OverflowError):
            base.madvise(_MADV_POPULATE_READ)


def unlink(name: str) -> None:
    """Remove the transfer segment ``name`` (one :func:`create_transfer` made, here or in a
    peer). Any other name is refused with ProtocolError: names come from messages, and a
    pooled segment (this process's or another's) is only ever removed by its owner."""
    if not (isinstance(name, str) and _NAME.match(name) and name.endswith(_TRANSFER_SUFFIX)):
        raise ProtocolError(
            f"refusing to unlink shared-memory segment {name!r:.80}: a message may only ask "
            "to unlink a transfer segment (its name ends in '-t'), never a pooled one."
        )
    _remove(name)


def _remove(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SHM_DIR / name)


def sweep(session_id: str) -> list[str]:
    """Remove every segment of ``session_id`` still in /dev/shm; returns their names."""
    if not available() or not session_id.isalnum():
        return []
    removed = []
    for path in SHM_DIR.glob(f"fedlift-{session_id}-*"):
        _remove(path.name)
        removed.append(path.name)
    return removed
