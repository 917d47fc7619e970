"""PyTorch params through fedlift, without a job: tensors <-> arrays without needless copies,
the Client API's conversions (``framework="pytorch"`` receives tensors; ``send()`` takes a
``state_dict()``), bfloat16 on the wire, in files and in the server's maths, and
``nn.Module`` initial models."""

from __future__ import annotations

import json
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")

import torch

import fedlift.client as flare
from conftest import SCRIPTS
from fedlift import FedAvgJob, ScriptRunner
from fedlift.client._api import _reset_for_tests
from fedlift.client._link import ClientContext, LocalLink, Task, set_current_link
from fedlift.codec import PREFIX_BYTES, Message, decode, encode, model_from_wire, model_to_wire
from fedlift.errors import ClientAPIError, ConfigError, InvalidResultError
from fedlift.model import (
    FLModel,
    ParamsType,
    arrays_to_tensors,
    load_safetensors,
    save_safetensors,
    tensors_to_arrays,
    torch_params,
)
from fedlift.server import (
    Aggregate,
    ArraysFormat,
    FedAvgM,
    Scaffold,
    StreamingMean,
    apply_in_place,
    apply_update,
    load_initial_model,
)
from fedlift.server._aggregate import check_result

sys.path.insert(0, str(SCRIPTS))
from torch_common import Net

BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16(values: list[float]) -> np.ndarray:
    return np.array(values, np.float32).astype(BF16)


def off_the_wire(model: FLModel) -> FLModel:
    """``model`` as a site receives it: encoded, copied into a receive buffer, decoded."""
    fields, arrays = model_to_wire(model)
    message = decode(encode(Message("task", {"model": fields}, arrays)).tobytearray())
    return model_from_wire(message.fields["model"], list(message.arrays))


# ------------------------------------------------------------------ tensors -> arrays


def test_cpu_tensors_become_views_of_their_own_memory() -> None:
    net = Net()
    state = net.state_dict()
    arrays = tensors_to_arrays(state)
    assert list(arrays) == list(state)  # keys and order of the state_dict
    for key, tensor in state.items():
        assert isinstance(arrays[key], np.ndarray)
        assert arrays[key].ctypes.data == tensor.data_ptr(), key  # no copy at all
    assert arrays["bn.num_batches_tracked"].dtype == np.int64
    assert arrays["bn.num_batches_tracked"].shape == ()


def test_gradients_are_detached_and_dtypes_kept() -> None:
    weight = torch.nn.Parameter(torch.tensor([1.5, -2.0]))  # requires_grad: .numpy() refuses
    half = torch.tensor([0.5, 3.0], dtype=torch.float16)
    brain = torch.tensor([1.0, -0.0078125, 2.5], dtype=torch.bfloat16)
    count = torch.tensor(7, dtype=torch.int64)
    out = tensors_to_arrays({"w": weight, "h": half, "b": brain, "n": count})
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [1.5, -2.0]
    assert out["h"].dtype == np.float16 and out["h"].tolist() == [0.5, 3.0]
    assert out["b"].dtype == BF16
    assert out["b"].astype(np.float32).tolist() == [1.0, -0.0078125, 2.5]
    np.testing.assert_array_equal(out["b"].view(np.int16), brain.view(torch.int16).numpy())
    assert out["n"].dtype == np.int64 and int(out["n"]) == 7


def test_a_strided_tensor_is_copied_once_by_the_wire() -> None:
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    out = tensors_to_arrays({"t": base.t()})  # a view: no copy yet
    assert out["t"].ctypes.data == base.data_ptr() and not out["t"].flags.c_contiguous
    (back,) = decode(encode(Message("x", {}, [out["t"]])).tobytearray()).arrays
    np.testing.assert_array_equal(back, [[0, 3], [1, 4], [2, 5]])


def test_tensors_the_wire_cannot_carry_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"cannot be sent.*cast it"):
        tensors_to_arrays({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)})
    sparse = torch.eye(2).to_sparse()
    with pytest.raises(ConfigError, match=r"to_dense\(\)"):
        tensors_to_arrays({"s": sparse})


