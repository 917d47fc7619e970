"""Federated CIFAR-10 training with DistributedDataParallel: cifar10_pt_ddp_original.py
plus the same 7 changes as cifar10_pt_fl.py. Every site runs it under torchrun:
``ScriptRunner(..., command="torchrun --nproc_per_node=2")``, i.e.
``pt_client_api_job.py --script src/cifar10_pt_ddp_fl.py --command "torchrun --nproc_per_node=2"``.

Every rank receives each round's global model from its site (each loads it, so the ranks
start the round equal), trains on its part of the site's data, and DDP averages the
gradients; only rank 0 evaluates and sends (the other ranks' next ``is_running()`` moves
on with it). FedProx and SCAFFOLD work as in cifar10_pt_fl.py, on every rank alike.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from pt_data import site_datasets
from pt_net import PTNet, evaluate
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

# (1) import the Client API (and the PyTorch helpers of FedProx and SCAFFOLD)
import fedlift.client as flare
from fedlift.client.pytorch import PTFedProxLoss, PTScaffoldHelper, get_fedprox_mu, get_lr_values

PATH = "./pt_model.safetensors"
SCAFFOLD = flare.AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL


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
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch_size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max_train", type=int, default=None, help="use fewer train images")
    parser.add_argument("--max_test", type=int, default=None, help="use fewer test images")
    parser.add_argument(
        "--data_split",
        choices=["iid", "full"],
        default="iid",
        help="iid: each site trains on its own shard; full: every site on all",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.0, help="> 0: a Dirichlet(alpha) label skew"
    )
    args = parser.parse_args()

    rank, world, device = setup()
    print(f"rank {rank} of {world} on {device}")

    # (2) initialise the Client API (every rank; the rank comes from torchrun's RANK)
    flare.init(rank=rank)
    site = flare.system_info()  # this site's index among num_sites picks its part of the data

    torch.manual_seed(0)
    train_set, test_set = site_datasets(
        site["site_index"],
        site["num_sites"],
        split=args.data_split,
        alpha=args.alpha,
        max_train=args.max_train,
        max_test=args.max_test,
    )
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=0)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    test_loader = DataLoader(test_set, batch_size=256)

    model = PTNet().to(device)
    ddp_model = DistributedDataParallel(model)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(ddp_model.parameters(), lr=args.lr)
    scaffold = PTScaffoldHelper()  # SCAFFOLD: one helper for the whole job
    scaffold.init(model)
    epoch = 0

    while flare.is_running():
        # (3) receive the global model (every rank)
        input_model = flare.receive()
        if rank == 0:
            print(f"{site['site_name']}: round {input_model.current_round}")

        # (4) load the global weights (every rank: they start the round equal)
        model.load_state_dict(input_model.params)

        # (5) evaluate the global model, to report how it does on this site's test data
        global_accuracy = evaluate(model, test_loader, device) if rank == 0 else 0.0
        if rank == 0:
            print(f"{site['site_name']}: accuracy of the received global model: "
                  f"{global_accuracy:.4f}")  # fmt: skip

        if flare.is_evaluate():  # the server's last task: evaluate the final model only
            if rank == 0:
                flare.send(flare.FLModel(metrics={"accuracy": global_accuracy}))
            continue

        global_model = copy.deepcopy(model)  # FedProx and SCAFFOLD: the round's anchor
        prox = PTFedProxLoss(mu=get_fedprox_mu())  # FedProx: mu from the server, else 0
        use_scaffold = SCAFFOLD in input_model.meta  # SCAFFOLD: the server's controls
        if use_scaffold:
            scaffold.load_global_controls(input_model.meta[SCAFFOLD])
            c_global, c_local = scaffold.get_params()

        for _ in range(args.epochs):
            sampler.set_epoch(epoch)
            epoch += 1
            running = 0.0
            for images, labels in train_loader:
                optimizer.zero_grad()
                loss = criterion(ddp_model(images.to(device)), labels.to(device))
                if prox.mu > 0:
                    loss = loss + prox(model, global_model)
                loss.backward()
                optimizer.step()
                if use_scaffold:
                    scaffold.model_update(model, get_lr_values(optimizer)[0], c_global, c_local)
                running += loss.item()
            if rank == 0:
                print(f"epoch {epoch}: loss {running / len(train_loader):.4f}")

        meta = {"NUM_STEPS_CURRENT_ROUND": len(train_set) * args.epochs}
        if use_scaffold:  # every rank: the ranks' controls stay equal
            lr = get_lr_values(optimizer)[0]
            scaffold.terms_update(model, lr, c_global, c_local, global_model)
            meta.update(scaffold.result_meta())
        if rank == 0:
            print("Finished Training")
            save_file({k: v.cpu() for k, v in model.state_dict().items()}, PATH)
            # (6) put the new weights and the metrics in an FLModel
            output_model = flare.FLModel(
                params=model.state_dict(), metrics={"accuracy": global_accuracy}, meta=meta
            )
            # (7) send it back to the server (rank 0 reports for the site)
            flare.send(output_model)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
