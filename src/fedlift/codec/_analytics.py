"""The wire form of what a training script logs (``flare.log`` and the tracking writers).

A record is one call: ``key``, ``value``, ``data_type``, ``step``, ``writer`` and, for text,
``path``. One function checks it in both places: in the script, so that a bad call fails
where it is made, and on the server, where the record comes from a peer and is treated as
hostile. The limits are MLflow's (names of at most 250 characters from a small alphabet
that cannot resolve to another path; param values of 6000 characters, tag values of 8000;
at most 1000 metrics or 100 params or tags in one batch), so that every record the server
accepts can be written to every backend; text is capped at 1,000,000 characters.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Any

from ..errors import ProtocolError

__all__ = [
    "LOG_DATA_TYPES",
    "LOG_WRITERS",
    "MAX_LOG_ENTRIES",
    "MAX_LOG_NAME_CHARS",
    "MAX_LOG_PARAM_CHARS",
    "MAX_LOG_STRINGS",
    "MAX_LOG_TAG_CHARS",
    "MAX_LOG_TEXT_CHARS",
    "check_log_name",
    "check_log_record",
]

NUMBER_TYPES = ("SCALAR", "METRIC")
NUMBERS_TYPES = ("SCALARS", "METRICS")
STRING_TYPES = ("PARAMETER", "TAG")
STRINGS_TYPES = ("PARAMETERS", "TAGS")
LOG_DATA_TYPES = (
    "SCALAR",
    "SCALARS",
    "METRIC",
    "METRICS",
    "PARAMETER",
    "PARAMETERS",
    "TAG",
    "TAGS",
    "TEXT",
)
"""What a record may hold (NVFlare's ``AnalyticsDataType`` names)."""
LOG_WRITERS = ("TORCH_TB", "MLFLOW", "WANDB")
"""Which writer made a record (NVFlare's ``LogWriterName`` values)."""

MAX_LOG_NAME_CHARS = 250
MAX_LOG_ENTRIES = 1000
"""Numbers in one SCALARS/METRICS record (MLflow's metrics per batch)."""
MAX_LOG_STRINGS = 100
"""Params or tags in one PARAMETERS/TAGS record (MLflow's params and tags per batch)."""
MAX_LOG_PARAM_CHARS = 6000
MAX_LOG_TAG_CHARS = 8000
MAX_LOG_TEXT_CHARS = 1_000_000
_MAX_STEP = 2**63 - 1  # TensorBoard and MLflow store steps as int64

_NAME = re.compile(r"[A-Za-z0-9_.\- /:]+")


def _shown(value: Any) -> str:
    return f"{value!r:.60}" if not isinstance(value, str) else repr(value[:60])


def check_log_name(name: Any, what: str = "key") -> str:
    """``name`` as a metric, param, tag or artifact name; raises ProtocolError otherwise.

    Letters, digits and ``_ - . / :`` and spaces, at most 250 characters, and a name that
    stays itself as a path (no ``..``, no leading ``/``, no ``//`` or trailing ``/``):
    MLflow's rule, which also keeps an artifact inside its run's folder.
    """
    if not isinstance(name, str) or not name:
        raise ProtocolError(
            f"a log record's {what} must be a non-empty string. Received: {what}={_shown(name)} "
            f"({type(name).__name__})."
        )
    if len(name) > MAX_LOG_NAME_CHARS or not _NAME.fullmatch(name):
        raise ProtocolError(
            f"a log record's {what} must be at most {MAX_LOG_NAME_CHARS} characters of letters, "
            "digits, '_', '-', '.', '/', ':' and spaces (MLflow's rule). Rename it, e.g. "
            f"'train/loss'. Received: {what}={_shown(name)} ({len(name)} characters)."
        )
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(("..", "/")):
        raise ProtocolError(
            f"a log record's {what} must not read as another path (no '..', no leading or "
            f"trailing '/', no '//'). Received: {what}={_shown(name)}."
        )
    return name


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(
            f"log value for {name!r} must be a number. Received: value={_shown(value)} "
            f"({type(value).__name__})."
        )
    try:
        return float(value)
    except OverflowError:
        raise ProtocolError(
            f"log value for {name!r} is an int too large for a float. Received: "
            f"value={_shown(value)}."
        ) from None


def _string(name: str, value: Any, limit: int, data_type: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(
            f"log value for {name!r} ({data_type}) must be a string. Received: "
            f"value={_shown(value)} ({type(value).__name__})."
        )
    if len(value) > limit:
        raise ProtocolError(
            f"log value for {name!r} ({data_type}) has {len(value):,} characters; at most "
            f"{limit:,} are kept. Log less, or as text (MLflowWriter.log_text). Received: "
            f"value={_shown(value)}."
        )
    return value


def _entries(key: str, value: Any, data_type: str, limit: int) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise ProtocolError(
            f"log(data_type={data_type}) takes a non-empty dict. Received: value={_shown(value)} "
            f"({type(value).__name__})."
        )
    if len(value) > limit:
        raise ProtocolError(
            f"log(data_type={data_type}) takes at most {limit} entries in one call; split them "
            f"over several calls. Received: {len(value)} entries under key={key!r}."
        )
    for name in value:
        check_log_name(name, "name")
        if data_type == "SCALARS":
            check_log_name(f"{key}/{name}", "key/name")  # the tag it is written under
    return value


def _step(step: Any) -> int | None:
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _MAX_STEP:
        raise ProtocolError(
            f"a log record's step must be an int from 0 to 2**63 - 1, or None. Received: "
            f"step={_shown(step)} ({type(step).__name__})."
        )
    return step


def check_log_record(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The record in ``fields``, checked, as the six fields ``key``, ``value``,
    ``data_type``, ``step``, ``writer`` and ``path`` (other fields are ignored); raises
    :class:`~fedlift.errors.ProtocolError` with what is wrong.

    ``value`` by ``data_type``: SCALAR/METRIC a number (NaN and infinities are numbers);
    SCALARS/METRICS a dict of names to numbers; PARAMETER/TAG a string; PARAMETERS/TAGS a
    dict of names to strings; TEXT a string, with ``path`` the artifact file it is saved as.
    ``data_type`` defaults to SCALAR and ``writer`` to TORCH_TB.
    """
    data_type = fields.get("data_type", "SCALAR")
    if data_type not in LOG_DATA_TYPES:
        raise ProtocolError(
            f"log() supports data_type {', '.join(LOG_DATA_TYPES)}. Received: "
            f"data_type={_shown(data_type)}."
        )
    writer = fields.get("writer", "TORCH_TB")
    if writer not in LOG_WRITERS:
        raise ProtocolError(
            f"a log record's writer must be one of {', '.join(LOG_WRITERS)}. Received: "
            f"writer={_shown(writer)}."
        )
    key = check_log_name(fields.get("key"))
    step = _step(fields.get("step"))
    raw = fields.get("value")
    path = fields.get("path")
    value: Any
    if data_type in NUMBER_TYPES:
        value = _number(key, raw)
    elif data_type in NUMBERS_TYPES:
        entries = _entries(key, raw, data_type, MAX_LOG_ENTRIES)
        value = {n: _number(n, v) for n, v in entries.items()}
    elif data_type in STRING_TYPES:
        limit = MAX_LOG_PARAM_CHARS if data_type == "PARAMETER" else MAX_LOG_TAG_CHARS
        value = _string(key, raw, limit, data_type)
    elif data_type in STRINGS_TYPES:
        limit = MAX_LOG_PARAM_CHARS if data_type == "PARAMETERS" else MAX_LOG_TAG_CHARS
        strings = _entries(key, raw, data_type, MAX_LOG_STRINGS)
        value = {n: _string(n, v, limit, data_type) for n, v in strings.items()}
    else:  # TEXT
        value = _string(key, raw, MAX_LOG_TEXT_CHARS, data_type)
        path = check_log_name(path, "path")
    if data_type != "TEXT" and path is not None:
        raise ProtocolError(
            f"only TEXT records name a path. Received: data_type={data_type}, path={_shown(path)}."
        )
    return {
        "key": key,
        "value": value,
        "data_type": data_type,
        "step": step,
        "writer": writer,
        "path": path,
    }
