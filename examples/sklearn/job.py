"""The scikit-learn example: FedAvg over the coef_ and intercept_ of an SGDClassifier.

python3 job.py                          # run it in the simulator (2 clients, 3 rounds)
python3 job.py --export_config          # write the job folder (jobs/sklearn-sgd)
fedlift simulator -n 2 -w /tmp/ws jobs/sklearn-sgd
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedlift import FedAvgJob, FedliftError, FrameworkType, ScriptRunner

HERE = Path(__file__).resolve().parent
N_CLASSES, N_FEATURES = 10, 64  # the digits 0-9 in 8x8 images (client.py's data)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--local_epochs", type=int, default=1)
    parser.add_argument("--export_config", action="store_true", help="only write the job folder")
    parser.add_argument("--job_root", type=Path, default=HERE / "jobs")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/fedlift/sklearn"))
    args = parser.parse_args()

    try:
        job = FedAvgJob(
            name="sklearn-sgd",
            n_clients=args.n_clients,
            num_rounds=args.num_rounds,
            # What SGDClassifier fits for 10 classes of 64 pixels, all 0 to start with
            initial_model={
                "coef": np.zeros((N_CLASSES, N_FEATURES)),
                "intercept": np.zeros(N_CLASSES),
            },
            # the client answers is_evaluate() with metrics only: evaluate the final model
            final_evaluation=True,
        )
        job.to_clients(
            ScriptRunner(
                script="client.py",
                script_args=f"--local_epochs {args.local_epochs}",
                framework=FrameworkType.RAW,  # NVFlare's scikit-learn recipes use RAW
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
    print(f"final accuracy: {result.final_metrics['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
