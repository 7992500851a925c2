"""The rollback policy: after each logged step, is the run healthy, and if not, where does it go back to?

Owns: what counts as bad (non-finite params, too many skipped updates in a row, a loss spike), the rollback
ladder and the counts reported in metrics. Must not touch the state, the data or the checkpoints: the loop
acts on the verdict.

GLaM's recipe: when training goes bad, restart from the last good checkpoint and skip past the batches
that led there. A non-finite loss alone is not bad: `apply_if_finite` skipped that update (counted in
`skipped_total`). Bad is non-finite params, or so many skips in a row that the next non-finite update would
be applied. The ladder: a step rolled back to MAX_ROLLBACKS_PER_STEP times is exhausted, and the next
rollback goes to an older checkpoint (a checkpoint can itself hold the seed of the divergence); when no
older one is left the run stops with `Diverged`.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from moe.config import OptimConfig, TrainConfig

MAX_ROLLBACKS_PER_STEP = 3


class Diverged(RuntimeError):
    """Training kept producing non-finite updates or loss spikes after rolling back."""


class Guard:
    def __init__(self, train: TrainConfig, optim: OptimConfig):
        self.spike_factor = train.spike_factor
        self.max_skips = optim.max_consecutive_skips
        self.recent: deque[float] = deque(maxlen=train.spike_window)
        self.rollbacks = 0  # rollbacks so far (this process's run)
        self.skipped_batches = 0  # batches thrown away by rollbacks
        self.rollbacks_to: dict[int, int] = {}  # checkpoint step -> rollbacks to it

    def verdict(self, metrics: dict) -> str | None:
        """What is wrong with this logged step ("non-finite updates", "loss spike"), or None (its loss then
        joins the spike window)."""
        loss = float(metrics["loss"])
        if not math.isfinite(float(metrics["param_norm"])) or int(metrics["skipped_consecutive"]) >= self.max_skips:
            return "non-finite updates"
        if (math.isfinite(loss) and self.spike_factor > 0 and len(self.recent) >= 3
                and loss > self.spike_factor * statistics.median(self.recent)):
            return "loss spike"
        if math.isfinite(loss):
            self.recent.append(loss)
        return None

    def ceiling(self) -> int | None:
        """The newest checkpoint step a rollback may use: below every exhausted step (None: any)."""
        done = [s for s, n in self.rollbacks_to.items() if n >= MAX_ROLLBACKS_PER_STEP]
        return min(done) - 1 if done else None

    def rolled_back(self, from_step: int, to_step: int) -> None:
        self.rollbacks += 1
        self.skipped_batches += from_step - to_step
        self.rollbacks_to[to_step] = self.rollbacks_to.get(to_step, 0) + 1
        self.recent.clear()

    def give_up(self, step: int, what: str, loss: float) -> Diverged:
        done = sorted(s for s, n in self.rollbacks_to.items() if n >= MAX_ROLLBACKS_PER_STEP)
        if not done:
            return Diverged(f"step {step}: {what} (loss {loss:.4g}) and no checkpoint to roll back to; "
                            "lower optim.lr or save earlier (checkpoint.every)")
        return Diverged(f"step {step}: {what} (loss {loss:.4g}) after {MAX_ROLLBACKS_PER_STEP} rollbacks to each of "
                        f"steps {', '.join(map(str, done))} and no older checkpoint; lower optim.lr or check the data")
