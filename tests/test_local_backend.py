"""run_local: FedAvg with clients that are function calls in a thread pool."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedlift import FLModel, MetaKey, ParamsType
from fedlift.errors import ClientFailedError, ConfigError, RoundTimeoutError
from fedlift.server._store import load_params
from fedlift.simulator import LocalController, run_local
from fedlift.simulator._local import ThreadPool

ROOT = Path(__file__).resolve().parents[1]


def keras_like_params() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(7)
    return {
        "conv": [rng.standard_normal((3, 3, 1, 4)).astype(np.float32), np.zeros(4, np.float32)],
        "pool": [],
        "dense": [rng.standard_normal((16, 10)).astype(np.float32), np.ones(10, np.float32)],
    }


def index_of(site: str) -> int:
    return int(site.split("-")[1]) - 1


def shifting_client(diff: bool = False) -> Callable[[str, FLModel], FLModel]:
    """Client i adds (i + 1) with weight (i + 1) and reports accuracy (i + 1) + round."""

    def client(site: str, model: FLModel) -> FLModel:
        i = index_of(site)
        if model.meta[MetaKey.TASK_NAME] == "validate":
            return FLModel(
                metrics={"accuracy": (i + 1) + model.current_round},
                meta={MetaKey.NUM_STEPS_CURRENT_ROUND: i + 1},
            )
        shift = {k: [np.full_like(a, i + 1) for a in v] for k, v in model.params.items()}
        params = (
            shift
            if diff
            else {
                k: [a + s for a, s in zip(v, shift[k], strict=True)]
                for k, v in model.params.items()
            }
        )
        return FLModel(
            params_type=ParamsType.DIFF if diff else ParamsType.FULL,
            params=params,
            metrics={"accuracy": (i + 1) + model.current_round},
            meta={MetaKey.NUM_STEPS_CURRENT_ROUND: i + 1},
        )

    return client


@pytest.mark.parametrize("diff", [False, True], ids=["FULL", "DIFF"])
def test_hand_computed_weighted_mean(tmp_path: Path, diff: bool) -> None:
    rounds = 2
    result = run_local(
        shifting_client(diff),
        keras_like_params(),
        3,
        rounds,
        workspace=tmp_path / "ws",
        final_evaluation=True,
        quiet=True,
    )

    per_round = (1 * 1 + 2 * 2 + 3 * 3) / (1 + 2 + 3)  # weights 1, 2, 3; shifts 1, 2, 3
    initial = keras_like_params()
    assert list(result.params) == ["conv", "pool", "dense"]
    assert result.params["pool"] == []
    for name in ("conv", "dense"):
        for got, start in zip(result.params[name], initial[name], strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, start + per_round * rounds, rtol=1e-6, atol=1e-6)

    assert result.workspace == (tmp_path / "ws" / "server").resolve()
    assert result.global_model is not None
    saved = load_params(result.global_model)
    np.testing.assert_array_equal(saved["dense"][0], result.params["dense"][0])
    lines = [json.loads(x) for x in (result.workspace / "metrics.jsonl").read_text().splitlines()]
    assert [x["task"] for x in lines] == ["train", "train", "validate"]
    for record in lines:
        assert record["metrics"]["accuracy"] == pytest.approx(per_round + record["round"])
        assert sorted(record["clients"]) == ["site-1", "site-2", "site-3"]
    assert result.final_metrics["accuracy"] == pytest.approx(per_round + rounds)
    assert result.best_round == rounds
    assert result.client_updates == 3 * rounds + 3
    assert result.updates_per_second > 0


def test_clients_get_task_and_site_in_meta() -> None:
    seen: list[tuple[str, str, str, int | None]] = []
    lock = threading.Lock()

    def client(site: str, model: FLModel) -> FLModel:
        with lock:
            seen.append(
                (site, model.meta[MetaKey.SITE_NAME], model.meta["task_name"], model.current_round)
            )
        return FLModel(params=model.params, metrics={"accuracy": 1.0})

    run_local(client, {"w": np.zeros(3)}, 2, 1, final_evaluation=True, quiet=True)
    assert sorted(seen) == [
        ("site-1", "site-1", "train", 0),
        ("site-1", "site-1", "validate", 1),
        ("site-2", "site-2", "train", 0),
        ("site-2", "site-2", "validate", 1),
    ]


def test_a_failing_client_fails_the_job_with_its_traceback() -> None:
    def client(site: str, model: FLModel) -> FLModel:
        if site == "site-3":
            raise RuntimeError("out of data on purpose")
        return FLModel(params=model.params)

    with pytest.raises(ClientFailedError) as info:
        run_local(client, {"w": np.zeros(3)}, 5, 2, quiet=True)
    text = str(info.value)
    assert text.startswith("site-3 failed:")
    assert "Traceback (most recent call last)" in text
    assert "in client" in text  # the client's own frame
    assert "RuntimeError: out of data on purpose" in text


def test_a_client_that_returns_no_flmodel_fails_the_job() -> None:
    with pytest.raises(ClientFailedError, match="client_fn returned a dict"):
        run_local(lambda site, model: {"w": 1}, {"w": np.zeros(3)}, 2, 1, quiet=True)  # type: ignore[arg-type, return-value]


def test_params_are_read_only_views_of_the_global_model() -> None:
    initial = {"w": np.arange(4.0), "b": [np.ones(2)]}
    checked: list[bool] = []

    def client(site: str, model: FLModel) -> FLModel:
        w = model.params["w"]
        checked.append(
            not w.flags.writeable
            and np.shares_memory(w, initial["w"])  # no copy per client
            and not model.params["b"][0].flags.writeable
        )
        return FLModel(params={"w": w + 1, "b": [model.params["b"][0] * 2]})

    result = run_local(client, initial, 3, 1, quiet=True)
    assert checked == [True, True, True]
    np.testing.assert_array_equal(result.params["w"], np.arange(4.0) + 1)
    assert initial["w"].flags.writeable  # the caller's arrays are left as they were
    np.testing.assert_array_equal(initial["w"], np.arange(4.0))


def test_a_client_that_writes_into_its_input_fails_the_job() -> None:
    initial = {"w": np.zeros(4)}

    def client(site: str, model: FLModel) -> FLModel:
        model.params["w"] += 1  # a bug: trains in place on the shared global model
        return FLModel(params=model.params)

    with pytest.raises(ClientFailedError, match="read-only") as info:
        run_local(client, initial, 4, 1, quiet=True)
    assert 'model.params["w"] += 1' in str(info.value)
    np.testing.assert_array_equal(initial["w"], np.zeros(4))


def test_containers_are_per_client() -> None:
    """A client that replaces a key in its dict does not change what others receive."""

    def client(site: str, model: FLModel) -> FLModel:
        if not np.array_equal(model.params["w"], np.full(2, float(model.current_round or 0))):
            raise AssertionError(f"{site} received {model.params['w']}")
        model.params["w"] = np.full(2, 100.0)
        model.meta["poison"] = True
        return FLModel(params={"w": np.ones(2)})

    result = run_local(client, {"w": np.zeros(2)}, 6, 2, threads=1, quiet=True)
    np.testing.assert_array_equal(result.params["w"], np.ones(2))


def test_metrics_are_weighted_means_and_best_round_follows_key_metric(tmp_path: Path) -> None:
    def client(site: str, model: FLModel) -> FLModel:
        i = index_of(site)
        loss = 10.0 - model.current_round - i  # falls each round
        return FLModel(
            params=model.params,
            metrics={"loss": loss, "count": 1},
            meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 1 + i},
        )

    result = run_local(
        client,
        {"w": np.zeros(1)},
        2,
        3,
        key_metric="loss",
        higher_is_better=False,
        workspace=tmp_path,
        quiet=True,
    )
    for record in result.rounds:
        expected = (1 * (10.0 - record.round) + 2 * (9.0 - record.round)) / 3
        assert record.metrics == {"loss": pytest.approx(expected), "count": 1.0}
    assert result.best_round == 2
    assert result.best_model is not None and result.best_model.is_file()


def test_without_a_workspace_nothing_is_left_on_disk() -> None:
    before = set(Path(tempfile.gettempdir()).glob("fedlift-local-*"))
    result = run_local(
        lambda site, model: FLModel(params=model.params), {"w": np.zeros(2)}, 2, 2, quiet=True
    )
    assert result.workspace is None and result.global_model is None
    assert set(Path(tempfile.gettempdir()).glob("fedlift-local-*")) == before
    assert len(result.rounds) == 2


def test_a_slow_client_is_left_out_or_times_the_round_out() -> None:
    release = threading.Event()

    def client(site: str, model: FLModel) -> FLModel:
        if site == "site-2":
            release.wait(30)
        return FLModel(params={"w": model.params["w"] + 1})

    try:
        started = time.monotonic()
        result = run_local(
            client, {"w": np.zeros(1)}, 3, 1, min_clients=2, round_timeout=0.5, quiet=True
        )
        assert time.monotonic() - started < 10
        assert sorted(result.rounds[0].clients) == ["site-1", "site-3"]
        np.testing.assert_array_equal(result.params["w"], [1.0])

        with pytest.raises(RoundTimeoutError, match=r"2 of 3 clients .*no answer from: site-2"):
            run_local(client, {"w": np.zeros(1)}, 3, 1, round_timeout=0.5, quiet=True)
    finally:
        release.set()


def test_in_flight_clients_are_bounded_and_results_fold_as_they_come() -> None:
    """At most 2 * threads clients between start and fold: nothing piles up."""
    lock = threading.Lock()
    started = 0
    folded = 0
    most = 0

    def client(site: str, model: FLModel) -> FLModel:
        nonlocal started
        with lock:
            started += 1
        return FLModel(params=model.params)

    def on_result(site: str, result: FLModel) -> None:
        nonlocal folded, most
        with lock:
            most = max(most, started - folded)
            folded += 1

    pool = ThreadPool(client, 3)
    controller = LocalController(pool, [f"site-{i + 1}" for i in range(300)])
    try:
        answered = controller.run_task(
            "train",
            FLModel(params={"w": np.zeros(2)}),
            controller.registered_sites(),
            on_result=on_result,
            timeout=60,
            min_responses=300,
        )
    finally:
        controller.close()
    assert len(answered) == 300 == folded == controller.client_updates
    assert controller.window == 6
    assert 1 <= most <= 6


def test_a_thousand_clients_of_ten_thousand_params() -> None:
    initial = {"a": np.zeros(6_000, np.float32), "b": [np.zeros((40, 100), np.float32)]}

    def client(site: str, model: FLModel) -> FLModel:
        i = index_of(site)
        return FLModel(
            params={"a": model.params["a"] + i, "b": [model.params["b"][0] - i]},
            metrics={"accuracy": i / 1000},
        )

    result = run_local(client, initial, 1_000, 2, quiet=True)
    mean_i = 999 / 2
    np.testing.assert_allclose(result.params["a"], 2 * mean_i, rtol=1e-5)
    np.testing.assert_allclose(result.params["b"][0], -2 * mean_i, rtol=1e-5)
    assert result.client_updates == 2_000
    assert [len(r.clients) for r in result.rounds] == [1_000, 1_000]
    assert result.rounds[0].metrics["accuracy"] == pytest.approx(mean_i / 1000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "processes"}, "backend must be one of"),
        ({"min_clients": 5}, "min_clients=5 is more than n_clients=2"),
        ({"threads": 0}, "threads must be an int >= 1"),
        ({"n_clients": 0}, "n_clients must be an int >= 1"),
        ({"initial_model": {"w": "text"}}, "expected a numpy array"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "client_fn": lambda site, model: model,
        "initial_model": {"w": np.zeros(1)},
        "n_clients": 2,
        "num_rounds": 1,
        "quiet": True,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        run_local(**args)  # type: ignore[arg-type]


def test_ray_backend_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'fedlift\[ray\]'"):
        run_local(lambda s, m: m, {"w": np.zeros(1)}, 2, 1, backend="ray", quiet=True)


def test_importing_fedlift_does_not_import_ray() -> None:
    code = (
        "import sys, fedlift, fedlift.simulator, fedlift.server\n"
        "from fedlift.simulator import run_local\n"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- memory

# Peak memory of one run, measured in a fresh interpreter so nothing else the test process
# holds counts. tracemalloc sees every Python and NumPy allocation (NumPy reports its
# buffers to it) and is deterministic, unlike RSS, which depends on the allocator's
# caching; its peak is taken from just before run_local. RSS (ru_maxrss) is checked too,
# with a looser bound. A leak of one result in 20 must show up, so the probe can fail.
PROBE = """
import json, resource, sys, tracemalloc
import numpy as np
from fedlift import FLModel
from fedlift.simulator import run_local

