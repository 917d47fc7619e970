"""SCAFFOLD for Keras clients (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning"), with the paper's option II for the client's control
variate.

Clients that see different data drift apart during local training. SCAFFOLD corrects
every local step by the difference between the server's control variate ``c`` (an
estimate of the global gradient direction) and the client's own ``c_i`` (its local
direction): ``y <- y - eta * (g(y) - c_i + c)``. After the round's ``K`` steps the client
estimates its new direction from how far it moved,
``c_i+ = c_i - c + (x - y) / (K * eta)`` (``x``: the global model received), and sends
``delta c_i = c_i+ - c_i`` for the server to fold into ``c``.

Here :class:`TFScaffoldHelper` keeps ``c_i`` across rounds (zeros at first) and does the
arithmetic; its :class:`ScaffoldCallback` applies the correction in ``model.fit``. The
trees are laid out as the model's params (layer name -> list of arrays).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from ..errors import ConfigError
from ..model import AlgorithmConstants
from ._keras_layout import Layer, all_slots, arrays_from_tree, layout, read_values, tree_from_arrays

__all__ = ["ScaffoldCallback", "TFScaffoldHelper"]

_GLOBAL = AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL
_DIFF = AlgorithmConstants.SCAFFOLD_CTRL_DIFF


def _is_tree_of_arrays(node: Any, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if isinstance(node, Mapping):
        return all(_is_tree_of_arrays(v, depth + 1) for v in node.values())
    if isinstance(node, list | tuple):
        return all(_is_tree_of_arrays(v, depth + 1) for v in node)
    return isinstance(node, np.ndarray) or hasattr(node, "__array__")


def _layout_key(layers: list[Layer]) -> list[tuple[str, tuple[tuple[int, ...], ...]]]:
    return [(layer.name, tuple(slot.shape for slot in layer.slots)) for layer in layers]


class TFScaffoldHelper:
    """A client's SCAFFOLD state and arithmetic; one object for the whole job.

    In the script's loop::

        helper = TFScaffoldHelper()
        while flare.is_running():
            input_model = flare.receive()
            ...load input_model.params into model...
            helper.load_global_controls(input_model.meta)     # c, and a new round
            model.fit(..., callbacks=[helper.callback()])     # corrected steps, then c_i+
            flare.send(flare.FLModel(params=..., meta={**helper.result_meta(), ...}))

    A round runs from :meth:`load_global_controls` to the next one; it may hold several
    ``fit`` calls (their steps add up). ``x`` is what the model holds when the round's
    first ``fit`` starts. ``c_i`` becomes ``c_i+`` when the next round's controls are
    loaded, if this round's delta was taken (:meth:`result_meta` or
    :meth:`get_delta_controls`): the client's ``c_i`` and the server's ``c`` move
    together. Only trainable weights are corrected; for weights the optimizer does not
    update (frozen layers, BatchNorm statistics) ``c_i`` stays 0 and ``delta c_i`` is 0.

    With a learning-rate schedule ``K * eta`` is the sum of the rates of the round's steps.
    NVFlare's method names work too: :meth:`init`, :meth:`get_params`,
    :meth:`terms_update` (a no-op once the callback has done it),
    :meth:`get_delta_controls`.
    """

    def __init__(self) -> None:
        self._layers: list[Layer] | None = None
        self._raw_global: Any = None
        self._c_global: list[np.ndarray] | None = None
        self._c_local: list[np.ndarray] | None = None
        self._c_local_next: list[np.ndarray] | None = None
        self._delta: list[np.ndarray] | None = None
        self._x: list[np.ndarray] | None = None
        self._steps = 0
        self._rate_sum = 0.0
        self._reported = False
        self._round: Any = None  # the round of the controls loaded last (from the meta)

    # ------------------------------------------------------------------ the script's calls
    def init(self, model: Any) -> None:
        """Bind the model whose weights the controls follow (else: the first ``fit``'s)."""
        self._bind(model)

    def load_global_controls(self, meta_or_controls: Any) -> None:
        """Take the server's ``c`` for a new round: the task's meta (``input_model.meta``,
        holding ``"scaffold_c_global"``) or that tree itself, as NVFlare's call takes it."""
        raw = meta_or_controls
        if isinstance(raw, Mapping) and _GLOBAL in raw:
            raw = raw[_GLOBAL]
        empty = isinstance(raw, Mapping | list | tuple) and not raw
        if raw is None or empty or not _is_tree_of_arrays(raw):
            what = list(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
            raise ConfigError(
                f"load_global_controls() takes the task's meta, which holds the server's "
                f"control variate under {_GLOBAL!r}, or that param tree. Received: {what}. "
                "Is the server running SCAFFOLD?"
            )
        parsed = None if self._layers is None else self._parse(raw)  # fails before any change
        round_number = (
            meta_or_controls.get("current_round") if isinstance(meta_or_controls, Mapping) else None
        )
        again = round_number is not None and round_number == self._round
        if self._c_local_next is not None and self._reported and not again:
            # c_i moves on only once its delta was taken for the server -- and not when the
            # same round comes again (the server restarted and runs it anew: its c is the
            # one from before that round, so c_i must be too).
            self._c_local = self._c_local_next
        self._c_local_next = None
        self._round = round_number
        self._raw_global = raw
        self._c_global = parsed
        self._delta = None
        self._x = None
        self._steps = 0
        self._rate_sum = 0.0
        self._reported = False

    def callback(self, model: Any = None) -> ScaffoldCallback:
        """A :class:`ScaffoldCallback` for ``model.fit`` (``model``: optional, binds it now)."""
        if model is not None:
            self._bind(model)
        return ScaffoldCallback(self)

    def get_params(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(c, c_i)`` as trees with the model's layout (copies)."""
        layers = self._need_layers("get_params()")
        c_global = self._c_global if self._c_global is not None else self._parse_global()
        c_local = self._local()
        return tree_from_arrays(layers, [a.copy() for a in c_global]), tree_from_arrays(
            layers, [a.copy() for a in c_local]
        )

    def get_delta_controls(self) -> dict[str, Any]:
        """``delta c_i`` of this round (the model's layout), to send in
        ``meta["scaffold_c_diff"]``."""
        if self._delta is None or self._layers is None:
            raise ConfigError(
                "get_delta_controls() has no delta c_i for this round: no training step ran "
                "since load_global_controls(). Call model.fit(..., callbacks=[helper."
                "callback()]) first. Received: steps=0."
            )
        self._reported = True
        return tree_from_arrays(self._layers, [a.copy() for a in self._delta])

    def result_meta(self) -> dict[str, Any]:
        """``{"scaffold_c_diff": delta c_i}``, the meta a SCAFFOLD server expects."""
        return {_DIFF: self.get_delta_controls()}

    def terms_update(self, *args: Any, **kwargs: Any) -> None:
        """NVFlare's explicit end-of-round call; the callback already computed ``c_i+`` at
        the end of ``fit``, so this only checks that it did."""
        if self._delta is None:
            raise ConfigError(
                "terms_update(): no training step ran with ScaffoldCallback this round, so "
                "there is no c_i+ to compute. Pass callbacks=[helper.callback()] to fit. "
                "Received: steps=0."
            )

    # ------------------------------------------------------------------ the callback's calls
    def _begin(self, model: Any) -> None:
        self._bind(model)
        if self._raw_global is None:
            raise ConfigError(
                "ScaffoldCallback: no server control variate for this round. Call "
                "helper.load_global_controls(input_model.meta) after flare.receive() and "
                "before fit(). Received: none loaded."
            )
        if self._reported:
            raise ConfigError(
                "ScaffoldCallback: this round's delta c_i was already taken "
                "(result_meta()/get_delta_controls()). Load the next round's controls with "
                "helper.load_global_controls(input_model.meta) before training again."
            )
        if self._c_global is None:
            self._c_global = self._parse_global()
        if self._x is None:
            self._x = read_values(all_slots(self._need_layers("fit")))

    def _corrections(self) -> list[tuple[Any, Any]]:
        """``(variable, c - c_i)`` for every trainable weight whose correction is not 0."""
        layers = self._need_layers("fit")
        c_global = self._c_global if self._c_global is not None else self._parse_global()
        c_local = self._local()
        out = []
        for slot, c, ci in zip(all_slots(layers), c_global, c_local, strict=True):
            if slot.trainable:
                d = c - ci
                if np.any(d):
                    out.append((slot.variable, keras.ops.convert_to_tensor(d)))
        return out

    def _step(self, rate: float) -> None:
        self._steps += 1
        self._rate_sum += rate

    def _end(self) -> None:
        """``c_i+`` and ``delta c_i`` from the round's steps so far."""
        if self._steps == 0 or self._x is None or self._c_global is None:
            return
        if not (math.isfinite(self._rate_sum) and self._rate_sum > 0):
            raise ConfigError(
                "SCAFFOLD needs a positive learning rate to compute c_i+ = c_i - c + (x - y) "
                f"/ (K * eta). Received: K={self._steps}, sum of eta={self._rate_sum}."
            )
        slots = all_slots(self._need_layers("fit"))
        y = read_values(slots)
        c_local = self._local()
        next_local, delta = [], []
        for slot, x, yy, c, ci in zip(slots, self._x, y, self._c_global, c_local, strict=True):
            if slot.trainable:
                step = (x.astype(np.float64) - yy.astype(np.float64)) / self._rate_sum
                new = (ci.astype(np.float64) - c.astype(np.float64) + step).astype(ci.dtype)
            else:
                new = ci.copy()
            next_local.append(new)
            delta.append((new.astype(np.float64) - ci.astype(np.float64)).astype(ci.dtype))
        self._c_local_next, self._delta = next_local, delta

    # ------------------------------------------------------------------ state
    def _bind(self, model: Any) -> None:
        layers = layout(model)
        if self._layers is not None and _layout_key(layers) != _layout_key(self._layers):
            raise ConfigError(
                "TFScaffoldHelper follows one model for the whole job; this model's layers "
                "or weight shapes differ from the first one's. Received: layers="
                f"{[layer.name for layer in layers][:10]}."
            )
        if self._layers is None and self._raw_global is not None:
            self._layers = layers
            self._c_global = self._parse_global()
        self._layers = layers

    def _need_layers(self, call: str) -> list[Layer]:
        if self._layers is None:
            raise ConfigError(
                f"TFScaffoldHelper.{call} needs the model: call helper.init(model) or train "
                "once with helper.callback(). Received: no model yet."
            )
        return self._layers

    def _parse_global(self) -> list[np.ndarray]:
        if self._raw_global is None:
            raise ConfigError(
                "TFScaffoldHelper has no server control variate yet: call "
                "helper.load_global_controls(input_model.meta). Received: none loaded."
            )
        return self._parse(self._raw_global)

    def _parse(self, raw: Any) -> list[np.ndarray]:
        """The server's ``c`` as one array per weight, checked against the model."""
        layers = self._need_layers("load_global_controls()")
        arrays = arrays_from_tree(raw, layers, f"meta[{_GLOBAL!r}]")
        for slot, array in zip(all_slots(layers), arrays, strict=True):
            if not np.all(np.isfinite(array)):
                raise ConfigError(
                    f"meta[{_GLOBAL!r}] at {slot.key!r} holds NaN or Inf; the server's "
                    "control variate must be finite. Received: non-finite values."
                )
        return arrays

    def _local(self) -> list[np.ndarray]:
        if self._c_local is None:
            slots = all_slots(self._need_layers("fit"))
            self._c_local = [np.zeros(slot.shape, slot.dtype) for slot in slots]
        return self._c_local


class ScaffoldCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """SCAFFOLD's corrected steps in ``model.fit`` (``ScaffoldCallback(helper)``, as
    NVFlare's, or ``helper.callback()``).

    After each optimizer step it moves every trainable weight by ``-eta * (c - c_i)``, with
    ``eta`` the rate the optimizer used for that step. With plain SGD that is exactly
    SCAFFOLD's step ``y <- y - eta * (g(y) - c_i + c)``: the correction does not depend on
    ``y``, so applying it after the data step changes nothing. With momentum or adaptive
    optimizers the data gradient goes through the optimizer and the correction is added
    beside it as a plain SGD step (as NVFlare does); option II's ``c_i+`` then estimates the
    optimizer's mean step direction rather than a mean gradient. At the end of ``fit`` the
    helper computes ``c_i+`` and ``delta c_i``.

    ``steps_per_execution`` must be 1: the correction runs between steps.
    """

    def __init__(self, scaffold_helper: TFScaffoldHelper) -> None:
        super().__init__()
        if not isinstance(scaffold_helper, TFScaffoldHelper):
            raise ConfigError(
                "ScaffoldCallback takes the script's TFScaffoldHelper. Received: "
                f"{type(scaffold_helper).__name__}."
            )
        self.scaffold_helper = scaffold_helper
        self._corrections: list[tuple[Any, Any]] = []
        self._rate = 0.0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        per_execution = getattr(model, "steps_per_execution", 1)
        if isinstance(per_execution, int) and per_execution != 1:
            raise ConfigError(
                "ScaffoldCallback corrects the weights between training steps, so the model "
                "must run one step per execution. Received: steps_per_execution="
                f"{per_execution}; compile with steps_per_execution=1."
            )
        self.scaffold_helper._begin(model)
        self._corrections = self.scaffold_helper._corrections()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # The rate of the step about to run (a schedule has moved on by the batch's end).
        rate = self.model.optimizer.learning_rate  # a variable, or a schedule's tensor
        self._rate = float(rate.numpy() if hasattr(rate, "numpy") else rate)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        for variable, d in self._corrections:
            variable.assign_sub(keras.ops.multiply(keras.ops.cast(d, variable.dtype), self._rate))
        self.scaffold_helper._step(self._rate)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.scaffold_helper._end()
