"""A deterministic NumPy client whose FedAvg is exact in float32, so a disturbed run must
come out bit-identical to arithmetic done by hand (see ``expected_model``).

Each round, site i sends ``global + delta(round, i)`` with weight 1, where ``delta`` holds
small integers drawn from a generator seeded by (seed, round, i): sums of such values and
their halving are exact, whatever order the server folds the results in.

Options: --seed S, --sleep SECONDS (of "training" per round).
"""

import argparse
import time

import numpy as np

import fedlift.client as flare


def delta(seed: int, rnd: int, index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([seed, rnd, index])
    return rng.integers(-4, 5, size=size).astype(np.float32)


def expected_model(initial: np.ndarray, n_sites: int, rounds: int, seed: int) -> np.ndarray:
    """The global model after ``rounds`` rounds of FedAvg over ``n_sites`` (weights equal)."""
    model = initial.astype(np.float64)
    for rnd in range(rounds):
        total = sum(model + delta(seed, rnd, i, model.size) for i in range(n_sites))
        model = total / n_sites
    return model.astype(np.float32)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    flare.init()
    index = flare.system_info()["site_index"]
    while flare.is_running():
        model = flare.receive()
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": 1.0}))
            continue
        rnd = int(model.current_round or 0)
        time.sleep(args.sleep)
        w = model.params["w"]
        flare.send(
            flare.FLModel(
                params={"w": w + delta(args.seed, rnd, index, w.size)},
                metrics={"accuracy": float(rnd)},
                meta={"NUM_STEPS_CURRENT_ROUND": 1.0},
            )
        )
