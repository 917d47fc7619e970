"""NVFlare's example scripts run under fedlift with only their imports and data loading
changed (issue 12, "NVFlare's scripts").

tests/scripts/nvflare_style/ holds scripts written in the style of NVFlare's hello-numpy,
hello-pt, hello-tf and hello-lightning and of its TF CIFAR-10 example (the one
examples/cifar10-tf mirrors): the same calls in the same structure, ``nvflare`` changed to
``fedlift`` in the imports, and the download replaced by one call into local_data.py (the
embedded Fashion-MNIST subset, shaped as MNIST or CIFAR-10). Each test runs the job script
as a user does, ``python job.py`` in its folder, with the workspace in tmp_path, and checks
that the job finished, produced a global model and (with 2 rounds) learned: round 2's
metric is that of the global model after round 1, round 1's that of the initial model.

Each test's comment lists the lines that differ from NVFlare's. Beyond the import swap the
only other line in the job scripts is WORKDIR (and JOB_ROOT), read from the environment
so that the workspace lies in tmp_path instead of /tmp/nvflare/jobs/.

The runs use one compute thread per process (OMP_NUM_THREADS=1 and TensorFlow's): two
clients on a 2-core machine otherwise spin against each other (an epoch of hello-pt took
10x longer). The full TensorFlow, Lightning and external-process runs are slow; their CI
forms check the same job scripts without starting the simulator.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from fedlift import FedAvgJob, FrameworkType, ScriptRunner
from fedlift.errors import ConfigError
from fedlift.model import NUMPY_KEY, NPConstants, load_safetensors

STYLE = Path(__file__).resolve().parent / "scripts" / "nvflare_style"


def run_job(
    folder: str,
    script: str,
    *args: str,
    workdir: Path,
    train_size: int = 400,
    test_size: int = 200,
    job_root: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python SCRIPT ARGS`` in the example's folder, as a user runs it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STYLE), env.get("PYTHONPATH")) if p)
    env.update(
        NVSTYLE_WORKDIR=str(workdir),
        NVSTYLE_JOB_ROOT=str(job_root or workdir / "job_config"),
        NVSTYLE_TRAIN_SIZE=str(train_size),
        NVSTYLE_TEST_SIZE=str(test_size),
        PYTHONDONTWRITEBYTECODE="1",  # nothing written into the repository's folders
        OMP_NUM_THREADS="1",
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=STYLE / folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def finished(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "fedlift: job finished" in done.stdout + done.stderr


def rounds(workdir: Path) -> list[dict[str, Any]]:
    lines = (workdir / "server" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def job_config(workdir: Path, name: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((workdir / "jobs" / name / "job.json").read_text())
    return config


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- hello-numpy
# Lines that differ from NVFlare's hello-numpy client.py:
#   import nvflare.client as flare                       -> import fedlift.client as flare
#   from nvflare.client.tracking import SummaryWriter    -> from fedlift.client.tracking ...
#   from nvflare.app_common.np.constants import NPConstants -> from fedlift.model import ...
# (no data to load). job.py: NVFlare's hello-numpy job is a recipe (NumpyFedAvgRecipe,
# nvflare.recipe.SimEnv); this one is a FedAvgJob script as NVFlare writes them, whose
# lines differ in the import (nvflare -> fedlift) and WORKDIR.


@pytest.mark.parametrize("update_type", ["full", "diff"])
def test_hello_numpy_trains_the_nested_list_model_once_per_round(
    tmp_path: Path, update_type: str
) -> None:
    done = run_job("hello-numpy", "job.py", "--update_type", update_type, workdir=tmp_path)
    finished(done)
    records = rounds(tmp_path)
    # No final validate task (opt-in, as NVFlare): the script, which never checks
    # is_evaluate(), trains exactly num_rounds=3 times.
    assert [r["task"] for r in records] == ["train"] * 3
    # Each round both sites add 1 to the global model; the initial [[1..9]] has mean 5,
    # so the sites report 6, 7, 8 (the mean of what they trained).
    assert [r["metrics"]["weight_mean"] for r in records] == [6.0, 7.0, 8.0]
    final = load_safetensors(tmp_path / "server" / "models" / "global_model.safetensors")
    expected = np.array([[4, 5, 6], [7, 8, 9], [10, 11, 12]], np.float32)  # 1..9 plus 3
    np.testing.assert_array_equal(final[NUMPY_KEY], expected)
    assert final[NUMPY_KEY].dtype == np.float32
    assert job_config(tmp_path, "hello-numpy")["runner"]["framework"] == "numpy"
    # SummaryWriter's weight_mean went to the server, per site
    for site in ("site-1", "site-2"):
        assert list((tmp_path / "server" / "tensorboard" / site).glob("events.out.tfevents.*"))


def test_np_constants_is_nvflares_numpy_key() -> None:
    assert NPConstants.NUMPY_KEY == NUMPY_KEY == "numpy_key"


# ---------------------------------------------------------------- hello-pt
# Lines that differ from NVFlare's hello-pt (fedavg_script_runner_pt.py and
# src/hello-pt_cifar10_fl.py):
#   job.py:  from nvflare.app_opt.pt.job_config.fed_avg import FedAvgJob
#            from nvflare.job_config.script_runner import ScriptRunner
#                                       -> from fedlift import FedAvgJob, ScriptRunner
#            WORKDIR                    (the test's workspace)
#   client:  import nvflare.client as flare -> import fedlift.client as flare
#            from nvflare.client.tracking import SummaryWriter -> from fedlift.client.tracking
#            from torchvision.datasets import CIFAR10 (and torchvision's transforms)
#                                       -> from local_data import cifar10_dataset
#            CIFAR10(root=..., transform=..., download=True, train=True)
#                                       -> cifar10_dataset(train=True) (and the test set)


def test_hello_pt_runs_and_learns(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    done = run_job("hello-pt", "job.py", workdir=tmp_path)
    finished(done)
    records = rounds(tmp_path)
    assert [r["task"] for r in records] == ["train", "train"]
    first, second = (r["metrics"]["accuracy"] for r in records)  # percent, as NVFlare's
    assert second > first + 10.0, records
    # ScriptRunner without a framework: PyTorch for a torch initial model, as NVFlare
    assert job_config(tmp_path, "hello-pt_cifar10_fedavg")["runner"]["framework"] == "pytorch"
    final = load_safetensors(tmp_path / "server" / "models" / "global_model.safetensors")
    network = load_module(STYLE / "hello-pt" / "src" / "simple_network.py", "nv_simple_network")
    assert list(final) == list(network.SimpleNetwork().state_dict())
    for site in ("site-1", "site-2"):
        assert (tmp_path / site / "cifar_net.pth").is_file()  # the script's torch.save
        assert list((tmp_path / "server" / "tensorboard" / site).glob("events.out.tfevents.*"))


# ---------------------------------------------------------------- hello-tf
# Lines that differ from NVFlare's hello-tf (fedavg_script_runner_tf.py and
# src/hello-tf_fl.py):
#   job.py:  from nvflare.app_opt.tf.job_config.fed_avg import FedAvgJob
#            from nvflare.job_config.script_runner import FrameworkType, ScriptRunner
#                                       -> from fedlift import FedAvgJob, FrameworkType, ...
#            WORKDIR                    (the test's workspace)
#   client:  import nvflare.client as flare -> import fedlift.client as flare
#            (+ from local_data import mnist_load_data)
#            tf.keras.datasets.mnist.load_data() -> mnist_load_data()


@pytest.mark.slow
def test_hello_tf_runs_and_learns(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    done = run_job("hello-tf", "job.py", workdir=tmp_path, train_size=1000)
    finished(done)
    records = rounds(tmp_path)
    assert [r["task"] for r in records] == ["train", "train"]
    first, second = (r["metrics"]["accuracy"] for r in records)
    assert second > first + 0.2, records
    assert (tmp_path / "server" / "models" / "global_model.weights.h5").is_file()
    assert job_config(tmp_path, "hello-tf_fedavg")["runner"]["framework"] == "tensorflow"
    for site in ("site-1", "site-2"):
        assert (tmp_path / site / "tf_model.weights.h5").is_file()  # the script's save


def tf_net(folder: str) -> Any:
    """The TFNet class of an NVFlare-style example (its src/tf_net.py)."""
    return load_module(STYLE / folder / "src" / "tf_net.py", f"nv_{folder}_tf_net").TFNet


def test_hello_tf_job_builds_its_unbuilt_tfnet_and_sends_it_to_every_site(
    tmp_path: Path,
) -> None:
    """The reduced form of the run above: hello-tf's job, as its script builds it. Its
    TFNet() is unbuilt (no Input layer) but keeps _input_shape=(None, 28, 28): the job
    builds it, as NVFlare's persistor does, so that the clients get real weights."""
    pytest.importorskip("tensorflow")
    model = tf_net("hello-tf")()
    assert not model.built
    job = FedAvgJob(name="hello-tf_fedavg", n_clients=2, num_rounds=2, initial_model=model)
    assert model.built
    assert [w.shape for w in model.get_weights()] == [(784, 128), (128,), (128, 10), (10,)]
    for i in range(2):
        runner = ScriptRunner(
            script=STYLE / "hello-tf" / "src" / "hello-tf_fl.py",
            script_args="",
            framework=FrameworkType.TENSORFLOW,
        )
        job.to(runner, f"site-{i + 1}")
    folder = job.export_job(tmp_path)
    config = json.loads((folder / "job.json").read_text())
    assert config["runner"]["framework"] == "tensorflow"
    assert config["runner"]["script"] == "hello-tf_fl.py"
    assert (folder / "initial_model.keras").is_file()
    params = load_safetensors(folder / "initial_model.params.safetensors")
    names = [layer.name for layer in model.layers]
    # {layer name: [weights]} of every layer (Flatten and Dropout: []): what the script's
    # get_layer(k).set_weights(v) loads
    assert list(params) == names
    assert [len(params[name]) for name in names] == [0, 2, 0, 2]


