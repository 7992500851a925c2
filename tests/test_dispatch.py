"""The four dispatch paths of moe/model/experts/paths.py, one signature each, against the per-token loop
reference (tests/reference.py): forward and gradients w.r.t. x, the router and every expert weight, fp32, 1e-5.
The expert-parallel paths run under meshes of the 8 fake CPU devices. Also: the grouped matmul's three kernels
against a per-row loop, the bucket ladder, and a worked overflow example of the expert-parallel dropless path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.config import ConfigError, MeshConfig, ModelConfig, load_config
from moe.model.experts import expert_parallel, gmm, paths, router
from moe.runtime.sharding import make_mesh
from tests.reference import expert_ffn, reference_moe, reference_routing

TOL = 1e-5
B, T, D, F = 8, 8, 8, 16
PATHS = ("capacity_local", "capacity_ep", "dropless_local", "dropless_ep")
CASES = {  # name: (E, K)
    "e4k2": (4, 2),
    "e1": (1, 1),
    "k_equals_e": (4, 4),
    "zero_token_expert": (4, 2),
}


def _cfg(e: int, k: int, **kw) -> ModelConfig:
    # capacity_factor E makes C = T (nothing drops); buffer factor 4 >= the expert axis (nothing overflows)
    base = dict(d_model=D, d_ff=F, num_experts=e, top_k=k, moe_every=1, min_capacity=1, capacity_factor=float(e),
                dropless_buffer_factor=4.0)
    return dataclasses.replace(ModelConfig(), **{**base, **kw})


def _params(e: int, seed: int = 0) -> dict:
    ks = jax.random.split(jax.random.key(seed), 4)
    return {"w_router_DE": jax.random.normal(ks[0], (D, e)),
            "w_gate_EDF": jax.random.normal(ks[1], (e, D, F)) / np.sqrt(D),
            "w_up_EDF": jax.random.normal(ks[2], (e, D, F)) / np.sqrt(D),
            "w_down_EFD": jax.random.normal(ks[3], (e, F, D)) / np.sqrt(F)}


def _run(path: str, cfg: ModelConfig):
    """(params, x) -> (y, metrics) through `path`, routing included (so the router gets its gradient)."""
    def fn(p, x):
        logits = jnp.einsum("BTD,DE->BTE", x, p["w_router_DE"])
        routed = jax.vmap(lambda lg: router.route(lg, cfg.top_k, True))(logits)
        w = paths.Experts(p["w_gate_EDF"], p["w_up_EDF"], p["w_down_EFD"])
        return getattr(paths, path)(x, routed, w, cfg, True, jnp.float32)
    return fn


def _mesh(e: int):
    return make_mesh(MeshConfig(data=8 // min(e, 4), expert=min(e, 4)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_path_matches_loop_reference_forward_and_grads(path, case):
    e, k = CASES[case]
    cfg = _cfg(e, k)
    params = _params(e)
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    if case == "zero_token_expert":  # x[..., 0] = 1 and W_router[0, 3] = -50: expert 3 is never chosen
        params["w_router_DE"] = params["w_router_DE"].at[0, 3].set(-50.0)
        x = x.at[..., 0].set(1.0)
    ct = jax.random.normal(jax.random.key(2), (B, T, D))
    choices, kept = reference_routing(x, params["w_router_DE"], k, cap=None)
    assert kept.all()
    if case == "zero_token_expert":
        assert 3 not in choices
    ref = lambda p, xx: reference_moe(xx, p, choices, kept, renormalize=True)  # noqa: E731
    fn = _run(path, cfg)
    loss = lambda f: lambda p, xx: jnp.sum(f(p, xx) * ct)  # noqa: E731
    y_ref = jax.jit(ref)(params, x)
    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
    with jax.set_mesh(_mesh(e)) if path.endswith("_ep") else contextlib.nullcontext():
        y, metrics = jax.jit(fn)(params, x)
        g = jax.jit(jax.grad(loss(lambda p, xx: fn(p, xx)[0]), argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=TOL, atol=TOL)
    assert float(metrics["drop_fraction"]) == 0.0
    for (name, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL, err_msg=f"{path} {name}")
    if case == "zero_token_expert":
        for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
            assert np.isfinite(np.asarray(g[0][name])).all()
            np.testing.assert_array_equal(np.asarray(g[0][name][3]), 0.0)


def test_choose_picks_the_path_for_dispatch_and_mesh():
    for dispatch, local, ep in (("capacity", paths.capacity_local, paths.capacity_ep),
                                ("dropless", paths.dropless_local, paths.dropless_ep)):
        cfg = _cfg(4, 2, dispatch=dispatch)
        assert paths.choose(cfg) is local
        with jax.set_mesh(_mesh(4)):
            assert paths.choose(cfg) is ep


# --- the grouped matmul ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["buckets", "ragged", "megablox"])
def test_grouped_ffn_matches_per_row_loop_forward_and_grads(kernel):
    """megablox runs in the Pallas interpreter here (its rows padded to the 128-row tile, the k / n tiles cut to
    D and F); a TPU compile of it is below."""
    r, g = 40, 4
    sizes = jnp.array([10, 0, 20, 5], jnp.int32)  # an empty group, and 5 padding rows at the end
    ks = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(ks[0], (r, D))
    ws = (jax.random.normal(ks[1], (g, D, F)), jax.random.normal(ks[2], (g, D, F)), jax.random.normal(ks[3], (g, F, D)))
    group = np.repeat(np.arange(g), np.asarray(sizes))

    def loop(x, wg, wu, wd):
        rows = [expert_ffn(x[i], wg[group[i]], wu[group[i]], wd[group[i]], "geglu") if i < len(group)
                else jnp.zeros(D) for i in range(r)]
        return jnp.stack(rows)

    def fast(x, wg, wu, wd):
        kw = {"tiles": (128, 128, 128), "interpret": True} if kernel == "megablox" else {}
        return gmm.grouped_ffn(x, sizes, wg, wu, wd, act="geglu", dtype=jnp.float32, kernel=kernel, **kw)

    ct = jax.random.normal(ks[4], (r, D))
    y, y_ref = jax.jit(fast)(x, *ws), loop(x, *ws)
    scale = float(jnp.abs(y_ref).max())
    np.testing.assert_allclose(np.asarray(y) / scale, np.asarray(y_ref) / scale, atol=TOL)
    np.testing.assert_array_equal(np.asarray(y[35:]), 0.0)
    g_fast = jax.jit(jax.grad(lambda *a: jnp.sum(fast(*a) * ct), argnums=(0, 1, 2, 3)))(x, *ws)
    g_ref = jax.grad(lambda *a: jnp.sum(loop(*a) * ct), argnums=(0, 1, 2, 3))(x, *ws)
    for a, b in zip(g_fast, g_ref):
        s = float(jnp.abs(b).max())
        np.testing.assert_allclose(np.asarray(a) / s, np.asarray(b) / s, atol=TOL)


def test_bucket_ladder_and_the_rung_taken():
    # share 10 rows per group, at most 40 in one: rungs ceil(m * 10) for m = 1 ... 4, then the top
    assert gmm.bucket_caps(10, 40) == (10, 12, 13, 14, 15, 18, 20, 25, 30, 40)
    assert gmm.bucket_caps(2.5, 3) == (3,)
    caps = gmm.bucket_caps(10, 40)
    for largest, cap in ((10, 10), (11, 12), (19, 20), (31, 40), (40, 40)):
        assert caps[int(gmm._rung(caps, jnp.array([largest, 0, 1])))] == cap


# --- expert-parallel dropless: the bounded receive buffer ---------------------------------------------------


def test_worked_overflow_example():
    """2 devices on 'expert', one sequence each, T=4, K=1, E=2 (expert e on device e), buffer factor 1.0:
    S = 4 assignments per device, chunk = ceil(1.0 * 4 / 2) = 2 rows per peer.
      device 0 chooses experts [1, 1, 1, 0]: its run for device 1 is tokens 0, 1, 2 -> token 2 overflows;
      device 1 chooses [0, 0, 0, 0]: its run for device 0 is tokens 0-3 -> tokens 2 and 3 overflow.
    3 of 8 assignments overflow: their MoE output is exactly 0 (the block passes only the residual);
    every other token gets its expert's FFN. With factor 2.0 (= the expert axis: worst case) none does."""
    cfg = _cfg(2, 1, dropless_buffer_factor=1.0)
    p = _params(2, seed=7)
    x = jax.random.normal(jax.random.key(8), (2, 4, D))
    experts = jnp.array([[1, 1, 1, 0], [0, 0, 0, 0]], jnp.int32)[..., None]
    gates = jnp.ones((2, 4, 1), jnp.float32)
    routed = router.Routing(experts, gates, None, None, None)
    w = paths.Experts(p["w_gate_EDF"], p["w_up_EDF"], p["w_down_EFD"])
    mesh = make_mesh(MeshConfig(expert=2), jax.devices()[:2])
    expect = np.stack([np.stack([np.asarray(expert_ffn(x[b, t], w[0][e], w[1][e], w[2][e], "geglu"))
                                 for t, e in enumerate(np.asarray(experts[b, :, 0]))]) for b in range(2)])
    overflowed = np.array([[0, 0, 1, 0], [0, 0, 1, 1]], bool)
    with jax.set_mesh(mesh):
        y, m = jax.jit(lambda xx: paths.dropless_ep(xx, routed, w, cfg, True, jnp.float32))(x)
        y_all, m_all = jax.jit(lambda xx: paths.dropless_ep(
            xx, routed, w, dataclasses.replace(cfg, dropless_buffer_factor=2.0), True, jnp.float32))(x)
    assert float(m["overflow_fraction"]) == 3 / 8 == float(m["drop_fraction"])
    np.testing.assert_array_equal(np.asarray(y)[overflowed], 0.0)
    np.testing.assert_allclose(np.asarray(y)[~overflowed], expect[~overflowed], rtol=TOL, atol=TOL)
    assert float(m_all["overflow_fraction"]) == 0.0
    np.testing.assert_allclose(np.asarray(y_all), expect, rtol=TOL, atol=TOL)


