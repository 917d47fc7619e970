"""The wire format: a small JSON header followed by raw, aligned array buffers.

Layout of one encoded message (all integers little-endian)::

    0   magic      b"FLW1"
    4   u32        header length in bytes (H)
    8   u64        total length of the message in bytes
    16  H bytes    UTF-8 JSON: {"op": str, "fields": {...}, "arrays": [[dtype, shape, offset], ...]}
    ..  padding    to a multiple of 64
    ..  arrays     each one's raw C-order bytes at its 64-byte aligned offset

Nothing is ever unpickled: the header is JSON, arrays are raw bytes of dtypes on an
allowlist (numpy's codes, plus ``"bfloat16"``: see :data:`BFLOAT16_CODE`), and
:func:`decode` checks every size, shape and offset before it makes (zero-copy) array views
on the received buffer.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, ProtocolError
from ..model import bfloat16_dtype, is_bfloat16
from . import _remote, _shm

__all__ = [
    "ALLOWED_DTYPES",
    "BFLOAT16_CODE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Frame",
    "Header",
    "Message",
    "PREFIX_BYTES",
    "REMOTE_MIN_BYTES",
    "decode",
    "decode_frame",
    "decode_header",
    "encode",
    "frame_length",
    "frame_op",
    "wire_code",
    "wire_dtype",
]

MAGIC = b"FLW1"
_PREFIX = struct.Struct("<4sIQ")
PREFIX_BYTES = _PREFIX.size
_ALIGN = 64
MAX_HEADER_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1 << 40
_MAX_NDIM = 32
_MAX_ARRAY_BYTES = 1 << 63  # numpy refuses shapes whose bytes overflow its signed index
REMOTE_MIN_BYTES = 1 << 20
"""Payloads from this size on are read from the sender's memory where allowed (``remote_pid``);
smaller ones are copied (a message, or a shared-memory segment)."""

BFLOAT16_CODE = "bfloat16"
"""The wire's name for bfloat16 (numpy's own codes would call it ``<V2``, a bare 2-byte void):
its arrays travel as their raw 2-byte payloads and decode to ``ml_dtypes.bfloat16``."""
ALLOWED_DTYPES: frozenset[str] = frozenset(
    ["|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"]
    + [BFLOAT16_CODE]
)
_PAD = bytes(_ALIGN)
_HEADER_KEYS = frozenset({"op", "fields", "arrays", "shm", "remote", "accept_shm"})


@dataclass(frozen=True)
class Message:
    """One request or reply: an operation name, JSON fields and a list of arrays."""

    op: str
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: Sequence[np.ndarray] = ()
    peer: str | None = None
    """Who sent the request: the CN of the client's verified TLS certificate, set by the
    receiving listener. Never encoded, so a peer cannot claim it; None without TLS."""
    peer_role: str | None = None
    """The role in that certificate (``site``, ``admin``, ...); see :mod:`fedlift.deploy`."""
    peer_certificate: bytes | None = None
    """That certificate itself (PEM), for checks beyond name and role (revocation); set by
    the receiving listener like ``peer``, never encoded."""


@dataclass(frozen=True)
class Frame:
    """An encoded message as a list of buffers (no copy of array data) and its size."""

    buffers: list[memoryview]
    nbytes: int
    shm_name: str | None = None
    """A transfer segment holding the payload; the sender unlinks it if delivery fails."""
    keep: tuple[np.ndarray, ...] = ()
    """Arrays the receiver reads from this process (``remote_pid``): alive while the frame is."""

    def discard(self) -> None:
        """Free what the frame holds outside the process (call when delivery failed)."""
        if self.shm_name is not None:
            _shm.unlink(self.shm_name)

    def tobytes(self) -> bytes:
        return b"".join(self.buffers)

    def tobytearray(self) -> bytearray:
        """One private, writable copy of the frame (what a receiver decodes from)."""
        out = bytearray(self.nbytes)
        position = 0
        for buf in self.buffers:
            out[position : position + len(buf)] = buf
            position += len(buf)
        return out

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """Yield the frame as pieces of at most ``chunk_bytes`` (small pieces coalesced)."""
        pending: list[memoryview] = []
        pending_len = 0
        for buf in self.buffers:
            start = 0
            while start < len(buf):
                take = min(len(buf) - start, chunk_bytes - pending_len)
                pending.append(buf[start : start + take])
                pending_len += take
                start += take
                if pending_len == chunk_bytes:
                    yield b"".join(pending)
                    pending, pending_len = [], 0
        if pending:
            yield b"".join(pending)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _wire_dtype(array: np.ndarray) -> np.ndarray:
    dtype = array.dtype
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and not _little_endian()):
        array = array.astype(dtype.newbyteorder("<"))
    return array


def _little_endian() -> bool:
    return np.little_endian


def encode(
    message: Message,
    *,
    shm_min_bytes: int | None = None,
    accept_shm: bool = False,
    remote_pid: int | None = None,
) -> Frame:
    """Encode ``message``; array data is referenced, not copied (non-contiguous arrays are).

    With ``shm_min_bytes``, a payload of at least that many bytes travels in shared memory
    (see :mod:`._shm`): by reference when the arrays already lie in one owned segment, else
    copied once into a transfer segment, or, with ``remote_pid`` (this process's pid, when
    the receiver can read its memory; see :mod:`._remote`) and at least
    :data:`REMOTE_MIN_BYTES`, not copied at all: the message names where the arrays are and
    the receiver reads them from here. ``accept_shm`` tells
    the peer it may reply with shared memory.
    """
    if not isinstance(message.op, str) or not message.op:
        raise ProtocolError(f"message op must be a non-empty string; received: {message.op!r}")
    specs: list[list[Any]] = []
    payload: list[np.ndarray] = []
    offset = 0
    for i, raw in enumerate(message.arrays):
        if not isinstance(raw, np.ndarray):
            raise ProtocolError(
                f"array {i} of message {message.op!r} is a {type(raw).__name__}; "
                "expected a numpy.ndarray."
            )
        array = _wire_dtype(raw)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        dtype = wire_code(array.dtype)
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError(
                f"array {i} of message {message.op!r} has dtype {array.dtype} which the wire "
                f"format does not carry; allowed: bool, int8-64, uint8-64, float16/32/64, "
                "bfloat16. Cast it (e.g. array.astype('float32'))."
            )
        specs.append([dtype, list(array.shape), offset])
        payload.append(array)
        offset = _aligned(offset + array.nbytes)
    header_obj: dict[str, Any] = {"op": message.op, "fields": message.fields, "arrays": specs}
    keep: tuple[np.ndarray, ...] = ()
    if accept_shm:
        header_obj["accept_shm"] = True
    shm_name: str | None = None
    if shm_min_bytes is not None and offset >= shm_min_bytes and offset > 0 and _shm.available():
        placed = _shm.locate(payload)
        if placed is not None:
            name, size, offsets, gen = placed
            for spec, at in zip(specs, offsets, strict=True):
                spec[2] = at
            header_obj["shm"] = {"name": name, "size": size, "unlink": False, "gen": gen}
        elif remote_pid is not None and offset >= REMOTE_MIN_BYTES and _remote.available():
            header_obj["remote"] = {"pid": remote_pid, "regions": _remote.regions(payload)}
            keep = tuple(payload)
        else:
            shm_name, segment = _shm.create_transfer(offset)
            for spec, array in zip(specs, payload, strict=True):
                if array.nbytes:
                    _copy_into(segment, spec[2], array)
            segment.close()
            header_obj["shm"] = {"name": shm_name, "size": offset, "unlink": True}
        payload, specs_inline = [], []
        offset = 0
    else:
        specs_inline = specs
    try:
        header = json.dumps(header_obj, separators=(",", ":"), allow_nan=True).encode()
    except (TypeError, ValueError) as exc:
        if shm_name is not None:
            _shm.unlink(shm_name)
        raise ProtocolError(
            f"fields of message {message.op!r} are not JSON-serialisable: {exc}. "
            "Metrics and meta must hold str, int, float, bool, None, lists and dicts."
        ) from exc
    if len(header) > MAX_HEADER_BYTES:
        if shm_name is not None:
            _shm.unlink(shm_name)
        raise ProtocolError(
            f"message header is {len(header):,} bytes; the limit is {MAX_HEADER_BYTES:,}. "
            "Put large data in arrays, not in metrics or meta."
        )
    data_start = _aligned(PREFIX_BYTES + len(header))
    total = data_start + offset
    head = bytearray(data_start)
    _PREFIX.pack_into(head, 0, MAGIC, len(header), total)
    head[PREFIX_BYTES : PREFIX_BYTES + len(header)] = header
    buffers: list[memoryview] = [memoryview(head)]
    position = data_start
    for spec, array in zip(specs_inline, payload, strict=True):
        target_at = data_start + spec[2]
        if target_at > position:
            buffers.append(memoryview(_PAD)[: target_at - position])
        if array.nbytes:
            buffers.append(_bytes_of(array))
        position = target_at + array.nbytes
    if total > position:
        buffers.append(memoryview(_PAD)[: total - position])
    return Frame(buffers, total, shm_name, keep)


def wire_code(dtype: np.dtype[Any]) -> str:
    """The code the wire names ``dtype`` by: numpy's (``"<f4"``), or ``"bfloat16"``."""
    return BFLOAT16_CODE if is_bfloat16(dtype) else dtype.str


