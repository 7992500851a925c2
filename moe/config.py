"""Typed run configuration: frozen dataclasses, YAML presets with `base:` inheritance, dotted overrides.

Owns: the schema (every field with its help, allowed values or range, and whether it may change on resume or
in eval), loading, overrides and *all* validation that can be done before anything compiles, including the
divisibility rules against processes and mesh (`check_placement`). Must not import jax: a bad config fails in
milliseconds. Longer than our other modules on purpose (~560 lines, a third of it the schema): the config's
rules are in one file so that none can drift into the code that uses them.

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
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is allowed."""


INT_MAX = 2**31 - 1  # step counters and sizes live in int32 arrays on device


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field: finite, within [lo, hi] (ends open where said), or one of `also`."""

    lo: float | None = None
    hi: float | None = INT_MAX
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()
    text: str = ""  # how the message says it; derived from the bounds when empty

    def ok(self, v: float) -> bool:
        if v in self.also:
            return True
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.lo is not None and self.hi not in (None, INT_MAX):
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return "positive (> 0)" if self.lo == 0 and self.lo_open else f"{'>' if self.lo_open else '>='} {self.lo:g}"


POS = Range(0, lo_open=True)  # > 0 (ints: >= 1)
NONNEG = Range(0)  # >= 0
ATLEAST1 = Range(1)
FRACTION = Range(0, 1, hi_open=True)  # [0, 1)
FPOS = Range(0, None, lo_open=True)  # floats: finite and > 0
FNONNEG = Range(0, None)  # floats: finite and >= 0
AXIS = Range(1, also=(-1,), text=">= 1 or -1 (fill)")


def f(default: Any, help: str, rng: Range | None = None, *, resume: bool = False, eval: bool = False):
    """A config field: its default, its one-line help, its allowed range (numbers), and whether it may change
    when a run resumes (`resume`) and when eval.py evaluates a run (`eval`)."""
    return field(default=default, metadata={"help": help, "range": rng, "resume": resume, "eval": eval})


def section(cls, help: str, *, resume: bool = False, eval: bool = False):
    return field(default_factory=cls, metadata={"help": help, "resume": resume, "eval": eval})


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = f(8192, "tokenizer vocabulary; the builtin tokenizer is trained to this size", POS)
    d_model: int = f(128, "D: residual stream width", POS)
    num_layers: int = f(4, "transformer layers; must be a multiple of moe_every", POS)
    num_heads: int = f(4, "H: query heads", POS)
    num_kv_heads: int = f(0, "key/value heads for grouped-query attention; 0 = num_heads (plain MHA)", NONNEG)
    head_dim: int = f(0, "per-head width; 0 = d_model // num_heads", NONNEG)
    d_ff: int = f(512, "F: hidden width of the dense FFN and of each expert", POS)
    ffn_act: Literal["geglu", "swiglu"] = f("geglu", "geglu (GLaM's gated GELU) | swiglu")
    tie_embeddings: bool = f(True, "share input embedding and output projection (GLaM)")
    qk_norm: bool = f(False, "RMSNorm on queries and keys before RoPE")
    rope_theta: float = f(10000.0, "RoPE base frequency", FPOS)
    attention: Literal["auto", "splash", "cudnn", "xla", "blockwise"] = f(
        "auto", "softmax(QK^T)V kernel: auto (TPU splash, GPU cudnn where it takes the case, else xla; CPU "
        "blockwise) | splash | cudnn | xla | blockwise", resume=True, eval=True)
    attention_block_q: int = f(0, "splash attention query tile (multiple of 128 dividing train.seq_len); 0 = auto",
                               NONNEG, resume=True, eval=True)
    attention_block_kv: int = f(0, "splash attention key/value tile (multiple of 128 dividing train.seq_len); 0 = auto",
                                NONNEG, resume=True, eval=True)
    norm_eps: float = f(1e-6, "RMSNorm epsilon", FNONNEG)
    init_std: float = f(0.02, "std of the normal initialiser for weights", FNONNEG)
    logit_z_loss: float = f(0.0, "weight of the output-logit z-loss (PaLM uses 1e-4); 0 = off", FNONNEG)
    dtype: Literal["float32", "bfloat16"] = f(
        "float32", "compute dtype: float32 | bfloat16 (params, optimizer state fp32); presets use bfloat16")
    remat: Literal["none", "full", "save_dots"] = f("none", "activation checkpointing per block: none | full | save_dots")
    scan_layers: bool = f(True, "scan over identical blocks (compile time flat in depth)")
    # --- mixture of experts ---
    num_experts: int = f(8, "E; 0 or moe_every = 0 gives a dense model", NONNEG)
    top_k: int = f(2, "K: experts per token", ATLEAST1)
    moe_every: int = f(2, "every N-th layer is MoE (GLaM: 2; the first of each group); 1 = all; 0 = dense", NONNEG)
    num_shared_experts: int = f(0, "always-on experts added to the routed output (DeepSeekMoE)", NONNEG)
    dispatch: Literal["capacity", "dropless"] = f(
        "capacity", "capacity (index gather/scatter, drops overflow) | dropless (sorted tokens, grouped matmul; "
        "expert-parallel under a mesh)")
    dropless_buffer_factor: float = f(
        2.0, "dropless under a mesh: rows a device may receive, as a multiple of its balanced share; a longer run "
        "for one peer overflows (counted: overflow_fraction); >= mesh.expert never drops", FPOS, resume=True,
        eval=True)
    eval_dropless_buffer_factor: float = f(
        0.0, "dropless_buffer_factor of evaluation (eval.py, the in-training eval); 0 = the worst case, an exact "
        "no-drop eval", FNONNEG, resume=True, eval=True)
    grouped_matmul: Literal["auto", "ragged", "buckets", "megablox"] = f(
        "auto", "dropless grouped matmul: auto (TPU/GPU ragged_dot, CPU buckets) | ragged (lax.ragged_dot) | "
        "buckets (rows padded into the smallest capacity that holds the largest group) | megablox (TPU Pallas "
        "gmm/tgmm)", resume=True, eval=True)
    megablox_tile_m: int = f(512, "megablox row tile (multiple of 128; the rows are padded to a multiple of it)",
                             ATLEAST1, resume=True, eval=True)
    megablox_tile_k: int = f(512, "megablox contracting-dim tile (multiple of 128; cut to the matrix if longer)",
                             ATLEAST1, resume=True, eval=True)
    megablox_tile_n: int = f(512, "megablox output-dim tile (multiple of 128; cut to the matrix if longer)",
                             ATLEAST1, resume=True, eval=True)
    capacity_factor: float = f(1.25, "training capacity factor: C = ceil(cf * K * T / E)", FPOS)
    eval_capacity_factor: float = f(2.0, "capacity factor of a capacity-dispatch forward pass with train=False "
                                    "(evaluation itself is dropless: moe/eval/lm.py)", FPOS)
    min_capacity: int = f(4, "lower bound on C per expert", ATLEAST1)
    drop_policy: Literal["causal", "position", "probability"] = f(
        "causal", "who keeps a full expert's slots (capacity dispatch): causal (token-major, so training stays "
        "causal) | position (GShard: all top-1 choices first) | probability (highest gates first)")
    router_score: Literal["softmax", "sigmoid"] = f(
        "softmax", "router scores: softmax over experts | sigmoid per expert (DeepSeek-V3)")
    renormalize_gates: bool = f(True, "gates renormalised over the chosen K (GShard/GLaM); False = Switch")
    routed_scaling_factor: float = f(1.0, "gates are multiplied by this (DeepSeek-V3: 2.5 with sigmoid scores)", FPOS)
    router_jitter: float = f(0.0, "multiplicative uniform jitter on router inputs in training (Switch); 0 = off",
                             FRACTION)
    aux_loss_weight: float = f(0.01, "micro-batch balance loss weight (Switch's alpha): f and P over each "
                               "micro-batch, all devices", FNONNEG)
    seq_aux_loss_weight: float = f(0.0, "sequence-wise balance loss weight (DeepSeek-V3: 1e-4 beside the bias)",
                                   FNONNEG)
    global_aux_loss_weight: float = f(0.0, "global-batch balance loss weight: f counted over every micro-batch "
                                      "of the optimizer step (Qiu et al. 2025)", FNONNEG)
    router_bias_update_rate: float = f(0.0, "aux-loss-free balancing: per-expert selection bias updated by "
                                       "u * sign(mean load - load) each step (DeepSeek-V3: 1e-3); 0 = off", FNONNEG)
    router_z_loss_weight: float = f(0.001, "ST-MoE router z-loss weight", FNONNEG)


@dataclass(frozen=True)
class DataConfig:
    source: Literal["builtin", "packages", "tfds", "files"] = f(
        "builtin", "builtin (stdlib .py files) | packages (installed packages' .py files) | tfds (a TFDS dataset) | "
        "files (local text/JSONL)")
    packages: tuple[str, ...] = f((), "with source=packages: installed distributions whose .py sources (tests left "
                                  "out) are the corpus, as name or name==version (a pin refuses another version)")
    tfds_name: str = f("", "with source=tfds: name[/config][:version], e.g. c4/en:3.1.0")
    data_dir: str = f("", "TFDS data dir (local path or gs:// bucket); \"\" = runs/_tfds", resume=True)
    files: tuple[str, ...] = f((), "with source=files: paths or globs of .txt / .jsonl files")
    text_key: str = f("text", "feature (or JSON field) holding the document text")
    train_split: str = f("train", "split to train on")
    eval_split: str = f("validation", "split to evaluate on")
    tokenizer: str = f("", "path or bucket URL (gs://...) of a SentencePiece .model; \"\" = train one on the "
                       "source and cache it ($MOE_CACHE_DIR, may be a bucket)")
    validation_fraction: float = f(0.05, "builtin/packages/files: fraction of documents held out (by a stable hash)",
                                   Range(0, 1, lo_open=True, hi_open=True))
    shuffle_buffer: int = f(1024, "documents shuffled before packing (in addition to a global shuffle)", ATLEAST1)
    num_workers: int = f(0, "grain worker processes; 0 = read in the training process. Fixed for a run: each worker "
                         "packs its own slice of the documents, so the batches depend on it", NONNEG)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "lion", "adafactor"] = f("adamw", "adamw | lion | adafactor")
    lr: float = f(3e-3, "peak learning rate", FPOS)
    b1: float = f(0.0, "first-moment decay; 0 = default for the optimizer (adamw 0.9, lion 0.95)", FRACTION)
    b2: float = f(0.0, "second-moment decay; 0 = default (adamw 0.95, lion 0.98)", FRACTION)
    eps: float = f(1e-8, "adamw epsilon", FPOS)
    weight_decay: float = f(0.1, "decoupled weight decay (not applied to norms)", FNONNEG)
    decay_embeddings: bool = f(False, "apply weight decay to the embedding table too")
    schedule: Literal["cosine", "rsqrt", "wsd", "constant"] = f(
        "cosine", "cosine | rsqrt (GLaM) | wsd (warmup-stable-decay) | constant")
    warmup_steps: int = f(100, "linear warmup from 0", NONNEG)
    decay_fraction: float = f(0.2, "wsd: fraction of steps in the final linear decay", Range(0, 1, lo_open=True))
    min_lr_ratio: float = f(0.1, "final lr as a fraction of peak (cosine, wsd)", Range(0, 1))
    clip_norm: float = f(1.0, "global gradient-norm clipping; 0 = off", FNONNEG)
    grad_accum: int = f(1, "micro-batches accumulated per update", ATLEAST1)
    max_consecutive_skips: int = f(5, "non-finite updates skipped in a row before the run rolls back", ATLEAST1,
                                   resume=True)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = f(300, "total optimizer steps", ATLEAST1, resume=True)
    batch_size: int = f(16, "global sequences per step", ATLEAST1, eval=True)
    seq_len: int = f(128, "tokens per sequence", ATLEAST1, eval=True)
    log_every: int = f(10, "steps between metric lines", ATLEAST1, resume=True)
    eval_every: int = f(100, "steps between validation evals; 0 = only at the end", NONNEG, resume=True)
    eval_batches: int = f(4, "batches per validation eval", ATLEAST1, resume=True)
    seed: int = f(0, "seeds params, data order and router jitter", NONNEG)
    init_from: str = f("", "checkpoint dir (a workdir or its checkpoints/ folder) to load params from; hf:DIR = a "
                       "Hugging Face Qwen3-MoE/Qwen2-MoE/Mixtral/Qwen3/Llama folder", resume=True)
    spike_factor: float = f(0.0, "roll back when loss > factor * median of the recent window; 0 = off",
                            Range(1, None, lo_open=True, also=(0.0,), text="0 (off) or > 1"), resume=True)
    spike_window: int = f(20, "steps in the median window for spike detection", Range(3), resume=True)
    progress: bool = f(True, "show a progress bar", resume=True)
    host_malloc: Literal["keep", "system"] = f(
        "keep", "keep: reuse freed host memory (moe/runtime/hostmem.py; faster on CPU, RSS stays at peak) | system",
        resume=True)


@dataclass(frozen=True)
class MeshConfig:
    data: int = f(-1, "data-parallel axis size; -1 = all devices left over", AXIS)
    fsdp: int = f(1, "fully sharded data-parallel axis (weights sharded, batch split)", AXIS)
    expert: int = f(1, "expert-parallel axis (experts split, tokens all-to-all)", AXIS)
    tensor: int = f(1, "tensor-parallel axis (heads and FFN hidden split)", AXIS)
    dcn_data: int = f(1, "data-parallel slices over the data-centre network (multislice)", ATLEAST1)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = f(100, "steps between saves; the final step is always saved", ATLEAST1)
    keep: int = f(3, "keep the last N checkpoints", ATLEAST1)
    keep_every: int = f(0, "additionally keep every M-th step forever; 0 = off", NONNEG)
    async_save: bool = f(True, "write in the background while training continues")


@dataclass(frozen=True)
class Config:
    """The schema's defaults (fp32, the tiny model's sizes); presets are the YAML files in configs/."""

    name: str = f("default", "preset name (a preset's file name); the default workdir is runs/<name>", resume=True)
    model: ModelConfig = section(ModelConfig, "the decoder and its MoE layers")
    data: DataConfig = section(DataConfig, "corpus, tokenizer, splits and the input pipeline", eval=True)
    optim: OptimConfig = section(OptimConfig, "optimizer and learning-rate schedule")
    train: TrainConfig = section(TrainConfig, "steps, batch, logging, evals, rollback policy")
    mesh: MeshConfig = section(MeshConfig, "device mesh axis sizes", resume=True, eval=True)
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Orbax checkpoints", resume=True)


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
    listed = sorted({k.split(".")[0] for k in valid}) if "." not in key else valid  # a bad section: the sections
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(listed)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Converts a YAML/CLI value to the field's type, or raises naming the key."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}{hint}")
        return value
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
        key = prefix + str(name)
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
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; --config takes a YAML preset (e.g. configs/tiny.yaml)") from None
    except yaml.YAMLError as e:
        where, what = _yaml_error(e)
        raise ConfigError(f"{path}{where}: not valid YAML ({what})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections")
    base = tree.pop("base", None)
    tree.setdefault("name", path.stem)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be one preset file name (e.g. base: tiny.yaml), got {base!r}")
    if base:
        parent = read_preset(path.parent / base, _seen + (path.resolve(),))
        parent.pop("name", None)
        tree = _merge(parent, tree)
    return tree


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. model.num_experts=16)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({_yaml_error(e)[1]}); quote it or fix "
                          "the brackets (lists look like [a, b])") from None
    return key.strip().split("."), value


def _yaml_error(e: yaml.YAMLError) -> tuple[str, str]:
    """(':LINE:COLUMN' or '', the problem on one line) of a PyYAML error."""
    mark = getattr(e, "problem_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    return where, " ".join(str(getattr(e, "problem", None) or e).split())


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
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts)}: '{p}' is {node!r} in the preset, not a section of keys")
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
    """Every key with its default, help and allowed values (for --help and the README)."""
    lines = []
    for sec in dataclasses.fields(Config):
        cls = _hints(Config)[sec.name]
        if not dataclasses.is_dataclass(cls):
            continue
        lines.append(f"{sec.name}:")
        for fl in dataclasses.fields(cls):
            rng, typ = fl.metadata.get("range"), _hints(cls)[fl.name]
            choices = typing.get_args(typ) if typing.get_origin(typ) is Literal else ()
            allowed = f" [{rng.describe()}]" if rng else (
                f" [{' | '.join(choices)}]" if not all(c in fl.metadata["help"] for c in choices) else "")
            lines.append(f"  {sec.name}.{fl.name} = {fl.default!r}    # {fl.metadata['help']}{allowed}")
    return "\n".join(lines)


def _flagged(flag: str) -> tuple[str, ...]:
    """Dotted keys (a whole section as 'mesh.') whose field metadata sets `flag`."""
    out = []
    for sec in dataclasses.fields(Config):
        typ = _hints(Config)[sec.name]
        if sec.metadata.get(flag):
            out.append(sec.name + "." if dataclasses.is_dataclass(typ) else sec.name)
        elif dataclasses.is_dataclass(typ):
            out += [f"{sec.name}.{fl.name}" for fl in dataclasses.fields(typ) if fl.metadata.get(flag)]
    return tuple(out)


def _matches(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def resume_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The differences between a checkpoint's config and this one outside RESUMABLE, as 'key: a -> b'."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = prefix + k
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += resume_diff(a, b, key + ".")
        elif a != b and not _matches(key, RESUMABLE):
            out.append(f"{key}: {a!r} (checkpoint) -> {b!r} (now)")
    return out


def check_eval_overrides(overrides: list[str]) -> None:
    """eval.py may change only EVAL_OVERRIDABLE keys of a run's config."""
    bad = [o for o in overrides if not _matches(o.split("=", 1)[0].strip(), EVAL_OVERRIDABLE)]
    if bad:
        raise ConfigError(f"eval can only override {', '.join(EVAL_OVERRIDABLE)} keys, not: {', '.join(bad)}")


