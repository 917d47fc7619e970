"""The exported job folder and its one readable config file, ``job.json``.

Layout::

    JOB/
      job.json            what to run: clients, rounds, workflow settings, the script
      app/                the script and its local modules (shipped to every client)
      initial_model.keras the initial model (or initial_model.safetensors for plain arrays)
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_text
from ..errors import ConfigError

__all__ = ["CONFIG_NAME", "JobConfig", "RunnerConfig", "WorkflowConfig", "load_job", "zip_dir"]

CONFIG_NAME = "job.json"
FORMAT = "fedlift-job/1"
ON_CLIENT_ERROR = ("fail", "exclude")
_SKIP_DIRS = {"__pycache__", ".git", ".venv", "venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


@dataclass
class RunnerConfig:
    """How each client runs the training script (see :class:`~fedlift.job.ScriptRunner`)."""

    script: str
    script_args: str = ""
    launch_external_process: bool = False
    command: str = "python3 -u"
    framework: str = "tensorflow"
    init_timeout: float = 300.0
    stop_timeout: float = 60.0


@dataclass
class WorkflowConfig:
    """FedAvg's settings."""

    num_rounds: int
    min_clients: int
    key_metric: str = "accuracy"
    higher_is_better: bool = True
    round_timeout: float = 3600.0
    register_timeout: float = 600.0
    final_evaluation: bool = True
    save_interval: float = 1.0
    """Seconds: the global model is written at most this often, and after the last round."""
    type: str = "fedavg"
    on_client_error: str = "fail"
    """A site's error (its script raised, its result cannot be aggregated): ``"fail"`` the
    job, or ``"exclude"`` the site from the round while ``min_clients`` still answer."""


@dataclass
class JobConfig:
    name: str
    n_clients: int
    workflow: WorkflowConfig
    runner: RunnerConfig
    initial_model: str
    app: str = "app"
    format: str = FORMAT
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def write(self, folder: Path) -> Path:
        path = folder / CONFIG_NAME
        atomic_write_text(path, self.to_json())
        return path

    def client_config(self) -> dict[str, Any]:
        """What the server tells each client about the job."""
        return {
            "job_name": self.name,
            "num_rounds": self.workflow.num_rounds,
            "runner": asdict(self.runner),
        }


def is_seconds(value: Any) -> bool:
    """Whether ``value`` is a number of seconds >= 0 (not a bool, not a string)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and value >= 0


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where} lacks {key!r}. Re-export the job with job.export_job().")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise ConfigError(f"{where}: {key!r} must be {kind}; found {value!r:.60}.")
    return value


def load_job(folder: str | Path) -> tuple[JobConfig, Path]:
    """Read and validate ``folder/job.json``; returns the config and the folder."""
    root = Path(folder)
    path = root / CONFIG_NAME
    if not path.is_file():
        hint = ""
        if root.is_dir():
            found = sorted(p.parent.name for p in root.glob(f"*/{CONFIG_NAME}"))
            if found:
                hint = f" It contains job folders: {', '.join(found)}; pass one of them."
        raise ConfigError(
            f"{root} is not a fedlift job folder: {CONFIG_NAME} is missing.{hint} Create one "
            "with `python3 job.py --export_config` (job.export_job(ROOT))."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object.")
    where = str(path)
    if data.get("format") != FORMAT:
        raise ConfigError(f"{where}: format {data.get('format')!r} is not {FORMAT!r}.")
    wf = _require(data, "workflow", dict, where)
    rn = _require(data, "runner", dict, where)
    try:
        workflow = WorkflowConfig(**wf)
        runner = RunnerConfig(**rn)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if workflow.type != "fedavg":
        raise ConfigError(f"{where}: workflow type {workflow.type!r} is unknown; use 'fedavg'.")
    if workflow.on_client_error not in ON_CLIENT_ERROR:
        raise ConfigError(
            f"{where}: workflow.on_client_error must be one of "
            f"{', '.join(map(repr, ON_CLIENT_ERROR))} ('fail' stops the job at a site's "
            "error, 'exclude' leaves that site out of the round); "
            f"received: {workflow.on_client_error!r}."
        )
    if not is_seconds(workflow.save_interval):
        raise ConfigError(
            f"{where}: workflow.save_interval must be a number of seconds >= 0; "
            f"received: {workflow.save_interval!r}."
        )
    config = JobConfig(
        name=_require(data, "name", str, where),
        n_clients=_require(data, "n_clients", int, where),
        workflow=workflow,
        runner=runner,
        initial_model=_require(data, "initial_model", str, where),
        app=data.get("app", "app"),
        notes=data.get("notes", {}),
    )
    if not (root / config.app / config.runner.script).is_file():
        raise ConfigError(
            f"{where}: the script {config.runner.script!r} is not in {root / config.app}."
        )
    if not (root / config.initial_model).is_file():
        raise ConfigError(f"{where}: the initial model {config.initial_model!r} is missing.")
    return config, root


def zip_dir(folder: Path) -> bytes:
    """The folder as zip bytes (what the server ships to clients as the job's app)."""
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bundle:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if any(part in _SKIP_DIRS for part in rel.parts) or path.is_symlink():
                continue
            if path.is_file():
                bundle.write(path, rel.as_posix())
    return buffer.getvalue()
