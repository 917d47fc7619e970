"""Client side of the scikit-learn example: an ``SGDClassifier`` (logistic regression fitted
by SGD) on the digits data set that ships with scikit-learn (no download).

Each round the site loads the global ``coef_`` and ``intercept_`` into its classifier and,
with ``warm_start=True``, ``fit()`` goes on from them for ``--local_epochs`` epochs on the
site's shard of the training set; it sends the new ``coef_`` and ``intercept_`` back,
weighted by its number of samples. It answers the final evaluation (``is_evaluate()``)
with metrics only.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import train_test_split

import fedlift.client as flare

N_CLASSES, N_FEATURES = 10, 64  # 8x8 images of the digits 0-9


def load_data(site_index: int, num_sites: int) -> tuple[np.ndarray, ...]:
    """This site's shard of the training set (every ``num_sites``-th sample from
    ``site_index``) and of the test set; pixels scaled from 0-16 to 0-1."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.3, random_state=0, stratify=y
    )
    shard = slice(site_index, None, num_sites)
    return x_train[shard], y_train[shard], x_test[shard], y_test[shard]


def accuracy(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the linear model ``coef``, ``intercept``: the class of the largest
    ``x @ coef.T + intercept`` (what ``SGDClassifier.predict`` computes, here also for the
    global model before this site has fitted anything)."""
    return float(np.mean(np.argmax(x @ coef.T + intercept, axis=1) == y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--local_epochs", type=int, default=1)
    parser.add_argument("--eta0", type=float, default=0.05)
    args = parser.parse_args()
    # max_iter=local_epochs: fit() stops before it converges, by design, every round
    warnings.filterwarnings("ignore", category=ConvergenceWarning)

    flare.init()
    site = flare.system_info()
    x_train, y_train, x_test, y_test = load_data(site["site_index"], site["num_sites"])
    model = SGDClassifier(
        loss="log_loss",
        learning_rate="constant",
        eta0=args.eta0,
        max_iter=args.local_epochs,
        tol=None,
        warm_start=True,
        random_state=site["site_index"],
    )

    while flare.is_running():
        input_model = flare.receive()
        coef, intercept = input_model.params["coef"], input_model.params["intercept"]
        metrics = {"accuracy": accuracy(coef, intercept, x_test, y_test)}
        print(f"{site['site_name']}: round {input_model.current_round}, received {metrics}")
        if flare.is_evaluate():  # the final evaluation: metrics only, no training
            flare.send(flare.FLModel(metrics=metrics))
            continue

        # warm start: fit() starts from the global model instead of from zeros
        model.coef_ = np.array(coef, dtype=np.float64)
        model.intercept_ = np.array(intercept, dtype=np.float64)
        model.fit(x_train, y_train)
        flare.send(
            flare.FLModel(
                params={"coef": model.coef_, "intercept": model.intercept_},
                metrics=metrics,
                meta={"NUM_STEPS_CURRENT_ROUND": len(x_train)},
            )
        )


if __name__ == "__main__":
    main()
