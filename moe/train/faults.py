"""Fault-injection hooks for the reliability tests: an iterator wrapper installed only when a MOE_FAULT_*
variable is set (docs/reliability.md). Normal runs never see it.

Each variable is a comma-separated list of 1-based step numbers; each entry fires once per process:
    MOE_FAULT_NAN_STEPS      that step's batch gets NaN loss weights (a non-finite loss and gradients)
    MOE_FAULT_SPIKE_STEPS    that step's targets are replaced by shifted tokens (a loss spike)
    MOE_FAULT_SIGTERM_STEP   this process gets SIGTERM while that step runs (a preemption at a known step)
    MOE_FAULT_KILL_STEP      this process SIGKILLs itself when that step's batch is fetched (kill -9 / a VM
                             that vanishes: no handler runs, nothing is flushed or synced)
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable, Iterator

import numpy as np

FAULT_ENV = ("MOE_FAULT_NAN_STEPS", "MOE_FAULT_SPIKE_STEPS", "MOE_FAULT_SIGTERM_STEP", "MOE_FAULT_KILL_STEP")

log = logging.getLogger("moe.train")


def fault_steps(name: str) -> set[int]:
    """The steps a fault-injection variable names; empty when unset."""
    raw = os.environ.get(name, "").strip()
    try:
        return {int(x) for x in raw.split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected comma-separated step numbers") from None


class FaultyBatches:
    """Yields the wrapped iterator's batches, damaged at the configured steps. `next_step()` says which step
    the batch being fetched is for (the loop's counter: after a rollback the steps repeat)."""

    def __init__(self, batches: Iterator[dict], next_step: Callable[[], int], vocab_size: int,
                 faults: dict[str, set[int]]):
        self.batches, self.next_step, self.vocab_size, self.faults = batches, next_step, vocab_size, faults

    def __iter__(self):
        return self

    def _fires(self, name: str, step: int) -> bool:
        if step in self.faults[name]:
            self.faults[name].discard(step)
            return True
        return False

    def __next__(self) -> dict:
        batch, step = next(self.batches), self.next_step()
        if self._fires("MOE_FAULT_NAN_STEPS", step):
            log.warning("fault injection: NaN loss weights in the batch of step %d", step)
            batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
        if self._fires("MOE_FAULT_SPIKE_STEPS", step):
            log.warning("fault injection: shifted targets (a loss spike) in the batch of step %d", step)
            batch = dict(batch, targets=(batch["targets"] + self.vocab_size // 2 + 3) % self.vocab_size)
        if self._fires("MOE_FAULT_SIGTERM_STEP", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._fires("MOE_FAULT_KILL_STEP", step):
            os.kill(os.getpid(), signal.SIGKILL)
        return batch


def install(batches: Iterator[dict], next_step: Callable[[], int], vocab_size: int) -> Iterator[dict]:
    """`batches` itself when no MOE_FAULT_* variable is set, else a FaultyBatches around it."""
    faults = {name: fault_steps(name) for name in FAULT_ENV}
    if not any(faults.values()):
        return batches
    return FaultyBatches(batches, next_step, vocab_size, faults)
