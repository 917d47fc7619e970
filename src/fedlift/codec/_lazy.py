"""Arrays whose bytes are read on demand: what a server may fold without holding them.

A result's arrays need not be in this process, whole, before an aggregator folds them: they
may be read out of the client's memory (:class:`~fedlift.codec.RemoteArray`) or arrive
from the network while the fold runs (the transport's streamed results). Both are a
:class:`LazyArray`: a shape, a dtype and ``read_into``, which copies a range of elements
where the reader needs them (a cache-sized block, or its accumulator).

``rereadable`` tells the two apart for the one thing that differs: a streamed array can be
read once, in order, since its bytes are let go as soon as they were read; a reader that
needs a second look (a check before the fold, a search for the value that made a sum not
finite) must check each block as it reads it, or copy the array first (:func:`materialize`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ProtocolError
from ..model import map_arrays

__all__ = ["LazyArray", "materialize"]


class LazyArray:
    """A C-contiguous array of ``shape`` and ``dtype`` whose elements are read on demand."""

    __fedlift_lazy__ = True  # flatten() keeps it as it is instead of copying it
    rereadable = True
    """False: each element can be read once (in order), and is gone after that."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.shape = shape
        self.dtype = dtype
        self.size = int(np.prod(shape, dtype=np.int64))
        self.nbytes = self.size * dtype.itemsize
        self.ndim = len(shape)

    def read_into(self, out: np.ndarray, start: int = 0) -> None:
        """Fill ``out`` (contiguous, this dtype) with elements ``start ..`` of the flat
        array; raises :class:`~fedlift.errors.ProtocolError` when they cannot be had."""
        raise NotImplementedError

    def check_read(self, out: np.ndarray, start: int) -> None:
        """Raise ProtocolError unless ``out`` can take elements ``start ..`` of this array."""
        if out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ProtocolError(f"read_into needs a contiguous {self.dtype} buffer.")
        if start < 0 or start + out.size > self.size:
            raise ProtocolError(f"elements {start}..{start + out.size} are outside {self.size}.")

    def lost(self) -> bool:
        """Whether the array's source is gone (a read failed because the sender went away,
        not because of how it was read)."""
        raise NotImplementedError

    def resume_from(self, resent: LazyArray) -> bool:
        """Read the rest of this array from ``resent``, the same array sent again whole
        (the sender lost its link part-way and sends it once more): elements already read
        are skipped there, so a fold goes on where it was and counts none twice. False
        when this kind of array cannot (it is then left as it is)."""
        return False

    def give_up(self) -> None:
        """No resent copy will come: a read waiting for one fails now."""

    def keep(self) -> None:
        """Keep the array readable after the handler it came to has returned (a result
        queued to be folded later), until :meth:`let_go`."""

    def let_go(self) -> None:
        """Done with a kept array: what holds its bytes may go."""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        self.read_into(out)
        return out if dtype is None else out.astype(dtype, copy=False)


def materialize(tree: Any) -> Any:
    """``tree`` with every :class:`LazyArray` copied into a numpy array of this process."""
    return map_arrays(lambda a: np.asarray(a) if isinstance(a, LazyArray) else a, tree)
