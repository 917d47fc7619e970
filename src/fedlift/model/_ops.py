"""Element-wise maths on param trees (pure functions)."""

from __future__ import annotations

import numpy as np

from ._tree import ParamTree, map_arrays

__all__ = ["tree_add", "tree_sub"]


def tree_sub(a: ParamTree, b: ParamTree) -> ParamTree:
    """``a - b`` leaf by leaf: the DIFF of new weights ``a`` against received weights ``b``."""
    return map_arrays(lambda x, y: np.subtract(x, y), a, b)


def tree_add(a: ParamTree, b: ParamTree) -> ParamTree:
    """``a + b`` leaf by leaf."""
    return map_arrays(lambda x, y: np.add(x, y), a, b)
