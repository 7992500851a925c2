"""Accelerator facts, in one table: HBM, TensorCores and dense bf16 peak FLOP/s per chip; and this host's
measured matmul peak where no vendor figure applies (CPU).

Owns: every peak or memory figure the code reports against (MFU in training and the benchmark suite,
the ideal step time and HBM budget of an AOT compile). Must not import the model.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Chip(NamedTuple):
    hbm_gib: float  # HBM per chip (v2/v3: per chip of two cores)
    cores: int  # TensorCores per chip; a JAX device is one core, or a whole chip in megacore mode
    peak_bf16: float  # dense bf16 FLOP/s per chip (vendor figure)


# Keyed by the `device_kind` JAX reports (Cloud TPU system-architecture pages, NVIDIA datasheets, dense).
CHIPS: dict[str, Chip] = {
    "TPU v2": Chip(16, 2, 45e12),
    "TPU v3": Chip(32, 2, 123e12),
    "TPU v4": Chip(32, 2, 275e12),
    "TPU v5 lite": Chip(16, 1, 197e12),  # v5e
    "TPU v5": Chip(95, 2, 459e12),  # v5p
    "TPU v6 lite": Chip(32, 1, 918e12),  # v6e (Trillium)
    "TPU7x": Chip(192, 2, 2307e12),  # Ironwood
    "NVIDIA A100": Chip(80, 1, 312e12),
    "NVIDIA H100": Chip(80, 1, 989e12),
    "NVIDIA H200": Chip(141, 1, 989e12),
}


def chip(device_kind: str) -> Chip | None:
    """The CHIPS row of a device kind: the longest key the kind starts with (GPU kinds carry suffixes, e.g.
    'NVIDIA H100 80GB HBM3'; v5p reports 'TPU v5'), else None (CPU, unknown chips)."""
    keys = [k for k in CHIPS if device_kind.startswith(k)]
    return CHIPS[max(keys, key=len)] if keys else None


def chips_of(devices) -> float:
    """How many chips a list of devices spans (a device is a core, or a chip in megacore mode)."""
    dev = devices[0]
    row = chip(dev.device_kind)
    return len(devices) * getattr(dev, "num_cores", 1) / (row.cores if row else 1)


def matmul_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of one [n,n]x[n,n] matmul in `dtype` with fp32 accumulation, best of `reps`: this CPU's peak."""
    x = jnp.ones((n, n), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


_measured: dict[str, float] = {}


def peak_flops_per_second(dtype: str = "float32", remeasure: bool = False) -> float:
    """The machine's matmul peak: the CHIPS figure times the chips on TPU/GPU; on CPU `matmul_peak` (all fake
    CPU devices share the same cores), measured on first use and again on `remeasure`, keeping the highest: a
    measurement taken while other processes load the cores underestimates it, never the reverse."""
    devices = jax.devices()
    row = chip(devices[0].device_kind)
    if row is not None:
        return row.peak_bf16 * chips_of(devices)
    if dtype not in _measured or remeasure:
        _measured[dtype] = max(_measured.get(dtype, 0.0), matmul_peak(dtype))
    return _measured[dtype]
