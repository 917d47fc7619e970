"""Models and param trees: :class:`FLModel` and flatten/unflatten with stable keys; param
trees on disk (safetensors) and out of Keras and PyTorch models (both imported lazily);
bfloat16 as a float dtype (``ml_dtypes``, imported where such an array is made).

The file and Keras helpers load on first use (PEP 562): the Client API imports this
package, and a training script's ``import fedlift.client`` has no use for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._exports import lazy_exports
from ._dtypes import bfloat16_dtype, is_bfloat16, is_float_dtype
from ._flmodel import AlgorithmConstants, FLModel, MetaKey, ParamsType
from ._lists import NUMPY_KEY, NPConstants, tree_from_lists
from ._ops import tree_add, tree_sub
from ._torch import (
    arrays_to_tensors,
    is_torch_module,
    is_torch_tensor,
    tensor_to_numpy,
    tensors_to_arrays,
    torch_params,
)
from ._tree import ParamTree, Structure, flat_keys, flatten, iter_with_keys, map_arrays, unflatten

if TYPE_CHECKING:
    from ._keras import (
        build_keras_model,
        is_keras_model,
        keras_params,
        load_keras_model,
        plain_keras_copy,
        set_keras_params,
    )
    from ._safetensors import load_safetensors, save_safetensors, stage_safetensors

__all__ = [
    "AlgorithmConstants",
    "FLModel",
    "MetaKey",
    "NPConstants",
    "NUMPY_KEY",
    "ParamTree",
    "ParamsType",
    "Structure",
    "arrays_to_tensors",
    "bfloat16_dtype",
    "build_keras_model",
    "flat_keys",
    "flatten",
    "is_bfloat16",
    "is_float_dtype",
    "is_keras_model",
    "is_torch_module",
    "is_torch_tensor",
    "iter_with_keys",
    "keras_params",
    "load_keras_model",
    "load_safetensors",
    "map_arrays",
    "plain_keras_copy",
    "save_safetensors",
    "set_keras_params",
    "stage_safetensors",
    "tensor_to_numpy",
    "tensors_to_arrays",
    "torch_params",
    "tree_add",
    "tree_from_lists",
    "tree_sub",
    "unflatten",
]

_LAZY = {
    "build_keras_model": "_keras",
    "is_keras_model": "_keras",
    "keras_params": "_keras",
    "load_keras_model": "_keras",
    "plain_keras_copy": "_keras",
    "set_keras_params": "_keras",
    "load_safetensors": "_safetensors",
    "save_safetensors": "_safetensors",
    "stage_safetensors": "_safetensors",
}
"""Names loaded on first use, and the module each comes from."""


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