def test_send_chunk_arithmetic():
    assert expert_parallel.send_chunk(4, 2, 1.0) == 2
    assert expert_parallel.send_chunk(16384, 16, 2.0) == 2048
    assert expert_parallel.send_chunk(10, 4, 100.0) == 10  # never more than S: the worst case


@pytest.mark.parametrize("overrides,field", [
    (["model.dropless_buffer_factor=0"], "model.dropless_buffer_factor"),
    (["model.dropless_buffer_factor=-1.5"], "model.dropless_buffer_factor"),
    (["model.grouped_matmul=megablocks"], "model.grouped_matmul"),
    (["model.megablox_tile_m=100"], "model.megablox_tile_m"),
    (["model.megablox_tile_k=64"], "model.megablox_tile_k"),
    (["model.megablox_tile_n=0"], "model.megablox_tile_n"),
])
def test_bad_dropless_settings_are_config_errors(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config("configs/tiny.yaml", ["model.dispatch=dropless", *overrides])


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, expert=2), dict(fsdp=2, expert=4)])
def test_megablox_under_a_mesh_matches_loop_reference(mesh):
    """The expert-parallel dropless step with the megablox kernels (Pallas interpreter) in a shard_map without
    the varying-axes check (its pallas_calls declare none): forward and gradients equal the loop reference,
    so the shard_map's own transpose sums the replicated weights' cotangents over data and fsdp."""
    e, k = 4, 2
    cfg = _cfg(e, k)
    params = _params(e)
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    ct = jax.random.normal(jax.random.key(2), (B, T, D))
    choices, kept = reference_routing(x, params["w_router_DE"], k, cap=None)
    ref = lambda p, xx: reference_moe(xx, p, choices, kept, renormalize=True)  # noqa: E731

    def fn(p, xx):
        logits = jnp.einsum("BTD,DE->BTE", xx, p["w_router_DE"])
        r = jax.vmap(lambda lg: router.route(lg, k, True))(logits)
        ffn = lambda *a, **kw: gmm.grouped_ffn(*a, act=cfg.ffn_act, dtype=jnp.float32, kernel="megablox",  # noqa: E731
                                               tiles=(128, 128, 128), interpret=True, **kw)
        return expert_parallel.dropless_moe(xx, r.experts_TK, r.gates_TK, p["w_gate_EDF"], p["w_up_EDF"],
                                            p["w_down_EFD"], num_experts=e, buffer_factor=4.0, exchange="dense",
                                            grouped_ffn=ffn, check_vma=False)[0]

    loss = lambda f: lambda p, xx: jnp.sum(f(p, xx) * ct)  # noqa: E731
    y_ref, g_ref = jax.jit(ref)(params, x), jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
    with jax.set_mesh(make_mesh(MeshConfig(**mesh))):
        y = jax.jit(fn)(params, x)
        g = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=TOL, atol=TOL)
    for (name, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL, err_msg=f"{mesh} {name}")


