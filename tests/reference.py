"""A plain per-token reference MoE FFN, written for clarity, not speed (the MaxText `MoeLoopBlock` idea).

Owns: nothing the model imports. Tests pin the fast dispatch paths of moe/model/experts/layer.py against it.

Two steps, so that gradients can be taken through the second:
  1. `reference_routing` decides, in numpy on concrete values, which experts each token chose and which of
     those (token, choice) pairs keep a capacity slot. Routing decisions are piecewise constant in the
     inputs, so fixing them does not change any gradient.
  2. `reference_moe` sums, for each token, gate * expert_FFN(x_t) over its kept choices with plain jnp ops,
     so `jax.grad` differentiates it w.r.t. x and every weight.

Routing rule: scores are softmax(x W_router) or sigmoid(x W_router); each token chooses the K experts with
the highest score + bias (ties: lower id first); gates are the chosen unbiased scores, divided by their sum
when `renormalize`, times `scale`.

Capacity rule: per sequence, each expert has `cap` slots, handed out in the order of the drop policy:
  causal      token by token, each token's choices in rank order: (t0, 1st), (t0, 2nd), (t1, 1st), ...
  position    (GShard, Lepikhin et al. 2020 §2.2; GLaM) all top-1 choices in token order, then all top-2, ...
  probability highest gate first, ties in the causal order.
A choice that finds its expert full is dropped (contributes nothing).

Shape key: B batch, T length, D model, F hidden, E experts, K top-k.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def _scores(logits, score: str) -> np.ndarray:
    return _softmax(logits) if score == "softmax" else 1.0 / (1.0 + np.exp(-logits))


def reference_routing(x_BTD, w_router_DE, k: int, cap: int | None, *, score: str = "softmax", bias_E=None,
                      policy: str = "causal", renormalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(choices_BTK, kept_BTK): expert ids by decreasing score + bias (ties: lower id first) and slot kept.

    cap=None means no capacity limit (the dropless rule).
    """
    x = np.asarray(x_BTD, np.float64)
    s = _scores(x @ np.asarray(w_router_DE, np.float64), score)
    select = s + (0.0 if bias_E is None else np.asarray(bias_E, np.float64))
    b, t, e = s.shape
    choices = np.zeros((b, t, k), np.int64)
    kept = np.zeros((b, t, k), bool)
    for bi in range(b):
        for ti in range(t):
            choices[bi, ti] = np.argsort(-select[bi, ti], kind="stable")[:k]
        if policy == "position":
            order = [(ti, j) for j in range(k) for ti in range(t)]
        else:
            order = [(ti, j) for ti in range(t) for j in range(k)]
        if policy == "probability":
            gates = s[bi, np.arange(t)[:, None], choices[bi]]
            if renormalize:
                gates = gates / gates.sum(-1, keepdims=True)
            order.sort(key=lambda tj: -gates[tj])  # stable: ties stay in the causal order
        used = [0] * e  # slots taken per expert in this sequence
        for ti, j in order:
            ex = choices[bi, ti, j]
            if cap is None or used[ex] < cap:
                kept[bi, ti, j] = True
                used[ex] += 1
    return choices, kept


def reference_balance_losses(x_BTD, w_router_DE, choices_BTK: np.ndarray, score: str = "softmax") -> dict:
    """The micro-batch and sequence balance losses `E * sum_i f_i P_i`, differentiable in x and W_router.

    f_i is counted by a loop over every (token, choice), kept or dropped; P_i is the mean of the scores
    normalised to sum 1 per token (softmax: the probabilities; sigmoid: the sigmoids over their sum).
    """
    b, t, k = choices_BTK.shape
    e = w_router_DE.shape[1]
    counts_BE = np.zeros((b, e))
    for bi in range(b):
        for ti in range(t):
            for j in range(k):
                counts_BE[bi, choices_BTK[bi, ti, j]] += 1
    logits = x_BTD @ w_router_DE
    s = jnp.exp(logits - jnp.max(logits, -1, keepdims=True)) if score == "softmax" else 1 / (1 + jnp.exp(-logits))
    p_BTE = s / jnp.sum(s, -1, keepdims=True)
    micro = e * jnp.sum(counts_BE.sum(0) / (b * t * k) * jnp.mean(p_BTE, axis=(0, 1)))
    seq = jnp.mean(e * jnp.sum(counts_BE / (t * k) * jnp.mean(p_BTE, axis=1), axis=-1))
    return {"aux_loss": micro, "seq_aux_loss": seq}


def gelu_tanh(x):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016), the form GLaM/T5 use."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def expert_ffn(x_D, w_gate_DF, w_up_DF, w_down_FD, act: str):
    """One expert on a token (or on a stack of tokens [..., D]): (act(x W_gate) * (x W_up)) W_down."""
    g = x_D @ w_gate_DF
    a = gelu_tanh(g) if act == "geglu" else g / (1.0 + jnp.exp(-g))
    return (a * (x_D @ w_up_DF)) @ w_down_FD


def reference_moe(x_BTD, params: dict, choices_BTK: np.ndarray, kept_BTK: np.ndarray, *, renormalize: bool,
                  act: str = "geglu", score: str = "softmax", scale: float = 1.0):
    """y[b, t] = sum over kept choices j of gate[b, t, j] * expert_{choice}(x[b, t]).

    params: w_router_DE, w_gate_EDF, w_up_EDF, w_down_EFD (the names of moe.model.experts.layer.MoEFFN).
    Gates are the scores of the chosen experts, divided by their sum over the K choices when `renormalize`
    (GShard/GLaM), times `scale`; dropped choices keep their place in that sum (a drop does not re-weight).

    For speed under `jit` (an unrolled B*T*K loop of tiny ops compiles for minutes) the loop over tokens and
    choices fills a numpy table `pick_BTKE` (1 where token t's j-th choice is expert e and kept), and each
    expert is then applied densely to every token and weighted by its gate: a different computation from the
    index gather/scatter and the ragged_dot under test, with no slots, sorting or capacity buffers.
    """
    b, t, k = choices_BTK.shape
    e = params["w_router_DE"].shape[1]
    pick_BTKE = np.zeros((b, t, k, e), np.float32)
    for bi in range(b):
        for ti in range(t):
            for j in range(k):
                if kept_BTK[bi, ti, j]:
                    pick_BTKE[bi, ti, j, choices_BTK[bi, ti, j]] = 1.0
    logits_BTE = x_BTD @ params["w_router_DE"]
    if score == "softmax":
        s_BTE = jnp.exp(logits_BTE - jnp.max(logits_BTE, axis=-1, keepdims=True))
        s_BTE = s_BTE / jnp.sum(s_BTE, axis=-1, keepdims=True)
    else:
        s_BTE = 1.0 / (1.0 + jnp.exp(-logits_BTE))
    gates_BTK = jnp.take_along_axis(s_BTE, jnp.asarray(choices_BTK), axis=-1)
    if renormalize:
        gates_BTK = gates_BTK / jnp.sum(gates_BTK, axis=-1, keepdims=True)
    gates_BTK = gates_BTK * scale
    weight_BTE = jnp.sum(gates_BTK[..., None] * pick_BTKE, axis=2)  # 0 for experts not chosen or dropped
    y_BTD = jnp.zeros_like(x_BTD)
    for ei in range(e):
        y_BTD = y_BTD + weight_BTE[..., ei:ei + 1] * expert_ffn(
            x_BTD, params["w_gate_EDF"][ei], params["w_up_EDF"][ei], params["w_down_EFD"][ei], act)
    return y_BTD
