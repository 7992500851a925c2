"""The TPU splash-attention path (moe/model/splash.py) and the choice of kernel per platform
(moe/model/attention.py `resolve`):
- its numbers: the Pallas kernel run in the Pallas interpreter on CPU against the per-query loop and against
  autodiff of dense attention (packed documents, grouped-query heads), fp32 within 1e-5;
- its mask: the kernel's own CausalMask x equal segment ids equals the dense mask it replaces;
- its compile for a TPU: a small model AOT-compiled for v5e:2x2 holds the Pallas custom call and no [T, T]
  buffer, while model.attention=xla does hold one (so the check can fail);
- bad input: tiles or lengths the kernel cannot take are ConfigErrors naming the field, before compiling.
"""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.config import ConfigError, load_config
from moe.model import splash
from moe.model.attention import Kernel, resolve
from tests.test_attention import TOL, inputs, loop_reference, segments

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (jax[tpu])")


def run(q, k, v, seg, **kw):
    return splash.splash_attention(q, k, v, seg, interpret=True, **kw)


@pytest.mark.parametrize("b,t,n,kv,h,blocks", [(2, 256, 4, 2, 128, (128, 128)), (2, 256, 2, 2, 64, (256, 128)),
                                                (1, 384, 4, 1, 128, (128, 128))])
def test_interpreted_kernel_matches_per_query_loop(b, t, n, kv, h, blocks):
    q, k, v = inputs(b, t, n, kv, h)
    seg = segments(b, t)
    out = run(q, k, v, seg, block_q=blocks[0], block_kv=blocks[1])
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), loop_reference(q, k, v, seg), atol=TOL, rtol=TOL)


def test_interpreted_kernel_gradients_match_autodiff_of_dense_attention():
    q, k, v = inputs(2, 256, 4, 2, 128, seed=3)
    seg = segments(2, 256)
    ct = jax.random.normal(jax.random.key(2), q.shape)

    def dense(q, k, v):
        t = q.shape[1]
        mask = (jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    def grads(f):
        return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2))(q, k, v)

    ours = grads(lambda q, k, v: run(q, k, v, seg, block_q=128, block_kv=128))
    for got, ref in zip(ours, grads(dense)):
        np.testing.assert_allclose(got, ref, rtol=TOL, atol=TOL)


def test_mask_is_causal_and_same_segment():
    seg = np.asarray(segments(2, 256))[1]
    want = np.tril(np.ones((256, 256), bool)) & (seg[:, None] == seg[None, :])
    assert np.array_equal(splash.dense_mask(256, seg), want)


def test_block_sizes_and_the_kernel_each_platform_gets():
    assert [splash.auto_block(t) for t in (128, 384, 1024, 8192, 32768)] == [128, 128, 512, 512, 512]
    b = splash.block_sizes(1024, 256, 0)
    assert (b.block_q, b.block_kv, b.block_q_dkv, b.block_kv_dq) == (256, 512, 256, 512)
    shapes = dict(seq_len=1024, head_dim=128, dtype=jnp.bfloat16)
    assert resolve(Kernel(), "tpu", **shapes) == "splash"
    assert resolve(Kernel(), "gpu", **shapes) == "cudnn"
    assert resolve(Kernel(), "gpu", **dict(shapes, dtype=jnp.float32)) == "xla"  # cuDNN takes fp16/bf16 only
    assert resolve(Kernel(), "cpu", **shapes) == "blockwise"
    assert resolve(Kernel(), "tpu", **dict(shapes, seq_len=100)) == "xla"  # a prompt length: XLA's attention
    assert resolve(Kernel("xla"), "tpu", **shapes) == "xla"
    with pytest.raises(ConfigError, match="model.attention=splash needs a TPU mesh; this one is cpu"):
        resolve(Kernel("splash"), "cpu", **shapes)
    with pytest.raises(ConfigError, match="model.attention=cudnn needs an NVIDIA GPU mesh"):
        resolve(Kernel("cudnn"), "tpu", **shapes)


@pytest.mark.parametrize("overrides,field", [
    (["model.attention_block_q=192"], r"model\.attention_block_q \(192\) must be a multiple of 128"),
    (["model.attention_block_kv=512", "train.seq_len=384"], r"model\.attention_block_kv \(512\) .* divides"),
    (["model.attention=splash", "train.seq_len=200"], r"train\.seq_len \(200\) must be a multiple of 128"),
    (["model.attention=splash", "train.seq_len=256", "model.head_dim=96"], r"model\.head_dim \(96\) must be 64"),
])
def test_shapes_the_kernel_cannot_take_are_config_errors(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config("configs/tiny.yaml", overrides)


SMALL_TPU = ["model.vocab_size=512", "model.d_model=64", "model.num_heads=2", "model.head_dim=128", "model.d_ff=128",
             "model.num_layers=2", "model.num_experts=4", "train.batch_size=8", "train.seq_len=256",
             "optim.name=adafactor", "mesh.data=-1", "mesh.expert=2"]
SCORES = re.compile(r"\[(?:\d+,)*256,256\]")  # any buffer with a [T, T] tail: attention scores


@needs_libtpu
@pytest.mark.parametrize("choice", ["auto", "xla"])
def test_tpu_compile_uses_the_pallas_kernel_and_no_score_buffer(choice):
    from moe.launch import aot

    cfg = load_config("configs/tiny.yaml", [*SMALL_TPU, f"model.attention={choice}"])
    # conftest sets a global "highest" matmul precision; the Mosaic compiler cannot lower bf16 dots contracted
    # in fp32, and training never asks for that: compile as a run does
    with jax.default_matmul_precision("default"):
        r = aot.compile_report(cfg, "v5e:2x2", keep_hlo=True)
    assert r["fits"]
    if choice == "auto":  # splash: the kernel is there and no [T, T] buffer is
        assert r["pallas_calls"] >= 3 * cfg.model.num_layers // 2  # forward, dq and dkv kernels (scanned blocks)
        assert not SCORES.findall(r["hlo"])
    else:
        assert r["pallas_calls"] == 0 and SCORES.findall(r["hlo"])
