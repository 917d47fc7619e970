"""Federated CIFAR-10 training: cifar10_pt_original.py plus the 7 Client API changes.

Each change is marked with its number; everything else is the centralised script, and the
training loop serves every server strategy: FedProx's ``mu`` and SCAFFOLD's control
variates arrive with the task, and the script uses them when they are there (marked "FedProx"
and "SCAFFOLD"). The data are this site's part of the training set (``--data_split``, or
a Dirichlet label skew with ``--alpha``).
"""

from __future__ import annotations

import argparse
import copy

import torch
from pt_data import site_datasets
from pt_net import PTNet, evaluate
from safetensors.torch import save_file
from torch.utils.data import DataLoader

# (1) import the Client API (and the PyTorch helpers of FedProx and SCAFFOLD)
import fedlift.client as flare
from fedlift.client.pytorch import PTFedProxLoss, PTScaffoldHelper, get_fedprox_mu, get_lr_values

PATH = "./pt_model.safetensors"
SCAFFOLD = flare.AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch_size", type=int, default=64)
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

    # (2) initialise the Client API
    flare.init()
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
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=256)

    model = PTNet()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaffold = PTScaffoldHelper()  # SCAFFOLD: one helper for the whole job
    scaffold.init(model)

    while flare.is_running():
        # (3) receive the global model
        input_model = flare.receive()
        print(f"{site['site_name']}: round {input_model.current_round}")

        # (4) load the global weights
        model.load_state_dict(input_model.params)

        # (5) evaluate the global model, to report how it does on this site's test data
        global_accuracy = evaluate(model, test_loader)
        print(f"{site['site_name']}: accuracy of the received global model: {global_accuracy:.4f}")

        if flare.is_evaluate():  # the server's last task: evaluate the final model only
            flare.send(flare.FLModel(metrics={"accuracy": global_accuracy}))
            continue

        global_model = copy.deepcopy(model)  # FedProx and SCAFFOLD: the round's anchor
        prox = PTFedProxLoss(mu=get_fedprox_mu())  # FedProx: mu from the server, else 0
        use_scaffold = SCAFFOLD in input_model.meta  # SCAFFOLD: the server's controls
        if use_scaffold:
            scaffold.load_global_controls(input_model.meta[SCAFFOLD])
            c_global, c_local = scaffold.get_params()
        print(f"{site['site_name']}: FedProx mu={prox.mu:g}, SCAFFOLD: {use_scaffold}")

        for epoch in range(args.epochs):
            running = 0.0
            for images, labels in train_loader:
                optimizer.zero_grad()
                loss = criterion(model(images), labels)
                if prox.mu > 0:
                    loss = loss + prox(model, global_model)
                loss.backward()
                optimizer.step()
                if use_scaffold:
                    scaffold.model_update(model, get_lr_values(optimizer)[0], c_global, c_local)
                running += loss.item()
            print(f"epoch {epoch + 1}: loss {running / len(train_loader):.4f}")
        print("Finished Training")
        save_file(model.state_dict(), PATH)

        meta = {"NUM_STEPS_CURRENT_ROUND": len(train_set) * args.epochs}
        if use_scaffold:
            lr = get_lr_values(optimizer)[0]
            scaffold.terms_update(model, lr, c_global, c_local, global_model)
            meta.update(scaffold.result_meta())

        # (6) put the new weights and the metrics in an FLModel
        output_model = flare.FLModel(
            params=model.state_dict(), metrics={"accuracy": global_accuracy}, meta=meta
        )
        # (7) send it back to the server
        flare.send(output_model)


if __name__ == "__main__":
    main()
