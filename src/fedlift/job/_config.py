"""The exported job folder and its one readable config file, ``job.json``.

Layout::

    JOB/
      job.json            what to run: clients, rounds, workflow settings, the script
      app/                the script and its local modules (shipped to every client)
      initial_model.keras the initial model (or initial_model.safetensors for plain arrays)
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_text
from .._paths import resolve_inside
from ..codec import Compression
from ..errors import ConfigError
from ..server import (
    CompressionFilter,
    ErrorPolicy,
    RoundRecord,
    RunSettings,
    Strategy,
    check_tracking,
    strategy_from_spec,
)

__all__ = ["CONFIG_NAME", "JobConfig", "RunnerConfig", "WorkflowConfig", "load_job", "zip_dir"]

CONFIG_NAME = "job.json"
FORMAT = "fedlift-job/1"
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


_LOOP_KEYS = frozenset(
    {
        "num_rounds",
        "min_clients",
        "key_metric",
        "higher_is_better",
        "round_timeout",
        "register_timeout",
        "final_evaluation",
        "save_interval",
        "type",
        "on_client_error",
        "cross_site_eval",
        "compression",
    }
)


@dataclass
class WorkflowConfig:
    """The run's settings (rounds, clients, time limits, error policy) and its strategy:
    ``type`` names it (``"fedavg"``, ``"fedadam"``, ... or ``"module:Class"`` in the app
    folder) and ``options`` holds its options; in ``job.json`` both sit flat in
    ``workflow`` (``{"type": "fedadam", "eta": 0.01, "num_rounds": 5, ...}``)."""

    num_rounds: int
    min_clients: int
    key_metric: str = "accuracy"
    higher_is_better: bool = True
    round_timeout: float = 3600.0
    register_timeout: float = 600.0
    final_evaluation: bool = False
    """A last ``validate`` task after training (opt-in, as in NVFlare: scripts that never
    check ``is_evaluate()`` would train on it)."""
    save_interval: float = 1.0
    """Seconds: the global model is written at most this often, and after the last round."""
    type: str = "fedavg"
    on_client_error: ErrorPolicy = "fail"
    """A site's error (its script raised, its result cannot be aggregated): ``"fail"`` the
    job, or ``"exclude"`` the site from the round while ``min_clients`` still answer."""
    cross_site_eval: bool = False
    """After training, every site's local model and the global one are evaluated on every
    site (:func:`~fedlift.server.cross_site_evaluate`)."""
    compression: dict[str, Any] | str | None = None
    """How models travel (:class:`~fedlift.codec.Compression`'s fields, or a scheme's name
    for the results alone); None: as they are."""
    options: dict[str, Any] = field(default_factory=dict)
    """The strategy's options (flat in ``job.json``)."""

    def spec(self) -> dict[str, Any]:
        """The strategy's spec: ``{"type": ..., **options}``."""
        return {"type": self.type, **self.options}

    def strategy(
        self, app_dir: Path | None, where: str = "workflow", *, allow_app_code: bool = True
    ) -> Strategy:
        """Build the strategy (options checked; ``module:Name`` imported from ``app_dir``
        unless ``allow_app_code`` is False)."""
        return strategy_from_spec(
            self.spec(),
            app_dir,
            where=where,
            besides=tuple(sorted(_LOOP_KEYS - {"type"})),
            allow_app_code=allow_app_code,
        )

    def settings(
        self,
        *,
        min_clients: int | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        register_timeout: float | None = None,
        owner: str = "workflow",
    ) -> RunSettings:
        """The loop's settings (``min_clients`` lowered for a run with fewer clients)."""
        filters: tuple[CompressionFilter, ...] = ()
        if self.compression is not None:
            spec = Compression.from_json(self.compression, f"{owner}.compression")
            filters = (CompressionFilter(spec),) if spec.enabled else ()
        return RunSettings(
            filters=filters,
            owner=owner,
            num_rounds=self.num_rounds,
            min_clients=self.min_clients if min_clients is None else min_clients,
            round_timeout=self.round_timeout,
            register_timeout=(
                self.register_timeout if register_timeout is None else register_timeout
            ),
            final_evaluation=self.final_evaluation,
            on_client_error=self.on_client_error,
            on_round=on_round,
        )

    def to_dict(self) -> dict[str, Any]:
        """As ``job.json`` holds it: the options flat beside the settings."""
        data = {k: v for k, v in asdict(self).items() if k != "options"}
        return {**data, **self.options}


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
    tracking: str | None = None
    """Where the server also writes the sites' logs (``"mlflow"``, ``"wandb"``,
    ``"tensorboard"``; None: TensorBoard alone); see :func:`fedlift.server.check_tracking`."""

    def to_json(self) -> str:
        data = asdict(self)
        data["workflow"] = self.workflow.to_dict()
        return json.dumps(data, indent=2) + "\n"

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
            "cross_site_eval": self.workflow.cross_site_eval,
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


