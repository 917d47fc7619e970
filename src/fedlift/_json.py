"""JSON values without NaN or infinity (JSON has neither: ``json.dumps`` would write
``NaN``, which browsers and strict parsers refuse), shared by the report and the live view."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite_json"]


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinity as None, dict keys as strings, tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value