def wire_dtype(code: str) -> np.dtype[Any]:
    """The dtype of a wire code in :data:`ALLOWED_DTYPES` (bfloat16 loads ``ml_dtypes``)."""
    if code == BFLOAT16_CODE:
        try:
            return bfloat16_dtype()
        except ConfigError as exc:
            raise ProtocolError(f"the peer sent a bfloat16 array, which needs: {exc}") from None
    return np.dtype(code)


def _bytes_of(array: np.ndarray) -> memoryview:
    """A C-contiguous array's bytes, uncopied (as bytes: numpy exports no buffer of a
    dtype that Python's buffer protocol cannot name, such as bfloat16)."""
    if is_bfloat16(array.dtype):
        return array.reshape(-1).view(np.uint8).data
    return array.data.cast("B")


def _copy_into(segment: Any, offset: int, array: np.ndarray) -> None:
    target = np.frombuffer(segment, array.dtype, count=array.size, offset=offset)
    np.copyto(target.reshape(array.shape), array)


def frame_length(prefix: bytes | bytearray | memoryview) -> int:
    """The total length announced by the first :data:`PREFIX_BYTES` bytes of a frame."""
    if len(prefix) < PREFIX_BYTES:
        raise ProtocolError(
            f"message is {len(prefix)} bytes, shorter than the {PREFIX_BYTES}-byte prefix."
        )
    magic, _, total = _PREFIX.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise ProtocolError(
            f"message does not start with the fedlift magic {MAGIC!r} (got {bytes(magic)!r}); "
            "the peer is not a fedlift endpoint of this wire version."
        )
    return int(total)


