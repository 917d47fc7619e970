"""``import fedlift.client.lightning as flare; flare.patch(trainer)``: a Lightning Trainer
as a federated client, against a LocalLink played by a helper thread (as the Client API's
tests do), and examples/hello-lightning in the simulator."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("lightning")

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

import fedlift.client
import fedlift.client.lightning as flare
from fedlift.client._api import _reset_for_tests
from fedlift.client._link import ClientContext, LocalLink, Task, set_current_link
from fedlift.errors import ClientAPIError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello-lightning"

# 8 samples of 4 features, 3 classes; 3 of the 8 labels are class 0.
X = torch.arange(32, dtype=torch.float32).reshape(8, 4) / 32
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
BATCHES_PER_EPOCH = 2  # batch size 4


class Tiny(LightningModule):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x)
        return out

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.5)


def zeros() -> dict[str, np.ndarray]:
    return {"layer.weight": np.zeros((3, 4), np.float32), "layer.bias": np.zeros(3, np.float32)}


class Worker(threading.Thread):
    """Offers the tasks one by one (each with all-zero global weights), keeps a copy of each
    answer before its send() returns (the sent arrays are views of the module's
    parameters, which the next round overwrites), then ends the job."""

    def __init__(self, link: LocalLink, names: list[str]) -> None:
        super().__init__(daemon=True)
        self.link, self.names = link, names
        self.results: list[Any] = []

    def run(self) -> None:
        for number, name in enumerate(self.names):
            model = fedlift.client.FLModel(params=zeros(), current_round=number, total_rounds=2)
            self.link.offer(Task(f"t{number}", name, model))
            result = self.link.wait_result(f"t{number}")
            if result is not None and result.params is not None:
                result.params = {k: np.array(v) for k, v in result.params.items()}
            self.results.append(result)
            self.link.delivered(f"t{number}")
        self.link.stop()


@pytest.fixture
def link() -> Iterator[LocalLink]:
    _reset_for_tests()
    context = ClientContext("job", "site-1", 0, 1, {"runner": {"framework": "pytorch"}})
    site = LocalLink(context, wait_delivery=True)
    set_current_link(site)
    yield site
    site.stop()
    set_current_link(None)
    _reset_for_tests()


def trainer(**options: Any) -> Trainer:
    return Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    data = TensorDataset(X, Y)
    return DataLoader(data, batch_size=4), DataLoader(data, batch_size=8)


def hello_lightning_loop(module: LightningModule, trainer: Trainer) -> None:
    """NVFlare's hello-lightning client loop."""
    train, val = loaders()
    flare.patch(trainer)
    while flare.is_running():
        input_model = flare.receive()
        assert input_model is not None
        trainer.validate(module, dataloaders=val, verbose=False)
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)


def test_each_round_loads_the_global_model_validates_it_trains_and_sends(
    link: LocalLink,
) -> None:
    worker = Worker(link, ["train", "train", "validate"])
    worker.start()
    module, fit = Tiny(), trainer()
    hello_lightning_loop(module, fit)
    worker.join(30)
    first, second, final = worker.results
    # The global model (all zeros) gives equal logits for the 3 classes: the loss is ln 3
    # and argmax picks class 0, right for 3 of the 8 samples, in every round.
    for result in worker.results:
        assert result.metrics["val_loss"] == pytest.approx(math.log(3), rel=1e-6)
        assert result.metrics["val_acc"] == pytest.approx(3 / 8)
    for result in (first, second):
        assert sorted(result.params) == ["layer.bias", "layer.weight"]
        assert np.abs(np.asarray(result.params["layer.weight"])).sum() > 0  # it trained
        # One epoch a round, in every round (a second fit() would otherwise stop at once).
        assert result.meta["NUM_STEPS_CURRENT_ROUND"] == BATCHES_PER_EPOCH
    # The evaluate task gets the metrics only, and its fit() is skipped.
    assert final.params is None
    assert fit.global_step == 2 * BATCHES_PER_EPOCH


def test_the_optimizer_state_carries_over_from_round_to_round(link: LocalLink) -> None:
    worker = Worker(link, ["train", "train"])
    worker.start()
    module, fit = Tiny("adam"), trainer()
    hello_lightning_loop(module, fit)
    worker.join(30)
    state = fit.optimizers[0].state[module.layer.weight]
    assert int(state["step"]) == 2 * BATCHES_PER_EPOCH  # Adam counted both rounds' steps


def test_without_restore_state_each_round_starts_a_fresh_optimizer(link: LocalLink) -> None:
    worker = Worker(link, ["train", "train"])
    worker.start()
    module, fit = Tiny("adam"), trainer()
    train, val = loaders()
    flare.patch(fit, restore_state=False)
    while flare.is_running():
        flare.receive()
        fit.fit(module, train_dataloaders=train, val_dataloaders=val)
    worker.join(30)
    assert int(fit.optimizers[0].state[module.layer.weight]["step"]) == BATCHES_PER_EPOCH
    assert worker.results[0].metrics is None  # no validate(): no metrics to send


def test_fl_meta_goes_with_the_result_and_may_set_the_weight(link: LocalLink) -> None:
    worker = Worker(link, ["train"])
    worker.start()
    module, fit = Tiny(), trainer(max_steps=1)
    setattr(module, flare.FL_META_KEY, {"NUM_STEPS_CURRENT_ROUND": 7, "note": "from the module"})
    hello_lightning_loop(module, fit)
    worker.join(30)
    assert worker.results[0].meta["NUM_STEPS_CURRENT_ROUND"] == 7
    assert worker.results[0].meta["note"] == "from the module"


def test_patch_twice_adds_one_callback_and_refuses_what_is_not_a_trainer(
    link: LocalLink,
) -> None:
    fit = trainer()
    before = len(getattr(fit, "callbacks"))  # noqa: B009  (not in Lightning's type hints)
    flare.patch(fit)
    flare.patch(fit)
    assert len(getattr(fit, "callbacks")) == before + 1  # noqa: B009
    with pytest.raises(ClientAPIError, match="takes a Lightning Trainer"):
        flare.patch(object())


def test_a_pytorch_lightning_trainer_is_patched_with_its_own_callback_class(
    link: LocalLink,
) -> None:
    """NVFlare's scripts import ``pytorch_lightning``; its Trainer refuses ``lightning``'s
    callbacks, so the patch takes the base class from the trainer's package."""
    pl = pytest.importorskip("pytorch_lightning")
    fit = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False)
    flare.patch(fit)
    assert isinstance(fit.callbacks[-1], pl.Callback)


def test_the_module_is_the_client_api_plus_patch_and_imports_no_lightning() -> None:
    assert set(flare.__all__) == {*fedlift.client.__all__, "FL_META_KEY", "patch"}
    assert flare.receive is fedlift.client.receive
    code = (
        "import sys, fedlift.client.lightning\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


def test_hello_lightning_learns_in_the_simulator(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    done = subprocess.run(
        [sys.executable, "job.py", "--num_rounds", "2", "--workspace", str(ws)],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (ws / "server/metrics.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["train", "train", "validate"]
    untrained = records[0]["metrics"]["val_acc"]  # the initial model, validated in round 1
    final = records[-1]["metrics"]["val_acc"]  # the global model after 2 rounds
    assert final > untrained + 0.4, (untrained, final)
    assert (ws / "server/models/global_model.safetensors").is_file()
    for site in ("site-1", "site-2"):
        assert "Current Round=1" in (ws / site / "log.txt").read_text()
