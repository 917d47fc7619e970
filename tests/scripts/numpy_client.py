"""A NumPy client for tests: adds (site_index + 1) * STEP to every array and reports metrics.

Options: --weight W (NUM_STEPS_CURRENT_ROUND of the targeted sites, default site_index + 1),
--diff (send a DIFF),
--drop-model (let go of the model after send(), not when the next one arrives),
--fail-round R (raise in round R), --exit-early R (return after round R), --hang-round R
(never answer round R), --kill-round R (SIGKILL its own process in round R), --only-site I
(the failure options apply to that site index only; default: all sites).

Hostile results: --nan-round R / --inf-round R (element 0 of the first leaf is NaN / Inf in
round R), --dtype D (send every leaf as dtype D, e.g. int8), --extra-key (send one key more),
--hostile (skip the Client API's checks of what it sends, e.g. a weight <= 0),
--die-every-round (SIGKILL on receiving any task: restarts run out).
Faults: --kill-before-init (SIGKILL before flare.init(), first start of the site only: a
marker file in its folder), --kill-after-send-round R (SIGKILL once send() of round R
returned, i.e. between rounds), --record-site (append "ROUND" to rounds.txt in its folder).
"""

import argparse
import os
import signal
import time

import numpy as np

import fedlift.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--step", type=float, default=1.0)
parser.add_argument("--weight", type=float, default=None)
parser.add_argument("--diff", action="store_true")
parser.add_argument("--fail-round", type=int, default=-1)
parser.add_argument("--exit-early", type=int, default=-1)
parser.add_argument("--hang-round", type=int, default=-1)
parser.add_argument("--kill-round", type=int, default=-1)
parser.add_argument("--only-site", type=int, default=-1)
parser.add_argument("--exit-round", type=int, default=-1)
parser.add_argument("--exit-code", type=int, default=3)
parser.add_argument("--kill-parent-round", type=int, default=-1)
parser.add_argument("--no-init", action="store_true")
parser.add_argument("--nan-round", type=int, default=-1)
parser.add_argument("--inf-round", type=int, default=-1)
parser.add_argument("--dtype", default=None)
parser.add_argument("--extra-key", action="store_true")
parser.add_argument(
    "--hostile", action="store_true", help="skip the Client API's own checks of what it sends"
)
parser.add_argument("--kill-before-init", action="store_true")
parser.add_argument("--kill-after-send-round", type=int, default=-1)
parser.add_argument("--die-every-round", action="store_true")
parser.add_argument("--linger", action="store_true")
parser.add_argument("--record", action="store_true", help="append pid/rank/round to rounds.txt")
parser.add_argument(
    "--scribble", action="store_true", help="overwrite the sent arrays as soon as send() returns"
)
parser.add_argument(
    "--signal-handler", action="store_true", help="install a SIGUSR1 handler (main thread only)"
)
parser.add_argument("--sleep", type=float, default=0.0, help="seconds of 'training' per round")
parser.add_argument(
    "--drop-model", action="store_true", help="let go of the round's model once it is answered"
)
parser.add_argument(
    "--lockstep", action="store_true", help="rank 0 waits for rank 1's record (like DDP's sync)"
)
args = parser.parse_args()

if args.no_init:
    time.sleep(3600)
if args.kill_before_init and not os.path.exists("killed-before-init"):
    # the worker runs in WORKSPACE/site-N: site index N - 1
    site_index = int(os.path.basename(os.getcwd()).rsplit("-", 1)[-1]) - 1
    if args.only_site in (-1, site_index):
        open("killed-before-init", "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
if args.signal_handler:
    signal.signal(signal.SIGUSR1, lambda *_: None)  # raises ValueError off the main thread
flare.init()
index = flare.system_info()["site_index"]
targeted = args.only_site in (-1, index)
if args.hostile and targeted:  # a hostile peer does not run fedlift's client-side checks
    import fedlift.client._api

    fedlift.client._api._validate_outgoing = lambda model: None


def shifted(tree, delta):
    if isinstance(tree, dict):
        return {k: shifted(v, delta) for k, v in tree.items()}
    if isinstance(tree, list):
        return [shifted(v, delta) for v in tree]
    return np.asarray(tree) + np.asarray(delta, dtype=np.asarray(tree).dtype)


while flare.is_running():
    model = flare.receive()
    rnd = model.current_round
    if targeted and rnd == args.fail_round:
        raise ValueError(f"deliberate failure in round {rnd}")
    if targeted and (rnd == args.kill_round or args.die_every_round):
        os.kill(os.getpid(), signal.SIGKILL)
    if targeted and rnd == args.hang_round:
        time.sleep(3600)
    if targeted and rnd == args.exit_round:
        raise SystemExit(args.exit_code)
    if targeted and rnd == args.kill_parent_round:
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(3600)
    if args.record:
        with open("rounds.txt", "a") as f:
            rank = os.environ.get("RANK", "-")
            gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
            f.write(f"{os.getpid()} {rank} {rnd} {model.params is not None} {gpus}\n")
    if args.lockstep and os.environ.get("RANK") == "0":
        deadline = time.monotonic() + 30
        while f" 1 {rnd} " not in open("rounds.txt").read() and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(args.sleep)
    new = shifted(model.params, (index + 1) * args.step)
    weight = args.weight if args.weight is not None and targeted else float(index + 1)
    out = flare.tree_sub(new, model.params) if args.diff else new
    if targeted and rnd in (args.nan_round, args.inf_round) and isinstance(out, dict):
        first = next(iter(out))
        leaf = np.array(out[first], dtype=np.asarray(out[first]).dtype, copy=True)
        leaf.reshape(-1)[0] = np.nan if rnd == args.nan_round else np.inf
        out = {**out, first: leaf}
    if targeted and args.dtype and isinstance(out, dict):
        out = {k: np.asarray(v).astype(args.dtype) for k, v in out.items()}
    if targeted and args.extra_key and isinstance(out, dict):
        out = {**out, "extra": np.zeros(1, np.float32)}
    flare.send(
        flare.FLModel(
            params_type=flare.ParamsType.DIFF if args.diff else flare.ParamsType.FULL,
            params=out,
            metrics={"accuracy": float(index + 1) + rnd, "site": index},
            meta={"NUM_STEPS_CURRENT_ROUND": weight},
        )
    )
    if args.scribble:  # send() has returned: the server must not see this
        for value in out.values() if isinstance(out, dict) else []:
            for array in value if isinstance(value, list) else [value]:
                array[...] = -1e9
    if targeted and rnd == args.kill_after_send_round:
        os.kill(os.getpid(), signal.SIGKILL)
    if args.drop_model:
        del model, new, out
    if targeted and rnd == args.exit_early:
        break
if args.linger:
    time.sleep(3600)
