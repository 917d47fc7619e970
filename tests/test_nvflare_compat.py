"""What NVFlare's scripts and job scripts need beyond the import swap: FLModel as strict as
NVFlare's, nested-list initial models, ``FrameworkType``, final evaluation as an opt-in,
``get_task_name()`` and ``init(config_file=...)``. (Unbuilt Keras models:
test_keras_initial_model.py.)"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedlift
import fedlift.client as flare
from fedlift import FedAvgJob, ScriptRunner
from fedlift.client._api import _reset_for_tests
from fedlift.client._link import ClientContext, LocalLink, Task, set_current_link
from fedlift.codec import model_from_wire, model_to_wire
from fedlift.errors import ClientAPIError, ConfigError, ProtocolError
from fedlift.job import FrameworkType, load_job
from fedlift.model import NUMPY_KEY, FLModel, ParamsType, load_safetensors, tree_from_lists
from fedlift.server import RunSettings

SCRIPTS = Path(__file__).parent / "scripts"

# ---------------------------------------------------------------- FLModel, as NVFlare's


@pytest.mark.parametrize("kind", [ParamsType.FULL, ParamsType.DIFF, "full", "DIFF"])
def test_a_params_type_without_params_is_refused(kind: Any) -> None:
    with pytest.raises(ConfigError) as info:
        FLModel(params_type=kind, metrics={"accuracy": 0.5})
    message = str(info.value)
    assert "needs params" in message and "Received: params=None" in message
    assert "leave params_type out" in message


def test_metrics_only_and_params_only_models_keep_their_defaults() -> None:
    metrics_only = FLModel(metrics={"accuracy": 0.5})
    assert metrics_only.params_type is None and metrics_only.params is None
    assert FLModel(params={"w": np.zeros(2)}).params_type is ParamsType.FULL
    assert FLModel(params_type="diff", params={"w": np.zeros(2)}).params_type is ParamsType.DIFF


@pytest.mark.parametrize("name", ["start_round", "current_round", "total_rounds"])
@pytest.mark.parametrize("value", [-1, True, 1.0, "2"])
def test_round_numbers_are_ints_from_zero(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"FLModel\({name}=\.\.\.\)") as info:
        FLModel(metrics={}, **{name: value})
    assert f"{name}={value!r}" in str(info.value)


def test_round_numbers_accept_numpy_ints_and_none() -> None:
    model = FLModel(metrics={}, start_round=None, current_round=np.int64(2), total_rounds=0)
    assert model.start_round is None
    assert model.current_round == 2 and type(model.current_round) is int
    assert model.total_rounds == 0


def test_the_wire_refuses_a_params_type_without_params() -> None:
    fields, arrays = model_to_wire(FLModel(params={"w": np.ones(2, np.float32)}))
    lie = {**fields, "params": None}
    with pytest.raises(ProtocolError, match="params_type is FULL but the message carries no"):
        model_from_wire(lie, [])
    assert model_from_wire(fields, arrays).params_type is ParamsType.FULL


# ---------------------------------------------------------------- nested-list initial models


def test_a_top_level_list_becomes_numpy_key_in_float32_as_nvflare() -> None:
    tree = tree_from_lists([[1, 2, 3], [4, 5, 6]])
    assert list(tree) == [NUMPY_KEY] == ["numpy_key"]
    assert tree[NUMPY_KEY].dtype == np.float32
    np.testing.assert_array_equal(tree[NUMPY_KEY], np.array([[1, 2, 3], [4, 5, 6]], np.float32))


def test_a_dict_of_lists_becomes_a_dict_of_float32_arrays() -> None:
    tree = tree_from_lists({"w": [[1, 2], [3, 4]], "b": (0.5, -1), "layer": {"k": [7]}})
    assert tree["w"].dtype == tree["b"].dtype == tree["layer"]["k"].dtype == np.float32
    np.testing.assert_array_equal(tree["w"], [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(tree["b"], [0.5, -1.0])
    np.testing.assert_array_equal(tree["layer"]["k"], [7.0])


def test_trees_of_arrays_come_back_as_they_were() -> None:
    keras_like = {"dense": [np.zeros((2, 2)), np.zeros(2)], "pool": [], "x": np.float64(1.0)}
    assert tree_from_lists(keras_like) is keras_like
    arrays = [np.zeros(3), np.ones(2)]
    assert tree_from_lists(arrays) is arrays


BAD_LISTS = [
    ("ragged", [[1, 2], [3]], "ragged list: element 0 has shape (2,) and element 1 has shape"),
    ("number-beside-row", [[1, 2], 3], "ragged list"),
    ("empty-row", [[1, 2], []], "empty list inside a list of numbers"),
    ("strings", ["a", "b"], "is a str inside a list of numbers"),
    ("none", {"w": [1.0, None]}, "initial_model at 'w/1' is a NoneType"),
    ("bools", [True, False], "is a bool inside"),
    ("array-in-numbers", [1.0, np.zeros(2)], "is a ndarray inside"),
    ("nan", [[1.0, float("nan")]], "not a finite float32"),
    ("too-big-for-float32", [1e39], "not a finite float32"),
]


@pytest.mark.parametrize(
    ("value", "phrase"), [b[1:] for b in BAD_LISTS], ids=[b[0] for b in BAD_LISTS]
)
def test_bad_lists_are_refused_naming_the_place(value: Any, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        tree_from_lists(value)
    assert phrase in str(info.value)
    assert "Received:" in str(info.value)


def test_a_job_takes_nvflares_list_initial_model(tmp_path: Path) -> None:
    job = FedAvgJob("lists", 2, 1, [[1, 2, 3], [4, 5, 6]])
    job.to_clients(ScriptRunner(SCRIPTS / "nvflare_style_client.py", framework="numpy"))
    folder = job.export_job(tmp_path)
    saved = load_safetensors(folder / "initial_model.safetensors")
    assert list(saved) == ["numpy_key"] and saved["numpy_key"].dtype == np.float32
    np.testing.assert_array_equal(saved["numpy_key"], [[1, 2, 3], [4, 5, 6]])


def test_a_job_refuses_a_ragged_initial_model_at_build() -> None:
    with pytest.raises(ConfigError, match=r"FedAvgJob\(initial_model=\.\.\.\) at the top level"):
        FedAvgJob("ragged", 2, 1, [[1, 2, 3], [4, 5]])


# ---------------------------------------------------------------- FrameworkType


def test_framework_type_has_nvflares_names_and_values() -> None:
    assert {m.name: m.value for m in FrameworkType} == {
        "PYTORCH": "pytorch",
        "TENSORFLOW": "tensorflow",
        "NUMPY": "numpy",
        "RAW": "raw",
    }
    assert fedlift.FrameworkType is FrameworkType
    assert FrameworkType.PYTORCH == "pytorch"


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (FrameworkType.PYTORCH, "pytorch"),
        (FrameworkType.RAW, "raw"),
        ("numpy", "numpy"),
        ("TensorFlow", "tensorflow"),
    ],
)
def test_script_runner_takes_a_framework_type_or_its_value(
    tmp_path: Path, given: Any, stored: str
) -> None:
    runner = ScriptRunner(SCRIPTS / "nvflare_style_client.py", framework=given)
    assert runner.framework == stored and type(runner.framework) is str
    job = FedAvgJob("fw", 1, 1, {"numpy_key": np.zeros(2, np.float32)})
    job.to_clients(runner)
    config, _ = load_job(job.export_job(tmp_path))
    assert config.runner.framework == stored


@pytest.mark.parametrize("bad", ["jax", 3, b"numpy"])
def test_script_runner_refuses_other_frameworks(bad: Any) -> None:
    with pytest.raises(ConfigError, match="must be a FrameworkType, one of") as info:
        ScriptRunner(SCRIPTS / "nvflare_style_client.py", framework=bad)
    assert f"framework={bad!r}" in str(info.value)


# ---------------------------------------------------------------- final evaluation: opt-in


def test_final_evaluation_is_off_by_default_everywhere(tmp_path: Path) -> None:
    assert RunSettings(num_rounds=1, min_clients=1).final_evaluation is False
    job = FedAvgJob("defaults", 1, 1, {"w": np.zeros(1, np.float32)})
    job.to_clients(ScriptRunner(SCRIPTS / "nvflare_style_client.py", framework="numpy"))
    folder = job.export_job(tmp_path)
    assert json.loads((folder / "job.json").read_text())["workflow"]["final_evaluation"] is False
    assert load_job(folder)[0].workflow.final_evaluation is False


def nvflare_style_job(tmp_path: Path, **kwargs: Any) -> FedAvgJob:
    """The NVFlare-style script in an app folder of its own, with a client config JSON."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(SCRIPTS / "nvflare_style_client.py", app)
    (app / "client_config.json").write_text(json.dumps({"greeting": "hello", "job_name": "x"}))
    job = FedAvgJob("nvflare-style", 2, 2, [[1, 2, 3], [4, 5, 6]], **kwargs)
    job.to_clients(
        ScriptRunner(
            app / "nvflare_style_client.py",
            script_args="--config_file client_config.json",
            framework=FrameworkType.NUMPY,
        )
    )
    return job


