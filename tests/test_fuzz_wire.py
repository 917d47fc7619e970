"""Hostile input to the wire decoder (``decode``/``decode_frame``, ``model_from_wire``):
property-based (hypothesis) and coverage-guided (atheris, ``fuzz/fuzz_wire.py``).

The one outcome allowed for a hostile frame is a :class:`ProtocolError` (never another
exception, never an array outside the received buffer), and huge claimed sizes are refused
before anything is allocated (peak RSS measured in a fresh process).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlift.codec import (
    ALLOWED_DTYPES,
    PREFIX_BYTES,
    Message,
    decode,
    decode_frame,
    encode,
    model_from_wire,
    model_to_wire,
    wire_code,
    wire_dtype,
)
from fedlift.errors import ProtocolError
from fedlift.model import FLModel, flatten

ROOT = Path(__file__).resolve().parent.parent
PREFIX = struct.Struct("<4sIQ")
FULL = os.environ.get("FEDLIFT_RELIABILITY_FULL") == "1"
EXAMPLES = 3000 if FULL else 300


def frame(header: Any, payload: bytes = b"", header_len: int | None = None) -> bytearray:
    """A hand-built frame: prefix, a JSON (or raw) header, padding to 64, then ``payload``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    data_start = (PREFIX_BYTES + len(raw) + 63) // 64 * 64
    total = data_start + len(payload)
    out = bytearray(total)
    PREFIX.pack_into(out, 0, b"FLW1", len(raw) if header_len is None else header_len, total)
    out[PREFIX_BYTES : PREFIX_BYTES + len(raw)] = raw
    out[data_start:] = payload
    return out


def head(arrays: list[Any], fields: Any = None, op: Any = "x", **extra: Any) -> dict[str, Any]:
    return {"op": op, "fields": {} if fields is None else fields, "arrays": arrays, **extra}


def model_frame() -> bytes:
    fields, arrays = model_to_wire(
        FLModel(
            params={"dense": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3)]},
            optimizer_params={"m": np.zeros(2, np.int64)},
            metrics={"accuracy": 0.5},
            current_round=1,
        )
    )
    return encode(Message("submit", {"site": "site-1", "model": fields}, arrays)).tobytes()


VALID = model_frame()


def with_total(data: bytes | bytearray, total: int) -> bytearray:
    out = bytearray(data)
    PREFIX.pack_into(out, 0, b"FLW1", PREFIX.unpack_from(out)[1], total)
    return out


def refuse(data: bytes | bytearray, max_bytes: int = 1 << 40, allow_shm: bool = False) -> str:
    """Decode a hostile frame (and its model): it must raise ProtocolError; its message."""
    try:
        message = decode(data, max_bytes, allow_shm=allow_shm)
        model = message.fields.get("model")
        if model is not None:
            model_from_wire(model, list(message.arrays))
    except ProtocolError as exc:
        return str(exc)
    raise AssertionError(f"a hostile frame of {len(data)} bytes was accepted")


def decode_or_refuse(data: bytes | bytearray, allow_shm: bool = False) -> bool:
    """True if decoded (arrays checked to lie inside ``data``), False if refused; anything
    other than ProtocolError propagates (a finding)."""
    try:
        message = decode(data, 1 << 24, allow_shm=allow_shm)
        model = message.fields.get("model")
        model_from_wire(model if isinstance(model, dict) else {}, list(message.arrays))
    except ProtocolError:
        return False
    buffer = np.frombuffer(bytes(data), np.uint8) if isinstance(data, bytes) else None
    for array in message.arrays:
        if not isinstance(array, np.ndarray):
            continue  # remote/shared references (allow_shm): nothing read yet
        assert wire_code(array.dtype) in ALLOWED_DTYPES
        if buffer is None and isinstance(data, bytearray):
            low = np.frombuffer(data, np.uint8).__array_interface__["data"][0]
            high = low + len(data)
        else:
            continue
        if array.nbytes:
            start = array.__array_interface__["data"][0]
            assert low <= start and start + array.nbytes <= high, "an array outside the frame"
    return True


# ------------------------------------------------------------ 57+ kinds of malformed frame

