"""Scaling-law figures (matplotlib, Agg backend: no display needed): loss vs N, IsoFLOP curves, residuals.

Owns: drawing only. Inputs are the rows of `moe.scaling.collect` and the fit dicts written by
`python -m moe.scaling fit` (fit_<form>.json); nothing here fits or reads runs.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: CI and TPU VMs have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moe.runtime import storage  # noqa: E402
from moe.scaling.fit import chinchilla_loss  # noqa: E402
from moe.scaling.report import FIT_TOKENS, SCALING_CLAIMS  # noqa: E402


def _done(rows: list[dict], n_key: str) -> list[dict]:
    return [r for r in rows if r["status"] == "done" and r["eval_loss"] is not None and r[n_key]]


def _save(fig, path: str, rect=(0, 0, 1, 1)) -> str:
    """Writes the figure (a local path or a bucket URL) and frees it (pyplot keeps every open figure alive);
    `rect` is the part of the figure the axes are laid out in (room for a figure legend)."""
    fig.tight_layout(rect=rect)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())
    return path


def plot_loss_vs_n(rows: list[dict], fit: dict | None, path: str, n_key: str = "N_active") -> str:
    """Final eval loss against N, one colour per token (or compute) budget; the Chinchilla curve
    L(N, D) at each budget's token count when a fit is given."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    done = _done(rows, n_key)
    group = "budget_flops" if any(r["budget_flops"] for r in done) else "budget_tokens"
    keys = sorted({r[group] or r["tokens"] for r in done})
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(keys), 1)))
    for key, c in zip(keys, colors):
        pts = sorted((r for r in done if (r[group] or r["tokens"]) == key), key=lambda r: r[n_key])
        n = np.array([r[n_key] for r in pts], dtype=float)
        label = f"C={key:.2g}" if group == "budget_flops" else f"D={key:.3g} tok"
        ax.plot(n, [r["eval_loss"] for r in pts], "o", color=c, label=label)
        if fit and fit.get("form") == "chinchilla" and group == "budget_tokens":
            grid = np.geomspace(n.min() / 2, n.max() * 2, 100)
            d = np.mean([r["tokens"] for r in pts])
            ax.plot(grid, chinchilla_loss(fit["params"], grid, d), "-", color=c, lw=1)
    ax.set(xscale="log", xlabel=f"{n_key} (parameters)", ylabel="final eval loss (nats/token)",
           title="Loss vs model size" + (" with L = E + A/N^α + B/D^β" if fit else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_isoflop(fit: dict, rows: list[dict], path: str, n_key: str = "N_active") -> str:
    """IsoFLOP curves (Chinchilla fig. 3): loss vs ln N per budget, fitted parabola and its vertex."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    done = _done(rows, n_key)
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(fit["budgets"])))
    for b, c in zip(fit["budgets"], colors):
        pts = [r for r in done if r["budget_flops"] == b["flops"]]
        n = np.array([r[n_key] for r in pts], dtype=float)
        ax.plot(n, [r["eval_loss"] for r in pts], "o", color=c, label=f"C={b['flops']:.2g}")
        grid = np.geomspace(n.min(), n.max(), 100)
        ax.plot(grid, np.polyval(b["coef"], np.log(grid)), "-", color=c, lw=1)
        ax.plot([b["N_opt"]], [b["loss_opt"]], "*", color=c, ms=12)
    ax.set(xscale="log", xlabel=n_key, ylabel="final eval loss", title="IsoFLOP curves")
    ax.legend(fontsize=8)
    c = np.array([b["flops"] for b in fit["budgets"]])
    ax2.plot(c, [b["N_opt"] for b in fit["budgets"]], "o")
    grid = np.geomspace(c.min() / 3, c.max() * 3, 50)
    p = fit["params"]
    ax2.plot(grid, np.exp(p["log_k"]) * grid ** p["a"], "-", label=f"N_opt ∝ C^{p['a']:.3f}")
    ax2.set(xscale="log", yscale="log", xlabel="compute budget C (FLOPs)", ylabel="N_opt", title="Optimal size")
    ax2.legend(fontsize=8)
    for a in (ax, ax2):
        a.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_residuals(fit: dict, rows: list[dict], path: str) -> str:
    """Residuals log L - log L_hat (Chinchilla) or log10 (MoE) against each fitted point."""
    by_name = {r["name"]: r for r in rows}
    pts = [by_name[n] for n in fit["points"]]
    n_key = "N_active" if fit.get("n_param", "active") == "active" else "N_total"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.axhline(0, color="k", lw=0.8)
    ax.plot([r[n_key] for r in pts], fit["residuals"], "o")
    unit = "log10" if fit["form"] == "moe" else "ln"
    ax.set(xscale="log", xlabel=n_key, ylabel=f"{unit} L - {unit} L_fit", title=f"{fit['form']} fit residuals")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_all(rows: list[dict], fits: dict[str, dict], outdir: str) -> list[str]:
    """Every figure the data supports; returns the PNG paths written."""
    chin = fits.get("chinchilla")
    n_key = "N_total" if (chin or {}).get("n_param") == "total" else "N_active"
    out = [plot_loss_vs_n(rows, chin, storage.join(outdir, "loss_vs_n.png"), n_key)]
    if "isoflop" in fits:
        out.append(plot_isoflop(fits["isoflop"], rows, storage.join(outdir, "isoflop.png")))
    for form in ("chinchilla", "moe"):
        if form in fits:
            out.append(plot_residuals(fits[form], rows, storage.join(outdir, f"residuals_{form}.png")))
    return out


# --- the evidence report (moe/scaling/report.py) --------------------------------------------------


def _plot_moe_vs_dense(c: dict, path: str) -> str:
    """Loss vs training FLOPs, one line per variant (mean of seeds, error bars = half the range)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    variants = ["dense", *c["moe_minus_dense"]]
    for v, col in zip(variants, plt.cm.tab10(np.arange(len(variants)))):
        b = [e for e in c["budgets"] if v in e]
        ax.errorbar([e["flops"] for e in b], [e[v]["mean"] for e in b], yerr=[e[v]["spread"] for e in b], fmt="o-",
                    color=col, capsize=3, label=v)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="eval loss, full validation split",
           title="MoE vs dense at equal active FLOPs per token")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _plot_lion_vs_adamw(c: dict, path: str) -> str:
    """Eval loss against the learning rate, per model and optimizer."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for model, per in c["models"].items():
        for opt, p in per.items():
            ax.plot([g["lr"] for g in p["grid"]], [g["eval_loss"] for g in p["grid"]], "o-" if opt == "adamw" else "s--",
                    label=f"{model} {opt}")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="eval loss, full validation split",
           title="Lion vs AdamW: learning-rate grids")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _plot_scaling(c: dict, title: str, path: str) -> str:
    """The fitted runs and the law at each token budget, and the held-out runs: measured vs predicted."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    runs = c["runs"]
    budgets = sorted({r["tokens"] for r in runs})
    for d, col in zip(budgets, plt.cm.viridis(np.linspace(0, 0.8, len(budgets)))):
        pts = sorted((r for r in runs if r["tokens"] == d), key=lambda r: r["N_active"])
        n = np.array([r["N_active"] for r in pts], float)
        ax.plot(n, [r["eval_loss"] for r in pts], "o", color=col, label=f"fit, D={d:.3g}")
        grid = np.geomspace(n.min() / 1.5, n.max() * 2.5, 100)
        ax.plot(grid, chinchilla_loss(c["fit"]["params"], grid, d), "-", color=col, lw=1)
    lines = []  # held-out runs may share N (two seeds, or equal N at other D): numbered, listed in a box
    for i, h in enumerate(c["heldout"], 1):
        ax.plot([h["N_active"]], [h["measured"]], "r*", ms=12)
        ax.plot([h["N_active"]], [h["predicted"]], "kx", ms=9)
        ax.annotate(str(i), (h["N_active"], h["measured"]), fontsize=7, xytext=(6, -3 + 7 * (i % 2)),
                    textcoords="offset points")
        short = "-".join(p for p in h["name"].split("-") if not p.startswith(("numheads", "dff")))
        lines.append(f"{i}: {short}: predicted {h['predicted']:.3f}, error {h['prediction_error']:+.1%}")
    ax.text(0.02, 0.02, "\n".join(lines), transform=ax.transAxes, fontsize=5.5, va="bottom", family="monospace",
            bbox=dict(boxstyle="round", fc="white", alpha=0.8))
    ax.plot([], [], "r*", label="held out, measured")
    ax.plot([], [], "kx", label="held out, predicted")
    ax.set(xscale="log", xlabel="active parameters N", ylabel="eval loss, full validation split")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _plot_moe_law(c: dict, path: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    sizes = sorted({p["size"] for p in c["points"]}, key=lambda s: min(p["N_active"] for p in c["points"] if p["size"] == s))
    for size, col in zip(sizes, plt.cm.tab10(np.arange(len(sizes)))):
        pts = sorted((p for p in c["points"] if p["size"] == size), key=lambda p: p["E"])
        ax.plot([p["E"] for p in pts], [p["measured"] for p in pts], "o", color=col, label=f"size {size}, measured")
        ax.plot([p["E"] for p in pts], [p["fitted"] for p in pts], "-", color=col, lw=1, label=f"size {size}, law")
    ax.set(xscale="log", xlabel="experts E (1 = dense)", ylabel="eval loss, full validation split",
           title="Clark et al. law over the number of experts")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


_SHORT = (("dispatchcapacity-capacityfactor", "capacity "), ("dispatchdropless", "dropless"), ("auxlossweight", " aux "),
          ("routerzlossweight", " z "), ("routerbiasupdaterate", " bias "), ("-", ""))


def _short(run: dict) -> str:
    """`e32 capacity 1.25 aux 0.0 bias 0.001` from an investigation run's name (its settings after the seed)."""
    label = run["name"].split("-s0", 1)[-1]
    for a, b in _SHORT:
        label = label.replace(a, b)
    return f"E {run['E']} {' '.join(label.split())}" if run["E"] > 1 else f"dense {' '.join(label.split())}"


def _plot_investigation(c: dict, path: str) -> str:
    """Drop fraction and load max/mean over training per MoE run, and each run's loss minus the dense one's."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    moe_runs = [r for r in c["runs"] if "curves" in r]
    for r, col in zip(moe_runs, plt.cm.tab10(np.arange(len(moe_runs)))):
        for ax, key in zip(axes[:2], ("drop_fraction", "load_imbalance")):
            pts = r["curves"][key]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=col, lw=1.2, label=_short(r))
    axes[0].set(xlabel="step", ylabel="assignments dropped", title="drop fraction over training")
    axes[1].set(xlabel="step", ylabel="max / mean expert load (worst layer)", yscale="log", title="load over training")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    axes[2].barh(range(len(c["runs"])), [r["vs_dense"] for r in c["runs"]], color="tab:blue")
    axes[2].set_yticks(range(len(c["runs"])), [_short(r) for r in c["runs"]], fontsize=8)
    axes[2].axvline(0, color="k", lw=0.8)
    axes[2].set(xlabel="eval loss minus the dense reference's (nats)", title="end of training (600 steps, seed 0)")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, path, rect=(0, 0.1, 1, 1))


def plot_report(report: dict, outdir: str) -> list[str]:
    """One figure per claim present in the report; returns the PNG paths written."""
    c, out = report["claims"], []
    if "moe_vs_dense" in c:
        out.append(_plot_moe_vs_dense(c["moe_vs_dense"], storage.join(outdir, "moe_vs_dense.png")))
    if "lion_vs_adamw" in c:
        out.append(_plot_lion_vs_adamw(c["lion_vs_adamw"], storage.join(outdir, "lion_vs_adamw.png")))
    for f in SCALING_CLAIMS:
        if f in c:
            lo, hi = FIT_TOKENS[f]
            corpus = {"builtin": "stdlib", "packages": "packages"}.get(c[f].get("corpus", {}).get("source"), "")
            title = (f"Chinchilla approach 3, {f.split('_')[1]} family, fit on D = {lo / 1e6:.2f}-{hi / 1e6:.2f}M"
                     + (f" ({corpus} corpus)" if corpus else ""))
            out.append(_plot_scaling(c[f], title, storage.join(outdir, f"{f}.png")))
    if "moe_law" in c:
        out.append(_plot_moe_law(c["moe_law"], storage.join(outdir, "moe_law.png")))
    if "investigation" in c:
        out.append(_plot_investigation(c["investigation"], storage.join(outdir, "investigation.png")))
    return out
