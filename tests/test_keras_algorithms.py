"""Known answers for the Keras FedProx and SCAFFOLD helpers (fedlift.client.keras).

One tiny model throughout: a frozen identity layer ``pre`` (its weights must never move)
feeding ``d = Dense(1)`` with kernel ``w0 = [0.5, -1]`` and bias ``b0 = 0``, trained on the
single sample ``x = [1, 1]``, ``y = 0`` with the mean squared error, so one ``fit`` epoch
is one step. At ``w, b`` the prediction is ``p = w1 + w2 + b``, the loss ``(p - y)^2`` and
its gradient ``dL/dw = 2 p x = [2p, 2p]``, ``dL/db = 2p``. Every expected number below is
worked out by hand from these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras
import tensorflow as tf

import fedlift.client.keras as fk
from fedlift.client.keras import (
    FedProxCallback,
    FedProxLoss,
    ScaffoldCallback,
    TFFedProxLoss,
    TFScaffoldHelper,
)
from fedlift.errors import ConfigError

X = np.array([[1.0, 1.0]], np.float32)
Y = np.array([[0.0]], np.float32)
W0 = [[0.5], [-1.0]]
PRE = [np.eye(2, dtype=np.float32), np.zeros(2, np.float32)]
LR = 0.1


def build() -> Any:
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(2, name="pre", trainable=False),
            keras.layers.Flatten(name="flat"),  # weightless: [] in the params layout
            keras.layers.Dense(1, name="d"),
        ]
    )
    return model


@pytest.fixture(scope="module")
def model() -> Any:
    return build()


def reset(model: Any, optimizer: Any = None) -> Any:
    """Weights back to w0, b0 and a fresh optimizer (SGD at LR unless given)."""
    model.get_layer("pre").set_weights(PRE)
    model.get_layer("d").set_weights([np.array(W0, np.float32), np.zeros(1, np.float32)])
    model.compile(optimizer=optimizer or keras.optimizers.SGD(LR), loss="mse")
    return model


def kernel(model: Any) -> list[float]:
    return [float(v) for v in model.get_layer("d").get_weights()[0].ravel()]


def bias(model: Any) -> float:
    return float(model.get_layer("d").get_weights()[1][0])


def assert_pre_untouched(model: Any) -> None:
    for got, start in zip(model.get_layer("pre").get_weights(), PRE, strict=True):
        np.testing.assert_array_equal(got, start)


def fit(model: Any, steps: int, callbacks: list[Any]) -> None:
    model.fit(X, Y, batch_size=1, epochs=steps, verbose=0, shuffle=False, callbacks=callbacks)


# ---------------------------------------------------------------- FedProx


def test_fedprox_mu_zero_is_plain_sgd(model: Any) -> None:
    reset(model)
    fit(model, 2, [FedProxCallback(0.0)])
    # step 1: p = 0.5 - 1 + 0 = -0.5, grad = [-1, -1], -1 -> w = [0.6, -0.9], b = 0.1
    # step 2: p = 0.6 - 0.9 + 0.1 = -0.2, grad = [-0.4, -0.4], -0.4 -> w = [0.64, -0.86]
    np.testing.assert_allclose(kernel(model), [0.64, -0.86], atol=1e-6)
    assert bias(model) == pytest.approx(0.14, abs=1e-6)
    assert_pre_untouched(model)


def test_fedprox_pulls_towards_the_weights_fit_started_from(model: Any) -> None:
    for _ in range(2):  # a new callback each round: the terms are reused, not stacked
        reset(model)
        fit(model, 2, [FedProxCallback(1.0)])
        # w_g = [0.5, -1], b_g = 0 (the weights at on_train_begin), mu = 1.
        # step 1: w = w_g, the term's gradient is 0 -> w = [0.6, -0.9], b = 0.1 (as SGD)
        # step 2: data grad [-0.4, -0.4], -0.4; term grad mu * (w - w_g) = [0.1, 0.1], 0.1
        #         total [-0.3, -0.3], -0.3 -> w = [0.6 + 0.03, -0.9 + 0.03] = [0.63, -0.87],
        #         b = 0.1 + 0.03 = 0.13
        np.testing.assert_allclose(kernel(model), [0.63, -0.87], atol=1e-6)
        assert bias(model) == pytest.approx(0.13, abs=1e-6)
        assert_pre_untouched(model)


def test_fedprox_term_is_in_the_loss_so_adam_sees_it(model: Any) -> None:
    """With given global weights the term acts from the first step; with Adam a step is
    lr * sign(gradient) (m/sqrt(v) of one gradient), so a post-step correction could not
    give these numbers: the term's gradient must reach the optimizer."""
    reset(model, keras.optimizers.Adam(LR))
    global_weights = {"pre": PRE, "flat": [], "d": [np.array([[0.5], [-3.0]]), np.zeros(1)]}
    fit(model, 1, [FedProxCallback(1.0, global_weights=global_weights)])
    # data grad [-1, -1], -1; term grad (w0 - w_g) = [0, 2], 0; total [-1, 1], -1
    # Adam step: -lr * sign -> w = [0.5 + 0.1, -1 - 0.1] = [0.6, -1.1], b = 0.1
    np.testing.assert_allclose(kernel(model), [0.6, -1.1], atol=1e-5)
    assert bias(model) == pytest.approx(0.1, abs=1e-5)
    assert_pre_untouched(model)


