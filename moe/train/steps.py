"""The sharded training state and the pure, jitted train and eval steps.

Owns: what the state is (params, optimizer state, step, rng — a plain pytree of arrays, so Orbax saves it
as is), how it is initialised already sharded (`eval_shape` -> shardings -> `jit(init, out_shardings)`), and
`train_step(state, batch) -> (state, metrics)`, which donates its state. The loop lives in moe/train/loop.py.

`state["params"]` is every variable of the model: the trainable parameters and, with aux-loss-free
balancing, the router biases (`RouterBias`, selection-only). `split_bias` separates them: the optimizer
sees only the parameters, and the biases are updated after the optimizer step from the step's expert counts.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe.runtime import sharding
from moe.config import Config, check_placement, head_dim
from moe.model import attention
from moe.model.decoder import Decoder, attention_kernel, compute_dtype, loss_fn
from moe.model.experts import router
from moe.train.optim import Optimizer, make_optimizer, make_schedule, skip_stats

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run: config, mesh, model structure, optimizer and the state's layout."""

    cfg: Config
    mesh: Mesh
    graphdef: Any  # nnx GraphDef of the Decoder (the params live in the state)
    tx: Optimizer
    schedule: optax.Schedule
    abstract_state: Any  # ShapeDtypeStructs with shardings
    state_shardings: Any

    @property
    def param_shardings(self):
        return self.state_shardings["params"]


def _param_specs(cfg: Config) -> tuple[Any, Any]:
    abstract_model = nnx.eval_shape(lambda: Decoder(cfg.model, nnx.Rngs(0)))
    graphdef, abstract = nnx.split(abstract_model)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
    return graphdef, specs


def _match_shardings(mesh: Mesh, tree: Any, params_abstract: Any, params_shardings: Any) -> Any:
    """Shardings for optimizer-state leaves, matched to the param whose path ends the leaf's path: the same
    shape (Adam/Lion moments) takes the param's sharding; the shape with one of the last two dims dropped
    (Adafactor's factored row/column statistics) takes it with that dim dropped; anything else (counts,
    scalars) is replicated."""
    by_path = {}
    for (path, a), (_, s) in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0],
                                 jax.tree_util.tree_flatten_with_path(params_shardings)[0]):
        by_path[tuple(str(k) for k in path)] = (a.shape, s)

    def pick(path, leaf):
        keys = tuple(str(k) for k in path)
        for n in range(len(keys)):
            hit = by_path.get(keys[n:])
            if hit is None:
                continue
            shape, sh = hit
            spec = tuple(sh.spec) + (None,) * (len(shape) - len(sh.spec))
            if leaf.shape == shape:
                return sh
            for drop in (-1, -2):  # factored second moments
                if len(shape) >= 2 and leaf.shape == tuple(np.delete(np.array(shape), drop)):
                    return NamedSharding(mesh, P(*np.delete(np.array(spec, dtype=object), drop)))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, tree)


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logging.getLogger("moe.train").info(message)


def build(cfg: Config, mesh: Mesh) -> Setup:
    """Abstract state + shardings, with the divisibility checks done before anything compiles."""
    check_placement(cfg, mesh_shape=dict(mesh.shape), batch_axes=sharding.RULES["act_batch"])
    m = cfg.model
    platform = mesh.devices.flat[0].platform
    kernel = attention.resolve(attention_kernel(m), platform, seq_len=cfg.train.seq_len, head_dim=head_dim(m),
                               dtype=compute_dtype(m))  # an explicit kernel the platform has not fails here
    _log_once(f"attention kernel: {kernel} on {platform} (model.attention={m.attention})")
    graphdef, specs = _param_specs(cfg)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, sharding.logical_to_spec(tuple(s))), specs,
                            is_leaf=lambda x: isinstance(x, P))
    abstract = jax.eval_shape(lambda: _init(cfg, graphdef, tx, 0))
    replicated = NamedSharding(mesh, P())
    shardings = {
        "params": param_sh,
        "opt_state": _match_shardings(mesh, abstract["opt_state"], abstract["params"], param_sh),
        "step": replicated,
        "rng": replicated,
    }
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return Setup(cfg, mesh, graphdef, tx, schedule, abstract, shardings)


BIAS_KEY = "router_bias_E"  # the attribute name of moe.model.experts.layer.RouterBias in MoEFFN


def split_bias(params: dict) -> tuple[dict, dict]:
    """(trainable, biases): the params dict without its router biases, and a dict of only those (maybe {})."""
    trainable, biases = {}, {}
    for k, v in params.items():
        if k == BIAS_KEY:
            biases[k] = v
        elif isinstance(v, dict):
            trainable[k], b = split_bias(v)
            if b:
                biases[k] = b
        else:
            trainable[k] = v
    return trainable, biases


def join_bias(trainable: dict, biases: dict) -> dict:
    """The inverse of `split_bias`."""
    out = dict(trainable)
    for k, v in biases.items():
        out[k] = join_bias(out[k], v) if k in out else v
    return out


def _init(cfg: Config, graphdef, tx, seed) -> dict:
    key = jax.random.PRNGKey(seed)
    params_key, rng = jax.random.split(key)
    model = Decoder(cfg.model, nnx.Rngs(params=params_key))
    params = nnx.to_pure_dict(nnx.state(model))
    return {"params": params, "opt_state": tx.init(split_bias(params)[0]), "step": jnp.zeros((), jnp.int32),
            "rng": rng}


