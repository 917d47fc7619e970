"""The wire format: messages of JSON fields and raw array buffers; no pickle anywhere."""

from ._models import model_from_wire, model_to_wire
from ._wire import (
    ALLOWED_DTYPES,
    DEFAULT_MAX_MESSAGE_BYTES,
    PREFIX_BYTES,
    Frame,
    Message,
    decode,
    decode_frame,
    encode,
    frame_length,
    frame_op,
)

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PREFIX_BYTES",
    "Frame",
    "Message",
    "decode",
    "decode_frame",
    "encode",
    "frame_length",
    "frame_op",
    "model_from_wire",
    "model_to_wire",
]
