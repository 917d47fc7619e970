"""The job API (FedAvgJob, ScriptRunner), the exported job folder, .npz models and app zips."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlift import FedAvgJob, ScriptRunner
from fedlift.client._worker import unpack_app
from fedlift.errors import ConfigError, ProtocolError
from fedlift.job import CONFIG_NAME, JobConfig, load_job, zip_dir
from fedlift.server._store import load_npz, load_params, save_npz

INITIAL = {"dense": [np.ones((3, 2), np.float32), np.zeros(2, np.float32)], "pool": []}


def make_app(tmp_path: Path) -> Path:
    """An app folder: the script, a helper module, and things that must not be shipped."""
    app = tmp_path / "project"
    app.mkdir()
    (app / "train.py").write_text("import helper\nprint(helper.VALUE)\n")
    (app / "helper.py").write_text("VALUE = 41 + 1\n")
    (app / "data").mkdir()
    (app / "data" / "labels.txt").write_text("cat\ndog\n")
    (app / "__pycache__").mkdir()
    (app / "__pycache__" / "helper.cpython-311.pyc").write_bytes(b"\0\0")
    (app / "data" / "__pycache__").mkdir()
    (app / "data" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (app / ".env").write_text("SECRET=1\n")
    (app / ".git").mkdir()
    (app / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return app


def make_job(tmp_path: Path, **kwargs: Any) -> FedAvgJob:
    job = FedAvgJob(name="demo", n_clients=3, num_rounds=4, initial_model=INITIAL, **kwargs)
    job.to_clients(ScriptRunner(make_app(tmp_path) / "train.py", script_args="--epochs 2"))
    return job


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"n_clients": 0}, "FedAvgJob(n_clients=...) must be an int >= 1; received: 0"),
        ({"n_clients": "2"}, "FedAvgJob(n_clients=...) must be an int >= 1; received: '2'"),
        ({"num_rounds": 0}, "FedAvgJob(num_rounds=...) must be an int >= 1; received: 0"),
        ({"num_rounds": 2.5}, "FedAvgJob(num_rounds=...) must be an int >= 1"),
        ({"min_clients": 3}, "must be between 1 and n_clients=2; received: 3"),
        ({"min_clients": 0}, "must be between 1 and n_clients=2; received: 0"),
        ({"name": "a/b"}, "FedAvgJob(name=...) must be a plain folder name; received: 'a/b'"),
        ({"name": ""}, "must be a plain folder name"),
        ({"name": ".hidden"}, "must be a plain folder name"),
        ({"name": None}, "must be a plain folder name"),
        ({"initial_model": "model.keras"}, "a torch.nn.Module or a params tree"),
        ({"initial_model": {"w": [1.0, "x"]}}, "'w/0'"),
        ({"initial_model": {3: np.ones(1)}}, "keys must be strings"),
        ({"save_interval": -1}, "FedAvgJob(save_interval=...) is the most often, in seconds"),
        ({"save_interval": "1"}, "(0: every round); received: '1'"),
    ],
)
def test_fedavg_job_argument_errors(kwargs: dict[str, Any], phrase: str) -> None:
    args: dict[str, Any] = {
        "name": "job",
        "n_clients": 2,
        "num_rounds": 1,
        "initial_model": INITIAL,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        FedAvgJob(**args)
    assert phrase in str(info.value)


def test_min_clients_defaults_to_n_clients() -> None:
    job = FedAvgJob("j", n_clients=4, num_rounds=2, initial_model=INITIAL)
    assert job.workflow.min_clients == 4
    assert job.workflow.num_rounds == 2


def test_script_runner_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="framework=...") as info:
        ScriptRunner("train.py", framework="jax")
    assert "'jax'" in str(info.value) and "'tensorflow'" in str(info.value)
    with pytest.raises(ConfigError, match="script_args=...") as info:
        ScriptRunner("train.py", script_args=["--epochs", "2"])  # type: ignore[arg-type]
    assert "one string of arguments" in str(info.value)
    job = FedAvgJob("j", n_clients=1, num_rounds=1, initial_model=INITIAL)
    with pytest.raises(ConfigError) as info:
        job.to_clients(ScriptRunner(tmp_path / "missing.py"))
    assert "missing.py" in str(info.value) and "does not exist" in str(info.value)
    with pytest.raises(ConfigError, match="to_clients\\(\\) takes a ScriptRunner; received: str"):
        job.to_clients("train.py")  # type: ignore[arg-type]


def test_script_outside_app_dir(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match="is not inside app_dir"):
        ScriptRunner(app / "train.py", app_dir=other).resolve()


def test_export_without_a_script(tmp_path: Path) -> None:
    job = FedAvgJob("j", n_clients=1, num_rounds=1, initial_model=INITIAL)
    with pytest.raises(ConfigError, match="call job.to_clients\\(ScriptRunner"):
        job.export_job(tmp_path / "jobs")


# ---------------------------------------------------------------- export_job


def test_export_job_writes_config_app_and_model(tmp_path: Path) -> None:
    job = make_job(tmp_path, key_metric="loss", higher_is_better=False)
    folder = job.export_job(tmp_path / "jobs")
    assert folder == (tmp_path / "jobs" / "demo").resolve()
    data = json.loads((folder / CONFIG_NAME).read_text())
    assert data["format"] == "fedlift-job/1"
    assert data["name"] == "demo"
    assert data["n_clients"] == 3
    assert data["workflow"]["num_rounds"] == 4
    assert data["workflow"]["min_clients"] == 3
    assert data["workflow"]["key_metric"] == "loss"
    assert data["workflow"]["higher_is_better"] is False
    assert data["workflow"]["type"] == "fedavg"
    assert data["runner"]["script"] == "train.py"
    assert data["runner"]["script_args"] == "--epochs 2"
    assert data["runner"]["framework"] == "tensorflow"
    assert data["runner"]["launch_external_process"] is False
    assert data["initial_model"] == "initial_model.safetensors"
    assert data["app"] == "app"
    assert files_under(folder) == [
        "app/data/labels.txt",
        "app/helper.py",
        "app/train.py",
        "initial_model.safetensors",
        "job.json",
    ]
    assert (folder / "app" / "helper.py").read_text() == "VALUE = 41 + 1\n"
    model = load_params(folder / "initial_model.safetensors")
    assert list(model) == ["dense", "pool"] and model["pool"] == []
    assert model["dense"][0].dtype == np.float32
    assert np.array_equal(model["dense"][0], INITIAL["dense"][0])
    assert not any(p.name.endswith("export-tmp") for p in (tmp_path / "jobs").iterdir())


def test_script_in_a_subfolder_of_app_dir(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    (app / "src").mkdir()
    (app / "src" / "fl.py").write_text("pass\n")
    job = FedAvgJob("sub", n_clients=1, num_rounds=1, initial_model=INITIAL)
    job.to_clients(ScriptRunner("src/fl.py", app_dir=app, framework="numpy"))
    folder = job.export_job(tmp_path / "out")
    data = json.loads((folder / CONFIG_NAME).read_text())
    assert data["runner"]["script"] == "src/fl.py"
    assert data["runner"]["framework"] == "numpy"
    assert (folder / "app" / "src" / "fl.py").is_file()
    assert (folder / "app" / "helper.py").is_file()


def test_export_root_inside_the_app_is_not_copied_into_itself(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    app = tmp_path / "project"
    (app / "workspace").mkdir()
    (app / "workspace" / "old_run.log").write_text("log\n")
    folder = job.export_job(app / "jobs", exclude=(app / "workspace",))
    assert folder == (app / "jobs" / "demo").resolve()
    shipped = files_under(folder / "app")
    assert shipped == ["data/labels.txt", "helper.py", "train.py"]
    # Exporting again does not pick up the first export either.
    folder = job.export_job(app / "jobs", exclude=(app / "workspace",))
    assert files_under(folder / "app") == shipped


def test_re_export_replaces_the_folder(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    folder = job.export_job(tmp_path / "jobs")
    (folder / "stale.txt").write_text("from an older export\n")
    (folder / "app" / "removed.py").write_text("pass\n")
    again = job.export_job(tmp_path / "jobs")
    assert again == folder
    assert not (folder / "stale.txt").exists()
    assert not (folder / "app" / "removed.py").exists()
    assert (folder / "app" / "train.py").is_file()


# ---------------------------------------------------------------- load_job


def test_load_job_round_trip(tmp_path: Path) -> None:
    job = make_job(tmp_path, round_timeout=120, final_evaluation=False, save_interval=0)
    folder = job.export_job(tmp_path / "jobs")
    config, root = load_job(folder)
    assert config.workflow.save_interval == 0.0
    assert root == folder
    assert isinstance(config, JobConfig)
    assert config.name == "demo"
    assert config.n_clients == 3
    assert config.workflow == job.workflow
    assert config.workflow.round_timeout == 120.0
    assert config.workflow.final_evaluation is False
    assert config.runner.script == "train.py"
    assert config.runner.script_args == "--epochs 2"
    assert config.initial_model == "initial_model.safetensors"
    assert config.client_config() == {
        "job_name": "demo",
        "num_rounds": 4,
        "runner": {
            "script": "train.py",
            "script_args": "--epochs 2",
            "launch_external_process": False,
            "command": "python3 -u",
            "framework": "tensorflow",
            "init_timeout": 300.0,
            "stop_timeout": 60.0,
        },
        "cross_site_eval": False,
    }
    # The loaded config writes the same JSON back.
    assert config.to_json() == (folder / CONFIG_NAME).read_text()


def test_load_job_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(tmp_path / "nope")
    message = str(info.value)
    assert "is not a fedlift job folder: job.json is missing" in message
    assert "--export_config" in message
    assert "contains job folders" not in message


def test_load_job_names_job_folders_below(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    job.export_job(tmp_path / "jobs")
    with pytest.raises(ConfigError) as info:
        load_job(tmp_path / "jobs")
    message = str(info.value)
    assert "It contains job folders: demo; pass one of them." in message
    assert "--export_config" in message


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    return make_job(tmp_path).export_job(tmp_path / "jobs")


def edit_config(folder: Path, edit: Any) -> None:
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_load_job_invalid_json(exported: Path) -> None:
    (exported / CONFIG_NAME).write_text('{"name": "demo",')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_job(exported)
    (exported / CONFIG_NAME).write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_job(exported)
    (exported / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_job(exported)


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (
            lambda d: d.update(format="fedlift-job/9"),
            "format 'fedlift-job/9' is not 'fedlift-job/1'",
        ),
        (lambda d: d.pop("format"), "format None is not 'fedlift-job/1'"),
        (lambda d: d.pop("workflow"), "lacks 'workflow'"),
        (lambda d: d.update(runner="train.py"), "'runner' must be"),
        (lambda d: d.update(n_clients="3"), "'n_clients' must be"),
        (lambda d: d.update(n_clients=True), "'n_clients' must be"),
        (lambda d: d.pop("name"), "lacks 'name'"),
        (lambda d: d["workflow"].update(rounds=3), "fedavg has no option 'rounds'; its options:"),
        (
            lambda d: d["workflow"].update(type="fedprx"),
            "unknown strategy type 'fedprx'; known: cyclic, fedadagrad, fedadam,",
        ),
        (
            lambda d: d["workflow"].update(save_interval=-0.5),
            "workflow.save_interval must be a number of seconds >= 0; received: -0.5",
        ),
        (lambda d: d["workflow"].update(save_interval=None), "received: None"),
        (lambda d: d.update(initial_model="gone.npz"), "the initial model 'gone.npz' is missing"),
    ],
)
def test_load_job_bad_config(exported: Path, edit: Any, phrase: str) -> None:
    edit_config(exported, edit)
    with pytest.raises(ConfigError) as info:
        load_job(exported)
    assert phrase in str(info.value)


def test_load_job_missing_script(exported: Path) -> None:
    (exported / "app" / "train.py").unlink()
    with pytest.raises(ConfigError) as info:
        load_job(exported)
    assert "the script 'train.py' is not in" in str(info.value)
    assert str(exported / "app") in str(info.value)


# ---------------------------------------------------------------- .npz models


def test_npz_round_trip_of_a_nested_tree(tmp_path: Path) -> None:
    tree = {
        "encoder": {"conv": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float16)]},
        "pool": [],
        "step": np.array(5, np.int64),
        "mask": np.array([True, False]),
    }
    path = tmp_path / "models" / "m.npz"
    save_npz(tree, path)
    back = load_npz(path)
    assert list(back) == ["encoder", "pool", "step", "mask"]
    assert back["pool"] == []
    conv = back["encoder"]["conv"]
    assert conv[0].dtype == np.float32 and np.array_equal(conv[0], tree["encoder"]["conv"][0])
    assert conv[1].dtype == np.float16 and np.array_equal(conv[1], np.ones(3))
    assert back["step"].shape == () and int(back["step"]) == 5
    assert back["mask"].tolist() == [True, False]
    # Other tools see plain named arrays.
    with np.load(path, allow_pickle=False) as data:
        assert "encoder/conv/0" in data.files and "step" in data.files


def test_plain_npz_loads_as_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.ones(2), b=np.zeros(1))
    back = load_npz(path)
    assert sorted(back) == ["b", "w"]
    assert np.array_equal(back["w"], np.ones(2))


def test_load_npz_never_unpickles(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, w=np.array([{"payload": 1}, None], dtype=object))
    with pytest.raises(ConfigError) as info:
        load_npz(path)
    assert "cannot read" in str(info.value) and "evil.npz" in str(info.value)


def test_load_npz_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(ConfigError, match="cannot read .* as .npz arrays"):
        load_npz(path)


@pytest.mark.parametrize(
    ("structure", "phrase"),
    [
        (b"{not json", "corrupt param structure"),
        (b"\xff\xfe", "corrupt param structure"),
        (b'"text"', "corrupt param structure"),
        (b'{"x": 1}', "corrupt param structure"),
        (b"5", "corrupt param structure"),
        (b"[null]", "corrupt param structure"),
        (b'{"d": [["a", null], ["a", null]]}', "corrupt param structure"),
        (b'{"d": [["b", null]]}', "lacks arrays ['b']"),
    ],
)
def test_load_npz_with_a_corrupt_structure(tmp_path: Path, structure: bytes, phrase: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, a=np.ones(1), **{"__fedlift_structure__": np.frombuffer(structure, np.uint8)})
    with pytest.raises(ConfigError) as info:
        load_npz(path)
    assert "bad.npz" in str(info.value)
    assert phrase in str(info.value)


# ---------------------------------------------------------------- app zips


def zip_of(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in entries:
            bundle.writestr(name, data)
    return buffer.getvalue()


def test_unpack_app_extracts_a_normal_zip(tmp_path: Path) -> None:
    data = zip_of([("train.py", b"print(1)\n"), ("pkg/helper.py", b"X = 1\n"), ("pkg/sub/", b"")])
    target = tmp_path / "site-1" / "app"
    assert unpack_app(data, target) == target
    assert files_under(target) == ["pkg/helper.py", "train.py"]
    assert (target / "pkg" / "sub").is_dir()
    assert (target / "pkg" / "helper.py").read_bytes() == b"X = 1\n"
    # The worker receives the zip as a uint8 array.
    again = tmp_path / "site-2"
    unpack_app(np.frombuffer(data, np.uint8), again)
    assert (again / "train.py").read_bytes() == b"print(1)\n"


def test_unpack_app_round_trips_zip_dir(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    target = tmp_path / "unpacked"
    unpack_app(zip_dir(app), target)
    assert files_under(target) == [".env", "data/labels.txt", "helper.py", "train.py"]


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("../evil.py", "unsafe path: '../evil.py'"),
        ("pkg/../../evil.py", "unsafe path"),
        ("ABSOLUTE", "unsafe path"),
    ],
)
def test_unpack_app_refuses_escaping_paths(tmp_path: Path, name: str, phrase: str) -> None:
    target = tmp_path / "a" / "app"
    outside = tmp_path / "a" / "evil.py"
    if name == "ABSOLUTE":
        name = str(outside)
    data = zip_of([(name, b"import os\n")])
    with pytest.raises(ProtocolError) as info:
        unpack_app(data, target)
    assert phrase in str(info.value)
    assert not outside.exists()
    assert not (tmp_path / "evil.py").exists()
    assert files_under(tmp_path) == []


def test_unpack_app_refuses_symlinks(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("data")
    link.external_attr = (0o120777 << 16) | 0
    data = zip_of([("train.py", b"pass\n"), (link, b"/etc")])
    target = tmp_path / "app"
    with pytest.raises(ProtocolError, match="holds a symlink: 'data'"):
        unpack_app(data, target)
    assert not (target / "data").exists()
    assert not (target / "data").is_symlink()


def test_unpack_app_refuses_a_non_zip(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="not a valid zip file"):
        unpack_app(b"PK but not really", tmp_path / "app")


def test_unpack_app_of_nothing_makes_an_empty_folder(tmp_path: Path) -> None:
    target = unpack_app(b"", tmp_path / "empty")
    assert target.is_dir() and list(target.iterdir()) == []


def test_zip_dir_skips_caches_and_vcs_and_packs_inner_symlinks_as_files(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    (app / "link.py").symlink_to(app / "helper.py")
    with zipfile.ZipFile(io.BytesIO(zip_dir(app))) as bundle:
        names = sorted(bundle.namelist())
        packed = bundle.read("link.py")
        info = bundle.getinfo("link.py")
    assert names == [".env", "data/labels.txt", "helper.py", "link.py", "train.py"]
    assert not any("__pycache__" in n for n in names)
    assert packed == (app / "helper.py").read_bytes()  # the file's bytes, not a link
    assert (info.external_attr >> 16) & 0o170000 != 0o120000
