"""Guards the public API (what ``__all__`` exports) and two source-wide rules."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import fedlift
import fedlift.client
import fedlift.errors
import fedlift.model

SRC = Path(fedlift.__file__).resolve().parent

EXPECTED: dict[str, list[str]] = {
    "fedlift": [
        "Compression",
        "FLModel",
        "FedAvgJob",
        "FedJob",
        "FedliftError",
        "FrameworkType",
        "MetaKey",
        "ParamsType",
        "PocEnv",
        "ProdEnv",
        "ScriptRunner",
        "SimEnv",
        "SimulationResult",
        "__version__",
        "run_simulator",
    ],
    "fedlift.client": [
        "AlgorithmConstants",
        "AnalyticsDataType",
        "FLModel",
        "MetaKey",
        "ParamsType",
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
        "tree_add",
        "tree_sub",
    ],
    "fedlift.model": [
        "AlgorithmConstants",
        "FLModel",
        "MetaKey",
        "NPConstants",
        "NUMPY_KEY",
        "ParamTree",
        "ParamsType",
        "Structure",
        "arrays_to_tensors",
        "bfloat16_dtype",
        "build_keras_model",
        "flat_keys",
        "flatten",
        "is_bfloat16",
        "is_float_dtype",
        "is_keras_model",
        "is_torch_module",
        "is_torch_tensor",
        "iter_with_keys",
        "keras_params",
        "load_keras_model",
        "load_safetensors",
        "map_arrays",
        "plain_keras_copy",
        "save_safetensors",
        "set_keras_params",
        "stage_safetensors",
        "tensor_to_numpy",
        "tensors_to_arrays",
        "torch_params",
        "tree_add",
        "tree_from_lists",
        "tree_sub",
        "unflatten",
    ],
    "fedlift.codec": [
        "ALLOWED_DTYPES",
        "BFLOAT16_CODE",
        "COMPRESSION_KEY",
        "Compression",
        "DEFAULT_MAX_MESSAGE_BYTES",
        "Frame",
        "Header",
        "LOG_DATA_TYPES",
        "LOG_WRITERS",
        "Layout",
        "LazyArray",
        "MAX_LOG_ENTRIES",
        "MAX_LOG_NAME_CHARS",
        "MAX_LOG_PARAM_CHARS",
        "MAX_LOG_STRINGS",
        "MAX_LOG_TAG_CHARS",
        "MAX_LOG_TEXT_CHARS",
        "MODEL_SCHEMES",
        "Message",
        "PREFIX_BYTES",
        "REMOTE_MIN_BYTES",
        "REQUEST_KEY",
        "RESULT_SCHEMES",
        "RemoteArray",
        "ResultEncoder",
        "SHM_SESSION_ENV",
        "SIDE_KEY",
        "SegmentPool",
        "check_log_name",
        "check_log_record",
        "check_remote_probe",
        "decode",
        "decode_frame",
        "decode_header",
        "decode_model",
        "densify",
        "dequantize_int8",
        "encode",
        "encode_model",
        "frame_length",
        "frame_op",
        "layout_of",
        "make_remote_probe",
        "materialize_lazy",
        "materialize_remote",
        "model_from_wire",
        "model_to_wire",
        "prefetch_shm",
        "quantize_int8",
        "shm_available",
        "sweep_shm",
        "top_k",
        "top_k_count",
        "wire_bytes",
        "wire_code",
        "wire_dtype",
    ],
    "fedlift.transport": [
        "DEFAULT_CHUNK_BYTES",
        "DEFAULT_IDLE_TIMEOUT",
        "DEFAULT_SHM_MIN_BYTES",
        "DEFAULT_STREAM_MIN_BYTES",
        "GrpcListener",
        "GrpcTransport",
        "Handler",
        "Identity",
        "Listener",
        "MemoryListener",
        "MemoryTransport",
        "PROJECT_ATTRIBUTE",
        "ROLES",
        "ROLE_ATTRIBUTE",
        "Transport",
        "describe_error",
        "identity_from_pem",
        "identity_of",
        "read_tls_files",
        "tls_channel_credentials",
        "tls_server_credentials",
    ],
    "fedlift.server": [
        "AGGREGATORS",
        "Aggregate",
        "AggregateFn",
        "Aggregator",
        "AggregatorFactory",
        "Allocator",
        "ArraysFormat",
        "Ask",
        "CHECKPOINT_DIR",
        "CHECKPOINT_FILE",
        "CompressionFilter",
        "Controller",
        "CrossSiteResult",
        "Custom",
        "Cyclic",
        "ErrorPolicy",
        "FEDPROX_MU",
        "FastPath",
        "FedAdagrad",
        "FedAdam",
        "FedAvg",
        "FedAvgM",
        "FedMedian",
        "FedOpt",
        "FedProx",
        "FedTrimmedAvg",
        "FedYogi",
        "Filter",
        "FoldOrder",
        "KerasWeightsFormat",
        "Krum",
        "LogRecord",
        "MODEL_OWNER",
        "Mean",
        "Memory",
        "ModelFormat",
        "RUN_FILE",
        "RUN_FORMAT",
        "RoundLog",
        "RoundRecord",
        "RunInfo",
        "RunRecorder",
        "RunResult",
        "RunSettings",
        "SCAFFOLD_CTRL_DIFF",
        "SCAFFOLD_CTRL_GLOBAL",
        "SERVER_MODEL",
        "STRATEGIES",
        "Scaffold",
        "ServerRuntime",
        "Strategy",
        "StrategyState",
        "StreamingMean",
        "TRACKING_CHOICES",
        "Tracking",
        "all_clients",
        "apply_in_place",
        "apply_update",
        "check_error_policy",
        "check_tracking",
        "compression_line",
        "coordinate_median",
        "cross_site_evaluate",
        "cyclic_order",
        "failure_of",
        "fedopt_step",
        "keras_params_path",
        "krum_scores",
        "load_initial_model",
        "multikrum",
        "options_of",
        "read_job_json",
        "register_aggregator",
        "run_rounds",
        "sample_sites",
        "scaffold_step",
        "strategy_from_spec",
        "strategy_to_spec",
        "trimmed_mean",
        "weighted_mean",
        "weighted_mean_metrics",
    ],
    "fedlift.job": [
        "CONFIG_NAME",
        "Env",
        "FedAvgJob",
        "FedJob",
        "FrameworkType",
        "JobConfig",
        "JobResult",
        "JobRun",
        "RUN_STATES",
        "RunStatus",
        "RunnerConfig",
        "ScriptRunner",
        "SimulationOutcome",
        "WorkflowConfig",
        "load_job",
        "read_rounds",
        "zip_dir",
    ],
    "fedlift.simulator": [
        "ClientFn",
        "LocalController",
        "LocalResult",
        "SimEnv",
        "SimulationResult",
        "assign_groups",
        "available_gpus",
        "check_gpu_ids",
        "parse_gpu_groups",
        "run_local",
        "run_simulator",
        "site_environment",
    ],
    "fedlift.data": [
        "MAX_RETRIES",
        "SUMMARY_FORMAT",
        "dirichlet",
        "iid",
        "label_counts",
        "pathological",
        "quantity_skew",
        "save_summary_json",
        "save_summary_png",
        "summary_figure",
        "summary_table",
    ],
    "fedlift.report": [
        "REPORT_NAME",
        "compare_report",
        "curves_svg",
        "find_run",
        "write_report",
    ],
    "fedlift.deploy": [
        "DeployServer",
        "Kit",
        "LiveView",
        "PocEnv",
        "ProdEnv",
        "ROLES",
        "Revocations",
        "add_revoke_command",
        "add_site_commands",
        "channel_credentials",
        "load_kit",
        "make_web_token",
        "provision",
        "revoke",
        "run_revoke",
        "run_site_command",
        "server_credentials",
        "verify_web_token",
    ],
    "fedlift.client.tracking": [
        "MLflowWriter",
        "SummaryWriter",
        "WandBWriter",
    ],
    "fedlift.client.worker": [
        "SERVER_TOKEN_ENV",
        "SHARED_MEMORY_ENV",
        "main",
        "parent_death_signal",
        "run_worker",
        "unpack_app",
    ],
    "fedlift.errors": [
        "ClientAPIError",
        "ClientFailedError",
        "ConfigError",
        "ConnectionLostError",
        "FedliftError",
        "InvalidResultError",
        "JobAbortedError",
        "JobFailedError",
        "PermissionDeniedError",
        "ProtocolError",
        "ReceiveTimeoutError",
        "RemoteError",
        "ResourceLimitError",
        "RoundTimeoutError",
        "StorageError",
        "TransportError",
        "TransportTimeoutError",
        "error_from_name",
    ],
}

NVFLARE_CLIENT_API = [
    "init",
    "receive",
    "send",
    "is_running",
    "system_info",
    "get_job_id",
    "get_site_name",
    "get_config",
    "is_train",
    "is_evaluate",
    "is_submit_model",
    "log",
    "clear",
    "shutdown",
    "FLModel",
    "ParamsType",
]


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_all_is_exactly_the_expected_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{module_name}.__all__ has duplicates"
    assert sorted(exported) == EXPECTED[module_name]


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_every_exported_name_resolves(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    namespace: dict[str, object] = {}
    exec(f"from {module_name} import *", namespace)  # star import of our own module
    assert set(EXPECTED[module_name]) <= set(namespace)


def test_client_has_the_nvflare_client_api() -> None:
    for name in NVFLARE_CLIENT_API:
        assert name in fedlift.client.__all__, name
        assert hasattr(fedlift.client, name), name
    for name in NVFLARE_CLIENT_API[:-2]:
        assert callable(getattr(fedlift.client, name)), name
    assert fedlift.client.FLModel is fedlift.FLModel
    assert fedlift.client.ParamsType.FULL.value == "FULL"
    assert fedlift.client.ParamsType.DIFF.value == "DIFF"


def test_algorithm_keys_are_nvflares() -> None:
    constants = fedlift.client.AlgorithmConstants
    assert constants is fedlift.model.AlgorithmConstants
    assert constants.SCAFFOLD_CTRL_GLOBAL == "scaffold_c_global"
    assert constants.SCAFFOLD_CTRL_DIFF == "scaffold_c_diff"
    assert constants.FEDPROX_MU == "fedprox_mu"
    assert fedlift.client.MetaKey.CONFIG == "config"


def test_keras_helpers_module_api() -> None:
    """``fedlift.client.keras`` imports TensorFlow, so it is outside EXPECTED's imports."""
    pytest.importorskip("tensorflow")
    module = importlib.import_module("fedlift.client.keras")
    assert sorted(module.__all__) == [
        "FedProxCallback",
        "FedProxLoss",
        "ScaffoldCallback",
        "TFFedProxLoss",
        "TFScaffoldHelper",
        "fedprox_mu",
        "get_fedprox_mu",
    ]
    assert all(hasattr(module, name) for name in module.__all__)


