"""FedProx for PyTorch clients (Li et al., 2020, "Federated Optimization in Heterogeneous
Networks"): the proximal term ``mu/2 * ||w - w_g||^2`` as a loss to add to the script's.

Adding it to the loss (rather than nudging the weights after the optimizer's step) makes
its gradient ``mu * (w - w_g)`` pass through whatever optimizer the script uses, so the
local objective is exactly FedProx's. NVFlare's class and call are kept::

    criterion_prox = PTFedProxLoss(mu=fedprox_mu())
    global_model = copy.deepcopy(model)              # after loading the received params
    loss = criterion(model(x), y) + criterion_prox(model, global_model)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError
from ._fedprox_mu import _check_mu

__all__ = ["PTFedProxLoss"]


class PTFedProxLoss(torch.nn.Module):
    """``mu/2 * sum over the model's parameters of ||w - w_g||^2`` (NVFlare's
    ``PTFedProxLoss(mu)``; call it as ``criterion_prox(model, global_model)``).

    ``global_model`` is the model as received this round: an ``nn.Module`` (e.g. a deep
    copy made right after ``load_state_dict``) or a mapping of parameter name to tensor
    (``input_model.params``). Its values are constants (no gradient flows into them). Every
    parameter of ``model`` must have a global value of the same shape: a missing one would
    silently drop part of the term. The sum runs in float32 or wider, so a float16 or
    bfloat16 model does not round the term away.
    """

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        self.mu = _check_mu(mu, "PTFedProxLoss(mu)")

    def forward(self, input: torch.nn.Module, target: Any) -> torch.Tensor:
        anchors = _anchors(target)
        total: torch.Tensor | None = None
        for name, weight in input.named_parameters():
            anchor = anchors.get(name)
            if anchor is None:
                raise ConfigError(
                    f"PTFedProxLoss: the global model has no parameter {name!r}, which the "
                    "model has; pass the global model as received this round (a deep copy "
                    f"of the model, or input_model.params). Received: global keys="
                    f"{sorted(anchors)[:10]}."
                )
            if tuple(anchor.shape) != tuple(weight.shape):
                raise ConfigError(
                    f"PTFedProxLoss: parameter {name!r} has shape {tuple(weight.shape)} in the "
                    f"model but {tuple(anchor.shape)} in the global model. Received: "
                    f"{name}.shape={tuple(anchor.shape)}."
                )
            ref = anchor.detach().to(device=weight.device, dtype=weight.dtype)
            wide = torch.promote_types(weight.dtype, torch.float32)
            term = torch.sum(torch.square(weight - ref), dtype=wide)
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total * (self.mu / 2.0)


def _anchors(target: Any) -> dict[str, torch.Tensor]:
    """The global model's parameters by name (a module's, or a mapping's tensors)."""
    if isinstance(target, torch.nn.Module):
        return dict(target.named_parameters())
    if isinstance(target, Mapping):
        out = {}
        for key, value in target.items():
            out[str(key)] = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        return out
    raise ConfigError(
        "PTFedProxLoss(model, global_model): global_model must be the global nn.Module (e.g. "
        "copy.deepcopy(model) right after loading the received params) or a mapping of "
        f"parameter name to tensor. Received: {type(target).__name__}."
    )
