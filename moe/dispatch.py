"""Moving tokens to experts and back: capacity-based (index gather/scatter) and dropless (sorted + ragged_dot).

Owns: slot assignment, dispatch and combine. Pure functions of one routing group; the MoE layer vmaps them
over groups. Never materialises a one-hot [T, E, C] tensor: both directions are integer-indexed gathers,
so the cost is O(T*K*D) whatever E is (the one-hot GShard einsum costs O(T*E*C*D)).

Shape key: T tokens in the group, D model, E experts, K choices per token, C capacity per expert, S = T*K.

Capacity arithmetic, worked example (T=6, E=3, K=2, capacity_factor=1.0):
    C = ceil(1.0 * K * T / E) = ceil(12 / 3) = 4 slots per expert.
    Slots are handed out choice-major: all top-1 choices in token order first, then all top-2 choices
    (GShard: a token's first choice never loses its slot to another token's second choice).
    If every token picks expert 0 first, tokens 0..3 take its 4 slots and tokens 4, 5 lose their top-1
    choice (dropped: combine weight 0, only the residual passes through that layer for that choice);
    drop fraction = dropped assignments / (T*K) = 2/12.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def capacity(tokens: int, num_experts: int, k: int, factor: float, minimum: int) -> int:
    """C = ceil(factor * k * T / E), at least `minimum`, at most T (an expert can't use more slots)."""
    return int(min(tokens, max(minimum, math.ceil(factor * k * tokens / num_experts))))


def assign_slots(experts_TK: jax.Array, num_experts: int, cap: int) -> tuple[jax.Array, jax.Array]:
    """Slot of each (token, choice) in its expert's buffer, priority top-1 first then token order.

    Returns slot_TK (flat index e*C + position into the [E*C] buffer; E*C for dropped) and kept_TK (bool).
    """
    t, k = experts_TK.shape
    experts_S = experts_TK.T.reshape(-1)  # choice-major order: (k=0, t=0..T-1), (k=1, ...)
    onehot_SE = jax.nn.one_hot(experts_S, num_experts, dtype=jnp.int32)
    position_S = jnp.sum((jnp.cumsum(onehot_SE, axis=0) - 1) * onehot_SE, axis=-1)
    kept_S = position_S < cap
    slot_S = jnp.where(kept_S, experts_S * cap + position_S, num_experts * cap)
    return slot_S.reshape(k, t).T, kept_S.reshape(k, t).T


def dispatch(x_TD: jax.Array, slot_TK: jax.Array, num_experts: int, cap: int) -> jax.Array:
    """Gathers tokens into the expert buffer [E, C, D]; empty slots are zero.

    Built as a gather (slot -> token) rather than a scatter of tokens, so the backward pass is the cheap
    scatter-add and the forward pass reads each token at most K times.
    """
    t, k = slot_TK.shape
    token_TK = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k))
    # slot -> token map; dropped choices write to the extra slot E*C, which is cut off; empty slots point to
    # the zero row appended at index T.
    token_of_slot = jnp.full((num_experts * cap + 1,), t, jnp.int32).at[slot_TK.reshape(-1)].set(
        token_TK.reshape(-1), mode="drop")[:-1]
    x_pad = jnp.concatenate([x_TD, jnp.zeros((1, x_TD.shape[1]), x_TD.dtype)], axis=0)
    return x_pad[token_of_slot].reshape(num_experts, cap, x_TD.shape[1])


def combine(y_ECD: jax.Array, slot_TK: jax.Array, gates_TK: jax.Array, kept_TK: jax.Array) -> jax.Array:
    """y_t = sum_k gate_tk * y[slot_tk]; dropped choices contribute nothing."""
    e, c, d = y_ECD.shape
    y_pad = jnp.concatenate([y_ECD.reshape(e * c, d), jnp.zeros((1, d), y_ECD.dtype)], axis=0)
    y_TKD = y_pad[slot_TK]
    w_TK = jnp.where(kept_TK, gates_TK, 0.0).astype(y_TKD.dtype)
    return jnp.einsum("TKD,TK->TD", y_TKD, w_TK)


def sort_by_expert(experts_TK: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dropless: order of the T*K assignments sorted by expert (stable), token of each, and group sizes [E]."""
    t, k = experts_TK.shape
    experts_S = experts_TK.reshape(-1)
    order_S = jnp.argsort(experts_S, stable=True)
    token_S = order_S // k
    sizes_E = jnp.zeros((num_experts,), jnp.int32).at[experts_S].add(1)
    return order_S, token_S, sizes_E


def unsort_combine(y_SD: jax.Array, order_S: jax.Array, gates_TK: jax.Array) -> jax.Array:
    """Dropless: puts the sorted expert outputs back in (token, choice) order and mixes them by the gates."""
    t, k = gates_TK.shape
    y_TKD = jnp.zeros_like(y_SD).at[order_S].set(y_SD).reshape(t, k, -1)
    return jnp.einsum("TKD,TK->TD", y_TKD, gates_TK.astype(y_TKD.dtype))
