"""The wire format: messages of JSON fields and raw array buffers; no pickle anywhere.

Besides the format, the two ways arrays travel between processes of one host without
passing through the socket, named for the layers above that use them: shared-memory
segments (``shm_*``, :class:`SegmentPool`) and reads out of the sender's memory
(:class:`RemoteArray`, ``*_remote_*``); arrays read on demand are a :class:`LazyArray`.
Update compression (:class:`Compression`: casts, blockwise int8, top-k), which both ends
apply. And the one set of rules for what a script logs (:func:`check_log_record`), checked
in the script and again on the server.
"""

from ._analytics import (
    LOG_DATA_TYPES,
    LOG_WRITERS,
    MAX_LOG_ENTRIES,
    MAX_LOG_NAME_CHARS,
    MAX_LOG_PARAM_CHARS,
    MAX_LOG_STRINGS,
    MAX_LOG_TAG_CHARS,
    MAX_LOG_TEXT_CHARS,
    check_log_name,
    check_log_record,
)
from ._compress import (
    COMPRESSION_KEY,
    MODEL_SCHEMES,
    REQUEST_KEY,
    RESULT_SCHEMES,
    SIDE_KEY,
    Compression,
    Layout,
    ResultEncoder,
    decode_model,
    densify,
    dequantize_int8,
    encode_model,
    layout_of,
    quantize_int8,
    top_k,
    top_k_count,
    wire_bytes,
)
from ._lazy import LazyArray
from ._lazy import materialize as materialize_lazy
from ._models import model_from_wire, model_to_wire
from ._remote import RemoteArray
from ._remote import check_probe as check_remote_probe
from ._remote import make_probe as make_remote_probe
from ._remote import materialize as materialize_remote
from ._shm import SESSION_ENV as SHM_SESSION_ENV
from ._shm import SegmentPool
from ._shm import available as shm_available
from ._shm import prefetch as prefetch_shm
from ._shm import sweep as sweep_shm
from ._wire import (
    ALLOWED_DTYPES,
    BFLOAT16_CODE,
    DEFAULT_MAX_MESSAGE_BYTES,
    PREFIX_BYTES,
    REMOTE_MIN_BYTES,
    Frame,
    Header,
    Message,
    decode,
    decode_frame,
    decode_header,
    encode,
    frame_length,
    frame_op,
    wire_code,
    wire_dtype,
)

__all__ = [
    "COMPRESSION_KEY",
    "MODEL_SCHEMES",
    "REQUEST_KEY",
    "RESULT_SCHEMES",
    "SIDE_KEY",
    "Compression",
    "Layout",
    "ResultEncoder",
    "decode_model",
    "densify",
    "dequantize_int8",
    "encode_model",
    "layout_of",
    "quantize_int8",
    "top_k",
    "top_k_count",
    "wire_bytes",
    "ALLOWED_DTYPES",
    "BFLOAT16_CODE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LOG_DATA_TYPES",
    "LOG_WRITERS",
    "MAX_LOG_ENTRIES",
    "MAX_LOG_NAME_CHARS",
    "MAX_LOG_PARAM_CHARS",
    "MAX_LOG_STRINGS",
    "MAX_LOG_TAG_CHARS",
    "MAX_LOG_TEXT_CHARS",
    "PREFIX_BYTES",
    "REMOTE_MIN_BYTES",
    "SHM_SESSION_ENV",
    "Frame",
    "Header",
    "LazyArray",
    "Message",
    "RemoteArray",
    "SegmentPool",
    "check_log_name",
    "check_log_record",
    "check_remote_probe",
    "decode",
    "decode_frame",
    "decode_header",
    "encode",
    "frame_length",
    "frame_op",
    "make_remote_probe",
    "materialize_lazy",
    "materialize_remote",
    "model_from_wire",
    "model_to_wire",
    "prefetch_shm",
    "shm_available",
    "sweep_shm",
    "wire_code",
    "wire_dtype",
]
