"""Typed run configuration: frozen dataclasses, YAML presets with `base:` inheritance, dotted overrides.

Owns: the schema (every field with a one-line comment), loading, overrides and *all* validation that can
be done before anything compiles. Must not import jax: a bad config fails in milliseconds.

    cfg = load_config("configs/tiny.yaml", ["model.num_experts=16", "optim.name=lion"])

Errors are `ConfigError` (a `ValueError`) with one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192  # tokenizer vocabulary; the builtin tokenizer is trained to this size
    d_model: int = 128  # D: residual stream width
    num_layers: int = 4  # transformer layers; must be a multiple of moe_every
    num_heads: int = 4  # H: query heads
    num_kv_heads: int = 0  # key/value heads for grouped-query attention; 0 = num_heads (plain MHA)
    head_dim: int = 0  # per-head width; 0 = d_model // num_heads
    d_ff: int = 512  # F: hidden width of the dense FFN and of each expert
    ffn_act: str = "geglu"  # geglu (GLaM's gated GELU) | swiglu
    tie_embeddings: bool = True  # share input embedding and output projection (GLaM)
    qk_norm: bool = False  # RMSNorm on queries and keys before RoPE
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal initialiser for weights
    logit_z_loss: float = 0.0  # weight of the output-logit z-loss (PaLM uses 1e-4); 0 = off
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params, optimizer state fp32); presets use bfloat16
    remat: str = "none"  # activation checkpointing per block: none | full | save_dots
    scan_layers: bool = True  # scan over identical blocks (compile time flat in depth)
    # --- mixture of experts ---
    num_experts: int = 8  # E; 0 or moe_every = 0 gives a dense model
    top_k: int = 2  # K: experts per token
    moe_every: int = 2  # every N-th layer is MoE (GLaM: 2; the first of each group); 1 = all; 0 = dense
    num_shared_experts: int = 0  # always-on experts added to the routed output (DeepSeekMoE)
    dispatch: str = "capacity"  # capacity (index gather/scatter, drops overflow) | dropless (ragged_dot)
    capacity_factor: float = 1.25  # training capacity factor: C = ceil(cf * K * T / E)
    eval_capacity_factor: float = 2.0  # capacity factor in evaluation
    min_capacity: int = 4  # lower bound on C per expert
    renormalize_gates: bool = True  # gates renormalised over the chosen K (GShard/GLaM); False = Switch
    router_jitter: float = 0.0  # multiplicative uniform jitter on router inputs in training (Switch); 0 = off
    aux_loss_weight: float = 0.01  # Switch load-balance loss weight (alpha)
    router_z_loss_weight: float = 0.001  # ST-MoE router z-loss weight


@dataclass(frozen=True)
class DataConfig:
    source: str = "builtin"  # builtin (stdlib .py files) | tfds (a TFDS dataset) | files (local text/JSONL)
    tfds_name: str = ""  # with source=tfds: name[/config][:version], e.g. c4/en:3.1.0
    data_dir: str = ""  # TFDS data dir (local path or gs:// bucket); "" = runs/_tfds
    files: tuple[str, ...] = ()  # with source=files: paths or globs of .txt / .jsonl files
    text_key: str = "text"  # feature (or JSON field) holding the document text
    train_split: str = "train"  # split to train on
    eval_split: str = "validation"  # split to evaluate on
    tokenizer: str = ""  # path to a SentencePiece .model; "" = train one on the source and cache it
    validation_fraction: float = 0.05  # builtin/files: fraction of documents held out (by a stable hash)
    shuffle_buffer: int = 1024  # documents shuffled before packing (in addition to a global shuffle)
    num_workers: int = 0  # grain worker processes; 0 = read in the training process


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | lion | adafactor
    lr: float = 3e-3  # peak learning rate
    b1: float = 0.0  # first-moment decay; 0 = default for the optimizer (adamw 0.9, lion 0.95)
    b2: float = 0.0  # second-moment decay; 0 = default (adamw 0.95, lion 0.98)
    eps: float = 1e-8  # adamw epsilon
    weight_decay: float = 0.1  # decoupled weight decay (not applied to norms)
    decay_embeddings: bool = False  # apply weight decay to the embedding table too
    schedule: str = "cosine"  # cosine | rsqrt (GLaM) | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 100  # linear warmup from 0
    decay_fraction: float = 0.2  # wsd: fraction of steps in the final linear decay
    min_lr_ratio: float = 0.1  # final lr as a fraction of peak (cosine, wsd)
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 = off
    grad_accum: int = 1  # micro-batches accumulated per update
    max_consecutive_skips: int = 5  # non-finite updates skipped in a row before the run rolls back


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300  # total optimizer steps
    batch_size: int = 16  # global sequences per step
    seq_len: int = 128  # tokens per sequence
    log_every: int = 10  # steps between metric lines
    eval_every: int = 100  # steps between validation evals; 0 = only at the end
    eval_batches: int = 4  # batches per validation eval
    seed: int = 0  # seeds params, data order and router jitter
    init_from: str = ""  # checkpoint dir (a workdir or its checkpoints/ folder) to load params from
    spike_factor: float = 0.0  # roll back when loss > factor * median of the recent window; 0 = off
    spike_window: int = 20  # steps in the median window for spike detection
    progress: bool = True  # show a progress bar
    host_malloc: str = "keep"  # keep: reuse freed host memory (moe/hostmem.py; faster on CPU, RSS stays at peak)


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel axis size; -1 = all devices left over
    fsdp: int = 1  # fully sharded data-parallel axis (weights sharded, batch split)
    expert: int = 1  # expert-parallel axis (experts split, tokens all-to-all)
    tensor: int = 1  # tensor-parallel axis (heads and FFN hidden split)
    dcn_data: int = 1  # data-parallel slices over the data-centre network (multislice)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between saves; the final step is always saved
    keep: int = 3  # keep the last N checkpoints
    keep_every: int = 0  # additionally keep every M-th step forever; 0 = off
    async_save: bool = True  # write in the background while training continues


@dataclass(frozen=True)
class Config:
    name: str = "tiny"  # preset name; the default workdir is runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


CHOICES = {
    "model.ffn_act": ("geglu", "swiglu"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "save_dots"),
    "model.dispatch": ("capacity", "dropless"),
    "data.source": ("builtin", "tfds", "files"),
    "optim.name": ("adamw", "lion", "adafactor"),
    "optim.schedule": ("cosine", "rsqrt", "wsd", "constant"),
    "train.host_malloc": ("keep", "system"),
}

# --- loading -------------------------------------------------------------------------------------


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. 'model.num_experts'."""
    keys = []
    for name, typ in _hints(cls).items():
        keys += all_keys(typ, f"{prefix}{name}.") if dataclasses.is_dataclass(typ) else [prefix + name]
    return keys


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Converts a YAML/CLI value to the field's type, or raises naming the key."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(key, v, typing.get_args(typ)[0]) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {typ}")


