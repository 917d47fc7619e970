"""Keras helpers for the client side of FedProx and SCAFFOLD.

``import fedlift.client.keras`` imports Keras (``import fedlift.client`` does not)::

    from fedlift.client.keras import FedProxCallback, TFScaffoldHelper, fedprox_mu

    # FedProx: mu comes with each task from the server's FedProx strategy
    model.fit(x, y, callbacks=[FedProxCallback(fedprox_mu())])

    # SCAFFOLD: one helper for the whole job
    helper = TFScaffoldHelper()
    ...after receive(): helper.load_global_controls(input_model.meta)
    model.fit(x, y, callbacks=[helper.callback()])
    flare.send(flare.FLModel(params=..., meta={**helper.result_meta(), ...}))

NVFlare's names are here too: ``TFFedProxLoss``, ``TFScaffoldHelper``, ``ScaffoldCallback``,
``get_fedprox_mu``.
"""

from ._fedprox import FedProxCallback, FedProxLoss, TFFedProxLoss, fedprox_mu, get_fedprox_mu
from ._scaffold import ScaffoldCallback, TFScaffoldHelper

__all__ = [
    "FedProxCallback",
    "FedProxLoss",
    "ScaffoldCallback",
    "TFFedProxLoss",
    "TFScaffoldHelper",
    "fedprox_mu",
    "get_fedprox_mu",
]
