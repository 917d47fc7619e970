# mypy: disable-error-code="union-attr, index, arg-type, operator"
# (for mypy --strict: as NVFlare's scripts, this one uses receive()'s model without a None
# check (receive() gives None only once the job has ended, which is_running() rules out), and
# NVFlare's params_type="FULL" strings are accepted by FLModel though its hint says ParamsType.)
"""hello-tf's client, written as NVFlare's hello-tf client is.

The same calls in the same order: init, system_info(), TFNet().build(...), compile, the
data split by site name (site-1 the first half, site-2 the second), the is_running/receive
loop, get_layer(k).set_weights(v) for every received layer, evaluate, fit, save_weights,
and an FLModel of {layer.name: layer.get_weights()} with params_type "FULL" and the round.
It never checks is_evaluate() (nor does NVFlare's).
Lines that differ from NVFlare's: the imports (nvflare -> fedlift; local_data) and the
data-loading line (mnist_load_data() instead of tf.keras.datasets.mnist.load_data()).
"""

import tensorflow as tf
from local_data import mnist_load_data
from tf_net import TFNet

import fedlift.client as flare

WEIGHTS_PATH = "./tf_model.weights.h5"


def main() -> None:
    flare.init()

    sys_info = flare.system_info()
    print(f"system info is: {sys_info}", flush=True)

    model = TFNet()
    model.build(input_shape=(None, 28, 28))
    model.compile(
        optimizer="adam",
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.summary()

    (train_images, train_labels), (test_images, test_labels) = mnist_load_data()
    train_images, test_images = train_images / 255.0, test_images / 255.0

    # each site trains on its half of the data
    client_name = sys_info["site_name"]
    half_train, half_test = len(train_images) // 2, len(test_images) // 2
    if client_name == "site-1":
        train_images, train_labels = train_images[:half_train], train_labels[:half_train]
        test_images, test_labels = test_images[:half_test], test_labels[:half_test]
    elif client_name == "site-2":
        train_images, train_labels = train_images[half_train:], train_labels[half_train:]
        test_images, test_labels = test_images[half_test:], test_labels[half_test:]

    while flare.is_running():
        input_model = flare.receive()
        print(f"current_round={input_model.current_round}")

        sys_info = flare.system_info()
        print(f"system info is: {sys_info}")

        for k, v in input_model.params.items():
            model.get_layer(k).set_weights(v)

        _, test_global_acc = model.evaluate(test_images, test_labels, verbose=2)
        print(f"round {input_model.current_round}: received model's accuracy {test_global_acc}")

        model.fit(train_images, train_labels, epochs=1, validation_data=(test_images, test_labels))
        print("Finished Training")

        model.save_weights(WEIGHTS_PATH)
        print(f"finished round: {input_model.current_round}", flush=True)

        output_model = flare.FLModel(
            params={layer.name: layer.get_weights() for layer in model.layers},
            params_type="FULL",
            metrics={"accuracy": test_global_acc},
            current_round=input_model.current_round,
        )
        flare.send(output_model)


if __name__ == "__main__":
    main()
