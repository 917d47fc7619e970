"""PyTorch Lightning: ``import fedlift.client.lightning as flare`` (NVFlare's
``nvflare.client.lightning``): the whole Client API, plus :func:`patch`::

    import fedlift.client.lightning as flare

    trainer = Trainer(max_epochs=1)
    flare.patch(trainer)                     # the trainer receives and sends by itself
    while flare.is_running():
        input_model = flare.receive()        # the round's global model (loaded by the patch)
        trainer.validate(model, datamodule=dm)   # the global model's metrics go back too
        trainer.fit(model, datamodule=dm)        # then the trained state_dict, by steps

Importing this module does not import Lightning: :func:`patch` takes it from the trainer's
own package (``lightning`` or ``pytorch_lightning``). Run such scripts with
``ScriptRunner(framework="pytorch")``, so that the global model arrives as tensors.
"""

from . import *  # noqa: F403  (the Client API, re-exported as NVFlare's module does)
from . import __all__ as _client_api
from ._lightning import FL_META_KEY, patch

__all__ = [*_client_api, "FL_META_KEY", "patch"]
