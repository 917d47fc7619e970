"""``PocEnv`` and ``ProdEnv``: ``job.run(env)`` on a POC it starts here, or on a deployed
server.

Both submit the exported job with an admin kit and follow it with the admin operations
(``job_status``, ``job_download``, ``job_abort``), as ``fedlift job ...`` does. ``PocEnv``
also owns its POC: it starts one (``fedlift poc start``'s code, in a new or fedlift-made
workspace only), and stops it once the run is over, after fetching the results into
``WORKSPACE/results/JOB_ID``, so the run's status, download and result still work after.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path

from ..errors import ConfigError, FedliftError, JobFailedError
from ..job import Env, FedJob, JobRun, RunStatus, load_job
from ._admin import KIT_ENV, AdminClient
from ._poc import DEFAULT_POC_WORKSPACE, _alive, _record, poc_start, poc_stop
from ._tls import Kit, load_kit

__all__ = ["PocEnv", "ProdEnv"]

_POLL_SECONDS = 0.5
"""How often a run asks the server for its state while something waits for it."""
_READY_SECONDS = 120.0
"""How long a new POC's server gets to answer its first call."""
_UNREACHABLE_SECONDS = 30.0
"""How long the POC's server may fail to answer before the run counts as failed."""
_MAX_POC_SITES = 64


def _export(job: FedJob, root: Path, n_clients: int | None = None) -> Path:
    """Export ``job`` under ``root``; with ``n_clients`` the job runs on that many sites
    (``min_clients`` lowered to fit, as the simulator's ``-n`` does)."""
    folder = job.export_job(root)
    if n_clients is not None and n_clients != job.n_clients:
        config, _ = load_job(folder)
        config.n_clients = n_clients
        config.workflow.min_clients = min(config.workflow.min_clients, n_clients)
        config.write(folder)
    return folder


class _ServerRun(JobRun):
    """A job on a server, followed with an admin's kit (ProdEnv; PocEnv's base)."""

    def __init__(self, job: FedJob, job_id: str, admin: AdminClient) -> None:
        super().__init__(job, job_id)
        self._admin = admin
        weakref.finalize(self, admin.close)

    def status(self) -> RunStatus:
        summary = self._admin.status(self.job_id)
        done = summary.get("round_done")
        total = summary.get("num_rounds")
        error = summary.get("error") or summary.get("notice")
        return RunStatus(
            job_id=self.job_id,
            state=str(summary.get("state")),
            rounds_done=done + 1 if isinstance(done, int) else 0,
            num_rounds=total if isinstance(total, int) else self.num_rounds,
            error=None if error is None else str(error),
        )

    def _block(self, seconds: float) -> None:
        time.sleep(min(seconds, _POLL_SECONDS))  # the server tells nobody: it is asked again

    def download(self, folder: str | Path) -> Path:
        return self._admin.download(self.job_id, folder)

    def abort(self) -> None:
        if self.status().ended:
            return
        try:
            self._admin.abort(self.job_id)
        except ConfigError:
            if not self.status().ended:  # it ended between the two calls: nothing to do
                raise


class ProdEnv(Env):
    """A deployed server: the job is submitted with the admin's ``kit`` (the folder
    ``fedlift provision --admin NAME`` made; default ``$FEDLIFT_KIT``) to the server the kit
    names, over mutual TLS, and runs on the job's ``n_clients`` sites. Ctrl-C in
    ``run.wait()`` stops only the waiting: the job goes on at the server (``run.abort()``
    stops it)."""

    def __init__(self, kit: str | os.PathLike[str] | Kit | None = None) -> None:
        if kit is None:
            kit = os.environ.get(KIT_ENV) or None
            if kit is None:
                raise ConfigError(
                    f"ProdEnv needs an admin kit: pass ProdEnv(kit=ADMIN_KIT_FOLDER) or set "
                    f"${KIT_ENV}. Received: kit=None."
                )
        if not isinstance(kit, Kit | str | os.PathLike):
            raise ConfigError(
                f"ProdEnv(kit=...) is an admin kit folder (from `fedlift provision --admin "
                f"NAME`). Received: kit={kit!r:.80}."
            )
        self.kit = kit if isinstance(kit, Kit) else load_kit(kit)
        if self.kit.role != "admin":
            raise ConfigError(
                f"ProdEnv(kit=...) needs an admin's kit (made by `fedlift provision --admin "
                f"NAME`); {self.kit.folder} is the kit of {self.kit.role} {self.kit.name!r}. "
                f"Received: kit={str(self.kit.folder)!r}."
            )

    def __repr__(self) -> str:
        return f"ProdEnv(kit={str(self.kit.folder)!r})"

    def start(self, job: FedJob) -> JobRun:
        """Export and submit ``job``; returns once the server has accepted it."""
        with tempfile.TemporaryDirectory(prefix="fedlift-submit-") as scratch:
            folder = _export(job, Path(scratch))
            admin = AdminClient(self.kit)
            try:
                job_id = admin.submit(folder)
            except BaseException:
                admin.close()
                raise
        return _ServerRun(job, job_id, admin)


