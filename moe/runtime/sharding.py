"""Mesh construction and the one table that maps logical axis names to mesh axes.

Owns: building the device mesh from `MeshConfig`, the logical->physical rules, turning parameter metadata
into `NamedSharding`s, and `constrain`, the activation sharding hint the model calls. The model only ever
names *logical* axes (docs/design.md); nothing outside this module names a mesh axis.

Mesh axes: `data` (pure data parallel), `fsdp` (batch split + weights sharded), `expert` (experts split,
tokens reach them by all-to-all; the batch is split over it too outside the expert layers), `tensor`
(heads and FFN hidden split).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axes. Params: 'layers' (scan axis), 'vocab', 'embed', 'heads', 'kv_heads', 'head_dim',
# 'mlp', 'exp'. Activations: 'act_*'. A mesh axis may appear once per spec; `logical_to_spec` drops repeats.
RULES: dict[str, tuple[str, ...]] = {
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp", "expert"),  # dense weights are ZeRO-sharded over the expert axis too
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "exp": ("expert",),
    "act_batch": ("data", "fsdp", "expert"),  # tokens outside MoE layers: every non-tensor axis splits the batch
    "act_len": (),
    "act_embed": (),
    "act_carry": ("tensor",),  # the residual stream between scanned blocks (saved for backward under remat)
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def logical_to_spec(names: Sequence[str | None] | None) -> P:
    """('exp', 'embed', 'mlp') -> P('expert', 'fsdp', 'tensor'), never using a mesh axis twice."""
    if names is None:
        return P()
    used: set[str] = set()
    out = []
    for name in names:
        axes = tuple(a for a in RULES.get(name, ()) if a not in used) if name else ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Fills the one -1 axis and checks the product against the device count (clear error otherwise)."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    known = math.prod(v for v in sizes.values() if v != -1) * cfg.dcn_data
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        if num_devices % known:
            raise ConfigError(f"mesh: fixed axes {sizes} x dcn_data={cfg.dcn_data} (product {known}) "
                              f"do not divide the {num_devices} devices")
        sizes[fill[0]] = num_devices // known
    total = math.prod(sizes.values()) * cfg.dcn_data
    if total != num_devices:
        raise ConfigError(f"mesh: data*fsdp*expert*tensor*dcn_data = {total} but there are {num_devices} devices; "
                          f"set one axis to -1 to fill")
    sizes["data"] *= cfg.dcn_data
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """The mesh for `cfg` over `devices` (default: all). Multislice (dcn_data > 1) uses a hybrid mesh."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    from jax.experimental import mesh_utils

    if cfg.dcn_data > 1:
        ici = (sizes["data"] // cfg.dcn_data,) + shape[1:]
        dcn = (cfg.dcn_data, 1, 1, 1)
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    elif devices[0].platform == "cpu":
        arr = np.asarray(devices).reshape(shape)
    else:
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(arr, MESH_AXES)


def batch_ways(mesh: Mesh) -> int:
    """How many ways the mesh splits the batch (the product of the `act_batch` axes)."""
    return math.prod(mesh.shape[a] for a in RULES["act_batch"])


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Activation sharding hint by logical names; a no-op outside a mesh context (single device, tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    spec = logical_to_spec(names)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)


def target_platform() -> str:
    """The platform the code being traced will run on: the mesh's (an AOT compile for a TPU topology on a CPU
    host traces under a TPU mesh), else JAX's default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1)))
