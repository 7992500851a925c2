"""Expert parallelism: explicit all-to-all under `jax.shard_map`, for the capacity and the dropless path.

Owns: how tokens reach experts that live on other devices. Left to the SPMD partitioner, the reshard of the
[B, E, C, D] buffer from batch-split to expert-split became all-gathers of whole activations; here it is
written out (GShard, Lepikhin et al. 2020, §3.2):

    per device: rows b of the local batch   x_bECD  (dispatch is local: each sequence is a routing group)
    all_to_all over 'expert': split E, concat rows  ->  x_(b*n)(E/n)CD   (n = size of the expert axis)
    local experts: weights [E/n, D/fsdp, F/tensor], cast to the compute dtype, all-gathered over 'fsdp'
                   (FSDP) just in time,
                   the down projection psum'd over 'tensor' (Megatron-style split of F)
    all_to_all back, combine locally.

Dropless (`dropless_moe`; MaxText's ragged all-to-all MoE, Megatron-Core's token dispatcher), per device:

    sort the local S = b*T*K assignments by expert, i.e. by destination device (expert // E_local)
    send buffer [n, chunk, D]: peer j's run of rows at j*chunk; a run longer than `chunk` keeps its first
        `chunk` rows (lowest expert, then earliest token): the rest overflow, deterministically, and count
        in `overflow_fraction`; their combine weight is zero, so only the residual passes for them
    exchange over 'expert': tpu/gpu `ragged_all_to_all` (only the filled rows travel, to fixed offsets
        i*chunk of the receiver's buffer), cpu (and `exchange="dense"`) `all_to_all` of the whole chunks;
        both leave the same [n*chunk, D] receive buffer (zeros in the empty rows)
    sort the received rows by local expert (empty rows last), grouped FFN (moe/model/experts/gmm.py),
        unsort, exchange back the same way, combine with the gates.

    chunk = min(S, ceil(dropless_buffer_factor * S / n)): the receive buffer holds factor x the balanced
    share of rows (S). factor >= n is the worst case (a peer can take all S rows): nothing ever drops.

Weights as for the capacity path: cast to the compute dtype, all-gathered over 'fsdp' only, the down
projection psum'd over 'tensor'. Neither tokens nor expert weights are ever all-gathered over 'expert'.
Must not change results: tests compare both paths with the single-device path (1e-5).
"""

from __future__ import annotations

from typing import Callable

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe.model.layers import cast_here
from moe.model.experts import dispatch
from moe.runtime.sharding import logical_to_spec


