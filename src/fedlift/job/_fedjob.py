"""The job API: a FedAvg job, its initial model and the script every client runs."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..codec import Compression
from ..data import save_summary_json, summary_table
from ..errors import ConfigError
from ..model import (
    build_keras_model,
    flatten,
    is_keras_model,
    is_torch_module,
    keras_params,
    plain_keras_copy,
    save_safetensors,
    torch_params,
    tree_from_lists,
)
from ..server import (
    ErrorPolicy,
    FedAvg,
    RunSettings,
    Strategy,
    check_tracking,
    keras_params_path,
    strategy_to_spec,
)
from ._config import (
    CONFIG_NAME,
    JobConfig,
    RunnerConfig,
    WorkflowConfig,
    folder_files,
    is_seconds,
)
from ._framework import FRAMEWORKS, FrameworkType
from ._run import Env, JobRun
from ._simulate import SimulationOutcome, simulate

__all__ = ["FedAvgJob", "FedJob", "PARTITION_NAME", "ScriptRunner"]

PARTITION_NAME = "partition.json"
"""The label distribution a job carries (:meth:`FedJob.set_partition_summary`)."""


@dataclass
class ScriptRunner:
    """Runs ``script`` on every client.

    In-process (default) the script runs as ``__main__`` in a thread of its client's worker
    process; ``launch_external_process=True`` launches ``command script script_args`` as a
    subprocess instead (for multi-GPU scripts, other launchers such as torchrun, or scripts
    that need a process of their own). ``python3``/``python`` at the start of ``command``
    mean the worker's own interpreter. The subprocess must call ``flare.init()`` within
    ``init_timeout`` seconds; when the job ends it gets ``stop_timeout`` seconds to return
    before it is terminated. ``app_dir`` is the folder shipped to the clients with the job
    (default: the script's folder); ``script`` may be relative to it. ``framework`` is a
    :class:`~fedlift.job.FrameworkType` or its value (``"tensorflow"``, ``"pytorch"``,
    ``"numpy"``, ``"raw"``), as in NVFlare.

    ``framework="pytorch"``: ``flare.receive()`` gives the params as CPU ``torch.Tensor``s
    (views of the received buffers, no copy), ready for ``model.load_state_dict``; torch is
    imported in the client only then. ``flare.send()`` takes tensors (a ``state_dict()``)
    under every framework. The default (None) is ``"pytorch"`` for a job whose initial
    model is a ``torch.nn.Module`` (as NVFlare's ScriptRunner defaults to PyTorch, so its
    hello-pt job runs unchanged) and ``"tensorflow"`` otherwise.
    """

    script: str | Path
    script_args: str = ""
    launch_external_process: bool = False
    command: str = "python3 -u"
    framework: str | FrameworkType | None = None
    app_dir: str | Path | None = None
    init_timeout: float = 300.0
    stop_timeout: float = 60.0

    def __post_init__(self) -> None:
        # A FrameworkType or its value, stored as the plain string job.json holds; None:
        # the initial model's (decided at export).
        framework = self.framework
        if isinstance(framework, FrameworkType):
            framework = framework.value
        if framework is not None and (
            not isinstance(framework, str) or framework.lower() not in FRAMEWORKS
        ):
            raise ConfigError(
                f"ScriptRunner(framework=...) must be a FrameworkType, one of {FRAMEWORKS}, "
                f"or None for the initial model's; received: framework={self.framework!r}."
            )
        self.framework = None if framework is None else framework.lower()
        if not (isinstance(self.init_timeout, int | float) and self.init_timeout > 0):
            raise ConfigError(
                "ScriptRunner(init_timeout=...) must be seconds > 0; "
                f"received: {self.init_timeout!r}."
            )
        if not (isinstance(self.stop_timeout, int | float) and self.stop_timeout >= 0):
            raise ConfigError(
                "ScriptRunner(stop_timeout=...) must be seconds >= 0; "
                f"received: {self.stop_timeout!r}."
            )
        if not isinstance(self.command, str) or not self.command.split():
            raise ConfigError(
                f"ScriptRunner(command=...) must be a launcher such as 'python3 -u'; "
                f"received: {self.command!r}."
            )
        if not isinstance(self.script_args, str):
            raise ConfigError(
                f"ScriptRunner(script_args=...) is one string of arguments, as typed on a "
                f"command line; received: {self.script_args!r}."
            )

    def resolve(self) -> tuple[Path, Path]:
        """The app folder and the script inside it (both absolute); validated."""
        script = Path(self.script)
        if self.app_dir is not None:
            app = Path(self.app_dir).resolve()
            if not script.is_absolute() and not script.exists():
                script = app / script
        else:
            app = script.resolve().parent
        script = script.resolve()
        if not script.is_file():
            raise ConfigError(
                f"ScriptRunner: the script {self.script!r} does not exist (looked at {script}). "
                "Pass a path relative to the current folder or to app_dir."
            )
        if app != script.parent and app not in script.parents:
            raise ConfigError(f"ScriptRunner: the script {script} is not inside app_dir {app}.")
        return app, script


class FedJob:
    """A job: ``n_clients`` sites train ``initial_model`` for ``num_rounds`` rounds with
    ``strategy`` (default :class:`~fedlift.server.FedAvg`; e.g.
    ``FedAdam(eta=1e-2)``, ``Scaffold()``, ``FedAvg(aggregator=FedMedian())``). A strategy
    of one's own must be a class at the top level of a module in the app folder (the
    script's folder), so that the server can import it from the exported job.
    ``cross_site_eval``: after training, every site's final local model and the global
    one are evaluated on every site's data.
    ``final_evaluation=True``: after the last round a ``validate`` task asks every site to
    evaluate the final global model (``result.final_metrics``). Off by default, as in
    NVFlare: a script that never checks ``flare.is_evaluate()`` would train once more on
    that task, and the params it trained would be dropped. Turn it on for scripts that
    answer ``is_evaluate()`` with metrics only.

    ``initial_model`` is a Keras model (saved as ``.keras``; global models are written as
    ``.weights.h5``; an unbuilt one is built from its ``_input_shape``, as NVFlare's
    persistor does, e.g. NVFlare's ``TFNet(input_shape=(None, 32, 32, 3))``, else refused
    with a ConfigError naming ``model.build(...)``), a ``torch.nn.Module`` (its
    ``state_dict()`` saved as ``.safetensors``, which the server reads without torch;
    clients get the params by state_dict key, for ``model.load_state_dict(input_model.
    params)``) or a params tree of numpy arrays (saved as ``.safetensors``). Nested lists
    of numbers are arrays (float32, as NVFlare's NumPy recipe makes them): a top-level list
    such as ``[[1, 2, 3], [4, 5, 6]]`` becomes ``{"numpy_key": array}`` (NVFlare's
    ``NPConstants.NUMPY_KEY``, what its NumPy scripts read), a dict of lists
    ``{"w": [[1, 2], [3, 4]]}`` a dict of arrays.
    ``save_interval``: the simulator writes the global model at most this often (seconds;
    0: after every round) and always after the last round, so sub-second rounds do not
    spend their time on the disk; ``state.json`` names the round the file holds.
    ``on_client_error``: ``"fail"`` (default) stops the job when a site's script raises or
    its result cannot be aggregated (NaN or Inf, wrong keys, shapes or dtypes, a bad
    weight); ``"exclude"`` leaves that site out of the round, logged with the error, while
    ``min_clients`` still answer. A site whose process dies is left out under either.
    ``tracking``: where the server writes what the sites' scripts log (``flare.log``,
    :mod:`fedlift.client.tracking`) besides TensorBoard, per site: ``"mlflow"`` (an MLflow
    store in the server folder), ``"wandb"`` (offline W&B runs) or ``"tensorboard"``
    (TensorBoard required); None (default): TensorBoard when installed. The packages it
    needs must be installed where the job is built and on the server (ConfigError names
    the pip extra otherwise).
    ``compression``: how models travel, for every strategy alike
    (:class:`~fedlift.codec.Compression`: ``results`` and ``model`` each ``"float16"``,
    ``"bfloat16"`` or ``"int8"``, results also ``"topk"``; a scheme's name compresses the
    results alone). Each round's record says the bytes before and after.
    """

    def __init__(
        self,
        name: str,
        n_clients: int,
        num_rounds: int,
        initial_model: Any,
        min_clients: int | None = None,
        key_metric: str = "accuracy",
        *,
        higher_is_better: bool = True,
        round_timeout: float = 3600.0,
        register_timeout: float = 600.0,
        final_evaluation: bool = False,
        save_interval: float = 1.0,
        on_client_error: ErrorPolicy = "fail",
        strategy: Strategy | None = None,
        cross_site_eval: bool = False,
        tracking: str | None = None,
        compression: Compression | str | None = None,
    ) -> None:
        kind = type(self).__name__
        self.tracking = check_tracking(tracking, f"{kind}(tracking=...)")
        if isinstance(compression, str):
            compression = Compression(results=compression, owner=f"{kind}(compression=...)")
        if compression is not None and not isinstance(compression, Compression):
            raise ConfigError(
                f"{kind}(compression=...) must be a fedlift.codec.Compression such as "
                'Compression(results="int8", model="float16"), a scheme\'s name or None; '
                f"received: compression={compression!r:.80}."
            )
        if strategy is None:
            strategy = FedAvg()
        if not isinstance(strategy, Strategy):
            raise ConfigError(
                f"{kind}(strategy=...) must be a fedlift.server.Strategy such as FedAvg() or "
                f"FedAdam(eta=1e-2); received: strategy={strategy!r:.80}."
            )
        if not isinstance(cross_site_eval, bool):
            raise ConfigError(
                f"{kind}(cross_site_eval=...) must be True or False; received: "
                f"cross_site_eval={cross_site_eval!r}."
            )
        self.strategy = strategy
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"{kind}(name=...) must be a plain folder name; received: {name!r}.")
        if not isinstance(n_clients, int) or n_clients < 1:
            raise ConfigError(
                f"{kind}(n_clients=...) must be an int >= 1; received: {n_clients!r}."
            )
        min_clients = n_clients if min_clients is None else min_clients
        if isinstance(min_clients, int) and not 1 <= min_clients <= n_clients:
            raise ConfigError(
                f"{kind}(min_clients=...) must be between 1 and n_clients={n_clients}; "
                f"received: {min_clients!r}."
            )
        # The run's settings are checked where the loop takes them, once (RunSettings).
        RunSettings(
            num_rounds=num_rounds,
            min_clients=min_clients,
            round_timeout=round_timeout,
            register_timeout=register_timeout,
            final_evaluation=final_evaluation,
            on_client_error=on_client_error,
            owner=kind,
        )
        if not is_seconds(save_interval):
            raise ConfigError(
                f"{kind}(save_interval=...) is the most often, in seconds, that the global "
                f"model is written (0: every round); received: {save_interval!r}."
            )
        if is_keras_model(initial_model):
            build_keras_model(initial_model, f"{kind}(initial_model=...)")
            self._model_kind = "keras"
        elif is_torch_module(initial_model):
            torch_params(initial_model)  # an empty model is refused here, not at export
            self._model_kind = "torch"
        else:
            initial_model = tree_from_lists(initial_model, f"{kind}(initial_model=...)")
            try:
                flatten(initial_model)
            except ConfigError as exc:
                raise ConfigError(
                    f"{kind}(initial_model=...) must be a Keras model, a torch.nn.Module or a "
                    f"params tree of numpy arrays; {exc}"
                ) from None
            self._model_kind = "arrays"
        self.name = name
        self.n_clients = n_clients
        self.initial_model = initial_model
        self.workflow = WorkflowConfig(
            num_rounds=num_rounds,
            min_clients=min_clients,
            key_metric=key_metric,
            higher_is_better=higher_is_better,
            round_timeout=float(round_timeout),
            register_timeout=float(register_timeout),
            final_evaluation=final_evaluation,
            save_interval=float(save_interval),
            on_client_error=on_client_error,
            cross_site_eval=cross_site_eval,
            compression=(
                compression.to_json() if compression is not None and compression.enabled else None
            ),
        )
        self.runner: ScriptRunner | None = None
        self._targets: set[str] | None = None  # the sites to() named; None: all of them
        self._partition: tuple[Any, list[Any], list[str] | None] | None = None

    def to_clients(self, runner: ScriptRunner) -> None:
        """Every client runs ``runner``."""
        if not isinstance(runner, ScriptRunner):
            raise ConfigError(
                f"to_clients() takes a ScriptRunner; received: {type(runner).__name__}."
            )
        runner.resolve()
        self.runner = runner
        self._targets = None

    def to(self, obj: ScriptRunner, target: str) -> None:
        """The ScriptRunner ``obj`` for the site ``target`` (``"site-1"`` ... ``"site-N"``):
        NVFlare's FedAvgJob scripts write ``job.to(executor, f"site-{i + 1}")`` in a loop
        over the sites, and this lets them run unchanged.

        fedlift runs one script on every site, so each call must give an equal
        ScriptRunner (a loop makes a new, equal one per site) and, by export, every site
        must have been named; the loop then means :meth:`to_clients`. The server side is
        this job's constructor (``initial_model=``, ``strategy=``), not ``to(..., "server")``.
        """
        kind = type(self).__name__
        sites = [f"site-{i + 1}" for i in range(self.n_clients)]
        if not isinstance(obj, ScriptRunner):
            raise ConfigError(
                f"{kind}.to() sends a ScriptRunner to a site; the model and the algorithm go "
                f"to {kind}(initial_model=..., strategy=...). Received: "
                f"{type(obj).__name__} for target={target!r:.40}."
            )
        if target not in sites:
            raise ConfigError(
                f"{kind}.to(runner, target): target must be one of the job's sites "
                f"site-1 ... site-{self.n_clients} (n_clients={self.n_clients}), or call "
                f"job.to_clients(runner) for all of them. Received: target={target!r:.40}."
            )
        if self.runner is not None and obj != self.runner:
            raise ConfigError(
                f"{kind}.to(): fedlift runs one ScriptRunner on every site, and {target} got "
                f"a different one from the other sites'. Give every site the same "
                f"ScriptRunner (job.to_clients(runner)). Received: {obj!r:.200} after "
                f"{self.runner!r:.200}."
            )
        obj.resolve()
        if self.runner is None:
            self.runner, self._targets = obj, {target}
        elif self._targets is not None:
            self._targets.add(target)
        # else: to_clients() gave every site this runner already

    def set_partition_summary(
        self,
        labels: Any,
        parts: Sequence[Any],
        class_names: Sequence[str] | None = None,
    ) -> None:
        """Carry what each site's data holds, for the job's report: ``labels`` (every
        sample's label) and ``parts`` (one index array per site, in site order: part i is
        ``site-(i+1)``), as :func:`fedlift.data.dirichlet` and its kin return them. The
        export writes the counts per site and class as ``partition.json`` (format
        ``fedlift.data.summary/1``) into the job folder; nothing else reads them. Checked
        here (ConfigError): one part per site, valid indices, one name per class."""
        if isinstance(parts, str | bytes) or len(parts) != self.n_clients:
            raise ConfigError(
                f"set_partition_summary(labels, parts): parts must hold one index array per "
                f"site (n_clients={self.n_clients}), in site order. Received: "
                f"{type(parts).__name__} of length "
                f"{len(parts) if hasattr(parts, '__len__') else '?'}."
            )
        summary_table(labels, parts, class_names)  # checks labels, parts and class_names
        names = None if class_names is None else [str(n) for n in class_names]
        self._partition = (np.asarray(labels).copy(), [np.asarray(p).copy() for p in parts], names)

    def export_job(self, root: str | Path, exclude: tuple[str | Path, ...] = ()) -> Path:
        """Write the job folder ``root/NAME`` (config, app, initial model); returns it.

        Folders in ``exclude`` (and ``root`` itself) are left out of the copied app. A
        symlink in the app that stays inside it is copied as what it points to; one that
        leads out of the app is refused (ConfigError). An existing ``root/NAME`` is
        replaced only when it is a job folder (holds ``job.json``) or empty.
        """
        if self.runner is None:
            raise ConfigError(
                "the job has no script: call job.to_clients(ScriptRunner(...)) first."
            )
        targets = self._targets or set()
        missing = [f"site-{i + 1}" for i in range(self.n_clients)]
        missing = [site for site in missing if site not in targets]
        if self._targets is not None and missing:
            raise ConfigError(
                f"export_job: fedlift runs the same script on all n_clients={self.n_clients} "
                "sites, and job.to() gave it to only some of them. Send it to every site, or "
                f"call job.to_clients(runner). Received: to() for {sorted(targets)}, none for "
                f"{missing}."
            )
        app, script = self.runner.resolve()
        folder = Path(root).resolve() / self.name
        if folder.is_symlink() or (
            folder.exists()
            and not (folder / CONFIG_NAME).is_file()
            and (not folder.is_dir() or any(folder.iterdir()))
        ):
            raise ConfigError(
                f"export_job: {folder} exists and is not a fedlift job folder (no "
                f"{CONFIG_NAME} in it); fedlift only replaces job folders it exported. Move "
                "it away or export under another root."
            )
        staging = folder.with_name(f".{self.name}.export-tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            skip = {folder.parent, *(Path(p).resolve() for p in exclude)}
            _copy_app(app, staging / "app", exclude=skip)
            model_file = self._save_initial_model(staging)
            spec = strategy_to_spec(self.strategy, app)
            self.workflow.type = spec.pop("type")
            self.workflow.options = spec
            config = JobConfig(
                name=self.name,
                n_clients=self.n_clients,
                workflow=self.workflow,
                runner=RunnerConfig(
                    script=script.relative_to(app).as_posix(),
                    script_args=self.runner.script_args,
                    launch_external_process=self.runner.launch_external_process,
                    command=self.runner.command,
                    framework=self.runner.framework or self._default_framework(),
                    init_timeout=float(self.runner.init_timeout),
                    stop_timeout=float(self.runner.stop_timeout),
                ),
                initial_model=model_file,
                tracking=self.tracking,
            )
            config.write(staging)
            if self._partition is not None:
                labels, parts, names = self._partition
                save_summary_json(labels, parts, staging / PARTITION_NAME, names)
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    def _default_framework(self) -> str:
        """The runner's framework when the ScriptRunner names none: the initial model's."""
        return "pytorch" if self._model_kind == "torch" else "tensorflow"

    def _save_initial_model(self, folder: Path) -> str:
        if self._model_kind == "keras":
            name = "initial_model.keras"
            plain = plain_keras_copy(self.initial_model)
            plain.save(str(folder / name))
            # The same weights as a params tree, for a server without Keras (it then runs
            # the job from them and writes .safetensors global models).
            save_safetensors(keras_params(plain), keras_params_path(folder / name))
            return name
        name = "initial_model.safetensors"
        if self._model_kind == "torch":
            # The state_dict as it is now, keys and order kept: what load_state_dict takes.
            save_safetensors(torch_params(self.initial_model), folder / name)
            return name
        tree = _as_arrays(self.initial_model)
        save_safetensors(tree, folder / name)
        return name

    def run(self, env: Env) -> JobRun:
        """Start the job in ``env`` and return its run: ``SimEnv(n_clients=, threads=,
        gpu=)`` (the simulator), ``PocEnv(n_clients=)`` (a POC started and stopped on this
        machine) or ``ProdEnv(kit=)`` (a deployed server). The run's ``status()``,
        ``wait()``, ``result()`` and ``download(dir)`` are the same in every env, so the
        job moves from one place to the next by changing this one argument."""
        if not isinstance(env, Env):
            raise ConfigError(
                f"job.run(env) takes a SimEnv, PocEnv or ProdEnv (fedlift.job.Env). "
                f"Received: env={env!r:.80}."
            )
        return env.start(self)

    def simulator_run(
        self,
        workspace: str | Path,
        n_clients: int | None = None,
        threads: int | None = None,
        gpu: str | None = None,
    ) -> SimulationOutcome:
        """Export the job into ``workspace/jobs`` and run it in the simulator."""
        job_dir = self.export_job(Path(workspace) / "jobs", exclude=(workspace,))
        return simulate(job_dir, workspace, n_clients=n_clients, threads=threads, gpu=gpu)


class FedAvgJob(FedJob):
    """A FedAvg job (NVFlare's name and signature): :class:`FedJob` with
    :class:`~fedlift.server.FedAvg`.

    ``initial_model`` is a Keras model (saved as ``.keras``; global models are written as
    ``.weights.h5``; an unbuilt one is built from ``_input_shape``), a ``torch.nn.Module``
    (its ``state_dict()`` saved as ``.safetensors``, read by the server without torch), a
    params tree of numpy arrays (saved as ``.safetensors``) or nested lists of numbers (see
    :class:`FedJob`). ``final_evaluation`` is off by default, as in NVFlare (see
    :class:`FedJob`).
    ``save_interval``: the simulator writes the global model at most this often (seconds;
    0: after every round) and always after the last round, so sub-second rounds do not
    spend their time on the disk; ``state.json`` names the round the file holds.
    ``on_client_error``: ``"fail"`` (default) stops the job when a site's script raises or
    its result cannot be aggregated (NaN or Inf, wrong keys, shapes or dtypes, a bad
    weight); ``"exclude"`` leaves that site out of the round, logged with the error, while
    ``min_clients`` still answer. A site whose process dies is left out under either.
    """


def _as_arrays(tree: Any) -> Any:
    structure, arrays = flatten(tree)
    from ..model import unflatten

    return unflatten(structure, [np.asarray(a) for a in arrays])


def _copy_app(source: Path, target: Path, exclude: set[Path]) -> None:
    """Copy the app's files (see :func:`~fedlift.job._config.folder_files`): hidden names,
    caches and ``exclude`` are left out; a symlink inside the app is copied as what it
    points to, and one that leads out of the app is refused with a ConfigError."""
    files = folder_files(source, skip_hidden=True, exclude=frozenset(exclude))
    target.mkdir(parents=True, exist_ok=True)
    for path, rel in files:
        destination = target / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
