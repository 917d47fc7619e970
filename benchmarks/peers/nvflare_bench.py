"""NVFlare's side of the benchmark; runs in ``benchmarks/.venvs/nvflare`` (never with fedlift).

``python -m benchmarks.peers.nvflare_bench --params N --clients C --rounds R`` (from the repo
root, with the NVFlare venv's python) builds a job with NVFlare's job API -- ``FedJob`` with
the ``FedAvg`` controller, a persistor of N float32 zeros in 10 arrays (``nvflare_persistor``)
and a ``ScriptRunner`` (in-process, framework NUMPY) of ``nvflare_client.py`` -- exports it,
then times ``nvflare simulator JOB -n C -t C`` (every client at once) as a subprocess and
prints one JSON line. The timing rules are in ``benchmarks.peers.common``.

NVFlare runs with its defaults. One of them bounds its round time from below: after each task
the simulator's client worker sleeps ``server.task_request_interval`` (2 s); the JSON carries
``task_request_interval`` (null: the default), and ``--task-request-interval 0.1`` shows what
the rest of NVFlare costs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.peers.common import ROOT, measure, model_sizes, outcome, peer_parser

HERE = Path(__file__).resolve().parent


def build_job(folder: Path, params: int, clients: int, rounds: int, times: Path) -> Path:
    """Export the NVFlare job into ``folder``; returns the job's directory."""
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.fuel.utils.constants import FrameworkType
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import ScriptRunner

    sys.path.insert(0, str(HERE))  # so FedJob sees a top-level module it copies into custom/
    from nvflare_persistor import ZerosPersistor

    job = FedJob(name="bench", min_clients=clients)
    job.to_server(ZerosPersistor(model_sizes(params)), id="persistor")
    job.to_server(FedAvg(num_clients=clients, num_rounds=rounds, persistor_id="persistor"))
    job.to_clients(
        ScriptRunner(
            script=str(HERE / "nvflare_client.py"),
            script_args=f"--times {times}",
            framework=FrameworkType.NUMPY,
        )
    )
    job.export_job(str(folder))
    return folder / "bench"


def set_task_request_interval(job: Path, seconds: float) -> None:
    """Set ``server.task_request_interval`` in the exported job (NVFlare's default: 2 s).

    The server hands it to clients with every task; the simulator's client worker sleeps that
    long after each task it processed, so it is a floor on NVFlare's round time.
    """
    path = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(path.read_text())
    config.setdefault("server", {})["task_request_interval"] = seconds
    path.write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = peer_parser("nvflare_bench", task_request_interval=True)
    args = parser.parse_args(argv)

    import nvflare

    with tempfile.TemporaryDirectory(prefix="peer-nvflare-") as tmp:
        work = args.keep or Path(tmp)
        times = work / "times"
        times.mkdir(parents=True, exist_ok=True)
        job = build_job(work / "jobs", args.params, args.clients, args.rounds, times)
        if args.task_request_interval is not None:
            set_task_request_interval(job, args.task_request_interval)
        nvflare_cli = Path(sys.executable).parent / "nvflare"
        command = [
            str(nvflare_cli),
            "simulator",
            str(job),
            "-w",
            str(work / "ws"),
            "-n",
            str(args.clients),
            "-t",
            str(args.clients),
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        timing = measure(
            command,
            times,
            args.rounds,
            args.timeout,
            cwd=ROOT,
            env=env,
            log=work / "log.txt",
            memory=not args.no_memory,
        )
    timing["task_request_interval"] = args.task_request_interval
    result = outcome("nvflare", nvflare.__version__, args.params, args.clients, timing)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
