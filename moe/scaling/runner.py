"""Scaling-law sweeps: one sweep file -> many train.py runs -> one table -> fits -> plots.

Owns: the CLI, local launch lines and the results table. The sweep-file format, expansion and run names live
in `moe.scaling.sweep`; running one point, its state and the skip rule in `moe.scaling.points`; the TPU
queued-resource script and the SLURM job array in `moe.scaling.cluster`; the numerics in `moe.scaling.fit`,
the figures in `moe.scaling.plot`. Must not touch a run's internals: each point is an ordinary `train.py` run
with its own workdir and `summary.json`. Every command reads and writes the sweep's workdir through
moe/runtime/storage.py, so it may be a bucket (gs://...) as well as a folder.

    python -m moe.scaling run configs/sweeps/tiny_sizes.yaml            # runs/sweeps/tiny_sizes/<point>/
    python -m moe.scaling emit configs/sweeps/glam_isoflop.yaml --tpu iso --zone us-east5-a --type v5p-128 \
        --workdir gs://bucket/sweeps/glam_isoflop --parallel 4 > sweep.sh   # then: bash sweep.sh (re-runnable)
    python -m moe.scaling emit configs/sweeps/glam_isoflop.yaml --slurm --nodes 2 --gpus-per-node 8 \
        --workdir gs://bucket/sweeps/glam_isoflop > sweep.sbatch             # then: sbatch sweep.sbatch
    python -m moe.scaling status configs/sweeps/glam_isoflop.yaml --workdir gs://bucket/sweeps/glam_isoflop
    python -m moe.scaling collect configs/sweeps/tiny_sizes.yaml        # results.csv + results.md
    python -m moe.scaling fit configs/sweeps/tiny_sizes.yaml --form chinchilla --target-flops 1e21
    python -m moe.scaling plot configs/sweeps/tiny_sizes.yaml           # plots/*.png
    python -m moe.scaling compare configs/sweeps/routing_tiny.yaml      # variants over seeds (moe.scaling.compare)
    python -m moe.scaling report --claim moe_vs_dense --run             # the evidence study (moe.scaling.report)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import moe.scaling.sweep
from moe.config import ConfigError
from moe.runtime import storage
from moe.scaling.points import COLUMNS, _cell, collect, read_json, run_sweep  # noqa: F401 (collect, run_sweep: the API)
from moe.scaling.sweep import Sweep, SweepError, load_sweep

REPO = Path(__file__).resolve().parents[2]

# --- emission --------------------------------------------------------------------------------------


def emit_commands(sweep: Sweep, workdir: str) -> list[str]:
    """One local `train.py` line per point (for a cluster, `emit --tpu` / `--slurm`: moe/scaling/cluster.py)."""
    import shlex

    return [shlex.join(["python", "train.py", "--config", _rel(sweep.base), "--workdir",
                        storage.join(workdir, p.name), *p.overrides]) for p in sweep.points]


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# --- results table ---------------------------------------------------------------------------------

def write_table(rows: list[dict], workdir: str | os.PathLike) -> str:
    """Writes results.csv and results.md under workdir (a folder or a bucket); returns the markdown."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    storage.write_text(storage.join(workdir, "results.csv"), buf.getvalue())
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    storage.write_text(storage.join(workdir, "results.md"), "\n".join(md) + "\n")
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
    for cmd in ("run", "point", "status", "emit", "collect", "fit", "plot", "compare"):
        s = sub.add_parser(cmd)
        s.add_argument("sweep")
        s.add_argument("--workdir", default="", help="sweep folder or bucket URL (default runs/sweeps/<sweep name>)")
        if cmd in ("point", "status"):
            s.add_argument("--point", default="", required=cmd == "point",
                           help="one point's name" + ("; status prints its state, exit 0 iff done" * (cmd == "status")))
        if cmd == "status":
            s.add_argument("--since", type=float, default=0.0, help="with --point: ignore attempts started before "
                           "this Unix time (a scheduler polling the attempt it just launched)")
        if cmd == "emit":
            s.add_argument("--tpu", default="", metavar="PREFIX",
                           help="a bash script: one queued resource PREFIX-<i> per point (needs --zone, --type)")
            s.add_argument("--zone", default="")
            s.add_argument("--type", default="", help="TPU type per point, e.g. v5p-128")
            s.add_argument("--slices", type=int, default=0, help="slices per point (default: the preset's mesh.dcn_data)")
            s.add_argument("--spot", action="store_true")
            s.add_argument("--project", default="")
            s.add_argument("--retries", type=int, default=3, help="re-launches of an interrupted (preempted) point")
            s.add_argument("--slurm", action="store_true", help="an sbatch job array, one task per point")
            s.add_argument("--nodes", type=int, default=1)
            s.add_argument("--gpus-per-node", type=int, default=8)
            s.add_argument("--time", default="24:00:00")
            s.add_argument("--partition", default="")
            s.add_argument("--account", default="")
            s.add_argument("--parallel", type=int, default=0, help="points at a time (TPU default 1, SLURM no limit)")
        if cmd == "fit":
            s.add_argument("--form", default="chinchilla", choices=("chinchilla", "isoflop", "moe"))
            s.add_argument("--target-flops", type=float, default=None, help="predict N*, D*, loss at this budget")
            s.add_argument("--params", default="active", choices=("active", "total"), help="N in the law")
            s.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals")
    from moe.scaling import report as rp

    r = sub.add_parser("report", help="the evidence study's claims -> docs/results.json (moe/scaling/report.py)")
    r.add_argument("--claim", action="append", choices=list(rp.CLAIMS), help="only this claim (repeatable; default all)")
    r.add_argument("--run", action="store_true", help="first run (or resume) the claims' sweeps on this machine")
    r.add_argument("--workdir", default="runs/sweeps", help="folder or bucket holding one folder per sweep")
    r.add_argument("--out", default="docs/results.json", help="results.json to write (other claims in it are kept)")
    r.add_argument("--plots", default="docs/results", help="folder for the figures ('' for none)")
    r.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the fits' intervals")
    a = ap.parse_args(argv)
    if a.cmd == "report":
        return _report(a)
    from moe.launch.jobs import LaunchError
    from moe.scaling import cluster, points
    from moe.scaling.fit import FitError

    try:
        sweep = load_sweep(a.sweep)
        workdir = a.workdir or f"runs/sweeps/{sweep.name}"
        storage.scheme(workdir)
        if not storage.is_url(workdir):
            workdir = os.path.abspath(workdir)
        if a.cmd == "run":
            return run_sweep(sweep, workdir)
        if a.cmd in ("point", "status") and a.point:
            by_name = {p.name: p for p in sweep.points}
            if a.point not in by_name:
                raise SweepError(f"--point {a.point!r} is not a point of {a.sweep} ({len(by_name)} points; "
                                 "`python -m moe.scaling status` lists them)")
            if a.cmd == "point":
                status, rc, error = points.run_point(sweep, by_name[a.point], workdir)
                print(f"{a.point}: {status}" + (f" (exit {rc}): {error}" if rc else ""))
                return rc
            state = points.point_state(workdir, by_name[a.point], since=a.since)["state"]
            print(state)
            return 0 if state == "done" else 1
        if a.cmd == "status":
            print(points.format_status(points.sweep_status(sweep, workdir)))
            return 0
        if a.cmd == "emit":
            if a.tpu:
                if not (a.zone and a.type):
                    raise SweepError("emit --tpu needs --zone and --type too")
                print(cluster.tpu_script(sweep, workdir, prefix=a.tpu, zone=a.zone, tpu_type=a.type, slices=a.slices,
                                         spot=a.spot, project=a.project, parallel=a.parallel or 1,
                                         retries=a.retries), end="")
            elif a.slurm:
                print(cluster.slurm_script(sweep, workdir, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                                           parallel=a.parallel, time=a.time, partition=a.partition,
                                           account=a.account), end="")
            else:
                print("\n".join(emit_commands(sweep, workdir)))
            return 0
        if a.cmd == "compare":
            from moe.scaling.compare import compare, write_compare

            print(write_compare(compare(sweep, workdir), workdir) + f"\nwrote {storage.join(workdir, 'compare.md')}")
            return 0
        rows = collect(sweep, workdir)
        if a.cmd == "collect":
            print(write_table(rows, workdir))
            return 0
        if a.cmd == "fit":
            fit = fit_rows(rows, a.form, params=a.params, target_flops=a.target_flops, bootstrap=a.bootstrap)
            out = storage.join(workdir, f"fit_{a.form}.json")
            storage.write_text(out, json.dumps(fit, indent=1))
            print(format_fit(fit) + f"\nwrote {out}")
            return 0
        from moe.scaling.plot import plot_all

        fits = {f: read_json(storage.join(workdir, f"fit_{f}.json")) for f in ("chinchilla", "isoflop", "moe")}
        for p in plot_all(rows, {k: v for k, v in fits.items() if v}, storage.join(workdir, "plots")):
            print(f"wrote {p}")
        return 0
    except (SweepError, FitError, ConfigError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _report(a) -> int:
    from moe.scaling import report as rp
    from moe.scaling.fit import FitError

    try:
        claims = a.claim or list(rp.CLAIMS)
        if a.run:
            for c in claims:
                for f in rp.run_claim(c, a.workdir):
                    raise rp.ReportError(f"claim {c}: points of configs/sweeps/{f} failed; "
                                         f"`python -m moe.scaling status configs/sweeps/{f}` shows which and why")
        previous = read_json(a.out) if storage.exists(a.out) else None
        report = rp.build(a.workdir, claims, bootstrap=a.bootstrap, previous=previous)
        print(rp.summary(report) + f"\nwrote {rp.write(report, a.out)}")
        if a.plots:
            from moe.scaling.plot import plot_report

            for p in plot_report(report, a.plots):
                print(f"wrote {p}")
        return 0
    except (rp.ReportError, SweepError, FitError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
