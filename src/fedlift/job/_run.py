"""One job, three places: ``run = job.run(env)`` and the run object every env returns.

The job API cannot import the simulator or the deployment code (they sit above it), so it
states here what an env is (:class:`Env`: something that starts a job and returns a
:class:`JobRun`) and implements everything a run does that does not depend on where it
runs: waiting, reading the results folder into a :class:`JobResult`, the errors of a run
that did not finish. The envs themselves live with the code they drive
(``fedlift.simulator.SimEnv``, ``fedlift.deploy.PocEnv`` / ``ProdEnv``) and subclass these.

Every env's results are the same folder (what the server writes for a job: ``models/``,
``metrics.jsonl``, ``state.json``, ``tensorboard/``, ``log.txt``), so :meth:`JobRun.result`
reads them with one function, whichever env produced them.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, JobAbortedError, JobFailedError
from ..model import ParamTree, plain_keras_copy
from ..server import ArraysFormat, KerasWeightsFormat, ModelFormat, RoundRecord

if TYPE_CHECKING:
    from ._fedjob import FedJob

__all__ = ["RUN_STATES", "Env", "JobResult", "JobRun", "RunStatus", "read_rounds"]

RUN_STATES = ("submitted", "running", "finished", "failed", "aborted")
"""A run's states, the deployment server's job states: queued, running, and the three ends."""
_ENDED = frozenset(RUN_STATES[2:])


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands: ``state`` (one of :data:`RUN_STATES`), how many training rounds
    are done out of ``num_rounds``, and the ``error`` that ended a failed or aborted run."""

    job_id: str
    state: str
    rounds_done: int
    num_rounds: int
    error: str | None = None

    @property
    def ended(self) -> bool:
        """Whether the run is over (finished, failed or aborted): nothing will change."""
        return self.state in _ENDED


@dataclass(frozen=True)
class JobResult:
    """What a finished run produced, read from its results folder.

    ``global_model``: the params after the last round; ``best_model``: the params the
    clients evaluated when ``key_metric`` was at its best (None when no round reported
    it), in ``best_round`` (0-based; ``num_rounds`` for the final evaluation) with
    ``best_value``; ``rounds``: every round's record (``metrics.jsonl``), training rounds
    then the final evaluation; ``final_metrics``: that evaluation's metrics ({} without).
    """

    job_id: str
    global_model: ParamTree
    best_model: ParamTree | None
    rounds: list[RoundRecord]
    best_round: int | None
    best_value: float | None
    final_metrics: dict[str, float]

    @property
    def metrics(self) -> list[dict[str, float]]:
        """The aggregated metrics of each training round, in order."""
        return [r.metrics for r in self.rounds if r.task == "train"]


