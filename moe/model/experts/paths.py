"""The four ways tokens reach their experts and come back, behind one signature (chosen by `choose`).

Owns: which dispatch path runs (from `model.dispatch` and whether a mesh is set) and the metrics each path
reports. Every path maps (x_BTD, routing [B, T, ...], the expert weights) to (y_BTD fp32-accumulated in the
compute dtype's matmuls, metrics), runs its matmuls through `mm` (bf16 backward) or gmm's equivalent, and is
pinned to the per-token loop reference of tests/reference.py (tests/test_moe.py, tests/test_dispatch.py).

    capacity_local  per sequence: slots of capacity C, gather -> batched expert dots -> combine (dispatch.py)
    capacity_ep     the same under a mesh, all-to-all over 'expert' (expert_parallel.capacity_moe)
    dropless_local  all B*T tokens sorted by expert -> grouped FFN (gmm.py) -> unsort, nothing dropped
    dropless_ep     under a mesh: sort by destination device, exchange, grouped FFN on the local experts,
                    exchange back (expert_parallel.dropless_moe); a bounded receive buffer
                    (`model.dropless_buffer_factor`) may overflow, counted in `overflow_fraction`

metrics: drop_fraction (assignments that did not reach their expert), and for the dropless paths
overflow_fraction (the same count: the receive buffer's overflow; 0 on one device).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moe.config import ConfigError, ModelConfig
from moe.model.experts import dispatch, expert_parallel, gmm
from moe.model.experts.router import Routing
from moe.model.layers import gated_act
from moe.model.matmul import mm
from moe.runtime.sharding import target_platform


class Experts(NamedTuple):
    w_gate_EDF: jax.Array
    w_up_EDF: jax.Array
    w_down_EFD: jax.Array


Path = Callable[[jax.Array, Routing, Experts, ModelConfig, bool, object], tuple[jax.Array, dict]]


def expert_ffn(x_GECD: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD, act: str, dtype) -> jax.Array:
    """Every expert's gated FFN on its slots: batched dots over [.., E, C, D].

    The dots run expert-major ([E, G, C, .]): XLA:CPU has no bf16 x bf16 -> f32 kernel for a batched dot
    whose batch dim is not leading ("Unsupported element type for DotThunk::Execute"); on TPU/GPU the
    transposes are layout changes XLA folds away.
    """
    x_EGCD = x_GECD.transpose(1, 0, 2, 3)
    h = gated_act(mm("EGCD,EDF->EGCF", x_EGCD, w_gate_EDF, dtype), mm("EGCD,EDF->EGCF", x_EGCD, w_up_EDF, dtype), act)
    return mm("EGCF,EFD->EGCD", h, w_down_EFD, dtype).transpose(1, 0, 2, 3)


def _slots(r: Routing, cfg: ModelConfig, train: bool, t: int):
    factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
    cap = dispatch.capacity(t, cfg.num_experts, cfg.top_k, factor, cfg.min_capacity)
    slot_BTK, kept_BTK = jax.vmap(lambda ex, g: dispatch.assign_slots(ex, cfg.num_experts, cap, cfg.drop_policy, g))(
        r.experts_TK, r.gates_TK)
    return cap, slot_BTK, kept_BTK


def capacity_local(x_BTD, r: Routing, w: Experts, cfg: ModelConfig, train: bool, dtype) -> tuple[jax.Array, dict]:
    cap, slot_BTK, kept_BTK = _slots(r, cfg, train, x_BTD.shape[1])
    x_BECD = jax.vmap(lambda x, s: dispatch.dispatch(x, s, cfg.num_experts, cap))(x_BTD, slot_BTK)
    y_BECD = expert_ffn(x_BECD, *w, cfg.ffn_act, dtype)
    y_BTD = jax.vmap(dispatch.combine)(y_BECD, slot_BTK, r.gates_TK, kept_BTK)
    return y_BTD, {"drop_fraction": 1.0 - jnp.mean(kept_BTK.astype(jnp.float32))}


def capacity_ep(x_BTD, r: Routing, w: Experts, cfg: ModelConfig, train: bool, dtype) -> tuple[jax.Array, dict]:
    cap, slot_BTK, kept_BTK = _slots(r, cfg, train, x_BTD.shape[1])
    ffn = lambda x, wg, wu, wd: expert_ffn(x, wg, wu, wd, cfg.ffn_act, dtype)  # noqa: E731
    y_BTD = expert_parallel.capacity_moe(x_BTD, slot_BTK, r.gates_TK, kept_BTK, *w, num_experts=cfg.num_experts,
                                         cap=cap, ffn=ffn)
    return y_BTD, {"drop_fraction": 1.0 - jnp.mean(kept_BTK.astype(jnp.float32))}


def _grouped(cfg: ModelConfig, dtype) -> Callable:
    if cfg.grouped_matmul == "megablox" and target_platform() != "tpu":
        raise ConfigError(f"model.grouped_matmul=megablox needs a TPU mesh; this one is {target_platform()} "
                          "(use auto)")
    tiles = (cfg.megablox_tile_m, cfg.megablox_tile_k, cfg.megablox_tile_n)
    return lambda x, sizes, wg, wu, wd, **kw: gmm.grouped_ffn(x, sizes, wg, wu, wd, act=cfg.ffn_act, dtype=dtype,
                                                                kernel=cfg.grouped_matmul, tiles=tiles, **kw)


def dropless_local(x_BTD, r: Routing, w: Experts, cfg: ModelConfig, train: bool, dtype) -> tuple[jax.Array, dict]:
    b, t, d = x_BTD.shape
    k = cfg.top_k
    experts_TK, gates_TK = r.experts_TK.reshape(b * t, k), r.gates_TK.reshape(b * t, k)
    order_S, where_S, sizes_E = dispatch.sort_by_expert(experts_TK, cfg.num_experts)
    x_SD = dispatch.gather_sorted(x_BTD.reshape(b * t, d), order_S, where_S, k)
    y_SD = _grouped(cfg, dtype)(x_SD, sizes_E, *w, max_group=b * t)
    y_BTD = dispatch.unsort_combine(y_SD, order_S, where_S, gates_TK).reshape(b, t, d)
    zero = jnp.zeros((), jnp.float32)
    return y_BTD, {"drop_fraction": zero, "overflow_fraction": zero}


def dropless_ep(x_BTD, r: Routing, w: Experts, cfg: ModelConfig, train: bool, dtype) -> tuple[jax.Array, dict]:
    exchange = "dense" if target_platform() == "cpu" else "ragged"  # XLA:CPU has no ragged-all-to-all
    y_BTD, overflow = expert_parallel.dropless_moe(
        x_BTD, r.experts_TK, r.gates_TK, *w, num_experts=cfg.num_experts, buffer_factor=cfg.dropless_buffer_factor,
        exchange=exchange, grouped_ffn=_grouped(cfg, dtype), check_vma=cfg.grouped_matmul != "megablox")
    return y_BTD, {"drop_fraction": overflow, "overflow_fraction": overflow}


def choose(cfg: ModelConfig) -> Path:
    """The path for `model.dispatch` here: the expert-parallel one whenever a mesh of more than one device
    is set (it also runs the no-'expert'-axis meshes: n = 1, no exchange), else the local one."""
    sharded = expert_parallel.uses_mesh()
    if cfg.dispatch == "capacity":
        return capacity_ep if sharded else capacity_local
    return dropless_ep if sharded else dropless_local
