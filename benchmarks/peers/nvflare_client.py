"""NVFlare client of the peer benchmark: no compute. Receive, add 1.0, send.

Runs inside NVFlare's client (in-process ScriptRunner). Standalone on purpose: NVFlare copies
it into the job. Appends ``recv``/``send`` timestamps to ``<--times>/<site>.txt``.
"""

import argparse
import time
from pathlib import Path

import nvflare.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--times", required=True)
args = parser.parse_args()

flare.init()
site = flare.get_site_name()
log = Path(args.times) / f"{site}.txt"
round_number = 0
while flare.is_running():
    model = flare.receive()
    received = time.time()
    params = {k: v + 1.0 for k, v in model.params.items()}
    with open(log, "a") as f:
        f.write(f"recv {round_number} {received:.6f}\nsend {round_number} {time.time():.6f}\n")
    flare.send(flare.FLModel(params=params))
    round_number += 1
