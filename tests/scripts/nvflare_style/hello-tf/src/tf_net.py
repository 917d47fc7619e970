"""hello-tf's network, as NVFlare's TFNet: a Sequential MLP for 28x28 images, unbuilt.

It keeps its input shape as ``self._input_shape`` (NVFlare's TF models do, for the
server's persistor, which builds the model from it); the client builds it itself.
"""

from tensorflow.keras import layers, models


class TFNet(models.Sequential):  # type: ignore[misc]  # keras ships no hints
    def __init__(self, input_shape: tuple[int | None, ...] = (None, 28, 28)) -> None:
        super().__init__()
        self._input_shape = input_shape
        self.add(layers.Flatten())
        self.add(layers.Dense(128, activation="relu"))
        self.add(layers.Dropout(0.2))
        self.add(layers.Dense(10))
