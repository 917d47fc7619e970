"""Global models of array jobs are .safetensors files, written and read without pickle."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from fedlift.errors import ConfigError
from fedlift.model._safetensors import load_safetensors, save_safetensors


def test_round_trip_keeps_tree_dtypes_and_values(tmp_path: Path) -> None:
    tree = {
        "conv": [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.zeros(4, np.float16)],
        "pool": [],
        "head": {"w": np.array([[1, 2]], dtype=np.int64), "flag": np.array(True)},
    }
    path = tmp_path / "m.safetensors"
    save_safetensors(tree, path)
    back = load_safetensors(path)
    assert list(back) == ["conv", "pool", "head"] and back["pool"] == []
    np.testing.assert_array_equal(back["conv"][0], tree["conv"][0])
    assert back["conv"][1].dtype == np.float16 and back["head"]["w"].dtype == np.int64
    assert back["head"]["flag"].shape == () and bool(back["head"]["flag"])


def test_the_file_follows_the_safetensors_layout(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_safetensors(
        {"a": np.array([1.5, 2.5], np.float32), "b": np.arange(3, dtype=np.int32)}, path
    )
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert size % 8 == 0
    header = json.loads(raw[8 : 8 + size])
    assert header["a"] == {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert header["b"] == {"dtype": "I32", "shape": [3], "data_offsets": [8, 20]}
    body = raw[8 + size :]
    assert np.frombuffer(body[:8], "<f4").tolist() == [1.5, 2.5]
    assert len(body) == 20


@pytest.mark.parametrize(
    "content, phrase",
    [
        (b"abc", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "header size"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (struct.pack("<Q", 8) + b'{"a": 1}', "malformed"),
        (
            struct.pack("<Q", 56)
            + b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
            + b"\0" * 4,
            "malformed",
        ),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, content: bytes, phrase: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=phrase):
        load_safetensors(path)


def test_recycled_saves_swap_two_files_and_stay_atomic(tmp_path: Path) -> None:
    from fedlift._atomic import spare_path

    path = tmp_path / "global.safetensors"
    inodes = []
    for i in range(4):
        save_safetensors({"w": np.full(10 - i, i, np.float32)}, path, recycle=True)
        np.testing.assert_array_equal(load_safetensors(path)["w"], np.full(10 - i, i))
        inodes.append(path.stat().st_ino)
        # Only the model and (from the second save) the one it replaced: no temp files.
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            {path.name} | ({spare_path(path).name} if i else set())
        )
    assert inodes[0] == inodes[2] and inodes[1] == inodes[3]  # the two files take turns
    assert inodes[0] != inodes[1]
    # The spare holds the previous model, complete (a crash mid-write damages only it).
    np.testing.assert_array_equal(load_safetensors(spare_path(path))["w"], np.full(8, 2))


def test_the_background_writer_lets_go_of_the_model_before_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import threading
    import weakref

    from fedlift._atomic import StagedFile
    from fedlift.server._store import ArraysFormat, RunRecorder

    released = threading.Event()
    alive_at_publish: list[bool] = []

    class Waiting(ArraysFormat):
        def stage(self, params: object, path: Path) -> StagedFile:
            staged = super().stage(params, path)
            released.wait(10)  # the caller drops its own reference meanwhile
            return staged

    publish = StagedFile.publish

    def checking_publish(self: StagedFile) -> None:
        gc.collect()
        alive_at_publish.append(ref() is not None)
        publish(self)

    monkeypatch.setattr(StagedFile, "publish", checking_publish)
    recorder = RunRecorder(tmp_path, Waiting())
    weights = np.full(1000, 7.0, np.float32)
    ref = weakref.ref(weights)
    recorder.save_global({"w": weights}, 0)
    del weights
    released.set()
    recorder.flush()
    recorder.close()
    assert alive_at_publish[:1] == [False]  # the model's fsync ran without it held
    np.testing.assert_array_equal(load_safetensors(recorder.global_model_path)["w"], 7.0)


def test_save_interval_skips_models_but_always_writes_the_last(tmp_path: Path) -> None:
    from fedlift.server._store import ArraysFormat, RunRecorder

    def written() -> tuple[int, float]:
        recorder.flush()
        state = json.loads((tmp_path / "state.json").read_text())
        return state["round_done"], float(load_safetensors(recorder.global_model_path)["w"][0])

    recorder = RunRecorder(tmp_path, ArraysFormat(), save_interval=3600)
    recorder.save_global({"w": np.full(4, 0.0, np.float32)}, 0)
    assert written() == (0, 0.0)  # the first model is written
    recorder.save_global({"w": np.full(4, 1.0, np.float32)}, 1)
    recorder.save_global({"w": np.full(4, 2.0, np.float32)}, 2)
    assert written() == (0, 0.0)  # within the interval: skipped
    recorder.save_global({"w": np.full(4, 3.0, np.float32)}, 3, final=True)
    assert written() == (3, 3.0)  # the last one always
    recorder.close()

    every = RunRecorder(tmp_path / "every", ArraysFormat(), save_interval=0)
    for k in range(3):
        every.save_global({"w": np.full(4, float(k), np.float32)}, k)
        every.flush()
        assert json.loads((tmp_path / "every" / "state.json").read_text())["round_done"] == k
    every.close()
    with pytest.raises(ConfigError, match="save_interval must be a number of seconds >= 0"):
        RunRecorder(tmp_path / "bad", ArraysFormat(), save_interval=-1)


def test_the_next_save_waits_until_the_last_one_let_go_of_its_model(tmp_path: Path) -> None:
    """A model being written is never held into the round after next, where its (pooled)
    memory is wanted back: save_global waits for the write to let go of it first."""
    import threading

    from fedlift._atomic import StagedFile
    from fedlift.server._store import ArraysFormat, RunRecorder

    go_on = threading.Event()
    staging = threading.Event()

    class Slow(ArraysFormat):
        def stage(self, params: object, path: Path) -> StagedFile:
            staging.set()
            go_on.wait(10)  # a disk slower than a round
            return super().stage(params, path)

    recorder = RunRecorder(tmp_path, Slow(), save_interval=0)
    recorder.save_global({"w": np.zeros(4, np.float32)}, 0)
    assert staging.wait(10)
    second = threading.Thread(target=recorder.save_global, args=({"w": np.ones(4, np.float32)}, 1))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # still waiting: the first write holds its model
    go_on.set()
    second.join(10)
    assert not second.is_alive()
    recorder.close()
    assert json.loads((tmp_path / "state.json").read_text())["round_done"] == 1
    np.testing.assert_array_equal(load_safetensors(recorder.global_model_path)["w"], 1.0)