def test_fedprox_joins_a_training_step_traced_without_it() -> None:
    fresh = reset(build())
    fit(fresh, 1, [])  # the training function is traced now, with no proximal term
    fresh.get_layer("d").set_weights([np.array(W0, np.float32), np.zeros(1, np.float32)])
    global_weights = [*PRE, np.array([[0.5], [-3.0]]), np.zeros(1)]  # get_weights() order
    fit(fresh, 1, [FedProxCallback(1.0, global_weights=global_weights)])
    # SGD on [-1, -1] + [0, 2], -1 + 0: w = [0.5 + 0.1, -1 - 0.1] = [0.6, -1.1], b = 0.1
    np.testing.assert_allclose(kernel(fresh), [0.6, -1.1], atol=1e-6)
    assert bias(fresh) == pytest.approx(0.1, abs=1e-6)


def test_fedprox_training_loss_has_the_term_evaluation_does_not(model: Any) -> None:
    reset(model)
    history = model.fit(
        X, Y, batch_size=1, epochs=2, verbose=0, validation_data=(X, Y),
        callbacks=[FedProxCallback(1.0)],
    )  # fmt: skip
    # Epoch 2's training loss is taken at its step's start, w = [0.6, -0.9], b = 0.1:
    # p = -0.2, mse 0.04, term 1/2 * (0.1^2 * 3) = 0.015 -> 0.055.
    assert history.history["loss"][1] == pytest.approx(0.055, abs=1e-6)
    # Validation after each epoch is the mse alone: epoch 1 0.04; epoch 2 at
    # w = [0.63, -0.87], b = 0.13: p = -0.11, 0.0121 (with the term: 0.0121 + 0.02535).
    assert history.history["val_loss"] == pytest.approx([0.04, 0.0121], abs=1e-6)
    assert model.evaluate(X, Y, verbose=0) == pytest.approx(0.0121, abs=1e-6)


def test_fedprox_global_weights_are_checked(model: Any) -> None:
    reset(model)
    bad = {"d": [np.zeros((3, 1)), np.zeros(1)], "pre": PRE}
    with pytest.raises(ConfigError, match=r"'d/0' must be a numeric array of shape \(2, 1\)"):
        fit(model, 1, [FedProxCallback(1.0, global_weights=bad)])
    with pytest.raises(ConfigError, match="layers the model does not have"):
        fit(model, 1, [FedProxCallback(1.0, global_weights={"nope": []})])
    with pytest.raises(ConfigError, match="finite number >= 0"):
        FedProxCallback(-1.0)
    with pytest.raises(ConfigError, match="must be a number"):
        FedProxCallback("0.1")  # type: ignore[arg-type]


def test_fedprox_loss_for_custom_loops() -> None:
    w = tf.Variable([1.0, 2.0])
    g = np.array([0.5, 4.0], np.float32)
    with tf.GradientTape() as tape:
        value = FedProxLoss(2.0)([w], [g])
    # mu/2 * ((1 - 0.5)^2 + (2 - 4)^2) = 1 * (0.25 + 4) = 4.25; gradient mu * (w - g)
    assert float(value) == pytest.approx(4.25)
    np.testing.assert_allclose(tape.gradient(value, w).numpy(), [1.0, -4.0])
    with pytest.raises(ConfigError, match="pair up one to one"):
        FedProxLoss(1.0)([w], [])


def test_tf_fedprox_loss_wraps_the_compiled_loss(model: Any) -> None:
    reset(model)
    d = model.get_layer("d")
    global_trainables = [np.array([[0.5], [-3.0]], np.float32), np.zeros(1, np.float32)]
    loss = TFFedProxLoss(model.trainable_variables, global_trainables, 1.0, "mse")
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=loss)
    assert [v.path for v in model.trainable_variables] == [v.path for v in d.weights]
    fit(model, 1, [])
    # grad [-1, -1], -1 plus the term's [0, 2], 0 -> [-1, 1], -1: w = [0.6, -1.1], b = 0.1
    np.testing.assert_allclose(kernel(model), [0.6, -1.1], atol=1e-6)
    assert bias(model) == pytest.approx(0.1, abs=1e-6)
    # The loss value: mse + mu/2 * ||w - w_g||^2 at w = [0.6, -1.1], b = 0.1: p = -0.4,
    # 0.16 + 0.5 * (0.1^2 + 1.9^2 + 0.1^2) = 0.16 + 0.5 * 3.63 = 1.975
    assert float(loss(Y, model(X))) == pytest.approx(1.975, abs=1e-5)


