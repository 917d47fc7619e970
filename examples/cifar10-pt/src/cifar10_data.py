"""CIFAR-10 data for the cifar10-tf example, with an offline fallback.

``load_data()`` returns ``((x_train, y_train), (x_test, y_test))`` exactly like
``keras.datasets.cifar10.load_data()``: ``x`` is ``uint8`` of shape ``(N, 32, 32, 3)``
and ``y`` is ``uint8`` of shape ``(N, 1)`` with labels 0-9. It can also return one
site's shard of the training set for federated runs.

Where the data comes from, in order:

1. ``$FEDLIFT_CIFAR10``: a ``cifar-10-python.tar.gz`` file, an extracted
   ``cifar-10-batches-py/`` directory, or a directory that contains one of them.
2. The Keras cache (``$KERAS_HOME`` or ``~/.keras``, sub-folder ``datasets``): the
   layouts written by Keras 2 (``cifar-10-batches-py/``, ``cifar-10-batches-py.tar.gz``),
   by Keras 3 (``cifar-10-batches-py-target/cifar-10-batches-py/``,
   ``cifar-10-batches-py-target_archive``) and by ``download_cifar10()``.
3. Otherwise the embedded Fashion-MNIST subset in ``../data/fashion_mnist_subset.npz``
   (28x28 grey images zero-padded to 32x32 and repeated to 3 channels), with one
   line on stderr saying so.

``$FEDLIFT_DATASET`` forces a choice: ``embedded`` always uses the embedded subset,
``cifar10`` requires CIFAR-10 and fails if it is missing; unset or ``auto`` gives the
order above.

Archives are read in place (no extraction, so concurrent client processes cannot
race) and their SHA-256 is checked first. The batches are Python pickles; they are
decoded by a restricted unpickler that can only rebuild numpy arrays, never run code.

``$FEDLIFT_CIFAR10_SHA256`` replaces the expected archive hash. It exists for the
tests, which build small fake archives; do not set it for real data.

Command line: ``python3 cifar10_data.py --download`` fetches CIFAR-10 into the Keras
cache; ``python3 cifar10_data.py`` prints which data would be used and its shapes.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "CIFAR10_SHA256",
    "CIFAR10_URL",
    "Cifar10DataError",
    "download_cifar10",
    "load_data",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# SHA-256 of the official cifar-10-python.tar.gz (170,498,071 bytes; MD5
# c58f30108f718f92721af3b95e74349a). Same value as the `file_hash` in Keras'
# keras/src/datasets/cifar10.py and in TensorFlow Datasets' checksum list.
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
SHA256_ENV = "FEDLIFT_CIFAR10_SHA256"
CIFAR10_ENV = "FEDLIFT_CIFAR10"
DATASET_ENV = "FEDLIFT_DATASET"

TARBALL_NAME = "cifar-10-batches-py.tar.gz"  # the name Keras 2 gives the download
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
ALL_BATCHES = (*TRAIN_BATCHES, TEST_BATCH)
NUM_CLASSES = 10
IMAGE_BYTES = 3 * 32 * 32
MAX_BATCH_BYTES = 64 * 1024 * 1024  # a real batch is ~31 MB; refuse anything absurd

EMBEDDED_NPZ = Path(__file__).resolve().parent.parent / "data" / "fashion_mnist_subset.npz"
PREPARE_HINT = "Run prepare_data.sh to fetch CIFAR-10."

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class Cifar10DataError(RuntimeError):
    """The data could not be found, verified or decoded; the message says how to fix it."""


# --------------------------------------------------------------------------- pickles


def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None)  # numpy >= 2
    if core is None:  # pragma: no cover - numpy 1.x
        core = np.core
    return core.multiarray._reconstruct


# The only globals a CIFAR-10 batch pickle needs: enough to rebuild a numpy array.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global outside the allowed numpy ones."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}' from a CIFAR-10 batch: only "
                "numpy array reconstruction is allowed. The file is corrupted or has been "
                "tampered with; delete it and fetch CIFAR-10 again with prepare_data.sh."
            ) from None


def _decode_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one batch pickle into (x uint8 (N, 32, 32, 3), y uint8 (N,))."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except UnsafePickleError as exc:
        raise Cifar10DataError(f"{where}: {exc}") from exc
    except Exception as exc:  # truncated or garbage data
        raise Cifar10DataError(
            f"{where}: not a readable CIFAR-10 batch pickle ({type(exc).__name__}: {exc}). "
            "Expected the python-version batches from cifar-10-python.tar.gz; delete the "
            "file and fetch CIFAR-10 again with prepare_data.sh."
        ) from exc
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        got = sorted(map(repr, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise Cifar10DataError(
            f"{where}: expected a dict with keys b'data' and b'labels', got {got}. "
            "Is this really a CIFAR-10 (not CIFAR-100) python batch?"
        )
    data, labels = obj[b"data"], obj[b"labels"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == IMAGE_BYTES
    ):
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise Cifar10DataError(
            f"{where}: b'data' must be a uint8 array of shape (N, {IMAGE_BYTES}), got {desc}."
        )
    if not isinstance(labels, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels
    ):
        raise Cifar10DataError(f"{where}: b'labels' must be a list of ints.")
    if len(labels) != data.shape[0]:
        raise Cifar10DataError(
            f"{where}: {data.shape[0]} images but {len(labels)} labels; they must match."
        )
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise Cifar10DataError(
            f"{where}: labels must be in 0..{NUM_CLASSES - 1}, found {y.min()}..{y.max()}."
        )
    # Stored row-major as N x 3 x 32 x 32 (channel first); Keras wants channel last.
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y.astype(np.uint8)


# --------------------------------------------------------------------------- sources


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_sha256() -> str:
    override = os.environ.get(SHA256_ENV, "").strip().lower()
    if not override:
        return CIFAR10_SHA256
    if len(override) != 64 or any(c not in "0123456789abcdef" for c in override):
        raise Cifar10DataError(
            f"${SHA256_ENV}={override!r} is not a 64-digit hex SHA-256. It is only meant "
            "for tests; unset it to use the official CIFAR-10 hash."
        )
    return override


def _verify_tarball(fh: BinaryIO, path: Path) -> None:
    """Check the SHA-256 of the open archive ``fh`` (then rewind it)."""
    expected = _expected_sha256()
    digest = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
    fh.seek(0)
    actual = digest.hexdigest()
    if actual != expected:
        raise Cifar10DataError(
            f"{path}: SHA-256 is {actual}, expected {expected} (the official "
            f"cifar-10-python.tar.gz). The file is incomplete or corrupted: delete it and "
            f"run prepare_data.sh to download it again."
        )


def _iter_tar_batches(fh: BinaryIO, path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (batch name, bytes) for the wanted batches, streaming through the archive."""
    try:
        with tarfile.open(fileobj=fh, mode="r|gz") as tar:
            for member in tar:
                base = member.name.rstrip("/").rsplit("/", 1)[-1]
                if base not in ALL_BATCHES or not member.isfile():
                    continue
                if member.size > MAX_BATCH_BYTES:
                    raise Cifar10DataError(
                        f"{path}: member {member.name} is {member.size} bytes, more than "
                        f"the {MAX_BATCH_BYTES} a CIFAR-10 batch can be; the archive is "
                        "not cifar-10-python.tar.gz."
                    )
                member_fh = tar.extractfile(member)
                if member_fh is None:  # pragma: no cover - isfile() checked above
                    continue
                yield base, member_fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise Cifar10DataError(
            f"{path}: cannot read the archive ({type(exc).__name__}: {exc}). Expected "
            "cifar-10-python.tar.gz; delete it and run prepare_data.sh again."
        ) from exc


