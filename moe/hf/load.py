"""Load a Hugging Face checkpoint folder (Qwen3-MoE, Qwen2-MoE, Mixtral, Qwen3, Llama) as our model: its
config.json -> our model config, its safetensors -> our params placed on the mesh.

Owns: reading HF folders (the inverse of moe/hf/export.py, with the names of moe/hf/mapping.py). Anything of
the HF config that our decoder does not compute exactly (attention or qkv biases, a sigmoid-gated shared
expert, sliding windows, RoPE scaling, sparse layers that are not the first of each group) is an HFError
naming the field.

Tensors are read lazily (`safe_open`) one of our leaves at a time: a leaf stacked over blocks is assembled on
the host and put straight onto its shards, so the host holds one leaf, never the whole model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from moe.config import ModelConfig
from moe.hf import mapping
from moe.hf.mapping import ACT, HFError

MODEL_TYPES = {"qwen3_moe", "qwen2_moe", "mixtral", "qwen3", "llama"}


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise HFError(f"'{path}' not found: '{folder}' is not a Hugging Face model folder") from None
    except ValueError as e:
        raise HFError(f"'{path}' is not JSON ({e})") from None


def _moe_every(hf: dict, n: int) -> int:
    """Our moe_every for an HF sparse-layer layout, or HFError: ours are the first layer of each group."""
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    sparse = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    if not sparse:
        return 0
    for every in range(1, n + 1):
        if n % every == 0 and sparse == list(range(0, n, every)):
            return every
    raise HFError(f"config.json: sparse layers {sparse} (decoder_sparse_step={step}, mlp_only_layers="
                  f"{sorted(dense)}) are not every k-th layer starting at layer 0, the only layout our decoder has")


def model_overrides(hf: dict) -> dict[str, Any]:
    """config.json -> the `model.*` values of our config that compute the same function."""
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise HFError(f"config.json: model_type {mt!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}")
    act = {v: k for k, v in ACT.items()}.get(hf.get("hidden_act"))
    if act is None:
        raise HFError(f"config.json: hidden_act {hf.get('hidden_act')!r}: our FFN is gelu_pytorch_tanh or silu")
    for key in ("attention_bias", "qkv_bias", "mlp_bias"):
        if hf.get(key, mt == "qwen2_moe" and key == "qkv_bias"):
            raise HFError(f"config.json: {key}=true: our attention and FFN have no biases")
    if hf.get("use_sliding_window") or (mt == "mixtral" and hf.get("sliding_window")):
        raise HFError("config.json: sliding-window attention is not supported (our attention is full causal)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFError(f"config.json: RoPE type {rope.get('rope_type', rope.get('type'))!r}: only the default RoPE")
    n_layers, d, heads = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    out: dict[str, Any] = {
        "vocab_size": hf["vocab_size"], "d_model": d, "num_layers": n_layers, "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": hf.get("head_dim") or d // heads,
        "d_ff": hf["intermediate_size"], "ffn_act": act, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qk_norm": mt in ("qwen3_moe", "qwen3"), "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "num_shared_experts": 0,
        "router_score": "softmax", "routed_scaling_factor": 1.0, "router_bias_update_rate": 0.0,
    }
    if mt in ("qwen3", "llama"):
        out.update(num_experts=0, moe_every=0)
        return out
    if mt == "mixtral":
        out.update(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], moe_every=1,
                   renormalize_gates=True)
        return out
    if mt == "qwen2_moe" and hf.get("shared_expert_intermediate_size", 0):
        raise HFError(f"config.json: shared_expert_intermediate_size={hf['shared_expert_intermediate_size']}: "
                      "Qwen2-MoE's shared expert is sigmoid-gated; ours are not")
    every = _moe_every(hf, n_layers)
    moe_ff = hf.get("moe_intermediate_size", hf["intermediate_size"])
    if every != 1 and moe_ff != hf["intermediate_size"]:
        raise HFError(f"config.json: moe_intermediate_size={moe_ff} != intermediate_size={hf['intermediate_size']}: "
                      "our experts and dense layers have one width (model.d_ff)")
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 writes num_local_experts
    out.update(num_experts=experts, top_k=hf["num_experts_per_tok"], moe_every=every, d_ff=moe_ff,
               renormalize_gates=bool(hf.get("norm_topk_prob", False)))
    return out


class Tensors:
    """The tensors of an HF folder (model.safetensors or an index of shards), opened lazily."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(folder, "model.safetensors")):
            weight_map = None
        else:
            raise HFError(f"'{folder}' has no model.safetensors nor model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise HFError(f"shard '{path}' (named by the index) is missing")
            try:
                self.handles[name] = safe_open(path, "np")
            except Exception as e:  # safetensors raises its own error types for a truncated header
                raise HFError(f"'{path}' is not a readable safetensors file ({e})") from None
        self.where = weight_map or {k: "model.safetensors" for k in self.handles["model.safetensors"].keys()}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.where:
            raise HFError(f"tensor '{name}' is missing from the checkpoint")
        try:
            a = self.handles[self.where[name]].get_tensor(name)
        except Exception as e:
            raise HFError(f"tensor '{name}' cannot be read from {self.where[name]} ({e}); the file is damaged") from None
        if tuple(a.shape) != tuple(shape):
            raise HFError(f"tensor '{name}' has shape {tuple(a.shape)}, the config implies {tuple(shape)}")
        return a.astype(np.float32)


def params_from_hf(m: ModelConfig, arch: str, tensors: Tensors, abstract_params: Any, shardings: Any) -> Any:
    """Our params (the structure of `abstract_params`), each leaf assembled from the HF tensors that
    mapping.tensors places in it and put on its sharding."""
    import jax

    targets: dict[tuple, list[mapping.Tensor]] = {}
    for t in mapping.tensors(m, arch):
        if t.leaf is not None:
            targets.setdefault(tuple(t.leaf), []).append(t)

    def leaf(key: tuple, abstract, sharding):
        if key not in targets:
            if key[-1] == "router_bias_E":  # no HF class has it: zeros (as a fresh run starts)
                return jax.device_put(np.zeros(abstract.shape, np.float32), sharding)
            raise HFError(f"no tensor of the checkpoint fills our parameter {'/'.join(map(str, key))}")
        buf = np.zeros(abstract.shape, np.float32)
        for t in targets[key]:
            buf[t.index] = t.from_hf(tensors.get(t.name, t.shape))
        return jax.device_put(buf.astype(abstract.dtype), sharding)

    flat_a, tree = jax.tree_util.tree_flatten_with_path(abstract_params)
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    assert len(flat_s) == len(flat_a), (len(flat_s), len(flat_a))
    keys = [tuple(getattr(p, "key", getattr(p, "idx", p)) for p in path) for path, _ in flat_a]
    return jax.tree_util.tree_unflatten(tree, [leaf(k, a, s) for k, (_, a), s in zip(keys, flat_a, flat_s)])


def matching_config(model: ModelConfig, folder: str) -> dict:
    """config.json of `folder`, checked to describe exactly `model` (train.init_from=hf:DIR needs the run's
    model to be the checkpoint's); HFError lists every differing key with the value to set."""
    hf = read_config(folder)
    want = model_overrides(hf)
    diffs = [f"model.{k}={v}" for k, v in want.items() if getattr(model, k) != v
             and not (k == "num_kv_heads" and mapping.kv_heads(model) == v)
             and not (k == "head_dim" and mapping.head_dim(model) == v)]
    if diffs:
        raise HFError(f"train.init_from=hf:{folder}: the run's model differs from the checkpoint's; set "
                      + " ".join(diffs) + " (python -m moe.hf import writes a config that matches)")
    return hf


def load_params(model: ModelConfig, folder: str, abstract_params: Any, shardings: Any) -> Any:
    """Our params from an HF folder whose config.json matches `model`, placed on `shardings`."""
    hf = matching_config(model, folder)
    return params_from_hf(model, hf["model_type"], Tensors(folder), abstract_params, shardings)