def tasks_seen(workspace: Path, site: str) -> list[dict[str, Any]]:
    lines = (workspace / site / "tasks.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_script_that_never_checks_is_evaluate_trains_num_rounds_times(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    result = nvflare_style_job(tmp_path).simulator_run(ws)
    # Two rounds, each site adds 1 in each: the mean moves by 1 per round.
    np.testing.assert_array_equal(result.params["numpy_key"], [[3, 4, 5], [6, 7, 8]])
    assert [r.task for r in result.rounds] == ["train", "train"]
    assert result.final_metrics == {}
    for site in ("site-1", "site-2"):
        seen = tasks_seen(ws, site)
        assert [(s["task"], s["round"]) for s in seen] == [("train", 0), ("train", 1)]
        # init(config_file=...) found the JSON shipped in the app, beside the script
        assert {s["greeting"] for s in seen} == {"hello"}
        assert {s["dtype"] for s in seen} == {"float32"}
    lines = (ws / "server" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["task"] for x in lines] == ["train", "train"]


def test_with_final_evaluation_on_such_a_script_trains_once_more(tmp_path: Path) -> None:
    """Why it is opt-in: the script answers the validate task by training; fedlift keeps
    only the metrics of that answer, so the global model is the same as without it."""
    ws = tmp_path / "ws"
    result = nvflare_style_job(tmp_path, final_evaluation=True).simulator_run(ws)
    np.testing.assert_array_equal(result.params["numpy_key"], [[3, 4, 5], [6, 7, 8]])
    assert [r.task for r in result.rounds] == ["train", "train", "validate"]
    assert [s["task"] for s in tasks_seen(ws, "site-1")] == ["train", "train", "validate"]
    # its "metrics" are those of a model trained a third time: mean(initial + 3)
    assert result.final_metrics["weight_mean"] == pytest.approx(3.5 + 3)


# ---------------------------------------------------------------- get_task_name, init(config_file)

CONFIG = {"job_name": "demo", "num_rounds": 3}


@pytest.fixture
def link(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalLink]:
    monkeypatch.delenv("RANK", raising=False)
    _reset_for_tests()
    site = LocalLink(ClientContext("job-1", "site-1", 0, 2, dict(CONFIG)), on_log=None)
    set_current_link(site)
    yield site
    site.stop()
    set_current_link(None)
    _reset_for_tests()


def task(name: str, round_number: int = 0) -> Task:
    model = FLModel(params={"w": np.zeros(2)}, current_round=round_number, total_rounds=3)
    return Task(f"t{round_number}-{name}", name, model)


def test_get_task_name_before_init_is_an_error(link: LocalLink) -> None:
    with pytest.raises(ClientAPIError, match=r"get_task_name\(\) was called before init"):
        flare.get_task_name()


@pytest.mark.parametrize("name", ["train", "validate", "submit_model"])
def test_get_task_name_names_the_current_task(link: LocalLink, name: str) -> None:
    flare.init()
    link.offer(task(name, 1))
    assert flare.get_task_name() == name  # fetches the task, as is_train() does
    model = flare.receive()
    assert model is not None and model.current_round == 1
    assert flare.get_task_name() == name


def test_get_task_name_is_empty_once_the_job_ended(link: LocalLink) -> None:
    flare.init()
    link.stop()
    assert flare.get_task_name() == ""


def test_init_reads_a_config_file_beneath_the_jobs_config(link: LocalLink, tmp_path: Path) -> None:
    path = tmp_path / "client.json"
    path.write_text(json.dumps({"lr": 0.1, "num_rounds": 99}))
    flare.init(config_file=path)
    config = flare.get_config()
    assert config["lr"] == 0.1
    assert config["num_rounds"] == 3 and config["job_name"] == "demo"  # the job's values win


def test_a_relative_config_file_is_found_beside_the_script(
    link: LocalLink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "client.json").write_text('{"batch_size": 8}')
    monkeypatch.chdir(tmp_path)  # not where the file is
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "app" / "train.py")])
    flare.init(config_file="client.json")
    assert flare.get_config()["batch_size"] == 8


def test_a_missing_config_file_is_logged_and_skipped(
    link: LocalLink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedlift.client"):
        flare.init(config_file=tmp_path / "config" / "client_api_config.json")
    assert "no such file" in caplog.text and "skipped" in caplog.text
    assert flare.get_config() == CONFIG


@pytest.mark.parametrize(
    ("content", "phrase"),
    [("{not json", "could not read"), ("[1, 2]", "must hold a JSON object")],
)
def test_a_config_file_that_is_not_a_json_object_is_an_error(
    link: LocalLink, tmp_path: Path, content: str, phrase: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ClientAPIError, match=phrase) as info:
        flare.init(config_file=str(path))
    assert f"config_file={str(path)!r}" in str(info.value)
    # init() did not happen: the script can fix the file and call it again
    with pytest.raises(ClientAPIError, match="before init"):
        flare.get_config()


def test_a_config_file_that_is_not_a_path_is_an_error(link: LocalLink) -> None:
    with pytest.raises(ClientAPIError, match="takes the path of a JSON file"):
        flare.init(config_file=123)  # type: ignore[arg-type]
