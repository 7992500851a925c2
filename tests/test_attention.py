"""The CPU attention kernel (moe/model/attention.py) against a plain per-query loop and against autodiff of
`jax.nn.dot_product_attention`: causal and same-segment masking, grouped-query heads, query blocks that do
not divide the length, and the general-mask path the KV-cached decode uses. fp32 comparisons use 1e-5."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.model.attention import _blocks, blockwise_attention, masked_attention

TOL = 1e-5


def inputs(b, t, n, kv, h, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, t, kv, h)),
            jax.random.normal(ks[2], (b, t, kv, h)))


def segments(b, t):
    """Row 0: one document; row 1: three packed documents then padding (segment 0)."""
    seg = np.ones((b, t), np.int32)
    if b > 1:
        cuts = [0, t // 3, t // 2, t - 3, t]
        for i, (a, c) in enumerate(zip(cuts, cuts[1:])):
            seg[1, a:c] = 0 if i == 3 else i + 1
    return jnp.asarray(seg)


def loop_reference(q, k, v, seg) -> np.ndarray:
    """softmax over the keys each query may see (earlier or itself, same segment), one query at a time."""
    q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, seg))
    b_, t_, n_, h_ = q.shape
    g = n_ // k.shape[2]
    out = np.zeros_like(q)
    for b in range(b_):
        for n in range(n_):
            for t in range(t_):
                keys = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
                z = np.array([q[b, t, n] @ k[b, s, n // g] for s in keys]) / np.sqrt(h_)
                p = np.exp(z - z.max())
                out[b, t, n] = (p / p.sum()) @ v[b, keys, n // g]
    return out


def dense_reference(q, k, v, seg):
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


@pytest.mark.parametrize("b,t,n,kv,h", [(2, 40, 2, 2, 8), (2, 24, 4, 2, 8), (1, 64, 3, 1, 4)],
                         ids=["blocks-32+8", "gqa", "mqa-2blocks"])
def test_forward_matches_per_query_loop(b, t, n, kv, h):
    q, k, v = inputs(b, t, n, kv, h)
    seg = segments(b, t)
    got = jax.jit(blockwise_attention)(q, k, v, seg)
    np.testing.assert_allclose(got, loop_reference(q, k, v, seg), rtol=TOL, atol=TOL)


def test_blocks_cover_the_length_once():
    for t in (1, 31, 32, 40, 256, 257, 2048):
        blocks = _blocks(t)
        assert blocks[0][0] == 0 and blocks[-1][1] == t and len(blocks) <= 8
        assert all(a < b for a, b in blocks) and all(b == a2 for (_, b), (a2, _) in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("b,t,n,kv,h", [(2, 40, 2, 2, 8), (2, 72, 4, 2, 8)], ids=["mha", "gqa"])
def test_gradients_match_autodiff_of_dense_attention(b, t, n, kv, h):
    q, k, v = inputs(b, t, n, kv, h, seed=1)
    seg = segments(b, t)
    ct = jax.random.normal(jax.random.key(2), q.shape)
    def grads(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, seg) * ct), argnums=(0, 1, 2)))(q, k, v)
    for got, ref in zip(grads(blockwise_attention), grads(dense_reference)):
        np.testing.assert_allclose(got, ref, rtol=TOL, atol=TOL)


def test_bfloat16_gradients_are_bfloat16_and_close_to_fp32():
    """bf16 inputs: bf16 gradients, within bf16 rounding of the fp32 kernel's (probabilities and the dots'
    inputs are rounded to bf16: relative 2^-8 each; the bound below allows a few such roundings)."""
    q, k, v = inputs(2, 40, 2, 2, 8, seed=3)
    seg = segments(2, 40)
    ct = jax.random.normal(jax.random.key(4), q.shape)
    def grads(dtype):
        f = lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, seg).astype(jnp.float32) * ct)  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*(x.astype(dtype) for x in (q, k, v)))
    g16, g32 = grads(jnp.bfloat16), grads(jnp.float32)
    for a, b in zip(g16, g32):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) < 4 * 2**-8 * scale


def test_masked_attention_with_the_causal_mask_equals_the_kernel():
    """The decode path (any mask) and the training kernel compute the same thing on the same mask."""
    q, k, v = inputs(2, 40, 4, 2, 8, seed=5)
    seg = segments(2, 40)
    mask = jnp.tril(jnp.ones((40, 40), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    np.testing.assert_allclose(jax.jit(masked_attention)(q, k, v, mask), jax.jit(blockwise_attention)(q, k, v, seg),
                               rtol=TOL, atol=TOL)
