"""Robust aggregation: coordinate median, trimmed mean, Krum / Multi-Krum, and Mean.

Known answers are worked out by hand in the comments (small arrays, literal arithmetic);
the attack test checks that each rule stays with the honest clients when one or two of six
send scaled or sign-flipped updates, while the plain mean does not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlift import FLModel, ParamsType
from fedlift.errors import ConfigError, InvalidResultError
from fedlift.server import (
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Mean,
    StreamingMean,
    _robust,
    coordinate_median,
    krum_scores,
    multikrum,
    trimmed_mean,
)
from fedlift.server._seam import Aggregate, Aggregator, Memory

PLAIN = Memory()


def result(params: dict[str, Any], weight: Any = 1.0, **extra_meta: Any) -> FLModel:
    return FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": weight, **extra_meta})


def one(values: list[float]) -> list[np.ndarray]:
    """One client's update: a single 1-D array."""
    return [np.array(values, np.float64)]


# Five clients, one array of three values each. Per coordinate, sorted:
#   coord 0: 1, 2, 4, 8, 100        median 4    trimmed (beta=0.2, k=1): (2+4+8)/3 = 14/3
#   coord 1: -5, 0, 3, 7, 10        median 3    trimmed: (0+3+7)/3 = 10/3
#   coord 2: -3, .25, .5, .5, 1.5   median .5   trimmed: (.25+.5+.5)/3 = 1.25/3
FIVE = [
    [1.0, 10.0, 0.5],
    [2.0, -5.0, 0.25],
    [4.0, 3.0, 0.5],
    [8.0, 0.0, 1.5],
    [100.0, 7.0, -3.0],
]
FIVE_MEDIAN = [4.0, 3.0, 0.5]
FIVE_TRIMMED = [14 / 3, 10 / 3, 1.25 / 3]

# Krum, f=1, five clients on a line at 0, 1, 3, 7, 20: each scores the sum of its
# n - f - 2 = 2 smallest squared distances to the others.
#   0: {1, 9, 49, 400} -> 1 + 9 = 10       1: {1, 4, 36, 361} -> 1 + 4 = 5
#   3: {9, 4, 16, 289} -> 4 + 9 = 13       7: {49, 36, 16, 169} -> 16 + 36 = 52
#   20: {400, 361, 289, 169} -> 169 + 289 = 458
LINE = [0.0, 1.0, 3.0, 7.0, 20.0]
LINE_SCORES = [10.0, 5.0, 13.0, 52.0, 458.0]


def start(factory: Any, reference: dict[str, Any], n: int, **kwargs: Any) -> Aggregator:
    agg: Aggregator = factory(reference, expected=n, memory=PLAIN, strict=False, **kwargs)
    return agg


def run(factory: Any, reference: dict[str, Any], models: list[FLModel], **kw: Any) -> Aggregate:
    agg = start(factory, reference, len(models), **kw)
    agg.add([(f"site-{i + 1}", m) for i, m in enumerate(models)])
    return agg.result()


# --------------------------------------------------------------- known answers, pure


def test_coordinate_median_known_answer() -> None:
    out = coordinate_median([one(v) for v in FIVE])
    np.testing.assert_array_equal(out[0], FIVE_MEDIAN)
    # An even count: the mean of the two middle values, (2 + 4) / 2 = 3.
    np.testing.assert_array_equal(coordinate_median([one([x]) for x in (8, 1, 4, 2)])[0], [3])


def test_trimmed_mean_known_answer() -> None:
    np.testing.assert_allclose(trimmed_mean([one(v) for v in FIVE], 0.2)[0], FIVE_TRIMMED)
    # beta=0 is the plain mean: coord 0 = (1+2+4+8+100)/5 = 23.
    assert trimmed_mean([one(v) for v in FIVE], 0.0)[0][0] == 23.0
    # beta=0.4 of 5: floor(2.0) = 2 each side, leaving the median.
    np.testing.assert_allclose(trimmed_mean([one(v) for v in FIVE], 0.4)[0], FIVE_MEDIAN)
    # A decimal beta drops what it says: 0.29 of 100 is 29 each side (0.29*100 is 28.999...).
    # Squares, so that dropping 28 (the mean of 28**2 .. 71**2) gives another answer.
    hundred = [one([float(i * i)]) for i in range(100)]
    expected = sum(i * i for i in range(29, 71)) / 42
    assert trimmed_mean(hundred, 0.29)[0][0] == pytest.approx(expected)