def decode(
    buffer: bytes | bytearray | memoryview,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    allow_shm: bool = False,
) -> Message:
    """Validate and decode one message. Arrays are views on ``buffer`` (no copy), or on a
    private mapping of the sender's shared-memory segment when ``allow_shm``."""
    return decode_frame(buffer, max_bytes, allow_shm=allow_shm)[0]


def decode_frame(
    buffer: bytes | bytearray | memoryview,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    allow_shm: bool = False,
    populate: bool = True,
) -> tuple[Message, bool]:
    """:func:`decode`, plus whether the peer accepts a shared-memory reply.

    ``populate=False`` maps a shared-memory payload lazily (see ``_shm.open_segment``).
    """
    view = memoryview(buffer).cast("B")
    total = frame_length(view)
    if total != len(view):
        raise ProtocolError(f"message announces {total} bytes but {len(view)} arrived.")
    header, data_start = _header(view, total, max_bytes)
    op, fields, specs = header["op"], header["fields"], header["arrays"]
    accept_shm = header.get("accept_shm", False) is True
    data_len = total - data_start
    if "shm" in header or "remote" in header:
        if data_len != 0 or ("shm" in header and "remote" in header):
            raise ProtocolError("a shared-memory message must carry no inline payload.")
        if "remote" in header:
            remote = _remote_arrays(header["remote"], specs, max_bytes, allow_shm)
            return Message(op, fields, remote), accept_shm  # type: ignore[arg-type]
        shared = _shm_arrays(header["shm"], specs, max_bytes, allow_shm, populate)
        return Message(op, fields, shared), accept_shm
    arrays: list[np.ndarray] = []
    expected_offset = 0
    for i, spec in enumerate(specs):
        arrays.append(_array_from_spec(view, i, spec, data_start, data_len, expected_offset))
        expected_offset = _aligned(spec[2] + arrays[-1].nbytes)
    if _aligned(expected_offset) != data_len and not (not specs and data_len == 0):
        raise ProtocolError(
            f"message carries {data_len} payload bytes but its arrays account for "
            f"{expected_offset}."
        )
    return Message(op, fields, arrays), accept_shm


