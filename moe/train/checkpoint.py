"""Orbax checkpoints of the whole training state, with fallback past damaged steps.

Owns: WORKDIR/checkpoints/ (one Orbax `CheckpointManager`, items `state` (params, optimizer state, step,
rng), `data` (the grain iterator's position) and `meta` (the resolved config and run facts as JSON)).

Resume policy, the one place it is written:
    1. the newest *restorable* step in WORKDIR/checkpoints (a damaged newer step is moved aside to
       WORKDIR/checkpoints_damaged/ and the next older one is tried — user data is never deleted);
    2. else `train.init_from` (params only, optimizer starts fresh);
    3. else a fresh initialisation.
Orbax skips interrupted saves (`*.orbax-checkpoint-tmp-*`) by itself, but a committed step whose files were
later truncated or deleted is still listed by `latest_step()` and fails in `restore` with a bare exception
(seen with orbax-checkpoint 0.12): detecting that and falling back is ours.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from moe.config import CheckpointConfig

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no usable one exists where one is required."""


# What a failed write raises: OSError from Python-side files, ValueError from TensorStore (e.g. "OUT_OF_RANGE:
# ... File too large [os_error_code='27']" or ENOSPC), RuntimeError from Orbax's background commit thread.
WRITE_ERRORS = (OSError, ValueError, RuntimeError)


def _write_error(e: Exception) -> str:
    """The one line of a (possibly multi-line, deeply chained) write error that says what failed."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= 300 else "..." + line[-300:]  # TensorStore puts the OS reason last


def _is_remote(path: str) -> bool:
    return "://" in path


class Checkpointer:
    def __init__(self, workdir: str, cfg: CheckpointConfig, *, with_data: bool = True):
        # Orbax needs absolute paths (a relative one fails at the first save): the default workdir is runs/<name>.
        self.workdir = str(workdir) if _is_remote(str(workdir)) else os.path.abspath(workdir)
        self.dir = os.path.join(self.workdir, "checkpoints")
        self.cfg = cfg
        self.with_data = with_data
        self.damaged: list[tuple[int, str]] = []  # (step, reason) of steps set aside by restore_latest
        items = ("state", "data", "meta") if with_data else ("state", "meta")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=items)

    # --- saving ----------------------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: dict, data_iter=None) -> None:
        """Starts an (async) save of `step` (the caller decides when: Orbax's own save interval is not used)."""
        import grain

        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if self.with_data:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        try:
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        except WRITE_ERRORS as e:  # a failed earlier async save surfaces here too (save waits for it first)
            raise CheckpointError(f"could not write a checkpoint under {self.dir} ({_write_error(e)}); free disk "
                                  f"space or fix permissions, then rerun: it resumes from step {self._committed()}, "
                                  "earlier checkpoints are untouched") from e

    def wait(self) -> None:
        """Blocks until the pending async save has committed (raises what the background write raised)."""
        try:
            self.manager.wait_until_finished()
        except WRITE_ERRORS as e:
            raise CheckpointError(f"could not write a checkpoint under {self.dir} ({_write_error(e)}); free disk "
                                  f"space or fix permissions, then rerun: it resumes from step {self._committed()}, "
                                  "earlier checkpoints are untouched") from e

    def _committed(self) -> str:
        """The newest committed step, for messages (Orbax lists only committed, non-temporary steps)."""
        try:
            steps = self.steps()
        except Exception:  # noqa: BLE001 - only for a message
            return "the newest committed step"
        return str(steps[-1]) if steps else "scratch (no committed checkpoint)"

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    # --- restoring -------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any, data_iter=None, check_meta: Callable[[dict], None] | None = None,
                       max_step: int | None = None) -> tuple[int, Any, dict] | None:
        """Newest restorable step (at most `max_step`) as (step, state, meta), moving damaged steps aside; None
        if there is none.

        `check_meta(meta)` runs on each step's meta before its state is read and may raise (e.g. the config
        changed the model): a state that does not fit the new model must be an error, not "damaged"."""
        import grain

        for step in reversed(self.steps()):
            if max_step is not None and step > max_step:
                continue
            if check_meta is not None:
                try:
                    meta = dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
                except Exception as e:  # noqa: BLE001 - see below
                    self._set_aside(step, e)
                    continue
                check_meta(meta)
            args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            if self.with_data:
                args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # noqa: BLE001 - Orbax raises bare Exception/KeyError/ValueError on damage
                self._set_aside(step, e)
                continue
            return step, out["state"], dict(out["meta"])
        return None

    def _set_aside(self, step: int, err: Exception) -> None:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        src = os.path.join(self.dir, str(step))
        if _is_remote(self.dir):
            log.error("checkpoint step %d is damaged (%s); skipping it (left in place on remote storage)", step, reason)
        else:
            dst_root = Path(self.workdir) / "checkpoints_damaged"
            dst_root.mkdir(parents=True, exist_ok=True)
            dst = dst_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.move(src, dst)
            (dst / "DAMAGED.txt").write_text(f"step {step} could not be restored: {reason}\n")
            log.error("checkpoint step %d is damaged (%s); moved to %s, falling back to an older step",
                      step, reason, dst)
        self.manager.reload()
        self.damaged.append((step, reason))


def find_checkpoint_dir(path: str) -> str:
    """A workdir or its checkpoints/ folder -> the checkpoints folder (for `train.init_from`, eval)."""
    p = path.rstrip("/")
    if _is_remote(p):
        return p if p.endswith("/checkpoints") else p + "/checkpoints"
    if os.path.isdir(os.path.join(p, "checkpoints")):
        return os.path.join(p, "checkpoints")
    if os.path.isdir(p):
        return p
    raise CheckpointError(f"no checkpoint directory at '{path}' (expected a workdir with checkpoints/ in it)")


def restore_params(path: str, abstract_params: Any, step: int | None = None) -> tuple[int, Any]:
    """Params only from another run's newest (or given) step: for `train.init_from` and evaluation."""
    ckdir = find_checkpoint_dir(path)
    ckdir = ckdir if _is_remote(ckdir) else os.path.abspath(ckdir)
    mgr = ocp.CheckpointManager(ckdir, item_names=("state", "data", "meta"))
    steps = sorted(mgr.all_steps())
    if not steps:
        raise CheckpointError(f"no checkpoints in '{ckdir}'")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"step {step} not in '{ckdir}'; available: {steps}")
    abstract = {"params": abstract_params}
    # Partial restore: only the params subtree of the saved state is read.
    restore_args = ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), abstract),
        partial_restore=True,
    )
    out = mgr.restore(step, args=ocp.args.Composite(state=restore_args))
    mgr.close()
    return step, out["state"]["params"]
