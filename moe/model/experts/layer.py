"""The mixture-of-experts FFN: route -> dispatch -> experts -> combine (GShard / GLaM / Switch).

Owns: the expert weights, the router projection, the router bias (aux-loss-free balancing: model state, not
a parameter), and how the pure functions of moe/model/experts/router.py and moe/model/experts/dispatch.py
compose. Returns (output, aux) where aux holds the losses and metrics of this layer.

Shape key: B batch, T length, D model, F expert hidden, E experts, K top-k, C capacity per expert and group.

Routing groups: with the capacity path each sequence is one routing group (capacity is per sequence), so
results never depend on how the batch is split over devices. The dropless paths drop nothing (up to the
expert-parallel receive buffer), so every token's output is its own whatever the split. Which of the four
dispatch paths runs, and how, is moe/model/experts/paths.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.model.experts import paths, router
from moe.config import ModelConfig
from moe.model.layers import FFN, param


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
        experts_BTK = routed.experts_TK  # routed: fields [B, T, ...]
        flat = router.Routing(*(a.reshape(b * t, *a.shape[2:]) for a in routed))  # every token of the batch

        weights = paths.Experts(self.w_gate_EDF[...], self.w_up_EDF[...], self.w_down_EFD[...])
        y_BTD, path_metrics = paths.choose(cfg)(x_BTD, routed, weights, cfg, train, self.dtype)

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
            **path_metrics,  # drop_fraction (+ overflow_fraction for the dropless paths)
            "router_entropy": router.router_entropy(flat),
        }
        if cfg.seq_aux_loss_weight > 0:
            aux["seq_aux_loss"] = router.sequence_balance_loss(experts_BTK, routed.probs_TE)
        if bias_E is not None:
            aux["bias_changed_fraction"] = jnp.mean(flat.changed_T.astype(jnp.float32))
        return y_BTD.astype(x_BTD.dtype), aux
