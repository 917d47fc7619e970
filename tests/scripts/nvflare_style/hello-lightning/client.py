# mypy: disable-error-code="union-attr, index, arg-type, operator"
# (for mypy --strict: as NVFlare's scripts, this one uses receive()'s model without a None
# check (receive() gives None only once the job has ended, which is_running() rules out), and
# NVFlare's params_type="FULL" strings are accepted by FLModel though its hint says ParamsType.)
"""hello-lightning's client, written as NVFlare's hello-lightning client.py is.

The same calls in the same order: seed_everything, a LightningDataModule, a Trainer
(max_epochs=1, accelerator/devices "auto", --limit_batches), flare.patch(trainer), and the
loop: receive, validate the global model, fit, test and predict with ckpt_path="best".
Lines that differ from NVFlare's: the imports (nvflare -> fedlift; torchvision ->
local_data) and the data-loading lines of the data module: cifar10_dataset(train=...)
instead of torchvision.datasets.CIFAR10(root=..., download=..., transform=transform), and
no transform or prepare_data download (the local data comes normalised, on disk).
"""

import argparse
from typing import Any

from local_data import cifar10_dataset
from model import LitNet
from pytorch_lightning import LightningDataModule, Trainer, seed_everything
from torch.utils.data import DataLoader, random_split

import fedlift.client.lightning as flare

seed_everything(7)

BATCH_SIZE = 4


class CIFAR10DataModule(LightningDataModule):
    def __init__(self, batch_size: int = BATCH_SIZE) -> None:
        super().__init__()
        self.batch_size = batch_size

    def prepare_data(self) -> None:
        pass  # the local data is on disk already

    def setup(self, stage: str) -> None:
        if stage == "fit" or stage == "validate":
            cifar_full = cifar10_dataset(train=True)
            self.cifar_train, self.cifar_val = random_split(cifar_full, [0.8, 0.2])
        if stage == "test" or stage == "predict":
            self.cifar_test = cifar10_dataset(train=False)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.cifar_train, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.cifar_val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.cifar_test, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.cifar_test, batch_size=self.batch_size)


def define_parser() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--limit_batches", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = define_parser()
    batch_size = args.batch_size

    flare.init()
    print(f"batch_size={batch_size}, site={flare.get_site_name()}")

    model = LitNet()
    cifar10_dm = CIFAR10DataModule(batch_size=batch_size)
    trainer_args: dict[str, Any] = {"max_epochs": 1, "accelerator": "auto", "devices": "auto"}
    if args.limit_batches > 0:
        trainer_args.update(
            limit_train_batches=args.limit_batches,
            limit_val_batches=args.limit_batches,
            limit_test_batches=args.limit_batches,
            limit_predict_batches=args.limit_batches,
        )
    trainer = Trainer(**trainer_args)

    flare.patch(trainer)

    while flare.is_running():
        input_model = flare.receive()
        print(f"\n[Current Round={input_model.current_round}, Site = {flare.get_site_name()}]\n")

        print("--- validate global model ---")
        trainer.validate(model, datamodule=cifar10_dm)

        print("--- train new model ---")
        trainer.fit(model, datamodule=cifar10_dm)

        print("--- test new model ---")
        trainer.test(ckpt_path="best", datamodule=cifar10_dm)

        print("--- prediction with new best model ---")
        trainer.predict(ckpt_path="best", datamodule=cifar10_dm)


if __name__ == "__main__":
    main()
