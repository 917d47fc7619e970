"""hello-pt's job, as NVFlare's FedAvgJob script for it (fedavg_script_runner_pt.py): a
FedAvgJob with the SimpleNetwork module as its initial model, a ScriptRunner without a
framework (NVFlare's default, PyTorch) sent to each site with job.to(), simulator_run with
a GPU argument.

Lines that differ from NVFlare's: the imports (nvflare -> fedlift) and WORKDIR (the test's
workspace instead of /tmp/nvflare/jobs/workdir).
"""

import os

from src.simple_network import SimpleNetwork

from fedlift import FedAvgJob, ScriptRunner

WORKDIR = os.environ.get("NVSTYLE_WORKDIR", "/tmp/nvflare/jobs/workdir")

if __name__ == "__main__":
    n_clients = 2
    num_rounds = 2
    train_script = "src/hello-pt_cifar10_fl.py"

    job = FedAvgJob(
        name="hello-pt_cifar10_fedavg",
        n_clients=n_clients,
        num_rounds=num_rounds,
        initial_model=SimpleNetwork(),
    )

    for i in range(n_clients):
        executor = ScriptRunner(script=train_script, script_args="")
        job.to(executor, f"site-{i + 1}")

    job.simulator_run(WORKDIR, gpu="0")
