"""A full disk or a read-only workspace while models and checkpoints are saved (a real
tmpfs of a few MiB, filled up or remounted read-only): one clear StorageError line that
names the path, the cause and the fix; the previous model and checkpoint intact and
loadable; and the job's state on disk always what the admin is told."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
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
    temp_files,
    wait_until,
)
from fedlift.errors import StorageError
from fedlift.server import ArraysFormat, RoundRecord, RunRecorder
from fedlift.server._store import load_params, read_checkpoint

SIZE = 1 << 18  # float32: 1 MiB a model


class Disk:
    """A tmpfs mounted at ``path``, to fill up and remount read-only."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.filler = path / "filler"

    def free(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Take the disk's free space, all but ``leave`` bytes."""
        with open(self.filler, "ab") as sink:
            block = b"\0" * (1 << 16)
            with contextlib.suppress(OSError):
                while self.free() - len(block) >= leave:
                    sink.write(block)
                    sink.flush()
                while self.free() > leave:
                    sink.write(b"\0" * 4096)
                    sink.flush()

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)

    def remount(self, mode: str) -> None:
        """``ro``: a read-only bind mount of the disk over itself (a plain ``remount,ro``
        is refused while a process holds a file open for writing: the server's logs);
        every new write through the path then fails with EROFS. ``rw``: remove it."""
        path = str(self.path)
        if mode == "ro":
            subprocess.run(["mount", "--bind", path, path], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True)
        else:
            subprocess.run(["umount", path], check=True)

    def unmount(self) -> None:
        while os.path.ismount(self.path):  # a read-only bind left by a failed test, then the disk
            if subprocess.run(["umount", "-l", str(self.path)], check=False).returncode != 0:
                break


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = Disk(tmp_path / "disk", "16m")
    try:
        yield mounted
    finally:
        mounted.unmount()


def one_line(error: StorageError, path: Path, cause: str, fix: str) -> None:
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    assert str(path) in message and cause in message and fix in message, message


def first_round(directory: Path) -> tuple[RunRecorder, np.ndarray]:
    recorder = RunRecorder(directory, ArraysFormat(), checkpoints=True)
    params = np.arange(SIZE, dtype=np.float32)
    recorder.record(RoundRecord(0, "train", ["site-1"], {"accuracy": 0.5}, 0.1), {"w": params})
    recorder.save_global({"w": params}, 0)
    recorder.flush()
    return recorder, params


def intact(directory: Path, params: np.ndarray) -> int:
    """Bytes of the last checkpoint and the global model that differ from ``params``."""
    checkpoint = read_checkpoint(directory)
    assert checkpoint is not None and checkpoint.round_done == 0
    saved = load_params(checkpoint.path)["w"]
    model = load_params(directory / "models" / "global_model.safetensors")["w"]
    return differing_bytes(saved, params) + differing_bytes(model, params)


