"""Param trees in the safetensors file format (written and read here, without pickle).

Layout: an 8-byte little-endian header length, a JSON header naming every tensor's dtype,
shape and byte range (padded with spaces to 8 bytes), then the raw little-endian bytes.
Keys are the tree's flat paths (``"dense_1/0"``); the tree's structure is kept in
``__metadata__`` so :func:`load_safetensors` rebuilds the exact tree. No checksum pass and
no copy: writing a model costs what the disk costs. bfloat16 (``ml_dtypes``) is ``BF16``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .._atomic import StagedFile
from ..errors import ConfigError
from ._dtypes import bfloat16_dtype, is_bfloat16
from ._tree import ParamTree, flat_keys, flatten, unflatten

__all__ = ["load_safetensors", "save_safetensors", "stage_safetensors"]

_TO_ST = {
    "|b1": "BOOL", "|u1": "U8", "|i1": "I8", "<u2": "U16", "<i2": "I16", "<u4": "U32",
    "<i4": "I32", "<u8": "U64", "<i8": "I64", "<f2": "F16", "<f4": "F32", "<f8": "F64",
}  # fmt: skip
_FROM_ST = {v: k for k, v in _TO_ST.items()}
_STRUCTURE = "fedlift.structure"
_MAX_HEADER = 100 * 1024 * 1024


def save_safetensors(params: ParamTree, path: Path, *, recycle: bool = False) -> None:
    """Write ``params`` atomically as ``.safetensors`` (``recycle``: see ``_atomic``)."""
    stage_safetensors(params, path, recycle=recycle).publish()


def stage_safetensors(params: ParamTree, path: Path, *, recycle: bool = False) -> StagedFile:
    """Write ``params`` beside ``path``; the caller publishes it (fsync, rename) once it has
    let go of ``params``."""
    structure, arrays = flatten(params)
    header: dict[str, object] = {"__metadata__": {_STRUCTURE: json.dumps(structure)}}
    offset = 0
    prepared = []
    for key, raw in zip(flat_keys(structure), arrays, strict=True):
        array = raw.astype(raw.dtype.newbyteorder("<"), copy=False)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
        code = "BF16" if is_bfloat16(array.dtype) else _TO_ST.get(array.dtype.str)
        if code is None:
            raise ConfigError(f"cannot save {key!r}: dtype {array.dtype} has no safetensors code.")
        header[key] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        prepared.append(array)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    staged = StagedFile(path, recycle=recycle)
    try:
        handle = staged.handle
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for array in prepared:
            if array.nbytes:
                handle.write(array.reshape(-1).view(np.uint8).data)
    except BaseException:
        staged.discard()
        raise
    return staged


def load_safetensors(path: Path) -> ParamTree:
    """Read a ``.safetensors`` file (from fedlift or elsewhere) into a params tree."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) < 8:
        raise ConfigError(f"{path} is not a safetensors file (too short).")
    (size,) = struct.unpack_from("<Q", data, 0)
    if size > _MAX_HEADER or 8 + size > len(data):
        raise ConfigError(f"{path} is not a safetensors file (header size {size}).")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise ConfigError(f"{path} has a header that is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path} has a header that is not a JSON object.")
    body = memoryview(data)[8 + size :]
    metadata = header.pop("__metadata__", None) or {}
    named: dict[str, np.ndarray] = {}
    for key, spec in header.items():
        try:
            code = spec["dtype"]
            dtype = bfloat16_dtype() if code == "BF16" else np.dtype(_FROM_ST[code])
            shape = [int(d) for d in spec["shape"]]
            start, end = (int(x) for x in spec["data_offsets"])
            count = int(np.prod(shape, dtype=np.int64))
            if not 0 <= start <= end <= len(body) or end - start != count * dtype.itemsize:
                raise ValueError("byte range does not match dtype and shape")
            named[key] = np.frombuffer(body, dtype, count, start).reshape(shape).copy()
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: tensor {key!r} is malformed ({exc}).") from None
    raw = metadata.get(_STRUCTURE) if isinstance(metadata, dict) else None
    if raw is None:
        return named
    try:
        structure = json.loads(raw)
        keys = flat_keys(structure)
        return unflatten(structure, [named[k] for k in keys])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: its stored tree structure is corrupt ({exc}).") from None