D = 64  # one aligned payload block
UNPADDED = PREFIX_BYTES + len(json.dumps(head([])))  # a frame that stops right after its header
MALFORMED: list[tuple[str, Callable[[], bytes | bytearray], str]] = [
    ("wrong-magic", lambda: b"HTTP" + VALID[4:], "fedlift magic"),
    ("empty", lambda: b"", "shorter than the 16-byte prefix"),
    ("3-bytes", lambda: VALID[:3], "shorter than"),
    ("15-bytes", lambda: VALID[:15], "shorter than"),
    ("truncated-1", lambda: VALID[:-1], "but"),
    ("truncated-64", lambda: VALID[:-64], "but"),
    ("truncated-to-header", lambda: VALID[:40], "but"),
    ("extra-byte", lambda: VALID + b"\0", "but"),
    ("extra-block", lambda: VALID + bytes(64), "but"),
    ("total-lies-low", lambda: with_total(VALID, len(VALID) - 64), "announces"),
    ("total-lies-high", lambda: with_total(VALID, len(VALID) + 64), "announces"),
    ("total-claims-2^63", lambda: with_total(VALID, 2**63), "announces"),
    ("total-claims-2^64-1", lambda: with_total(VALID, 2**64 - 1), "announces"),
    ("header-len-past-end", lambda: frame(head([]), header_len=10_000), "out of bounds"),
    ("header-len-2^32-1", lambda: frame(head([]), header_len=2**32 - 1), "out of bounds"),
    ("header-len-short", lambda: frame(head([]), header_len=5), "not valid JSON"),
    (
        "header-unpadded",
        lambda: with_total(frame(head([]))[:UNPADDED], UNPADDED),
        "ends inside the padding",
    ),  # fmt: skip
    ("header-syntax", lambda: frame(b"{not json"), "not valid JSON"),
    ("header-bytes", lambda: frame(b"\xff\xfe\x00garbage"), "not valid JSON"),
    ("header-unbalanced", lambda: frame(b'{"op":"x","fields":{},"arrays":[}'), "not valid JSON"),
    ("header-huge-int", lambda: frame(b'{"op":"x","fields":{"n":' + b"9" * 5000 + b"}}"), "JSON"),
    ("header-deep-100k", lambda: frame(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    ("header-list", lambda: frame([]), "must be an object"),
    ("header-string", lambda: frame("text"), "must be an object"),
    ("header-null", lambda: frame(None), "must be an object"),
    ("header-no-arrays", lambda: frame({"op": "x", "fields": {}}), "must be an object"),
    ("header-no-op", lambda: frame({"fields": {}, "arrays": []}), "must be an object"),
    ("header-extra-key", lambda: frame(head([], extra=1)), "must be an object"),
    ("op-empty", lambda: frame(head([], op="")), "op must be"),
    ("op-int", lambda: frame(head([], op=5)), "op must be"),
    ("op-null", lambda: frame(head([], op=None)), "op must be"),
    ("op-129-chars", lambda: frame(head([], op="x" * 129)), "op must be"),
    ("fields-list", lambda: frame(head([], fields=[1])), "fields must be a JSON object"),
    ("arrays-object", lambda: frame({"op": "x", "fields": {}, "arrays": {}}), "JSON list"),
    *[
        (f"dtype-{name}", lambda d=d: frame(head([[d, [2], 0]]), bytes(D)), "not allowed")  # type: ignore[misc]
        for name, d in [
            ("object", "|O"),
            ("unicode", "<U4"),
            ("complex", "<c8"),
            ("big-endian", ">f4"),
            ("no-order", "f4"),
            ("datetime", "<M8[D]"),
            ("void", "|V8"),
            ("int", 5),
            ("null", None),
            ("list", ["<f4"]),
        ]
    ],  # fmt: skip
    *[
        (f"shape-{name}", lambda s=s: frame(head([["<f4", s, 0]]), bytes(D)), "shape")  # type: ignore[misc]
        for name, s in [
            ("negative", [-1]),
            ("negative-2nd", [2, -3]),
            ("float", [1.5]),
            ("string", ["2"]),
            ("bool", [True]),
            ("int", 4),
            ("null", None),
            ("33-dims", [1] * 33),
            ("overflow", [0, 10**30]),
            ("too-big-empty", [0, 2**62, 2**62]),
            ("huge", [2**40, 2**40, 2**40]),
        ]
    ],  # fmt: skip
    ("spec-short", lambda: frame(head([["<f4", [1]]]), bytes(D)), "spec must be"),
    ("spec-string", lambda: frame(head(["spec"]), bytes(D)), "spec must be"),
    ("spec-long", lambda: frame(head([["<f4", [1], 0, 0]]), bytes(D)), "spec must be"),
    ("spec-null", lambda: frame(head([None]), bytes(D)), "spec must be"),
    ("offsets-overlap", lambda: frame(head([["<f4", [4], 0]] * 2), bytes(2 * D)), "expected 64"),
    *[
        (f"offset-{name}", lambda o=o: frame(head([["<f4", [4], o]]), bytes(D)), "expected 0")  # type: ignore[misc]
        for name, o in [
            ("8", 8),
            ("negative", -64),
            ("float", 1.0),
            ("string", "0"),
            ("bool", True),
            ("2^64", 2**64),
        ]
    ],  # fmt: skip
    ("array-past-payload", lambda: frame(head([["<f8", [100], 0]]), bytes(D)), "run past"),
    ("payload-beyond-arrays", lambda: frame(head([["<f4", [4], 0]]), bytes(3 * D)), "carries"),
    ("payload-without-arrays", lambda: frame(head([]), bytes(D)), "carries 64 payload bytes"),
    (
        "shm-not-accepted",
        lambda: frame(head([], shm={"name": "x", "size": 0, "unlink": False})),
        "does not accept",
    ),  # fmt: skip
    (
        "remote-not-accepted",
        lambda: frame(head([], remote={"pid": 1, "regions": []})),
        "does not accept",
    ),  # fmt: skip
    ("shm-with-inline-payload", lambda: frame(head([], shm={}), bytes(D)), "no inline payload"),
]


@pytest.mark.reliability
def test_every_kind_of_malformed_frame_is_refused(reliability: Any) -> None:
    assert len(MALFORMED) >= 57
    assert len({name for name, _, _ in MALFORMED}) == len(MALFORMED)
    wrong = []
    for name, build, phrase in MALFORMED:
        text = refuse(build())
        if phrase not in text:
            wrong.append(f"{name}: {text}")
    assert wrong == []
    reliability.hostile("malformed frame kinds", tried=len(MALFORMED))


@pytest.mark.reliability
def test_a_valid_frame_still_decodes(reliability: Any) -> None:
    """The baseline the malformed frames are made from is itself accepted."""
    message = decode(VALID)
    model = model_from_wire(message.fields["model"], list(message.arrays))
    assert model.params is not None
    np.testing.assert_array_equal(model.params["dense"][0], np.arange(6).reshape(2, 3))


# ---------------------------------------------------------------------- dtypes on the wire

BAD_DTYPES: list[Any] = ["|O", "<U4", "|S4", "<c8", "<c16", ">f4", ">i8", "f4", "<M8[D]",
                         "<m8[s]", "|V8", "<f16", 5, None, True, ["<f4"], {"d": 1}]  # fmt: skip
BAD_ARRAYS: list[np.ndarray] = [
    np.array([object()], dtype=object),
    np.array(["ab"]),
    np.array([b"ab"]),
    np.array([1 + 2j], np.complex64),
    np.array([1 + 2j], np.complex128),
    np.array(["2024-01-01"], "datetime64[D]"),
    np.array([1], "timedelta64[s]"),
    np.zeros(1, [("a", "<f4"), ("b", "<i4")]),
    np.zeros(1, np.longdouble),
    np.zeros(1, "V8"),
    np.zeros(1, "V2"),  # a bare 2-byte void is no bfloat16
]


@pytest.mark.reliability
def test_unsupported_and_object_dtypes_are_refused_both_ways(reliability: Any) -> None:
    assert len(ALLOWED_DTYPES) == 13  # numpy's 12 codes and bfloat16
    for dtype in BAD_DTYPES:
        text = refuse(frame(head([[dtype, [2], 0]]), bytes(D)))
        assert "not allowed on the wire" in text, (dtype, text)
    for array in BAD_ARRAYS:
        with pytest.raises(ProtocolError, match="does not carry"):
            encode(Message("x", {}, [array]))
    for dtype in sorted(ALLOWED_DTYPES):  # the allowlist itself round-trips
        array = np.arange(3).astype(wire_dtype(dtype))
        (back,) = decode(encode(Message("x", {}, [array])).tobytearray()).arrays
        assert wire_code(back.dtype) == dtype and np.array_equal(back, array)
    reliability.hostile("unsupported/object dtypes", tried=len(BAD_DTYPES) + len(BAD_ARRAYS))


# ------------------------------------------------------------------- deeply nested headers


@pytest.mark.reliability
@pytest.mark.parametrize("depth", [65, 200, 900, 5_000, 200_000])
def test_deeply_nested_headers_are_refused_or_bounded(reliability: Any, depth: int) -> None:
    """Nesting in fields is plain JSON (decoded or refused as invalid JSON, no crash); in a
    model's param structure it is refused past the structure's depth limit."""
    nested = b"[" * depth + b"]" * depth
    data = frame(b'{"op":"x","fields":{"n":' + nested + b'},"arrays":[]}')
    try:
        message = decode(data)
    except ProtocolError as exc:
        assert "not valid JSON" in str(exc)
    else:
        assert message.op == "x"

    def model_nested(levels: int) -> bytearray:
        text = '{"structure":' + '{"l":[' * levels + "null" + "]}" * levels + ',"count":1}'
        raw = '{"op":"x","fields":{"model":{"params":' + text + '}},"arrays":[["<f4",[1],0]]}'
        return frame(raw.encode(), bytes(D))

    if depth == 65:  # the limit itself is fine: the refusals below are the depth's doing
        accepted = decode(model_nested(64))
        assert model_from_wire(accepted.fields["model"], list(accepted.arrays)).params
    message_text = refuse(model_nested(depth))
    assert "deeper than 64" in message_text or "not valid JSON" in message_text, message_text
    reliability.hostile(f"header nested {depth} deep", tried=2)


# ------------------------------------------------------------------------ model fields


def wire_model() -> tuple[dict[str, Any], list[np.ndarray]]:
    return model_to_wire(
        FLModel(params={"a": [np.ones(2), np.zeros(3)]}, optimizer_params={"m": np.ones(1)})
    )


MODEL_LIES: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("not-an-object", lambda f: [1], "must be a JSON object of fields"),
    ("a-string", lambda f: "model", "must be a JSON object of fields"),
    ("count-bool", lambda f: {**f, "params": {**f["params"], "count": True}}, "structure and"),
    ("count-float", lambda f: {**f, "params": {**f["params"], "count": 2.0}}, "structure and"),
    ("count-negative", lambda f: {**f, "params": {**f["params"], "count": -1}}, "names -1"),
    ("count-huge", lambda f: {**f, "params": {**f["params"], "count": 10**12}}, "only 3 sent"),
    (
        "count-one-less",
        lambda f: {**f, "params": {**f["params"], "count": 1}},
        "more arrays than the 1",
    ),
    (
        "structure-more",
        lambda f: {**f, "params": {"structure": {"l": [None] * 3}, "count": 2}},
        "more arrays",
    ),  # fmt: skip
    ("structure-bad-node", lambda f: {**f, "params": {"structure": 5, "count": 2}}, "bad node"),
    (
        "structure-key-twice",
        lambda f: {**f, "params": {"structure": {"d": [["a", None], ["a", None]]}, "count": 2}},
        "twice",
    ),  # fmt: skip
    ("params-type", lambda f: {**f, "params_type": "PARTIAL"}, "FULL or DIFF"),
    ("meta-list", lambda f: {**f, "meta": [1]}, "meta must be"),
    ("metrics-list", lambda f: {**f, "metrics": [1]}, "metrics must be"),
    ("round-negative", lambda f: {**f, "current_round": -1}, "non-negative int"),
    ("round-string", lambda f: {**f, "total_rounds": "3"}, "non-negative int"),
]


@pytest.mark.reliability
def test_lying_model_fields_are_refused(reliability: Any) -> None:
    fields, arrays = wire_model()
    assert model_from_wire(fields, arrays).params is not None
    wrong = []
    for name, lie, phrase in MODEL_LIES:
        try:
            model_from_wire(lie(json.loads(json.dumps(fields))), arrays)
        except ProtocolError as exc:
            if phrase not in str(exc):
                wrong.append(f"{name}: {exc}")
        else:
            wrong.append(f"{name}: accepted")
    assert wrong == []
    reliability.hostile("lying model fields", tried=len(MODEL_LIES))


# ------------------------------------------------------- huge claimed sizes and the RSS

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, struct, sys
    import numpy as np
    from fedlift.codec import decode, model_from_wire
    from fedlift.errors import ProtocolError
    P = struct.Struct("<4sIQ")
    def frame(header, payload=b""):
        raw = json.dumps(header).encode()
        start = (16 + len(raw) + 63) // 64 * 64
        out = bytearray(start + len(payload))
        P.pack_into(out, 0, b"FLW1", len(raw), len(out))
        out[16:16 + len(raw)] = raw
        out[start:] = payload
        return out
    def h(arrays, **extra):
        return {"op": "x", "fields": {}, "arrays": arrays, **extra}
    G = 1 << 30
    claims = [
        bytes(P.pack(b"FLW1", 8, 512 * G)),                        # total: 512 GiB
        bytes(P.pack(b"FLW1", 2**32 - 1, 2**64 - 1)),              # header and total: max
        frame(h([["<f8", [64 * G], 0]]), bytes(64)),              # an array of 512 GiB
        frame(h([["<f8", [2**31, 2**31], 0]]), bytes(64)),        # 2^65 bytes
        frame(h([["<u1", [0, 2**62, 2**62], 0]])),                # empty but impossible
        frame(h([["<f4", [G], 0]] + [["<f4", [G], 4 * G]] * 3), bytes(64)),
        frame(h([["<f4", [G], 0]], shm={"name": "fedlift-a-1-1-0123abcd",
                                        "size": 4 * G, "unlink": False})),
        frame(h([["<f4", [G], 0]], remote={"pid": 1, "regions": [[4096, 4 * G]]})),
        frame(h([["<f4", [0, 2**63], 0]], remote={"pid": 1, "regions": [[4096, 0]]})),
    ]
    fields = {"model": {"params": {"structure": None, "count": 10**15}}}
    claims.append(frame({"op": "x", "fields": fields, "arrays": []}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused = 0
    for data in claims:
        for allow in (False, True):
            try:
                m = decode(data, 1 << 40, allow_shm=allow)
                model_from_wire(m.fields.get("model") or {}, list(m.arrays))
            except ProtocolError:
                refused += 1
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tried": 2 * len(claims), "refused": refused,
                      "grew_kib": after - before}))
    """
)


@pytest.mark.reliability
def test_huge_claimed_sizes_are_refused_before_allocating(reliability: Any) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["refused"] == result["tried"] == 20
    grew_mib = result["grew_kib"] / 1024
    assert grew_mib < 16, f"decoding claims of up to 2^65 bytes grew the peak RSS by {grew_mib} MiB"
    reliability.hostile("huge claimed sizes (RSS checked)", tried=result["tried"])
    reliability.measure(leaks=0)


# --------------------------------------------------------------- hypothesis: properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
edge_ints = st.sampled_from([0, 1, 2, 7, 64, -1, 2**31, 2**32, 2**62, 2**63, 2**64, 10**30])
dims = st.integers(min_value=0, max_value=9) | edge_ints | json_scalars
dtypes = st.sampled_from([*sorted(ALLOWED_DTYPES), *BAD_DTYPES[:12]]) | json_scalars
specs = st.lists(st.tuples(dtypes, st.lists(dims, max_size=4) | json_values,
                           edge_ints | st.integers(0, 512) | json_scalars).map(list),
                 max_size=4)  # fmt: skip


class Counter:
    def __init__(self) -> None:
        self.tried = self.decoded = 0


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytearray:
    """A frame with a correct prefix whose header is drawn from JSON-like values."""
    header: dict[str, Any] = {
        "op": draw(st.sampled_from(["submit", "x", ""]) | json_scalars),
        "fields": draw(st.fixed_dictionaries({"model": json_values}) | json_values),
        "arrays": draw(specs | json_values),
    }
    if draw(st.booleans()):
        key = draw(st.sampled_from(["op", "fields", "arrays"]))
        del header[key]
    if draw(st.integers(0, 9)) == 0:
        header[draw(st.sampled_from(["shm", "remote", "accept_shm", "x"]))] = draw(json_values)
    raw = json.dumps(header).encode()
    payload = draw(st.sampled_from([0, 64, 128, 192, 1, 63])) * b"\x01"
    return frame(raw, payload)


@pytest.mark.reliability
def test_hypothesis_headers_decode_or_raise_protocol_error(reliability: Any) -> None:
    counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(data=hostile_frames(), allow_shm=st.booleans())
    def check(data: bytearray, allow_shm: bool) -> None:
        counter.tried += 1
        counter.decoded += decode_or_refuse(data, allow_shm)

    check()
    assert counter.tried >= EXAMPLES
    reliability.hostile("hypothesis: drawn headers", tried=counter.tried - counter.decoded)


@pytest.mark.reliability
def test_hypothesis_random_and_mutated_bytes(reliability: Any) -> None:
    """Random bytes, truncations and bit flips of a real model's frame."""
    counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None)
    @given(
        kind=st.sampled_from(["random", "truncate", "flip", "flip-keep-lengths", "append"]),
        raw=st.binary(max_size=256),
        cut=st.integers(min_value=0, max_value=len(VALID) - 1),
    )
    def check(kind: str, raw: bytes, cut: int) -> None:
        counter.tried += 1
        if kind == "random":
            data = bytearray(raw)
        elif kind == "truncate":
            data = bytearray(VALID[:cut])
        elif kind == "append":
            data = bytearray(VALID + raw)
        else:
            data = bytearray(VALID)
            for i, byte in enumerate(raw):
                data[(cut + i * 131) % len(data)] ^= byte
            if kind == "flip-keep-lengths":
                PREFIX.pack_into(data, 0, b"FLW1", PREFIX.unpack_from(VALID)[1], len(data))
        counter.decoded += decode_or_refuse(data)

    check()
    assert counter.tried >= EXAMPLES
    # Flips inside array data or padding still decode (safely): only refusals count here.
    refused = counter.tried - counter.decoded
    reliability.hostile("hypothesis: random/truncated/flipped bytes", tried=refused)


