"""hello-tf's job, as NVFlare's FedAvgJob script for it (fedavg_script_runner_tf.py): a
FedAvgJob whose initial model is the unbuilt TFNet() (fedlift builds it from the
_input_shape it keeps, as NVFlare's persistor does), a ScriptRunner with
FrameworkType.TENSORFLOW sent to each site with job.to(), simulator_run with a GPU
argument.

Lines that differ from NVFlare's: the imports (nvflare -> fedlift) and WORKDIR (the test's
workspace instead of /tmp/nvflare/jobs/workdir).
"""

import os

from src.tf_net import TFNet

from fedlift import FedAvgJob, FrameworkType, ScriptRunner

WORKDIR = os.environ.get("NVSTYLE_WORKDIR", "/tmp/nvflare/jobs/workdir")

if __name__ == "__main__":
    n_clients = 2
    num_rounds = 2
    train_script = "src/hello-tf_fl.py"

    job = FedAvgJob(
        name="hello-tf_fedavg", n_clients=n_clients, num_rounds=num_rounds, initial_model=TFNet()
    )

    for i in range(n_clients):
        executor = ScriptRunner(
            script=train_script,
            script_args="",
            framework=FrameworkType.TENSORFLOW,
        )
        job.to(executor, f"site-{i + 1}")

    job.simulator_run(WORKDIR, gpu="0")
