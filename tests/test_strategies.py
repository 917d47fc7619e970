"""Known-answer tests of every strategy, on the in-memory controller (``run_local``).

Each test writes out the paper's update rule for small arrays by hand and checks the global
model the run produced against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlift.errors import ConfigError
from fedlift.model import FLModel, MetaKey, ParamsType
from fedlift.server import (
    FEDPROX_MU,
    SCAFFOLD_CTRL_DIFF,
    SCAFFOLD_CTRL_GLOBAL,
    Cyclic,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Scaffold,
    Strategy,
    cyclic_order,
    sample_sites,
    strategy_from_spec,
    strategy_to_spec,
)
from fedlift.simulator import run_local

Fn = Callable[[str, FLModel], FLModel]


def run(strategy: Strategy, fn: Fn, initial: dict[str, Any], n: int, rounds: int, **kw: Any) -> Any:
    return run_local(
        fn, initial, n_clients=n, num_rounds=rounds, strategy=strategy, quiet=True, threads=1, **kw
    )


def fixed(answers: dict[str, list[float]], weights: dict[str, float] | None = None) -> Fn:
    """Clients that answer the same FULL model every round (site -> values of "w")."""

    def fn(site: str, model: FLModel) -> FLModel:
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: (weights or {}).get(site, 1.0)}
        return FLModel(params={"w": np.array(answers[site], np.float32)}, meta=meta)

    return fn


# ---------------------------------------------------------------------------- FedAvg
def test_fedavg_weighted_mean_known_answer() -> None:
    # (2*1 + 4*3) / 4 = 3.5 and (-1*1 + -3*3) / 4 = -2.5
    fn = fixed({"site-1": [2, -1], "site-2": [4, -3]}, {"site-1": 1, "site-2": 3})
    result = run(FedAvg(), fn, {"w": np.array([1.0, -2.0], np.float32)}, 2, 1)
    np.testing.assert_allclose(result.params["w"], [3.5, -2.5])


def test_sampling_is_seeded_per_round_and_keeps_min_clients() -> None:
    sites = [f"site-{i}" for i in range(1, 11)]
    a = sample_sites(sites, 3, fraction=0.3, seed=7)
    assert len(a) == 3 and set(a) <= set(sites)
    assert a == sample_sites(sites, 3, fraction=0.3, seed=7)  # same seed, same round
    assert a == sorted(a, key=sites.index)  # the sites keep their order
    rounds = {tuple(sample_sites(sites, r, fraction=0.3, seed=7)) for r in range(10)}
    assert len(rounds) > 1  # rounds differ
    assert len(sample_sites(sites, 0, fraction=0.1, min_clients=4)) == 4
    assert len(sample_sites(sites, 0, clients_per_round=5)) == 5
    assert sample_sites(sites, 0, fraction=1.0) == sites


def test_sampled_clients_are_the_only_ones_asked() -> None:
    seen: dict[int, list[str]] = {}

    def fn(site: str, model: FLModel) -> FLModel:
        seen.setdefault(int(model.current_round or 0), []).append(site)
        return FLModel(params={"w": np.asarray(model.params["w"]).copy()})

    sites = [f"site-{i}" for i in range(1, 7)]
    run(FedAvg(clients_per_round=2, seed=3), fn, {"w": np.zeros(1)}, 6, 3, min_clients=1)
    for r in range(3):
        assert sorted(seen[r]) == sorted(sample_sites(sites, r, clients_per_round=2, seed=3))


def test_early_stopping_on_the_key_metric() -> None:
    # accuracy by round: 0.5, 0.6, 0.6, 0.6, 0.9 -- with patience 2 the run stops after
    # round 4 (indices 2 and 3 do not improve on 0.6 by more than min_delta=0.01).
    curve = [0.5, 0.6, 0.6, 0.6, 0.9, 0.9]

    def fn(site: str, model: FLModel) -> FLModel:
        r = int(model.current_round or 0)
        return FLModel(params=dict(model.params), metrics={"accuracy": curve[r]})

    result = run(FedAvg(patience=2, min_delta=0.01), fn, {"w": np.zeros(1)}, 2, 6)
    assert [r.round for r in result.rounds if r.task == "train"] == [0, 1, 2, 3]
    # mode="min": a loss that stops falling stops it too
    losses = [1.0, 0.5, 0.6, 0.55, 0.1]

    def loss_fn(site: str, model: FLModel) -> FLModel:
        r = int(model.current_round or 0)
        return FLModel(params=dict(model.params), metrics={"loss": losses[r]})

    strategy = FedAvg(patience=2, monitor="loss", mode="min")
    result = run(strategy, loss_fn, {"w": np.zeros(1)}, 1, 5)
    assert len([r for r in result.rounds if r.task == "train"]) == 4


# ---------------------------------------------------------------------------- FedProx
def test_fedprox_sends_mu_in_the_task_config() -> None:
    got: list[Any] = []

    def fn(site: str, model: FLModel) -> FLModel:
        got.append(model.meta["config"][FEDPROX_MU])
        return FLModel(params=dict(model.params))

    run(FedProx(mu=0.25), fn, {"w": np.zeros(2)}, 2, 2)
    assert got == [0.25] * 4


# ---------------------------------------------------------------------------- FedOpt
def adam_like(rule: str, x: float, deltas: list[float], eta: float, b1: float, b2: float,
              tau: float) -> float:  # fmt: skip
    """Reddi et al. Algorithm 2 for one coordinate, written out."""
    m, v = 0.0, tau * tau
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if rule == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif rule == "yogi":
            v = v - (1 - b2) * d * d * (1.0 if v - d * d > 0 else -1.0 if v - d * d < 0 else 0.0)
        else:
            v = v + d * d
        x = x + eta * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize(
    ("cls", "rule"), [(FedAdam, "adam"), (FedYogi, "yogi"), (FedAdagrad, "adagrad")]
)
def test_fedopt_known_answer_two_rounds(cls: type[FedAdam], rule: str) -> None:
    # Clients always answer 3.0 and 5.0 (mean 4.0); the model starts at 1.0 and -1.0.
    # Round 1: delta = 4 - x0; round 2: delta = 4 - x1, with the moments carried over.
    fn = fixed({"site-1": [3.0, 1.0], "site-2": [5.0, 1.0]})
    strategy = cls(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    result = run(strategy, fn, {"w": np.array([1.0, -1.0], np.float64)}, 2, 2)
    expected = []
    for x0, mean in ((1.0, 4.0), (-1.0, 1.0)):
        x1 = adam_like(rule, x0, [mean - x0], 0.1, 0.9, 0.99, 1e-3)
        m1 = 0.1 * (mean - x0)
        # second round, by the rule with round one's moments
        d2 = mean - x1
        m2 = 0.9 * m1 + 0.1 * d2
        v1 = {"adam": 0.99 * 1e-6 + 0.01 * (mean - x0) ** 2,
              "yogi": 1e-6 + 0.01 * (mean - x0) ** 2,  # sign(tau^2 - d^2) = -1 here
              "adagrad": 1e-6 + (mean - x0) ** 2}[rule]  # fmt: skip
        v2 = {"adam": 0.99 * v1 + 0.01 * d2 * d2,
              "yogi": v1 - 0.01 * d2 * d2 * float(np.sign(v1 - d2 * d2)),
              "adagrad": v1 + d2 * d2}[rule]  # fmt: skip
        expected.append(x1 + 0.1 * m2 / (math.sqrt(v2) + 1e-3))
    np.testing.assert_allclose(result.params["w"], expected, rtol=1e-12)


def test_fedavgm_momentum_known_answer() -> None:
    # x0 = 0, clients answer 2 (mean 2): delta1 = 2, m1 = 2, x1 = 0 + 0.5*2 = 1;
    # delta2 = 2 - 1 = 1, m2 = 0.9*2 + 1 = 2.8, x2 = 1 + 0.5*2.8 = 2.4.
    fn = fixed({"site-1": [2.0], "site-2": [2.0]})
    result = run(FedAvgM(eta=0.5, beta_1=0.9), fn, {"w": np.array([0.0])}, 2, 2)
    np.testing.assert_allclose(result.params["w"], [2.4], rtol=1e-12)


def test_fedavgm_with_no_momentum_and_unit_rate_is_fedavg() -> None:
    fn = fixed({"site-1": [2.0, 8.0], "site-2": [4.0, 0.0]})
    a = run(FedAvgM(eta=1.0, beta_1=0.0), fn, {"w": np.array([1.0, 1.0])}, 2, 2)
    b = run(FedAvg(), fn, {"w": np.array([1.0, 1.0])}, 2, 2)
    np.testing.assert_array_equal(a.params["w"], b.params["w"])


def test_fedopt_takes_diff_results_as_the_pseudo_gradient() -> None:
    def fn(site: str, model: FLModel) -> FLModel:
        return FLModel(params_type=ParamsType.DIFF, params={"w": np.array([3.0])})

    result = run(FedAdam(eta=0.1, tau=1e-3), fn, {"w": np.array([1.0])}, 2, 1)
    # delta = 3: m = 0.3, v = 0.99e-6 + 0.09, x = 1 + 0.1 * 0.3 / (sqrt(v) + 1e-3)
    expected = 1 + 0.1 * 0.3 / (math.sqrt(0.99e-6 + 0.09) + 1e-3)
    np.testing.assert_allclose(result.params["w"], [expected], rtol=1e-12)


# ---------------------------------------------------------------------------- SCAFFOLD
def test_scaffold_known_answer() -> None:
    # 3 sites, 2 sampled per round (seed 0). Each site answers y = x + step(site) and
    # delta_c = dc(site). Server: x += eta_g * mean(y - x), c += |S|/N * mean(delta_c).
    step = {"site-1": 1.0, "site-2": 2.0, "site-3": 4.0}
    dc = {"site-1": 0.3, "site-2": -0.6, "site-3": 0.9}
    received: dict[int, dict[str, float]] = {}

    def fn(site: str, model: FLModel) -> FLModel:
        r = int(model.current_round or 0)
        received.setdefault(r, {})[site] = float(model.meta[SCAFFOLD_CTRL_GLOBAL]["w"][0])
        x = np.asarray(model.params["w"])
        return FLModel(
            params={"w": x + step[site]},
            meta={SCAFFOLD_CTRL_DIFF: {"w": np.array([dc[site]])}},
        )

    sites = ["site-1", "site-2", "site-3"]
    strategy = Scaffold(clients_per_round=2, eta_g=0.5)
    result = run(strategy, fn, {"w": np.array([0.0])}, 3, 2, min_clients=2)
    x, c = 0.0, 0.0
    for r in range(2):
        chosen = sample_sites(sites, r, clients_per_round=2)
        assert received[r] == dict.fromkeys(chosen, c)  # every task carried this round's c
        x = x + 0.5 * sum(step[s] for s in chosen) / 2
        c = c + 2 / 3 * sum(dc[s] for s in chosen) / 2
    np.testing.assert_allclose(result.params["w"], [x], rtol=1e-12)
    np.testing.assert_allclose(strategy.state()["c"]["w"], [c], rtol=1e-12)


def test_scaffold_refuses_a_result_without_its_control_variate() -> None:
    fn = fixed({"site-1": [1.0], "site-2": [1.0]})
    with pytest.raises(Exception, match=r"site-1 sent no meta\['scaffold_c_diff'\]"):
        run(Scaffold(), fn, {"w": np.array([0.0])}, 2, 1)


# ---------------------------------------------------------------------------- cyclic
def test_cyclic_visits_sites_in_the_seeded_order() -> None:
    # Each site multiplies by 2 and adds its number: the result depends on the order.
    add = {"site-1": 1.0, "site-2": 2.0, "site-3": 3.0}
    visits: list[str] = []

    def fn(site: str, model: FLModel) -> FLModel:
        visits.append(site)
        return FLModel(params={"w": np.asarray(model.params["w"]) * 2 + add[site]})

    sites = ["site-1", "site-2", "site-3"]
    result = run(Cyclic(seed=5, shuffle_each_round=True), fn, {"w": np.array([0.0])}, 3, 2)
    x = 0.0
    order = []
    for r in range(2):
        for site in cyclic_order(sites, r, seed=5, shuffle_each_round=True):
            order.append(site)
            x = 2 * x + add[site]
    assert visits == order
    np.testing.assert_allclose(result.params["w"], [x])
    # Without reshuffling, every round takes the same order.
    same = [cyclic_order(sites, r, seed=5, shuffle_each_round=False) for r in range(3)]
    assert same[0] == same[1] == same[2] and sorted(same[0]) == sites


# ---------------------------------------------------------------------------- registry
def test_registry_round_trip_and_errors() -> None:
    strategy = FedAdam(eta=0.01, beta_1=0.8, clients_per_round=3, seed=4)
    spec = strategy_to_spec(strategy)
    assert spec == {"type": "fedadam", "eta": 0.01, "beta_1": 0.8, "clients_per_round": 3,
                    "seed": 4}  # fmt: skip
    assert strategy_from_spec(spec) == strategy
    with pytest.raises(ConfigError, match="unknown strategy type 'fedadamm'; known: cyclic"):
        strategy_from_spec({"type": "fedadamm"})
    with pytest.raises(ConfigError, match=r"fedadam has no option 'lr'; its options: .*eta"):
        strategy_from_spec({"type": "fedadam", "lr": 0.1})
    with pytest.raises(ConfigError, match=r"option 'eta' takes a number; received: 'fast'"):
        strategy_from_spec({"type": "fedadam", "eta": "fast"})
    with pytest.raises(ConfigError, match=r"eta=...\) must be a number > 0; received: eta=-1"):
        strategy_from_spec({"type": "fedadam", "eta": -1})
    with pytest.raises(ConfigError, match=r"option 'mode' takes 'max' or 'min'; received: 'up'"):
        strategy_from_spec({"type": "fedavg", "mode": "up"})
    with pytest.raises(ConfigError, match="option 'patience' takes an int or null"):
        strategy_from_spec({"type": "fedavg", "patience": 1.5})


def test_a_function_of_ones_own_must_live_in_the_app(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be defined at the top level of a module"):
        strategy_to_spec(FedAvg(sample=lambda sites, r: list(sites)), tmp_path)


# ---------------------------------------------------------------------------- filters
def test_filters_wrap_tasks_and_results_for_any_strategy(tmp_path: Path) -> None:
    from fedlift.server import ArraysFormat, RunRecorder, RunSettings
    from fedlift.simulator import LocalController
    from fedlift.simulator._local import ThreadPool

    class Tag:
        """Marks tasks, and doubles results (as a decoder of a compressed result might)."""

        def on_task(self, task: FLModel) -> FLModel:
            task.meta["tagged"] = True
            return task

        def on_result(self, site: str, result: FLModel) -> FLModel:
            self.results += 1
            return FLModel(params={"w": np.asarray(result.params["w"]) * 2}, meta=result.meta)

        results = 0

        def summary(self) -> dict[str, int]:
            out, self.results = {"doubled": self.results}, 0
            return out

    tags: list[bool] = []

    def fn(site: str, model: FLModel) -> FLModel:
        tags.append(bool(model.meta.get("tagged")))
        return FLModel(params={"w": np.array([1.0, 3.0])})

    controller = LocalController(ThreadPool(fn, 1), ["site-1", "site-2"])
    settings = RunSettings(num_rounds=1, min_clients=2, final_evaluation=False, filters=(Tag(),))
    recorder = RunRecorder(tmp_path, ArraysFormat())
    try:
        result = FedAvg().run(controller, {"w": np.zeros(2)}, recorder, settings)
    finally:
        recorder.close()
        controller.close()
    assert tags == [True, True]
    np.testing.assert_allclose(result.params["w"], [2.0, 6.0])  # the mean of the doubled
    assert result.rounds[0].extra["doubled"] == 2  # the filter's summary, in the record


# ---------------------------------------------------------------------------- robust
def test_fedavg_with_a_robust_aggregator_resists_two_attackers() -> None:
    from fedlift.server import FedMedian, FedTrimmedAvg, Krum

    # 6 sites: 4 honest near 1.0, one scaled x100, one sign-flipped.
    answers = {
        "site-1": [1.0, 1.0], "site-2": [1.1, 0.9], "site-3": [0.9, 1.1], "site-4": [1.0, 1.2],
        "site-5": [100.0, 100.0], "site-6": [-1.0, -1.0],
    }  # fmt: skip
    fn = fixed(answers)
    initial = {"w": np.zeros(2)}
    mean = run(FedAvg(), fn, initial, 6, 1).params["w"]
    np.testing.assert_allclose(mean, [(4.0 + 99.0) / 6, (4.2 + 99.0) / 6])  # far off
    median = run(FedAvg(aggregator=FedMedian()), fn, initial, 6, 1).params["w"]
    # sorted first coordinate: -1, 0.9, 1.0, 1.0, 1.1, 100 -> (1.0 + 1.0) / 2
    # sorted second: -1, 0.9, 1.0, 1.1, 1.2, 100 -> (1.0 + 1.1) / 2
    np.testing.assert_allclose(median, [1.0, 1.05])
    trimmed = run(FedAvg(aggregator=FedTrimmedAvg(beta=0.2)), fn, initial, 6, 1).params["w"]
    # floor(0.2 * 6) = 1 dropped each side: (0.9 + 1.0 + 1.0 + 1.1) / 4, (0.9+1.0+1.1+1.2) / 4
    np.testing.assert_allclose(trimmed, [1.0, 1.05])
    krum = run(FedAvg(aggregator=Krum(f=1, m=3)), fn, initial, 6, 1).params["w"]
    assert np.abs(krum - 1.0).max() < 0.25
    spec = strategy_to_spec(FedAvg(aggregator=FedTrimmedAvg(beta=0.1)))
    assert spec == {"type": "fedavg", "aggregator": {"type": "fedtrimmedavg", "beta": 0.1}}
    assert strategy_from_spec(spec) == FedAvg(aggregator=FedTrimmedAvg(beta=0.1))
    assert strategy_from_spec({"type": "fedavg", "aggregator": "fedmedian"}) == FedAvg(
        aggregator=FedMedian()
    )
    with pytest.raises(
        ConfigError, match="unknown aggregator type 'median'; known: custom, fedmedian"
    ):
        strategy_from_spec({"type": "fedavg", "aggregator": "median"})


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedmedian", "scaffold", "cyclic"])
def test_every_strategy_refuses_nan_naming_the_site(name: str) -> None:
    from fedlift.errors import ClientFailedError

    spec: dict[str, Any] = {"type": name}
    if name == "fedmedian":
        spec = {"type": "fedavg", "aggregator": "fedmedian"}

    def fn(site: str, model: FLModel) -> FLModel:
        w = np.asarray(model.params["w"]) + 1.0
        if site == "site-2":
            w = w.copy()
            w[1] = np.nan
        return FLModel(params={"w": w}, meta={SCAFFOLD_CTRL_DIFF: {"w": np.zeros(3)}})

    with pytest.raises(ClientFailedError, match=r"site-2 sent 'w'.*not finite"):
        run(strategy_from_spec(spec), fn, {"w": np.zeros(3)}, 3, 1)
    # under "exclude" the site is left out and the others' aggregate is exact
    result = run(strategy_from_spec(spec), fn, {"w": np.zeros(3)}, 3, 1, min_clients=2,
                 on_client_error="exclude")  # fmt: skip
    assert np.all(np.isfinite(result.params["w"]))


def test_a_user_aggregation_function_and_per_round_evaluation() -> None:
    from fedlift.server import Custom

    calls: list[list[str]] = []

    def largest(results: list[tuple[str, FLModel]]) -> dict[str, np.ndarray]:
        """Element-wise maximum over the results (a rule of the user's own)."""
        calls.append([site for site, _ in results])
        return {"w": np.max([np.asarray(r.params["w"]) for _, r in results], axis=0)}

    evaluated: list[tuple[int, float]] = []

    def fn(site: str, model: FLModel) -> FLModel:
        x = np.asarray(model.params["w"])
        if model.meta["task_name"] == "validate":
            evaluated.append((int(model.current_round or 0), float(x[0])))
            return FLModel(metrics={"value": float(x[0])})
        step = {"site-1": [1.0, 5.0], "site-2": [3.0, 2.0]}[site]
        return FLModel(params={"w": x + np.array(step)})

    strategy = FedAvg(aggregator=Custom(largest), evaluate_every=2)
    result = run(strategy, fn, {"w": np.zeros(2)}, 2, 4)
    # each round: max(x + [1, 5], x + [3, 2]) = x + [3, 5]
    np.testing.assert_allclose(result.params["w"], [12.0, 20.0])
    assert len(calls) == 4 and all(sorted(c) == ["site-1", "site-2"] for c in calls)
    # after rounds 2 and 4 (indices 1, 3) every site evaluates the new model
    assert sorted(evaluated) == [(1, 6.0), (1, 6.0), (3, 12.0), (3, 12.0)]
    validate = [r for r in result.rounds if r.task == "validate"]
    assert [(r.round, r.metrics["value"]) for r in validate] == [(1, 6.0), (3, 12.0)]

    def broken(results: list[tuple[str, FLModel]]) -> dict[str, np.ndarray]:
        return {"w": np.zeros(3)}

    with pytest.raises(Exception, match=r"the aggregation function .*broken sent 'w' with shape"):
        run(FedAvg(aggregator=Custom(broken)), fn, {"w": np.zeros(2)}, 2, 1)
