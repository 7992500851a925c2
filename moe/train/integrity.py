"""Checksums and finiteness of the train state, computed on the devices where the state lives.

Owns: the fingerprint a checkpoint stores with each step and verifies on restore. Orbax stores no checksum
of array bytes, so a flipped bit in a data file restores "successfully" as a wrong value; with this check
it is damage like any unreadable file (moe/train/checkpoint.py sets the step aside).

The fingerprint of a leaf is two 32-bit sums over its elements of a bijective mix of (element bits, element
index) (murmur3's finaliser). Integer sums wrap exactly and do not depend on the order of addition, so the
value is the same whatever the mesh, sharding or number of processes: a state saved on one mesh and
restored on another verifies. A change to any single element always changes both sums (the mix is a
bijection of the bits for a fixed index); several changes cancel with probability ~2^-64.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B9


def _mix(h: jax.Array) -> jax.Array:
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
    """The leaf's raw bits as uint32 (one word per element; 8-byte types give two)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    return jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


def _sums(x: jax.Array) -> jax.Array:
    bits = _bits(x).reshape(-1)
    idx = jax.lax.iota(jnp.uint32, bits.shape[0])
    a = jnp.sum(_mix(bits ^ (idx * jnp.uint32(_GOLDEN))), dtype=jnp.uint32)
    b = jnp.sum(_mix((bits + idx) * jnp.uint32(0x27D4EB2F) ^ jnp.uint32(0x165667B1)), dtype=jnp.uint32)
    return jnp.stack([a, b])


def _finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


@jax.jit
def _fingerprint(tree: Any) -> tuple[Any, Any]:
    return jax.tree.map(_sums, tree), jax.tree.map(_finite, tree)


def _host(x: jax.Array) -> np.ndarray:
    """A replicated result on this host (also in multi-process runs, where it is not fully addressable)."""
    return np.asarray(x.addressable_data(0))


def fingerprint(tree: Any) -> tuple[dict[str, list[int]], list[str]]:
    """({leaf path: [sum_a, sum_b]}, [paths of leaves holding NaN or Inf]) of a pytree of arrays."""
    sums, finite = _fingerprint(tree)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    sums = [_host(s).tolist() for s in jax.tree.leaves(sums)]
    bad = [p for p, f in zip(paths, jax.tree.leaves(finite)) if not bool(_host(f))]
    return dict(zip(paths, sums)), bad


def verify(tree: Any, expected: dict[str, list[int]] | None) -> str | None:
    """Why a restored tree is damaged (a checksum mismatch, non-finite values), or None if it is sound.
    `expected` None (a checkpoint written before checksums existed) checks finiteness only."""
    sums, nonfinite = fingerprint(tree)
    if expected is not None:
        wrong = [p for p in sums if expected.get(p) != sums[p]]
        missing = sorted(set(expected) - set(sums))
        if wrong or missing:
            first = (wrong or missing)[0]
            return (f"checksum mismatch in {len(wrong) + len(missing)} of {len(expected)} arrays (first: {first}): "
                    "the data files changed after the save")
    if nonfinite:
        return f"non-finite values (NaN/Inf) in {len(nonfinite)} arrays (first: {nonfinite[0]})"
    return None
