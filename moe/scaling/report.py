"""The evidence report: the study's sweeps -> docs/results.json (and its figures) in one command.

Owns: which sweep answers which claim (CLAIMS), the per-claim figures (means over seeds, best-vs-best, held-out
predictions) and results.json. Runs points only through `moe.scaling.points.run_sweep` (and the investigation's
expert diagnostics through `moe.eval.experts`), reads them only through `moe.scaling.points.collect`, fits only
through `moe.scaling.fit`; docs/results.md is written from its output.

    python -m moe.scaling report --claim moe_vs_dense --run     # run (or resume) the claim's sweeps, then report
    python -m moe.scaling report                                # every claim from the finished runs -> results.json

Claims (the sweep files name the runs; every loss is eval.py's on the full validation split, `eval_full: true`):
    moe_vs_dense   per token budget, the mean over seeds of each MoE variant minus the dense model's
                   (`moe_minus_dense`); the variants have the dense model's active FLOPs per token and are
                   named by expert count and router overrides (e8, e32, e32-z0 = 32 experts, router z-loss 0)
    lion_vs_adamw  per model, the best Lion run minus the best AdamW run over their learning-rate grids
                   (`lion_minus_adamw`); a best lr at the edge of its grid is flagged
    scaling_dense, scaling_moe   Chinchilla approach 3 on the fit sweep's points within FIT_TOKENS, then each
                   held-out run's predicted vs measured loss (`prediction_error` = predicted / measured - 1);
                   the *_1epoch claims are the same test with every run within one epoch of the corpus, the
                   *_pysrc claims on a 6x larger corpus (configs/micro_pysrc.yaml), held out in N and D
    moe_law        Clark et al.'s law over E (num_experts 0 = dense = E 1) at several sizes
    investigation  the MoE training path: dispatch (capacity factor, dropless), balance loss, z-loss, bias; per
                   run the loss minus the dense reference's (`vs_dense`), the drop fraction / load max/mean /
                   router entropy over training (metrics.jsonl) and each expert's gradient norm at the end
                   (moe.eval.experts -> experts.json, computed by `--run`)
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from moe.config import from_dict, read_preset
from moe.runtime import storage
from moe.scaling import fit as sf
from moe.scaling import compare
from moe.scaling.compare import _series
from moe.scaling.points import collect, read_json
from moe.train.metrics import read_metrics
from moe.scaling.sweep import load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "configs" / "sweeps"
CLAIMS = {  # claim -> the sweep files it reads, by role
    "moe_vs_dense": {"runs": "evidence_moe_dense.yaml"},
    "lion_vs_adamw": {"runs": "evidence_optim.yaml"},
    "scaling_dense": {"fit": "evidence_scaling_dense.yaml", "heldout": "evidence_heldout_dense.yaml"},
    "scaling_moe": {"fit": "evidence_scaling_moe.yaml", "heldout": "evidence_heldout_moe.yaml"},
    "scaling_dense_1epoch": {"fit": "evidence_scaling_dense.yaml", "heldout": "evidence_heldout_dense_1epoch.yaml"},
    "scaling_moe_1epoch": {"fit": "evidence_scaling_moe.yaml", "heldout": "evidence_heldout_moe_1epoch.yaml"},
    "scaling_dense_pysrc": {"fit": "evidence_scaling_dense_pysrc.yaml", "heldout": "evidence_heldout_dense_pysrc.yaml"},
    "scaling_moe_pysrc": {"fit": "evidence_scaling_moe_pysrc.yaml", "heldout": "evidence_heldout_moe_pysrc.yaml"},
    "moe_law": {"runs": "evidence_experts.yaml"},
    "investigation": {"runs": "evidence_investigation.yaml"},
}
# The scaling claims' fits: the fit sweep's points whose token budget lies in this range (both ends included).
# The two designs share a fit sweep: 0.5-2 epochs of the built-in corpus with held-out runs on 2-2.7 epochs, or
# at most one epoch (no token seen twice, as Hoffmann et al.) with held-out runs on exactly one. The third design
# has its own corpus and fit sweeps (every point of them).
FIT_TOKENS = {"scaling_dense": (1_228_800, 4_915_200), "scaling_moe": (1_228_800, 4_915_200),
              "scaling_dense_1epoch": (614_400, 2_457_600), "scaling_moe_1epoch": (614_400, 2_457_600),
              "scaling_dense_pysrc": (614_400, 2_457_600), "scaling_moe_pysrc": (614_400, 2_457_600)}
SCALING_CLAIMS = tuple(FIT_TOKENS)
EXPERTS_FILE = "experts.json"  # per run of the investigation: `python -m moe.eval.experts` on its last checkpoint
CURVE_KEYS = ("loss", "drop_fraction", "load_imbalance", "router_entropy", "aux_loss", "grad_norm")
TARGETS = {"moe_minus_dense": -0.03, "prediction_error": 0.02}  # the bars: MoE >= 0.03 below; within 2%


class ReportError(ValueError):
    """A claim cannot be reported yet (runs missing or unevaluated); the message names them."""


def _settings(point_overrides) -> dict[str, str]:
    return dict(o.split("=", 1) for o in point_overrides)


def _rows(name: str, role: str, root: str) -> list[dict]:
    """The collected rows of a claim's sweep (`claim_sweep`), each with its point's overrides as `settings`, its
    folder as `dir` and its sweep's name as `sweep`; every point must be done."""
    sweep, sweep_file = claim_sweep(name, role), CLAIMS[name][role]
    rows = collect(sweep, storage.join(root, sweep.name))
    missing = [r["name"] for r in rows if r["status"] != "done"]
    if missing:
        raise ReportError(f"{sweep_file}: {len(missing)} of {len(rows)} points not done and evaluated (first: {missing[0]}); "
                          f"run `python -m moe.scaling run configs/sweeps/{sweep_file}`")
    for r, p in zip(rows, sweep.points):
        r["settings"] = _settings(p.overrides)
        r["dir"] = storage.join(root, sweep.name, p.name)
        r["sweep"] = sweep.name
    return rows


