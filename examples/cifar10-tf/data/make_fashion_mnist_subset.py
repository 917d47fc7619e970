"""Build fashion_mnist_subset.npz, the offline stand-in for CIFAR-10 in this example.

Reads the original Fashion-MNIST idx files (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``; on Debian/Ubuntu: ``apt-get install dataset-fashion-mnist``
puts them in /usr/share/datasets/fashion-mnist), picks a class-balanced subset with a
fixed seed and writes it with ``np.savez_compressed``: keys ``x_train``, ``y_train``,
``x_test``, ``y_test``; images uint8 (N, 28, 28), labels uint8 (N,).

    python3 make_fashion_mnist_subset.py [--source DIR] [--output FILE]

The same inputs and options always give the same arrays.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "fashion_mnist_subset.npz"
DEFAULT_SEED = 2017
TRAIN_PER_CLASS = 600
TEST_PER_CLASS = 100
NUM_CLASSES = 10
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_UBYTE = 0x08  # idx type code for unsigned bytes


class SubsetError(RuntimeError):
    """An input file is missing or not in the expected idx format."""


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzip-compressed idx file of unsigned bytes with ``ndim`` dimensions."""
    if not path.is_file():
        raise SubsetError(
            f"{path} not found. Expected the Fashion-MNIST idx files there; install "
            "dataset-fashion-mnist (Debian/Ubuntu) or pass --source DIR."
        )
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise SubsetError(f"{path}: not a readable gzip file ({exc}).") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SubsetError(f"{path}: {len(raw)} bytes, too short for an idx header.")
    zero, dtype_code, file_ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != IDX_UBYTE or file_ndim != ndim:
        raise SubsetError(
            f"{path}: idx magic {raw[:4].hex()} is not an unsigned-byte idx file with "
            f"{ndim} dimensions (expected 000008{ndim:02x})."
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise SubsetError(
            f"{path}: header says shape {dims} ({expected} bytes) but the file has "
            f"{len(raw)} bytes; it is truncated or corrupted."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = FILES[split]
    images = read_idx(source / images_name, 3)
    labels = read_idx(source / labels_name, 1)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise SubsetError(
            f"{source}: {split} has images {images.shape} and labels {labels.shape}; "
            "expected (N, 28, 28) images and N labels."
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise SubsetError(f"{source}: {split} labels go up to {labels.max()}, expected 0..9.")
    return images, labels


def balanced_subset(
    images: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` random images of each class, in a shuffled order."""
    chosen = []
    for cls in range(NUM_CLASSES):
        pool = np.flatnonzero(labels == cls)
        if len(pool) < per_class:
            raise SubsetError(f"class {cls} has {len(pool)} images, fewer than {per_class}.")
        chosen.append(np.sort(rng.choice(pool, size=per_class, replace=False)))
    order = rng.permutation(np.concatenate(chosen))
    return images[order].copy(), labels[order].astype(np.uint8)


def make_subset(
    source: Path,
    seed: int = DEFAULT_SEED,
    train_per_class: int = TRAIN_PER_CLASS,
    test_per_class: int = TEST_PER_CLASS,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x_train, y_train = balanced_subset(*load_split(source, "train"), train_per_class, rng)
    x_test, y_test = balanced_subset(*load_split(source, "test"), test_per_class, rng)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_npz_atomic(arrays: dict[str, np.ndarray], output: Path) -> None:
    """Write a compressed npz next to ``output`` and rename it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.getvalue())
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="idx .gz folder")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="npz to write")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS)
    args = parser.parse_args(argv)
    try:
        arrays = make_subset(args.source, args.seed, args.train_per_class, args.test_per_class)
        write_npz_atomic(arrays, args.output)
    except (SubsetError, OSError) as exc:
        print(f"make_fashion_mnist_subset: error: {exc}", file=sys.stderr)
        return 1
    size = args.output.stat().st_size
    print(
        f"wrote {args.output} ({size} bytes): train {arrays['x_train'].shape}, "
        f"test {arrays['x_test'].shape}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
