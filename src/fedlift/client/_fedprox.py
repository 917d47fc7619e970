"""FedProx for Keras clients (Li et al., 2020, "Federated Optimization in Heterogeneous
Networks").

FedProx changes one thing on the client: each round's local objective becomes
``f(w) + mu/2 * ||w - w_g||^2``, with ``w_g`` the global model the round started from. The
proximal term keeps a client near the global model however long it trains, which is what
tames heterogeneous (non-IID) clients.

Every helper here adds that term to the *loss*, so its gradient ``mu * (w - w_g)`` is
taken at the same point as the data gradient and passes through whatever optimizer the
script uses (SGD, momentum, Adam): the local objective is exactly FedProx's, not an
approximation made after the optimizer's step.

* :class:`FedProxCallback` for ``model.fit`` (no recompile): the term is each trainable
  variable's regularizer, which Keras adds to the training loss.
* :class:`TFFedProxLoss` (NVFlare's class and arguments): wraps the loss given to
  ``model.compile``.
* :class:`FedProxLoss` for custom training loops: ``mu/2 * sum ||w - w_g||^2`` as a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from ..errors import ConfigError
from ._fedprox_mu import _check_mu, fedprox_mu, get_fedprox_mu
from ._keras_layout import all_slots, arrays_from_tree, layout

__all__ = ["FedProxCallback", "FedProxLoss", "TFFedProxLoss", "fedprox_mu", "get_fedprox_mu"]


def _squared_distance(weights: Sequence[Any], anchors: Sequence[Any], what: str) -> Any:
    if len(weights) != len(anchors):
        raise ConfigError(
            f"{what}: the model and global weights must pair up one to one. Received: "
            f"{len(weights)} model weights and {len(anchors)} global weights."
        )
    total: Any = None
    for w, g in zip(weights, anchors, strict=True):
        if tuple(w.shape) != tuple(g.shape):
            raise ConfigError(
                f"{what}: a model weight of shape {tuple(w.shape)} is paired with a global "
                f"weight of shape {tuple(g.shape)}. Pass both in the same order (e.g. "
                "model.trainable_variables and the global model's trainable_variables)."
            )
        diff = keras.ops.subtract(w, keras.ops.cast(g, w.dtype))
        term = keras.ops.cast(keras.ops.sum(keras.ops.square(diff)), "float32")
        total = term if total is None else keras.ops.add(total, term)
    return keras.ops.zeros((), "float32") if total is None else total


class FedProxLoss:
    """The proximal term ``mu/2 * sum ||w - w_g||^2`` for custom training loops.

    ``FedProxLoss(mu)(model.trainable_variables, global_weights)`` is a scalar tensor to add
    to the batch loss inside the ``GradientTape``; ``global_weights`` are arrays or tensors
    in the same order (e.g. copies of the trainable variables taken when the round's model
    was loaded). Being part of the loss, it is exact with any optimizer.
    """

    def __init__(self, mu: float) -> None:
        self.mu = _check_mu(mu, "FedProxLoss(mu)")

    def __call__(self, model_vars: Sequence[Any], global_vars: Sequence[Any]) -> Any:
        distance = _squared_distance(list(model_vars), list(global_vars), "FedProxLoss")
        return keras.ops.multiply(0.5 * self.mu, distance)


class _FunctionLoss(keras.losses.Loss):  # type: ignore[misc]
    """A per-sample loss function as a Loss (mean over the batch, sample weights applied)."""

    def __init__(self, fn: Any) -> None:
        super().__init__(name=getattr(fn, "__name__", "loss"))
        self._fn = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self._fn(y_true, y_pred)


class TFFedProxLoss(keras.losses.Loss):  # type: ignore[misc]
    """NVFlare's FedProx loss: ``loss_fun(y_true, y_pred) + mu/2 * ||local - global||^2``.

    ``local_model_weights``: the model's ``trainable_variables`` (read at every step, so the
    term's gradient reaches the optimizer with the data gradient); ``global_model_weights``:
    the round's global weights in the same order (arrays, or variables of a global copy of
    the model that the script updates each round); ``loss_fun``: the loss the script would
    compile with (a Keras loss, a loss function or its name). Compile with it::

        model.compile(optimizer, loss=TFFedProxLoss(model.trainable_variables, global_w, mu,
                                                    keras.losses.SparseCategoricalCrossentropy()))

    The base loss keeps its own reduction and sample weights; the term is added once per
    batch, so the training loss is FedProx's local objective. :class:`FedProxCallback`
    does the same without recompiling.
    """

    def __init__(
        self,
        local_model_weights: Sequence[Any],
        global_model_weights: Sequence[Any],
        mu: float,
        loss_fun: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "fedprox_loss")
        super().__init__(*args, **kwargs)
        self.local_model_weights = list(local_model_weights)
        self.global_model_weights = list(global_model_weights)
        self.mu = _check_mu(mu, "TFFedProxLoss(mu)")
        base = keras.losses.get(loss_fun) if isinstance(loss_fun, str) else loss_fun
        if not callable(base):
            raise ConfigError(
                "TFFedProxLoss(loss_fun) must be a Keras loss, a loss function or its name. "
                f"Received: {loss_fun!r:.60}."
            )
        self.loss_fun = base if isinstance(base, keras.losses.Loss) else _FunctionLoss(base)
        # Fails here, not in the first training step, when the two lists do not pair up.
        _squared_distance(self.local_model_weights, self.global_model_weights, "TFFedProxLoss")

    def proximal_term(self) -> Any:
        """``mu/2 * ||local - global||^2`` at the model's current weights."""
        distance = _squared_distance(
            self.local_model_weights, self.global_model_weights, "TFFedProxLoss"
        )
        return keras.ops.multiply(0.5 * self.mu, distance)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        base = self.loss_fun(y_true, y_pred)
        return keras.ops.add(base, keras.ops.cast(self.proximal_term(), base.dtype))

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        base = self.loss_fun(y_true, y_pred, sample_weight=sample_weight)
        return keras.ops.add(base, keras.ops.cast(self.proximal_term(), base.dtype))