def _read_batches(source: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if source.is_file():
        # Hash and read the same open file, so a concurrent replacement cannot slip in.
        with open(source, "rb") as fh:
            _verify_tarball(fh, source)
            for name, raw in _iter_tar_batches(fh, source):
                if name in batches:
                    raise Cifar10DataError(f"{source}: batch {name} appears twice in the archive.")
                batches[name] = _decode_batch(raw, f"{source}:{name}")
    else:
        for name in ALL_BATCHES:
            fpath = source / name
            if not fpath.is_file():
                continue
            size = fpath.stat().st_size
            if size > MAX_BATCH_BYTES:
                raise Cifar10DataError(
                    f"{fpath}: {size} bytes, more than a CIFAR-10 batch can be "
                    f"({MAX_BATCH_BYTES}); this is not a CIFAR-10 python batch."
                )
            batches[name] = _decode_batch(fpath.read_bytes(), str(fpath))
    missing = [n for n in ALL_BATCHES if n not in batches]
    if missing:
        raise Cifar10DataError(
            f"{source}: missing CIFAR-10 batches {', '.join(missing)}; expected "
            f"{', '.join(ALL_BATCHES)}. Delete it and run prepare_data.sh again."
        )
    return batches


def _load_cifar10(source: Path) -> Arrays:
    batches = _read_batches(source)
    x_train = np.concatenate([batches[n][0] for n in TRAIN_BATCHES])
    y_train = np.concatenate([batches[n][1] for n in TRAIN_BATCHES]).reshape(-1, 1)
    x_test, y_test = batches[TEST_BATCH]
    return (x_train, y_train), (x_test, y_test.reshape(-1, 1))


def _is_batches_dir(path: Path) -> bool:
    return path.is_dir() and all((path / n).is_file() for n in ALL_BATCHES)


def keras_datasets_dir() -> Path:
    """Where Keras caches datasets: ``$KERAS_HOME/datasets`` or ``~/.keras/datasets``."""
    keras_home = os.environ.get("KERAS_HOME")
    if keras_home:
        return Path(keras_home).expanduser() / "datasets"
    home = Path.home()
    if not os.access(home, os.W_OK):  # Keras falls back to /tmp/.keras in that case
        return Path(tempfile.gettempdir()) / ".keras" / "datasets"
    return home / ".keras" / "datasets"


def _resolve_env_path(raw: str) -> Path:
    path = Path(raw).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path, path / BATCHES_DIR):
            if _is_batches_dir(candidate):
                return candidate
        for name in ("cifar-10-python.tar.gz", TARBALL_NAME):
            if (path / name).is_file():
                return path / name
        for candidate in (path, path / BATCHES_DIR):
            if any((candidate / n).is_file() for n in ALL_BATCHES):
                return candidate  # incomplete: loading reports exactly what is missing
        raise Cifar10DataError(
            f"${CIFAR10_ENV}={raw}: directory has neither the CIFAR-10 batches "
            f"({', '.join(ALL_BATCHES)}) nor a {BATCHES_DIR}/ folder nor "
            "cifar-10-python.tar.gz. Point it at the archive or the extracted folder."
        )
    raise Cifar10DataError(
        f"${CIFAR10_ENV}={raw}: no such file or directory. Point it at "
        "cifar-10-python.tar.gz or an extracted cifar-10-batches-py/ folder, or unset it."
    )