def test_an_unbuilt_net_without_an_input_shape_is_refused_naming_model_build() -> None:
    """hello-tf's Net with its ``self._input_shape = ...`` line removed: nothing tells the
    job the input's shape, so it cannot make the weights the clients would load."""
    pytest.importorskip("tensorflow")
    from tensorflow.keras import layers, models

    class Net(models.Sequential):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.add(layers.Flatten())
            self.add(layers.Dense(128, activation="relu"))
            self.add(layers.Dropout(0.2))
            self.add(layers.Dense(10))

    with pytest.raises(ConfigError) as info:
        FedAvgJob(name="hello-tf_fedavg", n_clients=2, num_rounds=2, initial_model=Net())
    message = str(info.value)
    assert "FedAvgJob(initial_model=...)" in message and "not built" in message
    assert "model.build(input_shape=(None, ...))" in message
    assert "Received: an unbuilt Net without _input_shape" in message


# ---------------------------------------------------------------- hello-lightning
# Lines that differ from NVFlare's hello-lightning (client.py, model.py):
#   client:  import nvflare.client.lightning as flare -> import fedlift.client.lightning as flare
#            import torchvision / torchvision.transforms -> from local_data import cifar10_dataset
#            the data module's data-loading lines: torchvision.datasets.CIFAR10(root=...,
#            train=..., download=..., transform=transform) -> cifar10_dataset(train=...);
#            no transform and no download in prepare_data (the local data is normalised)
#   model.py: none.
#   job.py:  NVFlare's is a recipe (FedAvgRecipe(model=LitNet(), key_metric="val_acc_epoch"),
#            nvflare.recipe.SimEnv); this one is a FedAvgJob script as NVFlare writes them,
#            whose lines differ in the import (nvflare -> fedlift) and WORKDIR.


