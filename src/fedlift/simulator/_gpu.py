"""GPU groups for the simulator's ``-gpu`` option and each client's environment."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

from ..errors import ConfigError

__all__ = ["assign_groups", "available_gpus", "check_gpu_ids", "parse_gpu_groups"]

log = logging.getLogger("fedlift.simulator")

_GROUP = re.compile(r"\[([^\[\]]*)\]")


def parse_gpu_groups(spec: str) -> list[list[str]]:
    """``"0,1"`` -> ``[["0"], ["1"]]``; ``"[0,1],[2,3]"`` -> ``[["0", "1"], ["2", "3"]]``."""
    text = spec.replace(" ", "")
    if not text:
        raise ConfigError("-gpu got an empty value; expected e.g. 0,1 or [0,1],[2,3].")
    if "[" in text or "]" in text:
        groups = _GROUP.findall(text)
        rest = _GROUP.sub("", text).replace(",", "")
        if rest or not groups:
            raise ConfigError(
                f"-gpu {spec!r} is malformed; expected comma-separated ids (0,1) or bracketed "
                "groups ([0,1],[2,3])."
            )
        parsed = [[g for g in group.split(",")] for group in groups]
    else:
        parsed = [[g] for g in text.split(",")]
    for group in parsed:
        if not group or any(not g.isdigit() for g in group):
            raise ConfigError(
                f"-gpu {spec!r}: GPU ids must be non-negative integers; received group {group}."
            )
        if len(set(group)) != len(group):
            raise ConfigError(f"-gpu {spec!r}: group {group} names a GPU twice.")
    return parsed


def assign_groups(sites: list[str], groups: list[list[str]]) -> dict[str, list[str]]:
    """Clients take the groups round-robin: site i gets group i mod len(groups)."""
    if len(groups) > len(sites):
        raise ConfigError(
            f"-gpu gives {len(groups)} GPU groups but the job has only {len(sites)} clients; "
            "give at most one group per client."
        )
    return {site: groups[i % len(groups)] for i, site in enumerate(sites)}


def available_gpus() -> list[str] | None:
    """Physical GPU indices from ``nvidia-smi``; None when it is absent or fails."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        done = subprocess.run(
            [tool, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [line.strip() for line in done.stdout.splitlines() if line.strip().isdigit()]


def check_gpu_ids(groups: list[list[str]], available: list[str] | None) -> None:
    """Refuse GPU ids this machine does not have (skipped, with a warning, if unknown)."""
    if available is None:
        log.warning(
            "cannot check the -gpu ids: nvidia-smi is not available; passing them to the "
            "clients as CUDA_VISIBLE_DEVICES unchecked"
        )
        return
    unknown = sorted({g for group in groups for g in group} - set(available), key=int)
    if unknown:
        have = ",".join(available) if available else "none"
        raise ConfigError(
            f"-gpu names GPU {', '.join(unknown)} but this machine has GPU ids {have} "
            "(nvidia-smi). Use ids from `nvidia-smi -L`."
        )