def claim_sweep(name: str, role: str):
    """A claim's sweep for `role`; a scaling claim's fit sweep keeps only the points within its FIT_TOKENS."""
    sweep = load_sweep(SWEEPS / CLAIMS[name][role])
    if role != "fit":
        return sweep
    lo, hi = FIT_TOKENS[name]
    return dataclasses.replace(sweep, points=tuple(p for p in sweep.points if lo <= p.budget_tokens <= hi))


def _run_entry(r: dict) -> dict:
    keep = ("name", "sweep", "N_total", "N_active", "E", "tokens", "flops", "eval_loss", "bits_per_byte", "cpu_s",
            "eval_split")
    return {**{k: r[k] for k in keep}, "overrides": r["settings"]}


ROUTER_TAGS = {"model.router_z_loss_weight": "z", "model.aux_loss_weight": "aux"}  # a router override names a variant


def _variant(r: dict) -> str:
    """dense, or e<E> with a tag per router setting the point overrides: e32, e32-z0 (router z-loss 0)."""
    e = int(r["settings"].get("model.num_experts", r["E"] if r["E"] != 1 else 0))
    if e == 0 or r["E"] == 1:
        return "dense"
    tags = [f"{t}{float(r['settings'][k]):g}" for k, t in ROUTER_TAGS.items() if k in r["settings"]]
    return "-".join([f"e{e}", *tags])


def _variant_order(v: str) -> tuple[int, str]:
    return int(v[1:].split("-")[0]), v


def _mean_spread(xs: list[float]) -> dict:
    mean, spread = compare._mean_spread(xs)  # spread: half the range, as `compare` reports it
    return {"mean": mean, "spread": spread, "n": len(xs), "losses": xs}


# --- claims ----------------------------------------------------------------------------------------


def moe_vs_dense(rows: list[dict]) -> dict:
    """Per token budget and variant: the mean over seeds; MoE minus dense per budget (negative = MoE better)."""
    budgets = sorted({r["tokens"] for r in rows})
    table = []
    for tok in budgets:
        at = [r for r in rows if r["tokens"] == tok]
        by = {}
        for r in at:
            by.setdefault(_variant(r), []).append(r)
        if "dense" not in by:
            raise ReportError(f"moe_vs_dense: no dense run at {tok} tokens")
        entry = {"tokens": tok, "flops": statistics.fmean(r["flops"] for r in by["dense"])}
        for v, rs in by.items():
            entry[v] = {**_mean_spread([r["eval_loss"] for r in rs]),
                        "flops_per_token": statistics.fmean(r["flops"] / r["tokens"] for r in rs)}
        table.append(entry)
    variants = sorted({_variant(r) for r in rows} - {"dense"}, key=_variant_order)
    diff = {v: [e[v]["mean"] - e["dense"]["mean"] for e in table] for v in variants}
    top2 = {v: all(d <= TARGETS["moe_minus_dense"] for d in diff[v][-2:]) for v in variants}
    return {"budgets": table, "moe_minus_dense": diff, "target": TARGETS["moe_minus_dense"],
            "met_at_two_largest_budgets": top2, "runs": [_run_entry(r) for r in rows]}


