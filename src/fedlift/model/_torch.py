"""PyTorch glue: tensors to numpy arrays and back, without copies where none is needed.

Torch is never imported here unless the caller hands over a torch object (a tensor
exists only where torch is loaded) or asks for tensors (:func:`arrays_to_tensors`, which a
``framework="pytorch"`` client calls): the server and ``import fedlift.client`` stay
free of it.

* :func:`tensor_to_numpy`: a CPU tensor becomes a numpy view of its own memory (no copy);
  a tensor on a GPU (any device) is copied to the host once, into a contiguous array, and
  that array is what the wire sends. bfloat16 keeps its 2-byte payload as an
  ``ml_dtypes.bfloat16`` array (see ``_dtypes``); float16, integer buffers such as
  BatchNorm's ``num_batches_tracked`` (int64) and bools keep their dtype.
* :func:`arrays_to_tensors`: numpy arrays become CPU tensors on the same memory
  (``torch.from_numpy``). What a client receives lies in memory of its own (a private
  receive buffer, or a copy-on-write mapping of the server's shared memory), so the
  tensors are writable and a write changes this site's copy only; an array that is
  read-only (which fedlift's transports never give) is copied once instead, because a
  tensor cannot be made read-only and writing through it would be undefined.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from ._dtypes import bfloat16_dtype, is_bfloat16

__all__ = [
    "arrays_to_tensors",
    "is_torch_module",
    "is_torch_tensor",
    "tensor_to_numpy",
    "tensors_to_arrays",
    "torch_params",
]

_MAX_DEPTH = 64  # as flatten()


def is_torch_tensor(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.Tensor`` (never imports torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def is_torch_module(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.nn.Module`` (never imports torch)."""
    torch = sys.modules.get("torch")
    nn = getattr(torch, "nn", None) if torch is not None else None
    return nn is not None and isinstance(obj, nn.Module)


def tensor_to_numpy(tensor: Any, where: str = "") -> np.ndarray:
    """``tensor`` as a numpy array: a view of a CPU tensor's memory, or one copy to the host
    of a tensor on any other device (GPU). Gradients are detached; bfloat16 becomes an
    ``ml_dtypes.bfloat16`` array with the same bits."""
    import torch

    at = f" at {where!r}" if where else ""
    t = tensor.detach()
    if t.layout != torch.strided:
        raise ConfigError(
            f"the tensor{at} is {t.layout}; only dense tensors can be sent. Call "
            f".to_dense() first. Received: layout={t.layout}."
        )
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    bf16 = t.dtype == torch.bfloat16
    if bf16:
        t = t.view(torch.int16)  # the same bits; numpy has no bfloat16 of its own
    if t.device.type != "cpu":
        # The one device-to-host copy, straight into a contiguous host tensor: the wire
        # sends it as it is (a strided one would be copied once more on the host).
        t = t.to("cpu", memory_format=torch.contiguous_format)
    try:
        array: np.ndarray = t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise ConfigError(
            f"the tensor{at} cannot be sent: {exc}. The wire carries bool, int8-64, "
            "uint8-64, float16/32/64 and bfloat16; cast it, e.g. tensor.float(). "
            f"Received: dtype={tensor.dtype}, device={tensor.device}."
        ) from None
    return array.view(bfloat16_dtype()) if bf16 else array


def tensors_to_arrays(tree: Any) -> Any:
    """``tree`` with every tensor leaf replaced by :func:`tensor_to_numpy` of it (dicts stay
    dicts in their order, e.g. a ``state_dict()``; tuples become lists). A tree without
    tensors is returned as it is, the same object."""
    if sys.modules.get("torch") is None:
        return tree  # no tensor can exist
    out, _ = _to_arrays(tree, "", 0)
    return out


def _to_arrays(node: Any, path: str, depth: int) -> tuple[Any, bool]:
    if depth > _MAX_DEPTH:
        return node, False  # flatten() reports the depth with the path
    if is_torch_tensor(node):
        return tensor_to_numpy(node, path), True
    if isinstance(node, Mapping):
        items = []
        changed = False
        for key, value in node.items():
            new, moved = _to_arrays(value, f"{path}/{key}" if path else str(key), depth + 1)
            items.append((key, new))
            changed = changed or moved
        return (dict(items), True) if changed else (node, False)
    if isinstance(node, list | tuple):
        pairs = [
            _to_arrays(value, f"{path}/{i}" if path else str(i), depth + 1)
            for i, value in enumerate(node)
        ]
        if any(moved for _, moved in pairs):
            return [new for new, _ in pairs], True
    return node, False


def arrays_to_tensors(tree: Any) -> Any:
    """``tree`` with every numpy leaf as a CPU ``torch.Tensor`` on the same memory (dicts
    and lists rebuilt, other leaves kept). See the module docstring for when a leaf is
    copied (read-only arrays only)."""
    import torch

    def convert(node: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ConfigError(f"params nest deeper than {_MAX_DEPTH} levels.")
        if isinstance(node, np.ndarray):
            return _tensor(torch, node)
        if isinstance(node, Mapping):
            return {key: convert(value, depth + 1) for key, value in node.items()}
        if isinstance(node, list | tuple):
            return [convert(value, depth + 1) for value in node]
        return node

    return convert(tree, 0)


def _tensor(torch: Any, array: np.ndarray) -> Any:
    if (
        not array.flags.writeable
        or array.dtype.byteorder == ">"
        or any(s < 0 for s in array.strides)
    ):
        # A private, native-order copy: torch.from_numpy cannot share such memory safely.
        array = np.array(array, dtype=array.dtype.newbyteorder("="), order="C")
    if is_bfloat16(array.dtype):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def torch_params(module: Any) -> dict[str, np.ndarray]:
    """``module.state_dict()`` as numpy arrays (its keys and order): the params tree of a
    PyTorch model, what ``FedJob(initial_model=module)`` writes as ``.safetensors`` and
    what a PyTorch client's ``model.load_state_dict(input_model.params)`` takes back."""
    state = module.state_dict()
    if not state:
        raise ConfigError(
            f"the {type(module).__name__} model has an empty state_dict(): there is nothing "
            "to train. Pass the model with its layers (e.g. an nn.Module whose __init__ "
            "creates nn.Linear/nn.Conv2d layers). Received: 0 parameters and buffers."
        )
    return {str(key): tensor_to_numpy(value, str(key)) for key, value in state.items()}
