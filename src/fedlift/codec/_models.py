"""FLModel <-> message fields and arrays.

A model travels as JSON fields plus a list of arrays: first the leaves of ``params``, then
those of ``optimizer_params``, then those of every meta value that is a param tree of numpy
arrays (``meta_arrays``: SCAFFOLD's control variates are model-sized, and JSON would make
them text many times their size and lose their dtype). Every other meta value is JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError, ProtocolError
from ..model import FLModel, ParamsType, flatten, unflatten

__all__ = ["model_from_wire", "model_to_wire"]

_SCALAR_FIELDS = ("start_round", "current_round", "total_rounds")

_MAX_META_ARRAYS = 16
"""At most this many meta values of one model travel as arrays (a peer's message may not
make the receiver build an unbounded number of trees)."""
_MAX_META_KEY_CHARS = 256
"""The longest meta key whose value travels as arrays."""

_MAX_TREE_DEPTH = 64  # as fedlift.model's flatten()


def _is_array_tree(value: Any) -> bool:
    """Whether ``value`` is a non-empty param tree whose leaves are all numpy arrays.

    Such meta values travel as arrays; anything else (numbers, strings, lists of numbers, a
    tree with no array at all, a mix of arrays and other values) stays JSON. A lazily read
    array (``__fedlift_lazy__``) counts as an array, as in :func:`fedlift.model.flatten`.
    """
    return _array_leaves(value, 0) > 0


def _array_leaves(node: Any, depth: int) -> int:
    """The number of arrays in ``node``; -1 if it is no pure tree of arrays."""
    if depth > _MAX_TREE_DEPTH:
        return -1
    if isinstance(node, np.ndarray) or getattr(type(node), "__fedlift_lazy__", False):
        return 1
    children: Iterable[Any]
    if isinstance(node, Mapping):
        children = node.values()
        if not all(isinstance(key, str) for key in node):
            return -1
    elif isinstance(node, list | tuple):
        children = node
    else:
        return -1
    total = 0
    for child in children:
        count = _array_leaves(child, depth + 1)
        if count < 0:
            return -1
        total += count
    return total


def _split_meta(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``meta`` as (JSON values, param trees of arrays), each in meta's order."""
    json_meta: dict[str, Any] = {}
    trees: dict[str, Any] = {}
    for key, value in meta.items():
        (trees if _is_array_tree(value) else json_meta)[key] = value
    if len(trees) > _MAX_META_ARRAYS:
        raise ConfigError(
            f"FLModel.meta holds {len(trees)} param trees of arrays; at most {_MAX_META_ARRAYS} "
            f"can be sent. Received: keys={sorted(trees)[:20]}. Send fewer array-valued meta "
            "entries (e.g. put related arrays in one dict)."
        )
    for key in trees:
        if not isinstance(key, str) or not 0 < len(key) <= _MAX_META_KEY_CHARS:
            raise ConfigError(
                f"a meta key whose value is a param tree must be a string of 1 to "
                f"{_MAX_META_KEY_CHARS} characters. Received: key={key!r:.80}."
            )
    return json_meta, trees


def model_to_wire(model: FLModel) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Describe ``model`` as JSON fields plus its arrays (params, optimizer, meta trees).

    Raises :class:`~fedlift.errors.ConfigError` for meta it cannot send as arrays (more than
    16 trees, or a bad key). JSON-ability of the other meta values is
    the encoder's check.
    """
    json_meta, meta_trees = _split_meta(model.meta)
    fields: dict[str, Any] = {
        "params_type": model.params_type.value if model.params_type else None,
        "metrics": model.metrics,
        "meta": json_meta,
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
    if meta_trees:  # absent when there are none: such messages are as they always were
        specs: dict[str, Any] = {}
        for key, tree in meta_trees.items():
            structure, leaves = flatten(tree)
            specs[key] = {"structure": structure, "count": len(leaves)}
            arrays.extend(leaves)
        fields["meta_arrays"] = specs
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
    meta = dict(meta)
    trees: dict[str, Any] = {}
    position = 0
    for name in ("params", "optimizer_params"):
        trees[name], position = _tree(fields.get(name), f"model {name}", arrays, position)
    for key, spec in _meta_array_specs(fields.get("meta_arrays"), meta):
        start = position
        tree, position = _tree(spec, f"model meta_arrays[{key!r:.60}]", arrays, position)
        if position == start:
            raise ProtocolError(
                f"model meta_arrays[{key!r:.60}] must be a tree of at least one array; "
                f"received: {spec!r:.60}."
            )
        meta[key] = tree
    if position != len(arrays):
        raise ProtocolError(f"model message carries {len(arrays) - position} unexpected arrays.")
    if params_type is not None and trees["params"] is None:
        # FLModel refuses this too (a ConfigError); from the wire it is the peer's lie.
        raise ProtocolError(
            f"model params_type is {params_type.value} but the message carries no params."
        )
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


def _tree(
    spec: Any, name: str, arrays: list[np.ndarray] | tuple[Any, ...], position: int
) -> tuple[Any, int]:
    """The tree ``spec`` describes, from ``arrays[position:]``, and the next position."""
    if spec is None:
        return None, position
    count_raw = spec.get("count") if isinstance(spec, dict) else None
    if not isinstance(count_raw, int) or isinstance(count_raw, bool):
        raise ProtocolError(f"{name} must be an object with structure and count.")
    count = count_raw
    if count < 0 or position + count > len(arrays):
        raise ProtocolError(f"{name} names {count} arrays; only {len(arrays)} sent.")
    tree = unflatten(spec.get("structure"), list(arrays[position : position + count]))
    return tree, position + count


def _meta_array_specs(raw: Any, json_meta: dict[str, Any]) -> list[tuple[str, Any]]:
    """The ``meta_arrays`` field, checked: at most 16 string keys of
    at most 256 characters, none also a JSON meta key."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise ProtocolError(
            f"model meta_arrays must be a JSON object of key to {{structure, count}}; "
            f"received: {type(raw).__name__}."
        )
    if len(raw) > _MAX_META_ARRAYS:
        raise ProtocolError(
            f"model meta_arrays names {len(raw)} trees; at most {_MAX_META_ARRAYS} are accepted."
        )
    for key in raw:
        if not isinstance(key, str) or not 0 < len(key) <= _MAX_META_KEY_CHARS:
            raise ProtocolError(
                f"model meta_arrays keys must be strings of 1 to {_MAX_META_KEY_CHARS} "
                f"characters; received: {key!r:.60}."
            )
        if key in json_meta:
            raise ProtocolError(
                f"meta key {key!r:.60} is both a JSON meta value and a meta_arrays tree."
            )
    return list(raw.items())
