"""Shared by the Keras client script and the centralised reference run in the tests."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

# The job ships a copy of this folder to each client: the tests pass the data's path by env.
DATA = Path(
    os.environ.get(
        "FEDLIFT_TEST_FASHION",
        Path(__file__).resolve().parents[2] / "examples/cifar10-tf/data/fashion_mnist_subset.npz",
    )
)


def deterministic(seed: int = 0) -> None:
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def load(n_train: int = 1200, n_test: int = 400) -> tuple[np.ndarray, ...]:
    """Real Fashion-MNIST (the example's embedded subset), scaled to [0, 1]."""
    with np.load(DATA, allow_pickle=False) as data:
        x_train = data["x_train"][:n_train, :, :, None].astype("float32") / 255.0
        y_train = data["y_train"][:n_train].astype("int64")
        x_test = data["x_test"][:n_test, :, :, None].astype("float32") / 255.0
        y_test = data["y_test"][:n_test].astype("int64")
    return x_train, y_train, x_test, y_test


def build_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(10, name="out"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def fit(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    model.fit(x, y, epochs=epochs, batch_size=64, shuffle=False, verbose=0)
