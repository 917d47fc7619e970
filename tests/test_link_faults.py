"""Link faults between real site daemons and a real server (``fedlift server start`` /
``client start``, mutual TLS): a TCP proxy in between cuts every live connection
mid-transfer, refuses new ones for a while and restores them. No result is lost or
counted twice, the job finishes, and its final model is bit-identical to FedAvg done by
hand (``exact_client.expected_model``)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from faultproxy import (
    ADMIN,
    SITES,
    Deployment,
    differing_bytes,
    exact_job,
    expected_final,
    final_model,
    free_port,
    leaked_processes,
    rounds_lost,
    shm_segments,
    temp_files,
    wait_until,
)
from fedlift.codec import Message, model_from_wire, model_to_wire
from fedlift.deploy import DeployServer, channel_credentials, provision
from fedlift.job import zip_dir
from fedlift.model import FLModel
from fedlift.server._store import load_params
from fedlift.transport import GrpcTransport


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


class _RepeatingSite(threading.Thread):
    """Speaks the site protocol over real gRPC + mTLS and sends every result twice (a retry
    whose first copy had arrived: the link dropped before the acknowledgement), and the
    previous round's result once more when the next task comes (a late copy)."""

    def __init__(self, kit: Path, name: str, address: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.transport = GrpcTransport(address, credentials=channel_credentials(kit))
        self.base = {"job_id": job_id, "site": name}
        self.index = int(name.split("-")[1])
        self.sent = 0
        self.errors: list[BaseException] = []

    def call(self, op: str, fields: dict[str, Any], arrays: list[np.ndarray] | None = None) -> Any:
        return self.transport.call(Message(op, {**self.base, **fields}, arrays or []), 30.0)

    def run(self) -> None:
        try:
            self.call("register", {})
            previous: tuple[dict[str, Any], list[np.ndarray]] | None = None
            while True:
                reply = self.call("get_task", {"wait": 1.0})
                if reply.op == "stop":
                    return
                if reply.op != "task":
                    continue
                if previous is not None:  # a late copy of the last round's result
                    self.call("submit", *previous)
                    self.sent += 1
                model = model_from_wire(reply.fields["model"], list(reply.arrays))
                result = FLModel(params={"w": model.params["w"] + np.float32(self.index)})
                fields, arrays = model_to_wire(result)
                submit = {"task_id": reply.fields["task_id"], "model": fields}
                for _ in range(2):
                    assert self.call("submit", submit, arrays).op == "ok"
                    self.sent += 1
                previous = (submit, arrays)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.transport.close()


@pytest.mark.reliability
def test_a_result_sent_again_after_a_lost_acknowledgement_is_counted_once(
    reliability, tmp_path: Path
) -> None:
    rounds = 3
    job = exact_job(tmp_path, rounds, size=64)
    kits = provision("dup", f"127.0.0.1:{free_port()}", SITES, [ADMIN], tmp_path / "kits")
    with DeployServer(kits["server"], tmp_path / "ws", address="127.0.0.1:0") as server:
        admin = GrpcTransport(server.address, credentials=channel_credentials(kits[ADMIN]))
        try:
            reply = admin.call(
                Message("job_submit", {}, [np.frombuffer(zip_dir(job), np.uint8)]), 30.0
            )
            job_id = str(reply.fields["job_id"])
            sites = [_RepeatingSite(kits[s], s, server.address, job_id) for s in SITES]
            # The job starts once both sites poll for it.
            polls = [GrpcTransport(server.address, credentials=channel_credentials(kits[s]))
                     for s in SITES]  # fmt: skip
            for poll in polls:
                threading.Thread(
                    target=poll.call, args=(Message("next_job", {"wait": 5.0}), 30.0), daemon=True
                ).start()
            wait_until(lambda: admin.call(Message("job_status", {"job_id": job_id}), 30.0)
                       .fields["state"] == "running", 60, "the job to start")  # fmt: skip
            for site in sites:
                site.start()
            for site in sites:
                site.join(120)
            for poll in polls:
                poll.close()
            status = admin.call(Message("job_status", {"job_id": job_id}), 30.0).fields
        finally:
            admin.close()
        server_dir = server.jobs_dir / job_id / "server"
    copies = sum(site.sent for site in sites) - rounds * len(SITES)
    reliability.hostile("result sent again (same task id) or late, after the round", copies)
    assert not any(site.errors for site in sites), [site.errors for site in sites]
    assert status["state"] == "finished", status
    metrics = [json.loads(line) for line in (server_dir / "metrics.jsonl").read_text().split("\n")
               if line]  # fmt: skip
    model = load_params(server_dir / "models" / "global_model.safetensors")["w"]
    initial = load_params(job / "initial_model.safetensors")["w"]
    expected = initial + np.float32(1.5 * rounds)  # mean of +1 and +2 each round
    corrupted = differing_bytes(model, expected)
    lost = rounds_lost(metrics, rounds)
    reliability.measure(rounds_lost=lost, bytes_corrupted=corrupted)
    assert copies >= rounds * len(SITES)  # every result went at least twice
    assert lost == 0 and corrupted == 0
    assert [m["round"] for m in metrics] == list(range(rounds))
