"""Optimizers and learning-rate schedules, built from optax only (no hand-written update math).

Owns: `make_schedule`, `make_optimizer`, the weight-decay mask and reading the skipped-update counters.
Must not touch: the model, the train step, checkpoints. Gradient accumulation over micro-batches is the
train step's job (it averages micro-batch gradients before calling the optimizer once).

The optimizer is

    apply_if_finite( chain( clip_by_global_norm(clip_norm),  adamw | lion | adafactor ),
                     max_consecutive_errors = max_consecutive_skips )

so an update whose gradient holds a NaN/Inf is replaced by zeros, the inner state (moments, step count) is
left as it was, and the skip is counted (`skip_stats`). GLaM (Du et al. 2021, sec. 5) skips such updates
the same way. Because the inner count does not advance on a skipped step, the schedule counts *applied*
updates: after n skips the lr lags the global step by n.

Lion vs AdamW (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", sec. 3.2):
Lion's update is `-lr * (sign(c) + wd * theta)` with `c = b1*m + (1-b1)*g`, so every entry has magnitude
`lr` (AdamW's entries are mostly smaller than `lr`: `m/sqrt(v)` is below 1 where gradients are noisy).
Lion therefore needs a learning rate 3-10x smaller than AdamW's, and a weight decay 3-10x larger so that the
effective decay strength `lr * wd` stays the same. LM betas are 0.95/0.98 (the paper's language-model
setting; the defaults 0.9/0.99 are for vision). E.g. AdamW lr 3e-3, wd 0.1 -> Lion lr 3e-4 to 1e-3, wd 0.3-1.0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from moe.config import OptimConfig

# Optimizer defaults used when cfg.b1 / cfg.b2 are 0 ("use the optimizer's own default").
ADAMW_BETAS = (0.9, 0.95)  # the LM setting of GPT-3 / Chinchilla; 0.999 is unstable at scale
LION_BETAS = (0.95, 0.98)  # Chen et al. 2023, LM experiments


# --- schedules -----------------------------------------------------------------------------------


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the (applied) update count.

    All four start with a linear warmup from 0 to `cfg.lr` over `cfg.warmup_steps` (value `lr*s/W` at step s),
    then:
      cosine:   cosine from lr at W to lr*min_lr_ratio at `total_steps` (Loshchilov & Hutter 2017), then flat.
      rsqrt:    lr * sqrt(W / max(s, W)): the inverse-square-root decay of T5 / GLaM (GLaM: lr 0.01, W=10k).
                With W = 0 the formula is 0/0; we then keep lr constant instead of decaying from step 1
                (an rsqrt decay needs a time scale, and W is it).
      wsd:      warmup-stable-decay (Hu et al. 2024, MiniCPM): flat at lr, then the last
                `decay_fraction * total_steps` steps linear down to lr*min_lr_ratio.
      constant: flat at lr.
    """
    lr, warm = cfg.lr, cfg.warmup_steps
    end = lr * cfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0, lr, max(warm, 1))
    if cfg.schedule == "constant" or (cfg.schedule == "rsqrt" and warm == 0):
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1), alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "rsqrt":
        # join_schedules hands the later piece (s - W); write the decay in absolute steps.
        after = lambda s: lr * jnp.sqrt(warm / jnp.maximum(s + warm, warm))  # noqa: E731
    elif cfg.schedule == "wsd":
        decay_start = max(total_steps - round(cfg.decay_fraction * total_steps), warm)
        stable_len = decay_start - warm
        decay = optax.linear_schedule(lr, end, max(total_steps - decay_start, 1))
        after = optax.join_schedules([optax.constant_schedule(lr), decay], [stable_len])
    else:  # config.validate rejects other names; this guards direct construction of OptimConfig
        raise ValueError(f"optim.schedule: unknown schedule '{cfg.schedule}'")
    if warm == 0:
        return after
    return optax.join_schedules([warmup, after], [warm])


# --- weight-decay mask ---------------------------------------------------------------------------


