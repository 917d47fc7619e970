"""What the peer benchmarks share: model shapes, timestamps, process-tree memory, ``run_peer``.

Stdlib only: this module is imported both by fedlift's interpreter (``run_peer``) and by the
peers' own venvs (``benchmarks.peers.nvflare_bench`` / ``flower_bench``), which never import
fedlift.

How a peer's rounds are timed (the same for every peer; see ``summarize``):

* each client appends ``recv <round> <time.time()>`` when ``receive`` returns the round's
  global model and ``send <round> <time.time()>`` just before it sends its result, one file
  per site in a folder the harness passes to the client script;
* round *r* starts when the last site has received round *r*'s model:
  ``start[r] = max over sites of recv[r]``;
* round *r* lasts ``start[r + 1] - start[r]``: the whole cycle (clients receive, add, send;
  the server aggregates, persists when the peer does, and sends the next model). With R rounds
  that is R - 1 measured rounds; the first is excluded from median/min/max, as in fedlift's
  benchmark, so R - 2 samples remain (``rounds >= 3``);
* startup is launch (just before the peer's process is started) to the end of round 0, taken
  as the first arrival of round 1's model at any site (``min over sites of recv[1]``);
* teardown is the last send of the last round (``max over sites``) to the peer's process exit.

Memory: peak RSS and PSS summed over the launched process and all its descendants, polled
every 50 ms from ``/proc/<pid>/smaps_rollup``. The measuring process marks itself a child
subreaper, so a daemon that double-forks stays in the tree (Ray's processes are plain
descendants anyway); what is left when the peer's process exited is killed and listed in
``lingering_pids``. ``load_avg_before``/``after`` (1-minute load) tell whether something
else competed for the CPUs during the run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS = ("nvflare", "flower")
N_ARRAYS = 10
MAX_RSS_MB = 16 * 1024  # the machine has 24 GiB; a peer run over this is killed
FIELDS = (
    "scenario",
    "params",
    "clients",
    "median_s",
    "min_s",
    "max_s",
    "startup_s",
    "teardown_s",
    "peak_rss_mb",
    "peak_pss_mb",
)


# ----------------------------------------------------------------------------- the model


def model_sizes(n_params: int, n_arrays: int = N_ARRAYS) -> list[int]:
    """Array sizes of the benchmark model, exactly as ``benchmarks.__main__.model_of``."""
    sizes = [n_params // n_arrays] * n_arrays
    sizes[-1] += n_params - sum(sizes)
    return sizes


def scenario_name(params: int, clients: int) -> str:
    """The name fedlift's benchmark gives the scenario: ``"10M params, 2 clients"``."""
    if params >= 1_000_000 and params % 1_000_000 == 0:
        size = f"{params // 1_000_000}M"
    elif params >= 1000 and params % 1000 == 0:
        size = f"{params // 1000}k"
    else:
        size = str(params)
    return f"{size} params, {clients} clients"


# ----------------------------------------------------------------------------- timestamps


def append_event(folder: str | Path, site: str, kind: str, round_number: int) -> None:
    """One line ``kind round time`` in ``folder/site.txt`` (what the clients call)."""
    with open(Path(folder) / f"{site}.txt", "a") as f:
        f.write(f"{kind} {round_number} {time.time():.6f}\n")


def read_events(folder: str | Path) -> dict[str, dict[str, dict[int, float]]]:
    """``{site: {"recv": {round: t}, "send": {round: t}}}`` from a timestamp folder."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for path in sorted(Path(folder).glob("*.txt")):
        events: dict[str, dict[int, float]] = {"recv": {}, "send": {}}
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 3 or parts[0] not in events:
                continue
            events[parts[0]][int(parts[1])] = float(parts[2])
        out[path.stem] = events
    return out


def round_starts(events: dict[str, dict[str, dict[int, float]]], rounds: int) -> list[float]:
    """``start[r] = max over sites of recv[r]`` for every round all sites received."""
    starts = []
    for r in range(rounds):
        times = [e["recv"].get(r) for e in events.values()]
        if not times or any(t is None for t in times):
            break
        starts.append(max(t for t in times if t is not None))
    return starts


def summarize(
    events: dict[str, dict[str, dict[int, float]]],
    rounds: int,
    launched: float,
    exited: float,
) -> dict[str, object]:
    """Round, startup and teardown seconds from the clients' timestamps (see module doc)."""
    if len(events) == 0:
        raise ValueError("no client wrote a timestamp: the peer's clients never ran")
    if rounds < 3:
        raise ValueError(f"rounds must be >= 3 to time a round after the first; got {rounds}")
    starts = round_starts(events, rounds)
    if len(starts) < rounds:
        raise ValueError(f"only {len(starts)} of {rounds} rounds reached every site")
    durations = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    samples = durations[1:]
    first_end = min(e["recv"][1] for e in events.values())
    last_send = max(e["send"].get(rounds - 1, float("nan")) for e in events.values())
    if last_send != last_send:  # nan: a site never sent the last round
        raise ValueError("a site never sent its last round")
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "startup_s": first_end - launched,
        "teardown_s": exited - last_send,
        "round_s": durations,
    }


