"""``run.json``: what a run was (job, strategy, config, seed, versions, machine) and how it
ended (state, and the cause when it failed), for its report and for whoever audits it.

Written atomically when the run starts (state ``running``) and again when it ends, so the
file always says what the runner last knew. Format ``fedlift.run/1``::

    {"format", "job", "job_id", "runner", "strategy", "num_rounds", "sites", "config",
     "seed", "versions": {...}, "machine": {...}, "started_at", "ended_at",
     "state": "running" | "finished" | "failed" | "aborted",
     "failure": null | {"site", "exception", "message", "traceback_tail"}}
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import time
import traceback
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_text
from ..errors import ClientFailedError, FedliftError, JobAbortedError
from ._registry import strategy_to_spec
from ._strategy import Strategy

__all__ = ["RUN_FILE", "RUN_FORMAT", "RunInfo", "failure_of", "read_job_json"]

RUN_FILE = "run.json"
RUN_FORMAT = "fedlift.run/1"
_FRAMEWORKS = ("numpy", "grpcio", "tensorflow", "keras", "torch", "lightning", "scikit-learn")
_TAIL_LINES = 40


def _versions() -> dict[str, str]:
    out = {"fedlift": _version("fedlift"), "python": platform.python_version()}
    for name in _FRAMEWORKS:
        version = _version(name)
        if version:
            out[name] = version
    return {k: v for k, v in out.items() if v}


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def _machine() -> dict[str, Any]:
    memory = 0
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count() or 0,
        "memory_bytes": int(memory),
    }


def _seed(strategy: Strategy) -> int | None:
    if not dataclasses.is_dataclass(strategy):
        return None
    for f in dataclasses.fields(strategy):
        if f.name == "seed":
            value = getattr(strategy, f.name)
            return value if isinstance(value, int) and not isinstance(value, bool) else None
    return None


def _spec(strategy: Strategy) -> dict[str, Any]:
    try:
        return strategy_to_spec(strategy)
    except FedliftError:  # a strategy of the user's own with options JSON cannot hold
        return {"type": type(strategy).__name__}


def failure_of(exc: BaseException) -> dict[str, Any]:
    """Why a run failed, as ``run.json`` keeps it: the site (when a site's failure ended
    it), the exception's class, its first line, and the last lines of the traceback (a
    site's own, which the message carries, or this process's)."""
    message = str(exc)
    site = exc.site if isinstance(exc, ClientFailedError) else None
    if isinstance(exc, FedliftError) and "\n" in message:
        tail_source = message  # the site's traceback, as its message carries it
    else:
        tail_source = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    lines = tail_source.rstrip("\n").splitlines()
    return {
        "site": site,
        "exception": type(exc).__name__,
        "message": (message.splitlines() or [""])[0][:1000],
        "traceback_tail": "\n".join(lines[-_TAIL_LINES:])[-20_000:],
    }


class RunInfo:
    """A run's ``run.json`` in ``directory``: :meth:`start` writes it, :meth:`end` completes
    it. ``config`` is the job's ``job.json`` (or, for ``run_local``, its settings)."""

    def __init__(
        self,
        directory: Path,
        *,
        job: str,
        job_id: str,
        runner: str,
        strategy: Strategy,
        num_rounds: int,
        sites: Sequence[str],
        config: Mapping[str, Any] | None = None,
        started_at: float | None = None,
    ) -> None:
        self.path = directory / RUN_FILE
        self.data: dict[str, Any] = {
            "format": RUN_FORMAT,
            "job": job,
            "job_id": job_id,
            "runner": runner,
            "strategy": _spec(strategy),
            "num_rounds": num_rounds,
            "sites": list(sites),
            "config": dict(config or {}),
            "seed": _seed(strategy),
            "versions": _versions(),
            "machine": _machine(),
            "started_at": started_at if started_at is not None else time.time(),
            "ended_at": None,
            "state": "running",
            "failure": None,
        }

    def start(self) -> None:
        self._write()

    def end(self, error: BaseException | None = None, *, state: str | None = None) -> None:
        """The run is over: ``finished``, or ``failed`` (``aborted`` for a stopped job) with
        the cause of ``error``."""
        if state is None:
            state = (
                "finished"
                if error is None
                else "aborted"
                if isinstance(error, JobAbortedError | KeyboardInterrupt)
                else "failed"
            )
        self.data.update(
            ended_at=time.time(),
            state=state,
            failure=None if error is None else failure_of(error),
        )
        self._write()

    def _write(self) -> None:
        text = json.dumps(self.data, indent=2, default=str) + "\n"
        atomic_write_text(self.path, text)


def read_job_json(job_dir: Path) -> dict[str, Any]:
    """A job folder's ``job.json`` as JSON (``{}`` when it cannot be read)."""
    try:
        data = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
