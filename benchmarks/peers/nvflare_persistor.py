"""A persistor for the benchmark model: N float32 zeros split into arrays of given sizes.

NVFlare's own ``NPModelPersistor`` holds one array, and ``FedAvg(model=dict)`` would write the
whole model into the job's JSON config; this one builds the dict of zero arrays at load time
and saves the global model as ``.npz`` after each round, as fedlift does. Standalone on purpose:
NVFlare copies it into the job's ``custom`` folder.
"""

import os

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import (
    ModelLearnable,
    ModelLearnableKey,
    make_model_learnable,
)
from nvflare.app_common.abstract.model_persistor import ModelPersistor


class ZerosPersistor(ModelPersistor):
    def __init__(self, sizes: list) -> None:
        super().__init__()
        self.sizes = sizes

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        weights = {f"layer{i}": np.zeros(n, np.float32) for i, n in enumerate(self.sizes)}
        return make_model_learnable(weights=weights, meta_props={})

    def save_model(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> None:
        root = fl_ctx.get_workspace().get_result_root(fl_ctx.get_job_id())
        folder = os.path.join(root, "models")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "global_model.npz")
        np.savez(path + ".tmp.npz", **model_learnable[ModelLearnableKey.WEIGHTS])
        os.replace(path + ".tmp.npz", path)