def test_krum_scores_known_answer() -> None:
    np.testing.assert_allclose(krum_scores([one([x]) for x in LINE], 1), LINE_SCORES)


def test_krum_scores_sum_over_every_array() -> None:
    # Points (a, b) in two arrays: (0,0) (1,0) (0,2) (3,3) (10,0); squared distances:
    #   01=1 02=4 03=18 04=100 12=5 13=13 14=81 23=10 24=104 34=58
    # f=1, two nearest: 0: 1+4=5  1: 1+5=6  2: 4+5=9  3: 10+13=23  4: 58+81=139
    points = [(0, 0), (1, 0), (0, 2), (3, 3), (10, 0)]
    updates = [[np.array([a], np.float32), np.array([[b]], np.float64)] for a, b in points]
    np.testing.assert_allclose(krum_scores(updates, 1), [5, 6, 9, 23, 139])


def test_multikrum_known_answer() -> None:
    updates = [one([x]) for x in LINE]
    weights = [1.0, 2.0, 1.0, 1.0, 1.0]
    # Krum: the lowest score is client 1 (5), whose update is 1.
    mean, selected = multikrum(updates, weights, 1, 1)
    assert selected == [1] and mean[0][0] == 1.0
    # m=3: clients 1, 0, 2 (scores 5, 10, 13); weighted mean (2*1 + 1*0 + 1*3) / 4 = 1.25.
    mean, selected = multikrum(updates, weights, 1, 3)
    assert selected == [1, 0, 2] and mean[0][0] == 1.25


def test_output_in_the_given_dtypes_and_arrays() -> None:
    updates = [
        [np.array([v], np.float64), np.array([i, 2 * i], np.int64)] for i, v in enumerate(LINE)
    ]
    out = [np.empty(1, np.float32), np.empty(2, np.int32)]
    got = trimmed_mean(updates, 0.2, out=out)
    assert got is out and out[0].dtype == np.float32 and out[1].dtype == np.int32
    # floats: (1 + 3 + 7) / 3 = 11/3; ints 0..4 -> (1+2+3)/3 = 2, doubled (2+4+6)/3 = 4.
    assert out[0][0] == np.float32(11 / 3)
    np.testing.assert_array_equal(out[1], [2, 4])
    # Integer medians round to the nearest: median of 1, 2 (even count) is 1.5 -> 2.
    ints = coordinate_median([[np.array([1], np.int32)], [np.array([2], np.int32)]])
    assert ints[0].dtype == np.int32 and ints[0][0] == 2


def test_complex_leaves_take_real_and_imaginary_parts_apart() -> None:
    # Medians per part: real 1, 2, 9 -> 2; imaginary 5, -1, 0 -> 0.
    values = [1 + 5j, 2 - 1j, 9 + 0j]
    out = coordinate_median([[np.array([z], np.complex64)] for z in values])
    assert out[0].dtype == np.complex64 and out[0][0] == 2 + 0j


def test_blocks_give_the_same_answer_as_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    updates = [
        [rng.normal(size=(7, 5)).T, rng.normal(size=13).astype(np.float32)]  # .T: a view
        for _ in range(6)
    ]
    whole = [np.stack([u[i] for u in updates]) for i in range(2)]
    monkeypatch.setattr(_robust, "_BLOCK_BYTES", 6 * 8 * 3)  # three elements per block
    median = coordinate_median(updates)
    for got, stack in zip(median, whole, strict=True):
        np.testing.assert_allclose(got, np.median(stack, axis=0), rtol=1e-6)
    trimmed = trimmed_mean(updates, 0.2)  # k=1 of 6
    for got, stack in zip(trimmed, whole, strict=True):
        np.testing.assert_allclose(got, np.sort(stack, axis=0)[1:5].mean(axis=0), rtol=1e-6)
    scores = krum_scores(updates, 1)
    monkeypatch.setattr(_robust, "_BLOCK_BYTES", 1 << 22)
    np.testing.assert_allclose(scores, krum_scores(updates, 1), rtol=1e-12)


