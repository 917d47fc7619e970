"""hello-numpy: a FedAvg job whose clients train a NumPy logistic regression.

python3 job.py                                  # run it in the simulator (2 clients, 3 rounds)
python3 job.py --update_type diff               # clients send the change, not the weights
python3 job.py --export_config                  # write the job folder (jobs/hello-numpy)
fedlift simulator -n 2 -w /tmp/ws jobs/hello-numpy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client import N_FEATURES

from fedlift import FedAvgJob, FedliftError, FrameworkType, ScriptRunner

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--update_type", choices=["full", "diff"], default="full")
    parser.add_argument("--export_config", action="store_true", help="only write the job folder")
    parser.add_argument("--job_root", type=Path, default=HERE / "jobs")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/fedlift/hello-numpy"))
    args = parser.parse_args()

    try:
        job = FedAvgJob(
            name="hello-numpy",
            n_clients=args.n_clients,
            num_rounds=args.num_rounds,
            # A plain list, as NVFlare's NumPy recipe takes: it becomes
            # {"numpy_key": float32 array}, the features' weights and the bias, all 0.
            initial_model=[0.0] * (N_FEATURES + 1),
        )
        job.to_clients(
            ScriptRunner(
                script="client.py",
                script_args=f"--lr {args.lr} --update_type {args.update_type}",
                framework=FrameworkType.NUMPY,
                app_dir=HERE,
            )
        )
        if args.export_config:
            print(f"Exported the job to {job.export_job(args.job_root)}")
            return 0
        result = job.simulator_run(args.workspace)
    except FedliftError as exc:
        print(f"job.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    accuracies = ", ".join(f"{r.metrics['accuracy']:.3f}" for r in result.rounds)
    print(f"accuracy of the global model received in each round: {accuracies}")
    print(f"final weights: {result.params['numpy_key']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
