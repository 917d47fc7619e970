"""Arrays read straight out of another process on this host (``process_vm_readv``).

On one host a client's result need not be copied anywhere before the server reads it: the
message names the client's process and the address and length of every array, and the
server copies the bytes where it needs them (a cache-sized block, or its accumulator) with
``process_vm_readv``. No second copy of the model exists at any time, in either process.

The sender must keep the arrays alive and unchanged until the reply arrives; the server's
runtime answers a result sent this way only once it has read it (or dropped it). Reading
needs the kernel's permission to inspect the sender (same user; no Yama restriction or
seccomp filter in the way), so the server checks it with a probe when a site registers,
and sites fall back to shared-memory segments where it fails.

:class:`RemoteArray` is what such a message decodes to: shape, dtype and ``read_into``; it
is no numpy array, and ``numpy.asarray(remote)`` copies it into one (:func:`materialize`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ProtocolError
from ._lazy import LazyArray, materialize

__all__ = ["RemoteArray", "Probe", "available", "check_probe", "make_probe", "materialize"]


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _load() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.process_vm_readv
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
        ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong,
    ]  # fmt: skip
    function.restype = ctypes.c_ssize_t
    return function


_readv = _load()


def available() -> bool:
    """Whether this system has ``process_vm_readv`` at all (Linux, glibc)."""
    return _readv is not None


def read(pid: int, address: int, out: np.ndarray) -> None:
    """Copy ``out.nbytes`` bytes at ``address`` in process ``pid`` into ``out`` (contiguous)."""
    if _readv is None:
        raise ProtocolError("this system cannot read another process's memory.")
    view = out.reshape(-1).view(np.uint8)
    done, total = 0, view.nbytes
    base = int(view.__array_interface__["data"][0])
    while done < total:
        local = _IoVec(base + done, total - done)
        remote = _IoVec(address + done, total - done)
        got = _readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            code = ctypes.get_errno()
            raise ProtocolError(
                f"cannot read {total - done} bytes at {address + done:#x} in process {pid}: "
                f"{os.strerror(code) if got < 0 else 'nothing read'} (the sender exited, or "
                "named memory it does not have)."
            )
        done += got


class RemoteArray(LazyArray):
    """A C-contiguous array of ``shape`` and ``dtype`` at ``address`` in process ``pid``."""

    def __init__(self, pid: int, address: int, shape: tuple[int, ...], dtype: np.dtype[Any]):
        super().__init__(shape, dtype)
        self.pid = pid
        self.address = address

    def read_into(self, out: np.ndarray, start: int = 0) -> None:
        """Fill ``out`` (contiguous, this dtype) with elements ``start ..`` of the flat array."""
        self.check_read(out, start)
        if out.size:
            read(self.pid, self.address + start * self.dtype.itemsize, out)

    def lost(self) -> bool:
        """Whether the sender's memory can no longer be read (its process is gone)."""
        if not self.size:
            return False
        try:
            self.read_into(np.empty(1, self.dtype), 0)
        except ProtocolError:
            return True
        return False

    def __repr__(self) -> str:
        return f"RemoteArray(pid={self.pid}, shape={self.shape}, dtype={self.dtype})"


# ------------------------------------------------------------------------- permission probe

Probe = dict[str, Any]


class _ProbeBuffer:
    data: np.ndarray | None = None


_probe = _ProbeBuffer()


def make_probe() -> Probe:
    """Fields a site sends when it registers: where the server can find a random token."""
    if _probe.data is None:
        _probe.data = np.frombuffer(secrets.token_bytes(32), np.uint8).copy()
    data = _probe.data
    return {
        "pid": os.getpid(),
        "address": int(data.__array_interface__["data"][0]),
        "token": bytes(data).hex(),
    }


def check_probe(probe: Any) -> bool:
    """Whether this process can read the sender's memory (reads the token and compares)."""
    if not (
        available()
        and isinstance(probe, dict)
        and isinstance(probe.get("pid"), int)
        and isinstance(probe.get("address"), int)
        and isinstance(probe.get("token"), str)
        and len(probe["token"]) == 64
    ):
        return False
    out = np.empty(32, np.uint8)
    try:
        read(probe["pid"], probe["address"], out)
    except ProtocolError:
        return False
    return bool(bytes(out).hex() == probe["token"])


def regions(arrays: Sequence[np.ndarray]) -> list[list[int]]:
    """``[address, nbytes]`` of every (contiguous) array, as a message names them."""
    return [[int(a.__array_interface__["data"][0]), int(a.nbytes)] for a in arrays]
