"""hello-numpy's job, in the shape of NVFlare's FedAvgJob scripts (its hello-numpy job.py's
arguments, 2.5's fedavg_script_runner_*.py calls): a FedAvgJob with a nested-list initial
model, a ScriptRunner with FrameworkType.NUMPY sent to each site with job.to(), and
simulator_run with a GPU argument.

NVFlare's hello-numpy builds this job with a recipe (NumpyFedAvgRecipe(initial_model=
[[1, 2, 3], ...]), nvflare.recipe.SimEnv) or its component FedJob (job.to(FedAvg(...),
"server")); fedlift has neither (its FedAvgJob takes the same nested-list model). Lines
that differ from such a FedAvgJob script of NVFlare's: the import (nvflare -> fedlift) and
WORKDIR (the test's workspace instead of /tmp/nvflare/jobs/workdir).
"""

import argparse
import os

from fedlift import FedAvgJob, FrameworkType, ScriptRunner

WORKDIR = os.environ.get("NVSTYLE_WORKDIR", "/tmp/nvflare/jobs/workdir")


def define_parser() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--update_type", choices=["full", "diff"], default="full")
    return parser.parse_args()


def main() -> None:
    args = define_parser()
    n_clients = args.n_clients
    num_rounds = args.num_rounds
    train_script = "client.py"

    job = FedAvgJob(
        name="hello-numpy",
        n_clients=n_clients,
        num_rounds=num_rounds,
        initial_model=[[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        key_metric="weight_mean",
    )

    for i in range(n_clients):
        executor = ScriptRunner(
            script=train_script,
            script_args=f"--update_type {args.update_type}",
            framework=FrameworkType.NUMPY,
        )
        job.to(executor, f"site-{i + 1}")

    job.simulator_run(WORKDIR, gpu="0")


if __name__ == "__main__":
    main()
