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
