# mypy: disable-error-code="union-attr, index, arg-type, operator"
# (for mypy --strict: as NVFlare's scripts, this one uses receive()'s model without a None
# check (receive() gives None only once the job has ended, which is_running() rules out), and
# NVFlare's params_type="FULL" strings are accepted by FLModel though its hint says ParamsType.)
"""hello-numpy's client, written as NVFlare's hello-numpy client.py is.

The same calls in the same order: SummaryWriter, NPConstants.NUMPY_KEY, a "training" that
adds 1, --update_type full|diff. It never checks is_evaluate() (nor does NVFlare's).
Lines that differ from NVFlare's: the three imports (nvflare -> fedlift; NPConstants from
fedlift.model). There is no data to load.
"""

import argparse

import numpy as np

import fedlift.client as flare
from fedlift.client.tracking import SummaryWriter
from fedlift.model import NPConstants


def train(weights: np.ndarray) -> np.ndarray:
    """Stands in for training: every weight moves up by one."""
    return weights + 1


def evaluate(weights: np.ndarray) -> dict[str, float]:
    """Stands in for evaluation: the weights' mean is the metric."""
    return {"weight_mean": float(np.mean(weights))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--update_type", choices=["full", "diff"], default="full")
    args = parser.parse_args()

    flare.init()
    site_name = flare.system_info()["site_name"]
    print(f"{site_name}: client started")

    writer = SummaryWriter()

    while flare.is_running():
        input_model = flare.receive()
        print(f"{site_name}: round {input_model.current_round}")

        if NPConstants.NUMPY_KEY in input_model.params:
            weights = input_model.params[NPConstants.NUMPY_KEY]
        else:
            weights = np.array([0.0] * 10)  # no initial model: start from zeros

        new_weights = train(weights)
        metrics = evaluate(new_weights)
        writer.add_scalar(
            tag="weight_mean", scalar=metrics["weight_mean"], global_step=input_model.current_round
        )

        if args.update_type == "diff":
            to_send, params_type = new_weights - weights, flare.ParamsType.DIFF
        else:
            to_send, params_type = new_weights, flare.ParamsType.FULL

        flare.send(
            flare.FLModel(
                params={NPConstants.NUMPY_KEY: to_send},
                params_type=params_type,
                metrics=metrics,
                current_round=input_model.current_round,
            )
        )


if __name__ == "__main__":
    main()