def _header(view: memoryview, total: int, max_bytes: int) -> tuple[dict[str, Any], int]:
    """The checked header object of a frame of ``total`` bytes whose first bytes are
    ``view`` (at least the whole header), and where its payload starts."""
    if total > max_bytes:
        raise ProtocolError(f"message of {total:,} bytes exceeds the limit of {max_bytes:,}.")
    header_len = _PREFIX.unpack_from(view, 0)[1]
    if header_len > MAX_HEADER_BYTES or PREFIX_BYTES + header_len > total:
        raise ProtocolError(f"message header length {header_len} is out of bounds.")
    if PREFIX_BYTES + header_len > len(view):
        raise ProtocolError(
            f"the message's {header_len:,}-byte header is not within its first {len(view):,} bytes."
        )
    try:
        header = json.loads(bytes(view[PREFIX_BYTES : PREFIX_BYTES + header_len]))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, ...
        raise ProtocolError(f"message header is not valid JSON: {exc}") from None
    if (
        not isinstance(header, dict)
        or not {"op", "fields", "arrays"} <= set(header)
        or not set(header) <= _HEADER_KEYS
    ):
        raise ProtocolError("message header must be an object with op, fields and arrays.")
    op, fields, specs = header["op"], header["fields"], header["arrays"]
    if not isinstance(op, str) or not op or len(op) > 128:
        raise ProtocolError(f"message op must be a short non-empty string; got {op!r:.80}")
    if not isinstance(fields, dict):
        raise ProtocolError("message fields must be a JSON object.")
    if not isinstance(specs, list):
        raise ProtocolError("message arrays must be a JSON list.")
    data_start = _aligned(PREFIX_BYTES + header_len)
    if total < data_start:
        raise ProtocolError(
            f"message of {total} bytes ends inside the padding after its {header_len}-byte "
            f"header; its payload starts at byte {data_start}."
        )
    return header, data_start


@dataclass(frozen=True)
class Header:
    """A frame's header, decoded and checked before its payload has arrived
    (:func:`decode_header`): what each array will be, and where in the frame it lies."""

    op: str
    fields: dict[str, Any]
    arrays: list[tuple[np.dtype[Any], tuple[int, ...], int]]
    """``(dtype, shape, start)`` per array; ``start``: its first byte's offset in the frame."""
    total: int
    accept_shm: bool


