"""Centralised CIFAR-10 training on several GPUs (tf.distribute.MirroredStrategy).

cifar10_tf_original.py with the model mirrored on every visible GPU. Without a GPU,
--cpu_replicas N (or env FEDLIFT_CPU_REPLICAS) splits the CPU into N logical devices, so
the same code path runs with N replicas anywhere.
"""

from __future__ import annotations

import argparse

from cifar10_data import load_data
from keras import losses
from multi_gpu import make_strategy
from tf_net import TFNet

PATH = "./tf_model.weights.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
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
    args = parser.parse_args()

    strategy = make_strategy(args.cpu_replicas)  # before any TensorFlow op
    print(f"Number of replicas in sync: {strategy.num_replicas_in_sync}")
    # Keras' batch_size is the global batch, split evenly across the replicas: scale it so
    # each replica still gets --batch_size images per step (and the step count shrinks).
    global_batch_size = args.batch_size * strategy.num_replicas_in_sync

    (train_images, train_labels), (test_images, test_labels) = load_data(
        max_train=args.max_train, max_test=args.max_test
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

    model.fit(
        train_images,
        train_labels,
        epochs=args.epochs,
        batch_size=global_batch_size,
        validation_data=(test_images, test_labels),
    )
    print("Finished Training")

    test_loss, test_acc = model.evaluate(
        test_images, test_labels, batch_size=global_batch_size, verbose=2
    )
    print(f"Test accuracy: {test_acc:.4f} (loss {test_loss:.4f})")

    model.save_weights(PATH)
    print(f"Saved weights to {PATH}")


if __name__ == "__main__":
    main()
