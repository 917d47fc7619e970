"""What a partition holds: counts per client and class, as an array, a table and JSON.

For checking a partition before a run spends hours on it (is the skew what the paper
describes? did :func:`pathological` drop a class?) and for the run's report, which reads
the JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .._atomic import atomic_write_text
from ..errors import ConfigError
from ._checks import check_labels, check_parts

__all__ = ["SUMMARY_FORMAT", "Summary", "label_counts", "save_summary_json", "summary_table"]

SUMMARY_FORMAT = "fedlift.data.summary/1"
"""The ``format`` field of :func:`save_summary_json`'s file; bumped if its fields change."""


class Summary:
    """Counts per client and class of a checked partition, with the class names."""

    def __init__(
        self,
        labels: npt.ArrayLike,
        parts: Sequence[npt.ArrayLike],
        class_names: Sequence[str] | None = None,
    ) -> None:
        y = check_labels(labels)
        self.n_samples = int(y.size)
        self.classes, codes = np.unique(y, return_inverse=True)
        checked = check_parts(parts, self.n_samples)
        k = self.classes.size
        self.counts = np.zeros((len(checked), k), dtype=np.int64)
        for i, part in enumerate(checked):
            self.counts[i] = np.bincount(codes[part], minlength=k)
        self.left_out = np.bincount(codes, minlength=k) - self.counts.sum(axis=0)
        self.names = _class_names(class_names, self.classes)


def _class_names(names: Sequence[str] | None, classes: npt.NDArray[np.int64]) -> list[str]:
    if names is None:
        return [str(int(c)) for c in classes]
    if isinstance(names, str) or len(names) != classes.size:
        raise ConfigError(
            f"class_names must name each of the {classes.size} classes in labels (in sorted "
            f"label order). Received: class_names={names!r:.80}"
        )
    return [str(name) for name in names]


def label_counts(labels: npt.ArrayLike, parts: Sequence[npt.ArrayLike]) -> npt.NDArray[np.int64]:
    """A (clients x classes) int64 array: ``[i, j]`` is how many samples of class j client i
    holds. Classes are the distinct labels in sorted order (``np.unique(labels)``)."""
    return Summary(labels, parts).counts


def summary_table(
    labels: npt.ArrayLike,
    parts: Sequence[npt.ArrayLike],
    class_names: Sequence[str] | None = None,
) -> str:
    """A fixed-width plain-text table: one row per client (its size, its count per class),
    then the totals, and a "left out" row when some samples are in no part."""
    summary = Summary(labels, parts, class_names)
    counts = summary.counts
    header = ["client", "size", *summary.names]
    rows = [[str(i), *map(str, [row.sum(), *row])] for i, row in enumerate(counts)]
    totals = counts.sum(axis=0)
    rows.append(["total", *map(str, [totals.sum(), *totals])])
    if summary.left_out.any():
        rows.append(["left out", *map(str, [summary.left_out.sum(), *summary.left_out])])
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def save_summary_json(
    labels: npt.ArrayLike,
    parts: Sequence[npt.ArrayLike],
    path: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
) -> None:
    """Write the counts as JSON, atomically (a reader never sees half a file).

    Fields: ``format`` (:data:`SUMMARY_FORMAT`), ``n_samples``, ``classes`` (the label
    values), ``class_names``, ``sizes`` (per client), ``counts`` (clients x classes) and
    ``left_out`` (per class: samples in no part).
    """
    summary = Summary(labels, parts, class_names)
    document = {
        "format": SUMMARY_FORMAT,
        "n_samples": summary.n_samples,
        "classes": summary.classes.tolist(),
        "class_names": summary.names,
        "sizes": summary.counts.sum(axis=1).tolist(),
        "counts": summary.counts.tolist(),
        "left_out": summary.left_out.tolist(),
    }
    atomic_write_text(path, json.dumps(document) + "\n")
