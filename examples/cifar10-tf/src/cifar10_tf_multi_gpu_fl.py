"""Federated CIFAR-10 training on several GPUs: cifar10_tf_multi_gpu_original.py plus the 7
Client API changes (the same ones as cifar10_tf_fl.py).

Each change is marked with its number; everything else is the multi-GPU centralised script.
Run it in its own process (ScriptRunner(..., launch_external_process=True), i.e.
tf_client_api_job.py --launch_process), so TensorFlow's devices are still unset when
make_strategy() runs.
"""

from __future__ import annotations

import argparse

from cifar10_data import load_data
from keras import losses
from multi_gpu import make_strategy
from tf_net import TFNet

# (1) import the Client API
import fedlift.client as flare

PATH = "./tf_model.weights.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch_size", type=int, default=64, help="per replica")
    parser.add_argument("--max_train", type=int, default=None, help="use fewer train images")
    parser.add_argument("--max_test", type=int, default=None, help="use fewer test images")
    parser.add_argument(
        "--cpu_replicas",
        type=int,
        default=None,
        help="with no GPU: split the CPU into this many replicas (default: "
        "$FEDLIFT_CPU_REPLICAS, else 0 = one replica)",
    )
    parser.add_argument(
        "--data_split",
        choices=["iid", "full"],
        default="iid",
        help="iid: each site trains on its own shard; full: every site on all",
    )
    args = parser.parse_args()

    strategy = make_strategy(args.cpu_replicas)  # before any TensorFlow op
    print(f"Number of replicas in sync: {strategy.num_replicas_in_sync}")
    # Keras' batch_size is the global batch, split evenly across the replicas: scale it so
    # each replica still gets --batch_size images per step (and the step count shrinks).
    global_batch_size = args.batch_size * strategy.num_replicas_in_sync

    # (2) initialise the Client API
    flare.init()
    site = flare.system_info()  # this site's index among num_sites picks its shard of the data

    (train_images, train_labels), (test_images, test_labels) = load_data(
        shard=(site["site_index"], site["num_sites"]),
        split=args.data_split,
        max_train=args.max_train,
        max_test=args.max_test,
    )
    # Normalize pixel values to be between 0 and 1
    train_images = train_images.astype("float32") / 255.0
    test_images = test_images.astype("float32") / 255.0

    with strategy.scope():  # variables created here are mirrored on every replica
        model = TFNet(input_shape=(32, 32, 3))
        model.compile(
            optimizer="adam",
            loss=losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    model.summary()

    while flare.is_running():
        # (3) receive the global model
        input_model = flare.receive()
        print(f"{site['site_name']}: round {input_model.current_round}")

        # (4) load the global weights, layer by layer (outside the scope is fine: assigning
        # a mirrored variable from the cross-replica context updates every replica's copy)
        for k, v in input_model.params.items():
            model.get_layer(k).set_weights(v)

        # (5) evaluate the global model, to report how it does on this site's test data
        _, test_global_acc = model.evaluate(
            test_images, test_labels, batch_size=global_batch_size, verbose=2
        )
        print(f"{site['site_name']}: accuracy of the received global model: {test_global_acc:.4f}")

        if flare.is_evaluate():  # the server's last task: evaluate the final model only
            flare.send(flare.FLModel(metrics={"accuracy": test_global_acc}))
            continue

        model.fit(
            train_images,
            train_labels,
            epochs=args.epochs,
            batch_size=global_batch_size,
            validation_data=(test_images, test_labels),
            verbose=2,  # one line per epoch: the output is relayed into the job's logs
        )
        print("Finished Training")
        model.save_weights(PATH)

        # (6) put the new weights and the metrics in an FLModel
        output_model = flare.FLModel(
            params={layer.name: layer.get_weights() for layer in model.layers},
            metrics={"accuracy": test_global_acc},
            meta={"NUM_STEPS_CURRENT_ROUND": len(train_images) * args.epochs},
        )
        # (7) send it back to the server
        flare.send(output_model)


if __name__ == "__main__":
    main()
