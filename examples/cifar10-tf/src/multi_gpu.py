"""Device setup for the multi-GPU scripts: one ``tf.distribute.MirroredStrategy``.

With GPUs, the strategy mirrors the model on every visible GPU (restrict them with
``CUDA_VISIBLE_DEVICES``). Without a GPU, ``cpu_replicas=N`` (or env ``FEDLIFT_CPU_REPLICAS``)
splits the CPU into N logical devices and mirrors over those, so the multi-GPU code path
(N replicas, gradients all-reduced, global batch split N ways) also runs on a laptop or in CI.

TensorFlow fixes its devices when the first op runs, so call ``make_strategy()`` first,
before building a model or touching a tensor.
"""

from __future__ import annotations

import os

import tensorflow as tf

CPU_REPLICAS_ENV = "FEDLIFT_CPU_REPLICAS"


def cpu_replicas_from_env() -> int:
    """``$FEDLIFT_CPU_REPLICAS`` as an int >= 0 (0 when unset or empty)."""
    raw = os.environ.get(CPU_REPLICAS_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"${CPU_REPLICAS_ENV}={raw!r}: expected an integer >= 0.")
    return value


def make_strategy(cpu_replicas: int | None = None) -> tf.distribute.Strategy:
    """A MirroredStrategy over all GPUs, or over ``cpu_replicas`` logical CPUs if no GPU.

    Args:
        cpu_replicas: used only when TensorFlow sees no GPU. N > 0 splits the CPU into
            N logical devices, one replica each; 0 or 1 gives one replica on the CPU.
            None reads ``$FEDLIFT_CPU_REPLICAS`` (default 0).

    Raises:
        ValueError: ``cpu_replicas`` is negative.
        RuntimeError: TensorFlow had already set up its devices (some TF op ran first)
            with a different number of CPU devices.
    """
    n = cpu_replicas_from_env() if cpu_replicas is None else cpu_replicas
    if n < 0:
        raise ValueError(f"cpu_replicas must be >= 0, got {n}.")
    if n <= 1 or tf.config.list_physical_devices("GPU"):
        return tf.distribute.MirroredStrategy()  # all visible GPUs, else the one CPU

    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * n
    current = tf.config.get_logical_device_configuration(cpu) or []
    if len(current) != n:  # (equal: split N ways by an earlier call; reuse it)
        try:
            tf.config.set_logical_device_configuration(cpu, wanted)
        except RuntimeError as exc:
            raise RuntimeError(
                f"make_strategy(cpu_replicas={n}): TensorFlow has already set up its devices "
                f"({exc}); call make_strategy() before any TensorFlow op (before building the "
                "model or creating a tensor). In a fedlift job, run multi-GPU scripts in their "
                "own process: ScriptRunner(..., launch_external_process=True)."
            ) from exc
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)