@pytest.mark.reliability
def test_hypothesis_lying_shapes_and_offsets_never_read_outside_the_frame(
    reliability: Any,
) -> None:
    """A real message whose one spec lies about its shape or offset: refused, or (when the
    lie stays inside the padding) decoded with every array inside the received buffer."""
    counter = Counter()
    lengths = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=4)

    @settings(max_examples=EXAMPLES, deadline=None, database=None)
    @given(
        sizes=lengths,
        dtype=st.sampled_from(sorted(ALLOWED_DTYPES)),
        which=st.integers(min_value=0, max_value=3),
        field=st.sampled_from(["shape", "offset", "dtype"]),
        value=st.integers(min_value=-(2**65), max_value=2**65) | edge_ints,
    )
    def check(sizes: list[int], dtype: str, which: int, field: str, value: int) -> None:
        counter.tried += 1
        arrays = [np.ones(n, wire_dtype(dtype)) for n in sizes]
        data = encode(Message("x", {}, arrays)).tobytes()
        header_len = PREFIX.unpack_from(data)[1]
        header = json.loads(data[PREFIX_BYTES : PREFIX_BYTES + header_len])
        data_start = (PREFIX_BYTES + header_len + 63) // 64 * 64
        payload = data[data_start:]
        spec = header["arrays"][which % len(sizes)]
        if field == "shape":
            spec[1] = [value]
        elif field == "offset":
            spec[2] = value
        else:
            spec[0] = sorted(ALLOWED_DTYPES)[value % len(ALLOWED_DTYPES)]
        lied = frame(json.dumps(header).encode(), payload)
        if decode_or_refuse(lied):
            counter.decoded += 1
            message = decode(lied)
            inside = sum(a.nbytes for a in message.arrays)
            assert inside <= len(payload)

    check()
    assert counter.tried >= EXAMPLES
    reliability.hostile(
        "hypothesis: lying shape/offset/dtype", tried=counter.tried - counter.decoded
    )


