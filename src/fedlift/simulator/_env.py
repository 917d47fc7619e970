"""``SimEnv``: ``job.run(SimEnv(...))`` runs the job in the simulator, in the background.

The simulator runs in a thread of this process (its server runtime, as ``simulator_run``
does) with a worker process per client, so ``job.run`` returns at once and the run object
follows it. The results are the workspace's ``server/`` folder, the same folder a
deployment's ``download`` fetches.
"""

from __future__ import annotations

import atexit
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, JobAbortedError
from ..job import Env, FedJob, JobRun, RunStatus, read_rounds
from ..server import CHECKPOINT_DIR, CHECKPOINT_FILE, ServerRuntime
from ._gpu import parse_gpu_groups
from ._simulator import run_simulator

__all__ = ["DEFAULT_SIM_WORKSPACE", "SimEnv"]

DEFAULT_SIM_WORKSPACE = Path("/tmp/fedlift/simulator")
"""Where ``SimEnv`` runs a job by default: ``DEFAULT_SIM_WORKSPACE/JOB_NAME``."""

_ABORT_GRACE = 60.0
"""Seconds a stopped simulation gets to end its workers (they get 10 s, then SIGKILL)."""

_active_lock = threading.Lock()
_active: list[_SimRun] = []
"""The simulation running in this process, if any: the simulator sets process-wide state
(its shared-memory session in the environment, a handler on the ``fedlift`` logger), so
two at once would mix their segments and logs."""


