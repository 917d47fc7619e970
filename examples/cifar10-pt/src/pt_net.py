"""The CNN of the cifar10-pt example: cifar10-tf's TFNet, layer for layer, in PyTorch.

Conv(32)-Pool-Conv(64)-Pool-Conv(64)-Dense(64)-Dense(10) for 3x32x32 images scaled to
[0, 1]; the outputs are logits. Its ``state_dict()`` keys (``conv1.weight``, ...) are what
the server's global model holds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class PTNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.fc1 = nn.Linear(64 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.max_pool2d(functional.relu(self.conv1(x)), 2)  # 32 -> 30 -> 15
        x = functional.max_pool2d(functional.relu(self.conv2(x)), 2)  # 15 -> 13 -> 6
        x = functional.relu(self.conv3(x))  # 6 -> 4
        x = functional.relu(self.fc1(torch.flatten(x, 1)))
        out: torch.Tensor = self.fc2(x)
        return out


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: str = "cpu") -> float:
    """The model's accuracy on ``loader`` (in eval mode, without gradients)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            predicted = model(images.to(device)).argmax(dim=1)
            correct += int((predicted == labels.to(device)).sum())
            total += len(labels)
    model.train()
    return correct / max(total, 1)