def test_pytorch_helpers_module_api() -> None:
    """``fedlift.client.pytorch`` imports torch, so it is outside EXPECTED's imports."""
    pytest.importorskip("torch")
    module = importlib.import_module("fedlift.client.pytorch")
    assert sorted(module.__all__) == [
        "PTFedProxLoss",
        "PTScaffoldHelper",
        "fedprox_mu",
        "get_fedprox_mu",
        "get_lr_values",
    ]
    assert all(hasattr(module, name) for name in module.__all__)


def test_lightning_module_api() -> None:
    """``fedlift.client.lightning`` is the Client API plus ``patch`` (as NVFlare's
    ``nvflare.client.lightning``); ``patch`` imports Lightning, the module does not."""
    module = importlib.import_module("fedlift.client.lightning")
    assert sorted(set(module.__all__) - set(fedlift.client.__all__)) == ["FL_META_KEY", "patch"]
    assert set(fedlift.client.__all__) <= set(module.__all__)
    assert all(hasattr(module, name) for name in module.__all__)


def test_top_level_objects_are_the_subpackage_objects() -> None:
    from fedlift.job import FedAvgJob, ScriptRunner
    from fedlift.simulator import SimulationResult, run_simulator

    assert fedlift.FedAvgJob is FedAvgJob
    assert fedlift.ScriptRunner is ScriptRunner
    assert fedlift.run_simulator is run_simulator
    assert fedlift.SimulationResult is SimulationResult
    assert fedlift.FedliftError is fedlift.errors.FedliftError
    assert fedlift.__version__ == "0.1.0"


