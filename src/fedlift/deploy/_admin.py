"""The admin's side: submit jobs to a long-running server and follow them.

``fedlift job submit|list|status|logs|abort|download --kit ADMIN_KIT``; every call is made
with the admin's certificate, and the server checks the role in it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..client.worker import unpack_app
from ..codec import Message
from ..errors import ConfigError
from ..job import load_job, zip_dir
from ..transport import DEFAULT_IDLE_TIMEOUT, GrpcTransport
from ._tls import Kit, channel_credentials, load_kit

__all__ = ["AdminClient", "KIT_ENV"]

KIT_ENV = "FEDLIFT_KIT"


class AdminClient:
    """An admin's connection to the server named in its kit."""

    def __init__(self, kit: Kit | str | os.PathLike[str] | None = None) -> None:
        if kit is None:
            kit = os.environ.get(KIT_ENV)
            if not kit:
                raise ConfigError(
                    f"no admin kit given: pass --kit ADMIN_KIT_FOLDER or set ${KIT_ENV}."
                )
        self.kit = kit if isinstance(kit, Kit) else load_kit(kit)
        if self.kit.role != "admin":
            raise ConfigError(
                f"{self.kit.folder} is a {self.kit.role} kit; job commands need an admin's "
                "kit (made by `fedlift provision --admin NAME`)."
            )
        self._transport = GrpcTransport(self.kit.server, credentials=channel_credentials(self.kit))

    def _call(self, op: str, fields: dict[str, Any], arrays: list[np.ndarray] | None = None,
              timeout: float = 120.0) -> Message:  # fmt: skip
        return self._transport.call(Message(op, fields, arrays or []), timeout)

    def submit(self, job_folder: str | os.PathLike[str]) -> str:
        """Upload an exported job folder; returns its job id."""
        load_job(Path(job_folder))  # the same checks the server makes, before any upload
        archive = np.frombuffer(zip_dir(Path(job_folder)), np.uint8)
        return str(self._call("job_submit", {}, [archive], timeout=600).fields["job_id"])

    def list(self) -> list[dict[str, Any]]:
        jobs = self._call("job_list", {}).fields.get("jobs", [])
        return [j for j in jobs if isinstance(j, dict)]

    def status(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("job_status", {"job_id": job_id}).fields)

    def logs(self, job_id: str, site: str | None = None) -> str:
        fields: dict[str, Any] = {"job_id": job_id}
        if site:
            fields["site"] = site
        return str(self._call("job_logs", fields).fields.get("text", ""))

    def abort(self, job_id: str) -> None:
        self._call("job_abort", {"job_id": job_id})

    def download(self, job_id: str, out: str | os.PathLike[str]) -> Path:
        """Fetch the job's results (models, metrics, logs) into ``out/JOB_ID``."""
        reply = self._call("job_download", {"job_id": job_id}, timeout=DEFAULT_IDLE_TIMEOUT)
        if not reply.arrays:
            raise ConfigError(f"the server sent no results for job {job_id}.")
        return unpack_app(reply.arrays[0], Path(out) / job_id)

    def close(self) -> None:
        self._transport.close()


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    """The table `fedlift job list` prints."""
    if not jobs:
        return "no jobs"
    rows = [("JOB ID", "NAME", "STATE", "ROUND", "SITES")]
    for j in jobs:
        done, total = j.get("round_done"), j.get("num_rounds")
        progress = f"{(done + 1) if isinstance(done, int) else 0}/{total}"
        sites = j.get("sites") or []
        rows.append((str(j.get("job_id")), str(j.get("name")), str(j.get("state")), progress,
                     ",".join(map(str, sites))))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def format_status(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, sort_keys=True)
