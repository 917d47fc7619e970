"""The long-running server of a deployment: a job store, admin operations, sites that poll
for work, one job at a time, and resume after a restart.

Every request arrives over mutual TLS; who may do what is decided by the identity of the
caller's verified certificate (``request.peer`` / ``request.peer_role``), never by request
fields.

Admin operations (role ``admin``)::

    job_submit   arrays [uint8 zip of an exported job folder]  -> job {job_id}
    job_list                                                 -> jobs {jobs: [summary, ...]}
    job_status   {job_id}                                    -> job {summary}
    job_logs     {job_id, site?}                             -> logs {text}
    job_abort    {job_id}                                    -> job {summary}
    job_download {job_id}                   -> results {job_id}, arrays [uint8 zip of server/]

Site operations (role ``site``; the site is the certificate's name)::

    next_job     {wait}                        -> job {job_id, name} | none
    site_log     {job_id, text}                -> ok
    register, get_task, submit, client_error, log   with {job_id, site}: the job's
                 :class:`~fedlift.server.ServerRuntime` protocol (``site`` must be the caller)

Store layout (``WORKSPACE/jobs/<job_id>/``): ``job/`` (the unpacked job), ``meta.json``
(state, sites, times; written atomically), ``server/`` (models, metrics.jsonl, state.json,
tensorboard/ with a folder per site for what its script logged, mlflow.db and
mlflow-artifacts/ or wandb/ by the job's ``tracking``, log.txt, checkpoint/ +
checkpoint.json) and ``sites/<site>/log.txt``.

What admins are told is what is on disk: a job's meta is written first and only then changed
in memory. When a job ends and its new state cannot be written (disk full, read-only
workspace), the state stays what ``meta.json`` says (``running``: the job resumes from its
last checkpoint at the next start) and the summary's ``notice`` says so.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write_text, remove_temp_files, storage_errors
from ..codec import Message
from ..errors import (
    ConfigError,
    FedliftError,
    JobAbortedError,
    PermissionDeniedError,
    ProtocolError,
    ResourceLimitError,
    StorageError,
)
from ..job import JobConfig, load_job, zip_dir
from ..server import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    RoundRecord,
    RunInfo,
    RunRecorder,
    ServerRuntime,
    Tracking,
    cross_site_evaluate,
    load_initial_model,
    read_job_json,
)
from ..transport import GrpcListener
from ._identity import Identity
from ._live import LiveView
from ._tls import Kit, Revocations, load_kit, server_credentials

__all__ = ["ADMIN_OPS", "JOB_STATES", "SITE_JOB_OPS", "DeployServer"]

log = logging.getLogger("fedlift.server")

JOB_STATES = ("submitted", "running", "finished", "failed", "aborted")
ADMIN_OPS = frozenset(
    {"job_submit", "job_list", "job_status", "job_logs", "job_abort", "job_download"}
)
SITE_JOB_OPS = frozenset({"register", "get_task", "submit", "client_error", "log"})
_SITE_OPS = SITE_JOB_OPS | {"next_job", "site_log"}
_MAX_POLL_SECONDS = 30.0
_POLLER_FRESH_SECONDS = _MAX_POLL_SECONDS + 15.0  # a site between two polls still counts
_MAX_SITE_LOG_BYTES = 16 << 20
_MAX_LOG_CHUNK = 1 << 20
_MAX_LOG_REPLY = 1 << 20
_MAX_SMALL_REQUEST = 1 << 20  # every request but a site's submit and an admin's job_submit
_LARGE_OPS = frozenset({("site", "submit"), ("admin", "job_submit")})
_CALLS_PER_PEER = 16  # a site needs about 5 at once (poll, task, submit, logs)
_PLANNED_SITES = 64
_PLANNED_ADMINS = 8
_SNAPSHOT_JOBS = 100  # the live view lists the latest jobs


@dataclass
class _Job:
    job_id: str
    folder: Path
    meta: dict[str, Any]
    runtime: ServerRuntime | None = None
    finished_sites: set[str] = field(default_factory=set)
    abort_requested: bool = False
    abort_reason: str | None = None
    resume: bool = False
    notice: str | None = None
    """Why the state in ``meta.json`` is not the job's end (its end could not be saved)."""

    @property
    def state(self) -> str:
        return str(self.meta["state"])

    @property
    def sites(self) -> list[str]:
        return list(self.meta.get("sites") or [])

    def summary(self) -> dict[str, Any]:
        keys = (
            "job_id",
            "name",
            "state",
            "submitted_at",
            "started_at",
            "finished_at",
            "round_done",
            "num_rounds",
            "sites",
            "error",
        )
        summary = {key: self.meta.get(key) for key in keys}
        if self.notice is not None:
            summary["notice"] = self.notice
        return summary


