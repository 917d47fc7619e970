"""SCAFFOLD for PyTorch clients (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning"), option II for the client's control variate, with
NVFlare's ``PTScaffoldHelper`` method names and arguments.

Each local step is corrected by ``c - c_i`` (the server's control variate minus the
client's): after the optimizer's step, ``model_update`` moves every trainable parameter by
``-lr * (c - c_i)``. At the end of the round ``terms_update`` estimates the client's new
direction from how far it moved, ``c_i+ = c_i - c + (x - y) / (K * lr)`` (``x``: the
global model received, ``y``: the trained one), and keeps ``delta c_i = c_i+ - c_i`` for
the server (``meta["scaffold_c_diff"]``), which folds the mean of them into ``c``.

The controls are laid out as the model's ``state_dict()`` (every key, in its order), as
the server's ``c`` is: keys that are no trainable parameter (BatchNorm statistics,
``num_batches_tracked``, frozen weights) are never corrected, and their ``delta c_i`` is 0.
They are kept on the CPU in float32 (float64 for float64 parameters); the correction is
made once per round on the parameters' device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..model import AlgorithmConstants, arrays_to_tensors, tensor_to_numpy

__all__ = ["PTScaffoldHelper", "get_lr_values"]

_GLOBAL = AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL
_DIFF = AlgorithmConstants.SCAFFOLD_CTRL_DIFF

Controls = dict[str, torch.Tensor]


def get_lr_values(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each of ``optimizer``'s parameter groups (NVFlare's helper):
    ``get_lr_values(optimizer)[0]`` is the ``curr_lr`` of ``model_update``."""
    return [float(group["lr"]) for group in optimizer.param_groups]


