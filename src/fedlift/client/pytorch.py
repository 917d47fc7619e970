"""PyTorch helpers for the client side of FedProx and SCAFFOLD (NVFlare's names).

``import fedlift.client.pytorch`` imports torch (``import fedlift.client`` does not)::

    from fedlift.client.pytorch import PTFedProxLoss, PTScaffoldHelper, get_fedprox_mu

    # FedProx: mu comes with each task from the server's FedProx strategy
    criterion_prox = PTFedProxLoss(mu=get_fedprox_mu())
    loss = criterion(model(x), y) + criterion_prox(model, global_model)

    # SCAFFOLD: one helper for the whole job (see PTScaffoldHelper)
    helper = PTScaffoldHelper()
    helper.init(model)

What NVFlare's ``nvflare.app_opt.pt.fedproxloss`` and ``nvflare.app_opt.pt.scaffold``
provide is here under the same names: ``PTFedProxLoss``, ``PTScaffoldHelper``,
``get_lr_values``.
"""

from ._fedprox_mu import fedprox_mu, get_fedprox_mu
from ._pt_fedprox import PTFedProxLoss
from ._pt_scaffold import PTScaffoldHelper, get_lr_values

__all__ = [
    "PTFedProxLoss",
    "PTScaffoldHelper",
    "fedprox_mu",
    "get_fedprox_mu",
    "get_lr_values",
]
