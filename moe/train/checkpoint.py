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
(seen with orbax-checkpoint 0.12), and a flipped bit restores silently as a wrong value: detecting both and
falling back is ours. What a failed restore is decides what happens:
    damage          unreadable or missing files, a checksum mismatch (moe/train/integrity.py), NaN/Inf in
                    the state: that step alone is set aside, the next older one tried;
    incompatibility the config or tokenizer changed in a key that cannot change on resume, or the saved
                    data-iterator position does not fit the pipeline: an error, nothing moved;
    environment     permissions, a read-only or full disk: an error, nothing moved.
When every step is damaged nothing is moved and the run stops with the reasons: it never starts afresh
over a workdir full of checkpoints.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from moe.config import CheckpointConfig
from moe.runtime import storage
from moe.train import integrity

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no usable one exists where one is required."""


# What a failed write raises: OSError from Python-side files, ValueError from TensorStore (e.g. "OUT_OF_RANGE:
# ... File too large [os_error_code='27']" or ENOSPC), RuntimeError from Orbax's background commit thread.
WRITE_ERRORS = (OSError, ValueError, RuntimeError)


def _write_error(e: Exception) -> str:
    """The one line of a (possibly multi-line, deeply chained) write error that says what failed."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return _shorten(lines[0] if lines else type(e).__name__)


# TensorStore appends its whole spec (kilobytes of JSON) and source locations to an error: not for a person.
_TS_NOISE = re.compile(r"\s*\[(tensorstore_spec|source locations)='.*?'\](?=\s*\[|\s*$)")


def _shorten(line: str) -> str:
    """An error line without TensorStore's spec dump, at most 300 characters: the OS reason (e.g. 'File too
    large [os_error_code='27']') comes last, so a long path is cut from the middle."""
    line = _TS_NOISE.sub("", line)
    return line if len(line) <= 300 else line[:100] + " ... " + line[-195:]


class Checkpointer:
    def __init__(self, workdir: str, cfg: CheckpointConfig, *, with_data: bool = True):
        self.workdir = str(workdir)  # what our own files use (a URL stays a URL: moe/runtime/storage.py)
        self.dir = storage.orbax_path(storage.join(self.workdir, "checkpoints"))  # what Orbax is given
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
        """Starts an (async) save of `step` (the caller decides when: Orbax's own save interval is not used).
        The state's checksums (moe/train/integrity.py) go into the step's meta, to be verified on restore."""
        import grain

        meta = dict(meta, checksums=integrity.checksums(state))
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
        """Newest sound step (at most `max_step`) as (step, state, meta); None if there is no step at all.

        Each step's failures are classified (module docstring): damage (unreadable, checksum mismatch,
        non-finite values) sets that step aside once an older sound step is found; incompatibility
        (`check_meta` raising, e.g. the config changed the model, or a data-iterator position that does not
        fit the pipeline) and environment (permissions, disk) raise and touch nothing. When every step is
        damaged nothing is moved either: CheckpointError lists the reasons."""
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            if max_step is not None and step > max_step:
                continue
            try:
                meta = dict(self._read(step, meta=ocp.args.JsonRestore())["meta"])
                expected = meta.pop("checksums", None)  # ours, not the caller's
                if check_meta is not None:
                    check_meta(meta)
                state = self._read(step, state=ocp.args.StandardRestore(abstract_state))["state"]
                why = integrity.verify(state, expected)
                if why is None and self.with_data:
                    why = self._restore_data(step, data_iter)
            except _Damaged as e:
                why = str(e)
            if not _everywhere(why is None):
                damaged.append((step, why or "damaged on another process"))
                continue
            for bad, reason in damaged:
                self.set_aside(bad, reason)
            return step, state, meta
        if damaged:
            raise CheckpointError("no sound checkpoint to resume from; every step is damaged (nothing was moved): "
                                  + "; ".join(f"step {s}: {r}" for s, r in damaged)
                                  + f". Move them out of {self.dir} to start afresh, or use another --workdir")
        return None

    def _read(self, step: int, **items) -> Any:
        """Orbax restore of some items of a step; a failure is environment (raised) or damage (_Damaged)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - Orbax raises bare Exception/KeyError/ValueError on damage
            _drop_abandoned_reads()
            if _is_environment(e):
                raise CheckpointError(f"cannot read checkpoint step {step} under {self.dir} ({_reason(e)}); fix "
                                      "permissions or the mount, then rerun: nothing was changed") from e
            raise _Damaged(f"{type(e).__name__}: {_reason(e)}") from e

    def _restore_data(self, step: int, data_iter) -> str | None:
        """Restores the iterator position: a missing or garbled file is damage (returned); a position the
        pipeline rejects is an incompatibility (CheckpointError)."""
        import grain

        pid, n = jax.process_index(), jax.process_count()
        path = storage.join(self.workdir, "checkpoints", str(step), "data", f"process_{pid}-of-{n}.json")
        try:
            json.loads(storage.read_text(path))
        except FileNotFoundError:
            return f"data-iterator file {storage.name(path)} is missing"
        except (ValueError, UnicodeDecodeError) as e:
            return f"data-iterator file {storage.name(path)} is not JSON ({e})"
        try:
            self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
        except Exception as e:  # noqa: BLE001 - grain raises KeyError/ValueError for a state of another pipeline
            raise CheckpointError(f"checkpoint step {step}: the saved data-iterator position does not fit this input "
                                  f"pipeline ({type(e).__name__}: {_reason(e)}); the data config must match the run's "
                                  "(see the config's resumable keys)") from e
        return None

    def set_aside(self, step: int, reason: str, what: str = "could not be restored") -> None:
        """Moves a step to WORKDIR/checkpoints_damaged/STEP-TIME/ with the reason in DAMAGED.txt (never deletes)."""
        if jax.process_index() == 0:  # one mover on a shared filesystem or bucket
            src = storage.join(self.workdir, "checkpoints", str(step))
            dst = storage.join(self.workdir, "checkpoints_damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            storage.move_tree(src, dst)
            storage.write_text(storage.join(dst, "DAMAGED.txt"), f"step {step} {what}: {reason}\n")
            log.error("checkpoint step %d is damaged or superseded (%s); moved to %s", step, reason, dst)
        _barrier(f"set_aside_{step}")
        self.manager.reload()
        self.damaged.append((step, reason))


def _drop_abandoned_reads() -> None:
    """After a failed restore, TensorStore's other reads of that step fail too, as asyncio futures nobody
    awaits, and its threads keep calling back into the restore's event loop after Orbax closed it: each logs
    "Future exception was never retrieved" or "Exception ignored ... Event loop is closed", thousands of lines
    for one damaged step. The one reason that matters is already in hand, so these are collected now and that
    abandoned Orbax read coroutines and that one known-harmless callback error are dropped from then on."""
    global _quiet
    if not _quiet:
        hook = sys.unraisablehook

        def drop_abandoned(u):
            code = getattr(u.object, "cr_code", None)
            if not (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)
                    or code is not None and "orbax" in code.co_filename):
                hook(u)

        sys.unraisablehook = drop_abandoned
        _quiet = True
    asyncio_log = logging.getLogger("asyncio")
    level = asyncio_log.level
    asyncio_log.setLevel(logging.CRITICAL)
    try:
        gc.collect()
    finally:
        asyncio_log.setLevel(level)


_quiet = False


class _Damaged(Exception):
    """A step's files are unreadable or wrong (internal: restore_latest sets such a step aside)."""