def _positive(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(
            f"SimEnv({name}=...) must be an int >= 1, or None for the default. "
            f"Received: {name}={value!r}."
        )


@dataclass(frozen=True)
class SimEnv(Env):
    """The simulator on this machine: ``n_clients`` sites (default: the job's), ``threads``
    of them training at once (default: all), ``gpu`` groups assigned round-robin
    (``"0,1"`` or ``"[0,1],[2,3]"``, as ``fedlift simulator -gpu``). ``workspace`` is the
    folder for models, metrics and logs (default ``/tmp/fedlift/simulator/JOB_NAME``).
    ``quiet`` prints only errors instead of a line per round.

    One simulation runs at a time in a process (a second ``job.run(SimEnv(...))`` while
    one runs raises ConfigError). Ctrl-C in ``run.wait()`` stops it.
    """

    n_clients: int | None = None
    threads: int | None = None
    gpu: str | None = None
    workspace: str | Path | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        _positive(self.n_clients, "n_clients")
        _positive(self.threads, "threads")
        if self.gpu is not None:
            if not isinstance(self.gpu, str):
                raise ConfigError(
                    f"SimEnv(gpu=...) is a string of GPU groups such as '0,1' or "
                    f"'[0,1],[2,3]'. Received: gpu={self.gpu!r}."
                )
            try:
                parse_gpu_groups(self.gpu)
            except ConfigError as exc:
                raise ConfigError(f"SimEnv(gpu=...): {exc} Received: gpu={self.gpu!r}.") from None
        if self.workspace is not None and not isinstance(self.workspace, str | Path):
            raise ConfigError(
                f"SimEnv(workspace=...) is a folder path. Received: workspace={self.workspace!r}."
            )
        if not isinstance(self.quiet, bool):
            raise ConfigError(f"SimEnv(quiet=...) is True or False. Received: {self.quiet!r}.")

    def start(self, job: FedJob) -> JobRun:
        """Export ``job`` into ``WORKSPACE/jobs`` and start the simulation; returns once its
        server runtime exists (a job that cannot start raises here)."""
        workspace = Path(self.workspace or DEFAULT_SIM_WORKSPACE / job.name).resolve()
        with _active_lock:
            if _active:
                raise ConfigError(
                    f"a simulation is already running in this process ({_active[0].job_id}); "
                    "wait for it with run.wait(), or run this job in another process. "
                    f"Received: job={job.name!r}."
                )
            job_dir = job.export_job(workspace / "jobs", exclude=(workspace,))
            run = _SimRun(job, self, job_dir, workspace)
            _active.append(run)
        try:
            run.launch()
        except BaseException:
            with _active_lock:
                if run in _active:
                    _active.remove(run)
            raise
        return run


class _SimRun(JobRun):
    def __init__(self, job: FedJob, env: SimEnv, job_dir: Path, workspace: Path) -> None:
        super().__init__(job, f"{job.name} (starting)")
        self._env = env
        self._job_dir = job_dir
        self.workspace = workspace
        self._lock = threading.Lock()
        self._started = threading.Event()  # the runtime exists, or the thread ended first
        self._runtime: ServerRuntime | None = None
        self._abort_reason: str | None = None
        self._error: BaseException | None = None
        self._state = "running"
        self._thread = threading.Thread(target=self._main, name="fedlift-simenv")

    def launch(self) -> None:
        atexit.register(self._at_exit)
        self._thread.start()
        try:
            self._started.wait()
        except KeyboardInterrupt:
            self._interrupted()
            raise
        if self._runtime is None:  # it ended before its runtime existed: it cannot start
            self._thread.join()
            if self._error is not None:
                raise self._error

    def _on_start(self, runtime: ServerRuntime) -> None:
        with self._lock:
            self._runtime = runtime
            self.job_id = runtime.job_id
            reason = self._abort_reason
        if reason is not None:
            runtime.stop(reason, failed=True)
        self._started.set()

    def _main(self) -> None:
        env = self._env
        try:
            run_simulator(
                self._job_dir,
                self.workspace,
                env.n_clients,
                env.threads,
                env.gpu,
                quiet=env.quiet,
                on_start=self._on_start,
            )
            state = "finished"
        except BaseException as exc:  # reported by status() and result()
            self._error = exc
            aborted = self._abort_reason is not None or isinstance(exc, JobAbortedError)
            state = "aborted" if aborted else "failed"
        with self._lock:
            self._state = state
        with _active_lock:
            if self in _active:
                _active.remove(self)
        atexit.unregister(self._at_exit)
        self._started.set()

    def status(self) -> RunStatus:
        with self._lock:
            state, runtime = self._state, self._runtime
        rounds = 0
        if runtime is not None:  # before it, metrics.jsonl may be an earlier run's
            records = read_rounds(self.workspace / "server" / "metrics.jsonl")
            rounds = sum(1 for r in records if r.task == "train")
        error = None
        if state == "aborted":
            error = self._abort_reason or str(self._error)
        elif state == "failed":
            error = f"{type(self._error).__name__}: {self._error}"
        return RunStatus(self.job_id, state, rounds, self.num_rounds, error)

    def _block(self, seconds: float) -> None:
        self._thread.join(seconds)

    def abort(self) -> None:
        with self._lock:
            if self._state != "running":
                return
            if self._abort_reason is None:
                self._abort_reason = "aborted by the user (run.abort())"
            reason, runtime = self._abort_reason, self._runtime
        if runtime is not None:
            runtime.stop(reason, failed=True)

    def _interrupted(self) -> None:
        with self._lock:
            self._abort_reason = "interrupted (KeyboardInterrupt while waiting)"
        self.abort()
        self._thread.join(_ABORT_GRACE)

    def _at_exit(self) -> None:
        """The interpreter exits (after Ctrl-C, it no longer waits for the thread): the
        simulation's workers must not outlive it."""
        if self._thread.is_alive():
            self._interrupted()

    def _results_folder(self, scratch: Path) -> Path:
        return self.workspace / "server"

    def download(self, folder: str | Path) -> Path:
        target = Path(folder) / self.job_id
        source = self.workspace / "server"

        def skipped(directory: str, names: list[str]) -> list[str]:
            top = Path(directory) == source
            return [
                n
                for n in names
                if n.startswith(".") or (top and n in (CHECKPOINT_DIR, CHECKPOINT_FILE))
            ]  # as a server's download: no resume state, no temporary files

        shutil.copytree(source, target, ignore=skipped, dirs_exist_ok=True)
        return target
