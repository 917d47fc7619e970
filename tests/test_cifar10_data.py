"""Tests for examples/cifar10-tf: the CIFAR-10 data layer and its offline fallback.

The CIFAR-10 archive cannot be downloaded in CI, so these tests build small fake
archives in the real layout (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
``batches.meta``; Python-2 style protocol-2 pickles of dicts with bytes keys) and point
the loader at them. ``FEDLIFT_CIFAR10_SHA256`` replaces the official archive hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cifar10-tf"
SRC = EXAMPLE / "src"
DATA = EXAMPLE / "data"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

sys.path.insert(0, str(SRC))
import cifar10_data  # noqa: E402

TRAIN_NAMES = [f"data_batch_{i}" for i in range(1, 6)]
PER_BATCH = 20
N_TRAIN = 5 * PER_BATCH


# --------------------------------------------------------------------------- helpers


# The pure-Python pickler, whose per-type ``dispatch`` table can be overridden.
_PurePythonPickler: Any = pickle._Pickler


class _Py2Pickler(_PurePythonPickler):  # type: ignore[misc]
    """Protocol-2 pickler that writes bytes as Python 2 ``str`` (like the real files).

    Python 3 pickles bytes at protocol 2 through ``_codecs.encode``, a global the
    restricted loader (rightly) refuses; cPickle in Python 2 used BINSTRING opcodes.
    """

    dispatch: dict[type, Any] = _PurePythonPickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_py2_ascii(self, obj: str) -> None:
        self.save_py2_str(obj.encode("ascii"))  # Python 2 numpy wrote 'u1', '|' as str

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_ascii


def py2_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # The original files were written with numpy 1.x: use its module path.
    return buf.getvalue().replace(
        b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n"
    )


def make_batches(seed: int = 0, n: int = PER_BATCH) -> dict[str, dict[bytes, Any]]:
    rng = np.random.default_rng(seed)
    batches = {}
    for i, name in enumerate([*TRAIN_NAMES, "test_batch"]):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batches[name] = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)],
        }
    return batches


def batch_files(batches: dict[str, Any]) -> dict[str, bytes]:
    files = {name: py2_pickle(b) for name, b in batches.items()}
    meta = {b"label_names": [b"airplane", b"automobile"], b"num_cases_per_batch": PER_BATCH}
    files["batches.meta"] = py2_pickle(meta)
    return files


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, payload in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def write_dir(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for name, payload in files.items():
        (path / name).write_bytes(payload)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_arrays(batches: dict[str, Any]) -> tuple[np.ndarray, ...]:
    def conv(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        data = np.concatenate([batches[n][b"data"] for n in names])
        x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.concatenate([batches[n][b"labels"] for n in names]).astype(np.uint8)
        return x, y.reshape(-1, 1)

    return (*conv(TRAIN_NAMES), *conv(["test_batch"]))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No real CIFAR-10 anywhere: an empty Keras home and no data variables."""
    for var in ("FEDLIFT_CIFAR10", "FEDLIFT_DATASET", "FEDLIFT_CIFAR10_SHA256"):
        monkeypatch.delenv(var, raising=False)
    keras_home = tmp_path / "keras_home"
    keras_home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    return keras_home


@pytest.fixture
def fake_batches() -> dict[str, Any]:
    return make_batches()


