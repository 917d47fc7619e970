"""Each simulated client's frameworks get their share of the cores (simulator/_threads.py):
n clients training at once on c cores get c // n compute threads each, at least one; a
thread variable the user set is passed on unchanged."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedlift import FedAvgJob, ScriptRunner
from fedlift.simulator._threads import THREAD_VARIABLES, compute_threads, thread_environment


@pytest.mark.parametrize(
    ("clients", "cores", "expected"),
    [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 8, 4), (3, 8, 2), (16, 16, 1), (0, 4, 4)],
)
def test_the_cores_are_shared_among_the_clients_training_at_once(
    clients: int, cores: int, expected: int
) -> None:
    assert compute_threads(clients, cores) == expected


def test_a_variable_the_user_set_is_not_overridden() -> None:
    env = thread_environment(2, {"OMP_NUM_THREADS": "3"}, cores=8)
    assert "OMP_NUM_THREADS" not in env
    assert env == {name: "4" for name in THREAD_VARIABLES if name != "OMP_NUM_THREADS"}


SCRIPT = textwrap.dedent(
    """
    import json, os
    import fedlift.client as flare
    flare.init()
    names = {names!r}
    while flare.is_running():
        model = flare.receive()
        seen = {{name: os.environ.get(name) for name in names}}
        with open("threads.json", "w") as handle:
            json.dump(seen, handle)
        flare.send(flare.FLModel(params=model.params))
    """
)


def test_simulated_clients_see_their_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")  # the user's choice goes through
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text(SCRIPT.format(names=list(THREAD_VARIABLES)))
    job = FedAvgJob("threads", 2, 1, {"w": np.zeros(2, np.float32)})
    job.to_clients(ScriptRunner(app / "client.py", framework="numpy"))
    ws = tmp_path / "ws"
    job.simulator_run(ws)
    share = str(compute_threads(2))
    for site in ("site-1", "site-2"):
        seen = json.loads((ws / site / "threads.json").read_text())
        assert seen == {
            "OMP_NUM_THREADS": share,
            "MKL_NUM_THREADS": "7",
            "OPENBLAS_NUM_THREADS": share,
            "TF_NUM_INTRAOP_THREADS": share,
        }
