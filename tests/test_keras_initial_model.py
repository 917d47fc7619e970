"""An unbuilt Keras model as ``initial_model``: built from its input shape as NVFlare's TF
persistor does, or refused at job build with a message that names ``model.build(...)``.

Before, such a model was exported without weights and every client failed in round 0
("set_weights ... a weight list of length 0")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from fedlift import FedAvgJob, ScriptRunner  # noqa: E402
from fedlift.errors import ConfigError  # noqa: E402
from fedlift.server import load_initial_model  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "nvflare_style_client.py"


class TFNet(keras.Sequential):  # type: ignore[misc]
    """As NVFlare's TF examples write their models: layers added in ``__init__``, no
    ``keras.Input``, and the input shape kept on the model for the server to build it."""

    def __init__(self, input_shape: Any = (None, 8, 8, 3)) -> None:
        super().__init__()
        self._input_shape = input_shape
        self.add(keras.layers.Conv2D(4, (3, 3), activation="relu", name="conv2d"))
        self.add(keras.layers.Flatten(name="flatten"))
        self.add(keras.layers.Dense(10, name="dense"))


class Net(keras.Sequential):  # type: ignore[misc]
    """NVFlare's hello-tf model: unbuilt and without an input shape."""

    def __init__(self) -> None:
        super().__init__()
        self.add(keras.layers.Dense(10, name="dense"))


def export(model: Any, tmp_path: Path) -> Path:
    job = FedAvgJob("keras-initial", 2, 1, model)
    job.to_clients(ScriptRunner(SCRIPT))
    return job.export_job(tmp_path) / "initial_model.keras"


def test_an_unbuilt_model_with_its_input_shape_is_built_and_exported_with_weights(
    tmp_path: Path,
) -> None:
    model = TFNet(input_shape=(None, 8, 8, 3))
    assert not model.built and model.get_weights() == []
    _, params = load_initial_model(export(model, tmp_path))
    assert model.built
    # 3x3 conv of 3 channels into 4; 8x8 -> 6x6 x 4 = 144 inputs of the dense layer
    shapes = {name: [w.shape for w in weights] for name, weights in params.items()}
    assert shapes == {"conv2d": [(3, 3, 3, 4), (4,)], "flatten": [], "dense": [(144, 10), (10,)]}
    for name, weights in params.items():  # the exported weights are the built model's
        for saved, built in zip(weights, model.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(saved, built)


def test_an_unbuilt_model_without_an_input_shape_is_refused_at_job_build() -> None:
    with pytest.raises(ConfigError) as info:
        FedAvgJob("hello-tf", 2, 1, Net())
    message = str(info.value)
    assert message.startswith("FedAvgJob(initial_model=...): the Keras model Net is not built")
    assert "model.build(input_shape=(None, ...))" in message
    assert "_input_shape" in message and "Received: an unbuilt Net" in message


def test_an_input_shape_the_model_cannot_take_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError) as info:
        FedAvgJob("bad-shape", 2, 1, TFNet(input_shape=(None, 8)))  # Conv2D needs 4-d input
    assert "building the Keras model TFNet with its _input_shape failed" in str(info.value)
    assert "Received: _input_shape=(None, 8)" in str(info.value)


def test_a_built_model_is_left_as_it_is(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    before = [w.copy() for w in model.get_weights()]
    _, params = load_initial_model(export(model, tmp_path))
    for saved, start in zip(params["d"], before, strict=True):
        np.testing.assert_array_equal(saved, start)
