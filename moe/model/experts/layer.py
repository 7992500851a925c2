"""The mixture-of-experts FFN: route -> dispatch -> experts -> combine (GShard / GLaM / Switch).

Owns: the expert weights, the router projection, the router bias (aux-loss-free balancing: model state, not
a parameter), and how the pure functions of moe/model/experts/router.py and moe/model/experts/dispatch.py
compose. Returns (output, aux) where aux holds the losses and metrics of this layer.

Shape key: B batch, T length, D model, F expert hidden, E experts, K top-k, C capacity per expert and group.

Routing groups: with the capacity path each sequence is one routing group (capacity is per sequence), so
results never depend on how the batch is split over devices. Under expert parallelism the [B, E, C, D]
buffer is re-sharded from batch-split to expert-split: XLA lowers that to an all-to-all.
The dropless path routes all B*T tokens as one group with `jax.lax.ragged_dot` (the grouped matmul kernel
on TPU/GPU; on CPU it falls back to a dense masked matmul over all E groups, docs/performance.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.model.experts import dispatch
from moe.model.experts import expert_parallel
from moe.model.experts import router
from moe.config import ModelConfig
from moe.model.layers import FFN, gated_act, param
from moe.model.matmul import mm


def expert_ffn(x_GECD: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD, act: str, dtype) -> jax.Array:
    """Every expert's gated FFN on its slots: batched dots over [.., E, C, D].

    The dots run expert-major ([E, G, C, .]): XLA:CPU has no bf16 x bf16 -> f32 kernel for a batched dot
    whose batch dim is not leading ("Unsupported element type for DotThunk::Execute"); on TPU/GPU the
    transposes are layout changes XLA folds away.
    """
    x_EGCD = x_GECD.transpose(1, 0, 2, 3)
    h = gated_act(mm("EGCD,EDF->EGCF", x_EGCD, w_gate_EDF, dtype), mm("EGCD,EDF->EGCF", x_EGCD, w_up_EDF, dtype), act)
    return mm("EGCF,EFD->EGCD", h, w_down_EFD, dtype).transpose(1, 0, 2, 3)


class RouterBias(nnx.Variable):
    """Per-expert bias added to the router scores for selection only (Wang et al. 2024; DeepSeek-V3).

    Not an `nnx.Param`: it gets no gradient and no weight decay. It lives in the state's params dict (so every
    forward pass, eval and checkpoint carries it); moe/train/steps.py keeps it out of the optimizer and
    updates it after each optimizer step from the step's expert counts (`router.update_bias`).
    """


class MoEFFN(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
        # The router is kept fp32 and small-initialised so that early routing is near uniform.
        self.w_router_DE = param(rngs, (d, e), (None, None), std=cfg.init_std)  # tiny: replicated
        self.w_gate_EDF = param(rngs, (e, d, f), ("exp", "embed", "mlp"), fan_in=d)
        self.w_up_EDF = param(rngs, (e, d, f), ("exp", "embed", "mlp"), fan_in=d)
        self.w_down_EFD = param(rngs, (e, f, d), ("exp", "mlp", "embed"), fan_in=f)
        self.router_bias_E = (RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,), eager_sharding=False)
                              if cfg.router_bias_update_rate > 0 else None)
        self.shared = (FFN(d, f * cfg.num_shared_experts, cfg.ffn_act, dtype, rngs)
                       if cfg.num_shared_experts else None)
        self.cfg = cfg
        self.dtype = dtype

    def __call__(self, x_BTD: jax.Array, *, train: bool, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        cfg = self.cfg
        b, t, d = x_BTD.shape
        e, k = cfg.num_experts, cfg.top_k
        x_router = x_BTD.astype(jnp.float32)
        if train and cfg.router_jitter > 0 and rng is not None:
            x_router = router.jitter(x_router, rng, cfg.router_jitter)
        logits_BTE = jnp.einsum("BTD,DE->BTE", x_router, self.w_router_DE[...])
        bias_E = None if self.router_bias_E is None else self.router_bias_E[...]
        routed = jax.vmap(lambda lg: router.route(lg, k, cfg.renormalize_gates, score=cfg.router_score,
                                                  scale=cfg.routed_scaling_factor, bias_E=bias_E))(logits_BTE)
        experts_BTK, gates_BTK = routed.experts_TK, routed.gates_TK  # fields [B, T, ...]
        flat = router.Routing(*(a.reshape(b * t, *a.shape[2:]) for a in routed))  # every token of the batch

        if cfg.dispatch == "capacity":
            factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
            cap = dispatch.capacity(t, e, k, factor, cfg.min_capacity)
            slot_BTK, kept_BTK = jax.vmap(lambda ex, g: dispatch.assign_slots(ex, e, cap, cfg.drop_policy, g))(
                experts_BTK, gates_BTK)
            weights = (self.w_gate_EDF[...], self.w_up_EDF[...], self.w_down_EFD[...])
            ffn = lambda x, wg, wu, wd: expert_ffn(x, wg, wu, wd, cfg.ffn_act, self.dtype)  # noqa: E731
            if expert_parallel.uses_mesh():  # sharded: explicit all-to-all to the experts' devices and back
                y_BTD = expert_parallel.capacity_moe(x_BTD, slot_BTK, gates_BTK, kept_BTK, *weights, num_experts=e, cap=cap,
                                        ffn=ffn)
            else:
                x_BECD = jax.vmap(lambda x, s: dispatch.dispatch(x, s, e, cap))(x_BTD, slot_BTK)
                y_BECD = ffn(x_BECD, *weights)
                y_BTD = jax.vmap(dispatch.combine)(y_BECD, slot_BTK, gates_BTK, kept_BTK)
            drop_fraction = 1.0 - jnp.mean(kept_BTK.astype(jnp.float32))
        else:
            order, token_S, sizes_E = dispatch.sort_by_expert(flat.experts_TK, e)
            x_SD = x_BTD.reshape(b * t, d)[token_S]
            g = jax.lax.ragged_dot(x_SD.astype(self.dtype), self.w_gate_EDF[...].astype(self.dtype), sizes_E,
                                   preferred_element_type=jnp.float32)
            u = jax.lax.ragged_dot(x_SD.astype(self.dtype), self.w_up_EDF[...].astype(self.dtype), sizes_E,
                                   preferred_element_type=jnp.float32)
            h = gated_act(g, u, cfg.ffn_act).astype(self.dtype)
            y_SD = jax.lax.ragged_dot(h, self.w_down_EFD[...].astype(self.dtype), sizes_E,
                                      preferred_element_type=jnp.float32)
            y_BTD = dispatch.unsort_combine(y_SD, order, flat.gates_TK).reshape(b, t, d)
            drop_fraction = jnp.zeros((), jnp.float32)

        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        counts_E = router.expert_counts(flat.experts_TK, e)
        mean_probs_E = jnp.mean(flat.probs_TE, axis=0)
        aux = {
            "aux_loss": router.balance_loss(counts_E / (b * t * k), mean_probs_E),  # the micro-batch loss
            "mean_probs": mean_probs_E,  # P_i, for the global-batch loss (moe/model/decoder.py loss_fn)
            "expert_counts": counts_E,
            "router_z_loss": router.router_z_loss(flat),
            "expert_load": counts_E / (b * t * k),
            "drop_fraction": drop_fraction,
            "router_entropy": router.router_entropy(flat),
        }
        if cfg.seq_aux_loss_weight > 0:
            aux["seq_aux_loss"] = router.sequence_balance_loss(experts_BTK, routed.probs_TE)
        if bias_E is not None:
            aux["bias_changed_fraction"] = jnp.mean(flat.changed_T.astype(jnp.float32))
        return y_BTD.astype(x_BTD.dtype), aux