@pytest.mark.reliability
def test_decode_frame_reports_accept_shm_only_when_true(reliability: Any) -> None:
    for value, expected in [(True, True), (1, False), ("yes", False), (None, False)]:
        _, accepts = decode_frame(frame(head([], accept_shm=value)))
        assert accepts is expected
    reliability.hostile("accept_shm not a bool", tried=3)


# -------------------------------------------------------------- atheris (coverage-guided)


@pytest.mark.reliability
def test_atheris_harness_runs_clean(reliability: Any, tmp_path: Path) -> None:
    """``fuzz/fuzz_wire.py`` for a bounded number of runs in a subprocess: no finding."""
    runs = 400_000 if reliability.full else 20_000
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(ROOT / "fuzz" / "fuzz_wire.py"), f"-atheris_runs={runs}",
               "-max_len=2048", "-seed=20261201", f"-artifact_prefix={tmp_path}/"]  # fmt: skip
    run = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=1200 if reliability.full else 240
    )
    output = run.stdout + run.stderr
    crashes = list(tmp_path.glob("crash-*"))
    assert run.returncode == 0 and not crashes, output[-4000:]
    found = re.search(r"fuzz_wire: (\d+) inputs, (\d+) decoded, (\d+) refused", output)
    assert found is not None, output[-2000:]
    inputs, decoded, refused = (int(g) for g in found.groups())
    assert inputs == runs and decoded + refused == inputs
    assert refused > 0 and decoded > 0  # it reached both outcomes
    reliability.hostile("atheris coverage-guided inputs (refused)", tried=refused)


