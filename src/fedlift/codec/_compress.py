"""Update compression: float16/bfloat16 casts, blockwise int8 and top-k, as pure functions.

Why it exists: between machines every byte of a model crosses the wire twice a round
(the global model out, each result back). Sent this way a float32 model costs, per value:

==========  ==================  =====================================================
scheme      bytes per value     what is lost
==========  ==================  =====================================================
float16     2 (2x fewer)        mantissa beyond 10 bits; values past 65504 (refused)
bfloat16    2 (2x fewer)        mantissa beyond 7 bits (float32's range is kept)
int8        1 + 4/block (3.9x   each value rounded to 1/254 of its block's largest
            at block 256)       magnitude (absmax per block, one float32 scale each)
topk        8 k/n (12.5x at     all but the ``k`` largest changes of each leaf; what
            k/n = 1%)           is left out is added to the site's next update
==========  ==================  =====================================================

Why here: both ends need it (the server encodes the global model and decodes results, a
site decodes the model and encodes its result) and :mod:`fedlift.codec` is the layer both
import. The maths are pure functions on arrays (:func:`quantize_int8`, :func:`top_k`, ...)
with known-answer tests; :func:`encode_model` / :func:`decode_model` apply them to every
float leaf of an :class:`~fedlift.model.FLModel` and carry what decoding needs in its meta.

A decoder treats what it decodes as hostile: every side array is checked against the
layout the decoder already knows (the server: the global model it sent) before the dense
output is allocated, so a payload that lies about its sizes costs nothing but its own bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidResultError
from ..model import (
    FLModel,
    ParamsType,
    ParamTree,
    Structure,
    bfloat16_dtype,
    flat_keys,
    flatten,
    is_bfloat16,
    is_float_dtype,
    unflatten,
)

__all__ = [
    "COMPRESSION_KEY",
    "MODEL_SCHEMES",
    "REQUEST_KEY",
    "RESULT_SCHEMES",
    "SIDE_KEY",
    "Compression",
    "Layout",
    "ResultEncoder",
    "decode_model",
    "dequantize_int8",
    "densify",
    "encode_model",
    "layout_of",
    "quantize_int8",
    "top_k",
    "top_k_count",
    "wire_bytes",
]

RESULT_SCHEMES = ("none", "float16", "bfloat16", "int8", "topk")
"""How sites may encode their results."""
MODEL_SCHEMES = ("none", "float16", "bfloat16", "int8")
"""How the server may encode the global model (top-k makes sense for changes only)."""

COMPRESSION_KEY = "fedlift.compression"
"""Meta key: how this model's params are encoded (a JSON object); absent when they are not."""
SIDE_KEY = "fedlift.compression.side"
"""Meta key: one array per leaf that decoding needs (int8: scales; topk: indices)."""
REQUEST_KEY = "fedlift.compress_results"
"""Task meta key: how the site is to encode its result (a JSON object)."""

_FLOAT_NAMES = ("float16", "float32", "float64", "bfloat16")
_CHUNK_BLOCKS = 4096  # int8 works through this many blocks at a time: small temporaries
_MAX_BLOCK = 1 << 20


