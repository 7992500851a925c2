"""The GLaM-style decoder: embeddings, scanned blocks of (MoE layer + dense layers), final norm, logits, loss
(computed in sequence chunks when the logits are large, so [B, T, V] never lives at once).

Owns: model assembly, the training loss, and the analytic parameter / FLOP counts. Layers live in
moe/model/layers.py (dense) and moe/model/experts/layer.py (experts).

GLaM interleave (Du et al. 2021, §3): with `moe_every: N` a *block* is N layers whose first FFN is an MoE
FFN and the others dense (N=2 is GLaM, N=1 all-MoE like Mixtral). All blocks are identical, so they are
created with `nnx.vmap` (params get a leading 'layers' axis) and applied with `nnx.scan`: compile time
does not grow with depth. `scan_layers: false` applies the same stacked params block by block (for tests
and debugging).

Shape key: B batch, T length, D model, V vocab, L blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe import config
from moe.config import ModelConfig
from moe.model.attention import Kernel
from moe.model.layers import FFN, Attention, Embed, RMSNorm, gathered, param
from moe.model.matmul import mm
from moe.model.experts import router
from moe.model.experts.layer import MoEFFN
from moe.runtime.sharding import constrain

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def attention_kernel(cfg: ModelConfig) -> Kernel:
    return Kernel(cfg.attention, cfg.attention_block_q, cfg.attention_block_kv)


class Layer(nnx.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + ffn(norm(x)) with a dense or MoE FFN."""

    def __init__(self, cfg: ModelConfig, is_moe: bool, rngs: nnx.Rngs):
        dtype = compute_dtype(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.num_heads, config.kv_heads(cfg), config.head_dim(cfg), qk_norm=cfg.qk_norm,
                              rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps, dtype=dtype, rngs=rngs,
                              kernel=attention_kernel(cfg))
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoEFFN(cfg, dtype, rngs) if is_moe else FFN(cfg.d_model, cfg.d_ff, cfg.ffn_act, dtype, rngs)
        self.is_moe = is_moe

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, *, train: bool, rng) -> tuple[jax.Array, dict]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT).astype(x_BTD.dtype)
        h = self.ffn_norm(x_BTD)
        if self.is_moe:
            y, aux = self.ffn(h, train=train, rng=rng)
        else:
            y, aux = self.ffn(h), {}
        return x_BTD + y.astype(x_BTD.dtype), aux


