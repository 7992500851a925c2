"""Evaluating checkpoints: loading a run, language-model loss / perplexity / bits per byte, scoring
(context, continuation) pairs, and rolling log-likelihoods of whole documents.

Owns: the numbers eval.py, the JSONL task runner (moe/eval/tasks.py) and the lm-eval adapter
(moe/lm_eval_adapter.py) are computed from. Must not train or write into the run's checkpoints, and knows
nothing of task formats or prompts (moe/eval/tasks.py).

No-drop evaluation (a deliberate choice). With capacity dispatch a token can lose its expert slot to other
tokens of its sequence, so its score would depend on padding and on what else is in the row. Evaluation runs
the same params with `dispatch: dropless` (every token reaches its top-k experts, GShard/GLaM without the
capacity limit), which makes every score independent of batch size, padding and mesh (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from moe.train import checkpoint as ckpt
from moe import config
from moe.data import pipeline as data_lib
from moe.train import steps as train_steps
from moe.model.generate import Generator
from moe.runtime import storage
from moe.runtime.sharding import batch_ways, make_mesh
from moe.data import tokenizer
from moe.data.corpus import DataError
from moe.data.tokenizer import Tokenizer

log = logging.getLogger("moe.eval")

LENGTH_MULTIPLE = 16  # scored rows are padded to a multiple of this (fewer compilations, little waste)


class EvalError(ValueError):
    """Bad evaluation input (workdir, task file, arguments); the message says what to fix."""


# --- loading a run -------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A restored run: the config (with eval settings), its tokenizer, the eval Setup and params."""

    workdir: str
    cfg: config.Config
    tok: Tokenizer
    setup: train_steps.Setup
    params: Any
    step: int
    cache: dict = dataclasses.field(default_factory=dict)  # jitted functions, shared by restored copies

    @property
    def model(self):
        return nnx.merge(self.setup.graphdef, self.params)

    @property
    def batch_ways(self) -> int:
        return batch_ways(self.setup.mesh)

    def generator(self) -> Generator:
        return Generator(self.setup.graphdef, self.params, self.cfg.model, self.tok.bos_id, self.tok.eos_id)