def load_job(
    folder: str | Path, *, label: str | None = None, allow_app_code: bool = True
) -> tuple[JobConfig, Path]:
    """Read and validate ``folder/job.json``; returns the config and the folder.

    Every path the config names stays in the job folder: ``app`` is a folder inside it,
    ``runner.script`` a file inside ``app`` and ``initial_model`` a file inside the job
    (no absolute paths, no ``..``, no symlink that leads out; see
    :func:`fedlift._paths.resolve_inside`). ``label`` is how messages name the folder
    (default: the path as given); a server passes a name of its own so that no path of
    its disk reaches a client. ``allow_app_code=False`` refuses a strategy (or function)
    named from the app folder (a deployed server that runs no job code).
    """
    root = Path(folder)
    shown = str(root) if label is None else label
    path = root / CONFIG_NAME
    if not path.is_file():
        hint = ""
        if root.is_dir():
            found = sorted(p.parent.name for p in root.glob(f"*/{CONFIG_NAME}"))
            if found:
                hint = f" It contains job folders: {', '.join(found)}; pass one of them."
        raise ConfigError(
            f"{shown} is not a fedlift job folder: {CONFIG_NAME} is missing.{hint} Create one "
            "with `python3 job.py --export_config` (job.export_job(ROOT))."
        )
    where = f"{shown}/{CONFIG_NAME}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a JSON object.")
    if data.get("format") != FORMAT:
        raise ConfigError(f"{where}: format {data.get('format')!r} is not {FORMAT!r}.")
    wf = _require(data, "workflow", dict, where)
    rn = _require(data, "runner", dict, where)
    settings = {k: v for k, v in wf.items() if k in _LOOP_KEYS}
    options = {k: v for k, v in wf.items() if k not in _LOOP_KEYS}
    try:
        workflow = WorkflowConfig(**settings, options=options)
        runner = RunnerConfig(**rn)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(workflow.type, str):
        raise ConfigError(
            f"{where}: workflow 'type' must be a string; received: {workflow.type!r}."
        )
    if not isinstance(workflow.cross_site_eval, bool):
        raise ConfigError(
            f"{where}: workflow.cross_site_eval must be true or false; received: "
            f"{workflow.cross_site_eval!r}."
        )
    workflow.settings(owner=f"{where}: workflow")  # the run's settings, checked once there
    if not is_seconds(workflow.save_interval):
        raise ConfigError(
            f"{where}: workflow.save_interval must be a number of seconds >= 0; "
            f"received: {workflow.save_interval!r}."
        )
    app = data.get("app", "app")
    notes = data.get("notes", {})
    if not isinstance(notes, dict):
        raise ConfigError(f"{where}: 'notes' must be a JSON object; received: {notes!r:.60}.")
    config = JobConfig(
        name=_require(data, "name", str, where),
        n_clients=_require(data, "n_clients", int, where),
        workflow=workflow,
        runner=runner,
        initial_model=_require(data, "initial_model", str, where),
        app=app,
        notes=notes,
        # The value is checked here, where it enters; the packages where they are used
        # (the server that writes), since the machine reading job.json may not need them.
        tracking=check_tracking(data.get("tracking"), f"{where}: 'tracking'", packages=False),
    )
    app_dir = resolve_inside(root, app, f"{where}: 'app'", "the job folder")
    if not app_dir.is_dir():
        raise ConfigError(
            f"{where}: the app folder {app!r} is not a folder in {shown}. Export the job "
            "again with job.export_job()."
        )
    try:  # what ships to the sites: no symlink in it may lead out of the app
        folder_files(app_dir)
    except ConfigError as exc:
        raise ConfigError(f"{where}: the app folder {app!r} cannot be shipped: {exc}") from None
    # The strategy and its options, checked once here.
    workflow.strategy(app_dir, where=f"{where}: workflow", allow_app_code=allow_app_code)
    script = resolve_inside(
        app_dir, runner.script, f"{where}: 'runner.script'", f"the app folder ({app!r})"
    )
    if not script.is_file():
        raise ConfigError(f"{where}: the script {config.runner.script!r} is not in {shown}/{app}.")
    model = resolve_inside(root, config.initial_model, f"{where}: 'initial_model'")
    if not model.is_file():
        raise ConfigError(f"{where}: the initial model {config.initial_model!r} is missing.")
    return config, root