def test_megablox_off_tpu_is_a_config_error():
    cfg = _cfg(1, 1, grouped_matmul="megablox")
    with pytest.raises(ConfigError, match="model.grouped_matmul=megablox needs a TPU"):
        paths._grouped(cfg, jnp.float32)


# --- the TPU compile: ragged exchange, and the eval step on the training mesh --------------------------------

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (jax[tpu])")
SMALL_TPU = ["model.vocab_size=512", "model.d_model=128", "model.num_heads=2", "model.head_dim=128", "model.d_ff=256",
             "model.num_layers=2", "model.num_experts=4", "train.batch_size=8", "train.seq_len=256",
             "optim.name=adafactor", "mesh.data=-1", "mesh.expert=2"]


@needs_libtpu
@pytest.mark.parametrize("step", ["train", "eval"])
def test_tpu_compile_of_dropless_uses_the_ragged_exchange(step):
    """For a TPU the expert-parallel dropless path exchanges with ragged-all-to-all (XLA:CPU has none, so
    only a compile can show it); the eval step (train.py --aot_step eval) is dropless whatever the run's
    dispatch, on the run's mesh."""
    from moe.launch import aot

    dispatch = "dropless" if step == "train" else "capacity"
    cfg = load_config("configs/tiny.yaml", [*SMALL_TPU, f"model.dispatch={dispatch}"])
    with jax.default_matmul_precision("default"):  # as a run compiles (conftest sets "highest")
        r = aot.compile_report(cfg, "v5e:2x2", step=step)
    assert r["fits"] and r["step"] == step and r["mesh"]["expert"] == 2
    assert r["collectives"]["ragged-all-to-all"] >= 2  # there and back (forward; the backward adds more)


