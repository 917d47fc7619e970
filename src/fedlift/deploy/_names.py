"""Names the deployment commands share with the POC (kept apart so that building the CLI's
parser imports no certificate code)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ADMIN", "DEFAULT_POC_WORKSPACE"]

DEFAULT_POC_WORKSPACE = Path("/tmp/fedlift/poc")
ADMIN = "admin@poc"