def test_full_params_are_the_same_as_updates() -> None:
    """median(x_i) = x + median(x_i - x): the rules may take FULL models as they are."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=20) * 1000
    deltas = [rng.normal(size=20) for _ in range(7)]
    models = [[x + d] for d in deltas]
    updates = [[d] for d in deltas]
    np.testing.assert_allclose(coordinate_median(models)[0], x + coordinate_median(updates)[0])
    np.testing.assert_allclose(
        trimmed_mean(models, 0.3)[0], x + trimmed_mean(updates, 0.3)[0], rtol=1e-12
    )
    np.testing.assert_allclose(krum_scores(models, 2), krum_scores(updates, 2), rtol=1e-9)
    w = [1.0, 2, 3, 4, 5, 6, 7]
    full, chosen_full = multikrum(models, w, 2, 3)
    diff, chosen_diff = multikrum(updates, w, 2, 3)
    assert chosen_full == chosen_diff
    np.testing.assert_allclose(full[0], x + diff[0], rtol=1e-12)


def test_pure_functions_refuse_bad_arguments() -> None:
    five = [one([x]) for x in LINE]
    with pytest.raises(ConfigError, match=r"Received: n=0"):
        coordinate_median([])
    with pytest.raises(ConfigError, match=r"shape"):
        coordinate_median([one([1, 2]), one([1])])
    with pytest.raises(ConfigError, match=r"Received: len\(update 1\)=2"):
        coordinate_median([one([1]), [np.ones(1), np.ones(1)]])
    for beta in (0.5, -0.1, True, "0.2", float("nan")):
        with pytest.raises(ConfigError, match=r"Received: beta="):
            trimmed_mean(five, beta)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Received: n=4, f=1"):
        krum_scores(five[:4], 1)  # needs n > 2f + 2 = 4
    with pytest.raises(ConfigError, match=r"Received: f=-1"):
        krum_scores(five, -1)
    with pytest.raises(ConfigError, match=r"Received: m=5"):
        multikrum(five, [1.0] * 5, 1, 5)  # at most n - f = 4
    with pytest.raises(ConfigError, match=r"Received: m=0"):
        multikrum(five, [1.0] * 5, 1, 0)
    with pytest.raises(ConfigError, match=r"weights"):
        multikrum(five, [1.0, 1.0, 1.0, 1.0, 0.0], 1, 1)
    with pytest.raises(ConfigError, match=r"Received: len\(weights\)=2"):
        multikrum(five, [1.0, 1.0], 1, 1)


# --------------------------------------------------------------- the aggregators


def five_models() -> list[FLModel]:
    weights = [1, 2, 3, 4, 5]
    return [
        result({"w": np.array(v, np.float32)}, weights[i], **{"cv": {"c": np.array([float(i)])}})
        for i, v in enumerate(FIVE)
    ]


def test_fedmedian_aggregator_known_answer() -> None:
    agg = start(FedMedian(), {"w": np.zeros(3, np.float32)}, 5, extras=("cv",))
    assert agg.streaming is True  # reads each result during add (copies it if lazy)
    models = five_models()
    for i, m in enumerate(models):
        m.metrics = {"loss": float(i)}
    agg.add([("site-1", models[0]), ("site-2", models[1])])  # in two calls
    agg.add([(f"site-{i + 1}", m) for i, m in enumerate(models) if i >= 2])
    out = agg.result()
    assert out.params["w"].dtype == np.float32
    np.testing.assert_array_equal(out.params["w"], FIVE_MEDIAN)
    assert out.params_type is ParamsType.FULL and out.count == 5 and out.total_weight == 15
    # Weighted metrics: (0*1 + 1*2 + 2*3 + 3*4 + 4*5) / 15 = 40/15.
    assert out.metrics == {"loss": pytest.approx(40 / 15)}
    # The extra takes the same rule: the median of 0, 1, 2, 3, 4 is 2.
    np.testing.assert_array_equal(out.meta["cv"]["c"], [2.0])


def test_fedtrimmedavg_aggregator_known_answer() -> None:
    out = run(
        FedTrimmedAvg(beta=0.2), {"w": np.zeros(3, np.float32)}, five_models(), extras=("cv",)
    )
    np.testing.assert_allclose(out.params["w"], FIVE_TRIMMED, rtol=1e-6)
    # The extra: 0..4 without 0 and 4 -> (1+2+3)/3 = 2.
    np.testing.assert_array_equal(out.meta["cv"]["c"], [2.0])


def test_krum_aggregator_known_answer() -> None:
    models = [
        result({"w": np.array([x])}, w, cv={"c": np.array([10.0 * i])})
        for i, (x, w) in enumerate(zip(LINE, [1, 2, 1, 1, 1], strict=True))
    ]
    agg = start(Krum(f=1, m=3), {"w": np.zeros(1)}, 5, extras=("cv",))
    agg.add([(f"site-{i}", m) for i, m in enumerate(models)])
    out = agg.result()
    # Selected: clients 1, 0, 2 -> (2*1 + 0 + 3) / 4 = 1.25; their extras (2*10 + 0 + 20)/4.
    assert out.params["w"][0] == 1.25
    assert out.meta["cv"]["c"][0] == 10.0
    assert agg.selected == ["site-1", "site-0", "site-2"]  # type: ignore[attr-defined]
    assert out.total_weight == 6 and out.count == 5
    krum = run(Krum(), {"w": np.zeros(1)}, models)
    assert krum.params["w"][0] == 1.0


def test_output_goes_to_the_allocated_arrays() -> None:
    made: list[np.ndarray] = []

    def allocate(specs: list[tuple[tuple[int, ...], np.dtype[Any]]]) -> list[np.ndarray]:
        arrays = [np.full(shape, -1, dtype) for shape, dtype in specs]
        made.extend(arrays)
        return arrays

    reference = {"w": np.zeros(3, np.float32), "n": np.zeros(2, np.int16)}
    models = [
        result({"w": np.array(v, np.float32), "n": np.array([i, 1], np.int64)})
        for i, v in enumerate(FIVE)
    ]
    for factory in (FedMedian(), FedTrimmedAvg(), Krum(), Mean()):
        made.clear()
        agg = factory(reference, expected=5, memory=Memory(allocate=allocate), strict=True)
        agg.add([(f"site-{i}", m) for i, m in enumerate(models)])
        out = agg.result()
        # The model's dtypes, in the allocator's arrays.
        assert out.params["w"].dtype == np.float32 and out.params["n"].dtype == np.int16
        assert any(np.shares_memory(out.params["w"], a) for a in made), factory


def test_results_without_params_count_for_metrics_only() -> None:
    models = five_models()[:3] + [FLModel(metrics={"acc": 1.0})]
    models[0].metrics = {"acc": 0.0}
    out = run(FedMedian(), {"w": np.zeros(3, np.float32)}, models)
    # Median of the three with params, per coordinate: (1,2,4)->2, (10,-5,3)->3, (.5,.25,.5)->.5
    np.testing.assert_array_equal(out.params["w"], [2.0, 3.0, 0.5])
    assert out.count == 4 and out.total_weight == 6  # weights 1 + 2 + 3
    assert out.metrics == {"acc": 0.5}  # (0*1 + 1*1) / 2
    nothing = run(FedMedian(), {"w": np.zeros(3)}, [FLModel(metrics={"acc": 1.0})])
    assert nothing.params is None and nothing.params_type is None and nothing.count == 1


# --------------------------------------------------------------- refusals


def refusals() -> list[tuple[str, FLModel, str]]:
    nan = np.array([1.0, np.nan, 3.0], np.float32)
    return [
        ("nan", result({"w": nan}), r"site-9 sent 'w' with a value that is not finite"),
        ("inf", result({"w": np.array([1, np.inf, 3], np.float32)}), r"Received: w\[1\]=inf"),
        ("shape", result({"w": np.zeros(4, np.float32)}), r"site-9 sent 'w' with shape \(4,\)"),
        ("layout", result({"v": np.zeros(3, np.float32)}), r"site-9 .*missing: \['w'\]"),
        ("kind", result({"w": np.zeros(3, np.int32)}), r"Received: w.dtype=int32"),
        ("weight", result({"w": np.zeros(3, np.float32)}, 0), r"site-9 sent an aggregation"),
        (
            "type",
            FLModel(params_type=ParamsType.DIFF, params={"w": np.zeros(3, np.float32)}),
            r"site-9 sent params_type=DIFF",
        ),
    ]


@pytest.mark.parametrize("factory", [FedMedian(), FedTrimmedAvg(), Krum()], ids=repr)
@pytest.mark.parametrize("case", refusals(), ids=lambda c: c[0])
def test_a_refused_result_changes_nothing(factory: Any, case: tuple[str, FLModel, str]) -> None:
    _, bad, message = case
    models = five_models()
    agg = start(factory, {"w": np.zeros(3, np.float32)}, 6)
    agg.add([(f"site-{i + 1}", m) for i, m in enumerate(models[:3])])
    with pytest.raises(InvalidResultError, match=message):
        agg.add([("site-4", models[3]), ("site-9", bad)])  # the good one is refused too
    agg.add([(f"site-{i + 1}", m) for i, m in enumerate(models) if i >= 3])
    out = agg.result()
    assert out.count == 5 and out.params_type is ParamsType.FULL
    expected = run(factory, {"w": np.zeros(3, np.float32)}, models)
    np.testing.assert_array_equal(out.params["w"], expected.params["w"])


def test_refusals_match_the_streaming_mean() -> None:
    """Both check results with one function: the same result is refused alike."""
    for name, bad, _ in refusals():
        if name == "type":  # a fresh round takes DIFF as well as FULL
            continue
        mean = StreamingMean({"w": np.zeros(3, np.float32)}, prescan=True)
        with pytest.raises(InvalidResultError) as streaming:
            mean.add_many([("site-9", bad)])
        median = start(FedMedian(), {"w": np.zeros(3, np.float32)}, 2)
        with pytest.raises(InvalidResultError) as collecting:
            median.add([("site-9", bad)])
        assert str(streaming.value) == str(collecting.value), name


def test_extras_are_checked_too() -> None:
    agg = start(FedMedian(), {"w": np.zeros(3, np.float32)}, 5, extras=("cv",))
    with pytest.raises(InvalidResultError, match=r"site-9 sent no meta\['cv'\]"):
        agg.add([("site-9", result({"w": np.zeros(3, np.float32)}))])
    good = five_models()
    agg.add([("site-1", good[0])])
    bad = result({"w": np.zeros(3, np.float32)}, cv={"c": np.array([np.nan])})
    with pytest.raises(InvalidResultError, match=r"site-9 \(meta\['cv'\]\) sent 'c'"):
        agg.add([("site-9", bad)])
    odd = result({"w": np.zeros(3, np.float32)}, cv={"c": np.zeros(2)})
    with pytest.raises(InvalidResultError, match=r"site-9 \(meta\['cv'\]\) sent 'c' with shape"):
        agg.add([("site-9", odd)])
    agg.add([("site-2", good[1]), ("site-3", good[2])])
    np.testing.assert_array_equal(agg.result().meta["cv"]["c"], [1.0])  # median of 0, 1, 2


def test_krum_needs_enough_results() -> None:
    with pytest.raises(ConfigError, match=r"Received: expected=4"):
        start(Krum(f=1), {"w": np.zeros(3)}, 4)
    with pytest.raises(ConfigError, match=r"Received: expected=5"):
        start(Krum(f=1, m=5), {"w": np.zeros(3)}, 5)  # m + f = 6
    agg = start(Krum(f=1), {"w": np.zeros(3, np.float32)}, 6)
    agg.add([(f"site-{i}", m) for i, m in enumerate(five_models()[:4])])  # two never came
    with pytest.raises(ConfigError, match=r"Received: n=4, f=1, m=1"):
        agg.result()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FedTrimmedAvg(beta=0.5), r"Received: beta=0.5"),
        (lambda: FedTrimmedAvg(beta=-0.01), r"Received: beta=-0.01"),
        (lambda: FedTrimmedAvg(beta="0.2"), r"Received: beta='0.2'"),
        (lambda: Krum(f=-1), r"Received: f=-1"),
        (lambda: Krum(f=1.5), r"Received: f=1.5"),
        (lambda: Krum(m=0), r"Received: m=0"),
        (lambda: Krum(m=True), r"Received: m=True"),
    ],
)
def test_factories_check_their_settings(make: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


# --------------------------------------------------------------- Mean


def test_mean_aggregator_known_answer() -> None:
    models = [
        result({"w": np.array([1.0, 2.0])}, 1, cv={"c": np.array([10.0])}),
        result({"w": np.array([4.0, 8.0])}, 3, cv={"c": np.array([20.0])}),
    ]
    models[0].metrics, models[1].metrics = {"loss": 2.0}, {"loss": 6.0}
    agg = Mean()({"w": np.zeros(2)}, expected=2, memory=PLAIN, strict=True, extras=("cv",))
    assert agg.streaming is True
    agg.add([("site-1", models[0])])
    agg.add([("site-2", models[1])])
    out = agg.result()
    # (1*1 + 3*4)/4 = 3.25, (1*2 + 3*8)/4 = 6.5; extra (10 + 60)/4 = 17.5; loss (2+18)/4 = 5.
    np.testing.assert_array_equal(out.params["w"], [3.25, 6.5])
    np.testing.assert_array_equal(out.meta["cv"]["c"], [17.5])
    assert out.metrics == {"loss": 5.0} and out.total_weight == 4 and out.count == 2
    assert out.params_type is ParamsType.FULL


def test_mean_refuses_a_result_and_changes_nothing_when_strict() -> None:
    agg = Mean()({"w": np.zeros(2)}, expected=3, memory=PLAIN, strict=True, extras=("cv",))
    agg.add([("site-1", result({"w": np.array([1.0, 2.0])}, cv={"c": np.array([1.0])}))])
    nan_params = result({"w": np.array([np.nan, 2.0])}, cv={"c": np.array([1.0])})
    nan_extra = result({"w": np.array([1.0, 2.0])}, cv={"c": np.array([np.inf])})
    no_extra = result({"w": np.array([1.0, 2.0])})
    for site, bad, message in [
        ("site-8", nan_params, r"site-8 sent 'w' with a value that is not finite"),
        ("site-9", nan_extra, r"site-9 \(meta\['cv'\]\) sent 'c' with a value that is not"),
        ("site-7", no_extra, r"site-7 sent no meta\['cv'\]"),
    ]:
        with pytest.raises(InvalidResultError, match=message):
            agg.add(
                [("site-2", result({"w": np.array([5.0, 6.0])}, cv={"c": np.ones(1)})), (site, bad)]
            )
    agg.add([("site-2", result({"w": np.array([3.0, 4.0])}, cv={"c": np.array([3.0])}))])
    out = agg.result()
    np.testing.assert_array_equal(out.params["w"], [2.0, 3.0])  # (1+3)/2, (2+4)/2
    np.testing.assert_array_equal(out.meta["cv"]["c"], [2.0])
    assert out.count == 2


# --------------------------------------------------------------- the attack


ATTACKS = {
    "one x100": [("scale", 0)],
    "one sign-flipped": [("flip", 0)],
    "two x100": [("scale", 0), ("scale", 1)],
    "x100 and sign-flipped": [("scale", 0), ("flip", 1)],
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_robust_rules_stay_with_the_honest_clients(attack: str) -> None:
    rng = np.random.default_rng(7)
    center = rng.normal(size=200)
    honest = [center + 0.01 * rng.normal(size=200) for _ in range(6)]
    sent = [h.copy() for h in honest]
    for how, i in ATTACKS[attack]:
        sent[i] = 100.0 * honest[i] if how == "scale" else -honest[i]
    bad = {i for _, i in ATTACKS[attack]}
    kept = np.array([h for i, h in enumerate(honest) if i not in bad])
    honest_mean = kept.mean(axis=0)
    # Spread: the diagonal of the honest values' bounding box. The median and the trimmed
    # mean (dropping at least as many values per side as there are attackers) lie inside
    # that box, and so does any mean of honest updates.
    spread = float(np.linalg.norm(kept.max(axis=0) - kept.min(axis=0)))
    models = [result({"w": s}, 1.0) for s in sent]
    reference = {"w": np.zeros(200)}

    def distance(factory: Any) -> float:
        out = run(factory, reference, models)
        return float(np.linalg.norm(out.params["w"] - honest_mean))

    plain = distance(Mean())
    assert plain > 10 * spread  # the mean follows the attackers, far out of the box
    for factory in (FedMedian(), FedTrimmedAvg(beta=0.4), Krum(f=1, m=1), Krum(f=1, m=3)):
        assert distance(factory) < spread, factory
    agg = start(Krum(f=1, m=3), reference, 6)
    agg.add([(f"site-{i}", m) for i, m in enumerate(models)])
    agg.result()
    assert not {f"site-{i}" for i in bad} & set(agg.selected)  # type: ignore[attr-defined]


# --------------------------------------------------------------- properties


@st.composite
def client_updates(draw: st.DrawFn) -> list[list[np.ndarray]]:
    n = draw(st.integers(1, 7))
    d = draw(st.integers(1, 4))
    values = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=64)
    return [[np.array(draw(st.lists(values, min_size=d, max_size=d)))] for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(client_updates(), st.floats(0.0, 0.49), st.data())
def test_properties(updates: list[list[np.ndarray]], beta: float, data: st.DataObject) -> None:
    stack = np.stack([u[0] for u in updates])
    low, high = stack.min(axis=0), stack.max(axis=0)
    median = coordinate_median(updates)[0]
    trimmed = trimmed_mean(updates, beta)[0]
    # Within the clients' values, per coordinate (a mean of equal values may round an ulp
    # off them).
    assert (low <= median).all() and (median <= high).all()
    slack = 1e-12 * (1 + np.abs(stack).max())
    assert (low - slack <= trimmed).all() and (trimmed <= high + slack).all()
    order = data.draw(st.permutations(range(len(updates))))
    shuffled = [updates[i] for i in order]
    np.testing.assert_array_equal(coordinate_median(shuffled)[0], median)
    np.testing.assert_allclose(trimmed_mean(shuffled, beta)[0], trimmed, rtol=1e-12, atol=1e-6)
    if len(updates) >= 5:
        scores = krum_scores(updates, 1)
        np.testing.assert_allclose(krum_scores(shuffled, 1), scores[order], rtol=1e-12)


def test_the_sorting_network_sorts_every_input_by_the_zero_one_principle() -> None:
    """A compare-exchange network sorts every input iff it sorts every 0/1 input (Knuth,
    TAOCP 5.3.4): checked exhaustively up to 12 inputs, and by random draws beyond."""
    import itertools

    from fedlift.server._robust import _network

    for n in range(1, 13):
        pairs = _network(n)
        for bits in itertools.product((0, 1), repeat=n):
            x = list(bits)
            for a, b in pairs:
                if x[a] > x[b]:
                    x[a], x[b] = x[b], x[a]
            assert x == sorted(x), (n, bits)
    rng = np.random.default_rng(0)
    for n in (13, 17, 31, 64):
        pairs = _network(n)
        for _ in range(50):
            x = list(rng.random(n))
            for a, b in pairs:
                if x[a] > x[b]:
                    x[a], x[b] = x[b], x[a]
            assert x == sorted(x)


def test_the_fast_median_agrees_with_numpy_for_every_client_count() -> None:
    from fedlift.server import coordinate_median, trimmed_mean

    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 5, 8, 13, 64, 65):
        updates = [[rng.standard_normal(70_001).astype(np.float32)] for _ in range(n)]
        stack = np.stack([u[0].astype(np.float64) for u in updates])
        np.testing.assert_allclose(coordinate_median(updates)[0], np.median(stack, axis=0),
                                   rtol=1e-6)  # fmt: skip
        k = int(0.2 * n)
        expected = np.sort(stack, axis=0)[k : n - k].mean(axis=0)
        np.testing.assert_allclose(trimmed_mean(updates, 0.2)[0], expected, rtol=1e-5,
                                   atol=1e-6)  # fmt: skip


def test_a_collecting_aggregator_copies_lazy_results_into_reused_buffers() -> None:
    """Results still in a client's memory (anything with ``read_into``) are copied during
    add; the copies are pooled: the next round's aggregator reuses the same buffers."""
    from fedlift.server import FedMedian, Memory
    from fedlift.server._robust import _buffers

    class Lazy:
        def __init__(self, values: np.ndarray) -> None:
            self._values, self.shape, self.dtype = values, values.shape, values.dtype
            self.size = values.size
            self.reads = 0

        def read_into(self, out: np.ndarray, start: int = 0) -> None:
            self.reads += 1
            out[...] = self._values.reshape(-1)[start : start + out.size]

    _buffers.clear()
    seen: list[int] = []
    for _ in range(2):
        agg = FedMedian()({"w": np.zeros(3)}, expected=3, memory=Memory(), strict=False)
        lazy = [Lazy(np.array([v, 2 * v, 3 * v])) for v in (1.0, 5.0, 2.0)]
        agg.add([(f"site-{i}", FLModel(params={"w": x})) for i, x in enumerate(lazy)])  # type: ignore[dict-item]
        seen.append(len(_buffers._free.get(((3,), np.dtype(np.float64).str), [])))
        out = agg.result()
        np.testing.assert_allclose(out.params["w"], [2.0, 4.0, 6.0])  # the median
        assert all(x.reads == 1 for x in lazy)
    assert seen == [0, 0]  # every buffer in use during the round ...
    assert len(_buffers._free[((3,), np.dtype(np.float64).str)]) == 3  # ... and back after
