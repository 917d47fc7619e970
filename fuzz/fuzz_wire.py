"""Coverage-guided fuzzing of the wire decoder (atheris / libFuzzer).

    PYTHONPATH=src python fuzz/fuzz_wire.py -atheris_runs=100000 [-max_len=4096] [CORPUS]

Every input is decoded by ``fedlift.codec.decode`` and, if it decodes, rebuilt as a model by
``model_from_wire``. The only outcome allowed for a hostile input is a
:class:`~fedlift.errors.ProtocolError`; any other exception is a finding and crashes the run
(libFuzzer saves the input as ``crash-*``). A decoded message must also hold only arrays
that lie inside the input buffer, of an allowed dtype.

The first input byte picks how the rest is used, so that most inputs get past the prefix:

* 0: the bytes as they are (a raw frame);
* 1: the bytes become the JSON header of a frame with a correct prefix and a payload;
* 2: the bytes are XOR-ed over a valid frame of a real model (prefix lengths kept right);
* 3: the bytes drive a small grammar of headers (:func:`_grammar`): array specs with
  allowed, object and malformed dtypes, edge-case and huge shapes, right and lying offsets,
  model fields with nested structures, and a payload of the right size give or take a bit.

At exit the harness prints one line ``fuzz_wire: N inputs, D decoded, R refused``.
"""

from __future__ import annotations

import atexit
import json
import struct
import sys

import atheris

with atheris.instrument_imports(include=["fedlift"]):
    import numpy as np

    from fedlift.codec import ALLOWED_DTYPES, Message, decode, encode, model_from_wire, wire_code
    from fedlift.codec import model_to_wire as _to_wire
    from fedlift.errors import ProtocolError
    from fedlift.model import FLModel

_PREFIX = struct.Struct("<4sIQ")
_MAX = 1 << 20  # a decoder limit for the harness: claimed sizes above it must be refused
_COUNTS = {"inputs": 0, "decoded": 0, "refused": 0}


def _seed_frame() -> bytes:
    fields, arrays = _to_wire(
        FLModel(
            params={"dense": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3)]},
            optimizer_params={"m": np.zeros(2, np.int64)},
            metrics={"accuracy": 0.5},
            current_round=1,
            total_rounds=3,
            meta={"NUM_STEPS_CURRENT_ROUND": 4},
        )
    )
    message = Message("submit", {"site": "site-1", "task_id": "t", "model": fields}, arrays)
    return encode(message).tobytes()


_SEED = _seed_frame()


def _framed_header(raw: bytes) -> bytes:
    """``raw`` as the header of a frame, its last quarter reused as payload bytes."""
    cut = len(raw) - len(raw) // 4
    header, tail = raw[:cut], raw[cut:]
    data_start = (_PREFIX.size + len(header) + 63) // 64 * 64
    payload = (tail * (64 // max(len(tail), 1) + 1))[:64] if tail else b""
    total = data_start + len(payload)
    out = bytearray(total)
    _PREFIX.pack_into(out, 0, b"FLW1", len(header), total)
    out[_PREFIX.size : _PREFIX.size + len(header)] = header
    out[data_start:] = payload
    return bytes(out)


def _mutated_seed(raw: bytes) -> bytes:
    out = bytearray(_SEED)
    for i, byte in enumerate(raw):
        out[(i * 7 + byte) % len(out)] ^= byte
    if raw and raw[0] & 1:  # keep the lengths right, so the mutation reaches the header
        _PREFIX.pack_into(out, 0, b"FLW1", _PREFIX.unpack_from(_SEED)[1], len(out))
    return bytes(out)


_DTYPES: list[object] = [
    *sorted(ALLOWED_DTYPES),
    "|O",
    "<U4",
    "<c8",
    ">f4",
    "f4",
    "<M8[D]",
    "|V8",
    5,
    None,
    ["<f4"],
    {"d": 1},
    True,
]
_INTS = [0, 1, 2, 3, 7, 64, -1, -64, 2**31, 2**32, 2**62, 2**63, 2**64, 10**30, 1.0, True, "1"]


def _edge_int(fdp: atheris.FuzzedDataProvider) -> object:
    if fdp.ConsumeBool():
        return fdp.PickValueInList(_INTS)
    return fdp.ConsumeIntInRange(0, 1 << 20)


def _value(fdp: atheris.FuzzedDataProvider, depth: int) -> object:
    kind = fdp.ConsumeIntInRange(0, 6 if depth < 6 else 3)
    if kind == 0:
        return _edge_int(fdp)
    if kind == 1:
        return fdp.PickValueInList([0.5, float("nan"), float("inf"), -0.0, 1e308])
    if kind == 2:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))
    if kind == 3:
        return fdp.PickValueInList([None, True, False])
    if kind == 4:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 5:
        keys = ["d", "l", "structure", "count", "op", "x"]
        return {fdp.PickValueInList(keys): _value(fdp, depth + 1)
                for _ in range(fdp.ConsumeIntInRange(0, 3))}  # fmt: skip
    # a param-tree structure node, maybe malformed
    if fdp.ConsumeBool():
        return {"l": [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]}
    return {"d": [[fdp.PickValueInList(["a", "b", "a", 1]), _value(fdp, depth + 1)]
                  for _ in range(fdp.ConsumeIntInRange(0, 3))]}  # fmt: skip