def _build(cls, tree: dict, prefix: str = ""):
    hints = _hints(cls)
    valid = [prefix + k for k in hints]
    kwargs = {}
    for name, value in tree.items():
        key = prefix + name
        if name not in hints:
            raise _unknown(key, all_keys() if not prefix else valid)
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            kwargs[name] = _build(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_preset(path: str | Path, _seen: tuple = ()) -> dict:
    """Reads a YAML preset, resolving `base: other.yaml` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; presets live in configs/ (e.g. configs/tiny.yaml)")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular 'base:' chain {' -> '.join(str(p) for p in _seen)}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections")
    base = tree.pop("base", None)
    tree.setdefault("name", path.stem)
    if base:
        parent = read_preset(path.parent / base, _seen + (path.resolve(),))
        parent.pop("name", None)
        tree = _merge(parent, tree)
    return tree


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. model.num_experts=16)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    tree = _merge({}, tree)
    valid = all_keys()
    for text in overrides:
        parts, value = parse_override(text)
        if ".".join(parts) not in valid and parts != ["name"]:
            raise _unknown(".".join(parts), valid)
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Preset file + dotted overrides -> validated Config."""
    return from_dict(apply_overrides(read_preset(path), list(overrides)))


def to_dict(cfg) -> dict:
    out = dataclasses.asdict(cfg)

    def fix(x):  # tuples -> lists for YAML/JSON
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return list(x) if isinstance(x, tuple) else x

    return fix(out)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Config, **sections) -> Config:
    """`replace(cfg, model={'num_experts': 4})`: a copy with some fields of some sections changed."""
    new = {k: dataclasses.replace(getattr(cfg, k), **v) if isinstance(v, dict) else v for k, v in sections.items()}
    out = dataclasses.replace(cfg, **new)
    validate(out)
    return out


def help_text() -> str:
    """Every key with its default and comment, read from this file's source (for --help and the README)."""
    import inspect

    lines = []
    for section in ("model", "data", "optim", "train", "mesh", "checkpoint"):
        cls = _hints(Config)[section]
        comments = {}
        for line in inspect.getsource(cls).splitlines():
            s = line.strip()
            if ":" in s and "#" in s and not s.startswith("#"):
                comments[s.split(":")[0].strip()] = s.split("#", 1)[1].strip()
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section}.{f.name} = {default!r}    # {comments.get(f.name, '')}")
    return "\n".join(lines)