# ---------------------------------------------------------------- SCAFFOLD

C_GLOBAL = {
    "pre": [np.full((2, 2), 5.0, np.float32), np.full(2, 5.0, np.float32)],  # frozen: unused
    "flat": [],
    "d": [np.array([[0.2], [0.4]], np.float32), np.array([0.3], np.float32)],
}


@pytest.fixture
def helper() -> Iterator[TFScaffoldHelper]:
    yield TFScaffoldHelper()


def test_scaffold_corrects_every_step_and_estimates_c_i(
    model: Any, helper: TFScaffoldHelper
) -> None:
    reset(model)
    helper.load_global_controls({"scaffold_c_global": C_GLOBAL, "config": {}})
    fit(model, 2, [helper.callback()])
    # c - c_i = c (c_i = 0): kernel [0.2, 0.4], bias 0.3; correction -eta * that per step.
    # step 1: p = -0.5, grad [-1, -1], -1 -> SGD w = [0.6, -0.9], b = 0.1
    #         corrected: w = [0.6 - 0.02, -0.9 - 0.04] = [0.58, -0.94], b = 0.1 - 0.03 = 0.07
    # step 2: p = 0.58 - 0.94 + 0.07 = -0.29, grad [-0.58, -0.58], -0.58
    #         SGD w = [0.638, -0.882], b = 0.128; corrected w = [0.618, -0.922], b = 0.098
    np.testing.assert_allclose(kernel(model), [0.618, -0.922], atol=1e-6)
    assert bias(model) == pytest.approx(0.098, abs=1e-6)
    assert_pre_untouched(model)
    # c_i+ = c_i - c + (x - y) / (K * eta), K * eta = 0.2:
    #   kernel: 0 - [0.2, 0.4] + ([0.5, -1] - [0.618, -0.922]) / 0.2
    #         = [-0.2, -0.4] + [-0.59, -0.39] = [-0.79, -0.79]   (= the mean gradient)
    #   bias:   -0.3 + (0 - 0.098) / 0.2 = -0.3 - 0.49 = -0.79
    delta = helper.result_meta()["scaffold_c_diff"]
    assert list(delta) == ["pre", "flat", "d"] and delta["flat"] == []
    np.testing.assert_allclose(delta["d"][0].ravel(), [-0.79, -0.79], atol=1e-5)
    np.testing.assert_allclose(delta["d"][1], [-0.79], atol=1e-5)
    assert delta["d"][0].dtype == np.float32 and delta["d"][0].shape == (2, 1)
    for frozen in delta["pre"]:  # not trained: c_i stays 0, so delta 0
        np.testing.assert_array_equal(frozen, np.zeros_like(frozen))

    # Round 2: c_i = c_i+ = [-0.79, -0.79], -0.79; the server's new c = [0.1, 0.1], 0.1.
    reset(model)
    c2 = {**C_GLOBAL, "d": [np.full((2, 1), 0.1, np.float32), np.full(1, 0.1, np.float32)]}
    helper.load_global_controls(c2)  # the bare tree, as NVFlare's call takes it
    fit(model, 1, [ScaffoldCallback(helper)])
    # c - c_i = 0.1 + 0.79 = 0.89 everywhere; step: SGD w = [0.6, -0.9], b = 0.1, then
    # -0.1 * 0.89 = -0.089: w = [0.511, -0.989], b = 0.011
    np.testing.assert_allclose(kernel(model), [0.511, -0.989], atol=1e-6)
    assert bias(model) == pytest.approx(0.011, abs=1e-6)
    # c_i++ = -0.79 - 0.1 + (x - y) / 0.1: kernel (0.5 - 0.511) / 0.1 = -0.11, so
    # -0.89 - 0.11 = -1.0 (= this round's gradient); bias (0 - 0.011) / 0.1 = -0.11 -> -1.0
    # delta = c_i++ - c_i = -1.0 + 0.79 = -0.21
    delta = helper.get_delta_controls()
    np.testing.assert_allclose(delta["d"][0].ravel(), [-0.21, -0.21], atol=1e-5)
    np.testing.assert_allclose(delta["d"][1], [-0.21], atol=1e-5)
    c_global, c_local = helper.get_params()
    np.testing.assert_allclose(c_global["d"][0].ravel(), [0.1, 0.1])
    np.testing.assert_allclose(c_local["d"][0].ravel(), [-0.79, -0.79], atol=1e-5)
    helper.terms_update()  # NVFlare's call: already done by the callback


