"""CIFAR-10 (or the embedded fallback) as PyTorch datasets, and each site's part of it.

``cifar10_data.load_data()`` gives uint8 NHWC images like Keras; PyTorch wants float NCHW.
A site's part of the training set is an IID shard by site index (``split="iid"``), the
whole set (``"full"``), or, with ``alpha > 0``, a label-skewed part: the class
proportions of each site drawn from Dir(alpha) (``fedlift.data.dirichlet``, NIID-Bench's
partition; small alpha such as 0.1 gives each site a few dominant classes, 100 is near
IID). Every site computes the same partition from the same seed.
"""

from __future__ import annotations

import numpy as np
import torch
from cifar10_data import load_data
from torch.utils.data import TensorDataset

from fedlift.data import dirichlet


def as_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """uint8 (N, 32, 32, 3) images and (N, 1) labels as float (N, 3, 32, 32) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 255.0
    return TensorDataset(x, torch.from_numpy(labels.reshape(-1).astype(np.int64)))


def site_datasets(
    site_index: int,
    num_sites: int,
    split: str = "iid",
    alpha: float = 0.0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> tuple[TensorDataset, TensorDataset]:
    """This site's training set and the whole test set."""
    if alpha > 0:
        (x_train, y_train), (x_test, y_test) = load_data(max_test=max_test)
        parts = dirichlet(y_train.reshape(-1), num_sites, alpha=alpha, seed=0)
        index = parts[site_index][:max_train]
        x_train, y_train = x_train[index], y_train[index]
    else:
        (x_train, y_train), (x_test, y_test) = load_data(
            shard=(site_index, num_sites), split=split, max_train=max_train, max_test=max_test
        )
    return as_dataset(x_train, y_train), as_dataset(x_test, y_test)
