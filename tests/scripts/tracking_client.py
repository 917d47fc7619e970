"""An NVFlare-style client script that tracks its training, for tests/test_tracking.py.

Written as NVFlare's hello-numpy scripts are, with only the imports changed
(``nvflare.client`` -> ``fedlift.client``). Site i (``site_index``) in round r "trains"
by adding (i + 1) to every array and logs values a test can work out by hand:

- ``SummaryWriter.add_scalar("train_loss", (i + 1) / (r + 1), global_step=r)``;
- ``add_scalars("acc", {"train": 0.5 + 0.1 * r, "val": 0.25 + 0.1 * r}, r)``;
- ``MLflowWriter.log_metric("local_accuracy", 0.1 * (i + 1) + 0.2 * r, step=r)`` and
  ``log_metrics({"m1": r, "m2": 10 * i}, step=r)``;
- in round 0: params ``lr`` = 0.01 and ``batch_size`` = 32 / ``optimizer`` = "sgd",
  tags ``framework`` = "numpy" and ``site_index`` = i, and the text artifact
  ``notes/summary.txt`` ("site i"); ``WandBWriter.log({"wandb_loss": r + i}, step=r)``.

``--hostile`` (round 0, site index 0 only): before the honest calls, hands hostile records
straight to the site's link, past the Client API's checks (a modified client), and writes
one line per record to ``hostile.txt``: ``refused <error class>`` or ``accepted``.
"""

import argparse

import numpy as np

import fedlift.client as flare
from fedlift.client.tracking import MLflowWriter, SummaryWriter, WandBWriter
from fedlift.errors import FedliftError

parser = argparse.ArgumentParser()
parser.add_argument("--hostile", action="store_true")
args = parser.parse_args()

HOSTILE = [
    {"key": "loss", "value": "NaN!", "data_type": "SCALAR"},  # wrong type
    {"key": "loss", "value": 1.0, "data_type": "SCALAR", "step": float("nan")},  # NaN step
    {"key": "loss", "value": 1.0, "data_type": "SCALAR", "step": 1.5},
    {"key": "loss", "value": 1.0, "data_type": "SCALAR", "step": 2**64},
    {"key": "loss", "value": True, "data_type": "SCALAR"},
    {"key": "loss", "value": 10**400, "data_type": "SCALAR"},
    {"key": "k" * 100_000, "value": 1.0, "data_type": "SCALAR"},  # huge key
    {"key": "../../escape", "value": 1.0, "data_type": "SCALAR"},
    {"key": "lr", "value": "x" * 1_000_000, "data_type": "PARAMETER"},  # huge string
    {"key": "text", "value": "y" * 2_000_000, "data_type": "TEXT", "path": "a.txt"},
    {"key": "text", "value": "z", "data_type": "TEXT", "path": "../../../etc/passwd"},
    {"key": "text", "value": "z", "data_type": "TEXT", "path": "/abs.txt"},
    {"key": "m", "value": {str(i): 1.0 for i in range(5000)}, "data_type": "METRICS"},
    {"key": "m", "value": {"a": [1, 2]}, "data_type": "METRICS"},
    {"key": "p", "value": {"a": 1}, "data_type": "PARAMETERS"},
    {"key": "loss", "value": 1.0, "data_type": "IMAGE"},
    {"key": "loss", "value": 1.0, "data_type": "SCALAR", "writer": "EVIL"},
    {"key": 7, "value": 1.0, "data_type": "SCALAR"},
]

flare.init()
index = flare.system_info()["site_index"]
writer = SummaryWriter()
mlflow = MLflowWriter()
wandb = WandBWriter()

while flare.is_running():
    model = flare.receive()
    r = model.current_round
    if args.hostile and r == 0 and index == 0:
        link = flare._api._state.link  # past the Client API's own checks
        with open("hostile.txt", "w") as out:
            for record in HOSTILE:
                try:
                    link.log(record)
                    out.write("accepted\n")
                except FedliftError as exc:
                    out.write(f"refused {type(exc).__name__}\n")
    params = {k: np.asarray(v) + (index + 1) for k, v in model.params.items()}
    writer.add_scalar("train_loss", (index + 1) / (r + 1), global_step=r)
    writer.add_scalars("acc", {"train": 0.5 + 0.1 * r, "val": 0.25 + 0.1 * r}, r)
    mlflow.log_metric("local_accuracy", np.float32(0.1 * (index + 1) + 0.2 * r), step=r)
    mlflow.log_metrics({"m1": r, "m2": 10 * index}, step=r)
    wandb.log({"wandb_loss": r + index}, step=r)
    if r == 0:
        mlflow.log_param("lr", 0.01)
        mlflow.log_params({"batch_size": 32, "optimizer": "sgd"})
        mlflow.set_tag("framework", "numpy")
        mlflow.set_tags({"site_index": index})
        mlflow.log_text(f"site {index}", "notes/summary.txt")
    flare.send(flare.FLModel(params=params, metrics={"accuracy": 0.5 + 0.1 * r}))
