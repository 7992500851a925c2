"""Our model config and parameter tree <-> a Hugging Face architecture's config.json and tensor names.

Owns: which HF class represents a config exactly (`choose_arch`), the config.json it gets (`hf_config`), and
the name, shape, place and layout of every tensor (`tensors`, read by export and import alike). Must not read or write files (moe/hf/export.py does).

The decoder computes the same function as these classes (facts read from transformers' source and pinned by
tests/test_hf.py against transformers itself):
  - RMSNorm x * rsqrt(mean(x^2) + eps) * weight; RoPE rotate-half; q/k RMSNorm per head before RoPE;
  - gated FFN act(x W_gate) * (x W_up) W_down: our geglu is `gelu_pytorch_tanh` (jax.nn.gelu's tanh form),
    swiglu is `silu`; experts and dense layers have the same width (intermediate_size = moe_intermediate_size);
  - router softmax over experts -> top-k -> renormalised over the k iff `norm_topk_prob`.
Layer i of ours is MoE iff i % moe_every == 0. Qwen3-MoE / Qwen2-MoE make layer i sparse iff
`i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0`, so: decoder_sparse_step = 1 and
mlp_only_layers = our dense layers. Mixtral is all-MoE, no q/k norm, always renormalised.

| ours | qwen3_moe | qwen2_moe | mixtral | qwen3 / llama (dense) |
|---|---|---|---|---|
| q/k norm | required | absent | absent | qwen3: required; llama: absent |
| GLaM interleave | mlp_only_layers | mlp_only_layers | no (all MoE) | - |
| head_dim != D/H | yes | yes (`head_dim` in config.json) | yes | yes |
| shared experts (ungated) | no | no (its shared expert is sigmoid-gated) | no | - |
Sigmoid scores, a routed scaling factor != 1 and the aux-loss-free selection bias change the routing function;
no class here represents them, so they are errors naming the field, never a silently different model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from moe.config import ConfigError, ModelConfig, is_moe

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "qwen3", "llama")
CLASS = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
ACT = {"geglu": "gelu_pytorch_tanh", "swiglu": "silu"}


class HFError(ConfigError):
    """A config or checkpoint no HF class represents exactly, or a bad HF directory: one line, exit 2."""


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.d_model // m.num_heads


def kv_heads(m: ModelConfig) -> int:
    return m.num_kv_heads or m.num_heads


def moe_layers(m: ModelConfig) -> list[int]:
    return [i for i in range(m.num_layers) if is_moe(m) and i % m.moe_every == 0]


def _why_not(m: ModelConfig, arch: str) -> str | None:
    """Why `arch` cannot represent `m` exactly (the field and the fix), or None if it can."""
    moe = is_moe(m)
    if moe and m.num_shared_experts:
        return (f"model.num_shared_experts={m.num_shared_experts}: our shared experts are ungated; no HF class "
                "here has that (Qwen2-MoE gates its shared expert with a sigmoid)")
    if moe and m.router_score != "softmax":
        return f"model.router_score={m.router_score}: the HF classes here route with a softmax"
    if moe and m.routed_scaling_factor != 1.0:
        return f"model.routed_scaling_factor={m.routed_scaling_factor}: the HF classes here do not scale the gates"
    if moe and m.router_bias_update_rate > 0:
        return ("model.router_bias_update_rate > 0: the selection bias changes which experts are chosen; the HF "
                "classes here have no such bias")
    if arch in ("qwen3", "llama"):
        if moe:
            return f"{arch} is a dense class; the model has {m.num_experts} experts"
        if (arch == "qwen3") != m.qk_norm:
            return f"model.qk_norm={m.qk_norm}: {arch} " + ("always has" if arch == "qwen3" else "has no") + " q/k norm"
        return None
    if not moe:
        return f"{arch} is a mixture-of-experts class; the model is dense (model.num_experts=0 or moe_every=0)"
    if arch == "qwen3_moe" and not m.qk_norm:
        return "model.qk_norm=false: Qwen3-MoE always has q/k norm"
    if arch in ("qwen2_moe", "mixtral") and m.qk_norm:
        return f"model.qk_norm=true: {arch} has no q/k norm"
    if arch == "mixtral":
        if m.moe_every != 1:
            return f"model.moe_every={m.moe_every}: every Mixtral layer is MoE (moe_every=1)"
        if not m.renormalize_gates:
            return "model.renormalize_gates=false: Mixtral always renormalises the top-k gates"
        if m.ffn_act != "swiglu":
            return f"model.ffn_act={m.ffn_act}: Mixtral is swiglu (silu)"
    return None


def choose_arch(m: ModelConfig, arch: str = "auto") -> str:
    """The HF architecture that represents `m` exactly: `arch` itself (checked), or with "auto" the first of
    mixtral, qwen3_moe, qwen2_moe (MoE) / qwen3, llama (dense) that does. HFError names the field otherwise."""
    if arch != "auto":
        if arch not in ARCHS:
            raise HFError(f"--arch {arch}: choose auto or one of {', '.join(ARCHS)}")
        why = _why_not(m, arch)
        if why:
            raise HFError(f"cannot export as {arch}: {why}")
        return arch
    order = ("mixtral", "qwen3_moe", "qwen2_moe") if is_moe(m) else ("qwen3", "llama")
    reasons = {a: _why_not(m, a) for a in order}
    for a in order:
        if reasons[a] is None:
            return a
    raise HFError("no HF class represents this model exactly: " + "; ".join(f"{a}: {r}" for a, r in reasons.items()))


def hf_config(m: ModelConfig, arch: str, *, max_positions: int, dtype: str) -> dict[str, Any]:
    """config.json for `arch` (already checked by choose_arch)."""
    out: dict[str, Any] = {
        "architectures": [CLASS[arch]], "model_type": arch, "vocab_size": m.vocab_size, "hidden_size": m.d_model,
        "intermediate_size": m.d_ff, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": kv_heads(m), "head_dim": head_dim(m), "hidden_act": ACT[m.ffn_act],
        "max_position_embeddings": max_positions, "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": m.init_std, "use_cache": True,
        "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,  # our SentencePiece ids; export.py sets the run's
        "dtype": dtype, "torch_dtype": dtype,
    }
    if arch in ("qwen3_moe", "qwen2_moe"):
        dense = [i for i in range(m.num_layers) if i not in moe_layers(m)]
        out.update(moe_intermediate_size=m.d_ff, num_experts=m.num_experts, num_experts_per_tok=m.top_k,
                   decoder_sparse_step=1, mlp_only_layers=dense, norm_topk_prob=m.renormalize_gates,
                   router_aux_loss_coef=m.aux_loss_weight, output_router_logits=False, use_sliding_window=False,
                   sliding_window=None, max_window_layers=m.num_layers)
    if arch == "qwen2_moe":
        out.update(shared_expert_intermediate_size=0, qkv_bias=False)
    if arch == "mixtral":
        out.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_weight,
                   output_router_logits=False, router_jitter_noise=0.0, sliding_window=None)
    if arch in ("qwen3", "llama"):
        out.update(mlp_bias=False, use_sliding_window=False, sliding_window=None)
    return out


@dataclass(frozen=True)
class Tensor:
    """One HF tensor: its name and shape, where it lives in our params (the leaf path and the index into a leaf
    stacked over blocks / experts; leaf None: a zero-width tensor the HF class always has), and the layout
    change each way. Export and import both read this one table (`tensors`)."""

    name: str
    shape: tuple[int, ...]
    leaf: tuple | None
    index: tuple[int, ...] = ()
    to_hf: Callable[[np.ndarray], np.ndarray] = lambda a: a
    from_hf: Callable[[np.ndarray], np.ndarray] = lambda a: a


def _t(a: np.ndarray) -> np.ndarray:
    return a.T


def tensors(m: ModelConfig, arch: str) -> list[Tensor]:
    """Every tensor of the HF checkpoint of `m` as `arch`, in file order."""
    from moe.config import block_size

    bs = block_size(m)
    n, k, h, d, f, v, e = m.num_heads, kv_heads(m), head_dim(m), m.d_model, m.d_ff, m.vocab_size, m.num_experts

    def heads(num: int) -> dict:  # our [D, heads, H] <-> HF [heads * H, D]
        return dict(to_hf=lambda w: w.reshape(d, num * h).T, from_hf=lambda w: w.T.reshape(d, num, h))

    out = [Tensor("model.embed_tokens.weight", (v, d), ("embed", "table_VD"))]
    for i in range(m.num_layers):
        g, j = divmod(i, bs)
        lay, pre = ("blocks", "layers", j), f"model.layers.{i}."
        attn = (*lay, "attn")
        out += [Tensor(pre + "self_attn.q_proj.weight", (n * h, d), (*attn, "wq_DNH"), (g,), **heads(n)),
                Tensor(pre + "self_attn.k_proj.weight", (k * h, d), (*attn, "wk_DKH"), (g,), **heads(k)),
                Tensor(pre + "self_attn.v_proj.weight", (k * h, d), (*attn, "wv_DKH"), (g,), **heads(k)),
                Tensor(pre + "self_attn.o_proj.weight", (d, n * h), (*attn, "wo_NHD"), (g,),
                       to_hf=lambda w: w.reshape(n * h, d).T, from_hf=lambda w: w.T.reshape(n, h, d))]
        if m.qk_norm:
            out += [Tensor(pre + f"self_attn.{q}_norm.weight", (h,), (*attn, f"{q}_norm", "scale"), (g,)) for q in "qk"]
        out += [Tensor(pre + "input_layernorm.weight", (d,), (*lay, "attn_norm", "scale"), (g,)),
                Tensor(pre + "post_attention_layernorm.weight", (d,), (*lay, "ffn_norm", "scale"), (g,))]
        ffn = (*lay, "ffn")
        if i in moe_layers(m):
            moe = pre + ("block_sparse_moe." if arch == "mixtral" else "mlp.")
            names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            out.append(Tensor(moe + "gate.weight", (e, d), (*ffn, "w_router_DE"), (g,), _t, _t))
            for x in range(e):
                for name, key, shape in zip(names, ("w_gate_EDF", "w_up_EDF", "w_down_EFD"), ((f, d), (f, d), (d, f))):
                    out.append(Tensor(f"{moe}experts.{x}.{name}.weight", shape, (*ffn, key), (g, x), _t, _t))
            if arch == "qwen2_moe":  # its always-present shared expert, of width 0: it adds nothing
                out += [Tensor(moe + "shared_expert.gate_proj.weight", (0, d), None),
                        Tensor(moe + "shared_expert.up_proj.weight", (0, d), None),
                        Tensor(moe + "shared_expert.down_proj.weight", (d, 0), None),
                        Tensor(moe + "shared_expert_gate.weight", (1, d), None)]
        else:
            for name, key, shape in (("gate_proj", "w_gate_DF", (f, d)), ("up_proj", "w_up_DF", (f, d)),
                                     ("down_proj", "w_down_FD", (d, f))):
                out.append(Tensor(f"{pre}mlp.{name}.weight", shape, (*ffn, key), (g,), _t, _t))
    out.append(Tensor("model.norm.weight", (d,), ("final_norm", "scale")))
    if not m.tie_embeddings:
        out.append(Tensor("lm_head.weight", (v, d), ("head_DV",), (), _t, _t))
    return out


def hf_tensors(m: ModelConfig, arch: str, params: dict) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(HF tensor name, a function giving its fp32 array) in file order. Each getter reads one slice of our
    (possibly sharded, stacked-over-blocks) params, so at most one tensor sits on the host."""

    def get(t: Tensor) -> Callable[[], np.ndarray]:
        if t.leaf is None:
            return lambda: np.zeros(t.shape, np.float32)
        leaf = params
        for key in t.leaf:
            leaf = leaf[key]
        return lambda: np.ascontiguousarray(t.to_hf(np.asarray(leaf[t.index] if t.index else leaf, np.float32)))

    for t in tensors(m, arch):
        yield t.name, get(t)
