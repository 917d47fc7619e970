"""hello-lightning's job, as NVFlare's FedAvgJob scripts are written: a FedAvgJob with the
LitNet module as its initial model and val_acc_epoch as the key metric, a ScriptRunner
(NVFlare's default framework, PyTorch) sent to each site with job.to(), simulator_run.
NVFlare's current hello-lightning job builds the same with FedAvgRecipe(model=LitNet(),
key_metric="val_acc_epoch", train_args=...) and SimEnv, which fedlift does not have.

Lines that differ from a FedAvgJob script of NVFlare's: the imports (nvflare -> fedlift)
and WORKDIR (the test's workspace instead of /tmp/nvflare/jobs/workdir).
"""

import argparse
import os

from model import LitNet

from fedlift import FedAvgJob, ScriptRunner

WORKDIR = os.environ.get("NVSTYLE_WORKDIR", "/tmp/nvflare/jobs/workdir")


def define_parser() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=24)
    parser.add_argument("--limit_batches", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = define_parser()
    n_clients = args.n_clients

    job = FedAvgJob(
        name="hello-lightning_fedavg",
        n_clients=n_clients,
        num_rounds=args.num_rounds,
        initial_model=LitNet(),
        key_metric="val_acc_epoch",
    )

    for i in range(n_clients):
        executor = ScriptRunner(
            script="client.py",
            script_args=f"--batch_size {args.batch_size} --limit_batches {args.limit_batches}",
        )
        job.to(executor, f"site-{i + 1}")

    job.simulator_run(WORKDIR, gpu="0")


if __name__ == "__main__":
    main()
