"""Expert parallelism for the capacity path: explicit all-to-all under `jax.shard_map`.

Owns: how tokens reach experts that live on other devices. Left to the SPMD partitioner, the reshard of the
[B, E, C, D] buffer from batch-split to expert-split became all-gathers of whole activations; here it is
written out (GShard, Lepikhin et al. 2020, §3.2):

    per device: rows b of the local batch   x_bECD  (dispatch is local: each sequence is a routing group)
    all_to_all over 'expert': split E, concat rows  ->  x_(b*n)(E/n)CD   (n = size of the expert axis)
    local experts: weights [E/n, D/fsdp, F/tensor], cast to the compute dtype, all-gathered over 'fsdp'
                   (FSDP) just in time,
                   the down projection psum'd over 'tensor' (Megatron-style split of F)
    all_to_all back, combine locally.

Must not change results: tests compare it with the single-device path (1e-5).
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

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
        # Cast to the tokens' dtype (the compute dtype: the residual stream is carried in it) before the
        # FSDP gather, so a bf16 model gathers and holds half the bytes; `ffn` would cast them anyway.
        wg, wu, wd = (w.astype(x.dtype) for w in (wg, wu, wd))
        if gather_in:  # FSDP: gather the D dim of this device's experts just before use
            wg = jax.lax.all_gather(wg, gather_in, axis=1, tiled=True)
            wu = jax.lax.all_gather(wu, gather_in, axis=1, tiled=True)
            wd = jax.lax.all_gather(wd, gather_in, axis=2, tiled=True)
        y = ffn(x_beCD, wg, wu, wd)
        if tensor:  # F is split: each device holds a partial sum of the down projection
            y = jax.lax.psum(y, tensor)
        y_bECD = jax.lax.all_to_all(y, exp, split_axis=0, concat_axis=1, tiled=True) if exp else y
        return jax.vmap(dispatch.combine)(y_bECD, slot, gates, kept)

    return jax.shard_map(local, in_specs=(row, row, row, row, w_spec, w_spec, w_down_spec), out_specs=row)(
        x_BTD, slot_BTK, gates_BTK, kept_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)
