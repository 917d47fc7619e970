"""FedAvg's maths: the streaming weighted mean, DIFF updates and metric averaging."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import numpy as np
import pytest

from fedlift.errors import ConfigError, InvalidResultError
from fedlift.model import FLModel, MetaKey, ParamsType
from fedlift.server import StreamingMean, apply_update, weighted_mean, weighted_mean_metrics

WEIGHTS = [1, 2, 5]


def client_params(i: int) -> dict[str, list[np.ndarray]]:
    """Keras-like params of client ``i`` (different values per client, float32)."""
    rng = np.random.default_rng(100 + i)
    return {
        "conv": [
            rng.standard_normal((3, 3, 1, 4)).astype(np.float32),
            rng.standard_normal(4).astype(np.float32),
        ],
        "pool": [],
        "dense": [
            rng.standard_normal((4, 2)).astype(np.float32),
            rng.standard_normal(2).astype(np.float32),
        ],
    }


def result(
    params: Any, weight: float | None, metrics: dict[str, Any] | None = None, kind: Any = None
) -> FLModel:
    meta = {} if weight is None else {MetaKey.NUM_STEPS_CURRENT_ROUND: weight}
    return FLModel(params_type=kind, params=params, metrics=metrics, meta=meta)


def hand_mean(trees: list[dict[str, list[np.ndarray]]], weights: list[float]) -> dict[str, Any]:
    """sum(w_i * x_i) / sum(w_i), in float64, written out leaf by leaf."""
    total = float(sum(weights))
    out: dict[str, list[np.ndarray]] = {}
    for layer in trees[0]:
        out[layer] = []
        for j in range(len(trees[0][layer])):
            acc = np.zeros(trees[0][layer][j].shape, np.float64)
            for tree, w in zip(trees, weights, strict=True):
                acc += w * tree[layer][j].astype(np.float64)
            out[layer].append(acc / total)
    return out


# ---------------------------------------------------------------- FULL


def test_full_weighted_mean_of_three_clients() -> None:
    trees = [client_params(i) for i in range(3)]
    acc = weighted_mean(result(t, w) for t, w in zip(trees, WEIGHTS, strict=True))
    mean = acc.params()
    expected = hand_mean(trees, WEIGHTS)
    assert list(mean) == ["conv", "pool", "dense"]
    assert mean["pool"] == []
    for layer in ("conv", "dense"):
        for got, want in zip(mean[layer], expected[layer], strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert acc.total_weight == 8.0
    assert acc.count == 3
    assert acc.params_type is ParamsType.FULL


def test_small_exact_example() -> None:
    """Hand-computed: (1*[0, 8] + 2*[3, 2] + 5*[6, 0]) / 8 = [36/8, 12/8] = [4.5, 1.5]."""
    xs = [np.array([0.0, 8.0]), np.array([3.0, 2.0]), np.array([6.0, 0.0])]
    acc = weighted_mean(result({"w": x}, w) for x, w in zip(xs, WEIGHTS, strict=True))
    np.testing.assert_allclose(acc.params()["w"], [4.5, 1.5], rtol=1e-12)


def test_default_weight_is_one() -> None:
    xs = [np.array([1.0]), np.array([2.0]), np.array([6.0])]
    acc = weighted_mean(result({"w": x}, None) for x in xs)
    np.testing.assert_allclose(acc.params()["w"], [3.0], rtol=1e-12)
    assert acc.total_weight == 3.0


def test_streaming_add_matches_hand_mean_in_any_order() -> None:
    trees = [client_params(i) for i in range(3)]
    expected = hand_mean(trees, WEIGHTS)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        acc = StreamingMean(trees[0])
        for i in order:
            acc.add(result(trees[i], WEIGHTS[i]), f"site-{i + 1}")
        np.testing.assert_allclose(acc.params()["dense"][0], expected["dense"][0], rtol=1e-6)


def test_single_client_is_returned_exactly() -> None:
    params = client_params(7)
    mean = weighted_mean([result(params, 13)]).params()
    for layer in ("conv", "dense"):
        for got, want in zip(mean[layer], params[layer], strict=True):
            assert got.dtype == np.float32
            assert np.array_equal(got, want)
            assert got is not want  # a copy, not the client's array


def test_float64_and_float16_keep_their_dtype() -> None:
    a = {"w64": np.array([1.0, 2.0]), "w16": np.array([1.0, 3.0], np.float16)}
    b = {"w64": np.array([3.0, 4.0]), "w16": np.array([2.0, 5.0], np.float16)}
    mean = weighted_mean([result(a, 1), result(b, 3)]).params()
    assert mean["w64"].dtype == np.float64 and mean["w16"].dtype == np.float16
    np.testing.assert_allclose(mean["w64"], [2.5, 3.5], rtol=1e-12)
    np.testing.assert_allclose(mean["w16"].astype(np.float64), [1.75, 4.5], rtol=1e-3)


def test_integer_arrays_are_rounded_back_to_their_dtype() -> None:
    # weights 1 and 2: (1*0 + 2*1)/3 = 0.667 -> 1; (1*10 + 2*11)/3 = 10.667 -> 11;
    # (1*-4 + 2*-5)/3 = -4.667 -> -5; (1*7 + 2*7)/3 = 7 -> 7
    a = {"steps": np.array([0, 10, -4, 7], np.int32), "mask": np.array([True, False, True])}
    b = {"steps": np.array([1, 11, -5, 7], np.int32), "mask": np.array([False, False, True])}
    mean = weighted_mean([result(a, 1), result(b, 2)]).params()
    assert mean["steps"].dtype == np.int32
    assert mean["steps"].tolist() == [1, 11, -5, 7]
    # bools: 1/3 -> False, 0 -> False, 1 -> True
    assert mean["mask"].dtype == np.bool_
    assert mean["mask"].tolist() == [False, False, True]


# ---------------------------------------------------------------- DIFF


def test_diff_updates_are_added_to_the_global_model() -> None:
    global_params = client_params(9)
    diffs = [
        {k: [np.full_like(a, (i + 1) * 0.5) for a in v] for k, v in global_params.items()}
        for i in range(3)
    ]
    acc = weighted_mean(result(d, w, kind="diff") for d, w in zip(diffs, WEIGHTS, strict=True))
    assert acc.params_type is ParamsType.DIFF
    mean_diff = acc.params()
    # (1*0.5 + 2*1.0 + 5*1.5) / 8 = 10 / 8 = 1.25
    np.testing.assert_allclose(mean_diff["conv"][0], np.full((3, 3, 1, 4), 1.25), rtol=1e-6)
    new = apply_update(global_params, mean_diff, acc.params_type)
    assert new["pool"] == []
    for layer in ("conv", "dense"):
        for got, base in zip(new[layer], global_params[layer], strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, base.astype(np.float64) + 1.25, rtol=1e-6)


def test_apply_update_full_returns_the_mean() -> None:
    update = {"w": np.array([1.0])}
    assert apply_update({"w": np.array([5.0])}, update, ParamsType.FULL) is update
    assert apply_update({"w": np.array([5.0])}, update, None) is update


def test_apply_update_diff_requires_the_global_layout() -> None:
    with pytest.raises(ConfigError, match="DIFF update must have the global model's layout"):
        apply_update({"w": np.ones(2)}, {"v": np.ones(2)}, ParamsType.DIFF)


def test_apply_update_diff_on_integer_weights() -> None:
    new = apply_update({"n": np.array([3, 4], np.int64)}, {"n": np.array([1, -2])}, ParamsType.DIFF)
    assert new["n"].dtype == np.int64 and new["n"].tolist() == [4, 2]


def test_mixing_full_and_diff_in_a_round_is_refused() -> None:
    acc = StreamingMean(None)
    acc.add(result({"w": np.ones(2)}, 1, kind=ParamsType.FULL), "site-1")
    with pytest.raises(InvalidResultError) as info:
        acc.add(result({"w": np.ones(2)}, 1, kind=ParamsType.DIFF), "site-2")
    message = str(info.value)
    assert "site-2 sent params_type=DIFF" in message
    assert "were FULL" in message

    acc = StreamingMean(None)
    acc.add(result({"w": np.ones(2)}, 1, kind="diff"), "site-1")
    with pytest.raises(InvalidResultError, match="site-2 sent params_type=FULL"):
        acc.add(result({"w": np.ones(2)}, 1), "site-2")


# ---------------------------------------------------------------- layout errors


def test_structure_mismatch_names_missing_and_unexpected_keys() -> None:
    reference = client_params(0)
    acc = StreamingMean(reference)
    wrong = {"conv": reference["conv"], "pool": [], "head": [np.ones((4, 2), np.float32)]}
    with pytest.raises(InvalidResultError) as info:
        acc.add(result(wrong, 1), "site-3")
    message = str(info.value)
    assert "site-3 sent params whose layout differs" in message
    assert "missing: ['dense/0', 'dense/1']" in message
    assert "unexpected: ['head/0']" in message


def test_extra_key_only() -> None:
    acc = StreamingMean({"a": np.ones(1)})
    with pytest.raises(InvalidResultError) as info:
        acc.add(result({"a": np.ones(1), "b": np.ones(1)}, 1), "site-1")
    assert "missing: none" in str(info.value)
    assert "unexpected: ['b']" in str(info.value)


def test_shape_mismatch_names_key_and_both_shapes() -> None:
    reference = client_params(0)
    acc = StreamingMean(reference)
    wrong = client_params(1)
    wrong["dense"][0] = np.ones((5, 2), np.float32)
    with pytest.raises(InvalidResultError) as info:
        acc.add(result(wrong, 1), "site-2")
    message = str(info.value)
    assert "site-2 sent 'dense/0' with shape (5, 2)" in message
    assert "the global model has (4, 2)" in message


def test_non_numeric_dtype_is_refused() -> None:
    acc = StreamingMean({"w": np.ones(2)})
    with pytest.raises(InvalidResultError, match="'w' with non-numeric dtype"):
        acc.add(result({"w": np.array(["a", "b"])}, 1), "site-1")


def test_rejected_result_leaves_the_mean_unchanged() -> None:
    acc = StreamingMean({"w": np.zeros(2)})
    acc.add(result({"w": np.array([2.0, 4.0])}, 1, {"accuracy": 0.5}), "site-1")
    with pytest.raises(InvalidResultError):
        acc.add(result({"w": np.ones(3)}, 100, {"accuracy": 0.0}), "site-2")
    assert acc.count == 1
    assert acc.total_weight == 1.0
    assert acc.metrics() == {"accuracy": 0.5}
    np.testing.assert_array_equal(acc.params()["w"], [2.0, 4.0])


def test_rejected_first_result_does_not_fix_layout_or_kind() -> None:
    acc = StreamingMean(None)
    with pytest.raises(InvalidResultError, match="non-numeric dtype"):
        acc.add(result({"w": np.array(["x"])}, 1, kind="diff"), "site-1")
    assert acc.structure is None and acc.params_type is None and acc.count == 0
    acc.add(result({"v": np.array([1.0, 3.0])}, 1), "site-2")
    assert acc.params_type is ParamsType.FULL
    np.testing.assert_array_equal(acc.params()["v"], [1.0, 3.0])


def test_weighted_mean_of_nothing() -> None:
    with pytest.raises(ConfigError, match="at least one model"):
        weighted_mean([])


def test_bad_weight_is_an_invalid_result() -> None:
    with pytest.raises(InvalidResultError, match="NUM_STEPS_CURRENT_ROUND"):
        weighted_mean([result({"w": np.ones(1)}, 0)])


# ---------------------------------------------------------------- metrics


def test_metrics_weighted_mean_over_reporting_clients() -> None:
    models = [
        result(None, 1, {"accuracy": 0.5, "loss": 2.0, "note": "warm-up"}),
        result(None, 2, {"accuracy": 0.8, "flag": True}),
        result(None, 5, {"accuracy": np.float32(0.25), "loss": np.int64(4), "hist": [1, 2]}),
    ]
    metrics = weighted_mean_metrics(models)
    assert set(metrics) == {"accuracy", "loss"}
    # accuracy: (0.5 + 1.6 + 1.25) / 8 = 3.35 / 8; loss: (1*2 + 5*4) / 6 = 22 / 6
    assert metrics["accuracy"] == pytest.approx(3.35 / 8, rel=1e-9)
    assert metrics["loss"] == pytest.approx(22 / 6, rel=1e-12)


def test_streaming_mean_collects_metrics_with_params() -> None:
    trees = [client_params(i) for i in range(3)]
    acc = StreamingMean(trees[0])
    for i, (tree, w) in enumerate(zip(trees, WEIGHTS, strict=True)):
        acc.add(result(tree, w, {"accuracy": float(i)}), f"site-{i}")
    # (0*1 + 1*2 + 2*5) / 8 = 1.5
    assert acc.metrics() == {"accuracy": 1.5}


def test_metrics_only_results() -> None:
    acc = StreamingMean(None)
    acc.add(FLModel(metrics={"accuracy": 0.9}), "site-1")
    assert acc.params() is None
    assert acc.params_type is None
    assert acc.count == 1
    assert acc.metrics() == {"accuracy": 0.9}
    assert weighted_mean_metrics([]) == {}


# ---------------------------------------------------------------- memory


def test_accumulator_holds_one_set_of_sums() -> None:
    reference = client_params(0)
    acc = StreamingMean(reference)
    refs: list[weakref.ref[np.ndarray]] = []
    for i in range(50):
        params = {k: [a + np.float32(i) for a in v] for k, v in reference.items()}
        refs.extend(weakref.ref(a) for v in params.values() for a in v)
        acc.add(result(params, i + 1), f"site-{i}")
        del params
    gc.collect()
    assert acc.count == 50
    assert acc._sums is not None and len(acc._sums) == 4  # one array per param, not per client
    assert [s.shape for s in acc._sums] == [(3, 3, 1, 4), (4,), (4, 2), (2,)]
    assert all(r() is None for r in refs), "the accumulator kept a client's array"
    # mean over i of (x + i) weighted by (i + 1): x + sum(i (i + 1)) / sum(i + 1) = x + 41650 / 1275
    np.testing.assert_allclose(
        acc.params()["dense"][1], reference["dense"][1].astype(np.float64) + 41650 / 1275, rtol=1e-5
    )


def test_add_many_is_exactly_add_one_after_the_other() -> None:
    rng = np.random.default_rng(11)
    results = [
        FLModel(
            params={"w": rng.normal(size=(200_003,)).astype(np.float32),  # several blocks
                    "i": rng.integers(-9, 9, size=(5, 2)), "b": rng.random(4) > 0.5},
            metrics={"loss": float(k)},
            meta={"NUM_STEPS_CURRENT_ROUND": k + 1},
        )
        for k in range(5)
    ]  # fmt: skip
    one_by_one, batched = StreamingMean(results[0].params), StreamingMean(results[0].params)
    for model in results:
        one_by_one.add(model)
    batched.add_many([("a", results[0]), ("b", results[1])])
    batched.add_many([(f"s{k}", m) for k, m in enumerate(results[2:])])
    a, b = one_by_one.params(), batched.params()
    for key in ("w", "i", "b"):
        np.testing.assert_array_equal(a[key], b[key])  # bit for bit
    assert one_by_one.metrics() == batched.metrics() and batched.count == 5


def test_a_bad_result_in_a_batch_leaves_the_mean_as_it_was() -> None:
    good = FLModel(params={"w": np.ones(3)}, meta={"NUM_STEPS_CURRENT_ROUND": 1})
    bad = FLModel(params={"w": np.ones(4)}, meta={"NUM_STEPS_CURRENT_ROUND": 1})
    mean = StreamingMean(good.params)
    mean.add(good)
    with pytest.raises(InvalidResultError, match="shape"):
        mean.add_many([("ok", good), ("bad", bad)])
    assert mean.count == 1 and mean.total_weight == 1


def test_a_fold_split_over_threads_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large folds run on several threads, each on its own share of the elements; the
    result must not depend on the split (nor on the block size)."""
    from fedlift.server import _aggregate

    rng = np.random.default_rng(5)
    trees = [
        {"a": rng.normal(size=(301, 7)).astype(np.float32),
         "b": rng.normal(size=(5_003,)).astype(np.float32),
         "c": rng.integers(-50, 50, size=(999,)), "d": np.zeros(0, np.float32)}
        for _ in range(4)
    ]  # fmt: skip
    results = [result(t, w) for t, w in zip(trees, [3, 1, 3, 7], strict=True)]

    def mean_of(threads: int, block_bytes: int) -> dict[str, Any]:
        monkeypatch.setattr(_aggregate, "_thread_count", lambda: threads)
        monkeypatch.setattr(_aggregate, "_THREAD_MIN", 1)
        monkeypatch.setattr(_aggregate, "_BLOCK_BYTES", block_bytes)
        acc = StreamingMean(trees[0])
        acc.add_many([("s0", results[0]), ("s1", results[1])])
        acc.add(results[2], "s2")
        acc.add(results[3], "s3")
        return acc.params()

    one = mean_of(1, 1 << 20)
    for threads, block in ((2, 4096), (3, 1 << 20), (4, 8192)):
        other = mean_of(threads, block)
        for key in one:
            np.testing.assert_array_equal(one[key], other[key])
    want = hand_mean([{k: [v] for k, v in t.items()} for t in trees], [3, 1, 3, 7])
    np.testing.assert_allclose(one["a"], want["a"][0], rtol=1e-5, atol=1e-6)
    assert one["c"].dtype == trees[0]["c"].dtype


