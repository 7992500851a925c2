"""Top-k routing as pure functions: logits -> (experts, gates) plus balance losses, the bias rule and metrics.

Owns: the router's math. Returns everything (losses, metrics) as values; nothing is stored (docs/design.md,
conventions). docs/routing.md describes every option and what it measured.
Shape key: T tokens (of one routing group, or all), E experts, K chosen experts per token, L MoE layers.
Everything here runs in fp32 (router precision matters: ST-MoE §2.4).

    scores   softmax(logits) (GShard, Switch) | sigmoid(logits) (DeepSeek-V3)
    choose   top-k of scores + bias            (the bias only selects: Wang et al. 2024, arXiv 2408.15664)
    gates    the chosen *unbiased* scores, divided by their sum if renormalize, times routed_scaling_factor
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    experts_TK: jax.Array  # int32 chosen experts, column 0 = the top-1 choice (of the biased scores)
    gates_TK: jax.Array  # fp32 combine weights
    probs_TE: jax.Array  # fp32 scores normalised to sum 1 per token (softmax itself; sigmoid / its sum)
    logits_TE: jax.Array  # fp32 raw router logits
    changed_T: jax.Array  # bool: the bias changed this token's set of K experts (all False without a bias)


def scores(logits_TE: jax.Array, score: str) -> jax.Array:
    """The router's per-expert scores: softmax over experts, or an independent sigmoid per expert."""
    return jax.nn.softmax(logits_TE, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits_TE)


def _chosen_mask(experts_TK: jax.Array, num_experts: int) -> jax.Array:
    return jnp.sum(jax.nn.one_hot(experts_TK, num_experts, dtype=jnp.int32), axis=-2) > 0


def route(logits_TE: jax.Array, k: int, renormalize: bool, *, score: str = "softmax", scale: float = 1.0,
          bias_E: jax.Array | None = None) -> Routing:
    """Top-k routing.

    renormalize=True (GShard / GLaM / DeepSeek-V3): gates are the chosen scores divided by their sum.
    renormalize=False (Switch, Fedus et al. 2021 eq. 2): gates are the raw chosen scores.
    `bias_E` (aux-loss-free balancing) shifts which experts are chosen, never the gates, and gets no gradient.
    """
    logits_TE = logits_TE.astype(jnp.float32)
    s_TE = scores(logits_TE, score)
    if bias_E is None:
        _, experts_TK = jax.lax.top_k(s_TE, k)
        changed_T = jnp.zeros(s_TE.shape[:-1], bool)
    else:
        _, experts_TK = jax.lax.top_k(s_TE + jax.lax.stop_gradient(bias_E), k)
        _, plain_TK = jax.lax.top_k(s_TE, k)
        e = s_TE.shape[-1]
        changed_T = jnp.any(_chosen_mask(experts_TK, e) != _chosen_mask(plain_TK, e), axis=-1)
    gates_TK = jnp.take_along_axis(s_TE, experts_TK, axis=-1)
    if renormalize:
        gates_TK = gates_TK / jnp.sum(gates_TK, axis=-1, keepdims=True)
    probs_TE = s_TE if score == "softmax" else s_TE / jnp.sum(s_TE, axis=-1, keepdims=True)
    return Routing(experts_TK.astype(jnp.int32), gates_TK * scale, probs_TE, logits_TE, changed_T)


def jitter(x_TD: jax.Array, rng: jax.Array, eps: float) -> jax.Array:
    """Multiplicative uniform noise in [1-eps, 1+eps] on the router input (Switch Transformer §2.4)."""
    return x_TD * jax.random.uniform(rng, x_TD.shape, x_TD.dtype, 1.0 - eps, 1.0 + eps)


def expert_counts(experts_TK: jax.Array, num_experts: int) -> jax.Array:
    """Assignments per expert (all K choices of all T tokens, kept or dropped), as fp32 integers. [E]"""
    return jnp.zeros((num_experts,), jnp.float32).at[experts_TK.reshape(-1)].add(1.0)