def _optimizer(r: dict) -> str:
    return r["settings"].get("optim.name", "adamw")


def lion_vs_adamw(rows: list[dict]) -> dict:
    """Per model (dense / eN) and optimizer: every (lr, wd) tried, the best, and best Lion minus best AdamW."""
    out, diff = {}, {}
    for model in sorted({_variant(r) for r in rows}):
        per = {}
        for opt in sorted({_optimizer(r) for r in rows if _variant(r) == model}):
            rs = sorted((r for r in rows if _variant(r) == model and _optimizer(r) == opt),
                        key=lambda r: float(r["settings"]["optim.lr"]))
            grid = [{"lr": float(r["settings"]["optim.lr"]),
                     "weight_decay": float(r["settings"].get("optim.weight_decay", "nan")),
                     "eval_loss": r["eval_loss"]} for r in rs]
            i = min(range(len(rs)), key=lambda j: rs[j]["eval_loss"])
            per[opt] = {"grid": grid, "best": grid[i], "best_at_grid_edge": i in (0, len(rs) - 1) and len(rs) > 1}
        out[model] = per
        if {"lion", "adamw"} <= per.keys():
            diff[model] = per["lion"]["best"]["eval_loss"] - per["adamw"]["best"]["eval_loss"]
    return {"models": out, "lion_minus_adamw": diff, "runs": [_run_entry(r) for r in rows]}


def scaling(fit_rows: list[dict], heldout_rows: list[dict], *, bootstrap: int = 100) -> dict:
    """Chinchilla approach 3 on the fit runs (N = active params, D = tokens); each held-out run predicted."""
    fit = sf.fit_chinchilla([r["N_active"] for r in fit_rows], [r["tokens"] for r in fit_rows],
                            [r["eval_loss"] for r in fit_rows], bootstrap=bootstrap)
    largest = max(r["flops"] for r in fit_rows)
    held = []
    for r in heldout_rows:
        pred = float(sf.chinchilla_loss(fit["params"], r["N_active"], r["tokens"]))
        held.append({"name": r["name"], "N_active": r["N_active"], "tokens": r["tokens"], "flops": r["flops"],
                     "compute_vs_largest_fitted": r["flops"] / largest, "predicted": pred, "measured": r["eval_loss"],
                     "prediction_error": pred / r["eval_loss"] - 1})
    errors = {h["name"]: h["prediction_error"] for h in held}
    return {"fit": fit, "largest_fitted_flops": largest, "heldout": held, "prediction_error": errors,
            "target": TARGETS["prediction_error"], "met": all(abs(e) <= TARGETS["prediction_error"] for e in errors.values()),
            "runs": [_run_entry(r) for r in fit_rows], "heldout_runs": [_run_entry(r) for r in heldout_rows]}


def moe_law(rows: list[dict]) -> dict:
    fit = sf.fit_moe([r["N_active"] for r in rows], [r["E"] for r in rows], [r["eval_loss"] for r in rows])
    fitted = sf.moe_loss(fit["params"], [r["N_active"] for r in rows], [r["E"] for r in rows])
    resid = [{"name": r["name"], "size": r["size"], "E": r["E"], "N_active": r["N_active"], "measured": r["eval_loss"],
              "fitted": float(f)} for r, f in zip(rows, fitted)]
    return {"fit": fit, "points": resid, "runs": [_run_entry(r) for r in rows]}


