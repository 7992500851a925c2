"""Matmuls: compute dtype and fp32 accumulation (`mm`), and operand layouts the CPU's fast dot kernel takes.

Owns: `mm` (every projection of the model goes through it), its mixed-precision backward, and
`einsum_rowmajor`, the dot used where XLA:CPU would otherwise fall back to a slow kernel. Must not know
about layers or sharding rules (moe/model/layers.py, moe/runtime/sharding.py).

Why a layout helper: XLA:CPU hands a dot to YNNPACK only when both operands are row-major and the lhs
contracts its minor dims ([batch, M, K] x [batch, K, N] or [batch, N, K]); any other bf16 dot runs as an
fp32 Eigen dot on upcast copies, at half the rate (openxla `backends/cpu/ynn_support.cc`,
`IsDotSupportedByYnn`). Every weight gradient x^T g is such a dot: x [tokens, D] contracts its *major* dim.
On the `small` expert shapes ([16, 640, 256]^T x [16, 640, 1024], bf16, 2 cores) the dot takes 34-37 ms
as written and 17 ms on a transposed copy of x, which costs ~1 ms (docs/performance.md, commit 57d69f0).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from moe.runtime.sharding import target_platform


def mm(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """einsum with inputs in the compute dtype and fp32 accumulation (the fast path on CPU, TPU and GPU).

    In a low-precision dtype the backward dots also take low-precision inputs (`_mm_lowp`): autodiff alone
    would feed them the fp32 cotangent, and a mixed fp32 x bf16 dot runs as an fp32 one.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return _mm_lowp(spec, x.astype(dtype), w.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mm_lowp(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _mm_lowp_fwd(spec: str, x: jax.Array, w: jax.Array):
    return _mm_lowp(spec, x, w), (x, w)


def _mm_lowp_bwd(spec: str, res, g: jax.Array):
    """Mixed-precision backward (Micikevicius et al. 2018): the cotangent is rounded to the inputs' dtype,
    both gradient dots accumulate in fp32, and each gradient is rounded once to its input's dtype.
    Every index of a spec here is shared by two of its three operands (batch or contraction: no index is
    summed within one operand), so the gradients are the two einsums with an operand swapped for the output."""
    x, w = res
    (a, b), out = spec.split("->")[0].split(","), spec.split("->")[1]
    g = g.astype(x.dtype)
    dot = einsum_rowmajor if target_platform() == "cpu" else _einsum32
    dx = sum_to_type_of(x, dot(f"{out},{b}->{a}", g, w))
    dw = sum_to_type_of(w, dot(f"{a},{out}->{b}", x, g))
    return dx, dw


def sum_to_type_of(primal: jax.Array, grad32: jax.Array) -> jax.Array:
    """Inside shard_map a gradient varies over every axis its factors vary over; an input invariant over some
    of them (a weight replicated over 'data') gets the sum over those, in fp32, as autodiff's psum would.
    (`manual_axis_type.varying`: the shard_map axes a value varies over; empty outside shard_map.)"""
    extra = jax.typeof(grad32).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying
    if extra:
        grad32 = jax.lax.psum(grad32, tuple(sorted(extra)))
    return grad32.astype(primal.dtype)


_mm_lowp.defvjp(_mm_lowp_fwd, _mm_lowp_bwd)


def _einsum32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def einsum_rowmajor(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` with fp32 accumulation, as one batched dot in the form YNNPACK takes.

    Every index must be a batch index (in a, b and the output) or a contraction (in a and b) or free (in one
    input and the output). The operand that becomes the lhs is arranged [batch, free, contraction], the rhs
    [batch, contraction, free] unless it already is [batch, free, contraction]; a transposed operand, and a
    result whose order differs from the output's, are pinned row-major with a layout constraint, so the
    transpose is a real copy (XLA's layout assignment would otherwise fold it into the dot's operand layout,
    which the kernel refuses). Of the two choices of lhs, the one that copies fewer bytes is taken.
    """
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    size = dict(zip(sa, a.shape)) | dict(zip(sb, b.shape))
    batch = "".join(c for c in out if c in sa and c in sb)
    contract = "".join(c for c in sa if c in sb and c not in out)
    if set(sa) | set(sb) != set(batch + contract + out) or len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
        raise ValueError(f"einsum_rowmajor: '{spec}' has an index summed within one operand or repeated")

    def plan(sl: str, sr: str, l_bytes: int, r_bytes: int):
        free_l = "".join(c for c in out if c in sl and c not in batch)
        free_r = "".join(c for c in out if c in sr and c not in batch)
        lhs = batch + free_l + contract
        rhs = sr if sr in (batch + contract + free_r, batch + free_r + contract) else batch + contract + free_r
        res = batch + free_l + free_r
        cost = (sl != lhs) * l_bytes + (sr != rhs) * r_bytes + (res != out) * 4 * math.prod(size[c] for c in out)
        return cost, lhs, rhs, res

    cost_ab, *p_ab = plan(sa, sb, a.nbytes, b.nbytes)
    cost_ba, *p_ba = plan(sb, sa, b.nbytes, a.nbytes)
    (l_spec, r_spec, res_spec), (sl, sr, l, r) = (p_ab, (sa, sb, a, b)) if cost_ab <= cost_ba else (p_ba, (sb, sa, b, a))
    l, r = _arranged(l, sl, l_spec), _arranged(r, sr, r_spec)
    n_b = len(batch)
    r_contract = tuple(range(n_b, n_b + len(contract))) if r_spec.startswith(batch + contract) else \
        tuple(range(len(r_spec) - len(contract), len(r_spec)))
    dims = ((tuple(range(len(l_spec) - len(contract), len(l_spec))), r_contract), (tuple(range(n_b)),) * 2)
    y = jax.lax.dot_general(l, r, dims, preferred_element_type=jnp.float32)
    # The result is pinned too before it is transposed: XLA folds transpose(dot(l, r)) into dot(r, l), a
    # dot whose lhs contracts its major dim again.
    return _arranged(_rowmajor(y), res_spec, out)


def _arranged(x: jax.Array, have: str, want: str) -> jax.Array:
    """x (indices `have`) transposed to `want`, as a row-major copy; x itself when the order already fits."""
    if have != want:
        # The barrier keeps x's producer out of the transpose's loop: fused, XLA:CPU recomputes the producer
        # (e.g. the gated GELU from three fp32 inputs) in the transpose's strided order, 20x slower.
        x = jnp.transpose(jax.lax.optimization_barrier(x), tuple(have.index(c) for c in want))
    return _rowmajor(x)


def _rowmajor(x: jax.Array) -> jax.Array:
    return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))
