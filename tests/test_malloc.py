"""The worker's allocator tuning: applied on glibc, and it can be turned off."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from fedlift._malloc import tune_allocator; print(tune_allocator())"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuning_applies_on_glibc_and_can_be_turned_off() -> None:
    def run(value: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "FEDLIFT_MALLOC_TUNING"}
        if value is not None:
            env["FEDLIFT_MALLOC_TUNING"] = value
        done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run(None) == "True"
    assert run("0") == "False"


def test_workers_get_the_huge_page_heap_tunable_without_losing_the_users() -> None:
    from fedlift._malloc import worker_environment

    assert worker_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}
    out = worker_environment(mine)
    assert out["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert out["X"] == "1" and mine["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    chosen = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert worker_environment(chosen) == chosen  # the user's own choice stands
    assert "GLIBC_TUNABLES" not in worker_environment({"FEDLIFT_MALLOC_TUNING": "0"})
