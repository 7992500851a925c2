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


def _inverse(slot_TK: jax.Array, num_slots: int) -> jax.Array:
    """(token, choice) flat index t*K + k held by each of the `num_slots` slots; T*K for an empty slot."""
    s = slot_TK.size
    # dropped choices write to the extra slot num_slots, which is cut off
    return jnp.full((num_slots + 1,), s, jnp.int32).at[slot_TK.reshape(-1)].set(
        jnp.arange(s, dtype=jnp.int32), mode="drop")[:-1]


@jax.custom_vjp
def _take_rows(x_ND: jax.Array, rows_M: jax.Array, readers_NR: jax.Array) -> jax.Array:
    """out[m] = x[rows[m]] (zero where rows[m] = N), where readers[n] lists every m with rows[m] = n (M = none).

    The transpose of a row gather is a scatter-add, which XLA:CPU runs as a serial loop. Because the map is
    known in both directions here, the backward pass is the gather d x[n] = sum_r d out[readers[n, r]]
    instead: the same terms, bitwise the same result, no scatter. (Measured, docs/performance.md: router +
    dispatch + combine forward+backward at T=4096, E=64 went from 425 to 360 ms on CPU.)
    """
    return _pad_rows(x_ND)[rows_M]


def _pad_rows(x_ND: jax.Array) -> jax.Array:
    return jnp.concatenate([x_ND, jnp.zeros((1,) + x_ND.shape[1:], x_ND.dtype)], axis=0)


def _take_rows_fwd(x_ND, rows_M, readers_NR):
    return _take_rows(x_ND, rows_M, readers_NR), (rows_M, readers_NR)


def _take_rows_bwd(res, dout_MD):
    rows_M, readers_NR = res
    dx_ND = jnp.sum(_pad_rows(dout_MD)[readers_NR], axis=1)
    return dx_ND, None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def dispatch(x_TD: jax.Array, slot_TK: jax.Array, num_experts: int, cap: int) -> jax.Array:
    """Gathers tokens into the expert buffer [E, C, D]; empty slots are zero.

    Built as a gather (slot -> token) rather than a scatter of tokens, and its backward pass is a gather
    too (token -> its K slots, see `_take_rows`): the forward pass reads each token at most K times.
    """
    t, k = slot_TK.shape
    # slot -> token map (T*K // K = T for empty slots: the appended zero row)
    token_of_slot = _inverse(slot_TK, num_experts * cap) // k
    return _take_rows(x_TD, token_of_slot, slot_TK).reshape(num_experts, cap, x_TD.shape[1])


def combine(y_ECD: jax.Array, slot_TK: jax.Array, gates_TK: jax.Array, kept_TK: jax.Array) -> jax.Array:
    """y_t = sum_k gate_tk * y[slot_tk]; dropped choices contribute nothing."""
    e, c, d = y_ECD.shape
    t, k = slot_TK.shape
    # each slot is read by at most one (token, choice): its backward is a gather by the inverse map
    y_TKD = _take_rows(y_ECD.reshape(e * c, d), slot_TK.reshape(-1), _inverse(slot_TK, e * c)[:, None])
    w_TK = jnp.where(kept_TK, gates_TK, 0.0).astype(y_TKD.dtype)
    return jnp.einsum("TKD,TK->TD", y_TKD.reshape(t, k, d), w_TK)


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
