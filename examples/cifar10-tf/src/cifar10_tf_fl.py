"""Federated CIFAR-10 training: cifar10_tf_original.py plus the 7 Client API changes.

Each change is marked with its number; everything else is the centralised script, and the
same ``model.fit`` serves every server strategy: FedProx's ``mu`` and SCAFFOLD's control
variates arrive with the task, and the script uses them when they are there (marked
"FedProx" and "SCAFFOLD"). The data are this site's part of the training set
(``--data_split``, or a Dirichlet label skew with ``--alpha``).
"""

from __future__ import annotations

import argparse
from typing import Any

from keras import losses
from tf_data import site_data
from tf_net import TFNet

# (1) import the Client API (and the Keras helpers of FedProx and SCAFFOLD)
import fedlift.client as flare
from fedlift.client.keras import FedProxCallback, TFScaffoldHelper, get_fedprox_mu

PATH = "./tf_model.weights.h5"
SCAFFOLD = flare.AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_train", type=int, default=None, help="use fewer train images")
    parser.add_argument("--max_test", type=int, default=None, help="use fewer test images")
    parser.add_argument(
        "--data_split",
        choices=["iid", "full"],
        default="iid",
        help="iid: each site trains on its own shard; full: every site on all",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.0, help="> 0: a Dirichlet(alpha) label skew"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="deterministic training (seed + site index)"
    )
    args = parser.parse_args()

    # (2) initialise the Client API
    flare.init()
    site = flare.system_info()  # this site's index among num_sites picks its part of the data
    if args.seed is not None:  # the same run twice gives the same model (benchmarks compare)
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(args.seed + site["site_index"])
        tf.config.experimental.enable_op_determinism()

    (train_images, train_labels), (test_images, test_labels) = site_data(
        site["site_index"],
        site["num_sites"],
        split=args.data_split,
        alpha=args.alpha,
        max_train=args.max_train,
        max_test=args.max_test,
    )
    # Normalize pixel values to be between 0 and 1
    train_images = train_images.astype("float32") / 255.0
    test_images = test_images.astype("float32") / 255.0

    model = TFNet(input_shape=(32, 32, 3))
    model.compile(
        optimizer="adam",
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.summary()
    scaffold = TFScaffoldHelper()  # SCAFFOLD: one helper for the whole job
    scaffold.init(model)

    while flare.is_running():
        # (3) receive the global model
        input_model = flare.receive()
        if input_model is None or input_model.params is None:  # no model: the job has ended
            break
        print(f"{site['site_name']}: round {input_model.current_round}")

        # (4) load the global weights, layer by layer
        for k, v in input_model.params.items():
            model.get_layer(k).set_weights(v)

        # (5) evaluate the global model, to report how it does on this site's test data
        _, test_global_acc = model.evaluate(test_images, test_labels, verbose=2)
        print(f"{site['site_name']}: accuracy of the received global model: {test_global_acc:.4f}")

        if flare.is_evaluate():  # the server's last task: evaluate the final model only
            flare.send(flare.FLModel(metrics={"accuracy": test_global_acc}))
            continue

        callbacks: list[Any] = []
        mu = get_fedprox_mu()  # FedProx: mu from the server, else 0
        if mu > 0:  # the proximal term's anchor: the global weights just loaded
            callbacks.append(FedProxCallback(mu))
        use_scaffold = SCAFFOLD in input_model.meta  # SCAFFOLD: the server's controls
        if use_scaffold:
            scaffold.load_global_controls(input_model.meta)
            callbacks.append(scaffold.callback())  # corrects every step, then computes c_i+
        print(f"{site['site_name']}: FedProx mu={mu:g}, SCAFFOLD: {use_scaffold}")

        model.fit(
            train_images,
            train_labels,
            epochs=args.epochs,
            batch_size=args.batch_size,
            validation_data=(test_images, test_labels),
            callbacks=callbacks,
            verbose=2,  # one line per epoch: the output is relayed into the job's logs
        )
        print("Finished Training")
        model.save_weights(PATH)

        meta: dict[str, Any] = {"NUM_STEPS_CURRENT_ROUND": len(train_images) * args.epochs}
        if use_scaffold:
            meta.update(scaffold.result_meta())  # SCAFFOLD: delta c_i for the server

        # (6) put the new weights and the metrics in an FLModel
        output_model = flare.FLModel(
            params={layer.name: layer.get_weights() for layer in model.layers},
            metrics={"accuracy": test_global_acc},
            meta=meta,
        )
        # (7) send it back to the server
        flare.send(output_model)


if __name__ == "__main__":
    main()