def decode_header(head: bytes | bytearray | memoryview, max_bytes: int) -> Header:
    """Check the header in ``head`` (a frame's first bytes, at least its whole header)
    against the length the frame announces, before any of its payload is received.

    Every check :func:`decode` makes on sizes, shapes, dtypes and offsets is made here, so a
    receiver may allocate for the arrays, and fill them as their bytes arrive. Only inline
    payloads are decoded this way: a shared-memory or remote-memory reference is refused
    (such a frame carries no payload: decode it whole).
    """
    view = memoryview(head).cast("B")
    total = frame_length(view)
    header, data_start = _header(view, total, max_bytes)
    if "shm" in header or "remote" in header:
        raise ProtocolError(
            "a message announced as a stream of payload bytes names shared or remote memory; "
            "such a message carries no inline payload."
        )
    data_len = total - data_start
    arrays = []
    expected_offset = 0
    for i, spec in enumerate(header["arrays"]):
        dtype, shape, offset, count = _spec_parts(i, spec)
        if not _is_int(offset) or offset != expected_offset:
            raise ProtocolError(
                f"array {i}: offset {offset!r:.20} is not the expected {expected_offset}."
            )
        nbytes = count * dtype.itemsize
        if offset + nbytes > data_len:
            raise ProtocolError(
                f"array {i}: {nbytes} bytes at offset {offset} run past the payload ({data_len})."
            )
        arrays.append((dtype, tuple(shape), data_start + offset))
        expected_offset = _aligned(offset + nbytes)
    if _aligned(expected_offset) != data_len and not (not arrays and data_len == 0):
        raise ProtocolError(
            f"message carries {data_len} payload bytes but its arrays account for "
            f"{expected_offset}."
        )
    accept_shm = header.get("accept_shm", False) is True
    return Header(header["op"], header["fields"], arrays, total, accept_shm)


def _shm_arrays(
    ref: Any, specs: list[Any], max_bytes: int, allow_shm: bool, populate: bool
) -> list[np.ndarray]:
    if not allow_shm:
        raise ProtocolError(
            "the peer sent its payload in shared memory, which this endpoint does not accept "
            "(it is only for processes on one host)."
        )
    if not (
        isinstance(ref, dict)
        and set(ref) - {"gen"} == {"name", "size", "unlink"}
        and _is_int(ref["size"])
        and 0 <= ref["size"] <= max_bytes
        and isinstance(ref["unlink"], bool)
        and (_is_int(ref.get("gen", 0)) and 0 <= ref.get("gen", 0) < 2**63)
    ):
        raise ProtocolError(f"bad shared-memory reference {ref!r:.120}")
    segment = _shm.open_segment(ref["name"], ref["size"], populate, ref.get("gen"))
    if ref["unlink"]:
        _shm.unlink(ref["name"])
    view = memoryview(segment).cast("B")
    arrays = []
    for i, spec in enumerate(specs):
        offset = spec[2] if isinstance(spec, list) and len(spec) == 3 else None
        arrays.append(_array_from_spec(view, i, spec, 0, ref["size"], offset, shared=True))
    return arrays


