"""A strategy of the user's own, in the job's app folder: FedAvg that halves every step."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedlift.server import Aggregate, FedAvg


@dataclass
class HalfStep(FedAvg):
    name: ClassVar[str] = "halfstep"
    factor: float = 0.5

    def update(self, round_number, params, aggregate: Aggregate):  # type: ignore[no-untyped-def]
        x = np.asarray(params["w"], np.float64)
        mean = np.asarray(aggregate.params["w"], np.float64)
        return {"w": (x + self.factor * (mean - x)).astype(np.float32)}