def test_scaffold_with_zero_controls_is_plain_sgd(model: Any, helper: TFScaffoldHelper) -> None:
    reset(model)
    zeros = {name: [np.zeros_like(a) for a in arrays] for name, arrays in C_GLOBAL.items()}
    helper.load_global_controls({"scaffold_c_global": zeros})
    fit(model, 2, [helper.callback()])
    np.testing.assert_allclose(kernel(model), [0.64, -0.86], atol=1e-6)  # as plain SGD
    # c_i+ = mean gradient: ([-1, -1] + [-0.4, -0.4]) / 2 = [-0.7, -0.7]; bias -0.7
    delta = helper.result_meta()["scaffold_c_diff"]
    np.testing.assert_allclose(delta["d"][0].ravel(), [-0.7, -0.7], atol=1e-5)
    np.testing.assert_allclose(delta["d"][1], [-0.7], atol=1e-5)


def test_scaffold_misuse_is_explained(model: Any, helper: TFScaffoldHelper) -> None:
    reset(model)
    with pytest.raises(ConfigError, match="load_global_controls"):
        fit(model, 1, [helper.callback()])
    with pytest.raises(ConfigError, match="Is the server running SCAFFOLD"):
        helper.load_global_controls({"config": {"fedprox_mu": 0.1}})
    with pytest.raises(ConfigError, match="no delta c_i for this round"):
        helper.get_delta_controls()
    with pytest.raises(ConfigError, match=r"meta\['scaffold_c_global'\]\['pre'\]"):
        helper.load_global_controls({"scaffold_c_global": {"d": C_GLOBAL["d"]}})
    helper.load_global_controls(C_GLOBAL)
    fit(model, 1, [helper.callback()])
    helper.result_meta()
    with pytest.raises(ConfigError, match="already taken"):
        fit(model, 1, [helper.callback()])
    with pytest.raises(ConfigError, match="TFScaffoldHelper"):
        ScaffoldCallback(object())  # type: ignore[arg-type]
    helper.load_global_controls(C_GLOBAL)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", steps_per_execution=2)
    with pytest.raises(ConfigError, match="steps_per_execution=2"):
        fit(model, 1, [helper.callback()])


def test_fedprox_mu_is_the_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedlift.client as flare
    from fedlift.client._api import _reset_for_tests
    from fedlift.client._link import ClientContext, LocalLink, Task, set_current_link

    monkeypatch.delenv("RANK", raising=False)
    _reset_for_tests()
    link = LocalLink(ClientContext("job", "site-1", 0, 1, {"num_rounds": 2}))
    set_current_link(link)
    try:
        flare.init()
        assert fk.fedprox_mu() == 0.0 and fk.fedprox_mu(0.5) == 0.5  # no task yet
        for task_id, mu in (("t0", 0.05), ("t1", "high")):
            meta = {"config": {"fedprox_mu": mu}}
            link.offer(Task(task_id, "train", flare.FLModel(params={"w": np.ones(1)}, meta=meta)))
            flare.receive()
            if mu == 0.05:
                assert fk.get_fedprox_mu() == 0.05
                flare.send(flare.FLModel(params={"w": np.ones(1)}))
        with pytest.raises(ConfigError, match="'fedprox_mu' is FedProx's mu and must be a number"):
            fk.fedprox_mu()
    finally:
        link.stop()
        set_current_link(None)
        _reset_for_tests()
    assert fk.get_fedprox_mu is fk.fedprox_mu


def test_scaffold_a_round_run_again_starts_from_the_same_c_i(
    model: Any, helper: TFScaffoldHelper
) -> None:
    """After a server restart the same round comes again; c_i must not move twice."""
    reset(model)
    helper.load_global_controls({"scaffold_c_global": C_GLOBAL, "current_round": 0})
    fit(model, 2, [helper.callback()])
    first = helper.result_meta()["scaffold_c_diff"]
    reset(model)
    helper.load_global_controls({"scaffold_c_global": C_GLOBAL, "current_round": 0})  # again
    fit(model, 2, [helper.callback()])
    again = helper.result_meta()["scaffold_c_diff"]
    np.testing.assert_array_equal(again["d"][0], first["d"][0])  # from the same c_i (0)
    np.testing.assert_array_equal(again["d"][1], first["d"][1])
    _, c_local = helper.get_params()
    np.testing.assert_array_equal(c_local["d"][1], [0.0])
    reset(model)
    helper.load_global_controls({"scaffold_c_global": C_GLOBAL, "current_round": 1})  # next
    _, c_local = helper.get_params()
    np.testing.assert_allclose(c_local["d"][1], first["d"][1], atol=1e-6)  # now c_i = c_i+
