"""NVFlare's side of the TF-job comparison: fedlift's ``tf_client_api_job.py``, on NVFlare.

``python tf_nvflare_job.py --data DIR --out DIR --workspace DIR [--n_clients 2 --num_rounds 3]``
(with the ``nvflare-tf`` venv's python) does what a user of NVFlare's job API does: build a
``FedJob`` -- the ``FedAvg`` controller (plus a final evaluation, ``tf_nvflare_ctl``), the
example's ``TFNet`` behind NVFlare's ``TFModel`` persistor, and a ``ScriptRunner``
(in-process, framework TENSORFLOW) of ``tf_nvflare_client.py`` -- then run it with NVFlare's
simulator (``job.simulator_run``, every client at once) and print the final accuracy. The
model file is the example's own ``tf_net.py`` (keras only), shipped in the job's ``custom``.
NVFlare runs with its defaults (its client pulls the next task 2 s after each task).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as fedlift's job script

HERE = Path(__file__).resolve().parent
NET = HERE.parents[1] / "examples" / "cifar10-tf" / "src" / "tf_net.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="folder of site-<i>.npz")
    parser.add_argument("--out", type=Path, required=True, help="sites write accuracy here")
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()

    from nvflare.app_opt.tf.job_config.model import TFModel
    from nvflare.fuel.utils.constants import FrameworkType
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import ScriptRunner

    sys.path.insert(0, str(HERE))  # a top-level module, so FedJob copies it into custom/
    from tf_nvflare_ctl import FedAvgFinalEval

    job = FedJob(name="cifar10_tf_fedavg", min_clients=args.n_clients)
    job.to_server(TFModel(model={"path": "tf_net.TFNet", "args": {"input_shape": [32, 32, 3]}}))
    job.to_server(
        FedAvgFinalEval(
            num_clients=args.n_clients, num_rounds=args.num_rounds, persistor_id="persistor"
        )
    )
    job.add_file_to_server(str(NET))
    job.add_file_to_clients(str(NET))
    job.to_clients(
        ScriptRunner(
            script=str(HERE / "tf_nvflare_client.py"),
            script_args=f"--data {args.data} --out {args.out} --epochs {args.epochs} "
            f"--batch_size {args.batch_size}",
            framework=FrameworkType.TENSORFLOW,
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    job.simulator_run(str(args.workspace), n_clients=args.n_clients, threads=args.n_clients)
    accuracies = [json.loads(p.read_text())["accuracy"] for p in sorted(args.out.glob("*.json"))]
    if len(accuracies) != args.n_clients:
        print(f"tf_nvflare_job.py: {len(accuracies)} final accuracies in {args.out}, expected "
              f"{args.n_clients}", file=sys.stderr)  # fmt: skip
        return 1
    print(f"final accuracy: {sum(accuracies) / len(accuracies):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
