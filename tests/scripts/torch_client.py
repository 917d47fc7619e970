"""A PyTorch client in the style of NVFlare's hello-pt: load the received state_dict,
evaluate it, train, send the state_dict back.

Options: --diff (send the change as a DIFF, computed in torch), --epochs N (default 2).
The received params must be CPU tensors that are writable views (torch's "not writable"
warning is an error here).
"""

import argparse
import warnings

import torch
from torch_common import Net, accuracy, load, train

import fedlift.client as flare

warnings.filterwarnings("error", message="The given NumPy array is not writable")
parser = argparse.ArgumentParser()
parser.add_argument("--diff", action="store_true")
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

torch.manual_seed(0)
flare.init()
info = flare.system_info()
x_train, y_train, x_test, y_test = load(info["site_index"], info["num_sites"])
model = Net()

while flare.is_running():
    input_model = flare.receive()
    received = input_model.params
    for key, value in received.items():
        if not (isinstance(value, torch.Tensor) and value.device.type == "cpu"):
            raise TypeError(f"received {key!r} as {type(value).__name__}, not a CPU tensor")
    dtype = next(iter(received.values())).dtype
    model = model.to(dtype)  # the job's model may be bfloat16
    model.load_state_dict(received)
    global_accuracy = accuracy(model, x_test, y_test)
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"accuracy": global_accuracy}))
        continue
    steps = train(model, x_train, y_train, args.epochs)
    params = model.cpu().state_dict()
    if args.diff:
        params = {key: value - received[key] for key, value in params.items()}
    flare.send(
        flare.FLModel(
            params_type=flare.ParamsType.DIFF if args.diff else flare.ParamsType.FULL,
            params=params,
            metrics={"accuracy": global_accuracy},
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
    )