def find_cifar10() -> tuple[Path | None, list[str]]:
    """Return (the CIFAR-10 source to use or None, the places looked at)."""
    raw = os.environ.get(CIFAR10_ENV, "").strip()
    if raw:
        return _resolve_env_path(raw), [f"${CIFAR10_ENV}={raw}"]
    looked = [f"${CIFAR10_ENV} (unset)"]
    datasets = keras_datasets_dir()
    dirs = (datasets / BATCHES_DIR, datasets / "cifar-10-batches-py-target" / BATCHES_DIR)
    files = (datasets / TARBALL_NAME, datasets / "cifar-10-batches-py-target_archive")
    for candidate in dirs:
        looked.append(f"{candidate}/")
        if _is_batches_dir(candidate):
            return candidate, looked
    for candidate in files:
        looked.append(str(candidate))
        if candidate.is_file():
            return candidate, looked
    return None, looked


# --------------------------------------------------------------------------- embedded


def _load_embedded(path: Path = EMBEDDED_NPZ) -> Arrays:
    if not path.is_file():
        raise Cifar10DataError(
            f"embedded data {path} is missing. It is part of the repository; restore it "
            "with git or regenerate it with data/make_fashion_mnist_subset.py."
        )
    keys = ("x_train", "y_train", "x_test", "y_test")
    with np.load(path, allow_pickle=False) as npz:
        absent = [k for k in keys if k not in npz.files]
        if absent:
            raise Cifar10DataError(
                f"{path}: missing arrays {absent}; regenerate it with "
                "data/make_fashion_mnist_subset.py."
            )
        arrays = {k: npz[k] for k in keys}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise Cifar10DataError(
                f"{path}: x_{split} must be uint8 (N, 28, 28), got {x.dtype} {x.shape}; "
                "regenerate it with data/make_fashion_mnist_subset.py."
            )
        if y.shape != (x.shape[0],) or (y.size and int(y.max()) >= NUM_CLASSES):
            raise Cifar10DataError(
                f"{path}: y_{split} must hold {x.shape[0]} labels in 0..9, got shape "
                f"{y.shape}; regenerate it with data/make_fashion_mnist_subset.py."
            )
        padded = np.pad(x, ((0, 0), (2, 2), (2, 2)))  # 2 px zero border -> 32x32
        rgb = np.repeat(padded[..., np.newaxis], 3, axis=-1)
        out.append((rgb, y.astype(np.uint8).reshape(-1, 1)))
    return out[0], out[1]


