"""Moving tokens to experts and back: capacity-based (index gather/scatter) and dropless (sorted + ragged_dot).

Owns: slot assignment, dispatch and combine. Pure functions of one routing group; the MoE layer vmaps them
over groups. Never materialises a one-hot [T, E, C] tensor: both directions are integer-indexed gathers,
so the cost is O(T*K*D) whatever E is (the one-hot GShard einsum costs O(T*E*C*D)).

Shape key: T tokens in the group, D model, E experts, K choices per token, C capacity per expert, S = T*K.

Capacity arithmetic (T=6, E=3, K=2, capacity_factor=1.0): C = ceil(1.0 * K * T / E) = 4 slots per expert.
A choice that finds its expert full is dropped: combine weight 0, so only the residual passes through that
layer for that choice; drop fraction = dropped assignments / (T*K).

Drop policies (`model.drop_policy`) decide who gets a contested expert's slots.
    causal      token-major: (t=0, k=0), (t=0, k=1), (t=1, k=0), ... Whether (t, k) keeps its slot depends
                only on tokens <= t, so a decoder trained with drops stays causal.
    position    choice-major (GShard): every top-1 choice in token order, then every top-2 choice. A token's
                first choice never loses to another token's second choice, but a later token's top-1 can
                take an earlier token's top-2 slot: position t's output then depends on tokens after t.
    probability highest gate first (Megatron-Core's "probs" policy), ties in token-major order. Not causal.
Worked example: tokens 0-2 choose experts (0, 1), tokens 3-5 choose (1, 0).
    causal:   tokens 0-3 keep both choices and fill both experts; tokens 4 and 5 lose both.
    position: all six keep their top-1 (3 per expert); the 4th slots go to the top-2 of tokens 0 and 3.
    Both drop 4 of 12 assignments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def capacity(tokens: int, num_experts: int, k: int, factor: float, minimum: int) -> int:
    """C = ceil(factor * k * T / E), at least `minimum`, at most T (an expert can't use more slots)."""
    return int(min(tokens, max(minimum, math.ceil(factor * k * tokens / num_experts))))


def _to_priority(a_TK: jax.Array, gates_TK: jax.Array | None, policy: str) -> tuple[jax.Array, jax.Array | None]:
    """The (token, choice) values of `a_TK` flattened in the order they are handed slots, and the order
    itself when it is a sort (None for the two fixed orders, undone by a reshape)."""
    if policy == "causal":
        return a_TK.reshape(-1), None
    if policy == "position":
        return a_TK.T.reshape(-1), None
    order_S = jnp.argsort(-gates_TK.reshape(-1), stable=True)
    return a_TK.reshape(-1)[order_S], order_S


def _from_priority(v_S: jax.Array, order_S: jax.Array | None, shape: tuple[int, int], policy: str) -> jax.Array:
    t, k = shape
    if policy == "causal":
        return v_S.reshape(t, k)
    if policy == "position":
        return v_S.reshape(k, t).T
    return jnp.zeros_like(v_S).at[order_S].set(v_S).reshape(t, k)


def assign_slots(experts_TK: jax.Array, num_experts: int, cap: int, policy: str = "causal",
                 gates_TK: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Slot of each (token, choice) in its expert's buffer, handed out in the order of `policy` (above).

    Returns slot_TK (flat index e*C + position into the [E*C] buffer; E*C for dropped) and kept_TK (bool).
    `gates_TK` is needed by the probability policy only.
    """
    experts_S, order_S = _to_priority(experts_TK, gates_TK, policy)
    onehot_SE = jax.nn.one_hot(experts_S, num_experts, dtype=jnp.int32)
    position_S = jnp.sum((jnp.cumsum(onehot_SE, axis=0) - 1) * onehot_SE, axis=-1)
    kept_S = position_S < cap
    slot_S = jnp.where(kept_S, experts_S * cap + position_S, num_experts * cap).astype(jnp.int32)
    return (_from_priority(slot_S, order_S, experts_TK.shape, policy),
            _from_priority(kept_S, order_S, experts_TK.shape, policy))


def _inverse(slot_TK: jax.Array, num_slots: int) -> jax.Array:
    """(token, choice) flat index t*K + k held by each of the `num_slots` slots; T*K for an empty slot."""
    s = slot_TK.size
    # dropped choices write to the extra slot num_slots, which is cut off
    return jnp.full((num_slots + 1,), s, jnp.int32).at[slot_TK.reshape(-1)].set(
        jnp.arange(s, dtype=jnp.int32), mode="drop")[:-1]


@jax.custom_vjp
def take_rows(x_ND: jax.Array, rows_M: jax.Array, readers_NR: jax.Array) -> jax.Array:
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
    return take_rows(x_ND, rows_M, readers_NR), (rows_M, readers_NR)


def _take_rows_bwd(res, dout_MD):
    rows_M, readers_NR = res
    dx_ND = jnp.sum(_pad_rows(dout_MD)[readers_NR], axis=1)
    return dx_ND, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def dispatch(x_TD: jax.Array, slot_TK: jax.Array, num_experts: int, cap: int) -> jax.Array:
    """Gathers tokens into the expert buffer [E, C, D]; empty slots are zero.

    Built as a gather (slot -> token) rather than a scatter of tokens, and its backward pass is a gather
    too (token -> its K slots, see `take_rows`): the forward pass reads each token at most K times.
    """
    t, k = slot_TK.shape
    # slot -> token map (T*K // K = T for empty slots: the appended zero row)
    token_of_slot = _inverse(slot_TK, num_experts * cap) // k
    return take_rows(x_TD, token_of_slot, slot_TK).reshape(num_experts, cap, x_TD.shape[1])


def combine(y_ECD: jax.Array, slot_TK: jax.Array, gates_TK: jax.Array, kept_TK: jax.Array) -> jax.Array:
    """y_t = sum_k gate_tk * y[slot_tk]; dropped choices contribute nothing."""
    e, c, d = y_ECD.shape
    t, k = slot_TK.shape
    # each slot is read by at most one (token, choice): its backward is a gather by the inverse map
    y_TKD = take_rows(y_ECD.reshape(e * c, d), slot_TK.reshape(-1), _inverse(slot_TK, e * c)[:, None])
    w_TK = jnp.where(kept_TK, gates_TK, 0.0).astype(y_TKD.dtype)
    return jnp.einsum("TKD,TK->TD", y_TKD.reshape(t, k, d), w_TK)


def sort_by_expert(experts_TK: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dropless: the T*K assignments sorted by expert (stable). Returns order_S (flat assignment t*K + k at
    each sorted position), where_S (its inverse: the sorted position of each flat assignment) and the group
    sizes [E]. The inverse is an integer scatter of S indices; every row movement is a gather (`take_rows`)."""
    experts_S = experts_TK.reshape(-1)
    s = experts_S.shape[0]
    order_S = jnp.argsort(experts_S, stable=True).astype(jnp.int32)
    where_S = jnp.zeros((s,), jnp.int32).at[order_S].set(jnp.arange(s, dtype=jnp.int32))
    sizes_E = jnp.zeros((num_experts,), jnp.int32).at[experts_S].add(1)
    return order_S, where_S, sizes_E


def gather_sorted(x_TD: jax.Array, order_S: jax.Array, where_S: jax.Array, k: int) -> jax.Array:
    """The token of every sorted assignment: [S, D] (backward: each token sums its K rows, a gather)."""
    return take_rows(x_TD, order_S // k, where_S.reshape(-1, k))


def unsort_combine(y_SD: jax.Array, order_S: jax.Array, where_S: jax.Array, gates_TK: jax.Array) -> jax.Array:
    """Dropless: puts the sorted expert outputs back in (token, choice) order and mixes them by the gates."""
    t, k = gates_TK.shape
    y_TKD = take_rows(y_SD, where_S, order_S[:, None]).reshape(t, k, -1)
    return jnp.einsum("TKD,TK->TD", y_TKD, gates_TK.astype(y_TKD.dtype))
