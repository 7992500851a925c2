"""Grouped matmul: every expert's gated FFN on its own contiguous run of rows (the dropless paths' kernel).

Owns: `grouped_ffn` and the three kernels behind it, chosen by the platform the code is traced for
(`target_platform()`, so an AOT compile for a TPU topology gets the TPU kernel):

    tpu, gpu   `jax.lax.ragged_dot` (XLA's grouped matmul), with the mixed-precision backward of `mm`
               written out for it (`_ragged_mm`): the cotangent in the compute dtype, fp32 accumulation,
               dx as a ragged dot with the transposed weights, dw as a ragged-contracting dot.
    tpu        (`model.grouped_matmul=megablox`) the Pallas megablox kernels (`_megablox_mm`: `gmm` forward
               and dx, `tgmm` for dw) with the same mixed-precision backward; rows are padded to a multiple
               of the row tile (`model.megablox_tile_m`), the k / n tiles are cut to the matrix where it is
               smaller. On another platform only the Pallas interpreter runs it (`interpret=True`, tests).
    cpu        `_bucketed_ffn`: XLA:CPU lowers ragged_dot to a dense masked matmul over all G groups (cost
               x G). Instead the rows are padded per group into a [G, C, D] buffer and the FFN runs as the
               capacity path's batched dots, where C is the smallest of a fixed ladder of capacities
               (`bucket_caps`: 1, 1.125, ..., 2, 3, 4, ... times the balanced share) that holds the largest
               group this step, picked at run time with `lax.switch`. Dropless semantics (no row is ever
               cut off: the top rung holds every row) at the cost of the capacity path at capacity factor
               max/mean load, rounded up to the next rung.

Shape key: R rows (sorted by group; rows after sum(sizes) are padding and come out zero), G groups, D model,
F hidden, C rung capacity per group. Weights [G, D, F] / [G, F, D]; the output is fp32 [R, D].

The bucketed kernel has its own VJP: differentiated through `lax.switch`, every rung's residuals would be
kept (zeros for the rungs not taken: memory of the whole ladder). Its forward keeps only the static-shape
[R, F] pre-activations; the backward pads them into the taken rung and runs that rung's backward dots.
"""

from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp

from moe.model.layers import gated_act
from moe.model.matmul import sum_to_type_of, mm
from moe.runtime.sharding import target_platform

# Rungs as multiples of the balanced share R / G: fine steps near balance (where a trained router sits),
# then doubling-ish steps up to G (one group holding every row).
RUNGS = (1.0, 1.125, 1.25, 1.375, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)


def bucket_caps(share: float, top: int) -> tuple[int, ...]:
    """The capacity ladder: ceil(m * share) for each rung m (`share`: a group's rows under balanced routing),
    cut at `top` (the most rows one group can ever hold), which is always the top rung."""
    return tuple(sorted({min(top, max(1, math.ceil(m * share - 1e-9))) for m in RUNGS} | {top}))


def grouped_ffn(x_RD: jax.Array, sizes_G: jax.Array, w_gate_GDF, w_up_GDF, w_down_GFD, *, act: str, dtype,
                share: float | None = None, max_group: int | None = None, kernel: str = "auto",
                tiles: tuple[int, int, int] = (512, 512, 512), interpret: bool = False) -> jax.Array:
    """y[r] = FFN_g(x[r]) for the group g that row r falls in (rows sorted by group, `sizes_G` rows each).

    `kernel`: auto (by platform, module docstring) | ragged | buckets | megablox (`tiles`: its (m, k, n)
    tiles; `interpret`: the Pallas interpreter, for a platform without Mosaic). `share`: a group's rows under balanced
    routing (default R / G; less when part of the R rows is padding); `max_group` bounds any group's size
    (e.g. the number of tokens, since a token picks an expert at most once; default R): the top rung.
    """
    if kernel == "auto":
        kernel = "buckets" if target_platform() == "cpu" else "ragged"
    if kernel == "ragged":
        g = _ragged(x_RD, w_gate_GDF, sizes_G, dtype)
        u = _ragged(x_RD, w_up_GDF, sizes_G, dtype)
        return _ragged(gated_act(g, u, act), w_down_GFD, sizes_G, dtype)
    if kernel == "megablox":
        mb = functools.partial(_megablox, sizes_G=sizes_G, dtype=dtype, tiles=tiles, interpret=interpret)
        rows, pad = x_RD.shape[0], -x_RD.shape[0] % tiles[0]
        x = jnp.pad(x_RD.astype(dtype), ((0, pad), (0, 0)))
        return mb(gated_act(mb(x, w_gate_GDF), mb(x, w_up_GDF), act), w_down_GFD)[:rows]
    rows, groups = x_RD.shape[0], w_gate_GDF.shape[0]
    caps = bucket_caps(rows / groups if share is None else share, rows if max_group is None else min(rows, max_group))
    return _bucketed_ffn(act, jnp.dtype(dtype), caps, x_RD, sizes_G, w_gate_GDF, w_up_GDF, w_down_GFD)


