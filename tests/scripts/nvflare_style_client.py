"""A client written as NVFlare's hello-numpy is: it never checks ``flare.is_evaluate()``.

Every task it gets it "trains" (adds 1 to ``params["numpy_key"]``, the key NVFlare's NumPy
recipe puts a list initial model under) and sends the result. It appends one JSON line per
task to ``tasks.jsonl`` in its site folder: the task's name (``flare.get_task_name()``),
the round, and ``get_config().get("greeting")`` (set by ``--config_file``'s JSON).
"""

import argparse
import json

import numpy as np

import fedlift.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--config_file", default=None)
args = parser.parse_args()

flare.init(config_file=args.config_file)
while flare.is_running():
    input_model = flare.receive()
    weights = input_model.params["numpy_key"]
    new_weights = weights + 1.0  # the "training"
    with open("tasks.jsonl", "a") as record:
        entry = {
            "task": flare.get_task_name(),
            "round": input_model.current_round,
            "greeting": flare.get_config().get("greeting"),
            "dtype": str(weights.dtype),
        }
        record.write(json.dumps(entry) + "\n")
    flare.send(
        flare.FLModel(
            params={"numpy_key": new_weights},
            params_type="FULL",
            metrics={"weight_mean": float(np.mean(new_weights))},
            current_round=input_model.current_round,
        )
    )
