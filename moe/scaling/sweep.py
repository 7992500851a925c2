"""Sweep files: one YAML file -> a list of named train.py runs (points).

Owns: the sweep-file format, its validation (SweepError names the file and the entry), the expansion
sizes x budgets x lrs x seeds x (grid | points), token / compute budgets -> train.steps, and the stable
run names. Must not touch: running, collecting or fitting (moe.scaling.runner, moe.scaling.fit) or the config
schema itself (moe.config); config *values* are checked by train.py when a point runs.

Sweep file (every key but `base` optional; points = sizes x budgets x lrs x seeds x (grid | points)):

    base: ../tiny.yaml                  # preset, relative to this file
    fixed: {train.batch_size: 8}        # overrides for every point
    sizes: [{name: s, model.d_model: 32, model.num_layers: 2}, ...]   # a named size ladder
    budgets: [30720, 92160]             # tokens; train.steps = round(tokens / (batch_size * seq_len))
    compute_budgets: [1e15, 3e15]       # or FLOPs; tokens = C / flops_per_token(model, seq_len)
    lrs: [3e-3]                         # optim.lr
    seeds: [0]                          # train.seed
    warmup_fraction: 0.1                # optim.warmup_steps = round(fraction * steps), per point
    grid: {model.top_k: [1, 2]}         # cartesian product, or
    points: [{model.top_k: 1}, ...]     # an explicit list of override sets
    eval_full: true                     # after training, eval.py on the full validation split -> eval_full.json;
                                        # its loss is the point's eval_loss (docs/results.md uses no other)
"""

from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moe.config import Config, ConfigError, all_keys, apply_overrides, from_dict, read_preset

SWEEP_KEYS = ("base", "description", "fixed", "sizes", "budgets", "compute_budgets", "lrs", "seeds",
              "warmup_fraction", "grid", "points", "eval_full")
NAMED_KEYS = {"model.d_model", "model.num_layers", "model.num_experts", "optim.lr", "train.seed", "train.steps",
              "optim.warmup_steps"}  # already spelled out in every run name


class SweepError(ValueError):
    """A malformed sweep file; the message names the file and the offending entry."""