@needs_libtpu
def test_tpu_compile_of_megablox_grouped_matmul():
    """model.grouped_matmul=megablox compiles for a TPU inside the expert-parallel dropless step: the forward
    gmm x3 (gate, up, down), the backward's dx gmm x3 and dw tgmm x3 are Mosaic kernels (attention is XLA's
    here, so every Pallas call is a megablox one)."""
    from moe.launch import aot

    cfg = load_config("configs/tiny.yaml", [*SMALL_TPU, "model.dispatch=dropless", "model.grouped_matmul=megablox",
                                            "model.attention=xla"])
    with jax.default_matmul_precision("default"):
        r = aot.compile_report(cfg, "v5e:2x2")
    assert r["fits"] and r["collectives"]["ragged-all-to-all"] >= 2
    assert r["pallas_calls"] >= 9, r["pallas_calls"]


@needs_libtpu
def test_tpu_compile_with_megablox_tiles_too_large_reports_vmem():
    """Tiles that do not fit a core's vector memory fail the compile as out of VMEM, naming the tile keys (not
    as an HBM peak, which they are not)."""
    from moe.launch import aot

    cfg = load_config("configs/tiny.yaml", [*SMALL_TPU, "model.dispatch=dropless", "model.grouped_matmul=megablox",
                                            "model.attention=xla", "model.megablox_tile_m=16384"])  # v4: 16 MiB of scoped VMEM
    with jax.default_matmul_precision("default"):
        r = aot.compile_report(cfg, "v4:2x2x1")
    assert r["fits"] is False and r["oom_memory"] == "vmem", r.get("error")
    assert "model.megablox_tile_m/k/n" in aot.format_report(r)
