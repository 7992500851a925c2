"""Routing options end to end (moe/model/experts/router.py, moe/train/steps.py): hand-computed balance losses
and bias update, sigmoid gates, the router bias kept out of the gradient and the optimizer, grad_accum = 2
equal to the doubled batch, and a sharded run equal to the single-device run with the bias on. fp32, 1e-5.

The loop-reference pinning of each score x policy x bias lives in tests/test_moe.py; causality with drops in
tests/test_model.py; kill -9 and resume with the bias on in tests/test_faults.py (its runs use the bias).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.config import load_config
from moe.model.decoder import loss_fn
from moe.model.experts import router
from moe.runtime.sharding import make_mesh
from moe.train import steps as train_steps
from tests.test_sharding import MESHES, SMALL, _batch, _max_rel, _train

TOL = 1e-5
BIAS = ["model.router_bias_update_rate=1e-3", "model.global_aux_loss_weight=0.01", "model.seq_aux_loss_weight=1e-4",
        "optim.name=lion", "optim.weight_decay=0.5", "optim.lr=1e-3"]


# --- hand-computed examples -------------------------------------------------------------------------


def test_sequence_and_micro_batch_losses_hand_example():
    # E=2, K=1, B=2, T=2. Sequence 0 chooses (0, 0) with probs (.9, .1), (.7, .3): f = (1, 0), P = (.8, .2)
    # -> 2 * .8 = 1.6. Sequence 1 chooses (0, 1) with (.6, .4), (.2, .8): f = (.5, .5), P = (.4, .6) -> 1.0.
    # Sequence loss = mean = 1.3. Over all four tokens: f = (.75, .25), P = (.6, .4) -> 2 * (.45 + .1) = 1.1.
    experts = jnp.array([[[0], [0]], [[0], [1]]], jnp.int32)
    probs = jnp.array([[[0.9, 0.1], [0.7, 0.3]], [[0.6, 0.4], [0.2, 0.8]]], jnp.float32)
    np.testing.assert_allclose(router.sequence_balance_loss(experts, probs), 1.3, rtol=TOL)
    r = router.route(jnp.log(probs.reshape(4, 2)), 1, True)
    np.testing.assert_array_equal(r.experts_TK[:, 0], [0, 0, 0, 1])
    np.testing.assert_allclose(router.load_balance_loss(r), 1.1, rtol=TOL)


def test_global_loss_counts_earlier_micro_batches_hand_example():
    # This micro-batch: counts (1, 3), P = (.6, .4). Alone: f = (.25, .75) -> 2 * (.15 + .3) = 0.9.
    # With an earlier micro-batch's counts (3, 1): f = (4, 4) / 8 -> 2 * (.3 + .2) = 1.0.
    counts, probs = jnp.array([[1.0, 3.0]]), jnp.array([[0.6, 0.4]])
    np.testing.assert_allclose(router.global_balance_loss(counts, jnp.zeros_like(counts), probs), [0.9], rtol=TOL)
    np.testing.assert_allclose(router.global_balance_loss(counts, jnp.array([[3.0, 1.0]]), probs), [1.0], rtol=TOL)
    # f is a constant: the gradient flows through P only, d/dP = E * f
    g = jax.grad(lambda p: router.global_balance_loss(counts, jnp.zeros_like(counts), p)[0])(probs)
    np.testing.assert_allclose(g, [[0.5, 1.5]], rtol=TOL)


def test_bias_update_and_imbalance_hand_example():
    # counts (4, 2, 1, 1): mean 2 -> sign(mean - load) = (-1, 0, +1, +1); max/mean = 2.
    counts = jnp.array([[4.0, 2.0, 1.0, 1.0]])
    new = router.update_bias(jnp.array([[0.5, 0.0, 0.0, -0.5]]), counts, 0.01)
    np.testing.assert_allclose(new, [[0.49, 0.0, 0.01, -0.49]], rtol=TOL)
    np.testing.assert_allclose(router.load_imbalance(counts), [2.0], rtol=TOL)


def test_sigmoid_gates_and_the_bias_selects_only():
    # logits (2, 0, -1): sigmoid (.881, .5, .269). Top-2 = experts 0, 1; renormalised x 2.5.
    logits = jnp.array([[2.0, 0.0, -1.0]])
    s = jax.nn.sigmoid(logits)[0]
    r = router.route(logits, 2, True, score="sigmoid", scale=2.5)
    np.testing.assert_array_equal(r.experts_TK, [[0, 1]])
    np.testing.assert_allclose(r.gates_TK, [[2.5 * s[0] / (s[0] + s[1]), 2.5 * s[1] / (s[0] + s[1])]], rtol=TOL)
    np.testing.assert_allclose(r.probs_TE, (s / s.sum())[None], rtol=TOL)
    # a bias of +0.5 on expert 2 makes it beat expert 1 (.769 > .5) for selection; its gate is its raw score
    rb = router.route(logits, 2, True, score="sigmoid", scale=2.5, bias_E=jnp.array([0.0, 0.0, 0.5]))
    np.testing.assert_array_equal(rb.experts_TK, [[0, 2]])
    np.testing.assert_allclose(rb.gates_TK, [[2.5 * s[0] / (s[0] + s[2]), 2.5 * s[2] / (s[0] + s[2])]], rtol=TOL)
    assert bool(rb.changed_T[0]) and not bool(r.changed_T[0])
    # the bias gets no gradient through the gates
    g = jax.grad(lambda b: jnp.sum(router.route(logits, 2, True, score="sigmoid", bias_E=b).gates_TK ** 2))(
        jnp.array([0.0, 0.0, 0.5]))
    np.testing.assert_array_equal(g, 0.0)


# --- the bias in the train step -----------------------------------------------------------------------


def _setup(overrides, devices=None):
    cfg = load_config("configs/tiny.yaml", SMALL + overrides)
    return train_steps.build(cfg, make_mesh(cfg.mesh, devices))


def test_bias_gets_no_gradient_and_only_the_update_rule_moves_it():
    setup = _setup(BIAS + ["mesh.data=1"], jax.devices()[:1])
    state = train_steps.init_state(setup)
    state["params"] = jax.tree_util.tree_map_with_path(  # a non-zero bias, so that weight decay would show
        lambda p, a: a + 0.1 if train_steps.BIAS_KEY in str(p) else a, state["params"])
    trainable, biases = train_steps.split_bias(jax.device_get(state["params"]))
    (bias_before,) = jax.tree.leaves(biases)
    assert bias_before.shape == (1, 8)  # [MoE layers, E]
    batch = train_steps.device_batch(setup, _batch(0))

    def loss(params):
        return loss_fn(nnx.merge(setup.graphdef, params), batch, train=True)

    g = jax.jit(jax.grad(lambda p: loss(p)[0]))(state["params"])
    np.testing.assert_array_equal(jax.tree.leaves(train_steps.split_bias(g)[1])[0], 0.0)
    counts = jax.jit(lambda p: loss(p)[1]["expert_counts"])(state["params"])

    new_state, m = train_steps.make_train_step(setup)(state, batch)
    (bias_after,) = jax.tree.leaves(train_steps.split_bias(jax.device_get(new_state["params"]))[1])
    expect = bias_before + 1e-3 * np.sign(np.mean(np.asarray(counts), -1, keepdims=True) - np.asarray(counts))
    np.testing.assert_array_equal(bias_after, np.asarray(expect, np.float32))  # no decay, no optimizer update
    assert np.any(bias_after != bias_before)
    np.testing.assert_allclose(m["router_bias_norm"], np.linalg.norm(bias_after), rtol=TOL)
    np.testing.assert_allclose(m["load_imbalance"], np.max(counts, -1) / np.mean(counts, -1), rtol=TOL)
    assert "router_bias_E" not in str(jax.tree_util.tree_structure(new_state["opt_state"]))


def test_grad_accum_two_updates_the_bias_like_the_doubled_batch():
    runs = {}
    batch = _batch(0)
    for accum in (1, 2):
        setup = _setup(BIAS + ["mesh.data=1", f"optim.grad_accum={accum}"], jax.devices()[:1])
        state = train_steps.init_state(setup)
        runs[accum] = (setup,) + train_steps.make_train_step(setup)(state, train_steps.device_batch(setup, batch))
    biases = [jax.tree.leaves(train_steps.split_bias(jax.device_get(runs[a][1]["params"]))[1])[0] for a in (1, 2)]
    np.testing.assert_array_equal(biases[0], biases[1])  # counts are integers: summed exactly
    assert np.any(biases[0] != 0)
    np.testing.assert_array_equal(runs[1][2]["load_imbalance"], runs[2][2]["load_imbalance"])
    # one micro-batch: the global-batch loss is the micro-batch loss
    np.testing.assert_allclose(runs[1][2]["global_aux_loss"], runs[1][2]["aux_loss"], rtol=TOL)
    # two: the second micro-batch's f counts the first one's assignments too (the running buffer)
    setup = runs[1][0]
    params = train_steps.init_state(setup)["params"]  # the step donated its state
    halves = [train_steps.device_batch(setup, {k: v[i * 4:(i + 1) * 4] for k, v in batch.items()}) for i in (0, 1)]
    micro = jax.jit(lambda p, b, c: loss_fn(nnx.merge(setup.graphdef, p), b, train=True, prior_counts=c)[1])
    m1 = micro(params, halves[0], None)
    m2 = micro(params, halves[1], m1["expert_counts"])
    np.testing.assert_allclose(runs[2][2]["global_aux_loss"], (m1["global_aux_loss"] + m2["global_aux_loss"]) / 2,
                               rtol=TOL)
    assert abs(float(m2["global_aux_loss"] - m2["aux_loss"])) > 1e-6  # the prior counts did change it


def test_sharded_run_with_the_bias_equals_single_device():
    _, single, single_losses = _train(BIAS + ["mesh.data=1"], steps=3, devices=jax.devices()[:1])
    setup, sharded, losses = _train(BIAS + MESHES["d2f2e2"], steps=3)
    np.testing.assert_allclose(losses, single_losses, rtol=TOL)
    assert _max_rel(jax.device_get(single["params"]), jax.device_get(sharded["params"])) < TOL
    bias = [jax.tree.leaves(train_steps.split_bias(jax.device_get(s["params"]))[1])[0] for s in (single, sharded)]
    np.testing.assert_array_equal(bias[0], bias[1])
    assert np.any(bias[0] != 0)
    (leaf,) = jax.tree.leaves(train_steps.split_bias(sharded["params"])[1])
    assert leaf.sharding.is_fully_replicated
