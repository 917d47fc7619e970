"""Param trees: nested dicts and lists of numpy arrays, flattened with stable keys.

A *param tree* is what a training script hands to ``FLModel(params=...)``:

* a dict of arrays (``{"w": array, "b": array}``),
* a dict of lists of arrays (Keras: ``{layer.name: layer.get_weights()}``; a layer without
  weights gives an empty list),
* nested dicts of any of these.

:func:`flatten` turns a tree into a JSON-able *structure* plus the list of its arrays in a
fixed order (dict insertion order, list order); :func:`unflatten` is its exact inverse.
:func:`flat_keys` names every array by its path (``"dense/0"``), which is what files and
error messages use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np

from ..errors import ConfigError, ProtocolError
from ._torch import is_torch_tensor, tensor_to_numpy

__all__ = [
    "ParamTree",
    "Structure",
    "flat_keys",
    "flatten",
    "map_arrays",
    "unflatten",
]

ParamTree: TypeAlias = Any
"""A nested ``dict[str, ...]`` / ``list[...]`` of numpy arrays."""

Structure: TypeAlias = Any
"""JSON-able description of a tree's shape: ``None`` for an array, ``{"d": [[key, s], ...]}``
for a dict, ``{"l": [s, ...]}`` for a list or tuple."""

_MAX_DEPTH = 64


def _leaf(value: Any, path: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if getattr(type(value), "__fedlift_lazy__", False):
        # An array whose bytes are read on demand (codec's RemoteArray): kept as it is.
        return value  # type: ignore[no-any-return]
    if isinstance(value, np.generic):
        return np.asarray(value)
    if is_torch_tensor(value):  # on any device, with gradients, bfloat16: see _torch
        return tensor_to_numpy(value, path)
    # Framework tensors (tf.Variable, torch.Tensor) expose __array__ / .numpy().
    numpy_method = getattr(value, "numpy", None)
    if callable(numpy_method):
        out = numpy_method()
        if isinstance(out, np.ndarray | np.generic):
            return np.asarray(out)
    if hasattr(value, "__array__") and not isinstance(value, str | bytes):
        return np.asarray(value)
    raise ConfigError(
        f"params at {path or '<root>'!r} is a {type(value).__name__}; expected a numpy array, "
        "a dict or a list of them. Received: "
        f"{_short_repr(value)}. Convert it with numpy.asarray() or layer.get_weights()."
    )


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def flatten(tree: ParamTree) -> tuple[Structure, list[np.ndarray]]:
    """Split ``tree`` into its structure and its arrays (in a stable order)."""
    arrays: list[np.ndarray] = []
    structure = _walk(tree, "", 0, arrays)
    return structure, arrays


# Module-level recursion (not nested closures): a recursive closure is a reference cycle,
# and it would keep whole models alive until the garbage collector happens to run.
def _walk(node: Any, path: str, depth: int, arrays: list[np.ndarray]) -> Structure:
    if depth > _MAX_DEPTH:
        raise ConfigError(f"params nest deeper than {_MAX_DEPTH} levels at {path!r}.")
    if isinstance(node, Mapping):
        items = []
        for key, value in node.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"params keys must be strings; found {key!r} "
                    f"({type(key).__name__}) at {path or '<root>'!r}. "
                    "Use layer names or str(key)."
                )
            items.append([key, _walk(value, f"{path}/{key}" if path else key, depth + 1, arrays)])
        return {"d": items}
    if isinstance(node, list | tuple):
        return {
            "l": [
                _walk(value, f"{path}/{i}" if path else str(i), depth + 1, arrays)
                for i, value in enumerate(node)
            ]
        }
    arrays.append(_leaf(node, path))
    return None


def unflatten(structure: Structure, arrays: Sequence[np.ndarray]) -> ParamTree:
    """Rebuild the tree that :func:`flatten` described. Validates the structure."""
    position = [0]
    tree = _build(structure, 0, arrays, position)
    if position[0] != len(arrays):
        raise ProtocolError(
            f"param structure names {position[0]} arrays but {len(arrays)} were sent."
        )
    return tree


def _build(node: Any, depth: int, arrays: Sequence[np.ndarray], position: list[int]) -> Any:
    if depth > _MAX_DEPTH:
        raise ProtocolError(f"param structure nests deeper than {_MAX_DEPTH} levels.")
    if node is None:
        if position[0] >= len(arrays):
            raise ProtocolError(f"param structure names more arrays than the {len(arrays)} sent.")
        position[0] += 1
        return arrays[position[0] - 1]
    if isinstance(node, dict) and len(node) == 1:
        if "d" in node and isinstance(node["d"], list):
            out: dict[str, Any] = {}
            for item in node["d"]:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                    raise ProtocolError(f"bad dict entry in param structure: {item!r:.80}")
                if item[0] in out:
                    raise ProtocolError(f"param structure names key {item[0]!r:.80} twice.")
                out[item[0]] = _build(item[1], depth + 1, arrays, position)
            return out
        if "l" in node and isinstance(node["l"], list):
            return [_build(child, depth + 1, arrays, position) for child in node["l"]]
    raise ProtocolError(f"bad node in param structure: {node!r:.80}")


def flat_keys(structure: Structure) -> list[str]:
    """The path of every array in ``structure``, in flatten order (``"dense/0"``)."""
    keys: list[str] = []

    def walk(node: Any, path: str) -> None:
        if node is None:
            keys.append(path)
        elif "d" in node:
            for key, child in node["d"]:
                walk(child, f"{path}/{key}" if path else key)
        else:
            for i, child in enumerate(node["l"]):
                walk(child, f"{path}/{i}" if path else str(i))

    walk(structure, "")
    return keys


def map_arrays(fn: Callable[..., np.ndarray], tree: ParamTree, *others: ParamTree) -> ParamTree:
    """Apply ``fn`` leaf-wise over trees of the same structure and return a new tree."""
    structure, arrays = flatten(tree)
    other_arrays = []
    for other in others:
        other_structure, other_list = flatten(other)
        if other_structure != structure:
            raise ConfigError(
                "param trees differ in structure: "
                f"{_describe_difference(structure, other_structure)}."
            )
        other_arrays.append(other_list)
    out = [fn(a, *(o[i] for o in other_arrays)) for i, a in enumerate(arrays)]
    return unflatten(structure, out)


def _describe_difference(a: Structure, b: Structure) -> str:
    keys_a, keys_b = flat_keys(a), flat_keys(b)
    missing = [k for k in keys_a if k not in set(keys_b)]
    extra = [k for k in keys_b if k not in set(keys_a)]
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}")
    if extra:
        parts.append(f"unexpected {extra[:5]}")
    return ", ".join(parts) or "same keys in a different order or nesting"


def iter_with_keys(tree: ParamTree) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(path, array)`` pairs in flatten order."""
    structure, arrays = flatten(tree)
    yield from zip(flat_keys(structure), arrays, strict=True)
