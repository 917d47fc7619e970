"""Results are checked before they count: NaN/Inf, dtype kinds, layout and weight.

Unit tests drive :class:`StreamingMean` with hostile results; end-to-end tests send them from
real worker processes in the simulator (results read from the clients' memory) under both
error policies, and compare the final model with the mean computed by hand.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from conftest import SCRIPTS, worker_pids
from fedlift import FedAvgJob, FLModel, ScriptRunner
from fedlift.errors import ClientFailedError, ConfigError, InvalidResultError
from fedlift.job import load_job
from fedlift.server import RunSettings, StreamingMean
from fedlift.simulator import _simulator, run_local

pytestmark = pytest.mark.reliability

SHM = Path("/dev/shm")


def model(params: dict[str, Any], weight: Any = 1.0) -> FLModel:
    return FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": weight})


def big(value: float, n: int = 300_000, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Large enough for several blocks (and threads) in the fold."""
    return {"w": np.full(n, value, dtype), "b": np.full(3, value, dtype)}


# ---------------------------------------------------------------- NaN / Inf, unit level

BAD_VALUES = [math.nan, math.inf, -math.inf]


@pytest.mark.reliability
@pytest.mark.parametrize("culprit", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
def test_nan_or_inf_in_a_fold_names_the_site_and_key(
    reliability: Any, culprit: int, batched: bool
) -> None:
    tried = 0
    for bad in BAD_VALUES:
        for dtype in (np.float32, np.float64, np.float16):
            results = [(f"site-{i + 1}", model(big(i + 1.0, dtype=dtype))) for i in range(3)]
            element = 123_456 if culprit != 1 else 7
            results[culprit][1].params["w"][element] = bad  # type: ignore[index]
            mean = StreamingMean(big(0.0, dtype=dtype), expected=3)
            with pytest.raises(InvalidResultError) as info:
                if batched:
                    mean.add_many(results)
                else:
                    for site, result in results:
                        mean.add(result, site)
                mean.params()
            message = str(info.value)
            assert f"site-{culprit + 1} sent 'w'" in message, message
            assert f"element {element}" in message
            tried += 1
    reliability.hostile("NaN/Inf/-Inf in one result of a fold (3 dtypes)", tried=tried)


@pytest.mark.reliability
def test_an_unchecked_result_folded_in_place_is_checked_by_params(reliability: Any) -> None:
    """One result adopted as the sums (no pass over it): params() checks it."""
    reliability.hostile("NaN in the only (adopted) result", tried=1)
    params = big(1.0, n=5000, dtype=np.float64)
    params["w"][4999] = math.nan
    mean = StreamingMean(big(0.0, n=5000, dtype=np.float64), adopt=True)
    mean.add(model(params), "site-7")
    with pytest.raises(InvalidResultError, match=r"site-7 sent 'w' \(element 4999: nan\)"):
        mean.params()


@pytest.mark.reliability
def test_prescan_rejects_nan_and_leaves_the_mean_exactly_as_without_it(reliability: Any) -> None:
    tried = 0
    rng = np.random.default_rng(3)
    good = [model({"w": rng.standard_normal(300_000).astype(np.float32)}, w) for w in (1.0, 3.0)]
    reference = StreamingMean({"w": np.zeros(300_000, np.float32)})
    for i, result in enumerate(good):
        reference.add(result, f"good-{i}")
    expected = reference.params()
    assert expected is not None
    for bad_value in BAD_VALUES:
        for element in (0, 150_001, 299_999):
            bad = {"w": rng.standard_normal(300_000).astype(np.float32)}
            bad["w"][element] = bad_value
            mean = StreamingMean({"w": np.zeros(300_000, np.float32)}, prescan=True, expected=3)
            mean.add(good[0], "good-0")
            with pytest.raises(InvalidResultError, match=f"site-x sent 'w' .*element {element}"):
                mean.add(model(bad, 5.0), "site-x")
            mean.add(good[1], "good-1")
            assert mean.count == 2 and mean.total_weight == 4.0
            got = mean.params()
            assert got is not None
            np.testing.assert_array_equal(got["w"], expected["w"])  # bit for bit
            tried += 1
    reliability.hostile("NaN/Inf pre-scanned under 'exclude'", tried=tried)
    reliability.measure(bytes_corrupted=0)


# ---------------------------------------------------------------- dtypes, layout, weight


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("model_dtype", "sent_dtype"),
    [
        (np.float32, np.int8),
        (np.float32, np.int64),
        (np.float32, np.uint8),
        (np.float32, np.bool_),
        (np.int64, np.float32),
        (np.int32, np.float64),
        (np.float32, np.complex64),
    ],
)
def test_a_leaf_of_another_kind_is_refused(
    reliability: Any, model_dtype: Any, sent_dtype: Any
) -> None:
    reliability.hostile(f"{np.dtype(sent_dtype)} sent for a {np.dtype(model_dtype)} leaf")
    mean = StreamingMean({"w": np.zeros(4, model_dtype)})
    with pytest.raises(InvalidResultError) as info:
        mean.add(model({"w": np.ones(4, sent_dtype)}), "site-3")
    message = str(info.value)
    assert f"site-3 sent 'w' as {np.dtype(sent_dtype)}" in message
    assert f"Received: w.dtype={np.dtype(sent_dtype)}" in message
    assert mean.count == 0 and mean.params() is None