@pytest.fixture
def fake_tar(tmp_path: Path, fake_batches: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Path:
    path = write_tar(tmp_path / "cifar-10-python.tar.gz", batch_files(fake_batches))
    monkeypatch.setenv("FEDLIFT_CIFAR10_SHA256", sha256(path))
    return path


# --------------------------------------------------------------------------- CIFAR-10


def check_loaded(data: Any, batches: dict[str, Any]) -> None:
    (x_train, y_train), (x_test, y_test) = data
    assert x_train.shape == (N_TRAIN, 32, 32, 3)
    assert y_train.shape == (N_TRAIN, 1)
    assert x_test.shape == (PER_BATCH, 32, 32, 3)
    assert y_test.shape == (PER_BATCH, 1)
    for arr in (x_train, y_train, x_test, y_test):
        assert arr.dtype == np.uint8
    # Channel-first storage: byte ch*1024 + r*32 + c of a row is pixel (r, c), channel ch.
    raw = batches["data_batch_2"][b"data"]
    for i, r, c, ch in [(0, 0, 0, 0), (3, 5, 7, 2), (19, 31, 30, 1), (7, 16, 0, 2)]:
        assert x_train[PER_BATCH + i, r, c, ch] == raw[i, ch * 1024 + r * 32 + c]
    assert y_train[PER_BATCH + 4, 0] == batches["data_batch_2"][b"labels"][4]
    ex_train, ey_train, ex_test, ey_test = expected_arrays(batches)
    np.testing.assert_array_equal(x_train, ex_train)
    np.testing.assert_array_equal(y_train, ey_train)
    np.testing.assert_array_equal(x_test, ex_test)
    np.testing.assert_array_equal(y_test, ey_test)


def test_loads_tarball_from_env(
    fake_tar: Path, fake_batches: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(fake_tar))
    check_loaded(cifar10_data.load_data(), fake_batches)


@pytest.mark.parametrize("point_at", ["batches_dir", "parent_dir", "dir_with_tarball"])
def test_loads_from_env_directory(
    point_at: str,
    tmp_path: Path,
    fake_tar: Path,
    fake_batches: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    extracted = write_dir(tmp_path / "x" / "cifar-10-batches-py", batch_files(fake_batches))
    target = {
        "batches_dir": extracted,
        "parent_dir": extracted.parent,
        "dir_with_tarball": fake_tar.parent,
    }[point_at]
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(target))
    check_loaded(cifar10_data.load_data(), fake_batches)


@pytest.mark.parametrize(
    "layout",
    [
        "cifar-10-batches-py.tar.gz",
        "cifar-10-batches-py-target_archive",
        "cifar-10-batches-py",
        "cifar-10-batches-py-target/cifar-10-batches-py",
    ],
)
def test_finds_keras_cache(
    layout: str,
    clean_env: Path,
    fake_tar: Path,
    fake_batches: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = clean_env / "datasets" / layout
    target.parent.mkdir(parents=True, exist_ok=True)
    if layout.endswith(("tar.gz", "_archive")):
        target.write_bytes(fake_tar.read_bytes())
    else:
        write_dir(target, batch_files(fake_batches))
    check_loaded(cifar10_data.load_data(), fake_batches)
    assert capsys.readouterr().err == ""  # no fallback message


def test_sha256_mismatch_is_refused(fake_tar: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDLIFT_CIFAR10_SHA256")
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(fake_tar))
    with pytest.raises(cifar10_data.Cifar10DataError) as err:
        cifar10_data.load_data()
    msg = str(err.value)
    assert f"SHA-256 is {sha256(fake_tar)}" in msg
    assert f"expected {cifar10_data.CIFAR10_SHA256}" in msg
    assert "prepare_data.sh" in msg


def test_official_hash_constant() -> None:
    # SHA-256 of cifar-10-python.tar.gz as used by Keras and TensorFlow Datasets.
    assert (
        cifar10_data.CIFAR10_SHA256
        == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    )


def test_bad_hash_override(fake_tar: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(fake_tar))
    monkeypatch.setenv("FEDLIFT_CIFAR10_SHA256", "abc")
    with pytest.raises(cifar10_data.Cifar10DataError, match="not a 64-digit hex"):
        cifar10_data.load_data()


class _RunsCommand:
    def __init__(self, func: Any, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.func, (self.arg,)


@pytest.mark.parametrize("where", ["tar", "dir"])
@pytest.mark.parametrize("gadget", ["os.system", "builtins.exec", "nested"])
def test_malicious_pickle_is_refused_and_not_run(
    where: str,
    gadget: str,
    tmp_path: Path,
    fake_batches: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marker = tmp_path / "pwned"
    if gadget == "os.system":
        evil: Any = _RunsCommand(os.system, f"touch {marker}")
    elif gadget == "builtins.exec":
        evil = _RunsCommand(exec, f"open({str(marker)!r}, 'w').close()")
    else:  # hidden inside an otherwise valid batch dict
        evil = dict(fake_batches["data_batch_1"])
        evil[b"labels"] = _RunsCommand(os.system, f"touch {marker}")
    files = batch_files(fake_batches)
    files["data_batch_1"] = py2_pickle(evil)
    assert b"system" in files["data_batch_1"] or b"exec" in files["data_batch_1"]
    if where == "tar":
        source = write_tar(tmp_path / "evil.tar.gz", files)
        monkeypatch.setenv("FEDLIFT_CIFAR10_SHA256", sha256(source))
    else:
        source = write_dir(tmp_path / "cifar-10-batches-py", files)
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(source))
    with pytest.raises(cifar10_data.Cifar10DataError) as err:
        cifar10_data.load_data()
    msg = str(err.value)
    assert "data_batch_1" in msg
    assert "refusing to load global" in msg
    assert "system" in msg or "exec" in msg
    assert not marker.exists()


def test_unpickler_allows_only_numpy_reconstruction() -> None:
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    raw = py2_pickle({b"a": arr})
    loaded = cifar10_data.RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    np.testing.assert_array_equal(loaded[b"a"], arr)
    # Python 3's own protocol-2 bytes encoding needs _codecs.encode: refused.
    with pytest.raises(pickle.UnpicklingError, match="_codecs.encode"):
        cifar10_data.RestrictedUnpickler(io.BytesIO(pickle.dumps(b"x", protocol=2))).load()


def _corrupt(batches: dict[str, Any], how: str) -> dict[str, bytes]:
    batch = dict(batches["data_batch_3"])
    files = batch_files(batches)
    if how == "missing_test_batch":
        del files["test_batch"]
        return files
    if how == "wrong_width":
        batch[b"data"] = np.zeros((PER_BATCH, 100), np.uint8)
    elif how == "wrong_dtype":
        batch[b"data"] = np.zeros((PER_BATCH, 3072), np.float32)
    elif how == "label_out_of_range":
        batch[b"labels"] = [10] * PER_BATCH
    elif how == "label_count":
        batch[b"labels"] = batch[b"labels"][:-1]
    elif how == "no_labels_key":
        del batch[b"labels"]
    elif how == "not_a_dict":
        batch = [1, 2, 3]  # type: ignore[assignment]
    elif how == "truncated":
        files["data_batch_3"] = py2_pickle(batch)[:500]
        return files
    files["data_batch_3"] = py2_pickle(batch)
    return files


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing_test_batch", "missing CIFAR-10 batches test_batch"),
        ("wrong_width", r"uint8 array of shape \(N, 3072\), got uint8 array of shape \(20, 100\)"),
        ("wrong_dtype", "got float32 array"),
        ("label_out_of_range", r"labels must be in 0\.\.9, found 10\.\.10"),
        ("label_count", "20 images but 19 labels"),
        ("no_labels_key", "expected a dict with keys b'data' and b'labels'"),
        ("not_a_dict", "got list"),
        ("truncated", "not a readable CIFAR-10 batch pickle"),
    ],
)
@pytest.mark.parametrize("where", ["tar", "dir"])
def test_invalid_batches_are_reported(
    how: str,
    message: str,
    where: str,
    tmp_path: Path,
    fake_batches: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = _corrupt(fake_batches, how)
    if where == "tar":
        source = write_tar(tmp_path / "bad.tar.gz", files)
        monkeypatch.setenv("FEDLIFT_CIFAR10_SHA256", sha256(source))
    else:
        source = write_dir(tmp_path / "cifar-10-batches-py", files)
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(source))
    with pytest.raises(cifar10_data.Cifar10DataError, match=message):
        cifar10_data.load_data()


def test_not_a_gzip_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = tmp_path / "cifar-10-python.tar.gz"
    bogus.write_bytes(b"this is not a tarball")
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(bogus))
    monkeypatch.setenv("FEDLIFT_CIFAR10_SHA256", sha256(bogus))
    with pytest.raises(cifar10_data.Cifar10DataError, match="cannot read the archive"):
        cifar10_data.load_data()


