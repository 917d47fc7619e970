"""Keras glue: params trees from models and back, by layer name. Imports Keras lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ._tree import ParamTree

__all__ = [
    "build_keras_model",
    "is_keras_model",
    "keras_params",
    "load_keras_model",
    "plain_keras_copy",
    "set_keras_params",
]


def is_keras_model(obj: Any) -> bool:
    """True for a Keras model, without importing Keras when it is not loaded."""
    module = type(obj).__module__ or ""
    if not (module.startswith("keras") or module.startswith("tensorflow")):
        return any(
            (c.__module__ or "").startswith(("keras", "tensorflow")) and c.__name__ == "Model"
            for c in type(obj).__mro__
        )
    return hasattr(obj, "layers") and hasattr(obj, "get_weights")


def build_keras_model(model: Any, owner: str = "initial_model") -> None:
    """Build ``model`` in place if it is not built yet, as NVFlare's TF persistor does.

    An unbuilt model has no weights to send: every client would fail in round 0 loading a
    weight list of length 0. NVFlare's persistor builds such a model from the input shape
    it keeps, ``model._input_shape`` (NVFlare's TF CIFAR-10 example:
    ``TFNet(input_shape=(None, 32, 32, 3))`` stores it), with ``model.build(...)``; so does
    this. A model built already (a Sequential that starts with ``keras.Input``, a functional
    model, one that was called on data) is left as it is. Without a known input shape it
    raises a ConfigError that names ``model.build(...)``.
    """
    if getattr(model, "built", True):
        return
    shape = getattr(model, "_input_shape", None)
    if shape is None:
        raise ConfigError(
            f"{owner}: the Keras model {type(model).__name__} is not built, so it has no "
            "weights to send and every client would fail in round 0. Build it before "
            "passing it: model.build(input_shape=(None, ...)) with your input's shape, or "
            "start a Sequential with keras.Input(shape=...), or keep the shape on the model "
            "(self._input_shape = (None, 32, 32, 3) in its __init__, as NVFlare's TF models "
            "do) so that fedlift builds it. Received: an unbuilt "
            f"{type(model).__name__} without _input_shape."
        )
    try:
        model.build(input_shape=tuple(shape) if isinstance(shape, list) else shape)
    except Exception as exc:  # Keras raises many types here; report them as one
        raise ConfigError(
            f"{owner}: building the Keras model {type(model).__name__} with its "
            f"_input_shape failed ({type(exc).__name__}: {exc}). _input_shape is the shape "
            "model.build(...) takes, batch dimension first, e.g. (None, 32, 32, 3). "
            f"Received: _input_shape={shape!r}."
        ) from exc


def keras_params(model: Any) -> dict[str, list[np.ndarray]]:
    """``{layer.name: layer.get_weights()}``, what the Client API examples send."""
    return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in model.layers}


def set_keras_params(model: Any, params: ParamTree) -> None:
    """Load a ``{layer name: [arrays]}`` tree into ``model``; every layer must be present."""
    if not isinstance(params, dict):
        raise ConfigError(
            f"Keras params must be a dict of layer name to list of arrays; received a "
            f"{type(params).__name__}."
        )
    names = [layer.name for layer in model.layers]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ConfigError(
            f"params name layers the model does not have: {unknown[:5]}; the model's layers "
            f"are {names[:10]}. Give layers explicit names so they match across processes."
        )
    for layer in model.layers:
        if layer.name in params:
            layer.set_weights(list(params[layer.name]))


def load_keras_model(path: str | Path) -> Any:
    """Load a ``.keras`` file in safe mode (no arbitrary code) without compiling it."""
    import keras

    return keras.saving.load_model(str(path), compile=False, safe_mode=True)


def plain_keras_copy(model: Any) -> Any:
    """A copy of ``model`` as a plain Sequential/functional model with the same layer names
    and weights, so that it can be saved and loaded without the user's Python classes."""
    import keras

    try:
        copy = keras.models.clone_model(model)
    except Exception as exc:  # Keras raises many types here; report them as one
        raise ConfigError(
            f"cannot turn the {type(model).__name__} initial model into a plain Keras model "
            f"({type(exc).__name__}: {exc}). Build it with keras.Sequential or the functional "
            "API, or pass initial_model as a dict of numpy arrays."
        ) from exc
    if type(copy).__name__ not in ("Sequential", "Functional"):
        config = model.get_config()
        cls = keras.Sequential if "layers" in config else keras.Model
        copy = cls.from_config(config)
    copy.set_weights(model.get_weights())
    return copy
