"""What update compression costs in accuracy and saves in bytes, on real training.

``python -m benchmarks.compression`` runs the Keras example (``examples/cifar10-tf``) on its
embedded Fashion-MNIST subset (6,000 training images split over 2 sites, 1,000 test
images) in the simulator, 2 clients x 5 rounds, once per compression setting, all in one
run, and prints one table: the final global model's test accuracy, its difference from the
uncompressed run, and the bytes of results and of the global model before and after
encoding (from each round's record in ``metrics.jsonl``). Training is seeded and
deterministic (the script's ``--seed 0``: Keras' seeds and TensorFlow's op determinism), so
the uncompressed job, run twice, gives the same model both times (the table shows it), and
every difference is the compression's.

Goals (the wire-path issue): float16 and int8 within 0.5 points of the uncompressed run;
bytes on the wire cut 2x (float16) and about 4x (int8).

``--seeds N`` runs every row with seeds 0..N-1 and shows their mean (and each run);
``--rounds/--schemes`` (``;``-separated) pick a reduced run; ``--smoke`` runs int8 for one
round (CI: it proves the benchmark still runs); ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cifar10-tf"

SETTINGS: dict[str, tuple[str, str]] = {
    "none": ("none", "none"),
    "none (again)": ("none", "none"),
    "float16": ("float16", "none"),
    "bfloat16": ("bfloat16", "none"),
    "int8": ("int8", "none"),
    "topk 1%": ("topk", "none"),
    "int8, model float16": ("int8", "float16"),
    "int8, model int8": ("int8", "int8"),
}
"""Row name: (results scheme, model scheme)."""


@dataclass
class Row:
    setting: str
    results: str
    model: str
    accuracy: float
    difference: float
    result_bytes: int
    result_bytes_sent: int
    model_bytes: int
    model_bytes_sent: int
    seconds: float
    accuracies: list[float] = field(default_factory=list)

    @property
    def result_ratio(self) -> float:
        return self.result_bytes / max(self.result_bytes_sent, 1)

    @property
    def model_ratio(self) -> float:
        return self.model_bytes / max(self.model_bytes_sent, 1)


def run_one(setting: str, rounds: int, workspace: Path, seed: int = 0) -> Row:
    results, model = SETTINGS[setting]
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable, str(EXAMPLE / "tf_client_api_job.py"),
            "--n_clients", "2", "--num_rounds", str(rounds),
            "--compression", results, "--model_compression", model, "--top_k", "0.01",
            "--script_args", f"--seed {seed}", "--workspace", str(workspace),
        ],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        env={**os.environ, "FEDLIFT_DATASET": "embedded"},
        timeout=1800,
        check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"compression bench: {setting!r} failed:\n{done.stderr[-3000:]}")
    records = [
        json.loads(line)
        for line in (workspace / "server" / "metrics.jsonl").read_text().splitlines()
    ]
    final = [r for r in records if r["task"] == "validate"][-1]
    sizes = [0, 0, 0, 0]
    for r in records:
        info = r.get("extra", {}).get("compression")
        if r["task"] == "train" and info:
            sizes[0] += info["result_bytes"]
            sizes[1] += info["result_bytes_received"]
            sizes[2] += info["model_bytes"]
            sizes[3] += info["model_bytes_sent"]
    if not any(sizes):  # uncompressed: the records carry no byte counts; the same for both
        sizes = [-1, -1, -1, -1]
    return Row(setting, results, model, round(100 * float(final["metrics"]["accuracy"]), 2), 0.0,
               *sizes, round(seconds, 1))  # fmt: skip


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--schemes", default=";".join(SETTINGS), help="rows, ;-separated")
    parser.add_argument("--seeds", type=int, default=1, help="runs per row (seeds 0..N-1)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    names = ["int8"] if args.smoke else [s.strip() for s in args.schemes.split(";")]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"compression bench: unknown rows {unknown}; known: {list(SETTINGS)}")
    rounds = 1 if args.smoke else args.rounds
    print(f"compression: the Keras example on embedded Fashion-MNIST, 2 clients x {rounds} rounds")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fedlift-compress-") as scratch:
        for i, name in enumerate(names):
            runs = [run_one(name, rounds, Path(scratch) / f"ws{i}-{seed}", seed)
                    for seed in range(args.seeds)]  # fmt: skip
            row = runs[0]
            row.accuracies = [r.accuracy for r in runs]
            row.accuracy = round(sum(row.accuracies) / len(runs), 2)
            row.seconds = round(sum(r.seconds for r in runs) / len(runs), 1)
            rows.append(row)
            print(f"  {name}: {row.accuracies} % ({row.seconds:.0f} s a run)", flush=True)
    base = next((r.accuracy for r in rows if r.setting == "none"), rows[0].accuracy)
    print(f"\n{'setting':<22}{'accuracy %':>11}{'vs none':>9}{'results':>9}{'model':>8}"
          f"{'wall s':>8}")  # fmt: skip
    for r in rows:
        r.difference = round(r.accuracy - base, 2)
        ratio = f"{r.result_ratio:.2f}x" if r.result_bytes > 0 else "1x"
        model = f"{r.model_ratio:.2f}x" if r.model_bytes > 0 else "1x"
        print(f"{r.setting:<22}{r.accuracy:>11.2f}{r.difference:>+9.2f}{ratio:>9}{model:>8}"
              f"{r.seconds:>8.0f}")  # fmt: skip
    print("(results/model: bytes before encoding / bytes sent, over all rounds; goals: "
          "float16 and int8 within 0.5 points, 2x and ~4x fewer bytes)")  # fmt: skip
    if args.json is not None:
        payload = [{**asdict(r), "result_ratio": r.result_ratio, "model_ratio": r.model_ratio}
                   for r in rows]  # fmt: skip
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(args.json)
    return rows


if __name__ == "__main__":
    main()