_MAX_FILES = 100_000
"""The most files a job folder (or an app archive) may hold."""


def folder_files(
    folder: Path, *, skip_hidden: bool = False, exclude: frozenset[Path] = frozenset()
) -> list[tuple[Path, str]]:
    """The files under ``folder`` as ``(path to read, name relative to folder)``, sorted.

    Caches and VCS folders (``__pycache__``, ``.git``, ...) are left out, and with
    ``skip_hidden`` every name that starts with a dot; folders whose resolved path is in
    ``exclude`` too. Symlinks are never dropped without a word: one whose target lies
    inside ``folder`` stands for what it points to (a file is packed as that file's bytes,
    a folder as its files); one that leads out of the folder, points to nothing, or loops
    back to a folder that holds it is refused with a :class:`ConfigError` naming it, as is
    anything that is not a file or a folder (a FIFO, a socket, a device).
    """
    base = folder.resolve()
    found: list[tuple[Path, str]] = []

    def refuse(rel: str, why: str, fix: str) -> ConfigError:
        return ConfigError(f"{folder}/{rel} {why}. {fix}")

    def walk(directory: Path, prefix: str, ancestors: frozenset[Path]) -> None:
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            if name in _SKIP_DIRS or (skip_hidden and name.startswith(".")):
                continue
            rel = f"{prefix}{name}"
            path = directory / name
            if path.is_symlink():
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):
                    raise refuse(rel, "is a symlink loop", "Remove it.") from None
                if target != base and base not in target.parents:
                    raise refuse(
                        rel,
                        f"is a symlink to {os.readlink(path)!r}, outside {folder}",
                        "Copy what it points to into the folder instead, or remove it; "
                        "fedlift never ships files from outside the job.",
                    )
                if not target.exists():
                    raise refuse(rel, f"is a symlink to {os.readlink(path)!r}, which does "
                                 "not exist", "Remove it or make it point to a file.")  # fmt: skip
            else:
                target = path
            if target in exclude:
                continue
            if target.is_dir():
                if target in ancestors:
                    raise refuse(rel, "is a symlink to a folder that holds it (a loop)",
                                 "Remove it.")  # fmt: skip
                walk(target, f"{rel}/", ancestors | {target})
            elif target.is_file():
                found.append((target, rel))
                if len(found) > _MAX_FILES:
                    raise ConfigError(
                        f"{folder} holds more than {_MAX_FILES:,} files (symlinks to folders "
                        "count each time). Keep data sets out of the app folder."
                    )
            else:
                raise refuse(rel, "is neither a file nor a folder (a FIFO, socket or device)",
                             "Remove it from the folder.")  # fmt: skip

    walk(base, "", frozenset({base}))
    return found


def zip_dir(folder: Path) -> bytes:
    """The folder as zip bytes (what the server ships to clients as the job's app).

    What goes in is :func:`folder_files`: a symlink that stays inside the folder is packed
    as what it points to; one that leads out is refused (:class:`ConfigError`).
    """
    files = folder_files(folder)
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bundle:
        for path, rel in files:
            bundle.write(path, rel)
    return buffer.getvalue()
