"""What ``FedAvgJob.simulator_run`` needs from the simulator, which sits above the job API.

The job API may not import the simulator (it is the layer below it), so it states what it
calls and gets back as protocols, and gets the simulator late (:mod:`fedlift._late`): the
top package provides ``fedlift.simulator.run_simulator``. Its ``SimulationResult`` has
exactly the members of :class:`SimulationOutcome` (a test compares them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .._late import load
from ..model import ParamTree
from ..server import RoundRecord

__all__ = ["SimulationOutcome", "simulate"]


class SimulationOutcome(Protocol):
    """What a finished simulation produced (``fedlift.simulator.SimulationResult``)."""

    @property
    def job_id(self) -> str: ...
    @property
    def workspace(self) -> Path: ...
    @property
    def rounds(self) -> list[RoundRecord]: ...
    @property
    def final_metrics(self) -> dict[str, float]: ...
    @property
    def best_round(self) -> int | None: ...
    @property
    def best_value(self) -> float | None: ...
    @property
    def global_model(self) -> Path: ...
    @property
    def best_model(self) -> Path | None: ...
    @property
    def params(self) -> ParamTree: ...
    @property
    def seconds(self) -> float: ...


def simulate(
    job_dir: Path,
    workspace: str | Path,
    *,
    n_clients: int | None,
    threads: int | None,
    gpu: str | None,
) -> SimulationOutcome:
    """Run the exported job ``job_dir`` in the simulator (``run_simulator``'s arguments)."""
    run = load("run_simulator")
    result: SimulationOutcome = run(
        job_dir, workspace, n_clients=n_clients, threads=threads, gpu=gpu
    )
    return result