def expert_fraction(experts_TK: jax.Array, num_experts: int) -> jax.Array:
    """f_i: fraction of the T*K assignments that chose expert i (sums to 1). [E]"""
    return expert_counts(experts_TK, num_experts) / experts_TK.size


def balance_loss(f_E: jax.Array, p_E: jax.Array) -> jax.Array:
    """`E * sum_i f_i * P_i` (Switch, Fedus et al. 2021 eq. 4): 1.0 under uniform routing, larger when not.

    f_i: fraction of assignments to expert i (a constant: no gradient); P_i: mean normalised score of i.
    Which tokens f and P are counted over makes the micro-batch, sequence and global-batch variants.
    """
    return f_E.shape[-1] * jnp.sum(jax.lax.stop_gradient(f_E) * p_E, axis=-1)


def load_balance_loss(r: Routing) -> jax.Array:
    """The micro-batch loss: f and P over all T tokens of `r` (for K=1 exactly Switch's top-1 fraction)."""
    return balance_loss(expert_fraction(r.experts_TK, r.probs_TE.shape[-1]), jnp.mean(r.probs_TE, axis=0))


def sequence_balance_loss(experts_BTK: jax.Array, probs_BTE: jax.Array) -> jax.Array:
    """DeepSeek-V3's sequence-wise loss (eq. 17-20): the balance loss of each sequence, averaged over B."""
    e = probs_BTE.shape[-1]
    f_BE = jax.vmap(lambda ex: expert_fraction(ex, e))(experts_BTK)
    return jnp.mean(balance_loss(f_BE, jnp.mean(probs_BTE, axis=1)))


def global_balance_loss(counts_LE: jax.Array, prior_counts_LE: jax.Array, mean_probs_LE: jax.Array) -> jax.Array:
    """Global-batch loss (Qiu et al. 2025, arXiv 2501.11873), one value per layer [L].

    f_i counts the assignments of every device and of every micro-batch of the optimizer step seen so far
    (`prior_counts` from earlier micro-batches of `optim.grad_accum`, plus this one: Megatron-Core's running
    buffer); P_i is this micro-batch's mean normalised score. With grad_accum = 1, f is the global batch's.
    """
    total_LE = prior_counts_LE + counts_LE
    return balance_loss(total_LE / jnp.sum(total_LE, axis=-1, keepdims=True), mean_probs_LE)


def update_bias(bias_LE: jax.Array, counts_LE: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing: `b_i += u * sign(mean_load - load_i)` per layer (DeepSeek-V3 §2.1.2).

    `counts_LE` are the assignments of the whole optimizer step (all devices, all micro-batches), so the
    update is the same however the batch is split. An underloaded expert's bias rises, an overloaded one's falls.
    """
    mean_L1 = jnp.mean(counts_LE, axis=-1, keepdims=True)
    return bias_LE + rate * jnp.sign(mean_L1 - counts_LE)


def load_imbalance(counts_E: jax.Array) -> jax.Array:
    """max / mean expert load: 1.0 when balanced, E when one expert takes everything."""
    return jnp.max(counts_E, axis=-1) / jnp.maximum(jnp.mean(counts_E, axis=-1), 1e-9)


def router_z_loss(r: Routing) -> jax.Array:
    """ST-MoE router z-loss `mean_t logsumexp(logits_t)^2` (Zoph et al. 2022, eq. 5)."""
    return jnp.mean(jax.nn.logsumexp(r.logits_TE, axis=-1) ** 2)


def router_entropy(r: Routing) -> jax.Array:
    """Mean per-token entropy of the normalised scores (nats); log E means uniform, 0 means one-hot."""
    return jnp.mean(-jnp.sum(r.probs_TE * jnp.log(r.probs_TE + 1e-20), axis=-1))
