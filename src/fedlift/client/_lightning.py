"""A Lightning ``Trainer`` as a federated client: ``flare.patch(trainer)``.

The patch adds one callback to the trainer (as NVFlare's ``nvflare.client.lightning``
does), so that a script keeps calling ``trainer.validate`` and ``trainer.fit`` as before:

* the first ``validate``/``fit`` of a round loads the round's global model into the
  module (``load_state_dict``), once: validation inside ``fit`` does not load it again;
* ``trainer.validate`` before ``fit`` measures the global model: its metrics go back
  with the round's result (and are the whole answer to an ``evaluate`` task);
* after ``fit`` the module's ``state_dict()`` goes back, weighted by the optimizer steps
  taken in that fit (``NUM_STEPS_CURRENT_ROUND``), plus the module's ``__fl_meta__``;
* a ``fit`` on an ``evaluate`` task (hello-lightning's loop fits after every validate) is
  skipped: the task asks for the global model's metrics only;
* the trainer is set up for the next round: a second ``fit`` on one ``Trainer`` would
  stop at once (``max_epochs`` reached), so each round gets the first round's
  ``max_epochs`` (and ``max_steps``) on top of what is done; the optimizers' and LR
  schedulers' states carry over from round to round (``restore_state``), as a single long
  ``fit`` would keep them.

Lightning is imported from the trainer's own package (``lightning`` or
``pytorch_lightning``) when ``patch`` runs, never by ``import fedlift.client``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from ..errors import ClientAPIError
from ..model import FLModel, MetaKey
from ._api import _current_model, init, is_evaluate, receive, send

__all__ = ["FL_META_KEY", "patch"]

log = logging.getLogger("fedlift.client")

FL_META_KEY = "__fl_meta__"
"""A LightningModule attribute (a dict) whose items go into the result's meta (NVFlare's)."""


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Lightning's ``callback_metrics`` (0-d tensors mostly) as plain floats."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
        elif hasattr(value, "numel") and value.numel() == 1:
            out[key] = float(value.item())
    return out


class _FLHooks:
    """The callback's hooks. Mixed in before Lightning's ``Callback`` (whose hooks do
    nothing) by :func:`patch`, for whichever Lightning package the trainer comes from."""

    def __init__(self, rank: int, load_state_dict_strict: bool, restore_state: bool) -> None:
        super().__init__()
        init(rank=rank)
        self._strict = load_state_dict_strict
        self._restore = restore_state
        self._model: FLModel | None = None  # the round's global model, once loaded
        self._metrics: dict[str, float] | None = None  # the global model's, from validate()
        self._answered_by: str | None = None  # "train" or "evaluate" once the round is sent
        self._fit_open = False
        self._start_step = 0
        self._epochs_per_round: int | None = None
        self._steps_per_round: int | None = None
        self._optimizer_states: list[dict[str, Any]] = []
        self._scheduler_states: list[dict[str, Any]] = []

    def _sync(self, pl_module: Any) -> str:
        """Load the round's global model into ``pl_module`` if not done yet. Returns
        ``"open"`` while the round waits for its answer, ``"evaluated"`` once its metrics
        answered it (an evaluate task), ``"ended"`` after the job."""
        model = _current_model()
        if model is None:
            if self._model is not None and self._answered_by == "evaluate":
                # A fit() after the script's validate() of an evaluate task: it must not
                # wait for the next round, which the script's own loop asks for.
                return "evaluated"
            model = receive()  # the first round, or a loop without receive()/is_running()
            if model is None:
                return "ended"
        if model is not self._model:
            self._model = model
            self._metrics = None
            self._answered_by = None
            if model.params is not None:
                pl_module.load_state_dict(model.params, strict=self._strict)
        return "open" if self._answered_by is None else str(self._answered_by)

    def _next_round_loop(self, trainer: Any) -> None:
        """Give this fit the first fit's epochs (and steps) on top of those already done."""
        if self._epochs_per_round is None:
            self._epochs_per_round = max(int(trainer.max_epochs or 0), 0)
            self._steps_per_round = max(int(trainer.max_steps or 0), 0)
            return
        if self._epochs_per_round:
            trainer.fit_loop.max_epochs = trainer.current_epoch + self._epochs_per_round
        if self._steps_per_round:
            trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + self._steps_per_round
        trainer.num_sanity_val_steps = 0  # the script validates the global model itself

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        state = self._sync(pl_module)
        self._fit_open = state == "open" and not is_evaluate()
        if state == "evaluated" or (state == "open" and not self._fit_open):
            # hello-lightning's loop fits after every validate(), also on an evaluate task:
            # that training would be thrown away, so it is skipped.
            log.info("fit() on an evaluate task: skipped (the task asks for metrics only)")
            trainer.should_stop = True
        elif state == "ended":
            log.info("fit() after the job ended: its result is not sent")
        self._next_round_loop(trainer)
        self._start_step = trainer.global_step
        if self._restore and self._optimizer_states:
            for optimizer, saved in zip(trainer.optimizers, self._optimizer_states, strict=False):
                optimizer.load_state_dict(saved)
            for config, saved in zip(
                trainer.lr_scheduler_configs, self._scheduler_states, strict=False
            ):
                config.scheduler.load_state_dict(saved)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._sync(pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "validate":
            return  # inside fit(): the local model, not the global one
        if self._model is None or _current_model() is not self._model:
            return  # no round open (the job ended, or the round is answered)
        if self._metrics is None:
            self._metrics = _scalars(dict(trainer.callback_metrics))
        if is_evaluate():
            send(FLModel(metrics=self._metrics))
            self._answered_by = "evaluate"

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._restore:
            self._optimizer_states = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]
            self._scheduler_states = [
                copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs
            ]
        if not self._fit_open or self._model is None or _current_model() is not self._model:
            return
        self._fit_open = False
        meta = getattr(pl_module, FL_META_KEY, None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise ClientAPIError(
                f"the LightningModule's {FL_META_KEY} must be a dict of meta values to send; "
                f"received: {type(meta).__name__}. Set e.g. self.{FL_META_KEY} = {{}}."
            )
        meta = dict(meta)
        if MetaKey.NUM_STEPS_CURRENT_ROUND not in meta:
            steps = trainer.global_step - self._start_step
            if steps <= 0:
                raise ClientAPIError(
                    f"trainer.fit() took no optimizer step in round {self._model.current_round}"
                    ", so the round's result would have no weight. Received: "
                    f"global_step={trainer.global_step} before and after, max_epochs="
                    f"{trainer.max_epochs}, max_steps={trainer.max_steps}. Give the trainer "
                    "training batches (limit_train_batches > 0), or set "
                    f"{FL_META_KEY}['{MetaKey.NUM_STEPS_CURRENT_ROUND}'] on the module."
                )
            meta[MetaKey.NUM_STEPS_CURRENT_ROUND] = steps
        send(FLModel(params=pl_module.state_dict(), metrics=self._metrics, meta=meta))
        self._answered_by = "train"


_callback_classes: dict[type, type] = {}


def _callback_base(trainer: Any) -> type:
    """Lightning's ``Callback`` from the trainer's own package (the two are not
    interchangeable: a Trainer refuses the other package's callbacks)."""
    package = type(trainer).__module__.split(".")[0]
    if package == "pytorch_lightning":
        from pytorch_lightning import Callback as PLCallback

        return PLCallback
    if package == "lightning":
        from lightning.pytorch import Callback

        return Callback
    raise ClientAPIError(
        "flare.patch() takes a Lightning Trainer (lightning.pytorch.Trainer or "
        f"pytorch_lightning.Trainer); received: {type(trainer).__module__}."
        f"{type(trainer).__name__}. Patch the Trainer: flare.patch(trainer)."
    )


def patch(trainer: Any, restore_state: bool = True, load_state_dict_strict: bool = True) -> None:
    """Make ``trainer`` a federated client (see the module's docstring); once per trainer.

    ``restore_state``: carry the optimizers' and LR schedulers' states from one round's
    ``fit`` to the next. ``load_state_dict_strict``: ``strict`` of the module's
    ``load_state_dict`` when the global model is loaded.
    """
    base = _callback_base(trainer)
    if any(isinstance(cb, _FLHooks) for cb in trainer.callbacks):
        return
    cls = _callback_classes.get(base)
    if cls is None:
        cls = _callback_classes[base] = type(
            "FLCallback",
            (_FLHooks, base),
            {"__doc__": "fedlift's federated-learning callback (added by flare.patch)."},
        )
    trainer.callbacks = [
        *trainer.callbacks,
        cls(int(trainer.global_rank), load_state_dict_strict, restore_state),
    ]
