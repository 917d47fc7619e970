"""The local data behind the NVFlare-style scripts' one changed data-loading line.

NVFlare's examples download MNIST or CIFAR-10 (``tf.keras.datasets.*.load_data()``,
``torchvision.datasets.CIFAR10(download=True)``). The tests run offline, so each script's
data-loading line calls one of these instead, with the same return shapes and dtypes.
The images are the embedded Fashion-MNIST subset of examples/cifar10-tf
(``data/fashion_mnist_subset.npz``, 6,000 train / 1,000 test 28x28 grey images, 10
classes): as they are for the MNIST-shaped loader, zero-padded to 32x32 and repeated to 3
channels for the CIFAR-shaped ones (what examples/cifar10-tf's offline fallback does).

This module stays in the repository (the test puts its folder on ``PYTHONPATH``; the
clients' worker processes inherit it), so it is not part of the apps the jobs ship.
``NVSTYLE_TRAIN_SIZE`` / ``NVSTYLE_TEST_SIZE`` cut the sets (the first N of each; default
1000 / 200) so that the CI runs stay small.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cifar10_dataset", "cifar10_load_data", "mnist_load_data"]

NPZ = Path(__file__).resolve().parents[3] / "examples" / "cifar10-tf" / "data"
NPZ = NPZ / "fashion_mnist_subset.npz"

Split = tuple[np.ndarray, np.ndarray]


def _sizes() -> tuple[int, int]:
    return int(os.environ.get("NVSTYLE_TRAIN_SIZE", "1000")), int(
        os.environ.get("NVSTYLE_TEST_SIZE", "200")
    )


def mnist_load_data() -> tuple[Split, Split]:
    """As ``tf.keras.datasets.mnist.load_data()``: uint8 (N, 28, 28) images, uint8 labels."""
    n_train, n_test = _sizes()
    with np.load(NPZ) as data:
        return (data["x_train"][:n_train], data["y_train"][:n_train]), (
            data["x_test"][:n_test],
            data["y_test"][:n_test],
        )


def _as_cifar(images: np.ndarray) -> np.ndarray:
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1)


def cifar10_load_data() -> tuple[Split, Split]:
    """As ``keras.datasets.cifar10.load_data()``: uint8 (N, 32, 32, 3), labels (N, 1)."""
    (x_train, y_train), (x_test, y_test) = mnist_load_data()
    return (_as_cifar(x_train), y_train[:, None]), (_as_cifar(x_test), y_test[:, None])


def cifar10_dataset(train: bool) -> Any:
    """As ``torchvision.datasets.CIFAR10(train=train, transform=Compose([ToTensor(),
    Normalize((0.5,) * 3, (0.5,) * 3)]))``: float32 (3, 32, 32) images in [-1, 1] and int64
    labels, as a ``TensorDataset`` (torchvision does not install beside this torch)."""
    import torch
    from torch.utils.data import TensorDataset

    (x_train, y_train), (x_test, y_test) = cifar10_load_data()
    images, labels = (x_train, y_train) if train else (x_test, y_test)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    x = (x - 0.5) / 0.5
    return TensorDataset(x.contiguous(), torch.from_numpy(labels[:, 0].astype(np.int64)))
