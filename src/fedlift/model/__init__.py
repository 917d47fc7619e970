"""Models and param trees: :class:`FLModel` and flatten/unflatten with stable keys."""

from ._flmodel import AlgorithmConstants, FLModel, MetaKey, ParamsType
from ._ops import tree_add, tree_sub
from ._tree import ParamTree, Structure, flat_keys, flatten, iter_with_keys, map_arrays, unflatten

__all__ = [
    "AlgorithmConstants",
    "FLModel",
    "MetaKey",
    "ParamTree",
    "ParamsType",
    "Structure",
    "flat_keys",
    "flatten",
    "iter_with_keys",
    "map_arrays",
    "tree_add",
    "tree_sub",
    "unflatten",
]
