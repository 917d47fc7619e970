"""Nested Python lists of numbers as arrays: the initial models NVFlare's NumPy recipe takes.

NVFlare's NumPy FedAvg takes ``initial_model=[[1, 2, 3], [4, 5, 6]]`` and its persistor
turns it into ``{"numpy_key": np.array(model, dtype=np.float32)}``; the clients read
``input_model.params["numpy_key"]`` (``NPConstants.NUMPY_KEY``). :func:`tree_from_lists`
does the same, so those scripts run unchanged, and also turns the lists of numbers inside a
dict (``{"w": [[1, 2], [3, 4]], "b": [0, 0]}``) into arrays, each float32 as NVFlare's.

A list of numbers and a list of arrays mean different things: the first is one array, the
second a node of the param tree (Keras' ``{layer: [kernel, bias]}``), and an empty list is
a layer without weights. So only lists whose leaves are all Python numbers become arrays;
a list that mixes numbers with arrays or dicts, a ragged one and one that holds strings,
None or bools is refused with the path where it goes wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["NUMPY_KEY", "NPConstants", "tree_from_lists"]

NUMPY_KEY = "numpy_key"
"""The key of the one array a top-level list becomes (NVFlare's ``NPConstants.NUMPY_KEY``)."""


class NPConstants:
    """NVFlare's ``nvflare.app_common.np.constants.NPConstants``, for the one name its NumPy
    scripts read: ``input_model.params[NPConstants.NUMPY_KEY]``. With it, NVFlare's
    hello-numpy client runs after its imports change, its body untouched."""

    NUMPY_KEY = NUMPY_KEY


_MAX_DEPTH = 64


def tree_from_lists(tree: Any, owner: str = "initial_model") -> Any:
    """``tree`` with every nested list of numbers as a float32 array.

    A top-level list of numbers becomes ``{NUMPY_KEY: array}``, as in NVFlare. Anything
    without such lists comes back as it was (the same objects). ``owner`` names the
    argument in error messages.
    """
    if _meant_as_array(tree):
        return {NUMPY_KEY: _to_array(tree, owner, "")}
    return _convert(tree, owner, "", 0)


def _convert(node: Any, owner: str, path: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ConfigError(f"{owner} nests deeper than {_MAX_DEPTH} levels at {_where(path)}.")
    if isinstance(node, Mapping):
        out = {
            key: _convert(value, owner, _join(path, key), depth + 1) for key, value in node.items()
        }
        if all(out[key] is node[key] for key in node):
            return node
        return out
    if isinstance(node, list | tuple):
        if _meant_as_array(node):
            return _to_array(node, owner, path)
        items = [_convert(value, owner, _join(path, i), depth + 1) for i, value in enumerate(node)]
        if all(new is old for new, old in zip(items, node, strict=True)):
            return node
        return tuple(items) if isinstance(node, tuple) else items
    return node


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _where(path: str) -> str:
    return repr(path) if path else "the top level"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


_SCALARS = (int, float, bool, str, bytes, type(None))
"""Python values that start a list meant as an array (numbers), or a wrong one."""


def _meant_as_array(node: Any) -> bool:
    """Whether ``node`` is a list meant as one array: its first leaf, down the first
    elements, is a Python scalar (a number, or a mistake such as a string, None or a bool
    that :func:`_to_array` names). Lists of numpy arrays, dicts or tensors are tree nodes;
    numpy scalars there stay 0-d array leaves, as :func:`~fedlift.model.flatten` takes them."""
    first = node
    depth = 0
    while isinstance(first, list | tuple) and first and depth <= _MAX_DEPTH:
        first = first[0]
        depth += 1
    return depth > 0 and type(first) in _SCALARS


def _to_array(node: Any, owner: str, path: str) -> np.ndarray:
    shape = _shape(node, owner, path, 0)
    array = np.array(node, dtype=np.float64)
    if array.shape != shape:  # _shape saw every element; numpy must agree
        raise ConfigError(f"{owner} at {_where(path)} is a ragged list; received: {_short(node)}.")
    if not np.all(np.isfinite(array)) or np.any(np.abs(array) > np.finfo(np.float32).max):
        raise ConfigError(
            f"{owner} at {_where(path)} holds a value that is not a finite float32 (NaN, Inf "
            "or beyond +-3.4e38): an initial model must start from real numbers. Received: "
            f"{_short(node)}."
        )
    return array.astype(np.float32)


def _shape(node: Any, owner: str, path: str, depth: int) -> tuple[int, ...]:
    """The shape of a rectangular nested list of numbers; ConfigError naming the first
    element that breaks it."""
    if depth > _MAX_DEPTH:
        raise ConfigError(f"{owner} nests deeper than {_MAX_DEPTH} levels at {_where(path)}.")
    if _is_number(node):
        return ()
    if not isinstance(node, list | tuple):
        raise ConfigError(
            f"{owner} at {_where(path)} is a {type(node).__name__} inside a list of numbers; "
            "a list meant as an array holds only ints and floats (a list of layer weights "
            "holds only arrays). Convert the values, e.g. with float(). Received: "
            f"{_short(node)}."
        )
    if not node:
        raise ConfigError(
            f"{owner} at {_where(path)} is an empty list inside a list of numbers (a ragged "
            f"array); every row must have the same length. Received: {_short(node)}."
        )
    shapes = [_shape(value, owner, _join(path, i), depth + 1) for i, value in enumerate(node)]
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise ConfigError(
                f"{owner} at {_where(path)} is a ragged list: element 0 has shape "
                f"{shapes[0]} and element {i} has shape {shape}; an array needs rows of one "
                f"length. Received: {_short(node)}."
            )
    return (len(node), *shapes[0])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
