"""Which server folder a path given to ``fedlift report`` means."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ._read import job_folder

__all__ = ["find_run"]

_RUN_FILES = ("metrics.jsonl", "run.json")


def _has_run_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _RUN_FILES)


def find_run(path: Path) -> tuple[Path, Path | None]:
    """The server folder and job folder (None when there is none) of ``path``: a
    simulator workspace (holding ``server/``), a server folder itself (holding
    ``metrics.jsonl`` or ``run.json``) or a deployed job's folder (``STORE/jobs/ID``,
    holding ``server/`` and ``job/``). Raises ConfigError when it is none of these."""
    folder = Path(path)
    expected = (
        "expected a workspace (holding server/), a job's server folder (holding "
        "metrics.jsonl or run.json) or a deployed job's folder (STORE/jobs/ID)"
    )
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"{folder} {what}; {expected}. Check the path. Received: path={folder}")
    if _has_run_files(folder):
        server = folder
    elif _has_run_files(folder / "server"):
        server = folder / "server"
    else:
        raise ConfigError(
            f"{folder} holds no run's files (no metrics.jsonl or run.json in it or in its "
            f"server/); {expected}. Point at the folder a job ran in, or wait for its first "
            f"round. Received: path={folder}"
        )
    return server, job_folder(server, None)