# OS conditions that say nothing about the checkpoint itself: reading again after fixing them works.
_ENVIRONMENT = ("Permission denied", "PERMISSION_DENIED", "Read-only file system", "No space left on device",
                "Operation not permitted", "Too many open files")


def _is_environment(e: BaseException) -> bool:
    if isinstance(e, PermissionError):
        return True
    text = "".join(f"{type(x).__name__}: {x}" for x in _chain(e))
    return any(m in text for m in _ENVIRONMENT)


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _reason(e: BaseException) -> str:
    """One readable line of an Orbax/TensorStore error: the innermost cause that names what failed (e.g.
    'OUT_OF_RANGE: Error reading "params..." ...'), without their 'See full TensorStore details' repr."""
    lines = []
    for x in _chain(e):
        for line in str(x).splitlines():
            line = line.split("See full TensorStore details")[0].strip().rstrip(".")
            if line and not line.startswith("<bound method"):
                lines.append(line)
                break
    return _shorten(next((ln for ln in reversed(lines) if ":" in ln), lines[0] if lines else type(e).__name__))


def _everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process: all processes must take the same step."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def find_checkpoint_dir(path: str, require_steps: bool = False) -> str:
    """A workdir or its checkpoints/ folder -> the checkpoints folder (for `train.init_from`, eval); with
    `require_steps`, a local folder without a saved step is an error too."""
    p = path.rstrip("/")
    storage.scheme(p)
    found = storage.join(p, "checkpoints") if storage.isdir(storage.join(p, "checkpoints")) else p
    if not storage.isdir(found):
        raise CheckpointError(f"no checkpoint directory at '{path}' (expected a workdir with checkpoints/ in it)")
    if require_steps and not any(name.isdigit() for name in storage.listdir(found)):
        raise CheckpointError(f"no saved step in '{found}' (train.init_from needs a run with checkpoints)")
    return found


def restore_params(path: str, abstract_params: Any, step: int | None = None) -> tuple[int, Any]:
    """Params only from another run's newest (or given) step: for `train.init_from` and evaluation."""
    ckdir = storage.orbax_path(find_checkpoint_dir(path))
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
    try:
        out = mgr.restore(step, args=ocp.args.Composite(state=restore_args, meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - Orbax's bare exceptions: say which step and why, in one line
        raise CheckpointError(f"cannot read the params of step {step} in '{ckdir}' ({type(e).__name__}: "
                              f"{_reason(e)})") from e
    finally:
        mgr.close()
    params, saved = out["state"]["params"], (out["meta"] or {}).get("checksums")
    missing = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]
               if isinstance(a, jax.ShapeDtypeStruct)]  # a partial restore leaves absent leaves abstract
    if missing:
        raise CheckpointError(f"step {step} in '{ckdir}' has no {_shorten(missing[0])}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: it is another model")
    prefix = "['params']"
    expected = None if saved is None else {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    why = integrity.verify(params, expected)
    if why:
        raise CheckpointError(f"the params of step {step} in '{ckdir}' are damaged: {why}; pick another step")
    return step, params