@dataclass(frozen=True)
class Compression:
    """How a job's models travel: ``results`` (what sites send back) and ``model`` (the
    global model the server sends) each ``"none"``, ``"float16"``, ``"bfloat16"`` or
    ``"int8"``; results also ``"topk"``. ``block_size``: values per int8 scale;
    ``top_k``: the fraction of each leaf's values a top-k result keeps (at least one).

    int8 and top-k results are sent as changes (DIFF) against the model the site received,
    whatever the script sent: a change has a far smaller range to quantise than the model
    itself, and top-k of a model would zero most of it. Every strategy takes DIFF results.
    """

    results: str = "none"
    model: str = "none"
    block_size: int = 256
    top_k: float = 0.01
    owner: InitVar[str] = "Compression"

    def __post_init__(self, owner: str) -> None:
        if self.results not in RESULT_SCHEMES:
            raise ConfigError(
                f"{owner}(results=...) must be one of {', '.join(RESULT_SCHEMES)}; "
                f"received: results={self.results!r:.60}."
            )
        if self.model not in MODEL_SCHEMES:
            hint = " (top-k keeps a fraction of a change; the model is not one)" * (
                self.model == "topk"
            )
            raise ConfigError(
                f"{owner}(model=...) must be one of {', '.join(MODEL_SCHEMES)}{hint}; "
                f"received: model={self.model!r:.60}."
            )
        b = self.block_size
        if not isinstance(b, int) or isinstance(b, bool) or not 8 <= b <= _MAX_BLOCK:
            raise ConfigError(
                f"{owner}(block_size=...) must be an int from 8 to {_MAX_BLOCK} (values per "
                f"int8 scale; 256 is a good default); received: block_size={b!r:.60}."
            )
        k = self.top_k
        if (
            isinstance(k, bool)
            or not isinstance(k, int | float)
            or not math.isfinite(k)
            or not 0 < k <= 1
        ):
            raise ConfigError(
                f"{owner}(top_k=...) must be a fraction in (0, 1] of each leaf's values "
                f"(e.g. 0.01); received: top_k={k!r:.60}."
            )

    @property
    def enabled(self) -> bool:
        return self.results != "none" or self.model != "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "results": self.results,
            "model": self.model,
            "block_size": self.block_size,
            "top_k": float(self.top_k),
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "compression") -> Compression:
        """From ``job.json``: an object with the fields above, or a scheme's name for the
        results alone (``"int8"``)."""
        if isinstance(data, str):
            return cls(results=data, owner=where)
        if not isinstance(data, Mapping):
            raise ConfigError(
                f'{where} must be an object such as {{"results": "int8", "model": '
                f'"float16"}} or a scheme\'s name; received: {data!r:.80}.'
            )
        known = ("results", "model", "block_size", "top_k")
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ConfigError(
                f"{where} has unknown option(s) {', '.join(map(repr, unknown))}; its options "
                f"are {', '.join(known)}."
            )
        return cls(**{k: data[k] for k in known if k in data}, owner=where)