# --- validation ----------------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Every check that needs no devices and no data: each field's range, then the rules across fields.
    Checks against the processes and the mesh are `check_placement`."""
    for sec in dataclasses.fields(Config):
        obj = getattr(cfg, sec.name)
        if not dataclasses.is_dataclass(obj):
            continue
        for fl in dataclasses.fields(obj):
            rng, v = fl.metadata.get("range"), getattr(obj, fl.name)
            if rng is not None and not rng.ok(v):
                bound = f" (at most {INT_MAX}: int32)" if rng.hi == INT_MAX and abs(v) > INT_MAX else ""
                raise ConfigError(f"{sec.name}.{fl.name} must be {rng.describe()}{bound}, got {v!r}")
    m, o, t = cfg.model, cfg.optim, cfg.train
    _check(m.head_dim > 0 or m.d_model % m.num_heads == 0,
           f"model.num_heads ({m.num_heads}) must divide model.d_model ({m.d_model}), or set model.head_dim")
    kv = m.num_kv_heads or m.num_heads
    _check(m.num_heads % kv == 0, f"model.num_kv_heads ({kv}) must divide model.num_heads ({m.num_heads})")
    hd = m.head_dim or m.d_model // m.num_heads
    _check(hd % 2 == 0, f"model.head_dim must be even for RoPE, got {hd}")
    why = splash_unsupported(t.seq_len, hd, m.attention_block_q, m.attention_block_kv, tiles_only=m.attention != "splash")
    _check(why is None, f"{why} (model.attention={m.attention})")
    for name in ("megablox_tile_m", "megablox_tile_k", "megablox_tile_n"):
        tile = getattr(m, name)
        _check(tile % SPLASH_LANES == 0, f"model.{name} ({tile}) must be a multiple of {SPLASH_LANES} (the TPU "
                                         "lane width) for the megablox kernels")
    if is_moe(m):
        _check(m.num_layers % m.moe_every == 0,
               f"model.moe_every ({m.moe_every}) must divide model.num_layers ({m.num_layers})")
        _check(m.top_k <= m.num_experts,
               f"model.top_k ({m.top_k}) must be <= model.num_experts ({m.num_experts})")
        _check(m.router_score != "sigmoid" or m.renormalize_gates or m.routed_scaling_factor != 1.0,
               "model.router_score=sigmoid needs model.renormalize_gates=true or a model.routed_scaling_factor: "
               "raw sigmoid gates put the output scale at the router's mercy (DeepSeek-V3 renormalises)")
        _check(m.router_bias_update_rate == 0 or m.top_k < m.num_experts,
               f"model.router_bias_update_rate has no effect with model.top_k = model.num_experts ({m.num_experts}):"
               " every expert is always chosen; set it to 0")
    else:
        on = [n for n in ("seq_aux_loss_weight", "global_aux_loss_weight", "router_bias_update_rate")
              if getattr(m, n) > 0]
        _check(not on, f"model.{on[0] if on else ''} is set but the model is dense (model.num_experts=0 or "
                       "model.moe_every=0): no router to balance; set it to 0")
    _check(t.batch_size % o.grad_accum == 0,
           f"optim.grad_accum ({o.grad_accum}) must divide train.batch_size ({t.batch_size})")
    _check([getattr(cfg.mesh, k) for k in ("data", "fsdp", "expert", "tensor")].count(-1) <= 1,
           "mesh: at most one of data/fsdp/expert/tensor may be -1 (fill)")
    d = cfg.data
    _check(d.source != "tfds" or bool(d.tfds_name), "data.tfds_name is required with data.source=tfds (e.g. c4/en:3.1.0)")
    _check(d.source != "files" or bool(d.files), "data.files is required with data.source=files (paths or globs)")
    _check(d.source != "packages" or bool(d.packages),
           "data.packages is required with data.source=packages (installed distributions, e.g. [numpy, scipy])")


def check_placement(cfg: Config, *, processes: int = 1, mesh_shape: dict[str, int] | None = None,
                    batch_axes: tuple[str, ...] = ("data", "fsdp", "expert")) -> None:
    """The divisibility rules that need the run's processes or mesh, all here: the global batch splits evenly
    over the processes, each micro-batch over the mesh's batch axes, and the experts over `expert`."""
    t = cfg.train
    _check(t.batch_size % processes == 0,
           f"train.batch_size ({t.batch_size}) must be divisible by the {processes} processes")
    if mesh_shape is None:
        return
    ways = math.prod(mesh_shape[a] for a in batch_axes)
    micro = t.batch_size // cfg.optim.grad_accum
    _check(micro % ways == 0, f"train.batch_size ({t.batch_size}) / optim.grad_accum ({cfg.optim.grad_accum}) = "
           f"{micro} rows must be divisible by {'*'.join(batch_axes)} = {ways} (mesh {mesh_shape})")
    if is_moe(cfg.model):
        _check(cfg.model.num_experts % mesh_shape["expert"] == 0,
               f"model.num_experts ({cfg.model.num_experts}) must be divisible by mesh.expert ({mesh_shape['expert']})")