def _control_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class PTScaffoldHelper:
    """A PyTorch client's SCAFFOLD state and arithmetic; one object for the whole job.

    In the script (NVFlare's calls)::

        helper = PTScaffoldHelper()
        helper.init(model)
        while flare.is_running():
            input_model = flare.receive()
            model.load_state_dict(input_model.params)
            global_model = copy.deepcopy(model)
            helper.load_global_controls(input_model.meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL])
            c_global_para, c_local_para = helper.get_params()
            for x, y in batches:
                ...loss.backward(); optimizer.step()
                curr_lr = get_lr_values(optimizer)[0]
                helper.model_update(model, curr_lr, c_global_para, c_local_para)
            helper.terms_update(model, curr_lr, c_global_para, c_local_para, global_model)
            flare.send(flare.FLModel(params=model.state_dict(), meta={
                AlgorithmConstants.SCAFFOLD_CTRL_DIFF: helper.get_delta_controls(), ...}))

    ``get_params()`` starts the round's count of steps. ``K * lr`` in ``c_i+`` is the sum
    of the rates ``model_update`` was given this round (``K * curr_lr`` for a constant
    rate, and the right sum for a schedule); ``terms_update``'s own ``curr_lr`` is taken
    for NVFlare's signature only. ``c_i`` becomes ``c_i+`` in ``terms_update``.
    """

    def __init__(self) -> None:
        self.cnt = 0
        self.c_global: Controls | None = None
        self.c_local: Controls | None = None
        self.c_delta_para: dict[str, np.ndarray] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._trainable: set[str] = set()
        self._rate_sum = 0.0
        self._correction: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self._correction_of: tuple[int, int] | None = None

    # ------------------------------------------------------------------ NVFlare's calls
    def init(self, model: torch.nn.Module) -> None:
        """Bind the model whose ``state_dict()`` the controls follow; ``c = c_i = 0``."""
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"PTScaffoldHelper.init() takes the script's torch.nn.Module. Received: "
                f"{type(model).__name__}."
            )
        state = model.state_dict()
        if not state:
            raise ConfigError(
                "PTScaffoldHelper.init(): the model's state_dict() is empty; there is "
                f"nothing to correct. Received: {type(model).__name__} with 0 entries."
            )
        self._shapes = {key: tuple(value.shape) for key, value in state.items()}
        self._dtypes = {
            key: _control_dtype(value.dtype) if value.is_floating_point() else torch.float32
            for key, value in state.items()
        }
        self._trainable = {
            name for name, p in model.named_parameters() if p.requires_grad and name in state
        }
        self.c_global = self._zeros()
        self.c_local = self._zeros()
        self.c_delta_para = None
        self._reset_round()

    def load_global_controls(self, weights: Any) -> None:
        """Take the server's ``c`` for this round: ``input_model.meta[
        "scaffold_c_global"]`` (a mapping of state_dict key to array or tensor), or the
        task's whole meta holding it."""
        raw = weights
        if isinstance(raw, Mapping) and _GLOBAL in raw:
            raw = raw[_GLOBAL]
        self._require_init("load_global_controls()")
        if not isinstance(raw, Mapping) or not raw:
            raise ConfigError(
                f"load_global_controls() takes the server's control variate (the task's "
                f"meta[{_GLOBAL!r}], a mapping of state_dict key to array), or the meta "
                f"holding it. Received: {type(raw).__name__}. Is the server running SCAFFOLD?"
            )
        missing = [key for key in self._shapes if key not in raw]
        extra = [str(key) for key in raw if key not in self._shapes]
        if missing or extra:
            hint = " Is the server running SCAFFOLD?" if len(missing) == len(self._shapes) else ""
            raise ConfigError(
                f"meta[{_GLOBAL!r}] does not follow the model's state_dict(): missing "
                f"{missing[:5] or 'none'}, unexpected {extra[:5] or 'none'}.{hint} Received: "
                f"{len(raw)} keys for {len(self._shapes)} in the model."
            )
        controls: Controls = {}
        for key, shape in self._shapes.items():
            value = raw[key]
            tensor = value if isinstance(value, torch.Tensor) else arrays_to_tensors(value)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(value)
                raise ConfigError(
                    f"meta[{_GLOBAL!r}][{key!r}] must be an array of the parameter's shape "
                    f"{shape}. Received: {got}."
                )
            tensor = tensor.detach().to("cpu", self._dtypes[key]).clone()
            if not bool(torch.isfinite(tensor).all()):
                raise ConfigError(
                    f"meta[{_GLOBAL!r}][{key!r}] holds NaN or Inf; the server's control "
                    "variate must be finite. Received: non-finite values."
                )
            controls[key] = tensor
        self.c_global = controls
        self._correction.clear()
        self._correction_of = None

    def get_params(self) -> tuple[Controls, Controls]:
        """``(c, c_i)`` by state_dict key (CPU tensors), for ``model_update`` and
        ``terms_update``; starts the round's count of steps."""
        c_global, c_local = self._require_init("get_params()")
        self._reset_round()
        return dict(c_global), dict(c_local)

    def model_update(
        self,
        model: torch.nn.Module,
        curr_lr: float,
        c_global_para: Mapping[str, torch.Tensor],
        c_local_para: Mapping[str, torch.Tensor],
    ) -> None:
        """After an optimizer step: every trainable parameter ``w -= curr_lr * (c - c_i)``."""
        self._require_init("model_update()")
        rate = _rate(curr_lr, "model_update(curr_lr=...)")
        marker = (id(c_global_para), id(c_local_para))
        if marker != self._correction_of:
            self._correction.clear()
            self._correction_of = marker
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if name not in self._trainable:
                    continue
                slot = (name, weight.device, weight.dtype)
                d = self._correction.get(slot)
                if d is None:
                    d = (_control(c_global_para, name) - _control(c_local_para, name)).to(
                        device=weight.device, dtype=weight.dtype
                    )
                    self._correction[slot] = d
                weight.sub_(d, alpha=rate)
        self.cnt += 1
        self._rate_sum += rate

    def terms_update(
        self,
        model: torch.nn.Module,
        curr_lr: float,
        c_global_para: Mapping[str, torch.Tensor],
        c_local_para: Mapping[str, torch.Tensor],
        model_global: Any,
    ) -> None:
        """End of the round: ``c_i+ = c_i - c + (x - y) / (K * lr)`` for every trainable
        parameter (``x``: ``model_global``, the model as received, an ``nn.Module`` or a
        mapping such as ``input_model.params``; ``y``: ``model``), and ``delta c_i``."""
        self._require_init("terms_update()")
        _rate(curr_lr, "terms_update(curr_lr=...)")
        if self.cnt == 0 or not (math.isfinite(self._rate_sum) and self._rate_sum > 0):
            raise ConfigError(
                "terms_update(): no corrected step ran this round, so c_i+ = c_i - c + "
                "(x - y) / (K * lr) cannot be computed. Call helper.model_update(...) after "
                f"each optimizer step. Received: K={self.cnt}, sum of lr={self._rate_sum}."
            )
        x = _state_of(model_global, "model_global")
        y = model.state_dict()
        new_local: Controls = {}
        delta: dict[str, np.ndarray] = {}
        for key, dtype in self._dtypes.items():
            ci = _control(c_local_para, key).to("cpu", torch.float64)
            if key in self._trainable:
                moved = _host(_value(x, key, "model_global")) - _host(_value(y, key, "model"))
                new = ci - _control(c_global_para, key).to("cpu", torch.float64)
                new = new + moved / self._rate_sum
            else:
                new = ci
            new_local[key] = new.to(dtype)
            delta[key] = tensor_to_numpy((new - ci).to(dtype))
        self.c_local = new_local
        self.c_delta_para = delta

    def get_delta_controls(self) -> dict[str, np.ndarray]:
        """``delta c_i`` of the round (numpy arrays by state_dict key), to send in
        ``meta["scaffold_c_diff"]``."""
        if self.c_delta_para is None:
            raise ConfigError(
                "get_delta_controls(): no delta c_i yet; call helper.terms_update(...) at the "
                "end of the round's training first. Received: none computed."
            )
        return dict(self.c_delta_para)

    def result_meta(self) -> dict[str, Any]:
        """``{"scaffold_c_diff": delta c_i}``, the meta a SCAFFOLD server expects."""
        return {_DIFF: self.get_delta_controls()}

    # ------------------------------------------------------------------ state
    def _zeros(self) -> Controls:
        return {key: torch.zeros(self._shapes[key], dtype=dt) for key, dt in self._dtypes.items()}

    def _reset_round(self) -> None:
        self.cnt = 0
        self._rate_sum = 0.0
        self._correction.clear()
        self._correction_of = None

    def _require_init(self, call: str) -> tuple[Controls, Controls]:
        if self.c_global is None or self.c_local is None:
            raise ConfigError(
                f"PTScaffoldHelper.{call} needs the model first: call helper.init(model) once "
                "before the training loop. Received: no model bound."
            )
        return self.c_global, self.c_local


