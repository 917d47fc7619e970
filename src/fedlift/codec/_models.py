"""FLModel <-> message fields and arrays."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import ProtocolError
from ..model import FLModel, ParamsType, flatten, unflatten

__all__ = ["model_from_wire", "model_to_wire"]

_SCALAR_FIELDS = ("start_round", "current_round", "total_rounds")


def model_to_wire(model: FLModel) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Describe ``model`` as JSON fields plus its arrays (params first, then optimizer)."""
    fields: dict[str, Any] = {
        "params_type": model.params_type.value if model.params_type else None,
        "metrics": model.metrics,
        "meta": model.meta,
    }
    for name in _SCALAR_FIELDS:
        fields[name] = getattr(model, name)
    arrays: list[np.ndarray] = []
    for name in ("params", "optimizer_params"):
        tree = getattr(model, name)
        if tree is None:
            fields[name] = None
            continue
        structure, leaves = flatten(tree)
        fields[name] = {"structure": structure, "count": len(leaves)}
        arrays.extend(leaves)
    return fields, arrays


def _int_or_none(fields: dict[str, Any], name: str) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"model field {name!r} must be a non-negative int; got {value!r:.40}")
    return value


def _metrics(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ProtocolError("model metrics must be a JSON object.")
    for key, value in raw.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if not isinstance(value, int | float | str | bool | list | dict) and value is not None:
            raise ProtocolError(f"metric {key!r:.40} has an unsupported value type.")
    return raw


def model_from_wire(fields: dict[str, Any], arrays: list[np.ndarray] | tuple[Any, ...]) -> FLModel:
    """Rebuild and validate a model sent by :func:`model_to_wire`."""
    if not isinstance(fields, dict):
        raise ProtocolError(
            f"a model must be a JSON object of fields; received: {type(fields).__name__} "
            f"{fields!r:.40}"
        )
    params_type_raw = fields.get("params_type")
    if params_type_raw is None:
        params_type = None
    elif params_type_raw in ("FULL", "DIFF"):
        params_type = ParamsType(params_type_raw)
    else:
        raise ProtocolError(f"params_type must be FULL or DIFF; got {params_type_raw!r:.40}")
    meta = fields.get("meta") or {}
    if not isinstance(meta, dict):
        raise ProtocolError("model meta must be a JSON object.")
    trees: dict[str, Any] = {}
    position = 0
    for name in ("params", "optimizer_params"):
        spec = fields.get(name)
        if spec is None:
            trees[name] = None
            continue
        count_raw = spec.get("count") if isinstance(spec, dict) else None
        if not isinstance(count_raw, int) or isinstance(count_raw, bool):
            raise ProtocolError(f"model {name} must be an object with structure and count.")
        count = count_raw
        if count < 0 or position + count > len(arrays):
            raise ProtocolError(f"model {name} names {count} arrays; only {len(arrays)} sent.")
        trees[name] = unflatten(spec.get("structure"), list(arrays[position : position + count]))
        position += count
    if position != len(arrays):
        raise ProtocolError(f"model message carries {len(arrays) - position} unexpected arrays.")
    return FLModel(
        params_type=params_type,
        params=trees["params"],
        optimizer_params=trees["optimizer_params"],
        metrics=_metrics(fields.get("metrics")),
        start_round=_int_or_none(fields, "start_round"),
        current_round=_int_or_none(fields, "current_round"),
        total_rounds=_int_or_none(fields, "total_rounds"),
        meta=meta,
    )