def _grammar(raw: bytes) -> bytes:
    """A frame whose header is built from ``raw`` by a grammar (mode 3)."""
    fdp = atheris.FuzzedDataProvider(raw)
    specs: list[object] = []
    offset = 0
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        dtype = fdp.PickValueInList(_DTYPES)
        if fdp.ConsumeProbability() < 0.7:
            shape: object = [
                fdp.ConsumeIntInRange(0, 9) for _ in range(fdp.ConsumeIntInRange(0, 3))
            ]
        else:
            shape = [_edge_int(fdp) for _ in range(fdp.ConsumeIntInRange(0, 4))]
            if fdp.ConsumeProbability() < 0.1:
                shape = _value(fdp, 4)
        at: object = offset if fdp.ConsumeProbability() < 0.8 else _edge_int(fdp)
        spec: object = [dtype, shape, at]
        if fdp.ConsumeProbability() < 0.05:
            spec = _value(fdp, 4)
        specs.append(spec)
        size = 8
        if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 64 for d in shape):
            for d in shape:
                size *= d
        offset = (offset + size + 63) // 64 * 64
    count = len(specs) if fdp.ConsumeProbability() < 0.8 else _edge_int(fdp)
    structure: object = {"l": [None] * len(specs)} if fdp.ConsumeBool() else _value(fdp, 2)
    model: dict[str, object] = {"params": {"structure": structure, "count": count}}
    for key in ("params_type", "metrics", "meta", "current_round", "optimizer_params"):
        if fdp.ConsumeProbability() < 0.3:
            model[key] = _value(fdp, 3)
    header: dict[str, object] = {
        "op": fdp.PickValueInList(["submit", "", "x" * 129, 5]),
        "fields": {"site": "site-1", "task_id": "t", "model": model},
        "arrays": specs,
    }
    extra = fdp.ConsumeIntInRange(0, 19)
    if extra == 0:
        header[fdp.PickValueInList(["shm", "remote", "accept_shm", "extra"])] = _value(fdp, 3)
    elif extra == 1:  # a shared-memory reference: names that may exist, sizes that lie
        name = fdp.PickValueInList(["fedlift-a-1-1-0123abcd", "../etc/passwd", "fedlift-x\n"])
        header["shm"] = {"name": name, "size": _edge_int(fdp), "unlink": fdp.ConsumeBool()}
    elif extra == 2:  # a remote-memory reference: regions that lie about their size
        regions = [[_edge_int(fdp), _edge_int(fdp)] for _ in specs]
        header["remote"] = {"pid": fdp.PickValueInList([1, 0, -1, 2**31]), "regions": regions}
    text = json.dumps(header, separators=(",", ":")).encode()
    payload_len = max(0, offset + fdp.PickValueInList([0, 0, 0, 1, -1, 64, -64, 8]))
    if "shm" in header or "remote" in header:
        payload_len = 0 if fdp.ConsumeProbability() < 0.9 else 64
    data_start = (_PREFIX.size + len(text) + 63) // 64 * 64
    total = data_start + payload_len
    out = bytearray(total)
    _PREFIX.pack_into(out, 0, b"FLW1", len(text), total)
    out[_PREFIX.size : _PREFIX.size + len(text)] = text
    out[data_start:] = fdp.ConsumeBytes(payload_len).ljust(payload_len, b"\0")
    return bytes(out)


def frame_of(data: bytes) -> bytes:
    """The frame an input stands for (see the module docstring)."""
    if not data:
        return data
    mode, raw = data[0] % 4, data[1:]
    if mode == 0:
        return raw
    if mode == 1:
        return _framed_header(raw)
    if mode == 2:
        return _mutated_seed(raw)
    return _grammar(raw)


def check_one(frame: bytes, allow_shm: bool = False) -> bool:
    """Decode ``frame`` as a hostile peer's message: True if decoded, False if refused.
    ``allow_shm`` decodes as a same-host listener does (shared-memory and remote-memory
    references allowed; nothing is read from another process here).

    Raises anything else (a finding)."""
    try:
        message = decode(frame, _MAX, allow_shm=allow_shm)
        model = message.fields.get("model")
        model_from_wire(model if isinstance(model, dict) else {}, list(message.arrays))
    except ProtocolError:
        return False
    view = memoryview(frame)
    for array in message.arrays:
        if allow_shm and not isinstance(array, np.ndarray):
            continue  # a RemoteArray: a reference, read (and checked) only when used
        if not isinstance(array, np.ndarray) or wire_code(array.dtype) not in ALLOWED_DTYPES:
            raise AssertionError(f"decoded a non-allowed array: {type(array)} {array.dtype}")
        if array.nbytes > len(view):
            raise AssertionError(f"decoded {array.nbytes} bytes out of a {len(view)}-byte frame")
    return True


def test_one_input(data: bytes) -> None:
    _COUNTS["inputs"] += 1
    if check_one(frame_of(data), allow_shm=bool(data and data[0] & 4)):
        _COUNTS["decoded"] += 1
    else:
        _COUNTS["refused"] += 1


def _report() -> None:
    print(
        f"fuzz_wire: {_COUNTS['inputs']} inputs, {_COUNTS['decoded']} decoded, "
        f"{_COUNTS['refused']} refused",
        flush=True,
    )


def main() -> None:
    atexit.register(_report)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