class PocEnv(Env):
    """A POC on this machine, started for the run and stopped when it is over: a server and
    ``n_clients`` sites (default: the job's) as processes over mutual TLS on loopback, in
    ``workspace`` (default ``/tmp/fedlift/poc``, as ``fedlift poc start``).

    The workspace must be new, empty, or one a POC start made (it holds
    ``.fedlift-poc.json``): any other non-empty folder is refused and nothing in it is
    touched; a POC already running there is refused too. When the job ends, its results are
    fetched into ``WORKSPACE/results/JOB_ID`` and the POC is stopped; the run's
    ``status()``, ``download()`` and ``result()`` then read those. The next POC in that
    workspace replaces what this one made (keep results with ``run.download(dir)``).
    Ctrl-C in ``run.wait()``, an error while starting, or the interpreter's exit stop the
    POC: nothing it started is left running.
    """

    def __init__(
        self,
        n_clients: int | None = None,
        workspace: str | os.PathLike[str] = DEFAULT_POC_WORKSPACE,
    ) -> None:
        if n_clients is not None and (
            isinstance(n_clients, bool)
            or not isinstance(n_clients, int)
            or not 1 <= n_clients <= _MAX_POC_SITES
        ):
            raise ConfigError(
                f"PocEnv(n_clients=...) is the number of sites, 1 to {_MAX_POC_SITES}, or None "
                f"for the job's n_clients. Received: n_clients={n_clients!r}."
            )
        if not isinstance(workspace, str | os.PathLike) or not str(workspace):
            raise ConfigError(
                f"PocEnv(workspace=...) is a folder path. Received: workspace={workspace!r}."
            )
        self.n_clients = n_clients
        self.workspace = Path(workspace).resolve()

    def __repr__(self) -> str:
        return f"PocEnv(n_clients={self.n_clients!r}, workspace={str(self.workspace)!r})"

    def start(self, job: FedJob) -> JobRun:
        """Start the POC, wait for its server, submit ``job``; returns once it is accepted.
        On any error (or Ctrl-C) on the way, the POC is stopped again."""
        n = job.n_clients if self.n_clients is None else self.n_clients
        if n > _MAX_POC_SITES:
            raise ConfigError(
                f"a POC runs 1 to {_MAX_POC_SITES} sites and this job has {n}; pass "
                f"PocEnv(n_clients=...) with fewer. Received: n_clients={n}."
            )
        with tempfile.TemporaryDirectory(prefix="fedlift-submit-") as scratch:
            folder = _export(job, Path(scratch), n)  # the job's own errors, before any start
            state = poc_start(n, self.workspace)
            admin: AdminClient | None = None
            try:
                admin = AdminClient(Path(str(state["admin_kit"])))
                _wait_until_ready(admin, self.workspace, state)
                job_id = admin.submit(folder)
            except BaseException:
                if admin is not None:
                    admin.close()
                poc_stop(self.workspace)
                raise
        run = _PocRun(job, job_id, admin, self.workspace)
        run.watch()
        return run


def _wait_until_ready(admin: AdminClient, workspace: Path, state: dict[str, object]) -> None:
    """Until the new POC's server answers an admin call; raises JobFailedError when its
    process ended or it did not answer in time (with the end of its log)."""
    pids = state.get("pids")
    server_pid = int(pids["server"]) if isinstance(pids, dict) else None
    deadline = time.monotonic() + _READY_SECONDS
    while True:
        try:
            admin.list()
            return
        except FedliftError as exc:
            ended = server_pid is not None and not _alive(server_pid)
            if ended or time.monotonic() > deadline:
                log_path = workspace / "logs" / "server.log"
                try:
                    tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
                except OSError:
                    tail = "(no log)"
                how = "exited" if ended else f"did not answer within {_READY_SECONDS:.0f} s"
                raise JobFailedError(
                    f"the POC's server {how}, so the job was not submitted; its log is "
                    f"{log_path}. Received: error={exc}\nLast lines of its log:\n{tail}"
                ) from None
        time.sleep(0.2)  # the server process is starting


