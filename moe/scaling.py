"""Scaling-law sweeps: one sweep file -> many train.py runs -> one table -> fits -> plots.

Owns: the sweep-file format, run naming, the sequential resumable runner, the results table and the
CLI. The numerics live in `moe.scaling_fit`, the figures in `moe.scaling_plot`. Must not touch a run's
internals: each point is an ordinary `train.py` run with its own workdir and `summary.json`.

    python -m moe.scaling run configs/sweeps/tiny_sizes.yaml            # runs/sweeps/tiny_sizes/<point>/
    python -m moe.scaling emit configs/sweeps/glam_isoflop.yaml --tpu v5p --zone us-east5-a --type v5p-128 \
        --workdir gs://bucket/sweeps/glam_isoflop
    python -m moe.scaling collect configs/sweeps/tiny_sizes.yaml        # results.csv + results.md
    python -m moe.scaling fit configs/sweeps/tiny_sizes.yaml --form chinchilla --target-flops 1e21
    python -m moe.scaling plot configs/sweeps/tiny_sizes.yaml           # plots/*.png

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
"""

from __future__ import annotations

import argparse
import csv
import difflib
import itertools
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from moe.config import Config, ConfigError, all_keys, apply_overrides, from_dict, is_moe, read_preset

REPO = Path(__file__).resolve().parent.parent
SWEEP_KEYS = ("base", "description", "fixed", "sizes", "budgets", "compute_budgets", "lrs", "seeds",
              "warmup_fraction", "grid", "points")
NAMED_KEYS = {"model.d_model", "model.num_layers", "model.num_experts", "optim.lr", "train.seed", "train.steps",
              "optim.warmup_steps"}  # already spelled out in every run name


class SweepError(ValueError):
    """A malformed sweep file; the message names the file and the offending entry."""


@dataclass(frozen=True)
class Point:
    name: str  # stable run name derived from the settings, e.g. d128-l4-e8-tok1.2M-lr3e-3-s0
    overrides: tuple[str, ...]  # key.sub=value for train.py, applied in order
    size: str = ""  # size-ladder name
    budget_tokens: float | None = None  # token budget asked for
    budget_flops: float | None = None  # compute budget asked for


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    base: Path
    points: tuple[Point, ...]


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
    from moe.model import flops_per_token

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
    return Sweep(path, path.stem, base, tuple(points))


# --- running ---------------------------------------------------------------------------------------


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _tail(log: Path, lines: int = 3) -> str:
    text = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    return " | ".join(text[-lines:])