def test_a_tree_without_tensors_is_returned_as_it_is() -> None:
    tree = {"w": np.ones(2), "l": [np.zeros(1)], "t": (np.ones(1),)}
    assert tensors_to_arrays(tree) is tree
    mixed = tensors_to_arrays({"l": (torch.ones(1), np.zeros(1)), "k": 3})
    assert isinstance(mixed["l"], list) and mixed["k"] == 3
    assert all(isinstance(a, np.ndarray) for a in mixed["l"])


def test_torch_params_refuses_a_model_without_state() -> None:
    with pytest.raises(ConfigError, match=r"empty state_dict\(\)"):
        torch_params(torch.nn.ReLU())


# ------------------------------------------------------------------ arrays -> tensors


def test_received_arrays_become_tensors_on_the_same_memory() -> None:
    received = off_the_wire(
        FLModel(
            params={
                "w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
                "b": bf16([0.5, -1.0]),
                "n": np.array(3, np.int64),
                "u": np.array([1, 2], np.uint16),
            }
        )
    )
    arrays = received.params
    assert all(a.flags.writeable for a in arrays.values())  # a private receive buffer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" warning would fail here
        tensors = arrays_to_tensors(arrays)
    for key, tensor in tensors.items():
        assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"
        assert tensor.data_ptr() == arrays[key].ctypes.data, key  # a view, no copy
    assert tensors["b"].dtype == torch.bfloat16 and tensors["b"].tolist() == [0.5, -1.0]
    assert tensors["n"].dtype == torch.int64 and tensors["n"].shape == ()
    assert tensors["u"].dtype == torch.uint16
    tensors["w"][0, 0] = 9.0  # writable: it changes this site's received copy
    assert arrays["w"][0, 0] == 9.0


