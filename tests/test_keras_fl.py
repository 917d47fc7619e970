"""Federated Keras with one client equals centralised training: the exchange loses nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from conftest import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
from keras_common import DATA, build_model, deterministic, fit, load

from fedlift import FedAvgJob, ScriptRunner

ROUNDS = 3


@pytest.mark.parametrize("diff", [False, True], ids=["FULL", "DIFF"])
def test_one_client_fl_equals_centralised_training(
    tmp_path: Path, diff: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDLIFT_TEST_FASHION", str(DATA))
    deterministic(0)
    initial = build_model()
    initial_weights = [w.copy() for w in initial.get_weights()]

    job = FedAvgJob("keras-1client", n_clients=1, num_rounds=ROUNDS, initial_model=initial,
                    final_evaluation=True)  # fmt: skip
    job.to_clients(ScriptRunner(SCRIPTS / "keras_client.py", script_args="--diff" if diff else ""))
    result = job.simulator_run(tmp_path / "ws")

    # Centralised: the same initial weights, ROUNDS epochs in one fit() call.
    x_train, y_train, x_test, y_test = load()
    central = build_model()
    central.set_weights(initial_weights)
    fit(central, x_train, y_train, epochs=ROUNDS)

    fl_weights = [w for layer in ("conv", "out") for w in result.params[layer]]
    central_weights = [
        w for layer in ("conv", "out") for w in central.get_layer(layer).get_weights()
    ]
    for fl, ref, start in zip(fl_weights, central_weights, initial_weights, strict=True):
        assert fl.dtype == np.float32
        assert not np.allclose(fl, start)  # training happened
        np.testing.assert_allclose(fl, ref, rtol=0, atol=1e-6 if diff else 0)
    assert result.params["pool"] == [] and result.params["flat"] == []

    # The final model is real: it classifies real Fashion-MNIST well after 3 epochs.
    _, central_accuracy = central.evaluate(x_test, y_test, verbose=0)
    assert result.final_metrics["accuracy"] == pytest.approx(central_accuracy, abs=1e-6)
    assert central_accuracy > 0.6
    accuracies = [r.metrics["accuracy"] for r in result.rounds]
    assert accuracies[0] < 0.3 < accuracies[-1]  # round 0 evaluates the untrained model

    # Keras global and best models were written in Keras's own format and load back.
    assert result.global_model.name == "global_model.weights.h5"
    reloaded = build_model()
    reloaded.load_weights(str(result.global_model))
    np.testing.assert_array_equal(reloaded.get_layer("out").get_weights()[0], fl_weights[2])
