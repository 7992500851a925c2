"""moe.train.optim: schedule values vs hand-computed numbers, the decay mask, skipped non-finite updates,
Lion's first update, and that each optimizer reduces a least-squares loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe.config import OptimConfig
from moe.train.optim import decay_mask, make_optimizer, make_schedule, skip_stats

# lr 2, warmup 10, 110 total steps, floor 0.2 (min_lr_ratio 0.1); wsd decays over the last 22 steps.
BASE = OptimConfig(lr=2.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
TOTAL = 110

SCHEDULE_CASES = {
    # step: value, computed by hand
    "cosine": {0: 0.0, 5: 1.0, 10: 2.0,
               35: 2.0 * (0.9 * 0.5 * (1 + np.cos(np.pi / 4)) + 0.1),  # 25 of 100 decay steps = 1.7363961
               60: 1.1,  # half way: 2 * (0.9 * 0.5 + 0.1)
               110: 0.2, 500: 0.2},
    "rsqrt": {0: 0.0, 5: 1.0, 10: 2.0, 40: 1.0, 1000: 0.2},  # 2 * sqrt(10 / s)
    "wsd": {0: 0.0, 5: 1.0, 10: 2.0, 50: 2.0, 88: 2.0, 99: 1.1, 110: 0.2, 500: 0.2},
    "constant": {0: 0.0, 5: 1.0, 10: 2.0, 1000: 2.0},
}


@pytest.mark.parametrize("name", sorted(SCHEDULE_CASES))
def test_schedule_values(name):
    sched = make_schedule(dataclasses.replace(BASE, schedule=name), TOTAL)
    for step, want in SCHEDULE_CASES[name].items():
        np.testing.assert_allclose(float(sched(step)), want, atol=1e-6, err_msg=f"{name} at step {step}")


def test_schedules_without_warmup():
    for name, at_50 in [("cosine", 2.0 * (0.9 * 0.5 * (1 + np.cos(np.pi * 50 / 110)) + 0.1)),
                        ("rsqrt", 2.0), ("constant", 2.0), ("wsd", 2.0)]:
        sched = make_schedule(dataclasses.replace(BASE, schedule=name, warmup_steps=0), TOTAL)
        np.testing.assert_allclose(float(sched(0)), 2.0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(float(sched(50)), at_50, atol=1e-6, err_msg=name)


PARAMS = {
    "embed": {"embedding": jnp.ones((16, 4))},
    "blocks": {"attn_norm": {"scale": jnp.ones((3, 4))},  # stacked by scan: 2-D, excluded by name
               "attn": {"wq": jnp.ones((3, 4, 4)), "q_norm": jnp.ones((3, 4))}},
    "final_norm": {"scale": jnp.ones((4,))},
    "head": {"bias": jnp.ones((4,)), "kernel": jnp.ones((4, 16))},
}


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask(decay_embeddings):
    mask = decay_mask(PARAMS, decay_embeddings)
    assert mask == {"embed": {"embedding": decay_embeddings},
                    "blocks": {"attn_norm": {"scale": False}, "attn": {"wq": True, "q_norm": False}},
                    "final_norm": {"scale": False},
                    "head": {"bias": False, "kernel": True}}


def test_decay_mask_on_nnx_state():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(10, 4, rngs=rngs)
            self.norm = nnx.RMSNorm(4, rngs=rngs)
            self.proj = nnx.Linear(4, 4, use_bias=False, rngs=rngs)

    state = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
    mask = nnx.to_pure_dict(decay_mask(state))
    assert mask == {"embed": {"embedding": False}, "norm": {"scale": False}, "proj": {"kernel": True}}


def _cfg(**kw) -> OptimConfig:
    return dataclasses.replace(OptimConfig(), schedule="constant", warmup_steps=0, **kw)


def test_nonfinite_gradient_is_skipped_and_counted():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "norm": {"scale": jnp.ones(3)}}
    opt = make_optimizer(_cfg(name="adamw", lr=0.1, max_consecutive_skips=2), total_steps=10)
    state, update = opt.init(params), jax.jit(opt.update)  # jit: eager lax.cond dispatch is slow
    good = jax.tree.map(jnp.ones_like, params)
    bad = {"w": good["w"].at[0, 1].set(jnp.nan), "norm": {"scale": good["norm"]["scale"]}}

    upd, state = update(good, state, params)
    params = optax.apply_updates(params, upd)
    for k in (1, 2):  # two NaN steps in a row: both skipped, params untouched
        upd, state = update(bad, state, params)
        new = optax.apply_updates(params, upd)
        jax.tree.map(np.testing.assert_array_equal, new, params)
        assert {k_: int(v) for k_, v in skip_stats(state).items()} == {"skipped_total": k, "skipped_consecutive": k}
    upd, state = update(good, state, params)  # a finite step resets the consecutive count only
    params = optax.apply_updates(params, upd)
    assert {k_: int(v) for k_, v in skip_stats(state).items()} == {"skipped_total": 2, "skipped_consecutive": 0}
    assert int(state.inner_state[-1][0].count) == 2  # adam's step count saw only the 2 applied updates

    for _ in range(3):  # past max_consecutive_skips optax applies the update: train.py must roll back
        upd, state = update(bad, state, params)
    assert bool(jnp.isnan(optax.apply_updates(params, upd)["w"]).any())


def test_skip_stats_after_restore_as_dict():
    state = make_optimizer(_cfg(), 10).init({"w": jnp.ones((2, 2))})
    as_dict = {"opt": {"notfinite_count": jnp.int32(1), "last_finite": True, "total_notfinite": jnp.int32(4),
                       "inner_state": state.inner_state}}
    stats = skip_stats(as_dict)
    assert (int(stats["skipped_total"]), int(stats["skipped_consecutive"])) == (4, 1)
    with pytest.raises(ValueError, match="apply_if_finite"):
        skip_stats(optax.adamw(1e-3).init({"w": jnp.ones(2)}))


def test_lion_first_update_is_signed_gradient_plus_decay():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k1, (3, 4)), "norm": {"scale": 1 + jax.random.normal(k2, (4,))}}
    grads = jax.tree.map(lambda p: jax.random.normal(k3, p.shape), params)
    lr, wd = 1e-2, 0.5
    opt = make_optimizer(_cfg(name="lion", lr=lr, weight_decay=wd, clip_norm=1.0), total_steps=10)
    upd, _ = opt.update(grads, opt.init(params), params)
    # clipping rescales g but cannot flip a sign; the norm scale gets no decay
    np.testing.assert_array_equal(upd["w"], -lr * (jnp.sign(grads["w"]) + wd * params["w"]))
    np.testing.assert_array_equal(upd["norm"]["scale"], -lr * jnp.sign(grads["norm"]["scale"]))


@pytest.mark.parametrize("name,lr", [("adamw", 0.05), ("lion", 0.01), ("adafactor", 0.05)])
def test_optimizer_reduces_least_squares(name, lr):
    ka, kb, kx = jax.random.split(jax.random.key(1), 3)
    a_ND, b_N = jax.random.normal(ka, (32, 8)), jax.random.normal(kb, (32,))
    params = {"w": 0.5 * jax.random.normal(kx, (8, 1))}

    def loss(p):
        return jnp.mean((a_ND @ p["w"][:, 0] - b_N) ** 2)

    best = float(loss({"w": jnp.linalg.lstsq(a_ND, b_N)[0][:, None]}))
    opt = make_optimizer(_cfg(name=name, lr=lr, weight_decay=0.0), total_steps=50)

    @jax.jit
    def step(p, s):
        upd, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, upd), s

    p, s = params, opt.init(params)
    for _ in range(50):
        p, s = step(p, s)
    start, end = float(loss(params)), float(loss(p))
    # at least 60% of the reducible loss removed in 50 steps
    assert end - best < 0.4 * (start - best), (name, start, end, best)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_step_equals_update_then_apply_updates(name):
    """Optimizer.step (the train step's fused path) == apply_updates(params, update(...)) through good
    steps, skipped NaN steps and the give-up past max_consecutive_skips: same params and same state."""
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "norm": {"scale": jnp.ones(3)}}
    opt = make_optimizer(_cfg(name=name, lr=0.1, max_consecutive_skips=1), total_steps=10)
    good = {"w": jnp.full((2, 3), 0.5), "norm": {"scale": jnp.arange(3.0)}}
    bad = {"w": good["w"].at[1, 2].set(jnp.inf), "norm": good["norm"]}
    ref_p, ref_s = params, opt.init(params)
    got_p, got_s = params, opt.init(params)
    update, step = jax.jit(opt.update), jax.jit(opt.step)
    for g in (good, bad, good, bad, bad, good):
        upd, ref_s = update(g, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, upd)
        got_p, got_s = step(g, got_s, got_p)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), (got_p, got_s), (ref_p, ref_s))
    assert int(got_s.total_notfinite) == 3 and bool(jnp.isnan(got_p["w"]).any())  # the 2nd bad in a row applied
