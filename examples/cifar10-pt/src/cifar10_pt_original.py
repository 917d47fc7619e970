"""Centralised CIFAR-10 training: the script before it is turned into a federated one."""

from __future__ import annotations

import argparse

import torch
from cifar10_data import load_data
from pt_data import as_dataset
from pt_net import PTNet, evaluate
from safetensors.torch import save_file
from torch.utils.data import DataLoader

PATH = "./pt_model.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max_train", type=int, default=None, help="use fewer train images")
    parser.add_argument("--max_test", type=int, default=None, help="use fewer test images")
    args = parser.parse_args()

    torch.manual_seed(0)
    (train_images, train_labels), (test_images, test_labels) = load_data(
        max_train=args.max_train, max_test=args.max_test
    )
    train_loader = DataLoader(
        as_dataset(train_images, train_labels), batch_size=args.batch_size, shuffle=True
    )
    test_loader = DataLoader(as_dataset(test_images, test_labels), batch_size=256)

    model = PTNet()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    for epoch in range(args.epochs):
        running = 0.0
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            running += loss.item()
        print(f"epoch {epoch + 1}: loss {running / len(train_loader):.4f}")
    print("Finished Training")

    print(f"Test accuracy: {evaluate(model, test_loader):.4f}")
    save_file(model.state_dict(), PATH)
    print(f"Saved weights to {PATH}")


if __name__ == "__main__":
    main()
