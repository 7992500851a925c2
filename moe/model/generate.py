"""Autoregressive decoding with a KV cache: greedy, temperature and nucleus (top-p) sampling, stop strings.

Owns: the cached forward pass over the decoder's stacked blocks, the sampling rule, and the host loop that
stops on EOS, stop strings or max tokens. Must not change the model: it reuses the Decoder's own modules
(`Attention.qkv/out`, norms, FFNs, embedding) so a cached step computes exactly what `Decoder.__call__`
computes for the same tokens; tests pin greedy-with-cache == argmax decoding without cache.

Batching: prompts of different lengths are left-padded to a common length P. Each row keeps its own
positions (0 at its first real token; RoPE only sees relative offsets), and a `valid_BS` mask hides the
padding slots from attention, so a row's tokens do not depend on its neighbours. All rows then advance in
lockstep, writing slot P + i at step i.

Shape key: B batch, T new tokens, S cache slots, D model, V vocab, L blocks, N layers per block,
K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe import config
from moe.model.attention import masked_attention
from moe.model.decoder import Decoder, compute_dtype

PAD_MULTIPLE = 16  # prompt and cache lengths are rounded up to this to bound the number of compilations


def init_cache(cfg: config.ModelConfig, batch: int, slots: int) -> dict[str, jax.Array]:
    """Zeroed keys and values for every layer: {"k", "v"} of shape [L, N, B, S, K, H] (L scanned blocks)."""
    n = config.block_size(cfg)
    shape = (cfg.num_layers // n, n, batch, slots, config.kv_heads(cfg), config.head_dim(cfg))
    return {"k": jnp.zeros(shape, compute_dtype(cfg)), "v": jnp.zeros(shape, compute_dtype(cfg))}


def _attend_cached(attn, x_BTD, positions_BT, k_BSKH, v_BSKH, index, valid_BS):
    """T new tokens against the cache: write their keys/values at slots [index, index+T), attend causally
    to valid slots (not left padding). Same arithmetic as `Attention.__call__` over the visible slots."""
    q, k, v = attn.qkv(x_BTD, positions_BT)
    k_BSKH = jax.lax.dynamic_update_slice_in_dim(k_BSKH, k.astype(k_BSKH.dtype), index, axis=1)
    v_BSKH = jax.lax.dynamic_update_slice_in_dim(v_BSKH, v.astype(v_BSKH.dtype), index, axis=1)
    t, s = x_BTD.shape[1], k_BSKH.shape[1]
    causal_TS = jnp.arange(s)[None, :] <= (index + jnp.arange(t))[:, None]
    o = masked_attention(q, k_BSKH, v_BSKH, causal_TS[None] & valid_BS[:, None, :])
    return attn.out(o), k_BSKH, v_BSKH


def _block_cached(block, x_BTD, positions_BT, k_NBSKH, v_NBSKH, index, valid_BS):
    """One scanned block (its N layers) on the new tokens, mirroring `Layer.__call__` (pre-norm residuals)."""
    ks, vs = [], []
    for i, layer in enumerate(block.layers):
        a, k, v = _attend_cached(layer.attn, layer.attn_norm(x_BTD), positions_BT, k_NBSKH[i], v_NBSKH[i],
                                 index, valid_BS)
        x_BTD = x_BTD + a.astype(x_BTD.dtype)
        h = layer.ffn_norm(x_BTD)
        y = layer.ffn(h, train=False)[0] if layer.is_moe else layer.ffn(h)
        x_BTD = x_BTD + y.astype(x_BTD.dtype)
        ks.append(k)
        vs.append(v)
    return x_BTD, (jnp.stack(ks), jnp.stack(vs))


def decode_step(model: Decoder, tokens_BT, positions_BT, cache: dict, index, valid_BS) -> tuple[jax.Array, dict]:
    """Logits [B, T, V] (fp32) of T new tokens placed at cache slots [index, index+T), and the updated cache.

    The blocks are run with `nnx.scan` over the same stacked params `Decoder.__call__` scans over.
    """
    x_BTD = model.embed(tokens_BT)

    def body(x, block, k, v):
        return _block_cached(block, x, positions_BT, k, v, index, valid_BS)

    x_BTD, (k, v) = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))(
        x_BTD, model.blocks, cache["k"], cache["v"])
    x_BTD = model.final_norm(x_BTD)
    if model.head_DV is None:
        logits = model.embed.attend(x_BTD)
    else:
        dt = model.embed.dtype
        logits = jnp.einsum("BTD,DV->BTV", x_BTD.astype(dt), model.head_DV[...].astype(dt),
                            preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32), {"k": k, "v": v}


def sample(logits_BV: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids [B]: argmax when temperature == 0, else nucleus sampling (Holtzman et al. 2020):
    sample from the smallest set of tokens whose probability reaches top_p, at the given temperature."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # keep a token if the mass strictly before it is < top_p (the top token is always kept)
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
        cutoff_B = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= cutoff_B, logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


@functools.lru_cache(maxsize=16)
def _decode_fns(graphdef) -> tuple[Any, Any, Any]:
    """Jitted (prefill, step, sample) for a model structure, shared by every Generator of that structure."""

    def prefill(params, tokens_BT, positions_BT, valid_BS, cache):
        logits, cache = decode_step(nnx.merge(graphdef, params), tokens_BT, positions_BT, cache, 0, valid_BS)
        return logits[:, -1], cache

    def step(params, tokens_B, positions_B, valid_BS, cache, index, key, temperature, top_p):
        logits, cache = decode_step(nnx.merge(graphdef, params), tokens_B[:, None], positions_B[:, None], cache,
                                    index, valid_BS)
        return sample(logits[:, 0], key, temperature, top_p), cache

    return (jax.jit(prefill, donate_argnums=(4,)), jax.jit(step, donate_argnums=(4,), static_argnums=(7, 8)),
            jax.jit(sample, static_argnums=(2, 3)))


@dataclasses.dataclass
class Generator:
    """Decodes from a restored model. `graphdef` + `params` as in `nnx.merge(graphdef, params)`."""

    graphdef: Any
    params: Any
    cfg: config.ModelConfig
    bos_id: int
    eos_id: int

    def __post_init__(self):
        self._prefill, self._step, self._sample = _decode_fns(self.graphdef)

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_tokens: int, *, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, stop_fn=None) -> list[list[int]]:
        """New token ids per prompt (prompt ids as given: add BOS yourself). A row ends at EOS (not included),
        after max_tokens, or when `stop_fn(row, ids)` returns a cut length."""
        if not prompts or max_tokens <= 0:
            return [[] for _ in prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        b = len(prompts)
        p_len = _round_up(max(map(len, prompts)), PAD_MULTIPLE)
        slots = _round_up(p_len + max_tokens, PAD_MULTIPLE)
        tokens_BP = np.zeros((b, p_len), np.int32)
        positions_BP = np.zeros((b, p_len), np.int32)
        valid_BS = np.zeros((b, slots), bool)
        for i, p in enumerate(prompts):
            pad = p_len - len(p)
            tokens_BP[i, pad:] = p
            positions_BP[i, pad:] = np.arange(len(p))
            valid_BS[i, pad:] = True
        lengths_B = np.asarray([len(p) for p in prompts], np.int32)
        cache = init_cache(self.cfg, b, slots)
        last_BV, cache = self._prefill(self.params, tokens_BP, positions_BP, valid_BS, cache)
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)
        next_B = np.asarray(self._sample(last_BV, sub, float(temperature), float(top_p)))
        out: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        for i in range(max_tokens):
            for r in np.flatnonzero(~done):
                if next_B[r] == self.eos_id:
                    done[r] = True
                    continue
                out[r].append(int(next_B[r]))
                cut = stop_fn(r, out[r]) if stop_fn else None
                if cut is not None:
                    out[r] = out[r][:cut]
                    done[r] = True
            if done.all() or i == max_tokens - 1:
                break
            key, sub = jax.random.split(key)
            next_B, cache = self._step(self.params, next_B, lengths_B + i, valid_BS, cache, p_len + i, sub,
                                       float(temperature), float(top_p))
            next_B = np.asarray(next_B)
        return out

    def generate(self, tok, prompts: Sequence[str], max_tokens: int = 64, *, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0) -> list[str]:
        """Completions of text prompts (BOS is prepended), cut before the first stop string."""
        ids = [[self.bos_id] + tok.encode(p) for p in prompts]
        stop = [s for s in stop if s]
        texts: dict[int, str] = {}

        def stop_fn(row: int, new_ids: list[int]):
            text = tok.decode(new_ids)
            hits = [text.find(s) for s in stop if s in text]
            if not hits:
                return None
            texts[row] = text[: min(hits)]
            return len(new_ids)

        outs = self.generate_ids(ids, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 stop_fn=stop_fn if stop else None)
        return [texts.get(r, tok.decode(o)) for r, o in enumerate(outs)]