@pytest.mark.slow
def test_hello_lightning_runs_and_learns(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    pytest.importorskip("torchmetrics")
    done = run_job("hello-lightning", "job.py", workdir=tmp_path, train_size=2000)
    finished(done)
    records = rounds(tmp_path)
    assert [r["task"] for r in records] == ["train", "train"]
    first, second = (r["metrics"]["val_acc_epoch"] for r in records)
    assert second > first + 0.05, records
    assert (tmp_path / "server" / "models" / "global_model.safetensors").is_file()
    # trainer.test/predict(ckpt_path="best") after every fit: each round's fit checkpointed
    assert done.stdout.count("--- prediction with new best model ---") == 4
    for site in ("site-1", "site-2"):
        assert list((tmp_path / site / "lightning_logs").rglob("*.ckpt"))


def test_hello_lightning_job_exports_the_litnet_state_dict(tmp_path: Path) -> None:
    """The reduced form of the run above: hello-lightning's job as its script builds it
    (LitNet() as the initial model, NVFlare's default framework, key metric
    val_acc_epoch)."""
    pytest.importorskip("pytorch_lightning")
    pytest.importorskip("torchmetrics")
    model = load_module(STYLE / "hello-lightning" / "model.py", "nv_lightning_model").LitNet()
    job = FedAvgJob(
        name="hello-lightning_fedavg",
        n_clients=2,
        num_rounds=2,
        initial_model=model,
        key_metric="val_acc_epoch",
    )
    for i in range(2):
        job.to(ScriptRunner(script=STYLE / "hello-lightning" / "client.py"), f"site-{i + 1}")
    folder = job.export_job(tmp_path)
    config = json.loads((folder / "job.json").read_text())
    assert config["runner"]["framework"] == "pytorch"
    assert config["workflow"]["key_metric"] == "val_acc_epoch"
    params = load_safetensors(folder / "initial_model.safetensors")
    assert list(params) == list(model.state_dict())  # what load_state_dict takes


# ---------------------------------------------------------------- the TF CIFAR-10 example
# Lines that differ from NVFlare's (tf_client_api_job.py, src/cifar10_tf_fl.py,
# src/cifar10_tf_multi_gpu_fl.py; src/tf_net.py: none):
#   job:     from nvflare.app_opt.tf.job_config.fed_avg import FedAvgJob
#            from nvflare.job_config.script_runner import FrameworkType, ScriptRunner
#                                       -> from fedlift import FedAvgJob, FrameworkType, ...
#            JOB_ROOT, WORKDIR          (the test's folders)
#   clients: import nvflare.client as flare -> import fedlift.client as flare
#            from tensorflow.keras import datasets -> from local_data import cifar10_load_data
#            datasets.cifar10.load_data() -> cifar10_load_data()


@pytest.mark.slow  # CI: test_cifar10_tf_job_builds_tfnet_from_its_input_shape
def test_cifar10_tf_job_runs_and_learns(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    done = run_job("cifar10-tf", "tf_client_api_job.py", "--num_rounds", "2", workdir=tmp_path)
    finished(done)
    records = rounds(tmp_path)
    assert [r["task"] for r in records] == ["train", "train"]
    first, second = (r["metrics"]["accuracy"] for r in records)
    assert second > first + 0.1, records
    assert (tmp_path / "server" / "models" / "global_model.weights.h5").is_file()
    config = job_config(tmp_path, "tf_client_api")
    assert config["runner"]["framework"] == "tensorflow"
    assert config["runner"]["launch_external_process"] is False


@pytest.mark.slow
def test_cifar10_tf_multi_gpu_script_runs_as_an_external_process(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    done = run_job(
        "cifar10-tf",
        "tf_client_api_job.py",
        "--num_rounds",
        "2",
        "--launch_process",
        "--script",
        "src/cifar10_tf_multi_gpu_fl.py",
        workdir=tmp_path,
    )
    finished(done)
    records = rounds(tmp_path)
    first, second = (r["metrics"]["accuracy"] for r in records)
    assert second > first + 0.1, records
    assert "Number of devices: 1" in done.stdout  # MirroredStrategy on the CPU
    config = job_config(tmp_path, "tf_client_api")
    assert config["runner"]["launch_external_process"] is True
    assert config["runner"]["script"] == "cifar10_tf_multi_gpu_fl.py"


def test_cifar10_tf_job_builds_tfnet_from_its_input_shape(tmp_path: Path) -> None:
    """The reduced form of the external-process run: the job the script makes with
    --launch_process and the multi-GPU script. TFNet(input_shape=(None, 32, 32, 3)) is
    unbuilt; the job builds it from that shape (the conv stack's weights)."""
    pytest.importorskip("tensorflow")
    model = tf_net("cifar10-tf")(input_shape=(None, 32, 32, 3))
    job = FedAvgJob(name="tf_client_api", n_clients=2, num_rounds=5, initial_model=model)
    runner = ScriptRunner(
        script=STYLE / "cifar10-tf" / "src" / "cifar10_tf_multi_gpu_fl.py",
        launch_external_process=True,
        framework=FrameworkType.TENSORFLOW,
    )
    job.to_clients(runner)
    folder = job.export_job(tmp_path)
    shapes = [w.shape for w in model.get_weights()]
    # 3x3 convs 3->32->64->64 on 32x32 -> 30, 15, 13, 6, 4: Dense(4*4*64=1024 -> 64 -> 10)
    assert shapes == [
        (3, 3, 3, 32),
        (32,),
        (3, 3, 32, 64),
        (64,),
        (3, 3, 64, 64),
        (64,),
        (1024, 64),
        (64,),
        (64, 10),
        (10,),
    ]
    config = json.loads((folder / "job.json").read_text())
    assert config["runner"]["launch_external_process"] is True
    assert config["runner"]["framework"] == "tensorflow"
    assert (folder / "app" / "tf_net.py").is_file()


# ---------------------------------------------------------------- job.to(runner, site)


def numpy_job(n_clients: int = 2) -> FedAvgJob:
    return FedAvgJob(name="nv-to", n_clients=n_clients, num_rounds=1, initial_model=[1.0, 2.0])


def runner(script_args: str = "") -> ScriptRunner:
    return ScriptRunner(
        script=STYLE / "hello-numpy" / "client.py",
        script_args=script_args,
        framework=FrameworkType.NUMPY,
    )


def test_to_every_site_is_to_clients(tmp_path: Path) -> None:
    job = numpy_job(3)
    for i in range(3):
        job.to(runner(), f"site-{i + 1}")  # a new, equal runner per site, as NVFlare's loop
    config = json.loads((job.export_job(tmp_path) / "job.json").read_text())
    assert config["runner"]["script"] == "client.py"
    assert config["runner"]["framework"] == "numpy"


def test_to_refuses_a_different_runner_for_another_site() -> None:
    job = numpy_job()
    job.to(runner(), "site-1")
    with pytest.raises(ConfigError, match="one ScriptRunner on every site") as info:
        job.to(runner("--update_type diff"), "site-2")
    assert "site-2 got a different one" in str(info.value)


def test_export_refuses_a_site_to_left_without_a_runner(tmp_path: Path) -> None:
    job = numpy_job(3)
    job.to(runner(), "site-1")
    job.to(runner(), "site-3")
    with pytest.raises(ConfigError, match=r"none for \['site-2'\]") as info:
        job.export_job(tmp_path)
    assert "Received: to() for ['site-1', 'site-3']" in str(info.value)
    job.to_clients(runner())  # all sites: the to() calls are superseded
    job.to(runner(), "site-1")  # after to_clients(): still every site
    assert (job.export_job(tmp_path) / "job.json").is_file()


@pytest.mark.parametrize("target", ["site-0", "site-3", "server", "hospital-a"])
def test_to_takes_only_the_jobs_site_names(target: str) -> None:
    with pytest.raises(ConfigError, match="site-1 ... site-2") as info:
        numpy_job().to(runner(), target)
    assert f"Received: target={target!r}" in str(info.value)


def test_to_sends_only_script_runners() -> None:
    with pytest.raises(ConfigError, match=r"initial_model=\.\.\., strategy=\.\.\.") as info:
        numpy_job().to([1.0, 2.0], "server")  # type: ignore[arg-type]
    assert "Received: list for target='server'" in str(info.value)
