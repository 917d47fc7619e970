"""One virtual environment per peer framework, under ``benchmarks/.venvs/<name>/``.

The peers never share an interpreter with fedlift (or with each other): each runs in its
own venv's python as a subprocess. ``ensure_venv`` is idempotent: a stamp file in the venv
holds the requirement list it was installed with; a different list is pip-installed into the
same venv (pip up- or downgrades what the new list pins).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

VENVS = Path(__file__).resolve().parent.parent / ".venvs"

# Pinned to what ``pip install nvflare`` / ``pip install "flwr[simulation]"`` resolved when the
# peer benchmark was written (Python 3.11; flwr[simulation] brought ray 2.55.1, both numpy 2.4.6).
REQUIREMENTS: dict[str, list[str]] = {
    "nvflare": ["nvflare==2.9.0"],
    "flower": ["flwr[simulation]==1.42.0"],
}

STAMP = "fedlift-requirements.json"


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(name: str, requirements: list[str], timeout: float = 1800.0) -> Path:
    """Create ``benchmarks/.venvs/<name>`` with ``requirements`` installed; return its path."""
    venv = VENVS / name
    stamp = venv / STAMP
    wanted = json.dumps(sorted(requirements))
    if stamp.is_file() and stamp.read_text() == wanted and python_of(venv).exists():
        return venv
    if not python_of(venv).exists():  # a broken or half-made venv: start over
        shutil.rmtree(venv, ignore_errors=True)
        VENVS.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["python3", "-m", "venv", str(venv)], check=True, timeout=300, stdout=sys.stderr
        )
    stamp.unlink(missing_ok=True)  # installed below; a failure leaves no stamp
    pip = [str(python_of(venv)), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, *requirements], check=True, timeout=timeout, stdout=sys.stderr)
    stamp.write_text(wanted)
    return venv


def ensure_peer(name: str) -> Path:
    """The venv of a known peer (``"nvflare"`` or ``"flower"``), created if needed."""
    return ensure_venv(name, REQUIREMENTS[name])
