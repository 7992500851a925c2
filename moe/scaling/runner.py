"""Scaling-law sweeps: one sweep file -> many train.py runs -> one table -> fits -> plots.

Owns: the sequential resumable runner, launch-command emission, the results table and the CLI. The
sweep-file format, expansion and run names live in `moe.scaling.sweep`, the numerics in `moe.scaling.fit`, the
figures in `moe.scaling.plot`. Must not touch a run's internals: each point is an ordinary `train.py` run
with its own workdir and `summary.json`.

    python -m moe.scaling run configs/sweeps/tiny_sizes.yaml            # runs/sweeps/tiny_sizes/<point>/
    python -m moe.scaling emit configs/sweeps/glam_isoflop.yaml --tpu v5p --zone us-east5-a --type v5p-128 \
        --workdir gs://bucket/sweeps/glam_isoflop
    python -m moe.scaling collect configs/sweeps/tiny_sizes.yaml        # results.csv + results.md
    python -m moe.scaling fit configs/sweeps/tiny_sizes.yaml --form chinchilla --target-flops 1e21
    python -m moe.scaling plot configs/sweeps/tiny_sizes.yaml           # plots/*.png
    python -m moe.scaling compare configs/sweeps/routing_tiny.yaml      # variants over seeds (moe.scaling.compare)
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import moe.scaling.sweep
from moe.config import ConfigError, apply_overrides, from_dict, is_moe, read_preset
from moe.scaling.sweep import Sweep, SweepError, load_sweep

REPO = Path(__file__).resolve().parents[2]

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
                from moe.model.decoder import param_counts

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
    from moe.scaling import fit as sf

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
    ap = argparse.ArgumentParser(prog="python -m moe.scaling", description=__doc__ + "\n" + moe.scaling.sweep.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("run", "emit", "collect", "fit", "plot", "compare"):
        s = sub.add_parser(cmd)
        s.add_argument("sweep")
        s.add_argument("--workdir", default="", help="sweep folder (default runs/sweeps/<sweep name>)")
        if cmd == "emit":
            for f in ("--tpu", "--zone", "--type"):
                s.add_argument(f, default="", help="emit moe.launch.jobs tpu lines (all three needed)")
        if cmd == "fit":
            s.add_argument("--form", default="chinchilla", choices=("chinchilla", "isoflop", "moe"))
            s.add_argument("--target-flops", type=float, default=None, help="predict N*, D*, loss at this budget")
            s.add_argument("--params", default="active", choices=("active", "total"), help="N in the law")
            s.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals")
    a = ap.parse_args(argv)
    from moe.scaling.fit import FitError

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
        if a.cmd == "compare":
            from moe.scaling.compare import compare, write_compare

            print(write_compare(compare(sweep, workdir), workdir) + f"\nwrote {workdir / 'compare.md'}")
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
        from moe.scaling.plot import plot_all

        fits = {f: json.loads((workdir / f"fit_{f}.json").read_text())
                for f in ("chinchilla", "isoflop", "moe") if (workdir / f"fit_{f}.json").exists()}
        for p in plot_all(rows, fits, workdir / "plots"):
            print(f"wrote {p}")
        return 0
    except (SweepError, FitError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

