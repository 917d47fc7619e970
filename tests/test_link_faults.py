"""Link faults between real site daemons and a real server (``fedlift server start`` /
``client start``, mutual TLS): a TCP proxy in between cuts every live connection
mid-transfer, refuses new ones for a while and restores them. No result is lost or
counted twice, the job finishes, and its final model is bit-identical to FedAvg done by
hand (``exact_client.expected_model``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from faultproxy import (
    SITES,
    Deployment,
    differing_bytes,
    exact_job,
    expected_final,
    final_model,
    leaked_processes,
    rounds_lost,
    shm_segments,
    temp_files,
)


@pytest.mark.reliability
def test_cuts_and_flaps_mid_transfer_lose_nothing_and_the_model_is_bit_identical(
    reliability, tmp_path: Path
) -> None:
    rounds = 12 if reliability.full else 5
    job = exact_job(tmp_path, rounds)
    deployment = Deployment(tmp_path, SITES)
    proxy = deployment.proxy
    assert proxy is not None
    try:
        job_id = deployment.submit(job)
        deployment.wait_round(job_id, 0)
        # 1. Cut every link 2.5 MiB into the next model download, then refuse new
        #    connections for 1 s: the task a site was receiving never arrives.
        down = proxy.cut_after(5 << 19, direction="down", refuse_for=1.0)
        reliability.fault("link cut mid-download of a task model, refused 1 s")
        assert down.fired.wait(60), deployment.log_tail()
        # 2. Cut every link 2.5 MiB into the next result upload.
        up = proxy.cut_after(5 << 19, direction="up")
        reliability.fault("link cut mid-upload of a result")
        assert up.fired.wait(60), deployment.log_tail()
        assert down.dropped > 0 and up.dropped > 0  # both landed inside a transfer
        # 3. Flaps: cut whatever is live, refuse for a moment, restore.
        flaps = 6 if reliability.full else 2
        for _ in range(flaps):
            time.sleep(0.4)
            proxy.refuse()
            proxy.cut()
            time.sleep(0.3)
            proxy.restore()
        reliability.fault(f"link flapped {flaps} times (cut, refused 0.3 s, restored)")
        status = deployment.wait(job_id, timeout=180)
        metrics = deployment.metrics(job_id)
        model = final_model(deployment, job_id)
        cuts = proxy.cuts
    finally:
        deployment.close()
    assert status["state"] == "finished", (status, deployment.log_tail())
    lost = rounds_lost(metrics, rounds)
    train_rounds = [m["round"] for m in metrics if m["task"] == "train"]
    duplicated = len(train_rounds) - len(set(train_rounds))
    corrupted = differing_bytes(model, expected_final(job, rounds))
    leaks = len(leaked_processes(deployment.started, tmp_path))
    leaks += len(shm_segments(deployment.session)) + len(temp_files(deployment.workspace))
    reliability.measure(rounds_lost=lost, bytes_corrupted=corrupted, leaks=leaks)
    print(f"link faults: {cuts} live connections cut, {rounds} rounds, lost {lost}, "
          f"duplicated {duplicated}, {corrupted} bytes differ, {leaks} leaks")  # fmt: skip
    assert cuts >= 2 + flaps  # every fault cut at least one live connection ...
    assert lost == 0 and duplicated == 0
    assert train_rounds == list(range(rounds))
    assert corrupted == 0
    assert leaks == 0