def _str(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ProtocolError(f"field {name!r} must be a non-empty string; got {value!r:.60}")
    return value


def _tail(path: Path, limit: int = _MAX_LOG_REPLY) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - limit))
        data = handle.read()
    text = data.decode("utf-8", errors="replace")
    return text if size <= limit else f"[... first {size - limit:,} bytes left out]\n{text}"


def _zip_results(folder: Path) -> bytes:
    """The job's results folder as zip bytes, without the resume checkpoints."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bundle:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if rel.parts[0] in (CHECKPOINT_DIR, CHECKPOINT_FILE) or path.name.startswith("."):
                continue  # resume state and temporary files of atomic writes
            if path.is_file() and not path.is_symlink():
                bundle.write(path, rel.as_posix())
    return buffer.getvalue()


class _JobLogHandler(logging.FileHandler):
    """A job's ``log.txt``: a write that fails (disk full) is reported once, in one line."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            sys.stderr.write(f"fedlift: cannot write {self.baseFilename}: {error}\n")


def _file_logging(path: Path) -> logging.Handler:
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _JobLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("fedlift")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


class DeployServer:
    """The server of a deployment (see the module docstring for the protocol and layout).

    ``kit`` is the server's kit from ``fedlift provision``; ``workspace`` holds the job store;
    ``address`` is where to listen (default: every interface, on the port of the kit's server
    address); ``web`` (``HOST:PORT``) serves the live view there too (:class:`LiveView`).
    Jobs found running in the store resume from their last checkpoint, and queued ones are
    queued again. :meth:`stop` (or leaving a ``with`` block) stops it; a job that is running
    then stays ``running`` in the store and resumes at the next start.
    """

    def __init__(
        self,
        kit: Kit | str | os.PathLike[str],
        workspace: str | os.PathLike[str],
        *,
        address: str | None = None,
        allow_app_code: bool = False,
        web: str | None = None,
    ) -> None:
        self.allow_app_code = allow_app_code
        """Whether jobs may name strategies (or functions) from their app folder: that code
        runs in this process, with the server's key. Off unless the operator opts in."""
        self.kit = kit if isinstance(kit, Kit) else load_kit(kit)
        if self.kit.role != "server":
            raise ConfigError(
                f"{self.kit.folder} is the kit of {self.kit.role} {self.kit.name!r}; the "
                "server needs the server kit (the `server` folder `fedlift provision` made)."
            )
        self.revocations = Revocations(self.kit)
        """The kit's ``crl.pem``: a revoked certificate is refused at admission, before a
        byte of its request is received (re-read when the file changes)."""
        self.workspace = Path(workspace).resolve()
        self.jobs_dir = self.workspace / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._last_poll: dict[str, float] = {}
        self._polling: collections.Counter[str] = collections.Counter()
        self._stopping = False
        self._load_store()
        # Threads start on demand and exit when idle; the most there can be: every site of a
        # large project at its per-peer limit of calls, plus room for admins.
        per_peer = _CALLS_PER_PEER
        self._listener = GrpcListener(
            self.handle,
            address or f"0.0.0.0:{self.kit.server_port}",
            max_workers=_PLANNED_SITES * per_peer + _PLANNED_ADMINS * per_peer,
            credentials=server_credentials(self.kit),
            admit=self._admit,
            max_calls_per_peer=per_peer,
            stream_ops=("submit",),  # results are folded as they arrive (transport._inflow)
        )
        self.live: LiveView | None = None
        """The live web view (``web="HOST:PORT"``), serving once the server is constructed."""
        if web is not None:
            self.live = LiveView(self, web)
            try:
                self.live.start()
            except BaseException:
                self._listener.stop(0)
                raise
        self._runner = threading.Thread(target=self._run_jobs, name="fedlift-jobs", daemon=True)
        self._runner.start()
        log.info("server %s listening on %s", self.kit.name, self._listener.address)

    @property
    def address(self) -> str:
        return self._listener.address

    def __enter__(self) -> DeployServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving; a running job stays ``running`` in the store (it resumes later)."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
        if self.live is not None:
            self.live.stop()
        self._listener.stop(grace)
        with self._cond:
            running = [job for job in self._jobs.values() if job.state == "running"]
        for job in running:
            if job.runtime is not None:
                job.runtime.stop("the server is shutting down", failed=True)
        self._runner.join(timeout=60)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout`` passes (False)."""
        self._runner.join(timeout)
        return not self._runner.is_alive()

    # ------------------------------------------------------------------ the live view
    def snapshot(self, max_jobs: int = _SNAPSHOT_JOBS) -> dict[str, Any]:
        """What the live view shows, as JSON values (a copy; the server's lock is held only
        to copy it): the last ``max_jobs`` jobs' summaries, each running job's progress by
        site (:meth:`ServerRuntime.progress`), and every site heard from with the seconds
        since (a poll for jobs, or a call of a running job's protocol). Holds no secret:
        no key, token or path outside the store."""
        now = time.monotonic()
        with self._cond:
            jobs = sorted(
                self._jobs.values(), key=lambda j: float(j.meta.get("submitted_at") or 0)
            )[-max_jobs:]
            summaries = [job.summary() for job in jobs]
            runtimes = {
                job.job_id: job.runtime
                for job in jobs
                if job.runtime is not None and job.state == "running"
            }
            polls = {site: (now - seen, site in self._polling)
                     for site, seen in self._last_poll.items()}  # fmt: skip
        progress = {job_id: runtime.progress() for job_id, runtime in runtimes.items()}
        sites: dict[str, dict[str, Any]] = {}
        for site, (ago, polling) in polls.items():
            sites[site] = {"seen_s_ago": ago, "polling": polling, "job": None}
        for job_id, by_site in progress.items():
            for site, state in by_site.items():
                entry = sites.setdefault(site, {"seen_s_ago": None, "polling": False, "job": None})
                ago = state["seen_s_ago"]
                if ago is not None and (entry["seen_s_ago"] is None or ago < entry["seen_s_ago"]):
                    entry["seen_s_ago"] = ago
                entry.update(job=job_id, state=state["state"], task=state["task"],
                             round=state["round"], gone=state["gone"])  # fmt: skip
        return {
            "server": self.kit.name,
            "project": self.kit.project,
            "jobs": summaries,
            "progress": progress,
            "sites": dict(sorted(sites.items())),
        }

    def metrics_file(self, job_id: str) -> Path | None:
        """The ``metrics.jsonl`` of job ``job_id`` if the store holds that job (the id is
        looked up, never joined into a path as given)."""
        with self._cond:
            job = self._jobs.get(job_id)
            return None if job is None else job.folder / "server" / "metrics.jsonl"

    # ------------------------------------------------------------------ the store
    def _load_store(self) -> None:
        resumed: list[_Job] = []
        queued: list[_Job] = []
        for meta_path in sorted(self.jobs_dir.glob("*/meta.json")):
            remove_temp_files(meta_path.parent)  # a meta.json write cut short by a crash
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                if not isinstance(meta, dict) or meta.get("state") not in JOB_STATES:
                    raise ValueError("no valid state")
            except (ValueError, UnicodeDecodeError) as exc:
                log.warning("skipping %s: it cannot be read (%s)", meta_path, exc)
                continue
            job = _Job(meta_path.parent.name, meta_path.parent, meta)
            self._jobs[job.job_id] = job
            if job.state == "running":
                job.resume = True
                resumed.append(job)
            elif job.state == "submitted":
                queued.append(job)
        resumed.sort(key=lambda j: float(j.meta.get("started_at") or 0))
        queued.sort(key=lambda j: float(j.meta.get("submitted_at") or 0))
        self._queue.extend(j.job_id for j in resumed + queued)
        if resumed:
            log.info("resuming %s", ", ".join(j.job_id for j in resumed))

    def _save_meta(self, job: _Job, **changes: Any) -> None:
        """Persist, then apply, changes to a job's meta (callers hold ``self._cond``).

        Raises :class:`~fedlift.errors.StorageError` when ``meta.json`` cannot be written;
        the job's meta then stays as it was, in memory as on disk.
        """
        meta = {**job.meta, **changes}
        atomic_write_text(job.folder / "meta.json", json.dumps(meta, indent=2) + "\n")
        job.meta = meta

    def _save_end(self, job: _Job, cause: str, **changes: Any) -> bool:
        """Record how a job ended; when that cannot be written, say so (callers hold
        ``self._cond``). Returns whether the new state is on disk."""
        try:
            self._save_meta(job, **changes)
        except StorageError as exc:
            job.notice = (
                f"the job stopped ({cause}) but its new state {changes.get('state')!r} could "
                f"not be saved, so meta.json still says {job.state!r}: {exc}"
            )
            log.error("job %s: %s", job.job_id, job.notice)
            return False
        job.notice = None
        return True

    def _job(self, fields: dict[str, Any]) -> _Job:
        job_id = _str(fields, "job_id")
        job = self._jobs.get(job_id)
        if job is None:
            raise ConfigError(f"there is no job {job_id!r} on this server (see job_list).")
        return job

    # ------------------------------------------------------------------ the handler
    def handle(self, request: Message) -> Message:
        """The transport handler: authorise by certificate, then run the operation."""
        op, role = request.op, request.peer_role
        if role is None or request.peer is None:
            raise PermissionDeniedError(
                "this server only serves callers with a certificate of the project (mutual TLS)."
            )
        if op in ADMIN_OPS:
            if role != "admin":
                raise PermissionDeniedError(
                    f"{role} {request.peer!r} may not call {op!r}: it needs an admin kit."
                )
            return self._admin(request)
        if op in _SITE_OPS:
            if role != "site":
                raise PermissionDeniedError(
                    f"{role} {request.peer!r} may not call {op!r}: it needs a site kit."
                )
            return self._site(request)
        raise ProtocolError(
            f"unknown operation {op!r}; expected one of {', '.join(sorted(ADMIN_OPS | _SITE_OPS))}."
        )

    def _admit(self, peer: Identity | None, op: str, claimed_bytes: int) -> None:
        """Decide on a request from its op and announced size, before it is received: the
        caller's role must allow the op, and only a site's ``submit`` and an admin's
        ``job_submit`` may be larger than 1 MiB."""
        if peer is None or peer.role is None:
            raise PermissionDeniedError(
                "this server only serves callers with a certificate of the project (mutual TLS)."
            )
        if peer.serial is not None:
            self.revocations.check_serial(peer.serial, peer.name, peer.role)
        allowed = ADMIN_OPS if peer.role == "admin" else _SITE_OPS if peer.role == "site" else None
        if allowed is None or op not in allowed:
            known = op in ADMIN_OPS or op in _SITE_OPS
            if not known:
                raise ProtocolError(
                    f"unknown operation {op!r:.80}; expected one of "
                    f"{', '.join(sorted(ADMIN_OPS | _SITE_OPS))}."
                )
            raise PermissionDeniedError(
                f"{peer.role} {peer.name!r} may not call {op!r}: it needs "
                f"{'an admin' if op in ADMIN_OPS else 'a site'} kit."
            )
        if claimed_bytes > _MAX_SMALL_REQUEST and (peer.role, op) not in _LARGE_OPS:
            raise ResourceLimitError(
                f"{peer.role} {peer.name!r} announced a {claimed_bytes:,}-byte {op!r} request; "
                f"only a site's submit and an admin's job_submit may exceed "
                f"{_MAX_SMALL_REQUEST:,} bytes. Received: claimed_bytes={claimed_bytes}."
            )

    # ------------------------------------------------------------------ admin operations
    def _admin(self, request: Message) -> Message:
        op, fields = request.op, request.fields
        if op == "job_submit":
            return self._submit(request)
        if op == "job_list":
            with self._cond:
                jobs = sorted(
                    self._jobs.values(), key=lambda j: float(j.meta.get("submitted_at") or 0)
                )
                return Message("jobs", {"jobs": [job.summary() for job in jobs]})
        with self._cond:
            job = self._job(fields)
            summary = job.summary()
        if op == "job_status":
            return Message("job", summary)
        if op == "job_logs":
            site = fields.get("site")
            if site is None:
                return Message("logs", {"text": _tail(job.folder / "server" / "log.txt")})
            site = _str(fields, "site")
            if site not in job.sites:
                raise ConfigError(
                    f"site {site!r} is not part of job {job.job_id} (sites: {job.sites})."
                )
            return Message("logs", {"text": _tail(job.folder / "sites" / site / "log.txt")})
        if op == "job_abort":
            return Message("job", self._abort(job, request.peer or "?"))
        data = _zip_results(job.folder / "server")  # job_download
        return Message("results", {"job_id": job.job_id}, [np.frombuffer(data, np.uint8)])

    def _submit(self, request: Message) -> Message:
        if len(request.arrays) != 1 or request.arrays[0].dtype != np.uint8:
            raise ProtocolError("job_submit needs one uint8 array: the zipped job folder.")
        from ..client.worker import unpack_app  # the same checks as for a job's app

        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        folder = self.jobs_dir / job_id
        try:
            unpack_app(request.arrays[0], folder / "job")
            config, _ = load_job(folder / "job", label="<job>", allow_app_code=self.allow_app_code)
            self._check_config(config)
        except OSError as exc:  # StorageError too: a full or read-only disk
            shutil.rmtree(folder, ignore_errors=True)
            log.error("job_submit by %s: storing the job failed: %s", request.peer, exc)
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            raise StorageError(
                f"the server could not store the job ({reason}); nothing was stored. Retry "
                "later or ask the server's operator to check its workspace."
            ) from None
        except FedliftError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("job_submit by %s refused: %s", request.peer, exc)
            raise ConfigError(f"the job was refused: {self._client_text(exc)}") from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = _Job(job_id, folder, {})
        with self._cond:
            try:
                self._save_meta(
                    job,
                    job_id=job_id,
                    name=config.name,
                    state="submitted",
                    submitted_by=request.peer,
                    submitted_at=time.time(),
                    started_at=None,
                    finished_at=None,
                    round_done=None,
                    num_rounds=config.workflow.num_rounds,
                    n_clients=config.n_clients,
                    sites=[],
                    error=None,
                )
            except StorageError:
                shutil.rmtree(folder, ignore_errors=True)  # no job without its meta
                raise
            self._jobs[job_id] = job
            self._queue.append(job_id)
            self._cond.notify_all()
        log.info("job %s (%s) submitted by %s", job_id, config.name, request.peer)
        return Message("job", {"job_id": job_id})

    def _client_text(self, exc: BaseException) -> str:
        """An error's text as a client may see it: paths on this server's disk become
        ``<workspace>`` (job-relative names stay), so a refusal tells nothing of the disk."""
        text = str(exc)
        forms = {
            form: shown
            for path, shown in ((self.workspace, "<workspace>"), (self.kit.folder, "<server kit>"))
            for form in (str(path), str(Path(path).resolve()))
        }
        for form in sorted(forms, key=len, reverse=True):  # the longest (innermost) first
            text = text.replace(form, forms[form])
        return text

    @staticmethod
    def _check_config(config: JobConfig) -> None:
        if config.n_clients < 1:
            raise ConfigError(f"n_clients must be at least 1; job.json says {config.n_clients}.")
        if not 1 <= config.workflow.min_clients <= config.n_clients:
            raise ConfigError(
                f"min_clients must be 1 to n_clients ({config.n_clients}); job.json says "
                f"{config.workflow.min_clients}."
            )
        if config.workflow.num_rounds < 1:
            raise ConfigError(f"num_rounds must be at least 1; got {config.workflow.num_rounds}.")

    def _abort(self, job: _Job, who: str) -> dict[str, Any]:
        runtime = None
        with self._cond:
            if job.state == "submitted":
                if job.job_id in self._queue:
                    self._queue.remove(job.job_id)
                job.abort_requested = True  # the runner may be waiting for its sites
                self._cond.notify_all()
                self._save_meta(
                    job, state="aborted", finished_at=time.time(), error=f"aborted by {who}"
                )
            elif job.state == "running":
                job.abort_requested = True
                job.abort_reason = f"aborted by {who}"  # saved with the state, once it ends
                runtime = job.runtime
                self._cond.notify_all()
            else:
                raise ConfigError(f"job {job.job_id} is already {job.state}; nothing to abort.")
        if runtime is not None:
            runtime.stop(f"aborted by {who}", failed=True)
        log.info("job %s: abort requested by %s", job.job_id, who)
        with self._cond:
            return job.summary()

    # ------------------------------------------------------------------ site operations
    def _site(self, request: Message) -> Message:
        site = request.peer or ""
        fields = request.fields
        if request.op == "next_job":
            return self._next_job(site, fields)
        if request.op != "site_log":
            claimed = _str(fields, "site")
            if claimed != site:
                raise PermissionDeniedError(f"{site} cannot act as {claimed}.")
        with self._cond:
            job = self._job(fields)
            if site not in job.sites:
                raise PermissionDeniedError(f"{site} is not a site of job {job.job_id}.")
            runtime, state = job.runtime, job.state
        if request.op == "site_log":
            self._site_log(job, site, fields)
            return Message("ok")
        if runtime is None:
            if state != "running":
                if request.op == "get_task":
                    return Message("stop", {"reason": f"job {job.job_id} is {state}"})
                raise ConfigError(f"job {job.job_id} is {state}; {request.op!r} came too late.")
            if request.op == "get_task":
                return Message("wait")  # resuming: the job's runtime is being set up
            if request.op == "submit":
                return Message("ok")  # its task belonged to the server's previous life
            raise ConfigError(f"job {job.job_id} is starting; retry {request.op!r} shortly.")
        reply = runtime.handle(request)
        if reply.op == "stop":
            with self._cond:
                job.finished_sites.add(site)
        return reply

    def _next_job(self, site: str, fields: dict[str, Any]) -> Message:
        wait = fields.get("wait", 0.0)
        if not isinstance(wait, int | float) or isinstance(wait, bool) or wait < 0:
            raise ProtocolError(f"next_job wait must be a non-negative number; got {wait!r:.40}")
        deadline = time.monotonic() + min(float(wait), _MAX_POLL_SECONDS)
        with self._cond:
            self._polling[site] += 1
            self._last_poll[site] = time.monotonic()
            self._cond.notify_all()  # the runner may be waiting for this site
            try:
                while not self._stopping:
                    for job in self._jobs.values():
                        if (
                            job.state == "running"
                            and job.runtime is not None
                            and site in job.sites
                            and site not in job.finished_sites
                            and not job.abort_requested
                        ):
                            return Message("job", {"job_id": job.job_id, "name": job.meta["name"]})
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                return Message("none")
            finally:
                self._polling[site] -= 1
                if self._polling[site] <= 0:
                    del self._polling[site]
                self._last_poll[site] = time.monotonic()

    def _site_log(self, job: _Job, site: str, fields: dict[str, Any]) -> None:
        text = fields.get("text")
        if not isinstance(text, str):
            raise ProtocolError("site_log needs a string field 'text'.")
        data = text.encode("utf-8")[:_MAX_LOG_CHUNK]
        path = job.folder / "sites" / site / "log.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._cond:
            size = path.stat().st_size if path.exists() else 0
            if size >= _MAX_SITE_LOG_BYTES:
                return
            if size + len(data) > _MAX_SITE_LOG_BYTES:
                data = data[: _MAX_SITE_LOG_BYTES - size] + b"\n[log truncated: size limit]\n"
            with open(path, "ab") as handle:
                handle.write(data)

    def _active_sites(self) -> list[str]:
        """Sites polling now or recently (callers hold ``self._cond``)."""
        now = time.monotonic()
        return sorted(
            site
            for site, seen in self._last_poll.items()
            if site in self._polling or now - seen <= _POLLER_FRESH_SECONDS
        )

    # ------------------------------------------------------------------ running jobs
    def _run_jobs(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._jobs[self._queue.popleft()]
            try:
                self._run(job)
            except Exception:  # the runner must survive any one job
                log.exception("job %s: unexpected error in the job runner", job.job_id)

    def _assign_sites(self, job: _Job, needed: int) -> list[str] | None:
        """Wait until ``needed`` distinct sites poll; None if aborted or stopping."""
        logged = False
        with self._cond:
            while not self._stopping and not job.abort_requested:
                active = self._active_sites()
                if len(active) >= needed:
                    return active[:needed]
                if not logged:
                    log.info(
                        "job %s waits for %d sites (polling now: %s)",
                        job.job_id,
                        needed,
                        ", ".join(active) or "none",
                    )
                    logged = True
                self._cond.wait(5.0)  # also re-checks sites whose polls went stale
        return None

    def _run(self, job: _Job) -> None:
        server_dir = job.folder / "server"
        try:
            config, root = load_job(
                job.folder / "job", label="<job>", allow_app_code=self.allow_app_code
            )
        except FedliftError as exc:
            with self._cond:
                self._save_end(job, str(exc), state="failed", finished_at=time.time(),
                               error=str(exc))  # fmt: skip
            return
        if job.resume and job.sites:
            sites = job.sites
        else:
            assigned = self._assign_sites(job, config.n_clients)
            if assigned is None:
                with self._cond:
                    if job.abort_requested:
                        self._save_end(job, "aborted", state="aborted", finished_at=time.time())
                return
            sites = assigned
        handler: logging.Handler | None = None
        recorder: RunRecorder | None = None
        tracking: Tracking | None = None
        info: RunInfo | None = None
        finished = False
        try:
            handler = _file_logging(server_dir / "log.txt")
            # The sites' logs, per site, under the job's folder (this server must have what
            # the job's tracking writes with: the job fails here, saying what to install).
            tracking = Tracking(
                server_dir,
                tracking=config.tracking,
                experiment=config.name,
                job_id=job.job_id,
                resume=job.resume,
            )
            # The runtime first: sites that reconnect after a restart are served at once
            # ("wait") while the model and checkpoint load.
            runtime = ServerRuntime(
                job.job_id,
                sites,
                config.client_config(),
                zip_dir(root / config.app),
                on_log=tracking.record,
            )
            with self._cond:
                if job.abort_requested or self._stopping:
                    raise JobAbortedError("the job was stopped before it started")
                job.runtime = runtime
                started = job.meta.get("started_at") if job.resume else None
                self._save_meta(
                    job, state="running", sites=sites, started_at=started or time.time()
                )
                self._cond.notify_all()  # polling sites learn about the job
            model_format, initial = load_initial_model(root / config.initial_model)
            recorder = RunRecorder(
                server_dir,
                model_format,
                config.workflow.key_metric,
                config.workflow.higher_is_better,
                checkpoints=True,
                resume=job.resume,
            )
            strategy = config.workflow.strategy(
                root / config.app, where="<job>/job.json", allow_app_code=self.allow_app_code
            )
            info = RunInfo(
                server_dir,
                job=config.name,
                job_id=job.job_id,
                runner="deploy",
                strategy=strategy,
                num_rounds=config.workflow.num_rounds,
                sites=sites,
                config=read_job_json(root),
                started_at=job.meta.get("started_at"),
            )
            info.start()
            settings = config.workflow.settings(on_round=lambda record: self._on_round(job, record))
            start_round = 0
            resumed = recorder.load_checkpoint()
            if resumed is not None and recorder.checkpoint is not None:
                initial, start_round = resumed, recorder.checkpoint.round_done + 1
                strategy.load_state(recorder.checkpoint.strategy_state)
            log.info(
                "job %s %s on %s (round %d of %d)",
                job.job_id,
                "resumes" if job.resume else "starts",
                ", ".join(sites),
                start_round + 1,
                config.workflow.num_rounds,
            )
            handoff = [initial]
            del initial  # freed once round 1 replaced it (see Strategy.run)
            result = strategy.run(
                runtime, handoff.pop(), recorder, settings, start_round=start_round
            )
            if config.workflow.cross_site_eval:
                cross_site_evaluate(runtime, result.params, settings).save(server_dir)
            recorder.flush()
            # The report before the state: an admin told "finished" downloads it.
            self._end_run(job, info, None, root, "finished")
            with self._cond:  # first on disk: a restart after this never waits for the sites
                self._save_meta(job, state="finished", finished_at=time.time(), error=None)
            runtime.stop("the job finished")
            finished = True
            log.info("job %s finished", job.job_id)
        except Exception as exc:
            if job.runtime is not None:
                job.runtime.stop(f"the job failed: {exc}", failed=True)
            if info is not None:
                with self._cond:
                    state = self._end_state(job)
                if state is not None:  # else it resumes at the next start
                    self._end_run(job, info, exc, root, state)
            self._ended_badly(job, exc)
        finally:
            if recorder is not None:
                try:
                    recorder.close()
                except Exception as exc:  # a model write that failed in the background
                    log.error("job %s: writing its results failed: %s", job.job_id, exc)
            if tracking is not None:
                tracking.close(failed=not finished)
            if handler is not None:
                logging.getLogger("fedlift").removeHandler(handler)
                handler.close()
            with self._cond:
                self._cond.notify_all()

    def _end_state(self, job: _Job) -> str | None:
        """The state a job that raised ends in (:meth:`_ended_badly` saves it): None when
        the server's shutdown interrupted it (it resumes). Callers hold ``self._cond``."""
        if self._stopping and not job.abort_requested:
            return None
        return "aborted" if job.abort_requested else "failed"

    def _end_run(
        self, job: _Job, info: RunInfo, error: Exception | None, root: Path, state: str
    ) -> None:
        """``run.json`` and ``report.html`` say how the job ended, written before
        ``meta.json`` says so (an admin told the job ended finds them). A write that fails
        is logged; it changes nothing of the job's state."""
        try:
            info.end(error, state=state)
        except FedliftError as exc:
            log.error("job %s: %s could not be written: %s", job.job_id, info.path, exc)
        from ..report import write_report  # matplotlib: loaded when a job ends

        try:
            write_report(info.path.parent, job_dir=root)
        except Exception as exc:  # the report never turns a finished job into a failed one
            log.error("job %s: its report could not be written: %r", job.job_id, exc)

    def _ended_badly(self, job: _Job, exc: Exception) -> None:
        """Save the end of a job that raised ``exc`` (its runtime is stopped already)."""
        with self._cond:
            if self._end_state(job) is None:
                log.info(
                    "job %s interrupted by the server's shutdown; it resumes later", job.job_id
                )
                if job.state != "running":  # it had not started: queue it again next time
                    self._save_end(job, "the server's shutdown", state="submitted")
                return
            if job.abort_requested:
                reason = job.abort_reason or job.meta.get("error") or "aborted"
                if self._save_end(
                    job, reason, state="aborted", finished_at=time.time(), error=reason
                ):
                    log.info("job %s aborted", job.job_id)
                return
            text = str(exc) if isinstance(exc, FedliftError) else f"{type(exc).__name__}: {exc}"
            self._save_end(job, text, state="failed", finished_at=time.time(), error=text)
        if isinstance(exc, FedliftError):
            log.error("job %s failed: %s", job.job_id, exc)
        else:
            log.exception("job %s failed", job.job_id, exc_info=exc)

    def _on_round(self, job: _Job, record: RoundRecord) -> None:
        if record.task != "train":
            return
        with self._cond:
            self._save_meta(job, round_done=record.round)