def investigation(rows: list[dict]) -> dict:
    """Each run's loss against the dense reference's, its routing curves and its experts' gradient norms."""
    dense = [r for r in rows if _variant(r) == "dense"]
    if len(dense) != 1:
        raise ReportError(f"investigation: needs exactly one dense reference run, got {len(dense)}")
    ref = dense[0]["eval_loss"]
    runs = []
    for r in rows:
        entry = {**_run_entry(r), "vs_dense": r["eval_loss"] - ref}
        if _variant(r) != "dense":
            logged = [x for x in read_metrics(r["dir"]) if "tokens_per_sec" in x]  # training records
            entry["curves"] = {k: sorted(_series(logged, k).items()) for k in CURVE_KEYS}  # [[step, value], ...]
            diag = read_json(storage.join(r["dir"], EXPERTS_FILE))
            if diag is None:
                raise ReportError(f"investigation: {r['name']} has no {EXPERTS_FILE}; run the claim with --run")
            entry["experts"] = {k: diag[k] for k in ("step", "drop_fraction", "grad_norm_max_over_mean",
                                                     "grad_norm_min_over_mean", "load_max_over_mean",
                                                     "experts_without_gradient", "grad_norm", "load")}
        runs.append(entry)
    return {"dense_loss": ref, "vs_dense": {r["name"]: r["vs_dense"] for r in runs}, "runs": runs}


# --- the report ------------------------------------------------------------------------------------


def claim(name: str, root: str, *, bootstrap: int = 100) -> dict:
    if name in SCALING_CLAIMS:
        out = scaling(_rows(name, "fit", root), _rows(name, "heldout", root), bootstrap=bootstrap)
    else:
        rows = _rows(name, "runs", root)
        out = {"moe_vs_dense": moe_vs_dense, "lion_vs_adamw": lion_vs_adamw, "moe_law": moe_law,
               "investigation": investigation}[name](rows)
    runs = out["runs"] + out.get("heldout_runs", [])
    cpu = [r["cpu_s"] for r in runs]
    return out | about(name) | {"cpu_s": sum(cpu) if None not in cpu else None}


def about(name: str) -> dict:
    """What a claim's entry says that comes from the repo's files, not from its runs: its corpus, its sweep files and
    the command that reproduces it (refreshed for the claims a partial report keeps from results.json)."""
    return {"corpus": corpus(name), "sweeps": {role: f"configs/sweeps/{f}" for role, f in CLAIMS[name].items()},
            "commands": [f"python -m moe.scaling report --claim {name} --run"]}


def corpus(name: str) -> dict:
    """The corpus a claim's runs train and evaluate on, from its sweeps' base preset: the source, and for the
    packages source the pinned distributions (another version is another corpus)."""
    bases = {load_sweep(SWEEPS / f).base for f in CLAIMS[name].values()}
    data = [from_dict(read_preset(b)).data for b in sorted(bases)]
    if len({(d.source, d.packages, d.files, d.tfds_name, d.validation_fraction) for d in data}) != 1:
        raise ReportError(f"claim {name}: its sweeps' presets ({', '.join(map(str, sorted(bases)))}) name different corpora")
    d = data[0]
    out = {"source": d.source, "validation_fraction": d.validation_fraction}
    return out | ({"packages": list(d.packages)} if d.source == "packages" else {})


def run_claim(name: str, root: str) -> list[str]:
    """Run (or resume) every point of the claim's sweeps; the sweep files with a failed point."""
    from moe.scaling.points import run_sweep

    failed = []
    for role, f in CLAIMS[name].items():
        sweep = claim_sweep(name, role)
        if run_sweep(sweep, storage.join(root, sweep.name)):
            failed.append(f)
        elif name == "investigation":
            from moe.eval.experts import diagnose

            for p in sweep.points:
                d = storage.join(root, sweep.name, p.name)
                if "model.num_experts=0" not in p.overrides and not storage.isfile(storage.join(d, EXPERTS_FILE)):
                    write(diagnose(d), storage.join(d, EXPERTS_FILE))
    return failed


def headline(report: dict) -> dict:
    """The numbers docs/results.md quotes, gathered from the claims present."""
    c = report["claims"]
    out = {}
    if "moe_vs_dense" in c:
        out["moe_minus_dense"] = c["moe_vs_dense"]["moe_minus_dense"]
    if "lion_vs_adamw" in c:
        out["lion_minus_adamw"] = c["lion_vs_adamw"]["lion_minus_adamw"]
    if "investigation" in c:
        out["investigation_vs_dense"] = c["investigation"]["vs_dense"]
    errs = {f: c[f]["prediction_error"] for f in SCALING_CLAIMS if f in c}
    if errs:
        out["prediction_error"] = errs
    return out


