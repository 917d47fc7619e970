"""fedlift.data: the NIID-Bench partitioners and the partition summaries.

Known answers are worked out by hand on tiny label arrays; properties (disjoint, covering,
deterministic by seed, min_size, NIID-Bench's balancing rule) are checked with hypothesis.
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedlift.data
from fedlift.data import (
    MAX_RETRIES,
    SUMMARY_FORMAT,
    dirichlet,
    iid,
    label_counts,
    pathological,
    quantity_skew,
    save_summary_json,
    save_summary_png,
    summary_table,
)
from fedlift.errors import ConfigError

Parts = list[npt.NDArray[np.int64]]

# derandomized: the same examples on every run, so CI cannot flake on a rare draw
PROPERTY = settings(max_examples=40, deadline=None, database=None, derandomize=True)


def _labels(n_classes: int, per_class: int) -> npt.NDArray[np.int64]:
    return np.repeat(np.arange(n_classes), per_class)


def _check_shape(parts: Parts, n_clients: int, n_samples: int) -> None:
    """What every partitioner promises: int64, sorted, in range, disjoint, one per client."""
    assert len(parts) == n_clients
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1
        assert np.all(np.diff(part) > 0)  # sorted, and no index twice within a part
        assert part.size == 0 or (part[0] >= 0 and part[-1] < n_samples)
    joined = np.concatenate(parts)
    assert np.unique(joined).size == joined.size  # disjoint


def _same(a: Parts, b: Parts) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _covers(parts: Parts, n_samples: int) -> bool:
    return bool(np.array_equal(np.sort(np.concatenate(parts)), np.arange(n_samples)))


# ---------------------------------------------------------------- known answers


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = iid(10, 3, seed=0)
    _check_shape(parts, 3, 10)
    assert _covers(parts, 10)
    assert sorted(part.size for part in parts) == [3, 3, 4]  # 10 = 4 + 3 + 3
    labels = np.array([0, 1, 0, 1, 0, 1, 0])
    assert [part.size for part in iid(labels, 7, seed=1)] == [1] * 7


def test_pathological_one_class_per_client_is_exactly_that_class() -> None:
    labels = np.array([2, 0, 1, 3, 0, 2, 1, 3])
    parts = pathological(labels, 4, classes_per_client=1, seed=3)
    # k = 1: client i holds class i % 4 only, all of its samples
    assert [part.tolist() for part in parts] == [[1, 4], [2, 6], [0, 5], [3, 7]]


def test_pathological_classes_need_not_be_0_to_k() -> None:
    labels = np.array([7, 5, 5, 7, 9])
    parts = pathological(labels, 2, classes_per_client=1, seed=0)
    # the sorted classes are 5, 7, 9: client 0 gets 5, client 1 gets 7; 9 is held by nobody
    assert [part.tolist() for part in parts] == [[1, 2], [0, 3]]


def test_pathological_every_class_everywhere_splits_each_class_equally() -> None:
    labels = _labels(4, 6)
    parts = pathological(labels, 2, classes_per_client=4, seed=5)
    assert label_counts(labels, parts).tolist() == [[3, 3, 3, 3], [3, 3, 3, 3]]  # 6 / 2
    assert _covers(parts, 24)


def test_pathological_two_of_four_labels_two_clients() -> None:
    labels = _labels(4, 6)  # 4 labels, 6 samples each
    parts = pathological(labels, 2, classes_per_client=2, seed=7)
    _check_shape(parts, 2, 24)
    counts = label_counts(labels, parts)
    assert [int(np.count_nonzero(row)) for row in counts] == [2, 2]  # exactly k labels each
    assert counts[0, 0] > 0 and counts[1, 1] > 0  # client i holds label i % 4 first
    for label in range(4):
        holders = int(np.count_nonzero(counts[:, label]))
        # a label's 6 samples split equally among its holders: 6 each for one, 3 for two;
        # a label held by nobody is dropped
        expected = {0: 0, 1: 6, 2: 3}[holders]
        assert set(counts[:, label][counts[:, label] > 0].tolist()) <= {expected}
        assert counts[:, label].sum() == (6 if holders else 0)


def test_pathological_drops_a_class_nobody_holds() -> None:
    labels = _labels(4, 3)
    parts = pathological(labels, 2, classes_per_client=1, seed=0)
    assert [part.tolist() for part in parts] == [[0, 1, 2], [3, 4, 5]]  # classes 0 and 1
    table = summary_table(labels, parts)
    assert table.splitlines()[-1].split() == ["left", "out", "6", "0", "0", "3", "3"]


def test_pathological_splits_unequal_classes_within_one() -> None:
    labels = np.array([0] * 7 + [1] * 5)
    parts = pathological(labels, 2, classes_per_client=2, seed=2)
    counts = label_counts(labels, parts)
    assert sorted(counts[:, 0].tolist()) == [3, 4]  # 7 = 4 + 3
    assert sorted(counts[:, 1].tolist()) == [2, 3]  # 5 = 3 + 2


def test_dirichlet_one_client_gets_everything() -> None:
    labels = np.array([1, 0, 2, 2, 1, 0, 0])
    assert dirichlet(labels, 1, alpha=0.5, seed=0, min_size=7)[0].tolist() == list(range(7))


def test_dirichlet_huge_alpha_cuts_each_class_evenly() -> None:
    labels = _labels(2, 400)
    parts = dirichlet(labels, 4, alpha=1e7, seed=0, min_size=0)
    # Dir(1e7) shares are 1/4 to within ~1e-4: 100 samples of each class per client, the
    # floor of the cut points moving a sample at most
    counts = label_counts(labels, parts)
    assert np.all(np.abs(counts - 100) <= 1), counts
    assert _covers(parts, 800)


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_near_iid() -> None:
    labels = _labels(10, 300)

    def mean_max_share(alpha: float) -> float:
        counts = label_counts(labels, dirichlet(labels, 10, alpha=alpha, seed=1))
        return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))

    # 10 classes: an IID client's largest class is ~1/10 of it; alpha = 0.1 gives a client
    # one or two dominant classes
    assert mean_max_share(100.0) < 0.2
    assert mean_max_share(0.1) > 0.5


def test_quantity_skew_small_alpha_skews_sizes_large_alpha_does_not() -> None:
    small = sorted(part.size for part in quantity_skew(2000, 10, alpha=0.3, seed=4))
    large = sorted(part.size for part in quantity_skew(2000, 10, alpha=1000.0, seed=4))
    assert small[-1] > 4 * small[0]
    assert large[-1] - large[0] < 40  # each ~200, Dir(1000) sd ~ 200 * 0.03


def test_quantity_skew_labels_stay_near_iid() -> None:
    labels = _labels(4, 500)
    counts = label_counts(labels, quantity_skew(labels, 3, alpha=1.0, seed=0, min_size=100))
    shares = counts / counts.sum(axis=1, keepdims=True)
    assert np.all(np.abs(shares - 0.25) < 0.1), shares


def test_dirichlet_redraws_until_min_size_holds() -> None:
    labels = _labels(10, 20)
    sizes = [part.size for part in dirichlet(labels, 10, alpha=0.5, seed=0, min_size=0)]
    assert min(sizes) < 12  # so the redraws below have something to reject
    sizes = [part.size for part in dirichlet(labels, 10, alpha=0.5, seed=0, min_size=12)]
    assert min(sizes) >= 12 and sum(sizes) == 200


def test_quantity_skew_redraws_until_min_size_holds() -> None:
    sizes = [part.size for part in quantity_skew(200, 10, alpha=2.0, seed=0, min_size=0)]
    assert min(sizes) < 8
    sizes = [part.size for part in quantity_skew(200, 10, alpha=2.0, seed=0, min_size=8)]
    assert min(sizes) >= 8 and sum(sizes) == 200


def _is_a_run(part: npt.NDArray[np.int64]) -> bool:
    return part.size == 0 or int(part[-1] - part[0]) == part.size - 1


def test_samples_are_shuffled_before_they_are_cut() -> None:
    # one class of 100 samples over 2 clients: cut without a shuffle, each client would
    # hold a run of consecutive indices
    labels = np.zeros(100, dtype=np.int64)
    for parts in (
        iid(labels, 2, seed=0),
        dirichlet(labels, 2, alpha=1.0, seed=0),
        pathological(labels, 2, classes_per_client=1, seed=0),
        quantity_skew(labels, 2, alpha=1.0, seed=0),
    ):
        assert [part.size > 0 for part in parts] == [True, True]
        assert not any(_is_a_run(part) for part in parts)


# ---------------------------------------------------------------- properties


@st.composite
def label_arrays(draw: st.DrawFn) -> npt.NDArray[np.int64]:
    """1 to 6 classes of unequal sizes, each with at least 8 samples, in random order."""
    n_classes = draw(st.integers(1, 6))
    extra = draw(st.integers(0, 250))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = np.concatenate([_labels(n_classes, 8), rng.integers(0, n_classes, size=extra)])
    return rng.permutation(labels).astype(np.int64)


@PROPERTY
@given(st.integers(1, 400), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_iid_properties(n: int, n_clients: int, seed: int) -> None:
    if n_clients > n:
        with pytest.raises(ConfigError, match="n_clients"):
            iid(n, n_clients, seed=seed)
        return
    parts = iid(n, n_clients, seed=seed)
    _check_shape(parts, n_clients, n)
    assert _covers(parts, n)
    sizes = [part.size for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _same(parts, iid(n, n_clients, seed=seed))


@PROPERTY
@given(label_arrays(), st.integers(1, 5), st.floats(0.1, 50.0), st.integers(0, 2**32 - 1))
def test_dirichlet_properties(
    labels: npt.NDArray[np.int64], n_clients: int, alpha: float, seed: int
) -> None:
    min_size = labels.size // (3 * n_clients)
    try:
        parts = dirichlet(labels, n_clients, alpha=alpha, seed=seed, min_size=min_size)
    except ConfigError as exc:
        assert "lower min_size or raise alpha" in str(exc)
        return
    _check_shape(parts, n_clients, labels.size)
    assert _covers(parts, labels.size)
    assert min(part.size for part in parts) >= min_size
    again = dirichlet(labels, n_clients, alpha=alpha, seed=seed, min_size=min_size)
    assert _same(parts, again)
    # NIID-Bench's balancing: classes are cut in sorted order; a client that already held
    # N / n_clients samples gets nothing of a later class
    counts = label_counts(labels, parts)
    before = np.cumsum(counts, axis=1) - counts
    full = before >= labels.size / n_clients
    assert np.all(counts[full] == 0)


@PROPERTY
@given(label_arrays(), st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_pathological_properties(
    labels: npt.NDArray[np.int64], n_clients: int, k: int, seed: int
) -> None:
    n_classes = np.unique(labels).size
    if k > n_classes:
        with pytest.raises(ConfigError, match="classes_per_client"):
            pathological(labels, n_clients, classes_per_client=k, seed=seed)
        return
    parts = pathological(labels, n_clients, classes_per_client=k, seed=seed)
    _check_shape(parts, n_clients, labels.size)
    counts = label_counts(labels, parts)
    assert np.all(np.count_nonzero(counts, axis=1) == k)  # (classes here have >= 8 samples)
    totals = np.bincount(np.unique(labels, return_inverse=True)[1])
    for j in range(n_classes):
        held = counts[:, j][counts[:, j] > 0]
        assert held.size == 0 or (held.sum() == totals[j] and held.max() - held.min() <= 1)
    for i in range(n_clients):
        assert counts[i, i % n_classes] > 0


@PROPERTY
@given(st.integers(50, 500), st.integers(1, 5), st.floats(0.2, 20.0), st.integers(0, 2**32 - 1))
def test_quantity_skew_properties(n: int, n_clients: int, alpha: float, seed: int) -> None:
    try:
        parts = quantity_skew(n, n_clients, alpha=alpha, seed=seed, min_size=5)
    except ConfigError as exc:
        assert "lower min_size or raise alpha" in str(exc)
        return
    _check_shape(parts, n_clients, n)
    assert _covers(parts, n)
    assert min(part.size for part in parts) >= 5
    again = quantity_skew(n, n_clients, alpha=alpha, seed=seed, min_size=5)
    assert _same(parts, again)


def test_different_seeds_give_different_partitions() -> None:
    labels = _labels(5, 40)
    runs: dict[str, Callable[[int], Parts]] = {
        "iid": lambda seed: iid(labels, 4, seed=seed),
        "dirichlet": lambda seed: dirichlet(labels, 4, alpha=0.5, seed=seed, min_size=5),
        "pathological": lambda seed: pathological(labels, 4, classes_per_client=2, seed=seed),
        "quantity_skew": lambda seed: quantity_skew(labels, 4, alpha=1.0, seed=seed, min_size=5),
    }
    for name, run in runs.items():
        assert _same(run(11), run(11)), name
        assert not _same(run(11), run(12)), name


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: iid(10, 0, seed=0), "n_clients=0"),
        (lambda: iid(10, 2.0, seed=0), "n_clients=2.0"),  # type: ignore[arg-type]
        (lambda: iid(10, 2, seed=-1), "seed=-1"),
        (lambda: iid(10, 2, seed=True), "seed=True"),
        (lambda: iid(0, 2, seed=0), "labels_or_n=0"),
        (lambda: iid(3, 4, seed=0), "n_clients=4"),
        (lambda: dirichlet([0, 1] * 20, 2, alpha=0, seed=0), "alpha=0"),
        (lambda: dirichlet([0, 1] * 20, 2, alpha=-1.0, seed=0), "alpha=-1.0"),
        (lambda: dirichlet([0, 1] * 20, 2, alpha=float("nan"), seed=0), "alpha=nan"),
        (lambda: dirichlet([0, 1] * 20, 2, alpha=0.5, seed=0, min_size=-1), "min_size=-1"),
        (lambda: dirichlet([0, 1] * 20, 5, alpha=0.5, seed=0, min_size=9), "min_size=9"),
        (lambda: dirichlet([[0, 1]], 1, alpha=0.5, seed=0), "labels with shape (1, 2)"),
        (lambda: dirichlet([0.0, 1.0], 1, alpha=0.5, seed=0), "dtype float64"),
        (lambda: dirichlet([], 1, alpha=0.5, seed=0), "labels of length 0"),
        (lambda: pathological(_labels(4, 3), 2, classes_per_client=5, seed=0), "=5"),
        (lambda: pathological(_labels(4, 3), 2, classes_per_client=0, seed=0), "=0"),
        (lambda: quantity_skew(30, 4, alpha=0.5, seed=0, min_size=8), "min_size=8"),
        (lambda: quantity_skew(30, 4, alpha="1", seed=0), "alpha='1'"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_name_the_argument(call: object, argument: str) -> None:
    with pytest.raises(ConfigError) as caught:
        call()  # type: ignore[operator]
    message = str(caught.value)
    assert "Received: " in message
    assert argument in message.split("Received: ", 1)[1]


def test_too_many_redraws_say_what_to_change() -> None:
    # 100 samples, 10 clients, min_size 10: only an exact 10-each cut passes, and a
    # Dirichlet draw with alpha = 0.01 gives that essentially never
    with pytest.raises(ConfigError, match="lower min_size or raise alpha") as caught:
        dirichlet(_labels(2, 50), 10, alpha=0.01, seed=0, min_size=10)
    assert f"{MAX_RETRIES} draws" in str(caught.value)
    with pytest.raises(ConfigError, match="lower min_size or raise alpha"):
        quantity_skew(100, 10, alpha=0.01, seed=0, min_size=10)


def test_pathological_refuses_to_leave_a_client_empty() -> None:
    # one sample of each class, 3 clients, k = 1: client 2 shares class 0 with client 0
    with pytest.raises(ConfigError, match="left client 2 without samples") as caught:
        pathological([0, 1], 3, classes_per_client=1, seed=0)
    assert "Received: n_clients=3" in str(caught.value)


# ---------------------------------------------------------------- summaries


def test_label_counts_by_hand() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    counts = label_counts(labels, [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])])
    assert counts.dtype == np.int64
    assert counts.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert label_counts(labels, [[5, 3], []]).tolist() == [[0, 0, 2], [0, 0, 0]]


def test_summary_table_by_hand() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    table = summary_table(labels, [[0, 1], [3, 4, 5]], class_names=["cat", "dog", "emu"])
    assert table == (
        "  client  size  cat  dog  emu\n"
        "       0     2    1    1    0\n"
        "       1     3    0    0    3\n"
        "   total     5    1    1    3\n"
        "left out     1    0    1    0\n"
    )
    assert summary_table(labels, [[0, 1, 2, 3, 4, 5]]) == (
        "client  size  0  1  2\n     0     6  1  2  3\n total     6  1  2  3\n"
    )


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([[0, 6]], "indices from 0 to 6"),
        ([[0, -1]], "indices from -1 to 0"),
        ([[0, 1], [1, 2]], "index 1 twice"),
        ([[3, 3]], "index 3 twice"),
        ([[[0, 1]]], "parts[0] with shape (1, 2)"),
        (np.array([[0, 1]]), "parts of type ndarray"),
    ],
)
def test_summaries_check_the_parts(parts: object, expected: str) -> None:
    with pytest.raises(ConfigError, match="Received: ") as caught:
        label_counts([0, 1, 1, 2, 2, 2], parts)  # type: ignore[arg-type]
    assert expected in str(caught.value)


def test_class_names_must_match_the_classes() -> None:
    with pytest.raises(ConfigError, match="class_names"):
        summary_table([0, 1], [[0, 1]], class_names=["only one"])


def test_summary_json_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "partition.json"
    save_summary_json([4, 9, 9, 4, 4], [[0, 2], [1, 3]], path, class_names=["four", "nine"])
    assert json.loads(path.read_text()) == {
        "format": SUMMARY_FORMAT,
        "n_samples": 5,
        "classes": [4, 9],
        "class_names": ["four", "nine"],
        "sizes": [2, 2],
        "counts": [[1, 1], [1, 1]],
        "left_out": [1, 0],
    }
    assert sorted(p.name for p in path.parent.iterdir()) == ["partition.json"]  # no temp left


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_summary_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    labels = _labels(10, 30)
    path = tmp_path / "partition.png"
    path.write_bytes(b"an older picture")
    save_summary_png(labels, dirichlet(labels, 6, alpha=0.3, seed=0), path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000  # bars, labels and a legend, not an empty canvas
    assert [p.name for p in tmp_path.iterdir()] == ["partition.png"]  # replaced, no temp left


def test_summary_png_without_matplotlib_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # (None in sys.modules: ImportError)
    path = tmp_path / "partition.png"
    with pytest.raises(ConfigError, match=r"pip install fedlift\[plots\]"):
        save_summary_png([0, 1], [[0], [1]], path)
    assert not path.exists()


def test_the_package_imports_only_numpy_and_shared_modules() -> None:
    """numpy, the standard library, errors and _atomic at module level; matplotlib only
    inside a function, so ``import fedlift.data`` stays light."""
    allowed = {"__future__", "json", "math", "os", "collections", "numpy"}
    for path in sorted(Path(fedlift.data.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
                assert roots <= allowed, f"{path.name}: {roots}"
            elif isinstance(node, ast.ImportFrom):
                if node.level == 2:
                    assert node.module in {"errors", "_atomic"}, f"{path.name}: {node.module}"
                elif node.level == 0:
                    assert (node.module or "").split(".")[0] in allowed, path.name
                else:
                    assert node.level == 1, path.name
        lazy = [
            node
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef)
            for node in ast.walk(function)
            if isinstance(node, ast.Import | ast.ImportFrom)
        ]
        for node in lazy:
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            assert (module or "").split(".")[0] == "matplotlib", f"{path.name}: {module}"
