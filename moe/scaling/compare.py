"""Variants of one sweep side by side: `python -m moe.scaling compare SWEEP.yaml` -> compare.md + plots.

Owns: grouping a sweep's finished points into variants (the points' settings other than the seed), the
per-variant figures over seeds, and their training curves. Reads each point's summary.json and
metrics.jsonl; runs and fits nothing (moe.scaling.runner runs, moe.scaling.fit fits).

Per variant, over its seeds: the final eval loss (mean, and half the range as the spread), and from the
logged training steps the max/mean expert load (the worst MoE layer of each step, `load_imbalance`),
the drop fraction and the throughput, averaged over the last quarter of training (`tail`) and, for the load,
also its worst logged value after the run's warmup (early routing
is near-uniform noise, and an un-biased router can start collapsed). docs/routing.md is written from these tables.
"""

from __future__ import annotations

import statistics
from typing import Any

import yaml

from moe.runtime import storage
from moe.scaling.sweep import Sweep
from moe.train.metrics import read_metrics

CURVES = ("loss", "load_imbalance", "drop_fraction")  # metrics drawn against the step, one line per variant


def _label(point_overrides: tuple[str, ...], shared: set[str]) -> str:
    own = [o for o in point_overrides if o not in shared and not o.startswith("train.seed=")]
    return " ".join(o.split(".", 1)[1] for o in own) or "(base)"


def _series(records: list[dict], key: str) -> dict[int, float]:
    """step -> value of a logged metric; a per-layer list becomes its max (the worst layer)."""
    out = {}
    for r in records:
        v = r.get(key)
        if v is None:
            continue
        out[r["step"]] = max(v) if isinstance(v, list) else float(v)
    return out


def _warmup(run_dir: str) -> int:
    """The run's optim.warmup_steps, from the resolved config it wrote (0 if it has none yet)."""
    try:
        return int(yaml.safe_load(storage.read_text(storage.join(run_dir, "config.yaml")))["optim"]["warmup_steps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return 0


def _tail_mean(series: dict[int, float], steps: int, fraction: float = 0.25) -> float | None:
    vals = [v for s, v in series.items() if s > steps * (1 - fraction)]
    return statistics.fmean(vals) if vals else None


def _mean_spread(vals: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2


def compare(sweep: Sweep, workdir: str) -> list[dict[str, Any]]:
    """One row per variant (in sweep order) with its figures and per-seed curves."""
    shared = set.intersection(*(set(p.overrides) for p in sweep.points)) if sweep.points else set()
    variants: dict[str, dict[str, Any]] = {}
    for p in sweep.points:
        label = _label(p.overrides, shared)
        v = variants.setdefault(label, {"variant": label, "runs": []})
        records = read_metrics(storage.join(workdir, p.name))  # [] before the run logged anything
        steps = max((r["step"] for r in records), default=0)
        train_records = [r for r in records if "tokens_per_sec" in r]
        warmup = _warmup(storage.join(workdir, p.name))
        evals = [r for r in records if r.get("eval_loss") is not None]
        load = _series(train_records, "load_imbalance")
        v["runs"].append({
            "name": p.name, "steps": steps,
            "eval_loss": evals[-1]["eval_loss"] if evals and evals[-1]["step"] == steps else None,
            "load_tail": _tail_mean(load, steps),
            "load_worst": max((x for s, x in load.items() if s > warmup), default=None),
            "drop_tail": _tail_mean(_series(train_records, "drop_fraction"), steps),
            "tokens_per_sec": statistics.median([r["tokens_per_sec"] for r in train_records[1:]] or [0.0]) or None,
            "curves": {k: _series(train_records, k) for k in CURVES},
        })
    rows = []
    for v in variants.values():
        runs = [r for r in v["runs"] if r["eval_loss"] is not None]
        row = {"variant": v["variant"], "seeds": len(runs), "runs": v["runs"]}
        for key in ("eval_loss", "load_tail", "load_worst", "drop_tail", "tokens_per_sec"):
            row[key], row[key + "_spread"] = _mean_spread([r[key] for r in runs])
        rows.append(row)
    return rows


def _fmt(mean: float | None, spread: float | None, digits: int) -> str:
    if mean is None:
        return ""
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if spread else f"{mean:.{digits}f}"


def write_compare(rows: list[dict], workdir: str) -> str:
    """compare.md (the table) and plots/compare_<metric>.png (mean over seeds vs step); returns the table."""
    head = ("| variant | seeds | eval loss | max/mean load, last 25% | worst max/mean load | drop fraction, "
            "last 25% | tokens/s |")
    md = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['seeds']} | {_fmt(r['eval_loss'], r['eval_loss_spread'], 4)} | "
                  f"{_fmt(r['load_tail'], r['load_tail_spread'], 3)} | {_fmt(r['load_worst'], r['load_worst_spread'], 2)} | "
                  f"{_fmt(r['drop_tail'], r['drop_tail_spread'], 4)} | {_fmt(r['tokens_per_sec'], None, 0)} |")
    table = "\n".join(md)
    storage.write_text(storage.join(workdir, "compare.md"), table + "\n\n± is half the range over seeds.\n")
    _plot(rows, storage.join(workdir, "plots"))
    return table


def _plot(rows: list[dict], folder: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key in CURVES:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in rows:
            curves = [run["curves"][key] for run in r["runs"] if run["curves"][key]]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], label=r["variant"], lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(key + (" (worst MoE layer)" if key == "load_imbalance" else ""))
        if key == "loss":
            ax.set_ylim(top=min(ax.get_ylim()[1], 8.0))
        ax.legend(fontsize=7)
        ax.set_title(f"{key}, mean over seeds")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        storage.write_bytes(storage.join(folder, f"compare_{key}.png"), buf.getvalue())