def build(root: str, claims: list[str] | None = None, *, bootstrap: int = 100, previous: dict | None = None) -> dict:
    """The report over `claims` (default all); claims not asked for are kept from `previous` (results.json), with
    what `about` derives from the repo's files brought up to date; a claim CLAIMS no longer names is dropped."""
    report = {"claims": {k: v | about(k) for k, v in (previous or {}).get("claims", {}).items() if k in CLAIMS}}
    for name in claims or list(CLAIMS):
        report["claims"][name] = claim(name, root, bootstrap=bootstrap)
    # A run two claims share (a fit sweep's point in both designs) ran once and is counted once.
    runs = {(r.get("sweep"), r["name"]): r["cpu_s"] for v in report["claims"].values()
            for r in v["runs"] + v.get("heldout_runs", [])}
    cpu = list(runs.values())
    report["cpu_hours_total"] = sum(cpu) / 3600 if cpu and None not in cpu else None
    report["headline"] = headline(report)
    return report


def write(report: dict, out: str) -> str:
    def clean(x):  # JSON has no NaN / inf
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    storage.write_text(out, json.dumps(clean(report), indent=1) + "\n")
    return out


def summary(report: dict) -> str:
    """A few readable lines per claim (the headline numbers, the fits' parameters)."""
    c, lines = report["claims"], []
    if "moe_vs_dense" in c:
        m = c["moe_vs_dense"]
        lines.append("moe_vs_dense (MoE minus dense, mean of seeds; target <= -0.03 at the two largest budgets):")
        for i, b in enumerate(m["budgets"]):
            lines.append(f"  {b['tokens']:,} tokens, {b['flops']:.3g} FLOPs: dense {b['dense']['mean']:.4f}"
                         + "".join(f"  {v} {d[i]:+.4f} (+-{b[v]['spread']:.4f})" for v, d in m["moe_minus_dense"].items()))
    if "lion_vs_adamw" in c:
        for model, per in c["lion_vs_adamw"]["models"].items():
            best = ", ".join(f"{o} lr {p['best']['lr']:g} -> {p['best']['eval_loss']:.4f}" + (" (grid edge)" * p["best_at_grid_edge"])
                             for o, p in per.items())
            d = c["lion_vs_adamw"]["lion_minus_adamw"].get(model)
            lines.append(f"lion_vs_adamw {model}: {best}" + (f"; lion - adamw {d:+.4f}" if d is not None else ""))
    for f in SCALING_CLAIMS:
        if f in c:
            p = c[f]["fit"]["params"]
            lines.append(f"{f}: L = {p['E']:.3f} + {p['A']:.3g}/N^{p['alpha']:.3f} + {p['B']:.3g}/D^{p['beta']:.3f}"
                         f" on {c[f]['fit']['n_points']} runs")
            lines += [f"  held out {h['name']} ({h['compute_vs_largest_fitted']:.1f}x the largest fitted compute): "
                      f"predicted {h['predicted']:.4f}, measured {h['measured']:.4f}, error {h['prediction_error']:+.2%}"
                      for h in c[f]["heldout"]]
    if "investigation" in c:
        lines.append(f"investigation (eval loss minus the dense reference's {c['investigation']['dense_loss']:.4f}):")
        for r in c["investigation"]["runs"]:
            x = r.get("experts")
            lines.append(f"  {r['name']}: {r['vs_dense']:+.4f}" + (
                f"  drop {x['drop_fraction']:.3f}, load max/mean {x['load_max_over_mean']:.2f}, expert grad norm "
                f"min/mean {x['grad_norm_min_over_mean']:.2f} max/mean {x['grad_norm_max_over_mean']:.2f}" if x else ""))
    if "moe_law" in c:
        p = c["moe_law"]["fit"]["params"]
        lines.append(f"moe_law: log10 L = {p['a']:.4f} log10 N + {p['b']:.4f} log10 E^ + {p['c']:.4f} log10 N log10 E^ + {p['d']:.4f}")
    if report.get("cpu_hours_total") is not None:
        lines.append(f"CPU time of the runs reported: {report['cpu_hours_total']:.2f} CPU-hours")
    return "\n".join(lines)
