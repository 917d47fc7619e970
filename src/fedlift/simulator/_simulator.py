"""The simulator: a deployment on one machine.

The server runtime runs in this process and serves the client protocol over gRPC on
loopback; each client is a worker process of its own (``WORKSPACE/site-N``), exactly the
code a real site runs. Outputs land in ``WORKSPACE/server`` (models, metrics.jsonl,
TensorBoard events, the sites' logs per site, log.txt) and ``WORKSPACE/site-N/log.txt``.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from ..client.worker import SERVER_TOKEN_ENV, SHARED_MEMORY_ENV
from ..codec import SHM_SESSION_ENV, SegmentPool, shm_available, sweep_shm
from ..errors import ClientFailedError, ConfigError
from ..job import load_job, zip_dir
from ..model import ParamTree
from ..server import (
    ArraysFormat,
    RoundRecord,
    RunInfo,
    RunRecorder,
    ServerRuntime,
    Tracking,
    check_tracking,
    compression_line,
    cross_site_evaluate,
    load_initial_model,
    read_job_json,
)
from ..transport import GrpcListener
from . import _gpu
from ._finish import REPORT_FILE, end_run
from ._gpu import assign_groups, check_gpu_ids, parse_gpu_groups
from ._processes import WorkerProcess, start_worker
from ._threads import thread_environment

__all__ = ["SimulationResult", "run_simulator", "site_environment"]

log = logging.getLogger("fedlift.simulator")

MAX_RESTARTS = 3
"""How often a site's client process that died is started again, per job."""


@dataclass
class SimulationResult:
    """What a finished simulation produced (all paths are inside the workspace)."""

    job_id: str
    workspace: Path
    rounds: list[RoundRecord]
    final_metrics: dict[str, float]
    best_round: int | None
    best_value: float | None
    global_model: Path
    best_model: Path | None
    params: ParamTree
    seconds: float