def run_sweep(sweep: Sweep, workdir: Path, *, env: dict | None = None, echo: Callable[[str], None] = print) -> int:
    """Runs every point in order: finished ones (summary.json done) are skipped, unfinished ones resume
    (train.py resumes from the workdir's checkpoints), a failing one is recorded and the sweep goes on.

    Returns 0 when every point is done, else 1. Each point's outcome is in <workdir>/<name>/point.json.
    """
    failed, n = [], len(sweep.points)
    for i, p in enumerate(sweep.points, 1):
        run_dir = workdir / p.name
        summary = read_summary(run_dir)
        if summary and summary.get("done"):
            echo(f"[{i}/{n}] {p.name}: done already (eval_loss {_cell(summary.get('eval_loss'))})")
            continue
        resumed = run_dir.is_dir() and (run_dir / "checkpoints").is_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(REPO / "train.py"), "--config", str(sweep.base), "--workdir", str(run_dir),
               *p.overrides, "train.progress=false"]  # a progress bar in a log file is noise
        t0 = time.time()
        with open(run_dir / "train.log", "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
        summary = read_summary(run_dir)
        ok = rc == 0 and bool(summary and summary.get("done"))
        status = "done" if ok else ("interrupted" if rc == 75 else "failed")
        record = {"name": p.name, "status": status, "returncode": rc, "overrides": list(p.overrides),
                  "size": p.size, "budget_tokens": p.budget_tokens, "budget_flops": p.budget_flops,
                  "attempt_wall_s": round(time.time() - t0, 1), "error": "" if ok else _tail(run_dir / "train.log")}
        (run_dir / "point.json").write_text(json.dumps(record, indent=1))
        how = "resumed, " if resumed else ""
        if ok:
            echo(f"[{i}/{n}] {p.name}: done ({how}eval_loss {_cell(summary.get('eval_loss'))}, {record['attempt_wall_s']}s)")
        else:
            failed.append(p.name)
            echo(f"[{i}/{n}] {p.name}: {status.upper()} (exit {rc}; {how}log {_rel(run_dir / 'train.log')}): {record['error']}")
    echo(f"{n} points: {n - len(failed)} done, {len(failed)} not done" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def emit_commands(sweep: Sweep, workdir: str, tpu: dict | None = None) -> list[str]:
    """One shell line per point: local train.py, or `python -m moe.launch tpu ... -- <train args>`."""
    import shlex

    lines = []
    for p in sweep.points:
        args = ["--config", _rel(sweep.base), "--workdir", f"{workdir.rstrip('/')}/{p.name}", *p.overrides]
        head = ["python", "train.py"] if tpu is None else [
            "python", "-m", "moe.launch", "tpu", "--name", tpu["name"], "--zone", tpu["zone"], "--type", tpu["type"], "--"]
        lines.append(shlex.join(head + args))
    return lines


# --- results table ---------------------------------------------------------------------------------

COLUMNS = ("name", "status", "size", "N_total", "N_active", "E", "tokens", "flops", "eval_loss", "bits_per_byte",
           "wall_time_s", "budget_tokens", "budget_flops")


def collect(sweep: Sweep, workdir: Path) -> list[dict]:
    """One row per point; N, E, tokens and FLOPs come from summary.json, the planned config otherwise."""
    base_tree = read_preset(sweep.base)
    rows = []
    for p in sweep.points:
        tree = apply_overrides(base_tree, list(p.overrides))
        row = dict.fromkeys(COLUMNS)
        row.update(name=p.name, size=p.size, budget_tokens=p.budget_tokens, budget_flops=p.budget_flops)
        try:
            cfg = from_dict(tree)
            row["E"] = cfg.model.num_experts if is_moe(cfg.model) else 1
        except ConfigError:
            cfg = None
        s = read_summary(workdir / p.name)
        if s and s.get("done"):
            loss = s.get("eval_loss") if s.get("eval_loss") is not None else s.get("loss")
            row.update(status="done", N_total=s["params_total"], N_active=s["params_active"], tokens=s["tokens"],
                       flops=s["flops"], eval_loss=loss, bits_per_byte=s.get("bits_per_byte"),
                       wall_time_s=s.get("wall_time_s"))
        else:
            try:
                row["status"] = json.loads((workdir / p.name / "point.json").read_text())["status"]
            except (OSError, ValueError, KeyError):
                row["status"] = "pending"
            if cfg is not None:
                from moe.model import param_counts

                row["N_total"], row["N_active"] = param_counts(cfg.model)
                row["tokens"] = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
        rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def write_table(rows: list[dict], workdir: Path) -> str:
    """Writes results.csv and results.md under workdir; returns the markdown."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    (workdir / "results.md").write_text("\n".join(md) + "\n")
    return "\n".join(md)


# --- fit and CLI -----------------------------------------------------------------------------------


def fit_rows(rows: list[dict], form: str, *, params: str = "active", target_flops: float | None = None,
             bootstrap: int = 100) -> dict:
    """Fits `form` to the finished rows (N = active or total params, D = tokens, L = final eval loss)."""
    from moe import scaling_fit as sf

    done = [r for r in rows if r["status"] == "done" and r["eval_loss"] is not None]
    n = [r["N_active" if params == "active" else "N_total"] for r in done]
    loss = [r["eval_loss"] for r in done]
    if form == "chinchilla":
        out = sf.fit_chinchilla(n, [r["tokens"] for r in done], loss, bootstrap=bootstrap, target_flops=target_flops)
    elif form == "isoflop":
        if any(r["budget_flops"] is None for r in done):
            raise sf.FitError("isoflop needs a sweep with compute_budgets: (points grouped by FLOP budget)")
        out = sf.fit_isoflop(n, [r["budget_flops"] for r in done], loss, bootstrap=bootstrap, target_flops=target_flops)
    elif form == "moe":
        out = sf.fit_moe(n, [r["E"] for r in done], loss)
    else:
        raise sf.FitError(f"unknown form '{form}'; choose chinchilla, isoflop or moe")
    out.update(points=[r["name"] for r in done], n_param=params)
    return out


def format_fit(fit: dict) -> str:
    iv = fit.get("intervals", {})
    lines = [f"{fit['form']} fit on {fit['n_points']} points:"]
    for k, v in fit["params"].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            ci = f"  95% CI [{iv[k][0]:.4g}, {iv[k][1]:.4g}]" if k in iv else ""
            lines.append(f"  {k:>8} = {v:.4g}{ci}")
    if "target" in fit:
        t = fit["target"]
        lines.append(f"  at C = {t['flops']:.3g} FLOPs (C = 6 N D): N* = {t['N_opt']:.4g}, D* = {t['D_opt']:.4g}"
                     + (f", L* = {t['loss']:.4f}" if "loss" in t else ""))
        for k in ("N_opt", "D_opt", "loss_opt"):
            if k in iv:
                lines.append(f"  {k:>8} 95% CI [{iv[k][0]:.4g}, {iv[k][1]:.4g}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("run", "emit", "collect", "fit", "plot"):
        s = sub.add_parser(cmd)
        s.add_argument("sweep")
        s.add_argument("--workdir", default="", help="sweep folder (default runs/sweeps/<sweep name>)")
        if cmd == "emit":
            for f in ("--tpu", "--zone", "--type"):
                s.add_argument(f, default="", help="emit moe.launch tpu lines (all three needed)")
        if cmd == "fit":
            s.add_argument("--form", default="chinchilla", choices=("chinchilla", "isoflop", "moe"))
            s.add_argument("--target-flops", type=float, default=None, help="predict N*, D*, loss at this budget")
            s.add_argument("--params", default="active", choices=("active", "total"), help="N in the law")
            s.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals")
    a = ap.parse_args(argv)
    from moe.scaling_fit import FitError

    try:
        sweep = load_sweep(a.sweep)
        workdir = Path(a.workdir or f"runs/sweeps/{sweep.name}")
        if a.cmd == "run":
            return run_sweep(sweep, workdir.resolve())
        if a.cmd == "emit":
            tpu = {"name": a.tpu, "zone": a.zone, "type": a.type} if a.tpu else None
            if tpu and not (a.zone and a.type):
                raise SweepError("emit --tpu needs --zone and --type too")
            print("\n".join(emit_commands(sweep, a.workdir or f"runs/sweeps/{sweep.name}", tpu)))
            return 0
        rows = collect(sweep, workdir)
        if a.cmd == "collect":
            print(write_table(rows, workdir))
            return 0
        if a.cmd == "fit":
            fit = fit_rows(rows, a.form, params=a.params, target_flops=a.target_flops, bootstrap=a.bootstrap)
            (workdir / f"fit_{a.form}.json").write_text(json.dumps(fit, indent=1))
            print(format_fit(fit) + f"\nwrote {workdir / f'fit_{a.form}.json'}")
            return 0
        from moe.scaling_plot import plot_all

        fits = {f: json.loads((workdir / f"fit_{f}.json").read_text())
                for f in ("chinchilla", "isoflop", "moe") if (workdir / f"fit_{f}.json").exists()}
        for p in plot_all(rows, fits, workdir / "plots"):
            print(f"wrote {p}")
        return 0
    except (SweepError, FitError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
