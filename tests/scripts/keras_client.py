"""A Keras client for tests: one local epoch per round on the whole (shared) data set."""

import sys

from keras_common import build_model, deterministic, fit, load

import fedlift.client as flare

diff = "--diff" in sys.argv
deterministic(0)
x_train, y_train, x_test, y_test = load()
model = build_model()

flare.init()
while flare.is_running():
    received = flare.receive()
    for name, weights in received.params.items():
        model.get_layer(name).set_weights(weights)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"accuracy": accuracy}))
        continue
    fit(model, x_train, y_train, epochs=1)
    params = {layer.name: layer.get_weights() for layer in model.layers}
    if diff:
        params = flare.tree_sub(params, received.params)
    flare.send(
        flare.FLModel(
            params_type=flare.ParamsType.DIFF if diff else flare.ParamsType.FULL,
            params=params,
            metrics={"accuracy": accuracy},
            meta={"NUM_STEPS_CURRENT_ROUND": len(x_train)},
        )
    )
