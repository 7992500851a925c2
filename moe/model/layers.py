"""Dense building blocks of the decoder: parameters with logical axes, RMSNorm, RoPE, attention, gated FFN.

Owns: every non-MoE layer. Must not touch routing or experts (moe/model/experts/router.py, moe/model/experts/dispatch.py, moe/model/experts/layer.py).

Shape key: B batch, T length, D model, F hidden, N query heads, K key/value heads, H head dim, V vocab.
Params are fp32; `dtype` is the compute dtype (inputs of matmuls are cast to it, accumulation is fp32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.model.attention import Kernel, causal_attention
from moe.model.matmul import mm
from moe.runtime.sharding import constrain, target_platform


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float | None = None,
          fan_in: int | None = None) -> nnx.Param:
    """A normal-initialised fp32 Param tagged with logical axis names (mapped to the mesh in moe/runtime/sharding.py).

    std defaults to 1/sqrt(fan_in) (fan_in = first dim), the usual LeCun-normal choice for projections.
    """
    std = std if std is not None else (fan_in or shape[0]) ** -0.5
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def ones_param(shape: tuple[int, ...], axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, jnp.float32), out_sharding=axes, eager_sharding=False)


def gathered(w: jax.Array, names: tuple[str | None, ...], dtype, *, in_loop: bool = True) -> jax.Array:
    """The weight in the compute dtype, all-gathered over its FSDP-split ('embed') dims, cast *first*.

    Left to itself the partitioner gathers the fp32 shards and converts afterwards: in bf16 that moves and
    holds twice the bytes (at GLaM 64B a layer's gathered dense weights are 5.4 GB fp32). The constraint
    places the gather after the cast; other dims ('heads', 'mlp', 'vocab' over 'tensor') stay split.
    `in_loop`: a scanned layer's weight, cast per layer (`cast_here`); False for a weight that every
    iteration of a loop uses whole (the chunked loss's output table), which XLA may convert and gather once.
    """
    cast = cast_here(w, dtype) if in_loop else w.astype(dtype)
    return constrain(cast, tuple(None if n == "embed" else n for n in names))


def cast_here(w: jax.Array, dtype) -> jax.Array:
    """`w.astype(dtype)`, converted where it is used: inside the scanned layer body, one layer at a time.

    Left to itself XLA:TPU moves a narrowing `convert` above the loop's dynamic-slice of a scanned weight
    stack (its ConvertMover pass) and then out of the loop, so the whole bf16 copy of every layer's weights
    lives through the forward and backward loops (GLaM 64B/64E: 3 GiB per chip for the expert weights
    alone). On TPU fp32 -> bf16 is therefore written as its bit operations (round to nearest even, what
    `astype` does), which no pass moves; the gradient is the cast back, as for `astype`. Elsewhere `astype`:
    XLA:CPU/GPU may drop an f32 -> bf16 -> f32 round trip (excess precision), which the bit operations would
    forbid, changing CPU runs' numbers (the README's `make train` loss) for no memory gain measured there.
    """
    if w.dtype == dtype:
        return w
    if w.dtype == jnp.float32 and dtype == jnp.bfloat16 and target_platform() == "tpu":
        return f32_to_bf16(w)
    return w.astype(dtype)


@jax.custom_vjp
def f32_to_bf16(w: jax.Array) -> jax.Array:
    """`w.astype(bfloat16)` for fp32 `w`, bit for bit (NaN stays NaN), as integer operations."""
    u = jax.lax.bitcast_convert_type(w, jnp.uint32)
    rounded = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16  # round half to even on the 16 dropped bits
    nan = jnp.isnan(w)  # keep NaNs NaN (rounding could carry a payload-only NaN into the infinity pattern)
    bits = jnp.where(nan, (u >> 16) | 0x40, rounded).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


f32_to_bf16.defvjp(lambda w: (f32_to_bf16(w), None), lambda _, g: (g.astype(jnp.float32),))


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019), no bias, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        self.scale = ones_param((dim,), ("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), half-split layout, positions per document."""
    h = x_BTNH.shape[-1]
    freq_H2 = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angle_BTH2 = positions_BT[..., None].astype(jnp.float32) * freq_H2
    sin, cos = jnp.sin(angle_BTH2)[:, :, None, :], jnp.cos(angle_BTH2)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class Attention(nnx.Module):
    """Causal multi-head attention with grouped-query heads, optional qk-norm, RoPE, document masking.

    The softmax(QK^T)V is `attention.causal_attention` with the kernel `attention.resolve` picks per platform
    (TPU splash, GPU cuDNN, CPU blockwise). Tokens attend only to earlier tokens of the same packed
    document (same segment id).
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qk_norm: bool,
                 rope_theta: float, norm_eps: float, dtype, rngs: nnx.Rngs, kernel: Kernel = Kernel()):
        self.wq_DNH = param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"))
        self.wk_DKH = param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.wv_DKH = param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.wo_NHD = param(rngs, (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"),
                            fan_in=num_heads * head_dim)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.rope_theta = rope_theta
        self.dtype = dtype
        self.kernel = kernel

    def qkv(self, x_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q = mm("BTD,DNH->BTNH", x_BTD, gathered(self.wq_DNH[...], ("embed", "heads", None), self.dtype), self.dtype)
        k = mm("BTD,DKH->BTKH", x_BTD, gathered(self.wk_DKH[...], ("embed", "kv_heads", None), self.dtype), self.dtype)
        v = mm("BTD,DKH->BTKH", x_BTD, gathered(self.wv_DKH[...], ("embed", "kv_heads", None), self.dtype), self.dtype)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(rope(q, positions_BT, self.rope_theta), ("act_batch", "act_len", "act_heads", None))
        k = rope(k, positions_BT, self.rope_theta)
        return q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype)

    def out(self, o_BTNH: jax.Array) -> jax.Array:
        return mm("BTNH,NHD->BTD", o_BTNH, gathered(self.wo_NHD[...], ("heads", None, "embed"), self.dtype), self.dtype)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
        q, k, v = self.qkv(x_BTD, positions_BT)
        return self.out(causal_attention(q, k, v, segment_ids_BT, self.kernel))


class FFN(nnx.Module):
    """Gated FFN without biases: GLaM's gated GELU (`geglu`) or SwiGLU (Shazeer 2020, eq. 5/6)."""

    def __init__(self, d_model: int, d_ff: int, act: str, dtype, rngs: nnx.Rngs):
        self.w_gate_DF = param(rngs, (d_model, d_ff), ("embed", "mlp"))
        self.w_up_DF = param(rngs, (d_model, d_ff), ("embed", "mlp"))
        self.w_down_FD = param(rngs, (d_ff, d_model), ("mlp", "embed"))
        self.act = act
        self.dtype = dtype

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        h = gated_act(mm("BTD,DF->BTF", x_BTD, gathered(self.w_gate_DF[...], ("embed", "mlp"), self.dtype), self.dtype),
                      mm("BTD,DF->BTF", x_BTD, gathered(self.w_up_DF[...], ("embed", "mlp"), self.dtype), self.dtype),
                      self.act)
        h = constrain(h, ("act_batch", "act_len", "act_mlp"))
        return mm("BTF,FD->BTD", h, gathered(self.w_down_FD[...], ("mlp", "embed"), self.dtype), self.dtype)


def gated_act(gate: jax.Array, up: jax.Array, act: str) -> jax.Array:
    """act(gate) * up, in fp32: GELU (tanh approximation, as GLaM/T5) or SiLU."""
    return _gated_gelu(gate, up) if act == "geglu" else _gated_silu(gate, up)


def _gated(fn):
    """fn(gate) * up with a hand-written backward that keeps only (gate, up) as residuals.

    Why: autodiff of the tanh-GELU saves ~5 intermediates per element, and XLA:CPU fused their backward with
    the transpose feeding the weight-gradient dots, reading all of them in strided (column) order: that one
    fusion was half of the `small` preset's step time. Recomputing act(gate) in the backward and putting an
    optimization barrier before the transpose makes the elementwise part stream row-major (2.1x faster
    fwd+bwd over 8 scanned FFN layers) and gives bitwise the same gradients.
    """

    @jax.custom_vjp
    def f(gate, up):
        return fn(gate) * up

    def fwd(gate, up):
        return fn(gate) * up, (gate, up)

    def bwd(res, dy):
        gate, up = res
        a, vjp = jax.vjp(fn, gate)
        (dgate,) = vjp(dy * up)
        return jax.lax.optimization_barrier((dgate, dy * a))

    f.defvjp(fwd, bwd)
    return f


_gated_gelu = _gated(jax.nn.gelu)
_gated_silu = _gated(jax.nn.silu)


class Embed(nnx.Module):
    """Token embedding table [V, D]; `attend` gives logits against it (tied output, as in GLaM)."""

    def __init__(self, vocab: int, d_model: int, std: float, dtype, rngs: nnx.Rngs):
        self.table_VD = param(rngs, (vocab, d_model), ("vocab", "embed"), std=std)
        self.dtype = dtype

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        # Gather the table's fsdp-split D first (as FSDP does for every weight): a lookup into a D-split
        # table would otherwise leave the activations D-split and force a full re-layout of the batch.
        table_VD = gathered(self.table_VD[...], ("vocab", "embed"), self.dtype, in_loop=False)
        return constrain(jnp.take(table_VD, tokens_BT, axis=0), ("act_batch", "act_len", "act_embed"))

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        return mm("BTD,VD->BTV", x_BTD, gathered(self.table_VD[...], ("vocab", "embed"), self.dtype, in_loop=False), self.dtype)
