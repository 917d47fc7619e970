"""What ``flare.log`` turns a script's values into: one checked log record for the wire.

A script logs what its framework hands it: numpy scalars, 0-d tensors, ints for params.
Those become plain numbers and strings here (params and tags are "string-ified if not", as
in NVFlare and MLflow), and the record is then checked by the same rules the server applies
(:func:`fedlift.codec.check_log_record`), so a bad call raises in the script, at the line
that made it, instead of failing later on the server.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Mapping
from typing import Any

from ..codec import check_log_record
from ..errors import ClientAPIError, ProtocolError

__all__ = ["build_record"]

_NUMBER_TYPES = ("SCALAR", "METRIC")
_NUMBERS_TYPES = ("SCALARS", "METRICS")
_STRINGS_TYPES = ("PARAMETERS", "TAGS")


def _number(name: Any, raw: Any) -> float:
    """A plain float from a Python, numpy or framework scalar (``.item()``); never a str."""
    value = raw
    if not isinstance(value, numbers.Real) and hasattr(value, "item"):
        try:
            value = value.item()  # numpy scalars and 0-d arrays, torch/tf scalar tensors
        except (TypeError, ValueError, RuntimeError):
            value = raw
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ClientAPIError(
            f"log() value for {name!r} must be a number; received: {raw!r:.60} "
            f"({type(raw).__name__}). Pass float(value)."
        )
    try:
        return float(value)
    except OverflowError:
        raise ClientAPIError(
            f"log() value for {name!r} is too large for a float; received: {raw!r:.60}."
        ) from None


def _step(step: Any) -> int | None:
    """An int from an int-like step (numpy ints, integer 0-d tensors: ``__index__``)."""
    if step is None:
        return None
    try:
        value = None if isinstance(step, bool) else operator.index(step)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ClientAPIError(
            f"log(global_step=...) takes an int >= 0 or None; received: {step!r:.60} "
            f"({type(step).__name__})."
        )
    return value


def build_record(
    key: Any, value: Any, data_type: str, step: Any, writer: Any, path: Any
) -> dict[str, Any]:
    """The wire record of one ``log()`` call; raises :class:`ClientAPIError` with the fix."""
    wire: Any = value
    if data_type in _NUMBER_TYPES:
        wire = _number(key, value)
    elif data_type in _NUMBERS_TYPES or data_type in _STRINGS_TYPES:
        kind = "numbers" if data_type in _NUMBERS_TYPES else "names to values"
        if not isinstance(value, Mapping):
            raise ClientAPIError(
                f"log(data_type={data_type}) takes a dict of {kind}; received: {value!r:.60} "
                f"({type(value).__name__})."
            )
        if data_type in _NUMBERS_TYPES:
            wire = {name: _number(name, raw) for name, raw in value.items()}
        else:
            wire = {name: raw if isinstance(raw, str) else str(raw) for name, raw in value.items()}
    elif data_type in ("PARAMETER", "TAG") and not isinstance(value, str):
        wire = str(value)
    fields = {
        "key": key,
        "value": wire,
        "data_type": data_type,
        "step": _step(step),
        "writer": writer,
        "path": path,
    }
    try:
        return check_log_record(fields)
    except ProtocolError as exc:
        raise ClientAPIError(str(exc)) from None