def test_split_covers_every_element_once() -> None:
    from fedlift.server._aggregate import _split

    pieces = [(0, 0, 10), (1, 0, 3), (2, 0, 20)]
    for count in (1, 2, 3, 5, 33):
        shares = _split(pieces, 33, count)
        assert len(shares) <= count
        covered = sorted((i, k) for share in shares for i, lo, hi in share for k in range(lo, hi))
        assert covered == sorted((i, k) for i, lo, hi in pieces for k in range(lo, hi))


def test_float16_sums_do_not_overflow_with_uneven_weights() -> None:
    # Weighted sums of float16 would reach 1000 + 1000 * 1000 > 65504 (float16's maximum).
    a = {"w": np.array([1000.0, -1000.0], np.float16)}
    mean = weighted_mean([result(a, 1), result(a, 1000)]).params()
    assert mean["w"].dtype == np.float16
    np.testing.assert_array_equal(mean["w"], a["w"])


def test_results_added_after_params_still_count() -> None:
    xs = [np.array([0.0, 8.0], np.float32), np.array([4.0, 0.0], np.float32)]
    acc = StreamingMean({"w": xs[0]})
    acc.add(result({"w": xs[0]}, 1))
    acc.add(result({"w": xs[1]}, 3))
    np.testing.assert_allclose(acc.params()["w"], [3.0, 2.0])  # (0 + 12) / 4, (8 + 0) / 4
    acc.add(result({"w": np.array([8.0, 8.0], np.float32)}, 4))
    np.testing.assert_allclose(acc.params()["w"], [5.5, 5.0])  # (12 + 32) / 8, (8 + 32) / 8


def test_knowing_the_count_scales_in_the_last_pass_with_the_same_result() -> None:
    trees = [client_params(i) for i in range(3)]
    results = [result(t, w) for t, w in zip(trees, WEIGHTS, strict=True)]
    plain, told = StreamingMean(trees[0]), StreamingMean(trees[0], expected=3)
    for i, model in enumerate(results):
        plain.add(model, f"site-{i}")
        told.add(model, f"site-{i}")
    assert told._base == told.total_weight  # the sums already are the mean
    a, b = plain.params(), told.params()
    for layer in ("conv", "dense"):
        for x, y in zip(a[layer], b[layer], strict=True):
            np.testing.assert_array_equal(x, y)
    short = StreamingMean(trees[0], expected=5)  # fewer results came: params() scales
    for model in results:
        short.add(model)
    np.testing.assert_array_equal(short.params()["dense"][0], a["dense"][0])
