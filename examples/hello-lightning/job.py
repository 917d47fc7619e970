"""The hello-lightning FedAvg job: n clients run client.py (a patched Lightning Trainer).

python3 job.py                               # run it in the simulator
python3 job.py --export_config               # write the job folder (./jobs/hello-lightning)
fedlift simulator -n 2 -w /tmp/ws jobs/hello-lightning
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from model import LitNet  # noqa: E402

from fedlift import FedAvgJob, FedliftError, ScriptRunner  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--script_args", default="", help='passed to client.py, e.g. "--epochs 2"')
    parser.add_argument("--launch_process", action="store_true", help="a subprocess per client")
    parser.add_argument("--export_config", action="store_true", help="only write the job folder")
    parser.add_argument("--job_root", type=Path, default=HERE / "jobs")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/fedlift/hello-lightning"))
    args = parser.parse_args()

    try:
        job = FedAvgJob(
            name="hello-lightning",
            n_clients=args.n_clients,
            num_rounds=args.num_rounds,
            initial_model=LitNet(),  # exported as safetensors (its state_dict)
            key_metric="val_acc",
            final_evaluation=True,  # the final model's val_acc on every site
        )
        job.to_clients(
            ScriptRunner(
                script="client.py",
                script_args=args.script_args,
                launch_external_process=args.launch_process,
                framework="pytorch",
                app_dir=HERE,
            )
        )
        if args.export_config:
            print(f"Exported the job to {job.export_job(args.job_root, exclude=(HERE / 'jobs',))}")
            return 0
        result = job.simulator_run(args.workspace)
    except FedliftError as exc:
        print(f"job.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"final val_acc: {result.final_metrics.get('val_acc', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
