"""FedAvg's maths as pure functions and one streaming accumulator.

:class:`StreamingMean` folds each client's result into a single running weighted sum as it
arrives (``sums += (w / base) * x``, ``base`` being the first result's weight), so the server
holds one model's worth of sums no matter how many clients answer; the mean is the sums
scaled once by ``base / W`` at the end. For equal weights each fold is one addition per
element, and the mean of one client is that client's params exactly.

Large folds run in cache-sized blocks (no full-size temporary) on several threads, each
taking contiguous shares of the elements in turn: the arithmetic on every element is the
same however the work is split, and so is the result.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, get_args

import numpy as np

from ..errors import ClientFailedError, ConfigError, InvalidResultError
from ..model import (
    FLModel,
    MetaKey,
    ParamsType,
    ParamTree,
    Structure,
    flat_keys,
    flatten,
    is_bfloat16,
    is_float_dtype,
    unflatten,
)
from ._seam import Allocator

__all__ = [
    "Allocator",
    "ErrorPolicy",
    "FoldOrder",
    "Layout",
    "PreparedFold",
    "StreamingMean",
    "accumulate",
    "apply_update",
    "check_error_policy",
    "check_result",
    "scale",
    "scan_finite",
    "weighted_mean",
    "weighted_mean_metrics",
]


ErrorPolicy = Literal["fail", "exclude"]
"""What a site's error does to the job: ``"fail"`` it (the traceback is the job's error), or
``"exclude"`` that site from the round, which goes on while ``min_clients`` still holds
(NVFlare's ``ignore_result_error``). Errors are a script's exception and a result that
cannot be aggregated (:class:`~fedlift.errors.InvalidResultError`); a site whose process is
gone is left out under either policy."""

ERROR_POLICIES: tuple[str, ...] = get_args(ErrorPolicy)


def check_error_policy(value: object, where: str) -> ErrorPolicy:
    """``value`` if it is an :data:`ErrorPolicy`, else a ConfigError that says so."""
    if not isinstance(value, str) or value not in ERROR_POLICIES:
        raise ConfigError(
            f"{where} must be one of {', '.join(map(repr, ERROR_POLICIES))}: 'fail' stops the "
            "job at a site's error, 'exclude' leaves that site out of the round. "
            f"Received: on_client_error={value!r}."
        )
    return value  # type: ignore[return-value]


class _ResultLost(ClientFailedError):
    """Raised by a controller's ``run_task`` when results were lost part-way through being
    folded (their process died while they were read): the round's aggregate is spoilt,
    and the workflow runs the round again without ``sites``."""

    def __init__(self, sites: list[str], message: str) -> None:
        super().__init__(message)
        self.sites = sites


_BLOCK_BYTES = 512 * 1024  # per block and source: stays in the CPU cache (fastest here)
_THREAD_MIN = 1 << 20  # elements per thread below which one thread does all the work
_MAX_THREADS = 4  # folding is memory-bound: more threads than this stop paying
_SHARES_PER_THREAD = 4


def _thread_count() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(_MAX_THREADS, cores))


class _Pool:
    """The fold's helper threads, started on first use and idle between folds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    _MAX_THREADS - 1, thread_name_prefix="fedlift-fold"
                )
            return self._executor.submit(fn)


_pool = _Pool()

Part = tuple[Any, float]
"""A source (numpy array, or an array-like with ``read_into`` such as a
:class:`~fedlift.codec._remote.RemoteArray`) and its coefficient."""


class _NotFinite(InvalidResultError):
    """A fold or scan met NaN or Inf: in part ``part`` (None: no part holds one, the
    weighted sum itself overflowed) of array ``index``, at element ``offset``."""

    def __init__(self, part: int | None, offset: int, value: float) -> None:
        super().__init__(
            f"part {part} holds a value that is not finite at element {offset}: {value!r}"
        )
        self.part, self.offset, self.value = part, offset, value
        self.index = -1