# ----------------------------------------------------------------------------- memory


def become_subreaper() -> bool:
    """Make orphaned descendants reparent to this process (Linux); False if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def process_tree(root: int) -> list[int]:
    """``root`` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_memory(pids: Iterable[int]) -> tuple[float, float]:
    """Summed RSS and PSS in MiB of ``pids`` (processes that vanished count 0)."""
    rss = pss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss / 1024, pss / 1024


def tree_rss(pids: Iterable[int]) -> float:
    """Summed RSS in MiB of ``pids``, from ``statm`` (cheap: no page-table walk)."""
    pages = 0
    for pid in pids:
        try:
            pages += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class TreePoller:
    """Peak summed RSS/PSS of the descendants of ``root`` (``root`` itself unless excluded).

    Reading ``smaps_rollup`` walks every page table of every process: ~10 ms of CPU for a
    tree of nine processes here, every ``interval``. So timed runs poll with ``pss=False``
    (RSS from ``statm``, for the memory guard only) and memory is measured in a run of its
    own (see :func:`measure`).
    """

    def __init__(
        self, root: int, interval: float = 0.05, include_root: bool = True, pss: bool = True
    ) -> None:
        self.root = root
        self.interval = interval
        self.include_root = include_root
        self.pss = pss
        self.peak_rss = self.peak_pss = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def pids(self) -> list[int]:
        pids = process_tree(self.root)
        return pids if self.include_root else [p for p in pids if p != self.root]

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = self.pids()
            rss, pss = tree_memory(pids) if self.pss else (tree_rss(pids), 0.0)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> TreePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- running


def kill_descendants(grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, what is left below this process (ours: we are its subreaper)."""
    me = os.getpid()
    left = [p for p in process_tree(me) if p != me]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
            left = [p for p in process_tree(me) if p != me]
            if not left:
                return []
            time.sleep(0.1)
    return left


def measure(
    command: Sequence[str],
    events_dir: Path,
    rounds: int,
    timeout: float,
    cwd: Path,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    max_rss_mb: float = MAX_RSS_MB,
    memory: bool = True,
) -> dict[str, object]:
    """Launch ``command``, poll its tree's memory until it exits, time its rounds.

    The run is killed (and an error raised) past ``timeout`` seconds or when the tree's RSS
    goes over ``max_rss_mb``. ``memory=False``: a timed run, with only the cheap RSS poll
    of the guard (its peak RSS and PSS are reported as 0); the PSS poll costs CPU that the
    framework would otherwise have.
    """
    subreaper = become_subreaper()
    load_before = os.getloadavg()[0]
    out = open(log, "wb") if log else subprocess.DEVNULL
    try:
        launched = time.time()
        proc = subprocess.Popen(
            list(command), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        # With the subreaper set, orphans land on us: poll everything below us.
        root = os.getpid() if subreaper else proc.pid
        interval = 0.05 if memory else 0.25  # without PSS, the poll is only the guard
        with TreePoller(root, interval=interval, include_root=not subreaper, pss=memory) as poller:
            deadline = time.monotonic() + timeout
            while (code := proc.poll()) is None:
                why = ""
                if time.monotonic() > deadline:
                    why = f"ran past {timeout:.0f} s"
                elif poller.peak_rss > max_rss_mb:
                    why = f"went over {max_rss_mb:.0f} MB RSS ({poller.peak_rss:.0f} MB)"
                if why:
                    proc.kill()
                    proc.wait()
                    kill_descendants()
                    raise RuntimeError(f"{command[0]} {why}; killed")
                time.sleep(0.01)
            exited = time.time()
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    lingering = kill_descendants() if subreaper else []
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise RuntimeError(f"{command[0]} exited with {code}:\n{tail}")
    result = summarize(read_events(events_dir), rounds, launched, exited)
    result.update(
        peak_rss_mb=poller.peak_rss if memory else 0.0,
        peak_pss_mb=poller.peak_pss,
        memory_samples=poller.samples,
        lingering_pids=lingering,
        load_avg_before=load_before,
        load_avg_after=os.getloadavg()[0],
    )
    return result


def run_peer(
    peer: str,
    params: int,
    clients: int,
    rounds: int,
    timeout: float = 1800.0,
    extra_args: Sequence[str] = (),
    memory: bool = True,
) -> dict[str, object]:
    """Run one scenario with ``peer`` ("nvflare" or "flower") in its own venv.

    Creates the venv on first use (``benchmarks/.venvs/<peer>``), then runs
    ``<venv>/bin/python -m benchmarks.peers.<peer>_bench`` and returns its JSON: the fields
    of fedlift's ``Outcome`` plus ``peer``, ``version``, ``round_s`` (every measured round)
    and a few diagnostics. ``extra_args`` go to the peer's module (e.g. NVFlare's
    ``["--task-request-interval", "0.1"]``). Raises ``RuntimeError`` when the run fails,
    goes past ``timeout`` seconds or over ``MAX_RSS_MB``. ``memory=False``: a timed run
    without the PSS poll (see :func:`measure`).
    """
    from .venvs import ensure_peer, python_of

    if peer not in PEERS:
        raise ValueError(f"peer must be one of {PEERS}; got {peer!r}")
    venv = ensure_peer(peer)
    command = [
        str(python_of(venv)),
        "-m",
        f"benchmarks.peers.{peer}_bench",
        f"--params={params}",
        f"--clients={clients}",
        f"--rounds={rounds}",
        f"--timeout={timeout}",
        *([] if memory else ["--no-memory"]),
        *extra_args,
    ]
    return _run_json(peer, command, timeout + 120)


WIRE_MODULES = {"nvflare": "nvflare_poc", "flower": "flower_deploy"}
"""Each peer's deployment over loopback: NVFlare's POC mode, Flower's Deployment Runtime."""