# --- validation ----------------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Every check that needs no devices and no data. Mesh-vs-devices checks live in moe.sharding."""
    for key, allowed in CHOICES.items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}{hint}")
    m, o, t, c = cfg.model, cfg.optim, cfg.train, cfg.checkpoint
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
        _check(getattr(m, key) > 0, f"model.{key} must be > 0, got {getattr(m, key)}")
    _check(m.num_kv_heads >= 0, f"model.num_kv_heads must be >= 0, got {m.num_kv_heads}")
    _check(m.head_dim > 0 or m.d_model % m.num_heads == 0,
           f"model.num_heads ({m.num_heads}) must divide model.d_model ({m.d_model}), or set model.head_dim")
    kv = m.num_kv_heads or m.num_heads
    _check(m.num_heads % kv == 0, f"model.num_kv_heads ({kv}) must divide model.num_heads ({m.num_heads})")
    hd = m.head_dim or m.d_model // m.num_heads
    _check(hd % 2 == 0, f"model.head_dim must be even for RoPE, got {hd}")
    _check(m.moe_every >= 0, f"model.moe_every must be >= 0, got {m.moe_every}")
    _check(m.num_experts >= 0, f"model.num_experts must be >= 0, got {m.num_experts}")
    if is_moe(m):
        _check(m.num_layers % m.moe_every == 0,
               f"model.moe_every ({m.moe_every}) must divide model.num_layers ({m.num_layers})")
        _check(m.top_k >= 1, f"model.top_k must be >= 1, got {m.top_k}")
        _check(m.top_k <= m.num_experts,
               f"model.top_k ({m.top_k}) must be <= model.num_experts ({m.num_experts})")
        _check(m.capacity_factor > 0, f"model.capacity_factor must be > 0, got {m.capacity_factor}")
        _check(m.eval_capacity_factor > 0, f"model.eval_capacity_factor must be > 0, got {m.eval_capacity_factor}")
        _check(m.min_capacity >= 1, f"model.min_capacity must be >= 1, got {m.min_capacity}")
        _check(0 <= m.router_jitter < 1, f"model.router_jitter must be in [0, 1), got {m.router_jitter}")
    for key in ("aux_loss_weight", "router_z_loss_weight", "logit_z_loss", "norm_eps", "init_std"):
        _check(getattr(m, key) >= 0, f"model.{key} must be >= 0, got {getattr(m, key)}")
    _check(m.num_shared_experts >= 0, f"model.num_shared_experts must be >= 0, got {m.num_shared_experts}")
    _check(o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be a positive number, got {o.lr}")
    for key in ("b1", "b2"):
        _check(0 <= getattr(o, key) < 1, f"optim.{key} must be in [0, 1), got {getattr(o, key)}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(0 < o.decay_fraction <= 1, f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.clip_norm >= 0, f"optim.clip_norm must be >= 0, got {o.clip_norm}")
    _check(o.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {o.grad_accum}")
    _check(o.max_consecutive_skips >= 1, f"optim.max_consecutive_skips must be >= 1, got {o.max_consecutive_skips}")
    for key in ("steps", "batch_size", "seq_len", "log_every", "eval_batches"):
        _check(getattr(t, key) > 0, f"train.{key} must be > 0, got {getattr(t, key)}")
    _check(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    _check(t.batch_size % o.grad_accum == 0,
           f"optim.grad_accum ({o.grad_accum}) must divide train.batch_size ({t.batch_size})")
    _check(t.spike_factor == 0 or t.spike_factor > 1, f"train.spike_factor must be 0 (off) or > 1, got {t.spike_factor}")
    _check(t.spike_window >= 3, f"train.spike_window must be >= 3, got {t.spike_window}")
    _check(c.every > 0, f"checkpoint.every must be > 0, got {c.every}")
    _check(c.keep >= 1, f"checkpoint.keep must be >= 1, got {c.keep}")
    _check(c.keep_every >= 0, f"checkpoint.keep_every must be >= 0, got {c.keep_every}")
    for key in ("data", "fsdp", "expert", "tensor", "dcn_data"):
        v = getattr(cfg.mesh, key)
        _check(v == -1 or v >= 1, f"mesh.{key} must be >= 1 or -1 (fill), got {v}")
    _check([getattr(cfg.mesh, k) for k in ("data", "fsdp", "expert", "tensor")].count(-1) <= 1,
           "mesh: at most one of data/fsdp/expert/tensor may be -1 (fill)")
    d = cfg.data
    _check(d.source != "tfds" or bool(d.tfds_name), "data.tfds_name is required with data.source=tfds (e.g. c4/en:3.1.0)")
    _check(d.source != "files" or bool(d.files), "data.files is required with data.source=files (paths or globs)")
    _check(0 < d.validation_fraction < 1, f"data.validation_fraction must be in (0, 1), got {d.validation_fraction}")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _check(d.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {d.shuffle_buffer}")


def is_moe(m: ModelConfig) -> bool:
    return m.num_experts > 0 and m.moe_every > 0


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.d_model // m.num_heads


def kv_heads(m: ModelConfig) -> int:
    return m.num_kv_heads or m.num_heads


def layer_is_moe(m: ModelConfig, layer: int) -> bool:
    """GLaM interleave: the first layer of each group of `moe_every` is MoE (as in Praxis' GLaM)."""
    return is_moe(m) and layer % m.moe_every == 0


def block_size(m: ModelConfig) -> int:
    """Layers per scanned block: one MoE layer plus its dense followers (1 for dense models)."""
    return m.moe_every if is_moe(m) else 1