def _finite(block: np.ndarray) -> bool:
    """Whether every value of a (cache-resident) block is finite.

    ``dot(x, x)`` is NaN or Inf when any value is (both propagate) and costs well under an
    addition over the block; only when it is not finite (or the squares overflow, |x| >
    ~1.8e19 in float32) is the block checked element by element. bfloat16 is checked in
    float32 (exact: every bfloat16 value is a float32 one)."""
    if is_bfloat16(block.dtype):
        block = block.astype(np.float32)
    elif block.dtype.kind != "f":
        return True
    if math.isfinite(np.dot(block, block)):
        return True
    return bool(np.isfinite(block).all())


def _first_bad(block: np.ndarray, start: int) -> tuple[int, float] | None:
    """The offset and value of the first element of ``block`` that is not finite."""
    if is_bfloat16(block.dtype):
        block = block.astype(np.float32)
    elif block.dtype.kind != "f":
        return None
    bad = np.flatnonzero(~np.isfinite(block))
    return (start + int(bad[0]), float(block[bad[0]])) if bad.size else None


PreparedFold = tuple[list[tuple[list[Any], float]], list[str], list[str], bool, float, bool, int]
"""What :meth:`StreamingMean.prepare` hands to :meth:`StreamingMean.fold`: the parts, their
sources, the sources folded before without a check, whether the first part is assigned,
the scale after, whether to check, the ticket."""


