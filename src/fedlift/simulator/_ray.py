"""Clients as Ray tasks: :func:`~fedlift.simulator.run_local` with ``backend="ray"``.

Ray is optional (``pip install 'fedlift[ray]'``) and imported only here, when a run asks
for it. Each task's model goes into Ray's object store once (``ray.put``); every client call
is one Ray task that receives it (zero-copy and read-only on each node) and returns its
FLModel. At most ``2 * workers`` calls are in flight, and results are folded as
``ray.wait`` reports them, so the driver's memory does not grow with the client count.

Connection: ``address`` (or ``$RAY_ADDRESS``) joins a running cluster, e.g.
``"ray://head:10001"`` or ``"auto"``; without one a local Ray instance is started for the
run and shut down after it. A Ray session the caller already started (``ray.init(...)``
with its own ``runtime_env``) is used as it is and left running.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from ..errors import ConfigError
from ._local import ClientFn, Outcome, TaskSpec, call_clients

__all__ = ["RayPool", "import_ray"]

log = logging.getLogger("fedlift.simulator")

_MAX_BATCH = 16  # clients per Ray task: spreads Ray's per-task cost
_BATCH_BYTES = 64 << 20  # ... while a task's results stay this small


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError that says how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigError(
            "backend='ray' needs Ray, which is not installed: pip install 'fedlift[ray]' "
            f"(or pip install 'ray>=2.9'). Import error: {exc}"
        ) from None


class RayPool:
    """Client calls as Ray remote tasks (see the module docstring)."""

    def __init__(self, client_fn: ClientFn, workers: int | None, address: str | None) -> None:
        ray = import_ray()
        self._ray = ray
        self._owns_session = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if address is None and workers is not None:
                options["num_cpus"] = workers
            try:
                ray.init(address=address, **options)
            except Exception as exc:  # Ray raises plain exceptions for connection problems
                where = f"connect to the Ray cluster at {address}" if address else "start Ray"
                raise ConfigError(f"could not {where}: {type(exc).__name__}: {exc}") from exc
            self._owns_session = True
        elif address is not None:
            log.warning("Ray is already initialised; ignoring address=%r", address)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.workers = workers or max(cpus, 1)
            try:
                self._client_fn = ray.put(client_fn)
            except Exception as exc:
                raise ConfigError(
                    f"Ray cannot serialise client_fn {client_fn!r:.80}: {exc}. It and what it "
                    "references must be serialisable (cloudpickle) for Ray's workers."
                ) from exc
            self._remote = ray.remote(call_clients).options(max_retries=0, retry_exceptions=False)
        except BaseException:
            self.close()
            raise

    def start_task(self, task: TaskSpec) -> Any:
        return self._ray.put(task)

    def batch_size(self, task: TaskSpec, n_sites: int) -> int:
        """Up to 16 clients per Ray task while their results stay under 64 MiB, and at
        least two tasks per worker, so every CPU gets work."""
        model_bytes = sum(a.nbytes for a in task.params[1]) if task.params else 0
        by_memory = _BATCH_BYTES // max(model_bytes, 1)
        spread = -(-n_sites // (2 * self.workers))  # ceil
        return max(1, min(_MAX_BATCH, by_memory, spread))

    def submit(self, shared: Any, sites: list[str]) -> Any:
        return self._remote.remote(self._client_fn, sites, shared)

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        ready, rest = self._ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:  # take every other result that is already there
            more, _ = self._ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return list(ready)

    def outcomes(self, handle: Any) -> list[Outcome]:
        try:
            outcomes = self._ray.get(handle)
        except Exception as exc:  # the worker died, was killed for memory, ...
            return [Outcome(None, error=f"their Ray task failed: {type(exc).__name__}: {exc}")]
        if not isinstance(outcomes, list):
            return [Outcome(None, error=f"their Ray task returned a {type(outcomes).__name__}.")]
        return outcomes

    def cancel(self, handles: list[Any]) -> None:
        for handle in handles:
            try:
                self._ray.cancel(handle)
            except Exception as exc:  # already finished or gone: nothing to cancel
                log.debug("ray.cancel: %s", exc)

    def close(self) -> None:
        if self._owns_session:
            self._ray.shutdown()
