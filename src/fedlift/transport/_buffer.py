"""Receive buffers that cost memory only as the bytes for them arrive.

A message's first chunk announces its total size, and a peer may lie. ``bytearray(total)``
zeroes, and so commits, all of it at once, before one more byte came: one 57-byte frame
made a server allocate 1 GiB. The buffer of a message that comes in several chunks is
instead an anonymous private mapping made with ``MAP_NORESERVE``: it reserves address space
only, and a page costs memory when a chunk is written into it, so a stalled or lying peer
holds what it sent and nothing more.

It is still one contiguous, writable buffer: the codec decodes its arrays as views on it,
with no copy at the end (a 3 GB model needs no second full copy, and nothing is zeroed
first), and its pages go back to the system as soon as the last array on it is gone.
Past its first 2 MiB a large buffer asks for transparent huge pages, so filling it faults
2 MiB at a time, not 4 KiB (memory still grows only with what arrived, give or take one
huge page; a claim that stalls after its first chunk holds only that chunk's pages).
"""

from __future__ import annotations

import contextlib
import mmap

from ..errors import ResourceLimitError

__all__ = ["receive_buffer"]

_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
_HUGE_PAGE = 2 << 20
_HUGE_MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


def receive_buffer(total: int) -> memoryview:
    """A zero-filled, writable buffer of ``total`` bytes (>= 1) whose pages are only
    committed when written."""
    try:
        mapping = mmap.mmap(-1, total, flags=_FLAGS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, OverflowError, ValueError) as exc:
        raise ResourceLimitError(
            f"cannot reserve {total:,} bytes of address space for an incoming message "
            f"({exc}). Lower the sender's message size or this side's max_message_bytes."
        ) from None
    if total >= _HUGE_MIN_BYTES and _MADV_HUGEPAGE is not None:
        # Not the first 2 MiB: a claim that stalls after its first chunk then holds the
        # 4 KiB pages that chunk touched, not a whole huge page.
        with contextlib.suppress(OSError, ValueError):
            mapping.madvise(_MADV_HUGEPAGE, _HUGE_PAGE, total - _HUGE_PAGE)
    return memoryview(mapping)
