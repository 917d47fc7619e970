"""Containment of names that come from a job folder, a job's config or an archive.

Every path a job names (its ``app`` folder, ``runner.script``, ``initial_model``) must stay
in its folder: no absolute paths, no ``..``, and no symlink that leads out. One check,
:func:`resolve_inside`, serves every layer (the job loader, the deployment server and the
site that runs the script), so it lives at the package's root like ``_atomic``.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from .errors import ConfigError

__all__ = ["resolve_inside"]

_SEPARATORS = re.compile(r"[/\\]")


def resolve_inside(root: Path, name: object, what: str, inside: str = "the job folder") -> Path:
    """``root / name`` resolved (symlinks followed); refused unless it stays inside ``root``.

    ``what`` names the setting in messages (e.g. ``job.json: 'app'``) and ``inside`` names
    the folder (e.g. ``the job folder``), so that no absolute path of this machine appears
    in an error that may be sent to a peer. Raises :class:`~fedlift.errors.ConfigError`
    for a name that is not a non-empty string, is absolute, holds ``..`` or a NUL byte, or
    resolves to a place outside ``root``.
    """
    fix = f"Name a path relative to {inside}, without '..', and keep the file in it."
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"{what} must be a path relative to {inside}; received: {name!r:.80}. {fix}"
        )
    shown = f"{name!r:.200}"
    if "\x00" in name:
        raise ConfigError(f"{what} holds a NUL byte; received: {shown}. {fix}")
    if PurePosixPath(name).is_absolute() or name.startswith("\\") or re.match(r"^[A-Za-z]:", name):
        raise ConfigError(
            f"{what} must be relative to {inside}, not an absolute path; received: {shown}. {fix}"
        )
    if ".." in _SEPARATORS.split(name):
        raise ConfigError(
            f"{what} must not climb out of {inside} with '..'; received: {shown}. {fix}"
        )
    base = root.resolve()
    try:
        target = (base / name).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise ConfigError(f"{what} names a symlink loop; received: {shown}. {fix}") from None
    if target != base and base not in target.parents:
        raise ConfigError(
            f"{what} leads out of {inside} through a symlink; received: {shown}. Replace the "
            f"symlink with a copy of what it points to. {fix}"
        )
    return target
