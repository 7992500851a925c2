"""Causal attention over packed documents, one kernel per platform (`resolve`): TPU the Pallas splash-attention
kernel (moe/model/splash.py), GPU cuDNN's fused attention (`jax.nn.dot_product_attention(implementation=
"cudnn")`), XLA's attention where neither takes the shapes, and on CPU the blockwise kernel below.

Owns: the softmax(QK^T)V of `layers.Attention` (projections, RoPE and norms stay there) and the choice of kernel.
Must not touch parameters or sharding.

Shape key: B batch, T query length, S key length, N query heads, K key/value heads, G = N/K query heads per
key/value head, H head dim. Masking: a query attends to keys at or before it with the same segment id.

Why a CPU kernel: XLA:CPU runs the softmax of `jax.nn.dot_product_attention` as ~8 full passes over the fp32
[B, N, T, S] scores, its backward dots on upcast fp32 copies, and computes the masked upper triangle. On
`small` (B16 T256 N8 H32, bf16) that takes ~58 ms of fwd+bwd per layer against ~33 ms here
(docs/performance.md, commit 57d69f0). The kernel:
  - splits the queries into blocks of `_block(T)` rows; block [a, b) only meets keys [0, b), so ~56% of the
    scores are computed (8 blocks), and each block's scores are a few MB;
  - saves only the log-sum-exp per query for the backward and recomputes the probabilities there, and gets
    the softmax backward's row sum from rowsum(dO * O) (FlashAttention, Dao et al. 2022, Alg. 2/4), so no
    reduction runs over the scores in the backward;
  - rounds the probabilities to the compute dtype once, sums exactly those, and runs every dot with that
    dtype's inputs and fp32 accumulation (`einsum_rowmajor`, whose layouts the fast CPU kernel takes).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from moe import config
from moe.model.matmul import einsum_rowmajor
from moe.runtime.sharding import target_platform

_NEG = float(jnp.finfo(jnp.float32).min)


@dataclass(frozen=True)
class Kernel:
    """`model.attention` and the splash tiles (`model.attention_block_q/kv`; 0 = auto)."""

    choice: str = "auto"
    block_q: int = 0
    block_kv: int = 0


def cudnn_takes(dtype, head_dim: int) -> bool:
    """cuDNN's fused attention: fp16/bf16 inputs and a head dim that is a multiple of 8, at most 128."""
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128


def resolve(kernel: Kernel, platform: str, *, seq_len: int, head_dim: int, dtype) -> str:
    """The kernel that runs for these shapes on `platform`: splash | cudnn | xla | blockwise.

    auto: TPU -> splash where it takes the shapes (config.splash_unsupported), GPU -> cudnn where it takes them,
    else XLA's attention; CPU -> blockwise. An explicit choice the platform has not is a ConfigError; an explicit
    splash/cudnn meeting shapes it cannot take (a generation prompt's length) runs XLA's attention instead."""
    gpu = platform in ("gpu", "cuda", "rocm")
    splash_ok = config.splash_unsupported(seq_len, head_dim, kernel.block_q, kernel.block_kv) is None
    if kernel.choice == "auto":
        if platform == "tpu":
            return "splash" if splash_ok else "xla"
        if gpu:
            return "cudnn" if cudnn_takes(dtype, head_dim) else "xla"
        return "blockwise" if platform == "cpu" else "xla"
    if kernel.choice == "splash" and platform != "tpu":
        raise config.ConfigError(f"model.attention=splash needs a TPU mesh; this one is {platform} (use auto)")
    if kernel.choice == "cudnn" and not gpu:
        raise config.ConfigError(f"model.attention=cudnn needs an NVIDIA GPU mesh; this one is {platform} (use auto)")
    if kernel.choice == "splash" and not splash_ok or kernel.choice == "cudnn" and not cudnn_takes(dtype, head_dim):
        return "xla"
    return kernel.choice


def causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, segment_ids_BT: jax.Array,
                     kernel: Kernel = Kernel()) -> jax.Array:
    """softmax(q k^T / sqrt(H) + mask) v per head, in q's dtype; the mask is causal and same-segment."""
    impl = resolve(kernel, target_platform(), seq_len=q_BTNH.shape[1], head_dim=q_BTNH.shape[-1], dtype=q_BTNH.dtype)
    if impl == "blockwise":
        return blockwise_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    if impl == "splash":
        from moe.model.splash import splash_attention

        return splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_q=kernel.block_q,
                                block_kv=kernel.block_kv)
    t = q_BTNH.shape[1]
    mask_B1TT = (jnp.tril(jnp.ones((t, t), bool))[None] & _same_segment(segment_ids_BT))[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TT,
                                        implementation="cudnn" if impl == "cudnn" else None)


def _same_segment(segment_ids_BT: jax.Array) -> jax.Array:
    return segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]


