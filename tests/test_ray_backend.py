"""run_local(backend="ray"): the same FedAvg with each batch of clients as a Ray task.

Skipped when Ray is not installed (``pip install 'fedlift[ray]'``) or cannot start here.
Client functions are defined inside the tests, so Ray ships them by value to its workers
(a module-level function of a test module would be looked up by name, and Ray's workers
do not have ``tests/`` on their path).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fedlift import FLModel, MetaKey
from fedlift.errors import ClientFailedError
from fedlift.simulator import run_local

ray: Any = pytest.importorskip("ray", reason="Ray is optional: pip install 'fedlift[ray]'")


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    except Exception as exc:  # no shared memory, no ports, ...
        pytest.skip(f"Ray cannot start here: {type(exc).__name__}: {exc}")
    try:
        yield
    finally:
        ray.shutdown()


def initial() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    return {
        "dense": [rng.standard_normal((20, 5)).astype(np.float32), np.zeros(5, np.float32)],
        "pool": [],
        "head": {"w": rng.standard_normal(7)},
    }


def test_ray_gives_the_params_of_the_threads_backend(ray_session: None) -> None:
    driver = os.getpid()

    def client(site: str, model: FLModel) -> FLModel:
        i = int(site.split("-")[1])
        if model.meta[MetaKey.TASK_NAME] != "train" or model.meta[MetaKey.SITE_NAME] != site:
            raise ValueError(f"unexpected meta {model.meta}")
        params = {
            "dense": [a * 0.5 + i for a in model.params["dense"]],
            "pool": [],
            "head": {"w": model.params["head"]["w"] - i / 10},
        }
        return FLModel(
            params=params,
            metrics={"accuracy": i / 20, "in_driver": float(os.getpid() == driver)},
            meta={MetaKey.NUM_STEPS_CURRENT_ROUND: i},
        )

    on_ray = run_local(client, initial(), 20, 2, backend="ray", quiet=True)
    on_threads = run_local(client, initial(), 20, 2, quiet=True)

    assert on_ray.client_updates == on_threads.client_updates == 40
    for got, want in zip(
        (*on_ray.params["dense"], on_ray.params["head"]["w"]),
        (*on_threads.params["dense"], on_threads.params["head"]["w"]),
        strict=True,
    ):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert on_ray.params["pool"] == []
    # hand check of one value: weights i, shifts i -> sum(i * i) / sum(i) per round
    shift = sum(i * i for i in range(1, 21)) / sum(range(1, 21))
    expected = (initial()["dense"][1] * 0.5 + shift) * 0.5 + shift
    np.testing.assert_allclose(on_ray.params["dense"][1], expected, rtol=1e-6)
    for ray_round, threads_round in zip(on_ray.rounds, on_threads.rounds, strict=True):
        assert ray_round.metrics["accuracy"] == pytest.approx(threads_round.metrics["accuracy"])
        assert sorted(ray_round.clients) == sorted(f"site-{i}" for i in range(1, 21))
    assert on_ray.rounds[0].metrics["in_driver"] == 0.0  # really ran in Ray's workers
    assert on_threads.rounds[0].metrics["in_driver"] == 1.0


def test_a_failing_ray_client_fails_the_job_with_its_traceback(ray_session: None) -> None:
    def client(site: str, model: FLModel) -> FLModel:
        if site == "site-4":
            raise RuntimeError("broken on purpose")
        return FLModel(params=model.params)

    with pytest.raises(ClientFailedError) as info:
        run_local(client, initial(), 6, 1, backend="ray", quiet=True)
    text = str(info.value)
    assert text.startswith("site-4 failed:")
    assert "RuntimeError: broken on purpose" in text and "in client" in text


def test_ray_clients_get_read_only_params(ray_session: None) -> None:
    def client(site: str, model: FLModel) -> FLModel:
        model.params["head"]["w"] *= 2
        return FLModel(params=model.params)

    with pytest.raises(ClientFailedError, match="read-only"):
        run_local(client, initial(), 3, 1, backend="ray", quiet=True)


def test_a_ray_worker_that_dies_fails_the_job(ray_session: None) -> None:
    def client(site: str, model: FLModel) -> FLModel:
        if site == "site-2":
            os._exit(3)
        return FLModel(params=model.params)

    with pytest.raises(
        ClientFailedError, match="site-2 failed:\n.*Ray task failed: WorkerCrashedError"
    ):
        run_local(client, initial(), 3, 1, backend="ray", threads=2, quiet=True)
