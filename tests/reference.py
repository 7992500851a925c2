"""A plain per-token reference MoE FFN, written for clarity, not speed (the MaxText `MoeLoopBlock` idea).

Owns: nothing the model imports. Tests pin the fast dispatch paths of moe/model/experts/layer.py against it.

Two steps, so that gradients can be taken through the second:
  1. `reference_routing` decides, in numpy on concrete values, which experts each token chose and which of
     those (token, choice) pairs keep a capacity slot. Routing decisions are piecewise constant in the
     inputs, so fixing them does not change any gradient.
  2. `reference_moe` sums, for each token, gate * expert_FFN(x_t) over its kept choices with plain jnp ops,
     so `jax.grad` differentiates it w.r.t. x and every weight.

Capacity rule (GShard, Lepikhin et al. 2020 §2.2; GLaM): per sequence, each expert has `cap` slots; slots are
handed out first to all top-1 choices in token order, then to all top-2 choices in token order, and so on.
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


def reference_routing(x_BTD, w_router_DE, k: int, cap: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(choices_BTK, kept_BTK): expert ids by decreasing probability (ties: lower id first) and slot kept.

    cap=None means no capacity limit (the dropless rule).
    """
    x = np.asarray(x_BTD, np.float64)
    probs = _softmax(x @ np.asarray(w_router_DE, np.float64))
    b, t, e = probs.shape
    choices = np.zeros((b, t, k), np.int64)
    kept = np.zeros((b, t, k), bool)
    for bi in range(b):
        for ti in range(t):
            choices[bi, ti] = np.argsort(-probs[bi, ti], kind="stable")[:k]
        used = [0] * e  # slots taken per expert in this sequence
        for j in range(k):  # top-1 choices of every token first, then top-2 choices, ...
            for ti in range(t):
                ex = choices[bi, ti, j]
                if cap is None or used[ex] < cap:
                    kept[bi, ti, j] = True
                    used[ex] += 1
    return choices, kept


def gelu_tanh(x):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016), the form GLaM/T5 use."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def expert_ffn(x_D, w_gate_DF, w_up_DF, w_down_FD, act: str):
    """One expert on a token (or on a stack of tokens [..., D]): (act(x W_gate) * (x W_up)) W_down."""
    g = x_D @ w_gate_DF
    a = gelu_tanh(g) if act == "geglu" else g / (1.0 + jnp.exp(-g))
    return (a * (x_D @ w_up_DF)) @ w_down_FD


def reference_moe(x_BTD, params: dict, choices_BTK: np.ndarray, kept_BTK: np.ndarray, *, renormalize: bool,
                  act: str = "geglu"):
    """y[b, t] = sum over kept choices j of gate[b, t, j] * expert_{choice}(x[b, t]).

    params: w_router_DE, w_gate_EDF, w_up_EDF, w_down_EFD (the names of moe.model.experts.layer.MoEFFN).
    Gates are the softmax probabilities of the chosen experts, divided by their sum over the K choices when
    `renormalize` (GShard/GLaM); dropped choices keep their place in that sum (a drop does not re-weight).

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
    probs_BTE = jnp.exp(logits_BTE - jnp.max(logits_BTE, axis=-1, keepdims=True))
    probs_BTE = probs_BTE / jnp.sum(probs_BTE, axis=-1, keepdims=True)
    gates_BTK = jnp.take_along_axis(probs_BTE, jnp.asarray(choices_BTK), axis=-1)
    if renormalize:
        gates_BTK = gates_BTK / jnp.sum(gates_BTK, axis=-1, keepdims=True)
    weight_BTE = jnp.sum(gates_BTK[..., None] * pick_BTKE, axis=2)  # 0 for experts not chosen or dropped
    y_BTD = jnp.zeros_like(x_BTD)
    for ei in range(e):
        y_BTD = y_BTD + weight_BTE[..., ei:ei + 1] * expert_ffn(
            x_BTD, params["w_gate_EDF"][ei], params["w_up_EDF"][ei], params["w_down_EFD"][ei], act)
    return y_BTD