def run_peer_wire(
    peer: str,
    params: int,
    clients: int,
    rounds: int,
    tls: bool = True,
    timeout: float = 1800.0,
    extra_args: Sequence[str] = (),
    memory: bool = True,
) -> dict[str, object]:
    """Like :func:`run_peer`, with the peer deployed (its processes talk over loopback).

    ``"nvflare"``: POC mode (``benchmarks.peers.nvflare_poc``), always mutual TLS (NVFlare's
    POC default; ``tls=False`` is refused). ``"flower"``: a SuperLink and C SuperNodes
    (``benchmarks.peers.flower_deploy``), TLS to the SuperLink or, ``tls=False``, insecure.
    The same JSON as ``run_peer``, plus ``deployment``, ``tls`` and ``phases_after_last_send``
    (when each step of the driver ended: the run, the services' stop).
    """
    from .venvs import ensure_peer, python_of

    if peer not in WIRE_MODULES:
        raise ValueError(f"peer must be one of {tuple(WIRE_MODULES)}; got {peer!r}")
    if peer == "nvflare" and not tls:
        raise ValueError("NVFlare's POC mode runs with mutual TLS only here (tls=True)")
    venv = ensure_peer(peer)
    command = [
        str(python_of(venv)),
        "-m",
        f"benchmarks.peers.{WIRE_MODULES[peer]}",
        f"--params={params}",
        f"--clients={clients}",
        f"--rounds={rounds}",
        f"--timeout={timeout}",
        *(["--tls"] if tls and peer == "flower" else []),
        *([] if memory else ["--no-memory"]),
        *extra_args,
    ]
    return _run_json(peer, command, timeout + 300)


def _run_json(peer: str, command: list[str], timeout: float) -> dict[str, object]:
    """Run a peer module; its last JSON line (``RuntimeError`` when it fails)."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(
            f"{peer} benchmark failed ({done.returncode}):\n{done.stdout[-2000:]}"
            f"\n{done.stderr[-4000:]}"
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{peer} benchmark printed no JSON:\n{done.stdout[-2000:]}")
    result: dict[str, object] = json.loads(lines[-1])
    return result


def outcome(
    peer: str, version: str, params: int, clients: int, timing: dict[str, object]
) -> dict[str, object]:
    """The JSON line a peer benchmark prints: ``Outcome``'s fields first, then the extras."""
    out: dict[str, object] = {
        "scenario": scenario_name(params, clients),
        "params": params,
        "clients": clients,
    }
    for key in FIELDS[3:]:
        out[key] = timing[key]
    out["peer"] = peer
    out["version"] = version
    for key, value in timing.items():
        out.setdefault(key, value)
    return out


def peer_parser(module: str, *, task_request_interval: bool = False) -> argparse.ArgumentParser:
    """The arguments every peer benchmark takes (``python -m benchmarks.peers.<module>``);
    ``task_request_interval``: NVFlare's polling override too."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.peers.{module}")
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "--no-memory", action="store_true", help="a timed run: no PSS poll (it costs CPU)"
    )
    if task_request_interval:
        parser.add_argument(
            "--task-request-interval",
            type=float,
            default=None,
            help="override NVFlare's server.task_request_interval (default: NVFlare's, 2 s)",
        )
    parser.add_argument("--keep", type=Path, default=None, help="keep the workdir here")
    return parser