# --- TPU / GPU: ragged_dot -----------------------------------------------------------------------------


def _ragged(x_RK: jax.Array, w_GKN: jax.Array, sizes_G: jax.Array, dtype) -> jax.Array:
    x, w = x_RK.astype(dtype), w_GKN.astype(dtype)
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.ragged_dot(x, w, sizes_G, preferred_element_type=jnp.float32)
    return _ragged_mm(x, w, sizes_G)


@jax.custom_vjp
def _ragged_mm(x_RK, w_GKN, sizes_G):
    return jax.lax.ragged_dot(x_RK, w_GKN, sizes_G, preferred_element_type=jnp.float32)


def _ragged_mm_fwd(x_RK, w_GKN, sizes_G):
    return _ragged_mm(x_RK, w_GKN, sizes_G), (x_RK, w_GKN, sizes_G)


def _ragged_mm_bwd(res, g_RN):
    x_RK, w_GKN, sizes_G = res
    g = g_RN.astype(x_RK.dtype)
    dx = jax.lax.ragged_dot(g, jnp.swapaxes(w_GKN, 1, 2), sizes_G, preferred_element_type=jnp.float32)
    # dw[g] = x_g^T grad_g: the rows are the contracting dim, ragged over the groups -> [G, K, N]
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    dw = jax.lax.ragged_dot_general(x_RK, g, sizes_G, dims, preferred_element_type=jnp.float32)
    return sum_to_type_of(x_RK, dx), sum_to_type_of(w_GKN, dw), None


_ragged_mm.defvjp(_ragged_mm_fwd, _ragged_mm_bwd)


# --- TPU: Pallas megablox ---------------------------------------------------------------------------------


def _megablox(x_RK: jax.Array, w_GKN: jax.Array, *, sizes_G, dtype, tiles, interpret) -> jax.Array:
    tm, tk, tn = tiles
    k, n = w_GKN.shape[1:]
    # A tile longer than the matrix is cut to it (a block equal to the whole dim is always legal in Mosaic).
    fit = (tm, min(tk, k), min(tn, n))
    return _megablox_mm(fit, interpret, x_RK.astype(dtype), w_GKN.astype(dtype), sizes_G.astype(jnp.int32))


def _mb():
    """The megablox kernel module (the package's `gmm` name is its custom-VJP wrapper, not the module)."""
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _megablox_mm(tiles, interpret, x_RK, w_GKN, sizes_G):
    return _rows_in_groups(_mb().gmm(x_RK, w_GKN, sizes_G, jnp.float32, tiles, interpret=interpret), sizes_G)


def _rows_in_groups(y_RN: jax.Array, sizes_G: jax.Array) -> jax.Array:
    """Zero the rows after the last group: megablox leaves them unwritten (whatever the buffer held)."""
    return jnp.where(jnp.arange(y_RN.shape[0])[:, None] < jnp.sum(sizes_G), y_RN, 0.0)


def _megablox_fwd(tiles, interpret, x_RK, w_GKN, sizes_G):
    return _megablox_mm(tiles, interpret, x_RK, w_GKN, sizes_G), (x_RK, w_GKN, sizes_G)


def _megablox_bwd(tiles, interpret, res, g_RN):
    mb = _mb()
    x_RK, w_GKN, sizes_G = res
    g = g_RN.astype(x_RK.dtype)
    tm, tk, tn = tiles
    dx = _rows_in_groups(mb.gmm(g, w_GKN, sizes_G, jnp.float32, (tm, tn, tk), transpose_rhs=True,
                                interpret=interpret), sizes_G)
    dw = mb.tgmm(x_RK.T, g, sizes_G, jnp.float32, (tm, tk, tn), num_actual_groups=w_GKN.shape[0],
                 interpret=interpret)
    return sum_to_type_of(x_RK, dx), sum_to_type_of(w_GKN, dw), None


_megablox_mm.defvjp(_megablox_fwd, _megablox_bwd)


# --- CPU: rows padded into the smallest rung that holds the largest group --------------------------------


def _slots(sizes_G: jax.Array, rows: int, cap: int) -> tuple[jax.Array, jax.Array]:
    """Both maps between the R sorted rows and the [G, C] buffer: the slot g*C + (r - start_g) of each row
    (G*C, the appended zero slot, for padding rows) and the row of each slot (R, the appended zero row, for
    an empty slot). Rows are sorted by group, so both are arithmetic: no sort, no scatter."""
    g = sizes_G.shape[0]
    ends_G = jnp.cumsum(sizes_G)
    starts_G = ends_G - sizes_G
    r = jnp.arange(rows, dtype=jnp.int32)
    group_R = jnp.searchsorted(ends_G, r, side="right").astype(jnp.int32)
    slot_R = jnp.where(group_R < g, group_R * cap + r - starts_G[jnp.minimum(group_R, g - 1)], g * cap)
    c = jnp.arange(cap, dtype=jnp.int32)[None]
    row_GC = jnp.where(c < sizes_G[:, None], starts_G[:, None] + c, rows)
    return slot_R.astype(jnp.int32), row_GC.astype(jnp.int32)