class _PocRun(_ServerRun):
    """A job on a POC this run owns: a watcher follows it, fetches its results when it
    ends and stops the POC (also on Ctrl-C in :meth:`wait` and at the interpreter's exit)."""

    def __init__(self, job: FedJob, job_id: str, admin: AdminClient, workspace: Path) -> None:
        super().__init__(job, job_id, admin)
        self.workspace = workspace
        self._ended: RunStatus | None = None
        self._cache: Path | None = None
        self._cache_error: str | None = None
        self._done = threading.Event()  # results fetched (or not) and the POC stopped
        self._stop_now = threading.Event()
        self._stop_reason = "the POC was stopped"
        self._poc_lock = threading.Lock()
        self._poc_running = True
        # Not a daemon: a script that ends without waiting still sees its job to the end,
        # and the POC stopped, as with SimEnv.
        self._watcher = threading.Thread(target=self._watch, name="fedlift-pocenv")

    def watch(self) -> None:
        atexit.register(self._at_exit)
        self._watcher.start()

    def _watch(self) -> None:
        last = RunStatus(self.job_id, "submitted", 0, self.num_rounds)
        failing_since: float | None = None
        try:
            while not self._stop_now.is_set():
                try:
                    last = _ServerRun.status(self)
                except FedliftError as exc:
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > _UNREACHABLE_SECONDS:
                        self._ended = RunStatus(
                            self.job_id, "failed", last.rounds_done, self.num_rounds,
                            f"the POC's server stopped answering: {exc}",
                        )  # fmt: skip
                        return
                else:
                    failing_since = None
                    if last.ended:
                        self._ended = last
                        self._fetch()
                        return
                self._stop_now.wait(_POLL_SECONDS)
            self._ended = RunStatus(
                self.job_id, "aborted", last.rounds_done, self.num_rounds, self._stop_reason
            )
        finally:
            self._stop_poc()
            self._done.set()
            atexit.unregister(self._at_exit)

    def _fetch(self) -> None:
        """The results, into ``WORKSPACE/results`` (in the POC's marker first, so that the
        next POC start may replace it and nothing else)."""
        try:
            _record(self.workspace, ["results"])
            self._cache = self._admin.download(self.job_id, self.workspace / "results")
        except (FedliftError, OSError) as exc:
            self._cache_error = f"{type(exc).__name__}: {exc}"

    def _stop_poc(self) -> None:
        with self._poc_lock:
            if not self._poc_running:
                return
            self._poc_running = False
        try:
            poc_stop(self.workspace)
        except ConfigError:
            pass  # its record is gone: someone ran `fedlift poc stop` already
        finally:
            self._admin.close()

    def status(self) -> RunStatus:
        if self._done.is_set() and self._ended is not None:
            return self._ended
        try:
            return _ServerRun.status(self)
        except FedliftError:
            if self._ended is None and not self._poc_stopping():
                raise
        self._done.wait()  # it ended and the POC is being stopped: the status is kept
        if self._ended is None:
            raise JobFailedError(f"job {self.job_id}: its POC stopped without a final status.")
        return self._ended

    def wait(self, timeout: float | None = None) -> RunStatus:
        status = super().wait(timeout)
        if status.ended:
            self._done.wait()  # the results are fetched and the POC stopped: then it is over
            return self.status()
        return status

    def _block(self, seconds: float) -> None:
        self._done.wait(min(seconds, _POLL_SECONDS))

    def abort(self) -> None:
        if self._done.is_set():
            return
        try:
            super().abort()
        except FedliftError:
            if not self._done.is_set():
                raise

    def _interrupted(self) -> None:
        self._stop_reason = "interrupted (KeyboardInterrupt while waiting); the POC was stopped"
        try:
            self._admin.abort(self.job_id)
        except FedliftError:
            pass  # it ended, or the server is gone: the POC is stopped next either way
        self._stop_now.set()
        self._done.wait(_UNREACHABLE_SECONDS + 60)

    def _at_exit(self) -> None:
        if self._watcher.is_alive():
            self._interrupted()

    def _results(self) -> Path:
        self._done.wait()
        if self._cache is None:
            raise JobFailedError(
                f"the results of job {self.job_id} could not be fetched before its POC was "
                f"stopped. Received: error={self._cache_error or self._stop_reason}."
            )
        return self._cache

    def _results_folder(self, scratch: Path) -> Path:
        return self._results()

    def download(self, folder: str | Path) -> Path:
        if not self._done.is_set():
            try:
                return super().download(folder)
            except FedliftError:
                if self._ended is None and not self._poc_stopping():
                    raise
        target = Path(folder) / self.job_id
        shutil.copytree(self._results(), target, dirs_exist_ok=True)
        return target

    def _poc_stopping(self) -> bool:
        with self._poc_lock:
            return not self._poc_running