def _remote_arrays(
    ref: Any, specs: list[Any], max_bytes: int, allow: bool
) -> list[_remote.RemoteArray]:
    if not allow:
        raise ProtocolError(
            "the peer sent its payload as memory to read from its process, which this "
            "endpoint does not accept (it is only for processes on one host)."
        )
    if not (
        isinstance(ref, dict)
        and set(ref) == {"pid", "regions"}
        and _is_int(ref["pid"])
        and ref["pid"] > 0
        and isinstance(ref["regions"], list)
        and len(ref["regions"]) == len(specs)
    ):
        raise ProtocolError(f"bad remote-memory reference {ref!r:.120}")
    arrays, total = [], 0
    for i, (spec, region) in enumerate(zip(specs, ref["regions"], strict=True)):
        if not (
            isinstance(region, list)
            and len(region) == 2
            and all(_is_int(v) and 0 <= v < 2**64 for v in region)
        ):
            raise ProtocolError(f"array {i}: bad remote region {region!r:.80}")
        dtype, shape, _, count = _spec_parts(i, spec)
        if count * dtype.itemsize != region[1]:
            raise ProtocolError(
                f"array {i}: {region[1]} bytes named for a {dtype} array of shape {shape}."
            )
        total += region[1]
        if total > max_bytes:
            raise ProtocolError(f"message of {total:,} bytes exceeds the limit of {max_bytes:,}.")
        arrays.append(_remote.RemoteArray(ref["pid"], region[0], tuple(shape), dtype))
    return arrays


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spec_parts(i: int, spec: Any) -> tuple[np.dtype[Any], list[int], Any, int]:
    """A validated ``[dtype, shape, offset]``: dtype, shape, the (unchecked) offset, count."""
    if not (isinstance(spec, list) and len(spec) == 3):
        raise ProtocolError(f"array {i}: spec must be [dtype, shape, offset]; got {spec!r:.80}")
    dtype_str, shape, offset = spec
    if not isinstance(dtype_str, str) or dtype_str not in ALLOWED_DTYPES:  # a list: unhashable
        raise ProtocolError(f"array {i}: dtype {dtype_str!r:.20} is not allowed on the wire.")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise ProtocolError(f"array {i}: shape {shape!r:.80} is not a list of non-negative ints.")
    count = nonzero = 1
    for d in shape:
        count *= d
        nonzero *= d or 1
    dtype = wire_dtype(dtype_str)
    if nonzero * dtype.itemsize >= _MAX_ARRAY_BYTES:  # numpy's own limit, even with a 0 dim
        raise ProtocolError(
            f"array {i}: shape {shape!r:.80} of {dtype} is larger than any array can be "
            f"({_MAX_ARRAY_BYTES:,} bytes)."
        )
    return dtype, shape, offset, count


def _array_from_spec(
    view: memoryview,
    i: int,
    spec: Any,
    data_start: int,
    data_len: int,
    expected_offset: Any,
    shared: bool = False,
) -> np.ndarray:
    dtype, shape, offset, count = _spec_parts(i, spec)
    if not _is_int(offset) or offset != expected_offset:
        raise ProtocolError(
            f"array {i}: offset {offset!r:.20} is not the expected {expected_offset}."
        )
    if shared and (offset < 0 or offset % dtype.itemsize):
        raise ProtocolError(f"array {i}: offset {offset} is not aligned for {dtype}.")
    nbytes = count * dtype.itemsize
    if offset + nbytes > data_len:
        raise ProtocolError(
            f"array {i}: {nbytes} bytes at offset {offset} run past the payload ({data_len})."
        )
    start = data_start + offset
    flat = (
        np.frombuffer(view, dtype=dtype, count=count, offset=start) if count else np.empty(0, dtype)
    )
    try:
        return flat.reshape(shape)
    except ValueError as exc:  # dims past numpy's limits (a zero dim keeps nbytes at 0)
        raise ProtocolError(f"array {i}: shape {shape!r:.80} is not valid: {exc}") from None


def frame_op(data: bytes | bytearray | memoryview) -> str | None:
    """The op of a frame given its first bytes, or None while its header is incomplete.

    Checks the prefix (magic, header length) and that the header is a JSON object with a
    short op string; everything else is left to :func:`decode`. A receiver uses it to decide
    whether to accept a message before it allocates anything for the rest of it.
    """
    view = memoryview(data).cast("B")
    frame_length(view)
    header_len = _PREFIX.unpack_from(view, 0)[1]
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"message header length {header_len:,} is over the limit of {MAX_HEADER_BYTES:,}."
        )
    if len(view) < PREFIX_BYTES + header_len:
        return None
    try:
        header = json.loads(bytes(view[PREFIX_BYTES : PREFIX_BYTES + header_len]))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"message header is not valid JSON: {exc}") from None
    op = header.get("op") if isinstance(header, dict) else None
    if not isinstance(op, str) or not op or len(op) > 128:
        raise ProtocolError(f"message op must be a short non-empty string; got {op!r:.80}")
    return op