EMBEDDED_DESC = "the embedded Fashion-MNIST subset (28x28 grey padded to 32x32x3)"


# --------------------------------------------------------------------------- public API


def _check_positive(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}.")


def _shard_indices(n: int, shard: tuple[int, int] | None, split: str, seed: int) -> np.ndarray:
    if shard is None or split == "full":
        return np.arange(n)
    index, n_sites = shard
    if n_sites > n:
        raise ValueError(
            f"shard={shard}: cannot split {n} training images between {n_sites} sites; "
            "use fewer sites or split='full'."
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.array_split(perm, n_sites)[index]


def load_data(
    shard: tuple[int, int] | None = None,
    split: str = "iid",
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Arrays:
    """Load CIFAR-10 (or the embedded fallback) like ``keras.datasets.cifar10.load_data()``.

    Args:
        shard: ``(site_index, n_sites)``, 0-based, to get one site's part of the
            training set; ``None`` for all of it. The test set is never sharded.
        split: ``"iid"``: a seeded shuffle cut into ``n_sites`` near-equal disjoint
            parts whose union is the whole training set; ``"full"``: every site gets
            the whole training set (the original NVFlare example's behaviour).
        seed: seed of the ``"iid"`` shuffle; every site must use the same one.
        max_train: keep at most this many training images (after sharding).
        max_test: keep at most this many test images.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``; x uint8 ``(N, 32, 32, 3)``,
        y uint8 ``(N, 1)``.

    Raises:
        ValueError: bad arguments or ``$FEDLIFT_DATASET`` value.
        Cifar10DataError: data missing (when required), corrupted or unsafe.
    """
    if split not in ("iid", "full"):
        raise ValueError(f"split must be 'iid' or 'full', got {split!r}.")
    if shard is not None:
        if (
            not isinstance(shard, tuple | list)
            or len(shard) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
        ):
            raise ValueError(f"shard must be a (site_index, n_sites) pair of ints, got {shard!r}.")
        index, n_sites = shard
        if n_sites < 1 or not 0 <= index < n_sites:
            raise ValueError(
                f"shard={tuple(shard)!r}: need n_sites >= 1 and 0 <= site_index < n_sites "
                "(site_index is 0-based)."
            )
        shard = (index, n_sites)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    _check_positive("max_train", max_train)
    _check_positive("max_test", max_test)

    mode = os.environ.get(DATASET_ENV, "").strip().lower() or "auto"
    if mode not in ("auto", "cifar10", "embedded"):
        raise ValueError(
            f"${DATASET_ENV}={mode!r} is not valid; use 'cifar10', 'embedded' or 'auto' "
            "(or leave it unset)."
        )
    if mode == "embedded":
        print(f"cifar10_data: ${DATASET_ENV}=embedded; using {EMBEDDED_DESC}.", file=sys.stderr)
        data = _load_embedded()
    else:
        source, looked = find_cifar10()
        if source is not None:
            data = _load_cifar10(source)
        elif mode == "cifar10":
            raise Cifar10DataError(
                f"CIFAR-10 not found (looked in: {', '.join(looked)}) and "
                f"${DATASET_ENV}=cifar10 requires it. {PREPARE_HINT} Or set "
                f"${CIFAR10_ENV} to cifar-10-python.tar.gz."
            )
        else:
            print(
                f"cifar10_data: CIFAR-10 not found (looked in: {', '.join(looked)}); "
                f"using {EMBEDDED_DESC}. {PREPARE_HINT}",
                file=sys.stderr,
            )
            data = _load_embedded()

    (x_train, y_train), (x_test, y_test) = data
    idx = _shard_indices(len(x_train), shard, split, seed)[:max_train]
    x_train, y_train = x_train[idx], y_train[idx]
    return (x_train, y_train), (x_test[:max_test], y_test[:max_test])


def download_cifar10(dest_dir: Path | None = None, timeout: float = 60.0) -> Path:
    """Download cifar-10-python.tar.gz into the Keras cache (or ``dest_dir``).

    The archive is saved as ``cifar-10-batches-py.tar.gz``. Nothing is fetched when a
    file with the right SHA-256 is already there. The download goes to a temporary
    file in the same folder, is verified, then renamed into place atomically.

    Returns:
        The path of the verified archive.

    Raises:
        Cifar10DataError: the download failed or the file's hash is wrong.
    """
    dest_dir = Path(dest_dir) if dest_dir is not None else keras_datasets_dir()
    target = dest_dir / TARBALL_NAME
    expected = _expected_sha256()
    if target.is_file() and sha256_file(target) == expected:
        return target
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Cifar10DataError(
            f"cannot create {dest_dir} ({exc}); pass a writable folder or set KERAS_HOME."
        ) from exc
    fd, tmp_name = tempfile.mkstemp(prefix=f".{TARBALL_NAME}.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(CIFAR10_URL, headers={"User-Agent": "fedlift"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        actual = digest.hexdigest()
        if actual != expected:
            raise Cifar10DataError(
                f"downloaded {CIFAR10_URL} but its SHA-256 is {actual}, expected "
                f"{expected}; the download was corrupted or intercepted. Try again."
            )
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Cifar10DataError(
            f"could not download {CIFAR10_URL} ({reason}). Check the network, or copy "
            f"cifar-10-python.tar.gz to {target} (or point ${CIFAR10_ENV} at it)."
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--download",
        action="store_true",
        help="fetch cifar-10-python.tar.gz into the Keras cache (no-op if already valid)",
    )
    parser.add_argument("--dest", type=Path, default=None, help="folder to download into")
    args = parser.parse_args(argv)
    try:
        if args.download:
            path = download_cifar10(args.dest)
            print(f"cifar10_data: CIFAR-10 ready at {path} (SHA-256 verified)")
            return 0
        (x_train, y_train), (x_test, y_test) = load_data()
        print(
            f"cifar10_data: train x{x_train.shape} y{y_train.shape}, "
            f"test x{x_test.shape} y{y_test.shape}"
        )
        return 0
    except (Cifar10DataError, ValueError) as exc:
        print(f"cifar10_data: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