def test_env_path_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(tmp_path / "nope"))
    with pytest.raises(cifar10_data.Cifar10DataError, match="no such file or directory"):
        cifar10_data.load_data()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(empty))
    with pytest.raises(cifar10_data.Cifar10DataError, match="directory has neither"):
        cifar10_data.load_data()


# --------------------------------------------------------------------------- sharding


def _rows(x: np.ndarray) -> list[bytes]:
    return [img.tobytes() for img in x]


def test_iid_shards_are_disjoint_and_cover(fake_tar: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(fake_tar))
    (x_all, y_all), (x_test, _) = cifar10_data.load_data()
    assert len(set(_rows(x_all))) == N_TRAIN  # random images are unique
    shards = [cifar10_data.load_data(shard=(i, 3), seed=7) for i in range(3)]
    sizes = [len(s[0][0]) for s in shards]
    assert sizes == [34, 33, 33]
    seen: list[bytes] = []
    for (x, y), (xt, _) in shards:
        assert x.shape[1:] == (32, 32, 3) and y.shape == (len(x), 1)
        np.testing.assert_array_equal(xt, x_test)  # the test set is never sharded
        seen += _rows(x)
        # labels travel with their images
        lookup = dict(zip(_rows(x_all), y_all[:, 0], strict=True))
        assert [lookup[r] for r in _rows(x)] == list(y[:, 0])
    assert len(seen) == len(set(seen)) == N_TRAIN
    assert set(seen) == set(_rows(x_all))
    # deterministic for a seed, different for another seed
    again = cifar10_data.load_data(shard=(1, 3), seed=7)[0][0]
    np.testing.assert_array_equal(again, shards[1][0][0])
    other = cifar10_data.load_data(shard=(1, 3), seed=8)[0][0]
    assert set(_rows(other)) != set(_rows(shards[1][0][0]))


