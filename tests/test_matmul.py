"""Matmuls (moe/model/matmul.py): `mm`'s mixed-precision backward, and `einsum_rowmajor`, which must equal
`jnp.einsum` for every operand arrangement while giving XLA:CPU only dots its bf16 kernel takes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.model.matmul import einsum_rowmajor, mm

SPECS = [  # (spec, lhs shape, rhs shape): weight gradients, input gradients, attention, output transposes
    ("EGCD,EGCF->EDF", (3, 2, 5, 8), (3, 2, 5, 6)),
    ("BTD,BTV->VD", (2, 5, 8), (2, 5, 7)),
    ("BTD,BTF->DF", (2, 5, 8), (2, 5, 6)),
    ("BTNH,BTD->NHD", (2, 5, 3, 4), (2, 5, 8)),
    ("BTF,DF->BTD", (2, 5, 6), (8, 6)),
    ("BTD,DNH->BTNH", (2, 5, 8), (8, 3, 4)),
    ("bkqs,bksh->bkqh", (2, 3, 6, 7), (2, 3, 7, 4)),
    ("bkqs,bkqh->bksh", (2, 3, 6, 7), (2, 3, 6, 4)),
    ("bksh,bkqh->bkqs", (2, 3, 7, 4), (2, 3, 6, 4)),
    ("ECD,EFC->EDF", (3, 5, 8), (3, 6, 5)),
]


@pytest.mark.parametrize("spec,sa,sb", SPECS, ids=[s for s, _, _ in SPECS])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_einsum_rowmajor_equals_einsum(spec, sa, sb, dtype):
    """Same values as jnp.einsum with fp32 accumulation (bf16 products are exact in fp32, so 1e-5 holds)."""
    a = jax.random.normal(jax.random.key(0), sa).astype(dtype)
    b = jax.random.normal(jax.random.key(1), sb).astype(dtype)
    got = jax.jit(lambda a, b: einsum_rowmajor(spec, a, b))(a, b)
    ref = jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_einsum_rowmajor_rejects_a_trace_or_repeated_index():
    with pytest.raises(ValueError, match="einsum_rowmajor"):
        einsum_rowmajor("ij,jk->k", jnp.ones((2, 3)), jnp.ones((3, 4)))


def test_bf16_backward_compiles_to_bf16_dots_only():
    """The point of `einsum_rowmajor`: XLA:CPU upcasts a bf16 dot it cannot hand to YNNPACK (the weight
    gradient x^T g as autodiff writes it) to fp32. Here every dot of the compiled backward keeps bf16 inputs."""
    x, w = jnp.ones((4, 32, 64), jnp.float32), jnp.ones((4, 64, 48), jnp.float32)
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(mm("EGD,EDF->EGF", x, w, jnp.bfloat16) ** 2), argnums=(0, 1)))
    hlo = f.lower(x, w).compile().as_text()
    dots = re.findall(r"= \S+ dot\((%[\w.\-]+), (%[\w.\-]+)\)", hlo)
    assert len(dots) == 3  # forward, dx, dw
    for operands in dots:
        for name in operands:
            assert re.search(rf"{re.escape(name)} = bf16\[", hlo), f"dot operand {name} is not bf16"


@pytest.mark.parametrize("spec,xs,ws", [("BTD,DF->BTF", (2, 5, 8), (8, 6)), ("BTD,VD->BTV", (2, 5, 8), (7, 8)),
                                        ("EGCD,EDF->EGCF", (3, 2, 4, 8), (3, 8, 6)),
                                        ("BTNH,NHD->BTD", (2, 5, 2, 4), (2, 4, 8))])
def test_bf16_matmul_backward_is_bf16_dots_with_fp32_accumulation(spec, xs, ws):
    """mm in bf16: the gradient is the fp32 gradient of the bf16-rounded inputs and cotangent, rounded
    once to bf16 (the backward dots get bf16 inputs; fp32 would make them fp32 dots)."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), x, w).shape
    g = jax.random.normal(kg, out_shape)
    y, vjp = jax.vjp(lambda a, b: mm(spec, a, b, jnp.bfloat16), x, w)
    dx, dw = vjp(g)
    r = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    y_ref, vjp_ref = jax.vjp(lambda a, b: jnp.einsum(spec, a, b, precision="highest"), r(x), r(w))
    dx_ref, dw_ref = vjp_ref(r(g))
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    dots = [e for e in jax.make_jaxpr(vjp)(g).eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)  # fp32 accumulation of exact bf16 products
    # Each gradient is rounded once to bf16 (8-bit mantissa): within half a bf16 ulp (2^-9) of the fp32 one.
    for got, ref in ((dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(got, r(ref), rtol=2**-8, atol=1e-6)
        np.testing.assert_array_less(np.abs(got - ref), np.abs(ref) * 2**-8 + 1e-6)


def test_f32_to_bf16_is_astype_bit_for_bit_and_its_gradient_the_cast_back():
    """On TPU `cast_here` (moe/model/layers.py) writes fp32 -> bf16 as bit operations (`f32_to_bf16`) so XLA
    cannot hoist it out of the layer loop; they must round exactly as `astype` does, for every fp32 bit pattern
    class. (Run here on CPU: the integer operations are the same on every backend.)"""
    from moe.model.layers import cast_here, f32_to_bf16

    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38,
                        1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 65504.0, 3.3961776e38], np.float32)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)  # denormals too
    x = np.concatenate([special, bits, rng.standard_normal(10_000).astype(np.float32)])
    ours = np.asarray(jax.jit(f32_to_bf16)(x))
    ref = np.asarray(jax.jit(lambda v: v.astype(jnp.bfloat16))(x))
    nan = np.isnan(x)
    assert ours.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_array_equal(ours.view(np.uint16)[~nan], ref.view(np.uint16)[~nan])
    assert nan.sum() > 0 and np.all(np.isnan(ours[nan].astype(np.float32)))  # NaN stays NaN (payloads may differ)
    g = jax.grad(lambda v: jnp.sum(f32_to_bf16(v).astype(jnp.float32) * jnp.arange(4.0)))(jnp.ones(4))
    assert g.dtype == jnp.float32 and np.array_equal(np.asarray(g), np.arange(4.0))
    w16 = jnp.ones(3, jnp.bfloat16)
    assert cast_here(w16, jnp.bfloat16) is w16 and cast_here(w16, jnp.float32).dtype == jnp.float32
