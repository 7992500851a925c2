"""Processes: `jax.distributed.initialize` when several take part.

Owns: deciding whether this is a multi-process run and joining it. Explicit flags win; otherwise a Cloud TPU
pod (TPU_WORKER_HOSTNAMES / MEGASCALE_*) and SLURM (SLURM_NTASKS > 1) are detected, and JAX reads the rest
from their environment (jax/_src/clusters). A single process needs nothing.
"""

from __future__ import annotations

import os


def init_processes(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    import jax

    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") \
            or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
