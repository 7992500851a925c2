"""Saves a grain iterator in an Orbax checkpoint and restores it into a fresh one, as the trainer does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grain
import orbax.checkpoint as ocp


def orbax_roundtrip(it: grain.DatasetIterator, fresh: Callable[[], grain.DatasetIterator], step: int,
                    directory: Path) -> grain.DatasetIterator:
    """`it`'s state saved at `step` under `directory`, restored into `fresh()`; returns the restored iterator."""
    with ocp.CheckpointManager(directory, item_names=("data",)) as mngr:
        mngr.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        restored = fresh()
        mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    return restored