def _key_name(k: Any) -> str:
    """A path entry (DictKey / GetAttrKey / SequenceKey / FlattenedIndexKey) as a lowercase string."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr)).lower()
    return str(k).lower()


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """True where decoupled weight decay applies, as a pytree shaped like `params`.

    No decay on norm scales and biases: by rank (ndim <= 1) and by name ('norm' in any path key, or a key
    'scale'/'bias'), since scanned layers stack a norm scale to shape [L, D]. No decay on embeddings
    ('embed' in any path key) unless `decay_embeddings`: with tied embeddings the table is also the output
    projection, and decaying rare tokens' rows toward 0 only hurts them. Works on any pytree (a pure dict,
    an `nnx.State` whose paths end in `.value`, a tuple of arrays).
    """

    def leaf_mask(path, x) -> bool:
        names = [_key_name(k) for k in path]
        if jnp.ndim(x) <= 1:
            return False
        if any("norm" in n for n in names) or any(n in ("scale", "bias") for n in names):
            return False
        if any("embed" in n for n in names):
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(leaf_mask, params)


# --- optimizer -----------------------------------------------------------------------------------


def _betas(cfg: OptimConfig, default: tuple[float, float]) -> tuple[float, float]:
    return (cfg.b1 or default[0], cfg.b2 or default[1])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> Optimizer:
    """clip -> adamw | lion | adafactor (scheduled lr, masked decoupled weight decay), inside apply_if_finite.

    Weight decay is multiplied by the scheduled lr for all three (optax's adamw/lion convention,
    `theta -= lr_t * wd * theta`), so `wd` means the same thing whichever optimizer is picked.
    Adafactor (Shazeer & Stern 2018) is GLaM's choice: factored second moments, update clipping at RMS 1,
    relative step size (lr scaled by each parameter's RMS), no momentum. Its `cfg.b1` > 0 turns momentum on
    and `cfg.b2`/`cfg.eps` are unused (the decay of its second moment follows `1 - t^-0.8`).
    """
    schedule = make_schedule(cfg, total_steps)
    mask = functools.partial(decay_mask, decay_embeddings=cfg.decay_embeddings)
    if cfg.name == "adamw":
        b1, b2 = _betas(cfg, ADAMW_BETAS)
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "lion":
        b1, b2 = _betas(cfg, LION_BETAS)
        opt = optax.lion(schedule, b1=b1, b2=b2, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adafactor":
        # optax.adafactor adds `rate * theta` after the lr scaling, so the rate must carry the schedule
        # itself; otherwise wd=0.1 would shrink every weight by 10% per step.
        wd = (lambda s: cfg.weight_decay * schedule(s)) if cfg.weight_decay > 0 else None  # noqa: E731
        opt = optax.adafactor(schedule, momentum=cfg.b1 or None, weight_decay_rate=wd, weight_decay_mask=mask)
    else:
        raise ValueError(f"optim.name: unknown optimizer '{cfg.name}'")
    parts = ([optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []) + [opt]
    return Optimizer(optax.chain(*parts), cfg.max_consecutive_skips)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """`optax.apply_if_finite(inner, max_consecutive_skips)`, plus `step`, which also applies the update.

    `init` and `update` are apply_if_finite's own (state `optax.ApplyIfFiniteState`). `step(grads, state,
    params) -> (params, state)` is `apply_updates(params, update(...)[0])` with `apply_updates` moved inside
    the skip's `lax.cond`: outside it, XLA materialises the whole update tree and reads it back in a second
    pass (on `small`'s 57.7M parameters, 2 CPU cores: 128 -> 88 ms per optimizer step, measured). Finiteness
    is read from the global gradient norm, the expression `clip_by_global_norm` and the `grad_norm` metric
    compute too, so XLA evaluates it once: the norm is NaN/Inf iff some gradient is, or if the sum of squares
    overflows fp32 (a step worth skipping as well).
    """

    inner: optax.GradientTransformation
    max_consecutive_skips: int

    def _wrapped(self) -> optax.GradientTransformationExtraArgs:
        return optax.apply_if_finite(self.inner, max_consecutive_errors=self.max_consecutive_skips)

    def init(self, params: Any) -> optax.ApplyIfFiniteState:
        return self._wrapped().init(params)

    def update(self, grads: Any, state: optax.ApplyIfFiniteState, params: Any = None):
        return self._wrapped().update(grads, state, params)

    def step(self, grads: Any, state: optax.ApplyIfFiniteState, params: Any) -> tuple[Any, optax.ApplyIfFiniteState]:
        finite = jnp.isfinite(optax.tree.norm(grads))
        notfinite_count = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))

        def apply(_):
            updates, inner_state = self.inner.update(grads, state.inner_state, params)
            return optax.apply_updates(params, updates), inner_state

        params, inner_state = jax.lax.cond(finite | (notfinite_count > self.max_consecutive_skips), apply,
                                           lambda _: (params, state.inner_state), None)
        total = jnp.where(finite, state.total_notfinite, optax.safe_increment(state.total_notfinite))
        return params, optax.ApplyIfFiniteState(notfinite_count=notfinite_count, last_finite=finite,
                                                total_notfinite=total, inner_state=inner_state)


def skip_stats(opt_state: Any) -> dict[str, jax.Array]:
    """{'skipped_total', 'skipped_consecutive'}: the apply_if_finite counters, found anywhere in `opt_state`.

    Searched by field name rather than by type, so it also works after a checkpoint restore that turned the
    NamedTuple into a dict, or inside an `nnx.State`. With nested apply_if_finite the outermost one wins.
    """
    found: dict[str, tuple[int, jax.Array]] = {}
    names = {"total_notfinite": "skipped_total", "notfinite_count": "skipped_consecutive"}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [_key_name(k) for k in path]
        keys = keys[:-1] if keys and keys[-1] == "value" else keys  # nnx.Variable wraps the array
        if keys and keys[-1] in names:
            out = names[keys[-1]]
            if out not in found or len(path) < found[out][0]:
                found[out] = (len(path), leaf)
    if len(found) != 2:
        raise ValueError("skip_stats: no optax.apply_if_finite state (notfinite_count/total_notfinite) "
                         "in this optimizer state; build it with moe.train.optim.make_optimizer")
    return {k: v for k, (_, v) in found.items()}