class _ProxTerm:
    """A trainable variable's regularizer: its own one (if it had one) plus
    ``mu/2 * ||w - w_g||^2``. ``mu`` and ``w_g`` are variables, so a traced training step
    reads this round's values; ``mu`` is shared by all of a model's terms and is 0 outside
    training, so evaluation losses stay the data loss."""

    def __init__(self, base: Any, anchor: Any, mu: Any) -> None:
        self.base = base
        self.anchor = anchor
        self.mu = mu

    def __call__(self, x: Any) -> Any:
        diff = keras.ops.subtract(x, keras.ops.cast(self.anchor, x.dtype))
        term = keras.ops.multiply(
            keras.ops.cast(self.mu, x.dtype) * 0.5, keras.ops.sum(keras.ops.square(diff))
        )
        return term if self.base is None else keras.ops.add(self.base(x), term)


class FedProxCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """FedProx in ``model.fit``: ``callbacks=[FedProxCallback(fedprox_mu())]``.

    While ``fit`` trains, the loss is ``f(w) + mu/2 * ||w - w_g||^2`` over the trainable
    variables: the term is attached to each trainable variable as its regularizer (a
    regularizer the variable already had is kept and added), and Keras adds regularizers
    to the loss inside the training step. So every step's gradient is the gradient of the
    FedProx objective at the step's own weights, whatever the optimizer: with plain SGD
    (rate ``eta``) a step is ``w <- w - eta * (grad f(w) + mu * (w - w_g))``.

    ``global_weights``: ``w_g``, as ``input_model.params`` (layer name -> list of arrays)
    or a list as ``model.get_weights()``; default: the weights the model holds when ``fit``
    starts, i.e. the global model the script just loaded.

    What else to know: the ``loss`` that ``fit`` logs includes the term (it is the local
    objective); evaluation (``validation_data``, ``model.evaluate``) does not, as ``mu`` is
    set to 0 while the model is tested and after ``fit``. The first ``fit`` with the
    callback rebuilds the model's training function once (the regularizers must be in the
    traced step); later rounds reuse the same terms and only assign ``mu`` and ``w_g``.
    Tested with the TensorFlow backend, whose traced step reads the variables at every
    step; JAX is refused (its compiled step would freeze them as constants).
    """

    def __init__(self, mu: float, global_weights: Any = None) -> None:
        super().__init__()
        self.mu = _check_mu(mu, "FedProxCallback(mu)")
        self.global_weights = global_weights
        self._mu_vars: list[Any] = []
        self._training = False

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if keras.backend.backend() == "jax":
            raise ConfigError(
                "FedProxCallback needs a Keras backend that reads variables at every step "
                "(TensorFlow); JAX compiles the term's variables as constants. Received: "
                "backend=jax. "
                "Use FedProxLoss in a custom training loop instead."
            )
        model = self.model
        layers = layout(model)
        slots = [slot for slot in all_slots(layers) if slot.trainable]
        if self.global_weights is None:
            anchors = [np.asarray(slot.variable.numpy()) for slot in slots]
        else:
            every = arrays_from_tree(self.global_weights, layers, "FedProxCallback global_weights")
            by_slot = dict(zip((s.key for s in all_slots(layers)), every, strict=True))
            anchors = [by_slot[slot.key] for slot in slots]
        shared = next(
            (
                s.variable.regularizer.mu
                for s in slots
                if isinstance(s.variable.regularizer, _ProxTerm)
            ),
            None,
        )
        if shared is None:
            shared = keras.Variable(0.0, dtype="float32", trainable=False, name="fedprox_mu")
        installed = False
        mu_vars: dict[int, Any] = {}
        for slot, anchor in zip(slots, anchors, strict=True):
            variable = slot.variable
            term = variable.regularizer
            if not isinstance(term, _ProxTerm):
                anchor_var = keras.Variable(
                    anchor, dtype=variable.dtype, trainable=False, name="fedprox_global"
                )
                term = _ProxTerm(term, anchor_var, shared)
                variable.regularizer = term
                installed = True
            else:
                term.anchor.assign(anchor)
            mu_vars[id(term.mu)] = term.mu
        self._mu_vars = list(mu_vars.values())
        if installed:
            # fit() made its training function before this hook; it must be traced anew to
            # contain the terms. It reads self.train_function at every step.
            model.make_train_function(force=True)
        self._training = True
        self._set_mu(self.mu)

    def _set_mu(self, value: float) -> None:
        for variable in self._mu_vars:
            variable.assign(value)

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._set_mu(0.0)

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._training:
            self._set_mu(self.mu)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._training = False
        self._set_mu(0.0)
