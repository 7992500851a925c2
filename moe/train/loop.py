"""The training loop: `train(cfg, workdir)` runs (or resumes) a run to cfg.train.steps.

Owns: the order of things in a run, in banner sections (input -> mesh & state -> resume -> evals -> loop
-> summary). What happens inside each is owned elsewhere: the steps (steps.py), the resume policy
(checkpoint.py), the rollback policy (guards.py), the eval (moe/eval/lm.py), the metrics files
(metrics.py). train.py is the command line around it.

SIGTERM/SIGINT (spot preemption) finish the current step, save, and raise `Preempted`; the next start
resumes from that checkpoint (moe/train/signals.py: what a signal does at every other moment).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from moe import config
from moe.data import pipeline
from moe.data import tokenizer
from moe.data.tokenizer import load_tokenizer
from moe.eval import lm as eval_lm
from moe.model.decoder import flops_per_token, param_counts
from moe.runtime import storage
from moe.runtime.peak import peak_flops_per_second
from moe.runtime.sharding import make_mesh
from moe.train import faults
from moe.train import steps as train_steps
from moe.train.checkpoint import CheckpointError, Checkpointer, find_checkpoint_dir, restore_params
from moe.train.guards import Guard
from moe.train.metrics import MetricsWriter
from moe.train.signals import Preempted, deferred

log = logging.getLogger("moe.train")
HF_PREFIX = "hf:"  # train.init_from=hf:DIR: a Hugging Face checkpoint folder


def _prepare(cfg: config.Config, workdir: str):
    """Input validated (before compiling), the tokenizer saved into the workdir, the data iterator, the mesh and
    the sharded Setup: what a run needs before its state exists. Returns (tok, data_iter, mesh, setup)."""
    pid, nproc = jax.process_index(), jax.process_count()
    prepare_workdir(workdir)
    if cfg.train.init_from.startswith(HF_PREFIX):
        from moe.hf import load as hf_load

        hf_load.matching_config(cfg.model, cfg.train.init_from[len(HF_PREFIX):])  # fails now, not after compiling
    elif cfg.train.init_from:
        find_checkpoint_dir(cfg.train.init_from, require_steps=True)  # a wrong path fails now, not after compiling

    # ---------------------------------------------------------------- input (validated before compiling)
    pipeline.check_data(cfg)
    tok = load_tokenizer(cfg)
    if pid == 0:
        tokenizer.save_to_workdir(tok, workdir)
    config.check_placement(cfg, processes=nproc)
    data_iter = pipeline.train_iterator(cfg, tok, pid, nproc)

    # ---------------------------------------------------------------- mesh and sharded state
    mesh = make_mesh(cfg.mesh)
    return tok, data_iter, mesh, train_steps.build(cfg, mesh)


def _meta(cfg: config.Config, tok) -> dict:
    """What every checkpoint of the run records beside the state (resume checks it)."""
    return {"config": config.to_dict(cfg), "tokenizer_sha": tok.sha, "params_total": param_counts(cfg.model)[0]}


def initialize(cfg: config.Config, workdir: str) -> int:
    """Writes step 0 of a run (the state train() would start from: train.init_from's params, or fresh) and its
    config.yaml, without compiling a train step. `train()` then resumes from it. Returns the step written (0);
    a workdir that already has checkpoints is an error."""
    tok, data_iter, _, setup = _prepare(cfg, workdir)
    checkpointer = Checkpointer(workdir, cfg.checkpoint)
    try:
        if checkpointer.steps():
            raise config.ConfigError(f"'{workdir}' already has checkpoints {checkpointer.steps()}; pass a new --workdir")
        step, state = _resume(cfg, checkpointer, setup, data_iter, _meta(cfg, tok), tok.path)
        checkpointer.save(step, state, _meta(cfg, tok), data_iter)
        checkpointer.wait()
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        storage.write_text(storage.join(workdir, "config.yaml"), config.dump_yaml(cfg))
    return step


def train(cfg: config.Config, workdir: str) -> dict:
    """Runs (or resumes) training to cfg.train.steps; returns the summary written to WORKDIR/summary.json."""
    t_start = time.time()
    is_main = jax.process_index() == 0
    tok, data_iter, mesh, setup = _prepare(cfg, workdir)
    train_step = train_steps.make_train_step(setup)
    total_params, active_params = param_counts(cfg.model)
    flops_tok = flops_per_token(cfg.model, cfg.train.seq_len)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    peak = peak_flops_per_second(cfg.model.dtype)
    log.info("model: %s params total, %s active; mesh %s; %.3g FLOPs/token", f"{total_params:,}",
             f"{active_params:,}", dict(mesh.shape), flops_tok)

    with contextlib.ExitStack() as stack:  # closes the checkpointer (waiting for its last save) on every exit
        # ------------------------------------------------------------ checkpoint / resume (policy: checkpoint.py)
        checkpointer = Checkpointer(workdir, cfg.checkpoint)
        stack.callback(checkpointer.close)
        meta = _meta(cfg, tok)
        step, state = _resume(cfg, checkpointer, setup, data_iter, meta, tok.path)
        writer = MetricsWriter(workdir, enabled=is_main)
        stack.callback(writer.close)
        writer.truncate_after(step)
        if is_main:
            storage.write_text(storage.join(workdir, "config.yaml"), config.dump_yaml(cfg))

        # ------------------------------------------------------------ evals (the same function as eval.py)
        eval_run = eval_lm.training_run(workdir, cfg, tok, mesh)

        def evaluate() -> dict:
            m = eval_lm.evaluate_lm(eval_lm.with_params(eval_run, state["params"], step),
                                    max_batches=cfg.train.eval_batches)
            return {"eval_loss": m["loss"], "eval_bits_per_byte": m["bits_per_byte"], "eval_tokens": m["tokens"]}

        # ------------------------------------------------------------ loop
        batches = faults.install(data_iter, lambda: step + 1, cfg.model.vocab_size)
        guard = Guard(cfg.train, cfg.optim)
        last: dict = {}
        bar = stack.enter_context(tqdm(total=cfg.train.steps, initial=step, dynamic_ncols=True, desc="train",
                                       disable=not (is_main and cfg.train.progress)))
        stop_signal = stack.enter_context(deferred())  # a stop signal now finishes the step, saves, then stops
        t_log, step_log = time.time(), step
        while step < cfg.train.steps:
            state, pending = train_step(state, train_steps.device_batch(setup, next(batches)))
            step += 1
            bar.update(1)
            is_log = step % cfg.train.log_every == 0 or step == cfg.train.steps
            is_eval = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps
            if is_log or is_eval or stop_signal:  # metrics are fetched only here: no per-step host sync
                m = jax.device_get(pending)
                now = time.time()
                tps = (step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                what = guard.verdict(m)
                if what:
                    step, state = _roll_back(checkpointer, setup, data_iter, guard, step, what, float(m["loss"]))
                    writer.truncate_after(step)  # metrics of the discarded steps go; `rollbacks` says why
                    bar.n = step
                    continue
                record = {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in m.items()}
                record.update(tokens_per_sec=tps, mfu=tps * flops_tok / peak, rollbacks=guard.rollbacks,
                              skipped_batches=guard.skipped_batches)
                if is_eval:
                    record.update(evaluate())
                    peak = peak_flops_per_second(cfg.model.dtype, remeasure=True)  # the highest seen so far
                writer.write(step, record)
                last = record
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{record['mfu']:.1%}")
            if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop_signal:
                writer.sync()  # a bucket holds every record up to a checkpoint before the checkpoint exists
                checkpointer.save(step, state, meta, data_iter)
            if stop_signal and step < cfg.train.steps:  # at the last step the run is simply done
                checkpointer.wait()
                raise Preempted(f"{stop_signal[0]} at step {step}; checkpoint written")
        checkpointer.wait()
        params_sha = _params_sha(state["params"])

    # ---------------------------------------------------------------- summary
    summary = {
        "step": step, "loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
        "bits_per_byte": last.get("eval_bits_per_byte"), "params_total": total_params,
        "params_active": active_params, "tokens": step * tokens_per_step,
        "flops": flops_tok * step * tokens_per_step, "wall_time_s": time.time() - t_start,
        "rollbacks": guard.rollbacks, "skipped_batches": guard.skipped_batches, "params_sha": params_sha, "done": True,
    }
    if is_main:
        storage.write_text(storage.join(workdir, "summary.json"), json.dumps(summary, indent=1))
    return summary


def _resume(cfg: config.Config, checkpointer: Checkpointer, setup, data_iter, meta: dict,
            tok_path: str) -> tuple[int, dict]:
    """(step, state) by the resume policy (checkpoint.py): the newest sound checkpoint, else init_from, else
    fresh. A config or tokenizer change that cannot resume is an error, raised before any state is read."""

    def check_resumable(saved: dict) -> None:
        diffs = config.resume_diff(saved.get("config", {}), meta["config"])
        if diffs:
            raise config.ConfigError("the config differs from the checkpoint's in keys that cannot change on "
                                     "resume: " + "; ".join(diffs) + " (use a new --workdir, or restore these values)")
        if saved.get("tokenizer_sha") not in (None, meta["tokenizer_sha"]):
            raise config.ConfigError(f"the tokenizer ({tok_path}) differs from the one the checkpoint was trained with")

    restored = checkpointer.restore_latest(setup.abstract_state, data_iter, check_meta=check_resumable)
    for bad, reason in checkpointer.damaged:
        log.warning("skipped damaged checkpoint step %d: %s", bad, reason)
    if restored is not None:
        step, state, _ = restored
        if step > cfg.train.steps:
            raise config.ConfigError(f"train.steps ({cfg.train.steps}) is below the checkpoint's step {step} in "
                                     f"{checkpointer.dir}: raise train.steps to go on, or use a new --workdir")
        log.info("resumed from step %d in %s", step, checkpointer.dir)
        return step, state
    state = train_steps.init_state(setup)
    if cfg.train.init_from:
        src_step, params = _restore_init_params(cfg.train.init_from, setup, state["params"])
        state = dict(state, params=params, opt_state=train_steps.fresh_opt_state(setup, params))
        log.info("initialised params from %s (step %d)", cfg.train.init_from, src_step)
    return 0, state


def _restore_init_params(path: str, setup: train_steps.Setup, fresh_params) -> tuple[int, Any]:
    """`train.init_from`: the source's params, with its router biases if it has them. A source trained
    without aux-loss-free balancing has none: this run's biases then start at 0, and the log says so.
    `hf:DIR` is a Hugging Face folder (moe/hf/load.py); its step counts as 0."""
    abstract = setup.abstract_state["params"]
    if path.startswith(HF_PREFIX):
        from moe.hf import load as hf_load

        return 0, hf_load.load_params(setup.cfg.model, path[len(HF_PREFIX):], abstract,
                                      setup.state_shardings["params"])
    trainable, biases = train_steps.split_bias(abstract)
    if not biases:
        return restore_params(path, abstract)
    try:
        return restore_params(path, abstract)
    except CheckpointError:
        step, params = restore_params(path, trainable)  # re-raises if the parameters themselves are unreadable
        log.info("train.init_from %s has no router biases (it trained without model.router_bias_update_rate): "
                 "they start at 0", path)
        return step, train_steps.join_bias(params, train_steps.split_bias(fresh_params)[1])


def prepare_workdir(workdir: str) -> None:
    """Creates the workdir (a folder, or a prefix in a bucket) and probes it with a write from process 0, or
    says in one line why it cannot be used (unknown scheme, a file, unwritable, no permission on the bucket)."""
    storage.scheme(workdir)  # an unknown scheme is an error on every process
    if jax.process_index() == 0:
        storage.check_writable(workdir)


def _roll_back(checkpointer: Checkpointer, setup, data_iter, guard: Guard, step: int, what: str,
               loss: float) -> tuple[int, dict]:
    """Back to the newest good checkpoint the guard allows, the data iterator left where it is (the batches
    since that checkpoint are skipped). Raises Diverged when the ladder has no step left."""
    checkpointer.wait()
    it_state = data_iter.get_state()
    back = checkpointer.restore_latest(setup.abstract_state, data_iter, max_step=guard.ceiling())
    if back is None:
        raise guard.give_up(step, what, loss)
    guard.rolled_back(step, back[0])
    log.warning("step %d: %s (loss %.4g); rolled back to step %d and skipped %d batches", step, what, loss,
                back[0], step - back[0])
    for newer in [s for s in checkpointer.steps() if s > back[0]]:  # the ladder went past them: keep, not reuse
        checkpointer.set_aside(newer, f"the run rolled back past it to step {back[0]} after {what} at step {step}",
                               "was superseded")
    data_iter.set_state(it_state)
    return back[0], back[1]


def _params_sha(params) -> str | None:
    """SHA-256 of the final params (leaf paths, dtypes, shapes and bytes): equal hashes = bit-identical runs.
    None when this process does not hold every shard (multi-process runs)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not all(leaf.is_fully_addressable for _, leaf in leaves):
        return None
    h = hashlib.sha256()
    for path, leaf in leaves:
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
