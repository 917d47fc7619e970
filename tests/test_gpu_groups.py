"""The simulator's ``-gpu`` option: parsing GPU groups and giving them to clients."""

from __future__ import annotations

import pytest

from fedlift.errors import ConfigError
from fedlift.simulator import assign_groups, parse_gpu_groups


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0", [["0"]]),
        ("0,1", [["0"], ["1"]]),
        ("3,1,2", [["3"], ["1"], ["2"]]),
        ("0,0", [["0"], ["0"]]),  # two clients share one GPU
        ("[0,1],[2,3]", [["0", "1"], ["2", "3"]]),
        ("[0]", [["0"]]),
        ("[0,1],[0,1]", [["0", "1"], ["0", "1"]]),
        ("[2],[0,1,3]", [["2"], ["0", "1", "3"]]),
        (" 0 , 1 ", [["0"], ["1"]]),
        ("[ 0, 1 ] , [2 ,3]", [["0", "1"], ["2", "3"]]),
        ("10,11", [["10"], ["11"]]),
    ],
)
def test_parse_gpu_groups(spec: str, expected: list[list[str]]) -> None:
    assert parse_gpu_groups(spec) == expected


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        ("", "got an empty value"),
        ("   ", "got an empty value"),
        ("[0,1", "is malformed"),
        ("0,1]", "is malformed"),
        ("[0],1", "is malformed"),
        ("1,[0]", "is malformed"),
        ("[0,1]x", "is malformed"),
        ("[[0]]", "is malformed"),
        ("a,b", "GPU ids must be non-negative integers"),
        ("0,-1", "GPU ids must be non-negative integers"),
        ("0,,1", "GPU ids must be non-negative integers"),
        ("0,", "GPU ids must be non-negative integers"),
        ("[]", "GPU ids must be non-negative integers"),
        ("[0,a]", "GPU ids must be non-negative integers"),
        ("[0,1,]", "GPU ids must be non-negative integers"),
        ("[0,0]", "names a GPU twice"),
        ("[1],[2,3,2]", "names a GPU twice"),
    ],
)
def test_malformed_gpu_specs(spec: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_gpu_groups(spec)
    message = str(info.value)
    assert phrase in message
    if spec.strip():
        assert f"-gpu {spec!r}" in message


def test_duplicate_error_names_the_group() -> None:
    with pytest.raises(ConfigError, match=r"group \['0', '0'\] names a GPU twice"):
        parse_gpu_groups("[0,0]")


def test_assign_groups_round_robin() -> None:
    sites = ["site-1", "site-2", "site-3", "site-4"]
    assert assign_groups(sites, [["0"], ["1"]]) == {
        "site-1": ["0"],
        "site-2": ["1"],
        "site-3": ["0"],
        "site-4": ["1"],
    }
    assert assign_groups(sites, parse_gpu_groups("[0,1],[2,3]")) == {
        "site-1": ["0", "1"],
        "site-2": ["2", "3"],
        "site-3": ["0", "1"],
        "site-4": ["2", "3"],
    }
    assert assign_groups(["site-1", "site-2", "site-3"], [["0"], ["1"], ["2"]]) == {
        "site-1": ["0"],
        "site-2": ["1"],
        "site-3": ["2"],
    }
    assert assign_groups(sites[:3], [["0"]]) == {s: ["0"] for s in sites[:3]}


def test_more_groups_than_sites() -> None:
    with pytest.raises(ConfigError) as info:
        assign_groups(["site-1", "site-2"], [["0"], ["1"], ["2"]])
    message = str(info.value)
    assert "3 GPU groups" in message
    assert "only 2 clients" in message
    assert "at most one group per client" in message
