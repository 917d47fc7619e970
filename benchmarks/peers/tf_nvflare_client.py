"""NVFlare Client API script of the TF-job comparison: fedlift's ``cifar10_tf_fl.py``, on NVFlare.

The same steps, model and optimiser as the example's federated script
(``examples/cifar10-tf/src/cifar10_tf_fl.py``) with ``--max_train 2000 --max_test 500``: one
compiled ``TFNet`` (Adam, kept across rounds); each round: receive the global model, load it
layer by layer, evaluate it on the site's test set, ``fit`` for ``--epochs`` with
``--batch_size`` (validation on the test set), save the weights, send them with the round's
accuracy and ``NUM_STEPS_CURRENT_ROUND``. The final ``validate`` task only evaluates.

The site's arrays come from ``<--data>/<site>.npz`` (exported by fedlift's harness from the
example's loader, so the samples are fedlift's); the final accuracy goes to
``<--out>/<site>.json``. Standalone on purpose: NVFlare copies it into the job, and
``tf_net.py`` (the example's model, keras only) travels with it in ``custom/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import nvflare.client as flare
from keras import losses
from tf_net import TFNet

PATH = "./tf_model.weights.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()

    flare.init()
    site = flare.get_site_name()
    with np.load(args.data / f"{site}.npz", allow_pickle=False) as npz:
        train_images, train_labels = npz["x_train"], npz["y_train"]
        test_images, test_labels = npz["x_test"], npz["y_test"]
    train_images = train_images.astype("float32") / 255.0
    test_images = test_images.astype("float32") / 255.0

    model = TFNet(input_shape=(32, 32, 3))
    model.compile(
        optimizer="adam",
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.summary()

    while flare.is_running():
        input_model = flare.receive()
        if input_model is None or input_model.params is None:
            break
        print(f"{site}: round {input_model.current_round}")
        for k, v in input_model.params.items():
            model.get_layer(k).set_weights(v)
        _, test_global_acc = model.evaluate(test_images, test_labels, verbose=2)
        print(f"{site}: accuracy of the received global model: {test_global_acc:.4f}")

        if flare.is_evaluate():  # the controller's final task: evaluate the final model only
            (args.out / f"{site}.json").write_text(json.dumps({"accuracy": test_global_acc}))
            flare.send(flare.FLModel(metrics={"accuracy": test_global_acc}))
            continue

        model.fit(
            train_images,
            train_labels,
            epochs=args.epochs,
            batch_size=args.batch_size,
            validation_data=(test_images, test_labels),
            verbose=2,
        )
        print("Finished Training")
        model.save_weights(PATH)
        meta: dict[str, Any] = {"NUM_STEPS_CURRENT_ROUND": len(train_images) * args.epochs}
        flare.send(
            flare.FLModel(
                params={layer.name: layer.get_weights() for layer in model.layers},
                metrics={"accuracy": test_global_acc},
                meta=meta,
            )
        )


if __name__ == "__main__":
    main()
