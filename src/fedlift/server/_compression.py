"""The server's half of update compression: a :class:`~fedlift.server.Filter`.

It encodes the global model each task carries (``Compression.model``), asks the sites to
encode their results (``Compression.results``, through the task's meta; the site's worker
does it, see :class:`fedlift.codec.ResultEncoder`), decodes each result against the
layout of the model it answers before any strategy sees it, and counts the bytes before
and after, which the round loop writes into the round's record (``metrics.jsonl``) and
its printed line. Being a filter, it works with every strategy alike.
"""

from __future__ import annotations

import threading
from typing import Any

from ..codec import (
    COMPRESSION_KEY,
    REQUEST_KEY,
    Compression,
    Layout,
    decode_model,
    encode_model,
    layout_of,
    wire_bytes,
)
from ..errors import ConfigError, InvalidResultError
from ..model import FLModel

__all__ = ["CompressionFilter", "compression_line"]


class CompressionFilter:
    """Encodes tasks and decodes results as ``spec`` (a :class:`~fedlift.codec.Compression`)
    says; one per run (it remembers the layout of the last model it sent)."""

    def __init__(self, spec: Compression) -> None:
        if not isinstance(spec, Compression):
            raise ConfigError(
                "CompressionFilter takes a fedlift.codec.Compression such as "
                f"Compression(results='int8'); received: {spec!r:.80}."
            )
        self.spec = spec
        self._layout: Layout | None = None
        self._lock = threading.Lock()
        self._counts = [0, 0, 0, 0]  # model raw, model sent, results raw, results received

    def on_task(self, task: FLModel) -> FLModel:
        raw = wire_bytes(task)
        if task.params is not None:
            self._layout = layout_of(task.params)
        out = encode_model(task, self.spec.model, block_size=self.spec.block_size)
        if self.spec.results != "none":
            out.meta = {**out.meta, REQUEST_KEY: self.spec.to_json()}
        with self._lock:
            self._counts[0] += raw
            self._counts[1] += wire_bytes(out)
        return out

    def on_result(self, site: str, result: FLModel) -> FLModel:
        received = wire_bytes(result)
        if COMPRESSION_KEY in result.meta:
            if self._layout is None:
                raise InvalidResultError(
                    f"site {site!r} sent compressed params for a task that carried no model."
                )
            result = decode_model(result, self._layout, who=f"site {site!r}")
        raw = wire_bytes(result) if result.params is not None else received
        with self._lock:
            self._counts[2] += raw
            self._counts[3] += received
        return result

    def summary(self) -> dict[str, Any]:
        """Bytes since the last call: the model per task copy before and after encoding, and
        the results before decoding (as received) and after."""
        with self._lock:
            model_raw, model_sent, results_raw, results_received = self._counts
            self._counts = [0, 0, 0, 0]
        return {
            "compression": {
                "model": self.spec.model,
                "results": self.spec.results,
                "model_bytes": model_raw,
                "model_bytes_sent": model_sent,
                "result_bytes": results_raw,
                "result_bytes_received": results_received,
            }
        }


def compression_line(extra: dict[str, Any]) -> str:
    """What a round's record says about compression, for its printed line ("" if none):
    ``results 40.0 MB -> 10.2 MB (int8, 3.9x)``."""
    info = extra.get("compression")
    if not isinstance(info, dict):
        return ""
    parts = []
    for side, raw_key, sent_key in (
        ("model", "model_bytes", "model_bytes_sent"),
        ("results", "result_bytes", "result_bytes_received"),
    ):
        scheme, raw, sent = info.get(side), info.get(raw_key), info.get(sent_key)
        if scheme in (None, "none") or not isinstance(raw, int) or not isinstance(sent, int):
            continue
        ratio = f", {raw / sent:.1f}x" if sent else ""
        parts.append(f"{side} {_mb(raw)} -> {_mb(sent)} ({scheme}{ratio})")
    return "; ".join(parts)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"
