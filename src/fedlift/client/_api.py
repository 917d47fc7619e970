"""The Client API: the few calls that turn a training script into a federated client.

Names and semantics follow NVFlare's Client API (``import nvflare.client as flare``), so a
script written for it runs after changing its import to ``import fedlift.client as flare``.
Where NVFlare is silent or loose, fedlift is strict and says how to fix the call:
``receive(timeout)`` really times out, and every misuse raises
:class:`~fedlift.errors.ClientAPIError` with the fix in its message.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import threading
from enum import Enum
from typing import Any, SupportsIndex

import numpy as np

from ..codec import model_to_wire
from ..errors import ClientAPIError, ConfigError
from ..model import FLModel, MetaKey, arrays_to_tensors, tensors_to_arrays
from ._link import Link, Task, current_link
from ._records import build_record

__all__ = [
    "AnalyticsDataType",
    "clear",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "receive",
    "send",
    "shutdown",
    "system_info",
]

_log = logging.getLogger("fedlift.client")

NOT_IN_A_JOB = (
    "fedlift.client.init() found no fedlift job around this script. The script must be run "
    "by a job, not directly: e.g. `python3 job.py --script {script}` (a FedAvgJob with a "
    "ScriptRunner), or export the job and run `fedlift simulator -n 2 JOB_FOLDER`."
)


class AnalyticsDataType(str, Enum):
    """Kinds of values ``log()`` accepts (NVFlare's names)."""

    SCALAR = "SCALAR"
    SCALARS = "SCALARS"
    METRIC = "METRIC"
    METRICS = "METRICS"
    PARAMETER = "PARAMETER"
    PARAMETERS = "PARAMETERS"
    TAG = "TAG"
    TAGS = "TAGS"
    TEXT = "TEXT"


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.link: Link | None = None
        self.rank = "0"
        self.task: Task | None = None
        self.answered = False
        self.received = False  # receive() returned the current task's model
        self.last_round: int | None = None
        self.stopped = False
        self.task_config: dict[str, Any] = {}
        self.file_config: dict[str, Any] = {}


_state = _State()


def _reset_for_tests() -> None:
    """Forget init() (tests run several jobs in one process)."""
    global _state
    _state = _State()


def _script_name() -> str:
    import sys

    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "your_script.py"


def _require_init(call: str) -> Link:
    link = _state.link
    if link is None:
        raise ClientAPIError(
            f"fedlift.client.{call}() was called before init(). Call flare.init() once at the "
            "start of the script, before any other fedlift.client function."
        )
    return link


def init(rank: str | int | None = None, config_file: str | os.PathLike[str] | None = None) -> None:
    """Connect this script to its site. Call once, before any other Client API function.

    ``rank`` is the process's rank in a multi-process launch (default: env ``RANK``, else 0).

    ``config_file`` (NVFlare's argument) names a JSON file of the job's, e.g. one shipped
    in the app folder: a relative path is looked up from the current folder, then from the
    script's. Its JSON object becomes part of :func:`get_config` (beneath the job's config
    and the task's: on a key in more than one, theirs wins). fedlift takes nothing else
    from it: where the site is, the job's settings and the connection come from the job
    that runs the script, never from a file. NVFlare generates such a file for each job
    (``config/client_api_config.json``) and fedlift does not, so a file that does not
    exist is logged and skipped; one that exists but is not a JSON object raises
    :class:`~fedlift.errors.ClientAPIError`.
    """
    with _state.lock:
        if _state.link is not None:
            _log.debug("init() called again; ignored")
            return
        file_config = {} if config_file is None else _read_config_file(config_file)
        resolved = str(
            rank if rank is not None else os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        )
        link = current_link()
        if link is None:
            # Only a script its worker launched connects out, over gRPC: the import of the
            # transport waits until here, so `import fedlift.client` stays light.
            from ._remote import connect_from_env

            link = connect_from_env(resolved)
        if link is None:
            raise ClientAPIError(NOT_IN_A_JOB.format(script=_script_name()))
        _state.link = link
        _state.rank = resolved
        _state.file_config = file_config


def _read_config_file(config_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``config_file`` (see :func:`init`); {} when there is no such file."""
    import sys

    if not isinstance(config_file, str | os.PathLike):
        raise ClientAPIError(
            "init(config_file=...) takes the path of a JSON file; received: "
            f"config_file={config_file!r:.80} ({type(config_file).__name__})."
        )
    path = os.fspath(config_file)
    candidates = [path]
    if not os.path.isabs(path) and sys.argv and sys.argv[0]:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), path))
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        _log.warning(
            "init(config_file=%r): no such file (looked at %s); skipped. fedlift gets the "
            "job's config from the job itself, so nothing is missing; get_config() holds it.",
            path,
            ", ".join(os.path.abspath(c) for c in candidates),
        )
        return {}
    try:
        with open(found, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClientAPIError(
            f"init(config_file=...) could not read {found} as JSON ({exc}). Fix the file or "
            f"leave config_file out. Received: config_file={path!r}."
        ) from None
    if not isinstance(data, dict):
        raise ClientAPIError(
            f"init(config_file=...): {found} must hold a JSON object (its keys join "
            f"get_config()); it holds a {type(data).__name__}. Received: config_file={path!r}."
        )
    return data


def _fetch(timeout: float | None) -> Task | None:
    link = _require_init("receive")
    task = link.next_task(timeout)
    if task is None:
        _state.stopped = True
        _state.task = None
        return None
    if task.model.params is not None and _framework(link) == "pytorch":
        # A new FLModel: the worker's own task (in-process, the same object) keeps arrays.
        try:
            params = arrays_to_tensors(task.model.params)
        except ImportError as exc:
            raise ClientAPIError(
                "this job's ScriptRunner has framework='pytorch', so receive() gives torch "
                f"tensors, but torch cannot be imported on this site ({exc}). Install it: "
                "pip install 'fedlift[torch]' (the CPU build, torch==2.13.0) or your CUDA "
                "build of torch."
            ) from None
        tensors = dataclasses.replace(task.model, params=params)
        task = Task(task.task_id, task.name, tensors)
    _state.task = task
    _state.answered = False
    _state.received = False
    _state.task_config = _task_config(task)
    return task


def _framework(link: Link) -> str | None:
    """The job's ``ScriptRunner(framework=...)``, from the client config the server sent."""
    runner = link.context.config.get("runner")
    framework = runner.get("framework") if isinstance(runner, dict) else None
    return framework if isinstance(framework, str) else None


def _on_host(model: FLModel) -> FLModel:
    """``model`` with its tensors (params, optimizer params, meta trees) as numpy arrays:
    a CPU tensor's memory as it is, one device-to-host copy of any other (see
    :func:`fedlift.model.tensor_to_numpy`). The script's FLModel is left as it was."""
    params = tensors_to_arrays(model.params)
    optimizer = tensors_to_arrays(model.optimizer_params)
    meta = {key: tensors_to_arrays(value) for key, value in model.meta.items()}
    if (
        params is model.params
        and optimizer is model.optimizer_params
        and all(meta[key] is value for key, value in model.meta.items())
    ):
        return model
    return dataclasses.replace(model, params=params, optimizer_params=optimizer, meta=meta)


def _task_config(task: Task) -> dict[str, Any]:
    """The config the server's strategy sent with ``task`` (``meta["config"]``), or {}."""
    raw = task.model.meta.get(MetaKey.CONFIG)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        _log.warning(
            "task %s carries meta[%r] that is a %s, not a JSON object; get_config() ignores it",
            task.name,
            MetaKey.CONFIG,
            type(raw).__name__,
        )
        return {}
    return raw


def receive(timeout: float | None = None) -> FLModel | None:
    """The global model of the current round (None once the job has ended).

    Calling it again before ``send()`` returns the same model. With ``timeout`` (seconds) it
    raises :class:`~fedlift.errors.ReceiveTimeoutError` if no model came in time.

    With ``ScriptRunner(framework="pytorch")`` the params are CPU ``torch.Tensor``s, ready
    for ``model.load_state_dict(input_model.params)``: views of the received buffers, not
    copies (``torch.from_numpy``). Those buffers are this site's own (a private receive
    buffer, or a copy-on-write mapping of the server's shared memory), so the tensors are
    writable, and writing into them changes this site's copy only, never the server's
    model nor another site's. ``load_state_dict`` copies them into the model anyway; a
    script that sends a DIFF should leave them as received (the change is taken against
    them).
    """
    if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
        raise ClientAPIError(
            f"receive(timeout=...) takes seconds >= 0 or None; received: {timeout!r}."
        )
    with _state.lock:
        _require_init("receive")
        if _state.task is not None and not _state.answered:
            _state.received = True
            return _state.task.model
        if _state.stopped:
            return None
    task = _fetch(timeout)
    if task is None:
        return None
    _state.received = True
    return task.model


def _validate_outgoing(model: FLModel) -> None:
    """Refuse, in the script's own call, what the site could not send (its worker would only
    find out later, in another thread)."""
    try:
        # The split the wire makes: params, optimizer params and meta param trees are arrays.
        fields, _ = model_to_wire(model)
        model.weight()
    except ConfigError as exc:
        raise ClientAPIError(f"send() got an FLModel it cannot send: {exc}") from None
    _validate_meta(model.meta, fields["meta"])
    for key, value in (model.metrics or {}).items():
        if not isinstance(key, str):
            raise ClientAPIError(f"metric names must be strings; received: {key!r}.")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                _log.warning("metric %r is %s", key, value)
            continue
        if hasattr(value, "item"):  # numpy / framework scalars
            try:
                model.metrics[key] = float(value.item())  # type: ignore[index]
                continue
            except (TypeError, ValueError):
                pass
        raise ClientAPIError(
            f"metric {key!r} must be a number; received: {value!r:.60} ({type(value).__name__}). "
            "Pass float(value)."
        )


def _validate_meta(meta: dict[str, Any], json_meta: dict[str, Any]) -> None:
    """Meta keys are strings; values that do not travel as arrays must be JSON. A numpy
    scalar (e.g. a step count from numpy) becomes its Python number, as metrics do."""
    for key in meta:
        if not isinstance(key, str):
            raise ClientAPIError(
                f"FLModel.meta keys must be strings; received: key={key!r:.60} "
                f"({type(key).__name__}). Use str(key)."
            )
    for key, value in json_meta.items():
        if isinstance(value, np.generic):
            value = meta[key] = json_meta[key] = value.item()
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError, RecursionError):
            raise ClientAPIError(
                f"FLModel.meta[{key!r:.60}] cannot be sent: meta values must be JSON (str, "
                "int, float, bool, None, lists and dicts of them) or param trees (dicts or "
                "lists) whose leaves are all numpy arrays. Received: "
                f"{value!r:.60} ({type(value).__name__}). Convert numbers with float() and "
                "arrays with numpy.asarray()."
            ) from None


def send(model: FLModel, clear_cache: bool = True) -> None:
    """Send this round's result (trained params and/or metrics) back to the server.

    ``params`` may be a PyTorch ``state_dict()`` (any framework): tensors on any device,
    with or without gradients, are sent as numpy arrays with one device-to-host copy each
    (none for CPU tensors); bfloat16, float16 and integer buffers (BatchNorm's
    ``num_batches_tracked``) keep their dtype. Tensors in ``optimizer_params`` and in meta
    values are sent the same way. Until ``send()`` returns, the arrays are read where they
    are: change the model only after it returned.
    """
    if not isinstance(model, FLModel):
        raise ClientAPIError(
            f"send() takes an FLModel; received: {type(model).__name__}. Wrap the result: "
            "flare.send(flare.FLModel(params=..., metrics={...}))."
        )
    with _state.lock:
        link = _require_init("send")
        if _state.task is None or _state.answered:
            if _state.answered or _state.last_round is not None:
                raise ClientAPIError(
                    f"send() was already called for round {_state.last_round}. Send once per "
                    "received model: call receive() to get the next round's model first."
                )
            raise ClientAPIError(
                "send() was called before receive(): there is no model to answer yet. Call "
                "flare.receive() first (it returns the global model of the round)."
            )
        if _state.rank != "0":
            # Only rank 0 reports for the site; other ranks' send() ends their round.
            _state.answered = True
            _state.last_round = _state.task.model.current_round
            if clear_cache:
                _state.task = None
            return
        model = _on_host(model)
        _validate_outgoing(model)
        task = _state.task
        if model.current_round is None:
            model.current_round = task.model.current_round
        if model.total_rounds is None:
            model.total_rounds = task.model.total_rounds
        link.submit(task.task_id, model)
        _state.answered = True
        _state.last_round = task.model.current_round
        if clear_cache:
            _state.task = None


def is_running() -> bool:
    """True while the job has work for this site; blocks until the next task or the end.

    On a rank other than 0, a task whose model ``receive()`` returned counts as done here:
    NVFlare's DDP scripts call ``send()`` on rank 0 only, and every rank's next
    ``is_running()`` must move on to the next round with rank 0.
    """
    with _state.lock:
        _require_init("is_running")
        if _state.stopped:
            return False
        if _state.task is not None and not _state.answered:
            if _state.rank == "0" or not _state.received:
                return True
            _state.answered = True
            _state.last_round = _state.task.model.current_round
            _state.task = None
    return _fetch(None) is not None


def _task_name(call: str) -> str:
    with _state.lock:
        _require_init(call)
        task = _state.task
    if task is None:
        task = _fetch(None)
        if task is None:
            return ""
    return task.name


def get_task_name() -> str:
    """The name of the current task: ``"train"``, ``"validate"`` or ``"submit_model"``
    (NVFlare's names). Like ``is_train()`` it waits for the next task when the last one was
    answered, and it is ``""`` once the job has ended."""
    return _task_name("get_task_name")


def is_train() -> bool:
    """True if the current task asks for training (``train``)."""
    return _task_name("is_train") == "train"


def is_evaluate() -> bool:
    """True if the current task asks to evaluate the received model only (``validate``)."""
    return _task_name("is_evaluate") == "validate"


def is_submit_model() -> bool:
    """True if the current task asks for the local model (``submit_model``)."""
    return _task_name("is_submit_model") == "submit_model"


def system_info() -> dict[str, Any]:
    """``job_id`` and ``site_name`` (as NVFlare), plus ``site_index`` and ``num_sites``."""
    link = _require_init("system_info")
    ctx = link.context
    return {
        "job_id": ctx.job_id,
        "site_name": ctx.site_name,
        "site_index": ctx.site_index,
        "num_sites": ctx.num_sites,
    }


def get_job_id() -> str:
    return _require_init("get_job_id").context.job_id


def get_site_name() -> str:
    return _require_init("get_site_name").context.site_name


def get_config() -> dict[str, Any]:
    """The job's client config (job name, rounds, runner settings) merged with the config of
    the current task, the one received last; on a key in both, the task's value wins.

    A task's config is what the server's strategy sends with that round's task, in
    ``FLModel.meta["config"]`` (:attr:`~fedlift.model.MetaKey.CONFIG`): e.g. FedProx's
    ``get_config()["fedprox_mu"]`` once ``receive()`` returned the round's model. Before the
    first task it is the job's config alone; it stays the last task's until the next one
    arrives. A copy: changing it changes nothing. With ``init(config_file=...)`` the file's
    keys are there too, beneath both.
    """
    link = _require_init("get_config")
    with _state.lock:
        merged = {**_state.file_config, **link.context.config, **_state.task_config}
    return copy.deepcopy(merged)


def log(
    key: str,
    value: Any,
    data_type: AnalyticsDataType | str = AnalyticsDataType.SCALAR,
    global_step: SupportsIndex | None = None,
    **kwargs: Any,
) -> None:
    """Stream a value to the server, which writes it for this site (TensorBoard always;
    MLflow or W&B with the job's ``tracking``). :mod:`fedlift.client.tracking`'s writers
    call this.

    ``SCALAR``/``METRIC`` take a number; ``SCALARS``/``METRICS`` a dict of numbers
    (``SCALARS`` are named ``key/name``, ``METRICS`` by their names alone);
    ``PARAMETER``/``TAG`` a value (sent as a string), ``PARAMETERS``/``TAGS`` a dict of them;
    ``TEXT`` a string saved as the artifact ``path=``. ``writer=`` names the writer
    (``TORCH_TB``, ``MLFLOW``, ``WANDB``). Only rank 0 reports.
    """
    link = _require_init("log")
    kind = data_type.value if isinstance(data_type, AnalyticsDataType) else str(data_type).upper()
    step = kwargs.pop("step", global_step)
    writer = kwargs.pop("writer", "TORCH_TB")
    writer = writer.value if isinstance(writer, Enum) else writer
    record = build_record(key, value, kind, step, writer, kwargs.pop("path", None))
    if _state.rank == "0":
        link.log(record)


def clear() -> None:
    """Forget the received model, so the next ``receive()`` waits for the next task."""
    with _state.lock:
        _state.task = None
        _state.answered = False


def shutdown() -> None:
    """End this script's part in the job: ``is_running()`` is False afterwards."""
    with _state.lock:
        link = _state.link
        _state.stopped = True
        _state.task = None
    if link is not None:
        link.close()


def _current_model() -> FLModel | None:
    """The current task's model while it awaits its answer, else None; never waits (for
    callbacks that must not block where the script has already answered, e.g. Lightning's)."""
    with _state.lock:
        task = _state.task
        return task.model if task is not None and not _state.answered else None
