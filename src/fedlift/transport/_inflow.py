"""A message's arrays while their bytes are still arriving: folded as they come in.

A server that receives a result whole before it folds it holds every result in flight at
once: at 100M params x 2 sites over gRPC, the model, two 400 MB results and the sums, 3.1x
the model in all. Handed over as :class:`StreamedArray` leaves as soon as its header is in,
a result is folded while it arrives: the listener's thread feeds each chunk into the
:class:`Inflow`, the aggregator's ``read_into`` copies the elements it needs out of the
chunks that hold them, and a chunk is let go once every byte of it was read. What a result
costs the server is then the chunks that arrived and were not folded yet (a few MiB while
the fold keeps up), not the result: peak PSS 2.3-2.4x the model instead of 3.1x.

The chunks are the ones gRPC hands over (no copy into a message buffer), and nothing is
allocated for a claimed size: a peer that stalls or lies holds what it sent. Memory stays
bounded by what arrived even when nobody reads (the round is folding another result
first): chunks then wait here, as they would in a whole-message buffer.

The rules a reader keeps: each array is read once, in order (element ``0`` on, ranges one
after the other), which is how a streaming fold reads; a second look raises
:class:`~fedlift.errors.ProtocolError`. A read waits for its bytes; when the sender went
away first, it raises ProtocolError and :meth:`StreamedArray.lost` is True.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any

import numpy as np

from ..codec import Header, LazyArray
from ..errors import ProtocolError

__all__ = ["Inflow", "StreamedArray"]


class _Chunk:
    __slots__ = ("data", "needed", "start")

    def __init__(self, start: int, data: bytes | bytearray, needed: int) -> None:
        self.start = start
        self.data = data
        self.needed = needed
        """Bytes of this chunk that belong to an array and were not read yet."""


class Inflow:
    """The payload of one message, fed chunk by chunk, read as arrays (module docstring).

    ``head``: the frame's first bytes (at least its header), as received; ``header``: those
    bytes decoded (:func:`~fedlift.codec.decode_header`)."""

    def __init__(self, head: bytes | bytearray, header: Header) -> None:
        self._cond = threading.Condition()
        self._total = header.total
        self._spans = [(start, start + dtype.itemsize * math.prod(shape))
                       for dtype, shape, start in header.arrays]  # fmt: skip
        self._span_starts = [start for start, _ in self._spans]
        self._chunks: list[_Chunk] = []
        self._starts: list[int] = []  # of self._chunks, in order
        self._received = 0
        self._held = 0
        self._error: ProtocolError | None = None
        self._lost = False
        self._abandoned = False
        self._holders = 1  # the listener, until its handler returns (see hold/release)
        self.peak_held = 0
        """The most bytes held here at once (arrived, not yet read)."""
        self.arrays = [StreamedArray(self, shape, dtype, start)
                       for dtype, shape, start in header.arrays]  # fmt: skip
        self.feed(head)

    @property
    def received(self) -> int:
        return self._received

    @property
    def complete(self) -> bool:
        return self._received == self._total

    # ----------------------------------------------------------------- the sender's side
    def feed(self, data: bytes | bytearray) -> None:
        """The next chunk off the stream (raises ProtocolError past the announced total)."""
        start = self._received
        end = start + len(data)
        if end > self._total:
            raise ProtocolError(f"the peer sent more than the {self._total:,} bytes it announced.")
        needed = self._array_bytes(start, end)
        with self._cond:
            self._received = end
            if needed and not self._abandoned:
                self._chunks.append(_Chunk(start, data, needed))
                self._starts.append(start)
                self._held += len(data)
                self.peak_held = max(self.peak_held, self._held)
            self._cond.notify_all()

    def fail(self, why: str) -> None:
        """The stream broke before its end: readers waiting for more raise ProtocolError."""
        with self._cond:
            if self._error is None:
                self._error = ProtocolError(
                    f"the sender's stream broke after {self._received:,} of {self._total:,} "
                    f"bytes: {why}"
                )
                self._lost = True
            self._cond.notify_all()

    def hold(self) -> None:
        """One more party reads the arrays later (a queued result): they stay readable
        until it calls :meth:`release` too."""
        with self._cond:
            self._holders += 1

    def release(self) -> None:
        """One party is done with the arrays; after the last one, :meth:`abandon`."""
        with self._cond:
            self._holders -= 1
            last = self._holders <= 0
        if last:
            self.abandon()

    def abandon(self) -> None:
        """Nobody will read any more: let go of every chunk, and keep none of those still
        to come."""
        with self._cond:
            self._abandoned = True
            self._chunks.clear()
            self._starts.clear()
            self._held = 0

    # ----------------------------------------------------------------- the reader's side
    def read(self, start: int, out: memoryview) -> None:
        """Copy frame bytes ``start .. start + len(out)`` into ``out``, waiting for them."""
        end = start + len(out)
        with self._cond:
            while self._received < end:
                if self._error is not None:
                    raise self._error
                if self._abandoned:
                    raise ProtocolError("this message's arrays are no longer readable.")
                self._cond.wait()
            position = start
            i = bisect.bisect_right(self._starts, position) - 1
            while position < end:
                if i < 0 or i >= len(self._chunks):
                    raise ProtocolError(_READ_ONCE)
                chunk = self._chunks[i]
                offset = position - chunk.start
                if offset >= len(chunk.data):
                    raise ProtocolError(_READ_ONCE)
                take = min(len(chunk.data) - offset, end - position)
                out[position - start : position - start + take] = memoryview(chunk.data)[
                    offset : offset + take
                ]
                position += take
                chunk.needed -= take
                if chunk.needed <= 0:
                    del self._chunks[i]
                    del self._starts[i]
                    self._held -= len(chunk.data)
                else:
                    i += 1

    def lost(self) -> bool:
        return self._lost

    def _array_bytes(self, start: int, end: int) -> int:
        """How many bytes of ``start .. end`` belong to an array (padding and header do not)."""
        total = 0
        i = max(0, bisect.bisect_right(self._span_starts, start) - 1)
        while i < len(self._spans):
            lo, hi = self._spans[i]
            if lo >= end:
                break
            total += max(0, min(hi, end) - max(lo, start))
            i += 1
        return total


_READ_ONCE = (
    "a streamed array is read once, in order: these bytes were read already (copy it with "
    "numpy.asarray first to read it again)."
)


class StreamedArray(LazyArray):
    """One array of an :class:`Inflow`: read once, in order, as its bytes arrive.

    When the stream breaks part-way, a read waits up to :attr:`resume_wait` seconds for
    the sender's resend of the same message (:meth:`resume_from`, which the receiver's
    handler calls with the resent copy's array): it then skips, in the resent copy, the
    elements already read, and goes on from there. A fold reading it never notices.
    """

    rereadable = False
    resume_wait = 60.0
    """Seconds a read waits for a resent copy once its stream broke (then it fails)."""

    def __init__(
        self, inflow: Inflow, shape: tuple[int, ...], dtype: np.dtype[Any], start: int
    ) -> None:
        super().__init__(shape, dtype)
        self._inflow = inflow
        self._start = start
        self._next = 0
        self._cond = threading.Condition()
        self._resent: StreamedArray | None = None
        self._given_up = False
        self._kept: list[Inflow] | None = None  # the inflows held by keep(), if kept

    def read_into(self, out: np.ndarray, start: int = 0) -> None:
        self.check_read(out, start)
        if start != self._next:
            raise ProtocolError(
                f"{_READ_ONCE} Received: a read from element {start}; the next unread "
                f"element is {self._next}."
            )
        if not out.size:
            return
        target = out.reshape(-1).view(np.uint8).data
        while True:
            try:
                self._switch_if_resent()
                self._inflow.read(self._start + start * self.dtype.itemsize, target)
                break
            except ProtocolError:
                if not self._inflow.lost() or not self._await_resent():
                    raise
        self._next = start + out.size

    def lost(self) -> bool:
        return self._inflow.lost()

    def resume_from(self, resent: LazyArray) -> bool:
        if not (
            isinstance(resent, StreamedArray)
            and resent.shape == self.shape
            and resent.dtype == self.dtype
        ):
            return False
        with self._cond:
            if self._inflow.complete and not self._inflow.lost():
                return True  # every byte is here already: the resent copy is not needed
            previous, self._resent = self._resent, resent
            if self._kept is not None:  # the resent copy is read for the one kept
                self._kept.append(resent._inflow)
                resent._inflow.hold()
            self._cond.notify_all()
        # The copy it replaces is read no more: its chunks go now (a sender that resends
        # again and again holds one copy here, not one per resend).
        for replaced in (self._inflow, None if previous is None else previous._inflow):
            if replaced is not None:
                replaced.fail("superseded by the sender's resend")
                replaced.abandon()
        return True

    def give_up(self) -> None:
        with self._cond:
            self._given_up = True
            self._cond.notify_all()

    def keep(self) -> None:
        with self._cond:
            if self._kept is None:
                self._kept = [self._inflow]
                self._inflow.hold()

    def let_go(self) -> None:
        with self._cond:
            kept, self._kept = self._kept or [], None
        for inflow in kept:
            inflow.release()

    def _await_resent(self) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._resent is not None or self._given_up,
                                self.resume_wait)  # fmt: skip
            return self._resent is not None

    def _switch_if_resent(self) -> None:
        """Go on in the resent copy, once its first ``_next`` elements are skipped."""
        with self._cond:
            resent, self._resent = self._resent, None
        if resent is None:
            return
        inflow, begin = resent._inflow, resent._start
        skip, done = self._next * self.dtype.itemsize, 0
        scratch = memoryview(bytearray(min(skip, _SKIP_BLOCK)))
        while done < skip:  # a break here fails the read: the next resend starts again
            take = min(len(scratch), skip - done)
            inflow.read(begin + done, scratch[:take])
            done += take
        self._inflow, self._start = inflow, begin

    def __repr__(self) -> str:
        return f"StreamedArray(shape={self.shape}, dtype={self.dtype})"


_SKIP_BLOCK = 1 << 20