def _rate(value: Any, what: str) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if not math.isfinite(rate) or rate < 0:
        raise ConfigError(
            f"{what} is the learning rate of the step and must be a finite number >= 0. "
            f"Received: curr_lr={value!r:.60}."
        )
    return rate


def _control(controls: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    value = controls.get(key) if isinstance(controls, Mapping) else None
    if not isinstance(value, torch.Tensor):
        raise ConfigError(
            f"the controls passed have no tensor for {key!r}: pass the (c_global_para, "
            "c_local_para) that helper.get_params() returned this round. Received: "
            f"{type(value).__name__}."
        )
    return value


def _state_of(model: Any, what: str) -> Mapping[str, Any]:
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise ConfigError(
        f"terms_update({what}=...) is the model as received this round: an nn.Module (e.g. "
        "copy.deepcopy(model) right after load_state_dict) or a mapping of state_dict key "
        f"to tensor (input_model.params). Received: {type(model).__name__}."
    )


def _value(state: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in state:
        raise ConfigError(
            f"terms_update(): {what} has no {key!r}, which the model bound by init() has. "
            f"Received: keys={list(state)[:10]}."
        )
    return state[key]


def _host(value: Any) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else arrays_to_tensors(np.asarray(value))
    return tensor.detach().to("cpu", torch.float64)