def _axes(spec_entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, 'a' or ('a', 'b')) as a tuple of mesh axis names."""
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def uses_mesh() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh is not None and not mesh.empty and mesh.size > 1


def capacity_moe(x_BTD, slot_BTK, gates_BTK, kept_BTK, w_gate_EDF, w_up_EDF, w_down_EFD, *, num_experts: int,
                 cap: int, ffn: Callable) -> jax.Array:
    """dispatch -> all-to-all -> experts -> all-to-all -> combine, one shard_map over the whole mesh.

    `ffn(x_GECD, w_gate, w_up, w_down) -> y_GECD` is the experts' computation on local shards.
    """
    w_spec = logical_to_spec(("exp", "embed", "mlp"))
    w_down_spec = logical_to_spec(("exp", "mlp", "embed"))
    gather_in, tensor = _axes(w_spec[1]), _axes(w_spec[2])  # the axes splitting D and F of the weights
    exp = _axes(w_spec[0])
    row = P(logical_to_spec(("act_batch",))[0])

    def local(x, slot, gates, kept, wg, wu, wd):
        x_bECD = jax.vmap(lambda xx, s: dispatch.dispatch(xx, s, num_experts, cap))(x, slot)
        x_beCD = jax.lax.all_to_all(x_bECD, exp, split_axis=1, concat_axis=0, tiled=True) if exp else x_bECD
        y = ffn(x_beCD, *_local_weights(x.dtype, gather_in, wg, wu, wd))
        if tensor:  # F is split: each device holds a partial sum of the down projection
            y = jax.lax.psum(y, tensor)
        y_bECD = jax.lax.all_to_all(y, exp, split_axis=0, concat_axis=1, tiled=True) if exp else y
        return jax.vmap(dispatch.combine)(y_bECD, slot, gates, kept)

    return jax.shard_map(local, in_specs=(row, row, row, row, w_spec, w_spec, w_down_spec), out_specs=row)(
        x_BTD, slot_BTK, gates_BTK, kept_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)


def _local_weights(dtype, gather_in: tuple[str, ...], wg, wu, wd):
    """This device's experts, cast to the compute dtype (the tokens' dtype: the residual stream is carried in
    it) *before* the FSDP gather of their D dim, so a bf16 model gathers and holds half the bytes."""
    wg, wu, wd = (cast_here(w, dtype) for w in (wg, wu, wd))
    if gather_in:
        wg = jax.lax.all_gather(wg, gather_in, axis=1, tiled=True)
        wu = jax.lax.all_gather(wu, gather_in, axis=1, tiled=True)
        wd = jax.lax.all_gather(wd, gather_in, axis=2, tiled=True)
    return wg, wu, wd


def send_chunk(assignments: int, peers: int, buffer_factor: float) -> int:
    """Rows a device may send to one peer: ceil(factor * S / n), at most S (where nothing can overflow)."""
    return int(min(assignments, max(1, math.ceil(buffer_factor * assignments / peers - 1e-9))))


def _exchange(v_RX, fill, sizes_n, axis: tuple[str, ...], chunk: int, how: str):
    """Row runs of `v` ([n*chunk, X]: run j, of `sizes_n[j]` filled rows, at j*chunk) to peer j; returns the
    [n*chunk, X] buffer holding peer i's run at i*chunk and each peer's run length. Rows outside the runs
    are `fill` (the sender's empty rows already are, so the dense exchange gives the same buffer)."""
    recv_sizes_n = jax.lax.all_to_all(sizes_n, axis, 0, 0, tiled=True)
    if how == "dense":
        return jax.lax.all_to_all(v_RX, axis, 0, 0, tiled=True), recv_sizes_n
    n = sizes_n.shape[0]
    offsets_n = jnp.arange(n, dtype=jnp.int32) * chunk
    mine_n = jnp.full((n,), jax.lax.axis_index(axis) * chunk, jnp.int32)
    out = jax.lax.ragged_all_to_all(v_RX, jnp.full_like(v_RX, fill), offsets_n, sizes_n, mine_n, recv_sizes_n,
                                    axis_name=axis)
    return out, recv_sizes_n


def dropless_moe(x_BTD, experts_BTK, gates_BTK, w_gate_EDF, w_up_EDF, w_down_EFD, *, num_experts: int,
                 buffer_factor: float, exchange: str, grouped_ffn: Callable,
                 check_vma: bool = True) -> tuple[jax.Array, jax.Array]:
    """sort -> exchange -> grouped FFN -> exchange back -> combine (module docstring), one shard_map over the
    whole mesh. `grouped_ffn(x_RD, sizes_G, wg, wu, wd, share=, max_group=) -> y_RD` (fp32) runs the local
    experts; `exchange`: ragged | dense. Returns (y_BTD, overflow_fraction over the whole batch).

    `check_vma=False` for a grouped FFN whose Pallas calls declare no varying axes for their outputs (megablox):
    the shard_map's transpose then sums the replicated weights' cotangents over the batch axes itself (tested
    against the loop reference under meshes with data and fsdp axes)."""
    w_spec = logical_to_spec(("exp", "embed", "mlp"))
    w_down_spec = logical_to_spec(("exp", "mlp", "embed"))
    gather_in, tensor, exp = _axes(w_spec[1]), _axes(w_spec[2]), _axes(w_spec[0])
    row_axes = _axes(logical_to_spec(("act_batch",))[0])
    row = P(row_axes or None)

    def local(x, experts, gates, wg, wu, wd):
        b, t, d = x.shape
        k = experts.shape[-1]
        tokens, s = b * t, b * t * k
        n = jax.lax.axis_size(exp) if exp else 1
        e_local = num_experts // n
        chunk = send_chunk(s, n, buffer_factor) if n > 1 else s  # no exchange, no buffer to overflow
        order_S, where_S, _ = dispatch.sort_by_expert(experts.reshape(tokens, k), num_experts)
        expert_S = experts.reshape(-1)[order_S]  # sorted: runs per destination device, in device order
        dest_S = expert_S // e_local
        count_n = jnp.zeros((n,), jnp.int32).at[dest_S].add(1)
        pos_S = jnp.arange(s, dtype=jnp.int32) - (jnp.cumsum(count_n) - count_n)[dest_S]
        kept_S = pos_S < chunk
        slot_S = jnp.where(kept_S, dest_S * chunk + pos_S, n * chunk)  # send-buffer row; n*chunk = overflow
        sorted_of_slot = jnp.full((n * chunk + 1,), s, jnp.int32).at[slot_S].set(
            jnp.arange(s, dtype=jnp.int32))[:-1]  # sorted position in each send row; s = empty
        filled = sorted_of_slot < s
        flat_of_slot = jnp.where(filled, order_S[jnp.minimum(sorted_of_slot, s - 1)], s)  # t*K + k; s = empty
        slot_flat = slot_S[where_S]  # send row of each (token, choice)

        send_x = dispatch.take_rows(x.reshape(tokens, d), jnp.where(filled, flat_of_slot // k, tokens),
                                    slot_flat.reshape(tokens, k))
        send_e = jnp.where(filled, expert_S[jnp.minimum(sorted_of_slot, s - 1)] % e_local, e_local)
        sizes_n = jnp.minimum(count_n, chunk)
        if exp:
            recv_x, recv_n = _exchange(send_x, 0, sizes_n, exp, chunk, exchange)
            recv_e, _ = _exchange(send_e, e_local, sizes_n, exp, chunk, exchange)
        else:
            recv_x, recv_n, recv_e = send_x, sizes_n, send_e

        # the received rows sorted by local expert (empty rows, id e_local, last)
        order_R, where_R, sizes_G = dispatch.sort_by_expert(recv_e[:, None], e_local + 1)
        x_RD = dispatch.take_rows(recv_x, order_R, where_R[:, None])
        y_RD = grouped_ffn(x_RD, sizes_G[:e_local], *_local_weights(x.dtype, gather_in, wg, wu, wd),
                           share=s / e_local, max_group=n * min(chunk, tokens))
        if tensor:  # F is split: each device holds a partial sum of the down projection
            y_RD = jax.lax.psum(y_RD, tensor)
        # fp32 back, as the capacity path: rounding each expert output before the gate mix would add error
        y_recv = dispatch.take_rows(y_RD, where_R, order_R[:, None])
        y_send = _exchange(y_recv, 0, recv_n, exp, chunk, exchange)[0] if exp else y_recv
        y_TKD = dispatch.take_rows(y_send, slot_flat, flat_of_slot[:, None]).reshape(tokens, k, d)
        y = jnp.einsum("TKD,TK->TD", y_TKD, gates.reshape(tokens, k).astype(y_TKD.dtype))
        dropped = jnp.sum((~kept_S).astype(jnp.float32))
        total = float(s)
        if row_axes:
            dropped, total = jax.lax.psum(dropped, row_axes), total * jax.lax.axis_size(row_axes)
        return y.reshape(b, t, d), dropped / total

    return jax.shard_map(local, in_specs=(row, row, row, w_spec, w_spec, w_down_spec), out_specs=(row, P()),
                         check_vma=check_vma)(x_BTD, experts_BTK, gates_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)