def _take(v_NX: jax.Array, index: jax.Array) -> jax.Array:
    """v[index] where index N (one past the end) reads a zero row."""
    return jnp.concatenate([v_NX, jnp.zeros((1,) + v_NX.shape[1:], v_NX.dtype)])[index]


def _pad(v_RX: jax.Array, row_GC: jax.Array) -> jax.Array:
    """Rows into their slots of a [G, C, X] buffer (a gather; empty slots zero)."""
    return _take(v_RX, row_GC)


def _unpad(v_GCX: jax.Array, slot_R: jax.Array) -> jax.Array:
    """The inverse of `_pad` (a gather): each row's slot, zero for padding rows."""
    return _take(v_GCX.reshape(-1, *v_GCX.shape[2:]), slot_R)


def _rung(caps: tuple[int, ...], sizes_G: jax.Array) -> jax.Array:
    return jnp.minimum(jnp.searchsorted(jnp.asarray(caps), jnp.max(sizes_G), side="left"), len(caps) - 1)


def _up(x_GCD, wg, wu, dtype):
    return mm("GCD,GDF->GCF", x_GCD, wg, dtype), mm("GCD,GDF->GCF", x_GCD, wu, dtype)


def _down(h_GCF, wd, dtype):
    return mm("GCF,GFD->GCD", h_GCF, wd, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _bucketed_ffn(act, dtype, caps, x_RD, sizes_G, wg, wu, wd):
    return _bucketed_fwd(act, dtype, caps, x_RD, sizes_G, wg, wu, wd)[0]


def _bucketed_fwd(act, dtype, caps, x_RD, sizes_G, wg, wu, wd):
    rows = x_RD.shape[0]

    def rung(cap):
        def run(x_RD, sizes_G, wg, wu, wd):
            slot_R, row_GC = _slots(sizes_G, rows, cap)
            gate, up = _up(_pad(x_RD, row_GC), wg, wu, dtype)
            y = _down(gated_act(gate, up, act), wd, dtype)
            return _unpad(y, slot_R), _unpad(gate, slot_R), _unpad(up, slot_R)
        return run

    y_RD, gate_RF, up_RF = jax.lax.switch(_rung(caps, sizes_G), [rung(c) for c in caps], x_RD, sizes_G, wg, wu, wd)
    return y_RD, (x_RD, sizes_G, wg, wu, wd, gate_RF, up_RF)


def _bucketed_bwd(act, dtype, caps, res, dy_RD):
    x_RD, sizes_G, wg, wu, wd, gate_RF, up_RF = res
    rows = x_RD.shape[0]

    def rung(cap):
        def run(dy_RD, x_RD, sizes_G, wg, wu, wd, gate_RF, up_RF):
            slot_R, row_GC = _slots(sizes_G, rows, cap)
            h, act_vjp = jax.vjp(lambda a, b: gated_act(a, b, act), _pad(gate_RF, row_GC), _pad(up_RF, row_GC))
            # Only the pullbacks are used: XLA drops the forward dots that jax.vjp traces alongside them.
            _, down_vjp = jax.vjp(lambda hh, w: _down(hh, w, dtype), h, wd)
            dh, dwd = down_vjp(_pad(dy_RD, row_GC))
            _, up_vjp = jax.vjp(lambda xx, a, b: _up(xx, a, b, dtype), _pad(x_RD, row_GC), wg, wu)
            dx, dwg, dwu = up_vjp(act_vjp(dh))
            return _unpad(dx, slot_R), dwg, dwu, dwd
        return run

    # Under shard_map each device may take another rung, so no collective may run inside a branch: every
    # input enters fp32 and varying over every axis any input varies over (mm's backward then has nothing to
    # psum), and the sums over those axes (data-parallel weight gradients; the partial dx of a 'tensor'-split
    # F) run after the switch, in fp32 (each device's part rounded to the compute dtype once, by mm).
    axes = frozenset().union(*(_varying(v) for v in (x_RD, wg, wu, wd)))
    ins = [_vary(v.astype(jnp.float32) if v.dtype != jnp.float32 else v, axes) for v in (x_RD, wg, wu, wd)]
    dx_RD, dwg, dwu, dwd = jax.lax.switch(_rung(caps, sizes_G), [rung(c) for c in caps],
                                          _vary(dy_RD, axes), ins[0], sizes_G, *ins[1:],
                                          _vary(gate_RF, axes), _vary(up_RF, axes))
    return (sum_to_type_of(x_RD, dx_RD), None, sum_to_type_of(wg, dwg), sum_to_type_of(wu, dwu),
            sum_to_type_of(wd, dwd))


def _vary(v: jax.Array, axes: frozenset) -> jax.Array:
    extra = tuple(sorted(axes - _varying(v)))
    return jax.lax.pcast(v, extra, to="varying") if extra else v


def _varying(x: jax.Array) -> frozenset:
    return frozenset(jax.typeof(x).manual_axis_type.varying)


_bucketed_ffn.defvjp(_bucketed_fwd, _bucketed_bwd)