def test_floats_of_another_width_and_ints_of_another_width_are_accepted() -> None:
    mean = StreamingMean({"w": np.zeros(2, np.float32), "n": np.zeros(2, np.int32)})
    mean.add(model({"w": np.array([1.0, 2.0]), "n": np.array([1, 3], np.int64)}), "site-1")
    mean.add(model({"w": np.array([3.0, 4.0], np.float16), "n": np.array([3, 5])}), "site-2")
    out = mean.params()
    assert out is not None
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [2.0, 3.0]
    assert out["n"].dtype == np.int32 and out["n"].tolist() == [2, 4]


@pytest.mark.reliability
def test_a_bad_weight_names_the_site_and_the_value(reliability: Any) -> None:
    weights: list[Any] = [-1.0, 0, -0.0, math.nan, math.inf, -math.inf, True, False, "5", None]
    for weight in weights:
        mean = StreamingMean({"w": np.zeros(2)})
        with pytest.raises(InvalidResultError) as info:
            mean.add(model({"w": np.ones(2)}, weight), "site-9")
        message = str(info.value)
        assert "site-9 sent an aggregation weight" in message
        assert f"Received: NUM_STEPS_CURRENT_ROUND={weight!r}" in message
        assert mean.count == 0 and mean.total_weight == 0.0
    reliability.hostile("weight <= 0, NaN, Inf, bool, str, None", tried=len(weights))


@pytest.mark.reliability
def test_missing_extra_and_reshaped_keys_are_refused(reliability: Any) -> None:
    reference = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    bad = [
        {"a": np.zeros((2, 3), np.float32)},
        {**reference, "c": np.zeros(1, np.float32)},
        {"a": np.zeros((3, 2), np.float32), "b": np.zeros(4, np.float32)},
        {"a": np.zeros(6, np.float32), "b": np.zeros(4, np.float32)},
    ]
    for params in bad:
        mean = StreamingMean(reference)
        with pytest.raises(InvalidResultError, match="site-4 sent"):
            mean.add(model(params), "site-4")
        assert mean.count == 0
    reliability.hostile("missing, extra or reshaped keys", tried=len(bad))


def test_the_error_policy_is_validated_where_it_enters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Received: on_client_error='skip'"):
        RunSettings(num_rounds=1, min_clients=1, on_client_error="skip")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="on_client_error='ignore'"):
        FedAvgJob("j", 2, 1, {"w": np.zeros(2)}, on_client_error="ignore")  # type: ignore[arg-type]
    job = FedAvgJob("j", 2, 1, {"w": np.zeros(2)}, on_client_error="exclude")
    job.to_clients(ScriptRunner(SCRIPTS / "numpy_client.py", framework="numpy"))
    folder = job.export_job(tmp_path)
    config, _ = load_job(folder)
    assert config.workflow.on_client_error == "exclude"
    text = (folder / "job.json").read_text().replace('"exclude"', '"sometimes"')
    (folder / "job.json").write_text(text)
    with pytest.raises(
        ConfigError, match=r"job.json: workflow\(on_client_error=...\) must be one of"
    ):
        load_job(folder)


# ---------------------------------------------------------------- run_local


@pytest.mark.reliability
@pytest.mark.parametrize("policy", ["fail", "exclude"])
def test_run_local_applies_the_policy_to_bad_results(reliability: Any, policy: str) -> None:
    reliability.hostile("run_local client sending NaN in round 1", tried=1)

    def client_fn(site: str, task: FLModel) -> FLModel:
        i = int(site.split("-")[1])
        w = task.params["w"] + i  # type: ignore[index]
        if site == "site-2" and task.current_round == 1:
            w[5] = math.nan
        return FLModel(params={"w": w}, meta={"NUM_STEPS_CURRENT_ROUND": i})

    kwargs: dict[str, Any] = {"threads": 2, "quiet": True, "on_client_error": policy}
    if policy == "fail":
        with pytest.raises(InvalidResultError, match="site-2 sent 'w'"):
            run_local(client_fn, {"w": np.zeros(10)}, 3, 2, **kwargs)
        return
    result = run_local(client_fn, {"w": np.zeros(10)}, 3, 2, min_clients=2, **kwargs)
    by_hand = (1 * 1 + 2 * 2 + 3 * 3) / 6 + (1 * 1 + 3 * 3) / 4  # round 1 without site-2
    np.testing.assert_allclose(result.params["w"], by_hand, rtol=1e-12)
    assert sorted(result.rounds[1].clients) == ["site-1", "site-3"]
    corrupted = int(np.sum(~np.isclose(result.params["w"], by_hand, rtol=1e-12))) * 8
    reliability.measure(rounds_lost=2 - len(result.rounds), bytes_corrupted=corrupted)
    assert corrupted == 0


