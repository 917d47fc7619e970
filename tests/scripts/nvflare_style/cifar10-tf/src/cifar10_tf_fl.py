# mypy: disable-error-code="union-attr, index, arg-type, operator"
# (for mypy --strict: as NVFlare's scripts, this one uses receive()'s model without a None
# check (receive() gives None only once the job has ended, which is_running() rules out), and
# NVFlare's params_type="FULL" strings are accepted by FLModel though its hint says ParamsType.)
"""The CIFAR-10 example's client, written as NVFlare's cifar10_tf_fl.py is (the 7 marked
changes to its centralised script).

The same calls in the same order: the data, TFNet().build(input_shape=(None, 32, 32, 3)),
compile, init, the is_running/receive loop, get_layer(k).set_weights(v), evaluate the
received model, fit, save_weights, evaluate again, and an FLModel of
{layer.name: layer.get_weights()} with the received model's accuracy.
Lines that differ from NVFlare's: the imports (nvflare -> fedlift; keras' datasets ->
local_data) and the data-loading line (cifar10_load_data() instead of
datasets.cifar10.load_data()).
"""

import tensorflow as tf
from local_data import cifar10_load_data
from tf_net import TFNet

# (1) import the Client API
import fedlift.client as flare

PATH = "./tf_model.weights.h5"


def main() -> None:
    (train_images, train_labels), (test_images, test_labels) = cifar10_load_data()

    # Normalize pixel values to be between 0 and 1
    train_images, test_images = train_images / 255.0, test_images / 255.0

    model = TFNet()
    model.build(input_shape=(None, 32, 32, 3))
    model.compile(
        optimizer="adam",
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.summary()

    # (2) initialise the Client API
    flare.init()

    while flare.is_running():
        # (3) receive the global model
        input_model = flare.receive()
        print(f"current_round={input_model.current_round}")
        print(f"system info: {flare.system_info()}")

        # (4) load it, layer by layer
        for k, v in input_model.params.items():
            model.get_layer(k).set_weights(v)

        # (5) evaluate the received model
        _, test_global_acc = model.evaluate(test_images, test_labels, verbose=2)
        print(f"received model's accuracy on {len(test_images)} test images: {test_global_acc}")

        model.fit(train_images, train_labels, epochs=1, validation_data=(test_images, test_labels))
        print("Finished Training")
        model.save_weights(PATH)

        _, test_acc = model.evaluate(test_images, test_labels, verbose=2)
        print(f"trained model's accuracy on {len(test_images)} test images: {test_acc}")

        # (6) the trained weights, {layer name: layer weights}, and the metric
        output_model = flare.FLModel(
            params={layer.name: layer.get_weights() for layer in model.layers},
            metrics={"accuracy": test_global_acc},
        )
        # (7) send it back
        flare.send(output_model)


if __name__ == "__main__":
    main()
