"""What an import loads: a training script's ``import fedlift.client`` stays light.

A training script imports ``fedlift.client`` first thing, in every process of every site,
and often before its framework; it must not pay for the server, the simulator, the job API,
deployment, rich or gRPC (the transport loads in ``init()``, which connects), nor import a
framework behind the script's back. Each check runs in a fresh interpreter: this test
process has imported everything long ago.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = [
    "fedlift.server",
    "fedlift.simulator",
    "fedlift.job",
    "fedlift.deploy",
    "fedlift.transport",
    "rich",
    "grpc",
    "cryptography",
    "tensorflow",
    "keras",
    "torch",
]
"""What ``import fedlift.client`` must not load."""

PROBE = """
import json, sys
def loaded():
    return sorted(m for m in {heavy!r} if m in sys.modules)
out = {{}}
{code}
print(json.dumps(out))
"""


def fresh(code: str) -> dict[str, object]:
    """Run ``code`` in a new interpreter; it fills ``out`` (``loaded()`` lists HEAVY ones)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY, code=code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_import_fedlift_client_loads_nothing_heavy() -> None:
    out = fresh(
        "import fedlift.client as flare\n"
        "out['client'] = loaded()\n"
        "from fedlift.errors import ClientAPIError\n"
        "try:\n"
        "    flare.init()\n"  # no job around this process: refused, after looking for one
        "except ClientAPIError:\n"
        "    out['refused'] = True\n"
        "out['after_init'] = loaded()\n"
        "import fedlift.job\n"
        "out['job'] = loaded()\n"
    )
    assert out["client"] == []
    assert out["refused"] is True
    # init() is where the transport (gRPC) loads: a script launched by its worker connects.
    assert {"grpc", "fedlift.transport"} <= set(out["after_init"])  # type: ignore[arg-type]
    assert "fedlift.server" not in out["after_init"]  # type: ignore[operator]
    # The probe does see imports: the job API loads the server (it configures FedAvg) ...
    assert "fedlift.server" in out["job"]  # type: ignore[operator]
    # ... but not the simulator, which sits above it and is handed to it late.
    assert "fedlift.simulator" not in out["job"]  # type: ignore[operator]


def test_top_level_names_load_on_first_use() -> None:
    out = fresh(
        "import fedlift\n"
        "out['bare'] = loaded()\n"
        "out['dir'] = [n for n in fedlift.__all__ if n not in dir(fedlift)]\n"
        "fedlift.FedAvgJob\n"
        "out['job'] = loaded()\n"
        "fedlift.run_simulator\n"
        "out['simulator'] = loaded()\n"
    )
    assert out["bare"] == []
    assert out["dir"] == []
    assert "fedlift.job" in out["job"] and "fedlift.simulator" not in out["job"]  # type: ignore[operator]
    assert "fedlift.simulator" in out["simulator"]  # type: ignore[operator]


def test_transport_loads_cryptography_only_for_identities() -> None:
    out = fresh(
        "import fedlift.transport as t\n"
        "out['transport'] = 'cryptography' in sys.modules\n"
        "from fedlift.transport._identity import identity_of\n"
        "out['same'] = t.identity_of is identity_of\n"
    )
    assert out == {"transport": False, "same": True}


def test_lazy_names_are_the_modules_objects() -> None:
    import fedlift
    import fedlift.model
    import fedlift.simulator
    from fedlift.model import _keras, _safetensors

    assert fedlift.model.save_safetensors is _safetensors.save_safetensors
    assert fedlift.model.is_keras_model is _keras.is_keras_model
    assert fedlift.simulator is fedlift.__getattr__("simulator")
    for module in (fedlift, fedlift.model):
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            module.__getattr__("nope")


def test_the_job_api_gets_the_simulator_from_the_top_package() -> None:
    from fedlift import _late
    from fedlift.errors import ConfigError
    from fedlift.simulator import run_simulator

    assert _late.load("run_simulator") is run_simulator
    with pytest.raises(ConfigError, match="Received: part='nope'"):
        _late.load("nope")


def test_the_simulation_outcome_protocol_has_the_results_members() -> None:
    """``FedAvgJob.simulator_run`` is typed with the job API's protocol (job may not import
    the simulator); it must name exactly what the simulator's result holds."""
    import dataclasses

    from fedlift.job import SimulationOutcome
    from fedlift.simulator import SimulationResult

    members = {n for n in vars(SimulationOutcome) if not n.startswith("_")}
    assert members == {f.name for f in dataclasses.fields(SimulationResult)}
