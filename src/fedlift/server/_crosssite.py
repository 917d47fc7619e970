"""Cross-site evaluation: every site's final local model and the global model, evaluated on
every site's data.

Two short loops on the job's controller, after training: task ``submit_model`` asks each
site for its final local model (the last model its script sent for training), then task
``validate`` sends each model (``meta["model_owner"]``: ``"server"`` for the global model,
else the site it came from) to every site, whose script evaluates it as it evaluates any
``validate`` task. The result is a matrix of metrics, model x site, printed as a table and
saved as ``cross_site_val.json`` and ``cross_site_val.csv`` in the job's server folder.

Memory: the local models are held until they have been evaluated (one model per site,
plus the global one).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._atomic import atomic_write_text
from ..model import FLModel, ParamTree
from ._strategy import Controller, RunSettings, task_model

__all__ = ["CrossSiteResult", "MODEL_OWNER", "SERVER_MODEL", "cross_site_evaluate"]

log = logging.getLogger("fedlift.server")

MODEL_OWNER = "model_owner"
"""The meta key of a ``validate`` task that names whose model it carries."""
SERVER_MODEL = "server"
"""``meta["model_owner"]`` of the global model."""


@dataclass
class CrossSiteResult:
    """``matrix[model_owner][site]``: the metrics ``site`` reported for that model."""

    matrix: dict[str, dict[str, dict[str, float]]]
    seconds: float

    def metric_names(self) -> list[str]:
        return sorted({k for row in self.matrix.values() for m in row.values() for k in m})

    def table(self, metric: str | None = None) -> str:
        """The matrix of one metric (default: the first) as fixed-width text."""
        names = self.metric_names()
        key = metric or (names[0] if names else "")
        sites = sorted({s for row in self.matrix.values() for s in row})
        width = max([len(s) for s in sites] + [len(o) for o in self.matrix] + [8])
        lines = [f"cross-site evaluation: {key or 'no metrics'} (rows: model, columns: data)"]
        lines.append(" " * width + " " + " ".join(f"{s:>{width}}" for s in sites))
        for owner, row in self.matrix.items():
            cells = [
                f"{row[s][key]:>{width}.4f}" if s in row and key in row[s] else f"{'-':>{width}}"
                for s in sites
            ]
            lines.append(f"{owner:<{width}} " + " ".join(cells))
        return "\n".join(lines)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["model_owner", "site", *self.metric_names()])
        for owner, row in self.matrix.items():
            for site, metrics in row.items():
                writer.writerow([owner, site, *(metrics.get(k, "") for k in self.metric_names())])
        return out.getvalue()

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write ``cross_site_val.json`` and ``.csv`` (atomically) into ``directory``."""
        as_json = directory / "cross_site_val.json"
        as_csv = directory / "cross_site_val.csv"
        atomic_write_text(as_json, json.dumps(self.matrix, indent=2, sort_keys=True) + "\n")
        atomic_write_text(as_csv, self.to_csv())
        return as_json, as_csv


def _numeric(metrics: dict[str, object] | None) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def cross_site_evaluate(
    controller: Controller,
    global_params: ParamTree,
    settings: RunSettings,
    sites: Sequence[str] | None = None,
) -> CrossSiteResult:
    """Collect every site's local model, then have every site evaluate each one and the
    global model (see the module docstring)."""
    started = time.monotonic()
    targets = list(sites if sites is not None else controller.registered_sites())
    needed = min(settings.min_clients, len(targets))
    local: dict[str, ParamTree] = {}

    def keep(site: str, result: FLModel) -> None:
        if result.params is not None:
            local[site] = result.params

    controller.run_task(
        "submit_model",
        task_model(None, settings.num_rounds, settings, 0),
        targets,
        on_result=keep,
        timeout=settings.round_timeout,
        min_responses=needed,
        on_client_error=settings.on_client_error,
    )
    models: list[tuple[str, ParamTree]] = [(SERVER_MODEL, global_params)]
    models += [(site, local[site]) for site in targets if site in local]
    matrix: dict[str, dict[str, dict[str, float]]] = {}
    for owner, params in models:
        row: dict[str, dict[str, float]] = {}

        def record(site: str, result: FLModel, row: dict[str, dict[str, float]] = row) -> None:
            row[site] = _numeric(result.metrics)

        controller.run_task(
            "validate",
            task_model(params, settings.num_rounds, settings, 0, None, model_owner=owner),
            targets,
            on_result=record,
            timeout=settings.round_timeout,
            min_responses=needed,
            on_client_error=settings.on_client_error,
        )
        matrix[owner] = {site: row[site] for site in targets if site in row}
        local.pop(owner, None)  # evaluated: its memory can go
    return CrossSiteResult(matrix, time.monotonic() - started)
