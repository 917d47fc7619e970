"""Shared by the PyTorch client script and the tests: a tiny model and real data.

The data are scikit-learn's bundled handwritten digits (8x8 images, 10 classes), written by
the test to the ``.npz`` file named by ``FEDLIFT_TEST_DIGITS`` (the job ships a copy of this
folder to each client; the path comes by env).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn


class Net(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear: float weights and BatchNorm's buffers
    (running statistics and the int64 ``num_batches_tracked``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def write_digits(path: str | os.PathLike[str]) -> None:
    """scikit-learn's digits, scaled to [0, 1], split 1400 train / 397 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    np.savez(path, x_train=x[:1400], y_train=y[:1400], x_test=x[1400:], y_test=y[1400:])


def load(site: int, sites: int) -> tuple[torch.Tensor, ...]:
    """This site's share of the training data (every ``sites``-th sample) and the test set."""
    with np.load(os.environ["FEDLIFT_TEST_DIGITS"], allow_pickle=False) as data:
        arrays = [data[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in arrays)
    return x_train[site::sites], y_train[site::sites], x_test, y_test


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        predicted = model(x.to(dtype)).argmax(dim=1)
    return float((predicted == y).float().mean())


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> int:
    """Plain SGD in mini-batches of 50; returns the number of steps."""
    model.train()
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 0
    for _ in range(epochs):
        for start in range(0, len(y), 50):
            optimizer.zero_grad()
            out = model(x[start : start + 50].to(dtype))
            loss = nn.functional.cross_entropy(out.float(), y[start : start + 50])
            loss.backward()
            optimizer.step()
            steps += 1
    return steps
