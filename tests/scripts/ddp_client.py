"""A PyTorch DDP client (gloo, CPU) for torchrun: one weight w, trained by one SGD step a
round on loss 0.5 * (w - y)^2 with y = 2 + 2 * RANK + 4 * site_index, so DDP's averaged
gradient is w - (3 + 4 * site_index). Only rank 0 sends, as in NVFlare's DDP examples.

Every rank appends "PID PGID RANK ROUND WORLD_SIZE" to ranks.txt in the site's folder.
Faults: --fail-round R (rank 1 raises in round R while rank 0 waits in the gradient
all-reduce), --kill-worker-round R (site-1's rank 0 SIGKILLs its worker, torchrun's parent,
in round R, once, while every rank of site-1 keeps "training"), --ready-file F (rank 0
creates F once round 1 has begun, then keeps "training").
"""

import argparse
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fedlift.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.5)
parser.add_argument("--fail-round", type=int, default=-1)
parser.add_argument("--kill-worker-round", type=int, default=-1)
parser.add_argument("--ready-file", default=None)
args = parser.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
flare.init()
site = flare.system_info()["site_index"]

model = torch.nn.Linear(1, 1, bias=False)
ddp = DistributedDataParallel(model)
optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)
x = torch.ones(1, 1)
y = torch.full((1, 1), 2.0 + 2.0 * rank + 4.0 * site)


def grandparent() -> int:
    with open(f"/proc/{os.getppid()}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


while flare.is_running():
    input_model = flare.receive()
    rnd = input_model.current_round
    with open("ranks.txt", "a") as f:
        f.write(f"{os.getpid()} {os.getpgrp()} {rank} {rnd} {world}\n")
    marker = f"worker-killed-by-{rank}"
    if rnd == args.kill_worker_round and site == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        if rank == 0:
            os.kill(grandparent(), signal.SIGKILL)
        time.sleep(3600)
    if args.ready_file and rnd == 1:
        if rank == 0 and site == 0:
            open(args.ready_file, "w").close()
        time.sleep(3600)
    model.load_state_dict(input_model.params)
    optimizer.zero_grad()
    if rnd == args.fail_round and rank == 1:
        raise ValueError(f"rank 1 fails in round {rnd}")
    loss = 0.5 * ((ddp(x) - y) ** 2).sum()
    loss.backward()  # rank 0 waits here for rank 1's gradient
    optimizer.step()
    if rank == 0:
        flare.send(flare.FLModel(params=model.state_dict(), meta={"NUM_STEPS_CURRENT_ROUND": 1}))
dist.destroy_process_group()
