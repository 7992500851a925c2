"""Top-k routing as pure functions: logits -> (experts, gates) plus auxiliary losses and metrics.

Owns: the router's math. Returns everything (losses, metrics) as values; nothing is stored (docs/design.md, conventions).
Shape key: T tokens (of one routing group, or all), E experts, K chosen experts per token.
Everything here runs in fp32 (router precision matters: ST-MoE §2.4).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    experts_TK: jax.Array  # int32 chosen experts, column 0 = the top-1 choice
    gates_TK: jax.Array  # fp32 combine weights
    probs_TE: jax.Array  # fp32 softmax over all experts
    logits_TE: jax.Array  # fp32 raw router logits


def route(logits_TE: jax.Array, k: int, renormalize: bool) -> Routing:
    """Top-k softmax routing.

    renormalize=True (GShard / GLaM): gates are the top-k probabilities divided by their sum, so they sum to 1.
    renormalize=False (Switch, Fedus et al. 2021 eq. 2): gates are the raw softmax probabilities.
    """
    logits_TE = logits_TE.astype(jnp.float32)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    gates_TK, experts_TK = jax.lax.top_k(probs_TE, k)
    if renormalize:
        gates_TK = gates_TK / jnp.sum(gates_TK, axis=-1, keepdims=True)
    return Routing(experts_TK.astype(jnp.int32), gates_TK, probs_TE, logits_TE)


def jitter(x_TD: jax.Array, rng: jax.Array, eps: float) -> jax.Array:
    """Multiplicative uniform noise in [1-eps, 1+eps] on the router input (Switch Transformer §2.4)."""
    return x_TD * jax.random.uniform(rng, x_TD.shape, x_TD.dtype, 1.0 - eps, 1.0 + eps)


def expert_fraction(experts_TK: jax.Array, num_experts: int) -> jax.Array:
    """f_i: fraction of the T*K assignments that chose expert i (sums to 1). [E]"""
    counts_E = jnp.zeros((num_experts,), jnp.float32).at[experts_TK.reshape(-1)].add(1.0)
    return counts_E / experts_TK.size


def load_balance_loss(r: Routing) -> jax.Array:
    """Switch load-balance loss `E * sum_i f_i * P_i` (Fedus et al. 2021, eq. 4).

    f_i counts all K choices (for K=1 this is exactly Switch's top-1 fraction); P_i is the mean router
    probability of expert i. Equals 1.0 under perfectly uniform routing, larger when unbalanced.
    """
    e = r.probs_TE.shape[-1]
    f_E = jax.lax.stop_gradient(expert_fraction(r.experts_TK, e))
    p_E = jnp.mean(r.probs_TE, axis=0)
    return e * jnp.sum(f_E * p_E)


def router_z_loss(r: Routing) -> jax.Array:
    """ST-MoE router z-loss `mean_t logsumexp(logits_t)^2` (Zoph et al. 2022, eq. 5)."""
    return jnp.mean(jax.nn.logsumexp(r.logits_TE, axis=-1) ** 2)


def router_entropy(r: Routing) -> jax.Array:
    """Mean per-token entropy of the router distribution (nats); log E means uniform, 0 means one-hot."""
    return jnp.mean(-jnp.sum(r.probs_TE * jnp.log(r.probs_TE + 1e-20), axis=-1))
