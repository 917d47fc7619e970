"""The wire format: messages of JSON fields and raw array buffers; no pickle anywhere.

Besides the format, the two ways arrays travel between processes of one host without
passing through the socket, named for the layers above that use them: shared-memory
segments (``shm_*``, :class:`SegmentPool`) and reads out of the sender's memory
(:class:`RemoteArray`, ``*_remote_*``).
"""

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
    Message,
    decode,
    decode_frame,
    encode,
    frame_length,
    frame_op,
    wire_code,
    wire_dtype,
)

__all__ = [
    "ALLOWED_DTYPES",
    "BFLOAT16_CODE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PREFIX_BYTES",
    "REMOTE_MIN_BYTES",
    "SHM_SESSION_ENV",
    "Frame",
    "Message",
    "RemoteArray",
    "SegmentPool",
    "check_remote_probe",
    "decode",
    "decode_frame",
    "encode",
    "frame_length",
    "frame_op",
    "make_remote_probe",
    "materialize_remote",
    "model_from_wire",
    "model_to_wire",
    "prefetch_shm",
    "shm_available",
    "sweep_shm",
    "wire_code",
    "wire_dtype",
]
