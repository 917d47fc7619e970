"""A NumPy client run as one of several ranks (RANK from the launcher): adds site_index + 1
to every array; rank 0 sends, the other ranks' send() only ends their round.

Every rank appends "PID PGID RANK ROUND" to ranks.txt in the site's folder; rank 0 waits
for rank 1's line of the round before it goes on (DDP's all-reduce keeps ranks in step). Faults:
--fail-round R (rank 1 raises in round R, and the other ranks keep "training"),
--kill-worker-round R (site-1's rank 0 SIGKILLs its worker, the launcher's parent, in round
R, while every rank of site-1 keeps "training"; once: the restarted site runs normally),
--stubborn (every rank ignores SIGTERM, and rank 1 never returns once the job has ended).
"""

import argparse
import os
import signal
import time

import fedlift.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--fail-round", type=int, default=-1)
parser.add_argument("--kill-worker-round", type=int, default=-1)
parser.add_argument("--stubborn", action="store_true")
args = parser.parse_args()

rank = os.environ.get("RANK", "0")
if args.stubborn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
flare.init()
index = flare.system_info()["site_index"]


def grandparent() -> int:
    with open(f"/proc/{os.getppid()}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


while flare.is_running():
    model = flare.receive()
    rnd = model.current_round
    with open("ranks.txt", "a") as f:
        f.write(f"{os.getpid()} {os.getpgrp()} {rank} {rnd}\n")
    deadline = time.monotonic() + 30
    while rank == "0" and time.monotonic() < deadline:  # in step, as DDP's all-reduce keeps them
        if any(line.split()[2:] == ["1", str(rnd)] for line in open("ranks.txt")):
            break
        time.sleep(0.01)
    if rnd == args.fail_round:
        if rank == "1":
            raise ValueError(f"rank 1 fails in round {rnd}")
        time.sleep(3600)  # "training" while the fault takes its course
    marker = f"worker-killed-by-{rank}"
    if rnd == args.kill_worker_round and index == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        if rank == "0":
            os.kill(grandparent(), signal.SIGKILL)
        time.sleep(3600)
    params = {k: v + (index + 1) for k, v in model.params.items()}
    flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
if args.stubborn and rank == "1":
    time.sleep(3600)