def test_full_split_and_limits(fake_tar: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(fake_tar))
    (x_all, y_all), (x_test, y_test) = cifar10_data.load_data()
    for site in range(3):
        (x, y), _ = cifar10_data.load_data(shard=(site, 3), split="full")
        np.testing.assert_array_equal(x, x_all)
        np.testing.assert_array_equal(y, y_all)
    (x, y), (xt, yt) = cifar10_data.load_data(max_train=30, max_test=5)
    np.testing.assert_array_equal(x, x_all[:30])
    np.testing.assert_array_equal(yt, y_test[:5])
    assert xt.shape == (5, 32, 32, 3) and y.shape == (30, 1)
    (xs, _), _ = cifar10_data.load_data(shard=(0, 2), max_train=10)
    full_shard = cifar10_data.load_data(shard=(0, 2))[0][0]
    np.testing.assert_array_equal(xs, full_shard[:10])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shard": (3, 3)}, r"0 <= site_index < n_sites"),
        ({"shard": (-1, 2)}, r"0 <= site_index < n_sites"),
        ({"shard": (0, 0)}, r"n_sites >= 1"),
        ({"shard": (0, 1, 2)}, r"\(site_index, n_sites\) pair of ints"),
        ({"shard": (True, 2)}, r"\(site_index, n_sites\) pair of ints"),
        ({"shard": "0,2"}, r"\(site_index, n_sites\) pair of ints"),
        ({"split": "dirichlet"}, r"split must be 'iid' or 'full'"),
        ({"seed": 1.5}, r"seed must be an int"),
        ({"max_train": 0}, r"max_train must be a positive int"),
        ({"max_test": -3}, r"max_test must be a positive int"),
        ({"shard": (0, 101)}, r"cannot split 100 training images between 101 sites"),
    ],
)
def test_argument_validation(
    kwargs: dict[str, Any], message: str, fake_tar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDLIFT_CIFAR10", str(fake_tar))
    with pytest.raises(ValueError, match=message):
        cifar10_data.load_data(**kwargs)


def test_bad_dataset_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLIFT_DATASET", "mnist")
    with pytest.raises(ValueError, match="'cifar10', 'embedded' or 'auto'"):
        cifar10_data.load_data()


# --------------------------------------------------------------------------- embedded


def _check_embedded(data: Any) -> None:
    (x_train, y_train), (x_test, y_test) = data
    assert x_train.shape == (6000, 32, 32, 3) and x_test.shape == (1000, 32, 32, 3)
    assert y_train.shape == (6000, 1) and y_test.shape == (1000, 1)
    assert {a.dtype for a in (x_train, y_train, x_test, y_test)} == {np.dtype(np.uint8)}
    assert np.bincount(y_train[:, 0], minlength=10).tolist() == [600] * 10
    assert np.bincount(y_test[:, 0], minlength=10).tolist() == [100] * 10
    for x in (x_train, x_test):
        assert not x[:, :2].any() and not x[:, -2:].any()
        assert not x[:, :, :2].any() and not x[:, :, -2:].any()
        assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()
    with np.load(DATA / "fashion_mnist_subset.npz", allow_pickle=False) as raw:
        np.testing.assert_array_equal(x_train[:, 2:30, 2:30, 0], raw["x_train"])
        np.testing.assert_array_equal(y_test[:, 0], raw["y_test"])
    assert x_train.mean() > 40  # real images, not blanks


def test_embedded_forced(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDLIFT_DATASET", "embedded")
    _check_embedded(cifar10_data.load_data())
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "FEDLIFT_DATASET=embedded" in err and "embedded Fashion-MNIST subset" in err


def test_embedded_fallback_when_cifar_missing(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _check_embedded(cifar10_data.load_data())
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("cifar10_data: CIFAR-10 not found (looked in: $FEDLIFT_CIFAR10 (unset), ")
    assert str(clean_env / "datasets" / "cifar-10-batches-py.tar.gz") in err
    assert "embedded Fashion-MNIST subset (28x28 grey padded to 32x32x3)" in err
    assert "Run prepare_data.sh to fetch CIFAR-10." in err


def test_embedded_is_sharded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLIFT_DATASET", "embedded")
    parts = [cifar10_data.load_data(shard=(i, 4))[0][1] for i in range(4)]
    assert [len(p) for p in parts] == [1500] * 4


def test_required_cifar10_missing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLIFT_DATASET", "cifar10")
    with pytest.raises(cifar10_data.Cifar10DataError, match="FEDLIFT_DATASET=cifar10 requires"):
        cifar10_data.load_data()


def test_embedded_file_missing(tmp_path: Path) -> None:
    with pytest.raises(cifar10_data.Cifar10DataError, match="missing"):
        cifar10_data._load_embedded(tmp_path / "absent.npz")


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_fashion_mnist_subset", DATA / "make_fashion_mnist_subset.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason=f"{FASHION_DIR} missing (apt-get install dataset-fashion-mnist to run this check)",
)
def test_embedded_npz_matches_generator(tmp_path: Path) -> None:
    out = tmp_path / "regen.npz"
    proc = subprocess.run(
        [sys.executable, str(DATA / "make_fashion_mnist_subset.py"), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    with (
        np.load(out, allow_pickle=False) as new,
        np.load(DATA / "fashion_mnist_subset.npz", allow_pickle=False) as committed,
    ):
        assert (
            sorted(new.files)
            == sorted(committed.files)
            == [
                "x_test",
                "x_train",
                "y_test",
                "y_train",
            ]
        )
        for key in new.files:
            assert new[key].dtype == committed[key].dtype == np.uint8
            np.testing.assert_array_equal(new[key], committed[key])


def test_generator_rejects_bad_idx(tmp_path: Path) -> None:
    gen = _load_generator()
    import gzip

    good = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(good))
    assert gen.read_idx(path, 1).tolist() == [1, 2, 3]
    path.write_bytes(gzip.compress(good[:-1]))
    with pytest.raises(gen.SubsetError, match="truncated or corrupted"):
        gen.read_idx(path, 1)
    path.write_bytes(gzip.compress(bytes([0, 0, 0x0D, 1]) + good[4:]))
    with pytest.raises(gen.SubsetError, match="not an unsigned-byte idx file"):
        gen.read_idx(path, 1)
    with pytest.raises(gen.SubsetError, match="not found"):
        gen.read_idx(tmp_path / "absent.gz", 1)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_loads_from_tarball(fake_tar: Path, fake_batches: dict[str, Any]) -> None:
    code = (
        "import hashlib, cifar10_data\n"
        "(x, y), (xt, yt) = cifar10_data.load_data()\n"
        "h = hashlib.sha256(x.tobytes() + y.tobytes() + xt.tobytes() + yt.tobytes())\n"
        "print(x.shape, xt.shape, h.hexdigest())\n"
    )
    env = {**os.environ, "FEDLIFT_CIFAR10": str(fake_tar), "PYTHONPATH": str(SRC)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    ex, ey, ext, eyt = expected_arrays(fake_batches)
    digest = hashlib.sha256(ex.tobytes() + ey.tobytes() + ext.tobytes() + eyt.tobytes())
    want = f"(100, 32, 32, 3) (20, 32, 32, 3) {digest.hexdigest()}\n"
    assert [out for out, _ in results] == [want] * 4
    assert [err for _, err in results] == [""] * 4


# --------------------------------------------------------------------------- download


class _FakeResponse(io.BytesIO):
    def __enter__(self) -> _FakeResponse:
        return self


def test_download_verifies_and_replaces_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"pretend archive" * 1000
    monkeypatch.setenv("FEDLIFT_CIFAR10_SHA256", hashlib.sha256(payload).hexdigest())
    calls: list[str] = []

    def fake_urlopen(request: Any, timeout: float) -> _FakeResponse:
        calls.append(request.full_url)
        return _FakeResponse(payload)

    monkeypatch.setattr(cifar10_data.urllib.request, "urlopen", fake_urlopen)
    dest = tmp_path / "cache"
    path = cifar10_data.download_cifar10(dest)
    assert path == dest / "cifar-10-batches-py.tar.gz"
    assert path.read_bytes() == payload
    assert calls == [cifar10_data.CIFAR10_URL]
    assert cifar10_data.download_cifar10(dest) == path  # valid copy: no second fetch
    assert len(calls) == 1
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-batches-py.tar.gz"]


def test_download_hash_mismatch_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        cifar10_data.urllib.request, "urlopen", lambda request, timeout: _FakeResponse(b"junk")
    )
    dest = tmp_path / "cache"
    with pytest.raises(cifar10_data.Cifar10DataError, match="SHA-256 is .* expected 6d958be0"):
        cifar10_data.download_cifar10(dest)
    assert list(dest.iterdir()) == []


def test_download_cli_offline_prints_one_line(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(request: Any, timeout: float) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(cifar10_data.urllib.request, "urlopen", offline)
    assert cifar10_data.main(["--download"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("cifar10_data: error: could not download https://www.cs.toronto.edu/")
    assert "Name or service not known" in err
    assert list((clean_env / "datasets").iterdir()) == []  # no stray temp file


# --------------------------------------------------------------------------- model


def test_tfnet_names_clone_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    from tf_net import LAYER_NAMES, TFNet

    model = TFNet()
    assert [layer.name for layer in model.layers] == list(LAYER_NAMES)
    assert model.count_params() == 122_570
    assert model.output_shape == (None, 10)
    clone = keras.models.clone_model(model)
    assert [layer.name for layer in clone.layers] == list(LAYER_NAMES)
    config = model.get_config()
    plain = keras.Sequential.from_config(config)
    assert [layer.name for layer in plain.layers] == list(LAYER_NAMES)
    again = TFNet.from_config(config)
    assert isinstance(again, TFNet) and [lyr.name for lyr in again.layers] == list(LAYER_NAMES)
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input_shape must be"):
        TFNet(input_shape=(32, 32))
