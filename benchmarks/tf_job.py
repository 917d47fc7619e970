"""The flagship Keras job, timed as a user sees it: ``python -m benchmarks --tf-job [--peers]``.

The workload is the cifar10-tf example's: ``TFNet`` (``examples/cifar10-tf/src/tf_net.py``),
Adam, batch 64, one local epoch per round, 2 clients x 3 rounds, each site 2,000 training and
500 test samples of the embedded data set (``FEDLIFT_DATASET=embedded``; CIFAR-10 cannot be
downloaded here), then an evaluation of the final model on every site. Runs, one after the
other, each a subprocess timed from launch to exit (wall):

* **centralised**: ``src/cifar10_tf_original.py --epochs 3 --max_train 4000 --max_test 500``,
  one process, as many samples and epochs as the job trains in all;
* **fedlift**: ``tf_client_api_job.py --n_clients 2 --num_rounds 3 --script_args "--max_train
  2000 --max_test 500"`` (fedlift's simulator);
* with ``peers``: **NVFlare** (``peers/tf_nvflare_job.py``: ``FedJob``, ``FedAvg``,
  ``ScriptRunner`` of a Client API script, NVFlare's simulator) and **Flower**
  (``peers/tf_flower_app.py``: ``ClientApp`` + message-API ``FedAvg`` ``ServerApp``,
  ``run_simulation``, Ray with 1 CPU per client), each in its own venv
  (``benchmarks/.venvs/nvflare-tf``, ``flower-tf``: the pinned peer plus this venv's
  TensorFlow). The peers never import fedlift, so the harness first exports each site's exact
  arrays, as fedlift's script loads them (``tf_data.site_data``), to ``site-<i>.npz`` files that
  the peers' scripts read.

FL overhead: FL wall minus centralised wall, as a share of the centralised wall (goal for
fedlift: at most 25%, and below both peers'). Every run's final accuracy is printed to show
they trained the same thing; the 1-minute load average is noted before and after each run.
With ``peers``, a table and a JSON (default ``benchmarks/results/tf_job.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = ROOT / "examples" / "cifar10-tf"
SRC = EXAMPLE / "src"
PEERS_DIR = HERE / "peers"
DEFAULT_JSON = HERE / "results" / "tf_job.json"

CLIENTS = 2
ROUNDS = 3
MAX_TRAIN = 2000  # per site
MAX_TEST = 500
BATCH_SIZE = 64  # the example scripts' default
EPOCHS = 1  # per round: the example's federated script's default
GOAL = 0.25  # fedlift's FL overhead, as a share of the centralised wall
TIMEOUT_S = 1800.0
ACCURACY = re.compile(r"(?:final accuracy|Test accuracy): ([0-9.]+)")


def peer_venvs() -> dict[str, list[str]]:
    """The TF peers' venvs: the pinned peer (``peers.venvs.REQUIREMENTS``) plus this venv's
    TensorFlow, so both run the same TensorFlow and Keras as fedlift."""
    from benchmarks.peers.venvs import REQUIREMENTS

    tensorflow = f"tensorflow=={version('tensorflow')}"
    return {
        "nvflare": [*REQUIREMENTS["nvflare"], tensorflow],
        "flower": [*REQUIREMENTS["flower"], tensorflow],
    }


@dataclass
class Run:
    name: str
    command: list[str]
    wall_s: float = float("nan")
    accuracy: float | None = None
    returncode: int | None = None
    load_avg_before: float = float("nan")
    load_avg_after: float = float("nan")
    error: str | None = None
    walls_s: list[float] = field(default_factory=list)  # every repeat; wall_s is their median
    loads: list[tuple[float, float]] = field(default_factory=list)  # every repeat's, 1 min


@contextmanager
def _embedded() -> Iterator[None]:
    old = os.environ.get("FEDLIFT_DATASET")
    os.environ["FEDLIFT_DATASET"] = "embedded"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FEDLIFT_DATASET"]
        else:
            os.environ["FEDLIFT_DATASET"] = old


def export_sites(folder: Path) -> dict[str, str]:
    """Write ``site-<i>.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``, uint8 as the
    loader gives them) for every site: exactly what ``cifar10_tf_fl.py`` loads under fedlift
    (``site_data(site_index, num_sites, max_train=, max_test=)``, the IID split of a seeded
    shuffle; fedlift's site-i has site_index i - 1). Returns each file's SHA-256 of its arrays."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from tf_data import site_data

    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    with _embedded():
        for index in range(CLIENTS):
            (x_train, y_train), (x_test, y_test) = site_data(
                index, CLIENTS, max_train=MAX_TRAIN, max_test=MAX_TEST
            )
            arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
            name = f"site-{index + 1}"
            np.savez(folder / f"{name}.npz", **arrays)
            digest = hashlib.sha256()
            for value in arrays.values():
                digest.update(np.ascontiguousarray(value).tobytes())
            digests[name] = digest.hexdigest()
    return digests


def _env() -> dict[str, str]:
    env = dict(os.environ, FEDLIFT_DATASET="embedded", TF_CPP_MIN_LOG_LEVEL="2")
    env.update(PYTHONUNBUFFERED="1", RAY_DISABLE_USAGE_STATS="1")
    env.pop("PYTHONPATH", None)  # the peers must not see fedlift's sources
    return env


def timed(run: Run, cwd: Path, log: Path) -> None:
    """Run ``run.command`` once, wall from launch to exit; output to ``log``."""
    run.load_avg_before = os.getloadavg()[0]
    with open(log, "w") as out:
        start = time.perf_counter()
        try:
            done = subprocess.run(run.command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  env=_env(), timeout=TIMEOUT_S, check=False)  # fmt: skip
            run.returncode = done.returncode
        except subprocess.TimeoutExpired:
            run.returncode = -1
        wall = time.perf_counter() - start
    run.load_avg_after = os.getloadavg()[0]
    run.loads.append((run.load_avg_before, run.load_avg_after))
    text = log.read_text(errors="replace")
    if run.returncode != 0:
        run.error = f"exit {run.returncode}: {text[-3000:]}"
        return
    found = ACCURACY.findall(text)
    if not found:  # it did not get to the end of its training
        run.error = f"exit 0 but no final accuracy in its output: {text[-3000:]}"
        return
    run.walls_s.append(wall)
    run.wall_s = statistics.median(run.walls_s)
    run.accuracy = float(found[-1])


def commands(work: Path, peers: bool) -> list[tuple[Run, Path]]:
    """(run, its working directory), in the order they run."""
    python = sys.executable
    central = [python, str(SRC / "cifar10_tf_original.py"), "--epochs", str(ROUNDS * EPOCHS),
               "--max_train", str(CLIENTS * MAX_TRAIN), "--max_test", str(MAX_TEST)]  # fmt: skip
    fedlift = [python, "tf_client_api_job.py", "--n_clients", str(CLIENTS), "--num_rounds",
               str(ROUNDS), "--script_args", f"--max_train {MAX_TRAIN} --max_test {MAX_TEST}",
               "--workspace", str(work / "fedlift-ws")]  # fmt: skip
    runs = [(Run("fedlift", fedlift), EXAMPLE), (Run("centralised", central), work)]
    if not peers:
        return runs  # as ``--tf-job`` always ran them
    from benchmarks.peers.venvs import VENVS, python_of

    data, out = work / "data", work / "out"
    nvflare = [str(python_of(VENVS / "nvflare-tf")), str(PEERS_DIR / "tf_nvflare_job.py"),
               "--data", str(data), "--out", str(out / "nvflare"), "--workspace",
               str(work / "nvflare-ws"), "--n_clients", str(CLIENTS), "--num_rounds",
               str(ROUNDS), "--epochs", str(EPOCHS), "--batch_size", str(BATCH_SIZE)]  # fmt: skip
    flower = [str(python_of(VENVS / "flower-tf")), str(PEERS_DIR / "tf_flower_app.py"),
              "--data", str(data), "--out", str(out / "flower"), "--net-dir", str(SRC),
              "--ray-tmp", str(work / "ray"), "--clients", str(CLIENTS), "--rounds",
              str(ROUNDS), "--epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE)]  # fmt: skip
    (out / "flower").mkdir(parents=True, exist_ok=True)
    (work / "flower-cwd").mkdir(parents=True, exist_ok=True)
    return [
        (Run("centralised", central), work),
        (Run("fedlift", fedlift), EXAMPLE),
        (Run("nvflare", nvflare), work),
        (Run("flower", flower), work / "flower-cwd"),
    ]


def overhead(run: Run, central: Run) -> float:
    return (run.wall_s - central.wall_s) / central.wall_s


def _pct(value: float) -> str:
    return "-" if value != value else f"{100 * value:+.0f}%"


def print_table(runs: dict[str, Run], goal_lines: list[str]) -> None:
    central, fedlift = runs["centralised"], runs["fedlift"]
    print(f"TF job: {CLIENTS} clients x {ROUNDS} rounds, {MAX_TRAIN:,} train / {MAX_TEST} test "
          f"samples per site, batch {BATCH_SIZE}, {EPOCHS} epoch per round, embedded data; "
          f"centralised: {CLIENTS * MAX_TRAIN:,} samples x {ROUNDS * EPOCHS} epochs")  # fmt: skip
    print(f"{'run':<12} {'wall s':>8} {'FL overhead':>12} {'fedlift/this':>13} "
          f"{'final acc':>10} {'load 1m before -> after':>24}")  # fmt: skip
    for name, run in runs.items():
        if run.error:
            print(f"{name:<12} failed: {run.error.splitlines()[0] if run.error else ''}")
            continue
        fl = "-" if name == "centralised" else _pct(overhead(run, central))
        ratio = "-" if name in ("centralised", "fedlift") else f"{fedlift.wall_s / run.wall_s:.2f}x"
        acc = "?" if run.accuracy is None else f"{run.accuracy:.4f}"
        load = f"{run.load_avg_before:.2f} -> {run.load_avg_after:.2f}"
        print(f"{name:<12} {run.wall_s:>8.1f} {fl:>12} {ratio:>13} {acc:>10} {load:>24}")
    for line in goal_lines:
        print(line)


def goals(runs: dict[str, Run]) -> tuple[dict[str, object], list[str]]:
    central, fedlift = runs["centralised"], runs["fedlift"]
    if central.error or fedlift.error:
        return {}, ["goals: not measured (a run failed)"]
    mine = overhead(fedlift, central)
    result: dict[str, object] = {"fedlift_overhead_le_25pct": mine <= GOAL}
    lines = [f"goal: fedlift's FL overhead <= {100 * GOAL:.0f}%: "
             f"{'met' if mine <= GOAL else 'NOT met'} ({_pct(mine)})"]  # fmt: skip
    for name in ("nvflare", "flower"):
        peer = runs.get(name)
        if peer is None:
            continue
        if peer.error:
            lines.append(f"goal: below {name}'s overhead: not measured ({name} failed)")
            continue
        theirs = overhead(peer, central)
        result[f"fedlift_overhead_below_{name}"] = mine < theirs
        lines.append(f"goal: below {name}'s overhead ({_pct(theirs)}): "
                     f"{'met' if mine < theirs else 'NOT met'}")  # fmt: skip
    return result, lines


def main(peers: bool = False, json_path: Path | None = None, repeat: int = 1) -> int:
    """Run the job (and, with ``peers``, NVFlare's and Flower's) and the centralised script
    ``repeat`` times each, in turn; the wall is the median. Returns the exit status."""
    venv_errors: dict[str, str] = {}
    if peers:
        from benchmarks.peers.venvs import ensure_venv

        for name, requirements in peer_venvs().items():
            print(f"venv {name}-tf: {' '.join(requirements)}", flush=True)
            try:
                ensure_venv(f"{name}-tf", requirements)
            except (OSError, subprocess.SubprocessError) as exc:
                venv_errors[name] = f"could not make its venv: {exc}"
    with tempfile.TemporaryDirectory(prefix="fedlift-tf-job-") as tmp:
        work = Path(tmp)
        digests = export_sites(work / "data") if peers else {}
        plan = commands(work, peers)
        runs = {run.name: run for run, _ in plan}
        for name, error in venv_errors.items():
            runs[name].error = error
        load_start = os.getloadavg()[0]
        for attempt in range(repeat):
            for run, cwd in plan:
                if run.error:
                    continue
                timed(run, cwd, work / f"{run.name}-{attempt}.log")
                status = f"{run.walls_s[-1]:.1f} s" if not run.error else "failed"
                if peers or repeat > 1:
                    print(f"ran {run.name} ({attempt + 1}/{repeat}): {status}, load "
                          f"{run.load_avg_before:.2f} -> {run.load_avg_after:.2f}",
                          flush=True)  # fmt: skip
        load_end = os.getloadavg()[0]
    central, fedlift = runs["centralised"], runs["fedlift"]
    if not peers:  # what ``--tf-job`` always printed
        for run in (fedlift, central):
            if run.error:
                print(run.error, file=sys.stderr)
                return 1
        share = 100 * overhead(fedlift, central)
        print(f"seed TF job, 2 clients x 3 rounds, 2,000 samples each: {fedlift.wall_s:.1f} s "
              f"wall (target <= 15 s; NVFlare measured 25 s)")  # fmt: skip
        print(f"centralised, 4,000 samples x 3 epochs in one process: {central.wall_s:.1f} s "
              f"wall; FL overhead {share:.0f}% of it (goal <= 25%)")  # fmt: skip
        return 0
    print()
    met, goal_lines = goals(runs)
    print_table(runs, goal_lines)
    print(f"1-minute load average: {load_start:.2f} at the first run, {load_end:.2f} after "
          f"the last ({os.cpu_count()} CPUs)")  # fmt: skip
    rows = []
    for name, run in runs.items():
        row = asdict(run)
        if not run.error and not central.error:
            row["fl_overhead"] = None if name == "centralised" else overhead(run, central)
            if name not in ("centralised", "fedlift") and not fedlift.error:
                row["fedlift_wall_ratio"] = fedlift.wall_s / run.wall_s
        rows.append(row)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "tensorflow": version("tensorflow"),
        "peer_venvs": peer_venvs(),
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "repeat": repeat,
        "workload": {
            "clients": CLIENTS,
            "rounds": ROUNDS,
            "max_train": MAX_TRAIN,
            "max_test": MAX_TEST,
            "batch_size": BATCH_SIZE,
            "epochs": EPOCHS,
            "dataset": "embedded",
        },
        "site_data_sha256": digests,
    }
    path = json_path or DEFAULT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "goals": met, "results": rows}, indent=2) + "\n")
    print(f"results: {path}")
    return 0 if not any(run.error for run in runs.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tf_job",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--peers", action="store_true", help="also NVFlare and Flower")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; wall = median")
    parser.add_argument("--json", type=Path, default=None, help=f"default: {DEFAULT_JSON}")
    cli = parser.parse_args()
    sys.exit(main(peers=cli.peers, json_path=cli.json, repeat=cli.repeat))
