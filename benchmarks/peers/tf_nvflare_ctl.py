"""NVFlare's ``FedAvg`` plus a final evaluation, as fedlift's ``final_evaluation=True``.

After the rounds, every client evaluates the final global model (task ``validate``, which
the Client API script sees as ``flare.is_evaluate()``); the mean accuracy is logged. The
rounds themselves are NVFlare's ``FedAvg`` unchanged. Standalone on purpose: NVFlare copies
it into the job's ``custom`` folder.
"""

from __future__ import annotations

from typing import Any

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.fedavg import FedAvg


class FedAvgFinalEval(FedAvg):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._final: FLModel | None = None

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        self._final = super().update_model(model, aggr_result)
        return self._final

    def run(self) -> None:
        super().run()
        if self._final is None or self.abort_signal.triggered:
            return
        results = self.send_model_and_wait(task_name="validate", data=self._final)
        accuracies = [r.metrics["accuracy"] for r in results if r.metrics]
        if accuracies:
            self.info(f"final accuracy: {sum(accuracies) / len(accuracies):.4f}")
