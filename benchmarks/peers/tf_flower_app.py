"""Flower app of the TF-job comparison: fedlift's ``cifar10_tf_fl.py`` workload, on Flower.

``python tf_flower_app.py --data DIR --out DIR --ray-tmp DIR [--clients 2 --rounds 3]`` runs
Flower's Simulation Runtime (``flwr.simulation.run_simulation``, Ray backend) with a
``ServerApp`` running the message-API ``FedAvg`` (initial arrays: a fresh ``TFNet``'s
weights; no per-round federated evaluation) and then one evaluation of the final model on
every client, as fedlift's ``final_evaluation=True`` does. The ``ClientApp``'s ``train``
does what the example's federated script does each round: load the global weights, evaluate
them on the site's test set, ``fit`` for ``epochs`` with ``batch-size`` (validation on the test
set), save the weights, reply with them, the accuracy and ``num-examples``; its ``evaluate``
only evaluates and writes the accuracy to ``<--out>/<site>.json``.

Flower calls the ClientApp afresh for every message, and a site may be served by a
different Ray actor each round. So that, as in fedlift's and NVFlare's scripts, the model is
built, compiled and traced once, and each site keeps its own Adam state across rounds: each
actor process keeps one compiled model and the sites' arrays (``tf_flower_state``), and each
node's optimizer variables go into its ``context.state`` after ``fit`` and back before the
next. Ray gets C CPUs and each client 1 (Flower's default
of 2 per client would run one client at a time on a 2-core machine), in a Ray cluster of its
own. The sites' arrays are ``<--data>/site-<partition + 1>.npz`` (exported by fedlift's
harness, so the samples are fedlift's); the model is the example's ``tf_net.py`` (keras
only, imported from ``--net-dir``). Standalone: it runs in Flower's venv.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

WEIGHTS = "tf_model.weights.h5"  # the sites share a cwd here: <--out>/<site>.<WEIGHTS>
OPTIMIZER = "optimizer"  # the key of this node's Adam state in context.state

client_app = ClientApp()


@dataclass
class Site:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def new_model(net_dir: str) -> Any:
    if net_dir not in sys.path:
        sys.path.insert(0, net_dir)
    from keras import losses
    from tf_net import TFNet

    model = TFNet(input_shape=(32, 32, 3))
    model.compile(
        optimizer="adam",
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def kept() -> ModuleType:
    """``tf_flower_state``: what this process keeps between messages."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import tf_flower_state

    return tf_flower_state


def model_of(config: ConfigRecord) -> Any:
    """This process's compiled model: built, compiled and traced once per process."""
    state = kept().MODEL
    if "model" not in state:
        model = new_model(str(config["net-dir"]))
        model.summary()
        model.optimizer.build(model.trainable_variables)
        state["model"] = model
        state["fresh"] = [np.asarray(v.numpy()) for v in model.optimizer.variables]
    return state["model"]


def site_of(context: Context, config: ConfigRecord) -> Site:
    partition = int(context.node_config["partition-id"])
    sites = kept().SITES
    if partition not in sites:
        name = f"site-{partition + 1}"
        with np.load(Path(str(config["data"])) / f"{name}.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        sites[partition] = Site(
            name,
            arrays["x_train"].astype("float32") / 255.0,
            arrays["y_train"],
            arrays["x_test"].astype("float32") / 255.0,
            arrays["y_test"],
        )
    return sites[partition]


def load_and_evaluate(model: Any, site: Site, msg: Message) -> float:
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    _, accuracy = model.evaluate(site.x_test, site.y_test, verbose=2)
    print(f"{site.name}: accuracy of the received global model: {accuracy:.4f}")
    return float(accuracy)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    site, model = site_of(context, config), model_of(config)
    print(f"{site.name}: round {int(config['server-round']) - 1}")  # Flower counts from 1
    accuracy = load_and_evaluate(model, site, msg)
    # This node's Adam state (Flower keeps a node's context.state between rounds), or a
    # fresh one: the process's model may have trained another site before.
    if OPTIMIZER in context.state:
        saved = context.state[OPTIMIZER].to_numpy_ndarrays()
    else:
        saved = kept().MODEL["fresh"]
    for variable, value in zip(model.optimizer.variables, saved, strict=True):
        variable.assign(value)
    epochs = int(config["epochs"])
    model.fit(
        site.x_train,
        site.y_train,
        epochs=epochs,
        batch_size=int(config["batch-size"]),
        validation_data=(site.x_test, site.y_test),
        verbose=2,
    )
    print("Finished Training")
    model.save_weights(Path(str(config["out"])) / f"{site.name}.{WEIGHTS}")  # one per site
    context.state[OPTIMIZER] = ArrayRecord.from_numpy_ndarrays(
        [np.asarray(v.numpy()) for v in model.optimizer.variables]
    )
    reply = RecordDict(
        {
            "arrays": ArrayRecord.from_numpy_ndarrays(model.get_weights()),
            "metrics": MetricRecord(
                {"accuracy": accuracy, "num-examples": len(site.x_train) * epochs}
            ),
        }
    )
    return Message(content=reply, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    site = site_of(context, config)
    accuracy = load_and_evaluate(model_of(config), site, msg)
    (Path(str(config["out"])) / f"{site.name}.json").write_text(json.dumps({"accuracy": accuracy}))
    metrics = MetricRecord({"accuracy": accuracy, "num-examples": len(site.x_test)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def server_app_of(
    clients: int, rounds: int, config: dict[str, Any], outcome: dict[str, float]
) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord.from_numpy_ndarrays(new_model(config["net-dir"]).get_weights())
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # fedlift's job evaluates the final model only
            min_train_nodes=clients,
            min_available_nodes=clients,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=rounds,
            train_config=ConfigRecord(config),
        )
        if len(result.train_metrics_clientapp) != rounds:  # a round without results
            print(f"trained {len(result.train_metrics_clientapp)} of {rounds} rounds", flush=True)
            return
        content = {"arrays": result.arrays, "config": ConfigRecord(config)}
        messages = [
            Message(RecordDict(content), dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in grid.get_node_ids()
        ]
        replies = [r for r in grid.send_and_receive(messages) if r.has_content()]
        accuracies = [float(r.content["metrics"]["accuracy"]) for r in replies]
        if len(accuracies) == clients:
            outcome["accuracy"] = sum(accuracies) / len(accuracies)
            print(f"final accuracy: {outcome['accuracy']:.4f}", flush=True)

    return server_app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="folder of site-<i>.npz")
    parser.add_argument("--out", required=True, help="where the sites write their accuracy")
    parser.add_argument("--net-dir", required=True, help="the folder of the example's tf_net.py")
    parser.add_argument("--ray-tmp", required=True, help="Ray's own temp dir (not /tmp/ray)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    config = {
        "data": args.data,
        "out": args.out,
        "net-dir": args.net_dir,
        "epochs": args.epochs,
        "batch-size": args.batch_size,
    }
    outcome: dict[str, float] = {}
    run_simulation(
        server_app=server_app_of(args.clients, args.rounds, config, outcome),
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "address": "local",
                "num_cpus": args.clients,
                "_temp_dir": args.ray_tmp,
            },
        },
    )
    if "accuracy" not in outcome:  # run_simulation exits 0 whatever the clients raised
        print("tf_flower_app.py: the run failed (see the errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