def test_read_only_arrays_are_copied_not_shared() -> None:
    frozen = np.array([1.0, 2.0], np.float32)
    frozen.flags.writeable = False
    swapped = np.array([1.0, 2.0], ">f4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors = arrays_to_tensors({"r": frozen, "s": swapped, "keep": "text"})
    assert tensors["r"].data_ptr() != frozen.ctypes.data and tensors["r"].tolist() == [1.0, 2.0]
    assert tensors["s"].tolist() == [1.0, 2.0] and tensors["keep"] == "text"
    tensors["r"][0] = 5.0
    assert frozen[0] == 1.0


# ------------------------------------------------------------------ the Client API


def _site(framework: str | None) -> LocalLink:
    runner = {"script": "train.py"} if framework is None else {"framework": framework}
    return LocalLink(ClientContext("job-1", "site-1", 0, 1, {"runner": runner}))


@pytest.fixture
def pytorch_site(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalLink]:
    monkeypatch.delenv("RANK", raising=False)
    _reset_for_tests()
    link = _site("pytorch")
    set_current_link(link)
    flare.init()
    yield link
    link.stop()
    set_current_link(None)
    _reset_for_tests()


def test_pytorch_scripts_receive_cpu_tensors_that_view_the_received_buffers(
    pytorch_site: LocalLink,
) -> None:
    layer = torch.nn.Linear(2, 2)
    task = Task("t0", "train", off_the_wire(FLModel(params=torch_params(layer), current_round=0)))
    pytorch_site.offer(task)
    model = flare.receive()
    assert model is not None and model is flare.receive()  # the same model until send()
    for key, tensor in model.params.items():
        assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"
        assert tensor.data_ptr() == task.model.params[key].ctypes.data  # no copy
    assert isinstance(task.model.params["weight"], np.ndarray)  # the worker's task: arrays
    fresh = torch.nn.Linear(2, 2)
    fresh.load_state_dict(model.params)  # what NVFlare's hello-pt does
    assert torch.equal(fresh.weight, layer.weight)


class _Answer(threading.Thread):
    """The worker's side: waits for the script's result to ``task_id``."""

    def __init__(self, link: LocalLink, task_id: str) -> None:
        super().__init__(daemon=True)
        self.link, self.task_id = link, task_id
        self.result: FLModel | None = None
        self.start()

    def run(self) -> None:
        self.result = self.link.wait_result(self.task_id)

    def get(self) -> FLModel:
        self.join(10)
        assert self.result is not None, "the script's send() reached no worker"
        return self.result


def test_numpy_scripts_receive_arrays_and_may_send_tensors() -> None:
    _reset_for_tests()
    link = _site("numpy")
    set_current_link(link)
    try:
        flare.init()
        link.offer(Task("t0", "train", FLModel(params={"w": np.ones(2)}, current_round=0)))
        model = flare.receive()
        assert model is not None and isinstance(model.params["w"], np.ndarray)
        answer = _Answer(link, "t0")
        flare.send(flare.FLModel(params={"w": torch.tensor([2.0, 3.0], dtype=torch.float16)}))
        sent = answer.get().params["w"]
        assert isinstance(sent, np.ndarray) and sent.dtype == np.float16
        assert sent.tolist() == [2.0, 3.0]
    finally:
        link.stop()
        set_current_link(None)
        _reset_for_tests()


def test_send_takes_a_state_dict_and_copies_nothing_on_the_cpu(pytorch_site: LocalLink) -> None:
    net = Net()
    pytorch_site.offer(Task("t0", "train", off_the_wire(FLModel(params=torch_params(net)))))
    received = flare.receive()
    assert received is not None
    net.load_state_dict(received.params)
    control = torch.full((2,), 0.25, dtype=torch.bfloat16)
    script_model = flare.FLModel(
        params=net.state_dict(),
        metrics={"loss": torch.tensor(0.5)},
        meta={"c": {"w": control}, "NUM_STEPS_CURRENT_ROUND": 4},
    )
    answer = _Answer(pytorch_site, "t0")
    flare.send(script_model)
    got = answer.get()
    for key, tensor in net.state_dict().items():
        assert isinstance(got.params[key], np.ndarray)
        assert got.params[key].ctypes.data == tensor.data_ptr(), key  # read where it lies
    assert got.params["bn.num_batches_tracked"].dtype == np.int64
    assert got.meta["c"]["w"].dtype == BF16 and got.meta["c"]["w"].tolist() == [0.25, 0.25]
    assert got.metrics == {"loss": 0.5}
    assert isinstance(script_model.params["fc1.weight"], torch.Tensor)  # the script's: as it was
    # and the worker can send it: every leaf is an array of an allowed dtype
    back = off_the_wire(got)
    assert back.meta["c"]["w"].dtype == BF16
    np.testing.assert_array_equal(back.params["fc2.bias"], net.fc2.bias.detach().numpy())


def test_a_diff_of_tensors_is_sent_as_arrays(pytorch_site: LocalLink) -> None:
    start = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}
    pytorch_site.offer(Task("t0", "train", off_the_wire(FLModel(params=start))))
    received = flare.receive()
    assert received is not None
    trained = {"w": received.params["w"] + 0.5, "n": received.params["n"] + 2}
    diff = {key: trained[key] - received.params[key] for key in trained}
    answer = _Answer(pytorch_site, "t0")
    flare.send(flare.FLModel(params_type=flare.ParamsType.DIFF, params=diff))
    got = answer.get()
    assert got.params_type == ParamsType.DIFF
    assert got.params["w"].tolist() == [0.5, 0.5] and int(got.params["n"]) == 2
    assert got.params["n"].dtype == np.int64


# ------------------------------------------------------------------ bfloat16 in the server


def test_bfloat16_travels_as_its_two_byte_payload() -> None:
    values = bf16([1.5, -2.0, 3.0e38, 0.0078125])
    data = encode(Message("x", {}, [values, bf16([7.0]).reshape(())])).tobytearray()
    header_len = int.from_bytes(data[4:8], "little")  # after the 4-byte magic
    header = json.loads(bytes(data[PREFIX_BYTES : PREFIX_BYTES + header_len]))
    assert [spec[0] for spec in header["arrays"]] == ["bfloat16", "bfloat16"]
    back = decode(data).arrays
    assert back[0].dtype == BF16 and back[0].nbytes == 8
    np.testing.assert_array_equal(back[0].view(np.uint16), values.view(np.uint16))
    assert back[1].shape == () and float(back[1]) == 7.0


