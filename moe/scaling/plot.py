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


def _done(rows: list[dict], n_key: str) -> list[dict]:
    return [r for r in rows if r["status"] == "done" and r["eval_loss"] is not None and r[n_key]]


def _save(fig, path: str) -> str:
    """Writes the figure (a local path or a bucket URL) and frees it (pyplot keeps every open figure alive)."""
    fig.tight_layout()
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