def init_state(setup: Setup, seed: int | None = None) -> dict:
    """Fresh state, created directly in its shards (no host-side full copy)."""
    seed = setup.cfg.train.seed if seed is None else seed
    init = jax.jit(lambda: _init(setup.cfg, setup.graphdef, setup.tx, seed), out_shardings=setup.state_shardings)
    with jax.set_mesh(setup.mesh):
        return init()


def fresh_opt_state(setup: Setup, params) -> Any:
    """Optimizer state for given params (after `train.init_from`)."""
    fn = jax.jit(lambda p: setup.tx.init(split_bias(p)[0]), out_shardings=setup.state_shardings["opt_state"])
    with jax.set_mesh(setup.mesh):
        return fn(params)


SUMMED = ("tokens", "expert_counts")  # metrics summed over micro-batches; the others are averaged


def _grads(setup: Setup, params, biases, batch, rng) -> tuple[Any, dict]:
    """Gradients (w.r.t. the trainable `params` only) of the mean loss over `grad_accum` micro-batches
    (scanned, so memory is one micro-batch). `expert_counts` are summed, so they count the whole step."""
    graphdef = setup.graphdef

    def micro(p, mb, key, prior=None):
        return jax.value_and_grad(lambda q: loss_fn(nnx.merge(graphdef, join_bias(q, biases)), mb, train=True,
                                                    rng=key, prior_counts=prior), has_aux=True)(p)

    accum = setup.cfg.optim.grad_accum
    if accum == 1:
        (_, metrics), grads = micro(params, batch, rng)
        return grads, metrics
    mbs = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    keys = jax.random.split(rng, accum)

    def body(carry, xs):
        mb, key = xs
        (_, m), g = micro(params, mb, key, carry[1].get("expert_counts"))  # counts of the earlier micro-batches
        return jax.tree.map(jnp.add, carry, (g, m)), None

    zero = jax.eval_shape(lambda: micro(params, jax.tree.map(lambda x: x[0], mbs), keys[0]))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero[1], zero[0][1]))
    (g, m), _ = jax.lax.scan(body, zero, (mbs, keys))
    scale = lambda x: x / accum  # noqa: E731
    m = {k: (v if k in SUMMED else scale(v)) for k, v in m.items()}
    return jax.tree.map(scale, g), m


def _update_biases(cfg: Config, biases: dict, counts_LE, applied) -> dict:
    """Aux-loss-free balancing after the optimizer step; a skipped (non-finite) step leaves the biases alone."""
    return jax.tree.map(lambda b: jnp.where(applied, router.update_bias(b, counts_LE, cfg.model.router_bias_update_rate),
                                            b), biases)


def train_step_fn(setup: Setup) -> Callable:
    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        trainable, biases = split_bias(state["params"])
        grads, metrics = _grads(setup, trainable, biases, batch, rng)
        trainable, opt_state = setup.tx.step(grads, state["opt_state"], trainable)
        skips = skip_stats(opt_state)
        counts = metrics.pop("expert_counts", None)
        if counts is not None:
            metrics["load_imbalance"] = router.load_imbalance(counts)  # [L_moe], over the whole step
        if biases:
            biases = _update_biases(setup.cfg, biases, counts, skips["skipped_consecutive"] == 0)
            metrics["router_bias_norm"] = optax.tree.norm(biases)
        params = join_bias(trainable, biases)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=setup.schedule(state["step"]),
                       param_norm=optax.tree.norm(trainable), skipped_total=skips["skipped_total"],
                       skipped_consecutive=skips["skipped_consecutive"])
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return train_step


def batch_shardings(setup: Setup) -> dict:
    return {k: sharding.batch_sharding(setup.mesh, 2) for k in BATCH_KEYS}


def make_train_step(setup: Setup) -> Callable:
    """jit(train_step) with the state's shardings in and out, the state donated."""
    return _in_mesh(setup.mesh, jax.jit(train_step_fn(setup), in_shardings=(setup.state_shardings, batch_shardings(setup)),
                                        out_shardings=(setup.state_shardings, None), donate_argnums=(0,)))


def _in_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """Calls (and so traces) `fn` with `mesh` set, so the model's logical `constrain` hints resolve."""

    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    call.jitted = fn  # for .lower() in AOT compilation and HLO inspection
    return call


def eval_step_fn(setup: Setup) -> Callable:
    """(params, batch) -> token-weighted sums {loss_sum, tokens, bytes}, so means are exact over batches; with
    the expert-parallel dropless path also `overflow_fraction` (0 unless its receive buffer overflowed)."""

    def eval_step(params, batch):
        _, m = loss_fn(nnx.merge(setup.graphdef, params), batch, train=False)
        out = {"loss_sum": m["loss"] * m["tokens"], "tokens": m["tokens"]}
        if "target_bytes" in batch:
            out["bytes"] = jnp.sum(batch["target_bytes"])
        if "overflow_fraction" in m:
            out["overflow_fraction"] = m["overflow_fraction"]
        return out

    return eval_step


def make_eval_step(setup: Setup) -> Callable:
    """jit(params, batch) of `eval_step_fn`."""
    return _in_mesh(setup.mesh, jax.jit(eval_step_fn(setup), in_shardings=(setup.param_shardings, None)))


def device_batch(setup: Setup, batch: dict) -> dict:
    """Host-local numpy batch -> global arrays sharded over the batch axes (each process gives its share)."""
    out = {}
    for k, v in batch.items():
        if k in BATCH_KEYS or k == "target_bytes":
            out[k] = jax.make_array_from_process_local_data(sharding.batch_sharding(setup.mesh, np.ndim(v)), np.asarray(v))
    return out
