"""The small CNN of the cifar10-tf example (the TensorFlow CIFAR-10 tutorial network).

Every layer has a fixed name so weights can be matched by layer name between
processes. Inputs are images already scaled to [0, 1]; the outputs are logits.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

LAYER_NAMES = (
    "conv2d_1",
    "max_pooling2d_1",
    "conv2d_2",
    "max_pooling2d_2",
    "conv2d_3",
    "flatten",
    "dense_1",
    "dense_2",
)


@keras.saving.register_keras_serializable(package="fedlift_examples")
class TFNet(keras.Sequential):  # type: ignore[misc]  # keras ships no type hints
    """Conv(32)-Pool-Conv(64)-Pool-Conv(64)-Dense(64)-Dense(10) for 32x32x3 images."""

    def __init__(
        self, input_shape: tuple[int, int, int] = (32, 32, 3), name: str = "tf_net", **kwargs: Any
    ) -> None:
        shape = tuple(input_shape)
        if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(
                f"TFNet: input_shape must be (height, width, channels) of positive ints, "
                f"got {input_shape!r}; CIFAR-10 images are (32, 32, 3)."
            )
        super().__init__(
            layers=[
                keras.Input(shape=shape, name="input"),
                layers.Conv2D(32, (3, 3), activation="relu", name="conv2d_1"),
                layers.MaxPooling2D((2, 2), name="max_pooling2d_1"),
                layers.Conv2D(64, (3, 3), activation="relu", name="conv2d_2"),
                layers.MaxPooling2D((2, 2), name="max_pooling2d_2"),
                layers.Conv2D(64, (3, 3), activation="relu", name="conv2d_3"),
                layers.Flatten(name="flatten"),
                layers.Dense(64, activation="relu", name="dense_1"),
                layers.Dense(10, name="dense_2"),
            ],
            name=name,
            **kwargs,
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> TFNet:
        """Rebuild from ``get_config()``; the architecture is fixed, only the shape varies.

        (``keras.Sequential.from_config`` would add the stored layers on top of the
        ones ``__init__`` already creates.)
        """
        names = [layer["config"]["name"] for layer in config.get("layers", [])]
        names = [n for n in names if n != "input"]
        if names and tuple(names) != LAYER_NAMES:
            raise ValueError(
                f"TFNet.from_config: layers {names} do not match TFNet's {list(LAYER_NAMES)}; "
                "load this config with keras.Sequential.from_config instead."
            )
        batch_shape = config.get("build_input_shape") or (None, 32, 32, 3)
        kwargs = {"trainable": config["trainable"]} if "trainable" in config else {}
        return cls(input_shape=tuple(batch_shape[1:]), name=config.get("name", "tf_net"), **kwargs)
