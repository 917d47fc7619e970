"""Client side of hello-numpy: logistic regression in plain NumPy, written as NVFlare's
hello-numpy client is (``train()``, ``evaluate()``, the Client API loop).

The model is one float32 array, ``params["numpy_key"]``: the weights of the features and
the bias last. The job's initial model is a plain list, which fedlift (like NVFlare's NumPy
recipe) turns into that array. Each site has its own data: points drawn around the same
true boundary, with a seed of its own (nothing is downloaded).
"""

from __future__ import annotations

import argparse

import numpy as np

import fedlift.client as flare

N_FEATURES = 8
TRUE_SEED = 1234  # the boundary every site's data follows


def load_data(site_index: int, n: int = 400) -> tuple[np.ndarray, ...]:
    """Site ``site_index``'s train and test points: x ~ N(0, 1), y = [x . w* + 0.5 + noise > 0]."""
    true_w = np.random.default_rng(TRUE_SEED).normal(size=N_FEATURES)
    rng = np.random.default_rng(site_index)
    x = rng.normal(size=(2 * n, N_FEATURES)).astype(np.float32)
    y = (x @ true_w + 0.5 + rng.normal(scale=0.5, size=2 * n) > 0).astype(np.float32)
    return x[:n], y[:n], x[n:], y[n:]


def predict(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """P(y = 1 | x) under the model ``weights`` (features' weights, then the bias)."""
    return 1.0 / (1.0 + np.exp(-(x @ weights[:-1] + weights[-1])))


def train(weights: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float, steps: int) -> np.ndarray:
    """``steps`` of full-batch gradient descent on the mean log loss."""
    w = weights.astype(np.float32).copy()
    for _ in range(steps):
        error = predict(w, x) - y
        w[:-1] -= lr * (x.T @ error) / len(y)
        w[-1] -= lr * float(np.mean(error))
    return w


def evaluate(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy of the model ``weights`` on ``x``, ``y``."""
    return {"accuracy": float(np.mean((predict(weights, x) > 0.5) == (y > 0.5)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--local_steps", type=int, default=5)
    parser.add_argument("--update_type", choices=["full", "diff"], default="full")
    args = parser.parse_args()

    flare.init()
    site = flare.system_info()
    x_train, y_train, x_test, y_test = load_data(site["site_index"])

    while flare.is_running():
        input_model = flare.receive()
        weights = input_model.params["numpy_key"]
        # metrics of the global model this site received, on this site's test data
        metrics = evaluate(weights, x_test, y_test)
        print(f"{site['site_name']}: round {input_model.current_round}, received {metrics}")

        new_weights = train(weights, x_train, y_train, args.lr, args.local_steps)
        if args.update_type == "diff":
            params, params_type = new_weights - weights, flare.ParamsType.DIFF
        else:
            params, params_type = new_weights, flare.ParamsType.FULL
        flare.send(
            flare.FLModel(
                params={"numpy_key": params},
                params_type=params_type,
                metrics=metrics,
                current_round=input_model.current_round,
                meta={"NUM_STEPS_CURRENT_ROUND": len(x_train)},
            )
        )


if __name__ == "__main__":
    main()