def test_bfloat16_files_are_standard_safetensors(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    tree = {"w": bf16([1.0, -0.5]), "n": np.array([2, 3], np.int64)}
    save_safetensors(tree, tmp_path / "m.safetensors")
    loaded = st.load_file(str(tmp_path / "m.safetensors"))
    assert loaded["w"].dtype == torch.bfloat16 and loaded["w"].tolist() == [1.0, -0.5]
    st.save_file({"x": torch.tensor([0.25, 4.0], dtype=torch.bfloat16)}, str(tmp_path / "o"))
    theirs = load_safetensors(tmp_path / "o")
    assert theirs["x"].dtype == BF16 and theirs["x"].astype(np.float32).tolist() == [0.25, 4.0]
    back = load_safetensors(tmp_path / "m.safetensors")
    assert back["w"].dtype == BF16 and back["n"].dtype == np.int64


def _result(values: np.ndarray, weight: float = 1.0) -> FLModel:
    return FLModel(params={"w": values}, meta={"NUM_STEPS_CURRENT_ROUND": weight})


def test_the_mean_of_bfloat16_results_is_summed_in_float32_and_rounded_once() -> None:
    # 1.0078125 is 1 + 2**-7, bfloat16's step at 1. In bfloat16 the sums would round each
    # time: 1 + 1.0078125 = 2.0078125 -> 2.0 (a tie, to even), + 1.0078125 -> 3.0, / 3 = 1.0.
    # In float32 the mean is 3.015625 / 3 = 1.0052083, whose nearest bfloat16 is 1.0078125.
    mean = StreamingMean({"w": bf16([1.0])}, expected=3)
    for values in ([1.0], [1.0078125], [1.0078125]):
        mean.add(_result(bf16(values)))
    params = mean.params()
    assert params is not None and params["w"].dtype == BF16
    assert params["w"].astype(np.float32).tolist() == [1.0078125]


def test_weighted_mean_of_bfloat16_known_answer() -> None:
    mean = StreamingMean({"w": bf16([0.0, 0.0])})
    mean.add(_result(bf16([1.0, 2.0]), weight=1.0))
    mean.add(_result(bf16([2.0, 4.0]), weight=3.0))
    params = mean.params()
    assert params is not None  # (1 * 1 + 3 * 2) / 4 = 1.75; (1 * 2 + 3 * 4) / 4 = 3.5
    assert params["w"].dtype == BF16 and params["w"].astype(np.float32).tolist() == [1.75, 3.5]


def test_nan_in_a_bfloat16_result_is_refused() -> None:
    layout: Any = (None, [], [], None)
    with pytest.raises(InvalidResultError, match="not finite"):
        check_result(_result(bf16([1.0, float("nan")])), "site-1", layout, finite=True)
    mean = StreamingMean({"w": bf16([0.0, 0.0])}, expected=2)
    mean.add(_result(bf16([1.0, 1.0])))
    with pytest.raises(InvalidResultError, match="site-2"):
        mean.add(_result(bf16([float("inf"), 1.0])), "site-2")


def test_a_bfloat16_diff_is_added_to_the_global_model() -> None:
    global_params = {"w": bf16([1.0, 2.0]), "n": np.array(3, np.int64)}
    update = {"w": bf16([0.5, -0.25]), "n": np.array(2, np.int64)}
    for new in (
        apply_update(global_params, update, ParamsType.DIFF),
        apply_in_place(global_params, dict(update), ParamsType.DIFF),
    ):
        assert new["w"].dtype == BF16 and new["w"].astype(np.float32).tolist() == [1.5, 1.75]
        assert int(new["n"]) == 5


def test_server_optimisers_move_bfloat16_leaves() -> None:
    x = {"w": bf16([1.0]), "n": np.array(4, np.int64)}

    def mean() -> dict[str, np.ndarray]:  # the round's aggregate: the step may write into it
        return {"w": bf16([2.0]), "n": np.array(6, np.int64)}

    # FedAvgM, first round: m = mean - x = 1; x + eta * m = 1 + 0.5 * 1 = 1.5 (not the mean)
    fedavgm = FedAvgM(eta=0.5)
    new = fedavgm.update(0, x, Aggregate(mean(), ParamsType.FULL, {}, 1.0, 1))
    assert new["w"].astype(np.float32).tolist() == [1.5] and int(new["n"]) == 6
    # SCAFFOLD: x + eta_g * (mean - x) = 1 + 0.5 = 1.5; c = 0 + 1/1 * 0.5 = 0.5
    scaffold = Scaffold(eta_g=0.5)
    scaffold.start(x)
    dc = {"w": np.array([0.5], np.float32), "n": np.array(0.0, np.float32)}
    aggregate = Aggregate(mean(), ParamsType.FULL, {}, 1.0, 1, {"scaffold_c_diff": dc})
    new = scaffold.update(0, x, aggregate)
    assert new["w"].astype(np.float32).tolist() == [1.5]
    assert scaffold.state()["c"]["w"].tolist() == [0.5]


# ------------------------------------------------------------------ nn.Module initial models


def test_an_nn_module_is_exported_as_safetensors_the_server_reads(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    torch.manual_seed(0)
    net = Net()
    job = FedAvgJob("pt", n_clients=2, num_rounds=1, initial_model=net)
    job.to_clients(ScriptRunner(SCRIPTS / "torch_client.py"))  # as NVFlare's hello-pt job
    folder = job.export_job(tmp_path / "jobs")
    config = json.loads((folder / "job.json").read_text())
    assert config["initial_model"] == "initial_model.safetensors"
    assert config["runner"]["framework"] == "pytorch"  # the nn.Module's, by default
    job.to_clients(ScriptRunner(SCRIPTS / "torch_client.py", framework="numpy"))
    again = json.loads((job.export_job(tmp_path / "jobs") / "job.json").read_text())
    assert again["runner"]["framework"] == "numpy"  # a framework named is kept
    theirs = st.load_file(str(folder / "initial_model.safetensors"))  # a standard file
    model_format, params = load_initial_model(folder / "initial_model.safetensors")
    assert isinstance(model_format, ArraysFormat)
    state = net.state_dict()
    assert list(params) == list(state)  # the state_dict's order: results must match it
    for key, tensor in state.items():
        np.testing.assert_array_equal(params[key], tensor.numpy())
        np.testing.assert_array_equal(theirs[key], tensor.numpy())
    assert params["bn.num_batches_tracked"].dtype == np.int64


def test_a_bfloat16_module_is_exported_in_bfloat16(tmp_path: Path) -> None:
    net = Net().to(torch.bfloat16)
    job = FedAvgJob("pt16", n_clients=1, num_rounds=1, initial_model=net)
    job.to_clients(ScriptRunner(SCRIPTS / "torch_client.py", framework="pytorch"))
    folder = job.export_job(tmp_path / "jobs")
    _, params = load_initial_model(folder / "initial_model.safetensors")
    assert params["fc1.weight"].dtype == BF16
    np.testing.assert_array_equal(
        params["fc1.weight"].view(np.int16), net.fc1.weight.detach().view(torch.int16).numpy()
    )


def test_a_module_without_state_is_refused_when_the_job_is_built() -> None:
    with pytest.raises(ConfigError, match=r"empty state_dict\(\)"):
        FedAvgJob("pt", n_clients=1, num_rounds=1, initial_model=torch.nn.Sequential())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tensors_are_copied_to_the_host_once_into_contiguous_arrays() -> None:
    base = torch.arange(6, dtype=torch.float32, device="cuda").reshape(2, 3)
    brain = torch.tensor([1.5, -2.0], dtype=torch.bfloat16, device="cuda")
    out = tensors_to_arrays({"t": base.t(), "b": brain})
    assert out["t"].flags.c_contiguous  # what the wire sends without a second copy
    np.testing.assert_array_equal(out["t"], [[0, 3], [1, 4], [2, 5]])
    assert out["b"].dtype == BF16 and out["b"].astype(np.float32).tolist() == [1.5, -2.0]


def test_a_pytorch_job_on_a_site_without_torch_names_the_extra(
    pytorch_site: LocalLink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """framework='pytorch' where torch cannot be imported: one clear error at receive()."""
    pytorch_site.offer(Task("t0", "train", FLModel(params={"w": np.ones(2)}, current_round=0)))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ClientAPIError, match=r"pip install 'fedlift\[torch\]'"):
        flare.receive()