def eval_config(cfg: config.Config, batch_size: int | None, ways: int) -> config.Config:
    """The run's config for evaluation: no-drop dispatch (module docstring), no grad accumulation, and a
    batch size rounded up to a multiple of the mesh's batch ways."""
    bs = batch_size or cfg.train.batch_size
    bs = -(-bs // ways) * ways
    # Buffers of the worst case (a factor >= the expert axis; E always is) unless the run asks for less.
    factor = cfg.model.eval_dropless_buffer_factor or float(cfg.model.num_experts)
    model = {"dispatch": "dropless", "dropless_buffer_factor": factor} if config.is_moe(cfg.model) else {}
    return config.replace(cfg, model=model, train={"batch_size": bs}, optim={"grad_accum": 1})


def eval_mesh(cfg: config.Config):
    """The run's mesh if it fits the devices present now, else plain data parallelism over all of them."""
    try:
        return make_mesh(cfg.mesh)
    except config.ConfigError:
        return make_mesh(config.MeshConfig())


def load_run_config(workdir: str, overrides: Sequence[str] = ()) -> config.Config:
    """WORKDIR/config.yaml (+ `key.sub=value` overrides) -> Config; clear errors for a missing run."""
    if not storage.isdir(workdir):
        raise EvalError(f"workdir '{workdir}' does not exist; pass the --workdir of a training run")
    path = storage.join(workdir, "config.yaml")
    if not storage.isfile(path):
        raise EvalError(f"'{path}' not found: '{workdir}' is not a training workdir (train.py writes config.yaml)")
    tree = yaml.safe_load(storage.read_text(path)) or {}
    return config.from_dict(config.apply_overrides(tree, list(overrides)))


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps saved under WORKDIR/checkpoints (committed ones; interrupted saves are not listed)."""
    ckdir = storage.join(workdir, "checkpoints")
    steps = sorted(int(n) for n in storage.listdir(ckdir) if n.isdigit() and storage.isdir(storage.join(ckdir, n)))
    if not steps:
        raise EvalError(f"no checkpoints in '{ckdir}'; train first (python train.py --workdir {workdir})")
    return steps


def load_run(workdir: str, step: int | None = None, *, batch_size: int | None = None,
             overrides: Sequence[str] = ()) -> Run:
    """Config + tokenizer from the workdir, params of `step` (default newest) onto the devices present now."""
    workdir = workdir if storage.is_url(workdir) else os.path.abspath(workdir)
    cfg = load_run_config(workdir, overrides)
    try:
        tok = tokenizer.from_workdir(workdir, cfg)
    except DataError as e:
        raise EvalError(str(e)) from None
    steps = checkpoint_steps(workdir)
    if step is not None and step not in steps:
        raise EvalError(f"step {step} not in '{workdir}/checkpoints'; available: {steps}")
    mesh = eval_mesh(cfg)
    cfg = eval_config(cfg, batch_size, batch_ways(mesh))
    setup = train_steps.build(cfg, mesh)
    run = Run(workdir, cfg, tok, setup, None, -1)
    return restore(run, step if step is not None else steps[-1])


def training_run(workdir: str, cfg: config.Config, tok: Tokenizer, mesh) -> Run:
    """The Run the in-training eval uses: the training mesh, the eval config (the module docstring's rule),
    no params yet (`with_params` gives each eval the current ones)."""
    ecfg = eval_config(cfg, None, batch_ways(mesh))
    return Run(workdir, ecfg, tok, train_steps.build(ecfg, mesh), None, -1)


def restore(run: Run, step: int) -> Run:
    """The same run with the params of another step (reuses the compiled functions' layout)."""
    got, params = ckpt.restore_params(run.workdir, run.setup.abstract_state["params"], step)
    return dataclasses.replace(run, params=params, step=got)


def with_params(run: Run, params: Any, step: int = 0) -> Run:
    return dataclasses.replace(run, params=params, step=step)


# --- language modelling --------------------------------------------------------------------------


def evaluate_lm(run: Run, split: str | None = None, max_batches: int | None = None) -> dict[str, float]:
    """Mean next-token loss, perplexity and bits per byte over a split of the run's data (every target token
    once, padding never: the pipeline's exact eval batches, moe/data/pipeline.py)."""
    if "eval_step" not in run.cache:
        run.cache["eval_step"] = train_steps.make_eval_step(run.setup)
    step_fn = run.cache["eval_step"]
    sums = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    overflow = 0.0
    for batch in data_lib.eval_batches(run.cfg, run.tok, split, max_batches, jax.process_index(),
                                       jax.process_count()):
        out = jax.device_get(step_fn(run.params, train_steps.device_batch(run.setup, batch)))
        for k in sums:
            sums[k] += float(out[k])
        overflow = max(overflow, float(out.get("overflow_fraction", 0.0)))
    if not sums["tokens"]:
        raise EvalError(f"split '{split or run.cfg.data.eval_split}' has no tokens to evaluate")
    loss = sums["loss_sum"] / sums["tokens"]
    # bits per byte (Gao et al. 2020, The Pile): total nats / ln 2 / UTF-8 bytes of the targets.
    result = {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": sums["loss_sum"] / math.log(2) / sums["bytes"],
              "tokens": sums["tokens"], "bytes": sums["bytes"], "loss_sum": sums["loss_sum"]}
    if overflow > 0:  # the expert-parallel receive buffer cut assignments off: not a no-drop evaluation
        log.warning("eval: up to %.4f of the expert assignments of a batch overflowed the receive buffer "
                    "(model.eval_dropless_buffer_factor %g); 0 gives an exact no-drop eval", overflow,
                    run.cfg.model.dropless_buffer_factor)
        result["max_overflow_fraction"] = overflow
    return result


# --- scoring (context, continuation) pairs -------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _score_fn(graphdef):
    """jit(params, batch) -> per-row (sum of weighted target log-probs, all targets greedy)."""

    def row_scores(params, batch):
        logits_BTV, _ = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"],
                                                              batch["segment_ids"], train=False)
        logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        target_BT = jnp.take_along_axis(logp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
        w_BT = batch["weights"]
        greedy_BT = (jnp.argmax(logits_BTV, axis=-1) == batch["targets"]) | (w_BT == 0)
        return jnp.sum(target_BT * w_BT, axis=1), jnp.all(greedy_BT, axis=1)

    return jax.jit(row_scores)


def score(run: Run, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
          max_length: int | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair.

    Token ids are used as given (put BOS in the context yourself); an empty continuation scores (0.0, True).
    Rows longer than max_length (default:
    the training seq_len) lose context tokens from the left. Each row is one document: right padding has
    segment id 0, so it is neither attended to nor counted.
    """
    max_length = max_length or run.cfg.train.seq_len
    fn = _score_fn(run.setup.graphdef)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = []
        for i in idx:
            ctx, cont = list(pairs[i][0]), list(pairs[i][1])
            if not ctx:
                raise EvalError(f"pair {i}: the context needs at least one token (put BOS in it)")
            if len(cont) > max_length:
                raise EvalError(f"pair {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}")
            full = (ctx + cont)[-(max_length + 1):]
            rows.append((full, len(cont)))
        longest = max(1, *(len(f) - 1 for f, _ in rows))  # an empty continuation scores 0 (log 1), greedy
        length = min(-(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, max_length)
        n_rows = -(-len(rows) // run.batch_ways) * run.batch_ways
        batch = {k: np.zeros((n_rows, length), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        batch["weights"] = np.zeros((n_rows, length), np.float32)
        for r, (full, n_cont) in enumerate(rows):
            t = len(full) - 1
            batch["inputs"][r, :t] = full[:-1]
            batch["targets"][r, :t] = full[1:]
            batch["segment_ids"][r, :t] = 1
            batch["positions"][r, :t] = np.arange(t)
            batch["weights"][r, t - n_cont : t] = 1.0
        ll, greedy = jax.device_get(fn(run.params, train_steps.device_batch(run.setup, batch)))
        for r, i in enumerate(idx):
            out[i] = (float(ll[r]), bool(greedy[r]))
    return out


def rolling_windows(ids: Sequence[int], bos_id: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """A document's tokens as disjoint prediction windows: [bos] + ids cut into pieces of seq_len + 1 tokens
    overlapping by one, exactly the pieces moe/data/pipeline.py packs, so the summed log-likelihood equals the one
    eval.py's perplexity counts for the same document (without its EOS target). lm-eval's HF model gives
    the last window more context; ours keeps the two numbers identical."""
    doc = [bos_id, *ids]
    return [(doc[s : s + 1], doc[s + 1 : s + seq_len + 1]) for s in range(0, len(doc) - 1, seq_len)]


def loglikelihood_rolling(run: Run, docs: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
    """Total log-likelihood of each token sequence (conditioned on BOS), over rolling_windows."""
    windows, owner = [], []
    for d, ids in enumerate(docs):
        for w in rolling_windows(ids, run.tok.bos_id, run.cfg.train.seq_len):
            windows.append(w)
            owner.append(d)
    totals = [0.0] * len(docs)
    for d, (ll, _) in zip(owner, score(run, windows, batch_size)):
        totals[d] += ll
    return totals