def is_moe(m: ModelConfig) -> bool:
    return m.num_experts > 0 and m.moe_every > 0


SPLASH_LANES = 128  # the TPU lane width: splash / megablox tiles and splash sequence lengths are multiples of it


def splash_unsupported(seq_len: int, head_dim: int, block_q: int = 0, block_kv: int = 0, *,
                       tiles_only: bool = False) -> str | None:
    """Why the TPU splash-attention kernel (moe/model/splash.py) cannot take these shapes, naming the field and
    the fix; None if it can. `tiles_only`: check only the configured tiles."""
    if tiles_only:
        return splash_unsupported(seq_len, SPLASH_LANES, block_q, block_kv) if block_q or block_kv else None
    if seq_len % SPLASH_LANES:
        return f"train.seq_len ({seq_len}) must be a multiple of {SPLASH_LANES} for splash attention"
    if head_dim % SPLASH_LANES and head_dim != 64:
        return f"model.head_dim ({head_dim}) must be 64 or a multiple of {SPLASH_LANES} for splash attention"
    for name, b in (("model.attention_block_q", block_q), ("model.attention_block_kv", block_kv)):
        if b and (b % SPLASH_LANES or seq_len % b):
            return (f"{name} ({b}) must be a multiple of {SPLASH_LANES} that divides train.seq_len ({seq_len}); "
                    "0 = auto")
    return None


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


RESUMABLE = _flagged("resume")  # keys that may differ from the checkpoint's config when a run resumes
EVAL_OVERRIDABLE = _flagged("eval")  # keys eval.py's `key=value` may change