@pytest.mark.reliability
def test_hypothesis_model_fields_build_a_model_or_raise_protocol_error(reliability: Any) -> None:
    """``model_from_wire`` on arbitrary JSON fields (as a decoded header carries them) and
    0-3 arrays: a valid FLModel whose leaves are exactly the arrays sent, or ProtocolError."""
    counter = Counter()
    structures = st.recursive(
        st.none() | json_scalars,
        lambda inner: (
            st.fixed_dictionaries({"l": st.lists(inner, max_size=3)})
            | st.fixed_dictionaries(
                {"d": st.lists(st.tuples(st.sampled_from(["a", "b"]), inner).map(list), max_size=3)}
            )
            | json_values
        ),
        max_leaves=8,
    )
    counts = st.integers(min_value=-2, max_value=4) | edge_ints | json_scalars
    trees = st.fixed_dictionaries({"structure": structures, "count": counts}) | json_values
    fields = st.fixed_dictionaries(
        {},
        optional={
            "params": trees,
            "optimizer_params": trees,
            "params_type": st.sampled_from(["FULL", "DIFF", "full", None]) | json_scalars,
            "metrics": json_values,
            "meta": json_values,
            "current_round": edge_ints | json_scalars,
        },
    )

    @settings(max_examples=EXAMPLES, deadline=None, database=None)
    @given(raw=fields | json_values, n=st.integers(min_value=0, max_value=3))
    def check(raw: Any, n: int) -> None:
        counter.tried += 1
        arrays = [np.full(2, i, np.float32) for i in range(n)]
        try:
            model = model_from_wire(raw, arrays)
        except ProtocolError:
            return
        counter.decoded += 1
        leaves = [leaf for tree in (model.params, model.optimizer_params) if tree is not None
                  for leaf in flatten(tree)[1]]  # fmt: skip
        assert len(leaves) == n and all(a is b for a, b in zip(leaves, arrays, strict=True))

    check()
    assert counter.tried >= EXAMPLES and counter.decoded > 0
    reliability.hostile("hypothesis: model fields", tried=counter.tried - counter.decoded)
