"""``FrameworkType``: what a client script trains with, by NVFlare's names and values."""

from __future__ import annotations

from enum import Enum

__all__ = ["FRAMEWORKS", "FrameworkType"]


class FrameworkType(str, Enum):
    """The ``framework`` of a :class:`~fedlift.job.ScriptRunner` (NVFlare's names).

    A ``str`` enum, so ``FrameworkType.PYTORCH == "pytorch"`` and ``job.json`` stores the
    plain string. ``TENSORFLOW`` and ``NUMPY`` exchange params as numpy arrays;
    ``PYTORCH`` is the framework of scripts that load ``state_dict`` s. ``RAW`` is
    NVFlare's "no conversion": in fedlift params still travel as trees of numpy arrays
    (fedlift sends no Python objects, so nothing arbitrary crosses the wire), which for a
    script is what ``NUMPY`` gives; NVFlare's NumPy and scikit-learn recipes use it.
    """

    PYTORCH = "pytorch"
    TENSORFLOW = "tensorflow"
    NUMPY = "numpy"
    RAW = "raw"


FRAMEWORKS: tuple[str, ...] = tuple(member.value for member in FrameworkType)
"""The values ``ScriptRunner(framework=...)`` accepts."""