# ------------------------------------------------------------------ the maths, per leaf
def quantize_int8(x: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax int8: ``q = rint(x / s)`` with ``s = max|x_block| / 127`` per block
    of ``block_size`` values (in C order; the last block may be short). Returns ``q`` (int8,
    ``x``'s shape) and the scales (float32, one per block); a block of zeros has scale 0."""
    flat = np.ascontiguousarray(x).reshape(-1)
    n = flat.size
    blocks = -(-n // block_size)
    q = np.empty(n, np.int8)
    scales = np.empty(blocks, np.float32)
    step = block_size * _CHUNK_BLOCKS
    for start in range(0, n, step):
        part = flat[start : start + step].astype(np.float32, copy=False)
        first = start // block_size
        full = part.size // block_size
        for lo, hi, view in _block_views(part, block_size, full):
            absmax = np.abs(view).max(axis=1)
            s = absmax / np.float32(127.0)
            scales[first + lo : first + hi] = s
            values = np.divide(
                view, s[:, None], out=np.zeros(view.shape, np.float32), where=s[:, None] > 0
            )
            np.rint(values, out=values)
            np.clip(values, -127, 127, out=values)
            q[start + lo * block_size : start + lo * block_size + values.size] = values.reshape(-1)
    return q.reshape(x.shape), scales


def _block_views(part: np.ndarray, block_size: int, full: int) -> list[tuple[int, int, Any]]:
    """``part`` as (first block, end block, 2-D view) pieces: the whole blocks, then the
    short last one (if any)."""
    views = []
    if full:
        views.append((0, full, part[: full * block_size].reshape(full, block_size)))
    if part.size > full * block_size:
        views.append((full, full + 1, part[full * block_size :].reshape(1, -1)))
    return views


def dequantize_int8(
    q: np.ndarray, scales: np.ndarray, block_size: int, dtype: Any = np.float32
) -> np.ndarray:
    """``q * s`` per block (the inverse of :func:`quantize_int8` up to rounding), as
    ``dtype``, ``q``'s shape."""
    flat = q.reshape(-1)
    n = flat.size
    out = np.empty(n, dtype)
    step = block_size * _CHUNK_BLOCKS
    for start in range(0, n, step):
        part = flat[start : start + step]
        first = start // block_size
        full = part.size // block_size
        for lo, hi, view in _block_views(part, block_size, full):
            values = view.astype(np.float32) * scales[first + lo : first + hi, None]
            at = start + lo * block_size
            out[at : at + values.size] = values.reshape(-1)
    return out.reshape(q.shape)


def top_k(update: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` entries of ``update`` largest in magnitude: their flat indices in
    increasing order (int32, or int64 past 2**31 values) and their values (float32)."""
    flat = update.reshape(-1)
    n = flat.size
    k = max(0, min(int(k), n))
    index_dtype = np.int32 if n < 2**31 else np.int64
    if k == n:
        indices = np.arange(n, dtype=index_dtype)
    else:
        indices = np.argpartition(np.abs(flat), n - k)[n - k :].astype(index_dtype)
        indices.sort()
    return indices, flat[indices].astype(np.float32)


def densify(
    indices: np.ndarray, values: np.ndarray, shape: Sequence[int], dtype: Any = np.float32
) -> np.ndarray:
    """Zeros of ``shape`` with ``values`` at the flat ``indices`` (top-k's inverse)."""
    out = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype)
    out[indices] = values
    return out.reshape(tuple(shape))


def top_k_count(n: int, fraction: float) -> int:
    """How many of a leaf's ``n`` values top-k keeps: ``ceil(fraction * n)``, at least 1."""
    return min(n, max(1, math.ceil(fraction * n))) if n else 0


# ------------------------------------------------------------------ whole models
@dataclass(frozen=True)
class Layout:
    """What a decoder knows of the model before it reads anything: the tree's structure
    and each leaf's shape and dtype (from the global model the server sent)."""

    structure: Structure
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]


def layout_of(params: ParamTree) -> Layout:
    structure, arrays = flatten(params)
    return Layout(
        structure,
        tuple(tuple(int(d) for d in a.shape) for a in arrays),
        tuple(_dtype_name(a.dtype) for a in arrays),
    )


def _dtype_name(dtype: np.dtype[Any]) -> str:
    return "bfloat16" if is_bfloat16(dtype) else np.dtype(dtype).name


def _np_dtype(name: str) -> np.dtype[Any]:
    return bfloat16_dtype() if name == "bfloat16" else np.dtype(name)


def _compressible(a: np.ndarray) -> bool:
    return a.size > 0 and is_float_dtype(a.dtype)


def wire_bytes(model: FLModel) -> int:
    """The array bytes ``model`` puts on the wire: params and every meta param tree."""
    total = 0
    if model.params is not None:
        total += sum(a.nbytes for a in flatten(model.params)[1])
    for value in model.meta.values():
        if isinstance(value, np.ndarray) or (
            isinstance(value, list | dict) and _is_array_tree(value)
        ):
            total += sum(a.nbytes for a in flatten(value)[1])
    return total


def _is_array_tree(value: Any) -> bool:
    try:
        flatten(value)
    except (ConfigError, TypeError, ValueError):
        return False
    return True


def encode_model(
    model: FLModel, scheme: str, *, block_size: int = 256, top_k_fraction: float = 0.01
) -> FLModel:
    """``model`` with every non-empty float leaf of its params encoded by ``scheme``
    (other leaves as they are); what decoding needs goes into ``meta``. ``"none"`` or no
    params: ``model`` itself. For ``int8`` and ``topk`` of a result, pass the change (DIFF)."""
    if scheme == "none" or model.params is None:
        return model
    if scheme not in RESULT_SCHEMES:
        raise ConfigError(f"unknown compression scheme {scheme!r}; known: {RESULT_SCHEMES}.")
    structure, arrays = flatten(model.params)
    encoded: list[np.ndarray] = []
    side: list[np.ndarray] = []
    dtypes: list[str | None] = []
    for a in arrays:
        if not _compressible(a):
            encoded.append(a)
            side.append(np.empty(0, np.uint8))
            dtypes.append(None)
            continue
        dtypes.append(_dtype_name(a.dtype))
        if scheme == "float16":
            encoded.append(_to_float16(a))
            side.append(np.empty(0, np.uint8))
        elif scheme == "bfloat16":
            encoded.append(np.asarray(a, np.float32).astype(bfloat16_dtype()))
            side.append(np.empty(0, np.uint8))
        elif scheme == "int8":
            q, scales = quantize_int8(a, block_size)
            encoded.append(q)
            side.append(scales)
        else:
            indices, values = top_k(a, top_k_count(a.size, top_k_fraction))
            encoded.append(values)
            side.append(indices)
    info = {"scheme": scheme, "block_size": block_size, "dtypes": dtypes}
    meta = {**model.meta, COMPRESSION_KEY: info, SIDE_KEY: side}
    return dataclasses.replace(model, params=unflatten(structure, encoded), meta=meta)


def _to_float16(a: np.ndarray) -> np.ndarray:
    finite_max = float(np.finfo(np.float16).max)
    peak = float(np.nanmax(np.abs(a))) if a.size else 0.0
    if math.isfinite(peak) and peak > finite_max:
        raise ConfigError(
            f"float16 compression cannot carry a value of magnitude {peak:.4g} (float16 "
            f"ends at {finite_max:.0f}). Use bfloat16 or int8, which keep float32's range."
        )
    return a.astype(np.float16)


def decode_model(
    model: FLModel,
    layout: Layout | None = None,
    *,
    who: str = "the peer",
    error: type[Exception] = InvalidResultError,
) -> FLModel:
    """The inverse of :func:`encode_model`: ``model`` as it was (lossy schemes: up to their
    rounding). A model without the marker is returned as it is. With ``layout`` (the
    server, decoding a result) the encoded model must have its structure and each leaf its
    shape; top-k needs it. Raises ``error`` (naming ``who``) for anything inconsistent,
    before any output is allocated."""
    info = model.meta.get(COMPRESSION_KEY)
    if info is None:
        return model
    if model.params is None:
        raise error(f"{who} sent compression info ({COMPRESSION_KEY}) but no params.")
    scheme, block, dtypes = _check_info(info, who, error)
    structure, arrays = flatten(model.params)
    side = model.meta.get(SIDE_KEY)
    if not isinstance(side, list) or len(side) != len(arrays):
        raise error(
            f"{who} sent {scheme} params with {len(side) if isinstance(side, list) else 'no'} "
            f"side arrays in meta[{SIDE_KEY!r}]; expected one per leaf ({len(arrays)})."
        )
    if len(dtypes) != len(arrays):
        raise error(
            f"{who} sent {scheme} params naming {len(dtypes)} leaf dtypes for {len(arrays)} "
            "leaves; expected one per leaf."
        )
    if layout is not None and structure != layout.structure:
        raise error(
            f"{who} sent {scheme} params whose layout differs from the global model's "
            f"({len(arrays)} leaves, expected {len(layout.shapes)})."
        )
    if layout is None and scheme == "topk":
        raise error(f"{who} sent top-k params, which only a peer that knows the layout decodes.")
    plans = [
        _check_leaf(scheme, block, a, s, dtypes[i], layout, i, key, who, error)
        for i, (a, s, key) in enumerate(zip(arrays, side, flat_keys(structure), strict=True))
    ]
    decoded = [plan() for plan in plans]  # every leaf checked: now allocate
    meta = {k: v for k, v in model.meta.items() if k not in (COMPRESSION_KEY, SIDE_KEY)}
    return dataclasses.replace(model, params=unflatten(structure, decoded), meta=meta)


def _check_info(info: Any, who: str, error: type[Exception]) -> tuple[str, int, list[str | None]]:
    if not isinstance(info, dict):
        raise error(f"{who} sent meta[{COMPRESSION_KEY!r}] that is not an object: {info!r:.80}.")
    scheme, block, dtypes = info.get("scheme"), info.get("block_size"), info.get("dtypes")
    if scheme not in RESULT_SCHEMES or scheme == "none":
        raise error(
            f"{who} sent params compressed by {scheme!r:.40}; known schemes: "
            f"{', '.join(RESULT_SCHEMES[1:])}."
        )
    if not isinstance(block, int) or isinstance(block, bool) or not 8 <= block <= _MAX_BLOCK:
        raise error(
            f"{who} sent int8 block_size={block!r:.40}; expected an int from 8 to {_MAX_BLOCK}."
        )
    if not isinstance(dtypes, list) or not all(d is None or d in _FLOAT_NAMES for d in dtypes):
        raise error(
            f"{who} sent leaf dtypes {dtypes!r:.80}; expected a list of {', '.join(_FLOAT_NAMES)} "
            "or null per leaf."
        )
    return str(scheme), block, dtypes


def _check_leaf(
    scheme: str,
    block: int,
    a: np.ndarray,
    side: Any,
    dtype: str | None,
    layout: Layout | None,
    i: int,
    key: str,
    who: str,
    error: type[Exception],
) -> Any:
    """Check leaf ``i``; return the function that decodes it (called once all are checked)."""

    def bad(what: str) -> Exception:
        return error(f"{who} sent {scheme} params whose leaf {key!r:.80} {what}.")

    if not isinstance(side, np.ndarray):
        raise bad("has no side array")
    shape = a.shape if layout is None else layout.shapes[i]
    n = int(np.prod(shape, dtype=np.int64))
    if dtype is None:  # sent as it is
        if side.size:
            raise bad("is sent as it is but has a side array")
        if layout is not None and a.shape != shape:
            raise bad(f"has shape {a.shape}, expected {shape}")
        return lambda: a
    if layout is not None and not is_float_dtype(_np_dtype(layout.dtypes[i])):
        raise bad(f"is compressed, but the global model's leaf is {layout.dtypes[i]}")
    # With a layout the output takes the global model's dtype, whatever the peer names: a
    # site that claims float64 for a float32 leaf must not make the server hold twice the model.
    out_dtype = _np_dtype(dtype if layout is None else layout.dtypes[i])
    if scheme in ("float16", "bfloat16"):
        ok = a.dtype == np.float16 if scheme == "float16" else is_bfloat16(a.dtype)
        if not ok or side.size:
            raise bad(f"is {_dtype_name(a.dtype)} with {side.size} side values, expected {scheme}")
        if layout is not None and a.shape != shape:
            raise bad(f"has shape {a.shape}, expected {shape}")
        return lambda: a.astype(out_dtype)
    if scheme == "int8":
        blocks = -(-n // block)
        if a.dtype != np.int8 or (layout is not None and a.shape != shape):
            raise bad(f"is {a.dtype} {a.shape}, expected int8 {shape}")
        if side.dtype != np.float32 or side.shape != (blocks,):
            raise bad(f"has {side.dtype} scales {side.shape}, expected float32 ({blocks},)")
        if not (np.isfinite(side).all() and (side >= 0).all()):
            raise bad("has scales that are negative, NaN or Inf")
        return lambda: dequantize_int8(a, side, block, out_dtype)
    # topk
    if a.ndim != 1 or not is_float_dtype(a.dtype):
        raise bad(f"holds {a.dtype} {a.shape} values, expected a 1-D float array")
    if side.dtype not in (np.int32, np.int64) or side.shape != a.shape:
        raise bad(f"has {side.dtype} indices {side.shape}, expected int32/int64 {a.shape}")
    if a.size > n:
        raise bad(f"keeps {a.size} values of a leaf of {n}")
    if a.size and (side[0] < 0 or side[-1] >= n or (a.size > 1 and not (np.diff(side) > 0).all())):
        raise bad(f"has indices out of order or outside 0..{n - 1}")
    if not np.isfinite(np.asarray(a, np.float32)).all():
        raise bad("holds NaN or Inf")
    return lambda: densify(side, a, shape, out_dtype)


class ResultEncoder:
    """A site's half: encodes each result as the task asks, keeping top-k's error feedback
    (what a round left out is added to the next round's change, so nothing is lost for
    good, only late). One per site, alive for the whole job."""

    def __init__(self) -> None:
        self._residual: list[np.ndarray] | None = None
        self._residual_structure: Structure = None

    def request(self, task: FLModel) -> Compression | None:
        """How ``task`` asks for its result to be encoded (None: as it is)."""
        raw = task.meta.get(REQUEST_KEY)
        if raw is None:
            return None
        spec = Compression.from_json(raw, f"the task's meta[{REQUEST_KEY!r}]")
        return spec if spec.results != "none" else None

    def encode(self, result: FLModel, received: FLModel, spec: Compression | None) -> FLModel:
        """``result`` as ``spec`` sends it; ``received``: the (decoded) task it answers."""
        if spec is None or result.params is None:
            return result
        if spec.results in ("float16", "bfloat16"):
            return encode_model(result, spec.results)
        change = _change(result, received)
        structure, arrays = flatten(change.params)
        if spec.results == "topk":
            if (
                self._residual is not None
                and self._residual_structure == structure
                and all(r.shape == a.shape for r, a in zip(self._residual, arrays, strict=True))
            ):
                arrays = [
                    np.add(a, r, dtype=np.float32) if _compressible(a) else a
                    for a, r in zip(arrays, self._residual, strict=True)
                ]
                change = dataclasses.replace(change, params=unflatten(structure, arrays))
            encoded = encode_model(change, "topk", top_k_fraction=spec.top_k)
            sent = encoded.meta[SIDE_KEY]
            residual: list[np.ndarray] = []
            for a, indices in zip(arrays, sent, strict=True):
                if _compressible(a):
                    r = np.array(a, np.float32).reshape(-1)
                    r[indices] = 0.0
                    residual.append(r.reshape(a.shape))
                else:
                    residual.append(np.empty(0, np.uint8))
            self._residual, self._residual_structure = residual, structure
            return encoded
        return encode_model(change, "int8", block_size=spec.block_size)


def _change(result: FLModel, received: FLModel) -> FLModel:
    """``result`` as a DIFF against ``received`` (as it is when it already is one)."""
    if result.params_type == ParamsType.DIFF:
        return result
    if received.params is None:
        raise ConfigError(
            "int8 and top-k results are sent as changes against the model the site "
            "received, and this task carried no model. Send a DIFF, or compress with "
            "float16/bfloat16."
        )
    structure, arrays = flatten(result.params)
    base_structure, base = flatten(received.params)
    if structure != base_structure or any(
        a.shape != b.shape for a, b in zip(arrays, base, strict=True)
    ):
        raise ConfigError(
            "the result's params do not have the received model's layout, so their change "
            "cannot be taken for int8/top-k compression. Send params with the global "
            "model's keys and shapes."
        )
    diff = [
        np.subtract(a, b, dtype=a.dtype)
        if np.issubdtype(a.dtype, np.number) or is_bfloat16(a.dtype)
        else a
        for a, b in zip(arrays, base, strict=True)
    ]
    return dataclasses.replace(
        result, params_type=ParamsType.DIFF, params=unflatten(structure, diff)
    )
