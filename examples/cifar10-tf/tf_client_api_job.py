"""The CIFAR-10 FedAvg job: n clients run a Keras training script for a number of rounds.

python3 tf_client_api_job.py --script src/cifar10_tf_fl.py      # run it in the simulator
python3 tf_client_api_job.py --export_config                   # write the job folder
fedlift simulator -n 2 -t 2 -w /tmp/ws jobs/cifar10_tf_fedavg   # run the exported job
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "src"))

from tf_net import TFNet  # noqa: E402

from fedlift import FedAvgJob, FedliftError, ScriptRunner  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=5)
    parser.add_argument("--script", default="src/cifar10_tf_fl.py")
    parser.add_argument("--script_args", default="", help='passed to the script, e.g. "--epochs 2"')
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

    try:
        job = FedAvgJob(
            name="cifar10_tf_fedavg",
            n_clients=args.n_clients,
            num_rounds=args.num_rounds,
            initial_model=TFNet(input_shape=(32, 32, 3)),
            key_metric="accuracy",
            # The script answers is_evaluate() with metrics only, so the final model can be
            # evaluated on every site (off by default, as in NVFlare).
            final_evaluation=True,
        )
        job.to_clients(
            ScriptRunner(
                script=args.script,
                script_args=args.script_args,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
