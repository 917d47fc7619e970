"""The CIFAR-10 job with Keras: n clients run a training script for a number of rounds,
under the server strategy of your choice (FedAvg by default).

python3 tf_client_api_job.py --script src/cifar10_tf_fl.py      # run it in the simulator
python3 tf_client_api_job.py --algorithm scaffold --alpha 0.5   # SCAFFOLD, label-skewed sites
python3 tf_client_api_job.py --compression int8 --model_compression float16  # fewer bytes
python3 tf_client_api_job.py --export_config                   # write the job folder
fedlift simulator -n 2 -t 2 -w /tmp/ws jobs/cifar10_tf_fedavg   # run the exported job
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "src"))

from fedlift import Compression, FedJob, FedliftError, ScriptRunner  # noqa: E402
from fedlift.errors import ConfigError  # noqa: E402
from fedlift.server import (  # noqa: E402
    Cyclic,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Scaffold,
    Strategy,
)

ALGORITHMS = (
    "fedavg",
    "fedprox",
    "scaffold",
    "fedopt",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "cyclic",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
)
FEDOPT: dict[str, type[FedAvgM | FedAdam | FedYogi | FedAdagrad]] = {
    "fedopt": FedAvgM,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}
FEDOPT_MOMENTUM = 0.6  # NVFlare's FedOpt: server SGD with momentum 0.6 (FedAvgM)


def make_strategy(
    algorithm: str, n_clients: int, fedprox_mu: float = 0.01, server_lr: float | None = None
) -> Strategy:
    """The server side of ``--algorithm``. The client script needs no flag for any of
    them: FedProx's mu and SCAFFOLD's controls come with each task."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(
            f"--algorithm must be one of {', '.join(ALGORITHMS)}. Received: "
            f"algorithm={algorithm!r}."
        )
    if server_lr is not None and algorithm in FEDOPT:
        if algorithm == "fedopt":
            return FedAvgM(eta=server_lr, beta_1=FEDOPT_MOMENTUM)
        return FEDOPT[algorithm](eta=server_lr)
    if algorithm == "fedprox":
        return FedProx(mu=fedprox_mu)
    if algorithm == "scaffold":
        return Scaffold()
    if algorithm == "fedopt":
        return FedAvgM(eta=1.0, beta_1=FEDOPT_MOMENTUM)
    if algorithm == "krum":
        if n_clients < 3:
            raise ConfigError(
                "--algorithm krum picks the result nearest the others, so it needs 3 clients "
                f"or more; pass --n_clients 3. Received: n_clients={n_clients}."
            )
        return FedAvg(aggregator=Krum(f=1 if n_clients >= 5 else 0))
    simple: dict[str, Strategy] = {
        "fedavg": FedAvg(),
        "fedavgm": FedAvgM(),
        "fedadam": FedAdam(),
        "fedyogi": FedYogi(),
        "fedadagrad": FedAdagrad(),
        "cyclic": Cyclic(),
        "fedmedian": FedAvg(aggregator=FedMedian()),
        "fedtrimmedavg": FedAvg(aggregator=FedTrimmedAvg()),
    }
    return simple[algorithm]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=5)
    parser.add_argument("--script", default="src/cifar10_tf_fl.py")
    parser.add_argument("--script_args", default="", help='passed to the script, e.g. "--epochs 2"')
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg")
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.0,
        help="> 0: each site's classes in Dirichlet(alpha) proportions (0: an IID split)",
    )
    parser.add_argument("--fedprox_mu", type=float, default=0.01, help="FedProx's mu")
    parser.add_argument(
        "--server_lr",
        type=float,
        default=None,
        help="the FedOpt family's server learning rate eta (default: the strategy's)",
    )
    parser.add_argument(
        "--compression",
        choices=("none", "float16", "bfloat16", "int8", "topk"),
        default="none",
        help="how the sites send their results (int8 and topk send the change)",
    )
    parser.add_argument(
        "--model_compression",
        choices=("none", "float16", "bfloat16", "int8"),
        default="none",
        help="how the server sends the global model",
    )
    parser.add_argument("--top_k", type=float, default=0.01, help="topk: fraction kept")
    parser.add_argument(
        "--launch_process",
        action="store_true",
        help="run the script as a subprocess of each client (multi-GPU scripts)",
    )
    parser.add_argument(
        "--export_config",
        action="store_true",
        help="only write the job folder (see --job_root), do not run it",
    )
    parser.add_argument(
        "--job_root",
        type=Path,
        default=HERE / "jobs",
        help="where --export_config writes the job folder (default: ./jobs)",
    )
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/fedlift/cifar10_tf"))
    parser.add_argument("--threads", type=int, default=None, help="clients training at once")
    parser.add_argument("--gpu", default=None, help="GPU groups, e.g. 0,1 or [0,1],[2,3]")
    args = parser.parse_args()

    script_args = args.script_args
    if args.alpha > 0:
        script_args = f"{script_args} --alpha {args.alpha!r}".strip()
    try:
        from tf_net import TFNet  # here, not at the top: make_strategy() needs no TensorFlow

        job = FedJob(
            name=f"cifar10_tf_{args.algorithm}",
            n_clients=args.n_clients,
            num_rounds=args.num_rounds,
            initial_model=TFNet(input_shape=(32, 32, 3)),
            key_metric="accuracy",
            # The script answers is_evaluate() with metrics only, so the final model can be
            # evaluated on every site (off by default, as in NVFlare).
            final_evaluation=True,
            strategy=make_strategy(args.algorithm, args.n_clients, args.fedprox_mu, args.server_lr),
            compression=Compression(
                results=args.compression, model=args.model_compression, top_k=args.top_k
            ),
        )
        job.to_clients(
            ScriptRunner(
                script=args.script,
                script_args=script_args,
                launch_external_process=args.launch_process,
                framework="tensorflow",
                app_dir=HERE,  # ships src/ (the script and its modules) and data/
            )
        )
        if args.export_config:
            folder = job.export_job(args.job_root)
            print(f"Exported the job to {folder}")
            print(f"Run it with: fedlift simulator -n {args.n_clients} -w /tmp/fedlift/ws {folder}")
            return 0
        result = job.simulator_run(args.workspace, threads=args.threads, gpu=args.gpu)
    except FedliftError as exc:
        print(f"tf_client_api_job.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"final accuracy: {result.final_metrics.get('accuracy', float('nan')):.4f}")
    if script_args:
        print(f"(script arguments: {shlex.join(shlex.split(script_args))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
