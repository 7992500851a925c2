"""TPU attention: the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) with our
mask, causal x same-segment, one kernel call per device under `jax.shard_map`.

Owns: the kernel's mask and block sizes, and its placement on the mesh. What shapes it takes is
`moe.config.splash_unsupported` (checked with the config, before anything compiles).
Must not touch parameters; the choice of kernel per platform is moe/model/attention.py's.

Why: XLA's attention on TPU materialises the [B, N, T, T] scores (docs/aot.md: glam_1.7b_64e at seq 8192 needs
22.4 GiB per chip against 10.2 GiB at seq 1024, for the same tokens). Splash attention (the kernel MaxText trains
long context with) is FlashAttention-style: scores live per [block_q, block_kv] tile in VMEM and never in HBM,
and tiles that the mask empties (above the diagonal) are skipped, from a block-sparsity map built once per shape.

The mask: `CausalMask` (query i sees keys j <= i) per head, and `SegmentIds(q=seg, kv=seg)` (the kernel keeps a
score iff the two segment ids are equal): packed documents never see each other. `dense_mask` is the same
construction as a boolean array, for tests against the dense mask it replaces.

Placement: a Pallas call is opaque to the SPMD partitioner (left to it, it would be replicated: every device
computing the whole batch). So it runs under `shard_map`: rows split over the batch axes of the mesh, heads over
`tensor`, each device calling the kernel on its [rows, heads] share, vmapped over its rows. Grouped-query heads
stay grouped (the kernel takes N query heads against K key/value heads, N % K == 0); when `tensor` does not
divide K, the K heads are repeated to N first (so each device's query heads find their key/value heads).

Trap: with a global `jax_default_matmul_precision="highest"` active when the step is lowered, Mosaic is asked
for bf16 dots contracted in fp32 and fails ("Bad lhs type"); training never sets it (tests/conftest.py does,
so the TPU compile test lowers under "default").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from moe.runtime.sharding import logical_to_spec

AUTO_BLOCKS = (512, 256, 128)  # largest first (MaxText's default is 512)


def auto_block(t: int) -> int:
    """The largest of AUTO_BLOCKS that divides `t` (0 when none does)."""
    return next((b for b in AUTO_BLOCKS if t % b == 0), 0)


def block_sizes(t: int, block_q: int = 0, block_kv: int = 0) -> sa.BlockSizes:
    """Forward and backward tiles: the configured sizes, else the largest of 512/256/128 dividing T."""
    bq, bkv = block_q or auto_block(t), block_kv or auto_block(t)
    return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                         block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


@functools.lru_cache(maxsize=32)
def _kernel(t: int, heads: int, bq: int, bkv: int, interpret: bool):
    mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(heads)])
    return sa.make_splash_mha(mask, block_sizes=block_sizes(t, bq, bkv), head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def dense_mask(t: int, segment_ids_T: np.ndarray) -> np.ndarray:
    """bool [T, T]: what the kernel keeps, built from the kernel's own mask object (CausalMask) and its rule
    for segment ids (equal ids)."""
    causal = np.asarray(sa.CausalMask((t, t))[:, :])
    seg = np.asarray(segment_ids_T)
    return causal & (seg[:, None] == seg[None, :])


def splash_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, segment_ids_BT: jax.Array, *,
                     block_q: int = 0, block_kv: int = 0, interpret: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(H) + causal & same-segment mask) v, in q's dtype. `interpret` runs the kernel in
    the Pallas interpreter (any platform: how CPU tests check its numbers)."""
    t, n, h = q_BTNH.shape[1:]
    kv = k_BTKH.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    on_mesh = mesh is not None and not mesh.empty and mesh.size > 1
    spec = logical_to_spec(("act_batch", "act_len", "act_heads", None))
    head_axes = () if spec[2] is None else (spec[2],) if isinstance(spec[2], str) else tuple(spec[2])
    ways = int(np.prod([mesh.shape[a] for a in head_axes])) if on_mesh else 1
    if kv % ways:  # each device's query heads need their own key/value heads
        k_BTKH, v_BTKH = (jnp.repeat(x, n // kv, axis=2) for x in (k_BTKH, v_BTKH))
    scale = h ** -0.5

    def local(q, k, v, seg):
        kernel = _kernel(t, q.shape[2], block_q, block_kv, interpret)

        def one(q_NTH, k_KTH, v_KTH, seg_T):
            return kernel(q_NTH, k_KTH, v_KTH, segment_ids=sa.SegmentIds(q=seg_T, kv=seg_T))

        q = (q.astype(jnp.float32) * scale).astype(q.dtype)
        o = jax.vmap(one)(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg)
        return o.transpose(0, 2, 1, 3).astype(q.dtype)

    if not on_mesh:
        return local(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT.astype(jnp.int32))
    # check_vma=False: the kernel's pallas_call declares no varying axes for its output. Every float input and the
    # output vary over all the axes they are split on, and none is replicated over an axis, so nothing that
    # check would guard (a missing psum of a replicated input's gradient) can arise.
    return jax.shard_map(local, in_specs=(spec, spec, spec, P(spec[0], None)), out_specs=spec, check_vma=False)(
        q_BTNH, k_BTKH, v_BTKH, segment_ids_BT.astype(jnp.int32))
