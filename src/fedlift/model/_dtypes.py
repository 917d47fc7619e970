"""bfloat16 in numpy: what the wire, the files and the server's maths call a float.

NumPy has no bfloat16 of its own. PyTorch (and JAX, TensorFlow) models train in it, so a
client's result may hold it, and the server must average it like any float. fedlift uses
``ml_dtypes.bfloat16`` (the numpy dtype those projects share): arrays of it cast to and
from float32 exactly, and numpy's ufuncs work on them. It is recognised here by its name
and size without importing ``ml_dtypes`` (an array of it exists only where it is loaded),
and ``ml_dtypes`` is imported only where such an array must be made (a message, a file).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["BFLOAT16", "bfloat16_dtype", "is_bfloat16", "is_float_dtype"]

BFLOAT16 = "bfloat16"
"""The dtype's name (what the wire and ``safetensors``' ``BF16`` stand for)."""

_loaded: np.dtype[Any] | None = None


def is_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype`` is ``ml_dtypes.bfloat16`` (without importing ml_dtypes)."""
    dt = dtype if isinstance(dtype, np.dtype) else getattr(dtype, "dtype", None)
    return (
        isinstance(dt, np.dtype)
        and dt.kind == "V"
        and dt.itemsize == 2
        and dt.name == BFLOAT16
        and dt.fields is None
    )


def is_float_dtype(dtype: Any) -> bool:
    """Whether a leaf of ``dtype`` holds floats: numpy's float16/32/64 (and longer) or
    bfloat16. The server averages, scans for NaN and moves such leaves by its strategy's
    rule; every other leaf is an integer, bool or complex one."""
    dt = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
    return dt.kind == "f" or is_bfloat16(dt)


def bfloat16_dtype() -> np.dtype[Any]:
    """``numpy.dtype(ml_dtypes.bfloat16)``; a ConfigError that names the package to install
    when it is missing."""
    global _loaded
    if _loaded is None:
        try:
            import ml_dtypes
        except ImportError:
            raise ConfigError(
                "a bfloat16 array needs the ml_dtypes package (numpy has no bfloat16 of its "
                "own), and it is not installed in this environment. Install it: "
                "pip install ml_dtypes (fedlift depends on it; a partial install lacks it). "
                "Received: dtype=bfloat16."
            ) from None
        _loaded = np.dtype(ml_dtypes.bfloat16)
    return _loaded
