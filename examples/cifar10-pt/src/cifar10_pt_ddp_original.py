"""Centralised CIFAR-10 training with DistributedDataParallel, one process per GPU (or per
CPU share), started by torchrun: ``torchrun --nproc_per_node=2 cifar10_pt_ddp_original.py``.

Each rank trains on its part of every epoch (DistributedSampler) and DDP averages the
gradients, so the ranks keep one model. NCCL on GPUs (one per rank), gloo on the CPU.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from cifar10_data import load_data
from pt_data import as_dataset
from pt_net import PTNet, evaluate
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

PATH = "./pt_model.safetensors"


def setup() -> tuple[int, int, str]:
    """Join the process group: (rank, world size, this rank's device)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dist.init_process_group("nccl" if on_gpus else "gloo")
    if on_gpus:
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), f"cuda:{local_rank}"
    return dist.get_rank(), dist.get_world_size(), "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max_train", type=int, default=None, help="use fewer train images")
    parser.add_argument("--max_test", type=int, default=None, help="use fewer test images")
    args = parser.parse_args()

    rank, world, device = setup()
    print(f"rank {rank} of {world} on {device}")
    torch.manual_seed(0)
    (train_images, train_labels), (test_images, test_labels) = load_data(
        max_train=args.max_train, max_test=args.max_test
    )
    train_set = as_dataset(train_images, train_labels)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=0)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    test_loader = DataLoader(as_dataset(test_images, test_labels), batch_size=256)

    model = PTNet().to(device)
    ddp_model = DistributedDataParallel(model)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(ddp_model.parameters(), lr=args.lr)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        running = 0.0
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(ddp_model(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running += loss.item()
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {running / len(train_loader):.4f}")

    if rank == 0:  # the ranks hold the same model: one of them reports and saves it
        print("Finished Training")
        print(f"Test accuracy: {evaluate(model, test_loader, device):.4f}")
        save_file({k: v.cpu() for k, v in model.state_dict().items()}, PATH)
        print(f"Saved weights to {PATH}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
