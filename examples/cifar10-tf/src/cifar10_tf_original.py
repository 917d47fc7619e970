"""Centralised CIFAR-10 training: the script before it is turned into a federated one."""

from __future__ import annotations

import argparse

from cifar10_data import load_data
from keras import losses
from tf_net import TFNet

PATH = "./tf_model.weights.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_train", type=int, default=None, help="use fewer train images")
    parser.add_argument("--max_test", type=int, default=None, help="use fewer test images")
    args = parser.parse_args()

    (train_images, train_labels), (test_images, test_labels) = load_data(
        max_train=args.max_train, max_test=args.max_test
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

    model.fit(
        train_images,
        train_labels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_data=(test_images, test_labels),
    )
    print("Finished Training")

    test_loss, test_acc = model.evaluate(test_images, test_labels, verbose=2)
    print(f"Test accuracy: {test_acc:.4f} (loss {test_loss:.4f})")

    model.save_weights(PATH)
    print(f"Saved weights to {PATH}")


if __name__ == "__main__":
    main()
