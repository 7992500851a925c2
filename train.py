"""Train a GLaM-style MoE language model.

    python train.py --config configs/tiny.yaml [--workdir runs/tiny] [key.sub=value ...]
    python train.py --config configs/glam_1.7b_64e.yaml --aot v5e:8x8     # compile for a TPU pod, no TPU needed

Sections, top to bottom: processes -> config -> input -> mesh & state -> checkpoint/resume -> evals -> loop.
A run started on a workdir that has checkpoints resumes from the newest good one (moe/checkpoint.py states
the policy). SIGTERM/SIGINT (spot preemption) finish the current step, save, and exit with status 75.
Bad config or data, or a checkpoint that cannot be written, exits with status 2 and a one-line message naming the
key or file; repeated divergence after rollbacks exits with status 1. docs/reliability.md has the whole table
and the MOE_FAULT_* test hooks.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections import deque

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again — the next start resumes from the checkpoint just written
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1  # rolled back MAX_ROLLBACKS_PER_STEP times to the same step: lower optim.lr or fix the data
MAX_ROLLBACKS_PER_STEP = 3
# Fault-injection hooks for tests (docs/reliability.md); comma-separated 1-based step numbers. Each fires once
# per process: NAN_STEPS give that step's batch NaN loss weights (a non-finite loss and gradients),
# SPIKE_STEPS replace that step's targets by shifted tokens (a loss spike), SIGTERM_STEP sends this process
# SIGTERM after that step (a preemption notice at a known step).
FAULT_ENV = ("MOE_FAULT_NAN_STEPS", "MOE_FAULT_SPIKE_STEPS", "MOE_FAULT_SIGTERM_STEP")
# Keys that may differ from the checkpoint's config on resume; any other difference is an error.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.progress",
                  "train.host_malloc", "train.spike_factor", "train.spike_window", "train.init_from", "checkpoint.",
                  "mesh.", "data.num_workers", "data.data_dir", "optim.max_consecutive_skips", "name")

log = logging.getLogger("moe.train")


class Preempted(Exception):
    pass


class Diverged(RuntimeError):
    """Training kept producing non-finite updates or loss spikes after rolling back."""


def fault_steps(name: str) -> set[int]:
    """The steps a fault-injection variable (FAULT_ENV) names; empty when unset."""
    raw = os.environ.get(name, "").strip()
    try:
        return {int(x) for x in raw.split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected comma-separated step numbers") from None


def inject_faults(batch: dict, step: int, faults: dict[str, set[int]], vocab_size: int) -> dict:
    """Applies the MOE_FAULT_* hooks to the host batch of (1-based) `step`; a fired step is removed."""
    import numpy as np

    if step in faults["MOE_FAULT_NAN_STEPS"]:
        faults["MOE_FAULT_NAN_STEPS"].discard(step)
        log.warning("fault injection: NaN loss weights in the batch of step %d", step)
        batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
    if step in faults["MOE_FAULT_SPIKE_STEPS"]:
        faults["MOE_FAULT_SPIKE_STEPS"].discard(step)
        log.warning("fault injection: shifted targets (a loss spike) in the batch of step %d", step)
        batch = dict(batch, targets=(batch["targets"] + vocab_size // 2 + 3) % vocab_size)
    return batch


def parse_args(argv=None) -> argparse.Namespace:
    from moe.config import help_text

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="config keys (override with key.sub=value):\n" + help_text())
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML preset (default: configs/tiny.yaml)")
    p.add_argument("--workdir", default="", help="run directory (default: runs/<preset name>); may be gs://")
    p.add_argument("--aot", default="", help="ahead-of-time compile for a TPU topology (e.g. v5e:8x8) and exit")
    p.add_argument("--aot_json", default="", help="with --aot: also write the report as JSON here")
    p.add_argument("--coordinator", default="", help="multi-process: coordinator host:port (else auto-detected)")
    p.add_argument("--num_processes", type=int, default=0, help="multi-process: number of processes")
    p.add_argument("--process_id", type=int, default=-1, help="multi-process: this process's index")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return p.parse_args(argv)


def init_processes(coordinator: str, num_processes: int, process_id: int) -> None:
    """jax.distributed.initialize when several processes take part: explicit flags, or auto-detected on a
    Cloud TPU pod (TPU_WORKER_HOSTNAMES / MEGASCALE) and under SLURM (SLURM_NTASKS > 1)."""
    import jax

    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") \
            or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        key = prefix + k
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, key + ".")
        elif a != b and not any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE_KEYS):
            out.append(f"{key}: {a!r} (checkpoint) -> {b!r} (now)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from moe.checkpoint import CheckpointError
    from moe.config import ConfigError, load_config
    from moe.corpus import DataError
    from moe.hostmem import set_host_malloc

    try:
        cfg = load_config(args.config, args.overrides)
        set_host_malloc(cfg.train.host_malloc)  # before JAX starts its threads
        if args.aot:
            from moe.aot import aot_main

            return aot_main(cfg, args.aot, args.aot_json)
        init_processes(args.coordinator, args.num_processes, args.process_id)
        train(cfg, args.workdir or os.path.join("runs", cfg.name))
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Preempted as e:
        print(f"stopped by {e}; checkpoint written — run the same command to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) training to cfg.train.steps; returns the summary written to WORKDIR/summary.json."""
    import jax
    import numpy as np
    from tqdm import tqdm

    from moe import checkpoint as ckpt
    from moe import config as C
    from moe import data as data_lib
    from moe import train_lib as TL
    from moe.metrics import MetricsWriter
    from moe.model import flops_per_token, param_counts
    from moe.sharding import make_mesh
    from moe.tokenizer import load_tokenizer

    t_start = time.time()
    pid, nproc = jax.process_index(), jax.process_count()
    is_main = pid == 0
    os.makedirs(workdir, exist_ok=True)

    # ---------------------------------------------------------------- input (validated before compiling)
    data_lib.check_data(cfg)
    tok = load_tokenizer(cfg)
    if is_main and os.path.abspath(tok.path) != os.path.abspath(os.path.join(workdir, "tokenizer.model")):
        with open(os.path.join(workdir, "tokenizer.model"), "wb") as f, open(tok.path, "rb") as src:
            f.write(src.read())
    if cfg.train.batch_size % nproc:
        raise C.ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the "
                            f"{nproc} processes")
    train_iter = data_lib.train_iterator(cfg, tok, pid, nproc)

    # ---------------------------------------------------------------- mesh and sharded state
    mesh = make_mesh(cfg.mesh)
    setup = TL.build(cfg, mesh)
    train_step = TL.make_train_step(setup)
    eval_step = TL.make_eval_step(setup)
    total_params, active_params = param_counts(cfg.model)
    flops_tok = flops_per_token(cfg.model, cfg.train.seq_len)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    peak = TL.peak_flops_per_second(cfg.model.dtype)
    log.info("model: %s params total, %s active; mesh %s; %.3g FLOPs/token", f"{total_params:,}",
             f"{active_params:,}", dict(mesh.shape), flops_tok)

    # ---------------------------------------------------------------- checkpoint / resume (policy: moe/checkpoint.py)
    checkpointer = ckpt.Checkpointer(workdir, cfg.checkpoint)

    def check_resumable(meta: dict) -> None:  # before the state is read: a changed model is an error, not damage
        diffs = config_diff(meta.get("config", {}), C.to_dict(cfg))
        if diffs:
            raise C.ConfigError("the config differs from the checkpoint's in keys that cannot change on resume: "
                                + "; ".join(diffs) + " (use a new --workdir, or restore these values)")
        if meta.get("tokenizer_sha") not in (None, _sha(tok.path)):
            raise C.ConfigError(f"the tokenizer ({tok.path}) differs from the one the checkpoint was trained with")

    restored = checkpointer.restore_latest(setup.abstract_state, train_iter, check_meta=check_resumable)
    if restored is not None:
        start_step, state, meta = restored
        log.info("resumed from step %d in %s", start_step, checkpointer.dir)
    else:
        state = TL.init_state(setup)
        start_step = 0
        if cfg.train.init_from:
            src_step, params = ckpt.restore_params(cfg.train.init_from, setup.abstract_state["params"])
            state = dict(state, params=params, opt_state=TL.fresh_opt_state(setup, params))
            log.info("initialised params from %s (step %d)", cfg.train.init_from, src_step)
    for step_, reason in checkpointer.damaged:
        log.warning("skipped damaged checkpoint step %d: %s", step_, reason)
    writer = MetricsWriter(workdir, enabled=is_main)
    writer.truncate_after(start_step)
    if is_main:
        with open(os.path.join(workdir, "config.yaml"), "w") as f:
            f.write(C.dump_yaml(cfg))

    def meta() -> dict:
        return {"config": C.to_dict(cfg), "tokenizer_sha": _sha(tok.path), "params_total": total_params}

    def save(step: int, force: bool = False) -> None:
        checkpointer.save(step, state, meta(), train_iter, force=force)

    # ---------------------------------------------------------------- evals
    def evaluate() -> dict:
        sums = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
        for batch in data_lib.eval_batches(cfg, tok, max_batches=cfg.train.eval_batches):
            out = jax.device_get(eval_step(state["params"], TL.device_batch(setup, batch)))
            for k in sums:
                sums[k] += float(out.get(k, 0.0))
        loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
        bpb = sums["loss_sum"] / math.log(2) / sums["bytes"] if sums["bytes"] else float("nan")
        return {"eval_loss": loss, "eval_bits_per_byte": bpb, "eval_tokens": sums["tokens"]}

    # ---------------------------------------------------------------- loop
    stop_signal: list[str] = []

    def on_signal(signum, _frame):
        stop_signal.append(signal.Signals(signum).name)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    faults = {name: fault_steps(name) for name in FAULT_ENV}
    recent_losses: deque = deque(maxlen=cfg.train.spike_window)
    rollbacks = skipped_batches = 0
    rollbacks_to: dict[int, int] = {}  # checkpoint step -> rollbacks to it (bounded by MAX_ROLLBACKS_PER_STEP)
    last = {}
    bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not (is_main and cfg.train.progress),
               dynamic_ncols=True, desc="train")
    step = start_step
    t_log, step_log = time.time(), start_step
    pending = None  # metrics of the newest step, fetched only on log steps (no per-step host sync)
    try:
        while step < cfg.train.steps:
            host_batch = next(train_iter)
            if faults["MOE_FAULT_NAN_STEPS"] or faults["MOE_FAULT_SPIKE_STEPS"]:
                host_batch = inject_faults(host_batch, step + 1, faults, cfg.model.vocab_size)
            state, pending = train_step(state, TL.device_batch(setup, host_batch))
            step += 1
            bar.update(1)
            if step in faults["MOE_FAULT_SIGTERM_STEP"]:
                faults["MOE_FAULT_SIGTERM_STEP"].discard(step)
                os.kill(os.getpid(), signal.SIGTERM)
            is_log = step % cfg.train.log_every == 0 or step == cfg.train.steps
            is_eval = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps
            if is_log or is_eval or stop_signal:
                m = jax.device_get(pending)
                now = time.time()
                tps = (step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                loss = float(m["loss"])
                # A non-finite loss alone is not bad: apply_if_finite skipped that update (counted in
                # skipped_total). Bad is non-finite params, or so many skips in a row that the next
                # non-finite update would be applied.
                bad = (not math.isfinite(float(m["param_norm"]))
                       or int(m["skipped_consecutive"]) >= cfg.optim.max_consecutive_skips)
                spike = (not bad and math.isfinite(loss) and cfg.train.spike_factor > 0 and len(recent_losses) >= 3
                         and loss > cfg.train.spike_factor * statistics.median(recent_losses))
                if bad or spike:
                    # GLaM's recipe: go back to the last good checkpoint and skip past the offending batches.
                    what = "non-finite updates" if bad else "loss spike"
                    checkpointer.wait()
                    it_state = train_iter.get_state()
                    back = checkpointer.restore_latest(setup.abstract_state, train_iter)
                    if back is None:
                        raise Diverged(f"step {step}: {what} (loss {loss:.4g}) and no checkpoint to roll back to; "
                                       "lower optim.lr or save earlier (checkpoint.every)")
                    rollbacks_to[back[0]] = rollbacks_to.get(back[0], 0) + 1
                    if rollbacks_to[back[0]] > MAX_ROLLBACKS_PER_STEP:
                        raise Diverged(f"step {step}: {what} (loss {loss:.4g}) after {MAX_ROLLBACKS_PER_STEP} "
                                       f"rollbacks to step {back[0]}; lower optim.lr or check the data")
                    rollbacks += 1
                    skipped_batches += step - back[0]
                    log.warning("step %d: %s (loss %.4g); rolled back to step %d and skipped %d batches", step,
                                what, loss, back[0], step - back[0])
                    step, state = back[0], back[1]
                    train_iter.set_state(it_state)
                    writer.truncate_after(step)  # metrics of the discarded steps go; `rollbacks` says why
                    bar.n = step
                    recent_losses.clear()
                    continue
                if math.isfinite(loss):
                    recent_losses.append(loss)
                record = {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in m.items()}
                record.update(tokens_per_sec=tps, mfu=tps * flops_tok / peak, rollbacks=rollbacks,
                              skipped_batches=skipped_batches)
                if is_eval:
                    record.update(evaluate())
                    peak = TL.peak_flops_per_second(cfg.model.dtype, remeasure=True)  # the highest seen so far
                writer.write(step, record)
                last = record
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{record['mfu']:.1%}")
            if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop_signal:
                save(step, force=True)
            if stop_signal and step < cfg.train.steps:  # at the last step the run is simply done
                checkpointer.wait()
                raise Preempted(f"{stop_signal[0]} at step {step}")
        checkpointer.wait()
        params_sha = _params_sha(state["params"])
    finally:
        bar.close()
        writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        checkpointer.close()

    summary = {
        "step": step, "loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
        "bits_per_byte": last.get("eval_bits_per_byte"), "params_total": total_params,
        "params_active": active_params, "tokens": step * tokens_per_step,
        "flops": flops_tok * step * tokens_per_step, "wall_time_s": time.time() - t_start,
        "rollbacks": rollbacks, "skipped_batches": skipped_batches, "params_sha": params_sha, "done": True,
    }
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _params_sha(params) -> str | None:
    """SHA-256 of the final params (leaf paths, dtypes, shapes and bytes): equal hashes = bit-identical runs.
    None when this process does not hold every shard (multi-process runs)."""
    import hashlib

    import jax
    import numpy as np

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not all(leaf.is_fully_addressable for _, leaf in leaves):
        return None
    h = hashlib.sha256()
    for path, leaf in leaves:
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _sha(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


if __name__ == "__main__":
    sys.exit(main())
