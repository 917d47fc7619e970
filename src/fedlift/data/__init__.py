"""Partitions of a labelled data set over simulated clients, and what they hold.

The partitioners of NIID-Bench (Li et al. 2022, "Federated Learning on Non-IID Data
Silos"), on label arrays with numpy only: :func:`iid`, :func:`dirichlet` (label skew by
Dirichlet proportions), :func:`pathological` ("#C=k": k classes per client) and
:func:`quantity_skew` (IID labels, Dirichlet sizes). Each returns one sorted int64 index
array per client, disjoint, the same for the same seed. :func:`label_counts`,
:func:`summary_table`, :func:`save_summary_json`, :func:`save_summary_png` and
:func:`summary_figure` (the picture on a matplotlib Figure) show what a partition holds.
"""

from ._checks import MAX_RETRIES
from ._label_skew import dirichlet, pathological
from ._plot import save_summary_png, summary_figure
from ._quantity import iid, quantity_skew
from ._summary import SUMMARY_FORMAT, label_counts, save_summary_json, summary_table

__all__ = [
    "MAX_RETRIES",
    "SUMMARY_FORMAT",
    "dirichlet",
    "iid",
    "label_counts",
    "pathological",
    "quantity_skew",
    "save_summary_json",
    "save_summary_png",
    "summary_figure",
    "summary_table",
]
