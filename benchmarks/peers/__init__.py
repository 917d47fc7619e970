"""Peer frameworks (NVFlare, Flower) measured like fedlift's benchmark, each in its own venv.

``from benchmarks.peers import run_peer``; ``run_peer("nvflare", 10_000_000, 2, 6)`` returns
the fields of fedlift's ``Outcome`` plus ``peer``, ``version`` and ``round_s``;
``run_peer_wire`` the same with the peer deployed (Flower's SuperLink + SuperNodes, NVFlare's
POC mode). Nothing here imports fedlift, and the peer code runs only in
``benchmarks/.venvs/<peer>`` interpreters.
"""

from .common import PEERS, run_peer, run_peer_wire

__all__ = ["PEERS", "run_peer", "run_peer_wire"]
