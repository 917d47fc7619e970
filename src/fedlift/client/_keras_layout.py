"""A Keras model's weights as fedlift lays them out: layer name -> list of arrays.

The Client API's Keras params are ``{layer.name: layer.get_weights()}`` over
``model.layers`` (a weightless layer gives ``[]``), and the algorithms' extra trees
(SCAFFOLD's control variates, FedProx's global weights) use the same layout, so a script
can hand ``input_model.params`` or ``input_model.meta[...]`` straight to the helpers. This
module maps such trees onto the model's variables and back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = [
    "Layer",
    "Slot",
    "all_slots",
    "arrays_from_tree",
    "layout",
    "read_values",
    "tree_from_arrays",
]


@dataclass(frozen=True)
class Slot:
    """One weight: the ``index``-th of layer ``layer``'s ``get_weights()``."""

    layer: str
    index: int
    variable: Any
    trainable: bool

    @property
    def key(self) -> str:
        return f"{self.layer}/{self.index}"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.variable.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(str(self.variable.dtype))


@dataclass(frozen=True)
class Layer:
    name: str
    slots: tuple[Slot, ...]


def layout(model: Any) -> list[Layer]:
    """The model's layers and their weights, in ``get_weights()`` order.

    A weight is trainable when the optimizer updates it (it is one of
    ``model.trainable_variables``): frozen layers and statistics such as BatchNorm's moving
    mean are not.
    """
    if not hasattr(model, "layers") or not hasattr(model, "trainable_variables"):
        raise ConfigError(
            f"expected a Keras model; received: {type(model).__name__}. Pass the model "
            "that model.fit() trains."
        )
    trainable = {id(v) for v in model.trainable_variables}
    out = []
    for layer in model.layers:
        slots = tuple(
            Slot(layer.name, i, v, id(v) in trainable) for i, v in enumerate(layer.weights)
        )
        out.append(Layer(layer.name, slots))
    return out


def all_slots(layers: Sequence[Layer]) -> list[Slot]:
    return [slot for layer in layers for slot in layer.slots]


def read_values(slots: Sequence[Slot]) -> list[np.ndarray]:
    """The current value of every slot's variable (copies)."""
    return [np.array(slot.variable.numpy(), copy=True) for slot in slots]


def arrays_from_tree(tree: Any, layers: Sequence[Layer], what: str) -> list[np.ndarray]:
    """``tree``'s arrays, one per slot of ``layers`` (in their order), cast to each weight's
    dtype. ``tree`` is a ``{layer name: [arrays]}`` dict (weightless layers may be left
    out) or a flat list in ``model.get_weights()`` order."""
    slots = all_slots(layers)
    if isinstance(tree, Mapping):
        names = {layer.name for layer in layers}
        unknown = sorted(str(k) for k in tree if k not in names)
        if unknown:
            raise ConfigError(
                f"{what} names layers the model does not have: {unknown[:5]}; the model's "
                f"layers are {sorted(names)[:10]}. Received: keys={list(tree)[:10]}."
            )
        raw: list[Any] = []
        for layer in layers:
            entry = tree.get(layer.name, [] if not layer.slots else None)
            if not isinstance(entry, list | tuple) or len(entry) != len(layer.slots):
                count = "no list" if not isinstance(entry, list | tuple) else len(entry)
                raise ConfigError(
                    f"{what}[{layer.name!r}] must be a list of the layer's "
                    f"{len(layer.slots)} weights (as layer.get_weights()). Received: {count}."
                )
            raw.extend(entry)
    elif isinstance(tree, list | tuple):
        if len(tree) != len(slots):
            raise ConfigError(
                f"{what} must hold one array per model weight ({len(slots)}, in "
                f"model.get_weights() order). Received: {len(tree)} arrays."
            )
        raw = list(tree)
    else:
        raise ConfigError(
            f"{what} must be a dict of layer name to list of arrays (as FLModel.params) or a "
            f"list as model.get_weights(). Received: {type(tree).__name__}."
        )
    out = []
    for slot, value in zip(slots, raw, strict=True):
        array = np.asarray(value)
        if array.shape != slot.shape or not np.issubdtype(array.dtype, np.number):
            raise ConfigError(
                f"{what} at {slot.key!r} must be a numeric array of shape {slot.shape}. "
                f"Received: shape={array.shape}, dtype={array.dtype}."
            )
        out.append(array.astype(slot.dtype, copy=True))
    return out


def tree_from_arrays(layers: Sequence[Layer], arrays: Sequence[np.ndarray]) -> dict[str, Any]:
    """The ``{layer name: [arrays]}`` tree of one array per slot (all layers, ``[]`` for a
    weightless one), as the model's params are laid out."""
    tree: dict[str, Any] = {}
    position = 0
    for layer in layers:
        tree[layer.name] = list(arrays[position : position + len(layer.slots)])
        position += len(layer.slots)
    return tree
