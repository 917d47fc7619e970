"""The wire format: exact round trips, zero-copy decoding and strict rejection of bad frames."""

from __future__ import annotations

import json
import random
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from fedlift.codec import (
    ALLOWED_DTYPES,
    PREFIX_BYTES,
    Frame,
    Message,
    decode,
    encode,
    frame_length,
    model_from_wire,
    model_to_wire,
    wire_code,
)
from fedlift.codec._wire import _PREFIX, MAGIC
from fedlift.errors import ConfigError, ProtocolError
from fedlift.model import FLModel, ParamsType


def frame_bytes(header: Any, payload: bytes = b"", header_len: int | None = None) -> bytearray:
    """A hand-built frame: prefix, a JSON (or raw) header, padding to 64, then ``payload``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    data_start = (PREFIX_BYTES + len(raw) + 63) // 64 * 64
    total = data_start + len(payload)
    out = bytearray(total)
    _PREFIX.pack_into(out, 0, MAGIC, len(raw) if header_len is None else header_len, total)
    out[PREFIX_BYTES : PREFIX_BYTES + len(raw)] = raw
    out[data_start:] = payload
    return out


def header(arrays: list[Any], fields: Any = None, op: Any = "x") -> dict[str, Any]:
    return {"op": op, "fields": {} if fields is None else fields, "arrays": arrays}


ALL_DTYPES = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    ml_dtypes.bfloat16,
]


def sample_message() -> Message:
    rng = np.random.default_rng(0)
    return Message(
        "train",
        {"round": 3, "name": "site-1", "nested": {"a": [1, 2.5, None, True]}},
        [
            rng.standard_normal((4, 5)).astype(np.float32),
            np.arange(7, dtype=np.int64),
            np.array(3.5),
            np.zeros((0, 3), np.float32),
        ],
    )


# ---------------------------------------------------------------- round trips


def test_every_allowed_dtype_round_trips() -> None:
    rng = np.random.default_rng(1)
    arrays = []
    for dtype in ALL_DTYPES:
        if dtype is np.bool_:
            arrays.append(rng.integers(0, 2, (3, 2)).astype(np.bool_))
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            arrays.append(np.array([info.min, 0, 1, info.max], dtype=dtype))
        else:
            arrays.append(rng.standard_normal((2, 3)).astype(dtype))
    assert {wire_code(a.dtype) for a in arrays} == set(ALLOWED_DTYPES)
    message = Message("all", {"k": "v", "n": 1.5}, arrays)
    frame = encode(message)
    data = frame.tobytes()
    assert len(data) == frame.nbytes == frame_length(data)
    assert len(data) % 64 == 0
    back = decode(data)
    assert back.op == "all"
    assert back.fields == {"k": "v", "n": 1.5}
    assert len(back.arrays) == len(arrays)
    for got, want in zip(back.arrays, arrays, strict=True):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert np.array_equal(got, want)


def test_arrays_are_64_byte_aligned() -> None:
    data = encode(Message("x", {}, [np.ones(3, np.int8), np.ones(5, np.float64)])).tobytes()
    header_len = _PREFIX.unpack_from(data)[1]
    spec = json.loads(data[PREFIX_BYTES : PREFIX_BYTES + header_len])["arrays"]
    assert spec == [["|i1", [3], 0], ["<f8", [5], 64]]
    assert len(data) == (PREFIX_BYTES + header_len + 63) // 64 * 64 + 64 + 64


def test_big_endian_arrays_are_sent_little_endian() -> None:
    big = np.array([1.5, -2.25, 1e10], dtype=">f8")
    big_int = np.array([1, 256, -3], dtype=">i4")
    back = decode(encode(Message("be", {}, [big, big_int])).tobytes())
    assert back.arrays[0].dtype.str == "<f8"
    assert back.arrays[1].dtype.str == "<i4"
    assert back.arrays[0].tolist() == [1.5, -2.25, 1e10]
    assert back.arrays[1].tolist() == [1, 256, -3]


def test_non_contiguous_arrays_round_trip() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    views = [base[:, ::2], base.T, base[::-1, 1:3]]
    assert not any(v.flags.c_contiguous for v in views)
    back = decode(encode(Message("nc", {}, views)).tobytes())
    for got, want in zip(back.arrays, views, strict=True):
        assert got.shape == want.shape
        assert np.array_equal(got, want)


def test_zero_d_and_empty_arrays() -> None:
    arrays = [np.array(7, np.int32), np.zeros(0, np.float64), np.zeros((3, 0, 2), np.uint8)]
    back = decode(encode(Message("e", {}, arrays)).tobytes())
    assert back.arrays[0].shape == () and int(back.arrays[0]) == 7
    assert back.arrays[0].dtype == np.int32
    assert back.arrays[1].shape == (0,) and back.arrays[1].dtype == np.float64
    assert back.arrays[2].shape == (3, 0, 2) and back.arrays[2].dtype == np.uint8


def test_message_without_arrays() -> None:
    data = encode(Message("ping", {"a": 1})).tobytes()
    back = decode(data)
    assert (back.op, back.fields, list(back.arrays)) == ("ping", {"a": 1}, [])


def test_nan_and_inf_fields_survive() -> None:
    back = decode(encode(Message("f", {"loss": float("nan"), "x": float("inf")})).tobytes())
    assert np.isnan(back.fields["loss"]) and back.fields["x"] == float("inf")


def test_decoding_a_bytearray_makes_views_without_copies() -> None:
    frame = encode(sample_message())
    buffer = frame.tobytearray()
    assert bytes(buffer) == frame.tobytes()
    back = decode(buffer)
    target = np.frombuffer(buffer, np.uint8)
    for array in back.arrays:
        if array.size:
            assert np.shares_memory(array, target)
    # Writing through the buffer shows in the decoded array: it is a view, not a copy.
    first = back.arrays[0]
    offset = first.ctypes.data - target.ctypes.data
    assert float(first.flat[0]) != 42.0
    buffer[offset : offset + 4] = np.float32(42.0).tobytes()
    assert float(first.flat[0]) == 42.0


def test_encode_references_array_memory() -> None:
    array = np.arange(1000, dtype=np.float64)
    frame = encode(Message("z", {}, [array]))
    views = [np.frombuffer(b, np.uint8) for b in frame.buffers if len(b) == array.nbytes]
    assert any(np.shares_memory(v, array) for v in views)


def test_decode_of_bytes_gives_read_only_arrays() -> None:
    back = decode(encode(Message("r", {}, [np.ones(4)])).tobytes())
    assert not back.arrays[0].flags.writeable
    with pytest.raises(ValueError):
        back.arrays[0][0] = 2.0


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 100, 1000, 1 << 20])
def test_frame_chunks_join_to_the_frame(chunk: int) -> None:
    frame = encode(sample_message())
    pieces = list(frame.chunks(chunk))
    assert b"".join(pieces) == frame.tobytes()
    assert all(len(p) == chunk for p in pieces[:-1])
    assert 0 < len(pieces[-1]) <= chunk
    assert len(pieces) == -(-frame.nbytes // chunk)


def test_model_round_trip() -> None:
    model = FLModel(
        params_type=ParamsType.DIFF,
        params={
            "conv": [np.ones((2, 2), np.float32), np.array([0.5], np.float32)],
            "pool": [],
            "dense": {"kernel": np.arange(6.0).reshape(3, 2)},
        },
        optimizer_params={"momentum": [np.full(3, 0.9)]},
        metrics={"accuracy": 0.75, "loss": 1.25, "tag": "x"},
        start_round=1,
        current_round=4,
        total_rounds=10,
        meta={"NUM_STEPS_CURRENT_ROUND": 32, "site_name": "site-2"},
    )
    fields, arrays = model_to_wire(model)
    assert len(arrays) == 4
    assert fields["params"]["count"] == 3 and fields["optimizer_params"]["count"] == 1
    wire = decode(encode(Message("result", {"model": fields}, arrays)).tobytes())
    back = model_from_wire(wire.fields["model"], list(wire.arrays))
    assert back.params_type is ParamsType.DIFF
    assert list(back.params) == ["conv", "pool", "dense"]
    assert back.params["pool"] == []
    assert np.array_equal(back.params["conv"][0], np.ones((2, 2), np.float32))
    assert back.params["conv"][1].dtype == np.float32
    assert np.array_equal(back.params["dense"]["kernel"], np.arange(6.0).reshape(3, 2))
    assert np.array_equal(back.optimizer_params["momentum"][0], np.full(3, 0.9))
    assert back.metrics == {"accuracy": 0.75, "loss": 1.25, "tag": "x"}
    assert back.meta == {"NUM_STEPS_CURRENT_ROUND": 32, "site_name": "site-2"}
    assert (back.start_round, back.current_round, back.total_rounds) == (1, 4, 10)
    assert back.weight() == 32.0


def test_model_without_params_round_trips() -> None:
    model = FLModel(metrics={"accuracy": 0.5}, current_round=None)
    fields, arrays = model_to_wire(model)
    assert arrays == []
    back = model_from_wire(fields, [])
    assert back.params is None and back.optimizer_params is None and back.params_type is None
    assert back.metrics == {"accuracy": 0.5}
    assert back.current_round is None and back.start_round == 0


def test_meta_param_trees_travel_as_arrays() -> None:
    c_diff = {
        "conv": [np.full((2, 2), 0.25, np.float32), np.array([-1.5], np.float32)],
        "pool": [],
        "dense": [np.arange(6.0).reshape(3, 2)],
    }
    model = FLModel(
        params={"conv": [np.ones((2, 2), np.float32), np.zeros(1, np.float32)], "pool": []},
        optimizer_params={"m": np.ones(1)},
        metrics={"loss": 0.5},
        current_round=2,
        meta={
            "NUM_STEPS_CURRENT_ROUND": 8,
            "scaffold_c_diff": c_diff,
            "config": {"fedprox_mu": 0.01, "lr": [0.1, 0.2]},
            "counts": np.arange(3, dtype=np.int64),  # a bare array is a tree too
            "empty": {},  # a tree without arrays is plain JSON
            "mixed": [1.0, "a"],
        },
    )
    fields, arrays = model_to_wire(model)
    # JSON keeps the rest, in order; the trees are described by meta_arrays, in order.
    assert fields["meta"] == {
        "NUM_STEPS_CURRENT_ROUND": 8,
        "config": {"fedprox_mu": 0.01, "lr": [0.1, 0.2]},
        "empty": {},
        "mixed": [1.0, "a"],
    }
    assert list(fields["meta_arrays"]) == ["scaffold_c_diff", "counts"]
    assert fields["meta_arrays"]["scaffold_c_diff"]["count"] == 3
    assert fields["meta_arrays"]["counts"]["count"] == 1
    assert len(arrays) == 2 + 1 + 3 + 1  # params, optimizer, c_diff, counts
    assert arrays[3] is c_diff["conv"][0]  # after params and optimizer params, not copied
    wire = decode(encode(Message("submit", {"model": fields}, arrays)).tobytes())
    back = model_from_wire(wire.fields["model"], list(wire.arrays))
    assert list(back.meta) == [
        "NUM_STEPS_CURRENT_ROUND", "config", "empty", "mixed", "scaffold_c_diff", "counts"
    ]  # fmt: skip
    tree = back.meta["scaffold_c_diff"]
    assert list(tree) == ["conv", "pool", "dense"] and tree["pool"] == []
    assert tree["conv"][0].dtype == np.float32 and tree["conv"][0].shape == (2, 2)
    np.testing.assert_array_equal(tree["conv"][0], np.full((2, 2), 0.25))
    np.testing.assert_array_equal(tree["conv"][1], [-1.5])
    np.testing.assert_array_equal(tree["dense"][0], np.arange(6.0).reshape(3, 2))
    assert back.meta["counts"].dtype == np.int64
    np.testing.assert_array_equal(back.meta["counts"], [0, 1, 2])
    assert back.meta["config"] == {"fedprox_mu": 0.01, "lr": [0.1, 0.2]}
    np.testing.assert_array_equal(back.params["conv"][0], np.ones((2, 2)))
    np.testing.assert_array_equal(back.optimizer_params["m"], [1.0])
    assert back.weight() == 8.0


def test_a_model_without_meta_trees_is_sent_as_before() -> None:
    fields, arrays = model_to_wire(FLModel(params={"w": np.ones(2)}, meta={"a": [1, 2]}))
    assert "meta_arrays" not in fields and len(arrays) == 1
    assert fields["meta"] == {"a": [1, 2]}


def test_a_tree_mixing_arrays_and_other_values_stays_json_and_is_refused() -> None:
    fields, arrays = model_to_wire(FLModel(meta={"c": {"w": np.ones(2), "n": 3}}))
    assert "meta_arrays" not in fields and arrays == []
    with pytest.raises(ProtocolError, match="not JSON-serialisable"):
        encode(Message("submit", {"model": fields}, arrays))


def test_model_to_wire_limits_meta_trees() -> None:
    many = {f"k{i}": np.ones(1) for i in range(17)}
    with pytest.raises(ConfigError, match="holds 17 param trees of arrays; at most 16"):
        model_to_wire(FLModel(meta=many))
    model_to_wire(FLModel(meta=dict(list(many.items())[:16])))  # 16 is fine
    with pytest.raises(ConfigError, match="1 to 256 characters"):
        model_to_wire(FLModel(meta={"k" * 257: np.ones(1)}))
    with pytest.raises(ConfigError, match="1 to 256 characters"):
        model_to_wire(FLModel(meta={"": np.ones(1)}))


# ---------------------------------------------------------------- encode rejections


@pytest.mark.parametrize(
    "array",
    [
        np.array([{"a": 1}, None], dtype=object),
        np.array(["abcd"]),
        np.array([1 + 2j]),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.zeros(2, dtype=[("a", "<f4")]),
    ],
    ids=["object", "unicode", "complex", "datetime", "structured"],
)
def test_encode_refuses_dtypes_off_the_allowlist(array: np.ndarray) -> None:
    with pytest.raises(ProtocolError, match="does not carry"):
        encode(Message("x", {}, [array]))


def test_encode_refuses_non_arrays() -> None:
    with pytest.raises(ProtocolError, match="is a list; expected a numpy.ndarray"):
        encode(Message("x", {}, [[1.0, 2.0]]))  # type: ignore[list-item]


@pytest.mark.parametrize("op", ["", None, 5])
def test_encode_refuses_bad_op(op: Any) -> None:
    with pytest.raises(ProtocolError, match="op must be a non-empty string"):
        encode(Message(op, {}))


@pytest.mark.parametrize(
    "fields",
    [{"x": object()}, {"x": b"bytes"}, {"x": {1, 2}}, {"x": np.ones(2)}],
    ids=["object", "bytes", "set", "ndarray"],
)
def test_encode_refuses_non_json_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="not JSON-serialisable"):
        encode(Message("x", fields))


def test_encode_refuses_circular_fields() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(ProtocolError, match="not JSON-serialisable"):
        encode(Message("x", loop))


# ---------------------------------------------------------------- decode rejections


def valid_frame() -> bytes:
    return encode(sample_message()).tobytes()


def expect_protocol_error(data: bytes | bytearray, phrase: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert phrase in str(info.value), str(info.value)


def test_wrong_magic() -> None:
    data = bytearray(valid_frame())
    data[:4] = b"HTTP"
    expect_protocol_error(data, "does not start with the fedlift magic")


@pytest.mark.parametrize("keep", [0, 3, PREFIX_BYTES - 1])
def test_shorter_than_the_prefix(keep: int) -> None:
    expect_protocol_error(valid_frame()[:keep], f"shorter than the {PREFIX_BYTES}-byte prefix")


@pytest.mark.parametrize("cut", [1, 64, 200])
def test_truncated(cut: int) -> None:
    data = valid_frame()
    expect_protocol_error(data[:-cut], f"announces {len(data)} bytes but {len(data) - cut} arrived")


def test_extra_bytes() -> None:
    data = valid_frame()
    expect_protocol_error(data + b"\0", f"announces {len(data)} bytes but {len(data) + 1} arrived")


def test_size_limit() -> None:
    data = valid_frame()
    assert decode(data, max_bytes=len(data)).op == "train"
    with pytest.raises(ProtocolError, match="exceeds the limit of 100"):
        decode(data, max_bytes=100)


@pytest.mark.parametrize("header_len", [10_000, 2**32 - 1])
def test_header_length_out_of_range(header_len: int) -> None:
    expect_protocol_error(frame_bytes(header([]), header_len=header_len), "out of bounds")


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"\xff\xfe\x00garbage", b'{"op": "x", "fields": {}, "arrays": [}'],
    ids=["syntax", "bytes", "unbalanced"],
)
def test_header_not_json(raw: bytes) -> None:
    expect_protocol_error(frame_bytes(raw), "header is not valid JSON")


def test_header_with_huge_integer_is_a_protocol_error() -> None:
    raw = b'{"op":"x","fields":{"n":' + b"9" * 5000 + b'},"arrays":[]}'
    expect_protocol_error(frame_bytes(raw), "header is not valid JSON")


def test_header_nested_too_deep_is_a_protocol_error() -> None:
    raw = b'{"op":"x","fields":{"n":' + b"[" * 100_000 + b"]" * 100_000 + b'},"arrays":[]}'
    expect_protocol_error(frame_bytes(raw), "header is not valid JSON")


@pytest.mark.parametrize(
    "value",
    [
        [],
        "text",
        {"op": "x", "fields": {}},
        {"op": "x", "fields": {}, "arrays": [], "extra": 1},
        {"fields": {}, "arrays": []},
    ],
    ids=["list", "string", "no-arrays", "extra-key", "no-op"],
)
def test_header_not_an_object_with_the_keys(value: Any) -> None:
    expect_protocol_error(frame_bytes(value), "must be an object with op, fields and arrays")


@pytest.mark.parametrize("op", ["", 5, None, "x" * 129])
def test_header_bad_op(op: Any) -> None:
    expect_protocol_error(frame_bytes(header([], op=op)), "op must be a short non-empty string")


def test_header_bad_fields_and_arrays() -> None:
    expect_protocol_error(frame_bytes(header([], fields=[1])), "fields must be a JSON object")
    bad = {"op": "x", "fields": {}, "arrays": {"a": 1}}
    expect_protocol_error(frame_bytes(bad), "arrays must be a JSON list")


@pytest.mark.parametrize("dtype", ["|O", "<U4", "<c8", ">f4", "f4", "<M8[D]", 5, None])
def test_disallowed_dtype(dtype: Any) -> None:
    data = frame_bytes(header([[dtype, [2], 0]]), bytes(64))
    expect_protocol_error(data, "is not allowed on the wire")


@pytest.mark.parametrize(
    "shape",
    [[-1], [2, -3], [1.5], ["2"], [True], 4, None, [1] * 33],
    ids=["neg", "neg2", "float", "str", "bool", "int", "none", "ndim"],
)
def test_bad_shape(shape: Any) -> None:
    data = frame_bytes(header([["<f4", shape, 0]]), bytes(64))
    expect_protocol_error(data, "is not a list of non-negative ints")


@pytest.mark.parametrize(
    "spec", [["<f4", [1]], "spec", ["<f4", [1], 0, 0], None], ids=["short", "str", "long", "none"]
)
def test_bad_spec(spec: Any) -> None:
    expect_protocol_error(frame_bytes(header([spec]), bytes(64)), "spec must be [dtype, shape")


def test_overlapping_offsets() -> None:
    specs = [["<f4", [4], 0], ["<f4", [4], 0]]
    expect_protocol_error(frame_bytes(header(specs), bytes(128)), "offset 0 is not the expected 64")


@pytest.mark.parametrize("offset", [8, -64, 1.0, "0", True])
def test_bad_first_offset(offset: Any) -> None:
    expect_protocol_error(
        frame_bytes(header([["<f4", [4], offset]]), bytes(64)), "is not the expected 0"
    )


def test_array_out_of_bounds() -> None:
    data = frame_bytes(header([["<f8", [100], 0]]), bytes(64))
    expect_protocol_error(data, "800 bytes at offset 0 run past the payload (64)")


def test_payload_larger_than_arrays() -> None:
    data = frame_bytes(header([["<f4", [4], 0]]), bytes(192))
    expect_protocol_error(data, "carries 192 payload bytes but its arrays account for 64")
    expect_protocol_error(frame_bytes(header([]), bytes(64)), "carries 64 payload bytes")


@pytest.mark.parametrize(
    "shape",
    [[0, 10**30], [0, 2**62, 2**62], [2**40, 2**40, 2**40]],
    ids=["overflow", "too-big-empty", "huge"],
)
def test_absurd_shapes_are_protocol_errors(shape: list[int]) -> None:
    with pytest.raises(ProtocolError, match="array 0"):
        decode(frame_bytes(header([["<f4", shape, 0]])))


# ---------------------------------------------------------------- model field rejections


def wire_model() -> tuple[dict[str, Any], list[np.ndarray]]:
    return model_to_wire(
        FLModel(
            params={"a": [np.ones(2), np.zeros(3)]},
            optimizer_params={"m": np.ones(1)},
            current_round=1,
        )
    )


def test_model_array_count_mismatch() -> None:
    fields, arrays = wire_model()
    with pytest.raises(ProtocolError, match="1 unexpected arrays"):
        model_from_wire(fields, [*arrays, np.ones(1)])
    with pytest.raises(ProtocolError, match="names 1 arrays; only 2 sent"):
        model_from_wire(fields, arrays[:2])
    with pytest.raises(ProtocolError, match="names 2 arrays; only 1 sent"):
        model_from_wire(fields, arrays[:1])


@pytest.mark.parametrize(
    ("key", "value", "phrase"),
    [
        ("params_type", "PARTIAL", "params_type must be FULL or DIFF"),
        ("params_type", "full", "params_type must be FULL or DIFF"),
        ("meta", [1], "meta must be a JSON object"),
        ("metrics", [1], "metrics must be a JSON object"),
        ("current_round", -1, "'current_round' must be a non-negative int"),
        ("total_rounds", "3", "'total_rounds' must be a non-negative int"),
        ("start_round", True, "'start_round' must be a non-negative int"),
        ("params", [1], "must be an object with structure and count"),
        ("params", {"structure": None}, "must be an object with structure and count"),
        ("params", {"structure": None, "count": -1}, "names -1 arrays"),
    ],
)
def test_model_fields_are_validated(key: str, value: Any, phrase: str) -> None:
    fields, arrays = wire_model()
    fields[key] = value
    with pytest.raises(ProtocolError) as info:
        model_from_wire(fields, arrays)
    assert phrase in str(info.value)


def test_model_structure_disagreeing_with_count() -> None:
    fields, arrays = wire_model()
    fields["params"] = {"structure": {"d": [["a", {"l": [None]}]]}, "count": 2}
    with pytest.raises(ProtocolError, match="names 1 arrays but 2 were sent"):
        model_from_wire(fields, arrays)


def wire_model_with_meta_tree() -> tuple[dict[str, Any], list[np.ndarray]]:
    """params a (2 arrays), optimizer m (1), then meta c: {"d": [2 arrays]}."""
    return model_to_wire(
        FLModel(
            params={"a": [np.ones(2), np.zeros(3)]},
            optimizer_params={"m": np.ones(1)},
            meta={"n": 1, "c": {"d": [np.full(2, 0.5), np.full(1, -0.5)]}},
        )
    )


def test_meta_tree_round_trips_without_the_wire() -> None:
    fields, arrays = wire_model_with_meta_tree()
    back = model_from_wire(fields, arrays)
    assert back.meta["n"] == 1
    np.testing.assert_array_equal(back.meta["c"]["d"][0], [0.5, 0.5])
    np.testing.assert_array_equal(back.meta["c"]["d"][1], [-0.5])


TREE = {"d": [["d", {"l": [None, None]}]]}


@pytest.mark.parametrize(
    ("meta_arrays", "phrase"),
    [
        ([1], "meta_arrays must be a JSON object"),
        ("c", "meta_arrays must be a JSON object"),
        ({f"k{i}": {"structure": None, "count": 1} for i in range(17)}, "names 17 trees"),
        ({"k" * 257: {"structure": TREE, "count": 2}}, "keys must be strings of 1 to 256"),
        ({"": {"structure": TREE, "count": 2}}, "keys must be strings of 1 to 256"),
        ({"n": {"structure": TREE, "count": 2}}, "both a JSON meta value and a meta_arrays"),
        ({"c": [TREE, 2]}, "must be an object with structure and count"),
        ({"c": {"structure": TREE}}, "must be an object with structure and count"),
        ({"c": {"structure": TREE, "count": True}}, "must be an object with structure and count"),
        ({"c": {"structure": TREE, "count": "2"}}, "must be an object with structure and count"),
        ({"c": {"structure": TREE, "count": -1}}, "names -1 arrays"),
        ({"c": {"structure": TREE, "count": 3}}, "names 3 arrays; only 5 sent"),
        ({"c": {"structure": TREE, "count": 1}}, "param structure names more arrays than"),
        ({"c": {"structure": None, "count": 1}}, "1 unexpected arrays"),
        ({"c": {"structure": {"x": [None]}, "count": 2}}, "bad node in param structure"),
        ({"c": {"structure": {"d": [[1, None]]}, "count": 2}}, "bad dict entry"),
        ({"c": {"structure": {"d": []}, "count": 0}}, "at least one array"),
        ({"c": None}, "at least one array"),
        ({"c": {"structure": TREE, "count": 2}, "e": {"structure": None, "count": 1}}, "only 5"),
    ],
)
def test_meta_arrays_are_validated(meta_arrays: Any, phrase: str) -> None:
    fields, arrays = wire_model_with_meta_tree()
    assert fields["meta_arrays"] == {"c": {"structure": TREE, "count": 2}} and len(arrays) == 5
    fields["meta_arrays"] = meta_arrays
    with pytest.raises(ProtocolError) as info:
        model_from_wire(fields, arrays)
    assert phrase in str(info.value)


def test_meta_arrays_without_their_arrays_or_with_extra_ones() -> None:
    fields, arrays = wire_model_with_meta_tree()
    with pytest.raises(ProtocolError, match="names 2 arrays; only 4 sent"):
        model_from_wire(fields, arrays[:4])
    with pytest.raises(ProtocolError, match="1 unexpected arrays"):
        model_from_wire(fields, [*arrays, np.ones(1)])
    del fields["meta_arrays"]  # the trees' arrays arrive, their description does not
    with pytest.raises(ProtocolError, match="2 unexpected arrays"):
        model_from_wire(fields, arrays)


# ---------------------------------------------------------------- fuzzing


def test_fuzzed_frames_decode_or_raise_protocol_error_only() -> None:
    rng = random.Random(20240611)
    fields, arrays = wire_model()
    base = encode(Message("result", {"model": fields, "site": "site-1"}, arrays)).tobytes()
    decoded = failed = 0
    for _ in range(2000):
        data = bytearray(base)
        action = rng.random()
        if action < 0.6:
            for _ in range(rng.randint(1, 4)):
                position = rng.randrange(len(data))
                data[position] ^= 1 << rng.randrange(8)
        elif action < 0.8:
            data = data[: rng.randrange(len(data))]
        elif action < 0.9:
            # Flip bytes inside the JSON header, where most of the checks live.
            header_len = _PREFIX.unpack_from(base)[1]
            for _ in range(rng.randint(1, 3)):
                data[PREFIX_BYTES + rng.randrange(header_len)] = rng.randrange(256)
        else:
            data += bytes(rng.randrange(1, 100))
            _PREFIX.pack_into(data, 0, MAGIC, _PREFIX.unpack_from(data)[1], len(data))
        try:
            message = decode(bytes(data))
            model_from_wire(message.fields.get("model") or {}, list(message.arrays))
        except ProtocolError:
            failed += 1
        else:
            decoded += 1
    assert decoded + failed == 2000
    assert failed > 500  # most corruptions are caught
    assert decoded > 0  # flips in padding or array data still decode


def test_fuzzed_frames_with_meta_trees_decode_or_raise_protocol_error_only() -> None:
    rng = random.Random(20250101)
    fields, arrays = wire_model_with_meta_tree()
    base = encode(Message("result", {"model": fields}, arrays)).tobytes()
    header_len = _PREFIX.unpack_from(base)[1]
    failed = 0
    for _ in range(1000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):  # the header: counts, keys and structures
            data[PREFIX_BYTES + rng.randrange(header_len)] = rng.randrange(256)
        try:
            message = decode(bytes(data))
            model_from_wire(message.fields.get("model") or {}, list(message.arrays))
        except ProtocolError:
            failed += 1
    assert failed > 300


def test_frame_is_a_dataclass_of_buffers() -> None:
    frame = encode(Message("x", {}, [np.ones(2, np.float32)]))
    assert isinstance(frame, Frame)
    assert sum(len(b) for b in frame.buffers) == frame.nbytes
