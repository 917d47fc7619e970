"""The CIFAR-10 example's job, as NVFlare's tf_client_api_job.py (the job
examples/cifar10-tf mirrors): FedAvgJob with TFNet(input_shape=(None, 32, 32, 3)) as the
initial model, a ScriptRunner with FrameworkType.TENSORFLOW for every client
(to_clients), --launch_process for the multi-GPU script, --export_config, and
simulator_run with n_clients and a GPU argument.

Lines that differ from NVFlare's: the imports (nvflare -> fedlift) and JOB_ROOT/WORKDIR
(the test's folders instead of /tmp/nvflare/jobs/job_config and /tmp/nvflare/jobs/workdir).
"""

import argparse
import os

from src.tf_net import TFNet

from fedlift import FedAvgJob, FrameworkType, ScriptRunner

JOB_ROOT = os.environ.get("NVSTYLE_JOB_ROOT", "/tmp/nvflare/jobs/job_config")
WORKDIR = os.environ.get("NVSTYLE_WORKDIR", "/tmp/nvflare/jobs/workdir")


def define_parser() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=5)
    parser.add_argument("--script", type=str, default="src/cifar10_tf_fl.py")
    parser.add_argument("--launch_process", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--export_config", action=argparse.BooleanOptionalAction, default=False)
    return parser.parse_args()


def main() -> None:
    args = define_parser()

    n_clients = args.n_clients
    num_rounds = args.num_rounds
    script = args.script
    launch_process = args.launch_process
    export_config = args.export_config

    job = FedAvgJob(
        name="tf_client_api",
        n_clients=n_clients,
        num_rounds=num_rounds,
        initial_model=TFNet(input_shape=(None, 32, 32, 3)),
    )

    executor = ScriptRunner(
        script=script,
        launch_external_process=launch_process,
        framework=FrameworkType.TENSORFLOW,
    )
    job.to_clients(executor)

    if export_config:
        job.export_job(JOB_ROOT)
    else:
        job.simulator_run(WORKDIR, n_clients=n_clients, gpu="0")


if __name__ == "__main__":
    main()
