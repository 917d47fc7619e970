"""The CIFAR-10 example's network, as NVFlare's TFNet: the TensorFlow tutorial CNN, unbuilt.

No Input layer: the model is built later, by the client (model.build) and, on the server
side, from the input shape it keeps as ``self._input_shape`` (NVFlare's persistor does
that; so does fedlift's job).
"""

from tensorflow.keras import layers, models


class TFNet(models.Sequential):  # type: ignore[misc]  # keras ships no hints
    def __init__(self, input_shape: tuple[int | None, ...] = (None, 32, 32, 3)) -> None:
        super().__init__()
        self._input_shape = input_shape
        self.add(layers.Conv2D(32, (3, 3), activation="relu"))
        self.add(layers.MaxPooling2D((2, 2)))
        self.add(layers.Conv2D(64, (3, 3), activation="relu"))
        self.add(layers.MaxPooling2D((2, 2)))
        self.add(layers.Conv2D(64, (3, 3), activation="relu"))
        self.add(layers.Flatten())
        self.add(layers.Dense(64, activation="relu"))
        self.add(layers.Dense(10))