def _block(t: int) -> int:
    """Query block size: at most 8 blocks (more cost more ops than they save on CPU), at least 32 rows."""
    return min(t, max(32, -(-t // 8)))


def _blocks(t: int) -> list[tuple[int, int]]:
    step = _block(t)
    return [(a, min(a + step, t)) for a in range(0, t, step)]


def _split_heads(x_BTNH: jax.Array, kv_heads: int) -> jax.Array:
    b, t, n, h = x_BTNH.shape
    return x_BTNH.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]


def _merge_heads(x_BKGTH: jax.Array) -> jax.Array:
    b, k, g, t, h = x_BKGTH.shape
    return x_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def _logits(q_BKGtH: jax.Array, k_BKSH: jax.Array, bias_B11tS: jax.Array) -> jax.Array:
    """Scaled, masked scores of one query block: [B, K, G, t, S] fp32 (the G heads of a K head share one dot)."""
    b, k, g, t, h = q_BKGtH.shape
    s = einsum_rowmajor("bkqh,bksh->bkqs", q_BKGtH.reshape(b, k, g * t, h), k_BKSH)
    return s.reshape(b, k, g, t, -1) * (h ** -0.5) + bias_B11tS


def _bias(segment_ids_BT: jax.Array, a: int, b: int) -> jax.Array:
    """Additive mask of queries [a, b) against keys [0, b): 0 where visible, the fp32 minimum elsewhere."""
    causal_tS = jnp.arange(a, b)[:, None] >= jnp.arange(b)[None, :]
    same_BtS = segment_ids_BT[:, a:b, None] == segment_ids_BT[:, None, :b]
    return jnp.where(causal_tS[None] & same_BtS, 0.0, _NEG)[:, None, None]


@jax.custom_vjp
def blockwise_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
    """Causal same-segment attention, computed block by block (see the module docstring); any backend."""
    return _forward(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)[0]


def _forward(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
    kv = k_BTKH.shape[2]
    q5, k_BKSH, v_BKSH = _split_heads(q_BTNH, kv), k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    outs, lses = [], []
    for a, b in _blocks(q_BTNH.shape[1]):
        o, lse = _attend(q5[:, :, :, a:b], k_BKSH[:, :, :b], v_BKSH[:, :, :b], _bias(segment_ids_BT, a, b))
        outs.append(o)
        lses.append(lse)
    o_BTNH = _merge_heads(jnp.concatenate(outs, axis=3)).astype(q_BTNH.dtype)
    return o_BTNH, (q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, o_BTNH, lses)


def _attend(q_BKGtH, k_BKSH, v_BKSH, bias_B11tS):
    """One query block: (output [B, K, G, t, H] fp32, log-sum-exp [B, K, G, t, 1])."""
    s = _logits(q_BKGtH, k_BKSH, bias_B11tS)
    m = jnp.max(s, -1, keepdims=True)
    p = jnp.exp(s - m).astype(q_BKGtH.dtype)
    l = jnp.sum(p.astype(jnp.float32), -1, keepdims=True)
    b, k, g, t, n_keys = p.shape
    o = einsum_rowmajor("bkqs,bksh->bkqh", p.reshape(b, k, g * t, n_keys), v_BKSH)
    return o.reshape(b, k, g, t, -1) / l, m + jnp.log(l)


def masked_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Attention under any [B, T, S] mask with `causal_attention`'s arithmetic on this platform, so a KV-cached
    decode step reproduces the uncached forward pass (moe/model/generate.py). A query that sees no key (left
    padding) gets the mean of the values, as with `jax.nn.dot_product_attention`."""
    if target_platform() != "cpu":
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None])
    kv = k_BSKH.shape[2]
    bias_B11TS = jnp.where(mask_BTS, 0.0, _NEG)[:, None, None]
    o, _ = _attend(_split_heads(q_BTNH, kv), k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3), bias_B11TS)
    return _merge_heads(o).astype(q_BTNH.dtype)


def _backward(res, do_BTNH):
    q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, o_BTNH, lses = res
    b_, t_, _, h = q_BTNH.shape
    kv, dt = k_BTKH.shape[2], q_BTNH.dtype
    q5, k_BKSH, v_BKSH = _split_heads(q_BTNH, kv), k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    do5 = _split_heads(do_BTNH.astype(dt), kv)
    # rowsum(dP * P) = rowsum(dO * O): the softmax backward's per-query term, from [T, H] tensors only.
    delta5 = jnp.sum(do5.astype(jnp.float32) * _split_heads(o_BTNH, kv).astype(jnp.float32), -1, keepdims=True)
    dq_blocks, dk, dv = [], jnp.zeros((b_, kv, t_, h), jnp.float32), jnp.zeros((b_, kv, t_, h), jnp.float32)
    for (a, b), lse in zip(_blocks(t_), lses):
        q_blk, do_blk = q5[:, :, :, a:b], do5[:, :, :, a:b]
        p = jnp.exp(_logits(q_blk, k_BKSH[:, :, :b], _bias(segment_ids_BT, a, b)) - lse).astype(dt)
        g, t = p.shape[2], p.shape[3]
        p4, do4, q4 = p.reshape(b_, kv, g * t, b), do_blk.reshape(b_, kv, g * t, h), q_blk.reshape(b_, kv, g * t, h)
        dp = einsum_rowmajor("bkqh,bksh->bkqs", do4, v_BKSH[:, :, :b]).reshape(p.shape)
        ds4 = (p.astype(jnp.float32) * (dp - delta5[:, :, :, a:b]) * (h ** -0.5)).astype(dt).reshape(p4.shape)
        dq_blocks.append(einsum_rowmajor("bkqs,bksh->bkqh", ds4, k_BKSH[:, :, :b]).reshape(b_, kv, g, t, h))
        pad = ((0, 0), (0, 0), (0, t_ - b), (0, 0))  # keys [b, T) get nothing from this block
        dv = dv + jnp.pad(einsum_rowmajor("bkqs,bkqh->bksh", p4, do4), pad)
        dk = dk + jnp.pad(einsum_rowmajor("bkqs,bkqh->bksh", ds4, q4), pad)
    dq = _merge_heads(jnp.concatenate(dq_blocks, axis=3))
    return dq.astype(dt), dk.transpose(0, 2, 1, 3).astype(dt), dv.transpose(0, 2, 1, 3).astype(dt), None


blockwise_attention.defvjp(_forward, _backward)
