"""NIID-Bench's Fashion-MNIST setting, reproduced with fedlift's strategies.

Li, Diao, Chen, He (2022), "Federated Learning on Non-IID Data Silos: An Experimental
Study", as Flower's baseline reproduces it: the simple CNN (conv 6 and conv 16, 5x5, each
followed by 2x2 max-pooling, then FC 120-84-10), 10 clients all sampled every round, 50
rounds of 10 local epochs at batch 64, SGD with learning rate 0.01, momentum 0.9 and weight
decay 1e-5 (a fresh optimiser every round, as NIID-Bench builds one per local training);
FedProx with mu 0.01. Data: real Fashion-MNIST from Debian's ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), split by :mod:`fedlift.data`.

Rows (published top-1 test accuracy of the global model after the last round):

    fedavg-iid 89.0   fedavg-dir0.5 88.4   fedprox-dir0.5 88.6   scaffold-dir0.5 88.4
    fedavg-c2 81.0

Run one or more rows: ``python -m benchmarks.niid_bench --rows fedavg-iid,fedprox-dir0.5``;
``--rounds/--epochs/--subset/--clients`` give reduced schedules (CI runs a tiny one that
only checks each row runs and learns). Clients run in this process through ``run_local``
(one Keras model reused by every client, its weights set from the task), one at a time: on
a small CPU the model's own maths is the whole cost. Prints a table with the published
figure, the measured one, the difference and the wall time; ``--json`` writes them.

Two backends train the same CNN: ``--backend torch`` (PyTorch on the CPU, as NIID-Bench
itself; about 1.6x faster than Keras for this small model on 2 cores) and ``--backend keras``.
With torch the client side follows NIID-Bench's code path: FedProx adds
``mu/2 * ||w - w_global||^2`` to the loss; SCAFFOLD corrects every step by
``lr * (c - c_i)`` and sends ``delta c_i`` (option II); the server side is fedlift's
``FedAvg``/``FedProx``/``Scaffold`` either way.

Weight decay: Keras' SGD applies it decoupled (``w -= lr * wd * w``), PyTorch's SGD (which
NIID-Bench uses) adds ``wd * w`` to the gradient before momentum; at 1e-5 the two differ by
far less than the run-to-run spread.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DATA = Path("/usr/share/datasets/fashion-mnist")

PUBLISHED = {
    "fedavg-iid": 89.0,
    "fedavg-dir0.5": 88.4,
    "fedprox-dir0.5": 88.6,
    "scaffold-dir0.5": 88.4,
    "fedavg-c2": 81.0,
}


@dataclass
class Row:
    row: str
    published: float
    measured: float
    difference: float
    rounds: int
    epochs: int
    clients: int
    train_samples: int
    seed: int
    seconds: float
    curve: list[float]


def load_fashion_mnist(
    folder: Path = DATA,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST's train and test images (float32 in [0, 1], N x 28 x 28 x 1) and labels."""

    def read(name: str, offset: int) -> np.ndarray:
        path = folder / name
        if not path.is_file():
            sys.exit(
                f"niid_bench: {path} is missing. Install Debian's dataset-fashion-mnist "
                "(`make data` does)."
            )
        with gzip.open(path) as handle:
            return np.frombuffer(handle.read(), np.uint8, offset=offset)

    def images(name: str) -> np.ndarray:
        return (read(name, 16).reshape(-1, 28, 28, 1).astype(np.float32)) / 255.0

    return (
        images("train-images-idx3-ubyte.gz"),
        read("train-labels-idx1-ubyte.gz", 8).astype(np.int64),
        images("t10k-images-idx3-ubyte.gz"),
        read("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64),
    )


def simple_cnn(seed: int) -> Any:
    """NIID-Bench's SimpleCNN for 28 x 28 x 1 inputs (logits out)."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(6, 5, activation="relu", name="conv1"),
            layers.MaxPooling2D(2),
            layers.Conv2D(16, 5, activation="relu", name="conv2"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(120, activation="relu", name="fc1"),
            layers.Dense(84, activation="relu", name="fc2"),
            layers.Dense(10, name="fc3"),
        ]
    )


def torch_cnn(seed: int) -> Any:
    """The same SimpleCNN in PyTorch (NCHW input), initialised by PyTorch's defaults."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )  # fmt: skip


def partition(labels: np.ndarray, how: str, clients: int, seed: int) -> list[np.ndarray]:
    from fedlift import data

    if how == "iid":
        return data.iid(labels, clients, seed=seed)
    if how.startswith("dir"):
        return data.dirichlet(labels, clients, alpha=float(how[3:]), seed=seed)
    if how.startswith("c"):
        return data.pathological(labels, clients, classes_per_client=int(how[1:]), seed=seed)
    raise SystemExit(f"niid_bench: unknown partition {how!r}; use iid, dir0.5 or c2.")


def run_row(
    row: str,
    *,
    rounds: int,
    epochs: int,
    clients: int,
    subset: int | None,
    seed: int,
    batch: int = 64,
    lr: float = 0.01,
    quiet: bool = True,
    backend: str = "keras",
) -> Row:
    """Train one row of the table and return what it measured."""
    if backend == "torch":
        return _run_row_torch(
            row, rounds=rounds, epochs=epochs, clients=clients, subset=subset, seed=seed,
            batch=batch, lr=lr, quiet=quiet,
        )  # fmt: skip
    import keras

    from fedlift.client.keras import FedProxCallback, TFScaffoldHelper
    from fedlift.model import FLModel
    from fedlift.server import FedAvg, FedProx, Scaffold, Strategy
    from fedlift.simulator import run_local

    algorithm, sites, data, x_test, y_test, n_train = _split(row, clients, subset, seed)
    model = simple_cnn(seed)
    model.compile(
        keras.optimizers.SGD(lr, momentum=0.9, weight_decay=1e-5),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    layers = [layer for layer in model.layers if layer.weights]
    model.optimizer.build(model.trainable_variables)
    fresh = [
        keras.ops.convert_to_numpy(v) for v in model.optimizer.variables
    ]  # momentum 0, lr, step 0

    def set_params(params: dict[str, list[np.ndarray]]) -> None:
        for layer in layers:
            layer.set_weights([np.asarray(w) for w in params[layer.name]])

    def get_params() -> dict[str, list[np.ndarray]]:
        return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in layers}

    initial = get_params()
    helpers = {site: TFScaffoldHelper() for site in sites} if algorithm == "scaffold" else {}
    curve: list[float] = []
    mu = 0.01

    def train(site: str, task: FLModel) -> FLModel:
        set_params(task.params)
        if site == sites[0]:  # the global model this round starts from, on the test set
            _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
            curve.append(float(accuracy))
        for variable, value in zip(model.optimizer.variables, fresh, strict=True):
            variable.assign(value)  # a fresh optimiser every round
        callbacks: list[Any] = []
        meta: dict[str, Any] = {}
        if algorithm == "fedprox":
            callbacks.append(FedProxCallback(mu))
        if algorithm == "scaffold":
            helper = helpers[site]
            helper.load_global_controls(task.meta)
            callbacks.append(helper.callback(model))
        xs, ys = data[site]
        model.fit(xs, ys, batch_size=batch, epochs=epochs, verbose=0, callbacks=callbacks,
                  shuffle=True)  # fmt: skip
        if algorithm == "scaffold":
            meta.update(helpers[site].result_meta())
        meta["NUM_STEPS_CURRENT_ROUND"] = float(len(ys))
        return FLModel(params=get_params(), meta=meta)

    strategies: dict[str, Callable[[], Strategy]] = {
        "fedavg": FedAvg,
        "fedprox": lambda: FedProx(mu=mu),
        "scaffold": Scaffold,
    }
    started = time.monotonic()
    result = run_local(
        train,
        initial,
        clients,
        rounds,
        strategy=strategies[algorithm](),
        threads=1,
        quiet=quiet,
    )
    set_params(result.params)
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    curve.append(float(accuracy))
    measured = 100.0 * float(accuracy)
    published = PUBLISHED[row]
    return Row(
        row, published, round(measured, 2), round(measured - published, 2), rounds, epochs,
        clients, n_train, seed, round(time.monotonic() - started, 1), curve,
    )  # fmt: skip


def _split(row: str, clients: int, subset: int | None, seed: int) -> Any:
    algorithm, how = row.split("-", 1)
    x, y, x_test, y_test = load_fashion_mnist()
    if subset is not None:
        pick = np.random.default_rng(seed).permutation(len(y))[:subset]
        x, y = x[pick], y[pick]
    parts = partition(y, how, clients, seed)
    sites = [f"site-{i + 1}" for i in range(clients)]
    data = {site: (x[idx], y[idx]) for site, idx in zip(sites, parts, strict=True)}
    return algorithm, sites, data, x_test, y_test, len(y)


def _run_row_torch(
    row: str, *, rounds: int, epochs: int, clients: int, subset: int | None, seed: int,
    batch: int, lr: float, quiet: bool,
) -> Row:  # fmt: skip
    """One row with PyTorch clients, following NIID-Bench's local training."""
    import torch
    from torch import nn

    from fedlift.model import FLModel
    from fedlift.server import FedAvg, FedProx, Scaffold, Strategy
    from fedlift.simulator import run_local

    algorithm, sites, data, x_test, y_test, n_train = _split(row, clients, subset, seed)

    def to_nchw(a: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    tensors = {site: (to_nchw(xs), torch.from_numpy(ys)) for site, (xs, ys) in data.items()}
    test_x, test_y = to_nchw(x_test), torch.from_numpy(y_test)
    model = torch_cnn(seed)
    loss_fn = nn.CrossEntropyLoss()
    names = [name for name, _ in model.named_parameters()]
    generator = torch.Generator().manual_seed(seed)
    mu = 0.01
    c_local: dict[str, dict[str, torch.Tensor]] = {}
    curve: list[float] = []

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(test_x[i : i + 1000]).argmax(1) == test_y[i : i + 1000]).sum())
                       for i in range(0, len(test_y), 1000))  # fmt: skip
        return hits / len(test_y)

    def load(params: dict[str, np.ndarray]) -> None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})

    def train(site: str, task: FLModel) -> FLModel:
        load(task.params or {})
        if site == sites[0]:  # the global model this round starts from, on the test set
            curve.append(accuracy())
        model.train()
        xs, ys = tensors[site]
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-5)
        if algorithm == "scaffold":
            c = {n: torch.from_numpy(np.array(task.meta["scaffold_c_global"][n])) for n in names}
            ci = c_local.setdefault(site, {n: torch.zeros_like(c[n]) for n in names})
        steps = 0
        for _ in range(epochs):
            order = torch.randperm(len(ys), generator=generator)
            for i in range(0, len(ys), batch):
                pick = order[i : i + batch]
                optimiser.zero_grad()
                loss = loss_fn(model(xs[pick]), ys[pick])
                if algorithm == "fedprox":
                    loss = loss + mu / 2 * sum(
                        ((p - start[n]) ** 2).sum() for n, p in model.named_parameters()
                    )
                loss.backward()
                optimiser.step()
                if algorithm == "scaffold":
                    with torch.no_grad():
                        for n, p in model.named_parameters():
                            p -= lr * (c[n] - ci[n])
                steps += 1
        meta: dict[str, Any] = {"NUM_STEPS_CURRENT_ROUND": float(len(ys))}
        if algorithm == "scaffold":
            with torch.no_grad():
                now = dict(model.named_parameters())
                new = {n: ci[n] - c[n] + (start[n] - now[n]) / (steps * lr) for n in names}
                meta["scaffold_c_diff"] = {n: (new[n] - ci[n]).numpy() for n in names}
                c_local[site] = new
        params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        return FLModel(params=params, meta=meta)

    strategies: dict[str, Callable[[], Strategy]] = {
        "fedavg": FedAvg,
        "fedprox": lambda: FedProx(mu=mu),
        "scaffold": Scaffold,
    }
    initial = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    started = time.monotonic()
    result = run_local(train, initial, clients, rounds, strategy=strategies[algorithm](),
                       threads=1, quiet=quiet)  # fmt: skip
    load(result.params)
    final = accuracy()
    curve.append(final)
    measured = 100.0 * final
    published = PUBLISHED[row]
    return Row(
        row, published, round(measured, 2), round(measured - published, 2), rounds, epochs,
        clients, n_train, seed, round(time.monotonic() - started, 1), curve,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.niid_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", default=",".join(list(PUBLISHED)[:4]),
                        help=f"comma-separated, from {', '.join(PUBLISHED)}")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--subset", type=int, default=None, help="train samples (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--backend", choices=("torch", "keras"), default="keras",
        help="the clients' framework (torch: as NIID-Bench, faster here)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in PUBLISHED]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(PUBLISHED)}")
    out = []
    print(f"NIID-Bench Fashion-MNIST: {args.clients} clients, {args.rounds} rounds x "
          f"{args.epochs} epochs, batch 64, SGD 0.01/0.9/1e-5, seed {args.seed}, {args.backend}, "
          f"{platform.node()}")  # fmt: skip
    print(f"{'row':<16} {'published':>9} {'measured':>9} {'diff':>6} {'wall s':>8}")
    for row in rows:
        result = run_row(row, rounds=args.rounds, epochs=args.epochs, clients=args.clients,
                         subset=args.subset, seed=args.seed, backend=args.backend)  # fmt: skip
        out.append(result)
        print(f"{result.row:<16} {result.published:>9.1f} {result.measured:>9.2f} "
              f"{result.difference:>+6.2f} {result.seconds:>8.1f}", flush=True)  # fmt: skip
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([asdict(r) for r in out], indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