class Block(nnx.Module):
    """One repeat unit of the stack: `moe_every` layers, the first with an MoE FFN (a single dense layer if dense)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([Layer(cfg, config.layer_is_moe(cfg, i), rngs) for i in range(config.block_size(cfg))])

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, *, train: bool, rng) -> tuple[jax.Array, dict]:
        aux = {}
        for layer in self.layers:
            x_BTD, layer_aux = layer(x_BTD, positions_BT, segment_ids_BT, train=train, rng=rng)
            aux.update(layer_aux)
        return x_BTD, aux


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = compute_dtype(cfg)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, dtype, rngs)
        self.num_blocks = cfg.num_layers // config.block_size(cfg)

        @nnx.split_rngs(splits=self.num_blocks)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head_DV = None if cfg.tie_embeddings else param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, train: bool = False,
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Logits [B, T, V] in fp32 and aux: each MoE metric stacked over blocks ([L] or [L, E])."""
        x_BTD, aux = self.hidden(tokens_BT, positions_BT, segment_ids_BT, train=train, rng=rng)
        return output_logits(x_BTD, *self.output_weights()), aux

    def output_weights(self) -> tuple[jax.Array, bool, object]:
        """(W, transposed, compute dtype) of the output projection: the tied table [V, D] or the head [D, V]."""
        if self.head_DV is None:
            return self.embed.table_VD[...], True, self.embed.dtype
        return self.head_DV[...], False, self.embed.dtype

    def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, train: bool = False,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Everything but the output projection: the final-norm output [B, T, D] and aux (as `__call__`)."""
        b, t = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((b, t), jnp.int32)
        rng = jax.random.key(0) if rng is None else rng
        keys_L = jax.random.split(rng, self.num_blocks)
        x_BTD = self.embed(tokens_BT)

        def body(x, block: Block, key):
            x, aux = block(x, positions_BT, segment_ids_BT, train=train, rng=key)
            # The carry between blocks is what remat keeps for the backward pass, one [B, T, D] per block:
            # split its D over 'tensor' (which otherwise holds it replicated), gathered again on entry.
            return constrain(x, ("act_batch", "act_len", "act_carry")), aux

        if self.cfg.remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[self.cfg.remat])
        if self.cfg.scan_layers:
            x_BTD, aux = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))(x_BTD, self.blocks, keys_L)
        else:
            graphdef, state = nnx.split(self.blocks)
            per_block = []
            for i in range(self.num_blocks):
                block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
                x_BTD, block_aux = body(x_BTD, block, keys_L[i])
                per_block.append(block_aux)
            aux = jax.tree.map(lambda *xs: jnp.stack(xs), *per_block) if per_block[0] else {}

        return self.final_norm(x_BTD), aux


def output_logits(x_BTD: jax.Array, w: jax.Array, transposed: bool, dtype) -> jax.Array:
    """fp32 logits [B, T, V] from the final-norm output: x @ table^T (tied, GLaM) or x @ head.

    `w` is the fp32 parameter as stored (FSDP-split); it is cast and gathered here, so that inside the
    chunked loss the gradient accumulated across chunks is the fp32, still-split parameter's.
    """
    if transposed:
        return mm("BTD,VD->BTV", x_BTD, gathered(w, ("vocab", "embed"), dtype, in_loop=False), dtype)
    return mm("BTD,DV->BTV", x_BTD, gathered(w, ("embed", "vocab"), dtype, in_loop=False), dtype)


# Above this many logits per sequence (T * V) the loss is computed in sequence chunks of at most this many
# logits. GLaM's 1024 x 256k = 2^28 fp32 logits are 1 GiB per sequence, and the backward pass holds another
# copy for the softmax gradient: with 16 sequences per device that alone is 32 GiB. Chunks of 2^24 (64 tokens
# at V = 256k, 16 chunks) cut that 16-fold while each chunk's matmul keeps B * 64 rows. Small models (tests,
# CPU presets) stay on the one-shot path.
LOSS_CHUNK_LOGITS = 2**24


def loss_chunk_len(t: int, v: int) -> int:
    """Sequence-chunk length for the cross-entropy: T itself when T * V <= LOSS_CHUNK_LOGITS, otherwise the
    largest divisor of T with chunk * V <= LOSS_CHUNK_LOGITS (at least 1)."""
    if t * v <= LOSS_CHUNK_LOGITS:
        return t
    return max([c for c in range(1, t + 1) if t % c == 0 and c * v <= LOSS_CHUNK_LOGITS], default=1)


def token_logsumexp(x_BTD: jax.Array, targets_BT: jax.Array, w: jax.Array, transposed: bool, dtype,
                    chunk: int) -> tuple[jax.Array, jax.Array]:
    """(logsumexp over V, logit of the target), each [B, T] fp32, without the [B, T, V] logits living at once.

    The sequence is cut into T/chunk pieces; a `lax.scan` computes each piece's logits, reduces them to the
    two numbers per token and drops them. `jax.checkpoint` on the piece makes the backward pass recompute the
    piece's logits instead of keeping all of them: the cost is one extra forward output matmul, 2 * V * D
    FLOPs per token (0.6% of a GLaM 64B/64E step, ~18% of a 0.1B/64E one, whose layers are cheap next to its
    256k vocabulary); the saving is all but one chunk of logits. Exactly the one-shot maths otherwise.
    """
    b, t, d = x_BTD.shape

    def piece(x_BcD, tgt_Bc):
        logits_BcV = constrain(output_logits(x_BcD, w, transposed, dtype), ("act_batch", "act_len", "act_vocab"))
        lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
        return lse_Bc, jnp.take_along_axis(logits_BcV, tgt_Bc[..., None], axis=-1)[..., 0]

    if chunk >= t:
        return piece(x_BTD, targets_BT)
    n = t // chunk
    x_nBcD = x_BTD.reshape(b, n, chunk, d).swapaxes(0, 1)
    tgt_nBc = targets_BT.reshape(b, n, chunk).swapaxes(0, 1)
    _, (lse_nBc, tl_nBc) = jax.lax.scan(lambda c, xs: (c, jax.checkpoint(piece)(*xs)), None, (x_nBcD, tgt_nBc))
    return lse_nBc.swapaxes(0, 1).reshape(b, t), tl_nBc.swapaxes(0, 1).reshape(b, t)


def loss_fn(model: Decoder, batch: dict, *, train: bool, rng: jax.Array | None = None,
            prior_counts: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Weighted next-token cross-entropy + weighted router losses (+ optional output-logit z-loss).

    The router losses are averaged over MoE layers, so their weights mean the same at any depth. The
    cross-entropy is computed in sequence chunks when the logits are large (`loss_chunk_len`): same value.
    `prior_counts` [L, E]: expert counts of the optimizer step's earlier micro-batches (global-batch loss).
    Returns (total loss, metrics) with `loss` = the cross-entropy alone (what eval reports) and, for an MoE,
    `expert_counts` [L, E] (assignments per expert: the bias update and the load imbalance use them).
    """
    cfg = model.cfg
    x_BTD, aux = model.hidden(batch["inputs"], batch.get("positions"), batch.get("segment_ids"), train=train, rng=rng)
    chunk = loss_chunk_len(x_BTD.shape[1], cfg.vocab_size)
    lse_BT, target_logit_BT = token_logsumexp(x_BTD, batch["targets"], *model.output_weights(), chunk)
    weights_BT = batch["weights"].astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(weights_BT), 1.0)
    ce = jnp.sum((lse_BT - target_logit_BT) * weights_BT) / denom
    metrics = {"loss": ce, "tokens": jnp.sum(weights_BT)}
    total = ce
    if cfg.logit_z_loss > 0:
        logit_z = jnp.sum(lse_BT**2 * weights_BT) / denom
        total = total + cfg.logit_z_loss * logit_z
        metrics["logit_z_loss"] = logit_z
    if aux:
        metrics["aux_loss"] = jnp.mean(aux["aux_loss"])
        metrics["z_loss"] = jnp.mean(aux["router_z_loss"])
        metrics["drop_fraction"] = jnp.mean(aux["drop_fraction"])
        if "overflow_fraction" in aux:  # dropless: assignments past the expert-parallel receive buffer
            metrics["overflow_fraction"] = jnp.mean(aux["overflow_fraction"])
        metrics["router_entropy"] = jnp.mean(aux["router_entropy"])
        metrics["expert_load"] = aux["expert_load"]  # [L_moe, E]
        metrics["expert_counts"] = jax.lax.stop_gradient(aux["expert_counts"])
        total = total + cfg.aux_loss_weight * metrics["aux_loss"] + cfg.router_z_loss_weight * metrics["z_loss"]
        if "bias_changed_fraction" in aux:
            metrics["bias_changed_fraction"] = jnp.mean(aux["bias_changed_fraction"])
        if cfg.seq_aux_loss_weight > 0:
            metrics["seq_aux_loss"] = jnp.mean(aux["seq_aux_loss"])
            total = total + cfg.seq_aux_loss_weight * metrics["seq_aux_loss"]
        if cfg.global_aux_loss_weight > 0:
            counts = metrics["expert_counts"]
            prior = jnp.zeros_like(counts) if prior_counts is None else prior_counts
            metrics["global_aux_loss"] = jnp.mean(router.global_balance_loss(counts, prior, aux["mean_probs"]))
            total = total + cfg.global_aux_loss_weight * metrics["global_aux_loss"]
    metrics["total_loss"] = total
    return total, metrics


