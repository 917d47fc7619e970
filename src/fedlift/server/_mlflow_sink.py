"""The sites' log records into a real MLflow store in the job's server folder.

The store is MLflow's SQLite backend (``sqlite:///DIR/mlflow.db``), with artifacts in
``DIR/mlflow-artifacts``: the backend MLflow maintains (its file store is in maintenance
mode and raises unless ``MLFLOW_ALLOW_FILE_STORE=true``), one file a person can open with
``mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db`` or read with ``MlflowClient``.
It needs SQLAlchemy and Alembic besides mlflow-skinny (the ``fedlift[mlflow]`` extra).

One experiment per job, named after it; one run per site, named after the site and tagged
``site`` and ``job_id`` (NVFlare's MLflow receiver keeps one run per site the same way).
What a site may not do to its run: change a param it set (MLflow keeps a param's first
value; a second one would fail the whole batch) or set the ``site``, ``job_id`` or
``mlflow.*`` tags that say whose run it is. Such records are dropped with a warning.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from ._tracking import Batch, group_by_site

__all__ = ["MLflowSink"]

log = logging.getLogger("fedlift.server")

_METRICS_PER_BATCH = 1000  # MLflow's limits of one log_batch call
_STRINGS_PER_BATCH = 100
_RESERVED_TAGS = ("site", "job_id")
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]+")


class MLflowSink:
    """Writes batches of the sites' records to the job's MLflow store (see module doc)."""

    name = "MLflow"

    def __init__(self, directory: Path, experiment: str, job_id: str, resume: bool) -> None:
        # A server that writes a local store sends nothing about it anywhere: MLflow 3's
        # usage telemetry is off unless the environment asks for it (read at its import).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self._metric, self._param, self._tag = Metric, Param, RunTag
        self.uri = f"sqlite:///{directory.resolve() / 'mlflow.db'}"
        directory.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.uri)
        found = self._client.get_experiment_by_name(experiment)
        if found is not None:
            self._experiment_id: str = found.experiment_id
        else:
            artifacts = (directory.resolve() / "mlflow-artifacts").as_uri()
            self._experiment_id = self._client.create_experiment(
                experiment, artifact_location=artifacts
            )
        self._job_id, self._resume = job_id, resume
        self._runs: dict[str, str] = {}
        self._params: dict[str, dict[str, str]] = {}
        self._warned: set[tuple[str, str]] = set()

    def _run_id(self, site: str) -> str:
        run_id = self._runs.get(site)
        if run_id is not None:
            return run_id
        if self._resume and _SAFE_ID.fullmatch(self._job_id):
            found = self._client.search_runs(
                [self._experiment_id], filter_string=f"tags.job_id = '{self._job_id}'"
            )
            for run in found:
                if run.data.tags.get("site") == site:
                    self._runs[site] = str(run.info.run_id)
                    self._params[site] = dict(run.data.params)
                    return self._runs[site]
        run = self._client.create_run(
            self._experiment_id, run_name=site, tags={"site": site, "job_id": self._job_id}
        )
        self._runs[site] = str(run.info.run_id)
        self._params[site] = {}
        return self._runs[site]

    def _warn(self, site: str, what: str, message: str, *args: Any) -> None:
        if (site, what) not in self._warned:
            self._warned.add((site, what))
            log.warning(message, *args)

    def write(self, batch: Batch) -> None:
        for site, items in group_by_site(batch).items():
            run_id = self._run_id(site)
            known = self._params[site]
            metrics: list[Any] = []
            params: dict[str, str] = {}
            tags: dict[str, str] = {}
            texts: list[tuple[str, str]] = []
            for arrived, record in items:
                millis = int(arrived * 1000)
                for name, number in record.numbers():
                    metrics.append(self._metric(name, number, millis, record.step or 0))
                if record.data_type in ("PARAMETER", "PARAMETERS"):
                    for key, text in record.strings().items():
                        first = known.get(key, params.get(key))
                        if first is None:
                            params[key] = text
                        elif first != text:
                            self._warn(site, f"param {key}",
                                       "%s: param %r keeps its first value %r (MLflow params "
                                       "do not change); %r is dropped", site, key, first[:60],
                                       text[:60])  # fmt: skip
                elif record.data_type in ("TAG", "TAGS"):
                    for key, text in record.strings().items():
                        if key in _RESERVED_TAGS or key.startswith("mlflow."):
                            self._warn(site, f"tag {key}",
                                       "%s: tag %r says whose run it is and is not set by sites; "
                                       "dropped", site, key)  # fmt: skip
                        else:
                            tags[key] = text
                elif record.data_type == "TEXT" and isinstance(record.value, str):
                    if record.path is not None:
                        texts.append((record.value, record.path))
            self._log(run_id, metrics, params, tags)
            known.update(params)
            for text, path in texts:
                self._client.log_text(run_id, text, path)

    def _log(
        self, run_id: str, metrics: list[Any], params: dict[str, str], tags: dict[str, str]
    ) -> None:
        for start in range(0, len(metrics), _METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])
        param_list = [self._param(k, v) for k, v in params.items()]
        tag_list = [self._tag(k, v) for k, v in tags.items()]
        for start in range(0, max(len(param_list), len(tag_list)), _STRINGS_PER_BATCH):
            self._client.log_batch(
                run_id,
                params=param_list[start : start + _STRINGS_PER_BATCH],
                tags=tag_list[start : start + _STRINGS_PER_BATCH],
            )

    def close(self, failed: bool) -> None:
        status = "FAILED" if failed else "FINISHED"
        for run_id in self._runs.values():
            self._client.set_terminated(run_id, status)
