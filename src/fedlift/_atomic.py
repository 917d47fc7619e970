"""Atomic file writes: write next to the target, flush to disk, then rename over it.

``recycle=True`` (for a file rewritten again and again, like a run's latest global model)
writes into the file the previous write replaced, kept as ``.NAME.spare``, and swaps it in
with ``renameat2(RENAME_EXCHANGE)``: its pages are already in the page cache, so the write
costs a copy instead of fresh memory for every page (40 MB: 18 ms instead of 35 ms here).
Where the file system cannot swap, it falls back to a plain replace.

A write that fails (disk full, read-only file system, no permission) raises
:class:`~fedlift.errors.StorageError` with one line naming the path, the cause and the fix;
the file it was to replace is left as it was, and its temporary file is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import StorageError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
    "remove_temp_files",
    "spare_path",
    "storage_error",
    "storage_errors",
    "StagedFile",
]

_FIXES = {
    errno.ENOSPC: "free space on that file system (or move the workspace to a larger one)",
    errno.EDQUOT: "raise the disk quota or free space (or move the workspace)",
    errno.EROFS: "remount it read-write (or move the workspace to a writable file system)",
    errno.EACCES: "give this process write permission there (or use another workspace)",
    errno.EPERM: "give this process write permission there (or use another workspace)",
}


def storage_error(exc: OSError, path: str | os.PathLike[str]) -> StorageError:
    """``exc`` (raised while writing ``path``) as one line: what, why, and how to fix it."""
    if isinstance(exc, StorageError):
        return exc
    code = exc.errno
    cause = exc.strerror or (os.strerror(code) if code else type(exc).__name__)
    fix = _FIXES.get(code or 0, "check the disk and the folder's permissions")
    name = errno.errorcode.get(code or 0, type(exc).__name__)
    error = StorageError(
        f"cannot write {os.fspath(path)}: {cause}. The previous file there is intact; "
        f"{fix}, then retry. Received: {name} (errno {code})."
    )
    error.errno = code  # (strerror and filename stay unset: str() is the message above)
    return error


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into :class:`~fedlift.errors.StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error(exc, path) from None


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)[
            "renameat2"
        ]
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    done = _renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE
    )  # fmt: skip
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT):
        return False
    raise OSError(code, os.strerror(code), str(b))


def remove_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that writes killed midway left in ``directory`` (not its
    subfolders): ``.NAME.*.tmp*``. Only for a folder no write is under way in (a restart);
    returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            name = entry.name
            if name.startswith(".") and ".tmp" in name and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def spare_path(path: str | os.PathLike[str]) -> Path:
    """Where ``recycle=True`` keeps the file that the last write replaced."""
    target = Path(path)
    return target.with_name(f".{target.name}.spare")


class StagedFile:
    """A file written beside ``path``; :meth:`publish` makes it ``path`` (fsync, rename).

    Split in two so that a writer can let go of what it wrote from (a model's arrays) as
    soon as the bytes are in the page cache, before the slow part: the disk's fsync.
    """

    def __init__(self, path: str | os.PathLike[str], *, recycle: bool = False) -> None:
        self.target = Path(path)
        self._recycle = recycle
        self._spare = spare_path(self.target)
        with storage_errors(self.target):
            self.target.parent.mkdir(parents=True, exist_ok=True)
            if recycle and self._spare.is_file() and self.target.is_file():
                fd = os.open(self._spare, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
                self._tmp, mode = str(self._spare), "r+b"
            else:
                fd, self._tmp = tempfile.mkstemp(
                    prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent
                )
                mode = "wb"
        self.handle: IO[bytes] = os.fdopen(fd, mode)

    def publish(self) -> None:
        """Flush to disk, then replace the target with this file in one step."""
        try:
            with self.handle:
                self.handle.truncate()
                self.handle.flush()
                os.fsync(self.handle.fileno())
            target, tmp = self.target, self._tmp
            if not (self._recycle and target.is_file() and _exchange(Path(tmp), target)):
                os.replace(tmp, target)
            elif tmp != str(self._spare):
                os.replace(tmp, self._spare)  # the old file, swapped out: next time's spare
            _fsync_dir(target.parent)
        except OSError as exc:
            self.discard()
            raise storage_error(exc, self.target) from None
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove what was written (the target stays as it was)."""
        with contextlib.suppress(OSError):  # a close that fails to flush a full disk
            self.handle.close()
        with contextlib.suppress(OSError):  # (a recycled spare goes too: half rewritten)
            os.unlink(self._tmp)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, recycle: bool = False) -> Iterator[IO[bytes]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` at once."""
    staged = StagedFile(path, recycle=recycle)
    try:
        yield staged.handle
    except OSError as exc:
        staged.discard()
        raise storage_error(exc, staged.target) from None
    except BaseException:
        staged.discard()
        raise
    staged.publish()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_path(
    path: str | os.PathLike[str], write: Callable[[Path], None], suffix: str = ""
) -> None:
    """Let ``write`` create a temporary file (named with ``suffix``), then move it to ``path``.

    For libraries that insist on writing by file name (Keras wants ``.weights.h5``).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise storage_error(exc, target) from None
        raise
