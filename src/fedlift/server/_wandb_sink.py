"""The sites' log records into offline Weights & Biases runs in the job's server folder.

Offline, always: the server writes ``DIR/wandb/offline-run-*`` and contacts no one (no key,
no network); ``wandb sync DIR/wandb/offline-run-*`` uploads the runs later, from wherever
the key is. One run per site, named after the site, in a project named after the job and
a group named by the job id. Numbers go to the run's history (``step`` as given; W&B keeps
steps increasing and ignores a record whose step is below the run's last one), params and
tags to its config (tags as ``tag/NAME``; ``site`` and ``job_id`` stay the server's). Text
records are not written to W&B, and a job resumed by a restarted server starts new runs.
W&B's console capture is off: the server's output stays its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ._tracking import Batch, group_by_site

__all__ = ["WandBSink"]


def _project(name: str) -> str:
    """A W&B project name: at most 128 characters, none of ``/ \\ # ? % :``."""
    return re.sub(r"[/\\#?%:]", "_", name)[:128] or "fedlift"


class WandBSink:
    """Writes batches of the sites' records to offline W&B runs (see module doc)."""

    name = "W&B"

    def __init__(self, directory: Path, experiment: str, job_id: str) -> None:
        import wandb

        self._wandb: Any = wandb
        self._dir = directory.resolve()  # W&B writes DIR/wandb/offline-run-*
        (self._dir / "wandb").mkdir(parents=True, exist_ok=True)
        self._project, self._job_id = _project(experiment), job_id
        self._runs: dict[str, Any] = {}

    def _run(self, site: str) -> Any:
        run = self._runs.get(site)
        if run is None:
            settings = self._wandb.Settings(
                console="off", silent=True, save_code=False, disable_git=True
            )
            run = self._wandb.init(
                project=self._project,
                name=site,
                group=self._job_id or None,
                dir=str(self._dir),
                mode="offline",
                reinit="create_new",
                config={"site": site, "job_id": self._job_id},
                settings=settings,
            )
            self._runs[site] = run
        return run

    def write(self, batch: Batch) -> None:
        for site, items in group_by_site(batch).items():
            run = self._run(site)
            for _, record in items:
                numbers = record.numbers()
                if numbers:
                    run.log(dict(numbers), step=record.step)
                strings = record.strings()
                if record.data_type in ("TAG", "TAGS"):
                    strings = {f"tag/{key}": value for key, value in strings.items()}
                strings = {k: v for k, v in strings.items() if k not in ("site", "job_id")}
                if strings:
                    run.config.update(strings, allow_val_change=True)

    def close(self, failed: bool) -> None:
        for run in self._runs.values():
            run.finish(exit_code=1 if failed else 0)
