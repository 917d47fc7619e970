"""Param trees (flatten/unflatten, keys, leaf-wise maths) and FLModel's own validation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedlift.errors import ConfigError, ProtocolError
from fedlift.model import (
    FLModel,
    MetaKey,
    ParamsType,
    flat_keys,
    flatten,
    iter_with_keys,
    map_arrays,
    tree_add,
    tree_sub,
    unflatten,
)


def assert_tree_equal(a: Any, b: Any) -> None:
    """Same containers (type, keys in order, lengths) and identical arrays (dtype included)."""
    if isinstance(a, dict):
        assert isinstance(b, dict)
        assert list(a) == list(b)
        for key in a:
            assert_tree_equal(a[key], b[key])
    elif isinstance(a, list):
        assert isinstance(b, list)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_tree_equal(x, y)
    else:
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert np.array_equal(a, b)


def keras_like() -> dict[str, list[np.ndarray]]:
    return {
        "conv": [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0.5, -1.0], np.float32)],
        "pool": [],
        "flatten": [],
        "dense": [np.ones((3, 2), np.float64), np.zeros(2, np.float64)],
    }


# ---------------------------------------------------------------- flatten / unflatten


def test_dict_of_arrays_round_trip() -> None:
    tree = {"w": np.arange(4.0).reshape(2, 2), "b": np.array([1, 2], np.int32)}
    structure, arrays = flatten(tree)
    assert structure == {"d": [["w", None], ["b", None]]}
    assert len(arrays) == 2
    assert arrays[0] is tree["w"]  # flatten does not copy
    assert_tree_equal(unflatten(structure, arrays), tree)


def test_keras_dict_of_lists_keeps_empty_layers() -> None:
    tree = keras_like()
    structure, arrays = flatten(tree)
    assert structure == {
        "d": [
            ["conv", {"l": [None, None]}],
            ["pool", {"l": []}],
            ["flatten", {"l": []}],
            ["dense", {"l": [None, None]}],
        ]
    }
    assert len(arrays) == 4
    back = unflatten(structure, arrays)
    assert back["pool"] == [] and back["flatten"] == []
    assert_tree_equal(back, tree)


def test_nested_dicts_round_trip() -> None:
    tree = {
        "encoder": {"layer1": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)}},
        "head": [np.array([3.0])],
        "empty": {},
    }
    structure, arrays = flatten(tree)
    assert len(arrays) == 3
    back = unflatten(structure, arrays)
    assert back["empty"] == {}
    assert_tree_equal(back, tree)


def test_tuples_become_lists() -> None:
    tree = {"layer": (np.ones(2), np.zeros(3))}
    structure, arrays = flatten(tree)
    assert structure == {"d": [["layer", {"l": [None, None]}]]}
    back = unflatten(structure, arrays)
    assert isinstance(back["layer"], list)
    assert_tree_equal(back, {"layer": [np.ones(2), np.zeros(3)]})


def test_zero_d_arrays_and_numpy_scalars() -> None:
    tree = {"step": np.array(7, np.int64), "scale": np.float32(0.25), "flag": np.bool_(True)}
    structure, arrays = flatten(tree)
    assert [a.shape for a in arrays] == [(), (), ()]
    assert [a.dtype for a in arrays] == [np.int64, np.float32, np.bool_]
    back = unflatten(structure, arrays)
    assert isinstance(back["scale"], np.ndarray)  # a numpy scalar comes back as a 0-d array
    assert back["scale"].dtype == np.float32 and float(back["scale"]) == 0.25
    assert int(back["step"]) == 7 and bool(back["flag"]) is True


def test_order_is_dict_insertion_order() -> None:
    tree = {"z": np.array([1.0]), "a": np.array([2.0]), "m": [np.array([3.0]), np.array([4.0])]}
    _, arrays = flatten(tree)
    assert [float(a[0]) for a in arrays] == [1.0, 2.0, 3.0, 4.0]
    reordered = {"a": tree["a"], "z": tree["z"], "m": tree["m"]}
    _, arrays2 = flatten(reordered)
    assert [float(a[0]) for a in arrays2] == [2.0, 1.0, 3.0, 4.0]


def test_flat_keys_name_every_array_by_path() -> None:
    structure, _ = flatten(keras_like())
    assert flat_keys(structure) == ["conv/0", "conv/1", "dense/0", "dense/1"]
    nested, _ = flatten({"enc": {"l1": [np.ones(1)]}, "w": np.ones(1)})
    assert flat_keys(nested) == ["enc/l1/0", "w"]
    top_list, _ = flatten([np.ones(1), [np.ones(1)]])
    assert flat_keys(top_list) == ["0", "1/0"]
    assert [k for k, _ in iter_with_keys({"a": [np.ones(1), np.zeros(1)]})] == ["a/0", "a/1"]


def test_a_bare_array_is_a_tree() -> None:
    structure, arrays = flatten(np.arange(3))
    assert structure is None
    assert flat_keys(structure) == [""]
    assert np.array_equal(unflatten(structure, arrays), np.arange(3))


# ---------------------------------------------------------------- leaf-wise maths


def test_map_arrays_applies_leafwise_and_keeps_structure() -> None:
    tree = keras_like()
    doubled = map_arrays(lambda a: a * 2, tree)
    assert list(doubled) == ["conv", "pool", "flatten", "dense"]
    assert doubled["pool"] == []
    assert np.array_equal(doubled["conv"][0], np.arange(6, dtype=np.float32).reshape(2, 3) * 2)
    assert np.array_equal(doubled["dense"][0], np.full((3, 2), 2.0))
    summed = map_arrays(lambda a, b, c: a + b + c, tree, tree, tree)
    assert np.array_equal(summed["conv"][1], np.array([1.5, -3.0], np.float32))


def test_tree_add_and_sub() -> None:
    a = {"w": [np.array([1.0, 2.0]), np.array([[3.0]])], "none": []}
    b = {"w": [np.array([0.5, 0.25]), np.array([[1.0]])], "none": []}
    diff = tree_sub(a, b)
    assert np.array_equal(diff["w"][0], np.array([0.5, 1.75]))
    assert np.array_equal(diff["w"][1], np.array([[2.0]]))
    assert diff["none"] == []
    assert_tree_equal(tree_add(b, diff), a)


def test_map_arrays_reports_structure_differences() -> None:
    a = {"conv": [np.ones(1)], "dense": [np.ones(1)]}
    b = {"conv": [np.ones(1)], "extra": [np.ones(1)]}
    with pytest.raises(ConfigError, match="differ in structure") as info:
        tree_add(a, b)
    assert "missing ['dense/0']" in str(info.value)
    assert "unexpected ['extra/0']" in str(info.value)


# ---------------------------------------------------------------- flatten errors


def test_non_string_keys_are_refused_with_their_path() -> None:
    with pytest.raises(ConfigError, match="keys must be strings") as info:
        flatten({"outer": {1: np.ones(1)}})
    assert "'outer'" in str(info.value)
    assert "1 (int)" in str(info.value)


@pytest.mark.parametrize(
    ("leaf", "type_name"),
    [("oops", "str"), (b"raw", "bytes"), (None, "NoneType"), (3.5, "float"), (object(), "object")],
)
def test_unsupported_leaves_name_the_path(leaf: Any, type_name: str) -> None:
    with pytest.raises(ConfigError) as info:
        flatten({"dense": [np.ones(1), leaf]})
    message = str(info.value)
    assert "'dense/1'" in message
    assert f"is a {type_name}" in message


def test_unsupported_root_leaf_says_root() -> None:
    with pytest.raises(ConfigError, match="<root>"):
        flatten("not a tree")


def test_framework_tensor_like_leaves_are_converted() -> None:
    class Tensor:
        def numpy(self) -> np.ndarray:
            return np.array([1.0, 2.0], np.float32)

    _, arrays = flatten({"t": Tensor()})
    assert arrays[0].dtype == np.float32
    assert np.array_equal(arrays[0], [1.0, 2.0])


def test_too_deep_nesting_is_refused() -> None:
    tree: Any = np.ones(1)
    for _ in range(70):
        tree = {"x": tree}
    with pytest.raises(ConfigError, match="deeper than 64"):
        flatten(tree)


# ---------------------------------------------------------------- unflatten errors


@pytest.mark.parametrize(
    ("structure", "n_arrays", "phrase"),
    [
        ({"x": []}, 0, "bad node"),
        ({"d": "abc"}, 0, "bad node"),
        ({"l": None}, 0, "bad node"),
        ({"d": [], "l": []}, 0, "bad node"),
        ("string", 0, "bad node"),
        ([None], 1, "bad node"),
        (5, 1, "bad node"),
        ({"d": [["a"]]}, 0, "bad dict entry"),
        ({"d": [[1, None]]}, 1, "bad dict entry"),
        ({"d": [["a", None, None]]}, 1, "bad dict entry"),
        ({"d": ["a"]}, 1, "bad dict entry"),
        ({"l": [None, None]}, 1, "names more arrays than the 1 sent"),
        ({"l": [None]}, 2, "names 1 arrays but 2 were sent"),
        (None, 0, "names more arrays"),
        ({"d": [["a", None], ["a", None]]}, 2, "'a' twice"),
    ],
)
def test_unflatten_rejects_malformed_structures(structure: Any, n_arrays: int, phrase: str) -> None:
    arrays = [np.zeros(1) for _ in range(n_arrays)]
    with pytest.raises(ProtocolError) as info:
        unflatten(structure, arrays)
    assert phrase in str(info.value)


def test_unflatten_rejects_too_deep_structures() -> None:
    structure: Any = None
    for _ in range(70):
        structure = {"l": [structure]}
    with pytest.raises(ProtocolError, match="deeper than 64"):
        unflatten(structure, [np.zeros(1)])


# ---------------------------------------------------------------- FLModel


def test_params_type_defaults_to_full_only_with_params() -> None:
    assert FLModel(params={"w": np.ones(1)}).params_type is ParamsType.FULL
    assert FLModel(metrics={"accuracy": 0.5}).params_type is None
    assert FLModel().meta == {}
    assert FLModel(meta=None).meta == {}  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", ["diff", "DIFF", "Diff", ParamsType.DIFF])
def test_params_type_accepts_strings(raw: Any) -> None:
    assert FLModel(params_type=raw, params={"w": np.ones(1)}).params_type is ParamsType.DIFF


@pytest.mark.parametrize("raw", ["partial", 5, "full_weights"])
def test_bad_params_type_is_a_config_error(raw: Any) -> None:
    with pytest.raises(ConfigError, match="params_type must be ParamsType.FULL or ParamsType.DIFF"):
        FLModel(params_type=raw, params={"w": np.ones(1)})


def test_bad_meta_and_metrics_types() -> None:
    with pytest.raises(ConfigError, match="meta must be a dict"):
        FLModel(meta=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="metrics must be a dict"):
        FLModel(metrics=0.9)  # type: ignore[arg-type]


def test_positional_arguments_follow_nvflare_order() -> None:
    model = FLModel(ParamsType.DIFF, {"w": np.ones(1)}, None, {"loss": 1.0}, 0, 3, 5)
    assert model.params_type is ParamsType.DIFF
    assert model.metrics == {"loss": 1.0}
    assert (model.start_round, model.current_round, model.total_rounds) == (0, 3, 5)


def test_weight_defaults_to_one_and_reads_num_steps() -> None:
    assert FLModel().weight() == 1.0
    assert FLModel(meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 250}).weight() == 250.0
    assert FLModel(meta={"NUM_STEPS_CURRENT_ROUND": np.int64(3)}).weight() == 3.0
    assert FLModel(meta={"NUM_STEPS_CURRENT_ROUND": 0.5}).weight() == 0.5


@pytest.mark.parametrize(
    "raw", [0, -1, -0.5, math.nan, math.inf, "many", "5", b"5", None, [1], True]
)
def test_bad_weights_are_config_errors(raw: Any) -> None:
    model = FLModel(meta={MetaKey.NUM_STEPS_CURRENT_ROUND: raw})
    with pytest.raises(ConfigError, match="NUM_STEPS_CURRENT_ROUND") as info:
        model.weight()
    assert "positive" in str(info.value)


def test_summary_describes_the_model() -> None:
    model = FLModel(params=keras_like(), current_round=2, total_rounds=5)
    assert model.summary() == ("FLModel(round=2/5, FULL, 4 arrays, 16 values, metrics=None)")