def site_environment(gpus: list[str] | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a client's worker process (and of its external script).

    ``CUDA_VISIBLE_DEVICES`` is the client's GPU group; TensorFlow's memory growth is on
    unless the user chose otherwise, so several clients can share a GPU.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # workers fork external scripts
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def _file_logging(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("fedlift")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def _round_line(record: RoundRecord, total: int) -> str:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(record.metrics.items()))
    label = f"round {record.round + 1}/{total}" if record.task == "train" else "final model"
    best = " [bold green](best)[/]" if record.is_best else ""
    sizes = compression_line(record.extra)
    return (
        f"[bold]{label}[/]: {len(record.clients)} clients, {shown or 'no metrics'}{best} "
        f"({record.seconds:.1f} s{'; ' + sizes if sizes else ''})"
    )


def run_simulator(
    job_dir: str | Path,
    workspace: str | Path,
    n_clients: int | None = None,
    threads: int | None = None,
    gpu: str | None = None,
    *,
    terminal: TextIO | None = None,
    quiet: bool = False,
    shared_memory: bool = True,
    on_start: Callable[[ServerRuntime], None] | None = None,
) -> SimulationResult:
    """Run an exported job with ``n_clients`` local clients, ``threads`` of them at once.

    Raises :class:`~fedlift.errors.ClientFailedError` (with the client's traceback) when a
    client script fails, and other :class:`~fedlift.errors.FedliftError` for bad input.
    Models move between the processes through shared memory (``/dev/shm``) unless
    ``shared_memory=False``; control messages always go over gRPC. ``on_start`` is called
    with the job's runtime once it exists (``SimEnv``'s run stops the job through it).
    """
    started = time.monotonic()
    config, root = load_job(job_dir)
    # This process writes the sites' logs: it must have what the job's tracking needs.
    check_tracking(config.tracking, f"job {config.name}")
    n = config.n_clients if n_clients is None else n_clients
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"-n (n_clients) must be an int >= 1; received: {n!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"-t (threads) must be an int >= 1; received: {threads!r}.")
    min_clients = min(config.workflow.min_clients, n)
    sites = [f"site-{i + 1}" for i in range(n)]
    placement: dict[str, list[str]] = {}
    if gpu:
        groups = parse_gpu_groups(gpu)
        placement = assign_groups(sites, groups)
        check_gpu_ids(groups, _gpu.available_gpus())
    ws = Path(workspace).resolve()
    server_dir = ws / "server"
    server_dir.mkdir(parents=True, exist_ok=True)
    console = Console(file=terminal or sys.stdout, highlight=False, quiet=quiet, soft_wrap=True)
    out = None if quiet else (terminal or sys.stdout)
    handler = _file_logging(server_dir / "log.txt")
    job_id = f"{config.name}-{uuid.uuid4().hex[:8]}"
    model_format, initial = load_initial_model(root / config.initial_model)
    initial_params = [initial]  # handed over below, so this frame keeps no copy alive
    del initial
    if isinstance(model_format, ArraysFormat):
        model_format.recycle = True  # saved every round, read by nobody meanwhile
    recorder = RunRecorder(
        server_dir,
        model_format,
        config.workflow.key_metric,
        config.workflow.higher_is_better,
        save_interval=config.workflow.save_interval,
    )
    tracking = Tracking(server_dir, tracking=config.tracking, experiment=config.name, job_id=job_id)
    shared = shared_memory and shm_available()
    # Spares up to 256 MiB: a small model's segment that slow clients still map when the
    # next aggregate starts is not traded for fresh pages every round.
    pool = SegmentPool(keep=1, spare_bytes=256 * 2**20) if shared else None
    runtime = ServerRuntime(
        job_id,
        sites,
        config.client_config(),
        zip_dir(root / config.app),
        max_concurrent=threads,
        on_log=tracking.record,
        allocate=None if pool is None else pool.allocate,
    )
    if on_start is not None:
        on_start(runtime)
    strategy = config.workflow.strategy(root / config.app)
    settings = config.workflow.settings(
        min_clients=min_clients,
        on_round=lambda r: console.print(_round_line(r, config.workflow.num_rounds)),
    )
    session_id = secrets.token_hex(4)
    previous_session = os.environ.get(SHM_SESSION_ENV)
    os.environ[SHM_SESSION_ENV] = session_id  # this process and its workers: one sweep
    # Only this run's workers may call the server: they get the secret in their environment
    # (never argv, which any local user can read in /proc/PID/cmdline).
    token = secrets.token_hex(32)
    listener = GrpcListener(
        runtime.handle,
        "127.0.0.1:0",
        max_workers=2 * n + 8,
        shared_memory=shared,
        token=token,
        stream_ops=("submit",),  # results are folded as they arrive (transport._inflow)
    )
    workers: dict[str, WorkerProcess] = {}
    restarts = dict.fromkeys(sites, 0)
    lock = threading.Lock()
    closing = threading.Event()  # set before the workers are stopped: no restart after it

    # One process per client: each one's frameworks get their share of the cores.
    threads_env = thread_environment(min(n, threads or n), os.environ)

    def launch(site: str) -> WorkerProcess:
        env = {
            **threads_env,
            **site_environment(placement.get(site)),
            SHARED_MEMORY_ENV: str(int(shared)),
            SERVER_TOKEN_ENV: token,
        }
        return start_worker(site, listener.address, ws / site, env, out, on_exit)

    def on_exit(worker: WorkerProcess, code: int) -> None:
        """A worker ended before the job did: its site is lost (the round goes on without
        it while min_clients holds) and, up to MAX_RESTARTS times a job, started again."""
        if runtime.stopped or closing.is_set():
            return
        reason = f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"
        with lock:
            returning = restarts[worker.site] < MAX_RESTARTS and not runtime.failed
            if returning:
                restarts[worker.site] += 1
        text = (
            f"the client process {reason} before the job ended (log: {worker.log_path})"
            + ("" if returning else f"; no restart left ({MAX_RESTARTS} a site and job)")
            + f".\nLast lines of its stderr:\n{worker.tail()}"
        )
        runtime.report_lost(worker.site, text, returning=returning)
        if returning:
            with lock:
                if not closing.is_set() and not runtime.stopped:
                    log.warning(
                        "%s: restarting its client process (%d of %d)",
                        worker.site,
                        restarts[worker.site],
                        MAX_RESTARTS,
                    )
                    workers[worker.site] = launch(worker.site)

    def stop_workers(grace: float) -> None:
        closing.set()
        with lock:
            current = list(workers.values())
        for worker in current:
            worker.stop(grace=grace)

    console.print(
        f"[bold]fedlift simulator[/]: job {job_id}, {n} clients"
        + (f", {threads} at a time" if threads else "")
        + (
            ", GPUs " + " ".join(f"{s}:[{','.join(g)}]" for s, g in placement.items())
            if placement
            else ""
        )
        + f", {config.workflow.num_rounds} rounds, workspace {ws}"
    )
    info = RunInfo(
        server_dir,
        job=config.name,
        job_id=job_id,
        runner="simulator",
        strategy=strategy,
        num_rounds=config.workflow.num_rounds,
        sites=sites,
        config=read_job_json(root),
    )
    info.start()
    failed: BaseException | None = None
    ending: threading.Thread | None = None
    try:
        for site in sites:
            with lock:
                workers[site] = launch(site)
        result = strategy.run(runtime, initial_params.pop(), recorder, settings)
        if config.workflow.cross_site_eval:
            cross = cross_site_evaluate(runtime, result.params, settings)
            cross.save(server_dir)
            console.print(cross.table())
        # run.json and the report while the workers exit (matplotlib's import and the
        # figures take ~0.7 s): the job is done, and nothing else reads or writes them.
        ending = threading.Thread(
            target=end_run, args=(info, None, root), name="fedlift-report", daemon=True
        )
        ending.start()
        runtime.stop("the job finished")
        stop_workers(grace=30)
    except BaseException as exc:
        failed = exc
        runtime.stop(f"the job failed: {exc}", failed=True)
        stop_workers(grace=10)
        if isinstance(exc, ClientFailedError):
            log.error("job %s failed: %s", job_id, exc)
        raise
    finally:
        listener.stop(grace=1)
        try:
            try:
                recorder.close()
            finally:
                tracking.close(failed=failed is not None)
                if ending is None:
                    end_run(info, failed, root)
                else:
                    ending.join()
        finally:
            leftovers = sweep_shm(session_id)
            if leftovers:
                log.debug("removed %d shared-memory segments at exit", len(leftovers))
            if previous_session is None:
                os.environ.pop(SHM_SESSION_ENV, None)
            else:
                os.environ[SHM_SESSION_ENV] = previous_session
            logging.getLogger("fedlift").removeHandler(handler)
            handler.close()
    elapsed = time.monotonic() - started
    _print_summary(console, result.rounds, recorder, elapsed)
    if config.tracking == "mlflow":
        store = f"sqlite:///{server_dir / 'mlflow.db'}"
        console.print(f"MLflow: {store} (mlflow ui --backend-store-uri {store})")
    elif config.tracking == "wandb":
        console.print(f"W&B (offline): {server_dir / 'wandb'} (wandb sync)")
    return SimulationResult(
        job_id=job_id,
        workspace=ws,
        rounds=result.rounds,
        final_metrics=result.final_metrics,
        best_round=result.best_round,
        best_value=result.best_value,
        global_model=recorder.global_model_path,
        best_model=recorder.best_model_path if recorder.best_round is not None else None,
        params=result.params,
        seconds=elapsed,
    )


def _print_summary(
    console: Console, rounds: list[RoundRecord], recorder: RunRecorder, elapsed: float
) -> None:
    keys = sorted({k for r in rounds for k in r.metrics})
    table = Table(title=f"fedlift: job finished in {elapsed:.1f} s", title_justify="left")
    table.add_column("round")
    table.add_column("clients", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("s", justify="right")
    for r in rounds:
        label = str(r.round + 1) if r.task == "train" else "final"
        cells: list[Any] = [f"{r.metrics[k]:.4f}" if k in r.metrics else "-" for k in keys]
        star = " *" if r.is_best else ""
        table.add_row(label + star, str(len(r.clients)), *cells, f"{r.seconds:.1f}")
    console.print(table)
    console.print(f"global model: {recorder.global_model_path}")
    if recorder.best_round is not None:
        n_train = sum(1 for r in rounds if r.task == "train")
        when = "final" if recorder.best_round >= n_train else f"round {recorder.best_round + 1}"
        console.print(
            f"best model ({recorder.key_metric} {recorder.best_value:.4f}, {when}): "
            f"{recorder.best_model_path}"
        )
    console.print(
        f"metrics: {recorder.metrics_path}; TensorBoard: {recorder.directory / 'tensorboard'}"
    )
    report = recorder.directory / REPORT_FILE
    if report.is_file():
        console.print(f"report: {report}")