class FoldOrder:
    """Lets folds into the same sums run at once, each block taking them in turn.

    Results still arriving (streamed) are folded as they come in, each on its own thread:
    one cannot wait for another to end without holding all of the other's bytes. Each fold
    takes a ticket (:meth:`ticket`, in the order the folds begin); fold ``n`` works on a
    block of the sums only once fold ``n - 1`` is past it, so every element takes the
    results in ticket order, as if the folds ran one after the other: the arithmetic, and
    the result, are the same. A fold that ends, however it ends, lets the next one on.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._progress: dict[int, float] = {}  # ticket -> elements done (inf: ended)

    def ticket(self) -> int:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._progress[ticket] = 0
            return ticket

    def busy_before(self, ticket: int) -> bool:
        """Whether a fold with an earlier ticket is still running."""
        with self._cond:
            return self._progress.get(ticket - 1, math.inf) != math.inf

    def wait(self, ticket: int, position: int) -> None:
        """Until the fold before ``ticket`` is past element ``position`` (of all arrays)."""
        with self._cond:
            while self._progress.get(ticket - 1, math.inf) < position:
                self._cond.wait()

    def advance(self, ticket: int, position: int) -> None:
        with self._cond:
            self._progress[ticket] = position
            self._cond.notify_all()

    def end(self, ticket: int) -> None:
        with self._cond:
            self._progress[ticket] = math.inf
            self._cond.notify_all()


def accumulate(
    sums: list[np.ndarray],
    parts: list[tuple[list[Any], float]],
    *,
    assign_first: bool = False,
    then_scale: float = 1.0,
    check: bool = True,
    order: tuple[FoldOrder, int] | None = None,
) -> None:
    """``sums[i] += c * x[i]`` for every ``(x, c)`` in ``parts``, in order, in one pass;
    then ``sums[i] *= then_scale``.

    Each block of the sums takes every part (and the scaling) while it is in the CPU cache,
    so the sums cross the memory bus once per call however many parts there are. With
    ``assign_first`` the first part (coefficient 1) is copied into the sums instead of
    added to them. Sources with ``read_into`` (results in another process's memory) are
    read one block at a time. Large calls are split over threads by contiguous element
    ranges; the arithmetic on each element, and so the result, is the same for any split.

    With ``check`` each block of the sums is checked to be finite once its parts are in,
    while it is still in the cache (no pass of its own): a part holding NaN or Inf raises
    :class:`~fedlift.errors.InvalidResultError` (attributes ``part``, ``index``,
    ``offset``), and the sums are then partly folded. Callers that must keep them intact
    check the parts first with :func:`scan_finite`.

    ``order``: a :class:`FoldOrder` and this fold's ticket, when other folds into ``sums``
    may run at the same time (the fold then ends its ticket, however it ends).
    """
    if assign_first and (not parts or parts[0][1] != 1.0):
        if order is not None:
            order[0].end(order[1])
        raise ConfigError("accumulate(assign_first=True) needs a first part with coefficient 1.")
    bases = [0] * len(sums)
    for i in range(1, len(sums)):
        bases[i] = bases[i - 1] + sums[i - 1].size

    # A source read once as it arrives (a streamed result) is read in order, on one thread,
    # and so is a fold that follows another one block by block; any other fold, on threads,
    # lets the next one on only when it ends.
    once = any(not _rereadable(a) for x, _ in parts for a in x)
    sequential = once or (order is not None and order[0].busy_before(order[1]))
    follow = order if sequential else None

    def run(i: int, lo: int, hi: int) -> None:
        flat = sums[i].reshape(-1)
        try:
            _accumulate_range(
                flat, [(x[i], c) for x, c in parts], lo, hi, assign_first, then_scale, check,
                None if follow is None else (follow[0], follow[1], bases[i]),
            )  # fmt: skip
        except _NotFinite as exc:
            exc.index = i
            raise

    try:
        if order is not None and not sequential:
            order[0].wait(order[1], sum(a.size for a in sums))
        _on_threads(sums, run, sequential=sequential)
    finally:
        if order is not None:
            order[0].end(order[1])


def _rereadable(source: Any) -> bool:
    return isinstance(source, np.ndarray) or bool(source.rereadable)


def scan_finite(arrays: Sequence[Any]) -> None:
    """Check that every value of ``arrays`` (numpy arrays, or sources with ``read_into``,
    read once more for it) is finite, block by block on threads like :func:`accumulate`.
    Raises :class:`~fedlift.errors.InvalidResultError` (attributes ``index``, ``offset``)
    for a value that is not."""

    def run(i: int, lo: int, hi: int) -> None:
        x = arrays[i]
        if not is_float_dtype(x.dtype):
            return
        block = max(1024, _BLOCK_BYTES // x.dtype.itemsize)
        flat = x.reshape(-1) if isinstance(x, np.ndarray) else None
        buffer = np.empty(min(block, hi - lo), x.dtype) if flat is None else None
        for start in range(lo, hi, block):
            stop = min(start + block, hi)
            if flat is not None:
                source = flat[start:stop]
            else:
                source = buffer[: stop - start]  # type: ignore[index]
                x.read_into(source, start)
            if not _finite(source):
                offset, value = _first_bad(source, start) or (start, math.nan)
                exc = _NotFinite(None, offset, value)
                exc.index = i
                raise exc

    _on_threads(arrays, run)


def scale(sums: list[np.ndarray], factor: float, *, check: bool = False) -> None:
    """``sums[i] *= factor`` in place, split over threads like :func:`accumulate`; with
    ``check``, each block is then checked to be finite (as in :func:`accumulate`)."""

    def run(i: int, lo: int, hi: int) -> None:
        flat = sums[i].reshape(-1)
        block = max(1024, _BLOCK_BYTES // flat.dtype.itemsize)
        for start in range(lo, hi, block):
            target = flat[start : min(start + block, hi)]
            np.multiply(target, factor, out=target, casting="unsafe")
            if check and not _finite(target):
                offset, value = _first_bad(target, start) or (start, math.nan)
                exc = _NotFinite(None, offset, value)
                exc.index = i
                raise exc

    _on_threads(sums, run)


def _on_threads(
    arrays: Sequence[Any], run: Callable[[int, int, int], None], *, sequential: bool = False
) -> None:
    """``run(i, start, stop)`` over every element of ``arrays``, on up to
    :data:`_MAX_THREADS` threads (this one included) when there is enough work
    (``sequential``: on this thread, array after array, each from its first element).

    The elements are cut into a few contiguous shares per thread, which the threads take in
    turn: a thread the OS pauses (a client runs on its core) holds up one small share, not
    half of the fold. When ``run`` raises, the shares not started are dropped and the
    first error is raised.
    """
    pieces = [(i, 0, a.size) for i, a in enumerate(arrays) if a.size]
    total = sum(a.size for a in arrays)
    threads = min(_thread_count(), max(1, total // _THREAD_MIN))
    if threads == 1 or sequential:
        for i, lo, hi in pieces:
            run(i, lo, hi)
        return
    shares = _split(pieces, total, threads * _SHARES_PER_THREAD)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not shares:
                    return
                share = shares.pop()
            try:
                for i, lo, hi in share:
                    run(i, lo, hi)
            except BaseException:
                with lock:
                    shares.clear()  # the others stop after their current share
                raise

    futures = [_pool.submit(work) for _ in range(threads - 1)]
    error: BaseException | None = None
    try:
        work()
    except BaseException as exc:
        error = exc
    for future in futures:
        try:
            future.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


def _split(
    pieces: list[tuple[int, int, int]], total: int, count: int
) -> list[list[tuple[int, int, int]]]:
    """``pieces`` (array, start, stop) cut into ``count`` shares of about equal size."""
    target = -(-total // count)
    shares: list[list[tuple[int, int, int]]] = [[]]
    room = target
    for i, lo, hi in pieces:
        while lo < hi:
            if room == 0:
                shares.append([])
                room = target
            cut = min(hi, lo + room)
            shares[-1].append((i, lo, cut))
            room -= cut - lo
            lo = cut
    return shares


def _accumulate_range(
    acc: np.ndarray,
    parts: list[Part],
    lo: int,
    hi: int,
    assign_first: bool,
    then_scale: float,
    check: bool = True,
    order: tuple[FoldOrder, int, int] | None = None,
) -> None:
    """:func:`accumulate` on elements ``lo:hi`` of one flat array (``order``: the fold
    order, this fold's ticket, and where the array starts among all the sums)."""
    block = max(1024, _BLOCK_BYTES // acc.dtype.itemsize)
    size = min(block, hi - lo)
    buffers: dict[np.dtype[Any], np.ndarray] = {}
    for x, c in parts:  # a block of each source read from elsewhere, of each scaled source
        for dtype in (
            *(() if isinstance(x, np.ndarray) else (x.dtype,)),
            *(() if c == 1.0 else (np.result_type(x.dtype, acc.dtype),)),
        ):
            if dtype not in buffers:
                buffers[dtype] = np.empty(size, dtype)
    for start in range(lo, hi, block):
        stop = min(start + block, hi)
        target = acc[start:stop]
        if order is not None:
            order[0].wait(order[1], order[2] + stop)
        for k, (x, c) in enumerate(parts):
            local = isinstance(x, np.ndarray)
            if k == 0 and assign_first:
                if local:
                    np.copyto(target, x.reshape(-1)[start:stop], casting="unsafe")
                elif x.dtype == acc.dtype:
                    x.read_into(target, start)
                    _check_once(x, target, k, start)
                else:
                    fetched = buffers[x.dtype][: stop - start]
                    x.read_into(fetched, start)
                    _check_once(x, fetched, k, start)
                    np.copyto(target, fetched, casting="unsafe")
                continue
            if local:
                source = x.reshape(-1)[start:stop]
            else:
                source = buffers[x.dtype][: stop - start]
                x.read_into(source, start)
                _check_once(x, source, k, start)
            if c == 1.0:
                np.add(target, source, out=target, casting="unsafe")
                continue
            scaled = buffers[np.result_type(x.dtype, acc.dtype)][: stop - start]
            np.multiply(source, c, out=scaled, dtype=scaled.dtype, casting="unsafe")
            np.add(target, scaled, out=target, casting="unsafe")
        if check and not _finite(target):
            raise _culprit(parts, target, start, stop)
        if then_scale != 1.0:
            np.multiply(target, then_scale, out=target, casting="unsafe")
        if order is not None:
            order[0].advance(order[1], order[2] + stop)


def _check_once(source: Any, block: np.ndarray, part: int, start: int) -> None:
    """A block just read from a source that cannot be read again, checked to be finite
    while it is in the cache, whether or not this pass checks (no later check or
    ``_culprit`` could look at it again)."""
    if not source.rereadable and not _finite(block):
        raise _NotFinite(part, *(_first_bad(block, start) or (start, math.nan)))


def _culprit(parts: list[Part], target: np.ndarray, start: int, stop: int) -> _NotFinite:
    """Which part made block ``start:stop`` of the sums (``target``) not finite (the parts
    are read once more)."""
    for k, (x, _) in enumerate(parts):
        if isinstance(x, np.ndarray):
            source = x.reshape(-1)[start:stop]
        else:
            source = np.empty(stop - start, x.dtype)
            x.read_into(source, start)
        found = _first_bad(source, start)
        if found is not None:
            return _NotFinite(k, *found)
    # Each part is finite here: the sums were not (an earlier, unchecked part), or overflowed.
    offset, value = _first_bad(target, start) or (start, math.nan)
    return _NotFinite(None, offset, value)


Layout = tuple[Structure, list[str], list[tuple[tuple[int, ...], np.dtype[Any]]], ParamsType | None]
"""What the results of a round must match: the params' structure, their flat keys, each
leaf's shape and dtype, and the params type (None: until the first result sets them)."""


def check_result(
    model: FLModel, source: str, layout: Layout, *, finite: bool
) -> tuple[Layout, float, list[Any] | None]:
    """Check one result against ``layout`` without changing anything: its weight (a finite
    number > 0), its params type, layout, shapes and dtype kinds (a float leaf takes floats
    of any width, an integer leaf integers), and with ``finite`` every value (no NaN or Inf).

    Returns the layout the next result must match (the first result with params fixes an
    empty one), the weight and the flat params (None when the result carries none). Raises
    :class:`~fedlift.errors.InvalidResultError` naming ``source`` (and the key). Every
    aggregator checks its results with it, so they refuse the same results alike.
    """
    weight = _weight(model, source)
    if model.params is None:
        return layout, weight, None
    known_structure, known_keys, known_shapes, known_type = layout
    structure, arrays = flatten(model.params)
    params_type = known_type or model.params_type or ParamsType.FULL
    if model.params_type not in (None, params_type):
        raise InvalidResultError(
            f"{source} sent params_type={model.params_type.value} but earlier results in "
            f"this round were {params_type.value}; all clients must send the same "
            "kind of params in a round."
        )
    if known_structure is None:
        keys = flat_keys(structure)
        shapes = [(a.shape, a.dtype) for a in arrays]
    elif structure != known_structure:
        theirs = flat_keys(structure)
        missing = [k for k in known_keys if k not in set(theirs)]
        extra = [k for k in theirs if k not in set(known_keys)]
        raise InvalidResultError(
            f"{source} sent params whose layout differs from the global model "
            f"(missing: {missing[:5] or 'none'}, unexpected: {extra[:5] or 'none'}). "
            "Send every layer/key of the model received, e.g. "
            "{layer.name: layer.get_weights() for layer in model.layers}."
        )
    else:
        keys, shapes = known_keys, known_shapes
    for key, (shape, dtype), array in zip(keys, shapes, arrays, strict=True):
        if array.shape != shape:
            raise InvalidResultError(
                f"{source} sent {key!r} with shape {array.shape}; the global model has "
                f"{shape}. Did the script change the model's architecture?"
            )
        numeric = np.issubdtype(array.dtype, np.number) or is_bfloat16(array.dtype)
        if not numeric and array.dtype != np.bool_:
            raise InvalidResultError(f"{source} sent {key!r} with non-numeric dtype {array.dtype}.")
        if _kind(array.dtype) != _kind(dtype):
            raise InvalidResultError(
                f"{source} sent {key!r} as {np.dtype(array.dtype)}, but the global model's "
                f"{key!r} is {np.dtype(dtype)}: a {_kind(dtype)} leaf takes "
                f"{_kind(dtype)} values only (they are never cast silently). Send it "
                f"back as the model's dtype, e.g. value.astype(np.{np.dtype(dtype)}). "
                f"Received: {key}.dtype={np.dtype(array.dtype)}."
            )
    if finite:
        try:
            scan_finite(arrays)
        except _NotFinite as exc:
            raise InvalidResultError(
                f"{source} sent {keys[exc.index]!r} with a value that is not finite "
                f"(element {exc.offset} is {exc.value}); the result is left out. Check "
                "the script's training for divergence (e.g. a lower learning rate). "
                f"Received: {keys[exc.index]}[{exc.offset}]={exc.value}."
            ) from None
    return (structure, keys, shapes, params_type), weight, arrays


class StreamingMean:
    """Streaming weighted mean of param trees and numeric metrics, one result at a time.

    The sums are ``sum(w_i / base * x_i)``, ``base`` being the weight of the first result
    with params; :meth:`params` scales them by ``base / W`` once, in place (so the mean of
    equally weighted results costs one addition per element and result).

    ``allocate`` makes the accumulator's arrays (default: numpy); the simulator puts them in
    shared memory, so the new global model goes out to the clients without another copy.
    ``adopt=True`` lets the first result's arrays become the sums (folded in place) when the
    caller guarantees nobody else holds them (results decoded off the wire). ``expected``:
    how many results the caller will add, if known; the fold of the last one then scales
    the sums into the mean in the same pass.

    Every result is checked before it changes anything: its layout, shapes and dtype kinds
    against the reference (a float leaf takes floats of any width, an integer leaf
    integers), its params type and its weight (a finite number > 0). A result that fails
    raises :class:`~fedlift.errors.InvalidResultError` naming its source, and the mean is
    as it was. NaN and Inf are found without a pass of their own: they survive every
    addition, so folds check each block of the sums while it is in the cache only where
    needed to tell whose it was -- the pass that scales the sums into the mean (the last
    fold, or :meth:`params`) and any fold that finds the previous one unchecked (for two
    clients: once a round). The error names the source and the key, and the mean is
    spoilt (the job fails; the global model is untouched). ``prescan=True`` instead reads
    each result once more before folding it, so a result with NaN or Inf is refused like
    any other bad one and leaves the mean exactly as it was (the ``exclude`` policy).
    """

    def __init__(
        self,
        reference: ParamTree | None,
        allocate: Allocator | None = None,
        adopt: bool = False,
        expected: int | None = None,
        *,
        prescan: bool = False,
    ) -> None:
        self._allocate = allocate
        self._adopt = adopt
        self._expected = expected
        self._prescan = prescan
        if reference is not None:
            self._structure, ref = flatten(reference)
            self._shapes = [(a.shape, a.dtype) for a in ref]
            self._keys = flat_keys(self._structure)
        else:
            self._structure, self._shapes, self._keys = None, [], []
        self._sums: list[np.ndarray] | None = None
        self._weight = 0.0
        self._base = 0.0  # the weight whose results are added with coefficient 1
        self._params_type: ParamsType | None = None
        self._metric_sums: dict[str, float] = {}
        self._metric_weights: dict[str, float] = {}
        self._unchecked: list[str] = []  # sources in the sums that no check has seen yet
        self.count = 0
        self.weights: dict[str, float] = {}
        """Each source's weight, as folded (for the round's record)."""
        self._lock = threading.Lock()
        self._order = FoldOrder()

    @property
    def total_weight(self) -> float:
        return self._weight

    def add(self, model: FLModel, source: str = "a client") -> None:
        """Fold ``model`` (params weighted by its ``NUM_STEPS_CURRENT_ROUND``) into the mean."""
        self.add_many([(source, model)])

    def add_many(self, results: list[tuple[str, FLModel]]) -> None:
        """Fold several ``(source, model)`` results, exactly as ``add`` one after the other,
        in one pass over the sums (results that queued up while the last was folded).

        Calls may overlap (results still arriving, each folded on its own thread): each
        takes the mean's state in turn, and the folds go over the sums block by block in
        the order the calls began (:class:`FoldOrder`), as if one ran after the other."""
        self.fold(self.prepare(results))

    def prepare(self, results: list[tuple[str, FLModel]]) -> PreparedFold | None:
        """The first half of :meth:`add_many`: check ``results`` and take them into the
        mean's state (weights, metrics), in turn with other calls; returns the fold they
        ask for (None: nothing to fold), which :meth:`fold` must be given next."""
        with self._lock:
            return self._prepare(results)

    def fold(self, prepared: PreparedFold | None) -> None:
        """The second half of :meth:`add_many`: the fold :meth:`prepare` returned, in its
        turn with overlapping folds (see :class:`FoldOrder`)."""
        if prepared is None:
            return
        parts, sources, earlier, assign_first, factor, check, ticket = prepared
        try:
            accumulate(self._sums,  # type: ignore[arg-type]
                       parts, assign_first=assign_first, then_scale=factor, check=check,
                       order=(self._order, ticket))  # fmt: skip
        except _NotFinite as exc:
            raise self._not_finite(exc, sources, earlier) from None

    def _prepare(self, results: list[tuple[str, FLModel]]) -> PreparedFold | None:
        # Validate before changing any state: a rejected result leaves the mean as it was.
        layout: Layout = (self._structure, self._keys, self._shapes, self._params_type)
        validated = []
        for source, model in results:
            layout, weight, arrays = check_result(model, source, layout, finite=self._prescan)
            validated.append((source, model, weight, arrays))
        self._structure, self._keys, self._shapes, self._params_type = layout
        parts: list[tuple[list[Any], float]] = []
        sources: list[str] = []
        assign_first = False
        for source, model, weight, arrays in validated:
            self._add_metrics(model.metrics, weight)
            self.weights[source] = weight
            self.count += 1
            if arrays is None:
                continue
            self._weight += weight
            if self._sums is None:
                self._base = weight
                adopted = self._adopted(arrays)
                if adopted is not None:
                    self._sums = adopted
                    self._unchecked.append(source)
                    continue
                self._sums = self._new_sums(arrays)
                parts.append((arrays, 1.0))  # copied in by the pass below
                sources.append(source)
                assign_first = True
                continue
            parts.append((arrays, weight / self._base))
            sources.append(source)
        if not parts or self._sums is None:
            return None
        factor = 1.0
        final = self.count == self._expected
        if final:  # the last one: the pass ends with the mean
            factor, self._base = self._base / self._weight, self._weight
        # Checked in the last pass, and in any pass that would otherwise leave the sums
        # holding two unchecked results (a value found there could not be traced to one).
        check = final or bool(self._unchecked) or len(sources) > 1
        earlier = list(self._unchecked)
        if check:
            self._unchecked.clear()
        else:
            self._unchecked.extend(sources)
        return parts, sources, earlier, assign_first, factor, check, self._order.ticket()

    def _adopted(self, arrays: list[Any]) -> list[np.ndarray] | None:
        """The first result's own buffers as the sums when they may be (no copy at all)."""
        if (
            self._adopt
            and self._allocate is None
            and all(
                isinstance(a, np.ndarray)
                and a.flags.writeable
                and a.flags.c_contiguous
                and a.dtype == _acc_dtype(a.dtype)
                for a in arrays
            )
        ):
            return arrays
        return None

    def _new_sums(self, arrays: list[Any]) -> list[np.ndarray]:
        specs = [(a.shape, _acc_dtype(a.dtype)) for a in arrays]
        if self._allocate is not None:
            return self._allocate(specs)
        return [np.empty(shape, dtype) for shape, dtype in specs]

    def _not_finite(
        self, exc: _NotFinite, sources: list[str], earlier: list[str]
    ) -> InvalidResultError:
        key = self._keys[exc.index] if 0 <= exc.index < len(self._keys) else f"#{exc.index}"
        where = f"{key!r} (element {exc.offset}: {exc.value})"
        if exc.part is not None:
            return InvalidResultError(
                f"{sources[exc.part]} sent {where} with a value that is not finite; the "
                "round's aggregate cannot be used. Check the script's training for "
                "divergence (e.g. a lower learning rate). "
                f"Received: {key}[{exc.offset}]={exc.value}."
            )
        if earlier:  # at most one: see _prepare
            return InvalidResultError(
                f"{earlier[0]} sent {where} with a value that is not finite; the round's "
                "aggregate cannot be used. Check the script's training for divergence "
                f"(e.g. a lower learning rate). Received: {key}[{exc.offset}]={exc.value}."
            )
        return InvalidResultError(
            f"the weighted sum of {where} overflowed {np.dtype(self._shapes[exc.index][1])} "
            f"folding the results of {', '.join(sources) or 'this round'}: every value they "
            "sent is finite, but too large to average. Check those scripts' training for "
            "divergence."
        )

    def _add_metrics(self, metrics: Mapping[str, Any] | None, weight: float) -> None:
        for key, value in (metrics or {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                continue
            self._metric_sums[key] = self._metric_sums.get(key, 0.0) + float(value) * weight
            self._metric_weights[key] = self._metric_weights.get(key, 0.0) + weight

    def params(self) -> ParamTree | None:
        """The weighted mean tree (None if no result carried params).

        Scales the sums into the mean in place (once; later results still fold correctly).
        Raises :class:`~fedlift.errors.InvalidResultError` when a folded result held NaN or
        Inf (see the class docstring)."""
        if self._sums is None:
            return None
        try:
            if self._base != self._weight:
                scale(self._sums, self._base / self._weight, check=True)
                self._base = self._weight
            elif self._unchecked:
                scan_finite(self._sums)  # one result folded in place: no pass yet
        except _NotFinite as exc:
            raise self._not_finite(exc, [], self._unchecked) from None
        self._unchecked.clear()
        out = [
            acc if acc.dtype == dtype else _cast_back(acc, dtype)
            for acc, (_, dtype) in zip(self._sums, self._shapes, strict=True)
        ]
        return unflatten(self._structure, out)

    @property
    def params_type(self) -> ParamsType | None:
        return self._params_type

    @property
    def structure(self) -> Structure:
        return self._structure

    def metrics(self) -> dict[str, float]:
        return {k: self._metric_sums[k] / self._metric_weights[k] for k in self._metric_sums}


def _kind(dtype: np.dtype[Any]) -> str:
    """What values a leaf holds: float, integer, bool or complex (widths may differ; a
    bfloat16 leaf is a float one)."""
    if is_float_dtype(dtype):
        return "float"
    kind = np.dtype(dtype).kind
    return {"f": "float", "i": "integer", "u": "integer", "b": "bool", "c": "complex"}.get(
        kind, kind
    )


def _weight(model: FLModel, source: str) -> float:
    """The result's aggregation weight, or InvalidResultError naming ``source``."""
    try:
        return model.weight()
    except ConfigError:
        raw = model.meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND)
        raise InvalidResultError(
            f"{source} sent an aggregation weight that is not a finite number > 0; "
            f"meta[{MetaKey.NUM_STEPS_CURRENT_ROUND!r}] must be e.g. the number of training "
            f"steps or samples of the round. Received: "
            f"{MetaKey.NUM_STEPS_CURRENT_ROUND}={raw!r}."
        ) from None


def _acc_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """float32 and wider sum in their own type; float16 and bfloat16 in float32 (float16's
    range is too small for weighted sums, bfloat16's 8-bit mantissa too coarse: each fold
    would round), the rest in float64. The mean is rounded to the leaf's dtype once."""
    if is_bfloat16(dtype):
        return np.dtype(np.float32)
    if np.issubdtype(dtype, np.floating):
        return dtype if dtype.itemsize >= 4 else np.dtype(np.float32)
    return np.dtype(np.float64)


def _cast_back(acc: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    source = np.rint(acc) if np.issubdtype(dtype, np.integer) or dtype == np.bool_ else acc
    out: np.ndarray = source.astype(dtype)
    return out


def _is_numeric(dtype: np.dtype[Any]) -> bool:
    """Whether a leaf of ``dtype`` takes part in the maths (numbers, bfloat16 included)."""
    return bool(np.issubdtype(dtype, np.number)) or is_bfloat16(dtype)


def weighted_mean(models: Iterable[FLModel]) -> StreamingMean:
    """Fold every model into a :class:`StreamingMean` (reference: the first one's layout)."""
    acc: StreamingMean | None = None
    for i, model in enumerate(models):
        if acc is None:
            acc = StreamingMean(model.params)
        acc.add(model, f"result {i}")
    if acc is None:
        raise ConfigError("weighted_mean() needs at least one model; received none.")
    return acc


def weighted_mean_metrics(models: Iterable[FLModel]) -> dict[str, float]:
    """Weighted mean of every numeric metric, over the models that report it."""
    acc = StreamingMean(None)
    for model in models:
        acc._add_metrics(model.metrics, model.weight())
    return acc.metrics()


def apply_update(
    global_params: ParamTree, update: ParamTree, params_type: ParamsType | None
) -> ParamTree:
    """New global params: the mean itself for FULL, ``global + mean`` for DIFF."""
    if params_type in (None, ParamsType.FULL):
        return update
    g_structure, g_arrays = flatten(global_params)
    u_structure, u_arrays = flatten(update)
    if g_structure != u_structure:
        raise ConfigError("a DIFF update must have the global model's layout.")
    summed = [
        np.add(g, u, dtype=g.dtype, casting="unsafe") if _is_numeric(g.dtype) else g
        for g, u in zip(g_arrays, u_arrays, strict=True)
    ]
    return unflatten(g_structure, summed)
