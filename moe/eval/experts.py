"""Per-expert diagnostics of a checkpoint: each expert's gradient norm and load, and the fraction of
assignments dropped, under the run's own training dispatch (capacity or dropless) on validation batches.

Owns: the numbers docs/results.md's investigation quotes for "is every expert trained?" (an expert that gets
no tokens gets no gradient; a capacity limit that drops assignments shows as a drop fraction and a load far
from uniform). Must not write into the run's checkpoints. Over-training curves of the same quantities are
the run's own metrics.jsonl (`drop_fraction`, `expert_load`, `router_entropy`, `aux_loss`).

    python -m moe.eval.experts --workdir runs/x --batches 8 --out runs/x/experts.json
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe import config
from moe.data import pipeline as data_lib
from moe.data import tokenizer
from moe.eval.lm import EvalError, checkpoint_steps, eval_mesh, load_run_config
from moe.model.decoder import loss_fn
from moe.runtime import storage
from moe.train import checkpoint as ckpt
from moe.train import steps as train_steps

EXPERT_WEIGHTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")  # moe.model.experts.layer.MoEFFN: E is the 3rd-last axis


def expert_norms(grads) -> np.ndarray:
    """[L_moe, E]: the norm of each expert's gradient over its three weight matrices (scanned layers stacked)."""
    sq = []

    def visit(path, leaf):
        if path and getattr(path[-1], "key", None) in EXPERT_WEIGHTS:
            sq.append(jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=(-2, -1)))

    jax.tree_util.tree_map_with_path(visit, grads)
    if not sq:
        raise EvalError("the run has no MoE layer (model.num_experts = 0): nothing to diagnose per expert")
    total = sum(sq)
    return np.sqrt(np.asarray(total)).reshape(-1, total.shape[-1])


def diagnose(workdir: str, *, batches: int = 8, step: int | None = None) -> dict:
    """Mean over `batches` validation batches of the per-expert gradient norm and load, and the drop fraction,
    with the run's training config (dispatch, capacity factor, router losses) and its newest checkpoint."""
    cfg = load_run_config(workdir)
    if not config.is_moe(cfg.model):
        raise EvalError(f"'{workdir}' is a dense run (model.num_experts = 0): nothing to diagnose per expert")
    tok = tokenizer.from_workdir(workdir, cfg)
    step = step if step is not None else checkpoint_steps(workdir)[-1]
    cfg = config.replace(cfg, optim={"grad_accum": 1})
    setup = train_steps.build(cfg, eval_mesh(cfg))
    _, params = ckpt.restore_params(workdir, setup.abstract_state["params"], step)
    trainable, biases = train_steps.split_bias(params)
    graphdef = setup.graphdef

    @jax.jit
    def one(p, batch, key):
        def loss(q):
            return loss_fn(nnx.merge(graphdef, train_steps.join_bias(q, biases)), batch, train=True, rng=key)

        (_, m), g = jax.value_and_grad(loss, has_aux=True)(p)
        return g, m

    norms, loads, drops, n = 0.0, 0.0, 0.0, 0
    with jax.set_mesh(setup.mesh):
        for i, batch in enumerate(data_lib.eval_batches(cfg, tok, None, batches, jax.process_index(),
                                                        jax.process_count())):
            g, m = one(trainable, train_steps.device_batch(setup, batch), jax.random.PRNGKey(i))
            norms = norms + expert_norms(g)
            loads = loads + np.asarray(m["expert_load"]).reshape(norms.shape)
            drops += float(m["drop_fraction"])
            n += 1
    if not n:
        raise EvalError(f"'{workdir}': the validation split has no batches")
    norms, loads = norms / n, loads / n
    return {
        "workdir": workdir, "step": step, "batches": n, "dispatch": cfg.model.dispatch,
        "capacity_factor": cfg.model.capacity_factor, "drop_fraction": drops / n,
        "grad_norm": norms.tolist(), "load": loads.tolist(),  # [L_moe][E]
        # per layer, then the worst layer: how unequal the experts' gradients and loads are
        "grad_norm_max_over_mean": float(np.max(norms.max(-1) / norms.mean(-1))),
        "grad_norm_min_over_mean": float(np.min(norms.min(-1) / norms.mean(-1))),
        "load_max_over_mean": float(np.max(loads.max(-1) / loads.mean(-1))),
        "experts_without_gradient": int(np.sum(norms == 0)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe.eval.experts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="an MoE training run's workdir")
    ap.add_argument("--batches", type=int, default=8, help="validation batches to average over")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    try:
        res = diagnose(a.workdir, batches=a.batches, step=a.step)
    except (EvalError, config.ConfigError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(res, indent=1)
    if a.out:
        storage.write_text(a.out, text + "\n")
    print(f"step {res['step']}, {res['dispatch']} dispatch: drop fraction {res['drop_fraction']:.4f}, expert gradient "
          f"norm max/mean {res['grad_norm_max_over_mean']:.2f} min/mean {res['grad_norm_min_over_mean']:.2f}, "
          f"load max/mean {res['load_max_over_mean']:.2f}, experts without gradient {res['experts_without_gradient']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