@dataclass(frozen=True)
class Point:
    """One run of a sweep: train.py on the base preset with these overrides."""

    name: str  # stable run name derived from the settings, e.g. d128-l4-e8-tok1.2M-lr3e-3-s0
    overrides: tuple[str, ...]  # key.sub=value for train.py, applied in order
    size: str = ""  # size-ladder name
    budget_tokens: float | None = None  # token budget asked for
    budget_flops: float | None = None  # compute budget asked for


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: its name (the file stem), base preset and expanded points, in run order."""

    path: Path
    name: str
    base: Path
    points: tuple[Point, ...]
    eval_full: bool = False  # each point's eval_loss is eval.py's on the full validation split


# --- parsing ---------------------------------------------------------------------------------------


def _number(where: str, value: Any, *, integer: bool = False) -> float:
    try:  # PyYAML reads 1e6 (no dot) as a string
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not (math.isfinite(x) and x > 0 or integer and x == 0) or integer and not x.is_integer():
        raise SweepError(f"{where}: expected a positive {'integer' if integer else 'number'}, got {value!r}")
    return int(x) if integer else x


def _list(where: str, value: Any) -> list:
    if not isinstance(value, list) or not value:
        raise SweepError(f"{where}: expected a non-empty list, got {value!r}")
    return value


def _overrides(where: str, entry: Any, valid: set[str], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise SweepError(f"{where}: expected a mapping of config key: value, got {entry!r}")
    out = {}
    for key, value in entry.items():
        if key in skip:
            continue
        if key not in valid:
            close = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.5)
            raise SweepError(f"{where}: unknown config key '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        if isinstance(value, dict):
            raise SweepError(f"{where}: {key} must be a value or a list, got a mapping")
        out[key] = value
    return out


def _fmt(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _short(x: float, unit: str = "") -> str:
    """1228800 -> '1.23M'; 3e-3 -> '3e-3'."""
    if unit:
        for div, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
            if x >= div:
                return f"{x / div:.3g}{s}"
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def _get(tree: dict, key: str) -> Any:
    sec, name = key.split(".")
    return tree.get(sec, {}).get(name, getattr(getattr(Config(), sec), name))


def _run_name(tree: dict, pt: dict, extras: dict[str, Any]) -> str:
    e = _get(tree, "model.num_experts") if _get(tree, "model.moe_every") else 0
    budget = f"C{_short(pt['budget_flops'])}" if pt["budget_flops"] else f"tok{_short(pt['tokens'], 'tok')}"
    parts = [f"d{_get(tree, 'model.d_model')}", f"l{_get(tree, 'model.num_layers')}", f"e{e}", budget,
             f"lr{_short(float(_get(tree, 'optim.lr')))}", f"s{_get(tree, 'train.seed')}"]
    parts += [f"{k.split('.')[-1].replace('_', '')}{_fmt(v)}" for k, v in extras.items() if k not in NAMED_KEYS]
    return "-".join(p.replace("/", "_").replace(" ", "") for p in parts)


def _flops_per_token(tree: dict, where: str) -> float:
    from moe.model.decoder import flops_per_token

    try:
        cfg = from_dict(tree)
    except ConfigError as e:
        raise SweepError(f"{where}: cannot size a compute budget for an invalid config: {e}") from None
    return flops_per_token(cfg.model, cfg.train.seq_len)


def load_sweep(path: str | Path) -> Sweep:
    """Reads and expands a sweep file; structural mistakes raise SweepError naming the entry.

    Config *values* are checked by train.py when the point runs (a bad one fails that point only);
    a compute-budget point is the exception, since sizing it needs a valid model config.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"{path}: cannot read sweep file ({e})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file must be a mapping with at least 'base:'")
    for key in raw:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            raise SweepError(f"{path}: unknown sweep key '{key}'" + (f"; did you mean '{close[0]}'?" if close
                                                                      else f"; valid: {', '.join(SWEEP_KEYS)}"))
    if not isinstance(raw.get("base"), str):
        raise SweepError(f"{path}: 'base:' must name a preset, relative to the sweep file (e.g. ../tiny.yaml)")
    base = (path.parent / raw["base"]).resolve()
    try:
        base_tree = read_preset(base)
    except ConfigError as e:
        raise SweepError(f"{path}: base: {e}") from None
    valid = set(all_keys())
    fixed = _overrides(f"{path}: fixed", raw.get("fixed", {}), valid)
    sizes = [(None, {})]
    if "sizes" in raw:
        sizes = []
        for i, s in enumerate(_list(f"{path}: sizes", raw["sizes"])):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str):
                raise SweepError(f"{path}: sizes[{i}]: each size needs 'name:' plus config keys, got {s!r}")
            sizes.append((s["name"], _overrides(f"{path}: sizes[{i}] ({s['name']})", s, valid, skip=("name",))))
    if "budgets" in raw and "compute_budgets" in raw:
        raise SweepError(f"{path}: give either 'budgets:' (tokens) or 'compute_budgets:' (FLOPs), not both")
    budgets = [(None, None)]
    if "budgets" in raw:
        budgets = [(_number(f"{path}: budgets[{i}]", b), None) for i, b in enumerate(_list(f"{path}: budgets", raw["budgets"]))]
    if "compute_budgets" in raw:
        budgets = [(None, _number(f"{path}: compute_budgets[{i}]", b))
                   for i, b in enumerate(_list(f"{path}: compute_budgets", raw["compute_budgets"]))]
    lrs = [None] if "lrs" not in raw else [_number(f"{path}: lrs[{i}]", v) for i, v in enumerate(_list(f"{path}: lrs", raw["lrs"]))]
    seeds = [None] if "seeds" not in raw else [
        _number(f"{path}: seeds[{i}]", v, integer=True) for i, v in enumerate(_list(f"{path}: seeds", raw["seeds"]))]
    warmup = raw.get("warmup_fraction")
    if warmup is not None and not (isinstance(warmup, (int, float)) and 0 <= warmup < 1):
        raise SweepError(f"{path}: warmup_fraction must be a number in [0, 1), got {warmup!r}")
    if not isinstance(raw.get("eval_full", False), bool):
        raise SweepError(f"{path}: eval_full must be true or false, got {raw['eval_full']!r}")
    if "grid" in raw and "points" in raw:
        raise SweepError(f"{path}: give either 'grid:' or 'points:', not both")
    variants = [{}]
    if "grid" in raw:
        grid = _overrides(f"{path}: grid", raw["grid"], valid)
        for k, v in grid.items():
            _list(f"{path}: grid.{k}", v)
        variants = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    if "points" in raw:
        variants = [_overrides(f"{path}: points[{i}]", p, valid) for i, p in enumerate(_list(f"{path}: points", raw["points"]))]

    points, seen = [], {}
    for (size, size_ov), (tokens, flops), lr, seed, variant in itertools.product(sizes, budgets, lrs, seeds, variants):
        ov = {**fixed, **size_ov, **variant}
        if lr is not None:
            ov["optim.lr"] = lr
        if seed is not None:
            ov["train.seed"] = seed
        where = f"{path}: point {size or ''} {variant or ''}".rstrip()
        try:
            tree = apply_overrides(base_tree, [f"{k}={_fmt(v)}" for k, v in ov.items()])
        except ConfigError as e:
            raise SweepError(f"{where}: {e}") from None
        per_step = int(_get(tree, "train.batch_size")) * int(_get(tree, "train.seq_len"))
        if flops:
            tokens_run = flops / _flops_per_token(tree, where)
        else:
            tokens_run = tokens or int(_get(tree, "train.steps")) * per_step
        if tokens or flops:
            ov["train.steps"] = max(1, round(tokens_run / per_step))
        if warmup is not None:
            ov["optim.warmup_steps"] = round(warmup * int(ov.get("train.steps", _get(tree, "train.steps"))))
        name = _run_name(tree, {"budget_flops": flops, "tokens": tokens or tokens_run}, {**size_ov, **variant})
        if name in seen:
            raise SweepError(f"{path}: two points share the run name '{name}' ({seen[name]} and {ov}); "
                             "make them differ in a named setting")
        seen[name] = ov
        points.append(Point(name, tuple(f"{k}={_fmt(v)}" for k, v in ov.items()), size or "", tokens, flops))
    return Sweep(path, path.stem, base, tuple(points), raw.get("eval_full", False))
