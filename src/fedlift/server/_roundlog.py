"""What a round did, site by site, for its line in ``metrics.jsonl`` (and the report).

:class:`RoundLog` watches one task as the loop runs it: each result's metrics and weight
as it arrives (before the filters, so bytes are counted as they came off the wire), the
sites the controller left out and why, the model bytes sent, and the server's memory when
the round ended. :meth:`RoundLog.extra` is what goes into the round's
:attr:`~fedlift.server.RoundRecord.extra`::

    "sites":           {site: {"metrics": {name: value}, "weight": w}}   (in the round)
    "left_out":        {site: why}                        (asked, not in the round)
    "bytes_sent":      model payload bytes sent to the sites (one copy per site)
    "bytes_received":  payload bytes of the results, as received
    "server_rss", "server_peak_rss": the server process's resident memory now, and its peak

Costs a few dictionary writes per result and one read of ``/proc/self/status`` per round.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import FedliftError
from ..model import FLModel, flatten

__all__ = ["RoundLog", "memory_now", "numeric_summary", "payload_bytes"]

_MAX_WHY = 4000
"""How much of a left-out site's reason (often a traceback) a round's line keeps: its end."""


def payload_bytes(model: FLModel | None) -> int:
    """The bytes of a model's arrays (params and array-valued meta), as they travel."""
    if model is None:
        return 0
    total = 0
    for tree in (model.params, *model.meta.values()):
        if tree is None or isinstance(tree, str | int | float | bool):
            continue
        try:
            _, arrays = flatten(tree)
        except FedliftError:  # meta that is no param tree carries no arrays
            continue
        total += sum(int(getattr(a, "nbytes", 0)) for a in arrays)
    return total


def memory_now() -> dict[str, int]:
    """``server_rss`` and ``server_peak_rss`` in bytes (Linux ``/proc``; {} elsewhere)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    name = "server_rss" if key == "VmRSS" else "server_peak_rss"
                    out[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def numeric_summary(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers in a JSON-like mapping, nested keys joined by ``.`` (booleans and
    arrays left out): a strategy's state as scalars for its curves."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            if math.isfinite(value):
                out[name] = float(value)
        elif isinstance(value, Mapping):
            out.update(numeric_summary(value, f"{name}."))
    return out


def _metrics(model: FLModel) -> dict[str, float]:
    return {
        str(k): float(v)
        for k, v in (model.metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _weight(model: FLModel) -> float | None:
    try:
        return model.weight()
    except FedliftError:  # the aggregator refuses it, naming the site
        return None


class RoundLog:
    """One task's per-site record (see the module docstring). Thread-safe: results may be
    taken on the transport's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sites: dict[str, dict[str, Any]] = {}
        self._left_out: dict[str, str] = {}
        self.bytes_sent = 0
        self.bytes_received = 0

    def sent(self, task: FLModel, copies: int) -> None:
        """``task`` went to ``copies`` sites."""
        size = payload_bytes(task) * copies
        with self._lock:
            self.bytes_sent += size

    def took(self, site: str, result: FLModel) -> None:
        """A result as it arrived from ``site``."""
        entry = {"metrics": _metrics(result), "weight": _weight(result)}
        size = payload_bytes(result)
        with self._lock:
            self._sites[site] = entry
            self.bytes_received += size

    def watch(
        self, add: Callable[[list[tuple[str, FLModel]]], None]
    ) -> Callable[[list[tuple[str, FLModel]]], None]:
        """``add``, taking note of each result first."""

        def watched(results: list[tuple[str, FLModel]]) -> None:
            for site, result in results:
                self.took(site, result)
            add(results)

        return watched

    def left_out(self, site: str, why: str) -> None:
        """``site`` is not in the round (for a controller's ``on_left_out``)."""
        text = str(why)
        if len(text) > _MAX_WHY:
            text = "..." + text[-_MAX_WHY:]
        with self._lock:
            self._left_out[site] = text

    def extra(
        self, answered: list[str], weights: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """The round's ``extra`` entries: the sites in ``answered`` with their metrics and
        weight (``weights``, the aggregator's, where it gave them), the rest left out."""
        with self._lock:
            sites = {}
            for site in answered:
                entry = dict(self._sites.get(site) or {"metrics": {}, "weight": None})
                if weights and site in weights:
                    entry["weight"] = float(weights[site])
                sites[site] = entry
            left_out = {s: why for s, why in self._left_out.items() if s not in sites}
            out: dict[str, Any] = {
                "sites": sites,
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
            }
        if left_out:
            out["left_out"] = left_out
        out.update(memory_now())
        return out
