"""A picture of a partition: one stacked horizontal bar per client, a colour per class.

matplotlib (a dependency: every run's report draws with it) is imported only when a
picture is asked for, so ``import fedlift.data`` stays light. It draws with the Agg canvas on its
own figure, never through pyplot, so the caller's backend and figures are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .._atomic import atomic_writer
from ..errors import ConfigError
from ._summary import Summary

TYPE_CHECKING = False  # (typing's, without importing typing: this package imports little)
if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["save_summary_png", "summary_figure"]


def save_summary_png(
    labels: npt.ArrayLike,
    parts: Sequence[npt.ArrayLike],
    path: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
) -> None:
    """Draw the samples per client and class as a stacked bar chart and write it as PNG to
    ``path``, atomically (a temporary file beside it, then a rename)."""
    summary = Summary(labels, parts, class_names)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as exc:
        raise ConfigError(
            "save_summary_png needs matplotlib, which is not installed; install it with "
            f"pip install fedlift[plots] (or pip install matplotlib). Received: {exc}"
        ) from None
    figure = summary_figure(summary.counts, summary.names)
    FigureCanvasAgg(figure)
    with atomic_writer(path) as handle:
        figure.savefig(handle, format="png", dpi=100)


def summary_figure(
    counts: npt.NDArray[np.int64],
    class_names: Sequence[str],
    row_labels: Sequence[str] | None = None,
) -> Figure:
    """The stacked bar chart of ``counts`` (clients x classes) on a new matplotlib Figure
    (no canvas attached: save it in any format); rows are labelled ``row_labels``
    (default ``client 0`` ...). Needs matplotlib (the report's figures use it too)."""
    import matplotlib
    from matplotlib.figure import Figure

    n_clients, n_classes = counts.shape
    labels = [f"client {i}" for i in range(n_clients)] if row_labels is None else row_labels
    palette = "tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "viridis"
    colormap = matplotlib.colormaps[palette]
    if n_classes <= 20:
        colors = colormap(np.arange(n_classes))  # the qualitative palette's own colours
    else:
        colors = colormap(np.linspace(0.0, 1.0, n_classes))
    figure = Figure(figsize=(8.0, min(2.0 + 0.3 * n_clients, 40.0)), layout="constrained")
    axes = figure.add_subplot()
    rows = np.arange(n_clients)
    left = np.zeros(n_clients, dtype=np.int64)
    for j in range(n_classes):
        axes.barh(rows, counts[:, j], left=left, color=colors[j], label=class_names[j])
        left += counts[:, j]
    axes.set_yticks(rows, list(labels))
    axes.invert_yaxis()
    axes.set_xlabel("samples")
    axes.set_title(f"Samples per client and class ({n_clients} clients, {n_classes} classes)")
    if n_classes <= 30:
        figure.legend(title="class", loc="outside right upper", fontsize="small")
    return figure