# --- analytic counts -----------------------------------------------------------------------------


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active-per-token) parameter counts, computed from the config without building the model.

    Active counts the router, k routed experts and the shared experts of each MoE layer; everything else is
    always active. Embedding tables are included in both (GLaM's Table 4 convention).
    """
    d, f, v, e, k = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_experts, cfg.top_k
    hd, nh, kv = config.head_dim(cfg), cfg.num_heads, config.kv_heads(cfg)
    attn = d * nh * hd * 2 + d * kv * hd * 2 + 2 * d + (2 * hd if cfg.qk_norm else 0)
    dense_ffn = 3 * d * f
    n_moe = sum(config.layer_is_moe(cfg, i) for i in range(cfg.num_layers))
    n_dense = cfg.num_layers - n_moe
    shared = 3 * d * f * cfg.num_shared_experts
    moe_total = d * e + 3 * e * d * f + shared
    moe_active = d * e + 3 * k * d * f + shared
    emb = v * d * (1 if cfg.tie_embeddings else 2) + d
    base = emb + cfg.num_layers * attn + n_dense * dense_ffn
    return base + n_moe * moe_total, base + n_moe * moe_active


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6 * N_matmul + 12 * L * H * Q * T.

    N_matmul is the active parameter count less the input-embedding lookup (no matmul) but with the output
    projection (tied or not, it is a V x D matmul); the second term is attention's QK^T and AV.
    """
    _, active = param_counts(cfg)
    lookup = cfg.vocab_size * cfg.d_model if not cfg.tie_embeddings else 0
    return 6.0 * (active - lookup) + 12.0 * cfg.num_layers * cfg.num_heads * config.head_dim(cfg) * seq_len