n_clients, leak_every = int(sys.argv[1]), int(sys.argv[2])
model = {f"w{i}": np.zeros(10_000, np.float32) for i in range(10)}  # 400 kB
kept = []

def client(site, m):
    out = FLModel(params={k: v + 1 for k, v in m.params.items()}, metrics={"loss": 1.0})
    if leak_every and int(site.split("-")[1]) % leak_every == 0:
        kept.append(out)
    return out

tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
result = run_local(client, model, n_clients, 1, threads=2, quiet=True)
if not np.allclose(result.params["w0"], 1.0):
    raise SystemExit("wrong result")
peak = tracemalloc.get_traced_memory()[1] - base
print(json.dumps({"peak": peak, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

MODEL_BYTES = 400_000


def test_memory_does_not_grow_with_the_client_count() -> None:
    runs = {
        "200": subprocess.Popen(
            [sys.executable, "-c", PROBE, "200", "0"], stdout=subprocess.PIPE, text=True
        ),
        "2000": subprocess.Popen(
            [sys.executable, "-c", PROBE, "2000", "0"], stdout=subprocess.PIPE, text=True
        ),
        "2000 leaky": subprocess.Popen(
            [sys.executable, "-c", PROBE, "2000", "20"], stdout=subprocess.PIPE, text=True
        ),
    }
    got = {}
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, name
        got[name] = json.loads(out)

    growth = got["2000"]["peak"] - got["200"]["peak"]
    assert growth < 5 * MODEL_BYTES, got  # 10x the clients, not even 5 more models
    assert got["2000"]["rss"] - got["200"]["rss"] < 40 * MODEL_BYTES, got
    leaked = got["2000 leaky"]["peak"] - got["200"]["peak"]
    assert leaked > 50 * MODEL_BYTES, got  # 100 results kept: the probe sees them


def test_the_scale_benchmark_runs_at_smoke_size(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--clients", "50", "--params", "1000"]
        + ["--rounds", "2", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["client_updates"] == 100 and figures["backend"] == "threads"
    assert figures["updates_per_s"] > 0 and figures["peak_rss_mb"] > 0
    assert "client updates/s" in done.stdout