class JobRun(ABC):
    """A job started by ``job.run(env)``, the same object in every env.

    :meth:`status` says where it stands, :meth:`wait` blocks until it ends,
    :meth:`result` waits and loads the models and metrics, :meth:`download` copies the
    results folder, :meth:`abort` stops it. A run that failed or was aborted makes
    :meth:`result` raise :class:`~fedlift.errors.JobFailedError` or
    :class:`~fedlift.errors.JobAbortedError` with the reason.
    """

    def __init__(self, job: FedJob, job_id: str) -> None:
        self.job_id = job_id
        self.job_name = job.name
        self.num_rounds = job.workflow.num_rounds
        self._key_metric = job.workflow.key_metric
        # Keras weights files load into a model of the job's architecture; a copy, so that
        # the user's model object is never changed by reading a result.
        self._keras_model = job.initial_model if job._model_kind == "keras" else None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.job_id}>"

    @abstractmethod
    def status(self) -> RunStatus:
        """The run's current state (asks the server in a deployment)."""

    @abstractmethod
    def download(self, folder: str | Path) -> Path:
        """Copy the run's results (models, metrics, TensorBoard events, the server's log)
        into ``folder/JOB_ID`` and return that folder. Before the run ends it holds what
        the server has written so far; call :meth:`wait` first for the end."""

    @abstractmethod
    def abort(self) -> None:
        """Stop the run (it ends ``aborted``); nothing happens when it has already ended."""

    @abstractmethod
    def _block(self, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early when the run ends if the env can tell."""

    def _interrupted(self) -> None:  # noqa: B027 (a hook whose default is to do nothing)
        """What a KeyboardInterrupt in :meth:`wait` does before it propagates (default:
        nothing: the run goes on; envs that run the job on this machine stop it)."""

    def _results_folder(self, scratch: Path) -> Path:
        """A folder holding the run's results, for :meth:`result` (default: a download
        into ``scratch``; an env whose results already lie on this disk returns them)."""
        return self.download(scratch)

    def wait(self, timeout: float | None = None) -> RunStatus:
        """Block until the run ends or ``timeout`` seconds pass; returns the status then
        (``status.ended`` tells which). Ctrl-C while waiting stops a run on this machine
        (SimEnv, PocEnv) before it propagates; a ProdEnv job goes on at the server."""
        if timeout is not None and not (
            isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout >= 0
        ):
            raise ConfigError(
                f"wait(timeout=...) is seconds >= 0, or None to wait until the run ends. "
                f"Received: timeout={timeout!r}."
            )
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        try:
            while True:
                status = self.status()
                remaining = deadline - time.monotonic()
                if status.ended or remaining <= 0:
                    return status
                self._block(min(remaining, 3600.0))
        except KeyboardInterrupt:
            self._interrupted()
            raise

    def result(self) -> JobResult:
        """Wait for the end and return the models and metrics; raises
        :class:`~fedlift.errors.JobFailedError` (failed) or
        :class:`~fedlift.errors.JobAbortedError` (aborted) with the reason."""
        status = self.wait()
        if status.state == "aborted":
            raise JobAbortedError(f"job {self.job_id} was aborted: {status.error}")
        if status.state != "finished":
            raise JobFailedError(
                f"job {self.job_id} failed, so it has no result: {status.error}\n"
                "Its logs are in run.download(FOLDER) (log.txt; the sites' logs next to the "
                "server's in a simulation)."
            )
        with tempfile.TemporaryDirectory(prefix="fedlift-result-") as scratch:
            return self._read(self._results_folder(Path(scratch)))

    def _format(self) -> ModelFormat:
        if self._keras_model is not None:
            return KerasWeightsFormat(plain_keras_copy(self._keras_model))
        return ArraysFormat()

    def _read(self, folder: Path) -> JobResult:
        model_format = self._format()
        rounds = read_rounds(folder / "metrics.jsonl")
        global_path = folder / "models" / f"global_model{model_format.suffix}"
        if not global_path.is_file():
            raise JobFailedError(
                f"job {self.job_id} finished but its results hold no global model "
                f"(models/{global_path.name}); the results folder is incomplete. "
                f"Received: files={sorted(p.name for p in folder.iterdir())}."
            )
        best = [r for r in rounds if r.is_best]
        best_path = folder / "models" / f"best_model{model_format.suffix}"
        best_model = model_format.load(best_path) if best and best_path.is_file() else None
        evaluated = [r for r in rounds if r.task == "validate"]
        return JobResult(
            job_id=self.job_id,
            global_model=model_format.load(global_path),
            best_model=best_model,
            rounds=rounds,
            best_round=best[-1].round if best else None,
            best_value=best[-1].metrics.get(self._key_metric) if best else None,
            final_metrics=dict(evaluated[-1].metrics) if evaluated else {},
        )


def read_rounds(path: Path) -> list[RoundRecord]:
    """The round records of ``metrics.jsonl`` (none when it does not exist yet). A line
    being written (cut short) is skipped: this is read while a run appends to it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            data: Any = json.loads(line)
            records.append(RoundRecord(**data))
        except (ValueError, TypeError):
            continue
    return records


class Env(ABC):
    """Where a job runs: ``job.run(env)`` calls :meth:`start`. fedlift's envs are
    ``SimEnv`` (the simulator), ``PocEnv`` (a POC it starts and stops on this machine) and
    ``ProdEnv`` (a deployed server, with an admin kit)."""

    @abstractmethod
    def start(self, job: FedJob) -> JobRun:
        """Start ``job`` here and return its run once it is started (or submitted); a job
        that cannot start raises here."""
