"""Flower app of the peer benchmark: no compute. Receive, add 1.0, send.

``python flower_app.py --params N --clients C --rounds R --times DIR`` runs Flower's
Simulation Runtime (``flwr.simulation.run_simulation``, Ray backend) with a ``ServerApp``
running the message-API ``FedAvg`` strategy (initial arrays: N float32 zeros in 10 arrays;
no federated evaluation) and a ``ClientApp`` whose ``train`` adds 1.0 to every array.
Every client runs at once: Ray gets C CPUs and each client 1 (Flower's default of 2 CPUs per
client would run one client at a time on a 2-core machine), in a Ray cluster of its own.
Standalone on purpose (it runs in
Flower's venv); clients append ``recv``/``send`` timestamps to ``DIR/<site>.txt``.
"""

import argparse
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    received = time.time()
    config = msg.content["config"]
    round_number = int(config["server-round"]) - 1  # Flower counts rounds from 1
    site = f"site-{int(context.node_config['partition-id']) + 1}"
    arrays = msg.content["arrays"]
    out = ArrayRecord(
        {k: Array.from_numpy_ndarray(v.numpy() + np.float32(1.0)) for k, v in arrays.items()}
    )
    reply = RecordDict({"arrays": out, "metrics": MetricRecord({"num-examples": 1})})
    with open(Path(str(config["times"])) / f"{site}.txt", "a") as f:
        f.write(f"recv {round_number} {received:.6f}\nsend {round_number} {time.time():.6f}\n")
    return Message(content=reply, reply_to=msg)


def start_fedavg(grid: Grid, sizes: list, clients: int, rounds: int, times: str) -> None:
    """The server's work: FedAvg over every client, from N float32 zeros, no evaluation."""
    model = {
        f"layer{i}": Array.from_numpy_ndarray(np.zeros(n, np.float32)) for i, n in enumerate(sizes)
    }
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=clients,
        min_available_nodes=clients,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model),
        num_rounds=rounds,
        train_config=ConfigRecord({"times": times}),
    )


def server_app_of(sizes: list, clients: int, rounds: int, times: str) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        start_fedavg(grid, sizes, clients, rounds, times)

    return server_app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--times", required=True)
    parser.add_argument("--ray-tmp", required=True, help="Ray's own temp dir (not /tmp/ray)")
    args = parser.parse_args()
    # Imported here: the deployment app (flower_deploy_app) imports this module, and its
    # processes need no Ray.
    from flwr.simulation import run_simulation

    sizes = [args.params // 10] * 10
    sizes[-1] += args.params - sum(sizes)
    run_simulation(
        server_app=server_app_of(sizes, args.clients, args.rounds, args.times),
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            # A cluster of our own, in a folder of our own: without "local", ray.init()
            # joins a Ray cluster another program on this machine started.
            "init_args": {
                "address": "local",
                "num_cpus": args.clients,
                "_temp_dir": args.ray_tmp,
            },
        },
    )


if __name__ == "__main__":
    main()