# ---------------------------------------------------------------- end to end (simulator)


def initial_model() -> dict[str, np.ndarray]:
    # 'w' is over 1 MiB: it is read straight from the clients' memory, block by block.
    return {"w": np.zeros(400_000, np.float32), "b": np.zeros(4, np.float32)}


def make_job(n: int, args: str, policy: str, min_clients: int | None = None) -> FedAvgJob:
    job = FedAvgJob(
        "validation",
        n_clients=n,
        num_rounds=2,
        initial_model=initial_model(),
        min_clients=min_clients,
        final_evaluation=False,
        on_client_error=policy,  # type: ignore[arg-type]
        round_timeout=120,
    )
    job.to_clients(ScriptRunner(SCRIPTS / "numpy_client.py", script_args=args, framework="numpy"))
    return job


def by_hand(rounds: list[list[str]]) -> float:
    """Site i adds i and weighs i (numpy_client: index + 1): each round adds the weighted
    mean of the shifts of the sites that took part."""
    total = 0.0
    for clients in rounds:
        ids = [int(site.split("-")[1]) for site in clients]
        total += sum(i * i for i in ids) / sum(ids)
    return total


def session_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The simulator's shared-memory session ids (the real ones, recorded)."""
    seen: list[str] = []
    real = _simulator.secrets.token_hex

    def token_hex(n: int) -> str:
        value = real(n)
        seen.append(value)
        return value

    monkeypatch.setattr(_simulator, "secrets", SimpleNamespace(token_hex=token_hex))
    return seen


def leaks(ws: Path, sessions: list[str]) -> int:
    segments = [p for s in sessions for p in SHM.glob(f"fedlift-{s}-*")]
    return len(worker_pids(ws)) + len(segments)


HOSTILE = {
    "nan": "--nan-round 1 --only-site 1",
    "inf": "--inf-round 1 --only-site 1",
    "int8": "--dtype int8 --only-site 1",
    "extra-key": "--extra-key --only-site 1",
    "negative-weight": "--weight -2 --hostile --only-site 1",
}


@pytest.mark.reliability
@pytest.mark.parametrize("kind", ["nan", "int8", "negative-weight"])
def test_a_bad_result_fails_the_job_naming_the_site(
    reliability: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    reliability.hostile(f"site-2 sends {kind} params (policy fail)", tried=1)
    sessions = session_spy(monkeypatch)
    ws = tmp_path / "ws"
    with pytest.raises(InvalidResultError) as info:
        make_job(2, HOSTILE[kind], "fail").simulator_run(ws)
    assert "site-2 sent" in str(info.value)
    assert isinstance(info.value, ClientFailedError)
    assert "site-2 sent" in (ws / "server" / "log.txt").read_text()
    leaked = leaks(ws, sessions)
    reliability.measure(leaks=leaked)
    assert leaked == 0


@pytest.mark.reliability
@pytest.mark.parametrize("kind", ["nan", "inf", "int8", "extra-key", "negative-weight"])
def test_a_bad_result_is_left_out_and_the_others_mean_is_exact(
    reliability: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    reliability.hostile(f"site-2 sends {kind} params (policy exclude)", tried=1)
    sessions = session_spy(monkeypatch)
    ws = tmp_path / "ws"
    result = make_job(3, HOSTILE[kind], "exclude", min_clients=2).simulator_run(ws)
    rounds = [sorted(r.clients) for r in result.rounds]
    every_round = kind not in ("nan", "inf")  # those are bad in round 1 only
    assert rounds[1] == ["site-1", "site-3"]
    assert rounds[0] == (["site-1", "site-3"] if every_round else ["site-1", "site-2", "site-3"])
    expected = by_hand(rounds)
    corrupted = 0
    for value in result.params.values():
        assert value.dtype == np.float32
        corrupted += int(np.sum(~np.isclose(value, expected, rtol=1e-6))) * 4
    log = (ws / "server" / "log.txt").read_text()
    assert re.search(r"site-2: its result is left out of task 'train': site-2 sent", log)
    leaked = leaks(ws, sessions)
    reliability.measure(rounds_lost=2 - len(result.rounds), bytes_corrupted=corrupted, leaks=leaked)
    assert corrupted == 0 and leaked == 0 and len(result.rounds) == 2
