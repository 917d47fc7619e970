"""Federated Lightning training, in the style of NVFlare's hello-lightning client.

The centralised script would build the trainer and call ``trainer.validate`` and
``trainer.fit`` once; the federated one patches the trainer and calls them each round.
The changes are marked (0) to (4).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from model import LitNet
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

# (0) import the Lightning Client API
import fedlift.client.lightning as flare

seed_everything(7)


class DigitsDataModule(LightningDataModule):
    """scikit-learn's digits (bundled, no download): this site's shard of the training set
    (an IID split by site index) and the whole held-out test set."""

    def __init__(self, site_index: int, num_sites: int, batch_size: int = 32) -> None:
        super().__init__()
        self.site_index, self.num_sites, self.batch_size = site_index, num_sites, batch_size

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.25, random_state=0, stratify=y
        )
        order = np.random.default_rng(0).permutation(len(x_train))
        shard = np.array_split(order, self.num_sites)[self.site_index]
        self.train = TensorDataset(
            torch.from_numpy(x_train[shard]), torch.from_numpy(y_train[shard])
        )
        self.test = TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()

    # (1) initialise the Client API (needed here for the site's index)
    flare.init()
    site = flare.system_info()
    print(f"site={site['site_name']}, batch_size={args.batch_size}")

    model = LitNet()
    dm = DigitsDataModule(site["site_index"], site["num_sites"], args.batch_size)
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    # (2) patch the trainer: it receives the global model and sends the trained one itself
    flare.patch(trainer)

    while flare.is_running():
        # (3) the round's global model (the patched trainer loads it into the module)
        input_model = flare.receive()
        print(f"\n[Current Round={input_model.current_round}, Site = {flare.get_site_name()}]\n")

        # (4) validate the global model: its metrics go back with the result
        print("--- validate global model ---")
        trainer.validate(model, datamodule=dm, verbose=False)

        # train from the global model; the patched trainer sends the result
        print("--- train new model ---")
        trainer.fit(model, datamodule=dm)


if __name__ == "__main__":
    main()
