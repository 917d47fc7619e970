"""Experiment tracking as NVFlare's scripts write it: ``from fedlift.client.tracking import
SummaryWriter`` (or ``MLflowWriter``, ``WandBWriter``) in place of ``nvflare.client.tracking``.

The writers look like TensorBoard's ``SummaryWriter``, the ``mlflow`` module and ``wandb``,
but write nothing on the site: every call streams one record to the server over the job's
link (:func:`fedlift.client.log`), and the server writes it for this site. Sites need no
tracking package, no credentials and no route to a tracking server; the server writes
TensorBoard event files for every job (``WORKSPACE/server/tensorboard/SITE``), and MLflow
or W&B runs when the job asks for them (``FedJob(tracking="mlflow")``). A record from any
writer reaches every backend: ``add_scalar`` shows in MLflow as a metric, ``log_metric`` in
TensorBoard as a scalar.

Names and signatures are NVFlare's (``nvflare.client.tracking``); values may be Python,
numpy or 0-d framework scalars, steps any int-like. Call ``flare.init()`` first; like
``flare.log``, only rank 0 of a multi-process site reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, SupportsFloat, SupportsIndex

from ..errors import ClientAPIError
from ._api import AnalyticsDataType, log

__all__ = ["MLflowWriter", "SummaryWriter", "WandBWriter"]

_TB = "TORCH_TB"
_MLFLOW = "MLFLOW"
_WANDB = "WANDB"


def _no_extras(call: str, kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments fedlift would otherwise drop without a word (NVFlare hands
    them to its receivers; fedlift's server takes none)."""
    if kwargs:
        raise ClientAPIError(
            f"{call}() takes no extra keyword arguments in fedlift; remove them. Received: "
            f"{sorted(kwargs)}."
        )


class SummaryWriter:
    """TensorBoard's ``SummaryWriter`` calls, streamed to the server (NVFlare's names).

    ``add_scalar("train_loss", loss, global_step=epoch)`` shows as ``train_loss`` of this
    site's run in TensorBoard; ``add_scalars("acc", {"train": a, "val": b})`` as
    ``acc/train`` and ``acc/val``.
    """

    def add_scalar(
        self,
        tag: str,
        scalar: SupportsFloat,
        global_step: SupportsIndex | None = None,
        **kwargs: Any,
    ) -> None:
        """Send one scalar (a Python, numpy or 0-d tensor number)."""
        _no_extras("add_scalar", kwargs)
        log(tag, scalar, AnalyticsDataType.SCALAR, global_step, writer=_TB)

    def add_scalars(
        self,
        tag: str,
        scalars: Mapping[str, SupportsFloat],
        global_step: SupportsIndex | None = None,
        **kwargs: Any,
    ) -> None:
        """Send several scalars under one parent tag (written as ``tag/name``)."""
        _no_extras("add_scalars", kwargs)
        log(tag, scalars, AnalyticsDataType.SCALARS, global_step, writer=_TB)

    def flush(self) -> None:
        """Nothing to flush on the site: every call has already been sent."""


class WandBWriter:
    """``wandb.log`` streamed to the server (NVFlare's names)."""

    def log(self, metrics: Mapping[str, SupportsFloat], step: SupportsIndex | None = None) -> None:
        """Send several metrics at once, named as in ``metrics``."""
        log("metrics", metrics, AnalyticsDataType.METRICS, step, writer=_WANDB)


class MLflowWriter:
    """The ``mlflow`` module's logging calls, streamed to the server (NVFlare's names).

    With ``tracking="mlflow"`` on the job, each site has one run of the job's experiment:
    ``log_metric`` and ``log_metrics`` add to its metric history (step 0 when no step is
    given, as in MLflow), ``log_param(s)`` and ``set_tag(s)`` set its params and tags (as
    strings), ``log_text`` saves an artifact file in it.
    """

    def log_param(self, key: str, value: Any) -> None:
        """Set a param of this site's run (sent as ``str(value)``; a param keeps its first
        value, as in MLflow)."""
        log(key, value, AnalyticsDataType.PARAMETER, writer=_MLFLOW)

    def log_params(self, values: Mapping[str, Any]) -> None:
        """Set several params (at most 100 a call)."""
        log("params", values, AnalyticsDataType.PARAMETERS, writer=_MLFLOW)

    def log_metric(self, key: str, value: SupportsFloat, step: SupportsIndex | None = None) -> None:
        """Add a value to the metric's history."""
        log(key, value, AnalyticsDataType.METRIC, step, writer=_MLFLOW)

    def log_metrics(
        self, metrics: Mapping[str, SupportsFloat], step: SupportsIndex | None = None
    ) -> None:
        """Add values to several metrics' histories at one step (at most 1000 a call)."""
        log("metrics", metrics, AnalyticsDataType.METRICS, step, writer=_MLFLOW)

    def log_text(self, text: str, artifact_file_path: str) -> None:
        """Save ``text`` as the run's artifact ``artifact_file_path`` (e.g. ``"notes/a.txt"``)."""
        log("text", text, AnalyticsDataType.TEXT, writer=_MLFLOW, path=artifact_file_path)

    def set_tag(self, key: str, tag: Any) -> None:
        """Set a tag of this site's run (sent as ``str(tag)``)."""
        log(key, tag, AnalyticsDataType.TAG, writer=_MLFLOW)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags (at most 100 a call)."""
        log("tags", tags, AnalyticsDataType.TAGS, writer=_MLFLOW)