def test_error_hierarchy() -> None:
    e = fedlift.errors
    for name in EXPECTED["fedlift.errors"][:-1]:
        assert issubclass(getattr(e, name), e.FedliftError), name
    assert issubclass(e.ConfigError, ValueError)
    assert issubclass(e.ProtocolError, ValueError)
    assert issubclass(e.ClientAPIError, RuntimeError)
    assert issubclass(e.ReceiveTimeoutError, e.ClientAPIError)
    assert issubclass(e.ReceiveTimeoutError, TimeoutError)
    assert issubclass(e.ConnectionLostError, e.TransportError)
    assert issubclass(e.TransportError, ConnectionError)
    assert issubclass(e.TransportTimeoutError, TimeoutError)
    assert issubclass(e.RoundTimeoutError, TimeoutError)
    assert issubclass(e.InvalidResultError, e.ClientFailedError)
    assert issubclass(e.ResourceLimitError, e.ProtocolError)
    assert issubclass(e.StorageError, OSError)


def test_errors_are_rebuilt_by_name() -> None:
    e = fedlift.errors
    rebuilt = e.error_from_name("ConfigError", "bad n_clients")
    assert type(rebuilt) is e.ConfigError and str(rebuilt) == "bad n_clients"
    unknown = e.error_from_name("KeyError", "'x'")
    assert type(unknown) is e.RemoteError and str(unknown) == "KeyError: 'x'"


def test_importing_fedlift_does_not_import_tensorflow() -> None:
    code = (
        "import sys, fedlift, fedlift.client, fedlift.server, fedlift.job, fedlift.simulator\n"
        "import fedlift.data\n"
        "heavy = ('tensorflow', 'keras', 'torch', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- source-wide rules


def source_files() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20  # the scan really sees the package
    return files


def test_no_assert_statements_in_the_package() -> None:
    found = []
    for path in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [
            f"{path.relative_to(SRC)}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Assert)
        ]
    assert found == [], "use explicit checks that raise FedliftError, not assert"


def test_no_pickle_imports_in_the_package() -> None:
    banned = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal"}
    found = []
    for path in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            found += [f"{path.relative_to(SRC)}:{node.lineno} {n}" for n in names if n in banned]
    assert found == []


def test_the_scanners_can_fail() -> None:
    """The AST checks above do catch the constructs they look for."""
    sample = ast.parse("import pickle\nfrom pickle import loads\nassert x\n")
    nodes = list(ast.walk(sample))
    assert sum(isinstance(n, ast.Assert) for n in nodes) == 1
    assert [n.names[0].name for n in nodes if isinstance(n, ast.Import)] == ["pickle"]
    assert [n.module for n in nodes if isinstance(n, ast.ImportFrom)] == ["pickle"]
