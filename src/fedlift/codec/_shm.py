"""Shared-memory payloads for messages between processes on one host.

A large message's arrays can travel in a POSIX shared-memory segment (a file in
``/dev/shm``) instead of through the socket: the sender writes them once, the message
carries only the segment's name, and the receiver maps it copy-on-write (its arrays are
private and writable, and no byte is copied on the way). Two kinds of segment:

* *transfer* segments are written for one message; the receiver unlinks the name as soon
  as it has mapped it (the sender unlinks it if the message never arrived);
* *owned* segments hold arrays this process keeps (the server's global model): a message
  whose arrays all lie in one is sent by reference, to any number of receivers, and the
  name is unlinked when the last array using it is gone.

Names are ``fedlift-SESSION-PID-N-RANDOM``; :func:`sweep` removes a session's leftovers
(a process killed between create and unlink), so nothing is leaked in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import ctypes
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
    "allocate",
    "available",
    "create_transfer",
    "locate",
    "open_segment",
    "session",
    "sweep",
    "unlink",
]

SHM_DIR = Path("/dev/shm")
SESSION_ENV = "FEDLIFT_SHM_SESSION"
_NAME = re.compile(r"^fedlift-[A-Za-z0-9]{1,64}-[0-9]{1,10}-[0-9]{1,20}-[0-9a-f]{8}$")
_ALIGN = 64
_counter = itertools.count()
_default_session = secrets.token_hex(4)
_lock = threading.Lock()


@dataclass
class _Owned:
    base: int
    size: int
    ref: weakref.ref[mmap.mmap]


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


def allocate(specs: list[tuple[tuple[int, ...], np.dtype[Any]]]) -> list[np.ndarray]:
    """Arrays of these shapes and dtypes in one owned segment (zeroed), laid out like a
    message payload so they can be sent by reference."""
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        total = (
            (total + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize + _ALIGN - 1)
            // _ALIGN
            * _ALIGN
        )
    name, buffer = _create(max(total, 1))
    with _lock:
        _owned[name] = _Owned(_base_address(buffer), len(buffer), weakref.ref(buffer))
    weakref.finalize(buffer, _forget, name)
    return [
        np.frombuffer(
            buffer, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=off
        ).reshape(shape)
        for (shape, dtype), off in zip(specs, offsets, strict=True)
    ]


def _forget(name: str) -> None:
    with _lock:
        _owned.pop(name, None)
    unlink(name)


def locate(arrays: list[np.ndarray]) -> tuple[str, int, list[int]] | None:
    """If every non-empty array lies in one owned segment: (name, size, their offsets)."""
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
    return chosen[0], chosen[1].size, offsets


def open_segment(name: str, size: int, populate: bool = True) -> mmap.mmap | bytearray:
    """Map a peer's segment copy-on-write (private, writable). Validates name and size.

    ``populate`` maps every page at once (fast to read all of it); without it pages are
    mapped as they are touched, so a queued, unread message costs no resident memory.
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
        flags = mmap.MAP_PRIVATE | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


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
