"""What a Flower ClientApp process keeps between messages (``tf_flower_app``).

Flower hands Ray the ``ClientApp`` by value (``tf_flower_app`` runs as ``__main__``, which
cloudpickle copies), so a global of that file is a fresh copy at every message; this module
is imported by name in each Ray actor's process, so what it holds lasts as long as that
process.
"""

from __future__ import annotations

from typing import Any

MODEL: dict[str, Any] = {}  # "model": one compiled TFNet per process, "fresh": its new Adam
SITES: dict[int, Any] = {}  # per partition: the site's arrays
