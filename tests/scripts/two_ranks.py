"""A tiny stand-in for torchrun: runs the command it is given as 2 ranks (RANK=0, RANK=1)."""

import os
import subprocess
import sys

procs = [
    subprocess.Popen([sys.executable, "-u", *sys.argv[1:]], env=dict(os.environ, RANK=str(r)))
    for r in range(2)
]
sys.exit(max(p.wait() for p in procs))
