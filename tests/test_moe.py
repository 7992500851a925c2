"""The MoE FFN (moe/model/experts/layer.py, moe/model/experts/router.py, moe/model/experts/dispatch.py) against the per-token loop reference of
tests/reference.py and against hand-computed numbers. fp32, tolerance 1e-5 throughout.

Covered: capacity path (no drops) == reference == dropless path, forward and gradients w.r.t. x and every
weight; the capacity rule on a worked example (which choices drop, drop fraction, zero output, priority of
top-1 over earlier tokens' top-2); a layer whose token lost every choice outputs its residual; 1 expert top-1
== the dense FFN; aux loss / z-loss / gates against their formulas; zero-token expert, E=1, k=E.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.model.experts import dispatch as dispatch_fns
from moe.model.experts import router
from moe.config import ModelConfig
from moe.model.layers import FFN
from moe.model.decoder import Layer
from moe.model.experts.layer import MoEFFN
from tests.reference import expert_ffn, reference_balance_losses, reference_moe, reference_routing

TOL = 1e-5
B, T, DM, F, E, K = 2, 16, 8, 16, 4, 2
WEIGHTS = ("w_router_DE", "w_gate_EDF", "w_up_EDF", "w_down_EFD")


def moe_cfg(**kw) -> ModelConfig:
    base = dict(d_model=DM, d_ff=F, num_experts=E, top_k=K, moe_every=1, min_capacity=1, router_jitter=0.0)
    return dataclasses.replace(ModelConfig(), **{**base, **kw})


def make_layer(cfg: ModelConfig, seed: int = 0, router_std: float = 1.0) -> MoEFFN:
    """An MoEFFN whose router is initialised wide (std 1) so routing is decisive, not near-uniform."""
    layer = MoEFFN(cfg, jnp.float32, nnx.Rngs(seed))
    w = router_std * jax.random.normal(jax.random.key(seed + 100), layer.w_router_DE[...].shape)
    layer.w_router_DE[...] = w
    return layer


def weights_of(layer: MoEFFN) -> dict:
    return {name: getattr(layer, name)[...] for name in WEIGHTS}


def apply_with(layer: MoEFFN, params: dict, x_BTD, train: bool = True):
    """Runs `layer` with its four weights replaced by `params` (differentiable in params and x)."""
    graphdef, state = nnx.split(layer)
    state = nnx.State(dict(state))
    for name in WEIGHTS:
        state[name] = params[name]
    return nnx.merge(graphdef, state)(x_BTD, train=train)


def call(layer: MoEFFN, x_BTD):
    """layer(x, train=True), jitted: one compile is faster than many small eager ops."""
    return nnx.jit(lambda m, xx: m(xx, train=True))(layer, x_BTD)


def grads(fn, params, x, ct):
    """d<fn(params, x), ct>/d(params, x): a random cotangent so every output element matters."""
    return jax.grad(lambda p, xx: jnp.sum(fn(p, xx) * ct), argnums=(0, 1))(params, x)


def assert_tree_close(a, b, tol=TOL):
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol, err_msg=str(path))


def inputs(seed: int = 1, shape=(B, T, DM)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# --- fast paths == reference loop ------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
def test_capacity_nodrop_dropless_and_reference_agree_forward_and_grads(renormalize):
    # capacity_factor 2 with E=4, K=2: C = ceil(2 * 2 * 16 / 4) = 16 = T, so nothing can drop.
    cap_cfg = moe_cfg(dispatch="capacity", capacity_factor=2.0, renormalize_gates=renormalize)
    assert dispatch_fns.capacity(T, E, K, 2.0, 1) == T
    layer_cap = make_layer(cap_cfg)
    layer_dl = make_layer(dataclasses.replace(cap_cfg, dispatch="dropless"))
    params = weights_of(layer_cap)
    x = inputs()
    ct = inputs(2)

    choices, kept = reference_routing(x, params["w_router_DE"], K, cap=None)
    assert kept.all() and len(set(choices[..., 0].ravel())) == E  # every expert is someone's top-1

    def ref(p, xx):
        return reference_moe(xx, p, choices, kept, renormalize=renormalize)

    def cap(p, xx):
        return apply_with(layer_cap, p, xx)[0]

    def dl(p, xx):
        return apply_with(layer_dl, p, xx)[0]

    y_ref = jax.jit(ref)(params, x)
    y_cap, aux_cap = jax.jit(lambda p, xx: apply_with(layer_cap, p, xx))(params, x)
    y_dl, _ = apply_with(layer_dl, params, x)
    np.testing.assert_allclose(y_cap, y_ref, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(y_dl, y_ref, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(y_cap, y_dl, rtol=TOL, atol=TOL)
    assert float(aux_cap["drop_fraction"]) == 0.0

    g_ref = jax.jit(lambda p, xx: grads(ref, p, xx, ct))(params, x)
    g_cap = jax.jit(lambda p, xx: grads(cap, p, xx, ct))(params, x)
    g_dl = jax.jit(lambda p, xx: grads(dl, p, xx, ct))(params, x)
    assert_tree_close(g_cap, g_ref)
    assert_tree_close(g_dl, g_ref)
    assert_tree_close(g_cap, g_dl)
    assert float(jnp.abs(g_ref[0]["w_router_DE"]).max()) > 1e-3  # the router does receive gradient


@pytest.mark.parametrize("policy", ["causal", "position", "probability", "dropless"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_routing_options_match_reference_loop_forward_and_grads(policy, score, bias):
    """Every score function x drop policy (capacity with drops, or dropless) x router bias, with the
    micro-batch and sequence balance losses, against the loop reference: output, losses and all gradients."""
    # capacity_factor 0.5: C = ceil(0.5 * 2 * 16 / 4) = 4 slots per expert for 32 choices: many drop.
    cfg = moe_cfg(dispatch="dropless" if policy == "dropless" else "capacity", capacity_factor=0.5,
                  drop_policy="causal" if policy == "dropless" else policy, router_score=score,
                  routed_scaling_factor=1.0 if score == "softmax" else 2.5,
                  router_bias_update_rate=1e-3 if bias else 0.0, seq_aux_loss_weight=1e-4)
    cap = None if policy == "dropless" else dispatch_fns.capacity(T, E, K, 0.5, 1)
    assert cap in (None, 4)
    layer = make_layer(cfg, seed=3)
    bias_E = None
    if bias:
        bias_E = 0.3 * jax.random.normal(jax.random.key(12), (E,))
        layer.router_bias_E[...] = bias_E
    params, x, ct = weights_of(layer), inputs(4), inputs(5)
    choices, kept = reference_routing(x, params["w_router_DE"], K, cap=cap, score=score, bias_E=bias_E,
                                      policy=policy)
    assert (0 < (~kept).sum() < kept.size) if cap else kept.all()
    scale = cfg.routed_scaling_factor

    def ref(p, xx):
        y = reference_moe(xx, p, choices, kept, renormalize=True, score=score, scale=scale)
        losses = reference_balance_losses(xx, p["w_router_DE"], choices, score)
        return y, losses

    def loss_of(fn):
        def loss(p, xx):
            y, aux = fn(p, xx)
            return jnp.sum(y * ct) + aux["aux_loss"] + aux["seq_aux_loss"]
        return loss

    fast = lambda p, xx: apply_with(layer, p, xx)  # noqa: E731
    (y, aux), (y_ref, ref_losses) = jax.jit(fast)(params, x), jax.jit(ref)(params, x)
    np.testing.assert_allclose(y, y_ref, rtol=TOL, atol=TOL)
    for name in ("aux_loss", "seq_aux_loss"):
        np.testing.assert_allclose(aux[name], ref_losses[name], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(aux["drop_fraction"], (~kept).mean(), rtol=TOL)
    if bias:
        plain, _ = reference_routing(x, params["w_router_DE"], K, cap=None, score=score)
        changed = (np.sort(plain, -1) != np.sort(choices, -1)).any(-1)
        assert changed.any()
        np.testing.assert_allclose(aux["bias_changed_fraction"], changed.mean(), rtol=TOL)
    assert_tree_close(jax.jit(jax.grad(loss_of(fast), argnums=(0, 1)))(params, x),
                      jax.jit(jax.grad(loss_of(ref), argnums=(0, 1)))(params, x))


# --- capacity semantics: a worked example ------------------------------------------------------------

# T=8 tokens, E=4, K=2, capacity_factor 0.5 -> C = ceil(0.5 * 2 * 8 / 4) = 2 slots per expert.
# Routing is forced: the router reads x[:, :4] (W_router = [I_4; 0]) and x[t, top1] = 2, x[t, top2] = 1.
#   token:      0      1      2      3      4      5      6      7
#   (top1,top2) (0,1)  (0,1)  (1,0)  (2,3)  (2,3)  (2,3)  (1,2)  (3,0)
# Pass 1, top-1 choices in token order: e0 <- t0, t1 (full); e1 <- t2, t6 (full); e2 <- t3, t4 (full),
#   t5 dropped; e3 <- t7.
# Pass 2, top-2 choices: t0->e1, t1->e1 full: dropped; t2->e0 full: dropped; t3->e3 kept (2nd slot);
#   t4->e3, t5->e3 full: dropped; t6->e2 full: dropped; t7->e0 full: dropped.
# Kept: 7 top-1 + 1 top-2 = 8 of 16 choices -> drop fraction 0.5. Token 5 lost both choices: MoE output 0.
# Priority: t6's top-1 (e1) keeps its slot although t0 and t1, earlier tokens, also wanted e1 as top-2;
# a token-major order would have given e1 to t0, t1 and dropped t2 and t6 instead.
# The causal (token-major) policy hands out (t0: e0, e1), (t1: e0, e1), (t2: e1, e0), ...: t0 and t1 fill e0
# and e1, t3 and t4 fill e2 and e3, and t2, t5, t6, t7 lose both choices (also 8 of 16 kept). The probability
# policy equals the position policy here: every top-1 gate is e^2 / (e^2 + e), every top-2 gate e / (e^2 + e).
ROUTES = [(0, 1), (0, 1), (1, 0), (2, 3), (2, 3), (2, 3), (1, 2), (3, 0)]
KEPT = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [1, 0], [0, 0], [1, 0], [1, 0]], bool)
KEPT_CAUSAL = np.array([[1, 1], [1, 1], [0, 0], [1, 1], [1, 1], [0, 0], [0, 0], [0, 0]], bool)


def worked_example():
    x = np.array(inputs(7, (1, 8, DM)))
    x[0, :, :4] = 0.0
    for t, (a, b) in enumerate(ROUTES):
        x[0, t, a], x[0, t, b] = 2.0, 1.0
    cfg = moe_cfg(dispatch="capacity", capacity_factor=0.5, drop_policy="position")
    layer = make_layer(cfg, seed=8)
    layer.w_router_DE[...] = jnp.concatenate([jnp.eye(4), jnp.zeros((DM - 4, 4))], axis=0)
    return layer, jnp.asarray(x)


def test_worked_example_slots_drops_and_outputs():
    layer, x = worked_example()
    assert dispatch_fns.capacity(8, E, K, 0.5, 1) == 2
    r = router.route(x[0, :, :4], K, renormalize=True)
    np.testing.assert_array_equal(r.experts_TK, np.array(ROUTES))
    slot_TK, kept_TK = dispatch_fns.assign_slots(r.experts_TK, E, 2, "position")
    np.testing.assert_array_equal(kept_TK, KEPT)
    np.testing.assert_array_equal(dispatch_fns.assign_slots(r.experts_TK, E, 2, "probability", r.gates_TK)[1], KEPT)
    slot_c, kept_c = dispatch_fns.assign_slots(r.experts_TK, E, 2, "causal")
    np.testing.assert_array_equal(kept_c, KEPT_CAUSAL)
    np.testing.assert_array_equal(slot_c, [[0, 2], [1, 3], [8, 8], [4, 6], [5, 7], [8, 8], [8, 8], [8, 8]])
    # slot = expert * C + position; dropped -> E * C = 8
    np.testing.assert_array_equal(slot_TK, [[0, 8], [1, 8], [2, 8], [4, 7], [5, 8], [8, 8], [3, 8], [6, 8]])

    y, aux = call(layer, x)
    assert float(aux["drop_fraction"]) == 0.5
    np.testing.assert_array_equal(y[0, 5], np.zeros(DM))  # token 5 lost both choices: exactly zero
    # Every other token: its kept choices only, gates from the softmax of (2, 1, 0, 0) renormalised over K.
    p = np.exp([2.0, 1.0]) / np.exp([2.0, 1.0]).sum()  # gates of (top1, top2)
    params = weights_of(layer)
    for t in (0, 1, 2, 3, 4, 6, 7):
        expect = sum(p[j] * expert_ffn(x[0, t], params["w_gate_EDF"][e], params["w_up_EDF"][e],
                                       params["w_down_EFD"][e], "geglu")
                     for j, e in enumerate(ROUTES[t]) if KEPT[t, j])
        np.testing.assert_allclose(y[0, t], expect, rtol=TOL, atol=TOL)
    # The loop reference applies the same rule.
    for policy, expect in (("position", KEPT), ("probability", KEPT), ("causal", KEPT_CAUSAL)):
        _, kept = reference_routing(x, params["w_router_DE"], K, cap=2, policy=policy)
        np.testing.assert_array_equal(kept[0], expect)


def test_token_with_every_choice_dropped_outputs_its_residual():
    # C = min_capacity = 1 slot per expert for 16 tokens x 2 choices: at most 4 choices kept per sequence.
    cfg = moe_cfg(dispatch="capacity", capacity_factor=0.01, min_capacity=1, num_layers=1)
    layer = Layer(cfg, is_moe=True, rngs=nnx.Rngs(0))
    layer.ffn.w_router_DE[...] = jax.random.normal(jax.random.key(9), (DM, E))
    x = inputs(10)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.ones((B, T), jnp.int32)

    @nnx.jit
    def run(layer, x):
        out, aux = layer(x, pos, seg, train=True, rng=None)
        x_mid = x + layer.attn(layer.attn_norm(x), pos, seg)  # residual stream entering the FFN sub-layer
        logits = jnp.einsum("BTD,DE->BTE", layer.ffn_norm(x_mid), layer.ffn.w_router_DE[...])
        kept = jax.vmap(lambda lg: dispatch_fns.assign_slots(router.route(lg, K, True).experts_TK, E, 1)[1])(logits)
        return out, aux, x_mid, kept

    out, aux, x_mid, kept = run(layer, x)
    fully_dropped = ~np.asarray(kept).any(-1)
    assert fully_dropped.sum() >= 2 * (T - 4)
    np.testing.assert_array_equal(np.asarray(out)[fully_dropped], np.asarray(x_mid)[fully_dropped])
    assert not np.allclose(np.asarray(out)[~fully_dropped], np.asarray(x_mid)[~fully_dropped], atol=1e-3)
    np.testing.assert_allclose(aux["drop_fraction"], 1 - np.asarray(kept).mean(), rtol=TOL)


# --- special expert counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_one_expert_top1_equals_dense_ffn(dispatch):
    cfg = moe_cfg(num_experts=1, top_k=1, dispatch=dispatch, capacity_factor=1.0)
    layer = make_layer(cfg)
    dense = FFN(DM, F, "geglu", jnp.float32, nnx.Rngs(1))
    dense.w_gate_DF[...] = layer.w_gate_EDF[...][0]
    dense.w_up_DF[...] = layer.w_up_EDF[...][0]
    dense.w_down_FD[...] = layer.w_down_EFD[...][0]
    x = inputs()
    y, aux = call(layer, x)
    np.testing.assert_allclose(y, nnx.jit(lambda m, xx: m(xx))(dense, x), rtol=TOL, atol=TOL)
    assert float(aux["drop_fraction"]) == 0.0


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("e,k", [(1, 1), (4, 4)])
def test_e1_and_k_equals_e_match_reference(dispatch, e, k):
    # k = E: every token uses every expert once, so C = ceil(1.0 * E * T / E) = T and nothing drops.
    cfg = moe_cfg(num_experts=e, top_k=k, dispatch=dispatch, capacity_factor=1.0)
    layer = make_layer(cfg, seed=e + k)
    params, x = weights_of(layer), inputs(11)
    choices, kept = reference_routing(x, params["w_router_DE"], k, cap=None)
    y, aux = call(layer, x)
    np.testing.assert_allclose(y, jax.jit(lambda p, xx: reference_moe(xx, p, choices, kept, renormalize=True))(params, x), rtol=TOL, atol=TOL)
    assert float(aux["drop_fraction"]) == 0.0
    np.testing.assert_allclose(aux["expert_load"], np.full(e, 1.0 / e), rtol=TOL)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_expert_receiving_no_tokens_has_zero_finite_grads(dispatch):
    # x[..., 0] = 1 and W_router[0, 3] = -50: expert 3's logit is ~50 below the others, never chosen.
    cfg = moe_cfg(dispatch=dispatch, capacity_factor=2.0)
    layer = make_layer(cfg)
    layer.w_router_DE[...] = layer.w_router_DE[...].at[0, 3].set(-50.0)
    x = inputs().at[..., 0].set(1.0)
    params = weights_of(layer)
    choices, _ = reference_routing(x, params["w_router_DE"], K, cap=None)
    assert 3 not in choices

    def loss(p, xx):
        y, aux = apply_with(layer, p, xx)
        return jnp.sum(y**2) + aux["aux_loss"] + aux["router_z_loss"]

    g_p, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for leaf in jax.tree.leaves((g_p, g_x)):
        assert np.isfinite(np.asarray(leaf)).all()
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        np.testing.assert_array_equal(g_p[name][3], 0.0)
        assert (np.asarray(jnp.abs(g_p[name][:3]).max(axis=(1, 2))) > 0).all()  # the used experts do learn
    y, aux = call(layer, x)
    assert float(aux["expert_load"][3]) == 0.0 and np.isfinite(np.asarray(y)).all()


# --- router: gates, aux loss, z-loss on hand examples --------------------------------------------------


def test_gates_renormalised_sum_to_one_else_raw_probs():
    logits = jax.random.normal(jax.random.key(0), (32, 8)) * 2
    probs = jax.nn.softmax(logits, axis=-1)
    r = router.route(logits, 3, renormalize=True)
    np.testing.assert_allclose(jnp.sum(r.gates_TK, -1), 1.0, rtol=TOL)
    raw = router.route(logits, 3, renormalize=False)
    np.testing.assert_array_equal(raw.experts_TK, r.experts_TK)
    np.testing.assert_allclose(raw.gates_TK, jnp.take_along_axis(probs, raw.experts_TK, -1), rtol=TOL)
    assert (np.asarray(jnp.sum(raw.gates_TK, -1)) < 1.0).all()
    np.testing.assert_allclose(r.gates_TK, raw.gates_TK / jnp.sum(raw.gates_TK, -1, keepdims=True), rtol=TOL)
    # column 0 is the most probable expert
    np.testing.assert_array_equal(r.experts_TK[:, 0], jnp.argmax(logits, -1))


def test_load_balance_loss_hand_example():
    # probs (E=2): t0 (.75, .25), t1 (.25, .75), t2 (.6, .4), t3 (.9, .1); P = mean = (.625, .375).
    probs = np.array([[0.75, 0.25], [0.25, 0.75], [0.6, 0.4], [0.9, 0.1]])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    # K=1: top-1 experts 0, 1, 0, 0 -> f = (3/4, 1/4); loss = 2 * (.75 * .625 + .25 * .375) = 1.125
    np.testing.assert_allclose(router.load_balance_loss(router.route(logits, 1, True)), 1.125, rtol=TOL)
    # K=2: every token picks both -> f = (1/2, 1/2); loss = 2 * (.5 * .625 + .5 * .375) = 1.0
    np.testing.assert_allclose(router.load_balance_loss(router.route(logits, 2, True)), 1.0, rtol=TOL)
    np.testing.assert_allclose(router.expert_fraction(router.route(logits, 1, True).experts_TK, 2), [0.75, 0.25], rtol=TOL)
    # f is a count (stop-gradient): d loss / d logits flows only through P.
    g = jax.grad(lambda lg: router.load_balance_loss(router.route(lg, 1, True)))(logits)
    p = jax.nn.softmax(logits)
    f = jnp.array([0.75, 0.25])
    expect = jax.grad(lambda lg: 2 * jnp.sum(f * jnp.mean(jax.nn.softmax(lg), 0)))(logits)
    np.testing.assert_allclose(g, expect, rtol=TOL, atol=TOL)
    assert p.shape == (4, 2)


def test_router_z_loss_hand_example():
    # t0 logits (0, 0): lse = ln 2; t1 (ln 3, 0): lse = ln 4 = 2 ln 2. mean of squares = 2.5 (ln 2)^2.
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]], jnp.float32)
    np.testing.assert_allclose(router.router_z_loss(router.route(logits, 1, True)), 2.5 * math.log(2.0) ** 2, rtol=TOL)


def test_layer_aux_equals_formulas_over_all_tokens():
    cfg = moe_cfg(dispatch="capacity", capacity_factor=2.0)
    layer = make_layer(cfg)
    x = inputs()
    _, aux = call(layer, x)
    logits = np.asarray(x, np.float64).reshape(B * T, DM) @ np.asarray(layer.w_router_DE[...], np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[:, :K]
    f = np.bincount(top.ravel(), minlength=E) / top.size
    np.testing.assert_allclose(aux["aux_loss"], E * np.sum(f * probs.mean(0)), rtol=TOL)
    np.testing.assert_allclose(aux["router_z_loss"], np.mean(np.log(np.exp(logits).sum(-1)) ** 2), rtol=TOL)
    np.testing.assert_allclose(aux["expert_load"], f, rtol=TOL)
    np.testing.assert_allclose(aux["router_entropy"], np.mean(-(probs * np.log(probs)).sum(-1)), rtol=TOL)