@pytest.mark.reliability
def test_a_full_disk_while_saving_raises_one_line_and_keeps_the_last_checkpoint(
    reliability: Any, disk: Disk
) -> None:
    directory = disk.path / "server"
    recorder, params = first_round(directory)
    metrics_before = (directory / "metrics.jsonl").read_bytes()
    disk.fill(leave=SIZE // 2)  # room for small files, not for a model
    reliability.fault("disk full while saving the global model and checkpoint")
    recorder.save_global({"w": params + 1}, 1)
    with pytest.raises(StorageError) as caught:
        recorder.flush()
    assert caught.value.errno == errno.ENOSPC
    one_line(caught.value, directory, "No space left on device", "free space")
    disk.fill()  # now nothing at all: a line longer than a page cannot go either
    many = {f"metric_{i}": float(i) for i in range(600)}  # ~12 KiB of JSON
    with pytest.raises(StorageError) as line:
        recorder.record(RoundRecord(1, "train", ["site-1"], many, 0.1), None)
    one_line(line.value, directory / "metrics.jsonl", "No space left on device", "free space")
    corrupted = intact(directory, params)
    corrupted += (directory / "metrics.jsonl").read_bytes() != metrics_before  # no half line
    leaks = len(temp_files(disk.path))
    # Space again: the next save goes through.
    disk.empty()
    recorder.save_global({"w": params + 2}, 2)
    recorder.flush()
    recorder.close()
    assert read_checkpoint(directory).round_done == 2  # type: ignore[union-attr]
    reliability.measure(bytes_corrupted=corrupted, leaks=leaks)
    assert corrupted == 0 and leaks == 0


@pytest.mark.reliability
def test_a_read_only_workspace_while_saving_raises_one_line_and_keeps_the_last_checkpoint(
    reliability: Any, disk: Disk
) -> None:
    directory = disk.path / "server"
    recorder, params = first_round(directory)
    disk.remount("ro")
    reliability.fault("workspace remounted read-only while saving a checkpoint")
    try:
        recorder.save_global({"w": params + 1}, 1)
        with pytest.raises(StorageError) as caught:
            recorder.flush()
        assert caught.value.errno == errno.EROFS
        one_line(caught.value, directory, "Read-only file system", "read-write")
        corrupted = intact(directory, params)
    finally:
        disk.remount("rw")
    leaks = len(temp_files(disk.path))
    recorder.save_global({"w": params + 2}, 2)
    recorder.close()
    assert read_checkpoint(directory).round_done == 2  # type: ignore[union-attr]
    reliability.measure(bytes_corrupted=corrupted, leaks=leaks)
    assert corrupted == 0 and leaks == 0


def meta_on_disk(deployment: Deployment, job_id: str) -> dict[str, Any]:
    return dict(json.loads((deployment.job_dir(job_id) / "meta.json").read_text()))


@pytest.mark.reliability
def test_deployed_disk_full_fails_the_job_and_meta_says_so(
    reliability: Any, tmp_path: Path, disk: Disk
) -> None:
    rounds = 6
    job = exact_job(tmp_path, rounds, size=SIZE, sleep=0.5)
    deployment = Deployment(tmp_path, SITES, proxy=False, workspace=disk.path / "ws")
    try:
        job_id = deployment.submit(job)
        deployment.wait_round(job_id, 1)
        disk.fill(leave=SIZE // 2)  # meta.json still fits; the next model does not
        reliability.fault("deployed server: disk full mid-job")
        status = deployment.wait(job_id)
        on_disk = meta_on_disk(deployment, job_id)
        checkpoint = read_checkpoint(deployment.job_dir(job_id) / "server")
        log = (deployment.logs / "server.log").read_text()
    finally:
        deployment.close()
    assert status["state"] == "failed" and on_disk["state"] == "failed", (status, on_disk)
    assert status["error"] == on_disk["error"] and "No space left on device" in status["error"]
    assert "\n" not in status["error"] and "Traceback" not in log, log[-3000:]
    assert checkpoint is not None and checkpoint.round_done >= 1
    # The checkpoint is the model of its round, bit for bit.
    corrupted = differing_bytes(
        load_params(checkpoint.path)["w"], expected_final(job, checkpoint.round_done + 1)
    )
    leaks = len(leaked_processes(deployment.started, tmp_path)) + len(temp_files(disk.path))
    reliability.measure(bytes_corrupted=corrupted, leaks=leaks)
    assert corrupted == 0 and leaks == 0


@pytest.mark.reliability
def test_deployed_read_only_workspace_keeps_state_and_disk_agreed_then_resumes(
    reliability: Any, tmp_path: Path, disk: Disk
) -> None:
    rounds = 6
    job = exact_job(tmp_path, rounds, size=SIZE, sleep=0.5)
    deployment = Deployment(tmp_path, SITES, proxy=False, workspace=disk.path / "ws")
    try:
        job_id = deployment.submit(job)
        deployment.wait_round(job_id, 1)
        disk.remount("ro")
        reliability.fault("deployed server: workspace read-only mid-job")
        try:
            wait_until(lambda: "notice" in deployment.status(job_id), 60, "the job to stop")
            status = deployment.status(job_id)
            on_disk = meta_on_disk(deployment, job_id)
        finally:
            disk.remount("rw")
        # What the admin is told is what a restart will find: the job is still running.
        assert status["state"] == on_disk["state"] == "running", (status, on_disk)
        assert status["round_done"] == on_disk["round_done"]
        assert "Read-only file system" in status["notice"] and "\n" not in status["notice"]
        deployment.restart_server()
        reliability.fault("server restarted after the workspace is writable again")
        final = deployment.wait(job_id, timeout=180)
        metrics = deployment.metrics(job_id)
        model = final_model(deployment, job_id)
        log = (deployment.logs / "server.log").read_text()
    finally:
        deployment.close()
    assert final["state"] == "finished", (final, deployment.log_tail())
    assert "Traceback" not in log, log[-3000:]
    lost = rounds_lost(metrics, rounds)
    corrupted = differing_bytes(model, expected_final(job, rounds))
    leaks = len(leaked_processes(deployment.started, tmp_path)) + len(temp_files(disk.path))
    reliability.measure(rounds_lost=lost, bytes_corrupted=corrupted, leaks=leaks)
    assert (lost, corrupted, leaks) == (0, 0, 0)
